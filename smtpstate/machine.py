"""Machines and Python states.

A :class:`Machine` is the order of states one SMTP connection runs. Python
states are registered through the same C function as C states,
``register_smtp_client_state``'s machine form: their callbacks are the
``extern "Python"`` trampolines of :mod:`smtpstate._ffi` and their closure
is an ``ffi.new_handle`` of the :class:`State` object, which C hands back
untouched. The machine keeps every handle alive for as long as it lives,
because C may call any registered state until then.
"""

from __future__ import annotations

import enum
import threading
from typing import Any, Dict, List, Optional, Tuple, Union

from smtpstate._ffi import ffi, lib
from smtpstate.errors import RegistrationError

__all__ = ["Action", "Stage", "State", "Machine", "default_machine", "BUILTIN_STATES"]


class Action(enum.IntEnum):
    """What a state's callback tells the loop (``enum smtps_action``)."""

    ERROR = lib.SMTPS_ACT_ERROR
    NEXT = lib.SMTPS_ACT_NEXT
    JUMP = lib.SMTPS_ACT_JUMP
    RETRY = lib.SMTPS_ACT_RETRY
    TEMPFAIL_TX = lib.SMTPS_ACT_TEMPFAIL_TX
    PERMFAIL_TX = lib.SMTPS_ACT_PERMFAIL_TX
    FAIL_CONN = lib.SMTPS_ACT_FAIL_CONN
    #: Stop now: the connection closes without QUIT, its messages get their
    #: results, and the driver's call returns. (Ctrl-C raised in a state
    #: does this by itself, and the driver then re-raises it.)
    ABORT = lib.SMTPS_ACT_ABORT


class Stage(enum.IntEnum):
    """The classic connection stage codes (``enum smtps_stage``)."""

    NOT_CONNECTED = 0
    IDLE = 1
    MAIL = 2
    MAIL_DONE = 3
    RCPT = 4
    RCPT_DONE = 5
    DATA = 6
    DATA_DONE = 7
    BODY = 8
    CONFIRM = 9
    EHLO = 10
    EHLO_DONE = 11
    BANNER = 12
    RSET = 13
    RSET_DONE = 14
    STARTTLS = 15
    STARTTLS_DONE = 16
    TLS_HANDSHAKE = 17
    TLS_RENEGOTIATION = 18
    XCLIENT = 19
    XCLIENT_DONE = 20
    UNKNOWN = 22
    AUTH = 23
    AUTH_DONE = 24
    BEFORE_MAIL = 25


# Action.NEXT looked up once: an enum member read from its class goes
# through EnumType's __getattr__ hook, about 0.1 us a time on Python 3.11.
_NEXT = Action.NEXT


def _overrides(state: "State", method: str) -> bool:
    """True when state has a method of its own, not State's."""
    return (getattr(type(state), method, None) is not getattr(State, method)
            or method in getattr(state, "__dict__", {}))


BUILTIN_STATES = ("BANNER", "EHLO", "STARTTLS", "AUTH", "MAIL", "RCPT",
                  "DATA", "BODY", "RSET", "QUIT")


class State:
    """Base class of Python states. Subclass it and override what you need.

    Class attributes:
        name: unique within a machine, 1-63 bytes.
        pipelinable: may run ahead with MAIL/RCPT/DATA under PIPELINING.
        stage: the :class:`Stage` (or any int) results report while in it,
            or a callable ``stage(session, awaiting) -> int`` (awaiting is
            True while replies are still expected).
        stage_names: names of stage codes of the state's own (not in
            :class:`Stage`), e.g. ``{30: "sending PROXY header"}``, which
            results then report as their ``stage``.

    Methods are called with the :class:`~smtpstate.session.Session`:

    - ``setup(session) -> int``: the state is entered; queue commands with
      ``session.send(...)``; return how many replies to wait for (0 is fine).
    - ``callback(session, reply) -> Action``: once per awaited reply, or once
      with ``reply=None`` when setup awaited none. Returning None means NEXT.
    - ``free(session)``: the connection ended; drop per-session data.

    An exception from any of them fails the message in hand (its Result
    carries the error), or the connection when no message is in hand.

    A state whose class does not override ``setup`` is registered without
    one (C then enters it awaiting no reply, as this ``setup`` would say),
    so no Python call is made for it: that is decided when it is
    registered, and assigning ``setup`` afterwards has no effect.
    """

    name: str = ""
    pipelinable: bool = False
    stage: Any = Stage.UNKNOWN
    stage_names: Dict[int, str] = {}

    def setup(self, session: Any) -> int:
        return 0

    def callback(self, session: Any, reply: Any) -> Optional[int]:
        return _NEXT

    def free(self, session: Any) -> None:
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class Machine:
    """A state order. ``Machine()`` is a fresh copy of the built-in order;
    :data:`default_machine` is the one Momentum's C functions act on.

    Sessions run on a snapshot taken when they start, so registering while
    connections run is safe: new connections see the new order.
    """

    def __init__(self) -> None:
        ptr = lib.smtps_machine_new()
        if ptr == ffi.NULL:
            raise MemoryError("cannot allocate a machine")
        self._ptr = ffi.gc(ptr, lib.smtps_machine_free)
        self._handles: Dict[int, Tuple[Any, State]] = {}
        self._lock = threading.Lock()

    @classmethod
    def _default(cls) -> "Machine":
        self = cls.__new__(cls)
        self._ptr = lib.smtps_default_machine()
        self._handles = {}
        self._lock = threading.Lock()
        return self

    def id(self, name: str) -> int:
        """The id of the state called ``name``.

        Raises:
            KeyError: no such state.
        """
        if "\x00" in name:                   # C would stop at the NUL
            raise KeyError(f"no state named {name!r} in this machine")
        rc = lib.smtps_machine_find(self._ptr, name.encode("utf-8"))
        if rc < 0:
            raise KeyError(f"no state named {name!r} in this machine")
        return int(rc)

    def name(self, state_id: int) -> str:
        """The name of the state with this id.

        Raises:
            KeyError: no such id.
        """
        st = ffi.NULL
        if 0 <= state_id < lib.SMTPS_MAX_STATES:   # beyond a C int: OverflowError
            st = lib.smtps_machine_get(self._ptr, state_id)
        if st == ffi.NULL:
            raise KeyError(f"no state with id {state_id}")
        return ffi.string(st.name).decode("utf-8")

    @property
    def states(self) -> List[Tuple[int, str]]:
        """The order, as ``(id, name)`` pairs, first to last."""
        out = []
        st = lib.smtps_machine_head(self._ptr)
        while st != ffi.NULL:
            out.append((int(st.id), ffi.string(st.name).decode("utf-8")))
            st = st.next
        return out

    def state(self, state_id: int) -> Optional[State]:
        """The Python state object registered under this id, if any."""
        entry = self._handles.get(state_id)
        return entry[1] if entry else None

    def _resolve(self, after: Union[int, str, None]) -> int:
        if after is None or after == -1:
            return -1
        if isinstance(after, str):
            try:
                return self.id(after)
            except KeyError:
                raise RegistrationError(
                    f"cannot insert after {after!r}: no such state; "
                    f"known: {[n for _, n in self.states]}") from None
        if isinstance(after, bool) or not isinstance(after, int):
            raise RegistrationError(f"after must be a state id or name, not {after!r}")
        if (not 0 <= after < lib.SMTPS_MAX_STATES
                or lib.smtps_machine_get(self._ptr, after) == ffi.NULL):
            raise RegistrationError(f"cannot insert after id {after}: no such state")
        return after

    def register(self, state: State, after: Union[int, str, None] = None) -> int:
        """Insert ``state`` after the state ``after`` (id or name; -1 or None:
        at the very front, before BANNER). Returns the new state's id.

        Raises:
            RegistrationError (a ValueError): a bad name, a duplicate name,
                an unknown ``after``, a full table, or not a State.
        """
        if not isinstance(state, State):
            raise RegistrationError(f"expected a smtpstate.State, got {type(state).__name__}")
        name = state.name
        if not isinstance(name, str) or not name:
            raise RegistrationError(f"{type(state).__name__} needs a non-empty str name")
        if "\x00" in name:
            raise RegistrationError(f"state name {name!r} contains a NUL character")
        raw = name.encode("utf-8")
        if len(raw) > lib.SMTPS_STATE_NAME_MAX:
            raise RegistrationError(
                f"state name {name!r} is longer than {lib.SMTPS_STATE_NAME_MAX} bytes")
        insert_after = self._resolve(after)
        with self._lock:
            handle = ffi.new_handle(state)
            cstate = ffi.new("smtp_state *")
            cname = ffi.new("char[]", raw)
            cstate.sizeof_smtp_state = ffi.sizeof("smtp_state")
            cstate.name = cname
            # State.setup sends nothing and awaits nothing: a NULL setup
            # says the same to C without a call into Python per entry.
            if _overrides(state, "setup"):
                cstate.setup = lib.smtps_py_setup
            cstate.callback = lib.smtps_py_callback
            # Once per state and connection: the Engine learns which of a
            # connection's states will be freed (setup may not be called).
            cstate.init_local_state = lib.smtps_py_init_local
            cstate.free = lib.smtps_py_free
            cstate.tostage = lib.smtps_py_tostage
            if state.stage_names:
                cstate.tostring = lib.smtps_py_tostring
            cstate.closure = handle
            cstate.flags = lib.SMTPS_STATE_PIPELINABLE if state.pipelinable else 0
            rc = lib.smtps_machine_register(self._ptr, cstate, insert_after)
            if rc < 0:
                if name in {n for _, n in self.states}:
                    raise RegistrationError(f"a state named {name!r} exists already")
                if lib.smtps_machine_count(self._ptr) >= lib.SMTPS_MAX_STATES:
                    raise RegistrationError(
                        f"the machine is full ({lib.SMTPS_MAX_STATES} states)")
                raise RegistrationError(f"cannot register {name!r} after {after!r}")
            # C copied everything but the closure; the handle must live on.
            self._handles[int(rc)] = (handle, state)
            return int(rc)

    def register_c_state(self, cstate: Any, after: Union[int, str, None] = None,
                         keep: Any = None) -> int:
        """Insert a state written in C: ``cstate`` is a ``smtp_state *``
        (``smtpstate._core.ffi``) whose callbacks are C function pointers,
        e.g. filled in by a shared library of your own. C copies every
        field but ``closure``. Returns the new state's id.

        Args:
            cstate: the filled ``smtp_state *``.
            after: as for :meth:`register`.
            keep: anything that must live as long as this machine (the
                library the callbacks live in, the closure's memory).

        Raises:
            RegistrationError (a ValueError): not a ``smtp_state *``, or C
                refused it (bad name, duplicate, no callback, table full).
        """
        if not isinstance(cstate, ffi.CData) or ffi.typeof(cstate) is not ffi.typeof("smtp_state *"):
            raise RegistrationError(f"expected a cdata 'smtp_state *', got {cstate!r}")
        insert_after = self._resolve(after)
        with self._lock:
            rc = lib.smtps_machine_register(self._ptr, cstate, insert_after)
            if rc < 0:
                raise RegistrationError(
                    f"C refused the state (a bad or duplicate name, no callback, a bad "
                    f"sizeof_smtp_state, or a full table) after {after!r}")
            self._handles[int(rc)] = (keep, None)  # type: ignore[assignment]
            return int(rc)

    def __repr__(self) -> str:
        return f"<Machine {[n for _, n in self.states]}>"


default_machine = Machine._default()
