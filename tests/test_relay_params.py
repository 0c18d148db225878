"""MAIL and RCPT parameters a relay passes on: SMTPUTF8 asked for with an
ASCII envelope, the DSN parameters (RET, ENVID, NOTIFY, ORCPT, RFC 3461;
ORCPT's utf-8 type of RFC 6533), parsed from what a server received
(``Message.from_smtp``, ``Recipient.from_smtp``) and seen by real servers
(aiosmtpd, Postfix smtp-sink) and byte for byte by a scripted one;
unknown parameters refused with an error that says what is supported."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from smtpstate import Client, InvalidMessageError, Message, Recipient, classify

from hostile import Servers, deliver, greet, serve

SENDER = "sender@client.test"
BODY = b"Subject: params\r\n\r\nhello\r\n"


@pytest.fixture
def hostile() -> Iterator[Servers]:
    servers = Servers()
    yield servers
    servers.stop()


def send(server: Any, message: Message, **kw: Any) -> Any:
    with Client(server.host, server.port, timeout=10, **kw) as client:
        return client.send(message)


# -- SMTPUTF8 -------------------------------------------------------------------


def test_smtputf8_asked_for_with_an_ascii_envelope(aiosmtpd_server):
    utf8_body = "Subject: r\u00e9sum\u00e9\r\n\r\nhello\r\n".encode()
    r = send(aiosmtpd_server, Message(SENDER, ["a@example.test"], utf8_body, smtputf8=True))
    assert r.ok, r
    (got,) = aiosmtpd_server.wait_for_messages(1)
    assert "SMTPUTF8" in got.mail_options
    assert got.extra["smtp_utf8"] is True
    # Without it, an ASCII envelope goes without SMTPUTF8, as before.
    r = send(aiosmtpd_server, Message(SENDER, ["a@example.test"], utf8_body))
    assert r.ok
    assert "SMTPUTF8" not in aiosmtpd_server.wait_for_messages(2)[1].mail_options


@pytest.mark.parametrize("driver", ["client", "engine", "aio"])
def test_smtputf8_asked_for_and_not_offered_fails_before_mail(aiosmtpd_factory, driver):
    server = aiosmtpd_factory(enable_SMTPUTF8=False)
    (r,) = deliver(driver, [Message(SENDER, ["a@example.test"], BODY, smtputf8=True)],
                   (server.host, server.port), timeout=10)
    assert r.status == "permfail", r
    assert "needs SMTPUTF8 (asked for)" in r.reason
    assert r.stage_code == 25 and r.enhanced == "5.6.7"
    assert r.bounce_class == classify.GENERIC_BOUNCE
    assert not any(b"MAIL FROM" in c.received for c in server.connections)


def test_smtputf8_must_be_a_bool():
    with pytest.raises(InvalidMessageError, match="smtputf8 must be True or False"):
        Message(SENDER, ["a@example.test"], BODY, smtputf8="yes")


# -- DSN parameters on the wire -------------------------------------------------------


def test_dsn_parameters_pass_through_byte_for_byte(hostile):
    server = hostile([greet(), serve(ehlo=["DSN", "SMTPUTF8", "PIPELINING"])])
    message = Message.from_smtp(
        SENDER,
        [Recipient.from_smtp("a@example.test", ["NOTIFY=SUCCESS,FAILURE",
                                                "ORCPT=rfc822;Old+2BBox@old.example.test"]),
         Recipient.from_smtp("b@example.test", ["NOTIFY=NEVER"]),
         Recipient.from_smtp("c@example.test", ["ORCPT=utf-8;j\\x{F6}rg\\x{2B}1@example.test"]),
         Recipient.from_smtp("d@example.test", ["ORCPT=UTF-8;b\u00fccher@example.test"])],
        BODY, ["SMTPUTF8", "RET=HDRS", "ENVID=QR+2B42", "BODY=7BIT", "SIZE=30", "AUTH=<>"])
    assert message.smtputf8 and message.dsn_ret == "HDRS" and message.envid == "QR+42"
    (r,) = deliver("client", [message], server, timeout=10)
    assert r.ok, r
    commands = server.conn.commands
    assert commands[1] == (b"MAIL FROM:<sender@client.test> SMTPUTF8 RET=HDRS "
                           b"ENVID=QR+2B42\r\n")
    assert commands[2:6] == [
        b"RCPT TO:<a@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Old+2BBox@old.example.test\r\n",
        b"RCPT TO:<b@example.test> NOTIFY=NEVER\r\n",
        # RFC 6533 3: utf-8-addr-xtext, "+" escaped as \x{2B}, non-ASCII too.
        b"RCPT TO:<c@example.test> ORCPT=utf-8;j\\x{F6}rg\\x{2B}1@example.test\r\n",
        b"RCPT TO:<d@example.test> ORCPT=utf-8;b\\x{FC}cher@example.test\r\n",
    ]


def test_dsn_parameters_seen_by_smtp_sink(smtp_sink_server):
    message = Message.from_smtp(
        SENDER,
        [Recipient.from_smtp("a@example.test", ["NOTIFY=FAILURE,DELAY",
                                                "ORCPT=rfc822;orig@old.example.test"]),
         Recipient.from_smtp("b@example.test", ["ORCPT=utf-8;b\\x{FC}cher@old.example.test"])],
        BODY, ["RET=FULL", "ENVID=env-1"])
    assert send(smtp_sink_server, message).ok
    (got,) = smtp_sink_server.wait_for_messages(1)
    assert got.mail_options == ["RET=FULL", "ENVID=env-1"]
    assert got.rcpt_tos == ["a@example.test", "b@example.test"]
    assert got.rcpt_options == ["NOTIFY=FAILURE,DELAY ORCPT=rfc822;orig@old.example.test",
                                "ORCPT=utf-8;b\\x{FC}cher@old.example.test"]


def test_a_server_without_dsn_gets_no_dsn_parameters(aiosmtpd_server):
    message = Message.from_smtp(SENDER, [Recipient.from_smtp(
        "a@example.test", ["NOTIFY=FAILURE", "ORCPT=rfc822;x@y.test"])], BODY,
        ["RET=HDRS", "ENVID=e"])
    assert send(aiosmtpd_server, message).ok
    (got,) = aiosmtpd_server.wait_for_messages(1)
    assert [o for o in got.mail_options if not o.startswith("SIZE=")] == []
    assert got.rcpt_options == []


# -- refused ------------------------------------------------------------------------


@pytest.mark.parametrize("params,match", [
    (["XFORWARD=1"], r"MAIL parameter 'XFORWARD=1' is not supported; supported are: "
                     r"SMTPUTF8 \(kept\), RET \(kept\), ENVID \(kept\), REQUIRETLS"),
    (["BODY=BINARYMIME"], "BODY=BINARYMIME is not supported"),
    (["RET=HDRS", "ret=FULL"], "RET given twice"),
    (["RET=BODY"], "dsn_ret must be"),
    (["SMTPUTF8=yes"], "SMTPUTF8 takes no value"),
    (["ENVID=a=b"], "is not xtext"),
    (["ENVID=a+zz"], "is not xtext"),
    (["SIZE=big"], "SIZE=big is not a number"),
    ("RET=HDRS", "must be a list"),
    (["RET=HDRS\r\nRCPT"], "bad MAIL parameter"),
])
def test_unknown_or_bad_mail_parameters_are_refused(params, match):
    with pytest.raises(InvalidMessageError, match=match):
        Message.from_smtp(SENDER, ["a@example.test"], BODY, params)


def test_a_parameter_and_its_keyword_cannot_both_be_given():
    with pytest.raises(InvalidMessageError, match="dsn_ret given both"):
        Message.from_smtp(SENDER, ["a@example.test"], BODY, ["RET=HDRS"], dsn_ret="FULL")
    m = Message.from_smtp(SENDER, ["a@example.test"], BODY, ["REQUIRETLS"], long_lines="allow")
    assert m.require_tls and m.long_lines == "allow"


@pytest.mark.parametrize("params,match", [
    (["XRCPT=1"], r"RCPT parameter 'XRCPT=1' is not supported; supported are: "
                  r"NOTIFY \(kept\), ORCPT \(kept\)"),
    (["NOTIFY=SOMETIMES"], "NOTIFY value 'SOMETIMES'"),
    (["NOTIFY=NEVER,FAILURE"], "NEVER cannot be combined"),
    (["NOTIFY="], "NOTIFY needs a value"),
    (["ORCPT=x400;c=us"], "address type 'x400' is not supported: rfc822 and utf-8"),
    (["ORCPT=bob@x"], "is not addr-type;address"),
    (["ORCPT=rfc822;a+1@x"], "is not xtext"),
    (["ORCPT=rfc822;a@x", "orcpt=rfc822;b@x"], "ORCPT given twice"),
])
def test_unknown_or_bad_rcpt_parameters_are_refused(params, match):
    with pytest.raises(InvalidMessageError, match=match):
        Recipient.from_smtp("a@example.test", params)
