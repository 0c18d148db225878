"""A STARTTLS sink for the TLS memory and throughput figures: smtp-sink has no TLS, and a
Postfix smtpd per connection cannot hold 10,000 connections on a small
machine, so ``benchmarks/run.py`` runs this aiosmtpd server (one asyncio
process) in a process of its own.

Usage: ``python benchmarks/tls_sink.py PORT CERT_PEM KEY_PEM``. Accepts
every message and drops it; prints "ready" once it listens, and on
SIGTERM "messages N resumed M": of the messages, how many came over a
TLS session the server resumed (its own ``session_reused``). On SIGUSR1 it
prints the same line with its CPU seconds so far (user+sys) appended,
"messages N resumed M cpu S", and goes on: the throughput benchmark asks
after every run, for the counts and for what the sink itself spent.
"""

from __future__ import annotations

import asyncio
import resource
import signal
import ssl
import sys


class Drop:
    def __init__(self) -> None:
        self.messages = 0
        self.resumed = 0

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd API)
        tls = session.ssl.get("ssl_object") if session.ssl else None
        self.messages += 1
        self.resumed += bool(tls is not None and tls.session_reused)
        return "250 2.0.0 Ok: dropped"


def main() -> int:
    from aiosmtpd.smtp import SMTP

    port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    handler = Drop()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(handler, tls_context=ctx, require_starttls=True,
                         hostname="tls-sink.test", timeout=600),
            host="127.0.0.1", port=port, backlog=4096)
        print("ready", flush=True)

        def stop() -> None:
            print(f"messages {handler.messages} resumed {handler.resumed}", flush=True)
            server.close()

        def snapshot() -> None:
            r = resource.getrusage(resource.RUSAGE_SELF)
            print(f"messages {handler.messages} resumed {handler.resumed} "
                  f"cpu {r.ru_utime + r.ru_stime:.6f}", flush=True)

        loop.add_signal_handler(signal.SIGTERM, stop)
        loop.add_signal_handler(signal.SIGUSR1, snapshot)
        async with server:
            try:
                await server.serve_forever()
            except asyncio.CancelledError:          # stop() closed it
                pass

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
