"""The Redis side of smtpstate.queue: reliable lists on redis-py.

This module owns every Redis key the queue uses and the Lua scripts that
change them. kombu's Redis transport is not used for jobs or results: it
pops a message (BRPOP) before it records it as unacknowledged, so a
consumer killed between the two loses the message. Here a message never
leaves Redis's keeper before it is acknowledged:

* **Taking** moves a message atomically (``LMOVE`` inside a script) from
  the list into the consumer's own ``taken`` list, and in the same script
  renews the consumer's lease (a key that expires) and registers it.
* **Acknowledging** removes it from the ``taken`` list, in one
  ``MULTI`` with whatever follows from it (the result pushed, the retry
  scheduled), so the two cannot be separated by a crash.
* **Reaping**: any consumer, every few seconds, moves back the ``taken``
  lists of consumers whose lease has expired (they died) into the
  ``reaped`` list, which is taken before the main list; a message taken
  from there is marked redelivered.
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
``Q.delayed``          jobs waiting for their next attempt (sorted set)
``Q.dead``             dead-letter records
=====================  ===================================================

Scripts touch keys derived from the names they are given: this works on
one Redis server (with its replicas), not on Redis Cluster.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Callable, List, Optional, Tuple, Type

log = logging.getLogger("smtpstate.queue")

#: Default seconds a consumer's lease lasts; it renews it every sixth of
#: that while alive, so a dead consumer's messages are handed out again
#: this long after it died.
DEFAULT_LEASE = 30.0

# KEYS: list, reaped, taken, alive, consumers. ARGV: most, id, lease ms.
_TAKE = """
redis.call('SADD', KEYS[5], ARGV[2])
redis.call('SET', KEYS[4], '1', 'PX', ARGV[3])
local out = {}
for i = 1, tonumber(ARGV[1]) do
  local m = redis.call('LMOVE', KEYS[2], KEYS[3], 'RIGHT', 'LEFT')
  local again = '1'
  if not m then
    m = redis.call('LMOVE', KEYS[1], KEYS[3], 'RIGHT', 'LEFT')
    again = '0'
  end
  if not m then break end
  out[#out + 1] = again
  out[#out + 1] = m
end
return out
"""

# KEYS: consumers, reaped. ARGV: alive prefix, taken prefix.
_REAP = """
local n = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. id) == 0 then
    local taken = ARGV[2] .. id
    while redis.call('LMOVE', taken, KEYS[2], 'RIGHT', 'LEFT') do n = n + 1 end
    redis.call('SREM', KEYS[1], id)
  end
end
return n
"""

# KEYS: taken, list. ARGV: message. Gives one message back, to be next.
_GIVE_BACK = """
if redis.call('LREM', KEYS[1], -1, ARGV[1]) > 0 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
end
return 0
"""

# KEYS: delayed, taken. ARGV: job, seconds, retry body. Schedules the
# retry by Redis's clock and acknowledges the job, atomically.
_DELAY = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('LREM', KEYS[2], -1, ARGV[1])
return 0
"""

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


class ReliableList:
    """One consumer of a Redis list that loses nothing when it dies.

    ``take(n)`` returns up to ``n`` ``(body, redelivered)`` pairs, each held
    in this consumer's ``taken`` list until ``ack``/``give_back`` (or an
    ``ack_with_*`` that acknowledges together with what follows).
    ``housekeeping()`` must be called at least every ``lease / 6`` seconds:
    it renews the lease and reaps dead consumers.
    """

    def __init__(self, redis_client: Any, name: str, lease: float = DEFAULT_LEASE) -> None:
        if lease <= 0:
            raise ValueError(f"the lease must be positive seconds, not {lease!r}")
        self.redis = redis_client
        self.name = name
        self.lease = float(lease)
        self.id = uuid.uuid4().hex
        self._keys = [name, name + ".reaped", f"{name}.taken.{self.id}",
                      f"{name}.alive.{self.id}", name + ".consumers"]
        self._take = redis_client.register_script(_TAKE)
        self._reap = redis_client.register_script(_REAP)
        self._give_back = redis_client.register_script(_GIVE_BACK)
        self._next_housekeeping = 0.0

    @property
    def taken_key(self) -> str:
        return self._keys[2]

    def take(self, most: int) -> List[Tuple[bytes, bool]]:
        if most <= 0:
            return []
        flat = self._take(keys=self._keys, args=[most, self.id, int(self.lease * 1000)])
        return [(flat[i + 1], flat[i] == b"1") for i in range(0, len(flat), 2)]

    def ack(self, body: bytes) -> None:
        self.redis.lrem(self.taken_key, -1, body)

    def give_back(self, body: bytes) -> None:
        """Return one message to the list's front (it is taken next)."""
        self._give_back(keys=[self.taken_key, self.name], args=[body])

    def ack_with_push(self, body: bytes, target: str, message: bytes) -> None:
        """Push ``message`` on list ``target`` and acknowledge ``body``,
        atomically."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.lpush(target, message)
            pipe.lrem(self.taken_key, -1, body)
            pipe.execute()

    def housekeeping(self, force: bool = False) -> int:
        """Renew the lease and reap dead consumers (at most every
        ``lease / 6`` seconds unless ``force``); return how many messages
        were reaped."""
        now = time.monotonic()
        if not force and now < self._next_housekeeping:
            return 0
        self._next_housekeeping = now + self.lease / 6
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(self._keys[4], self.id)
            pipe.set(self._keys[3], b"1", px=int(self.lease * 1000))
            pipe.execute()
        reaped = int(self._reap(keys=[self._keys[4], self._keys[1]],
                                args=[self.name + ".alive.", self.name + ".taken."]))
        if reaped:
            log.warning("%s: %d message(s) of a consumer that stopped renewing its lease "
                        "handed out again", self.name, reaped)
        return int(reaped)

    def leave(self) -> None:
        """Give back everything held and end the lease (a clean exit):
        what is left is handed out at once, not after the lease."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._keys[3])
            pipe.execute()
        self._reap(keys=[self._keys[4], self._keys[1]],
                   args=[self.name + ".alive.", self.name + ".taken."])


class RedisTransport:
    """The worker's broker on Redis: jobs from ``Q`` (a ReliableList),
    results to ``Q.results``, dead letters to ``Q.dead``, retries through
    the ``Q.delayed`` sorted set."""

    #: poll() returns at once; the worker does the waiting.
    blocks = False
    #: redis-py reconnects by itself, and what this worker took stays in
    #: its own list, its handles still good.
    survives_reconnect = True

    def __init__(self, broker_url: str, queue: str, lease: Optional[float]) -> None:
        self.redis = client(broker_url)
        self.redis.ping()
        self.queue = queue
        self.jobs = ReliableList(self.redis, queue, DEFAULT_LEASE if lease is None else lease)
        self.results = queue + ".results"
        self.dead_name = queue + ".dead"
        self.delayed = queue + ".delayed"
        self._delay = self.redis.register_script(_DELAY)
        self._move_due = self.redis.register_script(_MOVE_DUE)
        self._next_due = 0.0
        self._taking = True

    def poll(self, timeout: float, room: int) -> List[Tuple[bytes, bool, Any]]:
        """Up to ``room`` jobs as (body, redelivered, handle), at once:
        this never waits (``blocks`` is False), the worker waits for its
        engine instead, then polls again (a blocking take would need a
        connection per list and could not watch the engine)."""
        del timeout
        self.housekeeping()
        got = self.jobs.take(room) if self._taking else []
        return [(body, again, body) for body, again in got]

    def housekeeping(self) -> None:
        self.jobs.housekeeping()
        now = time.monotonic()
        if now >= self._next_due:
            self._next_due = now + 1.0
            self._move_due(keys=[self.delayed, self.queue], args=[100])

    def stop_taking(self) -> None:
        self._taking = False

    def finish(self, body: bytes, result: bytes,
               before_ack: Optional[Callable[[], None]] = None) -> None:
        if before_ack is None:
            self.jobs.ack_with_push(body, self.results, result)
            return
        self.redis.lpush(self.results, result)
        before_ack()
        self.jobs.ack(body)

    def retry(self, body: bytes, retry: bytes, delay: float) -> None:
        self._delay(keys=[self.delayed, self.jobs.taken_key], args=[body, delay, retry])

    def dead(self, body: bytes, record: bytes, reason: str) -> None:
        del reason                          # in the record; Redis has no headers
        self.jobs.ack_with_push(body, self.dead_name, record)

    def give_back(self, body: bytes) -> None:
        self.jobs.give_back(body)

    def ack(self, body: bytes) -> None:
        self.jobs.ack(body)

    def close(self) -> None:
        """Give back what is still held (its deliveries were abandoned
        with the engine) so that another worker takes it at once."""
        try:
            self.jobs.leave()
        finally:
            self.redis.close()
