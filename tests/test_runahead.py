"""The engine starts the next transaction behind the final dot.

With PIPELINING (RFC 2920 3.1 lets message content begin a group), the
engine queues the next message's MAIL, RCPT and DATA right after the
final dot of the one before, so that each message costs one write and
one read instead of two of each. These cases check, against scripted
servers on loopback (``tests/hostile.py``), that the commands really go
out before the dot's reply, and that whatever the server then does to
the dot (refuse it, 421, close, stall) or to the early commands (refuse
MAIL, a message refused before any command) every message still gets
exactly one result, in its own words, and nothing is sent twice.
Real servers (smtp-sink, Postfix) with several messages per connection
are in ``test_engine.py``.
"""

from __future__ import annotations

from typing import Any, List

import pytest

import smtpstate
from smtpstate import Message

from hostile import (HELO, Servers, close, ehlo_reply, expect, expect_data, greet, pause,
                     send, serve, silence)

SENDER = "sender@client.test"
RCPT = "rcpt@server.test"
SHORT = 1.0


def body(i: int, size: int = 0) -> bytes:
    text = b"Subject: message %d\r\n\r\nhello %d\r\n" % (i, i)
    if size:
        text += (b"y" * 78 + b"\r\n") * (size // 80)
    return text


@pytest.fixture
def hostile():
    servers = Servers()
    yield servers
    servers.stop()


def run(server: Any, messages: List[Message], **options: Any) -> List[smtpstate.Result]:
    """Send every message through one engine connection; their results."""
    options.setdefault("timeout", 5)
    with smtpstate.Engine(max_connections=1, max_per_destination=1, helo=HELO,
                          idle_timeout=30.0) as engine:
        tickets = [engine.submit(m, server.host, server.port, **options) for m in messages]
        results = list(engine.run(timeout=30))
    assert sorted(r.ticket.id for r in results) == [t.id for t in tickets], \
        "every message exactly one result"
    return [t.result for t in tickets]


def opening(*keywords: str) -> list:
    """Greeting, EHLO offering PIPELINING, the first transaction's commands."""
    return [greet(), expect(b"EHLO"), send(ehlo_reply("PIPELINING", *keywords)),
            expect(b"MAIL FROM:<%s>" % SENDER.encode()), expect(b"RCPT TO:"), expect(b"DATA"),
            send(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n"), expect_data()]


def next_commands() -> list:
    """The next message's commands, read before the dot was answered."""
    return [expect(b"MAIL FROM:<%s>" % SENDER.encode()), expect(b"RCPT TO:"),
            expect(b"DATA")]


def test_next_commands_leave_before_the_final_reply(hostile):
    server = hostile(opening() + next_commands() + [
        send(b"250 2.0.0 first queued\r\n250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n"),
        expect_data(),
    ] + next_commands() + [
        send(b"250 2.0.0 second queued\r\n250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n"),
        expect_data(),
        send(b"250 2.0.0 third queued\r\n"),
        expect(b"QUIT"), send(b"221 bye\r\n"), close()])
    messages = [Message(SENDER, [RCPT], body(i)) for i in range(3)]
    results = run(server, messages)
    assert [r.status for r in results] == ["delivered"] * 3
    assert [r.reply.text for r in results] == [
        "2.0.0 first queued", "2.0.0 second queued", "2.0.0 third queued"]
    conn = server.conn
    assert [bytes(d) for d in conn.data] == [body(i) + b".\r\n" for i in range(3)]
    # The dot and the next MAIL are adjacent on the wire, nothing in between.
    assert conn.received.count(b".\r\nMAIL FROM:") == 2


def test_no_pipelining_no_run_ahead(hostile):
    # Without PIPELINING the client waits for every reply, the dot's too.
    one = [expect(b"MAIL FROM:"), send(b"250 ok\r\n"), expect(b"RCPT TO:"), send(b"250 ok\r\n"),
           expect(b"DATA"), send(b"354 go ahead\r\n"), expect_data(), silence(0.3)]
    server = hostile([greet(), expect(b"EHLO"), send(ehlo_reply("8BITMIME"))]
                     + one + [send(b"250 first\r\n")] + one + [send(b"250 second\r\n"),
                                                            expect(b"QUIT"), send(b"221 bye\r\n"),
                                                            close()])
    results = run(server, [Message(SENDER, [RCPT], body(i)) for i in range(2)])
    assert [r.status for r in results] == ["delivered"] * 2
    assert len(server.conn.data) == 2


def test_large_body_then_run_ahead(hostile):
    # A body far above the output high-water mark is queued in pieces as
    # the socket drains; the next MAIL follows only its final dot.
    big = body(0, size=400_000)
    server = hostile(opening() + next_commands() + [
        send(b"250 2.0.0 big queued\r\n250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n"),
        expect_data(), send(b"250 2.0.0 small queued\r\n"),
        expect(b"QUIT"), send(b"221 bye\r\n"), close()])
    results = run(server, [Message(SENDER, [RCPT], big), Message(SENDER, [RCPT], body(1))])
    assert [r.status for r in results] == ["delivered", "delivered"]
    assert [bytes(d) for d in server.conn.data] == [big + b".\r\n", body(1) + b".\r\n"]


def test_final_dot_refused_next_message_goes_on(hostile):
    server = hostile(opening() + next_commands() + [
        send(b"554 5.6.0 content refused\r\n250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n"),
        expect_data(), send(b"250 2.0.0 queued\r\n"),
        expect(b"QUIT"), send(b"221 bye\r\n"), close()])
    results = run(server, [Message(SENDER, [RCPT], body(i)) for i in range(2)])
    assert [r.status for r in results] == ["permfail", "delivered"]
    assert results[0].reply.code == 554 and "content refused" in results[0].reply.text
    assert results[0].stage == "reading final confirmation"
    assert results[1].reply.code == 250
    assert b"RSET" not in server.conn.received          # the dot ended it


def test_final_dot_tempfailed_next_message_goes_on(hostile):
    server = hostile(opening() + next_commands() + [
        send(b"451 4.3.0 try later\r\n250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n"),
        expect_data(), send(b"250 2.0.0 queued\r\n"),
        expect(b"QUIT"), send(b"221 bye\r\n"), close()])
    results = run(server, [Message(SENDER, [RCPT], body(i)) for i in range(2)])
    assert [r.status for r in results] == ["tempfail", "delivered"]
    assert results[0].reply.code == 451


def test_421_to_the_final_dot(hostile):
    # The server is closing: the message run ahead never got its data out.
    server = hostile(opening() + next_commands() + [
        send(b"421 4.3.2 shutting down\r\n"), close()])
    results = run(server, [Message(SENDER, [RCPT], body(i)) for i in range(2)])
    assert [r.status for r in results] == ["tempfail", "tempfail"]
    assert results[0].reply.code == 421
    assert results[0].stage == "reading final confirmation"
    assert results[1].reply is None or results[1].reply.code == 421
    assert len(server.conn.data) == 1                    # the second body never left
    assert b"QUIT" not in server.conn.received


def test_protocol_error_at_the_final_dot_closes_without_draining(hostile):
    # A 3xx to the dot: the server lost step. Draining the commands behind
    # the dot could answer a 354 with a lone dot and deliver an empty
    # message; the connection is closed instead.
    server = hostile(opening() + next_commands() + [
        send(b"354 what?\r\n250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n"),
        silence(0.3)])
    results = run(server, [Message(SENDER, [RCPT], body(i)) for i in range(2)])
    assert [r.status for r in results] == ["tempfail", "tempfail"]
    received = server.conn.received
    assert received.endswith(b"DATA\r\n"), received[-80:]   # no dot, no QUIT after it
    assert len(server.conn.data) == 1


def test_close_after_the_final_dot_is_unknown_then_tempfail(hostile):
    server = hostile(opening() + next_commands() + [close()])
    results = run(server, [Message(SENDER, [RCPT], body(i)) for i in range(2)])
    assert [r.status for r in results] == ["unknown", "tempfail"]
    assert "after the final dot" in results[0].reason
    assert "MAIL" in results[1].stage                  # the second had only begun


def test_stall_after_the_final_dot_times_out(hostile):
    server = hostile(opening() + next_commands() + [silence(SHORT + 1.5)])
    results = run(server, [Message(SENDER, [RCPT], body(i)) for i in range(2)],
                  timeout=SHORT)
    assert [r.status for r in results] == ["unknown", "tempfail"]
    assert "timeout" in results[0].reason


def test_next_mail_refused_after_run_ahead(hostile):
    server = hostile([greet(), serve({
        "MAIL": [b"250 2.1.0 ok\r\n", b"550 5.7.1 sender refused\r\n", b"250 2.1.0 ok\r\n"],
        "RCPT": [b"250 2.1.5 ok\r\n", b"503 5.5.1 need MAIL\r\n", b"250 2.1.5 ok\r\n"],
        "DATA": [b"354 go ahead\r\n", b"503 5.5.1 need RCPT\r\n", b"354 go ahead\r\n"],
    }, ehlo=["PIPELINING"])])
    results = run(server, [Message(SENDER, [RCPT], body(i)) for i in range(3)])
    assert [r.status for r in results] == ["delivered", "permfail", "delivered"]
    assert results[1].reply.code == 550
    assert [bytes(d) for d in server.conn.data] == [body(0) + b".\r\n", body(2) + b".\r\n"]


def test_message_refused_before_sending_while_one_awaits_its_reply(hostile):
    # The second message is over the server's SIZE limit: refused when it
    # would start, while the first still waits for its final reply.
    server = hostile([greet(), serve(ehlo=["PIPELINING", "SIZE 20000"])])
    messages = [Message(SENDER, [RCPT], body(0)), Message(SENDER, [RCPT], body(1, 40_000)),
                Message(SENDER, [RCPT], body(2))]
    results = run(server, messages)
    assert [r.status for r in results] == ["delivered", "permfail", "delivered"]
    assert "SIZE" in results[1].reason or "size" in results[1].reason
    assert [bytes(d) for d in server.conn.data] == [body(0) + b".\r\n", body(2) + b".\r\n"]
    assert server.conn.received.count(b"MAIL FROM") == 2


def test_messages_per_connection_limits_run_ahead(hostile):
    server = hostile([greet(), serve(ehlo=["PIPELINING"])])
    messages = [Message(SENDER, [RCPT], body(i)) for i in range(5)]
    with smtpstate.Engine(max_connections=1, max_per_destination=1, helo=HELO,
                          messages_per_connection=2) as engine:
        tickets = [engine.submit(m, server.host, server.port, timeout=5) for m in messages]
        list(engine.run(timeout=30))
    assert [t.result.status for t in tickets] == ["delivered"] * 5
    conns = server.wait(3)
    assert [len(c.data) for c in conns] == [2, 2, 1]
    assert all(c.received.count(b"MAIL FROM") == len(c.data) for c in conns)


def test_slow_final_reply_keeps_its_deadline(hostile):
    # The final reply comes late but within the deadline: both delivered.
    server = hostile(opening() + next_commands() + [
        pause(0.4),
        send(b"250 2.0.0 queued\r\n250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n"),
        expect_data(), send(b"250 2.0.0 queued\r\n"),
        expect(b"QUIT"), send(b"221 bye\r\n"), close()])
    results = run(server, [Message(SENDER, [RCPT], body(i)) for i in range(2)], timeout=2)
    assert [r.status for r in results] == ["delivered", "delivered"]
