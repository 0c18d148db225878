"""The worker of smtpstate.queue: Worker (one Engine, one broker
connection, one thread), the broker messages it carries until settled,
what it does when the broker connection is lost, and run_workers() for
several processes (forked and supervised by smtpstate._supervisor).

The brokers' sides are smtpstate._amqp_queue and smtpstate._redis_queue,
behind one small transport interface; the job format is
smtpstate._jobs', what follows from an attempt smtpstate._outcome's.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import functools
import gc
import json
import logging
import math
import os
import select
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple, Type

from smtpstate import _encoding, _redis_queue, _supervisor
from smtpstate._amqp_queue import DELIVERY_LIMIT, AmqpTransport, Published, quietly
from smtpstate._jobs import RESULT_VERSION, Job, JobError, _jobs_body, _parse, _results_body
from smtpstate._outcome import DEFAULT_MAX_AGE, DEFAULT_SCHEDULE, _decide
from smtpstate.errors import InvalidOptionError

log = logging.getLogger("smtpstate.queue")


def _shared_rates(url: Optional[str], limits: Any) -> Dict[str, float]:
    """The rates Worker(shared_limits=url) shares, checked at once."""
    if url is None:
        return {}
    from smtpstate.shared_limits import RateLimiter, shared_rates
    if not isinstance(url, str) or not url:
        raise InvalidOptionError(f"shared_limits must be a Redis URL, not {url!r}")
    RateLimiter(url).close()                    # a URL redis-py refuses, said now
    rates = shared_rates(limits)
    if not rates:
        raise InvalidOptionError(
            "shared_limits needs limits with a message_rate for a domain or '*' (the "
            "rate shared through Redis); mx: keys cannot be shared")
    return rates


def _limit_domain(job: Job) -> str:
    """The name a job's shared rate is kept under: its first pending
    recipient's domain (a job is one message, and its first recipient's
    domain stands for it), lower case; "" without one."""
    address = job.recipients[0]["address"]
    return address.rpartition("@")[2].lower() if "@" in address else ""


class _Carried:
    """A broker message a worker works on, one job or a batch of them,
    until every job in it is done; and what they came to. It is settled
    (what follows published, then acknowledged) as one."""

    __slots__ = ("handle", "identity", "body", "batch", "binary", "remaining", "redelivered",
                 "finals", "retries", "back", "dead")

    def __init__(self, handle: Any, identity: Any, body: bytes, batch: bool, binary: bool,
                 jobs: int, redelivered: bool) -> None:
        #: The transport's handle; an _Orphan once its connection died.
        self.handle = handle
        #: _identity() of its jobs (RabbitMQ only: None on Redis).
        self.identity = identity
        self.body = body
        self.batch = batch
        #: msgpack, not JSON: what follows is written the same way.
        self.binary = binary
        self.remaining = jobs
        #: It may have been delivered elsewhere too: what follows from it
        #: is published marked.
        self.redelivered = redelivered
        self.finals: List[Dict[str, Any]] = []
        self.retries: Dict[float, List[Job]] = {}
        #: Jobs of a batch never started (the worker stopped while they
        #: waited for their shared rate): put back on the job queue.
        self.back: List[Job] = []
        self.dead: List[Tuple[bytes, str]] = []

    def what_follows(self, marked: bool) -> List[Published]:
        """What to publish for it: dead letters, results (a batch's in one
        message), retries (a batch's as one batch per delay), jobs put
        back; ``marked``: all marked redelivered."""
        binary, batch = self.binary, self.batch
        out = [Published("dead", record, reason=reason) for record, reason in self.dead]
        finals = [dict(f, redelivered=True) for f in self.finals] if marked else self.finals
        if finals and batch:
            out.append(Published("results", _results_body(finals, binary),
                                 batch=True, binary=binary))
        else:
            out += [Published("results", _encoding.encode(f, binary), binary=binary)
                    for f in finals]
        for kind, delay, jobs in ([("delay", d, j) for d, j in self.retries.items()]
                                  + ([("jobs", None, self.back)] if self.back else [])):
            if marked:
                jobs = [dataclasses.replace(j, redelivered=True) for j in jobs]
            if batch:
                out.append(Published(kind, _jobs_body(jobs, binary), delay, batch=True,
                                     binary=binary))
            else:
                out += [Published(kind, _encoding.encode(j.to_object(binary), binary), delay,
                                  binary=binary) for j in jobs]
        return out


@dataclass(frozen=True)
class _Orphan:
    """The handle of a broker message whose delivery died with its
    connection."""

    identity: Any


def _identity(jobs: List[Job]) -> Tuple[Tuple[str, ...], Tuple[int, ...]]:
    """What a broker message holds, as far as delivering it goes: its
    jobs' ids and attempts. Two messages with the same identity (the
    broker's requeued copy of one, say) are the same work: once one is
    done, the other is acknowledged without a second delivery. Cheaper
    than a digest of the body (which cost as much as a tenth of a job)."""
    return tuple([j.id for j in jobs]), tuple([j.attempts for j in jobs])


#: Seconds the worker's loop waits at most in one turn when neither the
#: engine nor the broker has anything (the bound on how late a stop, a
#: Redis poll or a job held for its shared rate is seen).
_TURN_WAIT = 0.05
#: Seconds before reconnecting to a lost broker: doubling up to the most.
_RECONNECT_FIRST, _RECONNECT_MOST = 1.0, 30.0
#: Seconds a finished orphan's digest is remembered for its copy to come.
_ORPHAN_MEMORY = 600.0
#: Seconds an acknowledged job's digest is kept in case the ack is lost
#: with the connection (an AMQP ack has no confirm).
_RECENT = 30.0


class Worker:
    """Consume jobs from a queue and deliver them through one long-lived
    :class:`~smtpstate.Engine` (one worker per process; run several
    processes, or ``smtpstate worker --processes N``, for more cores).

    Args:
        broker_url: the broker's URL: ``amqp://...`` (RabbitMQ, through
            kombu) or ``redis://...`` (through redis-py).
        queue: the job queue's name.
        on_result: called with each final result (a dict in the result
            format, marked ``redelivered`` as the one the broker has)
            after it was published (on RabbitMQ: confirmed) and before its
            job is acknowledged; what it raises is logged.
        prefetch: broker messages held unacknowledged at once (the
            window that keeps the engine's connections busy; a batch of
            jobs counts once); default: twice ``max_connections``, at
            most 1000.
        schedule: seconds before each retry (the last repeats).
        max_age: seconds after the first enqueue when a job still pending
            gives up: its pending recipients become ``permfail`` 5.4.7.
        drain_timeout: on stop, seconds to wait for the deliveries in
            flight before leaving the rest unacknowledged (the broker then
            gives them to another worker).
        visibility_timeout: Redis only: the worker's lease, renewed every
            sixth of it while the worker lives; the jobs of a worker that
            died are handed to another this long after (default 30 s).
            RabbitMQ needs none: a dead worker's connection closes and the
            broker requeues its jobs at once.
        shared_limits: a Redis URL (``redis://host:6379/1``): the
            ``message_rate`` of each domain key of ``limits`` (and of
            ``"*"``, each domain on its own) holds for every worker using
            that Redis together, not per process; a job over it waits in
            the worker, unacknowledged, until its turn
            (:mod:`smtpstate.shared_limits`, docs/queue.md).
        **engine_options: for :class:`~smtpstate.Engine` (``max_connections``,
            ``max_per_destination``, ``helo``, ``resolver``, ``limits`` ...).

    Everything runs in the thread that called :meth:`run`: one loop waits
    on the Engine's descriptor and the broker's socket together, steps the
    Engine (:meth:`~smtpstate.Engine.step`) and does the broker's work
    (consume, publish, acknowledge; kombu channels are not thread-safe).
    One thread: no hand-off of each job and result between threads, which
    cost more than the delivery itself. On Redis a second thread renews
    the worker's lease.

    Raises:
        InvalidOptionError: a bad schedule, prefetch or engine option.
    """

    def __init__(self, broker_url: str, queue: str = "smtpstate", *,
                 on_result: Optional[Callable[[Dict[str, Any]], None]] = None,
                 prefetch: Optional[int] = None,
                 schedule: Sequence[float] = DEFAULT_SCHEDULE,
                 max_age: float = DEFAULT_MAX_AGE, drain_timeout: float = 60.0,
                 visibility_timeout: Optional[float] = None,
                 shared_limits: Optional[str] = None,
                 **engine_options: Any) -> None:
        schedule = tuple(float(s) for s in schedule)
        if not schedule or not all(math.isfinite(s) and 0.001 <= s <= 1e8 for s in schedule):
            raise InvalidOptionError(f"schedule must be seconds from 0.001 to 1e8, "
                                     f"not {schedule!r}")
        if not (math.isfinite(max_age) and max_age > 0):
            raise InvalidOptionError(f"max_age must be positive seconds, not {max_age!r}")
        if prefetch is None:
            prefetch = min(1000, 2 * int(engine_options.get("max_connections", 1000)))
        if type(prefetch) is not int or not 1 <= prefetch <= 65535:
            raise InvalidOptionError(f"prefetch must be an int from 1 to 65535, not {prefetch!r}")
        self.broker_url = broker_url
        self.queue = queue
        self.on_result = on_result
        self.prefetch = prefetch
        self.schedule = schedule
        self.max_age = float(max_age)
        self.drain_timeout = drain_timeout
        if visibility_timeout is not None and not (math.isfinite(visibility_timeout)
                                                   and visibility_timeout >= 1):
            raise InvalidOptionError(f"visibility_timeout must be at least 1 second, "
                                     f"not {visibility_timeout!r}")
        self.visibility_timeout = visibility_timeout
        self.shared_limits = shared_limits
        self._shared_rates = _shared_rates(shared_limits, engine_options.get("limits"))
        self._held: Optional[Any] = None
        self._engine_options = engine_options
        self._stop = threading.Event()
        # Keyed by the Ticket itself: a ticket's id is 0 while its message
        # waits for its domains' MTA-STS policies, and the Result carries
        # back the same object.
        self._inflight: Dict[Any, Tuple[_Carried, Job]] = {}
        # Broker messages taken and not settled yet; those whose jobs are
        # all done, in order, to publish.
        self._carried: Set[_Carried] = set()
        self._targets: Dict[Tuple[Optional[str], int], Tuple[Optional[str], int]] = {}
        self._complete: Deque[_Carried] = collections.deque()
        # AMQP after a lost connection, by digest of the message's body:
        # messages being worked on whose deliveries died with it (their
        # copies come back), and messages settled whose copies may come
        # back (settled since, or shortly before: an ack is not confirmed
        # and may have been lost), with when; _take acknowledges those
        # copies unsent.
        self._orphans: Dict[Any, _Carried] = {}
        self._finished_orphans: Dict[Any, float] = {}
        self._recent: Deque[Tuple[float, Any]] = collections.deque()
        self._broker_errors: Tuple[Type[BaseException], ...] = (OSError,)
        # AMQP: what a lost connection left unconfirmed, to publish again.
        self._again: List[Tuple[List[Published], Optional[Callable[[bool], None]]]] = []
        self._engine_failed = False
        self._resumed = False
        self.processed = 0

    def stop(self) -> None:
        """Stop consuming; :meth:`run` finishes what is in flight and
        returns. Safe from any thread and from a signal handler."""
        self._stop.set()

    def run(self, *, handle_signals: bool = True) -> None:
        """Consume and deliver until :meth:`stop` (or SIGTERM/SIGINT when
        ``handle_signals`` and called from the main thread)."""
        from smtpstate.engine import Engine

        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        engine = Engine(**self._engine_options)
        if self._shared_rates:
            from smtpstate.shared_limits import HeldJobs, RateLimiter
            self._held = HeldJobs(RateLimiter(str(self.shared_limits)), self._shared_rates)
        transport: Any = None
        try:
            transport = self._open()            # the first connection must work
            log.info("worker consuming %s (prefetch %d)", self.queue, self.prefetch)
            pause = _RECONNECT_FIRST
            gave_up: Optional[float] = None
            while True:
                try:
                    if transport is None:
                        transport = self._open()
                        log.warning("connected to the broker again; consuming %s",
                                    self.queue)
                    self._serve(engine, transport)
                    break
                except self._broker_errors as e:
                    log.warning("lost the broker (%s: %s); %d job(s) in flight, retrying in "
                                "%.0f s", type(e).__name__, e, len(self._inflight), pause)
                    transport = self._lost(transport)
                    # The deliveries in flight go on meanwhile, stopping or
                    # not: a stop still waits for them (up to drain_timeout),
                    # reconnecting at the same pace to settle them.
                    until = time.monotonic() + pause
                    while time.monotonic() < until and not self._engine_failed:
                        if self._stop.is_set():
                            if gave_up is None:
                                gave_up = time.monotonic() + self.drain_timeout
                            if not self._carried or time.monotonic() > gave_up:
                                break
                        self._turn(engine, None, until - time.monotonic())
                    if self._engine_failed or (self._stop.is_set() and gave_up is not None and (
                            not self._carried or time.monotonic() > gave_up)):
                        break               # unacknowledged: the broker hands them out
                    pause = min(_RECONNECT_MOST, pause * 2)
        finally:
            engine.close()
            if self._held is not None:
                self._held.limiter.close()
            if transport is not None:
                quietly(transport.close)
        if self._engine_failed:
            raise RuntimeError("the worker's engine failed (logged above); its jobs in flight "
                               "were left to the broker")
        log.info("worker stopped after %d job(s)", self.processed)

    def _open(self) -> Any:
        if _redis_queue.is_redis_url(self.broker_url):
            self._broker_errors = _redis_queue.connection_errors()
            return _redis_queue.RedisTransport(self.broker_url, self.queue,
                                               self.visibility_timeout)
        transport = AmqpTransport(self.broker_url, self.queue, self.schedule, self.prefetch)
        self._broker_errors = transport.errors
        return transport

    def _serve(self, engine: Any, transport: Any) -> None:
        """Take, deliver and settle jobs until stopped and drained."""
        if self._resumed:
            transport.resume([c.handle for c in self._carried
                              if not isinstance(c.handle, _Orphan)])
            self._resumed = False
        self._publish_again(transport)
        self._publish_complete(transport)
        while not self._stop.is_set() and not self._engine_failed:
            self._turn(engine, transport, _TURN_WAIT)
        # Stop taking jobs; what was delivered to us but not submitted
        # is given back; finish the rest.
        transport.stop_taking()
        self._give_back_held(transport)
        deadline = time.monotonic() + self.drain_timeout
        while self._carried and time.monotonic() < deadline and not self._engine_failed:
            self._turn(engine, transport, _TURN_WAIT)
        transport.housekeeping()            # the last confirms and acks
        if self._inflight:
            log.warning("%d job(s) still in flight after %.0f s: left unacknowledged "
                        "(the broker redelivers them)", len(self._inflight),
                        self.drain_timeout)

    def _publish_again(self, transport: Any) -> None:
        """After reconnecting: publish again what the lost connection left
        unconfirmed (marked redelivered: it may have reached the broker),
        and wait for it to be confirmed."""
        if not self._again:
            return
        for publish, _before_ack in self._again:
            for what in publish:
                transport.send(what)
        transport.publisher.wait()
        again, self._again = self._again, []
        for _publish, before_ack in again:
            if before_ack is not None:
                before_ack(True)
        log.warning("published again what %d job message(s) came to (results, retries), "
                    "left unconfirmed by the lost connection", len(again))

    def _lost(self, transport: Any) -> Any:
        """The broker connection failed. The deliveries in flight go on
        (an SMTP transaction cannot be taken back), but their jobs may be
        handed to another worker meanwhile: what follows from them is
        marked ``redelivered``. Returns the transport to go on with, or
        None to reconnect from scratch."""
        self._resumed = True
        if transport is None:                # a reconnection that failed
            return None
        for carried in self._carried:
            carried.redelivered = True
        if transport.survives_reconnect:
            return transport                # Redis: our taken list is still ours
        # AMQP: the broker requeued every message of the dead channel; those
        # being worked on are finished here (jobs held for their shared rate
        # included) and their requeued copies recognised (_take) and
        # acknowledged without a second delivery.
        for carried in self._carried:
            if not isinstance(carried.handle, _Orphan):
                carried.handle = _Orphan(carried.identity)
            self._orphans[carried.identity] = carried
        now = time.monotonic()
        while self._recent:
            _when, identity = self._recent.popleft()
            self._finished_orphans[identity] = now
        # Settled messages whose results (or retries) were not confirmed
        # yet: published again once connected; the broker's copies of
        # them are acknowledged without a new delivery.
        for identity, before_ack, if_lost in transport.unconfirmed():
            if identity is not None:
                self._finished_orphans[identity] = now
            self._again.append((list(if_lost()), before_ack))
        quietly(transport.close)
        return None

    # -- inside run() --------------------------------------------------------

    def _turn(self, engine: Any, transport: Any, most: float) -> None:
        """One turn of the worker's loop: wait up to ``most`` seconds
        (less when a timer of the engine is due) for the engine's
        descriptor or the broker's socket, step the engine, record what
        follows from its results; with a transport (None while
        reconnecting), take and submit new jobs, publish what the
        finished broker messages came to, and let the transport
        acknowledge what the broker confirmed. The engine runs in this
        thread: no hand-off between threads, and kombu's connection, which
        is not thread-safe, is used from one thread only."""
        fds = [engine.fileno()]
        broker_fd = transport.fileno() if transport is not None else None
        if broker_fd is not None:
            fds.append(broker_fd)
        if transport is not None and (self._complete or transport.pending()):
            wait = 0.0                      # something to publish or read now
        else:
            due = engine.next_deadline()
            wait = most if due is None else max(0.0, min(most, due))
        readable = select.select(fds, [], [], wait)[0] if wait > 0 else fds
        try:
            results = engine.step()
        except Exception:                                     # a bug: say so and stop
            log.exception("the engine's loop failed; the worker stops")
            self._engine_failed = True
            self._stop.set()
            return
        if results:
            self._record(results)
        if transport is None:
            return
        if broker_fd is None or broker_fd in readable or transport.pending():
            self._take(engine, transport)
        self._release_held(engine)
        self._publish_complete(transport)
        transport.housekeeping()

    def _take(self, engine: Any, transport: Any) -> None:
        """Take what the broker has for us (up to the prefetch window) and
        submit it."""
        deliveries = transport.poll(0, self.prefetch - len(self._carried))
        for body, redelivered, handle in deliveries:
            returns = getattr(handle, "returns", 0)
            if returns > DELIVERY_LIMIT:
                self._dead(transport, handle, body,
                           f"handed out {returns + 1} times without being acknowledged (each "
                           "worker taking it died): not handed out again")
                continue
            try:
                jobs, batch, binary = _parse(body)
            except JobError as e:
                self._dead(transport, handle, body, str(e))
                continue
            except Exception as e:          # a defect of ours: that message, not the worker
                log.exception("reading a job failed")
                self._dead(transport, handle, body, f"the job could not be read: {e!r}")
                continue
            identity = None if transport.survives_reconnect else _identity(jobs)
            if identity is not None and self._copy_of_orphan(transport, identity, handle):
                continue
            if self._stop.is_set():
                transport.give_back(handle)
                continue
            carried = _Carried(handle, identity, body, batch, binary, len(jobs), redelivered)
            self._carried.add(carried)
            held = self._held
            if held is not None:
                # Over its shared rate, a job waits: _release_held submits it.
                jobs = [job for job in jobs
                        if held.admit(_limit_domain(job), (carried, job))]
            self._submit(engine, carried, jobs)

    def _copy_of_orphan(self, transport: Any, identity: Any, handle: Any) -> bool:
        """True when the message of ``identity`` is the broker's copy of
        one this worker was working on when its connection died: the copy
        takes the place of the dead delivery (acknowledged once settled)
        or, if that is settled already, is acknowledged at once."""
        if not self._orphans and not self._finished_orphans:
            return False
        carried = self._orphans.pop(identity, None)
        if carried is not None and carried in self._carried:
            carried.handle = handle
            return True
        if self._finished_orphans.pop(identity, None) is not None:
            log.info("a job finished before the broker connection was lost came back: "
                     "acknowledged, not delivered again")
            transport.ack(handle)
            return True
        now = time.monotonic()
        for old, when in list(self._finished_orphans.items()):
            if now - when > _ORPHAN_MEMORY:
                del self._finished_orphans[old]
        return False

    def _submit(self, engine: Any, carried: _Carried, jobs: List[Job]) -> None:
        """Submit ``jobs`` of ``carried`` to the engine (one loop: this is
        the path of every job)."""
        submit, inflight, targets = engine.submit, self._inflight, self._targets
        if len(targets) > 1000:
            targets.clear()
        for job in jobs:
            message = job.__dict__.get("_message") or job.message()
            # The same host and port objects for the same destination: the
            # engine's shortcut for a repeated destination compares identity.
            target = (job.host, job.port)
            host, port = targets.setdefault(target, target)
            try:
                inflight[submit(message, host, port, **job.options)] = (carried, job)
            except (ValueError, TypeError) as e:
                self._job_dead(carried, job, f"the engine refused the job: {e}")
            except Exception as e:          # a defect of ours: that job, not the worker
                log.exception("submitting job %s failed", job.id)
                self._job_dead(carried, job, f"the engine failed on the job: {e!r}")

    def _release_held(self, engine: Any) -> None:
        # Jobs whose shared rate lets them go now. The loop comes here at
        # least every _TURN_WAIT, which bounds how late one goes.
        if self._held is not None:
            for carried, job in self._held.due():
                self._submit(engine, carried, [job])

    def _give_back_held(self, transport: Any) -> None:
        # Stopping: jobs held for their shared rate were never started;
        # give them back for another worker rather than wait their turn: a
        # message of one job as it is, a batch's jobs on the job queue when
        # the batch is settled (a broker message cannot be given back in
        # part).
        if self._held is None:
            return
        for carried, job in self._held.drain():
            if carried.batch:
                carried.back.append(job)
                self._job_done(carried)
            elif isinstance(carried.handle, _Orphan):
                self._carried.discard(carried)   # the broker has it; its copy comes back
                self._orphans.pop(carried.identity, None)
            else:
                self._carried.discard(carried)
                transport.give_back(carried.handle)
        self._publish_complete(transport)

    def _dead_record(self, body: bytes, reason: str) -> bytes:
        return json.dumps({"version": RESULT_VERSION, "reason": reason, "queue": self.queue,
                           "time": time.time(),
                           "body": base64.b64encode(body).decode("ascii")}).encode()

    def _dead(self, transport: Any, handle: Any, body: bytes, reason: str) -> None:
        """Dead-letter a whole broker message (it could not be read)."""
        log.warning("job dead-lettered to %s.dead: %s", self.queue, reason)
        dead = [Published("dead", self._dead_record(body, reason), reason=reason)]
        transport.settle(handle, dead, lambda: dead, None, None)

    def _job_dead(self, carried: _Carried, job: Job, reason: str) -> None:
        """Dead-letter one job of ``carried`` with what follows from it."""
        log.warning("job %s dead-lettered to %s.dead: %s", job.id, self.queue, reason)
        body = carried.body
        if carried.batch:
            try:
                # In the batch's encoding: a msgpack job may hold what JSON
                # cannot (bytes in a settled entry).
                body = _encoding.encode(job.to_object(carried.binary), carried.binary)
            except Exception as e:          # still dead-lettered, with the whole batch
                log.exception("writing job %s for the dead letters failed", job.id)
                reason = f"{reason} (the job could not be written alone: {e!r})"
        carried.dead.append((self._dead_record(body, reason), reason))
        self._job_done(carried)

    def _job_done(self, carried: _Carried) -> None:
        carried.remaining -= 1
        if carried.remaining == 0:
            self._complete.append(carried)

    def _record(self, results: List[Any]) -> None:
        """Decide what follows from each result of the engine; a broker
        message whose jobs are all done joins those to publish."""
        pop, schedule, max_age = self._inflight.pop, self.schedule, self.max_age
        for result in results:
            entry = pop(result.ticket, None) if result.ticket else None
            if entry is None:
                log.error("a result for no job in flight: %s", result)
                continue
            carried, job = entry
            self.processed += 1
            try:
                retry, delay, final = _decide(job, result, schedule, max_age,
                                              carried.redelivered)
            except Exception as e:
                # A defect of ours deciding what follows: dead-letter the job
                # (its attempt is over, maybe delivered) rather than die and
                # have it delivered again by each worker taking it.
                log.exception("settling job %s failed", job.id)
                self._job_dead(carried, job, f"settling the job after attempt "
                               f"{job.attempts + 1} failed ({e!r}): it may have been "
                               f"delivered; not retried")
                continue
            if retry is not None:
                carried.retries.setdefault(delay, []).append(retry)
                log.info("job %s: %d recipient(s) retried in %g s (attempt %d)", job.id,
                         len(retry.recipients), delay, retry.attempts)
            else:
                assert final is not None
                carried.finals.append(final)
            self._job_done(carried)

    def _publish_complete(self, transport: Any) -> None:
        while self._complete:
            carried = self._complete[0]
            try:
                self._publish(transport, carried)
            except self._broker_errors:
                # Some of it may be on the broker already: when it is
                # published again (after reconnecting), it is marked.
                carried.redelivered = True
                raise
            self._complete.popleft()

    def _publish(self, transport: Any, carried: _Carried) -> None:
        """Publish what follows from a broker message whose jobs are all
        done, and acknowledge it (once confirmed, on RabbitMQ)."""
        orphan = isinstance(carried.handle, _Orphan)
        handle = None if orphan else carried.handle
        on_result = self.on_result

        def call_on_result(marked: bool) -> None:
            # marked: what was published in the end is the marked variant
            # (published again after a lost connection, or on Redis after a
            # lost lease): the callback gets what the broker has.
            assert on_result is not None
            for final in carried.finals:
                if marked or carried.redelivered:
                    final = dict(final, redelivered=True)
                try:
                    on_result(final)
                except Exception:
                    log.exception("on_result raised for job %s (ignored)", final["job"])
        transport.settle(handle, carried.what_follows(carried.redelivered),
                         functools.partial(carried.what_follows, True),
                         call_on_result if on_result is not None and carried.finals else None,
                         carried.identity)
        self._carried.discard(carried)
        if orphan:
            # Its copy, when the broker hands it to us, is acknowledged
            # without a second delivery (_copy_of_orphan).
            self._orphans.pop(carried.identity, None)
            self._finished_orphans[carried.identity] = time.monotonic()
        elif carried.identity is not None:
            self._remember(carried.identity)

    def _remember(self, identity: Any) -> None:
        """Keep the identity of a message just acknowledged on AMQP for
        _RECENT seconds: if the connection dies, its ack may not have
        reached the broker, which then hands it out again."""
        now = time.monotonic()
        self._recent.append((now, identity))
        while self._recent and now - self._recent[0][0] > _RECENT:
            self._recent.popleft()


#: The cyclic garbage collector's first threshold in a worker process
#: (Python's default: 700 allocations).
_GC_THRESHOLD = 100_000


def _process_for_workers() -> None:
    """Tune this process for a worker that is all it runs. What a job
    allocates (its decoded dicts, its Message, its result) is freed by
    reference counting; but at the default threshold the cyclic collector
    runs every 700 allocations, and its passes over the thousands of jobs
    held in flight cost about 15 us per job, more than half the delivery
    itself (benchmarks/bench_queue.py). The objects alive at start are
    moved out of its sight (gc.freeze) and it runs every 100,000
    allocations instead (as cheap as not at all, measured; memory is not
    the worry: those objects die young). Not done by Worker.run(): a library call must
    not retune its caller's process."""
    gc.freeze()
    gc.set_threshold(_GC_THRESHOLD, *gc.get_threshold()[1:])


def _worker_process(broker_url: str, worker_options: Dict[str, Any], parent: int) -> None:
    """The body of a forked worker process (_supervisor.supervise), entered
    with SIGTERM and SIGINT blocked; never returns."""
    code = 1
    try:
        _supervisor.die_with_parent()
        if os.getppid() != parent:          # the parent died before prctl
            os._exit(0)
        try:
            worker = Worker(broker_url, **worker_options)
            _process_for_workers()
            # A stop asked for while the child starts is kept, not lost: the
            # handlers exist before the signals are let in.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: worker.stop())
            _supervisor.unblock_stop_signals()
            # The engine's options are checked when run() creates it.
            worker.run()
        except InvalidOptionError as e:
            log.error("worker options refused: %s", e)
            os._exit(_supervisor.EXIT_BAD_OPTIONS)
        code = 0
    except BaseException:
        log.exception("worker process failed")
    finally:
        os._exit(code)


def run_workers(broker_url: str, processes: int, **worker_options: Any) -> int:
    """Run and supervise ``processes`` Worker processes (forked children)
    until SIGTERM or SIGINT, which is passed on to each; return 0 when all
    stopped cleanly. A child that dies (killed, crashed) is started again,
    after 1 s, doubling up to 60 s while it keeps dying young; its jobs
    went back to the broker when it died. With one process, the worker
    runs in this one (a process manager restarts it).

    Raises:
        InvalidOptionError: worker options refused (checked here first,
            then by each child for the engine's).
    """
    if processes <= 1:
        worker = Worker(broker_url, **worker_options)
        _process_for_workers()
        worker.run()
        return 0
    Worker(broker_url, **worker_options)              # refuse bad options up front
    return _supervisor.supervise(
        processes, functools.partial(_worker_process, broker_url, worker_options))
