"""smtpstate.queue: the job format, and real worker processes against a
private RabbitMQ node and redis-server (brokers.py) delivering to real
SMTP servers (smtp-sink, aiosmtpd).

"""

from __future__ import annotations

import base64
import collections
import dataclasses
import json
import os
import signal
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
from smtpstate._amqp_queue import Published


def _messages(n, rcpts=("bob@example.net",), tag=b""):
    return [smtpstate.Message("alice@example.org", list(rcpts),
                              b"Subject: queued %d\n\nbody %s\n" % (i, tag))
            for i in range(n)]


def _worker(url, queue, *extra):
    """A real worker process (the CLI), its output in a file."""
    cmd = [sys.executable, "-m", "smtpstate", "worker", "--broker", url, "--queue", queue,
           "--processes", "1", "--max-connections", "20", *extra]
    return _spawn(cmd)


def _spawn(cmd):
    # stderr to a file, not a pipe nobody reads while it runs (a full pipe
    # would stall the worker); _log(proc) reads it.
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=err)
    proc.err_file = err
    return proc


def _log(proc):
    proc.err_file.seek(0)
    return proc.err_file.read().decode(errors="replace")


def _stop(proc, sig=signal.SIGTERM, timeout=60):
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("the worker did not stop within %d s" % timeout)
    return proc.returncode


class _Slow(RecordingHandler):
    """Answers each final dot ``delay`` seconds late: slow enough that a
    kill, a stop or a broker restart lands with jobs in flight."""

    def __init__(self, delay):
        super().__init__()
        self.delay = delay

    async def handle_DATA(self, server, session, envelope):
        import asyncio
        await asyncio.sleep(self.delay)
        return await super().handle_DATA(server, session, envelope)


def _collect(url, queue, want, timeout=90.0, quiet=2.0):
    """Read results until every job in ``want`` has one and none came for
    ``quiet`` seconds (so that duplicates would be seen), or ``timeout``."""
    results = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = list(sq.read_results(url, queue, timeout=quiet))
        results.extend(got)
        if not got and {r["job"] for r in results} >= set(want):
            break
    return results


# ---------------------------------------------------------------------------
# The job format (no broker)
# ---------------------------------------------------------------------------


def test_job_round_trip_keeps_envelope_dsn_and_bytes():
    data = b"Subject: x\r\n\r\n\x80 raw 8-bit\r\n.leading dot\r\n"
    msg = smtpstate.Message("a@example.org",
                            ["b@example.net",
                             smtpstate.Recipient("c@example.net", notify=("FAILURE", "DELAY"),
                                                 orcpt="c@example.net")],
                            data, dsn_ret="HDRS", envid="env-1")
    job = sq.Job.from_message(msg, "mx.example.net", 2525, tls="verify", timeout=30)
    raw = job.to_json()
    obj = json.loads(raw)
    assert obj["version"] == sq.JOB_VERSION
    assert base64.b64decode(obj["data"]) == data
    back = sq.Job.from_json(raw)
    assert back == job
    m = back.message()
    assert m.data == data and m.sender == "a@example.org"
    assert m.recipient_options[1].notify == ("FAILURE", "DELAY")
    assert m.recipient_options[1].orcpt == "c@example.net"
    assert (m.dsn_ret, m.envid) == ("HDRS", "env-1")
    assert uuid.UUID(back.id) and back.attempts == 0 and back.first_enqueued > 0


@pytest.mark.parametrize("mutate, words", [
    (lambda o: o.update(version=2), "version 2 is not supported"),
    (lambda o: o.pop("sender"), "missing: sender"),
    (lambda o: o.update(extra=1), "unknown job field(s): extra"),
    (lambda o: o.update(data="%%%"), "data must be base64"),
    (lambda o: o.update(port="25"), "port must be an int"),
    (lambda o: o.update(id="nope"), "not a UUID"),
    (lambda o: o.update(recipients=[]), "at least one pending recipient"),
    (lambda o: o.update(recipients=[{"address": "x"}]), "exactly"),
    (lambda o: o["options"].update(auth=["u", "p"]), "cannot travel in a job"),
    (lambda o: o["options"].update(tls="maybe"), "option tls must be one of"),
    (lambda o: o["options"].update(timeout="5"), "option timeout must be"),
    (lambda o: o.update(sender="a\r\nRCPT TO:<x>"), "message cannot be made"),
])
def test_job_parsing_is_strict(mutate, words):
    obj = json.loads(sq.Job.from_message(_messages(1)[0], "127.0.0.1").to_json())
    mutate(obj)
    with pytest.raises(sq.JobError) as e:
        sq.Job.from_json(json.dumps(obj))
    assert words in str(e.value)


@pytest.mark.parametrize("raw, words", [
    (b"\xff\xfe", "UTF-8"), (b"{", "must be JSON"), (b"[1]", "JSON object"),
    # A pickle's first byte is a msgpack map's: read as msgpack, refused.
    (b"\x80\x04\x95pickle", "not valid msgpack"),
])
def test_job_parsing_refuses_what_is_not_a_json_job(raw, words):
    with pytest.raises(sq.JobError, match=words):
        sq.Job.from_json(raw)


@pytest.mark.parametrize("mutate, words", [
    # Each of these once got past parsing and crashed the worker.
    (lambda o: o.update(settled=[{"address": "x@example.net", "status": "delivered"}]),
     "settled holds a bad entry"),
    (lambda o: o.update(first_enqueued=10 ** 400), "first_enqueued must be a number"),
    (lambda o: o.update(first_enqueued=float("nan")), "first_enqueued must be a number"),
    (lambda o: o.update(redelivered="yes"), "redelivered must be true or false"),
])
def test_job_parsing_refuses_what_once_crashed_a_worker(mutate, words):
    obj = json.loads(sq.Job.from_message(_messages(1)[0], "127.0.0.1").to_json())
    mutate(obj)
    with pytest.raises(sq.JobError, match=words):
        sq.Job.from_json(json.dumps(obj))
    with pytest.raises(sq.JobError, match="must be JSON"):
        sq.Job.from_json(b"[" * 100000 + b"]" * 100000)     # nested too deep


def _attempt(status, rcpt_reply, reply):
    from smtpstate.result import RecipientResult, Reply, Result
    r = Reply(rcpt_reply[0], "", rcpt_reply[1]) if rcpt_reply else None
    return Result(status=status, reply=Reply(reply[0], "", reply[1]), stage="", stage_code=0,
                  state=None,
                  recipients=(RecipientResult("bob@example.net", status, r),))


def test_outcome_keeps_the_redelivered_mark_through_retries_and_names_the_deciding_reply():
    job = sq.Job.from_message(_messages(1)[0], "127.0.0.1")
    job = dataclasses.replace(job, redelivered=False)
    # Accepted at RCPT, refused with 451 after DATA: the 451 decides.
    step = sq.outcome(job, _attempt("tempfail", (250, "OK"), (451, "try later")),
                      schedule=(1.0,), redelivered=True)
    assert step.retry is not None and step.retry.redelivered
    back = sq.Job.from_json(step.retry.to_json())
    assert back.redelivered and back.settled == []
    # The next attempt is not redelivered, yet its result says the job was.
    final = sq.outcome(back, _attempt("delivered", (250, "OK"), (250, "queued")))
    assert final.final["redelivered"] is True and final.final["status"] == "delivered"
    # Expiring, the recipient's reply and reason are the 451's.
    old = dataclasses.replace(job, first_enqueued=time.time() - 10)
    expired = sq.outcome(old, _attempt("tempfail", (250, "OK"), (451, "try later")),
                         schedule=(5.0,), max_age=10)
    [entry] = expired.final["recipients"]
    assert entry["reply"]["code"] == 451 and "last: 451 try later" in entry["reason"]


@pytest.mark.parametrize("option", [["--retry-schedule", "nan"], ["--retry-schedule", "1,inf"],
                                    ["--max-age", "nan"], ["--visibility-timeout", "0.01"]])
def test_worker_refuses_non_finite_schedules_and_ages(option):
    proc = subprocess.run([sys.executable, "-m", "smtpstate", "worker", "--broker",
                           "amqp://127.0.0.1:1//", "--processes", "2", *option],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "must be" in proc.stderr


def test_delay_queue_names_are_exact():
    from smtpstate._amqp_queue import _seconds_name
    assert [_seconds_name(s) for s in (300.0, 1.5, 1234567.0, 1234568.0, 0.001)] == \
        ["300", "1.5", "1234567", "1234568", "0.001"]


def test_enqueue_refuses_a_stream_and_a_credential_before_publishing():
    stream = smtpstate.Message("a@example.org", ["b@example.net"], iter([b"x\n"]))
    with pytest.raises(sq.JobError, match="as bytes"):
        sq.enqueue([stream], "amqp://127.0.0.1:1//")
    with pytest.raises(sq.JobError, match="cannot travel"):
        sq.enqueue(_messages(1), "amqp://127.0.0.1:1//", auth=("u", "p"))


# ---------------------------------------------------------------------------
# RabbitMQ
# ---------------------------------------------------------------------------


def test_many_messages_two_worker_processes_one_result_each(rabbitmq, queue_name,
                                                            smtp_sink_server):
    n = 10000
    ids = sq.enqueue(_messages(n), rabbitmq.url, queue_name, host=smtp_sink_server.host,
                     port=smtp_sink_server.port, tls="none")
    assert len(set(ids)) == n
    cmd = [sys.executable, "-m", "smtpstate", "worker", "--broker", rabbitmq.url,
           "--queue", queue_name, "--processes", "2", "--max-connections", "20"]
    workers = _spawn(cmd)
    try:
        results = _collect(rabbitmq.url, queue_name, ids, timeout=120)
    finally:
        code = _stop(workers)
    err = _log(workers)
    counts = collections.Counter(r["job"] for r in results)
    assert set(counts) == set(ids), err[-2000:]
    assert max(counts.values()) == 1
    assert {r["status"] for r in results} == {"delivered"}
    assert all(r["final"] and r["attempts"] == 1 and not r["redelivered"] for r in results)
    assert code == 0, err[-2000:]
    # Both processes took jobs (the log says how many each did).
    done = [int(line.rsplit(" after ", 1)[1].split()[0]) for line in err.splitlines()
            if "worker stopped after" in line]
    assert len(done) == 2 and sum(done) == n and min(done) > 0, err[-2000:]


def test_sigkill_mid_run_loses_nothing(rabbitmq, queue_name, aiosmtpd_factory):
    server = aiosmtpd_factory(_Slow(0.01))
    n = 600
    ids = sq.enqueue(_messages(n), rabbitmq.url, queue_name, host=server.host,
                     port=server.port, tls="none")
    victim = _worker(rabbitmq.url, queue_name)
    survivor = _worker(rabbitmq.url, queue_name)
    try:
        helpers.wait_until(lambda: len(server.handler.messages) >= 100, 60,
                           what="100 messages delivered")
        victim.kill()                                # SIGKILL: no goodbye
        victim.wait()
        results = _collect(rabbitmq.url, queue_name, ids, timeout=120)
    finally:
        _stop(victim)
        code = _stop(survivor)
    counts = collections.Counter(r["job"] for r in results)
    assert set(counts) == set(ids)
    # Exactly one result per job that is not marked as a possible duplicate.
    plain = collections.Counter(r["job"] for r in results if not r["redelivered"])
    assert max(plain.values(), default=0) <= 1
    dups = [j for j, c in counts.items() if c > 1]
    assert all(plain[j] <= 1 for j in dups)
    assert {r["status"] for r in results} == {"delivered"}
    # Something was in flight in the victim and went to the survivor.
    assert any(r["redelivered"] for r in results)
    assert len(server.handler.messages) >= n
    assert code == 0


def test_451_at_first_is_retried_after_the_delay_and_delivered(rabbitmq, queue_name,
                                                               aiosmtpd_factory):
    class GreylistFirst(RecordingHandler):
        def __init__(self):
            super().__init__()
            self.refused = 0
            self.until = time.monotonic() + 1.0

        async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
            if address.startswith("grey") and time.monotonic() < self.until:
                self.refused += 1
                return "451 4.7.1 greylisted, come back later"
            envelope.rcpt_tos.append(address)
            return "250 OK"

    handler = GreylistFirst()
    server = aiosmtpd_factory(handler)
    ids = sq.enqueue(_messages(5, rcpts=("ok@example.net", "grey@example.net")),
                     rabbitmq.url, queue_name, host=server.host, port=server.port, tls="none")
    worker = _worker(rabbitmq.url, queue_name, "--retry-schedule", "2")
    try:
        results = _collect(rabbitmq.url, queue_name, ids, timeout=60)
    finally:
        assert _stop(worker) == 0
    assert handler.refused == 5
    assert sorted(r["job"] for r in results) == sorted(ids)
    for r in results:
        assert r["status"] == "delivered" and r["attempts"] == 2, r
        ok, grey = r["recipients"]
        assert (ok["address"], ok["attempts"]) == ("ok@example.net", 1)
        assert (grey["address"], grey["attempts"], grey["status"]) == \
            ("grey@example.net", 2, "delivered")
        assert r["finished"] - r["first_enqueued"] >= 2.0
    # The first attempt delivered to ok@ only; the retry to grey@ only.
    rcpt_sets = sorted(tuple(m.rcpt_tos) for m in handler.messages)
    assert rcpt_sets == [("grey@example.net",)] * 5 + [("ok@example.net",)] * 5


def test_tempfail_until_max_age_expires_as_permfail_547(rabbitmq, queue_name,
                                                       aiosmtpd_factory):
    class AlwaysLater(RecordingHandler):
        async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
            return "451 4.3.0 try again later"

    server = aiosmtpd_factory(AlwaysLater())
    ids = sq.enqueue(_messages(2), rabbitmq.url, queue_name, host=server.host,
                     port=server.port, tls="none")
    worker = _worker(rabbitmq.url, queue_name, "--retry-schedule", "1", "--max-age", "2.5")
    try:
        results = _collect(rabbitmq.url, queue_name, ids, timeout=60)
    finally:
        assert _stop(worker) == 0
    assert sorted(r["job"] for r in results) == sorted(ids)
    for r in results:
        assert r["status"] == "permfail" and r["attempts"] >= 2, r
        (rcpt,) = r["recipients"]
        assert rcpt["enhanced"] == "5.4.7" and rcpt["reason"].startswith("expired"), rcpt
        assert "451 4.3.0 try again later" in rcpt["reason"]


def test_unknown_is_final_marked_and_never_retried(rabbitmq, queue_name, aiosmtpd_factory):
    class LoseTheReply(RecordingHandler):
        async def handle_DATA(self, server, session, envelope):
            await super().handle_DATA(server, session, envelope)
            server.transport.abort()            # the final dot's reply is lost
            return "250 OK"

    handler = LoseTheReply()
    server = aiosmtpd_factory(handler)
    ids = sq.enqueue(_messages(2), rabbitmq.url, queue_name, host=server.host,
                     port=server.port, tls="none")
    worker = _worker(rabbitmq.url, queue_name, "--retry-schedule", "1")
    try:
        results = _collect(rabbitmq.url, queue_name, ids, timeout=60, quiet=3)
    finally:
        assert _stop(worker) == 0
    assert sorted(r["job"] for r in results) == sorted(ids)
    for r in results:
        assert (r["status"], r["needs_decision"], r["attempts"]) == ("unknown", True, 1), r
        assert r["recipients"][0]["status"] == "unknown"
    assert len(handler.messages) == 2           # delivered once each, not again


def test_sigterm_stops_cleanly_and_nothing_is_lost(rabbitmq, queue_name, aiosmtpd_factory):
    server = aiosmtpd_factory(_Slow(0.02))
    n = 300
    ids = sq.enqueue(_messages(n), rabbitmq.url, queue_name, host=server.host,
                     port=server.port, tls="none")
    worker = _worker(rabbitmq.url, queue_name)
    helpers.wait_until(lambda: len(server.handler.messages) >= 30, 60, what="30 delivered")
    assert _stop(worker, signal.SIGTERM, timeout=60) == 0
    err = _log(worker)
    assert "worker stopped after" in err, err[-2000:]
    first = list(sq.read_results(rabbitmq.url, queue_name, timeout=1))
    assert 30 <= len(first) < n
    # Everything it delivered has its result: nothing it finished was left.
    assert len(server.handler.messages) == len(first)
    # The rest waits in the queue for the next worker, each exactly once.
    worker = _worker(rabbitmq.url, queue_name)
    try:
        rest = _collect(rabbitmq.url, queue_name,
                        set(ids) - {r["job"] for r in first}, timeout=90)
    finally:
        assert _stop(worker) == 0
    counts = collections.Counter(r["job"] for r in first + rest)
    assert set(counts) == set(ids) and max(counts.values()) == 1
    assert len(server.handler.messages) == n


def test_malformed_job_is_dead_lettered_with_its_reason(rabbitmq, queue_name,
                                                       aiosmtpd_server):
    import kombu

    good = sq.Job.from_message(_messages(1)[0], aiosmtpd_server.host, aiosmtpd_server.port,
                               tls="none").to_json()
    wrong_version = json.loads(good)
    wrong_version["version"] = 99
    wrong_version["id"] = str(uuid.uuid4())
    bodies = [b"not json at all", json.dumps(wrong_version).encode(), good]
    with kombu.Connection(rabbitmq.url) as conn:
        q = sq._job_queue(conn, queue_name)
        producer = conn.Producer()
        for body in bodies:
            producer.publish(body, exchange="", routing_key=queue_name, declare=[q],
                             content_type="application/json", content_encoding="binary")
    worker = _worker(rabbitmq.url, queue_name)
    try:
        results = _collect(rabbitmq.url, queue_name, [json.loads(good)["id"]], timeout=60)
    finally:
        assert _stop(worker) == 0
    assert [r["status"] for r in results] == ["delivered"]     # it kept going
    dead = []
    with kombu.Connection(rabbitmq.url) as conn:
        got = []
        with conn.Consumer([sq._queue(conn, queue_name + ".dead")], on_message=got.append,
                           accept=[]):
            deadline = time.monotonic() + 10
            while len(got) < 2 and time.monotonic() < deadline:
                try:
                    conn.drain_events(timeout=1)
                except Exception:
                    pass
        for m in got:
            dead.append(json.loads(m.body))
            m.ack()
    assert len(dead) == 2
    dead.sort(key=lambda d: d["reason"])
    assert "must be JSON" in dead[0]["reason"]
    assert base64.b64decode(dead[0]["body"]) == b"not json at all"
    assert "version 99 is not supported" in dead[1]["reason"]
    assert json.loads(base64.b64decode(dead[1]["body"]))["version"] == 99


# ---------------------------------------------------------------------------
# Redis: reliable lists through redis-py (smtpstate/_redis_queue.py)
# ---------------------------------------------------------------------------


def test_redis_enqueue_worker_result(redis_broker, queue_name, aiosmtpd_server):
    ids = sq.enqueue(_messages(50), redis_broker.url, queue_name, host=aiosmtpd_server.host,
                     port=aiosmtpd_server.port, tls="none")
    worker = _worker(redis_broker.url, queue_name)
    try:
        results = _collect(redis_broker.url, queue_name, ids, timeout=60, quiet=2)
    finally:
        assert _stop(worker) == 0
    counts = collections.Counter(r["job"] for r in results)
    assert set(counts) == set(ids) and max(counts.values()) == 1
    assert {r["status"] for r in results} == {"delivered"}
    assert len(aiosmtpd_server.messages) == 50


def test_redis_tempfail_waits_in_the_sorted_set_then_delivers(redis_broker, queue_name,
                                                             aiosmtpd_factory):
    class GreylistFirst(RecordingHandler):
        until = time.monotonic() + 1.0

        async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
            if time.monotonic() < self.until:
                return "451 4.7.1 greylisted"
            envelope.rcpt_tos.append(address)
            return "250 OK"

    handler = GreylistFirst()
    handler.until = time.monotonic() + 1.0
    server = aiosmtpd_factory(handler)
    ids = sq.enqueue(_messages(3), redis_broker.url, queue_name, host=server.host,
                     port=server.port, tls="none")
    worker = _worker(redis_broker.url, queue_name, "--retry-schedule", "2")
    try:
        results = _collect(redis_broker.url, queue_name, ids, timeout=60, quiet=2)
    finally:
        assert _stop(worker) == 0
    assert sorted(r["job"] for r in results) == sorted(ids)
    assert all(r["status"] == "delivered" and r["attempts"] == 2 for r in results), results
    import redis
    assert redis.Redis.from_url(redis_broker.url).zcard(queue_name + ".delayed") == 0


def test_redis_sigkill_mid_run_loses_nothing(redis_broker, queue_name, aiosmtpd_factory):
    server = aiosmtpd_factory(_Slow(0.01))
    n = 300
    ids = sq.enqueue(_messages(n), redis_broker.url, queue_name, host=server.host,
                     port=server.port, tls="none")
    # Jobs a dead worker held come back when its lease (the visibility
    # timeout) has run out; RabbitMQ needs no timeout.
    r = _redis(redis_broker.url)
    victim = _worker(redis_broker.url, queue_name, "--visibility-timeout", "4")
    # The victim holds jobs before the survivor starts (so the kill lands
    # on jobs in flight however slow the machine is).
    helpers.wait_until(lambda: r.keys(queue_name + ".taken.*"), 60, what="the victim's jobs")
    [victims_list] = r.keys(queue_name + ".taken.*")
    survivor = _worker(redis_broker.url, queue_name, "--visibility-timeout", "4")
    try:
        helpers.wait_until(lambda: len(server.handler.messages) >= 50
                           and r.llen(victims_list) > 0, 60,
                           what="50 messages delivered, the victim holding jobs")
        victim.kill()
        victim.wait()
        results = _collect(redis_broker.url, queue_name, ids, timeout=40, quiet=3)
    finally:
        _stop(victim)
        code = _stop(survivor)
    counts = collections.Counter(r["job"] for r in results)
    assert set(counts) == set(ids)
    plain = collections.Counter(r["job"] for r in results if not r["redelivered"])
    assert max(plain.values(), default=0) <= 1
    assert {r["status"] for r in results} == {"delivered"}
    assert any(r["redelivered"] for r in results)
    assert code == 0


def _redis(url):
    import redis
    return redis.Redis.from_url(url)


def _pairs(taken):
    return [(t.body, t.redelivered) for t in taken]


def test_redis_reliable_list_take_ack_give_back_and_reap(redis_broker, queue_name):
    from smtpstate import _redis_queue as rq

    r = _redis(redis_broker.url)
    rq.push(r, queue_name, [b"one", b"two", b"three"])
    dead = rq.ReliableList(r, queue_name, lease=0.5)
    alive = rq.ReliableList(r, queue_name, lease=30)
    one, two = dead.take(2)
    assert _pairs([one, two]) == [(b"one", False), (b"two", False)]     # oldest first
    assert r.llen(queue_name) == 1 and r.llen(dead.taken_key) == 2
    dead.ack(one)
    assert r.lrange(dead.taken_key, 0, -1) == [b"two"]
    # The first consumer stops renewing its lease (it died): while the
    # lease runs, its message stays with it; after, another hands it out
    # again, marked and counted, before the messages never taken.
    assert alive.housekeeping(force=True) == 0
    time.sleep(0.7)
    assert alive.housekeeping(force=True) == 1
    assert r.sismember(queue_name + ".consumers", dead.id) == 0
    again, three = alive.take(5)
    assert _pairs([again, three]) == [(b"two", True), (b"three", False)]
    assert again.returns == 1 and three.returns == 0
    alive.give_back(three)                              # next to be taken
    alive.give_back(again)                              # ... after this, still marked
    assert r.lrange(queue_name, 0, -1) == [b"three"]
    assert _pairs(alive.take(2)) == [(b"two", True), (b"three", False)]
    alive.leave()                                       # a clean exit gives back at once
    other = rq.ReliableList(r, queue_name)
    got = other.take(5)
    assert sorted(_pairs(got)) == [(b"three", True), (b"two", True)]
    assert sorted(t.returns for t in got) == [1, 2]
    for t in got:
        other.ack(t)
    assert r.llen(other.taken_key) == 0 and r.llen(queue_name) == 0
    assert r.hlen(queue_name + ".returns") == 0         # counts end with the message


def test_redis_a_worker_past_its_lease_publishes_its_result_marked(redis_broker, queue_name):
    from smtpstate import _redis_queue as rq

    r = _redis(redis_broker.url)
    rq.push(r, queue_name, [b"job"])
    slow = rq.ReliableList(r, queue_name, lease=0.3)
    [taken] = slow.take(1)
    time.sleep(0.5)                         # paused past its lease: reaped
    other = rq.ReliableList(r, queue_name)
    assert other.reap(force=True) == 1
    assert slow.finish(taken, queue_name + ".results", b"plain", b"marked") is False
    [copy] = other.take(1)
    assert (copy.body, copy.redelivered) == (b"job", True)
    assert other.finish(copy, queue_name + ".results", b"plain", b"marked") is True
    assert sorted(r.lrange(queue_name + ".results", 0, -1)) == [b"marked", b"plain"]


def test_redis_a_job_that_kills_every_worker_is_dead_lettered(redis_broker, queue_name,
                                                             aiosmtpd_server):
    from smtpstate import _redis_queue as rq

    ids = sq.enqueue(_messages(1), redis_broker.url, queue_name, host=aiosmtpd_server.host,
                     port=aiosmtpd_server.port, tls="none")
    r = _redis(redis_broker.url)
    for _ in range(sq.DELIVERY_LIMIT + 1):        # each taker dies holding it
        victim = rq.ReliableList(r, queue_name, lease=0.05)
        assert len(victim.take(1)) == 1
        time.sleep(0.1)
        assert rq.ReliableList(r, queue_name).reap(force=True) == 1
    worker = _worker(redis_broker.url, queue_name)
    try:
        helpers.wait_until(lambda: r.llen(queue_name + ".dead") == 1, 30,
                           what="the job dead-lettered")
    finally:
        assert _stop(worker) == 0
    record = json.loads(r.lindex(queue_name + ".dead", 0))
    assert "handed out 22 times" in record["reason"], record["reason"]
    assert json.loads(base64.b64decode(record["body"]))["id"] == ids[0]
    assert not aiosmtpd_server.messages
    assert r.hlen(queue_name + ".returns") == 0


def test_redis_retry_is_scheduled_by_redis_time_and_acknowledged_atomically(
        redis_broker, queue_name):
    from smtpstate import _redis_queue as rq

    r = _redis(redis_broker.url)
    rq.push(r, queue_name, [b"job"])
    transport = rq.RedisTransport(redis_broker.url, queue_name, lease=30)
    try:
        [(body, again, handle)] = transport.poll(0, 10)
        assert (body, again) == (b"job", False)
        retry = Published("delay", b"job, attempt 2", 1.0)
        transport.settle(handle, [retry], lambda: [retry._replace(body=b"marked")])
        assert r.llen(transport.jobs.taken_key) == 0     # acknowledged with the retry
        [(member, due)] = r.zrange(queue_name + ".delayed", 0, -1, withscores=True)
        seconds, micros = r.time()
        assert member == b"job, attempt 2"
        assert 0.5 < due - (seconds + micros / 1e6) <= 1.0
        transport.housekeeping()
        assert r.llen(queue_name) == 0                   # not due yet
        time.sleep(1.1)
        transport._next_due = 0.0
        transport.housekeeping()
        assert r.lrange(queue_name, 0, -1) == [b"job, attempt 2"]
        assert r.zcard(queue_name + ".delayed") == 0
        [(body, again, handle)] = transport.poll(0, 10)
        transport.settle(handle, [Published("results", b"result"), Published("dead", b"x")],
                         lambda: [Published("results", b"marked"), Published("dead", b"x")])
        assert r.lrange(queue_name + ".results", 0, -1) == [b"result"]
        assert r.lrange(queue_name + ".dead", 0, -1) == [b"x"]
        assert r.llen(transport.jobs.taken_key) == 0
    finally:
        transport.close()


def test_redis_sigterm_stops_cleanly_and_nothing_is_lost(redis_broker, queue_name,
                                                        aiosmtpd_factory):
    server = aiosmtpd_factory(_Slow(0.02))
    ids = sq.enqueue(_messages(200), redis_broker.url, queue_name, host=server.host,
                     port=server.port, tls="none")
    first = _worker(redis_broker.url, queue_name, "--prefetch", "20")
    helpers.wait_until(lambda: len(server.handler.messages) >= 20, 60,
                       what="20 messages delivered")
    assert _stop(first) == 0, _log(first)
    assert "worker stopped after" in _log(first)
    r = _redis(redis_broker.url)
    assert r.scard(queue_name + ".consumers") == 0        # it left, holding nothing
    second = _worker(redis_broker.url, queue_name)
    try:
        results = _collect(redis_broker.url, queue_name, ids, timeout=60, quiet=2)
    finally:
        assert _stop(second) == 0
    counts = collections.Counter(r["job"] for r in results)
    assert set(counts) == set(ids) and max(counts.values()) == 1
    assert not any(r["redelivered"] for r in results)
    assert len(server.handler.messages) == 200


def test_a_job_delivered_too_many_times_goes_to_the_dead_queue(rabbitmq, queue_name):
    """A job whose every taker dies (it crashes the worker) is not handed
    out for ever: after DELIVERY_LIMIT returns, RabbitMQ dead-letters it."""
    import kombu

    ids = sq.enqueue(_messages(1), rabbitmq.url, queue_name, host="127.0.0.1", port=25)
    returns = 0
    with kombu.Connection(rabbitmq.url) as conn:
        got = []
        with conn.Consumer([sq._job_queue(conn, queue_name)], on_message=got.append,
                           accept=[], prefetch_count=1):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    conn.drain_events(timeout=0.5)
                except Exception:
                    if returns > sq.DELIVERY_LIMIT:
                        break
                    continue
                while got:
                    got.pop().requeue()          # as a worker that died with it
                    returns += 1
        dead = []
        with conn.Consumer([sq._queue(conn, queue_name + ".dead")], on_message=dead.append,
                           accept=[]):
            try:
                conn.drain_events(timeout=10)
            except Exception:
                pass
        assert returns == sq.DELIVERY_LIMIT + 1
        assert len(dead) == 1
        assert json.loads(dead[0].body)["id"] == ids[0]
        assert dead[0].headers["x-death"][0]["reason"] == "delivery_limit"
        dead[0].ack()


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _running(pid):
    """Alive and not a zombie (a container's init may not reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_supervisor_restarts_a_killed_worker_and_workers_stop_with_it(
        rabbitmq, queue_name, aiosmtpd_server):
    cmd = [sys.executable, "-m", "smtpstate", "worker", "--broker", rabbitmq.url,
           "--queue", queue_name, "--processes", "2", "--max-connections", "5"]
    supervisor = _spawn(cmd)
    try:
        helpers.wait_until(lambda: len(_children(supervisor.pid)) == 2, 30,
                           what="two worker processes")
        victim = _children(supervisor.pid)[0]
        os.kill(victim, signal.SIGKILL)
        helpers.wait_until(lambda: len(_children(supervisor.pid)) == 2
                           and victim not in _children(supervisor.pid), 30,
                           what="a new worker process in the killed one's place")
        ids = sq.enqueue(_messages(40), rabbitmq.url, queue_name, host=aiosmtpd_server.host,
                         port=aiosmtpd_server.port, tls="none")
        results = _collect(rabbitmq.url, queue_name, ids, timeout=60)
        counts = collections.Counter(r["job"] for r in results)
        assert set(counts) == set(ids) and max(counts.values()) == 1
        assert f"worker process {victim} was killed by signal 9" in _log(supervisor)
        # The supervisor itself killed with SIGKILL: its workers notice
        # (the parent-death signal) and stop cleanly, no orphans left.
        workers = _children(supervisor.pid)
        supervisor.kill()
        supervisor.wait()
        helpers.wait_until(lambda: not any(_running(w) for w in workers), 30,
                           what="the orphaned workers to stop")
        assert _log(supervisor).count("worker stopped after") >= 2
    finally:
        _stop(supervisor)


def test_supervisor_gives_up_on_options_the_engine_refuses(rabbitmq, queue_name):
    cmd = [sys.executable, "-m", "smtpstate", "worker", "--broker", rabbitmq.url,
           "--queue", queue_name, "--processes", "2", "--max-per-destination", "0"]
    proc = _spawn(cmd)
    assert _stop(proc, sig=0, timeout=60) == 2
    assert "max_per_destination" in _log(proc)


def test_jobs_by_mx_held_for_their_mta_sts_policy_each_get_their_result(
        rabbitmq, queue_name, dns_server, dns_origin, mx_servers):
    # The default TLS by MX looks for each domain's MTA-STS policy first;
    # messages held for it have no ticket id yet (docs/service.md), and
    # the worker must still match every result to its job.
    servers = mx_servers(["127.0.0.2"])
    dns_server.add_zone(dns_origin, ["@ MX 10 mx1", "mx1 A 127.0.0.2"])
    ids = sq.enqueue(_messages(5, rcpts=(f"bob@{dns_origin}",)), rabbitmq.url, queue_name,
                     port=servers.port)
    worker = _worker(rabbitmq.url, queue_name, "--resolver", dns_server.address,
                     "--no-dnssec")
    try:
        results = _collect(rabbitmq.url, queue_name, ids, timeout=60)
    finally:
        assert _stop(worker) == 0
    assert "a result for no job in flight" not in _log(worker)
    counts = collections.Counter(r["job"] for r in results)
    assert set(counts) == set(ids) and max(counts.values()) == 1, _log(worker)[-2000:]
    assert {r["status"] for r in results} == {"delivered"}


@pytest.mark.parametrize("broker_fixture, batch, encoding", [
    ("rabbitmq", 1, "json"), ("rabbitmq", 15, "msgpack"), ("redis_broker", 1, "json")])
def test_broker_restart_mid_run_loses_nothing_and_the_worker_goes_on(
        broker_fixture, batch, encoding, request, queue_name, aiosmtpd_factory):
    broker = request.getfixturevalue(broker_fixture)

    server = aiosmtpd_factory(_Slow(0.02))
    n = 300
    ids = sq.enqueue(_messages(n), broker.url, queue_name, host=server.host,
                     port=server.port, tls="none", batch=batch, encoding=encoding)
    # (With batches, the prefetch counts broker messages: 3 of 15 jobs.)
    worker = _worker(broker.url, queue_name, "--prefetch", str(40 // batch + 1))
    try:
        helpers.wait_until(lambda: len(server.handler.messages) >= 40, 60,
                           what="40 messages delivered")
        broker.restart(down=2)
        results = _collect(broker.url, queue_name, ids, timeout=90, quiet=3)
        assert worker.poll() is None, _log(worker)[-3000:]      # it never exited
    finally:
        code = _stop(worker)
    err = _log(worker)
    assert "lost the broker" in err, err[-3000:]
    if broker_fixture == "rabbitmq":                  # a new connection, channel, consumer
        assert "connected to the broker again" in err, err[-3000:]
    counts = collections.Counter(r["job"] for r in results)
    assert set(counts) == set(ids), err[-3000:]
    # A result whose publish or acknowledgement was in doubt when the
    # connection died is published again, marked: duplicates only among
    # marked ones.
    plain = collections.Counter(r["job"] for r in results if not r["redelivered"])
    assert max(plain.values(), default=0) <= 1, err[-3000:]
    assert {r["status"] for r in results} == {"delivered"}
    # Deliveries in flight when the connection died were finished, not
    # sent again (RabbitMQ: their requeued copies acknowledged unsent;
    # Redis: the worker's own list kept them).
    assert len(server.handler.messages) == n, (len(server.handler.messages), n)
    assert code == 0, err[-3000:]


def test_supervisor_stopped_as_it_starts_exits_cleanly(rabbitmq, queue_name):
    # A SIGTERM passed on while a worker process is still starting is kept
    # (its handler exists before the signal is let in), not a kill.
    cmd = [sys.executable, "-m", "smtpstate", "worker", "--broker", rabbitmq.url,
           "--queue", queue_name, "--processes", "2"]
    for delay in (0.0, 0.1, 0.3):
        proc = _spawn(cmd)
        helpers.wait_until(lambda: _children(proc.pid), 30, what="a worker process forked")
        time.sleep(delay)
        assert _stop(proc) == 0, (delay, _log(proc)[-2000:])


def test_supervisor_leaves_the_callers_other_children_alone(rabbitmq, queue_name):
    script = f"""
import os, signal, subprocess, sys, threading
from smtpstate.queue import run_workers
other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
threading.Timer(3.0, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
code = run_workers({rabbitmq.url!r}, 2, queue={queue_name!r})
other.wait()
sys.exit(code)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
