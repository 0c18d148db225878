/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	states.c 3
 * SUMMARY
 *	the built-in states of the SMTP client (RFC 5321), and of LMTP (RFC 2033)
 * SYNOPSIS
 *	#include "session_private.h"
 *
 *	const smtp_state *smtps_builtin_state(id)
 *	int64_t	smtps_builtin_timeout(id)
 * DESCRIPTION
 *	One setup/callback pair per state, in protocol order. A setup
 *	queues the state's command and says how many replies it awaits; a
 *	callback reads one reply and returns an enum smtps_action.
 *
 *	The table of records is made from SMTPS_BUILTIN_STATES (smtpstate.h),
 *	the same list that makes the ids: each row names its functions
 *	(smtps_<prefix>_setup, ...), so a state missing from either side does
 *	not compile. The row's stages and timeout go with the record (its
 *	closure points at them), so one stage function serves every state.
 *
 *	Recipients and the end of data report through the failure funnel
 *	(transaction.c): an RCPT reply with smtps_tx_rcpt_reply(), the final
 *	reply with smtps_tx_settle().
 *
 *	BANNER	reads the greeting; 554 means QUIT only (RFC 5321 3.1).
 *	EHLO	EHLO, then HELO if EHLO is refused (RFC 5321 4.1.4). After
 *		STARTTLS it runs again and then jumps past STARTTLS. An LMTP
 *		session sends LHLO instead and has no fallback: LMTP has no
 *		HELO (RFC 2033 4.1), so a refused LHLO ends the connection.
 *	STARTTLS
 *		passes through unless the session asked for TLS (RFC 3207).
 *		On 220 it starts the handshake (tls.c) and jumps back to
 *		EHLO: what was learned in clear is forgotten. Required TLS
 *		that is not offered or is refused ends the connection with
 *		only QUIT sent in clear; opportunistic TLS goes on in clear.
 *	AUTH	RFC 4954, in auth.c, with per-connection data of its own;
 *		passes through without credentials.
 *	MAIL	MAIL FROM with SIZE (RFC 1870: the octets sent, without the
 *		quoting dots), BODY=8BITMIME, SMTPUTF8, REQUIRETLS, RET,
 *		ENVID as offered and needed; refuses up front what the server
 *		cannot take (too large, 8-bit or UTF-8 without the extension)
 *		and a message that requires TLS (RFC 8689) on a connection
 *		that cannot carry it: no TLS, TLS that did not authenticate
 *		the server, or no REQUIRETLS in the EHLO reply after TLS.
 *		Such a refusal sends nothing, so no transaction is open.
 *	RCPT	one RCPT TO per recipient with NOTIFY and ORCPT (RFC 3461);
 *		with PIPELINING a batch at once, else one per round trip. A
 *		1xx or 3xx reply is a protocol error.
 *	DATA	DATA, awaiting 354; skipped when BDAT is used.
 *	BODY	the content, CRLF-normalised and dot-stuffed, streamed; or,
 *		for a body in memory, one BDAT ... LAST chunk under CHUNKING
 *		(RFC 3030; a body read as it is sent goes by DATA). It starts
 *		only after a 354 or under CHUNKING: a machine that reaches it
 *		any other way fails the message rather than send its text
 *		as commands. Under LMTP the end of data is answered once per
 *		recipient accepted at RCPT (RFC 2033 4.2, RFC 3030 for BDAT
 *		LAST): BODY awaits that many replies and hands each to
 *		smtps_tx_lmtp_reply(), which settles that recipient.
 *	RSET	only when a failed transaction is open and a message follows.
 *	QUIT	QUIT, then the session closes.
 * SEE ALSO
 *	session.c, the loop that calls these.
 *--*/

#include <stdio.h>
#include <string.h>

#include "session_private.h"

struct builtin_info {
    int     stage_awaiting;		/* while its replies are awaited */
    int     stage_done;			/* after them */
    int64_t timeout;			/* default reply deadline, ms */
};

static int builtin_stage(struct smtps_session *, int, void *);
static size_t xtext(char *out, size_t cap, const char *in);
static size_t utf8_xtext(char *out, size_t cap, const char *in);
static size_t rcpt_line(const struct smtps_session *, size_t, char *, size_t);
static int protocol_error(struct smtps_session *, const struct smtps_reply *,
			  const char *what);
static const char *greeting(const struct smtps_session *);
static int lmtp_end_reply(struct smtps_session *, const struct smtps_reply *);
static int requiretls_refuse(struct smtps_session *);

/* Each state's stages and timeout, by id: its closure points here. */
#define SMTPS_X_INFO(n, f, l, sa, sd, tm, fl) \
    [SMTPS_STATE_##n] = {SMTPS_STAGE_##sa, SMTPS_STAGE_##sd, tm},
static const struct builtin_info builtin_info[SMTPS_STATE__COUNT] = {
    SMTPS_BUILTIN_STATES(SMTPS_X_INFO)
};
#undef SMTPS_X_INFO

/* Each protocol's greeting command, by value, from the one list. */
#define SMTPS_X_GREETING(n, v, s, g) [v] = g,
static const char *const greetings[SMTPS_PROTO__COUNT] = {
    SMTPS_PROTOCOLS(SMTPS_X_GREETING)
};
#undef SMTPS_X_GREETING

/* The records, one per row; per-connection data only where the row says. */
#define LOCAL_INIT_NOLOCAL(f) NULL
#define LOCAL_INIT_LOCAL(f) smtps_##f##_init_local
#define LOCAL_FREE_NOLOCAL(f) NULL
#define LOCAL_FREE_LOCAL(f) smtps_##f##_free
#define SMTPS_X_STATE(n, f, l, sa, sd, tm, fl) \
    [SMTPS_STATE_##n] = { sizeof(smtp_state), #n, SMTPS_STATE_##n, \
	LOCAL_INIT_##l(f), smtps_##f##_setup, smtps_##f##_callback, \
	LOCAL_FREE_##l(f), builtin_stage, NULL, NULL, \
	(void *) &builtin_info[SMTPS_STATE_##n], fl },
static const smtp_state builtins[SMTPS_STATE__COUNT] = {
    SMTPS_BUILTIN_STATES(SMTPS_X_STATE)
};
#undef SMTPS_X_STATE

/* smtps_builtin_state - the record of built-in state id */

const smtp_state *smtps_builtin_state(int id)
{
    return &builtins[id];
}

/* smtps_builtin_timeout - the default reply deadline of state id */

int64_t smtps_builtin_timeout(int id)
{
    return id >= 0 && id < SMTPS_STATE__COUNT ? builtin_info[id].timeout :
	SMTPS_TIMEOUT_OTHER;
}

/*
 * builtin_stage - the stage of a built-in state, from its row; BODY is
 * "sending message body" until the final dot is out, then "reading final
 * confirmation"
 */

static int builtin_stage(struct smtps_session *s, int awaiting, void *closure)
{
    const struct builtin_info *bi = closure;

    if (bi->stage_awaiting == SMTPS_STAGE_BODY)
	return awaiting && !(s->tx != NULL && smtps_tx_dot_sent(s, s->tx)) ?
	    SMTPS_STAGE_BODY : SMTPS_STAGE_CONFIRM;
    return awaiting ? bi->stage_awaiting : bi->stage_done;
}

/* protocol_error - a reply that makes no sense here ends the connection */

static int protocol_error(struct smtps_session *s, const struct smtps_reply *r,
			          const char *what)
{
    char    why[SMTPS_REASON_MAX];

    snprintf(why, sizeof(why), "unexpected reply %d to %s", r->code, what);
    smtps_session_set_reason(s, why);
    return SMTPS_ACT_FAIL_CONN;
}

/* smtps_banner_setup - nothing to send: the server speaks first */

int     smtps_banner_setup(struct smtps_session *s, void *closure)
{
    SMTPS_UNUSED(s);
    SMTPS_UNUSED(closure);
    return 1;
}

/* smtps_banner_callback - 220 goes on; anything else ends the connection */

int     smtps_banner_callback(struct smtps_session *s,
			           const struct smtps_reply *r, void *closure)
{
    SMTPS_UNUSED(closure);
    if (r->code == 220)
	return SMTPS_ACT_NEXT;
    if (r->code == 554)
	smtps_session_set_reason(s, "the server refuses service (554 greeting)");
    else if (r->code != 421)
	return protocol_error(s, r, "the greeting");
    return SMTPS_ACT_FAIL_CONN;
}

/* greeting - the command that greets: EHLO, LHLO (LMTP), or HELO */

static const char *greeting(const struct smtps_session *s)
{
    return s->use_helo ? "HELO" : greetings[s->protocol];
}

/* smtps_ehlo_setup - EHLO (LHLO under LMTP), or HELO once EHLO was refused */

int     smtps_ehlo_setup(struct smtps_session *s, void *closure)
{
    char    line[SMTPS_HELO_MAX + 8];
    int     n, rc;

    SMTPS_UNUSED(closure);
    n = snprintf(line, sizeof(line), "%s %s", greeting(s), s->helo);
    if ((rc = smtps_session_send_line(s, line, (size_t) n)) != SMTPS_OK)
	return rc;
    return 1;
}

/*
 * smtps_ehlo_callback - learn the extensions (from LHLO's reply as from
 * EHLO's), or fall back to HELO (SMTP only)
 */

int     smtps_ehlo_callback(struct smtps_session *s, const struct smtps_reply *r,
			         void *closure)
{
    char    why[64];

    SMTPS_UNUSED(closure);
    if (r->code >= 200 && r->code < 300) {
	memset(&s->caps, 0, sizeof(s->caps));
	if (!s->use_helo)
	    (void) smtps_caps_parse(r, &s->caps);
	s->pipelining = (s->caps.ext & SMTPS_EXT_PIPELINING) != 0;
	/* The EHLO after STARTTLS: on past STARTTLS, never into it again. */
	if (s->tls_reehlo) {
	    s->tls_reehlo = 0;
	    s->forced_next = s->order->next[SMTPS_STATE_STARTTLS];
	    return s->forced_next >= 0 ? SMTPS_ACT_JUMP : SMTPS_ACT_NEXT;
	}
	return SMTPS_ACT_NEXT;
    }
    /* LMTP has no HELO (RFC 2033 4.1): a refused LHLO is the end. */
    if (r->code >= 500 && !s->use_helo && s->protocol != SMTPS_PROTO_LMTP) {
	s->use_helo = 1;			/* an RFC 821 server */
	return SMTPS_ACT_RETRY;
    }
    if (r->code < 400)
	return protocol_error(s, r, greeting(s));
    snprintf(why, sizeof(why), "the server refused %s", greeting(s));
    smtps_session_set_reason(s, why);
    return SMTPS_ACT_FAIL_CONN;
}

/* smtps_starttls_setup - STARTTLS when the session wants TLS and it is offered */

int     smtps_starttls_setup(struct smtps_session *s, void *closure)
{
    int     mode = smtps_tls_mode(s), rc;

    SMTPS_UNUSED(closure);
    /* Not wanted, implicit, or already begun: nothing to do. */
    if (mode == SMTPS_TLS_NONE || mode == SMTPS_TLS_IMPLICIT
	|| smtps_tls_engaged(s))
	return 0;
    if (!(s->caps.ext & SMTPS_EXT_STARTTLS)) {
	smtps_tls_note_refusal(s, SMTPS_TLSO_NOT_OFFERED);
	return 0;				/* the callback decides */
    }
    if ((rc = smtps_session_send_line(s, "STARTTLS", 8)) != SMTPS_OK)
	return rc;
    return 1;
}

/* smtps_starttls_callback - 220 starts the handshake; a refusal may be fatal */

int     smtps_starttls_callback(struct smtps_session *s,
			             const struct smtps_reply *r, void *closure)
{
    char    why[SMTPS_REASON_MAX];
    int     mode = smtps_tls_mode(s);
    size_t  tlen;

    SMTPS_UNUSED(closure);
    if (r == NULL) {
	if (mode != SMTPS_TLS_STARTTLS || smtps_tls_engaged(s))
	    return SMTPS_ACT_NEXT;
	/*
	 * Required and not offered (or stripped by someone in the middle):
	 * nothing more goes out in clear but QUIT. TEMPFAIL_TX with no
	 * transaction open ends the connection, every message tempfailed.
	 */
	smtps_session_set_reason(s, "TLS is required, but the server does "
				 "not offer STARTTLS");
	s->fail_state = SMTPS_STATE_STARTTLS;
	s->fail_stage = SMTPS_STAGE_STARTTLS;
	return SMTPS_ACT_TEMPFAIL_TX;
    }
    if (r->code == 220) {
	if (smtps_tls_begin(s) != SMTPS_OK)
	    return SMTPS_ACT_FAIL_CONN;		/* already failed, with why */
	s->tls_reehlo = 1;			/* RFC 3207 4.2: EHLO again */
	s->forced_next = SMTPS_STATE_EHLO;
	return SMTPS_ACT_JUMP;
    }
    if (r->code < 400)
	return protocol_error(s, r, "STARTTLS");
    smtps_tls_note_refusal(s, SMTPS_TLSO_REFUSED);
    if (mode == SMTPS_TLS_OPPORTUNISTIC)
	return SMTPS_ACT_NEXT;			/* refused: on in clear */
    for (tlen = 0; tlen < r->text_len && r->text[tlen] != '\n'; tlen++)
	 /* void */ ;
    if (tlen > 300)
	tlen = 300;
    snprintf(why, sizeof(why), "TLS is required, but the server refused "
	     "STARTTLS: %d %.*s", r->code, (int) tlen, r->text);
    smtps_session_set_reason(s, why);
    s->fail_state = SMTPS_STATE_STARTTLS;
    s->fail_stage = SMTPS_STAGE_STARTTLS;
    return SMTPS_ACT_TEMPFAIL_TX;		/* even after a 5xx: not a verdict on mail */
}

/* xtext - RFC 3461 4 encoding of in; returns its length, 0 if no room */

static size_t xtext(char *out, size_t cap, const char *in)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t  n = 0;
    unsigned char c;

    for (; *in; in++) {
	c = (unsigned char) *in;
	if (n + 4 > cap)
	    return 0;
	if (c >= 33 && c <= 126 && c != '+' && c != '=') {
	    out[n++] = (char) c;
	} else {
	    out[n++] = '+';
	    out[n++] = hex[c >> 4];
	    out[n++] = hex[c & 15];
	}
    }
    out[n] = 0;
    return n;
}

/*
 * utf8_xtext - RFC 6533 3 utf-8-addr-xtext of a UTF-8 address: printable
 * ASCII as itself but for the plus, equals and backslash signs; any other
 * character as \x{HEX} (its code point, upper-case hex without leading
 * zeros, two digits at least). Returns the length, 0 if no room or not
 * UTF-8.
 */

static size_t utf8_xtext(char *out, size_t cap, const char *in)
{
    const unsigned char *p = (const unsigned char *) in;
    unsigned long cp;
    size_t  n = 0, need, k;
    int     w;

    for (; *p; p += need) {
	/* One code point; overlong forms and surrogates are refused. */
	if (*p < 0x80) {
	    cp = *p;
	    need = 1;
	} else if ((*p & 0xE0) == 0xC0 && *p >= 0xC2) {
	    cp = *p & 0x1Fu;
	    need = 2;
	} else if ((*p & 0xF0) == 0xE0) {
	    cp = *p & 0x0Fu;
	    need = 3;
	} else if ((*p & 0xF8) == 0xF0 && *p <= 0xF4) {
	    cp = *p & 0x07u;
	    need = 4;
	} else
	    return 0;
	for (k = 1; k < need; k++) {
	    if ((p[k] & 0xC0) != 0x80)
		return 0;
	    cp = (cp << 6) | (p[k] & 0x3Fu);
	}
	if ((need == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF)))
	    || (need == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
	    return 0;
	if (cp >= 0x21 && cp <= 0x7E && cp != '+' && cp != '=' && cp != '\\') {
	    if (n + 2 > cap)
		return 0;
	    out[n++] = (char) cp;
	    continue;
	}
	if (n + 11 > cap)			/* \x{10FFFF} and the NUL */
	    return 0;
	w = snprintf(out + n, cap - n, "\\x{%02lX}", cp);
	if (w < 0 || (size_t) w >= cap - n)
	    return 0;
	n += (size_t) w;
    }
    out[n] = 0;
    return n;
}

/*
 * requiretls_refuse - a message that requires TLS (RFC 8689) may go on
 * this connection only when TLS is up, authenticated the server (4.2.1:
 * a verified certificate, or DANE) and the EHLO after it offered
 * REQUIRETLS (the capabilities of the clear EHLO were forgotten at
 * STARTTLS). Otherwise nothing is sent for it: SMTPS_EINVAL, which fails
 * the message for good (5.7.30, section 5), with the first condition
 * that was missing as the reason. SMTPS_OK when it may go.
 *
 * XXX 4.2.1 also wants the MX records that led here DNSSEC-validated
 * (or an MTA-STS policy). A session knows neither: DANE records are only
 * given when they were (engine), but a certificate verified against an
 * MX host's name from unsigned DNS passes too (docs/tls.md says so).
 */

static int requiretls_refuse(struct smtps_session *s)
{
    const char *why;

    if (!smtps_session_tls_active(s))
	why = "the connection is not encrypted (no TLS)";
    else if (!smtps_tls_verified(s))
	why = "TLS not verified: the server was not authenticated (no "
	    "verified certificate, no DANE match)";
    else if (!(s->caps.ext & SMTPS_EXT_REQUIRETLS))
	why = "the server does not offer REQUIRETLS";
    else
	return SMTPS_OK;
    snprintf(s->state_reason, sizeof(s->state_reason), "5.7.30 REQUIRETLS "
	     "support required (RFC 8689): %s", why);
    return SMTPS_EINVAL;
}

/* smtps_mail_setup - MAIL FROM with the parameters the message needs */

int     smtps_mail_setup(struct smtps_session *s, void *closure)
{
    const struct smtps_message *m = s->tx->msg;
    unsigned ext = s->caps.ext;
    char    line[SMTPS_LINE_MAX], env[320], why[SMTPS_REASON_MAX];
    size_t  n;
    /* A source's size may be unknown: then SIZE says nothing. */
    int     sized = (ext & SMTPS_EXT_SIZE) && m->body_size >= 0;
    uint64_t size = sized ? (uint64_t) m->body_size : 0;

    SMTPS_UNUSED(closure);
    if (m->require_tls && requiretls_refuse(s) != SMTPS_OK)
	return SMTPS_EINVAL;
    if (sized && s->caps.size_max > 0 && size > s->caps.size_max) {
	snprintf(why, sizeof(why), "message of %llu bytes exceeds the server's "
		 "SIZE limit of %llu", (unsigned long long) size,
		 (unsigned long long) s->caps.size_max);
	smtps_session_set_reason(s, why);
	return SMTPS_ETOOBIG;
    }
    if (m->needs_smtputf8 && !(ext & SMTPS_EXT_SMTPUTF8)) {
	/* (Both say "needs SMTPUTF8": classify.c gives them 5.6.7.) */
	smtps_session_set_reason(s, m->want_smtputf8 ?
				 "the message needs SMTPUTF8 (asked for), "
				 "which the server does not offer" :
				 "a non-ASCII address needs SMTPUTF8, "
				 "which the server does not offer");
	return SMTPS_EINVAL;
    }
    if (m->is_8bit == 1 && !(ext & SMTPS_EXT_8BITMIME)) {
	smtps_session_set_reason(s, "8-bit content needs 8BITMIME, "
				 "which the server does not offer");
	return SMTPS_EINVAL;
    }
    /*
     * 8-bit content is declared; so is a source not read yet, when the
     * server takes 8-bit (declaring it for 7-bit content is harmless).
     */
    s->tx->eight_bit_ok = m->is_8bit == 1
	|| (m->is_8bit < 0 && (ext & SMTPS_EXT_8BITMIME));
    n = (size_t) snprintf(line, sizeof(line), "MAIL FROM:<%s>", m->sender);
    if (sized && n < sizeof(line))
	n += (size_t) snprintf(line + n, sizeof(line) - n, " SIZE=%llu",
			       (unsigned long long) size);
    if (s->tx->eight_bit_ok && n < sizeof(line))
	n += (size_t) snprintf(line + n, sizeof(line) - n, " BODY=8BITMIME");
    if (m->needs_smtputf8 && n < sizeof(line))
	n += (size_t) snprintf(line + n, sizeof(line) - n, " SMTPUTF8");
    if (m->require_tls && n < sizeof(line))	/* (checked above) */
	n += (size_t) snprintf(line + n, sizeof(line) - n, " REQUIRETLS");
    if ((ext & SMTPS_EXT_DSN) && m->dsn_ret != SMTPS_DSN_RET_NONE
	&& n < sizeof(line))
	n += (size_t) snprintf(line + n, sizeof(line) - n, " RET=%s",
			       m->dsn_ret == SMTPS_DSN_RET_FULL ? "FULL" : "HDRS");
    if ((ext & SMTPS_EXT_DSN) && m->envid != NULL && n < sizeof(line)
	&& xtext(env, sizeof(env), m->envid) > 0)
	n += (size_t) snprintf(line + n, sizeof(line) - n, " ENVID=%s", env);
    if (n >= sizeof(line))
	return SMTPS_ETOOBIG;
    return smtps_session_send_line(s, line, n) == SMTPS_OK ? 1 : SMTPS_ETOOBIG;
}

/* smtps_mail_callback - the sender is accepted or the transaction fails */

int     smtps_mail_callback(struct smtps_session *s, const struct smtps_reply *r,
			         void *closure)
{
    SMTPS_UNUSED(closure);
    if (r->code >= 300 && r->code < 400)
	return protocol_error(s, r, "MAIL FROM");
    return smtps_action_for_code(r->code);
}

/* rcpt_line - format RCPT TO for recipient i */

static size_t rcpt_line(const struct smtps_session *s, size_t i, char *line,
			        size_t cap)
{
    const struct smtps_rcpt *rc = &s->tx->msg->rcpt[i];
    /* xtext: 3 bytes per byte at most; utf-8-addr-xtext 6 ("\x{2B}"). */
    char    orcpt[SMTPS_ADDRESS_MAX * 6 + 1];
    size_t  n, k;
    int     non_ascii = 0;

    n = (size_t) snprintf(line, cap, "RCPT TO:<%s>", rc->addr);
    if (!(s->caps.ext & SMTPS_EXT_DSN))
	return n;
    if (rc->notify != 0 && n < cap)
	n += (size_t) snprintf(line + n, cap - n, " NOTIFY=%s%s%s%s",
			       (rc->notify & SMTPS_NOTIFY_NEVER) ? "NEVER" : "",
			       (rc->notify & SMTPS_NOTIFY_SUCCESS) ? "SUCCESS," : "",
			       (rc->notify & SMTPS_NOTIFY_FAILURE) ? "FAILURE," : "",
			       (rc->notify & SMTPS_NOTIFY_DELAY) ? "DELAY," : "");
    if (n < cap && line[n - 1] == ',')
	line[--n] = 0;

    /*
     * A non-ASCII ORCPT takes RFC 6533's utf-8 address type, in its
     * utf-8-addr-xtext form (pure ASCII, so valid with SMTPUTF8 or
     * without); one that cannot be encoded is left out, never mangled.
     */
    if (rc->orcpt != NULL && n < cap
	&& smtps_check_text(rc->orcpt, strlen(rc->orcpt), SMTPS_ADDRESS_MAX,
			    &non_ascii) == SMTPS_OK) {
	k = non_ascii ? utf8_xtext(orcpt, sizeof(orcpt), rc->orcpt) :
	    xtext(orcpt, sizeof(orcpt), rc->orcpt);
	/* One past the line's bound makes n >= cap: refused whole, not cut. */
	if (k > 0)
	    n += (size_t) snprintf(line + n, cap - n, " ORCPT=%s;%s",
				   non_ascii ? "utf-8" : "rfc822", orcpt);
    }
    return n;
}

/* smtps_rcpt_setup - RCPT TO for the next recipient, or a pipelined batch */

int     smtps_rcpt_setup(struct smtps_session *s, void *closure)
{
    struct smtps_tx *tx = s->tx;
    char    line[SMTPS_LINE_MAX];
    size_t  n;
    int     sent = 0, rc;

    SMTPS_UNUSED(closure);
    while (tx->rcpt_next < tx->msg->nrcpt) {
	/* A batch stays within the output bound; the rest comes next round. */
	if (sent > 0 && (!s->pipelining
			 || smtps_session_unsent(s) >= SMTPS_OUT_HIGH))
	    break;
	n = rcpt_line(s, tx->rcpt_next, line, sizeof(line));
	if (n >= sizeof(line))
	    return SMTPS_ETOOBIG;
	if ((rc = smtps_session_send_line(s, line, n)) != SMTPS_OK)
	    return sent > 0 ? sent : rc;
	tx->rcpt_next++;
	sent++;
    }
    if (tx->rcpt_next < tx->msg->nrcpt)
	s->no_lookahead = 1;			/* DATA must not pass them */
    return sent;
}

/* smtps_rcpt_callback - record each recipient; decide after the last one */

int     smtps_rcpt_callback(struct smtps_session *s, const struct smtps_reply *r,
			         void *closure)
{
    struct smtps_tx *tx = s->tx;
    size_t  i, temp = 0;

    SMTPS_UNUSED(closure);
    if (r == NULL)				/* no recipients left to send */
	return SMTPS_ACT_NEXT;
    tx->rcpt_index = (int) tx->rcpt_replied;
    smtps_tx_rcpt_reply(s, tx, tx->rcpt_replied, r);
    tx->rcpt_replied++;
    if (r->code < 200 || (r->code >= 300 && r->code < 400))
	return protocol_error(s, r, "RCPT TO");
    if (tx->rcpt_replied < tx->rcpt_next)
	return SMTPS_ACT_NEXT;			/* more replies of this batch */
    if (tx->rcpt_next < tx->msg->nrcpt)
	return SMTPS_ACT_RETRY;			/* send the next recipients */
    if (tx->rcpt_accepted > 0)
	return SMTPS_ACT_NEXT;
    smtps_session_set_reason(s, "every recipient was refused");
    for (i = 0; i < tx->res->nrcpt; i++)
	temp += tx->res->rcpt[i].status == SMTPS_STATUS_TEMPFAIL;
    return temp ? SMTPS_ACT_TEMPFAIL_TX : SMTPS_ACT_PERMFAIL_TX;
}

/* smtps_data_setup - DATA, unless BDAT will carry the content */

int     smtps_data_setup(struct smtps_session *s, void *closure)
{
    int     rc;

    SMTPS_UNUSED(closure);
    if (smtps_tx_bdat(s, s->tx))
	return 0;
    if ((rc = smtps_session_send_line(s, "DATA", 4)) != SMTPS_OK)
	return rc;
    s->tx->data_sent = 1;
    return 1;
}

/* smtps_data_callback - 354 goes on to the body */

int     smtps_data_callback(struct smtps_session *s, const struct smtps_reply *r,
			         void *closure)
{
    SMTPS_UNUSED(closure);
    if (r == NULL)
	return SMTPS_ACT_NEXT;
    if (r->code == 354) {
	s->tx->data_mode = 1;			/* what follows is message text */
	return SMTPS_ACT_NEXT;
    }
    if (r->code < 400)
	return protocol_error(s, r, "DATA");
    return smtps_action_for_code(r->code);
}

/* smtps_body_setup - start streaming the content */

int     smtps_body_setup(struct smtps_session *s, void *closure)
{
    char    line[64];
    int     chunking = smtps_tx_bdat(s, s->tx), rc, n;

    SMTPS_UNUSED(closure);
    /*
     * Without a 354 the server reads commands: the content would be
     * taken line by line as commands. Only a machine of the caller's
     * that jumps here past DATA gets this.
     */
    if (!chunking && !s->tx->data_mode) {
	smtps_session_set_reason(s, "BODY was entered without a 354 reply "
				 "to DATA: the server is not reading "
				 "message data");
	return SMTPS_EINVAL;
    }
    if (chunking) {
	n = snprintf(line, sizeof(line), "BDAT %llu LAST", (unsigned long long)
		     s->tx->msg->body_size);
	if ((rc = smtps_session_send_line(s, line, (size_t) n)) != SMTPS_OK)
	    return rc;
    }
    smtps_tx_start_body(s, chunking);
    if ((rc = smtps_tx_pump_body(s, s->tx)) != SMTPS_OK)
	return rc;

    /*
     * LMTP: one reply per recipient the server accepted at RCPT (RFC 2033
     * 4.2). With none (a machine of the caller's that came here without
     * one), the server has nobody to answer for but must still end the
     * data: one reply, for the message, as in SMTP.
     */
    if (s->protocol == SMTPS_PROTO_LMTP && s->tx->rcpt_accepted > 0) {
	s->tx->lmtp_due = s->tx->rcpt_accepted;	/* <= SMTPS_MAX_RECIPIENTS */
	return (int) s->tx->lmtp_due;
    }
    return 1;
}

/* smtps_body_callback - the reply to the final dot (or the last BDAT) */

int     smtps_body_callback(struct smtps_session *s, const struct smtps_reply *r,
			         void *closure)
{
    SMTPS_UNUSED(closure);
    /* It cannot have seen the final dot (or last BDAT byte) yet. */
    if (!smtps_tx_dot_sent(s, s->tx)) {
	smtps_session_set_reason(s, "the server replied before the end of "
				 "the message data");
	return SMTPS_ACT_FAIL_CONN;
    }
    s->need_reset = 0;				/* the server ended it */
    if (s->tx->lmtp_due > 0)
	return lmtp_end_reply(s, r);
    s->tx->final_replied = 1;			/* the transaction is over */
    if (r->code >= 200 && r->code < 300) {
	smtps_tx_settle(s, s->tx, SMTPS_STATUS_DELIVERED, SMTPS_STATE_BODY, r,
			NULL);
	return SMTPS_ACT_NEXT;
    }
    if (r->code < 400)
	return protocol_error(s, r, "the end of data");
    return smtps_action_for_code(r->code);
}

/*
 * lmtp_end_reply - one of LMTP's replies to the end of data: it settles
 * its recipient (transaction.c); the last one settles the message, and
 * its action is the message's. Before the last, anything but a protocol
 * error goes on: a 4xx or 5xx is that recipient's alone. (A 421 among
 * them still ends the connection, dispatch.c: the recipients still owed
 * a reply are then unknown.)
 */

static int lmtp_end_reply(struct smtps_session *s, const struct smtps_reply *r)
{
    int     last = smtps_tx_lmtp_reply(s, s->tx, r);

    if (r->code < 200 || (r->code >= 300 && r->code < 400))
	return protocol_error(s, r, "the end of data");
    if (!last)
	return SMTPS_ACT_NEXT;			/* more recipients to hear of */
    switch (s->tx->outcome) {
    case SMTPS_STATUS_DELIVERED:
	return SMTPS_ACT_NEXT;
    case SMTPS_STATUS_TEMPFAIL:
	return SMTPS_ACT_TEMPFAIL_TX;
    default:
	return SMTPS_ACT_PERMFAIL_TX;
    }
}

/* smtps_rset_setup - RSET only when a failed transaction is open and mail waits */

int     smtps_rset_setup(struct smtps_session *s, void *closure)
{
    int     rc;

    SMTPS_UNUSED(closure);
    if (!s->need_reset || s->queue == NULL)
	return 0;
    if ((rc = smtps_session_send_line(s, "RSET", 4)) != SMTPS_OK)
	return rc;
    return 1;
}

/* smtps_rset_callback - back to MAIL for the next message, or on to QUIT */

int     smtps_rset_callback(struct smtps_session *s, const struct smtps_reply *r,
			         void *closure)
{
    SMTPS_UNUSED(closure);
    if (r != NULL) {
	if (r->code < 200 || r->code >= 300) {
	    smtps_session_set_reason(s, "the server refused RSET");
	    return SMTPS_ACT_FAIL_CONN;
	}
	s->need_reset = 0;
    }
    if (s->quit_requested && s->queue == NULL)
	return SMTPS_ACT_NEXT;
    s->forced_next = SMTPS_STATE_MAIL;
    return SMTPS_ACT_JUMP;
}

/* smtps_quit_setup - say goodbye */

int     smtps_quit_setup(struct smtps_session *s, void *closure)
{
    int     rc;

    SMTPS_UNUSED(closure);
    if ((rc = smtps_session_send_line(s, "QUIT", 4)) != SMTPS_OK)
	return rc;
    return 1;
}

/* smtps_quit_callback - whatever the reply, the connection ends after it */

int     smtps_quit_callback(struct smtps_session *s, const struct smtps_reply *r,
			         void *closure)
{
    SMTPS_UNUSED(s);
    SMTPS_UNUSED(r);
    SMTPS_UNUSED(closure);
    return SMTPS_ACT_NEXT;
}
