"""Real delivery over loopback to servers nobody here wrote: aiosmtpd in
process, a private Postfix smtpd (PIPELINING, CHUNKING, SMTPUTF8, DSN) and
Postfix smtp-sink. Messages are compared byte for byte on the server side."""

from __future__ import annotations

import pytest

import smtpstate
from handlers import RefusingHandler
from smtpstate import Client, Message, Recipient

SENDER = "sender@client.test"

# Leading dots, a line that is only a dot, bare LF, bare CR, CR CR LF, and a
# last line without its newline: every body quirk a client must get right.
TRICKY = (
    b"Subject: tricky\n"
    b"\n"
    b".leading dot\n"
    b"..two dots\n"
    b".\n"
    b"bare LF\nbare CR\rCR CR LF\r\r\n"
    b"no final newline"
)
# What the server must receive: CRLF everywhere, last line completed.
TRICKY_ON_SERVER = (
    b"Subject: tricky\r\n"
    b"\r\n"
    b".leading dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"bare LF\r\nbare CR\r\nCR CR LF\r\n\r\n"
    b"no final newline\r\n"
)


def _body(i: int) -> bytes:
    return b"Subject: message %d\r\n\r\nline one of %d\r\n.dot line\r\n" % (i, i)


def _client_bytes(client: Client) -> bytes:
    return b"".join(data for who, data in client.transcript if who == "C")


# -- aiosmtpd ---------------------------------------------------------------


def test_aiosmtpd_several_messages_one_connection(aiosmtpd_server):
    with Client(aiosmtpd_server.host, aiosmtpd_server.port, helo="client.test",
                timeout=30, keep_transcript=True) as client:
        results = [client.send(Message(SENDER, [f"r{i}@example.test"], _body(i)))
                   for i in range(5)]
    assert [r.status for r in results] == ["delivered"] * 5
    assert all(r.ok and r.reply and r.reply.code == 250 for r in results)
    got = aiosmtpd_server.wait_for_messages(5)
    assert [m.data for m in got] == [_body(i) for i in range(5)]
    assert [m.rcpt_tos for m in got] == [[f"r{i}@example.test"] for i in range(5)]
    assert len(aiosmtpd_server.connections) == 1           # one connection
    sent = _client_bytes(client)
    assert sent.count(b"EHLO client.test\r\n") == 1
    assert b"RSET" not in sent                               # nothing failed
    assert sent.endswith(b"QUIT\r\n")


def test_aiosmtpd_tricky_body(aiosmtpd_server):
    with Client(aiosmtpd_server.host, aiosmtpd_server.port, timeout=30) as client:
        result = client.send(Message(SENDER, ["rcpt@example.test"], TRICKY))
    assert result.status == "delivered", result
    (msg,) = aiosmtpd_server.wait_for_messages(1)
    assert msg.data == TRICKY_ON_SERVER


def test_aiosmtpd_partial_refusal_and_enhanced_codes(aiosmtpd_factory):
    handler = RefusingHandler()
    server = aiosmtpd_factory(handler)
    with Client(server.host, server.port, timeout=30) as client:
        result = client.send(Message(SENDER, ["ok@example.test", "nobody@example.test",
                                              "later@example.test"], b"hello\r\n"))
        second = client.send(Message(SENDER, ["nobody@example.test"], b"x\r\n"))
        third = client.send(Message(SENDER, ["ok@example.test"], b"third\r\n"))
    assert result.status == "partial" and not result.ok
    statuses = {r.address: r.status for r in result.recipients}
    assert statuses == {"ok@example.test": "delivered", "nobody@example.test": "permfail",
                        "later@example.test": "tempfail"}
    nobody = result.recipients[1].reply
    assert nobody is not None and nobody.code == 550 and nobody.enhanced == "5.1.1"
    assert second.status == "permfail" and second.stage == "sending RCPT TO", second
    assert second.stage_code == smtpstate.Stage.RCPT
    assert second.reason == "every recipient was refused"
    assert third.status == "delivered"            # RSET made the connection reusable
    got = server.wait_for_messages(2)
    assert got[0].rcpt_tos == ["ok@example.test"]
    assert got[1].data == b"third\r\n"


def test_aiosmtpd_smtputf8_and_8bit(aiosmtpd_server):
    body = "Subject: caf\u00e9\r\n\r\n\u20ac 8-bit\r\n".encode("utf-8")
    with Client(aiosmtpd_server.host, aiosmtpd_server.port, timeout=30) as client:
        assert "SMTPUTF8" in client_caps(client)
        result = client.send(Message("s\u00e9nder@client.test", ["j\u00f6rg@example.test"], body))
    assert result.status == "delivered", result
    (msg,) = aiosmtpd_server.wait_for_messages(1)
    assert msg.data == body
    assert msg.extra["smtp_utf8"] is True
    assert "BODY=8BITMIME" in msg.mail_options
    assert msg.rcpt_tos == ["j\u00f6rg@example.test"]


def test_aiosmtpd_without_smtputf8_refuses_before_sending(aiosmtpd_factory):
    server = aiosmtpd_factory(enable_SMTPUTF8=False)
    with Client(server.host, server.port, timeout=30, keep_transcript=True) as client:
        result = client.send(Message("sender@client.test", ["j\u00f6rg@example.test"], b"x\r\n"))
        after = client.send(Message(SENDER, ["ok@example.test"], b"fine\r\n"))
    assert result.status == "permfail"
    assert "SMTPUTF8" in result.reason
    assert "j\u00f6rg".encode() not in _client_bytes(client)
    assert after.status == "delivered"


def client_caps(client: Client):
    client.connect()
    caps = client.capabilities
    assert caps is not None
    return caps


# -- Postfix smtpd ------------------------------------------------------------


def test_postfix_pipelined_chunked_messages(postfix_server):
    with Client(postfix_server.host, postfix_server.port, helo="client.test",
                timeout=30, keep_transcript=True) as client:
        caps = client_caps(client)
        assert {"PIPELINING", "CHUNKING", "SMTPUTF8", "DSN"} <= caps.extensions
        results = [client.send(Message(SENDER, ["a@example.test", "b@example.test"],
                                       _body(i))) for i in range(3)]
        tricky = client.send(Message(SENDER, ["c@example.test"], TRICKY))
    assert [r.status for r in results + [tricky]] == ["delivered"] * 4
    got = postfix_server.wait_for_messages(4)
    bodies = sorted(m.data for m in got)
    assert bodies == sorted([_body(i) for i in range(3)] + [TRICKY_ON_SERVER])
    # Pipelined: MAIL and both RCPTs left in one write, before any reply;
    # CHUNKING: BDAT instead of DATA, no dot-stuffing.
    chunks = [data for who, data in client.transcript if who == "C"]
    batch = [c for c in chunks if c.startswith(b"MAIL FROM:")]
    assert len(batch) == 4
    assert all(b"RCPT TO:<a@example.test>" in c and b"RCPT TO:<b@example.test>" in c
               for c in batch[:3])
    sent = b"".join(chunks)
    assert b"\r\nDATA\r\n" not in sent
    assert sent.count(b" LAST\r\n") == 4
    assert b"\r\n.leading dot" in sent             # not stuffed under BDAT


def test_postfix_refusals_with_enhanced_codes(postfix_server):
    with Client(postfix_server.host, postfix_server.port, timeout=30) as client:
        mixed = client.send(Message(SENDER, ["known@example.test", "unknown1@example.test"],
                                    b"Subject: mixed\r\n\r\nbody\r\n"))
        refused = client.send(Message(SENDER, ["unknown2@example.test"], b"x\r\n"))
        relay = client.send(Message(SENDER, ["someone@elsewhere.test"], b"x\r\n"))
        fine = client.send(Message(SENDER, ["known@example.test"], b"Subject: fine\r\n\r\nfine\r\n"))
    assert mixed.status == "partial"
    assert [r.status for r in mixed.recipients] == ["delivered", "permfail"]
    unknown = mixed.recipients[1].reply
    assert unknown is not None and unknown.code == 550 and unknown.enhanced == "5.1.1"
    assert refused.status == "permfail" and refused.recipients[0].reply.enhanced == "5.1.1"
    assert relay.status == "permfail" and relay.recipients[0].reply.code == 554
    assert fine.status == "delivered"
    got = postfix_server.wait_for_messages(2)
    assert sorted(m.data for m in got) == sorted([b"Subject: mixed\r\n\r\nbody\r\n",
                                                 b"Subject: fine\r\n\r\nfine\r\n"])


def test_postfix_dsn_parameters(postfix_server):
    msg = Message(SENDER, [Recipient("dsn@example.test", notify=("SUCCESS", "FAILURE"),
                                     orcpt="orig+tag@example.test")],
                  b"Subject: dsn\r\n\r\nbody\r\n", dsn_ret="HDRS", envid="env id=1")
    with Client(postfix_server.host, postfix_server.port, timeout=30,
                keep_transcript=True) as client:
        result = client.send(msg)
    assert result.status == "delivered", result
    sent = _client_bytes(client)
    assert b"RET=HDRS ENVID=env+20id+3D1" in sent
    assert b"NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;orig+2Btag@example.test" in sent
    postfix_server.wait_for_messages(1)


def test_postfix_without_chunking_uses_data(postfix_factory):
    server = postfix_factory(main_cf={"smtpd_discard_ehlo_keywords": "chunking"})
    with Client(server.host, server.port, timeout=30, keep_transcript=True) as client:
        result = client.send(Message(SENDER, ["x@example.test"], TRICKY))
    assert result.status == "delivered", result
    sent = _client_bytes(client)
    assert b"BDAT" not in sent and b"\r\nDATA\r\n" in sent
    assert b"\r\n..leading dot\r\n" in sent and b"\r\n..\r\n" in sent
    (got,) = server.wait_for_messages(1)
    assert got.data == TRICKY_ON_SERVER


# -- Postfix smtp-sink ----------------------------------------------------------


def test_smtp_sink_many_messages(smtp_sink_server):
    with Client(smtp_sink_server.host, smtp_sink_server.port, timeout=30) as client:
        results = [client.send(Message(SENDER, ["sink@example.test"], _body(i)))
                   for i in range(20)]
    assert all(r.ok for r in results), [str(r) for r in results if not r.ok]
    got = smtp_sink_server.wait_for_messages(20)
    assert sorted(m.data for m in got) == sorted(_body(i) for i in range(20))


def test_connect_failure_is_a_tempfail_result():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                     # nothing listens there now
    client = Client("127.0.0.1", port, timeout=5)
    result = client.send(Message(SENDER, ["x@example.test"], b"x\r\n"))
    assert result.status == "tempfail" and result.stage == "not connected"
    assert "cannot connect" in result.reason
    with pytest.raises(smtpstate.ConnectError):
        client.connect()
