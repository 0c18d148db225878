"""The engine: many deliveries at once, from one thread, driven in C.

Rule: Python submits, collects and converts; nothing else. The loop
(nonblocking sockets, epoll, deadlines, DNS, connection pools) runs inside
one long C call, ``smtps_engine_run()``, during which cffi has released the
GIL. Python states still run: C calls them through the trampolines, which
take the GIL back, and each sees a :class:`~smtpstate.session.Session` view
of its own connection.

Rule: every submitted message ends in exactly one :class:`Result`, handed
out once by :meth:`Engine.run`, carrying the :class:`Ticket` that
:meth:`Engine.submit` returned.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from typing import (Any, Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Set,
                    Tuple)

from smtpstate._ffi import check, ffi, lib
from smtpstate.classify import _of
from smtpstate.errors import InvalidMessageError, LocalProtocolError
from smtpstate.logs import Tracer, log_result
from smtpstate.machine import Machine, State, default_machine
from smtpstate.message import Message, as_messages
from smtpstate.options import Options, _printable_name, check_host
from smtpstate.result import _STATUS_NAMES, RecipientResult, Reply, Result
from smtpstate.session import Session

__all__ = ["Engine", "Ticket", "deliver"]

log = logging.getLogger("smtpstate.engine")

# Exceptions raised by states with no message in hand concern whichever
# messages their connection then fails; C writes their text into those
# results' reasons, which is how they are matched. Bounded.
_CONN_ERRORS_MAX = 256
# Destination structs kept ready for reuse (C copies them at submit).
_DEST_CACHE_MAX = 1024
# The longest single C call while waiting, so that signals (Ctrl-C) are
# handled promptly even when nothing happens on the network.
_RUN_SLICE_MS = 500


class Ticket:
    """One submitted message; :meth:`Engine.submit` returns it and its
    :class:`Result` carries it back.

    Attributes:
        id: unique within the process.
        message: the :class:`~smtpstate.Message`.
        host, port: where it goes.
        result: the :class:`Result` once it is known, else None.
    """

    __slots__ = ("id", "message", "host", "port", "result", "__weakref__")

    def __init__(self, tag: int, message: Message, host: str, port: int) -> None:
        self.id = tag
        self.message = message
        self.host = host
        self.port = port
        self.result: Optional[Result] = None

    @property
    def done(self) -> bool:
        """True once the result is known."""
        return self.result is not None

    def __repr__(self) -> str:
        state = self.result.status if self.result is not None else "pending"
        return f"<Ticket {self.id} {self.host}:{self.port} {state}>"


class _ConnectionView(Session):
    """The Session a Python state sees on one engine connection. Exceptions
    it records go to the engine, which attaches them to the right Result."""

    engine: "Engine"
    entered: Set[int]

    def _record(self, state: State, exc: BaseException) -> str:
        text = super()._record(state, exc)
        tag, _, _ = self.errors.pop()
        self.engine._state_failed(tag, text)
        return text


class _Converter:
    """C results to :class:`Result` objects, the same as
    :func:`smtpstate.result.result_from_c` but sharing the immutable parts:
    a server says the same few things again and again, and at thousands of
    results a second building each Reply and RecipientResult anew, and the
    frozen Result field by field, was most of the Python cost per message."""

    MAX = 4096                                # cached replies (then start over)

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.replies: Dict[Tuple[int, bytes, bytes], Reply] = {}
        # Keyed by (address, status, bounce class, id(reply)): the cached
        # RecipientResult holds its reply, so the id is not reused meanwhile.
        self.rcpts: Dict[Tuple[str, int, int, int], RecipientResult] = {}
        self.stages: Dict[bytes, str] = {}
        self.states: Dict[int, Optional[str]] = {}

    def reply(self, c: Any) -> Optional[Reply]:
        code = c.code
        if code == 0:
            return None
        key = (code, ffi.string(c.enhanced), ffi.string(c.text))
        r = self.replies.get(key)
        if r is None:
            if len(self.replies) >= self.MAX:
                self.replies.clear()
                self.rcpts.clear()
            r = Reply(int(code), key[1].decode("ascii", "replace"),
                      key[2].decode("utf-8", "replace"))
            self.replies[key] = r
        return r

    def recipient(self, address: str, c: Any) -> RecipientResult:
        status, bounce = c.status, c.bounce_class
        reply = self.reply(c.reply)
        key = (address, status, bounce, id(reply))
        rr = self.rcpts.get(key)
        if rr is None:
            if len(self.rcpts) >= self.MAX:
                self.rcpts.clear()
            rr = RecipientResult(address, _STATUS_NAMES.get(status, "pending"), reply,
                                 _of(int(bounce)))
            self.rcpts[key] = rr
        return rr

    def state(self, sid: int) -> Optional[str]:
        try:
            return self.states[sid]
        except KeyError:
            pass
        name: Optional[str] = None
        if sid >= 0:
            try:
                name = self.machine.name(sid)
            except KeyError:
                name = None
        self.states[sid] = name
        return name

    def result(self, c: Any, message: Optional[Message], reason: str,
               error: Optional[str], ticket: Any) -> Result:
        addresses = message.recipients if message is not None else ()
        n = c.nrcpt
        if n:
            rcpt, naddr = c.rcpt, len(addresses)
            recipients = tuple(self.recipient(addresses[i] if i < naddr else "", rcpt[i])
                               for i in range(n))
        else:
            recipients = ()
        raw = ffi.string(c.stage_name)
        stage = self.stages.get(raw)
        if stage is None:
            stage = self.stages[raw] = raw.decode("utf-8", "replace")
        bounce = c.bounce_class
        return _make_result({
            "status": _STATUS_NAMES.get(c.status, "tempfail"), "reply": self.reply(c.reply),
            "recipients": recipients, "stage": stage, "stage_code": c.stage,
            "state": self.state(c.state), "reason": reason, "message": message,
            "bounce_class": _of(int(bounce)) if bounce else None, "error": error,
            "ticket": ticket})


def _result_maker() -> Any:
    """Result(**fields), without the frozen dataclass's one
    object.__setattr__ call per field: the instance dict is filled at once,
    then __post_init__ runs, as the generated __init__ would do. Falls back
    to the constructor when Result is not that kind of class any more
    (slots, factories, fields set outside __init__, fields we do not fill)."""
    import dataclasses

    fields = dataclasses.fields(Result)
    filled = {"status", "reply", "recipients", "stage", "stage_code", "state", "reason",
              "message", "bounce_class", "error", "ticket"}
    required = {f.name for f in fields if f.default is dataclasses.MISSING}
    if (hasattr(Result, "__slots__") or not required <= filled
            or not filled <= {f.name for f in fields}
            or any(not f.init or f.default_factory is not dataclasses.MISSING  # type: ignore[misc]
                   for f in fields)):
        return lambda values: Result(**values)
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    post = getattr(Result, "__post_init__", None)
    new = object.__new__

    def make(values: Dict[str, Any]) -> Result:
        r = new(Result)
        d = r.__dict__
        d.update(defaults)
        d.update(values)
        if post is not None:
            post(r)
        return r
    return make


_make_result = _result_maker()


def _default_helo() -> str:
    from smtpstate.client import _default_helo as helo
    return helo()


class Engine:
    """Deliver many messages concurrently over pooled connections.

    Args:
        max_connections: connections open at once, in all.
        max_per_destination: connections open at once to one destination
            (host, port and options: messages with different options never
            share a connection).
        messages_per_connection: QUIT after this many; 0: no limit.
        idle_timeout: seconds an unused connection stays open for the next
            message (it is only closed while :meth:`run` runs, or by
            :meth:`close`).
        connect_timeout: seconds for each connection attempt and each DNS
            lookup (a destination's ``timeout`` option shortens it).
        machine: the state order to run (default: :data:`default_machine`).
        helo: the EHLO/HELO name (default: this host's FQDN); the ``helo``
            option overrides it per destination.

    Raises:
        InvalidMessageError: a bad limit, timeout or HELO name.
        OSError: the engine could not be made (epoll, memory).

    One thread at a time: a call made while another is running (from a
    second thread, or from a state inside :meth:`run`) raises
    LocalProtocolError instead of corrupting the loop.
    """

    def __init__(self, *, max_connections: int = 1000, max_per_destination: int = 10,
                 messages_per_connection: int = 0, idle_timeout: float = 5.0,
                 connect_timeout: float = 30.0, machine: Optional[Machine] = None,
                 helo: Optional[str] = None) -> None:
        for name, value, low in (("max_connections", max_connections, 1),
                                 ("max_per_destination", max_per_destination, 1),
                                 ("messages_per_connection", messages_per_connection, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value < 2**31:
                raise InvalidMessageError(f"{name} must be an int >= {low}, not {value!r}")
        for name, secs in (("idle_timeout", idle_timeout), ("connect_timeout", connect_timeout)):
            if not isinstance(secs, (int, float)) or not 0 < secs < 10**7:
                raise InvalidMessageError(f"{name} must be a positive number of seconds")
        self.machine = machine if machine is not None else default_machine
        self.helo = helo if helo is not None else _default_helo()
        self._ptr: Any = None
        self._lock = threading.Lock()
        self._tags = itertools.count(1)
        self._tickets: Dict[int, Ticket] = {}
        self._messages: Dict[int, Message] = {}
        self._ready: Deque[Result] = collections.deque()
        self._errors: Dict[int, List[str]] = {}
        self._conn_errors: Dict[str, None] = {}
        self._views: Dict[int, _ConnectionView] = {}
        self._dests: Dict[Any, Tuple[Any, list]] = {}
        self._convert = _Converter(self.machine)
        self._tracer: Optional[Tracer] = None   # lives as long as the engine
        self._tracing = False
        cfg = ffi.new("struct smtps_engine_config *")
        cfg.sizeof_config = ffi.sizeof("struct smtps_engine_config")
        cfg.max_connections = max_connections
        cfg.max_per_destination = max_per_destination
        cfg.messages_per_connection = messages_per_connection
        cfg.idle_timeout_ms = max(1, int(idle_timeout * 1000))
        cfg.connect_timeout_ms = max(1, int(connect_timeout * 1000))
        # C would stop at a NUL and take "a" for "a\0b": check it here.
        chelo = _printable_name("HELO name", self.helo, lib.SMTPS_HELO_MAX).encode("ascii")
        chelo_c = ffi.new("char[]", chelo)      # lives until engine_new copied it
        cfg.helo = chelo_c
        self._handle = ffi.new_handle(self)
        ptr = lib.smtps_engine_new(self.machine._ptr, cfg, self._handle)
        if ptr == ffi.NULL:
            if (not chelo or b" " in chelo or len(chelo) > lib.SMTPS_HELO_MAX
                    or any(b < 0x21 or b == 0x7F for b in chelo)):
                raise InvalidMessageError(
                    f"HELO name {self.helo!r} must be 1-{lib.SMTPS_HELO_MAX} printable "
                    "ASCII bytes without spaces")
            raise OSError("cannot make the engine (epoll or memory not available)")
        self._ptr = ptr
        log.debug("engine ready: %d connections (%d per destination), HELO %s",
                  max_connections, max_per_destination, self.helo)

    # -- submitting --------------------------------------------------------

    def submit(self, message: Message, host: str, port: int = 25, **options: Any) -> Ticket:
        """Queue ``message`` for ``host:port``; return its :class:`Ticket`.

        Args:
            message: the :class:`~smtpstate.Message`.
            host: a name, or an IPv4 or IPv6 address literal.
            port: the TCP port.
            **options: those of :class:`~smtpstate.options.Options`: ``tls``,
                ``auth``, ``ca_file``, ``timeout``, ``helo``,
                ``server_hostname``,
                ``dangerously_skip_certificate_verification``.

        Raises:
            TypeError: not a Message, or an unknown option.
            InvalidMessageError: a bad host, port or option value.
            LocalProtocolError: the engine is closed, or busy in another
                call (another thread, or a state running inside run()).
        """
        if not isinstance(message, Message):
            raise TypeError(f"submit() takes a smtpstate.Message, not {type(message).__name__}")
        dest = self._destination(host, port, options)
        with self._guard():
            cmsg = message._to_c()
            tag = next(self._tags)
            check(lib.smtps_engine_submit(self._ptr, cmsg, dest, tag), "submit the message")
            ffi.gc(cmsg, None)                    # the engine owns it now
            ticket = Ticket(tag, message, host, int(port))
            self._tickets[tag] = ticket
            self._messages[tag] = message
        return ticket

    def submit_message(self, msg: Any, host: str, port: int = 25, *,
                       sender: Optional[str] = None,
                       recipients: Optional[Sequence[str]] = None,
                       dsn_ret: Optional[str] = None, envid: Optional[str] = None,
                       **options: Any) -> Ticket:
        """Queue a standard-library ``email.message.EmailMessage``, its
        envelope taken from its headers as ``smtplib.send_message`` does
        (:meth:`Message.from_email`); the rest as for :meth:`submit`.
        The ticket's ``message`` is the :class:`~smtpstate.Message` made.
        """
        message = Message.from_email(msg, sender, recipients, dsn_ret=dsn_ret, envid=envid)
        return self.submit(message, host, port, **options)

    def _destination(self, host: str, port: int, options: Dict[str, Any]) -> Any:
        """A ``struct smtps_destination`` for these settings, cached. A hit
        was validated when it was cached: the host is checked on a miss only
        (that check walks the name, once per submit it was the costliest
        part of submitting)."""
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise InvalidMessageError(f"port must be 1-65535, not {port!r}")
        try:
            key: Any = (host, port, tuple(sorted(options.items())))
            hit = self._dests.get(key) if type(host) is str else None
        except TypeError:                        # an unhashable option value
            key, hit = None, None
        if hit is not None:
            return hit[0]
        check_host(host)
        opts = Options.make(**options)
        keep: list = []
        try:
            dest = opts.destination(host, port, keep)
        except UnicodeError:
            raise InvalidMessageError(f"host {host!r} is not a valid host name") from None
        if key is not None:
            if len(self._dests) >= _DEST_CACHE_MAX:
                self._dests.clear()
            self._dests[key] = (dest, keep)
        return dest

    # -- running -------------------------------------------------------------

    def run(self, timeout: Optional[float] = None) -> Iterator[Result]:
        """Yield each :class:`Result` as it completes, until every message
        submitted (before or during the iteration) has its result.

        Args:
            timeout: seconds for the whole iteration; None: no limit.

        Raises:
            TimeoutError: results are still pending after ``timeout``; the
                deliveries go on with the next call.
            LocalProtocolError: the engine is closed or busy elsewhere.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            while self._ready:
                yield self._ready.popleft()
            if not self._tickets:
                return
            wait = _RUN_SLICE_MS
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{len(self._tickets)} message(s) still pending after {timeout} s")
                wait = min(wait, max(1, int(left * 1000)))
            with self._guard():
                self._sync_trace()
                check(lib.smtps_engine_run(self._ptr, wait), "run the engine")
                self._collect()

    def _sync_trace(self) -> None:
        """New connections log the transcript while the transcript logger
        is on (call with the guard)."""
        want = Tracer.wanted()
        if want == self._tracing:
            return
        if want:
            if self._tracer is None:
                self._tracer = Tracer()
            self._tracer.attach_engine(self._ptr)
        else:
            lib.smtps_engine_set_trace(self._ptr, ffi.NULL, ffi.NULL)
        self._tracing = want

    def _collect(self) -> None:
        """Convert every C result ready into a Result (call with the guard)."""
        next_result, free, null = lib.smtps_engine_next_result, lib.smtps_result_free, ffi.NULL
        ptr, tickets, messages, errors_of = self._ptr, self._tickets, self._messages, self._errors
        convert, ready = self._convert.result, self._ready
        while True:
            r = next_result(ptr)
            if r == null:
                return
            try:
                tag = r.tag
                ticket = tickets.pop(tag, None)
                message = messages.pop(tag, None)
                reason = ffi.string(r.reason).decode("utf-8", "replace")
                errors = errors_of.pop(tag, None) if errors_of else None
                if self._conn_errors:
                    errors = (errors or []) + [t for t in self._conn_errors if t in reason]
                result = convert(r, message, reason,
                                 ("; ".join(errors) or None) if errors else None, ticket)
            finally:
                free(r)
            if ticket is not None:
                ticket.result = result
            log_result(result, f"{ticket.host}:{ticket.port} " if ticket is not None else "")
            ready.append(result)

    # -- Python states -------------------------------------------------------

    def _session_view(self, csession: Any, entering: Optional[State]) -> Session:
        """The view of C session ``csession`` that states see (made once)."""
        key = int(ffi.cast("uintptr_t", csession))
        view = self._views.get(key)
        if view is None:
            view = _ConnectionView._wrap(csession, self.machine, self._messages)
            view.engine = self
            view.entered = set()
            self._views[key] = view
        if entering is not None:
            view.entered.add(id(entering))
        return view

    def _session_left(self, csession: Any, state: State) -> None:
        """State ``state`` was freed with its C session; the view goes with
        the last one, before C can reuse the address for a new session."""
        key = int(ffi.cast("uintptr_t", csession))
        view = self._views.get(key)
        if view is None:
            return
        view.entered.discard(id(state))
        if not view.entered:
            del self._views[key]

    def _state_failed(self, tag: Optional[int], text: str) -> None:
        if tag is not None:
            self._errors.setdefault(tag, []).append(text)
            return
        if len(self._conn_errors) >= _CONN_ERRORS_MAX:
            self._conn_errors.pop(next(iter(self._conn_errors)))
        self._conn_errors[text] = None

    # -- the rest --------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Messages submitted whose result has not been handed out yet."""
        return len(self._tickets) + len(self._ready)

    def __len__(self) -> int:
        return self.pending

    @property
    def connections(self) -> int:
        """Connections open or being opened now."""
        return int(lib.smtps_engine_connections(self._ptr)) if self._ptr is not None else 0

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def close(self) -> None:
        """Close every connection (QUIT where it costs nothing) and free the
        engine. Messages without a result by now never get one: call
        :meth:`run` to the end first."""
        if self._ptr is None:
            return
        with self._guard(closing=True):
            if self._tickets:
                log.warning("engine closed with %d message(s) still without a result",
                            len(self._tickets))
            ptr, self._ptr = self._ptr, None
            lib.smtps_engine_free(ptr)
            self._views.clear()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        # Free with self still alive: sessions' Python states are called
        # back through self._handle while C frees them.
        try:
            if getattr(self, "_ptr", None) is not None:
                self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        if self._ptr is None:
            return "<Engine closed>"
        return f"<Engine pending={self.pending} connections={self.connections}>"

    def _guard(self, closing: bool = False) -> "_Guard":
        return _Guard(self, closing)


class _Guard:
    """One call at a time, and none after close()."""

    __slots__ = ("engine", "closing")

    def __init__(self, engine: Engine, closing: bool) -> None:
        self.engine, self.closing = engine, closing

    def __enter__(self) -> None:
        if not self.engine._lock.acquire(blocking=False):
            raise LocalProtocolError(
                "this Engine is already in use (a call from one of its states, "
                "or another thread); one call at a time")
        if self.engine._ptr is None and not self.closing:
            self.engine._lock.release()
            raise LocalProtocolError("this Engine is closed")

    def __exit__(self, *exc: Any) -> None:
        self.engine._lock.release()


def deliver(messages: Iterable[Message], host: str, port: int = 25, *,
            concurrency: int = 10, **options: Any) -> List[Result]:
    """Deliver ``messages`` to one server over up to ``concurrency``
    connections; return their results in the same order.

    Args:
        messages: :class:`~smtpstate.Message` objects.
        host, port: the server.
        concurrency: connections at once.
        **options: as for :meth:`Engine.submit`.

    Raises:
        TypeError: an item is not a Message, or an unknown option.
        InvalidMessageError: a bad host, port or option.
    """
    batch = as_messages(messages)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise InvalidMessageError(f"concurrency must be an int >= 1, not {concurrency!r}")
    with Engine(max_connections=concurrency, max_per_destination=concurrency) as engine:
        tickets = [engine.submit(m, host, port, **options) for m in batch]
        for _ in engine.run():
            pass
    out: List[Result] = []
    for t in tickets:
        assert t.result is not None            # run() ends only when all are in
        out.append(t.result)
    return out
