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
    "MTASTSError",
    "PolicyError",
    "PolicyFetchError",
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
    ``server_hostname``, the TLS settings: a certificate file missing, a key
    that does not match it, a cipher list OpenSSL refuses), a host or port, an Engine limit, a concurrency,
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


#: The RFC 8460 (TLSRPT) result types of an MTA-STS policy that could not
#: be had, as ``result_type`` of :class:`MTASTSError`.
STS_RESULT_TYPES = ("sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid")


class MTASTSError(SMTPStateError):
    """A recipient domain's MTA-STS policy (RFC 8461) could not be had:
    the peer's doing, never raised for a misused API (that is
    :class:`InvalidOptionError`). Never raised itself.

    Attributes:
        result_type: what a TLSRPT report (RFC 8460 §4.3.2) would call
            it: ``"sts-policy-fetch-error"`` (no complete HTTP 200
            answer), ``"sts-policy-invalid"`` (an answer that is not a
            valid policy) or ``"sts-webpki-invalid"`` (the HTTPS
            server's certificate did not verify). ``str(error)`` is the
            report's failure reason, in words.
    """

    result_type = "sts-policy-fetch-error"


class PolicyError(MTASTSError):
    """An MTA-STS policy text breaks RFC 8461 §3.2; the message says which
    line and what to fix. ``result_type`` is always
    ``"sts-policy-invalid"``."""

    result_type = "sts-policy-invalid"


class PolicyFetchError(MTASTSError):
    """The policy could not be fetched from ``https://mta-sts.<domain>/``;
    the message says why, and ``result_type`` which TLSRPT result that is.
    """

    def __init__(self, message: str, result_type: str = "sts-policy-fetch-error") -> None:
        if result_type not in STS_RESULT_TYPES:
            raise InvalidOptionError(f"result_type must be one of "
                                     f"{', '.join(STS_RESULT_TYPES)}, not {result_type!r}")
        super().__init__(message)
        self.result_type = result_type
