"""Write the hand-made seeds of fuzz/corpus/<target>/ (named ``seed-*``).

Each seed is a small real input in the target's input format: replies and
EHLO answers as servers send them, bodies with the SMTP smuggling
sequences, and whole dialogues for ``fuzz_session`` (both its raw mode,
where the input's bytes are the server's bytes, and its model mode, where
zero bytes mean "answer correctly"). The other files of the corpus
(hash-named) are what libFuzzer kept because they reached new code;
``fuzz/run.sh`` adds to them and ``-merge`` keeps them small.

Run from anywhere: ``python fuzz/make_corpus.py``. It only (re)writes the
``seed-*`` files, so it is safe to run again.
"""

from __future__ import annotations

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

REPLIES = {
    "banner": b"220 mx.example.net ESMTP Postfix (Debian/GNU)\r\n",
    "ehlo-postfix": (b"250-mx.example.net\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n"
                     b"250-VRFY\r\n250-ETRN\r\n250-STARTTLS\r\n250-ENHANCEDSTATUSCODES\r\n"
                     b"250-8BITMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n250 CHUNKING\r\n"),
    "pipelined": (b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 <x@example.net>: "
                  b"Recipient address rejected\r\n354 End data with <CR><LF>.<CR><LF>\r\n"),
    "multiline-error": b"550-5.7.1 first line\r\n550-5.7.1 second line\r\n550 5.7.1 last\r\n",
    "lf-only": b"220 lf only\n250-a\n250 b\n",
    "code-only": b"250\r\n221\r\n",
    "cr-in-text": b"250 text with a \r inside\r\n",
    "421": b"421 4.4.2 mx.example.net Error: timeout exceeded\r\n",
    "bad-digit": b"2x0 bad\r\n",
    "code-change": b"250-a\r\n251 b\r\n",
    "nul": b"250 a\x00b\r\n",
    "long-line": b"250 " + b"x" * 2040 + b"\r\n",
    "over-long-line": b"250 " + b"x" * 2050 + b"\r\n",
}

EHLO_TEXTS = {
    "postfix": b"mx.example.net\nPIPELINING\nSIZE 10240000\nVRFY\nETRN\nSTARTTLS\n"
               b"ENHANCEDSTATUSCODES\n8BITMIME\nDSN\nSMTPUTF8\nCHUNKING",
    "exchange": b"mx.example.com Hello [192.0.2.1]\nSIZE 37748736\nPIPELINING\nDSN\n"
                b"ENHANCEDSTATUSCODES\nSTARTTLS\nAUTH GSSAPI NTLM LOGIN\nAUTH=LOGIN\n"
                b"8BITMIME\nBINARYMIME\nCHUNKING\nSMTPUTF8",
    "auth": b"smtp.example.org\nAUTH PLAIN LOGIN CRAM-MD5 XOAUTH2\nauth cram-md5",
    "xclient": b"mx\nXCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT",
    "size-odd": b"mx\nSIZE\nSIZE 18446744073709551616\nSIZE 12x\nsize\t42",
    "greeting-looks-like-keyword": b"PIPELINING\nDSN",
    "tabs-and-case": b"mx\n\tpipelining\t\n  Chunking  ",
}

BODIES = {
    "plain": b"Subject: hi\r\n\r\nhello\r\n",
    "lf": b"Subject: hi\n\nhello\n.\n..\nend",
    "smuggle-lf": b"a\n.\nMAIL FROM:<evil@example>\n",
    "smuggle-cr": b"a\r.\rMAIL FROM:<evil@example>\r",
    "smuggle-crlf": b"a\r\n.\r\nRCPT TO:<x@example>\r\n",
    "dot-only": b".",
    "empty": b"",
    "cr-at-end": b"line\r",
    "binary": bytes(range(256)),
}


def _feed(data: bytes) -> bytes:
    """fuzz_session raw mode: 'some server bytes' operations."""
    out = b""
    for i in range(0, len(data), 256):
        chunk = data[i:i + 256]
        out += bytes([1, len(chunk) - 1]) + chunk
    return out


ROUND = b"\x00"        # a full round trip
QUIT = b"\x05"


def _raw(header: int, replies, shape: int = 0, before: bytes = b"") -> bytes:
    """A raw-mode dialogue: one message (shape 0: one recipient; 2: three;
    the first fixed body), after the operations in ``before``."""
    prog = bytes([header, 0, shape, 0]) + before
    for r in replies:
        prog += ROUND + _feed(r)
    return prog + ROUND


SESSIONS = {
    # Model mode: every zero byte means "the correct reply" / "a round trip".
    "model-one-message": b"\x00",
    "model-four-messages": b"\x00\x03" + b"\x00" * 12,
    "model-auth": b"\x08\x00",
    "model-auth-login": b"\x18\x00",
    "model-short-timeouts": b"\x40\x00\x00\x00" + b"\x00\x03\xff" * 4,
    "model-big-body": b"\x00\x00\x00\xff",
    "raw-plain": _raw(0x01, [
        b"220 mx ESMTP\r\n",
        b"250-mx\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 DSN\r\n",
        b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n",
        b"250 2.0.0 queued\r\n"]) + QUIT + ROUND + _feed(b"221 bye\r\n"),
    "raw-chunking": _raw(0x01, [
        b"220 mx ESMTP\r\n",
        b"250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n",
        b"250 ok\r\n250 ok\r\n",
        b"250 queued\r\n"]),
    "raw-no-ehlo": _raw(0x01, [
        b"220 old\r\n", b"502 what\r\n", b"250 hi\r\n", b"250 ok\r\n", b"250 ok\r\n",
        b"354 go\r\n", b"250 ok\r\n"]),
    "raw-auth-cram": _raw(0x09, [
        b"220 mx\r\n", b"250-mx\r\n250 AUTH CRAM-MD5 PLAIN\r\n",
        b"334 PDQxOTI5NDIzNDEuMTI4Mjg0NzJAc291cmNlZm91ci5hbmRyZXcuY211LmVkdT4=\r\n",
        b"235 ok\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n", b"250 ok\r\n"]),
    "raw-auth-login": _raw(0x19, [
        b"220 mx\r\n", b"250-mx\r\n250 AUTH LOGIN\r\n", b"334 VXNlcm5hbWU6\r\n",
        b"334 UGFzc3dvcmQ6\r\n", b"235 ok\r\n", b"250 ok\r\n", b"250 ok\r\n",
        b"354 go\r\n", b"250 ok\r\n"]),
    "raw-starttls": _raw(0x05, [
        b"220 mx\r\n", b"250-mx\r\n250 STARTTLS\r\n",
        b"220 go ahead\r\n\x16\x03\x03\x00\x02\x02\x28"]),
    # The handshake waits for the driver's turn (the clock's seconds odd:
    # op 3 moves it 1 s), then gets it (op 7 0xe0); or the server speaks
    # while it waits.
    "raw-starttls-turn": _raw(0x05, [
        b"220 mx\r\n", b"250-mx\r\n250 STARTTLS\r\n", b"220 go ahead\r\n"],
        before=b"\x03\x01") + b"\x07\xe0" + ROUND + _feed(b"\x16\x03\x03\x00\x02\x02\x28"),
    "raw-starttls-turn-injected": _raw(0x05, [
        b"220 mx\r\n", b"250-mx\r\n250 STARTTLS\r\n", b"220 go ahead\r\n",
        b"250 injected\r\n"], before=b"\x03\x01"),
    "raw-421": _raw(0x01, [b"220 mx\r\n", b"421 4.3.2 going down\r\n"]),
    # LMTP (header bit 7): three recipients (shape 2), one reply each.
    "model-lmtp-one-message": b"\x80\x00\x02\x00",
    "model-lmtp-four-messages": b"\x80\x03" + b"\x02\x00" * 4 + b"\x00" * 12,
    "model-lmtp-runahead": b"\xa0\x01" + b"\x02\x00" * 2 + b"\x00" * 8,
    "raw-lmtp": _raw(0x81, [
        b"220 lmtp\r\n", b"250-lmtp\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n",
        b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n250 ok\r\n354 go\r\n",
        b"250 2.0.0 r0\r\n", b"452 4.2.2 r2 full\r\n"], shape=2),
    "raw-lmtp-chunking": _raw(0x81, [
        b"220 lmtp\r\n", b"250-lmtp\r\n250-PIPELINING\r\n250 CHUNKING\r\n",
        b"250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n",
        b"250 r0\r\n250 r1\r\n"], shape=2),
    "raw-lmtp-lhlo-refused": _raw(0x81, [b"220 lmtp\r\n", b"500 5.5.1 what\r\n"]),
}


def _write(target: str, name: str, data: bytes) -> None:
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def main() -> None:
    for name, data in REPLIES.items():
        _write("reply", name, struct.pack("<H", 0x1234) + data)
    _write("reply", "all", struct.pack("<H", 7) + b"".join(REPLIES.values()))
    for name, data in EHLO_TEXTS.items():
        _write("caps", name, data)
    for name, data in BODIES.items():
        _write("body", name, struct.pack("<H", 0xBEEF) + data)
    for name, data in SESSIONS.items():
        _write("session", name, data)


if __name__ == "__main__":
    main()
