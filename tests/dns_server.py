"""A real authoritative DNS server for routing tests: a private NSD.

This module owns the DNS side of the MX routing tests, and nothing here is
a pytest fixture (``conftest.py`` wraps it):

* ``DnsServer`` -- NLnet Labs' ``nsd`` (Debian package ``nsd``) run as the
  current user, in the foreground, on 127.0.0.1 and a free UDP+TCP port,
  with its config, zone files, pid, state and log in a private temporary
  directory. Zones are added, replaced, broken and removed while it runs,
  through ``nsd-control`` over a unix socket (no certificates needed), and
  each change is served before the method returns.
* DNSSEC-signed zones (``add_signed_zone()``): signed by ldns's tools
  (Debian package ``ldnsutils``) with a key of their own, and returned
  with the DS record a validator takes as the zone's trust anchor; also
  signed so as to fail validation (bogus, expired).
* ``tlsa_rdata()`` -- a TLSA record's data (RFC 6698) for a certificate.
* ``SilentNameserver`` / ``silent_nameserver()`` -- a UDP+TCP port that
  takes queries and never answers, for resolver timeouts.

What NSD 4.6 does, checked with ``drill`` (tests/test_fixtures_dns.py):

* A zone NSD is configured for whose file does not load (missing, or with
  a syntax error) is answered with SERVFAIL, for every name in it. That is
  ``broken_zone()``. A zone NSD does not serve at all gets REFUSED
  (``remove_zone()``, or any name outside the zones); a forwarding
  resolver turns that into SERVFAIL, a recursive one tries the next
  server.
* ``nsd-control stats_noreset`` reports ``num.queries``, the UDP, TCP and
  TLS queries received since start, kept across reloads. In 4.6 every
  stats request makes NSD reload (it forks new server processes and
  collects the old ones' counters), so ``queries()`` costs about 10 ms.
* A zone change takes effect in new server processes forked by a reload,
  while the old ones drain; both read the same listening sockets. "Served"
  therefore means: a query sees the new SOA serial (or the expected
  error), and the old processes are gone. NSD runs under a small
  supervisor that reaps them (see ``_SUPERVISOR``), so stop() leaves no
  process behind, zombies included.

Signed zones, checked with ``drill -S`` against the DS alone
(tests/test_fixtures_dns.py): NSD serves the DNSKEY, the RRSIGs and the
NSEC records to a query with the DO bit; ``ldns-signzone`` sorts each
RRset into canonical order, so a signed zone's answers are in that order
rather than in the order given.

Nothing here needs root; ``nsd`` only needs to exist (``unavailable()``),
and for signed zones ``ldns-keygen``, ``ldns-signzone`` and
``ldns-key2ds`` (``signing_unavailable()``).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import os
import random
import re
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

__all__ = [
    "DnsServer",
    "DnsServerError",
    "SilentNameserver",
    "dns_query",
    "silent_nameserver",
    "tlsa_rdata",
]

LOOPBACK = "127.0.0.1"

#: Where Debian installs NSD's programs (also looked up in $PATH).
NSD_DIRS = ("/usr/sbin", "/usr/local/sbin")

#: ldns's programs that sign zones (Debian package ldnsutils).
SIGNING_PROGRAMS = ("ldns-keygen", "ldns-signzone", "ldns-key2ds")

# RR types and rcodes this module speaks (RFC 1035 3.2.2, 4.1.1).
QTYPE = {"A": 1, "NS": 2, "SOA": 6, "MX": 15, "TXT": 16, "AAAA": 28}
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}

# Steady state with "server-count: 1": xfrd (the process the supervisor
# started), main, and one server process. A reload adds the reload's copy
# of main and new servers until the old ones exit.
_STEADY_PROCESSES = 3


class DnsServerError(RuntimeError):
    """The private NSD could not start, or did not do what it was told.
    The message ends with the tail of NSD's log."""


def _find(name: str) -> Optional[str]:
    for d in NSD_DIRS:
        path = os.path.join(d, name)
        if os.access(path, os.X_OK):
            return path
    return shutil.which(name)


def _program(name: str) -> str:
    """The path of NSD's (or ldns's) program ``name``.

    Raises:
        DnsServerError: it is not installed.
    """
    path = _find(name)
    if path is None:
        package = "ldnsutils" if name in SIGNING_PROGRAMS else "nsd"
        raise DnsServerError("%s (Debian package %s) is not installed" % (name, package))
    return path


# ---------------------------------------------------------------------------
# A minimal DNS client (stdlib only): enough to probe the server
# ---------------------------------------------------------------------------


def _encode_name(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode("ascii")
    return out + b"\0"


def _skip_name(msg: bytes, pos: int) -> int:
    """The offset just past the (possibly compressed) name at ``pos``."""
    while True:
        length = msg[pos]
        if length >= 0xC0:          # a pointer ends the name (RFC 1035 4.1.4)
            return pos + 2
        pos += 1 + length
        if length == 0:
            return pos


def dns_query(
    host: str, port: int, name: str, qtype: str = "SOA", timeout: float = 1.0
) -> Tuple[str, Optional[int]]:
    """Send one UDP query; return ``(rcode name, SOA serial or None)``.

    The serial is that of the first answer record when ``qtype`` is SOA and
    the answer has one.

    Raises:
        socket.timeout: no answer within ``timeout``.
    """
    qid = random.randrange(65536)
    # Header: id, flags (no recursion desired), 1 question, no records.
    query = struct.pack("!HHHHHH", qid, 0, 1, 0, 0, 0)
    query += _encode_name(name) + struct.pack("!HH", QTYPE[qtype], 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        s.send(query)
        while True:
            msg = s.recv(65535)
            if len(msg) >= 12 and struct.unpack("!H", msg[:2])[0] == qid:
                break
    flags, qdcount, ancount = struct.unpack("!HHH", msg[2:8])
    rcode = RCODE_NAMES.get(flags & 0xF, str(flags & 0xF))
    serial = None
    if qtype == "SOA" and ancount:
        pos = 12
        for _ in range(qdcount):
            pos = _skip_name(msg, pos) + 4
        pos = _skip_name(msg, pos)
        rtype = struct.unpack("!H", msg[pos:pos + 2])[0]
        pos += 10                                   # type, class, ttl, rdlength
        if rtype == QTYPE["SOA"]:
            pos = _skip_name(msg, _skip_name(msg, pos))  # mname, rname
            serial = struct.unpack("!I", msg[pos:pos + 4])[0]
    return rcode, serial


# ---------------------------------------------------------------------------
# TLSA records (RFC 6698 2.1, DANE for SMTP RFC 7672)
# ---------------------------------------------------------------------------

_TLSA_DIGESTS = {0: None, 1: hashlib.sha256, 2: hashlib.sha512}


def tlsa_rdata(cert_pem: Union[bytes, str], usage: int = 3, selector: int = 1, mtype: int = 1) -> str:
    """The data of a TLSA record for the (first) certificate in
    ``cert_pem``, as a zone file writes it: ``"3 1 1 <hex>"``, for
    ``"_25._tcp.mx1 TLSA " + tlsa_rdata(pem)``.

    Args:
        usage: the certificate usage field, written as given (0 PKIX-TA,
            1 PKIX-EE, 2 DANE-TA, 3 DANE-EE); it does not change the data.
        selector: 0, the whole certificate (DER); 1, its
            SubjectPublicKeyInfo (DER).
        mtype: matching type: 0, the selected bytes themselves; 1, their
            SHA-256; 2, their SHA-512.

    Raises:
        ValueError: a field out of range, or no PEM certificate.
    """
    # cryptography comes with trustme (the tests' extra); imported here so
    # that the DNS server itself needs the standard library only.
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if usage not in (0, 1, 2, 3) or selector not in (0, 1) or mtype not in _TLSA_DIGESTS:
        raise ValueError("TLSA usage 0-3, selector 0-1, matching type 0-2: got %r %r %r"
                         % (usage, selector, mtype))
    if isinstance(cert_pem, str):
        cert_pem = cert_pem.encode("ascii")
    cert = x509.load_pem_x509_certificate(cert_pem)
    if selector == 0:
        data = cert.public_bytes(serialization.Encoding.DER)
    else:
        data = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = _TLSA_DIGESTS[mtype]
    if digest is not None:
        data = digest(data).digest()
    return "%d %d %d %s" % (usage, selector, mtype, data.hex())


# ---------------------------------------------------------------------------
# NSD
# ---------------------------------------------------------------------------

# The private configuration. No privilege drop, no chroot, no nsd.db (zone
# files are read directly), one server process (the readiness check counts
# processes), response rate limiting off (a test may send thousands of
# identical queries), and zones added at run time from one pattern.
_NSD_CONF = """\
server:
    ip-address: {host}
    port: {port}
    do-ip6: no
    username: ""
    chroot: ""
    zonesdir: "{root}"
    database: ""
    zonelistfile: "{root}/zone.list"
    pidfile: "{root}/nsd.pid"
    xfrdfile: "{root}/xfrd.state"
    xfrdir: "{root}"
    logfile: "{root}/nsd.log"
    verbosity: 2
    server-count: 1
    rrl-ratelimit: 0
    rrl-whitelist-ratelimit: 0
    round-robin: no

remote-control:
    control-enable: yes
    control-interface: "{root}/nsd.ctl"

pattern:
    name: "test"
    zonefile: "%s.zone"
"""

# NSD's main process exits before its server processes on shutdown, and
# its reload leaves the old main's processes behind: orphans, which only
# the machine's init would reap (late, or never in a container without
# one). NSD therefore runs under this supervisor: it becomes the reaper of
# every orphan NSD leaves (PR_SET_CHILD_SUBREAPER, Linux), ignores the
# SIGTERM sent to the group, and exits with nsd's status once every
# process is reaped -- so stop() returns with nothing left, zombies
# included.
_SUPERVISOR = """\
import ctypes, os, signal, subprocess, sys
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("prctl(PR_SET_CHILD_SUBREAPER): %s" % os.strerror(ctypes.get_errno()))
signal.signal(signal.SIGTERM, lambda *_: None)
nsd = subprocess.Popen(sys.argv[1:]).pid
status = 1
while True:
    try:
        pid, wstatus = os.wait()
    except ChildProcessError:
        break
    if pid == nsd:
        status = os.waitstatus_to_exitcode(wstatus)
sys.exit(status if status >= 0 else 128 - status)
"""

# A zone file NSD refuses to load, so that it answers SERVFAIL for the zone.
_BROKEN_ZONE = "; deliberately broken: NSD answers SERVFAIL for this zone\nthis is not a record\n"

# Signature validity (seconds from now). A good signature's inception lies
# an hour back, for a validator whose clock is a little behind. An expired
# one ended a week ago: validators forgive some clock skew at the end of
# the validity period too (unbound up to a day, val-sig-skew-max).
_SIG_VALID = (-3600, 30 * 86400)
_SIG_EXPIRED = (-37 * 86400, -7 * 86400)

Want = Union[int, str]   # an SOA serial, or the rcode name expected


class DnsServer:
    """A private NSD answering authoritatively on 127.0.0.1:``port``.

    ``add_zone()``/``set_records()`` write a zone with an SOA and an NS
    record (``ns.<origin>``, with an A record 127.0.0.1) added to the
    records given. Answers are in zone-file order (``round-robin: no``).
    ``add_signed_zone()``/``set_signed_records()`` do the same, DNSSEC
    signed (answers then in canonical order).

    Attributes:
        host, port: where it answers, over UDP and TCP.
        address: ``"127.0.0.1:PORT"``, as a resolver's nameserver list
            takes it.
        root: its private directory (config, zone files, log).
    """

    def __init__(self) -> None:
        self.host = LOOPBACK
        self.port = 0
        self.root: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None
        self._zones: Dict[str, str] = {}        # origin -> "ok" or "broken"
        self._serial = 0                        # one counter for every zone
        self._probes = 0                        # our own queries, not counted
        self._baseline = 0                      # reset_queries()
        self._last_mtime_ns: Dict[str, int] = {}
        self._origin_counter = 0
        self._keys: Dict[str, str] = {}         # origin -> its key's base path
        self._lock = threading.Lock()

    @staticmethod
    def unavailable() -> Optional[str]:
        """Why NSD cannot run here, or None."""
        if not sys.platform.startswith("linux"):
            return "the private NSD needs Linux (/proc, PR_SET_CHILD_SUBREAPER)"
        for prog in ("nsd", "nsd-control", "nsd-checkzone"):
            if not _find(prog):
                return "%s (Debian package nsd) is not installed" % prog
        return None

    @staticmethod
    def signing_unavailable() -> Optional[str]:
        """Why signed zones cannot be made here, or None."""
        for prog in SIGNING_PROGRAMS:
            if not _find(prog):
                return "%s (Debian package ldnsutils) is not installed" % prog
        return None

    @property
    def address(self) -> str:
        return "%s:%d" % (self.host, self.port)

    @property
    def conf_path(self) -> str:
        assert self.root is not None
        return os.path.join(self.root, "nsd.conf")

    @property
    def log_path(self) -> str:
        assert self.root is not None
        return os.path.join(self.root, "nsd.log")

    def log_tail(self, lines: int = 30) -> str:
        """The end of NSD's log and of what it wrote to stderr."""
        assert self.root is not None
        out = []
        for name in ("nsd.log", "nsd.stderr"):
            try:
                with open(os.path.join(self.root, name), "rb") as f:
                    text = f.read().decode("utf-8", "replace")
            except OSError:
                continue
            if text.strip():
                out.append("--- %s ---\n%s" % (name, "\n".join(text.splitlines()[-lines:])))
        return "\n".join(out) or "(NSD logged nothing)"

    # -- start and stop -------------------------------------------------------

    def start(self, attempts: int = 3) -> "DnsServer":
        """Start NSD and wait until it answers queries.

        Raises:
            DnsServerError: NSD is missing, or did not start (with its log).
        """
        why = self.unavailable()
        if why:
            raise DnsServerError(why)
        self._probes = self._baseline = 0
        self.root = tempfile.mkdtemp(prefix="smtpstate-nsd-")
        if len(self.root) > 80:
            # The control socket's path must fit in sun_path (108 bytes).
            os.rmdir(self.root)
            self.root = tempfile.mkdtemp(prefix="smtpstate-nsd-", dir="/tmp")
        last = ""
        for _ in range(attempts):
            self.port = self._free_udp_tcp_port()
            with open(self.conf_path, "w", encoding="ascii") as f:
                f.write(_NSD_CONF.format(host=self.host, port=self.port, root=self.root))
            with open(os.path.join(self.root, "nsd.stderr"), "wb") as err:
                # Its own session, so that stop() can signal every process
                # NSD forks (xfrd, main, servers, reloads) as one group.
                self.proc = subprocess.Popen(
                    [sys.executable, self._supervisor_path(), _program("nsd"), "-d", "-c", self.conf_path],
                    stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                    cwd=self.root, start_new_session=True)
            try:
                self._wait_ready()
                return self
            except DnsServerError as e:
                last = str(e)
                self._kill()
        self.stop()
        raise DnsServerError("NSD did not start:\n%s" % last)

    def _supervisor_path(self) -> str:
        assert self.root is not None
        path = os.path.join(self.root, "supervisor.py")
        with open(path, "w", encoding="ascii") as f:
            f.write(_SUPERVISOR)
        return path

    @staticmethod
    def _free_udp_tcp_port() -> int:
        """A port free for both UDP and TCP on 127.0.0.1 a moment ago (NSD
        binds its own sockets; start() retries when it then loses one)."""
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind((LOOPBACK, 0))
                port = u.getsockname()[1]
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                    try:
                        t.bind((LOOPBACK, port))
                    except OSError:
                        continue
                return port
        raise DnsServerError("no port free for both UDP and TCP on %s" % LOOPBACK)

    def _wait_ready(self, timeout: float = 10.0) -> None:
        """Until NSD answers a query and its control socket: any answer
        (REFUSED, no zone yet) shows the server processes are up."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise DnsServerError("nsd exited with status %s\n%s" % (self.proc.returncode, self.log_tail()))
            try:
                self._probe("smtpstate-nsd-ready.invalid", timeout=0.05)
                if self._control("status", check=False).returncode == 0:
                    return
            except (socket.timeout, ConnectionRefusedError):
                pass
            if time.monotonic() >= deadline:
                raise DnsServerError("nsd did not answer within %.0fs\n%s" % (timeout, self.log_tail()))
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop NSD and every process it forked; remove its directory."""
        self._kill()
        if self.root and os.path.isdir(self.root):
            shutil.rmtree(self.root, ignore_errors=True)
        self.root = None
        self._zones.clear()
        self._keys.clear()

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pgid = proc.pid     # start_new_session made it the group leader
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            proc.wait()
        # The supervisor reaped them all; should it have been killed, wait
        # for the rest of the group anyway (SIGKILL after 5 s, then 5 s
        # more), so that no test sees a stray nsd.
        for sig in (signal.SIGKILL, None):
            deadline = time.monotonic() + 5
            while self._group_pids(pgid) and time.monotonic() < deadline:
                time.sleep(0.01)
            if sig is not None and self._group_pids(pgid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, sig)

    def _nsd_processes(self) -> int:
        """How many NSD processes run (the supervisor not counted)."""
        assert self.proc is not None
        return len([p for p in self._group_pids(self.proc.pid) if p != self.proc.pid])

    @staticmethod
    def _group_pids(pgid: int) -> List[int]:
        """Live (not zombie) processes of process group ``pgid``, from /proc."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open("/proc/%s/stat" % entry, "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            # "pid (comm) state ppid pgrp ...": comm may hold spaces.
            fields = stat[stat.rindex(b")") + 2:].split()
            if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
                pids.append(int(entry))
        return pids

    def __enter__(self) -> "DnsServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- zones ------------------------------------------------------------------

    @staticmethod
    def _origin(origin: str) -> str:
        if origin.strip() == ".":
            return "."                            # the root zone (tests of anchors)
        origin = origin.strip().rstrip(".").lower()
        if not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*", origin) or any(
                len(label) > 63 for label in origin.split(".")):
            raise ValueError("not a zone name: %r" % origin)
        return origin

    def unique_origin(self, hint: str = "zone") -> str:
        """A zone name not used before in this server's life:
        ``<hint as a label>-<n>.test`` (e.g. from a test's name)."""
        label = re.sub(r"[^a-z0-9-]+", "-", hint.lower()).strip("-")[:50] or "zone"
        with self._lock:
            self._origin_counter += 1
            return "%s-%d.test" % (label, self._origin_counter)

    def zone_path(self, origin: str) -> str:
        assert self.root is not None
        return os.path.join(self.root, "%s.zone" % self._origin(origin))

    def add_zone(self, origin: str, records: Sequence[str], ttl: int = 300) -> None:
        """Serve a new zone ``origin`` with ``records`` (zone-file lines,
        names relative to the origin or absolute with a final dot, e.g.
        ``"@ MX 10 mx1.example.test."``, ``"mx1 A 127.0.0.2"``); an SOA and
        an NS record are added. ``ttl`` is the default TTL and the SOA's
        negative-caching TTL. Served when this returns.

        Raises:
            ValueError: a bad name, or the zone exists (use set_records).
            DnsServerError: NSD refused the zone file (nsd-checkzone's
                words) or did not serve it.
        """
        origin = self._origin(origin)
        if origin in self._zones:
            raise ValueError("zone %s exists: use set_records()" % origin)
        serial = self._write_zone(origin, records, ttl)
        self._control("addzone", origin, "test")
        self._zones[origin] = "ok"
        self._await(origin, serial)

    def set_records(self, origin: str, records: Sequence[str], ttl: int = 300) -> None:
        """Replace the content of zone ``origin`` (added before, broken or
        not) with ``records``, as in add_zone(). Served when this returns."""
        origin = self._origin(origin)
        if origin not in self._zones:
            raise ValueError("no zone %s: use add_zone()" % origin)
        serial = self._write_zone(origin, records, ttl)
        self._control("reload", origin)
        self._zones[origin] = "ok"
        self._await(origin, serial)

    def broken_zone(self, origin: str) -> None:
        """Make NSD answer SERVFAIL for every name in ``origin``: the zone
        is configured (added if new) but its file does not load. A later
        set_records() repairs it."""
        origin = self._origin(origin)
        self._write_file(origin, _BROKEN_ZONE)
        if origin in self._zones:
            self._control("reload", origin)
        else:
            self._control("addzone", origin, "test")
        self._zones[origin] = "broken"
        self._await(origin, "SERVFAIL")

    def remove_zone(self, origin: str) -> None:
        """Stop serving ``origin``: NSD answers REFUSED for it again."""
        origin = self._origin(origin)
        if origin not in self._zones:
            raise ValueError("no zone %s" % origin)
        self._control("delzone", origin)
        del self._zones[origin]
        self._keys.pop(origin, None)
        self._await(origin, "REFUSED")

    def zones(self) -> Dict[str, str]:
        """{origin: "ok" or "broken"} for every zone configured."""
        return dict(self._zones)

    # -- signed zones -------------------------------------------------------------

    def add_signed_zone(self, origin: str, records: Sequence[str], ttl: int = 300, *,
                        bogus: bool = False, expired: bool = False) -> str:
        """Serve a new zone as add_zone() does, DNSSEC-signed with a key of
        its own; return the zone's trust anchor, the DS record of that key
        (``"<origin>. 3600 IN DS <tag> 13 2 <sha-256 hex>"``, one line, as
        libunbound's ub_ctx_add_ta() and drill's -k file take it). Served,
        DNSKEY, RRSIG and NSEC records included, when this returns.

        The key is one ECDSAP256SHA256 key (algorithm 13) with the SEP flag
        (257), signing every RRset, DNSKEY included; denial of existence
        is NSEC. The key stays in this server's directory, for
        set_signed_records(), until remove_zone() or stop().

        Args:
            bogus: every signature but the DNSKEY RRset's is corrupted:
                the key validates against the DS, and every other answer
                from the zone (records, NXDOMAIN and NODATA proofs) is
                bogus.
            expired: every signature's validity period ended a week ago
                (it began 37 days ago): a validator finds the zone bogus.

        Raises:
            ValueError: a bad name, or the zone exists.
            DnsServerError: ldnsutils is missing, signing failed, NSD
                refused the signed zone file or did not serve it.
        """
        origin = self._origin(origin)
        if origin in self._zones:
            raise ValueError("zone %s exists: use set_signed_records()" % origin)
        key = self._new_key(origin)
        serial = self._write_signed_zone(origin, records, ttl, key, bogus, expired)
        self._control("addzone", origin, "test")
        self._zones[origin] = "ok"
        self._keys[origin] = key
        self._await(origin, serial)
        return self._ds(key)

    def set_signed_records(self, origin: str, records: Sequence[str], ttl: int = 300, *,
                           bogus: bool = False, expired: bool = False) -> str:
        """Replace the content of signed zone ``origin`` with ``records``,
        signed again with the same key (so the DS returned, the same as
        add_signed_zone()'s, stays valid), as in add_signed_zone(). The
        zone may have been unsigned or broken since. Served when this
        returns.

        Raises:
            ValueError: ``origin`` was not added with add_signed_zone().
        """
        origin = self._origin(origin)
        if origin not in self._zones or origin not in self._keys:
            raise ValueError("no signed zone %s: use add_signed_zone()" % origin)
        key = self._keys[origin]
        serial = self._write_signed_zone(origin, records, ttl, key, bogus, expired)
        self._control("reload", origin)
        self._zones[origin] = "ok"
        self._await(origin, serial)
        return self._ds(key)

    def _keys_dir(self, origin: str) -> str:
        assert self.root is not None
        path = os.path.join(self.root, "keys", origin)
        os.makedirs(path, exist_ok=True)
        return path

    def _new_key(self, origin: str) -> str:
        """Generate a key for ``origin``; return its base path
        (``.../K<origin>.+013+<tag>``, without .key or .private)."""
        keys = self._keys_dir(origin)
        # -k: flags 257 (SEP), one key as both KSK and ZSK. /dev/urandom,
        # not the default /dev/random, which may block on an old kernel.
        p = self._ldns(["ldns-keygen", "-a", "ECDSAP256SHA256", "-k", "-r", "/dev/urandom", origin], cwd=keys)
        return os.path.join(keys, p.stdout.strip())

    def _ds(self, key: str) -> str:
        """The DS record (SHA-256) of ``key``, on one line, single spaces."""
        p = self._ldns(["ldns-key2ds", "-n", "-2", key + ".key"])
        lines = [line for line in p.stdout.splitlines() if line.strip()]
        if len(lines) != 1:
            raise DnsServerError("ldns-key2ds: expected one DS record, got:\n%s" % p.stdout)
        return " ".join(lines[0].split())

    def _write_signed_zone(self, origin: str, records: Sequence[str], ttl: int, key: str,
                           bogus: bool, expired: bool) -> int:
        """Sign the zone add_zone() would write and install it; return its
        serial."""
        text, serial = self._zone_text(origin, records, ttl)
        keys = os.path.dirname(key)
        unsigned = os.path.join(keys, "zone")
        signed = unsigned + ".signed"
        with open(unsigned, "w", encoding="utf-8") as f:
            f.write(text)
        now = int(time.time())
        inception, expiration = (now + t for t in (_SIG_EXPIRED if expired else _SIG_VALID))
        self._ldns(["ldns-signzone", "-o", origin, "-i", str(inception), "-e", str(expiration),
                    "-f", signed, unsigned, key])
        with open(signed, encoding="utf-8") as f:
            text = f.read()
        if bogus:
            text = self._corrupt_signatures(text)
        self._write_file(origin, text, check=True)
        return serial

    @staticmethod
    def _corrupt_signatures(zone: str) -> str:
        """``zone`` (ldns-signzone's output: one record a line, the RRSIG's
        signature last, in one base64 word) with one bit of every RRSIG's
        signature flipped, except the DNSKEY RRset's."""
        out = []
        for line in zone.splitlines():
            fields = line.split()
            # owner TTL class RRSIG covered-type ... signature
            if len(fields) > 5 and fields[3] == "RRSIG" and fields[4] != "DNSKEY":
                sig = bytearray(base64.b64decode(fields[-1]))
                sig[0] ^= 0x01
                line = "\t".join(fields[:-1] + [base64.b64encode(bytes(sig)).decode("ascii")])
            out.append(line)
        return "\n".join(out) + "\n"

    @staticmethod
    def _ldns(argv: List[str], cwd: Optional[str] = None) -> subprocess.CompletedProcess:
        """Run ldns's program ``argv[0]`` with ``argv[1:]``.

        Raises:
            DnsServerError: it is missing or failed (with its output).
        """
        p = subprocess.run([_program(argv[0])] + argv[1:], capture_output=True, text=True,
                           cwd=cwd, timeout=30)
        if p.returncode != 0:
            raise DnsServerError("%s: status %d: %s%s" % (" ".join(argv), p.returncode, p.stdout, p.stderr))
        return p

    # -- zone files ---------------------------------------------------------------

    def _write_zone(self, origin: str, records: Sequence[str], ttl: int) -> int:
        text, serial = self._zone_text(origin, records, ttl)
        self._write_file(origin, text, check=True)
        return serial

    def _zone_text(self, origin: str, records: Sequence[str], ttl: int) -> Tuple[str, int]:
        """The zone file add_zone() serves, with a new serial; and that
        serial."""
        if isinstance(records, str):
            raise TypeError("records is a list of zone-file lines, not one string")
        with self._lock:
            self._serial += 1
            serial = self._serial
        dot = "" if origin == "." else origin + "."      # "example." or the root's ""
        lines = [
            "$ORIGIN %s" % (dot or "."),
            "$TTL %d" % ttl,
            # refresh retry expire minimum; minimum = negative-caching TTL.
            "@ IN SOA ns.%s hostmaster.%s %d 3600 600 86400 %d" % (dot, dot, serial, ttl),
            "@ IN NS ns.%s" % dot,
            "ns IN A %s" % LOOPBACK,
        ]
        for record in records:
            if "\n" in record:
                raise ValueError("one record per line: %r" % record)
            lines.append(record)
        return "\n".join(lines) + "\n", serial

    def _write_file(self, origin: str, text: str, check: bool = False) -> None:
        """Replace the zone file of ``origin`` at once (NSD never reads half
        of one). With ``check``, a file nsd-checkzone refuses is not
        installed: NSD would serve the zone as SERVFAIL; the test gets the
        reason instead.

        Raises:
            DnsServerError: the file does not load.
        """
        path = self.zone_path(origin)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        if check:
            p = subprocess.run([_program("nsd-checkzone"), origin, tmp],
                               capture_output=True, text=True, timeout=30)
            if p.returncode != 0:
                os.unlink(tmp)
                raise DnsServerError("zone %s does not load:\n%s%s\n--- zone file ---\n%s"
                                     % (origin, p.stdout, p.stderr, text))
        # NSD skips a zone file whose mtime equals the one it read last
        # (nanoseconds): two writes within one clock tick must still differ.
        mtime = max(time.time_ns(), self._last_mtime_ns.get(origin, 0) + 1_000_000)
        self._last_mtime_ns[origin] = mtime
        os.utime(tmp, ns=(mtime, mtime))
        os.replace(tmp, path)

    def _await(self, origin: str, want: Want, timeout: float = 10.0) -> None:
        """Until ``origin`` answers as wanted (the SOA serial, or that rcode)
        and the processes of the reload that made it so are the only ones:
        no old server process is left to answer from the old data."""
        if self.proc is None:
            raise DnsServerError("NSD is not running")
        deadline = time.monotonic() + timeout
        seen: object = None
        while True:
            try:
                rcode, serial = self._probe(origin)
                seen = (rcode, serial)
                done = (serial == want and rcode == "NOERROR") if isinstance(want, int) else rcode == want
                if done and self._nsd_processes() == _STEADY_PROCESSES:
                    return
            except (socket.timeout, ConnectionRefusedError):
                seen = "no answer"
            if self.proc.poll() is not None:
                raise DnsServerError("nsd exited with status %s\n%s" % (self.proc.returncode, self.log_tail()))
            if time.monotonic() >= deadline:
                raise DnsServerError("zone %s: wanted %s, NSD answers %s after %.0fs\n%s"
                                     % (origin, want, seen, timeout, self.log_tail()))
            time.sleep(0.005)

    def _probe(self, name: str, timeout: float = 0.5) -> Tuple[str, Optional[int]]:
        # NSD counts what it receives: a query it has not answered yet will
        # be (it waits in the socket), one refused by the kernel (nothing
        # bound yet, ICMP port unreachable) never.
        with self._lock:
            self._probes += 1
        try:
            return dns_query(self.host, self.port, name, "SOA", timeout)
        except ConnectionRefusedError:
            with self._lock:
                self._probes -= 1
            raise

    # -- control and statistics -------------------------------------------------

    def _control(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``nsd-control -c <our config> args...``.

        Raises:
            DnsServerError: with ``check``, it failed or did not say "ok"
                where a command answers that way.
        """
        p = subprocess.run([_program("nsd-control"), "-c", self.conf_path, *args],
                           capture_output=True, text=True, timeout=30)
        if check and (p.returncode != 0 or (args[0] in ("addzone", "delzone", "reload")
                                            and not p.stdout.startswith("ok"))):
            raise DnsServerError("nsd-control %s: status %d: %s%s\n%s"
                                 % (" ".join(args), p.returncode, p.stdout, p.stderr, self.log_tail()))
        return p

    def stats(self) -> Dict[str, str]:
        """NSD's own counters (``nsd-control stats_noreset``), our probes
        included. Costs an NSD reload (~10 ms)."""
        out = self._control("stats_noreset").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def queries(self) -> int:
        """Queries NSD received since start (or reset_queries()), over UDP
        and TCP, without this object's own probes. Costs ~10 ms."""
        with self._lock:
            probes = self._probes
        return int(self.stats()["num.queries"]) - probes - self._baseline

    def reset_queries(self) -> None:
        """Count queries() from now on."""
        self._baseline += self.queries()


# ---------------------------------------------------------------------------
# A nameserver that never answers
# ---------------------------------------------------------------------------


class SilentNameserver:
    """UDP and TCP on 127.0.0.1:``port``: datagrams are read and dropped,
    TCP connections accepted and read, and nothing is ever sent back.

    Attributes:
        address: ``"127.0.0.1:PORT"``.
        udp_queries: datagrams received so far.
        tcp_connections: TCP connections accepted so far.
    """

    def __init__(self) -> None:
        self.host = LOOPBACK
        self.udp_queries = 0
        self.tcp_connections = 0
        self._udp, self._tcp = self._bind_pair()
        self.port: int = self._udp.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: Optional[threading.Thread] = None

    @property
    def address(self) -> str:
        return "%s:%d" % (self.host, self.port)

    @staticmethod
    def _bind_pair() -> Tuple[socket.socket, socket.socket]:
        # Kernel-chosen UDP port, then TCP on the same number: no window in
        # which another process could take either.
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((LOOPBACK, 0))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                tcp.bind((LOOPBACK, udp.getsockname()[1]))
            except OSError as e:
                udp.close()
                tcp.close()
                if e.errno == errno.EADDRINUSE:
                    continue
                raise
            tcp.listen(64)
            return udp, tcp
        raise OSError("no port free for both UDP and TCP on %s" % LOOPBACK)

    def start(self) -> "SilentNameserver":
        self._thread = threading.Thread(target=self._run, name="silent-nameserver", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._udp, selectors.EVENT_READ, "udp")
        sel.register(self._tcp, selectors.EVENT_READ, "listen")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        conns: List[socket.socket] = []
        try:
            while True:
                for key, _ in sel.select():
                    if key.data == "wake":
                        return
                    if key.data == "udp":
                        self._udp.recv(65535)
                        self.udp_queries += 1
                    elif key.data == "listen":
                        conn, _ = self._tcp.accept()
                        self.tcp_connections += 1
                        conns.append(conn)
                        sel.register(conn, selectors.EVENT_READ, conn)
                    else:
                        # Read and ignore; forget a connection the client closed.
                        conn = key.data
                        if not conn.recv(65535):
                            sel.unregister(conn)
                            conn.close()
                            conns.remove(conn)
        finally:
            for conn in conns:
                conn.close()
            sel.close()

    def stop(self) -> None:
        if self._thread is not None:
            self._wake_w.send(b"x")
            self._thread.join(10)
            self._thread = None
        for s in (self._udp, self._tcp, self._wake_r, self._wake_w):
            s.close()

    def __enter__(self) -> "SilentNameserver":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def silent_nameserver() -> Iterator[str]:
    """``with silent_nameserver() as address:`` -- ``"127.0.0.1:PORT"`` of a
    :class:`SilentNameserver` for the block."""
    with SilentNameserver() as server:
        yield server.address
