"""The Engine discovering MTA-STS policies by itself (Engine(mta_sts=...)),
against real components: a private NSD serving the ``_mta-sts`` TXT
record, the ``mta-sts`` host's address and the MX records; a real HTTPS
server serving the policy (tests/test_mta_sts.py's PolicyServer, with a
certificate from the tests' CA); aiosmtpd with STARTTLS on two loopback
addresses.
"""

from __future__ import annotations

import logging

import pytest

from helpers import server_tls
from smtpstate import Engine, Message, Resolver
from smtpstate.errors import InvalidOptionError
from smtpstate.mta_sts import PolicyCache
from smtpstate.sts_discovery import MtaSts
from test_mta_sts import PolicyServer, answer

A, B = "127.0.0.2", "127.0.0.3"


def message(rcpt: str) -> Message:
    return Message("sender@client.test", [rcpt], b"Subject: sts\r\n\r\nhello\r\n")


@pytest.fixture
def world(dns_server, dns_origin, mx_servers, tls_ca):
    """A domain with MX 10 mx1 (A), MX 20 mx2 (B), both offering STARTTLS
    with certificates from the tests' CA, a policy server for
    mta-sts.<domain> on 127.0.0.1 (not started on a zone until a test says
    so), and the zone's records; ``world.serve(txt=True)`` publishes it."""
    o = dns_origin
    mx = mx_servers([A, B], tls={A: server_tls(tls_ca, f"mx1.{o}")[0],
                                 B: server_tls(tls_ca, f"mx2.{o}")[0]})
    server = PolicyServer(server_tls(tls_ca, f"mta-sts.{o}")[0])

    class World:
        origin, port, policy = o, mx.port, server

        def serve(self, txt_id="20261207", *, extra=()):
            records = ["@ MX 10 mx1", "@ MX 20 mx2", f"mx1 A {A}", f"mx2 A {B}",
                       "mta-sts A 127.0.0.1", *extra]
            if txt_id:
                records.append(f'_mta-sts TXT "v=STSv1; id={txt_id};"')
            dns_server.add_zone(o, records)

    world = World()
    world.mx = mx
    yield world
    server.stop()


def policy_text(origin: str, mx: str = "mx2") -> bytes:
    return (f"version: STSv1\r\nmode: enforce\r\nmx: {mx}.{origin}\r\n"
            "max_age: 86400\r\n").encode()


def send(world, dns_server, tls_ca_file, cache=None, n=1):
    settings = MtaSts(cache=cache, port=world.policy.port, ca_file=tls_ca_file, timeout=5)
    with Engine(resolver=Resolver([dns_server.address], hosts_file=False),
                mta_sts=settings) as engine:
        tickets = [engine.submit(message(f"r{i}@{world.origin}"), port=world.port,
                                 ca_file=tls_ca_file, timeout=10) for i in range(n)]
        results = list(engine.run(timeout=30))
    assert sorted(r.ticket.id for r in results) == sorted(t.id for t in tickets)
    return [t.result for t in tickets]


def test_a_published_policy_is_fetched_and_enforced(world, dns_server, tls_ca_file):
    o = world.origin
    world.policy.behaviour = answer(body=policy_text(o), content_type="text/plain")
    world.serve()
    results = send(world, dns_server, tls_ca_file, n=3)
    # mx1 is preferred, but the policy names mx2 only.
    assert [r.recipients[0].mx for r in results] == [f"mx2.{o}"] * 3, results
    assert world.mx.server(A).accepted == 0
    assert all(m.extra["tls"] for m in world.mx.server(B).messages)
    # One fetch for the three, with SNI and Host for mta-sts.<domain>.
    assert [p for p, _ in world.policy.requests] == ["/.well-known/mta-sts.txt"]
    assert world.policy.sni == [f"mta-sts.{o}"]


def test_without_a_txt_record_nothing_is_fetched(world, dns_server, tls_ca_file):
    world.serve(txt_id=None)
    (result,) = send(world, dns_server, tls_ca_file)
    assert result.recipients[0].mx == f"mx1.{world.origin}", result
    assert world.policy.requests == []


def test_a_policy_server_that_fails_holds_nothing_back(world, dns_server, tls_ca_file,
                                                       caplog):
    world.policy.behaviour = answer(status=404, body=b"no")
    world.serve()
    with caplog.at_level(logging.WARNING, logger="smtpstate.mta_sts"):
        (result,) = send(world, dns_server, tls_ca_file)
    assert result.status == "delivered" and result.recipients[0].mx == f"mx1.{world.origin}"
    assert "sts-policy-fetch-error" in caplog.text and "no policy" in caplog.text


def test_a_failed_fetch_is_a_tls_report_event(world, dns_server, tls_ca_file):
    """RFC 8460 4.3.2.2: a policy announced and not fetched is reported
    (sts-policy-fetch-error), with the session that went on without it."""
    import time
    world.policy.behaviour = answer(status=404, body=b"no")
    world.serve()
    seen = []
    settings = MtaSts(port=world.policy.port, ca_file=tls_ca_file, timeout=5)
    start = time.time()
    with Engine(resolver=Resolver([dns_server.address], hosts_file=False), mta_sts=settings,
                on_tls_event=seen.append) as engine:
        ticket = engine.submit(message(f"r@{world.origin}"), port=world.port,
                               ca_file=tls_ca_file, timeout=10)
        list(engine.run(timeout=30))
        report = engine.tls_report(world.origin, start, time.time() + 60)
    assert ticket.result.status == "delivered"
    kinds = [ev.result_type for ev in seen]
    assert kinds == ["sts-policy-fetch-error", "success"], seen
    assert seen[0].policy_type == "sts" and "404" in seen[0].detail
    # No policy was had: the session itself counts under no policy.
    types = {p["policy"]["policy-type"]: p["summary"] for p in report["policies"]}
    assert types == {"sts": {"total-successful-session-count": 0,
                             "total-failure-session-count": 1},
                     "no-policy-found": {"total-successful-session-count": 1,
                                         "total-failure-session-count": 0}}


def test_a_cached_policy_outlives_its_server(world, dns_server, tls_ca_file, tmp_path):
    """The cache file keeps the policy across engines: with the same TXT id
    and the policy server gone, the second engine still enforces it."""
    o = world.origin
    world.policy.behaviour = answer(body=policy_text(o))
    world.serve()
    path = str(tmp_path / "sts.json")
    (first,) = send(world, dns_server, tls_ca_file, cache=PolicyCache(path))
    assert first.recipients[0].mx == f"mx2.{o}"
    world.policy.behaviour = answer(status=500, body=b"down")
    (second,) = send(world, dns_server, tls_ca_file, cache=PolicyCache(path))
    assert second.recipients[0].mx == f"mx2.{o}", second
    assert len(world.policy.requests) == 1           # not asked again


def test_a_new_id_fetches_the_new_policy(world, dns_server, tls_ca_file, tmp_path):
    o = world.origin
    path = str(tmp_path / "sts.json")
    world.policy.behaviour = answer(body=policy_text(o, "mx2"))
    world.serve("1")
    (first,) = send(world, dns_server, tls_ca_file, cache=PolicyCache(path))
    world.policy.behaviour = answer(body=policy_text(o, "mx1"))
    dns_server.set_records(o, ["@ MX 10 mx1", "@ MX 20 mx2", f"mx1 A {A}", f"mx2 A {B}",
                               "mta-sts A 127.0.0.1", '_mta-sts TXT "v=STSv1; id=2;"'])
    (second,) = send(world, dns_server, tls_ca_file, cache=PolicyCache(path))
    assert first.recipients[0].mx == f"mx2.{o}"
    assert second.recipients[0].mx == f"mx1.{o}", second
    assert len(world.policy.requests) == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(port=0), "port must be 1-65535"),
    (dict(timeout=0), "timeout must be a positive number"),
    (dict(workers=0), "workers must be an int"),
    (dict(cache={}), "cache must be a PolicyCache"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(InvalidOptionError, match=match):
        MtaSts(**kwargs)


def test_the_engine_wants_mtasts_settings():
    with pytest.raises(InvalidOptionError, match="mta_sts must be"):
        Engine(mta_sts="yes")


def test_discovery_is_on_by_default(world, dns_server, tls_ca_file):
    """Engine() without mta_sts looks for the policy a domain announces: at
    mta-sts.<domain>:443 (nothing listens there in the tests, so the fetch
    fails and is reported; the message goes without a policy)."""
    o = world.origin
    world.serve()
    seen = []
    with Engine(resolver=Resolver([dns_server.address], hosts_file=False),
                on_tls_event=seen.append) as engine:
        ticket = engine.submit(message(f"r@{o}"), port=world.port, ca_file=tls_ca_file,
                               timeout=10)
    assert ticket.result.status == "delivered", ticket.result
    assert [ev.result_type for ev in seen][:1] == ["sts-policy-fetch-error"], seen
    assert "443" in seen[0].detail, seen[0].detail


@pytest.mark.parametrize("off", [None, False])
def test_discovery_can_be_turned_off(world, dns_server, tls_ca_file, off):
    o = world.origin
    world.policy.behaviour = answer(body=policy_text(o), content_type="text/plain")
    world.serve()
    with Engine(resolver=Resolver([dns_server.address], hosts_file=False),
                mta_sts=off) as engine:
        ticket = engine.submit(message(f"r@{o}"), port=world.port, ca_file=tls_ca_file,
                               timeout=10)
    assert ticket.result.recipients[0].mx == f"mx1.{o}", ticket.result
    assert world.policy.requests == []


def test_an_explicit_level_does_not_wait_for_policies(world, dns_server, tls_ca_file):
    o = world.origin
    world.policy.behaviour = answer(body=policy_text(o), content_type="text/plain")
    world.serve()
    with Engine(resolver=Resolver([dns_server.address], hosts_file=False)) as engine:
        ticket = engine.submit(message(f"r@{o}"), port=world.port, ca_file=tls_ca_file,
                               tls="opportunistic", timeout=10)
    assert ticket.result.status == "delivered" and world.policy.requests == []


def test_txt_records_as_the_engine_finds_them(dns_server, dns_origin):
    """smtps_lookup_txt() through the discovery: each record's strings
    joined, a record a line; one holding a newline left out; a name
    without TXT records, none."""
    from smtpstate.sts_discovery import Discovery

    o = dns_origin
    dns_server.add_zone(o, ['_mta-sts TXT "v=STSv1; id=7;"',
                            '_mta-sts TXT "part one, " "part two"',
                            '_mta-sts TXT "bad\\010line"'])
    discovery = Discovery(MtaSts(), Resolver([dns_server.address], hosts_file=False))
    try:
        assert sorted(discovery._txt(f"_mta-sts.{o}")) == ["part one, part two",
                                                           "v=STSv1; id=7;"]
        assert discovery._txt(f"nothing.{o}") == []
        with pytest.raises(OSError, match="has no address"):
            discovery._address(f"nothing.{o}")
    finally:
        discovery.close()
