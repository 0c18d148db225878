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

    Attributes:
        result: the :class:`~smtpstate.Result`.
        status, stage, stage_code, reply, reason, bounce_class: the
            result's, for convenience.
    """

    def __init__(self, result: Any) -> None:
        self.result = result
        self.status = result.status
        self.stage = result.stage
        self.stage_code = result.stage_code
        self.reply = result.reply
        self.reason = result.reason
        self.bounce_class = result.bounce_class
        why = str(result.reply) if result.reply is not None else result.reason
        cls = f" [{result.bounce_class}]" if result.bounce_class is not None else ""
        super().__init__(f"{result.status} at stage {result.stage_code} "
                         f"({result.stage}): {why}{cls}")


class StateCallbackError(SMTPStateError):
    """A Python state raised; its message failed, the process did not.

    Attributes:
        state: the name of the state that raised.
        stage: the connection stage it was in.
    The original exception is ``__cause__``.
    """

    def __init__(self, state: str, stage: Optional[str], message: str) -> None:
        super().__init__(message)
        self.state = state
        self.stage = stage
