"""A message to send: envelope, DSN options and content, validated when it
is made, so that nothing unsafe can reach a command line later.

Rule: every check that protects the wire lives in C too (``message.c``);
the checks here exist to fail early with a message that says what to fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Iterable, Optional, Sequence, Tuple, Union

from smtpstate._ffi import check, ffi, lib
from smtpstate.body import BufferBody, FileBody, check_bytes, make_body, scan_flags
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
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidMessageError(
            f"{what} {value!r} is not valid Unicode (a lone surrogate?)") from None
    # One compiled scan finds the first character that is not allowed
    # (the common case: none); only then is it told apart, in the order
    # the checks are documented in: a control, an angle bracket, non-ASCII.
    bad = (_NOT_ASCII_TEXT if ascii_only else _NOT_TEXT).search(value)
    if bad is not None:
        ch = bad.group()
        o = ord(ch)
        if o < 0x20 or o == 0x7F or 0x80 <= o < 0xA0:
            raise InvalidMessageError(
                f"{what} {value!r} contains the control character {ch!r}; "
                "CR, LF, NUL and other controls can never be sent")
        if ch in "<>":
            raise InvalidMessageError(
                f"{what} {value!r} contains {ch!r}; give the bare address, "
                "without angle brackets")
        raise InvalidMessageError(f"{what} {value!r} must be ASCII")
    if size > limit:
        raise InvalidMessageError(f"{what} is longer than {limit} bytes")
    return value


# What _check_text() refuses: C0 and C1 controls, DEL, angle brackets; and,
# where only ASCII goes, everything above "~" too.
_NOT_TEXT = re.compile("[\x00-\x1f\x7f-\x9f<>]")
_NOT_ASCII_TEXT = re.compile("[^\x20-\x7e]|[<>]")
# Message's fast path: one C call says whether a sender, recipients and a
# bytes body are certainly fine (the C function, not a Python wrapper).
_check_plain = lib.smtps_message_check_plain


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

    @classmethod
    def from_smtp(cls, address: str, params: Iterable[str] = ()) -> "Recipient":
        """A recipient as an SMTP server received it: its address and the
        parameters of its ``RCPT TO`` as written there (``"NOTIFY=FAILURE,DELAY"``,
        ``"ORCPT=rfc822;bob+2Bx@example.net"``: what aiosmtpd's
        ``handle_RCPT`` gets as ``rcpt_options``), so that a relay passes
        them on (RFC 3461 says it must).

        ORCPT is decoded (xtext, or RFC 6533's utf-8-addr-xtext and
        -unitext for the ``utf-8`` type) and sent again encoded for its
        address: ``rfc822`` when ASCII, else ``utf-8``.

        Raises:
            InvalidMessageError (a ValueError): a parameter other than NOTIFY
                and ORCPT (it says which are supported), one given twice,
                an ORCPT of another address type or badly encoded, a bad
                NOTIFY value.
        """
        values = _params("RCPT", params, _RCPT_PARAMS)
        notify: Tuple[str, ...] = ()
        if "NOTIFY" in values:
            notify = tuple(v for v in (values["NOTIFY"] or "").split(",") if v)
            if not notify:
                raise InvalidMessageError("RCPT parameter NOTIFY needs a value")
        orcpt = _decode_orcpt(values["ORCPT"]) if "ORCPT" in values else None
        return cls(address, notify=notify, orcpt=orcpt)

    def __post_init__(self) -> None:
        _check_text("recipient address", self.address)
        if isinstance(self.notify, (str, bytes)) or not isinstance(self.notify, (tuple, list)):
            raise InvalidMessageError(
                f"notify must be a tuple of NOTIFY values such as ('FAILURE',), "
                f"not {self.notify!r}")
        if not all(isinstance(n, str) for n in self.notify):
            raise InvalidMessageError(f"NOTIFY values must be str, not {self.notify!r}")
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


@dataclass(frozen=True, init=False)
class Message:
    """One message: who from, who to, and the content.

    Args:
        sender: the reverse-path without angle brackets; "" for a bounce.
        recipients: addresses (str) or :class:`Recipient` objects, at least one.
        data: the content, headers and body: bytes (or a str, encoded as
            UTF-8); or, so that a large message is never copied whole into
            memory, a buffer (``memoryview``, ``mmap``: referenced, not
            copied; keep it unchanged until the result is out), a binary
            file (read as it is sent, from where it stands now; it may be
            sent many times) or an iterable of bytes pieces (read as it is
            sent, once). Line endings may be LF, CR or CRLF, split anywhere
            between pieces; they are sent as CRLF, and leading dots are
            escaped on the wire.
        dsn_ret: "FULL" or "HDRS" (RFC 3461 RET), sent when the server offers DSN.
        envid: RFC 3461 ENVID, sent when the server offers DSN.
        long_lines: "refuse" (the default) or "allow". RFC 5322 2.1.1 limits
            a line to 998 octets; a server on the way may fold, cut or
            refuse a longer one, so the message that arrives would differ
            from the one sent. "allow" sends such lines as they are.
        require_tls: REQUIRETLS (RFC 8689). True: the message goes only to
            a server that offers REQUIRETLS over TLS that authenticated it
            (a verified certificate, or DANE), with ``REQUIRETLS`` on its
            MAIL FROM; any other server gets no MAIL for it, and every
            recipient fails for good (``permfail``, the reason beginning
            "5.7.30 REQUIRETLS support required" and saying what was
            missing). It cannot be combined with a ``TLS-Required:``
            header field (RFC 8689 4.1), which asks for the opposite.
        smtputf8: True to send SMTPUTF8 (RFC 6531) on MAIL FROM even when
            every address is ASCII, as a relay must when it received the
            message with it (its header fields may be UTF-8); a server
            without SMTPUTF8 then gets no MAIL for it and it fails for good
            (5.6.7), as a message with a non-ASCII address does. A
            non-ASCII address asks for SMTPUTF8 by itself.

    A body is checked when the Message is made: a NUL byte (which a lenient
    server may drop, reading what follows as the end of the data), or a
    line over 998 octets unless allowed, is an InvalidMessageError naming
    the line. An iterable can only be checked as it is sent: a bad piece
    then fails that message (``permfail``) before its final dot, so that
    nothing is delivered.

    Raises:
        InvalidMessageError (a ValueError): a control character, angle bracket,
            empty or over-long address, no recipients, bad DSN value, a body
            of the wrong kind, with a NUL byte or an overlong line;
            ``require_tls`` not a bool, or True for content with a
            ``TLS-Required:`` header field (bytes, buffers and files are
            looked at; a stream cannot be before it is sent).
    """

    sender: str
    recipients: Sequence[Union[str, Recipient]]
    data: Union[bytes, str]
    dsn_ret: Optional[str] = None
    envid: Optional[str] = None
    long_lines: str = "refuse"
    require_tls: bool = False
    smtputf8: bool = False
    # None while every recipient is a plain address (recipient_options
    # makes their Recipient objects when asked).
    _rcpts: Optional[Tuple[Recipient, ...]] = field(default=None, init=False, repr=False,
                                                    compare=False)
    # The C envelope, made by the first _envelope() call and then kept in
    # the instance (a class default of None until then; not a field).
    _c_envelope: ClassVar[Any] = None
    # The bytes body as C sees it (ffi.from_buffer of data), kept with the
    # envelope that points into it; not a field.
    _c_body: ClassVar[Any] = None
    # A body that is not bytes (smtpstate.body: a buffer, file or stream),
    # set in the instance when there is one; not a field.
    _body: ClassVar[Any] = None
    # A message that took the fast path of __init__: (sender, recipients
    # joined by LF, their count), encoded as C checked them, so that
    # Engine.submit() hands them to C in the submit call itself
    # (smtps_engine_submit_plain) instead of making an envelope first, the
    # first time (it sets this back to None); in the instance; not a field.
    _plain: ClassVar[Any] = None

    def __init__(self, sender: str, recipients: Sequence[Union[str, Recipient]],
                 data: Union[bytes, str], dsn_ret: Optional[str] = None,
                 envid: Optional[str] = None, long_lines: str = "refuse",
                 require_tls: bool = False, smtputf8: bool = False) -> None:
        # The fast path. A Message is made once per send, and the frozen
        # dataclass's way (an object.__setattr__ per field, then the checks
        # of __post_init__ one by one) cost more than the Engine's own
        # Python per message. The usual message (a bytes body, plain ASCII
        # addresses, every option left as it is) is checked in one C call,
        # and only the fields that differ from their class defaults are
        # stored.
        #
        # It must accept nothing that __post_init__ refuses: C says only
        # "certainly fine" (printable ASCII without angle brackets, 1024
        # bytes at most, a recipient not empty; no NUL byte, no line over
        # 998 octets), and whatever it is not sure of, good or bad, goes
        # the general way, which makes every check and words every error
        # (tests/test_message_fast.py gives both ways the same inputs).
        if (type(data) is bytes and dsn_ret is None and envid is None
                and require_tls is False and smtputf8 is False
                and type(long_lines) is str and long_lines == "refuse"
                and type(self) is Message and type(sender) is str
                and (type(recipients) is list or type(recipients) is tuple)):
            # A tuple first: what is checked is what is kept, even if
            # another thread changes the list while C checks (the GIL is
            # released then).
            rcpts = tuple(recipients)
            try:
                # LF joins them (no plain address has one; C counts them).
                joined = "\n".join(rcpts).encode()
                encoded = sender.encode()
            except (TypeError, UnicodeEncodeError):
                pass                                   # not all str; a lone surrogate
            else:
                if _check_plain(encoded, len(encoded), joined, len(joined), len(rcpts),
                                data, len(data)):
                    fields = self.__dict__             # not __setattr__: frozen
                    fields["sender"] = sender
                    fields["recipients"] = rcpts
                    fields["data"] = data
                    fields["_plain"] = (encoded, joined, len(rcpts))
                    return
        # The general way: the fields as given, then every check.
        setattr_ = object.__setattr__
        setattr_(self, "sender", sender)
        setattr_(self, "recipients", recipients)
        setattr_(self, "data", data)
        setattr_(self, "dsn_ret", dsn_ret)
        setattr_(self, "envid", envid)
        setattr_(self, "long_lines", long_lines)
        setattr_(self, "require_tls", require_tls)
        setattr_(self, "smtputf8", smtputf8)
        self.__post_init__()

    def __post_init__(self) -> None:
        """Every check of a Message, and the fields made canonical (a tuple
        of addresses, bytes data, RET upper case). The general way for
        :meth:`__init__`, and what a dataclass subclass's own ``__init__``
        calls."""
        _check_text("sender", self.sender, allow_empty=True)
        if isinstance(self.recipients, (str, bytes)):
            raise InvalidMessageError(
                "recipients must be a list of addresses, not a single string")
        try:
            items = tuple(self.recipients)
        except TypeError:
            raise InvalidMessageError(
                f"recipients must be a list of addresses, not "
                f"{type(self.recipients).__name__}") from None
        if not items:
            raise InvalidMessageError("a message needs at least one recipient")
        if len(items) > lib.SMTPS_MAX_RECIPIENTS:
            raise InvalidMessageError(
                f"more than {lib.SMTPS_MAX_RECIPIENTS} recipients; split the message")
        # Plain addresses (the usual case) are checked as Recipient would
        # check them, and Recipient objects are made only if asked for
        # (recipient_options): a message is built once per send.
        if all(type(r) is str for r in items):
            for address in items:
                _check_text("recipient address", address)
            object.__setattr__(self, "_rcpts", None)
            object.__setattr__(self, "recipients", items)
        else:
            rcpts = tuple(r if isinstance(r, Recipient) else Recipient(r) for r in items)
            object.__setattr__(self, "_rcpts", rcpts)
            object.__setattr__(self, "recipients", tuple(r.address for r in rcpts))
        flags = scan_flags(self.long_lines)
        if isinstance(self.data, str):
            try:
                object.__setattr__(self, "data", self.data.encode("utf-8"))
            except UnicodeEncodeError:
                raise InvalidMessageError(
                    "data is a str that is not valid Unicode (a lone surrogate?); "
                    "give bytes") from None
        elif isinstance(self.data, bytearray):
            object.__setattr__(self, "data", bytes(self.data))   # it could change
        if isinstance(self.data, bytes):
            check_bytes(self.data, flags)
        else:
            object.__setattr__(self, "_body", make_body(self.data, flags))
        ret = self.dsn_ret.upper() if isinstance(self.dsn_ret, str) else self.dsn_ret
        if ret not in _RET_VALUES:
            raise InvalidMessageError("dsn_ret must be 'FULL', 'HDRS' or None")
        object.__setattr__(self, "dsn_ret", ret)
        if self.envid is not None:
            _check_text("ENVID", self.envid, ascii_only=True, limit=100)
        if not isinstance(self.require_tls, bool):
            raise InvalidMessageError(
                f"require_tls must be True or False, not {self.require_tls!r}")
        if not isinstance(self.smtputf8, bool):
            raise InvalidMessageError(
                f"smtputf8 must be True or False, not {self.smtputf8!r}")
        if self.require_tls:
            value = _tls_required_field(self.data if self._body is None else self._body)
            if value is not None:
                raise InvalidMessageError(
                    f"require_tls=True cannot be combined with the message's "
                    f"'TLS-Required: {value}' header field (RFC 8689 4.1): the "
                    "header asks that TLS requirements be relaxed for this "
                    "message, require_tls that they be enforced. Remove the "
                    "header, or send without require_tls")

    @classmethod
    def from_smtp(cls, sender: str, recipients: Sequence[Union[str, Recipient]],
                  data: Any, mail_params: Iterable[str] = (), **kwargs: Any) -> "Message":
        """A message as an SMTP server received it, to pass on as a relay:
        the parameters of its ``MAIL FROM`` as written there (what
        aiosmtpd gives as ``envelope.mail_options``) become the Message's
        options, and the recipients keep theirs (make each with
        :meth:`Recipient.from_smtp` from its ``RCPT TO`` parameters).

        MAIL parameters: ``SMTPUTF8`` (kept: ``smtputf8=True``), ``RET``,
        ``ENVID`` (xtext, decoded; sent encoded again), ``REQUIRETLS``;
        ``BODY=7BIT`` or ``BODY=8BITMIME`` and ``SIZE`` are taken and not
        copied (each hop declares its own, from the content it sends), and
        so is ``AUTH`` (RFC 4954 5: the identity a client gave this hop is
        not ours to vouch for downstream).

        Args:
            sender, recipients, data: as for :class:`Message`.
            mail_params: the MAIL FROM parameters, ``"KEY=value"`` or
                ``"KEY"`` each.
            **kwargs: other Message options (``long_lines``...); the ones
                the parameters set may not be given too.

        Raises:
            InvalidMessageError (a ValueError): a parameter not in that list
                (the error names the supported ones; ``BODY=BINARYMIME``
                too, which this client does not send), one given twice or
                also as a keyword, a bad value.
        """
        values = _params("MAIL", mail_params, _MAIL_PARAMS)
        options: Dict[str, Any] = {}
        if "SMTPUTF8" in values:
            _no_value("SMTPUTF8", values)
            options["smtputf8"] = True
        if "REQUIRETLS" in values:
            _no_value("REQUIRETLS", values)
            options["require_tls"] = True
        if "RET" in values:
            options["dsn_ret"] = (values["RET"] or "").upper()
        if "ENVID" in values:
            options["envid"] = _xtext_decode("ENVID", values["ENVID"] or "")
        body = (values.get("BODY") or "").upper() if "BODY" in values else None
        if body is not None and body not in ("7BIT", "8BITMIME"):
            raise InvalidMessageError(
                f"MAIL parameter BODY={body} is not supported: BODY=7BIT and "
                "BODY=8BITMIME are (BINARYMIME is not sent by this client)")
        if "SIZE" in values and not (values["SIZE"] or "").isdigit():
            raise InvalidMessageError(f"MAIL parameter SIZE={values['SIZE']} is not a number")
        both = sorted(set(options) & set(kwargs))
        if both:
            raise InvalidMessageError(
                f"{', '.join(both)} given both as a MAIL parameter and as a keyword")
        return cls(sender, recipients, data, **options, **kwargs)

    @property
    def recipient_options(self) -> Tuple[Recipient, ...]:
        """The recipients with their DSN options."""
        rcpts = self._rcpts
        if rcpts is None:
            rcpts = tuple(Recipient(a) for a in self.recipients)
            object.__setattr__(self, "_rcpts", rcpts)
        return rcpts

    @classmethod
    def from_email(cls, msg: Any, sender: Optional[str] = None,
                   recipients: Optional[Sequence[Union[str, Recipient]]] = None,
                   *, dsn_ret: Optional[str] = None,
                   envid: Optional[str] = None,
                   require_tls: bool = False) -> "Message":
        """A Message from a standard-library ``email.message.EmailMessage``
        (or ``email.message.Message``), the way ``smtplib.send_message``
        does it.

        The envelope comes from the headers unless given: the sender from
        ``Sender``, else ``From``; the recipients from ``To``, ``Cc`` and
        ``Bcc`` (each address once, in that order). When the message has
        one block of ``Resent-*`` headers (RFC 5322 3.6.6), those are used
        instead. ``Bcc`` and ``Resent-Bcc`` are never sent. The content is
        serialised with CRLF line endings; when an address is not ASCII it
        is serialised for SMTPUTF8 (raw UTF-8 headers), and the session asks
        for SMTPUTF8 and, for 8-bit content, 8BITMIME, as it always does.

        Args:
            msg: the email message. It is not changed.
            sender, recipients: the envelope, overriding the headers.
            dsn_ret, envid, require_tls: as for :class:`Message`.

        Raises:
            InvalidMessageError (a ValueError): more than one ``Resent-``
                block, no sender or recipient found, a bad address.
            TypeError: ``msg`` is not an email message.
        """
        return _from_email(cls, msg, sender, recipients, dsn_ret, envid, require_tls)

    def _encoded(self) -> Tuple[Any, ...]:
        """What _to_c() hands to C, encoded once per message: a message
        sent many times (a benchmark, a mailing) is encoded only once."""
        enc = self.__dict__.get("_c_encoded")
        if enc is None:
            rcpts = []
            if self._rcpts is None:             # plain addresses: no options
                rcpts = [(a.encode("utf-8"), 0, None, f"recipient {a!r}")
                         for a in self.recipients]
            for r in self._rcpts or ():
                notify = 0
                for n in r.notify:
                    notify |= NOTIFY_VALUES[n]
                orcpt = r.orcpt.encode("utf-8") if r.orcpt is not None else None
                rcpts.append((r.address.encode("utf-8"), notify, orcpt,
                              f"recipient {r.address!r}"))
            envid = self.envid.encode("ascii") if self.envid is not None else None
            enc = (self.sender.encode("utf-8"), tuple(rcpts), _RET_VALUES[self.dsn_ret], envid,
                   1 if self.require_tls else 0, 1 if self.smtputf8 else 0)
            object.__setattr__(self, "_c_encoded", enc)   # frozen: not a field
        return enc  # type: ignore[no-any-return]

    def _envelope(self) -> Any:
        """The C message every submission copies (``smtps_message_copy``):
        sender, recipients, DSN options and REQUIRETLS, checked by C once per Message,
        and the body. A bytes body is given by reference as fixed
        (``smtps_message_set_body_fixed``): bytes never change, and the
        Engine keeps the Message (its Ticket) until C is done with every
        copy, so its submissions share ``data`` instead of copying it, and
        the engine sends it from where it is. Drivers that do not keep the
        Message that long (``_to_c()``) copy ``data`` instead.
        Kept in the instance: the fields of a frozen Message never change."""
        env = self._c_envelope
        if env is not None:
            return env
        sender, rcpts, ret, envid, require_tls, smtputf8 = self._encoded()
        m = ffi.gc(lib.smtps_message_new(), lib.smtps_message_free)
        if m == ffi.NULL:
            raise MemoryError("cannot allocate a message")
        if self.long_lines != "refuse":
            check(lib.smtps_message_set_body_options(m, scan_flags(self.long_lines)),
                  "body options")
        body = self._body
        if body is None:
            buf = ffi.from_buffer(self.data)
            check(lib.smtps_message_set_body_fixed(m, buf, len(self.data)), "body")
            object.__setattr__(self, "_c_body", buf)          # frozen: not a field
        elif isinstance(body, BufferBody):
            check(lib.smtps_message_set_body_ref(m, body.cdata, body.length), "body")
        elif body is not None:
            check(lib.smtps_message_set_body_source(m, lib.smtps_py_body_read, body.handle,
                                                    body.size, body.is_8bit), "body")
        check(lib.smtps_message_set_sender(m, sender, len(sender)), "sender")
        for addr, notify, orcpt, what in rcpts:
            check(lib.smtps_message_add_recipient(
                m, addr, len(addr), notify, orcpt if orcpt is not None else ffi.NULL,
                len(orcpt) if orcpt is not None else 0), what)
        if ret != lib.SMTPS_DSN_RET_NONE or envid is not None:   # else: C's default
            check(lib.smtps_message_set_dsn(m, ret, envid if envid is not None else ffi.NULL,
                                            len(envid) if envid is not None else 0),
                  "DSN options")
        if require_tls:
            check(lib.smtps_message_set_require_tls(m, require_tls), "REQUIRETLS")
        if smtputf8:
            check(lib.smtps_message_set_smtputf8(m, smtputf8), "SMTPUTF8")
        object.__setattr__(self, "_c_envelope", m)            # frozen: not a field
        return m

    def _to_c(self) -> Any:
        """A new C message owned by a ffi.gc destructor (detach it on submit).

        Raises:
            InvalidMessageError: its body is a stream that was sent already.
        """
        body = self._body
        if body is None:
            # The envelope's own pointer to data: C copies it without
            # checking it again.
            env = self._envelope()
            m = lib.smtps_message_copy(env, self._c_body, len(self.data))
        else:
            body.claim()                       # a stream: once only
            m = lib.smtps_message_copy(self._envelope(), ffi.NULL, 0)
        if m == ffi.NULL:
            raise MemoryError("cannot allocate a message")
        return ffi.gc(m, lib.smtps_message_free)

    def __getstate__(self) -> Dict[str, Any]:
        # Pickle and copy the fields, not the C envelope (cdata does not
        # pickle; a copy makes its own when it is first submitted).
        if self._body is not None:
            raise TypeError("a Message whose body is a buffer, file or stream cannot be "
                            "pickled or copied; give bytes")
        state = dict(self.__dict__)
        state.pop("_c_envelope", None)
        state.pop("_c_body", None)
        return state


# MAIL and RCPT parameters a relay may pass on (from_smtp()): what each is.
_MAIL_PARAMS = {
    "SMTPUTF8": "kept",
    "RET": "kept",
    "ENVID": "kept",
    "REQUIRETLS": "kept",
    "BODY": "7BIT or 8BITMIME, declared again from the content",
    "SIZE": "declared again from the content",
    "AUTH": "not passed on",
}
_RCPT_PARAMS = {"NOTIFY": "kept", "ORCPT": "kept"}
_XTEXT_HEX = re.compile(r"\+([0-9A-F]{2})")
_UTF8_ESCAPE = re.compile(r"\\x\{([0-9A-F]{2,6})\}")


def _params(command: str, params: Iterable[str],
            known: Dict[str, str]) -> Dict[str, Optional[str]]:
    """``["RET=HDRS", "SMTPUTF8"]`` as ``{"RET": "HDRS", "SMTPUTF8": None}``,
    keywords upper case; an unknown or repeated one is an error."""
    if isinstance(params, (str, bytes)):
        raise InvalidMessageError(
            f"{command} parameters must be a list of strings such as ['RET=HDRS'], "
            f"not {params!r}")
    out: Dict[str, Optional[str]] = {}
    for p in params:
        if not isinstance(p, str) or not p or any(ord(c) < 33 or ord(c) == 127 for c in p):
            raise InvalidMessageError(f"bad {command} parameter {p!r}")
        key, sep, value = p.partition("=")
        key = key.upper()
        if key not in known:
            supported = ", ".join(f"{k} ({v})" for k, v in known.items())
            raise InvalidMessageError(
                f"{command} parameter {p!r} is not supported; supported are: {supported}")
        if key in out:
            raise InvalidMessageError(f"{command} parameter {key} given twice")
        out[key] = value if sep else None
    return out


def _no_value(key: str, values: Dict[str, Optional[str]]) -> None:
    if values[key] is not None:
        raise InvalidMessageError(f"MAIL parameter {key} takes no value")


def _xtext_decode(what: str, value: str) -> str:
    """RFC 3461 4 xtext to text: ``+2B`` is "+"."""
    if any(ord(c) < 33 or ord(c) > 126 or c == "=" for c in value) or re.search(
            r"\+(?![0-9A-F]{2})", value):
        raise InvalidMessageError(f"{what} {value!r} is not xtext (RFC 3461 4)")
    return _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), value)


def _decode_orcpt(value: Optional[str]) -> str:
    """ORCPT's ``addr-type;value`` to the address: rfc822 (xtext) or utf-8
    (RFC 6533 3: utf-8-addr-xtext, or -unitext with raw UTF-8)."""
    kind, sep, addr = (value or "").partition(";")
    if not sep or not addr:
        raise InvalidMessageError(f"ORCPT={value} is not addr-type;address (RFC 3461 4.2)")
    kind = kind.strip().lower()
    if kind == "rfc822":
        return _xtext_decode("ORCPT", addr)
    if kind == "utf-8":
        try:
            return _UTF8_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), addr)
        except (ValueError, OverflowError):
            raise InvalidMessageError(f"ORCPT={value}: a bad \\x{{...}} escape") from None
    raise InvalidMessageError(
        f"ORCPT address type {kind!r} is not supported: rfc822 and utf-8 are")


# A line and its end (CR LF, LF or CR: line endings may be any of them).
_LINE_END = re.compile(rb"\r\n|\r|\n")
_PIECE = 65536                                 # bytes looked at a time
_LINE_LOOK = 1000                              # of a long line: its start


def _tls_required_field(body: Any) -> Optional[str]:
    """The value of the content's ``TLS-Required`` header field (RFC 8689
    4.1), or None when its header section has none. The header section
    ends at the first empty line, or at a line that is not a field (no
    colon, not folded). Bytes, a buffer or a file (from where it stood
    when the Message was made, as it is sent) are looked at a piece at a time,
    up to the end of the header section; a stream cannot be, before it is
    sent, and counts as having none."""
    if isinstance(body, FileBody):
        file_body = body

        def read(offset: int) -> Any:
            return file_body.read_at(offset, _PIECE)
    elif isinstance(body, (bytes, BufferBody)):
        view = memoryview(body) if isinstance(body, bytes) else body.view

        def read(offset: int) -> Any:
            return view[offset:offset + _PIECE]
    else:
        return None                            # a stream
    rest, offset, skipping = b"", 0, False
    while True:
        piece = bytes(read(offset))
        offset += len(piece)
        data = rest + piece
        start = 0
        for m in _LINE_END.finditer(data):
            # A CR that ends the piece may be half of a CR LF: wait for more.
            if piece and m.group() == b"\r" and m.end() == len(data):
                break
            found = False if skipping else _header_line(data[start:m.start()])
            if found is not False:
                return found
            start, skipping = m.end(), False
        rest = data[start:]
        if not piece:                          # the end: the last line, unended
            found = _header_line(rest) if rest and not skipping else None
            return found if found is not False else None
        if len(rest) > _LINE_LOOK:
            # A line this long (long_lines="allow") is judged by its start,
            # which holds the field name, then skipped to its end, so that
            # it is never gathered whole.
            found = False if skipping else _header_line(rest[:_LINE_LOOK], cut=True)
            if found is not False:
                return found
            rest, skipping = rest[-1:], True   # (a CR there may start a CR LF)


def _header_line(line: bytes, cut: bool = False) -> Any:
    """One line of a header section (only its start when ``cut``): the
    field's value (str) when it is TLS-Required, None when the header
    section ends here, else False."""
    if not line and not cut:
        return None                            # the empty line: the body follows
    if line[:1] in (b" ", b"\t"):
        return False                           # a folded line goes on a field
    name, colon, value = line.partition(b":")
    if not colon:
        return None                            # not a field: no header section
    if name.rstrip(b" \t").lower() == b"tls-required":
        return value.strip(b" \t").decode("utf-8", "replace")
    return False


def as_messages(items: Iterable[Message]) -> Tuple[Message, ...]:
    """Check that every item is a Message (for batch APIs)."""
    out = tuple(items)
    for m in out:
        if not isinstance(m, Message):
            raise TypeError(f"expected Message, got {type(m).__name__}")
    return out


def _from_email(cls: Any, msg: Any, sender: Optional[str],
                recipients: Optional[Sequence[Union[str, Recipient]]],
                dsn_ret: Optional[str], envid: Optional[str],
                require_tls: bool = False) -> Message:
    """Message.from_email's body: the envelope and content of ``msg``."""
    import copy
    import email.generator
    import email.message
    import email.policy
    import email.utils
    import io

    if not isinstance(msg, email.message.Message):
        raise TypeError(f"from_email() takes an email.message.EmailMessage, "
                        f"not {type(msg).__name__}")
    # RFC 5322 3.6.6: the newest Resent- block says who resends to whom;
    # more than one block is ambiguous (smtplib refuses it too).
    resent = msg.get_all("Resent-Date")
    if resent is None:
        prefix = ""
    elif len(resent) == 1:
        prefix = "Resent-"
    else:
        raise InvalidMessageError("the message has more than one 'Resent-' header block")

    def addresses(*names: str) -> list:
        values = [str(v) for n in names for v in (msg.get_all(prefix + n) or [])]
        return [a for _, a in email.utils.getaddresses(values) if a]

    if sender is None:
        found = addresses("Sender") or addresses("From")
        if not found:
            raise InvalidMessageError(
                f"no sender: the message has no {prefix}Sender or {prefix}From "
                "address; give sender=")
        sender = found[0]
    if recipients is None:
        recipients = list(dict.fromkeys(addresses("To", "Cc", "Bcc")))
        if not recipients:
            raise InvalidMessageError(
                f"no recipients: the message has no {prefix}To, {prefix}Cc or "
                f"{prefix}Bcc address; give recipients=")

    content = copy.copy(msg)
    del content["Bcc"]
    del content["Resent-Bcc"]
    wanted = [sender] + [r.address if isinstance(r, Recipient) else r for r in recipients]
    international = any(not str(a).isascii() for a in wanted)
    policy = msg.policy
    if international:
        # SMTPUTF8 (RFC 6531): headers go as raw UTF-8, as smtplib does.
        if hasattr(policy, "utf8"):
            policy = policy.clone(utf8=True)
        else:                                   # compat32 has no utf8 mode
            policy = email.policy.SMTPUTF8
    out = io.BytesIO()
    email.generator.BytesGenerator(out, policy=policy).flatten(content, linesep="\r\n")
    return cls(sender, recipients, out.getvalue(), dsn_ret=dsn_ret, envid=envid,
               require_tls=require_tls)
