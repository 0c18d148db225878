"""smtpstate.celery: the delivery task in real ``celery worker`` processes
(prefork, two children) on a private RabbitMQ node (brokers.py), delivering
to a real aiosmtpd; results through Celery's rpc:// backend.
"""

from __future__ import annotations

import collections
import os
import re
import signal

import pytest

import helpers
from helpers import RecordingHandler

celery = helpers.import_or_missing("celery")

import smtpstate                                        # noqa: E402
import smtpstate.celery as sc                           # noqa: E402
from smtpstate import InvalidOptionError               # noqa: E402
from smtpstate.queue import JobError                   # noqa: E402

import celery_worker_app                                # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

RECORD_KEYS = {"version", "job", "status", "final", "attempts", "first_enqueued", "finished",
               "reply", "reason", "recipients", "redelivered", "needs_decision"}


def _messages(n, rcpts=("bob@example.net",), tag="m"):
    return [smtpstate.Message("alice@example.org", list(rcpts),
                              b"Subject: %s %d\n\nbody\n" % (tag.encode(), i))
            for i in range(n)]


@pytest.fixture
def worker_env(rabbitmq, queue_name):
    return {"SMTPSTATE_TEST_BROKER": rabbitmq.url, "SMTPSTATE_TEST_QUEUE": queue_name}


@pytest.fixture
def client(rabbitmq, queue_name):
    """The app and task, as the sending side has them."""
    app, task = celery_worker_app.make_app(rabbitmq.url, queue_name)
    yield task
    app.close()


@pytest.fixture
def worker(worker_env):
    w = celery_worker_app.CeleryWorker("celery_worker_app", HERE, worker_env).wait_ready()
    yield w
    w.stop()


def _engine_pids(log, what="started"):
    return re.findall(r"engine %s in process (\d+)" % what, log)


# ---------------------------------------------------------------------------
# Registration (no broker)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("conf, named", [
    ({"accept_content": ["json", "pickle"]}, "accept_content"),
    ({"task_serializer": "pickle"}, "task_serializer"),
    ({"result_serializer": "pickle"}, "result_serializer"),
    ({"result_accept_content": ["application/x-python-serialize"]}, "result_accept_content"),
])
def test_an_app_that_allows_pickle_is_refused(conf, named):
    app = celery.Celery("pickly", broker="memory://")
    app.conf.update(conf)
    with pytest.raises(InvalidOptionError) as e:
        sc.register(app)
    assert "allows pickle" in str(e.value) and named in str(e.value)
    assert "accept_content=['json']" in str(e.value)          # what to do instead
    assert sc.DEFAULT_TASK_NAME not in app.tasks


def test_registered_task_acks_late_and_is_json_only():
    app = celery.Celery("plain", broker="memory://")
    task = sc.register(app, "x.deliver", max_connections=5)
    assert task.name == "x.deliver" and "x.deliver" in app.tasks
    assert task.acks_late and task.reject_on_worker_lost and task.serializer == "json"
    with pytest.raises(InvalidOptionError, match="max_connections"):
        sc.register(app, "x.bad", max_connections=0)
    with pytest.raises(InvalidOptionError, match="schedule"):
        sc.register(app, "x.bad", schedule=())
    with pytest.raises(JobError, match="cannot travel"):
        sc.send_batch(task, _messages(1), "127.0.0.1", auth=("u", "p"))


# ---------------------------------------------------------------------------
# Real workers on RabbitMQ
# ---------------------------------------------------------------------------


def test_batches_through_two_processes_each_message_once(worker, client, aiosmtpd_server):
    batches = [sc.send_batch(client, _messages(10, tag=f"b{b}"), aiosmtpd_server.host,
                             aiosmtpd_server.port, tls="none") for b in range(5)]
    records = []
    for r in batches:
        records.extend(sc.collect(r, timeout=60))
    assert len(records) == 50
    assert len({r["job"] for r in records}) == 50
    for rec in records:
        assert set(rec) == RECORD_KEYS, rec
        assert (rec["version"], rec["status"], rec["final"], rec["attempts"]) == \
            (1, "delivered", True, 1)
        assert not rec["redelivered"] and not rec["needs_decision"]
        (rcpt,) = rec["recipients"]
        assert (rcpt["address"], rcpt["status"], rcpt["reply"]["code"]) == \
            ("bob@example.net", "delivered", 250)
    # Each message reached the server exactly once.
    subjects = collections.Counter(m.data.split(b"\n", 1)[0] for m in aiosmtpd_server.messages)
    assert len(subjects) == 50 and set(subjects.values()) == {1}
    # One Engine per worker process, made as the process started, not per
    # task: two "started" lines for two processes, and every task's
    # messages went over the connections those Engines keep (one per
    # destination each, idle for up to 120 s): at most two connections
    # for five tasks, where an Engine per task would have opened five.
    log = worker.log()
    started = _engine_pids(log)
    assert len(started) == 2 and len(set(started)) == 2, log[-3000:]
    assert 1 <= len(aiosmtpd_server.connections) <= 2, aiosmtpd_server.connections
    # ... and each is closed as its process stops.
    assert worker.stop() == 0
    assert sorted(_engine_pids(worker.log(), "closed")) == sorted(started), worker.log()[-3000:]


def test_tempfail_is_sent_again_after_the_schedule_and_delivered(worker, client,
                                                                 aiosmtpd_factory):
    class GreylistFirst(RecordingHandler):
        """451 for the first five RCPTs to grey@, then 250."""

        def __init__(self):
            super().__init__()
            self.refused = 0

        async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
            if address.startswith("grey") and self.refused < 5:
                self.refused += 1
                return "451 4.7.1 greylisted, come back later"
            envelope.rcpt_tos.append(address)
            return "250 OK"

    handler = GreylistFirst()
    server = aiosmtpd_factory(handler)
    first = sc.send_batch(client, _messages(5, rcpts=("ok@example.net", "grey@example.net")),
                          server.host, server.port, tls="none")
    value = first.get(timeout=60)
    # Nothing final yet: every job goes on in one new task, 2 s later.
    assert value["results"] == []
    assert len(value["retried"]) == 5
    assert {(e["countdown"], e["attempts"], e["pending"]) for e in value["retried"]} == \
        {(2.0, 1, 1)}
    assert len({e["task"] for e in value["retried"]}) == 1
    records = sc.collect(first, timeout=60)
    assert handler.refused == 5
    assert len(records) == 5 and len({r["job"] for r in records}) == 5
    assert {r["job"] for r in records} == {e["job"] for e in value["retried"]}
    for r in records:
        assert (r["status"], r["attempts"], r["final"]) == ("delivered", 2, True), r
        ok, grey = r["recipients"]
        assert (ok["address"], ok["attempts"]) == ("ok@example.net", 1)
        assert (grey["address"], grey["status"], grey["attempts"]) == \
            ("grey@example.net", "delivered", 2)
        assert r["finished"] - r["first_enqueued"] >= 2.0
    # The first attempt delivered to ok@ only, the retry to grey@ only.
    rcpt_sets = sorted(tuple(m.rcpt_tos) for m in handler.messages)
    assert rcpt_sets == [("grey@example.net",)] * 5 + [("ok@example.net",)] * 5
    # on_result saw each final record in the worker, from the retry task.
    seen = re.findall(r"on_result: job (\S+) (\w+) after (\d+) attempt", worker.log())
    assert sorted(seen) == sorted((r["job"], "delivered", "2") for r in records)


def test_worker_process_killed_mid_task_redelivers_it_marked(worker, client,
                                                              aiosmtpd_factory):
    class Slow(RecordingHandler):
        async def handle_DATA(self, server, session, envelope):
            import asyncio
            await asyncio.sleep(0.3)
            return await super().handle_DATA(server, session, envelope)

    server = aiosmtpd_factory(Slow())
    # One connection per Engine and 0.3 s per message: the task runs for
    # about 3 s, long enough to kill its process in the middle.
    result = sc.send_batch(client, _messages(10), server.host, server.port, tls="none")
    helpers.wait_until(lambda: len(server.messages) >= 2, 30, what="2 messages delivered")
    # SIGKILL both pool processes (the one in the middle of the task among
    # them): no goodbye, the task unacknowledged.
    children = [int(p) for p in _engine_pids(worker.log())]
    assert len(children) == 2
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    records = sc.collect(result, timeout=60)
    assert len(records) == 10 and {r["status"] for r in records} == {"delivered"}
    # The task came back from the broker (redelivered), and its results
    # say so: some of its messages may have been delivered twice.
    assert all(r["redelivered"] for r in records), records
    subjects = {m.data.split(b"\n", 1)[0] for m in server.messages}
    assert len(subjects) == 10
    # The unit is the batch: what went out before the kill went out again.
    assert len(server.messages) >= 12



@pytest.mark.parametrize("pool, at_start", [("solo", True), ("threads", False)])
def test_one_engine_in_the_worker_process_without_prefork(pool, at_start, worker_env, client,
                                                          aiosmtpd_server):
    # solo: Celery sends worker_process_init in the worker's own process,
    # which makes the Engine as it starts. threads: no such signal; the
    # first task makes it, and the tasks running at once in other threads
    # share it. Either way, one Engine, closed at worker shutdown.
    w = celery_worker_app.CeleryWorker("celery_worker_app", HERE, worker_env, pool=pool,
                                       concurrency=2).wait_ready()
    try:
        assert _engine_pids(w.log()) == ([str(w.proc.pid)] if at_start else [])
        sent = [sc.send_batch(client, _messages(4, tag=f"s{b}"), aiosmtpd_server.host,
                              aiosmtpd_server.port, tls="none") for b in range(3)]
        records = [rec for r in sent for rec in sc.collect(r, timeout=60)]
    finally:
        code = w.stop()
    assert code == 0
    assert [r["status"] for r in records] == ["delivered"] * 12
    assert len(aiosmtpd_server.messages) == 12
    assert _engine_pids(w.log()) == [str(w.proc.pid)], w.log()[-3000:]
    assert _engine_pids(w.log(), "closed") == [str(w.proc.pid)], w.log()[-3000:]
    assert len(aiosmtpd_server.connections) == 1
