"""Routing by MX (Engine.submit() and smtpstate.deliver() without a host),
against real components only: a private NSD serving the zones
(tests/dns_server.py) through the engine's own libunbound, and aiosmtpd
servers on 127.0.0.2, 127.0.0.3, ... (and ::1) sharing one port
(tests/mx_servers.py), each with its own behaviour.

What is checked, one behaviour per test, each with its exact outcome
(status per recipient, RecipientResult.mx and .ip, which server took which
message, the reason naming the hosts):

* MX order: the lowest preference first, whatever the zone's order; equal
  preferences share the load; the next MX only when one fails before any
  transaction (refused, 421 or 554 greeting, EHLO refused, silence), never
  after a reply to RCPT or DATA; every MX failing is a tempfail naming
  each, a permfail only when each refused permanently; mx_address_limit;
* DNS outcomes: null MX (RFC 7505), implicit MX, NXDOMAIN, SERVFAIL, a
  name server that never answers, MX hosts that do not resolve;
* sites: one result per message however many domains; one transaction per
  site, carrying every recipient of the domains that share it; partial;
* traffic shaping: one connection limit per site, the most specific rule,
  message and connection rates measured at the server;
* source addresses and their EHLO names, address literals (no lookup),
  address families, and how few queries ten thousand messages cost;
* the resolver's settings, refused at once when they cannot work.

Each test makes zones of its own (``dns_origin``); NSD is shared by the
session. The IPv6 tests need ``::1`` and fail in CI without it.
"""

from __future__ import annotations

import collections
import time
from typing import Dict, List

import pytest

import smtpstate
from helpers import requires
from mx_servers import ipv6_loopback_available
from smtpstate import Engine, Limits, Message, Resolver, Source
from smtpstate.errors import InvalidOptionError

IPV6 = requires(ipv6_loopback_available(), "no IPv6 loopback (::1) here")

SENDER = "sender@client.test"
BODY = b"Subject: routing\r\n\r\nhello\r\n"
A, B, C = "127.0.0.2", "127.0.0.3", "127.0.0.4"


def message(*recipients: str) -> Message:
    return Message(SENDER, list(recipients), BODY)


def serve(dns_server, origin: str, *records: str) -> None:
    """Serve zone ``origin`` with ``records``, "{o}" standing for it."""
    dns_server.add_zone(origin, [r.format(o=origin) for r in records])


def landed(mx) -> Dict[str, str]:
    """{recipient: address of the server that took it}, over every server;
    a recipient taken twice fails the test."""
    out: Dict[str, str] = {}
    for server in mx.servers():
        for m in server.messages:
            for rcpt in m.rcpt_tos:
                assert rcpt not in out, f"{rcpt} was delivered twice"
                out[rcpt] = server.address
    return out


def where(result) -> List[tuple]:
    """(address, status, mx, ip) of each recipient of a result."""
    return [(r.address, r.status, r.mx, r.ip) for r in result.recipients]


@pytest.fixture
def resolver(dns_server):
    """The private NSD, and nothing else (no /etc/hosts)."""
    return Resolver([dns_server.address], hosts_file=False, timeout=2, attempts=2)


# ---------------------------------------------------------------------------
# MX order
# ---------------------------------------------------------------------------


def test_lowest_preference_first(dns_server, dns_origin, mx_servers, resolver):
    mx = mx_servers([A, B, C])
    # In the zone (and so in NSD's answer) the most preferred comes last.
    serve(dns_server, dns_origin, "@ MX 30 mx3", "@ MX 20 mx2", "@ MX 10 mx1",
          f"mx1 A {A}", f"mx2 A {B}", f"mx3 A {C}")
    rcpts = [f"r{i}@{dns_origin}" for i in range(6)]
    results = smtpstate.deliver([message(r) for r in rcpts], port=mx.port, resolver=resolver)
    for rcpt, result in zip(rcpts, results):
        assert result.status == "delivered", result
        assert where(result) == [(rcpt, "delivered", f"mx1.{dns_origin}", A)]
    assert landed(mx) == {r: A for r in rcpts}
    assert mx.server(B).accepted == 0 and mx.server(C).accepted == 0


def test_equal_preferences_share_the_load(dns_server, dns_origin, mx_servers, resolver):
    mx = mx_servers([A, B, C])
    serve(dns_server, dns_origin, "@ MX 10 mx1", "@ MX 10 mx2", "@ MX 20 mx3",
          f"mx1 A {A}", f"mx2 A {B}", f"mx3 A {C}")
    rcpts = [f"r{i}@{dns_origin}" for i in range(20)]
    # One message per connection: each new connection starts at one of
    # the most preferred hosts in turn.
    with Engine(resolver=resolver, max_per_destination=4, messages_per_connection=1) as engine:
        tickets = [engine.submit(message(r), port=mx.port) for r in rcpts]
    got = landed(mx)
    assert sorted(got) == sorted(rcpts)
    counts = collections.Counter(got.values())
    assert counts[A] >= 5 and counts[B] >= 5 and counts[A] + counts[B] == 20, counts
    assert mx.server(C).accepted == 0
    names = {A: f"mx1.{dns_origin}", B: f"mx2.{dns_origin}"}
    for rcpt, t in zip(rcpts, tickets):
        # Each result names the host that took that very message.
        assert where(t.result) == [(rcpt, "delivered", names[got[rcpt]], got[rcpt])]


# ---------------------------------------------------------------------------
# Fallback
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["refuse", "greet421", "greet554", "ehlo_fail", "hang"])
def test_fallback_to_the_next_mx(dns_server, dns_origin, mx_servers, resolver, failure):
    """The preferred MX fails before any transaction: every message goes to
    the next one (not the one after), and says so."""
    mx = mx_servers([A, B, C], {A: failure})
    serve(dns_server, dns_origin, "@ MX 10 mx1", "@ MX 20 mx2", "@ MX 30 mx3",
          f"mx1 A {A}", f"mx2 A {B}", f"mx3 A {C}")
    rcpts = [f"r{i}@{dns_origin}" for i in range(4)]
    # "hang" says nothing: the greeting's deadline (the timeout option)
    # decides when to go on. The others fail at once.
    timeout = 1 if failure == "hang" else 5
    start = time.monotonic()
    results = smtpstate.deliver([message(r) for r in rcpts], port=mx.port, resolver=resolver,
                                timeout=timeout)
    elapsed = time.monotonic() - start
    for rcpt, result in zip(rcpts, results):
        assert result.status == "delivered", result
        assert where(result) == [(rcpt, "delivered", f"mx2.{dns_origin}", B)]
    assert landed(mx) == {r: B for r in rcpts}
    assert mx.server(A).messages == [] and mx.server(C).accepted == 0
    assert (mx.server(A).accepted == 0) == (failure == "refuse")
    if failure == "hang":
        assert 1.0 <= elapsed < 4.0, elapsed
    else:
        assert elapsed < timeout, elapsed


@IPV6
def test_fallback_within_a_hosts_addresses(dns_server, dns_origin, mx_servers, resolver):
    """One MX host with two addresses: the first (IPv6, as asked) refuses,
    the second takes the message; ip names the second."""
    mx = mx_servers([A, "::1"], {"::1": "refuse"})
    serve(dns_server, dns_origin, "@ MX 10 mx1", f"mx1 A {A}", "mx1 AAAA ::1")
    with Engine(resolver=resolver, address_preference="ipv6") as engine:
        t = engine.submit(message(f"r@{dns_origin}"), port=mx.port)
    assert where(t.result) == [(f"r@{dns_origin}", "delivered", f"mx1.{dns_origin}", A)]
    assert landed(mx) == {f"r@{dns_origin}": A}


def test_every_mx_failing_is_a_tempfail_naming_each(dns_server, dns_origin, mx_servers, resolver):
    mx = mx_servers([A, B], {A: "refuse", B: "greet421"})
    serve(dns_server, dns_origin, "@ MX 10 mx1", "@ MX 20 mx2", f"mx1 A {A}", f"mx2 A {B}")
    rcpts = [f"r{i}@{dns_origin}" for i in range(3)]
    results = smtpstate.deliver([message(r) for r in rcpts], port=mx.port, resolver=resolver)
    for rcpt, result in zip(rcpts, results):
        assert result.status == "tempfail", result
        # No host took it: the hosts tried are in the reason.
        assert where(result) == [(rcpt, "tempfail", None, None)]
        assert result.bounce_class.name == "transient failure"
        assert result.reason == (f"connect to mx1.{dns_origin}[{A}]:{mx.port}: Connection refused; "
                                 f"mx2.{dns_origin}[{B}]:{mx.port}: server said 421 4.3.2 try later")
    # Each message was held by a session that mx2 greeted with 421.
    assert mx.server(B).accepted == 3
    assert landed(mx) == {}


def test_every_mx_refusing_permanently_is_a_permfail(dns_server, dns_origin, mx_servers, resolver):
    mx = mx_servers([A, B], {A: "greet554", B: "greet554"})
    serve(dns_server, dns_origin, "@ MX 10 mx1", "@ MX 20 mx2", f"mx1 A {A}", f"mx2 A {B}")
    (result,) = smtpstate.deliver([message(f"r@{dns_origin}")], port=mx.port, resolver=resolver)
    assert result.status == "permfail", result
    assert where(result) == [(f"r@{dns_origin}", "permfail", None, None)]
    assert result.reason == (f"mx1.{dns_origin}[{A}]:{mx.port}: the server refuses service "
                             f"(554 greeting); mx2.{dns_origin}[{B}]:{mx.port}: the server "
                             "refuses service (554 greeting)")
    assert mx.server(A).accepted == 1 and mx.server(B).accepted == 1


def test_one_temporary_failure_among_permanent_ones_is_a_tempfail(dns_server, dns_origin,
                                                                  mx_servers, resolver):
    mx = mx_servers([A, B], {A: "greet554", B: "refuse"})
    serve(dns_server, dns_origin, "@ MX 10 mx1", "@ MX 20 mx2", f"mx1 A {A}", f"mx2 A {B}")
    (result,) = smtpstate.deliver([message(f"r@{dns_origin}")], port=mx.port, resolver=resolver)
    assert result.status == "tempfail", result
    assert f"mx1.{dns_origin}[{A}]" in result.reason and "554" in result.reason
    assert f"mx2.{dns_origin}[{B}]" in result.reason and "Connection refused" in result.reason


@pytest.mark.parametrize("behaviour, status, code, stage", [
    ("rcpt_550", "permfail", 550, "sending RCPT TO"),
    ("tempfail_data", "tempfail", 451, "sending DATA"),
])
def test_a_reply_to_the_transaction_is_the_destinations_answer(
        dns_server, dns_origin, mx_servers, resolver, behaviour, status, code, stage):
    """A 5xx or 4xx to RCPT or DATA is not a reason to go elsewhere."""
    mx = mx_servers([A, B], {A: behaviour})
    serve(dns_server, dns_origin, "@ MX 10 mx1", "@ MX 20 mx2", f"mx1 A {A}", f"mx2 A {B}")
    rcpts = [f"r{i}@{dns_origin}" for i in range(2)]
    results = smtpstate.deliver([message(r) for r in rcpts], port=mx.port, resolver=resolver)
    for rcpt, result in zip(rcpts, results):
        assert (result.status, result.reply.code, result.stage) == (status, code, stage), result
        assert where(result) == [(rcpt, status, f"mx1.{dns_origin}", A)]
    assert mx.server(B).accepted == 0 and landed(mx) == {}


def test_mx_address_limit(dns_server, dns_origin, mx_servers, resolver):
    mx = mx_servers([A, B, C], {A: "refuse", B: "refuse"})
    serve(dns_server, dns_origin, "@ MX 10 mx1", "@ MX 20 mx2", "@ MX 30 mx3",
          f"mx1 A {A}", f"mx2 A {B}", f"mx3 A {C}")
    rcpt = f"r@{dns_origin}"
    with Engine(resolver=resolver, mx_address_limit=2) as engine:
        limited = engine.submit(message(rcpt), port=mx.port)
    assert limited.result.status == "tempfail"
    assert f"mx1.{dns_origin}" in limited.result.reason
    assert f"mx2.{dns_origin}" in limited.result.reason
    assert "mx3" not in limited.result.reason and mx.server(C).accepted == 0
    with Engine(resolver=resolver, mx_address_limit=3) as engine:
        third = engine.submit(message(rcpt), port=mx.port)
    assert where(third.result) == [(rcpt, "delivered", f"mx3.{dns_origin}", C)]


# ---------------------------------------------------------------------------
# What DNS says
# ---------------------------------------------------------------------------


def test_null_mx_fails_permanently_without_a_connection(dns_server, dns_origin, mx_servers,
                                                        resolver):
    mx = mx_servers([A])
    # An address record too: taking the domain for its own host (implicit
    # MX) would connect to the server.
    serve(dns_server, dns_origin, "@ MX 0 .", f"@ A {A}")
    rcpt = f"r@{dns_origin}"
    (result,) = smtpstate.deliver([message(rcpt)], port=mx.port, resolver=resolver)
    assert result.status == "permfail" and result.stage == "not connected"
    assert result.reason == (f'5.1.10 {dns_origin} accepts no mail: its MX is "." '
                             "(null MX, RFC 7505)")
    assert result.bounce_class.name == "invalid recipient"
    assert where(result) == [(rcpt, "permfail", None, None)]
    assert result.recipients[0].bounce_class.name == "invalid recipient"
    assert mx.server(A).accepted == 0


def test_implicit_mx(dns_server, dns_origin, mx_servers, resolver):
    mx = mx_servers([A, B])
    serve(dns_server, dns_origin, f"aonly A {B}")
    rcpt = f"r@aonly.{dns_origin}"
    (result,) = smtpstate.deliver([message(rcpt)], port=mx.port, resolver=resolver)
    assert where(result) == [(rcpt, "delivered", f"aonly.{dns_origin}", B)]
    assert landed(mx) == {rcpt: B}


@IPV6
def test_implicit_mx_ipv6(dns_server, dns_origin, mx_servers, resolver):
    mx = mx_servers([A, "::1"])
    serve(dns_server, dns_origin, "six AAAA ::1")
    rcpt = f"r@six.{dns_origin}"
    (result,) = smtpstate.deliver([message(rcpt)], port=mx.port, resolver=resolver)
    assert where(result) == [(rcpt, "delivered", f"six.{dns_origin}", "::1")]
    assert landed(mx) == {rcpt: "::1"}


def test_a_domain_with_neither_mx_nor_address(dns_server, dns_origin, resolver):
    serve(dns_server, dns_origin, "text TXT hello")
    (result,) = smtpstate.deliver([message(f"r@text.{dns_origin}")], port=25, resolver=resolver)
    assert result.status == "permfail" and result.stage == "not connected"
    assert result.reason == (f"no MX host of text.{dns_origin} has an address: "
                             f"text.{dns_origin}: no address records")
    assert result.bounce_class.name == "DNS failure"


def test_nxdomain_fails_permanently(dns_server, dns_origin, resolver):
    serve(dns_server, dns_origin, f"mx1 A {A}")
    rcpt = f"r@nowhere.{dns_origin}"
    (result,) = smtpstate.deliver([message(rcpt)], port=25, resolver=resolver)
    assert result.status == "permfail" and result.stage == "not connected"
    assert result.reason == (f"5.1.2 cannot route nowhere.{dns_origin}: the domain does not "
                             "exist (NXDOMAIN)")
    assert result.bounce_class.name == "DNS failure"
    assert where(result) == [(rcpt, "permfail", None, None)]


def test_servfail_fails_for_now(dns_server, dns_origin, resolver):
    dns_server.broken_zone(dns_origin)
    rcpt = f"r@{dns_origin}"
    (result,) = smtpstate.deliver([message(rcpt)], port=25, resolver=resolver)
    assert result.status == "tempfail" and result.stage == "not connected"
    assert result.reason == (f"4.4.3 cannot resolve the MX records of {dns_origin}: "
                             "server failure (SERVFAIL)")
    assert result.bounce_class.name == "DNS failure"
    assert where(result) == [(rcpt, "tempfail", None, None)]


@pytest.mark.parametrize("mta_sts, lookups", [(None, 1), (True, 2)])
def test_a_silent_name_server_fails_for_now_in_time(silent_nameserver, mta_sts, lookups):
    """Each lookup gets timeout * attempts (1 s); with MTA-STS discovery
    (the default) the domain's _mta-sts TXT lookup comes first, and its
    message waits for it. (No DNSSEC: under the root's anchors the resolver
    would first ask for the root's keys, one more lookup each.)"""
    resolver = Resolver([silent_nameserver], hosts_file=False, timeout=0.5, attempts=2,
                        trust_anchors=())
    start = time.monotonic()
    with smtpstate.Engine(resolver=resolver, mta_sts=mta_sts) as engine:
        ticket = engine.submit(message("r@silent.test"), port=25)
    result = ticket.result
    elapsed = time.monotonic() - start
    assert 0.95 * lookups <= elapsed < lookups + 1.0, elapsed
    assert result.status == "tempfail" and result.stage == "not connected"
    assert result.reason == "4.4.3 cannot resolve the MX records of silent.test: timed out"
    assert result.bounce_class.name == "DNS failure"


def test_lookups_wait_their_turn_and_time_out_from_when_sent(silent_nameserver):
    """One lookup in flight at a time: the others wait, and each gets its
    whole timeout once sent (not counted while it waited)."""
    resolver = Resolver([silent_nameserver], hosts_file=False, timeout=0.3, attempts=1,
                        max_in_flight=1)
    start = time.monotonic()
    results = smtpstate.deliver([message(f"r@d{i}.silent.test") for i in range(3)],
                                port=25, resolver=resolver)
    elapsed = time.monotonic() - start
    assert 0.85 <= elapsed < 2.0, elapsed     # one after the other: 3 x 0.3 s
    assert [r.reason for r in results] == [
        f"4.4.3 cannot resolve the MX records of d{i}.silent.test: timed out" for i in range(3)]


def test_many_domains_through_a_narrow_window(dns_server, dns_origin, mx_servers):
    """Thirty domains, their MX hosts' addresses, two lookups in flight at
    a time: every one answered, every message delivered where it should."""
    mx = mx_servers([A, B])
    o = dns_origin
    serve(dns_server, o, *[f"d{i} MX 10 mx{i % 2}" for i in range(30)],
          f"mx0 A {A}", f"mx1 A {B}")
    resolver = Resolver([dns_server.address], hosts_file=False, max_in_flight=2)
    results = smtpstate.deliver([message(f"r@d{i}.{o}") for i in range(30)], port=mx.port,
                                resolver=resolver)
    assert [where(r) for r in results] == [
        [(f"r@d{i}.{o}", "delivered", f"mx{i % 2}.{o}", (A, B)[i % 2])] for i in range(30)]


def test_an_mx_host_that_does_not_exist_is_skipped(dns_server, dns_origin, mx_servers,
                                                   resolver):
    mx = mx_servers([A, B])
    serve(dns_server, dns_origin, "@ MX 10 nowhere", "@ MX 20 mx2", f"mx2 A {B}")
    rcpt = f"r@{dns_origin}"
    (result,) = smtpstate.deliver([message(rcpt)], port=mx.port, resolver=resolver)
    assert where(result) == [(rcpt, "delivered", f"mx2.{dns_origin}", B)]


def test_mx_hosts_that_do_not_exist_fail_permanently(dns_server, dns_origin, resolver):
    serve(dns_server, dns_origin, "@ MX 10 nowhere")
    (result,) = smtpstate.deliver([message(f"r@{dns_origin}")], port=25, resolver=resolver)
    assert result.status == "permfail" and result.stage == "not connected"
    assert result.reason == (f"no MX host of {dns_origin} has an address: nowhere.{dns_origin}: "
                             "no such domain (NXDOMAIN)")
    # A failure of DNS, as when the domain itself does not exist.
    assert result.bounce_class.name == "DNS failure"


def test_mx_hosts_whose_lookup_fails_fail_for_now(dns_server, dns_origin, resolver):
    broken = dns_server.unique_origin("broken")
    dns_server.broken_zone(broken)
    serve(dns_server, dns_origin, f"@ MX 10 mx.{broken}.")
    (result,) = smtpstate.deliver([message(f"r@{dns_origin}")], port=25, resolver=resolver)
    assert result.status == "tempfail" and result.stage == "not connected"
    assert result.reason == (f"no MX host of {dns_origin} has an address: mx.{broken}: "
                             "server failure (SERVFAIL)")
    assert result.bounce_class.name == "DNS failure"


# ---------------------------------------------------------------------------
# Sites: domains sharing MX hosts
# ---------------------------------------------------------------------------


def test_three_domains_at_two_sites_one_result(dns_server, dns_origin, mx_servers, resolver):
    mx = mx_servers([A, B])
    o = dns_origin
    serve(dns_server, o, "a MX 10 mx1", "b MX 10 mx1", "c MX 10 mx2", f"mx1 A {A}", f"mx2 A {B}")
    x, y, z = f"x@a.{o}", f"y@c.{o}", f"z@b.{o}"
    with Engine(resolver=resolver) as engine:
        ticket = engine.submit(message(x, y, z), port=mx.port)
        results = list(engine.run(timeout=30))
    assert results == [ticket.result] and results[0].ticket is ticket
    result = results[0]
    assert result.status == "delivered", result
    assert where(result) == [(x, "delivered", f"mx1.{o}", A), (y, "delivered", f"mx2.{o}", B),
                             (z, "delivered", f"mx1.{o}", A)]
    # The shared site: one connection, one transaction, both domains' RCPTs.
    (at_a,) = mx.server(A).messages
    assert at_a.rcpt_tos == [x, z] and at_a.data == BODY and mx.server(A).accepted == 1
    (at_b,) = mx.server(B).messages
    assert at_b.rcpt_tos == [y] and mx.server(B).accepted == 1


def test_mixed_outcomes_over_sites_are_partial(dns_server, dns_origin, mx_servers, resolver):
    mx = mx_servers([A, B], {B: "rcpt_550"})
    o = dns_origin
    serve(dns_server, o, "a MX 10 mx1", "b MX 10 mx1", "c MX 10 mx2", f"mx1 A {A}", f"mx2 A {B}")
    x, y, z, w = f"x@a.{o}", f"y@c.{o}", f"z@b.{o}", f"w@nowhere.{o}"
    (result,) = smtpstate.deliver([message(x, y, z, w)], port=mx.port, resolver=resolver)
    assert result.status == "partial", result
    assert where(result) == [(x, "delivered", f"mx1.{o}", A), (y, "permfail", f"mx2.{o}", B),
                             (z, "delivered", f"mx1.{o}", A), (w, "permfail", None, None)]
    ry, rw = result.recipients[1], result.recipients[3]
    assert ry.reply.code == 550 and ry.bounce_class.name == "invalid recipient"
    assert rw.reply is None and rw.bounce_class.name == "DNS failure"
    assert f"nowhere.{o}" in result.reason and "NXDOMAIN" in result.reason
    assert result.bounce_class.name == "invalid recipient"      # the first that failed
    (at_a,) = mx.server(A).messages
    assert at_a.rcpt_tos == [x, z]
    assert mx.server(B).messages == [] and mx.server(B).accepted == 1


def test_routed_tickets_have_no_host(dns_server, dns_origin, mx_servers, resolver):
    mx = mx_servers([A])
    serve(dns_server, dns_origin, "@ MX 10 mx1", f"mx1 A {A}")
    with Engine(resolver=resolver) as engine:
        ticket = engine.submit(message(f"e@{dns_origin}"), port=mx.port)
        assert ticket.host is None and ticket.port == mx.port
        assert repr(ticket) == f"<Ticket {ticket.id} MX:{mx.port} pending>"
    assert ticket.result.ok and ticket.result.ticket is ticket
    (result,) = smtpstate.deliver([message(f"d@{dns_origin}")], port=mx.port, resolver=resolver)
    assert result.ok and result.ticket.host is None and result.ticket.port == mx.port
    assert landed(mx) == {f"e@{dns_origin}": A, f"d@{dns_origin}": A}


# ---------------------------------------------------------------------------
# Traffic shaping
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["*", "mx:mx1.*"])
def test_a_shared_site_honours_one_connection_limit(dns_server, dns_origin, mx_servers,
                                                    resolver, key):
    o = dns_origin
    serve(dns_server, o, "a MX 10 mx1", "b MX 10 mx1", f"mx1 A {A}")
    rcpts = [f"r{i}@{'ab'[i % 2]}.{o}" for i in range(40)]

    def peak(connections: int) -> int:
        mx = mx_servers([A])
        limits = {key: Limits(connections=connections, messages_per_connection=1)}
        with Engine(resolver=resolver, limits=limits) as engine:
            tickets = [engine.submit(message(r), port=mx.port) for r in rcpts]
        assert all(t.result.ok for t in tickets)
        assert sorted(landed(mx)) == sorted(rcpts)
        return mx.server(A).peak

    assert 0 < peak(2) <= 2
    # The measure can see more: the same with room for ten.
    assert peak(10) > 2


def test_a_full_engine_shares_its_slots_evenly(dns_server, dns_origin, mx_servers, resolver):
    """max_connections all taken by one site when another's messages come:
    the first gives connections up (after the message each carries) until
    both hold as many; the newcomer does not wait for the first to drain,
    and the slots move once, not back and forth."""
    mx = mx_servers([A, B])
    o = dns_origin
    serve(dns_server, o, "a MX 10 mx1", "b MX 10 mx2", f"mx1 A {A}", f"mx2 A {B}")
    n = 400
    with Engine(resolver=resolver, max_connections=4, max_per_destination=4) as engine:
        for i in range(n):
            engine.submit(message(f"r{i}@a.{o}"), port=mx.port)
        results = engine.run()
        for _ in range(20):                  # a's connections are up: all four
            assert next(results).ok
        assert mx.server(A).peak == 4 and not mx.server(B).messages
        for i in range(n):
            engine.submit(message(f"r{i}@b.{o}"), port=mx.port)
        assert all(r.ok for r in results)
    at_a = sorted(m.extra["received_at"] for m in mx.server(A).messages)
    at_b = sorted(m.extra["received_at"] for m in mx.server(B).messages)
    assert len(at_a) == len(at_b) == n
    # b's first message went while most of a's were still to go.
    assert sum(1 for t in at_a if t > at_b[0]) > n / 2
    # a gave up two connections to b, and the one done first gives its
    # slots to the other: eight, a few more when a slot changes hands
    # twice as both ask at once. Churn would be hundreds (one per message).
    opened = mx.server(A).accepted + mx.server(B).accepted
    assert opened <= 16, opened


def test_a_domain_rule_beats_an_mx_rule_which_beats_star(dns_server, dns_origin, mx_servers,
                                                         resolver):
    """Which rule a destination follows shows in its connections: one at a
    time, each carrying that rule's messages_per_connection."""
    mx = mx_servers([A, B, C])
    o = dns_origin
    serve(dns_server, o, "dom MX 10 mx1", "viamx MX 10 mx2", "star MX 10 other",
          f"mx1 A {A}", f"mx2 A {B}", f"other A {C}")
    limits = {  # in the least specific order: the order does not decide
        "*": Limits(connections=1, messages_per_connection=1),
        f"mx:mx*.{o}": Limits(connections=1, messages_per_connection=2),
        f"DOM.{o.upper()}": Limits(connections=1, messages_per_connection=5),
    }
    with Engine(resolver=resolver, limits=limits) as engine:
        tickets = [engine.submit(message(f"r{i}@{d}.{o}"), port=mx.port)
                   for d in ("dom", "viamx", "star") for i in range(10)]
    assert all(t.result.ok for t in tickets)
    assert [len(mx.server(a).messages) for a in (A, B, C)] == [10, 10, 10]
    assert mx.server(A).accepted == 2        # dom: its own rule (mx1 matches mx: too)
    assert mx.server(B).accepted == 5        # viamx: the mx: rule
    assert mx.server(C).accepted == 10       # star: "*"
    assert [mx.server(a).peak for a in (A, B, C)] == [1, 1, 1]


def test_message_rate(dns_server, dns_origin, mx_servers, resolver):
    mx = mx_servers([A])
    serve(dns_server, dns_origin, "@ MX 10 mx1", f"mx1 A {A}")
    rate, n = 10.0, 26
    # One connection: the server sees each message when the engine sends
    # it, plus the same small delay. (With several, each connection's
    # first message would also carry its connect and EHLO, which under
    # load can make two messages sent 100 ms apart arrive together.)
    limits = {"*": Limits(message_rate=rate, connections=1)}
    with Engine(resolver=resolver, limits=limits) as engine:
        tickets = [engine.submit(message(f"r{i}@{dns_origin}"), port=mx.port) for i in range(n)]
    assert all(t.result.ok for t in tickets)
    arrivals = sorted(m.extra["received_at"] for m in mx.server(A).messages)
    assert len(arrivals) == n
    expected = (n - 1) / rate                                   # 2.5 s
    assert abs((arrivals[-1] - arrivals[0]) - expected) <= 0.1 * expected, arrivals
    # Evenly spaced, never a burst (after the first, which carried the
    # connection's set-up).
    gaps = [b - a for a, b in zip(arrivals[1:], arrivals[2:])]
    assert min(gaps) >= 0.2 / rate, gaps


def test_connection_rate(dns_server, dns_origin, mx_servers, resolver):
    mx = mx_servers([A])
    serve(dns_server, dns_origin, "@ MX 10 mx1", f"mx1 A {A}")
    rate, n = 10.0, 11
    limits = {"*": Limits(connection_rate=rate, messages_per_connection=1)}
    with Engine(resolver=resolver, limits=limits) as engine:
        tickets = [engine.submit(message(f"r{i}@{dns_origin}"), port=mx.port) for i in range(n)]
    assert all(t.result.ok for t in tickets)
    opened = mx.server(A).opened_at
    assert len(opened) == n
    expected = (n - 1) / rate                                   # 1 s
    assert abs((opened[-1] - opened[0]) - expected) <= 0.1 * expected, opened
    gaps = [b - a for a, b in zip(opened, opened[1:])]
    assert min(gaps) >= 0.2 / rate, gaps


# ---------------------------------------------------------------------------
# Source addresses
# ---------------------------------------------------------------------------


SOURCES = [Source("127.0.0.5", helo="a.client.test"), Source("127.0.0.6", helo="b.client.test")]


def test_sources_in_turn_with_their_ehlo_names(dns_server, dns_origin, mx_servers, resolver):
    mx = mx_servers([A])
    serve(dns_server, dns_origin, "@ MX 10 mx1", f"mx1 A {A}")
    with Engine(resolver=resolver, sources=SOURCES, messages_per_connection=1) as engine:
        tickets = [engine.submit(message(f"r{i}@{dns_origin}"), port=mx.port) for i in range(6)]
    assert all(t.result.ok for t in tickets)
    seen = collections.Counter((m.peer[0], m.helo) for m in mx.server(A).messages)
    assert seen == {("127.0.0.5", "a.client.test"): 3, ("127.0.0.6", "b.client.test"): 3}
    assert sorted(p[0] for p in mx.server(A).peers) == ["127.0.0.5"] * 3 + ["127.0.0.6"] * 3


def test_a_pinned_source(dns_server, dns_origin, mx_servers, resolver):
    mx = mx_servers([A])
    serve(dns_server, dns_origin, "@ MX 10 mx1", f"mx1 A {A}")
    with Engine(resolver=resolver, sources=SOURCES, messages_per_connection=1) as engine:
        pinned = [engine.submit(message(f"b{i}@{dns_origin}"), port=mx.port, source=SOURCES[1])
                  for i in range(3)]
        # By its address; a helo option names the session over the source's.
        named = engine.submit(message(f"a@{dns_origin}"), port=mx.port, source="127.0.0.5",
                              helo="explicit.client.test")
    assert all(t.result.ok for t in pinned + [named])
    by_rcpt = {m.rcpt_tos[0]: (m.peer[0], m.helo) for m in mx.server(A).messages}
    assert by_rcpt == {**{f"b{i}@{dns_origin}": ("127.0.0.6", "b.client.test") for i in range(3)},
                       f"a@{dns_origin}": ("127.0.0.5", "explicit.client.test")}


def test_a_source_that_cannot_be_bound_is_refused():
    with pytest.raises(InvalidOptionError, match="192.0.2.1 cannot be bound on this host"):
        Source("192.0.2.1")
    with pytest.raises(InvalidOptionError, match="must be an IPv4 or IPv6 address"):
        Source("client.test")
    with pytest.raises(InvalidOptionError, match="sources must be Source"):
        Engine(sources=["127.0.0.5"])
    with Engine(sources=SOURCES) as engine:
        with pytest.raises(InvalidOptionError, match="not one of the engine's sources"):
            engine.submit(message("r@example.test"), port=25, source="127.0.0.7")


@IPV6
def test_no_source_of_the_hosts_family(dns_server, dns_origin, mx_servers, resolver):
    mx = mx_servers(["::1"])
    serve(dns_server, dns_origin, "@ MX 10 mx1", "mx1 AAAA ::1")
    with Engine(resolver=resolver, sources=SOURCES) as engine:
        t = engine.submit(message(f"r@{dns_origin}"), port=mx.port)
    assert t.result.status == "tempfail"
    assert t.result.reason == (f"connect to mx1.{dns_origin}[::1]:{mx.port}: no source "
                               "address of its family")
    assert mx.server("::1").accepted == 0


# ---------------------------------------------------------------------------
# Address literals and families
# ---------------------------------------------------------------------------


def test_an_address_literal_needs_no_lookup(dns_server, mx_servers, resolver):
    mx = mx_servers([A, B])
    before = dns_server.queries()
    (result,) = smtpstate.deliver([message(f"r@[{B}]")], port=mx.port, resolver=resolver)
    assert dns_server.queries() == before
    assert where(result) == [(f"r@[{B}]", "delivered", f"[{B}]", B)]
    assert landed(mx) == {f"r@[{B}]": B}


@IPV6
def test_an_ipv6_address_literal(dns_server, mx_servers, resolver):
    mx = mx_servers([A, "::1"])
    before = dns_server.queries()
    (result,) = smtpstate.deliver([message("r@[IPv6:::1]")], port=mx.port, resolver=resolver)
    assert dns_server.queries() == before
    assert where(result) == [("r@[IPv6:::1]", "delivered", "[ipv6:::1]", "::1")]
    assert landed(mx) == {"r@[IPv6:::1]": "::1"}


@IPV6
@pytest.mark.parametrize("settings, ip", [
    ({"inet_protocols": "ipv6"}, "::1"),
    ({"inet_protocols": "ipv4"}, A),
])
def test_address_families(dns_server, dns_origin, mx_servers, resolver, settings, ip):
    mx = mx_servers([A, "::1"])
    serve(dns_server, dns_origin, "@ MX 10 mx1", f"mx1 A {A}", "mx1 AAAA ::1")
    rcpts = [f"r{i}@{dns_origin}" for i in range(3)]
    with Engine(resolver=resolver, **settings) as engine:
        tickets = [engine.submit(message(r), port=mx.port) for r in rcpts]
    for rcpt, t in zip(rcpts, tickets):
        assert where(t.result) == [(rcpt, "delivered", f"mx1.{dns_origin}", ip)]
    assert landed(mx) == {r: ip for r in rcpts}


# ---------------------------------------------------------------------------
# DNS under load
# ---------------------------------------------------------------------------


def test_ten_thousand_messages_cost_a_handful_of_queries(dns_server, dns_origin, mx_servers,
                                                         resolver):
    """10,000 messages to one domain, in two batches on one engine: the MX
    and address lookups are made once (about 7 s, aiosmtpd taking them)."""
    mx = mx_servers([A])
    serve(dns_server, dns_origin, "@ MX 10 mx1", f"mx1 A {A}")
    half = 5000
    before = dns_server.queries()
    with Engine(resolver=resolver, max_per_destination=10) as engine:
        first = [engine.submit(message(f"r{i}@{dns_origin}"), port=mx.port) for i in range(half)]
        for _ in engine.run(timeout=120):
            pass
        after_first = dns_server.queries()
        second = [engine.submit(message(f"s{i}@{dns_origin}"), port=mx.port) for i in range(half)]
        for _ in engine.run(timeout=120):
            pass
    after_second = dns_server.queries()
    statuses = collections.Counter(t.result.status for t in first + second)
    assert statuses == {"delivered": 2 * half}
    assert len(mx.server(A).messages) == 2 * half
    # MX, A, AAAA, the MTA-STS TXT record, and the root's keys asked by
    # the engine's resolver and by the MTA-STS lookups' (NSD refuses the
    # root, and libunbound asks again) -- not one per message.
    assert 1 <= after_first - before <= 20, after_first - before
    assert after_second == after_first                  # all of it from what is known


# ---------------------------------------------------------------------------
# The resolver's settings
# ---------------------------------------------------------------------------


def test_name_servers_are_normalised():
    r = Resolver(["127.0.0.1", "127.0.0.1:5353", "::1", "[::1]:53"], timeout=1.5, attempts=3)
    assert r.nameservers == ("127.0.0.1", "127.0.0.1@5353", "::1", "::1@53")
    assert (r.timeout, r.attempts, r.hosts_file) == (1.5, 3, True)
    assert Resolver("127.0.0.1:53").nameservers == ("127.0.0.1@53",)
    assert Resolver().nameservers is None                       # resolv.conf's


@pytest.mark.parametrize("kwargs, match", [
    ({"nameservers": ["not-an-ip"]}, "must be an IP address"),
    ({"nameservers": ["ns.example.test"]}, "must be an IP address"),
    ({"nameservers": []}, "nameservers is empty"),
    ({"nameservers": [53]}, "a name server must be a str"),
    ({"nameservers": ["127.0.0.1:0"]}, "the port must be 1-65535"),
    ({"nameservers": ["127.0.0.1:65536"]}, "the port must be 1-65535"),
    ({"nameservers": ["127.0.0.1:dns"]}, "the port must be 1-65535"),
    ({"nameservers": ["[::1"]}, "no closing"),
    ({"nameservers": ["[::1]53"]}, "expected ':port'"),
    ({"timeout": 0}, "timeout must be a positive number"),
    ({"timeout": -1}, "timeout must be a positive number"),
    ({"timeout": float("nan")}, "timeout must be a positive number"),
    ({"timeout": True}, "timeout must be a positive number"),
    ({"timeout": "5"}, "timeout must be a positive number"),
    ({"attempts": 0}, "attempts must be an int from 1 to 100"),
    ({"attempts": 101}, "attempts must be an int from 1 to 100"),
    ({"attempts": 2.0}, "attempts must be an int from 1 to 100"),
    ({"trust_anchors": ["not an anchor"]}, "neither a DS or DNSKEY record nor a file"),
    ({"local_records": ["a.test. A 127.0.0.2\nb.test. A 127.0.0.3"]}, "one zone-file line"),
    ({"local_records": [""]}, "one zone-file line"),
    ({"max_in_flight": 0}, "max_in_flight must be an int from 1 to 100000"),
    ({"max_in_flight": 1.5}, "max_in_flight must be an int from 1 to 100000"),
])
def test_bad_resolver_settings_are_refused(kwargs, match):
    with pytest.raises(InvalidOptionError, match=match):
        Resolver(**kwargs)


def test_settings_libunbound_refuses_are_refused_by_the_engine():
    with pytest.raises(InvalidOptionError, match="resolver must be a smtpstate.Resolver"):
        Engine(resolver="127.0.0.1")
    with pytest.raises(InvalidOptionError, match="resolver must be a smtpstate.Resolver"):
        smtpstate.deliver([message("r@example.test")], port=25, resolver=["127.0.0.1"])
    # Parsed by libunbound itself: refused when the engine is made, not
    # when the first message is looked up.
    with pytest.raises(InvalidOptionError, match='local record "this is not a record"'):
        Engine(resolver=Resolver(["127.0.0.1"], local_records=["this is not a record"]))
    # And what works is taken.
    Engine(resolver=Resolver(["127.0.0.1"], local_records=["a.test. A 127.0.0.2"])).close()


def test_bad_limits_are_refused():
    for kwargs, match in [({"connections": 0}, "connections must be an int >= 1"),
                          ({"messages_per_connection": 1.5}, "messages_per_connection"),
                          ({"message_rate": 0}, "message_rate must be a positive number"),
                          ({"connection_rate": float("inf")}, "connection_rate")]:
        with pytest.raises(InvalidOptionError, match=match):
            Limits(**kwargs)
    for limits, match in [({"": Limits()}, "a limits key must be"),
                          ({"a b.test": Limits()}, "limits key 'a b.test'"),
                          ({"x.test": 3}, r"limits\['x.test'\] must be Limits"),
                          ([("x.test", Limits())], "limits must be a mapping")]:
        with pytest.raises(InvalidOptionError, match=match):
            Engine(limits=limits)
