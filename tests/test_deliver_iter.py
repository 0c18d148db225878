"""smtpstate.deliver_iter(): a stream of messages delivered in bounded
memory, against Postfix's smtp-sink on loopback.

What is checked: every message taken from the input gets exactly one
Result, which carries its ticket and message; the input is never read more
than ``window`` messages ahead of the Results handed out (the generator is
instrumented: taken minus yielded); stopping early withdraws what is out
and ends every connection with QUIT, leaves no socket open and warns of
nothing; an input that raises midway has the messages it gave finished
first; bad arguments are refused before the input is read; and, in a
fresh process, 200,000 messages raise the peak RSS no higher than 20,000
do, far below what keeping their Results would cost.
"""

from __future__ import annotations

import gc
import json
import re
import subprocess
import sys
import warnings
from typing import Iterator, List

import pytest

import smtpstate
import helpers
from helpers import wait_until
from smtpstate import Message
from smtpstate.errors import InvalidOptionError

SENDER = "sender@client.test"
RCPT = "rcpt@example.test"
SUBJECT = re.compile(rb"Subject: stream (\d+)\r\n")


def _message(i: int) -> Message:
    return Message(SENDER, [RCPT], b"Subject: stream %d\r\n\r\nmessage %d\r\n" % (i, i))


def _index(message: Message) -> int:
    m = SUBJECT.match(message.data)
    assert m is not None, message.data
    return int(m.group(1))


class Input:
    """A generator of messages that counts what was taken from it and,
    told each Result the consumer received, the most it was ever read
    ahead of them (taken minus yielded, at each take)."""

    def __init__(self, n: int, fail_after: int = -1, bad_after: int = -1) -> None:
        self.n, self.fail_after, self.bad_after = n, fail_after, bad_after
        self.taken = self.yielded = self.ahead = 0
        self.closed = False

    def __iter__(self) -> Iterator[Message]:
        try:
            for i in range(self.n):
                if i == self.fail_after:
                    raise RuntimeError("the input broke at message %d" % i)
                item = "not a message" if i == self.bad_after else _message(i)
                self.taken += 1
                self.ahead = max(self.ahead, self.taken - self.yielded)
                yield item                               # type: ignore[misc]
        finally:
            self.closed = True


def _established(port: int) -> int:
    """TCP connections of this machine to 127.0.0.1:port that are
    established (/proc/net/tcp: remote address, state 01)."""
    want = "0100007F:%04X" % port
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return sum(1 for r in rows if r[2] == want and r[3] == "01")


def test_every_message_once_never_more_than_window_ahead(smtp_sink_server):
    source = Input(300)
    results: List[smtpstate.Result] = []
    for result in smtpstate.deliver_iter(iter(source), smtp_sink_server.host,
                                         smtp_sink_server.port, concurrency=3, window=12,
                                         timeout=30):
        source.yielded += 1
        results.append(result)
    assert source.taken == 300 and len(results) == 300
    assert sorted(_index(r.message) for r in results) == list(range(300))
    assert len({r.ticket.id for r in results}) == 300
    for r in results:
        assert r.status == "delivered", r
        assert r.ticket.message is r.message
        assert r.ticket.result is r and r.ticket.done
    # The window was filled (12 out before the first Result) and never passed.
    assert source.ahead == 12
    assert source.closed
    got = smtp_sink_server.wait_for_messages(300, timeout=30)
    assert sorted(int(SUBJECT.match(m.data).group(1)) for m in got) == list(range(300))


def test_default_window_is_four_per_connection(smtp_sink_server):
    source = Input(60)
    count = 0
    for result in smtpstate.deliver_iter(iter(source), smtp_sink_server.host,
                                         smtp_sink_server.port, concurrency=2):
        source.yielded += 1
        count += 1
        assert result.status == "delivered", result
    assert count == 60
    assert source.ahead == 8


def test_a_finished_message_is_freed_when_the_caller_drops_it(smtp_sink_server):
    """No reference cycle: a Result the caller lets go is gone at once,
    with its message, without the cyclic collector."""
    import weakref

    gc.disable()
    try:
        refs = []
        for result in smtpstate.deliver_iter((_message(i) for i in range(50)),
                                             smtp_sink_server.host, smtp_sink_server.port,
                                             concurrency=2, window=4):
            refs.append((weakref.ref(result), weakref.ref(result.message)))
        del result
        assert len(refs) == 50
        assert [ref for pair in refs for ref in pair if ref() is not None] == []
    finally:
        gc.enable()


def test_breaking_early_withdraws_what_is_out_and_quits(smtp_sink_factory):
    sink = smtp_sink_factory(options=["-v"])          # -v: it logs every command read
    source = Input(10_000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stream = smtpstate.deliver_iter(iter(source), sink.host, sink.port,
                                        concurrency=4, window=16)
        for result in stream:
            source.yielded += 1
            assert result.status == "delivered", result
            if source.yielded == 10:
                break
        taken = source.taken
        stream.close()
        del stream, result
        gc.collect()
    assert [str(w.message) for w in caught] == []        # no ResourceWarning, nothing
    assert source.ahead <= 16 and taken <= 10 + 16
    assert source.taken == taken                          # nothing read after the break
    assert source.closed                                  # the input was let go
    assert _established(sink.port) == 0

    def quits():
        commands = sink.commands()
        ehlo = sum(c.startswith("EHLO") for c in commands)
        quit = commands.count("QUIT")
        return (ehlo, quit) if ehlo and quit == ehlo else None
    ehlo, quit = wait_until(quits, 10.0, what="a QUIT on every connection")
    assert 1 <= ehlo <= 4


def test_input_raising_midway_finishes_what_it_gave_then_raises(smtp_sink_server):
    source = Input(100, fail_after=30)
    results = []
    stream = smtpstate.deliver_iter(iter(source), smtp_sink_server.host,
                                    smtp_sink_server.port, concurrency=3, window=10)
    with pytest.raises(RuntimeError, match="the input broke at message 30"):
        for result in stream:
            source.yielded += 1
            results.append(result)
    assert source.taken == 30
    assert sorted(_index(r.message) for r in results) == list(range(30))
    assert all(r.status == "delivered" for r in results)
    assert source.ahead <= 10
    smtp_sink_server.wait_for_messages(30, timeout=30)


def test_an_item_that_is_not_a_message(smtp_sink_server):
    source = Input(20, bad_after=5)
    results = []
    with pytest.raises(TypeError, match="takes smtpstate.Message items, not str"):
        for result in smtpstate.deliver_iter(iter(source), smtp_sink_server.host,
                                             smtp_sink_server.port, window=4):
            results.append(result)
    assert sorted(_index(r.message) for r in results) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("kwargs, error", [
    ({"window": 0}, InvalidOptionError),
    ({"window": 2.5}, InvalidOptionError),
    ({"concurrency": 0}, InvalidOptionError),
    ({"port": 0}, InvalidOptionError),
    ({"tls": "sometimes"}, InvalidOptionError),
    ({"no_such_option": 1}, TypeError),
])
def test_bad_arguments_are_refused_before_the_input_is_read(kwargs, error):
    source = Input(5)
    args = {"port": 2525, **kwargs}
    with pytest.raises(error):
        smtpstate.deliver_iter(iter(source), "127.0.0.1", **args)
    assert source.taken == 0


def test_empty_input(smtp_sink_server):
    assert list(smtpstate.deliver_iter([], smtp_sink_server.host, smtp_sink_server.port)) == []
    assert list(smtpstate.deliver_iter(iter(()), smtp_sink_server.host,
                                       smtp_sink_server.port)) == []


# Run in a fresh process, so that nothing this test process did counts in
# its peak. Two streams, one after the other: 20,000 messages, then
# 200,000; the peak RSS (VmHWM) above the start is read after each. The
# messages differ (their number is in the subject), as a real stream's do.
_MEMORY_SCRIPT = r"""
import json, sys
import smtpstate

port, window, counts = int(sys.argv[1]), int(sys.argv[2]), [int(n) for n in sys.argv[3:]]

def peak_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise SystemExit("no VmHWM in /proc/self/status")

def messages(n):
    for i in range(n):
        yield smtpstate.Message("sender@client.test", ["rcpt@example.test"],
                                b"Subject: stream %d\r\n\r\nmessage %d\r\n" % (i, i))

start = peak_kib()
runs, kept_bytes, message_bytes = [], 0, 0
for n in counts:
    delivered = 0
    for r in smtpstate.deliver_iter(messages(n), "127.0.0.1", port, window=window,
                                    concurrency=10, timeout=60):
        if r.status != "delivered":
            raise SystemExit("not delivered: %r" % (r,))
        delivered += 1
        if delivered == 1:
            # What keeping one message's Result would cost at least: the
            # Result, its dict, its ticket, its message and its bytes.
            kept_bytes = (sys.getsizeof(r) + sys.getsizeof(r.__dict__)
                          + sys.getsizeof(r.ticket) + sys.getsizeof(r.message)
                          + sys.getsizeof(r.message.data))
            message_bytes = len(r.message.data)
    runs.append({"messages": delivered, "growth_kib": peak_kib() - start})
print(json.dumps({"runs": runs, "kept_bytes": kept_bytes, "message_bytes": message_bytes}))
"""


def test_200000_messages_in_bounded_memory():
    from smtpstate.bench import Sink

    if Sink().program is None:
        helpers.missing("smtp-sink (Debian package postfix) is not installed")
    window = 1000
    # smtp-sink without -d: 200,000 dump files would measure the disk.
    with Sink() as sink:
        proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(sink.port),
                               str(window), "20000", "200000"],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    small, big = out["runs"]
    assert small["messages"] == 20_000 and big["messages"] == 200_000
    kept = out["kept_bytes"]
    assert kept > 300                                 # the estimate is not empty
    # 180,000 more messages: keeping a twentieth of them would add this.
    assert (big["growth_kib"] - small["growth_kib"]) * 1024 < 180_000 * kept / 20, out
    # The whole peak: far below keeping a tenth of the 200,000, and within
    # the stated bound, 2 KiB plus the message per pending message, plus
    # the engine's own (connections, buffers, caches: 4 MiB allowed).
    assert big["growth_kib"] * 1024 < 200_000 * kept / 10, out
    assert big["growth_kib"] * 1024 <= 4 * 2**20 + window * (2048 + out["message_bytes"]), out
