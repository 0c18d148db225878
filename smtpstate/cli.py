"""The command line: ``python -m smtpstate`` / ``smtpstate``.

Commands: ``demo`` (the README's main job) and ``states`` (a machine's
order, including states registered by a module named with ``--load``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

__all__ = ["main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from smtpstate.demo import run_demo
    return run_demo(args.count)


def _cmd_states(args: argparse.Namespace) -> int:
    from smtpstate.machine import default_machine
    for name in args.load:
        importlib.import_module(name)        # it registers into default_machine
    for sid, name in default_machine.states:
        print(f"{sid:>3}  {name}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="smtpstate",
                                     description="SMTP client engine with a modular state machine")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log the protocol transcript (DEBUG)")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="deliver a batch to an embedded aiosmtpd and show it")
    demo.add_argument("--count", type=int, default=10, help="messages to send (default 10)")
    demo.set_defaults(func=_cmd_demo)
    states = sub.add_parser("states", help="print the default machine's state order")
    states.add_argument("--load", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (it may register states)")
    states.set_defaults(func=_cmd_states)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    if getattr(args, "count", 1) < 1:
        parser.error("--count must be at least 1")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
