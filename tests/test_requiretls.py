"""REQUIRETLS (RFC 8689): ``Message(..., require_tls=True)``.

The promise under test: a message that requires TLS goes only to a server
that offered REQUIRETLS in its EHLO reply *after* TLS came up, over TLS
that authenticated the server, with ``REQUIRETLS`` on its MAIL FROM. Any
other server gets no MAIL for it (no transaction is opened), and every
recipient fails for good, the reason beginning "5.7.30 REQUIRETLS support
required" (RFC 8689 5) and naming what was missing: no TLS, TLS that was
not verified, or the extension not offered. A message without it never
carries the parameter.

Three halves:

* scripted: the C session against :class:`scripted.TLSPeer`, exact bytes
  inside and outside TLS;
* real servers: aiosmtpd with STARTTLS (and implicit TLS), taught
  REQUIRETLS by :class:`RequireTLSSMTP` and :class:`RequireTLSHandler`,
  through ``Client`` and the ``Engine``;
* the Message: the flag's checks and the ``TLS-Required:`` header field
  (RFC 8689 4.1), which cannot go with it.
"""

from __future__ import annotations

import email.message
import io
import pickle

import pytest

import smtpstate
from smtpstate import Message
from smtpstate._core import lib
from smtpstate.errors import InvalidMessageError

from helpers import RecordingHandler, import_or_missing
from scripted import SPLITS, TLSPeer, tls_config

BANNER = b"220 server.example ESMTP\r\n"
EHLO = b"EHLO client.example\r\n"
RCPT = b"RCPT TO:<rcpt@server.example>\r\n"
BODY = b"Subject: hi\r\n\r\nhello\r\n"
MAIL_PLAIN = b"MAIL FROM:<sender@client.example> SIZE=22\r\n"
MAIL_REQUIRETLS = b"MAIL FROM:<sender@client.example> SIZE=22 REQUIRETLS\r\n"
WHY_NO_TLS = "5.7.30 REQUIRETLS support required (RFC 8689): the connection is not encrypted"
WHY_UNVERIFIED = "5.7.30 REQUIRETLS support required (RFC 8689): TLS not verified"
WHY_NOT_OFFERED = ("5.7.30 REQUIRETLS support required (RFC 8689): the server does not "
                   "offer REQUIRETLS")


def ehlo(*keywords: str) -> bytes:
    out = [b"250-server.example\r\n" if keywords else b"250 server.example\r\n"]
    for i, kw in enumerate(keywords):
        out.append(b"250" + (b" " if i == len(keywords) - 1 else b"-") + kw.encode() + b"\r\n")
    return b"".join(out)


def rt_message(require_tls: bool = True, **kwargs) -> Message:
    return Message("sender@client.example", ["rcpt@server.example"], BODY,
                   require_tls=require_tls, **kwargs)


# ---------------------------------------------------------------------------
# Scripted: exact bytes
# ---------------------------------------------------------------------------


def over_tls(s, cfg, tls_server_context, *, mode="starttls", clear=("STARTTLS",),
             after=("SIZE 1000000",)):
    """Banner, EHLO offering ``clear``, STARTTLS, the handshake, and the EHLO
    inside TLS offering ``after``: the session is IDLE, the peer returned."""
    assert s.set_tls(mode, cfg) == lib.SMTPS_OK
    s.start()
    s.feed(BANNER)
    assert s.sent() == EHLO
    s.feed(ehlo(*clear))
    assert s.sent() == b"STARTTLS\r\n"
    s.feed(b"220 2.0.0 go ahead\r\n")
    peer = TLSPeer(tls_server_context)
    assert s.handshake(peer) == EHLO
    assert s.tls_active
    s.feed(peer.send(ehlo(*after)))
    assert s.status == "IDLE"
    return peer


def assert_refused(r, why):
    """The 5.7.30 result: permfail, every recipient with it, no reply."""
    assert r["status"] == "permfail", r
    assert r["reason"].startswith(why), r["reason"]
    assert r["code"] == 0                       # no server said it: we did
    assert r["rcpts"] == [("permfail", 0)]
    assert r["state"] == "MAIL" and r["stage"] == 25       # before MAIL FROM: nothing sent


@pytest.mark.parametrize("split", SPLITS)
def test_verified_starttls_and_offered_sends_requiretls(make, split, tls_ca_file,
                                                        tls_server_context):
    s = make(split)
    peer = over_tls(s, tls_config(tls_ca_file), tls_server_context,
                    after=("SIZE 1000000", "REQUIRETLS"))
    s.submit(rt_message())
    assert peer.receive(s.sent()) == MAIL_REQUIRETLS
    s.feed(peer.send(b"250 ok\r\n"))
    assert peer.receive(s.sent()) == RCPT
    s.feed(peer.send(b"250 ok\r\n"))
    assert peer.receive(s.sent()) == b"DATA\r\n"
    s.feed(peer.send(b"354 go\r\n"))
    assert peer.receive(s.sent()) == BODY + b".\r\n"
    s.feed(peer.send(b"250 2.0.0 queued\r\n"))
    assert s.result()["status"] == "delivered"

    # The same server, a message that does not ask for it: no parameter.
    s.submit(rt_message(require_tls=False))
    assert peer.receive(s.sent()) == MAIL_PLAIN


def test_offered_only_in_clear_is_not_offered(make, tls_ca_file, tls_server_context):
    """What the clear EHLO said is forgotten at STARTTLS (RFC 3207 4.2):
    REQUIRETLS must be offered again inside TLS."""
    s = make()
    peer = over_tls(s, tls_config(tls_ca_file), tls_server_context,
                    clear=("STARTTLS", "REQUIRETLS"), after=("SIZE 1000000",))
    s.submit(rt_message())
    assert s.sent() == b""                      # no MAIL, nothing at all
    assert_refused(s.result(), WHY_NOT_OFFERED)
    assert s.status == "IDLE"                   # no transaction open: no RSET
    s.submit(rt_message(require_tls=False))
    assert peer.receive(s.sent()) == MAIL_PLAIN


@pytest.mark.parametrize("mode, insecure", [("opportunistic", False), ("starttls", True)])
def test_unverified_tls_refuses(make, tls_ca_file, tls_server_context, mode, insecure):
    """Opportunistic TLS, and a verifying level whose policy checks nothing
    (dangerously_skip_certificate_verification), encrypt but do not
    authenticate the server: not enough for REQUIRETLS (RFC 8689 4.2.1)."""
    s = make()
    cfg = tls_config(None if insecure else tls_ca_file, insecure=insecure)
    peer = over_tls(s, cfg, tls_server_context, mode=mode,
                    after=("SIZE 1000000", "REQUIRETLS"))
    s.submit(rt_message())
    assert s.sent() == b""
    assert_refused(s.result(), WHY_UNVERIFIED)
    s.quit()
    assert peer.receive(s.sent()) == b"QUIT\r\n"


@pytest.mark.parametrize("split", SPLITS)
def test_no_tls_refuses_even_when_offered(make, split):
    s = make(split)
    s.start()
    s.feed(BANNER)
    assert s.sent() == EHLO
    s.feed(ehlo("SIZE 1000000", "REQUIRETLS"))
    s.submit(rt_message())
    assert s.sent() == b""
    assert_refused(s.result(), WHY_NO_TLS)
    s.submit(rt_message(require_tls=False))
    assert s.sent() == MAIL_PLAIN


def test_refusal_between_pipelined_messages(make, tls_ca_file, tls_server_context):
    """Under PIPELINING the refused message sends nothing, and the next
    one's MAIL, RCPT and DATA leave together as usual."""
    s = make()
    peer = over_tls(s, tls_config(tls_ca_file), tls_server_context,
                    after=("PIPELINING", "SIZE 1000000"))
    s.submit(rt_message())
    s.submit(rt_message(require_tls=False))
    assert peer.receive(s.sent()) == MAIL_PLAIN + RCPT + b"DATA\r\n"
    assert_refused(s.results()[0], WHY_NOT_OFFERED)


# ---------------------------------------------------------------------------
# Real servers: aiosmtpd taught REQUIRETLS
# ---------------------------------------------------------------------------

aiosmtpd_smtp = import_or_missing("aiosmtpd.smtp")


class RequireTLSSMTP(aiosmtpd_smtp.SMTP):
    """aiosmtpd taking the REQUIRETLS parameter of MAIL FROM (RFC 8689 4.1),
    which it would refuse with 555: recorded in the envelope's
    mail_options; refused with 530 5.7.10 over a clear connection."""

    @aiosmtpd_smtp.syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg):
        words = (arg or "").split(" ")
        asked = any(w.upper() == "REQUIRETLS" for w in words[1:])
        if asked:
            if self.transport.get_extra_info("ssl_object") is None:
                await self.push("530 5.7.10 REQUIRETLS needs TLS")
                return
            arg = " ".join(w for w in words if w.upper() != "REQUIRETLS")
        await super().smtp_MAIL(arg)
        if asked and self.envelope.mail_from is not None:
            self.envelope.mail_options.append("REQUIRETLS")


class RequireTLSHandler(RecordingHandler):
    """Offers REQUIRETLS in the EHLO reply once the connection is encrypted
    (STARTTLS or implicit TLS); with ``in_clear``, in clear too; with
    ``offer=False``, never."""

    def __init__(self, offer=True, in_clear=False):
        super().__init__()
        self.offer, self.in_clear = offer, in_clear

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        encrypted = server.transport.get_extra_info("ssl_object") is not None
        if self.offer and (encrypted or self.in_clear):
            responses.insert(-1, "250-REQUIRETLS")
        return responses


def mail_lines(server):
    """Every MAIL FROM line the server got (after decryption), in order."""
    data = b"".join(bytes(c.received) for c in server.connections)
    return [ln for ln in data.split(b"\r\n") if ln.startswith(b"MAIL FROM:")]


def msg(i=0, require_tls=True):
    return Message("sender@example.test", ["rcpt@example.test", "other@example.test"],
                   b"Subject: requiretls %d\r\n\r\nover verified TLS\r\n" % i,
                   require_tls=require_tls)


def starttls_server(aiosmtpd_factory, tls_server_context, **handler):
    return aiosmtpd_factory(RequireTLSHandler(**handler), smtp_class=RequireTLSSMTP,
                            tls_context=tls_server_context)


def assert_result_refused(result, why):
    assert result.status == "permfail", result
    assert result.reason.startswith(why), result.reason
    assert result.reply is None
    assert [r.status for r in result.recipients] == ["permfail", "permfail"]
    assert result.stage_code == 25 and result.state == "MAIL"     # before MAIL FROM
    with pytest.raises(smtpstate.DeliveryError):
        result.raise_for_status()


def test_aiosmtpd_verified_starttls_carries_requiretls(aiosmtpd_factory, tls_server_context,
                                                       tls_ca_file):
    server = starttls_server(aiosmtpd_factory, tls_server_context)
    with smtpstate.Client(server.host, server.port, timeout=20, tls="verify",
                          ca_file=tls_ca_file) as client:
        first = client.send(msg(1))
        plain = client.send(msg(2, require_tls=False))
    assert first.status == "delivered", first
    assert plain.status == "delivered", plain
    got = server.wait_for_messages(2)
    assert got[0].mail_options[-1:] == ["REQUIRETLS"] and got[0].extra["tls"]
    assert "REQUIRETLS" not in got[1].mail_options
    lines = mail_lines(server)
    assert len(lines) == 2
    assert lines[0].endswith(b" REQUIRETLS") and b"REQUIRETLS" not in lines[1]


def test_aiosmtpd_implicit_tls_carries_requiretls(aiosmtpd_factory, tls_server_context,
                                                  tls_ca_file):
    server = aiosmtpd_factory(RequireTLSHandler(), smtp_class=RequireTLSSMTP,
                              ssl_context=tls_server_context)
    with smtpstate.Client(server.host, server.port, timeout=20, tls="implicit",
                          ca_file=tls_ca_file) as client:
        result = client.send(msg())
    assert result.status == "delivered", result
    assert server.wait_for_messages(1)[0].mail_options[-1:] == ["REQUIRETLS"]


def test_aiosmtpd_not_offered_no_mail(aiosmtpd_factory, tls_server_context, tls_ca_file):
    server = starttls_server(aiosmtpd_factory, tls_server_context, offer=False)
    with smtpstate.Client(server.host, server.port, timeout=20, tls="verify",
                          ca_file=tls_ca_file) as client:
        refused = client.send(msg(1))
        plain = client.send(msg(2, require_tls=False))    # the connection is fine
    assert_result_refused(refused, WHY_NOT_OFFERED)
    assert refused.bounce_class is not None and refused.bounce_class.code == 25
    assert plain.status == "delivered", plain
    assert len(server.wait_for_messages(1)) == 1
    lines = mail_lines(server)
    assert len(lines) == 1 and b"REQUIRETLS" not in lines[0]   # the plain message's


def test_aiosmtpd_opportunistic_tls_is_not_verified(aiosmtpd_factory, tls_server_context,
                                                    tls_ca_file):
    server = starttls_server(aiosmtpd_factory, tls_server_context)
    with smtpstate.Client(server.host, server.port, timeout=20, tls="opportunistic",
                          ca_file=tls_ca_file) as client:
        result = client.send(msg())
        assert client.tls_version in ("TLSv1.2", "TLSv1.3")     # encrypted all the same
    assert_result_refused(result, WHY_UNVERIFIED)
    assert mail_lines(server) == [] and server.messages == []


def test_aiosmtpd_skipped_verification_is_not_verified(aiosmtpd_factory, tls_server_context):
    server = starttls_server(aiosmtpd_factory, tls_server_context)
    with smtpstate.Client(server.host, server.port, timeout=20, tls="verify",
                          dangerously_skip_certificate_verification=True) as client:
        result = client.send(msg())
    assert_result_refused(result, WHY_UNVERIFIED)
    assert mail_lines(server) == []


def test_aiosmtpd_no_tls(aiosmtpd_factory):
    server = aiosmtpd_factory(RequireTLSHandler(in_clear=True), smtp_class=RequireTLSSMTP)
    with smtpstate.Client(server.host, server.port, timeout=20, tls="none") as client:
        result = client.send(msg())
        plain = client.send(msg(2, require_tls=False))
    assert_result_refused(result, WHY_NO_TLS)
    assert plain.status == "delivered"
    assert all(b"REQUIRETLS" not in ln for ln in mail_lines(server))
    assert len(mail_lines(server)) == 1


def test_engine_keeps_requiretls(aiosmtpd_factory, tls_server_context, tls_ca_file):
    """The Engine copies each message (smtps_message_copy): the flag goes
    with it, to a server that can carry it and to one that cannot."""
    good = starttls_server(aiosmtpd_factory, tls_server_context)
    bad = starttls_server(aiosmtpd_factory, tls_server_context, offer=False)
    with smtpstate.Engine() as engine:
        tickets = [engine.submit(msg(i), server.host, server.port, tls="verify",
                                 ca_file=tls_ca_file, timeout=20)
                   for i, server in enumerate((good, bad))]
        results = {r.ticket.id: r for r in engine.run()}
    ok, refused = (results[t.id] for t in tickets)
    assert ok.status == "delivered", ok
    assert good.wait_for_messages(1)[0].mail_options[-1:] == ["REQUIRETLS"]
    assert_result_refused(refused, WHY_NOT_OFFERED)
    assert mail_lines(bad) == []


def test_aio_client_keeps_requiretls(aiosmtpd_factory, tls_server_context, tls_ca_file):
    import asyncio

    from smtpstate import aio

    server = starttls_server(aiosmtpd_factory, tls_server_context)
    result = asyncio.run(aio.send(msg(), server.host, server.port, tls="verify",
                                  ca_file=tls_ca_file, timeout=20))
    assert result.status == "delivered", result
    assert server.wait_for_messages(1)[0].mail_options[-1:] == ["REQUIRETLS"]


# ---------------------------------------------------------------------------
# The Message: the flag and the TLS-Required header field (RFC 8689 4.1)
# ---------------------------------------------------------------------------


def test_require_tls_must_be_a_bool():
    for bad in (1, "yes", None):
        with pytest.raises(InvalidMessageError, match="require_tls must be True or False"):
            rt_message(require_tls=bad)
    assert rt_message().require_tls is True
    assert rt_message(require_tls=False).require_tls is False


def test_c_message_carries_the_flag():
    env = rt_message()._envelope()
    assert lib.smtps_message_require_tls(env) == 1
    copy = rt_message()._to_c()
    assert lib.smtps_message_require_tls(copy) == 1
    assert lib.smtps_message_require_tls(rt_message(require_tls=False)._to_c()) == 0
    assert lib.smtps_message_set_require_tls(copy, 2) == lib.SMTPS_EINVAL


def test_pickle_keeps_it():
    again = pickle.loads(pickle.dumps(rt_message()))
    assert again.require_tls is True
    assert lib.smtps_message_require_tls(again._envelope()) == 1


HEADED = [
    b"Subject: x\r\nTLS-Required: No\r\n\r\nbody\r\n",
    b"TLS-Required: No\n\nbody\n",                          # LF endings, first field
    b"Subject: x\rtls-required :  no \r\rbody",             # CR endings, any case
    b"Subject: folded\r\n over two lines\r\nTLS-REQUIRED:No\r\n\r\n",
    b"X-Long: " + b"a" * 200_000 + b"\r\nTLS-Required: No\r\n\r\n",   # past one piece
]


@pytest.mark.parametrize("data", HEADED)
@pytest.mark.parametrize("kind", ["bytes", "buffer", "file"])
def test_tls_required_header_is_refused(data, kind):
    body = {"bytes": data, "buffer": memoryview(data), "file": io.BytesIO(data)}[kind]
    with pytest.raises(InvalidMessageError, match=r"cannot be combined with the message's "
                       r"'TLS-Required: [Nn]o' header field \(RFC 8689 4.1\)"):
        Message("a@example.test", ["b@example.test"], body, require_tls=True,
                long_lines="allow")
    # Without require_tls the header is the sender's business: nothing special.
    Message("a@example.test", ["b@example.test"], data, long_lines="allow")


@pytest.mark.parametrize("data", [
    b"Subject: x\r\n\r\nTLS-Required: No\r\n",              # in the body
    b"Subject: x\r\nX-TLS-Required: No\r\n\r\n",            # another field
    b"Subject: x\r\nX: TLS-Required: No\r\n\r\n",           # inside a value
    b"Subject: x\r\n TLS-Required: No\r\n\r\n",             # a folded line
    b"not a header\r\nTLS-Required: No\r\n",                # no header section
])
def test_tls_required_elsewhere_is_not_a_header(data):
    assert Message("a@example.test", ["b@example.test"], data, require_tls=True).require_tls


def test_a_file_body_is_looked_at_from_where_it_stands():
    head = b"TLS-Required: No\r\n"                       # before the message
    f = io.BytesIO(head + b"Subject: x\r\n\r\nx")
    f.seek(len(head))
    assert Message("a@example.test", ["b@example.test"], f, require_tls=True).require_tls
    f = io.BytesIO(b"junk\r\nTLS-Required: No\r\n\r\nx")
    f.seek(len(b"junk\r\n"))
    with pytest.raises(InvalidMessageError, match="TLS-Required"):
        Message("a@example.test", ["b@example.test"], f, require_tls=True)


def test_a_stream_cannot_be_looked_at():
    # Documented: a stream is read only as it is sent.
    m = Message("a@example.test", ["b@example.test"], iter([b"TLS-Required: No\r\n\r\n"]),
                require_tls=True)
    assert m.require_tls


def test_from_email_passes_it_on():
    em = email.message.EmailMessage()
    em["From"] = "a@example.test"
    em["To"] = "b@example.test"
    em.set_content("hi")
    assert Message.from_email(em, require_tls=True).require_tls
    em["TLS-Required"] = "No"
    with pytest.raises(InvalidMessageError, match="TLS-Required"):
        Message.from_email(em, require_tls=True)
    assert not Message.from_email(em).require_tls
