"""What a relay answers its own client: ``Result.smtp_reply()`` for every
status, and the RFC 3463 enhanced codes of failures decided here
(``Result.enhanced``, ``RecipientResult.enhanced``), by every driver,
against real servers (aiosmtpd) and scripted ones (hostile.py) for what a
real server will not do on purpose (go silent, vanish after the dot)."""

from __future__ import annotations

import socket
from typing import Any, Iterator

import pytest

import smtpstate
from smtpstate import Client, Engine, Message, Recipient, Reply, classify
from smtpstate.result import RecipientResult, Result, local_enhanced, unsent_result

from helpers import RecordingHandler
from hostile import DRIVERS, Servers, close, deliver, greet, serve

SENDER = "sender@client.test"
BODY = b"Subject: relay\r\n\r\nhello\r\n"


class VerdictHandler(RecordingHandler):
    """RCPT verdicts by local part: ``ok*`` 250, ``bad*`` 550 5.1.1,
    ``later*`` 450 4.2.1; DATA refused with 554 5.6.0 when the subject says
    ``reject``."""

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("bad"):
            return "550 5.1.1 <%s>: no such user" % address
        if address.startswith("later"):
            return "450 4.2.1 <%s>: mailbox busy, try later" % address
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if b"Subject: reject" in envelope.original_content:
            return "554 5.6.0 content refused"
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def verdicts(aiosmtpd_factory):
    return aiosmtpd_factory(VerdictHandler())


@pytest.fixture
def hostile() -> Iterator[Servers]:
    servers = Servers()
    yield servers
    servers.stop()


def send(server: Any, *recipients: str, data: bytes = BODY, **kw: Any) -> Result:
    with Client(server.host, server.port, timeout=10, **kw) as client:
        return client.send(Message(SENDER, list(recipients), data))


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


# -- replies that came from a server --------------------------------------------


def test_delivered_is_250(verdicts):
    r = send(verdicts, "ok1@example.test", "ok2@example.test")
    assert r.status == "delivered"
    assert r.smtp_reply() == Reply(250, "2.0.0", "Ok: delivered")
    assert r.enhanced == "" and all(x.enhanced == "" for x in r.recipients)
    assert [x.smtp_reply(r).code for x in r.recipients] == [250, 250]


def test_partial_is_250_and_each_recipient_says_its_own(verdicts):
    r = send(verdicts, "ok@example.test", "bad@example.test", "later@example.test")
    assert r.status == "partial"
    assert r.smtp_reply() == Reply(250, "2.0.0", "Ok: delivered to 1 of 3 recipients")
    ok, bad, later = (x.smtp_reply(r) for x in r.recipients)
    assert ok.code == 250
    assert (bad.code, bad.enhanced, bad.text) == (550, "5.1.1",
                                                    "<bad@example.test>: no such user")
    assert (later.code, later.enhanced) == (451, "4.2.1")     # a 4xx is answered 451
    assert r.enhanced == "" and all(x.enhanced == "" for x in r.recipients)


def test_every_recipient_refused_for_good_gives_the_downstream_refusal(verdicts):
    r = send(verdicts, "bad1@example.test", "bad2@example.test")
    assert r.status == "permfail"
    reply = r.smtp_reply()
    assert (reply.code, reply.enhanced) == (550, "5.1.1")
    assert r.reply is not None and r.reply.code == 550      # the one that decided it
    assert reply.text == r.reply.text.split(" ", 1)[1]      # "<bad2@...>: no such user"
    assert reply.text.endswith("@example.test>: no such user")
    assert not reply.text.startswith("5.1.1")               # no prefix in the text
    assert r.enhanced == ""                                 # a reply decided it


def test_refused_after_data_gives_that_reply(verdicts):
    r = send(verdicts, "ok@example.test", data=b"Subject: reject\r\n\r\nno\r\n")
    assert r.status == "permfail"
    assert r.smtp_reply() == Reply(554, "5.6.0", "content refused")
    assert r.recipients[0].smtp_reply(r) == Reply(554, "5.6.0", "content refused")


def test_anything_temporary_is_451(verdicts):
    r = send(verdicts, "later1@example.test", "later2@example.test")
    assert r.status == "tempfail"
    reply = r.smtp_reply()
    assert (reply.code, reply.enhanced) == (451, "4.2.1")
    assert "mailbox busy" in reply.text
    # Some refused for good, others for now, none delivered: still 451,
    # since the client may yet deliver to those; with the 4xx's words.
    for order in (("bad@example.test", "later@example.test"),
                  ("later@example.test", "bad@example.test")):
        mixed = send(verdicts, *order)
        assert mixed.status == "tempfail", mixed
        reply = mixed.smtp_reply()
        assert (reply.code, reply.enhanced) == (451, "4.2.1"), reply
        assert reply.text == "<later@example.test>: mailbox busy, try later"


# -- failures decided here -------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
def test_refused_connection_is_451_4_4_1(driver):
    port = free_port()
    (r,) = deliver(driver, [Message(SENDER, ["a@example.test", "b@example.test"], BODY)],
                   ("127.0.0.1", port), timeout=5)
    assert r.status == "tempfail" and r.reply is None, r
    assert r.enhanced == "4.4.1", r
    assert [x.enhanced for x in r.recipients] == ["4.4.1", "4.4.1"]
    reply = r.smtp_reply()
    assert (reply.code, reply.enhanced) == (451, "4.4.1")
    assert "connect" in reply.text.lower()
    assert r.recipients[1].smtp_reply(r) == Reply(451, "4.4.1", r.reason)


@pytest.mark.parametrize("driver", DRIVERS)
def test_no_reply_in_time_is_451_4_4_2(hostile, driver):
    server = hostile([greet(), serve({"RCPT": None})])      # RCPT never answered
    (r,) = deliver(driver, [Message(SENDER, ["a@example.test"], BODY)], server, timeout=1)
    assert r.status == "tempfail" and r.reply is None, r
    assert "timeout" in r.reason
    assert r.enhanced == "4.4.2" and r.recipients[0].enhanced == "4.4.2"
    assert r.smtp_reply() == Reply(451, "4.4.2", r.reason)
    assert r.bounce_class == classify.TIMEOUT


@pytest.mark.parametrize("driver", DRIVERS)
def test_lost_after_the_final_dot_is_unknown_and_451(hostile, driver):
    server = hostile([greet(), serve({".": lambda conn, line: [close()]})], drain=False)
    (r,) = deliver(driver, [Message(SENDER, ["a@example.test"], BODY)], server, timeout=5)
    assert r.status == "unknown", r
    assert r.enhanced == "4.4.2" and r.recipients[0].enhanced == "4.4.2"
    reply = r.smtp_reply()
    assert (reply.code, reply.enhanced) == (451, "4.4.2")
    assert reply.text.startswith("delivery unknown: ")
    assert r.recipients[0].smtp_reply(r).code == 451


def test_too_big_for_the_server_is_552_5_3_4(aiosmtpd_factory):
    server = aiosmtpd_factory(data_size_limit=100)
    with Client(server.host, server.port, timeout=10, keep_transcript=True) as client:
        r = client.send(Message(SENDER, ["a@example.test"], BODY + b"x" * 200 + b"\r\n"))
        sent = b"".join(d for who, d in client.transcript if who == "C")
    assert r.status == "permfail" and r.reply is None
    assert b"MAIL FROM" not in sent                       # refused before MAIL
    assert r.stage_code == smtpstate.Stage.BEFORE_MAIL == 25
    assert r.stage == "before MAIL FROM (nothing sent)"
    assert r.enhanced == "5.3.4" and r.recipients[0].enhanced == "5.3.4"
    assert r.bounce_class == classify.TOO_LARGE
    assert r.smtp_reply() == Reply(552, "5.3.4", r.reason)


@pytest.mark.parametrize("driver", DRIVERS)
def test_smtputf8_not_offered_is_553_5_6_7_before_mail(aiosmtpd_factory, driver):
    server = aiosmtpd_factory(enable_SMTPUTF8=False)
    (r,) = deliver(driver, [Message(SENDER, ["j\u00f6rg@example.test"], BODY)],
                   (server.host, server.port), timeout=10)
    assert r.status == "permfail" and r.reply is None, r
    # Nothing was sent: not "after MAIL FROM", and not an act of ours.
    assert r.stage_code == 25 and r.state == "MAIL"
    assert r.bounce_class == classify.GENERIC_BOUNCE
    assert r.enhanced == "5.6.7" and r.recipients[0].enhanced == "5.6.7"
    assert r.smtp_reply() == Reply(553, "5.6.7", r.reason)
    assert not any(b"MAIL FROM" in c.received for c in server.connections)


def test_requiretls_refusal_keeps_its_own_code():
    assert local_enhanced("permfail", "5.7.30 REQUIRETLS support required (RFC 8689): "
                          "no TLS") == "5.7.30"
    assert local_enhanced("permfail", "not attempted: 5.1.10 example.test accepts "
                          "no mail") == "5.1.10"
    m = Message(SENDER, ["a@example.test"], BODY, require_tls=True)
    r = unsent_result(m, None, "permfail", "5.7.30 REQUIRETLS support required (RFC 8689): "
                      "the connection is not encrypted (no TLS)")
    assert r.smtp_reply() == Reply(550, "5.7.30", "REQUIRETLS support required (RFC 8689): "
                                   "the connection is not encrypted (no TLS)")
    assert r.smtp_reply().as_smtp().startswith("550 5.7.30 REQUIRETLS support")


@pytest.mark.parametrize("status,reason,code", [
    ("tempfail", "connect to a[192.0.2.1]:25: timed out", "4.4.1"),
    ("tempfail", "connect to a[192.0.2.1]:25: No route to host", "4.4.1"),
    ("tempfail", "cannot connect to 192.0.2.1:25: [Errno 111] Connection refused", "4.4.1"),
    ("tempfail", "not attempted: timeout: no reply in state BANNER", "4.4.2"),
    ("tempfail", "connection lost: the server closed the connection", "4.4.2"),
    ("unknown", "connection lost after the final dot", "4.4.2"),
    ("tempfail", "4.4.3 cannot resolve the MX host of example.test: timed out", "4.4.3"),
    ("tempfail", "no MX host of example.test has an address: mx: timed out", "4.4.3"),
    ("tempfail", "delivery time expired", "4.4.7"),
    ("permfail", "message of 500 bytes exceeds the server's SIZE limit of 100", "5.3.4"),
    ("permfail", "a non-ASCII address needs SMTPUTF8, which the server does not offer",
     "5.6.7"),
    ("permfail", "8-bit content needs 8BITMIME, which the server does not offer", "5.6.3"),
    ("tempfail", "TLS is required, but the server does not offer STARTTLS", "4.7.4"),
    ("tempfail", "TLS handshake failed: certificate verify failed (certificate has expired)",
     "4.7.5"),
    ("permfail", "a state said no", "5.0.0"),
    ("tempfail", "state check could not start: out of memory", "4.3.0"),
    ("delivered", "", ""),
    ("partial", "", ""),
])
def test_local_codes_table(status, reason, code):
    assert local_enhanced(status, reason) == code


def test_results_made_in_python_get_codes_too():
    m = Message(SENDER, ["a@example.test", "b@example.test"], BODY)
    r = unsent_result(m, None, "tempfail", "cannot connect to x:25: [Errno 111] refused")
    assert r.enhanced == "4.4.1"
    assert [x.enhanced for x in r.recipients] == ["4.4.1", "4.4.1"]
    # A recipient that failed by its own reply keeps that, not a local code.
    r = Result("tempfail", None, (RecipientResult("a@x", "tempfail",
                                                  Reply(450, "4.2.1", "busy")),),
               "after RCPT TO", 5, "RCPT", reason="every recipient was refused")
    assert r.recipients[0].enhanced == ""
    assert r.smtp_reply() == Reply(451, "4.2.1", "busy")


def test_as_smtp_formats_and_bounds_lines():
    assert Reply(451, "4.4.1", "a\nb").as_smtp() == "451-4.4.1 a\r\n451 4.4.1 b"
    assert Reply(250, "", "ok").as_smtp() == "250 ok"
    assert Reply(550, "5.1.1", "x\r\ty").as_smtp() == "550 5.1.1 x  y"
    long = Reply(451, "4.4.2", "\u00e9" * 600).as_smtp()
    assert len(long.encode("utf-8")) + 2 <= 512
    long.encode("utf-8").decode("utf-8")                   # not cut inside a character


# -- routed by MX: parts joined, recipients that had no route -----------------------


def test_routed_message_codes_survive_the_join(dns_server, dns_origin, mx_servers):
    from smtpstate import Resolver
    resolver = Resolver([dns_server.address], hosts_file=False, timeout=2, attempts=2)
    a, b = "127.0.0.2", "127.0.0.3"
    mx = mx_servers([a, b], {b: "rcpt_550"})
    o = dns_origin
    dns_server.add_zone(o, [r.format(o=o) for r in (
        "a MX 10 mx1", "c MX 10 mx2", f"mx1 A {a}", f"mx2 A {b}")])
    x, y, w = f"x@a.{o}", f"y@c.{o}", f"w@nowhere.{o}"
    (result,) = smtpstate.deliver([Message(SENDER, [x, y, w], BODY)], port=mx.port,
                                  resolver=resolver)
    assert result.status == "partial", result
    rx, ry, rw = result.recipients
    assert (rx.enhanced, ry.enhanced) == ("", "")          # delivered; refused by a reply
    assert rw.reply is None and rw.enhanced == "5.1.2", rw  # NXDOMAIN: no such system
    assert result.enhanced == ""
    assert result.smtp_reply().code == 250
    assert rw.smtp_reply(result) == Reply(550, "5.1.2", result.reason[len("5.1.2 "):])
    assert result.reason.startswith("5.1.2 ")         # the code is not said twice
    assert ry.smtp_reply(result).enhanced == ry.reply.enhanced
    # A message none of whose recipients can be routed.
    (lost,) = smtpstate.deliver([Message(SENDER, [w], BODY)], port=mx.port,
                                resolver=resolver)
    assert lost.status == "permfail" and lost.enhanced == "5.1.2", lost
    assert lost.smtp_reply() == Reply(550, "5.1.2", lost.reason[len("5.1.2 "):])
