"""Every example runs, as a user would run it (``python examples/X.py``,
its own aiosmtpd, or a real Postfix with ``--server``), and says what it
should; the docs' generated tables match the code."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from helpers import missing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def run_example(path: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, os.path.join(EXAMPLES, path), *args],
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return p


def ok(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p.stdout


def test_every_example_is_listed_and_tested():
    here = open(__file__, encoding="utf-8").read()
    listed = open(os.path.join(EXAMPLES, "README.md"), encoding="utf-8").read()
    for path in glob.glob(os.path.join(EXAMPLES, "**", "*.py"), recursive=True):
        name = os.path.relpath(path, EXAMPLES)
        if os.path.basename(name).startswith("_"):
            continue
        assert f'"{name}"' in here, f"{name} is not run by tests/test_examples.py"
        assert os.path.basename(name) in listed or os.path.dirname(name) in listed, name


def test_send_email_message():
    out = ok(run_example("send_email_message.py"))
    assert "result: delivered 250" in out
    assert "RCPT TO bob@example.test, zoë@example.test, carol@example.test, " \
           "audit@example.test" in out
    assert "Bcc header sent: False" in out


def test_send_email_message_to_postfix(postfix_server):
    p = run_example("send_email_message.py", "--server",
                    f"{postfix_server.host}:{postfix_server.port}")
    # Postfix here offers SMTPUTF8 and takes the UTF-8 address.
    out = ok(p)
    assert "result: delivered" in out
    got = postfix_server.wait_for_messages(1)
    assert "audit@example.test" in got[0].rcpt_tos and b"Bcc" not in got[0].data


def test_relay():
    out = ok(run_example("relay.py"))
    lines = out.splitlines()
    assert lines[0] == "some delivered: relay answered 250 2.0.0 Ok: delivered to 1 of 3 recipients"
    assert lines[1].startswith("none for good: relay answered 550 5.1.1 <unknown")
    assert lines[2] == ("DSN: unknown@example.test failed 5.1.1, later@example.test failed "
                        "4.2.0 (to alice@client.example)")
    # aio.Engine's words for a refused connection ("connect to HOST[IP]:PORT:
    # Connection refused"), aio.Client's ("cannot connect to ...").
    assert lines[3].startswith("next hop down: relay answered 451 4.4.1 ")
    assert "connect to 127.0.0.1" in lines[3]


def test_relay_to_smtp_sink(smtp_sink_server):
    out = ok(run_example("relay.py", "--server",
                         f"{smtp_sink_server.host}:{smtp_sink_server.port}"))
    assert out.startswith("some delivered: relay answered 250 2.0.0 Ok: delivered\n")
    got = smtp_sink_server.wait_for_messages(2)
    assert [m.rcpt_tos for m in got] == [
        ["ok@example.test", "unknown@example.test", "later@example.test"],
        ["unknown1@example.test", "unknown2@example.test"]]


def test_proxy_protocol():
    out = ok(run_example("proxy_protocol.py"))
    assert out.startswith("state order: PROXY -> BANNER -> EHLO")
    assert "the server was told the client is 203.0.113.7 port 40000" in out


def test_xclient_without_support_passes_through():
    out = ok(run_example("xclient.py"))
    assert "result: delivered" in out and "XCLIENT sent: no (not offered)" in out


def test_xclient_with_postfix(postfix_factory):
    server = postfix_factory(main_cf={"smtpd_authorized_xclient_hosts": "127.0.0.0/8"})
    server.clear()
    out = ok(run_example("xclient.py", "--server", f"{server.host}:{server.port}",
                         "--addr", "198.51.100.23", "--name", "relay.example"))
    assert "XCLIENT sent: yes, accepted: 220 " in out and "result: delivered" in out
    [got] = server.wait_for_messages(1)
    # Postfix believed us: the Received header names the client we claimed.
    assert "(relay.example [198.51.100.23])" in got.extra["received"]


def test_xclient_with_smtp_sink(smtp_sink_server):
    """smtp-sink offers XCLIENT (NAME HELO) and takes it with a 250, no new
    greeting, as Postfix before 2.3 did: the session goes on, and the
    example says it was sent and accepted."""
    out = ok(run_example("xclient.py", "--server",
                         f"{smtp_sink_server.host}:{smtp_sink_server.port}"))
    assert "result: delivered" in out
    assert "XCLIENT sent: yes, accepted: 250 2.0.0 Ok" in out
    [got] = smtp_sink_server.wait_for_messages(1)
    assert got.rcpt_tos == ["bob@example.test"] and b"Subject: via XCLIENT" in got.data


def test_xclient_not_sent_says_why(smtp_sink_factory):
    """smtp-sink -C offers no XCLIENT: it is not sent, and not claimed."""
    server = smtp_sink_factory(options=["-C"])
    out = ok(run_example("xclient.py", "--server", f"{server.host}:{server.port}"))
    assert "result: delivered" in out and "XCLIENT sent: no (not offered)" in out


def test_xclient_refused_reports_its_stage(postfix_factory):
    # XCLIENT offered to nobody: Postfix does not list it, the state passes
    # through. Offered but refused is checked with a state forced to send.
    sys.path.insert(0, EXAMPLES)
    try:
        import xclient
    finally:
        sys.path.remove(EXAMPLES)
    server = postfix_factory(main_cf={"smtpd_authorized_xclient_hosts": "127.0.0.0/8"})
    state = xclient.XClient(addr="not an address")
    result = xclient.send(server.host, server.port, state)
    assert result.status in ("tempfail", "permfail")
    assert (result.stage_code, result.stage) == (19, "sending XCLIENT"), result
    assert result.state == "XCLIENT" and "refused XCLIENT" in result.reason


def test_verify_addresses():
    out = ok(run_example("verify_addresses.py", "bob@example.test", "unknown3@example.test"))
    assert "bob@example.test: accepted 250" in out
    assert "unknown3@example.test: permfail 550 5.1.1" in out
    assert "[invalid recipient (10)]" in out
    assert "messages the server received: 0" in out


def test_verify_addresses_with_postfix(postfix_server):
    out = ok(run_example("verify_addresses.py", "--server",
                         f"{postfix_server.host}:{postfix_server.port}",
                         "anyone@example.test", "unknown9@example.test", "x@elsewhere.test"))
    assert "anyone@example.test: accepted" in out
    assert "unknown9@example.test: permfail 550 5.1.1" in out
    assert "x@elsewhere.test: permfail 554 5.7.1" in out and "[relaying denied (54)]" in out
    postfix_server.wait_idle()
    assert postfix_server.messages() == []


def test_metrics_state():
    out = ok(run_example("metrics_state.py", "--count", "60"))
    assert "results: {'delivered': 54, 'permfail': 6}" in out
    assert "bounce classes: {'invalid recipient (10)': 6}" in out
    assert "accepted transactions seen by the state: 54" in out


def test_metrics_state_with_smtp_sink(smtp_sink_server):
    out = ok(run_example("metrics_state.py", "--server",
                         f"{smtp_sink_server.host}:{smtp_sink_server.port}", "--count", "200"))
    assert "results: {'delivered': 200}" in out
    assert "accepted transactions seen by the state: 200" in out


def test_c_state():
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        missing("no C compiler to build the example C state")
    p = run_example(os.path.join("c_state", "count_state.py"))
    out = ok(p)
    assert "-shared -fPIC" in p.stderr                       # it built its library
    assert "state order: BANNER -> EHLO -> STARTTLS -> AUTH -> MAIL -> RCPT -> DATA -> " \
           "BODY -> count -> RSET -> QUIT" in out
    assert "delivered 5 of 5; the C state counted 5 messages, 10 recipients" in out


def test_c_state_listed_with_its_own_stage():
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        missing("no C compiler to build the example C state")
    p = subprocess.run([sys.executable, "-m", "smtpstate", "states", "--load",
                        os.path.join(EXAMPLES, "c_state", "count_state.py") + ":make_machine"],
                       capture_output=True, text=True, timeout=120,
                       cwd=tempfile.gettempdir())        # -m: not the source tree's package
    out = ok(p)
    assert " count     30 counting                    30 counting  (custom)" in out


def test_celery_app(rabbitmq, queue_name):
    try:
        import celery  # noqa: F401
    except ImportError:
        missing("Celery is not installed (pip install '.[test]')")
    from celery_worker_app import CeleryWorker
    env = {"SMTPSTATE_BROKER": rabbitmq.url, "SMTPSTATE_CELERY_QUEUE": queue_name}
    worker = CeleryWorker("celery_app", EXAMPLES, env).wait_ready()
    try:
        p = subprocess.run([sys.executable, os.path.join(EXAMPLES, "celery_app.py"),
                            "--count", "6"], capture_output=True, text=True, timeout=120,
                           cwd=ROOT, env=dict(os.environ, **env))
    finally:
        code = worker.stop()
    out = ok(p)
    assert out.startswith("sent 6 messages as task ")
    assert "partial: bob@example.test delivered 250, unknown0@example.test permfail 550" in out
    assert out.endswith("results: {'delivered': 4, 'partial': 2}\n")
    assert code == 0, worker.log()[-3000:]


# The names test_every_example_is_listed_and_tested looks for:
RUN = ["send_email_message.py", "proxy_protocol.py", "xclient.py", "verify_addresses.py",
       "metrics_state.py", "c_state/count_state.py", "celery_app.py"]


def test_docs_are_generated_from_the_code():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "generate.py"), "--check"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr + "\nrun: python docs/generate.py"


@pytest.mark.parametrize("doc", sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
                         + [os.path.join(ROOT, "README.md"), os.path.join(EXAMPLES, "README.md")],
                         ids=os.path.basename)
def test_doc_links_resolve(doc):
    import re
    text = open(doc, encoding="utf-8").read()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        path = os.path.normpath(os.path.join(os.path.dirname(doc), target))
        assert os.path.exists(path), f"{os.path.relpath(doc, ROOT)} links to missing {target}"
