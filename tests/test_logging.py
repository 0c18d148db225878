"""Logging: a logger per component, the transcript at DEBUG (plaintext,
from C, for every driver), AUTH secrets redacted, server control
characters made harmless, one result record per failure with its stage and
bounce class."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from typing import Dict, List

import pytest
from handlers import RefusingHandler
from scripted import SPLITS, ScriptedSession
from test_auth import SECRET, USER, secret_forms

from smtpstate import Auth, Client, Engine, Message, aio, logs
from smtpstate._core import ffi, lib

SENDER = "sender@client.test"
BODY = b"Subject: logs\r\n\r\nline one\r\n.dot line\r\n"
TRANSCRIPT = "smtpstate.transcript"


def _lines(caplog, direction=None) -> List[str]:
    return [r.smtp_line for r in caplog.records
            if r.name == TRANSCRIPT and (direction is None or r.smtp_direction == direction)]


# -- printable ---------------------------------------------------------------------


@pytest.mark.parametrize("raw, shown", [
    ("plain text", "plain text"),
    ("tab\tkept", "tab\tkept"),
    ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
    ("fake\r\nS: 250 forged", "fake\\x0d\\x0aS: 250 forged"),
    ("nul\x00del\x7f c1\x85", "nul\\x00del\\x7f c1\\x85"),
    ("bidi \u202eevil\u202c line\u2028sep", "bidi \\u202eevil\\u202c line\\u2028sep"),
    (b"bytes \xff\xfe ok \xc3\xa9", "bytes \\xff\\xfe ok \u00e9"),
])
def test_printable(raw, shown):
    assert logs.printable(raw) == shown


def test_loggers_are_per_component():
    import importlib
    for module in ("aio", "client", "demo", "engine", "session", "logs"):
        importlib.import_module("smtpstate." + module)
    names = set(logging.Logger.manager.loggerDict)
    assert {"smtpstate.client", "smtpstate.aio", "smtpstate.state", "smtpstate.result",
            "smtpstate.transcript", "smtpstate.demo"} <= names


# -- the C trace, scripted ---------------------------------------------------------------


def _traced(split: str):
    s = ScriptedSession(split=split)
    seen: List[str] = []
    tracer = logs.Tracer(sink=lambda d, line: seen.append(f"{d}: {line}"))
    assert lib.smtps_session_set_trace(s.ptr, lib.smtps_py_trace, tracer.handle) == lib.SMTPS_OK
    return s, seen, tracer


@pytest.mark.parametrize("split", SPLITS)
def test_trace_is_the_dialogue(split):
    s, seen, _tracer = _traced(split)
    s.submit(Message(SENDER, ["a@x.test"], BODY))
    s.start()
    s.feed(b"220 server.example ESMTP\r\n")
    s.sent()
    s.feed(b"250-server.example\r\n250 PIPELINING\r\n")
    s.sent()
    s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
    s.sent()
    s.feed(b"250 queued\r\n")
    s.quit()
    s.sent()
    s.feed(b"221 bye\r\n")
    s.finish()
    assert seen == [
        "S: 220 server.example ESMTP",
        "C: EHLO client.example",
        "S: 250-server.example",
        "S: 250 PIPELINING",
        "C: MAIL FROM:<sender@client.test>",
        "C: RCPT TO:<a@x.test>",
        "C: DATA",
        "S: 250 ok",
        "S: 250 ok",
        "S: 354 go",
        "C: Subject: logs",
        "C: ",
        "C: line one",
        "C: .dot line",                    # as given: the wire has "..dot line"
        "C: .",
        "S: 250 queued",
        "C: QUIT",
        "S: 221 bye",
    ]


@pytest.mark.parametrize("mech, offer", [
    (lib.SMTPS_AUTH_PLAIN, "AUTH PLAIN"),
    (lib.SMTPS_AUTH_LOGIN, "AUTH LOGIN"),
    (lib.SMTPS_AUTH_CRAM_MD5, "AUTH CRAM-MD5"),
    (lib.SMTPS_AUTH_XOAUTH2, "AUTH XOAUTH2"),
])
def test_trace_never_shows_credentials(mech, offer):
    s, seen, _tracer = _traced("whole")
    assert s.set_auth(USER, SECRET, mech, True) == lib.SMTPS_OK
    s.start()
    s.feed(b"220 server.example ESMTP\r\n")
    s.sent()
    s.feed(b"250-server.example\r\n250 " + offer.encode() + b"\r\n")
    wire = s.sent()
    for challenge in (b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n"):
        if s.status != "ACTIVE" or mech in (lib.SMTPS_AUTH_PLAIN, lib.SMTPS_AUTH_XOAUTH2):
            break
        s.feed(challenge if mech == lib.SMTPS_AUTH_LOGIN else
               b"334 PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+\r\n")
        wire += s.sent()
        if mech == lib.SMTPS_AUTH_CRAM_MD5:
            break
    s.feed(b"235 2.7.0 ok\r\n")
    s.finish()
    text = "\n".join(seen)
    assert any(form in wire for form in secret_forms()) or mech == lib.SMTPS_AUTH_CRAM_MD5
    for form in secret_forms():
        assert form.decode() not in text
    assert USER not in text and SECRET not in text
    auth = [line for line in seen if line.startswith("C: AUTH")]
    assert auth and auth[0].startswith(f"C: {offer}")
    if mech in (lib.SMTPS_AUTH_PLAIN, lib.SMTPS_AUTH_XOAUTH2):
        assert auth[0] == f"C: {offer} [credentials redacted]"
    else:
        assert "C: [credentials redacted]" in seen


def test_trace_can_be_removed():
    s, seen, _tracer = _traced("whole")
    assert lib.smtps_session_set_trace(s.ptr, ffi.NULL, ffi.NULL) == lib.SMTPS_OK
    s.start()
    s.feed(b"220 hi\r\n")
    s.sent()
    s.closed()
    s.finish()
    assert seen == []


# -- real connections ----------------------------------------------------------------------


class _Scripted(threading.Thread):
    """A raw SMTP server on loopback that says what the test scripts:
    ``replies[verb]`` (bytes) for each command, the greeting first."""

    def __init__(self, greeting: bytes, replies: Dict[str, bytes]) -> None:
        super().__init__(daemon=True)
        self.greeting, self.replies = greeting, replies
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]

    def run(self) -> None:
        conn, _ = self.sock.accept()
        with conn, conn.makefile("rb") as f:
            conn.sendall(self.greeting)
            data = False
            for line in f:
                if data:
                    if line == b".\r\n":
                        data = False
                        conn.sendall(self.replies.get(".", b"250 ok\r\n"))
                    continue
                verb = line.split(b" ", 1)[0].split(b":", 1)[0].strip().upper().decode()
                conn.sendall(self.replies.get(verb, b"250 ok\r\n"))
                if verb == "DATA":
                    data = True
                if verb == "QUIT":
                    break
        self.sock.close()


def test_control_characters_from_servers_are_harmless(caplog):
    evil = "\x1b]0;pwned\x07\x1b[2J"
    server = _Scripted(f"220 hi {evil}\r\n".encode(),
                       {"EHLO": b"250-hi\r\n250 X\rS: forged\x1b[31m\r\n",   # (a NUL is refused)
                        "RCPT": "550 5.1.1 no\u202euser\x1b[0m\r\n".encode()})
    server.start()
    with caplog.at_level(logging.DEBUG, logger="smtpstate"):
        with Client("127.0.0.1", server.port, timeout=10) as client:
            r = client.send(Message(SENDER, ["a@x.test"], BODY))
    server.join(10)
    assert r.status == "permfail" and r.stage_code == 4, r
    for record in caplog.records:
        if record.name.startswith("smtpstate"):
            text = record.getMessage()
            assert "\x1b" not in text and "\x00" not in text and "\u202e" not in text
            assert "\r" not in text and "\x07" not in text
    lines = _lines(caplog, "S")
    assert "220 hi \\x1b]0;pwned\\x07\\x1b[2J" in lines
    assert "550 5.1.1 no\\u202euser\\x1b[0m" in lines
    assert "250 X\\x0dS: forged\\x1b[31m" in lines
    # The failure's own record: stage, reply and class, made harmless too.
    [fail] = [x for x in caplog.records if x.name == "smtpstate.result"]
    assert fail.levelno == logging.INFO
    assert "stage 4 (sending RCPT TO)" in fail.getMessage()
    assert "invalid recipient (10)" in fail.getMessage()


def test_no_transcript_unless_debug(caplog, aiosmtpd_server):
    with caplog.at_level(logging.INFO, logger="smtpstate"):
        with Client(aiosmtpd_server.host, aiosmtpd_server.port, timeout=10) as client:
            assert client.send(Message(SENDER, ["a@x.test"], BODY)).ok
    assert _lines(caplog) == []


def test_client_engine_aio_transcripts(caplog, aiosmtpd_factory):
    server = aiosmtpd_factory(RefusingHandler())
    msg = Message(SENDER, ["ok@x.test", "nobody@x.test"], BODY)
    with caplog.at_level(logging.DEBUG, logger="smtpstate"):
        with Client(server.host, server.port, timeout=10) as client:
            client.send(msg)
        client_lines = _lines(caplog)
        caplog.clear()
        with Engine() as engine:
            engine.submit(msg, server.host, server.port, timeout=10)
            list(engine.run(timeout=30))
        engine_lines = _lines(caplog)
        caplog.clear()
        asyncio.run(aio.send(msg, server.host, server.port, timeout=10))
        aio_lines = _lines(caplog)
        records = [r for r in caplog.records if r.name == TRANSCRIPT]
    for lines in (client_lines, engine_lines, aio_lines):
        assert "RCPT TO:<nobody@x.test>" in lines
        assert any(x.startswith("550 5.1.1") for x in lines)
        assert ".dot line" in lines and "." in lines
    assert all(r.smtp_peer == f"127.0.0.1:{server.port}" for r in records)
    assert any(r.getMessage().startswith("127.0.0.1:%d C: MAIL FROM:<%s>" % (server.port, SENDER))
               for r in records)


def test_tls_transcript_is_plaintext(caplog, aiosmtpd_factory, tls_ca, tmp_path):
    from aiosmtpd.smtp import AuthResult

    cert = tls_ca.issue_cert("localhost")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    server = aiosmtpd_factory(tls_context=ctx, require_starttls=True,
                              authenticator=lambda *a: AuthResult(success=True),
                              auth_require_tls=True)
    ca_file = str(tmp_path / "ca.pem")
    tls_ca.cert_pem.write_to_path(ca_file)
    with caplog.at_level(logging.DEBUG, logger="smtpstate"):
        with Client(server.host, server.port, timeout=10, tls="starttls", ca_file=ca_file,
                    server_hostname="localhost", auth=Auth(USER, SECRET)) as client:
            r = client.send(Message(SENDER, ["a@x.test"], BODY))
    assert r.ok, r
    lines = _lines(caplog)
    assert "STARTTLS" in lines
    assert any(x.startswith("TLS is up: TLSv1.") for x in _lines(caplog, "*"))
    assert any(x.startswith("MAIL FROM:<%s>" % SENDER) for x in lines)  # after TLS, readable
    assert "AUTH PLAIN [credentials redacted]" in lines
    text = caplog.text
    for form in secret_forms():
        assert form.decode() not in text
