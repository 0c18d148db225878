"""DNSSEC by default: the root zone's trust anchors, against real name
servers (tests/dns_server.py's NSD).

A resolver that strips DNSSEC is played by a second NSD serving an
unsigned root zone: under the root's anchors its answer for the root's
keys fails validation, exactly as a forwarder's would that drops the
signatures, and every other answer would too.
"""

from __future__ import annotations

import logging

import pytest

from dns_server import DnsServer
from smtpstate import Engine, Message, Resolver

A = "127.0.0.2"


def message(rcpt: str) -> Message:
    return Message("sender@client.test", [rcpt], b"Subject: dnssec\r\n\r\nhello\r\n")


@pytest.fixture
def stripping_server(dns_server):
    """An NSD serving an unsigned root zone (nothing else)."""
    server = DnsServer()
    server.start()
    yield server
    server.stop()


def test_by_default_the_root_validates_and_test_names_are_unsigned(dns_server, dns_origin,
                                                                   mx_servers):
    """The private NSD serves no root (REFUSED): the anchors stay, and a
    name under "test." is taken as unsigned, so it routes."""
    mx = mx_servers([A])
    dns_server.add_zone(dns_origin, ["@ MX 10 mx1", f"mx1 A {A}"])
    with Engine(resolver=Resolver([dns_server.address], hosts_file=False, timeout=2),
                mta_sts=None) as engine:
        assert engine.dnssec == "unknown"
        ticket = engine.submit(message(f"r@{dns_origin}"), port=mx.port, timeout=10)
        list(engine.run())
        assert engine.dnssec == "on"
    assert ticket.result.status == "delivered", ticket.result


def test_no_anchors_no_validation(dns_server, dns_origin, mx_servers):
    mx = mx_servers([A])
    dns_server.add_zone(dns_origin, ["@ MX 10 mx1", f"mx1 A {A}"])
    with Engine(resolver=Resolver([dns_server.address], hosts_file=False, trust_anchors=()),
                mta_sts=None) as engine:
        ticket = engine.submit(message(f"r@{dns_origin}"), port=mx.port, timeout=10)
        list(engine.run())
        assert engine.dnssec == "off"
    assert ticket.result.status == "delivered", ticket.result


def test_name_servers_that_strip_dnssec_do_not_stop_the_mail(stripping_server, mx_servers,
                                                             caplog):
    mx = mx_servers([A])
    stripping_server.add_zone(".", ["strip.example. MX 10 mx1.strip.example.",
                                    f"mx1.strip.example. A {A}"])
    resolver = Resolver([stripping_server.address], hosts_file=False, timeout=2)
    with caplog.at_level(logging.WARNING, logger="smtpstate.engine"):
        with Engine(resolver=resolver, mta_sts=None) as engine:
            ticket = engine.submit(message("r@strip.example"), port=mx.port, timeout=10)
            list(engine.run())
            assert engine.dnssec == "stripped"
    assert ticket.result.status == "delivered", ticket.result
    assert ticket.result.recipients[0].mx == "mx1.strip.example"
    assert "strip DNSSEC" in caplog.text


def test_the_same_root_with_its_anchors_dropped_by_hand_is_off(stripping_server, mx_servers):
    """The other way to the same delivery: no validation asked for."""
    mx = mx_servers([A])
    stripping_server.add_zone(".", ["plain.example. MX 10 mx1.plain.example.",
                                    f"mx1.plain.example. A {A}"])
    resolver = Resolver([stripping_server.address], hosts_file=False, trust_anchors=())
    with Engine(resolver=resolver, mta_sts=None) as engine:
        ticket = engine.submit(message("r@plain.example"), port=mx.port, timeout=10)
        list(engine.run())
        assert engine.dnssec == "off"
    assert ticket.result.status == "delivered", ticket.result
