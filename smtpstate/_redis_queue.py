"""The Redis side of smtpstate.queue: reliable lists on redis-py.

This module owns every Redis key the queue uses and the Lua scripts that
change them. kombu's Redis transport is not used for jobs or results: it
pops a message (BRPOP) before it records it as unacknowledged, so a
consumer killed between the two loses the message. Here a message never
leaves Redis's keeper before it is acknowledged:

* **Taking** moves a message atomically (``LMOVE`` inside a script) from
  the list into the consumer's own ``taken`` list, and in the same script
  renews the consumer's lease (a key that expires) and registers it.
* **Acknowledging** removes it from the ``taken`` list, in one script
  with whatever follows from it (the result pushed, the retry
  scheduled), so the two cannot be separated by a crash; the script also
  says whether the consumer still held it (if not, what it pushes is the
  variant marked redelivered).
* **Reaping**: any consumer, every few seconds, moves back the ``taken``
  lists of consumers whose lease has expired (they died) into the
  ``reaped`` list, which is taken before the main list, counting each
  message's returns; a message taken from there is marked redelivered.
  A thread of each consumer renews its lease.
* **Delayed jobs** wait in a sorted set scored by Redis's own clock (so
  workers with skewed clocks agree) and are moved to the job list by one
  script, atomically.

Keys, for a list ``L`` (the job queue ``Q``, or ``Q.results``):

=====================  ===================================================
``L``                  messages, pushed on the left, taken from the right
``L.reaped``           messages of dead consumers, taken first
``L.consumers``        a set of consumer ids
``L.alive.<id>``       a consumer's lease (expires)
``L.taken.<id>``       what a consumer holds unacknowledged
``L.returns``          how many times each reaped message (SHA-1) came back
``Q.delayed``          jobs waiting for their next attempt (sorted set)
``Q.dead``             dead-letter records
=====================  ===================================================

Scripts touch keys derived from the names they are given: this works on
one Redis server (with its replicas), not on Redis Cluster.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
import time
import uuid
from typing import Any, Callable, List, Optional, Sequence, Tuple, Type

log = logging.getLogger("smtpstate.queue")

#: Default seconds a consumer's lease lasts; it renews it every sixth of
#: that while alive, so a dead consumer's messages are handed out again
#: this long after it died.
DEFAULT_LEASE = 30.0

# KEYS: list, reaped, taken, alive, consumers, returns. ARGV: most, id,
# lease ms. Returns triples: "1" if from reaped else "0", how many times
# the message was reaped, the message.
_TAKE = """
redis.call('SADD', KEYS[5], ARGV[2])
redis.call('SET', KEYS[4], '1', 'PX', ARGV[3])
local out = {}
for i = 1, tonumber(ARGV[1]) do
  local m = redis.call('LMOVE', KEYS[2], KEYS[3], 'RIGHT', 'LEFT')
  local again, returns = '1', 0
  if m then
    returns = tonumber(redis.call('HGET', KEYS[6], redis.sha1hex(m)) or '0')
  else
    m = redis.call('LMOVE', KEYS[1], KEYS[3], 'RIGHT', 'LEFT')
    again = '0'
  end
  if not m then break end
  out[#out + 1] = again
  out[#out + 1] = returns
  out[#out + 1] = m
end
return out
"""

# KEYS: consumers, reaped, returns. ARGV: alive prefix, taken prefix.
# Counts each reaped message's returns (a job that kills every worker
# taking it is dead-lettered after DELIVERY_LIMIT of them).
_REAP = """
local n = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. id) == 0 then
    local taken = ARGV[2] .. id
    while true do
      local m = redis.call('LMOVE', taken, KEYS[2], 'RIGHT', 'LEFT')
      if not m then break end
      redis.call('HINCRBY', KEYS[3], redis.sha1hex(m), 1)
      n = n + 1
    end
    redis.call('SREM', KEYS[1], id)
  end
end
return n
"""

# KEYS: taken, list, reaped. ARGV: message, "1" if it came from reaped.
# Gives one message back, to be taken next, keeping its mark.
_GIVE_BACK = """
if redis.call('LREM', KEYS[1], -1, ARGV[1]) > 0 then
  if ARGV[2] == '1' then
    redis.call('RPUSH', KEYS[3], ARGV[1])
  else
    redis.call('RPUSH', KEYS[2], ARGV[1])
  end
end
return 0
"""

# KEYS: taken, returns, then one target per push. ARGV: the message (""
# when there is nothing to acknowledge), its sha1, then per push: the
# delay in seconds ("" for a list: LPUSH; else ZADD to a sorted set, due
# by Redis's clock), what to push while the message is still held, what
# to push if it is not (a worker paused past its lease: the message was
# reaped and handed out again). Acknowledges and pushes atomically;
# returns 1 if the message was still held.
_SETTLE = """
local held = 1
if ARGV[1] ~= '' then
  held = redis.call('LREM', KEYS[1], -1, ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[2])
end
local now = nil
for i = 3, #KEYS do
  local a = 3 + (i - 3) * 3
  local body = ARGV[a + 1]
  if held == 0 then body = ARGV[a + 2] end
  if ARGV[a] == '' then
    redis.call('LPUSH', KEYS[i], body)
  else
    if not now then
      local t = redis.call('TIME')
      now = tonumber(t[1]) + tonumber(t[2]) / 1000000
    end
    redis.call('ZADD', KEYS[i], now + tonumber(ARGV[a]), body)
  end
end
return held
"""

#: One push of a settle: (target key, delay in seconds or None for a
#: list, body while held, body if the message was no longer held).
Push = Tuple[str, Optional[float], bytes, bytes]

# KEYS: delayed, list. ARGV: most. Moves due jobs to the job list.
_MOVE_DUE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, m in ipairs(due) do
  redis.call('LPUSH', KEYS[2], m)
  redis.call('ZREM', KEYS[1], m)
end
return #due
"""


def client(broker_url: str) -> Any:
    """A redis-py client for a ``redis://`` (or ``rediss://``,
    ``unix://``) URL."""
    try:
        import redis
    except ImportError:
        raise ImportError("smtpstate.queue on Redis needs the redis client: "
                          "pip install 'smtpstate[queue]'") from None
    return redis.Redis.from_url(broker_url)


def connection_errors() -> Tuple[Type[BaseException], ...]:
    """What redis-py raises when Redis cannot be reached."""
    import redis
    return (redis.ConnectionError, redis.TimeoutError, OSError)


def is_redis_url(broker_url: str) -> bool:
    return broker_url.split(":", 1)[0].lower() in ("redis", "rediss", "redis+socket")


def push(redis_client: Any, name: str, bodies: List[bytes]) -> None:
    """Append messages to list ``name`` in one transaction."""
    if bodies:
        redis_client.lpush(name, *bodies)


class Taken:
    """A message a consumer holds: its body, whether it was handed out
    again (taken from ``reaped``), and how many times it was reaped."""

    __slots__ = ("body", "redelivered", "returns")

    def __init__(self, body: bytes, redelivered: bool, returns: int) -> None:
        self.body = body
        self.redelivered = redelivered
        self.returns = returns

    @property
    def sha1(self) -> str:
        return hashlib.sha1(self.body).hexdigest()


class ReliableList:
    """One consumer of a Redis list that loses nothing when it dies.

    ``take(n)`` returns up to ``n`` :class:`Taken` messages, each held in
    this consumer's ``taken`` list until acknowledged (``ack``, or
    ``finish`` that pushes what follows in the same step) or given back.
    ``renew()`` must run at least every ``lease / 2`` seconds (it does
    every ``lease / 6`` from :meth:`start_renewing`'s thread) and
    ``reap()`` every few seconds.
    """

    def __init__(self, redis_client: Any, name: str, lease: float = DEFAULT_LEASE) -> None:
        if lease <= 0:
            raise ValueError(f"the lease must be positive seconds, not {lease!r}")
        self.redis = redis_client
        self.name = name
        self.lease = float(lease)
        self.id = uuid.uuid4().hex
        self._keys = [name, name + ".reaped", f"{name}.taken.{self.id}",
                      f"{name}.alive.{self.id}", name + ".consumers", name + ".returns"]
        self._take = redis_client.register_script(_TAKE)
        self._reap = redis_client.register_script(_REAP)
        self._give_back = redis_client.register_script(_GIVE_BACK)
        self._settle = redis_client.register_script(_SETTLE)
        self._next_reap = 0.0
        self._renewing: Optional[threading.Event] = None

    @property
    def taken_key(self) -> str:
        return self._keys[2]

    @property
    def returns_key(self) -> str:
        return self._keys[5]

    def take(self, most: int) -> List[Taken]:
        if most <= 0:
            return []
        flat = self._take(keys=self._keys, args=[most, self.id, int(self.lease * 1000)])
        return [Taken(flat[i + 2], flat[i] == b"1", int(flat[i + 1]))
                for i in range(0, len(flat), 3)]

    def ack(self, taken: Taken) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.lrem(self.taken_key, -1, taken.body)
            if taken.redelivered:
                pipe.hdel(self.returns_key, taken.sha1)
            pipe.execute()

    def give_back(self, taken: Taken) -> None:
        """Return one message to be taken next, marked as it was."""
        self._give_back(keys=[self.taken_key, self.name, self._keys[1]],
                        args=[taken.body, "1" if taken.redelivered else "0"])

    def finish(self, taken: Taken, target: str, message: bytes,
               if_lost: Optional[bytes] = None) -> bool:
        """Push ``message`` on list ``target`` and acknowledge ``taken``,
        atomically; if this consumer no longer held it (its lease ran out
        and it was handed out again), push ``if_lost`` instead. Return
        True if it was still held."""
        return self.settle(taken, [(target, None, message,
                                    message if if_lost is None else if_lost)])

    def settle(self, taken: Optional[Taken], pushes: List[Push]) -> bool:
        """Acknowledge ``taken`` (None: nothing) and make every push, in
        one atomic step; a push's ``if lost`` body replaces its body when
        this consumer no longer held ``taken``. Return True if it was still
        held."""
        args: List[Any] = [b"" if taken is None else taken.body,
                           "" if taken is None else taken.sha1]
        for _key, delay, body, lost in pushes:
            args += ["" if delay is None else repr(float(delay)), body, lost]
        held = self._settle(keys=[self.taken_key, self.returns_key]
                            + [key for key, _d, _b, _l in pushes], args=args)
        return bool(held)

    def renew(self) -> None:
        """Renew the lease (and the registration a reaper may have ended)."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(self._keys[4], self.id)
            pipe.set(self._keys[3], b"1", px=int(self.lease * 1000))
            pipe.execute()

    def start_renewing(self) -> None:
        """Renew the lease every ``lease / 6`` seconds from a thread of its
        own, so that a busy loop (a slow callback) does not lose it; only a
        stopped process does."""
        if self._renewing is not None:
            return
        stop = self._renewing = threading.Event()

        def renew_forever() -> None:
            while not stop.wait(self.lease / 6):
                try:
                    self.renew()
                except Exception as e:      # Redis away: the main loop says so
                    log.debug("%s: renewing the lease failed: %s", self.name, e)
        threading.Thread(target=renew_forever, name="smtpstate-lease", daemon=True).start()

    def stop_renewing(self) -> None:
        if self._renewing is not None:
            self._renewing.set()
            self._renewing = None

    def reap(self, force: bool = False) -> int:
        """Hand out again the messages of consumers whose lease ran out (at
        most every ``lease / 6`` seconds unless ``force``); return how
        many."""
        now = time.monotonic()
        if not force and now < self._next_reap:
            return 0
        self._next_reap = now + self.lease / 6
        reaped = int(self._reap(keys=[self._keys[4], self._keys[1], self.returns_key],
                                args=[self.name + ".alive.", self.name + ".taken."]))
        if reaped:
            log.warning("%s: %d message(s) of a consumer that stopped renewing its lease "
                        "handed out again", self.name, reaped)
        return reaped

    def housekeeping(self, force: bool = False) -> int:
        """renew() and reap(), for a consumer without a renewing thread."""
        if force or time.monotonic() >= self._next_reap:
            self.renew()
        return self.reap(force)

    def leave(self) -> None:
        """Give back everything held and end the lease (a clean exit):
        what is left is handed out at once, not after the lease."""
        self.stop_renewing()
        self.redis.delete(self._keys[3])
        self.reap(force=True)


class RedisTransport:
    """The worker's broker on Redis: jobs from ``Q`` (a ReliableList),
    results to ``Q.results``, dead letters to ``Q.dead``, retries through
    the ``Q.delayed`` sorted set. Handles are :class:`Taken`."""

    #: redis-py reconnects by itself, and what this worker took stays in
    #: its own list, its handles still good.
    survives_reconnect = True

    def __init__(self, broker_url: str, queue: str, lease: Optional[float]) -> None:
        self.redis = client(broker_url)
        self.redis.ping()
        self.queue = queue
        self.jobs = ReliableList(self.redis, queue, DEFAULT_LEASE if lease is None else lease)
        self.jobs.renew()
        self.jobs.start_renewing()
        self.results = queue + ".results"
        self.dead_name = queue + ".dead"
        self.delayed = queue + ".delayed"
        self._move_due = self.redis.register_script(_MOVE_DUE)
        self._next_due = 0.0
        self._taking = True

    def fileno(self) -> Optional[int]:
        """None: nothing to wait on. The worker polls every turn, and waits
        for its engine (at most 50 ms) in between: a blocking take would
        need a connection per list and could not watch the engine."""
        return None

    def pending(self) -> bool:
        return False

    def poll(self, timeout: float, room: int) -> List[Tuple[bytes, bool, Any]]:
        """Up to ``room`` jobs as (body, redelivered, handle), at once
        (this never waits)."""
        del timeout
        self.housekeeping()
        got = self.jobs.take(room) if self._taking else []
        return [(t.body, t.redelivered, t) for t in got]

    def housekeeping(self) -> None:
        self.jobs.reap()
        now = time.monotonic()
        if now >= self._next_due:
            self._next_due = now + 1.0
            self._move_due(keys=[self.delayed, self.queue], args=[100])

    def stop_taking(self) -> None:
        self._taking = False

    def settle(self, taken: Optional[Taken], publish: Sequence[Any],
               if_lost: Callable[[], Sequence[Any]],
               before_ack: Optional[Callable[[], None]] = None, identity: Any = None) -> None:
        """Push what follows from ``taken`` (smtpstate._amqp_queue.Published
        items: results, retries by Redis's clock, jobs, dead letters) and
        acknowledge it, in one step; if this worker no longer held it (its
        lease ran out), push the ``if_lost()`` variants (marked redelivered).
        ``before_ack`` is called right after (the step cannot be split).
        ``identity`` is not needed here (a lost connection loses nothing
        this worker holds)."""
        del identity
        targets = {"results": self.results, "delay": self.delayed, "jobs": self.queue,
                   "dead": self.dead_name}
        pushes: List[Push] = [(targets[what.kind], what.delay if what.kind == "delay" else None,
                               what.body, lost.body)
                              for what, lost in zip(publish, if_lost())]
        if not self.jobs.settle(taken, pushes):
            log.warning("%s: a job was handed to another worker while this one delivered "
                        "it (its lease ran out): what follows from it is marked redelivered",
                        self.queue)
        if before_ack is not None:
            before_ack()

    def give_back(self, taken: Taken) -> None:
        self.jobs.give_back(taken)

    def resume(self, known: List[Taken]) -> None:
        """After a lost connection: give back what this worker's ``taken``
        list holds beyond the ``known`` messages it is working on. A take
        whose reply was lost with the connection left its messages there,
        unknown to the worker; the renewed lease would keep them from
        everyone else."""
        unknown = collections.Counter(self.redis.lrange(self.jobs.taken_key, 0, -1))
        unknown.subtract(t.body for t in known)
        lost = list(unknown.elements())
        for body in lost:
            self.jobs.give_back(Taken(body, False, 0))
        if lost:
            log.warning("%s: %d job(s) taken as the connection was lost given back",
                        self.queue, len(lost))

    def ack(self, taken: Taken) -> None:
        self.jobs.ack(taken)

    def close(self) -> None:
        """Give back what is still held (its deliveries were abandoned
        with the engine) so that another worker takes it at once."""
        try:
            self.jobs.leave()
        finally:
            self.redis.close()
