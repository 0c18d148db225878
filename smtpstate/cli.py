"""The command line: ``python -m smtpstate`` / ``smtpstate``.

Commands:

* ``send`` -- one message to one server, in the spirit of swaks: the
  envelope from ``--from``/``--to`` (or the headers of ``--data``), the
  content from a file, stdin or a generated test message; TLS and AUTH;
  ``-v`` prints the dialogue (plaintext, credentials redacted) on stderr.
  The exit code says what happened (:data:`EXIT_CODES`).
* ``states`` -- a machine's state order with each state's connection
  stages, including states registered by modules or files named with
  ``--load``.
* ``demo`` -- the README's main job (:mod:`smtpstate.demo`).
* ``bench`` -- a quick benchmark (:mod:`smtpstate.bench`).

Rule: what a server said is printed through :func:`smtpstate.logs.printable`,
never raw.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import email.utils
import getpass
import importlib
import importlib.util
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, NoReturn, Optional, Sequence, TextIO, Tuple

__all__ = ["main", "EXIT_CODES", "StateRow", "state_table", "parse_server", "load_machine"]

log = logging.getLogger("smtpstate.cli")

EXIT_CODES = {
    "delivered": 0,   # to every recipient
    "partial": 1,     # delivered, but some recipients were refused
    "usage": 2,       # bad arguments (argparse's own code)
    "tempfail": 4,    # try again later (like a 4xx reply)
    "permfail": 5,    # will not be delivered (like a 5xx reply)
    "unknown": 6,     # lost after the final dot: maybe delivered
}
"""``send``'s exit code for each outcome."""

ENV_USER = "SMTPSTATE_AUTH_USER"
ENV_PASSWORD = "SMTPSTATE_AUTH_PASSWORD"
ENV_KEY_PASSWORD = "SMTPSTATE_KEY_PASSWORD"

_EPILOG_SEND = f"""\
exit codes: 0 delivered, 1 delivered to some recipients only, 2 bad arguments,
4 temporary failure, 5 permanent failure, 6 unknown (the connection was lost
after the final dot: the message may have been delivered).

credentials: --auth-user or ${ENV_USER}; the password from ${ENV_PASSWORD},
else asked for on the terminal (--auth-password works too, but other users
can see command lines). They are never sent before TLS unless --auth-plaintext.

client certificate: --cert (PEM, the key in it too unless --key); an
encrypted key's password from ${ENV_KEY_PASSWORD}. TLS settings are checked
before anything connects.

without --server, each recipient goes where its domain's MX records say
(port 25, or --port), looked up through /etc/resolv.conf or --nameserver.

examples:
  smtpstate send --to bob@example.net --data message.eml      # by MX
  smtpstate send --server 127.0.0.1:2525 --to bob@example.net
  smtpstate send --server smtp.example.net:587 --tls --auth-user me \\
      --from me@example.net --to bob@example.net --data message.eml -v
  smtpstate send --server mx.example.net --data message.eml   # envelope from the headers
"""


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error said in one line and a hint to --help:
    the whole usage (twenty lines for send) buried the one line that
    mattered. Subcommands' parsers are made of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CODES["usage"], f"{self.prog}: error: {message}\n"
                                       f"Try '{self.prog} --help' for more information.\n")


# ---------------------------------------------------------------------------
# send
# ---------------------------------------------------------------------------


def parse_server(text: str, default_port: int = 25) -> Tuple[str, int]:
    """``"host"``, ``"host:port"``, ``"[::1]:25"`` or ``"::1"`` into (host, port).

    Raises:
        ValueError: an empty host or a bad port.
    """
    text = text.strip()
    host, port = text, str(default_port)
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"no closing ']' in {text!r}")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"expected ':port' after ']' in {text!r}")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host:
        raise ValueError(f"no host in {text!r}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port {port!r} in {text!r}")
    return host, int(port)


def _header_arg(text: str) -> str:
    """--header's value, if it is 'Name: value' with a field name of
    printable ASCII and no space (RFC 5322 2.2): without the colon, the
    test message used to carry an empty header named after the text.

    Raises:
        argparse.ArgumentTypeError: it is not.
    """
    name, colon, _ = text.partition(":")
    name = name.strip()
    if not colon:
        raise argparse.ArgumentTypeError(f"{text!r} has no colon: give 'Name: value'")
    if not name or any(not 0x21 <= ord(c) <= 0x7E for c in name):
        raise argparse.ArgumentTypeError(
            f"{text!r}: the header name must be printable ASCII without spaces "
            "('Name: value')")
    return text


# Message.from_email() ends a refusal with the Python argument that would
# supply what the headers lack; on the command line that is an option.
_OPTION_FOR_ARGUMENT = (("give sender=", "give --from"), ("give recipients=", "give --to"),
                        ("require_tls=True", "--require-tls"),
                        (" require_tls", " --require-tls"))


def _as_options(text: str) -> str:
    """``text`` with Python argument hints turned into the options' names."""
    for argument, option in _OPTION_FOR_ARGUMENT:
        text = text.replace(argument, option)
    return text


def _default_sender() -> str:
    try:
        user = getpass.getuser()
    except Exception:
        user = "smtpstate"
    host = socket.getfqdn() or "localhost"
    if "." not in host:
        host = "localhost"
    return f"{user}@{host}"


def _test_message(sender: str, recipients: Sequence[str], subject: Optional[str],
                  body: Optional[str], headers: Sequence[str]) -> bytes:
    """A small test message, as swaks makes one."""
    from email.message import EmailMessage

    msg = EmailMessage()
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = subject if subject is not None else (
        "test " + email.utils.formatdate(localtime=True))
    msg["Message-ID"] = email.utils.make_msgid(domain=sender.rpartition("@")[2] or None)
    msg["X-Mailer"] = "smtpstate send"
    for h in headers:
        name, _, value = h.partition(":")
        del msg[name.strip()]
        msg[name.strip()] = value.strip()
    msg.set_content(body if body is not None else "This is a test mailing.\n")
    return bytes(msg.as_bytes(policy=msg.policy.clone(linesep="\r\n")))


def _read_data(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as f:
        return f.read()


def _build_message(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    from smtpstate.errors import InvalidMessageError
    from smtpstate.message import Message

    recipients = [a.strip() for value in args.to for a in value.split(",") if a.strip()]
    try:
        if args.data is None:
            if not recipients:
                parser.error("send needs --to (or --data with To/Cc/Bcc headers)")
            sender = args.sender if args.sender is not None else _default_sender()
            # The envelope is checked before it goes into headers.
            Message(sender, recipients, b"", dsn_ret=args.dsn_ret, envid=args.envid,
                    require_tls=args.require_tls)
            try:
                data = _test_message(sender, recipients, args.subject, args.body, args.header)
            except ValueError as exc:
                parser.error(f"cannot make the test message: {exc}")
            return Message(sender, recipients, data, dsn_ret=args.dsn_ret, envid=args.envid,
                           require_tls=args.require_tls)
        if args.subject is not None or args.body is not None or args.header:
            parser.error("--subject, --body and --header make a test message; "
                         "they cannot change --data")
        try:
            raw = _read_data(args.data)
        except OSError as exc:
            parser.error(f"cannot read --data {args.data}: {exc.strerror or exc}")
        if recipients:
            # An explicit envelope: the content goes exactly as given.
            sender = args.sender if args.sender is not None else _default_sender()
            return Message(sender, recipients, raw, dsn_ret=args.dsn_ret, envid=args.envid,
                           require_tls=args.require_tls)
        # The envelope from the headers, Bcc removed (smtplib.send_message).
        parsed = email.parser.BytesParser(policy=email.policy.default).parsebytes(raw)
        return Message.from_email(parsed, args.sender, None, dsn_ret=args.dsn_ret,
                                  envid=args.envid, require_tls=args.require_tls)
    except InvalidMessageError as exc:
        parser.error(_as_options(str(exc)))


def _credentials(args: argparse.Namespace,
                 parser: argparse.ArgumentParser) -> Optional[Tuple[str, str]]:
    user = args.auth_user or os.environ.get(ENV_USER) or None
    if user is None:
        if args.auth_password:
            parser.error("--auth-password without --auth-user")
        return None
    secret = args.auth_password or os.environ.get(ENV_PASSWORD) or None
    if secret is None:
        if not sys.stdin.isatty() or args.data == "-":
            parser.error(f"no password for {user!r}: set {ENV_PASSWORD} "
                         "(or --auth-password)")
        secret = getpass.getpass(f"password for {user}: ")
    return user, secret


def _outcome(result: Any) -> str:
    return result.status if result.status in EXIT_CODES else "tempfail"


def _describe(result: Any, out: TextIO) -> None:
    from smtpstate.logs import printable

    if result.ok:
        first = result.recipients[0] if result.recipients else None
        via = f" via {printable(first.mx)}[{first.ip or ''}]" if first and first.mx else ""
        print(f"delivered{via}: {printable(str(result.reply)) if result.reply else ''}",
              file=out)
    else:
        why = printable(str(result.reply) if result.reply is not None else result.reason)
        cls = f" [{result.bounce_class}]" if result.bounce_class is not None else ""
        print(f"{result.status} at stage {result.stage_code} ({result.stage}): {why}{cls}",
              file=out)
        if result.error:
            print(f"  error: {printable(result.error)}", file=out)
    for r in result.recipients:
        # Delivered: the recipients that were not. Failed: those with a
        # refusal of their own (the others share the message's fate).
        if result.ok and r.status == "delivered":
            continue
        if not result.ok and (r.reply is None or r.reply.code < 400 or r.reply == result.reply):
            continue
        reply = f" {printable(str(r.reply))}" if r.reply is not None else ""
        cls = f" [{r.bounce_class}]" if r.bounce_class is not None else ""
        via = f" via {printable(r.mx)}[{r.ip or ''}]" if r.mx else ""
        print(f"  {printable(r.address)}: {r.status}{reply}{cls}{via}", file=out)


def _tls_lines(tls: List[Dict[str, Any]]) -> List[str]:
    """What TLS each connection used, in words: "tls: dane with
    mx.example.net[192.0.2.1]: TLSv1.3, verified"."""
    from smtpstate.logs import printable

    lines = []
    for t in tls:
        if t["level"] == "none":
            lines.append("tls: none")
            continue
        where = f" with {printable(t['host'])}[{t['ip']}]" if t.get("host") else ""
        if t["result"] == "success":
            how = f"{t['version']}, {'verified' if t['verified'] else 'not verified'}"
            if t.get("resumed"):
                how += ", resumed"
        elif t["result"] == "none":
            how = "not used"
        else:
            how = f"{t['result']}" + (f" ({printable(t['detail'])})" if t.get("detail") else "")
        lines.append(f"tls: {t['level']}{where}: {how}")
    return lines


def _as_json(result: Any) -> Dict[str, Any]:
    def reply(r: Any) -> Optional[Dict[str, Any]]:
        return None if r is None else {"code": r.code, "enhanced": r.enhanced, "text": r.text}

    def cls(c: Any) -> Optional[Dict[str, Any]]:
        return None if c is None else {"code": c.code, "name": c.name}

    return {
        "status": result.status, "reply": reply(result.reply), "stage": result.stage,
        "stage_code": result.stage_code, "state": result.state, "reason": result.reason,
        "error": result.error, "bounce_class": cls(result.bounce_class),
        "recipients": [{"address": r.address, "status": r.status, "reply": reply(r.reply),
                        "bounce_class": cls(r.bounce_class), "mx": r.mx, "ip": r.ip}
                       for r in result.recipients],
    }


def _resolver_arguments(p: argparse.ArgumentParser) -> None:
    """The options that choose how names are looked up (send by MX, worker)."""
    p.add_argument("--resolver", metavar="system|IP[:PORT],...",
                   help="the name servers to ask: 'system' (those of /etc/resolv.conf, "
                        "the default) or addresses separated by commas")
    p.add_argument("--nameserver", action="append", default=[], metavar="IP[:PORT]",
                   help="ask this name server (repeat; the same as --resolver with a list)")
    p.add_argument("--trust-anchor", action="append", default=[], metavar="FILE|RECORD",
                   help="validate DNSSEC from these DS or DNSKEY records (a file of them, "
                        "or one record; repeat) instead of the root zone's built-in ones")
    p.add_argument("--no-dnssec", action="store_true",
                   help="validate no DNSSEC (and so no DANE)")
    p.add_argument("--dns-timeout", type=float, metavar="SECONDS",
                   help="seconds for one DNS attempt (default 5)")
    p.add_argument("--dns-attempts", type=int, metavar="N",
                   help="DNS attempts before a lookup fails for now (default 2)")


def _resolver(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    """The Resolver the options of :func:`_resolver_arguments` ask for;
    None when they ask for nothing but the defaults."""
    from smtpstate.errors import InvalidOptionError
    from smtpstate.routing import Resolver

    servers: Optional[List[str]] = list(args.nameserver) or None
    if args.resolver is not None:
        if args.nameserver:
            parser.error("give the name servers with --resolver or --nameserver, not both")
        choice = args.resolver.strip()
        if choice != "system":
            servers = [s.strip() for s in choice.split(",") if s.strip()]
            if not servers:
                parser.error("--resolver must be 'system' or name server addresses "
                             "separated by commas")
    if args.no_dnssec and args.trust_anchor:
        parser.error("--trust-anchor and --no-dnssec contradict each other")
    settings: Dict[str, Any] = {}
    if args.trust_anchor:
        settings["trust_anchors"] = args.trust_anchor
    if args.no_dnssec:
        settings["trust_anchors"] = ()
    if args.dns_timeout is not None:
        settings["timeout"] = args.dns_timeout
    if args.dns_attempts is not None:
        settings["attempts"] = args.dns_attempts
    if servers is None and not settings:
        return None
    try:
        return Resolver(servers, **settings)
    except InvalidOptionError as e:
        parser.error(str(e))


def _send_by_mx(message: Any, port: int, resolver: Any, options: Dict[str, Any],
                tls: List[Dict[str, Any]]) -> Any:
    """One message routed by its recipients' MX records (an Engine: the
    Client talks to one server); what TLS each connection used goes on
    tls (from the engine's TLS events)."""
    from smtpstate.engine import Engine
    from smtpstate.routing import Resolver

    def seen(ev: Any) -> None:
        if ev.mx_host and all(t["host"] != ev.mx_host or t["ip"] != ev.receiving_ip
                              or t["result"] != ev.result_type for t in tls):
            tls.append({"level": ev.level, "host": ev.mx_host, "ip": ev.receiving_ip,
                        "result": ev.result_type, "detail": ev.detail,
                        "version": ev.tls_version, "verified": ev.verified,
                        "resumed": ev.resumed, "policy": ev.policy_type})

    helo = options.pop("helo")
    with Engine(resolver=resolver or Resolver(), helo=helo, on_tls_event=seen) as engine:
        ticket = engine.submit(message, port=port, **options)
    return ticket.result


def _cmd_send(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from smtpstate.client import Client
    from smtpstate.errors import InvalidMessageError, InvalidOptionError
    from smtpstate.logs import transcript_handler
    from smtpstate.options import VERIFYING, Auth

    host: Optional[str] = None
    port = args.port
    if args.server is not None:
        try:
            if args.server.startswith("unix:"):
                host, port = args.server, 24
            else:
                host, port = parse_server(args.server, 465 if args.tls == "implicit" else 25)
        except ValueError as exc:
            parser.error(f"--server: {exc}")
    elif args.protocol == "lmtp":
        parser.error("--protocol lmtp needs --server (an LMTP server is named, not "
                     "found by MX)")
    message = _build_message(args, parser)
    creds = _credentials(args, parser)
    undo = None
    if args.verbose:
        _, undo = transcript_handler(sys.stderr.write)
        where = f"{host}:{port}" if host is not None else f"the MX hosts (port {port})"
        print(f" * connecting to {where}", file=sys.stderr)
    try:
        auth = None
        if creds is not None:
            auth = Auth(creds[0], creds[1], mechanism=args.auth_mechanism,
                        allow_plaintext=args.auth_plaintext)
        options = dict(timeout=args.timeout, helo=args.helo, tls=args.tls, auth=auth,
                       ca_file=args.ca_file, server_hostname=args.server_name,
                       dangerously_skip_certificate_verification=args.insecure,
                       protocol=args.protocol, ca_path=args.ca_path, cert_file=args.cert,
                       key_file=args.key, tls_min_version=args.tls_min_version,
                       ciphers=args.ciphers, ciphersuites=args.ciphersuites)
        if args.cert is not None and os.environ.get(ENV_KEY_PASSWORD):
            options["key_password"] = os.environ[ENV_KEY_PASSWORD]
        tls: List[Dict[str, Any]] = []
        if host is not None:
            with Client(host, port, **options) as client:
                result = client.send(message)
                version = client.tls_version
                level = client.options.tls
            if result.ok or result.stage_code > 0:          # it got connected
                tls.append({"level": level, "host": None, "ip": None, "detail": "",
                            "result": "success" if version else "none",
                            "version": version or "", "resumed": False,
                            "verified": bool(version) and level in VERIFYING
                            and not args.insecure})
        else:
            result = _send_by_mx(message, port, _resolver(args, parser), options, tls)
            if args.tls == "none":
                tls.append({"level": "none", "result": "none"})
    except (InvalidMessageError, InvalidOptionError) as exc:
        parser.error(str(exc))
    finally:
        if undo is not None:
            undo()
    if args.json:
        print(json.dumps({**_as_json(result), "tls": tls}, indent=2))
    else:
        _describe(result, sys.stdout)
        for line in _tls_lines(tls):
            print(line)
    return EXIT_CODES[_outcome(result)]


# ---------------------------------------------------------------------------
# states
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StateRow:
    """One state of a machine, as ``states`` prints it.

    Attributes:
        position: 1 for the first state run.
        id: the state's id.
        name: its name.
        builtin: True for the built-in states.
        pipelinable: it may run ahead under PIPELINING.
        awaiting: (code, name): the stage while its replies are awaited.
        after: (code, name): the stage once they came.
    """

    position: int
    id: int
    name: str
    builtin: bool
    pipelinable: bool
    awaiting: Tuple[int, str]
    after: Tuple[int, str]


def state_table(machine: Any) -> List[StateRow]:
    """Every state of ``machine`` in order, with the stages its own
    ``tostage``/``tostring`` report (asked on a session that never
    connects)."""
    from smtpstate._ffi import ffi, lib
    from smtpstate.machine import BUILTIN_STATES
    from smtpstate.session import Session

    session = Session(machine, "localhost")
    rows = []
    try:
        for position, (sid, name) in enumerate(machine.states, 1):
            st = lib.smtps_machine_get(machine._ptr, sid)
            stages = []
            for awaiting in (1, 0):
                code = int(st.tostage(session._ptr, awaiting, st.closure)
                           if st.tostage != ffi.NULL else lib.SMTPS_STAGE_UNKNOWN)
                text = ffi.NULL
                if st.tostring != ffi.NULL:
                    text = st.tostring(code, st.closure)
                if text == ffi.NULL:
                    text = lib.smtps_stage_name(code)
                stages.append((code, ffi.string(text).decode("utf-8", "replace")))
            rows.append(StateRow(position, sid, name,
                                 sid < len(BUILTIN_STATES) and name == BUILTIN_STATES[sid],
                                 bool(st.flags & lib.SMTPS_STATE_PIPELINABLE),
                                 stages[0], stages[1]))
    finally:
        session.close()
    return rows


def load_machine(specs: Sequence[str]) -> Any:
    """Import each spec (``module``, ``module:attr``, ``file.py`` or
    ``file.py:attr``) and return the machine to show: the last ``attr``
    named (a Machine, or a callable returning one), else the default
    machine, into which imported modules may have registered states.

    Raises:
        ValueError: a spec that cannot be loaded, or an attr that is no
            Machine.
    """
    from smtpstate.machine import Machine, default_machine

    machine = default_machine
    for spec in specs:
        target, attr = spec, ""
        if ":" in spec:
            target, attr = spec.rsplit(":", 1)
        try:
            if target.endswith(".py") or os.sep in target:
                module = _load_file(target)
            else:
                module = importlib.import_module(target)
        except (ImportError, OSError) as exc:
            raise ValueError(f"cannot load {target}: {exc}") from None
        if attr:
            try:
                obj = getattr(module, attr)
            except AttributeError:
                raise ValueError(f"{target} has no {attr!r}") from None
            if callable(obj) and not isinstance(obj, (Machine, type)):
                try:
                    obj = obj()
                except Exception as exc:
                    raise ValueError(f"{spec}() raised {type(exc).__name__}: {exc}") from None
            if not isinstance(obj, Machine):
                raise ValueError(f"{spec} is a {type(obj).__name__}, not a smtpstate.Machine")
            machine = obj
    return machine


def _load_file(path: str) -> Any:
    """Run a Python file as a module, its directory importable meanwhile
    (as when it runs as a script)."""
    name = "_smtpstate_load_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"not a Python file: {path}")
    module = importlib.util.module_from_spec(spec)
    here = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, here)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        if here in sys.path:
            sys.path.remove(here)
    return module


def _cmd_states(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        machine = load_machine(args.load)
    except ValueError as exc:
        parser.error(f"--load: {exc}")
    rows = state_table(machine)
    if args.json:
        print(json.dumps([{
            "position": r.position, "id": r.id, "name": r.name, "builtin": r.builtin,
            "pipelinable": r.pipelinable,
            "stage_awaiting": {"code": r.awaiting[0], "name": r.awaiting[1]},
            "stage_after": {"code": r.after[0], "name": r.after[1]},
        } for r in rows], indent=2))
        return 0
    width = max([len(r.name) for r in rows] + [5])
    print(f" id  {'state':<{width}}  stage awaiting replies         stage after")
    for r in rows:
        during = f"{r.awaiting[0]:>2} {r.awaiting[1]}"
        after = f"{r.after[0]:>2} {r.after[1]}"
        notes = [] if r.builtin else ["custom"]
        if r.pipelinable:
            notes.append("pipelinable")
        note = f"  ({', '.join(notes)})" if notes else ""
        print(f"{r.id:>3}  {r.name:<{width}}  {during:<30} {after}{note}")
    return 0


# ---------------------------------------------------------------------------
# demo, bench
# ---------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from smtpstate.demo import run_demo
    if args.count < 1:
        parser.error("--count must be at least 1")
    return run_demo(args.count, progress=not args.no_progress)


def _cmd_bench(args: argparse.Namespace) -> int:
    from smtpstate.bench import main as bench
    return bench(rounds=args.rounds, scale=0.5 if args.quick else 1.0)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def _send_parser(sub: Any) -> None:
    from smtpstate._ffi import AUTH_MECHANISMS     # C's list of mechanism names

    send = sub.add_parser(
        "send", help="send one message to a server (like swaks)",
        description="Send one message to one SMTP server and say what became of it.",
        epilog=_EPILOG_SEND, formatter_class=argparse.RawDescriptionHelpFormatter)
    send.add_argument("--server", "-s", metavar="HOST[:PORT]",
                      help="the server (port 25, 465 with --tls implicit; unix:/path); "
                           "default: each recipient's MX hosts")
    send.add_argument("--port", type=int, default=25, metavar="PORT",
                      help="without --server: the port of every MX host (default 25)")
    send.add_argument("--protocol", choices=("smtp", "lmtp"), default="smtp",
                      help="LMTP (RFC 2033) needs --server (default smtp)")
    send.add_argument("--from", "-f", dest="sender", metavar="ADDR",
                      help="the envelope sender (default: user@this-host, or the "
                           "headers of --data when --to is not given)")
    send.add_argument("--to", "-t", action="append", default=[], metavar="ADDR",
                      help="a recipient (repeat, or separate with commas); without "
                           "--to, --data's To/Cc/Bcc headers are used")
    send.add_argument("--data", "-d", metavar="FILE",
                      help="the message (RFC 5322, headers and body) from FILE, or "
                           "stdin with '-'; default: a generated test message")
    send.add_argument("--subject", help="the test message's subject")
    send.add_argument("--body", help="the test message's body")
    send.add_argument("--header", "-H", action="append", default=[], metavar="'NAME: VALUE'",
                      type=_header_arg, help="add or replace a header of the test message")
    send.add_argument("--tls", nargs="?", const="verify", default=None,
                      choices=("none", "opportunistic", "verify", "starttls", "implicit",
                               "dane", "dane-only", "mta-sts"),
                      help="--tls alone: verify (STARTTLS required, certificate checked); "
                           "or none, opportunistic (not checked), implicit (port 465), "
                           "dane or dane-only (by MX: TLSA records, DNSSEC), mta-sts (by MX: "
                           "the domain's MTA-STS policy only); default: "
                           "verify with --auth-user, else dane by MX and opportunistic "
                           "to a server")
    send.add_argument("--ca-file", metavar="PEM", help="CAs to trust (default: the system's)")
    send.add_argument("--server-name", metavar="NAME",
                      help="the name the certificate must carry (default: the host)")
    send.add_argument("--insecure", action="store_true",
                      help="accept any certificate (throwaway test servers only)")
    send.add_argument("--ca-path", metavar="DIR",
                      help="more CAs to trust: a directory of hashed certificates "
                           "(openssl rehash DIR)")
    send.add_argument("--cert", metavar="PEM",
                      help="a client certificate for a server that asks for one")
    send.add_argument("--key", metavar="PEM",
                      help=f"its private key (default: in --cert; password: ${ENV_KEY_PASSWORD})")
    send.add_argument("--tls-min-version", choices=("TLSv1.2", "TLSv1.3"), default="TLSv1.2",
                      help="the lowest TLS version to accept (default TLSv1.2)")
    send.add_argument("--ciphers", metavar="LIST",
                      help="OpenSSL cipher list for TLS 1.2 (default: OpenSSL's)")
    send.add_argument("--ciphersuites", metavar="LIST",
                      help="TLS 1.3 cipher suites, ':'-separated (default: OpenSSL's)")
    send.add_argument("--auth-user", "-au", metavar="USER", help=f"AUTH as USER (or ${ENV_USER})")
    send.add_argument("--auth-password", "-ap", metavar="SECRET",
                      help=f"the password (better: ${ENV_PASSWORD})")
    send.add_argument("--auth-mechanism", choices=tuple(AUTH_MECHANISMS),
                      type=str.upper, help="only this mechanism (default: the best offered)")
    send.add_argument("--auth-plaintext", action="store_true",
                      help="allow AUTH without TLS")
    send.add_argument("--helo", metavar="NAME", help="the EHLO name (default: this host's)")
    send.add_argument("--timeout", type=float, default=60.0, metavar="SECS",
                      help="connect and reply timeout (default 60)")
    send.add_argument("--dsn-ret", choices=("FULL", "HDRS"), type=str.upper,
                      help="DSN RET (RFC 3461), when the server offers DSN")
    send.add_argument("--envid", help="DSN ENVID (RFC 3461)")
    send.add_argument("--require-tls", action="store_true",
                      help="REQUIRETLS (RFC 8689): only over verified TLS to a server "
                           "that offers it")
    dns = send.add_argument_group("DNS, without --server")
    _resolver_arguments(dns)
    send.add_argument("--json", action="store_true", help="print the result as JSON")
    send.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                      help="print the dialogue on stderr (credentials redacted)")
    send.set_defaults(func=_cmd_send, subparser=send)


def _cmd_worker(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """smtpstate worker: consume delivery jobs from a broker (smtpstate.queue)."""
    from smtpstate.errors import InvalidOptionError
    from smtpstate.queue import run_workers
    from smtpstate.routing import load_limits

    try:
        schedule = tuple(float(s) for s in args.retry_schedule.split(",") if s.strip())
    except ValueError:
        parser.error(f"--retry-schedule must be seconds separated by commas, "
                     f"not {args.retry_schedule!r}")
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    options: Dict[str, Any] = {
        "queue": args.queue, "schedule": schedule, "max_age": args.max_age,
        "max_connections": args.max_connections,
        "max_per_destination": args.max_per_destination,
    }
    if args.prefetch is not None:
        options["prefetch"] = args.prefetch
    if args.visibility_timeout is not None:
        options["visibility_timeout"] = args.visibility_timeout
    if args.helo:
        options["helo"] = args.helo
    resolver = _resolver(args, parser)
    if resolver is not None:
        options["resolver"] = resolver
    # Checked here, before any process starts: a child's error would only
    # be logged, and the command would not say what to fix.
    try:
        if args.limits is not None:
            options["limits"] = load_limits(args.limits)
        if args.shared_limits is not None:
            from smtpstate.shared_limits import RateLimiter, shared_rates
            if not shared_rates(options.get("limits")):
                parser.error("--shared-limits needs --limits FILE with a message_rate for a "
                             "domain or '*' (the rate shared through Redis; mx: keys "
                             "cannot be shared)")
            RateLimiter(args.shared_limits).close()      # a URL redis-py refuses
            options["shared_limits"] = args.shared_limits
    except InvalidOptionError as e:
        parser.error(str(e))
    if args.print_results:
        def show(result: Dict[str, Any]) -> None:
            print(json.dumps(result, sort_keys=True), flush=True)
        options["on_result"] = show
    logging.getLogger("smtpstate.queue").setLevel(
        logging.DEBUG if args.verbose else logging.INFO)
    try:
        return run_workers(args.broker, args.processes, **options)
    except InvalidOptionError as e:
        parser.error(str(e))
    return 2


def _worker_parser(sub: Any) -> None:
    worker = sub.add_parser(
        "worker", help="deliver jobs from a RabbitMQ or Redis queue (docs/queue.md)",
        description="Consume delivery jobs that smtpstate.queue.enqueue() published, "
                    "deliver them through one long-lived Engine per process, publish "
                    "each final result to QUEUE.results. SIGTERM stops cleanly.")
    worker.add_argument("--broker", required=True, metavar="URL",
                        help="kombu URL: amqp://user:pass@host:5672// or redis://host:6379/0")
    worker.add_argument("--queue", default="smtpstate", metavar="Q",
                        help="the job queue (default smtpstate)")
    worker.add_argument("--processes", type=int, default=os.cpu_count() or 1, metavar="N",
                        help="worker processes (default: the number of cores)")
    worker.add_argument("--prefetch", type=int, metavar="N",
                        help="unacknowledged broker messages (a job or a batch) per "
                             "process (default: 2 x "
                             "--max-connections, at most 1000)")
    worker.add_argument("--max-connections", type=int, default=200, metavar="N",
                        help="connections per process (default 200)")
    worker.add_argument("--max-per-destination", type=int, default=10, metavar="N",
                        help="connections per destination per process (default 10)")
    worker.add_argument("--limits", metavar="FILE",
                        help="per-process limits per destination, from a JSON file: "
                             '{"example.com": {"connections": 5, "message_rate": 20}, '
                             '"mx:*.outlook.com": {...}, "*": {...}} (docs/queue.md)')
    worker.add_argument("--shared-limits", metavar="URL",
                        help="a Redis URL (redis://host:6379/1): the message_rate of "
                             "--limits' domain keys and '*' holds for every worker "
                             "using it together, not per process")
    worker.add_argument("--helo", metavar="NAME", help="the EHLO name (default: this host's)")
    worker.add_argument("--retry-schedule", default="300,600,1200,2400,4000",
                        metavar="S,S,...",
                        help="seconds before each retry, the last repeating "
                             "(default 300,600,1200,2400,4000)")
    worker.add_argument("--max-age", type=float, default=5 * 86400.0, metavar="SECONDS",
                        help="give up (permfail 5.4.7, expired) this long after the first "
                             "enqueue (default 5 days)")
    worker.add_argument("--visibility-timeout", type=float, metavar="SECONDS",
                        help="Redis only: a worker's lease, renewed while it lives; the "
                             "jobs of a worker that died are handed out again this long "
                             "after (default 30)")
    worker.add_argument("--print-results", action="store_true",
                        help="also print each final result as a JSON line")
    _resolver_arguments(worker.add_argument_group("DNS"))
    worker.set_defaults(func=_cmd_worker, subparser=worker)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; return the exit code."""
    parser = _Parser(prog="smtpstate",
                     description="SMTP client engine with a modular state machine")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="send: print the dialogue; other commands: log at DEBUG")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _send_parser(sub)
    _worker_parser(sub)
    states = sub.add_parser("states", help="print a machine's state order and stages")
    states.add_argument("--load", action="append", default=[],
                        metavar="MODULE[:ATTR] | FILE.py[:ATTR]",
                        help="import a module or file first (it may register states in "
                             "the default machine); with :ATTR, show that Machine (or "
                             "what that function returns) instead")
    states.add_argument("--json", action="store_true", help="print the table as JSON")
    states.set_defaults(func=_cmd_states, subparser=states)
    demo = sub.add_parser("demo", help="deliver a batch to an embedded aiosmtpd and show it")
    demo.add_argument("--count", type=int, default=20, help="messages to send (default 20)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    demo.set_defaults(func=_cmd_demo, subparser=demo)
    bench = sub.add_parser("bench", help="quick benchmark against Postfix smtp-sink "
                           "(and smtp-source) on loopback")
    bench.add_argument("--quick", action="store_true", help="half the messages (a CI smoke run)")
    bench.add_argument("--rounds", type=int, default=5,
                       help="interleaved rounds, medians reported (default 5)")
    bench.set_defaults(func=_cmd_bench, subparser=bench)
    # An unknown option is the command's error, said with its own name
    # (parse_args would blame "smtpstate" for "smtpstate send --bogus").
    args, extra = parser.parse_known_args(argv)
    if extra:
        getattr(args, "subparser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    # send: -v shows the dialogue (a handler of its own), -vv logs the rest
    # too; the other commands log at DEBUG with -v.
    debug = args.verbose >= (2 if args.command == "send" else 1)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(name)s: %(message)s")
    try:
        if args.command == "bench":
            return int(args.func(args))
        # Usage errors show the command's own usage line.
        return int(args.func(args, getattr(args, "subparser", parser)))
    except BrokenPipeError:
        # The reader went away (| head): say nothing more, not even at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
