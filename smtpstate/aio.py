"""The asyncio driver: the C session on an event loop, through an
:class:`asyncio.Protocol`.

It owns the byte pump between an asyncio transport and one C session, the
session's clock and deadline timer, and the futures that turn C results
into awaited :class:`~smtpstate.Result` objects. What to send and what a
reply means is decided in C (and in the machine's Python states), exactly
as for the blocking :class:`smtpstate.Client`.

Rule 1: every call into a live session (start, feed, submit, quit, tick,
and a resumed transport) is followed by :meth:`_Connection._step`, which
hands the session's output to the transport, collects finished results,
re-arms the deadline timer and acts on the session's status. The one other
place that collects is :meth:`_Connection._lose`, the session's end.

Rule 2: the transport is always a plain stream: TCP, or a unix-domain
socket for a host given as ``"unix:/path/to/socket"``. TLS
(``tls="starttls"`` or ``"implicit"``) runs inside the C session, which
then consumes and produces ciphertext; asyncio's ``ssl`` is never used.

Rule 3: the session's clock is the event loop's (``loop.time()``, which is
monotonic) in integer milliseconds, so that a deadline the session reports
can be handed to ``loop.call_at`` as it is.

A session belongs to the loop that opened its connection: use a
:class:`Client` from one event loop only.

:class:`Engine` (``smtpstate._aio_engine``) is the other asyncio driver: the
C engine itself (many connections, pools, routing by MX) watched by the
event loop through its descriptor, for many concurrent ``send()`` calls.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import itertools
import logging
import socket
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from smtpstate._ffi import check, ffi, lib, raise_interrupt
from smtpstate.errors import ConnectError
from smtpstate.logs import Tracer, log_result
from smtpstate.machine import Machine, Stage, default_machine
from smtpstate.message import Message
from smtpstate.options import Options, _check_count, check_host, check_port, unix_path
from smtpstate.result import Result, not_attempted, unsent_result
from smtpstate.session import Capabilities, Session
from smtpstate._aio_engine import Engine

__all__ = ["Client", "Engine", "send", "deliver"]

log = logging.getLogger("smtpstate.aio")

_tags = itertools.count(1)

# Seconds to connect when no timeout option is given (as the blocking client).
_CONNECT_TIMEOUT = 60.0
# Seconds a closing connection may take to flush before it is aborted.
_CLOSE_GRACE = 5.0

_USABLE = (lib.SMTPS_SESS_ACTIVE, lib.SMTPS_SESS_IDLE)
_TAKES_MESSAGES = (lib.SMTPS_SESS_NEW,) + _USABLE

_helo_cache: Optional[str] = None


def _fqdn() -> str:
    name = socket.getfqdn() or "localhost"
    if not name.isascii() or " " in name or len(name) > lib.SMTPS_HELO_MAX:
        name = "localhost"
    return name


async def _default_helo(loop: asyncio.AbstractEventLoop) -> str:
    """This host's FQDN, looked up once per process off the loop (it may
    ask DNS)."""
    global _helo_cache
    if _helo_cache is None:
        _helo_cache = await loop.run_in_executor(None, _fqdn)
    return _helo_cache


def _not_connected(message: Message, tag: int, why: str) -> Result:
    """The result of a message that never reached a usable connection."""
    result = unsent_result(message, tag, "tempfail", why)
    log_result(result)
    return result


def _refused(message: Message, tag: int, first: Result) -> Result:
    """A permfail like ``first``, for a message not tried because the
    server refused our credentials (as the blocking client does)."""
    result = unsent_result(message, tag, "permfail", not_attempted(first.reason),
                           stage=first.stage, stage_code=first.stage_code,
                           state=first.state)
    log_result(result)
    return result


# Stages in which a connection fails before any transaction: a result
# ending in one says the destination cannot be used now, not the message.
_SESSION_STAGES = frozenset({
    Stage.NOT_CONNECTED, Stage.BANNER, Stage.EHLO, Stage.EHLO_DONE,
    Stage.STARTTLS, Stage.STARTTLS_DONE, Stage.TLS_HANDSHAKE,
})


def _destination_failed(r: Result) -> bool:
    """True when ``r`` failed before its transaction could begin."""
    return not r.ok and (r.stage_code in _SESSION_STAGES or r.state == "AUTH")


def _retrieve(task: "asyncio.Future[Any]") -> None:
    if not task.cancelled():
        task.exception()                       # reported to whoever awaits it


class _Connection(asyncio.Protocol):
    """One TCP connection and the C session running on it.

    Made by :meth:`Client._connection` before the TCP connection exists, so
    that a message can wait in the session from the start: whatever fails
    after that (greeting, EHLO, TLS, AUTH) is the session's result, with its
    stage. asyncio calls the Protocol methods; the client calls
    :meth:`open`, :meth:`submit`, :meth:`quit` and :meth:`abort`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, session: Session,
                 keep: List[Any], transcript: Optional[List[Tuple[str, bytes]]]) -> None:
        self.loop = loop
        self.session = session
        self.ptr = session._ptr
        self.keep = keep                       # cdata the C session points to
        self.transcript = transcript
        self.transport: Optional[asyncio.Transport] = None
        self.futures: Dict[int, "asyncio.Future[Result]"] = {}
        self.paused = False                    # the transport's buffer is full
        self.lost = False
        self.opening: Optional["asyncio.Future[None]"] = None     # the TCP connect
        self.ready: "asyncio.Future[None]" = loop.create_future()   # greeting done
        self.gone: "asyncio.Future[None]" = loop.create_future()    # connection_lost
        self._out = ffi.new("const char **")
        self._timer: Optional[asyncio.TimerHandle] = None
        self._timer_at = -1
        self._grace: Optional[asyncio.TimerHandle] = None
        self._why = ""                         # why we closed, if we did

    # -- what the client uses -------------------------------------------

    @property
    def usable(self) -> bool:
        """True while a message submitted now could be tried (connecting
        included)."""
        return not self.lost and int(lib.smtps_session_status(self.ptr)) in _TAKES_MESSAGES

    @property
    def connected(self) -> bool:
        """True while connected and usable."""
        return (not self.lost and self.transport is not None
                and int(lib.smtps_session_status(self.ptr)) in _USABLE)

    async def open(self, host: str, port: int, timeout: float) -> None:
        """Make the connection (TCP, or to the unix socket of a
        ``"unix:/path"`` host); the session starts in connection_made.

        Raises:
            ConnectError: it failed or timed out; every message waiting in
                the session then has a "not connected" result.
        """
        path = unix_path(host)
        where = host if path is not None else f"{host}:{port}"
        self.session.route = (host, None)
        try:
            if path is not None:
                opening = self.loop.create_unix_connection(lambda: self, path)
            else:
                opening = self.loop.create_connection(lambda: self, host, port)
            await asyncio.wait_for(opening, timeout)
        except asyncio.TimeoutError as exc:
            err = ConnectError(errno.ETIMEDOUT, f"cannot connect to {where}: "
                               f"timed out after {timeout:g} s")
            self._lose(err.strerror)
            raise err from exc
        except OSError as exc:
            err = ConnectError(exc.errno or errno.ECONNREFUSED,
                               f"cannot connect to {where}: {exc}")
            self._lose(err.strerror)
            raise err from exc
        except BaseException:
            if self.transport is None:         # else connection_lost follows
                self._lose(self._why or "connect cancelled")
            raise

    def submit(self, message: Message, cmsg: Any, tag: int) -> Optional["asyncio.Future[Result]"]:
        """Queue a message on the session; None if the session takes no more.

        Raises:
            MemoryError: out of memory (anything else would be a bug).
        """
        if self.lost:
            return None
        s = self.session
        # Before submit: a state entered at once must already see it.
        s.messages[tag] = message
        fut: "asyncio.Future[Result]" = self.loop.create_future()
        self.futures[tag] = fut
        try:
            rc = lib.smtps_session_submit(self.ptr, cmsg, tag, self._now())
            if rc == lib.SMTPS_ECLOSED:
                del self.futures[tag]
                s.messages.pop(tag, None)
                return None
            check(rc, "submit the message")
        except BaseException:
            self.futures.pop(tag, None)
            s.messages.pop(tag, None)
            raise
        ffi.gc(cmsg, None)                     # the session owns it now
        try:
            self._step()
        except Exception as exc:
            self._fatal(exc)
        return fut

    async def quit(self) -> None:
        """QUIT once the queued messages are done; wait for the end."""
        if self.opening is not None and not self.opening.done():
            try:
                await asyncio.shield(self.opening)
            except asyncio.CancelledError:
                if not self.opening.cancelled():
                    raise                      # our caller was cancelled
            except Exception:
                pass                           # _lose ran: nothing to quit
        if not self.lost:
            if int(lib.smtps_session_status(self.ptr)) in _USABLE:
                check(lib.smtps_session_quit(self.ptr, self._now()), "quit")
                self._why = "client closed"
                self._step()
            await asyncio.shield(self.gone)

    def abort(self, why: str) -> None:
        """Drop the connection now; what is pending gets its result."""
        if self.lost:
            return
        self._why = why
        if self.opening is not None and not self.opening.done():
            self.opening.cancel()
        if self.transport is not None:
            self.transport.abort()             # connection_lost follows
        else:
            self._lose(why)

    @property
    def reason(self) -> str:
        """Why the session failed or closed ("" while fine)."""
        if self.session._closed:
            return self._why
        return self.session.reason or self._why

    # -- asyncio.Protocol -----------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self.lost:                          # aborted while connecting
            transport.abort()
            return
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        # Where its results say recipients went: the host as named, its address.
        self.session.route = (self.session.route[0] if self.session.route else None,
                              peer[0] if isinstance(peer, tuple) else None)
        if isinstance(peer, tuple) and isinstance(local, tuple):
            self.session._set_addresses(peer[:2], local[:2])
            log.debug("connected to %s:%d from %s:%d", peer[0], peer[1], local[0], local[1])
        else:
            # A unix socket: its names are paths, no numeric addresses.
            log.debug("connected to unix socket %r", peer)
        try:
            check(lib.smtps_session_start(self.ptr, self._now()), "start the session")
            self._step()
        except Exception as exc:
            self._fatal(exc)

    def data_received(self, data: bytes) -> None:
        if self.lost:
            return
        if self.transcript is not None:
            self.transcript.append(("S", data))
        try:
            rc = lib.smtps_session_feed(self.ptr, data, len(data), self._now())
            if rc == lib.SMTPS_ESTATE:         # a state called back into us
                check(rc, "feed")
            self._step()                       # a broken reply is a result, not an error
        except Exception as exc:
            self._fatal(exc)

    def eof_received(self) -> Optional[bool]:
        return None                            # close; connection_lost follows

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if exc is not None:
            why = str(exc) or type(exc).__name__
        else:
            why = self._why or "the server closed the connection"
        self._lose(why)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if not self.lost:
            try:
                self._step()
            except Exception as exc:
                self._fatal(exc)

    # -- the pump ----------------------------------------------------------

    def _now(self) -> int:
        return int(self.loop.time() * 1000)

    def _step(self) -> None:
        """After any call into the session: write, collect, re-arm, close."""
        ptr = self.ptr
        t = self.transport
        pending = 0
        if t is not None and not t.is_closing():
            out = self._out
            # A write can find the connection reset: asyncio then closes the
            # transport and drops whatever is written after, which must not
            # count as sent (the final dot above all).
            while not self.paused and not t.is_closing():
                n = lib.smtps_session_output(ptr, out)
                if n == 0:
                    break
                # A copy: the transport may keep what it cannot send yet,
                # and the session reuses its buffer.
                data = ffi.buffer(out[0], n)[:]
                t.write(data)                  # may call pause_writing()
                if self.transcript is not None:
                    self.transcript.append(("C", data))
                # XXX Handed to the transport counts as sent: a connection
                # lost with the final dot still in asyncio's buffer reports
                # "unknown" instead of "tempfail" (the safe side), and the
                # body's deadline runs from here (the buffer is bounded by
                # the transport's high-water mark).
                lib.smtps_session_consume(ptr, n, self._now())
            pending = lib.smtps_session_output(ptr, out)
        self._collect()
        status = int(lib.smtps_session_status(ptr))
        if status == lib.SMTPS_SESS_NEW:       # a submit while connecting
            return
        if status != lib.SMTPS_SESS_ACTIVE and not self.ready.done():
            self.ready.set_result(None)
        if status in _USABLE:
            self._arm()
        elif status == lib.SMTPS_SESS_CLOSING:
            self._cancel_timer()
            if pending == 0:
                self._shutdown()
            elif self.paused:                  # the server is not reading
                self.abort(self.session.reason or "closing; the server is not reading")
        else:                                  # CLOSED
            self._cancel_timer()
            self._shutdown()
        # Ctrl-C in a state: the session ended the connection and settled
        # its messages (their futures have results); now the loop hears it.
        raise_interrupt()

    def _collect(self) -> None:
        """Resolve the futures of every result the session has finished."""
        while (result := self.session.next_result()) is not None:
            log_result(result)
            fut = self.futures.pop(result.ticket, None)
            if fut is not None and not fut.done():
                fut.set_result(result)
            else:
                log.debug("result for a send() no longer awaited: %s", result)

    def _arm(self) -> None:
        """Keep one timer at the session's deadline, moved when it moves."""
        d = int(lib.smtps_session_deadline(self.ptr))
        if d == self._timer_at:
            return
        self._cancel_timer()
        if d >= 0:
            self._timer_at = d
            # One millisecond late, so that the tick's clock (truncated to
            # whole ms) has surely reached the deadline.
            self._timer = self.loop.call_at((d + 1) / 1000.0, self._on_deadline)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, -1

    def _on_deadline(self) -> None:
        self._timer, self._timer_at = None, -1
        if self.lost:
            return
        try:
            check(lib.smtps_session_tick(self.ptr, self._now()), "tick")
            self._step()
        except Exception as exc:
            self._fatal(exc)

    def _shutdown(self) -> None:
        """Close the transport once its buffer is flushed, bounded."""
        t = self.transport
        if t is None or t.is_closing():
            return
        t.close()
        if self._grace is None:
            self._grace = self.loop.call_later(
                _CLOSE_GRACE, self.abort, "closing took too long")

    def _lose(self, why: str, exc: Optional[BaseException] = None) -> None:
        """The connection is gone: every pending message gets its result,
        and the C session is freed. ``exc`` fails whatever C could not
        settle (nothing, unless we have a bug)."""
        if self.lost:
            return
        self.lost = True
        self._cancel_timer()
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        if self.session._closed:
            pass
        elif self.transport is None:
            # Never connected: nothing was said, the messages wait unsent.
            self._why = why
            for tag, fut in self.futures.items():
                message = self.session.messages.pop(tag, None)
                if not fut.done() and message is not None:
                    fut.set_result(_not_connected(message, tag, why))
            self.session.close()
        else:
            lib.smtps_session_closed(self.ptr, why.encode("utf-8", "replace"), self._now())
            self._collect()
            self._why = self.session.reason or why
            self.session.close()
        for tag, fut in self.futures.items():
            if not fut.done():
                fut.set_exception(exc if exc is not None else AssertionError(
                    f"message {tag} ended without a result"))
        self.futures.clear()
        if not self.ready.done():
            self.ready.set_result(None)
        if not self.gone.done():
            self.gone.set_result(None)
        log.debug("connection closed: %s", self._why)
        # Ctrl-C in a state's free(), run as the session was freed: the
        # messages are settled; now the loop hears it.
        raise_interrupt()

    def _fatal(self, exc: BaseException) -> None:
        """A bug on our side: results for what the session holds, then the
        exception for anything it could not settle."""
        log.error("asyncio driver failed: %r", exc, exc_info=exc)
        why = f"internal error: {exc!r}"
        self._why = why
        if self.transport is not None:
            self.transport.abort()
        self._lose(why, exc)


class Client:
    """An asyncio SMTP (or LMTP) client for one server.

    Args:
        host, port: the server: a name or an address and a TCP port, or
            ``"unix:/path/to/socket"`` for a unix-domain socket (any
            protocol; ``port`` is then ignored).
        machine: the state order to run (default: :data:`default_machine`).
        keep_transcript: record every byte sent and received in
            :attr:`transcript` as ``("C" | "S", bytes)`` pairs (ciphertext
            once TLS is up).
        **options: delivery options, as :class:`smtpstate.options.Options`
            (``protocol``: "smtp" or "lmtp"; ``tls``, ``auth``, ``ca_file``,
            ``timeout``, ``helo``, ``server_hostname``,
            ``dangerously_skip_certificate_verification``, and the TLS
            settings ``ca_path``, ``cert_file``, ``key_file``,
            ``key_password``, ``tls_min_version``, ``ciphers``,
            ``ciphersuites``, checked here). Under LMTP
            (RFC 2033) each recipient's ``status`` and ``reply`` are the
            server's reply for it after the data.

    Raises:
        TypeError: an unknown option.
        InvalidOptionError: a bad host or port (an int from 1 to 65535;
            not checked for a unix socket), or a known option with a bad
            value.

    :meth:`send` connects when needed and reuses the connection. Any number
    of ``send()`` calls may run at once; they take turns, in call order,
    one message in flight at a time, so that a connection lost during one
    message costs no other message its attempt: the next one reconnects.
    (A ``send()`` cancelled mid-transaction leaves its message to finish
    in the session; the next one queues behind it.) Use it from one event
    loop, ideally as ``async with Client(...) as client:``.
    """

    def __init__(self, host: str, port: int = 25, *, machine: Optional[Machine] = None,
                 keep_transcript: bool = False, **options: Any) -> None:
        self.options = Options.make(**options)
        if self.options.check_unix(host) is not None:
            self.host, self.port = host, port
        else:
            self.host = check_host(host)
            self.port = check_port(port)
        self.machine = machine if machine is not None else default_machine
        self.keep_transcript = keep_transcript
        self.transcript: List[Tuple[str, bytes]] = []
        self._tracer: Optional[Tracer] = None
        self._conn: Optional[_Connection] = None
        self._turn: Optional[asyncio.Lock] = None     # one message in flight
        self._auth_refused: Optional[Result] = None

    # -- connection ----------------------------------------------------------

    async def connect(self) -> None:
        """Open the connection and wait for the greeting and EHLO (and TLS
        and AUTH when asked for); nothing happens when a usable connection
        is open already.

        A server that refuses the session (a 554 greeting, EHLO refused, a
        failed TLS handshake) is not an exception: the next :meth:`send`
        reports it in its result.

        Raises:
            ConnectError: the TCP connection failed or timed out.
            InvalidOptionError: options the C session refused (HELO name,
                TLS set-up).
        """
        conn = await self._connection()
        if conn.opening is not None:
            try:
                await asyncio.shield(conn.opening)
            except asyncio.CancelledError:
                if not conn.opening.cancelled():
                    raise                      # our caller was cancelled
                raise ConnectError(errno.ECONNABORTED, conn.reason or "aborted") from None
        await asyncio.shield(conn.ready)

    async def close(self) -> None:
        """Send QUIT once the ``send()`` calls made before are done, and
        close the connection; returns once it is closed. A later ``send()``
        opens a new connection."""
        if self._turn is None:
            self._turn = asyncio.Lock()
        async with self._turn:
            conn, self._conn = self._conn, None
            if conn is not None:
                await conn.quit()

    def abort(self) -> None:
        """Drop the connection at once, without QUIT; pending sends get
        their results (``unknown`` after the final dot, else ``tempfail``)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort("client aborted")

    @property
    def capabilities(self) -> Optional[Capabilities]:
        """What the server's EHLO (LHLO) offered, or None when not connected."""
        c = self._conn
        return c.session.capabilities if c is not None and c.connected else None

    @property
    def tls_version(self) -> Optional[str]:
        """"TLSv1.3" and the like while TLS is up, else None."""
        c = self._conn
        if c is None or not c.connected:
            return None
        v = ffi.string(lib.smtps_session_tls_version(c.ptr)).decode("ascii")
        return v or None

    @property
    def connected(self) -> bool:
        """True while a connection is open and usable."""
        return self._conn is not None and self._conn.connected

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            self.abort()                       # cancelled: do not wait for QUIT
        else:
            await self.close()

    async def _connection(self) -> _Connection:
        """The open connection, or a new one still connecting.

        Raises:
            InvalidOptionError: options the C session refused.
        """
        c = self._conn
        if c is not None and c.usable:
            return c
        loop = asyncio.get_running_loop()
        opts = self.options
        helo = opts.helo if opts.helo is not None else await _default_helo(loop)
        c = self._conn
        if c is not None and c.usable:         # made while we looked the name up
            return c
        session = Session(self.machine, helo)
        keep: List[Any] = []
        try:
            opts.apply(session._ptr, self.host, keep)
        except BaseException:
            session.close()
            raise
        # The transcript (plaintext, credentials redacted) when it is logged.
        if Tracer.wanted():
            if self._tracer is None:
                self._tracer = Tracer()
            self._tracer.attach(session._ptr)
        c = _Connection(loop, session, keep,
                        self.transcript if self.keep_transcript else None)
        timeout = opts.timeout if opts.timeout is not None else _CONNECT_TIMEOUT
        c.opening = asyncio.ensure_future(c.open(self.host, self.port, timeout))
        c.opening.add_done_callback(_retrieve)
        self._conn = c
        return c

    # -- sending ---------------------------------------------------------------

    async def send_message(self, msg: Any, sender: Optional[str] = None,
                           recipients: Optional[Sequence[str]] = None,
                           **kwargs: Any) -> Result:
        """Deliver a standard-library ``email.message.EmailMessage``, its
        envelope taken from its headers (:meth:`Message.from_email`)."""
        return await self.send(Message.from_email(msg, sender, recipients, **kwargs))

    async def send(self, message: Message) -> Result:
        """Deliver one message and return its :class:`Result`.

        Connects first if needed; the message waits in the session while
        the greeting, EHLO, TLS and AUTH run. A failed TCP connect gives a
        ``tempfail`` result at stage "not connected"; a failure after it is
        the session's result, with the stage it happened in. A connection
        the server has closed is replaced by a new one. Once the server has
        refused our credentials (a permfail in AUTH), later messages are
        refused at once, unsent, instead of trying them again. An exception
        raised by a Python state fails only its message, and its text is
        the result's ``error``.

        Raises:
            TypeError: not a Message.
            InvalidOptionError: options the C session refused.
        """
        if not isinstance(message, Message):
            raise TypeError(f"send() takes a smtpstate.Message, not {type(message).__name__}")
        cmsg = message._to_c()
        result = await self._send(message, cmsg)
        if message._body is not None:
            # A stream none of which was read (not connected, refused
            # before DATA) may be sent again, as a tempfail invites.
            message._body.release()
        return result

    async def _send(self, message: Message, cmsg: Any) -> Result:
        tag = next(_tags)
        if self._turn is None:                 # made here: bound to this loop
            self._turn = asyncio.Lock()
        async with self._turn:
            if self._auth_refused is not None:
                return _refused(message, tag, self._auth_refused)
            for attempt in range(2):
                old = self._conn
                conn = await self._connection()
                fut = conn.submit(message, cmsg, tag)
                if fut is not None:
                    result = await fut
                    if result.status == "permfail" and result.state == "AUTH":
                        # Wrong credentials stay wrong: do not try them again.
                        self._auth_refused = result
                    return result
                if conn is not old or attempt:
                    break
                # An older connection that takes no more (it failed, or its
                # QUIT is on the way): once more on a new one.
                if self._conn is conn:
                    self._conn = None
            return _not_connected(message, tag, conn.reason or "the server ended the connection")


# ---------------------------------------------------------------------------
# One-shot helpers
# ---------------------------------------------------------------------------


async def send(message: Message, host: str, port: int = 25, *,
               machine: Optional[Machine] = None, **options: Any) -> Result:
    """Deliver one message over a connection of its own.

    Args:
        message: what to deliver.
        host, port: the server (or ``"unix:/path/to/socket"``, port ignored).
        machine: the state order (default: :data:`default_machine`).
        **options: as for :class:`Client` (``protocol="lmtp"`` included).

    Returns:
        The message's :class:`Result` (never raises for a server's doing).

    Raises:
        TypeError: not a Message, or an unknown option.
        InvalidOptionError: a bad host, port or option value (before
            anything is connected).
    """
    async with Client(host, port, machine=machine, **options) as client:
        return await client.send(message)


async def deliver(messages: Iterable[Message], host: str, port: int = 25, *,
                  concurrency: int = 10, machine: Optional[Machine] = None,
                  **options: Any) -> List[Result]:
    """Deliver messages over up to ``concurrency`` connections at once.

    Each connection takes the next message as soon as it has finished the
    previous one. A worker whose connection fails before a transaction
    (TCP, greeting, EHLO, TLS, AUTH) retires; a message that failed that way
    with a tempfail goes back to the front of the queue for the workers
    still running (a server limiting connections says 421 to the extra
    ones), otherwise the result is its own. When every worker has retired,
    each message left gets a result saying why ("not attempted: ...": a
    permfail when the server refused us for good, else a tempfail at
    stage "not connected").

    Args:
        messages: what to deliver.
        host, port: the server (or ``"unix:/path/to/socket"``, port ignored).
        concurrency: the most connections open at once (>= 1).
        machine: the state order (default: :data:`default_machine`).
        **options: as for :class:`Client`.

    Returns:
        One :class:`Result` per message, in the order given.

    Raises:
        TypeError: something that is not a Message, or an unknown option.
        InvalidOptionError: a bad host, port or option value, or a
            concurrency that is not an int >= 1 (before anything is
            connected).
    """
    msgs = list(messages)
    for m in msgs:
        if not isinstance(m, Message):
            raise TypeError(f"deliver() takes smtpstate.Message objects, not {type(m).__name__}")
    _check_count(concurrency, "concurrency")
    # Refused before connecting, as Client would refuse them in each worker.
    if Options.make(**options).check_unix(host) is None:
        check_host(host)
        check_port(port)
    results: List[Optional[Result]] = [None] * len(msgs)
    todo = collections.deque(range(len(msgs)))
    workers = min(concurrency, len(msgs))
    alive = [workers]
    last_failure: List[Optional[Result]] = [None]

    async def worker() -> None:
        async with Client(host, port, machine=machine, **options) as client:
            while todo:
                i = todo.popleft()
                r = await client.send(msgs[i])
                if not _destination_failed(r):
                    results[i] = r
                    continue
                last_failure[0] = r
                alive[0] -= 1
                if r.status == "tempfail" and alive[0] > 0:
                    todo.appendleft(i)         # another connection may take it
                else:
                    results[i] = r
                return

    tasks = [asyncio.ensure_future(worker()) for _ in range(workers)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return [r if r is not None else _left_over(msgs[i], last_failure[0])
            for i, r in enumerate(results)]


def _left_over(message: Message, failure: Optional[Result]) -> Result:
    """The result of a message no connection was left to try."""
    tag = next(_tags)
    if failure is None:                        # no worker ever failed: a bug
        return _not_connected(message, tag, "no connection could be opened")
    if failure.status == "permfail":
        return _refused(message, tag, failure)
    return _not_connected(message, tag, not_attempted(failure.reason))
