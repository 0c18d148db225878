"""The engine: many deliveries at once, from one thread, driven in C.

Rule: Python submits, collects and converts; nothing else. The loop
(nonblocking sockets, epoll, deadlines, DNS, connection pools) runs inside
one long C call, ``smtps_engine_run()``, during which cffi has released the
GIL. Python states still run: C calls them through the trampolines, which
take the GIL back, and each sees a :class:`~smtpstate.session.Session` view
of its own connection.

Rule: every submitted message ends in exactly one :class:`Result`, handed
out once by :meth:`Engine.run` (or :meth:`Engine.step`), carrying the
:class:`Ticket` that :meth:`Engine.submit` returned.

Rule: one thread drives C at a time (the guard's token); :meth:`Engine.submit`
is the exception, safe from any thread at any time: when the token is taken
(another thread is inside :meth:`Engine.run`, or a state running inside it
submits) the message waits in the engine's inbox, C's loop is woken through
its eventfd (``smtps_engine_wake()``, the one C call any thread may make),
and the driving thread hands it to C at its next turn, at once. A lone
thread never touches the inbox: the single-threaded path takes no lock.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
import weakref
from typing import (Any, Callable, Deque, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence,
                    Set, Tuple)

from smtpstate._ffi import check, ffi, interrupt_pending, lib, raise_interrupt
from smtpstate.classify import _of
from smtpstate.errors import InvalidMessageError, InvalidOptionError, LocalProtocolError
from smtpstate.logs import Tracer, log_result, result_log, transcript_log
from smtpstate.machine import Machine, State, default_machine
from smtpstate.message import Message, as_messages
from smtpstate.options import (Options, _check_count, _check_seconds, _printable_name,
                               check_host, check_port)
from smtpstate.result import (_STATUS_NAMES, RecipientResult, Reply, Result, not_attempted,
                              unsent_result)
from smtpstate.routing import (ADDRESS_PREFERENCES, INET_PROTOCOLS, Limits, Resolver, Source,
                               apply_limits, apply_sources)
from smtpstate.session import Session, _bind, _unbind

__all__ = ["Engine", "Ticket", "deliver", "deliver_iter"]

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
_STS_POLL_MS = 20          # how often held messages are looked at (run())
_TLS_EVENTS_MAX = 65536    # TLS events C keeps until run() takes them
_DNSSEC_STATES = {lib.SMTPS_DNSSEC_UNKNOWN: "unknown", lib.SMTPS_DNSSEC_OFF: "off",
                  lib.SMTPS_DNSSEC_ON: "on", lib.SMTPS_DNSSEC_STRIPPED: "stripped"}
# The levels whose messages wait for their domains' MTA-STS policies (None:
# the default, "dane" by MX); the others are the caller's choice.
_STS_LEVELS = frozenset({None, "dane", "dane-only", "mta-sts"})
_new = object.__new__
_submit_copy = lib.smtps_engine_submit_copy
_submit_plain = lib.smtps_engine_submit_plain
_from_buffer = ffi.from_buffer
_BUSY = ("this Engine is already in use (a call from one of its states, "
         "or another thread); one call at a time")
# Tickets' ids (C's tags): one count for the process, so that an id is
# unique among every Engine's tickets (aio.Engine's included).
_TAGS = itertools.count(1)
_CANCEL_OUTCOMES = {int(lib.SMTPS_CANCEL_DONE): "cancelled",
                    int(lib.SMTPS_CANCEL_PENDING): "pending",
                    int(lib.SMTPS_CANCEL_TOO_LATE): "too late",
                    int(lib.SMTPS_ENOTFOUND): "not found"}


class Ticket:
    """One submitted message; :meth:`Engine.submit` returns it and its
    :class:`Result` carries it back.

    Attributes:
        id: unique within the process, over every Engine (a message held
            while its domains' MTA-STS policies are looked for has 0 until
            it leaves the hold).
        message: the :class:`~smtpstate.Message`.
        host, port: where it goes (host None: by its recipients' MX
            records, each MX host at that port).
        result: the :class:`Result` once it is known, else None.
    """

    __slots__ = ("id", "message", "host", "port", "result", "__weakref__")

    # Engine.submit() makes its tickets without calling __init__ (it sets
    # these same five attributes itself): keep the two in step.
    def __init__(self, tag: int, message: Message, host: Optional[str], port: int) -> None:
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
        where = f"{self.host}:{self.port}" if self.host is not None else f"MX:{self.port}"
        return f"<Ticket {self.id} {where} {state}>"


class _StreamTicket(Ticket):
    """A ticket of :func:`deliver_iter`, whose caller reaches it only
    through its Result (``result.ticket``): it refers back to that Result
    weakly. A strong link both ways is a reference cycle, which leaves
    every finished message and Result to the cyclic garbage collector, and
    in a stream that garbage piles up (survivors of young collections
    wait for a full one): about 17 KiB per message in a window of 1,000,
    measured, where freeing each as the caller drops it costs nothing."""

    __slots__ = ("_result",)

    @property  # type: ignore[override]
    def result(self) -> Optional[Result]:
        ref = self._result
        return ref() if ref is not None else None

    @result.setter
    def result(self, value: Optional[Result]) -> None:
        self._result = weakref.ref(value) if value is not None else None


class _MessagesByTag(Dict[int, Message]):
    """The messages of the tickets still pending, by tag, for the Session
    views of Python states (which only call get()): a dict in type only,
    reading the engine's tickets, so that submitting and collecting keep
    one dict up to date instead of two."""

    def __init__(self, tickets: Dict[int, Ticket]) -> None:
        super().__init__()
        self._tickets = tickets

    def get(self, tag: int, default: Any = None) -> Any:  # type: ignore[override]
        ticket = self._tickets.get(tag)
        return ticket.message if ticket is not None else default

    def __getitem__(self, tag: int) -> Message:
        return self._tickets[tag].message

    def __contains__(self, tag: object) -> bool:
        return tag in self._tickets

    def __len__(self) -> int:
        return len(self._tickets)

    def __iter__(self) -> Iterator[int]:
        return iter(self._tickets)


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


class _Collector:
    """C results to :class:`Result` objects, through a C collector
    (``smtps_engine_run_collect``, csrc/batch.c): C hands out each batch
    of results as (tag, shape slot, reply slot) numbers, and Python builds
    what a slot means once, when C says the slot is new. A server says the
    same few things again and again; at thousands of results a second,
    reading every result field by field through cffi and building each
    Reply and RecipientResult anew was most of the Python cost per message.

    A shape's prototype is ``(fields, recipient info, recipients by
    address tuple, bounce class code, needs __post_init__, needs either,
    delivered)``.
    """

    MAX = 4096                                # cached replies (then start over)
    RCPTS_MAX = 256                           # recipient tuples per shape

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        ptr = lib.smtps_collector_new()
        if ptr == ffi.NULL:
            raise MemoryError("cannot allocate a result collector")
        self.ptr = ffi.gc(ptr, lib.smtps_collector_free)
        self.out = ffi.new("uint64_t[]", 3 * _COLLECT_MAX)
        # The first n triples of out as n rows of 3, for each n, made once:
        # views[n].tolist() is [[tag, shape slot, reply slot], ...].
        raw = memoryview(ffi.buffer(self.out))
        self.views = [raw[:24 * n].cast("Q", (n, 3)) if n else raw[:0].cast("Q")
                      for n in range(_COLLECT_MAX + 1)]
        self.shapes: List[Any] = [None] * _SLOTS
        self.slot_replies: List[Optional[Reply]] = [None] * _SLOTS  # [0]: no reply
        self.replies: Dict[Tuple[int, bytes, bytes], Reply] = {}
        self.stages: Dict[bytes, str] = {}
        self.states: Dict[int, Optional[str]] = {}

    def close(self) -> None:
        """Free the C collector and what it keeps, now."""
        if self.ptr is not None:
            ffi.release(self.ptr)
            self.ptr = None

    def reply(self, c: Any) -> Optional[Reply]:
        """A ``struct smtps_result_reply`` as a Reply (shared when equal)."""
        code = c.code
        if code == 0:
            return None
        key = (code, ffi.string(c.enhanced), ffi.string(c.text))
        r = self.replies.get(key)
        if r is None:
            if len(self.replies) >= self.MAX:
                self.replies.clear()
            r = Reply(int(code), key[1].decode("ascii", "replace"),
                      key[2].decode("utf-8", "replace"))
            self.replies[key] = r
        return r

    def new_reply(self, slot: int) -> Optional[Reply]:
        """C says reply slot ``slot`` is new: read it."""
        self.slot_replies[slot] = None
        c = lib.smtps_collector_reply(self.ptr, slot)
        r = self.reply(c) if c != ffi.NULL else None
        self.slot_replies[slot] = r
        return r

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

    def new_shape(self, slot: int) -> Any:
        """C says shape slot ``slot`` is new: read the result kept there
        into a prototype."""
        self.shapes[slot] = None
        c = lib.smtps_collector_shape(self.ptr, slot)
        status = _STATUS_NAMES[c.status]
        raw = ffi.string(c.stage_name)
        stage = self.stages.get(raw)
        if stage is None:
            stage = self.stages[raw] = raw.decode("utf-8", "replace")
        reason = ffi.string(c.reason).decode("utf-8", "replace") if c.reason[0] != b"\0" else ""
        rcpt = c.rcpt
        routes = [(ffi.string(c.route[k].mx).decode("utf-8", "replace") or None,
                   ffi.string(c.route[k].ip).decode("ascii", "replace") or None)
                  for k in range(c.nroute)]
        info = tuple((_STATUS_NAMES[rcpt[i].status], self.reply(rcpt[i].reply),
                      int(rcpt[i].bounce_class),
                      *(routes[rcpt[i].route] if 0 <= rcpt[i].route < len(routes)
                        else (None, None)),
                      ffi.string(rcpt[i].enhanced).decode("ascii", "replace"))
                     for i in range(c.nrcpt))
        bounce = int(c.bounce_class)
        # Every field, in the dataclass's order, the four that differ per
        # result as placeholders: a Result's dict is then one copy of it
        # (no insertion, no resize) and four replacements.
        fields = {"status": status, "reply": None, "recipients": (), "stage": stage,
                  "stage_code": int(c.stage), "state": self.state(c.state), "reason": reason,
                  "error": None, "ticket": None, "message": None, "bounce_class": None,
                  "enhanced": ffi.string(c.enhanced).decode("ascii", "replace")}
        delivered = status == "delivered"
        by_address: Dict[Any, Tuple[RecipientResult, ...]] = {}
        # __post_init__ does nothing unless a failure has no class from C;
        # extra: the Result needs a bounce class or __post_init__.
        post = not delivered and not bounce
        proto = (fields, info, by_address, bounce, post, bool(bounce) or post, delivered)
        self.shapes[slot] = proto
        return proto

    def recipients(self, proto: Any, addresses: Sequence[Any]) -> Tuple[RecipientResult, ...]:
        """The RecipientResults of a shape for these addresses (kept)."""
        naddr = len(addresses)
        rcpts = tuple(RecipientResult(addresses[i] if i < naddr else "", status, reply, _of(b),
                                      mx, ip, enhanced)
                      for i, (status, reply, b, mx, ip, enhanced) in enumerate(proto[1]))
        cache = proto[2]
        if len(cache) >= self.RCPTS_MAX:
            cache.clear()
        cache[addresses] = rcpts
        return rcpts


def _fast_results() -> bool:
    """True when a Result can be made as object.__new__ plus its instance
    dict filled at once (then __post_init__ where it would do something),
    which is what the generated __init__ does, without the frozen
    dataclass's object.__setattr__ per field; False when Result is not that
    kind of class any more (slots, factories, fields set outside __init__,
    fields we do not fill): then the constructor is used."""
    import dataclasses

    fields = dataclasses.fields(Result)
    return (not hasattr(Result, "__slots__")
            and {f.name for f in fields} == _RESULT_FIELDS
            and all(f.init and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
                    for f in fields))


_RESULT_FIELDS = {"status", "reply", "recipients", "stage", "stage_code", "state", "reason",
                  "message", "bounce_class", "error", "ticket", "enhanced"}
_FAST_RESULTS = _fast_results()


def _level_cache(logger: logging.Logger) -> Dict[int, bool]:
    """The dict in which ``logger`` caches its isEnabledFor() answers by
    level, when reading it (while the logger is not disabled) is exactly
    what isEnabledFor() does: a plain Logger. Otherwise an empty dict,
    which makes the reader call isEnabledFor() every time. run() reads it
    at each turn: a dict lookup where the call costs a Python frame."""
    cache = getattr(logger, "_cache", None)
    if (type(logger).isEnabledFor is not logging.Logger.isEnabledFor
            or type(cache) is not dict):
        return {}
    return cache  # type: ignore[no-any-return]


_post_init = getattr(Result, "__post_init__", lambda r: None)
_SLOTS = int(lib.SMTPS_COLLECT_SLOTS)
_EINTR = int(lib.SMTPS_EINTR)
_COLLECT_MAX = int(lib.SMTPS_COLLECT_MAX)


def _one_domain(message: Message) -> None:
    """A stream (read once, as it is sent) routed by MX may reach one
    destination only: its recipients must share their domain."""
    domains = {str(r).rpartition("@")[2].rstrip(".").lower() for r in message.recipients}
    if len(domains) > 1:
        raise InvalidMessageError(
            "this message's body is a stream, which can be read only once, and its "
            f"recipients are in {len(domains)} domains, which may be routed to as many "
            "destinations: give the body as bytes, a buffer or a file, or one message "
            "per domain")


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
            message (closed with QUIT while :meth:`run` runs, by
            ``run(forever=True)`` and :meth:`step` when idle, or by
            :meth:`close`).
        connect_timeout: seconds for each connection attempt and each DNS
            lookup (a destination's ``timeout`` option shortens it).
        machine: the state order to run (default: :data:`default_machine`).
        helo: the EHLO/HELO name (default: this host's FQDN); the ``helo``
            option overrides it per destination.
        resolver: a :class:`~smtpstate.Resolver` (default: the system's
            ``resolv.conf`` and ``/etc/hosts``).
        limits: traffic shaping, ``{key: Limits(...)}``; a key is a
            recipient domain, ``"mx:"`` and a glob on MX host names, or
            ``"*"``. A destination follows the most specific rule that
            matches it (docs/routing.md); without one, the limits above.
        sources: :class:`~smtpstate.Source` addresses to connect from, in
            turn (per destination); ``submit(source=...)`` pins one.
        mx_address_limit: addresses tried per delivery, over all MX hosts.
        inet_protocols: ``"all"``, ``"ipv4"`` or ``"ipv6"``: the address
            families used.
        address_preference: ``"any"`` (a random family first for each
            host), ``"ipv6"`` or ``"ipv4"``: which is tried first.
        protocol: ``"smtp"`` or ``"lmtp"``: the protocol of every submit
            that does not say (LMTP needs a host: a TCP host or
            ``"unix:/path"``).
        tls_resumption: resume the TLS session of the last handshake with
            a host on the next connection to it (one session kept per host
            of a destination, only under the same TLS policy and server
            name; docs/tls.md). False: a full handshake every time.
        max_tls_handshakes: TLS handshakes running at once, in all; a
            connection whose handshake would begin beyond that waits for
            its turn after the server's reply to STARTTLS. A handshake
            holds several times the memory of an established TLS
            connection while it runs, and thousands at once leave the
            heap fragmented for good (docs/tls.md, "Memory").
        mta_sts: find the MTA-STS policies (RFC 8461) of the domains
            routed by MX at a level that uses them (the default, "dane",
            "dane-only", "mta-sts"), off the loop, holding their messages
            until they are known, and enforce them (docs/tls.md): True
            (the default) with :class:`smtpstate.sts_discovery.MtaSts`'s
            defaults, or an ``MtaSts`` of your own; None or False: only the
            policies given with :meth:`set_mta_sts_policy`.
        on_tls_event: called with each :class:`smtpstate.tlsrpt.TlsEvent`
            (what became of a connection's TLS, per recipient domain;
            RFC 8460), from :meth:`run`, outside the engine's guard; what
            it raises is logged and does not stop the deliveries.
        tls_report_retention: seconds of TLS events kept for
            :meth:`tls_report`.

    Raises:
        InvalidOptionError: a bad limit, timeout, HELO name, resolver
            setting, rule or source (one that cannot be bound).
        OSError: the engine could not be made (epoll, memory).

    One driver at a time: :meth:`run`, :meth:`step` and the other calls
    that touch C, made while another is running (from a second thread,
    or from a state inside :meth:`run`), raise LocalProtocolError instead
    of corrupting the loop. :meth:`submit`, :meth:`stop` and
    :meth:`close` are safe from any thread at any time (docs/service.md).

    As a context manager, the engine delivers before it closes: leaving
    the ``with`` block normally runs it until every message submitted has
    its result (``submit()`` without ``run()`` still sends), as
    ``concurrent.futures`` executors wait on exit; an exception leaving the
    block closes it at once (see :meth:`__exit__`).
    """

    def __init__(self, *, max_connections: int = 1000, max_per_destination: int = 10,
                 messages_per_connection: int = 0, idle_timeout: float = 5.0,
                 connect_timeout: float = 30.0, machine: Optional[Machine] = None,
                 helo: Optional[str] = None, resolver: Optional[Resolver] = None,
                 limits: Optional[Mapping[str, Limits]] = None,
                 sources: Optional[Sequence[Source]] = None, mx_address_limit: int = 5,
                 inet_protocols: str = "all", address_preference: str = "any",
                 protocol: str = "smtp", tls_resumption: bool = True,
                 max_tls_handshakes: int = 100, mta_sts: Any = True,
                 on_tls_event: Optional[Callable[[Any], None]] = None,
                 tls_report_retention: float = 2 * 86400.0) -> None:
        _check_count(max_connections, "max_connections")
        _check_count(max_per_destination, "max_per_destination")
        _check_count(messages_per_connection, "messages_per_connection", 0)
        _check_seconds(idle_timeout, "idle_timeout")
        _check_seconds(connect_timeout, "connect_timeout")
        _check_count(mx_address_limit, "mx_address_limit")
        _check_count(max_tls_handshakes, "max_tls_handshakes")
        if mx_address_limit > 16:
            raise InvalidOptionError(f"mx_address_limit must be at most 16, not {mx_address_limit}")
        if inet_protocols not in INET_PROTOCOLS:
            raise InvalidOptionError(f"inet_protocols must be one of {sorted(INET_PROTOCOLS)}, "
                                     f"not {inet_protocols!r}")
        if address_preference not in ADDRESS_PREFERENCES:
            raise InvalidOptionError("address_preference must be one of "
                                     f"{sorted(ADDRESS_PREFERENCES)}, not {address_preference!r}")
        if not isinstance(tls_resumption, bool):
            raise InvalidOptionError(f"tls_resumption must be True or False, not {tls_resumption!r}")
        if resolver is not None and not isinstance(resolver, Resolver):
            raise InvalidOptionError(f"resolver must be a smtpstate.Resolver, not {resolver!r}")
        if mta_sts is not None and not isinstance(mta_sts, bool):
            from smtpstate.sts_discovery import MtaSts
            if not isinstance(mta_sts, MtaSts):
                raise InvalidOptionError(
                    "mta_sts must be True, False, None or a smtpstate.sts_discovery.MtaSts, "
                    f"not {mta_sts!r}")
        if on_tls_event is not None and not callable(on_tls_event):
            raise InvalidOptionError(f"on_tls_event must be callable, not {on_tls_event!r}")
        from smtpstate.tlsrpt import TlsReports
        self._tls_reports = TlsReports(tls_report_retention)
        self._on_tls_event = on_tls_event
        self._tls_told: Deque[Any] = collections.deque()    # for on_tls_event
        self._sts_policies: Dict[str, Any] = {}             # what set_mta_sts_policy gave
        Options.make(protocol=protocol)          # checked once, here
        self._defaults: Dict[str, Any] = {} if protocol == "smtp" else {"protocol": protocol}
        self.machine = machine if machine is not None else default_machine
        self.helo = helo if helo is not None else _default_helo()
        self._ptr: Any = None
        # The guard's token: the right to call C, one call at a time (see
        # _Guard). Taking it is list.pop(), atomic under the GIL, which
        # costs a third of a non-blocking Lock.acquire() and release().
        self._token: List[bool] = [True]
        self._tags = _TAGS
        # Messages submitted while the token was taken (another thread in
        # run(), a state inside it): (ticket, entry) in order, handed to C
        # by whoever drives next (_drain_inbox). deque.append/popleft are
        # atomic under the GIL.
        self._inbox: Deque[Tuple[Ticket, Any]] = collections.deque()
        # Held for close() against the engine being freed under a wake-up.
        self._wake_lock = threading.Lock()
        self._stopping = False                 # stop(): run(forever) returns
        self._driver: Optional[int] = None     # thread id inside run()/step()
        self._step_turn: Optional[Callable[[int, bool], int]] = None
        self._turning: Optional[int] = None    # thread id inside a turn (C's loop)
        self._tickets: Dict[int, Ticket] = {}
        # What submit() makes: deliver_iter() sets _StreamTicket.
        self._ticket_type: type = Ticket
        self._messages = _MessagesByTag(self._tickets)
        self._ready: Deque[Result] = collections.deque()
        self._errors: Dict[int, List[str]] = {}
        self._conn_errors: Dict[str, None] = {}
        self._views: Dict[Any, _ConnectionView] = {}   # by C session pointer
        self._dests: Dict[Any, Tuple[Any, list]] = {}
        # (host, port, options, (destination, what it points to)) of the
        # last submit() whose destination was cached.
        self._last_dest: Tuple[Any, Any, Any, Any] = (None, None, None, (None, None))
        self._collector = _Collector(self.machine)
        self._backlog: List[List[int]] = []     # see run()
        self._tracer: Optional[Tracer] = None   # lives as long as the engine
        self._tracing = False
        cfg = ffi.new("struct smtps_engine_config *")
        cfg.sizeof_config = ffi.sizeof("struct smtps_engine_config")
        cfg.max_connections = max_connections
        cfg.max_per_destination = max_per_destination
        cfg.messages_per_connection = messages_per_connection
        cfg.idle_timeout_ms = max(1, int(idle_timeout * 1000))
        cfg.connect_timeout_ms = max(1, int(connect_timeout * 1000))
        cfg.mx_address_limit = mx_address_limit
        cfg.inet_protocols = INET_PROTOCOLS[inet_protocols]
        cfg.address_preference = ADDRESS_PREFERENCES[address_preference]
        cfg.tls_no_resumption = 0 if tls_resumption else 1
        cfg.max_tls_handshakes = max_tls_handshakes
        # C would stop at a NUL and take "a" for "a\0b": check it here.
        chelo = _printable_name("HELO name", self.helo, lib.SMTPS_HELO_MAX).encode("ascii")
        chelo_c = ffi.new("char[]", chelo)      # lives until engine_new copied it
        cfg.helo = chelo_c
        self._handle = ffi.new_handle(self)
        ptr = lib.smtps_engine_new(self.machine._ptr, cfg, self._handle)
        if ptr == ffi.NULL:
            if (not chelo or b" " in chelo or len(chelo) > lib.SMTPS_HELO_MAX
                    or any(b < 0x21 or b == 0x7F for b in chelo)):
                raise InvalidOptionError(
                    f"HELO name {self.helo!r} must be 1-{lib.SMTPS_HELO_MAX} printable "
                    "ASCII bytes without spaces")
            raise OSError("cannot make the engine (epoll or memory not available)")
        try:
            if resolver is not None:
                resolver._apply(ptr)
            if limits:
                apply_limits(ptr, limits)
            self._sources = apply_sources(ptr, sources or ())
            check(lib.smtps_engine_set_tls_events(ptr, _TLS_EVENTS_MAX), "record TLS events")
        except BaseException:
            lib.smtps_engine_free(ptr)
            raise
        self.resolver = resolver
        self._ptr = ptr
        self._tls_event = ffi.new("struct smtps_tls_event *")
        self._tls_dropped = 0
        self._dnssec_told = False
        # MTA-STS discovery (sts_discovery.py): messages routed by MX wait
        # here, ticket given, until their domains' policies are known.
        # Made at the first message routed by MX (_sts_discovery()), so
        # that an Engine that never routes by MX has no threads for it.
        self._sts: Any = None
        self._sts_settings: Any = None if mta_sts is None or mta_sts is False else mta_sts
        self._held: List[Tuple[Ticket, Any, int, Any, Dict[str, Any], Set[str]]] = []
        log.debug("engine ready: %d connections (%d per destination), HELO %s",
                  max_connections, max_per_destination, self.helo)

    # -- submitting --------------------------------------------------------

    def submit(self, message: Message, host: Optional[str] = None, port: int = 25, *,
               source: Any = None, **options: Any) -> Ticket:
        """Queue ``message``; return its :class:`Ticket`.

        Args:
            message: the :class:`~smtpstate.Message`.
            host: None: each recipient goes where its domain's MX records
                say (one result all the same); else a name or an IPv4 or
                IPv6 address literal, every recipient going there (a smart
                host).
            port: the TCP port, an int from 1 to 65535: the host's, or that
                of every MX host.
            source: a :class:`~smtpstate.Source` given to the engine (or
                its address) to connect from; None: each in turn.
            **options: those of :class:`~smtpstate.options.Options`: ``tls``,
                ``auth``, ``ca_file``, ``timeout``, ``helo``,
                ``server_hostname``,
                ``dangerously_skip_certificate_verification``, and the TLS
                settings (``ca_path``, ``cert_file``, ``key_file``,
                ``key_password``, ``tls_min_version``, ``ciphers``,
                ``ciphersuites``), checked when a destination is first
                submitted to.

        Raises:
            TypeError: not a Message, or an unknown option.
            InvalidOptionError: a bad host, port or option value.
            InvalidMessageError: the message, refused by C's own checks
                (submitted while another thread drives the engine, a
                message only C refuses gets a permfail Result instead).
            LocalProtocolError: the engine is closed.

        Safe from any thread at any time, and from a state inside run():
        while another call holds the engine, the message waits in its
        inbox and the loop is woken to take it at once (docs/service.md).
        """
        if type(message) is not Message and not isinstance(message, Message):
            raise TypeError(f"submit() takes a smtpstate.Message, not {type(message).__name__}")
        if host is None and self._sts_settings is not None \
                and options.get("tls") in _STS_LEVELS:
            held = self._sts_hold(message, port, source, options)
            if held is not None:
                return held
        # The destination of the last call again (the usual case: the same
        # host and port objects, equal options) costs three comparisons; it
        # was validated when it was made. Otherwise the cache, which only
        # takes exact str hosts and int ports (an equal float port must
        # not pass), then validation.
        last = self._last_dest
        if host is last[0] and port is last[1] and options == last[2] and source is None:
            entry = last[3]
        else:
            entry = self._destination(host, port, options, source)
            if type(port) is not int:
                port = int(port)                 # an int subclass, validated
        # The guard, inline (see _Guard): one call at a time, none after
        # close(). Taken: the message waits in the inbox for the thread
        # that drives C (another thread's run(), or this one's, when a
        # state submits from inside it).
        token = self._token
        try:
            taken = token.pop()
        except IndexError:
            return self._submit_later(message, host, port, entry)
        # entry holds the destination's strings too: it lives until the
        # C call below has copied them (an uncached one is nowhere else).
        dest = entry[0]
        try:
            ptr = self._ptr
            if ptr is None:
                raise LocalProtocolError("this Engine is closed")
            envelope = message._c_envelope
            body = message._body
            plain = message._plain
            if envelope is None and (body is not None or plain is None):
                envelope = message._envelope()
            tag = next(self._tags)
            # One C call: a copy of the message's prepared envelope, with
            # the body, queued; nothing for Python to own or detach. A body
            # that is not bytes is the envelope's own, shared (NULL, 0).
            # A plain message (Message's fast path) with no envelope yet
            # goes to C whole instead: making an envelope to copy it once
            # cost four more C calls and Python around them, for every
            # message of a batch (benchmarks/README.md, deliver()). Once
            # only: a message submitted again (a newsletter to many
            # servers) makes its envelope then, and later submits share it.
            # Either way C refers to data (fixed bytes), never copies it:
            # the ticket keeps the message, and so its bytes, until C is
            # done.
            if envelope is None:
                sender, rcpts, count = plain
                message.__dict__["_plain"] = None
                data = message.data
                rc = _submit_plain(ptr, sender, len(sender), rcpts, len(rcpts), count,
                                   _from_buffer(data), len(data), dest, tag)
            elif body is None:
                rc = _submit_copy(ptr, envelope, ffi.NULL, 0, dest, tag)
            else:
                if host is None and body.one_shot:
                    _one_domain(message)
                body.claim()
                rc = _submit_copy(ptr, envelope, ffi.NULL, 0, dest, tag)
                if rc:
                    body.release()
            if rc:
                check(rc, "submit the message")
            # Ticket(tag, message, host, port), without the call to __init__.
            ticket = _new(self._ticket_type)
            ticket.id = tag
            ticket.message = message
            ticket.host = host
            ticket.port = port
            ticket.result = None
            self._tickets[tag] = ticket
        finally:
            token.append(taken)
        return ticket

    def _submit_later(self, message: Message, host: Optional[str], port: int,
                      entry: Any) -> Ticket:
        """submit() while another call holds the token: the ticket now,
        the message in the inbox, and the loop woken so that whoever
        drives C hands it over at once (_drain_inbox())."""
        if self._ptr is None:
            raise LocalProtocolError("this Engine is closed")
        # What can be refused without C is refused here, in the caller.
        if message._c_envelope is None:
            message._envelope()
        if host is None and message._body is not None and message._body.one_shot:
            _one_domain(message)
        ticket = self._ticket_type(next(self._tags), message, host, port)
        self._tickets[ticket.id] = ticket
        self._inbox.append((ticket, entry))
        self._wake()
        return ticket

    def _wake(self) -> None:
        """End C's wait now (any thread): smtps_engine_wake(), under the
        lock close() takes before the engine is freed."""
        with self._wake_lock:
            ptr = self._ptr
            if ptr is not None:
                lib.smtps_engine_wake(ptr)

    def _submit_c(self, ptr: Any, message: Message, host: Optional[str], dest: Any,
                  tag: int) -> None:
        """The C call of submit() (call with the token)."""
        envelope = message._c_envelope
        if envelope is None:
            envelope = message._envelope()
        body = message._body
        if body is None:                       # data, shared: see submit()
            rc = _submit_copy(ptr, envelope, ffi.NULL, 0, dest, tag)
        else:
            body.claim()
            rc = _submit_copy(ptr, envelope, ffi.NULL, 0, dest, tag)
            if rc:
                body.release()
        if rc:
            check(rc, "submit the message")

    def _drain_inbox(self) -> None:
        """Hand C the messages other threads (or states) submitted while
        the token was taken; call with the token. One C refuses gets its
        one result, as a held message does (_sts_release())."""
        inbox, ptr = self._inbox, self._ptr
        while inbox:
            ticket, entry = inbox.popleft()
            message = ticket.message
            try:
                self._submit_c(ptr, message, ticket.host, entry[0], ticket.id)
            except Exception as e:
                log.error("a message submitted from another thread could not be queued: %s", e)
                self._tickets.pop(ticket.id, None)
                result = unsent_result(message, ticket, "permfail",
                                       not_attempted(f"cannot submit it: {e}"))
                ticket.result = result
                self._ready.append(result)

    def _sts_hold(self, message: Message, port: int, source: Any,
                  options: Dict[str, Any]) -> Optional[Ticket]:
        """A ticket for a message routed by MX whose recipient domains'
        MTA-STS policies are still being looked for: it waits, and goes
        when they are known (_sts_release()); None: it may go now."""
        sts = self._sts if self._sts is not None else self._sts_discovery()
        waiting = sts.waiting(message.recipients)
        if not waiting:
            return None
        if self._ptr is None:
            raise LocalProtocolError("this Engine is closed")
        # Checked now as submit() would, so that a bad option or message is
        # an error here, not when the message leaves the queue.
        self._destination(None, port, options, source)
        if message._c_envelope is None:
            message._envelope()
        if message._body is not None and message._body.one_shot:
            _one_domain(message)
        ticket = self._ticket_type(0, message, None, port)
        self._held.append((ticket, message, port, source, options, waiting))
        return ticket

    def _sts_discovery(self) -> Any:
        """The MTA-STS discovery, made now (the first message by MX)."""
        from smtpstate.sts_discovery import Discovery, MtaSts

        settings = self._sts_settings if isinstance(self._sts_settings, MtaSts) else MtaSts()
        self._sts = Discovery(settings, self.resolver if self.resolver is not None
                              else Resolver())
        return self._sts

    def _sts_release(self) -> None:
        """Policies found since the last call go to C; the messages that
        waited only for them are submitted, each under the ticket it was
        given (its id is C's tag from now on)."""
        for domain, result_type, detail in self._sts.failures():
            self._sts_fetch_failed(domain, result_type, detail)
        done = self._sts.finished()
        if not done:
            return
        decided = set()
        for domain, policy in done:
            decided.add(domain)
            if policy is not None:
                try:
                    self.set_mta_sts_policy(domain, policy)
                except InvalidOptionError as e:
                    log.warning("MTA-STS policy of %s not used: %s", domain, e)
        still = []
        for entry in self._held:
            entry[5].difference_update(decided)
            if entry[5]:
                still.append(entry)
                continue
            ticket, message, port, source, options, _ = entry
            try:
                real = self.submit(message, None, port, source=source, **options)
            except (InvalidMessageError, InvalidOptionError, OSError) as e:
                # Checked when held, so this should not happen; if it does,
                # the message still gets its one result.
                log.error("a message held for MTA-STS could not be submitted: %s", e)
                result = unsent_result(message, ticket, "tempfail",
                                       not_attempted(f"cannot submit it: {e}"))
                ticket.result = result
                self._ready.append(result)
                continue
            del self._tickets[real.id]
            ticket.id = real.id
            self._tickets[real.id] = ticket
        self._held = still

    def submit_message(self, msg: Any, host: Optional[str] = None, port: int = 25, *,
                       sender: Optional[str] = None,
                       recipients: Optional[Sequence[str]] = None,
                       dsn_ret: Optional[str] = None, envid: Optional[str] = None,
                       require_tls: bool = False, **options: Any) -> Ticket:
        """Queue a standard-library ``email.message.EmailMessage``, its
        envelope taken from its headers as ``smtplib.send_message`` does
        (:meth:`Message.from_email`); the rest as for :meth:`submit`.
        The ticket's ``message`` is the :class:`~smtpstate.Message` made.
        """
        message = Message.from_email(msg, sender, recipients, dsn_ret=dsn_ret, envid=envid,
                                     require_tls=require_tls)
        return self.submit(message, host, port, **options)

    def _destination(self, host: Optional[str], port: int, options: Dict[str, Any],
                     source: Any = None) -> Tuple[Any, list]:
        """A ``struct smtps_destination`` for these settings and the cdata
        its pointers point to, which must be held as long as it is used:
        cached, and remembered for submit()'s shortcut. A hit was validated
        when it was cached: the host is checked on a miss only (that check
        walks the name, once per submit it was the costliest part of
        submitting)."""
        check_port(port)
        pin = 0
        if source is not None:
            try:
                pin = self._sources[source]
            except (KeyError, TypeError):
                raise InvalidOptionError(f"source {source!r} is not one of the engine's "
                                         "sources (Engine(sources=[...]))") from None
        # The key submit() looks up (options in the caller's order: another
        # order is another entry, as valid). Only exact types are cached:
        # an equal float port or str subclass host must not hit later.
        key: Any = None
        if (type(host) is str or host is None) and type(port) is int and not pin:
            key = (host, port, *options.items()) if options else (host, port)
            try:
                hit = self._dests.get(key)
            except TypeError:                    # an unhashable option value
                key, hit = None, None
            if hit is not None:
                self._last_dest = (host, port, options, hit)
                return hit
        if host is not None:
            check_host(host)
        opts = Options.make(**{**self._defaults, **options})
        keep: list = []
        try:
            dest = opts.destination(host, port, keep)
        except UnicodeError:
            raise InvalidOptionError(f"host {host!r} is not a valid host name") from None
        dest.source = pin
        entry = (dest, keep)
        if key is not None:
            if len(self._dests) >= _DEST_CACHE_MAX:
                self._dests.clear()
            self._dests[key] = entry
            self._last_dest = (host, port, options, entry)
        return entry

    # -- running -------------------------------------------------------------

    def run(self, timeout: Optional[float] = None, *, forever: bool = False) -> Iterator[Result]:
        """Yield each :class:`Result` as it completes, until every message
        submitted (before or during the iteration) has its result.

        Args:
            timeout: seconds for the whole iteration; None: no limit.
            forever: keep running when nothing is pending, as a service
                does: idle connections are closed (QUIT) at
                ``idle_timeout``, messages submitted from other threads
                start at once, results are yielded as they complete. The
                iteration ends only after :meth:`stop` or :meth:`close`
                (from any thread), or after ``timeout`` (then without
                TimeoutError).

        Raises:
            TimeoutError: results are still pending after ``timeout`` (not
                with ``forever``); the deliveries go on with the next call.
            LocalProtocolError: the engine is closed, or another thread is
                running it (one run() or step() at a time).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        ready, tickets, turn = self._ready, self._tickets, self._make_turn()
        told = self._tls_told
        self._driver = threading.get_ident()      # for close() from a state
        try:
            while True:
                if told:
                    self._tell_tls_events()
                while ready:
                    yield ready.popleft()
                if self._stopping:
                    self._stopping = False         # this run answers it
                    return
                if forever and self._ptr is None:
                    return
                wait = _RUN_SLICE_MS
                if self._held:
                    # Messages waiting for MTA-STS policies: those found go now,
                    # and the loop comes back soon for the others.
                    self._sts_release()
                    wait = _STS_POLL_MS
                if not tickets and not self._inbox and not forever:
                    if not self._held:
                        return
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError(f"{len(self._held)} message(s) still waiting for "
                                           f"MTA-STS policies after {timeout} s")
                    time.sleep(_STS_POLL_MS / 1000)
                    continue
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        if forever:
                            return
                        raise TimeoutError(
                            f"{len(tickets)} message(s) still pending after {timeout} s")
                    wait = min(wait, max(1, int(left * 1000)))
                try:
                    turn(wait, forever)
                except LocalProtocolError:
                    if forever and self._ptr is None:
                        return                     # closed by another thread
                    raise
        finally:
            self._driver = None

    def serve(self, timeout: Optional[float] = None) -> Iterator[Result]:
        """``run(timeout, forever=True)``: the engine as a service."""
        return self.run(timeout, forever=True)

    def stop(self) -> None:
        """End :meth:`run` with ``forever`` (or a plain run()) at its next
        turn, from any thread or from a state: the loop is woken now. The
        engine stays open; results not handed out yet wait for the next
        run() or step(). Called while no run() is going, it ends the next
        one at once (as a set ``threading.Event`` would)."""
        self._stopping = True
        self._wake()

    def step(self) -> List[Result]:
        """Process what is ready without blocking, and return the results
        that completed (possibly none): for an event loop that watches
        :meth:`fileno` and calls this when it is readable or when
        :meth:`next_deadline` has passed (``smtpstate.aio.Engine`` does).
        Timers (connect and reply timeouts, idle connections, rates, DNS
        deadlines) are run when due; messages held for MTA-STS policies
        are released when theirs are known.

        Raises:
            LocalProtocolError: the engine is closed, or another call is
                running (another thread's run() or step()).
        """
        ready, turn = self._ready, self._step_turn
        if turn is None:
            if self._ptr is None:
                raise LocalProtocolError("this Engine is closed")
            # Kept for the next steps; it refers to self, a cycle that
            # close() breaks.
            turn = self._step_turn = self._make_turn()
        if self._held:
            self._sts_release()
        # At most SMTPS_COLLECT_MAX results per C call: again while full.
        self._driver = threading.get_ident()
        try:
            while turn(0, True) >= _COLLECT_MAX:
                pass
        finally:
            self._driver = None
        if self._tls_told:
            self._tell_tls_events()
        out = list(ready)
        ready.clear()
        return out

    def fileno(self) -> int:
        """The engine's epoll descriptor: readable when a connection, the
        resolver or a wake-up (submit() from another thread, stop()) has
        something for :meth:`step`. It stays the same until close()."""
        ptr = self._ptr
        if ptr is None:
            raise LocalProtocolError("this Engine is closed")
        return int(lib.smtps_engine_fileno(ptr))

    def next_deadline(self) -> Optional[float]:
        """Seconds until :meth:`step` must be called although
        :meth:`fileno` is not readable (the engine's next timer; 0: now),
        or None when no timer is armed. While messages wait for MTA-STS
        policies (found off the loop), at most 0.02 s.

        Raises:
            LocalProtocolError: closed, or another thread is inside run().
        """
        if self._ready or self._inbox:
            return 0.0
        # The guard, inline (see _Guard): called after every step.
        token = self._token
        try:
            taken = token.pop()
        except IndexError:
            raise LocalProtocolError(_BUSY) from None
        try:
            ptr = self._ptr
            if ptr is None:
                raise LocalProtocolError("this Engine is closed")
            ms = lib.smtps_engine_next_deadline(ptr)
        finally:
            token.append(taken)
        when = None if ms < 0 else ms / 1000.0
        if self._held:
            when = _STS_POLL_MS / 1000 if when is None else min(when, _STS_POLL_MS / 1000)
        return when

    def cancel(self, ticket: Ticket) -> str:
        """Withdraw a submitted message as far as SMTP allows; it still
        gets exactly one Result. Returns what happened:

        - ``"cancelled"``: it was still queued (or held, or in the inbox);
          its result, tempfail "not attempted: cancelled by the caller", is
          handed out by the next run() or step();
        - ``"pending"``: it is in a session and none of its data went
          out: it fails at the server's next reply, RSET clears it, the
          connection's other messages are not touched;
        - ``"too late"``: its data is being sent or its final dot is out:
          its result comes as it will (a delivery, possibly);
        - ``"not found"``: it has its result already, or it still waits
          for DNS (routing by MX): it goes on.

        Raises:
            LocalProtocolError: closed, or another call is running.
        """
        if ticket.result is not None:
            return "not found"
        for i, entry in enumerate(self._held):
            if entry[0] is ticket:
                del self._held[i]
                self._settle_cancelled(ticket)
                return "cancelled"
        with self._guard():
            for entry in list(self._inbox):
                if entry[0] is ticket:
                    self._inbox.remove(entry)
                    self._tickets.pop(ticket.id, None)
                    self._settle_cancelled(ticket)
                    return "cancelled"
            if ticket.id not in self._tickets:
                return "not found"
            rc = int(lib.smtps_engine_cancel(self._ptr, ticket.id))
        if rc not in _CANCEL_OUTCOMES:
            check(rc, "cancel the message")
        return _CANCEL_OUTCOMES[rc]

    def _settle_cancelled(self, ticket: Ticket) -> None:
        """A message C never had, withdrawn: its one result, now."""
        result = unsent_result(ticket.message, ticket, "tempfail",
                               not_attempted("cancelled by the caller"))
        ticket.result = result
        self._ready.append(result)

    def _make_turn(self) -> Callable[[int, bool], int]:
        """The function that runs one turn: one C call under the guard
        (run the loop up to ``wait`` ms, serving when nothing is pending if
        ``serve``; then describe the results ready; csrc/batch.c), then
        Results made from the descriptions (_Collector) into self._ready.
        Returns how many results C described.

        A closure, made once: at tens of thousands of results a second,
        what each turn sets up costs as much as the C work behind it, and
        the closure's cells are read as fast as a generator's locals.
        """
        ready, tickets, errors_of, conn_errors = (self._ready, self._tickets, self._errors,
                                                  self._conn_errors)
        coll, token, inbox = self._collector, self._token, self._inbox
        shapes, replies, new_shape, new_reply = (coll.shapes, coll.slot_replies,
                                                 coll.new_shape, coll.new_reply)
        run_collect, serve_collect = lib.smtps_engine_run_collect, lib.smtps_engine_serve_collect
        cptr, out, views = coll.ptr, coll.out, coll.views
        slots, new, fast = _SLOTS, object.__new__, _FAST_RESULTS
        # Logger.isEnabledFor(), inline: the logger's own answer cache
        # (logging clears it in place whenever levels change), else the call.
        tlog, tlog_cache = transcript_log, _level_cache(transcript_log)
        rlog, rlog_cache = result_log, _level_cache(result_log)
        DEBUG, INFO = logging.DEBUG, logging.INFO
        next_tls_event, tls_event = lib.smtps_engine_next_tls_event, self._tls_event
        get_ident = threading.get_ident
        def turn(wait: int, serve: bool) -> int:
            # The guard, inline (see _Guard); held by a short call of
            # another thread (a submit() in C), it is waited for.
            try:
                taken = token.pop()
            except IndexError:
                taken = self._wait_token()
            self._turning = get_ident()
            try:
                ptr = self._ptr
                if ptr is None:
                    raise LocalProtocolError("this Engine is closed")
                if inbox:
                    self._drain_inbox()
                want = tlog_cache.get(DEBUG)
                if want is None or tlog.disabled:
                    want = tlog.isEnabledFor(DEBUG)       # what Tracer.wanted() says
                if want != self._tracing:
                    self._sync_trace()
                if self._backlog:
                    # What an exception cut short last time, first: C's
                    # collector is as it left it until its next call.
                    vals, self._backlog = self._backlog, []
                    n = len(vals)
                else:
                    if ready and wait:
                        wait = 0                          # results to hand out now
                    n = (serve_collect if serve else run_collect)(ptr, wait, cptr, out,
                                                                  _COLLECT_MAX)
                    if next_tls_event(ptr, tls_event):
                        self._take_tls_events()
                    if not self._dnssec_told:
                        self._tell_dnssec()
                    if n <= 0:
                        if n == _EINTR or interrupt_pending():
                            # Ctrl-C (or sys.exit()) in a state: its connection
                            # is closed and its messages have their results,
                            # which the next call hands out.
                            raise_interrupt()
                        elif n < 0:
                            check(n, "run the engine")
                        return 0
                    vals = views[n].tolist()

                log_failed = rlog_cache.get(INFO)
                if log_failed is None or rlog.disabled:
                    log_failed = rlog.isEnabledFor(INFO)
                log_ok = log_failed and rlog.isEnabledFor(DEBUG)
                # Python states' exceptions, to attach: recorded while C ran.
                errors = errors_of or conn_errors
                before, ticket = len(ready), None
                try:
                    for tag, shape, rslot in vals:
                        # A known slot whose prototype an exception kept us
                        # from making is read now (C keeps it until its
                        # next call).
                        proto = shapes[shape] if shape < slots else new_shape(shape - slots)
                        if proto is None:
                            proto = new_shape(shape)
                        reply = replies[rslot] if rslot < slots else new_reply(rslot - slots)
                        if reply is None and 0 < rslot < slots:
                            reply = new_reply(rslot)
                        fields, _, by_address, bounce, post, extra, delivered = proto
                        ticket = tickets.pop(tag, None)
                        if ticket is not None:
                            message = ticket.message
                            addresses = message.recipients
                            if message._body is not None:
                                # A stream none of which was read may go again.
                                message._body.release()
                        else:
                            message, addresses = None, ()
                        recipients = by_address.get(addresses)
                        if recipients is None:
                            recipients = coll.recipients(proto, addresses)
                        if fast:
                            result = new(Result)
                            d = result.__dict__
                            d.update(fields)
                            d["reply"] = reply
                            d["recipients"] = recipients
                            d["ticket"] = ticket
                            d["message"] = message
                            if errors:
                                d["error"] = self._error_of(tag, fields["reason"])
                            if extra:
                                if bounce:
                                    d["bounce_class"] = _of(bounce)
                                if post:
                                    _post_init(result)
                        else:
                            result = Result(**dict(
                                fields, reply=reply, recipients=recipients, ticket=ticket,
                                message=message, bounce_class=_of(bounce),
                                error=self._error_of(tag, fields["reason"]) if errors else None))
                        if ticket is not None:
                            ticket.result = result
                        ready.append(result)
                        if log_ok if delivered else log_failed:
                            log_result(result, f"{ticket.host}:{ticket.port} "
                                       if ticket is not None else "")
                except BaseException:
                    # (Ctrl-C) The results not in ready yet wait in the
                    # backlog; a ticket taken for one of them goes back,
                    # so that none is lost or handed out twice. (Nothing
                    # takes from ready meanwhile: the loop never yields.)
                    done = len(ready) - before
                    if done < len(vals):
                        self._backlog = vals[done:]
                        if (ticket is not None and ticket.id == vals[done][0]
                                and ticket.id not in tickets):
                            ticket.result = None
                            tickets[ticket.id] = ticket
                    raise
                # Ctrl-C in a free(), stage() or transcript C could not
                # stop for: the caller of this run hears it, now.
                raise_interrupt()
                return n
            finally:
                self._turning = None
                token.append(taken)

        return turn

    def _wait_token(self) -> bool:
        """The token for a turn, when another call holds it: a turn (this
        thread's own, a state re-entering, or another thread's run()) is
        refused at once; any other call (submit(), cancel(), a property,
        from another thread) is short and is waited for, up to a second,
        so that a service's run() never fails because a producer thread
        was inside submit() just then."""
        token, deadline = self._token, time.monotonic() + 1.0
        while True:
            if self._turning is not None:
                raise LocalProtocolError(_BUSY)
            time.sleep(0)                       # the holder finishes its call
            try:
                return token.pop()
            except IndexError:
                if time.monotonic() >= deadline:
                    raise LocalProtocolError(_BUSY) from None

    # -- TLS events and reports (RFC 8460) -------------------------------------

    def _take_tls_events(self) -> None:
        """Count the TLS events C recorded (the first is in self._tls_event
        already) and keep them for on_tls_event; call with the guard."""
        from smtpstate.tlsrpt import TlsEvent

        ptr, ev, now = self._ptr, self._tls_event, time.time()
        text = ffi.string
        while True:
            base = dict(
                result_type=text(ev.result).decode("ascii", "replace"),
                mx_host=text(ev.mx_host).decode("ascii", "replace"),
                receiving_ip=text(ev.mx_ip).decode("ascii", "replace"),
                sending_ip=text(ev.source_ip).decode("ascii", "replace"),
                level=text(ev.level).decode("ascii", "replace"),
                detail=text(ev.detail).decode("utf-8", "replace"),
                tls_version=text(ev.version).decode("ascii", "replace"),
                verified=bool(ev.verified), resumed=bool(ev.resumed))
            c_policy = text(ev.policy).decode("ascii")
            tlsa = tuple(text(ev.tlsa).decode("ascii", "replace").splitlines())
            for domain in text(ev.domains).decode("ascii", "replace").splitlines():
                if c_policy == "tlsa":
                    kind, strings, patterns = "tlsa", tlsa, ()
                else:
                    kind, strings, patterns = self._sts_policy_of(domain)
                self._tls_event_seen(TlsEvent(time=now, domain=domain, policy_type=kind,
                                              policy_string=strings, mx_patterns=patterns,
                                              **base))
            if not lib.smtps_engine_next_tls_event(ptr, ev):
                break
        dropped = int(lib.smtps_engine_tls_events_dropped(ptr))
        if dropped > self._tls_dropped:
            log.warning("%d TLS event(s) were dropped: run() did not take them in time",
                        dropped - self._tls_dropped)
            self._tls_dropped = dropped

    def _tell_dnssec(self) -> None:
        """Once the resolver has started: a warning if it had to drop the
        root's anchors (call with the guard)."""
        state = lib.smtps_engine_dnssec(self._ptr)
        if state == lib.SMTPS_DNSSEC_UNKNOWN:
            return
        self._dnssec_told = True
        if state == lib.SMTPS_DNSSEC_STRIPPED:
            log.warning("the name servers strip DNSSEC (their answer for the root's keys "
                        "fails validation): nothing is validated, DANE does not apply; "
                        "use a validating resolver, or Resolver(trust_anchors=()) to say so")

    def _sts_policy_of(self, domain: str) -> Tuple[str, Tuple[str, ...], Tuple[str, ...]]:
        """A domain's MTA-STS policy as a report describes it (RFC 8460
        4.4: its lines, its mx patterns), or no policy: one in mode
        "none" is a withdrawn policy."""
        policy = self._sts_policies.get(domain.lower().rstrip("."))
        if policy is None or policy.mode == "none":
            return "no-policy-found", (), ()
        lines = ("version: STSv1", f"mode: {policy.mode}",
                 *(f"mx: {p}" for p in policy.mx), f"max_age: {policy.max_age}")
        return "sts", lines, tuple(policy.mx)

    def _tls_event_seen(self, event: Any) -> None:
        self._tls_reports.add(event)
        if self._on_tls_event is not None:
            self._tls_told.append(event)

    def _tell_tls_events(self) -> None:
        """on_tls_event, for each event not told yet (outside the guard)."""
        told, callback = self._tls_told, self._on_tls_event
        while told:
            event = told.popleft()
            try:
                callback(event)
            except Exception:
                log.exception("on_tls_event raised for %s (%s): ignored",
                              event.domain, event.result_type)

    def _sts_fetch_failed(self, domain: str, result_type: str, detail: str) -> None:
        """A policy fetch failed (MTA-STS discovery): an event of its own."""
        from smtpstate.tlsrpt import TlsEvent

        kind, strings, patterns = self._sts_policy_of(domain)
        self._tls_event_seen(TlsEvent(time=time.time(), domain=domain, policy_type="sts",
                                      policy_string=strings, mx_patterns=patterns,
                                      result_type=result_type, level="mta-sts",
                                      detail=detail))

    def tls_report(self, domain: str, start: Any, end: Any, *,
                   organization_name: Optional[str] = None,
                   contact_info: Optional[str] = None,
                   report_id: Optional[str] = None) -> Dict[str, Any]:
        """The TLS report (RFC 8460 4.4) of a recipient domain for the
        time from start up to end (aware datetimes or seconds since the
        epoch): a dict with the RFC's JSON structure, the sessions counted
        by policy, with the failures' details. Sending it (to the
        addresses of the domain's ``_smtp._tls`` TXT record) is the
        caller's choice. See :mod:`smtpstate.tlsrpt` for what counts.

        Args:
            organization_name: default: the engine's HELO name.
            contact_info: default: ``postmaster@`` the HELO name.
            report_id: default: made of the range, domain and organization.
        """
        self._drain_tls_events()
        return self._tls_reports.report(
            domain, start, end,
            organization_name=organization_name if organization_name is not None else self.helo,
            contact_info=contact_info if contact_info is not None else f"postmaster@{self.helo}",
            report_id=report_id)

    def tls_report_domains(self, start: Any, end: Any) -> List[str]:
        """The recipient domains with TLS events from start up to end."""
        self._drain_tls_events()
        return self._tls_reports.domains(start, end)

    def _drain_tls_events(self) -> None:
        """The events C holds, counted now (not between run() calls)."""
        if self._ptr is None:
            return
        with self._guard():
            if lib.smtps_engine_next_tls_event(self._ptr, self._tls_event):
                self._take_tls_events()

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

    def _error_of(self, tag: int, reason: str) -> Optional[str]:
        """The text of what Python states raised for message ``tag``."""
        errors = self._errors.pop(tag, None) if self._errors else None
        if self._conn_errors:
            errors = (errors or []) + [t for t in self._conn_errors if t in reason]
        return ("; ".join(errors) or None) if errors else None

    # -- Python states -------------------------------------------------------

    def _session_view(self, csession: Any, entering: Optional[State]) -> Session:
        """The view of C session ``csession`` that states see (made once;
        the trampolines then find it in ``smtpstate.session._SESSIONS``).
        ``entering``: a state entered for the first time on this
        connection, whose free() the view now awaits."""
        view = self._views.get(csession)      # cdata: hashed by address
        if view is None:
            view = _ConnectionView._wrap(csession, self.machine, self._messages)
            view.engine = self
            view.entered = set()
            self._views[csession] = view
            _bind(csession, view)
        if entering is not None:
            view.entered.add(id(entering))
        return view

    def _session_left(self, csession: Any, state: State) -> None:
        """State ``state`` was freed with its C session; the view goes with
        the last one, before C can reuse the address for a new session."""
        view = self._views.get(csession)
        if view is None:
            return
        view.entered.discard(id(state))
        if not view.entered:
            del self._views[csession]
            _unbind(csession, view)
            view._end()                        # a state that kept it gets an error

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
        """Connections open or being opened now; 0 once closed.

        Raises:
            LocalProtocolError: another call is running (in another thread,
                or this is one of the engine's states inside :meth:`run`):
                C's count is not ours to read until it returns.
        """
        with self._guard(closing=True):           # closed: 0, not an error
            ptr = self._ptr
            return int(lib.smtps_engine_connections(ptr)) if ptr is not None else 0

    def set_mta_sts_policy(self, domain: str, policy: Any) -> None:
        """Enforce a recipient domain's MTA-STS policy (RFC 8461) from now
        on, for messages routed by MX: with ``mode="enforce"`` only the MX
        hosts matching one of ``policy.mx`` are used, each with TLS
        verified against its name (or authenticated by DANE, which wins);
        when none matches, the domain's recipients fail for now.
        "testing" and "none" change nothing. A later call replaces the
        domain's policy.

        ``Engine(mta_sts=MtaSts(...))`` finds and gives them by itself;
        without it, fetch them with :mod:`smtpstate.mta_sts`
        (``fetch_policy``, ``parse_policy``, ``PolicyCache``) and give them
        here before the domain's messages.

        Args:
            domain: the recipient domain.
            policy: a :class:`smtpstate.mta_sts.Policy`.

        Raises:
            InvalidOptionError: not a Policy, or a domain or pattern the
                engine cannot use.
            LocalProtocolError: the engine is closed or busy elsewhere.
        """
        from smtpstate.mta_sts import Policy

        if not isinstance(policy, Policy):
            raise InvalidOptionError(
                f"policy must be a smtpstate.mta_sts.Policy, not {type(policy).__name__}")
        if not isinstance(domain, str):
            raise InvalidOptionError(f"domain must be a str, not {type(domain).__name__}")
        mode = {"none": lib.SMTPS_STS_NONE, "testing": lib.SMTPS_STS_TESTING,
                "enforce": lib.SMTPS_STS_ENFORCE}[policy.mode]
        try:
            name = domain.encode("idna")
            patterns = [ffi.new("char[]", p.encode("idna")) for p in policy.mx]
        except UnicodeError:
            raise InvalidOptionError(f"domain {domain!r} or a pattern of its policy is "
                                     "not a valid name") from None
        array = ffi.new("const char *[]", patterns) if patterns else ffi.NULL
        with self._guard():
            rc = lib.smtps_engine_set_sts_policy(self._ptr, name, mode, array, len(patterns))
        if rc == lib.SMTPS_EINVAL:
            raise InvalidOptionError(f"the engine cannot use the MTA-STS policy of "
                                     f"{domain!r}: a name or pattern is not valid")
        check(rc, "set the MTA-STS policy")
        self._sts_policies[domain.lower().rstrip(".")] = policy

    @property
    def dnssec(self) -> str:
        """What the engine's resolver validates: "unknown" (it starts at
        the first lookup), "on", "off" (``Resolver(trust_anchors=())``), or
        "stripped": under the root's anchors, the name servers' answer for
        the root's keys failed validation (they strip DNSSEC), so nothing is
        validated and DANE never applies."""
        ptr = self._ptr
        state = lib.smtps_engine_dnssec(ptr) if ptr is not None else lib.SMTPS_DNSSEC_UNKNOWN
        return _DNSSEC_STATES[state]

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def close(self) -> None:
        """Close every connection (QUIT where it costs nothing) and free the
        engine. Messages without a result by now never get one (they are
        logged as dropped): call :meth:`run` to the end first, or leave a
        ``with`` block without an exception, which does.

        From any thread: while another thread is inside :meth:`run` (a
        service's ``run(forever=True)``), that run is stopped and woken,
        and this call waits (up to 30 s) for it to leave C, then closes.

        Raises:
            LocalProtocolError: called from a state running inside run()
                (use :meth:`stop`), or another call kept the engine for
                30 s.
        """
        if self._ptr is None:
            return
        if not self._token and self._driver is not None:
            if self._driver == threading.get_ident():
                # A state inside run(): the engine would be freed under
                # its own loop, and the message in hand lost.
                raise LocalProtocolError(_BUSY)
            self.stop()
            deadline = time.monotonic() + 30.0
            while True:
                try:
                    with self._guard(closing=True):
                        self._close()
                    break
                except LocalProtocolError:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.002)
            raise_interrupt()
            return
        with self._guard(closing=True):
            self._close()
        raise_interrupt()                       # Ctrl-C in a state's free()

    def _close(self) -> None:
        """close(), with the token."""
        if self._ptr is None:
            return
        if self._tickets:
            self._log_dropped()
        if self._held:
            log.warning("%d message(s) dropped while waiting for MTA-STS policies",
                        len(self._held))
            self._held = []
        if self._sts is not None:
            self._sts.close()
        if lib.smtps_engine_next_tls_event(self._ptr, self._tls_event):
            self._take_tls_events()         # counted for tls_report()
        self._inbox.clear()                    # their tickets were logged above
        # Under the lock: a wake-up from another thread never reaches
        # a freed engine.
        with self._wake_lock:
            ptr, self._ptr = self._ptr, None
        self._step_turn = None              # the cycle step() made
        lib.smtps_engine_free(ptr)
        self._collector.close()
        for csession, view in self._views.items():
            _unbind(csession, view)
            view._end()
        self._views.clear()

    def _log_dropped(self, shown: int = 10) -> None:
        """One warning naming the tickets close() leaves without a result
        (the first ``shown`` of them)."""
        tickets = list(self._tickets.values())
        listed = ", ".join(repr(t) for t in tickets[:shown])
        more = f" and {len(tickets) - shown} more" if len(tickets) > shown else ""
        log.warning("engine closed with %d message(s) still without a result: %s%s",
                    len(tickets), listed, more)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Leave the ``with`` block: deliver what is pending, then close.

        Without an exception, :meth:`run` goes on until every message
        submitted has its result (on its :class:`Ticket`), as a
        ``concurrent.futures`` executor waits for its work on exit. With an
        exception on its way out, the engine closes at once instead and
        logs the messages dropped without a result. An engine closed in
        the block is left as it is.

        An interrupt (Ctrl-C) while it delivers closes it at once, as an
        exception in the block does, and propagates.

        Raises:
            LocalProtocolError: the engine is busy in another call (another
                thread): it is then neither run nor closed.
        """
        try:
            if exc_type is None and self._ptr is not None:
                for _ in self.run():
                    pass
        finally:
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
        try:
            connections = str(self.connections)
        except LocalProtocolError:               # busy elsewhere; a repr never raises
            connections = "?"
        return f"<Engine pending={self.pending} connections={connections}>"

    def _guard(self, closing: bool = False) -> "_Guard":
        return _Guard(self, closing)


class _Guard:
    """One call at a time, and none after close(): the engine's token is
    taken for the call (list.pop() is atomic under the GIL) and given back
    after it; a call that finds it taken raises instead of waiting."""

    __slots__ = ("engine", "closing", "taken")

    def __init__(self, engine: Engine, closing: bool) -> None:
        self.engine, self.closing = engine, closing

    def __enter__(self) -> None:
        try:
            self.taken = self.engine._token.pop()
        except IndexError:
            raise LocalProtocolError(_BUSY) from None
        if self.engine._ptr is None and not self.closing:
            self.engine._token.append(self.taken)
            raise LocalProtocolError("this Engine is closed")

    def __exit__(self, *exc: Any) -> None:
        self.engine._token.append(self.taken)


def deliver(messages: Iterable[Message], host: Optional[str] = None, port: int = 25, *,
            concurrency: int = 10, resolver: Optional[Resolver] = None,
            limits: Optional[Mapping[str, Limits]] = None,
            sources: Optional[Sequence[Source]] = None, **options: Any) -> List[Result]:
    """Deliver ``messages`` over up to ``concurrency`` connections per
    destination; return their results in the same order.

    For a batch whose results you want as a list: it takes the whole input
    first (``tuple(messages)``) and keeps every message and Result until it
    returns, so memory grows with the count. For a stream (a generator, a
    million messages), use :func:`deliver_iter`, which holds a bounded
    window.

    Args:
        messages: :class:`~smtpstate.Message` objects.
        host, port: the server; host None: where each recipient's domain's
            MX records say (port: of every MX host).
        concurrency: connections at once, per destination.
        resolver, limits, sources: as for :class:`Engine`.
        **options: as for :meth:`Engine.submit`.

    Raises:
        TypeError: an item is not a Message, or an unknown option.
        InvalidOptionError: a bad host, port or option.
    """
    batch = as_messages(messages)
    _check_count(concurrency, "concurrency")
    # Refused before the engine exists, even with no message to submit.
    if host is not None:
        check_host(host)
    check_port(port)
    Options.make(**options)
    # Routed, the messages may go to many sites: per site, concurrency.
    total = concurrency if host is not None else max(concurrency, 1000)
    with Engine(max_connections=total, max_per_destination=concurrency, resolver=resolver,
                limits=limits, sources=sources) as engine:
        tickets = [engine.submit(m, host, port, **options) for m in batch]
        for _ in engine.run():
            pass
    out: List[Result] = []
    for t in tickets:
        assert t.result is not None            # run() ends only when all are in
        out.append(t.result)
    return out


# deliver_iter()'s window per connection, by default: one message on the
# wire and three queued in C behind it, so that a connection that finishes
# one finds the next already there, while Python collects results and
# takes more from the input in batches (one turn hands out many results).
# Fewer starves connections between turns; more buys no speed and only
# holds more messages (benchmarks/README.md, "Streams").
_WINDOW_PER_CONNECTION = 4


def deliver_iter(messages: Iterable[Message], host: Optional[str] = None, port: int = 25, *,
                 window: Optional[int] = None, concurrency: int = 10,
                 resolver: Optional[Resolver] = None,
                 limits: Optional[Mapping[str, Limits]] = None,
                 sources: Optional[Sequence[Source]] = None,
                 **options: Any) -> Iterator[Result]:
    """Deliver ``messages`` as they come, yielding each :class:`Result` as
    it completes, in bounded memory: for streams (a generator of a million
    messages) where :func:`deliver` would hold them all.

    Messages are taken from ``messages`` lazily, only while fewer than
    ``window`` are submitted and not yet yielded; so at most ``window``
    messages are held (with their Results), and the input is never read
    more than ``window`` ahead of what the caller has been given. Results
    come in completion order; each carries its :class:`Ticket` and its
    message (``result.ticket``, ``result.message``) so the caller knows
    which it is. Nothing keeps a message or Result once it is yielded.

    One :class:`Engine`, driven by :meth:`Engine.run`: the next messages
    are submitted between the Results it yields. It is made on the first
    ``next()`` and closed when the iteration ends, with QUIT on every
    connection. Stopping early (``break``, or ``close()`` on the returned
    generator) withdraws the messages out (:meth:`Engine.cancel`), lets
    those already past their DATA finish (at most 5 s), and closes: every
    connection gets QUIT. Their Results are not handed out, and those that
    were past DATA may have been delivered. ``break`` closes the generator
    when it is collected, at once in CPython; call ``close()`` (or use
    ``contextlib.closing``) to be sure.

    When the input itself raises (or gives an item that is not a Message,
    or one :meth:`Engine.submit` refuses), nothing more is taken from it;
    the messages already taken are finished and their Results yielded,
    then the exception propagates: every message the input handed over
    gets its Result, so none is left in doubt.

    Args:
        messages: any iterable of :class:`~smtpstate.Message` (read once,
            lazily).
        host, port: the server; host None: where each recipient's domain's
            MX records say (port: of every MX host).
        window: messages submitted and not yet yielded, at most; default
            4 per connection (4 x ``concurrency`` to one host, 4 x 1000 by
            MX), which keeps every connection busy.
        concurrency: connections at once, per destination.
        resolver, limits, sources: as for :class:`Engine`.
        **options: as for :meth:`Engine.submit`.

    Returns:
        A generator of Results.

    Raises:
        TypeError: an unknown option (now), or an item that is not a
            Message (when it is reached; the messages taken before it are
            finished first, as for any exception from the input).
        InvalidOptionError: a bad host, port, window or option (now).
        Exception: whatever the input raised, after the Results of the
            messages it gave.
    """
    _check_count(concurrency, "concurrency")
    # Refused now, before the engine exists and before anything is read.
    if host is not None:
        check_host(host)
    check_port(port)
    Options.make(**options)
    # Routed, the messages may go to many sites: per site, concurrency.
    total = concurrency if host is not None else max(concurrency, 1000)
    if window is None:
        window = _WINDOW_PER_CONNECTION * total
    else:
        _check_count(window, "window")
    engine_args: Dict[str, Any] = dict(max_connections=total, max_per_destination=concurrency,
                                       resolver=resolver, limits=limits, sources=sources)
    return _stream(iter(messages), host, port, window, engine_args, options)


def _stream(source: Iterator[Message], host: Optional[str], port: int, window: int,
            engine_args: Dict[str, Any], options: Dict[str, Any]) -> Iterator[Result]:
    """deliver_iter()'s generator. The count of messages out (submitted,
    not yet yielded) is its own, not engine.pending: a message held for
    MTA-STS policies is not in the engine's count but is out all the same."""
    engine = Engine(**engine_args)
    engine._ticket_type = _StreamTicket
    out = 0
    ended = False                                # the input is exhausted or failed
    failure: Optional[BaseException] = None

    def take() -> None:
        """Submit from the input until ``window`` are out or it ends."""
        nonlocal out, ended, failure
        submit = engine.submit
        while out < window:
            try:
                message = next(source)
                if not isinstance(message, Message):
                    raise TypeError("deliver_iter() takes smtpstate.Message items, "
                                    f"not {type(message).__name__}")
                submit(message, host, port, **options)
            except StopIteration:
                ended = True
                return
            except Exception as e:
                # Nothing more is taken; the messages out are finished
                # first (their Results are owed), then e is raised.
                ended, failure = True, e
                return
            out += 1

    runner: Any = None                           # engine.run()'s generator
    try:
        take()
        # run() goes on while anything is out; each Result yielded makes
        # room for one more, taken before run()'s next turn, so the
        # connections do not wait for the input. The outer loop is for a
        # run() that ended just as a refill came too late for it.
        while out:
            runner = engine.run()
            for result in runner:
                out -= 1
                yield result
                # Nothing here keeps a Result once the caller has it.
                del result
                if not ended:
                    take()
            runner = None
            if not ended:
                take()
    except GeneratorExit:
        # The caller stopped early (break, close()): what is out is
        # withdrawn, so that the connections end with QUIT, not in the
        # middle of a transaction.
        if runner is not None:
            runner.close()
            runner = None
        _withdraw(engine)
        raise
    finally:
        # Normal end, or withdrawn: nothing is pending, and close() only
        # says QUIT. Otherwise (Ctrl-C, an error in the loop) close() drops
        # what is still out and logs it, QUIT where idle.
        if runner is not None:
            runner.close()
        engine.close()
    if failure is not None:
        raise failure


# How long deliver_iter(), stopped early, waits for the transactions already
# past the point of no return (data sent) to end, before it closes anyway.
_WITHDRAW_GRACE = 5.0


def _withdraw(engine: Engine) -> None:
    """Cancel every message the engine has not finished, then run it until
    their results are in (the cancelled at once; those whose data is out
    finish: cancel() is "too late" for them), at most _WITHDRAW_GRACE
    seconds, and drop the results: nobody asked for them. Connections are
    then idle, and close() ends each with QUIT."""
    if engine.closed:
        return
    tickets = list(engine._tickets.values()) + [entry[0] for entry in engine._held]
    try:
        for ticket in tickets:
            engine.cancel(ticket)
        for _ in engine.run(timeout=_WITHDRAW_GRACE):
            pass
    except TimeoutError:
        log.warning("deliver_iter() stopped early: %d message(s) still in transaction "
                    "after %.0f s, closed without their results", engine.pending,
                    _WITHDRAW_GRACE)
    except LocalProtocolError:
        pass                                      # closed or busy: close() decides
    del tickets
