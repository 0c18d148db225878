"""The job format of smtpstate.queue: Job, reading a broker message's
jobs (the strict checks, and a fast way for the usual job that accepts
nothing they refuse), and batches, whose jobs write what they share once.

This module owns what a job is on the broker (docs/queue.md, "Job
format"); the encodings (JSON, msgpack) are smtpstate._encoding's, the
result records smtpstate._outcome's.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

from smtpstate import _encoding
from smtpstate.message import Message, Recipient

JOB_VERSION = 1
RESULT_VERSION = 1
#: At most this many jobs in one broker message (``enqueue(batch=)``).
MAX_BATCH = 1000


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
