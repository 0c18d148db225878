/* SPDX-License-Identifier: MIT */
/* The man-page header nests comment openers on purpose (Postfix style). */
#pragma GCC diagnostic ignored "-Wcomment"
/*++
/* NAME
/*	test_tls 1
/* SUMMARY
/*	table-driven test of base64 (csrc/auth.c) and TLS in the session
/*	(csrc/tls.c), under the sanitizers
/* SYNOPSIS
/*	test_tls
/* DESCRIPTION
/*	base64: the RFC 4648 10 vectors both ways, each output buffer
/*	allocated at its exact size (a write past it is a heap overflow
/*	AddressSanitizer reports), too-small buffers, and inputs the strict
/*	decoder must refuse.
/*
/*	TLS: a session against a server end written here with OpenSSL on
/*	its own BIO pair and a throwaway self-signed certificate made in
/*	memory. Implicit TLS and STARTTLS each run a whole delivery of a
/*	body larger than the session's output high-water mark, taking the
/*	ciphertext in odd-sized bites, and compare what the server
/*	decrypted byte for byte. Failures: a verifying policy refuses the
/*	self-signed certificate; garbage after the 220 is a failed
/*	handshake; a reply injected after the 220 is refused before any
/*	handshake; a session freed in the middle of its handshake. Leaks of
/*	any SSL object show up in LeakSanitizer.
/*
/*	Turns (smtps_session_set_tls_gate()): a handshake whose turn has
/*	not come sends nothing, not even the EHLO behind it, until
/*	smtps_session_tls_proceed(), and then a whole delivery works; data
/*	from the server while it waits is refused (it can only be clear
/*	text); a connection lost while waiting is not a failed handshake;
/*	and a handshake that waited offers the session a handshake that
/*	ended meanwhile left in the slot (TLS 1.2 and 1.3).
/*
/*	Resumption, in TLS 1.2 and TLS 1.3: sessions sharing a slot resume
/*	(client and server both say so); another server name, a server
/*	that forgot the session and a session without a slot do not; a
/*	verifying session whose offer a server with an untrusted
/*	certificate refuses fails its full handshake, and the slot no
/*	longer holds what it offered.
/*
/*	Prints "RUN label", then "PASS label" or "FAIL label: why", and
/*	finally "N passed, N failed".
/* DIAGNOSTICS
/*	Exit status 0 when every test passed, 1 otherwise.
/* SEE ALSO
/*	csrc/auth.c, csrc/tls.c, RFC 4648, RFC 3207.
/*--*/

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sys/stat.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "internal.h"

#define WHY_MAX 512
#define B(s) s, sizeof(s) - 1

static char why[WHY_MAX];

/* ------------------------------------------------------------------ */
/* base64                                                              */
/* ------------------------------------------------------------------ */

static const struct {
    const char *plain;
    size_t  plen;
    const char *coded;
} b64_vectors[] = {
    {B(""), ""},
    {B("f"), "Zg=="},
    {B("fo"), "Zm8="},
    {B("foo"), "Zm9v"},
    {B("foob"), "Zm9vYg=="},
    {B("fooba"), "Zm9vYmE="},
    {B("foobar"), "Zm9vYmFy"},
    {B("\0alice\0s3cret"), "AGFsaWNlAHMzY3JldA=="},
    {B("\xff\xfe\xfd"), "//79"},
};

#define NVECTORS (sizeof(b64_vectors) / sizeof(b64_vectors[0]))

/* test_base64_vectors - RFC 4648 10, both ways, exact buffers */

static int test_base64_vectors(void)
{
    size_t  i, n, clen;
    char   *out;
    unsigned char *back;
    int     rc;

    for (i = 0; i < NVECTORS; i++) {
	clen = strlen(b64_vectors[i].coded);
	out = malloc(clen + 1);
	n = smtps_base64_encode((const unsigned char *) b64_vectors[i].plain,
				b64_vectors[i].plen, out, clen + 1);
	if (n != clen || memcmp(out, b64_vectors[i].coded, clen + 1) != 0) {
	    snprintf(why, WHY_MAX, "encode vector %zu: got %zu bytes", i, n);
	    free(out);
	    return 0;
	}
	/* One byte short: refused, nothing written past the end. */
	if (clen > 0 && smtps_base64_encode((const unsigned char *)
					    b64_vectors[i].plain,
					    b64_vectors[i].plen, out, clen) != 0) {
	    snprintf(why, WHY_MAX, "encode vector %zu: short buffer taken", i);
	    free(out);
	    return 0;
	}
	free(out);
	back = malloc(b64_vectors[i].plen + 1);
	rc = smtps_base64_decode(b64_vectors[i].coded, clen, back,
				 b64_vectors[i].plen, &n);
	if (rc != SMTPS_OK || n != b64_vectors[i].plen
	    || memcmp(back, b64_vectors[i].plain, n) != 0) {
	    snprintf(why, WHY_MAX, "decode vector %zu: rc %d, %zu bytes", i, rc,
		     n);
	    free(back);
	    return 0;
	}
	if (b64_vectors[i].plen > 0
	    && smtps_base64_decode(b64_vectors[i].coded, clen, back,
				   b64_vectors[i].plen - 1, &n) != SMTPS_ETOOBIG) {
	    snprintf(why, WHY_MAX, "decode vector %zu: short buffer taken", i);
	    free(back);
	    return 0;
	}
	free(back);
    }
    return 1;
}

/* test_base64_refusals - what the strict decoder must not take */

static int test_base64_refusals(void)
{
    static const char *bad[] = {
	"Zg=", "Zg", "Z===", "====", "Zg==Zg==", "Zm9v!mFy", "Zm 9v",
	"Zm9v\r\n", "=Zm9", "Zm=v",
    };
    unsigned char out[64];
    size_t  i, n;

    for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
	if (smtps_base64_decode(bad[i], strlen(bad[i]), out, sizeof(out), &n)
	    != SMTPS_EINVAL) {
	    snprintf(why, WHY_MAX, "took \"%s\"", bad[i]);
	    return 0;
	}
    return 1;
}

/* ------------------------------------------------------------------ */
/* A TLS server end in memory                                          */
/* ------------------------------------------------------------------ */

struct server {
    SSL_CTX *ctx;
    SSL    *ssl;
    BIO    *net;
    char    plain[1 << 21];		/* everything decrypted, in order */
    size_t  nplain;
};

static EVP_PKEY *key, *key2;
static X509 *cert, *cert2;

static int make_cert_into(EVP_PKEY **keyp, X509 **certp);

/* make_cert - a self-signed certificate for "localhost", made once */

static int make_cert(void)
{
    return cert != NULL || make_cert_into(&key, &cert);
}

/* make_cert_into - a new key and self-signed certificate for "localhost" */

static int make_cert_into(EVP_PKEY **keyp, X509 **certp)
{
    X509_NAME *name;
    X509_EXTENSION *ext;
    X509V3_CTX v3;
    EVP_PKEY *key;
    X509   *cert;

    if ((key = *keyp = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256")) == NULL
	|| (cert = *certp = X509_new()) == NULL)
	return 0;
    X509_set_version(cert, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(cert), 1);
    X509_gmtime_adj(X509_getm_notBefore(cert), -3600);
    X509_gmtime_adj(X509_getm_notAfter(cert), 3600);
    X509_set_pubkey(cert, key);
    name = X509_get_subject_name(cert);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
			       (const unsigned char *) "localhost", -1, -1, 0);
    X509_set_issuer_name(cert, name);
    X509V3_set_ctx(&v3, cert, cert, NULL, NULL, 0);
    if ((ext = X509V3_EXT_conf_nid(NULL, &v3, NID_subject_alt_name,
				   "DNS:localhost")) == NULL)
	return 0;
    X509_add_ext(cert, ext, -1);
    X509_EXTENSION_free(ext);
    return X509_sign(cert, key, EVP_sha256()) > 0;
}

static struct server *server_on(SSL_CTX *ctx);

/* server_ctx - a server policy with the test certificate, TLS <= max */

static SSL_CTX *server_ctx(int max, EVP_PKEY *k, X509 *c)
{
    SSL_CTX *ctx;

    if (!make_cert() || (ctx = SSL_CTX_new(TLS_server_method())) == NULL
	|| SSL_CTX_use_certificate(ctx, c ? c : cert) != 1
	|| SSL_CTX_use_PrivateKey(ctx, k ? k : key) != 1
	|| (max && SSL_CTX_set_max_proto_version(ctx, max) != 1)
	|| SSL_CTX_set_session_id_context(ctx, (const unsigned char *) "t", 1) != 1) {
	fprintf(stderr, "server_ctx failed\n");
	exit(2);
    }
    return ctx;
}

/* server_new - a server end with the test certificate */

static struct server *server_new(void)
{
    return server_on(server_ctx(0, NULL, NULL));
}

/* server_on - a server end on ctx (whose reference it takes) */

static struct server *server_on(SSL_CTX *ctx)
{
    struct server *sv = calloc(1, sizeof(*sv));
    BIO    *inner;

    if (sv == NULL || (sv->ctx = ctx) == NULL
	|| (sv->ssl = SSL_new(sv->ctx)) == NULL
	|| BIO_new_bio_pair(&inner, 1 << 17, &sv->net, 1 << 17) != 1) {
	fprintf(stderr, "server_new failed\n");
	exit(2);
    }
    SSL_set_bio(sv->ssl, inner, inner);
    SSL_set_accept_state(sv->ssl);
    return sv;
}

/* server_free - release a server end */

static void server_free(struct server *sv)
{
    SSL_free(sv->ssl);
    BIO_free(sv->net);
    SSL_CTX_free(sv->ctx);
    free(sv);
}

/* server_take - client ciphertext in; decrypt what can be decrypted */

static int server_take(struct server *sv, const char *data, size_t len)
{
    int     n;

    while (len > 0) {
	if ((n = BIO_write(sv->net, data, (int) len)) <= 0)
	    return 0;
	data += n;
	len -= (size_t) n;
	while ((n = SSL_read(sv->ssl, sv->plain + sv->nplain,
			     (int) (sizeof(sv->plain) - sv->nplain))) > 0)
	    sv->nplain += (size_t) n;
	if (SSL_get_error(sv->ssl, n) != SSL_ERROR_WANT_READ)
	    return 0;
    }
    return 1;
}

/* server_say - encrypt a reply; feed it (and anything pending) to s */

static int server_say(struct server *sv, struct smtps_session *s,
		              const char *text)
{
    char    buf[1 << 16];
    int     n;

    if (text != NULL && SSL_write(sv->ssl, text, (int) strlen(text)) <= 0)
	return 0;
    while ((n = BIO_read(sv->net, buf, sizeof(buf))) > 0)
	if (smtps_session_feed(s, buf, (size_t) n, 0) < 0)
	    return 0;
    return 1;
}

/* pump - client output to the server in bites of `bite`, until none */

static int pump(struct server *sv, struct smtps_session *s, size_t bite)
{
    const char *data;
    size_t  n;

    while ((n = smtps_session_output(s, &data)) > 0) {
	if (n > bite)
	    n = bite;
	if (!server_take(sv, data, n))
	    return 0;
	smtps_session_consume(s, n, 0);
	if (!server_say(sv, s, NULL))		/* handshake answers */
	    return 0;
    }
    return 1;
}

/* expect_plain - the server decrypted exactly want since `from` */

static int expect_plain(struct server *sv, size_t *from, const char *want,
			        size_t len)
{
    if (sv->nplain - *from != len || memcmp(sv->plain + *from, want, len) != 0) {
	snprintf(why, WHY_MAX, "server got \"%.*s\" (%zu bytes), wanted \"%.*s\"",
		 (int) (sv->nplain - *from > 80 ? 80 : sv->nplain - *from),
		 sv->plain + *from, sv->nplain - *from, (int) (len > 80 ? 80 : len),
		 want);
	return 0;
    }
    *from += len;
    return 1;
}

/* session - a session with TLS in mode, an insecure (self-signed) policy */

static struct smtps_session *session(int mode, int insecure)
{
    struct smtps_tls_config *cfg = smtps_tls_config_new(NULL, insecure);
    struct smtps_session *s = smtps_session_new(NULL, "client.example", NULL);

    if (cfg == NULL || s == NULL
	|| smtps_session_set_tls(s, mode, cfg, "localhost") != SMTPS_OK) {
	fprintf(stderr, "session set-up failed\n");
	exit(2);
    }
    smtps_tls_config_free(cfg);			/* the session holds it */
    return s;
}

/* message - one message with a body of n bytes of lines and dots */

static struct smtps_message *message(size_t n, char **body)
{
    struct smtps_message *m = smtps_message_new();
    size_t  i;

    *body = malloc(n);
    for (i = 0; i < n; i++)
	(*body)[i] = i % 61 == 60 ? '\n' : i % 61 == 0 ? '.' : (char) ('a' + i % 26);
    smtps_message_set_sender(m, B("a@client.example"));
    smtps_message_add_recipient(m, B("b@server.example"), 0, NULL, 0);
    smtps_message_set_body(m, *body, n);
    return m;
}

/* stuffed - what the server must decrypt for that body after DATA */

static char *stuffed(const char *body, size_t n, size_t *len)
{
    char   *out = malloc(2 * n + 8);
    size_t  i, k = 0;

    for (i = 0; i < n; i++) {
	if (body[i] == '\n')
	    out[k++] = '\r';
	else if (body[i] == '.' && (i == 0 || body[i - 1] == '\n'))
	    out[k++] = '.';
	out[k++] = body[i];
    }
    if (n > 0 && body[n - 1] != '\n') {
	out[k++] = '\r';
	out[k++] = '\n';
    }
    memcpy(out + k, ".\r\n", 3);
    *len = k + 3;
    return out;
}

/* deliver - from IDLE: one big message, taken in odd bites */

static int deliver(struct server *sv, struct smtps_session *s, size_t *from)
{
    struct smtps_message *m;
    struct smtps_result *r;
    char   *body, *want;
    size_t  wlen;
    int     ok = 0;

    m = message(300000, &body);
    want = stuffed(body, 300000, &wlen);
    if (smtps_session_submit(s, m, 7, 0) != SMTPS_OK || !pump(sv, s, 1000)
	|| !expect_plain(sv, from, B("MAIL FROM:<a@client.example>\r\n"))
	|| !server_say(sv, s, "250 ok\r\n") || !pump(sv, s, 1000)
	|| !expect_plain(sv, from, B("RCPT TO:<b@server.example>\r\n"))
	|| !server_say(sv, s, "250 ok\r\n") || !pump(sv, s, 1000)
	|| !expect_plain(sv, from, B("DATA\r\n"))
	|| !server_say(sv, s, "354 go\r\n") || !pump(sv, s, 7777)
	|| !expect_plain(sv, from, want, wlen)
	|| !server_say(sv, s, "250 2.0.0 queued\r\n"))
	goto out;
    if ((r = smtps_session_next_result(s)) == NULL
	|| r->status != SMTPS_STATUS_DELIVERED || r->tag != 7) {
	snprintf(why, WHY_MAX, "no delivered result");
	smtps_result_free(r);
	goto out;
    }
    smtps_result_free(r);
    ok = 1;
out:
    if (!ok && why[0] == 0)
	snprintf(why, WHY_MAX, "delivery failed: %s", smtps_session_reason(s));
    free(body);
    free(want);
    return ok;
}

/* finish - QUIT over TLS, then free */

static int finish(struct server *sv, struct smtps_session *s, size_t *from)
{
    int     ok;

    ok = smtps_session_quit(s, 0) == SMTPS_OK && pump(sv, s, 1 << 20)
	&& expect_plain(sv, from, B("QUIT\r\n"))
	&& server_say(sv, s, "221 bye\r\n")
	&& smtps_session_status(s) == SMTPS_SESS_CLOSING;
    smtps_session_free(s);
    server_free(sv);
    return ok;
}

/* test_implicit_delivery - TLS first, then a whole delivery */

static int test_implicit_delivery(void)
{
    struct smtps_session *s = session(SMTPS_TLS_IMPLICIT, 1);
    struct server *sv = server_new();
    size_t  from = 0;

    if (smtps_session_start(s, 0) != SMTPS_OK || !pump(sv, s, 100)
	|| !smtps_session_tls_active(s))
	return (snprintf(why, WHY_MAX, "no handshake: %s",
			 smtps_session_reason(s)), 0);
    if (!server_say(sv, s, "220 server.example\r\n") || !pump(sv, s, 3)
	|| !expect_plain(sv, &from, B("EHLO client.example\r\n"))
	|| !server_say(sv, s, "250 server.example\r\n")
	|| smtps_session_status(s) != SMTPS_SESS_IDLE)
	return (snprintf(why, WHY_MAX, "no EHLO"), 0);
    return deliver(sv, s, &from) && finish(sv, s, &from);
}

/* test_starttls_delivery - clear EHLO, STARTTLS, EHLO again inside */

static int test_starttls_delivery(void)
{
    struct smtps_session *s = session(SMTPS_TLS_STARTTLS, 1);
    struct server *sv = server_new();
    const char *data;
    size_t  from = 0, n;

    smtps_session_start(s, 0);
    smtps_session_feed(s, B("220 server.example\r\n"), 0);
    n = smtps_session_output(s, &data);
    if (n != sizeof("EHLO client.example\r\n") - 1)
	return (snprintf(why, WHY_MAX, "no clear EHLO"), 0);
    smtps_session_consume(s, n, 0);
    smtps_session_feed(s, B("250-server.example\r\n250-PIPELINING\r\n"
			    "250 STARTTLS\r\n"), 0);
    n = smtps_session_output(s, &data);
    if (n != 10 || memcmp(data, "STARTTLS\r\n", 10) != 0)
	return (snprintf(why, WHY_MAX, "no STARTTLS"), 0);
    smtps_session_consume(s, n, 0);
    smtps_session_feed(s, B("220 go ahead\r\n"), 0);
    if (!pump(sv, s, 50) || !smtps_session_tls_active(s)
	|| !expect_plain(sv, &from, B("EHLO client.example\r\n")))
	return (snprintf(why, WHY_MAX, "no handshake: %s",
			 smtps_session_reason(s)), 0);
    /* No PIPELINING inside: MAIL, RCPT, DATA go one at a time. */
    if (!server_say(sv, s, "250 server.example\r\n")
	|| smtps_session_pipelining(s))
	return (snprintf(why, WHY_MAX, "capabilities kept"), 0);
    return deliver(sv, s, &from) && finish(sv, s, &from);
}

/* to_220 - a STARTTLS session just before the server's 220 */

static struct smtps_session *to_220(int insecure, struct smtps_message **m)
{
    struct smtps_session *s = session(SMTPS_TLS_STARTTLS, insecure);
    const char *data;
    char   *body;

    *m = message(10, &body);
    free(body);
    smtps_session_submit(s, *m, 1, 0);
    smtps_session_start(s, 0);
    smtps_session_feed(s, B("220 server.example\r\n"), 0);
    smtps_session_consume(s, smtps_session_output(s, &data), 0);
    smtps_session_feed(s, B("250-server.example\r\n250 STARTTLS\r\n"), 0);
    smtps_session_consume(s, smtps_session_output(s, &data), 0);
    return s;
}

/* one_result - the single result has status and a reason containing text */

static int one_result(struct smtps_session *s, int status, const char *text,
		              int stage)
{
    struct smtps_result *r = smtps_session_next_result(s);
    int     ok;

    ok = r != NULL && r->status == status && strstr(r->reason, text) != NULL
	&& r->stage == stage && smtps_session_next_result(s) == NULL;
    if (!ok)
	snprintf(why, WHY_MAX, "result %d \"%s\" stage %d", r ? r->status : -1,
		 r ? r->reason : "(none)", r ? r->stage : -1);
    smtps_result_free(r);
    return ok;
}

/* no_clear_text - after TLS began, nothing but TLS records goes out */

static int no_clear_text(struct smtps_session *s)
{
    const char *data;
    size_t  n = smtps_session_output(s, &data);

    return n == 0 || (data[0] >= 0x14 && data[0] <= 0x17);
}

/* test_self_signed_refused - a verifying policy fails the handshake */

static int test_self_signed_refused(void)
{
    struct smtps_message *m;
    struct smtps_session *s = to_220(0, &m);
    struct server *sv = server_new();
    int     ok;

    smtps_session_feed(s, B("220 go\r\n"), 0);
    (void) pump(sv, s, 1 << 20);		/* the server sees our alert */
    ok = smtps_session_status(s) == SMTPS_SESS_CLOSING
	&& !smtps_session_tls_active(s) && no_clear_text(s)
	&& one_result(s, SMTPS_STATUS_TEMPFAIL, "TLS handshake failed: "
		      "certificate verify failed", SMTPS_STAGE_TLS_HANDSHAKE);
    smtps_session_free(s);
    server_free(sv);
    ERR_clear_error();
    return ok;
}

/* test_garbage_after_220 - not TLS: a failed handshake, no QUIT */

static int test_garbage_after_220(void)
{
    struct smtps_message *m;
    struct smtps_session *s = to_220(1, &m);
    int     ok;

    smtps_session_feed(s, B("220 go\r\n"), 0);
    smtps_session_feed(s, B("250 this is not a TLS record at all\r\n"), 0);
    ok = smtps_session_status(s) == SMTPS_SESS_CLOSING && no_clear_text(s)
	&& one_result(s, SMTPS_STATUS_TEMPFAIL, "TLS handshake failed",
		      SMTPS_STAGE_TLS_HANDSHAKE);
    smtps_session_free(s);
    return ok;
}

/* test_injection_refused - a reply after the 220, in the same read */

static int test_injection_refused(void)
{
    struct smtps_message *m;
    struct smtps_session *s = to_220(1, &m);
    const char *data;
    int     ok;

    ok = smtps_session_feed(s, B("220 go\r\n250 injected\r\n"), 0)
	== SMTPS_EPROTO
	&& smtps_session_status(s) == SMTPS_SESS_CLOSING
	&& smtps_session_output(s, &data) == 0
	&& one_result(s, SMTPS_STATUS_TEMPFAIL, "clear text after its "
		      "STARTTLS reply", SMTPS_STAGE_STARTTLS_DONE);
    smtps_session_free(s);
    return ok;
}

/* test_free_mid_handshake - nothing leaks when the session just ends */

static int test_free_mid_handshake(void)
{
    struct smtps_message *m;
    struct smtps_session *s = to_220(1, &m);

    smtps_session_feed(s, B("220 go\r\n"), 0);
    smtps_session_free(s);
    s = session(SMTPS_TLS_IMPLICIT, 0);
    smtps_session_start(s, 0);
    smtps_session_closed(s, "gone", 0);
    smtps_session_free(s);
    return 1;
}

/* ------------------------------------------------------------------ */
/* Resumption                                                          */
/* ------------------------------------------------------------------ */

/*
 * handshake - an implicit TLS session on ctx (a reference of it taken)
 * with slot, through the banner and EHLO, so that TLS 1.3 tickets have
 * arrived; *sv is the server end. 0 with why set when it failed.
 */

static struct smtps_session *handshake(SSL_CTX *ctx, struct smtps_tls_config *cfg,
				               const char *name,
				               struct smtps_tls_resume *slot,
				               struct server **sv)
{
    struct smtps_session *s = smtps_session_new(NULL, "client.example", NULL);
    size_t  from = 0;

    SSL_CTX_up_ref(ctx);
    *sv = server_on(ctx);
    if (s == NULL
	|| smtps_session_set_tls(s, SMTPS_TLS_IMPLICIT, cfg, name) != SMTPS_OK
	|| (slot != NULL && smtps_session_set_tls_resume(s, slot) != SMTPS_OK)) {
	snprintf(why, WHY_MAX, "set-up failed");
	smtps_session_free(s);
	return NULL;
    }
    if (smtps_session_start(s, 0) != SMTPS_OK || !pump(*sv, s, 100)
	|| !smtps_session_tls_active(s)
	|| !server_say(*sv, s, "220 server.example\r\n") || !pump(*sv, s, 1000)
	|| !expect_plain(*sv, &from, B("EHLO client.example\r\n"))
	|| !server_say(*sv, s, "250 server.example\r\n")
	|| smtps_session_status(s) != SMTPS_SESS_IDLE) {
	if (why[0] == 0)
	    snprintf(why, WHY_MAX, "no handshake: %s", smtps_session_reason(s));
	return s;				/* for the caller to look at */
    }
    (*sv)->nplain = 0;
    return s;
}

/* resumed - client and server agree on whether s resumed */

static int resumed(struct smtps_session *s, struct server *sv, int want)
{
    if (smtps_session_tls_resumed(s) != want
	|| SSL_session_reused(sv->ssl) != want) {
	snprintf(why, WHY_MAX, "resumed: client %d, server %d, wanted %d",
		 smtps_session_tls_resumed(s), SSL_session_reused(sv->ssl), want);
	return 0;
    }
    return 1;
}

/* done - free a session and its server end; ok passes through */

static int done(struct smtps_session *s, struct server *sv, int ok)
{
    smtps_session_free(s);
    server_free(sv);
    return ok;
}

/*
 * resumption - the second connection with the same slot resumes; one
 * with another server name does not; a server that has forgotten the
 * session makes a full handshake, which still works
 */

static int resumption(int version)
{
    struct smtps_tls_config *cfg = smtps_tls_config_new(NULL, 1);
    struct smtps_tls_resume slot = {0};
    SSL_CTX *ctx = server_ctx(version, NULL, NULL);
    SSL_CTX *other = server_ctx(version, NULL, NULL);
    struct smtps_session *s;
    struct server *sv;
    int     ok = 0;

    s = handshake(ctx, cfg, "localhost", &slot, &sv);
    if (!done(s, sv, why[0] == 0 && resumed(s, sv, 0)))
	goto out;
    if (slot.sess == NULL) {
	snprintf(why, WHY_MAX, "nothing kept after the first handshake");
	goto out;
    }
    s = handshake(ctx, cfg, "localhost", &slot, &sv);
    if (!done(s, sv, why[0] == 0 && resumed(s, sv, 1))
	|| slot.sess == NULL)
	goto out;
    /* Another name: the session is not offered (and is dropped). */
    s = handshake(ctx, cfg, "other.example", &slot, &sv);
    if (!done(s, sv, why[0] == 0 && resumed(s, sv, 0)))
	goto out;
    s = handshake(ctx, cfg, "localhost", &slot, &sv);
    if (!done(s, sv, why[0] == 0 && resumed(s, sv, 0)))
	goto out;
    /* A server that does not know it: a full handshake. */
    s = handshake(other, cfg, "localhost", &slot, &sv);
    if (!done(s, sv, why[0] == 0 && resumed(s, sv, 0)))
	goto out;
    /* Without a slot: never. */
    s = handshake(other, cfg, "localhost", NULL, &sv);
    ok = done(s, sv, why[0] == 0 && resumed(s, sv, 0));
out:
    smtps_tls_resume_clear(&slot);
    smtps_tls_config_free(cfg);
    SSL_CTX_free(ctx);
    SSL_CTX_free(other);
    return ok;
}

static int test_resumption_tls12(void)
{
    return resumption(TLS1_2_VERSION);
}

static int test_resumption_tls13(void)
{
    return resumption(TLS1_3_VERSION);
}

/*
 * test_resumption_refused_then_verify_fails - a verifying session offers
 * a good session to a server that does not know it and whose certificate
 * nobody vouches for: the full handshake fails as it must, and the slot
 * no longer holds what was offered
 */

static int test_resumption_refused_then_verify_fails(void)
{
    char    path[] = "/tmp/smtpstate-test-tls-XXXXXX";
    struct smtps_tls_config *cfg;
    struct smtps_tls_resume slot = {0};
    SSL_CTX *ctx, *imposter;
    struct smtps_session *s;
    struct server *sv;
    FILE   *f;
    int     fd, ok = 0;

    if (!make_cert() || (fd = mkstemp(path)) < 0 || (f = fdopen(fd, "w")) == NULL)
	return (snprintf(why, WHY_MAX, "no CA file"), 0);
    PEM_write_X509(f, cert);
    fclose(f);
    cfg = smtps_tls_config_new(path, 0);
    unlink(path);
    if (cfg == NULL)
	return (snprintf(why, WHY_MAX, "no verifying config"), 0);
    if (cert2 == NULL && !make_cert_into(&key2, &cert2))
	return (snprintf(why, WHY_MAX, "no second certificate"), 0);
    ctx = server_ctx(TLS1_2_VERSION, NULL, NULL);
    imposter = server_ctx(TLS1_2_VERSION, key2, cert2);
    s = handshake(ctx, cfg, "localhost", &slot, &sv);
    if (!done(s, sv, why[0] == 0 && resumed(s, sv, 0)) || slot.sess == NULL)
	goto out;
    s = handshake(imposter, cfg, "localhost", &slot, &sv);
    if (smtps_session_tls_active(s) || strstr(smtps_session_reason(s),
					      "certificate verify failed") == NULL) {
	snprintf(why, WHY_MAX, "the imposter was not refused: %s",
		 smtps_session_reason(s));
	done(s, sv, 0);
	goto out;
    }
    done(s, sv, 1);
    why[0] = 0;
    if (slot.sess != NULL) {
	snprintf(why, WHY_MAX, "the refused session is still kept");
	goto out;
    }
    ok = 1;
out:
    smtps_tls_resume_clear(&slot);
    smtps_tls_config_free(cfg);
    SSL_CTX_free(ctx);
    SSL_CTX_free(imposter);
    return ok;
}

/* ------------------------------------------------------------------ */
/* Policies from settings                                              */
/* ------------------------------------------------------------------ */

static char dir[] = "/tmp/smtpstate-test-tls-XXXXXX";

static const char *const files[] = {
    "cert.pem", "key.pem", "cert2.pem", "key2.pem", "enc.pem", "junk.pem",
};

/* path - a file of the test directory */

static const char *path(const char *name)
{
    static char buf[8][256];
    static int next;
    char   *p = buf[next++ % 8];

    snprintf(p, sizeof(buf[0]), "%s/%s", dir, name);
    return p;
}

/* write_pem - one PEM file: a certificate, a key (encrypted: pass) or junk */

static int write_pem(const char *name, X509 *c, EVP_PKEY *k, const char *pass)
{
    FILE   *f = fopen(path(name), "w");
    int     ok;

    if (f == NULL)
	return 0;
    if (c != NULL)
	ok = PEM_write_X509(f, c) == 1;
    else if (k != NULL)
	ok = PEM_write_PrivateKey(f, k, pass ? EVP_aes_256_cbc() : NULL,
				  (const unsigned char *) pass,
				  pass ? (int) strlen(pass) : 0, NULL, NULL) == 1;
    else
	ok = fputs("not PEM at all\n", f) >= 0;
    return fclose(f) == 0 && ok;
}

/* make_files - the certificates and keys the settings name, on disk */

static int make_files(void)
{
    if (!make_cert() || (cert2 == NULL && !make_cert_into(&key2, &cert2))
	|| mkdtemp(dir) == NULL)
	return 0;
    return write_pem("cert.pem", cert, NULL, NULL)
	&& write_pem("key.pem", NULL, key, NULL)
	&& write_pem("cert2.pem", cert2, NULL, NULL)
	&& write_pem("key2.pem", NULL, key2, NULL)
	&& write_pem("enc.pem", NULL, key, "sekrit")
	&& write_pem("junk.pem", NULL, NULL, NULL)
	&& mkdir(path("empty"), 0700) == 0;
}

/* remove_files - what make_files() made */

static void remove_files(void)
{
    size_t  i;

    for (i = 0; i < sizeof(files) / sizeof(files[0]); i++)
	unlink(path(files[i]));
    rmdir(path("empty"));
    rmdir(dir);
}

/* settings_of - settings with only the ABI guard filled in */

static struct smtps_tls_settings settings_of(void)
{
    struct smtps_tls_settings ts;

    memset(&ts, 0, sizeof(ts));
    ts.sizeof_settings = sizeof(ts);
    return ts;
}

/*
 * test_settings - every setting is checked when the policy is made: the
 * code, and words in why that say what to fix
 */

static int test_settings(void)
{
    static const struct {
	const char *label;
	const char *ca_file, *ca_path, *cert, *key, *pass;
	int     min;
	const char *ciphers, *suites;
	int     rc;
	const char *want;		/* in why; NULL: why stays "" */
    }       cases[] = {
	{"defaults", 0, 0, 0, 0, 0, 0, 0, 0, SMTPS_OK, 0},
	{"all good", "cert.pem", ".", "cert.pem", "key.pem", 0, SMTPS_TLS_V1_3,
	"ECDHE+AESGCM", "TLS_AES_128_GCM_SHA256", SMTPS_OK, 0},
	{"encrypted key", 0, 0, "cert.pem", "enc.pem", "sekrit", 0, 0, 0,
	SMTPS_OK, 0},
	{"TLS 1.2", 0, 0, 0, 0, 0, SMTPS_TLS_V1_2, 0, 0, SMTPS_OK, 0},
	{"TLS 1.1", 0, 0, 0, 0, 0, 0x0302, 0, 0, SMTPS_EINVAL,
	"min_version 0x0302 is neither TLS 1.2"},
	{"bad ciphers", 0, 0, 0, 0, 0, 0, "NOPE", 0, SMTPS_EINVAL,
	"ciphers 'NOPE': OpenSSL finds no TLS 1.2 cipher in it: no cipher match"},
	{"bad suites", 0, 0, 0, 0, 0, 0, 0, "NOPE", SMTPS_EINVAL,
	"ciphersuites 'NOPE': OpenSSL finds no TLS 1.3 cipher suite"},
	{"no suites, TLS 1.3 only", 0, 0, 0, 0, 0, SMTPS_TLS_V1_3, 0, "",
	SMTPS_EINVAL, "leaves TLS 1.3 no cipher suite"},
	{"no suites, TLS 1.2 allowed", 0, 0, 0, 0, 0, 0, 0, "", SMTPS_OK, 0},
	{"missing cert", 0, 0, "nonexistent.pem", 0, 0, 0, 0, 0, SMTPS_EINVAL,
	"No such file or directory"},
	{"cert file holds no certificate", 0, 0, "key.pem", 0, 0, 0, 0, 0,
	SMTPS_EINVAL, "cannot load the certificate chain (PEM, the client "
	"certificate first): no start line"},
	{"no key in cert_file", 0, 0, "cert.pem", 0, 0, 0, 0, 0, SMTPS_EINVAL,
	"cannot load a private key from it (give key_file"},
	{"key of another certificate", 0, 0, "cert.pem", "key2.pem", 0, 0, 0,
	0, SMTPS_EINVAL, "does not match the certificate of cert_file"},
	{"encrypted key, no password", 0, 0, "cert.pem", "enc.pem", 0, 0, 0, 0,
	SMTPS_EINVAL, "(if it is encrypted, give key_password)"},
	{"encrypted key, wrong password", 0, 0, "cert.pem", "enc.pem", "wrong",
	0, 0, 0, SMTPS_EINVAL, "(wrong key_password?)"},
	{"key without cert", 0, 0, 0, "key.pem", 0, 0, 0, 0, SMTPS_EINVAL,
	"key_file needs cert_file"},
	{"password without cert", 0, 0, 0, 0, "x", 0, 0, 0, SMTPS_EINVAL,
	"key_password needs cert_file"},
	{"CA file of junk", "junk.pem", 0, 0, 0, 0, 0, 0, 0, SMTPS_EINVAL,
	"ca_file '"},
	{"missing CA file", "nonexistent.pem", 0, 0, 0, 0, 0, 0, 0,
	SMTPS_EINVAL, "No such file or directory"},
	{"CA directory not hashed", 0, "empty", 0, 0, 0, 0, 0, 0, SMTPS_EINVAL,
	"run 'openssl rehash' on it"},
	{"missing CA directory", 0, "nonexistent", 0, 0, 0, 0, 0, 0,
	SMTPS_EINVAL, "ca_path '"},
    };
    struct smtps_tls_settings ts;
    struct smtps_tls_config *cfg;
    char    msg[256], tiny[12];
    size_t  i;
    int     rc, ok = 0;

    if (!make_files())
	return (snprintf(why, WHY_MAX, "cannot write the test files"), 0);
    /* "." for a CA directory: one with a hashed name in it. */
    if (symlink("cert.pem", path("1a2b3c4d.0")) != 0)
	return (snprintf(why, WHY_MAX, "cannot make a hashed name"), 0);
    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
	ts = settings_of();
	ts.ca_file = cases[i].ca_file ? path(cases[i].ca_file) : NULL;
	ts.ca_path = cases[i].ca_path == NULL ? NULL :
	    strcmp(cases[i].ca_path, ".") == 0 ? dir : path(cases[i].ca_path);
	ts.cert_file = cases[i].cert ? path(cases[i].cert) : NULL;
	ts.key_file = cases[i].key ? path(cases[i].key) : NULL;
	ts.key_password = cases[i].pass;
	ts.min_version = cases[i].min;
	ts.ciphers = cases[i].ciphers;
	ts.ciphersuites = cases[i].suites;
	strcpy(msg, "(untouched)");
	cfg = (struct smtps_tls_config *) &ts;	/* must be overwritten */
	rc = smtps_tls_config_make(&ts, &cfg, msg, sizeof(msg));
	if (rc != cases[i].rc || (rc == SMTPS_OK) != (cfg != NULL)
	    || (cases[i].want ? strstr(msg, cases[i].want) == NULL : msg[0] != 0)
	    || ERR_peek_error() != 0) {
	    snprintf(why, WHY_MAX, "%s: rc %d, why \"%s\"", cases[i].label, rc,
		     msg);
	    smtps_tls_config_free(cfg);
	    goto out;
	}
	smtps_tls_config_free(cfg);
	/* A short buffer is cut, and still a string; none at all works too. */
	memset(tiny, 'x', sizeof(tiny));
	if (smtps_tls_config_make(&ts, &cfg, tiny, sizeof(tiny)) != rc
	    || memchr(tiny, 0, sizeof(tiny)) == NULL) {
	    snprintf(why, WHY_MAX, "%s: a short buffer overflows", cases[i].label);
	    smtps_tls_config_free(cfg);
	    goto out;
	}
	smtps_tls_config_free(cfg);
	if (smtps_tls_config_make(&ts, &cfg, NULL, 0) != rc) {
	    snprintf(why, WHY_MAX, "%s: no buffer, another result", cases[i].label);
	    smtps_tls_config_free(cfg);
	    goto out;
	}
	smtps_tls_config_free(cfg);
    }
    /* The ABI guard, and no settings at all. */
    ts = settings_of();
    ts.sizeof_settings = sizeof(size_t);
    if (smtps_tls_config_make(&ts, &cfg, msg, sizeof(msg)) != SMTPS_EINVAL
	|| cfg != NULL
	|| smtps_tls_config_make(NULL, &cfg, msg, sizeof(msg)) != SMTPS_EINVAL
	|| smtps_tls_config_make(&ts, NULL, msg, sizeof(msg)) != SMTPS_EINVAL) {
	snprintf(why, WHY_MAX, "bad settings were taken");
	goto out;
    }
    ok = 1;
out:
    unlink(path("1a2b3c4d.0"));
    return ok;
}

/* starttls_up - an opportunistic STARTTLS session on cfg until TLS is up */

static int starttls_up(struct smtps_tls_config *cfg)
{
    struct smtps_session *s = smtps_session_new(NULL, "client.example", NULL);
    struct server *sv = server_new();
    const char *data;
    int     ok;

    ok = s != NULL
	&& smtps_session_set_tls(s, SMTPS_TLS_OPPORTUNISTIC, cfg, "localhost")
	== SMTPS_OK && smtps_session_start(s, 0) == SMTPS_OK;
    if (ok) {
	smtps_session_feed(s, B("220 server.example\r\n"), 0);
	smtps_session_consume(s, smtps_session_output(s, &data), 0);
	smtps_session_feed(s, B("250-server.example\r\n250 STARTTLS\r\n"), 0);
	smtps_session_consume(s, smtps_session_output(s, &data), 0);
	smtps_session_feed(s, B("220 go\r\n"), 0);
	ok = pump(sv, s, 1 << 20) && smtps_session_tls_active(s);
    }
    smtps_session_free(s);
    server_free(sv);
    return ok;
}

/*
 * test_system_store_lazily - the system store is read by the first
 * handshake that verifies, not before: a policy made and used for
 * opportunistic TLS holds no CAs; CA files are read when it is made
 */

static int test_system_store_lazily(void)
{
    struct smtps_tls_config *cfg = smtps_tls_config_new(NULL, 0);
    SSL_CTX *ctx = server_ctx(0, NULL, NULL);
    struct smtps_session *s;
    struct server *sv;
    int     ok = 0;

    if (cfg == NULL || smtps_tls_config_trusted(cfg)) {
	snprintf(why, WHY_MAX, "the system store was read with the policy");
	goto out;
    }
    if (!starttls_up(cfg) || smtps_tls_config_trusted(cfg)) {
	snprintf(why, WHY_MAX, "opportunistic TLS: %s",
		 smtps_tls_config_trusted(cfg) ? "read the system store" :
		 "did not come up");
	goto out;
    }
    /* Nobody vouches for the self-signed certificate: refused all the same. */
    s = handshake(ctx, cfg, "localhost", NULL, &sv);
    if (!done(s, sv, smtps_session_tls_active(s) == 0)
	|| !smtps_tls_config_trusted(cfg)) {
	snprintf(why, WHY_MAX, "verified TLS: %s", smtps_tls_config_trusted(cfg)
		 ? "the certificate was taken" : "no store was read");
	goto out;
    }
    why[0] = 0;
    smtps_tls_config_free(cfg);
    if ((cfg = smtps_tls_config_new(path("cert.pem"), 0)) == NULL
	|| !smtps_tls_config_trusted(cfg)) {
	snprintf(why, WHY_MAX, "a CA file was not read with the policy");
	goto out;
    }
    ok = 1;
out:
    smtps_tls_config_free(cfg);
    SSL_CTX_free(ctx);
    ERR_clear_error();
    return ok;
}

/*
 * client_cert - a server that requires a client certificate and trusts
 * cert2's: with cert2 and key2 the session is up and the server saw that
 * certificate; without one, the handshake fails
 */

static int client_cert(int version)
{
    struct smtps_tls_settings ts = settings_of();
    struct smtps_tls_config *with = NULL, *without;
    SSL_CTX *ctx = server_ctx(version, NULL, NULL);
    struct smtps_session *s;
    struct server *sv;
    X509   *peer;
    int     ok = 0, up;

    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
		       NULL);
    X509_STORE_add_cert(SSL_CTX_get_cert_store(ctx), cert2);
    ts.insecure_no_verify = 1;			/* the server's is self-signed */
    ts.cert_file = path("cert2.pem");
    ts.key_file = path("key2.pem");
    if (smtps_tls_config_make(&ts, &with, NULL, 0) != SMTPS_OK
	|| (without = smtps_tls_config_new(NULL, 1)) == NULL) {
	snprintf(why, WHY_MAX, "no policies");
	smtps_tls_config_free(with);
	SSL_CTX_free(ctx);
	return 0;
    }
    s = handshake(ctx, with, "localhost", NULL, &sv);
    peer = SSL_get1_peer_certificate(sv->ssl);
    up = why[0] == 0 && peer != NULL && X509_cmp(peer, cert2) == 0;
    X509_free(peer);
    if (!done(s, sv, up)) {
	if (why[0] == 0)
	    snprintf(why, WHY_MAX, "the server did not get the certificate");
	goto out;
    }
    /* TLS 1.3: the client is up before the server refuses; the EHLO fails. */
    s = handshake(ctx, without, "localhost", NULL, &sv);
    up = smtps_session_status(s) == SMTPS_SESS_IDLE;
    if (!done(s, sv, !up)) {
	snprintf(why, WHY_MAX, "no certificate, and still in");
	goto out;
    }
    why[0] = 0;
    ok = 1;
out:
    smtps_tls_config_free(with);
    smtps_tls_config_free(without);
    SSL_CTX_free(ctx);
    ERR_clear_error();
    return ok;
}

static int test_client_cert_tls12(void)
{
    return client_cert(TLS1_2_VERSION);
}

static int test_client_cert_tls13(void)
{
    return client_cert(TLS1_3_VERSION);
}

/* ------------------------------------------------------------------ */
/* Turns: a driver's gate before the handshake                         */
/* ------------------------------------------------------------------ */

static int gate_calls;

/* gate_wait - the driver's gate: not now */

static int gate_wait(struct smtps_session *s, void *closure)
{
    (void) s;
    (void) closure;
    gate_calls++;
    return 0;
}

/* waiting_at_220 - a STARTTLS session whose handshake waits for its turn */

static struct smtps_session *waiting_at_220(void)
{
    struct smtps_message *m;
    struct smtps_session *s = session(SMTPS_TLS_STARTTLS, 1);
    const char *data;
    char   *body;

    gate_calls = 0;
    if (smtps_session_set_tls_gate(s, gate_wait, NULL) != SMTPS_OK) {
	fprintf(stderr, "smtps_session_set_tls_gate failed\n");
	exit(2);
    }
    m = message(10, &body);
    free(body);
    smtps_session_submit(s, m, 1, 0);
    smtps_session_start(s, 0);
    smtps_session_feed(s, B("220 server.example\r\n"), 0);
    smtps_session_consume(s, smtps_session_output(s, &data), 0);
    smtps_session_feed(s, B("250-server.example\r\n250 STARTTLS\r\n"), 0);
    smtps_session_consume(s, smtps_session_output(s, &data), 0);
    smtps_session_feed(s, B("220 go ahead\r\n"), 0);
    return s;
}

/*
 * test_turn_waits - nothing leaves before the turn comes (no ClientHello,
 * no EHLO in clear); then the handshake and a delivery work
 */

static int test_turn_waits(void)
{
    struct smtps_session *s = waiting_at_220();
    struct server *sv = server_new();
    struct smtps_result *r;
    const char *data;
    size_t  from = 0;
    int     ok = 0;

    if (gate_calls != 1 || smtps_session_output(s, &data) != 0
	|| smtps_session_status(s) != SMTPS_SESS_ACTIVE
	|| !smtps_session_tls_in_handshake(s) || smtps_session_tls_active(s)) {
	snprintf(why, WHY_MAX, "while waiting: gate called %d times, %zu bytes "
		 "out, status %d", gate_calls, smtps_session_output(s, &data),
		 smtps_session_status(s));
	goto out;
    }
    if (smtps_session_tls_proceed(s, 0) != SMTPS_OK
	|| smtps_session_output(s, &data) == 0 || data[0] != 0x16
	|| smtps_session_tls_proceed(s, 0) != SMTPS_ESTATE) {
	snprintf(why, WHY_MAX, "no ClientHello when the turn came");
	goto out;
    }
    if (!pump(sv, s, 50) || !smtps_session_tls_active(s)
	|| smtps_session_tls_in_handshake(s) || gate_calls != 1
	|| !expect_plain(sv, &from, B("EHLO client.example\r\n"))
	|| !server_say(sv, s, "250 server.example\r\n") || !pump(sv, s, 1000)
	|| !expect_plain(sv, &from, B("MAIL FROM:<a@client.example>\r\n"))
	|| !server_say(sv, s, "250 ok\r\n") || !pump(sv, s, 1000)
	|| !expect_plain(sv, &from, B("RCPT TO:<b@server.example>\r\n"))
	|| !server_say(sv, s, "250 ok\r\n") || !pump(sv, s, 1000)
	|| !expect_plain(sv, &from, B("DATA\r\n"))
	|| !server_say(sv, s, "354 go\r\n") || !pump(sv, s, 1000)) {
	if (why[0] == 0)
	    snprintf(why, WHY_MAX, "after the turn: %s", smtps_session_reason(s));
	goto out;
    }
    if (!server_say(sv, s, "250 2.0.0 queued\r\n")
	|| (r = smtps_session_next_result(s)) == NULL) {
	snprintf(why, WHY_MAX, "no result");
	goto out;
    }
    ok = r->status == SMTPS_STATUS_DELIVERED;
    if (!ok)
	snprintf(why, WHY_MAX, "not delivered: %s", r->reason);
    smtps_result_free(r);
out:
    smtps_session_free(s);
    server_free(sv);
    return ok;
}

/* test_turn_data_refused - the server speaks while we wait: clear text */

static int test_turn_data_refused(void)
{
    struct smtps_session *s = waiting_at_220();
    const char *data;
    int     ok;

    ok = smtps_session_feed(s, B("250 injected\r\n"), 0) == SMTPS_EPROTO
	&& smtps_session_status(s) == SMTPS_SESS_CLOSING
	&& smtps_session_output(s, &data) == 0
	&& !smtps_session_tls_in_handshake(s)
	&& smtps_session_tls_proceed(s, 0) == SMTPS_ESTATE
	&& !smtps_tls_handshake_failed(s)
	&& one_result(s, SMTPS_STATUS_TEMPFAIL, "before the TLS handshake "
		      "began", SMTPS_STAGE_TLS_HANDSHAKE);
    smtps_session_free(s);
    return ok;
}

/*
 * test_turn_lost - the connection ends while the handshake waits: said
 * so, and not a failed handshake (opportunistic TLS would go in clear)
 */

static int test_turn_lost(void)
{
    struct smtps_session *s = waiting_at_220();
    int     ok;

    smtps_session_closed(s, "the server closed the connection", 0);
    ok = !smtps_tls_handshake_failed(s) && !smtps_session_tls_in_handshake(s)
	&& smtps_session_tls_proceed(s, 0) == SMTPS_ESTATE
	&& one_result(s, SMTPS_STATUS_TEMPFAIL, "during the TLS handshake",
		      SMTPS_STAGE_TLS_HANDSHAKE);
    smtps_session_free(s);
    return ok;
}

/*
 * turn_resumes - a handshake that waited for its turn offers what a
 * handshake that ended meanwhile put in the slot (which was empty when
 * the waiting one began)
 */

static int turn_resumes(int version)
{
    struct smtps_tls_config *cfg = smtps_tls_config_new(NULL, 1);
    struct smtps_tls_resume slot = {0};
    SSL_CTX *ctx = server_ctx(version, NULL, NULL);
    struct smtps_session *s, *waiting;
    struct server *sv, *sv2;
    const char *data;
    int     ok = 0;

    waiting = smtps_session_new(NULL, "client.example", NULL);
    SSL_CTX_up_ref(ctx);
    sv2 = server_on(ctx);
    if (waiting == NULL
	|| smtps_session_set_tls(waiting, SMTPS_TLS_IMPLICIT, cfg, "localhost")
	|| smtps_session_set_tls_resume(waiting, &slot)
	|| smtps_session_set_tls_gate(waiting, gate_wait, NULL)
	|| smtps_session_start(waiting, 0) != SMTPS_OK
	|| smtps_session_output(waiting, &data) != 0) {
	snprintf(why, WHY_MAX, "the implicit handshake did not wait");
	goto out;
    }
    s = handshake(ctx, cfg, "localhost", &slot, &sv);
    if (!done(s, sv, why[0] == 0 && resumed(s, sv, 0)) || slot.sess == NULL) {
	if (why[0] == 0)
	    snprintf(why, WHY_MAX, "nothing kept after the first handshake");
	goto out;
    }
    if (smtps_session_tls_proceed(waiting, 0) != SMTPS_OK
	|| !pump(sv2, waiting, 100) || !smtps_session_tls_active(waiting)) {
	snprintf(why, WHY_MAX, "no handshake in turn: %s",
		 smtps_session_reason(waiting));
	goto out;
    }
    ok = resumed(waiting, sv2, 1);
out:
    smtps_session_free(waiting);
    server_free(sv2);
    smtps_tls_resume_clear(&slot);
    smtps_tls_config_free(cfg);
    SSL_CTX_free(ctx);
    return ok;
}

static int test_turn_resumes_tls12(void)
{
    return turn_resumes(TLS1_2_VERSION);
}

static int test_turn_resumes_tls13(void)
{
    return turn_resumes(TLS1_3_VERSION);
}

int     main(void)
{
    static const struct {
	const char *label;
	int     (*fn) (void);
    }       tests[] = {
	{"base64 vectors", test_base64_vectors},
	{"base64 refusals", test_base64_refusals},
	{"implicit TLS delivery", test_implicit_delivery},
	{"STARTTLS delivery", test_starttls_delivery},
	{"self-signed refused", test_self_signed_refused},
	{"garbage after 220", test_garbage_after_220},
	{"injection refused", test_injection_refused},
	{"free mid-handshake", test_free_mid_handshake},
	{"a handshake waits for its turn", test_turn_waits},
	{"data while waiting for the turn refused", test_turn_data_refused},
	{"connection lost while waiting for the turn", test_turn_lost},
	{"a handshake in turn resumes, TLS 1.2", test_turn_resumes_tls12},
	{"a handshake in turn resumes, TLS 1.3", test_turn_resumes_tls13},
	{"resumption TLS 1.2", test_resumption_tls12},
	{"resumption TLS 1.3", test_resumption_tls13},
	{"resumption refused, then verification fails",
	test_resumption_refused_then_verify_fails},
	{"settings checked when the policy is made", test_settings},
	{"system store read by the first verifying handshake",
	test_system_store_lazily},
	{"client certificate, TLS 1.2", test_client_cert_tls12},
	{"client certificate, TLS 1.3", test_client_cert_tls13},
    };
    size_t  i;
    int     passed = 0, failed = 0;

    for (i = 0; i < sizeof(tests) / sizeof(tests[0]); i++) {
	printf("RUN %s\n", tests[i].label);
	why[0] = 0;
	if (tests[i].fn()) {
	    printf("PASS %s\n", tests[i].label);
	    passed++;
	} else {
	    printf("FAIL %s: %s\n", tests[i].label, why);
	    failed++;
	}
    }
    remove_files();
    X509_free(cert);
    EVP_PKEY_free(key);
    X509_free(cert2);
    EVP_PKEY_free(key2);
    printf("%d passed, %d failed\n", passed, failed);
    return (failed ? 1 : 0);
}
