"""A state written in C, compiled by you, plugged into a machine from
Python: see count_state.c for the C side.

    python examples/c_state/count_state.py            # builds, then sends 5 messages
    python examples/c_state/count_state.py --server HOST:PORT
    smtpstate states --load examples/c_state/count_state.py:make_machine

Steps: compile count_state.c into a shared library with the system's C
compiler (cc, or $CC) against include/smtpstate.h (SMTPSTATE_INCLUDE, else
the include/ directory of this source tree); load it with ctypes; let it
fill a ``smtp_state`` made with smtpstate's own ffi, handing it the few
smtpstate functions it calls as pointers; register it with
``Machine.register_c_state``. The library stays loaded for good (ctypes
never unloads), as the machine's function pointers require.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Optional, Tuple

import smtpstate
from smtpstate import Machine
from smtpstate._core import ffi, lib
from smtpstate.cli import parse_server

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "count_state.c")
# The smtpstate functions count_state.c calls, in its COUNT_API_* order.
API = ("smtps_session_message", "smtps_message_size", "smtps_message_recipient_count")

_loaded: Optional[Tuple[ctypes.CDLL, Any]] = None


def include_dir() -> str:
    path = os.environ.get("SMTPSTATE_INCLUDE") or os.path.join(HERE, "..", "..", "include")
    if not os.path.exists(os.path.join(path, "smtpstate.h")):
        raise SystemExit(f"smtpstate.h not found in {path}: set SMTPSTATE_INCLUDE to the "
                         "include/ directory of the smtpstate sources")
    return os.path.normpath(path)


def build(outdir: str) -> str:
    """Compile count_state.c into outdir; return the library's path."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise SystemExit("no C compiler: install gcc (or set CC)")
    out = os.path.join(outdir, "libcount_state.so")
    cmd = [cc, "-std=c11", "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror",
           "-I", include_dir(), SOURCE, "-o", out]
    print("$ " + " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    return out


def load() -> Tuple[ctypes.CDLL, Any]:
    """Build and load the library once; return it and the filled smtp_state."""
    global _loaded
    if _loaded is None:
        with tempfile.TemporaryDirectory(prefix="smtpstate-c-state-") as tmp:
            so = ctypes.CDLL(build(tmp))       # mapped now: the file may go
        # The library's entry point, called through smtpstate's ffi so that
        # it fills a smtp_state that ffi knows.
        address = ctypes.cast(so.count_state_fill, ctypes.c_void_p).value
        fill = ffi.cast("int (*)(smtp_state *, void *const *, size_t)", address)
        api = ffi.new("void *[]", [ffi.cast("void *", ffi.addressof(lib, n)) for n in API])
        state = ffi.new("smtp_state *")
        if fill(state, api, len(API)) != 0:
            raise SystemExit("count_state_fill failed")
        _loaded = (so, (state, api))
    return _loaded


def make_machine() -> Machine:
    so, (state, api) = load()
    machine = Machine()
    machine.register_c_state(state, after="BODY", keep=(so, api))
    return machine


def stats() -> Tuple[int, int, int]:
    so, _ = load()
    messages, recipients, size = ctypes.c_long(), ctypes.c_long(), ctypes.c_ulonglong()
    so.count_state_stats(ctypes.byref(messages), ctypes.byref(recipients), ctypes.byref(size))
    return messages.value, recipients.value, size.value


def send(host: str, port: int, count: int) -> list:
    machine = make_machine()
    with smtpstate.Client(host, port, machine=machine, timeout=30) as client:
        return [client.send(smtpstate.Message(
            "ann@example.test", [f"bob{i}@example.test", f"carol{i}@example.test"],
            f"Subject: counted {i}\r\n\r\nhello {i}\r\n")) for i in range(count)]


def main(argv: list) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", metavar="HOST:PORT")
    parser.add_argument("--count", type=int, default=5)
    args = parser.parse_args(argv)
    machine = make_machine()
    print("state order:", " -> ".join(name for _, name in machine.states))
    if args.server:
        results = send(*parse_server(args.server), args.count)
    else:
        sys.path.insert(0, os.path.dirname(HERE))
        from _local_server import local_server
        with local_server() as (host, port, _):
            results = send(host, port, args.count)
    delivered = sum(r.ok for r in results)
    messages, recipients, size = stats()
    print(f"delivered {delivered} of {len(results)}; the C state counted {messages} "
          f"messages, {recipients} recipients, {size} bytes")
    return 0 if messages == delivered == len(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
