"""Bodies users actually have: files, mapped files, buffers and streams.

A large message must never be copied whole into Python memory: a buffer
(``memoryview``, ``mmap``) goes to C by reference, a file or a stream is
read while it is sent. The encoder's guarantees (CR LF normalisation,
dot-stuffing, exact BDAT lengths, the RFC 1870 SIZE) must hold for every
kind and every split, and a body that may not go (a NUL byte, a line over
998 octets, 8-bit content the server cannot take) must never reach a
server as a message: bytes, buffers and files are refused before anything
is sent; a stream, which can only be checked as it goes, fails its message
before the final dot. Against scripted servers (exact bytes), aiosmtpd and
smtp-sink.
"""

from __future__ import annotations

import gc
import io
import mmap
import os
import threading
import time
import tracemalloc
from typing import Any, Iterator, List

import pytest

import smtpstate
from smtpstate import Engine, InvalidMessageError, Message

from helpers import free_port
from hostile import DRIVERS, Servers, deliver, greet, serve, unstuff
from scripted import ScriptedSession

SENDER = "sender@client.test"
RCPT = "rcpt@server.test"


@pytest.fixture
def hostile():
    servers = Servers()
    yield servers
    servers.stop()


@pytest.fixture(params=DRIVERS)
def driver(request):
    return request.param


def msg(data: Any, **kwargs: Any) -> Message:
    return Message(SENDER, [RCPT], data, **kwargs)


def normalized(body: bytes) -> bytes:
    out = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return out if not out or out.endswith(b"\r\n") else out + b"\r\n"


#: A CR LF cut in two, a dot after a cut, bare CR and LF next to dots.
TRICKY = b"Subject: tricky\r\n\r\n.first\r\n..two\n.\r\nmid\r.\rend\n.x" * 50


def pieces(body: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i:i + size]


def kinds(body: bytes, tmp_path: Any) -> List[Any]:
    path = tmp_path / "body.eml"
    path.write_bytes(body)
    f = open(path, "rb")
    return [("bytes", body), ("memoryview", memoryview(body)), ("file", f),
            ("bytesio", io.BytesIO(body)), ("pieces of 7", pieces(body, 7)),
            ("pieces of 1", pieces(body, 1)), ("list", [body[:3], b"", body[3:]])]


def test_every_kind_sends_the_same_bytes(hostile, driver, tmp_path):
    """The data section is byte for byte what a bytes body gives, whatever
    the kind and wherever a stream cuts it."""
    want = None
    for name, data in kinds(TRICKY, tmp_path):
        server = hostile([greet(), serve(ehlo=["PIPELINING"])])
        (r,) = deliver(driver, [msg(data)], server, timeout=10)
        assert r.status == "delivered", (name, r)
        (section,) = server.conn.data
        want = want or section
        assert section == want, name
        assert unstuff(section) == normalized(TRICKY)


def test_stream_and_file_go_by_data_under_chunking(hostile, driver, tmp_path):
    """A BDAT chunk must announce its exact length: a body read as it is
    sent goes by DATA; a body in memory by BDAT, its length exact."""
    path = tmp_path / "b.eml"
    path.write_bytes(TRICKY)
    for data, verb in ((TRICKY, b"BDAT"), (memoryview(TRICKY), b"BDAT"),
                       (open(path, "rb"), b"DATA"), (pieces(TRICKY, 100), b"DATA")):
        server = hostile([greet(), serve(ehlo=["CHUNKING", "PIPELINING"])])
        (r,) = deliver(driver, [msg(data)], server, timeout=10)
        assert r.status == "delivered", r
        (cmd,) = [c for c in server.conn.commands if c.startswith((b"BDAT", b"DATA"))]
        assert cmd.startswith(verb)
        if verb == b"BDAT":
            assert cmd == b"BDAT %d LAST\r\n" % len(normalized(TRICKY))
            assert server.conn.data == [normalized(TRICKY)]


def test_size_is_declared_when_known(hostile, tmp_path):
    """SIZE (RFC 1870) is the octets sent: known for bytes, buffers and
    files (scanned when the Message is made), unknown for a stream, which
    then declares none."""
    path = tmp_path / "b.eml"
    body = b"a\nb\r\n..c\rd"
    path.write_bytes(body)
    for data, size in ((body, 14), (open(path, "rb"), 14), (pieces(body, 2), None)):
        server = hostile([greet(), serve(ehlo=["SIZE 1000"])])
        (r,) = deliver("client", [msg(data)], server, timeout=10)
        assert r.ok, r
        mail = server.conn.commands[1]
        if size is None:
            assert b"SIZE=" not in mail
        else:
            assert mail.endswith(b" SIZE=%d\r\n" % size)


def test_file_sent_again_and_at_once(aiosmtpd_server, tmp_path):
    """A file body is read by position for each transaction: the same
    Message can go again, and over two connections at once."""
    path = tmp_path / "big.eml"
    body = b"Subject: file\r\n\r\n" + b"".join(b"line %06d .\r\n.dot\r\n" % i
                                               for i in range(20000))
    path.write_bytes(body)
    with open(path, "rb") as f:
        f.read(0)
        message = msg(f)
        with Engine(helo="client.test", max_per_destination=2) as engine:
            tickets = [engine.submit(message, aiosmtpd_server.host, aiosmtpd_server.port,
                                     timeout=30) for _ in range(3)]
            list(engine.run(timeout=60))
        with smtpstate.Client(aiosmtpd_server.host, aiosmtpd_server.port, timeout=30) as c:
            again = c.send(message)
    assert [t.result.status for t in tickets] == ["delivered"] * 3
    assert again.status == "delivered"
    got = aiosmtpd_server.wait_for_messages(4)
    assert all(m.data == body for m in got)


def test_mmap_body_through_the_engine(aiosmtpd_server, tmp_path):
    path = tmp_path / "mapped.eml"
    body = b"Subject: mapped\r\n\r\n" + b"x" * 70 + b"\r\n.hidden dot\r\n"
    path.write_bytes(body * 100)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        results = smtpstate.deliver([msg(mm), msg(mm)], aiosmtpd_server.host,
                                    aiosmtpd_server.port, timeout=30)
        assert [r.status for r in results] == ["delivered"] * 2
        # The messages refer to the mapping (so it cannot be unmapped under
        # C): they go first, then it can close.
        with pytest.raises(BufferError):
            mm.close()
        del results
        gc.collect()                                  # an engine's cycles, if any
    assert [m.data for m in aiosmtpd_server.wait_for_messages(2)] == [body * 100] * 2


def test_a_stream_is_sent_once():
    message = msg(pieces(b"Subject: once\r\n\r\nx\r\n", 4))
    message._to_c()                                   # the first submission
    with pytest.raises(InvalidMessageError, match="read only once"):
        message._to_c()


def _big_file(tmp_path: Any, mb: int) -> Any:
    path = tmp_path / "big.eml"
    line = b"x" * 76 + b"\r\n"
    with open(path, "wb") as f:
        f.write(b"Subject: big\r\n\r\n")
        block = line * (65536 // len(line))
        for _ in range(mb * 16):
            f.write(block)
    return path


@pytest.mark.parametrize("kind", ["file", "mmap", "stream"])
def test_50_mb_is_never_copied_whole_into_python(smtp_sink_server, tmp_path, kind):
    """Python's peak while a 50 MB body goes out stays a few MB: a file is
    read a piece at a time, a mapped file handed over by reference, a
    stream taken piece by piece."""
    path = _big_file(tmp_path, 50)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if kind == "mmap" else None
        data: Any = {"file": f, "mmap": mm, "stream": pieces_of(f)}[kind]
        tracemalloc.start()
        try:
            with smtpstate.Client(smtp_sink_server.host, smtp_sink_server.port,
                                  timeout=60) as client:
                status = client.send(msg(data)).status
                client.last_result = None          # nothing refers to mm now
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            if mm is not None:
                mm.close()
    assert status == "delivered"
    assert peak < 4 * 1024 * 1024, f"{peak} bytes at peak for a {size}-byte body"


def pieces_of(f: Any) -> Iterator[bytes]:
    while True:
        piece = f.read(100_000)
        if not piece:
            return
        yield piece


# -- what may not go ---------------------------------------------------------------


def test_a_nul_deep_in_a_stream_fails_before_the_final_dot(hostile, driver):
    """Checked as it streams: the NUL is found after 200 kB went out, the
    connection closes without the final dot, nothing is delivered."""
    good = b"Subject: s\r\n\r\n" + (b"y" * 78 + b"\r\n") * 2600
    server = hostile([greet(), serve()])
    (r,) = deliver(driver, [msg(iter([good, b"ab\x00cd\r\n", b"after\r\n"]))], server,
                   timeout=10)
    assert r.status == "permfail" and r.stage == "sending message body", r
    assert "NUL byte (line 2603, offset 208016)" in r.reason
    conn = server.conn
    assert conn.data == [] and b"\r\n.\r\n" not in bytes(conn.received)[-100:]
    assert b"QUIT" not in bytes(conn.received)[-10:]


def test_a_long_line_in_a_stream_fails_unless_allowed(hostile):
    body = [b"Subject: s\r\n\r\n", b"z" * 600, b"z" * 600, b"\r\n"]
    server = hostile([greet(), serve()])
    (r,) = deliver("client", [msg(iter(body))], server, timeout=10)
    assert r.status == "permfail" and "line 3 of the message body is longer" in r.reason
    server = hostile([greet(), serve()])
    (r,) = deliver("client", [msg(iter(body), long_lines="allow")], server, timeout=10)
    assert r.ok, r


def test_8bit_stream_declares_8bitmime_or_fails(hostile):
    body = [b"Subject: caf\xc3\xa9\r\n\r\n", b"ok\r\n"]
    server = hostile([greet(), serve(ehlo=["8BITMIME"])])
    (r,) = deliver("client", [msg(iter(body))], server, timeout=10)
    assert r.ok and server.conn.commands[1].endswith(b" BODY=8BITMIME\r\n"), r
    server = hostile([greet(), serve()])
    (r,) = deliver("client", [msg(iter(body))], server, timeout=10)
    assert r.status == "permfail" and "needs 8BITMIME" in r.reason, r
    assert server.conn.data == []


def test_a_stream_that_fails_to_read(hostile):
    def broken() -> Iterator[bytes]:
        yield b"Subject: s\r\n\r\n"
        raise OSError(5, "Input/output error")

    server = hostile([greet(), serve()])
    (r,) = deliver("client", [msg(broken())], server, timeout=10)
    assert r.status == "tempfail" and "could not be read: OSError" in r.reason, r
    server = hostile([greet(), serve()])
    (r,) = deliver("client", [msg(iter([b"Subject: s\r\n\r\n", "text"]))], server, timeout=10)
    assert r.status == "permfail" and "each piece must be bytes" in r.reason, r


def test_ctrl_c_while_a_stream_is_read(hostile):
    def interrupted() -> Iterator[bytes]:
        yield b"Subject: s\r\n\r\n"
        raise KeyboardInterrupt

    server = hostile([greet(), serve()])
    with smtpstate.Client(*server.address, helo="client.test", timeout=10) as client:
        with pytest.raises(KeyboardInterrupt):
            client.send(msg(interrupted()))
        assert client.last_result.status == "tempfail"
    assert server.conn.data == []


# -- a body that changes after it was checked ------------------------------------------


def _scripted_to_rcpt(m: Message, ehlo: bytes) -> ScriptedSession:
    """A scripted session with m submitted, its RCPT sent and unanswered."""
    s = ScriptedSession(now=1_000_000)
    s.start()
    s.feed(b"220 server.example ESMTP\r\n")
    s.sent()
    s.feed(ehlo)
    s.submit(m)
    assert s.sent().startswith(b"MAIL FROM:")
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"RCPT TO:<%s>\r\n" % RCPT.encode()
    return s


@pytest.mark.parametrize("change", ["shrinks", "grows"])
def test_a_file_changed_since_it_was_checked_gets_no_final_dot(tmp_path, change):
    """The file was checked, and its SIZE declared, when the Message was
    made; it has another length when it is sent. What went is not the
    message that was checked: the server must not be told "." after it."""
    path = tmp_path / "body.eml"
    original = b"Subject: report\r\n\r\n" + b"line of the report\r\n" * 2000
    path.write_bytes(original)
    with open(path, "rb") as f:
        m = msg(f)
        with open(path, "r+b" if change == "shrinks" else "ab") as g:
            if change == "shrinks":
                g.truncate(100)                       # cut mid-line
            else:
                g.write(b"appended after the check\r\n" * 10)
        s = _scripted_to_rcpt(m, b"250-server.example\r\n250 SIZE 100000\r\n")
        s.feed(b"250 ok\r\n")
        assert s.sent() == b"DATA\r\n"
        s.feed(b"354 go\r\n")
        data = s.sent()
        assert not data.endswith(b"\r\n.\r\n")
        assert s.status in ("CLOSING", "CLOSED")
        (r,) = s.finish()
    assert r["status"] == "permfail"
    assert f"changed since it was checked: {len(original)} octets" in r["reason"]


def test_a_buffer_changed_since_it_was_checked_never_overruns_bdat():
    """A buffer (a memoryview of a bytearray, an mmap another process
    writes) changed after the check, keeping its length: bare LFs become
    CR LF, so it now encodes longer than BDAT announced. Whatever went
    past the announced length the server would read as commands."""
    ba = bytearray(b"Subject: x\r\n\r\n" + b"y" * 30 + b"\r\n")
    m = msg(memoryview(ba))
    s = _scripted_to_rcpt(m, b"250-server.example\r\n250 CHUNKING\r\n")
    injected = b"\n" * 20 + b"RSET"              # 20 more octets once encoded
    ba[-2 - len(injected):-2] = injected
    s.feed(b"250 ok\r\n")                         # BDAT and its chunk would go now
    out = s.sent()
    (r,) = s.finish()
    assert out == b""                             # checked whole before BDAT goes
    assert r["status"] == "permfail"
    assert r["reason"].endswith("changed since it was checked: 46 octets were "
                                "declared, it now makes 66")


def test_a_buffer_changed_while_its_bdat_chunk_goes_stops_at_its_length():
    """Changed while it is sent, after the check (a promise broken): the
    chunk still never gets a byte past the length BDAT announced, which
    the server would read as commands."""
    line = b"y" * 70 + b"\r\n"
    ba = bytearray(b"Subject: x\r\n\r\n" + line * 4000)   # > the 64 KiB queued at once
    m = msg(memoryview(ba))
    s = _scripted_to_rcpt(m, b"250-server.example\r\n250 CHUNKING\r\n")
    s.feed(b"250 ok\r\n")
    first = s.consume(1000)                       # BDAT and some of the chunk
    head, _, chunk = first.partition(b"\r\n")
    announced = int(head.split()[1])
    assert head == b"BDAT %d LAST" % len(ba)
    # Past what is queued: 130 000 bare LFs, each two octets once encoded.
    ba[70000:200000] = b"\n" * 130000
    chunk += s.sent()
    (r,) = s.finish()
    assert len(chunk) <= announced
    assert r["status"] == "permfail" and "now makes more than" in r["reason"]


def test_a_buffer_given_a_nul_after_the_check_is_refused_before_the_dot():
    """A NUL written into a referenced buffer after the check is found as
    the body goes (it is scanned again, a piece ahead of the encoder)."""
    ba = bytearray(b"Subject: x\r\n\r\n" + b"y" * 30 + b"\r\n")
    m = msg(memoryview(ba))
    s = _scripted_to_rcpt(m, b"250 server.example\r\n")
    s.feed(b"250 ok\r\n")
    assert s.sent() == b"DATA\r\n"
    ba[20] = 0
    s.feed(b"354 go\r\n")
    assert not s.sent().endswith(b"\r\n.\r\n")
    (r,) = s.finish()
    assert r["status"] == "permfail" and "NUL byte" in r["reason"]


# -- sharing and retrying -------------------------------------------------------------


class SeekableNoFd(io.RawIOBase):
    """A seekable file with no descriptor (an archive member, an object
    store): one position for every reader, reads that take a moment."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, off: int, whence: int = 0) -> int:
        self.pos = off if whence == 0 else (self.pos + off if whence == 1
                                            else len(self.data) + off)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b: Any) -> int:
        time.sleep(0.001)                             # other threads run now
        chunk = self.data[self.pos:self.pos + len(b)]
        b[:len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)


def test_a_file_without_descriptor_sent_from_two_threads_at_once(aiosmtpd_server):
    body = b"Subject: big\r\n\r\n" + b"".join(b"line %06d\r\n" % i for i in range(20000))
    message = msg(SeekableNoFd(body))
    results: List[Any] = []

    def one() -> None:
        with smtpstate.Client(aiosmtpd_server.host, aiosmtpd_server.port,
                              helo="client.test", timeout=30) as c:
            results.append(c.send(message))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status for r in results] == ["delivered"] * 2
    assert [m.data for m in aiosmtpd_server.wait_for_messages(2)] == [body] * 2


def test_a_stream_not_read_can_be_sent_again(aiosmtpd_server, driver):
    """No connection, so none of the stream was read: the tempfail invites
    a retry of the same Message, which works."""
    message = msg(iter([b"Subject: s\r\n\r\n", b"hello\r\n"]))
    nobody = ("127.0.0.1", free_port())              # nobody listens there now
    (first,) = deliver(driver, [message], nobody, timeout=5)
    assert first.status == "tempfail"
    server = (aiosmtpd_server.host, aiosmtpd_server.port)
    assert [r.status for r in deliver(driver, [message], server, timeout=5)] == ["delivered"]
    with pytest.raises(InvalidMessageError, match="read only once"):
        message._to_c()                               # now it was read


def test_a_stream_routed_by_mx_must_stay_in_one_domain():
    """Read once: it cannot be split over destinations, refused up front
    (nothing claimed, so it can still be sent to one host)."""
    message = Message(SENDER, ["a@one.test", "b@two.test"],
                      iter([b"Subject: s\r\n\r\n", b"hello\r\n"]))
    with Engine() as engine:
        with pytest.raises(InvalidMessageError, match="2 domains"):
            engine.submit(message)
    message._to_c()                                   # not claimed by the refusal
