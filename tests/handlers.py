"""aiosmtpd handlers that script a server's answers, for interop tests."""

from __future__ import annotations

from helpers import RecordingHandler

__all__ = ["RefusingHandler", "ProxyHandler"]


class RefusingHandler(RecordingHandler):
    """Refuses ``nobody@*`` with 550 5.1.1 and ``later@*`` with 451 4.3.0 at
    RCPT; records what it accepts."""

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("nobody@"):
            return "550 5.1.1 no such user"
        if address.startswith("later@"):
            return "451 4.3.0 try later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"


class ProxyHandler(RecordingHandler):
    """Accepts a PROXY protocol header (aiosmtpd closes the connection
    unless a handler says yes)."""

    async def handle_PROXY(self, server, session, envelope, proxy_data):
        return True
