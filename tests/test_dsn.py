"""Delivery status notifications (smtpstate.dsn) built from real Results:
an aiosmtpd server answers each RCPT 250, 550 or 450, and the DSN is
parsed back with the standard library's email package and read field by
field (RFC 3464, RFC 3461 NOTIFY/RET/ENVID/ORCPT, RFC 6533 for UTF-8)."""

from __future__ import annotations

import email
import email.policy
import email.utils
from typing import Any, Dict, List

import pytest

from smtpstate import Client, Engine, InvalidMessageError, Message, Recipient, dsn

from test_relay_replies import VerdictHandler

SENDER = "alice@client.test"
BODY = (b"From: Alice <alice@client.test>\r\nTo: many@example.test\r\n"
        b"Subject: quarterly report\r\nMessage-ID: <q1@client.test>\r\n\r\n"
        b"The figures are in.\r\n")


@pytest.fixture
def verdicts(aiosmtpd_factory):
    return aiosmtpd_factory(VerdictHandler())


def deliver(server: Any, message: Message) -> Any:
    with Client(server.host, server.port, timeout=10) as client:
        return client.send(message)


def mixed(**kw: Any) -> Message:
    return Message(SENDER, [
        Recipient("ok@example.test", notify=("SUCCESS", "FAILURE")),
        Recipient("bad@example.test", orcpt="Bad.Person@old.example.test"),
        Recipient("later@example.test", notify=("DELAY", "FAILURE")),
        "ok-quiet@example.test",                 # delivered, NOTIFY not given: silent
    ], BODY, envid="QR-2026-0042", **kw)


def parse(report: Any) -> Any:
    """The DSN as bytes, then parsed back by the email package."""
    raw = report.as_bytes()
    assert b"\r\n" in raw
    return email.message_from_bytes(raw, policy=email.policy.default)


def fields(block: Any) -> Dict[str, str]:
    return {k.lower(): str(v) for k, v in block.items()}


def status_blocks(part: Any) -> List[Dict[str, str]]:
    """The per-message block and each recipient's, of a
    message/delivery-status part (the email package parses it into blocks),
    or of RFC 6533's global one (plain text: parsed here, block by block,
    by the email package too)."""
    if part.get_content_type() == "message/delivery-status":
        return [fields(b) for b in part.get_payload()]
    raw = part.get_payload(decode=True) if not part.is_multipart() else None
    if raw is None:                     # parsed as an embedded message
        raw = part.get_payload(0).as_bytes()
    text = raw.decode("utf-8").replace("\r\n", "\n")
    return [fields(email.message_from_string(chunk + "\n", policy=email.policy.default))
            for chunk in text.strip("\n").split("\n\n")]


def test_dsn_for_delivered_failed_and_delayed_recipients(verdicts):
    message = mixed(dsn_ret="HDRS")
    result = deliver(verdicts, message)
    assert [r.status for r in result.recipients] == ["delivered", "permfail", "tempfail",
                                                      "delivered"]
    arrival = email.utils.parsedate_to_datetime("Mon, 07 Dec 2026 10:00:00 +0000")
    report = dsn.build(result, message, reporting_mta="relay.example.net",
                       arrival_date=arrival, received_from_mta="client.test")
    got = parse(report)

    # The envelope of a report: to the sender, from the mailer daemon.
    assert got["To"] == SENDER
    assert got["From"].addresses[0].addr_spec == "MAILER-DAEMON@relay.example.net"
    assert got["Subject"] == "Undelivered Mail Returned to Sender"
    assert got["Auto-Submitted"] == "auto-replied"
    assert got.get_content_type() == "multipart/report"
    assert got.get_param("report-type") == "delivery-status"
    human, status, returned = got.get_payload()
    assert human.get_content_type() == "text/plain"
    text = human.get_content()
    assert "<bad@example.test>" in text and "<later@example.test>" in text
    assert "ok-quiet" not in text

    assert status.get_content_type() == "message/delivery-status"
    per_message, *rcpts = status_blocks(status)
    assert per_message == {
        "reporting-mta": "dns; relay.example.net",
        "original-envelope-id": "QR-2026-0042",
        "received-from-mta": "dns; client.test",
        "arrival-date": "Mon, 07 Dec 2026 10:00:00 +0000",
    }
    by_rcpt = {r["final-recipient"]: r for r in rcpts}
    assert list(by_rcpt) == ["rfc822; ok@example.test", "rfc822; bad@example.test",
                             "rfc822; later@example.test"]       # ok-quiet: not asked
    ok = by_rcpt["rfc822; ok@example.test"]
    assert ok["action"] == "relayed" and ok["status"] == "2.0.0"
    bad = by_rcpt["rfc822; bad@example.test"]
    assert bad["action"] == "failed"
    assert bad["status"] == "5.1.1"
    assert bad["original-recipient"] == "rfc822; Bad.Person@old.example.test"
    assert bad["diagnostic-code"] == "smtp; 550 5.1.1 <bad@example.test>: no such user"
    assert bad["remote-mta"] == f"dns; {verdicts.host}"                # the Client's host
    email.utils.parsedate_to_datetime(bad["last-attempt-date"])         # a date
    later = by_rcpt["rfc822; later@example.test"]
    assert later["action"] == "delayed" and later["status"] == "4.2.1"
    assert later["diagnostic-code"].startswith("smtp; 450 4.2.1 <later@example.test>")
    assert "original-recipient" not in later

    # RET=HDRS: the header section only, as text/rfc822-headers.
    assert returned.get_content_type() == "text/rfc822-headers"
    headers = returned.get_content()
    assert "Subject: quarterly report" in headers
    assert "Message-ID: <q1@client.test>" in headers
    assert "The figures are in." not in headers


def test_ret_full_returns_the_whole_message(verdicts):
    message = mixed(dsn_ret="FULL")
    result = deliver(verdicts, message)
    got = parse(dsn.build(result, message, reporting_mta="relay.example.net"))
    returned = got.get_payload()[2]
    assert returned.get_content_type() == "message/rfc822"
    inner = returned.get_payload(0)
    assert inner["Subject"] == "quarterly report"
    assert inner.get_content().replace("\r\n", "\n") == "The figures are in.\n"
    # ret= overrides the message's RET.
    got = parse(dsn.build(result, message, reporting_mta="relay.example.net", ret="HDRS"))
    assert got.get_payload()[2].get_content_type() == "text/rfc822-headers"


def test_non_ascii_recipient_gets_a_global_report_with_utf8_addresses(verdicts):
    message = Message(SENDER, [Recipient("bad-j\u00f6rg@example.test",
                                         orcpt="j\u00f6rg@alt.example.test"),
                               "later@example.test"],
                      BODY.replace(b"quarterly report", "r\u00e9sum\u00e9".encode()),
                      dsn_ret="FULL")
    result = deliver(verdicts, message)
    assert result.status == "permfail" or result.status == "tempfail", result
    report = dsn.build(result, message, reporting_mta="relay.example.net")
    got = parse(report)
    assert got.get_param("report-type") == "global-delivery-status"
    human, status, returned = got.get_payload()
    assert status.get_content_type() == "message/global-delivery-status"
    per_message, bad, later = status_blocks(status)
    assert "original-envelope-id" not in per_message                 # none given
    assert bad["final-recipient"] == "utf-8; bad-j\u00f6rg@example.test"
    assert bad["original-recipient"] == "utf-8; j\u00f6rg@alt.example.test"
    assert bad["action"] == "failed" and bad["status"] == "5.1.1"
    assert later["final-recipient"] == "rfc822; later@example.test"
    assert later["action"] == "delayed"
    assert returned.get_content_type() == "message/global"
    assert "r\u00e9sum\u00e9".encode() in returned.as_bytes()


def test_give_up_reports_temporary_failures_as_failed(verdicts):
    message = Message(SENDER, ["later@example.test"], BODY)
    result = deliver(verdicts, message)
    assert result.status == "tempfail"
    got = parse(dsn.build(result, message, reporting_mta="relay.example.net",
                          give_up=True))
    (_, rcpt) = status_blocks(got.get_payload()[1])
    assert rcpt["action"] == "failed" and rcpt["status"] == "4.2.1"
    delayed = parse(dsn.build(result, message, reporting_mta="relay.example.net"))
    assert delayed["Subject"] == "Delayed Mail (still being retried)"


def test_local_failure_gets_its_enhanced_code_and_no_smtp_diagnostic():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    message = Message(SENDER, ["a@example.test"], BODY)
    with Engine(connect_timeout=5) as engine:
        ticket = engine.submit(message, "127.0.0.1", port)
        list(engine.run(timeout=30))
    result = ticket.result
    assert result.status == "tempfail"
    got = parse(dsn.build(result, message, reporting_mta="relay.example.net",
                          give_up=True))
    (_, rcpt) = status_blocks(got.get_payload()[1])
    assert rcpt["status"] == "4.4.1" and rcpt["action"] == "failed"
    assert rcpt["diagnostic-code"].startswith("X-smtpstate; connect to 127.0.0.1")


def test_nothing_to_report(verdicts):
    message = Message(SENDER, [Recipient("bad@example.test", notify=("NEVER",)),
                               "ok@example.test"], BODY)
    result = deliver(verdicts, message)
    assert dsn.build(result, message, reporting_mta="relay.example.net") is None
    bounce = Message("", ["bad@example.test"], BODY)           # a bounce itself
    result = deliver(verdicts, bounce)
    assert result.status == "permfail"
    assert dsn.build(result, bounce, reporting_mta="relay.example.net") is None


def test_the_dsn_can_be_sent_with_a_null_reverse_path(verdicts, aiosmtpd_server):
    message = Message(SENDER, ["bad@example.test"], BODY, envid="E1")
    result = deliver(verdicts, message)
    report = dsn.build(result, message, reporting_mta="relay.example.net")
    with Client(aiosmtpd_server.host, aiosmtpd_server.port, timeout=10) as client:
        sent = client.send(Message.from_email(report, sender="", recipients=[SENDER]))
    assert sent.ok, sent
    (got,) = aiosmtpd_server.wait_for_messages(1)
    assert got.mail_from == "<>" or got.mail_from == ""
    back = email.message_from_bytes(got.data, policy=email.policy.default)
    assert back.get_param("report-type") == "delivery-status"
    assert status_blocks(back.get_payload()[1])[0]["original-envelope-id"] == "E1"


def test_bad_arguments(verdicts):
    message = Message(SENDER, ["bad@example.test"], BODY)
    result = deliver(verdicts, message)
    with pytest.raises(InvalidMessageError, match="ret must be"):
        dsn.build(result, message, reporting_mta="relay.example.net", ret="BODY")
    with pytest.raises(InvalidMessageError, match="reporting_mta"):
        dsn.build(result, message, reporting_mta="two words")
    other = Message(SENDER, ["a@x.test", "b@x.test"], BODY)
    with pytest.raises(InvalidMessageError, match="not the same message"):
        dsn.build(result, other, reporting_mta="relay.example.net")
