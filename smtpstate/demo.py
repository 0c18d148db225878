"""The demo: an embedded aiosmtpd on loopback, a Python state plugged into
the machine, a batch of messages delivered over one connection, and what
happened to each of them.

It is the README's first command, so it must work on a fresh install with
nothing else running.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional, TextIO

from smtpstate.client import Client
from smtpstate.machine import Action, Machine, State
from smtpstate.message import Message

__all__ = ["TimingState", "run_demo"]

log = logging.getLogger("smtpstate.demo")


class TimingState(State):
    """A metrics state after BODY: how long each transaction took, from the
    end of the previous one (or the connection) to the final reply."""

    name = "timing"

    def __init__(self) -> None:
        self.durations_ms: List[float] = []

    def callback(self, session: Any, reply: Any) -> int:
        now = time.monotonic()
        start = session.data.get("since", session.opened_at)
        self.durations_ms.append((now - start) * 1000)
        session.data["since"] = now
        return Action.NEXT


class _DemoHandler:
    """Accepts everything except ``nobody@...``, which gets 550 5.1.1."""

    def __init__(self) -> None:
        self.received: List[Dict[str, Any]] = []

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any,
                          address: str, rcpt_options: List[str]) -> str:
        if address.startswith("nobody@"):
            return "550 5.1.1 <%s>: no such user here" % address
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append({"from": envelope.mail_from, "to": list(envelope.rcpt_tos),
                              "bytes": len(envelope.original_content)})
        return "250 2.0.0 queued as demo-%d" % len(self.received)


def _start_server(handler: _DemoHandler) -> Any:
    try:
        from aiosmtpd.controller import Controller
    except ImportError:
        raise SystemExit("the demo needs aiosmtpd: pip install 'smtpstate[demo]'") from None
    import socket
    with socket.socket() as probe:                # a free loopback port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(handler, hostname="127.0.0.1", port=port,
                            server_hostname="demo.smtpstate.test")
    controller.start()
    return controller


def _messages(count: int) -> List[Message]:
    out = []
    for i in range(1, count + 1):
        rcpts = [f"user{i}@example.test"]
        if i == 2:
            rcpts.append("nobody@example.test")   # one refused recipient
        body = (f"From: demo@client.test\nTo: user{i}@example.test\n"
                f"Subject: smtpstate demo {i}\n\n"
                f"Message {i} of {count}.\n.A line starting with a dot.\n").encode()
        out.append(Message("demo@client.test", rcpts, body))
    return out


def _show_transcript(transcript: List[Any], out: TextIO) -> None:
    for who, data in transcript:
        for line in data.decode("utf-8", "replace").splitlines():
            print(f"  {who}: {line}", file=out)


def run_demo(count: int = 10, out: Optional[TextIO] = None) -> int:
    """Run the demo, printing to ``out``; returns a process exit code."""
    import sys
    out = out or sys.stdout
    handler = _DemoHandler()
    controller = _start_server(handler)
    try:
        print(f"aiosmtpd listening on 127.0.0.1:{controller.port}", file=out)
        machine = Machine()
        timing = TimingState()
        sid = machine.register(timing, after="BODY")
        order = " -> ".join(name for _, name in machine.states)
        print(f"registered Python state {timing.name!r} after BODY as id {sid}", file=out)
        print(f"state order: {order}", file=out)

        messages = _messages(count)
        results = []
        started = time.perf_counter()
        with Client("127.0.0.1", controller.port, machine=machine, helo="client.test",
                    timeout=30, keep_transcript=True) as client:
            first = client.send(messages[0])
            first_transcript = list(client.transcript)
            results.append(first)
            results.extend(client.send(m) for m in messages[1:])
        elapsed = time.perf_counter() - started

        print("\ntranscript of the first message:", file=out)
        _show_transcript(first_transcript, out)
        print("\nresults:", file=out)
        for i, r in enumerate(results):
            took = timing.durations_ms[i] if i < len(timing.durations_ms) else float("nan")
            print(f"  #{i + 1:<3} {r.status:<10} {r.reply}  ({took:.1f} ms)", file=out)
            for rc in r.recipients:
                if rc.status != r.status:
                    print(f"        {rc.address}: {rc.status} {rc.reply}", file=out)
        delivered = sum(r.ok for r in results)
        print(f"\n{delivered} of {len(results)} delivered over one connection in "
              f"{elapsed * 1000:.0f} ms; the server received {len(handler.received)} "
              "messages", file=out)
        return 0 if delivered == len(results) == len(handler.received) else 1
    finally:
        controller.stop()
