"""Send a standard-library EmailMessage: the envelope comes from its
headers, as smtplib.send_message does (Bcc is used for the envelope and
never sent), and SMTPUTF8 is asked for because an address is not ASCII.

    python examples/send_email_message.py                  # its own aiosmtpd
    python examples/send_email_message.py --server HOST:PORT
"""

from __future__ import annotations

import argparse
import sys
from email.message import EmailMessage

import smtpstate
from smtpstate.cli import parse_server


def make_message() -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Ann Example <ann@example.test>"
    msg["To"] = "bob@example.test, Zoë <zoë@example.test>"
    msg["Cc"] = "carol@example.test"
    msg["Bcc"] = "audit@example.test"
    msg["Subject"] = "Grüße from smtpstate"
    msg.set_content("Hello from an EmailMessage.\n.A leading dot is escaped on the wire.\n")
    return msg


def send(host: str, port: int) -> smtpstate.Result:
    with smtpstate.Client(host, port, timeout=30) as client:
        return client.send_message(make_message())


def main(argv: list) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", metavar="HOST:PORT")
    args = parser.parse_args(argv)
    if args.server:
        result = send(*parse_server(args.server))
        received = None
    else:
        from _local_server import local_server
        with local_server() as (host, port, handler):
            result = send(host, port)
            received = handler.messages
    print(f"result: {result.status} {result.reply}")
    for r in result.recipients:
        print(f"  {r.address}: {r.status}")
    if received:
        got = received[0]
        print(f"the server got: MAIL FROM {got['from']} RCPT TO {', '.join(got['to'])}")
        print(f"Bcc header sent: {b'Bcc:' in got['data']}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
