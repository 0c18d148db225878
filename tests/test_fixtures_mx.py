"""The MX server fixtures (tests/mx_servers.py) behave as routing tests
will assume, seen from plain clients (smtplib and raw sockets): one port
on several loopback addresses, each address with its own behaviour, and
what every server records; and the LMTP server's per-recipient replies
after the final dot (RFC 2033 4.2), spoken by hand."""

from __future__ import annotations

import smtplib
import socket
import time
from typing import List

import pytest

import helpers
from mx_servers import BEHAVIOURS, MxServers, ipv6_loopback_available

IPV6 = helpers.requires(ipv6_loopback_available(), "no IPv6 loopback (::1) here")


def send(host: str, port: int, helo: str, rcpts: List[str] = ["rcpt@example.test"],
         body: bytes = b"Subject: t\r\n\r\nbody\r\n") -> None:
    with smtplib.SMTP(host, port, local_hostname=helo, timeout=10) as s:
        assert s.sendmail("sender@client.test", rcpts, body) == {}


def greeting(host: str, port: int) -> bytes:
    """Connect, read until the server closes (or 2 s pass); return it all."""
    with socket.create_connection((host, port), timeout=2) as s:
        out = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return out
            out += chunk


def test_one_port_many_addresses(mx_servers):
    mx = mx_servers(["127.0.0.2", "127.0.0.3", "127.0.0.4"])
    assert mx.port > 0
    for n, address in enumerate(mx.addresses, 1):
        send(address, mx.port, "client%d.test" % n)
    for n, address in enumerate(mx.addresses, 1):
        server = mx.server(address)
        assert server.port == mx.port
        (msg,) = server.wait_for_messages(1)
        assert (msg.mail_from, msg.rcpt_tos) == ("sender@client.test", ["rcpt@example.test"])
        assert msg.data == b"Subject: t\r\n\r\nbody\r\n"
        assert msg.helo == "client%d.test" % n
        assert server.helo_names == ["client%d.test" % n]
        assert server.accepted == 1 and len(server.peers) == 1
        assert msg.peer == server.peers[0]
    assert len(mx.messages()) == 3


@IPV6
def test_ipv6_loopback_shares_the_port(mx_servers):
    mx = mx_servers(["127.0.0.2", "::1"])
    send("::1", mx.port, "six.test")
    (msg,) = mx.server("::1").wait_for_messages(1)
    assert msg.helo == "six.test" and msg.peer[0] == "::1"
    assert mx.server("[::1]") is mx.server("::1")
    assert mx.server("127.0.0.2").messages == []


def test_connection_counts_and_peak(mx_servers):
    mx = mx_servers(["127.0.0.2"])
    server = mx.server("127.0.0.2")
    socks = [socket.create_connection(("127.0.0.2", mx.port), timeout=5) for _ in range(5)]
    try:
        for s in socks:
            assert s.recv(4096).startswith(b"220 ")
        assert (server.accepted, server.active, server.peak) == (5, 5, 5)
    finally:
        for s in socks:
            s.close()
    helpers.wait_until(lambda: server.active == 0, what="the connections to end")
    before = time.monotonic()
    send("127.0.0.2", mx.port, "again.test")
    helpers.wait_until(lambda: server.active == 0, what="the last connection to end")
    assert (server.accepted, server.peak) == (6, 5)
    # When each connection was accepted and each message taken (rate tests).
    assert len(server.opened_at) == 6 and server.opened_at == sorted(server.opened_at)
    assert before <= server.opened_at[5] <= server.messages[0].extra["received_at"] <= time.monotonic()


def test_refuse(mx_servers):
    mx = mx_servers(["127.0.0.2", "127.0.0.3"], {"127.0.0.3": "refuse"})
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.3", mx.port), timeout=5)
    send("127.0.0.2", mx.port, "client.test")      # the same port, elsewhere
    assert mx.server("127.0.0.3").accepted == 0


@pytest.mark.parametrize("behaviour, reply", [
    ("greet421", b"421 4.3.2 try later\r\n"),
    ("greet554", b"554 5.3.2 no service here\r\n"),
])
def test_greeting_refusals(mx_servers, behaviour, reply):
    mx = mx_servers(["127.0.0.2"], {"127.0.0.2": behaviour})
    assert greeting("127.0.0.2", mx.port) == reply       # then the server closes
    with pytest.raises(smtplib.SMTPConnectError) as e:
        smtplib.SMTP("127.0.0.2", mx.port, timeout=5)
    assert e.value.smtp_code == int(reply[:3])
    server = mx.server("127.0.0.2")
    assert server.accepted == 2
    helpers.wait_until(lambda: server.active == 0, what="the server to close")


def test_hang(mx_servers):
    mx = mx_servers(["127.0.0.2"], {"127.0.0.2": "hang"})
    server = mx.server("127.0.0.2")
    with socket.create_connection(("127.0.0.2", mx.port), timeout=0.5) as s:
        with pytest.raises(socket.timeout):
            s.recv(1)
        s.sendall(b"EHLO client.test\r\n")
        with pytest.raises(socket.timeout):
            s.recv(1)
        assert (server.accepted, server.active) == (1, 1)
    helpers.wait_until(lambda: server.active == 0, what="the connection to end")


def test_stop_closes_hanging_connections():
    mx = MxServers(["127.0.0.2"], {"127.0.0.2": "hang"}).start()
    s = socket.create_connection(("127.0.0.2", mx.port), timeout=5)
    helpers.wait_until(lambda: mx.server("127.0.0.2").active == 1, what="the connection")
    mx.stop()
    with s:
        assert s.recv(1) == b""           # closed by the server
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", mx.port), timeout=5)


def test_ehlo_fail(mx_servers):
    mx = mx_servers(["127.0.0.2"], {"127.0.0.2": "ehlo_fail"})
    with smtplib.SMTP("127.0.0.2", mx.port, local_hostname="client.test", timeout=10) as s:
        assert s.ehlo()[0] == 550
        assert s.helo()[0] == 502
        assert s.mail("sender@client.test")[0] == 503        # no greeting accepted
    assert mx.server("127.0.0.2").helo_names == ["client.test", "client.test"]
    assert mx.server("127.0.0.2").messages == []


def test_rcpt_550(mx_servers):
    mx = mx_servers(["127.0.0.2"], {"127.0.0.2": "rcpt_550"})
    with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
        send("127.0.0.2", mx.port, "client.test", ["a@example.test", "b@example.test"])
    assert {code for code, _ in e.value.recipients.values()} == {550}
    assert all(text.startswith(b"5.1.1 ") for _, text in e.value.recipients.values())
    assert mx.server("127.0.0.2").messages == []


def test_tempfail_data(mx_servers):
    mx = mx_servers(["127.0.0.2"], {"127.0.0.2": "tempfail_data"})
    with smtplib.SMTP("127.0.0.2", mx.port, local_hostname="client.test", timeout=10) as s:
        s.ehlo()
        assert s.mail("sender@client.test")[0] == 250
        assert s.rcpt("rcpt@example.test")[0] == 250
        assert s.docmd("DATA") == (451, b"4.3.0 try again later")
        assert s.rset()[0] == 250                            # the session goes on
    assert mx.server("127.0.0.2").messages == []


def test_every_behaviour_starts_together(mx_servers):
    addresses = ["127.0.0.%d" % (n + 2) for n in range(len(BEHAVIOURS))]
    mx = mx_servers(addresses, dict(zip(addresses, BEHAVIOURS)))
    assert [mx.server(a).behaviour for a in addresses] == list(BEHAVIOURS)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown behaviour"):
        MxServers(["127.0.0.2"], {"127.0.0.2": "explode"})
    with pytest.raises(ValueError, match="not among the addresses"):
        MxServers(["127.0.0.2"], {"127.0.0.3": "refuse"})
    with pytest.raises(ValueError, match="twice"):
        MxServers(["127.0.0.2", "127.0.0.2"])


# ---------------------------------------------------------------------------
# LMTP
# ---------------------------------------------------------------------------


def lmtp_by_hand(sock: socket.socket) -> List[bytes]:
    """LHLO, MAIL, two RCPT, DATA, content, "."; return every reply line
    after the final dot (one per recipient, RFC 2033 4.2)."""
    f = sock.makefile("rb")

    def reply() -> List[bytes]:
        lines = []
        while True:
            line = f.readline()
            assert line, "the server closed the connection"
            lines.append(line.rstrip(b"\r\n"))
            if line[3:4] != b"-":
                return lines

    assert reply()[0].startswith(b"220 ")
    for command, code in [(b"LHLO client.test", b"250"), (b"MAIL FROM:<sender@client.test>", b"250"),
                          (b"RCPT TO:<one@example.test>", b"250"), (b"RCPT TO:<two@example.test>", b"250"),
                          (b"DATA", b"354")]:
        sock.sendall(command + b"\r\n")
        assert reply()[-1].startswith(code), command
    sock.sendall(b"Subject: lmtp\r\n\r\n..dot\r\n.\r\n")
    replies = [reply()[0], reply()[0]]
    sock.sendall(b"QUIT\r\n")
    assert reply()[0].startswith(b"221")
    return replies


def test_lmtp_per_recipient_replies_over_tcp(lmtp_factory):
    server = lmtp_factory(("127.0.0.1", 0), {"two@example.test": "452 4.2.2 Mailbox full"})
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        assert lmtp_by_hand(s) == [b"250 2.0.0 Ok", b"452 4.2.2 Mailbox full"]
    (msg,) = server.wait_for_messages(1)
    assert msg.rcpt_tos == ["one@example.test", "two@example.test"]
    assert msg.data == b"Subject: lmtp\r\n\r\n.dot\r\n"
    assert msg.helo == "client.test" and server.helo_names == ["client.test"]
    assert server.replies == [[("one@example.test", "250 2.0.0 Ok"),
                               ("two@example.test", "452 4.2.2 Mailbox full")]]
    assert server.accepted == 1


def test_lmtp_over_a_unix_socket(lmtp_factory, tmp_path):
    path = str(tmp_path / "lmtp.sock")
    server = lmtp_factory(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        assert lmtp_by_hand(s) == [b"250 2.0.0 Ok", b"250 2.0.0 Ok"]
    assert server.wait_for_messages(1)[0].rcpt_tos == ["one@example.test", "two@example.test"]
    server.stop()
    assert not (tmp_path / "lmtp.sock").exists()


def test_lmtp_refuses_ehlo(lmtp_server):
    with smtplib.SMTP(lmtp_server.host, lmtp_server.port, timeout=10) as s:
        assert s.ehlo()[0] == 500
        assert s.helo()[0] == 500
