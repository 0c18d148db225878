"""DANE (RFC 7672, RFC 7671) against real components: a private NSD serving
DNSSEC-signed zones (tests/dns_server.py, signed with ldnsutils; the
resolver gets each zone's DS as its trust anchor), TLSA records made from
the test servers' certificates, and aiosmtpd with STARTTLS on several
loopback addresses (tests/mx_servers.py).

The certificates come from a CA the client does not trust: a message that
goes over TLS here was authenticated by its TLSA records (DANE) or not at
all (opportunistic). What tells the two apart is what a record that does
not match does: DANE refuses that MX and tries the next; opportunistic
TLS would deliver regardless.
"""

from __future__ import annotations

import pytest

import smtpstate
from dns_server import tlsa_rdata
from helpers import import_or_missing, server_tls
from smtpstate import Message, Resolver
from smtpstate.errors import InvalidOptionError

A, B = "127.0.0.2", "127.0.0.3"
BODY = b"Subject: dane\r\n\r\nhello\r\n"


def message(rcpt: str) -> Message:
    return Message("sender@client.test", [rcpt], BODY)


@pytest.fixture(scope="module")
def ca():
    trustme = import_or_missing("trustme")
    return trustme.CA()


def other_cert(ca) -> bytes:
    return ca.issue_cert("someone.else.test").cert_chain_pems[0].bytes()


@pytest.fixture
def deliver(dns_server):
    """deliver(rcpt, port, anchor, **options): one message by MX, the
    resolver asking the private NSD with ``anchor`` (a DS) as its trust
    anchor (None: no validation); its Result."""
    def send(rcpt: str, port: int, anchor, **options) -> smtpstate.Result:
        resolver = Resolver([dns_server.address], hosts_file=False, timeout=2,
                            trust_anchors=[anchor] if anchor else None)
        (result,) = smtpstate.deliver([message(rcpt)], port=port, resolver=resolver,
                                      timeout=10, **options)
        return result
    return send


def test_dane_ee_match_delivers(dns_server, dns_origin, mx_servers, ca, deliver):
    o = dns_origin
    ctx, pem = server_tls(ca, f"mx1.{o}")
    mx = mx_servers([A], tls={A: ctx})
    ds = dns_server.add_signed_zone(o, ["@ MX 10 mx1", f"mx1 A {A}",
                                        f"_{mx.port}._tcp.mx1 TLSA {tlsa_rdata(pem)}"])
    result = deliver(f"r@{o}", mx.port, ds)
    assert result.status == "delivered", result
    (got,) = mx.server(A).messages
    assert got.extra["tls"]


def test_a_tlsa_mismatch_moves_on_to_the_next_mx(dns_server, dns_origin, mx_servers, ca, deliver):
    o = dns_origin
    ctx1, _ = server_tls(ca, f"mx1.{o}")
    ctx2, pem2 = server_tls(ca, f"mx2.{o}")
    mx = mx_servers([A, B], tls={A: ctx1, B: ctx2})
    ds = dns_server.add_signed_zone(o, [
        "@ MX 10 mx1", "@ MX 20 mx2", f"mx1 A {A}", f"mx2 A {B}",
        f"_{mx.port}._tcp.mx1 TLSA {tlsa_rdata(other_cert(ca))}",     # not mx1's key
        f"_{mx.port}._tcp.mx2 TLSA {tlsa_rdata(pem2)}"])
    result = deliver(f"r@{o}", mx.port, ds)
    assert result.status == "delivered", result
    assert result.recipients[0].mx == f"mx2.{o}"
    assert mx.server(A).messages == [] and mx.server(B).messages[0].extra["tls"]


def test_a_tlsa_mismatch_at_the_only_mx_fails_for_now(dns_server, dns_origin, mx_servers, ca,
                                                      deliver):
    o = dns_origin
    ctx, _ = server_tls(ca, f"mx1.{o}")
    mx = mx_servers([A], tls={A: ctx})
    ds = dns_server.add_signed_zone(o, ["@ MX 10 mx1", f"mx1 A {A}",
                                        f"_{mx.port}._tcp.mx1 TLSA {tlsa_rdata(other_cert(ca))}"])
    result = deliver(f"r@{o}", mx.port, ds)
    assert result.status == "tempfail", result
    assert "TLS handshake failed" in result.reason and f"mx1.{o}" in result.reason
    assert mx.server(A).messages == []


def test_dane_ta_checks_the_name(dns_server, dns_origin, mx_servers, ca, deliver):
    """DANE-TA(2) with the CA's whole public key (2 1 0): a certificate it
    issued for the MX host's name passes; one for another name does not."""
    o = dns_origin
    good, _ = server_tls(ca, f"mx1.{o}")
    wrong, _ = server_tls(ca, f"elsewhere.{o}")
    mx = mx_servers([A, B], tls={A: wrong, B: good})
    ta = tlsa_rdata(ca.cert_pem.bytes(), usage=2, selector=1, mtype=0)
    ds = dns_server.add_signed_zone(o, [
        "@ MX 10 mx1", "@ MX 20 mx2", f"mx1 A {A}", f"mx2 A {B}",
        f"_{mx.port}._tcp.mx1 TLSA {ta}", f"_{mx.port}._tcp.mx2 TLSA {ta}"])
    # mx1's certificate names elsewhere: refused; so to mx2... whose
    # certificate names mx1, not mx2: refused too.
    result = deliver(f"r@{o}", mx.port, ds)
    assert result.status == "tempfail", result
    assert mx.messages() == []
    # Now with the right name at mx2.
    ctx2, _ = server_tls(ca, f"mx2.{o}")
    mx2 = mx_servers([A, B], tls={A: wrong, B: ctx2})
    dns_server.set_signed_records(o, [
        "@ MX 10 mx1", "@ MX 20 mx2", f"mx1 A {A}", f"mx2 A {B}",
        f"_{mx2.port}._tcp.mx1 TLSA {ta}", f"_{mx2.port}._tcp.mx2 TLSA {ta}"])
    result = deliver(f"r@{o}", mx2.port, ds)
    assert result.status == "delivered", result
    assert result.recipients[0].mx == f"mx2.{o}"


def test_without_validation_a_mismatch_is_opportunistic(dns_server, dns_origin, mx_servers, ca,
                                                        deliver):
    """An unsigned zone (no trust anchor): the TLSA records prove nothing,
    TLS is opportunistic, the message goes encrypted."""
    o = dns_origin
    ctx, _ = server_tls(ca, f"mx1.{o}")
    mx = mx_servers([A], tls={A: ctx})
    dns_server.add_zone(o, ["@ MX 10 mx1", f"mx1 A {A}",
                            f"_{mx.port}._tcp.mx1 TLSA {tlsa_rdata(other_cert(ca))}"])
    result = deliver(f"r@{o}", mx.port, None)
    assert result.status == "delivered", result
    assert mx.server(A).messages[0].extra["tls"]


def test_dane_only_without_tlsa_does_not_deliver(dns_server, dns_origin, mx_servers, ca, deliver):
    o = dns_origin
    ctx, _ = server_tls(ca, f"mx1.{o}")
    mx = mx_servers([A], tls={A: ctx})
    ds = dns_server.add_signed_zone(o, ["@ MX 10 mx1", f"mx1 A {A}"])
    result = deliver(f"r@{o}", mx.port, ds, tls="dane-only")
    assert result.status == "tempfail", result
    assert "no DNSSEC-validated TLSA records for mx1." in result.reason
    assert mx.messages() == [] and mx.server(A).accepted == 0
    # The same with "dane": opportunistic, delivered.
    assert deliver(f"r@{o}", mx.port, ds, tls="dane").status == "delivered"


def test_unusable_tlsa_records_make_tls_mandatory(dns_server, dns_origin, mx_servers, ca, deliver):
    """Only PKIX-EE(1) records: none usable for SMTP, so TLS is required
    but not authenticated (RFC 7672 2.2): no STARTTLS, no delivery."""
    o = dns_origin
    mx = mx_servers([A])                              # no STARTTLS
    ds = dns_server.add_signed_zone(o, ["@ MX 10 mx1", f"mx1 A {A}",
                                        f"_{mx.port}._tcp.mx1 TLSA "
                                        f"{tlsa_rdata(other_cert(ca), usage=1)}"])
    result = deliver(f"r@{o}", mx.port, ds)
    assert result.status == "tempfail", result
    assert "TLS is required, but the server does not offer STARTTLS" in result.reason
    assert mx.messages() == []


def test_an_mx_host_in_a_bogus_zone_is_not_used(dns_server, dns_origin, mx_servers, ca, deliver):
    o = dns_origin
    bad = dns_server.unique_origin("bogus")
    ctx, pem = server_tls(ca, f"mx1.{bad}")
    mx = mx_servers([A], tls={A: ctx})
    bad_ds = dns_server.add_signed_zone(bad, [f"mx1 A {A}"], bogus=True)
    ds = dns_server.add_signed_zone(o, [f"@ MX 10 mx1.{bad}."])
    resolver = Resolver([dns_server.address], hosts_file=False, timeout=2,
                        trust_anchors=[ds, bad_ds])
    (result,) = smtpstate.deliver([message(f"r@{o}")], port=mx.port, resolver=resolver,
                                  timeout=10)
    assert result.status == "tempfail", result
    assert mx.server(A).accepted == 0


@pytest.mark.parametrize("level", ["dane", "dane-only"])
def test_a_single_session_cannot_do_dane(level):
    with pytest.raises(InvalidOptionError, match="needs the Engine"):
        smtpstate.Client("127.0.0.1", 25, tls=level).send(message("r@x.test"))
