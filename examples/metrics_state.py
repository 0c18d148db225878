"""A metrics state after BODY, on the Engine: how many messages each
connection carried and how long each transaction took, measured inside
the state machine, next to what the results say (statuses and bounce
classes).

The state awaits no reply (setup returns 0), so it costs no round trip:
its callback runs once per message the server accepted, right after the
final reply, before RSET/QUIT. States run on every connection the engine
opens; ``session.data`` is private to the state and the connection.

    python examples/metrics_state.py                       # its own aiosmtpd
    python examples/metrics_state.py --server HOST:PORT --count 1000
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import threading
import time
from typing import Any, Counter, Dict, List

import smtpstate
from smtpstate import Action, Machine, State
from smtpstate.cli import parse_server


class Metrics(State):
    """Counts and times the transactions that reached it."""

    name = "metrics"

    def __init__(self) -> None:
        self.lock = threading.Lock()             # states may run in any driver's thread
        self.durations_ms: List[float] = []
        self.per_connection: Counter[int] = collections.Counter()
        self.bytes = 0

    def callback(self, session: Any, reply: Any) -> int:
        now = time.monotonic()
        data = session.data                      # this state, this connection
        started = data.get("last", session.opened_at)
        data["last"] = now
        conn = data.setdefault("id", id(data))
        message = session.message
        with self.lock:
            self.durations_ms.append((now - started) * 1000)
            self.per_connection[conn] += 1
            self.bytes += len(message.data) if message is not None else 0
        return Action.NEXT


def make_machine(metrics: Metrics) -> Machine:
    machine = Machine()
    machine.register(metrics, after="BODY")
    return machine


def run(host: str, port: int, count: int, metrics: Metrics) -> List[smtpstate.Result]:
    messages = []
    for i in range(count):
        rcpt = f"unknown{i}@example.test" if i % 10 == 9 else f"user{i}@example.test"
        messages.append(smtpstate.Message("ann@example.test", [rcpt],
                                          f"Subject: metrics {i}\r\n\r\nbody {i}\r\n"))
    with smtpstate.Engine(machine=make_machine(metrics), max_per_destination=4,
                          messages_per_connection=25) as engine:
        for m in messages:
            engine.submit(m, host, port, timeout=30)
        return list(engine.run(timeout=120))


def report(results: List[smtpstate.Result], metrics: Metrics) -> Dict[str, Any]:
    statuses: Counter[str] = collections.Counter(r.status for r in results)
    classes: Counter[str] = collections.Counter(
        str(r.bounce_class) for r in results if r.bounce_class is not None)
    q = sorted(metrics.durations_ms)
    print(f"results: {dict(statuses)}")
    if classes:
        print(f"bounce classes: {dict(classes)}")
    print(f"accepted transactions seen by the state: {len(q)}, "
          f"over {len(metrics.per_connection)} connection(s), "
          f"{metrics.bytes} bytes of content")
    if q:
        print(f"per transaction: median {statistics.median(q):.2f} ms, max {q[-1]:.2f} ms")
    print(f"messages per connection: {sorted(metrics.per_connection.values(), reverse=True)}")
    return {"statuses": statuses, "seen": len(q)}


def main(argv: list) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", metavar="HOST:PORT")
    parser.add_argument("--count", type=int, default=100)
    args = parser.parse_args(argv)
    metrics = Metrics()
    if args.server:
        results = run(*parse_server(args.server), args.count, metrics)
    else:
        from _local_server import local_server
        with local_server() as (host, port, _):
            results = run(host, port, args.count, metrics)
    summary = report(results, metrics)
    # Every delivered message passed through the state exactly once.
    return 0 if summary["seen"] == summary["statuses"]["delivered"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
