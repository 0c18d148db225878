"""The registration contract seen from Python: smtpstate.Machine and State
over Momentum's ``register_smtp_client_state`` (through ``smtpstate._core``).

What is covered: a fresh Machine holds the built-in order; states insert
after a name, an id, -1 or None; every refusal is a RegistrationError (a
ValueError) that leaves the machine as it was; ``id``/``name``/``states``;
the State object C hands back through ``ffi.from_handle`` in setup,
callback, stage and free is the very object registered, in a real session
driven by an in-memory scripted exchange; registering while a session
runs changes only sessions made later.

The default machine is process-wide and every registration in it lasts as
long as the process, so tests that register into it run in a fresh
interpreter (``_run_isolated``); in this process they only read it.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from typing import Any, List, Optional, Tuple

import pytest

import smtpstate
import smtpstate.session
from smtpstate import BUILTIN_STATES, Action, Machine, RegistrationError, State
from smtpstate._core import ffi, lib
from smtpstate.session import Session

HELO = "client.example"
PROBE_STAGE = 99                         # a stage code of our own

_names = itertools.count()


def unique(prefix: str) -> str:
    """A state name no other test uses."""
    return f"{prefix}-{os.getpid()}-{next(_names)}"


class Plain(State):
    """A pass-through state with a name given per instance."""

    def __init__(self, name: str) -> None:
        self.name = name


class Probe(State):
    """Records every call with the ``self`` and session it was given.

    Args:
        name: the state name.
        send: a line setup sends, or None.
        awaits: what setup returns.
        action: what callback returns.
    """

    def __init__(self, name: str, send: Optional[str] = None, awaits: int = 0,
                 action: int = Action.NEXT) -> None:
        self.name = name
        self.send = send
        self.awaits = awaits
        self.action = action
        self.calls: List[Tuple[str, int, Any]] = []    # (what, id(self), arg)

    def setup(self, session: Any) -> int:
        self.calls.append(("setup", id(self), session))
        if self.send:
            session.send(self.send)
        return self.awaits

    def callback(self, session: Any, reply: Any) -> int:
        self.calls.append(("callback", id(self), reply))
        return self.action

    def stage(self, session: Any, awaiting: bool) -> int:  # type: ignore[override]
        self.calls.append(("stage", id(self), session))
        return PROBE_STAGE

    def free(self, session: Any) -> None:
        self.calls.append(("free", id(self), session))

    def count(self, what: str) -> int:
        return sum(1 for c in self.calls if c[0] == what)


class Wire:
    """The server side of one Session, in memory: feed replies, take what
    the client sends (all of it, consumed at once)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.sent = bytearray()
        self._pp = ffi.new("const char **")

    def start(self) -> bytes:
        assert lib.smtps_session_start(self.session._ptr, 0) == lib.SMTPS_OK
        return self.take()

    def take(self) -> bytes:
        n = lib.smtps_session_output(self.session._ptr, self._pp)
        data = bytes(ffi.buffer(self._pp[0], n)) if n else b""
        lib.smtps_session_consume(self.session._ptr, n, 0)
        self.sent += data
        return data

    def feed(self, reply: bytes) -> bytes:
        rc = lib.smtps_session_feed(self.session._ptr, reply, len(reply), 0)
        assert rc == lib.SMTPS_OK, smtpstate._ffi.strerror(rc)
        return self.take()

    def to_idle(self, first: bytes = b"") -> None:
        assert self.start() == first
        assert self.feed(b"220 hi\r\n") == b"EHLO client.example\r\n"
        assert self.feed(b"250 ok\r\n") == b""
        assert self.status() == lib.SMTPS_SESS_IDLE

    def submit(self, tag: int) -> bytes:
        m = lib.smtps_message_new()
        assert lib.smtps_message_set_sender(m, b"a@example.org", 13) == 0
        assert lib.smtps_message_add_recipient(m, b"b@example.org", 13, 0, ffi.NULL, 0) == 0
        assert lib.smtps_message_set_body(m, b"hi\r\n", 4) == 0
        rc = lib.smtps_session_submit(self.session._ptr, m, tag, 0)
        if rc != lib.SMTPS_OK:
            lib.smtps_message_free(m)
        assert rc == lib.SMTPS_OK
        return self.take()

    def quit(self) -> bytes:
        assert lib.smtps_session_quit(self.session._ptr, 0) == lib.SMTPS_OK
        return self.take()

    def status(self) -> int:
        return int(lib.smtps_session_status(self.session._ptr))

    def results(self) -> List[dict]:
        out = []
        while True:
            r = lib.smtps_session_next_result(self.session._ptr)
            if r == ffi.NULL:
                return out
            out.append({"tag": int(r.tag), "status": int(r.status),
                        "state": int(r.state), "stage": int(r.stage),
                        "stage_name": ffi.string(r.stage_name).decode(),
                        "reason": ffi.string(r.reason).decode()})
            lib.smtps_result_free(r)


def _run_isolated(code: str) -> None:
    """Run code in a fresh interpreter, so that what it registers in the
    default machine dies with it; it must print OK last."""
    # Run from where the imported smtpstate lives (site-packages in CI, the
    # tree in an in-place build), never from a source tree without _core.
    home = os.path.dirname(os.path.dirname(smtpstate.__file__))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (home, env.get("PYTHONPATH")) if p)
    prelude = textwrap.dedent("""\
        import smtpstate
        from smtpstate import Machine, State, RegistrationError, default_machine
        from smtpstate._core import ffi, lib
        from smtpstate.session import Session
        class Plain(State):
            def __init__(self, name):
                self.name = name
        """)
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                          cwd=home, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=120)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0 and out.rstrip().endswith("OK"), out


# ---------------------------------------------------------------------------
# Order and insertion
# ---------------------------------------------------------------------------


def test_fresh_machine_has_the_builtin_order():
    m = Machine()
    assert m.states == list(enumerate(BUILTIN_STATES))
    assert len(BUILTIN_STATES) == lib.SMTPS_STATE__COUNT
    for name in BUILTIN_STATES:
        assert m.id(name) == getattr(lib, "SMTPS_STATE_" + name)
    assert lib.smtps_machine_count(m._ptr) == lib.SMTPS_STATE__COUNT


def test_fresh_machines_are_independent():
    a, b = Machine(), Machine()
    a.register(Plain("only-in-a"), "QUIT")
    assert [n for _, n in a.states][-1] == "only-in-a"
    assert b.states == list(enumerate(BUILTIN_STATES))
    with pytest.raises(KeyError):
        b.id("only-in-a")
    # The same State may be registered in another machine.
    assert b.register(a.state(a.id("only-in-a"))) == lib.SMTPS_STATE__COUNT


@pytest.mark.parametrize("after, want_before", [
    (None, None),
    (-1, None),
    ("MAIL", "MAIL"),
    (lib.SMTPS_STATE_MAIL, "MAIL"),
    ("QUIT", "QUIT"),
    (0, "BANNER"),
])
def test_register_position(after, want_before):
    m = Machine()
    sid = m.register(Plain("new"), after)
    assert sid == lib.SMTPS_STATE__COUNT
    names = [n for _, n in m.states]
    i = names.index("new")
    if want_before is None:
        assert i == 0
    else:
        assert names[i - 1] == want_before
    assert len(names) == lib.SMTPS_STATE__COUNT + 1
    rest = names[:i] + names[i + 1:]
    assert rest == list(BUILTIN_STATES)             # nothing else moved


def test_register_after_custom_by_name_and_id_ids_increase():
    m = Machine()
    a = m.register(Plain("a"), "MAIL")
    b = m.register(Plain("b"), "a")
    c = m.register(Plain("c"), a)
    d = m.register(Plain("d"))
    assert (a, b, c, d) == (10, 11, 12, 13)
    assert [n for _, n in m.states] == [
        "d", "BANNER", "EHLO", "STARTTLS", "AUTH", "MAIL", "a", "c", "b",
        "RCPT", "DATA", "BODY", "RSET", "QUIT"]
    assert m.states[0] == (13, "d")
    # The C view agrees.
    st = lib.smtps_machine_get(m._ptr, lib.SMTPS_STATE_MAIL)
    assert st.next.id == a and st.next.next.id == c and st.next.next.next.id == b


def test_id_name_state_lookups():
    m = Machine()
    probe = Plain("looked-up")
    sid = m.register(probe, "RCPT")
    assert m.id("looked-up") == sid
    assert m.name(sid) == "looked-up"
    assert m.name(0) == "BANNER" and m.id("QUIT") == 9
    assert m.state(sid) is probe
    assert m.state(0) is None                      # built-ins are C states
    for bad in ("nope", "", "looked-up\x00", "looked"):
        with pytest.raises(KeyError):
            m.id(bad)
    for bad in (-1, sid + 1, 9999, 2 ** 40, -2 ** 40):
        with pytest.raises(KeyError):
            m.name(bad)
    assert "looked-up" in repr(m)


def test_registered_record_is_a_copy_with_the_handle_as_closure():
    m = Machine()
    probe = Probe("copied", awaits=1)
    probe.pipelinable = True
    sid = m.register(probe, "MAIL")
    st = lib.smtps_machine_get(m._ptr, sid)
    assert ffi.string(st.name) == b"copied"
    assert st.id == sid
    assert st.sizeof_smtp_state == ffi.sizeof("smtp_state")
    assert st.flags == lib.SMTPS_STATE_PIPELINABLE
    assert st.callback == lib.smtps_py_callback
    assert st.setup == lib.smtps_py_setup
    assert ffi.from_handle(st.closure) is probe
    assert ffi.sizeof("smtp_state") > lib.SMTPS_STATE_MIN_SIZE


# ---------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------


class _NotAState:
    name = "not-a-state"


def _long(n: int) -> str:
    return "x" * n


REFUSALS = [
    ("duplicate built-in", lambda: Plain("MAIL"), None),
    ("duplicate custom", lambda: Plain("CUSTOM"), None),
    ("unknown after name", lambda: Plain("ok-name"), "NOPE"),
    ("unknown after id", lambda: Plain("ok-name"), 999),
    ("next id not yet used", lambda: Plain("ok-name"), 11),
    ("after -2", lambda: Plain("ok-name"), -2),
    ("after beyond C int", lambda: Plain("ok-name"), 2 ** 40),
    ("after below C int", lambda: Plain("ok-name"), -2 ** 40),
    ("after a float", lambda: Plain("ok-name"), 4.0),
    ("after a bool", lambda: Plain("ok-name"), True),
    ("after an object", lambda: Plain("ok-name"), object()),
    ("empty name", lambda: Plain(""), None),
    ("name of NAME_MAX + 1 bytes", lambda: Plain(_long(lib.SMTPS_STATE_NAME_MAX + 1)), None),
    ("UTF-8 name over NAME_MAX bytes", lambda: Plain("\u00e9" * 32), None),
    ("name with a NUL", lambda: Plain("ok\x00name"), None),
    ("bytes name", lambda: Plain(b"bytes-name"), None),
    ("None name", lambda: Plain(None), None),
    ("not a State", lambda: _NotAState(), None),
    ("a State class, not an instance", lambda: Plain, None),
    ("None", lambda: None, None),
]


@pytest.mark.parametrize("make, after", [(m, a) for _, m, a in REFUSALS],
                         ids=[label for label, _, _ in REFUSALS])
def test_refusal_is_registration_error_and_changes_nothing(make, after):
    m = Machine()
    m.register(Plain("CUSTOM"), "MAIL")                # id 10
    before = m.states
    with pytest.raises(RegistrationError) as info:
        m.register(make(), after)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, smtpstate.SMTPStateError)
    assert str(info.value)
    assert m.states == before
    assert lib.smtps_machine_count(m._ptr) == len(before)
    assert m.state(11) is None
    assert m.register(Plain("after-refusal")) == 11    # no id used up


def test_name_of_exactly_name_max_bytes_is_fine():
    m = Machine()
    name = "\u00e9" * (lib.SMTPS_STATE_NAME_MAX // 2) + "x"   # 63 bytes
    assert len(name.encode()) == lib.SMTPS_STATE_NAME_MAX
    sid = m.register(Plain(name))
    assert m.name(sid) == name and m.id(name) == sid


def test_table_full():
    m = Machine()
    for i in range(lib.SMTPS_STATE__COUNT, lib.SMTPS_MAX_STATES):
        assert m.register(Plain(f"fill-{i}"), "QUIT") == i
    before = m.states
    assert len(before) == lib.SMTPS_MAX_STATES
    with pytest.raises(RegistrationError, match="full"):
        m.register(Plain("one-too-many"))
    assert m.states == before
    with pytest.raises(KeyError):
        m.id("one-too-many")


def test_same_state_object_twice_is_a_duplicate():
    m = Machine()
    p = Plain("twice")
    m.register(p)
    with pytest.raises(RegistrationError, match="exists"):
        m.register(p, "QUIT")


# ---------------------------------------------------------------------------
# Closure identity in a real session
# ---------------------------------------------------------------------------


def test_closure_is_the_registered_object_in_every_callback():
    m = Machine()
    front = Probe(unique("front"), send="XFRONT", awaits=0)
    after_mail = Probe(unique("after-mail"), send="XMAIL", awaits=1)
    gate = Probe(unique("gate"), action=Action.PERMFAIL_TX)
    fid = m.register(front, -1)
    mid = m.register(after_mail, "MAIL")
    gid = m.register(gate, "RCPT")

    session = Session(m, HELO)
    wire = Wire(session)
    wire.to_idle(b"XFRONT\r\n")
    assert wire.submit(1) == b"MAIL FROM:<a@example.org>\r\n"
    assert wire.feed(b"250 ok\r\n") == b"XMAIL\r\n"
    assert wire.feed(b"250 2.1.0 xmail ok\r\n") == b"RCPT TO:<b@example.org>\r\n"
    assert wire.feed(b"250 ok\r\n") == b""             # gate refuses: no DATA
    results = wire.results()
    assert len(results) == 1
    r = results[0]
    assert r["status"] == lib.SMTPS_STATUS_PERMFAIL
    assert r["state"] == gid and r["stage"] == PROBE_STAGE
    assert wire.quit() == b"QUIT\r\n"
    assert wire.feed(b"221 bye\r\n") == b""
    assert wire.status() == lib.SMTPS_SESS_CLOSING
    session.close()
    assert bytes(wire.sent) == (
        b"XFRONT\r\nEHLO client.example\r\nMAIL FROM:<a@example.org>\r\n"
        b"XMAIL\r\nRCPT TO:<b@example.org>\r\nQUIT\r\n")

    for probe, sid in ((front, fid), (after_mail, mid), (gate, gid)):
        # C handed back the very object: same identity in every call ...
        assert probe.calls
        assert all(who == id(probe) for _, who, _ in probe.calls), probe.calls
        # ... and the record still holds that handle.
        assert m.state(sid) is probe
        assert ffi.from_handle(lib.smtps_machine_get(m._ptr, sid).closure) is probe
        for what, _, arg in probe.calls:
            if what in ("setup", "stage", "free"):
                assert arg is session
        assert probe.count("setup") == 1 and probe.count("callback") == 1
        assert probe.count("free") == 1

    # A 0-reply state gets one callback with None; a 1-reply state its reply.
    assert [c[2] for c in front.calls if c[0] == "callback"] == [None]
    reply = [c[2] for c in after_mail.calls if c[0] == "callback"][0]
    assert reply.code == 250 and reply.enhanced == "2.1.0"
    assert gate.count("stage") >= 1 and front.count("stage") == 0


def test_same_object_in_two_machines_is_one_object_in_both():
    p = Probe(unique("shared"), send="XSHARED")
    m1, m2 = Machine(), Machine()
    m1.register(p, -1)
    m2.register(p, "EHLO")
    s1, s2 = Session(m1, HELO), Session(m2, HELO)
    w1, w2 = Wire(s1), Wire(s2)
    assert w1.start() == b"XSHARED\r\n"
    assert w2.start() == b""
    assert w2.feed(b"220 hi\r\n") == b"EHLO client.example\r\n"
    assert w2.feed(b"250 ok\r\n") == b"XSHARED\r\n"
    s1.close()
    s2.close()
    assert {who for _, who, _ in p.calls} == {id(p)}
    assert p.count("setup") == 2 and p.count("free") == 2


def test_next_state_from_python_jumps_to_quit():
    m = Machine()

    class Jump(State):
        name = unique("jump")

        def callback(self, session, reply):
            session.next_state("QUIT")
            return Action.JUMP

    class KeepDefault(State):
        name = unique("keep")

        def callback(self, session, reply):
            session.next_state("QUIT")
            session.next_state(None)                   # back to the default
            return Action.NEXT

    m.register(KeepDefault(), "MAIL")
    m.register(Jump(), "RCPT")
    session = Session(m, HELO)
    wire = Wire(session)
    wire.to_idle()
    assert wire.submit(2) == b"MAIL FROM:<a@example.org>\r\n"
    assert wire.feed(b"250 ok\r\n") == b"RCPT TO:<b@example.org>\r\n"
    assert wire.feed(b"250 ok\r\n") == b"QUIT\r\n"
    assert b"DATA" not in wire.sent
    session.close()


# ---------------------------------------------------------------------------
# Registration while sessions run
# ---------------------------------------------------------------------------


def test_registering_while_a_session_runs_changes_only_later_sessions():
    m = Machine()
    early = Session(m, HELO)
    late = Probe(unique("late"), send="XLATE")
    sid = m.register(late, -1)
    assert m.states[0] == (sid, late.name)

    w1 = Wire(early)
    w1.to_idle(b"")                                    # banner first: old order
    assert late.calls == []
    assert lib.smtps_session_set_timeout(early._ptr, sid, 1000) == lib.SMTPS_EINVAL

    later = Session(m, HELO)
    w2 = Wire(later)
    w2.to_idle(b"XLATE\r\n")
    assert late.count("setup") == 1
    early.close()
    later.close()
    assert late.count("free") == 1                     # only `later` entered it


def test_registering_from_inside_a_callback():
    m = Machine()
    inner = Probe(unique("inner"), send="XINNER")

    class Registrar(State):
        name = unique("registrar")
        ids: List[Any] = []

        def callback(self, session, reply):
            try:
                self.ids.append(session.machine.register(inner, "BANNER"))
            except RegistrationError as exc:
                self.ids.append(exc)
            return Action.NEXT

    registrar = Registrar()
    m.register(registrar, -1)
    s1 = Session(m, HELO)
    w1 = Wire(s1)
    assert w1.start() == b""
    assert w1.feed(b"220 hi\r\n") == b"EHLO client.example\r\n"   # not XINNER
    assert inner.calls == []
    assert registrar.ids == [m.id(inner.name)]

    s2 = Session(m, HELO)
    w2 = Wire(s2)
    assert w2.start() == b""
    assert w2.feed(b"220 hi\r\n") == b"XINNER\r\nEHLO client.example\r\n"
    assert isinstance(registrar.ids[1], RegistrationError)          # duplicate
    s1.close()
    s2.close()


def test_machine_outlives_its_python_object_while_a_session_holds_it():
    m = Machine()
    p = Probe(unique("held"), send="XHELD")
    m.register(p, -1)
    session = Session(m, HELO)
    del m                                            # the session keeps it
    wire = Wire(session)
    wire.to_idle(b"XHELD\r\n")
    session.close()
    assert p.count("free") == 1


def test_collected_session_never_touches_the_closure(monkeypatch):
    # A session collected without close() is detached first; by then its
    # machine and the State's handle may be gone, so the free trampoline
    # must not turn closure back into an object.
    handles = []
    real = smtpstate.session.ffi

    class Spy:
        def __getattr__(self, attr):
            return getattr(real, attr)

        def from_handle(self, h):
            handles.append(int(ffi.cast("uintptr_t", h)))
            return real.from_handle(h)

    m = Machine()
    p = Probe(unique("collected"))
    sid = m.register(p, -1)
    closure = int(ffi.cast("uintptr_t", lib.smtps_machine_get(m._ptr, sid).closure))
    session = Session(m, HELO)
    Wire(session).start()
    assert p.count("setup") == 1
    monkeypatch.setattr(smtpstate.session, "ffi", Spy())
    ptr, session._ptr, session._closed = session._ptr, ffi.NULL, True
    ffi.gc(ptr, None)                                # free it as the collector does
    smtpstate.session._free_detached(ptr)
    assert closure not in handles
    assert p.count("free") == 0


# ---------------------------------------------------------------------------
# The default machine and Momentum's C functions
# ---------------------------------------------------------------------------


def test_default_machine_is_shared_and_is_the_c_default():
    assert smtpstate.default_machine is smtpstate.machine.default_machine
    assert smtpstate.default_machine._ptr == lib.smtps_default_machine()
    # Read-only here: other tests may have registered into it.
    names = []
    st = lib.smtp_get_state_machine()
    while st != ffi.NULL:
        names.append(ffi.string(st.name).decode())
        st = st.next
    assert [n for n in names if n in BUILTIN_STATES] == list(BUILTIN_STATES)
    assert [n for _, n in smtpstate.default_machine.states] == names
    for i, name in enumerate(BUILTIN_STATES):
        assert ffi.string(lib.smtp_get_state(i).name).decode() == name
        assert lib.smtp_get_state(i).id == i
    assert lib.smtp_get_state(-1) == ffi.NULL
    assert lib.smtp_get_state(9999) == ffi.NULL


def test_default_machine_registration_seen_by_momentum_functions():
    _run_isolated("""
        class Probe(State):
            def __init__(self, name):
                self.name = name
                self.selves = []
            def setup(self, session):
                self.selves.append(id(self))
                session.send("XDEFAULT")
                return 0
            def callback(self, session, reply):
                self.selves.append(id(self))
                return 1

        early = Session(default_machine, "client.example")
        p = Probe("py-default-front")
        sid = default_machine.register(p, -1)
        assert sid == lib.SMTPS_STATE__COUNT, sid

        # Momentum's functions see it.
        head = lib.smtp_get_state_machine()
        assert head.id == sid and ffi.string(head.name) == b"py-default-front"
        assert head.next.id == lib.SMTPS_STATE_BANNER
        assert lib.smtp_get_state(sid) == head
        assert ffi.from_handle(head.closure) is p
        assert lib.smtps_machine_find(lib.smtps_default_machine(),
                                      b"py-default-front") == sid

        # register_smtp_client_state refuses its name as a duplicate.
        st = ffi.new("smtp_state *")
        st.sizeof_smtp_state = ffi.sizeof("smtp_state")
        name = ffi.new("char[]", b"py-default-front")
        st.name = name
        st.callback = lib.smtps_py_callback
        assert lib.register_smtp_client_state(st, -1) == -1
        assert lib.register_smtp_client_state(ffi.NULL, -1) == -1
        assert lib.smtps_machine_count(lib.smtps_default_machine()) == sid + 1

        # A state after it, by name, through the same default machine.
        sid2 = smtpstate.default_machine.register(Plain("py-default-second"),
                                                  "py-default-front")
        assert lib.smtp_get_state(sid).next == lib.smtp_get_state(sid2)
        assert [n for _, n in default_machine.states][:3] == [
            "py-default-front", "py-default-second", "BANNER"]

        # A session on the default machine runs it; one made before does not.
        pp = ffi.new("const char **")
        s = Session(default_machine, "client.example")
        assert lib.smtps_session_start(s._ptr, 0) == 0
        n = lib.smtps_session_output(s._ptr, pp)
        assert ffi.buffer(pp[0], n)[:] == b"XDEFAULT\\r\\n"
        assert p.selves == [id(p), id(p)], p.selves
        assert lib.smtps_session_start(early._ptr, 0) == 0
        assert lib.smtps_session_output(early._ptr, pp) == 0
        assert len(p.selves) == 2
        s.close()
        early.close()
        print("OK")
    """)


def test_default_machine_refusals_change_nothing():
    _run_isolated("""
        before = default_machine.states
        for bad, after in ((Plain("BANNER"), None), (Plain("x"), "NOPE"),
                           (Plain("x"), 999), (Plain(""), None), (object(), None)):
            try:
                default_machine.register(bad, after)
            except RegistrationError:
                pass
            else:
                raise AssertionError((bad, after))
        assert default_machine.states == before
        assert lib.smtp_get_state(lib.SMTPS_STATE__COUNT) == ffi.NULL
        print("OK")
    """)
