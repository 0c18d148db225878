"""smtpstate.aio.Engine against aiosmtplib and the synchronous Engine, at
100 concurrent sends to Postfix's smtp-sink, in one run (issue 13).

    python benchmarks/bench_aio.py                 # 5 rounds of 5000 messages
    python benchmarks/bench_aio.py --rounds 7 --messages 10000 --placement split

Each measurement is a fresh process (benchmarks/clients.py), its CPU time
getrusage(RUSAGE_SELF) around the sending; the three clients take turns
within every round (interleaved, so that a slower minute of a shared
machine hits all three), and the table gives each one's median round.
Targets: aio.Engine >= 5x aiosmtplib's messages per second, and <= 1.5x
the CPU per message of the synchronous Engine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from smtpstate.bench import Sink  # noqa: E402

CLIENTS = ("aio_engine", "engine", "aiosmtplib")


def measure(spec: Dict[str, Any], env: Dict[str, str]) -> Dict[str, float]:
    proc = subprocess.run([sys.executable, os.path.join(HERE, "clients.py"), json.dumps(spec)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{spec['client']} failed: {proc.stderr.decode(errors='replace')[-1500:]}")
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--placement", choices=("none", "split"), default="none",
                    help="split: the sink on the second CPU, the client on the first")
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    sink_cpus = client_cpus = None
    if args.placement == "split" and len(cpus) >= 2:
        sink_cpus, client_cpus = [cpus[1]], [cpus[0]]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE)] + [
        p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    print(f"$ python benchmarks/bench_aio.py --rounds {args.rounds} --messages "
          f"{args.messages} --concurrency {args.concurrency} --placement {args.placement}")
    walls: Dict[str, List[float]] = {c: [] for c in CLIENTS}
    cpu: Dict[str, List[float]] = {c: [] for c in CLIENTS}
    sink = Sink(cpus=sink_cpus).start()
    try:
        for r in range(args.rounds):
            # A different order each round: none is always first or last.
            order = CLIENTS[r % 3:] + CLIENTS[:r % 3]
            for client in order:
                out = measure({"client": client, "port": sink.port, "n": args.messages,
                               "conc": args.concurrency, "cpus": client_cpus}, env)
                walls[client].append(out["wall"])
                cpu[client].append(out["cpu"])
                print(f"  round {r + 1} {client:10s} {args.messages / out['wall']:9.0f} msg/s "
                      f"{out['cpu'] / args.messages * 1e6:7.1f} us CPU/msg", file=sys.stderr)
    finally:
        sink.stop()
    n = args.messages
    rate = {c: n / statistics.median(walls[c]) for c in CLIENTS}
    us = {c: statistics.median(cpu[c]) / n * 1e6 for c in CLIENTS}
    print(f"{'client':12s} {'msg/s':>9s} {'CPU us/msg':>11s}   (medians of {args.rounds} rounds, "
          f"{n} messages, {args.concurrency} concurrent, smtp-sink)")
    for c in CLIENTS:
        print(f"{c:12s} {rate[c]:9.0f} {us[c]:11.1f}")
    speed = rate["aio_engine"] / rate["aiosmtplib"]
    cost = us["aio_engine"] / us["engine"]
    print(f"aio.Engine / aiosmtplib msg/s: {speed:.1f}x (target >= 5x) "
          f"{'met' if speed >= 5 else 'MISSED'}")
    print(f"aio.Engine / Engine CPU per message: {cost:.2f}x (target <= 1.5x) "
          f"{'met' if cost <= 1.5 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
