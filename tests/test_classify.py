"""Bounce classification: the Python API over csrc/classify.c, and the
classes results carry from every driver, against real servers (aiosmtpd,
Postfix) and failures without a reply (refused connections, names that do
not resolve, timeouts, SIZE).

The decision table itself is tested in C (tests/c/test_classify.c); here
the vectors check the Python surface and the wording of real servers."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
from handlers import RefusingHandler
from helpers import RecordingHandler

import smtpstate
from smtpstate import BounceClass, Client, DeliveryError, Engine, Message, aio, classify
from smtpstate.result import RecipientResult, Reply, Result

SENDER = "sender@client.test"
BODY = b"Subject: classify\r\n\r\nhello\r\n"


@pytest.fixture(autouse=True)
def _no_user_rules():
    classify.reset()
    yield
    classify.reset()


# -- the taxonomy ----------------------------------------------------------------


def test_builtin_classes_are_the_classic_taxonomy():
    codes = {c.code: c.name for c in classify.BUILTIN_CLASSES.values()}
    assert sorted(codes) == [1, 10, 20, 21, 22, 23, 24, 25, 30, 40, 50, 51, 52, 53, 54,
                             60, 70, 80, 90, 100]
    assert codes[10] == "invalid recipient" and codes[54] == "relaying denied"
    assert classify.INVALID_RECIPIENT == BounceClass(10, "invalid recipient")
    assert int(classify.MAILBOX_FULL) == 22 and str(classify.TIMEOUT) == "timeout (24)"
    assert classify.bounce_class(51) is classify.SPAM_BLOCK
    with pytest.raises(KeyError):
        classify.bounce_class(2)
    assert smtpstate.classify_reply is classify.classify


# Real servers' wording: Postfix, Exchange/Outlook, Gmail, aiosmtpd, sendmail.
VECTORS = [
    ("550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown in virtual "
     "mailbox table", "INVALID_RECIPIENT"),
    ("550-5.1.1 The email account that you tried to reach does not exist.\n"
     "550 5.1.1 https://support.google.com/mail/?p=NoSuchUser", "INVALID_RECIPIENT"),
    ("554 5.7.1 <x@other.test>: Relay access denied", "RELAYING_DENIED"),
    ("550 5.7.1 Unable to relay", "RELAYING_DENIED"),
    ("452 4.2.2 The email account that you tried to reach is over quota.", "MAILBOX_FULL"),
    ("552 5.3.4 Message size exceeds fixed limit", "TOO_LARGE"),
    ("552 Error: message file too big", "TOO_LARGE"),
    ("554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using "
     "zen.spamhaus.org", "SPAM_BLOCK"),
    ("550 5.7.1 Our system has detected that this message is likely unsolicited mail.",
     "SPAM_CONTENT"),
    ("550 5.7.26 Unauthenticated email from example.com is not accepted due to "
     "domain's DMARC policy", "MAIL_BLOCK"),
    ("450 4.7.1 <a@b>: Recipient address rejected: Greylisted, try again later",
     "TRANSIENT_FAILURE"),
    ("421 4.7.0 Try again later, closing connection.", "TRANSIENT_FAILURE"),
    ("550 5.1.2 Host unknown (Name server: example.invalid: host not found)", "DNS_FAILURE"),
    ("554 5.5.1 Error: no valid recipients", "NO_RCPT"),
    ("450 4.1.1 <a@b>: Recipient address rejected: unverified address", "SOFT_BOUNCE"),
    ("451 4.3.0 Error: queue file write error", "SOFT_BOUNCE"),
    ("554 Transaction failed", "GENERIC_BOUNCE"),
    ("530 5.7.0 Authentication required", "ADMIN_FAILURE"),
]


@pytest.mark.parametrize("reply,want", VECTORS, ids=[w + ":" + r[:30] for r, w in VECTORS])
def test_reply_vectors(reply, want):
    assert classify.classify(reply) == classify.BUILTIN_CLASSES[want]


def test_classify_forms():
    assert classify.classify("250 2.0.0 Ok") is None
    assert classify.classify(code=354) is None
    got = classify.classify(code=550, enhanced="5.1.1", text="whatever")
    assert got == classify.INVALID_RECIPIENT
    reply = Reply(554, "5.7.1", "Relay access denied")
    assert classify.classify(reply) == classify.RELAYING_DENIED
    # Multi-line: the code and enhanced code of every line are stripped.
    assert classify.classify("550-5.7.1 first\r\n550 5.7.1 relay denied") == \
        classify.RELAYING_DENIED
    with pytest.raises(ValueError):
        classify.classify("no code here")
    with pytest.raises(ValueError):
        classify.classify()


def test_enhanced_code_first_then_text():
    # Specific enhanced codes win over the text...
    assert classify.classify("550 5.1.1 mailbox full") == classify.INVALID_RECIPIENT
    # ...vague ones let the text speak...
    assert classify.classify("550 5.7.1 user unknown") == classify.INVALID_RECIPIENT
    # ...and say what they mean when it does not.
    assert classify.classify("550 5.7.1 no") == classify.MAIL_BLOCK


def test_temporary_replies_never_hard():
    assert classify.classify("450 user unknown") == classify.SOFT_BOUNCE
    assert classify.classify("550 user unknown") == classify.INVALID_RECIPIENT


def test_failures_without_reply():
    cf = classify.classify_failure
    assert cf("delivered") is None
    assert cf("unknown", None, "connection lost after the final dot") == classify.UNDETERMINED
    assert cf("tempfail", None, "cannot resolve nowhere.invalid: Name or service not known") \
        == classify.DNS_FAILURE
    assert cf("tempfail", None, "timeout: no reply in state RCPT") == classify.TIMEOUT
    assert cf("tempfail", None, "cannot connect: Connection refused") == \
        classify.TRANSIENT_FAILURE
    assert cf("permfail", None, "a state said no") == classify.ADMIN_FAILURE
    assert cf("permfail", Reply(550, "5.1.1", "x"), "") == classify.INVALID_RECIPIENT


# -- classes and rules of one's own ---------------------------------------------------


def test_register_class_and_rules():
    q = classify.register_class(200, "quarantined")
    assert q == BounceClass(200, "quarantined")
    assert classify.register_class(200, "quarantined") == q       # harmless again
    with pytest.raises(smtpstate.InvalidOptionError, match="taken"):
        classify.register_class(200, "other")
    with pytest.raises(ValueError, match="built-in"):
        classify.register_class(10, "mine")
    with pytest.raises(ValueError):
        classify.register_class(1000, "too big")
    with pytest.raises(ValueError):
        classify.register_class(201, "bad\nname")

    classify.add_rule(q, code=550, text="Quarantine")
    assert classify.classify("550 5.1.1 held in quarantine") == q     # before the built-ins
    assert classify.classify("554 5.1.1 held in quarantine") == classify.INVALID_RECIPIENT
    classify.add_rule(classify.SPAM_BLOCK, enhanced="5.7.*")
    assert classify.classify("550 5.7.26 dmarc") == classify.SPAM_BLOCK
    classify.add_rule(classify.DNS_FAILURE.code, text="no such domain")
    assert classify.classify_failure("tempfail", None, "No such domain") == classify.DNS_FAILURE

    with pytest.raises(ValueError, match="needs"):
        classify.add_rule(q)
    with pytest.raises(ValueError, match="register_class"):
        classify.add_rule(777, text="x")
    with pytest.raises(ValueError, match="bad rule"):
        classify.add_rule(q, enhanced="5.x.1")
    with pytest.raises(ValueError, match="bad rule"):
        classify.add_rule(q, code=7)

    classify.reset()
    with pytest.raises(KeyError):
        classify.bounce_class(200)
    assert classify.classify("550 5.1.1 held in quarantine") == classify.INVALID_RECIPIENT


def test_python_made_results_are_classified():
    r = Result(status="tempfail", reply=None,
               recipients=(RecipientResult("a@b", "tempfail", None),),
               stage="not connected", stage_code=0, state=None, reason="timed out")
    assert r.bounce_class == classify.TIMEOUT
    assert r.recipients[0].bounce_class == classify.TIMEOUT
    ok = Result(status="delivered", reply=Reply(250, "", "ok"),
                recipients=(RecipientResult("a@b", "delivered", None),),
                stage="idle", stage_code=1, state="BODY")
    assert ok.bounce_class is None and ok.raise_for_status() is ok


def test_raise_for_status_carries_stage_and_class():
    r = Result(status="permfail", reply=Reply(550, "5.1.1", "User unknown"),
               recipients=(RecipientResult("a@b", "permfail", Reply(550, "5.1.1", "x")),),
               stage="sending RCPT TO", stage_code=4, state="RCPT")
    with pytest.raises(DeliveryError) as info:
        r.raise_for_status()
    e = info.value
    assert e.result is r and e.stage_code == 4 and e.stage == "sending RCPT TO"
    assert e.bounce_class == classify.INVALID_RECIPIENT
    assert "stage 4 (sending RCPT TO)" in str(e) and "invalid recipient (10)" in str(e)


# -- results from the drivers, against real servers ------------------------------------


def test_client_results_against_aiosmtpd(aiosmtpd_factory):
    server = aiosmtpd_factory(RefusingHandler())
    with Client(server.host, server.port, timeout=30) as client:
        partial = client.send(Message(SENDER, ["ok@x.test", "nobody@x.test", "later@x.test"],
                                      BODY))
        refused = client.send(Message(SENDER, ["nobody@x.test"], BODY))
        delayed = client.send(Message(SENDER, ["later@x.test"], BODY))
    # Delivered to one of three: partial, not ok, classed by its first failure.
    assert partial.status == "partial" and not partial.ok
    assert partial.bounce_class == classify.INVALID_RECIPIENT
    by = {r.address: r for r in partial.recipients}
    assert by["ok@x.test"].bounce_class is None
    assert by["nobody@x.test"].bounce_class == classify.INVALID_RECIPIENT
    assert by["later@x.test"].bounce_class == classify.TRANSIENT_FAILURE   # "try later"
    assert refused.status == "permfail" and refused.bounce_class == classify.INVALID_RECIPIENT
    assert refused.stage_code == 4
    assert delayed.status == "tempfail" and delayed.bounce_class == classify.TRANSIENT_FAILURE


def test_postfix_replies_are_classified(postfix_server):
    with Client(postfix_server.host, postfix_server.port, timeout=30) as client:
        r = client.send(Message(SENDER, ["anything@example.test", "unknown7@example.test",
                                         "x@elsewhere.test"], BODY))
    by = {x.address: x for x in r.recipients}
    assert r.status == "partial" and by["anything@example.test"].bounce_class is None
    assert by["unknown7@example.test"].bounce_class == classify.INVALID_RECIPIENT
    assert by["x@elsewhere.test"].bounce_class == classify.RELAYING_DENIED


def test_too_large_is_refused_up_front_and_classified(aiosmtpd_factory):
    server = aiosmtpd_factory(RecordingHandler(), data_size_limit=100)
    with Client(server.host, server.port, timeout=30) as client:
        r = client.send(Message(SENDER, ["a@x.test"], b"Subject: big\r\n\r\n" + b"x" * 500))
    assert r.status == "permfail" and r.reply is None
    assert r.bounce_class == classify.TOO_LARGE


def _refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]                # closed again: nobody listens


def test_connection_refused_is_transient_everywhere():
    port = _refused_port()
    msg = Message(SENDER, ["a@x.test"], BODY)
    with Client("127.0.0.1", port, timeout=5) as client:
        r = client.send(msg)
    assert r.status == "tempfail" and r.stage_code == 0
    assert r.bounce_class == classify.TRANSIENT_FAILURE
    assert r.recipients[0].bounce_class == classify.TRANSIENT_FAILURE
    [e] = smtpstate.deliver([msg], "127.0.0.1", port, timeout=5)
    assert e.status == "tempfail" and e.bounce_class == classify.TRANSIENT_FAILURE
    a = asyncio.run(aio.send(msg, "127.0.0.1", port, timeout=5))
    assert a.status == "tempfail" and a.bounce_class == classify.TRANSIENT_FAILURE


def test_unresolvable_name_is_a_dns_failure():
    with Engine(connect_timeout=10) as engine:
        engine.submit(Message(SENDER, ["a@x.test"], BODY), "no-such-host.invalid", 25)
        [r] = list(engine.run(timeout=30))
    assert r.status == "tempfail" and r.bounce_class == classify.DNS_FAILURE, r.reason


def test_silent_server_is_a_timeout():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    accepted = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])    # never says a word
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        with Client("127.0.0.1", listener.getsockname()[1], timeout=0.5) as client:
            r = client.send(Message(SENDER, ["a@x.test"], BODY))
    finally:
        stop.set()
        t.join()
        for s in accepted:
            s.close()
        listener.close()
    assert r.status == "tempfail" and r.stage_code == 12        # reading banner
    assert r.bounce_class == classify.TIMEOUT, r.reason


def test_user_rule_applies_to_results(aiosmtpd_factory):
    server = aiosmtpd_factory(RefusingHandler())
    mine = classify.register_class(300, "no such user, per our rule")
    classify.add_rule(mine, enhanced="5.1.1", text="no such user")
    with Client(server.host, server.port, timeout=30) as client:
        r = client.send(Message(SENDER, ["nobody@x.test"], BODY))
    assert r.bounce_class == mine and r.recipients[0].bounce_class == mine
