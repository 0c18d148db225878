"""The blocking client: one connection, one message at a time, driving the
C session over a plain socket (TCP, or a unix-domain socket for a host
given as ``"unix:/path/to/socket"``), in SMTP or LMTP.

It moves bytes and keeps the clock, nothing else: what to send and what a
reply means is decided in C (and in the machine's Python states). TLS
happens inside the C session too (OpenSSL over memory BIOs), so with TLS
the socket carries, and the transcript shows, ciphertext.

Rule: AUTH secrets never reach a log line, the transcript or a Result:
bytes written while the session is in the AUTH state are recorded as a
redaction notice, and the C side never puts credentials in a reason.
"""

from __future__ import annotations

import errno
import itertools
import logging
import selectors
import socket
import threading
import time
from typing import Any, List, Optional, Sequence, Tuple, Union

from smtpstate._ffi import check, ffi, interrupt_pending, lib, raise_interrupt
from smtpstate.errors import ConnectError, InvalidOptionError, LocalProtocolError
from smtpstate.logs import Tracer, log_result
from smtpstate.machine import Machine, default_machine
from smtpstate.message import Message
from smtpstate.options import Auth, Options, PathLike, check_host, check_port
from smtpstate.result import Result, not_attempted, unsent_result
from smtpstate.session import Capabilities, Session

__all__ = ["Client"]

log = logging.getLogger("smtpstate.client")

_tags = itertools.count(1)


def _now_ms() -> int:
    return int(time.monotonic() * 1000)


def _default_helo() -> str:
    name = socket.getfqdn() or "localhost"
    if not name.isascii() or " " in name or len(name) > 255:
        name = "localhost"
    return name


class Client:
    """A blocking SMTP (or LMTP) client for one server.

    Args:
        host, port: the server: a name or an address and a TCP port, or
            ``"unix:/path/to/socket"`` for a unix-domain socket (any
            protocol; ``port`` is then ignored).
        protocol: "smtp" (the default) or "lmtp" (RFC 2033, as Dovecot,
            Cyrus and Postfix's lmtp server speak it): LHLO instead of
            EHLO, no HELO fallback, and one reply per recipient after the
            data, which is that recipient's ``status`` and ``reply`` in the
            :class:`~smtpstate.Result` (``"partial"`` when some took it).
        timeout: seconds; the connect timeout and every reply deadline.
            None keeps RFC 5321's per-stage defaults (5 minutes for most
            replies, 10 for the final one) and a 60 s connect timeout.
        machine: the state order to run (default: :data:`default_machine`).
        helo: the EHLO/HELO name (default: this host's FQDN).
        source_address: (host, port) to bind before connecting (TCP only).
        keep_transcript: record every byte sent and received in
            :attr:`transcript` as ``("C" | "S", bytes)`` pairs (ciphertext
            once TLS is up; what is written during AUTH is redacted).
        tls: "none", "opportunistic" (STARTTLS when offered, the
            certificate not checked, else clear), "verify" (required, the
            certificate and name checked: when it is missing, refused or
            fails, nothing but QUIT is sent in clear and every message gets
            a ``tempfail``; "starttls" is its earlier name) or "implicit"
            (TLS from the first byte, port 465). None: "verify" with
            ``auth``, else "opportunistic" (docs/tls.md). A Client has one
            connection: when an opportunistic handshake fails, the message
            gets a ``tempfail``; the Engine tries that server again in
            clear.
        auth: an :class:`~smtpstate.Auth` or a ``(user, secret)`` pair.
            Credentials are never sent in clear unless
            ``Auth(allow_plaintext=True)``. When the server refuses them
            (5xx), the message fails permanently, and so does every later
            :meth:`send` of this client without connecting again: the same
            credentials would only be refused again (and may lock the
            account). Make a new Client to try other credentials.
        ca_file: PEM file of the CAs to trust; None: the system store.
        server_hostname: the name sent as SNI and required in the
            server's certificate; None: ``host`` (required for TLS over a
            unix socket, unless verification is skipped).
        dangerously_skip_certificate_verification: accept any certificate
            for any name. Only for throwaway test servers.
        ca_path, cert_file, key_file, key_password, tls_min_version,
            ciphers, ciphersuites: TLS settings as ``ssl`` has them, for
            submission: more CAs (a hashed directory), a client certificate
            and its key, the lowest version, the cipher lists
            (:class:`~smtpstate.options.Options`, docs/tls.md).

    Use it as a context manager; :meth:`send` connects when needed and
    reuses the connection for the next message.

    Ctrl-C (KeyboardInterrupt) or ``sys.exit()`` inside a Python state
    propagates from :meth:`send` at once: the connection is closed without
    QUIT and the message still gets its result (``tempfail``, or
    ``unknown`` once its final dot was out), logged and kept in
    :attr:`last_result`.

    One call at a time: a call, or a read of :attr:`capabilities`,
    :attr:`tls_version` or :attr:`connected`, made while another call runs
    (from another thread, or from one of the client's own states) raises
    LocalProtocolError instead of waiting or racing the C session.

    Raises:
        InvalidOptionError: a bad host or port (an int from 1 to 65535),
            or a bad option (unknown ``protocol`` or ``tls`` mode, missing
            ``ca_file``, bad ``auth``, ``source_address`` with a unix
            socket), or TLS settings that cannot be used (a file missing, a
            key that does not match its certificate, a cipher list OpenSSL
            refuses): all checked here, before anything connects.
    """

    def __init__(self, host: str, port: int = 25, *, timeout: Optional[float] = None,
                 machine: Optional[Machine] = None, helo: Optional[str] = None,
                 source_address: Optional[Tuple[str, int]] = None,
                 keep_transcript: bool = False, protocol: str = "smtp",
                 tls: Optional[str] = None,
                 auth: Union[Auth, Tuple[str, str], None] = None,
                 ca_file: Optional[str] = None, server_hostname: Optional[str] = None,
                 dangerously_skip_certificate_verification: bool = False,
                 ca_path: Optional[PathLike] = None, cert_file: Optional[PathLike] = None,
                 key_file: Optional[PathLike] = None,
                 key_password: Union[str, bytes, None] = None,
                 tls_min_version: str = "TLSv1.2", ciphers: Optional[str] = None,
                 ciphersuites: Optional[str] = None) -> None:
        self.options = Options.make(
            protocol=protocol, tls=tls, auth=auth, ca_file=ca_file, timeout=timeout,
            helo=helo, server_hostname=server_hostname,
            dangerously_skip_certificate_verification=dangerously_skip_certificate_verification,
            ca_path=ca_path, cert_file=cert_file, key_file=key_file,
            key_password=key_password, tls_min_version=tls_min_version, ciphers=ciphers,
            ciphersuites=ciphersuites)
        #: The socket path when ``host`` is ``"unix:/path"``, else None.
        self.unix_path = self.options.check_unix(host)
        if self.unix_path is not None:
            if source_address is not None:
                raise InvalidOptionError(
                    f"source_address={source_address!r} has no meaning for the unix "
                    f"socket {host!r}; leave it out")
            self.host, self.port = host, port
            self._where = host                  # for log lines and errors
        else:
            self.host = check_host(host)
            self.port = check_port(port)
            self._where = f"{self.host}:{self.port}"
        self.timeout = timeout
        self.machine = machine if machine is not None else default_machine
        self.helo = helo if helo is not None else _default_helo()
        self.source_address = source_address
        self.keep_transcript = keep_transcript
        self.transcript: List[Tuple[str, bytes]] = []
        self._sock: Optional[socket.socket] = None
        self._session: Optional[Session] = None
        self._results: List[Result] = []
        #: The result of the last message this client finished, returned
        #: or not (a send() interrupted by Ctrl-C in a state leaves it here).
        self.last_result: Optional[Result] = None
        self._lock = threading.Lock()
        self._selector: Optional[selectors.BaseSelector] = None
        self._out = ffi.new("const char **")
        self._keep: List[Any] = []              # cdata the C session points to
        self._auth_refused: Optional[Result] = None
        self._tracer: Optional[Tracer] = None

    # -- connection ------------------------------------------------------

    def connect(self) -> None:
        """Open the connection and read the greeting and EHLO.

        Raises:
            ConnectError: the TCP connection failed.
            LocalProtocolError: already connected.
        """
        with self._guard():
            self._connect()

    def _connect(self, wait: bool = True, start: bool = True) -> None:
        """Connect and start the session; with ``wait``, run it until the
        connection part (greeting, EHLO, STARTTLS, AUTH) is over. Without
        ``start``, the session is left new, for a message to be submitted
        before :meth:`_start`."""
        if self._session is not None:
            raise LocalProtocolError("already connected; close() first")
        connect_timeout = self.timeout if self.timeout is not None else 60.0
        try:
            sock = self._open_socket(connect_timeout)
        except OSError as exc:
            raise ConnectError(exc.errno or errno.ECONNREFUSED,
                               f"cannot connect to {self._where}: {exc}") from exc
        sock.setblocking(False)
        if self.unix_path is not None:
            # No numeric addresses: states see ("", 0), "unknown".
            peer: Tuple[str, int] = ("", 0)
            local: Tuple[str, int] = ("", 0)
        else:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer = sock.getpeername()[:2]
                local = sock.getsockname()[:2]
            except OSError as exc:
                # The server reset the connection as soon as it was made,
                # before we could even look at it (ENOTCONN): a failed
                # connection like any other, with the socket's own error.
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or exc.errno
                sock.close()
                raise ConnectError(err or errno.ECONNRESET,
                                   f"cannot connect to {self._where}: the connection was "
                                   f"reset as soon as it was made ({exc})") from exc
        keep: List[Any] = []
        try:
            session = Session(self.machine, self.helo, peer=peer, local=local)
            session.route = (self.host, peer[0] or None)
            # TLS, AUTH and the deadlines: the same code for every driver.
            self.options.apply(session._ptr, self.host, keep)
        except BaseException:
            sock.close()
            raise
        # The transcript (plaintext, credentials redacted) when it is logged.
        if Tracer.wanted():
            if self._tracer is None:
                self._tracer = Tracer()
            self._tracer.attach(session._ptr)
        self._keep = keep
        self._sock, self._session = sock, session
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ)
        if self.unix_path is not None:
            log.debug("connected to %s", self._where)
        else:
            log.debug("connected to %s:%d from %s:%d", peer[0], peer[1], local[0], local[1])
        if start:
            self._start(wait)

    def _open_socket(self, timeout: float) -> socket.socket:
        """A connected socket: TCP, or unix-domain for ``"unix:/path"``.

        Raises:
            OSError: the connect failed or timed out.
        """
        if self.unix_path is None:
            return socket.create_connection((self.host, self.port), timeout,
                                            source_address=self.source_address)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        return sock

    def _start(self, wait: bool = False) -> None:
        """Start the new session (states placed before BANNER run now)."""
        assert self._session is not None
        check(lib.smtps_session_start(self._session._ptr, _now_ms()), "start the session")
        if wait:
            self._pump(lambda: self._status() != lib.SMTPS_SESS_ACTIVE)

    def close(self) -> None:
        """Send QUIT (after any queued message) and close the connection."""
        with self._guard():
            self._close()

    def _close(self) -> None:
        s = self._session
        if s is None:
            return
        try:
            if self._status() in (lib.SMTPS_SESS_ACTIVE, lib.SMTPS_SESS_IDLE):
                check(lib.smtps_session_quit(s._ptr, _now_ms()), "quit")
            self._pump(lambda: False)
        finally:
            self._drop("client closed")

    def _drop(self, why: str) -> None:
        s, sock = self._session, self._sock
        if s is not None:
            lib.smtps_session_closed(s._ptr, why.encode(), _now_ms())
            self._collect()
            s.close()
        if self._selector is not None:
            self._selector.close()
        if sock is not None:
            sock.close()
        self._session, self._sock, self._selector = None, None, None
        # Ctrl-C in a state's free() (or stage()) while the session ended:
        # this call's caller hears it, not the next call's.
        raise_interrupt()

    # The three properties below read the C session, which a call running
    # in another thread changes and may free: they take the guard too.

    @property
    def capabilities(self) -> Optional[Capabilities]:
        """What the server's EHLO (LHLO) offered, or None when not connected.

        Raises:
            LocalProtocolError: another call of this client is running (in
                another thread, or this is one of its states: a state reads
                ``session.capabilities`` instead).
        """
        with self._guard():
            return self._session.capabilities if self._session is not None else None

    @property
    def tls_version(self) -> Optional[str]:
        """"TLSv1.3" and the like while TLS is up, else None.

        Raises:
            LocalProtocolError: as for :attr:`capabilities`.
        """
        with self._guard():
            if self._session is None:
                return None
            v = ffi.string(lib.smtps_session_tls_version(self._session._ptr)).decode("ascii")
            return v or None

    @property
    def connected(self) -> bool:
        """True while a connection is open and usable.

        Raises:
            LocalProtocolError: as for :attr:`capabilities`.
        """
        with self._guard():
            return self._session is not None and self._status() in (
                lib.SMTPS_SESS_ACTIVE, lib.SMTPS_SESS_IDLE)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- sending ---------------------------------------------------------

    def send(self, message: Message) -> Result:
        """Deliver one message and return its :class:`Result`.

        Connects first if needed (a failed connect gives a ``tempfail``
        result at stage "not connected"); a connection the server closed is
        replaced by a new one. The message is handed to the new session
        before its greeting is read, so that a failure while the
        connection is set up (greeting, EHLO, STARTTLS, the TLS handshake,
        AUTH) is this message's result, with that stage and reason.

        Raises:
            TypeError: not a Message.
            LocalProtocolError: called from inside one of this client's own
                states, or from two threads at once.
        """
        if not isinstance(message, Message):
            raise TypeError(f"send() takes a smtpstate.Message, not {type(message).__name__}")
        with self._guard():
            cmsg = message._to_c()
            result = self._send(message, cmsg)
        if message._body is not None:
            # A stream none of which was read (not connected, refused
            # before DATA) may be sent again, as a tempfail invites.
            message._body.release()
        return result

    def _send(self, message: Message, cmsg: Any) -> Result:
        tag = next(_tags)
        if self._auth_refused is not None:
            return self._refused(message, tag, self._auth_refused)
        if self._session is not None and self._status() not in (
                lib.SMTPS_SESS_ACTIVE, lib.SMTPS_SESS_IDLE):
            self._drop("connection no longer usable")
        fresh = self._session is None
        if fresh:
            try:
                self._connect(wait=False, start=False)
            except ConnectError as exc:
                return self._not_connected(message, tag, exc.strerror or str(exc))
        session = self._session
        assert session is not None
        # Mapped before submit: a state may run inside the submit call.
        session.messages[tag] = message
        rc = lib.smtps_session_submit(session._ptr, cmsg, tag, _now_ms())
        if rc < 0:
            session.messages.pop(tag, None)
            if message._body is not None:
                message._body.release()       # not taken: nothing read
            if fresh:                         # never started: nothing to QUIT
                self._drop("the message was not taken")
        if rc == lib.SMTPS_ECLOSED:
            # The session ended between the check above and the submit:
            # say so through a result.
            reason = session.reason or "the server ended the connection"
            self._drop(reason)
            return self._not_connected(message, tag, reason)
        check(rc, "submit the message")
        ffi.gc(cmsg, None)                    # the session owns it now
        if fresh:
            # Started with the message in it, as the Engine and aio
            # start theirs: a state before BANNER that fails at once
            # fails this message, in that state and with its error.
            self._start()
        self._pump(lambda: any(r.ticket == tag for r in self._results))
        for i, r in enumerate(self._results):
            if r.ticket == tag:
                return self._results.pop(i)
        raise AssertionError("the session ended without a result")  # a bug

    def send_message(self, msg: Any, sender: Optional[str] = None,
                     recipients: Optional[Sequence[str]] = None, **kwargs: Any) -> Result:
        """Deliver a standard-library ``email.message.EmailMessage``, its
        envelope taken from its headers as ``smtplib.send_message`` does
        (see :meth:`Message.from_email`, which takes the same arguments).

        Raises:
            InvalidMessageError: no sender or recipient in the headers.
            TypeError, LocalProtocolError: as for :meth:`send`.
        """
        return self.send(Message.from_email(msg, sender, recipients, **kwargs))

    def _refused(self, message: Message, tag: int, first: Result) -> Result:
        """A permfail like ``first`` (the server refused our credentials)."""
        result = unsent_result(message, tag, "permfail", not_attempted(first.reason),
                               stage=first.stage, stage_code=first.stage_code,
                               state=first.state)
        log_result(result, f"{self._where} ")
        self.last_result = result
        return result

    def _not_connected(self, message: Message, tag: int, why: str) -> Result:
        result = unsent_result(message, tag, "tempfail", why)
        log_result(result, f"{self._where} ")
        self.last_result = result
        return result

    # -- the byte pump ---------------------------------------------------

    def _guard(self) -> "_Guard":
        return _Guard(self._lock)

    def _status(self) -> int:
        assert self._session is not None
        return int(lib.smtps_session_status(self._session._ptr))

    def _collect(self) -> None:
        s = self._session
        if s is None:
            return
        while (result := s.next_result()) is not None:
            if (result.status == "permfail" and result.state == "AUTH"
                    and self._auth_refused is None):
                self._auth_refused = result
            log_result(result, f"{self._where} ")
            self._results.append(result)
            self.last_result = result

    def _pump(self, done: Any) -> None:
        """Move bytes until done() or the session needs nothing more."""
        s, sock, sel = self._session, self._sock, self._selector
        assert s is not None and sock is not None and sel is not None
        ptr = s._ptr
        out = self._out
        events = selectors.EVENT_READ
        self._collect()                         # submit() may have settled one
        while True:
            if interrupt_pending():
                # Ctrl-C (or sys.exit()) in a state: C has ended the
                # connection and settled its messages; close it here too,
                # keep the results (last_result), and let it reach the caller.
                self._drop(s.reason or "interrupted")
                raise_interrupt()
            if done():
                return
            status = lib.smtps_session_status(ptr)
            n = lib.smtps_session_output(ptr, out)
            if status == lib.SMTPS_SESS_CLOSED:
                return
            if status == lib.SMTPS_SESS_CLOSING and n == 0:
                self._drop(s.reason or "closed after QUIT")
                return
            if status == lib.SMTPS_SESS_IDLE and n == 0:
                return
            if n:
                data = ffi.buffer(out[0], n)
                try:
                    sent = sock.send(data)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    self._lost(str(exc))
                    continue
                if sent:
                    if self.keep_transcript:
                        chunk = bytes(data[:sent])
                        if lib.smtps_session_state(ptr) == lib.SMTPS_STATE_AUTH:
                            chunk = b"[%d bytes of AUTH exchange redacted]" % sent
                        self.transcript.append(("C", chunk))
                    lib.smtps_session_consume(ptr, sent, _now_ms())
                    continue
            want = selectors.EVENT_READ | (selectors.EVENT_WRITE if n else 0)
            if want != events:
                sel.modify(sock, want)
                events = want
            deadline = lib.smtps_session_deadline(ptr)
            wait = None if deadline < 0 else max(0.0, (deadline - _now_ms()) / 1000)
            ready = sel.select(wait)
            if not ready:
                check(lib.smtps_session_tick(ptr, _now_ms()), "tick")
                self._collect()
                continue
            if not ready[0][1] & selectors.EVENT_READ:
                continue
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                self._lost(str(exc))
                continue
            if not chunk:
                self._lost("the server closed the connection")
                continue
            if self.keep_transcript:
                self.transcript.append(("S", chunk))
            rc = lib.smtps_session_feed(ptr, chunk, len(chunk), _now_ms())
            if rc == lib.SMTPS_ESTATE:          # a state called back into us
                check(rc, "feed")
            self._collect()                     # a broken reply is a result, not an error

    def _lost(self, why: str) -> None:
        assert self._session is not None
        lib.smtps_session_closed(self._session._ptr, why.encode("utf-8", "replace"), _now_ms())
        self._collect()


class _Guard:
    """One call at a time: a second caller (a thread, or a state calling back
    into its own client) is refused at once instead of deadlocking."""

    __slots__ = ("lock",)

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock

    def __enter__(self) -> None:
        if not self.lock.acquire(blocking=False):
            raise LocalProtocolError(
                "this Client is already in use (a re-entrant call from one "
                "of its states, or another thread); one call at a time")

    def __exit__(self, *exc: Any) -> None:
        self.lock.release()
