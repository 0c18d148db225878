/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	tls.c 3
 * SUMMARY
 *	TLS inside the session: OpenSSL over memory BIOs (RFC 3207, RFC 8314)
 * SYNOPSIS
 *	#include "smtpstate.h"
 *
 *	int	smtps_tls_config_make(settings, &cfg, why, why_len)
 *	struct smtps_tls_config *smtps_tls_config_new(ca_file, insecure_no_verify)
 *	void	smtps_tls_config_free(c)
 *	int	smtps_session_set_tls(s, mode, cfg, servername)
 *	int	smtps_session_tls_active(s)
 *	const char *smtps_session_tls_version(s)
 *	int	smtps_session_tls_resumed(s)
 *
 *	#include "internal.h"
 *
 *	int	smtps_session_set_tls_resume(s, slot)
 *	void	smtps_tls_resume_clear(slot)
 *	int	smtps_tls_config_trusted(c)
 *
 *	#include "session_private.h"
 *
 *	int	smtps_tls_begin(s)
 *	int	smtps_tls_proceed(s)
 *	int	smtps_tls_in_handshake(s)
 *	int	smtps_tls_verified(s)
 *	int	smtps_tls_feed(s, data, len)
 *	int	smtps_tls_flush(s)
 *	size_t	smtps_tls_output(s, &data)
 *	size_t	smtps_tls_consume(s, n)
 * DESCRIPTION
 *	OpenSSL is used as a pure state machine that never touches a socket
 *	(OpenSSL doc/designs/ddd, the "BIOm" design). Its BIO is our own
 *	(tls_bio_read(), tls_bio_write()), not a BIO pair: it reads the
 *	ciphertext feed() was given, in place, and appends what OpenSSL
 *	writes to the wire buffer the driver sends from:
 *
 *	    driver --feed()--> t->in --> SSL_read --> take_replies()
 *	    s->out (plaintext) --> SSL_write --> wire --output()-->
 *
 *	The pumps are tls_handshake() and tls_read() (ciphertext in) and
 *	smtps_tls_flush() (plaintext out, encrypted). Nothing is buffered
 *	between OpenSSL and the session but what OpenSSL keeps itself (a
 *	record not yet whole), so an idle connection holds no buffers of
 *	ours but the wire, which is freed whenever the driver has taken all
 *	of it; OpenSSL's own record buffers go back while idle too
 *	(SSL_MODE_RELEASE_BUFFERS), and SSL_read's plaintext goes to the
 *	stack. docs/tls.md ("Memory") has the figures.
 *
 *	Phases: OFF until smtps_tls_begin() (at the 220 to STARTTLS, or at
 *	start for implicit TLS); WAITING, while the driver's gate
 *	(smtps_session_set_tls_gate()) holds the handshake back until its
 *	turn (smtps_tls_proceed(); no SSL exists yet, and any byte the server
 *	sends is clear text that fails the connection); HANDSHAKE, during
 *	which plaintext the states queue (the second EHLO) waits in s->out;
 *	UP; FAILED, after which nothing is encrypted or read again. From
 *	WAITING on, output() never returns plaintext again: a failure can
 *	only close the connection.
 *
 *	"The final dot was sent" must still mean "the driver took it". Each
 *	SSL_write leaves a mark: the plaintext total it completed and the
 *	ciphertext total that carries it. consume() returns the plaintext
 *	whose marks the driver's ciphertext has passed, and session.c counts
 *	only that as sent. The marks live in a bounded ring; when it is full
 *	(or the wire holds SMTPS_OUT_HIGH bytes) encryption waits for the
 *	driver.
 *
 *	Verified TLS (smtps_tls_verified(), for REQUIRETLS, RFC 8689 4.2.1)
 *	is TLS that is up and authenticated the server: its certificate
 *	chain and name checked (a verifying level without
 *	insecure_no_verify), or its certificate matched by usable DANE
 *	records (smtps_session_set_dane() with n > 0). Opportunistic TLS,
 *	DANE's "records, none usable" (mandatory, unauthenticated) and a
 *	policy that checks nothing are encryption without authentication.
 *
 *	A config (SSL_CTX) is shared and reference counted; sessions hold a
 *	reference. Each session sends SNI and checks the certificate against
 *	its servername (an IP literal is checked against the IP addresses of
 *	the certificate, with no SNI, RFC 6066 3).
 *
 *	smtps_tls_config_make() checks every setting while it makes the
 *	config, so that a caller learns of a missing file, a key that does
 *	not match its certificate, a version or a cipher list OpenSSL
 *	refuses before anything connects, in words (why). The CA files of
 *	the settings are read then too. The system store, which takes some
 *	50 ms to parse, is read only when the first session that verifies a
 *	certificate begins its handshake (tls_trusted()): opportunistic TLS,
 *	the default, never verifies and never pays for it. The trusted CAs
 *	live in a store of the config's own, given to each verifying session;
 *	the SSL_CTX's store stays empty, because OpenSSL checks the chain of
 *	sessions that do not verify too, and a store may not change while it
 *	is in use by other threads.
 *
 *	Resumption (RFC 5077 tickets and session ids in TLS 1.2, RFC 8446
 *	2.2 tickets in TLS 1.3). A driver that makes several connections to
 *	one server (the engine: a host of a destination) gives each session
 *	the same slot, struct smtps_tls_resume, which must outlive them. The
 *	slot keeps one SSL_SESSION and the digest of the policy it was made
 *	under: the mode, whether and how the certificate was checked (CAs,
 *	DANE and its TLSA records, nothing), and the server name. Before the
 *	handshake the session offers what the slot holds if the digests are
 *	equal and it has not expired; a TLS 1.3 ticket is taken out of the
 *	slot as it is offered (used once, RFC 8446 C.4), a TLS 1.2 session
 *	stays. Every new session OpenSSL makes (after a full TLS 1.2
 *	handshake; each TLS 1.3 ticket, which arrives after the handshake)
 *	replaces what the slot holds (tls_new_session(), the config's client
 *	cache callback; OpenSSL's own cache stores nothing). A server that
 *	does not accept the session gets a full handshake, verified as
 *	always; a handshake that fails empties the slot of what it offered.
 * DIAGNOSTICS
 *	smtps_tls_config_make() returns SMTPS_EINVAL for a setting that is
 *	wrong (why says which, with OpenSSL's reasons), SMTPS_ENOMEM, or
 *	SMTPS_ETLS; smtps_tls_config_new() returns NULL for any of these.
 *	smtps_session_set_tls() returns SMTPS_EINVAL (bad mode or name, a
 *	verifying policy without a name), SMTPS_ESTATE (already started),
 *	SMTPS_ENOMEM or SMTPS_ETLS (no default policy could be made).
 *	smtps_session_set_tls_resume() returns SMTPS_EINVAL without TLS set
 *	and SMTPS_ESTATE once started. A TLS
 *	failure during the session fails the connection with a reason
 *	("TLS handshake failed: certificate verify failed (Hostname
 *	mismatch)") and SMTPS_ETLS goes back to the caller of feed().
 * BUGS
 *	No close_notify on the way out: the connection ends after QUIT's
 *	reply, as most MTAs do it. Early data (0-RTT) is never sent.
 * SEE ALSO
 *	RFC 3207 (STARTTLS), RFC 8314 (implicit TLS), RFC 6125 (names),
 *	RFC 5077 and RFC 8446 (resumption), session.c (the loop), states.c
 *	(the STARTTLS state), dest.c (the slots, one per host).
 *--*/

#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>

#include "session_private.h"

#define TLS_RECORD_MAX 16384		/* plaintext per SSL_write (one record) */
#define TLS_MARKS 64			/* SSL_writes the driver has not passed */
#define TLS_NAME_MAX 253		/* a DNS name (RFC 1035) */

/* struct smtps_tls_settings as first published: every field above */
#define SETTINGS_MIN_SIZE (offsetof(struct smtps_tls_settings, ciphersuites) \
			   + sizeof(const char *))

enum tls_phase {
    TLS_OFF,				/* clear text */
    TLS_WAITING,			/* begun, waiting for the driver's turn
					 * (smtps_session_set_tls_gate()): no
					 * SSL yet; plaintext waits */
    TLS_HANDSHAKE,			/* handshaking; plaintext waits */
    TLS_UP,				/* encrypting */
    TLS_FAILED				/* broken: nothing goes out any more */
};

struct smtps_tls_config {
    int     refs;			/* atomic */
    int     insecure;			/* no certificate or name checks */
    SSL_CTX *ctx;			/* its own X509_STORE stays empty */
    BIO_METHOD *bio;			/* tls_bio_*: the session's end of the wire */
    X509_STORE *cas;			/* atomic; the trusted CAs: the settings'
					 * files from the start, the system's
					 * once needed (tls_trusted()) */
    CRYPTO_RWLOCK *lock;		/* one thread loads the system store */
};

/* Plaintext total `plain` is carried by ciphertext up to total `wire`. */
struct tls_mark {
    uint64_t plain;
    uint64_t wire;
};

struct smtps_tls {
    int     mode;			/* SMTPS_TLS_* */
    int     verify;			/* check the certificate and name */
    int     phase;			/* enum tls_phase */
    int     handshake_failed;		/* FAILED before it was up */
    int     was_up;			/* it was UP once */
    int     refusal;			/* SMTPS_TLSO_NOT_OFFERED or _REFUSED */
    int     observe;			/* check, do not enforce (for reports) */
    long    verify_err;			/* X509_V_*: why the handshake failed */
    int     dane;			/* RFC 7672: the records below decide */
    struct smtps_tlsa *tlsa;		/* none: encrypt, do not authenticate */
    size_t  ntlsa;
    int     peer_closed;		/* close_notify seen: read no more */
    struct smtps_tls_config *cfg;
    char    servername[TLS_NAME_MAX + 1];	/* "" when none */
    SSL    *ssl;			/* owns its BIO (tls_bio_*) */
    const char *in;			/* ciphertext being fed; NULL outside feed() */
    size_t  inlen;
    int     wire_err;			/* SMTPS_E*: the wire could not grow */
    struct smtps_buf wire;		/* ciphertext for the driver */
    uint64_t wire_produced;
    uint64_t wire_consumed;
    struct tls_mark marks[TLS_MARKS];	/* a ring */
    int     mark_head;
    int     nmarks;
    struct smtps_tls_resume *resume;	/* the driver's slot; NULL: none */
    unsigned char policy[SMTPS_TLS_POLICY_LEN];	/* tls_policy(), at begin */
    SSL_SESSION *offered;		/* what was offered (identity only) */
};

static void tls_why(char *why, size_t len, const char *fmt,...);
static int tls_error_is(unsigned long e, int reason);
static int tls_key_password(char *buf, int size, int rwflag, void *user);
static int tls_hashed_name(const char *name);
static int tls_ca_path(const char *path, char *why, size_t len);
static int tls_trust(const struct smtps_tls_settings *ts, X509_STORE **store,
		             char *why, size_t len);
static int tls_client_cert(SSL_CTX *ctx, const struct smtps_tls_settings *ts,
			           char *why, size_t len);
static int tls_protocol(SSL_CTX *ctx, const struct smtps_tls_settings *ts,
			        char *why, size_t len);
static X509_STORE *tls_trusted(struct smtps_tls_config *c);
static void tls_config_free_parts(struct smtps_tls_config *c);
static int valid_name(const char *name);
static int is_ip_literal(const char *name);
static int tls_names(struct smtps_tls *t);
static int tls_bio_write(BIO *b, const char *data, int len);
static int tls_bio_read(BIO *b, char *data, int len);
static long tls_bio_ctrl(BIO *b, int cmd, long num, void *ptr);
static int tls_new_session(SSL *ssl, SSL_SESSION *sess);
static int tls_policy(struct smtps_tls *t);
static void tls_offer(struct smtps_tls *t);
static void tls_mark(struct smtps_session *s);
static int tls_start(struct smtps_session *s);
static int tls_handshake(struct smtps_session *s);
static int tls_read(struct smtps_session *s);
static int tls_fail(struct smtps_session *s, const char *what);

/* ------------------------------------------------------------------ */
/* Policies (SSL_CTX), shared                                          */
/* ------------------------------------------------------------------ */

/*
 * tls_why - say what is wrong with a setting, then OpenSSL's reasons,
 * the oldest (the cause) first; bounded by len. The error queue is left
 * empty.
 */

static void tls_why(char *why, size_t len, const char *fmt,...)
{
    va_list ap;
    unsigned long e;
    const char *data, *reason;
    char    sys[80];
    size_t  used;
    int     flags, first = 1;

    if (why == NULL || len == 0) {
	ERR_clear_error();
	return;
    }
    va_start(ap, fmt);
    vsnprintf(why, len, fmt, ap);
    va_end(ap);
    while ((e = ERR_get_error_all(NULL, NULL, NULL, &data, &flags)) != 0) {
	if (ERR_SYSTEM_ERROR(e)) {		/* an errno OpenSSL 3 does not name */
	    if (strerror_r(ERR_GET_REASON(e), sys, sizeof(sys)) != 0)
		snprintf(sys, sizeof(sys), "error %d", ERR_GET_REASON(e));
	    reason = sys;
	} else if ((reason = ERR_reason_error_string(e)) == NULL
		   || strcmp(reason, "PEM lib") == 0
		   || strcmp(reason, "system lib") == 0) {
	    continue;				/* says where, not what */
	}
	if (strstr(why, reason) != NULL)
	    continue;				/* said already */
	if ((used = strlen(why)) + 1 >= len)
	    continue;				/* full: drain the queue all the same */
	if (!(flags & ERR_TXT_STRING) || data == NULL)
	    data = "";
	snprintf(why + used, len - used, "%s%s%s%s%s", first ? ": " : "; ",
		 reason, data[0] ? " (" : "", data, data[0] ? ")" : "");
	first = 0;
    }
}

/* tls_error_is - 1 when OpenSSL error e is X509's reason */

static int tls_error_is(unsigned long e, int reason)
{
    return e != 0 && !ERR_SYSTEM_ERROR(e) && ERR_GET_LIB(e) == ERR_LIB_X509
	&& ERR_GET_REASON(e) == reason;
}

/* tls_key_password - the settings' key password; never a terminal prompt */

static int tls_key_password(char *buf, int size, int rwflag, void *user)
{
    size_t  len;

    (void) rwflag;
    if (user == NULL || size <= 0 || (len = strlen(user)) >= (size_t) size)
	return -1;				/* none: the key cannot be read */
    memcpy(buf, user, len);
    return (int) len;
}

/* tls_hashed_name - 1 for a name "openssl rehash" makes: 8 hex digits .N */

static int tls_hashed_name(const char *name)
{
    int     i;

    for (i = 0; i < 8; i++)
	if (!isxdigit((unsigned char) name[i]))
	    return 0;
    if (name[8] != '.' || !isdigit((unsigned char) name[9]))
	return 0;				/* (a CRL's is 1a2b3c4d.r0) */
    for (i = 10; name[i]; i++)
	if (!isdigit((unsigned char) name[i]))
	    return 0;
    return 1;
}

/*
 * tls_ca_path - a CA directory OpenSSL can use: it looks certificates up
 * by their subject's hash when a handshake needs one, so a directory that
 * is missing or holds no hashed names would fail only then; say it now
 */

static int tls_ca_path(const char *path, char *why, size_t len)
{
    DIR    *dir;
    struct dirent *ent;
    int     found = 0;

    if ((dir = opendir(path)) == NULL) {
	char    sys[80];

	if (strerror_r(errno, sys, sizeof(sys)) != 0)
	    snprintf(sys, sizeof(sys), "error %d", errno);
	tls_why(why, len, "ca_path '%.200s': %s", path, sys);
	return 0;
    }
    while (!found && (ent = readdir(dir)) != NULL)
	found = tls_hashed_name(ent->d_name);
    closedir(dir);
    if (!found)
	tls_why(why, len, "ca_path '%.200s' holds no hashed certificate names "
		"(such as 1a2b3c4d.0): run 'openssl rehash' on it", path);
    return found;
}

/* tls_trust - the trusted CAs of the settings, read now; NULL: none given */

static int tls_trust(const struct smtps_tls_settings *ts, X509_STORE **store,
		             char *why, size_t len)
{
    *store = NULL;
    if (ts->insecure_no_verify || (ts->ca_file == NULL && ts->ca_path == NULL))
	return SMTPS_OK;			/* (the system store waits) */
    if (ts->ca_path != NULL && !tls_ca_path(ts->ca_path, why, len))
	return SMTPS_EINVAL;
    if ((*store = X509_STORE_new()) == NULL)
	return SMTPS_ENOMEM;
    if (X509_STORE_load_locations(*store, ts->ca_file, ts->ca_path) != 1) {
	tls_why(why, len, "%s '%.200s': cannot load its certificates",
		ts->ca_file ? "ca_file" : "ca_path",
		ts->ca_file ? ts->ca_file : ts->ca_path);
	X509_STORE_free(*store);
	*store = NULL;
	return SMTPS_EINVAL;
    }
    return SMTPS_OK;
}

/*
 * tls_client_cert - the client certificate and its key, which must match
 * (checked here, not by the first server that asks for it)
 */

static int tls_client_cert(SSL_CTX *ctx, const struct smtps_tls_settings *ts,
			           char *why, size_t len)
{
    const char *key = ts->key_file != NULL ? ts->key_file : ts->cert_file;
    int     ok, mismatch;

    if (ts->cert_file == NULL) {
	if (ts->key_file == NULL && ts->key_password == NULL)
	    return SMTPS_OK;
	tls_why(why, len, "%s needs cert_file, the certificate it goes with",
		ts->key_file ? "key_file" : "key_password");
	return SMTPS_EINVAL;
    }
    if (SSL_CTX_use_certificate_chain_file(ctx, ts->cert_file) != 1) {
	tls_why(why, len, "cert_file '%.200s': cannot load the certificate "
		"chain (PEM, the client certificate first)", ts->cert_file);
	return SMTPS_EINVAL;
    }
    SSL_CTX_set_default_passwd_cb(ctx, tls_key_password);
    SSL_CTX_set_default_passwd_cb_userdata(ctx, (void *) ts->key_password);
    ok = SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) == 1;
    /* Not kept: the password is the caller's, and needed no more. */
    SSL_CTX_set_default_passwd_cb_userdata(ctx, NULL);
    /* A key of the certificate's type is refused as it is loaded. */
    mismatch = !ok && (tls_error_is(ERR_peek_error(), X509_R_KEY_VALUES_MISMATCH)
		       || tls_error_is(ERR_peek_last_error(),
				       X509_R_KEY_VALUES_MISMATCH));
    if (!ok && !mismatch) {
	if (ts->key_file == NULL)
	    tls_why(why, len, "cert_file '%.200s': cannot load a private key "
		    "from it (give key_file, or put the key in cert_file)", key);
	else
	    tls_why(why, len, "key_file '%.200s': cannot load the private "
		    "key%s", key, ts->key_password ? " (wrong key_password?)" :
		    " (if it is encrypted, give key_password)");
	return SMTPS_EINVAL;
    }
    if (mismatch || SSL_CTX_check_private_key(ctx) != 1) {
	/* OpenSSL's words for a key of another type mislead: none. */
	ERR_clear_error();
	tls_why(why, len, "%s '%.200s' does not match the certificate of "
		"cert_file '%.200s'", ts->key_file ? "key_file" : "the key in "
		"cert_file", key, ts->cert_file);
	return SMTPS_EINVAL;
    }
    return SMTPS_OK;
}

/* tls_protocol - the minimum version and the ciphers */

static int tls_protocol(SSL_CTX *ctx, const struct smtps_tls_settings *ts,
			        char *why, size_t len)
{
    int     min = ts->min_version == 0 ? SMTPS_TLS_V1_2 : ts->min_version;

    if (min != SMTPS_TLS_V1_2 && min != SMTPS_TLS_V1_3) {
	tls_why(why, len, "min_version 0x%04x is neither TLS 1.2 (0x%04x) "
		"nor TLS 1.3 (0x%04x)", (unsigned) min & 0xffffu,
		SMTPS_TLS_V1_2, SMTPS_TLS_V1_3);
	return SMTPS_EINVAL;
    }
    if (SSL_CTX_set_min_proto_version(ctx, min == SMTPS_TLS_V1_3 ?
				      TLS1_3_VERSION : TLS1_2_VERSION) != 1)
	return SMTPS_ETLS;
    if (ts->ciphers != NULL && SSL_CTX_set_cipher_list(ctx, ts->ciphers) != 1) {
	tls_why(why, len, "ciphers '%.200s': OpenSSL finds no TLS 1.2 cipher "
		"in it", ts->ciphers);
	return SMTPS_EINVAL;
    }
    if (ts->ciphersuites != NULL
	&& SSL_CTX_set_ciphersuites(ctx, ts->ciphersuites) != 1) {
	tls_why(why, len, "ciphersuites '%.200s': OpenSSL finds no TLS 1.3 "
		"cipher suite in it", ts->ciphersuites);
	return SMTPS_EINVAL;
    }
    /* An empty list is how TLS 1.3 is turned off: not with TLS 1.3 only. */
    if (ts->ciphersuites != NULL && ts->ciphersuites[0] == 0
	&& min == SMTPS_TLS_V1_3) {
	tls_why(why, len, "ciphersuites '' leaves TLS 1.3 no cipher suite, "
		"and min_version allows nothing older");
	return SMTPS_EINVAL;
    }
    return SMTPS_OK;
}

/* smtps_tls_config_make - a client policy from settings, checked whole */

int     smtps_tls_config_make(const struct smtps_tls_settings *settings,
			              struct smtps_tls_config **cfg,
			              char *why, size_t why_len)
{
    struct smtps_tls_settings ts;
    struct smtps_tls_config *c = NULL;
    SSL_CTX *ctx = NULL;
    int     rc = SMTPS_ETLS;

    if (why != NULL && why_len > 0)
	why[0] = 0;
    if (cfg == NULL)
	return SMTPS_EINVAL;
    *cfg = NULL;
    if (settings == NULL || settings->sizeof_settings < SETTINGS_MIN_SIZE
	|| settings->sizeof_settings > sizeof(ts))
	return SMTPS_EINVAL;
    /* Fields an older caller did not have read as zero. */
    memset(&ts, 0, sizeof(ts));
    memcpy(&ts, settings, settings->sizeof_settings);
    if (OPENSSL_init_ssl(0, NULL) != 1)
	return SMTPS_ETLS;
    ERR_clear_error();
    if ((c = calloc(1, sizeof(*c))) == NULL)
	return SMTPS_ENOMEM;
    if ((c->lock = CRYPTO_THREAD_lock_new()) == NULL) {
	rc = SMTPS_ENOMEM;
	goto err;
    }
    if ((ctx = SSL_CTX_new(TLS_client_method())) == NULL
	|| SSL_CTX_dane_enable(ctx) <= 0)	/* sessions may use DANE */
	goto err;
    if ((c->bio = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK,
			       "smtpstate wire")) == NULL
	|| BIO_meth_set_write(c->bio, tls_bio_write) != 1
	|| BIO_meth_set_read(c->bio, tls_bio_read) != 1
	|| BIO_meth_set_ctrl(c->bio, tls_bio_ctrl) != 1)
	goto err;
    if ((rc = tls_protocol(ctx, &ts, why, why_len)) != SMTPS_OK
	|| (rc = tls_client_cert(ctx, &ts, why, why_len)) != SMTPS_OK
	|| (rc = tls_trust(&ts, &c->cas, why, why_len)) != SMTPS_OK)
	goto err;
    rc = SMTPS_ETLS;

    /*
     * Renegotiation would let the peer restart the handshake in the middle
     * of a reply stream we no longer watch for it; nobody needs it for SMTP.
     * Partial writes and a moving buffer: s->out may slide or grow between
     * an SSL_write that could not finish and its retry.
     */
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE
		     | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);

    /*
     * An idle connection should cost little: OpenSSL's read and write
     * buffers (17 KiB and more each) go back whenever they are empty.
     */
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);

    /*
     * Sessions to resume are kept by the driver, per server (the slots):
     * OpenSSL only tells us of each new one and stores none itself.
     */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT
				   | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, tls_new_session);

    /*
     * The certificate check is asked for per session (tls_trusted() gives
     * a verifying session its CAs); the SSL_CTX's own store stays empty.
     */
    SSL_CTX_set_verify(ctx, ts.insecure_no_verify ? SSL_VERIFY_NONE :
		       SSL_VERIFY_PEER, NULL);
    c->refs = 1;
    c->insecure = ts.insecure_no_verify != 0;
    c->ctx = ctx;
    ERR_clear_error();
    *cfg = c;
    return SMTPS_OK;

err:
    if (why != NULL && why_len > 0 && why[0] == 0)
	tls_why(why, why_len, "cannot set up TLS");
    ERR_clear_error();
    SSL_CTX_free(ctx);
    tls_config_free_parts(c);
    return rc;
}

/* smtps_tls_config_new - a policy from a CA file only (or the system's) */

struct smtps_tls_config *smtps_tls_config_new(const char *ca_file,
					              int insecure_no_verify)
{
    struct smtps_tls_settings ts;
    struct smtps_tls_config *c;

    memset(&ts, 0, sizeof(ts));
    ts.sizeof_settings = sizeof(ts);
    ts.ca_file = ca_file;
    ts.insecure_no_verify = insecure_no_verify;
    return smtps_tls_config_make(&ts, &c, NULL, 0) == SMTPS_OK ? c : NULL;
}

/*
 * tls_trusted - the CAs a verifying session checks its server against:
 * those of the settings, or the system store, read the first time a
 * session needs them (about 50 ms: opportunistic TLS never pays it).
 *
 * The config is shared by threads, and sessions that do not verify still
 * run OpenSSL's chain check against the SSL_CTX's store while others use
 * it; so nothing is ever added to a store in use. The system store is
 * loaded into a store of its own, under the lock, published whole (the
 * release store pairs with the acquire load), and given to each verifying
 * session (SSL_set1_verify_cert_store() in smtps_tls_begin()).
 */

static X509_STORE *tls_trusted(struct smtps_tls_config *c)
{
    X509_STORE *store;

    if ((store = __atomic_load_n(&c->cas, __ATOMIC_ACQUIRE)) != NULL)
	return store;
    if (CRYPTO_THREAD_write_lock(c->lock) != 1)
	return NULL;
    if ((store = __atomic_load_n(&c->cas, __ATOMIC_ACQUIRE)) == NULL
	&& (store = X509_STORE_new()) != NULL) {
	if (X509_STORE_set_default_paths(store) == 1) {
	    __atomic_store_n(&c->cas, store, __ATOMIC_RELEASE);
	} else {
	    X509_STORE_free(store);		/* the handshake fails; next time again */
	    store = NULL;
	}
    }
    CRYPTO_THREAD_unlock(c->lock);
    return store;
}

/* smtps_tls_config_trusted - 1 once the policy holds its CAs (for tests) */

int     smtps_tls_config_trusted(const struct smtps_tls_config *c)
{
    return __atomic_load_n(&c->cas, __ATOMIC_ACQUIRE) != NULL;
}

/* tls_config_free_parts - what a config is made of (NULL-safe) */

static void tls_config_free_parts(struct smtps_tls_config *c)
{
    if (c == NULL)
	return;
    BIO_meth_free(c->bio);
    X509_STORE_free(c->cas);
    CRYPTO_THREAD_lock_free(c->lock);
    free(c);
}

/* smtps_tls_config_retain - one more holder of c (a session, a destination) */

void    smtps_tls_config_retain(struct smtps_tls_config *c)
{
    __atomic_add_fetch(&c->refs, 1, __ATOMIC_RELAXED);
}

/* smtps_tls_config_free - drop a reference; the last one frees */

void    smtps_tls_config_free(struct smtps_tls_config *c)
{
    if (c == NULL || __atomic_sub_fetch(&c->refs, 1, __ATOMIC_ACQ_REL) != 0)
	return;
    SSL_CTX_free(c->ctx);
    tls_config_free_parts(c);		/* no session is left to use them */
}

/* ------------------------------------------------------------------ */
/* Per session: options and state                                      */
/* ------------------------------------------------------------------ */

/* valid_name - 1 for a plausible host name or address literal */

static int valid_name(const char *name)
{
    size_t  i, len = strlen(name);

    if (len == 0 || len > TLS_NAME_MAX)
	return 0;
    for (i = 0; i < len; i++)
	if ((unsigned char) name[i] <= 0x20 || (unsigned char) name[i] >= 0x7f)
	    return 0;			/* A-labels only (idna happens upstream) */
    return 1;
}

/* is_ip_literal - 1 when name is an IPv4 or IPv6 address */

static int is_ip_literal(const char *name)
{
    unsigned char addr[16];

    return inet_pton(AF_INET, name, addr) == 1
	|| inet_pton(AF_INET6, name, addr) == 1;
}

/* smtps_session_set_tls - how this session uses TLS; before start */

int     smtps_session_set_tls(struct smtps_session *s, int mode,
			              struct smtps_tls_config *cfg,
			              const char *servername)
{
    struct smtps_tls *t;

    if (s == NULL || mode < SMTPS_TLS_NONE || mode > SMTPS_TLS_IMPLICIT)
	return SMTPS_EINVAL;
    if (s->status != SMTPS_SESS_NEW)
	return SMTPS_ESTATE;
    if (mode == SMTPS_TLS_NONE) {
	smtps_tls_session_free(s);
	return SMTPS_OK;
    }
    if (servername != NULL && !valid_name(servername))
	return SMTPS_EINVAL;
    if (cfg != NULL)
	smtps_tls_config_retain(cfg);
    else if ((cfg = smtps_tls_config_new(NULL, 0)) == NULL)
	return SMTPS_ETLS;
    /* Verifying needs a name to verify against. */
    if (servername == NULL && !cfg->insecure && mode != SMTPS_TLS_OPPORTUNISTIC) {
	smtps_tls_config_free(cfg);
	return SMTPS_EINVAL;
    }
    if ((t = s->tls) == NULL && (t = calloc(1, sizeof(*t))) == NULL) {
	smtps_tls_config_free(cfg);
	return SMTPS_ENOMEM;
    }
    smtps_tls_config_free(t->cfg);		/* a second call replaces */
    t->cfg = cfg;
    smtps_tlsa_free(t->tlsa, t->ntlsa);
    t->tlsa = NULL;
    t->ntlsa = 0;
    t->dane = 0;
    t->mode = mode;
    /* RFC 7435: opportunistic TLS encrypts, it does not authenticate. */
    t->verify = mode != SMTPS_TLS_OPPORTUNISTIC && !cfg->insecure;
    t->phase = TLS_OFF;
    t->handshake_failed = 0;
    t->was_up = 0;
    t->refusal = 0;
    t->observe = 0;
    t->verify_err = X509_V_OK;
    t->resume = NULL;
    snprintf(t->servername, sizeof(t->servername), "%s",
	     servername ? servername : "");
    s->tls = t;
    return SMTPS_OK;
}

/*
 * smtps_session_set_tls_resume - resume from slot, and keep the new
 * session there; before start, after smtps_session_set_tls(). The slot
 * must outlive the session and be used with one config only.
 */

int     smtps_session_set_tls_resume(struct smtps_session *s,
				             struct smtps_tls_resume *slot)
{
    if (s == NULL || s->tls == NULL)
	return SMTPS_EINVAL;
    if (s->status != SMTPS_SESS_NEW)
	return SMTPS_ESTATE;
    s->tls->resume = slot;
    return SMTPS_OK;
}

/* smtps_tls_resume_clear - empty a slot */

void    smtps_tls_resume_clear(struct smtps_tls_resume *slot)
{
    if (slot == NULL)
	return;
    SSL_SESSION_free(slot->sess);		/* NULL-safe */
    slot->sess = NULL;
    memset(slot->policy, 0, sizeof(slot->policy));
}

/* smtps_session_set_dane - authenticate by TLSA records; before start */

int     smtps_session_set_dane(struct smtps_session *s,
			               const struct smtps_tlsa *recs, size_t n)
{
    struct smtps_tls *t;

    if (s == NULL || (t = s->tls) == NULL || (n > 0 && recs == NULL)
	|| t->mode == SMTPS_TLS_OPPORTUNISTIC || t->mode == SMTPS_TLS_NONE)
	return SMTPS_EINVAL;
    if (s->status != SMTPS_SESS_NEW)
	return SMTPS_ESTATE;
    smtps_tlsa_free(t->tlsa, t->ntlsa);
    t->ntlsa = 0;
    if (smtps_tlsa_copy(recs, n, &t->tlsa) != SMTPS_OK)
	return SMTPS_ENOMEM;
    t->ntlsa = n;
    t->dane = 1;
    /* The records authenticate, not the CAs; none at all: no one does. */
    t->verify = n > 0;
    return SMTPS_OK;
}

/*
 * tls_dane - hand the records to OpenSSL's own DANE support (RFC 7671):
 * the server's name is the reference identifier of DANE-TA(2), and
 * DANE-EE(3) matches the key alone, without a name (RFC 7672 3.1.1)
 */

static int tls_dane(struct smtps_tls *t)
{
    size_t  i;
    int     usable = 0, rc;

    if (SSL_dane_enable(t->ssl, t->servername[0] ? t->servername : NULL) <= 0)
	return 0;
    (void) SSL_dane_set_flags(t->ssl, DANE_FLAG_NO_DANE_EE_NAMECHECKS);
    for (i = 0; i < t->ntlsa; i++) {
	rc = SSL_dane_tlsa_add(t->ssl, t->tlsa[i].usage, t->tlsa[i].selector,
			       t->tlsa[i].mtype, t->tlsa[i].data, t->tlsa[i].len);
	if (rc < 0)
	    return 0;
	usable += rc > 0;
    }
    if (usable == 0)
	return 0;				/* (smtps_dns_tlsa() kept usable ones) */
    SSL_set_verify(t->ssl, SSL_VERIFY_PEER, NULL);
    return 1;
}

/* smtps_tls_session_free - release the session's TLS state */

void    smtps_tls_session_free(struct smtps_session *s)
{
    struct smtps_tls *t = s->tls;

    if (t == NULL)
	return;
    smtps_tlsa_free(t->tlsa, t->ntlsa);

    /*
     * We send no close_notify, and OpenSSL takes an SSL freed without one
     * for a broken connection whose session must not be resumed. Only a
     * TLS failure means that (RFC 5246 7.2.1: a connection that merely
     * ended may be resumed): otherwise, say that the end was orderly.
     */
    if (t->ssl != NULL && t->phase == TLS_UP)
	SSL_set_shutdown(t->ssl, SSL_SENT_SHUTDOWN);
    SSL_free(t->ssl);				/* and its BIO */
    free(t->wire.data);
    smtps_tls_config_free(t->cfg);
    free(t);
    s->tls = NULL;
}

/* smtps_tls_mode - SMTPS_TLS_*, NONE when never set */

int     smtps_tls_mode(const struct smtps_session *s)
{
    return s->tls != NULL ? s->tls->mode : SMTPS_TLS_NONE;
}

/*
 * smtps_tls_handshake_failed - TLS failed before it was up: refused by
 * either side, or the connection ended in the middle of the handshake.
 * Not a connection that ended while it waited for its turn (WAITING):
 * it never tried, and clear text would be no answer to that.
 */

int     smtps_tls_handshake_failed(const struct smtps_session *s)
{
    return s->tls != NULL && (s->tls->handshake_failed
			      || s->tls->phase == TLS_HANDSHAKE);
}

/* smtps_tls_engaged - TLS has begun: the stream is no longer clear text */

int     smtps_tls_engaged(const struct smtps_session *s)
{
    return s->tls != NULL && s->tls->phase != TLS_OFF;
}

/* smtps_tls_handshaking - begun but not up (or failed): no QUIT possible */

int     smtps_tls_handshaking(const struct smtps_session *s)
{
    return s->tls != NULL && (s->tls->phase == TLS_WAITING
			      || s->tls->phase == TLS_HANDSHAKE
			      || s->tls->phase == TLS_FAILED);
}

/*
 * smtps_tls_in_handshake - the handshake runs or waits for its turn:
 * begun, neither up nor failed
 */

int     smtps_tls_in_handshake(const struct smtps_session *s)
{
    return s->tls != NULL && (s->tls->phase == TLS_WAITING
			      || s->tls->phase == TLS_HANDSHAKE);
}

/*
 * smtps_tls_verified - TLS is up and authenticated the server: the
 * chain and name verified, or DANE records matched (t->verify, which
 * only a verifying policy or usable DANE records set), and OpenSSL says
 * the check passed. What RFC 8689 4.2.1 asks for before REQUIRETLS.
 */

int     smtps_tls_verified(const struct smtps_session *s)
{
    const struct smtps_tls *t = s->tls;

    return t != NULL && t->phase == TLS_UP && t->verify && t->ssl != NULL
	&& SSL_get_verify_result(t->ssl) == X509_V_OK;
}

/*
 * smtps_tls_observe - opportunistic TLS that also checks the certificate
 * and the server's name, without enforcing either: OpenSSL verifies under
 * SSL_VERIFY_NONE all the same and keeps the result, which a TLS report
 * of a domain whose MTA-STS policy is in testing mode needs (RFC 8461 5:
 * report failures, deliver anyway). Before start; needs a name and CAs.
 */

int     smtps_tls_observe(struct smtps_session *s)
{
    struct smtps_tls *t = s->tls;

    if (t == NULL || t->mode != SMTPS_TLS_OPPORTUNISTIC || t->servername[0] == 0
	|| is_ip_literal(t->servername) || t->cfg->insecure)
	return SMTPS_EINVAL;
    if (s->status != SMTPS_SESS_NEW)
	return SMTPS_ESTATE;
    t->observe = 1;
    return SMTPS_OK;
}

/* smtps_tls_observed - what an observing session's check found (X509_V_*) */

long    smtps_tls_observed(const struct smtps_session *s)
{
    const struct smtps_tls *t = s->tls;

    if (t == NULL || !t->observe || t->ssl == NULL || t->phase != TLS_UP)
	return X509_V_OK;
    return SSL_get_verify_result(t->ssl);
}

/* smtps_tls_note_refusal - STARTTLS not offered or refused (states.c) */

void    smtps_tls_note_refusal(struct smtps_session *s, int outcome)
{
    if (s->tls != NULL && s->tls->refusal == 0)
	s->tls->refusal = outcome;
}

/*
 * smtps_tls_outcome - what became of TLS on this session, for TLS
 * reports (tlsrpt.c): SMTPS_TLSO_PENDING until it is known. TLS that came
 * up and broke later was negotiated all the same. A connection that is
 * over in the middle of the handshake (over = 1) failed it.
 */

int     smtps_tls_outcome(const struct smtps_session *s, int over,
			          long *verify_err)
{
    const struct smtps_tls *t = s->tls;

    *verify_err = X509_V_OK;
    if (t == NULL)
	return SMTPS_TLSO_PENDING;
    if (t->refusal != 0)
	return t->refusal;
    switch (t->phase) {
    case TLS_UP:
	return SMTPS_TLSO_UP;
    case TLS_FAILED:
	/*
	 * Broken after it was up; not before (a handshake that failed, or
	 * ended by a timeout or by clear text where the handshake should
	 * be: smtps_tls_discard(), which says no more).
	 */
	if (!t->handshake_failed && t->was_up)
	    return SMTPS_TLSO_UP;
	*verify_err = t->verify_err;
	return SMTPS_TLSO_FAILED;
    case TLS_HANDSHAKE:
	return over ? SMTPS_TLSO_FAILED : SMTPS_TLSO_PENDING;
    default:
	return SMTPS_TLSO_PENDING;
    }
}

/* smtps_session_tls_active - 1 once the handshake is done */

int     smtps_session_tls_active(const struct smtps_session *s)
{
    return s != NULL && s->tls != NULL && s->tls->phase == TLS_UP;
}

/* smtps_session_tls_version - "TLSv1.3" and the like, or "" */

const char *smtps_session_tls_version(const struct smtps_session *s)
{
    if (!smtps_session_tls_active(s))
	return "";
    return SSL_get_version(s->tls->ssl);
}

/* smtps_session_tls_resumed - 1 when TLS is up on a resumed session */

int     smtps_session_tls_resumed(const struct smtps_session *s)
{
    return smtps_session_tls_active(s) && SSL_session_reused(s->tls->ssl);
}

/* smtps_wipe - clear memory that held a secret, past the optimiser */

void    smtps_wipe(void *p, size_t len)
{
    if (p != NULL && len > 0)
	OPENSSL_cleanse(p, len);
}

/* ------------------------------------------------------------------ */
/* The BIO: OpenSSL's view of the wire                                 */
/* ------------------------------------------------------------------ */

/*
 * tls_bio_write - OpenSSL's ciphertext, straight into the wire buffer.
 * It takes all or nothing: the wire grows up to SMTPS_OUT_MAX, and
 * smtps_tls_flush() stops encrypting long before (SMTPS_OUT_HIGH), so a
 * refusal (out of memory) is a failure, not back-pressure.
 */

static int tls_bio_write(BIO *b, const char *data, int len)
{
    struct smtps_tls *t = BIO_get_data(b);
    int     rc;

    BIO_clear_retry_flags(b);
    if (len <= 0)
	return 0;
    if ((rc = smtps_buf_reserve(&t->wire, (size_t) len)) != SMTPS_OK) {
	t->wire_err = rc;
	return -1;
    }
    memcpy(t->wire.data + t->wire.end, data, (size_t) len);
    t->wire.end += (size_t) len;
    t->wire_produced += (uint64_t) len;
    return len;
}

/* tls_bio_read - ciphertext from what feed() was given; none: retry */

static int tls_bio_read(BIO *b, char *data, int len)
{
    struct smtps_tls *t = BIO_get_data(b);
    size_t  n = t->inlen;

    BIO_clear_retry_flags(b);
    if (len <= 0)
	return 0;
    if (n == 0) {
	BIO_set_retry_read(b);			/* WANT_READ: the driver's turn */
	return -1;
    }
    if (n > (size_t) len)
	n = (size_t) len;
    memcpy(data, t->in, n);
    t->in += n;
    t->inlen -= n;
    return (int) n;
}

/* tls_bio_ctrl - a flush is a no-op (the wire is the driver's); nothing else */

static long tls_bio_ctrl(BIO *b, int cmd, long num, void *ptr)
{
    struct smtps_tls *t = BIO_get_data(b);

    SMTPS_UNUSED(num);
    SMTPS_UNUSED(ptr);
    switch (cmd) {
    case BIO_CTRL_FLUSH:
	return 1;
    case BIO_CTRL_PENDING:
	return t != NULL ? (long) t->inlen : 0;
    case BIO_CTRL_WPENDING:
	return 0;
    default:
	return 0;
    }
}

/* ------------------------------------------------------------------ */
/* Resumption                                                          */
/* ------------------------------------------------------------------ */

/*
 * tls_policy - the digest of how this session checks its server: a
 * session made under one policy is never offered under another (an
 * opportunistic one where DANE now authenticates, or the other way)
 */

static int tls_policy(struct smtps_tls *t)
{
    EVP_MD_CTX *md;
    unsigned char head[5];
    unsigned int len = 0;
    size_t  i;
    int     ok;

    head[0] = (unsigned char) t->mode;
    head[1] = (unsigned char) t->verify;
    head[2] = (unsigned char) t->dane;
    head[3] = (unsigned char) t->cfg->insecure;
    head[4] = (unsigned char) t->observe;
    if ((md = EVP_MD_CTX_new()) == NULL)
	return 0;
    ok = EVP_DigestInit_ex(md, EVP_sha256(), NULL) == 1
	&& EVP_DigestUpdate(md, head, sizeof(head)) == 1
	&& EVP_DigestUpdate(md, t->servername, strlen(t->servername) + 1) == 1;
    for (i = 0; ok && i < t->ntlsa; i++) {
	unsigned char rr[3 + sizeof(uint32_t)];
	uint32_t n = (uint32_t) t->tlsa[i].len;

	rr[0] = t->tlsa[i].usage;
	rr[1] = t->tlsa[i].selector;
	rr[2] = t->tlsa[i].mtype;
	memcpy(rr + 3, &n, sizeof(n));		/* lengths: no two lists alike */
	ok = EVP_DigestUpdate(md, rr, sizeof(rr)) == 1
	    && EVP_DigestUpdate(md, t->tlsa[i].data, t->tlsa[i].len) == 1;
    }
    ok = ok && EVP_DigestFinal_ex(md, t->policy, &len) == 1
	&& len == sizeof(t->policy);
    EVP_MD_CTX_free(md);
    return ok;
}

/*
 * tls_offer - offer the slot's session, when it was made under this
 * policy and has not expired; a TLS 1.3 ticket is used once
 */

static void tls_offer(struct smtps_tls *t)
{
    struct smtps_tls_resume *slot = t->resume;
    SSL_SESSION *sess = slot->sess;

    if (sess == NULL)
	return;
    if (memcmp(slot->policy, t->policy, sizeof(t->policy)) != 0
	|| !SSL_SESSION_is_resumable(sess)
	|| (time_t) (SSL_SESSION_get_time(sess) + SSL_SESSION_get_timeout(sess))
	<= time(NULL)) {
	smtps_tls_resume_clear(slot);		/* of no use to anyone now */
	return;
    }
    if (SSL_set_session(t->ssl, sess) != 1) {	/* the SSL holds its own reference */
	ERR_clear_error();
	return;
    }
    t->offered = sess;
    if (SSL_SESSION_get_protocol_version(sess) >= TLS1_3_VERSION)
	smtps_tls_resume_clear(slot);		/* RFC 8446 C.4 */
}

/*
 * tls_new_session - OpenSSL made a session that could be resumed (a full
 * TLS 1.2 handshake ended; a TLS 1.3 ticket arrived): it goes into the
 * session's slot in place of what was there. 1: the reference is ours.
 */

static int tls_new_session(SSL *ssl, SSL_SESSION *sess)
{
    struct smtps_tls *t = SSL_get_app_data(ssl);

    if (t == NULL || t->resume == NULL || t->phase == TLS_FAILED)
	return 0;
    smtps_tls_resume_clear(t->resume);
    t->resume->sess = sess;
    memcpy(t->resume->policy, t->policy, sizeof(t->policy));
    return 1;
}

/* ------------------------------------------------------------------ */
/* The pumps                                                           */
/* ------------------------------------------------------------------ */

/* tls_names - SNI and the name or address the certificate must carry */

static int tls_names(struct smtps_tls *t)
{
    const char *name = t->servername;

    if (name[0] == 0)
	return 1;
    if (is_ip_literal(name))			/* no SNI for addresses */
	return !t->verify
	    || X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(t->ssl), name) == 1;
    if (SSL_set_tlsext_host_name(t->ssl, name) != 1)
	return 0;
    if (!t->verify && !t->observe)
	return 1;
    if (t->dane)
	return tls_dane(t);
    SSL_set_hostflags(t->ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    return SSL_set1_host(t->ssl, name) == 1;
}

/*
 * smtps_tls_begin - TLS from now on: the handshake starts now, or, when
 * the driver's gate says so, once its turn comes (smtps_tls_proceed())
 */

int     smtps_tls_begin(struct smtps_session *s)
{
    struct smtps_tls *t = s->tls;
    size_t  pending;

    if (t == NULL || t->phase != TLS_OFF)
	return SMTPS_ESTATE;
    /* Until it is up, a failure is the handshake's (stage 17). */
    s->fail_state = t->mode == SMTPS_TLS_IMPLICIT ? s->cur :
	SMTPS_STATE_STARTTLS;
    s->fail_stage = SMTPS_STAGE_TLS_HANDSHAKE;

    /*
     * Bytes still queued were queued in clear, before TLS (a PROXY header
     * before implicit TLS): they go out first, as they are.
     */
    pending = s->out.end - s->out.start;
    if (pending > 0) {
	if (smtps_buf_reserve(&t->wire, pending) != SMTPS_OK) {
	    t->phase = TLS_HANDSHAKE;		/* so that tls_fail() blames it */
	    return tls_fail(s, "cannot start TLS");
	}
	memcpy(t->wire.data + t->wire.end, s->out.data + s->out.start, pending);
	t->wire.end += pending;
	t->wire_produced += pending;
	s->out.start = s->out.end = 0;
	tls_mark(s);
    }

    /* RFC 3207 4.2: forget everything learned in clear. */
    memset(&s->caps, 0, sizeof(s->caps));
    s->pipelining = 0;

    /*
     * From here on nothing leaves in clear. A handshake that must wait
     * for its turn makes nothing yet: a waiting connection costs no
     * OpenSSL memory, and it offers, when its turn comes, the session
     * a handshake that ended meanwhile left in the slot.
     */
    t->phase = TLS_WAITING;
    if (s->tls_gate != NULL && !s->tls_gate(s, s->tls_gate_closure))
	return SMTPS_OK;
    return tls_start(s);
}

/* smtps_tls_proceed - the driver's turn came: start the handshake */

int     smtps_tls_proceed(struct smtps_session *s)
{
    if (s->tls == NULL || s->tls->phase != TLS_WAITING)
	return SMTPS_ESTATE;
    return tls_start(s);
}

/* tls_start - make the SSL, offer a session to resume, send the ClientHello */

static int tls_start(struct smtps_session *s)
{
    struct smtps_tls *t = s->tls;
    BIO    *bio = NULL;
    X509_STORE *cas;

    t->phase = TLS_HANDSHAKE;			/* failures below are the handshake's */
    ERR_clear_error();
    if ((t->ssl = SSL_new(t->cfg->ctx)) == NULL
	|| (bio = BIO_new(t->cfg->bio)) == NULL)
	goto err;
    BIO_set_data(bio, t);
    BIO_set_init(bio, 1);
    SSL_set_bio(t->ssl, bio, bio);		/* SSL owns bio now */
    bio = NULL;
    SSL_set_app_data(t->ssl, t);		/* for tls_new_session() */
    SSL_set_connect_state(t->ssl);
    if (!t->verify)
	SSL_set_verify(t->ssl, SSL_VERIFY_NONE, NULL);
    /* An observing session checks as a verifying one does, for reports. */
    if ((t->verify || t->observe)
	&& ((cas = tls_trusted(t->cfg)) == NULL
	    || SSL_set1_verify_cert_store(t->ssl, cas) != 1))
	goto err;				/* (the SSL holds a reference) */
    if (!tls_names(t))
	goto err;
    if (t->dane && t->verify && t->servername[0] == 0 && !tls_dane(t))
	goto err;				/* (a name goes through tls_names) */
    if (t->resume != NULL) {
	if (!tls_policy(t))
	    t->resume = NULL;			/* no digest: no resumption */
	else
	    tls_offer(t);
    }
    return tls_handshake(s);			/* the ClientHello */

err:
    BIO_free(bio);
    return tls_fail(s, "cannot start TLS");
}

/* tls_mark - the plaintext taken so far is carried by the wire so far */

static void tls_mark(struct smtps_session *s)
{
    struct smtps_tls *t = s->tls;
    struct tls_mark *m;
    uint64_t plain = s->out_produced - (s->out.end - s->out.start);

    if (t->nmarks > 0) {
	m = &t->marks[(t->mark_head + t->nmarks - 1) % TLS_MARKS];
	if (m->wire == t->wire_produced) {	/* nothing new on the wire */
	    m->plain = plain;
	    return;
	}
    }
    m = &t->marks[(t->mark_head + t->nmarks) % TLS_MARKS];
    m->plain = plain;
    m->wire = t->wire_produced;
    t->nmarks++;
}

/* tls_handshake - drive the handshake; when done, release the plaintext */

static int tls_handshake(struct smtps_session *s)
{
    struct smtps_tls *t = s->tls;
    int     rc, err;

    ERR_clear_error();
    rc = SSL_do_handshake(t->ssl);
    if (t->wire_err != SMTPS_OK)
	return tls_fail(s, "TLS handshake failed: output buffer full");
    if (rc == 1) {
	t->phase = TLS_UP;
	t->was_up = 1;
	s->fail_state = -1;			/* failures are ordinary again */
	s->fail_stage = -1;
	if (s->trace != NULL) {
	    char    note[160];

	    snprintf(note, sizeof(note), "TLS is up: %s, %s%s",
		     SSL_get_version(t->ssl),
		     SSL_CIPHER_get_name(SSL_get_current_cipher(t->ssl)),
		     SSL_session_reused(t->ssl) ? ", resumed" : "");
	    smtps_session_trace(s, SMTPS_TRACE_NOTE, note, strlen(note));
	}
	return smtps_tls_flush(s);		/* the EHLO that waited */
    }
    err = SSL_get_error(t->ssl, rc);
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE)
	return SMTPS_OK;
    return tls_fail(s, "TLS handshake failed");
}

/* tls_read - decrypt what arrived and hand it to the reply parser */

static int tls_read(struct smtps_session *s)
{
    struct smtps_tls *t = s->tls;
    char    buf[TLS_RECORD_MAX];		/* not kept: idle costs nothing */
    int     n, err, rc;

    while (!t->peer_closed && t->phase == TLS_UP
	   && (s->status == SMTPS_SESS_ACTIVE || s->status == SMTPS_SESS_IDLE)) {
	ERR_clear_error();
	n = SSL_read(t->ssl, buf, (int) sizeof(buf));
	if (n > 0) {
	    if ((rc = smtps_session_take_replies(s, buf, (size_t) n)) < 0)
		return rc;
	    continue;
	}
	err = SSL_get_error(t->ssl, n);
	/* A post-handshake message may have had an answer (TLS 1.3 KeyUpdate). */
	if (t->wire_err != SMTPS_OK)
	    return tls_fail(s, "TLS read failed: output buffer full");
	if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE)
	    return SMTPS_OK;
	if (err == SSL_ERROR_ZERO_RETURN) {	/* close_notify: EOF follows */
	    t->peer_closed = 1;
	    return SMTPS_OK;
	}
	return tls_fail(s, "TLS read failed");
    }
    return SMTPS_OK;
}

/* smtps_tls_feed - ciphertext from the driver */

int     smtps_tls_feed(struct smtps_session *s, const char *data, size_t len)
{
    struct smtps_tls *t = s->tls;
    int     rc = SMTPS_OK;

    /*
     * Nothing may come before our ClientHello: after the 220 to STARTTLS,
     * what arrives in clear may be a man in the middle's (RFC 3207 5), as
     * session.c says of what comes with the 220.
     */
    if (t->phase == TLS_WAITING && len > 0
	&& (s->status == SMTPS_SESS_ACTIVE || s->status == SMTPS_SESS_IDLE)) {
	smtps_tls_discard(s);
	smtps_session_fail_now(s, s->fail_state, s->fail_stage,
			       "the server sent data before the TLS "
			       "handshake began (response injection?)");
	return SMTPS_EPROTO;
    }

    /*
     * OpenSSL reads data in place, through the BIO, for as long as this
     * call lasts: the handshake and SSL_read stop only when it is all
     * taken (WANT_READ) or when nothing more may be read (TLS failed, the
     * peer closed, the session ended), and then the rest is dropped. A
     * record that is not whole yet waits inside OpenSSL.
     */
    if ((t->phase != TLS_HANDSHAKE && t->phase != TLS_UP) || t->peer_closed
	|| (s->status != SMTPS_SESS_ACTIVE && s->status != SMTPS_SESS_IDLE))
	return SMTPS_OK;
    t->in = data;
    t->inlen = len;
    if (t->phase == TLS_HANDSHAKE)
	rc = tls_handshake(s);
    if (rc == SMTPS_OK && t->phase == TLS_UP)
	rc = tls_read(s);
    t->in = NULL;				/* data is the caller's again */
    t->inlen = 0;
    return rc;
}

/* smtps_tls_flush - encrypt queued plaintext, within the bounds */

int     smtps_tls_flush(struct smtps_session *s)
{
    struct smtps_tls *t = s->tls;
    size_t  pending, chunk;
    int     n, err;

    if (t == NULL || t->phase != TLS_UP)
	return SMTPS_OK;
    while ((pending = s->out.end - s->out.start) > 0
	   && t->wire.end - t->wire.start < SMTPS_OUT_HIGH
	   && t->nmarks < TLS_MARKS) {
	chunk = pending < TLS_RECORD_MAX ? pending : TLS_RECORD_MAX;
	ERR_clear_error();
	n = SSL_write(t->ssl, s->out.data + s->out.start, (int) chunk);
	if (t->wire_err != SMTPS_OK)
	    return tls_fail(s, "TLS write failed: output buffer full");
	if (n <= 0) {
	    err = SSL_get_error(t->ssl, n);
	    if (err == SSL_ERROR_WANT_READ)
		return SMTPS_OK;		/* it needs the peer first */
	    return tls_fail(s, "TLS write failed");
	}
	s->out.start += (size_t) n;
	if (s->out.start == s->out.end)
	    s->out.start = s->out.end = 0;
	tls_mark(s);
    }
    return SMTPS_OK;
}

/* smtps_tls_output - the ciphertext waiting for the driver */

size_t  smtps_tls_output(struct smtps_session *s, const char **data)
{
    struct smtps_tls *t = s->tls;

    if (t->wire.data == NULL) {
	*data = "";
	return 0;
    }
    *data = t->wire.data + t->wire.start;
    return t->wire.end - t->wire.start;
}

/* smtps_tls_consume - the driver sent n bytes; how much plaintext that is */

size_t  smtps_tls_consume(struct smtps_session *s, size_t n)
{
    struct smtps_tls *t = s->tls;
    uint64_t plain = s->out_consumed;

    if (n > t->wire.end - t->wire.start)
	n = t->wire.end - t->wire.start;
    t->wire.start += n;
    t->wire_consumed += n;
    if (t->wire.start == t->wire.end) {
	/* An idle connection keeps no buffer; the next write makes one. */
	free(t->wire.data);			/* ciphertext: nothing to wipe */
	t->wire.data = NULL;
	t->wire.start = t->wire.end = t->wire.cap = 0;
    }
    while (t->nmarks > 0 && t->marks[t->mark_head].wire <= t->wire_consumed) {
	plain = t->marks[t->mark_head].plain;
	t->mark_head = (t->mark_head + 1) % TLS_MARKS;
	t->nmarks--;
    }
    return (size_t) (plain - s->out_consumed);
}

/* smtps_tls_discard - send nothing more: drop the pending ciphertext */

void    smtps_tls_discard(struct smtps_session *s)
{
    struct smtps_tls *t = s->tls;

    if (t == NULL)
	return;
    t->wire.start = t->wire.end = 0;
    t->nmarks = 0;
    t->phase = TLS_FAILED;
}

/* tls_fail - TLS broke: say why and end the connection without QUIT */

static int tls_fail(struct smtps_session *s, const char *what)
{
    struct smtps_tls *t = s->tls;
    char    why[SMTPS_REASON_MAX];
    const char *lib_reason = NULL;
    unsigned long e;
    long    verify = X509_V_OK;
    int     in_handshake = t->phase == TLS_HANDSHAKE;

    if ((e = ERR_peek_last_error()) != 0)
	lib_reason = ERR_reason_error_string(e);
    if (t->ssl != NULL)
	verify = SSL_get_verify_result(t->ssl);
    if (verify != X509_V_OK)
	snprintf(why, sizeof(why), "%s: %s (%s)", what,
		 lib_reason ? lib_reason : "certificate verify failed",
		 X509_verify_cert_error_string(verify));
    else if (lib_reason != NULL)
	snprintf(why, sizeof(why), "%s: %s", what, lib_reason);
    else
	snprintf(why, sizeof(why), "%s: the peer broke the TLS protocol",
		 what);
    ERR_clear_error();
    t->phase = TLS_FAILED;
    t->handshake_failed = in_handshake;
    t->verify_err = verify;
    /* What the server would not resume with is no use to the next. */
    if (in_handshake && t->resume != NULL && t->offered != NULL
	&& t->resume->sess == t->offered)
	smtps_tls_resume_clear(t->resume);
    /* The alert OpenSSL wrote, if any, is in the wire: let it go out. */
    smtps_session_fail_now(s, s->fail_state, in_handshake ?
			   SMTPS_STAGE_TLS_HANDSHAKE : -1, why);
    return SMTPS_ETLS;
}
