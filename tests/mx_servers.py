"""SMTP and LMTP servers on several loopback addresses, for routing tests.

This module owns the mail servers that MX routing tests deliver to, and
nothing here is a pytest fixture (``conftest.py`` wraps these classes):

* ``MxServers`` -- one server per address (127.0.0.2, 127.0.0.3, ...,
  ``::1``), all on ONE port, each with its own behaviour: aiosmtpd for
  every server that speaks SMTP, a few lines of asyncio for those that
  must not (a 421 greeting, a silent one);
* ``LmtpServer`` -- aiosmtpd's ``LMTP`` on TCP or a unix socket, with
  RFC 2033 per-recipient replies after the final dot.

Every server records what routing tests assert: messages (as
``helpers.ReceivedMessage``), the HELO/EHLO/LHLO names it was given, the
peer of each connection, and how many connections it accepted and held at
once. All of them run on one event loop in one thread (``_LoopThread``).

Linux routes all of 127.0.0.0/8 to the loopback interface, so 127.0.0.2
and up need no set-up; ``::1`` needs IPv6 (``ipv6_loopback_available()``).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import os
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from helpers import ReceivedMessage, wait_until

__all__ = [
    "BEHAVIOURS",
    "LmtpServer",
    "MxServer",
    "MxServers",
    "ipv6_loopback_available",
]

#: What a server at one address does:
#:   ok            -- aiosmtpd, accepts every message;
#:   refuse        -- nothing listens: connections are refused (the port
#:                    is bound without listen(), so it stays ours);
#:   greet421      -- greets "421 4.3.2 try later" and closes;
#:   greet554      -- greets "554 5.3.2 no service here" and closes;
#:   hang          -- accepts TCP and never sends a byte;
#:   ehlo_fail     -- greets 220, answers EHLO with 550 and HELO with 502;
#:   rcpt_550      -- refuses every RCPT with "550 5.1.1";
#:   tempfail_data -- answers DATA with 451 (no 354; nothing is taken).
BEHAVIOURS = ("ok", "refuse", "greet421", "greet554", "hang", "ehlo_fail", "rcpt_550", "tempfail_data")

GREETINGS = {
    "greet421": b"421 4.3.2 try later\r\n",
    "greet554": b"554 5.3.2 no service here\r\n",
}


def ipv6_loopback_available() -> bool:
    """True when a TCP socket can be bound on ``::1`` here."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _normalise(address: str) -> str:
    """The canonical text of an IP address ("::1", "127.0.0.2")."""
    return ipaddress.ip_address(address.strip("[]")).compressed


# ---------------------------------------------------------------------------
# One event loop for every server
# ---------------------------------------------------------------------------


class _LoopThread:
    """An asyncio loop running in a daemon thread; ``call(coro)`` runs a
    coroutine there and returns its result to the calling thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


# ---------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------


class _Recorder:
    """What one server saw. Changed only on the loop's thread, by list
    appends and int updates, which a test's thread can read at any time
    (the GIL makes each one atomic)."""

    def __init__(self) -> None:
        self.messages: List[ReceivedMessage] = []
        self.helo_names: List[str] = []       # HELO/EHLO/LHLO arguments, in order
        self.peers: List[Any] = []            # the peer of each connection
        self.opened_at: List[float] = []      # time.monotonic() of each, accepted
        self.accepted = 0                     # connections accepted
        self.active = 0                       # connections open now
        self.peak = 0                         # most connections open at once
        self._transports: set = set()         # to close them on stop

    def opened(self, transport: asyncio.BaseTransport) -> None:
        self.accepted += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.peers.append(transport.get_extra_info("peername"))
        self.opened_at.append(time.monotonic())
        self._transports.add(transport)

    def closed(self, transport: asyncio.BaseTransport) -> None:
        if transport in self._transports:
            self._transports.discard(transport)
            self.active -= 1

    def close_all(self) -> None:
        for transport in list(self._transports):
            transport.close()

    def wait_for_messages(self, count: int = 1, timeout: float = 10.0) -> List[ReceivedMessage]:
        """Wait until at least ``count`` messages arrived; return them all."""
        wait_until(lambda: len(self.messages) >= count, timeout, what="%d message(s)" % count)
        return list(self.messages)


def _record_message(recorder: _Recorder, session: Any, envelope: Any) -> ReceivedMessage:
    msg = ReceivedMessage(
        mail_from=envelope.mail_from,
        rcpt_tos=list(envelope.rcpt_tos),
        data=bytes(envelope.original_content),
        mail_options=list(envelope.mail_options),
        rcpt_options=list(envelope.rcpt_options),
        peer=session.peer,
        helo=session.host_name,
        # When the final dot was answered, for rate tests.
        extra={"received_at": time.monotonic(), "tls": session.ssl is not None},
    )
    recorder.messages.append(msg)
    return msg


@functools.lru_cache(maxsize=None)
def _counting_class(kind: str) -> type:
    """aiosmtpd's ``SMTP`` (kind "smtp") or ``LMTP`` ("lmtp"), counting
    connections into a recorder and answering DATA itself with 451 for
    "tempfail_data" (aiosmtpd has no hook before its 354). Built on first
    use, so that importing this module does not need aiosmtpd."""
    from aiosmtpd.lmtp import LMTP
    from aiosmtpd.smtp import SMTP

    class Counting(LMTP if kind == "lmtp" else SMTP):  # type: ignore[misc]
        def __init__(self, handler: Any, recorder: _Recorder, behaviour: str, **kwargs: Any) -> None:
            super().__init__(handler, **kwargs)
            self._recorder = recorder
            self._behaviour = behaviour
            self._counted: Optional[asyncio.BaseTransport] = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # Called again with the TLS transport after STARTTLS: count the
            # TCP connection once.
            if self._counted is None:
                self._counted = transport
                self._recorder.opened(transport)
            super().connection_made(transport)

        def connection_lost(self, error: Optional[Exception]) -> None:
            if self._counted is not None:
                self._recorder.closed(self._counted)
            super().connection_lost(error)

        async def smtp_DATA(self, arg: str) -> None:
            # The DATA command itself is refused, after the checks aiosmtpd
            # makes first (a sequence error stays a sequence error).
            if self._behaviour == "tempfail_data" and self.session.host_name \
                    and self.envelope.rcpt_tos and not arg:
                await self.push("451 4.3.0 try again later")
                return
            await super().smtp_DATA(arg)

    Counting.__name__ = Counting.__qualname__ = "Counting" + kind.upper()
    return Counting


class _Handler:
    """aiosmtpd handler: records HELO names and messages, and refuses what
    the behaviour says."""

    def __init__(self, recorder: _Recorder, behaviour: str) -> None:
        self.recorder = recorder
        self.behaviour = behaviour

    async def handle_HELO(self, server: Any, session: Any, envelope: Any, hostname: str) -> str:
        self.recorder.helo_names.append(hostname)
        if self.behaviour == "ehlo_fail":
            return "502 5.5.1 HELO not accepted here"
        session.host_name = hostname
        return "250 %s" % server.hostname

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: List[str]) -> List[str]:
        # aiosmtpd's LMTP answers LHLO through this hook too.
        self.recorder.helo_names.append(hostname)
        if self.behaviour == "ehlo_fail":
            return ["550 5.7.1 EHLO refused"]
        session.host_name = hostname
        return responses

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: List[str]) -> str:
        if self.behaviour == "rcpt_550":
            return "550 5.1.1 <%s>: Recipient address rejected" % address
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        _record_message(self.recorder, session, envelope)
        return "250 2.0.0 Ok"


class _RawProtocol(asyncio.Protocol):
    """Not SMTP: send ``greeting`` (if any) and close, or say nothing and
    hold the connection until the client or stop() closes it."""

    def __init__(self, recorder: _Recorder, greeting: Optional[bytes]) -> None:
        self.recorder = recorder
        self.greeting = greeting
        self.transport: Optional[asyncio.BaseTransport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.recorder.opened(transport)
        if self.greeting is not None:
            transport.write(self.greeting)      # type: ignore[attr-defined]
            transport.close()

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.transport is not None:
            self.recorder.closed(self.transport)


# ---------------------------------------------------------------------------
# Servers on several addresses, one port
# ---------------------------------------------------------------------------


class MxServer(_Recorder):
    """The server at one address of an ``MxServers``.

    Attributes:
        address: its IP address ("127.0.0.2", "::1").
        port: the shared port.
        behaviour: one of ``BEHAVIOURS``.
        hostname: the name in its greeting and EHLO reply.
        messages: ``helpers.ReceivedMessage`` per message taken (``helo``
            is the EHLO/HELO name of that session, ``peer`` its client,
            ``extra["received_at"]`` the ``time.monotonic()`` at which the
            final dot was answered).
        helo_names: every HELO/EHLO name received, accepted or not.
        peers: the client (host, port, ...) of every connection accepted.
        opened_at: the ``time.monotonic()`` of every connection accepted.
        accepted, active, peak: connections accepted, open now, and open
            at once at most.
    """

    def __init__(self, address: str, port: int, behaviour: str, hostname: str) -> None:
        super().__init__()
        self.address = address
        self.port = port
        self.behaviour = behaviour
        self.hostname = hostname


class MxServers:
    """Servers on ``addresses``, all on one port, started by ``start()``.

    Args:
        addresses: IP addresses to serve ("127.0.0.2", "::1", ...).
        behaviours: {address: behaviour} for those that are not "ok"
            (see ``BEHAVIOURS``).
        tls: {address: ssl.SSLContext}: those servers offer STARTTLS with
            that context (``extra["tls"]`` says whether a message came
            over it).

    Attributes:
        port: the port, free on every address when it was chosen (and
            held from then on, "refuse" addresses included).
        addresses: the addresses, normalised, in the order given.

    Raises:
        ValueError: an unknown behaviour, an address not given, or a
            repeated address.
    """

    def __init__(self, addresses: Sequence[str], behaviours: Optional[Mapping[str, str]] = None,
                 tls: Optional[Mapping[str, Any]] = None) -> None:
        self.addresses = [_normalise(a) for a in addresses]
        self._tls = {_normalise(a): ctx for a, ctx in (tls or {}).items()}
        if len(set(self.addresses)) != len(self.addresses):
            raise ValueError("an address is given twice: %r" % (addresses,))
        chosen = {_normalise(a): b for a, b in (behaviours or {}).items()}
        for address, behaviour in chosen.items():
            if behaviour not in BEHAVIOURS:
                raise ValueError("unknown behaviour %r (one of %s)" % (behaviour, ", ".join(BEHAVIOURS)))
            if address not in self.addresses:
                raise ValueError("behaviour for %s, which is not among the addresses" % address)
        self.port = 0
        self._servers: Dict[str, MxServer] = {}
        for n, address in enumerate(self.addresses, 1):
            self._servers[address] = MxServer(address, 0, chosen.get(address, "ok"),
                                              "mx%d.smtpstate.test" % n)
        self._sockets: List[socket.socket] = []
        self._listeners: List[asyncio.AbstractServer] = []
        self._loop: Optional[_LoopThread] = None

    def server(self, address: str) -> MxServer:
        """The server at ``address``."""
        return self._servers[_normalise(address)]

    def servers(self) -> List[MxServer]:
        return [self._servers[a] for a in self.addresses]

    def messages(self) -> List[ReceivedMessage]:
        """Every message every server took, server by server."""
        return [m for s in self.servers() for m in s.messages]

    def start(self) -> "MxServers":
        self._sockets = self._bind_all()
        self._loop = _LoopThread("mx-servers")
        try:
            for address, sock in zip(self.addresses, self._sockets):
                server = self._servers[address]
                server.port = self.port
                if server.behaviour != "refuse":
                    self._listeners.append(self._loop.call(self._serve(server, sock)))
        except BaseException:
            self.stop()
            raise
        return self

    def _bind_all(self, attempts: int = 50) -> List[socket.socket]:
        """One bound socket per address, all on the same port: the kernel
        picks it for the first address, the others try it, and on a clash
        everything starts again. The sockets are kept, so that the port
        stays ours; those of "refuse" addresses never listen (a SYN to a
        bound socket that does not listen is answered with a reset)."""
        for _ in range(attempts):
            socks: List[socket.socket] = []
            port = 0
            try:
                for address in self.addresses:
                    family = socket.AF_INET6 if ":" in address else socket.AF_INET
                    s = socket.socket(family, socket.SOCK_STREAM)
                    socks.append(s)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    s.bind((address, port))
                    port = s.getsockname()[1]
            except OSError as e:
                for s in socks:
                    s.close()
                if e.errno == errno.EADDRINUSE:
                    continue
                raise OSError(e.errno, "cannot bind %s: %s" % (address, e.strerror)) from e
            self.port = port
            return socks
        raise OSError(errno.EADDRINUSE, "no port free on all of %s" % ", ".join(self.addresses))

    async def _serve(self, server: MxServer, sock: socket.socket) -> asyncio.AbstractServer:
        loop = asyncio.get_running_loop()
        factory: Callable[[], asyncio.BaseProtocol]
        if server.behaviour in GREETINGS or server.behaviour == "hang":
            greeting = GREETINGS.get(server.behaviour)
            factory = lambda: _RawProtocol(server, greeting)  # noqa: E731
        else:
            smtp, handler = _counting_class("smtp"), _Handler(server, server.behaviour)
            factory = lambda: smtp(handler, server, server.behaviour, hostname=server.hostname,  # noqa: E731
                                   enable_SMTPUTF8=True, loop=loop,
                                   tls_context=self._tls.get(server.address))
        sock.listen(128)
        return await loop.create_server(factory, sock=sock)

    def stop(self) -> None:
        """Close the listeners and every open connection; stop the loop."""
        if self._loop is not None:
            async def shutdown() -> None:
                for listener in self._listeners:
                    listener.close()
                for server in self._servers.values():
                    server.close_all()
                for listener in self._listeners:
                    await listener.wait_closed()
                # Let the closed transports call connection_lost().
                await asyncio.sleep(0)

            self._loop.call(shutdown())
            self._loop.close()
            self._loop = None
        self._listeners = []
        for s in self._sockets:
            s.close()
        self._sockets = []

    def __enter__(self) -> "MxServers":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ---------------------------------------------------------------------------
# LMTP
# ---------------------------------------------------------------------------


class _LmtpHandler(_Handler):
    """RFC 2033: after the final dot, one reply per accepted recipient, in
    RCPT order. aiosmtpd pushes the string returned plus CRLF, so the
    replies are joined by CRLF."""

    def __init__(self, recorder: "LmtpServer", replies: Mapping[str, str]) -> None:
        super().__init__(recorder, "ok")
        self.replies = replies

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = _record_message(self.recorder, session, envelope)
        given = [(rcpt, self.replies.get(rcpt, LmtpServer.DEFAULT_REPLY)) for rcpt in envelope.rcpt_tos]
        msg.extra["replies"] = given
        self.recorder.replies.append(given)     # type: ignore[attr-defined]
        return "\r\n".join(reply for _, reply in given)


class LmtpServer(_Recorder):
    """aiosmtpd's ``LMTP`` on TCP or a unix socket.

    Args:
        address_or_unix_path: ``(host, port)`` (port 0: the kernel picks),
            a host alone (same as port 0), or a unix socket path (anything
            with a "/").
        replies: {recipient: reply line} given after the final dot; others
            get ``DEFAULT_REPLY``.

    Attributes:
        host, port: where it listens on TCP (None for a unix socket).
        path: the unix socket path (None on TCP).
        replies: per message, [(recipient, reply line)] as given.
        (and those of ``MxServer``: messages, helo_names -- the LHLO
        names --, peers, accepted, active, peak.)
    """

    DEFAULT_REPLY = "250 2.0.0 Ok"

    def __init__(self, address_or_unix_path: Union[str, Tuple[str, int]],
                 replies: Optional[Mapping[str, str]] = None) -> None:
        super().__init__()
        self.host: Optional[str] = None
        self.port: Optional[int] = None
        self.path: Optional[str] = None
        if isinstance(address_or_unix_path, tuple):
            self.host, self.port = address_or_unix_path
        elif "/" in address_or_unix_path:
            self.path = address_or_unix_path
        else:
            self.host, self.port = address_or_unix_path, 0
        self.reply_map: Dict[str, str] = dict(replies or {})
        self.replies: List[List[Tuple[str, str]]] = []
        self.hostname = "lmtp.smtpstate.test"
        self._loop: Optional[_LoopThread] = None
        self._listener: Optional[asyncio.AbstractServer] = None

    def start(self) -> "LmtpServer":
        self._loop = _LoopThread("lmtp-server")
        try:
            self._listener = self._loop.call(self._serve())
        except BaseException:
            self.stop()
            raise
        return self

    async def _serve(self) -> asyncio.AbstractServer:
        loop = asyncio.get_running_loop()
        lmtp, handler = _counting_class("lmtp"), _LmtpHandler(self, self.reply_map)

        def factory() -> asyncio.BaseProtocol:
            return lmtp(handler, self, "ok", hostname=self.hostname, enable_SMTPUTF8=True, loop=loop)

        if self.path is not None:
            listener = await loop.create_unix_server(factory, path=self.path)
        else:
            assert self.port is not None
            listener = await loop.create_server(factory, host=self.host, port=self.port)
            self.port = listener.sockets[0].getsockname()[1]
        return listener

    def stop(self) -> None:
        if self._loop is not None:
            async def shutdown() -> None:
                if self._listener is not None:
                    self._listener.close()
                self.close_all()
                if self._listener is not None:
                    await self._listener.wait_closed()
                await asyncio.sleep(0)

            self._loop.call(shutdown())
            self._loop.close()
            self._loop = None
        self._listener = None
        if self.path is not None and os.path.exists(self.path):
            os.unlink(self.path)

    def __enter__(self) -> "LmtpServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
