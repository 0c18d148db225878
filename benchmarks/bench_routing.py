"""Routing by MX, measured: what a routed message costs against the same
message sent to a fixed host, and whether a cold start with many domains
delivers before its lookups are done.

Usage (from the source tree, with the package built or installed)::

    python benchmarks/bench_routing.py [--rounds 5] [--messages 50000]
                                       [--domains 1000] [--sites 5]
                                       [--concurrency 10] [--only warm,cold]
                                       [--json FILE]

warm  CPU per message (user+sys of the client process) and msg/s of the
      Engine routing by MX against the same Engine sending the same
      messages to a fixed host, ``submit(msg, "127.0.0.1", port)``. Both
      send one message per recipient domain, the domains in turn: DOMAINS
      domains over SITES sites, each site one MX host name, every MX host
      an A record 127.0.0.1, where one Postfix smtp-sink listens (the
      port of every MX host is given to submit(), as on the Internet every
      MX listens on 25). DNS: libunbound's local records
      (``Resolver(local_records=[...])``, no server). "Warm": each run
      first sends one message per domain through the same Engine, in the
      same way (which resolves every domain and MX host, and opens the
      connections), then the measured batch of MESSAGES. Same Engine
      settings for both: ``max_connections`` and ``max_per_destination``
      = CONCURRENCY, the same resolver. Target: routed CPU per message
      <= 1.15x fixed.
cold  a fresh Engine whose Resolver asks a private NSD (tests/dns_server.py)
      serving the DOMAINS domains' MX records, nothing cached: one message
      per domain submitted, then run. Measured: when the first result
      came (in the client), and when NSD had received the last MX query,
      observed by polling NSD's count of MX queries (``num.type.MX`` of
      ``nsd-control stats_noreset``, ~10-30 ms a poll) from another
      process: the last MX query arrived after the start of the last
      poll that counted fewer than there are domains (some domain's was
      still to come), and before the end of the first poll that counted
      them all. Target: the first result before the former (a domain is
      resolved only once NSD's answer to it is back, later still).

Every run is a process of its own (this file with ``--child``), pinned
like benchmarks/run.py's "split" placement: the peers (smtp-sink, NSD,
the poller) on one CPU, the client on another. Routed and fixed runs are
interleaved, the first of each round alternating; each figure is the
median of the rounds, spread = 1 - min/max over them, and the ratio is
also given per round (routed over the fixed run of the same round).
Needs Postfix's smtp-sink; cold also NSD (Debian packages postfix, nsd).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
try:
    import smtpstate
except ImportError:                             # a source tree built in place
    sys.path.insert(0, ROOT)
    import smtpstate

from smtpstate.bench import (HELO, SENDER, Progress, Sink, cpu_self,  # noqa: E402
                             find_program, make_message, raise_nofile)

PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(smtpstate.__file__)))
ZONE = "route-bench.test"
TTL = 3600                                      # longer than any run: warm stays warm
TARGET_CPU_RATIO = 1.15


# -- the world: domains, sites, records ---------------------------------------

def domain(i: int) -> str:
    return f"d{i:04d}.{ZONE}"


def mx_host(site: int) -> str:
    return f"mx{site}.{ZONE}"


def site_of(i: int, sites: int) -> int:
    """Domains go to the sites in turn: domain i to site i % sites."""
    return i % sites


def records(domains: int, sites: int) -> List[str]:
    """Zone-file lines: each domain's MX, each MX host's A record."""
    out = [f"{mx_host(s)}. {TTL} A 127.0.0.1" for s in range(sites)]
    out += [f"{domain(i)}. {TTL} MX 10 {mx_host(site_of(i, sites))}." for i in range(domains)]
    return out


def messages(domains: int, data: bytes) -> List[smtpstate.Message]:
    """One message per domain: the benchmark message, one recipient."""
    return [smtpstate.Message(SENDER, [f"bench@{domain(i)}"], data) for i in range(domains)]


MTA_STS = True          # --mta-sts: Engine(mta_sts=True) or None


def split_cpus() -> Tuple[Optional[List[int]], Optional[List[int]]]:
    """(peer CPUs, client CPUs) as run.py's "split": None on one CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    return ([cpus[1]], [cpus[0]]) if len(cpus) >= 2 else (None, None)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> float:
    """1 - min/max over the rounds, 0..1 (run.py's spread)."""
    return 1 - min(values) / max(values) if values and max(values) > 0 else 0.0


# -- the client runs (in processes of their own) --------------------------------

def _check_routed(results: List[Any], sites: int) -> None:
    """Every message delivered, each to its domain's MX host."""
    for r in results:
        rc = r.recipients[0]
        i = int(rc.address.split("@d", 1)[1].split(".", 1)[0])
        want = mx_host(site_of(i, sites))
        if not r.ok or rc.mx != want or rc.ip != "127.0.0.1":
            raise RuntimeError(f"{rc.address}: {r.status} via {rc.mx}[{rc.ip}], wanted "
                               f"{want}[127.0.0.1]: {r.reason or r.reply}")


def child_warm(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One warm run: warm-up batch (not measured), then the measured one."""
    data = make_message()
    domains, sites, n, conc = spec["domains"], spec["sites"], spec["n"], spec["conc"]
    port, routed = spec["port"], spec["mode"] == "routed"
    msgs = messages(domains, data)
    resolver = smtpstate.Resolver(local_records=records(domains, sites))
    engine = smtpstate.Engine(max_connections=conc, max_per_destination=conc, helo=HELO,
                              resolver=resolver, mta_sts=spec["mta_sts"] or None)
    # Warm-up: one message per domain, the same way as measured.
    for msg in msgs:
        if routed:
            engine.submit(msg, port=port, timeout=60)
        else:
            engine.submit(msg, "127.0.0.1", port, timeout=60)
    warm = list(engine.run())
    if routed:
        _check_routed(warm, sites)
    elif not all(r.ok for r in warm):
        raise RuntimeError(f"warm-up not delivered: {[r for r in warm if not r.ok][0]}")
    del warm
    bad = 0
    first = None
    c0, t0 = cpu_self(), time.perf_counter()
    if routed:
        for i in range(n):
            engine.submit(msgs[i % domains], port=port, timeout=60)
    else:
        for i in range(n):
            engine.submit(msgs[i % domains], "127.0.0.1", port, timeout=60)
    for r in engine.run():
        if not r.ok:
            bad += 1
            first = first or r
    wall, cpu = time.perf_counter() - t0, cpu_self() - c0
    connections = engine.connections
    engine.close()
    if bad:
        raise RuntimeError(f"{bad} of {n} not delivered, e.g. {first}")
    return {"wall": wall, "cpu": cpu, "connections": connections}


def child_cold(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One cold start: a fresh Engine asking NSD, one message per domain.
    Times are time.time(), the clock of the kernel's packet timestamps."""
    data = make_message()
    domains, sites, conc, port = spec["domains"], spec["sites"], spec["conc"], spec["port"]
    msgs = messages(domains, data)
    engine = smtpstate.Engine(max_connections=conc, max_per_destination=conc, helo=HELO,
                              resolver=smtpstate.Resolver([spec["nameserver"]]),
                              mta_sts=spec["mta_sts"] or None)
    results = []
    t_submit = time.time()
    for msg in msgs:
        engine.submit(msg, port=port, timeout=60)
    t_run = time.time()
    t_first = None
    for r in engine.run():
        if t_first is None:
            t_first = time.time()
        results.append(r)
    t_last = time.time()
    engine.close()
    _check_routed(results, sites)
    return {"submit": t_submit, "run": t_run, "first": t_first, "last": t_last,
            "results": len(results)}


def _child_main(spec: Dict[str, Any]) -> int:
    if spec.get("cpus") is not None:
        os.sched_setaffinity(0, spec["cpus"])
    raise_nofile()
    out = child_warm(spec) if spec["kind"] == "warm" else child_cold(spec)
    print(json.dumps(out))
    return 0


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [PKG_PARENT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _spawn(spec: Dict[str, Any]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child",
                             json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env())


def _finish(proc: subprocess.Popen, what: str, timeout: float = 900) -> Dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed: {err.decode(errors='replace')[-1500:]}")
    return json.loads(out.decode().strip().splitlines()[-1])


# -- warm: routed against fixed ------------------------------------------------

def warm(rounds: int, n: int, domains: int, sites: int, conc: int,
         progress: Optional[Progress] = None) -> Dict[str, Any]:
    """Routed and fixed runs, interleaved (the first alternating by round)."""
    sink_cpus, client_cpus = split_cpus()
    runs: Dict[str, List[Dict[str, Any]]] = {"routed": [], "fixed": []}
    with Sink(cpus=sink_cpus) as sink:
        for k in range(rounds):
            order = ("routed", "fixed") if k % 2 == 0 else ("fixed", "routed")
            for mode in order:
                if progress:
                    progress.step(f"routing warm {mode} round {k + 1}")
                spec = {"kind": "warm", "mode": mode, "mta_sts": MTA_STS, "port": sink.port, "n": n, "conc": conc,
                        "domains": domains, "sites": sites, "cpus": client_cpus}
                runs[mode].append(_finish(_spawn(spec), f"warm {mode}"))
    out: Dict[str, Any] = {"messages": n, "domains": domains, "sites": sites,
                           "concurrency": conc, "sink": " ".join(Sink().command),
                           "placement": {"peers": sink_cpus, "client": client_cpus}}
    for mode, rs in runs.items():
        cpus = [r["cpu"] / n * 1e6 for r in rs]
        rates = [n / r["wall"] for r in rs]
        out[mode] = {"cpu_us": cpus, "msg_per_s": rates,
                     "connections": [r["connections"] for r in rs],
                     "cpu_us_median": median(cpus), "cpu_spread": spread(cpus),
                     "msg_per_s_median": median(rates), "rate_spread": spread(rates)}
    paired = [a / b for a, b in zip(out["routed"]["cpu_us"], out["fixed"]["cpu_us"])]
    out["cpu_ratio"] = out["routed"]["cpu_us_median"] / out["fixed"]["cpu_us_median"]
    out["cpu_ratio_rounds"] = paired
    out["cpu_ratio_rounds_median"] = median(paired)
    out["rate_ratio"] = out["routed"]["msg_per_s_median"] / out["fixed"]["msg_per_s_median"]
    out["target_met"] = out["cpu_ratio"] <= TARGET_CPU_RATIO
    return out


# -- cold: first delivery against the last MX answer ----------------------------

def _dns_server() -> Any:
    """tests/dns_server.py's DnsServer (the private NSD of the test suite)."""
    tests = os.path.join(ROOT, "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from dns_server import DnsServer
    return DnsServer


def _pin_group(dns: Any, cpus: Optional[List[int]]) -> None:
    """NSD's processes (and those it forks later, which inherit it) on cpus."""
    if cpus is None or dns.proc is None:
        return
    for pid in dns._group_pids(dns.proc.pid):
        try:
            os.sched_setaffinity(pid, cpus)
        except OSError:                          # gone meanwhile (a reload's)
            pass


def _mx_queries(dns: Any) -> int:
    """MX queries NSD received since it started (``num.type.MX``)."""
    return int(dns.stats().get("num.type.MX", 0))


def cold(rounds: int, domains: int, sites: int, conc: int,
         progress: Optional[Progress] = None) -> Dict[str, Any]:
    """Cold starts against the private NSD, observed by polling its count
    of MX queries from this process while the client runs."""
    DnsServer = _dns_server()
    peer_cpus, client_cpus = split_cpus()
    saved = os.sched_getaffinity(0)
    rows: List[Dict[str, Any]] = []
    dns = DnsServer().start()
    try:
        if peer_cpus is not None:
            os.sched_setaffinity(0, peer_cpus)   # the observer with the peers
        _pin_group(dns, peer_cpus)
        dns.add_zone(ZONE, records(domains, sites), ttl=TTL)
        with Sink(cpus=peer_cpus) as sink:
            for k in range(rounds):
                if progress:
                    progress.step(f"routing cold round {k + 1}")
                base = _mx_queries(dns)
                spec = {"kind": "cold", "mta_sts": MTA_STS, "port": sink.port, "conc": conc, "domains": domains,
                        "sites": sites, "nameserver": dns.address, "cpus": client_cpus}
                proc = _spawn(spec)
                polls: List[Tuple[float, float, int]] = []
                while proc.poll() is None:
                    a = time.time()
                    q = _mx_queries(dns) - base
                    polls.append((a, time.time(), q))
                child = _finish(proc, "cold start")
                total = _mx_queries(dns) - base
                if total != domains:
                    raise RuntimeError(f"NSD counted {total} MX queries for {domains} domains")
                rows.append(_polled_row(child, polls, domains))
    finally:
        dns.stop()
        os.sched_setaffinity(0, saved)
    firsts = [r["first_ms"] for r in rows]
    lasts = [r["last_mx_ms"] for r in rows if r["last_mx_ms"] is not None]
    return {"domains": domains, "sites": sites, "concurrency": conc, "rounds": rows,
            "first_ms_median": median(firsts), "first_ms_spread": spread(firsts),
            "last_mx_ms_median": median(lasts) if lasts else None,
            "last_mx_ms_spread": spread(lasts) if lasts else None,
            "all_ms_median": median([r["all_ms"] for r in rows]),
            "met_rounds": sum(1 for r in rows if r["met"]),
            "target_met": all(r["met"] for r in rows)}


def _polled_row(child: Dict[str, Any], polls: List[Tuple[float, float, int]],
                domains: int) -> Dict[str, Any]:
    """One round, in ms since the first submit(). NSD received the last
    MX query after the start of the last poll that counted fewer than
    there are domains, and before the end of the first poll that counted
    them all; the target is judged on the former, the earlier bound."""
    t0 = child["submit"]
    before = [a for a, _, q in polls if q < domains]
    after = [b for _, b, q in polls if q >= domains]
    lo = (max(before) - t0) * 1e3 if before else None
    first = (child["first"] - t0) * 1e3
    return {"first_ms": first, "run_ms": (child["run"] - t0) * 1e3,
            "all_ms": (child["last"] - t0) * 1e3, "last_mx_ms": lo,
            "last_mx_by_ms": (min(after) - t0) * 1e3 if after else None,
            "polls": len(polls), "met": lo is not None and first < lo}


# -- report ---------------------------------------------------------------------

def report(data: Dict[str, Any], command: str) -> None:
    print(f"command: {command}")
    print("message: "
          f"{len(make_message())} bytes (four headers, 1024-byte body in 80-byte lines), "
          "1 recipient; CPU = user+sys of the client process")
    if "warm" in data:
        w = data["warm"]
        r, f = w["routed"], w["fixed"]
        print(f"\n== warm: routed by MX against a fixed host (c={w['concurrency']}, "
              f"{w['messages']} messages a run, {w['domains']} domains over {w['sites']} MX "
              f"hosts; medians of {len(r['cpu_us'])} interleaved rounds, spread = 1 - min/max)")
        print(f"sink: {w['sink']}; DNS: Resolver(local_records=...); placement: peers on "
              f"CPUs {w['placement']['peers'] or 'any'}, client on "
              f"{w['placement']['client'] or 'any'}")
        print(f"{'run':<38} {'CPU us/msg':>10} {'spread':>6} {'msg/s':>8} {'spread':>6}")
        for name, x in (("routed: submit(msg, port=PORT)", r),
                        ("fixed: submit(msg, '127.0.0.1', PORT)", f)):
            print(f"{name:<38} {x['cpu_us_median']:>10.1f} {x['cpu_spread']:>6.0%} "
                  f"{x['msg_per_s_median']:>8.0f} {x['rate_spread']:>6.0%}")
        rr = w["cpu_ratio_rounds"]
        print(f"CPU ratio routed/fixed: {w['cpu_ratio']:.2f}x (medians); per round "
              f"{' '.join(f'{x:.2f}' for x in rr)} (median {w['cpu_ratio_rounds_median']:.2f}x)")
        print(f"msg/s ratio routed/fixed: {w['rate_ratio']:.2f}x")
        print(f"target: routed CPU/msg <= {TARGET_CPU_RATIO}x fixed: "
              f"{'met' if w['target_met'] else 'MISSED'}")
    if "cold" in data:
        c = data["cold"]
        print(f"\n== cold start: {c['domains']} domains over {c['sites']} MX hosts, c="
              f"{c['concurrency']}, a fresh Engine per round, Resolver(['127.0.0.1:PORT']) "
              "-> private NSD, nothing cached; ms since the first submit()")
        print("last MX query: NSD's count of MX queries polled (nsd-control stats_noreset); "
              "the last arrived after the start of the last poll that counted fewer than "
              "the domains, and before the first that counted them all")
        print(f"{'round':<6} {'submitted':>9} {'first result':>12} {'last MX query':>13} "
              f"{'(by)':>7} {'all results':>11} {'polls':>5}")
        for k, row in enumerate(c["rounds"], 1):
            last = "-" if row["last_mx_ms"] is None else f"{row['last_mx_ms']:.1f}"
            by = "-" if row["last_mx_by_ms"] is None else f"{row['last_mx_by_ms']:.1f}"
            print(f"{k:<6} {row['run_ms']:>9.1f} {row['first_ms']:>12.1f} {last:>13} "
                  f"{by:>7} {row['all_ms']:>11.1f} {row['polls']:>5}")
        last = c["last_mx_ms_median"]
        print(f"median: first result {c['first_ms_median']:.1f} ms (spread "
              f"{c['first_ms_spread']:.0%}), last MX query after "
              f"{'-' if last is None else f'{last:.1f}'} ms (spread "
              f"{c['last_mx_ms_spread'] or 0:.0%}), all results {c['all_ms_median']:.1f} ms")
        print(f"target: first result before the last MX query: "
              f"{'met' if c['target_met'] else 'MISSED'} in {c['met_rounds']} of "
              f"{len(c['rounds'])} rounds")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--messages", type=int, default=50000,
                    help="measured messages per warm run (default 50000)")
    ap.add_argument("--domains", type=int, default=1000)
    ap.add_argument("--sites", type=int, default=5, help="MX host names (default 5)")
    ap.add_argument("--concurrency", type=int, default=10,
                    help="max_connections and max_per_destination (default 10)")
    ap.add_argument("--only", default="warm,cold")
    ap.add_argument("--json", help="write every figure, each round's too, to this file")
    ap.add_argument("--mta-sts", choices=("on", "off"), default="on",
                    help="the Engines' MTA-STS discovery (default on, as Engine() has it)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child_main(json.loads(args.child))
    global MTA_STS
    MTA_STS = args.mta_sts == "on"
    if not 1 <= args.sites <= args.domains <= 10000:
        raise SystemExit("need 1 <= --sites <= --domains <= 10000")
    if not find_program("smtp-sink"):
        raise SystemExit("smtp-sink is needed: apt-get install postfix")
    only = set(args.only.split(","))
    raise_nofile()
    progress = Progress(args.rounds * (2 * ("warm" in only) + ("cold" in only)))
    data: Dict[str, Any] = {}
    if "warm" in only:
        data["warm"] = warm(args.rounds, args.messages, args.domains, args.sites,
                            args.concurrency, progress)
    if "cold" in only:
        data["cold"] = cold(args.rounds, args.domains, args.sites, args.concurrency,
                            progress)
    progress.finish()
    report(data, "python benchmarks/bench_routing.py " + " ".join(sys.argv[1:]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
