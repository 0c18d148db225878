"""Message()'s fast path and its general way give the same answers.

``Message.__init__`` takes the usual message (a bytes body, plain ASCII
addresses, every option left as it is) on a fast path: one C call
(``smtps_message_check_plain``) says it is certainly fine. Everything
else goes the general way: the fields set as given, then every check in
``__post_init__``. Here the same inputs, tricky ones above all, go both
ways: the outcome must be the same (made, with equal fields, equality,
hash, repr and what is handed to C; or refused, with the same exception
and the same words), and the inputs the fast path is for must really take
it.
"""

from __future__ import annotations

import dataclasses
import pickle
import threading
from typing import Any, Dict, List, Tuple

import pytest
from helpers import import_or_missing

hypothesis = import_or_missing("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import smtpstate  # noqa: E402
from smtpstate import InvalidMessageError, Message, Recipient  # noqa: E402
from smtpstate._core import lib  # noqa: E402

SENDER = "sender@client.test"
RCPT = "rcpt@server.test"
BODY = b"From: <sender@client.test>\r\nSubject: x\r\n\r\nbody\r\n.leading dot\r\n"
FIELDS = ("sender", "recipients", "data", "dsn_ret", "envid", "long_lines",
          "require_tls", "smtputf8")
MAX_RCPTS = int(lib.SMTPS_MAX_RECIPIENTS)


def general(*args: Any, **kwargs: Any) -> Message:
    """A Message made the general way only, as ``__init__`` makes one when
    its fast path does not apply: every field as given, then
    ``__post_init__``."""
    values: Dict[str, Any] = {"dsn_ret": None, "envid": None, "long_lines": "refuse",
                              "require_tls": False, "smtputf8": False}
    values.update(zip(FIELDS, args))
    values.update(kwargs)
    m = object.__new__(Message)
    for name in FIELDS:
        object.__setattr__(m, name, values[name])
    m.__post_init__()
    return m


def outcome(make: Any, *args: Any, **kwargs: Any) -> Tuple[Any, ...]:
    try:
        return ("made", make(*args, **kwargs))
    except Exception as exc:                   # the type and the words count
        return ("refused", type(exc), str(exc))


@pytest.fixture
def general_way(monkeypatch):
    """A list that grows by one each time Message.__post_init__ runs."""
    calls: List[Message] = []
    post_init = Message.__post_init__

    def counted(self: Message) -> None:
        calls.append(self)
        post_init(self)

    monkeypatch.setattr(Message, "__post_init__", counted)
    return calls


def same_both_ways(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Any, ...]:
    """Make the message both ways; assert that the outcomes agree; return
    the outcome of Message(...)."""
    fast = outcome(Message, *args, **kwargs)
    slow = outcome(general, *args, **kwargs)
    if fast[0] == "refused" or slow[0] == "refused":
        assert fast == slow
        return fast
    m, g = fast[1], slow[1]
    for name in FIELDS:
        assert getattr(m, name) == getattr(g, name), name
        assert type(getattr(m, name)) is type(getattr(g, name)), name
    assert m == g and repr(m) == repr(g)
    assert outcome(hash, m) == outcome(hash, g)   # (a list body has none)
    assert m.recipient_options == g.recipient_options
    assert m._encoded() == g._encoded()       # what C is given
    return fast


# ---------------------------------------------------------------------------
# The inputs the fast path is for take it, and end the same
# ---------------------------------------------------------------------------

PLAIN = {
    "usual": ((SENDER, [RCPT], BODY), {}),
    "null sender": (("", [RCPT], BODY), {}),
    "a tuple of recipients": ((SENDER, (RCPT, "b@server.test"), BODY), {}),
    "three recipients": ((SENDER, [RCPT, "b@x.test", "c@y.test"], BODY), {}),
    "spaces and quotes": (('"a b"@client.test', ["r+tag=1@server.test"], BODY), {}),
    "1024-octet addresses": (("s" * 1024, ["r" * 1024], BODY), {}),
    "empty body": ((SENDER, [RCPT], b""), {}),
    "998-octet lines": ((SENDER, [RCPT], b"a" * 998 + b"\n" + b"b" * 998), {}),
    "bare CR line ends": ((SENDER, [RCPT], b"x" * 600 + b"\r" + b"y" * 600 + b"\r"), {}),
    "8-bit body": ((SENDER, [RCPT], b"Subject: x\r\n\r\n\xc3\xa9t\xc3\xa9\r\n"), {}),
    "long body of short lines": ((SENDER, [RCPT], (b"z" * 70 + b"\r\n") * 2000), {}),
    "defaults given": ((SENDER, [RCPT], BODY),
                       {"dsn_ret": None, "envid": None, "long_lines": "refuse",
                        "require_tls": False, "smtputf8": False}),
    "most recipients": ((SENDER, ["r%d@x.test" % i for i in range(MAX_RCPTS)], BODY), {}),
}


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_the_usual_message_takes_the_fast_path(name, general_way):
    args, kwargs = PLAIN[name]
    kind, m = same_both_ways(args, kwargs)[:2]
    assert kind == "made"
    del general_way[:]
    assert Message(*args, **kwargs) == m
    assert general_way == [], "the fast path was not taken"


# ---------------------------------------------------------------------------
# Tricky inputs: the same outcome both ways, and the general way's words
# ---------------------------------------------------------------------------

CONTROLS = ["\r", "\n", "\r\n", "\x00", "\x01", "\t", "\x0b", "\x1b", "\x7f", "\x85", "\x9b"]
SENDERS = (
    [f"a{c}b@client.test" for c in CONTROLS]
    + ["a<b@client.test", "<a@client.test>", "a@client.test> SIZE=1",
       "j\u00f6rg@client.test", "\u00e9" * 512, "\u00e9" * 513, "s" * 1025,
       "s\udc80@client.test", b"s@client.test", None, 5, " ", "\n"]
)
RECIPIENT_LISTS = (
    [[f"a{c}b@server.test"] for c in CONTROLS]
    + [[RCPT, f"x{c}RCPT TO:<v@x.test>"] for c in ("\r\n", "\n")]
    + [[], [""], [RCPT, ""], ["", RCPT], ["\n"], ["a@x\nb@x"], [RCPT + "\n"],
       ["\n" + RCPT], [RCPT, "\n"], ["<r@server.test>"], ["r@server.test> NOTIFY=NEVER"],
       ["r" * 1025], ["\u00e9" * 513], ["j\u00f6rg@server.test"], ["r\udc80@server.test"],
       [b"r@server.test"], [None], [5], [RCPT, None],
       [Recipient(RCPT)], [RCPT, Recipient("b@server.test", notify=("FAILURE",))],
       RCPT, b"r@server.test", None, 5, {RCPT: 1}, (r for r in [RCPT]),
       ["r%d@x.test" % i for i in range(MAX_RCPTS + 1)]]
)
DATA = [
    b"\0", b"a\0b", b"Subject: x\r\n\r\nab\0c\r\n", b"a" * 999, b"a" * 999 + b"\n",
    b"b\n" + b"a" * 999 + b"\r\n", b"x" * 998 + b"\r" + b"y" * 999,
    (b"z" * 70 + b"\r\n") * 30 + b"q" * 1000, b"\r" * 5000, "text", "text \udc80",
    bytearray(BODY), memoryview(BODY), None, 42, [b"a", b"b"],
]
OPTIONS = [
    {"dsn_ret": "FULL"}, {"dsn_ret": "hdrs"}, {"dsn_ret": "SOME"}, {"dsn_ret": 1},
    {"envid": "E1"}, {"envid": "e" * 101}, {"envid": "\u00e9"}, {"envid": 5},
    {"long_lines": "allow"}, {"long_lines": "nope"}, {"long_lines": None},
    {"require_tls": True}, {"require_tls": 1}, {"require_tls": None},
    {"smtputf8": True}, {"smtputf8": 0}, {"smtputf8": "yes"},
    {"long_lines": "allow", "data": b"a" * 5000},
    {"require_tls": True, "data": b"TLS-Required: No\r\n\r\nbody\r\n"},
]


@pytest.mark.parametrize("sender", SENDERS, ids=repr)
def test_senders(sender):
    same_both_ways((sender, [RCPT], BODY), {})


@pytest.mark.parametrize("recipients", RECIPIENT_LISTS,
                         ids=lambda r: repr(r)[:60])
def test_recipients(recipients):
    if hasattr(recipients, "__next__"):
        # A generator can be read once: one for each way.
        fast = outcome(Message, SENDER, (r for r in [RCPT]), BODY)
        slow = outcome(general, SENDER, (r for r in [RCPT]), BODY)
        assert fast[0] == slow[0] == "made" and fast[1] == slow[1]
        return
    same_both_ways((SENDER, recipients, BODY), {})


@pytest.mark.parametrize("data", DATA, ids=lambda d: repr(d)[:40])
def test_data(data):
    same_both_ways((SENDER, [RCPT], data), {})


@pytest.mark.parametrize("options", OPTIONS, ids=repr)
def test_options(options):
    options = dict(options)
    data = options.pop("data", BODY)
    same_both_ways((SENDER, [RCPT], data), options)


def test_the_error_words_are_the_general_ways():
    """A few outcomes written out: what a user reads."""
    cases = [
        ((f"a\r\nb@client.test", [RCPT], BODY), "contains the control character"),
        ((SENDER, ["a@x\nb@x"], BODY), "contains the control character '\\n'"),
        ((SENDER, ["<r@server.test>"], BODY), "without angle brackets"),
        ((SENDER, [""], BODY), "recipient address is empty"),
        ((SENDER, ["r" * 1025], BODY), "longer than 1024 bytes"),
        ((SENDER, [], BODY), "at least one recipient"),
        ((SENDER, RCPT, BODY), "not a single string"),
        ((SENDER, [RCPT], b"a\0"), "NUL byte (line 1, offset 1)"),
        ((SENDER, [RCPT], b"a" * 999), "line 1 of the message body is longer than 998"),
    ]
    for args, words in cases:
        with pytest.raises(InvalidMessageError) as caught:
            Message(*args)
        assert words in str(caught.value), (args[:2], str(caught.value))


# ---------------------------------------------------------------------------
# Generated inputs: addresses over the characters that matter, bodies with
# lines around the limit
# ---------------------------------------------------------------------------

ADDRESS_CHARS = st.sampled_from(list("ab@.+= \"~") + ["<", ">", "\r", "\n", "\t", "\x00",
                                                       "\x7f", "\x85", "\u00e9", "\udc80"])
addresses = st.one_of(
    st.text(ADDRESS_CHARS, max_size=12),
    st.text(st.sampled_from("ab@."), min_size=1020, max_size=1030),
)
LINE_ENDS = st.sampled_from([b"\r\n", b"\n", b"\r", b""])
lines = st.tuples(st.one_of(st.integers(0, 80), st.integers(990, 1005)),
                  st.sampled_from([b"a", b"\x80", b"\0"]), LINE_ENDS)


@st.composite
def bodies(draw: Any) -> bytes:
    out = b""
    for length, fill, end in draw(st.lists(lines, max_size=6)):
        line = b"x" * length
        if fill != b"a" and length and draw(st.integers(0, 9)) == 0:
            pos = draw(st.integers(0, length - 1))
            line = line[:pos] + fill + line[pos + 1:]
        out += line + end
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sender=addresses, recipients=st.lists(addresses, max_size=3), data=bodies(),
       as_tuple=st.booleans())
def test_generated_inputs_end_the_same_both_ways(sender, recipients, data, as_tuple):
    same_both_ways((sender, tuple(recipients) if as_tuple else recipients, data), {})


# ---------------------------------------------------------------------------
# The rest of the API, for a message made the fast way
# ---------------------------------------------------------------------------


def test_a_fast_message_is_frozen_and_a_dataclass():
    m = Message(SENDER, [RCPT], BODY)
    for name in FIELDS:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(m, name, getattr(m, name))
        with pytest.raises(dataclasses.FrozenInstanceError):
            delattr(m, name)
    assert [f.name for f in dataclasses.fields(Message)] == [*FIELDS, "_rcpts"]
    assert dataclasses.asdict(m)["recipients"] == (RCPT,)
    again = dataclasses.replace(m, envid="E1")
    assert again.envid == "E1" and again.recipients == (RCPT,) and again != m
    with pytest.raises(InvalidMessageError, match="control character"):
        dataclasses.replace(m, sender="a\r\nb")
    copied = pickle.loads(pickle.dumps(m))
    assert copied == m and hash(copied) == hash(m)
    assert m.recipients == (RCPT,) and m.recipient_options == (Recipient(RCPT),)


def test_the_list_is_copied_before_it_is_checked():
    """The tuple kept is the one C checked: a list changed afterwards (or,
    from another thread, while C checks with the GIL released) changes
    nothing."""
    rcpts = [RCPT]
    m = Message(SENDER, rcpts, BODY)
    rcpts.append("a\r\nb")
    assert m.recipients == (RCPT,)

    stop = threading.Event()
    shared = [RCPT]

    def flip() -> None:
        while not stop.is_set():
            shared[0] = "x\r\nRCPT TO:<v@x.test>"
            shared[0] = RCPT

    t = threading.Thread(target=flip)
    t.start()
    try:
        for _ in range(2000):
            try:
                made = Message(SENDER, shared, BODY)
            except InvalidMessageError:
                continue
            assert made.recipients == (RCPT,)
    finally:
        stop.set()
        t.join()


def test_subclasses_keep_their_checks():
    """A subclass's own __post_init__ still runs (the fast path is for
    Message itself), and a dataclass subclass's generated __init__ still
    makes every check."""

    class NoExample(Message):
        def __post_init__(self) -> None:
            super().__post_init__()
            if any(r.endswith("@example.com") for r in self.recipients):
                raise InvalidMessageError("no example.com")

    assert NoExample(SENDER, [RCPT], BODY).recipients == (RCPT,)
    with pytest.raises(InvalidMessageError, match="no example.com"):
        NoExample(SENDER, ["a@example.com"], BODY)

    @dataclasses.dataclass(frozen=True)
    class Tagged(Message):
        tag: str = "t"

    assert Tagged(SENDER, [RCPT], BODY, tag="x").tag == "x"
    with pytest.raises(InvalidMessageError, match="control character"):
        Tagged("a\nb", [RCPT], BODY)


def test_a_fast_message_is_sent_as_a_general_one(aiosmtpd_server):
    """End to end: made the fast way, it reaches a real server intact."""
    m = Message(SENDER, [RCPT, "b@server.test"], BODY)
    with smtpstate.Client(aiosmtpd_server.host, aiosmtpd_server.port, timeout=30) as client:
        result = client.send(m)
    assert result.ok, result
    got = aiosmtpd_server.messages[-1]
    assert got.mail_from == SENDER and list(got.rcpt_tos) == [RCPT, "b@server.test"]
    assert got.data == BODY


SUBMITTED = ["usual", "null sender", "a tuple of recipients", "three recipients",
             "spaces and quotes", "empty body", "998-octet lines", "bare CR line ends",
             "8-bit body", "long body of short lines"]


@pytest.mark.parametrize("name", SUBMITTED)
def test_a_fast_message_is_submitted_whole_and_arrives_as_through_an_envelope(
        name, aiosmtpd_server):
    """Engine.submit() hands a fast-path Message to C in one call
    (smtps_engine_submit_plain), without making its envelope; the server
    gets from it what it gets from the same message copied from an
    envelope (smtps_engine_submit_copy)."""
    args, kwargs = PLAIN[name]
    plain, enveloped = Message(*args, **kwargs), Message(*args, **kwargs)
    enveloped._envelope()                         # the other way: copied from it
    host, port = aiosmtpd_server.host, aiosmtpd_server.port
    with smtpstate.Engine(max_connections=1) as engine:
        tickets = [engine.submit(m, host, port, timeout=30, tls="none")
                   for m in (plain, enveloped)]
        results = {r.ticket.id: r for r in engine.run()}
    assert plain._c_envelope is None, "an envelope was made for a plain message"
    for t in tickets:
        assert results[t.id].ok, results[t.id]
    got = aiosmtpd_server.wait_for_messages(2)[-2:]
    assert [(g.mail_from, list(g.rcpt_tos), g.mail_options, g.data) for g in got[:1]] == \
        [(g.mail_from, list(g.rcpt_tos), g.mail_options, g.data) for g in got[1:]]
    assert got[0].mail_from == (plain.sender or "<>")          # aiosmtpd says <> for ""
    assert list(got[0].rcpt_tos) == list(plain.recipients)


def test_a_message_submitted_again_is_copied_from_its_envelope(aiosmtpd_server):
    """The one-call submit is for the first time: a message submitted
    again gets its envelope then, which later submits copy."""
    m = Message(SENDER, [RCPT, "b@server.test"], BODY)
    host, port = aiosmtpd_server.host, aiosmtpd_server.port
    with smtpstate.Engine(max_connections=1) as engine:
        engine.submit(m, host, port, timeout=30, tls="none")
        assert m._c_envelope is None
        engine.submit(m, host, port, timeout=30, tls="none")
        envelope = m._c_envelope
        assert envelope is not None
        engine.submit(m, host, port, timeout=30, tls="none")
        assert m._c_envelope is envelope
        assert all(r.ok for r in engine.run())
    got = aiosmtpd_server.wait_for_messages(3)[-3:]
    assert [(g.mail_from, list(g.rcpt_tos), g.data) for g in got] == \
        [(SENDER, [RCPT, "b@server.test"], BODY)] * 3
    assert m == Message(SENDER, [RCPT, "b@server.test"], BODY)
