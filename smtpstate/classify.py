"""Bounce classification: which kind of failure a reply (or a result) is.

Rule: the decision is made in C (``csrc/classify.c``), once, for every
driver: each failed :class:`~smtpstate.Result` and each failed recipient
carries a :class:`BounceClass` in ``bounce_class``. This module names the
classes, classifies any reply on demand, and lets users add classes and
rules of their own (process-wide, tried before the built-in ones).

The classes are the taxonomy bulk senders have long used::

     1 undetermined            50 mail block
    10 invalid recipient       51 spam block
    20 soft bounce             52 spam content
    21 DNS failure             53 prohibited attachment
    22 mailbox full            54 relaying denied
    23 too large               60 auto-reply
    24 timeout                 70 transient failure
    25 admin failure           80 subscribe
    30 generic bounce: no RCPT 90 unsubscribe
    40 generic bounce         100 challenge-response

The enhanced status code decides first when it is specific (5.1.1 is an
invalid recipient), then the reply text ("Relay access denied"), then a
vague enhanced code, then the reply code. A 4xx reply never gets a hard
class: an invalid recipient or generic bounce becomes a soft bounce.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

from smtpstate._ffi import check, ffi, lib
from smtpstate.errors import InvalidOptionError

__all__ = [
    "BounceClass",
    "add_rule",
    "bounce_class",
    "classify",
    "classify_failure",
    "register_class",
    "reset",
    "BUILTIN_CLASSES",
]


@dataclass(frozen=True)
class BounceClass:
    """One bounce class.

    Attributes:
        code: its number (10 for "invalid recipient").
        name: its name, in words.
    """

    code: int
    name: str

    def __int__(self) -> int:
        return self.code

    def __str__(self) -> str:
        return f"{self.name} ({self.code})"


_lock = threading.Lock()
_cache: Dict[int, BounceClass] = {}


def bounce_class(code: int) -> BounceClass:
    """The class with this code (built-in or registered).

    Raises:
        KeyError: no class has that code.
    """
    hit = _cache.get(code)
    if hit is not None:
        return hit
    if isinstance(code, bool) or not isinstance(code, int) or not 0 < code < 2**31:
        raise KeyError(f"no bounce class {code!r}")
    buf = ffi.new("char[]", lib.SMTPS_BOUNCE_NAME_MAX + 1)
    if lib.smtps_bounce_class_name(code, buf, len(buf)) != lib.SMTPS_OK:
        raise KeyError(f"no bounce class {code!r}")
    bc = BounceClass(code, ffi.string(buf).decode("ascii", "replace"))
    with _lock:
        _cache[code] = bc
    return bc


def _class_exists(code: int) -> bool:
    """True when C knows a class with this code (built-in or registered)."""
    buf = ffi.new("char[]", lib.SMTPS_BOUNCE_NAME_MAX + 1)
    return bool(lib.smtps_bounce_class_name(code, buf, len(buf)) == lib.SMTPS_OK)


def _of(code: int) -> Optional[BounceClass]:
    """The class for a C ``bounce_class`` field: None for 0 (not a failure)."""
    if code <= 0:
        return None
    try:
        return bounce_class(code)
    except KeyError:                       # a class reset away since
        return BounceClass(code, "unknown")


# The built-in classes, from the C names (enum smtps_bounce_class).
UNDETERMINED = bounce_class(lib.SMTPS_BOUNCE_UNDETERMINED)
INVALID_RECIPIENT = bounce_class(lib.SMTPS_BOUNCE_INVALID_RECIPIENT)
SOFT_BOUNCE = bounce_class(lib.SMTPS_BOUNCE_SOFT_BOUNCE)
DNS_FAILURE = bounce_class(lib.SMTPS_BOUNCE_DNS_FAILURE)
MAILBOX_FULL = bounce_class(lib.SMTPS_BOUNCE_MAILBOX_FULL)
TOO_LARGE = bounce_class(lib.SMTPS_BOUNCE_TOO_LARGE)
TIMEOUT = bounce_class(lib.SMTPS_BOUNCE_TIMEOUT)
ADMIN_FAILURE = bounce_class(lib.SMTPS_BOUNCE_ADMIN_FAILURE)
NO_RCPT = bounce_class(lib.SMTPS_BOUNCE_NO_RCPT)
GENERIC_BOUNCE = bounce_class(lib.SMTPS_BOUNCE_GENERIC_BOUNCE)
MAIL_BLOCK = bounce_class(lib.SMTPS_BOUNCE_MAIL_BLOCK)
SPAM_BLOCK = bounce_class(lib.SMTPS_BOUNCE_SPAM_BLOCK)
SPAM_CONTENT = bounce_class(lib.SMTPS_BOUNCE_SPAM_CONTENT)
PROHIBITED_ATTACHMENT = bounce_class(lib.SMTPS_BOUNCE_PROHIBITED_ATTACHMENT)
RELAYING_DENIED = bounce_class(lib.SMTPS_BOUNCE_RELAYING_DENIED)
AUTO_REPLY = bounce_class(lib.SMTPS_BOUNCE_AUTO_REPLY)
TRANSIENT_FAILURE = bounce_class(lib.SMTPS_BOUNCE_TRANSIENT_FAILURE)
SUBSCRIBE = bounce_class(lib.SMTPS_BOUNCE_SUBSCRIBE)
UNSUBSCRIBE = bounce_class(lib.SMTPS_BOUNCE_UNSUBSCRIBE)
CHALLENGE_RESPONSE = bounce_class(lib.SMTPS_BOUNCE_CHALLENGE_RESPONSE)

BUILTIN_CLASSES: Dict[str, BounceClass] = {
    name: globals()[name] for name in (
        "UNDETERMINED", "INVALID_RECIPIENT", "SOFT_BOUNCE", "DNS_FAILURE", "MAILBOX_FULL",
        "TOO_LARGE", "TIMEOUT", "ADMIN_FAILURE", "NO_RCPT", "GENERIC_BOUNCE", "MAIL_BLOCK",
        "SPAM_BLOCK", "SPAM_CONTENT", "PROHIBITED_ATTACHMENT", "RELAYING_DENIED",
        "AUTO_REPLY", "TRANSIENT_FAILURE", "SUBSCRIBE", "UNSUBSCRIBE",
        "CHALLENGE_RESPONSE",
    )
}
"""The built-in classes by constant name: ``BUILTIN_CLASSES["MAILBOX_FULL"]``."""

__all__ += list(BUILTIN_CLASSES)

_REPLY_LINE = re.compile(r"^([2-5][0-9][0-9])(?:[ -]|$)(.*)$")
_ENHANCED = re.compile(r"^([245]\.[0-9]{1,3}\.[0-9]{1,3})(?:\s+|$)(.*)$", re.S)


def _parse(text: str) -> "tuple[int, str, str]":
    """``"550-5.1.1 a\\n550 5.1.1 b"`` into (550, "5.1.1", "a\\nb")."""
    code, enhanced, lines = 0, "", []
    for raw in text.replace("\r\n", "\n").split("\n"):
        m = _REPLY_LINE.match(raw)
        if not m:
            if raw:
                lines.append(raw)
            continue
        code = code or int(m.group(1))
        rest = m.group(2)
        e = _ENHANCED.match(rest)
        if e:
            enhanced = enhanced or e.group(1)
            rest = e.group(2)
        lines.append(rest)
    if code == 0:
        raise ValueError(f"not an SMTP reply (no 3-digit code): {text[:80]!r}")
    return code, enhanced, "\n".join(lines)


def classify(reply: Any = None, *, code: Optional[int] = None, enhanced: str = "",
             text: str = "") -> Optional[BounceClass]:
    """The bounce class of a failure reply.

    Args:
        reply: a :class:`~smtpstate.Reply`, or the reply as a server wrote
            it (``"550 5.1.1 <bob@example.net>: User unknown"``, one or
            more lines); or None and the keywords.
        code, enhanced, text: the reply's parts, when not given as ``reply``.

    Returns:
        The :class:`BounceClass`, or None for a reply that is no failure
        (a code below 400).

    Raises:
        ValueError: a string that is not an SMTP reply, or no code at all.
    """
    if reply is not None:
        if isinstance(reply, str):
            code, enhanced, text = _parse(reply)
        else:
            code, enhanced, text = reply.code, reply.enhanced, reply.text
    if code is None:
        raise ValueError("classify() needs a reply or a code")
    if isinstance(code, bool) or not isinstance(code, int):
        raise ValueError(f"code must be an int, not {code!r}")
    raw = text.encode("utf-8", "replace")
    cls = lib.smtps_bounce_classify(code, (enhanced or "").encode("ascii", "replace"),
                                    raw, len(raw))
    return _of(int(cls))


_STATUS = {"delivered": lib.SMTPS_STATUS_DELIVERED, "tempfail": lib.SMTPS_STATUS_TEMPFAIL,
           "permfail": lib.SMTPS_STATUS_PERMFAIL, "unknown": lib.SMTPS_STATUS_UNKNOWN}


def classify_failure(status: str, reply: Any = None, reason: str = "") -> Optional[BounceClass]:
    """The class of an outcome: ``status`` (``"tempfail"``...), the deciding
    reply if any, else the reason in words (``"timeout: no reply in state
    RCPT"``), as C classifies results. None for ``"delivered"``."""
    if status == "delivered":
        return None
    if reply is not None and reply.code >= 400:
        return classify(reply)
    st = _STATUS.get(status, lib.SMTPS_STATUS_TEMPFAIL)
    return _of(int(lib.smtps_bounce_classify_reason(st, reason.encode("utf-8", "replace"))))


def register_class(code: int, name: str) -> BounceClass:
    """Add a class of your own (process-wide).

    Args:
        code: 1-999, not one of the built-in codes.
        name: 1-63 printable ASCII characters.

    Registering the same code with the same name again is harmless.

    Raises:
        InvalidOptionError (a ValueError): a bad or taken code, a bad name.
    """
    if isinstance(code, bool) or not isinstance(code, int):
        raise InvalidOptionError(f"a bounce class code is an int, not {code!r}")
    if not isinstance(name, str) or not name.isascii():
        raise InvalidOptionError(f"a bounce class name is an ASCII str, not {name!r}")
    if not 1 <= code <= lib.SMTPS_BOUNCE_CLASS_MAX:
        raise InvalidOptionError(f"bounce class codes are 1-{lib.SMTPS_BOUNCE_CLASS_MAX}")
    if any(c.code == code for c in BUILTIN_CLASSES.values()):
        raise InvalidOptionError(f"{code} is the built-in class {bounce_class(code)}")
    rc = lib.smtps_bounce_register_class(code, name.encode("ascii"))
    if rc == lib.SMTPS_EINVAL and _class_exists(code):
        raise InvalidOptionError(f"bounce class {code} is taken: {bounce_class(code)}")
    check(rc, f"register bounce class {code} {name!r}")
    return bounce_class(code)


def add_rule(cls: Union[BounceClass, int], *, code: int = 0, enhanced: Optional[str] = None,
             text: Optional[str] = None) -> None:
    """Add a rule: a reply matching every condition given gets ``cls``.

    Rules are tried in the order added, before the built-in ones, by every
    driver, from now on (process-wide).

    Args:
        cls: the :class:`BounceClass` (or its code) to give.
        code: 0 (any), a first digit (4 or 5) or an exact reply code (554).
        enhanced: an enhanced status code, each part a number or ``*``:
            ``"5.7.1"``, ``"5.7.*"``, ``"*.1.1"``.
        text: a substring of the reply text, ASCII case-insensitive. A rule
            with text only also judges failures without a reply, by their
            reason (``text="cannot resolve"``).

    Raises:
        InvalidOptionError (a ValueError): no condition, an unknown class,
            a bad code or pattern.
    """
    number = cls.code if isinstance(cls, BounceClass) else cls
    if isinstance(number, bool) or not isinstance(number, int):
        raise InvalidOptionError(f"not a bounce class: {cls!r}")
    try:
        bounce_class(number)
    except KeyError:
        raise InvalidOptionError(
            f"no bounce class {number}: register_class() it first") from None
    if code == 0 and enhanced is None and text is None:
        raise InvalidOptionError("a rule needs a code, an enhanced code or a text")
    if text is not None and (not isinstance(text, str) or not text.isascii() or not text):
        raise InvalidOptionError(f"rule text must be a non-empty ASCII str, not {text!r}")
    rule = ffi.new("struct smtps_bounce_rule *")
    rule.sizeof_bounce_rule = ffi.sizeof("struct smtps_bounce_rule")
    rule.bounce_class = number
    rule.code = code
    keep = []
    if enhanced is not None:
        keep.append(ffi.new("char[]", str(enhanced).encode("ascii", "replace")))
        rule.enhanced = keep[-1]
    if text is not None:
        keep.append(ffi.new("char[]", text.encode("ascii")))
        rule.text = keep[-1]
    rc = lib.smtps_bounce_add_rule(rule)
    if rc == lib.SMTPS_EINVAL:
        raise InvalidOptionError(
            f"bad rule: code {code!r} (0, 2-5 or 200-599), enhanced {enhanced!r} "
            "(like '5.7.1' or '5.*.*')")
    check(rc, "add a bounce rule")


def reset() -> None:
    """Forget every class registered and every rule added (tests use it)."""
    lib.smtps_bounce_reset()
    with _lock:
        for code in [c for c in _cache if c not in {b.code for b in BUILTIN_CLASSES.values()}]:
            del _cache[code]
