"""Limits for queue workers: ``--limits FILE`` (routing.load_limits), and
message rates shared by every worker through Redis (smtpstate.shared_limits):
the GCRA script against the private redis-server (brokers.py), and real
``smtpstate worker`` processes delivering to a real aiosmtpd.

Timing assertions are loose on purpose: the machine may be busy.
"""

from __future__ import annotations

import collections
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

import helpers
from helpers import RecordingHandler

import smtpstate
from smtpstate import queue as sq
from smtpstate.errors import InvalidOptionError
from smtpstate.routing import Limits, load_limits
from smtpstate.shared_limits import HeldJobs, RateLimiter

from test_queue import _collect, _log, _messages, _spawn, _stop


def _limiter(url):
    # A key prefix of the test's own: tests share one redis-server.
    return RateLimiter(url, prefix="t-%s:" % uuid.uuid4().hex[:8])


def _db1(url):
    """The broker's redis-server, database 1: the shared limits' store."""
    return url.rsplit("/", 1)[0] + "/1"


# ---------------------------------------------------------------------------
# The GCRA script (real redis-server)
# ---------------------------------------------------------------------------


def test_gcra_burst_then_retry_after_one_interval(redis_broker):
    rl = _limiter(redis_broker.url)
    start = time.monotonic()
    assert [rl.acquire("example.net", 10, burst=3) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = rl.acquire("example.net", 10, burst=3)
    elapsed = time.monotonic() - start
    # The 4th is one interval (0.1 s) after the first, less the time spent.
    assert 0.1 - elapsed - 0.01 <= wait <= 0.1
    # Refused asks are not counted: asking again says the same, less the time.
    again = rl.acquire("example.net", 10, burst=3)
    assert 0 < again <= wait
    # Waiting exactly the retry-after is enough.
    time.sleep(again + 0.002)
    assert rl.acquire("example.net", 10, burst=3) == 0.0
    assert rl.acquire("example.net", 10, burst=3) > 0


def test_gcra_rate_held_over_time_and_time_comes_from_redis(redis_broker):
    import redis
    rl = _limiter(redis_broker.url)
    rate, span = 20.0, 1.5
    allowed = []
    start = time.monotonic()
    while time.monotonic() - start < span:
        wait = rl.acquire("example.org", rate)
        if wait == 0.0:
            allowed.append(time.monotonic())
        else:
            time.sleep(wait)
    # Evenly spaced (burst 1): at most one per interval over the span, plus
    # the first; and not far below the rate either.
    assert len(allowed) <= rate * span + 1
    assert len(allowed) >= rate * span * 0.6
    gaps = [b - a for a, b in zip(allowed, allowed[1:])]
    assert min(gaps) >= 1 / rate - 0.01            # never two at once
    # The state is Redis's clock: the next allowed time, in microseconds of
    # Redis TIME, one interval after the last allowed request at most.
    r = redis.Redis.from_url(redis_broker.url)
    tat = int(r.get(rl.prefix + "example.org"))
    sec, usec = r.time()
    now_us = sec * 1_000_000 + usec
    assert now_us - 1_000_000 < tat <= now_us + 1_000_000 / rate + 1000
    assert 0 < r.pttl(rl.prefix + "example.org") <= 1000 + 1000 / rate + 1


def test_gcra_two_clients_share_one_key(redis_broker):
    a = _limiter(redis_broker.url)
    b = RateLimiter(redis_broker.url, prefix=a.prefix)      # another connection, same key
    rate, span = 10.0, 1.5
    got = collections.Counter()
    start = time.monotonic()
    turn = 0
    while time.monotonic() - start < span:
        client = (a, b)[turn % 2]
        turn += 1
        if client.acquire("shared.example", rate) == 0.0:
            got["ab"[turn % 2]] += 1
        time.sleep(0.005)                 # both keep asking, far faster than the rate
    total = sum(got.values())
    assert total <= rate * span + 1, got              # one rate for both, not two
    assert total >= rate * span * 0.6, got
    assert got["a"] > 0 and got["b"] > 0, got
    # Another key is not slowed by this one.
    assert a.acquire("other.example", rate) == 0.0


def test_gcra_refuses_a_rate_that_cannot_work(redis_broker):
    rl = _limiter(redis_broker.url)
    for rate in (0, -1, float("nan"), True, "5"):
        with pytest.raises(InvalidOptionError, match="shared rate"):
            rl.acquire("example.net", rate)
    with pytest.raises(InvalidOptionError, match="burst"):
        rl.acquire("example.net", 1, burst=0)
    with pytest.raises(InvalidOptionError, match="shared limits URL"):
        RateLimiter("http://127.0.0.1:1/")


# ---------------------------------------------------------------------------
# HeldJobs: the worker's side
# ---------------------------------------------------------------------------


def test_held_jobs_keep_each_domains_order_and_let_others_pass(redis_broker):
    held = HeldJobs(_limiter(redis_broker.url), {"slow.example": 5.0})
    assert held.admit("slow.example", "s1")            # the first goes at once
    assert not held.admit("SLOW.example", "s2")        # then one per 200 ms
    assert not held.admit("slow.example", "s3")
    assert held.admit("fast.example", "f1")            # no rate: never held
    assert len(held) == 2
    assert held.due() == []                            # not yet
    assert 0 < held.next_due() <= 0.2
    out = []
    deadline = time.monotonic() + 5
    while len(out) < 2 and time.monotonic() < deadline:
        time.sleep(held.next_due() or 0.01)
        out.extend(held.due())
    assert out == ["s2", "s3"] and len(held) == 0 and held.next_due() is None


def test_held_jobs_wait_while_redis_is_away_and_go_when_it_is_back(caplog):
    # A real redis-server, started on a port where nothing listened at
    # first: jobs wait (never let go unlimited, never dropped), one warning.
    prog = helpers.find_program("redis-server", "/usr/bin", "/usr/sbin")
    if not prog:
        helpers.missing("redis-server (Debian package redis-server) is not installed")
    port = helpers.free_port()
    now = [1000.0]
    held = HeldJobs(_limiter(f"redis://127.0.0.1:{port}/0"), {"*": 100.0},
                    clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="smtpstate.shared_limits"):
        assert not held.admit("example.net", "j1")
        assert not held.admit("example.net", "j2")
        assert not held.admit("example.com", "j3")
        now[0] += 0.5
        assert held.due() == []
        now[0] += 0.6                       # the first retry (1 s): Redis still away
        assert held.due() == []
        assert len(held) == 3
    warnings = [r for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    d = tempfile.mkdtemp(prefix="smtpstate-redis-")
    proc = subprocess.Popen([prog, "--port", str(port), "--bind", "127.0.0.1", "--dir", d,
                             "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis
        helpers.wait_until(lambda: _pings(redis, port), 20, what="redis-server up")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="smtpstate.shared_limits"):
            now[0] += 60                    # past any back-off
            out = held.due()
        # One per domain at once (100/s, burst 1: example.net's second 10 ms on).
        assert out[:2] in (["j1", "j3"], ["j3", "j1"]), out
        assert any("answers again" in r.getMessage() for r in caplog.records)
        deadline = time.monotonic() + 5
        while len(held) and time.monotonic() < deadline:
            time.sleep(0.02)
            now[0] += 0.02
            out.extend(held.due())
        assert sorted(out) == ["j1", "j2", "j3"]
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


def _pings(redis, port):
    try:
        return redis.Redis(port=port, socket_connect_timeout=0.5).ping()
    except redis.RedisError:
        return False


# ---------------------------------------------------------------------------
# --limits FILE
# ---------------------------------------------------------------------------


def _write(tmp_path, text, name="limits.json"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_load_limits_reads_fields_and_keeps_the_order(tmp_path):
    path = _write(tmp_path, json.dumps({
        "example.com": {"connections": 5, "message_rate": 20},
        "mx:*.outlook.com": {"connections": 10, "connection_rate": 1.5},
        "*": {"messages_per_connection": 100, "message_rate": None},
    }))
    limits = load_limits(path)
    assert list(limits) == ["example.com", "mx:*.outlook.com", "*"]
    assert limits["example.com"] == Limits(connections=5, message_rate=20)
    assert limits["mx:*.outlook.com"] == Limits(connections=10, connection_rate=1.5)
    assert limits["*"] == Limits(messages_per_connection=100)
    assert smtpstate.load_limits is load_limits


@pytest.mark.parametrize("text, words", [
    ('{"example.com": {"conections": 5}}', "key 'example.com': unknown field 'conections'"),
    ('{"example.com": {"connections": "5"}}',
     "key 'example.com': field 'connections' must be an integer, not \"5\""),
    ('{"example.com": {"connections": 2.5}}', "field 'connections' must be an integer"),
    ('{"*": {"message_rate": true}}', "key '*': field 'message_rate' must be a number or null"),
    ('{"*": {"connections": 0}}', "key '*': Limits.connections must be an int >= 1"),
    ('{"*": {"message_rate": -1}}', "key '*': Limits.message_rate must be a positive"),
    ('{"*": 5}', "key '*': must map to an object of fields"),
    ('{"bad key": {}}', "key 'bad key': limits key"),
    ('{"a.example": {}, "a.example": {}}', "key 'a.example' appears twice"),
    ('[1, 2]', "must hold a JSON object"),
    ('{"a.example": {', "not valid JSON"),
])
def test_limits_file_errors_name_file_key_and_field_exit_2(tmp_path, text, words):
    path = _write(tmp_path, text)
    with pytest.raises(InvalidOptionError) as e:
        load_limits(path)
    assert str(e.value).startswith(f"limits file {path}: ") and words in str(e.value)
    # The command says the same, exits 2, and shows no traceback; nothing
    # listens on the broker's port, and nothing tries: it stops first.
    run = subprocess.run([sys.executable, "-m", "smtpstate", "worker", "--broker",
                          "redis://127.0.0.1:1/0", "--limits", path],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert words in run.stderr and path in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("args, words", [
    (["--limits", "MISSING"], "cannot be read"),
    (["--shared-limits", "redis://127.0.0.1:1/1"], "--shared-limits needs --limits FILE"),
    (["--limits", "MX", "--shared-limits", "redis://127.0.0.1:1/1"],
     "--shared-limits needs --limits FILE"),
    (["--limits", "OK", "--shared-limits", "http://127.0.0.1:1/"], "shared limits URL"),
    (["--resolver", "system", "--nameserver", "192.0.2.1"], "not both"),
    (["--resolver", "not-an-ip"], "must be an IP address"),
    (["--no-dnssec", "--trust-anchor", "x"], "contradict"),
    (["--trust-anchor", "MISSING"], "neither a DS or DNSKEY record nor a file"),
    (["--dns-timeout", "0"], "timeout must be a positive number"),
])
def test_worker_option_errors_exit_2(tmp_path, args, words):
    files = {"MISSING": str(tmp_path / "missing.json"),
             "MX": _write(tmp_path, '{"mx:*.example": {"message_rate": 2}}', "mx.json"),
             "OK": _write(tmp_path, '{"*": {"message_rate": 2}}', "ok.json")}
    args = [files.get(a, a) for a in args]
    run = subprocess.run([sys.executable, "-m", "smtpstate", "worker", "--broker",
                          "redis://127.0.0.1:1/0", *args],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and words in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_worker_refuses_shared_limits_without_a_rate():
    with pytest.raises(InvalidOptionError, match="needs limits with a message_rate"):
        sq.Worker("redis://127.0.0.1:1/0", shared_limits="redis://127.0.0.1:1/1",
                  limits={"mx:*.example": Limits(message_rate=5)})


# ---------------------------------------------------------------------------
# Real worker processes
# ---------------------------------------------------------------------------


class Timed(RecordingHandler):
    """Records when each message arrived (the server's clock)."""

    def __init__(self):
        super().__init__()
        self.times = []

    async def handle_DATA(self, server, session, envelope):
        self.times.append(time.monotonic())
        return await super().handle_DATA(server, session, envelope)


def _workers(url, queue, processes, *extra):
    return _spawn([sys.executable, "-m", "smtpstate", "worker", "--broker", url,
                   "--queue", queue, "--processes", str(processes),
                   "--max-connections", "20", *extra])


def _rate(times):
    times = sorted(times)
    return (len(times) - 1) / (times[-1] - times[0])


def test_limits_file_applies_per_process(redis_broker, queue_name, aiosmtpd_factory,
                                         tmp_path):
    # "*" matches the smart host's destination: 5 messages a second, so 12
    # messages take at least 11 intervals (2.2 s).
    handler = Timed()
    server = aiosmtpd_factory(handler)
    path = _write(tmp_path, '{"*": {"message_rate": 5}}')
    ids = sq.enqueue(_messages(12), redis_broker.url, queue_name, host=server.host,
                     port=server.port, tls="none")
    worker = _workers(redis_broker.url, queue_name, 1, "--limits", path)
    try:
        results = _collect(redis_broker.url, queue_name, ids, timeout=60)
    finally:
        assert _stop(worker) == 0, _log(worker)[-2000:]
    assert sorted(r["job"] for r in results) == sorted(ids)
    assert {r["status"] for r in results} == {"delivered"}
    # Unlimited, 12 messages over loopback take milliseconds; the margin is
    # for a first message delayed by its connection on a busy machine.
    assert _rate(handler.times) <= 5 * 1.5, handler.times


def test_shared_rate_holds_across_two_worker_processes(redis_broker, queue_name,
                                                       aiosmtpd_factory, tmp_path):
    n, rate = 30, 4.0
    handler = Timed()
    server = aiosmtpd_factory(handler)
    # example.net is a domain key: per process it would not even apply to
    # a smart host's destination, so whatever holds the rate is shared.
    path = _write(tmp_path, json.dumps({"example.net": {"message_rate": rate}}))
    # A prefetch window of 10 leaves jobs for the second process (on Redis
    # a worker takes all its window holds at once).
    workers = _workers(redis_broker.url, queue_name, 2, "--limits", path,
                       "--shared-limits", _db1(redis_broker.url), "--prefetch", "10")
    try:
        # Both processes consume before the jobs come, so both take some.
        helpers.wait_until(lambda: _log(workers).count("worker consuming") == 2, 30,
                           what="two worker processes consuming")
        ids = sq.enqueue(_messages(n), redis_broker.url, queue_name, host=server.host,
                         port=server.port, tls="none")
        results = _collect(redis_broker.url, queue_name, ids, timeout=60)
    finally:
        code = _stop(workers)
    err = _log(workers)
    counts = collections.Counter(r["job"] for r in results)
    assert set(counts) == set(ids) and max(counts.values()) == 1, err[-2000:]
    assert {r["status"] for r in results} == {"delivered"}
    assert len(handler.times) == n
    observed = _rate(handler.times)
    # At the shared rate (evenly spaced, burst 1), not twice it; and not
    # far below it either.
    assert rate * 0.5 <= observed <= rate * 1.25, (observed, handler.times)
    assert code == 0, err[-2000:]
    done = [int(line.rsplit(" after ", 1)[1].split()[0]) for line in err.splitlines()
            if "worker stopped after" in line]
    assert len(done) == 2 and sum(done) == n and min(done) > 0, err[-2000:]


def test_redis_away_jobs_wait_unacknowledged_and_go_back_on_stop(redis_broker, queue_name,
                                                                 aiosmtpd_server, tmp_path):
    path = _write(tmp_path, '{"*": {"message_rate": 50}}')
    ids = sq.enqueue(_messages(3), redis_broker.url, queue_name, host=aiosmtpd_server.host,
                     port=aiosmtpd_server.port, tls="none")
    dead = f"redis://127.0.0.1:{helpers.free_port()}/1"     # nothing listens there
    worker = _workers(redis_broker.url, queue_name, 1, "--limits", path,
                      "--shared-limits", dead)
    try:
        helpers.wait_until(lambda: "cannot be reached" in _log(worker), 30,
                           what="the warning that Redis is away")
        time.sleep(1.5)
        assert aiosmtpd_server.messages == []                  # held, not sent
    finally:
        assert _stop(worker) == 0, _log(worker)[-2000:]
    err = _log(worker)
    assert "dead-lettered" not in err and "Traceback" not in err, err[-2000:]
    assert err.count("cannot be reached") == 1, err[-2000:]      # not once per job
    assert "worker stopped after 0 job(s)" in err
    # Given back on stop: the next worker delivers each once.
    worker = _workers(redis_broker.url, queue_name, 1, "--limits", path,
                      "--shared-limits", _db1(redis_broker.url))
    try:
        results = _collect(redis_broker.url, queue_name, ids, timeout=60)
    finally:
        assert _stop(worker) == 0, _log(worker)[-2000:]
    counts = collections.Counter(r["job"] for r in results)
    assert set(counts) == set(ids) and max(counts.values()) == 1
    assert len(aiosmtpd_server.messages) == 3


# ---------------------------------------------------------------------------
# --resolver and the DNS options
# ---------------------------------------------------------------------------


def test_worker_resolver_option_routes_by_mx_through_that_server(redis_broker, queue_name,
                                                                 dns_server, dns_origin,
                                                                 mx_servers):
    # The zone exists only in the private NSD: a delivery by MX proves the
    # worker asked it, not the system's resolver.
    servers = mx_servers(["127.0.0.2"])
    dns_server.add_zone(dns_origin, ["@ MX 10 mx1", "mx1 A 127.0.0.2"])
    ids = sq.enqueue(_messages(2, rcpts=(f"bob@{dns_origin}",)), redis_broker.url,
                     queue_name, port=servers.port, tls="none")
    worker = _workers(redis_broker.url, queue_name, 1, "--resolver", dns_server.address,
                      "--no-dnssec", "--dns-timeout", "2", "--dns-attempts", "2")
    try:
        results = _collect(redis_broker.url, queue_name, ids, timeout=60)
    finally:
        assert _stop(worker) == 0, _log(worker)[-2000:]
    assert sorted(r["job"] for r in results) == sorted(ids)
    for r in results:
        assert r["status"] == "delivered", r
        assert r["recipients"][0]["mx"] == f"mx1.{dns_origin}", r
    assert len(servers.server("127.0.0.2").wait_for_messages(2)) == 2
