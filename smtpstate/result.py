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
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

from smtpstate._ffi import ffi, lib
from smtpstate.classify import BounceClass, _of, classify_failure
from smtpstate.errors import DeliveryError

__all__ = ["Reply", "RecipientResult", "Result", "STATUSES", "RECIPIENT_STATUSES",
           "local_enhanced"]

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
_STATUS_CODES = {v: k for k, v in _STATUS_NAMES.items()}


def local_enhanced(status: str, reason: str) -> str:
    """The RFC 3463 code of a failure decided here, without a reply, by
    C's one table (``smtps_bounce_local_enhanced()``, csrc/classify.c):
    ``"4.4.1"`` for ``("tempfail", "connect to ...: Connection
    refused")``; ``""`` for a status that is no failure."""
    out = ffi.new("char[16]")
    lib.smtps_bounce_local_enhanced(_STATUS_CODES.get(status, 0),
                                    reason.encode("utf-8", "replace"), out, 16)
    return ffi.string(out).decode("ascii")


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

    def as_smtp(self) -> str:
        """The reply as a server writes it: ``"451-4.4.1 a\r\n451 4.4.1
        b"`` (no final CRLF; aiosmtpd's handlers return such strings).
        Control characters become spaces, and each line is cut to fit in
        512 octets with its code and CRLF (RFC 5321 4.5.3.1.5)."""
        prefix = f"{self.code}"
        lines = [_printable(line) for line in (self.text or "").split("\n")] or [""]
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            head = f"{prefix}{sep}{self.enhanced} " if self.enhanced else f"{prefix}{sep}"
            room = 510 - len(head.encode("utf-8"))
            raw = line.encode("utf-8")
            if len(raw) > room:
                line = raw[:room].decode("utf-8", "ignore")
            out.append(head + line if line else head.rstrip(" "))
        return "\r\n".join(out)

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
    ``enhanced`` is the RFC 3463 enhanced status code of a failure decided
    here rather than by a reply (``"4.4.1"``: no connection; ``"4.4.2"``:
    the connection was lost; see docs/relay.md), ``""`` when a failing
    reply decided it (its own, or the message's) or it did not fail.
    """

    address: str
    status: str
    reply: Optional[Reply]
    bounce_class: Optional[BounceClass] = None
    mx: Optional[str] = None
    ip: Optional[str] = None
    enhanced: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "delivered"

    def smtp_reply(self, result: Optional["Result"] = None) -> "Reply":
        """The reply to give an upstream client for this recipient, as an
        LMTP server answers per recipient after the data (RFC 2033 4.2):
        250 when delivered, its own failing reply when it has one (else
        the message's, when ``result`` is given), else a 451 or 550 with
        its local enhanced code. A recipient not sent (a state ended the
        transaction) and one whose fate is unknown get 451: the client
        keeps the message and tries again.
        """
        return _recipient_reply(self, result)


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
        enhanced: the RFC 3463 enhanced status code of a failure decided
            here, without a failing reply (``"4.4.1"`` connection refused
            or not answered, ``"5.3.4"`` too big for the server's SIZE,
            ``"5.6.7"`` SMTPUTF8 not offered; docs/relay.md has the
            table); ``""`` when a reply decided it or nothing failed.
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
    enhanced: str = ""

    def __post_init__(self) -> None:
        # Results made in Python (a connect that failed before any C
        # session) get their enhanced codes and classes here, by C's
        # tables, as C gives its own.
        if self.status not in ("delivered", "partial") and not self.enhanced and (
                self.reply is None or self.reply.code < 400):
            local = local_enhanced(self.status, self.reason)
            object.__setattr__(self, "enhanced", local)
            if any(r.status in _FAILED and not r.enhanced
                   and (r.reply is None or r.reply.code < 400) for r in self.recipients):
                object.__setattr__(self, "recipients", tuple(
                    dataclasses.replace(r, enhanced=local_enhanced(r.status, self.reason))
                    if r.status in _FAILED and not r.enhanced
                    and (r.reply is None or r.reply.code < 400) else r
                    for r in self.recipients))
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

    def smtp_reply(self) -> Reply:
        """The reply to give the upstream client that handed us this
        message (a relay answering the end of its DATA).

        * ``"delivered"`` or ``"partial"``: 250 (the recipients that
          failed are the relay's to report, by DSN: :mod:`smtpstate.dsn`);
        * every recipient failed for good (``"permfail"``): the downstream
          5xx reply that decided it (when each recipient was refused at
          RCPT, the last refusal, as ``reply`` says), else 5xx with the
          local enhanced code (5.3.4 too big, 5.6.7 SMTPUTF8 not offered,
          5.7.30 REQUIRETLS) and the reason;
        * anything failed for now (``"tempfail"``), or might have been
          delivered (``"unknown"``: the client then keeps the message and
          may send it twice rather than lose it, RFC 1047): 451, with the
          downstream reply's enhanced code and text when one decided it,
          else the local code (4.4.1 no connection, 4.4.2 connection
          lost, 4.4.7 expired, ...).

        Returns:
            a :class:`Reply` whose ``text`` has no enhanced-code prefix
            (an SMTP server adds it, as aiosmtpd's ``"250 OK"`` strings
            are made by ``f"{code} {enhanced} {text}"``).
        """
        return _message_reply(self)

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


def _printable(text: str) -> str:
    """text with control characters (CR, LF, TAB, NUL...) as spaces."""
    return "".join(" " if ord(ch) < 32 or ord(ch) == 127 else ch for ch in text)


# Local permanent failures answered upstream with the code RFCs name for
# them: too big (RFC 1870 6.1, 552), a UTF-8 address the next hop cannot
# take (RFC 6531 3.5, 553), 8-bit content it cannot take (RFC 6152, 554).
_LOCAL_PERM_CODES = {"5.3.4": 552, "5.6.7": 553, "5.6.3": 554}


def _without_prefix(reply: Reply) -> str:
    """A reply's text without the enhanced code that starts its lines
    (Reply.text keeps what the server wrote after the reply code)."""
    if not reply.enhanced:
        return reply.text
    head = reply.enhanced + " "
    return "\n".join(line[len(head):] if line.startswith(head)
                     else "" if line == reply.enhanced else line
                     for line in reply.text.split("\n"))


def _relayed(code: int, reply: Reply) -> Reply:
    """reply as ours to give with code, its enhanced code kept (X.0.0 when
    it had none, of code's class), its text without that prefix."""
    enhanced = reply.enhanced if reply.enhanced[:1] == str(code // 100) else ""
    return Reply(code, enhanced or _default_enhanced(code), _without_prefix(reply))


def _default_enhanced(code: int) -> str:
    """X.0.0 (other or undefined status) for a reply that has no code."""
    return f"{code // 100}.0.0"


_LEADING_CODE = re.compile(r"^[245]\.[0-9]{1,3}\.[0-9]{1,3} ")


def _reason_text(reason: str, fallback: str) -> str:
    """A reason as reply text: without the enhanced code our own reasons
    may start with ("5.7.30 REQUIRETLS ..."), which the reply carries."""
    return _LEADING_CODE.sub("", reason, count=1) or fallback


def _failing(r: "Result", first: str) -> Optional[Reply]:
    """The downstream reply (of class ``first``, "4" or "5") that decided
    r: its own, else the first recipient's that failed so."""
    if r.reply is not None and str(r.reply.code)[:1] == first:
        return r.reply
    return next((x.reply for x in r.recipients
                 if x.reply is not None and str(x.reply.code)[:1] == first
                 and x.status in _FAILED), None)


def _message_reply(r: "Result") -> Reply:
    """Result.smtp_reply(): see there."""
    if r.status in ("delivered", "partial"):
        n = len(r.recipients)
        done = sum(1 for x in r.recipients if x.status == "delivered")
        text = "Ok: delivered" if done == n else f"Ok: delivered to {done} of {n} recipients"
        return Reply(250, "2.0.0", text)
    if r.status == "permfail":
        failing = _failing(r, "5")
        if failing is not None:
            return _relayed(failing.code, failing)
        enhanced = r.enhanced or "5.0.0"
        return Reply(_LOCAL_PERM_CODES.get(enhanced, 550), enhanced,
                     _reason_text(r.reason, "delivery failed"))
    # tempfail, unknown: the client keeps the message and tries again.
    failing = _failing(r, "4")
    if failing is not None and r.status == "tempfail":
        return _relayed(451, failing)
    enhanced = r.enhanced if r.enhanced.startswith("4.") else "4.0.0"
    why = _reason_text(r.reason, "try again later")
    if r.status == "unknown":
        why = f"delivery unknown: {why}"
    return Reply(451, enhanced, why)


def _recipient_reply(rr: "RecipientResult", r: Optional["Result"]) -> Reply:
    """RecipientResult.smtp_reply(): see there."""
    if rr.status == "delivered":
        return Reply(250, "2.0.0", "Ok: delivered")
    own = rr.reply if rr.reply is not None and rr.reply.code >= 400 else None
    # Its own local code (no route for it, say) before the reply of the
    # message, which under MX routing may be another destination's.
    if (own is None and not rr.enhanced and r is not None and r.reply is not None
            and r.reply.code >= 400):
        own = r.reply
    reason = r.reason if r is not None else ""
    if rr.status == "permfail":
        if own is not None and own.code >= 500:
            return _relayed(own.code, own)
        enhanced = rr.enhanced or (r.enhanced if r is not None else "") or "5.0.0"
        return Reply(_LOCAL_PERM_CODES.get(enhanced, 550), enhanced,
                     _reason_text(reason, "delivery failed"))
    if own is not None and own.code < 500:
        return _relayed(451, own)
    enhanced = rr.enhanced if rr.enhanced.startswith("4.") else "4.0.0"
    if rr.status == "not_sent":
        return Reply(451, enhanced, _reason_text(reason, "not sent: try again later"))
    why = _reason_text(reason, "try again later")
    return Reply(451, enhanced, f"delivery unknown: {why}" if rr.status == "unknown" else why)


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
            ffi.string(c.rcpt[i].enhanced).decode("ascii", "replace"),
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
        enhanced=ffi.string(c.enhanced).decode("ascii", "replace"),
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

