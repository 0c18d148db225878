"""TLS inside the session (RFC 3207 STARTTLS, RFC 8314 implicit TLS).

Two halves:

* scripted: the C session against :class:`scripted.TLSPeer`, a TLS server
  end in memory (Python's ``ssl`` over ``MemoryBIO``), with exact bytes --
  the plaintext inside TLS included -- and ciphertext fed whole or one
  byte at a time;
* real servers: aiosmtpd (STARTTLS and implicit TLS), Postfix (STARTTLS),
  and a tiny scripted TCP server for what real servers never do (refuse
  STARTTLS while offering it, inject a reply after its 220).

Every failure case asserts the promise of required TLS: nothing but EHLO,
STARTTLS and QUIT is ever sent in clear -- no MAIL, RCPT, AUTH or body --
and each message gets a ``tempfail`` whose reason says why.
"""

from __future__ import annotations

import socket
import ssl
import threading
from typing import Dict, Optional

import pytest

import smtpstate
from smtpstate import Message
from smtpstate._core import ffi, lib
from smtpstate.errors import InvalidOptionError

from helpers import RecordingHandler
from scripted import SPLITS, TLSPeer, tls_config

T0 = 1_000_000
BANNER = b"220 server.example ESMTP\r\n"
EHLO = b"EHLO client.example\r\n"
MAIL = b"MAIL FROM:<sender@client.example>\r\n"
RCPT = b"RCPT TO:<rcpt@server.example>\r\n"
BODY = b"Subject: hi\r\n\r\nhello\r\n"
SENDER = "sender@example.test"
RCPT_ADDR = "rcpt@example.test"
CLEAR_FORBIDDEN = (b"MAIL", b"RCPT", b"AUTH", b"DATA", b"BDAT", b"Subject")


def ehlo(*keywords: str) -> bytes:
    out = [b"250-server.example\r\n" if keywords else b"250 server.example\r\n"]
    for i, kw in enumerate(keywords):
        out.append(b"250" + (b" " if i == len(keywords) - 1 else b"-") + kw.encode() + b"\r\n")
    return b"".join(out)


# ---------------------------------------------------------------------------
# Scripted sessions (certificates: tls_ca_file, tls_server_context in conftest)
# ---------------------------------------------------------------------------


def to_starttls(s, cfg, *, mode="starttls", offer=("STARTTLS",), servername="localhost"):
    """Banner and EHLO with ``offer``; returns what the client sent next."""
    assert s.set_tls(mode, cfg, servername) == lib.SMTPS_OK
    s.start()
    s.feed(BANNER)
    assert s.sent() == EHLO
    s.feed(ehlo(*offer))
    return s.sent()


# ---------------------------------------------------------------------------
# Scripted: the session and a TLS peer in memory
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_starttls_exact_bytes_and_fresh_capabilities(make, split, tls_ca_file, tls_server_context):
    s = make(split)
    cfg = tls_config(tls_ca_file)
    # In clear the server offers PIPELINING; after TLS it does not: the
    # second EHLO's answer is all that counts (RFC 3207 4.2).
    assert to_starttls(s, cfg, offer=("PIPELINING", "STARTTLS")) == b"STARTTLS\r\n"
    s.feed(b"220 2.0.0 go ahead\r\n")
    assert s.status == "ACTIVE" and not s.tls_active
    peer = TLSPeer(tls_server_context)
    hello = s.pending_output()
    assert hello[:1] == b"\x16", "a TLS handshake record, not clear text"
    assert s.handshake(peer) == EHLO                # EHLO again, inside TLS
    assert s.tls_active and s.tls_version in ("TLSv1.2", "TLSv1.3")
    s.feed(peer.send(ehlo("SIZE 1000000")))
    assert s.status == "IDLE"
    s.submit()
    assert peer.receive(s.sent()) == b"MAIL FROM:<sender@client.example> SIZE=22\r\n"  # no PIPELINING
    s.feed(peer.send(b"250 ok\r\n"))
    assert peer.receive(s.sent()) == RCPT
    s.feed(peer.send(b"250 ok\r\n"))
    assert peer.receive(s.sent()) == b"DATA\r\n"
    s.feed(peer.send(b"354 go\r\n"))
    assert peer.receive(s.sent()) == BODY + b".\r\n"
    s.feed(peer.send(b"250 2.0.0 queued\r\n"))
    r = s.result()
    assert r["status"] == "delivered" and r["code"] == 250
    s.quit()
    assert peer.receive(s.sent()) == b"QUIT\r\n"
    s.feed(peer.send(b"221 bye\r\n"))
    assert s.status == "CLOSING"
    # Everything the server ever decrypted, in order.
    assert bytes(peer.plain) == (EHLO + b"MAIL FROM:<sender@client.example> SIZE=22\r\n" + RCPT
                                 + b"DATA\r\n" + BODY + b".\r\n" + b"QUIT\r\n")


@pytest.mark.parametrize("split", SPLITS)
def test_implicit_tls_handshake_before_banner(make, split, tls_ca_file, tls_server_context):
    s = make(split)
    assert s.set_tls("implicit", tls_config(tls_ca_file)) == lib.SMTPS_OK
    s.start()
    peer = TLSPeer(tls_server_context)
    assert s.pending_output()[:1] == b"\x16"       # ClientHello, before any banner
    assert s.handshake(peer) == b""                # the client waits for the banner
    assert s.tls_active
    s.feed(peer.send(BANNER))
    assert peer.receive(s.sent()) == EHLO
    s.feed(peer.send(ehlo("PIPELINING")))
    assert s.status == "IDLE"
    s.submit()
    assert peer.receive(s.sent()) == MAIL + RCPT + b"DATA\r\n"
    s.feed(peer.send(b"250 ok\r\n250 ok\r\n354 go\r\n"))
    assert peer.receive(s.sent()) == BODY + b".\r\n"
    s.feed(peer.send(b"250 ok\r\n"))
    assert s.result()["status"] == "delivered"


def test_implicit_tls_after_a_clear_proxy_line(tls_ca_file, tls_server_context):
    """A state placed before BANNER (a PROXY header) still speaks in clear,
    before the implicit handshake."""
    from smtpstate import Action, Machine, State
    from smtpstate.session import Session

    proxy = b"PROXY TCP4 192.0.2.1 192.0.2.2 1234 25"

    class Proxy(State):
        name = "proxy-v1"

        def setup(self, session):
            session.send(proxy)
            return 0

        def callback(self, session, reply):
            return Action.NEXT

    machine = Machine()
    machine.register(Proxy(), after=-1)
    session = Session(machine, "client.example")    # Python states need the Python session
    p, pp = session._ptr, ffi.new("const char **")

    def take():
        n = lib.smtps_session_output(p, pp)
        data = bytes(ffi.buffer(pp[0], n)) if n else b""
        lib.smtps_session_consume(p, n, T0)
        return data

    cfg = tls_config(tls_ca_file)
    assert lib.smtps_session_set_tls(p, lib.SMTPS_TLS_IMPLICIT, cfg, b"localhost") == lib.SMTPS_OK
    assert lib.smtps_session_start(p, T0) == lib.SMTPS_OK
    out = take()
    assert out.startswith(proxy + b"\r\n\x16"), out[:60]   # clear header, then ClientHello
    peer = TLSPeer(tls_server_context)
    plain = peer.receive(out[len(proxy) + 2:])
    for _ in range(10):
        back = peer.pending()
        if back:
            assert lib.smtps_session_feed(p, back, len(back), T0) == lib.SMTPS_OK
        out = take()
        plain += peer.receive(out) if out else b""
        if not back and not out:
            break
    assert lib.smtps_session_tls_active(p)
    reply = peer.send(BANNER)
    assert lib.smtps_session_feed(p, reply, len(reply), T0) == lib.SMTPS_OK
    assert peer.receive(take()) == EHLO
    session.close()


@pytest.mark.parametrize("split", SPLITS)
def test_injected_reply_after_starttls_220(make, split, tls_ca_file):
    """CVE-2011-0411: clear text after the 220 is never taken as a reply."""
    s = make(split)
    s.submit()
    assert to_starttls(s, tls_config(tls_ca_file)) == b"STARTTLS\r\n"
    s.feed(b"220 go\r\n250 injected\r\n")
    out = s.sent()
    assert s.status == "CLOSING"
    assert not any(w in out for w in CLEAR_FORBIDDEN + (b"EHLO", b"QUIT")), out
    r = s.result()
    assert r["status"] == "tempfail"
    if split == "whole":
        # In one read: recognised for what it is.
        assert "clear text after its STARTTLS reply" in r["reason"], r
        assert r["stage_name"] == "after STARTTLS" and r["state"] == "STARTTLS"
    else:
        # Byte by byte the extra bytes arrive after the handshake began,
        # where they are a broken TLS record.
        assert "TLS handshake failed" in r["reason"], r
        assert r["stage_name"] == "TLS handshake"


@pytest.mark.parametrize("split", SPLITS)
def test_required_tls_not_offered_sends_only_quit(make, split, tls_ca_file):
    s = make(split)
    s.submit()
    s.submit()
    assert to_starttls(s, tls_config(tls_ca_file), offer=("PIPELINING",)) == b"QUIT\r\n"
    got = s.results()
    assert [r["status"] for r in got] == ["tempfail", "tempfail"]
    for r in got:
        assert "TLS is required, but the server does not offer STARTTLS" in r["reason"]
        assert r["stage_name"] == "sending STARTTLS" and r["state"] == "STARTTLS"


@pytest.mark.parametrize("code", [b"454 4.7.0 TLS not available", b"554 5.7.3 no"])
def test_required_tls_refused_sends_only_quit(make, code, tls_ca_file):
    s = make()
    s.submit()
    assert to_starttls(s, tls_config(tls_ca_file)) == b"STARTTLS\r\n"
    s.feed(code + b"\r\n")
    assert s.sent() == b"QUIT\r\n"
    r = s.result()
    assert r["status"] == "tempfail"               # even after a 5xx: not about the mail
    assert "TLS is required, but the server refused STARTTLS: " + code[:3].decode() in r["reason"]


def test_opportunistic_goes_on_in_clear(make, tls_ca_file):
    s = make()
    assert to_starttls(s, tls_config(tls_ca_file), mode="opportunistic", offer=()) == b""
    assert s.status == "IDLE" and not s.tls_active
    s.submit()
    assert s.sent() == MAIL
    s2 = make()
    assert to_starttls(s2, tls_config(tls_ca_file), mode="opportunistic") == b"STARTTLS\r\n"
    s2.feed(b"454 4.7.0 not now\r\n")
    assert s2.status == "IDLE"                     # refused: on in clear
    s2.submit()
    assert s2.sent() == MAIL


@pytest.mark.parametrize("servername, why", [
    ("wrong.example", "hostname mismatch"),
    ("192.0.2.1", "ip address mismatch"),
])
def test_name_mismatch_fails_the_handshake(make, tls_ca_file, tls_server_context, servername, why):
    s = make()
    s.submit()
    assert to_starttls(s, tls_config(tls_ca_file), servername=servername) == b"STARTTLS\r\n"
    s.feed(b"220 go\r\n")
    peer = TLSPeer(tls_server_context)
    with pytest.raises(ssl.SSLError):
        s.handshake(peer)
    assert s.status == "CLOSING" and not s.tls_active
    r = s.result()
    assert r["status"] == "tempfail"
    assert r["reason"].startswith("not attempted: TLS handshake failed: certificate verify failed")
    assert why in r["reason"].lower(), r
    assert r["stage"] == lib.SMTPS_STAGE_TLS_HANDSHAKE and r["stage_name"] == "TLS handshake"
    assert EHLO not in bytes(peer.plain)


def test_untrusted_certificate_fails_the_handshake(make, tls_server_context, tmp_path):
    # A CA that did not issue the server's certificate.
    import trustme
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    s = make()
    s.submit()
    assert to_starttls(s, tls_config(str(other))) == b"STARTTLS\r\n"
    s.feed(b"220 go\r\n")
    with pytest.raises(ssl.SSLError):
        s.handshake(TLSPeer(tls_server_context))
    r = s.result()
    assert r["status"] == "tempfail" and "certificate verify failed" in r["reason"], r
    assert s.sent() == b""


def test_insecure_config_accepts_any_certificate(make, tls_server_context):
    s = make()
    assert to_starttls(s, tls_config(None, insecure=True), servername="wrong.example") \
        == b"STARTTLS\r\n"
    s.feed(b"220 go\r\n")
    assert s.handshake(TLSPeer(tls_server_context)) == EHLO
    assert s.tls_active


def test_handshake_timeout_and_lost_connection(make, tls_ca_file):
    s = make()
    s.submit()
    to_starttls(s, tls_config(tls_ca_file))
    s.feed(b"220 go\r\n")
    s.sent()                                        # the ClientHello; no answer
    s.tick(s.deadline)
    r = s.result()
    assert r["status"] == "tempfail" and "TLS handshake did not complete" in r["reason"]
    assert r["stage_name"] == "TLS handshake"
    s2 = make()
    s2.submit()
    to_starttls(s2, tls_config(tls_ca_file))
    s2.feed(b"220 go\r\n")
    s2.closed("reset by peer")
    r = s2.result()
    assert r["reason"] == "connection lost during the TLS handshake: reset by peer"
    assert r["stage_name"] == "TLS handshake"


def tls_session(make, tls_ca_file, tls_server_context, offer=("SIZE 100000000",)):
    s = make()
    to_starttls(s, tls_config(tls_ca_file))
    s.feed(b"220 go\r\n")
    peer = TLSPeer(tls_server_context)
    assert s.handshake(peer) == EHLO
    s.feed(peer.send(ehlo(*offer)))
    assert s.status == "IDLE"
    return s, peer


@pytest.mark.parametrize("taken", ["all", "all but one byte"])
def test_final_dot_counts_as_sent_only_once_its_ciphertext_is_taken(make, tls_ca_file,
                                                                    tls_server_context, taken):
    """RFC 1047 with TLS: "unknown" only when the ciphertext carrying the
    dot was taken by the driver, not when SSL_write took the plaintext."""
    s, peer = tls_session(make, tls_ca_file, tls_server_context, offer=())
    s.submit()
    peer.receive(s.sent())
    s.feed(peer.send(b"250 ok\r\n"))
    peer.receive(s.sent())
    s.feed(peer.send(b"250 ok\r\n"))
    peer.receive(s.sent())
    s.feed(peer.send(b"354 go\r\n"))
    out = s.pending_output()
    assert out and BODY not in out                  # ciphertext
    s.consume(len(out) - (1 if taken != "all" else 0))
    s.closed("eof")
    r = s.result()
    if taken == "all":
        assert r["status"] == "unknown", r
    else:
        assert r["status"] == "tempfail", r


def test_large_body_streams_through_tls(make, tls_ca_file, tls_server_context):
    body = b"".join(b"line %06d .dot\r\n.%d\r\n" % (i, i) for i in range(40000))  # ~1 MB
    s, peer = tls_session(make, tls_ca_file, tls_server_context, offer=())
    s.submit(data=body)
    peer.receive(s.sent())
    s.feed(peer.send(b"250 ok\r\n"))
    peer.receive(s.sent())
    s.feed(peer.send(b"250 ok\r\n"))
    peer.receive(s.sent())
    s.feed(peer.send(b"354 go\r\n"))
    received = bytearray()
    rounds = 0
    while True:
        out = s.pending_output()
        if not out:
            break
        assert len(out) < 200_000                   # encryption waits for the driver
        received += peer.receive(s.consume(len(out)))
        rounds += 1
    assert rounds > 5
    assert bytes(received) == body.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    s.feed(peer.send(b"250 ok\r\n"))
    assert s.result()["status"] == "delivered"


def test_set_tls_argument_checks(make, tls_ca_file):
    s = make()
    cfg = tls_config(tls_ca_file)
    assert s.set_tls("starttls", cfg, None) == lib.SMTPS_EINVAL      # verify needs a name
    assert s.set_tls("starttls", cfg, "bad name") == lib.SMTPS_EINVAL
    assert s.set_tls("starttls", cfg, "x" * 254) == lib.SMTPS_EINVAL
    assert lib.smtps_session_set_tls(s.ptr, 7, cfg, b"localhost") == lib.SMTPS_EINVAL
    assert s.set_tls("starttls", tls_config(None, insecure=True), None) == lib.SMTPS_OK
    assert s.set_tls("none", cfg) == lib.SMTPS_OK
    s.start()
    assert s.set_tls("starttls", cfg) == lib.SMTPS_ESTATE
    assert lib.smtps_tls_config_new(b"/nonexistent/ca.pem", 0) == ffi.NULL
    assert s.tls_version == ""


# ---------------------------------------------------------------------------
# Real servers
# ---------------------------------------------------------------------------


def msg(i: int = 0) -> Message:
    return Message(SENDER, [RCPT_ADDR], b"Subject: tls %d\r\n\r\nover TLS\r\n.dot\r\n" % i)


def clear_bytes(server) -> bytes:
    """What reached the server in clear over its connections (aiosmtpd
    records after decryption too, so call this only when TLS never came up)."""
    return b"".join(bytes(c.received) for c in server.connections)


def assert_only_clear_handshake(data: bytes) -> None:
    for word in CLEAR_FORBIDDEN:
        assert word not in data, (word, data)


def test_aiosmtpd_required_starttls_delivers(aiosmtpd_factory, tls_server_context, tls_ca_file):
    server = aiosmtpd_factory(tls_context=tls_server_context, require_starttls=True)
    with smtpstate.Client(server.host, server.port, timeout=20, tls="starttls",
                          ca_file=tls_ca_file, helo="client.example") as client:
        results = [client.send(msg(i)) for i in range(2)]
        assert client.tls_version in ("TLSv1.2", "TLSv1.3")
    assert [r.status for r in results] == ["delivered", "delivered"], results
    got = server.wait_for_messages(2)
    assert [m.data for m in got] == [msg(i).data for i in range(2)]
    assert all(m.extra["tls"] for m in got)
    received = clear_bytes(server)
    # One connection: EHLO and STARTTLS in clear, then everything again inside.
    assert received.startswith(b"EHLO client.example\r\nSTARTTLS\r\nEHLO client.example\r\n")
    assert len(server.connections) == 1


def test_aiosmtpd_implicit_tls(aiosmtpd_factory, tls_server_context, tls_ca_file):
    server = aiosmtpd_factory(ssl_context=tls_server_context)
    with smtpstate.Client(server.host, server.port, timeout=20, tls="implicit",
                          ca_file=tls_ca_file) as client:
        result = client.send(msg())
        # aiosmtpd sets session.ssl only after STARTTLS; the client knows.
        assert client.tls_version in ("TLSv1.2", "TLSv1.3")
    assert result.status == "delivered", result
    got = server.wait_for_messages(1)
    assert got[0].data == msg().data


def test_aiosmtpd_wrong_host_name_refuses_to_go_on(aiosmtpd_factory, tls_server_context, tls_ca_file):
    server = aiosmtpd_factory(tls_context=tls_server_context)
    client = smtpstate.Client(server.host, server.port, timeout=20, tls="starttls",
                              ca_file=tls_ca_file, server_hostname="mail.wrong.example")
    result = client.send(msg())
    client.close()
    assert result.status == "tempfail"
    assert "TLS handshake failed" in result.reason
    assert "hostname mismatch" in result.reason.lower()
    assert result.stage == "TLS handshake" and result.stage_code == 17
    assert result.state == "STARTTLS"
    assert server.messages == []
    assert_only_clear_handshake(clear_bytes(server))


def test_aiosmtpd_untrusted_certificate_refuses_to_go_on(aiosmtpd_factory, tls_server_context):
    # No tls_ca_file: the system store does not know the test CA.
    server = aiosmtpd_factory(tls_context=tls_server_context)
    client = smtpstate.Client(server.host, server.port, timeout=20, tls="starttls")
    result = client.send(msg())
    client.close()
    assert result.status == "tempfail"
    assert "certificate verify failed" in result.reason, result.reason
    assert server.messages == []
    assert_only_clear_handshake(clear_bytes(server))


def test_aiosmtpd_skip_verification_accepts_untrusted(aiosmtpd_factory, tls_server_context):
    server = aiosmtpd_factory(tls_context=tls_server_context)
    with smtpstate.Client(server.host, server.port, timeout=20, tls="starttls",
                          server_hostname="anything.example",
                          dangerously_skip_certificate_verification=True) as client:
        result = client.send(msg())
    assert result.status == "delivered", result
    assert server.wait_for_messages(1)[0].extra["tls"]


def test_aiosmtpd_starttls_stripped(aiosmtpd_factory, tls_ca_file):
    server = aiosmtpd_factory()                     # no tls_context: no STARTTLS offered
    client = smtpstate.Client(server.host, server.port, timeout=20, tls="starttls",
                              ca_file=tls_ca_file, helo="client.example")
    first, second = client.send(msg(1)), client.send(msg(2))
    client.close()
    for r in (first, second):
        assert r.status == "tempfail"
        assert "TLS is required, but the server does not offer STARTTLS" in r.reason
    assert server.messages == []
    received = clear_bytes(server)
    assert_only_clear_handshake(received)
    assert set(received.split(b"\r\n")) <= {b"EHLO client.example", b"QUIT", b""}


def test_aiosmtpd_opportunistic_without_starttls_delivers_in_clear(aiosmtpd_factory, tls_ca_file):
    server = aiosmtpd_factory()
    with smtpstate.Client(server.host, server.port, timeout=20, tls="opportunistic",
                          ca_file=tls_ca_file) as client:
        result = client.send(msg())
        assert client.tls_version is None
    assert result.status == "delivered"
    got = server.wait_for_messages(1)
    assert got[0].data == msg().data and not got[0].extra["tls"]


def test_aiosmtpd_opportunistic_with_starttls_uses_it(aiosmtpd_factory, tls_server_context, tls_ca_file):
    server = aiosmtpd_factory(tls_context=tls_server_context)
    with smtpstate.Client(server.host, server.port, timeout=20, tls="opportunistic",
                          ca_file=tls_ca_file) as client:
        assert client.send(msg()).status == "delivered"
    assert server.wait_for_messages(1)[0].extra["tls"]


def test_opportunistic_accepts_a_certificate_nobody_vouches_for(aiosmtpd_factory,
                                                                tls_server_context):
    """RFC 7435: opportunistic TLS encrypts without authenticating. A
    certificate from a CA the client does not know, for another name: the
    message goes, encrypted."""
    server = aiosmtpd_factory(tls_context=tls_server_context)
    with smtpstate.Client(server.host, server.port, timeout=20, tls="opportunistic",
                          server_hostname="mx.elsewhere.example") as client:
        result = client.send(msg())
        assert client.tls_version in ("TLSv1.2", "TLSv1.3")
    assert result.status == "delivered", result
    assert server.wait_for_messages(1)[0].extra["tls"]


def test_the_default_without_auth_is_opportunistic(aiosmtpd_factory, tls_server_context):
    server = aiosmtpd_factory(tls_context=tls_server_context)
    with smtpstate.Client(server.host, server.port, timeout=20) as client:
        assert client.send(msg()).status == "delivered"
    assert server.wait_for_messages(1)[0].extra["tls"]


def test_the_default_with_auth_is_verified_tls(aiosmtpd_factory):
    """Credentials go to the server named and no one else: without
    STARTTLS, nothing but QUIT."""
    server = aiosmtpd_factory()
    with smtpstate.Client(server.host, server.port, timeout=20,
                          auth=("user", "secret")) as client:
        result = client.send(msg())
    assert result.status == "tempfail"
    assert "TLS is required, but the server does not offer STARTTLS" in result.reason
    assert server.messages == []


def test_opportunistic_with_auth_is_refused():
    with pytest.raises(InvalidOptionError, match="does not go with auth"):
        smtpstate.Options(tls="opportunistic", auth=("user", "secret"))


def test_opportunistic_handshake_failure_goes_again_in_clear(aiosmtpd_factory,
                                                             broken_tls_context):
    """As Postfix's "may": STARTTLS offered, the handshake fails, and the
    Engine delivers on a second connection to the same address, in clear."""
    server = aiosmtpd_factory(tls_context=broken_tls_context)
    with smtpstate.Engine() as engine:
        first = engine.submit(msg(0), server.host, server.port, timeout=20)
        list(engine.run())
        assert first.result.status == "delivered", first.result
        assert len(server.connections) == 2    # the broken one, then clear
        # The address is known for it now: any new connection goes in clear.
        more = [engine.submit(msg(i), server.host, server.port, timeout=20)
                for i in (1, 2)]
    for t in more:
        assert t.result.status == "delivered", t.result
    got = server.wait_for_messages(3)
    assert [m.extra["tls"] for m in got] == [False, False, False]
    sent = [bytes(c.received) for c in server.connections]
    assert b"STARTTLS" in sent[0]
    assert all(b"STARTTLS" not in b for b in sent[1:]), sent


def test_opportunistic_client_reports_a_failed_handshake(aiosmtpd_factory,
                                                         broken_tls_context):
    """A Client has one connection: a failed handshake is a tempfail saying
    so (the Engine is what tries again in clear)."""
    server = aiosmtpd_factory(tls_context=broken_tls_context)
    with smtpstate.Client(server.host, server.port, timeout=20, tls="opportunistic") as client:
        result = client.send(msg())
    assert result.status == "tempfail" and result.stage == "TLS handshake", result
    assert server.messages == []


def test_verified_tls_does_not_go_again_in_clear(aiosmtpd_factory, broken_tls_context):
    server = aiosmtpd_factory(tls_context=broken_tls_context)
    with smtpstate.Engine() as engine:
        ticket = engine.submit(msg(), server.host, server.port, tls="verify", timeout=20)
    assert ticket.result.status == "tempfail" and ticket.result.stage == "TLS handshake"
    assert server.messages == []


def test_postfix_starttls_delivers_byte_for_byte(postfix_factory, tls_ca, tls_ca_file):
    server = postfix_factory(tls=tls_ca)
    body = (b"From: a@example.test\r\nSubject: over TLS\r\n\r\n"
            + b"".join(b"line %d\r\n.leading dot %d\r\n" % (i, i) for i in range(2000)))
    with smtpstate.Client(server.host, server.port, timeout=30, tls="starttls",
                          ca_file=tls_ca_file) as client:
        result = client.send(Message(SENDER, ["tls@example.test"], body))
        assert client.tls_version in ("TLSv1.2", "TLSv1.3")
    assert result.status == "delivered", result
    got = server.wait_for_messages(1)
    assert got[0].data == body
    import re
    assert re.search(r"TLS connection established from \S*127\.0\.0\.1", open(server.maillog).read())


# -- resumption: the second connection to a host skips the full handshake ------


class ResumeRecorder(RecordingHandler):
    """Records, for each message, whether the server resumed the TLS
    session of its connection (the server side's own word for it)."""

    def __init__(self) -> None:
        super().__init__()
        self.reused: Dict[bytes, Optional[bool]] = {}

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd API)
        tls = session.ssl.get("ssl_object") if session.ssl else None
        subject = bytes(envelope.original_content).split(b"\r\n", 1)[0]
        self.reused[subject] = tls.session_reused if tls is not None else None
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture(params=["TLSv1.2", "TLSv1.3"])
def resuming_server(request, aiosmtpd_factory, tls_ca):
    """aiosmtpd with STARTTLS at one TLS version, from a context of its own
    (TLS 1.2: session ids and tickets; TLS 1.3: tickets sent after the
    handshake), recording what it resumed."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, request.param.replace(".", "_"))
    handler = ResumeRecorder()
    server = aiosmtpd_factory(handler, tls_context=ctx, require_starttls=True)
    server.version = request.param
    return server


def subject(i: int) -> bytes:
    return b"Subject: tls %d" % i


def test_second_connection_to_a_host_resumes(resuming_server, tls_ca_file):
    """One connection at a time, one message each: the first makes a full
    handshake, the next ones resume its session (the server says so)."""
    server = resuming_server
    with smtpstate.Engine(max_per_destination=1, messages_per_connection=1) as engine:
        tickets = [engine.submit(msg(i), server.host, server.port, tls="verify",
                                 ca_file=tls_ca_file, timeout=20) for i in range(3)]
    assert [t.result.status for t in tickets] == ["delivered"] * 3, [t.result for t in tickets]
    assert len(server.connections) == 3
    reused = server.handler.reused
    assert [reused[subject(i)] for i in range(3)] == [False, True, True], (server.version, reused)


def test_another_server_name_is_not_resumed(resuming_server, tls_ca_file):
    """Two destinations at the same address and port, one checked as
    "localhost", one as the address: a session made for one is never
    offered to the other, while each resumes its own."""
    server = resuming_server
    with smtpstate.Engine(max_connections=1, max_per_destination=1,
                          messages_per_connection=1) as engine:
        named = [engine.submit(msg(i), server.host, server.port, tls="verify",
                               ca_file=tls_ca_file, server_hostname="localhost", timeout=20)
                 for i in (0, 1)]
        bare = [engine.submit(msg(i), server.host, server.port, tls="verify",
                              ca_file=tls_ca_file, timeout=20) for i in (2, 3)]
    assert all(t.result.status == "delivered" for t in named + bare), [t.result for t in named + bare]
    reused = server.handler.reused
    assert [reused[subject(i)] for i in range(4)] == [False, True, False, True], reused


def test_resumption_can_be_turned_off(resuming_server, tls_ca_file):
    server = resuming_server
    with smtpstate.Engine(max_per_destination=1, messages_per_connection=1,
                          tls_resumption=False) as engine:
        tickets = [engine.submit(msg(i), server.host, server.port, tls="verify",
                                 ca_file=tls_ca_file, timeout=20) for i in range(2)]
    assert [t.result.status for t in tickets] == ["delivered"] * 2
    assert list(server.handler.reused.values()) == [False, False]


def test_tls_resumption_option_is_checked():
    with pytest.raises(InvalidOptionError, match="tls_resumption"):
        smtpstate.Engine(tls_resumption="yes")  # type: ignore[arg-type]


def test_parallel_connections_resume_and_deliver(resuming_server, tls_ca_file):
    """Four connections at once, one message each, twelve messages: all
    delivered; after the first handshakes most connections resume (a TLS
    1.3 ticket is used once, so a connection that starts before a ticket
    is back makes a full handshake)."""
    server = resuming_server
    with smtpstate.Engine(max_per_destination=4, messages_per_connection=1) as engine:
        tickets = [engine.submit(msg(i), server.host, server.port, tls="verify",
                                 ca_file=tls_ca_file, timeout=20) for i in range(12)]
    assert all(t.result.status == "delivered" for t in tickets), [t.result for t in tickets]
    reused = list(server.handler.reused.values())
    assert len(reused) == 12 and reused.count(True) >= 1, reused


def test_handshakes_take_turns(resuming_server, tls_ca_file):
    """max_tls_handshakes=1: eight connections at once, one message each,
    so seven handshakes wait for their turn: all delivered. Each begins
    once the one before it is up, so under TLS 1.2 (whose session is
    kept when the handshake ends) every one after the first resumes it;
    all eight at once could not have (the first session comes too late
    for the others). A TLS 1.3 ticket arrives after the handshake and
    is used once: some resume."""
    server = resuming_server
    with smtpstate.Engine(max_per_destination=8, messages_per_connection=1,
                          max_tls_handshakes=1) as engine:
        tickets = [engine.submit(msg(i), server.host, server.port, tls="verify",
                                 ca_file=tls_ca_file, timeout=20) for i in range(8)]
    assert all(t.result.status == "delivered" for t in tickets), [t.result for t in tickets]
    assert len(server.connections) == 8
    reused = [server.handler.reused[subject(i)] for i in range(8)]
    if server.version == "TLSv1.2":
        assert reused == [False] + [True] * 7, reused
    else:
        assert reused.count(True) >= 1, reused


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "10"])
def test_max_tls_handshakes_is_checked(value):
    with pytest.raises(InvalidOptionError, match="max_tls_handshakes"):
        smtpstate.Engine(max_tls_handshakes=value)


# -- a scripted TCP server, for what real servers do not do ---------------------


class ScriptedServer:
    """One connection: a banner, then ``answer(line) -> bytes`` per command
    line; records every byte received. Stops at QUIT or when answer returns
    None (closing the connection)."""

    def __init__(self, answer):
        self.answer = answer
        self.received = bytearray()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(10)
            conn.sendall(b"220 scripted.example ESMTP\r\n")
            buf = b""
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        return
                    self.received += data
                    buf += data
                    while b"\r\n" in buf:
                        line, buf = buf.split(b"\r\n", 1)
                        reply = self.answer(line)
                        if reply is None:
                            return
                        conn.sendall(reply)
                        if line == b"QUIT":
                            return
            except OSError:
                return

    def close(self):
        self.sock.close()
        self.thread.join(5)


def starttls_script(after_starttls: bytes):
    def answer(line):
        if line.startswith(b"EHLO"):
            return b"250-scripted.example\r\n250-PIPELINING\r\n250 STARTTLS\r\n"
        if line == b"STARTTLS":
            return after_starttls
        if line == b"QUIT":
            return b"221 bye\r\n"
        return b"250 ok\r\n"
    return answer


def test_injected_reply_is_a_failed_tls_session_in_reports(tls_ca_file):
    """A reply injected with the 220 to STARTTLS fails the connection before
    TLS was ever up: its TLS report event is a failure, not "success" (as
    for clear text while a handshake waits for its turn)."""
    server = ScriptedServer(starttls_script(b"220 go\r\n250 injected\r\n"))
    seen = []
    try:
        with smtpstate.Engine(on_tls_event=seen.append) as engine:
            ticket = engine.submit(msg(), "127.0.0.1", server.port, tls="verify",
                                   ca_file=tls_ca_file, timeout=10)
    finally:
        server.close()
    assert ticket.result.status == "tempfail"
    assert "response injection" in ticket.result.reason
    assert [ev.result_type for ev in seen] == ["validation-failure"], seen


@pytest.mark.parametrize("reply", [b"454 4.7.0 TLS not available now\r\n",
                                   b"220 go\r\n250 injected\r\n"],
                         ids=["refused", "injected"])
def test_scripted_server_refuses_or_injects(reply, tls_ca_file):
    server = ScriptedServer(starttls_script(reply))
    try:
        client = smtpstate.Client("127.0.0.1", server.port, timeout=10, tls="starttls",
                                  ca_file=tls_ca_file, helo="client.example")
        result = client.send(msg())
        client.close()
        server.thread.join(5)
    finally:
        server.close()
    assert result.status == "tempfail"
    if reply.startswith(b"454"):
        assert "refused STARTTLS: 454" in result.reason
        assert bytes(server.received) == b"EHLO client.example\r\nSTARTTLS\r\nQUIT\r\n"
    else:
        assert "clear text after its STARTTLS reply" in result.reason
        assert bytes(server.received) == b"EHLO client.example\r\nSTARTTLS\r\n"
