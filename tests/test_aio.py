"""The asyncio driver (smtpstate.aio) against real servers on loopback
(aiosmtpd, smtp-sink, Postfix) and tiny scripted asyncio servers for the
failures: a server that stalls, one that hangs up after the final dot,
and no server at all.

Every test runs its own event loop with ``asyncio.run`` (no
pytest-asyncio); the aiosmtpd fixture runs in a thread of its own.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Awaitable, Callable, List, Optional, Tuple

import pytest

from smtpstate import Action, ConnectError, Machine, Message, State, aio
from smtpstate.errors import InvalidOptionError
from smtpstate.options import Auth

SENDER = "sender@client.test"


def _body(i: int) -> bytes:
    return b"Subject: aio %d\r\n\r\nline one of %d\r\n.dot line\r\n" % (i, i)


def _client_bytes(client: aio.Client) -> bytes:
    return b"".join(data for who, data in client.transcript if who == "C")


def _run(coro: Awaitable, limit: float = 60.0):
    """Run a coroutine in a fresh loop, bounded so that a hang fails."""
    return asyncio.run(asyncio.wait_for(coro, limit))


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve(script: Script, rcvbuf: int = 0) -> Tuple[asyncio.AbstractServer, int]:
    """A scripted server on 127.0.0.1 in the running loop; ``rcvbuf`` sets
    a small kernel receive buffer (inherited by accepted connections)."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(script, sock=sock)
    return server, sock.getsockname()[1]


async def _dialogue(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    until: bytes) -> bool:
    """Play a plain SMTP server (no PIPELINING) until a command starting
    with ``until``; False if the client left first."""
    writer.write(b"220 scripted.test ESMTP\r\n")
    while True:
        line = await reader.readline()
        if not line:
            return False
        if line.upper().startswith(until):
            return True
        verb = line[:4].upper()
        if verb == b"EHLO":
            writer.write(b"250-scripted.test\r\n250 8BITMIME\r\n")
        elif verb == b"DATA":
            writer.write(b"354 go ahead\r\n")
            while (await reader.readline()) not in (b".\r\n", b""):
                pass
            writer.write(b"250 2.0.0 queued\r\n")
        elif verb == b"QUIT":
            writer.write(b"221 bye\r\n")
            await writer.drain()
            writer.close()
            return False
        else:
            writer.write(b"250 2.0.0 ok\r\n")
        await writer.drain()


async def _dialogue_rest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer whatever follows (RSET, QUIT) until the client leaves."""
    while True:
        line = await reader.readline()
        if not line:
            return
        if line.upper().startswith(b"QUIT"):
            writer.write(b"221 bye\r\n")
            await writer.drain()
            return
        writer.write(b"250 2.0.0 ok\r\n")
        await writer.drain()


# -- aiosmtpd -------------------------------------------------------------------


def test_several_messages_over_one_client(aiosmtpd_server):
    async def main():
        async with aio.Client(aiosmtpd_server.host, aiosmtpd_server.port, helo="client.test",
                              timeout=30, keep_transcript=True) as client:
            results = [await client.send(Message(SENDER, [f"r{i}@example.test"], _body(i)))
                       for i in range(5)]
            assert client.connected and "SIZE" in client.capabilities
        assert not client.connected
        return client, results

    client, results = _run(main())
    assert [r.status for r in results] == ["delivered"] * 5
    assert all(r.reply is not None and r.reply.code == 250 for r in results)
    got = aiosmtpd_server.wait_for_messages(5)
    assert [m.data for m in got] == [_body(i) for i in range(5)]
    assert [m.rcpt_tos for m in got] == [[f"r{i}@example.test"] for i in range(5)]
    assert {m.helo for m in got} == {"client.test"}
    assert len(aiosmtpd_server.connections) == 1
    sent = _client_bytes(client)
    assert sent == bytes(aiosmtpd_server.connections[0].received)   # the same bytes
    assert sent.startswith(b"EHLO client.test\r\n")
    assert sent.count(b"EHLO") == 1 and b"RSET" not in sent
    assert sent.endswith(b"QUIT\r\n")
    received = b"".join(d for who, d in client.transcript if who == "S")
    assert received.startswith(b"220 ") and received.endswith(b"\r\n")


def test_concurrent_sends_share_one_connection(aiosmtpd_server):
    messages = [Message(SENDER, [f"c{i}@example.test"], _body(i)) for i in range(10)]

    async def main():
        async with aio.Client(aiosmtpd_server.host, aiosmtpd_server.port, timeout=30) as client:
            return await asyncio.gather(*(client.send(m) for m in messages))

    results = _run(main())
    assert [r.status for r in results] == ["delivered"] * 10
    assert [r.message for r in results] == messages               # each its own result
    assert len({r.ticket for r in results}) == 10
    got = aiosmtpd_server.wait_for_messages(10)
    assert len(aiosmtpd_server.connections) == 1                  # queued, not parallel
    assert [m.rcpt_tos for m in got] == [[f"c{i}@example.test"] for i in range(10)]
    assert [m.data for m in got] == [_body(i) for i in range(10)]


def test_module_send_and_refused_recipient(aiosmtpd_factory):
    from handlers import RefusingHandler

    server = aiosmtpd_factory(RefusingHandler())

    async def main():
        ok = await aio.send(Message(SENDER, ["ok@example.test"], b"hi\r\n"),
                            server.host, server.port, timeout=30)
        bad = await aio.send(Message(SENDER, ["nobody@example.test"], b"hi\r\n"),
                             server.host, server.port, timeout=30)
        return ok, bad

    ok, bad = _run(main())
    assert ok.status == "delivered"
    assert bad.status == "permfail" and bad.recipients[0].reply.enhanced == "5.1.1"
    assert len(server.wait_for_messages(1)) == 1


class NoopRaisesFor(State):
    """After MAIL: NOOP; raises for a recipient starting with ``bad``."""

    name = "NOOP-or-raise"

    def __init__(self) -> None:
        self.seen: List[str] = []

    def setup(self, session) -> int:
        session.send("NOOP")
        return 1

    def callback(self, session, reply) -> Optional[int]:
        rcpt = session.message.recipients[0]
        self.seen.append(rcpt)
        if rcpt.startswith("bad"):
            raise ValueError(f"refusing {rcpt}")
        return Action.NEXT if reply.code == 250 else Action.TEMPFAIL_TX


def test_python_state_runs_and_its_exception_fails_one_message(aiosmtpd_server):
    machine = Machine()
    state = NoopRaisesFor()
    machine.register(state, after="MAIL")
    messages = [Message(SENDER, [f"{who}@example.test"], _body(i))
                for i, who in enumerate(["good1", "bad", "good2"])]

    async def main():
        async with aio.Client(aiosmtpd_server.host, aiosmtpd_server.port, machine=machine,
                              timeout=30, keep_transcript=True) as client:
            results = await asyncio.gather(*(client.send(m) for m in messages))
        return client, results

    client, (good1, bad, good2) = _run(main())
    assert state.seen == ["good1@example.test", "bad@example.test", "good2@example.test"]
    assert good1.status == good2.status == "delivered" and good1.error is None
    assert bad.status == "permfail" and bad.state == "NOOP-or-raise"
    assert "ValueError" in bad.error and "refusing bad@example.test" in bad.error
    got = aiosmtpd_server.wait_for_messages(2)
    assert [m.rcpt_tos for m in got] == [["good1@example.test"], ["good2@example.test"]]
    sent = _client_bytes(client)
    assert sent.count(b"NOOP\r\n") == 3
    assert sent.index(b"MAIL FROM") < sent.index(b"NOOP") < sent.index(b"RCPT TO")


def test_cancelled_send_does_not_disturb_the_next():
    received: List[bytes] = []

    async def slow_final_reply(reader, writer):
        writer.write(b"220 slow.test ESMTP\r\n")
        while True:
            line = await reader.readline()
            if not line:
                break
            received.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-slow.test\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                while (await reader.readline()) not in (b".\r\n", b""):
                    pass
                await asyncio.sleep(0.3)
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"250 2.0.0 ok\r\n")
            await writer.drain()
        writer.close()

    async def main():
        server, port = await _serve(slow_final_reply)
        async with server:
            async with aio.Client("127.0.0.1", port, timeout=10) as client:
                first = asyncio.ensure_future(
                    client.send(Message(SENDER, ["first@example.test"], b"one\r\n")))
                await asyncio.sleep(0.15)          # its final dot is out
                first.cancel()
                second = await client.send(Message(SENDER, ["second@example.test"], b"two\r\n"))
            return first, second

    first, second = _run(main(), 20)
    assert first.cancelled()
    assert second.status == "delivered" and second.reply.text == "2.0.0 queued"
    rcpts = [line for line in received if line.startswith(b"RCPT")]
    assert rcpts == [b"RCPT TO:<first@example.test>\r\n", b"RCPT TO:<second@example.test>\r\n"]
    assert sum(line.startswith(b"EHLO") for line in received) == 1   # one connection


def test_flow_control_with_a_slow_reader(monkeypatch):
    """A server that stops reading mid-body: the transport's buffer fills,
    the driver stops taking output from the session, then resumes."""
    pauses = []
    original = aio._Connection.pause_writing

    def counting(self):
        pauses.append(1)
        original(self)

    monkeypatch.setattr(aio._Connection, "pause_writing", counting)
    body = b"".join(b".%07d %s\r\n" % (i, b"x" * 980) for i in range(8000))   # 8 MB
    got = bytearray()

    async def slow(reader, writer):
        if await _dialogue(reader, writer, until=b"DATA"):
            writer.write(b"354 go ahead\r\n")
            await writer.drain()
            await asyncio.sleep(0.5)              # not reading
            while True:
                line = await reader.readline()
                if line in (b".\r\n", b""):
                    break
                got.extend(line)
            writer.write(b"250 2.0.0 all of it\r\n")
            await writer.drain()
            await _dialogue_rest(reader, writer)
        writer.close()

    async def main():
        server, port = await _serve(slow, rcvbuf=32768)
        async with server:
            async with aio.Client("127.0.0.1", port, timeout=30) as client:
                return await client.send(Message(SENDER, ["r@example.test"], body))

    result = _run(main(), 60)
    assert result.status == "delivered" and result.reply.text == "2.0.0 all of it"
    assert bytes(got) == body.replace(b"\r\n.", b"\r\n..").replace(b".", b"..", 1)
    assert pauses                                  # the transport did push back


# TLS runs inside the C session; the asyncio transport stays plain TCP.


def test_starttls_in_the_c_session(aiosmtpd_factory, tls_server_context, tls_ca_file):
    server = aiosmtpd_factory(tls_context=tls_server_context, require_starttls=True)
    messages = [Message(SENDER, [f"t{i}@example.test"], _body(i)) for i in range(3)]

    async def main():
        async with aio.Client(server.host, server.port, timeout=20, tls="starttls",
                              ca_file=tls_ca_file, helo="client.test",
                              keep_transcript=True) as client:
            results = await asyncio.gather(*(client.send(m) for m in messages))
            version = client.tls_version
        return client, results, version

    client, results, version = _run(main())
    assert [r.status for r in results] == ["delivered"] * 3
    assert version in ("TLSv1.2", "TLSv1.3")
    got = server.wait_for_messages(3)
    assert [m.data for m in got] == [_body(i) for i in range(3)]
    assert all(m.extra["tls"] for m in got) and len(server.connections) == 1
    sent = _client_bytes(client)                  # ciphertext after STARTTLS
    assert sent.startswith(b"EHLO client.test\r\nSTARTTLS\r\n")
    assert b"MAIL FROM" not in sent and b"line one" not in sent


def test_implicit_tls_and_a_wrong_name(aiosmtpd_factory, tls_server_context, tls_ca_file):
    server = aiosmtpd_factory(ssl_context=tls_server_context)

    async def main():
        ok = await aio.send(Message(SENDER, ["r@example.test"], _body(0)), server.host,
                            server.port, timeout=20, tls="implicit", ca_file=tls_ca_file)
        wrong = await aio.send(Message(SENDER, ["r@example.test"], _body(1)), server.host,
                               server.port, timeout=20, tls="implicit", ca_file=tls_ca_file,
                               server_hostname="mail.wrong.example")
        return ok, wrong

    ok, wrong = _run(main())
    assert ok.status == "delivered", ok
    assert wrong.status == "tempfail" and wrong.stage == "TLS handshake", wrong
    assert "TLS handshake failed" in wrong.reason and "mismatch" in wrong.reason.lower()
    assert [m.data for m in server.wait_for_messages(1)] == [_body(0)]


def test_refused_credentials_are_not_tried_again(aiosmtpd_factory):
    from aiosmtpd.smtp import AuthResult

    tries = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        tries.append(mechanism)
        return AuthResult(success=False, handled=False)

    server = aiosmtpd_factory(authenticator=authenticator, auth_require_tls=False)
    auth = Auth("user", "wrong", allow_plaintext=True)
    message = Message(SENDER, ["r@example.test"], b"x\r\n")

    async def main():
        async with aio.Client(server.host, server.port, timeout=10, auth=auth) as client:
            first = await client.send(message)
            second = await client.send(message)
        many = await aio.deliver([message] * 6, server.host, server.port,
                                 concurrency=2, timeout=10, auth=auth)
        return first, second, many

    first, second, many = _run(main())
    for r in [first, second, *many]:
        assert r.status == "permfail" and r.state == "AUTH", r
        assert "535" in r.reason and r.reason.count("not attempted") <= 1
    assert second.reason.startswith("not attempted: ")
    assert len(tries) == 3                          # once per connection, never again
    assert server.messages == []


# -- smtp-sink and Postfix ------------------------------------------------------


def test_deliver_200_messages_at_concurrency_20(smtp_sink_server):
    messages = [Message(SENDER, [f"sink{i}@example.test"], _body(i)) for i in range(200)]

    async def main():
        return await aio.deliver(messages, smtp_sink_server.host, smtp_sink_server.port,
                                 concurrency=20, timeout=30)

    started = time.monotonic()
    results = _run(main())
    elapsed = time.monotonic() - started
    assert len(results) == 200
    assert [r.message for r in results] == messages               # input order
    assert [r.status for r in results] == ["delivered"] * 200
    got = smtp_sink_server.wait_for_messages(200, timeout=30)
    assert sorted(m.data for m in got) == sorted(_body(i) for i in range(200))
    assert elapsed < 30


def test_deliver_bounds_connections(aiosmtpd_server):
    messages = [Message(SENDER, [f"b{i}@example.test"], _body(i)) for i in range(12)]
    results = _run(aio.deliver(messages, aiosmtpd_server.host, aiosmtpd_server.port,
                               concurrency=3, timeout=30))
    assert [r.status for r in results] == ["delivered"] * 12
    assert [r.message for r in results] == messages
    aiosmtpd_server.wait_for_messages(12)
    assert 1 <= len(aiosmtpd_server.connections) <= 3


def test_deliver_to_postfix(postfix_server):
    messages = [Message(SENDER, ["anything@example.test"], _body(i)) for i in range(6)]
    messages.append(Message(SENDER, ["unknown1@example.test"], _body(6)))
    results = _run(aio.deliver(messages, postfix_server.host, postfix_server.port,
                               concurrency=3, timeout=30))
    assert [r.status for r in results] == ["delivered"] * 6 + ["permfail"]
    assert results[-1].recipients[0].reply.enhanced == "5.1.1"
    got = postfix_server.wait_for_messages(6)
    assert sorted(m.data for m in got) == sorted(_body(i) for i in range(6))


# -- failures -----------------------------------------------------------------------


def test_server_stalls_after_banner_tempfails_by_deadline():
    async def stall(reader, writer):
        writer.write(b"220 stalling.test ESMTP\r\n")
        await reader.read()                   # read everything, never answer
        writer.close()

    async def main():
        server, port = await _serve(stall)
        async with server:
            client = aio.Client("127.0.0.1", port, timeout=1, keep_transcript=True)
            started = time.monotonic()
            result = await client.send(Message(SENDER, ["r@example.test"], b"x\r\n"))
            elapsed = time.monotonic() - started
            await client.close()
            return client, result, elapsed

    client, result, elapsed = _run(main(), 20)
    assert result.status == "tempfail"
    assert "timeout" in result.reason and "EHLO" in result.reason
    assert 0.9 <= elapsed < 5
    assert _client_bytes(client).startswith(b"EHLO ")
    assert b"MAIL" not in _client_bytes(client)


def test_server_stalls_in_transaction_tempfails_by_deadline():
    async def stall_at_rcpt(reader, writer):
        if await _dialogue(reader, writer, until=b"RCPT"):
            await reader.read()
        writer.close()

    async def main():
        server, port = await _serve(stall_at_rcpt)
        async with server:
            async with aio.Client("127.0.0.1", port, timeout=1) as client:
                started = time.monotonic()
                result = await client.send(Message(SENDER, ["r@example.test"], b"x\r\n"))
                return result, time.monotonic() - started

    result, elapsed = _run(main(), 20)
    assert result.status == "tempfail"
    assert "timeout" in result.reason and "RCPT" in result.stage
    assert 0.9 <= elapsed < 5


def test_abort_while_connecting_leaves_nothing_open():
    async def main():
        before = asyncio.all_tasks()
        eof = asyncio.Event()

        async def stall(reader, writer):
            writer.write(b"220 stalling.test ESMTP\r\n")
            await reader.read()                   # until the client is gone
            eof.set()
            writer.close()

        server, port = await _serve(stall)
        async with server:
            client = aio.Client("127.0.0.1", port, timeout=30)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(
                    client.send(Message(SENDER, ["r@example.test"], b"x\r\n")), 0.3)
            client.abort()                        # the connect still waits for EHLO
            await asyncio.wait_for(eof.wait(), 5)
            await asyncio.sleep(0.05)
            assert not client.connected
            return list(asyncio.all_tasks() - before)

    others = _run(main(), 20)
    assert others == []                       # the connect task ended too


def test_server_closes_after_final_dot_is_unknown():
    async def hang_up_after_dot(reader, writer):
        if await _dialogue(reader, writer, until=b"DATA"):
            writer.write(b"354 go ahead\r\n")
            await writer.drain()
            while (await reader.readline()) not in (b".\r\n", b""):
                pass
        writer.close()                        # no reply to the final dot

    async def main():
        server, port = await _serve(hang_up_after_dot)
        async with server:
            async with aio.Client("127.0.0.1", port, timeout=10,
                                  keep_transcript=True) as client:
                first = await client.send(Message(SENDER, ["r@example.test"], b"hello\r\n"))
                # The connection is gone: the next message gets a new one.
                second = await client.send(Message(SENDER, ["r@example.test"], b"again\r\n"))
            return client, first, second

    client, first, second = _run(main(), 30)
    assert first.status == "unknown", first
    assert first.reply is None and "final dot" in first.reason
    assert second.status == "unknown"
    assert _client_bytes(client).count(b"EHLO") == 2


def test_connect_refused():
    port = _closed_port()
    message = Message(SENDER, ["r@example.test"], b"x\r\n")

    async def main():
        result = await aio.send(message, "127.0.0.1", port, timeout=5)
        client = aio.Client("127.0.0.1", port, timeout=5)
        with pytest.raises(ConnectError):
            await client.connect()
        again = await client.send(message)
        await client.close()
        many = await aio.deliver([message] * 5, "127.0.0.1", port, concurrency=2, timeout=5)
        return result, again, many

    result, again, many = _run(main(), 30)
    for r in [result, again, *many]:
        assert r.status == "tempfail" and r.stage == "not connected"
        assert "cannot connect" in r.reason and r.message is message
        assert [x.status for x in r.recipients] == ["tempfail"]


def test_greeting_refused_is_a_result():
    accepted = []

    async def refuse(reader, writer):
        accepted.append(1)
        writer.write(b"554 go away\r\n")
        while True:
            line = await reader.readline()
            if not line:
                break
            if line.upper().startswith(b"QUIT"):
                writer.write(b"221 bye\r\n")
                await writer.drain()
                break
            writer.write(b"503 no\r\n")
        writer.close()

    message = Message(SENDER, ["r@example.test"], b"x\r\n")

    async def main():
        server, port = await _serve(refuse)
        async with server:
            async with aio.Client("127.0.0.1", port, timeout=5) as client:
                await client.connect()                  # no exception: a result follows
                after_connect = await client.send(message)
            queued = await aio.send(message, "127.0.0.1", port, timeout=5)
            accepted.clear()
            many = await aio.deliver([message] * 10, "127.0.0.1", port,
                                     concurrency=3, timeout=5)
            return after_connect, queued, many

    after_connect, queued, many = _run(main(), 30)
    # Each message waited in a session when the 554 came: the session's
    # verdict (its stage, its status), the same every time.
    assert queued.status in ("tempfail", "permfail") and queued.stage == "reading banner"
    for r in [after_connect, queued, *many]:
        assert r.status == queued.status and r.stage in ("reading banner", "not connected"), r
        assert "554" in r.reason, r
    assert len(accepted) <= 3                       # each worker gave up after one try
    assert sum(r.reason.startswith("not attempted") for r in many) >= 7


def test_deliver_moves_messages_off_connections_refused_with_421():
    active = [0]
    greeted = [0]

    async def two_at_a_time(reader, writer):
        if active[0] >= 2:
            writer.write(b"421 4.7.0 too many connections\r\n")
            await writer.drain()
            writer.close()
            return
        active[0] += 1
        greeted[0] += 1
        try:
            await _dialogue(reader, writer, until=b"NEVER")
        finally:
            active[0] -= 1
        writer.close()

    messages = [Message(SENDER, [f"m{i}@example.test"], _body(i)) for i in range(12)]

    async def main():
        server, port = await _serve(two_at_a_time)
        async with server:
            return await aio.deliver(messages, "127.0.0.1", port, concurrency=5, timeout=10)

    results = _run(main(), 30)
    assert [r.status for r in results] == ["delivered"] * 12, results
    assert [r.message for r in results] == messages
    assert greeted[0] == 2


def test_options_are_checked():
    with pytest.raises(TypeError, match="unknown option"):
        aio.Client("127.0.0.1", 25, tls_mode="starttls")
    with pytest.raises(InvalidOptionError):
        aio.Client("127.0.0.1", 25, timeout=0)
    with pytest.raises(TypeError):
        _run(aio.deliver(["not a message"], "127.0.0.1", 25))
    with pytest.raises(InvalidOptionError):
        _run(aio.deliver([], "127.0.0.1", 25, concurrency=0))
    assert _run(aio.deliver([], "127.0.0.1", 25)) == []


_PACKAGE_ONLY = """
import sys
import smtpstate
# The package alone: asyncio and the driver are not imported with it.
assert "smtpstate.aio" not in sys.modules and "asyncio" not in sys.modules
assert "aio" in dir(smtpstate)
import asyncio
message = smtpstate.Message("sender@client.test", ["r@example.test"],
                            b"Subject: lazy\\r\\n\\r\\nhi\\r\\n")
result = asyncio.run(smtpstate.aio.send(message, "127.0.0.1", int(sys.argv[1]), timeout=30))
assert smtpstate.aio is sys.modules["smtpstate.aio"]
try:
    smtpstate.no_such_thing
except AttributeError as exc:
    assert "no_such_thing" in str(exc)
else:
    raise AssertionError("smtpstate.no_such_thing did not raise")
print(result.status)
"""


def test_aio_reachable_from_the_package_without_importing_it(aiosmtpd_server):
    """import smtpstate, then smtpstate.aio.send(...): the submodule is
    imported on first use (a fresh interpreter: this one imported it)."""
    import subprocess
    import sys
    import tempfile

    p = subprocess.run([sys.executable, "-c", _PACKAGE_ONLY, str(aiosmtpd_server.port)],
                       capture_output=True, text=True, timeout=120,
                       cwd=tempfile.gettempdir())       # the installed package
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["delivered"]
    (got,) = aiosmtpd_server.wait_for_messages(1)
    assert b"Subject: lazy" in got.data
