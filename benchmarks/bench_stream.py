"""A million messages from a generator through smtpstate.deliver_iter() to
Postfix's smtp-sink: messages per second and peak memory, against
deliver() of the same messages built as a list.

    python benchmarks/bench_stream.py                       # 1,000,000 messages
    python benchmarks/bench_stream.py --messages 100000 --concurrency 10

Each run is a fresh process (this script with ``--child``), so that its
peak RSS (VmHWM) counts that run alone; the growth is the peak minus the
peak before the first message was made. Three runs:

- ``deliver_iter`` with the default window (4 per connection);
- ``deliver_iter`` with a window 100 times larger: the difference between
  the two peaks, divided by the difference between the windows, is what
  one more pending message costs (the engine's fixed part cancels out);
- ``deliver()`` of the same messages built as a list first, as deliver()
  needs them: only when that fits in half the memory available (at about
  5 KiB a message, measured), otherwise on as many as fit, and said so.

Every message is different (its number in the Subject), about 1.1 KiB,
the message of benchmarks/run.py; the time includes making the messages,
which a real stream pays too. smtp-sink runs without -d (no dump files).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any, Dict, Iterator, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import smtpstate  # noqa: E402
from smtpstate.bench import RECIPIENT, SENDER, Sink, make_message  # noqa: E402

# What deliver() holds per message (the Message, its bytes and C envelope,
# its Ticket and Result), measured at 100,000 messages on this machine
# while the engine still copied the bytes: about 5 KiB; 6 leaves room.
_LIST_KIB_PER_MESSAGE = 6


def peak_kib() -> int:
    """This process's peak resident set size so far, KiB (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def available_kib() -> int:
    """MemAvailable, KiB."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def messages(n: int) -> Iterator[smtpstate.Message]:
    """n different messages, made as they are asked for."""
    body = make_message()
    head, sep, rest = body.partition(b"Subject: smtpstate benchmark")
    assert sep, "the benchmark message has no Subject line to number"
    for i in range(n):
        yield smtpstate.Message(SENDER, [RECIPIENT],
                                b"%sSubject: smtpstate stream %d%s" % (head, i, rest))


def child(kind: str, port: int, n: int, concurrency: int, window: Optional[int]) -> Dict[str, Any]:
    """One run, in this process: its figures."""
    start = peak_kib()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    delivered = 0
    if kind == "stream":
        for r in smtpstate.deliver_iter(messages(n), "127.0.0.1", port, window=window,
                                        concurrency=concurrency, timeout=60):
            if r.status == "delivered":
                delivered += 1
    else:
        batch = list(messages(n))
        results = smtpstate.deliver(batch, "127.0.0.1", port, concurrency=concurrency,
                                    timeout=60)
        delivered = sum(r.status == "delivered" for r in results)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    return {"kind": kind, "messages": n, "delivered": delivered, "window": window,
            "wall": wall, "cpu": cpu, "growth_kib": peak_kib() - start,
            "message_bytes": len(next(messages(1)).data)}


def run_child(kind: str, port: int, n: int, concurrency: int,
              window: Optional[int]) -> Dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--port", str(port),
           "--messages", str(n), "--concurrency", str(concurrency)]
    if window is not None:
        cmd += ["--window", str(window)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} run failed: {proc.stderr.decode(errors='replace')[-1500:]}")
    out: Dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    if out["delivered"] != n:
        raise SystemExit(f"{kind} run: {out['delivered']} of {n} messages delivered")
    return out


def row(label: str, r: Dict[str, Any], note: str = "") -> str:
    return (f"{label:24s} {r['messages']:9d} {r['wall']:8.1f} {r['messages'] / r['wall']:8.0f} "
            f"{r['cpu'] / r['messages'] * 1e6:8.1f} {r['growth_kib'] / 1024:10.1f}  {note}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--window", type=int, default=None,
                    help="deliver_iter's window (default: its own, 4 per connection)")
    ap.add_argument("--no-deliver", action="store_true", help="skip the deliver() list run")
    ap.add_argument("--child", choices=("stream", "list"), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.port, args.messages, args.concurrency,
                               args.window)))
        return 0

    n, conc = args.messages, args.concurrency
    small = args.window if args.window is not None else 4 * conc
    large = 100 * small
    print(f"$ python benchmarks/bench_stream.py --messages {n} --concurrency {conc}"
          + (f" --window {args.window}" if args.window is not None else "")
          + (" --no-deliver" if args.no_deliver else ""))
    print(f"machine: {os.cpu_count()} CPUs (shared), Python {sys.version.split()[0]}, "
          f"smtp-sink {' '.join(Sink().command)}")
    runs = []
    with Sink() as sink:
        print(f"  deliver_iter, window {small} ...", file=sys.stderr, flush=True)
        runs.append(("deliver_iter w=%d" % small, run_child("stream", sink.port, n, conc, small), ""))
        print(f"  deliver_iter, window {large} ...", file=sys.stderr, flush=True)
        runs.append(("deliver_iter w=%d" % large, run_child("stream", sink.port, n, conc, large), ""))
        if not args.no_deliver:
            fits = available_kib() // 2 // _LIST_KIB_PER_MESSAGE
            m = min(n, fits)
            note = "" if m == n else f"(only {m}: {n} would not fit in half the free memory)"
            print(f"  deliver() of a list of {m} ...", file=sys.stderr, flush=True)
            runs.append(("deliver() of a list", run_child("list", sink.port, m, conc, None), note))
    print(f"{'':24s} {'messages':>9s} {'wall s':>8s} {'msg/s':>8s} {'CPU us':>8s} "
          f"{'peak MiB':>10s}  (peak: VmHWM growth of the run's process)")
    for label, r, note in runs:
        print(row(label, r, note))
    a, b = runs[0][1], runs[1][1]
    size = a["message_bytes"]
    print(f"deliver_iter w={small}: peak growth / window = "
          f"{a['growth_kib'] / small:.1f} KiB (engine's fixed part included)")
    # A pending message's bytes are held once: the Python bytes (the
    # Result hands the Message back), which the engine's C message refers
    # to rather than copies (smtps_message_set_body_fixed()).
    per = (b["growth_kib"] - a["growth_kib"]) / (large - small)
    rest = per - size / 1024
    print(f"per pending message, (peak(w={large}) - peak(w={small})) / {large - small}: "
          f"{per:.2f} KiB = {size / 1024:.2f} KiB of message bytes (Python's, shared "
          f"with the engine) + {rest:.2f} KiB")
    print(f"target <= 2 KiB + the message bytes in flight: "
          f"{'met' if rest <= 2 else 'MISSED'} ({rest:.2f} KiB)")
    if len(runs) > 2:
        c = runs[2][1]
        print(f"deliver() of a list: {c['growth_kib'] / c['messages']:.2f} KiB per message "
              f"held; deliver_iter w={small} peak is "
              f"{a['growth_kib'] / c['growth_kib'] * 100:.2f}% of it"
              + ("" if c["messages"] == n else f" (at {c['messages']} messages)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
