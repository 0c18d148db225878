"""Hostile input from the caller: whatever a program hands the library,
nothing unsafe reaches the socket.

Each case gives the library something it must not put on the wire as it
is (CR, LF, NUL and other controls in addresses, ESMTP parameters, the EHLO
name, the host, commands sent by custom states; non-ASCII addresses for a
server without SMTPUTF8; over-long lines; content that is not bytes; a
Python state that fails after the 354 or calls back into its own client;
wrong types) and asserts both sides: a clear Python exception or a clean
per-message result, and the exact bytes a hostile server on loopback
(``tests/hostile.py``) received -- usually none at all.

The checks that protect the wire exist twice, in Python (to say what to
fix) and in C (so that nothing gets past them): several cases go around
the Python ones to show the C ones hold.
"""

from __future__ import annotations

import asyncio
import re
import threading
from typing import Any, List, Optional, Tuple

import pytest

import smtpstate
from smtpstate import (Action, Auth, Client, Engine, InvalidMessageError, InvalidOptionError,
                       LocalProtocolError, Machine, Message, Recipient, State, aio)
from smtpstate._core import ffi, lib

from hostile import DRIVERS, HELO, Servers, deliver, greet, send, serve

SENDER = "sender@client.test"
RCPT = "rcpt@server.test"
BODY = b"Subject: input\r\n\r\nhello\r\n"

EHLO = b"EHLO %s\r\n" % HELO.encode()
MAIL = b"MAIL FROM:<%s>\r\n" % SENDER.encode()
RCPT_LINE = b"RCPT TO:<%s>\r\n" % RCPT.encode()
TX = MAIL + RCPT_LINE + b"DATA\r\n" + BODY + b".\r\n"
QUIT = b"QUIT\r\n"
LONG = 5.0

#: Characters that must never get into a command line.
CONTROLS = ["\r", "\n", "\r\n", "\x00", "\x01", "\x08", "\x0b", "\x0c", "\x1b", "\x7f",
            "\x85", "\x9b"]


def msg(**kw: Any) -> Message:
    kw.setdefault("sender", SENDER)
    kw.setdefault("recipients", [RCPT])
    kw.setdefault("data", BODY)
    return Message(**kw)


@pytest.fixture
def hostile():
    servers = Servers()
    yield servers
    servers.stop()


@pytest.fixture(params=DRIVERS)
def driver(request):
    return request.param


def unchecked_message(sender: str, recipients: Any, data: bytes = BODY,
                      envid: Optional[str] = None) -> Message:
    """A Message that skipped its Python checks, as a buggy subclass or a
    careless pickle could make one: only C stands in the way now."""
    m = object.__new__(Message)
    rcpts = tuple(r if isinstance(r, Recipient) else _unchecked_rcpt(r) for r in recipients)
    for name, value in (("sender", sender), ("recipients", tuple(r.address for r in rcpts)),
                        ("data", data), ("dsn_ret", None), ("envid", envid),
                        ("_rcpts", rcpts)):
        object.__setattr__(m, name, value)
    return m


def _unchecked_rcpt(address: str, orcpt: Optional[str] = None) -> Recipient:
    r = object.__new__(Recipient)
    for name, value in (("address", address), ("notify", ()), ("orcpt", orcpt)):
        object.__setattr__(r, name, value)
    return r


# ---------------------------------------------------------------------------
# 1. Control characters in addresses and ESMTP parameters
# ---------------------------------------------------------------------------

FIELDS = {
    "sender": lambda bad: msg(sender=f"a{bad}b@client.test"),
    "recipient": lambda bad: msg(recipients=[f"a{bad}b@server.test"]),
    "second recipient": lambda bad: msg(recipients=[RCPT, f"x{bad}RCPT TO:<v@x.test>"]),
    "Recipient object": lambda bad: msg(recipients=[Recipient(f"a{bad}@x.test")]),
    "ORCPT": lambda bad: msg(recipients=[Recipient(RCPT, orcpt=f"o{bad}@x.test")]),
    "ENVID": lambda bad: msg(envid=f"id{bad}1"),
}


@pytest.mark.parametrize("field", sorted(FIELDS))
@pytest.mark.parametrize("bad", CONTROLS, ids=[repr(c) for c in CONTROLS])
def test_control_characters_are_refused_when_the_message_is_made(field, bad):
    with pytest.raises(InvalidMessageError, match="control character"):
        FIELDS[field](bad)


@pytest.mark.parametrize("bad", ["<", ">"])
def test_angle_brackets_cannot_close_the_path(bad):
    """``a@x> SIZE=1`` would close the path and add a parameter."""
    with pytest.raises(InvalidMessageError, match="angle brackets"):
        msg(sender=f"a@x.test{bad} SIZE=1")
    with pytest.raises(InvalidMessageError, match="angle brackets"):
        msg(recipients=[f"a@x.test{bad} NOTIFY=NEVER"])


@pytest.mark.parametrize("where", ["sender", "recipient", "ORCPT", "ENVID"])
@pytest.mark.parametrize("bad", ["\r\n", "\n", "\x00", "\x7f", ">", "\x1b"])
def test_c_refuses_what_python_was_made_to_skip(hostile, where, bad):
    """Around the Python checks, C's message functions still refuse: the
    send raises before a connection is even opened."""
    server = hostile([greet(), serve()])
    m = unchecked_message(
        f"a{bad}b@x.test" if where == "sender" else SENDER,
        [f"a{bad}b@x.test" if where == "recipient" else
         _unchecked_rcpt(RCPT, orcpt=f"o{bad}@x.test" if where == "ORCPT" else None)],
        envid=f"id{bad}" if where == "ENVID" else None)
    with Client(server.host, server.port, helo=HELO, timeout=LONG) as client:
        with pytest.raises(InvalidMessageError):
            client.send(m)
    assert server.conns == []


def test_c_message_functions_refuse_controls_directly():
    m = ffi.gc(lib.smtps_message_new(), lib.smtps_message_free)
    for bad in (b"a\r\nb", b"a\nb", b"a\x00b", b"a\x7fb", b"<a>", b"a\x1b"):
        assert lib.smtps_message_set_sender(m, bad, len(bad)) == lib.SMTPS_EINVAL
        assert lib.smtps_message_add_recipient(m, bad, len(bad), 0, ffi.NULL, 0) \
            == lib.SMTPS_EINVAL
        assert lib.smtps_message_add_recipient(m, b"r@x", 3, 0, bad, len(bad)) \
            == lib.SMTPS_EINVAL
        assert lib.smtps_message_set_dsn(m, 0, bad, len(bad)) == lib.SMTPS_EINVAL
    # NOTIFY bits outside the four defined, or NEVER with another.
    assert lib.smtps_message_add_recipient(m, b"r@x", 3, 1 << 4, ffi.NULL, 0) \
        == lib.SMTPS_EINVAL
    assert lib.smtps_message_add_recipient(
        m, b"r@x", 3, lib.SMTPS_NOTIFY_NEVER | lib.SMTPS_NOTIFY_SUCCESS, ffi.NULL, 0) \
        == lib.SMTPS_EINVAL


def test_esmtp_parameters_are_xtext_encoded(hostile):
    """ENVID and ORCPT may hold '+', '=' and spaces: they leave xtext-encoded
    (RFC 3461 4), so they can never split into another parameter."""
    server = hostile([greet(), serve(ehlo=["DSN"])])
    m = msg(recipients=[Recipient(RCPT, notify=("failure", "delay"),
                                  orcpt="a b+c=d@x.test")],
            envid="id=1 RET=FULL+x", dsn_ret="hdrs")
    (r,) = deliver("client", [m], server, timeout=LONG)
    assert r.ok, r
    assert server.conn.commands[1:3] == [
        MAIL[:-2] + b" RET=HDRS ENVID=id+3D1+20RET+3DFULL+2Bx\r\n",
        RCPT_LINE[:-2] + b" NOTIFY=FAILURE,DELAY ORCPT=rfc822;a+20b+2Bc+3Dd@x.test\r\n"]


# ---------------------------------------------------------------------------
# 2. The EHLO name, the host and the other options
# ---------------------------------------------------------------------------

BAD_NAMES = ["", "a b", "a\r\nMAIL FROM:<x@y>", "a\nb", "a\x00b", "a\tb", "héllo",
             "x" * 256, 5, b"bytes.test"]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=[repr(b)[:20] for b in BAD_NAMES])
def test_bad_ehlo_name_is_refused_before_connecting(hostile, bad):
    """Every driver refuses the name when it is given, not when the first
    connection is already open."""
    server = hostile([greet(), serve()])
    with pytest.raises(InvalidOptionError, match="HELO name"):
        Client(server.host, server.port, helo=bad)
    with pytest.raises(InvalidOptionError, match="HELO name"):
        aio.Client(server.host, server.port, helo=bad)
    with Engine(helo=HELO) as engine:
        with pytest.raises(InvalidOptionError, match="HELO name"):
            engine.submit(msg(), server.host, server.port, helo=bad)
    if isinstance(bad, str):
        with pytest.raises(InvalidOptionError, match="HELO name"):
            Engine(helo=bad)
    assert server.conns == []


def test_ehlo_name_none_means_the_default(hostile):
    """helo=None is not a bad name but "the default": every driver takes it
    and says EHLO with this host's name."""
    server = hostile([greet(), serve()])
    default = smtpstate.client._default_helo()
    for driver in DRIVERS:
        (r,) = deliver(driver, [msg()], server, helo=None, timeout=LONG)
        assert r.ok, (driver, r)
    conns = server.wait(len(DRIVERS))
    assert [c.commands[0] for c in conns] == [b"EHLO %s\r\n" % default.encode()] * len(DRIVERS)


BAD_HOSTS = ["127.0.0.1\x00.evil.test", "127.0.0.1\r\n", "a b", "", "x" * 256, 127001,
             b"127.0.0.1"]


@pytest.mark.parametrize("bad", BAD_HOSTS, ids=[repr(b)[:20] for b in BAD_HOSTS])
def test_bad_host_is_refused(bad):
    """A NUL would end the name in C and in the resolver: "127.0.0.1\\0.evil"
    would quietly connect to 127.0.0.1."""
    with pytest.raises(InvalidOptionError, match="host"):
        Client(bad, 25)
    with pytest.raises(InvalidOptionError, match="host"):
        aio.Client(bad, 25)
    with Engine(helo=HELO) as engine:
        with pytest.raises(InvalidOptionError, match="host"):
            engine.submit(msg(), bad, 25)


#: Ports every driver must refuse, made from the server's own port: C's
#: 16-bit field would turn port + 65536 into port, int() would truncate
#: port + 0.9 to it, and int("port") would parse it. Refused, none of them
#: may reach the server.
BAD_PORTS = {
    "wraps to it": lambda port: port + 65536,
    "float": lambda port: port + 0.9,
    "whole float": lambda port: float(port),
    "str": lambda port: str(port),
    "bool": lambda port: True,
    "zero": lambda port: 0,
    "negative": lambda port: -port,
    "None": lambda port: None,
}


@pytest.mark.parametrize("make_bad", BAD_PORTS.values(), ids=BAD_PORTS.keys())
def test_bad_port_is_refused_by_every_driver(hostile, make_bad):
    server = hostile([greet(), serve()])
    bad = make_bad(server.port)
    named = re.escape(repr(bad))                        # the error names the value
    with pytest.raises(InvalidOptionError, match=named):
        Client(server.host, bad, helo=HELO)
    with pytest.raises(InvalidOptionError, match=named):
        aio.Client(server.host, bad, helo=HELO)
    with pytest.raises(InvalidOptionError, match=named):
        asyncio.run(aio.send(msg(), server.host, bad, helo=HELO, timeout=LONG))
    with pytest.raises(InvalidOptionError, match=named):
        asyncio.run(aio.deliver([msg()], server.host, bad, helo=HELO, timeout=LONG))
    with Engine(helo=HELO) as engine:
        with pytest.raises(InvalidOptionError, match=named):
            engine.submit(msg(), server.host, bad)
    with pytest.raises(InvalidOptionError, match=named):
        smtpstate.deliver([msg()], server.host, bad, helo=HELO, timeout=LONG)
    # The same server, its port given right: it was reachable all along.
    (ok,) = deliver("client", [msg()], server, timeout=LONG)
    assert ok.ok, ok
    assert len(server.conns) == 1


@pytest.mark.parametrize("options, match", [
    (dict(timeout="5"), "timeout"),
    (dict(timeout=0), "timeout"),
    (dict(timeout=-1), "timeout"),
    (dict(timeout=float("nan")), "timeout"),
    (dict(timeout=float("inf")), "timeout"),
    (dict(timeout=True), "timeout"),
    (dict(tls=""), "tls"),
    (dict(tls="STARTTLS"), "tls"),
    (dict(server_hostname="mx.test\r\nQUIT", tls="starttls"), "server_hostname"),
    (dict(server_hostname="mx\x00.test", tls="starttls"), "server_hostname"),
    (dict(auth=("user",)), "auth"),
    (dict(auth=("user", 5)), "auth"),
    (dict(auth=("us\x00er", "secret")), "auth"),
    (dict(auth=("user", "")), "auth"),
    (dict(ca_file="/nonexistent/ca.pem", tls="starttls"), "ca_file"),
])
def test_bad_options_every_driver(options, match):
    with pytest.raises(InvalidOptionError, match=match):
        Client("127.0.0.1", 25, **options)
    with pytest.raises(InvalidOptionError, match=match):
        aio.Client("127.0.0.1", 25, **options)
    with Engine(helo=HELO) as engine:
        with pytest.raises(InvalidOptionError, match=match):
            engine.submit(msg(), "127.0.0.1", 25, **options)


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="timout"):
        Client("127.0.0.1", 25, timout=5)
    with pytest.raises(TypeError, match="unknown option"):
        aio.Client("127.0.0.1", 25, starttls=True)


@pytest.mark.parametrize("make, match", [
    (lambda: Engine(max_connections=0), "max_connections"),
    (lambda: Engine(messages_per_connection=-1), "messages_per_connection"),
    (lambda: Engine(connect_timeout=True), "connect_timeout"),
    (lambda: Engine(idle_timeout="5"), "idle_timeout"),
    (lambda: smtpstate.deliver([], "127.0.0.1", 25, concurrency=0), "concurrency"),
    (lambda: asyncio.run(aio.deliver([], "127.0.0.1", 25, concurrency=0)), "concurrency"),
    (lambda: asyncio.run(aio.deliver([], "127.0.0.1", 25, concurrency=2.5)), "concurrency"),
    (lambda: smtpstate.classify.register_class(0, "zero"), "1-"),
    (lambda: smtpstate.classify.add_rule(smtpstate.classify.TIMEOUT), "needs"),
    (lambda: Auth("user", ""), "secret"),
])
def test_what_is_not_the_message_raises_invalid_option_error(make, match):
    """The class says whose input was wrong: an option, limit or setting is
    never reported as a bad message (and is still a ValueError)."""
    with pytest.raises(InvalidOptionError, match=match) as caught:
        make()
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, smtpstate.SMTPStateError)
    assert not isinstance(caught.value, InvalidMessageError)


def test_credentials_with_line_breaks_stay_inside_base64(hostile):
    """AUTH PLAIN carries user and secret base64-encoded: a CR LF in them
    is data, never a line break on the wire."""
    import base64
    server = hostile([greet(), serve({"AUTH": b"235 2.7.0 ok\r\n"},
                                     ehlo=["AUTH PLAIN"])])
    auth = Auth("user\r\nQUIT", "pass\r\nRSET", mechanism="PLAIN", allow_plaintext=True)
    (r,) = deliver("client", [msg()], server, auth=auth, timeout=LONG)
    assert r.ok, r
    line = server.conn.commands[1]
    assert line.startswith(b"AUTH PLAIN ") and line.count(b"\r\n") == 1
    assert base64.b64decode(line.split()[2]) == b"\x00user\r\nQUIT\x00pass\r\nRSET"
    assert QUIT not in server.conn.received[:-len(QUIT)]


# ---------------------------------------------------------------------------
# 3. Commands sent by custom states
# ---------------------------------------------------------------------------


class Sender(State):
    """After MAIL: sends ``line`` and waits for its reply."""

    name = "SENDER"

    def __init__(self, line: Any) -> None:
        self.line = line

    def setup(self, session) -> int:
        session.send(self.line)
        return 1

    def callback(self, session, reply):
        return Action.NEXT


@pytest.mark.parametrize("line, exc", [
    ("NOOP\r\nRCPT TO:<victim@x.test>", "InvalidMessageError"),
    ("NOOP\nRCPT TO:<victim@x.test>", "InvalidMessageError"),
    ("NOOP\rRCPT TO:<victim@x.test>", "InvalidMessageError"),
    (b"NOOP\r\nRCPT TO:<victim@x.test>", "InvalidMessageError"),
    ("NOOP\x00victim", "InvalidMessageError"),
    ("NOOP \x1b[2Jvictim", "InvalidMessageError"),
    ("NOOP\x7fvictim", "InvalidMessageError"),
    ("", "InvalidMessageError"),
    ("X" * 2047, "InvalidMessageError"),
    ("NOOP \udc80victim", "InvalidMessageError"),
    (5, "TypeError"),                                 # bytes(5) would be five NULs
    (None, "TypeError"),
    (["NOOP"], "TypeError"),
])
def test_state_command_lines_are_checked(hostile, line, exc):
    """The state's exception fails its message (its Result says which state
    raised what); not a byte of the line was sent; the connection goes on
    with RSET and the next message."""
    machine = Machine()
    machine.register(Sender(line), after="MAIL")
    server = hostile([greet(), serve()])
    first, second = deliver("client", [msg(), msg()], server, machine=machine, timeout=LONG)
    assert first.status == "permfail" and first.state == "SENDER", first
    assert f"raised {exc}" in first.error
    assert second.status == "permfail"                 # the same state, the same fate
    assert bytes(server.conn.received) == EHLO + MAIL + b"RSET\r\n" + MAIL + QUIT


def test_state_command_line_of_the_longest_size_goes_out(hostile):
    machine = Machine()
    machine.register(Sender("NOOP " + "x" * 2041), after="MAIL")
    server = hostile([greet(), serve()])
    (r,) = deliver("client", [msg()], server, machine=machine, timeout=LONG)
    assert r.ok, r
    assert server.conn.commands[2] == b"NOOP " + b"x" * 2041 + b"\r\n"


def test_c_send_line_refuses_controls():
    """The C function states call, without the Python wrapper in front."""
    from scripted import ScriptedSession
    s = ScriptedSession()
    s.start()
    s.feed(b"220 server.example\r\n")
    for bad in (b"A\r\nB", b"A\nB", b"A\rB", b"A\x00B", b"A\x7fB"):
        assert lib.smtps_session_send_line(s.ptr, bad, len(bad)) == lib.SMTPS_EINVAL
    assert lib.smtps_session_send_line(s.ptr, b"x" * 2047, 2047) == lib.SMTPS_ETOOBIG
    s.finish()


# ---------------------------------------------------------------------------
# 4. Non-ASCII and over-long input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["sender", "recipient"])
def test_non_ascii_address_without_smtputf8(hostile, driver, field):
    """Refused before MAIL, the server's MAIL never sees it; the connection
    goes on, with no RSET (nothing was open), for the next message."""
    addr = "jürgen@exämple.test"
    m = msg(sender=addr) if field == "sender" else msg(recipients=[addr])
    server = hostile([greet(), serve(ehlo=["8BITMIME", "PIPELINING"])])
    bad, good = deliver(driver, [m, msg()], server, timeout=LONG)
    assert bad.status == "permfail" and "SMTPUTF8" in bad.reason, bad
    assert good.ok, good
    assert bytes(server.conn.received) == EHLO + TX + QUIT


def test_non_ascii_address_with_smtputf8(hostile):
    addr = "jürgen@exämple.test"
    server = hostile([greet(), serve(ehlo=["SMTPUTF8", "8BITMIME"])])
    (r,) = deliver("client", [msg(sender=addr, recipients=[addr])], server, timeout=LONG)
    assert r.ok, r
    raw = addr.encode("utf-8")
    assert server.conn.commands[1:3] == [b"MAIL FROM:<" + raw + b"> SMTPUTF8\r\n",
                                         b"RCPT TO:<" + raw + b">\r\n"]


def test_eight_bit_body_without_8bitmime(hostile):
    server = hostile([greet(), serve()])
    (r,) = deliver("client", [msg(data=b"Subject: x\r\n\r\ncaf\xc3\xa9\r\n")], server,
                   timeout=LONG)
    assert r.status == "permfail" and "8BITMIME" in r.reason, r
    assert bytes(server.conn.received) == EHLO + QUIT


def test_over_long_rcpt_line_is_refused_whole(hostile):
    """A recipient whose RCPT line (with its xtext ORCPT, three bytes for
    each '+') would pass 2048 bytes: refused, never cut short on the wire."""
    server = hostile([greet(), serve(ehlo=["DSN"])])
    big = Recipient("r" * 1000 + "@x.test", orcpt="+" * 1000 + "@x.test")
    bad, good = deliver("client", [msg(recipients=[big]), msg()], server, timeout=LONG)
    assert bad.status == "permfail" and bad.state == "RCPT", bad
    assert "size limit exceeded" in bad.reason
    assert good.ok, good
    assert b"r" * 1000 not in server.conn.received
    assert bytes(server.conn.received).startswith(EHLO + MAIL + b"RSET\r\n" + MAIL)


def test_over_long_addresses_are_refused():
    with pytest.raises(InvalidMessageError, match="longer than 1024"):
        msg(sender="s" * 1020 + "@x.test")
    with pytest.raises(InvalidMessageError, match="longer than 1024"):
        msg(recipients=["r" * 1020 + "@x.test"])
    with pytest.raises(InvalidMessageError, match="longer than 100"):
        msg(envid="e" * 101)


def test_over_long_body_line_is_refused_unless_allowed(hostile):
    """Lines over 998 octets (RFC 5322 2.1.1) are refused before anything is
    sent, naming the line: a hop may fold, cut or refuse them. Allowed, they
    go out intact: the client neither cuts nor folds them (that would
    change signed content), and a dot at their start is still escaped."""
    body = b"first\n" + b"." + b"x" * 100_000 + b"\n.short\n"
    with pytest.raises(InvalidMessageError, match="line 2 of the message body is longer "
                       "than 998 octets.*long_lines='allow'"):
        msg(data=body)
    with pytest.raises(InvalidMessageError, match="line 1 "):
        msg(data=b"y" * 999)                           # even unterminated
    msg(data=b"y" * 998 + b"\r\n" + b"z" * 998)        # 998 is allowed
    server = hostile([greet(), serve()])
    (r,) = deliver("client", [msg(data=body, long_lines="allow")], server, timeout=LONG)
    assert r.ok
    assert server.conn.data == [b"first\r\n.." + b"x" * 100_000 + b"\r\n..short\r\n.\r\n"]


@pytest.mark.parametrize("body, line, offset", [
    (b"\0", 1, 0),
    (b"Subject: x\r\n\r\nab\0c\r\n", 3, 16),
    (b"a\r\n\r\n.\0\r\n", 3, 6),                  # the smuggling vector's NUL
])
def test_nul_in_the_body_is_refused(body, line, offset):
    """A lenient hop drops NULs, turning CR LF NUL . CR LF into an end of
    data: a NUL byte is refused before anything is sent, with where it is."""
    with pytest.raises(InvalidMessageError, match=f"NUL byte \\(line {line}, offset {offset}\\)"):
        msg(data=body)
    with pytest.raises(InvalidMessageError, match="NUL"):
        msg(data=memoryview(body))


# ---------------------------------------------------------------------------
# 5. Content that is not bytes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    None, 42, object(), "text with a lone surrogate \udc80",
], ids=["None", "int", "object", "surrogate"])
def test_content_must_be_bytes_str_a_buffer_a_file_or_pieces(data):
    with pytest.raises(InvalidMessageError, match="data"):
        msg(data=data)


def test_text_file_is_refused():
    import io
    with pytest.raises(InvalidMessageError, match="binary mode"):
        msg(data=io.StringIO("Subject: x\n\nbody\n"))


def test_bytes_like_content_is_copied():
    buf = bytearray(b"Subject: x\r\n\r\nbody\r\n")
    m = msg(data=buf)
    buf[:] = b"changed"
    assert m.data == b"Subject: x\r\n\r\nbody\r\n"


# ---------------------------------------------------------------------------
# 6. A state that fails after the 354
# ---------------------------------------------------------------------------


class AfterData(State):
    """Inserted after DATA, before BODY: it runs once the server said 354
    and waits for message data."""

    name = "AFTER-354"

    def __init__(self, how: str) -> None:
        self.how = how

    def setup(self, session) -> Any:
        if self.how == "setup-raises":
            raise RuntimeError("setup failed")
        if self.how == "sends-a-command":
            session.send("NOOP")
        if self.how == "bad-setup-return":
            return "one"
        return 0

    def callback(self, session, reply) -> Any:
        if self.how == "callback-raises":
            raise RuntimeError("callback failed")
        if self.how == "tempfail":
            return Action.TEMPFAIL_TX
        if self.how == "permfail":
            return Action.PERMFAIL_TX
        if self.how == "fail-conn":
            return Action.FAIL_CONN
        if self.how == "bad-return":
            return 12345
        if self.how.startswith("jump-"):
            session.next_state(self.how[5:].upper())
            return Action.JUMP
        return Action.NEXT


HOWS = ["setup-raises", "callback-raises", "bad-setup-return", "bad-return", "tempfail",
        "permfail", "fail-conn", "sends-a-command", "jump-quit", "jump-rset", "jump-mail",
        "jump-data"]


@pytest.mark.parametrize("how", HOWS)
def test_failure_after_354_never_sends_the_dot(hostile, how):
    """After 354 the server reads message text: a dot would deliver an empty
    (or cut) message, RSET or QUIT would become part of it. The client sends
    nothing more and closes; the server discards the message. The next
    message gets a new connection."""
    machine = Machine()
    machine.register(AfterData(how), after="DATA")
    server = hostile([greet(), serve()])
    first, second = deliver("client", [msg(), msg()], server, machine=machine, timeout=LONG)
    assert first.status in ("tempfail", "permfail"), first
    assert second.status == first.status
    conns = server.wait(2)
    for conn in conns:
        assert bytes(conn.received) == EHLO + MAIL + RCPT_LINE + b"DATA\r\n"
        assert conn.data == []
        assert_closed(conn)
    if how.endswith("raises") or how.startswith("bad") or how == "sends-a-command":
        assert "AFTER-354" in (first.error or ""), first


@pytest.mark.parametrize("how", ["callback-raises", "sends-a-command"])
def test_failure_after_354_every_driver(hostile, driver, how):
    machine = Machine()
    machine.register(AfterData(how), after="DATA")
    server = hostile([greet(), serve()])
    first, second = deliver(driver, [msg(), msg()], server, machine=machine, timeout=LONG)
    assert first.status == second.status == "permfail", (first, second)
    assert "AFTER-354" in first.error
    conns = server.wait(2)
    assert len(conns) == 2
    for conn in conns:
        assert bytes(conn.received) == EHLO + MAIL + RCPT_LINE + b"DATA\r\n"


def test_failure_after_354_with_pipelining(hostile):
    machine = Machine()
    machine.register(AfterData("callback-raises"), after="DATA")

    def batch(conn, line):
        conn.commands += [conn.read_line(), conn.read_line()]
        return [send(b"250 ok\r\n250 ok\r\n354 go\r\n")]
    server = hostile([greet(), serve({"MAIL": batch}, ehlo=["PIPELINING"])])
    (r,) = deliver("client", [msg()], server, machine=machine, timeout=LONG)
    assert r.status == "permfail"
    assert bytes(server.conn.received) == EHLO + MAIL + RCPT_LINE + b"DATA\r\n"


def test_a_state_after_data_that_succeeds_changes_nothing(hostile):
    machine = Machine()
    machine.register(AfterData("nothing"), after="DATA")
    server = hostile([greet(), serve()])
    results = deliver("client", [msg(), msg()], server, machine=machine, timeout=LONG)
    assert [r.status for r in results] == ["delivered", "delivered"]
    assert bytes(server.conn.received) == EHLO + TX + TX + QUIT


def test_failure_after_data_under_chunking_keeps_the_connection(hostile):
    """With CHUNKING there is no 354: the state fails before BDAT, nothing
    of the message was sent, and RSET makes the connection usable again."""
    machine = Machine()
    machine.register(AfterData("callback-raises"), after="DATA")
    server = hostile([greet(), serve(ehlo=["CHUNKING"])])
    first, second = deliver("client", [msg(), msg()], server, machine=machine, timeout=LONG)
    assert first.status == second.status == "permfail"
    assert bytes(server.conn.received) == (EHLO + MAIL + RCPT_LINE + b"RSET\r\n"
                                           + MAIL + RCPT_LINE + QUIT)


def assert_closed(conn: Any) -> None:
    assert conn.gone, f"connection {conn.index} left open: {conn!r}"


# ---------------------------------------------------------------------------
# 7. A state that calls back into its own driver
# ---------------------------------------------------------------------------


class CallsBack(State):
    name = "CALLS-BACK"

    def __init__(self, what: str) -> None:
        self.what = what
        self.target: Any = None

    def setup(self, session) -> int:
        if self.what == "send":
            self.target.send(msg())
        elif self.what == "close":
            self.target.close()
        elif self.what == "connect":
            self.target.connect()
        elif self.what == "run":
            list(self.target.run(timeout=1))
        else:                                    # a property that reads C
            getattr(self.target, self.what)
        return 0


@pytest.mark.parametrize("what", ["send", "close", "connect", "capabilities", "tls_version",
                                  "connected"])
def test_state_calling_its_own_client(hostile, what):
    """One call at a time: the re-entrant call raises LocalProtocolError in
    the state, which fails that message only; the connection goes on."""
    state = CallsBack(what)
    machine = Machine()
    machine.register(state, after="MAIL")
    server = hostile([greet(), serve()])
    with Client(server.host, server.port, machine=machine, helo=HELO, timeout=LONG) as client:
        state.target = client
        r = client.send(msg())
        assert client.connected
    assert r.status == "permfail" and "LocalProtocolError" in r.error, r
    assert "already in use" in r.error
    assert bytes(server.conn.received) == EHLO + MAIL + QUIT


@pytest.mark.parametrize("what", ["run", "close", "connections"])
def test_state_calling_its_own_engine(hostile, what):
    state = CallsBack(what)
    machine = Machine()
    machine.register(state, after="MAIL")
    server = hostile([greet(), serve()])
    with Engine(machine=machine, helo=HELO) as engine:
        state.target = engine
        t = engine.submit(msg(), server.host, server.port, timeout=LONG)
        list(engine.run(timeout=10))
    assert t.result.status == "permfail" and "LocalProtocolError" in t.result.error
    assert bytes(server.conn.received) == EHLO + MAIL + QUIT


class Holds(State):
    """Holds its driver's call open (in C, the guard taken) until released,
    so that another thread can be caught calling in meanwhile."""

    name = "HOLDS"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def setup(self, session) -> int:
        self.entered.set()
        self.release.wait(LONG)
        return 0


def _in_thread(fn: Any) -> Tuple[threading.Thread, List[Any]]:
    """Run fn() in a thread; the list gets its return value or exception."""
    out: List[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:             # handed to the test
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_client_properties_refuse_another_thread_while_a_call_runs(hostile):
    """capabilities, tls_version and connected read the C session: while
    send() runs in one thread, another thread reading them would race C
    (and could find the session freed under it)."""
    state = Holds()
    machine = Machine()
    machine.register(state, after="MAIL")
    server = hostile([greet(), serve()])
    with Client(server.host, server.port, machine=machine, helo=HELO, timeout=LONG) as client:
        thread, out = _in_thread(lambda: client.send(msg()))
        try:
            assert state.entered.wait(LONG)
            for name in ("capabilities", "tls_version", "connected"):
                with pytest.raises(LocalProtocolError, match="already in use"):
                    getattr(client, name)
        finally:
            state.release.set()
            thread.join(LONG)
        (r,) = out
        assert isinstance(r, smtpstate.Result) and r.ok, r
        # The call over, they answer again.
        assert client.connected and client.tls_version is None
        assert isinstance(client.capabilities, smtpstate.Capabilities)


def test_engine_connections_refuses_another_thread_while_run_runs(hostile):
    state = Holds()
    machine = Machine()
    machine.register(state, after="MAIL")
    server = hostile([greet(), serve()])
    with Engine(machine=machine, helo=HELO) as engine:
        t = engine.submit(msg(), server.host, server.port, timeout=LONG)
        thread, out = _in_thread(lambda: list(engine.run(timeout=2 * LONG)))
        try:
            assert state.entered.wait(LONG)
            with pytest.raises(LocalProtocolError, match="already in use"):
                engine.connections
            assert repr(engine) == "<Engine pending=1 connections=?>"   # never raises
        finally:
            state.release.set()
            thread.join(2 * LONG)
        assert out == [[t.result]] and t.result.ok, out
        assert engine.connections in (0, 1)      # the call over: one idle, or none
    assert engine.connections == 0              # closed


# ---------------------------------------------------------------------------
# 8. Wrong types
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("make, exc, match", [
    (lambda: Message(None, [RCPT], BODY), InvalidMessageError, "sender must be a str"),
    (lambda: Message(b"s@x.test", [RCPT], BODY), InvalidMessageError, "sender must be a str"),
    (lambda: Message(SENDER, None, BODY), InvalidMessageError, "recipients"),
    (lambda: Message(SENDER, 5, BODY), InvalidMessageError, "recipients"),
    (lambda: Message(SENDER, RCPT, BODY), InvalidMessageError, "single string"),
    (lambda: Message(SENDER, [b"r@x.test"], BODY), InvalidMessageError, "must be a str"),
    (lambda: Message(SENDER, [None], BODY), InvalidMessageError, "must be a str"),
    (lambda: Message(SENDER, [], BODY), InvalidMessageError, "at least one"),
    (lambda: Message("s\udc80@x.test", [RCPT], BODY), InvalidMessageError, "Unicode"),
    (lambda: Message(SENDER, [RCPT], BODY, dsn_ret=1), InvalidMessageError, "dsn_ret"),
    (lambda: Message(SENDER, [RCPT], BODY, envid=5), InvalidMessageError, "ENVID"),
    (lambda: Message(SENDER, [RCPT], BODY, envid="é"), InvalidMessageError, "ASCII"),
    (lambda: Recipient(RCPT, notify="FAILURE"), InvalidMessageError, "tuple"),
    (lambda: Recipient(RCPT, notify=None), InvalidMessageError, "tuple"),
    (lambda: Recipient(RCPT, notify=(1,)), InvalidMessageError, "NOTIFY"),
    (lambda: Recipient(RCPT, notify=("NEVER", "DELAY")), InvalidMessageError, "NEVER"),
    (lambda: Recipient(RCPT, notify=("SOMETIMES",)), InvalidMessageError, "NOTIFY"),
    (lambda: Recipient(RCPT, orcpt=b"o@x"), InvalidMessageError, "ORCPT"),
    (lambda: Auth("user", None), InvalidOptionError, "secret"),
    (lambda: Auth("user", "s", mechanism="GSSAPI"), InvalidOptionError, "mechanism"),
    (lambda: Machine().register("not a state"), smtpstate.RegistrationError, "State"),
    (lambda: Client("127.0.0.1", 25).send(b"raw bytes"), TypeError, "Message"),
    (lambda: Client("127.0.0.1", 25).send(None), TypeError, "Message"),
])
def test_wrong_types(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_wrong_types_to_the_drivers(hostile):
    server = hostile([greet(), serve()])
    with Engine(helo=HELO) as engine:
        with pytest.raises(TypeError, match="Message"):
            engine.submit(b"raw", server.host, server.port)
    with pytest.raises(TypeError, match="Message"):
        asyncio.run(aio.send(b"raw", server.host, server.port))
    with pytest.raises(TypeError, match="Message"):
        smtpstate.deliver([msg(), "not a message"], server.host, server.port)
    assert server.conns == []


class BadSetup(State):
    name = "BAD-SETUP"

    def __init__(self, value: Any) -> None:
        self.value = value

    def setup(self, session) -> Any:
        return self.value


@pytest.mark.parametrize("value", ["1", True, -1, 1.0, [1]])
def test_state_setup_returning_junk(hostile, value):
    machine = Machine()
    machine.register(BadSetup(value), after="RCPT")
    server = hostile([greet(), serve()])
    (r,) = deliver("client", [msg()], server, machine=machine, timeout=LONG)
    assert r.status == "permfail" and "TypeError" in r.error, r
    assert b"DATA" not in server.conn.received
