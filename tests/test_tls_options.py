"""The TLS settings of submission: client certificates, ``ca_path``,
``tls_min_version``, ``ciphers`` and ``ciphersuites`` (docs/tls.md,
"Settings for submission").

Real components only: aiosmtpd with STARTTLS whose ``ssl`` context
requires a client certificate issued by a CA of the test's own (trustme),
or is capped at TLS 1.2; a CA directory hashed by ``openssl rehash``.
What the server saw (the peer certificate's subject, the version, the
cipher) is read on the server side, from its ``ssl`` object.

Every setting is checked when the options are made: each refusal is an
InvalidOptionError from ``Options``/``Client``/``Engine.submit``/
``aio.Client``, before anything connects, saying what to fix.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import textwrap
from typing import Any, List, Tuple

import pytest

import smtpstate
import smtpstate.aio
from smtpstate import Message
from smtpstate.cli import main
from smtpstate.errors import InvalidOptionError

import helpers
from helpers import RecordingHandler

SUBJECT = "submitter.example"


def msg(i: int = 0) -> Message:
    return Message("sender@example.test", ["rcpt@example.test"],
                   b"Subject: tls options %d\r\n\r\nhello\r\n" % i)


class PeerHandler(RecordingHandler):
    """Records, per message, what the server's TLS saw: the client's
    certificate (as ``ssl`` parses it; None without one), the version
    and the cipher."""

    def __init__(self) -> None:
        super().__init__()
        self.peers: List[Tuple[Any, str, str]] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd API)
        tls = session.ssl.get("ssl_object") if session.ssl else None
        if tls is not None:
            self.peers.append((tls.getpeercert() or None, tls.version(), tls.cipher()[0]))
        return await super().handle_DATA(server, session, envelope)


def subject_cn(cert: Any) -> str:
    return dict(pair[0] for pair in cert["subject"])["commonName"]


# ---------------------------------------------------------------------------
# Certificates and servers
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client_ca():
    """The CA the server trusts for client certificates (not tls_ca)."""
    trustme = helpers.import_or_missing("trustme")
    return trustme.CA()


@pytest.fixture(scope="module")
def client_files(client_ca, tmp_path_factory):
    """A client certificate from ``client_ca`` for SUBJECT, as files:
    ``cert`` (the chain), ``key``, ``both`` (chain and key in one),
    ``enc`` (the key encrypted with the password "sekrit"), ``other_key``
    (the key of another certificate)."""
    from cryptography.hazmat.primitives import serialization

    d = tmp_path_factory.mktemp("client-cert")
    leaf = client_ca.issue_cert(SUBJECT, common_name=SUBJECT)
    other = client_ca.issue_cert("other.example")
    files = {name: str(d / f"{name}.pem") for name in ("cert", "key", "both", "enc", "other_key")}
    with open(files["cert"], "wb") as f:
        for pem in leaf.cert_chain_pems:
            f.write(pem.bytes())
    leaf.private_key_pem.write_to_path(files["key"])
    leaf.private_key_and_cert_chain_pem.write_to_path(files["both"])
    other.private_key_pem.write_to_path(files["other_key"])
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    with open(files["enc"], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.BestAvailableEncryption(b"sekrit")))
    return files


@pytest.fixture
def server_context(tls_ca, client_ca):
    """``make(max_version=None, client_cert=True)``: a STARTTLS context for
    "localhost" and 127.0.0.1 from tls_ca; requiring a certificate from client_ca unless
    ``client_cert=False``; at most ``max_version`` (an ssl.TLSVersion)."""
    def make(max_version: Any = None, client_cert: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls_ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
        if client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cadata=client_ca.cert_pem.bytes().decode())
        if max_version is not None:
            ctx.maximum_version = max_version
        return ctx
    return make


@pytest.fixture
def server(aiosmtpd_factory, server_context):
    """``start(**context_kwargs)``: aiosmtpd with STARTTLS on
    server_context(**context_kwargs) and a PeerHandler."""
    def start(**kwargs: Any):
        return aiosmtpd_factory(PeerHandler(), tls_context=server_context(**kwargs),
                                require_starttls=True)
    return start


def hashed_dir(path: Any, *cas: Any) -> str:
    """A CA directory as ``ssl``'s capath wants it: each CA's PEM in a
    file, and the subject-hash names ``openssl rehash`` makes."""
    openssl = helpers.find_program("openssl")
    if openssl is None:
        helpers.missing("no openssl command (Debian package openssl)")
    os.makedirs(path, exist_ok=True)
    for i, ca in enumerate(cas):
        ca.cert_pem.write_to_path(os.path.join(path, f"ca{i}.pem"))
    subprocess.run([openssl, "rehash", str(path)], check=True, capture_output=True)
    return str(path)


VERSIONS = [pytest.param(ssl.TLSVersion.TLSv1_2, id="TLSv1.2"),
            pytest.param(ssl.TLSVersion.TLSv1_3, id="TLSv1.3")]


# ---------------------------------------------------------------------------
# Client certificates
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_client_certificate_is_what_the_server_sees(server, client_files, tls_ca_file, version):
    srv = server(max_version=version)
    with smtpstate.Client(srv.host, srv.port, timeout=20, tls="verify", ca_file=tls_ca_file,
                          cert_file=client_files["cert"], key_file=client_files["key"]) as c:
        result = c.send(msg())
    assert result.status == "delivered", result
    (peer, got_version, _), = srv.handler.peers
    assert peer is not None and subject_cn(peer) == SUBJECT
    assert got_version == ("TLSv1.2" if version == ssl.TLSVersion.TLSv1_2 else "TLSv1.3")


@pytest.mark.parametrize("version", VERSIONS)
def test_without_a_client_certificate_the_server_refuses(server, tls_ca_file, version):
    srv = server(max_version=version)
    with smtpstate.Client(srv.host, srv.port, timeout=20, tls="verify",
                          ca_file=tls_ca_file) as c:
        result = c.send(msg())
    # TLS 1.2: the handshake fails. TLS 1.3: the client is up first (its
    # certificate, or none, goes with its Finished), and the server ends
    # the connection before it answers the EHLO.
    assert result.status == "tempfail", result
    if version == ssl.TLSVersion.TLSv1_2:
        assert result.stage == "TLS handshake", result
    assert srv.messages == [] and srv.handler.peers == []


@pytest.mark.parametrize("files", [
    pytest.param(dict(cert_file="both"), id="key-in-cert-file"),
    pytest.param(dict(cert_file="cert", key_file="enc", key_password="sekrit"),
                 id="encrypted-key-str-password"),
    pytest.param(dict(cert_file="cert", key_file="enc", key_password=b"sekrit"),
                 id="encrypted-key-bytes-password"),
])
def test_client_certificate_files(server, client_files, tls_ca_file, files):
    options = {k: (client_files[v] if k != "key_password" else v) for k, v in files.items()}
    srv = server()
    with smtpstate.Client(srv.host, srv.port, timeout=20, tls="verify", ca_file=tls_ca_file,
                          **options) as c:
        assert c.send(msg()).status == "delivered"
    assert subject_cn(srv.handler.peers[0][0]) == SUBJECT


def test_client_certificate_through_the_engine_and_asyncio(server, client_files, tls_ca_file):
    import asyncio

    srv = server()
    options = dict(timeout=20, tls="verify", ca_file=tls_ca_file,
                   cert_file=client_files["cert"], key_file=client_files["key"])
    engine_results = smtpstate.deliver([msg(1), msg(2)], srv.host, srv.port, **options)
    aio_result = asyncio.run(smtpstate.aio.send(msg(3), srv.host, srv.port, **options))
    assert [r.status for r in engine_results] == ["delivered", "delivered"], engine_results
    assert aio_result.status == "delivered", aio_result
    srv.wait_for_messages(3)
    assert [subject_cn(p[0]) for p in srv.handler.peers] == [SUBJECT] * 3


def test_opportunistic_tls_offers_the_client_certificate_too(server, client_files):
    """The certificate is the caller's, offered at any level; opportunistic
    TLS checks nothing of the server's but still shows ours."""
    srv = server()
    with smtpstate.Client(srv.host, srv.port, timeout=20, tls="opportunistic",
                          cert_file=client_files["both"]) as c:
        assert c.send(msg()).status == "delivered"
    assert subject_cn(srv.handler.peers[0][0]) == SUBJECT


def test_key_password_is_never_shown(client_files):
    o = smtpstate.Options(cert_file=client_files["cert"], key_file=client_files["enc"],
                          key_password="sekrit")
    assert "sekrit" not in repr(o) and "key_password" not in repr(o)


# ---------------------------------------------------------------------------
# ca_path
# ---------------------------------------------------------------------------


def test_ca_path_verifies_the_server(server, tls_ca, client_ca, client_files, tmp_path):
    srv = server(client_cert=False)
    capath = hashed_dir(tmp_path / "cas", client_ca, tls_ca)
    with smtpstate.Client(srv.host, srv.port, timeout=20, tls="verify", ca_path=capath) as c:
        assert c.send(msg()).status == "delivered"


def test_ca_path_without_the_servers_ca_refuses_it(server, client_ca, tmp_path):
    srv = server(client_cert=False)
    capath = hashed_dir(tmp_path / "cas", client_ca)          # not the server's CA
    with smtpstate.Client(srv.host, srv.port, timeout=20, tls="verify", ca_path=capath) as c:
        result = c.send(msg())
    assert result.status == "tempfail"
    assert "certificate verify failed" in result.reason, result.reason
    assert srv.messages == []


def test_ca_path_is_found_after_a_chdir(server, tls_ca, tmp_path, monkeypatch):
    srv = server(client_cert=False)
    hashed_dir(tmp_path / "cas", tls_ca)
    monkeypatch.chdir(tmp_path)
    client = smtpstate.Client(srv.host, srv.port, timeout=20, tls="verify", ca_path="cas")
    monkeypatch.chdir("/")
    with client:
        assert client.send(msg()).status == "delivered"


# ---------------------------------------------------------------------------
# Versions and ciphers
# ---------------------------------------------------------------------------


def test_tls13_minimum_against_a_tls12_server_fails_the_handshake(server, tls_ca_file):
    srv = server(max_version=ssl.TLSVersion.TLSv1_2, client_cert=False)
    with smtpstate.Client(srv.host, srv.port, timeout=20, tls="verify", ca_file=tls_ca_file,
                          tls_min_version="TLSv1.3") as c:
        result = c.send(msg())
    # (Python's server closes without an alert: "connection lost during the
    # TLS handshake".)
    assert result.status == "tempfail", result
    assert result.stage == "TLS handshake" and result.state == "STARTTLS", result
    assert srv.messages == []
    # The same server with the default minimum: TLS 1.2, delivered.
    with smtpstate.Client(srv.host, srv.port, timeout=20, tls="verify",
                          ca_file=tls_ca_file) as c:
        assert c.send(msg()).status == "delivered"
        assert c.tls_version == "TLSv1.2"


def test_tls13_minimum_with_a_tls13_server(server, tls_ca_file):
    srv = server(client_cert=False)
    with smtpstate.Client(srv.host, srv.port, timeout=20, tls="verify", ca_file=tls_ca_file,
                          tls_min_version="TLSv1.3") as c:
        assert c.send(msg()).status == "delivered"
        assert c.tls_version == "TLSv1.3"


def test_ciphers_choose_the_tls12_cipher(server, tls_ca_file):
    # trustme's keys are ECDSA; the server would prefer AES-256-GCM.
    srv = server(max_version=ssl.TLSVersion.TLSv1_2, client_cert=False)
    with smtpstate.Client(srv.host, srv.port, timeout=20, tls="verify", ca_file=tls_ca_file,
                          ciphers="ECDHE-ECDSA-CHACHA20-POLY1305") as c:
        assert c.send(msg()).status == "delivered"
    assert srv.handler.peers[0][1:] == ("TLSv1.2", "ECDHE-ECDSA-CHACHA20-POLY1305")


def test_ciphers_the_server_does_not_share_fail_the_handshake(server, tls_ca_file):
    # Python's server list leaves out SHA-1 MACs.
    srv = server(max_version=ssl.TLSVersion.TLSv1_2, client_cert=False)
    with smtpstate.Client(srv.host, srv.port, timeout=20, tls="verify", ca_file=tls_ca_file,
                          ciphers="ECDHE-ECDSA-AES128-SHA") as c:
        result = c.send(msg())
    assert result.status == "tempfail" and result.stage == "TLS handshake", result
    assert srv.messages == []


def test_ciphersuites_choose_the_tls13_suite(server, tls_ca_file):
    srv = server(client_cert=False)
    with smtpstate.Client(srv.host, srv.port, timeout=20, tls="verify", ca_file=tls_ca_file,
                          ciphersuites="TLS_CHACHA20_POLY1305_SHA256") as c:
        assert c.send(msg()).status == "delivered"
    assert srv.handler.peers[0][1:] == ("TLSv1.3", "TLS_CHACHA20_POLY1305_SHA256")


# ---------------------------------------------------------------------------
# Checked up front
# ---------------------------------------------------------------------------


BAD = [
    ("missing cert", dict(cert_file="/nonexistent/client.pem"), "cert_file '/nonexistent/client.pem' does not exist"),
    ("cert is a directory", dict(cert_file="."), "is not a file"),
    ("no key anywhere", dict(cert_file="cert"), "cannot load a private key from it"),
    ("key of another cert", dict(cert_file="cert", key_file="other_key"), "does not match the certificate of cert_file"),
    ("cert file holds a key", dict(cert_file="key", key_file="key"), "cannot load the certificate chain"),
    ("encrypted key, no password", dict(cert_file="cert", key_file="enc"), "if it is encrypted, give key_password"),
    ("wrong password", dict(cert_file="cert", key_file="enc", key_password="nope"), "wrong key_password?"),
    ("key without cert", dict(key_file="key"), "key_file needs cert_file"),
    ("password without cert", dict(key_password="x"), "key_password needs cert_file"),
    ("empty password", dict(cert_file="cert", key_file="enc", key_password=""), "key_password must be a non-empty"),
    ("unknown version", dict(tls_min_version="TLSv1.1"), "tls_min_version='TLSv1.1' is not one of ['TLSv1.2', 'TLSv1.3']"),
    ("version not a str", dict(tls_min_version=ssl.TLSVersion.TLSv1_3), "tls_min_version="),
    ("bad ciphers", dict(ciphers="NO-SUCH-CIPHER"), "ciphers 'NO-SUCH-CIPHER': OpenSSL finds no TLS 1.2 cipher in it"),
    ("bad ciphersuites", dict(ciphersuites="TLS_NO_SUCH_SUITE"), "ciphersuites 'TLS_NO_SUCH_SUITE': OpenSSL finds no TLS 1.3"),
    ("no suites, TLS 1.3 only", dict(ciphersuites="", tls_min_version="TLSv1.3"), "leaves TLS 1.3 no cipher suite"),
    ("control in ciphers", dict(ciphers="HIGH\r\n"), "ciphers must be a str of printable ASCII"),
    ("ca_path not hashed", dict(ca_path="unhashed"), "run 'openssl rehash' on it"),
    ("ca_path missing", dict(ca_path="/nonexistent/cas"), "ca_path '/nonexistent/cas' does not exist"),
    ("ca_path a file", dict(ca_path="cert"), "is not a directory"),
    ("ca_file of junk", dict(ca_file="junk"), "ca_file '"),
]


def _resolve(kwargs: dict, client_files: dict, tmp_path: Any) -> dict:
    """Names of BAD's files as paths."""
    (tmp_path / "unhashed").mkdir(exist_ok=True)
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, str) and v in client_files:
            v = client_files[v]
        elif v in ("unhashed", "junk"):
            v = str(tmp_path / ("unhashed" if v == "unhashed" else "junk.pem"))
        out[k] = v
    return out


@pytest.mark.parametrize("label, kwargs, words", BAD, ids=[b[0] for b in BAD])
def test_refused_when_the_options_are_made(label, kwargs, words, client_files, tmp_path):
    options = _resolve(kwargs, client_files, tmp_path)
    with pytest.raises(InvalidOptionError) as info:
        smtpstate.Options(**options)
    assert words in str(info.value), str(info.value)
    # Whatever the level: tls="none" with a setting checks it too.
    with pytest.raises(InvalidOptionError):
        smtpstate.Options(tls="none", **options)


@pytest.mark.parametrize("label, kwargs, words", [BAD[3], BAD[12]], ids=[BAD[3][0], BAD[12][0]])
def test_every_driver_refuses_before_connecting(label, kwargs, words, client_files, tmp_path):
    import asyncio

    options = _resolve(kwargs, client_files, tmp_path)
    port = helpers.free_port()                    # nothing listens: a connect would say so
    with pytest.raises(InvalidOptionError, match="does not match|finds no"):
        smtpstate.Client("127.0.0.1", port, **options)
    with pytest.raises(InvalidOptionError, match="does not match|finds no"):
        smtpstate.aio.Client("127.0.0.1", port, **options)
    with smtpstate.Engine() as engine:
        with pytest.raises(InvalidOptionError, match="does not match|finds no"):
            engine.submit(msg(), "127.0.0.1", port, **options)
    with pytest.raises(InvalidOptionError, match="does not match|finds no"):
        smtpstate.deliver([msg()], "127.0.0.1", port, **options)
    with pytest.raises(InvalidOptionError, match="does not match|finds no"):
        asyncio.run(smtpstate.aio.send(msg(), "127.0.0.1", port, **options))


def test_a_renewed_certificate_is_read_again(client_ca, client_files, tmp_path):
    """Policies are shared per settings and files as they are on disk: a
    certificate replaced in place (renewed) is read by the next Options,
    and a key that no longer matches it is refused then."""
    cert = tmp_path / "renewed.pem"
    cert.write_bytes(open(client_files["cert"], "rb").read())
    first = smtpstate.Options(cert_file=str(cert), key_file=client_files["key"])
    assert first.tls_config() is smtpstate.Options(
        cert_file=str(cert), key_file=client_files["key"]).tls_config()
    other = client_ca.issue_cert("renewed.example")
    cert.write_bytes(b"".join(p.bytes() for p in other.cert_chain_pems))
    os.utime(cert, ns=(0, os.stat(cert).st_mtime_ns + 10**9))
    with pytest.raises(InvalidOptionError, match="does not match"):
        smtpstate.Options(cert_file=str(cert), key_file=client_files["key"])


# ---------------------------------------------------------------------------
# The system store, read lazily, is still the default for verified TLS
# ---------------------------------------------------------------------------


def test_verified_tls_still_reads_the_system_store(server, tls_ca_file):
    """Without ca_file or ca_path a verifying handshake trusts the system
    store, now read at that handshake (csrc/tls.c tls_trusted(); the C
    test test_tls.c checks that opportunistic TLS never reads it). A
    process of its own, whose OpenSSL finds the test CA as its default
    file ($SSL_CERT_FILE): opportunistic first, then verified by four
    threads at once (one of them loads the store, the others wait for
    it or find it loaded)."""
    srv = server(client_cert=False)
    code = textwrap.dedent(f"""
        import threading
        import smtpstate
        m = smtpstate.Message("a@example.test", ["b@example.test"], b"Subject: x\\r\\n\\r\\nx\\r\\n")

        def send(tls, out):
            with smtpstate.Client("127.0.0.1", {srv.port}, timeout=20, tls=tls,
                                  server_hostname="localhost") as c:
                r = c.send(m)
                out.append(f"{{tls}} {{r.status}} {{r.reason}}")

        out = []
        send("opportunistic", out)
        threads = [threading.Thread(target=send, args=("verify", out)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print("\\n".join(out))
    """)
    env = dict(os.environ, SSL_CERT_FILE=tls_ca_file)
    env.pop("SSL_CERT_DIR", None)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=60, cwd=str(os.path.dirname(tls_ca_file)))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert [ln.split()[:2] for ln in lines] == [["opportunistic", "delivered"]] + [
        ["verify", "delivered"]] * 4, p.stdout


# ---------------------------------------------------------------------------
# smtpstate send
# ---------------------------------------------------------------------------


def test_cli_send_with_a_client_certificate(server, client_files, tls_ca_file, capsys,
                                            monkeypatch):
    srv = server(max_version=ssl.TLSVersion.TLSv1_2)
    monkeypatch.setenv("SMTPSTATE_KEY_PASSWORD", "sekrit")
    rc = main(["send", "-s", f"{srv.host}:{srv.port}", "--tls", "verify",
               "--server-name", "localhost", "--ca-file", tls_ca_file,
               "--cert", client_files["cert"], "--key", client_files["enc"],
               "--ciphers", "ECDHE-ECDSA-CHACHA20-POLY1305", "-t", "rcpt@example.test"])
    assert rc == 0, capsys.readouterr()
    peer, version, cipher = srv.handler.peers[0]
    assert subject_cn(peer) == SUBJECT and cipher == "ECDHE-ECDSA-CHACHA20-POLY1305"


@pytest.mark.parametrize("args, words", [
    (["--cert", "/nonexistent/c.pem"], "cert_file '/nonexistent/c.pem' does not exist"),
    (["--ciphers", "NOPE"], "ciphers 'NOPE'"),
    (["--tls-min-version", "TLSv1.1"], "invalid choice"),
])
def test_cli_refuses_bad_tls_settings(args, words, capsys):
    port = helpers.free_port()
    with pytest.raises(SystemExit) as info:
        main(["send", "-s", f"127.0.0.1:{port}", "-t", "rcpt@example.test", *args])
    assert info.value.code == 2
    assert words in capsys.readouterr().err
