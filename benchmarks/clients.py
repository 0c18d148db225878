"""One benchmark client run, in a process of its own: ``benchmarks/run.py``
starts ``python benchmarks/clients.py SPEC`` for every measurement, so
that each client's CPU time (getrusage of that process, or of its
children for smtp-source) counts nothing else, each starts with a fresh
heap, and each can be pinned to its CPUs.

SPEC is JSON: ``{"client": ..., "port": ..., "n": ..., "conc": ..., ...}``.
Prints one JSON line: ``{"wall": s, "cpu": s, ...}``.

Clients: ``engine`` (smtpstate.Engine), ``deliver`` (``smtpstate.deliver()``
as the README calls it, the Message list made before the timer),
``deliver_build`` (the same with the Messages made inside it), ``engine_warm`` (the Engine over a
pool opened beforehand), ``engine_py`` and ``engine_c``
(the Engine with a no-op Python or C state after DATA), ``source``
(Postfix smtp-source), ``smtplib`` (threads), ``aiosmtplib`` (asyncio
tasks), ``aio_engine`` (smtpstate.aio.Engine, conc sends in flight),
``idle`` (RSS of the Engine holding n idle connections), and for
the STARTTLS throughput ``engine_tls`` (the Engine, ``tls="verify"``, with
or without TLS resumption) and ``aiosmtplib_tls`` (aiosmtplib with
``start_tls=True``, certificates verified), each sending ``per_conn``
messages per connection.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from typing import Any, Dict, Tuple

from smtpstate.bench import (HELO, RECIPIENT, SENDER, cpu_self, find_program, make_message,
                             raise_nofile, rss_kib, run_deliver, run_engine, run_smtplib,
                             run_source)


def run_aiosmtplib(port: int, n: int, conc: int, data: bytes,
                   per_connection: bool = False) -> Tuple[float, float]:
    """aiosmtplib: conc asyncio tasks, each with its own connection (or a
    new one per message with per_connection), sending its share of n."""
    import asyncio

    import aiosmtplib

    shares = [n // conc + (1 if i < n % conc else 0) for i in range(conc)]

    async def worker(count: int) -> None:
        if per_connection:
            for _ in range(count):
                await aiosmtplib.send(data, sender=SENDER, recipients=[RECIPIENT],
                                      hostname="127.0.0.1", port=port, local_hostname=HELO,
                                      use_tls=False, start_tls=False, timeout=60)
            return
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname=HELO,
                               use_tls=False, start_tls=False, timeout=60)
        await smtp.connect()
        for _ in range(count):
            await smtp.sendmail(SENDER, [RECIPIENT], data)
        await smtp.quit()

    async def main() -> None:
        await asyncio.gather(*(worker(k) for k in shares if k))

    c0, t0 = cpu_self(), time.perf_counter()
    asyncio.run(main())
    return time.perf_counter() - t0, cpu_self() - c0


def run_engine_tls(port: int, n: int, conc: int, data: bytes, ca_file: str,
                   per_conn: int, resumption: bool) -> Tuple[float, float]:
    """The Engine over STARTTLS as the README shows it: ``tls="verify"``
    against ``ca_file``, conc connections, QUIT after ``per_conn`` messages
    (``messages_per_connection``), TLS resumption on or off."""
    import smtpstate

    msg = smtpstate.Message(SENDER, [RECIPIENT], data)
    c0, t0 = cpu_self(), time.perf_counter()
    with smtpstate.Engine(max_connections=conc, max_per_destination=conc,
                          messages_per_connection=per_conn, tls_resumption=resumption,
                          helo=HELO) as engine:
        for _ in range(n):
            engine.submit(msg, "127.0.0.1", port, tls="verify", ca_file=ca_file, timeout=60)
        bad = [r for r in engine.run() if not r.ok]
    wall, used = time.perf_counter() - t0, cpu_self() - c0
    if bad:
        raise RuntimeError(f"Engine (TLS): {len(bad)} of {n} not delivered, e.g. {bad[0]}")
    return wall, used


def run_aiosmtplib_tls(port: int, n: int, conc: int, data: bytes, ca_file: str,
                       per_conn: int) -> Tuple[float, float]:
    """aiosmtplib over STARTTLS: conc asyncio tasks, each opening a
    connection (``start_tls=True``, certificate and host name verified
    against ``ca_file``), sending up to ``per_conn`` messages over it,
    QUIT, and again until its share of n is sent. One SSLContext made
    beforehand is shared by every connection (cheaper than aiosmtplib's
    default of a new context per connection from ``cert_bundle``);
    aiosmtplib never resumes TLS sessions."""
    import asyncio
    import ssl

    import aiosmtplib

    shares = [n // conc + (1 if i < n % conc else 0) for i in range(conc)]
    c0, t0 = cpu_self(), time.perf_counter()
    ctx = ssl.create_default_context(cafile=ca_file)

    async def worker(count: int) -> None:
        while count > 0:
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname=HELO,
                                   use_tls=False, start_tls=True, validate_certs=True,
                                   tls_context=ctx, timeout=60)
            await smtp.connect()
            if smtp.get_transport_info("ssl_object") is None:
                raise RuntimeError("aiosmtplib did not upgrade to TLS")
            for _ in range(min(per_conn, count)):
                await smtp.sendmail(SENDER, [RECIPIENT], data)
            count -= per_conn
            await smtp.quit()

    async def main() -> None:
        await asyncio.gather(*(worker(k) for k in shares if k))

    asyncio.run(main())
    return time.perf_counter() - t0, cpu_self() - c0


def noop_python_machine() -> Any:
    """A Machine with a no-op Python state after DATA."""
    import smtpstate

    # The twin of benchmarks/c/noop_state.c: a setup that counts and sends
    # nothing, a callback that goes on. Both are overridden, so both cross
    # into Python for every message (a state overriding neither would cost
    # no Python call at all).
    next_action = smtpstate.Action.NEXT

    class Noop(smtpstate.State):
        name = "BENCH_PY_NOOP"
        calls = 0

        def setup(self, session: Any) -> int:
            self.calls += 1
            return 0

        def callback(self, session: Any, reply: Any) -> Any:
            return next_action

    m = smtpstate.Machine()
    m.register(Noop(), after="DATA")
    return m


def noop_c_machine(library: str) -> Any:
    """A Machine with the no-op C state of benchmarks/c/noop_state.c
    (compiled by run.py into ``library``) after DATA."""
    from cffi import FFI

    import smtpstate
    from smtpstate._ffi import ffi, lib

    m = smtpstate.Machine()
    bffi = FFI()
    bffi.cdef("int bench_noop_register(void *m, int after, void *reg);")
    so = bffi.dlopen(library)
    reg = int(ffi.cast("uintptr_t", ffi.addressof(lib, "smtps_machine_register")))
    rc = so.bench_noop_register(bffi.cast("void *", int(ffi.cast("uintptr_t", m._ptr))),
                                m.id("DATA"), bffi.cast("void *", reg))
    if rc < 0:
        raise RuntimeError("cannot register the C no-op state")
    m._bench_so = so                           # keep the library loaded
    return m


def run_idle(spec: Dict[str, Any], data: bytes) -> Dict[str, Any]:
    """RSS growth while the Engine holds spec["n"] idle connections."""
    import smtpstate

    opts: Dict[str, Any] = {"timeout": 60}
    if spec.get("ca_file"):
        opts.update(tls="starttls", ca_file=spec["ca_file"])
    msg = smtpstate.Message(SENDER, [RECIPIENT], data)
    n, conc, port = spec["n"], spec["conc"], spec["port"]
    with smtpstate.Engine(max_connections=2, max_per_destination=2, helo=HELO) as warm:
        for _ in range(4):                     # load everything a delivery touches
            warm.submit(msg, "127.0.0.1", port, **opts)
        for r in warm.run():
            if not r.ok:
                raise RuntimeError(f"warm-up not delivered: {r}")
    gc.collect()
    rss0 = rss_kib()
    engine = smtpstate.Engine(max_connections=conc, max_per_destination=conc,
                              idle_timeout=600, connect_timeout=120, helo=HELO)
    t0 = time.perf_counter()
    for _ in range(n):
        engine.submit(msg, "127.0.0.1", port, **opts)
    bad = [r for r in engine.run() if not r.ok]
    wall = time.perf_counter() - t0
    # A burst of thousands of connects can overflow the sink's accept queue
    # (somaxconn): a few connections then never see a banner. The figure is
    # per connection still open, so a few lost ones only cost their time.
    if len(bad) > n // 20:
        raise RuntimeError(f"{len(bad)} of {n} not delivered, e.g. {bad[0]}")
    gc.collect()
    time.sleep(0.2)
    rss1 = rss_kib()
    out = {"rss0": rss0, "rss1": rss1, "connections": engine.connections, "wall": wall,
           "undelivered": len(bad)}
    engine.close()
    return out


def run_warm(port: int, n: int, conc: int, data: bytes) -> Tuple[float, float]:
    """The Engine at conc connections, steady state: one message per
    connection first opens them all (not measured; a few lost to a full
    accept queue are tolerated, as for idle), then n messages go over the
    open pool; wall and CPU of that second part only."""
    import smtpstate

    msg = smtpstate.Message(SENDER, [RECIPIENT], data)
    with smtpstate.Engine(max_connections=conc, max_per_destination=conc, idle_timeout=600,
                          connect_timeout=120, helo=HELO) as engine:
        for _ in range(conc):
            engine.submit(msg, "127.0.0.1", port, timeout=60)
        lost = sum(1 for r in engine.run() if not r.ok)
        if lost > conc // 20:
            raise RuntimeError(f"{lost} of {conc} connections lost while opening the pool")
        c0, t0 = cpu_self(), time.perf_counter()
        for _ in range(n):
            engine.submit(msg, "127.0.0.1", port, timeout=60)
        bad = sum(1 for r in engine.run() if not r.ok)
        wall, cpu = time.perf_counter() - t0, cpu_self() - c0
    if bad:
        raise RuntimeError(f"{bad} of {n} not delivered over the open pool")
    return wall, cpu


def run_aio_engine(port: int, n: int, conc: int, data: bytes,
                   connections: int = 0) -> Tuple[float, float]:
    """smtpstate.aio.Engine: n messages, conc ``send()`` calls in flight
    at once (conc tasks, each awaiting one send after the other), over
    ``connections`` pooled connections (0: conc), on one asyncio loop; no
    thread."""
    import asyncio

    import smtpstate
    from smtpstate import aio

    msg = smtpstate.Message(SENDER, [RECIPIENT], data)

    async def main() -> int:
        bad = 0
        conns = connections or conc
        async with aio.Engine(max_connections=conns, max_per_destination=conns,
                              helo=HELO) as engine:
            left = [n]

            async def worker() -> None:
                nonlocal bad
                while left[0] > 0:
                    left[0] -= 1
                    r = await engine.send(msg, "127.0.0.1", port, timeout=60)
                    if not r.ok:
                        bad += 1

            await asyncio.gather(*(worker() for _ in range(conc)))
        return bad

    c0, t0 = cpu_self(), time.perf_counter()
    bad = asyncio.run(main())
    wall, used = time.perf_counter() - t0, cpu_self() - c0
    if bad:
        raise RuntimeError(f"aio.Engine: {bad} of {n} not delivered")
    return wall, used


def main() -> int:
    spec = json.loads(sys.argv[1])
    if spec.get("cpus") is not None:
        os.sched_setaffinity(0, spec["cpus"])
    raise_nofile()
    data = make_message()
    client, port, n, conc = spec["client"], spec["port"], spec["n"], spec["conc"]
    per_conn = bool(spec.get("per_connection"))
    out: Dict[str, Any]
    if client == "idle":
        out = run_idle(spec, data)
    else:
        if client == "engine":
            conc = spec.get("connections", conc)
            wall, cpu = run_engine(port, n, conc, data,
                                   messages_per_connection=1 if per_conn else 0)
        elif client in ("deliver", "deliver_build"):
            wall, cpu = run_deliver(port, n, conc, data, build=client == "deliver_build")
        elif client == "engine_warm":
            wall, cpu = run_warm(port, n, conc, data)
        elif client == "engine_py":
            wall, cpu = run_engine(port, n, conc, data, machine=noop_python_machine())
        elif client == "engine_c":
            wall, cpu = run_engine(port, n, conc, data, machine=noop_c_machine(spec["so"]))
        elif client == "smtplib":
            wall, cpu = run_smtplib(port, n, conc, data, per_connection=per_conn)
        elif client == "aio_engine":
            wall, cpu = run_aio_engine(port, n, conc, data, spec.get("connections", 0))
        elif client == "aiosmtplib":
            wall, cpu = run_aiosmtplib(port, n, conc, data, per_connection=per_conn)
        elif client == "engine_tls":
            wall, cpu = run_engine_tls(port, n, conc, data, spec["ca_file"], spec["per_conn"],
                                       spec["resumption"])
        elif client == "aiosmtplib_tls":
            wall, cpu = run_aiosmtplib_tls(port, n, conc, data, spec["ca_file"],
                                           spec["per_conn"])
        elif client == "source":
            program = find_program("smtp-source")
            assert program is not None
            wall, cpu = run_source(program, port, n, conc, reuse=not per_conn)
        else:
            raise SystemExit(f"unknown client {client!r}")
        out = {"wall": wall, "cpu": cpu}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
