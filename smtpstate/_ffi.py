"""The C boundary: the compiled module, error-code checking, and the
``extern "Python"`` trampolines through which C calls Python states.

Rule: every ``lib`` call whose return is an ``SMTPS_E*`` code goes through
:func:`check`. Rule: nothing raised in Python crosses into C; a trampoline
records the exception on its session and returns a failure the C loop
understands, and ``onerror`` is the backstop for what the body cannot catch.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Dict, Type

try:
    from smtpstate._core import ffi, lib
except ImportError as _exc:                     # the source tree, never built
    import os as _os

    raise ImportError(
        f"smtpstate's compiled core (smtpstate._core) is missing from "
        f"{_os.path.dirname(_os.path.abspath(__file__))}: this looks like the source "
        "tree, not an installed package. Install it (pip install .) and run from "
        "another directory (python -m puts the current one first), or build it in "
        "place: python smtpstate/_build.py") from _exc
from smtpstate.errors import InvalidMessageError, LocalProtocolError, SMTPStateError

__all__ = ["ffi", "lib", "check", "strerror", "py_trampolines", "EXTENSIONS",
           "AUTH_MECHANISMS", "XCLIENT_ATTRIBUTES", "defer_interrupt", "raise_interrupt",
           "interrupt_pending"]

log = logging.getLogger("smtpstate.state")

_ERRORS: Dict[int, Type[Exception]] = {
    lib.SMTPS_ENOMEM: MemoryError,
    lib.SMTPS_EINVAL: InvalidMessageError,
    lib.SMTPS_ETOOBIG: InvalidMessageError,
    lib.SMTPS_ESTATE: LocalProtocolError,
    lib.SMTPS_ECLOSED: LocalProtocolError,
    lib.SMTPS_EFULL: InvalidMessageError,
}


def strerror(code: int) -> str:
    """The C library's text for an ``SMTPS_E*`` code."""
    return ffi.string(lib.smtps_strerror(code)).decode("ascii", "replace")


def check(rc: int, what: str) -> int:
    """Return ``rc`` unless it is a negative error code; raise then.

    Raises:
        MemoryError, InvalidMessageError, LocalProtocolError or
        SMTPStateError, the message naming ``what`` and the C error.
    """
    if rc >= 0:
        return rc
    exc = _ERRORS.get(rc, SMTPStateError)
    raise exc(f"{what}: {strerror(rc)}")


def _names(name_of: Callable[[int], Any]) -> Dict[str, int]:
    """Keyword -> bit, read from C's one list of each (smtpstate.h's
    SMTPS_EXTENSIONS, SMTPS_AUTH_MECHS, SMTPS_XCLIENT_ATTRS), so that no
    copy here can drift from it. In C's order (AUTH: best first)."""
    bits = {}
    for i in range(32):
        name = name_of(1 << i)
        if name != ffi.NULL:
            bits[ffi.string(name).decode("ascii")] = 1 << i
    return bits


#: EHLO keywords, AUTH mechanism names and XCLIENT attributes, with their bits.
EXTENSIONS: Dict[str, int] = _names(lib.smtps_extension_name)
AUTH_MECHANISMS: Dict[str, int] = _names(lib.smtps_auth_mech_name)
XCLIENT_ATTRIBUTES: Dict[str, int] = _names(lib.smtps_xclient_attr_name)


# The Python side of each trampoline is set by smtpstate.session, which
# knows how to turn a C session into the Python one; kept here so that
# the def_extern functions exist exactly once per process.
py_trampolines: Dict[str, Callable[..., Any]] = {}


# Ctrl-C (KeyboardInterrupt) or sys.exit() inside a Python state must reach
# the caller, but cannot cross C. The trampoline keeps the exception here,
# per thread, and tells C to stop (SMTPS_ACT_ABORT, SMTPS_EINTR): C ends the
# connection at once, settles its messages and returns; the driver then
# raises it (raise_interrupt()). The first one wins: a second Ctrl-C while
# C winds down says nothing new.
_interrupts = threading.local()


def defer_interrupt(exc: BaseException) -> None:
    """Keep ``exc`` (not an Exception: KeyboardInterrupt, SystemExit...)
    for the driver to raise once the C call in progress returns."""
    if getattr(_interrupts, "exc", None) is None:
        _interrupts.exc = exc


def interrupt_pending() -> bool:
    """True when a state was interrupted during the last C call."""
    return getattr(_interrupts, "exc", None) is not None


def raise_interrupt() -> None:
    """Drivers, after a C call that may run states: raise what interrupted
    a state during it, if anything did."""
    exc = getattr(_interrupts, "exc", None)
    if exc is not None:
        _interrupts.exc = None
        raise exc


def _interrupted(exc: Any, val: Any) -> bool:
    """onerror's test: True (and the exception kept) for what must stop the
    driver rather than fail one message."""
    if isinstance(val, BaseException) and not isinstance(val, Exception):
        defer_interrupt(val)
        return True
    if isinstance(exc, type) and issubclass(exc, BaseException) \
            and not issubclass(exc, Exception):
        defer_interrupt(val if isinstance(val, BaseException) else exc())
        return True
    return False


def _failed_action(exc: Any, val: Any, tb: Any) -> int:
    if _interrupted(exc, val):
        return int(lib.SMTPS_ACT_ABORT)
    log.error("Python state failed outside its guard: %r", val)
    return int(lib.SMTPS_ACT_PERMFAIL_TX)


def _failed_setup(exc: Any, val: Any, tb: Any) -> int:
    if _interrupted(exc, val):
        return int(lib.SMTPS_EINTR)
    log.error("Python state setup failed outside its guard: %r", val)
    return int(lib.SMTPS_EINVAL)


def _failed_stage(exc: Any, val: Any, tb: Any) -> int:
    _interrupted(exc, val)
    return int(lib.SMTPS_STAGE_UNKNOWN)


def _failed_free(exc: Any, val: Any, tb: Any) -> None:
    if not _interrupted(exc, val):
        log.error("Python state free failed: %r", val)
    return None


@ffi.def_extern(onerror=_failed_setup)
def smtps_py_init_local(session: Any, closure: Any, local: Any) -> int:
    return int(py_trampolines["init_local"](session, closure, local))


@ffi.def_extern(onerror=_failed_setup)
def smtps_py_setup(session: Any, closure: Any) -> int:
    return int(py_trampolines["setup"](session, closure))


@ffi.def_extern(onerror=_failed_action)
def smtps_py_callback(session: Any, reply: Any, closure: Any) -> int:
    return int(py_trampolines["callback"](session, reply, closure))


@ffi.def_extern(onerror=_failed_free)
def smtps_py_free(session: Any, local: Any, closure: Any) -> None:
    py_trampolines["free"](session, local, closure)


@ffi.def_extern(onerror=_failed_stage)
def smtps_py_tostage(session: Any, awaiting: int, closure: Any) -> int:
    return int(py_trampolines["tostage"](session, awaiting, closure))


def _failed_tostring(exc: Any, val: Any, tb: Any) -> Any:
    _interrupted(exc, val)
    return ffi.NULL                             # C then names the stage itself


@ffi.def_extern(onerror=_failed_tostring)
def smtps_py_tostring(stage: int, closure: Any) -> Any:
    return py_trampolines["tostring"](stage, closure)


def _failed_trace(exc: Any, val: Any, tb: Any) -> None:
    _interrupted(exc, val)
    return None                                 # a transcript never fails a delivery


@ffi.def_extern(onerror=_failed_trace)
def smtps_py_trace(session: Any, kind: int, data: Any, length: int, closure: Any) -> None:
    py_trampolines["trace"](session, kind, data, length, closure)
