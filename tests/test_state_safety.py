"""Python states that misbehave must never hang, crash or lose a message.

Against real aiosmtpd servers, with every driver that runs Python states:

- a state that never waits for a reply and keeps the machine among such
  states (RETRY, or two states JUMPing to each other) fails its message
  with a clear reason, bounded in count and in time, instead of spinning;
- ``session.close()`` from inside a state is refused, not a free of the
  C session under the running loop;
- a Session kept past its connection raises instead of reading freed
  memory;
- Ctrl-C (KeyboardInterrupt) or ``sys.exit()`` inside a state reaches the
  caller at once, with the connection closed and the message's result
  recorded;
- a pooled connection idle for longer than the timeout does not fail its
  next message with a false timeout.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, List

import pytest

from smtpstate import Action, Client, Engine, LocalProtocolError, Machine, Message, State, aio

SENDER = "sender@client.test"
BODY = b"Subject: safety\r\n\r\nhello\r\n"


def msg(n: int = 1) -> Message:
    return Message(SENDER, [f"r{i}@example.test" for i in range(n)], BODY)


class Spinner(State):
    """Awaits nothing and asks to be entered again, forever."""

    name = "SPIN"

    def __init__(self, pause: float = 0.0) -> None:
        self.calls = 0
        self.pause = pause

    def callback(self, session: Any, reply: Any) -> int:
        self.calls += 1
        if self.pause:
            time.sleep(self.pause)
        return Action.RETRY


class PingPong(State):
    """Awaits nothing and JUMPs to its partner."""

    def __init__(self, name: str, partner: str) -> None:
        self.name, self.partner = name, partner
        self.calls = 0

    def callback(self, session: Any, reply: Any) -> int:
        self.calls += 1
        session.next_state(self.partner)
        return Action.JUMP


def _engine_send(server: Any, machine: Machine, message: Message, **options: Any) -> Any:
    with Engine(machine=machine, helo="client.test") as engine:
        ticket = engine.submit(message, server.host, server.port, **options)
        results = list(engine.run(timeout=30))
    assert [r.ticket for r in results] == [ticket]
    return results[0]


def _client_send(server: Any, machine: Machine, message: Message, **options: Any) -> Any:
    with Client(server.host, server.port, machine=machine, helo="client.test",
                **options) as client:
        return client.send(message)


SENDERS = [pytest.param(_client_send, id="client"), pytest.param(_engine_send, id="engine")]


# -- states that never wait ------------------------------------------------------------


@pytest.mark.parametrize("send", SENDERS)
def test_retry_loop_without_replies_is_bounded(aiosmtpd_server, send):
    machine = Machine()
    spin = Spinner()
    machine.register(spin, after="MAIL")
    started = time.monotonic()
    r = send(aiosmtpd_server, machine, msg(), timeout=3)
    assert time.monotonic() - started < 2.5             # not the 3 s timeout, nor forever
    assert r.status == "tempfail" and r.state == "SPIN"
    assert "in a row without awaiting a reply" in r.reason
    assert spin.calls <= 1001
    assert aiosmtpd_server.messages == []


@pytest.mark.parametrize("send", SENDERS)
def test_jump_ping_pong_without_replies_is_bounded(aiosmtpd_server, send):
    machine = Machine()
    ping, pong = PingPong("PING", "PONG"), PingPong("PONG", "PING")
    machine.register(ping, after="RCPT")
    machine.register(pong, after="PING")
    r = send(aiosmtpd_server, machine, msg(), timeout=3)
    assert r.status == "tempfail" and r.state in ("PING", "PONG")
    assert "in a row without awaiting a reply" in r.reason
    assert ping.calls + pong.calls <= 1001
    assert aiosmtpd_server.messages == []


@pytest.mark.parametrize("send", SENDERS)
def test_slow_loop_without_replies_meets_its_timeout(aiosmtpd_server, send):
    """Counting alone would take 1000 x 20 ms: the state's timeout, read
    on the real clock, ends it first."""
    machine = Machine()
    spin = Spinner(pause=0.02)
    machine.register(spin, after="MAIL")
    started = time.monotonic()
    r = send(aiosmtpd_server, machine, msg(), timeout=0.5)
    assert time.monotonic() - started < 3
    assert r.status == "tempfail"
    assert r.reason.startswith("timeout: state SPIN ran for"), r.reason
    assert spin.calls < 100


# -- close() from inside a state -----------------------------------------------------


class Closer(State):
    """Tries to free its own session from inside the loop."""

    name = "CLOSER"

    def __init__(self) -> None:
        self.refused: List[BaseException] = []

    def callback(self, session: Any, reply: Any) -> int:
        try:
            session.close()
        except LocalProtocolError as exc:
            self.refused.append(exc)
            raise
        return Action.NEXT


@pytest.mark.parametrize("send", SENDERS)
def test_close_from_inside_a_state_is_refused(aiosmtpd_server, send):
    machine = Machine()
    closer = Closer()
    machine.register(closer, after="MAIL")
    r = send(aiosmtpd_server, machine, msg(), timeout=5)
    assert len(closer.refused) == 1 and "Action.FAIL_CONN" in str(closer.refused[0])
    assert r.status == "permfail" and "LocalProtocolError" in (r.error or "")
    # The session was not freed under the loop: the next message goes through.
    assert send(aiosmtpd_server, Machine(), msg(), timeout=5).status == "delivered"


# -- a Session kept too long ---------------------------------------------------------


class Keeper(State):
    """Keeps the Session it was given (which it must not)."""

    name = "KEEPER"

    def __init__(self) -> None:
        self.kept: Any = None

    def callback(self, session: Any, reply: Any) -> int:
        self.kept = session
        assert session.message is not None          # fine while it runs
        return Action.NEXT


@pytest.mark.parametrize("send", SENDERS)
def test_a_kept_session_raises_once_its_connection_ended(aiosmtpd_server, send):
    machine = Machine()
    keeper = Keeper()
    machine.register(keeper, after="MAIL")
    assert send(aiosmtpd_server, machine, msg(), timeout=5).status == "delivered"
    assert keeper.kept is not None
    for use in (lambda s: s.message, lambda s: s.capabilities, lambda s: s.state,
                lambda s: s.peer, lambda s: s.send("NOOP"), lambda s: s.fail_reason("x")):
        with pytest.raises(LocalProtocolError, match="has ended"):
            use(keeper.kept)


# -- Ctrl-C inside a state -----------------------------------------------------------


class Interrupter(State):
    """Raises what a Ctrl-C (or sys.exit()) would, in setup or callback,
    the first time only."""

    name = "INTERRUPT"

    def __init__(self, exc: BaseException, where: str = "callback") -> None:
        self.exc, self.where = exc, where
        self.raised = 0

    def _maybe_raise(self) -> None:
        if not self.raised:
            self.raised += 1
            raise self.exc

    def setup(self, session: Any) -> int:
        if self.where == "setup":
            self._maybe_raise()
        return 0

    def callback(self, session: Any, reply: Any) -> int:
        if self.where == "callback":
            self._maybe_raise()
        return Action.NEXT


@pytest.mark.parametrize("where", ["setup", "callback"])
@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_interrupt_in_a_state_reaches_the_client_caller(aiosmtpd_server, exc, where):
    machine = Machine()
    machine.register(Interrupter(exc(), where), after="RCPT")
    with Client(aiosmtpd_server.host, aiosmtpd_server.port, machine=machine,
                helo="client.test", timeout=30) as client:
        started = time.monotonic()
        with pytest.raises(exc):
            client.send(msg())
        assert time.monotonic() - started < 2
        r = client.last_result
        assert r is not None and r.status == "tempfail" and r.state == "INTERRUPT"
        assert r.reason.startswith(f"interrupted: {exc.__name__} in state 'INTERRUPT'")
        assert [x.status for x in r.recipients] == ["tempfail"]
        assert not client.connected
        # The client is usable again: a new connection for the next one.
        assert client.send(msg()).status == "delivered"
    assert len(aiosmtpd_server.wait_for_messages(1)) == 1      # the second only


def test_interrupt_in_a_state_reaches_the_engine_caller(aiosmtpd_server):
    machine = Machine()
    machine.register(Interrupter(KeyboardInterrupt()), after="RCPT")
    engine = Engine(machine=machine, helo="client.test")
    try:
        tickets = [engine.submit(msg(), aiosmtpd_server.host, aiosmtpd_server.port,
                                 timeout=30) for _ in range(3)]
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            for _ in engine.run(timeout=30):
                pass
        assert time.monotonic() - started < 2
        # Nothing lost: the next call hands out the rest, one result each.
        list(engine.run(timeout=30))
        assert all(t.result is not None for t in tickets)
        statuses = sorted(t.result.status for t in tickets)
        assert statuses == ["delivered", "delivered", "tempfail"]
        (hit,) = [t.result for t in tickets if t.result.status == "tempfail"]
        assert hit.reason.startswith("interrupted: KeyboardInterrupt in state 'INTERRUPT'")
    finally:
        engine.close()
    assert len(aiosmtpd_server.wait_for_messages(2)) == 2


def test_interrupt_in_a_state_reaches_the_aio_caller(aiosmtpd_server):
    machine = Machine()
    machine.register(Interrupter(KeyboardInterrupt()), after="RCPT")

    async def main() -> Any:
        client = aio.Client(aiosmtpd_server.host, aiosmtpd_server.port, machine=machine,
                            helo="client.test", timeout=30)
        return await client.send(msg())

    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(main())
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(task)
        # The send() itself has its result: the loop goes on where it was.
        r = loop.run_until_complete(asyncio.wait_for(task, 5))
        assert r.status == "tempfail" and r.reason.startswith("interrupted: KeyboardInterrupt")
    finally:
        loop.close()
    assert aiosmtpd_server.messages == []


# -- a pooled connection idle past the timeout ----------------------------------------


def test_idle_pooled_connection_takes_its_next_message_engine(aiosmtpd_server):
    with Engine(helo="client.test", idle_timeout=30) as engine:
        results = []
        for _ in range(4):
            engine.submit(msg(), aiosmtpd_server.host, aiosmtpd_server.port, timeout=1)
            results += list(engine.run(timeout=10))
            time.sleep(1.4)                          # idle longer than the timeout
            assert engine.connections == 1
    assert [r.status for r in results] == ["delivered"] * 4, [r.reason for r in results]


def test_idle_connection_takes_its_next_message_client(aiosmtpd_server):
    with Client(aiosmtpd_server.host, aiosmtpd_server.port, helo="client.test",
                timeout=1) as client:
        results = []
        for _ in range(3):
            results.append(client.send(msg()))
            time.sleep(1.4)
    assert [r.status for r in results] == ["delivered"] * 3, [r.reason for r in results]


def test_idle_connection_takes_its_next_message_aio(aiosmtpd_server):
    async def main() -> List[Any]:
        async with aio.Client(aiosmtpd_server.host, aiosmtpd_server.port,
                              helo="client.test", timeout=1) as client:
            out = []
            for _ in range(3):
                out.append(await client.send(msg()))
                await asyncio.sleep(1.4)
            return out

    results = asyncio.run(main())
    assert [r.status for r in results] == ["delivered"] * 3, [r.reason for r in results]


# -- a machine that reaches BODY without DATA ------------------------------------------


class SkipData(State):
    """After RCPT: straight to BODY, past DATA (a broken machine)."""

    name = "SKIP-DATA"

    def callback(self, session: Any, reply: Any) -> int:
        session.next_state("BODY")
        return Action.JUMP


@pytest.mark.parametrize("send", SENDERS)
def test_body_never_starts_without_a_354(aiosmtpd_server, send):
    """Without a 354 the server reads commands: the content would be taken
    line by line as commands. BODY refuses to start; the message fails."""
    machine = Machine()
    machine.register(SkipData(), after="RCPT")
    r = send(aiosmtpd_server, machine, msg(), timeout=5)
    assert r.status == "permfail" and r.state == "BODY"
    assert "BODY was entered without a 354 reply to DATA" in r.reason
    assert aiosmtpd_server.messages == []


class FreeReader(State):
    """Uses its Session in free(): allowed, the connection is ending then."""

    name = "FREE-READER"

    def __init__(self) -> None:
        self.seen: List[Any] = []
        self.data_seen: List[Any] = []

    def callback(self, session: Any, reply: Any) -> int:
        session.data["n"] = session.data.get("n", 0) + 1
        return Action.NEXT

    def free(self, session: Any) -> None:
        self.seen.append(session.peer)
        self.data_seen.append(dict(session.data))      # its own, to release


@pytest.mark.parametrize("send", SENDERS)
def test_free_may_use_its_session(aiosmtpd_server, send, caplog):
    machine = Machine()
    reader = FreeReader()
    machine.register(reader, after="MAIL")
    assert send(aiosmtpd_server, machine, msg(), timeout=5).status == "delivered"
    assert [host for host, _ in reader.seen] == ["127.0.0.1"]
    assert reader.data_seen == [{"n": 1}]
    assert "free() raised" not in caplog.text


# -- Ctrl-C in free() or stage(), where C cannot stop ----------------------------------


class FreeInterrupted(State):
    """Ctrl-C arrives while the connection's states are freed."""

    name = "FREE-KI"

    def free(self, session: Any) -> None:
        raise KeyboardInterrupt


def _aio_send(server: Any, machine: Machine, message: Message, **options: Any) -> Any:
    async def main() -> Any:
        async with aio.Client(server.host, server.port, machine=machine,
                              helo="client.test", **options) as client:
            return await client.send(message)
    return asyncio.run(main())


@pytest.mark.parametrize("send", SENDERS + [pytest.param(_aio_send, id="aio")])
def test_interrupt_in_free_reaches_that_call_not_a_later_one(aiosmtpd_server, send):
    """The call that freed the session raises it; an unrelated later call
    on the same thread is not interrupted by it."""
    machine = Machine()
    machine.register(FreeInterrupted(), after="MAIL")
    with pytest.raises(KeyboardInterrupt):
        send(aiosmtpd_server, machine, msg(), timeout=5)
    assert _client_send(aiosmtpd_server, Machine(), msg(), timeout=5).status == "delivered"
    assert len(aiosmtpd_server.wait_for_messages(2)) == 2      # the first went too


class StageInterrupted(State):
    """Fails its transaction; Ctrl-C arrives in its stage()."""

    name = "STAGE-KI"

    @staticmethod
    def stage(session: Any, awaiting: int) -> str:
        raise KeyboardInterrupt

    def callback(self, session: Any, reply: Any) -> int:
        return Action.PERMFAIL_TX


def test_interrupt_in_stage_stops_the_engine_run(aiosmtpd_server):
    machine = Machine()
    machine.register(StageInterrupted(), after="MAIL")
    with Engine(machine=machine, helo="client.test") as engine:
        ticket = engine.submit(msg(), aiosmtpd_server.host, aiosmtpd_server.port,
                               timeout=5)
        with pytest.raises(KeyboardInterrupt):
            list(engine.run(timeout=10))
        list(engine.run(timeout=10))           # nothing lost: it has its result
        assert ticket.result is not None and ticket.result.status == "permfail"
    assert _client_send(aiosmtpd_server, Machine(), msg(), timeout=5).status == "delivered"


# -- a state that leaves the transaction by jumping to RSET --------------------------


class LeaveAfterRcpt(State):
    """Leaves the transaction after RCPT with no verdict (an address check
    that only wants the RCPT replies)."""

    name = "LEAVE"

    def callback(self, session: Any, reply: Any) -> int:
        session.next_state("RSET")
        return Action.JUMP


def test_jump_to_rset_resets_the_open_server_transaction(aiosmtpd_server):
    """The server accepted MAIL and RCPT, so its transaction is open: RSET
    must go before the next MAIL, or that MAIL is refused (503, nested)."""
    machine = Machine()
    machine.register(LeaveAfterRcpt(), after="RCPT")
    with Client(aiosmtpd_server.host, aiosmtpd_server.port, machine=machine,
                helo="client.test", timeout=10, keep_transcript=True) as client:
        first = client.send(msg())
        second = client.send(msg())
    sent = b"".join(d for who, d in client.transcript if who == "C")
    # RSET before the second MAIL; after the second, QUIT ends it anyway.
    between = sent.split(b"MAIL FROM:")
    assert len(between) == 3 and b"RSET\r\n" in between[1], sent
    for r in (first, second):
        assert r.status != "delivered"
        assert [x.reply.code for x in r.recipients] == [250]
        assert r.reply is None or r.reply.code != 503, r
    assert aiosmtpd_server.messages == []
