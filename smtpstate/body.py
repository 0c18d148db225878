"""Message content that is not a bytes object: buffers, files, streams.

Rule: a large body is never copied whole into Python memory. A buffer
(``memoryview``, ``mmap``) is handed to C by reference; a file or a stream
is read while it is sent, a piece (``SMTPS_STAGE_MAX`` bytes) at a time,
through one ``extern "Python"`` reader (``smtps_py_body_read``).

Rule: every body is checked as C checks it (``smtps_body_scan()``: no NUL
byte, no line over 998 octets unless allowed, 8-bit or not, its RFC 1870
size), in one pass that any split of the content gives the same answer. A
bytes body, a buffer or a file is checked when the :class:`Message` is
made, so that a bad one is an exception before anything is sent. A stream
can only be checked as it goes: C checks each piece before any of it goes,
and a bad one fails that message (its connection closes before the final
dot, so that the server discards it).
"""

from __future__ import annotations

import io
import logging
import os
import stat
import threading
from typing import Any, Iterator, Optional

from smtpstate import _ffi
from smtpstate._ffi import ffi, lib
from smtpstate.errors import InvalidMessageError

__all__ = ["check_bytes", "BufferBody", "FileBody", "StreamBody", "make_body"]

log = logging.getLogger("smtpstate.message")

LONG_LINES = ("refuse", "allow")
_READ = 65536                                  # bytes per read when a file is scanned


def scan_flags(long_lines: str) -> int:
    """C's body option bits for ``long_lines``."""
    if long_lines not in LONG_LINES:
        raise InvalidMessageError(f"long_lines must be 'refuse' or 'allow', not {long_lines!r}")
    return int(lib.SMTPS_BODY_ALLOW_LONG_LINES) if long_lines == "allow" else 0


def _problem(sc: Any, what: str) -> None:
    """Raise for what C's scan found, in words that say what to do."""
    line, offset = int(sc.problem_line), int(sc.problem_offset)
    if sc.problem == lib.SMTPS_BODY_NUL:
        raise InvalidMessageError(
            f"{what} has a NUL byte (line {line}, offset {offset}): NUL bytes are "
            "never sent, since a server on the way may drop them and read what "
            "follows as the end of the data (BINARYMIME, which could carry them, "
            "is not supported). Encode binary content (base64) in a MIME part")
    raise InvalidMessageError(
        f"line {line} of {what} is longer than {lib.SMTPS_LINE_OCTETS_MAX} octets "
        f"(RFC 5322 2.1.1, at offset {offset}): a server on the way may fold, cut "
        "or refuse it, so the message that arrives would not be the one sent. "
        "Wrap it, encode the part (quoted-printable, base64), or pass "
        "long_lines='allow' to send it as it is")


def check_bytes(data: Any, flags: int, what: str = "the message body") -> None:
    """Check an in-memory body (bytes, or a C-contiguous buffer's cdata
    from ``ffi.from_buffer``) as C will, in one C call; scan it again, for
    the details, only when it has a problem.

    Raises:
        InvalidMessageError: a NUL byte or an overlong line.
    """
    if not _check(data, len(data), flags):
        return
    sc = ffi.new("struct smtps_body_scan *")
    lib.smtps_body_scan_init(sc, flags)
    lib.smtps_body_scan(sc, data, len(data))
    lib.smtps_body_scan_finish(sc)
    _problem(sc, what)


_check = lib.smtps_body_check


class _Source:
    """A body read as it is sent; C calls :meth:`read_at` through
    ``smtps_py_body_read`` with the handle of this object as closure."""

    one_shot = False
    size = -1                                  # RFC 1870 size, -1: unknown
    is_8bit = -1                               # -1: unknown

    def __init__(self) -> None:
        self.handle = ffi.new_handle(self)     # kept as long as the body

    def read_at(self, offset: int, cap: int) -> Any:
        raise NotImplementedError

    def claim(self) -> None:
        """A transaction is about to read it (streams: only once)."""

    def release(self) -> None:
        """The transaction that claimed it was refused before it began."""


class BufferBody:
    """A ``memoryview``, ``mmap`` or other buffer: referenced, never copied.
    It must stay unchanged until the message's result is out."""

    def claim(self) -> None:
        """Nothing to claim: a buffer can be sent any number of times."""

    def release(self) -> None:
        """Nothing to release."""

    def __init__(self, data: Any, flags: int) -> None:
        try:
            view = memoryview(data)
        except TypeError:
            raise InvalidMessageError(
                f"data of type {type(data).__name__} is not a buffer") from None
        if not view.c_contiguous:
            raise InvalidMessageError("data is a buffer that is not contiguous; copy it "
                                      "into bytes first")
        self.view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        self.cdata = ffi.from_buffer(self.view)
        self.length = len(self.view)
        check_bytes(self.cdata, flags)


class FileBody(_Source):
    """A binary file (or file-like object that can seek), checked once
    when the message is made and read again, by position, each time it is
    sent: a Message with a file body may be sent any number of times, at
    once over several connections too."""

    def __init__(self, f: Any, flags: int) -> None:
        super().__init__()
        self.file = f
        self.start = f.tell()
        self.fd: Optional[int] = None
        self.lock = threading.Lock()           # seek + read, one reader at a time
        try:
            fd = f.fileno()
            if stat.S_ISREG(os.fstat(fd).st_mode) and not isinstance(f, io.TextIOBase):
                self.fd = fd                   # os.pread: no shared position
        except (AttributeError, OSError, io.UnsupportedOperation):
            pass
        sc = ffi.new("struct smtps_body_scan *")
        lib.smtps_body_scan_init(sc, flags)
        offset = 0
        while True:
            piece = self.read_at(offset, _READ)
            if not piece:
                break
            lib.smtps_body_scan(sc, ffi.from_buffer(piece), len(piece))
            offset += len(piece)
        if lib.smtps_body_scan_finish(sc):
            _problem(sc, "the message body (the file)")
        self.size = int(sc.size)
        self.is_8bit = int(sc.is_8bit)

    def read_at(self, offset: int, cap: int) -> Any:
        if self.fd is not None:
            return os.pread(self.fd, cap, self.start + offset)
        with self.lock:                        # shared position: connections in threads
            self.file.seek(self.start + offset)
            piece = self.file.read(cap)
        if isinstance(piece, str):
            raise InvalidMessageError("the body file is open in text mode; open it in "
                                      "binary mode ('rb')")
        return piece


class StreamBody(_Source):
    """An iterable of bytes pieces (or a file that cannot seek), read as it
    is sent, in whatever pieces it gives: it can be sent once."""

    one_shot = True

    def __init__(self, pieces: Iterator[Any]) -> None:
        super().__init__()
        self.pieces = pieces
        self.pos = 0                           # bytes handed to C so far
        self.left: Any = b""                   # the rest of the last piece
        self.claimed = False

    def claim(self) -> None:
        if self.claimed:
            raise InvalidMessageError(
                "this message's body is a stream, which can be read only once; make "
                "a new Message to send it again (or give bytes, a buffer or a file)")
        self.claimed = True

    def release(self) -> None:
        if self.pos == 0:
            self.claimed = False

    def read_at(self, offset: int, cap: int) -> Any:
        if offset != self.pos:
            raise InvalidMessageError("a stream body can only be read from where it "
                                      f"stopped (asked for {offset}, at {self.pos})")
        while not self.left:
            try:
                piece = next(self.pieces)
            except StopIteration:
                return b""
            if isinstance(piece, str) or not isinstance(piece, (bytes, bytearray, memoryview)):
                raise InvalidMessageError(
                    f"a body stream gave a {type(piece).__name__}; each piece must be "
                    "bytes (encode str yourself, so that the charset is yours)")
            self.left = memoryview(piece).cast("B")
        out, self.left = self.left[:cap], self.left[cap:]
        self.pos += len(out)
        return out


def _file_pieces(f: Any) -> Iterator[bytes]:
    while True:
        piece = f.read(_READ)
        if not piece:
            return
        yield piece


def make_body(data: Any, flags: int) -> Any:
    """The body object for data that is not bytes or str: a BufferBody, a
    FileBody or a StreamBody.

    Raises:
        InvalidMessageError: a kind of data that cannot be a body, a text
            file, or (buffers, files) a NUL byte or an overlong line.
    """
    if isinstance(data, (memoryview,)) or _is_buffer(data):
        return BufferBody(data, flags)
    if hasattr(data, "read"):
        if isinstance(data, io.TextIOBase):
            raise InvalidMessageError("the body file is open in text mode; open it in "
                                      "binary mode ('rb')")
        seekable = getattr(data, "seekable", None)
        if callable(seekable) and seekable():
            return FileBody(data, flags)
        return StreamBody(_file_pieces(data))
    if isinstance(data, (str, bytes, bytearray)) or not hasattr(data, "__iter__"):
        raise InvalidMessageError(
            f"data must be bytes, str, a buffer (memoryview, mmap), a binary file or "
            f"an iterable of bytes pieces, not {type(data).__name__}")
    return StreamBody(iter(data))


def _is_buffer(data: Any) -> bool:
    """A buffer that is not bytes, bytearray or str (mmap, array...)."""
    if isinstance(data, (bytes, bytearray, str)):
        return False
    try:
        memoryview(data)
    except TypeError:
        return False
    return True


def _read_failed(exc: Any, val: Any, tb: Any) -> int:
    # Ctrl-C while C reads the body: kept for the driver, as states do.
    if _ffi._interrupted(exc, val):
        return int(lib.SMTPS_EINTR)
    log.error("reading a message body failed outside its guard: %r", val)
    return int(lib.SMTPS_ESYS)


@ffi.def_extern(name="smtps_py_body_read", onerror=_read_failed)
def _body_read(closure: Any, offset: int, buf: Any, cap: int, why: Any, why_cap: int) -> int:
    source: _Source = ffi.from_handle(closure)
    try:
        piece = source.read_at(int(offset), int(cap))
        n = len(piece)
        if n > cap:
            raise InvalidMessageError(f"a body reader gave {n} bytes for {cap}")
        if n:
            ffi.memmove(buf, piece, n)
        return n
    except InvalidMessageError as exc:
        _say(why, why_cap, str(exc))
        return int(lib.SMTPS_EINVAL)
    except Exception as exc:
        log.warning("reading the message body failed: %r", exc, exc_info=exc)
        _say(why, why_cap, f"{type(exc).__name__}: {exc}")
        return int(lib.SMTPS_ESYS)


def _say(why: Any, cap: int, text: str) -> None:
    """Write text into C's why buffer, NUL-terminated, cut to fit."""
    raw = text.encode("utf-8", "replace")[:max(0, cap - 1)]
    ffi.memmove(why, raw + b"\0", len(raw) + 1)
