"""The demo's second part: a batch routed by MX, as the engine delivers to
the Internet, with every piece of the Internet on this machine.

DNS answers come from the resolver's own local records (libunbound's
local-data: no server, no network), and the MX hosts are aiosmtpd servers
on 127.0.0.2 and 127.0.0.3, one port for both, as on the Internet every
MX listens on 25:

    alpha.test, beta.test   MX 10 mx1.demo.test (127.0.0.2): one site
    gamma.test              MX 10 mx-down.demo.test (127.0.0.4, nothing
                            listens: connection refused), MX 20
                            mx2.demo.test (127.0.0.3): the fallback
    nomail.test             MX 0 . (null MX: accepts no mail)
    nowhere.test            does not exist

The batch shows one transaction for two domains of one site, a message
split over two sites and joined into one result, a fallback to the
second MX, a partial delivery, and two domains failed before any
connection. It checks each outcome and what each server holds.
"""

from __future__ import annotations

import socket
from typing import Any, Dict, List, TextIO, Tuple

from smtpstate.engine import Engine
from smtpstate.logs import printable
from smtpstate.message import Message
from smtpstate.routing import Resolver

__all__ = ["run_routed_demo"]

RECORDS = [
    "alpha.test. 300 MX 10 mx1.demo.test.",
    "beta.test. 300 MX 10 mx1.demo.test.",
    "gamma.test. 300 MX 10 mx-down.demo.test.",
    "gamma.test. 300 MX 20 mx2.demo.test.",
    "mx1.demo.test. 300 A 127.0.0.2",
    "mx2.demo.test. 300 A 127.0.0.3",
    "mx-down.demo.test. 300 A 127.0.0.4",
    "nomail.test. 300 MX 0 .",
]

#: (recipients, the message's planned status, each recipient's planned MX or None)
BATCH: List[Tuple[List[str], str, List[Any]]] = [
    (["alice@alpha.test", "bob@beta.test"], "delivered",
     ["mx1.demo.test", "mx1.demo.test"]),
    (["carol@gamma.test"], "delivered", ["mx2.demo.test"]),
    (["dave@alpha.test", "erin@gamma.test"], "delivered", ["mx1.demo.test", "mx2.demo.test"]),
    (["frank@nomail.test"], "permfail", [None]),
    (["grace@alpha.test", "nobody@gamma.test"], "partial", ["mx1.demo.test", "mx2.demo.test"]),
    (["heidi@nowhere.test"], "permfail", [None]),
]


class _Mailbox:
    """aiosmtpd handler: keeps what it takes, refuses ``nobody@``."""

    def __init__(self) -> None:
        self.received: List[Tuple[str, List[str]]] = []

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any,
                          address: str, rcpt_options: List[str]) -> str:
        if address.startswith("nobody@"):
            return "550 5.1.1 <%s>: Recipient address rejected: User unknown" % address
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 2.0.0 queued"


def _common_port(addresses: List[str]) -> int:
    """A port free on every address (as every MX listens on 25)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((addresses[0], 0))
            port = probe.getsockname()[1]
        try:
            for a in addresses[1:]:
                with socket.socket() as other:
                    other.bind((a, port))
            return port
        except OSError:
            continue
    raise SystemExit(f"no port free on all of {addresses}")


def run_routed_demo(out: TextIO) -> bool:
    """Deliver the routed batch; True when every message ended as planned
    and the servers hold exactly what was reported delivered."""
    try:
        from aiosmtpd.controller import Controller
    except ImportError:
        raise SystemExit("the demo needs aiosmtpd: pip install 'smtpstate[demo]'") from None
    port = _common_port(["127.0.0.2", "127.0.0.3", "127.0.0.4"])
    boxes: Dict[str, _Mailbox] = {"mx1.demo.test": _Mailbox(), "mx2.demo.test": _Mailbox()}
    servers = [Controller(boxes[name], hostname=ip, port=port, server_hostname=name)
               for name, ip in (("mx1.demo.test", "127.0.0.2"), ("mx2.demo.test", "127.0.0.3"))]
    for s in servers:
        s.start()
    try:
        print(f"\nrouted by MX: MX hosts on 127.0.0.2 and 127.0.0.3, port {port}; DNS "
              "from the resolver's local records:", file=out)
        for line in RECORDS:
            print(f"  {line}", file=out)
        # Local records only: nothing is signed, nothing to validate, and
        # no name server is asked (not even for the root's keys).
        resolver = Resolver(local_records=RECORDS, hosts_file=False, timeout=2, attempts=1,
                            trust_anchors=())
        with Engine(resolver=resolver, helo="client.test", address_preference="ipv4") as engine:
            tickets = [engine.submit(Message("demo@client.test", rcpts,
                                             b"Subject: routed demo\r\n\r\nhello\r\n"),
                                     port=port, timeout=10)
                       for rcpts, _, _ in BATCH]
        ok = True
        for i, (t, (rcpts, expect, mxs)) in enumerate(zip(tickets, BATCH), 1):
            r = t.result
            assert r is not None
            mark = "" if r.status == expect else f"   UNEXPECTED (planned {expect})"
            ok &= r.status == expect
            print(f"  #{i} {r.status:<9}{mark}", file=out)
            for rc, mx in zip(r.recipients, mxs):
                where = f"via {rc.mx}[{rc.ip}]" if rc.mx else "no connection"
                print(f"       {rc.address:<20} {rc.status:<9} {where}", file=out)
                ok &= rc.mx == mx
            if r.status != "delivered":
                print(f"       reason: {printable(r.reason or str(r.reply))}", file=out)
        # What each server holds: exactly the deliveries reported.
        for name, box in boxes.items():
            want = sorted(tuple(sorted(rc.address for rc in t.result.recipients
                                       if rc.mx == name and rc.status == "delivered"))
                          for t in tickets if t.result is not None)
            got = sorted(tuple(sorted(to)) for _, to in box.received)
            want = [w for w in want if w]
            print(f"  {name} holds {len(got)} message(s): "
                  + "; ".join(", ".join(to) for to in got), file=out)
            ok &= got == want
        return ok
    finally:
        for s in servers:
            s.stop()
