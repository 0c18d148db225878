/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	auth.c 3
 * SUMMARY
 *	the AUTH state (RFC 4954): PLAIN, LOGIN, CRAM-MD5, XOAUTH2
 * SYNOPSIS
 *	#include "internal.h"
 *
 *	int	smtps_auth_init_local(s, closure, &local)
 *	int	smtps_auth_setup(s, closure)
 *	int	smtps_auth_callback(s, reply, closure)
 *	void	smtps_auth_free(s, local, closure)
 *	size_t	smtps_base64_encode(in, len, out, cap)
 *	int	smtps_base64_decode(in, len, out, cap, &outlen)
 * DESCRIPTION
 *	The built-in AUTH state, written as any state of a caller's would
 *	be: it keeps its dialogue in per-connection data made by its
 *	init_local_state and released by its free, and it speaks to the
 *	session only through functions. The credentials are the session's
 *	(smtps_session_set_auth(), session_info.c): read here, wiped there.
 *
 *	Without credentials it passes through. With them it refuses to go on
 *	(the connection fails, nothing is sent but QUIT) when TLS is not
 *	active and plaintext was not allowed, when the server offers no AUTH,
 *	or none of the allowed mechanisms.
 *
 *	The mechanism is the first of SMTPS_AUTH_MECHS (smtpstate.h: CRAM-MD5,
 *	PLAIN, LOGIN, XOAUTH2) that both sides allow; by default
 *	(SMTPS_AUTH_ANY) the caller allows the first three: XOAUTH2 takes a
 *	token, not a password, so it is used only when asked for.
 *
 *	Setup sends; the callback reads. The first setup sends the AUTH
 *	command (PLAIN and XOAUTH2 with their initial response, RFC 4954 4);
 *	each 334 challenge makes the callback compute the answer and return
 *	RETRY, so that setup runs again and sends it, awaiting the next
 *	reply. A challenge the mechanism does not expect is cancelled with
 *	"*". 235 goes on. A 5xx refusal fails the connection permanently:
 *	every message gets a permanent failure ("authentication failed: 535
 *	..."), since the same credentials will be refused again; a 4xx one
 *	temporarily.
 *
 *	Secrets: each response is built in a buffer wiped right after it is
 *	queued (with smtps_session_queue_secret(), which keeps it out of the
 *	transcript); the output buffer is wiped by the session. No reason
 *	text ever contains them.
 * DIAGNOSTICS
 *	smtps_base64_decode(): SMTPS_EINVAL (not base64), SMTPS_ETOOBIG.
 * SEE ALSO
 *	RFC 4954 (AUTH), RFC 4616 (PLAIN), RFC 2195 (CRAM-MD5), RFC 4648
 *	(base64), Google's XOAUTH2 protocol; states.c, session_info.c.
 *--*/

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "internal.h"

#define AUTH_CHALLENGE_MAX 1024		/* decoded CRAM-MD5 challenge */
#define AUTH_DEFAULT (SMTPS_AUTH_PLAIN | SMTPS_AUTH_LOGIN | SMTPS_AUTH_CRAM_MD5)

/* The AUTH state's per-connection data: where the dialogue stands. */
struct auth_local {
    unsigned mech;			/* chosen */
    int     step;			/* challenges answered */
    int     verdict;			/* setup sent nothing: the callback's action */
    int     cancelled;			/* we answered "*" */
    char   *resp;			/* the next response line, CRLF included */
    size_t  resp_len;
    size_t  resp_cap;			/* bytes allocated, all wiped */
};

/* The mechanisms, best first (smtpstate.h's list is in that order). */
#define SMTPS_X_MECH_ROW(n, b, s) {SMTPS_AUTH_##n, s},
static const struct auth_mech {
    unsigned bit;
    const char *name;
} auth_mechs[] = {
    SMTPS_AUTH_MECHS(SMTPS_X_MECH_ROW)
};
#undef SMTPS_X_MECH_ROW

#define AUTH_NMECHS (sizeof(auth_mechs) / sizeof(auth_mechs[0]))

static void wipe_free(char *p, size_t len);
static void drop_resp(struct auth_local *a);
static const char *mech_name(unsigned bit);
static void mech_list(char *out, size_t cap, unsigned bits);
static int refuse(struct smtps_session *s, struct auth_local *a,
		  const char *why);
static int make_line(struct auth_local *a, const char *prefix,
		     const unsigned char *payload, size_t len);
static int first_line(const struct smtps_credentials *c,
		      struct auth_local *a);
static int answer(const struct smtps_credentials *c, struct auth_local *a,
		  const struct smtps_reply *r);
static int cram_md5(const struct smtps_credentials *c, struct auth_local *a,
		    const struct smtps_reply *r);
static int b64_value(int c);

/* ------------------------------------------------------------------ */
/* base64 (RFC 4648 4), bounded                                        */
/* ------------------------------------------------------------------ */

/* smtps_base64_encode - encode; length written, 0 when cap is too small */

size_t  smtps_base64_encode(const unsigned char *in, size_t len, char *out,
			            size_t cap)
{
    static const char alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t  i, n = 0;
    unsigned v;

    if (len > (SIZE_MAX - 1) / 4 * 3 - 3 || cap < (len + 2) / 3 * 4 + 1)
	return 0;
    for (i = 0; i + 2 < len; i += 3) {
	v = (unsigned) in[i] << 16 | (unsigned) in[i + 1] << 8 | in[i + 2];
	out[n++] = alphabet[v >> 18 & 63];
	out[n++] = alphabet[v >> 12 & 63];
	out[n++] = alphabet[v >> 6 & 63];
	out[n++] = alphabet[v & 63];
    }
    if (i < len) {
	v = (unsigned) in[i] << 16 | (i + 1 < len ? (unsigned) in[i + 1] << 8 : 0);
	out[n++] = alphabet[v >> 18 & 63];
	out[n++] = alphabet[v >> 12 & 63];
	out[n++] = i + 1 < len ? alphabet[v >> 6 & 63] : '=';
	out[n++] = '=';
    }
    out[n] = 0;
    return n;
}

/* b64_value - the 6-bit value of a base64 character, -1 if none */

static int b64_value(int c)
{
    if (c >= 'A' && c <= 'Z')
	return c - 'A';
    if (c >= 'a' && c <= 'z')
	return c - 'a' + 26;
    if (c >= '0' && c <= '9')
	return c - '0' + 52;
    if (c == '+')
	return 62;
    if (c == '/')
	return 63;
    return -1;
}

/* smtps_base64_decode - strict decode: padded, no spaces, bounded */

int     smtps_base64_decode(const char *in, size_t len, unsigned char *out,
			            size_t cap, size_t *outlen)
{
    size_t  i, n = 0, pad = 0;
    int     k, v[4];

    *outlen = 0;
    if (len % 4 != 0)
	return SMTPS_EINVAL;
    if (len >= 1 && in[len - 1] == '=')
	pad = len >= 2 && in[len - 2] == '=' ? 2 : 1;
    if (len / 4 * 3 - pad > cap)
	return SMTPS_ETOOBIG;
    for (i = 0; i < len; i += 4) {
	for (k = 0; k < 4; k++) {
	    /* '=' only as the padding of the last group */
	    if (in[i + k] == '=' && i + 4 == len && k >= 4 - (int) pad)
		v[k] = 0;
	    else if ((v[k] = b64_value((unsigned char) in[i + k])) < 0)
		return SMTPS_EINVAL;
	}
	out[n++] = (unsigned char) (v[0] << 2 | v[1] >> 4);
	if (i + 4 < len || pad < 2)
	    out[n++] = (unsigned char) ((v[1] & 15) << 4 | v[2] >> 2);
	if (i + 4 < len || pad < 1)
	    out[n++] = (unsigned char) ((v[2] & 3) << 6 | v[3]);
    }
    *outlen = n;
    return SMTPS_OK;
}

/* ------------------------------------------------------------------ */
/* Credentials                                                         */
/* ------------------------------------------------------------------ */

/* wipe_free - wipe, then free */

static void wipe_free(char *p, size_t len)
{
    if (p == NULL)
	return;
    smtps_wipe(p, len);
    free(p);
}

/* drop_resp - forget the pending response, wiping it */

static void drop_resp(struct auth_local *a)
{
    wipe_free(a->resp, a->resp_cap);
    a->resp = NULL;
    a->resp_len = a->resp_cap = 0;
}

/* ------------------------------------------------------------------ */
/* The state                                                           */
/* ------------------------------------------------------------------ */

/* mech_name - the name of one SMTPS_AUTH_* bit */

static const char *mech_name(unsigned bit)
{
    size_t  i;

    for (i = 0; i < AUTH_NMECHS; i++)
	if (auth_mechs[i].bit == bit)
	    return auth_mechs[i].name;
    return "?";
}

/* mech_list - "PLAIN LOGIN" for a set of bits, "none" for none */

static void mech_list(char *out, size_t cap, unsigned bits)
{
    size_t  i, n = 0;

    out[0] = 0;
    for (i = 0; i < AUTH_NMECHS; i++)
	if ((bits & auth_mechs[i].bit) && n < cap)
	    n += (size_t) snprintf(out + n, cap - n, "%s%s", n ? " " : "",
				   auth_mechs[i].name);
    if (n == 0)
	snprintf(out, cap, "none");
}

/* refuse - AUTH cannot happen here: the connection ends, with why */

static int refuse(struct smtps_session *s, struct auth_local *a,
		          const char *why)
{
    smtps_session_set_reason(s, why);
    a->verdict = SMTPS_ACT_FAIL_CONN;
    return 0;					/* nothing sent, no reply awaited */
}

/* make_line - a->resp = prefix + base64(payload) + CRLF */

static int make_line(struct auth_local *a, const char *prefix,
		             const unsigned char *payload, size_t len)
{
    size_t  plen = strlen(prefix), cap = plen + (len + 2) / 3 * 4 + 3, n;

    drop_resp(a);
    if ((a->resp = malloc(cap)) == NULL)
	return SMTPS_ENOMEM;
    a->resp_cap = cap;
    memcpy(a->resp, prefix, plen);
    n = plen;
    if (len > 0)
	n += smtps_base64_encode(payload, len, a->resp + n, cap - n);
    memcpy(a->resp + n, "\r\n", 2);
    a->resp_len = n + 2;
    return SMTPS_OK;
}

/* first_line - the AUTH command, with the initial response if any */

static int first_line(const struct smtps_credentials *c, struct auth_local *a)
{
    unsigned char *p;
    size_t  len, n;
    int     rc;

    switch (a->mech) {
    case SMTPS_AUTH_PLAIN:			/* RFC 4616: authzid NUL user NUL pass */
	len = c->user_len + c->secret_len + 2;
	if ((p = malloc(len)) == NULL)
	    return SMTPS_ENOMEM;
	p[0] = 0;
	memcpy(p + 1, c->user, c->user_len);
	p[1 + c->user_len] = 0;
	memcpy(p + 2 + c->user_len, c->secret, c->secret_len);
	rc = make_line(a, "AUTH PLAIN ", p, len);
	wipe_free((char *) p, len);
	return rc;
    case SMTPS_AUTH_XOAUTH2:			/* user=U ^A auth=Bearer T ^A ^A */
	len = c->user_len + c->secret_len + sizeof("user=\1auth=Bearer \1\1") - 1;
	if ((p = malloc(len + 1)) == NULL)
	    return SMTPS_ENOMEM;
	n = (size_t) snprintf((char *) p, len + 1, "user=%s\1auth=Bearer %s\1\1",
			      c->user, c->secret);
	rc = n == len ? make_line(a, "AUTH XOAUTH2 ", p, len) : SMTPS_EINVAL;
	wipe_free((char *) p, len + 1);
	return rc;
    case SMTPS_AUTH_LOGIN:
	return make_line(a, "AUTH LOGIN", NULL, 0);
    case SMTPS_AUTH_CRAM_MD5:
	return make_line(a, "AUTH CRAM-MD5", NULL, 0);
    default:
	return SMTPS_EINVAL;
    }
}

/*
 * smtps_auth_init_local - the dialogue's record, once per connection that
 * has credentials (without them the state only passes through)
 */

int     smtps_auth_init_local(struct smtps_session *s, void *closure,
			              void **local)
{
    SMTPS_UNUSED(closure);
    if (smtps_session_credentials(s) == NULL)
	return SMTPS_OK;
    if ((*local = calloc(1, sizeof(struct auth_local))) == NULL)
	return SMTPS_ENOMEM;
    return SMTPS_OK;
}

/* smtps_auth_free - wipe and release the dialogue's record */

void    smtps_auth_free(struct smtps_session *s, void *local, void *closure)
{
    struct auth_local *a = local;

    SMTPS_UNUSED(s);
    SMTPS_UNUSED(closure);
    if (a == NULL)
	return;
    drop_resp(a);
    smtps_wipe(a, sizeof(*a));
    free(a);
}

/* smtps_auth_setup - send the AUTH command, or the answer to a challenge */

int     smtps_auth_setup(struct smtps_session *s, void *closure)
{
    const struct smtps_credentials *c = smtps_session_credentials(s);
    struct auth_local *a = smtps_session_local(s, SMTPS_STATE_AUTH);
    const struct smtps_caps *caps = smtps_session_caps(s);
    char    why[SMTPS_REASON_MAX], offered[64], allowed[64];
    unsigned usable;
    size_t  i;
    int     rc;

    SMTPS_UNUSED(closure);
    if (c == NULL || a == NULL)
	return 0;				/* no credentials: pass through */
    if (a->step == 0) {
	a->verdict = 0;
	a->cancelled = 0;
	if (!smtps_session_tls_active(s) && !c->allow_plaintext)
	    return refuse(s, a, "refusing to send AUTH credentials in clear: "
			  "TLS is not active and plaintext AUTH is not "
			  "allowed");
	if (!(caps->ext & SMTPS_EXT_AUTH))
	    return refuse(s, a, "AUTH credentials are configured but the "
			  "server does not offer AUTH");
	usable = (c->mechs ? c->mechs : AUTH_DEFAULT) & caps->auth;
	if (usable == 0) {
	    mech_list(offered, sizeof(offered), caps->auth);
	    mech_list(allowed, sizeof(allowed), c->mechs ? c->mechs :
		      AUTH_DEFAULT);
	    snprintf(why, sizeof(why), "no AUTH mechanism in common "
		     "(the server offers: %s; allowed: %s)", offered, allowed);
	    return refuse(s, a, why);
	}
	for (i = 0; i < AUTH_NMECHS; i++)
	    if (usable & auth_mechs[i].bit) {
		a->mech = auth_mechs[i].bit;
		break;
	    }
	if ((rc = first_line(c, a)) != SMTPS_OK)
	    return rc;
    }
    if (a->resp == NULL)
	return SMTPS_EINVAL;			/* a challenge left no answer */
    rc = smtps_session_queue_secret(s, a->resp, a->resp_len);
    drop_resp(a);
    return rc == SMTPS_OK ? 1 : rc;
}

/* cram_md5 - RFC 2195: user SP hex(HMAC-MD5(secret, challenge)) */

static int cram_md5(const struct smtps_credentials *c, struct auth_local *a,
		            const struct smtps_reply *r)
{
    static const char hex[] = "0123456789abcdef";
    unsigned char challenge[AUTH_CHALLENGE_MAX], digest[EVP_MAX_MD_SIZE];
    unsigned int dlen = 0, i;
    size_t  clen, tlen, len;
    char   *p;
    int     rc;

    /* The challenge is the first line's text, base64. */
    for (tlen = 0; tlen < r->text_len && r->text[tlen] != '\n'
	 && r->text[tlen] != ' '; tlen++)
	 /* void */ ;
    if (smtps_base64_decode(r->text, tlen, challenge, sizeof(challenge),
			    &clen) != SMTPS_OK)
	return SMTPS_EINVAL;
    if (HMAC(EVP_md5(), c->secret, (int) c->secret_len, challenge, clen,
	     digest, &dlen) == NULL || dlen != 16)
	return SMTPS_ENOTSUP;			/* no MD5 here (FIPS) */
    len = c->user_len + 1 + 2 * dlen;
    if ((p = malloc(len)) == NULL)
	return SMTPS_ENOMEM;
    memcpy(p, c->user, c->user_len);
    p[c->user_len] = ' ';
    for (i = 0; i < dlen; i++) {
	p[c->user_len + 1 + 2 * i] = hex[digest[i] >> 4];
	p[c->user_len + 2 + 2 * i] = hex[digest[i] & 15];
    }
    rc = make_line(a, "", (unsigned char *) p, len);
    wipe_free(p, len);
    smtps_wipe(digest, sizeof(digest));
    return rc;
}

/* answer - the response to the a->step'th challenge, or "*" to cancel */

static int answer(const struct smtps_credentials *c, struct auth_local *a,
		          const struct smtps_reply *r)
{
    int     rc = SMTPS_EINVAL;

    switch (a->mech) {
    case SMTPS_AUTH_LOGIN:			/* "Username:", then "Password:" */
	if (a->step == 0)
	    rc = make_line(a, "", (unsigned char *) c->user, c->user_len);
	else if (a->step == 1)
	    rc = make_line(a, "", (unsigned char *) c->secret, c->secret_len);
	break;
    case SMTPS_AUTH_CRAM_MD5:
	if (a->step == 0)
	    rc = cram_md5(c, a, r);
	break;
    case SMTPS_AUTH_XOAUTH2:			/* an error in JSON: answer empty */
	if (a->step == 0)
	    rc = make_line(a, "", NULL, 0);
	break;
    default:					/* PLAIN sent it all at once */
	break;
    }
    if (rc == SMTPS_ENOMEM)
	return rc;
    if (rc != SMTPS_OK) {			/* RFC 4954 4: cancel with "*" */
	a->cancelled = 1;
	rc = make_line(a, "*", NULL, 0);
    }
    return rc;
}

/* smtps_auth_callback - 235 goes on; 334 is answered; the rest fails */

int     smtps_auth_callback(struct smtps_session *s,
			            const struct smtps_reply *r, void *closure)
{
    const struct smtps_credentials *c = smtps_session_credentials(s);
    struct auth_local *a = smtps_session_local(s, SMTPS_STATE_AUTH);
    char    why[SMTPS_REASON_MAX];
    size_t  tlen;

    SMTPS_UNUSED(closure);
    if (r == NULL)				/* setup sent nothing */
	return a != NULL && a->verdict ? a->verdict : SMTPS_ACT_NEXT;
    if (c == NULL || a == NULL)			/* cannot be: setup awaited nothing */
	return SMTPS_ACT_FAIL_CONN;
    if (r->code >= 200 && r->code < 300 && !a->cancelled) {
	a->step = 0;
	return SMTPS_ACT_NEXT;			/* 235 (RFC 4954 6) */
    }
    if (r->code == 334 && !a->cancelled) {
	if (answer(c, a, r) != SMTPS_OK) {
	    smtps_session_set_reason(s, "authentication failed: out of memory");
	    return SMTPS_ACT_FAIL_CONN;
	}
	a->step++;
	return SMTPS_ACT_RETRY;			/* setup sends the answer */
    }
    a->step = 0;
    if (a->cancelled) {
	/* Our limitation, not a verdict on the credentials: temporary. */
	snprintf(why, sizeof(why), "authentication failed: the server sent "
		 "a %s challenge this client cannot answer", mech_name(a->mech));
	smtps_session_set_reason(s, why);
	return SMTPS_ACT_TEMPFAIL_TX;		/* no transaction: ends the connection */
    }
    for (tlen = 0; tlen < r->text_len && r->text[tlen] != '\n'; tlen++)
	 /* void */ ;
    if (tlen > 300)
	tlen = 300;
    snprintf(why, sizeof(why), r->code >= 400 ?
	     "authentication failed: %d %.*s (mechanism %s)" :
	     "unexpected reply %d to AUTH: %.*s (mechanism %s)",
	     r->code, (int) tlen, r->text, mech_name(a->mech));
    smtps_session_set_reason(s, why);

    /*
     * With a reply of 500 or more the loop makes this a permanent failure
     * of every queued message: the same credentials would be refused again.
     */
    return SMTPS_ACT_FAIL_CONN;
}
