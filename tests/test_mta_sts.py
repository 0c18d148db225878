"""MTA-STS (RFC 8461): smtpstate.mta_sts on its own, without the engine.

* the TXT record (§3.1) and the policy text (§3.2), table-driven: every
  required field missing, every value out of its range, duplicates, line
  endings, extensions;
* MX matching (§4.1), wildcards included;
* fetching against a real HTTPS server on 127.0.0.1 (``http.server`` and
  ``ssl`` in a thread, certificates from the session's ``tls_ca``): the
  request it gets (path, Host, SNI), and each way a fetch fails with its
  TLSRPT result type: a certificate for another name or from an unknown
  CA, a redirect (not followed), 404, the wrong Content-Type, a body too
  large or cut short, a server that never answers or trickles (the whole
  fetch stays within its timeout);
* the cache (§5.1): refresh_needed, expiry, a TXT record gone, eviction,
  its file across instances, a corrupt file, writers in several threads.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import socket
import ssl
import threading
import time
from typing import Callable, List, Optional

import pytest

import smtpstate
from smtpstate.mta_sts import (
    MAX_AGE_LIMIT,
    Policy,
    PolicyCache,
    PolicyError,
    PolicyFetchError,
    fetch_policy,
    parse_policy,
    parse_txt,
    parse_txt_records,
)

DOMAIN = "example.test"
POLICY_HOST = "mta-sts." + DOMAIN
POLICY = (b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.test\r\n"
          b"mx: *.backup.example.test\r\nmax_age: 86400\r\n")
NOW = 1_700_000_000.0


# ---------------------------------------------------------------------------
# The TXT record (§3.1)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("txt, expected", [
    ("v=STSv1; id=20160831085700Z;", "20160831085700Z"),
    ("v=STSv1; id=20160831085700Z", "20160831085700Z"),
    ("v=STSv1;id=abc", "abc"),
    ("v=STSv1 ;\tid=abc ; ", "abc"),
    ("v=STSv1; ext=value!; id=abc", "abc"),
    ("v=STSv1; id=abc; x_y.z-1=%41", "abc"),
    ("v=STSv1; id=" + "a" * 32, "a" * 32),
    ("v=STSv1; id=first; id=second", "first"),          # the first counts (§3.2)
    ("v=STSv1; id=first; id=not-an-id!", "first"),
    # Not valid: None, the domain has no policy to fetch.
    ("v=STSv1", None),
    ("v=STSv1;", None),
    ("v=STSv1; ext=1", None),                           # no id
    ("v=STSv1; ID=abc", None),                          # case-sensitive: an extension
    ("v=STSv2; id=abc", None),
    ("V=STSv1; id=abc", None),
    (" v=STSv1; id=abc", None),
    ("v=STSv1 id=abc", None),
    ("v=STSv1; id=", None),
    ("v=STSv1; id=a-b", None),
    ("v=STSv1; id=" + "a" * 33, None),
    ("v=STSv1; id=\u00e4bc", None),
    ("v=STSv1; id=abc; ext=", None),
    ("v=STSv1; id=abc; ext=a b", None),
    ("v=STSv1; id=abc; =x", None),
    ("v=STSv1; id=abc;; ext=1", None),
    ("v=STSv1; id=abc\r\n", None),
    ("", None),
])
def test_txt_record(txt, expected):
    assert parse_txt(txt) == expected


@pytest.mark.parametrize("records, expected", [
    (["v=STSv1; id=abc"], "abc"),
    (["v=spf1 -all", "v=STSv1; id=abc;", "google-site-verification=x"], "abc"),
    (["v=STSv1; id=abc", "v=STSv1; id=def"], None),     # several: no policy
    (["v=STSv1; id=abc", "v=STSv1; id=abc"], None),
    (["v=STSv1; id=bad-id"], None),
    (["v=STSv1 id=abc"], None),                         # discarded: no ';'
    ([], None),
])
def test_txt_records(records, expected):
    assert parse_txt_records(records) == expected


# ---------------------------------------------------------------------------
# The policy (§3.2)
# ---------------------------------------------------------------------------


def _policy(*lines, end="\r\n"):
    return end.join(lines) + end


@pytest.mark.parametrize("text, mode, mx, max_age", [
    (POLICY.decode(), "enforce", ("mail.example.test", "*.backup.example.test"), 86400),
    (_policy("version: STSv1", "mode: testing", "mx: mx.example.test", "max_age: 0",
             end="\n"), "testing", ("mx.example.test",), 0),
    # no final line ending; LF and CRLF mixed
    ("version: STSv1\nmode: enforce\r\nmx: mx.example.test\nmax_age: 31557600",
     "enforce", ("mx.example.test",), MAX_AGE_LIMIT),
    # any order, spaces and tabs after ':' and at the end
    (_policy("max_age:86400", "mx:\t mx.example.test \t", "mode:   enforce ",
             "version: STSv1"), "enforce", ("mx.example.test",), 86400),
    # mode none needs no mx
    (_policy("version: STSv1", "mode: none", "max_age: 86400"), "none", (), 86400),
    # extensions are ignored, whatever their (valid) value
    (_policy("version: STSv1", "mode: enforce", "x-ext.v2_: a ; = b", "note: caf\u00e9 \u2713",
             "mx: MX.Example.TEST", "max_age: 10"), "enforce", ("MX.Example.TEST",), 10),
    # a repeated version, mode or max_age counts the first time only
    (_policy("version: STSv1", "mode: testing", "mode: enforce", "mx: a.example.test",
             "max_age: 60", "max_age: 99999999999", "version: STSv9", "mx: b.example.test"),
     "testing", ("a.example.test", "b.example.test"), 60),
    # digits with leading zeros are still 1-10 digits
    (_policy("version: STSv1", "mode: enforce", "mx: a.example.test", "max_age: 0000086400"),
     "enforce", ("a.example.test",), 86400),
])
def test_policy_parsed(text, mode, mx, max_age):
    policy = parse_policy(text, "id1", NOW)
    assert policy == Policy(mode=mode, mx=mx, max_age=max_age, id="id1", fetched_at=NOW)


_BASE = {"version": "version: STSv1", "mode": "mode: enforce",
         "mx": "mx: mail.example.test", "max_age": "max_age: 86400"}


def _without(key, *extra):
    return _policy(*[line for k, line in _BASE.items() if k != key], *extra)


def _with(key, line):
    return _policy(*[line if k == key else other for k, other in _BASE.items()])


@pytest.mark.parametrize("text, message", [
    # each required field missing
    (_without("version"), "has no version line"),
    (_without("mode"), "has no mode line"),
    (_without("max_age"), "has no max_age line"),
    (_without("mx"), "has no mx line: mode enforce needs"),
    (_policy("version: STSv1", "mode: testing", "max_age: 1"), "has no mx line: mode testing"),
    (_without("mode", "Mode: enforce"), "there is 'Mode': keys are case-sensitive"),
    ("", "is empty"),
    # each value wrong
    (_with("version", "version: STSv2"), "line 1: version 'STSv2' is not STSv1"),
    (_with("version", "version: stsv1"), "is not STSv1"),
    (_with("mode", "mode: Enforce"), "line 2: mode 'Enforce' is not enforce, testing or none"),
    (_with("mode", "mode: reject"), "mode 'reject'"),
    (_with("max_age", "max_age: 31557601"), "max_age '31557601' is not a number of seconds "
                                            "from 0 to 31557600"),
    (_with("max_age", "max_age: 12345678901"), "at most 10 digits"),
    (_with("max_age", "max_age: -1"), "max_age '-1'"),
    (_with("max_age", "max_age: 1e5"), "max_age '1e5'"),
    (_with("max_age", "max_age: 86400 s"), "max_age '86400 s'"),
    (_with("max_age", "max_age:"), "line 4: max_age has no value"),
    (_with("mx", "mx: mail.example.test."), "mx 'mail.example.test.' is not a host name"),
    (_with("mx", "mx: mail..example.test"), "is not a host name"),
    (_with("mx", "mx: *.*.example.test"), "is not a host name"),
    (_with("mx", "mx: mail*.example.test"), "is not a host name"),
    (_with("mx", "mx: *."), "is not a host name"),
    (_with("mx", "mx: -mail.example.test"), "is not a host name"),
    (_with("mx", "mx: mail_1.example.test"), "is not a host name"),
    (_with("mx", "mx: " + "a" * 64 + ".example.test"), "is not a host name"),
    (_with("mx", "mx: m\u00e4il.example.test"), "publish the A-label"),
    (_with("mx", "mx: a.example.test b.example.test"), "is not a host name"),
    # the lines themselves
    (_policy("version: STSv1", "", "mode: enforce"), "line 2 is empty"),
    (POLICY.decode() + "\r\n", "line 6 is empty"),
    (_without("mx", "mx mail.example.test"), "'mx mail.example.test' is not 'key: value'"),
    (_without("mode", "mode : enforce"), "is not 'key: value'"),
    (_without("mode", " mode: enforce"), "is not 'key: value'"),
    (_without("mx", "ext/1: x"), "is not 'key: value'"),
    (_without("mx", "a" * 33 + ": x"), "is not 'key: value'"),
    (_without("mx", "ext: a\x01b"), "contains a control character"),
    (_without("mx", "ext: a\rb"), "contains a control character"),
    ("version: STSv1\rmode: enforce\rmx: a.example.test\rmax_age: 1\r", "contains a control"),
    (_without("mx", "ext:"), "ext has no value"),
])
def test_policy_errors(text, message):
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "id1", NOW)
    assert message in str(info.value)
    assert info.value.result_type == "sts-policy-invalid"


def test_policy_error_quotes_peer_text_harmlessly():
    with pytest.raises(PolicyError) as info:
        parse_policy(_with("mode", "mode: \x1b[31mred" + "x" * 200), "id1", NOW)
    text = str(info.value)
    assert "\x1b" not in text and "\\x1b[31mred" in text
    assert len(text) < 200


@pytest.mark.parametrize("kwargs, message", [
    ({"id": "not an id"}, "a policy id is 1-32 letters and digits"),
    ({"id": ""}, "a policy id"),
    ({"now": float("nan")}, "now must be a finite number"),
    ({"now": "now"}, "now must be a finite number"),
    ({"text": POLICY}, "text must be a str"),
])
def test_parse_policy_misuse(kwargs, message):
    args = {"text": POLICY.decode(), "id": "id1", "now": NOW, **kwargs}
    with pytest.raises(smtpstate.InvalidOptionError, match=message):
        parse_policy(**args)


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "reject"}, "mode must be one of"),
    ({"mx": ()}, "needs at least one mx pattern"),
    ({"mx": "mail.example.test"}, "mx must be a sequence of str"),
    ({"mx": ("mail.example.test.",)}, "is not a host name"),
    ({"max_age": MAX_AGE_LIMIT + 1}, "max_age must be an int from 0 to 31557600"),
    ({"max_age": 1.5}, "max_age must be an int"),
    ({"max_age": True}, "max_age must be an int"),
    ({"id": "a;b"}, "a policy id"),
    ({"fetched_at": float("inf")}, "fetched_at must be a finite number"),
])
def test_policy_checks_its_values(kwargs, message):
    args = {"mode": "enforce", "mx": ("mail.example.test",), "max_age": 60, "id": "id1",
            "fetched_at": NOW, **kwargs}
    with pytest.raises(smtpstate.InvalidOptionError, match=message):
        Policy(**args)


def test_policy_is_frozen_and_mx_a_tuple():
    policy = Policy(mode="none", mx=["mail.example.test"], max_age=0, id="x", fetched_at=1)
    assert policy.mx == ("mail.example.test",) and policy.fetched_at == 1.0
    with pytest.raises(AttributeError):
        policy.mode = "enforce"


def test_policy_expiry():
    policy = parse_policy(POLICY.decode(), "id1", NOW)
    assert policy.expires_at == NOW + 86400
    assert not policy.expired(NOW)
    assert not policy.expired(NOW + 86399.9)
    assert policy.expired(NOW + 86400)
    zero = Policy(mode="enforce", mx=("a.example.test",), max_age=0, id="x", fetched_at=NOW)
    assert zero.expired(NOW)


# ---------------------------------------------------------------------------
# MX matching (§4.1)
# ---------------------------------------------------------------------------

_MATCHER = Policy(mode="enforce", mx=("mail.example.com", "*.example.net", "MX.Example.ORG"),
                  max_age=60, id="x", fetched_at=NOW)


@pytest.mark.parametrize("host, expected", [
    ("mail.example.com", True),
    ("MAIL.Example.COM", True),
    ("mail.example.com.", True),               # trailing dot ignored
    ("mx.example.org", True),                  # pattern case ignored too
    ("example.com", False),
    ("other.example.com", False),
    ("mail.example.com.evil", False),
    ("xmail.example.com", False),
    ("a.example.net", True),                   # the wildcard: one label
    ("A.EXAMPLE.NET.", True),
    ("mail-1.example.net", True),
    ("example.net", False),                    # ... not none
    ("a.b.example.net", False),                # ... and not two
    (".example.net", False),
    ("*.example.net", False),
    ("aexample.net", False),
    ("a.example.net..", False),
    ("\u212a.example.net", False),              # KELVIN SIGN lower()s to 'k'
    ("k\u0131.example.net", False),
    ("", False),
    (".", False),
    (None, False),
])
def test_mx_matching(host, expected):
    assert _MATCHER.matches(host) is expected


def test_mode_none_without_patterns_matches_nothing():
    policy = Policy(mode="none", mx=(), max_age=60, id="x", fetched_at=NOW)
    assert not policy.matches("mail.example.com")


# ---------------------------------------------------------------------------
# A real HTTPS server on loopback
# ---------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "PolicyServer"

    def handle(self) -> None:
        try:
            self.request.do_handshake()
        except (OSError, ssl.SSLError):
            return                       # the client refused our certificate
        super().handle()

    def do_GET(self) -> None:            # noqa: N802 (http.server's name)
        self.server.requests.append((self.path, dict(self.headers)))
        self.server.behaviour(self)

    def log_message(self, *args) -> None:
        pass


def answer(status=200, body=POLICY, content_type="text/plain", headers=(), length=True):
    """A behaviour: one complete answer."""
    def behave(handler: _Handler) -> None:
        handler.send_response(status)
        if content_type is not None:
            handler.send_header("Content-Type", content_type)
        for name, value in headers:
            handler.send_header(name, value)
        if length:
            handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
    return behave


class PolicyServer(http.server.ThreadingHTTPServer):
    """HTTPS on 127.0.0.1, a random port: each GET is recorded in
    ``requests`` ((path, headers)) and answered by ``behaviour(handler)``;
    the TLS server names clients asked for are in ``sni``."""

    daemon_threads = True

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: List[tuple] = []
        self.sni: List[Optional[str]] = []
        self.behaviour: Callable[[_Handler], None] = answer()
        self.stopping = threading.Event()
        context.sni_callback = lambda sslobj, name, ctx: self.sni.append(name)
        # The handshake happens in the handler's thread (handle()), so a
        # slow or failing client never holds up the accepting thread.
        self.socket = context.wrap_socket(self.socket, server_side=True,
                                          do_handshake_on_connect=False)
        self.port = self.server_address[1]
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def handle_error(self, request, client_address) -> None:
        pass                             # clients that hang up are part of the tests

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()


@pytest.fixture
def policy_server_factory(tls_ca):
    """``factory(*names, ca=tls_ca)``: a PolicyServer whose certificate
    names ``names`` (default ``mta-sts.example.test``), issued by ``ca``."""
    started = []

    def factory(*names, ca=None):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        (ca or tls_ca).issue_cert(*(names or (POLICY_HOST,))).configure_cert(context)
        server = PolicyServer(context)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture
def policy_server(policy_server_factory):
    return policy_server_factory()


def _fetch(server, ca_file, **kwargs):
    return fetch_policy(DOMAIN, address="127.0.0.1", port=server.port, ca_file=ca_file,
                        **{"timeout": 5.0, **kwargs})


def _fetch_error(server, ca_file, **kwargs) -> PolicyFetchError:
    with pytest.raises(PolicyFetchError) as info:
        _fetch(server, ca_file, **kwargs)
    return info.value


# ---------------------------------------------------------------------------
# Fetching (§3.3)
# ---------------------------------------------------------------------------


def test_policy_fetched_and_parsed(policy_server, tls_ca_file):
    text = _fetch(policy_server, tls_ca_file)
    assert text == POLICY.decode()
    policy = parse_policy(text, "20160831085700Z", NOW)
    assert policy.mode == "enforce" and policy.max_age == 86400
    assert policy.matches("mail.example.test") and policy.matches("mx1.backup.example.test")

    # One GET of the well-known path, named for mta-sts.<domain> whatever
    # address and port it went to.
    [(path, headers)] = policy_server.requests
    assert path == "/.well-known/mta-sts.txt"
    assert headers["Host"] == POLICY_HOST
    assert "Accept-Encoding" not in headers
    assert policy_server.sni == [POLICY_HOST]


@pytest.mark.parametrize("content_type", [
    "text/plain", "text/plain; charset=utf-8", "TEXT/Plain;charset=\"us-ascii\"",
])
def test_content_type_with_parameters(policy_server, tls_ca_file, content_type):
    policy_server.behaviour = answer(content_type=content_type)
    assert _fetch(policy_server, tls_ca_file) == POLICY.decode()


def test_domain_with_trailing_dot_and_capitals(policy_server, tls_ca_file):
    text = fetch_policy("Example.TEST.", address="127.0.0.1", port=policy_server.port,
                        ca_file=tls_ca_file, timeout=5)
    assert text == POLICY.decode()
    assert policy_server.sni == [POLICY_HOST]


def test_chunked_body(policy_server, tls_ca_file):
    def behave(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "text/plain")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for i in range(0, len(POLICY), 10):
            piece = POLICY[i:i + 10]
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        handler.wfile.write(b"0\r\n\r\n")
    policy_server.behaviour = behave
    assert _fetch(policy_server, tls_ca_file) == POLICY.decode()


def test_wrong_certificate_name(policy_server_factory, tls_ca_file):
    server = policy_server_factory("mta-sts.other.test", "127.0.0.1")
    error = _fetch_error(server, tls_ca_file)
    assert error.result_type == "sts-webpki-invalid"
    assert "is not valid for mta-sts.example.test" in str(error)
    assert server.requests == []


def test_certificate_from_an_unknown_ca(policy_server_factory, tls_ca_file):
    import trustme
    server = policy_server_factory(ca=trustme.CA())
    error = _fetch_error(server, tls_ca_file)
    assert error.result_type == "sts-webpki-invalid"
    assert server.requests == []


def test_system_store_alone_does_not_know_the_test_ca(policy_server):
    error = _fetch_error(policy_server, None)
    assert error.result_type == "sts-webpki-invalid"


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirect_not_followed(policy_server, tls_ca_file, status):
    location = f"https://{POLICY_HOST}/.well-known/mta-sts.txt?moved"
    policy_server.behaviour = answer(status, body=b"", headers=[("Location", location)])
    error = _fetch_error(policy_server, tls_ca_file)
    assert error.result_type == "sts-policy-fetch-error"
    assert f"HTTP {status} redirect to '{location}' not followed" in str(error)
    assert len(policy_server.requests) == 1


@pytest.mark.parametrize("status", [404, 500, 204, 203])
def test_status_other_than_200(policy_server, tls_ca_file, status):
    policy_server.behaviour = answer(status, body=b"" if status == 204 else b"nope")
    error = _fetch_error(policy_server, tls_ca_file)
    assert error.result_type == "sts-policy-fetch-error"
    assert f"HTTP {status} " in str(error) and "not 200" in str(error)


@pytest.mark.parametrize("content_type, message", [
    ("text/html", "Content-Type 'text/html' is not text/plain"),
    ("application/octet-stream", "is not text/plain"),
    ("text/plainx", "is not text/plain"),
    ("text", "is not text/plain"),
    (None, "no Content-Type headers"),
])
def test_wrong_content_type(policy_server, tls_ca_file, content_type, message):
    policy_server.behaviour = answer(content_type=content_type)
    error = _fetch_error(policy_server, tls_ca_file)
    assert error.result_type == "sts-policy-invalid"
    assert message in str(error)


def test_two_content_types(policy_server, tls_ca_file):
    policy_server.behaviour = answer(headers=[("Content-Type", "text/html")])
    error = _fetch_error(policy_server, tls_ca_file)
    assert "2 Content-Type headers" in str(error)


def test_body_too_large_by_its_length(policy_server, tls_ca_file):
    policy_server.behaviour = answer(body=b"x" * 1001)
    error = _fetch_error(policy_server, tls_ca_file, max_size=1000)
    assert error.result_type == "sts-policy-fetch-error"
    assert "the body is 1001 bytes, more than the 1000 accepted" in str(error)
    policy_server.behaviour = answer(body=b"x" * 1000)
    assert _fetch(policy_server, tls_ca_file, max_size=1000) == "x" * 1000


def test_body_too_large_without_a_length_stops_reading(policy_server, tls_ca_file):
    sent = []
    done = threading.Event()

    def behave(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "text/plain")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        try:
            for _ in range(10_000):      # 160 MB if nobody stopped reading
                handler.wfile.write(b"4000\r\n" + b"x" * 0x4000 + b"\r\n")
                sent.append(0x4000)
        except OSError:
            pass
        finally:
            done.set()
    policy_server.behaviour = behave
    error = _fetch_error(policy_server, tls_ca_file)
    assert error.result_type == "sts-policy-fetch-error"
    assert "the body is more than the 65536 bytes accepted" in str(error)
    assert done.wait(5)                  # the server found nobody reading
    assert sum(sent) < 10_000 * 0x4000


def test_body_cut_short(policy_server, tls_ca_file):
    def behave(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "text/plain")
        handler.send_header("Content-Length", str(len(POLICY) + 100))
        handler.end_headers()
        handler.wfile.write(POLICY)
        handler.close_connection = True
    policy_server.behaviour = behave
    error = _fetch_error(policy_server, tls_ca_file)
    assert error.result_type == "sts-policy-fetch-error"
    assert "the connection ended in the body" in str(error)
    assert "may be cut short" in str(error)


def test_body_to_the_end_of_the_connection_needs_close_notify(policy_server, tls_ca_file):
    # No length: the body ends with the connection, which this server
    # closes without TLS's close_notify, as an attacker's forged FIN would.
    policy_server.behaviour = answer(length=False)
    error = _fetch_error(policy_server, tls_ca_file)
    assert error.result_type == "sts-policy-fetch-error"
    assert "without TLS's close_notify" in str(error)


def _close_tls(handler):
    """End the connection as TLS should: close_notify first."""
    handler.wfile.flush()
    try:
        handler.request.unwrap()
    except (OSError, ssl.SSLError):
        pass                             # the client hung up without answering it
    handler.close_connection = True


def test_body_to_the_end_of_the_connection_with_close_notify(policy_server, tls_ca_file):
    def behave(handler):
        answer(length=False)(handler)
        _close_tls(handler)
    policy_server.behaviour = behave
    assert _fetch(policy_server, tls_ca_file) == POLICY.decode()


def test_body_shorter_than_its_length_with_close_notify(policy_server, tls_ca_file):
    def behave(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "text/plain")
        handler.send_header("Content-Length", str(len(POLICY) + 100))
        handler.end_headers()
        handler.wfile.write(POLICY)
        _close_tls(handler)
    policy_server.behaviour = behave
    error = _fetch_error(policy_server, tls_ca_file)
    assert error.result_type == "sts-policy-fetch-error"
    assert f"the body ended after {len(POLICY)} bytes, 100 short of its Content-Length" \
        in str(error)


def test_body_not_utf8(policy_server, tls_ca_file):
    policy_server.behaviour = answer(body=POLICY + b"ext: \xff\r\n")
    error = _fetch_error(policy_server, tls_ca_file)
    assert error.result_type == "sts-policy-invalid"
    assert "not UTF-8" in str(error)


def test_not_http(policy_server, tls_ca_file):
    def behave(handler):
        handler.wfile.write(b"220 mail.example.test ESMTP\r\n")
        handler.close_connection = True
    policy_server.behaviour = behave
    error = _fetch_error(policy_server, tls_ca_file)
    assert error.result_type == "sts-policy-fetch-error"
    assert "did not answer in HTTP" in str(error)


def test_connection_refused(tls_ca_file):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PolicyFetchError) as info:
        fetch_policy(DOMAIN, address="127.0.0.1", port=port, ca_file=tls_ca_file, timeout=2)
    assert info.value.result_type == "sts-policy-fetch-error"
    assert f"127.0.0.1 port {port} refused the connection" in str(info.value)


def test_server_that_never_answers_tls(tls_ca_file):
    # Connections are accepted (by the kernel) but nothing ever comes back.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        start = time.monotonic()
        with pytest.raises(PolicyFetchError) as info:
            fetch_policy(DOMAIN, address="127.0.0.1", port=silent.getsockname()[1],
                         ca_file=tls_ca_file, timeout=0.5)
        took = time.monotonic() - start
    assert 0.45 <= took < 1.0
    assert info.value.result_type == "sts-policy-fetch-error"
    assert "no complete answer from 127.0.0.1 port" in str(info.value)
    assert "within 0.5 s" in str(info.value)


def test_server_that_never_answers_http(policy_server, tls_ca_file):
    policy_server.behaviour = lambda handler: policy_server.stopping.wait(10)
    start = time.monotonic()
    error = _fetch_error(policy_server, tls_ca_file, timeout=0.5)
    assert 0.45 <= time.monotonic() - start < 1.0
    assert "within 0.5 s" in str(error)


def test_server_that_trickles_is_cut_at_the_timeout(policy_server, tls_ca_file):
    # A byte every 50 ms: no single read ever waits long, so only the
    # limit on the whole fetch can stop it (after 3 s the server gives up,
    # so that a fetch without that limit fails this test, not hangs it).
    def behave(handler):
        handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
        handler.wfile.flush()
        give_up = time.monotonic() + 3
        while not policy_server.stopping.wait(0.05) and time.monotonic() < give_up:
            try:
                handler.wfile.write(b"X")
                handler.wfile.flush()
            except OSError:
                return
    policy_server.behaviour = behave
    start = time.monotonic()
    error = _fetch_error(policy_server, tls_ca_file, timeout=0.6)
    assert 0.55 <= time.monotonic() - start < 1.1
    assert error.result_type == "sts-policy-fetch-error"
    assert "within 0.6 s" in str(error)


@pytest.mark.parametrize("kwargs, message", [
    ({"domain": "exa mple.test"}, "domain 'exa mple.test' is not a host name"),
    ({"domain": "b\u00fccher.test"}, "give its A-label"),
    ({"domain": b"example.test"}, "domain must be a str"),
    ({"domain": ""}, "is not a host name"),
    ({"address": "localhost"}, "address must be an IP address"),
    ({"port": 0}, "port must be an int from 1 to 65535"),
    ({"port": "443"}, "port must be an int"),
    ({"timeout": 0}, "timeout must be a positive number"),
    ({"timeout": float("nan")}, "timeout must be a positive number"),
    ({"max_size": 0}, "max_size must be a positive int"),
    ({"ca_file": "/nonexistent/ca.pem"}, "cannot be loaded as PEM CA certificates"),
])
def test_fetch_misuse(kwargs, message):
    args = {"domain": DOMAIN, "address": "127.0.0.1", "port": 1, **kwargs}
    domain = args.pop("domain")
    with pytest.raises(smtpstate.InvalidOptionError, match=message):
        fetch_policy(domain, **args)


def test_exceptions_and_result_types():
    assert issubclass(PolicyError, smtpstate.MTASTSError)
    assert issubclass(PolicyFetchError, smtpstate.MTASTSError)
    assert issubclass(smtpstate.MTASTSError, smtpstate.SMTPStateError)
    assert not issubclass(smtpstate.MTASTSError, ValueError)     # the peer's fault
    assert smtpstate.PolicyError is PolicyError
    assert PolicyFetchError("x").result_type == "sts-policy-fetch-error"
    assert PolicyFetchError("x", "sts-webpki-invalid").result_type == "sts-webpki-invalid"
    with pytest.raises(smtpstate.InvalidOptionError, match="result_type must be one of"):
        PolicyFetchError("x", "sts-oops")
    assert smtpstate.mta_sts.fetch_policy is fetch_policy


# ---------------------------------------------------------------------------
# The cache (§5.1)
# ---------------------------------------------------------------------------


def _p(policy_id="id1", fetched_at=NOW, max_age=86400, mode="enforce"):
    return Policy(mode=mode, mx=("mail.example.test",), max_age=max_age, id=policy_id,
                  fetched_at=fetched_at)


def test_cache_get_and_put():
    cache = PolicyCache()
    assert cache.get(DOMAIN, NOW) is None
    cache.put(DOMAIN, _p())
    assert cache.get(DOMAIN, NOW + 10) == _p()
    assert cache.get("EXAMPLE.test.", NOW) == _p()                 # one domain, one key
    assert cache.get(DOMAIN, NOW + 86400) is None                  # expired
    cache.put("Example.TEST", _p("id2"))
    assert cache.get(DOMAIN, NOW).id == "id2" and len(cache) == 1


@pytest.mark.parametrize("cached, txt_id, now, expected", [
    (None, "id1", NOW, True),                  # nothing cached: fetch
    (None, None, NOW, False),                  # no TXT record: nothing to fetch
    (_p("id1"), "id1", NOW + 100, False),      # same id, still valid
    (_p("id1"), "id2", NOW + 100, True),       # the id changed
    (_p("id1"), "id1", NOW + 86400, True),     # expired
    (_p("id1"), None, NOW + 100, False),       # TXT gone: the policy stays...
    (_p("id1"), None, NOW + 86400, False),     # ... until it expires
    (_p("id1", max_age=0), "id1", NOW, True),
])
def test_refresh_needed(cached, txt_id, now, expected):
    cache = PolicyCache()
    if cached is not None:
        cache.put(DOMAIN, cached)
    assert cache.refresh_needed(DOMAIN, txt_id, now) is expected


def test_policy_stays_in_force_without_its_txt_record():
    cache = PolicyCache()
    cache.put(DOMAIN, _p())
    later = NOW + 3600
    assert parse_txt_records([]) is None
    assert not cache.refresh_needed(DOMAIN, None, later)
    assert cache.get(DOMAIN, later) == _p()
    assert cache.get(DOMAIN, NOW + 86400) is None


def test_cache_persists_across_instances(tmp_path):
    path = tmp_path / "mta-sts.json"
    first = PolicyCache(str(path))
    first.put(DOMAIN, _p())
    first.put("other.test", _p("id9", mode="testing"))
    data = json.loads(path.read_text())
    assert set(data["policies"]) == {DOMAIN, "other.test"}

    second = PolicyCache(str(path))
    assert second.get(DOMAIN, NOW) == _p()
    assert second.get("other.test", NOW) == _p("id9", mode="testing")
    assert not second.refresh_needed(DOMAIN, "id1", NOW)
    assert [p.name for p in tmp_path.iterdir()] == ["mta-sts.json"]   # no temporary left


def test_cache_file_missing_is_an_empty_cache(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, "smtpstate.mta_sts"):
        cache = PolicyCache(str(tmp_path / "absent.json"))
    assert len(cache) == 0 and caplog.records == []


@pytest.mark.parametrize("content", [
    "{not json", "", "[]", '{"format": "something else", "version": 1, "policies": {}}',
    '{"format": "smtpstate-mta-sts-cache", "version": 99, "policies": {}}',
    b"\xff\xfe".decode("latin-1"),
])
def test_corrupt_cache_file_is_logged_and_ignored(tmp_path, caplog, content):
    path = tmp_path / "mta-sts.json"
    path.write_text(content, encoding="latin-1")
    with caplog.at_level(logging.WARNING, "smtpstate.mta_sts"):
        cache = PolicyCache(str(path))
    assert len(cache) == 0
    assert any("ignored" in r.getMessage() for r in caplog.records)
    cache.put(DOMAIN, _p())                    # and the next change replaces it
    assert PolicyCache(str(path)).get(DOMAIN, NOW) == _p()


def test_bad_entries_are_skipped_the_rest_kept(tmp_path, caplog):
    path = tmp_path / "mta-sts.json"
    good = {"mode": "enforce", "mx": ["mail.example.test"], "max_age": 60, "id": "a",
            "fetched_at": NOW}
    path.write_text(json.dumps({"format": "smtpstate-mta-sts-cache", "version": 1,
                                "policies": {
                                    "good.test": good,
                                    "badmode.test": {**good, "mode": "reject"},
                                    "nomx.test": {k: v for k, v in good.items() if k != "mx"},
                                    "bad domain": good,
                                    "notadict.test": [1, 2],
                                }}))
    with caplog.at_level(logging.WARNING, "smtpstate.mta_sts"):
        cache = PolicyCache(str(path))
    assert len(cache) == 1 and cache.get("good.test", NOW).id == "a"
    assert len([r for r in caplog.records if "entry" in r.getMessage()]) == 4


def test_eviction_of_the_oldest():
    cache = PolicyCache(max_entries=3)
    for i, domain in enumerate(["a.test", "b.test", "c.test"]):
        cache.put(domain, _p(fetched_at=NOW + i))
    cache.put("a.test", _p(fetched_at=NOW + 10))       # refreshed: now the newest
    cache.put("d.test", _p(fetched_at=NOW + 11))
    assert len(cache) == 3
    assert cache.get("b.test", NOW + 20) is None        # fetched longest ago
    assert all(cache.get(d, NOW + 20) for d in ("a.test", "c.test", "d.test"))


def test_eviction_when_loading_a_larger_file(tmp_path):
    path = str(tmp_path / "mta-sts.json")
    big = PolicyCache(path)
    for i in range(5):
        big.put(f"d{i}.test", _p(fetched_at=NOW + i))
    small = PolicyCache(path, max_entries=2)
    assert len(small) == 2
    assert small.get("d4.test", NOW + 10) and small.get("d3.test", NOW + 10)


def test_unwritable_cache_file_is_logged_and_memory_kept(tmp_path, caplog):
    path = tmp_path / "gone" / "mta-sts.json"          # its directory does not exist
    cache = PolicyCache(str(path))
    with caplog.at_level(logging.ERROR, "smtpstate.mta_sts"):
        cache.put(DOMAIN, _p())
    assert cache.get(DOMAIN, NOW) == _p()
    assert any("not written" in r.getMessage() for r in caplog.records)


def test_cache_from_several_threads(tmp_path):
    path = str(tmp_path / "mta-sts.json")
    cache = PolicyCache(path, max_entries=150)
    errors = []

    def writer(n):
        try:
            for i in range(25):
                cache.put(f"d{n}-{i}.test", _p(f"id{n}x{i}", fetched_at=NOW + i))
                cache.refresh_needed(f"d{n}-{i}.test", "other", NOW)
                cache.get(f"d{n}-{i}.test", NOW)
        except Exception as e:      # pragma: no cover - the assertion shows it
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(cache) == 150
    reloaded = PolicyCache(path, max_entries=1000)
    assert len(reloaded) == 150
    assert sorted(os.listdir(tmp_path)) == ["mta-sts.json"]


@pytest.mark.parametrize("kwargs, message", [
    ({"max_entries": 0}, "max_entries must be a positive int"),
    ({"max_entries": True}, "max_entries must be a positive int"),
    ({"path": 3}, "path must be a file name or None"),
])
def test_cache_misuse(kwargs, message):
    with pytest.raises(smtpstate.InvalidOptionError, match=message):
        PolicyCache(**kwargs)


def test_cache_put_misuse():
    cache = PolicyCache()
    with pytest.raises(smtpstate.InvalidOptionError, match="policy must be a Policy"):
        cache.put(DOMAIN, {"mode": "enforce"})
    with pytest.raises(smtpstate.InvalidOptionError, match="is not a host name"):
        cache.put("not a domain", _p())
