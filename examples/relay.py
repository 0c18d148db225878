"""A small relay: aiosmtpd takes mail in, smtpstate sends it on to a next
hop, and the client that handed it over hears what became of it.

* each RCPT's parameters are kept (``Recipient.from_smtp``; one this relay
  cannot pass on is refused with 555 there and then), and so are MAIL's
  (``Message.from_smtp``: SMTPUTF8 stays even for an ASCII envelope);
* the answer to the end of DATA is ``result.smtp_reply()``: 250 when the
  message reached some recipients, the next hop's refusal when it reached
  none for good, 451 (with an RFC 3463 code such as 4.4.1 when the next hop
  did not answer) when the client should try again;
* messages go on through one ``aio.Engine`` on aiosmtpd's own event loop:
  the connections to the next hop are pooled and reused across incoming
  sessions (closed with QUIT once idle), with no thread of its own;
* for recipients that failed after the client was told 250, the relay
  writes a DSN (``smtpstate.dsn.build``) and sends it with a null reverse
  path to the sender. This relay keeps no queue, so it gives up at once
  (``give_up=True``): a recipient that failed for now is reported failed.

    python examples/relay.py                      # a demo against its own next hop
    python examples/relay.py --server HOST:PORT   # relay the demo's mail to that server

The demo plays the upstream client with the standard library's smtplib,
and the next hop is a throwaway aiosmtpd that refuses ``unknown*@`` (550)
and defers ``later*@`` (450).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email
import email.policy
import email.utils
import logging
import os
import smtplib
import socket
import sys
from typing import Any, Iterator, List, Optional, Tuple

from smtpstate import InvalidMessageError, Message, Recipient, aio, dsn
from smtpstate.cli import parse_server

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _local_server import local_server  # noqa: E402

log = logging.getLogger("relay")

REPORTING_MTA = "relay.example"


class Relay:
    """The aiosmtpd handler: one message in, one sent on, one answer back."""

    def __init__(self, next_hop: Tuple[str, int]) -> None:
        self.next_hop = next_hop
        self.engine: Optional[aio.Engine] = None

    def out(self) -> aio.Engine:
        """The engine that sends on, made on aiosmtpd's loop at first use."""
        if self.engine is None:
            self.engine = aio.Engine(helo=REPORTING_MTA, max_per_destination=10,
                                     idle_timeout=5.0)
        return self.engine

    async def aclose(self) -> None:
        """Finish what is in flight, QUIT the next hop's connections."""
        if self.engine is not None:
            await self.engine.aclose()

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: List[str]) -> str:
        try:
            rcpt = Recipient.from_smtp(address, rcpt_options)
        except InvalidMessageError as e:
            return f"555 5.5.4 {e}"
        envelope.rcpt_tos.append(address)
        # aiosmtpd keeps one list of RCPT options for them all: keep each's.
        envelope.__dict__.setdefault("relay_rcpts", []).append(rcpt)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        arrived = email.utils.localtime()
        sender = "" if envelope.mail_from in ("<>", None) else envelope.mail_from
        try:
            message = Message.from_smtp(sender, envelope.relay_rcpts,
                                        bytes(envelope.original_content),
                                        envelope.mail_options)
        except InvalidMessageError as e:
            return f"555 5.5.4 {e}"
        host, port = self.next_hop
        result = await self.out().send(message, host, port, timeout=30)
        reply = result.smtp_reply()
        log.info("%s: %s", result.status, reply)
        if result.status == "partial":
            # The client hears 250: the recipients that failed are ours to
            # report. (Any other answer leaves the message with the client.)
            await self.bounce(result, message, arrived)
        return reply.as_smtp()

    async def bounce(self, result: Any, message: Message, arrived: Any) -> None:
        report = dsn.build(result, message, reporting_mta=REPORTING_MTA,
                           arrival_date=arrived, give_up=True)
        if report is None:                   # a null sender, or NOTIFY=NEVER
            return
        host, port = self.next_hop
        sent = await self.out().send(Message.from_email(report, sender="",
                                                        recipients=[message.sender]),
                                     host, port, timeout=30)
        log.info("DSN to %s: %s", message.sender, sent.status)


@contextlib.contextmanager
def running_relay(next_hop: Tuple[str, int]) -> Iterator[Tuple[str, int]]:
    """The relay on 127.0.0.1 meanwhile; yields where it listens."""
    from aiosmtpd.controller import Controller

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    relay = Relay(next_hop)
    controller = Controller(relay, hostname="127.0.0.1", port=port,
                            server_hostname=REPORTING_MTA)
    controller.start()
    try:
        yield "127.0.0.1", port
    finally:
        # The engine belongs to aiosmtpd's loop: closed there, then the loop.
        asyncio.run_coroutine_threadsafe(relay.aclose(), controller.loop).result(60)
        controller.stop()


def hand_over(relay: Tuple[str, int], recipients: List[str]) -> Tuple[int, str]:
    """The upstream client: smtplib sends one message through the relay;
    returns the relay's answer to the end of DATA."""
    content = (b"From: Alice <alice@client.example>\r\nTo: team@example.test\r\n"
               b"Subject: minutes\r\nMessage-ID: <m1@client.example>\r\n\r\n"
               b"The minutes are attached.\r\n")
    with smtplib.SMTP(*relay, local_hostname="client.example", timeout=60) as smtp:
        smtp.ehlo()
        smtp.mail("alice@client.example")
        for r in recipients:
            smtp.rcpt(r)
        code, text = smtp.data(content)
        return code, text.decode("utf-8", "replace").replace("\n", " / ")


def dsn_summary(messages: List[Any]) -> Optional[str]:
    """What the DSN that reached the next hop says, per recipient."""
    for m in messages:
        if m["from"] not in ("", "<>"):
            continue
        report: Any = email.message_from_bytes(m["data"], policy=email.policy.default)
        status: Any = report.get_payload()[1]
        blocks: List[Any] = status.get_payload()[1:]       # after the per-message block
        return ", ".join(f"{b['Final-Recipient'].split(';')[1].strip()} {b['Action']} "
                         f"{b['Status']}" for b in blocks) + f" (to {', '.join(m['to'])})"
    return None


def demo(next_hop: Tuple[str, int], handler: Any) -> None:
    with running_relay(next_hop) as relay:
        cases = [
            ("some delivered", ["ok@example.test", "unknown@example.test",
                                "later@example.test"]),
            ("none for good", ["unknown1@example.test", "unknown2@example.test"]),
        ]
        for label, rcpts in cases:
            code, text = hand_over(relay, rcpts)
            print(f"{label}: relay answered {code} {text}")
        if handler is not None:
            print(f"DSN: {dsn_summary(handler.messages)}")
    # A next hop that is not there: the client is told to try again.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        gone = probe.getsockname()
    with running_relay(gone) as relay:
        code, text = hand_over(relay, ["ok@example.test"])
        print(f"next hop down: relay answered {code} {text}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", type=parse_server, help="the next hop, HOST:PORT")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.server is not None:
        demo(args.server, None)
        return 0
    with local_server() as (host, port, handler):
        demo((host, port), handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
