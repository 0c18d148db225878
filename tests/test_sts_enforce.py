"""MTA-STS enforcement in the engine (RFC 8461 4.2), against real
components: a private NSD for the MX records, aiosmtpd with STARTTLS on
several loopback addresses, certificates from the tests' CA (trusted
through ``ca_file``) or from a CA nobody trusts.

The policies are handed to the engine (``Engine.set_mta_sts_policy``) as
smtpstate.mta_sts makes them; fetching them over HTTPS is tested in
tests/test_mta_sts.py.
"""

from __future__ import annotations

import time

import pytest

import smtpstate
from dns_server import tlsa_rdata
from helpers import import_or_missing, server_tls
from smtpstate import Engine, Message, Resolver
from smtpstate.errors import InvalidOptionError
from smtpstate.mta_sts import Policy

A, B = "127.0.0.2", "127.0.0.3"


def message(rcpt: str) -> Message:
    return Message("sender@client.test", [rcpt], b"Subject: sts\r\n\r\nhello\r\n")


def policy(mode: str, *mx: str) -> Policy:
    return Policy(mode=mode, mx=mx, max_age=86400, id="20261207", fetched_at=time.time())


@pytest.fixture(scope="module")
def stranger():
    """A CA nobody here trusts."""
    return import_or_missing("trustme").CA()


@pytest.fixture
def send(dns_server, tls_ca_file):
    """send(rcpt, port, policies={domain: Policy}, anchors=(), **options):
    one message by MX through an Engine trusting the tests' CA."""
    def run(rcpt, port, policies=None, anchors=(), **options):
        resolver = Resolver([dns_server.address], hosts_file=False, timeout=2,
                            trust_anchors=list(anchors) or None)
        with Engine(resolver=resolver) as engine:
            for domain, p in (policies or {}).items():
                engine.set_mta_sts_policy(domain, p)
            ticket = engine.submit(message(rcpt), port=port, timeout=10,
                                   ca_file=tls_ca_file, **options)
        return ticket.result
    return run


def test_enforce_delivers_over_verified_tls(dns_server, dns_origin, mx_servers, tls_ca, send):
    o = dns_origin
    mx = mx_servers([A], tls={A: server_tls(tls_ca, f"mx1.{o}")[0]})
    dns_server.add_zone(o, ["@ MX 10 mx1", f"mx1 A {A}"])
    result = send(f"r@{o}", mx.port, {o: policy("enforce", f"mx1.{o}")})
    assert result.status == "delivered", result
    assert mx.server(A).messages[0].extra["tls"]


def test_enforce_skips_mx_hosts_the_policy_does_not_name(dns_server, dns_origin, mx_servers,
                                                         tls_ca, send):
    o = dns_origin
    mx = mx_servers([A, B], tls={A: server_tls(tls_ca, f"mx1.{o}")[0],
                                 B: server_tls(tls_ca, f"mx2.backup.{o}")[0]})
    dns_server.add_zone(o, ["@ MX 10 mx1", "@ MX 20 mx2.backup", f"mx1 A {A}",
                            f"mx2.backup A {B}"])
    # Only "*.backup.<o>" is allowed: the preferred mx1 is not used at all.
    result = send(f"r@{o}", mx.port, {o: policy("enforce", f"*.backup.{o}")})
    assert result.status == "delivered", result
    assert result.recipients[0].mx == f"mx2.backup.{o}"
    assert mx.server(A).accepted == 0


def test_enforce_with_no_matching_mx_fails_for_now(dns_server, dns_origin, mx_servers,
                                                   tls_ca, send):
    o = dns_origin
    mx = mx_servers([A], tls={A: server_tls(tls_ca, f"mx1.{o}")[0]})
    dns_server.add_zone(o, ["@ MX 10 mx1", f"mx1 A {A}"])
    result = send(f"r@{o}", mx.port, {o: policy("enforce", "mx.elsewhere.test")})
    assert result.status == "tempfail", result
    assert result.reason == (f"4.4.4 cannot route {o}: none of its MX hosts matches its "
                             "MTA-STS policy (RFC 8461 4.2)")
    assert mx.server(A).accepted == 0


def test_enforce_refuses_a_certificate_it_cannot_verify(dns_server, dns_origin, mx_servers,
                                                        stranger, send):
    """Opportunistic TLS would deliver this (see the testing mode below)."""
    o = dns_origin
    mx = mx_servers([A], tls={A: server_tls(stranger, f"mx1.{o}")[0]})
    dns_server.add_zone(o, ["@ MX 10 mx1", f"mx1 A {A}"])
    result = send(f"r@{o}", mx.port, {o: policy("enforce", f"mx1.{o}")})
    assert result.status == "tempfail", result
    assert "certificate verify failed" in result.reason
    assert mx.server(A).messages == []


def test_enforce_requires_starttls(dns_server, dns_origin, mx_servers, send):
    o = dns_origin
    mx = mx_servers([A])
    dns_server.add_zone(o, ["@ MX 10 mx1", f"mx1 A {A}"])
    result = send(f"r@{o}", mx.port, {o: policy("enforce", f"mx1.{o}")})
    assert result.status == "tempfail", result
    assert "TLS is required, but the server does not offer STARTTLS" in result.reason


@pytest.mark.parametrize("mode", ["testing", "none"])
def test_testing_and_none_change_nothing(dns_server, dns_origin, mx_servers, stranger, send,
                                         mode):
    o = dns_origin
    mx = mx_servers([A], tls={A: server_tls(stranger, f"mx1.{o}")[0]})
    dns_server.add_zone(o, ["@ MX 10 mx1", f"mx1 A {A}"])
    p = policy(mode, "mx.elsewhere.test") if mode == "testing" else policy("none")
    result = send(f"r@{o}", mx.port, {o: p})
    assert result.status == "delivered", result        # opportunistic, as without
    assert mx.server(A).messages[0].extra["tls"]


def test_dane_wins_over_mta_sts(dns_server, dns_origin, mx_servers, stranger, send):
    """A certificate no CA vouches for, but its TLSA record does: under
    DANE the MTA-STS policy's certificate check does not apply (RFC 8461
    2)."""
    o = dns_origin
    ctx, pem = server_tls(stranger, f"mx1.{o}")
    mx = mx_servers([A], tls={A: ctx})
    ds = dns_server.add_signed_zone(o, [
        "@ MX 10 mx1", f"mx1 A {A}", f"_{mx.port}._tcp.mx1 TLSA {tlsa_rdata(pem)}"])
    result = send(f"r@{o}", mx.port, {o: policy("enforce", f"mx1.{o}")}, anchors=[ds])
    assert result.status == "delivered", result


def test_an_explicit_level_is_the_callers_choice(dns_server, dns_origin, mx_servers, stranger,
                                                  send):
    o = dns_origin
    mx = mx_servers([A], tls={A: server_tls(stranger, f"mx1.{o}")[0]})
    dns_server.add_zone(o, ["@ MX 10 mx1", f"mx1 A {A}"])
    result = send(f"r@{o}", mx.port, {o: policy("enforce", f"mx1.{o}")}, tls="opportunistic")
    assert result.status == "delivered", result


def test_a_policy_given_later_applies_to_the_next_message(dns_server, dns_origin, mx_servers,
                                                          tls_ca, tls_ca_file):
    o = dns_origin
    mx = mx_servers([A, B], tls={A: server_tls(tls_ca, f"mx1.{o}")[0],
                                 B: server_tls(tls_ca, f"mx2.{o}")[0]})
    dns_server.add_zone(o, ["@ MX 10 mx1", "@ MX 20 mx2", f"mx1 A {A}", f"mx2 A {B}"])
    resolver = Resolver([dns_server.address], hosts_file=False)
    with Engine(resolver=resolver) as engine:
        first = engine.submit(message(f"r1@{o}"), port=mx.port, ca_file=tls_ca_file)
        list(engine.run())
        engine.set_mta_sts_policy(o, policy("enforce", f"mx2.{o}"))
        second = engine.submit(message(f"r2@{o}"), port=mx.port, ca_file=tls_ca_file)
    assert first.result.recipients[0].mx == f"mx1.{o}"
    assert second.result.recipients[0].mx == f"mx2.{o}", second.result


def test_bad_policies_are_refused():
    with Engine() as engine:
        with pytest.raises(InvalidOptionError, match="must be a smtpstate.mta_sts.Policy"):
            engine.set_mta_sts_policy("example.test", {"mode": "enforce"})
        with pytest.raises(InvalidOptionError, match="cannot use the MTA-STS policy"):
            engine.set_mta_sts_policy("bad domain.test", policy("enforce", "mx.example.test"))
    with pytest.raises(smtpstate.LocalProtocolError):
        engine.set_mta_sts_policy("example.test", policy("enforce", "mx.example.test"))


# -- tls="mta-sts": the domain's policy alone, no DANE -----------------------------

def test_the_mta_sts_level_ignores_tlsa_records(dns_server, dns_origin, mx_servers, stranger,
                                                send):
    """The same world as test_dane_wins_over_mta_sts, at the level that
    leaves DANE out: the policy's certificate check applies, and fails."""
    o = dns_origin
    ctx, pem = server_tls(stranger, f"mx1.{o}")
    mx = mx_servers([A], tls={A: ctx})
    ds = dns_server.add_signed_zone(o, [
        "@ MX 10 mx1", f"mx1 A {A}", f"_{mx.port}._tcp.mx1 TLSA {tlsa_rdata(pem)}"])
    result = send(f"r@{o}", mx.port, {o: policy("enforce", f"mx1.{o}")}, anchors=[ds],
                  tls="mta-sts")
    assert result.status == "tempfail", result
    assert "certificate verify failed" in result.reason
    assert mx.server(A).messages == []


def test_the_mta_sts_level_verifies_under_an_enforced_policy(dns_server, dns_origin, mx_servers,
                                                             tls_ca, send):
    o = dns_origin
    mx = mx_servers([A], tls={A: server_tls(tls_ca, f"mx1.{o}")[0]})
    dns_server.add_zone(o, ["@ MX 10 mx1", f"mx1 A {A}"])
    result = send(f"r@{o}", mx.port, {o: policy("enforce", f"mx1.{o}")}, tls="mta-sts")
    assert result.status == "delivered", result
    assert mx.server(A).messages[0].extra["tls"]


def test_the_mta_sts_level_without_a_policy_is_opportunistic(dns_server, dns_origin, mx_servers,
                                                             stranger, send):
    o = dns_origin
    mx = mx_servers([A], tls={A: server_tls(stranger, f"mx1.{o}")[0]})
    dns_server.add_zone(o, ["@ MX 10 mx1", f"mx1 A {A}"])
    result = send(f"r@{o}", mx.port, tls="mta-sts")
    assert result.status == "delivered", result
    assert mx.server(A).messages[0].extra["tls"]


def test_the_mta_sts_level_needs_delivery_by_mx():
    with Engine() as engine:
        with pytest.raises(InvalidOptionError, match="needs delivery by MX"):
            engine.submit(message("r@example.test"), "mx.example.test", tls="mta-sts")
    with pytest.raises(InvalidOptionError, match="needs the Engine"):
        smtpstate.Client("127.0.0.1", 25, tls="mta-sts")
