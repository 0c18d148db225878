"""Atheris fuzz target: the Python boundary of smtpstate.

Run it (``pip install atheris`` first; smtpstate must be importable, built
or installed)::

    python fuzz/fuzz_python.py -max_total_time=10 [corpus_dir]

Each input, through ``atheris.FuzzedDataProvider``, exercises three
things, with the smtpstate Python modules instrumented for coverage:

1. ``Message`` and ``Recipient``: any sender, recipients, content, RET and
   ENVID. Either ``InvalidMessageError`` (a ``ValueError``) is raised, or
   the message is accepted, its addresses hold no control character or
   angle bracket, and the C side accepts it too (``_to_c()``): the two
   validations never disagree.
2. ``Session.send`` from a Python state: any line, str or bytes. Either
   ``InvalidMessageError`` (for CR, LF, NUL, other controls, an empty or
   over-long line), or exactly that line plus CRLF is what the session
   writes.
3. The reply path: the same state awaits replies, and the rest of the
   input is fed to the C session as the server's bytes, in chunks the
   input picks. Each complete reply reaches the state's ``callback`` as a
   ``Reply`` (code 200-559, str text); the callback answers with an
   action the input picks. Whatever the bytes, no exception other than
   the documented ones escapes, and closing the session leaves no message
   without its result.

A finding prints the exception and writes the input (``crash-*``); keep
it under ``fuzz/regressions/python/``. CI runs this for a few seconds
(``.ci/run``); without atheris, ``tests/test_properties.py`` covers the
same boundary with hypothesis.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["smtpstate"]):
    import smtpstate
    from smtpstate import Action, InvalidMessageError, Machine, Message, Recipient, State
    from smtpstate._core import ffi, lib
    from smtpstate.session import Session

_CONTROL = {chr(c) for c in range(0x20)} | {"\x7f"}


def _text(fdp: atheris.FuzzedDataProvider, n: int) -> str:
    return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, n))


def check_message(fdp: atheris.FuzzedDataProvider) -> None:
    sender = _text(fdp, 40)
    rcpts = []
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        addr = _text(fdp, 40)
        if fdp.ConsumeBool():
            notify = tuple(fdp.PickValueInList(["NEVER", "SUCCESS", "FAILURE", "DELAY", "bogus"])
                           for _ in range(fdp.ConsumeIntInRange(0, 2)))
            orcpt = _text(fdp, 20) if fdp.ConsumeBool() else None
            try:
                rcpts.append(Recipient(addr, notify=notify, orcpt=orcpt))
            except InvalidMessageError:
                return
        else:
            rcpts.append(addr)
    data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200))
    ret = fdp.PickValueInList([None, "FULL", "HDRS", "full", "bogus"])
    envid = _text(fdp, 20) if fdp.ConsumeBool() else None
    try:
        msg = Message(sender, rcpts, data, dsn_ret=ret, envid=envid)
    except InvalidMessageError:
        return
    for addr in (msg.sender, *msg.recipients):
        assert not (set(addr) & (_CONTROL | {"<", ">"})), addr
    assert b"\0" not in msg.data          # a NUL never passes (smuggling)
    msg._to_c()            # C must accept what Python accepted (raises otherwise)


class Probe(State):
    """Before the banner: sends the fuzzed line, then awaits replies."""

    name = "FUZZ-PROBE"

    def __init__(self) -> None:
        self.line: object = b"NOOP"
        self.awaits = 0
        self.actions: list = []
        self.replies = 0
        self.sent_ok = False

    def setup(self, session: Session) -> int:
        try:
            session.send(self.line)  # type: ignore[arg-type]
            self.sent_ok = True
        except InvalidMessageError:
            self.sent_ok = False
        return self.awaits

    def callback(self, session: Session, reply):  # type: ignore[override]
        if reply is not None:
            assert 200 <= reply.code <= 559 and isinstance(reply.text, str), reply
            assert isinstance(reply.enhanced, str)
            self.replies += 1
        _ = session.capabilities, session.state, session.reply_index
        return self.actions.pop(0) if self.actions else Action.NEXT


MACHINE = Machine()
PROBE = Probe()
MACHINE.register(PROBE, after=None)


def check_session(fdp: atheris.FuzzedDataProvider) -> None:
    raw = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 60))
    line: object = raw.decode("utf-8", "replace") if fdp.ConsumeBool() else raw
    PROBE.line = line
    PROBE.awaits = fdp.ConsumeIntInRange(0, 3)
    PROBE.actions = [fdp.PickValueInList([Action.NEXT, Action.RETRY, Action.TEMPFAIL_TX,
                                          Action.PERMFAIL_TX, Action.FAIL_CONN, Action.JUMP])
                     for _ in range(fdp.ConsumeIntInRange(0, 4))]
    session = Session(MACHINE, "client.fuzz.example")
    try:
        msg = Message("s@client.test", ["r@server.test"], b"Subject: x\r\n\r\nbody\r\n")
        cmsg = msg._to_c()
        now = 1000
        assert lib.smtps_session_submit(session._ptr, cmsg, 1, now) == lib.SMTPS_OK
        ffi.gc(cmsg, None)                      # the session owns it now
        assert lib.smtps_session_start(session._ptr, now) == lib.SMTPS_OK
        out = ffi.new("const char **")
        n = lib.smtps_session_output(session._ptr, out)
        wrote = bytes(ffi.buffer(out[0], n))
        want = line.encode("utf-8") if isinstance(line, str) else line
        bad = (not want or len(want) + 2 > lib.SMTPS_LINE_MAX
               or any(b < 0x20 or b == 0x7F for b in want))
        assert PROBE.sent_ok == (not bad), (line, PROBE.sent_ok)
        if PROBE.sent_ok:
            assert wrote.startswith(want + b"\r\n"), (wrote, want)
        else:                                   # nothing of it was queued
            assert not (want and wrote.startswith(want)), (wrote, want)
        lib.smtps_session_consume(session._ptr, n, now)
        while fdp.remaining_bytes() > 0:
            chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64))
            lib.smtps_session_feed(session._ptr, chunk, len(chunk), now)
            n = lib.smtps_session_output(session._ptr, out)
            lib.smtps_session_consume(session._ptr, n, now)
            if fdp.ConsumeBool():
                now += 400000
                lib.smtps_session_tick(session._ptr, now)
        lib.smtps_session_closed(session._ptr, b"fuzz over", now)
        got = 0
        while True:
            r = lib.smtps_session_next_result(session._ptr)
            if r == ffi.NULL:
                break
            got += 1
            assert r.tag == 1
            lib.smtps_result_free(r)
        assert got == 1, got
    finally:
        session.close()


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        check_message(fdp)
    else:
        check_session(fdp)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    assert smtpstate.__version__
    main()
