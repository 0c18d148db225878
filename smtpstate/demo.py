"""The demo: an embedded aiosmtpd on loopback, a Python state plugged into
the machine, a batch of messages delivered over one connection with a
progress bar, and a summary of what became of them; then a batch routed
by MX records (smtpstate.demo_routed) to two MX hosts on loopback.

It is the README's first command, so it must work on a fresh install with
nothing else running, and say plainly whether it did: the exit code is 0
only when every message got the outcome the demo planned for it and the
server holds exactly the messages reported delivered.

The batch is not all good news on purpose: message 2 has a recipient the
server does not know (550 5.1.1: a partial delivery), message 3 goes to a full mailbox (452
4.2.2, a temporary failure) and message 5 is refused as spam (554 5.7.1),
so that the summary shows bounce classes at work.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, TextIO, Tuple

from smtpstate.client import Client
from smtpstate.demo_routed import run_routed_demo
from smtpstate.logs import printable, transcript_handler
from smtpstate.machine import Action, Machine, State
from smtpstate.message import Message

__all__ = ["TimingState", "ProgressBar", "run_demo"]

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


class ProgressBar:
    """A one-line progress bar redrawn with ``\\r`` (no dependency).

    On a terminal it is redrawn at most every 50 ms; elsewhere (a pipe, a
    CI log) only the final state is written, once.
    """

    def __init__(self, total: int, out: Optional[TextIO] = None, width: int = 30) -> None:
        self.total = max(1, total)
        self.out = out if out is not None else sys.stderr
        self.width = width
        self.started = time.perf_counter()
        self.drawn_at = 0.0
        isatty = getattr(self.out, "isatty", None)
        self.live = bool(isatty and isatty())

    def _line(self, done: int) -> str:
        filled = self.width * done // self.total
        elapsed = time.perf_counter() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        return (f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} "
                f"messages, {rate:,.0f}/s")

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if self.live and (now - self.drawn_at >= 0.05 or done >= self.total):
            self.out.write("\r" + self._line(done))
            self.out.flush()
            self.drawn_at = now

    def finish(self, done: int) -> None:
        self.out.write(("\r" if self.live else "") + self._line(done) + "\n")
        self.out.flush()


class _DemoHandler:
    """aiosmtpd handler: refuses ``nobody@`` (550 5.1.1), ``full@`` (452
    4.2.2), and content with "[spam]" in it (554 5.7.1); takes the rest."""

    def __init__(self) -> None:
        self.received: List[Dict[str, Any]] = []

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any,
                          address: str, rcpt_options: List[str]) -> str:
        if address.startswith("nobody@"):
            return "550 5.1.1 <%s>: Recipient address rejected: User unknown" % address
        if address.startswith("full@"):
            return "452 4.2.2 <%s>: Mailbox full, try again later" % address
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if b"[spam]" in envelope.original_content:
            return "554 5.7.1 Message rejected as spam"
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


def _messages(count: int) -> List[Tuple[Message, str]]:
    """The batch, each message with the outcome planned for it."""
    out = []
    for i in range(1, count + 1):
        rcpts, expect, subject = [f"user{i}@example.test"], "delivered", f"smtpstate demo {i}"
        if i == 2:
            rcpts.append("nobody@example.test")     # one refused recipient
            expect = "partial"
        elif i == 3:
            rcpts, expect = ["full@example.test"], "tempfail"
        elif i == 5:
            subject, expect = f"[spam] smtpstate demo {i}", "permfail"
        body = (f"From: demo@client.test\nTo: {', '.join(rcpts)}\nSubject: {subject}\n\n"
                f"Message {i} of {count}.\n.A line starting with a dot.\n").encode()
        out.append((Message("demo@client.test", rcpts, body), expect))
    return out


def _summary(results: List[Any], durations: List[float], elapsed: float,
             received: int, out: TextIO) -> None:
    by_status: Dict[str, int] = {}
    for r in results:
        by_status[r.status] = by_status.get(r.status, 0) + 1
    classes: Dict[str, int] = {}
    for r in results:
        for rc in r.recipients:
            if rc.bounce_class is not None:
                key = str(rc.bounce_class)
                classes[key] = classes.get(key, 0) + 1
    rcpts = sum(len(r.recipients) for r in results)
    ok_rcpts = sum(rc.status == "delivered" for r in results for rc in r.recipients)
    print("\nsummary:", file=out)
    print("  messages:   " + ", ".join(f"{n} {s}" for s, n in sorted(by_status.items())),
          file=out)
    print(f"  recipients: {ok_rcpts} of {rcpts} delivered", file=out)
    if classes:
        print("  bounce classes: " + ", ".join(f"{n} x {c}" for c, n in sorted(classes.items())),
              file=out)
    if durations:
        q = sorted(durations)
        p95 = q[min(len(q) - 1, int(len(q) * 0.95))]
        print(f"  per message (timing state): median {statistics.median(q):.2f} ms, "
              f"p95 {p95:.2f} ms, max {q[-1]:.2f} ms", file=out)
    print(f"  {len(results)} messages over one connection in {elapsed * 1000:.0f} ms "
          f"({len(results) / elapsed if elapsed > 0 else 0:,.0f}/s); the server holds "
          f"{received}", file=out)


def run_demo(count: int = 20, out: Optional[TextIO] = None, progress: bool = True,
             err: Optional[TextIO] = None) -> int:
    """Run the demo, printing to ``out`` (the progress bar to ``err``);
    returns a process exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
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

        batch = _messages(count)
        results = []
        transcript: List[str] = []
        bar = ProgressBar(count, err) if progress else None
        started = time.perf_counter()
        with Client("127.0.0.1", controller.port, machine=machine, helo="client.test",
                    timeout=30) as client:
            # The first message's dialogue, as the transcript logger sees it.
            _, undo = transcript_handler(transcript.append)
            try:
                results.append(client.send(batch[0][0]))
            finally:
                undo()
            for i, (message, _) in enumerate(batch[1:], 2):
                if bar is not None:
                    bar.update(i - 1)
                results.append(client.send(message))
            if bar is not None:
                bar.finish(len(results))
        elapsed = time.perf_counter() - started

        print("\ntranscript of the first message:", file=out)
        for line in transcript:
            print(f"  {line.rstrip()}", file=out)
        print("\nresults that are not plain deliveries:", file=out)
        surprises = 0
        for i, (r, (_, expect)) in enumerate(zip(results, batch), 1):
            if r.status != expect:
                surprises += 1
            refused = [rc for rc in r.recipients if rc.status != r.status]
            if r.ok and not refused and r.status == expect:
                continue
            why = str(r.reply) if r.reply else r.reason
            cls = f" [{r.bounce_class}]" if r.bounce_class else ""
            print(f"  #{i:<3} {r.status:<9} at stage {r.stage_code} ({r.stage}): "
                  f"{printable(why)}{cls}", file=out)
            for rc in refused:
                print(f"         {rc.address}: {rc.status} {printable(str(rc.reply))}"
                      f" [{rc.bounce_class}]", file=out)
        _summary(results, timing.durations_ms, elapsed, len(handler.received), out)
        # A partial delivery is one message the server holds, too.
        delivered = sum(r.status in ("delivered", "partial") for r in results)
        if surprises or delivered != len(handler.received) or len(results) != count:
            print(f"\nUNEXPECTED: {surprises} message(s) did not end as planned, "
                  f"{delivered} delivered, {len(handler.received)} received", file=out)
            return 1
        if not run_routed_demo(out):
            print("\nUNEXPECTED: the routed batch did not end as planned", file=out)
            return 1
        print("\nevery message ended as planned", file=out)
        return 0
    finally:
        controller.stop()
