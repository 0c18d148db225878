"""The native engine (smtpstate.Engine, smtpstate.deliver): many concurrent
connections from one thread, against real servers on loopback (aiosmtpd,
Postfix smtp-sink, a private Postfix smtpd) and small hostile servers
written here, all on one asyncio loop in a thread: one that rejects
everything, one that refuses with 554 or 421 at the greeting, one that
stalls after its greeting, and ones that drop the connection after the
greeting, after MAIL, in the middle of the data and after the final dot.

What is checked: every ticket gets exactly one result with the right
status; a stalled server delays nobody else; pool limits hold, counted at
the server; Python states run inside the engine; connect and DNS failures
are reported at stage "not connected". Everything is bounded in time and
uses loopback addresses only.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import threading
import time
from typing import Any, Dict, List, Optional

import pytest

import smtpstate
from handlers import RefusingHandler
from helpers import missing, requires
from smtpstate import Action, Engine, Machine, Message, State, Ticket, deliver
from smtpstate.errors import InvalidOptionError, LocalProtocolError

SENDER = "sender@client.test"


def _body(i: int, tag: str = "engine") -> bytes:
    return b"Subject: %s %d\r\n\r\nline one of %d\r\n.dot line\r\n" % (tag.encode(), i, i)


def _closed_port(host: str = "127.0.0.1") -> int:
    """A loopback port nothing listens on (bound, then released)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _run_all(engine: Engine, timeout: float = 60.0) -> List[smtpstate.Result]:
    results = list(engine.run(timeout=timeout))
    assert engine.pending == 0 and len(engine) == 0
    return results


def _assert_one_each(tickets: List[Ticket], results: List[smtpstate.Result]) -> None:
    """Every ticket has exactly one result, and it is that ticket's."""
    ids = [r.ticket.id for r in results]
    assert len(ids) == len(set(ids)), "a ticket got two results"
    assert sorted(ids) == sorted(t.id for t in tickets)
    for t in tickets:
        assert t.done and t.result is not None and t.result.ticket is t
        assert t.result.message is t.message


# ---------------------------------------------------------------------------
# Small servers of our own, good and bad, on one asyncio loop in a thread
# ---------------------------------------------------------------------------


class Group:
    """Connections open at once over several scripted servers."""

    def __init__(self) -> None:
        self.active = 0
        self.max_active = 0


class Scripted:
    """One scripted server: ``.port``, ``.connections`` (accepted so far),
    ``.active``, ``.max_active`` (at once), ``.messages`` (the data of each
    transaction accepted, unstuffed), ``.commands`` (every command line).

    Behaviours: "accept" everything; "reject" every MAIL with 550; "554"
    or "421" at the greeting; "stall" after the greeting (reads, never
    answers); "drop-banner", "drop-mail" (on MAIL), "drop-data" (after
    354, without reading the body) and "drop-dot" (after the whole body,
    before answering) hang up."""

    def __init__(self, behaviour: str, delay: float, group: Optional[Group]) -> None:
        self.behaviour = behaviour
        self.delay = delay
        self.group = group if group is not None else Group()
        self.port = 0
        self.host = "127.0.0.1"
        self.connections = 0
        self.active = 0
        self.max_active = 0
        self.messages: List[bytes] = []
        self.commands: List[bytes] = []
        self.server: Optional[asyncio.AbstractServer] = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.group.active += 1
        self.group.max_active = max(self.group.max_active, self.group.active)
        try:
            await self._script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                asyncio.CancelledError):
            pass
        finally:
            self.active -= 1
            self.group.active -= 1
            writer.transport.abort()

    async def _script(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        b = self.behaviour
        if b == "421":
            writer.write(b"421 4.3.2 scripted.test service not available\r\n")
            await writer.drain()
            return
        if b == "554":
            writer.write(b"554 5.7.1 scripted.test no SMTP service here\r\n")
        else:
            writer.write(b"220 scripted.test ESMTP\r\n")
        await writer.drain()
        if b == "drop-banner":
            return
        if b == "stall":
            while await reader.read(65536):      # read, never answer
                pass
            return
        while True:
            line = await reader.readline()
            if not line:
                return
            self.commands.append(line)
            if self.delay:
                await asyncio.sleep(self.delay)
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                reply = b"250-scripted.test\r\n250 8BITMIME\r\n" if b != "554" else b"503 5.5.1 no\r\n"
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                await writer.drain()
                return
            elif b == "554":
                reply = b"503 5.5.1 no\r\n"
            elif verb == b"MAIL":
                if b == "drop-mail":
                    return
                reply = b"550 5.7.1 we take nothing\r\n" if b == "reject" else b"250 2.1.0 ok\r\n"
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                if b == "drop-data":
                    # Stop reading at once: the client cannot get the whole
                    # (large) body out; then reset the connection.
                    writer.transport.pause_reading()
                    await asyncio.sleep(0.05)
                    return
                data = await reader.readuntil(b"\r\n.\r\n")
                if b == "drop-dot":
                    return                        # took it all, never answers
                # Undo the dot-stuffing (RFC 5321 4.5.2), as servers do.
                lines = data[:-3].split(b"\r\n")
                self.messages.append(b"\r\n".join(
                    line[1:] if line.startswith(b".") else line for line in lines))
                reply = b"250 2.0.0 queued\r\n"
            else:
                reply = b"250 2.0.0 ok\r\n"
            writer.write(reply)
            await writer.drain()


class ScriptedServers:
    """Scripted servers on one event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: List[Scripted] = []

    def start(self, behaviour: str = "accept", *, host: str = "127.0.0.1",
              delay: float = 0.0, group: Optional[Group] = None) -> Scripted:
        srv = Scripted(behaviour, delay, group)
        srv.host = host

        async def listen() -> None:
            srv.server = await asyncio.start_server(srv.handle, host, 0, limit=64 << 20,
                                                    backlog=1024)
            srv.port = srv.server.sockets[0].getsockname()[1]

        asyncio.run_coroutine_threadsafe(listen(), self.loop).result(10)
        self.servers.append(srv)
        return srv

    def stop(self) -> None:
        async def close() -> None:
            for srv in self.servers:
                if srv.server is not None:
                    srv.server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def scripted():
    servers = ScriptedServers()
    yield servers
    servers.stop()


# ---------------------------------------------------------------------------
# (a) real servers, hundreds of messages, many connections
# ---------------------------------------------------------------------------


def test_aiosmtpd_many_messages(aiosmtpd_server):
    n = 300
    with Engine(max_per_destination=50, helo="client.test") as engine:
        tickets = [engine.submit(Message(SENDER, [f"r{i}@example.test"], _body(i)),
                                 aiosmtpd_server.host, aiosmtpd_server.port, timeout=30)
                   for i in range(n)]
        assert engine.pending == n
        results = _run_all(engine)
    _assert_one_each(tickets, results)
    assert collections.Counter(r.status for r in results) == {"delivered": n}
    assert all(r.reply is not None and r.reply.code == 250 for r in results)
    got = aiosmtpd_server.wait_for_messages(n)
    assert sorted(m.data for m in got) == sorted(_body(i) for i in range(n))
    by_rcpt = {m.rcpt_tos[0]: m.data for m in got}
    assert all(by_rcpt[f"r{i}@example.test"] == _body(i) for i in range(n))
    assert {m.helo for m in got} == {"client.test"}
    # Pooled: far fewer connections than messages, more than one.
    assert 1 < len(aiosmtpd_server.connections) <= 50


def test_smtp_sink_many_messages(smtp_sink_server):
    n = 400
    messages = [Message(SENDER, [f"r{i}@example.test"], _body(i, "sink")) for i in range(n)]
    with Engine(max_per_destination=100, helo="client.test") as engine:
        tickets = [engine.submit(m, smtp_sink_server.host, smtp_sink_server.port, timeout=30)
                   for m in messages]
        results = _run_all(engine)
        # Idle connections stay pooled until closed.
        assert 1 <= engine.connections <= 100
    _assert_one_each(tickets, results)
    assert {r.status for r in results} == {"delivered"}
    got = smtp_sink_server.wait_for_messages(n)
    assert len(got) == n
    assert sorted(m.data for m in got) == sorted(_body(i, "sink") for i in range(n))
    assert {m.rcpt_tos[0]: m.data for m in got} == {
        f"r{i}@example.test": _body(i, "sink") for i in range(n)}


def test_postfix_many_messages(postfix_server):
    n = 200
    messages = [Message(SENDER, [f"user{i}@example.test"], _body(i, "postfix"))
                for i in range(n)]
    results = deliver(messages, postfix_server.host, postfix_server.port, concurrency=50,
                      timeout=30, helo="client.test")
    assert [r.message for r in results] == messages
    assert {r.status for r in results} == {"delivered"}, collections.Counter(
        str(r) for r in results)
    got = postfix_server.wait_for_messages(n, timeout=60)
    assert len(got) == n
    assert sorted(m.data for m in got) == sorted(_body(i, "postfix") for i in range(n))
    assert {m.rcpt_tos[0] for m in got} == {f"user{i}@example.test" for i in range(n)}


# ---------------------------------------------------------------------------
# (b) hundreds of connections, real and hostile servers mixed in one run
# ---------------------------------------------------------------------------

BIG = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 8000   # 8 MB


def test_mixed_real_and_hostile_servers(aiosmtpd_server, smtp_sink_server, scripted):
    stall_timeout = 2.5
    plan: Dict[str, Any] = {
        # name: (server, messages, expected status, body)
        "aiosmtpd": (aiosmtpd_server, 100, "delivered", None),
        "smtp-sink": (smtp_sink_server, 150, "delivered", None),
        "reject": (scripted.start("reject"), 60, "permfail", None),
        "554": (scripted.start("554"), 20, "permfail", None),
        "421": (scripted.start("421"), 30, "tempfail", None),
        "stall": (scripted.start("stall"), 40, "tempfail", None),
        "drop-banner": (scripted.start("drop-banner"), 30, "tempfail", None),
        "drop-mail": (scripted.start("drop-mail"), 30, "tempfail", None),
        "drop-data": (scripted.start("drop-data"), 4, "tempfail", BIG),
        "drop-dot": (scripted.start("drop-dot"), 30, "unknown", None),
    }
    tickets: Dict[str, List[Ticket]] = {}
    arrived: Dict[int, float] = {}
    peak = 0
    with Engine(max_connections=500, max_per_destination=60, helo="client.test") as engine:
        t0 = time.monotonic()
        for name, (server, count, _, body) in plan.items():
            timeout = stall_timeout if name == "stall" else 30
            tickets[name] = [
                engine.submit(Message(SENDER, [f"{name}{i}@example.test"],
                                      body if body is not None else _body(i, name)),
                              server.host, server.port, timeout=timeout)
                for i in range(count)]
        results = []
        for r in engine.run(timeout=60):
            arrived[r.ticket.id] = time.monotonic() - t0
            peak = max(peak, engine.connections)
            results.append(r)
    everything = [t for ts in tickets.values() for t in ts]
    _assert_one_each(everything, results)
    for name, (_, count, status, _) in plan.items():
        got = collections.Counter(t.result.status for t in tickets[name])
        assert got == {status: count}, (name, got, [str(t.result) for t in tickets[name]][:3])

    # The details say what happened where.
    assert all(t.result.reply.code == 550 for t in tickets["reject"])
    assert all("421 4.3.2" in t.result.reason for t in tickets["421"])
    assert all("554" in t.result.reason for t in tickets["554"])
    assert all("timeout" in t.result.reason for t in tickets["stall"])
    assert all(t.result.stage == "sending MAIL FROM" for t in tickets["drop-mail"])
    assert all(t.result.stage in ("sending message body", "reading final confirmation")
               and "lost" in t.result.reason for t in tickets["drop-data"])
    assert all("after the final dot" in t.result.reason for t in tickets["drop-dot"])

    # A stalled server delays nobody else: every other result came before
    # the stalled ones timed out, and those took their whole timeout.
    stalled = [arrived[t.id] for t in tickets["stall"]]
    others = [arrived[t.id] for name, ts in tickets.items() if name != "stall" for t in ts]
    assert min(stalled) >= stall_timeout - 0.1
    assert max(others) < min(stalled), (max(others), min(stalled))
    assert peak >= 150, peak                     # connections open at once

    # The real servers got exactly the bytes.
    got = aiosmtpd_server.wait_for_messages(100)
    assert sorted(m.data for m in got) == sorted(_body(i, "aiosmtpd") for i in range(100))
    sink = smtp_sink_server.wait_for_messages(150)
    assert sorted(m.data for m in sink) == sorted(_body(i, "smtp-sink") for i in range(150))
    # Hundreds of connections were open at once across the servers.
    assert plan["stall"][0].max_active == 40
    assert plan["drop-dot"][0].connections == 30


# ---------------------------------------------------------------------------
# (c) no connection at all
# ---------------------------------------------------------------------------


def test_connect_refused_is_tempfail_not_connected():
    port = _closed_port()
    with Engine(helo="client.test") as engine:
        tickets = [engine.submit(Message(SENDER, ["r@example.test"], _body(i)),
                                 "127.0.0.1", port, timeout=5) for i in range(5)]
        results = _run_all(engine, timeout=20)
        assert engine.connections == 0
    _assert_one_each(tickets, results)
    for r in results:
        assert r.status == "tempfail" and r.stage == "not connected" and r.stage_code == 0
        assert "Connection refused" in r.reason and f":{port}" in r.reason
        assert r.reply is None
        assert [x.status for x in r.recipients] == ["tempfail"]


def _resolves_quickly(name: str, limit: float = 3.0) -> bool:
    """Does getaddrinfo(name) fail within limit seconds here (no network
    needed for .invalid, but a misconfigured resolver may hang)?"""
    done = threading.Event()

    def look() -> None:
        try:
            socket.getaddrinfo(name, 25)
        except OSError:
            pass
        done.set()

    threading.Thread(target=look, daemon=True).start()
    return done.wait(limit)


def test_unresolvable_host_is_tempfail_not_connected():
    name = "no-such-host.smtpstate.invalid"
    if not _resolves_quickly(name):
        missing("the resolver takes too long to fail for .invalid here")
    with Engine(helo="client.test", connect_timeout=10) as engine:
        tickets = [engine.submit(Message(SENDER, ["r@example.test"], _body(i)), name, 25)
                   for i in range(3)]
        results = _run_all(engine, timeout=20)
    _assert_one_each(tickets, results)
    for r in results:
        assert r.status == "tempfail" and r.stage == "not connected"
        assert r.reason.startswith(f"cannot resolve {name}")


def test_names_are_resolved(smtp_sink_server):
    if not _resolves_quickly("localhost"):
        missing("localhost does not resolve quickly here")
    try:
        infos = socket.getaddrinfo("localhost", smtp_sink_server.port, type=socket.SOCK_STREAM)
    except OSError:
        missing("localhost does not resolve here")
    if not any(i[4][0] == "127.0.0.1" for i in infos):
        missing("localhost is not 127.0.0.1 here")
    results = deliver([Message(SENDER, ["r@example.test"], _body(i)) for i in range(3)],
                      "localhost", smtp_sink_server.port, concurrency=2, timeout=10)
    # Addresses other than 127.0.0.1 (::1) may refuse; one of them works.
    assert {r.status for r in results} == {"delivered"}, [str(r) for r in results]


# ---------------------------------------------------------------------------
# (d) IPv6
# ---------------------------------------------------------------------------


def _have_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@requires(_have_ipv6_loopback(), "no IPv6 loopback (::1) here")
def test_ipv6_loopback(scripted):
    server = scripted.start("accept", host="::1")
    with Engine(helo="client.test") as engine:
        tickets = [engine.submit(Message(SENDER, ["r@example.test"], _body(i, "v6")),
                                 host, server.port, timeout=10)
                   for i, host in enumerate(["::1", "[::1]", "::1"])]
        results = _run_all(engine, timeout=20)
    _assert_one_each(tickets, results)
    assert {r.status for r in results} == {"delivered"}, [str(r) for r in results]
    assert sorted(server.messages) == sorted(_body(i, "v6") for i in range(3))


@requires(_have_ipv6_loopback(), "no IPv6 loopback (::1) here")
def test_ipv6_refused():
    port = _closed_port("::1")
    (r,) = deliver([Message(SENDER, ["r@example.test"], b"x\r\n")], "::1", port, timeout=5)
    assert r.status == "tempfail" and r.stage == "not connected"
    assert "[::1]" in r.reason and "refused" in r.reason


# ---------------------------------------------------------------------------
# (e) Python states inside the engine
# ---------------------------------------------------------------------------


class AfterMail(State):
    """After MAIL: a NOOP per message; raises for senders with "boom"."""

    name = "NOOP-after-MAIL"

    def __init__(self) -> None:
        self.ids: List[int] = []
        self.seen: List[str] = []
        self.per_connection: List[int] = []
        self.freed = 0

    def setup(self, session) -> int:
        self.ids.append(id(self))
        message = session.message
        assert message is not None
        self.seen.append(message.recipients[0])
        if "boom" in message.sender:
            raise RuntimeError(f"boom for {message.recipients[0]}")
        session.data["count"] = session.data.get("count", 0) + 1
        self.per_connection.append(session.data["count"])
        session.send("NOOP")
        return 1

    def callback(self, session, reply) -> int:
        self.ids.append(id(self))
        assert reply is not None and reply.code == 250
        return Action.NEXT

    def free(self, session) -> None:
        self.freed += 1


def test_python_state_in_engine(aiosmtpd_server):
    machine = Machine()
    state = AfterMail()
    machine.register(state, after="MAIL")
    n = 60
    messages = [Message("boom@client.test" if i % 10 == 3 else SENDER,
                        [f"r{i}@example.test"], _body(i)) for i in range(n)]
    with Engine(machine=machine, max_per_destination=8, messages_per_connection=5,
                helo="client.test") as engine:
        tickets = [engine.submit(m, aiosmtpd_server.host, aiosmtpd_server.port, timeout=30)
                   for m in messages]
        results = _run_all(engine)
        # Views live exactly as long as their C sessions.
        assert len(engine._views) <= engine.connections
    assert engine._views == {}
    _assert_one_each(tickets, results)
    for i, t in enumerate(tickets):
        r = t.result
        if i % 10 == 3:
            assert r.status == "permfail" and r.state == "NOOP-after-MAIL"
            assert r.error is not None and f"boom for r{i}@example.test" in r.error
            assert "RuntimeError" in r.error
        else:
            assert r.status == "delivered" and r.error is None, str(r)
    # The state ran for every message, with the very object registered.
    assert sorted(state.seen) == sorted(f"r{i}@example.test" for i in range(n))
    assert set(state.ids) == {id(state)}
    # session.data is per connection: counts restart on each connection
    # (at most five messages per connection).
    assert max(state.per_connection) <= 5 and state.per_connection.count(1) >= n // 5
    assert state.freed >= n // 5                 # free() once per connection
    got = aiosmtpd_server.wait_for_messages(n - n // 10)
    assert len(got) == n - n // 10


class ConnectionPhaseBoom(State):
    """Before the banner: raises on the first connection only."""

    name = "BOOM-first"

    def __init__(self) -> None:
        self.calls = 0

    def setup(self, session) -> int:
        self.calls += 1
        if self.calls == 1:
            raise ValueError("no connection for you")
        return 0


def test_python_state_failing_outside_a_transaction(scripted):
    server = scripted.start("accept")
    machine = Machine()
    machine.register(ConnectionPhaseBoom(), after=-1)
    with Engine(machine=machine, max_per_destination=1, helo="client.test") as engine:
        first = engine.submit(Message(SENDER, ["a@example.test"], b"a\r\n"),
                              server.host, server.port, timeout=10)
        results = _run_all(engine, timeout=20)
        second = engine.submit(Message(SENDER, ["b@example.test"], b"b\r\n"),
                               server.host, server.port, timeout=10)
        results += _run_all(engine, timeout=20)
    _assert_one_each([first, second], results)
    assert first.result.status == "permfail"
    assert first.result.error is not None and "no connection for you" in first.result.error
    assert second.result.status == "delivered" and second.result.error is None


# ---------------------------------------------------------------------------
# (f) deliver()
# ---------------------------------------------------------------------------


def test_deliver_keeps_order(aiosmtpd_factory):
    server = aiosmtpd_factory(RefusingHandler())
    rcpts = ["ok", "nobody", "later", "ok", "ok", "nobody"] * 10
    messages = [Message(SENDER, [f"{who}@example.test"], _body(i))
                for i, who in enumerate(rcpts)]
    results = deliver(messages, server.host, server.port, concurrency=7, timeout=30)
    assert len(results) == len(messages)
    expect = {"ok": "delivered", "nobody": "permfail", "later": "tempfail"}
    for i, (r, who) in enumerate(zip(results, rcpts)):
        assert r.message is messages[i]
        assert r.status == expect[who], (i, str(r))
        assert r.recipients[0].address == f"{who}@example.test"
        assert isinstance(r.ticket, Ticket) and r.ticket.message is messages[i]
    assert len(server.wait_for_messages(rcpts.count("ok"))) == rcpts.count("ok")


def test_deliver_empty_and_bad_arguments():
    assert deliver([], "127.0.0.1", 25) == []
    with pytest.raises(TypeError):
        deliver([b"not a message"], "127.0.0.1", 25)
    with pytest.raises(TypeError):
        deliver([Message(SENDER, ["r@example.test"], b"x")], "127.0.0.1", 25, bogus=1)
    with pytest.raises(InvalidOptionError):
        deliver([Message(SENDER, ["r@example.test"], b"x")], "127.0.0.1", 25, concurrency=0)


# ---------------------------------------------------------------------------
# (g) pool limits, counted at the server
# ---------------------------------------------------------------------------


def test_max_per_destination_and_reuse(scripted):
    server = scripted.start("accept", delay=0.002)
    n = 80
    with Engine(max_per_destination=5, messages_per_connection=10,
                helo="client.test") as engine:
        for i in range(n):
            engine.submit(Message(SENDER, ["r@example.test"], _body(i)), server.host,
                          server.port, timeout=10)
        results = _run_all(engine)
        assert engine.connections <= 5
    assert {r.status for r in results} == {"delivered"}
    assert server.max_active <= 5
    assert server.max_active >= 2                # it did run them in parallel
    # Ten messages per connection at most, and reuse: one EHLO per connection.
    assert n // 10 <= server.connections <= n
    assert sum(1 for c in server.commands if c.startswith(b"EHLO")) == server.connections
    assert len(server.messages) == n


def test_max_connections_across_destinations(scripted):
    group = Group()
    servers = [scripted.start("accept", delay=0.002, group=group) for _ in range(3)]
    with Engine(max_connections=6, max_per_destination=4, idle_timeout=0.05,
                helo="client.test") as engine:
        tickets = [engine.submit(Message(SENDER, ["r@example.test"], _body(i)),
                                 servers[i % 3].host, servers[i % 3].port, timeout=10)
                   for i in range(90)]
        seen = 0
        for _ in engine.run(timeout=60):
            seen = max(seen, engine.connections)
    assert {t.result.status for t in tickets} == {"delivered"}
    assert seen <= 6
    assert group.max_active <= 6                 # counted at the servers
    assert group.max_active >= 4
    assert all(s.max_active <= 4 for s in servers)
    assert sum(len(s.messages) for s in servers) == 90


def test_idle_connections_reused_then_timed_out(scripted):
    server = scripted.start("accept")
    with Engine(max_per_destination=1, idle_timeout=0.3, helo="client.test") as engine:
        for i in range(3):
            engine.submit(Message(SENDER, ["r@example.test"], _body(i)), server.host,
                          server.port, timeout=10)
        assert {r.status for r in _run_all(engine)} == {"delivered"}
        assert server.connections == 1 and engine.connections == 1
        # Soon after: the pooled connection is reused.
        engine.submit(Message(SENDER, ["r@example.test"], b"again\r\n"), server.host,
                      server.port, timeout=10)
        assert {r.status for r in _run_all(engine)} == {"delivered"}
        assert server.connections == 1
        # After the idle timeout: QUIT, and a new connection.
        time.sleep(0.5)
        engine.submit(Message(SENDER, ["r@example.test"], b"later\r\n"), server.host,
                      server.port, timeout=10)
        assert {r.status for r in _run_all(engine)} == {"delivered"}
        assert server.connections == 2
    assert server.commands.count(b"QUIT\r\n") >= 1
    deadline = time.monotonic() + 5
    while server.active and time.monotonic() < deadline:   # close() said QUIT
        time.sleep(0.01)
    assert server.active == 0
    assert server.commands.count(b"QUIT\r\n") == 2


# ---------------------------------------------------------------------------
# The Python API's edges
# ---------------------------------------------------------------------------


def test_engine_api_misuse(scripted):
    server = scripted.start("accept")
    engine = Engine(helo="client.test")
    with pytest.raises(TypeError):
        engine.submit(b"x", server.host, server.port)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        engine.submit(Message(SENDER, ["r@example.test"], b"x"), server.host, server.port,
                      nonsense=True)
    for bad_host in ("", "a b", "x" * 300):
        with pytest.raises(InvalidOptionError):
            engine.submit(Message(SENDER, ["r@example.test"], b"x"), bad_host, 25)
    for bad_port in (0, 70000, "25"):
        with pytest.raises(InvalidOptionError):
            engine.submit(Message(SENDER, ["r@example.test"], b"x"), "127.0.0.1", bad_port)
    with pytest.raises(InvalidOptionError):
        Engine(max_connections=0)
    with pytest.raises(InvalidOptionError):
        Engine(idle_timeout=-1)
    with pytest.raises(InvalidOptionError):
        Engine(helo="bad helo")
    ticket = engine.submit(Message(SENDER, ["r@example.test"], b"x\r\n"), server.host,
                           server.port, timeout=10)
    assert repr(ticket).endswith("pending>") and not ticket.done
    assert len(engine) == 1
    (result,) = list(engine.run(timeout=20))
    assert result.ok and ticket.result is result and ticket.done
    engine.close()
    engine.close()                                # idempotent
    assert engine.closed
    with pytest.raises(LocalProtocolError):
        engine.submit(Message(SENDER, ["r@example.test"], b"x"), server.host, server.port)


class SubmitsFromInside(State):
    name = "SUBMIT-inside"

    def __init__(self) -> None:
        self.engine: Optional[Engine] = None
        self.tickets: list = []

    def setup(self, session) -> int:
        assert self.engine is not None
        if not self.tickets:                   # once: the copy runs this state too
            self.tickets.append(self.engine.submit(session.message, "127.0.0.1", 25))
        return 0


def test_submit_from_a_state_inside_run_is_queued(scripted):
    """Decided (issue 13): submit() from a state running inside run() is
    allowed, as the C docs always said: it waits in the inbox and starts at
    the loop's next turn; both messages get their results."""
    server = scripted.start("accept")
    machine = Machine()
    state = SubmitsFromInside()
    machine.register(state, after="MAIL")
    with Engine(machine=machine, helo="client.test") as engine:
        state.engine = engine
        t = engine.submit(Message(SENDER, ["r@example.test"], b"x\r\n"), server.host,
                          server.port, timeout=10)
        results = _run_all(engine, timeout=20)
    assert len(results) == 2 and {r.ticket for r in results} == {t, state.tickets[0]}
    assert t.result is not None and t.result.error is None
    assert state.tickets[0].result is not None
    assert state.tickets[0].id != t.id


def test_run_timeout_raises_and_resumes(scripted):
    server = scripted.start("stall")
    with Engine(helo="client.test") as engine:
        t = engine.submit(Message(SENDER, ["r@example.test"], b"x\r\n"), server.host,
                          server.port, timeout=1.0)
        with pytest.raises(TimeoutError):
            list(engine.run(timeout=0.2))
        assert engine.pending == 1
        (r,) = _run_all(engine, timeout=20)
    assert r.ticket is t and r.status == "tempfail" and "timeout" in r.reason


def test_leaving_the_with_block_delivers_what_is_pending(smtp_sink_server):
    """As a concurrent.futures executor waits for its work on exit: submit()
    without run() still delivers, by the end of the block."""
    messages = [Message(SENDER, [f"r{i}@example.test"], _body(i, "exit")) for i in range(3)]
    with Engine(helo="client.test") as engine:
        tickets = [engine.submit(m, smtp_sink_server.host, smtp_sink_server.port, timeout=30)
                   for m in messages]
        first = next(engine.run(timeout=30))            # one taken, two left to the exit
    assert engine.closed and first.ok
    assert [t.result.status for t in tickets] == ["delivered"] * 3, tickets
    got = smtp_sink_server.wait_for_messages(3)
    assert sorted(m.data for m in got) == sorted(m.data for m in messages)


def test_an_exception_leaving_the_with_block_drops_what_is_pending(aiosmtpd_server, caplog):
    """An exception on its way out is not held up by deliveries: the engine
    closes at once and says what it dropped."""
    caplog.set_level(logging.WARNING, logger="smtpstate.engine")
    with pytest.raises(KeyError, match="on the way out"):
        with Engine(helo="client.test") as engine:
            t = engine.submit(Message(SENDER, ["r@example.test"], b"x\r\n"),
                              aiosmtpd_server.host, aiosmtpd_server.port, timeout=30)
            raise KeyError("on the way out")
    assert engine.closed and t.result is None
    (record,) = [r for r in caplog.records if r.name == "smtpstate.engine"]
    assert "1 message(s) still without a result" in record.getMessage()
    assert f"127.0.0.1:{aiosmtpd_server.port}" in record.getMessage()   # which ones
    assert aiosmtpd_server.connections == [] and aiosmtpd_server.messages == []
    # Closed inside the block: leaving it neither runs nor raises.
    with Engine(helo="client.test") as engine:
        engine.submit(Message(SENDER, ["r@example.test"], b"x\r\n"),
                      aiosmtpd_server.host, aiosmtpd_server.port, timeout=30)
        engine.close()
    assert aiosmtpd_server.connections == []


def test_required_tls_not_offered(scripted):
    """TLS is the session's business: the engine only applies the options.
    STARTTLS required and not offered: every message tempfails, in clear
    nothing but EHLO and QUIT was sent."""
    server = scripted.start("accept")
    with Engine(helo="client.test") as engine:
        tickets = [engine.submit(Message(SENDER, ["r@example.test"], b"x\r\n"), server.host,
                                 server.port, tls="starttls", timeout=5) for _ in range(3)]
        results = _run_all(engine, timeout=20)
    _assert_one_each(tickets, results)
    assert {r.status for r in results} == {"tempfail"}, [str(r) for r in results]
    assert server.messages == []
    assert {c.split()[0] for c in server.commands} <= {b"EHLO", b"QUIT"}


def test_starttls_and_implicit_tls_many_connections(aiosmtpd_factory, tls_server_context,
                                                     tls_ca_file):
    starttls = aiosmtpd_factory(tls_context=tls_server_context, require_starttls=True)
    implicit = aiosmtpd_factory(ssl_context=tls_server_context)
    n = 40
    with Engine(max_per_destination=8, helo="client.test") as engine:
        tickets = [engine.submit(Message(SENDER, [f"s{i}@example.test"], _body(i, "starttls")),
                                 starttls.host, starttls.port, tls="starttls",
                                 ca_file=tls_ca_file, timeout=20) for i in range(n)]
        tickets += [engine.submit(Message(SENDER, [f"i{i}@example.test"], _body(i, "implicit")),
                                  implicit.host, implicit.port, tls="implicit",
                                  ca_file=tls_ca_file, timeout=20) for i in range(n)]
        results = _run_all(engine)
    _assert_one_each(tickets, results)
    assert {r.status for r in results} == {"delivered"}, [str(r) for r in results][:3]
    got = starttls.wait_for_messages(n)
    assert sorted(m.data for m in got) == sorted(_body(i, "starttls") for i in range(n))
    assert all(m.extra["tls"] for m in got)
    assert 1 < len(starttls.connections) <= 8
    got = implicit.wait_for_messages(n)
    assert sorted(m.data for m in got) == sorted(_body(i, "implicit") for i in range(n))


def test_tls_name_mismatch_fails_every_message(aiosmtpd_factory, tls_server_context,
                                               tls_ca_file):
    server = aiosmtpd_factory(tls_context=tls_server_context)
    with Engine(max_per_destination=3, helo="client.test") as engine:
        tickets = [engine.submit(Message(SENDER, ["r@example.test"], b"x\r\n"), server.host,
                                 server.port, tls="starttls", ca_file=tls_ca_file,
                                 server_hostname="mail.wrong.example", timeout=10)
                   for _ in range(10)]
        results = _run_all(engine)
    _assert_one_each(tickets, results)
    assert {r.status for r in results} == {"tempfail"}
    assert all("hostname mismatch" in r.reason.lower() for r in results), results[0]
    assert server.messages == []


def test_gil_released_while_the_engine_waits(scripted):
    """smtps_engine_run() is one long C call without the GIL: another
    Python thread keeps running while the engine waits on a stalled server."""
    server = scripted.start("stall")
    ticks = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0.001)

    with Engine(helo="client.test") as engine:
        engine.submit(Message(SENDER, ["r@example.test"], b"x\r\n"), server.host,
                      server.port, timeout=1.0)
        thread = threading.Thread(target=spin)
        thread.start()
        try:
            before = ticks[0]
            (r,) = _run_all(engine, timeout=20)
            during = ticks[0] - before
        finally:
            stop.set()
            thread.join()
    assert r.status == "tempfail"
    assert during >= 100                         # about 1000 in that second


def test_proxy_state_before_the_banner_in_engine(aiosmtpd_factory):
    """A Python state at -1 in the C engine sees both ends of its connection
    and sends a PROXY v1 line before the greeting; aiosmtpd checks it."""
    from handlers import ProxyHandler

    class Proxy(State):
        name = "PROXY"

        def __init__(self) -> None:
            self.seen: List[Any] = []

        def setup(self, session) -> int:
            (dst, dport), (src, sport) = session.peer, session.local_address
            self.seen.append((dst, dport, src, sport))
            session.send(f"PROXY TCP4 198.51.100.9 {dst} 50000 {dport}")
            return 0

    server = aiosmtpd_factory(ProxyHandler(), proxy_protocol_timeout=5)
    machine = Machine()
    proxy = Proxy()
    machine.register(proxy, after=-1)
    with Engine(machine=machine, max_per_destination=3) as engine:
        tickets = [engine.submit(Message("s@client.test", [f"r{i}@example.test"],
                                         b"Subject: p\r\n\r\nx\r\n"),
                                 server.host, server.port, timeout=10) for i in range(6)]
        results = list(engine.run(timeout=30))
    assert len(results) == 6 and all(r.ok for r in results), [str(r) for r in results]
    assert {r.ticket for r in results} == set(tickets)
    assert proxy.seen and all(d == "127.0.0.1" and dp == server.port and s == "127.0.0.1"
                              and sp > 0 for d, dp, s, sp in proxy.seen)
    got = server.wait_for_messages(6)
    assert all(str(m.extra["proxy_data"].src_addr) == "198.51.100.9" for m in got)
