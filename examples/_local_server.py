"""A throwaway SMTP server on loopback for the examples that are run
without ``--server``: aiosmtpd (``pip install 'smtpstate[demo]'``) in a
thread, on a port the kernel picks. Not an example itself.

It takes mail for anybody but ``unknown*@...`` (550 5.1.1, as the Postfix
in the tests does) and ``later*@...`` (450 4.2.0), and remembers what it
received.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any, Dict, Iterator, List, Tuple


class RecordingHandler:
    def __init__(self) -> None:
        self.messages: List[Dict[str, Any]] = []

    async def handle_PROXY(self, server: Any, session: Any, envelope: Any,
                           proxy_data: Any) -> bool:
        return True                          # take what a PROXY header says

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any,
                          address: str, rcpt_options: List[str]) -> str:
        if address.startswith("unknown"):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        if address.startswith("later"):
            return f"450 4.2.0 <{address}>: Recipient address rejected: try again later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append({
            "from": envelope.mail_from, "to": list(envelope.rcpt_tos),
            "data": bytes(envelope.original_content),
            "proxy": getattr(session, "proxy_data", None),
        })
        return f"250 2.0.0 Ok: queued as local-{len(self.messages)}"


@contextlib.contextmanager
def local_server(**kwargs: Any) -> Iterator[Tuple[str, int, RecordingHandler]]:
    """Run aiosmtpd on 127.0.0.1 meanwhile; yields (host, port, handler).
    kwargs go to aiosmtpd's Controller and SMTP (``proxy_protocol_timeout``)."""
    try:
        from aiosmtpd.controller import Controller
    except ImportError:
        raise SystemExit("without --server this example runs its own aiosmtpd: "
                         "pip install aiosmtpd (or 'smtpstate[demo]')") from None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    handler = RecordingHandler()
    controller = Controller(handler, hostname="127.0.0.1", port=port,
                            server_hostname="local.example", **kwargs)
    controller.start()
    try:
        yield "127.0.0.1", port, handler
    finally:
        controller.stop()
