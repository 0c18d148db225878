"""How smtpstate.queue's jobs and results are written on a broker: JSON
(the default, readable anywhere) or msgpack (smaller, and several times
cheaper to read and write: the message travels as raw bytes instead of
base64 inside a JSON string).

This module owns the two encodings and how a reader tells them apart,
which needs no header (Redis lists have none): every job, batch and
result is a map, and a JSON text of one starts with "{" (0x7b), maybe
after white space, while a msgpack map starts with 0x80-0x8f, 0xde or
0xdf. What the maps hold is smtpstate.queue's (docs/queue.md).
"""

from __future__ import annotations

import json
from typing import Any, Tuple

ENCODINGS = ("json", "msgpack")

_MSGPACK_MAP_FIRST = frozenset(range(0x80, 0x90)) | {0xde, 0xdf}


def _msgpack() -> Any:
    try:
        import msgpack
    except ImportError:
        raise ImportError("msgpack-encoded jobs need the msgpack package: "
                          "pip install 'smtpstate[queue]'") from None
    return msgpack


def check(encoding: Any) -> str:
    """``encoding`` if it is one of ENCODINGS (and msgpack, if asked for,
    can be imported); else ValueError saying which there are."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, not {encoding!r}")
    if encoding == "msgpack":
        _msgpack()
    return str(encoding)


def is_msgpack(body: bytes) -> bool:
    return bool(body) and body[0] in _MSGPACK_MAP_FIRST


def encode(obj: Any, binary: bool) -> bytes:
    """``obj`` as compact JSON (UTF-8), or as msgpack when ``binary``
    (bytes as msgpack bin, str as str)."""
    if binary:
        return bytes(_msgpack().packb(obj, use_bin_type=True))
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def decode(raw: Any) -> Tuple[Any, bool]:
    """The object in a broker message's body, and whether it was msgpack.

    Raises:
        ValueError: not UTF-8 JSON nor msgpack (the text says which and
            why), nested too deep, trailing data.
    """
    if isinstance(raw, (bytearray, memoryview)):
        raw = bytes(raw)
    if isinstance(raw, bytes) and is_msgpack(raw):
        msgpack = _msgpack()
        try:
            # raw=False: msgpack str as str, bin as bytes; ext types and
            # timestamps come back as objects the field checks refuse.
            return msgpack.unpackb(raw, raw=False, strict_map_key=True), True
        except (ValueError, msgpack.UnpackException) as e:
            raise ValueError(f"not valid msgpack: {e}") from None
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"neither msgpack nor UTF-8 JSON: {e}") from None
    if not isinstance(raw, str):
        raise ValueError(f"must be JSON text or msgpack bytes, not {type(raw).__name__}")
    try:
        return json.loads(raw), False
    except (ValueError, RecursionError) as e:     # RecursionError: nested too deep
        raise ValueError(f"not valid JSON: {e}") from None
