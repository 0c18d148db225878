"""End to end, concurrent: smtpstate's Engine against Postfix's own C load
generator, smtp-source, both sending the same number of messages of about
the same size to the same Postfix smtp-sink on loopback, in the same run,
interleaved, at concurrency 1, 10 and 100 (connections reused: the Engine
pools them, smtp-source runs with -d).

Prints messages per second and client CPU seconds per 1000 messages for
each, and the ratios. Engine CPU is user+sys of this process (submitting,
the C loop, collecting results); smtp-source CPU is that of the child
(getrusage(RUSAGE_CHILDREN) around it). The sink is another process and
counts for neither. Usage::

    python benchmarks/bench_engine.py [--messages 10000] [--rounds 3]
                                      [--concurrency 1,10,100]

Needs Postfix's smtp-sink and smtp-source (Debian: apt-get install
postfix). Note: smtp-source does not pipeline (its BUGS section says so);
the Engine pipelines MAIL/RCPT/DATA when the server offers PIPELINING, as
smtp-sink does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Tuple

import smtpstate
from smtpstate.bench import Sink

SENDER = "bench@client.test"
RCPT = "sink@example.test"
PAYLOAD = 1100                         # smtp-source -l: bytes after the headers


def find(name: str, *dirs: str) -> str:
    for d in dirs:
        path = os.path.join(d, name)
        if os.path.exists(path):
            return path
    path = shutil.which(name)
    if not path:
        raise SystemExit(f"{name} not found: apt-get install postfix")
    return path


def make_message() -> bytes:
    """Headers like smtp-source's, then PAYLOAD bytes in 80-byte lines."""
    headers = (b"From: <bench@client.test>\r\nTo: <sink@example.test>\r\n"
               b"Date: Thu, 1 Jan 2026 00:00:00 +0000\r\n"
               b"Message-Id: <bench.1@client.test>\r\n\r\n")
    line = b"La de da de da 1. " * 4 + b"La de\r\n"  # 80 bytes
    body = (line * (PAYLOAD // len(line) + 1))[:PAYLOAD - 2] + b"\r\n"
    assert len(body) == PAYLOAD
    return headers + body


def cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def run_engine(port: int, n: int, conc: int, msg: smtpstate.Message) -> Tuple[float, float]:
    c0, t0 = cpu(resource.RUSAGE_SELF), time.perf_counter()
    with smtpstate.Engine(max_connections=conc, max_per_destination=conc,
                          helo="client.test") as engine:
        for _ in range(n):
            engine.submit(msg, "127.0.0.1", port, timeout=30)
        bad = [r for r in engine.run() if not r.ok]
    wall, used = time.perf_counter() - t0, cpu(resource.RUSAGE_SELF) - c0
    if bad:
        raise SystemExit(f"Engine: {len(bad)} not delivered, e.g. {bad[0]}")
    return wall, used


def source_cmd(source: str, port: int, n: int, conc: int) -> List[str]:
    return [source, "-s", str(conc), "-m", str(n), "-l", str(PAYLOAD), "-d",
            "-M", "client.test", "-f", SENDER, "-t", RCPT, f"127.0.0.1:{port}"]


def run_source(source: str, port: int, n: int, conc: int) -> Tuple[float, float]:
    c0, t0 = cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(source_cmd(source, port, n, conc), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    wall, used = time.perf_counter() - t0, cpu(resource.RUSAGE_CHILDREN) - c0
    if proc.returncode != 0:
        raise SystemExit(f"smtp-source failed: {proc.stdout.decode(errors='replace')}")
    return wall, used


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", default="1,10,100")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    source = find("smtp-source", "/usr/sbin", "/usr/lib/postfix/sbin")
    data = make_message()
    msg = smtpstate.Message(SENDER, [RCPT], data)
    sink_server = Sink().start()
    port = sink_server.port
    best: Dict[Tuple[str, int], Tuple[float, float]] = {}
    try:
        for _ in range(args.rounds):                 # interleaved: the machine drifts
            for conc in levels:
                for name in ("Engine", "smtp-source"):
                    if name == "Engine":
                        wall, used = run_engine(port, args.messages, conc, msg)
                    else:
                        wall, used = run_source(source, port, args.messages, conc)
                    prev = best.get((name, conc))
                    if prev is None or wall < prev[0]:
                        best[(name, conc)] = (wall, used)
    finally:
        sink_server.stop()
    print(f"command: python benchmarks/bench_engine.py --messages {args.messages} "
          f"--rounds {args.rounds} --concurrency {args.concurrency}")
    print(f"peer: {' '.join(sink_server.command)}")
    print(f"C client: {' '.join(source_cmd(source, 0, args.messages, 0))[:-len(':0')]}"
          .replace(" -s 0 ", " -s CONCURRENCY ") + ":PORT")
    print(f"message: {len(data)} bytes ({PAYLOAD} after the headers), 1 recipient; "
          f"{args.messages} messages per run, best of {args.rounds} rounds")
    head = (f"{'conc':>5} {'Engine msg/s':>13} {'CPU s/1k':>9} {'smtp-source msg/s':>18} "
            f"{'CPU s/1k':>9} {'speed ratio':>12} {'CPU ratio':>10}")
    print(head)
    rows: List[Dict[str, float]] = []
    for conc in levels:
        ew, ec = best[("Engine", conc)]
        sw, sc = best[("smtp-source", conc)]
        n = args.messages
        row = {"concurrency": conc,
               "engine_msg_per_s": n / ew, "engine_cpu_s_per_1000": ec / n * 1000,
               "source_msg_per_s": n / sw, "source_cpu_s_per_1000": sc / n * 1000}
        rows.append(row)
        cpu_ratio = (ec / sc) if sc > 0 else float("inf")
        print(f"{conc:>5} {row['engine_msg_per_s']:>13.0f} {row['engine_cpu_s_per_1000']:>9.3f} "
              f"{row['source_msg_per_s']:>18.0f} {row['source_cpu_s_per_1000']:>9.3f} "
              f"{sw / ew:>11.2f}x {cpu_ratio:>9.2f}x")
    print("speed ratio: Engine msg/s over smtp-source msg/s (above 1: Engine faster); "
          "CPU ratio: Engine CPU per message over smtp-source's (below 1: Engine cheaper)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
