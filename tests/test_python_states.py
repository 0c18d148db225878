"""Python states registered through register_smtp_client_state's machine
form, running against real servers: a PROXY protocol line before the
banner, a state after MAIL, an address-verification machine that ends the
transaction after RCPT, and Python exceptions that fail one message and
never the process."""

from __future__ import annotations

from typing import List, Optional

import pytest
from handlers import ProxyHandler, RefusingHandler

from smtpstate import (Action, Client, DeliveryError, InvalidMessageError, Machine, Message,
                       RegistrationError, Reply, Stage, State, StateCallbackError)

from hostile import DRIVERS, deliver

SENDER = "sender@client.test"
BODY = b"Subject: states\r\n\r\nhello\r\n"


class ProxyV1(State):
    """Sends a PROXY protocol v1 line before the server's greeting (at -1)."""

    name = "PROXY"

    def __init__(self, source: str, source_port: int) -> None:
        self.source, self.source_port = source, source_port

    def setup(self, session) -> int:
        dst, dport = session.peer
        session.send(f"PROXY TCP4 {self.source} {dst} {self.source_port} {dport}")
        return 0                                   # no reply: the banner follows


class Noop(State):
    """After MAIL: sends NOOP and checks its reply; counts per connection."""

    name = "NOOP-after-MAIL"

    def __init__(self) -> None:
        self.replies: List[Reply] = []
        self.ids: List[int] = []

    def setup(self, session) -> int:
        self.ids.append(id(self))
        session.data["count"] = session.data.get("count", 0) + 1
        session.send("NOOP")
        return 1

    def callback(self, session, reply) -> int:
        self.ids.append(id(self))
        self.replies.append(reply)
        return Action.NEXT if reply.code == 250 else Action.TEMPFAIL_TX


class VerifyOnly(State):
    """After RCPT: end the transaction before DATA (address verification)."""

    name = "VERIFY"

    def callback(self, session, reply) -> int:
        assert reply is None
        session.fail_reason("address verification only: no data sent")
        return Action.PERMFAIL_TX


class Raises(State):
    def __init__(self, name: str, where: str) -> None:
        self.name, self.where = name, where

    def setup(self, session) -> int:
        if self.where == "setup":
            raise RuntimeError("boom in setup")
        return 0

    def callback(self, session, reply) -> Optional[int]:
        if self.where == "callback":
            raise KeyError("boom in callback")
        if self.where == "bad-return":
            return 12345  # type: ignore[return-value]
        return None


def _client_bytes(client: Client) -> bytes:
    return b"".join(d for who, d in client.transcript if who == "C")


def test_proxy_line_before_banner(aiosmtpd_factory):
    server = aiosmtpd_factory(ProxyHandler(), proxy_protocol_timeout=5)
    machine = Machine()
    assert machine.register(ProxyV1("203.0.113.7", 40000), after=-1) >= 0
    assert machine.states[0][1] == "PROXY" and machine.states[1][1] == "BANNER"
    with Client(server.host, server.port, machine=machine, timeout=30,
                keep_transcript=True) as client:
        result = client.send(Message(SENDER, ["rcpt@example.test"], BODY))
    assert result.status == "delivered", result
    (msg,) = server.wait_for_messages(1)
    proxy = msg.extra["proxy_data"]
    assert proxy is not None and proxy.valid
    assert str(proxy.src_addr) == "203.0.113.7" and proxy.src_port == 40000
    # The PROXY line was the first thing on the wire, before the greeting.
    assert client.transcript[0][0] == "C"
    assert client.transcript[0][1].startswith(b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 ")


def test_state_after_mail(aiosmtpd_server):
    machine = Machine()
    noop = Noop()
    sid = machine.register(noop, after="MAIL")
    names = [n for _, n in machine.states]
    assert names[names.index("MAIL") + 1] == "NOOP-after-MAIL"
    assert machine.id("NOOP-after-MAIL") == sid and machine.state(sid) is noop
    with Client(aiosmtpd_server.host, aiosmtpd_server.port, machine=machine,
                timeout=30, keep_transcript=True) as client:
        results = [client.send(Message(SENDER, ["r@example.test"], BODY)) for _ in range(2)]
    assert [r.status for r in results] == ["delivered"] * 2
    # Closure identity: C handed back the very object registered.
    assert set(noop.ids) == {id(noop)} and len(noop.ids) == 4
    assert [r.code for r in noop.replies] == [250, 250]
    sent = _client_bytes(client)
    assert sent.count(b"NOOP\r\n") == 2
    assert sent.index(b"MAIL FROM") < sent.index(b"NOOP") < sent.index(b"RCPT TO")
    assert len(aiosmtpd_server.wait_for_messages(2)) == 2


def test_address_verification_machine(aiosmtpd_factory):
    server = aiosmtpd_factory(RefusingHandler())
    machine = Machine()
    machine.register(VerifyOnly(), after="RCPT")
    with Client(server.host, server.port, machine=machine, timeout=30,
                keep_transcript=True) as client:
        first = client.send(Message(SENDER, ["ok@example.test", "nobody@example.test",
                                             "later@example.test"], BODY))
        second = client.send(Message(SENDER, ["ok@example.test"], BODY))
    for result in (first, second):
        assert result.status == "permfail"
        assert result.reason == "address verification only: no data sent"
        assert result.state == "VERIFY"
    # The state ended it before the data: the address the server took was
    # not sent the message (its RCPT 250 stays); the others keep their verdicts.
    assert [r.status for r in first.recipients] == ["not_sent", "permfail", "tempfail"]
    assert first.recipients[0].reply.code == 250 and first.recipients[0].bounce_class is None
    assert first.recipients[1].reply.enhanced == "5.1.1"
    sent = _client_bytes(client)
    assert b"DATA" not in sent and b"hello" not in sent
    assert sent.count(b"RSET\r\n") == 1            # between the two transactions
    assert server.messages == []


@pytest.mark.parametrize("where", ["setup", "callback", "bad-return"])
def test_exception_in_transaction_state_fails_that_message_only(aiosmtpd_server, where):
    machine = Machine()
    machine.register(Raises("fragile", where), after="MAIL")
    with Client(aiosmtpd_server.host, aiosmtpd_server.port, machine=machine,
                timeout=30) as client:
        bad = client.send(Message(SENDER, ["r@example.test"], BODY))
    assert bad.status == "permfail"
    assert bad.error is not None and "fragile" in bad.error
    assert bad.state == "fragile"
    assert aiosmtpd_server.messages == []


def test_exception_after_body_keeps_delivered(aiosmtpd_server):
    machine = Machine()
    machine.register(Raises("metrics", "callback"), after="BODY")
    with Client(aiosmtpd_server.host, aiosmtpd_server.port, machine=machine,
                timeout=30, keep_transcript=True) as client:
        first = client.send(Message(SENDER, ["r@example.test"], BODY))
        second = client.send(Message(SENDER, ["r@example.test"], BODY))
    # Delivered is delivered: the error is reported, the status stays.
    assert first.status == "delivered" and "metrics" in (first.error or "")
    assert second.status == "delivered"
    assert len(aiosmtpd_server.wait_for_messages(2)) == 2


def test_exception_before_banner_fails_the_connection(aiosmtpd_server):
    machine = Machine()
    machine.register(Raises("early", "callback"), after=-1)
    client = Client(aiosmtpd_server.host, aiosmtpd_server.port, machine=machine, timeout=30)
    result = client.send(Message(SENDER, ["r@example.test"], BODY))
    client.close()
    assert result.status in ("permfail", "tempfail") and not result.ok
    assert "early" in result.reason
    assert aiosmtpd_server.messages == []


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("after", ["MAIL", -1], ids=["after-MAIL", "before-BANNER"])
def test_raise_for_status_says_a_state_raised(aiosmtpd_server, driver, after):
    """A message a Python state failed by raising is a StateCallbackError
    (a DeliveryError) naming the state; one a state failed on purpose, and
    one the server refused, are plain DeliveryErrors."""
    machine = Machine()
    machine.register(Raises("fragile", "callback"), after=after)
    server = (aiosmtpd_server.host, aiosmtpd_server.port)
    (bad,) = deliver(driver, [Message(SENDER, ["r@example.test"], BODY)], server,
                     machine=machine, timeout=30)
    assert not bad.ok and "KeyError" in (bad.error or ""), bad
    with pytest.raises(StateCallbackError) as info:
        bad.raise_for_status()
    exc = info.value
    assert isinstance(exc, DeliveryError) and exc.result is bad
    assert exc.state == "fragile" and exc.error == bad.error
    assert (exc.status, exc.stage_code) == (bad.status, bad.stage_code)
    assert "state 'fragile' raised KeyError" in str(exc)
    # Failed on purpose by a state that did not raise: not a bug, no subclass.
    machine = Machine()
    machine.register(VerifyOnly(), after="RCPT")
    (verified,) = deliver(driver, [Message(SENDER, ["r@example.test"], BODY)], server,
                          machine=machine, timeout=30)
    with pytest.raises(DeliveryError) as info:
        verified.raise_for_status()
    assert type(info.value) is DeliveryError and verified.error is None
    assert aiosmtpd_server.messages == []


def test_state_cannot_inject_commands(aiosmtpd_server):
    class Injector(State):
        name = "inject"

        def setup(self, session) -> int:
            session.send("NOOP\r\nRCPT TO:<victim@example.test>")
            return 1

    machine = Machine()
    machine.register(Injector(), after="MAIL")
    with Client(aiosmtpd_server.host, aiosmtpd_server.port, machine=machine,
                timeout=30, keep_transcript=True) as client:
        result = client.send(Message(SENDER, ["r@example.test"], BODY))
    assert result.status == "permfail"
    assert "InvalidMessageError" in (result.error or "")
    assert b"victim" not in _client_bytes(client)


def test_registering_while_connected_does_not_change_running_session(aiosmtpd_server):
    machine = Machine()
    noop = Noop()
    with Client(aiosmtpd_server.host, aiosmtpd_server.port, machine=machine,
                timeout=30, keep_transcript=True) as client:
        assert client.send(Message(SENDER, ["r@example.test"], BODY)).ok
        machine.register(noop, after="MAIL")           # while connected
        assert client.send(Message(SENDER, ["r@example.test"], BODY)).ok
    assert noop.replies == []                       # the old snapshot ran
    with Client(aiosmtpd_server.host, aiosmtpd_server.port, machine=machine,
                timeout=30) as client:
        assert client.send(Message(SENDER, ["r@example.test"], BODY)).ok
    assert len(noop.replies) == 1                   # a new connection sees it


def test_registration_errors():
    machine = Machine()
    with pytest.raises(RegistrationError, match="exists already"):
        machine.register(Raises("MAIL", "none"), after="EHLO")
    with pytest.raises(RegistrationError, match="no such state"):
        machine.register(Raises("x1", "none"), after="NOPE")
    with pytest.raises(RegistrationError, match="no such state"):
        machine.register(Raises("x2", "none"), after=999)
    with pytest.raises(RegistrationError, match="non-empty"):
        machine.register(Raises("", "none"), after=-1)
    with pytest.raises(RegistrationError, match="longer than"):
        machine.register(Raises("n" * 64, "none"), after=-1)
    with pytest.raises(RegistrationError, match="smtpstate.State"):
        machine.register(object(), after=-1)  # type: ignore[arg-type]
    assert isinstance(RegistrationError("x"), ValueError)
    assert [n for _, n in machine.states] == ["BANNER", "EHLO", "STARTTLS", "AUTH", "MAIL",
                                              "RCPT", "DATA", "BODY", "RSET", "QUIT"]


def test_custom_stage_is_reported(aiosmtpd_server):
    class Xclientish(State):
        name = "stage-reporter"
        stage = Stage.XCLIENT

        def callback(self, session, reply):
            session.fail_reason("refusing on purpose")
            return Action.TEMPFAIL_TX

    machine = Machine()
    machine.register(Xclientish(), after="RCPT")
    with Client(aiosmtpd_server.host, aiosmtpd_server.port, machine=machine, timeout=30) as c:
        result = c.send(Message(SENDER, ["r@example.test"], BODY))
    assert result.status == "tempfail"
    assert result.stage_code == Stage.XCLIENT and result.stage == "sending XCLIENT"


def test_message_validation():
    for bad in ("a\r\nb@x", "a\nb@x", "a\x00b@x", "<a@x>", "a\x7f@x"):
        with pytest.raises(InvalidMessageError):
            Message(bad, ["r@example.test"], b"x")
        with pytest.raises(ValueError):
            Message(SENDER, [bad], b"x")
    with pytest.raises(InvalidMessageError, match="at least one"):
        Message(SENDER, [], b"x")
    with pytest.raises(InvalidMessageError, match="single string"):
        Message(SENDER, "r@example.test", b"x")  # type: ignore[arg-type]
    with pytest.raises(InvalidMessageError):
        Message(SENDER, ["r@example.test"], 42)  # type: ignore[arg-type]
    with pytest.raises(InvalidMessageError):
        Message(SENDER, ["r@example.test"], b"x", envid="a\r\nb")
    with pytest.raises(InvalidMessageError):
        Message(SENDER, ["r@example.test"], b"x", dsn_ret="SOME")
    assert Message("", ["r@example.test"], "text").data == b"text"
