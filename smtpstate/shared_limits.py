"""Message rates shared by every worker of a cluster, kept in Redis.

``Engine(limits=...)`` shapes traffic inside one process, so N worker
processes send N times a limit. This module makes a per-domain message rate
hold for all of them together, as KumoMTA shares its throttles:

* :class:`RateLimiter` is the generic cell rate algorithm (GCRA) as one Lua
  script that Redis runs atomically. A key holds one number, its
  *theoretical arrival time* (TAT); a request is allowed when it is no more
  than ``burst - 1`` intervals early, and otherwise told how long to wait.
  The time is Redis's own (``TIME`` inside the script), so workers on
  machines whose clocks disagree still share one schedule.
* :class:`HeldJobs` is the worker's side: a job over its domain's rate is
  held (still unacknowledged) in due-time order until the limiter's
  retry-after, then asked about again. Only the oldest job of each domain
  asks, so a thousand held jobs cost one Redis call per interval, not a
  thousand. Nothing here sleeps: the worker's loop calls :meth:`HeldJobs.due`.

When Redis cannot be reached nothing is dropped: jobs are held and asked
about again (every second at first, then up to every 30 s), and a warning
is logged at most once a minute. docs/queue.md ("Limits across workers")
says how the worker uses this.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from collections import deque
from typing import (Any, Deque, Dict, Generic, List, Mapping, Optional, Tuple, TypeVar)

from smtpstate.errors import InvalidOptionError

__all__ = ["RateLimiter", "HeldJobs", "shared_rates", "KEY_PREFIX"]

log = logging.getLogger("smtpstate.shared_limits")

#: Redis keys are this prefix and the limited name (a recipient domain).
KEY_PREFIX = "smtpstate:rate:"

# KEYS[1]: the key; ARGV[1]: the emission interval (microseconds, an
# integer); ARGV[2]: the burst (requests allowed at once, >= 1).
# Returns {1, 0} when allowed (and counted), {0, microseconds to wait}.
# Integer microseconds keep every value exact in Lua's doubles (2^53 us is
# 285 years), and string.format('%.0f') writes the TAT without the 14
# significant digits that Lua's tostring() would round it to.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then
  tat = now
end
local allow_at = tat + interval - interval * burst
if allow_at > now then
  return {0, allow_at - now}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat),
           'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, 0}
"""


def _safe_url(url: str) -> str:
    """``url`` without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{host}" if ":" in userinfo \
        else url


def _redis_client(url: str, timeout: float) -> Any:
    try:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError:
        raise ImportError("shared limits need the redis client: "
                          "pip install 'smtpstate[queue]'") from None
    try:
        # Short timeouts and no retries inside redis-py: the caller is the
        # worker's broker loop, which must not stall while Redis is away;
        # HeldJobs does the retrying, spaced out.
        return redis.Redis.from_url(url, socket_timeout=timeout,
                                    socket_connect_timeout=timeout,
                                    retry=Retry(NoBackoff(), 0))
    except ValueError as e:
        raise InvalidOptionError(f"shared limits URL {url!r}: {e} (give "
                                 "redis://host:port/db, rediss://... or unix://...)") from None


class RateLimiter:
    """An atomic GCRA rate limiter in Redis, shared by everyone who uses
    the same Redis database and key names.

    Args:
        url: a redis-py URL (``redis://host:6379/1``, ``rediss://...``,
            ``unix:///run/redis.sock?db=1``).
        prefix: put before every key name in Redis.
        timeout: seconds for connecting and for each call.

    Raises:
        InvalidOptionError: a URL redis-py cannot use (nothing connects
            before the first :meth:`acquire`).
    """

    def __init__(self, url: str, *, prefix: str = KEY_PREFIX, timeout: float = 1.0) -> None:
        self.url = url
        self.prefix = prefix
        self._redis = _redis_client(url, timeout)
        import redis
        #: What acquire() raises when Redis cannot answer.
        self.errors = redis.RedisError
        self._script = self._redis.register_script(_GCRA)

    def acquire(self, key: str, rate: float, burst: int = 1) -> float:
        """Ask to send one message under ``key`` at ``rate`` per second.

        Args:
            key: the name limited (a recipient domain).
            rate: messages per second, all users of the key together.
            burst: how many may go at once after a quiet spell (1: evenly
                spaced, one every ``1/rate`` seconds).

        Returns:
            0.0 when the message may go now (it is counted), else the
            seconds to wait before asking again (nothing counted).

        Raises:
            InvalidOptionError: a rate or burst that cannot work.
            redis.RedisError: Redis cannot be reached or refused the call.
        """
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) \
                or not 0 < rate <= 1e6 or math.isnan(rate):
            raise InvalidOptionError(f"a shared rate must be a positive number per second "
                                     f"(at most 1e6), not {rate!r}")
        if isinstance(burst, bool) or not isinstance(burst, int) or not 1 <= burst <= 1e6:
            raise InvalidOptionError(f"burst must be an int >= 1, not {burst!r}")
        interval = max(1, round(1e6 / rate))
        allowed, wait_us = self._script(keys=[self.prefix + key], args=[interval, burst])
        return 0.0 if allowed else max(int(wait_us), 1) / 1e6

    def close(self) -> None:
        """Close the connections to Redis."""
        self._redis.close()


def shared_rates(limits: Optional[Mapping[str, Any]]) -> Dict[str, float]:
    """The shared rates that ``limits`` (``{key: Limits}``) define: the
    ``message_rate`` of each domain key (lower case) and of ``"*"``. An
    ``mx:`` key is left out: the MX hosts are known only once the engine
    has looked them up, after the job was let go."""
    rates: Dict[str, float] = {}
    for key, lim in (limits or {}).items():
        rate = getattr(lim, "message_rate", None)
        if rate and isinstance(key, str) and not key.startswith("mx:"):
            rates[key.lower()] = float(rate)
    return rates


T = TypeVar("T")


class HeldJobs(Generic[T]):
    """Jobs waiting for their domain's shared rate, in due-time order.

    Each domain with jobs waiting has a FIFO of them and one entry in a
    heap of (due time, domain); only the FIFO's head asks the limiter, so
    the domain's order is kept and Redis sees one request per domain per
    interval however many jobs wait.

    Args:
        limiter: the shared :class:`RateLimiter`.
        rates: ``{domain: rate}`` with an optional ``"*"`` for every other
            domain (each domain its own key at that rate), as
            :func:`shared_rates` makes.
        burst: passed to :meth:`RateLimiter.acquire`.
        clock: monotonic seconds (for tests).
    """

    #: Seconds before asking again after Redis failed: the first, and the
    #: most (doubling in between).
    RETRY_FIRST = 1.0
    RETRY_MAX = 30.0
    #: Seconds between two warnings that Redis cannot be reached.
    WARN_EVERY = 60.0

    def __init__(self, limiter: RateLimiter, rates: Mapping[str, float], *, burst: int = 1,
                 clock: Any = time.monotonic) -> None:
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise InvalidOptionError(f"burst must be an int >= 1, not {burst!r}")
        self.limiter = limiter
        self.rates = {k.lower(): float(v) for k, v in rates.items()}
        self.burst = burst
        self._clock = clock
        self._waiting: Dict[str, Deque[T]] = {}
        self._heap: List[Tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._down_until = 0.0
        self._down_for = 0.0
        self._warned = -math.inf
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def rate_for(self, domain: str) -> Optional[float]:
        """The shared rate for ``domain``: its own, else ``"*"``'s, else None."""
        domain = domain.lower()
        rate = self.rates.get(domain)
        return rate if rate is not None else self.rates.get("*")

    def admit(self, domain: str, job: T) -> bool:
        """True when ``job`` may go now (counted against its domain's rate,
        or its domain has none); else it is held until :meth:`due` returns
        it."""
        domain = domain.lower()
        if not domain or self.rate_for(domain) is None:
            return True
        queue = self._waiting.get(domain)
        if queue:                                # behind the domain's older jobs
            queue.append(job)
            self._count += 1
            return False
        now = self._clock()
        wait = self._down_until - now if now < self._down_until else self._ask(domain, now)
        if wait <= 0:
            return True
        self._waiting[domain] = deque([job])
        self._count += 1
        heapq.heappush(self._heap, (now + wait, next(self._seq), domain))
        return False

    def next_due(self) -> Optional[float]:
        """Seconds until the next held job may be asked about; None when none is held."""
        if not self._heap:
            return None
        return max(0.0, self._heap[0][0] - self._clock())

    def due(self) -> List[T]:
        """The held jobs let go now (each counted against its rate), oldest
        first per domain; the others stay held."""
        out: List[T] = []
        now = self._clock()
        while self._heap and self._heap[0][0] <= now:
            _, _, domain = heapq.heappop(self._heap)
            queue = self._waiting[domain]
            wait = 0.0
            while queue:
                wait = (self._down_until - now if now < self._down_until
                        else self._ask(domain, now))
                if wait > 0:
                    break
                out.append(queue.popleft())
                self._count -= 1
            if queue:
                heapq.heappush(self._heap, (now + wait, next(self._seq), domain))
            else:
                del self._waiting[domain]
        return out

    def peek(self) -> List[T]:
        """Every held job, still held."""
        return [job for queue in self._waiting.values() for job in queue]

    def drain(self) -> List[T]:
        """Every held job (the worker gives them back when it stops)."""
        out = [job for queue in self._waiting.values() for job in queue]
        self._waiting.clear()
        self._heap.clear()
        self._count = 0
        return out

    def _ask(self, domain: str, now: float) -> float:
        """Seconds to wait before ``domain``'s next job may go (0: go)."""
        rate = self.rate_for(domain)
        assert rate is not None
        try:
            wait = self.limiter.acquire(domain, rate, self.burst)
        except self.limiter.errors as e:
            # Fail safe: a job is never let go unlimited, dropped or
            # dead-lettered because Redis is away; it waits, and the
            # questions are spaced out so that the loop stays responsive.
            self._down_for = min(self.RETRY_MAX, max(self.RETRY_FIRST, self._down_for * 2))
            self._down_until = now + self._down_for
            if now - self._warned >= self.WARN_EVERY:
                self._warned = now
                log.warning("shared limits: Redis at %s cannot be reached (%s); jobs over "
                            "a shared rate wait (%d held), asking again in %.0f s",
                            _safe_url(self.limiter.url), e, self._count, self._down_for)
            return self._down_for
        if self._down_for:
            log.warning("shared limits: Redis at %s answers again",
                        _safe_url(self.limiter.url))
            self._down_for = 0.0
            self._warned = -math.inf
        return wait
