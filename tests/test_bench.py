"""The benchmark's own arithmetic and its user-facing runs: a figure is
the median of its rounds (never the best one) with the spread of the
rounds, and the ``deliver()`` run sends, as the README shows it, to a real
smtp-sink every message it counts; benchmarks/c/unique_sink.c answers
SMTP as a server does, with a reply to each message that no other gets
(or, asked to, the same one for all)."""

import os
import signal
import socket
import subprocess

import pytest

import smtpstate
from smtpstate.bench import Figure, make_message, run_deliver


def test_figure_is_the_median_round_with_the_spread():
    f = Figure()
    for wall, cpu in ((2.0, 1.0), (8.0, 4.0), (4.0, 2.0), (1.0, 3.0), (5.0, 5.0)):
        f.add(1000, wall, cpu)
    assert f.rate == 1000 / 4.0                 # the median wall, not the best (1.0)
    assert f.cpu_us == 3.0 / 1000 * 1e6         # the median CPU, not the least (1.0)
    assert f.rate_spread == 1 - 1.0 / 8.0
    assert f.cpu_spread == 1 - 1.0 / 5.0


def test_figure_of_an_even_count_of_rounds_takes_the_middle_two():
    f = Figure()
    for wall in (1.0, 2.0, 3.0, 10.0):
        f.add(100, wall, wall)
    assert f.rate == 100 / 2.5


def test_run_deliver_sends_every_message_it_counts(smtp_sink_server):
    for build in (False, True):
        wall, cpu = run_deliver(smtp_sink_server.port, 30, 3, make_message(), build=build)
        assert wall > 0 and cpu > 0
    assert len(smtp_sink_server.wait_for_messages(60, timeout=60)) == 60


# -- benchmarks/c/unique_sink.c: a sink whose reply to every message differs --

def _unique_sink(tmp_path):
    """benchmarks/c/unique_sink.c built as the C unit tests are (strict
    warnings, ASan and UBSan): the path of the program."""
    from test_c_units import CFLAGS, ROOT, _compiler

    exe = str(tmp_path / "unique_sink")
    build = subprocess.run([_compiler(), *CFLAGS, "-o", exe,
                            os.path.join(ROOT, "benchmarks", "c", "unique_sink.c")],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert build.returncode == 0, build.stdout.decode(errors="replace")
    return exe


def _run_sink(exe, *args):
    env = dict(os.environ)
    env.setdefault("ASAN_OPTIONS", "abort_on_error=0:detect_leaks=1")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    proc = subprocess.Popen([exe, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    return proc, int(proc.stdout.readline())


def _stop_sink(proc):
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode(errors="replace")
    return out.decode()


@pytest.mark.parametrize("same", [False, True], ids=["unique", "same"])
def test_unique_sink_replies(tmp_path, same):
    exe = _unique_sink(tmp_path)
    proc, port = _run_sink(exe, *(["same"] if same else []))
    try:
        data = make_message()
        # Ends of data the sink must find wherever they fall: an empty
        # body, leading dots (stuffed by the client), lines long enough
        # that the end of data comes in another read than the text.
        odd = [b"", b".\r\n..x\r\n.", (b"y" * 900 + b"\r\n.") * 60]
        messages = ([smtpstate.Message("a@client.test", ["b@sink.test"], data)
                     for _ in range(500)]
                    + [smtpstate.Message("a@client.test", ["b@sink.test"], body) for body in odd])
        results = smtpstate.deliver(messages, "127.0.0.1", port, concurrency=7)
    finally:
        said = _stop_sink(proc)
    assert [r.status for r in results] == ["delivered"] * len(messages)
    replies = [str(r.reply) for r in results]
    assert all(t.startswith("250 2.0.0 Ok: queued as ") for t in replies), replies[:3]
    assert len(set(replies)) == (1 if same else len(messages))
    assert said.split() == ["messages", str(len(messages))]


def test_unique_sink_answers_a_pipelined_dialogue_byte_by_byte(tmp_path):
    exe = _unique_sink(tmp_path)
    proc, port = _run_sink(exe)
    dialogue = (b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@s.test>\r\nDATA\r\n"
                b"x\r\n..\r\n.\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@s.test>\r\nDATA\r\n"
                b".\r\nRSET\r\nNOOP\r\nWHAT\r\nQUIT\r\n")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            for i in range(len(dialogue)):          # one byte per send: every split
                s.sendall(dialogue[i:i + 1])
            got = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
    finally:
        said = _stop_sink(proc)
    codes = [line[:4] for line in got.split(b"\r\n") if line]
    assert codes == [b"220 ", b"250-", b"250-", b"250-", b"250 ", b"250 ", b"250 ", b"354 ",
                     b"250 ", b"250 ", b"250 ", b"354 ", b"250 ", b"250 ", b"250 ", b"502 ",
                     b"221 "]
    assert b"queued as 0000000001\r\n" in got and b"queued as 0000000002\r\n" in got
    assert said.split() == ["messages", "2"]
