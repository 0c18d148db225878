"""A scripted SMTP server in memory: drive the C session directly through
``smtpstate._core`` with replies the test writes, no sockets.

This module owns :class:`ScriptedSession`, the h11 ``ConnectionPair`` of
this project: it wraps ``smtps_session_*`` with a clock the test moves by
hand (``now``), feeds server bytes either whole or one byte at a time
(``split``), hands back exactly the bytes the client wrote, and turns C
results into plain dicts. It is not a fixture; ``test_protocol.py`` makes
one per test and calls :meth:`ScriptedSession.finish` at teardown, which
asserts the session's central promise: every submitted message ends in
exactly one result.

Rule: a method here never hides what the session did. ``feed`` returns the
C return code of the last call, ``sent`` returns every byte written since
the last ``sent``, results are collected only on request (``results()``)
or at ``finish``.

TLS in memory: :class:`TLSPeer` is the server's end of a TLS connection
(Python's ``ssl.SSLObject`` over ``ssl.MemoryBIO``), so that STARTTLS and
implicit TLS can be scripted too: the test shuttles the session's
ciphertext to the peer (``receive`` returns what it decrypted) and the
peer's replies back (``send`` encrypts them). ``tls_config`` and
``ScriptedSession.set_tls``/``set_auth`` set the session up.
"""

from __future__ import annotations

import itertools
import ssl
from typing import Any, Dict, List, Optional, Sequence, Union

from smtpstate import Message
from smtpstate._core import ffi, lib

__all__ = ["ScriptedSession", "SPLITS", "STATUS", "SESSION_STATUS", "TLSPeer", "crlf_lines",
           "message", "tls_config"]

#: The two ways a scenario feeds server bytes; parametrize over both.
SPLITS = ("whole", "bytewise")

#: Message and recipient statuses, C value -> name: final ones only, so
#: that an intermediate status in a result (a bug) fails with a KeyError.
STATUS = {
    lib.SMTPS_STATUS_DELIVERED: "delivered",
    lib.SMTPS_STATUS_PARTIAL: "partial",
    lib.SMTPS_STATUS_TEMPFAIL: "tempfail",
    lib.SMTPS_STATUS_PERMFAIL: "permfail",
    lib.SMTPS_STATUS_UNKNOWN: "unknown",
    lib.SMTPS_STATUS_NOT_SENT: "not_sent",
}

#: Session statuses, C value -> name.
SESSION_STATUS = {
    lib.SMTPS_SESS_NEW: "NEW",
    lib.SMTPS_SESS_ACTIVE: "ACTIVE",
    lib.SMTPS_SESS_IDLE: "IDLE",
    lib.SMTPS_SESS_CLOSING: "CLOSING",
    lib.SMTPS_SESS_CLOSED: "CLOSED",
}


def message(sender: str = "sender@client.example",
            recipients: Sequence[Any] = ("rcpt@server.example",),
            data: Union[bytes, str] = b"Subject: hi\r\n\r\nhello\r\n",
            **kwargs: Any) -> Message:
    """A :class:`smtpstate.Message` with defaults for what a test ignores."""
    return Message(sender, list(recipients), data, **kwargs)


def _text(p: Any) -> str:
    return ffi.string(p).decode("utf-8", "replace") if p != ffi.NULL else ""


def _reply(c: Any) -> Dict[str, Any]:
    return {"code": int(c.code), "enhanced": ffi.string(c.enhanced).decode("ascii"),
            "text": _text(c.text)}


class ScriptedSession:
    """One C session and the server side of its conversation, in memory.

    Args:
        machine: a :class:`smtpstate.Machine`; None makes a fresh built-in
            machine of its own, so that states registered elsewhere in the
            test run cannot leak in.
        helo: the EHLO/HELO name.
        split: ``"whole"`` (each :meth:`feed` is one call) or
            ``"bytewise"`` (one call per byte).
        now: the starting clock, milliseconds.
    """

    def __init__(self, machine: Any = None, helo: str = "client.example",
                 split: str = "whole", now: int = 1_000_000) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        if machine is None:
            self._machine = ffi.gc(lib.smtps_machine_new(), lib.smtps_machine_free)
        else:
            self._machine = machine._ptr
        ptr = lib.smtps_session_new(self._machine, helo.encode("ascii"), ffi.NULL)
        assert ptr != ffi.NULL, "smtps_session_new failed"
        self.ptr = ffi.gc(ptr, lib.smtps_session_free)
        self.split = split
        self.now = now
        self.tags: List[int] = []
        self._collected: List[Dict[str, Any]] = []
        self._tagger = itertools.count(1)
        self.wire: List[Any] = []              # ("C" | "S", bytes), in order

    # -- the clock -------------------------------------------------------

    def advance(self, ms: int) -> int:
        """Move the clock forward by ms; return the new time."""
        self.now += ms
        return self.now

    def tick(self, at: Optional[int] = None) -> int:
        """smtps_session_tick at ``at`` (default: now), moving the clock there."""
        if at is not None:
            self.now = at
        return int(lib.smtps_session_tick(self.ptr, self.now))

    @property
    def deadline(self) -> int:
        return int(lib.smtps_session_deadline(self.ptr))

    def set_timeout(self, state_id: int, ms: int) -> None:
        assert lib.smtps_session_set_timeout(self.ptr, state_id, ms) == lib.SMTPS_OK

    # -- the connection --------------------------------------------------

    def start(self) -> None:
        """The TCP connection is up."""
        assert lib.smtps_session_start(self.ptr, self.now) == lib.SMTPS_OK

    def feed(self, data: bytes, split: Optional[str] = None) -> int:
        """Feed server bytes, whole or one byte at a time (``self.split``
        unless ``split`` is given). Returns the last call's C code."""
        mode = split or self.split
        self.wire.append(("S", data))
        if mode == "whole" or len(data) <= 1:
            return int(lib.smtps_session_feed(self.ptr, data, len(data), self.now))
        rc = lib.SMTPS_OK
        for i in range(len(data)):
            rc = lib.smtps_session_feed(self.ptr, data[i:i + 1], 1, self.now)
        return int(rc)

    def pending_output(self) -> bytes:
        """What the client has queued, without taking it."""
        out = ffi.new("const char **")
        n = lib.smtps_session_output(self.ptr, out)
        return bytes(ffi.buffer(out[0], n)) if n else b""

    def consume(self, n: int) -> bytes:
        """Take (send) the first n queued bytes; return them."""
        data = self.pending_output()[:n]
        lib.smtps_session_consume(self.ptr, len(data), self.now)
        if data:
            self.wire.append(("C", data))
        return data

    def sent(self) -> bytes:
        """Take everything the client has written so far (as a driver that
        writes every byte at once would), including body output produced
        while taking it; return those bytes."""
        taken = []
        while True:
            data = self.pending_output()
            if not data:
                break
            lib.smtps_session_consume(self.ptr, len(data), self.now)
            taken.append(data)
        out = b"".join(taken)
        if out:
            self.wire.append(("C", out))
        return out

    def closed(self, why: str = "the server closed the connection") -> None:
        """The connection is gone (EOF or an error)."""
        lib.smtps_session_closed(self.ptr, why.encode(), self.now)

    @property
    def status(self) -> str:
        return SESSION_STATUS[lib.smtps_session_status(self.ptr)]

    @property
    def reason(self) -> str:
        return _text(lib.smtps_session_reason(self.ptr))

    def pending(self) -> int:
        return int(lib.smtps_session_pending(self.ptr))

    # -- messages and results --------------------------------------------

    def submit(self, msg: Optional[Message] = None, **kwargs: Any) -> int:
        """Submit a message (or ``message(**kwargs)``); return its tag.
        Asserts SMTPS_OK; use :meth:`try_submit` to see the code."""
        tag, rc = self.try_submit(msg, **kwargs)
        assert rc == lib.SMTPS_OK, f"submit: {rc}"
        return tag

    def try_submit(self, msg: Optional[Message] = None, **kwargs: Any) -> Any:
        """Submit; return (tag, C code). The tag counts only on success."""
        if msg is None:
            msg = message(**kwargs)
        cmsg = msg._to_c()
        tag = next(self._tagger)
        rc = int(lib.smtps_session_submit(self.ptr, cmsg, tag, self.now))
        if rc == lib.SMTPS_OK:
            ffi.gc(cmsg, None)                 # the session owns it now
            self.tags.append(tag)
        return tag, rc

    def quit(self) -> None:
        assert lib.smtps_session_quit(self.ptr, self.now) == lib.SMTPS_OK

    # -- the protocol, TLS and AUTH ----------------------------------------

    def set_protocol(self, protocol: str) -> int:
        """smtps_session_set_protocol; protocol is "smtp" or "lmtp" (any
        other name is handed to C as -1). Returns the C code."""
        value = {"smtp": lib.SMTPS_PROTO_SMTP, "lmtp": lib.SMTPS_PROTO_LMTP}.get(protocol, -1)
        return int(lib.smtps_session_set_protocol(self.ptr, value))

    def set_tls(self, mode: str, config: Any, servername: Optional[str] = "localhost") -> int:
        """smtps_session_set_tls; mode is "none", "opportunistic", "starttls"
        or "implicit". Returns the C code."""
        self._tls_keep = config
        name = servername.encode() if servername is not None else ffi.NULL
        return int(lib.smtps_session_set_tls(self.ptr, TLS_MODES[mode], config, name))

    def set_auth(self, user: str, secret: str, mechs: int = 0,
                 allow_plaintext: bool = False) -> int:
        """smtps_session_set_auth; returns the C code."""
        return int(lib.smtps_session_set_auth(self.ptr, user.encode(), secret.encode(),
                                              mechs, 1 if allow_plaintext else 0))

    @property
    def tls_active(self) -> bool:
        return bool(lib.smtps_session_tls_active(self.ptr))

    @property
    def tls_version(self) -> str:
        return ffi.string(lib.smtps_session_tls_version(self.ptr)).decode()

    def handshake(self, peer: "TLSPeer", rounds: int = 20) -> bytes:
        """Shuttle ciphertext between the session and peer until neither
        has anything to say; return the plaintext the peer decrypted (the
        EHLO that waited for TLS, say)."""
        got = bytearray()
        for _ in range(rounds):
            out = self.sent()
            if out:
                got += peer.receive(out)
            back = peer.pending()
            if back:
                self.feed(back)
            if not out and not back:
                break
        return bytes(got)

    def results(self) -> List[Dict[str, Any]]:
        """Collect the results finished since the last call, as dicts:
        tag, status, code, enhanced, text, stage, stage_name, state,
        reason, rcpts (a list of (status, code) pairs) and rcpt_texts
        (each recipient's reply text)."""
        new = []
        while True:
            r = lib.smtps_session_next_result(self.ptr)
            if r == ffi.NULL:
                break
            try:
                reply = _reply(r.reply)
                new.append({
                    "tag": int(r.tag),
                    "status": STATUS[r.status],
                    "code": reply["code"],
                    "enhanced": reply["enhanced"],
                    "text": reply["text"],
                    "stage": int(r.stage),
                    "stage_name": ffi.string(r.stage_name).decode(),
                    "state": self.state_name(int(r.state)),
                    "reason": _text(r.reason),
                    "rcpts": [(STATUS[r.rcpt[i].status], int(r.rcpt[i].reply.code))
                              for i in range(r.nrcpt)],
                    "rcpt_texts": [_text(r.rcpt[i].reply.text) for i in range(r.nrcpt)],
                })
            finally:
                lib.smtps_result_free(r)
        self._collected.extend(new)
        return new

    def result(self) -> Dict[str, Any]:
        """The one result that must be ready now."""
        got = self.results()
        assert len(got) == 1, f"expected one result, got {got}"
        return got[0]

    def state_name(self, state_id: int) -> Optional[str]:
        if state_id < 0:
            return None
        st = lib.smtps_machine_get(self._machine, state_id)
        return ffi.string(st.name).decode() if st != ffi.NULL else None

    def transcript(self) -> str:
        """The conversation so far, one "C: "/"S: " line per chunk."""
        return "\n".join(f"{who}: {data!r}" for who, data in self.wire)

    # -- the end ---------------------------------------------------------

    def finish(self) -> List[Dict[str, Any]]:
        """Close the connection and check that nothing was lost: no message
        pending, exactly one result per submitted tag. Returns every result
        collected over the session's life."""
        self.closed("test teardown")
        self.results()
        assert self.status == "CLOSED"
        assert self.pending() == 0
        tags = [r["tag"] for r in self._collected]
        assert sorted(tags) == sorted(self.tags), (
            f"results {tags} for submitted messages {self.tags}\n{self.transcript()}")
        assert lib.smtps_session_next_result(self.ptr) == ffi.NULL
        return list(self._collected)


TLS_MODES = {"none": lib.SMTPS_TLS_NONE, "opportunistic": lib.SMTPS_TLS_OPPORTUNISTIC,
             "starttls": lib.SMTPS_TLS_STARTTLS, "implicit": lib.SMTPS_TLS_IMPLICIT}


def tls_config(ca_file: Optional[str] = None, insecure: bool = False) -> Any:
    """A C TLS policy (``struct smtps_tls_config``), freed when collected."""
    raw = lib.smtps_tls_config_new(ca_file.encode() if ca_file else ffi.NULL,
                                   1 if insecure else 0)
    assert raw != ffi.NULL, f"smtps_tls_config_new({ca_file!r}) failed"
    return ffi.gc(raw, lib.smtps_tls_config_free)


class TLSPeer:
    """The server's end of a TLS connection, in memory.

    Args:
        context: a server-side ``ssl.SSLContext`` with its certificate.

    ``receive(ciphertext)`` takes what the client wrote and returns the
    plaintext it carried (driving the handshake first); ``send(plaintext)``
    encrypts a reply and returns the ciphertext for the client;
    ``pending()`` returns ciphertext the peer produced on its own
    (handshake messages, session tickets). ``plain`` keeps everything
    decrypted so far. TLS errors (a client alert) raise ``ssl.SSLError``.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.done = False
        self.plain = bytearray()

    def receive(self, ciphertext: bytes) -> bytes:
        self.incoming.write(ciphertext)
        if not self.done:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            self.done = True
        out = bytearray()
        while True:
            try:
                chunk = self.obj.read(1 << 16)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                break
            if not chunk:
                break
            out += chunk
        self.plain += out
        return bytes(out)

    def send(self, plaintext: bytes) -> bytes:
        self.obj.write(plaintext)
        return self.pending()

    def pending(self) -> bytes:
        return self.outgoing.read()


def crlf_lines(*lines: Union[str, bytes]) -> bytes:
    """Join command lines, each ended by CRLF (curl test-data style)."""
    return b"".join((ln.encode() if isinstance(ln, str) else ln) + b"\r\n"
                    for ln in lines)
