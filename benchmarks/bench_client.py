"""End to end, one connection, sequential: smtpstate's blocking Client
against Python's smtplib, both sending the same message to the same Postfix
smtp-sink on loopback, in the same run, interleaved.

Prints messages per second and client CPU seconds per 1000 messages
(user+sys of this process, from getrusage; the sink is another process),
and the ratios. Usage::

    python benchmarks/bench_client.py [--messages 2000] [--rounds 3]

Needs Postfix's smtp-sink (Debian: apt-get install postfix).
"""

from __future__ import annotations

import argparse
import json
import resource
import smtplib
import sys
import time
from typing import Callable, Dict, List, Tuple

import smtpstate
from smtpstate.bench import Sink


SENDER = "bench@client.test"
RCPT = "sink@example.test"


def make_message() -> bytes:
    """About 1.1 KiB: four headers, a 1024-byte body in 80-byte lines."""
    headers = (b"From: bench@client.test\r\nTo: sink@example.test\r\n"
               b"Subject: smtpstate benchmark\r\nMessage-ID: <bench@client.test>\r\n\r\n")
    line = b"x" * 78 + b"\r\n"
    body = line * 12 + b"y" * 62 + b"\r\n"
    assert len(body) == 1024
    return headers + body


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_smtpstate(port: int, n: int, body: bytes) -> None:
    msg = smtpstate.Message(SENDER, [RCPT], body)
    with smtpstate.Client("127.0.0.1", port, helo="client.test", timeout=30) as client:
        for _ in range(n):
            r = client.send(msg)
            if not r.ok:
                raise SystemExit(f"smtpstate: {r}")


def run_smtplib(port: int, n: int, body: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as s:
        for _ in range(n):
            s.sendmail(SENDER, [RCPT], body)


def measure(fn: Callable[[int, int, bytes], None], port: int, n: int,
            body: bytes) -> Tuple[float, float]:
    c0, t0 = cpu(), time.perf_counter()
    fn(port, n, body)
    return time.perf_counter() - t0, cpu() - c0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    body = make_message()
    sink_server = Sink().start()
    port = sink_server.port
    clients = {"smtpstate.Client": run_smtpstate, "smtplib": run_smtplib}
    best: Dict[str, Tuple[float, float]] = {}
    try:
        for _ in range(args.rounds):                 # interleaved: the machine drifts
            for name, fn in clients.items():
                wall, used = measure(fn, port, args.messages, body)
                prev = best.get(name)
                if prev is None or wall < prev[0]:
                    best[name] = (wall, used)
    finally:
        sink_server.stop()
    print(f"command: python benchmarks/bench_client.py --messages {args.messages} "
          f"--rounds {args.rounds}")
    print(f"message: {len(body)} bytes, 1 recipient, one connection, sequential; "
          f"peer: Postfix smtp-sink on loopback; best of {args.rounds} rounds")
    print(f"{'client':<18}{'msg/s':>10}{'CPU s/1000 msg':>17}")
    rows: List[Dict[str, float]] = []
    for name, (wall, used) in best.items():
        rate = args.messages / wall
        per_k = used / args.messages * 1000
        rows.append({"client": name, "msg_per_s": rate, "cpu_s_per_1000": per_k})
        print(f"{name:<18}{rate:>10.0f}{per_k:>17.3f}")
    a, b = best["smtpstate.Client"], best["smtplib"]
    print(f"ratio smtpstate/smtplib: {b[0] / a[0]:.2f}x messages per second, "
          f"{a[1] / b[1]:.2f}x CPU per message")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
