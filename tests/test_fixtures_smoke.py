"""The real-server fixtures work: each server, driven by Python's smtplib,
takes a message with leading dots and 8-bit bytes and gives back exactly
the bytes that were sent (before dot-stuffing, which smtplib does). And a
missing prerequisite is never skipped in CI: every skip goes through
helpers.missing(), which fails there, and .ci/run says it is CI."""

from __future__ import annotations

import glob
import os
import re
import smtplib
import ssl
import subprocess
import sys

import pytest

import helpers

# Leading dots (one of them a line that is only "."), 8-bit UTF-8 and a raw
# 0xff byte, an empty line, and a last line without its CRLF.
BODY = (
    b"From: Sender <sender@client.test>\r\n"
    b"To: rcpt@example.test\r\n"
    b"Subject: smoke\r\n"
    b"\r\n"
    b".leading dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"caf\xc3\xa9 \xe2\x82\xac \xff\r\n"
    b"\r\n"
    b"last line without CRLF"
)
# What the server must have: the last line completed, nothing else changed.
EXPECTED = BODY + b"\r\n"


def _send(host, port, rcpts, body=BODY, mail_options=(), starttls_ca=None):
    with smtplib.SMTP(host, port, local_hostname="client.test", timeout=30) as s:
        s.ehlo()
        if starttls_ca is not None:
            ctx = ssl.create_default_context()
            starttls_ca.configure_trust(ctx)
            s.starttls(context=ctx)
            s.ehlo()
        refused = s.sendmail("sender@client.test", rcpts, body, mail_options=list(mail_options))
    assert refused == {}


def test_aiosmtpd_server(aiosmtpd_server):
    _send(aiosmtpd_server.host, aiosmtpd_server.port, ["rcpt@example.test"], mail_options=["BODY=8BITMIME"])
    (msg,) = aiosmtpd_server.wait_for_messages(1)
    assert msg.data == EXPECTED
    assert msg.mail_from == "sender@client.test"
    assert msg.rcpt_tos == ["rcpt@example.test"]
    assert "BODY=8BITMIME" in msg.mail_options
    assert msg.helo == "client.test"
    assert msg.peer[0] == "127.0.0.1"
    # The wire carried the dot-stuffed form.
    (conn,) = aiosmtpd_server.connections
    assert b"\r\n..leading dot\r\n...two dots\r\n..\r\n" in conn.received
    assert conn.received.endswith(b"QUIT\r\n")


def test_aiosmtpd_factory_kwargs(aiosmtpd_factory):
    server = aiosmtpd_factory(enable_SMTPUTF8=False, server_hostname="custom.test")
    caps = helpers.ehlo_keywords(server.host, server.port)
    assert "SMTPUTF8" not in caps
    with smtplib.SMTP(server.host, server.port, timeout=30) as s:
        code, banner = s.ehlo()
    assert code == 250 and banner.startswith(b"custom.test")


def test_postfix_server(postfix_server):
    caps = helpers.ehlo_keywords(postfix_server.host, postfix_server.port)
    for keyword in ("PIPELINING", "CHUNKING", "SMTPUTF8", "DSN", "8BITMIME", "SIZE", "ENHANCEDSTATUSCODES"):
        assert keyword in caps, caps
    rcpts = ["rcpt@example.test", "second@example.test"]
    _send(postfix_server.host, postfix_server.port, rcpts, mail_options=["BODY=8BITMIME"])
    (msg,) = postfix_server.wait_for_messages(1)
    assert msg.data == EXPECTED
    assert msg.mail_from == "sender@client.test"
    assert sorted(msg.rcpt_tos) == sorted(rcpts)
    assert msg.helo == "client.test"


def test_postfix_server_isolated_and_smtputf8(postfix_server):
    # Nothing from the previous test is left over.
    assert postfix_server.messages() == []
    body = "Subject: caf\u00e9\r\n\r\nbonjour \u00e0 vous\r\n".encode()
    _send(postfix_server.host, postfix_server.port, ["us\u00e9r@example.test"], body=body,
          mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    (msg,) = postfix_server.wait_for_messages(1)
    assert msg.data == body
    assert msg.rcpt_tos == ["us\u00e9r@example.test"]


def test_postfix_server_refusals(postfix_server):
    with smtplib.SMTP(postfix_server.host, postfix_server.port, timeout=30) as s:
        s.ehlo("client.test")
        assert s.mail("sender@client.test")[0] == 250
        code, text = s.rcpt("unknown@example.test")
        assert (code, text[:5]) == (550, b"5.1.1")
        code, text = s.rcpt("someone@elsewhere.test")
        assert (code, text[:5]) == (554, b"5.7.1")
        s.rset()


def test_postfix_bdat(postfix_server):
    # CHUNKING is really there: two BDAT chunks, the last one LAST.
    with smtplib.SMTP(postfix_server.host, postfix_server.port, timeout=30) as s:
        s.ehlo("client.test")
        assert s.mail("sender@client.test")[0] == 250
        assert s.rcpt("bdat@example.test")[0] == 250
        first, last = EXPECTED[:40], EXPECTED[40:]
        s.send(b"BDAT %d\r\n" % len(first) + first)
        assert s.getreply()[0] == 250
        s.send(b"BDAT %d LAST\r\n" % len(last) + last)
        assert s.getreply()[0] == 250
    (msg,) = postfix_server.wait_for_messages(1)
    assert msg.data == EXPECTED


def test_postfix_starttls(postfix_factory, tls_ca):
    server = postfix_factory(tls=tls_ca)
    assert "STARTTLS" in server.capabilities
    _send(server.host, server.port, ["tls@example.test"], starttls_ca=tls_ca)
    (msg,) = server.wait_for_messages(1)
    assert msg.data == EXPECTED
    assert "ESMTPS" in msg.extra["received"]


def test_smtp_sink_server(smtp_sink_server):
    rcpts = ["a@example.test", "b@example.test"]
    _send(smtp_sink_server.host, smtp_sink_server.port, rcpts, mail_options=["BODY=8BITMIME"])
    (msg,) = smtp_sink_server.wait_for_messages(1)
    assert msg.data == EXPECTED
    assert msg.mail_from == "sender@client.test"
    assert msg.rcpt_tos == rcpts
    assert msg.mail_options == ["BODY=8BITMIME"]
    assert msg.helo == "client.test"
    assert msg.peer == "127.0.0.1"


@pytest.mark.parametrize("n", [3])
def test_smtp_sink_many(smtp_sink_server, n):
    for i in range(n):
        _send(smtp_sink_server.host, smtp_sink_server.port, ["r%d@example.test" % i])
    msgs = smtp_sink_server.wait_for_messages(n)
    assert sorted(m.rcpt_tos[0] for m in msgs) == ["r%d@example.test" % i for i in range(n)]
    assert all(m.data == EXPECTED for m in msgs)


# ---------------------------------------------------------------------------
# Missing prerequisites: skipped on a developer machine, failed in CI
# ---------------------------------------------------------------------------

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

# Ways to skip that would bypass helpers.missing() and pass unseen in CI.
_DIRECT_SKIP = re.compile(r"pytest\s*\.\s*(skip\s*\(|importorskip\b|mark\s*\.\s*skip)")


def test_no_test_skips_around_missing():
    offenders = []
    for path in sorted(glob.glob(os.path.join(TESTS, "**", "*.py"), recursive=True)):
        if os.path.basename(path) == "helpers.py":          # the one place that may
            continue
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if _DIRECT_SKIP.search(line):
                    offenders.append(f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()}")
    assert offenders == [], "use helpers.missing/requires/import_or_missing:\n" + \
        "\n".join(offenders)


def test_ci_script_sets_ci_before_the_tests():
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    exported = lines.index("export CI=true")
    first_pytest = next(i for i, line in enumerate(lines) if "-m pytest" in line)
    assert exported < first_pytest


_PREREQUISITES = '''
import helpers
import pytest

helpers.import_or_missing("no_such_module_smtpstate_test")


def test_never_collected():
    pass
'''

_MARKED = '''
import helpers


@helpers.requires(False, "the prerequisite is absent")
def test_marked():
    pass


@helpers.requires(True, "present")
def test_runs():
    pass


def test_missing_inside():
    helpers.missing("absent inside the test")
'''


@pytest.mark.parametrize("ci", ["true", ""], ids=["CI", "developer"])
def test_missing_prerequisites_fail_only_in_ci(tmp_path, ci):
    """The three helpers, through the suite's own conftest.py hooks, in a
    pytest of its own: every absent prerequisite fails the run in CI and is
    skipped elsewhere; a present one runs."""
    (tmp_path / "test_module_level.py").write_text(_PREREQUISITES)
    (tmp_path / "test_marked.py").write_text(_MARKED)
    env = {**os.environ, "CI": ci, "PYTHONPATH": TESTS}
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p",
                        "no:cacheprovider", "-rA", "--continue-on-collection-errors",
                        "--rootdir", str(tmp_path), str(tmp_path)],
                       capture_output=True, text=True, timeout=120, cwd=str(tmp_path), env=env)
    out = p.stdout + p.stderr
    if ci:
        assert p.returncode != 0, out
        assert "PASSED test_marked.py::test_runs" in out
        assert "FAILED test_marked.py::test_missing_inside" in out
        assert "ERROR test_marked.py::test_marked" in out          # in its setup
        assert "ERROR test_module_level.py" in out                  # at collection
        assert out.count("CI must provide it") >= 3, out
    else:
        assert p.returncode == 0, out
        assert "1 passed, 3 skipped" in out, out
