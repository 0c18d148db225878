"""Memory comes back after many thousands of sessions, through the Python API.

``tests/c/test_leaks.c`` (run by ``test_c_units.py`` under ASan) checks
the C library alone: 20,000 sans-I/O sessions and 10,000 engine
connections bring the allocated byte count back to its baseline exactly.
This module checks the same through cffi, where the Python objects that
own C memory (sessions via ``ffi.gc``, messages, results, Python states
and their handles) could keep it alive: after a warm-up, thousands more
sessions may not leave the C heap more than a little above where it was.

The count is ASan's own (``__sanitizer_get_current_allocated_bytes``)
when the process runs with the ASan runtime preloaded (the sanitized run
of ``.ci/run``), else glibc's ``mallinfo2()``; Python's small objects
live in pymalloc arenas outside both, so what is counted is mostly C.
"""

from __future__ import annotations

import ctypes
import gc

import pytest

import smtpstate
from helpers import missing
from scripted import ScriptedSession, crlf_lines
from smtpstate import Action, Machine, State

_libc = ctypes.CDLL(None)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def _allocated() -> int:
    """Bytes allocated with malloc and not freed, process-wide."""
    asan = getattr(_libc, "__sanitizer_get_current_allocated_bytes", None)
    if asan is not None:
        asan.restype = ctypes.c_size_t
        return int(asan())
    mallinfo2 = getattr(_libc, "mallinfo2", None)
    if mallinfo2 is None:
        missing("neither ASan's counter nor glibc's mallinfo2() is available")
    mallinfo2.restype = _Mallinfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


class Noop(State):
    """A Python state after MAIL: NOOP, one reply; keeps per-session data."""

    name = "NOOP"

    def setup(self, session) -> int:
        session.data["big"] = b"x" * 4096        # must go with the session
        session.send("NOOP")
        return 1

    def callback(self, session, reply):
        return Action.NEXT if reply.code < 400 else Action.TEMPFAIL_TX


MACHINE = Machine()
MACHINE.register(Noop(), after="MAIL")


def _one(k: int) -> None:
    """One scripted session: a delivery, a tempfail, or a refusal."""
    s = ScriptedSession()
    s.submit(data=b"Subject: leak\r\n\r\n" + b".line\n" * 50)
    s.start()
    s.feed(b"220 mx.test ESMTP\r\n")
    s.sent()
    s.feed(b"250-mx.test\r\n250 PIPELINING\r\n")
    s.sent()
    if k % 3 == 2:
        s.feed(b"550 no\r\n")
    else:
        s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.sent()
        s.feed(b"250 queued\r\n" if k % 3 else b"451 later\r\n")
    s.sent()
    results = s.finish()
    assert len(results) == 1


def _many(n: int) -> int:
    for k in range(n):
        _one(k)
    gc.collect()
    return _allocated()


def test_sessions_give_their_memory_back():
    _many(300)                            # warm-up: caches, interned objects
    base = _many(300)
    after = _many(3000)
    # A leak of 100 bytes a session would add 300 KB; allow noise below that.
    assert after - base < 192 * 1024, (base, after)


@pytest.fixture(scope="module")
def aiosmtpd_module():
    import helpers
    try:
        import aiosmtpd  # noqa: F401
    except ImportError:
        helpers.missing("aiosmtpd is not installed (pip install '.[test]')")
    server = helpers.AiosmtpdServer(None).start()
    yield server
    server.stop()


def test_clients_with_python_states_give_their_memory_back(aiosmtpd_module):
    """Client connections (a Session each, with a Python state holding
    per-session data and a handle C calls back through)."""
    server = aiosmtpd_module
    msg = smtpstate.Message("s@client.test", ["r@server.test"], b"Subject: x\r\n\r\nbody\r\n")

    def connections(n: int) -> int:
        for _ in range(n):
            with smtpstate.Client(server.host, server.port, timeout=10,
                                  machine=MACHINE) as client:
                assert client.send(msg).status == "delivered"
        server.messages.clear()
        gc.collect()
        return _allocated()

    connections(50)
    base = connections(50)
    after = connections(400)
    assert after - base < 192 * 1024, (base, after)


def test_results_and_messages_are_freed_with_their_objects():
    msg = smtpstate.Message("s@client.test", ["r@server.test"], (b"x" * 98 + b"\r\n") * 200)
    base = None
    for round_ in range(4):
        for _ in range(500):
            c = msg._to_c()                # freed by ffi.gc when dropped
            del c
        gc.collect()
        if round_ == 1:
            base = _allocated()
    assert _allocated() - base < 64 * 1024


def test_scripted_session_transcript_is_exact():
    """The helper the leak test relies on still writes what a client writes."""
    s = ScriptedSession()
    s.submit()
    s.start()
    s.feed(b"220 mx\r\n")
    assert s.sent() == crlf_lines("EHLO client.example")
    s.finish()
