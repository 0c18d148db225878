"""cffi out-of-line API-mode builder for ``smtpstate._core``.

This module owns the build of the native core and nothing else:

* the cdef, read from ``smtpstate/_cdef/*.h`` in the fixed order of
  ``CDEF_FILES`` (pynacl style: declarations live in header files, one per
  area of ``include/smtpstate.h``, not in Python strings);
* ``set_source("smtpstate._core", ...)`` over every ``csrc/*.c``, compiled
  with the project's strict flags.

API mode compiles the cdef against the real header, so a declaration that
drifts from ``include/smtpstate.h`` breaks the build (or, for enum values
and struct layouts, the first import) instead of corrupting memory.

Two ways in, both with paths relative to the project root (the directory
of ``setup.py``):

* ``pip install .`` -- setuptools imports this file through
  ``cffi_modules=["smtpstate/_build.py:ffibuilder"]`` with the project
  root as the working directory;
* ``python smtpstate/_build.py`` -- from anywhere: it changes to the
  project root and builds ``smtpstate/_core.*.so`` in place.

Environment:

* ``SMTPSTATE_SANITIZE=1`` adds AddressSanitizer and UBSan to the compile
  and link flags. Importing such a build needs the ASan runtime preloaded
  (``LD_PRELOAD=$(cc -print-file-name=libasan.so)``).

The wrapper C that cffi generates compiles cleanly under the same strict
flags (checked with cffi 1.17, 2.0 and 2.1, gcc 12), so one extension is built
from the wrapper and ``csrc/*.c`` together. XXX If a cffi release ever
emits code that ``-Wextra -Werror`` rejects, build ``csrc/*.c`` as a
static library with ``build_clib`` first (brotlicffi's BuildClibBeforeExt)
and relax the flags for the wrapper only; the strict flags must keep
applying to ``csrc/*.c``.
"""

import glob
import os

from cffi import FFI

__all__ = ["ffibuilder", "make_ffibuilder", "CDEF_FILES", "LIBRARIES", "STRICT_CFLAGS"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)

# Order matters: a file may only use types declared by the ones before it.
CDEF_FILES = (
    "errors.h",  # enum smtps_error, smtps_strerror()
    "state.h",  # actions, built-in states, connection stages
    "reply.h",  # struct smtps_reply, the reply parser, EHLO capabilities
    "body.h",  # the body encoder
    "machine.h",  # struct smtp_state, Momentum's contract, machines
    "message.h",  # messages
    "result.h",  # results
    "classify.h",  # bounce classification of results and replies
    "session.h",  # the sans-I/O session
    "tls.h",  # TLS and AUTH options of a session
    "engine.h",  # the engine: many sessions, epoll
    "callbacks.h",  # extern "Python" trampolines for Python states
)

# The flags every C file of ours must compile cleanly with.
STRICT_CFLAGS = [
    "-std=c11",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-O2",
    "-fvisibility=hidden",
    "-D_POSIX_C_SOURCE=200809L",
]

# OpenSSL (libssl, libcrypto): TLS over memory BIOs in csrc/tls.c, HMAC-MD5
# for CRAM-MD5 in csrc/auth.c. libunbound: DNS (MX, A, AAAA), caching and
# DNSSEC in csrc/resolve.c; libresolv: dn_expand() for MX exchange names.
LIBRARIES = ["ssl", "crypto", "unbound", "resolv"]

SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]


def _rel(*parts):
    """Return a project file's path relative to the working directory.

    setuptools wants relative source paths, and nothing absolute should end
    up in build metadata; relative to the current directory works both when
    setuptools runs us from the project root and from anywhere else.
    """
    return os.path.relpath(os.path.join(_ROOT, *parts))


def _read_cdef():
    chunks = []
    for name in CDEF_FILES:
        path = os.path.join(_HERE, "_cdef", name)
        with open(path, encoding="utf-8") as f:
            chunks.append("/* ---- %s ---- */\n%s" % (name, f.read()))
    extra = sorted(
        set(os.listdir(os.path.join(_HERE, "_cdef"))) - set(CDEF_FILES)
    )
    extra = [n for n in extra if n.endswith(".h")]
    if extra:
        raise RuntimeError(
            "smtpstate/_cdef has files not listed in CDEF_FILES: %s" % extra
        )
    return "\n".join(chunks)


def _sources():
    return sorted(_rel("csrc", os.path.basename(p))
                  for p in glob.glob(os.path.join(_ROOT, "csrc", "*.c")))


def _sanitize():
    return os.environ.get("SMTPSTATE_SANITIZE", "") not in ("", "0")


def make_ffibuilder():
    """Build the FFI object, with paths relative to the current directory."""
    cflags = list(STRICT_CFLAGS)
    ldflags = []
    if _sanitize():
        cflags += SANITIZE_FLAGS
        ldflags += SANITIZE_FLAGS
    depends = sorted(
        _rel(os.path.relpath(p, _ROOT))
        for pattern in ("include/*.h", "csrc/*.h", "smtpstate/_cdef/*.h")
        for p in glob.glob(os.path.join(_ROOT, pattern))
    )
    ffi = FFI()
    ffi.cdef(_read_cdef())
    ffi.set_source(
        "smtpstate._core",
        '#include "smtpstate.h"\n',
        sources=_sources(),
        include_dirs=[_rel("include"), _rel("csrc")],
        depends=depends,
        libraries=list(LIBRARIES),
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )
    return ffi


ffibuilder = make_ffibuilder()


if __name__ == "__main__":
    # The in-place build writes smtpstate/_core.c and the extension next to
    # this file: run it from the project root whatever the caller's cwd.
    os.chdir(_ROOT)
    make_ffibuilder().compile(verbose=True)
