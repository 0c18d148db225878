"""Exact protocol tests: the C session against a scripted server in memory.

Each scenario plays the server's replies through ``tests/scripted.py`` and
asserts, step by step, the exact bytes the client wrote (curl test-data
style) and the results. Every scenario runs twice (``split``): server bytes
fed whole, then one byte at a time (h11 ``test_io.tr``); the outcome must
not change. At teardown every session is closed and must have handed out
exactly one result per submitted message.
"""

from __future__ import annotations

import pytest

from smtpstate import Recipient
from smtpstate._core import lib

from scripted import SPLITS, ScriptedSession, crlf_lines as lines

pytestmark = pytest.mark.parametrize("split", SPLITS)

T0 = 1_000_000                         # the scripted clock's start, ms

BANNER = b"220 server.example ESMTP\r\n"
EHLO = b"EHLO client.example\r\n"
PLAIN = b"250 server.example\r\n"                       # no extensions
PIPELINING = b"250-server.example\r\n250 PIPELINING\r\n"
MAIL = b"MAIL FROM:<sender@client.example>\r\n"
RCPT = b"RCPT TO:<rcpt@server.example>\r\n"
BODY = b"Subject: hi\r\n\r\nhello\r\n"                   # message()'s default data
QUIT = b"QUIT\r\n"


@pytest.fixture
def make(split):
    """make(**kwargs) -> a ScriptedSession fed the ``split`` way; each one
    is finished (closed, nothing lost) at teardown."""
    made = []

    def factory(**kwargs):
        s = ScriptedSession(split=split, now=T0, **kwargs)
        made.append(s)
        return s

    yield factory
    for s in made:
        s.finish()


def ehlo(*keywords: str) -> bytes:
    """A 250 EHLO reply offering these extension lines."""
    out = [b"250-server.example\r\n" if keywords else b"250 server.example\r\n"]
    for i, kw in enumerate(keywords):
        sep = b" " if i == len(keywords) - 1 else b"-"
        out.append(b"250" + sep + kw.encode() + b"\r\n")
    return b"".join(out)


def connected(make, ehlo_reply: bytes = PLAIN, **kwargs) -> ScriptedSession:
    """A session through the banner and EHLO, IDLE, nothing left to send."""
    s = make(**kwargs)
    s.start()
    assert s.sent() == b""                 # the server speaks first
    assert s.status == "ACTIVE"
    s.feed(BANNER)
    assert s.sent() == EHLO
    s.feed(ehlo_reply)
    assert s.sent() == b""
    assert s.status == "IDLE"
    return s


def deliver(s: ScriptedSession, expect_mail: bytes = MAIL, **kwargs) -> dict:
    """One message through a session without pipelining; returns its result."""
    s.submit(**kwargs)
    assert s.sent() == expect_mail
    s.feed(b"250 2.1.0 Ok\r\n")
    assert s.sent() == RCPT
    s.feed(b"250 2.1.5 Ok\r\n")
    assert s.sent() == b"DATA\r\n"
    s.feed(b"354 go ahead\r\n")
    assert s.sent() == BODY + b".\r\n"
    s.feed(b"250 2.0.0 queued\r\n")
    assert s.sent() == b""
    return s.result()


# ---------------------------------------------------------------------------
# 1. Plain delivery, no extensions
# ---------------------------------------------------------------------------

def test_plain_delivery_then_quit(make, split):
    s = connected(make)
    s.submit(data=b".leading\n..two\r\nbare cr\rbare lf\nmid.dot\r\n.\r\nno final newline")
    assert s.sent() == MAIL
    assert s.results() == []
    s.feed(b"250 2.1.0 Ok\r\n")
    assert s.sent() == RCPT
    s.feed(b"250 2.1.5 Ok\r\n")
    assert s.sent() == b"DATA\r\n"
    s.feed(b"354 End data with <CR><LF>.<CR><LF>\r\n")
    assert s.sent() == (b"..leading\r\n"
                        b"...two\r\n"
                        b"bare cr\r\n"
                        b"bare lf\r\n"
                        b"mid.dot\r\n"
                        b"..\r\n"
                        b"no final newline\r\n"
                        b".\r\n")
    assert s.results() == []
    s.feed(b"250 2.0.0 Ok: queued as ABC\r\n")
    assert s.sent() == b""
    r = s.result()
    assert r["status"] == "delivered"
    assert (r["code"], r["enhanced"], r["text"]) == (250, "2.0.0", "2.0.0 Ok: queued as ABC")
    assert r["stage_name"] == "reading final confirmation"
    assert r["state"] == "BODY"
    assert r["rcpts"] == [("delivered", 250)]
    assert s.status == "IDLE"
    assert s.deadline == -1

    s.quit()
    assert s.sent() == QUIT
    assert s.status == "ACTIVE"
    s.feed(b"221 2.0.0 Bye\r\n")
    assert s.sent() == b""
    assert s.status == "CLOSING"
    assert s.results() == []


@pytest.mark.parametrize("data, wire", [
    (b"", b".\r\n"),
    (b"x", b"x\r\n.\r\n"),
    (b".", b"..\r\n.\r\n"),
    (b"a\r", b"a\r\n.\r\n"),
    (b"a\r\r\nb", b"a\r\n\r\nb\r\n.\r\n"),
    (b"a\n\n.b\n", b"a\r\n\r\n..b\r\n.\r\n"),
    (b"\r\n.\r\n", b"\r\n..\r\n.\r\n"),
    (b"\r.\n.", b"\r\n..\r\n..\r\n.\r\n"),
])
def test_body_encoding_on_the_wire(make, split, data, wire):
    s = connected(make)
    s.submit(data=data)
    assert s.sent() == MAIL
    s.feed(b"250 ok\r\n")
    assert s.sent() == RCPT
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"DATA\r\n"
    s.feed(b"354 go\r\n")
    assert s.sent() == wire
    s.feed(b"250 ok\r\n")
    assert s.result()["status"] == "delivered"


# ---------------------------------------------------------------------------
# 2. EHLO refused: HELO
# ---------------------------------------------------------------------------

def test_ehlo_refused_falls_back_to_helo(make, split):
    s = make()
    s.start()
    s.feed(BANNER)
    assert s.sent() == EHLO
    s.feed(b"500 5.5.1 Command unrecognized\r\n")
    assert s.sent() == b"HELO client.example\r\n"
    s.feed(b"250 server.example\r\n")
    assert s.sent() == b""
    assert s.status == "IDLE"
    assert deliver(s)["status"] == "delivered"


def test_helo_after_ehlo_ignores_extensions(make, split):
    """HELO's reply is not an extension list, whatever it says."""
    s = make()
    s.start()
    s.feed(BANNER)
    assert s.sent() == EHLO
    s.feed(b"502 not implemented\r\n")
    assert s.sent() == b"HELO client.example\r\n"
    s.feed(b"250-server.example\r\n250 PIPELINING\r\n")
    assert s.sent() == b""
    assert lib.smtps_session_pipelining(s.ptr) == 0
    assert deliver(s)["status"] == "delivered"


@pytest.mark.parametrize("code, status", [(550, "permfail"), (450, "tempfail")])
def test_helo_refused_fails_the_connection(make, split, code, status):
    s = make()
    s.submit()                             # queued before the connection
    s.start()
    s.feed(BANNER)
    assert s.sent() == EHLO
    s.feed(b"500 what?\r\n")
    assert s.sent() == b"HELO client.example\r\n"
    s.feed(b"%d go away\r\n" % code)
    assert s.sent() == QUIT
    r = s.result()
    assert r["status"] == status
    assert "refused HELO" in r["reason"]
    assert r["rcpts"] == [(status, 0)]        # final: the message's fate
    assert s.pending() == 0
    assert s.try_submit()[1] == lib.SMTPS_ECLOSED
    s.feed(b"221 bye\r\n")
    assert s.sent() == b""
    assert s.status == "CLOSING"


def test_ehlo_tempfail_is_not_retried_with_helo(make, split):
    s = make()
    s.submit()
    s.start()
    s.feed(BANNER)
    assert s.sent() == EHLO
    s.feed(b"454 try later\r\n")
    assert s.sent() == QUIT
    r = s.result()
    assert r["status"] == "tempfail"
    assert "refused EHLO" in r["reason"]


# ---------------------------------------------------------------------------
# 3. The banner
# ---------------------------------------------------------------------------

def test_multiline_banner(make, split):
    s = make()
    s.start()
    s.feed(b"220-server.example ESMTP\r\n220-no UCE\r\n")
    assert s.sent() == b""
    s.feed(b"220 welcome\r\n")
    assert s.sent() == EHLO
    s.feed(PLAIN)
    assert s.status == "IDLE"


def test_banner_554_sends_only_quit(make, split):
    s = make()
    s.submit()
    s.start()
    s.feed(b"554-server.example\r\n554 no SMTP service here\r\n")
    assert s.sent() == QUIT
    r = s.result()
    assert r["status"] == "permfail"
    assert r["rcpts"] == [("permfail", 0)]
    s.feed(b"221 bye\r\n")
    assert s.sent() == b""
    assert s.status == "CLOSING"


def test_banner_421_closes_without_quit(make, split):
    s = make()
    s.submit()
    s.start()
    s.feed(b"421 4.3.2 busy, try later\r\n")
    assert s.sent() == b""
    assert s.status == "CLOSING"
    r = s.result()
    assert r["status"] == "tempfail"
    assert "421" in r["reason"]


# ---------------------------------------------------------------------------
# 4. PIPELINING
# ---------------------------------------------------------------------------

RCPTS3 = ["a@server.example", "b@server.example", "c@server.example"]
RCPT3_WIRE = lines("RCPT TO:<a@server.example>", "RCPT TO:<b@server.example>",
                   "RCPT TO:<c@server.example>")


def test_pipelining_batches_mail_rcpt_data(make, split):
    s = connected(make, PIPELINING)
    assert lib.smtps_session_pipelining(s.ptr) == 1
    s.submit(recipients=RCPTS3)
    # One chunk, before any reply: MAIL, every RCPT, DATA.
    assert s.pending_output() == MAIL + RCPT3_WIRE + b"DATA\r\n"
    assert s.sent() == MAIL + RCPT3_WIRE + b"DATA\r\n"
    s.feed(b"250 2.1.0 sender ok\r\n250 2.1.5 a ok\r\n")
    assert s.sent() == b""
    s.feed(b"550 5.1.1 b unknown\r\n250 2.1.5 c ok\r\n")
    assert s.sent() == b""
    s.feed(b"354 go\r\n")
    assert s.sent() == BODY + b".\r\n"
    s.feed(b"250 2.0.0 queued\r\n")
    assert s.sent() == b""
    r = s.result()
    assert r["status"] == "partial"           # not every recipient
    assert r["rcpts"] == [("delivered", 250), ("permfail", 550), ("delivered", 250)]
    assert s.status == "IDLE"


def test_pipelining_replies_in_one_read(make, split):
    s = connected(make, PIPELINING)
    s.submit(recipients=RCPTS3)
    assert s.sent() == MAIL + RCPT3_WIRE + b"DATA\r\n"
    s.feed(b"250 ok\r\n450 4.2.1 a later\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    assert s.sent() == BODY + b".\r\n"
    s.feed(b"250 ok\r\n")
    r = s.result()
    assert r["status"] == "partial"
    assert r["rcpts"] == [("tempfail", 450), ("delivered", 250), ("delivered", 250)]


@pytest.mark.parametrize("codes, status", [
    ((550, 551, 553), "permfail"),
    ((550, 450, 553), "tempfail"),
])
def test_pipelining_all_rcpt_refused_then_354(make, split, codes, status):
    """DATA went out in the batch; a 354 gets a lone dot, not the body."""
    s = connected(make, PIPELINING)
    s.submit(recipients=RCPTS3)
    assert s.sent() == MAIL + RCPT3_WIRE + b"DATA\r\n"
    s.feed(b"250 ok\r\n" + b"".join(b"%d no\r\n" % c for c in codes))
    assert s.sent() == b""
    s.feed(b"354 go ahead\r\n")
    assert s.sent() == b".\r\n"
    s.feed(b"554 5.5.1 no valid recipients\r\n")
    assert s.sent() == b""
    r = s.result()
    assert r["status"] == status
    assert "every recipient was refused" in r["reason"]
    assert r["rcpts"] == [("permfail" if c >= 500 else "tempfail", c) for c in codes]
    assert s.status == "IDLE"


def test_pipelining_all_rcpt_refused_then_rset_before_next(make, split):
    s = connected(make, PIPELINING)
    s.submit(recipients=RCPTS3)
    s.submit(recipients=["d@server.example"])
    assert s.sent() == MAIL + RCPT3_WIRE + b"DATA\r\n"
    s.feed(b"250 ok\r\n550 no\r\n550 no\r\n550 no\r\n354 go ahead\r\n")
    assert s.sent() == b".\r\n"
    s.feed(b"554 no valid recipients\r\n")
    assert s.sent() == b"RSET\r\n"
    assert s.result()["status"] == "permfail"
    s.feed(b"250 reset\r\n")
    assert s.sent() == MAIL + lines("RCPT TO:<d@server.example>", "DATA")
    s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert s.sent() == BODY + b".\r\n"
    s.feed(b"250 ok\r\n")
    r = s.result()
    assert (r["tag"], r["status"]) == (2, "delivered")


def test_pipelining_all_rcpt_refused_data_refused(make, split):
    """The usual server answers DATA with 554: nothing more to send."""
    s = connected(make, PIPELINING)
    s.submit()
    s.submit()
    assert s.sent() == MAIL + RCPT + b"DATA\r\n"
    s.feed(b"250 ok\r\n550 no\r\n")
    assert s.sent() == b""
    s.feed(b"554 5.5.1 no valid recipients\r\n")
    assert s.sent() == b"RSET\r\n"
    assert s.result()["status"] == "permfail"
    s.feed(b"250 ok\r\n")
    assert s.sent() == MAIL + RCPT + b"DATA\r\n"


def test_pipelining_mail_refused_drains_then_rset(make, split):
    s = connected(make, PIPELINING)
    s.submit(recipients=RCPTS3)
    s.submit()
    assert s.sent() == MAIL + RCPT3_WIRE + b"DATA\r\n"
    s.feed(b"550 5.7.1 sender refused\r\n")
    assert s.sent() == b""
    # The replies still owed to RCPT x3 and DATA are read and dropped.
    s.feed(b"503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n")
    assert s.sent() == b""
    s.feed(b"503 5.5.1 need RCPT\r\n")
    assert s.sent() == b"RSET\r\n"
    r = s.result()
    assert r["status"] == "permfail"
    assert (r["code"], r["enhanced"]) == (550, "5.7.1")
    assert r["stage_name"] == "sending MAIL FROM"
    # Refused at MAIL: every recipient shares the verdict, and its reply.
    assert r["rcpts"] == [("permfail", 550)] * 3
    s.feed(b"250 ok\r\n")
    assert s.sent() == MAIL + RCPT + b"DATA\r\n"
    s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert s.sent() == BODY + b".\r\n"
    s.feed(b"250 ok\r\n")
    assert s.result()["status"] == "delivered"


def test_pipelining_mail_tempfail_drains_354(make, split):
    """A server that answers DATA with 354 after refusing MAIL gets a dot."""
    s = connected(make, PIPELINING)
    s.submit()
    assert s.sent() == MAIL + RCPT + b"DATA\r\n"
    s.feed(b"451 4.3.0 try later\r\n503 no\r\n")
    assert s.sent() == b""
    s.feed(b"354 go\r\n")
    assert s.sent() == b".\r\n"
    s.feed(b"503 no\r\n")
    assert s.sent() == b""
    r = s.result()
    assert r["status"] == "tempfail"
    assert r["code"] == 451
    assert s.status == "IDLE"


def test_pipelining_submitted_before_ehlo(make, split):
    s = make()
    s.submit()
    s.start()
    s.feed(BANNER)
    assert s.sent() == EHLO
    s.feed(PIPELINING)
    assert s.sent() == MAIL + RCPT + b"DATA\r\n"


def test_pipelining_batch_bounded_by_output_window(make, split):
    """RCPTs stop at the 64 KiB output mark; DATA waits for the rest."""
    rcpts = ["r%04d@server.example" % i for i in range(3000)]
    wire = [b"RCPT TO:<%s>\r\n" % r.encode() for r in rcpts]
    s = connected(make, PIPELINING)
    s.submit(recipients=rcpts)
    first = MAIL
    k = 0
    while len(first) < 65536:              # the session's SMTPS_OUT_HIGH
        first += wire[k]
        k += 1
    assert s.sent() == first
    s.feed(b"250 ok\r\n" * k)             # MAIL and all but one RCPT
    assert s.sent() == b""
    s.feed(b"452 4.5.3 later\r\n")
    assert s.sent() == b"".join(wire[k:]) + b"DATA\r\n"
    s.feed(b"250 ok\r\n" * (3000 - k) + b"354 go\r\n")
    assert s.sent() == BODY + b".\r\n"
    s.feed(b"250 ok\r\n")
    r = s.result()
    assert r["status"] == "partial"
    assert r["rcpts"] == ([("delivered", 250)] * (k - 1) + [("tempfail", 452)]
                          + [("delivered", 250)] * (3000 - k))


def test_pipelining_multiline_replies(make, split):
    s = connected(make, PIPELINING)
    s.submit()
    assert s.sent() == MAIL + RCPT + b"DATA\r\n"
    s.feed(b"250-sender\r\n250 ok\r\n550-5.1.1 no such user\r\n550 5.1.1 really\r\n"
           b"554 no valid recipients\r\n")
    assert s.sent() == b""
    r = s.result()
    assert r["status"] == "permfail"
    assert r["rcpts"] == [("permfail", 550)]


def test_replies_with_bare_lf(make, split):
    s = connected(make)
    s.submit()
    assert s.sent() == MAIL
    s.feed(b"250 ok\n")
    assert s.sent() == RCPT
    s.feed(b"250-a\n250 b\n")
    assert s.sent() == b"DATA\r\n"
    s.feed(b"354 go\n")
    assert s.sent() == BODY + b".\r\n"
    s.feed(b"250 ok\n")
    assert s.result()["status"] == "delivered"


# ---------------------------------------------------------------------------
# 5. Without PIPELINING: one command per round trip
# ---------------------------------------------------------------------------

def test_no_pipelining_one_rcpt_per_round_trip(make, split):
    s = connected(make)
    s.submit(recipients=RCPTS3)
    assert s.sent() == MAIL
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"RCPT TO:<a@server.example>\r\n"
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"RCPT TO:<b@server.example>\r\n"
    s.feed(b"550 no\r\n")
    assert s.sent() == b"RCPT TO:<c@server.example>\r\n"
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"DATA\r\n"
    s.feed(b"354 go\r\n")
    assert s.sent() == BODY + b".\r\n"
    s.feed(b"250 ok\r\n")
    r = s.result()
    assert r["status"] == "partial"
    assert r["rcpts"] == [("delivered", 250), ("permfail", 550), ("delivered", 250)]


def test_no_pipelining_all_rcpt_refused_sends_no_data(make, split):
    s = connected(make)
    s.submit(recipients=RCPTS3[:2])
    s.submit()
    assert s.sent() == MAIL
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"RCPT TO:<a@server.example>\r\n"
    s.feed(b"550 no\r\n")
    assert s.sent() == b"RCPT TO:<b@server.example>\r\n"
    s.feed(b"550 no\r\n")
    assert s.sent() == b"RSET\r\n"
    r = s.result()
    assert r["status"] == "permfail"
    assert r["rcpts"] == [("permfail", 550), ("permfail", 550)]
    s.feed(b"250 ok\r\n")
    assert s.sent() == MAIL


# ---------------------------------------------------------------------------
# 6. Several messages on one connection
# ---------------------------------------------------------------------------

def test_three_messages_no_rset_after_delivery(make, split):
    s = connected(make)
    for _ in range(3):
        s.submit()
    s.quit()                                # after the queue
    for tag in (1, 2, 3):
        assert s.sent() == MAIL            # never RSET between deliveries
        s.feed(b"250 ok\r\n")
        assert s.sent() == RCPT
        s.feed(b"250 ok\r\n")
        assert s.sent() == b"DATA\r\n"
        s.feed(b"354 go\r\n")
        assert s.sent() == BODY + b".\r\n"
        s.feed(b"250 ok\r\n")
        r = s.result()
        assert (r["tag"], r["status"]) == (tag, "delivered")
    assert s.sent() == QUIT
    s.feed(b"221 bye\r\n")
    assert s.status == "CLOSING"


def test_rset_only_after_a_failed_transaction(make, split):
    s = connected(make)
    s.submit()
    s.submit()
    s.submit()
    assert s.sent() == MAIL
    s.feed(b"250 ok\r\n")
    assert s.sent() == RCPT
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"DATA\r\n"
    s.feed(b"354 go\r\n")
    assert s.sent() == BODY + b".\r\n"
    s.feed(b"250 ok\r\n")
    assert s.result()["status"] == "delivered"
    assert s.sent() == MAIL                # delivered: no RSET
    s.feed(b"250 ok\r\n")
    assert s.sent() == RCPT
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"DATA\r\n"
    s.feed(b"451 4.3.0 local problem\r\n")
    assert s.sent() == b"RSET\r\n"         # failed mid-transaction: RSET
    r = s.result()
    assert (r["tag"], r["status"], r["code"]) == (2, "tempfail", 451)
    assert r["rcpts"] == [("tempfail", 250)]   # DATA went out: the message's fate
    s.feed(b"250 ok\r\n")
    assert s.sent() == MAIL
    s.feed(b"250 ok\r\n")
    assert s.sent() == RCPT
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"DATA\r\n"
    s.feed(b"354 go\r\n")
    assert s.sent() == BODY + b".\r\n"
    s.feed(b"250 ok\r\n")
    assert s.result()["status"] == "delivered"
    assert s.status == "IDLE"


def test_final_dot_refused_needs_no_rset(make, split):
    """A 5xx to the final dot ends the transaction on the server too."""
    s = connected(make)
    s.submit()
    s.submit()
    assert s.sent() == MAIL
    s.feed(b"250 ok\r\n")
    assert s.sent() == RCPT
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"DATA\r\n"
    s.feed(b"354 go\r\n")
    assert s.sent() == BODY + b".\r\n"
    s.feed(b"554 5.7.1 spam\r\n")
    assert s.sent() == MAIL
    r = s.result()
    assert (r["status"], r["code"]) == ("permfail", 554)
    assert r["rcpts"] == [("permfail", 250)]


def test_rset_deferred_until_next_submit(make, split):
    """A failed transaction leaves the session IDLE without RSET; the RSET
    goes out only when another message comes."""
    s = connected(make)
    s.submit()
    assert s.sent() == MAIL
    s.feed(b"250 ok\r\n")
    assert s.sent() == RCPT
    s.feed(b"550 no\r\n")
    assert s.sent() == b""
    assert s.result()["status"] == "permfail"
    assert s.status == "IDLE"
    s.submit()
    assert s.sent() == b"RSET\r\n"
    s.feed(b"250 ok\r\n")
    assert s.sent() == MAIL


def test_rset_refused_fails_the_connection(make, split):
    s = connected(make)
    s.submit()
    s.submit()
    assert s.sent() == MAIL
    s.feed(b"451 later\r\n")
    assert s.sent() == b"RSET\r\n"
    s.feed(b"452 no\r\n")
    assert s.sent() == QUIT
    got = s.results()
    assert [(r["tag"], r["status"]) for r in got] == [(1, "tempfail"), (2, "tempfail")]
    assert "refused RSET" in got[1]["reason"]


def test_rset_refused_5xx_spares_the_queue(make, split):
    """After a transaction ran, a refused RSET says nothing final about the
    messages still queued: they were never tried."""
    s = connected(make)
    s.submit()
    s.submit()
    assert s.sent() == MAIL
    s.feed(b"550 no sender\r\n")
    assert s.sent() == b"RSET\r\n"
    s.feed(b"554 go away\r\n")
    assert s.sent() == QUIT
    got = s.results()
    assert [(r["tag"], r["status"]) for r in got] == [(1, "permfail"), (2, "tempfail")]
    assert got[1]["reason"].startswith("not attempted")


def test_quit_after_a_failed_transaction_sends_no_rset(make, split):
    s = connected(make)
    s.submit()
    assert s.sent() == MAIL
    s.feed(b"550 no\r\n")
    assert s.result()["status"] == "permfail"
    s.quit()
    assert s.sent() == QUIT
    s.feed(b"221 bye\r\n")
    assert s.status == "CLOSING"


# ---------------------------------------------------------------------------
# 7. CHUNKING
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("keywords", [("CHUNKING",), ("PIPELINING", "CHUNKING")])
def test_chunking_sends_one_bdat_last(make, split, keywords):
    s = connected(make, ehlo(*keywords))
    data = b".leading\nbare lf\rbare cr\r\n..x\r\nno newline"
    wire = b".leading\r\nbare lf\r\nbare cr\r\n..x\r\nno newline\r\n"
    s.submit(data=data)
    if "PIPELINING" in keywords:
        assert s.sent() == MAIL + RCPT
        s.feed(b"250 ok\r\n250 ok\r\n")
    else:
        assert s.sent() == MAIL
        s.feed(b"250 ok\r\n")
        assert s.sent() == RCPT
        s.feed(b"250 ok\r\n")
    assert s.sent() == b"BDAT %d LAST\r\n" % len(wire) + wire
    s.feed(b"250 2.0.0 queued\r\n")
    assert s.sent() == b""
    r = s.result()
    assert r["status"] == "delivered"
    assert r["state"] == "BODY"


@pytest.mark.parametrize("data, wire", [(b"", b""), (b"x", b"x\r\n"),
                                        (b".\r\n", b".\r\n")])
def test_chunking_edge_bodies(make, split, data, wire):
    s = connected(make, ehlo("CHUNKING"))
    s.submit(data=data)
    assert s.sent() == MAIL
    s.feed(b"250 ok\r\n")
    assert s.sent() == RCPT
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"BDAT %d LAST\r\n" % len(wire) + wire
    s.feed(b"250 ok\r\n")
    assert s.result()["status"] == "delivered"


def test_chunking_bdat_refused(make, split):
    s = connected(make, ehlo("CHUNKING"))
    s.submit()
    s.submit()
    assert s.sent() == MAIL
    s.feed(b"250 ok\r\n")
    assert s.sent() == RCPT
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"BDAT %d LAST\r\n" % len(BODY) + BODY
    s.feed(b"552 5.3.4 too big\r\n")
    assert s.sent() == MAIL                # the BDAT LAST reply ends it
    r = s.result()
    assert (r["status"], r["code"]) == ("permfail", 552)


# ---------------------------------------------------------------------------
# 8. SIZE, 8BITMIME, SMTPUTF8, DSN
# ---------------------------------------------------------------------------

def test_size_parameter_when_offered(make, split):
    s = connected(make, ehlo("SIZE 1000"))
    s.submit()
    assert s.sent() == b"MAIL FROM:<sender@client.example> SIZE=%d\r\n" % len(BODY)
    s.feed(b"250 ok\r\n")
    assert s.sent() == RCPT


def test_size_without_limit(make, split):
    s = connected(make, ehlo("SIZE"))
    s.submit(data=b"x\n" * 2499 + b"x")
    # RFC 1870: the octets sent; the unterminated last line gets its CRLF.
    assert s.sent() == b"MAIL FROM:<sender@client.example> SIZE=7500\r\n"


@pytest.mark.parametrize("data, size", [
    (b"a\nb\n", 6),                         # bare LF goes out as CRLF
    (b"a\rb\r\n", 6),                       # so does a bare CR
    (b".x\r\n..y\r\n", 9),                 # quoting dots are not counted
    (b"", 0),
    (b"no newline", 12),
])
def test_size_counts_the_octets_sent(make, split, data, size):
    """RFC 1870 3: CR LF pairs included, the doubled quoting dots and the
    final dot not: the size the server counts, checked and declared."""
    s = connected(make, ehlo("SIZE %d" % size))
    s.submit(data=data)
    assert s.sent() == b"MAIL FROM:<sender@client.example> SIZE=%d\r\n" % size
    if size == 0:
        return
    s2 = connected(make, ehlo("SIZE %d" % (size - 1)))
    s2.submit(data=data)
    assert s2.sent() == b""                   # one octet over: refused up front
    assert "SIZE limit" in s2.result()["reason"]


def test_too_big_for_size_fails_before_mail(make, split):
    s = connected(make, ehlo("SIZE 100"))
    s.submit(data=b"x" * 99)                   # 101 octets with its CRLF
    assert s.sent() == b""
    r = s.result()
    assert r["status"] == "permfail"
    assert "SIZE" in r["reason"]
    assert r["code"] == 0
    assert s.status == "IDLE"
    # Nothing was opened on the server: the next message needs no RSET.
    s.submit(data=b"x" * 98 + b"\r\n")
    assert s.sent() == b"MAIL FROM:<sender@client.example> SIZE=100\r\n"
    s.feed(b"250 ok\r\n")
    assert s.sent() == RCPT


def test_too_big_then_next_in_queue(make, split):
    s = connected(make, ehlo("PIPELINING", "SIZE 100"))
    s.submit(data=b"x" * 101)
    s.submit(data=b"y" * 98)
    assert s.sent() == b"MAIL FROM:<sender@client.example> SIZE=100\r\n" + RCPT + b"DATA\r\n"
    r = s.result()
    assert (r["tag"], r["status"]) == (1, "permfail")


def test_8bit_body_with_8bitmime(make, split):
    s = connected(make, ehlo("8BITMIME"))
    data = "Subject: caf\u00e9\r\n\r\n\u20ac\r\n".encode()
    s.submit(data=data)
    assert s.sent() == b"MAIL FROM:<sender@client.example> BODY=8BITMIME\r\n"
    s.feed(b"250 ok\r\n")
    assert s.sent() == RCPT
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"DATA\r\n"
    s.feed(b"354 go\r\n")
    assert s.sent() == data + b".\r\n"
    s.feed(b"250 ok\r\n")
    assert s.result()["status"] == "delivered"


def test_8bit_body_without_8bitmime_fails_before_mail(make, split):
    s = connected(make)
    s.submit(data=b"caf\xe9\r\n")
    assert s.sent() == b""
    r = s.result()
    assert r["status"] == "permfail"
    assert "8BITMIME" in r["reason"]
    assert r["rcpts"] == [("permfail", 0)]


def test_utf8_address_with_smtputf8(make, split):
    s = connected(make, ehlo("8BITMIME", "SMTPUTF8"))
    s.submit(sender="j\u00f6rg@client.example", recipients=["\u7528\u6237@server.example"])
    assert s.sent() == "MAIL FROM:<j\u00f6rg@client.example> SMTPUTF8\r\n".encode()
    s.feed(b"250 ok\r\n")
    assert s.sent() == "RCPT TO:<\u7528\u6237@server.example>\r\n".encode()


def test_utf8_address_without_smtputf8_fails_before_mail(make, split):
    s = connected(make, ehlo("8BITMIME"))
    s.submit(recipients=["\u7528\u6237@server.example"])
    assert s.sent() == b""
    r = s.result()
    assert r["status"] == "permfail"
    assert "SMTPUTF8" in r["reason"]


def test_all_mail_parameters_together(make, split):
    s = connected(make, ehlo("SIZE 100000", "8BITMIME", "SMTPUTF8", "DSN"))
    data = b"\xff\r\n"
    s.submit(sender="\u00fc@client.example", data=data, dsn_ret="FULL", envid="e1")
    assert s.sent() == ("MAIL FROM:<\u00fc@client.example> SIZE=3 BODY=8BITMIME"
                        " SMTPUTF8 RET=FULL ENVID=e1\r\n").encode()


DSN_RCPTS = [
    Recipient("a@server.example", notify=("SUCCESS", "FAILURE", "DELAY"),
              orcpt="orig+a=1@old.example"),
    Recipient("b@server.example", notify=("NEVER",)),
    Recipient("c@server.example", notify=("delay",)),
    Recipient("d@server.example", orcpt="d@old.example"),
    "e@server.example",
]


def test_dsn_parameters_when_offered(make, split):
    s = connected(make, ehlo("PIPELINING", "DSN"))
    s.submit(recipients=DSN_RCPTS, dsn_ret="HDRS", envid="id+1=x y")
    assert s.sent() == lines(
        "MAIL FROM:<sender@client.example> RET=HDRS ENVID=id+2B1+3Dx+20y",
        "RCPT TO:<a@server.example> NOTIFY=SUCCESS,FAILURE,DELAY"
        " ORCPT=rfc822;orig+2Ba+3D1@old.example",
        "RCPT TO:<b@server.example> NOTIFY=NEVER",
        "RCPT TO:<c@server.example> NOTIFY=DELAY",
        "RCPT TO:<d@server.example> ORCPT=rfc822;d@old.example",
        "RCPT TO:<e@server.example>",
        "DATA")


def test_dsn_parameters_not_offered(make, split):
    s = connected(make, PIPELINING)
    s.submit(recipients=DSN_RCPTS, dsn_ret="FULL", envid="id1")
    assert s.sent() == MAIL + lines(*("RCPT TO:<%s@server.example>" % c for c in "abcde"),
                                    "DATA")


# ---------------------------------------------------------------------------
# 9. Deadlines and lost connections
# ---------------------------------------------------------------------------

def test_deadline_after_mail(make, split):
    s = connected(make)
    s.submit()
    assert s.sent() == MAIL
    deadline = s.deadline
    assert deadline == T0 + lib.SMTPS_TIMEOUT_MAIL
    assert s.tick(deadline - 1) == lib.SMTPS_OK
    assert s.status == "ACTIVE"
    assert s.results() == []
    assert s.sent() == b""
    assert s.tick(deadline) == lib.SMTPS_OK
    assert s.status == "CLOSING"
    assert s.sent() == b""                 # no QUIT after a timeout
    r = s.result()
    assert r["status"] == "tempfail"
    assert "timeout" in r["reason"]
    assert r["stage_name"] == "sending MAIL FROM"
    assert "timeout" in s.reason


def test_deadline_late_tick(make, split):
    s = connected(make)
    s.submit()
    s.submit()
    assert s.sent() == MAIL
    s.tick(s.deadline + 12345)
    assert s.status == "CLOSING"
    assert [(r["tag"], r["status"]) for r in s.results()] == [(1, "tempfail"), (2, "tempfail")]
    assert s.sent() == b""


def test_trickled_reply_does_not_extend_the_deadline(make, split):
    s = connected(make)
    s.submit()
    assert s.sent() == MAIL
    deadline = s.deadline
    for i, byte in enumerate(b"250 2.1.0 O"):
        s.advance(20_000)
        s.feed(bytes([byte]))
        assert s.deadline == deadline, f"byte {i} moved the deadline"
    s.tick(deadline - 1)
    assert s.status == "ACTIVE"
    s.tick(deadline)
    assert s.status == "CLOSING"
    assert s.sent() == b""
    r = s.result()
    assert r["status"] == "tempfail"
    assert "timeout" in r["reason"]


def test_complete_reply_renews_the_deadline(make, split):
    s = connected(make)
    s.submit()
    assert s.sent() == MAIL
    s.advance(100_000)
    s.feed(b"250 ok\r\n")
    assert s.sent() == RCPT
    assert s.deadline == s.now + lib.SMTPS_TIMEOUT_RCPT


def test_banner_deadline(make, split):
    s = make()
    s.submit()
    s.start()
    assert s.deadline == T0 + lib.SMTPS_TIMEOUT_BANNER
    s.tick(s.deadline)
    assert s.status == "CLOSING"
    assert s.sent() == b""
    r = s.result()
    assert r["status"] == "tempfail"
    assert "timeout" in r["reason"]


def test_ehlo_421(make, split):
    s = make()
    s.submit()
    s.start()
    s.feed(BANNER)
    assert s.sent() == EHLO
    s.feed(b"421 4.7.0 too many connections\r\n")
    assert s.sent() == b""
    assert s.status == "CLOSING"
    assert s.result()["status"] == "tempfail"


def test_timeout_while_draining_keeps_the_decision(make, split):
    s = connected(make, PIPELINING)
    s.submit()
    s.submit()
    assert s.sent() == MAIL + RCPT + b"DATA\r\n"
    s.advance(1000)
    s.feed(b"550 5.7.1 no\r\n503 no\r\n")
    assert s.deadline == s.now + lib.SMTPS_TIMEOUT_MAIL
    s.tick(s.deadline)
    assert s.status == "CLOSING"
    assert s.sent() == b""
    got = s.results()
    assert [(r["tag"], r["status"]) for r in got] == [(1, "permfail"), (2, "tempfail")]
    assert got[0]["code"] == 550
    assert "timeout" in got[1]["reason"]


def test_per_state_timeouts(make, split):
    s = connected(make)
    s.set_timeout(lib.SMTPS_STATE_MAIL, 5000)
    s.set_timeout(lib.SMTPS_STATE_RCPT, 0)           # no deadline at all
    s.submit()
    assert s.sent() == MAIL
    assert s.deadline == s.now + 5000
    s.feed(b"250 ok\r\n")
    assert s.sent() == RCPT
    assert s.deadline == -1
    s.tick(s.now + 10 ** 9)
    assert s.status == "ACTIVE"
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"DATA\r\n"
    assert s.deadline == s.now + lib.SMTPS_TIMEOUT_DATA


def test_no_deadline_while_idle(make, split):
    s = connected(make)
    assert s.deadline == -1
    s.tick(T0 + 10 ** 9)
    assert s.status == "IDLE"


def _to_final_dot(s):
    """Submit one message (no pipelining) up to the final dot being queued."""
    s.submit()
    assert s.sent() == MAIL
    s.feed(b"250 ok\r\n")
    assert s.sent() == RCPT
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"DATA\r\n"
    s.feed(b"354 go\r\n")
    assert s.pending_output() == BODY + b".\r\n"


def test_timeout_after_final_dot_is_unknown(make, split):
    s = connected(make)
    _to_final_dot(s)
    assert s.sent() == BODY + b".\r\n"
    assert s.deadline == s.now + lib.SMTPS_TIMEOUT_FINAL
    s.feed(b"25")                          # a partial reply changes nothing
    s.tick(s.deadline - 1)
    assert s.results() == []
    s.tick(s.deadline)
    assert s.status == "CLOSING"
    assert s.sent() == b""
    r = s.result()
    assert r["status"] == "unknown"
    assert "timeout" in r["reason"]
    assert r["stage_name"] == "reading final confirmation"


def test_final_deadline_starts_with_the_last_byte(make, split):
    s = connected(make)
    _to_final_dot(s)
    wire = BODY + b".\r\n"
    for i in range(len(wire) - 1):
        s.advance(1)
        assert s.consume(1) == wire[i:i + 1]
        assert s.deadline == s.now + lib.SMTPS_TIMEOUT_BLOCK
    s.advance(1)
    assert s.consume(1) == b"\n"
    assert s.deadline == s.now + lib.SMTPS_TIMEOUT_FINAL


def test_timeout_before_the_dot_was_taken_is_tempfail(make, split):
    s = connected(make)
    _to_final_dot(s)                       # queued, never written
    assert s.deadline == s.now + lib.SMTPS_TIMEOUT_BLOCK
    s.tick(s.deadline)
    assert s.status == "CLOSING"
    r = s.result()
    assert r["status"] == "tempfail"
    assert "timeout" in r["reason"]


def test_closed_after_final_dot_is_unknown(make, split):
    s = connected(make)
    _to_final_dot(s)
    assert s.sent() == BODY + b".\r\n"
    s.closed("connection reset by peer")
    r = s.result()
    assert r["status"] == "unknown"
    assert "reset by peer" in r["reason"]
    assert s.status == "CLOSED"


@pytest.mark.parametrize("unsent", [len(BODY) + 3, 3, 1])
def test_closed_before_final_dot_is_tempfail(make, split, unsent):
    s = connected(make)
    _to_final_dot(s)
    wire = BODY + b".\r\n"
    assert s.consume(len(wire) - unsent) == wire[:len(wire) - unsent]
    s.closed("broken pipe")
    r = s.result()
    assert r["status"] == "tempfail"
    assert "broken pipe" in r["reason"]


def test_closed_while_idle_with_queue(make, split):
    s = make()
    s.submit()
    s.submit()
    s.start()
    s.feed(BANNER)
    assert s.sent() == EHLO
    s.closed("eof")
    assert [(r["tag"], r["status"]) for r in s.results()] == [(1, "tempfail"), (2, "tempfail")]


def test_body_deadline_while_sending(make, split):
    """While the body is still being written, the per-block deadline runs
    (RFC 5321 4.5.3.2.5); taking output renews it."""
    s = connected(make)
    s.submit(data=(b"x" * 98 + b"\r\n") * 2000)
    assert s.sent() == MAIL
    s.feed(b"250 ok\r\n")
    assert s.sent() == RCPT
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"DATA\r\n"
    s.feed(b"354 go\r\n")
    assert s.deadline == s.now + lib.SMTPS_TIMEOUT_BLOCK
    s.advance(100_000)
    assert len(s.consume(1000)) == 1000
    assert s.deadline == s.now + lib.SMTPS_TIMEOUT_BLOCK
    s.tick(s.deadline)
    assert s.status == "CLOSING"
    r = s.result()
    assert r["status"] == "tempfail"
    assert "timeout" in r["reason"]
    assert r["stage_name"] == "sending message body"


def test_body_block_deadline_honours_a_shorter_timeout(make, split):
    """A caller's 2 s deadline for BODY also bounds each block of the body:
    a server that stops reading cannot hold the connection for 3 minutes."""
    s = connected(make)
    s.set_timeout(lib.SMTPS_STATE_BODY, 2000)
    s.submit(data=(b"x" * 98 + b"\r\n") * 2000)
    assert s.sent() == MAIL
    s.feed(b"250 ok\r\n")
    assert s.sent() == RCPT
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"DATA\r\n"
    s.feed(b"354 go\r\n")
    assert s.deadline == s.now + 2000
    s.tick(s.now + 2000)
    assert s.status == "CLOSING"
    assert s.result()["status"] == "tempfail"


# ---------------------------------------------------------------------------
# 10. 421, unsolicited and malformed replies
# ---------------------------------------------------------------------------

def test_421_to_rcpt(make, split):
    s = connected(make)
    s.submit()
    s.submit()
    assert s.sent() == MAIL
    s.feed(b"250 ok\r\n")
    assert s.sent() == RCPT
    s.feed(b"421 4.4.2 shutting down\r\n")
    assert s.sent() == b""                 # no QUIT after 421
    assert s.status == "CLOSING"
    got = s.results()
    assert [(r["tag"], r["status"]) for r in got] == [(1, "tempfail"), (2, "tempfail")]
    assert got[0]["code"] == 421


def test_421_in_pipelined_batch(make, split):
    s = connected(make, PIPELINING)
    s.submit(recipients=RCPTS3)
    assert s.sent() == MAIL + RCPT3_WIRE + b"DATA\r\n"
    s.feed(b"250 ok\r\n250 ok\r\n421 4.3.2 bye\r\n")
    assert s.sent() == b""
    assert s.status == "CLOSING"
    r = s.result()
    assert (r["status"], r["code"]) == ("tempfail", 421)


def test_421_to_mail_while_draining(make, split):
    s = connected(make, PIPELINING)
    s.submit(recipients=RCPTS3)
    assert s.sent() == MAIL + RCPT3_WIRE + b"DATA\r\n"
    s.feed(b"550 no\r\n503 no\r\n421 4.3.2 bye\r\n")
    assert s.sent() == b""
    assert s.status == "CLOSING"
    r = s.result()
    assert (r["status"], r["code"]) == ("permfail", 550)


def test_421_to_final_dot(make, split):
    s = connected(make)
    _to_final_dot(s)
    assert s.sent() == BODY + b".\r\n"
    s.feed(b"421 4.3.0 going down\r\n")
    assert s.sent() == b""
    assert s.status == "CLOSING"
    r = s.result()
    assert (r["status"], r["code"]) == ("tempfail", 421)


@pytest.mark.parametrize("reply", [b"250 what?\r\n", b"421 4.4.2 idle timeout\r\n"])
def test_reply_while_idle_fails_the_connection(make, split, reply):
    s = connected(make)
    s.feed(reply)
    assert s.sent() == b""
    assert s.status == "CLOSING"
    assert s.try_submit()[1] == lib.SMTPS_ECLOSED
    if reply.startswith(b"250"):
        assert "nobody asked for" in s.reason
    else:
        assert "421" in s.reason


@pytest.mark.parametrize("reply, what", [(b"250 ok\r\n", "DATA"),
                                         (b"334 VXNlcm5hbWU6\r\n", "DATA")])
def test_unexpected_reply_to_data(make, split, reply, what):
    """A reply that makes no sense for the command ends the connection."""
    s = connected(make)
    s.submit()
    s.submit()
    assert s.sent() == MAIL
    s.feed(b"250 ok\r\n")
    assert s.sent() == RCPT
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"DATA\r\n"
    s.feed(reply)
    assert s.sent() == QUIT
    got = s.results()
    assert [(r["tag"], r["status"]) for r in got] == [(1, "tempfail"), (2, "tempfail")]
    assert "unexpected reply %s to %s" % (reply[:3].decode(), what) in got[0]["reason"]
    s.feed(b"221 bye\r\n")
    assert s.status == "CLOSING"


def test_unexpected_3xx_to_mail(make, split):
    s = connected(make)
    s.submit()
    assert s.sent() == MAIL
    s.feed(b"354 what\r\n")
    assert s.sent() == QUIT
    r = s.result()
    assert r["status"] == "tempfail"
    assert "unexpected reply 354 to MAIL FROM" in r["reason"]


@pytest.mark.parametrize("bad", [b"2x0 bad\r\n", b"250-a\r\n251 b\r\n",
                                 b"25\r\n", b"600 nope\r\n", b"250 a\x00b\r\n"])
def test_malformed_reply(make, split, bad):
    s = connected(make)
    s.submit()
    assert s.sent() == MAIL
    s.feed(bad)
    assert s.sent() == b""
    assert s.status == "CLOSING"
    r = s.result()
    assert r["status"] == "tempfail"
    assert "malformed" in r["reason"]
    assert "malformed" in s.reason


def test_overlong_reply_line(make, split):
    s = connected(make)
    s.submit()
    assert s.sent() == MAIL
    s.feed(b"250 " + b"x" * 3000 + b"\r\n")
    assert s.status == "CLOSING"
    assert s.sent() == b""
    r = s.result()
    assert r["status"] == "tempfail"
    assert "malformed" in r["reason"]


def test_bytes_after_the_end_are_ignored(make, split):
    s = connected(make)
    s.feed(b"421 bye\r\n")
    assert s.status == "CLOSING"
    s.feed(b"250 late\r\n")
    assert s.status == "CLOSING"
    assert s.sent() == b""
    s.closed("eof")
    assert s.feed(b"250 later\r\n", split="whole") == lib.SMTPS_ECLOSED


def test_malformed_banner(make, split):
    s = make()
    s.submit()
    s.start()
    s.feed(b"SSH-2.0-OpenSSH_9.2\r\n")
    assert s.sent() == b""
    assert s.status == "CLOSING"
    r = s.result()
    assert r["status"] == "tempfail"
    assert "malformed" in r["reason"]


# ---------------------------------------------------------------------------
# 11. A reply before the body was fully written
# ---------------------------------------------------------------------------

BIG = b"line of text\r\n" * 10_000          # 140 000 bytes, more than 64 KiB


def test_reply_before_end_of_body_is_a_failure(make, split):
    s = connected(make)
    s.submit(data=BIG)
    s.submit()
    assert s.sent() == MAIL
    s.feed(b"250 ok\r\n")
    assert s.sent() == RCPT
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"DATA\r\n"
    s.feed(b"354 go\r\n")
    queued = s.pending_output()
    assert 0 < len(queued) < len(BIG)       # not all of it produced yet
    assert BIG.startswith(queued)
    s.feed(b"250 ok\r\n")                   # the server did not wait for the dot
    assert s.status == "CLOSING"
    got = s.results()
    assert [(r["tag"], r["status"]) for r in got] == [(1, "tempfail"), (2, "tempfail")]
    assert "before the end of the message data" in got[0]["reason"]
    # Nothing more leaves: no QUIT in the middle of the message data, and
    # not the rest of the body either, which would end in the final dot.
    assert s.sent() == b""


def test_early_5xx_during_body_spares_the_queue(make, split):
    """An early 5xx refuses this message; the queued one was never tried."""
    s = connected(make)
    s.submit(data=BIG)
    s.submit()
    assert s.sent() == MAIL
    s.feed(b"250 ok\r\n")
    assert s.sent() == RCPT
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"DATA\r\n"
    s.feed(b"354 go\r\n")
    queued = s.pending_output()
    s.feed(b"552 5.3.4 message too big\r\n")
    assert s.status == "CLOSING"
    got = s.results()
    assert [(r["tag"], r["status"]) for r in got] == [(1, "permfail"), (2, "tempfail")]
    assert got[0]["code"] == 552
    assert "not attempted" in got[1]["reason"]
    assert queued and s.sent() == b""             # the rest is never sent


def test_reply_before_the_dot_was_taken_is_a_failure(make, split):
    """The whole (small) body is queued but the driver has not sent it: a
    reply now cannot be the answer to the final dot."""
    s = connected(make)
    s.submit()
    s.submit()
    assert s.sent() == MAIL
    s.feed(b"250 ok\r\n")
    assert s.sent() == RCPT
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"DATA\r\n"
    s.feed(b"354 go\r\n")
    assert s.pending_output() == BODY + b".\r\n"     # produced, not taken
    s.feed(b"250 ok\r\n")
    assert s.status == "CLOSING"
    got = s.results()
    assert [(r["tag"], r["status"]) for r in got] == [(1, "tempfail"), (2, "tempfail")]
    assert "before the end of the message data" in got[0]["reason"]
    # Neither QUIT nor the queued body and its dot: sent now, the dot would
    # deliver the message this result calls a failure.
    assert s.sent() == b""


def test_big_body_streams_whole(make, split):
    s = connected(make, PIPELINING)
    s.submit(data=BIG)
    assert s.sent() == MAIL + RCPT + b"DATA\r\n"
    s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert s.sent() == BIG + b".\r\n"
    s.feed(b"250 ok\r\n")
    assert s.result()["status"] == "delivered"


# ---------------------------------------------------------------------------
# 12. Every message gets exactly one result
# ---------------------------------------------------------------------------

def test_quit_before_start_fails_the_queue(make, split):
    s = make()
    s.submit()
    s.quit()
    assert s.status == "CLOSED"
    r = s.result()
    assert r["status"] == "tempfail"


def test_submit_after_quit_is_refused(make, split):
    s = connected(make)
    s.quit()
    assert s.sent() == QUIT
    assert s.try_submit()[1] == lib.SMTPS_ECLOSED


def test_closed_mid_pipeline_gives_every_result(make, split):
    s = connected(make, PIPELINING)
    for _ in range(4):
        s.submit(recipients=RCPTS3)
    assert s.sent() == MAIL + RCPT3_WIRE + b"DATA\r\n"
    s.feed(b"250 ok\r\n250 ok\r\n")
    s.closed("eof")
    got = s.results()
    assert [(r["tag"], r["status"]) for r in got] == [(t, "tempfail") for t in (1, 2, 3, 4)]
    # An accepted recipient shares the message's fate; so do the others,
    # which never had a reply: every status is final.
    assert got[0]["rcpts"] == [("tempfail", 250), ("tempfail", 0), ("tempfail", 0)]
    assert got[0]["stage_name"] == "sending RCPT TO"
    assert got[1]["stage_name"] == "not connected"


def test_closed_before_any_pipelined_reply(make, split):
    s = connected(make, PIPELINING)
    s.submit()
    assert s.sent() == MAIL + RCPT + b"DATA\r\n"
    s.closed("eof")
    r = s.result()
    assert r["status"] == "tempfail"
    assert r["state"] == "MAIL"             # the oldest command still owed a reply
    assert r["stage_name"] == "sending MAIL FROM"
    assert r["rcpts"] == [("tempfail", 0)]


def test_accepted_recipient_when_data_never_sent(make, split):
    s = connected(make)
    s.submit(recipients=RCPTS3[:2])
    assert s.sent() == MAIL
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"RCPT TO:<a@server.example>\r\n"
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"RCPT TO:<b@server.example>\r\n"
    s.closed("eof")
    r = s.result()
    assert r["status"] == "tempfail"
    # Final, both: the accepted one shares the message's failure.
    assert r["rcpts"] == [("tempfail", 250), ("tempfail", 0)]
    assert r["stage_name"] == "sending RCPT TO"


# ---------------------------------------------------------------------------
# 16. Final statuses: one funnel decides them, and only final ones come out
# ---------------------------------------------------------------------------

def test_lone_dot_never_follows_an_accepted_recipient(make, split):
    """RCPT 250, then a 353 to the next RCPT (a protocol error), then 354
    to the pipelined DATA: a lone dot would make the server deliver an
    empty message to the accepted recipient, and a retry would deliver it
    twice. The connection closes instead, without the dot."""
    s = connected(make, PIPELINING)
    s.submit(recipients=RCPTS3[:2])
    assert s.sent() == MAIL + lines("RCPT TO:<a@server.example>",
                                    "RCPT TO:<b@server.example>", "DATA")
    s.feed(b"250 ok\r\n250 ok\r\n353 what\r\n")
    assert s.sent() == b""                    # still owed: DATA's reply
    s.feed(b"354 go ahead\r\n")
    assert s.sent() == b""                    # no dot, no QUIT
    assert s.status == "CLOSING"
    r = s.result()
    assert r["status"] == "tempfail"
    assert r["rcpts"] == [("tempfail", 250), ("tempfail", 353)]
    assert b"." not in b"".join(d for who, d in s.wire if who == "C").split(b"DATA\r\n")[1]


def test_lone_dot_still_answers_354_when_nobody_was_accepted(make, split):
    """With no recipient accepted, the dot delivers nothing: it keeps the
    server in step, and the connection goes on."""
    s = connected(make, PIPELINING)
    s.submit(recipients=RCPTS3[:2])
    s.sent()
    s.feed(b"250 ok\r\n550 no\r\n353 what\r\n")
    s.feed(b"354 go ahead\r\n")
    assert s.sent() == b".\r\n"
    s.feed(b"554 no valid recipients\r\n")
    assert s.sent() == QUIT
    assert s.result()["rcpts"] == [("permfail", 550), ("tempfail", 353)]


def test_lone_dot_never_follows_a_recipient_reply_left_unread(make, split):
    """The first RCPT's 353 fails the connection, so the second RCPT's
    reply is read and dropped: it was 250, and the server holds an
    accepted recipient we never counted. The 354 to the pipelined DATA
    must not be answered with a lone dot, which would deliver an empty
    message to it."""
    s = connected(make, PIPELINING)
    s.submit(recipients=RCPTS3[:2])
    assert s.sent() == MAIL + lines("RCPT TO:<a@server.example>",
                                    "RCPT TO:<b@server.example>", "DATA")
    s.feed(b"250 ok\r\n353 what\r\n250 ok\r\n")
    assert s.sent() == b""
    s.feed(b"354 go ahead\r\n")
    assert s.sent() == b""                    # no dot, no QUIT
    assert s.status == "CLOSING"
    r = s.result()
    assert r["status"] == "tempfail"
    assert r["rcpts"][0] == ("tempfail", 353)


def test_refused_at_mail_fails_every_recipient(make, split):
    s = connected(make)
    s.submit(recipients=RCPTS3)
    assert s.sent() == MAIL
    s.feed(b"550 5.7.1 go away\r\n")
    r = s.result()
    assert r["status"] == "permfail"
    assert r["rcpts"] == [("permfail", 550)] * 3        # never "pending"


def test_accepted_then_421_fails_the_accepted_one_too(make, split):
    s = connected(make)
    s.submit(recipients=RCPTS3[:2])
    assert s.sent() == MAIL
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"RCPT TO:<a@server.example>\r\n"
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"RCPT TO:<b@server.example>\r\n"
    s.feed(b"421 4.3.2 shutting down\r\n")
    assert s.sent() == b""                    # 421: closed without QUIT
    r = s.result()
    assert r["status"] == "tempfail"
    assert r["rcpts"] == [("tempfail", 250), ("tempfail", 421)]   # never "accepted"


def test_rcpt_3xx_is_a_protocol_error_everywhere(make, split):
    s = connected(make)
    s.submit()
    s.sent()
    s.feed(b"250 ok\r\n")
    assert s.sent() == RCPT
    s.feed(b"354 what\r\n")
    assert s.sent() == QUIT
    r = s.result()
    assert r["status"] == "tempfail" and "unexpected reply 354 to RCPT TO" in s.reason
    assert r["rcpts"] == [("tempfail", 354)]


def test_idle_session_deadline_counts_from_the_submit(make, split):
    """A message submitted long after the last event: its deadline counts
    from the submit, not from that event (a pooled connection idle for
    longer than the timeout must not fail its next message at once)."""
    s = connected(make)
    for sid in range(lib.SMTPS_STATE__COUNT):
        s.set_timeout(sid, 1000)
    assert deliver(s)["status"] == "delivered"
    s.advance(1400)
    s.submit()
    assert s.deadline == s.now + 1000
    assert s.tick() == lib.SMTPS_OK and s.status == "ACTIVE"
    assert s.sent() == MAIL
    s.feed(b"250 ok\r\n")
    assert s.sent() == RCPT


def test_quit_on_idle_session_counts_from_the_quit(make, split):
    s = connected(make)
    s.set_timeout(lib.SMTPS_STATE_QUIT, 1000)
    s.advance(5000)
    s.quit()
    assert s.deadline == s.now + 1000
    assert s.sent() == QUIT


# ---------------------------------------------------------------------------
# 17. Messages refused before a command is sent
# ---------------------------------------------------------------------------

def test_many_messages_refused_before_mail_each_get_their_result(make, split):
    """1100 queued 8-bit messages and a server without 8BITMIME: MAIL's
    setup refuses each one before anything is sent, and RSET (nothing to
    reset) goes on to the next. That is progress, not a loop of states
    that wait for nothing: every message gets its own permfail, the 1001st
    too, and the connection ends with QUIT."""
    n = 1100
    s = make()
    for _ in range(n):
        s.submit(data=b"Subject: caf\xc3\xa9\r\n\r\ncaf\xc3\xa9\r\n")
    s.start()
    s.feed(BANNER)
    assert s.sent() == EHLO
    s.feed(PLAIN)
    results = s.results()
    assert len(results) == n
    assert {r["status"] for r in results} == {"permfail"}
    assert all("8BITMIME" in r["reason"] for r in results)
    s.quit()
    assert s.sent() == QUIT
