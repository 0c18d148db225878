"""TLS reports (RFC 8460): the events the Engine records for each TLS
attempt, and the aggregate report made of them.

The mixed run delivers by MX to seven domains of one DNSSEC-signed zone on
the private NSD (tests/dns_server.py), each with its own MX host: aiosmtpd
on 127.0.0.2-7 with STARTTLS or without (tests/mx_servers.py), DANE
records that match and that do not, MTA-STS policies in enforce mode whose
host the certificate names and does not, an MX no policy names, and
opportunistic TLS against a certificate nobody trusts. The report of each
domain is checked as the JSON the RFC describes.
"""

from __future__ import annotations

import datetime
import json
import time

import pytest

from dns_server import tlsa_rdata
from helpers import import_or_missing, server_tls
from smtpstate import Engine, Message, Resolver
from smtpstate.errors import InvalidOptionError
from smtpstate.mta_sts import Policy
from smtpstate.tlsrpt import TlsEvent, TlsReports

ADDRESSES = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6", "127.0.0.7"]


def message(*rcpts: str) -> Message:
    return Message("sender@client.test", list(rcpts), b"Subject: tlsrpt\r\n\r\nhello\r\n")


def policy(mode: str, *mx: str) -> Policy:
    return Policy(mode=mode, mx=mx, max_age=86400, id="20261207", fetched_at=time.time())


def event(domain="example.net", result="success", when=None, **kw) -> TlsEvent:
    fields = dict(time=time.time() if when is None else when, domain=domain,
                  policy_type="no-policy-found", policy_string=(), mx_patterns=(),
                  result_type=result, mx_host="mx.example.net", receiving_ip="192.0.2.1",
                  sending_ip="198.51.100.1")
    fields.update(kw)
    return TlsEvent(**fields)


# -- the report, from events ----------------------------------------------------

def test_report_counts_sessions_by_policy_with_failure_details():
    reports = TlsReports()
    day = datetime.datetime(2026, 12, 6, tzinfo=datetime.timezone.utc)
    t = day.timestamp() + 3600
    sts = dict(policy_type="sts", policy_string=("version: STSv1", "mode: enforce",
                                                 "mx: *.example.net", "max_age: 86400"),
               mx_patterns=("*.example.net",))
    for _ in range(3):
        reports.add(event(when=t, **sts))
    reports.add(event(when=t, result="certificate-expired", detail="certificate has expired",
                      **sts))
    reports.add(event(when=t, result="certificate-expired", detail="certificate has expired",
                      **sts))
    reports.add(event(when=t, result="starttls-not-supported", mx_host="mx2.example.net",
                      receiving_ip="192.0.2.2", **sts))
    reports.add(event(domain="other.test", when=t))
    got = reports.report("example.net", day, day + datetime.timedelta(days=1),
                         organization_name="Sender Inc", contact_info="tls@sender.test")
    json.dumps(got)                                  # the RFC's JSON, as is
    assert got["organization-name"] == "Sender Inc"
    assert got["contact-info"] == "tls@sender.test"
    assert got["date-range"] == {"start-datetime": "2026-12-06T00:00:00Z",
                                 "end-datetime": "2026-12-07T00:00:00Z"}
    assert got["report-id"]
    (entry,) = got["policies"]
    assert entry["policy"] == {"policy-type": "sts", "policy-string": list(sts["policy_string"]),
                               "policy-domain": "example.net", "mx-host": ["*.example.net"]}
    assert entry["summary"] == {"total-successful-session-count": 3,
                                "total-failure-session-count": 3}
    details = sorted(entry["failure-details"], key=lambda d: d["result-type"])
    assert details == [
        {"result-type": "certificate-expired", "sending-mta-ip": "198.51.100.1",
         "receiving-mx-hostname": "mx.example.net", "receiving-ip": "192.0.2.1",
         "failed-session-count": 2, "failure-reason-code": "certificate has expired"},
        {"result-type": "starttls-not-supported", "sending-mta-ip": "198.51.100.1",
         "receiving-mx-hostname": "mx2.example.net", "receiving-ip": "192.0.2.2",
         "failed-session-count": 1},
    ]


def test_report_covers_only_its_range_and_domain():
    reports = TlsReports()
    day = datetime.datetime(2026, 12, 6, tzinfo=datetime.timezone.utc).timestamp()
    reports.add(event(when=day - 1))                 # the day before
    reports.add(event(when=day))                     # the first second
    reports.add(event(when=day + 86399))             # the last
    reports.add(event(when=day + 86400))             # the next day
    got = reports.report("EXAMPLE.net.", day, day + 86400, organization_name="o",
                         contact_info="c")
    (entry,) = got["policies"]
    assert entry["policy"] == {"policy-type": "no-policy-found", "policy-domain": "example.net"}
    assert entry["summary"]["total-successful-session-count"] == 2
    assert "failure-details" not in entry
    assert reports.report("nobody.test", day, day + 86400, organization_name="o",
                          contact_info="c")["policies"] == []
    assert reports.domains(day, day + 86400) == ["example.net"]


def test_events_older_than_retention_are_forgotten():
    reports = TlsReports(retention=3600)
    now = time.time()
    reports.add(event(when=now - 7200))
    reports.add(event(when=now))
    got = reports.report("example.net", now - 86400, now + 60, organization_name="o",
                         contact_info="c")
    assert got["policies"][0]["summary"]["total-successful-session-count"] == 1


def test_tlsa_policies_are_per_mx_host():
    reports = TlsReports()
    now = time.time()
    reports.add(event(policy_type="tlsa", policy_string=("3 1 1 ab",), mx_host="mx1.example.net",
                      when=now))
    reports.add(event(policy_type="tlsa", policy_string=("3 1 1 cd",), mx_host="mx2.example.net",
                      when=now, result="tlsa-invalid"))
    got = reports.report("example.net", now - 60, now + 60, organization_name="o",
                         contact_info="c")
    hosts = sorted((p["policy"]["mx-host"], p["policy"]["policy-string"]) for p in got["policies"])
    assert hosts == [(["mx1.example.net"], ["3 1 1 ab"]), (["mx2.example.net"], ["3 1 1 cd"])]


@pytest.mark.parametrize("bad", [
    dict(start=10, end=10), dict(start=20, end=10),
    dict(start=datetime.datetime(2026, 12, 6), end=10**10),
    dict(start="yesterday", end=10),
])
def test_a_bad_range_is_refused(bad):
    with pytest.raises(InvalidOptionError):
        TlsReports().report("example.net", bad["start"], bad["end"], organization_name="o",
                            contact_info="c")


def test_unknown_result_types_are_refused():
    with pytest.raises(InvalidOptionError, match="RFC 8460"):
        TlsReports().add(event(result="it-broke"))
    with pytest.raises(InvalidOptionError, match="retention"):
        TlsReports(retention=0)


# -- events from a real run -------------------------------------------------------

@pytest.fixture(scope="module")
def stranger():
    """A CA nobody here trusts."""
    return import_or_missing("trustme").CA()


def test_the_report_of_a_mixed_run(dns_server, dns_origin, mx_servers, tls_ca, tls_ca_file,
                                   stranger):
    o = dns_origin
    a, b, c, d, e, f = ADDRESSES
    other = stranger.issue_cert("someone.else.test").cert_chain_pems[0].bytes()
    ctx_a, pem_a = server_tls(tls_ca, f"mxa.{o}")
    mx = mx_servers(ADDRESSES, tls={
        a: ctx_a,                                           # DANE matches
        b: server_tls(tls_ca, f"mxb.{o}")[0],               # DANE does not match
        c: server_tls(tls_ca, f"mxc.{o}")[0],               # MTA-STS, verified
        d: server_tls(tls_ca, f"elsewhere.{o}")[0],         # MTA-STS, wrong name
        # e: no STARTTLS at all
        f: server_tls(stranger, f"mxf.{o}")[0],             # opportunistic, untrusted
    })
    p = mx.port
    ds = dns_server.add_signed_zone(o, [
        f"dane MX 10 mxa.{o}.", f"mxa A {a}", f"_{p}._tcp.mxa TLSA {tlsa_rdata(pem_a)}",
        f"danebad MX 10 mxb.{o}.", f"mxb A {b}", f"_{p}._tcp.mxb TLSA {tlsa_rdata(other)}",
        f"sts MX 10 mxc.{o}.", f"mxc A {c}",
        f"stsbad MX 10 mxd.{o}.", f"mxd A {d}",
        f"plain MX 10 mxe.{o}.", f"mxe A {e}",
        f"opp MX 10 mxf.{o}.", f"mxf A {f}",
        f"nomatch MX 10 mxf.{o}.",
    ])
    seen = []
    resolver = Resolver([dns_server.address], hosts_file=False, timeout=2, trust_anchors=[ds])
    start = time.time()
    with Engine(resolver=resolver, on_tls_event=seen.append) as engine:
        engine.set_mta_sts_policy(f"sts.{o}", policy("enforce", f"mxc.{o}"))
        engine.set_mta_sts_policy(f"stsbad.{o}", policy("enforce", f"mxd.{o}"))
        engine.set_mta_sts_policy(f"nomatch.{o}", policy("enforce", f"elsewhere.{o}"))
        tickets = {name: engine.submit(message(f"r@{name}.{o}"), port=p, timeout=10,
                                       ca_file=tls_ca_file)
                   for name in ("dane", "danebad", "sts", "stsbad", "plain", "opp", "nomatch")}
        list(engine.run())
        end = time.time() + 60

        def report(name):
            got = engine.tls_report(f"{name}.{o}", start, end, organization_name="client.test",
                                    contact_info="mailto:tls@client.test")
            json.dumps(got)
            return got["policies"]

        status = {name: t.result.status for name, t in tickets.items()}
        assert status == {"dane": "delivered", "danebad": "tempfail", "sts": "delivered",
                          "stsbad": "tempfail", "plain": "delivered", "opp": "delivered",
                          "nomatch": "tempfail"}, {n: t.result for n, t in tickets.items()}

        (dane,) = report("dane")
        assert dane["policy"]["policy-type"] == "tlsa"
        assert dane["policy"]["mx-host"] == [f"mxa.{o}"]
        assert dane["policy"]["policy-string"] == [tlsa_rdata(pem_a).lower()]
        assert dane["summary"] == {"total-successful-session-count": 1,
                                   "total-failure-session-count": 0}

        (danebad,) = report("danebad")
        assert danebad["policy"]["policy-type"] == "tlsa"
        assert danebad["summary"]["total-successful-session-count"] == 0
        (fail,) = danebad["failure-details"]
        assert fail["result-type"] == "tlsa-invalid"
        assert fail["receiving-mx-hostname"] == f"mxb.{o}" and fail["receiving-ip"] == b
        assert fail["sending-mta-ip"] == "127.0.0.1"
        assert fail["failed-session-count"] >= 1
        assert "TLS handshake failed" in fail["failure-reason-code"]

        (sts,) = report("sts")
        assert sts["policy"] == {"policy-type": "sts", "policy-string": [
            "version: STSv1", "mode: enforce", f"mx: mxc.{o}", "max_age: 86400"],
            "policy-domain": f"sts.{o}", "mx-host": [f"mxc.{o}"]}
        assert sts["summary"] == {"total-successful-session-count": 1,
                                  "total-failure-session-count": 0}

        (stsbad,) = report("stsbad")
        assert stsbad["policy"]["policy-type"] == "sts"
        assert {x["result-type"] for x in stsbad["failure-details"]} == \
            {"certificate-host-mismatch"}

        (plain,) = report("plain")
        assert plain["policy"] == {"policy-type": "no-policy-found",
                                   "policy-domain": f"plain.{o}"}
        assert [x["result-type"] for x in plain["failure-details"]] == ["starttls-not-supported"]

        (opp,) = report("opp")
        assert opp["policy"]["policy-type"] == "no-policy-found"
        assert opp["summary"] == {"total-successful-session-count": 1,
                                  "total-failure-session-count": 0}

        (nomatch,) = report("nomatch")
        (fail,) = nomatch["failure-details"]
        assert fail["result-type"] == "validation-failure"
        assert "receiving-mx-hostname" not in fail

        assert set(engine.tls_report_domains(start, end)) == {
            f"{n}.{o}" for n in ("dane", "danebad", "sts", "stsbad", "plain", "opp", "nomatch")}

    # The callback saw the same, with what each connection used.
    by = {(ev.domain.split(".")[0], ev.result_type): ev for ev in seen}
    ok = by[("dane", "success")]
    assert (ok.level, ok.verified, ok.mx_host, ok.receiving_ip) == ("dane", True, f"mxa.{o}", a)
    assert ok.tls_version in ("TLSv1.2", "TLSv1.3")
    assert by[("sts", "success")].level == "mta-sts" and by[("sts", "success")].verified
    assert by[("opp", "success")].level == "opportunistic"
    assert not by[("opp", "success")].verified
    assert by[("plain", "starttls-not-supported")].tls_version == ""


@pytest.mark.parametrize("name, expected", [("mx1", "success"),
                                            ("elsewhere", "certificate-host-mismatch")])
def test_a_testing_policy_checks_but_delivers(dns_server, dns_origin, mx_servers, tls_ca,
                                              tls_ca_file, name, expected):
    """RFC 8461 5: in testing mode failures are reported, mail goes anyway:
    opportunistic TLS that checks the certificate for the report."""
    o = dns_origin
    a = ADDRESSES[0]
    mx = mx_servers([a], tls={a: server_tls(tls_ca, f"{name}.{o}")[0]})
    dns_server.add_zone(o, ["@ MX 10 mx1", f"mx1 A {a}"])
    seen = []
    with Engine(resolver=Resolver([dns_server.address], hosts_file=False, timeout=2),
                on_tls_event=seen.append) as engine:
        engine.set_mta_sts_policy(o, policy("testing", f"mx1.{o}"))
        ticket = engine.submit(message(f"r@{o}"), port=mx.port, timeout=10,
                               ca_file=tls_ca_file)
    assert ticket.result.status == "delivered", ticket.result
    assert mx.server(a).messages[0].extra["tls"]
    (ev,) = seen
    assert (ev.policy_type, ev.result_type, ev.level) == ("sts", expected, "opportunistic")
    assert "mode: testing" in ev.policy_string
    assert ev.tls_version


def test_dane_only_without_records_is_dane_required(dns_server, dns_origin, mx_servers, tls_ca):
    o = dns_origin
    a = ADDRESSES[0]
    mx = mx_servers([a], tls={a: server_tls(tls_ca, f"mx1.{o}")[0]})
    ds = dns_server.add_signed_zone(o, ["@ MX 10 mx1", f"mx1 A {a}"])
    seen = []
    resolver = Resolver([dns_server.address], hosts_file=False, timeout=2, trust_anchors=[ds])
    with Engine(resolver=resolver, on_tls_event=seen.append) as engine:
        ticket = engine.submit(message(f"r@{o}"), port=mx.port, tls="dane-only", timeout=10)
    assert ticket.result.status == "tempfail"
    assert seen and {ev.result_type for ev in seen} == {"dane-required"}
    assert seen[0].domain == o and seen[0].mx_host == f"mx1.{o}"
    assert mx.server(a).accepted == 0


def test_a_failed_opportunistic_handshake_counts_once(aiosmtpd_factory, broken_tls_context):
    """The broken handshake is one failed session; the delivery in clear
    that follows is no TLS attempt. A named host is its own policy domain."""
    server = aiosmtpd_factory(tls_context=broken_tls_context)
    seen = []
    with Engine(on_tls_event=seen.append) as engine:
        ticket = engine.submit(message("r@example.test"), server.host, server.port, timeout=20)
        list(engine.run())
        report = engine.tls_report(server.host, time.time() - 60, time.time() + 60)
    assert ticket.result.status == "delivered"
    assert [ev.result_type for ev in seen] == ["validation-failure"]
    assert seen[0].domain == server.host and seen[0].level == "opportunistic"
    (entry,) = report["policies"]
    assert entry["summary"] == {"total-successful-session-count": 0,
                                "total-failure-session-count": 1}
    assert report["organization-name"] == engine.helo


def test_a_callback_that_raises_does_not_stop_delivery(aiosmtpd_factory, caplog):
    server = aiosmtpd_factory()

    def bad(ev):
        raise RuntimeError("boom")

    with Engine(on_tls_event=bad) as engine:
        ticket = engine.submit(message("r@example.test"), server.host, server.port, timeout=20)
    assert ticket.result.status == "delivered"
    assert "on_tls_event raised" in caplog.text


def test_on_tls_event_must_be_callable():
    with pytest.raises(InvalidOptionError, match="callable"):
        Engine(on_tls_event="print")


def test_no_tls_no_event(aiosmtpd_factory):
    server = aiosmtpd_factory()
    seen = []
    with Engine(on_tls_event=seen.append) as engine:
        ticket = engine.submit(message("r@example.test"), server.host, server.port, tls="none",
                               timeout=20)
    assert ticket.result.status == "delivered" and seen == []
