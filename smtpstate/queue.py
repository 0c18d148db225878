"""Delivery through a durable broker queue: jobs, enqueue(), Worker.

This module owns the wire formats between smtpstate and a message broker
(the job and the result), enqueue() and read_results(), and the worker
loop that turns jobs into deliveries. The brokers' sides are
smtpstate._amqp_queue (RabbitMQ through kombu) and smtpstate._redis_queue
(Redis through redis-py); forking and supervising worker processes is
smtpstate._supervisor's. Rules:

* Everything on the broker is JSON (never pickle): a job must not be able
  to run code in a worker. Jobs and results carry a ``version``; a job of
  another version, or malformed in any way, is dead-lettered with the
  reason, never guessed at.
* A job is acknowledged only after what follows from it is on the broker
  (confirmed): its final result, or the job carrying its pending
  recipients into a delay queue. A worker that dies before that leaves the
  job unacknowledged, and the broker hands it to another worker.
* Temporary failures wait in the broker, not in memory: one delay queue
  per step of the retry schedule, whose messages expire (per-queue TTL)
  into the main queue through RabbitMQ's dead-lettering; on Redis, a
  sorted set the workers poll.
* The Worker drives either broker through one small interface
  (``poll``, ``finish``, ``retry``, ``dead``, ``give_back``,
  ``housekeeping``, ``resume``, ``close``): ``_amqp_queue.AmqpTransport``
  and ``_redis_queue.RedisTransport``.

The topology for a queue named ``Q`` (every name derived from it):

==================  ======================================================
``Q``               jobs (RabbitMQ: a durable quorum queue with a
                    delivery limit; Redis: a list)
``Q.results``       one JSON result per job that reached its end
``Q.dead``          jobs that could not be read, with the reason
``Q.delay.<secs>``  jobs waiting for their next attempt (RabbitMQ)
``Q.delayed``       the same on Redis: a sorted set
==================  ======================================================

docs/queue.md describes the formats, the retry schedule and the delivery
guarantee.
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import functools
import gc
import json
import logging
import math
import os
import re
import select
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import (Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Sequence,
                    Set, Tuple, Type)

from smtpstate import _encoding, _redis_queue, _supervisor
from smtpstate._amqp_queue import (BATCH_CONTENT_TYPE, DELIVERY_LIMIT, JOB_CONTENT_TYPE,
                                   RESULT_CONTENT_TYPE, RESULTS_CONTENT_TYPE, AmqpTransport,
                                   Published, _connect, _job_queue, _queue, body_bytes,
                                   content_type, quietly)
from smtpstate._confirms import BrokerRefusedError
from smtpstate.errors import InvalidOptionError
from smtpstate.message import Message, Recipient

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
    "enqueue",
    "read_results",
    "Worker",
    "Outcome",
    "outcome",
]

log = logging.getLogger("smtpstate.queue")

JOB_VERSION = 1
RESULT_VERSION = 1
#: At most this many jobs in one broker message (``enqueue(batch=)``).
MAX_BATCH = 1000

#: Seconds between attempts, as Postfix: 5 minutes, doubling, at most
#: 4000 s (~67 minutes) apart; the last step repeats.
DEFAULT_SCHEDULE: Tuple[float, ...] = (300.0, 600.0, 1200.0, 2400.0, 4000.0)
#: A job still pending this long after it was first enqueued expires.
DEFAULT_MAX_AGE = 5 * 86400.0

# Options a job may carry: JSON-safe values only, checked here and again
# by the Engine (Options) when the worker submits. Credentials (auth,
# key_password) and files of the enqueuing machine are left out on
# purpose: a job is readable by anyone who can read the queue.
_OPTION_TYPES: Dict[str, Tuple[type, ...]] = {
    "tls": (str,),
    "timeout": (int, float),
    "helo": (str,),
    "server_hostname": (str,),
    "dangerously_skip_certificate_verification": (bool,),
    "tls_min_version": (str,),
    "ciphers": (str,),
    "ciphersuites": (str,),
    "protocol": (str,),
}
_TLS_LEVELS = ("none", "opportunistic", "verify", "starttls", "implicit", "dane",
               "dane-only", "mta-sts")
_TLS_OR_NONE = frozenset((None,) + _TLS_LEVELS)
_MESSAGE_OPTIONS = ("dsn_ret", "envid", "long_lines", "require_tls", "smtputf8")
_JOB_KEYS = {"version", "id", "sender", "recipients", "data", "message_options", "host",
             "port", "options", "attempts", "first_enqueued", "settled"}
_OPTIONAL_JOB_KEYS = {"redelivered"}
_RECIPIENT_KEYS = {"address", "notify", "orcpt", "index"}


class JobError(ValueError):
    """A job that cannot be read or made: the text says which field and
    what it should be."""


# ---------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------


@dataclass
class Job:
    """One delivery job, as it travels through the broker.

    Attributes:
        id: a UUID (str), the same through every retry of the message.
        sender: the reverse-path.
        recipients: the recipients still to be tried, each a dict with
            ``address``, ``notify`` (list), ``orcpt`` (str or None) and
            ``index`` (its place in the original message).
        data: the raw message (bytes; base64 in JSON).
        message_options: ``dsn_ret``, ``envid``, ``long_lines``,
            ``require_tls``, ``smtputf8`` (those that differ from the
            defaults).
        host: the smart host, or None to route by MX.
        port: the TCP port.
        options: delivery options (``tls``, ``timeout``, ``helo`` ...).
        attempts: attempts made so far (0 when first enqueued).
        first_enqueued: Unix time of the first enqueue.
        settled: per-recipient results already final from earlier
            attempts (result format), so that the final result names
            every recipient.
        redelivered: an earlier attempt of this job was handed out again
            after its worker died (so it may have been delivered then);
            kept through retries so the final result says so.
    """

    id: str
    sender: str
    recipients: List[Dict[str, Any]]
    data: bytes
    message_options: Dict[str, Any] = field(default_factory=dict)
    host: Optional[str] = None
    port: int = 25
    options: Dict[str, Any] = field(default_factory=dict)
    attempts: int = 0
    first_enqueued: float = 0.0
    settled: List[Dict[str, Any]] = field(default_factory=list)
    redelivered: bool = False

    @classmethod
    def from_message(cls, message: Message, host: Optional[str] = None, port: int = 25,
                     **options: Any) -> "Job":
        """A new job for ``message`` (its data must be bytes).

        Raises:
            JobError: data that is not bytes (a file or stream cannot be
                queued: read it first), an option a job cannot carry or a
                bad value.
        """
        if not isinstance(message, Message):
            raise JobError(f"enqueue() takes smtpstate.Message objects, not "
                           f"{type(message).__name__}")
        if not isinstance(message.data, bytes):
            raise JobError("a queued message needs its data as bytes (a file or stream "
                           "cannot travel through a broker: read it first)")
        mopts: Dict[str, Any] = {}
        for name in _MESSAGE_OPTIONS:
            value = getattr(message, name)
            if value != getattr(Message, name, None) and value not in (None, False, "refuse"):
                mopts[name] = value
        rcpts = [{"address": r.address, "notify": list(r.notify), "orcpt": r.orcpt,
                  "index": i} for i, r in enumerate(message.recipient_options)]
        job = cls(id=str(uuid.uuid4()), sender=message.sender, recipients=rcpts,
                  data=message.data, message_options=mopts, host=host, port=port,
                  options=dict(options), attempts=0, first_enqueued=time.time())
        job._check()
        return job

    def to_json(self) -> bytes:
        """The job as UTF-8 JSON (the format of docs/queue.md)."""
        return json.dumps(self.to_object(), separators=(",", ":"),
                          sort_keys=True).encode("utf-8")

    def to_object(self, binary: bool = False) -> Dict[str, Any]:
        """The job as a dict ready for JSON (what :meth:`to_json` encodes;
        a batch holds these), or with ``binary`` for msgpack (the data as
        bytes instead of base64)."""
        return {
            "version": JOB_VERSION,
            "id": self.id,
            "sender": self.sender,
            "recipients": self.recipients,
            "data": self.data if binary else base64.b64encode(self.data).decode("ascii"),
            "message_options": self.message_options,
            "host": self.host,
            "port": self.port,
            "options": self.options,
            "attempts": self.attempts,
            "first_enqueued": self.first_enqueued,
            "settled": self.settled,
            **({"redelivered": True} if self.redelivered else {}),
        }

    @classmethod
    def from_json(cls, raw: Any) -> "Job":
        """Parse a job strictly.

        Raises:
            JobError: not UTF-8 JSON, another version, a missing or unknown
                field, a field of the wrong type, bad base64, a message the
                job's fields cannot make (bad address ...).
        """
        obj, binary = _decoded(raw)
        return cls.from_object(obj, binary=binary)

    @classmethod
    def from_object(cls, obj: Any, *, binary: bool = False) -> "Job":
        """Parse a job already decoded (a dict) from JSON, or from msgpack
        with ``binary`` (then its data is bytes, not base64), as strictly
        as :meth:`from_json`.

        Raises:
            JobError: as :meth:`from_json`.
        """
        # The usual job (what enqueue() makes) takes a fast path that only
        # says "certainly fine"; anything else, the checks below, which
        # also give the errors.
        job = _usual_job(cls, obj, binary)
        return job if job is not None else cls._from_object_checked(obj, binary)

    @classmethod
    def _from_object_checked(cls, obj: Any, binary: bool) -> "Job":
        if not isinstance(obj, dict):
            raise JobError("a job must be a JSON object")
        version = obj.get("version")
        if version != JOB_VERSION:
            raise JobError(f"job version {version!r} is not supported (this worker reads "
                           f"version {JOB_VERSION})")
        missing = sorted(_JOB_KEYS - set(obj))
        if missing:
            raise JobError(f"job field(s) missing: {', '.join(missing)}")
        unknown = sorted(set(obj) - _JOB_KEYS - _OPTIONAL_JOB_KEYS)
        if unknown:
            raise JobError(f"unknown job field(s): {', '.join(unknown)}")
        _want(obj, "id", str)
        _want(obj, "sender", str)
        _want(obj, "recipients", list)
        _want(obj, "data", bytes if binary else str)
        _want(obj, "message_options", dict)
        _want(obj, "options", dict)
        _want(obj, "settled", list)
        if obj["host"] is not None:
            _want(obj, "host", str)
        if type(obj["port"]) is not int:
            raise JobError(f"job field port must be an int, not {obj['port']!r}")
        if type(obj["attempts"]) is not int or obj["attempts"] < 0:
            raise JobError(f"job field attempts must be an int >= 0, not {obj['attempts']!r}")
        if type(obj["first_enqueued"]) not in (int, float) \
                or not 0 <= obj["first_enqueued"] < 1e11:      # also refuses NaN, huge ints
            raise JobError("job field first_enqueued must be a number (Unix time)")
        if type(obj.get("redelivered", False)) is not bool:
            raise JobError("job field redelivered must be true or false")
        try:
            uuid.UUID(obj["id"])
        except ValueError:
            raise JobError(f"job id {obj['id']!r} is not a UUID") from None
        if binary:
            data = obj["data"]
        else:
            try:
                data = base64.b64decode(obj["data"].encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError) as e:
                raise JobError(f"job field data must be base64: {e}") from None
        for r in obj["recipients"]:
            if not isinstance(r, dict) or set(r) != _RECIPIENT_KEYS:
                raise JobError(f"each job recipient must be an object with exactly "
                               f"{sorted(_RECIPIENT_KEYS)}, not {r!r}")
            if (not isinstance(r["address"], str) or not isinstance(r["notify"], list)
                    or (r["orcpt"] is not None and not isinstance(r["orcpt"], str))
                    or type(r["index"]) is not int):
                raise JobError(f"job recipient has a field of the wrong type: {r!r}")
        for s in obj["settled"]:
            # Every field outcome() reads from a settled entry, checked.
            if not isinstance(s, dict) or not isinstance(s.get("address"), str) \
                    or not isinstance(s.get("status"), str) \
                    or type(s.get("index")) is not int:
                raise JobError(f"job field settled holds a bad entry: {str(s)[:200]}")
        job = cls(id=obj["id"], sender=obj["sender"], recipients=obj["recipients"],
                  data=data, message_options=obj["message_options"], host=obj["host"],
                  port=obj["port"], options=obj["options"], attempts=obj["attempts"],
                  first_enqueued=float(obj["first_enqueued"]), settled=obj["settled"],
                  redelivered=obj.get("redelivered", False))
        job._check()
        return job

    def _check(self) -> None:
        if not self.recipients:
            raise JobError("a job needs at least one pending recipient")
        if not 1 <= self.port <= 65535:
            raise JobError(f"job port must be 1-65535, not {self.port}")
        unknown = sorted(set(self.message_options) - set(_MESSAGE_OPTIONS))
        if unknown:
            raise JobError(f"unknown message option(s) {', '.join(unknown)}; a job carries "
                           f"{', '.join(_MESSAGE_OPTIONS)}")
        for name, value in self.options.items():
            types = _OPTION_TYPES.get(name)
            if types is None:
                raise JobError(f"option {name!r} cannot travel in a job; a job carries "
                               f"{', '.join(sorted(_OPTION_TYPES))} (credentials and local "
                               "files belong to the worker, not the queue)")
            if value is not None and (not isinstance(value, types)
                                      or (bool not in types and isinstance(value, bool))):
                raise JobError(f"option {name} must be {'/'.join(t.__name__ for t in types)}"
                               f", not {value!r}")
        if self.options.get("tls") not in (None,) + _TLS_LEVELS:
            raise JobError(f"option tls must be one of {', '.join(_TLS_LEVELS)}, "
                           f"not {self.options['tls']!r}")
        try:
            # Kept: the worker submits this one rather than make it again.
            self._message: Optional[Message] = self.message()
        except ValueError as e:
            raise JobError(f"the job's message cannot be made: {e}") from None

    def message(self) -> Message:
        """The :class:`~smtpstate.Message` for the pending recipients."""
        # A recipient without DSN options is passed as its address: the
        # same message, without a Recipient object to make and check.
        rcpts = [Recipient(r["address"], notify=tuple(r["notify"]), orcpt=r["orcpt"])
                 if r["notify"] or r["orcpt"] is not None else r["address"]
                 for r in self.recipients]
        return Message(self.sender, rcpts, self.data, **self.message_options)


def _want(obj: Dict[str, Any], key: str, kind: type) -> None:
    if not isinstance(obj[key], kind):
        raise JobError(f"job field {key} must be a {kind.__name__}, not "
                       f"{type(obj[key]).__name__}")


_JOB_KEYS_MARKED = _JOB_KEYS | _OPTIONAL_JOB_KEYS
# A batch's "common" part may hold any job field but these, each job's own.
_OWN_KEYS = frozenset(("id", "recipients", "data"))
_SHARED_KEYS = frozenset(_JOB_KEYS - _OWN_KEYS)
_SHARED_KEYS_MARKED = _SHARED_KEYS | _OPTIONAL_JOB_KEYS
# uuid.UUID() reads more spellings; the canonical one (what enqueue()
# writes) is matched here, the others are left to the full checks.
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _usual_job(cls: Type[Job], obj: Any, binary: bool) -> Optional[Job]:
    """The job ``obj`` when it is certainly fine as the usual job is:
    exact JSON types, no settled entries, no message options, options of
    the exact types a job carries, a canonical UUID, strict base64, a
    message that Message() accepts. None means "not sure": the full
    checks (Job._from_object_checked) decide, and say what is wrong. Every
    job this accepts, the full checks accept the same (tests/test_queue's
    agreement test)."""
    if type(obj) is not dict:
        return None
    keys = obj.keys()
    if (keys != _JOB_KEYS and keys != _JOB_KEYS_MARKED) or not _usual_shared(obj):
        return None
    return _usual_own(cls, obj, obj, binary)


def _usual_shared(shared: Dict[str, Any]) -> bool:
    """The fields a batch's jobs may share (_SHARED_KEYS) are certainly
    fine as the usual job has them (see _usual_job)."""
    host, port, options = shared["host"], shared["port"], shared["options"]
    attempts, first = shared["attempts"], shared["first_enqueued"]
    if not (type(shared["version"]) is int and shared["version"] == JOB_VERSION
            and type(shared["sender"]) is str
            and shared["message_options"] == {} and type(shared["message_options"]) is dict
            and type(options) is dict
            and shared["settled"] == [] and type(shared["settled"]) is list
            and (host is None or type(host) is str)
            and type(port) is int and 1 <= port <= 65535
            and type(attempts) is int and attempts >= 0
            and type(first) in (int, float) and 0 <= first < 1e11
            and type(shared.get("redelivered", False)) is bool):
        return False
    for name, value in options.items():
        types = _OPTION_TYPES.get(name)
        if types is None or (value is not None and type(value) not in types):
            return False
    return options.get("tls") in _TLS_OR_NONE


def _usual_own(cls: Type[Job], shared: Dict[str, Any], own: Dict[str, Any],
               binary: bool) -> Optional[Job]:
    """The job made of ``shared`` fields (checked by _usual_shared) and a
    job's ``own`` (id, recipients, data) when these are certainly fine
    too; None when not sure (see _usual_job)."""
    ident, rcpts, data = own["id"], own["recipients"], own["data"]
    if not (type(ident) is str and _CANONICAL_UUID.fullmatch(ident)
            and type(rcpts) is list and rcpts and type(data) is (bytes if binary else str)):
        return None
    addresses = []
    for r in rcpts:
        if not (type(r) is dict and r.keys() == _RECIPIENT_KEYS
                and type(r["address"]) is str and r["notify"] == [] and r["orcpt"] is None
                and type(r["notify"]) is list and type(r["index"]) is int):
            return None
        addresses.append(r["address"])
    sender = shared["sender"]
    try:
        raw = data if binary else binascii.a2b_base64(data, strict_mode=True)  # type: ignore[call-arg]
        message = Message(sender, addresses, raw)
    except (TypeError, ValueError):     # no strict_mode before 3.11; bad base64, message
        return None
    # The fields set as __init__ would (it has nothing else to do), in
    # one step: a fifth of the cost of calling it.
    job = cls.__new__(cls)
    job.__dict__ = {"id": ident, "sender": sender, "recipients": rcpts, "data": raw,
                    "message_options": {}, "host": shared["host"], "port": shared["port"],
                    "options": shared["options"], "attempts": shared["attempts"],
                    "first_enqueued": float(shared["first_enqueued"]), "settled": [],
                    "redelivered": shared.get("redelivered", False), "_message": message}
    return job


def _decoded(raw: Any) -> Tuple[Any, bool]:
    """A broker message's body decoded (JSON or msgpack), and whether it
    was msgpack."""
    try:
        return _encoding.decode(raw)
    except ValueError as e:
        raise JobError(f"a job must be JSON or msgpack: {e}") from None


def parse_jobs(raw: Any) -> Tuple[List[Job], bool]:
    """The jobs of one broker message: a single job (docs/queue.md's job
    format), or a batch ``{"version": 1, "common": {...}, "jobs": [...]}``
    as ``enqueue(batch=N)`` and a worker's retries of a batch publish
    (each job is its entry of ``jobs`` with the fields of ``common``).
    Either may be JSON or msgpack (``enqueue(encoding=)``). Returns (jobs,
    whether it was a batch).

    Raises:
        JobError: as :meth:`Job.from_json`; for a batch, which job (its
            place) is wrong: a batch is read whole or not at all.
    """
    jobs, batch, _binary = _parse(raw)
    return jobs, batch


def _parse(raw: Any) -> Tuple[List[Job], bool, bool]:
    """parse_jobs(), and whether the message was msgpack."""
    obj, binary = _decoded(raw)
    if not (isinstance(obj, dict) and "jobs" in obj):
        return [Job.from_object(obj, binary=binary)], False, binary
    if obj.get("version") != JOB_VERSION or not {"version", "jobs"} <= set(obj) \
            or not set(obj) <= {"version", "common", "jobs"}:
        raise JobError(f"a batch must be {{\"version\": {JOB_VERSION}, \"common\": {{...}}, "
                       f"\"jobs\": [...]}} (common optional), not one with field(s) "
                       f"{', '.join(sorted(obj))} and version {obj.get('version')!r}")
    items, common = obj["jobs"], obj.get("common", {})
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH:
        raise JobError(f"a batch's jobs must be a list of 1 to {MAX_BATCH} jobs")
    if not isinstance(common, dict) or not set(common) <= _SHARED_KEYS_MARKED:
        raise JobError(f"a batch's common part must be an object of job fields other than "
                       f"{', '.join(sorted(_OWN_KEYS))}")
    # The usual batch: every shared field in common, checked once; each
    # job only its own three.
    keys = common.keys()
    if (keys == _SHARED_KEYS or keys == _SHARED_KEYS_MARKED) and _usual_shared(common):
        jobs: List[Job] = []
        for item in items:
            job = (_usual_own(Job, common, item, binary)
                   if type(item) is dict and item.keys() == _OWN_KEYS else None)
            if job is None:
                break
            jobs.append(job)
        else:
            return jobs, True, binary
    jobs = []
    for i, item in enumerate(items):
        try:
            if not isinstance(item, dict):
                raise JobError("a job must be a JSON object")
            again = sorted(set(item) & set(common))
            if again:
                raise JobError(f"field(s) {', '.join(again)} both in the job and in the "
                               "batch's common part")
            jobs.append(Job.from_object({**common, **item}, binary=binary))
        except JobError as e:
            raise JobError(f"job {i} of the batch: {e}") from None
    return jobs, True, binary


def _results_body(finals: List[Dict[str, Any]], binary: bool) -> bytes:
    """A batch of results: ``{"version": 1, "results": [...]}``."""
    return _encoding.encode({"version": RESULT_VERSION, "results": finals}, binary)


def _jobs_body(jobs: Sequence[Job], binary: bool) -> bytes:
    """A batch of jobs: the fields every job has the same written once, in
    ``common``; each entry of ``jobs`` holds the rest."""
    objs = [j.to_object(binary) for j in jobs]
    first = objs[0]
    common = {k: first[k] for k in _SHARED_KEYS_MARKED
              if k in first and all(k in o and o[k] == first[k] for o in objs)}
    return _encoding.encode({"version": JOB_VERSION, "common": common,
                             "jobs": [{k: v for k, v in o.items() if k not in common}
                                      for o in objs]}, binary)


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


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


def _reply(reply: Any) -> Optional[Dict[str, Any]]:
    if reply is None:
        return None
    return {"code": reply.code, "enhanced": reply.enhanced, "text": reply.text}


def _expired(entry: Dict[str, Any], age: float) -> Dict[str, Any]:
    last = entry.get("reply")
    why = f"{last['code']} {last['text']}" if last else entry.get("reason") or "tempfail"
    return dict(entry, status="permfail", enhanced="5.4.7",
                reason=f"expired: still failing after {age / 3600:.1f} h (last: {why})")


@dataclass(frozen=True)
class Outcome:
    """What follows from one attempt at a job: either ``retry`` (the job
    with its pending recipients, to run again after ``delay`` seconds) or
    ``final`` (the result record, docs/queue.md)."""

    retry: Optional[Job] = None
    delay: float = 0.0
    final: Optional[Dict[str, Any]] = None


def outcome(job: Job, result: Any, *, schedule: Sequence[float] = DEFAULT_SCHEDULE,
            max_age: float = DEFAULT_MAX_AGE, redelivered: bool = False,
            now: Optional[float] = None) -> Outcome:
    """Decide what follows from ``result`` (an Engine Result for
    ``job.message()``): recipients that failed temporarily are retried
    after the schedule's next step unless that would pass ``max_age``
    (then they expire as ``permfail`` 5.4.7); otherwise the job is final.
    ``unknown`` is final, never retried. Pure: publishes nothing."""
    retry, delay, final = _decide(job, result, schedule, max_age, redelivered, now)
    return Outcome(retry=retry, delay=delay, final=final)


def _decide(job: Job, result: Any, schedule: Sequence[float], max_age: float,
            redelivered: bool, now: Optional[float] = None
            ) -> Tuple[Optional[Job], float, Optional[Dict[str, Any]]]:
    """outcome(), as (retry, delay, final)."""
    now = time.time() if now is None else now
    if result.status == "delivered" and len(job.recipients) == 1 and not job.settled:
        # The usual outcome, one recipient delivered at once, made
        # directly: the same record as below, a third of the work.
        (rcpt,), (rr,) = job.recipients, result.recipients
        attempts = job.attempts + 1
        reply = rr.reply
        return None, 0.0, {
            "version": RESULT_VERSION, "job": job.id, "status": "delivered", "final": True,
            "attempts": attempts, "first_enqueued": job.first_enqueued, "finished": now,
            "reply": _reply(result.reply), "reason": result.reason,
            "recipients": [{"address": rcpt["address"], "index": rcpt["index"],
                            "status": "delivered",
                            "reply": None if reply is None else {
                                "code": reply.code, "enhanced": reply.enhanced,
                                "text": reply.text},
                            "enhanced": rr.enhanced, "mx": rr.mx, "attempts": attempts}],
            "redelivered": redelivered or job.redelivered, "needs_decision": False}
    return _decide_general(job, result, schedule, max_age, redelivered, now)


def _decide_general(job: Job, result: Any, schedule: Sequence[float], max_age: float,
                    redelivered: bool, now: Optional[float] = None
                    ) -> Tuple[Optional[Job], float, Optional[Dict[str, Any]]]:
    """_decide() for any job and result."""
    now = time.time() if now is None else now
    attempts = job.attempts + 1
    redelivered = redelivered or job.redelivered
    age = now - job.first_enqueued
    settled = list(job.settled)
    pending: List[Dict[str, Any]] = []
    pending_entries: List[Dict[str, Any]] = []
    for rcpt, rr in zip(job.recipients, result.recipients):
        # A recipient accepted at RCPT whose message then failed (at DATA,
        # or the connection) failed by the message's reply, not its 250.
        reply, enhanced = rr.reply, rr.enhanced
        if rr.status != "delivered" and (reply is None or 200 <= reply.code < 300) \
                and result.reply is not None:
            reply, enhanced = result.reply, result.enhanced
        entry = {"address": rcpt["address"], "index": rcpt["index"],
                 "status": rr.status, "reply": _reply(reply),
                 "enhanced": enhanced, "mx": rr.mx, "attempts": attempts}
        if rr.status != "delivered" and result.reason:
            entry["reason"] = result.reason
        if rr.status == "tempfail":
            pending.append(rcpt)
            pending_entries.append(entry)
        else:
            settled.append(entry)
    if pending:
        delay = schedule[min(attempts - 1, len(schedule) - 1)]
        if age + delay <= max_age:
            retry = Job(id=job.id, sender=job.sender, recipients=pending, data=job.data,
                        message_options=job.message_options, host=job.host,
                        port=job.port, options=job.options, attempts=attempts,
                        first_enqueued=job.first_enqueued, settled=settled,
                        redelivered=redelivered)
            return retry, delay, None
        settled.extend(_expired(e, age) for e in pending_entries)
    settled.sort(key=lambda e: e["index"])
    statuses = {e["status"] for e in settled}
    if statuses == {"delivered"}:
        status = "delivered"
    elif "delivered" in statuses:
        status = "partial"
    elif "unknown" in statuses:
        status = "unknown"
    elif statuses <= {"permfail", "not_sent"} or "permfail" in statuses:
        status = "permfail"
    else:
        status = sorted(statuses)[0]
    return None, 0.0, {
        "version": RESULT_VERSION, "job": job.id, "status": status, "final": True,
        "attempts": attempts, "first_enqueued": job.first_enqueued, "finished": now,
        "reply": _reply(result.reply), "reason": result.reason,
        "recipients": settled,
        # A job handed out again after a worker died may have been
        # delivered by that worker (and its result published): a result
        # marked so may duplicate an earlier one.
        "redelivered": redelivered,
        # Lost after the final dot: maybe delivered; never retried here.
        "needs_decision": "unknown" in statuses,
    }


# ---------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------


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
            format) after it was published and before its job is
            acknowledged; what it raises is logged.
        prefetch: jobs held unacknowledged at once (the window that keeps
            the engine's connections busy); default: twice
            ``max_connections``, at most 1000.
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
        self._again: List[Tuple[List[Published], Optional[Callable[[], None]]]] = []
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
                    # The deliveries in flight go on meanwhile.
                    until = time.monotonic() + pause
                    while time.monotonic() < until and not self._stop.is_set() \
                            and not self._engine_failed:
                        self._turn(engine, None, until - time.monotonic())
                    if self._stop.is_set() or self._engine_failed:
                        if gave_up is None:
                            gave_up = time.monotonic() + self.drain_timeout
                        if not self._carried or time.monotonic() > gave_up \
                                or self._engine_failed:
                            break           # unacknowledged: the broker hands them out
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
                before_ack()
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
        if self._complete or (transport is not None and transport.pending()):
            wait = 0.0
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
        body = job.to_json() if carried.batch else carried.body
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
            carried.remaining -= 1
            if carried.remaining == 0:
                self._complete.append(carried)

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
        finals = carried.finals
        if carried.redelivered:
            finals = [dict(f, redelivered=True) for f in finals]
        on_result = self.on_result

        def call_on_result() -> None:
            assert on_result is not None
            for final in finals:
                try:
                    on_result(final)
                except Exception:
                    log.exception("on_result raised for job %s (ignored)", final["job"])
        transport.settle(handle, carried.what_follows(carried.redelivered),
                         functools.partial(carried.what_follows, True),
                         call_on_result if on_result is not None and finals else None,
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
