"""Property tests (hypothesis) of the parts a hostile server or hostile input
reaches: the body encoder, the reply parser, and the promise that every
submitted message gets exactly one result, whatever goes wrong.

* Body encoder (``smtps_body_*``): for any byte string, the DATA stream
  decoded the way a server decodes it (RFC 5321 4.5.2: lines up to the
  first lone ".", leading dots removed) gives back the body with its line
  endings normalised to CRLF, and that first lone "." is the last line;
  the BDAT form is the normalised body and its announced length; chunk
  boundaries and output room never change the bytes. The same through a
  real server: random bodies sent with ``Client`` to aiosmtpd come out
  as sent.
* Reply parser (``smtps_reply_parse``): for any bytes, the same replies
  and the same error at the same byte whole, byte by byte and split
  anywhere; and the same as a line-by-line reference parser written here
  from the documented grammar.
* No loss: a sans-I/O session against a server model whose every reply
  may be wrong, late, missing, malformed, or a hang-up, on a virtual
  clock: every message gets exactly one result, "delivered" only when
  the server accepted that message's complete data, and no command ever
  reaches a server that is reading DATA. Then the Engine against real
  sockets on loopback with random fault schedules: exactly one result per
  ticket.
"""

from __future__ import annotations

import io
import re
import socket
import socketserver
import threading
from typing import Any, Dict, List, Optional, Tuple

import pytest
from helpers import import_or_missing

hypothesis = import_or_missing("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import smtpstate  # noqa: E402
from scripted import ScriptedSession  # noqa: E402
from smtpstate._core import ffi, lib  # noqa: E402

FAST = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=25, deadline=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])

# Bodies: any bytes, with the characters that matter for SMTP over-weighted.
_special = st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"..", b"\r\n.\r\n",
                            b"\n.\n", b"\r.\r", b"\x00", b"\xff", b"x"])
bodies = st.one_of(st.binary(max_size=300),
                   st.lists(_special, max_size=60).map(b"".join),
                   st.lists(st.one_of(_special, st.binary(max_size=5)),
                            max_size=40).map(b"".join))
# What a Message takes: no NUL (refused before sending).
sendable = bodies.map(lambda b: b.replace(b"\x00", b"@"))


# -- the body encoder ---------------------------------------------------------


def normalize(body: bytes) -> bytes:
    """The reference: CR LF, bare CR, bare LF -> CR LF; last line completed."""
    out = re.sub(rb"\r\n|\r|\n", b"\r\n", body)
    if body and not body.endswith((b"\r", b"\n")):
        out += b"\r\n"
    return out


def server_decode(stream: bytes) -> Tuple[bytes, int]:
    """A server reading DATA: returns (content, offset just past the
    end-of-data line); content is dot-unstuffed. Asserts the stream has one."""
    content = []
    pos = 0
    while True:
        end = stream.index(b"\r\n", pos)
        line = stream[pos:end]
        pos = end + 2
        if line == b".":
            return b"".join(content), pos
        content.append((line[1:] if line.startswith(b".") else line) + b"\r\n")


def encode(body: bytes, dot_stuff: bool, cuts: Optional[List[int]] = None,
           rooms: Optional[List[int]] = None) -> bytes:
    """Run the C encoder over body, in the given input chunks and output room."""
    enc = ffi.new("struct smtps_body_encoder *")
    lib.smtps_body_init(enc, 1 if dot_stuff else 0)
    out = bytearray()
    buf = ffi.new("char[]", 1024)
    used = ffi.new("size_t *")
    bounds = sorted({c for c in (cuts or []) if 0 < c < len(body)}) + [len(body)]
    rooms = list(rooms or [1024])
    start = 0
    k = 0
    for end in bounds:
        while start < end:
            room = rooms[k % len(rooms)]
            k += 1
            n = lib.smtps_body_encode(enc, body[start:end], end - start, used, buf, room)
            assert n <= room
            if room >= lib.SMTPS_BODY_STEP_MAX:
                assert used[0] > 0
            out += ffi.buffer(buf, n)
            start += used[0]
            assert k < 100000
    n = lib.smtps_body_finish(enc, buf, 1024, 1 if dot_stuff else 0)
    out += ffi.buffer(buf, n)
    assert enc.out_total == len(out)
    return bytes(out)


@FAST
@given(body=bodies)
def test_body_round_trips_through_a_server_decoder(body):
    wire = encode(body, True)
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", wire) is None, "bare CR or LF on the wire"
    content, end = server_decode(wire)
    assert end == len(wire), "the data ended before the end of the body"
    assert content == normalize(body)


@FAST
@given(body=bodies)
def test_bdat_is_the_normalized_body(body):
    wire = encode(body, False)
    assert wire == normalize(body)
    assert lib.smtps_body_encoded_length(body, len(body)) == len(wire)
    assert lib.smtps_body_is_8bit(body, len(body)) == any(b >= 0x80 for b in body)


@FAST
@given(body=bodies, dot_stuff=st.booleans(),
       cuts=st.lists(st.integers(0, 300), max_size=20),
       rooms=st.lists(st.integers(0, 40), min_size=1, max_size=10).filter(
           lambda r: any(x >= 3 for x in r)))
def test_body_chunks_never_change_the_bytes(body, dot_stuff, cuts, rooms):
    assert encode(body, dot_stuff, cuts, rooms) == encode(body, dot_stuff)


@pytest.fixture(scope="module")
def aiosmtpd_module():
    import helpers
    try:
        import aiosmtpd  # noqa: F401
    except ImportError:
        helpers.missing("aiosmtpd is not installed (pip install '.[test]')")
    server = helpers.AiosmtpdServer(None).start()
    yield server
    server.stop()


@SLOW
@given(body=sendable, cuts=st.lists(st.integers(0, 300), max_size=12),
       kind=st.sampled_from(["bytes", "pieces", "file", "buffer"]))
def test_body_round_trips_through_aiosmtpd(aiosmtpd_module, body, cuts, kind):
    """Whatever the body's kind, and wherever a stream splits it (inside a
    CR LF, before a dot), the server gets the same normalised content."""
    # aiosmtpd refuses lines over 1000 bytes (RFC 5321 4.5.3.1.6); ours are short.
    server = aiosmtpd_module
    before = len(server.messages)
    data: Any = body
    if kind == "pieces":
        bounds = [0] + sorted({c for c in cuts if 0 < c < len(body)}) + [len(body)]
        data = [body[a:b] for a, b in zip(bounds, bounds[1:])]
    elif kind == "file":
        data = io.BytesIO(body)
    elif kind == "buffer":
        data = memoryview(body)
    msg = smtpstate.Message("s@client.test", ["r@server.test"], data)
    with smtpstate.Client(server.host, server.port, timeout=10) as client:
        result = client.send(msg)
    assert result.status == "delivered", result
    got = server.wait_for_messages(before + 1)[before]
    assert got.data == normalize(body)


def py_scan(body: bytes, allow_long: bool = False) -> Tuple[Any, ...]:
    """The reference scan: (problem, line, offset, size, is_8bit, longest)."""
    problem = line_at = offset_at = 0
    line, length, longest, i = 1, 0, 0, 0
    while i < len(body):
        c = body[i:i + 1]
        if c in (b"\r", b"\n"):
            longest = max(longest, length)
            line, length = line + 1, 0
            i += 2 if body[i:i + 2] == b"\r\n" else 1
            continue
        if c == b"\x00" and not problem:
            problem, line_at, offset_at = lib.SMTPS_BODY_NUL, line, i
        length += 1
        if length > lib.SMTPS_LINE_OCTETS_MAX and not allow_long and not problem:
            problem, line_at, offset_at = lib.SMTPS_BODY_LONG_LINE, line, i
        i += 1
    longest = max(longest, length)
    return (problem, line_at, offset_at, len(normalize(body)),
            int(any(b >= 0x80 for b in body)), longest)


def c_scan(body: bytes, cuts: List[int], allow_long: bool = False) -> Tuple[Any, ...]:
    sc = ffi.new("struct smtps_body_scan *")
    lib.smtps_body_scan_init(sc, lib.SMTPS_BODY_ALLOW_LONG_LINES if allow_long else 0)
    bounds = [0] + sorted({c for c in cuts if 0 < c < len(body)}) + [len(body)]
    for a, b in zip(bounds, bounds[1:]):
        lib.smtps_body_scan(sc, body[a:b], b - a)
    lib.smtps_body_scan_finish(sc)
    return (sc.problem, sc.problem_line if sc.problem else 0,
            sc.problem_offset if sc.problem else 0, sc.size, sc.is_8bit, sc.longest)


_long_lines = st.lists(st.one_of(_special, st.integers(990, 1005).map(lambda n: b"z" * n)),
                       max_size=6).map(b"".join)


@FAST
@given(body=st.one_of(bodies, _long_lines), cuts=st.lists(st.integers(0, 3000), max_size=12),
       allow_long=st.booleans())
def test_body_scan_any_split_same_answer(body, cuts, allow_long):
    """The scan (NUL, overlong lines, 8-bit, RFC 1870 size) gives the
    reference's answer whatever the split: a stream is checked exactly as
    the same bytes in one piece."""
    assert c_scan(body, cuts, allow_long) == py_scan(body, allow_long)


# -- the reply parser ---------------------------------------------------------

REPLY_LINE_MAX = lib.SMTPS_REPLY_LINE_MAX
EPROTO, ETOOBIG = lib.SMTPS_EPROTO, lib.SMTPS_ETOOBIG


def c_parse(data: bytes, cuts: List[int]) -> Tuple[list, Any]:
    """Parse with the C parser, split at cuts. Returns (replies, end): end
    is None (more needed) or (error, absolute offset the error names)."""
    p = ffi.gc(lib.smtps_reply_parser_new(), lib.smtps_reply_parser_free)
    out = ffi.new("struct smtps_reply *")
    used = ffi.new("size_t *")
    replies = []
    bounds = sorted({c for c in cuts if 0 < c < len(data)}) + [len(data)]
    start = 0
    for end in bounds:
        while start < end:
            rc = lib.smtps_reply_parse(p, data[start:end], end - start, used, out)
            if rc < 0:
                return replies, (rc, start + used[0])
            if rc == 0:
                assert used[0] == end - start
                start = end
                break
            text = bytes(ffi.buffer(out.text, out.text_len))
            assert ffi.buffer(out.text, out.text_len + 1)[-1] == b"\0"
            replies.append((out.code, text, out.nlines, ffi.string(out.enhanced).decode()))
            start += used[0]
    return replies, None


_ENH = re.compile(rb"([245])\.(\d{1,3})\.(\d{1,3})(?= |$)")


def ref_parse(data: bytes) -> Tuple[list, Any]:
    """The reference, one line at a time from the documented grammar
    (csrc/reply.c): 3 digits (2-5, 0-5, 0-9), then '-' (more lines), ' '
    and text (the last), or the line end (a code-only last line); CR LF
    or a bare LF ends a line, a CR right before the LF is dropped, any
    other CR is text; one code per reply; no NUL; at most
    SMTPS_REPLY_LINE_MAX bytes a line, line end included. An error names
    the offset just past the offending byte. (The 64 KiB bound on a whole
    reply is left to tests/c/test_reply.c: inputs here stay below it.)"""
    replies = []
    lines: List[bytes] = []
    code = None
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        line = data[pos:nl + 1] if nl >= 0 else data[pos:]
        errors = []
        z = line.find(b"\0")
        if z >= 0:
            errors.append((pos + z + 1, EPROTO))
        if len(line) > REPLY_LINE_MAX:
            errors.append((pos + REPLY_LINE_MAX + 1, ETOOBIG))
        for k, ok in enumerate((b"2345", b"012345", b"0123456789")):
            if k < len(line) and line[k] not in ok:
                errors.append((pos + k + 1, EPROTO))
                break
        else:
            if len(line) >= 3 and code is not None and int(line[:3]) != code:
                errors.append((pos + 3, EPROTO))
            if len(line) > 3 and line[3:4] not in b"- \r\n":
                errors.append((pos + 4, EPROTO))
            if len(line) > 4 and line[3:4] == b"\r" and line[4:5] != b"\n":
                errors.append((pos + 5, EPROTO))
        if errors:
            return replies, tuple(reversed(min(errors)))
        if nl < 0:
            return replies, None                 # more needed
        code = int(line[:3])
        sep = line[3:4]
        if sep in (b"-", b" "):
            text = line[4:-1]
            if text.endswith(b"\r"):
                text = text[:-1]
        else:
            text = b""
        lines.append(text)
        pos = nl + 1
        if sep != b"-":
            joined = b"\n".join(lines)
            m = _ENH.match(joined.split(b"\n", 1)[0])
            enh = m.group(0).decode() if m and int(m.group(1)) == code // 100 else ""
            replies.append((code, joined, len(lines), enh))
            lines, code = [], None
    return replies, None


_good_codes = st.sampled_from([b"220", b"250", b"354", b"421", b"451", b"550", b"334", b"559"])
_bad_codes = st.sampled_from([b"599", b"199", b"260", b"2x0", b"25", b""])
_short_texts = st.sampled_from([b"", b"ok", b"2.0.0 queued", b"5.1.1 no such user",
                                b"4.7.0 a\rb", b"2.1.0", b"6.0.0 x", b"2.1000.0 x", b"5.5.5"])
_texts = st.one_of(_short_texts, _short_texts, _short_texts, _short_texts,
                   st.binary(max_size=12).filter(lambda b: b"\n" not in b),
                   st.binary(max_size=12).filter(lambda b: b"\n" not in b),
                   st.integers(2040, 2052).map(lambda n: b"y" * n))
_eol = st.sampled_from([b"\r\n"] * 16 + [b"\n"] * 3 + [b"\r", b"\r\r\n", b""])


@st.composite
def _reply(draw):
    """One reply, usually well formed: the same code on every line."""
    code = draw(_bad_codes if draw(st.integers(0, 14)) == 0 else _good_codes)
    texts = draw(st.lists(_texts, min_size=1, max_size=4))
    out = b""
    for i, text in enumerate(texts):
        last = i == len(texts) - 1
        sep = draw(st.sampled_from([b" " if last else b"-"] * 24 + [b"", b"x", b"-", b" "]))
        c = code if draw(st.integers(0, 24)) else draw(_good_codes)
        out += c + sep + (text if sep in (b" ", b"-") else b"") + draw(_eol)
    return out


replies_data = st.one_of(
    st.lists(_reply(), max_size=6).map(b"".join),
    st.tuples(st.lists(_reply(), max_size=4).map(b"".join), st.binary(max_size=8),
              st.integers(0, 400)).map(lambda t: t[0][:t[2]] + t[1] + t[0][t[2]:]),
    st.binary(max_size=200),
)


@FAST
@given(data=replies_data, cuts=st.lists(st.integers(0, 5000), max_size=8))
def test_reply_parser_any_split_same_result(data, cuts):
    whole = c_parse(data, [])
    assert c_parse(data, cuts) == whole
    if len(data) <= 600:
        assert c_parse(data, list(range(len(data)))) == whole


@FAST
@given(data=replies_data)
def test_reply_parser_matches_the_reference(data):
    assert c_parse(data, []) == ref_parse(data)


# -- no loss, sans I/O, against a server model with faults ---------------------

FAULTS = ["ok"] * 6 + ["4xx", "5xx", "421", "hangup", "silence", "garbage", "354", "334",
                       "two", "lf"]


class ModelServer:
    """Answers each command line the client wrote, as ``schedule`` says
    (one fault per reply, "ok" past its end), reads DATA up to the
    end-of-data line and BDAT chunks by size, and records what a real
    server would have accepted."""

    def __init__(self, schedule: List[str], caps: List[str], messages: Dict[str, bytes]):
        self.schedule = schedule
        self.n = 0
        self.caps = caps
        self.messages = messages             # sender -> normalised body
        self.inbuf = b""
        self.mode = "cmd"
        self.data = b""
        self.bdat = 0
        self.sender: Optional[str] = None
        self.accepted: set = set()            # senders whose data got 2xx
        self.complete: set = set()            # senders whose data arrived whole
        self.desync = False
        self.hangup = False
        self.cont = False

    def fault(self) -> str:
        f = self.schedule[self.n] if self.n < len(self.schedule) else "ok"
        self.n += 1
        return f

    def reply(self, code: int, kind: str = "") -> bytes:
        f = self.fault()
        if f == "ok" and kind == "ehlo":
            return b"".join(b"250-%s\r\n" % c.encode() for c in ["mx.test", *self.caps]) + \
                b"250 HELP\r\n"
        if f == "silence":
            self.desync = True
            return b""
        if f == "garbage":
            self.desync = True
            return b"gar bage\r\n"
        if f == "hangup":
            self.hangup = True
            return b""
        if f == "two":
            self.desync = True
            return b"%d ok\r\n250 and more\r\n" % code
        code = {"4xx": 451, "5xx": 550, "421": 421, "354": 354, "334": 334}.get(f, code)
        if code == 334:
            self.cont = True
        if f == "421":
            self.hangup = True
        return b"%d reply\n" % code if f == "lf" else b"%d reply\r\n" % code

    def banner(self) -> bytes:
        return self.reply(220)

    def take(self, data: bytes) -> bytes:
        """Client bytes in, server bytes out."""
        out = b""
        self.inbuf += data
        while self.inbuf and not self.hangup:
            if self.mode == "bdat":
                n = min(self.bdat, len(self.inbuf))
                self.data += self.inbuf[:n]
                self.inbuf = self.inbuf[n:]
                self.bdat -= n
                if self.bdat:
                    break
                self.mode = "cmd"
                out += self.end_of_data(self.data)
                continue
            if self.mode == "data":
                self.data += self.inbuf
                self.inbuf = b""
                m = re.search(rb"(?:^|\r\n)\.\r\n", self.data)
                if m is None:
                    break
                end = m.end()
                self.inbuf = self.data[end:]
                content, _ = server_decode(self.data[:end])
                self.mode = "cmd"
                out += self.end_of_data(content)
                continue
            if b"\r\n" not in self.inbuf:
                break
            line, self.inbuf = self.inbuf.split(b"\r\n", 1)
            assert b"\n" not in line and b"\r" not in line, "bare CR or LF from the client"
            out += self.command(line)
        return out

    def end_of_data(self, content: bytes) -> bytes:
        want = self.messages.get(self.sender or "")
        if not self.desync and content:
            assert content == want, "the server read %r as the data, not the body" % content
        whole = content == want
        if whole:
            self.complete.add(self.sender)
        r = self.reply(250)
        if whole and r[:1] == b"2":
            self.accepted.add(self.sender)
        return r

    def command(self, line: bytes) -> bytes:
        if not self.desync:
            assert all(0x20 <= b != 0x7F for b in line), line
        if self.cont:
            self.cont = False
            return self.reply(501)
        verb = line[:4].upper()
        if verb == b"MAIL":
            m = re.match(rb"MAIL FROM:<([^>]*)>", line)
            self.sender = m.group(1).decode() if m else None
            return self.reply(250)
        if verb == b"BDAT":
            self.bdat = int(line.split()[1])
            if not self.desync:
                assert self.bdat == len(self.messages[self.sender or ""])
            self.mode, self.data = "bdat", b""
            if self.bdat == 0:
                self.mode = "cmd"
                return self.end_of_data(b"")
            return b""
        if verb == b"DATA":
            r = self.reply(354)
            if r.startswith(b"354"):
                self.mode, self.data = "data", b""
            return r
        if verb == b"QUIT":
            r = self.reply(221)
            self.hangup = True
            return r
        if verb == b"EHLO":
            return self.reply(250, "ehlo")
        return self.reply(250)


@FAST
@given(n=st.integers(1, 4),
       caps=st.lists(st.sampled_from(["PIPELINING", "CHUNKING", "8BITMIME", "SIZE 1000"]),
                     unique=True),
       schedule=st.lists(st.sampled_from(FAULTS), max_size=30),
       feed_sizes=st.lists(st.integers(1, 40), min_size=1, max_size=8),
       message_bodies=st.lists(sendable, min_size=4, max_size=4))
def test_no_loss_under_random_faults(n, caps, schedule, feed_sizes, message_bodies):
    s = ScriptedSession()
    senders = {}
    for i in range(n):
        sender = "s%d@client.test" % i
        senders[sender] = normalize(message_bodies[i])
        s.submit(smtpstate.Message(sender, ["r@server.test"], message_bodies[i]))
    server = ModelServer(schedule, caps, senders)
    s.start()
    pending = server.banner()
    k = 0
    for _ in range(400):
        if s.status == "CLOSED":
            break
        if pending:
            size = feed_sizes[k % len(feed_sizes)]
            k += 1
            s.feed(pending[:size])
            pending = pending[size:]
        out = s.sent()
        if out:
            pending += server.take(out)
        if server.hangup and not pending:
            s.closed("the server hung up")
            break
        if s.status == "CLOSING" and not s.pending_output():
            s.closed("the client closed")
            break
        if s.status == "IDLE":
            s.quit()
        elif not pending and not out and s.deadline >= 0:
            s.tick(s.deadline)                  # nothing moves: time does
        elif not pending and not out:
            break
        for r in s.results():
            sender = "s%d@client.test" % (r["tag"] - 1)
            if not server.desync:
                if r["status"] == "delivered":
                    assert sender in server.accepted, r
                if r["status"] == "unknown":
                    assert sender in server.complete, r
    results = s.finish()                      # exactly one result per message
    assert len(results) == n


# -- no loss through the Engine, real sockets, random fault schedules -----------


class FaultyHandler(socketserver.BaseRequestHandler):
    """One connection of a loopback server that plays a fault plan: a list
    of (command number, fault) pairs for this connection."""

    def handle(self) -> None:
        plan = self.server.next_plan()          # type: ignore[attr-defined]
        sock = self.request
        sock.settimeout(5)
        f = sock.makefile("rb")
        step = 0

        def say(code: int) -> bool:
            nonlocal step
            fault = plan.get(step, "ok")
            step += 1
            if fault == "hangup":
                return False
            if fault == "421":
                sock.sendall(b"421 4.3.2 going away\r\n")
                return False
            if fault == "garbage":
                sock.sendall(b"x\x00y\r\n")
                return True
            code = {"4xx": 451, "5xx": 554}.get(fault, code)
            sock.sendall(b"%d scripted\r\n" % code)
            return True

        try:
            if not say(220):
                return
            while True:
                line = f.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb == b"EHLO":
                    if plan.get(step, "ok") == "ok":
                        step += 1
                        sock.sendall(b"250-mx.test\r\n250 PIPELINING\r\n")
                        continue
                    if not say(250):
                        return
                elif verb == b"DATA":
                    if plan.get(step, "ok") in ("ok", "hangup-in-data"):
                        hang = plan.get(step) == "hangup-in-data"
                        step += 1
                        sock.sendall(b"354 go\r\n")
                        if hang:
                            f.readline()
                            return
                        while f.readline() not in (b".\r\n", b""):
                            pass
                        if not say(250):
                            return
                    elif not say(354):
                        return
                elif verb == b"QUIT":
                    sock.sendall(b"221 bye\r\n")
                    return
                elif not say(250):
                    return
        except OSError:
            return


class FaultyServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), FaultyHandler)
        self.plans: List[Dict[int, str]] = []
        self.lock = threading.Lock()

    def next_plan(self) -> Dict[int, str]:
        with self.lock:
            return self.plans.pop(0) if self.plans else {}


@pytest.fixture(scope="module")
def faulty_server():
    server = FaultyServer()
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server
    server.shutdown()
    server.server_close()


_conn_plan = st.dictionaries(st.integers(0, 8),
                             st.sampled_from(["4xx", "5xx", "421", "hangup", "garbage",
                                              "hangup-in-data"]), max_size=3)


@SLOW
@given(plans=st.lists(_conn_plan, max_size=8), n=st.integers(1, 12),
       per_conn=st.integers(1, 4))
def test_engine_one_result_per_ticket_under_random_faults(faulty_server, plans, n, per_conn):
    with faulty_server.lock:
        faulty_server.plans = list(plans)
    port = faulty_server.server_address[1]
    with smtpstate.Engine(max_connections=4, max_per_destination=3,
                          messages_per_connection=per_conn, idle_timeout=0.2) as engine:
        tickets = [engine.submit(smtpstate.Message("s@client.test", ["r@server.test"],
                                                   b"Subject: %d\r\n\r\nbody\r\n" % i),
                                 "127.0.0.1", port, timeout=5)
                   for i in range(n)]
        results = list(engine.run(timeout=60))
    ids = [r.ticket.id for r in results]
    assert len(ids) == len(set(ids)), "a ticket got two results"
    assert sorted(ids) == sorted(t.id for t in tickets)
    assert all(t.done and t.result is not None for t in tickets)
    if not plans:
        assert all(r.status == "delivered" for r in results)


# -- the Python boundary: validation in Python and in C agree -------------------

_addr_chars = st.one_of(st.characters(), st.sampled_from(list("\r\n\x00\x7f<> @.\x85é")))
_addresses = st.lists(_addr_chars, max_size=30).map("".join)


@FAST
@given(sender=_addresses, rcpts=st.lists(_addresses, max_size=3),
       envid=st.one_of(st.none(), _addresses))
def test_message_validation_agrees_with_c(sender, rcpts, envid):
    """Whatever Python accepts, C accepts too (the C checks are the last
    line of defence, so Python must never let through what C would
    refuse, nor refuse with anything but InvalidMessageError)."""
    try:
        msg = smtpstate.Message(sender, rcpts, b"body", envid=envid)
    except smtpstate.InvalidMessageError:
        return
    for addr in (msg.sender, *msg.recipients):
        assert not any(ch in addr for ch in "\r\n\x00\x7f<>"), addr
    msg._to_c()
