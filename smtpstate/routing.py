"""How the engine finds its way: :class:`Resolver`, :class:`Limits` and
:class:`Source`, checked here and handed to C (csrc/resolve.c, limits.c,
dest.c, route.c).

A message submitted without a host goes where its recipients' domains'
MX records say; docs/routing.md tells the whole story (order, fallback,
sites, limits, back-off).
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import socket
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from smtpstate._ffi import ffi, lib
from smtpstate.errors import InvalidOptionError
from smtpstate.options import _printable_name

__all__ = ["Resolver", "Limits", "Source", "load_limits", "INET_PROTOCOLS",
           "ADDRESS_PREFERENCES"]

#: Postfix's names: which address families are used, and which goes first.
INET_PROTOCOLS = {"all": 0, "ipv4": 4, "ipv6": 6}
ADDRESS_PREFERENCES = {"any": 0, "ipv4": 4, "ipv6": 6}


def _nameserver(entry: Any) -> str:
    """ "ip" or "ip:port" ("[v6]:port" for IPv6 with a port) as libunbound's
    "ip@port"."""
    if not isinstance(entry, str) or not entry:
        raise InvalidOptionError(f"a name server must be a str 'ip' or 'ip:port', not {entry!r}")
    host, port = entry, None
    if entry.startswith("["):
        end = entry.find("]")
        if end < 0:
            raise InvalidOptionError(f"name server {entry!r}: no closing ']'")
        host, rest = entry[1:end], entry[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise InvalidOptionError(f"name server {entry!r}: expected ':port' after ']'")
            port = rest[1:]
    elif entry.count(":") == 1:
        host, port = entry.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise InvalidOptionError(f"name server {entry!r} must be an IP address, optionally "
                                 "with ':port' (a name would need a resolver to find it)") from None
    if port is None:
        return host
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidOptionError(f"name server {entry!r}: the port must be 1-65535")
    return f"{host}@{int(port)}"


def _anchors(entries: Sequence[Any]) -> List[str]:
    """Trust anchors: DS or DNSKEY records, or files of them (zone-file
    lines; comments and blank lines skipped)."""
    out: List[str] = []
    for entry in entries:
        if not isinstance(entry, (str, os.PathLike)):
            raise InvalidOptionError(f"a trust anchor must be a record or a file, not {entry!r}")
        text = os.fspath(entry)
        if os.path.isfile(text):
            with open(text, encoding="ascii") as f:
                out.extend(line.strip() for line in f
                           if line.strip() and not line.lstrip().startswith(";"))
        elif " DS " in f" {text} " or " DNSKEY " in f" {text} ":
            out.append(text.strip())
        else:
            raise InvalidOptionError(f"trust anchor {text!r} is neither a DS or DNSKEY "
                                     "record nor a file")
    return out


@dataclass(frozen=True)
class Resolver:
    """How names are looked up (libunbound, in the engine's process: it
    caches answers for their TTLs and validates DNSSEC once it has a trust
    anchor).

    Args:
        nameservers: ``"ip"`` or ``"ip:port"`` strings (``"[::1]:53"`` for
            IPv6 with a port), asked with recursion desired; None: those of
            ``/etc/resolv.conf``.
        hosts_file: answer names in ``/etc/hosts`` (``localhost``).
        timeout: seconds for one attempt; a lookup gets ``timeout *
            attempts`` in all before it fails for now.
        attempts: how many.
        trust_anchors: DS or DNSKEY records (or files of them) to validate
            DNSSEC from; None (the default): the root zone's (IANA's KSKs,
            built in), with the names no public zone delegates ("test",
            "home.arpa", "localhost", "invalid", "local") taken as
            unsigned; an empty sequence: no validation (and no DANE).
            Under the root's anchors the engine first asks for the root's
            keys: name servers whose answer fails validation strip DNSSEC,
            and the engine then validates nothing rather than fail every
            lookup (``Engine.dnssec`` says "stripped", with a warning).
        local_records: zone-file lines answered without asking anyone
            (``"example.net. MX 10 mx.example.net."``), as unbound's
            ``local-data``: for tests, demos and overrides.
        max_in_flight: lookups sent at once; the others wait their turn,
            a host's addresses (a connection waits for them) before a
            domain's MX records. ``timeout`` runs from when a lookup is
            sent.

    Raises:
        InvalidOptionError: a value that cannot work, said at once.
    """

    nameservers: Optional[Sequence[str]] = None
    hosts_file: bool = True
    timeout: float = 5.0
    attempts: int = 2
    trust_anchors: Optional[Sequence[Any]] = None
    local_records: Optional[Sequence[str]] = None
    max_in_flight: int = 100

    def __init__(self, nameservers: Optional[Sequence[str]] = None, *, hosts_file: bool = True,
                 timeout: float = 5.0, attempts: int = 2,
                 trust_anchors: Optional[Sequence[Any]] = None,
                 local_records: Optional[Sequence[str]] = None,
                 max_in_flight: int = 100) -> None:
        if isinstance(nameservers, str):
            nameservers = [nameservers]
        servers = None if nameservers is None else tuple(_nameserver(n) for n in nameservers)
        if servers == ():
            raise InvalidOptionError("nameservers is empty: give at least one, or None "
                                     "for those of /etc/resolv.conf")
        if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                or not 0 < timeout <= 3600 or math.isnan(timeout)):
            raise InvalidOptionError(f"timeout must be a positive number of seconds, not {timeout!r}")
        if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 100:
            raise InvalidOptionError(f"attempts must be an int from 1 to 100, not {attempts!r}")
        if (isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int)
                or not 1 <= max_in_flight <= 100000):
            raise InvalidOptionError(f"max_in_flight must be an int from 1 to 100000, "
                                     f"not {max_in_flight!r}")
        records = tuple(local_records or ())
        for r in records:
            if not isinstance(r, str) or not r.strip() or "\n" in r or "\0" in r:
                raise InvalidOptionError(f"a local record must be one zone-file line, not {r!r}")
        object.__setattr__(self, "nameservers", servers)
        object.__setattr__(self, "hosts_file", bool(hosts_file))
        object.__setattr__(self, "timeout", float(timeout))
        object.__setattr__(self, "attempts", attempts)
        object.__setattr__(self, "trust_anchors",
                           None if trust_anchors is None else tuple(_anchors(trust_anchors)))
        object.__setattr__(self, "local_records", records)
        object.__setattr__(self, "max_in_flight", max_in_flight)

    def _apply(self, engine_ptr: Any) -> None:
        """Give these settings to a C engine (tried there: libunbound's
        refusal is an InvalidOptionError naming the setting)."""
        keep: List[Any] = []
        cfg = self._config(keep)
        why = ffi.new("char[]", 512)
        rc = lib.smtps_engine_set_resolver(engine_ptr, cfg, why, 512)
        if rc == lib.SMTPS_EINVAL:
            text = ffi.string(why).decode("utf-8", "replace")
            raise InvalidOptionError(f"the resolver refused a setting: {text or 'invalid'}")
        if rc < 0:
            from smtpstate._ffi import check
            check(rc, "set up the resolver")

    def _config(self, keep: List[Any]) -> Any:
        """These settings as a ``struct smtps_resolver_config``; ``keep``
        receives the cdata it points to."""

        def strings(values: Optional[Sequence[str]]) -> Tuple[Any, int]:
            if not values:
                return ffi.NULL, 0
            arr = ffi.new("const char *[]", len(values))
            for i, v in enumerate(values):
                c = ffi.new("char[]", v.encode("utf-8"))
                keep.append(c)
                arr[i] = c
            keep.append(arr)
            return arr, len(values)

        cfg = ffi.new("struct smtps_resolver_config *")
        cfg.sizeof_config = ffi.sizeof("struct smtps_resolver_config")
        cfg.nameservers, cfg.nameservers_count = strings(self.nameservers)
        cfg.hosts_file = 1 if self.hosts_file else 0
        cfg.timeout_ms = max(1, int(self.timeout * 1000))
        cfg.attempts = self.attempts
        cfg.trust_anchors, cfg.trust_anchors_count = strings(self.trust_anchors)
        cfg.local_data, cfg.local_data_count = strings(self.local_records)
        cfg.max_in_flight = self.max_in_flight
        cfg.no_dnssec = 1 if self.trust_anchors == () else 0
        keep.append(cfg)
        return cfg


@dataclass(frozen=True)
class Limits:
    """Traffic shaping for one destination: a site (the domains sharing a
    set of MX hosts) or a host given to submit().

    Args:
        connections: open at once.
        messages_per_connection: QUIT after this many.
        connection_rate: new connections per second, evenly spaced (no
            bursts); None: no limit.
        message_rate: messages per second handed to connections, evenly
            spaced; None: no limit.
    """

    connections: int = 32
    messages_per_connection: int = 1000
    connection_rate: Optional[float] = None
    message_rate: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("connections", "messages_per_connection"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v < 2**31:
                raise InvalidOptionError(f"Limits.{name} must be an int >= 1, not {v!r}")
        for name in ("connection_rate", "message_rate"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not 0 < v <= 1e6 or math.isnan(v)):
                raise InvalidOptionError(
                    f"Limits.{name} must be a positive number per second (or None), not {v!r}")


def _limits_key(key: Any) -> str:
    """A limits key: a recipient domain, "mx:" and a glob, or "*"."""
    if not isinstance(key, str) or not key:
        raise InvalidOptionError(f"a limits key must be a domain, 'mx:<glob>' or '*', not {key!r}")
    name = key[3:] if key.startswith("mx:") else key
    if key != "*":
        _printable_name("limits key", name, 253)
    return key


_LIMITS_FIELDS: Dict[str, Tuple[type, ...]] = {
    "connections": (int,),
    "messages_per_connection": (int,),
    "connection_rate": (int, float, type(None)),
    "message_rate": (int, float, type(None)),
}


def load_limits(path: Union[str, "os.PathLike[str]"]) -> Dict[str, Limits]:
    """Read limits from a JSON file: an object mapping each limits key (a
    recipient domain, ``"mx:<glob>"`` or ``"*"``) to an object of
    :class:`Limits` fields, for example::

        {"example.com": {"connections": 5, "message_rate": 20},
         "mx:*.outlook.com": {"connections": 10},
         "*": {"connections": 20, "messages_per_connection": 100}}

    A field left out keeps its default; the keys keep the file's order
    (the first matching ``mx:`` glob wins, docs/routing.md).

    Returns:
        ``{key: Limits(...)}``, ready for ``Engine(limits=...)``.

    Raises:
        InvalidOptionError: the file cannot be read or is not JSON, a key
            appears twice, a key or field is unknown, or a value has the
            wrong type or range; the message names the file, the key and
            the field.
    """
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidOptionError(f"limits file {name}: cannot be read: "
                                 f"{getattr(e, 'strerror', None) or e}") from None

    def unique(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
        # json.loads would keep the last of two equal keys in silence: a
        # typo'd copy of a rule would override the rule without a word.
        out: Dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise InvalidOptionError(f"limits file {name}: key {k!r} appears twice")
            out[k] = v
        return out

    try:
        obj = json.loads(text, object_pairs_hook=unique)
    except ValueError as e:
        if isinstance(e, InvalidOptionError):
            raise
        raise InvalidOptionError(f"limits file {name}: not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise InvalidOptionError(f"limits file {name}: must hold a JSON object mapping keys "
                                 f"to limits, not a {type(obj).__name__}")
    limits: Dict[str, Limits] = {}
    for key, fields in obj.items():
        where = f"limits file {name}: key {key!r}"
        try:
            _limits_key(key)
        except InvalidOptionError as e:
            raise InvalidOptionError(f"{where}: {e}") from None
        if not isinstance(fields, dict):
            raise InvalidOptionError(f"{where}: must map to an object of fields "
                                     f"({', '.join(_LIMITS_FIELDS)}), not {fields!r}")
        for field, value in fields.items():
            types = _LIMITS_FIELDS.get(field)
            if types is None:
                raise InvalidOptionError(f"{where}: unknown field {field!r} (known: "
                                         f"{', '.join(_LIMITS_FIELDS)})")
            # JSON true is a Python bool, which is an int: refuse it here,
            # where the file and field can be named.
            if isinstance(value, bool) or not isinstance(value, types):
                want = "an integer" if types == (int,) else "a number or null"
                raise InvalidOptionError(f"{where}: field {field!r} must be {want}, "
                                         f"not {json.dumps(value)}")
        try:
            limits[key] = Limits(**fields)
        except InvalidOptionError as e:
            raise InvalidOptionError(f"{where}: {e}") from None
    return limits


def apply_limits(engine_ptr: Any, limits: Mapping[str, Limits]) -> None:
    """Give the rules to a C engine, in the mapping's order."""
    if not isinstance(limits, Mapping):
        raise InvalidOptionError("limits must be a mapping of key to Limits(...)")
    rules = list(limits.items())
    if not rules:
        return
    arr = ffi.new("struct smtps_limits[]", len(rules))
    keep = []
    for i, (key, lim) in enumerate(rules):
        if not isinstance(lim, Limits):
            raise InvalidOptionError(f"limits[{key!r}] must be Limits(...), not {lim!r}")
        c = ffi.new("char[]", _limits_key(key).encode("ascii"))
        keep.append(c)
        arr[i].pattern = c
        arr[i].connections = lim.connections
        arr[i].messages_per_connection = lim.messages_per_connection
        arr[i].connection_rate = lim.connection_rate or 0.0
        arr[i].message_rate = lim.message_rate or 0.0
    if lib.smtps_engine_set_limits(engine_ptr, arr, len(rules)) != 0:
        raise InvalidOptionError("the engine refused the limits")


@dataclass(frozen=True)
class Source:
    """A local address to connect from, and the EHLO name to use from it.

    Args:
        address: an IPv4 or IPv6 address of this host.
        helo: the EHLO name; None: the engine's (or the destination's).

    Raises:
        InvalidOptionError: not an address, or one this host cannot bind
            (checked here, by binding it once).
    """

    address: str
    helo: Optional[str] = None

    def __post_init__(self) -> None:
        try:
            ip = ipaddress.ip_address(self.address)
        except (ValueError, TypeError):
            raise InvalidOptionError(f"Source address {self.address!r} must be an IPv4 or "
                                     "IPv6 address") from None
        if self.helo is not None:
            _printable_name("Source HELO name", self.helo, lib.SMTPS_HELO_MAX)
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((str(ip), 0))
        except OSError as exc:
            raise InvalidOptionError(f"Source address {self.address} cannot be bound on this "
                                     f"host: {exc.strerror or exc}") from None


def apply_sources(engine_ptr: Any, sources: Sequence[Source]) -> Dict[Any, int]:
    """Give the sources to a C engine; return the map from each Source
    (and its address) to the number submit() passes to pin it."""
    sources = list(sources)
    for s in sources:
        if not isinstance(s, Source):
            raise InvalidOptionError(f"sources must be Source(...) objects, not {s!r}")
    if not sources:
        return {}
    arr = ffi.new("struct smtps_source[]", len(sources))
    keep = []
    for i, s in enumerate(sources):
        a = ffi.new("char[]", s.address.encode("ascii"))
        keep.append(a)
        arr[i].address = a
        if s.helo is not None:
            h = ffi.new("char[]", s.helo.encode("ascii"))
            keep.append(h)
            arr[i].helo = h
    why = ffi.new("char[]", 256)
    if lib.smtps_engine_set_sources(engine_ptr, arr, len(sources), why, 256) != 0:
        raise InvalidOptionError(ffi.string(why).decode("utf-8", "replace")
                                 or "the engine refused the sources")
    pins: Dict[Any, int] = {}
    for i, s in enumerate(sources):
        pins.setdefault(s, i + 1)
        pins.setdefault(s.address, i + 1)
    return pins
