"""Delivery status notifications (RFC 3464) from a :class:`~smtpstate.Result`,
for a relay that took a message and could not deliver it to every recipient.

This module owns :func:`build`: it decides which recipients a DSN reports
(RFC 3461 NOTIFY: failures and delays by default, successes when asked),
what each one's ``Action``, ``Status`` and ``Diagnostic-Code`` are, and
how the original message goes back (RET=HDRS or FULL). Every MIME part is
made by the standard library's :mod:`email` package; nothing here writes
MIME by hand.

A message that needed SMTPUTF8 (a non-ASCII address, or asked for) gets the
internationalised forms of RFC 6533: ``report-type=global-delivery-status``,
a ``message/global-delivery-status`` part whose addresses are of the
``utf-8`` type, and the original as ``message/global`` (FULL) or
``message/global-headers`` (HDRS). Any other gets RFC 3464's own types and
``rfc822`` addresses.

Sending the DSN is the caller's: with a null reverse path (``MAIL
FROM:<>``, RFC 5321 4.5.5), so that it can never cause another, and to the
original sender, e.g.::

    report = dsn.build(result, message, reporting_mta="relay.example.net")
    if report is not None:
        engine.submit(Message.from_email(report, sender="",
                                         recipients=[message.sender]))
"""

from __future__ import annotations

import datetime
import email
import email.policy
import email.utils
import logging
from email.message import EmailMessage
from email.message import Message as _Block
from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

from smtpstate.errors import InvalidMessageError
from smtpstate.message import Message, Recipient
from smtpstate.result import RecipientResult, Reply, Result, _without_prefix

__all__ = ["build", "ACTIONS"]

log = logging.getLogger(__name__)

#: The actions a DSN may report, by the recipient status that leads to each.
ACTIONS = {"permfail": "failed", "tempfail": "delayed", "unknown": "delayed",
           "delivered": "relayed"}

_SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "relayed": "Successful Mail Delivery Report",
    "delivered": "Successful Mail Delivery Report",
}

_EXPLAIN = {
    "failed": "could not be delivered to the following recipients, and will not be "
              "tried again:",
    "delayed": "has not yet been delivered to the following recipients; delivery "
               "will be tried again:",
    "relayed": "was relayed to the following recipients (no further notice will "
               "follow):",
    "delivered": "was delivered to the following recipients:",
}


def build(result: Result, original: Union[Message, bytes, Any, None] = None, *,
          reporting_mta: str,
          arrival_date: Optional[datetime.datetime] = None,
          received_from_mta: Optional[str] = None,
          ret: Optional[str] = None,
          give_up: bool = False,
          success_action: str = "relayed",
          last_attempt: Optional[datetime.datetime] = None,
          retry_until: Optional[datetime.datetime] = None,
          postmaster: Optional[str] = None) -> Optional[EmailMessage]:
    """A delivery status notification for ``result``, or None when there is
    nothing to notify.

    Args:
        result: what became of the message (a :class:`~smtpstate.Result`).
        original: the :class:`~smtpstate.Message` that was sent (its
            envelope gives the sender, ENVID, RET and each recipient's
            NOTIFY and ORCPT; its ``data``, bytes, the content to return),
            or the content alone (bytes or an ``email.message.Message``),
            the envelope then coming from ``result.message``; None: both
            from ``result.message``.
        reporting_mta: the name of the MTA writing the DSN (``Reporting-MTA:
            dns; <name>``; its ``MAILER-DAEMON@`` address is ``From:``).
        arrival_date: when the relay received the message (``Arrival-Date``;
            default: now).
        received_from_mta: the name of the client it came from
            (``Received-From-MTA: dns; <name>``), if known.
        ret: ``"HDRS"`` or ``"FULL"`` to override the message's RET; without
            either, the headers are returned (RFC 3461 4.3 leaves it to us;
            they say what the message was without carrying it back whole).
        give_up: True when the relay will not try again: recipients that
            failed for now are then reported ``failed`` instead of
            ``delayed``.
        success_action: the action for delivered recipients whose NOTIFY
            asks for SUCCESS: ``"relayed"`` (the default: the next hop may
            not report further, RFC 3464 2.3.3) or ``"delivered"`` (final
            delivery, as to an LMTP mailbox store).
        last_attempt: ``Last-Attempt-Date`` (default: now).
        retry_until: ``Will-Retry-Until`` of delayed recipients, if known.
        postmaster: ``From:`` address (default ``MAILER-DAEMON@`` +
            ``reporting_mta``).

    Returns:
        An ``email.message.EmailMessage`` (``multipart/report``) ready to
        submit with a null reverse path to the original sender; None when
        the sender is null (a DSN never answers one: RFC 3461 6.2,
        RFC 5321 6.1) or when no recipient's outcome is to be reported
        (all delivered, or their NOTIFY says not to).

    Raises:
        InvalidMessageError (a ValueError): no envelope (``result.message``
            is None and ``original`` is not a Message), recipients that do
            not match the result, a bad ``ret`` or ``success_action``, or
            RET=FULL with content that is not in memory (a stream).
    """
    envelope = original if isinstance(original, Message) else result.message
    if not isinstance(envelope, Message):
        raise InvalidMessageError(
            "dsn.build() needs the original Message (the envelope): pass it as "
            "original, or use a Result that carries it (result.message)")
    if ret is not None and str(ret).upper() not in ("HDRS", "FULL"):
        raise InvalidMessageError(f"ret must be 'HDRS', 'FULL' or None, not {ret!r}")
    if success_action not in ("relayed", "delivered"):
        raise InvalidMessageError(
            f"success_action must be 'relayed' or 'delivered', not {success_action!r}")
    if not isinstance(reporting_mta, str) or not reporting_mta or any(
            c.isspace() or ord(c) < 33 for c in reporting_mta):
        raise InvalidMessageError(f"reporting_mta must be a host name, not {reporting_mta!r}")
    options = envelope.recipient_options
    if len(options) != len(result.recipients):
        raise InvalidMessageError(
            f"the message has {len(options)} recipients and the result "
            f"{len(result.recipients)}: not the same message")
    if envelope.sender == "":
        log.debug("no DSN: the message had a null reverse path")
        return None
    now = email.utils.localtime()
    arrival = arrival_date or now
    attempted = last_attempt or now
    content = _content(original, envelope)
    want_ret = (str(ret).upper() if ret is not None else envelope.dsn_ret) or "HDRS"
    intl = _needs_utf8(envelope)

    reported: List[Tuple[RecipientResult, Recipient, str]] = []
    for rr, opt in zip(result.recipients, options):
        action = _action(rr, opt, give_up, success_action)
        if action is not None:
            reported.append((rr, opt, action))
    if not reported:
        return None

    # Fields are not folded short of RFC 5322's 998 octets (the generator
    # writes the status blocks with the report's policy): a Diagnostic-Code
    # folded after its colon reads back with the fold's space in front.
    policy = (email.policy.SMTPUTF8 if intl else email.policy.SMTP).clone(
        refold_source="none", max_line_length=998)
    first = _worst(a for _, _, a in reported)
    dsn = EmailMessage(policy=policy)
    dsn["From"] = (f"Mail Delivery System <{postmaster}>" if postmaster
                   else f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>")
    dsn["To"] = envelope.sender
    dsn["Subject"] = _SUBJECTS[first]
    dsn["Date"] = email.utils.format_datetime(now)
    dsn["Message-ID"] = email.utils.make_msgid(domain=reporting_mta)
    dsn["Auto-Submitted"] = "auto-replied"          # RFC 3834 5
    dsn.set_content(_human(reported, reporting_mta, envelope, result), cte="8bit"
                    if intl else None)
    dsn.make_mixed()
    dsn.set_type("multipart/report")
    dsn.set_param("report-type", "global-delivery-status" if intl else "delivery-status")

    # The machine-readable part: a block per message, then per recipient.
    block_policy = policy
    blocks = [_message_block(block_policy, reporting_mta, received_from_mta, envelope,
                             arrival)]
    blocks += [_recipient_block(block_policy, rr, opt, action, result, attempted,
                                retry_until, intl)
               for rr, opt, action in reported]
    status = EmailMessage(policy=policy)
    if intl:
        # The email package writes the blocks of message/delivery-status
        # only; RFC 6533's global type gets them as its text, each block
        # written by the email package all the same.
        status["Content-Type"] = "message/global-delivery-status"
        status["Content-Transfer-Encoding"] = "8bit"
        # The email package writes message/* parts other than that one as
        # one embedded message: the blocks are given as such, the first
        # block its header, the others its body (which is how the package
        # reads such a part back, too).
        text = "".join(b.as_string(policy=block_policy.clone(linesep="\r\n"))
                       for b in blocks)
        inner: List[Union[_Block, str]] = [
            email.message_from_bytes(text.encode("utf-8"), policy=policy)]
        status.set_payload(inner)
    else:
        status["Content-Type"] = "message/delivery-status"
        payload: List[Union[_Block, str]] = list(blocks)
        status.set_payload(payload)
    dsn.attach(status)

    returned = _returned(content, want_ret, policy, intl)
    if returned is not None:
        dsn.attach(returned)
    return dsn


# -- which recipients, and how -------------------------------------------------


def _action(rr: RecipientResult, opt: Recipient, give_up: bool,
            success_action: str) -> Optional[str]:
    """The Action to report for a recipient, or None (not reported):
    NOTIFY decides (none given: FAILURE and DELAY, RFC 3461 4.1)."""
    notify = set(opt.notify) or {"FAILURE", "DELAY"}
    if "NEVER" in notify:
        return None
    if rr.status == "permfail" or (give_up and rr.status in ("tempfail", "unknown")):
        return "failed" if "FAILURE" in notify else None
    if rr.status in ("tempfail", "unknown"):
        return "delayed" if "DELAY" in notify else None
    if rr.status == "delivered":
        return success_action if "SUCCESS" in notify else None
    return None                                   # not sent: no outcome yet


def _worst(actions: Iterable[str]) -> str:
    """The action that names the report: failed, else delayed, else success."""
    seen = set(actions)
    for a in ("failed", "delayed", "relayed", "delivered"):
        if a in seen:
            return a
    return "failed"


def _needs_utf8(m: Message) -> bool:
    """True when the message went (or had to go) with SMTPUTF8."""
    if getattr(m, "smtputf8", False):
        return True
    texts = [m.sender, *(r.address for r in m.recipient_options),
             *(r.orcpt or "" for r in m.recipient_options)]
    return not all(t.isascii() for t in texts)


def _address_type(address: str, intl: bool) -> str:
    """``rfc822; a@b`` or, for a non-ASCII address, RFC 6533's ``utf-8; ...``
    (raw UTF-8 in a global report; utf-8-addr-xtext in a plain one)."""
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {address if intl else _utf8_xtext(address)}"


def _utf8_xtext(text: str) -> str:
    """RFC 6533 3 utf-8-addr-xtext: what is not a printable ASCII character
    other than "+", "=", "\\" becomes ``\\x{HEX}``."""
    return "".join(ch if 0x21 <= ord(ch) <= 0x7E and ch not in "+=\\"
                   else "\\x{%X}" % ord(ch) for ch in text)


def _status_of(rr: RecipientResult, result: Result, action: str) -> Tuple[str, Optional[Reply]]:
    """(Status, the reply that decided it, if a server said it)."""
    if action in ("relayed", "delivered"):
        return "2.0.0", rr.reply if rr.reply is not None else result.reply
    reply = rr.reply if rr.reply is not None and rr.reply.code >= 400 else None
    if (reply is None and not rr.enhanced and result.reply is not None
            and result.reply.code >= 400):
        reply = result.reply                  # its own local code comes first
    if reply is not None:
        digit = str(reply.code // 100)
        if reply.enhanced[:1] == digit:
            return reply.enhanced, reply
        return f"{digit}.0.0", reply
    code = rr.enhanced or result.enhanced
    if not code:
        code = "5.0.0" if rr.status == "permfail" else "4.0.0"
    return code, None


def _clean(text: str, intl: bool) -> str:
    """One line of field text, at most 900 characters: controls as spaces;
    non-ASCII as "?" unless the report is a global one."""
    text = " ".join(text.split())[:900]
    return text if intl else text.encode("ascii", "replace").decode("ascii")


def _diagnostic(reply: Reply) -> str:
    """``smtp; 550 5.1.1 text``, a multi-line reply's lines joined."""
    return "smtp; " + " ".join(f"{reply.code} {line}" if i == 0 else line
                               for i, line in enumerate(reply.text.split("\n")))


# -- the parts -----------------------------------------------------------------


def _message_block(policy: Any, reporting_mta: str, received_from: Optional[str],
                   envelope: Message, arrival: datetime.datetime) -> _Block:
    b = _Block(policy=policy)
    b["Reporting-MTA"] = f"dns; {reporting_mta}"
    if envelope.envid is not None:
        b["Original-Envelope-Id"] = envelope.envid
    if received_from:
        b["Received-From-MTA"] = f"dns; {received_from}"
    b["Arrival-Date"] = email.utils.format_datetime(arrival)
    return b


def _recipient_block(policy: Any, rr: RecipientResult, opt: Recipient, action: str,
                     result: Result, attempted: datetime.datetime,
                     retry_until: Optional[datetime.datetime], intl: bool) -> _Block:
    status, reply = _status_of(rr, result, action)
    b = _Block(policy=policy)
    if opt.orcpt is not None:
        b["Original-Recipient"] = _address_type(opt.orcpt, intl)
    b["Final-Recipient"] = _address_type(rr.address, intl)
    b["Action"] = action
    b["Status"] = status
    if rr.mx:
        b["Remote-MTA"] = f"dns; {rr.mx}"
    if reply is not None:
        b["Diagnostic-Code"] = _clean(_diagnostic(reply), intl)
    elif result.reason and action in ("failed", "delayed"):
        b["Diagnostic-Code"] = _clean(f"X-smtpstate; {result.reason}", intl)
    b["Last-Attempt-Date"] = email.utils.format_datetime(attempted)
    if action == "delayed" and retry_until is not None:
        b["Will-Retry-Until"] = email.utils.format_datetime(retry_until)
    return b


def _human(reported: Sequence[Tuple[RecipientResult, Recipient, str]], reporting_mta: str,
           envelope: Message, result: Result) -> str:
    """The human-readable part: what happened, recipient by recipient."""
    lines = [f"This is the mail system at host {reporting_mta}.", ""]
    for action in ("failed", "delayed", "relayed", "delivered"):
        these = [(rr, opt) for rr, opt, a in reported if a == action]
        if not these:
            continue
        lines.append(f"Your message {_EXPLAIN[action]}")
        lines.append("")
        for rr, _ in these:
            status, reply = _status_of(rr, result, action)
            why = (" ".join(_without_prefix(reply).split("\n")) if reply is not None
                   else result.reason or "")
            where = f" (host {rr.mx})" if rr.mx else ""
            lines.append(f"<{rr.address}>{where}: {status} {why}".rstrip())
        lines.append("")
    return "\n".join(lines)


def _content(original: Any, envelope: Message) -> Optional[Any]:
    """The content to return: bytes or an email message; None when only a
    stream (not in memory) is known."""
    if original is None or isinstance(original, Message):
        data = envelope.data
        return data if isinstance(data, bytes) else None
    if isinstance(original, (bytes, bytearray, memoryview)):
        return bytes(original)
    if isinstance(original, email.message.Message):
        return original
    raise InvalidMessageError(
        "original must be a Message, bytes or an email.message.Message, not "
        f"{type(original).__name__}")


def _returned(content: Any, ret: str, policy: Any, intl: bool) -> Optional[EmailMessage]:
    """The third part: the headers (text/rfc822-headers, message/global-
    headers) or the whole message (message/rfc822, message/global)."""
    if content is None:
        if ret == "FULL":
            raise InvalidMessageError(
                "RET=FULL: the original content is not in memory (a stream); pass it "
                "as original")
        return None
    part = EmailMessage(policy=policy)
    if ret == "FULL":
        parsed = (email.message_from_bytes(content, policy=policy)
                  if isinstance(content, bytes) else content)
        part.set_content(parsed, subtype="global" if intl else "rfc822",
                         cte="8bit" if intl else None)
        return part
    head = _header_section(content)
    if intl:
        part.set_content(email.message_from_bytes(head, policy=policy),
                         subtype="global-headers", cte="8bit")
    else:
        part.set_content(head.decode("ascii", "replace").replace("\r\n", "\n"),
                         subtype="rfc822-headers")
    return part


def _header_section(content: Any) -> bytes:
    """The content's header section, up to its empty line (included)."""
    raw = content if isinstance(content, bytes) else content.as_bytes(
        policy=email.policy.compat32.clone(linesep="\r\n"))
    raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    end = raw.find(b"\n\n")
    head = raw if end < 0 else raw[:end + 1]
    return head.replace(b"\n", b"\r\n") + b"\r\n"
