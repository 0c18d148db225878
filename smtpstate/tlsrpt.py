"""TLS reports (RFC 8460): what became of TLS, per recipient domain.

The Engine records a :class:`TlsEvent` for every TLS attempt its
connections make (one per connection that wanted TLS, once its outcome is
known), for every MX host DANE kept it from using, for every domain whose
MTA-STS policy matched none of its MX hosts, and for every MTA-STS policy
it failed to fetch. ``Engine(on_tls_event=...)`` sees each one as it
happens; :class:`TlsReports` (``engine.tls_report(...)``) adds them up
into the aggregate report of RFC 8460 section 4, as the JSON structure a
report is (a ``dict``; ``json.dumps`` it). Sending reports to the
addresses in a domain's ``_smtp._tls`` TXT record is the caller's choice.

How sessions count: a connection counts once for each recipient domain of
the messages it was opened for (the first message, in practice: its TLS is
settled after the first EHLO); a destination given by host name is its own
domain. A connection that never got as far as TLS (refused greeting, lost
before EHLO) is no TLS attempt and does not count; nor does one in clear
after opportunistic TLS failed at that address (the failure counted).

Counts are kept by the minute, for ``retention`` seconds: a report counts
the events of the minutes from ``start`` up to ``end``, both taken down to
the whole minute (reports cover whole UTC days, RFC 8460 4.1).
"""

from __future__ import annotations

import collections
import datetime
import threading
from dataclasses import dataclass
from typing import Any, Counter, Dict, Iterable, List, Optional, Tuple, Union

from smtpstate.errors import InvalidOptionError

__all__ = ["TlsEvent", "TlsReports", "RESULT_TYPES", "POLICY_TYPES"]

#: The result types of RFC 8460 4.3, and "success".
RESULT_TYPES = frozenset({
    "success",
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
    "certificate-not-trusted", "validation-failure",
    "tlsa-invalid", "dnssec-invalid", "dane-required",
    "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",
})

#: The policy types of RFC 8460 4.4.
POLICY_TYPES = frozenset({"tlsa", "sts", "no-policy-found"})

Moment = Union[float, int, datetime.datetime]


@dataclass(frozen=True)
class TlsEvent:
    """One TLS attempt (or a policy failure), for one recipient domain.

    Attributes:
        time: when it was recorded (``time.time()``).
        domain: the recipient domain (the policy domain of RFC 8460).
        policy_type: ``"tlsa"`` (DANE applied), ``"sts"`` (the domain's
            MTA-STS policy, enforce or testing) or ``"no-policy-found"``.
        policy_string: the policy: the TLSA records (``"3 1 1 <hex>"``), or
            the MTA-STS policy's lines; empty without a policy.
        mx_patterns: an MTA-STS policy's ``mx`` patterns; else empty.
        result_type: ``"success"`` or a result type of RFC 8460 4.3.
        mx_host: the MX host (or the host given); "" when none was tried.
        receiving_ip: its address; "" when none.
        sending_ip: ours; "" when not known.
        level: the TLS the connection was to use: ``"opportunistic"``,
            ``"verify"``, ``"implicit"``, ``"dane"`` (the host's TLSA
            records), ``"mta-sts"`` (verified, as the policy asks).
        detail: what failed, in words (the report's failure-reason-code);
            "" on success.
        tls_version: ``"TLSv1.3"`` and the like; "" when TLS did not come up.
        verified: the server was authenticated (certificate or TLSA records).
        resumed: TLS was up on a resumed session.
    """

    time: float
    domain: str
    policy_type: str
    policy_string: Tuple[str, ...]
    mx_patterns: Tuple[str, ...]
    result_type: str
    mx_host: str = ""
    receiving_ip: str = ""
    sending_ip: str = ""
    level: str = ""
    detail: str = ""
    tls_version: str = ""
    verified: bool = False
    resumed: bool = False

    @property
    def success(self) -> bool:
        return self.result_type == "success"


# What a report groups by: the policy, and (for failures) the failure.
_PolicyKey = Tuple[str, Tuple[str, ...], Tuple[str, ...]]
_FailureKey = Tuple[str, str, str, str, str]


def _seconds(moment: Moment, what: str) -> float:
    if isinstance(moment, datetime.datetime):
        if moment.tzinfo is None:
            raise InvalidOptionError(f"{what} must be an aware datetime (UTC), not a naive one")
        return moment.timestamp()
    if isinstance(moment, bool) or not isinstance(moment, (int, float)):
        raise InvalidOptionError(f"{what} must be a datetime or seconds since the epoch, "
                                 f"not {moment!r}")
    return float(moment)


def _rfc3339(seconds: float) -> str:
    when = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


class TlsReports:
    """TLS events added up by recipient domain and minute; thread-safe.

    Args:
        retention: seconds of events kept (default two days: a day's report
            can still be made the day after).
    """

    def __init__(self, retention: float = 2 * 86400.0) -> None:
        if isinstance(retention, bool) or not isinstance(retention, (int, float)) \
                or retention <= 0:
            raise InvalidOptionError(f"retention must be a positive number of seconds, "
                                     f"not {retention!r}")
        self.retention = float(retention)
        self._lock = threading.Lock()
        # domain -> minute -> Counter of (policy, failure or None)
        self._counts: Dict[str, Dict[int, Counter[Tuple[_PolicyKey, Optional[_FailureKey]]]]] \
            = {}
        self._pruned = 0

    def add(self, event: TlsEvent) -> None:
        """Count one event."""
        if event.result_type not in RESULT_TYPES:
            raise InvalidOptionError(f"result type {event.result_type!r} is not one of "
                                     f"RFC 8460's: {sorted(RESULT_TYPES)}")
        if event.policy_type not in POLICY_TYPES:
            raise InvalidOptionError(f"policy type {event.policy_type!r} is not one of "
                                     f"{sorted(POLICY_TYPES)}")
        policy = (event.policy_type, event.policy_string,
                  event.mx_patterns if event.policy_type == "sts"
                  else ((event.mx_host,) if event.policy_type == "tlsa" and event.mx_host
                        else ()))
        failure = None if event.success else (
            event.result_type, event.sending_ip, event.mx_host, event.receiving_ip,
            event.detail)
        minute = int(event.time // 60)
        with self._lock:
            by_minute = self._counts.setdefault(event.domain.lower().rstrip("."), {})
            counter = by_minute.get(minute)
            if counter is None:
                counter = by_minute[minute] = collections.Counter()
            counter[(policy, failure)] += 1
            if minute > self._pruned:
                self._prune(minute)

    def _prune(self, minute: int) -> None:
        """Forget minutes past retention (at most once a minute)."""
        self._pruned = minute
        oldest = minute - int(self.retention // 60)
        for domain in list(self._counts):
            by_minute = self._counts[domain]
            for m in [m for m in by_minute if m < oldest]:
                del by_minute[m]
            if not by_minute:
                del self._counts[domain]

    def domains(self, start: Moment, end: Moment) -> List[str]:
        """The domains with events between start and end, sorted."""
        first, last = self._range(start, end)
        with self._lock:
            return sorted(d for d, by_minute in self._counts.items()
                          if any(first <= m < last for m in by_minute))

    @staticmethod
    def _range(start: Moment, end: Moment) -> Tuple[int, int]:
        s, e = _seconds(start, "start"), _seconds(end, "end")
        if e <= s:
            raise InvalidOptionError(f"end ({_rfc3339(e)}) must come after start "
                                     f"({_rfc3339(s)})")
        return int(s // 60), int(e // 60)

    def report(self, domain: str, start: Moment, end: Moment, *,
               organization_name: str, contact_info: str,
               report_id: Optional[str] = None) -> Dict[str, Any]:
        """The aggregate report (RFC 8460 4.4) of domain's events from
        start up to end (datetimes or seconds since the epoch).

        Args:
            domain: the recipient (policy) domain.
            organization_name: who reports (the RFC's organization-name).
            contact_info: how to reach them, e.g. an e-mail address.
            report_id: unique per report; default: made of the range, the
                domain and the organization.

        Returns:
            The report as a dict, ready for ``json.dumps``; a domain
            without events has an empty ``policies`` list.
        """
        first, last = self._range(start, end)
        for value, what in ((organization_name, "organization_name"),
                            (contact_info, "contact_info")):
            if not isinstance(value, str) or not value:
                raise InvalidOptionError(f"{what} must be a non-empty str, not {value!r}")
        key = domain.lower().rstrip(".")
        total: Counter[Tuple[_PolicyKey, Optional[_FailureKey]]] = collections.Counter()
        with self._lock:
            for minute, counter in self._counts.get(key, {}).items():
                if first <= minute < last:
                    total.update(counter)
        begin, finish = _rfc3339(first * 60.0), _rfc3339(last * 60.0)
        if report_id is None:
            report_id = f"{begin}_{finish}_{key}@{organization_name}"
        return {
            "organization-name": organization_name,
            "date-range": {"start-datetime": begin, "end-datetime": finish},
            "contact-info": contact_info,
            "report-id": report_id,
            "policies": _policies(key, total.items()),
        }


def _policies(domain: str, counts: Iterable[Tuple[Tuple[_PolicyKey, Optional[_FailureKey]],
                                                  int]]) -> List[Dict[str, Any]]:
    """The report's "policies" array: one entry per policy seen."""
    by_policy: Dict[_PolicyKey, Dict[str, Any]] = {}
    for (policy, failure), n in sorted(counts, key=lambda item: repr(item[0])):
        entry = by_policy.get(policy)
        if entry is None:
            kind, strings, hosts = policy
            described: Dict[str, Any] = {"policy-type": kind}
            if strings:
                described["policy-string"] = list(strings)
            described["policy-domain"] = domain
            if hosts:
                described["mx-host"] = list(hosts)
            entry = by_policy[policy] = {
                "policy": described,
                "summary": {"total-successful-session-count": 0,
                            "total-failure-session-count": 0},
                "failure-details": [],
            }
        if failure is None:
            entry["summary"]["total-successful-session-count"] += n
            continue
        entry["summary"]["total-failure-session-count"] += n
        result_type, sending_ip, mx_host, receiving_ip, detail = failure
        item: Dict[str, Any] = {"result-type": result_type}
        if sending_ip:
            item["sending-mta-ip"] = sending_ip
        if mx_host:
            item["receiving-mx-hostname"] = mx_host
        if receiving_ip:
            item["receiving-ip"] = receiving_ip
        item["failed-session-count"] = n
        if detail:
            item["failure-reason-code"] = detail
        entry["failure-details"].append(item)
    out = []
    for entry in by_policy.values():
        if not entry["failure-details"]:
            del entry["failure-details"]
        out.append(entry)
    return out
