"""What building a message costs: ``Message(sender, [rcpt], data)`` for the
benchmark's ~1.1 KiB message (smtpstate.bench.make_message()) with one
plain recipient, every check included, nothing sent.

Usage (from the source tree, with the package built or installed)::

    python benchmarks/bench_message.py [--rounds 5] [--messages 60000]

Each round builds MESSAGES messages in a loop and is timed with
``time.perf_counter()``; the figure is the median of the rounds in
microseconds per message, with the spread (1 - min/max). To compare two
trees, run this file from each in turn, several times, and compare the
medians (``PYTHONPATH=TREE python benchmarks/bench_message.py``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import smtpstate
from smtpstate.bench import RECIPIENT, SENDER, make_message


def one_round(n: int, data: bytes) -> float:
    """Microseconds per message over one loop of n."""
    build = smtpstate.Message
    rcpts = [RECIPIENT]
    start = time.perf_counter()
    for _ in range(n):
        build(SENDER, rcpts, data)
    return (time.perf_counter() - start) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--messages", type=int, default=60000)
    args = ap.parse_args()
    data = make_message()
    rounds = [one_round(args.messages, data) for _ in range(args.rounds)]
    spread = 1 - min(rounds) / max(rounds)
    print(f"Message(sender, [rcpt], {len(data)} bytes): {statistics.median(rounds):.2f} us "
          f"per message (median of {args.rounds} rounds of {args.messages}, spread "
          f"{spread:.0%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
