"""The Python view of one C session, as Python states see it, and the
bodies of the trampolines through which C calls Python states.

Rule: a trampoline never lets an exception reach C. It records the
exception on the session (the driver attaches it to the message's
Result), tells C why with ``smtps_session_set_reason``, and returns a
failure C understands: ``SMTPS_EINVAL`` from setup, ``PERMFAIL_TX`` from a
callback.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Optional, Tuple, Union

from smtpstate import _ffi
from smtpstate._ffi import check, ffi, lib, py_trampolines
from smtpstate.errors import InvalidMessageError, LocalProtocolError
from smtpstate.machine import Action, Machine, State
from smtpstate.result import Reply, Result, result_from_c

__all__ = ["Session", "Capabilities"]

log = logging.getLogger("smtpstate.state")


_EXTENSIONS = _ffi.EXTENSIONS
# C value -> name, from C's one list of protocols.
_PROTOCOL_NAMES = {i: ffi.string(lib.smtps_protocol_name(i)).decode("ascii")
                   for i in range(lib.SMTPS_PROTO__COUNT)}
_AUTH = _ffi.AUTH_MECHANISMS
_XCLIENT = _ffi.XCLIENT_ATTRIBUTES


@dataclass(frozen=True)
class Capabilities:
    """What the server's EHLO (or, under LMTP, LHLO) offered."""

    extensions: FrozenSet[str]
    size_max: int
    auth: FrozenSet[str]
    xclient: FrozenSet[str]

    def __contains__(self, keyword: object) -> bool:
        return isinstance(keyword, str) and keyword.upper() in self.extensions

    @classmethod
    def _from_c(cls, c: Any) -> "Capabilities":
        return cls(
            frozenset(k for k, v in _EXTENSIONS.items() if c.ext & v),
            int(c.size_max),
            frozenset(k for k, v in _AUTH.items() if c.auth & v),
            frozenset(k for k, v in _XCLIENT.items() if c.xclient & v),
        )


class Session:
    """One SMTP connection, as the states running in it see it.

    Drivers (Client, Engine) create it; states receive it. It is only valid
    while the connection lives.

    A Client makes one per connection, owning the C session; the Engine's C
    loop owns its sessions and hands out non-owning views made with
    :meth:`_wrap`, one per connection.
    """

    def __init__(self, machine: Machine, helo: str, *,
                 peer: Tuple[str, int] = ("", 0),
                 local: Tuple[str, int] = ("", 0)) -> None:
        self.machine = machine
        self.opened_at = time.monotonic()
        # Where its results say recipients went: (host as named, address);
        # the driver sets it once connected (the engine's results carry
        # their own, made in C).
        self.route: Optional[Tuple[Optional[str], Optional[str]]] = None
        self.messages: Dict[int, Any] = {}
        self.errors: List[Tuple[Optional[int], BaseException, str]] = []
        self._data: Dict[int, Dict[str, Any]] = {}
        self._handle = ffi.new_handle(self)
        ptr = lib.smtps_session_new(machine._ptr, helo.encode("ascii"), self._handle)
        if ptr == ffi.NULL:
            raise InvalidMessageError(
                f"cannot start a session with HELO name {helo!r}: it must be "
                f"1-{lib.SMTPS_HELO_MAX} printable ASCII bytes without spaces")
        # Collected without close(): detach first, so that C never calls a
        # Python state with a handle that may already be gone.
        self._ptr = ffi.gc(ptr, _free_detached)
        self._closed = False
        _bind(ptr, self)
        if peer[0] or local[0]:
            self._set_addresses(peer, local)

    @classmethod
    def _wrap(cls, ptr: Any, machine: Machine, messages: Dict[int, Any]) -> "Session":
        """A view of a C session owned by someone else (the Engine's loop):
        it never frees the session, and ``close()`` does nothing."""
        self = cls.__new__(cls)
        self.machine = machine
        self.opened_at = time.monotonic()
        self.messages = messages
        self.errors = []
        self._data = {}
        self._handle = None
        self._ptr = ptr
        self._closed = True
        return self

    # -- what states use ------------------------------------------------

    def _set_addresses(self, peer: Tuple[str, int], local: Tuple[str, int]) -> None:
        """Drivers: record both ends of the connection (before it starts)."""
        check(lib.smtps_session_set_addresses(
            self._ptr, str(peer[0]).encode("ascii"), int(peer[1]),
            str(local[0]).encode("ascii"), int(local[1])), "record the addresses")

    @property
    def peer(self) -> Tuple[str, int]:
        """The server's numeric address and port (("", 0) when unknown)."""
        port = ffi.new("int *")
        host = lib.smtps_session_peer(self._live(), port)
        return ffi.string(host).decode("ascii"), int(port[0])

    @property
    def local_address(self) -> Tuple[str, int]:
        """Our end of the connection (("", 0) when unknown)."""
        port = ffi.new("int *")
        host = lib.smtps_session_local_address(self._live(), port)
        return ffi.string(host).decode("ascii"), int(port[0])

    def send(self, line: Union[str, bytes]) -> None:
        """Queue one command line (CRLF is added).

        Raises:
            TypeError: neither str nor bytes.
            InvalidMessageError: CR, LF, NUL or another control character, an
                empty or over-long line.
            LocalProtocolError: the session is not in a state to send, or
                the server is reading message data (after DATA's 354).
        """
        if isinstance(line, str):
            try:
                raw = line.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidMessageError(f"command line {line!r} is not valid Unicode") from None
        elif isinstance(line, (bytes, bytearray, memoryview)):
            raw = bytes(line)
        else:                             # bytes(5) would be five NULs
            raise TypeError(f"send() takes a str or bytes line, not {type(line).__name__}")
        for b in raw:
            if b < 0x20 or b == 0x7F:
                raise InvalidMessageError(
                    f"command line {raw!r} contains control byte {b:#04x}; "
                    "CRLF is added for you and nothing else may be embedded")
        if not raw or len(raw) + 2 > lib.SMTPS_LINE_MAX:
            raise InvalidMessageError(
                f"command line must be 1-{lib.SMTPS_LINE_MAX - 2} bytes")
        rc = lib.smtps_session_send_line(self._live(), raw, len(raw))
        if rc == lib.SMTPS_ESTATE:
            raise LocalProtocolError(
                f"cannot send {raw!r} now: the session is not running a state, or the "
                "server is reading message data (after the 354, before the final dot)")
        check(rc, "send a command")

    @property
    def capabilities(self) -> Capabilities:
        """What the server offered in its EHLO (LHLO) reply (empty before it)."""
        return Capabilities._from_c(lib.smtps_session_caps(self._live()))

    @property
    def protocol(self) -> str:
        """The protocol this connection speaks: "smtp" or "lmtp" (RFC 2033).
        Under LMTP the built-in EHLO state sends LHLO, and BODY awaits one
        reply per recipient accepted at RCPT (``reply_index`` counts them)."""
        return _PROTOCOL_NAMES[int(lib.smtps_session_protocol(self._live()))]

    @property
    def pipelining(self) -> bool:
        """True when RFC 2920 pipelining is in use on this connection."""
        return bool(lib.smtps_session_pipelining(self._live()))

    @property
    def message(self) -> Any:
        """The :class:`~smtpstate.Message` in its transaction, or None."""
        m = lib.smtps_session_message(self._live())
        if m == ffi.NULL:
            return None
        return self.messages.get(int(lib.smtps_message_tag(m)))

    @property
    def state(self) -> str:
        """The name of the state being run."""
        sid = lib.smtps_session_state(self._live())
        return self.machine.name(sid) if sid >= 0 else ""

    @property
    def reply_index(self) -> int:
        """Which of its awaited replies the callback is handed (0-based)."""
        return int(lib.smtps_session_reply_index(self._live()))

    @property
    def data(self) -> Dict[str, Any]:
        """A dict private to the running state and this connection."""
        return self._data.setdefault(int(lib.smtps_session_state(self._live())), {})

    def next_state(self, state: Union[int, str, None]) -> None:
        """Choose the state entered after this callback (None: the default).

        Raises:
            KeyError: no such state.
        """
        ptr = self._live()
        if state is None:
            lib.smtp_next_state(ptr, ffi.NULL)
            return
        sid = self.machine.id(state) if isinstance(state, str) else int(state)
        st = lib.smtps_machine_get(self.machine._ptr, sid)
        if st == ffi.NULL:
            raise KeyError(f"no state with id {sid}")
        lib.smtp_next_state(ptr, st)

    def fail_reason(self, text: str) -> None:
        """Say why the state is about to fail the transaction."""
        lib.smtps_session_set_reason(self._live(), text.encode("utf-8", "replace"))

    # -- what drivers use -------------------------------------------------

    def _live(self) -> Any:
        """The C session, while it exists.

        Raises:
            LocalProtocolError: the connection has ended and its C session
                is gone (a state kept its Session past its callbacks).
        """
        ptr = self._ptr
        if ptr is None:
            raise LocalProtocolError(
                "this Session has ended: its connection is closed and the session "
                "freed. A state may use the Session it is given only during its "
                "own setup, callback and free calls; keep what you need from it "
                "(e.g. in session.data or on the state), not the Session itself")
        return ptr

    def _end(self) -> None:
        """Drivers: the C session under this view is about to be freed (or
        is gone): every later use raises instead of reading freed memory."""
        self._ptr = None

    def close(self) -> None:
        """Free the C session now, letting each state's free() run.

        Raises:
            LocalProtocolError: called from inside one of this session's own
                states (the loop still runs on it). To end the connection
                from a state, return ``Action.FAIL_CONN``.
        """
        ptr = self._ptr
        if ptr is not None and lib.smtps_session_dispatching(ptr):
            raise LocalProtocolError(
                "close() was called from inside one of this session's states, "
                "while its loop runs on it; return Action.FAIL_CONN (or "
                "Action.TEMPFAIL_TX / PERMFAIL_TX) to end the connection or the "
                "transaction instead")
        if not self._closed:
            self._closed = True
            ffi.gc(ptr, None)                 # cancel the collector's free
            # Before C frees it (free() trampolines find their Session
            # through the user handle), so that a session allocated at the
            # same address meanwhile is never taken for this one.
            _unbind(ptr, self)
            lib.smtps_session_free(ptr)       # states' free() may still use it
            self._ptr = None

    @property
    def reason(self) -> str:
        """Why the connection failed or closed ("" while it is fine)."""
        return ffi.string(lib.smtps_session_reason(self._live())).decode("utf-8", "replace")

    def _record(self, state: State, exc: BaseException) -> str:
        m = lib.smtps_session_message(self._ptr)
        tag = int(lib.smtps_message_tag(m)) if m != ffi.NULL else None
        text = f"state {state.name!r} raised {type(exc).__name__}: {exc}"
        self.errors.append((tag, exc, text))
        lib.smtps_session_set_reason(self._ptr, text.encode("utf-8", "replace"))
        log.warning("%s", text, exc_info=exc)
        return text

    def next_result(self) -> Optional[Result]:
        """Drivers: the oldest result the session has finished, as a
        :class:`Result` with its message and the exceptions recorded for it,
        or None when there is none yet."""
        r = lib.smtps_session_next_result(self._ptr)
        if r == ffi.NULL:
            return None
        try:
            tag = int(r.tag)
            message = self.messages.pop(tag, None)
            addresses = tuple(message.recipients) if message else ()
            state = self.machine.name(r.state) if r.state >= 0 else None
            error = "; ".join(t for _, t in self.take_errors(tag)) or None
            return result_from_c(r, addresses, state, route=self.route, error=error,
                                 ticket=tag, message=message)
        finally:
            lib.smtps_result_free(r)

    def take_errors(self, tag: Optional[int]) -> List[Tuple[BaseException, str]]:
        """The exceptions recorded for message ``tag`` (and those raised when
        no message was in hand, which concern every message)."""
        out = [(e, t) for (g, e, t) in self.errors if g == tag or g is None]
        self.errors = [x for x in self.errors if not (x[0] == tag)]
        return out


def _free_detached(ptr: Any) -> None:
    _SESSIONS.pop(ptr, None)            # its Session is gone already
    lib.smtps_session_set_user(ptr, ffi.NULL)
    lib.smtps_session_free(ptr)


# The Session each live C session shows its states, keyed by the C session
# pointer (cdata compare and hash by address), held weakly: a Client's
# Session must stay collectable, and the Engine holds its views itself.
# This spares the trampolines called per entry and reply a C call
# (smtps_session_user(), which cffi makes by releasing and retaking the
# GIL) and the address arithmetic the Engine's lookup needed. An entry is
# removed before its C session is freed, so a session allocated later at
# the same address never finds it, and when its Session dies, so that a
# reference found here is alive; a miss takes the general path below.
_SESSIONS: Dict[Any, "weakref.ref[Session]"] = {}


def _bind(csession: Any, session: Session) -> None:
    """Drivers: ``session`` is what states running in ``csession`` see."""
    def gone(ref: "weakref.ref[Session]") -> None:
        if _SESSIONS.get(csession) is ref:
            del _SESSIONS[csession]

    _SESSIONS[csession] = weakref.ref(session, gone)


def _unbind(csession: Any, session: Session) -> None:
    """Drivers: ``csession`` is about to be freed (or its view dropped)."""
    ref = _SESSIONS.get(csession)
    if ref is not None and ref() in (session, None):
        del _SESSIONS[csession]


def _session_of(csession: Any, entering: Optional[State] = None) -> Session:
    """The Session a state sees. The C session's user handle is either that
    Session (Client) or a driver running many sessions (Engine), which
    keeps one view per C session, made on first use (``entering``: the
    state being entered for the first time on this connection) and dropped
    by :func:`_free`. The trampolines try ``_SESSIONS`` first."""
    user = lib.smtps_session_user(csession)
    if user == ffi.NULL:
        raise LocalProtocolError("a Python state ran in a session made outside Python")
    owner = ffi.from_handle(user)
    if isinstance(owner, Session):
        return owner
    return owner._session_view(csession, entering)  # type: ignore[no-any-return]


# What a callback returns, to the int C wants, without Action(act) (an
# enum lookup that cost more than the rest of the trampoline): an Action
# goes back as it is (cffi takes an int subclass); an action's int (equal
# to its member, so found too) and None (NEXT) through this dict. Anything
# else still goes through Action(act), which raises for a value that is
# no action.
_ACTION_INTS: Dict[Any, int] = {a: int(a) for a in Action}
_ACTION_INTS[None] = int(Action.NEXT)
_PERMFAIL_TX = int(Action.PERMFAIL_TX)
_ABORT = int(lib.SMTPS_ACT_ABORT)
_EINVAL = int(lib.SMTPS_EINVAL)
_EINTR = int(lib.SMTPS_EINTR)
_from_handle = ffi.from_handle

# The two trampolines below run on every state entry and every reply: each
# step is a few bytecodes (module-level names, a subscript, no calls that
# are not needed); try costs nothing until something raises.


def _setup(csession: Any, closure: Any) -> int:
    # Registered only for states that override State.setup (machine.py).
    state: State = _from_handle(closure)
    try:
        session = _SESSIONS[csession]()       # alive: see _bind()
    except KeyError:
        session = _session_of(csession, state)
    try:
        n = state.setup(session)
        if n.__class__ is int and n >= 0:
            return n  # type: ignore[no-any-return]
        if n is None:
            return 0
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise TypeError(f"setup() must return a count of replies >= 0, not {n!r}")
        return int(n)
    except Exception as exc:
        session._record(state, exc)
        return _EINVAL
    except BaseException as exc:              # Ctrl-C, sys.exit(): stop
        _stop(csession, state, exc)
        return _EINTR


def _callback(csession: Any, creply: Any, closure: Any) -> int:
    state: State = _from_handle(closure)
    try:
        session = _SESSIONS[csession]()       # alive: see _bind()
    except KeyError:
        session = _session_of(csession)
    try:
        act = state.callback(session, Reply._from_parsed(creply) if creply else None)
        if act.__class__ is Action:
            return act  # type: ignore[no-any-return]
        try:
            return _ACTION_INTS[act]
        except (KeyError, TypeError):           # no action, or unhashable
            return int(Action(act))
    except Exception as exc:
        session._record(state, exc)
        return _PERMFAIL_TX
    except BaseException as exc:              # Ctrl-C, sys.exit(): stop
        _stop(csession, state, exc)
        return _ABORT


def _stop(csession: Any, state: State, exc: BaseException) -> None:
    """A state was interrupted: C ends the connection at once and returns,
    and the driver raises ``exc`` (smtpstate._ffi.raise_interrupt)."""
    lib.smtps_session_set_reason(
        csession, f"{type(exc).__name__} in state {state.name!r}".encode("utf-8", "replace"))
    _ffi.defer_interrupt(exc)


def _free(csession: Any, local: Any, closure: Any) -> None:
    # Detached (collected without close()): the machine and the handle in
    # closure may be gone already, so touch neither.
    user = lib.smtps_session_user(csession)
    if user == ffi.NULL:
        return
    state: State = ffi.from_handle(closure)
    owner = ffi.from_handle(user)
    session = owner if isinstance(owner, Session) else owner._session_view(csession, None)
    try:
        state.free(session)
    except Exception as exc:
        log.warning("state %r free() raised %r", state.name, exc)
    finally:
        if session is not owner:
            owner._session_left(csession, state)  # the view goes with its last state


def _tostage(csession: Any, awaiting: int, closure: Any) -> int:
    state: State = ffi.from_handle(closure)
    stage = state.stage
    if callable(stage):
        ref = _SESSIONS.get(csession)
        session = ref() if ref is not None else None
        stage = stage(session if session is not None else _session_of(csession),
                      bool(awaiting))
    return int(stage)


# Stage names handed to C as char *: C copies them at once, but each must
# outlive the call, so one cdata per distinct name is kept for good.
_stage_names: Dict[str, Any] = {}


def _tostring(stage: int, closure: Any) -> Any:
    state: State = ffi.from_handle(closure)
    name = state.stage_names.get(stage)
    if not isinstance(name, str) or not name:
        return ffi.NULL
    c = _stage_names.get(name)
    if c is None:
        c = _stage_names[name] = ffi.new("char[]", name.encode("utf-8", "replace")[:63])
    return c


def _init_local(csession: Any, closure: Any, local: Any) -> int:
    # First entry of a Python state on this connection: the Engine counts
    # it among the states whose free() its view of the connection awaits
    # (Engine._session_view), whether or not the state has a setup.
    _session_of(csession, ffi.from_handle(closure))
    return 0


py_trampolines.update(setup=_setup, callback=_callback, free=_free,
                      tostage=_tostage, tostring=_tostring, init_local=_init_local)

# The two called on every state entry and every reply go to C directly,
# without the py_trampolines lookup and its extra frame in _ffi.py (a third
# of a bare cffi callback's cost); same bodies, same onerror backstops.
ffi.def_extern(name="smtps_py_setup", onerror=_ffi._failed_setup)(_setup)
ffi.def_extern(name="smtps_py_callback", onerror=_ffi._failed_action)(_callback)
