"""MTA-STS discovery for the Engine (RFC 8461 3, 5): which recipient
domains publish a policy, fetched off the engine's loop.

The engine enforces the policies it is given (csrc/sts.c); this module
finds them. For each recipient domain of a message routed by MX that was
not looked at lately, a worker thread asks for the domain's
``_mta-sts`` TXT record (through the engine's resolver settings, in C:
``smtps_lookup_txt``), and when it announces a policy id the cache does
not have, the address of ``mta-sts.<domain>`` (``smtps_lookup_address``)
and the policy itself over HTTPS (:func:`smtpstate.mta_sts.fetch_policy`).
Meanwhile the Engine holds that domain's messages; when the answer is in,
it gives the engine the policy and submits them.

What fails (no answer, an HTTPS error, a policy that does not parse) is
logged and leaves the domain with the policy it had, if any (RFC 8461
5.1: a cached policy stays in force until it expires), else none: mail
is never held back for want of a policy server.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Deque, Dict, Iterable, List, Optional, Set, Tuple

from smtpstate._ffi import ffi, lib
from smtpstate.errors import InvalidOptionError
from smtpstate.mta_sts import (MTASTSError, Policy, PolicyCache, fetch_policy, parse_policy,
                               parse_txt_records)

__all__ = ["MtaSts"]

log = logging.getLogger("smtpstate.mta_sts")

_TXT_MAX = 4096


@dataclass(frozen=True)
class MtaSts:
    """How the Engine finds MTA-STS policies (``Engine(mta_sts=...)``).

    Args:
        cache: where policies are kept (a
            :class:`~smtpstate.mta_sts.PolicyCache`, with a file to
            survive restarts); None: one in memory.
        port: the HTTPS port of ``mta-sts.<domain>`` (443; tests use
            others).
        ca_file: extra CAs for the policy servers' certificates (tests);
            None: the system store.
        timeout: seconds for one policy fetch, all of it.
        recheck: seconds before a domain's TXT record is looked at again.
        workers: threads fetching at once.

    Raises:
        InvalidOptionError: a value that cannot work.
    """

    cache: Optional[PolicyCache] = None
    port: int = 443
    ca_file: Optional[str] = None
    timeout: float = 10.0
    recheck: float = 3600.0
    workers: int = 4

    def __post_init__(self) -> None:
        if self.cache is not None and not isinstance(self.cache, PolicyCache):
            raise InvalidOptionError(f"cache must be a PolicyCache, not {self.cache!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) \
                or not 1 <= self.port <= 65535:
            raise InvalidOptionError(f"port must be 1-65535, not {self.port!r}")
        for name in ("timeout", "recheck"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 \
                    or math.isinf(v):
                raise InvalidOptionError(f"{name} must be a positive number of seconds, "
                                         f"not {v!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) \
                or not 1 <= self.workers <= 64:
            raise InvalidOptionError(f"workers must be an int from 1 to 64, not {self.workers!r}")


def _domain_of(address: str) -> Optional[str]:
    """The domain of a recipient, lower case; None for an address literal
    or none at all (no policy can apply)."""
    at = address.rfind("@")
    if at < 0 or address[at + 1:at + 2] == "[":
        return None
    return address[at + 1:].rstrip(".").lower() or None


class Discovery:
    """One Engine's: the domains decided, those being looked at, and the
    worker threads. Used from the Engine's thread only (the workers only
    run _discover())."""

    def __init__(self, settings: MtaSts, resolver: Any) -> None:
        self.settings = settings
        self.cache = settings.cache if settings.cache is not None else PolicyCache()
        # The lookup context is made by the first worker that needs it:
        # under the root's trust anchors it first asks for the root's keys
        # (resolve.c), which must not hold up the engine's thread.
        self._resolver = resolver
        self._lookup: Any = None
        self._lookup_lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            settings.workers, thread_name_prefix="smtpstate-mta-sts")
        self._decided: Dict[str, float] = {}          # domain -> look again after
        # One lookup context for every worker: libunbound lets several
        # threads resolve through one context at once (it locks inside).
        self._running: Dict[str, concurrent.futures.Future] = {}
        # Fetches that failed, for TLS reports (RFC 8460 4.3.2.2): appended
        # by the workers, taken by the Engine (deque: thread-safe).
        self._failed: Deque[Tuple[str, str, str]] = collections.deque()

    # -- the Engine's side -------------------------------------------------------

    def waiting(self, recipients: Iterable[str]) -> Set[str]:
        """The domains of these recipients not decided yet; looking at each
        begins now if it had not."""
        now = time.monotonic()
        out: Set[str] = set()
        for rcpt in recipients:
            domain = _domain_of(rcpt)
            if domain is None or domain in out:
                continue
            until = self._decided.get(domain)
            if until is not None and now < until:
                continue
            out.add(domain)
            if domain not in self._running:
                self._running[domain] = self._pool.submit(self._discover, domain)
        return out

    def failures(self) -> List[Tuple[str, str, str]]:
        """(domain, RFC 8460 result type, what failed) of each policy
        fetch that failed since the last call."""
        out = []
        while self._failed:
            out.append(self._failed.popleft())
        return out

    def busy(self) -> bool:
        return bool(self._running)

    def finished(self) -> List[Tuple[str, Optional[Policy]]]:
        """The domains decided since the last call, with their policy."""
        done = [(d, f) for d, f in self._running.items() if f.done()]
        out: List[Tuple[str, Optional[Policy]]] = []
        until = time.monotonic() + self.settings.recheck
        for domain, future in done:
            del self._running[domain]
            self._decided[domain] = until
            try:
                out.append((domain, future.result()))
            except Exception as e:                 # a bug of ours: mail still goes
                log.error("MTA-STS discovery for %s failed: %r", domain, e)
                out.append((domain, None))
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- a worker's side -----------------------------------------------------------

    def _discover(self, domain: str) -> Optional[Policy]:
        """The policy in force for domain now: fetched when the TXT record
        announces one the cache does not have; else the cached one."""
        now = time.time()
        cached = self.cache.get(domain, now)
        txt_id = None
        try:
            records = self._txt("_mta-sts." + domain)
            txt_id = parse_txt_records(records) if records else None
            if txt_id is None or not self.cache.refresh_needed(domain, txt_id, now):
                return cached
            address = self._address("mta-sts." + domain)
            text = fetch_policy(domain, address=address, port=self.settings.port,
                                timeout=self.settings.timeout, ca_file=self.settings.ca_file)
            policy = parse_policy(text, txt_id, now)
        except (MTASTSError, OSError) as e:
            kind = getattr(e, "result_type", "sts-policy-fetch-error")
            if txt_id is not None or cached is not None:
                # A policy there is (announced, or known): its failure is
                # one to report; a lookup that failed without either is not.
                self._failed.append((domain, kind, str(e)))
            log.warning("MTA-STS policy of %s not fetched (%s): %s; %s", domain, kind, e,
                        "keeping the cached one" if cached else "no policy")
            return cached
        self.cache.put(domain, policy)
        log.info("MTA-STS policy of %s: mode %s, mx %s, max_age %d", domain, policy.mode,
                 " ".join(policy.mx), policy.max_age)
        return policy

    def _context(self) -> Any:
        """The lookup context, made now if it was not (in a worker)."""
        with self._lookup_lock:
            if self._lookup is None:
                keep: List[Any] = []
                why = ffi.new("char[]", 512)
                ptr = lib.smtps_lookup_new(self._resolver._config(keep), why, 512)
                if ptr == ffi.NULL:
                    raise OSError("MTA-STS lookups cannot start: "
                                  + ffi.string(why).decode("utf-8", "replace"))
                self._lookup = ffi.gc(ptr, lib.smtps_lookup_free)
            return self._lookup

    def _txt(self, name: str) -> List[str]:
        buf = ffi.new("char[]", _TXT_MAX)
        n = lib.smtps_lookup_txt(self._context(), name.encode("idna"), buf, _TXT_MAX)
        if n < 0:
            raise OSError(f"the TXT lookup of {name} failed: "
                          + ffi.string(lib.smtps_strerror(n)).decode())
        return ffi.string(buf).decode("utf-8", "replace").split("\n") if n else []

    def _address(self, name: str) -> str:
        buf = ffi.new("char[]", 64)
        n = lib.smtps_lookup_address(self._context(), name.encode("idna"), buf, 64)
        if n <= 0:
            raise OSError(f"{name} has no address" + (
                "" if n == 0 else ": " + ffi.string(lib.smtps_strerror(n)).decode()))
        return ffi.string(buf).decode("ascii")
