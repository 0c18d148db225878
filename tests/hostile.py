"""A scriptable hostile SMTP server on loopback, for any test.

This module owns :class:`HostileServer`: a real TCP listener on
127.0.0.1, port 0, whose every connection runs a *script* in a thread of
its own -- a list of steps saying exactly what the server does and when:

* ``send(data, pieces=, split_every=, delay=)`` -- write bytes, whole or
  cut into pieces with a pause between them (``trickle`` is one byte at a
  time); ``forever(data)`` repeats them until the client goes away;
* ``expect(prefix)`` -- read one command line and check how it starts;
  ``expect_data()`` reads a DATA section up to its end-of-data line,
  ``expect_bdat()`` a BDAT command and its chunk;
* ``pause(s)``, ``silence(s)`` (a pause during which the client must not
  speak), ``close()`` (FIN), ``half_close()`` (FIN, then keep reading),
  ``reset()`` (RST: SO_LINGER 0);
* ``starttls(context)`` -- the TLS handshake, server side (a failed
  handshake is recorded, not raised, with ``may_fail=True``);
* ``serve(table)`` -- the convenient part: answer command by command from
  a dict ``{"EHLO": reply, "MAIL": reply, ".": reply, ...}`` whose values
  are bytes, a list of bytes (one per occurrence, the last repeating), a
  callable ``(conn, line) -> bytes | list of steps``, or None (silence);
* ``call(fn)`` -- anything else, ``fn(conn)``.

Connection i runs ``scripts[i]`` (the last one again for later ones).
When a script ends without closing, the server keeps reading until the
client closes (``drain``), so that everything the client wrote is
recorded. Each connection is a :class:`Conn`: ``received`` (every byte the
client sent, decrypted after STARTTLS), ``clear`` (the part sent before
TLS), ``commands`` (the lines read), ``data`` (each DATA section as sent,
dot-stuffed, with its end line), ``transcript``, ``client_closed`` /
``client_reset`` (how the client ended it) and ``errors`` (where the
client did not do what the script expected).

Rule: the server never decides a test. A script that the client does not
follow records the mismatch in ``Conn.errors``; :meth:`HostileServer.stop`
raises them all at the end (the ``hostile`` fixture of a test module calls
it), and tests assert on the recorded bytes.

For the client side, :func:`deliver` sends messages through one of the
three drivers (``DRIVERS``: the blocking :class:`smtpstate.Client`, the C
:class:`smtpstate.Engine`, :mod:`smtpstate.aio`) over one connection, so a
case can show that all three behave the same. For example::

    server = HostileServer([greet(), serve({"RCPT": b"550 5.1.1 no\r\n"})])
    (result,) = deliver("engine", [message], server, timeout=2)
    assert result.status == "permfail"
    assert b"DATA" not in server.conn.received        # waits for the end
    server.stop()                                     # raises script errors
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
import struct
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

__all__ = [
    "Conn", "DRIVERS", "HELO", "HostileServer", "ScriptError", "Servers", "Step",
    "call", "close", "deliver", "ehlo_reply", "expect", "expect_bdat", "expect_data",
    "forever", "greet", "half_close", "pause", "reset", "send", "serve", "silence",
    "starttls", "trickle", "unstuff",
]

LOOPBACK = "127.0.0.1"

#: The EHLO name the helpers give every driver.
HELO = "client.hostile.test"

#: Seconds any single read of a script waits before giving up.
READ_TIMEOUT = 5.0

#: Seconds a connection is drained after its script, at most.
DRAIN_TIMEOUT = 10.0


class ScriptError(AssertionError):
    """The client did not do what a script expected."""


class _Gone(Exception):
    """The client closed or reset the connection."""


@dataclasses.dataclass
class Conn:
    """One accepted connection and everything that happened on it."""

    index: int
    sock: Any = None
    received: bytearray = dataclasses.field(default_factory=bytearray)
    clear: bytes = b""                      # received before TLS began
    tls: bool = False
    tls_error: Optional[str] = None
    commands: List[bytes] = dataclasses.field(default_factory=list)
    data: List[bytes] = dataclasses.field(default_factory=list)
    transcript: List[Any] = dataclasses.field(default_factory=list)
    client_closed: bool = False             # we read EOF
    client_reset: bool = False              # we got ECONNRESET
    server_closed: bool = False             # a close()/reset() step ran
    errors: List[str] = dataclasses.field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    buf: bytearray = dataclasses.field(default_factory=bytearray)   # read, not yet used

    # -- reading ---------------------------------------------------------

    def _fill(self, deadline: float) -> None:
        """Read one chunk into buf; raise _Gone at EOF or reset,
        TimeoutError when deadline passes first."""
        while True:
            if self.stop.is_set():
                raise _Gone("server stopped")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(min(left, 0.2))
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except ssl.SSLWantReadError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                self.client_reset = True
                raise _Gone("reset") from None
            except (ssl.SSLError, OSError) as exc:
                self.client_reset = True
                raise _Gone(str(exc)) from None
            if not chunk:
                self.client_closed = True
                raise _Gone("eof")
            self.received += chunk
            self.buf += chunk
            self.transcript.append(("C", bytes(chunk)))
            return

    def read_line(self, timeout: float = READ_TIMEOUT) -> bytes:
        """One line, CR LF (or a bare LF) included."""
        deadline = time.monotonic() + timeout
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i + 1])
                del self.buf[:i + 1]
                return line
            self._fill(deadline)

    def read_until(self, marker: bytes, timeout: float = READ_TIMEOUT) -> bytes:
        """Everything up to and including marker."""
        deadline = time.monotonic() + timeout
        while True:
            i = self.buf.find(marker)
            if i >= 0:
                out = bytes(self.buf[:i + len(marker)])
                del self.buf[:i + len(marker)]
                return out
            self._fill(deadline)

    def read_exactly(self, n: int, timeout: float = READ_TIMEOUT) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.buf) < n:
            self._fill(deadline)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_slowly(self, marker: bytes, piece: int = 997, pace: float = 0.0005,
                    timeout: float = READ_TIMEOUT) -> bytes:
        """Like read_until, in reads of at most ``piece`` bytes with a pause
        between them (a slow server, whose window fills up)."""
        deadline = time.monotonic() + timeout
        while True:
            i = self.buf.find(marker)
            if i >= 0:
                out = bytes(self.buf[:i + len(marker)])
                del self.buf[:i + len(marker)]
                return out
            if time.monotonic() > deadline:
                raise TimeoutError
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(piece)
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError, OSError):
                self.client_reset = True
                raise _Gone("reset") from None
            if not chunk:
                self.client_closed = True
                raise _Gone("eof")
            self.received += chunk
            self.buf += chunk
            self.transcript.append(("C", chunk))
            time.sleep(pace)

    def read_data(self, timeout: float = READ_TIMEOUT) -> bytes:
        """A DATA section, right after the DATA line: up to and including
        the end-of-data line (a lone ".\\r\\n" counts when it comes first)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.buf.startswith(b".\r\n"):
                del self.buf[:3]
                return b".\r\n"
            i = self.buf.find(b"\r\n.\r\n")
            if i >= 0:
                out = bytes(self.buf[:i + 5])
                del self.buf[:i + 5]
                return out
            self._fill(deadline)

    def drain(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """Read (and record) until the client closes or timeout passes."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                self.buf.clear()
                self._fill(deadline)
        except (_Gone, TimeoutError):
            return

    # -- writing ---------------------------------------------------------

    def write(self, data: bytes) -> None:
        self.transcript.append(("S", bytes(data)))
        try:
            self.sock.sendall(data)
        except (ConnectionResetError, BrokenPipeError):
            self.client_reset = True
            raise _Gone("reset") from None
        except (ssl.SSLError, OSError) as exc:
            self.client_reset = True
            raise _Gone(str(exc)) from None

    # -- what tests read ------------------------------------------------

    @property
    def gone(self) -> bool:
        """The client ended the connection (EOF or reset)."""
        return self.client_closed or self.client_reset

    def messages(self) -> List[bytes]:
        """Each DATA section without its end line, dot-unstuffed."""
        return [unstuff(d) for d in self.data]

    def __repr__(self) -> str:
        return (f"<Conn {self.index} received={bytes(self.received)!r} "
                f"closed={self.client_closed} reset={self.client_reset} errors={self.errors}>")


def unstuff(section: bytes) -> bytes:
    """A DATA section as a server takes it: the end line removed and one
    leading dot taken off every line (RFC 5321 4.5.2)."""
    if section == b".\r\n":
        return b""
    assert section.endswith(b"\r\n.\r\n"), section[-20:]
    lines = section[:-3].split(b"\r\n")
    return b"\r\n".join(ln[1:] if ln.startswith(b".") else ln for ln in lines)


# ---------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------


Step = Callable[[Conn], Any]
Script = Sequence[Step]


def send(data: bytes, *, pieces: int = 1, split_every: Optional[int] = None,
         delay: float = 0.0) -> Step:
    """Write data, in ``pieces`` parts or ``split_every`` bytes at a time,
    with ``delay`` seconds between parts."""
    if split_every is not None:
        parts = [data[i:i + split_every] for i in range(0, len(data), split_every)]
    else:
        step = max(1, -(-len(data) // max(1, pieces)))
        parts = [data[i:i + step] for i in range(0, len(data), step)]

    def run(conn: Conn) -> None:
        for i, part in enumerate(parts):
            if i and delay:
                time.sleep(delay)
            conn.write(part)
    run.__name__ = f"send({data[:40]!r})"
    return run


def trickle(data: bytes, interval: float) -> Step:
    """One byte every ``interval`` seconds."""
    return send(data, split_every=1, delay=interval)


def forever(data: bytes, *, interval: float = 0.0, limit: float = 10.0) -> Step:
    """Write data again and again until the client goes away (or for
    ``limit`` seconds, recorded as an error: the client never gave up)."""
    def run(conn: Conn) -> None:
        end = time.monotonic() + limit
        conn.sock.settimeout(1.0)
        while time.monotonic() < end:
            try:
                conn.sock.sendall(data)
            except (socket.timeout, OSError):
                conn.client_reset = True
                return
            if interval:
                time.sleep(interval)
        conn.errors.append(f"the client still read after {limit} s of {data[:20]!r}...")
    return run


def expect(prefix: bytes, *, timeout: float = READ_TIMEOUT) -> Step:
    """Read one command line; it must start with prefix (give the CR LF
    too for an exact match)."""
    def run(conn: Conn) -> None:
        try:
            line = conn.read_line(timeout)
        except TimeoutError:
            raise ScriptError(f"expected {prefix!r}, the client sent nothing "
                              f"for {timeout} s") from None
        conn.commands.append(line)
        if not line.startswith(prefix):
            raise ScriptError(f"expected {prefix!r}, got {line!r}")
    run.__name__ = f"expect({prefix!r})"
    return run


def expect_data(*, timeout: float = READ_TIMEOUT) -> Step:
    """Read a DATA section up to its end-of-data line (into ``conn.data``)."""
    def run(conn: Conn) -> None:
        try:
            conn.data.append(conn.read_data(timeout))
        except TimeoutError:
            raise ScriptError("no end of data") from None
    return run


def expect_bdat(*, timeout: float = READ_TIMEOUT) -> Step:
    """Read a ``BDAT n [LAST]`` line and its n bytes (into ``conn.data``,
    as they came)."""
    def run(conn: Conn) -> None:
        line = conn.read_line(timeout)
        conn.commands.append(line)
        words = line.split()
        if len(words) < 2 or words[0].upper() != b"BDAT" or not words[1].isdigit():
            raise ScriptError(f"expected BDAT, got {line!r}")
        conn.data.append(conn.read_exactly(int(words[1]), timeout))
    return run


def pause(seconds: float) -> Step:
    """Say nothing for a while. What the client sends meanwhile is kept for
    the next read; if the client ends the connection, so does the script."""
    def run(conn: Conn) -> None:
        deadline = time.monotonic() + seconds
        try:
            while True:
                conn._fill(deadline)
        except TimeoutError:
            pass
    return run


def silence(seconds: float) -> Step:
    """Pause; the client must not send anything meanwhile (a client must
    not talk before the server's greeting is complete)."""
    def run(conn: Conn) -> None:
        before = len(conn.received)
        deadline = time.monotonic() + seconds
        try:
            while True:
                conn._fill(deadline)
        except TimeoutError:
            pass
        if len(conn.received) != before:
            raise ScriptError(f"the client spoke during a pause: "
                              f"{bytes(conn.received[before:])!r}")
    return run


def close() -> Step:
    """Close the connection (FIN); the script ends."""
    def run(conn: Conn) -> None:
        conn.server_closed = True
        try:
            conn.sock.close()
        finally:
            raise _Gone("closed by the script")
    return run


def half_close() -> Step:
    """Send FIN but keep reading: what the client still writes is recorded."""
    def run(conn: Conn) -> None:
        conn.server_closed = True
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    return run


def reset() -> Step:
    """Abort the connection with a RST (SO_LINGER 0); the script ends."""
    def run(conn: Conn) -> None:
        conn.server_closed = True
        raw = conn.sock
        try:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        try:
            if isinstance(raw, ssl.SSLSocket):
                # Close the file descriptor without a TLS close_notify.
                socket.socket(fileno=raw.detach()).close()
            else:
                raw.close()
        finally:
            raise _Gone("reset by the script")
    return run


def starttls(context: ssl.SSLContext, *, may_fail: bool = False,
             timeout: float = READ_TIMEOUT) -> Step:
    """The server side of a TLS handshake. A failure is recorded in
    ``conn.tls_error`` and ends the script; unless ``may_fail`` it is also
    a script error."""
    def run(conn: Conn) -> None:
        if conn.buf:
            raise ScriptError(f"the client sent {bytes(conn.buf)!r} in clear "
                              "before the TLS handshake")
        conn.clear = bytes(conn.received)
        conn.sock.settimeout(timeout)
        try:
            wrapped = context.wrap_socket(conn.sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            conn.tls_error = f"{type(exc).__name__}: {exc}"
            if may_fail:
                raise _Gone("handshake failed") from None
            raise ScriptError(f"TLS handshake failed: {conn.tls_error}") from None
        conn.sock = wrapped
        conn.tls = True
        conn.transcript.append(("TLS", wrapped.version().encode()))
    return run


def call(fn: Callable[[Conn], Any]) -> Step:
    """Run fn(conn) as a step (it may call the Conn read and write methods)."""
    return fn


def greet(banner: bytes = b"220 hostile.test ESMTP\r\n") -> Step:
    return send(banner)


DEFAULT_TABLE: Dict[str, Any] = {
    "EHLO": b"250 hostile.test\r\n",
    "HELO": b"250 hostile.test\r\n",
    "MAIL": b"250 2.1.0 ok\r\n",
    "RCPT": b"250 2.1.5 ok\r\n",
    "DATA": b"354 go ahead\r\n",
    ".": b"250 2.0.0 queued\r\n",
    "BDAT": b"250 2.0.0 queued\r\n",
    "RSET": b"250 2.0.0 ok\r\n",
    "NOOP": b"250 2.0.0 ok\r\n",
    "QUIT": b"221 2.0.0 bye\r\n",
}


def serve(table: Optional[Dict[str, Any]] = None, *, banner: Optional[bytes] = None,
          ehlo: Optional[Sequence[str]] = None, quit_closes: bool = True) -> Step:
    """Answer commands from a table until QUIT or the client's end.

    Args:
        table: overrides of :data:`DEFAULT_TABLE` by verb (``"."`` is the
            reply to the end of data). A value is bytes, a list (one item
            per occurrence, the last repeating), None (no reply at all),
            or a callable ``(conn, line)`` returning either of those or a
            list of steps to run.
        banner: send this greeting first (None: none; use ``greet()``
            before, or pass it here).
        ehlo: extension keywords for a 250 EHLO reply (overrides
            ``table["EHLO"]``).
        quit_closes: after the reply to QUIT, close our side and read
            until the client closes its own.
    A 354 reply to DATA makes the server read the data section; a BDAT
    command has its chunk read before the reply.
    """
    replies = dict(DEFAULT_TABLE)
    if ehlo is not None:
        replies["EHLO"] = ehlo_reply(*ehlo)
    replies.update(table or {})

    def run(conn: Conn) -> None:
        counts: Dict[str, int] = {}
        if banner is not None:
            conn.write(banner)

        def answer(verb: str, line: bytes) -> bool:
            """Reply to one command; True when the reply was a 354."""
            value = replies.get(verb, b"502 5.5.2 not implemented\r\n")
            if isinstance(value, list):
                n = counts.get(verb, 0)
                counts[verb] = n + 1
                value = value[min(n, len(value) - 1)]
            if callable(value):
                value = value(conn, line)
            if value is None:
                return False
            mark = len(conn.transcript)
            if isinstance(value, (bytes, bytearray)):
                conn.write(bytes(value))
            else:
                for step in value:                # a list of steps
                    step(conn)
            said = b"".join(d for who, d in conn.transcript[mark:] if who == "S")
            return said.rstrip(b"\r\n").split(b"\n")[-1][:3] == b"354"

        while True:
            try:
                line = conn.read_line(DRAIN_TIMEOUT)
            except TimeoutError:
                conn.errors.append("serve(): the client went silent")
                return
            conn.commands.append(line)
            verb = line.split(b" ", 1)[0].strip().upper().decode("ascii", "replace")
            if verb == "BDAT":
                words = line.split()
                if len(words) >= 2 and words[1].isdigit():
                    conn.data.append(conn.read_exactly(int(words[1])))
            if answer(verb, line):                 # 354: the data follows
                conn.data.append(conn.read_data())
                answer(".", b".\r\n")
            if verb == "QUIT" and quit_closes:
                half_close()(conn)
                conn.drain()                       # the client's end, recorded
                return
    return run


def ehlo_reply(*keywords: str, name: str = "hostile.test") -> bytes:
    """A 250 reply to EHLO offering these keywords."""
    lines = [name] + list(keywords)
    return b"".join(b"250%s%s\r\n" % (b" " if i == len(lines) - 1 else b"-", ln.encode())
                    for i, ln in enumerate(lines))


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------


class HostileServer:
    """A loopback listener running a script per connection.

    Args:
        *scripts: connection i runs scripts[i]; later connections run the
            last one. No script at all: ``serve()`` with a greeting.
        drain: after a script that did not close, keep reading until the
            client closes (at most ``DRAIN_TIMEOUT`` seconds).
        rcvbuf: a small SO_RCVBUF for accepted sockets, so that a slow
            reading script makes the client's writes come back short.

    Attributes:
        host, port: where it listens.
        conns: every accepted :class:`Conn`, in order.
    """

    def __init__(self, *scripts: Script, drain: bool = True,
                 rcvbuf: Optional[int] = None) -> None:
        self.scripts = [list(s) for s in scripts] or [[greet(), serve()]]
        self.drain = drain
        self.conns: List[Conn] = []
        self.host = LOOPBACK
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf is not None:                    # inherited by accepted sockets
            self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self._lsock.bind((LOOPBACK, 0))
        self._lsock.listen(64)
        self._lsock.settimeout(0.1)
        self.port = self._lsock.getsockname()[1]
        self._stopping = threading.Event()
        self._threads: List[threading.Thread] = []
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept, daemon=True,
                                          name=f"hostile-{self.port}")
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                conn = Conn(index=len(self.conns), sock=sock, started=time.monotonic())
                self.conns.append(conn)
                script = self.scripts[min(conn.index, len(self.scripts) - 1)]
                t = threading.Thread(target=self._run, args=(conn, script), daemon=True,
                                     name=f"hostile-{self.port}-{conn.index}")
                self._threads.append(t)
            t.start()

    def _run(self, conn: Conn, script: Script) -> None:
        try:
            for step in script:
                step(conn)
            if self.drain and not conn.server_closed:
                conn.drain()
        except _Gone:
            pass
        except ScriptError as exc:
            conn.errors.append(str(exc))
            conn.drain(1.0)                       # keep what the client still says
        except Exception as exc:                  # a bug in a script
            conn.errors.append(f"script raised {type(exc).__name__}: {exc}")
        finally:
            conn.ended = time.monotonic()
            try:
                conn.sock.close()
            except OSError:
                pass
            conn.done.set()

    # -- what tests use ---------------------------------------------------

    @property
    def address(self) -> tuple:
        return (self.host, self.port)

    def wait(self, count: int = 1, timeout: float = 10.0) -> List[Conn]:
        """Wait until ``count`` connections were accepted and their scripts
        ended (the client closed); return every connection."""
        end = time.monotonic() + timeout
        while len(self.conns) < count:
            if time.monotonic() > end:
                raise TimeoutError(f"{len(self.conns)} connection(s), {count} expected")
            time.sleep(0.01)
        for conn in list(self.conns):
            if not conn.done.wait(max(0.0, end - time.monotonic())):
                raise TimeoutError(f"connection {conn.index} still open: {conn!r}")
        return list(self.conns)

    @property
    def conn(self) -> Conn:
        """The one connection there was (waits for its end)."""
        conns = self.wait(1)
        assert len(conns) == 1, f"{len(conns)} connections: {conns}"
        return conns[0]

    def stop(self, check: bool = True) -> None:
        """Stop listening, end every connection; raise the script errors."""
        self._stopping.set()
        try:
            self._lsock.shutdown(socket.SHUT_RDWR)    # wakes the accept() at once
        except OSError:
            pass
        try:
            self._lsock.close()
        except OSError:
            pass
        self._acceptor.join(5)
        for conn in self.conns:
            if not conn.done.wait(0.5):
                conn.stop.set()
        for t in self._threads:
            t.join(5)
        if check:
            errors = [f"connection {c.index}: {e}" for c in self.conns for e in c.errors]
            if errors:
                raise ScriptError("the client did not follow the script:\n  "
                                  + "\n  ".join(errors))

    def __enter__(self) -> "HostileServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop(check=exc[0] is None)


class Servers:
    """Start hostile servers for one test and stop them all after it
    (the ``hostile`` fixture): ``servers(*scripts) -> HostileServer``."""

    def __init__(self) -> None:
        self.started: List[HostileServer] = []

    def __call__(self, *scripts: Script, drain: bool = True,
                 rcvbuf: Optional[int] = None) -> HostileServer:
        server = HostileServer(*scripts, drain=drain, rcvbuf=rcvbuf)
        self.started.append(server)
        return server

    def stop(self, check: bool = True) -> None:
        first: Optional[BaseException] = None
        for server in self.started:
            try:
                server.stop(check=check)
            except ScriptError as exc:
                first = first or exc
        if first is not None:
            raise first


# ---------------------------------------------------------------------------
# The three drivers, one connection each
# ---------------------------------------------------------------------------

#: The drivers :func:`deliver` knows.
DRIVERS = ("client", "engine", "aio")


def deliver(driver: str, messages: Sequence[Any], server: Union[HostileServer, tuple], *,
            machine: Any = None, **options: Any) -> List[Any]:
    """Send messages in order over one connection (a new one only when the
    server ended the previous) with one driver; return their Results.

    ``options`` are the delivery options (``timeout``, ``tls``...); the
    EHLO name is :data:`HELO` unless given.
    """
    import smtpstate
    from smtpstate import aio

    host, port = server.address if isinstance(server, HostileServer) else server
    options.setdefault("helo", HELO)
    if driver == "client":
        with smtpstate.Client(host, port, machine=machine, **options) as client:
            return [client.send(m) for m in messages]
    if driver == "engine":
        helo = options.pop("helo")
        with smtpstate.Engine(max_connections=1, max_per_destination=1, helo=helo,
                              machine=machine, idle_timeout=30.0) as engine:
            tickets = [engine.submit(m, host, port, **options) for m in messages]
            list(engine.run(timeout=60))
        return [t.result for t in tickets]
    if driver == "aio":
        async def go() -> List[Any]:
            async with aio.Client(host, port, machine=machine, **options) as client:
                return [await client.send(m) for m in messages]
        return asyncio.run(go())
    raise ValueError(f"driver must be one of {DRIVERS}, not {driver!r}")
