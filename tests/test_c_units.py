"""Run the table-driven C tests (``tests/c/test_*.c``) under ASan and UBSan.

Each test program is compiled together with every ``csrc/*.c`` into a
temporary directory, with the project's strict warnings plus the
sanitizers, and run; it must exit 0. Its output (the RUN/PASS/FAIL lines)
is shown when it does not. These tests use the source tree, not the
installed package.

A program that needs link flags of its own (``-Wl,--wrap=free`` to look at
every block given back) says so on a line of its own near the top:
``/* test_c_units: FLAGS */``.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess

import pytest

import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CFLAGS = [
    "-std=c11",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-O1",
    "-g",
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
    "-D_POSIX_C_SOURCE=200809L",
    "-Iinclude",
    "-Icsrc",
]
LIBS = ["-lssl", "-lcrypto", "-lunbound", "-lresolv"]  # OpenSSL (tls.c, auth.c); DNS (resolve.c)

C_TESTS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "c", "test_*.c")))


def _sources():
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.c")))


def _own_flags(test_c):
    """The ``/* test_c_units: ... */`` flags of a test program, if any."""
    with open(os.path.join(ROOT, test_c), encoding="utf-8") as f:
        head = f.read(2000)
    m = re.search(r"^/\* test_c_units: (.*?) \*/$", head, flags=re.M)
    return shlex.split(m.group(1)) if m else []


def _compiler():
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        helpers.missing("no C compiler (cc) found")
    return cc


@pytest.mark.parametrize("test_c", C_TESTS, ids=[os.path.basename(p) for p in C_TESTS])
def test_c_program(test_c, tmp_path):
    exe = str(tmp_path / os.path.splitext(os.path.basename(test_c))[0])
    cmd = [_compiler(), *CFLAGS, "-o", exe, test_c, *_sources(), *LIBS, *_own_flags(test_c)]
    build = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if build.returncode != 0:
        pytest.fail(
            "compile failed (exit %d): %s\n%s" % (build.returncode, " ".join(cmd), build.stdout.decode(errors="replace")),
            pytrace=False,
        )
    env = dict(os.environ)
    env.setdefault("ASAN_OPTIONS", "abort_on_error=0:detect_leaks=1")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    run = subprocess.run([exe], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    if run.returncode != 0:
        pytest.fail(
            "%s exited %d:\n%s" % (test_c, run.returncode, run.stdout.decode(errors="replace")),
            pytrace=False,
        )
