"""A state after EHLO: Postfix's XCLIENT, which lets a trusted proxy or
content filter tell the server on whose behalf it connects (the client's
address and name), so that the server's logs, restrictions and Received
header show that client instead of the proxy.

Postfix offers XCLIENT only to the hosts in smtpd_authorized_xclient_hosts:

    # main.cf
    smtpd_authorized_xclient_hosts = 127.0.0.0/8

    python examples/xclient.py --server 127.0.0.1:25

Postfix 2.3 and later answer a successful XCLIENT with a new greeting
(220), after which the session starts over: the state jumps back to EHLO,
and passes through the second time. Older Postfix, and Postfix's
smtp-sink test server, answer 250 and do not start over: the session
simply goes on. Its stage codes are the classic XCLIENT ones (19 while
waiting for the reply, 20 after), so a refusal is reported "sending
XCLIENT". A server that does not offer XCLIENT (like the aiosmtpd this
example starts when no --server is given), or offers none of the
attributes we would send, is simply not sent it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, Optional

import smtpstate
from smtpstate import Action, Machine, Stage, State
from smtpstate.cli import parse_server


def xtext(value: str) -> str:
    """RFC 3461 xtext, as XCLIENT attribute values are written."""
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else
                   "".join(f"+{b:02X}" for b in c.encode("utf-8")) for c in value)


class XClient(State):
    """``XCLIENT ADDR=... NAME=...`` once per connection, after EHLO."""

    name = "XCLIENT"

    def __init__(self, **attributes: str) -> None:
        self.attributes: Dict[str, str] = {k.upper(): v for k, v in attributes.items()}
        self.sent_on: int = 0                    # connections it was sent on
        self.accepted_on: int = 0                # ... and taken on
        self.last_reply: Optional[smtpstate.Reply] = None
        self.not_sent: str = "not offered"       # why, when it was not sent

    def stage(self, session: Any, awaiting: bool) -> int:
        return Stage.XCLIENT if awaiting else Stage.XCLIENT_DONE

    def setup(self, session: Any) -> int:
        caps = session.capabilities
        if session.data.get("done"):
            return 0                             # passed through: callback(None)
        if "XCLIENT" not in caps:
            self.not_sent = "not offered"
            return 0
        # Only the attributes this server says it understands.
        attrs = " ".join(f"{k}={xtext(v)}" for k, v in self.attributes.items()
                         if k in caps.xclient)
        if not attrs:
            self.not_sent = (f"the server takes only {' '.join(sorted(caps.xclient))}, "
                             f"none of {' '.join(self.attributes)}")
            return 0
        session.send(f"XCLIENT {attrs}")
        session.data["done"] = True
        self.sent_on += 1
        return 1

    def callback(self, session: Any, reply: Optional[smtpstate.Reply]) -> int:
        if reply is None:
            return Action.NEXT
        self.last_reply = reply
        if reply.code == 220:                    # a new greeting: start over with EHLO
            self.accepted_on += 1
            session.next_state("EHLO")
            return Action.JUMP
        if 200 <= reply.code < 300:              # taken, no new greeting: go on
            self.accepted_on += 1
            return Action.NEXT
        session.fail_reason(f"the server refused XCLIENT: {reply}")
        return Action.TEMPFAIL_TX if reply.code < 500 else Action.PERMFAIL_TX

    def outcome(self) -> str:
        """What became of XCLIENT, in words (the last connection's reply)."""
        if not self.sent_on:
            return f"no ({self.not_sent})"
        taken = "accepted" if self.accepted_on else "refused"
        return f"yes, {taken}: {self.last_reply}"


def make_machine(state: Optional[XClient] = None) -> Machine:
    machine = Machine()
    machine.register(state or XClient(addr="203.0.113.7", name="client.example"),
                     after="EHLO")
    return machine


def send(host: str, port: int, state: XClient) -> smtpstate.Result:
    message = smtpstate.Message("ann@example.test", ["bob@example.test"],
                                b"Subject: via XCLIENT\r\n\r\nhello\r\n")
    with smtpstate.Client(host, port, machine=make_machine(state), timeout=30) as client:
        return client.send(message)


def main(argv: list) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", metavar="HOST:PORT", help="a Postfix that trusts us")
    parser.add_argument("--addr", default="203.0.113.7", help="the client address to claim")
    parser.add_argument("--name", default="client.example", help="the client name to claim")
    args = parser.parse_args(argv)
    state = XClient(addr=args.addr, name=args.name)
    if args.server:
        result = send(*parse_server(args.server), state)
    else:
        from _local_server import local_server
        with local_server() as (host, port, _):
            result = send(host, port, state)
    print(f"result: {result.status} at stage {result.stage_code} ({result.stage}): "
          f"{result.reply or result.reason}")
    print(f"XCLIENT sent: {state.outcome()}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
