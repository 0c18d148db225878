"""What the first TLS policy of a process costs, and the first send with
it: the cold start that TLS by default added (the system CA store parsed
by the first policy, docs/tls.md), measured in fresh processes.

Usage (each TREE a source tree with its extension built in place,
``python smtpstate/_build.py``; default: this one)::

    python benchmarks/tls_cold_start.py [--rounds 11] [TREE ...]

Two measurements, each a process of its own that imports smtpstate from
TREE (its working directory):

policy  ``smtpstate.Options().tls_config()``: the default options
        (opportunistic TLS to a named host) and their C policy;
send    ``Client(...)`` and one message over opportunistic STARTTLS to
        benchmarks/tls_sink.py on 127.0.0.1 (trustme certificate), the
        default level.

For each: the milliseconds from after ``import smtpstate`` to the end
(in the process), and the process's wall time (start-up and import
included), medians of ROUNDS. Trees are measured in turn within each
round, the first alternating, so that two trees (before and after a
change) see the same machine. Needs aiosmtpd and trustme
(``pip install '.[bench]'``).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))

POLICY = r'''
import time
import smtpstate
t = time.perf_counter()
smtpstate.Options().tls_config()
print((time.perf_counter() - t) * 1e3)
'''

SEND = r'''
import sys, time
import smtpstate
t = time.perf_counter()
with smtpstate.Client("127.0.0.1", int(sys.argv[1]), timeout=10, helo="bench.example") as c:
    r = c.send(smtpstate.Message("a@example.test", ["b@example.test"],
                                 b"Subject: cold\r\n\r\nstart\r\n"))
    assert r.status == "delivered" and c.tls_version, r
print((time.perf_counter() - t) * 1e3)
'''


def run_once(tree: str, code: str, *args: str) -> Tuple[float, float]:
    """(in-process ms, wall ms) of one fresh process."""
    import time

    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=tree, check=True,
                         capture_output=True, text=True).stdout
    return float(out.split()[0]), (time.perf_counter() - t) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("trees", nargs="*", default=[os.path.dirname(HERE)])
    args = p.parse_args()
    import trustme

    ca = trustme.CA()
    with tempfile.TemporaryDirectory() as d:
        pem = os.path.join(d, "sink.pem")
        ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(pem)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        sink = subprocess.Popen([sys.executable, os.path.join(HERE, "tls_sink.py"), str(port),
                                 pem, pem], stdout=subprocess.PIPE, text=True)
        try:
            if sink.stdout is None or sink.stdout.readline().strip() != "ready":
                raise SystemExit("tls_sink.py did not start")
            got: Dict[Tuple[str, str], List[Tuple[float, float]]] = {}
            for i in range(args.rounds):
                trees = args.trees if i % 2 == 0 else list(reversed(args.trees))
                for tree in trees:
                    got.setdefault((tree, "policy"), []).append(run_once(tree, POLICY))
                    got.setdefault((tree, "send"), []).append(run_once(tree, SEND, str(port)))
        finally:
            sink.send_signal(signal.SIGTERM)
            sink.wait()
    for what in ("policy", "send"):
        for tree in args.trees:
            xs = got[(tree, what)]
            print(f"{what:6}  {statistics.median(x[0] for x in xs):6.1f} ms after import, "
                  f"process {statistics.median(x[1] for x in xs):6.1f} ms  "
                  f"(median of {len(xs)})  {tree}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
