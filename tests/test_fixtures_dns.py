"""The DNS fixtures do what routing tests rely on, as seen by a real
client: ldns's ``drill`` asking the private NSD (tests/dns_server.py) over
UDP and TCP -- records, NXDOMAIN, SERVFAIL for a broken zone, REFUSED
outside the zones, changes served as soon as the call returns, an exact
query counter -- and a nameserver that never answers.

Signed zones are checked by a validator that knows nothing but the DS
add_signed_zone() returns: ``drill -S`` chases each answer's signatures
up to that trust anchor, and must succeed for a signed zone, fail on a
bad or expired signature, and find no key for an unsigned zone. TLSA data
is checked against the ``openssl`` command line."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
from typing import List, Tuple

import pytest

import helpers
from dns_server import DnsServer, DnsServerError, SilentNameserver, dns_query, tlsa_rdata
from dns_server import silent_nameserver as silent_nameserver_cm   # the fixture has its name

DRILL = helpers.find_program("drill")
pytestmark = helpers.requires(DRILL is not None, "drill (Debian package ldnsutils) is not installed")
# (ldns-keygen, ldns-signzone, ldns-key2ds: the same package as drill.)
requires_signing = helpers.requires(DnsServer.signing_unavailable() is None,
                                    DnsServer.signing_unavailable() or "")
# (The openssl command comes with nsd, which depends on it.)
OPENSSL = helpers.find_program("openssl")


def drill(address: str, name: str, qtype: str = "A", tcp: bool = False,
          timeout: float = 10.0, dnssec: bool = False) -> Tuple[str, List[str], str]:
    """Ask ``address`` ("host:port") with drill (``dnssec``: with the DO
    bit, -D); return (rcode, answer records as "name TTL IN TYPE data"
    with single spaces, header flags).

    Raises:
        subprocess.TimeoutExpired: no answer within ``timeout`` (drill
            itself gives up after about 15 s).
    """
    host, port = address.rsplit(":", 1)
    cmd = [DRILL] + (["-t"] if tcp else []) + (["-D"] if dnssec else []) + \
        ["@" + host, "-p", port, name, qtype]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, "%s: %s%s" % (cmd, p.stdout, p.stderr)
    rcode = re.search(r"rcode: (\w+)", p.stdout).group(1)
    flags = re.search(r";; flags: ([^;]*);", p.stdout).group(1).split()
    # The section's records: the lines after its title, up to the next
    # ";;" line (an empty section has none).
    answer = p.stdout.split(";; ANSWER SECTION:\n", 1)[1]
    records = []
    for line in answer.splitlines():
        if line.startswith(";;"):
            break
        if line.strip():
            records.append(" ".join(line.split()))
    return rcode, records, " ".join(flags)


MX_ZONE = [
    "@ MX 10 mx1",
    "@ MX 20 mx2.{origin}.",
    "mx1 A 127.0.0.2",
    "mx2 A 127.0.0.3",
    "mx2 AAAA ::1",
]


def mx_zone(origin: str) -> List[str]:
    return [r.format(origin=origin) for r in MX_ZONE]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_mx_a_aaaa(dns_server, dns_origin, tcp):
    dns_server.add_zone(dns_origin, mx_zone(dns_origin))
    o = dns_origin
    rcode, records, flags = drill(dns_server.address, o, "MX", tcp=tcp)
    assert rcode == "NOERROR" and "aa" in flags.split()
    # Zone-file order: NSD's round-robin is off.
    assert records == ["%s. 300 IN MX 10 mx1.%s." % (o, o), "%s. 300 IN MX 20 mx2.%s." % (o, o)]
    assert drill(dns_server.address, "mx1." + o, "A", tcp=tcp)[:2] == \
        ("NOERROR", ["mx1.%s. 300 IN A 127.0.0.2" % o])
    assert drill(dns_server.address, "mx2." + o, "AAAA", tcp=tcp)[:2] == \
        ("NOERROR", ["mx2.%s. 300 IN AAAA ::1" % o])
    # A name with other records but not this type: NOERROR, no answer.
    assert drill(dns_server.address, "mx1." + o, "AAAA", tcp=tcp)[:2] == ("NOERROR", [])


def test_ttl(dns_server, dns_origin):
    dns_server.add_zone(dns_origin, ["@ MX 10 mx1", "mx1 5 A 127.0.0.2"], ttl=30)
    assert drill(dns_server.address, dns_origin, "MX")[1] == ["%s. 30 IN MX 10 mx1.%s." % (dns_origin, dns_origin)]
    assert drill(dns_server.address, "mx1." + dns_origin, "A")[1] == ["mx1.%s. 5 IN A 127.0.0.2" % dns_origin]


def test_nxdomain_in_a_served_zone(dns_server, dns_origin):
    dns_server.add_zone(dns_origin, mx_zone(dns_origin))
    rcode, records, flags = drill(dns_server.address, "nowhere." + dns_origin, "MX")
    assert (rcode, records) == ("NXDOMAIN", [])
    assert "aa" in flags.split()


def test_broken_zone_is_servfail_until_repaired(dns_server, dns_origin):
    dns_server.broken_zone(dns_origin)
    for name in (dns_origin, "mx1." + dns_origin):
        assert drill(dns_server.address, name, "MX")[:2] == ("SERVFAIL", [])
    assert dns_server.zones()[dns_origin] == "broken"
    dns_server.set_records(dns_origin, mx_zone(dns_origin))
    assert drill(dns_server.address, dns_origin, "MX")[0] == "NOERROR"
    # And a served zone can break too.
    dns_server.broken_zone(dns_origin)
    assert drill(dns_server.address, dns_origin, "MX")[0] == "SERVFAIL"


def test_not_served_is_refused(dns_server, dns_origin):
    assert drill(dns_server.address, dns_origin, "MX")[0] == "REFUSED"
    dns_server.add_zone(dns_origin, mx_zone(dns_origin))
    assert drill(dns_server.address, dns_origin, "MX")[0] == "NOERROR"
    dns_server.remove_zone(dns_origin)
    assert drill(dns_server.address, dns_origin, "MX")[0] == "REFUSED"


def test_set_records_is_served_at_once(dns_server, dns_origin):
    dns_server.add_zone(dns_origin, ["@ MX 10 mx0"])
    # Back to back, within one clock tick: each change is still read.
    for n in range(1, 6):
        dns_server.set_records(dns_origin, ["@ MX 10 mx%d" % n])
        assert drill(dns_server.address, dns_origin, "MX")[1] == \
            ["%s. 300 IN MX 10 mx%d.%s." % (dns_origin, n, dns_origin)]


def test_bad_records_are_refused_with_the_reason(dns_server, dns_origin):
    with pytest.raises(DnsServerError, match="integer value is expected"):
        dns_server.add_zone(dns_origin, ["@ MX ten mx1"])
    assert drill(dns_server.address, dns_origin, "MX")[0] == "REFUSED"
    with pytest.raises(ValueError):
        dns_server.set_records(dns_origin, ["@ MX 10 mx1"])   # never added


def test_query_counter(dns_server, dns_origin):
    dns_server.add_zone(dns_origin, mx_zone(dns_origin))
    dns_server.reset_queries()
    assert dns_server.queries() == 0
    drill(dns_server.address, dns_origin, "MX")
    drill(dns_server.address, "mx1." + dns_origin, "A", tcp=True)
    drill(dns_server.address, "nowhere." + dns_origin, "A")
    drill(dns_server.address, "elsewhere.invalid", "A")       # REFUSED counts too
    assert dns_server.queries() == 4
    # The fixture's own probes (each zone change sends some) do not count.
    dns_server.set_records(dns_origin, ["@ MX 10 mx1"])
    assert dns_server.queries() == 4


def test_query_counter_is_exact_across_reloads(dns_server, dns_origin):
    """NSD 4.6 gathers counters at each reload (a zone change, or the
    stats request itself): none may be lost while queries keep coming."""
    dns_server.add_zone(dns_origin, mx_zone(dns_origin))
    dns_server.reset_queries()
    sent = 1000

    def ask() -> None:
        for _ in range(sent):
            assert dns_query(dns_server.host, dns_server.port, dns_origin, "MX", timeout=5)[0] == "NOERROR"

    t = threading.Thread(target=ask)
    t.start()
    n = 0
    while t.is_alive():
        n += 1
        dns_server.set_records(dns_origin, ["@ MX 10 mx%d" % n])
    t.join()
    assert dns_server.queries() == sent, "%d reloads" % n


def test_silent_nameserver_never_answers():
    with SilentNameserver() as silent:
        with pytest.raises(subprocess.TimeoutExpired):
            drill(silent.address, "example.test", "MX", timeout=1)
        with pytest.raises(subprocess.TimeoutExpired):
            drill(silent.address, "example.test", "MX", tcp=True, timeout=1)
        helpers.wait_until(lambda: silent.udp_queries >= 1 and silent.tcp_connections >= 1,
                           what="the query and the connection")


def test_silent_nameserver_fixture_and_helper(silent_nameserver):
    assert re.fullmatch(r"127\.0\.0\.1:\d+", silent_nameserver)
    with silent_nameserver_cm() as address:
        host, port = address.rsplit(":", 1)
        with pytest.raises(OSError):      # socket.timeout
            dns_query(host, int(port), "example.test", "MX", timeout=0.5)


def test_own_instance_starts_and_leaves_nothing():
    """A second NSD beside the session's: its own port and directory, and
    after stop() no process of its group, no port, no files."""
    with DnsServer() as server:
        assert re.fullmatch(r"127\.0\.0\.1:\d+", server.address)
        server.add_zone("own.test", ["@ MX 10 mx1"])
        assert drill(server.address, "own.test", "MX")[0] == "NOERROR"
        pgid, root, port = server.proc.pid, server.root, server.port
    assert DnsServer._group_pids(pgid) == []
    assert not os.path.exists(root)
    with pytest.raises(OSError):          # refused, or no answer
        dns_query("127.0.0.1", port, "own.test", "MX", timeout=0.5)


class _TakenPort(DnsServer):
    """An NSD told to use a port another socket holds."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self._taken = port

    def _free_udp_tcp_port(self) -> int:
        return self._taken


def test_start_failure_shows_nsds_log():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        server = _TakenPort(holder.getsockname()[1])
        with pytest.raises(DnsServerError) as e:
            server.start(attempts=1)
    assert "nsd exited" in str(e.value)
    assert "Address already in use" in str(e.value)      # from NSD's own log
    assert server.root is None and server.proc is None


# ---------------------------------------------------------------------------
# DNSSEC-signed zones, validated by drill against the DS alone
# ---------------------------------------------------------------------------


def chase(address: str, anchor: str, name: str, qtype: str, tmp_path) -> Tuple[bool, str]:
    """``drill -S``: validate the answer for ``name``/``qtype`` from
    ``address``, trusting only ``anchor`` (a DS record); return (whether
    the chase succeeded, drill's output)."""
    keyfile = tmp_path / "anchor.ds"
    keyfile.write_text(anchor + "\n")
    host, port = address.rsplit(":", 1)
    cmd = [DRILL, "-S", "-k", str(keyfile), "@" + host, "-p", port, name, qtype]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    out = p.stdout + p.stderr
    assert "Number of trusted keys: 1" in out, "%s: %s" % (cmd, out)
    ok = p.returncode == 0 and ";; Chase successful" in out
    assert ok or ";; Chase failed." in out, "%s: %s" % (cmd, out)
    return ok, out


def signed_zone(origin: str) -> List[str]:
    return mx_zone(origin) + ["_25._tcp.mx1 TLSA 3 1 1 " + "ab" * 32]


@requires_signing
def test_signed_zone_validates(dns_server, dns_origin, tmp_path):
    o = dns_origin
    ds = dns_server.add_signed_zone(o, signed_zone(o))
    assert re.fullmatch(r"%s\. 3600 IN DS \d+ 13 2 [0-9a-f]{64}" % re.escape(o), ds), ds
    # NSD serves the DNSSEC records to a query with the DO bit.
    rcode, records, _ = drill(dns_server.address, o, "DNSKEY", dnssec=True)
    assert rcode == "NOERROR"
    assert [r.split()[3:6] for r in records] == [["DNSKEY", "257", "3"], ["RRSIG", "DNSKEY", "13"]]
    rcode, records, _ = drill(dns_server.address, o, "MX", dnssec=True)
    assert [r.split()[3] for r in records] == ["MX", "MX", "RRSIG"]
    # Each answer validates against the DS: records, a TLSA record, and
    # signed denials (NXDOMAIN, and no record of that type: NSEC).
    for name, qtype in [(o, "MX"), ("mx1." + o, "A"), ("_25._tcp.mx1." + o, "TLSA"),
                        ("nowhere." + o, "A"), ("mx1." + o, "AAAA")]:
        ok, out = chase(dns_server.address, ds, name, qtype, tmp_path)
        assert ok, out
    _, out = chase(dns_server.address, ds, "nowhere." + o, "A", tmp_path)
    assert "Existence is denied by:" in out and " NSEC " in out


@requires_signing
def test_signed_zone_bogus_fails_validation(dns_server, dns_origin, tmp_path):
    o = dns_origin
    ds = dns_server.add_signed_zone(o, signed_zone(o), bogus=True)
    # The key itself still matches the DS: every other signature is bad,
    # denials of existence included.
    for name, qtype in [(o, "MX"), ("_25._tcp.mx1." + o, "TLSA"), ("nowhere." + o, "A")]:
        ok, out = chase(dns_server.address, ds, name, qtype, tmp_path)
        assert not ok and "Bogus DNSSEC signature" in out, out
    ok, out = chase(dns_server.address, ds, o, "DNSKEY", tmp_path)
    assert ok, out


@requires_signing
def test_signed_zone_expired_fails_validation(dns_server, dns_origin, tmp_path):
    o = dns_origin
    ds = dns_server.add_signed_zone(o, signed_zone(o), expired=True)
    for name, qtype in [(o, "MX"), ("_25._tcp.mx1." + o, "TLSA")]:
        ok, out = chase(dns_server.address, ds, name, qtype, tmp_path)
        assert not ok and "DNSSEC signature has expired" in out, out


@requires_signing
def test_unsigned_zones_beside_a_signed_one(dns_server, dns_origin, tmp_path):
    """A zone of its own with no anchor, and a child zone delegated
    without a DS: neither has a signature; the child's lack of a DS is
    itself proven by the signed parent (an insecure delegation)."""
    o = dns_origin
    ds = dns_server.add_signed_zone(o, signed_zone(o) + ["child NS ns.child", "ns.child A 127.0.0.1"])
    plain = dns_server.unique_origin("unsigned")
    dns_server.add_zone(plain, mx_zone(plain))
    dns_server.add_zone("child." + o, mx_zone("child." + o))
    for zone in (plain, "child." + o):
        rcode, records, _ = drill(dns_server.address, zone, "MX", dnssec=True)
        assert rcode == "NOERROR" and [r.split()[3] for r in records] == ["MX", "MX"]
        ok, out = chase(dns_server.address, ds, zone, "MX", tmp_path)
        assert not ok and "No DNSSEC public key(s)" in out, out
    ok, out = chase(dns_server.address, ds, "child." + o, "DS", tmp_path)
    assert ok and "Existence is denied by:" in out, out


@requires_signing
def test_set_signed_records_keeps_the_key(dns_server, dns_origin, tmp_path):
    o = dns_origin
    ds = dns_server.add_signed_zone(o, ["@ MX 10 mx0"])
    assert dns_server.set_signed_records(o, ["@ MX 10 mx1"]) == ds
    assert drill(dns_server.address, o, "MX")[1] == ["%s. 300 IN MX 10 mx1.%s." % (o, o)]
    assert chase(dns_server.address, ds, o, "MX", tmp_path)[0]
    # Bogus, then good again; unsigned, then signed again with that key.
    assert dns_server.set_signed_records(o, ["@ MX 10 mx2"], bogus=True) == ds
    assert not chase(dns_server.address, ds, o, "MX", tmp_path)[0]
    dns_server.set_records(o, ["@ MX 10 mx3"])
    assert drill(dns_server.address, o, "MX", dnssec=True)[1] == ["%s. 300 IN MX 10 mx3.%s." % (o, o)]
    assert dns_server.set_signed_records(o, ["@ MX 10 mx4"]) == ds
    assert chase(dns_server.address, ds, o, "MX", tmp_path)[0]
    # A new zone gets a key of its own.
    other = dns_server.unique_origin("other")
    assert dns_server.add_signed_zone(other, []).split()[4:] != ds.split()[4:]


@requires_signing
def test_signed_zone_refusals(dns_server, dns_origin):
    with pytest.raises(ValueError):
        dns_server.set_signed_records(dns_origin, ["@ MX 10 mx1"])     # never added
    with pytest.raises(DnsServerError, match="ldns-signzone"):
        dns_server.add_signed_zone(dns_origin, ["@ MX ten mx1"])
    assert drill(dns_server.address, dns_origin, "MX")[0] == "REFUSED"
    dns_server.add_zone(dns_origin, ["@ MX 10 mx1"])
    with pytest.raises(ValueError):
        dns_server.add_signed_zone(dns_origin, ["@ MX 10 mx1"])        # exists
    with pytest.raises(ValueError):
        dns_server.set_signed_records(dns_origin, ["@ MX 10 mx1"])     # not signed


# ---------------------------------------------------------------------------
# TLSA record data, against the openssl command line
# ---------------------------------------------------------------------------


def openssl(args: List[str], data: bytes) -> bytes:
    p = subprocess.run([OPENSSL] + args, input=data, capture_output=True, timeout=10)
    assert p.returncode == 0, "openssl %s: %s" % (" ".join(args), p.stderr.decode(errors="replace"))
    return p.stdout


@helpers.requires(OPENSSL is not None, "openssl (Debian package openssl) is not installed")
@pytest.mark.parametrize("key_type", ["RSA", "ECDSA"])
def test_tlsa_rdata_matches_openssl(key_type):
    trustme = helpers.import_or_missing("trustme")
    ca = trustme.CA(key_type=getattr(trustme.KeyType, key_type))
    pem = ca.issue_cert("mx1.example.test").cert_chain_pems[0].bytes()
    selected = {
        0: openssl(["x509", "-outform", "DER"], pem),
        1: openssl(["pkey", "-pubin", "-outform", "DER"], openssl(["x509", "-pubkey", "-noout"], pem)),
    }
    for selector, der in selected.items():
        for mtype, digest in [(0, None), (1, "-sha256"), (2, "-sha512")]:
            data = der.hex() if digest is None else \
                openssl(["dgst", digest, "-r"], der).split()[0].decode("ascii")
            assert tlsa_rdata(pem, 3, selector, mtype) == "3 %d %d %s" % (selector, mtype, data)
    assert tlsa_rdata(pem) == tlsa_rdata(pem.decode("ascii"), 3, 1, 1)
    assert tlsa_rdata(pem, usage=2).startswith("2 1 1 ")
    for bad in [dict(usage=4), dict(selector=2), dict(mtype=3)]:
        with pytest.raises(ValueError):
            tlsa_rdata(pem, **bad)
