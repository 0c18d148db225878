"""pytest fixtures: the real SMTP servers interop tests talk to.

The servers themselves live in ``helpers.py``; this file only decides their
lifetimes:

* ``aiosmtpd_server`` -- a fresh recording aiosmtpd per test;
  ``aiosmtpd_factory(**kwargs)`` starts more, with Controller/SMTP kwargs;
* ``postfix_server`` -- one private Postfix for the whole session, handed
  to each test with its maildir emptied and its queue drained;
  ``postfix_factory(main_cf=..., tls=...)`` starts differently configured
  instances (about a second each), stopped at the end of the session;
* ``smtp_sink_server`` -- a fresh Postfix ``smtp-sink`` per test;
  ``smtp_sink_factory(options=[...])`` for variants;
* ``tls_ca`` -- a ``trustme.CA`` for the session, to build TLS contexts;
  ``broken_tls_context`` -- a server context whose handshake ours fails;
* ``make`` -- scripted sessions (``scripted.py``) for exact protocol cases;
* ``dns_server`` -- one private NSD for the whole session (``dns_server.py``);
  each test adds zones of its own, named by ``dns_origin``;
  ``silent_nameserver`` -- an address that never answers;
* ``mx_servers(addresses, behaviours)`` -- SMTP servers on several loopback
  addresses sharing one port; ``lmtp_factory``/``lmtp_server`` -- LMTP
  (``mx_servers.py``), all stopped after the test.

A server that cannot run here (Postfix not installed, not root) skips its
tests with the reason, except in CI, where it fails them; so does a test
marked ``@helpers.requires(available, reason)`` (the two hooks below).
"""

from __future__ import annotations

import pytest

import helpers
from dns_server import DnsServer, DnsServerError, SilentNameserver
from mx_servers import LmtpServer, MxServers
from scripted import ScriptedSession


def pytest_configure(config):
    helpers.register_markers(config)


def pytest_runtest_setup(item):
    helpers.check_prerequisites(item)


# ---------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tls_ca():
    """A throwaway certificate authority (trustme)."""
    try:
        import trustme
    except ImportError:
        helpers.missing("trustme is not installed (pip install '.[test]')")
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_ca_file(tls_ca, tmp_path_factory):
    """The CA certificate of ``tls_ca``, as a PEM file (for ``ca_file=``)."""
    path = tmp_path_factory.mktemp("tls-ca") / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tls_server_context(tls_ca):
    """A server context whose certificate, from ``tls_ca``, names localhost
    and 127.0.0.1."""
    import ssl
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    return ctx


@pytest.fixture
def make():
    """make(split="whole"): a new scripted session (scripted.py), its
    clock at 1,000,000 ms; each is finished after the test. (Test files
    whose sessions need more set-up define a ``make`` of their own.)"""
    made = []

    def factory(split="whole"):
        s = ScriptedSession(split=split, now=1_000_000)
        made.append(s)
        return s

    yield factory
    for s in made:
        s.finish()


@pytest.fixture
def broken_tls_context(tls_ca):
    """A server context no client of ours can agree with: TLS 1.1 at most
    (the client asks for 1.2 or newer), so the handshake fails."""
    import ssl
    import warnings
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls_ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    try:
        with warnings.catch_warnings():          # deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):
        pytest.fail("this Python cannot make a TLS 1.1 server context")
    return ctx


# ---------------------------------------------------------------------------
# aiosmtpd
# ---------------------------------------------------------------------------


def _require_aiosmtpd():
    try:
        import aiosmtpd  # noqa: F401
    except ImportError:
        helpers.missing("aiosmtpd is not installed (pip install '.[test]')")


@pytest.fixture
def aiosmtpd_factory():
    """Start recording aiosmtpd servers: ``factory(handler=None, **kwargs)``
    with kwargs for aiosmtpd's Controller and SMTP (``enable_SMTPUTF8``,
    ``proxy_protocol_timeout``, ``tls_context``, ``require_starttls``,
    ``authenticator`` ...), or ``smtp_class``, an ``aiosmtpd.smtp.SMTP``
    subclass to serve with. Each is stopped after the test."""
    _require_aiosmtpd()
    started = []

    def factory(handler=None, **kwargs):
        server = helpers.AiosmtpdServer(handler, **kwargs).start()
        started.append(server)
        return server

    yield factory
    for server in reversed(started):
        server.stop()


@pytest.fixture
def aiosmtpd_server(aiosmtpd_factory):
    """A recording aiosmtpd on 127.0.0.1 (SMTPUTF8 on, aiosmtpd's default
    under Controller): ``.host``, ``.port``, ``.messages``,
    ``.connections``, ``.wait_for_messages(n)``."""
    return aiosmtpd_factory()


# ---------------------------------------------------------------------------
# Postfix smtpd
# ---------------------------------------------------------------------------


def _require_postfix():
    why = helpers.PostfixServer.unavailable()
    if why:
        helpers.missing(why)


@pytest.fixture(scope="session")
def postfix_factory():
    """Start private Postfix instances:
    ``factory(main_cf={...}, tls=ca_or_None)``; all are stopped and removed
    at the end of the session."""
    started = []

    def factory(main_cf=None, tls=None):
        _require_postfix()
        server = helpers.PostfixServer(main_cf=main_cf, tls=tls)
        started.append(server)
        try:
            return server.start()
        except helpers.PostfixError as e:
            error = str(e)
        pytest.fail("private Postfix did not start: %s" % error, pytrace=False)

    yield factory
    for server in reversed(started):
        server.cleanup()


@pytest.fixture(scope="session")
def postfix_session(postfix_factory):
    """The session's default private Postfix (see ``postfix_server``)."""
    _require_postfix()
    return postfix_factory()


@pytest.fixture
def postfix_server(postfix_session):
    """A real Postfix smtpd on 127.0.0.1 (``.host``, ``.port``), shared by
    the session, with no message left from earlier tests.

    Mail to ``anything@example.test`` is delivered;
    ``unknown*@example.test`` gets 550 5.1.1, other domains 554 5.7.1.
    ``.wait_for_messages(n)`` returns the delivered messages as
    ``helpers.ReceivedMessage``; ``.maillog`` and ``.log_tail()`` help
    when something goes wrong.
    """
    postfix_session.clear()
    return postfix_session


# ---------------------------------------------------------------------------
# smtp-sink
# ---------------------------------------------------------------------------


@pytest.fixture
def smtp_sink_factory():
    """Start Postfix smtp-sink servers: ``factory(options=[...])`` with extra
    smtp-sink options; each is stopped after the test."""
    why = helpers.SmtpSinkServer.unavailable()
    if why:
        helpers.missing(why)
    started = []

    def factory(options=(), hostname="sink.smtpstate.test"):
        server = helpers.SmtpSinkServer(options, hostname)
        started.append(server)
        return server.start()

    yield factory
    for server in reversed(started):
        server.cleanup()


@pytest.fixture
def smtp_sink_server(smtp_sink_factory):
    """A Postfix smtp-sink on 127.0.0.1 that accepts everything and dumps
    each transaction: ``.host``, ``.port``, ``.wait_for_messages(n)``."""
    return smtp_sink_factory()


# ---------------------------------------------------------------------------
# DNS: a private NSD, and a nameserver that never answers
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def dns_server():
    """A private NSD on 127.0.0.1 for the whole session (``DnsServer``):
    ``.address`` ("127.0.0.1:PORT", for a resolver's nameservers),
    ``.add_zone(origin, records)``, ``.set_records()``, ``.broken_zone()``
    (SERVFAIL), ``.remove_zone()`` (REFUSED), ``.add_signed_zone()`` and
    ``.set_signed_records()`` (DNSSEC, returning the DS to trust),
    ``.queries()``, ``.reset_queries()``. Zones outlive the test that
    added them: name yours with ``dns_origin``."""
    why = DnsServer.unavailable()
    if why:
        helpers.missing(why)
    server = DnsServer()
    try:
        server.start()
    except DnsServerError as e:
        pytest.fail("private NSD did not start: %s" % e, pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def dns_origin(dns_server, request):
    """A zone name no other test uses, made from this test's name
    ("test-mx-order-7.test"); not added yet."""
    return dns_server.unique_origin(request.node.name)


@pytest.fixture
def silent_nameserver():
    """The address ("127.0.0.1:PORT") of a nameserver that takes UDP
    queries and TCP connections and never answers, for resolver timeouts."""
    with SilentNameserver() as server:
        yield server.address


# ---------------------------------------------------------------------------
# SMTP and LMTP servers on several loopback addresses
# ---------------------------------------------------------------------------


@pytest.fixture
def mx_servers():
    """Start servers on several addresses and one port:
    ``mx_servers(["127.0.0.2", "127.0.0.3", "::1"], {"127.0.0.3": "refuse"})``
    returns a started ``MxServers`` (``.port``, ``.server(address)``);
    behaviours are in ``mx_servers.BEHAVIOURS``. Each is stopped after the
    test. For ``::1`` mark the test
    ``@helpers.requires(mx_servers.ipv6_loopback_available(), ...)``."""
    _require_aiosmtpd()
    started = []

    def factory(addresses, behaviours=None, tls=None):
        servers = MxServers(addresses, behaviours, tls)
        started.append(servers)
        return servers.start()

    yield factory
    for servers in reversed(started):
        servers.stop()


@pytest.fixture
def lmtp_factory():
    """Start aiosmtpd LMTP servers: ``factory(address_or_unix_path,
    replies=None)`` with ``(host, port)`` or a unix socket path, and
    {recipient: reply line} for the replies after the final dot. Each is
    stopped after the test."""
    _require_aiosmtpd()
    started = []

    def factory(address_or_unix_path=("127.0.0.1", 0), replies=None):
        server = LmtpServer(address_or_unix_path, replies)
        started.append(server)
        return server.start()

    yield factory
    for server in reversed(started):
        server.stop()


@pytest.fixture
def lmtp_server(lmtp_factory):
    """An LMTP server on 127.0.0.1 (``.host``, ``.port``) answering
    "250 2.0.0 Ok" for every recipient."""
    return lmtp_factory()


# ---------------------------------------------------------------------------
# Message brokers (brokers.py): a private RabbitMQ node and redis-server
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def rabbitmq():
    """A private RabbitMQ node for the session (``.url``); tests name their
    own queues (``queue_name``). Starting it takes 5-20 s."""
    from brokers import BrokerError, RabbitServer
    why = RabbitServer.unavailable()
    if why:
        helpers.missing(why)
    server = RabbitServer()
    try:
        server.start()
    except BrokerError as e:
        pytest.fail(f"private RabbitMQ did not start: {e}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_broker():
    """A private redis-server for the session (``.url``)."""
    from brokers import BrokerError, RedisServer
    why = RedisServer.unavailable()
    if why:
        helpers.missing(why)
    server = RedisServer()
    try:
        server.start()
    except BrokerError as e:
        pytest.fail(f"private redis-server did not start: {e}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def queue_name(request):
    """A queue name of this test's own, so that tests sharing a broker
    never see each other's jobs."""
    import re
    import uuid
    return "t-%s-%s" % (re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:30],
                        uuid.uuid4().hex[:8])
