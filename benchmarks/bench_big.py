"""Big messages: ``smtpstate.deliver()`` of 100 KiB and 1 MiB messages to
Postfix's smtp-sink, against ``smtp-source -d -l SIZE`` in the same run.

    python benchmarks/bench_big.py                          # 5 rounds
    python benchmarks/bench_big.py --rounds 7 --sizes 102400

Each round runs, for every size, smtpstate then smtp-source (the order
alternates from round to round), against one smtp-sink. smtpstate runs
as the README shows it: ``smtpstate.deliver(messages, host, port,
concurrency=10)``, and the messages are built inside the timer, as
smtp-source builds its own. The content is realistic text: headers, then
lines of 60 to 78 octets ending in CR LF, one in 40 starting with "."
(dot-stuffed on the wire), so the body encoder does its usual work.

A third row is the floor any client pays here: one connection of this
process writing the message already encoded (dot-stuffed, with its end
line) with one ``sendall()`` after the 354, commands one at a time: the
kernel's work to copy the bytes into the socket and hand them over the
loopback, and little else.

Figures are the client's own CPU time per message (getrusage: this
process's for smtpstate, the child's for smtp-source) and messages per
second, as medians over the rounds, each with its spread (the lowest and
highest round). The ratios are medians of the per-round ratios, set
against the targets of issue 15 (CPU <= 0.5x smtp-source, msg/s >= 1.5x).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import smtpstate  # noqa: E402
from smtpstate.bench import (HELO, RECIPIENT, SENDER, Sink, cpu_children,  # noqa: E402
                             cpu_self, find_program)

CONCURRENCY = 10
CPU_TARGET = 0.5        # smtpstate CPU per message / smtp-source's, at most
RATE_TARGET = 1.5       # smtpstate msg/s / smtp-source's, at least


def make_body(size: int, seed: int = 15) -> bytes:
    """A message of exactly ``size`` octets: headers, then text lines of
    60 to 78 octets with CR LF, one in 40 starting with a dot."""
    rng = random.Random(seed)
    words = [b"the", b"message", b"body", b"of", b"a", b"newsletter", b"with",
             b"text", b"lines", b"and", b"some", b"more", b"words", b"in", b"it"]
    out = [b"From: <bench@client.test>\r\nTo: <sink@example.test>\r\n"
           b"Subject: a big message\r\nMessage-ID: <big@client.test>\r\n\r\n"]
    n = len(out[0])
    i = 0
    while n < size:
        width = rng.randint(60, 78)
        line = b"." if i % 40 == 7 else b""
        while len(line) < width:
            line += rng.choice(words) + b" "
        line = line[:width] + b"\r\n"
        out.append(line)
        n += len(line)
        i += 1
    data = b"".join(out)[:size - 2] + b"\r\n"
    assert len(data) == size
    return data


def run_deliver(port: int, n: int, data: bytes) -> Tuple[float, float]:
    """deliver() n messages built in the timer; (wall s, this process's CPU s)."""
    c0, t0 = cpu_self(), time.perf_counter()
    messages = [smtpstate.Message(SENDER, [RECIPIENT], data) for _ in range(n)]
    results = smtpstate.deliver(messages, "127.0.0.1", port, concurrency=CONCURRENCY)
    wall, cpu = time.perf_counter() - t0, cpu_self() - c0
    bad = [r for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"deliver(): {len(bad)} of {n} not delivered, e.g. {bad[0]}")
    return wall, cpu


def run_floor(port: int, n: int, data: bytes) -> Tuple[float, float]:
    """n messages over one connection, each body one sendall() of its wire
    bytes; (wall s, this process's CPU s)."""
    import socket
    lines = data[:-2].split(b"\r\n")
    wire = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n"
                    for ln in lines) + b".\r\n"
    c0, t0 = cpu_self(), time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s, s.makefile("rb") as f:
        f.readline()
        s.sendall(f"EHLO {HELO}\r\n".encode())
        while f.readline()[3:4] != b" ":
            pass
        for _ in range(n):
            s.sendall(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode())
            replies = [f.readline() for _ in range(3)]
            s.sendall(wire)
            replies.append(f.readline())
            if any(not r.startswith((b"250", b"354")) for r in replies):
                raise RuntimeError(f"floor: the sink said {replies}")
        s.sendall(b"QUIT\r\n")
    return time.perf_counter() - t0, cpu_self() - c0


def source_command(program: str, port: int, n: int, size: int) -> List[str]:
    """smtp-source -d: CONCURRENCY sessions, n messages of size body octets."""
    return [program, "-d", "-s", str(CONCURRENCY), "-m", str(n), "-l", str(size),
            "-M", HELO, "-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{port}"]


def run_source(program: str, port: int, n: int, size: int) -> Tuple[float, float]:
    """smtp-source; (wall s, its CPU s)."""
    import subprocess
    c0, t0 = cpu_children(), time.perf_counter()
    proc = subprocess.run(source_command(program, port, n, size), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wall, cpu = time.perf_counter() - t0, cpu_children() - c0
    if proc.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {proc.stdout.decode(errors='replace')[-500:]}")
    return wall, cpu


def spread(values: List[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sizes", default="102400,1048576",
                    help="message sizes in octets, comma-separated")
    ap.add_argument("--messages", default="3000,400",
                    help="messages per round for each size, comma-separated")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    counts = [int(x) for x in args.messages.split(",")]
    if len(counts) < len(sizes):
        counts += [counts[-1]] * (len(sizes) - len(counts))
    program = find_program("smtp-source")
    if program is None:
        print("smtp-source not found (apt-get install postfix)", file=sys.stderr)
        return 2
    print(f"python {' '.join(sys.argv)}")
    print(f"smtpstate {smtpstate.__version__}, {os.cpu_count()} CPUs, "
          f"concurrency {CONCURRENCY}, {args.rounds} interleaved rounds, unpinned")
    # (cpu us/msg, msg/s) per round, per (size, who)
    figs: Dict[Tuple[int, str], List[Tuple[float, float]]] = {}
    with Sink() as sink:
        for rnd in range(args.rounds):
            for size, n in zip(sizes, counts):
                data = make_body(size)
                order = ["deliver", "source", "floor"]
                if rnd % 2:
                    order.reverse()
                for who in order:
                    if who == "deliver":
                        wall, cpu = run_deliver(sink.port, n, data)
                    elif who == "source":
                        wall, cpu = run_source(program, sink.port, n, size)
                    else:
                        wall, cpu = run_floor(sink.port, n, data)
                    figs.setdefault((size, who), []).append((cpu / n * 1e6, n / wall))
            print(f"round {rnd + 1} of {args.rounds} done", file=sys.stderr)
    print()
    print(f"{'size':>9} {'client':<28} {'CPU us/msg (spread)':>26} {'msg/s (spread)':>24}")
    for size in sizes:
        for who, label in (("deliver", "smtpstate.deliver() c=10"),
                           ("source", "smtp-source -d -s 10"),
                           ("floor", "floor: sendall(), 1 conn")):
            rows = figs[(size, who)]
            cpus = [c for c, _ in rows]
            rates = [r for _, r in rows]
            print(f"{size:>9} {label:<28} {statistics.median(cpus):>10.1f} ({spread(cpus):>13})"
                  f" {statistics.median(rates):>9.0f} ({spread(rates):>12})")
        d, s = figs[(size, "deliver")], figs[(size, "source")]
        cpu_r = statistics.median(a[0] / b[0] for a, b in zip(d, s))
        rate_r = statistics.median(a[1] / b[1] for a, b in zip(d, s))
        print(f"{size:>9} ratio: CPU {cpu_r:.2f}x smtp-source (target <= {CPU_TARGET}x: "
              f"{'met' if cpu_r <= CPU_TARGET else 'missed'}), msg/s {rate_r:.2f}x "
              f"(target >= {RATE_TARGET}x: {'met' if rate_r >= RATE_TARGET else 'missed'})")
        f = figs[(size, "floor")]
        floor_r = statistics.median(a[0] / b[0] for a, b in zip(f, s))
        print(f"{size:>9} the floor's CPU is {floor_r:.2f}x smtp-source's; deliver() spends "
              f"{statistics.median(a[0] - b[0] for a, b in zip(d, f)):.0f} us/msg above it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
