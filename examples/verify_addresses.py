"""An address-verification machine: MAIL and RCPT, never DATA.

A state after RCPT ends every transaction before the data: the server has
said what it thinks of each address (RCPT's reply), nothing is delivered,
and the per-recipient results carry the verdicts with their bounce class.
One connection checks them all, RSET between batches.

    python examples/verify_addresses.py bob@example.test unknown1@example.test
    python examples/verify_addresses.py --server HOST:PORT ADDRESS...

Exit code 0 when every address got a verdict, 1 when some got none (the
connection failed first). Many servers accept any address at RCPT and
bounce later: a 250 is a hint, not proof.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List

import smtpstate
from smtpstate import Action, Machine, State
from smtpstate.cli import parse_server


class StopBeforeData(State):
    """After RCPT: end the transaction, whatever RCPT said."""

    name = "VERIFY"

    def callback(self, session: Any, reply: Any) -> int:
        session.fail_reason("address verification: no data sent")
        return Action.PERMFAIL_TX


def make_machine() -> Machine:
    machine = Machine()
    machine.register(StopBeforeData(), after="RCPT")
    return machine


def verify(host: str, port: int, addresses: List[str],
           sender: str = "") -> Dict[str, smtpstate.RecipientResult]:
    """Each address's result: ``not_sent`` with its RCPT reply when the
    server accepted it (the message was never sent), else ``permfail`` or
    ``tempfail`` with the server's reply and bounce class."""
    message = smtpstate.Message(sender, addresses, b"")  # "" sender: a null reverse-path
    with smtpstate.Client(host, port, machine=make_machine(), timeout=30) as client:
        result = client.send(message)
    return {r.address: r for r in result.recipients}


def verdict(r: smtpstate.RecipientResult) -> str:
    """What the server said of the address: accepted, permfail, tempfail."""
    if r.status == "not_sent" and r.reply is not None and r.reply.code < 300:
        return "accepted"
    return r.status


def main(argv: list) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", metavar="HOST:PORT")
    parser.add_argument("addresses", nargs="*",
                        default=["bob@example.test", "unknown1@example.test"])
    args = parser.parse_args(argv)
    if args.server:
        verdicts = verify(*parse_server(args.server), args.addresses)
        received = None
    else:
        from _local_server import local_server
        with local_server() as (host, port, handler):
            verdicts = verify(host, port, args.addresses)
            received = len(handler.messages)
    for address, r in verdicts.items():
        cls = f" [{r.bounce_class}]" if r.bounce_class is not None else ""
        print(f"{address}: {verdict(r)} {r.reply}{cls}")
    if received is not None:
        print(f"messages the server received: {received}")
    return 0 if all(r.reply is not None for r in verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
