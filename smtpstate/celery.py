"""Delivery from Celery: a task that sends a batch of jobs through one
long-lived :class:`~smtpstate.Engine` per Celery worker process.

For teams that already run Celery: :func:`register` binds the task to
their app, :func:`send_batch` sends a batch of messages to it, and
:func:`collect` gathers the final results, following the retries. Rules:

* The task's arguments are jobs in the format of :mod:`smtpstate.queue`
  (docs/queue.md), as JSON objects; the app must use the JSON serializer
  and must not accept pickle, which would let whoever can publish to the
  broker run code in the workers (:func:`register` refuses such an app).
* One Engine per worker process, made when the process starts (Celery's
  ``worker_process_init`` for the prefork pool; at the first task with
  the solo and threads pools), closed when it stops, never per task, so
  that connections stay pooled from one task to the next. An Engine made
  in another process (inherited through a fork) is never used: its
  sockets and epoll are shared with its owner.
* The Engine is driven by ``run(forever=True)`` in a thread of its own,
  as the broker worker does, so that idle connections get QUIT on time
  between tasks; a task submits its jobs and waits for their tickets.
* What follows from an attempt is decided by :func:`smtpstate.queue.outcome`,
  as in the broker worker: final records are the task's return value (and
  go to ``on_result``); recipients that failed temporarily are sent again
  as a new task, ``countdown`` the schedule's next step. ``unknown`` is
  final, never retried.
* ``acks_late`` and ``reject_on_worker_lost``: a worker killed in the
  middle of a task leaves it on the broker for another (at least once).

The module is named after the package it serves; ``import celery`` in it is
Celery itself (absolute imports).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, Optional,
                    Sequence, Tuple)

from smtpstate.errors import InvalidOptionError
from smtpstate.message import Message
from smtpstate.queue import DEFAULT_MAX_AGE, DEFAULT_SCHEDULE, Job, JobError, outcome
from smtpstate.result import not_attempted, unsent_result

if TYPE_CHECKING:
    # Celery ships no type information: these names are Any to a checker,
    # and the annotations say what is meant.
    from celery import Celery, Task  # type: ignore[import-untyped]
    from celery.result import AsyncResult  # type: ignore[import-untyped]

__all__ = ["DEFAULT_TASK_NAME", "TASK_RESULT_VERSION", "register", "send_batch", "collect"]

log = logging.getLogger("smtpstate.celery")

DEFAULT_TASK_NAME = "smtpstate.deliver"
#: The version of the task's return value (``{"version", "results", "retried"}``).
TASK_RESULT_VERSION = 1

_PICKLE = ("pickle", "application/x-python-serialize")


def _celery() -> Any:
    try:
        import celery
    except ImportError:
        raise ImportError("smtpstate.celery needs Celery: pip install 'smtpstate[celery]'") \
            from None
    return celery


def _allows_pickle(app: Any) -> List[str]:
    """The settings of ``app`` that let pickle in, as ``name=value``."""
    conf = app.conf
    found = []
    for key in ("task_serializer", "result_serializer"):
        value = conf.get(key)
        if isinstance(value, str) and value.lower() in _PICKLE:
            found.append(f"{key}={value!r}")
    for key in ("accept_content", "result_accept_content"):
        value = conf.get(key)
        if isinstance(value, str):
            value = [value]
        if value and any(isinstance(v, str) and v.lower() in _PICKLE for v in value):
            found.append(f"{key}={list(value)!r}")
    return found


def _refuse_pickle(app: Any) -> None:
    found = _allows_pickle(app)
    if found:
        raise InvalidOptionError(
            f"the Celery app {app.main!r} allows pickle ({', '.join(found)}): whoever can "
            "publish to its broker could run code in the workers that deliver mail. Set "
            "task_serializer='json', result_serializer='json', accept_content=['json'] "
            "and result_accept_content=['json'] (or leave them unset: Celery's defaults "
            "are JSON) before calling smtpstate.celery.register()")


class _ProcessEngine:
    """The Engine of one process, and the thread that drives it."""

    def __init__(self, engine_options: Mapping[str, Any], task_name: str) -> None:
        from smtpstate.engine import Engine

        self.pid = os.getpid()
        self.engine = Engine(**engine_options)
        # Notified after each result: ticket.result is set before run()
        # yields it, so a task waiting on its tickets cannot miss one.
        self._cond = threading.Condition()
        self.failed: Optional[str] = None
        self._thread = threading.Thread(target=self._drive, daemon=True,
                                        name="smtpstate-celery-engine")
        self._thread.start()
        log.info("%s: engine started in process %d", task_name, self.pid)

    def _drive(self) -> None:
        try:
            for _ in self.engine.run(forever=True):
                with self._cond:
                    self._cond.notify_all()
        except Exception as e:                          # a bug: the tasks must hear it
            log.exception("the engine's loop failed in process %d", self.pid)
            self.failed = f"{type(e).__name__}: {e}"
        with self._cond:
            if self.failed is None and not self.engine.closed:
                self.failed = "the engine's loop stopped"
            self._cond.notify_all()

    def deliver(self, jobs: Sequence[Job]) -> List[Tuple[Job, Any]]:
        """Submit every job, wait until each has its result; return the
        (job, Result) pairs in the order of ``jobs``."""
        from smtpstate.engine import Ticket

        pairs: List[Tuple[Job, Any]] = []
        tickets = []
        for job in jobs:
            message = job.message()
            try:
                ticket = self.engine.submit(message, job.host, job.port, **job.options)
            except (ValueError, TypeError) as e:
                # What the job format lets through but the engine refuses
                # (an option that does not fit the route): final, as a
                # retry would be refused the same way.
                log.warning("job %s refused by the engine: %s", job.id, e)
                pairs.append((job, unsent_result(message, None, "permfail",
                                                 not_attempted(f"the engine refused it: {e}"))))
                continue
            pairs.append((job, ticket))
            tickets.append(ticket)
        with self._cond:
            while not all(t.done for t in tickets):
                if self.failed is not None:
                    raise RuntimeError(f"smtpstate's engine in worker process {self.pid} "
                                       f"failed ({self.failed}); the task is left to Celery")
                # The timeout only bounds how late a dead driver is noticed.
                self._cond.wait(5.0)
        return [(job, r.result if isinstance(r, Ticket) else r) for job, r in pairs]

    def close(self) -> None:
        # close() from another thread stops run(forever=True), waits for
        # it to leave C, then closes every connection with QUIT.
        self.engine.close()
        self._thread.join(30)
        log.info("engine closed in process %d", self.pid)


class _Binding:
    """What one :func:`register` call keeps: the options and, per process,
    the Engine."""

    def __init__(self, app: Any, name: str, engine_options: Dict[str, Any],
                 schedule: Tuple[float, ...], max_age: float,
                 on_result: Optional[Callable[[Dict[str, Any]], None]]) -> None:
        self.app = app
        self.name = name
        self.engine_options = engine_options
        self.schedule = schedule
        self.max_age = max_age
        self.on_result = on_result
        self._lock = threading.Lock()
        self._current: Optional[_ProcessEngine] = None
        # Engines inherited through a fork: kept referenced and never
        # touched, because closing one (even by garbage collection) would
        # send QUIT on sockets its owner process is still using.
        self._inherited: List[_ProcessEngine] = []

    def engine(self) -> _ProcessEngine:
        """This process's Engine, made now if it has none yet."""
        with self._lock:
            current = self._current
            if current is not None and current.pid == os.getpid() and current.failed is None:
                return current
            if current is not None and current.pid != os.getpid():
                self._inherited.append(current)
            elif current is not None:
                current.close()               # its loop failed: a fresh one
            _refuse_pickle(self.app)            # the settings may have changed since
            self._current = _ProcessEngine(self.engine_options, self.name)
            return self._current

    def start(self, **_: Any) -> None:
        # Raising here would fail the pool process as it starts, and Celery
        # would start another, and another: log it, and let the first task
        # try again and fail with the reason, where Celery records it.
        try:
            self.engine()
        except Exception:
            log.exception("%s: no engine in process %d; tasks will retry making it",
                          self.name, os.getpid())

    def close(self, **_: Any) -> None:
        with self._lock:
            current, self._current = self._current, None
        if current is None:
            return
        if current.pid != os.getpid():
            self._inherited.append(current)
            return
        try:
            current.close()
        except Exception:
            log.exception("closing the engine of process %d failed", current.pid)

    def run(self, task: Any, raw_jobs: Any) -> Dict[str, Any]:
        """The task's body."""
        if not isinstance(raw_jobs, list) or not raw_jobs:
            raise JobError(f"{self.name} takes a non-empty list of jobs (JSON objects in "
                           f"the format of smtpstate.queue), not {type(raw_jobs).__name__}")
        # Every job is read before any is delivered: a malformed one fails
        # the whole task (Celery records why) rather than half of it.
        jobs = [Job.from_json(json.dumps(raw) if isinstance(raw, dict) else raw)
                for raw in raw_jobs]
        request = task.request
        delivery_info = request.delivery_info or {}
        redelivered = bool(delivery_info.get("redelivered"))
        finals: List[Dict[str, Any]] = []
        later: Dict[float, List[Job]] = {}
        for job, result in self.engine().deliver(jobs):
            step = outcome(job, result, schedule=self.schedule, max_age=self.max_age,
                           redelivered=redelivered)
            if step.retry is not None:
                later.setdefault(step.delay, []).append(step.retry)
            else:
                assert step.final is not None
                finals.append(step.final)
        retried = []
        for delay, retry_jobs in sorted(later.items()):
            options: Dict[str, Any] = {"countdown": delay, "serializer": "json"}
            # The retry goes where this task came from, and its result to
            # whoever waits for this one's (rpc:// answers to reply_to).
            if delivery_info.get("routing_key"):
                options["exchange"] = delivery_info.get("exchange") or ""
                options["routing_key"] = delivery_info["routing_key"]
            if request.reply_to:
                options["reply_to"] = request.reply_to
            sent = task.apply_async(args=[[json.loads(j.to_json()) for j in retry_jobs]],
                                    **options)
            for j in retry_jobs:
                retried.append({"job": j.id, "task": sent.id, "countdown": delay,
                                "attempts": j.attempts, "pending": len(j.recipients)})
            log.info("%d job(s) retried in %g s as task %s", len(retry_jobs), delay, sent.id)
        if self.on_result is not None:
            for record in finals:
                try:
                    self.on_result(record)
                except Exception:
                    log.exception("on_result raised for job %s (ignored)", record["job"])
        return {"version": TASK_RESULT_VERSION, "results": finals, "retried": retried}


def register(app: "Celery", name: str = DEFAULT_TASK_NAME, *,
             schedule: Sequence[float] = DEFAULT_SCHEDULE, max_age: float = DEFAULT_MAX_AGE,
             on_result: Optional[Callable[[Dict[str, Any]], None]] = None,
             **engine_options: Any) -> "Task":
    """Register the delivery task on ``app`` and return it.

    Args:
        app: the Celery app. Its serializers must be JSON (Celery's
            default) and its ``accept_content`` must not include pickle;
            configure it before this call.
        name: the task's name.
        schedule: seconds before each retry of recipients that failed
            temporarily (the last step repeats), as ``smtpstate.queue``.
        max_age: seconds after a job was first sent when recipients still
            failing expire (``permfail`` 5.4.7).
        on_result: called in the worker with each final result record
            (docs/queue.md), before the task returns; what it raises is
            logged and ignored.
        **engine_options: for :class:`~smtpstate.Engine` (``max_connections``,
            ``max_per_destination``, ``idle_timeout``, ``helo``, ``resolver``,
            ``limits`` ...): the Engine each worker process makes. Credentials
            and TLS files belong here, not in jobs.

    The task takes one argument, a list of jobs (JSON objects in the job
    format of docs/queue.md; :func:`send_batch` makes them), delivers them
    through the worker process's Engine and returns
    ``{"version": 1, "results": [...], "retried": [...]}``: the final
    result records of the jobs that reached their end, and for each job
    sent again ``{"job", "task", "countdown", "attempts", "pending"}``
    (``task``: the id of the task that carries it on). :func:`collect`
    follows them.

    Raises:
        InvalidOptionError: the app allows pickle, a bad schedule or
            max_age, or an Engine option the Engine refuses (checked by
            making one Engine here and closing it at once).
        ImportError: Celery is not installed.
    """
    celery = _celery()
    if not isinstance(app, celery.Celery):
        raise InvalidOptionError(f"register() takes a celery.Celery app, not {app!r}")
    if not isinstance(name, str) or not name:
        raise InvalidOptionError(f"the task name must be a non-empty str, not {name!r}")
    steps = tuple(float(s) for s in schedule)
    if not steps or any(s <= 0 for s in steps):
        raise InvalidOptionError(f"schedule must be positive seconds, not {schedule!r}")
    if max_age <= 0:
        raise InvalidOptionError(f"max_age must be positive seconds, not {max_age!r}")
    if on_result is not None and not callable(on_result):
        raise InvalidOptionError(f"on_result must be callable, not {on_result!r}")
    _refuse_pickle(app)
    from smtpstate.engine import Engine
    Engine(**engine_options).close()          # a bad option is refused now, not per process

    binding = _Binding(app, name, dict(engine_options), steps, float(max_age), on_result)
    signals = celery.signals
    # Prefork: each child makes its Engine as it starts and closes it as it
    # stops. Solo and threads pools run tasks in the main process, which
    # gets its Engine at the first task and closes it at worker shutdown.
    signals.worker_process_init.connect(binding.start, weak=False)
    signals.worker_process_shutdown.connect(binding.close, weak=False)
    signals.worker_shutdown.connect(binding.close, weak=False)

    def deliver(self: Any, jobs: List[Dict[str, Any]]) -> Dict[str, Any]:
        return binding.run(self, jobs)

    deliver.__doc__ = "Deliver a batch of smtpstate jobs (smtpstate.celery.register)."
    task = app.task(name=name, bind=True, acks_late=True, reject_on_worker_lost=True,
                    serializer="json", typing=False)(deliver)
    return task


def send_batch(task: "Task", messages: Iterable[Message], host: Optional[str] = None,
               port: int = 25, *, apply_options: Optional[Mapping[str, Any]] = None,
               **options: Any) -> "AsyncResult":
    """Send ``messages`` as one batch to ``task`` (made by :func:`register`).

    Args:
        task: the delivery task.
        messages: :class:`~smtpstate.Message` objects whose data is bytes.
        host: None to route by MX, else a smart host.
        port: the TCP port.
        apply_options: for Celery's ``apply_async`` (``queue``,
            ``countdown``, ``priority`` ...).
        **options: delivery options a job can carry (``tls``, ``timeout``,
            ``helo`` ...; docs/queue.md).

    Returns:
        The task's ``AsyncResult``; :func:`collect` reads it and the
        retries it leads to.

    Raises:
        JobError (a ValueError): a message or option a job cannot carry
            (every message is checked before the task is sent), or no
            message at all.
    """
    jobs = [Job.from_message(m, host, port, **options) for m in messages]
    if not jobs:
        raise JobError("send_batch() needs at least one message")
    extra = dict(apply_options or {})
    extra.setdefault("serializer", "json")
    return task.apply_async(args=[[json.loads(j.to_json()) for j in jobs]], **extra)


def collect(result: "AsyncResult", timeout: Optional[float] = None,
            follow: bool = True) -> List[Dict[str, Any]]:
    """The final result records of a batch, in the order they came.

    Args:
        result: what :func:`send_batch` returned (or ``AsyncResult(id)``).
        timeout: seconds for the whole wait, retries included; None: no
            limit.
        follow: also wait for the tasks that carry retried jobs on (they
            run after their countdown) and include their records.

    Following needs a result backend that finds a task's result by its id
    from the process that waits: ``rpc://`` (retries answer to the same
    ``reply_to``), Redis, a database.

    Raises:
        celery.exceptions.TimeoutError: not every result came in time.
        Whatever the task raised (a malformed job, a failed engine).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    records: List[Dict[str, Any]] = []
    waiting = [result]
    while waiting:
        current = waiting.pop(0)
        left = None if deadline is None else max(0.001, deadline - time.monotonic())
        value = current.get(timeout=left)
        if not isinstance(value, dict) or value.get("version") != TASK_RESULT_VERSION:
            raise ValueError(f"task {current.id} did not return a result of "
                             f"smtpstate.celery version {TASK_RESULT_VERSION}: {value!r}")
        records.extend(value["results"])
        if follow:
            seen = set()
            for entry in value["retried"]:
                if entry["task"] not in seen:
                    seen.add(entry["task"])
                    waiting.append(current.app.AsyncResult(entry["task"]))
    return records
