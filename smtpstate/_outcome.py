"""What follows from one attempt at a job: retried after the schedule's
next step (only its pending recipients), or final, with the result
record that smtpstate.queue publishes (docs/queue.md, "Result format"
and "Retries"). Pure functions: nothing here publishes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from smtpstate._jobs import RESULT_VERSION, Job

#: Seconds between attempts, as Postfix: 5 minutes, doubling, at most
#: 4000 s (~67 minutes) apart; the last step repeats.
DEFAULT_SCHEDULE: Tuple[float, ...] = (300.0, 600.0, 1200.0, 2400.0, 4000.0)
#: A job still pending this long after it was first enqueued expires.
DEFAULT_MAX_AGE = 5 * 86400.0


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
