"""A catalogue of hostile servers, each asserting what the client does.

Every case runs a real TCP server on loopback (``tests/hostile.py``) whose
behaviour is a script, and drives the real client over it: the blocking
:class:`smtpstate.Client` by default, and for the cases marked ``driver``
the C :class:`smtpstate.Engine` and :mod:`smtpstate.aio` too, which must
agree. Each asserts the result of every message (status, recipients, why)
and what reached the server: the exact bytes the client did or did not
send, and whether it closed the connection or used it again.

The groups, by what they attack:

1. the greeting: silence, refusals, wrong codes, a teaser line then a
   pause, an immediate close or reset;
2. reply framing: over-long and endless replies, code-only lines,
   malformed codes, mixed codes, control bytes, LF-only endings, replies
   split at every byte or packed together, unsolicited replies, more or
   fewer replies than pipelined commands, replies ahead of their command;
3. the transaction: rejections and 421 at every stage, drops before and
   after the final dot, a 354 after every recipient was refused, late
   replies after a timeout, replies trickled to defeat per-read timeouts;
4. STARTTLS: stripped, refused, clear text injected after the 220, a
   failed handshake, capabilities that change after TLS;
5. the body: the published SMTP smuggling end-of-data variants never
   leave the client as anything but escaped lines; chunk boundaries
   inside CR LF and before a dot, over TCP and in memory.

Deadlines are short (most cases finish in milliseconds; those that must
wait for a timeout wait about a second).
"""

from __future__ import annotations

import io
import re
import socket
import ssl
import time
from typing import Any, List

import pytest

import smtpstate
from smtpstate import DeliveryError, Message

from hostile import (DRIVERS, HELO, HostileServer, ScriptError, Servers, call, close,
                     deliver, ehlo_reply, expect, expect_data, forever, greet, pause, reset,
                     send, serve, silence, starttls, trickle, unstuff)

SENDER = "sender@client.test"
RCPT = "rcpt@server.test"
BODY = b"Subject: hostile\r\n\r\nhello\r\n"

EHLO = b"EHLO %s\r\n" % HELO.encode()
MAIL = b"MAIL FROM:<%s>\r\n" % SENDER.encode()
RCPT_LINE = b"RCPT TO:<%s>\r\n" % RCPT.encode()
TX = MAIL + RCPT_LINE + b"DATA\r\n" + BODY + b".\r\n"    # one whole transaction
QUIT = b"QUIT\r\n"

#: A short deadline for cases that wait for one.
SHORT = 0.5
#: A deadline for cases that must not time out.
LONG = 5.0


def msg(data: bytes = BODY, recipients: Any = (RCPT,), sender: str = SENDER) -> Message:
    return Message(sender, list(recipients), data)


@pytest.fixture
def hostile():
    """hostile(*scripts) -> a HostileServer; all stopped after the test,
    which fails if a client did not follow its script."""
    servers = Servers()
    yield servers
    servers.stop()


@pytest.fixture(params=DRIVERS)
def driver(request):
    return request.param


def statuses(results: List[Any]) -> List[str]:
    return [r.status for r in results]


def assert_closed_by_client(conn: Any) -> None:
    assert conn.gone, f"the client left connection {conn.index} open: {conn!r}"


def test_the_harness_reports_a_client_that_strays():
    """The harness itself: a client that does not follow the script is
    reported when the server stops, with what it did instead."""
    server = HostileServer([greet(), expect(b"HELO ")])
    with socket.create_connection(server.address, timeout=5) as sock:
        assert sock.recv(100) == b"220 hostile.test ESMTP\r\n"
        sock.sendall(b"EHLO stray.test\r\n")
    assert bytes(server.conn.received) == b"EHLO stray.test\r\n"
    with pytest.raises(ScriptError, match=r"expected b'HELO ', got b'EHLO stray.test"):
        server.stop()


# ---------------------------------------------------------------------------
# 1. The greeting
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("script, status, why, sent", [
    pytest.param([pause(5)], "tempfail", "timeout: no reply in state BANNER", b"",
                 id="silence"),
    pytest.param([send(b"421 4.3.2 busy\r\n")], "tempfail", r"421 4\.3\.2 busy", b"",
                 id="421"),
    pytest.param([send(b"554 5.7.1 no SMTP here\r\n"), serve()], "permfail",
                 r"refuses service \(554 greeting\)", QUIT, id="554"),
    pytest.param([send(b"250 hostile.test\r\n"), serve()], "tempfail",
                 "unexpected reply 250 to the greeting", QUIT, id="250"),
    pytest.param([send(b"220-hostile.test\r\n"), pause(5)], "tempfail",
                 "timeout: no reply in state BANNER", b"", id="teaser-then-pause"),
    pytest.param([close()], "tempfail", "the server closed the connection", b"",
                 id="immediate-close"),
    # The reset may even come before asyncio saw its connect complete.
    pytest.param([reset()], "tempfail", r"reset|Errno 104", b"", id="immediate-reset"),
    pytest.param([send(b"SSH-2.0-OpenSSH_9.6\r\n")], "tempfail", "malformed reply", b"",
                 id="not-smtp"),
])
def test_greeting_every_driver(hostile, driver, script, status, why, sent):
    """No driver sends anything but QUIT (and that only after a 554 or a
    nonsense code) before a 220 greeting; every message gets a result."""
    server = hostile(script)
    started = time.monotonic()
    (r,) = deliver(driver, [msg()], server, timeout=SHORT)
    assert time.monotonic() - started < SHORT + 1.5
    assert r.status == status and re.search(why, r.reason), r
    assert [x.status for x in r.recipients] == [status]      # final, the message's
    conn = server.conn
    assert bytes(conn.received) == sent
    assert conn.errors == []


@pytest.mark.parametrize("code", [b"500", b"354", b"334", b"221", b"200"])
def test_greeting_with_a_wrong_code_sends_only_quit(hostile, code):
    server = hostile([send(code + b" hello\r\n"), serve()])
    (r,) = deliver("client", [msg()], server, timeout=LONG)
    assert r.status == ("permfail" if code >= b"500" else "tempfail"), r
    assert f"unexpected reply {code.decode()} to the greeting" in r.reason
    assert bytes(server.conn.received) == QUIT
    assert_closed_by_client(server.conn)


def test_greeting_teaser_with_a_short_pause_is_waited_for(hostile):
    """A multi-line greeting with a pause inside (a "greet pause" against
    early talkers): the client waits for the last line and says nothing
    meanwhile."""
    server = hostile([send(b"220-hostile.test ESMTP\r\n"), silence(0.3),
                      send(b"220-still here\r\n"), silence(0.3),
                      send(b"220 go ahead\r\n"), serve()])
    (r,) = deliver("client", [msg()], server, timeout=LONG)
    assert r.ok, r
    assert bytes(server.conn.received) == EHLO + TX + QUIT


def test_greeting_trickled_past_the_deadline(hostile):
    """One byte every 50 ms: each read is quick, the whole greeting is not.
    The deadline is absolute, so the client gives up on time."""
    server = hostile([trickle(b"220 " + b"x" * 100 + b"\r\n", 0.05)])
    started = time.monotonic()
    (r,) = deliver("client", [msg()], server, timeout=SHORT)
    elapsed = time.monotonic() - started
    assert r.status == "tempfail" and "timeout" in r.reason, r
    assert SHORT - 0.05 <= elapsed < SHORT + 1.0, elapsed
    assert bytes(server.conn.received) == b""


def test_greeting_then_close_before_ehlo_reply(hostile):
    server = hostile([greet(), expect(b"EHLO"), close()])
    (r,) = deliver("client", [msg()], server, timeout=LONG)
    assert r.status == "tempfail" and "closed" in r.reason, r
    assert bytes(server.conn.received) == EHLO


# ---------------------------------------------------------------------------
# 2. Reply framing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    pytest.param(b"2x0 ok\r\n", id="2x0"),
    pytest.param(b"+25 ok\r\n", id="plus25"),
    pytest.param(b"2500 ok\r\n", id="2500"),
    pytest.param(b" 250 ok\r\n", id="leading-space"),
    pytest.param(b"25O ok\r\n", id="letter-O"),
    pytest.param(b"250ok\r\n", id="no-separator"),
    pytest.param(b"25\r\n", id="two-digits"),
    pytest.param(b"650 ok\r\n", id="class-6"),
    pytest.param(b"\r\n", id="empty-line"),
    pytest.param(b"250-first\r\n550 second\r\n", id="mixed-codes"),
    pytest.param(b"250-first\r\n251 second\r\n", id="mixed-250-251"),
    pytest.param(b"250 a\x00b\r\n", id="NUL"),
    pytest.param(b"250 " + b"x" * 2044 + b"\r\n", id="line-over-2048"),
])
def test_malformed_reply_to_mail_closes_without_quit(hostile, bad):
    """A reply that is not SMTP ends the connection at once: no QUIT, no
    more commands (nothing the server says can be matched any more)."""
    server = hostile([greet(), serve({"MAIL": bad})])
    first, second = deliver("client", [msg(), msg()], server, timeout=LONG)
    assert first.status == "tempfail" and "malformed reply" in first.reason, first
    assert first.stage == "sending MAIL FROM"
    conns = server.wait(2)
    assert bytes(conns[0].received) == EHLO + MAIL              # then nothing
    assert_closed_by_client(conns[0])
    # The next message gets a connection of its own, and the same fate.
    assert second.status == "tempfail" and bytes(conns[1].received) == EHLO + MAIL


def test_longest_reply_line_is_fine(hostile):
    server = hostile([greet(), serve({"MAIL": b"250 " + b"x" * 2042 + b"\r\n"})])
    (r,) = deliver("client", [msg()], server, timeout=LONG)
    assert r.ok, r


@pytest.mark.parametrize("line", [b"250-" + b"x" * 60 + b"\r\n", b"250-\r\n"])
def test_endless_continuation_lines_are_bounded(hostile, line):
    """A server that never ends its EHLO reply is cut off by the size bound
    (64 KiB per reply), long before the deadline, not by memory."""
    server = hostile([greet(), expect(b"EHLO"), forever(line, limit=5.0)])
    started = time.monotonic()
    (r,) = deliver("client", [msg()], server, timeout=LONG)
    assert time.monotonic() - started < 2.0
    assert r.status == "tempfail" and "size limit exceeded" in r.reason, r
    assert bytes(server.conn.received) == EHLO                   # no QUIT
    assert server.conn.errors == []                              # it did give up


def test_slow_endless_continuation_is_cut_by_the_deadline(hostile):
    server = hostile([greet(), expect(b"EHLO"),
                      forever(b"250-x\r\n", interval=0.01, limit=5.0)])
    started = time.monotonic()
    (r,) = deliver("client", [msg()], server, timeout=SHORT)
    assert time.monotonic() - started < SHORT + 1.0
    assert r.status == "tempfail" and "timeout: no reply in state EHLO" in r.reason, r
    assert bytes(server.conn.received) == EHLO


def test_code_only_lines_are_replies(hostile):
    """RFC 5321 4.2: "250" alone is a whole reply (the text is optional)."""
    table = {verb: b"250\r\n" for verb in ("EHLO", "MAIL", "RCPT", ".", "QUIT")}
    table["DATA"] = b"354\r\n"
    server = hostile([send(b"220\r\n"), serve(table)])
    (r,) = deliver("client", [msg()], server, timeout=LONG)
    assert r.ok and r.reply.code == 250 and r.reply.text == "", r
    assert bytes(server.conn.received) == EHLO + TX + QUIT


@pytest.mark.parametrize("reply, text", [
    (b"250 a\x01b\x1b[31mc\r\n", "a\x01b\x1b[31mc"),     # C0 controls: kept as text
    (b"250 a\tb\r\n", "a\tb"),
    (b"250 a\rb\r\n", "a\rb"),                            # a bare CR is text
    (b"250 caf\xc3\xa9 \xff\r\n", "caf\xe9 \ufffd"),      # 8-bit: decoded, replaced
])
def test_control_and_8bit_bytes_in_reply_text(hostile, reply, text):
    """Only NUL makes a reply malformed; other bytes are text, handed to
    the caller as they came (decoded as UTF-8, errors replaced). Callers
    that log reply text must escape it."""
    server = hostile([greet(), serve({".": reply})])
    (r,) = deliver("client", [msg()], server, timeout=LONG)
    assert r.ok and r.reply.text == text, r


def test_lf_only_line_endings(hostile, driver):
    table = {"EHLO": b"250-hostile.test\n250 PIPELINING\n", "MAIL": b"250 ok\n",
             "RCPT": b"250 ok\n", "DATA": b"354 go\n", ".": b"250 queued\n",
             "QUIT": b"221 bye\n"}
    server = hostile([send(b"220 hostile.test\n"), serve(table)])
    (r,) = deliver(driver, [msg()], server, timeout=LONG)
    assert r.ok, r
    assert bytes(server.conn.received) == EHLO + TX + QUIT


def _bytewise(reply: bytes):
    return lambda conn, line: [send(reply, split_every=1, delay=0.001)]


def test_replies_split_at_every_byte(hostile, driver):
    """Every reply arrives one byte per packet: the same conversation, byte
    for byte, as with whole replies."""
    table = {"EHLO": ehlo_reply("PIPELINING", "8BITMIME"), "MAIL": b"250 2.1.0 ok\r\n",
             "RCPT": b"250 2.1.5 ok\r\n", "DATA": b"354 go ahead\r\n",
             ".": b"250 2.0.0 queued\r\n", "QUIT": b"221 2.0.0 bye\r\n"}
    server = hostile([send(b"220 hostile.test ESMTP\r\n", split_every=1, delay=0.001),
                      serve({verb: _bytewise(reply) for verb, reply in table.items()})])
    results = deliver(driver, [msg(), msg()], server, timeout=LONG)
    assert statuses(results) == ["delivered", "delivered"], results
    assert bytes(server.conn.received) == EHLO + TX + TX + QUIT


def _pipelined(replies: bytes):
    """Take MAIL (already read), RCPT and DATA; answer them all at once."""
    def answer(conn, line):
        conn.commands += [conn.read_line(), conn.read_line()]
        return [send(replies)]
    return answer


def test_pipelined_replies_in_one_packet(hostile, driver):
    server = hostile([greet(), serve({"MAIL": _pipelined(b"250 ok\r\n250 ok\r\n354 go\r\n")},
                                     ehlo=["PIPELINING"])])
    results = deliver(driver, [msg(), msg()], server, timeout=LONG)
    assert statuses(results) == ["delivered", "delivered"], results
    assert bytes(server.conn.received) == EHLO + TX + TX + QUIT


@pytest.mark.parametrize("size", [10, 300_000])
def test_more_replies_than_pipelined_commands(hostile, driver, size):
    """A fourth reply to MAIL, RCPT and DATA comes before the body was
    sent: it cannot be the reply to the final dot. The result is a
    tempfail, so nothing more may leave, least of all the final dot that
    sits queued behind a small body: sent now, it would deliver the
    message the result calls failed (and the retry would deliver it
    twice)."""
    server = hostile([greet(), serve(
        {"MAIL": _pipelined(b"250 ok\r\n250 ok\r\n354 go\r\n250 2.0.0 queued\r\n")},
        ehlo=["PIPELINING"])])
    body = (b"x" * 78 + b"\r\n") * max(1, size // 80)
    (r,) = deliver(driver, [msg(data=body)], server, timeout=LONG)
    assert r.status == "tempfail" and "before the end of the message data" in r.reason, r
    conn = server.conn
    assert bytes(conn.received) == EHLO + MAIL + RCPT_LINE + b"DATA\r\n"
    assert conn.data == []
    assert_closed_by_client(conn)


def test_fewer_replies_than_pipelined_commands(hostile):
    server = hostile([greet(), serve({"MAIL": _pipelined(b"250 ok\r\n250 ok\r\n")},
                                     ehlo=["PIPELINING"])])
    (r,) = deliver("client", [msg()], server, timeout=SHORT)
    assert r.status == "tempfail" and "timeout: no reply in state DATA" in r.reason, r
    assert r.stage == "sending DATA"
    assert bytes(server.conn.received) == EHLO + MAIL + RCPT_LINE + b"DATA\r\n"


@pytest.mark.parametrize("script, sent, state", [
    # Two replies to MAIL: the second would be taken for RCPT's, which
    # was not even sent yet; everything after would be off by one.
    pytest.param([greet(), serve({"MAIL": b"250 ok\r\n250 ok\r\n", "RCPT": b"550 no\r\n"})],
                 EHLO + MAIL, "RCPT", id="two-replies-to-mail"),
    # Greeting and an EHLO reply in one packet, before EHLO was sent.
    pytest.param([send(b"220 hostile.test\r\n250 hostile.test\r\n"), serve()],
                 b"", "EHLO", id="ehlo-reply-before-ehlo"),
])
def test_reply_ahead_of_its_command_ends_the_connection(hostile, driver, script, sent, state):
    server = hostile(script)
    (r,) = deliver(driver, [msg()], server, timeout=LONG)
    assert r.status == "tempfail", r
    assert f"replied to {state} before it was sent" in r.reason, r
    conn = server.conn
    # What the client wrote was written before it read the early reply.
    assert bytes(conn.received) in (sent, sent + (EHLO if not sent else RCPT_LINE))
    assert QUIT not in conn.received and b"DATA" not in conn.received
    assert_closed_by_client(conn)


def test_reply_ahead_is_judged_by_what_the_driver_took():
    """In memory, exactly: a reply may come once the first line of its
    command was taken by the driver, not before, however much else is
    still queued behind it."""
    from scripted import ScriptedSession, message
    s = ScriptedSession()
    s.start()
    s.feed(b"220 server.example\r\n")
    s.sent()
    s.feed(b"250-server.example\r\n250 PIPELINING\r\n")
    s.submit(message(recipients=["a@x.test", "b@x.test"]))
    mail = b"MAIL FROM:<sender@client.example>\r\n"
    rcpt_a = b"RCPT TO:<a@x.test>\r\n"
    assert s.pending_output() == mail + rcpt_a + b"RCPT TO:<b@x.test>\r\nDATA\r\n"
    assert s.consume(len(mail) + 5) == mail + rcpt_a[:5]
    s.feed(b"250 ok\r\n")                      # MAIL's: it was sent
    assert s.status == "ACTIVE"
    s.feed(b"250 ok\r\n")                      # RCPT's: only 5 bytes of it went
    assert s.status == "CLOSING", s.reason
    assert "replied to RCPT before it was sent" in s.reason
    # Commands already queued may still leave (the server cannot take them
    # for message data: no 354 came); nothing is added to them.
    assert s.sent() == rcpt_a[5:] + b"RCPT TO:<b@x.test>\r\nDATA\r\n"
    r = s.result()
    assert r["status"] == "tempfail"
    s.finish()


def test_no_command_line_inside_message_data():
    """In memory: between the 354 and the final dot, smtps_session_send_line
    refuses every line, whoever asks."""
    from scripted import ScriptedSession, message
    from smtpstate._core import lib
    s = ScriptedSession()
    s.start()
    s.feed(b"220 server.example\r\n")
    s.sent()
    s.feed(b"250 server.example\r\n")
    s.submit(message(data=(b"x" * 98 + b"\r\n") * 2000))
    for reply in (b"250 ok\r\n", b"250 ok\r\n"):
        s.sent()
        s.feed(reply)
    assert s.sent() == b"DATA\r\n"
    s.feed(b"354 go\r\n")
    assert s.consume(1000)                     # the body is on its way
    assert lib.smtps_session_send_line(s.ptr, b"NOOP", 4) == lib.SMTPS_ESTATE
    assert lib.smtps_session_send_line(s.ptr, b"RSET", 4) == lib.SMTPS_ESTATE
    s.sent()                                   # the rest, and the dot
    s.feed(b"250 queued\r\n")
    assert s.result()["status"] == "delivered"
    s.finish()


@pytest.mark.parametrize("extra", [b"250 2.0.0 and another thing\r\n",
                                   b"421 4.4.2 idle timeout\r\n"])
def test_unsolicited_reply_while_idle_retires_the_connection(hostile, driver, extra):
    """A reply nobody asked for, between two messages: that connection is
    not used again (no QUIT either), the next message gets a new one."""
    server = hostile([greet(), serve({".": b"250 2.0.0 queued\r\n" + extra})])
    results = deliver(driver, [msg(), msg()], server, timeout=LONG)
    assert statuses(results) == ["delivered", "delivered"], results
    first, second = server.wait(2)
    assert bytes(first.received) == EHLO + TX
    assert_closed_by_client(first)
    assert second.received.startswith(EHLO + TX)


# ---------------------------------------------------------------------------
# 3. The transaction
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("verb, reply, status, stage, sent", [
    ("MAIL", b"550 5.7.1 sender refused\r\n", "permfail", "sending MAIL FROM", MAIL),
    ("MAIL", b"451 4.3.0 try later\r\n", "tempfail", "sending MAIL FROM", MAIL),
    ("RCPT", b"550 5.1.1 no such user\r\n", "permfail", "sending RCPT TO",
     MAIL + RCPT_LINE),
    ("RCPT", b"452 4.2.2 over quota\r\n", "tempfail", "sending RCPT TO", MAIL + RCPT_LINE),
    ("DATA", b"554 5.5.1 no valid recipients\r\n", "permfail", "sending DATA",
     MAIL + RCPT_LINE + b"DATA\r\n"),
    ("DATA", b"451 4.3.0 later\r\n", "tempfail", "sending DATA",
     MAIL + RCPT_LINE + b"DATA\r\n"),
])
def test_rejection_at_each_stage_then_rset(hostile, verb, reply, status, stage, sent):
    """A refused transaction ends with the server's word; the connection is
    used again, after RSET, for the next message."""
    server = hostile([greet(), serve({verb: [reply, DEFAULT[verb]]})])
    first, second = deliver("client", [msg(), msg()], server, timeout=LONG)
    assert first.status == status and first.stage == stage, first
    assert first.reply.code == int(reply[:3])
    assert second.ok, second
    assert bytes(server.conn.received) == EHLO + sent + b"RSET\r\n" + TX + QUIT


DEFAULT = {"MAIL": b"250 ok\r\n", "RCPT": b"250 ok\r\n", "DATA": b"354 go\r\n"}


@pytest.mark.parametrize("reply, status", [(b"550 5.7.1 content rejected\r\n", "permfail"),
                                           (b"451 4.3.0 queue full\r\n", "tempfail")])
def test_final_dot_refused_needs_no_rset(hostile, driver, reply, status):
    server = hostile([greet(), serve({".": [reply, b"250 queued\r\n"]})])
    first, second = deliver(driver, [msg(), msg()], server, timeout=LONG)
    assert first.status == status and first.stage == "reading final confirmation", first
    assert [x.status for x in first.recipients] == [status]
    assert second.ok
    assert bytes(server.conn.received) == EHLO + TX + TX + QUIT


def test_some_recipients_refused(hostile, driver):
    server = hostile([greet(), serve({"RCPT": [b"250 ok\r\n", b"550 5.1.1 unknown\r\n",
                                               b"450 4.2.1 later\r\n"]})])
    (r,) = deliver(driver, [msg(recipients=["a@x.test", "b@x.test", "c@x.test"])], server,
                   timeout=LONG)
    assert r.status == "partial" and not r.ok
    with pytest.raises(DeliveryError):
        r.raise_for_status()
    assert [(x.address, x.status, x.reply.code) for x in r.recipients] == [
        ("a@x.test", "delivered", 250), ("b@x.test", "permfail", 550),
        ("c@x.test", "tempfail", 450)]
    assert server.conn.data == [BODY + b".\r\n"]


def test_every_recipient_refused_sends_no_data(hostile):
    server = hostile([greet(), serve({"RCPT": b"550 5.1.1 unknown\r\n"})])
    (r,) = deliver("client", [msg(recipients=["a@x.test", "b@x.test"])], server, timeout=LONG)
    assert r.status == "permfail" and "every recipient was refused" in r.reason, r
    assert [x.status for x in r.recipients] == ["permfail", "permfail"]
    assert b"DATA" not in server.conn.received


def test_354_after_every_recipient_was_refused(hostile, driver):
    """Pipelined: the server refuses both recipients, then says 354 to
    DATA anyway. The client must not send the message: only a lone dot,
    which ends an empty data section the server will refuse."""
    def batch(conn, line):
        conn.commands += [conn.read_line(), conn.read_line(), conn.read_line()]
        return [send(b"250 ok\r\n550 5.1.1 no\r\n550 5.1.1 no\r\n354 go ahead\r\n")]
    server = hostile([greet(), serve({"MAIL": batch, ".": b"554 5.5.1 no valid recipients\r\n"},
                                     ehlo=["PIPELINING"])])
    (r,) = deliver(driver, [msg(recipients=["a@x.test", "b@x.test"])], server, timeout=LONG)
    assert r.status == "permfail", r
    assert [x.status for x in r.recipients] == ["permfail", "permfail"]
    conn = server.conn
    assert conn.data == [b".\r\n"]                    # not a byte of the message
    assert b"hello" not in conn.received
    assert bytes(conn.received) == (EHLO + MAIL + b"RCPT TO:<a@x.test>\r\n"
                                    b"RCPT TO:<b@x.test>\r\nDATA\r\n.\r\n" + QUIT)


@pytest.mark.parametrize("verb, stage", [("EHLO", "sending EHLO"),
                                         ("MAIL", "sending MAIL FROM"),
                                         ("RCPT", "sending RCPT TO"),
                                         ("DATA", "sending DATA"),
                                         (".", "reading final confirmation")])
def test_421_at_every_stage(hostile, driver, verb, stage):
    """421: the server is closing. No QUIT; the client closes, and the next
    message gets a new connection."""
    server = hostile([greet(), serve({verb: b"421 4.3.2 shutting down\r\n"})],
                     [greet(), serve()])
    first, second = deliver(driver, [msg(), msg()], server, timeout=LONG)
    assert first.status == "tempfail" and first.stage == stage, first
    said = str(first.reply) if first.reply else first.reason
    assert ("refused EHLO" if verb == "EHLO" else "421") in said, first
    if driver == "engine" and verb == "EHLO":
        # The engine's policy: a destination whose only connection never
        # got to a transaction fails what was queued for it, unsent.
        assert second.status == "tempfail" and second.reason.startswith("not attempted")
        assert len(server.wait(1)) == 1
    else:
        assert second.ok, second
        conns = server.wait(2)
        assert bytes(conns[1].received) == EHLO + TX + QUIT
    first_conn = server.conns[0]
    assert QUIT not in first_conn.received
    assert_closed_by_client(first_conn)


@pytest.mark.parametrize("script, status, why", [
    pytest.param([greet(), expect(b"EHLO"), send(b"250 hostile.test\r\n"),
                  expect(b"MAIL"), close()], "tempfail", "closed", id="after-mail"),
    pytest.param([greet(), expect(b"EHLO"), send(b"250 hostile.test\r\n"), expect(b"MAIL"),
                  send(b"250 ok\r\n"), expect(b"RCPT"), send(b"250 ok\r\n"),
                  expect(b"DATA"), close()], "tempfail", "closed", id="after-data"),
    pytest.param([greet(), expect(b"EHLO"), send(b"250 hostile.test\r\n"), expect(b"MAIL"),
                  send(b"250 ok\r\n"), expect(b"RCPT"), send(b"250 ok\r\n"),
                  expect(b"DATA"), send(b"354 go\r\n"), expect_data(), close()],
                 "unknown", "after the final dot", id="after-dot-close"),
    pytest.param([greet(), expect(b"EHLO"), send(b"250 hostile.test\r\n"), expect(b"MAIL"),
                  send(b"250 ok\r\n"), expect(b"RCPT"), send(b"250 ok\r\n"),
                  expect(b"DATA"), send(b"354 go\r\n"), expect_data(), reset()],
                 "unknown", "after the final dot", id="after-dot-reset"),
    pytest.param([greet(), expect(b"EHLO"), send(b"250 hostile.test\r\n"), expect(b"MAIL"),
                  send(b"250 ok\r\n"), expect(b"RCPT"), send(b"250 ok\r\n"),
                  expect(b"DATA"), send(b"354 go\r\n"), expect_data(),
                  send(b"250 2.0.0 queu"), close()],
                 "unknown", "after the final dot", id="after-dot-half-reply"),
])
def test_drops(hostile, driver, script, status, why):
    """A connection lost before the final dot was taken is a tempfail; once
    it was, and before the complete reply, "unknown" (RFC 1047)."""
    server = hostile(script)
    (r,) = deliver(driver, [msg()], server, timeout=LONG)
    assert r.status == status and why in r.reason, r
    conn = server.conn
    assert QUIT not in conn.received
    if status == "unknown":
        assert conn.data == [BODY + b".\r\n"]


@pytest.mark.parametrize("take", [0, 100_000])
def test_drop_in_the_middle_of_a_large_body(hostile, driver, take):
    """The server resets the connection after the 354, having read nothing
    or part of a body too large for the socket buffers: tempfail, never
    "unknown", since the final dot cannot have been written. (With a small
    body the whole of it, dot included, may already sit in the kernel's
    buffers when the reset comes: that is "unknown", see test_drops.)"""
    big = b"line of the body\r\n" * 400_000                    # 7.2 MB
    server = hostile([greet(), expect(b"EHLO"), send(b"250 hostile.test\r\n"),
                      expect(b"MAIL"), send(b"250 ok\r\n"), expect(b"RCPT"),
                      send(b"250 ok\r\n"), expect(b"DATA"), send(b"354 go\r\n"),
                      call(lambda conn: conn.read_exactly(take)), reset()], rcvbuf=4096)
    (r,) = deliver(driver, [msg(data=big)], server, timeout=LONG)
    assert r.status == "tempfail" and r.stage == "sending message body", r
    assert b"\r\n.\r\n" not in server.conn.received


def test_late_reply_after_the_deadline(hostile, driver):
    """The reply to MAIL comes after the deadline: the client has given up
    and closed (no QUIT: the server may still be busy with MAIL), and the
    next message uses a new connection."""
    server = hostile([greet(), expect(b"EHLO"), send(b"250 hostile.test\r\n"),
                      expect(b"MAIL"), pause(SHORT + 0.5), send(b"250 2.1.0 late\r\n")],
                     [greet(), serve()])
    started = time.monotonic()
    first, second = deliver(driver, [msg(), msg()], server, timeout=SHORT)
    assert first.status == "tempfail" and "timeout: no reply in state MAIL" in first.reason
    assert second.ok, second
    assert time.monotonic() - started < SHORT + 1.5
    conns = server.wait(2)
    assert bytes(conns[0].received) == EHLO + MAIL
    assert_closed_by_client(conns[0])


@pytest.mark.parametrize("verb, status", [("MAIL", "tempfail"), (".", "unknown")])
def test_trickled_reply_cannot_stretch_the_deadline(hostile, verb, status):
    """One byte every 50 ms renews nothing: the deadline of the whole reply
    holds (RFC 5321 4.5.3.2 timeouts are per reply, not per read)."""
    reply = b"250 2.0.0 " + b"z" * 60 + b"\r\n"                 # 3.6 s at this pace
    server = hostile([greet(), serve({verb: lambda conn, line: [trickle(reply, 0.05)]})])
    started = time.monotonic()
    (r,) = deliver("client", [msg()], server, timeout=SHORT)
    elapsed = time.monotonic() - started
    assert r.status == status and "timeout" in r.reason, r
    assert elapsed < SHORT + 1.0, elapsed


def test_trickle_engine_and_aio_too(hostile):
    reply = b"250 2.1.0 " + b"z" * 60 + b"\r\n"
    for drv in ("engine", "aio"):
        server = hostile([greet(), serve({"MAIL": lambda conn, line: [trickle(reply, 0.05)]})])
        started = time.monotonic()
        (r,) = deliver(drv, [msg()], server, timeout=SHORT)
        assert r.status == "tempfail" and "timeout" in r.reason, (drv, r)
        assert time.monotonic() - started < SHORT + 1.0, drv


# ---------------------------------------------------------------------------
# 4. STARTTLS
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tls_ca, tmp_path_factory):
    """(server context, CA file the client trusts, a context with a
    certificate from another CA)."""
    import trustme
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    path = tmp_path_factory.mktemp("hostile-tls") / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    other = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("localhost", "127.0.0.1").configure_cert(other)
    return ctx, str(path), other


def _tls_options(ca_file: str, mode: str = "starttls") -> dict:
    return dict(tls=mode, ca_file=ca_file, timeout=LONG)


def test_starttls_stripped_from_ehlo(hostile, driver, tls_files):
    """A man in the middle removed STARTTLS: nothing but QUIT in clear."""
    server = hostile([greet(), serve(ehlo=["PIPELINING", "8BITMIME"])])
    (r,) = deliver(driver, [msg()], server, **_tls_options(tls_files[1]))
    assert r.status == "tempfail" and "does not offer STARTTLS" in r.reason, r
    assert bytes(server.conn.received) == EHLO + QUIT


@pytest.mark.parametrize("reply", [b"454 4.7.0 TLS not available\r\n",
                                   b"502 5.5.1 unrecognized\r\n"])
def test_starttls_refused(hostile, tls_files, reply):
    server = hostile([greet(), serve({"STARTTLS": reply}, ehlo=["STARTTLS"])])
    (r,) = deliver("client", [msg()], server, **_tls_options(tls_files[1]))
    assert r.status == "tempfail" and "refused STARTTLS" in r.reason, r
    assert bytes(server.conn.received) == EHLO + b"STARTTLS\r\n" + QUIT


def test_plaintext_injected_after_the_starttls_220(hostile, driver, tls_files):
    """CVE-2011-0411: clear text that came with the 220 was written before
    the handshake, by anyone: it is never taken as a reply, and the client
    sends nothing more, not even a ClientHello that would make the
    injected text look like part of the TLS session."""
    server = hostile([greet(), serve({"STARTTLS": b"220 2.0.0 go ahead\r\n"
                                                  b"250-injected\r\n250 AUTH PLAIN\r\n"},
                                     ehlo=["STARTTLS"])])
    (r,) = deliver(driver, [msg()], server, **_tls_options(tls_files[1]))
    assert r.status == "tempfail" and "injection" in r.reason, r
    conn = server.conn
    assert bytes(conn.received) == EHLO + b"STARTTLS\r\n"
    assert_closed_by_client(conn)


@pytest.mark.parametrize("after_220", [
    pytest.param([send(b"HTTP/1.1 400 Bad Request\r\n\r\n")], id="garbage"),
    pytest.param([close()], id="close"),
    pytest.param([reset()], id="reset"),
])
def test_failed_handshake_sends_nothing_in_clear(hostile, driver, tls_files, after_220):
    def starttls_reply(conn, line):
        return [send(b"220 2.0.0 go ahead\r\n"), pause(0.2)] + after_220
    server = hostile([greet(), serve({"STARTTLS": starttls_reply}, ehlo=["STARTTLS"])])
    (r,) = deliver(driver, [msg()], server, **_tls_options(tls_files[1]))
    assert r.status == "tempfail", r
    conn = server.conn
    head = EHLO + b"STARTTLS\r\n"
    assert conn.received.startswith(head)
    after = bytes(conn.received[len(head):])
    # Only TLS records (a ClientHello, maybe an alert): never a command.
    assert after == b"" or after[:1] in (b"\x16", b"\x15"), after[:40]
    assert b"QUIT" not in after and b"MAIL" not in after


def test_untrusted_certificate(hostile, driver, tls_files):
    _, ca_file, other = tls_files
    server = hostile([greet(), serve({"STARTTLS": [[send(b"220 go ahead\r\n"),
                                                    starttls(other, may_fail=True)]]},
                                     ehlo=["STARTTLS"])])
    (r,) = deliver(driver, [msg()], server, **_tls_options(ca_file))
    assert r.status == "tempfail" and r.stage_code in (
        smtpstate.Stage.STARTTLS, smtpstate.Stage.STARTTLS_DONE,
        smtpstate.Stage.TLS_HANDSHAKE), r
    conn = server.conn
    assert conn.tls_error is not None and not conn.tls
    assert conn.clear == EHLO + b"STARTTLS\r\n"


def test_capabilities_change_after_tls(hostile, driver, tls_files):
    """Before TLS: a tiny SIZE limit, CHUNKING, PIPELINING. After: none of
    those, and STARTTLS again. Only what was said inside TLS counts: the
    message is not refused for its size, no BDAT, one command at a time,
    no second STARTTLS."""
    ctx, ca_file, _ = tls_files
    big = b"Subject: big\r\n\r\n" + (b"y" * 48 + b"\r\n") * 100
    before = ehlo_reply("SIZE 100", "CHUNKING", "PIPELINING", "STARTTLS")
    after = ehlo_reply("SIZE 100000", "STARTTLS", "8BITMIME")

    def tls_then_serve(conn, line):
        return [send(b"220 2.0.0 go ahead\r\n"), starttls(ctx),
                serve({"EHLO": after, "STARTTLS": b"503 5.5.1 already\r\n"})]
    server = hostile([greet(), serve({"EHLO": before, "STARTTLS": tls_then_serve})])
    (r,) = deliver(driver, [msg(data=big)], server, **_tls_options(ca_file))
    assert r.ok, r
    conn = server.conn
    assert conn.tls and conn.clear == EHLO + b"STARTTLS\r\n"
    inside = bytes(conn.received[len(conn.clear):])
    assert inside == (EHLO + b"MAIL FROM:<%s> SIZE=%d\r\n" % (SENDER.encode(), len(big))
                      + RCPT_LINE + b"DATA\r\n" + big + b".\r\n" + QUIT)


def test_early_reply_inside_tls_sends_no_dot(hostile, driver, tls_files):
    """The same early reply with TLS up: the body and its dot, queued as
    plaintext or already encrypted, never leave."""
    ctx, ca_file, _ = tls_files

    def tls_then_serve(conn, line):
        return [send(b"220 2.0.0 go ahead\r\n"), starttls(ctx),
                serve({"EHLO": ehlo_reply("PIPELINING"),
                       "MAIL": _pipelined(b"250 ok\r\n250 ok\r\n354 go\r\n250 early\r\n")})]
    server = hostile([greet(), serve({"STARTTLS": tls_then_serve}, ehlo=["STARTTLS"])])
    (r,) = deliver(driver, [msg()], server, **_tls_options(ca_file))
    assert r.status == "tempfail" and "before the end of the message data" in r.reason, r
    conn = server.conn
    assert conn.tls
    assert bytes(conn.received[len(conn.clear):]) == EHLO + MAIL + RCPT_LINE + b"DATA\r\n"


def test_implicit_tls_speaking_clear_text(hostile, tls_files):
    """tls="implicit" against a server that greets in clear: the greeting
    is not a TLS record, the handshake fails, nothing is sent in clear."""
    server = hostile([greet(), pause(1.0)])
    (r,) = deliver("client", [msg()], server, **_tls_options(tls_files[1], "implicit"))
    assert r.status == "tempfail", r
    conn = server.conn
    assert conn.received[:1] in (b"", b"\x16")          # a ClientHello at most
    assert b"EHLO" not in conn.received


# ---------------------------------------------------------------------------
# 5. The body
# ---------------------------------------------------------------------------

#: End-of-data look-alikes from the SMTP smuggling research (SEC Consult,
#: 2023) and their relatives: each must leave as a plain, escaped line.
SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r.\n", b"\r\n.\r", b"\r\n.\n",
             b"\n.\r", b"\r.\r\n", b"\r\n.\r\r\n", b"\r\n..\r\n", b"\r\n.\r\n"]
#: Those with a NUL, which a lenient hop drops: refused before sending.
SMUGGLING_NUL = [b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\r\n\x00\x00.\x00\r\n"]

SMUGGLED = (b"MAIL FROM:<admin@victim.test>\r\nRCPT TO:<target@victim.test>\r\nDATA\r\n"
            b"From: admin@victim.test\r\n\r\nsmuggled\r\n")


def reference_encoding(body: bytes, stuff: bool = True) -> bytes:
    """What the wire must carry for body: every line ending CR LF, the last
    line completed, leading dots doubled, then the end-of-data line."""
    out = re.sub(rb"\r\n|\r|\n", b"\r\n", body)
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    if not stuff:
        return out
    return re.sub(rb"(?:(?<=\r\n)|^)\.", b"..", out) + b".\r\n"


def assert_clean_data_section(section: bytes) -> None:
    """One end-of-data line, at the end; no bare CR or LF anywhere; every
    other line that starts with a dot is escaped."""
    assert section.endswith(b".\r\n")
    body = section[:-3]
    assert b"\r\n.\r\n" not in section[:-3] and not body.startswith(b".\r\n")
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", section) is None, "bare CR or LF"
    for line in body.split(b"\r\n"):
        assert not line.startswith(b".") or line.startswith(b".."), line


@pytest.mark.parametrize("variant", SMUGGLING, ids=[repr(v)[2:-1] for v in SMUGGLING])
def test_smuggling_variants_leave_as_escaped_lines(hostile, variant):
    body = b"Subject: innocent\r\n\r\nhello" + variant + SMUGGLED + b"tail" + variant
    server = hostile([greet(), serve()])
    (r,) = deliver("client", [msg(data=body)], server, timeout=LONG)
    assert r.ok, r
    conn = server.conn
    (section,) = conn.data
    assert_clean_data_section(section)
    assert section == reference_encoding(body)
    # The server saw one transaction: the smuggled commands are body text.
    assert [c.split(b" ")[0].strip() for c in conn.commands] == [
        b"EHLO", b"MAIL", b"RCPT", b"DATA", b"QUIT"]
    assert b"smuggled" in unstuff(section)


@pytest.mark.parametrize("variant", SMUGGLING_NUL, ids=[repr(v)[2:-1] for v in SMUGGLING_NUL])
def test_smuggling_variants_with_nul_are_refused(hostile, driver, variant):
    """A NUL is refused before anything is sent, in bytes, a buffer, a
    file, or (checked as it streams) pieces: nothing reaches the server."""
    body = b"Subject: x\r\n\r\nline" + variant + SMUGGLED
    with pytest.raises(smtpstate.InvalidMessageError, match="NUL byte"):
        msg(data=body)
    with pytest.raises(smtpstate.InvalidMessageError, match="NUL byte"):
        msg(data=memoryview(body))
    with pytest.raises(smtpstate.InvalidMessageError, match="NUL byte"):
        msg(data=io.BytesIO(body))
    server = hostile([greet(), serve()])
    (r,) = deliver(driver, [msg(data=[body[i:i + 7] for i in range(0, len(body), 7)])],
                   server, timeout=LONG)
    assert r.status == "permfail" and "NUL byte" in r.reason, r
    assert server.conn.data == [] and b"smuggled" not in bytes(server.conn.received)


def test_smuggling_variants_under_chunking(hostile, driver):
    """With BDAT nothing is dot-stuffed, but line endings are normalised all
    the same, so a relay that later sends the message with DATA cannot be
    fooled by it."""
    body = b"Subject: x\r\n\r\n" + b"".join(b"line" + v + SMUGGLED for v in SMUGGLING)
    server = hostile([greet(), serve(ehlo=["CHUNKING", "8BITMIME"])])
    (r,) = deliver(driver, [msg(data=body)], server, timeout=LONG)
    assert r.ok, r
    conn = server.conn
    (chunk,) = conn.data
    assert chunk == reference_encoding(body, stuff=False)
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", chunk) is None
    assert conn.commands[3] == b"BDAT %d LAST\r\n" % len(chunk)


#: Patterns that straddle a buffer boundary wherever it falls: a CR LF cut
#: in two, a dot right after a cut, bare CRs and LFs next to dots.
DENSE = b"a\r\n.b\r.\n..\n\r.\r\n.\r" * 9000            # 153 kB, 9000 of each


def _slow_reader(conn) -> None:
    """Take the data section in small, slow reads so that the client's
    writes come back short, at ever different offsets."""
    conn.data.append(conn.read_slowly(b"\r\n.\r\n"))


def test_chunk_boundaries_over_tcp(hostile, driver):
    def data_reply(conn, line):
        return [send(b"354 go\r\n"), call(_slow_reader), send(b"250 2.0.0 queued\r\n")]
    server = hostile([greet(), serve({"DATA": data_reply})], rcvbuf=4096)
    (r,) = deliver(driver, [msg(data=DENSE)], server, timeout=LONG)
    assert r.ok, r
    (section,) = server.conn.data
    assert section == reference_encoding(DENSE)
    assert_clean_data_section(section)


@pytest.mark.parametrize("take", [1021, 4093, 16383, 16385, 65535, "random"])
def test_chunk_boundaries_in_memory(take):
    """The session's body pump against a driver that takes its output in
    pieces of every size: the bytes on the wire never depend on where the
    pieces end."""
    import random

    from scripted import ScriptedSession, message
    rng = random.Random(take)
    s = ScriptedSession()
    s.start()
    s.feed(b"220 server.example\r\n")
    s.sent()
    s.feed(b"250 server.example\r\n")
    s.submit(message(data=DENSE))
    s.sent()
    s.feed(b"250 ok\r\n")
    s.sent()
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"DATA\r\n"
    s.feed(b"354 go\r\n")
    wire = bytearray()
    while True:
        n = rng.randint(1, 70000) if take == "random" else take
        piece = s.consume(n)
        if not piece:
            break
        wire += piece
    assert bytes(wire) == reference_encoding(DENSE)
    s.feed(b"250 queued\r\n")
    assert s.result()["status"] == "delivered"
    s.finish()
