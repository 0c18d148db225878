"""Message.from_email and the send_message/submit_message shortcuts: the
envelope from an EmailMessage's headers as smtplib.send_message derives it
(Resent-* blocks, Bcc kept out of what is sent), SMTPUTF8 and 8BITMIME
when the message needs them, against aiosmtpd and Postfix."""

from __future__ import annotations

import asyncio
import email
import email.policy
from email.message import EmailMessage

import pytest

from smtpstate import Client, Engine, InvalidMessageError, Message, aio


def _msg(**headers) -> EmailMessage:
    m = EmailMessage()
    for name, value in headers.items():
        m[name.replace("_", "-")] = value
    m.set_content("hello\n")
    return m


def test_envelope_from_headers():
    m = _msg(From="Ann <ann@example.org>", To="bob@example.net, Cy <cy@example.net>",
             Cc="dee@example.net", Bcc="eve@example.net", Subject="hi")
    x = Message.from_email(m)
    assert x.sender == "ann@example.org"
    assert x.recipients == ("bob@example.net", "cy@example.net", "dee@example.net",
                            "eve@example.net")
    assert b"\r\nBcc:" not in x.data and b"eve@example.net" not in x.data
    assert x.data.startswith(b"From: Ann <ann@example.org>\r\n")
    assert b"\n" not in x.data.replace(b"\r\n", b"")             # CRLF throughout
    assert m["Bcc"] == "eve@example.net"                          # the original is untouched


def test_sender_header_wins_and_duplicates_go():
    m = _msg(From="ann@example.org", Sender="list@example.org",
             To="bob@example.net", Cc="bob@example.net")
    x = Message.from_email(m)
    assert x.sender == "list@example.org" and x.recipients == ("bob@example.net",)


def test_resent_block():
    m = _msg(From="ann@example.org", To="bob@example.net")
    m["Resent-Date"] = "Mon, 1 Jan 2024 00:00:00 +0000"
    m["Resent-From"] = "fwd@example.org"
    m["Resent-To"] = "zed@example.net"
    m["Resent-Bcc"] = "hidden@example.net"
    x = Message.from_email(m)
    assert x.sender == "fwd@example.org"
    assert x.recipients == ("zed@example.net", "hidden@example.net")
    assert b"Resent-Bcc" not in x.data and b"hidden@" not in x.data
    m["Resent-Date"] = "Tue, 2 Jan 2024 00:00:00 +0000"
    with pytest.raises(InvalidMessageError, match="more than one 'Resent-'"):
        Message.from_email(m)


def test_overrides_and_errors():
    m = _msg(From="ann@example.org", To="bob@example.net")
    x = Message.from_email(m, "other@example.org", ["x@example.net"], dsn_ret="HDRS",
                           envid="e1")
    assert x.sender == "other@example.org" and x.recipients == ("x@example.net",)
    assert x.dsn_ret == "HDRS" and x.envid == "e1"
    with pytest.raises(InvalidMessageError, match="no sender"):
        Message.from_email(_msg(To="bob@example.net"))
    with pytest.raises(InvalidMessageError, match="no recipients"):
        Message.from_email(_msg(From="ann@example.org", To="undisclosed-recipients:;"))
    with pytest.raises(InvalidMessageError, match="control character"):
        Message.from_email(m, "a\r\nRCPT TO:<x@y>")
    with pytest.raises(TypeError):
        Message.from_email(b"From: a@b\r\n\r\n")


def test_compat32_message():
    m = email.message_from_bytes(b"From: ann@example.org\nTo: bob@example.net\n"
                                 b"Bcc: eve@example.net\nSubject: old\n\nbody\n")
    x = Message.from_email(m)
    assert x.recipients == ("bob@example.net", "eve@example.net")
    assert x.data == b"From: ann@example.org\r\nTo: bob@example.net\r\nSubject: old\r\n\r\nbody\r\n"
    u = email.message_from_bytes("From: ann@example.org\nTo: zoë@example.net\n\nx\n".encode(),
                                 policy=email.policy.compat32)
    assert "zoë@example.net".encode() in Message.from_email(u).data


def test_smtputf8_and_8bitmime_on_the_wire(aiosmtpd_server):
    m = EmailMessage()
    m["From"] = "ann@example.org"
    m["To"] = "Zoë <zoë@exämple.net>"
    m["Subject"] = "Grüße"
    m.set_content("Grüße, ça va?\n")                # 8bit content transfer encoding
    with Client(aiosmtpd_server.host, aiosmtpd_server.port, timeout=30) as client:
        r = client.send_message(m)
    assert r.ok, r
    [got] = aiosmtpd_server.wait_for_messages(1)
    assert got.rcpt_tos == ["zoë@exämple.net"]
    assert "SMTPUTF8" in got.mail_options and "BODY=8BITMIME" in got.mail_options
    assert "Subject: Grüße".encode() in got.data       # raw UTF-8 header (RFC 6531)


def test_ascii_message_asks_for_nothing(aiosmtpd_server):
    m = _msg(From="ann@example.org", To="bob@example.net", Bcc="eve@example.net",
             Subject="plain")
    with Client(aiosmtpd_server.host, aiosmtpd_server.port, timeout=30) as client:
        r = client.send_message(m)
    assert r.ok
    [got] = aiosmtpd_server.wait_for_messages(1)
    assert got.mail_options == [] or all("SMTPUTF8" not in o and "8BITMIME" not in o
                                         for o in got.mail_options)
    assert got.rcpt_tos == ["bob@example.net", "eve@example.net"]
    assert b"eve@example.net" not in got.data


def test_engine_and_aio(aiosmtpd_server):
    host, port = aiosmtpd_server.host, aiosmtpd_server.port
    with Engine() as engine:
        t = engine.submit_message(_msg(From="ann@example.org", To="one@example.net"),
                                  host, port, timeout=30)
        t2 = engine.submit_message(_msg(From="ann@example.org", To="x@example.net"), host,
                                   port, sender="s@example.org", recipients=["two@example.net"],
                                   timeout=30)
        results = list(engine.run(timeout=30))
    assert all(r.ok for r in results)
    assert t.message.recipients == ("one@example.net",)
    assert t2.message.sender == "s@example.org"

    async def main():
        async with aio.Client(host, port, timeout=30) as client:
            return await client.send_message(_msg(From="ann@example.org", To="three@example.net"))

    assert asyncio.run(main()).ok
    got = aiosmtpd_server.wait_for_messages(3)
    assert sorted(m.rcpt_tos[0] for m in got) == ["one@example.net", "three@example.net",
                                                  "two@example.net"]


def test_postfix_delivers_an_email_message(postfix_server):
    m = _msg(From="ann@example.org", To="anything@example.test", Bcc="secret@example.test",
             Subject="to postfix")
    with Client(postfix_server.host, postfix_server.port, timeout=30) as client:
        r = client.send_message(m)
    assert r.ok, r
    got = postfix_server.wait_for_messages(1)
    assert sorted(got[0].rcpt_tos) == ["anything@example.test", "secret@example.test"]
    assert b"Bcc" not in got[0].data and b"Subject: to postfix" in got[0].data
