"""Test helpers shared by the test modules: real SMTP peers and utilities.

This module owns the servers that interop tests talk to, and nothing here is
a pytest fixture (``conftest.py`` wraps these classes in fixtures):

* ``AiosmtpdServer`` -- aiosmtpd (PyPI) in a thread on 127.0.0.1, on a port
  the kernel picks, recording every message and every connection's bytes;
* ``PostfixServer`` -- a private Postfix instance (its own ``master``,
  config, queue and data directories in a temporary directory) whose real
  ``smtpd`` accepts mail for ``example.test`` and delivers it to a maildir
  that the test reads back;
* ``SmtpSinkServer`` -- Postfix's ``smtp-sink`` capturing each transaction
  to a file.

All three report messages as ``ReceivedMessage``: the envelope and the
content exactly as the server took it (dot-unstuffed, CRLF line endings,
without the end-of-data line), so a test can compare bytes.

Missing prerequisites: ``missing(reason)`` skips the test on a developer
machine but fails it in CI (``CI`` set to anything but ``""``/``0``/``false``/
``no``), where ``.ci/run`` must have installed everything. Nothing in tests/
calls ``pytest.skip``, ``pytest.mark.skipif`` or ``pytest.importorskip``
itself: ``missing()`` inside a test or fixture, ``requires(available,
reason)`` as the marker (conftest.py acts on it before each test), and
``import_or_missing(name)`` for a module-level import
(``test_fixtures_smoke.py`` checks that it stays so).
"""

from __future__ import annotations

import atexit
import dataclasses
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import pytest

__all__ = [
    "AiosmtpdServer",
    "PostfixError",
    "PostfixServer",
    "ReceivedMessage",
    "RecordingHandler",
    "SmtpSinkServer",
    "ehlo_keywords",
    "find_program",
    "check_prerequisites",
    "free_port",
    "import_or_missing",
    "in_ci",
    "lf_to_crlf",
    "missing",
    "register_markers",
    "requires",
    "wait_until",
]

LOOPBACK = "127.0.0.1"

POSTFIX_DAEMON_DIR = "/usr/lib/postfix/sbin"
POSTFIX_COMMAND_DIR = "/usr/sbin"


# ---------------------------------------------------------------------------
# Generic utilities
# ---------------------------------------------------------------------------


def in_ci() -> bool:
    """True when running under CI, where nothing may be skipped for lack of
    a program."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(reason: str, module_level: bool = False) -> None:
    """Skip the current test (with ``module_level``, the whole test module,
    from its top level) for a missing prerequisite; fail it in CI."""
    if in_ci():
        pytest.fail("%s (CI must provide it: see .ci/run)" % reason, pytrace=False)
    pytest.skip(reason, allow_module_level=module_level)


def import_or_missing(name: str) -> Any:
    """``pytest.importorskip`` through :func:`missing`: the module, or the
    test module that imports it at its top skipped (failed in CI)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        missing("%s is not installed (pip install '.[test]')" % name, module_level=True)


#: The marker :func:`requires` puts on a test.
PREREQUISITE_MARKER = "prerequisite"


def requires(available: bool, reason: str) -> Any:
    """``pytest.mark.skipif`` through :func:`missing`, as a marker::

        @requires(have_ipv6(), "no IPv6 loopback (::1) here")
        def test_ipv6(): ...

    runs the test when ``available``; otherwise the test is ``missing(reason)``
    (conftest.py calls :func:`check_prerequisites` before each test)."""
    return getattr(pytest.mark, PREREQUISITE_MARKER)(available=bool(available), reason=reason)


def register_markers(config: Any) -> None:
    """pytest_configure: declare the :func:`requires` marker."""
    config.addinivalue_line(
        "markers", "%s(available, reason): run only when available, else "
        "helpers.missing(reason): skipped here, failed in CI" % PREREQUISITE_MARKER)


def check_prerequisites(item: Any) -> None:
    """pytest_runtest_setup: a test marked by :func:`requires` with its
    prerequisite unavailable is ``missing()``."""
    for mark in item.iter_markers(PREREQUISITE_MARKER):
        if not mark.kwargs["available"]:
            missing(mark.kwargs["reason"])


def find_program(name: str, *dirs: str) -> Optional[str]:
    """Return the path of program ``name`` found in ``dirs`` or $PATH."""
    for d in dirs:
        path = os.path.join(d, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return shutil.which(name)


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that was free a moment ago.

    Only for servers that cannot be told to bind port 0 themselves (Postfix
    and smtp-sink); callers retry with a new port if the bind then fails.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> Any:
    """Poll ``predicate`` until it returns something true; return that.

    Raises:
        TimeoutError: ``predicate`` stayed false for ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def server_tls(ca: Any, name: str) -> Tuple[Any, bytes]:
    """A server's STARTTLS context (``ssl.SSLContext``) whose certificate,
    issued by the trustme CA ``ca``, names ``name``; and that
    certificate's PEM (for TLSA records)."""
    import ssl
    leaf = ca.issue_cert(name)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(ctx)
    return ctx, leaf.cert_chain_pems[0].bytes()


def lf_to_crlf(data: bytes) -> bytes:
    """Turn the LF line endings of a stored message back into CRLF."""
    return data.replace(b"\n", b"\r\n")


def ehlo_keywords(
    host: str, port: int, name: str = "probe.smtpstate.test", timeout: float = 10.0
) -> Dict[str, str]:
    """Say EHLO over a raw socket; return {KEYWORD: parameters} the server
    offers (the greeting line excluded)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        f = s.makefile("rb")

        def reply() -> List[bytes]:
            lines = []
            while True:
                line = f.readline()
                if not line:
                    raise ConnectionError("server closed the connection")
                lines.append(line.rstrip(b"\r\n"))
                if line[3:4] != b"-":
                    return lines

        banner = reply()
        if not banner[0].startswith(b"220"):
            raise ConnectionError("bad banner %r" % banner)
        s.sendall(b"EHLO " + name.encode() + b"\r\n")
        lines = reply()
        s.sendall(b"QUIT\r\n")
        try:
            reply()
        except (ConnectionError, OSError):
            pass
    if not lines[0].startswith(b"250"):
        raise ConnectionError("EHLO refused: %r" % lines)
    caps = {}
    for line in lines[1:]:
        keyword, _, params = line[4:].decode("ascii", "replace").partition(" ")
        caps[keyword.upper()] = params
    return caps


@dataclasses.dataclass
class ReceivedMessage:
    """One message as a server took it.

    ``data`` is the content as the server received it: dot-unstuffed, with
    CRLF line endings, without the end-of-data line -- the bytes a correct
    client was asked to deliver (its last line completed by CRLF).
    """

    mail_from: str
    rcpt_tos: List[str]
    data: bytes
    mail_options: List[str] = dataclasses.field(default_factory=list)
    rcpt_options: List[str] = dataclasses.field(default_factory=list)
    peer: Any = None  # (host, port) for aiosmtpd, the address for others
    helo: Optional[str] = None
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------
# aiosmtpd
# ---------------------------------------------------------------------------


class RecordingHandler:
    """aiosmtpd handler that accepts every message and records it.

    Subclass and override ``handle_RCPT`` and friends to script refusals;
    call ``super().handle_DATA`` to keep the recording.
    """

    def __init__(self) -> None:
        self.messages: List[ReceivedMessage] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope) -> str:
        msg = ReceivedMessage(
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            data=bytes(envelope.original_content),
            mail_options=list(envelope.mail_options),
            rcpt_options=list(envelope.rcpt_options),
            peer=session.peer,
            helo=session.host_name,
            extra={
                "smtp_utf8": envelope.smtp_utf8,
                "tls": session.ssl is not None,
                "proxy_data": session.proxy_data,
                "auth_data": session.auth_data,
            },
        )
        with self.lock:
            self.messages.append(msg)
        return "250 2.0.0 OK"


@dataclasses.dataclass
class Connection:
    """The bytes one client connection sent to an aiosmtpd server, in order
    (after TLS decryption once STARTTLS is done)."""

    peer: Any
    received: bytearray = dataclasses.field(default_factory=bytearray)


class AiosmtpdServer:
    """aiosmtpd Controller on 127.0.0.1 and a port chosen by the kernel.

    Args:
        handler: the aiosmtpd handler; a new ``RecordingHandler`` if None.
        smtp_class: a subclass of ``aiosmtpd.smtp.SMTP`` to serve with (one
            that speaks an extension aiosmtpd lacks); ``SMTP`` if None.
        **kwargs: passed to ``aiosmtpd.controller.Controller`` and through
            it to ``aiosmtpd.smtp.SMTP`` (``enable_SMTPUTF8``,
            ``proxy_protocol_timeout``, ``tls_context``, ``require_starttls``,
            ``authenticator``, ``auth_require_tls``, ``data_size_limit``,
            ``server_hostname``, ``ssl_context`` ...).

    Attributes:
        host, port: where it listens.
        messages: the handler's ``ReceivedMessage`` list.
        connections: a ``Connection`` per client connection that sent bytes.
    """

    def __init__(self, handler: Any = None, smtp_class: Any = None, **kwargs: Any) -> None:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import SMTP

        self.handler = handler if handler is not None else RecordingHandler()
        self.host = LOOPBACK
        self.port = 0
        self.connections: List[Connection] = []
        owner = self

        class RecordingSMTP(smtp_class if smtp_class is not None else SMTP):  # type: ignore[misc]
            # asyncio hands each chunk the client sent to data_received();
            # keeping them gives tests the exact bytes on the wire.
            def data_received(self, data: bytes) -> None:
                conn = getattr(self, "_smtpstate_conn", None)
                if conn is None:
                    conn = Connection(peer=self.session.peer if self.session else None)
                    self._smtpstate_conn = conn
                    owner.connections.append(conn)
                conn.received += data
                super().data_received(data)

        class PortZeroController(Controller):
            # Controller binds self.port; bind port 0 instead, so that there
            # is no window in which another process can take our port, and
            # publish the port the kernel chose before start() probes it.
            def _create_server(self):
                return self._bind_any_port()

            async def _bind_any_port(self):
                srv = await self.loop.create_server(
                    self._factory_invoker,
                    host=self.hostname,
                    port=0,
                    ssl=self.ssl_context,
                )
                self.port = srv.sockets[0].getsockname()[1]
                return srv

            def factory(self):
                return RecordingSMTP(self.handler, **self.SMTP_kwargs)

        self.controller = PortZeroController(self.handler, hostname=self.host, port=0, **kwargs)

    @property
    def messages(self) -> List[ReceivedMessage]:
        return self.handler.messages

    def start(self) -> "AiosmtpdServer":
        self.controller.start()
        self.port = self.controller.port
        return self

    def stop(self) -> None:
        if self.controller._thread is not None:
            self.controller.stop()

    def wait_for_messages(self, count: int = 1, timeout: float = 10.0) -> List[ReceivedMessage]:
        """Wait until at least ``count`` messages arrived; return them all."""
        wait_until(lambda: len(self.messages) >= count, timeout, what="%d message(s)" % count)
        return list(self.messages)

    def __enter__(self) -> "AiosmtpdServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ---------------------------------------------------------------------------
# Postfix
# ---------------------------------------------------------------------------


class PostfixError(RuntimeError):
    """The private Postfix instance could not be set up or misbehaved."""


def _world_traversable(path: str) -> bool:
    """True when every directory from / to path lets others search it, so
    that Postfix's unprivileged daemons can reach their queue."""
    path = os.path.abspath(path)
    while True:
        if not os.stat(path).st_mode & 0o001:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def _private_tempdir(prefix: str) -> str:
    """mkdtemp() in a place Postfix's unprivileged daemons can reach."""
    base = tempfile.gettempdir()
    if not _world_traversable(base):
        base = "/tmp"
    path = tempfile.mkdtemp(prefix=prefix, dir=base)
    os.chmod(path, 0o755)
    return path


# The services of the private master.cf: the default Debian set trimmed to
# what one smtpd and local virtual delivery need, nothing chrooted (the
# queue is not laid out for chroot), plus postlogd for maillog_file.
_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixServer:
    """A private Postfix instance: real ``smtpd`` on 127.0.0.1, maildir
    delivery into a temporary directory.

    Layout under ``root`` (mode 0755 so the ``postfix`` user can reach it):
    ``etc/`` (main.cf, master.cf, the virtual mailbox map), ``queue/``
    (created by ``postfix check`` with Postfix's own owners and modes),
    ``data/`` (owned by postfix), ``mail/`` (owned by ``nobody``, the
    virtual delivery user) and ``maillog`` (Postfix's log, via postlogd).

    Mail for ``@example.test`` (``DOMAINS``) is accepted and delivered to
    one maildir, except recipients whose local part starts with
    ``unknown``: those get ``550 5.1.1 User unknown``. Any other domain
    gets ``554 5.7.1 Relay access denied``. Nothing ever leaves the machine:
    the default and relay transports are ``error``.

    ``smtpd`` keeps Postfix's defaults for the extensions (PIPELINING, SIZE,
    8BITMIME, DSN, SMTPUTF8, CHUNKING, ENHANCEDSTATUSCODES); ``start()``
    checks them with a raw EHLO. With ``tls`` (a ``trustme.CA``), it also
    offers STARTTLS with a certificate for 127.0.0.1 and localhost.

    Postfix's ``master`` must run as root; its daemons drop to ``postfix``.

    Args:
        main_cf: extra main.cf settings, overriding the defaults.
        tls: a ``trustme.CA`` to issue the server certificate, or None.
    """

    DOMAINS = ("example.test",)
    HOSTNAME = "postfix.smtpstate.test"

    def __init__(self, main_cf: Optional[Dict[str, str]] = None, tls: Any = None) -> None:
        self.main_cf_overrides = dict(main_cf or {})
        self.tls_ca = tls
        self.host = LOOPBACK
        self.port = 0
        self.root: Optional[str] = None
        self.running = False

    # -- paths --------------------------------------------------------------

    def _p(self, *parts: str) -> str:
        assert self.root is not None
        return os.path.join(self.root, *parts)

    @property
    def config_dir(self) -> str:
        return self._p("etc")

    @property
    def queue_dir(self) -> str:
        return self._p("queue")

    @property
    def maildir(self) -> str:
        return self._p("mail", "maildir")

    @property
    def maillog(self) -> str:
        return self._p("maillog")

    # -- set-up -------------------------------------------------------------

    @staticmethod
    def unavailable() -> Optional[str]:
        """Why this machine cannot run a private Postfix, or None."""
        for prog in ("postfix", "postconf"):
            if not find_program(prog, POSTFIX_COMMAND_DIR):
                return "Postfix is not installed (no %s)" % prog
        for prog in ("master", "smtpd", "virtual", "cleanup", "qmgr", "postlogd"):
            if not os.path.exists(os.path.join(POSTFIX_DAEMON_DIR, prog)):
                return "Postfix daemon %s not found in %s" % (prog, POSTFIX_DAEMON_DIR)
        if os.geteuid() != 0:
            return "a private Postfix instance needs root (its master runs as root)"
        for user in ("postfix", "nobody"):
            try:
                pwd.getpwnam(user)
            except KeyError:
                return "no %r user" % user
        try:
            grp.getgrnam("postdrop")
        except KeyError:
            return "no 'postdrop' group"
        return None

    def _main_cf(self) -> Dict[str, str]:
        nobody = pwd.getpwnam("nobody")
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue_dir,
            "data_directory": self._p("data"),
            "command_directory": POSTFIX_COMMAND_DIR,
            "daemon_directory": POSTFIX_DAEMON_DIR,
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": self.HOSTNAME,
            "mydomain": "smtpstate.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            # Only our virtual domains; no relaying, even from mynetworks.
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_recipient_restrictions": "",
            "virtual_mailbox_domains": ", ".join(self.DOMAINS),
            "virtual_mailbox_base": self._p("mail"),
            "virtual_mailbox_maps": "regexp:" + self._p("etc", "vmailbox"),
            "virtual_uid_maps": "static:%d" % nobody.pw_uid,
            "virtual_gid_maps": "static:%d" % nobody.pw_gid,
            "virtual_minimum_uid": "1",
            # Nothing leaves the machine, bounces included.
            "default_transport": "error:outbound mail is disabled in tests",
            "relay_transport": "error:outbound mail is disabled in tests",
            # Deliver the content as received: no header rewriting or
            # added headers for "local" clients (127.0.0.1 would be one).
            "local_header_rewrite_clients": "",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            # Fast and deterministic under test load.
            "smtpd_peername_lookup": "no",
            "smtpd_error_sleep_time": "0",
            "smtpd_soft_error_limit": "1000",
            "smtpd_hard_error_limit": "1000",
            "smtpd_junk_command_limit": "1000",
            "in_flow_delay": "0",
            "smtpd_banner": "$myhostname ESMTP Postfix (smtpstate tests)",
            "maillog_file": self.maillog,
            "maillog_file_prefixes": self.root,
        }
        if self.tls_ca is not None:
            settings.update(
                {
                    "smtpd_tls_security_level": "may",
                    "smtpd_tls_chain_files": self._p("etc", "server.pem"),
                    "smtpd_tls_loglevel": "1",
                }
            )
        settings.update(self.main_cf_overrides)
        return settings

    def _write_config(self) -> None:
        etc = self.config_dir
        with open(os.path.join(etc, "main.cf"), "w") as f:
            for key, value in self._main_cf().items():
                f.write("%s = %s\n" % (key, value))
        with open(os.path.join(etc, "master.cf"), "w") as f:
            f.write(_MASTER_CF.format(listen="%s:%d" % (self.host, self.port)))
        # One maildir for everybody but "unknown*" (regexp tables see the
        # whole address, so there is no @domain catch-all to worry about).
        with open(os.path.join(etc, "vmailbox"), "w") as f:
            f.write("!/^unknown[^@]*@/\tmaildir/\n")
        if self.tls_ca is not None:
            cert = self.tls_ca.issue_cert(LOOPBACK, "localhost", self.HOSTNAME)
            cert.private_key_and_cert_chain_pem.write_to_path(os.path.join(etc, "server.pem"))

    def _postfix(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [find_program("postfix", POSTFIX_COMMAND_DIR) or "postfix", "-c", self.config_dir, *args]
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise PostfixError(
                "%s failed (exit %d): %s\n--- maillog ---\n%s"
                % (" ".join(cmd), proc.returncode, proc.stdout.decode(errors="replace"), self.log_tail())
            )
        return proc

    def start(self, attempts: int = 3) -> "PostfixServer":
        """Lay out the instance, start its master and wait until its smtpd
        answers EHLO with the expected extensions.

        Raises:
            PostfixError: Postfix could not be started.
        """
        why = self.unavailable()
        if why:
            raise PostfixError(why)
        self.root = _private_tempdir("smtpstate-postfix-")
        # The fixtures stop us; this is for a test run that dies first.
        atexit.register(self.cleanup)
        for d in ("etc", "queue", "data", "mail"):
            os.mkdir(self._p(d), 0o755)
        pf = pwd.getpwnam("postfix")
        nobody = pwd.getpwnam("nobody")
        os.chown(self._p("data"), pf.pw_uid, pf.pw_gid)
        os.chmod(self._p("data"), 0o700)
        os.chown(self._p("mail"), nobody.pw_uid, nobody.pw_gid)

        last: Optional[Exception] = None
        for _ in range(attempts):
            # The port is free now but may be taken before master binds it:
            # on failure, try again with another one.
            self.port = free_port(self.host)
            self._write_config()
            try:
                # "check" creates the queue directories with Postfix's own
                # owners and modes (post-install create-missing).
                self._postfix("check")
                self._postfix("start")
                self.running = True
                self._wait_ready()
                return self
            except (PostfixError, OSError, TimeoutError) as e:
                last = e
                self.stop()
        raise PostfixError("could not start Postfix: %s" % last)

    DEFAULT_KEYWORDS = frozenset(
        {"PIPELINING", "CHUNKING", "SMTPUTF8", "DSN", "8BITMIME", "ENHANCEDSTATUSCODES", "SIZE"}
    )

    def expected_keywords(self) -> set:
        """The EHLO keywords this configuration must offer: Postfix's
        defaults, less what main_cf turns off, plus STARTTLS with tls."""
        wanted = set(self.DEFAULT_KEYWORDS)
        cf = {k: str(v).strip().lower() for k, v in self.main_cf_overrides.items()}
        wanted -= {w.upper() for w in re.split(r"[\s,]+", cf.get("smtpd_discard_ehlo_keywords", "")) if w}
        if cf.get("smtputf8_enable") in ("no", "false", "0"):
            wanted.discard("SMTPUTF8")
        if cf.get("message_size_limit") == "0":
            wanted.discard("SIZE")
        if self.tls_ca is not None and cf.get("smtpd_tls_security_level", "may") not in ("none", ""):
            wanted.add("STARTTLS")
        return wanted

    def _wait_ready(self, timeout: float = 20.0) -> None:
        def probe():
            try:
                return ehlo_keywords(self.host, self.port)
            except OSError:
                return None

        caps = wait_until(probe, timeout, interval=0.1, what="Postfix smtpd on port %d" % self.port)
        absent = self.expected_keywords() - set(caps)
        if absent:
            raise PostfixError("Postfix smtpd does not offer %s (EHLO: %r)" % (sorted(absent), caps))
        self.capabilities = caps

    def stop(self) -> None:
        """Stop the instance (gracefully, then by force). Idempotent."""
        if self.root is None or not os.path.exists(self.config_dir):
            return
        if self.running:
            try:
                self._postfix("stop", check=False, timeout=30)
            except subprocess.TimeoutExpired:
                pass
        # "postfix stop" ends in kill -9 of the process group if master
        # lingers; make sure nothing of ours survives if it was not reached.
        pid = self._master_pid()
        if pid:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        self.running = False

    def _master_pid(self) -> Optional[int]:
        try:
            with open(os.path.join(self.queue_dir, "pid", "master.pid")) as f:
                pid = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                if b"master" not in f.read():
                    return None
        except OSError:
            return None
        return pid

    def cleanup(self) -> None:
        """Stop and remove the temporary directory."""
        self.stop()
        if self.root and os.path.isdir(self.root):
            shutil.rmtree(self.root, ignore_errors=True)

    # -- reading back -------------------------------------------------------

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.maillog, "rb") as f:
                return b"".join(f.readlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return "(no maillog)"

    def queue_files(self) -> List[str]:
        """Queue files not yet delivered (incoming, active, deferred, hold)."""
        found = []
        for sub in ("incoming", "active", "deferred", "hold", "maildrop"):
            top = os.path.join(self.queue_dir, sub)
            for dirpath, _, files in os.walk(top):
                found.extend(os.path.join(dirpath, f) for f in files)
        return found

    def wait_idle(self, timeout: float = 20.0) -> None:
        """Wait until the queue is empty: everything accepted is delivered.

        Raises:
            PostfixError: mail is still queued after ``timeout`` seconds.
        """
        try:
            wait_until(lambda: not self.queue_files(), timeout, what="an empty Postfix queue")
        except TimeoutError:
            raise PostfixError(
                "mail still queued: %s\n--- maillog ---\n%s" % (self.queue_files(), self.log_tail())
            ) from None

    def _delivered_files(self) -> List[str]:
        new = os.path.join(self.maildir, "new")
        try:
            names = os.listdir(new)
        except FileNotFoundError:
            return []

        def order(name: str) -> Tuple[int, int, str]:
            # Maildir names are "SECONDS.V<dev>I<inode>M<usec>.host".
            m = re.match(r"(\d+)\.\S*?M(\d+)", name)
            return (int(m.group(1)), int(m.group(2)), name) if m else (0, 0, name)

        return [os.path.join(new, n) for n in sorted(names, key=order)]

    def deliveries(self) -> List[Dict[str, Any]]:
        """Every delivered copy, one per recipient, in delivery order."""
        out = []
        for path in self._delivered_files():
            with open(path, "rb") as f:
                out.append(self.parse_delivery(f.read(), path))
        return out

    @classmethod
    def parse_delivery(cls, raw: bytes, path: str = "") -> Dict[str, Any]:
        """Split one maildir file into what Postfix added and the content.

        virtual(8) prepends Return-Path, X-Original-To and Delivered-To;
        smtpd(8) prepends its Received header ("by <HOSTNAME> (Postfix)
        ... id <queue id>"). What follows is the content as received, with
        LF line endings.
        """
        added: Dict[str, str] = {}
        rest = raw
        while True:
            m = re.match(rb"(Return-Path|X-Original-To|Delivered-To): ?([^\n]*)\n", rest)
            if not m:
                break
            added[m.group(1).decode()] = m.group(2).decode("utf-8", "surrogateescape")
            rest = rest[m.end():]
        m = re.match(rb"Received: [^\n]*\n(?:[ \t][^\n]*\n)*", rest)
        if not m or (b"by " + cls.HOSTNAME.encode() + b" (Postfix)") not in m.group(0):
            raise PostfixError("no Received header of ours in %s: %r" % (path, raw[:500]))
        received = m.group(0)
        qid = re.search(rb"\bid ([0-9A-Za-z]+)", received)
        content = rest[m.end():]
        return {
            "path": path,
            "queue_id": qid.group(1).decode() if qid else "",
            "sender": added.get("Return-Path", "").strip("<>"),
            "recipient": added.get("X-Original-To", added.get("Delivered-To", "")),
            "delivered_to": added.get("Delivered-To", ""),
            "received": received.decode("utf-8", "surrogateescape"),
            "content": content,
            "raw": raw,
        }

    def messages(self) -> List[ReceivedMessage]:
        """Delivered messages, the copies of one queue file merged into one
        ``ReceivedMessage`` (``rcpt_tos`` in delivery order)."""
        by_id: Dict[str, ReceivedMessage] = {}
        out: List[ReceivedMessage] = []
        for d in self.deliveries():
            msg = by_id.get(d["queue_id"])
            if msg is None:
                helo = re.match(r"Received: from (\S+)", d["received"])
                msg = ReceivedMessage(
                    mail_from=d["sender"],
                    rcpt_tos=[],
                    data=lf_to_crlf(d["content"]),
                    helo=helo.group(1) if helo else None,
                    extra={"queue_id": d["queue_id"], "received": d["received"], "paths": []},
                )
                by_id[d["queue_id"]] = msg
                out.append(msg)
            msg.rcpt_tos.append(d["recipient"])
            msg.extra["paths"].append(d["path"])
        return out

    def wait_for_messages(self, count: int = 1, timeout: float = 20.0) -> List[ReceivedMessage]:
        """Wait until ``count`` messages are delivered and the queue is
        empty (so that every recipient's copy is there); return them all.

        Raises:
            PostfixError: fewer messages after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            # The queue first: read after it, the maildir holds every copy
            # of what left the queue (read before, a copy delivered in
            # between would be missing from a message found "complete").
            idle = not self.queue_files()
            msgs = self.messages()
            if len(msgs) >= count and idle:
                return msgs
            if time.monotonic() >= deadline:
                raise PostfixError(
                    "%d message(s) delivered, %d expected; queued: %s\n--- maillog ---\n%s"
                    % (len(msgs), count, self.queue_files(), self.log_tail())
                )
            time.sleep(0.02)

    def clear(self, timeout: float = 20.0) -> None:
        """Wait for the queue to drain, then forget every delivered message."""
        self.wait_idle(timeout)
        for path in self._delivered_files():
            os.unlink(path)

    def __enter__(self) -> "PostfixServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()


# ---------------------------------------------------------------------------
# smtp-sink
# ---------------------------------------------------------------------------


class SmtpSinkServer:
    """Postfix's ``smtp-sink`` on 127.0.0.1, dumping each transaction to a
    file (``-d``), as a second, very different real peer.

    smtp-sink offers PIPELINING, 8BITMIME, AUTH, XCLIENT, XFORWARD,
    ENHANCEDSTATUSCODES and DSN (no CHUNKING, no SMTPUTF8) and answers
    everything with success unless told otherwise.

    Args:
        options: extra smtp-sink options (``["-r", "RCPT"]``, ``["-p"]``...).
        hostname: the name in its greeting (``-h``).
    """

    HEADER_NAMES = (b"X-Client-Addr", b"X-Client-Proto", b"X-Helo-Args", b"X-Mail-Args", b"X-Rcpt-Args")

    def __init__(self, options: Iterable[str] = (), hostname: str = "sink.smtpstate.test") -> None:
        self.options = list(options)
        self.hostname = hostname
        self.host = LOOPBACK
        self.port = 0
        self.root: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None

    @staticmethod
    def unavailable() -> Optional[str]:
        if not find_program("smtp-sink", POSTFIX_COMMAND_DIR):
            return "smtp-sink (Debian package postfix) is not installed"
        return None

    @property
    def dump_dir(self) -> str:
        assert self.root is not None
        return os.path.join(self.root, "dump")

    def start(self, attempts: int = 3) -> "SmtpSinkServer":
        why = self.unavailable()
        if why:
            raise RuntimeError(why)
        self.root = _private_tempdir("smtpstate-sink-")
        atexit.register(self.cleanup)
        os.mkdir(self.dump_dir, 0o755)
        user = None
        if os.geteuid() == 0:
            # smtp-sink refuses to keep root; its dumps are then written as
            # that user.
            user = "nobody"
            nobody = pwd.getpwnam(user)
            os.chown(self.dump_dir, nobody.pw_uid, nobody.pw_gid)
        prog = find_program("smtp-sink", POSTFIX_COMMAND_DIR)
        last = ""
        for _ in range(attempts):
            self.port = free_port(self.host)
            cmd = [prog, "-h", self.hostname]
            if user:
                cmd += ["-u", user]
            cmd += ["-d", os.path.join(self.dump_dir, "%Y%m%d%H%M%S.")]
            cmd += self.options + ["%s:%d" % (self.host, self.port), "1024"]
            self.log_path = os.path.join(self.root, "smtp-sink.log")
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            try:
                wait_until(self._ready, 10.0, what="smtp-sink on port %d" % self.port)
                return self
            except TimeoutError:
                with open(self.log_path, "rb") as f:
                    last = f.read().decode(errors="replace")
                self.stop()
        raise RuntimeError("could not start smtp-sink: %s" % last)

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise TimeoutError("smtp-sink exited with %s" % self.proc.returncode)
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        if self.root and os.path.isdir(self.root):
            shutil.rmtree(self.root, ignore_errors=True)

    # What smtp-sink -v logs of each command it reads: the line as the
    # client sent it ("." for the end of data), after the program's name.
    _COMMAND_LOG = re.compile(r"^\S*smtp-sink: ((?:[A-Z][A-Z0-9]{2,}\b.*)|\.)$")

    def commands(self) -> List[str]:
        """The command lines smtp-sink read, in order, over every
        connection, from its log: only when started with ``-v`` ("show the
        SMTP conversations"). AUTH lines carry their credentials."""
        try:
            with open(self.log_path, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except (AttributeError, OSError):
            return []
        return [m.group(1) for m in map(self._COMMAND_LOG.match, text.splitlines()) if m]

    def _dump_files(self) -> List[str]:
        try:
            names = os.listdir(self.dump_dir)
        except FileNotFoundError:
            return []
        paths = [os.path.join(self.dump_dir, n) for n in names]
        return sorted(paths, key=lambda p: (os.stat(p).st_mtime_ns, p))

    @classmethod
    def parse_dump(cls, raw: bytes) -> ReceivedMessage:
        """One smtp-sink dump file: its X- headers, its three-line Received
        header, the content with LF line endings, then one empty line."""
        fields: Dict[str, List[str]] = {}
        rest = raw
        while True:
            m = re.match(rb"(X-[A-Za-z-]+): ?([^\n]*)\n", rest)
            if not m or m.group(1) not in cls.HEADER_NAMES:
                break
            fields.setdefault(m.group(1).decode(), []).append(m.group(2).decode("utf-8", "surrogateescape"))
            rest = rest[m.end():]
        m = re.match(rb"Received: [^\n]*\n(?:[ \t][^\n]*\n)*", rest)
        if not m:
            raise ValueError("not an smtp-sink dump: %r" % raw[:300])
        content = rest[m.end():]
        if content.endswith(b"\n"):
            content = content[:-1]  # the empty line smtp-sink appends

        def addr_and_options(args: str) -> Tuple[str, List[str]]:
            m = re.match(r"\s*<([^>]*)>\s*(.*)$", args)
            if m:
                return m.group(1), m.group(2).split()
            head, _, tail = args.strip().partition(" ")
            return head, tail.split()

        mail_from, mail_opts = addr_and_options(fields.get("X-Mail-Args", [""])[0])
        rcpts, rcpt_opts = [], []
        for args in fields.get("X-Rcpt-Args", []):
            addr, opts = addr_and_options(args)
            rcpts.append(addr)
            rcpt_opts.append(" ".join(opts))
        return ReceivedMessage(
            mail_from=mail_from,
            rcpt_tos=rcpts,
            data=lf_to_crlf(content),
            mail_options=mail_opts,
            rcpt_options=rcpt_opts,
            peer=fields.get("X-Client-Addr", [None])[0],
            helo=fields.get("X-Helo-Args", [None])[0],
            extra={"proto": fields.get("X-Client-Proto", [None])[0], "raw": raw},
        )

    def messages(self) -> List[ReceivedMessage]:
        out = []
        for path in self._dump_files():
            with open(path, "rb") as f:
                raw = f.read()
            # A transaction still being received has no end yet.
            if raw.endswith(b"\n\n"):
                try:
                    out.append(self.parse_dump(raw))
                except ValueError:
                    continue
        return out

    def wait_for_messages(self, count: int = 1, timeout: float = 10.0) -> List[ReceivedMessage]:
        """Wait until ``count`` dump files are complete; return them all."""
        return wait_until(
            lambda: (lambda m: m if len(m) >= count else None)(self.messages()),
            timeout,
            what="%d smtp-sink dump(s)" % count,
        )

    def __enter__(self) -> "SmtpSinkServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()
