"""Delivery from Celery: a Celery app on RabbitMQ with smtpstate's task,
one Engine per worker process (``smtpstate.celery``, docs/queue.md).

Start workers (from this directory, so that ``-A celery_app`` finds this
file), then send a batch and print what became of each message:

    export SMTPSTATE_BROKER=amqp://guest:guest@localhost:5672//
    cd examples && celery -A celery_app worker --pool prefork --concurrency 2
    python examples/celery_app.py                     # to a throwaway aiosmtpd of its own
    python examples/celery_app.py --server HOST:PORT --count 20

Without ``--server`` the batch goes to an aiosmtpd this program runs on
127.0.0.1 while it waits, which refuses ``unknown*@`` (550); the workers
deliver to it over loopback, so they must run on this machine. Results
come back through Celery's ``rpc://`` backend. ``SMTPSTATE_CELERY_QUEUE``
names the Celery queue (default ``smtpstate-celery``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Iterator, List, Tuple

from celery import Celery

import smtpstate
import smtpstate.celery

app = Celery("smtpstate_example",
             broker=os.environ.get("SMTPSTATE_BROKER", "amqp://guest:guest@localhost:5672//"),
             backend="rpc://")
app.conf.update(
    # JSON only: smtpstate.celery.register() refuses an app that accepts
    # pickle (a job must never be able to run code in a worker).
    task_serializer="json", result_serializer="json", accept_content=["json"],
    task_default_queue=os.environ.get("SMTPSTATE_CELERY_QUEUE", "smtpstate-celery"),
    # Publisher confirms: a sent task (and a retry a worker sends) is on
    # the broker when apply_async() returns.
    broker_transport_options={"confirm_publish": True},
    broker_connection_retry_on_startup=True,
    # One task at a time per process from the broker: a batch is already
    # many messages, and the rest stays on the broker for idle processes.
    worker_prefetch_multiplier=1,
)

# Each worker process makes one Engine with these options when it starts.
deliver = smtpstate.celery.register(app, max_connections=200, max_per_destination=10)


@contextlib.contextmanager
def _server(arg: str) -> Iterator[Tuple[str, int]]:
    if arg:
        from smtpstate.cli import parse_server
        yield parse_server(arg)
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _local_server import local_server
    with local_server() as (host, port, _handler):
        yield host, port


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="", help="HOST:PORT (default: a local aiosmtpd)")
    parser.add_argument("--count", type=int, default=6, help="messages in the batch")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for the results")
    args = parser.parse_args(argv)
    messages = [smtpstate.Message("sender@example.org",
                                  ["bob@example.test"] if i % 3 else
                                  ["bob@example.test", f"unknown{i}@example.test"],
                                  f"Subject: via Celery {i}\n\nMessage {i}.\n".encode())
                for i in range(args.count)]
    with _server(args.server) as (host, port):
        result = smtpstate.celery.send_batch(deliver, messages, host, port, tls="none")
        print(f"sent {len(messages)} messages as task {result.id}")
        records = smtpstate.celery.collect(result, timeout=args.timeout)
    for record in records:                    # in the batch's order, retries last
        rcpts = ", ".join(f"{r['address']} {r['status']} "
                          f"{r['reply']['code'] if r['reply'] else '-'}"
                          for r in record["recipients"])
        print(f"{record['job'][:8]} {record['status']}: {rcpts}")
    counts: dict = {}
    for record in records:
        counts[record["status"]] = counts.get(record["status"], 0) + 1
    print("results:", dict(sorted(counts.items())))
    app.close()
    return 0 if len(records) == len(messages) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
