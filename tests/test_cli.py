"""The command line: ``send`` (swaks-like, exit code by result, -v with
credentials redacted), ``states`` (with --load), ``demo`` (progress bar,
summary), run in-process through ``main()`` and as ``python -m smtpstate``
and the ``smtpstate`` console script."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile

import pytest
from handlers import RefusingHandler
from helpers import RecordingHandler, missing

from smtpstate.cli import EXIT_CODES, main, parse_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
USER, SECRET = "me@example.test", "Pa55-w0rd-secret"


def run(*argv: str, stdin: bytes = b"", env=None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m smtpstate ARGV`` in a fresh process. Not from the source
    tree: ``-m`` puts the working directory first on sys.path, and the
    tests must use the installed package (.ci/run), whose _core is built."""
    return subprocess.run([sys.executable, "-m", "smtpstate", *argv], input=stdin,
                          capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=tempfile.gettempdir())


# -- send ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [
    ("mx.example.net", ("mx.example.net", 25)),
    ("mx.example.net:2525", ("mx.example.net", 2525)),
    ("127.0.0.1:587", ("127.0.0.1", 587)),
    ("[::1]:26", ("::1", 26)),
    ("[::1]", ("::1", 25)),
    ("::1", ("::1", 25)),
])
def test_parse_server(text, want):
    assert parse_server(text) == want


@pytest.mark.parametrize("bad", ["", ":25", "host:0", "host:99999", "host:x", "[::1", "[::1]x"])
def test_parse_server_refuses(bad):
    with pytest.raises(ValueError):
        parse_server(bad)


def test_send_test_message(aiosmtpd_server, capsys):
    rc = main(["send", "--server", f"{aiosmtpd_server.host}:{aiosmtpd_server.port}",
               "--from", "ann@example.test", "--to", "bob@example.test,cy@example.test",
               "--subject", "cli test", "--header", "X-Test: yes"])
    out = capsys.readouterr().out
    assert rc == EXIT_CODES["delivered"] == 0, out
    assert out.startswith(f"delivered via {aiosmtpd_server.host}[{aiosmtpd_server.host}]: 250")
    [got] = aiosmtpd_server.wait_for_messages(1)
    assert got.mail_from == "ann@example.test"
    assert got.rcpt_tos == ["bob@example.test", "cy@example.test"]
    assert b"Subject: cli test\r\n" in got.data and b"X-Test: yes\r\n" in got.data
    assert b"X-Mailer: smtpstate send" in got.data and b"Message-ID: <" in got.data


def test_send_exit_codes(aiosmtpd_factory, capsys):
    server = aiosmtpd_factory(RefusingHandler())
    where = f"{server.host}:{server.port}"
    assert main(["send", "-s", where, "-t", "ok@x.test", "-t", "nobody@x.test"]) == 1
    out = capsys.readouterr().out
    assert "nobody@x.test: permfail 550 5.1.1 no such user [invalid recipient (10)]" in out
    assert main(["send", "-s", where, "-t", "nobody@x.test"]) == 5
    out = capsys.readouterr().out
    assert out.startswith("permfail at stage 4 (sending RCPT TO): 550 5.1.1 no such user "
                          "[invalid recipient (10)]")
    assert main(["send", "-s", where, "-t", "later@x.test"]) == 4
    assert capsys.readouterr().out.startswith("tempfail at stage 4")


def test_send_connection_refused(capsys):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["send", "-s", f"127.0.0.1:{port}", "-t", "a@x.test", "--timeout", "5"]) == 4
    out = capsys.readouterr().out
    assert out.startswith("tempfail at stage 0 (not connected): cannot connect")
    assert out.rstrip().endswith("[transient failure (70)]")


def test_send_data_file_as_is(aiosmtpd_server, tmp_path, capsys):
    content = b"From: x@example.test\r\nBcc: kept-as-given@example.test\r\nSubject: raw\r\n\r\n" \
              b".leading dot\r\nend\r\n"
    path = tmp_path / "msg.eml"
    path.write_bytes(content)
    rc = main(["send", "-s", f"{aiosmtpd_server.host}:{aiosmtpd_server.port}",
               "-f", "ann@example.test", "-t", "bob@example.test", "--data", str(path)])
    assert rc == 0, capsys.readouterr()
    [got] = aiosmtpd_server.wait_for_messages(1)
    assert got.data == content and got.rcpt_tos == ["bob@example.test"]


def test_send_envelope_from_headers_via_stdin(aiosmtpd_server):
    content = (b"From: Ann <ann@example.test>\nTo: bob@example.test\nCc: cy@example.test\n"
               b"Bcc: hidden@example.test\nSubject: stdin\n\nbody\n")
    p = run("send", "-s", f"{aiosmtpd_server.host}:{aiosmtpd_server.port}", "--data", "-",
            stdin=content)
    assert p.returncode == 0, p.stderr.decode()
    [got] = aiosmtpd_server.wait_for_messages(1)
    assert got.mail_from == "ann@example.test"
    assert got.rcpt_tos == ["bob@example.test", "cy@example.test", "hidden@example.test"]
    assert b"Bcc" not in got.data and b"Subject: stdin\r\n" in got.data


def test_send_json(aiosmtpd_factory, capsys):
    server = aiosmtpd_factory(RefusingHandler())
    rc = main(["send", "-s", f"{server.host}:{server.port}", "-t", "ok@x.test",
               "-t", "nobody@x.test", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 1 and doc["status"] == "partial"
    assert doc["bounce_class"] == {"code": 10, "name": "invalid recipient"}
    assert doc["recipients"][1] == {
        "address": "nobody@x.test", "status": "permfail",
        "reply": {"code": 550, "enhanced": "5.1.1", "text": "5.1.1 no such user"},
        "bounce_class": {"code": 10, "name": "invalid recipient"},
        "mx": server.host, "ip": "127.0.0.1"}


class _EvilHandler(RecordingHandler):
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        return "550 5.1.1 \x1b[2J\x1b]0;owned\x07 gone"


def test_send_output_is_harmless(aiosmtpd_factory, capsys):
    server = aiosmtpd_factory(_EvilHandler())
    rc = main(["send", "-s", f"{server.host}:{server.port}", "-t", "a@x.test", "-v"])
    captured = capsys.readouterr()
    assert rc == 5
    for text in (captured.out, captured.err):
        assert "\x1b" not in text and "\x07" not in text
    assert "\\x1b[2J\\x1b]0;owned\\x07 gone" in captured.out
    assert "S: 550 5.1.1 \\x1b[2J" in captured.err


@pytest.fixture
def tls_auth_server(aiosmtpd_factory, tls_ca, tmp_path):
    from aiosmtpd.smtp import AuthResult

    def check(server, session, envelope, mechanism, data):
        return AuthResult(success=data.login == USER.encode() and data.password == SECRET.encode(),
                          handled=False)        # aiosmtpd then answers 235 or 535 itself

    cert = tls_ca.issue_cert("localhost")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    server = aiosmtpd_factory(tls_context=ctx, require_starttls=True, authenticator=check,
                              auth_require_tls=True)
    ca = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca))
    server.ca_file = str(ca)
    return server


def test_send_tls_auth_verbose_redacts(tls_auth_server):
    s = tls_auth_server
    p = run("send", "-s", f"{s.host}:{s.port}", "--tls", "--ca-file", s.ca_file,
            "--server-name", "localhost", "--auth-user", USER, "-f", USER,
            "-t", "bob@example.test", "-v", env={"SMTPSTATE_AUTH_PASSWORD": SECRET})
    out, err = p.stdout.decode(), p.stderr.decode()
    assert p.returncode == 0, out + err
    assert "C: STARTTLS" in err and " * TLS is up: TLSv1." in err
    assert "C: AUTH PLAIN [credentials redacted]" in err
    assert "S: 235" in err and "C: MAIL FROM:<%s>" % USER in err
    import base64
    for form in (SECRET, base64.b64encode(f"\0{USER}\0{SECRET}".encode()).decode()):
        assert form not in out and form not in err
    [got] = s.wait_for_messages(1)
    assert got.extra["tls"] and got.rcpt_tos == ["bob@example.test"]


def test_send_wrong_password_is_permanent(tls_auth_server, capsys, monkeypatch):
    s = tls_auth_server
    monkeypatch.setenv("SMTPSTATE_AUTH_USER", USER)
    monkeypatch.setenv("SMTPSTATE_AUTH_PASSWORD", "wrong-" + SECRET)
    rc = main(["send", "-s", f"{s.host}:{s.port}", "--tls", "--ca-file", s.ca_file,
               "--server-name", "localhost", "-t", "bob@example.test"])
    out = capsys.readouterr().out
    assert rc == 5 and out.startswith("permfail"), out
    assert SECRET not in out


def test_send_auth_without_tls_is_refused_locally(aiosmtpd_server, capsys, monkeypatch):
    monkeypatch.setenv("SMTPSTATE_AUTH_PASSWORD", SECRET)
    rc = main(["send", "-s", f"{aiosmtpd_server.host}:{aiosmtpd_server.port}",
               "--auth-user", USER, "-t", "bob@example.test"])
    out = capsys.readouterr().out
    assert rc in (4, 5) and "TLS" in out, out
    assert aiosmtpd_server.messages == []


@pytest.mark.parametrize("argv, message", [
    (["send", "-s", "127.0.0.1:25"], "send needs --to"),
    (["send", "-s", "host:0", "-t", "a@b"], "--server"),
    (["send", "-t", "a@b", "--auth-password", "x"], "--auth-password without --auth-user"),
    (["send", "-t", "a\r\nb@x"], "control character"),
    (["send", "-t", "a@b", "--data", "/nonexistent/msg.eml"], "cannot read --data"),
    (["send", "--data", "-", "--subject", "x"], "cannot change --data"),
    (["states", "--load", "no_such_module_anywhere"], "--load"),
    (["states", "--load", "smtpstate:Client"], "not a smtpstate.Machine"),
    (["demo", "--count", "0"], "--count"),
])
def test_usage_errors_exit_2(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("SMTPSTATE_AUTH_USER", raising=False)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, prog, message", [
    (["send", "-s", "host:0", "-t", "a@b"], "smtpstate send", "--server: bad port '0'"),
    (["send", "-t", "a@b", "--bogus"], "smtpstate send", "unrecognized arguments: --bogus"),
    (["states", "--load", "no_such_module_anywhere"], "smtpstate states", "--load"),
    ([], "smtpstate", "required: COMMAND"),
])
def test_usage_error_is_one_line_and_a_hint(argv, prog, message):
    """The error, then where to look; not the whole usage before it."""
    p = run(*argv)
    assert p.returncode == 2
    first, hint = p.stderr.decode().splitlines()
    assert first.startswith(f"{prog}: error: ") and message in first, first
    assert hint == f"Try '{prog} --help' for more information."


def test_data_without_from_header_names_the_option(aiosmtpd_server, tmp_path, capsys):
    eml = tmp_path / "no-from.eml"
    eml.write_bytes(b"To: bob@example.test\nSubject: no sender\n\nhello\n")
    with pytest.raises(SystemExit) as info:
        main(["send", "-s", f"{aiosmtpd_server.host}:{aiosmtpd_server.port}",
              "--data", str(eml)])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "no sender" in err and "give --from" in err and "sender=" not in err, err
    assert aiosmtpd_server.connections == []


@pytest.mark.parametrize("header", ["NoColon", ": no name", "Bad Name: value"])
def test_header_must_be_name_colon_value(aiosmtpd_server, capsys, header):
    """Without a colon the test message used to carry an empty header named
    after the text; now nothing is sent."""
    with pytest.raises(SystemExit) as info:
        main(["send", "-s", f"{aiosmtpd_server.host}:{aiosmtpd_server.port}",
              "-t", "bob@example.test", "--header", header])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.startswith("smtpstate send: error: argument --header/-H: ")
    assert repr(header) in err and "'Name: value'" in err, err
    assert aiosmtpd_server.connections == []


def test_password_needed_without_terminal():
    p = run("send", "-s", "127.0.0.1:9", "-t", "a@b", "--auth-user", "me", "--data", "-",
            env={"SMTPSTATE_AUTH_PASSWORD": ""})
    # An empty variable is no password; stdin is the message: nothing to ask with.
    assert p.returncode == 2 and b"SMTPSTATE_AUTH_PASSWORD" in p.stderr


# -- states ---------------------------------------------------------------------------


def test_states_default(capsys):
    assert main(["states"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["id", "state", "stage"]
    names = [line.split()[1] for line in out[1:]]
    assert names == ["BANNER", "EHLO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "BODY",
                     "RSET", "QUIT"]
    assert "  5  RCPT       4 sending RCPT TO" in "\n".join(out)
    assert "9 reading final confirmation" in out[8]


def test_states_load_file_attr_json(capsys):
    spec = os.path.join(EXAMPLES, "xclient.py") + ":make_machine"
    assert main(["states", "--load", spec, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    x = [r for r in rows if r["name"] == "XCLIENT"][0]
    assert x["position"] == 3 and not x["builtin"]
    assert x["stage_awaiting"] == {"code": 19, "name": "sending XCLIENT"}
    assert x["stage_after"] == {"code": 20, "name": "after XCLIENT"}
    assert main(["states", "--load", os.path.join(EXAMPLES, "proxy_protocol.py") +
                 ":make_machine"]) == 0
    assert " 30 sending PROXY header" in capsys.readouterr().out


def test_states_load_module_registering_into_default(tmp_path):
    (tmp_path / "my_states.py").write_text(
        "from smtpstate import State, Stage, default_machine\n"
        "class Audit(State):\n"
        "    name = 'AUDIT'\n"
        "    stage = Stage.MAIL_DONE\n"
        "default_machine.register(Audit(), after='MAIL')\n")
    p = run("states", "--load", "my_states", env={"PYTHONPATH": os.pathsep.join(
        [str(tmp_path)] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x])})
    out = p.stdout.decode()
    assert p.returncode == 0, p.stderr.decode()
    names = [line.split()[1] for line in out.splitlines()[1:]]
    assert names[4:6] == ["MAIL", "AUDIT"]
    assert "3 after MAIL FROM" in out.splitlines()[6]


# -- demo, the console script ---------------------------------------------------------------


def test_demo_runs_with_progress_bar():
    p = run("demo", "--count", "12")
    out, err = p.stdout.decode(), p.stderr.decode()
    assert p.returncode == 0, out + err
    assert "registered Python state 'timing' after BODY" in out
    assert "transcript of the first message:" in out and "C: MAIL FROM:<demo@client.test>" in out
    assert "[invalid recipient (10)]" in out and "[mailbox full (22)]" in out
    assert "[spam content (52)]" in out
    assert "messages:   9 delivered, 1 partial, 1 permfail, 1 tempfail" in out
    assert "every message ended as planned" in out
    assert "[" + "#" * 30 + "] 12/12 messages" in err


def test_demo_in_process(capsys):
    from smtpstate.demo import run_demo
    assert run_demo(3, progress=False) == 0
    out = capsys.readouterr().out
    assert "3 messages over one connection" in out


def _console_script():
    here = os.path.join(os.path.dirname(sys.executable), "smtpstate")
    if os.path.exists(here):
        return here
    return shutil.which("smtpstate")


def test_console_script():
    script = _console_script()
    if script is None:
        missing("the smtpstate console script is not installed (pip install .)")
    p = subprocess.run([script, "--help"], capture_output=True, timeout=60)
    assert p.returncode == 0
    for command in ("send", "states", "demo", "bench"):
        assert command.encode() in p.stdout
    p = subprocess.run([script, "states"], capture_output=True, timeout=60)
    assert p.returncode == 0 and b"BANNER" in p.stdout


def test_python_m_help():
    p = run("send", "--help")
    assert p.returncode == 0
    assert b"exit codes: 0 delivered" in p.stdout and b"SMTPSTATE_AUTH_PASSWORD" in p.stdout


def test_send_without_server_goes_by_mx(dns_server, dns_origin, mx_servers, capsys):
    """No --server: the recipient's MX records say where (through
    --nameserver), every MX host at --port; the output names the MX."""
    servers = mx_servers(["127.0.0.2"])
    dns_server.add_zone(dns_origin, ["@ MX 10 mx1", "mx1 A 127.0.0.2"])
    rc = main(["send", "-t", f"bob@{dns_origin}", "-f", "me@client.test",
               "--nameserver", dns_server.address, "--port", str(servers.port),
               "--helo", "client.test", "--timeout", "10"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"delivered via mx1.{dns_origin}[127.0.0.2]" in out
    (got,) = servers.server("127.0.0.2").wait_for_messages(1)
    assert got.rcpt_tos == [f"bob@{dns_origin}"]
    # What TLS it used: none offered by this server.
    assert (f"tls: opportunistic with mx1.{dns_origin}[127.0.0.2]: starttls-not-supported "
            "(the server does not offer STARTTLS)") in out


def test_send_says_which_tls_policy_applied(dns_server, dns_origin, mx_servers, tls_ca, capsys):
    from helpers import server_tls
    ctx = server_tls(tls_ca, f"mx1.{dns_origin}")[0]
    servers = mx_servers(["127.0.0.2"], tls={"127.0.0.2": ctx})
    dns_server.add_zone(dns_origin, ["@ MX 10 mx1", "mx1 A 127.0.0.2"])
    argv = ["send", "-t", f"bob@{dns_origin}", "-f", "me@client.test", "--nameserver",
            dns_server.address, "--port", str(servers.port), "--helo", "client.test",
            "--timeout", "10"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"tls: opportunistic with mx1.{dns_origin}[127.0.0.2]: TLSv1." in out
    assert "not verified" in out
    assert main(argv + ["--json"]) == 0
    (tls,) = json.loads(capsys.readouterr().out)["tls"]
    assert tls["level"] == "opportunistic" and tls["result"] == "success"
    assert tls["policy"] == "no-policy-found" and not tls["verified"]


def test_send_to_a_server_says_tls_was_not_used(aiosmtpd_server, capsys):
    rc = main(["send", "-s", f"{aiosmtpd_server.host}:{aiosmtpd_server.port}", "-t",
               "bob@example.test", "-f", "me@client.test", "--timeout", "10"])
    assert rc == 0
    assert "tls: opportunistic: not used" in capsys.readouterr().out


def test_send_lmtp_needs_a_server(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["send", "-t", "a@b.test", "--protocol", "lmtp"])
    assert exc.value.code == 2
    assert "--protocol lmtp needs --server" in capsys.readouterr().err



def test_send_resolver_option_names_the_name_servers(dns_server, dns_origin, mx_servers,
                                                     capsys):
    servers = mx_servers(["127.0.0.2"])
    dns_server.add_zone(dns_origin, ["@ MX 10 mx1", "mx1 A 127.0.0.2"])
    rc = main(["send", "-t", f"bob@{dns_origin}", "-f", "me@client.test",
               "--resolver", dns_server.address, "--no-dnssec", "--dns-timeout", "2",
               "--port", str(servers.port), "--helo", "client.test", "--timeout", "10"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"delivered via mx1.{dns_origin}[127.0.0.2]" in out
    with pytest.raises(SystemExit) as exc:
        main(["send", "-t", f"bob@{dns_origin}", "--resolver", "system",
              "--nameserver", dns_server.address])
    assert exc.value.code == 2
    assert "not both" in capsys.readouterr().err
