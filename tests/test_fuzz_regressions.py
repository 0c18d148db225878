"""Replay the fuzzers' corpus and every input they ever broke, under ASan
and UBSan, and pin down each bug they found as an ordinary test.

The fuzz targets (``fuzz/fuzz_*.c``) are compiled with the C compiler
the C unit tests use (``cc``, so no clang is needed here) together with
``fuzz/standalone.c`` instead of libFuzzer, and run over
``fuzz/corpus/<target>/`` and ``fuzz/regressions/<target>/``: a broken
invariant (``FUZZ_CHECK``), a sanitizer report or a leak fails the test.
``fuzz/run.sh`` is where new inputs are found; a finding is copied into
``fuzz/regressions/<target>/`` under a name that says what it was, and
gets a scripted test below when it was a bug of the client.

These tests use the source tree, like ``test_c_units.py``.
"""

from __future__ import annotations

import glob
import os
import subprocess

import pytest

from scripted import ScriptedSession, crlf_lines
from test_c_units import CFLAGS, LIBS, ROOT, _compiler, _sources

TARGETS = sorted(os.path.basename(p)[len("fuzz_"):-2]
                 for p in glob.glob(os.path.join(ROOT, "fuzz", "fuzz_*.c")))


def _inputs(target):
    dirs = [os.path.join("fuzz", "corpus", target), os.path.join("fuzz", "regressions", target)]
    return [d for d in dirs if os.path.isdir(os.path.join(ROOT, d)) and os.listdir(os.path.join(ROOT, d))]


def test_every_target_has_a_corpus():
    assert set(TARGETS) >= {"reply", "caps", "body", "session"}
    for t in TARGETS:
        assert glob.glob(os.path.join(ROOT, "fuzz", "corpus", t, "seed-*")), t


def _cc(args, cwd=ROOT):
    cmd = [_compiler(), *CFLAGS, "-Ifuzz", *args]
    build = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if build.returncode != 0:
        pytest.fail("compile failed: %s\n%s" % (" ".join(cmd), build.stdout.decode(errors="replace")),
                    pytrace=False)


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    """csrc/*.c and the standalone driver, compiled once for every target."""
    d = tmp_path_factory.mktemp("fuzz-objects")
    objs = []
    for src in [*_sources(), os.path.join("fuzz", "standalone.c")]:
        obj = str(d / (os.path.basename(src)[:-2] + ".o"))
        _cc(["-c", src, "-o", obj])
        objs.append(obj)
    return objs


@pytest.mark.parametrize("target", TARGETS)
def test_replay(target, tmp_path, objects):
    exe = str(tmp_path / ("fuzz_" + target))
    _cc(["-o", exe, os.path.join("fuzz", "fuzz_%s.c" % target), *objects, *LIBS, "-lpthread"])
    env = dict(os.environ)
    env.setdefault("ASAN_OPTIONS", "abort_on_error=0:detect_leaks=1")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    run = subprocess.run([exe, *_inputs(target)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, timeout=600)
    out = run.stdout.decode(errors="replace")
    if run.returncode != 0:
        pytest.fail("fuzz_%s broke on a saved input (the last RUN line; replay it with "
                    "FUZZ_TRACE=1 for fuzz_session):\n%s" % (target, out[-6000:]), pytrace=False)
    assert "replayed" in out.splitlines()[-1]


# -- the bugs, one scripted test each ------------------------------------

PIPELINING = b"250-mx.example\r\n250 PIPELINING\r\n"


def _pipelined(split):
    s = ScriptedSession(split=split)
    s.start()
    s.feed(b"220 mx.example ESMTP\r\n")
    assert s.sent() == b"EHLO client.example\r\n"
    s.feed(PIPELINING)
    s.submit(recipients=["a@server.example", "b@server.example"])
    assert s.sent() == crlf_lines("MAIL FROM:<sender@client.example>",
                                  "RCPT TO:<a@server.example>",
                                  "RCPT TO:<b@server.example>", "DATA")
    return s


@pytest.mark.parametrize("split", ["whole", "bytewise"])
@pytest.mark.parametrize("middle", [b"334 VXNlcm5hbWU6\r\n", b"354 go ahead\r\n"])
def test_drain_never_answers_a_continuation_with_commands_behind_it(split, middle):
    """fuzz/regressions/session/drain-334-*: MAIL is refused, so the
    replies to the pipelined RCPTs and DATA are drained. The server answers
    the first RCPT with 334 (or 354) and then DATA with 354. The client
    used to answer the 334 with "*" (the 354 with a lone dot): the server,
    which had already read the second RCPT and DATA as its SASL line or as
    message data, took the "*" into the data (or ended a message made of
    our own commands with our dot). Now such a reply ends the connection,
    with nothing more written."""
    s = _pipelined(split)
    s.feed(b"550 5.7.1 sender refused\r\n")
    assert s.sent() == b""
    s.feed(middle)
    assert s.sent() == b""
    assert s.status == "CLOSING"
    assert "while more commands were on the wire" in s.reason
    r = s.result()
    assert (r["status"], r["code"]) == ("permfail", 550)
    s.feed(b"250 ok\r\n354 go ahead\r\n")
    assert s.sent() == b""
    s.finish()


@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_drain_still_answers_a_354_to_the_last_command(split):
    """The rule above does not touch the usual case: a 354 to DATA, the
    last command of the batch, gets its lone dot."""
    s = _pipelined(split)
    s.feed(b"550 5.7.1 sender refused\r\n503 no\r\n503 no\r\n")
    assert s.sent() == b""
    s.feed(b"354 go ahead\r\n")
    assert s.sent() == b".\r\n"
    s.feed(b"503 no\r\n")
    assert s.status == "IDLE"
    assert s.result()["status"] == "permfail"
    s.finish()


def test_output_before_anything_is_queued():
    """fuzz_session (clang's UBSan): smtps_session_output() computed
    NULL + 0 when nothing had ever been queued. It now hands out an empty
    string."""
    from smtpstate._core import ffi, lib
    s = ScriptedSession()
    s.start()                                # BANNER: nothing to send
    out = ffi.new("const char **")
    assert lib.smtps_session_output(s.ptr, out) == 0
    assert out[0] != ffi.NULL
    s.finish()

