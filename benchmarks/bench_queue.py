"""Delivery through the broker (smtpstate.queue) against direct delivery
(smtpstate.Engine), to the same Postfix smtp-sink, in one run.

    python benchmarks/bench_queue.py                  # 5 rounds of 5000 messages
    python benchmarks/bench_queue.py --rounds 7 --messages 10000 --json out.json
    python benchmarks/bench_queue.py --broker redis   # a private redis-server instead

Peers, all started here on loopback and stopped at the end: a private
RabbitMQ node (tests/brokers.py's RabbitServer: its own node name, ports
and database; or its RedisServer with ``--broker redis``) and Postfix's
``smtp-sink`` (smtpstate.bench.Sink). The message is the benchmark's
1141 bytes (smtpstate.bench.make_message()), one recipient.

Every round runs, in an order rotated from round to round (so that a busy
minute of a shared machine does not always hit the same one):

direct    ``smtpstate.deliver(messages, "127.0.0.1", port, concurrency=
          CONNECTIONS)`` in a fresh process (this file with ``--direct``):
          the same N Message objects enqueue() gets, made before the
          clock as they are for enqueue(); wall and CPU (getrusage of that
          process) around the call; every result checked.
broker/P  for P = 1 and 2 worker processes, on a fresh queue:
          enqueue  ``queue.enqueue()`` of the N messages from this process
                   (each job confirmed by the broker); msg/s = N / its wall.
          deliver  then ``smtpstate worker --processes P`` (the CLI) with
                   CONNECTIONS connections per process. The clock starts
                   when the first process logs "worker consuming" (after
                   its imports, connection and queue declarations) and
                   stops at the latest ``finished`` time of the N results
                   (the moment the last one was published). CPU: user+sys
                   of the worker processes (/proc/PID/stat) from the moment
                   every process logged "worker consuming" to the moment
                   the N-th result is on the results queue, and the part
                   of it in threads other than the main one, i.e. the
                   Engine's (/proc/PID/task); the
                   broker's own CPU (its beam.smp or redis-server) over
                   the same span. Every result is read back and checked: N results,
                   one per job, all delivered.

Figures are medians of the rounds (never the best round), with the spread
(1 - min/max). Ratios compare figures of the same run: "per core" is
direct CPU per message / worker CPU per message (the share of direct
delivery's rate that one busy core of workers reaches), and "per process"
is broker msg/s / P / direct msg/s (wall; on 2 CPUs shared with the
broker and the sink, the wall figure of 2 processes is bounded by the
machine, not by the workers).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
# The private brokers of the test suite (tests/brokers.py), not a copy.
sys.path.insert(0, os.path.join(ROOT, "tests"))

import smtpstate  # noqa: E402
from smtpstate import queue as sq  # noqa: E402
from smtpstate.bench import HELO, RECIPIENT, SENDER, Sink, make_message  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a running process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK   # utime, stime


def engine_cpu(pids: List[int]) -> float:
    """CPU seconds of the threads other than the main one of these
    processes: a worker's Engine thread (it has no other busy one; the
    main thread does the broker, the jobs and the results)."""
    total = 0.0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            if tid == str(pid):                         # the main thread
                continue
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def children(pid: int) -> List[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def message_data(kib: int) -> bytes:
    """The benchmark message (smtpstate.bench.make_message(), 1141 bytes),
    or with ``kib`` > 0 the same headers and a body of ``kib`` KiB in
    80-byte lines."""
    data = make_message()
    if kib <= 0:
        return data
    headers = data.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    line = b"x" * 78 + b"\r\n"
    return headers + line * (kib * 1024 // len(line))


def bench_messages(n: int, kib: int) -> List[smtpstate.Message]:
    """N separate messages, as a program that sends N mails has them."""
    data = message_data(kib)
    return [smtpstate.Message(SENDER, [RECIPIENT], data) for _ in range(n)]


def direct_child(port: int, n: int, conns: int, kib: int) -> int:
    """The direct figure, in this (fresh) process: prints wall and CPU."""
    messages = bench_messages(n, kib)
    c0, t0 = os.times(), time.perf_counter()
    results = smtpstate.deliver(messages, "127.0.0.1", port, concurrency=conns, helo=HELO,
                                timeout=60)
    wall, c1 = time.perf_counter() - t0, os.times()
    bad = [r for r in results if not r.ok]
    if bad:
        raise SystemExit(f"deliver(): {len(bad)} of {n} not delivered, e.g. {bad[0]}")
    print(json.dumps({"wall": wall, "cpu": (c1.user + c1.system) - (c0.user + c0.system)}))
    return 0


def measure_direct(port: int, n: int, conns: int, kib: int,
                   env: Dict[str, str]) -> Dict[str, float]:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--direct", str(port),
                           str(n), str(conns), str(kib)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"direct delivery failed: {proc.stderr.decode(errors='replace')[-1500:]}")
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


class Broker:
    """The private broker: its URL, and its server process for CPU."""

    def __init__(self, kind: str) -> None:
        from brokers import RabbitServer, RedisServer
        self.kind = kind
        self.server: Any = RabbitServer() if kind == "rabbitmq" else RedisServer()

    def start(self) -> "Broker":
        self.server.start()
        return self

    @property
    def url(self) -> str:
        return str(self.server.url)

    def pid(self) -> Optional[int]:
        if self.kind == "redis":
            return int(self.server.proc.pid)
        try:                                   # the node (beam.smp) writes its pid
            with open(os.path.join(self.server.root, "pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def cpu(self) -> float:
        pid = self.pid()
        return proc_cpu(pid) if pid else 0.0

    def stop(self) -> None:
        self.server.stop()


def count_results(url: str, queue: str) -> int:
    """Broker messages waiting on ``queue``.results (a result each, or a
    batch of them), without taking any."""
    if url.startswith("redis"):                     # a plain list (smtpstate/_redis_queue.py)
        import redis
        with redis.Redis.from_url(url) as r:
            return int(r.llen(queue + ".results"))
    import kombu
    with kombu.Connection(url) as conn:
        q = sq._queue(conn, queue + ".results")(conn.default_channel)
        try:
            _, count, _ = q.queue_declare(passive=True)
        except conn.channel_errors:          # the workers have not declared it yet
            return 0
        return int(count)


def measure_broker(broker: Broker, port: int, n: int, conns: int, processes: int,
                   env: Dict[str, str], prefetch: Optional[int], batch: int,
                   encoding: str, kib: int) -> Dict[str, float]:
    queue = f"bench-{processes}-{uuid.uuid4().hex[:8]}"
    messages = bench_messages(n, kib)
    b0 = broker.cpu()
    t0 = time.perf_counter()
    c0 = os.times()
    # batch= only when batching, so that this file also measures a tree
    # from before enqueue() had it (one job per broker message).
    extra: Dict[str, Any] = {"batch": batch} if batch > 1 else {}
    if encoding != "json":
        extra["encoding"] = encoding
    ids = sq.enqueue(messages, broker.url, queue, host="127.0.0.1", port=port, timeout=60,
                     **extra)
    c1 = os.times()
    enqueue_wall = time.perf_counter() - t0
    enqueue_cpu = (c1.user + c1.system) - (c0.user + c0.system)
    enqueue_broker = broker.cpu() - b0

    cmd = [sys.executable, "-m", "smtpstate", "worker", "--broker", broker.url, "--queue", queue,
           "--processes", str(processes), "--max-connections", str(conns),
           "--max-per-destination", str(conns), "--helo", HELO]
    if prefetch:
        cmd += ["--prefetch", str(prefetch)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)
    started: List[float] = []
    log: List[str] = []
    ready = threading.Event()

    def read_log() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace")
            log.append(line)
            if "worker consuming" in line:
                started.append(time.time())
                if len(started) == processes:
                    ready.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        if not ready.wait(120):
            raise SystemExit("the workers did not start:\n" + "".join(log[-30:]))
        pids = [proc.pid] if processes == 1 else children(proc.pid)
        w0, e0 = sum(proc_cpu(p) for p in pids), engine_cpu(pids)
        b0 = broker.cpu()
        deadline = time.monotonic() + 900
        # Result messages: one per job, or one per batch (every job of a
        # batch to the sink ends at its first attempt).
        want = n if batch == 1 else -(-n // batch)
        while count_results(broker.url, queue) < want:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the workers stopped or stalled:\n" + "".join(log[-30:]))
            time.sleep(0.1)
        worker_cpu = sum(proc_cpu(p) for p in pids) - w0
        engine_thread = engine_cpu(pids) - e0
        broker_cpu = broker.cpu() - b0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(5)
    results = list(sq.read_results(broker.url, queue, timeout=5, limit=n + 1))
    jobs = {r["job"] for r in results}
    bad = [r for r in results if r["status"] != "delivered"]
    if len(results) != n or jobs != set(ids) or bad:
        raise SystemExit(f"broker/{processes}: {len(results)} results for {n} jobs "
                         f"({len(jobs & set(ids))} matching), {len(bad)} not delivered"
                         + (f", e.g. {bad[0]}" if bad else ""))
    wall = max(r["finished"] for r in results) - started[0]
    return {"enqueue_wall": enqueue_wall, "enqueue_cpu": enqueue_cpu,
            "enqueue_broker_cpu": enqueue_broker, "wall": wall, "cpu": worker_cpu,
            "engine_cpu": engine_thread, "broker_cpu": broker_cpu}


def med(xs: List[float]) -> float:
    return statistics.median(xs)


def spread(xs: List[float]) -> float:
    return 1 - min(xs) / max(xs) if xs and max(xs) > 0 else 0.0


def main() -> int:
    if sys.argv[1:2] == ["--direct"]:
        port, n, conns, kib = map(int, sys.argv[2:6])
        return direct_child(port, n, conns, kib)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=10,
                    help="SMTP connections of the Engine and of each worker process")
    ap.add_argument("--prefetch", type=int, default=0,
                    help="the workers' --prefetch (default: theirs, twice --connections)")
    ap.add_argument("--batch", type=int, default=100,
                    help="jobs per broker message (enqueue(batch=)); 1: one each")
    ap.add_argument("--encoding", choices=("json", "msgpack"), default="json",
                    help="the jobs' encoding (enqueue(encoding=))")
    ap.add_argument("--kib", type=int, default=0,
                    help="a body of this many KiB instead of the 1141-byte message")
    ap.add_argument("--broker", choices=("rabbitmq", "redis"), default="rabbitmq")
    ap.add_argument("--json", metavar="FILE", help="write every round's raw figures here")
    args = ap.parse_args()
    n = args.messages
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [
        p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    command = (f"python benchmarks/bench_queue.py --messages {n} --rounds {args.rounds} "
               f"--connections {args.connections} --batch {args.batch} --encoding {args.encoding} "
               f"--broker {args.broker}"
               + (f" --kib {args.kib}" if args.kib else "")
               + (f" --prefetch {args.prefetch}" if args.prefetch else ""))
    print(f"$ {command}")
    configs: List[Tuple[str, int]] = [("direct", 0), ("broker/1", 1), ("broker/2", 2)]
    raw: Dict[str, List[Dict[str, float]]] = {c: [] for c, _ in configs}
    broker = Broker(args.broker).start()
    sink = Sink().start()
    try:
        for r in range(args.rounds):
            k = r % len(configs)
            for label, procs in configs[k:] + configs[:k]:
                if procs == 0:
                    out = measure_direct(sink.port, n, args.connections, args.kib, env)
                else:
                    out = measure_broker(broker, sink.port, n, args.connections, procs, env,
                                         args.prefetch or None, args.batch, args.encoding,
                                         args.kib)
                raw[label].append(out)
                extra = (f"  enqueue {n / out['enqueue_wall']:6.0f} msg/s" if procs else "")
                print(f"  round {r + 1} {label:9s} {n / out['wall']:8.0f} msg/s "
                      f"{out['cpu'] / n * 1e6:7.1f} us CPU/msg{extra}", file=sys.stderr)
    finally:
        sink.stop()
        broker.stop()

    def rate(label: str, key: str = "wall") -> float:
        return n / med([o[key] for o in raw[label]])

    def us(label: str, key: str = "cpu") -> float:
        return med([o[key] for o in raw[label]]) / n * 1e6

    print(f"{n} messages of {len(message_data(args.kib))} bytes, 1 recipient, {args.connections} "
          f"connections per process, smtp-sink; {args.broker} (private node), {args.batch} "
          f"job(s) per broker message in {args.encoding}; medians of "
          f"{args.rounds} interleaved rounds, spread = 1 - min/max")
    print(f"{'figure':34s} {'msg/s':>8s} {'spread':>6s} {'CPU us/msg':>10s} {'spread':>6s} "
          f"{'broker us/msg':>13s}")
    rows = [("direct deliver()", "direct", "wall", "cpu", None)]
    for label, procs in configs[1:]:
        rows.append((f"enqueue() ({label} rounds)", label, "enqueue_wall", "enqueue_cpu",
                     "enqueue_broker_cpu"))
        rows.append((f"worker --processes {procs}", label, "wall", "cpu", "broker_cpu"))
    for name, label, wk, ck, bk in rows:
        walls = [o[wk] for o in raw[label]]
        cpus = [o[ck] for o in raw[label]]
        btext = f"{us(label, bk):13.1f}" if bk else f"{'':13s}"
        print(f"{name:34s} {rate(label, wk):8.0f} {spread(walls):6.0%} {us(label, ck):10.1f} "
              f"{spread(cpus):6.0%} {btext}")
    direct_rate, direct_us = rate("direct"), us("direct")
    summary: Dict[str, Any] = {"command": command, "messages": n, "rounds": args.rounds,
                               "connections": args.connections, "broker": args.broker,
                               "batch": args.batch, "encoding": args.encoding,
                               "bytes": len(message_data(args.kib)),
                               "direct": {"msg_s": direct_rate, "cpu_us": direct_us}}
    for label, procs in configs[1:]:
        per_core = direct_us / us(label)
        per_proc = rate(label) / procs / direct_rate
        print(f"worker --processes {procs}: per core {per_core:.0%} of direct (CPU per "
              f"message), per process {per_proc:.0%} of direct msg/s (target >= 50% per "
              f"core: {'met' if per_core >= 0.5 else 'MISSED'})")
        print(f"worker --processes {procs}: of its {us(label):.1f} us CPU per message, "
              f"{us(label, 'engine_cpu'):.1f} in the Engine thread, the rest in the main "
              f"thread (broker, jobs, results)")
        summary[label] = {"msg_s": rate(label), "cpu_us": us(label),
                          "engine_thread_cpu_us": us(label, "engine_cpu"),
                          "broker_cpu_us": us(label, "broker_cpu"),
                          "enqueue_msg_s": rate(label, "enqueue_wall"),
                          "enqueue_cpu_us": us(label, "enqueue_cpu"),
                          "enqueue_broker_cpu_us": us(label, "enqueue_broker_cpu"),
                          "per_core": per_core, "per_process": per_proc}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "rounds": raw}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
