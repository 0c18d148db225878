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

``smtpstate.aio`` (and ``dsn``, ``mta_sts``, ``cli``, ``demo``, ``bench``) are
imported on first use, not with the package: ``import smtpstate`` then
``smtpstate.aio.send(...)`` works, and a program that never touches asyncio
(or MTA-STS, which brings ``ssl`` and ``http.client``) does not pay for it.
"""

from importlib import import_module
from typing import Any, List

from smtpstate.classify import BounceClass
from smtpstate.classify import classify as classify_reply
from smtpstate.client import Client
from smtpstate.engine import Engine, Ticket, deliver, deliver_iter
from smtpstate.errors import (
    ConnectError,
    DeliveryError,
    InvalidMessageError,
    InvalidOptionError,
    LocalProtocolError,
    MTASTSError,
    PolicyError,
    PolicyFetchError,
    RegistrationError,
    SMTPStateError,
    StateCallbackError,
)
from smtpstate.machine import BUILTIN_STATES, Action, Machine, Stage, State, default_machine
from smtpstate.message import Message, Recipient
from smtpstate.options import Auth, Options
from smtpstate.result import RecipientResult, Reply, Result
from smtpstate.routing import Limits, Resolver, Source, load_limits
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
    "Limits",
    "LocalProtocolError",
    "MTASTSError",
    "Machine",
    "Message",
    "Options",
    "PolicyError",
    "PolicyFetchError",
    "Recipient",
    "RecipientResult",
    "RegistrationError",
    "Reply",
    "Resolver",
    "Result",
    "SMTPStateError",
    "Session",
    "Source",
    "Stage",
    "State",
    "StateCallbackError",
    "Ticket",
    "classify_reply",
    "default_machine",
    "deliver",
    "deliver_iter",
    "load_limits",
]

__version__ = "0.1.0"

# Submodules imported when first used, not here: aio imports asyncio, which
# costs more at start-up than the whole package, mta_sts ssl and http.client,
# and the others are the command line's.
_LAZY_SUBMODULES = frozenset({"aio", "bench", "cli", "demo", "dsn", "mta_sts"})


def __getattr__(name: str) -> Any:
    """``smtpstate.aio`` and the other lazy submodules, imported on first
    access (PEP 562); importing sets the attribute, so this runs once each.

    Raises:
        AttributeError: no such attribute or submodule.
    """
    if name in _LAZY_SUBMODULES:
        return import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | _LAZY_SUBMODULES)
