"""smtpstate.aio.Engine against aiosmtplib and the synchronous Engine, at
100 concurrent sends to Postfix's smtp-sink, in one run (issue 13).

    python benchmarks/bench_aio.py                 # 5 rounds of 5000 messages
    python benchmarks/bench_aio.py --rounds 7 --messages 10000 --placement split

Each measurement is a fresh process (benchmarks/clients.py), its CPU time
getrusage(RUSAGE_SELF) around the sending; the clients take turns
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

# (label, client, connections): 0 connections means one per concurrent send.
# aio.Engine and the Engine run with the Engine's default of 10
# connections per destination, and with 100 (one per send in flight, as
# aiosmtplib needs); the Engine's "100 concurrent" is its connections, all
# messages queued (as benchmarks/run.py measures it).
CLIENTS = (("aio.Engine/10", "aio_engine", 10), ("aio.Engine/100", "aio_engine", 0),
           ("Engine/10", "engine", 10), ("Engine/100", "engine", 0),
           ("aiosmtplib", "aiosmtplib", 0))


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
    labels = [c[0] for c in CLIENTS]
    walls: Dict[str, List[float]] = {c: [] for c in labels}
    cpu: Dict[str, List[float]] = {c: [] for c in labels}
    sink = Sink(cpus=sink_cpus).start()
    try:
        for r in range(args.rounds):
            # A different order each round: none is always first or last.
            k = r % len(CLIENTS)
            for label, client, conns in CLIENTS[k:] + CLIENTS[:k]:
                spec = {"client": client, "port": sink.port, "n": args.messages,
                        "conc": args.concurrency, "cpus": client_cpus}
                if conns:
                    spec["connections"] = conns
                out = measure(spec, env)
                walls[label].append(out["wall"])
                cpu[label].append(out["cpu"])
                print(f"  round {r + 1} {label:15s} {args.messages / out['wall']:9.0f} msg/s "
                      f"{out['cpu'] / args.messages * 1e6:7.1f} us CPU/msg", file=sys.stderr)
    finally:
        sink.stop()
    n = args.messages
    rate = {c: n / statistics.median(walls[c]) for c in labels}
    us = {c: statistics.median(cpu[c]) / n * 1e6 for c in labels}
    print(f"{'client':15s} {'msg/s':>9s} {'CPU us/msg':>11s}   (medians of {args.rounds} "
          f"interleaved rounds, {n} messages, {args.concurrency} concurrent, smtp-sink)")
    for c in labels:
        print(f"{c:15s} {rate[c]:9.0f} {us[c]:11.1f}")
    for a in ("aio.Engine/10", "aio.Engine/100"):
        speed = rate[a] / rate["aiosmtplib"]
        print(f"{a} / aiosmtplib msg/s: {speed:.1f}x (target >= 5x) "
              f"{'met' if speed >= 5 else 'MISSED'}")
    for a, b in (("aio.Engine/10", "Engine/10"), ("aio.Engine/10", "Engine/100"),
                 ("aio.Engine/100", "Engine/100")):
        cost = us[a] / us[b]
        print(f"{a} / {b} CPU per message: {cost:.2f}x (target <= 1.5x) "
              f"{'met' if cost <= 1.5 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
