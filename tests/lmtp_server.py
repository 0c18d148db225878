"""A real LMTP server for tests: aiosmtpd's ``LMTP`` in a thread of its own,
over TCP on 127.0.0.1 or over a unix-domain socket.

This module owns :class:`AiosmtpdLmtp` and its handler :class:`MailboxHandler`.
aiosmtpd's ``aiosmtpd.lmtp.LMTP`` is an SMTP server that greets with LHLO
(and refuses HELO and EHLO); what makes it answer the end of data the LMTP
way is the handler: its ``handle_DATA`` returns one reply line per
recipient accepted at RCPT, joined by CRLF (aiosmtpd's ``push()`` adds the
last CRLF), so that each recipient gets its own reply, as Dovecot's or
Cyrus's LMTP server gives one per mailbox.

Which reply a recipient gets depends on its local part, so that a test says
what it wants in its addresses:

* ``refused@...`` -- 550 5.1.1 at RCPT (the server owes it no reply later);
* ``full@...`` -- 552 5.2.2 after the data (a mailbox over quota);
* ``later@...`` -- 451 4.2.0 after the data (try again);
* anyone else -- 250 2.0.0 after the data, and the message is stored in
  that mailbox (``handler.mailboxes[address]``).

The server can also run plain SMTP (``lmtp=False``): aiosmtpd's ``SMTP``
with the same handler, whose ``handle_DATA`` then gives the one reply SMTP
has (250 when anyone took it). Every byte a client sends is recorded per
connection (``connections``), so a test can see LHLO on the wire.

Rule: the server never decides a test; it answers and records.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from typing import Any, Dict, List, Optional

__all__ = ["AiosmtpdLmtp", "MailboxHandler", "Stored"]

LOOPBACK = "127.0.0.1"

#: Seconds the server thread may take to start or stop.
START_TIMEOUT = 10.0


@dataclasses.dataclass
class Stored:
    """One message as a mailbox got it."""

    mail_from: str
    data: bytes
    rcpt_tos: List[str]                 # every recipient of its transaction


class MailboxHandler:
    """aiosmtpd handler: one reply per accepted recipient after the data.

    Args:
        pipelining: offer PIPELINING in the LHLO (EHLO) reply, as LMTP
            servers do (aiosmtpd reads pipelined commands in order anyway).

    Attributes:
        mailboxes: address -> the messages stored for it.
        greetings: the LHLO/EHLO names clients gave, in order.
    """

    def __init__(self, pipelining: bool = True) -> None:
        self.pipelining = pipelining
        self.mailboxes: Dict[str, List[Stored]] = {}
        self.greetings: List[str] = []
        self.lock = threading.Lock()

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any,
                          hostname: str, responses: List[str]) -> List[str]:
        # LMTP's LHLO comes here too (aiosmtpd.lmtp.LMTP.smtp_LHLO). With a
        # hook of this shape, remembering the name is the hook's job.
        session.host_name = hostname
        with self.lock:
            self.greetings.append(hostname)
        if self.pipelining:
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any,
                          address: str, rcpt_options: List[str]) -> str:
        if address.startswith("refused@"):
            return "550 5.1.1 <%s> no such mailbox" % address
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 <%s> ok" % address

    def _deliver(self, envelope: Any, address: str) -> str:
        """The reply for one accepted recipient; stores the message for it."""
        if address.startswith("full@"):
            return "552 5.2.2 <%s> mailbox full" % address
        if address.startswith("later@"):
            return "451 4.2.0 <%s> mailbox busy, try later" % address
        stored = Stored(envelope.mail_from, bytes(envelope.original_content),
                        list(envelope.rcpt_tos))
        with self.lock:
            self.mailboxes.setdefault(address, []).append(stored)
        return "250 2.0.0 <%s> delivered" % address

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        replies = [self._deliver(envelope, a) for a in envelope.rcpt_tos]
        if not getattr(server, "smtpstate_lmtp", False):
            # SMTP has one reply for the message.
            ok = [r for r in replies if r.startswith("250")]
            return "250 2.0.0 stored" if ok else replies[0]
        return "\r\n".join(replies)


class AiosmtpdLmtp:
    """aiosmtpd's LMTP (or SMTP) server in a thread, with its own event loop.

    Args:
        handler: the aiosmtpd handler; a new :class:`MailboxHandler` if None.
        unix_path: listen on this unix socket path instead of TCP
            127.0.0.1 on a port the kernel picks.
        lmtp: aiosmtpd's ``LMTP`` (True) or plain ``SMTP`` (False).
        hostname: the name the server gives in its greeting and LHLO reply.

    Attributes:
        host, port: where a client connects: ``"unix:/path"`` (port 0) for
            a unix socket.
        handler: the handler (``mailboxes``, ``greetings``).
        connections: the bytes each client connection sent, in order.

    Use :meth:`stop` (or ``with``) to shut it down; it removes the socket
    file it made.
    """

    def __init__(self, handler: Any = None, *, unix_path: Optional[str] = None,
                 lmtp: bool = True, hostname: str = "lmtp.smtpstate.test") -> None:
        self.handler = handler if handler is not None else MailboxHandler()
        self.unix_path = unix_path
        self.lmtp = lmtp
        self.hostname = hostname
        self.host = "unix:" + unix_path if unix_path is not None else LOOPBACK
        self.port = 0
        self.connections: List[bytearray] = []
        self._loop = asyncio.new_event_loop()
        self._server: Any = None
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="aiosmtpd-lmtp")
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise RuntimeError("the aiosmtpd LMTP server did not start in time")
        if self._error is not None:
            raise RuntimeError(f"the aiosmtpd LMTP server did not start: {self._error!r}")

    def _protocol_class(self) -> Any:
        from aiosmtpd.lmtp import LMTP
        from aiosmtpd.smtp import SMTP

        owner = self
        base = LMTP if self.lmtp else SMTP

        class Recording(base):  # type: ignore[misc, valid-type]
            smtpstate_lmtp = owner.lmtp

            # asyncio hands each chunk the client sent to data_received();
            # keeping them gives tests the bytes on the wire.
            def data_received(self, data: bytes) -> None:
                buf = getattr(self, "_smtpstate_buf", None)
                if buf is None:
                    buf = self._smtpstate_buf = bytearray()
                    owner.connections.append(buf)
                buf += data
                super().data_received(data)

        return Recording

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            cls = self._protocol_class()

            def factory() -> Any:
                return cls(self.handler, hostname=self.hostname, loop=loop)

            if self.unix_path is not None:
                opening = loop.create_unix_server(factory, self.unix_path)
            else:
                opening = loop.create_server(factory, LOOPBACK, 0)
            self._server = loop.run_until_complete(opening)
            if self.unix_path is None:
                self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:              # reported by __init__
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    @property
    def received(self) -> bytes:
        """Every byte every client sent, in connection order."""
        return b"".join(bytes(c) for c in self.connections)

    def stop(self) -> None:
        """Stop the server, wait for its thread, remove its socket file."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(START_TIMEOUT)
        if self.unix_path is not None and os.path.exists(self.unix_path):
            os.unlink(self.unix_path)

    def __enter__(self) -> "AiosmtpdLmtp":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
