"""Delivery through a durable broker queue: jobs, enqueue(), Worker.

This module owns enqueue() and read_results(), and is where the queue's
public names live. The job format is smtpstate._jobs', what follows from
an attempt (retry or result) smtpstate._outcome's, the worker loop that
turns jobs into deliveries smtpstate._worker's. The brokers' sides are
smtpstate._amqp_queue (RabbitMQ through kombu) and smtpstate._redis_queue
(Redis through redis-py); forking and supervising worker processes is
smtpstate._supervisor's. Rules:

* Everything on the broker is JSON or msgpack (smtpstate._encoding; never
  pickle): a job must not be able to run code in a worker. Jobs and
  results carry a ``version``; a job of another version, or malformed in
  any way, is dead-lettered with the reason, never guessed at.
* A broker message holds one job or a batch of them; the worker carries
  it (_Carried) until every job in it is done, then settles it as one:
  what follows from all its jobs published, then it is acknowledged.
* A job is acknowledged only after what follows from it is on the broker
  (confirmed): its final result, or the job carrying its pending
  recipients into a delay queue. A worker that dies before that leaves the
  job unacknowledged, and the broker hands it to another worker.
* Temporary failures wait in the broker, not in memory: one delay queue
  per step of the retry schedule, whose messages expire (per-queue TTL)
  into the main queue through RabbitMQ's dead-lettering; on Redis, a
  sorted set the workers poll.
* The Worker drives either broker through one small interface
  (``fileno``, ``pending``, ``poll``, ``settle``, ``ack``, ``give_back``,
  ``housekeeping``, ``stop_taking``, ``resume``, ``close``):
  ``_amqp_queue.AmqpTransport`` and ``_redis_queue.RedisTransport``; it
  runs in one thread with its Engine (``Engine.step()``).

The topology for a queue named ``Q`` (every name derived from it):

==================  ======================================================
``Q``               jobs (RabbitMQ: a durable quorum queue with a
                    delivery limit; Redis: a list)
``Q.results``       one result per job that reached its end (a batch's
                    together)
``Q.dead``          jobs that could not be read, with the reason
``Q.delay.<secs>``  jobs waiting for their next attempt (RabbitMQ)
``Q.delayed``       the same on Redis: a sorted set
==================  ======================================================

docs/queue.md describes the formats, the retry schedule and the delivery
guarantee.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional

from smtpstate import _encoding, _redis_queue
from smtpstate._amqp_queue import (BATCH_CONTENT_TYPE, DELIVERY_LIMIT, JOB_CONTENT_TYPE,
                                   RESULT_CONTENT_TYPE, RESULTS_CONTENT_TYPE, _connect,
                                   _job_queue, _queue, body_bytes, content_type)
from smtpstate._confirms import BrokerRefusedError
from smtpstate._jobs import (JOB_VERSION, MAX_BATCH, RESULT_VERSION, Job, JobError,
                             _jobs_body, parse_jobs)
from smtpstate._outcome import DEFAULT_MAX_AGE, DEFAULT_SCHEDULE, Outcome, outcome
from smtpstate._worker import Worker, run_workers
from smtpstate.errors import InvalidOptionError
from smtpstate.message import Message

__all__ = [
    "JOB_VERSION",
    "RESULT_VERSION",
    "DEFAULT_SCHEDULE",
    "DEFAULT_MAX_AGE",
    "Job",
    "JobError",
    "BrokerRefusedError",
    "MAX_BATCH",
    "parse_jobs",
    "JOB_CONTENT_TYPE",
    "BATCH_CONTENT_TYPE",
    "RESULT_CONTENT_TYPE",
    "RESULTS_CONTENT_TYPE",
    "DELIVERY_LIMIT",
    "enqueue",
    "read_results",
    "Worker",
    "Outcome",
    "outcome",
    "run_workers",
]

log = logging.getLogger("smtpstate.queue")


def enqueue(messages: Iterable[Message], broker_url: str, queue: str = "smtpstate",
            host: Optional[str] = None, port: int = 25, *, batch: int = 1,
            encoding: str = "json", **options: Any) -> List[str]:
    """Publish one delivery job per message; return their job ids.

    Args:
        messages: :class:`~smtpstate.Message` objects whose data is bytes.
        broker_url: a kombu URL (``amqp://guest:guest@localhost:5672//``,
            ``redis://localhost:6379/0``).
        queue: the queue's name (the results go to ``<queue>.results``).
        host: None to route by MX (as ``Engine.submit``), else a smart host.
        port: the TCP port.
        **options: delivery options a job can carry: ``tls``, ``timeout``,
            ``helo``, ``server_hostname``, ``tls_min_version``, ``ciphers``,
            ``ciphersuites``, ``protocol``,
            ``dangerously_skip_certificate_verification``.
        batch: jobs per broker message, 1 to :data:`MAX_BATCH`. Above 1,
            up to ``batch`` jobs travel as one batch (``{"version": 1,
            "jobs": [...]}``): the broker stores, confirms and hands out
            one message for them all, and a worker publishes their results
            as one message and acknowledges the batch once every job in it
            is done. Each job keeps its own id, retries and result; but a
            batch is handed out again whole if its worker dies, so more
            jobs may be delivered twice (marked; docs/queue.md).
        encoding: ``"json"`` (readable by anything) or ``"msgpack"`` (the
            same fields, the message as raw bytes: smaller, and several
            times cheaper for the worker to read; needs the msgpack
            package). A worker answers in the encoding of each job.

    Every job is checked before the first is published. On RabbitMQ the
    broker confirms every publish before this returns (the publishes are
    sent back to back and their confirms awaited together), so a returned
    id is a job the broker has (in a durable quorum queue).

    Raises:
        JobError (a ValueError): a message or option a job cannot carry.
        InvalidOptionError: ``batch`` out of range, an unknown
            ``encoding``.
        BrokerRefusedError, kombu/amqp errors: the broker cannot be
            reached, refused a job or the connection failed (some jobs may
            be on the broker; their ids are lost with the exception, so
            enqueue again what matters, at-least-once).
    """
    if type(batch) is not int or not 1 <= batch <= MAX_BATCH:
        raise InvalidOptionError(f"batch must be an int from 1 to {MAX_BATCH} (jobs per "
                                 f"broker message), not {batch!r}")
    try:
        binary = _encoding.check(encoding) == "msgpack"
    except ValueError as e:
        raise InvalidOptionError(str(e)) from None
    jobs = [Job.from_message(m, host, port, **options) for m in messages]
    now = time.time()
    for job in jobs:
        job.first_enqueued = now            # one time per call: shared in a batch
    if batch == 1:
        bodies = [_encoding.encode(job.to_object(binary), binary) for job in jobs]
    else:
        bodies = [_jobs_body(jobs[i:i + batch], binary) for i in range(0, len(jobs), batch)]
    if _redis_queue.is_redis_url(broker_url):
        r = _redis_queue.client(broker_url)
        try:
            _redis_queue.push(r, queue, bodies)
        finally:
            r.close()
        log.info("enqueued %d job(s) on %s", len(jobs), queue)
        return [j.id for j in jobs]
    from smtpstate._confirms import ConfirmedPublisher

    conn = _connect(broker_url, confirm_publish=False)
    try:
        q = _job_queue(conn, queue)
        publisher = ConfirmedPublisher(conn, True)
        q(publisher.channel).declare()
        # The dead-letter queue exists before any job could be sent there
        # (RabbitMQ keeps a job whose dead-letter target is missing).
        _queue(conn, queue + ".dead")(publisher.channel).declare()
        kind = content_type("jobs", batch > 1, binary)
        for body in bodies:
            publisher.publish(body, q.name, kind)
            # Bounded: the broker's confirms are awaited after at most this
            # many unconfirmed publishes (memory on both sides stays small).
            if publisher.pending >= 1000:
                publisher.wait()
        publisher.wait()
        log.info("enqueued %d job(s) on %s", len(jobs), queue)
    finally:
        conn.release()
    return [j.id for j in jobs]


def read_results(broker_url: str, queue: str = "smtpstate", *, timeout: float = 1.0,
                 limit: Optional[int] = None) -> Iterator[Dict[str, Any]]:
    """Consume results from ``<queue>.results``, acknowledging each once
    yielded (the next one is read after the loop asks for it); stop after
    ``limit`` results, or when none came for ``timeout`` seconds. A result
    yielded and not yet acknowledged when the reader dies (or breaks out of
    the loop) is handed out again.

    The results of a batch (``enqueue(batch=)``) arrive as one broker
    message; they are yielded one by one, and that message is
    acknowledged after the last of them: stopping inside a batch
    (``limit``, or leaving the loop) leaves the whole batch to be read
    again."""
    if _redis_queue.is_redis_url(broker_url):
        yield from _read_redis_results(broker_url, queue, timeout, limit)
        return
    conn = _connect(broker_url)
    try:
        q = _queue(conn, queue + ".results")
        got: List[Any] = []
        # accept: kombu decodes nothing (msg.body is the raw bytes).
        consumer = conn.Consumer([q], on_message=got.append, prefetch_count=100, accept=[])
        count = 0
        with consumer:
            while limit is None or count < limit:
                if not got:
                    try:
                        conn.drain_events(timeout=timeout)
                    except socket.timeout:
                        return
                    continue
                msg = got.pop(0)
                for result in _results_of(msg.body):
                    if limit is not None and count >= limit:
                        return
                    count += 1
                    yield result
                msg.ack()
    finally:
        conn.release()


def _results_of(body: Any) -> List[Dict[str, Any]]:
    """The results in one message of ``Q.results``: one, or a batch's."""
    obj, _binary = _encoding.decode(body_bytes(body))
    if isinstance(obj, dict) and "results" in obj and "job" not in obj:
        return list(obj["results"])
    return [obj]


def _read_redis_results(broker_url: str, queue: str, timeout: float,
                        limit: Optional[int]) -> Iterator[Dict[str, Any]]:
    r = _redis_queue.client(broker_url)
    results = _redis_queue.ReliableList(r, queue + ".results")
    try:
        count = 0
        idle_since = time.monotonic()
        while limit is None or count < limit:
            results.reap()
            # One at a time: taking renews the lease, so a reader slow on
            # one result does not lose the others to another reader.
            got = results.take(1)
            if not got:
                if time.monotonic() - idle_since >= timeout:
                    return
                time.sleep(0.02)
                continue
            for result in _results_of(got[0].body):
                if limit is not None and count >= limit:
                    return
                count += 1
                yield result
            results.ack(got[0])
            idle_since = time.monotonic()
    finally:
        try:
            results.leave()
        finally:
            r.close()
