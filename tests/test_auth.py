"""SMTP AUTH (RFC 4954): PLAIN, LOGIN, CRAM-MD5, XOAUTH2.

* scripted: the exact bytes of each mechanism (credentials allowed in clear
  so that the bytes can be read), challenges fed whole and byte by byte,
  and every way AUTH refuses to start;
* aiosmtpd: real authentication over STARTTLS (aiosmtpd offers AUTH only
  after TLS, so capabilities learned after STARTTLS must count), CRAM-MD5
  and XOAUTH2 added to it as handler mechanisms, wrong credentials (a
  permanent failure, tried once), and credentials that must never cross
  the network in clear.

Secrets never appear in a Result reason, the transcript or the log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import ssl
import threading

import pytest

import smtpstate
from smtpstate import Auth, Message
from smtpstate._core import lib

import helpers
from scripted import SPLITS, ScriptedSession, TLSPeer, tls_config

T0 = 1_000_000
BANNER = b"220 server.example ESMTP\r\n"
EHLO = b"EHLO client.example\r\n"
MAIL = b"MAIL FROM:<sender@client.example>\r\n"
USER, SECRET = "alice@example.test", "s3cr3t-Pa55"
SENDER, RCPT_ADDR = "sender@example.test", "rcpt@example.test"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def secret_forms(user: str = USER, secret: str = SECRET):
    """Every way a secret could leak: as is and inside each mechanism's base64."""
    s, u = secret.encode(), user.encode()
    return [s, b64(s), b64(b"\0" + u + b"\0" + s),
            b64(b"user=" + u + b"\x01auth=Bearer " + s + b"\x01\x01")]


def ehlo(*keywords: str) -> bytes:
    out = [b"250-server.example\r\n" if keywords else b"250 server.example\r\n"]
    for i, kw in enumerate(keywords):
        out.append(b"250" + (b" " if i == len(keywords) - 1 else b"-") + kw.encode() + b"\r\n")
    return b"".join(out)


@pytest.fixture
def make():
    made = []

    def factory(split="whole", user=USER, secret=SECRET, mechs=0, allow_plaintext=True):
        s = ScriptedSession(split=split, now=T0)
        assert s.set_auth(user, secret, mechs, allow_plaintext) == lib.SMTPS_OK
        made.append(s)
        return s

    yield factory
    for s in made:
        s.finish()


def to_auth(s, offer=("AUTH PLAIN LOGIN",)) -> bytes:
    s.start()
    s.feed(BANNER)
    assert s.sent() == EHLO
    s.feed(ehlo(*offer))
    return s.sent()


# ---------------------------------------------------------------------------
# Scripted: exact bytes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_plain_initial_response(make, split):
    s = make(split)
    assert to_auth(s) == b"AUTH PLAIN " + b64(b"\0alice@example.test\0s3cr3t-Pa55") + b"\r\n"
    s.feed(b"235 2.7.0 Authentication successful\r\n")
    assert s.status == "IDLE" and s.sent() == b""
    s.submit()
    assert s.sent() == MAIL


@pytest.mark.parametrize("split", SPLITS)
def test_login_two_challenges(make, split):
    s = make(split, mechs=lib.SMTPS_AUTH_LOGIN)
    assert to_auth(s, ("AUTH PLAIN LOGIN CRAM-MD5",)) == b"AUTH LOGIN\r\n"
    s.feed(b"334 VXNlcm5hbWU6\r\n")
    assert s.sent() == b64(USER.encode()) + b"\r\n"
    s.feed(b"334 UGFzc3dvcmQ6\r\n")
    assert s.sent() == b64(SECRET.encode()) + b"\r\n"
    s.feed(b"235 2.7.0 ok\r\n")
    assert s.status == "IDLE"


@pytest.mark.parametrize("split", SPLITS)
def test_cram_md5_rfc2195_example(make, split):
    # RFC 2195 section 2, word for word.
    s = make(split, user="tim", secret="tanstaaftanstaaf")
    assert to_auth(s, ("AUTH LOGIN CRAM-MD5 PLAIN",)) == b"AUTH CRAM-MD5\r\n"   # the best offered
    s.feed(b"334 PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+\r\n")
    assert s.sent() == b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw\r\n"
    s.feed(b"235 ok\r\n")
    assert s.status == "IDLE"


@pytest.mark.parametrize("split", SPLITS)
def test_xoauth2_refused_with_json_challenge(make, split):
    s = make(split, secret="ya29.token", mechs=lib.SMTPS_AUTH_XOAUTH2)
    s.submit()
    assert to_auth(s, ("AUTH PLAIN XOAUTH2",)) == (
        b"AUTH XOAUTH2 " + b64(b"user=alice@example.test\x01auth=Bearer ya29.token\x01\x01") + b"\r\n")
    error = b64(b'{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}')
    s.feed(b"334 " + error + b"\r\n")
    assert s.sent() == b"\r\n"                      # the empty answer that ends it
    s.feed(b"535 5.7.8 Username and Password not accepted\r\n")
    assert s.sent() == b"QUIT\r\n"
    r = s.result()
    assert r["status"] == "permfail"
    assert "authentication failed: 535 5.7.8 Username and Password not accepted" in r["reason"]
    assert r["state"] == "AUTH"


def test_xoauth2_is_never_chosen_unless_asked(make):
    s = make()
    # Only XOAUTH2 in common with the default choice (CRAM-MD5, PLAIN, LOGIN).
    s.submit()
    assert to_auth(s, ("AUTH XOAUTH2",)) == b"QUIT\r\n"
    r = s.result()
    assert r["status"] == "tempfail"
    assert ("no AUTH mechanism in common (the server offers: XOAUTH2; allowed: CRAM-MD5 PLAIN "
            "LOGIN)") in r["reason"]


def test_refused_credentials_fail_every_message_permanently(make):
    s = make()
    for _ in range(3):
        s.submit()
    assert to_auth(s).startswith(b"AUTH PLAIN ")
    s.feed(b"535 5.7.8 Authentication credentials invalid\r\n")
    assert s.sent() == b"QUIT\r\n"                  # never MAIL, never AUTH again
    got = s.results()
    assert [r["status"] for r in got] == ["permfail"] * 3
    for r in got:
        assert "authentication failed: 535 5.7.8 Authentication credentials invalid" in r["reason"]
        assert r["state"] == "AUTH"
        # A stage of its own, not "unknown" (which a status is called too).
        assert (r["stage"], r["stage_name"]) == (23, "sending AUTH")
        assert not any(f.decode() in r["reason"] for f in secret_forms())
    s.feed(b"221 bye\r\n")
    assert s.status == "CLOSING"


def test_temporary_auth_failure_is_tempfail(make):
    s = make()
    s.submit()
    to_auth(s)
    s.feed(b"454 4.7.0 Temporary authentication failure\r\n")
    assert s.sent() == b"QUIT\r\n"
    r = s.result()
    assert r["status"] == "tempfail" and "authentication failed: 454" in r["reason"]


def test_unexpected_challenge_is_cancelled(make):
    s = make()
    s.submit()
    assert to_auth(s).startswith(b"AUTH PLAIN ")
    s.feed(b"334 \r\n")                             # PLAIN already said everything
    assert s.sent() == b"*\r\n"                     # RFC 4954 4: cancel
    s.feed(b"501 5.7.0 Auth aborted\r\n")
    assert s.sent() == b"QUIT\r\n"
    r = s.result()
    assert r["status"] == "tempfail" and "PLAIN challenge this client cannot answer" in r["reason"]


def test_bad_cram_md5_challenge_is_cancelled(make):
    s = make(mechs=lib.SMTPS_AUTH_CRAM_MD5)
    s.submit()
    assert to_auth(s, ("AUTH CRAM-MD5",)) == b"AUTH CRAM-MD5\r\n"
    s.feed(b"334 not-base64!\r\n")
    assert s.sent() == b"*\r\n"
    s.feed(b"501 aborted\r\n")
    assert s.result()["status"] == "tempfail"


@pytest.mark.parametrize("offer, why", [
    ((), "the server does not offer AUTH"),
    (("AUTH CRAM-MD5",), "no AUTH mechanism in common (the server offers: CRAM-MD5; "
                         "allowed: PLAIN)"),
])
def test_auth_refuses_to_start(make, offer, why):
    s = make(mechs=lib.SMTPS_AUTH_PLAIN)
    s.submit()
    assert to_auth(s, offer) == b"QUIT\r\n"
    r = s.result()
    assert r["status"] == "tempfail" and why in r["reason"], r


def test_no_credentials_in_clear_without_allow_plaintext(make):
    s = make(allow_plaintext=False)
    s.submit()
    assert to_auth(s) == b"QUIT\r\n"
    r = s.result()
    assert r["status"] == "tempfail"
    assert "refusing to send AUTH credentials in clear" in r["reason"]


def test_no_credentials_pass_through(make):
    s = ScriptedSession(now=T0)
    s.start()
    s.feed(BANNER)
    s.sent()
    s.feed(ehlo("AUTH PLAIN"))
    assert s.status == "IDLE" and s.sent() == b""
    s.finish()


def test_set_auth_argument_checks():
    s = ScriptedSession(now=T0)
    p = s.ptr
    assert lib.smtps_session_set_auth(p, b"", b"x", 0, 0) == lib.SMTPS_EINVAL
    assert lib.smtps_session_set_auth(p, b"u", b"", 0, 0) == lib.SMTPS_EINVAL
    assert lib.smtps_session_set_auth(p, b"u", b"x" * 8193, 0, 0) == lib.SMTPS_EINVAL
    assert lib.smtps_session_set_auth(p, b"u", b"x", 1 << 9, 0) == lib.SMTPS_EINVAL
    assert lib.smtps_session_set_auth(p, b"u", b"a\x01b", lib.SMTPS_AUTH_XOAUTH2, 0) \
        == lib.SMTPS_EINVAL
    assert lib.smtps_session_set_auth(p, b"u", b"x", 0, 0) == lib.SMTPS_OK
    assert lib.smtps_session_set_auth(p, b"u2", b"y", 0, 0) == lib.SMTPS_OK    # replaces
    s.start()
    assert lib.smtps_session_set_auth(p, b"u", b"x", 0, 0) == lib.SMTPS_ESTATE
    s.finish()


@pytest.mark.parametrize("split", SPLITS)
def test_auth_offered_only_after_starttls(split, tls_ca, tmp_path):
    """Capabilities learned in clear are forgotten: AUTH appears only in
    the EHLO reply inside TLS, and the credentials go there."""
    ca = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("localhost").configure_cert(ctx)
    s = ScriptedSession(split=split, now=T0)
    assert s.set_tls("starttls", tls_config(str(ca))) == lib.SMTPS_OK
    assert s.set_auth(USER, SECRET) == lib.SMTPS_OK     # never in clear
    s.submit()
    s.start()
    s.feed(BANNER)
    assert s.sent() == EHLO
    s.feed(ehlo("STARTTLS"))
    assert s.sent() == b"STARTTLS\r\n"
    s.feed(b"220 go\r\n")
    peer = TLSPeer(ctx)
    assert s.handshake(peer) == EHLO
    s.feed(peer.send(ehlo("AUTH LOGIN PLAIN")))
    assert peer.receive(s.sent()) == b"AUTH PLAIN " + b64(b"\0" + USER.encode() + b"\0"
                                                          + SECRET.encode()) + b"\r\n"
    s.feed(peer.send(b"235 ok\r\n"))
    assert peer.receive(s.sent()) == MAIL
    s.feed(peer.send(b"421 going away\r\n"))
    r = s.result()
    assert r["status"] == "tempfail"
    s.finish()


# ---------------------------------------------------------------------------
# aiosmtpd
# ---------------------------------------------------------------------------


def _auth_handler(users):
    """A recording handler that also speaks CRAM-MD5 and XOAUTH2 and counts
    every authentication attempt, whatever the mechanism."""
    from aiosmtpd.smtp import MISSING, AuthResult, LoginPassword, auth_mechanism

    class AuthHandler(helpers.RecordingHandler):
        def __init__(self):
            super().__init__()
            self.attempts = []
            self._lock = threading.Lock()

        def record(self, mech, user, ok):
            with self._lock:
                self.attempts.append((mech, user, ok))
            return ok

        def authenticator(self, server, session, envelope, mechanism, auth_data):
            ok = users.get(auth_data.login.decode()) == auth_data.password.decode()
            self.record(mechanism, auth_data.login.decode(), ok)
            return AuthResult(success=ok, handled=False, auth_data=auth_data)

        @auth_mechanism("CRAM-MD5")
        async def auth_CRAM_MD5(self, server, args):
            challenge = b"<4711.%d@aiosmtpd.test>" % id(server)
            answer = await server.challenge_auth(challenge)
            if answer is MISSING:
                return AuthResult(success=False)
            user, _, digest = answer.decode().partition(" ")
            want = hmac.new(users.get(user, "\0").encode(), challenge, hashlib.md5).hexdigest()
            ok = self.record("CRAM-MD5", user, user in users and hmac.compare_digest(digest, want))
            return AuthResult(success=ok, handled=False,
                              auth_data=LoginPassword(user.encode(), b""))

        @auth_mechanism("XOAUTH2")
        async def auth_XOAUTH2(self, server, args):
            fields = base64.b64decode(args[1]).split(b"\x01")
            user = fields[0].decode().removeprefix("user=")
            token = fields[1].decode().removeprefix("auth=Bearer ")
            ok = self.record("XOAUTH2", user, users.get(user) == token)
            if not ok:
                await server.challenge_auth(b'{"status":"401"}')   # the client answers empty
            return AuthResult(success=ok, handled=False,
                              auth_data=LoginPassword(user.encode(), b""))

    return AuthHandler()


@pytest.fixture
def auth_server(aiosmtpd_factory, tls_server_context):
    """aiosmtpd with STARTTLS and AUTH (offered only after TLS, aiosmtpd's
    default auth_require_tls=True) for USER/SECRET."""
    def factory(**kwargs):
        handler = _auth_handler({USER: SECRET})
        kwargs.setdefault("tls_context", tls_server_context)
        server = aiosmtpd_factory(handler, authenticator=handler.authenticator, **kwargs)
        return server, handler
    return factory


def msg(i: int = 0) -> Message:
    return Message(SENDER, [RCPT_ADDR], b"Subject: auth %d\r\n\r\nauthenticated\r\n" % i)


def all_received(server) -> bytes:
    return b"".join(bytes(c.received) for c in server.connections)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2"])
def test_aiosmtpd_each_mechanism_over_starttls(auth_server, tls_ca_file, mechanism):
    server, handler = auth_server()
    # In clear aiosmtpd offers no AUTH at all: it comes with TLS.
    assert "AUTH" not in helpers.ehlo_keywords(server.host, server.port)
    auth = Auth(USER, SECRET, mechanism=mechanism)
    with smtpstate.Client(server.host, server.port, timeout=20, tls="starttls",
                          ca_file=tls_ca_file, auth=auth) as client:
        results = [client.send(msg(i)) for i in range(2)]
    assert [r.status for r in results] == ["delivered", "delivered"], results
    assert handler.attempts == [(mechanism, USER, True)]     # once per connection
    got = server.wait_for_messages(2)
    assert all(m.extra["tls"] and m.extra["auth_data"].login == USER.encode() for m in got)


def test_aiosmtpd_default_choice(auth_server, tls_ca_file):
    server, handler = auth_server()
    with smtpstate.Client(server.host, server.port, timeout=20, tls="starttls",
                          ca_file=tls_ca_file, auth=(USER, SECRET)) as client:
        assert client.send(msg()).status == "delivered"
    assert handler.attempts == [("CRAM-MD5", USER, True)]    # the best both know
    server2, handler2 = auth_server(auth_exclude_mechanism=["CRAM-MD5"])
    with smtpstate.Client(server2.host, server2.port, timeout=20, tls="starttls",
                          ca_file=tls_ca_file, auth=(USER, SECRET)) as client:
        assert client.send(msg()).status == "delivered"
    assert handler2.attempts == [("PLAIN", USER, True)]


def test_aiosmtpd_wrong_password_is_permanent_and_tried_once(auth_server, tls_ca_file, caplog):
    server, handler = auth_server()
    client = smtpstate.Client(server.host, server.port, timeout=20, tls="starttls",
                              ca_file=tls_ca_file, auth=Auth(USER, "wrong-" + SECRET, "PLAIN"))
    with caplog.at_level(logging.DEBUG, logger="smtpstate"):
        first, second = client.send(msg(1)), client.send(msg(2))
    client.close()
    for r in (first, second):
        assert r.status == "permfail", r
        assert "authentication failed: 535 5.7.8 Authentication credentials invalid" in r.reason
        assert r.state == "AUTH" and r.stage == "sending AUTH" and r.stage_code == 23
        assert r.reason.count("not attempted") <= 1         # never "not attempted: not attempted"
        assert not any(f.decode() in r.reason for f in secret_forms(secret="wrong-" + SECRET))
    assert handler.attempts == [("PLAIN", USER, False)]      # no retry, no second connection
    assert len(server.connections) == 1
    assert server.messages == []
    assert "wrong-" + SECRET not in caplog.text


def test_aiosmtpd_no_credentials_in_clear(auth_server):
    # AUTH offered without TLS (auth_require_tls=False), but the client must
    # not send credentials in clear unless told it may.
    server, handler = auth_server(tls_context=None, auth_require_tls=False)
    # tls="none": the session's own guard (the default, tls="verify", would
    # not even get to AUTH without TLS).
    client = smtpstate.Client(server.host, server.port, timeout=20, auth=(USER, SECRET),
                              helo="client.example", tls="none")
    result = client.send(msg())
    client.close()
    assert result.status == "tempfail"
    assert "refusing to send AUTH credentials in clear" in result.reason
    received = all_received(server)
    assert received == b"EHLO client.example\r\nQUIT\r\n"
    assert not any(f in received for f in secret_forms())
    assert handler.attempts == [] and server.messages == []


def test_aiosmtpd_plaintext_allowed_and_never_logged(auth_server, caplog):
    server, handler = auth_server(tls_context=None, auth_require_tls=False)
    auth = Auth(USER, SECRET, mechanism="LOGIN", allow_plaintext=True)
    with caplog.at_level(logging.DEBUG, logger="smtpstate"):
        with smtpstate.Client(server.host, server.port, timeout=20, auth=auth,
                              keep_transcript=True) as client:
            result = client.send(msg())
            transcript = list(client.transcript)
    assert result.status == "delivered", result
    assert handler.attempts == [("LOGIN", USER, True)]
    # It did go in clear (that was allowed) ...
    assert any(f in all_received(server) for f in secret_forms())
    # ... but neither the transcript nor the log shows it.
    sent = b"".join(data for who, data in transcript if who == "C")
    assert b"AUTH exchange redacted" in sent
    assert not any(f in sent for f in secret_forms())
    assert not any(f.decode() in caplog.text for f in secret_forms())
    assert repr(auth).count(SECRET) == 0


def test_aiosmtpd_no_common_mechanism(auth_server, tls_ca_file):
    server, handler = auth_server(auth_exclude_mechanism=["CRAM-MD5", "XOAUTH2"])
    client = smtpstate.Client(server.host, server.port, timeout=20, tls="starttls",
                              ca_file=tls_ca_file, auth=Auth(USER, SECRET, "CRAM-MD5"))
    result = client.send(msg())
    client.close()
    assert result.status == "tempfail"
    assert "no AUTH mechanism in common (the server offers: PLAIN LOGIN; allowed: CRAM-MD5)" \
        in result.reason
    assert handler.attempts == []


def test_smtp_sink_accepts_plain_in_clear_when_allowed(smtp_sink_factory):
    sink = smtp_sink_factory(options=["-v"])          # -v: it logs every command read
    auth = Auth(USER, SECRET, allow_plaintext=True)
    with smtpstate.Client(sink.host, sink.port, timeout=20, auth=auth) as client:
        result = client.send(msg())
        assert "AUTH" in client.capabilities
    assert result.status == "delivered", result
    assert sink.wait_for_messages(1)[0].data == msg().data
    # The server read AUTH PLAIN (the best it offers) with these credentials,
    # in clear as allowed, between EHLO and MAIL.
    commands = helpers.wait_until(
        lambda: (lambda c: c if "QUIT" in c else None)(sink.commands()),
        what="smtp-sink's log of the dialogue")
    plain = base64.b64encode(b"\0" + USER.encode() + b"\0" + SECRET.encode()).decode()
    at = commands.index(f"AUTH PLAIN {plain}")
    assert commands[at - 1].startswith("EHLO ") and commands[at + 1].startswith("MAIL FROM:")
