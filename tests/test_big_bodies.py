"""Big messages through the engine, whose driver writes a body from the
message's own memory (``sendmsg()`` of the runs that go unchanged and the
bytes the encoder adds between them): 100 KiB and 1 MiB bodies with every
stuffing case must reach real servers byte for byte, by DATA and by BDAT,
also when the server reads slowly and the kernel takes each write only in
part.
"""

from __future__ import annotations

import random
from typing import List

import pytest

import smtpstate
from smtpstate import Message

from hostile import Servers, deliver, greet, serve, unstuff

SENDER = "sender@client.test"
RCPT = "rcpt@server.test"

SIZES = (100 * 1024, 1024 * 1024)


@pytest.fixture
def hostile():
    servers = Servers()
    yield servers
    servers.stop()


def big_body(size: int, seed: int) -> bytes:
    """About size octets of text: long stretches of CR LF lines, lines that
    start with one or two dots, lone-dot lines, a CR LF cut by nothing
    special, and now and then a bare LF or CR."""
    rng = random.Random(seed)
    out: List[bytes] = [b"Subject: big\r\n\r\n"]
    n = len(out[0])
    while n < size:
        r = rng.random()
        if r < 0.03:
            line = b"." + b"x" * rng.randint(0, 70)          # stuffed
        elif r < 0.04:
            line = b".."
        elif r < 0.05:
            line = b"."                                     # a lone dot
        else:
            line = bytes(rng.choice(b"abcdefgh. ") for _ in range(rng.randint(0, 78)))
        end = b"\r\n" if rng.random() < 0.98 else rng.choice([b"\n", b"\r"])
        out.append(line + end)
        n += len(line) + len(end)
    return b"".join(out)


def normalized(body: bytes) -> bytes:
    out = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return out if not out or out.endswith(b"\r\n") else out + b"\r\n"


def stuffed(body: bytes) -> bytes:
    """The DATA section RFC 5321 4.5.2 asks for, end line included."""
    lines = normalized(body)[:-2].split(b"\r\n") if body else []
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n"
                    for ln in lines) + b".\r\n"


@pytest.mark.parametrize("size", SIZES, ids=["100KiB", "1MiB"])
def test_big_bodies_reach_aiosmtpd_exactly(aiosmtpd_server, size):
    """deliver() of several big messages over two connections: each arrives
    as the normalised body, nothing more or less."""
    bodies = [big_body(size, seed) for seed in range(3)]
    results = smtpstate.deliver([Message(SENDER, [RCPT], b) for b in bodies],
                                aiosmtpd_server.host, aiosmtpd_server.port,
                                concurrency=2, timeout=60)
    assert [r.status for r in results] == ["delivered"] * 3, results
    got = sorted(m.data for m in aiosmtpd_server.wait_for_messages(3))
    assert got == sorted(normalized(b) for b in bodies)


@pytest.mark.parametrize("size", SIZES, ids=["100KiB", "1MiB"])
def test_big_body_wire_bytes_by_data_with_partial_writes(hostile, size):
    """The DATA section on the wire is exactly the stuffed body and its end
    line, with a server whose small receive buffer makes the kernel take
    each of the client's writes in part."""
    body = big_body(size, 7)
    server = hostile([greet(), serve(ehlo=["PIPELINING"])], rcvbuf=4096)
    (r,) = deliver("engine", [Message(SENDER, [RCPT], body)], server, timeout=60)
    assert r.status == "delivered", r
    (section,) = server.conn.data
    assert section == stuffed(body)
    assert unstuff(section) == normalized(body)


@pytest.mark.parametrize("size", SIZES, ids=["100KiB", "1MiB"])
def test_big_body_wire_bytes_by_bdat(hostile, size):
    """BDAT: the chunk is the normalised body, exactly as long as announced."""
    body = big_body(size, 11)
    server = hostile([greet(), serve(ehlo=["CHUNKING", "PIPELINING"])], rcvbuf=4096)
    (r,) = deliver("engine", [Message(SENDER, [RCPT], body)], server, timeout=60)
    assert r.status == "delivered", r
    (cmd,) = [c for c in server.conn.commands if c.startswith(b"BDAT")]
    assert cmd == b"BDAT %d LAST\r\n" % len(normalized(body))
    assert server.conn.data == [normalized(body)]


def test_big_bodies_one_after_another_on_one_connection(hostile):
    """Two big messages on one connection: the second's commands follow the
    first's final dot (run ahead) and both sections are exact."""
    bodies = [big_body(300 * 1024, 21), big_body(200 * 1024, 22)]
    server = hostile([greet(), serve(ehlo=["PIPELINING"])], rcvbuf=8192)
    results = deliver("engine", [Message(SENDER, [RCPT], b) for b in bodies], server,
                      timeout=60)
    assert [r.status for r in results] == ["delivered"] * 2, results
    assert server.conn.data == [stuffed(b) for b in bodies]
