"""A state before the banner: the PROXY protocol (v1) line a load balancer
would send, telling the server whom it really talks to.

The state is registered at -1, the very front of the machine: it runs as
soon as the connection is up, queues one line and awaits no reply, and
BANNER follows. The server here is aiosmtpd with PROXY protocol support
on; it reports the client address it was told.

    python examples/proxy_protocol.py
    python examples/proxy_protocol.py --server HOST:PORT   # a server expecting PROXY
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import smtpstate
from smtpstate import Machine, State
from smtpstate.cli import parse_server


class ProxyV1(State):
    """``PROXY TCP4 <source> <destination> <sport> <dport>`` before the banner."""

    name = "PROXY"
    # A stage code of its own, named: a failure here reports "sending PROXY header".
    stage = 30
    stage_names = {30: "sending PROXY header"}

    def __init__(self, source: str = "203.0.113.7", source_port: int = 40000) -> None:
        self.source, self.source_port = source, source_port

    def setup(self, session: Any) -> int:
        dst, dport = session.peer                # the server's address, as connected
        family = "TCP6" if ":" in dst else "TCP4"
        session.send(f"PROXY {family} {self.source} {dst} {self.source_port} {dport}")
        return 0                                 # no reply to wait for: the banner comes next


def make_machine() -> Machine:
    machine = Machine()
    machine.register(ProxyV1(), after=-1)        # -1: before BANNER
    return machine


def send(host: str, port: int) -> smtpstate.Result:
    message = smtpstate.Message("ann@example.test", ["bob@example.test"],
                                b"Subject: via a proxy\r\n\r\nhello\r\n")
    with smtpstate.Client(host, port, machine=make_machine(), timeout=30) as client:
        return client.send(message)


def main(argv: list) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", metavar="HOST:PORT")
    args = parser.parse_args(argv)
    print("state order:", " -> ".join(name for _, name in make_machine().states))
    if args.server:
        result = send(*parse_server(args.server))
        print(f"result: {result.status} {result.reply}")
        return 0 if result.ok else 1
    from _local_server import local_server
    with local_server(proxy_protocol_timeout=5) as (host, port, handler):
        result = send(host, port)
        print(f"result: {result.status} {result.reply}")
        proxy = handler.messages[0]["proxy"] if handler.messages else None
        if proxy is not None:
            print(f"the server was told the client is {proxy.src_addr} port {proxy.src_port}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
