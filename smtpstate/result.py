"""What became of a message: :class:`Result`, :class:`RecipientResult` and
the :class:`Reply` they carry, read out of the C result exactly once.

A result's ``status`` is one of ``"delivered"`` (to every recipient),
``"partial"`` (to some of them: see each recipient's status), ``"tempfail"``
(try again later), ``"permfail"`` (do not) and ``"unknown"`` (the
connection died after the final dot and before its reply: possibly
delivered, RFC 1047). Each recipient's is ``"delivered"``, ``"tempfail"``,
``"permfail"``, ``"unknown"`` or ``"not_sent"`` (the message was not sent to
it: a state ended the transaction first). Both are always final: C decides
them in one place (``smtps_result_settle()``), and the results this package
makes itself follow the same rules.

Under LMTP (RFC 2033) the server answers the end of data once per recipient
it accepted, and each recipient's ``status`` and ``reply`` are that answer;
the message is ``"partial"`` when some recipients got the message and
others did not (or are ``"unknown"``: the connection died between the
answers).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

from smtpstate._ffi import ffi, lib
from smtpstate.classify import BounceClass, _of, classify_failure
from smtpstate.errors import DeliveryError

__all__ = ["Reply", "RecipientResult", "Result", "STATUSES", "RECIPIENT_STATUSES"]

#: A message's statuses, and a recipient's.
STATUSES = ("delivered", "partial", "tempfail", "permfail", "unknown")
RECIPIENT_STATUSES = ("delivered", "tempfail", "permfail", "unknown", "not_sent")

_STATUS_NAMES = {
    lib.SMTPS_STATUS_DELIVERED: "delivered",
    lib.SMTPS_STATUS_PARTIAL: "partial",
    lib.SMTPS_STATUS_TEMPFAIL: "tempfail",
    lib.SMTPS_STATUS_PERMFAIL: "permfail",
    lib.SMTPS_STATUS_UNKNOWN: "unknown",
    lib.SMTPS_STATUS_NOT_SENT: "not_sent",
}


_FAILED = ("tempfail", "permfail", "unknown")

@dataclass(frozen=True)
class Reply:
    """One server reply.

    Attributes:
        code: the three-digit reply code.
        enhanced: the RFC 3463 enhanced status code (``"5.1.1"``) or ``""``.
        text: every line's text, joined by newlines.
    """

    code: int
    enhanced: str
    text: str

    @property
    def lines(self) -> Tuple[str, ...]:
        """The reply's lines, without their codes."""
        return tuple(self.text.split("\n"))

    def __str__(self) -> str:
        return f"{self.code} {self.text}"

    @classmethod
    def _from_parsed(cls, c: Any) -> "Reply":
        text = bytes(ffi.buffer(c.text, c.text_len)).decode("utf-8", "replace")
        return cls(int(c.code), ffi.string(c.enhanced).decode("ascii", "replace"), text)

    @classmethod
    def _from_result(cls, c: Any) -> Optional["Reply"]:
        if c.code == 0:
            return None
        return cls(
            int(c.code),
            ffi.string(c.enhanced).decode("ascii", "replace"),
            ffi.string(c.text).decode("utf-8", "replace"),
        )


@dataclass(frozen=True)
class RecipientResult:
    """One recipient's outcome.

    ``status`` is ``"delivered"``, ``"tempfail"``, ``"permfail"``,
    ``"unknown"`` (lost after the final dot) or ``"not_sent"`` (the server
    may have accepted its RCPT, but the message was not sent to it: a state
    ended the transaction, as an address check does). A recipient refused
    at RCPT keeps that verdict; one the server accepted shares the
    message's fate.
    ``reply`` is the reply to its RCPT TO, or, when it had none, the reply
    that failed the message; under LMTP, for a recipient the server
    accepted, the server's own reply for it after the data (its delivery
    to that mailbox), when that came.
    ``bounce_class`` says what kind of failure it was (None when it did
    not fail: delivered or not sent).
    ``mx`` is the host it was delivered to or last tried (an MX host, or
    the host given), and ``ip`` that host's address; None when no
    connection was made for it.
    """

    address: str
    status: str
    reply: Optional[Reply]
    bounce_class: Optional[BounceClass] = None
    mx: Optional[str] = None
    ip: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.status == "delivered"


@dataclass(frozen=True)
class Result:
    """Exactly one per submitted message.

    Attributes:
        status: ``"delivered"`` (every recipient), ``"partial"`` (some: the
            rest were refused or not sent; see ``recipients``),
            ``"tempfail"``, ``"permfail"`` or ``"unknown"``.
        reply: the reply that decided it (None when no reply did: a timeout,
            a lost connection, a refusal before sending).
        recipients: per-recipient outcomes, in the message's order.
        stage: the connection stage it ended in (``"sending RCPT TO"``).
        stage_code: the classic numeric code of that stage.
        state: the name of the state it ended in, or None.
        reason: why, in words, when no reply says it.
        error: the text of the exception a Python state raised, or None.
        ticket: what the caller's submission returned, if any.
        bounce_class: the :class:`~smtpstate.classify.BounceClass` of a
            failure (``.code`` 10, ``.name`` "invalid recipient"); None
            when delivered.
    """

    status: str
    reply: Optional[Reply]
    recipients: Tuple[RecipientResult, ...]
    stage: str
    stage_code: int
    state: Optional[str]
    reason: str = ""
    error: Optional[str] = None
    ticket: Any = None
    message: Any = field(default=None, repr=False, compare=False)
    bounce_class: Optional[BounceClass] = None

    def __post_init__(self) -> None:
        # Results made in Python (a connect that failed before any C
        # session) are classified here, as C classifies its own.
        if self.status in ("delivered", "partial") or self.bounce_class is not None:
            return
        cls = classify_failure(self.status, self.reply, self.reason)
        object.__setattr__(self, "bounce_class", cls)
        if any(r.bounce_class is None and r.status in _FAILED for r in self.recipients):
            object.__setattr__(self, "recipients", tuple(
                dataclasses.replace(r, bounce_class=classify_failure(r.status, r.reply, "")
                                    if r.reply is not None and r.reply.code >= 400 else cls)
                if r.bounce_class is None and r.status in _FAILED else r
                for r in self.recipients))

    @property
    def ok(self) -> bool:
        """True when the message was delivered to every recipient (a
        ``"partial"`` delivery is not ok)."""
        return self.status == "delivered"

    def raise_for_status(self) -> "Result":
        """Return the result when delivered to every recipient; raise
        otherwise (a partial delivery too: the failed recipients are in
        ``recipients``).

        Raises:
            DeliveryError: not delivered to every recipient; it carries
                this result, its ``stage`` and ``stage_code``, ``reply``
                and ``bounce_class``.
        """
        if not self.ok:
            raise DeliveryError(self)
        return self

    def __str__(self) -> str:
        why = str(self.reply) if self.reply else self.reason
        return f"{self.status} ({self.stage}): {why}"


def _route(c: Any, k: int) -> Tuple[Optional[str], Optional[str]]:
    """Where a recipient went: (mx, ip) of a C result's route k."""
    if not 0 <= k < c.nroute:
        return None, None
    rt = c.route[k]
    return (ffi.string(rt.mx).decode("utf-8", "replace") or None,
            ffi.string(rt.ip).decode("ascii", "replace") or None)


def result_from_c(
    c: Any, addresses: Tuple[str, ...], state_name: Optional[str],
    route: Optional[Tuple[Optional[str], Optional[str]]] = None, **extra: Any
) -> Result:
    """Copy a C ``struct smtps_result`` into a :class:`Result` (does not free
    it). ``route``: (mx, ip) of every recipient when C recorded none (a
    Client's one server)."""
    where = route if route is not None else (None, None)
    recipients = tuple(
        RecipientResult(
            addresses[i] if i < len(addresses) else "",
            _STATUS_NAMES[c.rcpt[i].status],
            Reply._from_result(c.rcpt[i].reply),
            _of(int(c.rcpt[i].bounce_class)),
            *(_route(c, int(c.rcpt[i].route)) if c.nroute else where),
        )
        for i in range(c.nrcpt)
    )
    return Result(
        status=_STATUS_NAMES[c.status],
        reply=Reply._from_result(c.reply),
        recipients=recipients,
        stage=ffi.string(c.stage_name).decode("utf-8", "replace"),
        stage_code=int(c.stage),
        state=state_name,
        reason=ffi.string(c.reason).decode("utf-8", "replace"),
        bounce_class=_of(int(c.bounce_class)),
        **extra,
    )


def not_attempted(why: str) -> str:
    """``why`` as the reason of a message that was never tried: prefixed
    with "not attempted: " exactly once."""
    return why if why.startswith("not attempted: ") else f"not attempted: {why}"


def unsent_result(message: Any, tag: Any, status: str, reason: str, *,
                  stage: str = "not connected", stage_code: int = 0,
                  state: Optional[str] = None) -> Result:
    """The result of a message that never reached a transaction (no
    connection, or the server refused us before it): every recipient
    shares the message's failure, as C's results do (smtps_result_settle)."""
    return Result(status=status, reply=None,
                  recipients=tuple(RecipientResult(str(a), status, None)
                                   for a in message.recipients),
                  stage=stage, stage_code=stage_code, state=state,
                  reason=reason, ticket=tag, message=message)

