"""Batches and batched confirms in smtpstate.queue: enqueue(batch=),
worker processes taking a batch of jobs in one broker message, results of
a batch in one message, retries of a batch, a SIGKILL mid-batch, and
ConfirmedPublisher's one wait for many confirms (including a broker that
refuses), all against the private RabbitMQ node and redis-server of
brokers.py and real SMTP servers (aiosmtpd)."""

from __future__ import annotations

import collections
import json
import time

import pytest

import helpers
from helpers import RecordingHandler

from smtpstate import queue as sq
from smtpstate._confirms import BrokerRefusedError, ConfirmedPublisher
from smtpstate.errors import InvalidOptionError
from test_queue import _collect, _messages, _Slow, _stop, _worker


def _waiting(url, name):
    """Broker messages on queue ``name`` (not jobs: a batch counts once)."""
    import kombu
    with kombu.Connection(url) as conn:
        try:
            _, count, _ = sq._queue(conn, name)(conn.default_channel).queue_declare(
                passive=True)
        except conn.channel_errors:                  # not declared (yet)
            return 0
    return count


def test_confirmed_publisher_one_wait_for_many(rabbitmq, queue_name):
    conn = sq._connect(rabbitmq.url, confirm_publish=False)
    try:
        q = sq._queue(conn, queue_name)
        publisher = ConfirmedPublisher(conn, True)
        q(publisher.channel).declare()
        for i in range(300):
            publisher.publish(b"%d" % i, queue_name, "application/octet-stream")
        # (py-amqp reads the confirms that already came before each
        # publish, so some may be settled here; wait() settles the rest.)
        publisher.wait(timeout=60)
        assert publisher.pending == 0
    finally:
        conn.release()
    assert _waiting(rabbitmq.url, queue_name) == 300


def test_confirmed_publisher_raises_when_the_broker_refuses(rabbitmq, queue_name):
    import kombu
    # A classic queue of at most 2 messages that refuses (nacks) the rest.
    conn = sq._connect(rabbitmq.url, confirm_publish=False)
    try:
        q = kombu.Queue(queue_name, exchange=kombu.Exchange(""), routing_key=queue_name,
                        queue_arguments={"x-max-length": 2, "x-overflow": "reject-publish"})
        publisher = ConfirmedPublisher(conn, True)
        q(publisher.channel).declare()
        for i in range(5):
            publisher.publish(b"%d" % i, queue_name, "application/octet-stream")
        with pytest.raises(BrokerRefusedError, match=r"refused 3 published message"):
            publisher.wait(timeout=60)
        assert publisher.pending == 0
        publisher.wait(timeout=1)                  # reported once, then clear
    finally:
        conn.release()


def test_enqueue_batch_is_checked():
    for bad in (0, 1001, 2.0, "10"):
        with pytest.raises(InvalidOptionError, match="batch must be an int from 1 to 1000"):
            sq.enqueue(_messages(1), "amqp://127.0.0.1:1//", "q", batch=bad)


def test_batches_through_two_workers_one_result_each(rabbitmq, queue_name,
                                                     aiosmtpd_server):
    n = 230
    ids = sq.enqueue(_messages(n), rabbitmq.url, queue_name, host=aiosmtpd_server.host,
                     port=aiosmtpd_server.port, batch=50, tls="none")
    assert len(set(ids)) == n
    assert _waiting(rabbitmq.url, queue_name) == 5          # 50+50+50+50+30
    workers = [_worker(rabbitmq.url, queue_name) for _ in range(2)]
    try:
        results = _collect(rabbitmq.url, queue_name, ids, timeout=120)
    finally:
        codes = [_stop(w) for w in workers]
    assert codes == [0, 0]
    assert sorted(r["job"] for r in results) == sorted(ids)     # one each, no more
    assert {r["status"] for r in results} == {"delivered"}
    assert not any(r["redelivered"] for r in results)
    bodies = collections.Counter(m.data for m in aiosmtpd_server.handler.messages)
    assert sum(bodies.values()) == n and max(bodies.values()) == 1


@pytest.mark.parametrize("broker_fixture, encoding", [("rabbitmq", "msgpack"),
                                                     ("redis_broker", "json")])
def test_batch_with_a_retry_and_a_refusal(broker_fixture, encoding, request, queue_name,
                                          aiosmtpd_factory):
    broker = request.getfixturevalue(broker_fixture)

    class Mixed(RecordingHandler):
        def __init__(self):
            super().__init__()
            self.until = time.monotonic() + 1.0

        async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
            if address.startswith("grey") and time.monotonic() < self.until:
                return "451 4.7.1 greylisted, come back later"
            if address.startswith("nobody"):
                return "550 5.1.1 no such user"
            envelope.rcpt_tos.append(address)
            return "250 OK"

    server = aiosmtpd_factory(Mixed())
    msgs = (_messages(4, rcpts=("ok@example.net",), tag=b"ok")
            + _messages(3, rcpts=("grey@example.net",), tag=b"grey")
            + _messages(2, rcpts=("nobody@example.net",), tag=b"nobody"))
    ids = sq.enqueue(msgs, broker.url, queue_name, host=server.host, port=server.port,
                     batch=9, tls="none", encoding=encoding)
    worker = _worker(broker.url, queue_name, "--retry-schedule", "2")
    try:
        results = _collect(broker.url, queue_name, ids, timeout=60)
    finally:
        assert _stop(worker) == 0
    by_id = {r["job"]: r for r in results}
    assert len(results) == 9 and set(by_id) == set(ids)
    assert [by_id[i]["status"] for i in ids] == ["delivered"] * 7 + ["permfail"] * 2
    # The greylisted ones came back (as a batch of their own) after the delay.
    assert [by_id[i]["attempts"] for i in ids] == [1] * 4 + [2] * 3 + [1] * 2
    for i in ids[4:7]:
        assert by_id[i]["finished"] - by_id[i]["first_enqueued"] >= 2.0
    assert by_id[ids[7]]["recipients"][0]["reply"]["code"] == 550


def test_malformed_batch_is_dead_lettered_whole(rabbitmq, queue_name, aiosmtpd_server):
    import kombu
    good = sq.Job.from_message(_messages(1)[0], aiosmtpd_server.host,
                               aiosmtpd_server.port, tls="none")
    bad = good.to_object()
    bad["port"] = "25"
    body = json.dumps({"version": 1, "jobs": [good.to_object(), bad]}).encode()
    with pytest.raises(sq.JobError, match="job 1 of the batch: job field port must be an int"):
        sq.parse_jobs(body)
    with kombu.Connection(rabbitmq.url) as conn:
        q = sq._job_queue(conn, queue_name)
        conn.Producer().publish(body, exchange="", routing_key=queue_name, declare=[q],
                                content_type=sq.BATCH_CONTENT_TYPE,
                                content_encoding="binary")
    worker = _worker(rabbitmq.url, queue_name)
    try:
        helpers.wait_until(lambda: _waiting(rabbitmq.url, queue_name + ".dead") == 1, 60,
                           what="the batch dead-lettered")
    finally:
        assert _stop(worker) == 0
    assert list(sq.read_results(rabbitmq.url, queue_name, timeout=1)) == []
    assert aiosmtpd_server.handler.messages == []      # not half of it


def test_sigkill_mid_batch_loses_nothing(rabbitmq, queue_name, aiosmtpd_factory):
    server = aiosmtpd_factory(_Slow(0.01))
    n = 600
    ids = sq.enqueue(_messages(n), rabbitmq.url, queue_name, host=server.host,
                     port=server.port, batch=40, tls="none")
    # The victim alone first, so that it surely holds batches when killed
    # (a worker's prefetch counts broker messages, here whole batches).
    victim = _worker(rabbitmq.url, queue_name, "--prefetch", "3")
    survivor = None
    try:
        helpers.wait_until(lambda: len(server.handler.messages) >= 100, 60,
                           what="100 messages delivered")
        survivor = _worker(rabbitmq.url, queue_name, "--prefetch", "3")
        victim.kill()                                # SIGKILL: no goodbye
        victim.wait()
        results = _collect(rabbitmq.url, queue_name, ids, timeout=120)
    finally:
        _stop(victim)
        code = _stop(survivor) if survivor else None
    counts = collections.Counter(r["job"] for r in results)
    assert set(counts) == set(ids)
    plain = collections.Counter(r["job"] for r in results if not r["redelivered"])
    assert max(plain.values(), default=0) <= 1
    assert {r["status"] for r in results} == {"delivered"}
    assert any(r["redelivered"] for r in results)    # the victim's batches came back
    assert code == 0


def test_redis_msgpack_batch_enqueue_worker_results(redis_broker, queue_name, aiosmtpd_server):
    ids = sq.enqueue(_messages(25), redis_broker.url, queue_name,
                     host=aiosmtpd_server.host, port=aiosmtpd_server.port, batch=10,
                     tls="none", encoding="msgpack")
    worker = _worker(redis_broker.url, queue_name)
    try:
        results = _collect(redis_broker.url, queue_name, ids, timeout=60)
    finally:
        assert _stop(worker) == 0
    assert sorted(r["job"] for r in results) == sorted(ids)
    assert {r["status"] for r in results} == {"delivered"}
