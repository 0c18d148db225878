"""Delivery options, the same for every driver (Client, Engine, asyncio):
``protocol``, ``tls``, ``auth``, ``ca_file``, ``timeout``, ``helo``, the
TLS settings of submission (``ca_path``, ``cert_file``, ``key_file``,
``key_password``, ``tls_min_version``, ``ciphers``, ``ciphersuites``) and
the loudly named ``dangerously_skip_certificate_verification``; and where a
driver may connect (:func:`check_host`, :func:`check_port`, and
:func:`unix_path` for ``"unix:/path/to/socket"``).

Rule: options are checked here, once, when they are given; drivers apply
them to a C session with :meth:`Options.apply` or turn them into a
``struct smtps_destination`` with :meth:`Options.destination`, and never
interpret them on their own. The TLS settings are checked by making their
C policy (``smtps_tls_config_make``) when the Options are made, so that a
missing file, a key that does not match its certificate or a cipher list
OpenSSL refuses is an :class:`InvalidOptionError` here, not a failed
first connection. Making it is cheap: the system CA store is read only by
the first handshake that verifies a certificate (csrc/tls.c).
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

from smtpstate._ffi import AUTH_MECHANISMS, check, ffi, lib, strerror
from smtpstate.errors import InvalidOptionError

__all__ = ["Auth", "Options", "TLS_MODES", "TLS_VERSIONS", "VERIFYING", "ENGINE_ONLY",
           "default_tls", "PROTOCOLS", "AUTH_MECHANISMS", "check_host", "check_port",
           "unix_path", "UNIX_PREFIX"]

TLS_MODES = {
    "none": lib.SMTPS_TLS_NONE,
    "opportunistic": lib.SMTPS_TLS_OPPORTUNISTIC,
    "verify": lib.SMTPS_TLS_VERIFY,
    "starttls": lib.SMTPS_TLS_STARTTLS,       # the earlier name of "verify"
    "implicit": lib.SMTPS_TLS_IMPLICIT,
    "dane": lib.SMTPS_TLS_DANE,
    "dane-only": lib.SMTPS_TLS_DANE_ONLY,
    "mta-sts": lib.SMTPS_TLS_MTA_STS,
}

#: The lowest TLS version a connection may use (``tls_min_version``).
TLS_VERSIONS = {
    "TLSv1.2": lib.SMTPS_TLS_V1_2,       # the default
    "TLSv1.3": lib.SMTPS_TLS_V1_3,
}

#: The levels only the Engine can apply (it looks up the TLSA records,
#: and knows the MTA-STS policies).
ENGINE_ONLY = frozenset({"dane", "dane-only", "mta-sts"})

#: The levels that check the server's certificate and name.
VERIFYING = frozenset({"verify", "starttls", "implicit"})


def default_tls(auth: Any) -> str:
    """The level that fits a destination when none is given: verified TLS
    where credentials will be sent (they must reach the server named, and
    no one else), unless the caller allowed them in clear
    (``Auth(allow_plaintext=True)``); else opportunistic (RFC 7435)."""
    if auth is not None and not auth.allow_plaintext:
        return "verify"
    return "opportunistic"


# AUTH_MECHANISMS (name -> bit) is read from C's one list (smtpstate._ffi).

#: The protocols a session speaks, name -> C value, read from C's one list
#: (``SMTPS_PROTOCOLS``): "smtp" (RFC 5321, the default) and "lmtp"
#: (RFC 2033: LHLO, and one reply per recipient after the data).
PROTOCOLS: Dict[str, int] = {
    ffi.string(lib.smtps_protocol_name(i)).decode("ascii"): i
    for i in range(lib.SMTPS_PROTO__COUNT)
}

#: How a host names a unix-domain socket: ``"unix:/path/to/socket"``.
UNIX_PREFIX = "unix:"

# The bytes of a unix socket path, without its NUL (Linux's sun_path is
# 108 bytes; a longer path cannot be connected to at all).
_UNIX_PATH_MAX = 107


@dataclass(frozen=True)
class Auth:
    """SMTP AUTH credentials (RFC 4954).

    Args:
        user: the user name.
        secret: the password, or the OAuth 2 access token for XOAUTH2.
        mechanism: force one of PLAIN, LOGIN, CRAM-MD5, XOAUTH2; None picks
            the best the server offers.
        allow_plaintext: send credentials even without TLS. Off by default:
            credentials otherwise never cross the network in clear.
    """

    user: str
    secret: str
    mechanism: Optional[str] = None
    allow_plaintext: bool = False

    def __post_init__(self) -> None:
        for what, value in (("user", self.user), ("secret", self.secret)):
            if not isinstance(value, str) or not value:
                raise InvalidOptionError(f"auth {what} must be a non-empty str")
            if "\x00" in value:
                raise InvalidOptionError(f"auth {what} contains a NUL character")
        if self.mechanism is not None:
            mech = self.mechanism.upper()
            if mech not in AUTH_MECHANISMS:
                raise InvalidOptionError(
                    f"auth mechanism {self.mechanism!r} is not one of {sorted(AUTH_MECHANISMS)}")
            object.__setattr__(self, "mechanism", mech)

    def __repr__(self) -> str:                 # never show the secret
        return (f"Auth(user={self.user!r}, secret='***', mechanism={self.mechanism!r}, "
                f"allow_plaintext={self.allow_plaintext})")

    @property
    def mechs(self) -> int:
        return AUTH_MECHANISMS[self.mechanism] if self.mechanism else lib.SMTPS_AUTH_ANY


AuthLike = Union[Auth, Tuple[str, str], None]


def _printable_name(what: str, value: Any, limit: int = 255) -> str:
    """A host or EHLO name: 1-limit printable ASCII characters, no space.
    C stops at a NUL and a CR LF would end a command line, so neither may
    ever get that far."""
    if not isinstance(value, str):
        raise InvalidOptionError(f"{what} must be a str, not {type(value).__name__}")
    if not value or len(value) > limit or any(
            not 0x21 <= ord(ch) <= 0x7E for ch in value):
        raise InvalidOptionError(
            f"{what} {value!r} must be 1-{limit} printable ASCII characters "
            "without spaces or control characters")
    return value


def check_host(host: Any, what: str = "host") -> str:
    """Return ``host`` (a name or an address literal) if a driver may use it.

    Raises:
        InvalidOptionError: not a str, empty, too long, or with a space,
            NUL or other control character (the resolver would stop at a
            NUL and connect somewhere else).
    """
    if not isinstance(host, str):
        raise InvalidOptionError(f"{what} must be a str, not {type(host).__name__}")
    # Non-ASCII is an IDN, encoded when it is used; controls never are.
    if not host or len(host) > 255 or any(
            ord(ch) < 0x21 or 0x7F <= ord(ch) < 0xA0 or ch.isspace() for ch in host):
        raise InvalidOptionError(
            f"{what} {host!r} must be a name or an address: 1-255 characters "
            "without spaces or control characters")
    return host


def unix_path(host: Any) -> Optional[str]:
    """The socket path of a ``"unix:/path/to/socket"`` host, or None when
    ``host`` is a name or an address (or not a str: :func:`check_host`
    says what is wrong with it then).

    Raises:
        InvalidOptionError: ``"unix:"`` without a path, a path with a NUL,
            or one longer than a unix socket address holds (107 bytes).
    """
    if not isinstance(host, str) or not host.startswith(UNIX_PREFIX):
        return None
    path = host[len(UNIX_PREFIX):]
    if not path or "\x00" in path:
        raise InvalidOptionError(
            f"host {host!r}: a unix socket is named \"unix:/path/to/socket\", "
            "with a path and no NUL in it")
    if len(os.fsencode(path)) > _UNIX_PATH_MAX:
        raise InvalidOptionError(
            f"host {host!r}: a unix socket path holds at most {_UNIX_PATH_MAX} bytes; "
            "use a shorter path (a symbolic link to its directory, say)")
    return path


def check_port(port: Any, what: str = "port") -> int:
    """Return ``port`` if a driver may connect to it: the one port check of
    every driver (Client, Engine, deliver, asyncio).

    Only an ``int`` is taken: a float would be truncated (8025.9 is not a
    port anyone meant) and a str is a caller's slip that would otherwise
    surface later, and differently in each driver.

    Raises:
        InvalidOptionError: not an int (a bool is not one either), or
            outside 1-65535 (C would wrap 70000 round to 4464).
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise InvalidOptionError(f"{what} must be an int from 1 to 65535, not {port!r}")
    return int(port)                           # an int subclass (IntEnum) as a plain int


def _check_count(value: Any, what: str, low: int = 1) -> int:
    """Return ``value`` if it is an int from ``low`` to 2**31 - 1 (what C
    keeps it in): a limit, a concurrency. Not a bool, not a float.

    Raises:
        InvalidOptionError: it is not.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < 2**31:
        raise InvalidOptionError(f"{what} must be an int >= {low}, not {value!r}")
    return int(value)


def _check_seconds(value: Any, what: str) -> float:
    """Return ``value`` if it is a positive number of seconds (not a bool),
    below 10**7 (C keeps milliseconds).

    Raises:
        InvalidOptionError: it is not.
    """
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not 0 < value < 10**7):
        raise InvalidOptionError(f"{what} must be a positive number of seconds, not {value!r}")
    return value


def _check_option(rc: int, what: str) -> None:
    """check() for the calls that apply options to a C session: C refusing
    a value (SMTPS_EINVAL, SMTPS_ETOOBIG) is a bad option here, not a bad
    message, whatever check() would call it."""
    if rc in (lib.SMTPS_EINVAL, lib.SMTPS_ETOOBIG):
        raise InvalidOptionError(f"{what}: {strerror(rc)}")
    check(rc, what)


PathLike = Union[str, "os.PathLike[str]"]

# The settings of a C TLS policy, the files' as they are on disk: one
# SSL_CTX for each, for the whole process, made when the first Options
# with them are (a file replaced since gets a policy of its own).
_tls_configs: Dict[Tuple[Any, ...], Any] = {}
_tls_lock = threading.Lock()

# What the C policy says why in (bounded there too).
_WHY_MAX = 512


def _check_path(value: Any, what: str, directory: bool = False) -> Optional[str]:
    """Return ``value`` (None, a str or a path) as a str path if it names
    a readable file (with ``directory``, a directory).

    Raises:
        InvalidOptionError: it is not a str or path, holds a NUL, does not
            exist, is not a file (directory) or cannot be read.
    """
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise InvalidOptionError(
            f"{what} must be a path (str or os.PathLike), not {type(value).__name__}")
    path = os.fspath(value)
    if not isinstance(path, str) or not path or "\x00" in path:
        raise InvalidOptionError(f"{what}={value!r} is not a usable path")
    kind = "directory" if directory else "file"
    if not os.path.exists(path):
        raise InvalidOptionError(f"{what} {path!r} does not exist")
    if os.path.isdir(path) != directory:
        raise InvalidOptionError(f"{what} {path!r} is not a {kind}")
    if not os.access(path, os.R_OK | (os.X_OK if directory else 0)):
        raise InvalidOptionError(f"{what} {path!r}: this process may not read that {kind}")
    return path


def _check_text(value: Any, what: str) -> Optional[str]:
    """Return ``value`` if it is None or printable ASCII (a cipher list).

    Raises:
        InvalidOptionError: it is not.
    """
    if value is not None and (not isinstance(value, str) or any(
            not 0x20 <= ord(ch) <= 0x7E for ch in value)):
        raise InvalidOptionError(f"{what} must be a str of printable ASCII, not {value!r}")
    return value


def _file_state(path: Optional[PathLike]) -> Any:
    """What tells one version of a file from the next (a certificate
    renewed in place), for the cache of policies."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return (path, None)                     # said by C, in its words
    return (path, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _tls_config(o: "Options", password: Optional[bytes]) -> Any:
    """The shared C policy of ``o``'s TLS settings, made (and so checked)
    the first time they are seen.

    Raises:
        InvalidOptionError: C refused a setting; the message is C's, with
            OpenSSL's reasons.
        MemoryError: out of memory.
    """
    insecure = bool(o.dangerously_skip_certificate_verification)
    key = (_file_state(o.ca_file), _file_state(o.ca_path), insecure,
           _file_state(o.cert_file), _file_state(o.key_file),
           # Not the password itself: this cache lives as long as the process.
           None if password is None else hashlib.sha256(password).digest(),
           o.tls_min_version, o.ciphers, o.ciphersuites)
    with _tls_lock:
        cfg = _tls_configs.get(key)
        if cfg is not None:
            return cfg
        keep = []

        def cstr(value: Any) -> Any:
            if value is None:
                return ffi.NULL
            c = ffi.new("char[]", value if isinstance(value, bytes) else os.fsencode(value))
            keep.append(c)
            return c

        ts = ffi.new("struct smtps_tls_settings *")
        ts.sizeof_settings = ffi.sizeof("struct smtps_tls_settings")
        ts.ca_file = cstr(o.ca_file)
        # OpenSSL looks in the directory at each handshake: after a chdir too.
        ts.ca_path = cstr(None if o.ca_path is None else os.path.abspath(o.ca_path))
        ts.insecure_no_verify = 1 if insecure else 0
        ts.cert_file = cstr(o.cert_file)
        ts.key_file = cstr(o.key_file)
        ts.key_password = cstr(password)
        ts.min_version = TLS_VERSIONS[o.tls_min_version]
        ts.ciphers = cstr(o.ciphers)
        ts.ciphersuites = cstr(o.ciphersuites)
        out = ffi.new("struct smtps_tls_config **")
        why = ffi.new("char[]", _WHY_MAX)
        rc = lib.smtps_tls_config_make(ts, out, why, _WHY_MAX)
        if password is not None:
            ffi.memmove(ts.key_password, b"\x00" * len(password), len(password))
        if rc in (lib.SMTPS_EINVAL, lib.SMTPS_ETLS):
            text = ffi.string(why).decode("utf-8", "replace")
            raise InvalidOptionError(text or f"cannot set up TLS: {strerror(rc)}")
        check(rc, "set up TLS")
        cfg = ffi.gc(out[0], lib.smtps_tls_config_free)
        _tls_configs[key] = cfg
        return cfg


@dataclass(frozen=True)
class Options:
    """How to talk to one destination.

    Args:
        protocol: "smtp" (RFC 5321) or "lmtp" (RFC 2033, for delivery to a
            local mail store such as Dovecot or Cyrus): LHLO instead of
            EHLO, no HELO fallback, and after the data one reply per
            recipient accepted at RCPT, which becomes that recipient's
            status and ``reply`` in the :class:`~smtpstate.Result`.
        tls: "none"; "opportunistic" (RFC 7435: STARTTLS when offered,
            the certificate not checked, else clear; the Engine retries an
            address whose handshake failed once in clear, as Postfix's
            "may"); "verify" (STARTTLS required, the certificate chain and
            the host name checked: nothing but QUIT in clear when it is
            missing, refused or fails; "starttls" is the earlier name); or
            "implicit" (TLS from the first byte, port 465, verified);
            Engine only: "dane" (RFC 7672: TLS authenticated by the host's
            DNSSEC-validated TLSA records where it has them, else
            opportunistic), "dane-only" (no delivery without them) and,
            by MX only, "mta-sts" (RFC 8461: verified TLS to the MX hosts
            of a domain whose MTA-STS policy is enforced, else
            opportunistic; no TLSA lookups). None: "verify" with ``auth``; else "dane" by MX and
            "opportunistic" to a named host (docs/tls.md).
            "opportunistic" with ``auth`` is refused (the credentials
            could reach anyone) unless ``Auth(allow_plaintext=True)``,
            which also makes it the default.
        auth: an :class:`Auth`, or a (user, secret) pair, or None.
        ca_file: PEM file of trusted CAs; None (and no ``ca_path``): the
            system store, read by the first handshake that verifies.
        timeout: seconds for every reply deadline (and connecting); None:
            RFC 5321's per-stage defaults.
        helo: the EHLO/HELO name; None: the driver's default.
        server_hostname: the name sent as SNI and checked against the
            certificate; None: the host connected to.
        dangerously_skip_certificate_verification: accept any certificate
            and host name. Only for tests against throwaway servers.
        ca_path: a directory of trusted CA certificates named by their
            subject hash (``openssl rehash DIR``), as ``ssl``'s ``capath``;
            with ``ca_file`` both count.
        cert_file: a client certificate to offer a server that asks for
            one (submission servers that authenticate clients by
            certificate): PEM, the certificate first, then any
            intermediates; the key too unless ``key_file``.
        key_file: the certificate's private key, PEM.
        key_password: the password of an encrypted key (str or bytes);
            never shown by ``repr``. Without it an encrypted key is refused
            (never asked for on a terminal).
        tls_min_version: "TLSv1.2" (the default) or "TLSv1.3".
        ciphers: an OpenSSL cipher list for TLS 1.2 ("ECDHE+AESGCM");
            None: OpenSSL's default.
        ciphersuites: the TLS 1.3 cipher suites, ':'-separated
            ("TLS_AES_256_GCM_SHA384"); None: OpenSSL's default.

    Raises:
        InvalidOptionError: a bad value. The TLS settings are checked
            whole when the Options are made: a file that is missing or
            cannot be read, a certificate or key OpenSSL cannot load (a
            wrong ``key_password``), a key that does not match its
            certificate, a version not in :data:`TLS_VERSIONS`, a cipher
            list in which OpenSSL finds no cipher; the message says which,
            with OpenSSL's reasons.
    """

    protocol: str = "smtp"
    tls: Optional[str] = None
    auth: Optional[Auth] = None
    ca_file: Optional[str] = None
    timeout: Optional[float] = None
    helo: Optional[str] = None
    server_hostname: Optional[str] = None
    dangerously_skip_certificate_verification: bool = False
    ca_path: Optional[PathLike] = None
    cert_file: Optional[PathLike] = None
    key_file: Optional[PathLike] = None
    key_password: Union[str, bytes, None] = field(default=None, repr=False)
    tls_min_version: str = "TLSv1.2"
    ciphers: Optional[str] = None
    ciphersuites: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.protocol, str) or self.protocol not in PROTOCOLS:
            raise InvalidOptionError(
                f"protocol={self.protocol!r} is not one of {sorted(PROTOCOLS)}")
        if self.tls is not None and self.tls not in TLS_MODES:
            raise InvalidOptionError(f"tls={self.tls!r} is not one of {sorted(TLS_MODES)}")
        auth: Any = self.auth
        if isinstance(auth, tuple):
            if len(auth) != 2:
                raise InvalidOptionError("auth must be Auth(...) or a (user, secret) pair")
            object.__setattr__(self, "auth", Auth(*auth))
        elif auth is not None and not isinstance(auth, Auth):
            raise InvalidOptionError("auth must be Auth(...) or a (user, secret) pair")
        if self.tls is None:
            # Remembered: by MX, the default is DANE where it can be had.
            object.__setattr__(self, "_tls_default", True)
            object.__setattr__(self, "tls", default_tls(self.auth))
        elif (self.tls == "opportunistic" and self.auth is not None
              and not self.auth.allow_plaintext):
            raise InvalidOptionError(
                "tls='opportunistic' does not go with auth: it does not check who the "
                "server is, so the credentials could reach anyone; use tls='verify' "
                "(the default with auth) or 'implicit', or Auth(..., "
                "allow_plaintext=True) for a server you trust without it")
        if self.timeout is not None:
            _check_seconds(self.timeout, "timeout")
        if self.helo is not None:
            _printable_name("HELO name", self.helo, lib.SMTPS_HELO_MAX)
        if self.server_hostname is not None:
            check_host(self.server_hostname, "server_hostname")
        self._check_tls_settings()

    def _check_tls_settings(self) -> None:
        """Check the TLS settings by making their C policy, now (it is kept
        for :meth:`tls_config`). With ``tls="none"`` a policy is made only
        when settings were given: they are checked all the same."""
        ca_file = _check_path(self.ca_file, "ca_file")
        ca_path = _check_path(self.ca_path, "ca_path", directory=True)
        cert_file = _check_path(self.cert_file, "cert_file")
        key_file = _check_path(self.key_file, "key_file")
        for name, value in (("ca_file", ca_file), ("ca_path", ca_path),
                            ("cert_file", cert_file), ("key_file", key_file)):
            object.__setattr__(self, name, value)
        if not isinstance(self.tls_min_version, str) or self.tls_min_version not in TLS_VERSIONS:
            raise InvalidOptionError(f"tls_min_version={self.tls_min_version!r} is not one of "
                                     f"{sorted(TLS_VERSIONS)}")
        _check_text(self.ciphers, "ciphers")
        _check_text(self.ciphersuites, "ciphersuites")
        password = self.key_password
        if isinstance(password, str):
            password = password.encode("utf-8")
        if password is not None and (not isinstance(password, bytes) or not password
                                     or b"\x00" in password):
            raise InvalidOptionError("key_password must be a non-empty str or bytes "
                                     "without a NUL")
        given = (ca_file, ca_path, cert_file, key_file, password, self.ciphers,
                 self.ciphersuites)
        if self.tls != "none" or self.tls_min_version != "TLSv1.2" or any(
                v is not None for v in given):
            object.__setattr__(self, "_tls_cfg", _tls_config(self, password))

    @classmethod
    def make(cls, **kwargs: Any) -> "Options":
        """Options from keyword arguments, refusing unknown ones by name."""
        known = cls.__dataclass_fields__
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)

    @property
    def timeout_ms(self) -> int:
        return 0 if self.timeout is None else max(1, int(self.timeout * 1000))

    def tls_config(self) -> Any:
        """The shared C TLS policy for these options, made with them (NULL
        when tls="none")."""
        if self.tls == "none":
            return ffi.NULL
        return self.__dict__["_tls_cfg"]

    def check_unix(self, host: str) -> Optional[str]:
        """The socket path when ``host`` is ``"unix:/path"``, else None;
        for the drivers of single sessions (Client, aio), before they
        connect.

        Raises:
            InvalidOptionError: a bad unix host (:func:`unix_path`); TLS
                over a unix socket without ``server_hostname`` (the name
                the certificate must carry cannot come from a path); a
                level only the Engine can apply ("dane", "dane-only").
        """
        if self.tls in ENGINE_ONLY:
            raise InvalidOptionError(
                f"tls={self.tls!r} needs the Engine, which looks up the TLSA records and "
                "MTA-STS policies of each destination; a single session cannot (use "
                "Engine.submit or deliver)")
        path = unix_path(host)
        if (path is not None and self.tls in VERIFYING and self.server_hostname is None
                and not self.dangerously_skip_certificate_verification):
            raise InvalidOptionError(
                f"tls={self.tls!r} over the unix socket {host!r} needs "
                "server_hostname=..., the name the server's certificate carries")
        return path

    def apply(self, session_ptr: Any, host: str, keep: list) -> None:
        """Set the protocol, TLS, AUTH and deadlines on a C session before it
        starts. ``keep`` receives cdata that must live as long as the
        session. ``host`` is the server's name (the default TLS server
        name) or ``"unix:/path"`` (no default: see :meth:`check_unix`)."""
        if self.tls in ENGINE_ONLY:
            raise InvalidOptionError(
                f"tls={self.tls!r} needs the Engine, which looks up the TLSA records and "
                "MTA-STS policies of each destination; a single session cannot (use "
                "Engine.submit or deliver)")
        _check_option(lib.smtps_session_set_protocol(session_ptr, PROTOCOLS[self.protocol]),
                      "set the protocol")
        if self.tls != "none" and self.server_hostname is None and unix_path(host) is not None:
            # No name to send or check (check_unix() let only an unverified
            # level or policy come this far).
            _check_option(lib.smtps_session_set_tls(session_ptr, TLS_MODES[self.tls],
                                                    self.tls_config(), ffi.NULL), "set up TLS")
        elif self.tls != "none":
            server_name = self.server_hostname or host
            try:
                name = server_name.encode("idna")
            except UnicodeError:
                raise InvalidOptionError(
                    f"{server_name!r} is not a valid host name") from None
            keep.append(name)
            _check_option(lib.smtps_session_set_tls(session_ptr, TLS_MODES[self.tls],
                                                    self.tls_config(), name), "set up TLS")
        if self.auth is not None:
            a = self.auth
            _check_option(lib.smtps_session_set_auth(session_ptr, a.user.encode(),
                                                     a.secret.encode(), a.mechs,
                                                     1 if a.allow_plaintext else 0),
                          "set up AUTH")
        if self.timeout is not None:
            for sid in range(lib.SMTPS_MAX_STATES):
                if lib.smtps_session_set_timeout(session_ptr, sid, self.timeout_ms) < 0:
                    break

    def destination(self, host: Optional[str], port: int, keep: list) -> Any:
        """A ``struct smtps_destination`` for the engine (host None: by
        MX). ``keep`` receives the cdata it points to, which must live
        until the submit call.

        Raises:
            InvalidOptionError: LMTP without a host (an LMTP server is
                named, never found by MX).
        """
        if self.tls == "mta-sts" and host is not None:
            raise InvalidOptionError(
                "tls='mta-sts' applies a recipient domain's MTA-STS policy to its MX "
                f"hosts: it needs delivery by MX, not to the host {host!r}")
        if self.protocol != "smtp" and host is None:
            raise InvalidOptionError(
                f"protocol={self.protocol!r} needs a host (a TCP host or 'unix:/path'): "
                "LMTP servers are not found by MX")
        d = ffi.new("struct smtps_destination *")
        keep.append(d)

        def cstr(value: Optional[str], codec: str = "utf-8") -> Any:
            if value is None:
                return ffi.NULL
            c = ffi.new("char[]", value.encode(codec))
            keep.append(c)
            return c

        d.sizeof_destination = ffi.sizeof("struct smtps_destination")
        d.host = cstr(host, "idna")
        d.port = int(port)
        level = self.tls
        if host is None and level == "opportunistic" and getattr(self, "_tls_default", False):
            level = "dane"                       # the default that fits MX routing
        d.tls_mode = TLS_MODES[level]
        d.tls = self.tls_config()
        if d.tls != ffi.NULL:
            keep.append(d.tls)
        d.tls_servername = cstr(self.server_hostname, "idna")
        if self.auth is not None:
            d.auth_user = cstr(self.auth.user)
            d.auth_secret = cstr(self.auth.secret)
            d.auth_mechs = self.auth.mechs
            d.auth_allow_plaintext = 1 if self.auth.allow_plaintext else 0
        d.timeout_ms = self.timeout_ms
        d.helo = cstr(self.helo, "ascii")
        d.protocol = PROTOCOLS[self.protocol]
        return d
