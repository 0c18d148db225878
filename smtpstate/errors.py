"""Exceptions of smtpstate, and the one place C error codes become them.

Whose fault it is decides the class (h11's rule): ``LocalProtocolError`` and
the ``ValueError`` clones mean the caller misused the API; a server that
misbehaves never raises, it shows up in a :class:`~smtpstate.Result`.
``SMTPStateError`` itself is never raised directly.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = [
    "SMTPStateError",
    "RegistrationError",
    "InvalidMessageError",
    "InvalidOptionError",
    "LocalProtocolError",
    "StateCallbackError",
    "ConnectError",
    "DeliveryError",
]


class SMTPStateError(Exception):
    """Base of every smtpstate exception; never raised itself."""


class RegistrationError(ValueError, SMTPStateError):
    """A state could not be registered; the message says why."""


class InvalidMessageError(ValueError, SMTPStateError):
    """The message itself was refused before anything was sent: its
    addresses, its content, its DSN values."""


class InvalidOptionError(ValueError, SMTPStateError):
    """Anything given to smtpstate that is not the message was refused: a
    delivery option (``tls``, ``auth``, ``timeout``, ``helo``, ``ca_file``,
    ``server_hostname``), a host or port, an Engine limit, a concurrency,
    a bounce class or rule. Raised before anything is sent."""


class LocalProtocolError(SMTPStateError):
    """The API was used in a way the session cannot honour (wrong time,
    re-entrant call, closed client)."""


class ConnectError(SMTPStateError, OSError):
    """The TCP connection to the server could not be made.

    Attributes:
        stage, stage_code: where it failed: "not connected", 0.
    """

    stage = "not connected"
    stage_code = 0


class DeliveryError(SMTPStateError):
    """A message was not delivered (raised by ``Result.raise_for_status()``;
    the drivers themselves return results, never raise this).

    ``DeliveryError(result)`` for a result that a Python state failed (its
    ``error`` is set) is a :class:`StateCallbackError`, the way
    ``OSError(errno.ENOENT, ...)`` is a ``FileNotFoundError``: so
    ``raise_for_status()`` says whose fault it was without knowing the
    subclasses.

    Attributes:
        result: the :class:`~smtpstate.Result`.
        status, stage, stage_code, reply, reason, bounce_class: the
            result's, for convenience.
    """

    def __new__(cls, result: Any, *args: Any) -> "DeliveryError":
        if cls is DeliveryError and getattr(result, "error", None):
            cls = StateCallbackError
        return super().__new__(cls, result, *args)

    def __init__(self, result: Any) -> None:
        self.result = result
        self.status = result.status
        self.stage = result.stage
        self.stage_code = result.stage_code
        self.reply = result.reply
        self.reason = result.reason
        self.bounce_class = result.bounce_class
        super().__init__(self._describe(result))

    @staticmethod
    def _describe(result: Any) -> str:
        why = str(result.reply) if result.reply is not None else result.reason
        cls = f" [{result.bounce_class}]" if result.bounce_class is not None else ""
        return f"{result.status} at stage {result.stage_code} ({result.stage}): {why}{cls}"


class StateCallbackError(DeliveryError):
    """A message was not delivered because a Python state raised: a bug in
    that state, not the server's doing. Its message failed; the process,
    the connection's other messages and the driver did not.

    Raised by ``Result.raise_for_status()`` for a result whose ``error`` is
    set; a :class:`DeliveryError` like any other failure, so ``except
    DeliveryError`` still sees every message that was not delivered.

    Attributes:
        state: the name of the state the message failed in, which is the
            state that raised (a raising state fails its message there).
        error: what it raised, in words, as ``Result.error``:
            ``"state 'CHECK' raised KeyError: 'x'"``.
        And every attribute of :class:`DeliveryError`.

    The exception object itself is not kept by the Result (its traceback
    was logged on the ``smtpstate.state`` logger when it was raised), so
    ``__cause__`` is None.
    """

    def __init__(self, result: Any) -> None:
        super().__init__(result)
        self.state: Optional[str] = result.state
        self.error: str = result.error

    @staticmethod
    def _describe(result: Any) -> str:
        text = DeliveryError._describe(result)
        return text if result.error in text else f"{text}; {result.error}"
