"""Exact protocol tests for LMTP (RFC 2033): the C session against a
scripted server in memory, as ``test_protocol.py`` does for SMTP.

What LMTP changes, and what these scenarios pin down byte by byte:

* the greeting is ``LHLO``, whose reply lists the extensions as EHLO's
  does; a refused LHLO never falls back to HELO;
* the end of data (the final dot, or ``BDAT ... LAST``) is answered once
  per recipient accepted at RCPT, in RCPT order, and each of those
  replies is that recipient's final status and reply; the message's
  status comes from its recipients (``partial`` when some were
  delivered);
* a connection lost (or timed out) half-way through those replies
  leaves the recipients already answered as they were and the others
  ``unknown``;
* a drained 354 never gets a lone dot.

Every scenario runs with the server's bytes fed whole and one byte at a
time, and every session is closed at teardown with exactly one result
per submitted message. (That an LMTP session never starts the next
message behind a final dot, which only the engine asks for, is checked
in C: ``tests/c/test_lmtp.c``.)
"""

from __future__ import annotations

import pytest

from smtpstate._core import ffi, lib

from scripted import SPLITS, ScriptedSession, crlf_lines as lines

pytestmark = pytest.mark.parametrize("split", SPLITS)

T0 = 1_000_000

BANNER = b"220 lmtp.example LMTP ready\r\n"
LHLO = b"LHLO client.example\r\n"
MAIL = b"MAIL FROM:<sender@client.example>\r\n"
BODY = b"Subject: hi\r\n\r\nhello\r\n"
QUIT = b"QUIT\r\n"
RCPTS3 = ["a@server.example", "b@server.example", "c@server.example"]
RCPT3_WIRE = lines(*("RCPT TO:<%s>" % r for r in RCPTS3))


def lhlo_reply(*keywords: str) -> bytes:
    """A 250 LHLO reply offering these extensions."""
    out = [b"250-lmtp.example\r\n" if keywords else b"250 lmtp.example\r\n"]
    for i, kw in enumerate(keywords):
        sep = b" " if i == len(keywords) - 1 else b"-"
        out.append(b"250" + sep + kw.encode() + b"\r\n")
    return b"".join(out)


@pytest.fixture
def make(split):
    """make() -> an LMTP ScriptedSession fed the ``split`` way, finished
    (closed, nothing lost) at teardown."""
    made = []

    def factory():
        s = ScriptedSession(split=split, now=T0)
        assert s.set_protocol("lmtp") == lib.SMTPS_OK
        made.append(s)
        return s

    yield factory
    for s in made:
        s.finish()


def connected(make, *keywords: str) -> ScriptedSession:
    """An LMTP session through the greeting and LHLO, IDLE."""
    s = make()
    s.start()
    assert s.sent() == b""
    s.feed(BANNER)
    assert s.sent() == LHLO
    s.feed(lhlo_reply(*keywords))
    assert s.sent() == b""
    assert s.status == "IDLE"
    return s


def to_final_dot(s: ScriptedSession, recipients=RCPTS3, rcpt_replies=None) -> None:
    """Pipelined MAIL, RCPT and DATA, their replies, and the body with its
    dot taken by the driver."""
    rcpt_replies = rcpt_replies or [b"250 2.1.5 ok\r\n"] * len(recipients)
    s.submit(recipients=list(recipients))
    assert s.sent() == MAIL + lines(*("RCPT TO:<%s>" % r for r in recipients)) + b"DATA\r\n"
    s.feed(b"250 2.1.0 sender ok\r\n" + b"".join(rcpt_replies))
    assert s.sent() == b""
    s.feed(b"354 go ahead\r\n")
    assert s.sent() == BODY + b".\r\n"


# ---------------------------------------------------------------------------
# The greeting
# ---------------------------------------------------------------------------

def test_lhlo_instead_of_ehlo_and_its_extensions(make, split):
    s = connected(make, "PIPELINING", "8BITMIME", "SIZE 1000000", "ENHANCEDSTATUSCODES")
    assert lib.smtps_session_protocol(s.ptr) == lib.SMTPS_PROTO_LMTP
    assert lib.smtps_session_pipelining(s.ptr) == 1
    caps = lib.smtps_session_caps(s.ptr)
    assert caps.ext & lib.SMTPS_EXT_8BITMIME
    assert caps.size_max == 1000000
    s.submit()
    # PIPELINING and SIZE from the LHLO reply are used.
    assert s.sent() == (b"MAIL FROM:<sender@client.example> SIZE=%d\r\n" % len(BODY)
                        + b"RCPT TO:<rcpt@server.example>\r\nDATA\r\n")


@pytest.mark.parametrize("code, status", [(500, "permfail"), (550, "permfail"),
                                          (451, "tempfail")])
def test_refused_lhlo_never_falls_back_to_helo(make, split, code, status):
    s = make()
    s.submit()
    s.start()
    s.feed(BANNER)
    assert s.sent() == LHLO
    s.feed(b"%d 5.5.1 no\r\n" % code)
    assert s.sent() == QUIT                # no HELO, no EHLO
    r = s.result()
    assert r["status"] == status
    assert "refused LHLO" in r["reason"]
    assert r["stage_name"] == "sending EHLO"
    assert r["rcpts"] == [(status, 0)]
    assert s.try_submit()[1] == lib.SMTPS_ECLOSED
    s.feed(b"221 bye\r\n")
    assert s.status == "CLOSING"


def test_lhlo_protocol_error(make, split):
    s = make()
    s.submit()
    s.start()
    s.feed(BANNER)
    assert s.sent() == LHLO
    s.feed(b"354 what\r\n")
    assert s.sent() == QUIT
    r = s.result()
    assert r["status"] == "tempfail"
    assert "unexpected reply 354 to LHLO" in r["reason"]


def test_protocol_is_set_before_the_start_only(make, split):
    s = make()
    assert s.set_protocol("smtp") == lib.SMTPS_OK
    assert s.set_protocol("nonsense") == lib.SMTPS_EINVAL
    assert lib.smtps_session_set_protocol(s.ptr, lib.SMTPS_PROTO__COUNT) == lib.SMTPS_EINVAL
    assert lib.smtps_session_set_protocol(ffi.NULL, lib.SMTPS_PROTO_LMTP) == lib.SMTPS_EINVAL
    assert lib.smtps_session_protocol(s.ptr) == lib.SMTPS_PROTO_SMTP
    assert s.set_protocol("lmtp") == lib.SMTPS_OK
    s.start()
    assert s.set_protocol("smtp") == lib.SMTPS_ESTATE
    assert lib.smtps_session_protocol(s.ptr) == lib.SMTPS_PROTO_LMTP
    s.feed(BANNER)
    assert s.sent() == LHLO                # still LMTP


def test_protocol_names_come_from_c(make, split):
    names = {i: ffi.string(lib.smtps_protocol_name(i)).decode()
             for i in range(lib.SMTPS_PROTO__COUNT)}
    assert names == {lib.SMTPS_PROTO_SMTP: "smtp", lib.SMTPS_PROTO_LMTP: "lmtp"}
    assert lib.smtps_protocol_name(-1) == ffi.NULL
    assert lib.smtps_protocol_name(lib.SMTPS_PROTO__COUNT) == ffi.NULL


# ---------------------------------------------------------------------------
# One reply per accepted recipient after the data
# ---------------------------------------------------------------------------

def test_every_recipient_delivered(make, split):
    s = connected(make, "PIPELINING")
    to_final_dot(s)
    s.submit()                             # waits for the last reply
    assert s.sent() == b""
    assert s.deadline == s.now + lib.SMTPS_TIMEOUT_FINAL
    s.advance(1000)
    s.feed(b"250 2.1.5 <a@server.example> delivered\r\n")
    assert s.results() == []               # two replies still owed
    assert s.sent() == b""
    assert s.deadline == s.now + lib.SMTPS_TIMEOUT_FINAL   # per reply
    s.advance(1000)
    s.feed(b"250 2.1.5 <b@server.example> delivered\r\n")
    assert s.results() == []
    assert s.deadline == s.now + lib.SMTPS_TIMEOUT_FINAL
    s.feed(b"250 2.1.5 <c@server.example> delivered\r\n")
    # The second message starts at once, with no RSET.
    assert s.sent() == MAIL + b"RCPT TO:<rcpt@server.example>\r\nDATA\r\n"
    r = s.result()
    assert r["tag"] == 1
    assert r["status"] == "delivered"
    assert r["state"] == "BODY"
    assert r["stage_name"] == "reading final confirmation"
    assert r["rcpts"] == [("delivered", 250)] * 3
    # Each recipient's reply is its own reply to the end of data.
    assert r["rcpt_texts"] == ["2.1.5 <%s> delivered" % a for a in RCPTS3]
    assert (r["code"], r["text"]) == (250, "2.1.5 <a@server.example> delivered")
    s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert s.sent() == BODY + b".\r\n"
    s.feed(b"250 2.0.0 one recipient, one reply\r\n")
    r = s.result()
    assert (r["tag"], r["status"], r["rcpts"]) == (2, "delivered", [("delivered", 250)])


def test_mixed_replies_make_a_partial_delivery(make, split):
    s = connected(make, "PIPELINING")
    rcpts = RCPTS3 + ["d@server.example"]
    # b is refused at RCPT: the server owes replies for a, c and d only.
    to_final_dot(s, rcpts, [b"250 ok\r\n", b"550 5.1.1 b unknown\r\n", b"250 ok\r\n",
                            b"250 ok\r\n"])
    s.submit()
    s.feed(b"250 2.0.0 a ok\r\n552 5.2.2 c over quota\r\n")
    assert s.results() == []
    s.feed(b"451 4.3.0 d later\r\n")
    assert s.sent() == MAIL + b"RCPT TO:<rcpt@server.example>\r\nDATA\r\n"   # no RSET
    r = s.result()
    assert r["status"] == "partial"
    assert r["rcpts"] == [("delivered", 250), ("permfail", 550), ("permfail", 552),
                          ("tempfail", 451)]
    assert r["rcpt_texts"] == ["2.0.0 a ok", "5.1.1 b unknown", "5.2.2 c over quota",
                               "4.3.0 d later"]
    assert r["code"] == 250                 # the first delivery's reply
    s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert s.sent() == BODY + b".\r\n"
    s.feed(b"250 ok\r\n")
    assert s.result()["status"] == "delivered"


@pytest.mark.parametrize("replies, status, code", [
    ((b"550 5.1.1 no\r\n", b"451 4.2.0 later\r\n", b"552 5.2.2 full\r\n"), "tempfail", 451),
    ((b"550 5.1.1 no\r\n", b"554 5.7.1 spam\r\n", b"552 5.2.2 full\r\n"), "permfail", 550),
])
def test_no_recipient_delivered(make, split, replies, status, code):
    s = connected(make, "PIPELINING")
    to_final_dot(s)
    s.submit()
    s.feed(b"".join(replies))
    assert s.sent() == MAIL + b"RCPT TO:<rcpt@server.example>\r\nDATA\r\n"   # no RSET
    r = s.result()
    assert r["status"] == status
    assert r["code"] == code               # the first reply of the deciding kind
    assert r["rcpts"] == [("permfail" if c.startswith(b"5") else "tempfail", int(c[:3]))
                          for c in replies]
    s.closed()


def test_without_pipelining(make, split):
    s = connected(make)
    s.submit(recipients=RCPTS3[:2])
    assert s.sent() == MAIL
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"RCPT TO:<a@server.example>\r\n"
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"RCPT TO:<b@server.example>\r\n"
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"DATA\r\n"
    s.feed(b"354 go\r\n")
    assert s.sent() == BODY + b".\r\n"
    s.feed(b"250 a\r\n")
    assert s.results() == []
    s.feed(b"452 4.2.2 b full\r\n")
    r = s.result()
    assert r["status"] == "partial"
    assert r["rcpts"] == [("delivered", 250), ("tempfail", 452)]
    assert s.status == "IDLE"


def test_bdat_last_with_chunking(make, split):
    s = connected(make, "PIPELINING", "CHUNKING")
    s.submit(recipients=RCPTS3)
    assert s.sent() == MAIL + RCPT3_WIRE
    s.feed(b"250 ok\r\n250 ok\r\n451 4.2.1 b later\r\n250 ok\r\n")
    assert s.sent() == b"BDAT %d LAST\r\n" % len(BODY) + BODY
    s.feed(b"250 2.0.0 a\r\n")
    assert s.results() == []
    s.feed(b"250 2.0.0 c\r\n")
    r = s.result()
    assert r["status"] == "partial"
    assert r["rcpts"] == [("delivered", 250), ("tempfail", 451), ("delivered", 250)]
    assert r["rcpt_texts"] == ["2.0.0 a", "4.2.1 b later", "2.0.0 c"]
    assert s.status == "IDLE"


# ---------------------------------------------------------------------------
# The connection ends half-way through the replies
# ---------------------------------------------------------------------------

def test_lost_after_the_second_of_three_replies(make, split):
    s = connected(make, "PIPELINING")
    to_final_dot(s)
    s.feed(b"250 2.0.0 a ok\r\n550 5.2.1 b disabled\r\n")
    assert s.results() == []
    s.closed("connection reset by peer")
    r = s.result()
    assert r["status"] == "partial"        # a has it; c may
    assert r["rcpts"] == [("delivered", 250), ("permfail", 550), ("unknown", 250)]
    assert r["rcpt_texts"][:2] == ["2.0.0 a ok", "5.2.1 b disabled"]
    assert "2 of its 3 replies" in r["reason"]
    assert "reset by peer" in r["reason"]


def test_lost_with_nobody_delivered_is_unknown(make, split):
    s = connected(make, "PIPELINING")
    to_final_dot(s)
    s.feed(b"451 4.2.0 a later\r\n")
    s.closed("broken pipe")
    r = s.result()
    assert r["status"] == "unknown"
    assert r["rcpts"] == [("tempfail", 451), ("unknown", 250), ("unknown", 250)]
    assert "1 of its 3 replies" in r["reason"]


def test_lost_before_any_reply(make, split):
    s = connected(make, "PIPELINING")
    to_final_dot(s)
    s.closed("broken pipe")
    r = s.result()
    assert r["status"] == "unknown"
    assert r["rcpts"] == [("unknown", 250)] * 3


def test_timeout_after_the_second_of_three_replies(make, split):
    s = connected(make, "PIPELINING")
    to_final_dot(s)
    s.feed(b"250 a\r\n")
    s.advance(10_000)
    s.feed(b"250 b\r\n")
    assert s.deadline == s.now + lib.SMTPS_TIMEOUT_FINAL
    s.feed(b"25")                          # a partial reply changes nothing
    s.tick(s.deadline - 1)
    assert s.results() == []
    s.tick(s.deadline)
    assert s.status == "CLOSING"
    assert s.sent() == b""                 # no QUIT after a timeout
    r = s.result()
    assert r["status"] == "partial"
    assert r["rcpts"] == [("delivered", 250), ("delivered", 250), ("unknown", 250)]
    assert "timeout" in r["reason"]


def test_per_reply_deadline_is_the_final_timeout_set(make, split):
    s = connected(make, "PIPELINING")
    s.set_timeout(lib.SMTPS_STATE_BODY, 7000)
    to_final_dot(s)
    assert s.deadline == s.now + 7000
    s.advance(6000)
    s.feed(b"250 a\r\n")
    assert s.deadline == s.now + 7000
    s.advance(6000)
    s.feed(b"250 b\r\n")
    s.advance(6999)
    s.tick()
    assert s.results() == []
    s.advance(1)
    s.tick()
    r = s.result()
    assert r["rcpts"] == [("delivered", 250), ("delivered", 250), ("unknown", 250)]


def test_421_among_the_replies(make, split):
    s = connected(make, "PIPELINING")
    to_final_dot(s)
    s.submit()
    s.feed(b"250 2.0.0 a ok\r\n421 4.3.2 shutting down\r\n")
    assert s.sent() == b""                 # closing: no QUIT
    assert s.status == "CLOSING"
    got = s.results()
    assert [(r["tag"], r["status"]) for r in got] == [(1, "partial"), (2, "tempfail")]
    assert got[0]["rcpts"] == [("delivered", 250), ("tempfail", 421), ("unknown", 250)]
    assert got[1]["reason"].startswith("not attempted")


def test_421_as_the_last_reply(make, split):
    s = connected(make, "PIPELINING")
    to_final_dot(s, RCPTS3[:2])
    s.feed(b"250 a\r\n421 4.3.2 bye\r\n")
    assert s.sent() == b""
    assert s.status == "CLOSING"
    r = s.result()
    assert r["status"] == "partial"
    assert r["rcpts"] == [("delivered", 250), ("tempfail", 421)]


def test_protocol_error_among_the_replies(make, split):
    s = connected(make, "PIPELINING")
    to_final_dot(s)
    s.feed(b"250 a\r\n354 what\r\n")
    r = s.result()
    assert r["status"] == "partial"
    assert r["rcpts"] == [("delivered", 250), ("tempfail", 354), ("unknown", 250)]
    assert "unexpected reply 354 to the end of data" in r["reason"]
    assert s.sent() == b""                 # c's reply is read (and dropped) first
    s.feed(b"250 c\r\n")
    assert s.sent() == QUIT
    s.feed(b"221 bye\r\n")
    assert s.status == "CLOSING"


def test_replies_before_the_dot_was_taken_fail(make, split):
    s = connected(make, "PIPELINING")
    s.submit()
    assert s.sent() == MAIL + b"RCPT TO:<rcpt@server.example>\r\nDATA\r\n"
    s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert s.consume(3) == BODY[:3]
    s.feed(b"250 too early\r\n")
    assert s.status == "CLOSING"
    r = s.result()
    assert r["status"] == "tempfail"
    assert "before the end of the message data" in r["reason"]


# ---------------------------------------------------------------------------
# Draining never sends a lone dot
# ---------------------------------------------------------------------------

def test_drained_354_closes_instead_of_a_lone_dot(make, split):
    s = connected(make, "PIPELINING")
    s.submit(recipients=RCPTS3[:2])
    assert s.sent() == MAIL + lines("RCPT TO:<a@server.example>",
                                    "RCPT TO:<b@server.example>", "DATA")
    s.feed(b"250 ok\r\n550 no\r\n550 no\r\n")
    assert s.sent() == b""
    s.feed(b"354 go ahead\r\n")            # RFC 2033 says 503 here
    assert s.sent() == b""                 # no lone dot: nobody would answer it
    assert s.status == "CLOSING"
    r = s.result()
    assert r["status"] == "permfail"
    assert r["rcpts"] == [("permfail", 550), ("permfail", 550)]


def test_all_refused_then_503_to_data(make, split):
    s = connected(make, "PIPELINING")
    s.submit()
    s.submit()
    assert s.sent() == MAIL + b"RCPT TO:<rcpt@server.example>\r\nDATA\r\n"
    s.feed(b"250 ok\r\n550 5.1.1 no\r\n503 5.5.1 no valid recipients\r\n")
    assert s.sent() == b"RSET\r\n"
    assert s.result()["status"] == "permfail"
    s.feed(b"250 ok\r\n")
    assert s.sent() == MAIL + b"RCPT TO:<rcpt@server.example>\r\nDATA\r\n"
