"""LMTP (RFC 2033) through the Python API, against real servers.

``smtpstate.Client`` and ``smtpstate.aio.Client`` with ``protocol="lmtp"``
deliver to aiosmtpd's LMTP server (``tests/lmtp_server.py``), over TCP on
127.0.0.1 and over a unix-domain socket (``host="unix:/path"``), and the
Result shows each recipient's own reply after the data. A scripted server
on loopback (``tests/hostile.py``) ends a connection half-way through the
per-recipient replies, which no well-behaved server does on request. The
byte-exact protocol is in ``test_lmtp_protocol.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from typing import Any, Iterator, List

import pytest

import smtpstate
from smtpstate import DeliveryError, InvalidOptionError, Machine, Message, State, aio

import helpers
from hostile import HostileServer, close, ehlo_reply, expect, expect_data, greet, send
from lmtp_server import AiosmtpdLmtp, MailboxHandler

HELO = "client.lmtp.test"
SENDER = "sender@client.test"
BODY = b"Subject: lmtp\r\n\r\nhello, mailbox\r\n"


@pytest.fixture
def socket_dir() -> Iterator[str]:
    """A short directory for unix sockets (a path holds at most 107 bytes,
    which pytest's own tmp_path can exceed)."""
    path = tempfile.mkdtemp(prefix="lmtp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def lmtp_factory(socket_dir) -> Iterator[Any]:
    """factory(unix=False, **kwargs) -> a running AiosmtpdLmtp, stopped at
    teardown; unix=True puts it on a unix socket."""
    try:
        import aiosmtpd.lmtp  # noqa: F401
    except ImportError:
        helpers.missing("aiosmtpd is not installed (pip install '.[test]')")
    made: List[AiosmtpdLmtp] = []

    def factory(unix: bool = False, **kwargs: Any) -> AiosmtpdLmtp:
        path = os.path.join(socket_dir, "s%d.sock" % len(made)) if unix else None
        server = AiosmtpdLmtp(unix_path=path, **kwargs)
        made.append(server)
        return server

    yield factory
    for server in made:
        server.stop()


def message(*recipients: str) -> Message:
    return Message(SENDER, list(recipients), BODY)


def check_mixed(result: smtpstate.Result) -> None:
    """The result of message("ok@..", "refused@..", "full@..", "later@..")."""
    assert result.status == "partial"
    assert [r.status for r in result.recipients] == [
        "delivered", "permfail", "permfail", "tempfail"]
    # Each recipient's reply is the server's word on it: RCPT's for the one
    # refused there, its own reply after the data for the others.
    assert [(r.reply.code, r.reply.enhanced) for r in result.recipients] == [
        (250, "2.0.0"), (550, "5.1.1"), (552, "5.2.2"), (451, "4.2.0")]
    assert "<ok@mbox.test> delivered" in result.recipients[0].reply.text
    assert "<full@mbox.test> mailbox full" in result.recipients[2].reply.text
    assert result.recipients[2].bounce_class.name == "mailbox full"
    assert result.reply.code == 250
    with pytest.raises(DeliveryError):
        result.raise_for_status()


MIXED = ("ok@mbox.test", "refused@mbox.test", "full@mbox.test", "later@mbox.test")


# ---------------------------------------------------------------------------
# The blocking Client
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_client_delivers_to_every_mailbox(lmtp_factory, unix):
    server = lmtp_factory(unix=unix)
    rcpts = ["a@mbox.test", "b@mbox.test", "c@mbox.test"]
    with smtpstate.Client(server.host, server.port, protocol="lmtp", helo=HELO,
                          timeout=10) as client:
        result = client.send(message(*rcpts))
        assert "PIPELINING" in client.capabilities      # from the LHLO reply
        again = client.send(message("d@mbox.test"))    # the same connection
    assert result.status == "delivered", result
    assert [r.status for r in result.recipients] == ["delivered"] * 3
    assert [r.reply.text for r in result.recipients] == [
        "2.0.0 <%s> delivered" % a for a in rcpts]
    assert again.status == "delivered"
    for a in rcpts:
        (stored,) = server.handler.mailboxes[a]
        assert stored.data == BODY
    assert server.handler.greetings == [HELO]
    assert len(server.connections) == 1
    wire = server.received
    assert wire.startswith(b"LHLO %s\r\n" % HELO.encode())
    assert b"EHLO" not in wire and b"HELO " not in wire.replace(b"LHLO ", b"")
    assert wire.endswith(b"QUIT\r\n")


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_client_mixed_replies_are_partial(lmtp_factory, unix):
    server = lmtp_factory(unix=unix)
    with smtpstate.Client(server.host, server.port, protocol="lmtp", helo=HELO,
                          timeout=10) as client:
        result = client.send(message(*MIXED))
    check_mixed(result)
    assert set(server.handler.mailboxes) == {"ok@mbox.test"}


def test_client_without_pipelining(lmtp_factory):
    server = lmtp_factory(handler=MailboxHandler(pipelining=False))
    with smtpstate.Client(server.host, server.port, protocol="lmtp", helo=HELO,
                          timeout=10) as client:
        check_mixed(client.send(message(*MIXED)))


def test_client_smtp_over_a_unix_socket(lmtp_factory):
    server = lmtp_factory(unix=True, lmtp=False)
    with smtpstate.Client(server.host, protocol="smtp", helo=HELO, timeout=10) as client:
        result = client.send(message("a@mbox.test", "full@mbox.test"))
    assert result.status == "delivered"        # SMTP: one reply for all
    assert [r.reply.code for r in result.recipients] == [250, 250]
    assert server.received.startswith(b"EHLO %s\r\n" % HELO.encode())


def test_client_lhlo_refused_by_an_smtp_server(lmtp_factory):
    """aiosmtpd's SMTP server does not know LHLO: no HELO after it."""
    server = lmtp_factory(lmtp=False)
    with smtpstate.Client(server.host, server.port, protocol="lmtp", helo=HELO,
                          timeout=10) as client:
        result = client.send(message("a@mbox.test"))
    assert result.status == "permfail"
    assert "refused LHLO" in result.reason
    assert result.stage_code == smtpstate.Stage.EHLO
    wire = server.received
    assert wire.startswith(b"LHLO ")
    assert b"HELO" not in wire.replace(b"LHLO", b"") and b"EHLO" not in wire


def test_session_protocol_seen_by_a_state(lmtp_factory):
    seen: List[Any] = []

    class Look(State):
        name = "LOOK"

        def callback(self, session, reply):
            seen.append((session.protocol, "PIPELINING" in session.capabilities))

    machine = Machine()
    machine.register(Look(), after="EHLO")
    server = lmtp_factory()
    with smtpstate.Client(server.host, server.port, protocol="lmtp", helo=HELO,
                          machine=machine, timeout=10) as client:
        assert client.send(message("a@mbox.test")).ok
    assert seen == [("lmtp", True)]


def test_lost_after_the_second_of_three_replies():
    """A real socket closed half-way through the per-recipient replies."""
    server = HostileServer([
        greet(b"220 hostile.test LMTP\r\n"), expect(b"LHLO " + HELO.encode()),
        send(ehlo_reply("PIPELINING")),
        expect(b"MAIL FROM:"), expect(b"RCPT TO:<a@"), expect(b"RCPT TO:<b@"),
        expect(b"RCPT TO:<c@"), expect(b"DATA"),
        send(b"250 ok\r\n" * 4 + b"354 go\r\n"), expect_data(),
        send(b"250 2.0.0 a delivered\r\n550 5.2.1 b disabled\r\n"), close()])
    try:
        with smtpstate.Client(server.host, server.port, protocol="lmtp", helo=HELO,
                              timeout=5) as client:
            result = client.send(message("a@mbox.test", "b@mbox.test", "c@mbox.test"))
    finally:
        server.stop()
    assert result.status == "partial"
    assert [r.status for r in result.recipients] == ["delivered", "permfail", "unknown"]
    assert [r.reply.code for r in result.recipients] == [250, 550, 250]
    assert "2 of its 3 replies" in result.reason
    assert result.recipients[2].bounce_class.name == "undetermined"


# ---------------------------------------------------------------------------
# asyncio
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_aio_client(lmtp_factory, unix):
    server = lmtp_factory(unix=unix)

    async def go() -> List[smtpstate.Result]:
        async with aio.Client(server.host, server.port, protocol="lmtp", helo=HELO,
                              timeout=10) as client:
            first = await client.send(message("a@mbox.test", "b@mbox.test"))
            second = await client.send(message(*MIXED))
            return [first, second]

    first, second = asyncio.run(go())
    assert first.status == "delivered"
    assert [r.reply.text for r in first.recipients] == [
        "2.0.0 <a@mbox.test> delivered", "2.0.0 <b@mbox.test> delivered"]
    check_mixed(second)
    assert server.received.startswith(b"LHLO %s\r\n" % HELO.encode())
    assert len(server.connections) == 1


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_aio_send_and_deliver(lmtp_factory, unix):
    server = lmtp_factory(unix=unix)
    one = asyncio.run(aio.send(message(*MIXED), server.host, server.port,
                               protocol="lmtp", helo=HELO, timeout=10))
    check_mixed(one)
    many = asyncio.run(aio.deliver([message("m%d@mbox.test" % i, "full@mbox.test")
                                    for i in range(4)], server.host, server.port,
                                   concurrency=2, protocol="lmtp", helo=HELO, timeout=10))
    assert [r.status for r in many] == ["partial"] * 4
    assert [r.recipients[1].reply.code for r in many] == [552] * 4
    assert all(len(server.handler.mailboxes["m%d@mbox.test" % i]) == 1 for i in range(4))


def test_aio_smtp_over_a_unix_socket(lmtp_factory):
    server = lmtp_factory(unix=True, lmtp=False)
    result = asyncio.run(aio.send(message("a@mbox.test"), server.host, helo=HELO,
                                  timeout=10))
    assert result.ok
    assert server.received.startswith(b"EHLO ")


# ---------------------------------------------------------------------------
# Options and unix socket addresses
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda **kw: smtpstate.Client("127.0.0.1", 24, **kw),
    lambda **kw: aio.Client("127.0.0.1", 24, **kw),
    lambda **kw: smtpstate.Options.make(**kw),
], ids=["client", "aio", "options"])
@pytest.mark.parametrize("bad", ["LMTP", "esmtp", "", None, 1])
def test_bad_protocol_names_the_choices(make, bad):
    with pytest.raises(InvalidOptionError, match=r"protocol=.*'lmtp', 'smtp'"):
        make(protocol=bad)


def test_bad_protocol_refused_by_the_one_shot_helpers():
    with pytest.raises(InvalidOptionError, match="protocol"):
        asyncio.run(aio.send(message("a@mbox.test"), "127.0.0.1", 24, protocol="lmpt"))
    with pytest.raises(InvalidOptionError, match="protocol"):
        asyncio.run(aio.deliver([message("a@mbox.test")], "127.0.0.1", 24,
                                protocol="lmpt"))


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_engine_delivers_over_lmtp(lmtp_factory, unix):
    """The Engine, per submit and as its default for deliver(): LHLO, one
    reply per recipient after the data, each its recipient's status."""
    server = lmtp_factory(unix=unix)
    port = server.port or 24                  # (ignored for a unix socket)
    with smtpstate.Engine(helo=HELO) as engine:
        every = engine.submit(message("a@mbox.test", "b@mbox.test"), server.host,
                              port, protocol="lmtp", timeout=10)
        mixed = engine.submit(message(*MIXED), server.host, port,
                              protocol="lmtp", timeout=10)
    assert every.result.status == "delivered", every.result
    assert [r.reply.text for r in every.result.recipients] == [
        "2.0.0 <a@mbox.test> delivered", "2.0.0 <b@mbox.test> delivered"]
    check_mixed(mixed.result)
    assert {r.mx for r in every.result.recipients} == {server.host}
    assert b"LHLO %s\r\n" % HELO.encode() in server.received
    assert b"EHLO" not in server.received
    results = smtpstate.deliver([message("c@mbox.test")], server.host, port,
                                protocol="lmtp", helo=HELO, timeout=10)
    assert [r.status for r in results] == ["delivered"]


def test_engine_lmtp_needs_a_host():
    """An LMTP server is named, never found by MX."""
    with smtpstate.Engine(max_connections=1) as engine:
        with pytest.raises(InvalidOptionError, match="needs a host"):
            engine.submit(message("a@mbox.test"), protocol="lmtp")


@pytest.mark.parametrize("host, what", [
    ("unix:", "path"),
    ("unix:/" + "x" * 120, "107 bytes"),
    ("unix:/tmp/a\x00b", "NUL"),
])
def test_bad_unix_hosts(host, what):
    for make in (smtpstate.Client, aio.Client):
        with pytest.raises(InvalidOptionError, match=what):
            make(host, protocol="lmtp")


def test_unix_socket_with_tls_needs_a_server_name(socket_dir):
    path = "unix:" + os.path.join(socket_dir, "tls.sock")
    for make in (smtpstate.Client, aio.Client):
        with pytest.raises(InvalidOptionError, match="server_hostname"):
            make(path, tls="starttls")
        make(path, tls="starttls", server_hostname="mx.example")      # named: fine
        make(path, tls="starttls", dangerously_skip_certificate_verification=True)


def test_unix_socket_takes_no_source_address(socket_dir):
    with pytest.raises(InvalidOptionError, match="source_address"):
        smtpstate.Client("unix:" + os.path.join(socket_dir, "x.sock"),
                         source_address=("127.0.0.1", 0))


def test_unix_socket_port_is_ignored(lmtp_factory):
    server = lmtp_factory(unix=True)
    with smtpstate.Client(server.host, 0, protocol="lmtp", helo=HELO, timeout=10) as client:
        assert client.send(message("a@mbox.test")).ok


def test_missing_unix_socket_is_not_connected(socket_dir, caplog):
    path = "unix:" + os.path.join(socket_dir, "nobody.sock")
    with caplog.at_level(logging.INFO, logger="smtpstate"):
        with smtpstate.Client(path, protocol="lmtp", helo=HELO, timeout=5) as client:
            result = client.send(message("a@mbox.test"))
    assert result.status == "tempfail"
    assert result.stage == "not connected"
    assert path in result.reason
    r2 = asyncio.run(aio.send(message("a@mbox.test"), path, protocol="lmtp", helo=HELO,
                              timeout=5))
    assert r2.status == "tempfail" and path in r2.reason
