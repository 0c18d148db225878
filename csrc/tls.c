/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	tls.c 3
 * SUMMARY
 *	TLS inside the session: OpenSSL over memory BIOs (RFC 3207, RFC 8314)
 * SYNOPSIS
 *	#include "smtpstate.h"
 *
 *	struct smtps_tls_config *smtps_tls_config_new(ca_file, insecure_no_verify)
 *	void	smtps_tls_config_free(c)
 *	int	smtps_session_set_tls(s, mode, cfg, servername)
 *	int	smtps_session_tls_active(s)
 *	const char *smtps_session_tls_version(s)
 *
 *	#include "session_private.h"
 *
 *	int	smtps_tls_begin(s)
 *	int	smtps_tls_verified(s)
 *	int	smtps_tls_feed(s, data, len)
 *	int	smtps_tls_flush(s)
 *	size_t	smtps_tls_output(s, &data)
 *	size_t	smtps_tls_consume(s, n)
 * DESCRIPTION
 *	OpenSSL is used as a pure state machine that never touches a socket
 *	(OpenSSL doc/designs/ddd, the "BIOm" design): the SSL object reads
 *	and writes one end of a BIO pair, and this file moves bytes between
 *	the other end (the network side) and the session:
 *
 *	    driver --feed()--> net BIO --> SSL_read --> take_replies()
 *	    s->out (plaintext) --> SSL_write --> net BIO --> wire --output()-->
 *
 *	The four pumps are tls_handshake() and tls_read() (ciphertext in),
 *	smtps_tls_flush() (plaintext out, encrypted) and tls_pull() (the net
 *	BIO's ciphertext into the wire buffer the driver sends from).
 *
 *	Phases: OFF until smtps_tls_begin() (at the 220 to STARTTLS, or at
 *	start for implicit TLS); HANDSHAKE, during which plaintext the states
 *	queue (the second EHLO) waits in s->out; UP; FAILED, after which
 *	nothing is encrypted or read again. From HANDSHAKE on, output() never
 *	returns plaintext again: a failure can only close the connection.
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
 * DIAGNOSTICS
 *	smtps_session_set_tls() returns SMTPS_EINVAL (bad mode or name, a
 *	verifying policy without a name), SMTPS_ESTATE (already started),
 *	SMTPS_ENOMEM or SMTPS_ETLS (no default policy could be made). A TLS
 *	failure during the session fails the connection with a reason
 *	("TLS handshake failed: certificate verify failed (Hostname
 *	mismatch)") and SMTPS_ETLS goes back to the caller of feed().
 * BUGS
 *	No session resumption and no close_notify on the way out: the
 *	connection ends after QUIT's reply, as most MTAs do it.
 * SEE ALSO
 *	RFC 3207 (STARTTLS), RFC 8314 (implicit TLS), RFC 6125 (names),
 *	session.c (the loop), states.c (the STARTTLS state).
 *--*/

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "session_private.h"

#define TLS_BIO_SIZE 65536		/* each direction of the BIO pair */
#define TLS_RECORD_MAX 16384		/* plaintext per SSL_write (one record) */
#define TLS_MARKS 64			/* SSL_writes the driver has not passed */
#define TLS_NAME_MAX 253		/* a DNS name (RFC 1035) */

enum tls_phase {
    TLS_OFF,				/* clear text */
    TLS_HANDSHAKE,			/* begun; plaintext waits */
    TLS_UP,				/* encrypting */
    TLS_FAILED				/* broken: nothing goes out any more */
};

struct smtps_tls_config {
    int     refs;			/* atomic */
    int     insecure;			/* no certificate or name checks */
    SSL_CTX *ctx;
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
    int     dane;			/* RFC 7672: the records below decide */
    struct smtps_tlsa *tlsa;		/* none: encrypt, do not authenticate */
    size_t  ntlsa;
    int     peer_closed;		/* close_notify seen: read no more */
    struct smtps_tls_config *cfg;
    char    servername[TLS_NAME_MAX + 1];	/* "" when none */
    SSL    *ssl;
    BIO    *net;			/* our end of the pair; SSL owns the other */
    struct smtps_buf wire;		/* ciphertext for the driver */
    uint64_t wire_produced;
    uint64_t wire_consumed;
    struct tls_mark marks[TLS_MARKS];	/* a ring */
    int     mark_head;
    int     nmarks;
    char    rbuf[TLS_RECORD_MAX];	/* plaintext from SSL_read */
};

static int valid_name(const char *name);
static int is_ip_literal(const char *name);
static int tls_names(struct smtps_tls *t);
static int tls_pull(struct smtps_session *s);
static void tls_mark(struct smtps_session *s);
static int tls_handshake(struct smtps_session *s);
static int tls_read(struct smtps_session *s);
static int tls_fail(struct smtps_session *s, const char *what);

/* ------------------------------------------------------------------ */
/* Policies (SSL_CTX), shared                                          */
/* ------------------------------------------------------------------ */

/* smtps_tls_config_new - a client policy: TLS 1.2 or newer, verifying */

struct smtps_tls_config *smtps_tls_config_new(const char *ca_file,
					              int insecure_no_verify)
{
    struct smtps_tls_config *c;
    SSL_CTX *ctx = NULL;

    if (OPENSSL_init_ssl(0, NULL) != 1)
	return NULL;
    ERR_clear_error();
    if ((c = calloc(1, sizeof(*c))) == NULL)
	return NULL;
    if ((ctx = SSL_CTX_new(TLS_client_method())) == NULL
	|| SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1
	|| SSL_CTX_dane_enable(ctx) <= 0)	/* sessions may use DANE */
	goto err;

    /*
     * Renegotiation would let the peer restart the handshake in the middle
     * of a reply stream we no longer watch for it; nobody needs it for SMTP.
     * Partial writes and a moving buffer: s->out may slide or grow between
     * an SSL_write that could not finish and its retry.
     */
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE
		     | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    if (insecure_no_verify) {
	SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    } else {
	SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
	if (ca_file != NULL ?
	    SSL_CTX_load_verify_locations(ctx, ca_file, NULL) != 1 :
	    SSL_CTX_set_default_verify_paths(ctx) != 1)
	    goto err;
    }
    c->refs = 1;
    c->insecure = insecure_no_verify != 0;
    c->ctx = ctx;
    ERR_clear_error();
    return c;

err:
    ERR_clear_error();
    SSL_CTX_free(ctx);
    free(c);
    return NULL;
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
    free(c);
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
    snprintf(t->servername, sizeof(t->servername), "%s",
	     servername ? servername : "");
    s->tls = t;
    return SMTPS_OK;
}

/* smtps_session_set_dane - authenticate by TLSA records; before start */

int     smtps_session_set_dane(struct smtps_session *s,
			               const struct smtps_tlsa *recs, size_t n)
{
    struct smtps_tls *t;
    size_t  i;

    if (s == NULL || (t = s->tls) == NULL || (n > 0 && recs == NULL)
	|| t->mode == SMTPS_TLS_OPPORTUNISTIC || t->mode == SMTPS_TLS_NONE)
	return SMTPS_EINVAL;
    if (s->status != SMTPS_SESS_NEW)
	return SMTPS_ESTATE;
    smtps_tlsa_free(t->tlsa, t->ntlsa);
    t->tlsa = NULL;
    t->ntlsa = 0;
    if (n > 0 && (t->tlsa = calloc(n, sizeof(*t->tlsa))) == NULL)
	return SMTPS_ENOMEM;
    for (i = 0; i < n; i++) {
	if ((t->tlsa[i].data = malloc(recs[i].len)) == NULL) {
	    smtps_tlsa_free(t->tlsa, i);
	    t->tlsa = NULL;
	    return SMTPS_ENOMEM;
	}
	memcpy(t->tlsa[i].data, recs[i].data, recs[i].len);
	t->tlsa[i].len = recs[i].len;
	t->tlsa[i].usage = recs[i].usage;
	t->tlsa[i].selector = recs[i].selector;
	t->tlsa[i].mtype = recs[i].mtype;
	t->ntlsa++;
    }
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
    SSL_free(t->ssl);				/* and its end of the pair */
    BIO_free(t->net);
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
 * either side, or the connection ended in the middle of the handshake
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
    return s->tls != NULL && (s->tls->phase == TLS_HANDSHAKE
			      || s->tls->phase == TLS_FAILED);
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

/* smtps_wipe - clear memory that held a secret, past the optimiser */

void    smtps_wipe(void *p, size_t len)
{
    if (p != NULL && len > 0)
	OPENSSL_cleanse(p, len);
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
    if (!t->verify)
	return 1;
    if (t->dane)
	return tls_dane(t);
    SSL_set_hostflags(t->ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    return SSL_set1_host(t->ssl, name) == 1;
}

/* smtps_tls_begin - start the client handshake now */

int     smtps_tls_begin(struct smtps_session *s)
{
    struct smtps_tls *t = s->tls;
    BIO    *inner = NULL;
    size_t  pending;

    if (t == NULL || t->phase != TLS_OFF)
	return SMTPS_ESTATE;
    /* Until it is up, a failure is the handshake's (stage 17). */
    s->fail_state = t->mode == SMTPS_TLS_IMPLICIT ? s->cur :
	SMTPS_STATE_STARTTLS;
    s->fail_stage = SMTPS_STAGE_TLS_HANDSHAKE;
    ERR_clear_error();
    if ((t->ssl = SSL_new(t->cfg->ctx)) == NULL
	|| BIO_new_bio_pair(&inner, TLS_BIO_SIZE, &t->net, TLS_BIO_SIZE) != 1)
	goto err;
    SSL_set_bio(t->ssl, inner, inner);		/* SSL owns inner now */
    inner = NULL;
    SSL_set_connect_state(t->ssl);
    if (!t->verify)
	SSL_set_verify(t->ssl, SSL_VERIFY_NONE, NULL);
    if (!tls_names(t))
	goto err;
    if (t->dane && t->verify && t->servername[0] == 0 && !tls_dane(t))
	goto err;				/* (a name goes through tls_names) */

    /*
     * Bytes still queued were queued in clear, before TLS (a PROXY header
     * before implicit TLS): they go out first, as they are.
     */
    pending = s->out.end - s->out.start;
    if (pending > 0) {
	if (smtps_buf_reserve(&t->wire, pending) != SMTPS_OK)
	    goto err;
	memcpy(t->wire.data + t->wire.end, s->out.data + s->out.start, pending);
	t->wire.end += pending;
	t->wire_produced += pending;
	s->out.start = s->out.end = 0;
	tls_mark(s);
    }
    t->phase = TLS_HANDSHAKE;

    /* RFC 3207 4.2: forget everything learned in clear. */
    memset(&s->caps, 0, sizeof(s->caps));
    s->pipelining = 0;
    return tls_handshake(s);			/* the ClientHello */

err:
    BIO_free(inner);
    t->phase = TLS_HANDSHAKE;			/* so that tls_fail() blames it */
    return tls_fail(s, "cannot start TLS");
}

/* tls_pull - move ciphertext from the net BIO to the wire buffer */

static int tls_pull(struct smtps_session *s)
{
    struct smtps_tls *t = s->tls;
    size_t  n;
    int     got, rc;

    while ((n = BIO_ctrl_pending(t->net)) > 0) {
	if ((rc = smtps_buf_reserve(&t->wire, n)) != SMTPS_OK)
	    return rc;
	if ((got = BIO_read(t->net, t->wire.data + t->wire.end, (int) n)) <= 0)
	    break;
	t->wire.end += (size_t) got;
	t->wire_produced += (uint64_t) got;
    }
    return SMTPS_OK;
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
    if (tls_pull(s) != SMTPS_OK)
	return tls_fail(s, "TLS handshake failed: output buffer full");
    if (rc == 1) {
	t->phase = TLS_UP;
	s->fail_state = -1;			/* failures are ordinary again */
	s->fail_stage = -1;
	if (s->trace != NULL) {
	    char    note[160];

	    snprintf(note, sizeof(note), "TLS is up: %s, %s",
		     SSL_get_version(t->ssl),
		     SSL_CIPHER_get_name(SSL_get_current_cipher(t->ssl)));
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
    int     n, err, rc;

    while (!t->peer_closed && t->phase == TLS_UP
	   && (s->status == SMTPS_SESS_ACTIVE || s->status == SMTPS_SESS_IDLE)) {
	ERR_clear_error();
	n = SSL_read(t->ssl, t->rbuf, (int) sizeof(t->rbuf));
	if (n > 0) {
	    if ((rc = smtps_session_take_replies(s, t->rbuf, (size_t) n)) < 0)
		return rc;
	    continue;
	}
	err = SSL_get_error(t->ssl, n);
	/* A post-handshake message may want an answer (TLS 1.3 KeyUpdate). */
	if (tls_pull(s) != SMTPS_OK)
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
    size_t  room;
    int     n, rc, moved;

    /*
     * The BIO pair holds TLS_BIO_SIZE bytes; what does not fit waits in
     * data while the handshake or SSL_read drain the pair, which they do
     * completely each round, so every round moves something.
     */
    while ((t->phase == TLS_HANDSHAKE || t->phase == TLS_UP) && !t->peer_closed
	   && (s->status == SMTPS_SESS_ACTIVE || s->status == SMTPS_SESS_IDLE)) {
	moved = 0;
	if (len > 0 && (room = BIO_ctrl_get_write_guarantee(t->net)) > 0) {
	    if (room > len)
		room = len;
	    if ((n = BIO_write(t->net, data, (int) room)) > 0) {
		data += n;
		len -= (size_t) n;
		moved = 1;
	    }
	}
	if (t->phase == TLS_HANDSHAKE && (rc = tls_handshake(s)) != SMTPS_OK)
	    return rc;
	if (t->phase == TLS_UP && (rc = tls_read(s)) != SMTPS_OK)
	    return rc;
	if (len == 0 || !moved)
	    break;
    }
    return SMTPS_OK;
}

/* smtps_tls_flush - encrypt queued plaintext, within the bounds */

int     smtps_tls_flush(struct smtps_session *s)
{
    struct smtps_tls *t = s->tls;
    size_t  pending, chunk, before;
    int     n, err;

    if (t == NULL || t->phase != TLS_UP)
	return SMTPS_OK;
    while ((pending = s->out.end - s->out.start) > 0
	   && t->wire.end - t->wire.start < SMTPS_OUT_HIGH
	   && t->nmarks < TLS_MARKS) {
	chunk = pending < TLS_RECORD_MAX ? pending : TLS_RECORD_MAX;
	before = t->wire.end;
	ERR_clear_error();
	n = SSL_write(t->ssl, s->out.data + s->out.start, (int) chunk);
	if (tls_pull(s) != SMTPS_OK)
	    return tls_fail(s, "TLS write failed: output buffer full");
	if (n <= 0) {
	    err = SSL_get_error(t->ssl, n);
	    if (err == SSL_ERROR_WANT_WRITE && t->wire.end > before)
		continue;			/* the pair had no room; it has now */
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
    if (t->wire.start == t->wire.end)
	t->wire.start = t->wire.end = 0;
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
    /* The alert OpenSSL wrote, if any, is in the wire: let it go out. */
    smtps_session_fail_now(s, s->fail_state, in_handshake ?
			   SMTPS_STAGE_TLS_HANDSHAKE : -1, why);
    return SMTPS_ETLS;
}
