"""smtpstate: a native C SMTP client engine built around a modular state
machine, with Python states plugged in through cffi.

Quick start::

    import smtpstate
    msg = smtpstate.Message("me@example.org", ["you@example.org"], b"Subject: hi\\r\\n\\r\\nhello\\r\\n")
    with smtpstate.Client("127.0.0.1", 2525) as client:
        result = client.send(msg)
    print(result.status, result.reply)

The C core stays reachable for C-level use as ``smtpstate._core`` (``ffi``,
``lib``); nothing in the Python API needs it.
"""

from smtpstate.classify import BounceClass
from smtpstate.classify import classify as classify_reply
from smtpstate.client import Client
from smtpstate.engine import Engine, Ticket, deliver
from smtpstate.errors import (
    ConnectError,
    DeliveryError,
    InvalidMessageError,
    InvalidOptionError,
    LocalProtocolError,
    RegistrationError,
    SMTPStateError,
    StateCallbackError,
)
from smtpstate.machine import BUILTIN_STATES, Action, Machine, Stage, State, default_machine
from smtpstate.message import Message, Recipient
from smtpstate.options import Auth, Options
from smtpstate.result import RecipientResult, Reply, Result
from smtpstate.session import Capabilities, Session

__all__ = [
    "Action",
    "Auth",
    "BUILTIN_STATES",
    "BounceClass",
    "Capabilities",
    "Client",
    "ConnectError",
    "DeliveryError",
    "Engine",
    "InvalidMessageError",
    "InvalidOptionError",
    "LocalProtocolError",
    "Machine",
    "Message",
    "Options",
    "Recipient",
    "RecipientResult",
    "RegistrationError",
    "Reply",
    "Result",
    "SMTPStateError",
    "Session",
    "Stage",
    "State",
    "StateCallbackError",
    "Ticket",
    "classify_reply",
    "default_machine",
    "deliver",
]

__version__ = "0.1.0"
