"""MTA-STS (RFC 8461): a recipient domain's policy, from its TXT record to
the cache, without the engine.

This module owns four steps, each usable alone:

* :func:`parse_txt` reads the ``_mta-sts.<domain>`` TXT record (§3.1) and
  returns its policy id, or None: no policy to look for;
* :func:`fetch_policy` gets ``https://mta-sts.<domain>/.well-known/mta-sts.txt``
  (§3.3) with the standard library's ``http.client`` and ``ssl``;
* :func:`parse_policy` turns that text into a :class:`Policy` (§3.2), whose
  :meth:`Policy.matches` says whether an MX host is allowed (§4.1);
* :class:`PolicyCache` keeps policies per domain, in memory and optionally
  in a JSON file, and says when one must be fetched again (§5.1).

Rule: nothing here resolves names for the engine. The engine looks up the
TXT record and the policy host's address with its own resolver and passes
them in (``parse_txt(text)``, ``fetch_policy(domain, address=ip)``); TLS
still checks the certificate against ``mta-sts.<domain>``.

Rule: a remote party's fault is an :class:`~smtpstate.MTASTSError` whose
``result_type`` is the RFC 8460 (TLSRPT) result type; a caller's mistake
(a malformed domain, a negative timeout) is an
:class:`~smtpstate.InvalidOptionError`. Text that came from the network is
made printable (:func:`smtpstate.logs.printable`) before it reaches a
message or a log record.

Times (``now``, ``fetched_at``) are wall-clock seconds (``time.time()``):
they outlive the process in the cache's file.
"""

from __future__ import annotations

import heapq
import http.client
import ipaddress
import json
import logging
import math
import os
import re
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

from smtpstate.errors import (
    InvalidOptionError,
    MTASTSError,
    PolicyError,
    PolicyFetchError,
)
from smtpstate.logs import printable

__all__ = [
    "MAX_AGE_LIMIT",
    "MODES",
    "MTASTSError",
    "Policy",
    "PolicyCache",
    "PolicyError",
    "PolicyFetchError",
    "fetch_policy",
    "parse_policy",
    "parse_txt",
    "parse_txt_records",
]

log = logging.getLogger("smtpstate.mta_sts")

#: The policy modes of RFC 8461 §5.
MODES = ("enforce", "testing", "none")

#: The largest max_age a policy may have, in seconds (§3.2: about a year).
MAX_AGE_LIMIT = 31557600

WELL_KNOWN_PATH = "/.well-known/mta-sts.txt"

# How much of a peer's text goes into one error message.
_QUOTE_LIMIT = 80


def _quote(text: Any) -> str:
    """Peer text for a message: printable, quoted, cut to _QUOTE_LIMIT."""
    shown = printable(text)
    if len(shown) > _QUOTE_LIMIT:
        shown = shown[:_QUOTE_LIMIT] + "..."
    return f"'{shown}'"


# ---------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------

# RFC 5321 sub-domain (Let-dig [Ldh-str]), with DNS's 63-octet label limit.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def _is_hostname(name: str) -> bool:
    """``name`` (no trailing dot) is an ASCII LDH host name of at most 253
    characters."""
    return len(name) <= 253 and _HOSTNAME_RE.fullmatch(name) is not None


def _domain(domain: Any, what: str = "domain") -> str:
    """``domain`` as the key it is known by: lower case, no trailing dot.

    Raises:
        InvalidOptionError: not a str, not ASCII (give the A-label), or not
            a host name.
    """
    if not isinstance(domain, str):
        raise InvalidOptionError(f"{what} must be a str, not {type(domain).__name__}")
    name = domain[:-1] if domain.endswith(".") else domain
    if not name.isascii():
        raise InvalidOptionError(f"{what} {domain!r} is not ASCII: give its A-label "
                                 "(xn--...), as DNS knows it")
    if not _is_hostname(name):
        raise InvalidOptionError(f"{what} {domain!r} is not a host name: letters, digits "
                                 "and '-' in dot-separated labels of 1-63 characters, "
                                 "253 in all")
    return name.lower()


# ---------------------------------------------------------------------------
# The TXT record (§3.1)
# ---------------------------------------------------------------------------

# sts-field-delim, sts-id and sts-extension. An id field is also an
# extension as far as the grammar goes; which one it is gets decided after
# the record as a whole has matched.
_TXT_DELIM = r"[ \t]*;[ \t]*"
_TXT_FIELD = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}=[\x21-\x3a\x3c\x3e-\x7e]+"
_TXT_RE = re.compile(rf"v=STSv1(?:{_TXT_DELIM}{_TXT_FIELD})+(?:{_TXT_DELIM})?")
_TXT_DELIM_RE = re.compile(_TXT_DELIM)
_TXT_ID_RE = re.compile(r"[A-Za-z0-9]{1,32}")
_TXT_PREFIX_RE = re.compile(r"v=STSv1[ \t]*;")


def parse_txt(txt: str) -> Optional[str]:
    """The policy id of one ``_mta-sts.<domain>`` TXT record (RFC 8461
    §3.1), or None when it is not a valid STSv1 record.

    ``"v=STSv1; id=20160831085700Z;"``: ``v=STSv1`` first, then fields
    separated by ``;`` (spaces and tabs allowed around it, a final ``;``
    optional), among them ``id`` (1-32 letters and digits). Other fields
    are extensions and are ignored; when ``id`` appears more than once the
    first counts (§3.2). Names and values are case-sensitive.

    Args:
        txt: the record's text: the character-strings of its RDATA
            joined with nothing in between, as for SPF.

    Returns:
        The id, or None: not STSv1, no ``id``, an ``id`` that is not 1-32
        letters and digits, or any syntax error. None means the domain
        has no policy to fetch now (a cached one stays in force).
    """
    if not isinstance(txt, str) or _TXT_RE.fullmatch(txt) is None:
        return None
    fields = _TXT_DELIM_RE.split(txt)[1:]
    ids = [field[3:] for field in fields if field.startswith("id=")]
    if not ids or _TXT_ID_RE.fullmatch(ids[0]) is None:
        return None
    return ids[0]


def parse_txt_records(records: Iterable[str]) -> Optional[str]:
    """The policy id from all the TXT records at ``_mta-sts.<domain>``
    (RFC 8461 §3.1): records that do not begin with ``v=STSv1;`` are
    discarded; exactly one must remain, and be valid.

    Returns:
        The id, or None (none left, several left, or the one left is
        invalid): the domain has no policy to fetch now.
    """
    candidates = [r for r in records if isinstance(r, str) and _TXT_PREFIX_RE.match(r)]
    if len(candidates) != 1:
        return None
    return parse_txt(candidates[0])


# ---------------------------------------------------------------------------
# The policy (§3.2) and MX matching (§4.1)
# ---------------------------------------------------------------------------

# A line is "name:" *WSP value *WSP; the name as sts-policy-ext-name.
_POLICY_LINE_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,31}):[ \t]*(.*?)[ \t]*")
# sts-policy-ext-value: VCHAR or UTF-8 beyond ASCII, spaces and tabs only
# inside (the trailing ones are already stripped).
_POLICY_VALUE_RE = re.compile(r"[\x21-\x7e\x80-\U0010ffff](?:[ \t\x21-\x7e\x80-\U0010ffff]*"
                              r"[\x21-\x7e\x80-\U0010ffff])?")
_MAX_AGE_RE = re.compile(r"[0-9]{1,10}")
_REQUIRED = ("version", "mode", "max_age")


def _mx_pattern_problem(pattern: str) -> Optional[str]:
    """What is wrong with an mx pattern (``["*."] Domain``), or None."""
    name = pattern[2:] if pattern.startswith("*.") else pattern
    if not name.isascii():
        return "is not ASCII: publish the A-label (xn--...) of an internationalised name"
    if not _is_hostname(name):
        return ("is not a host name or '*.' and one (letters, digits and '-' in "
                "dot-separated labels, no trailing dot)")
    return None


def _check_id(policy_id: Any) -> str:
    if not isinstance(policy_id, str) or _TXT_ID_RE.fullmatch(policy_id) is None:
        raise InvalidOptionError(f"a policy id is 1-32 letters and digits (the TXT "
                                 f"record's id=), not {policy_id!r}")
    return policy_id


def _check_time(value: Any, what: str) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value)):
        raise InvalidOptionError(f"{what} must be a finite number of seconds "
                                 f"(time.time()), not {value!r}")
    return float(value)


@dataclass(frozen=True)
class Policy:
    """One domain's MTA-STS policy, as fetched (RFC 8461 §3.2).

    Made by :func:`parse_policy`; constructing one directly checks the
    same rules.

    Attributes:
        mode: ``"enforce"`` (deliver only to matching MX hosts over
            verified TLS), ``"testing"`` (report failures, deliver anyway)
            or ``"none"`` (the domain withdrew its policy).
        mx: the MX host patterns, as published (``"mail.example.com"``,
            ``"*.example.net"``); empty only in mode ``"none"``.
        max_age: how long the policy may be used after it was fetched, in
            seconds (0-31557600).
        id: the TXT record's id that announced it.
        fetched_at: when it was fetched (``time.time()``).

    Raises:
        InvalidOptionError: a value the RFC does not allow.
    """

    mode: str
    mx: Tuple[str, ...]
    max_age: int
    id: str
    fetched_at: float

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidOptionError(f"mode must be one of {', '.join(MODES)}, "
                                     f"not {self.mode!r}")
        if isinstance(self.mx, str) or not all(isinstance(p, str) for p in self.mx):
            raise InvalidOptionError(f"mx must be a sequence of str patterns, not {self.mx!r}")
        mx = tuple(self.mx)
        for pattern in mx:
            problem = _mx_pattern_problem(pattern)
            if problem:
                raise InvalidOptionError(f"mx pattern {pattern!r} {problem}")
        if not mx and self.mode != "none":
            raise InvalidOptionError(f"a policy in mode {self.mode!r} needs at least one "
                                     "mx pattern (only mode 'none' may have none)")
        if (isinstance(self.max_age, bool) or not isinstance(self.max_age, int)
                or not 0 <= self.max_age <= MAX_AGE_LIMIT):
            raise InvalidOptionError(f"max_age must be an int from 0 to {MAX_AGE_LIMIT} "
                                     f"seconds, not {self.max_age!r}")
        object.__setattr__(self, "mx", mx)
        object.__setattr__(self, "id", _check_id(self.id))
        object.__setattr__(self, "fetched_at", _check_time(self.fetched_at, "fetched_at"))

    @property
    def expires_at(self) -> float:
        """When the policy stops being valid (``fetched_at + max_age``)."""
        return self.fetched_at + self.max_age

    def expired(self, now: float) -> bool:
        """Whether the policy is past its max_age at ``now``
        (``time.time()``): valid while younger than max_age seconds."""
        return now >= self.expires_at

    def matches(self, mx_host: str) -> bool:
        """Whether ``mx_host`` is an MX host this policy allows (RFC 8461
        §4.1): equal to a pattern, or, for ``"*.example.com"``, exactly
        one label followed by ``.example.com`` (so neither
        ``example.com`` nor ``a.b.example.com``). ASCII case does not
        matter, nor a trailing dot on either side.

        The mode is not considered: in mode ``"none"`` nothing is
        enforced, whatever this says.

        Returns:
            False as well for anything that is not an ASCII host name (an
            internationalised MX host must be given as its A-label).
        """
        if not isinstance(mx_host, str):
            return False
        host = mx_host[:-1] if mx_host.endswith(".") else mx_host
        # isascii first: str.lower() folds some non-ASCII letters into ASCII
        # ones (KELVIN SIGN to "k"), which must not make a name match.
        if not host.isascii() or not _is_hostname(host):
            return False
        host = host.lower()
        for pattern in self.mx:
            pattern = pattern.lower()
            if pattern.startswith("*."):
                first, dot, rest = host.partition(".")
                if dot and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False

    def _to_json(self) -> Dict[str, Any]:
        return {"mode": self.mode, "mx": list(self.mx), "max_age": self.max_age,
                "id": self.id, "fetched_at": self.fetched_at}

    @classmethod
    def _from_json(cls, data: Any) -> "Policy":
        """Raises InvalidOptionError, KeyError or TypeError when ``data``
        is not what :meth:`_to_json` wrote."""
        if not isinstance(data, dict) or not isinstance(data["mx"], list):
            raise TypeError(f"not a policy: {data!r}")
        return cls(mode=data["mode"], mx=tuple(data["mx"]), max_age=data["max_age"],
                   id=data["id"], fetched_at=data["fetched_at"])


def _policy_lines(text: str) -> List[str]:
    """The lines of a policy: LF or CRLF terminated, the last terminator
    optional (sts-policy-term)."""
    if text.endswith("\n"):
        text = text[:-1]
    lines = text.split("\n")
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def parse_policy(text: str, id: str, now: float) -> Policy:
    """A :class:`Policy` from the text of ``mta-sts.txt`` (RFC 8461 §3.2).

    The text is lines of ``key: value`` ending in LF or CRLF (the last one
    optional), no blank lines. Keys are case-sensitive; the value starts
    after ``:`` and any spaces or tabs, and trailing ones are dropped.

    * ``version: STSv1``, ``mode`` (enforce, testing or none) and
      ``max_age`` (0-31557600 seconds, at most 10 digits) are required;
    * ``mx`` (a host name or ``*.`` and one, A-labels) is required at least
      once unless the mode is ``none``, and may repeat;
    * a repeated ``version``, ``mode`` or ``max_age`` counts only the first
      time: the later ones are ignored;
    * other keys are extensions: ignored, but their lines must still be
      ``key: value`` (a key of 1-32 letters, digits, ``_``, ``-`` and
      ``.``, a non-empty value without control characters).

    Args:
        text: the body, decoded (UTF-8).
        id: the id of the TXT record that announced the policy.
        now: when it was fetched (``time.time()``): ``fetched_at``.

    Returns:
        The policy.

    Raises:
        PolicyError: the text breaks a rule; the message names the line
            and what is wrong with it (``result_type``
            ``"sts-policy-invalid"``).
        InvalidOptionError: ``id`` or ``now`` is not valid (the caller's
            mistake, not the server's).
    """
    _check_id(id)
    now = _check_time(now, "now")
    if not isinstance(text, str):
        raise InvalidOptionError(f"text must be a str (the body decoded as UTF-8), "
                                 f"not {type(text).__name__}")
    if not text:
        raise PolicyError("the MTA-STS policy is empty: it needs version, mode, "
                          "max_age and mx lines")
    first: Dict[str, Tuple[int, str]] = {}
    mx: List[str] = []
    keys_seen: List[str] = []
    for number, line in enumerate(_policy_lines(text), 1):
        where = f"MTA-STS policy line {number}"
        if not line:
            raise PolicyError(f"{where} is empty: RFC 8461 §3.2 allows no blank lines")
        m = _POLICY_LINE_RE.fullmatch(line)
        if m is None:
            raise PolicyError(f"{where} {_quote(line)} is not 'key: value' (a key of "
                              "1-32 letters, digits, '_', '-' or '.', then ':')")
        key, value = m.group(1), m.group(2)
        if not value:
            raise PolicyError(f"{where}: {key} has no value")
        if _POLICY_VALUE_RE.fullmatch(value) is None:
            raise PolicyError(f"{where}: the value of {key} {_quote(value)} contains a "
                              "control character")
        keys_seen.append(key)
        if key == "mx":
            problem = _mx_pattern_problem(value)
            if problem:
                raise PolicyError(f"{where}: mx {_quote(value)} {problem}")
            mx.append(value)
        elif key in _REQUIRED and key not in first:
            first[key] = (number, value)
        # Later instances of version, mode and max_age are ignored (§3.2),
        # and so is every extension.

    for key in _REQUIRED:
        if key not in first:
            hint = ""
            near = [k for k in keys_seen if k.lower() == key]
            if near:
                hint = f" (there is {near[0]!r}: keys are case-sensitive)"
            raise PolicyError(f"the MTA-STS policy has no {key} line{hint}")
    number, version = first["version"]
    if version != "STSv1":
        raise PolicyError(f"MTA-STS policy line {number}: version {_quote(version)} is "
                          "not STSv1, the only version there is")
    number, mode = first["mode"]
    if mode not in MODES:
        raise PolicyError(f"MTA-STS policy line {number}: mode {_quote(mode)} is not "
                          "enforce, testing or none (case-sensitive)")
    number, age = first["max_age"]
    if _MAX_AGE_RE.fullmatch(age) is None or int(age) > MAX_AGE_LIMIT:
        raise PolicyError(f"MTA-STS policy line {number}: max_age {_quote(age)} is not "
                          f"a number of seconds from 0 to {MAX_AGE_LIMIT} (at most 10 "
                          "digits)")
    if not mx and mode != "none":
        raise PolicyError(f"the MTA-STS policy has no mx line: mode {mode} needs at "
                          "least one MX host pattern")
    return Policy(mode=mode, mx=tuple(mx), max_age=int(age), id=id, fetched_at=now)


# ---------------------------------------------------------------------------
# Fetching (§3.3)
# ---------------------------------------------------------------------------


class _Deadline:
    """One overall time limit for a fetch.

    Each socket operation gets the time that is left as its timeout, which
    is not enough on its own: a server that sends one byte just before
    each timeout would never trip it. So a timer also shuts the
    connection down when the time is up, which makes whatever is blocked
    on it fail at once; ``expired`` then says that this was the reason.
    The timer holds a duplicate of the socket's descriptor, because TLS
    wrapping detaches the original object.
    """

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.expired = False
        self._lock = threading.Lock()
        self._watched: Optional[socket.socket] = None
        self._timer: Optional[threading.Timer] = None

    def left(self) -> float:
        """Seconds left; a timeout of 0 would mean non-blocking, so at
        least a millisecond."""
        left = self.end - time.monotonic()
        if left <= 0:
            self.expired = True
            raise socket.timeout("the time limit is reached")
        return max(left, 0.001)

    def watch(self, sock: socket.socket) -> None:
        """Shut ``sock``'s connection down when the time is up."""
        with self._lock:
            self._watched = sock.dup()
            self._timer = threading.Timer(self.left(), self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if self._watched is None:
                return
            self.expired = True
            try:
                self._watched.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            if self._watched is not None:
                self._watched.close()
                self._watched = None


class _PolicyConnection(http.client.HTTPSConnection):
    """HTTPS to the policy host, with the connection made here: to
    ``address`` when one is given (the engine resolved the name itself),
    within the deadline, with SNI and the certificate check on the host
    name whatever the address."""

    def __init__(self, host: str, port: int, address: Optional[str],
                 context: ssl.SSLContext, deadline: _Deadline) -> None:
        super().__init__(host, port, timeout=deadline.left(), context=context)
        self._address = address
        self._tls = context
        self._deadline = deadline

    def connect(self) -> None:
        sock = socket.create_connection((self._address or self.host, self.port),
                                        self._deadline.left())
        try:
            self._deadline.watch(sock)
            sock.settimeout(self._deadline.left())
            # A body that runs to the end of the connection is complete
            # only if TLS says so (close_notify): a forged FIN must not cut
            # a policy short unnoticed.
            self.sock = self._tls.wrap_socket(sock, server_hostname=self.host,
                                              suppress_ragged_eofs=False)
        except BaseException:
            sock.close()
            raise


def _tls_context(ca_file: Optional[str]) -> ssl.SSLContext:
    """Certificates checked against the system's CAs, and ``ca_file``'s too;
    TLS 1.2 at least (RFC 8461 §3.3 asks for a valid certificate over
    HTTPS, RFC 7525 for the version)."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        if not isinstance(ca_file, (str, os.PathLike)):
            raise InvalidOptionError(f"ca_file must be a path, not {ca_file!r}")
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as e:
            raise InvalidOptionError(f"ca_file {os.fspath(ca_file)!r} cannot be loaded as "
                                     f"PEM CA certificates: {e}") from None
    return context


def _check_fetch_options(address: Optional[str], port: Any, timeout: Any,
                         max_size: Any) -> None:
    if address is not None:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise InvalidOptionError(f"address must be an IP address (the policy host's, "
                                     f"already resolved) or None, not {address!r}") from None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise InvalidOptionError(f"port must be an int from 1 to 65535, not {port!r}")
    if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
            or not 0 < timeout <= 3600 or math.isnan(timeout)):
        raise InvalidOptionError(f"timeout must be a positive number of seconds (at most "
                                 f"3600), not {timeout!r}")
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
        raise InvalidOptionError(f"max_size must be a positive int (bytes), not {max_size!r}")


def fetch_policy(domain: str, *, address: Optional[str] = None, port: int = 443,
                 timeout: float = 10.0, max_size: int = 65536,
                 ca_file: Optional[str] = None) -> str:
    """Fetch ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (RFC 8461
    §3.3) and return its text, for :func:`parse_policy`.

    The server's certificate must be valid for ``mta-sts.<domain>`` (the
    system's CAs, plus ``ca_file``'s). The answer must be a 200 (a
    redirect is not followed) with ``Content-Type: text/plain``
    (parameters allowed) and a UTF-8 body of at most ``max_size`` bytes.
    Nothing is cached here: that is :class:`PolicyCache`'s job.

    Args:
        domain: the recipient domain (A-labels; a trailing dot is fine).
        address: the IP address to connect to instead of resolving
            ``mta-sts.<domain>``; the TLS server name, the certificate
            check and the ``Host`` header still use ``mta-sts.<domain>``.
        port: the port to connect to (443 outside tests).
        timeout: seconds for the whole fetch, from the connection to the
            last byte. Resolving the name when no ``address`` is given is
            left to the system and is not counted.
        max_size: the largest body accepted, in bytes; reading stops
            after one byte more.
        ca_file: a PEM file of CA certificates trusted as well as the
            system's (for tests and private CAs).

    Returns:
        The body, decoded as UTF-8.

    Raises:
        PolicyFetchError: no policy text was had; ``str(error)`` says why
            and ``error.result_type`` which TLSRPT result that is:
            ``"sts-webpki-invalid"`` when the certificate did not verify,
            ``"sts-policy-invalid"`` when a complete 200 answer is not a
            policy document (wrong Content-Type, not UTF-8), and
            ``"sts-policy-fetch-error"`` for everything else (no
            connection, TLS failure, time out, a status other than 200, a
            redirect, a body too large or cut short).
        InvalidOptionError: an argument that cannot work (not a host
            name, a port out of range, an unreadable ``ca_file``...).
    """
    name = "mta-sts." + _domain(domain)
    _check_fetch_options(address, port, timeout, max_size)
    context = _tls_context(ca_file)
    url = f"https://{name}{WELL_KNOWN_PATH}"
    target = f"{address} port {port}" if address else f"{name} port {port}"
    deadline = _Deadline(float(timeout))
    connection: Optional[_PolicyConnection] = None
    log.debug("fetching %s from %s", url, target)
    try:
        connection = _PolicyConnection(name, port, address, context, deadline)
        return _get(connection, name, url, max_size, deadline)
    except PolicyFetchError:
        raise
    except ssl.SSLCertVerificationError as e:
        why = e.verify_message or e.reason or str(e)
        raise PolicyFetchError(f"{url}: the certificate of {target} is not valid for "
                               f"{name}: {why}", "sts-webpki-invalid") from None
    except (OSError, http.client.HTTPException) as e:
        if deadline.expired or isinstance(e, socket.timeout):
            raise PolicyFetchError(f"{url}: no complete answer from {target} within "
                                   f"{timeout:g} s") from None
        raise PolicyFetchError(f"{url}: {_describe(e, target, name)}") from None
    finally:
        if connection is not None:
            connection.close()
        deadline.close()


def _describe(error: BaseException, target: str, name: str) -> str:
    """A failure to connect or to speak HTTPS, in words."""
    if isinstance(error, socket.gaierror):
        return f"{name} could not be resolved: {error.strerror or error}"
    if isinstance(error, ConnectionRefusedError):
        return f"{target} refused the connection"
    if isinstance(error, http.client.RemoteDisconnected):
        return f"{target} closed the connection without answering"
    if isinstance(error, http.client.IncompleteRead):
        return f"{target} closed the connection in the middle of the body"
    if isinstance(error, http.client.HTTPException):
        return f"{target} did not answer in HTTP: {type(error).__name__} {_quote(error)}"
    if isinstance(error, ssl.SSLEOFError):
        return f"{target} closed the connection without ending TLS (close_notify)"
    if isinstance(error, ssl.SSLError):
        return f"TLS with {target} failed: {error.reason or error}"
    return f"{target}: {error.strerror or error}" if isinstance(error, OSError) else str(error)


def _get(connection: _PolicyConnection, name: str, url: str, max_size: int,
         deadline: _Deadline) -> str:
    """One GET on ``connection``, and what came back."""
    connection.putrequest("GET", WELL_KNOWN_PATH, skip_host=True,
                          skip_accept_encoding=True)
    # The policy's URL has no port, whichever one a test connects to.
    connection.putheader("Host", name)
    connection.putheader("Accept", "text/plain")
    connection.putheader("Connection", "close")
    connection.endheaders()
    with connection.getresponse() as response:
        return _read(response, url, max_size, deadline)


def _read(response: http.client.HTTPResponse, url: str, max_size: int,
          deadline: _Deadline) -> str:
    """The answer checked and its body read."""
    if 300 <= response.status < 400:
        location = response.getheader("Location")
        to = f" to {_quote(location)}" if location else ""
        raise PolicyFetchError(f"{url}: HTTP {response.status} redirect{to} not followed "
                               "(RFC 8461 §3.3: the policy must be served at this URL)")
    if response.status != 200:
        raise PolicyFetchError(f"{url}: HTTP {response.status} {_quote(response.reason)}, "
                               "not 200")
    types = response.headers.get_all("Content-Type") or []
    if len(types) != 1:
        raise PolicyFetchError(f"{url}: the answer has {len(types) or 'no'} Content-Type "
                               "headers, not one saying text/plain", "sts-policy-invalid")
    media_type = types[0].split(";", 1)[0].strip().lower()
    if media_type != "text/plain":
        raise PolicyFetchError(f"{url}: Content-Type {_quote(types[0])} is not text/plain",
                               "sts-policy-invalid")
    if response.length is not None and response.length > max_size:
        raise PolicyFetchError(f"{url}: the body is {response.length} bytes, more than "
                               f"the {max_size} accepted")
    body = bytearray()
    while True:
        try:
            chunk = response.read(min(65536, max_size + 1 - len(body)))
        except (ssl.SSLEOFError, http.client.IncompleteRead):
            if deadline.expired:
                raise
            # (How much arrived is unknown: http.client drops the part of
            # a read that ends this way.)
            raise PolicyFetchError(f"{url}: the connection ended in the body, without "
                                   "TLS's close_notify or the end HTTP announced: the "
                                   "policy may be cut short") from None
        if not chunk:
            break
        body += chunk
        if len(body) > max_size:
            raise PolicyFetchError(f"{url}: the body is more than the {max_size} bytes "
                                   "accepted")
    if deadline.expired:
        # The timer shut the connection down: the end was ours, not the
        # server's.
        raise socket.timeout("the time limit is reached")
    if response.length:
        raise PolicyFetchError(f"{url}: the body ended after {len(body)} bytes, "
                               f"{response.length} short of its Content-Length")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PolicyFetchError(f"{url}: the body is not UTF-8 (byte {e.start})",
                               "sts-policy-invalid") from None
    log.debug("fetched %s: %d bytes", url, len(body))
    return text


# ---------------------------------------------------------------------------
# The cache (§5.1)
# ---------------------------------------------------------------------------

_CACHE_FORMAT = "smtpstate-mta-sts-cache"
_CACHE_VERSION = 1


class PolicyCache:
    """Policies by recipient domain, thread-safe, optionally kept in a
    JSON file across restarts.

    What RFC 8461 §5.1 asks of a sender's cache: a policy is used until
    its max_age runs out even when the domain's TXT record is gone (an
    attacker who blocks DNS cannot switch it off), and fetched again when
    the TXT record's id changes or the policy expired.

    Args:
        path: the JSON file. Read when the cache is made (a file that does
            not exist yet is an empty cache; one that cannot be read or is
            not a cache is logged on ``smtpstate.mta_sts`` and ignored,
            and so is each entry that is not a valid policy); rewritten
            whole on each change, to a temporary file in the same
            directory then renamed over it, so a crash leaves the old file
            or the new one, never half of one. One process per file. None:
            memory only.

    Any number of threads may share one cache; a lookup never waits for
    the file to be written.
        max_entries: how many domains are kept; beyond that the policy
            fetched longest ago is dropped.

    Raises:
        InvalidOptionError: max_entries is not a positive int, or path is
            not a path.
    """

    def __init__(self, path: Optional[str] = None, max_entries: int = 10000) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise InvalidOptionError(f"max_entries must be a positive int, not {max_entries!r}")
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise InvalidOptionError(f"path must be a file name or None, not {path!r}")
        self.path: Optional[str] = None if path is None else os.fspath(path)
        self.max_entries = max_entries
        # _lock guards _policies and is never held across I/O, so get()
        # never waits for the disk; _write_lock orders the file's writes,
        # and _generation lets a newer state win over an older one that
        # reached the disk later.
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._policies: Dict[str, Policy] = {}
        self._generation = 0
        self._written = 0
        if self.path is not None:
            self._load(self.path)

    def __len__(self) -> int:
        with self._lock:
            return len(self._policies)

    def get(self, domain: str, now: float) -> Optional[Policy]:
        """The policy in force for ``domain`` at ``now``: the cached one if
        it has not expired (whatever its TXT record says now), else None.

        Raises:
            InvalidOptionError: ``domain`` is not a host name.
        """
        key = _domain(domain)
        with self._lock:
            policy = self._policies.get(key)
        if policy is None or policy.expired(now):
            return None
        return policy

    def put(self, domain: str, policy: Policy) -> None:
        """Keep ``policy`` for ``domain`` (replacing the one before), drop
        the oldest beyond max_entries, and rewrite the file. A file that
        cannot be written is logged as an error; the cache in memory has
        the policy all the same.

        Raises:
            InvalidOptionError: ``domain`` is not a host name or ``policy``
                not a :class:`Policy`.
        """
        key = _domain(domain)
        if not isinstance(policy, Policy):
            raise InvalidOptionError(f"policy must be a Policy, not {type(policy).__name__}")
        with self._lock:
            self._policies[key] = policy
            self._evict()
            self._generation += 1
            generation = self._generation
            snapshot = dict(self._policies)
        if self.path is not None:
            with self._write_lock:
                if generation > self._written:
                    self._save(self.path, snapshot)
                    self._written = generation

    def refresh_needed(self, domain: str, txt_id: Optional[str], now: float) -> bool:
        """Whether ``domain``'s policy must be fetched now (RFC 8461 §5.1).

        Args:
            domain: the recipient domain.
            txt_id: the id of its ``_mta-sts`` TXT record now
                (:func:`parse_txt`), or None when there is no valid one.
            now: ``time.time()``.

        Returns:
            True when the TXT record has an id and no policy is cached,
            the cached one has another id, or it expired. False otherwise,
            and always without a TXT record: there is nothing to fetch,
            and a cached policy stays in force (:meth:`get`) until its
            max_age runs out. After a failed fetch, :meth:`get` still
            gives the cached policy while it lasts.

        Raises:
            InvalidOptionError: ``domain`` is not a host name.
        """
        key = _domain(domain)
        if txt_id is None:
            return False
        with self._lock:
            policy = self._policies.get(key)
        return policy is None or policy.id != txt_id or policy.expired(now)

    def _evict(self) -> None:
        """Drop the policies fetched longest ago, beyond max_entries (the
        lock is held)."""
        excess = len(self._policies) - self.max_entries
        if excess <= 0:
            return
        oldest = heapq.nsmallest(excess, self._policies,
                                 key=lambda d: self._policies[d].fetched_at)
        for key in oldest:
            del self._policies[key]
        log.debug("policy cache full (%d): dropped %s", self.max_entries, ", ".join(oldest))

    def _load(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warning("MTA-STS policy cache %s ignored: cannot read it as JSON: %s",
                        path, e)
            return
        if (not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT
                or data.get("version") != _CACHE_VERSION
                or not isinstance(data.get("policies"), dict)):
            log.warning("MTA-STS policy cache %s ignored: not a version %d %s file",
                        path, _CACHE_VERSION, _CACHE_FORMAT)
            return
        for domain, entry in data["policies"].items():
            try:
                self._policies[_domain(domain)] = Policy._from_json(entry)
            except (InvalidOptionError, KeyError, TypeError) as e:
                log.warning("MTA-STS policy cache %s: entry %s ignored: %s",
                            path, printable(repr(domain)), e)
        self._evict()

    @staticmethod
    def _save(path: str, policies: Dict[str, Policy]) -> None:
        """Write ``policies`` to a temporary file beside ``path`` and rename
        it over ``path`` (_write_lock is held)."""
        data = {"format": _CACHE_FORMAT, "version": _CACHE_VERSION,
                "policies": {d: p._to_json() for d, p in policies.items()}}
        directory = os.path.dirname(os.path.abspath(path))
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=".mta-sts-", suffix=".tmp", dir=directory)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
        except OSError as e:
            log.error("MTA-STS policy cache %s not written: %s", path, e)
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
