"""Logging: one logger per component, the protocol transcript, and the
rules that keep both safe to read.

Loggers (all children of ``smtpstate``; nothing is logged unless the
application configures logging):

========================  ==================================================
``smtpstate.client``      connections of the blocking :class:`~smtpstate.Client`
``smtpstate.engine``      the :class:`~smtpstate.Engine`
``smtpstate.aio``         the asyncio driver
``smtpstate.state``       Python states that raised
``smtpstate.result``      one record per result: INFO for failures (with
                          stage, reply and bounce class), DEBUG for deliveries
``smtpstate.transcript``  the SMTP dialogue, DEBUG, one record per line
``smtpstate.demo``        the demo; ``smtpstate.cli`` the command line
``smtpstate.mta_sts``     MTA-STS policy fetches and the policy cache's file
========================  ==================================================

Rule: the transcript is the plaintext dialogue as the C session queues and
parses it (``smtps_session_set_trace``), so it reads the same with or
without TLS and for every driver. What AUTH sends never reaches it: C hands
over ``AUTH PLAIN [credentials redacted]`` instead.

Rule: text that came from a server is never logged raw. :func:`printable`
turns control characters (ANSI escapes, CR, NUL, C1 controls, Unicode line
and bidirectional-override marks) into visible escapes, so a hostile reply
cannot rewrite a terminal or forge log lines.

Each transcript record carries ``smtp_direction`` (``"C"`` sent by us,
``"S"`` from the server, ``"*"`` an event), ``smtp_peer`` (``"host:port"``)
and ``smtp_line`` (the printable line) for handlers that want them.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any, Callable, List, Optional, Tuple

from smtpstate._ffi import ffi, lib, py_trampolines

__all__ = ["TRANSCRIPT", "RESULT", "Tracer", "log_result", "printable", "transcript_handler"]

TRANSCRIPT = "smtpstate.transcript"
RESULT = "smtpstate.result"

transcript_log = logging.getLogger(TRANSCRIPT)
result_log = logging.getLogger(RESULT)

# C0 controls but TAB, DEL, C1 controls, and the Unicode marks that move
# or hide text: line/paragraph separators, bidi embeddings, overrides and
# isolates, zero-width joiners and the BOM.
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]")


def _escape(m: "re.Match[str]") -> str:
    o = ord(m.group(0))
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"


def printable(data: Any) -> str:
    """``data`` (bytes or str) as one harmless line of text.

    Bytes are decoded as UTF-8 (invalid bytes become ``\\xNN``); every
    control character is shown as an escape (``\\x1b``), so nothing in it
    can move the cursor, end the line or reorder what a reader sees.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data).decode("utf-8", "backslashreplace")
    return _UNSAFE.sub(_escape, str(data))


_KINDS = {
    lib.SMTPS_TRACE_SENT: "C",
    lib.SMTPS_TRACE_RECEIVED: "S",
    lib.SMTPS_TRACE_DATA: "C",
    lib.SMTPS_TRACE_NOTE: "*",
}


class Tracer:
    """The transcript of a driver's sessions: what C traces, as log records
    on ``smtpstate.transcript`` (and, when given, to ``sink``).

    Args:
        sink: called as ``sink(direction, line)`` for each line, besides
            logging (the command line's ``-v`` uses it); ``line`` is
            already :func:`printable`.

    Drivers make one and install it on their sessions with :meth:`attach`
    (or on their engine with :meth:`attach_engine`); it must stay alive
    as long as those sessions can call it.
    """

    def __init__(self, sink: Optional[Callable[[str, str], None]] = None) -> None:
        self.sink = sink
        self.handle = ffi.new_handle(self)

    @staticmethod
    def wanted() -> bool:
        """True when the transcript would be logged at all."""
        return transcript_log.isEnabledFor(logging.DEBUG)

    def attach(self, csession: Any) -> None:
        lib.smtps_session_set_trace(csession, lib.smtps_py_trace, self.handle)

    def attach_engine(self, cengine: Any) -> None:
        lib.smtps_engine_set_trace(cengine, lib.smtps_py_trace, self.handle)

    def event(self, peer: str, kind: int, data: bytes) -> None:
        """One C trace event: log it, line by line."""
        direction = _KINDS.get(kind, "*")
        if kind == lib.SMTPS_TRACE_DATA:
            lines: List[str] = data.decode("utf-8", "backslashreplace").splitlines() or [""]
        else:
            lines = [data.decode("utf-8", "backslashreplace")]
        logging_on = transcript_log.isEnabledFor(logging.DEBUG)
        for line in lines:
            text = printable(line)
            if self.sink is not None:
                self.sink(direction, text)
            if logging_on:
                transcript_log.debug("%s %s: %s", peer, direction, text,
                                     extra={"smtp_direction": direction, "smtp_peer": peer,
                                            "smtp_line": text})


def _peer(csession: Any) -> str:
    port = ffi.new("int *")
    host = ffi.string(lib.smtps_session_peer(csession, port)).decode("ascii", "replace")
    if not host:
        return "-"
    return f"[{host}]:{port[0]}" if ":" in host else f"{host}:{port[0]}"


def _trace(csession: Any, kind: int, data: Any, length: int, closure: Any) -> None:
    tracer: Tracer = ffi.from_handle(closure)
    if tracer.sink is None and not transcript_log.isEnabledFor(logging.DEBUG):
        return                                  # turned off since it was attached
    tracer.event(_peer(csession), int(kind), bytes(ffi.buffer(data, length)) if length else b"")


py_trampolines["trace"] = _trace


def log_result(result: Any, where: str = "") -> None:
    """One record on ``smtpstate.result`` for a finished message: INFO when
    it failed (status, stage code and name, state, reply or reason, bounce
    class, a Python state's error), DEBUG when delivered."""
    if not result_log.isEnabledFor(logging.INFO if not result.ok else logging.DEBUG):
        return
    ticket = getattr(result.ticket, "id", result.ticket)
    if result.ok:
        result_log.debug("%smessage %s delivered: %s", where, ticket,
                         printable(str(result.reply) if result.reply else ""))
        return
    why = str(result.reply) if result.reply is not None else result.reason
    extra = f" [{result.bounce_class}]" if result.bounce_class is not None else ""
    error = f"; {result.error}" if result.error else ""
    result_log.info("%smessage %s %s at stage %d (%s), state %s: %s%s%s", where, ticket,
                    result.status, result.stage_code, result.stage, result.state or "-",
                    printable(why), extra, printable(error))


class _LineHandler(logging.Handler):
    """Writes transcript records as ``C: line`` / ``S: line``."""

    def __init__(self, write: Callable[[str], Any]) -> None:
        super().__init__(logging.DEBUG)
        self.write = write
        self.lock_ = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        direction = getattr(record, "smtp_direction", None)
        line = getattr(record, "smtp_line", None)
        if direction is None or line is None:
            return
        with self.lock_:
            self.write(f"{' *' if direction == '*' else direction + ':'} {line}\n")


def transcript_handler(write: Callable[[str], Any]) -> Tuple[logging.Handler, Callable[[], None]]:
    """Show the transcript through ``write`` (``sys.stderr.write``) as
    ``C: line`` / ``S: line``: turns the transcript logger on at DEBUG (and
    stops it propagating, so that it is not shown twice) and returns the
    handler and a function that undoes all that."""
    handler = _LineHandler(write)
    previous = transcript_log.level, transcript_log.propagate
    transcript_log.addHandler(handler)
    transcript_log.setLevel(logging.DEBUG)
    transcript_log.propagate = False

    def undo() -> None:
        transcript_log.removeHandler(handler)
        transcript_log.setLevel(previous[0])
        transcript_log.propagate = previous[1]

    return handler, undo
