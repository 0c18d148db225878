"""A message to send: envelope, DSN options and content, validated when it
is made, so that nothing unsafe can reach a command line later.

Rule: every check that protects the wire lives in C too (``message.c``);
the checks here exist to fail early with a message that says what to fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence, Tuple, Union

from smtpstate._ffi import check, ffi, lib
from smtpstate.errors import InvalidMessageError

__all__ = ["Message", "Recipient", "NOTIFY_VALUES"]

NOTIFY_VALUES = {
    "NEVER": lib.SMTPS_NOTIFY_NEVER,
    "SUCCESS": lib.SMTPS_NOTIFY_SUCCESS,
    "FAILURE": lib.SMTPS_NOTIFY_FAILURE,
    "DELAY": lib.SMTPS_NOTIFY_DELAY,
}
_RET_VALUES = {None: lib.SMTPS_DSN_RET_NONE, "FULL": lib.SMTPS_DSN_RET_FULL,
               "HDRS": lib.SMTPS_DSN_RET_HDRS}


def _check_text(what: str, value: Any, *, allow_empty: bool = False,
                ascii_only: bool = False, limit: int = 1024) -> str:
    if not isinstance(value, str):
        raise InvalidMessageError(f"{what} must be a str, not {type(value).__name__}")
    if not value and not allow_empty:
        raise InvalidMessageError(f"{what} is empty")
    for ch in value:
        o = ord(ch)
        if o < 0x20 or o == 0x7F or 0x80 <= o < 0xA0:
            raise InvalidMessageError(
                f"{what} {value!r} contains the control character {ch!r}; "
                "CR, LF, NUL and other controls can never be sent")
        if ch in "<>":
            raise InvalidMessageError(
                f"{what} {value!r} contains {ch!r}; give the bare address, "
                "without angle brackets")
        if ascii_only and o > 0x7E:
            raise InvalidMessageError(f"{what} {value!r} must be ASCII")
    if len(value.encode("utf-8")) > limit:
        raise InvalidMessageError(f"{what} is longer than {limit} bytes")
    return value


@dataclass(frozen=True)
class Recipient:
    """A recipient with RFC 3461 DSN options.

    Args:
        address: the forward-path, without angle brackets.
        notify: any of "SUCCESS", "FAILURE", "DELAY", or just "NEVER".
        orcpt: the original recipient, sent as ``ORCPT=rfc822;...``.
    """

    address: str
    notify: Tuple[str, ...] = ()
    orcpt: Optional[str] = None

    def __post_init__(self) -> None:
        _check_text("recipient address", self.address)
        notify = tuple(n.upper() for n in self.notify)
        object.__setattr__(self, "notify", notify)
        for n in notify:
            if n not in NOTIFY_VALUES:
                raise InvalidMessageError(
                    f"NOTIFY value {n!r} is not one of {sorted(NOTIFY_VALUES)}")
        if "NEVER" in notify and len(notify) > 1:
            raise InvalidMessageError("NOTIFY=NEVER cannot be combined with others")
        if self.orcpt is not None:
            _check_text("ORCPT", self.orcpt)


@dataclass(frozen=True)
class Message:
    """One message: who from, who to, and the content.

    Args:
        sender: the reverse-path without angle brackets; "" for a bounce.
        recipients: addresses (str) or :class:`Recipient` objects, at least one.
        data: the content, headers and body, as bytes (or a str, encoded as
            UTF-8). Line endings may be LF, CR or CRLF; they are sent as CRLF,
            and leading dots are escaped on the wire.
        dsn_ret: "FULL" or "HDRS" (RFC 3461 RET), sent when the server offers DSN.
        envid: RFC 3461 ENVID, sent when the server offers DSN.

    Raises:
        InvalidMessageError (a ValueError): a control character, angle bracket,
            empty or over-long address, no recipients, bad DSN value.
    """

    sender: str
    recipients: Sequence[Union[str, Recipient]]
    data: Union[bytes, str]
    dsn_ret: Optional[str] = None
    envid: Optional[str] = None
    _rcpts: Tuple[Recipient, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_text("sender", self.sender, allow_empty=True)
        if isinstance(self.recipients, (str, bytes)):
            raise InvalidMessageError(
                "recipients must be a list of addresses, not a single string")
        rcpts = tuple(r if isinstance(r, Recipient) else Recipient(r)
                      for r in self.recipients)
        if not rcpts:
            raise InvalidMessageError("a message needs at least one recipient")
        if len(rcpts) > lib.SMTPS_MAX_RECIPIENTS:
            raise InvalidMessageError(
                f"more than {lib.SMTPS_MAX_RECIPIENTS} recipients; split the message")
        object.__setattr__(self, "_rcpts", rcpts)
        object.__setattr__(self, "recipients", tuple(r.address for r in rcpts))
        if isinstance(self.data, str):
            object.__setattr__(self, "data", self.data.encode("utf-8"))
        elif isinstance(self.data, (bytearray, memoryview)):
            object.__setattr__(self, "data", bytes(self.data))
        elif not isinstance(self.data, bytes):
            raise InvalidMessageError(
                f"data must be bytes or str, not {type(self.data).__name__}")
        ret = self.dsn_ret.upper() if isinstance(self.dsn_ret, str) else self.dsn_ret
        if ret not in _RET_VALUES:
            raise InvalidMessageError("dsn_ret must be 'FULL', 'HDRS' or None")
        object.__setattr__(self, "dsn_ret", ret)
        if self.envid is not None:
            _check_text("ENVID", self.envid, ascii_only=True, limit=100)

    @property
    def recipient_options(self) -> Tuple[Recipient, ...]:
        """The recipients with their DSN options."""
        return self._rcpts

    def _to_c(self) -> Any:
        """A new C message owned by a ffi.gc destructor (detach it on submit)."""
        m = ffi.gc(lib.smtps_message_new(), lib.smtps_message_free)
        if m == ffi.NULL:
            raise MemoryError("cannot allocate a message")
        sender = self.sender.encode("utf-8")
        check(lib.smtps_message_set_sender(m, sender, len(sender)), "sender")
        for r in self._rcpts:
            addr = r.address.encode("utf-8")
            notify = 0
            for n in r.notify:
                notify |= NOTIFY_VALUES[n]
            orcpt = r.orcpt.encode("utf-8") if r.orcpt is not None else ffi.NULL
            check(lib.smtps_message_add_recipient(
                m, addr, len(addr), notify, orcpt,
                len(orcpt) if r.orcpt is not None else 0), f"recipient {r.address!r}")
        assert isinstance(self.data, bytes)
        check(lib.smtps_message_set_body(m, self.data, len(self.data)), "data")
        envid = self.envid.encode("ascii") if self.envid is not None else ffi.NULL
        check(lib.smtps_message_set_dsn(m, _RET_VALUES[self.dsn_ret], envid,
                                        len(envid) if self.envid is not None else 0),
              "DSN options")
        return m


def as_messages(items: Iterable[Message]) -> Tuple[Message, ...]:
    """Check that every item is a Message (for batch APIs)."""
    out = tuple(items)
    for m in out:
        if not isinstance(m, Message):
            raise TypeError(f"expected Message, got {type(m).__name__}")
    return out
