/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	states.c 3
 * SUMMARY
 *	the built-in states of the SMTP client (RFC 5321)
 * SYNOPSIS
 *	#include "internal.h"
 *
 *	const smtp_state *smtps_builtin_state(id)
 * DESCRIPTION
 *	One setup/callback pair per state, in protocol order. A setup
 *	queues the state's command and says how many replies it awaits; a
 *	callback reads one reply and returns an enum smtps_action. They use
 *	the session's internals directly; custom states have only the public
 *	session functions.
 *
 *	BANNER	reads the greeting; 554 means QUIT only (RFC 5321 3.1).
 *	EHLO	EHLO, then HELO if EHLO is refused (RFC 5321 4.1.4). After
 *		STARTTLS it runs again and then jumps past STARTTLS.
 *	STARTTLS
 *		passes through unless the session asked for TLS (RFC 3207).
 *		On 220 it starts the handshake (tls.c) and jumps back to
 *		EHLO: what was learned in clear is forgotten. Required TLS
 *		that is not offered or is refused ends the connection with
 *		only QUIT sent in clear; opportunistic TLS goes on in clear.
 *	AUTH	RFC 4954, in auth.c; passes through without credentials.
 *	MAIL	MAIL FROM with SIZE, BODY=8BITMIME, SMTPUTF8, RET, ENVID as
 *		offered and needed; refuses up front what the server cannot
 *		take (too large, 8-bit or UTF-8 without the extension).
 *	RCPT	one RCPT TO per recipient with NOTIFY and ORCPT (RFC 3461);
 *		with PIPELINING a batch at once, else one per round trip.
 *	DATA	DATA, awaiting 354; skipped when BDAT is used.
 *	BODY	the content, CRLF-normalised and dot-stuffed, streamed; or
 *		one BDAT ... LAST chunk under CHUNKING (RFC 3030).
 *	RSET	only when a failed transaction is open and a message follows.
 *	QUIT	QUIT, then the session closes.
 * SEE ALSO
 *	session.c, the loop that calls these.
 *--*/

#include <stdio.h>
#include <string.h>

#include "internal.h"

static int banner_setup(struct smtps_session *, void *);
static int banner_callback(struct smtps_session *, const struct smtps_reply *, void *);
static int banner_stage(struct smtps_session *, int, void *);
static int ehlo_setup(struct smtps_session *, void *);
static int ehlo_callback(struct smtps_session *, const struct smtps_reply *, void *);
static int ehlo_stage(struct smtps_session *, int, void *);
static int starttls_setup(struct smtps_session *, void *);
static int starttls_callback(struct smtps_session *, const struct smtps_reply *, void *);
static int starttls_stage(struct smtps_session *, int, void *);
static int auth_stage(struct smtps_session *, int, void *);
static int mail_setup(struct smtps_session *, void *);
static int mail_callback(struct smtps_session *, const struct smtps_reply *, void *);
static int mail_stage(struct smtps_session *, int, void *);
static int rcpt_setup(struct smtps_session *, void *);
static int rcpt_callback(struct smtps_session *, const struct smtps_reply *, void *);
static int rcpt_stage(struct smtps_session *, int, void *);
static int data_setup(struct smtps_session *, void *);
static int data_callback(struct smtps_session *, const struct smtps_reply *, void *);
static int data_stage(struct smtps_session *, int, void *);
static int body_setup(struct smtps_session *, void *);
static int body_callback(struct smtps_session *, const struct smtps_reply *, void *);
static int body_stage(struct smtps_session *, int, void *);
static int rset_setup(struct smtps_session *, void *);
static int rset_callback(struct smtps_session *, const struct smtps_reply *, void *);
static int rset_stage(struct smtps_session *, int, void *);
static int quit_setup(struct smtps_session *, void *);
static int quit_callback(struct smtps_session *, const struct smtps_reply *, void *);
static int quit_stage(struct smtps_session *, int, void *);
static size_t xtext(char *out, size_t cap, const char *in);
static size_t rcpt_line(const struct smtps_session *, size_t, char *, size_t);
static int protocol_error(struct smtps_session *, const struct smtps_reply *,
			  const char *what);

#define STATE(n, lower, stage, flags) \
    [SMTPS_STATE_##n] = { sizeof(smtp_state), #n, SMTPS_STATE_##n, NULL, \
	lower##_setup, lower##_callback, NULL, stage, NULL, NULL, NULL, flags }

static const smtp_state builtins[SMTPS_STATE__COUNT] = {
    STATE(BANNER, banner, banner_stage, 0),
    STATE(EHLO, ehlo, ehlo_stage, 0),
    STATE(STARTTLS, starttls, starttls_stage, 0),
    STATE(AUTH, smtps_auth, auth_stage, 0),
    STATE(MAIL, mail, mail_stage, SMTPS_STATE_PIPELINABLE),
    STATE(RCPT, rcpt, rcpt_stage, SMTPS_STATE_PIPELINABLE),
    STATE(DATA, data, data_stage, SMTPS_STATE_PIPELINABLE),
    STATE(BODY, body, body_stage, 0),
    STATE(RSET, rset, rset_stage, 0),
    STATE(QUIT, quit, quit_stage, 0),
};

/* smtps_builtin_state - the record of built-in state id */

const smtp_state *smtps_builtin_state(int id)
{
    return &builtins[id];
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

/* banner_setup - nothing to send: the server speaks first */

static int banner_setup(struct smtps_session *s, void *closure)
{
    SMTPS_UNUSED(s);
    SMTPS_UNUSED(closure);
    return 1;
}

/* banner_callback - 220 goes on; anything else ends the connection */

static int banner_callback(struct smtps_session *s,
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

/* banner_stage - reading the banner */

static int banner_stage(struct smtps_session *s, int awaiting, void *closure)
{
    SMTPS_UNUSED(s);
    SMTPS_UNUSED(awaiting);
    SMTPS_UNUSED(closure);
    return SMTPS_STAGE_BANNER;
}

/* ehlo_setup - EHLO, or HELO once EHLO was refused */

static int ehlo_setup(struct smtps_session *s, void *closure)
{
    char    line[SMTPS_HELO_MAX + 8];
    int     n, rc;

    SMTPS_UNUSED(closure);
    n = snprintf(line, sizeof(line), "%s %s", s->use_helo ? "HELO" : "EHLO",
		 s->helo);
    if ((rc = smtps_session_send_line(s, line, (size_t) n)) != SMTPS_OK)
	return rc;
    return 1;
}

/* ehlo_callback - learn the extensions, or fall back to HELO */

static int ehlo_callback(struct smtps_session *s, const struct smtps_reply *r,
			         void *closure)
{
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
    if (r->code >= 500 && !s->use_helo) {
	s->use_helo = 1;			/* an RFC 821 server */
	return SMTPS_ACT_RETRY;
    }
    if (r->code < 400)
	return protocol_error(s, r, s->use_helo ? "HELO" : "EHLO");
    smtps_session_set_reason(s, s->use_helo ? "the server refused HELO" :
			     "the server refused EHLO");
    return SMTPS_ACT_FAIL_CONN;
}

/* ehlo_stage - during or after EHLO */

static int ehlo_stage(struct smtps_session *s, int awaiting, void *closure)
{
    SMTPS_UNUSED(s);
    SMTPS_UNUSED(closure);
    return awaiting ? SMTPS_STAGE_EHLO : SMTPS_STAGE_EHLO_DONE;
}

/* starttls_setup - STARTTLS when the session wants TLS and it is offered */

static int starttls_setup(struct smtps_session *s, void *closure)
{
    int     mode = smtps_tls_mode(s), rc;

    SMTPS_UNUSED(closure);
    /* Not wanted, implicit, or already begun: nothing to do. */
    if (mode == SMTPS_TLS_NONE || mode == SMTPS_TLS_IMPLICIT
	|| smtps_tls_engaged(s))
	return 0;
    if (!(s->caps.ext & SMTPS_EXT_STARTTLS))
	return 0;				/* the callback decides */
    if ((rc = smtps_session_send_line(s, "STARTTLS", 8)) != SMTPS_OK)
	return rc;
    return 1;
}

/* starttls_callback - 220 starts the handshake; a refusal may be fatal */

static int starttls_callback(struct smtps_session *s,
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

/* starttls_stage - during or after STARTTLS */

static int starttls_stage(struct smtps_session *s, int awaiting, void *closure)
{
    SMTPS_UNUSED(s);
    SMTPS_UNUSED(closure);
    return awaiting ? SMTPS_STAGE_STARTTLS : SMTPS_STAGE_STARTTLS_DONE;
}

/* auth_stage - AUTH has no classic stage code of its own */

static int auth_stage(struct smtps_session *s, int awaiting, void *closure)
{
    SMTPS_UNUSED(s);
    SMTPS_UNUSED(awaiting);
    SMTPS_UNUSED(closure);
    return SMTPS_STAGE_UNKNOWN;
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

/* mail_setup - MAIL FROM with the parameters the message needs */

static int mail_setup(struct smtps_session *s, void *closure)
{
    const struct smtps_message *m = s->tx;
    unsigned ext = s->caps.ext;
    char    line[SMTPS_LINE_MAX], env[320], why[SMTPS_REASON_MAX];
    size_t  n;

    SMTPS_UNUSED(closure);
    if ((ext & SMTPS_EXT_SIZE) && s->caps.size_max > 0
	&& m->body_len > s->caps.size_max) {
	snprintf(why, sizeof(why), "message of %zu bytes exceeds the server's "
		 "SIZE limit of %llu", m->body_len,
		 (unsigned long long) s->caps.size_max);
	smtps_session_set_reason(s, why);
	return SMTPS_ETOOBIG;
    }
    if (m->needs_smtputf8 && !(ext & SMTPS_EXT_SMTPUTF8)) {
	smtps_session_set_reason(s, "a non-ASCII address needs SMTPUTF8, "
				 "which the server does not offer");
	return SMTPS_EINVAL;
    }
    if (m->is_8bit && !(ext & SMTPS_EXT_8BITMIME)) {
	smtps_session_set_reason(s, "8-bit content needs 8BITMIME, "
				 "which the server does not offer");
	return SMTPS_EINVAL;
    }
    n = (size_t) snprintf(line, sizeof(line), "MAIL FROM:<%s>", m->sender);
    if ((ext & SMTPS_EXT_SIZE) && n < sizeof(line))
	n += (size_t) snprintf(line + n, sizeof(line) - n, " SIZE=%zu",
			       m->body_len);
    if (m->is_8bit && n < sizeof(line))
	n += (size_t) snprintf(line + n, sizeof(line) - n, " BODY=8BITMIME");
    if (m->needs_smtputf8 && n < sizeof(line))
	n += (size_t) snprintf(line + n, sizeof(line) - n, " SMTPUTF8");
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

/* mail_callback - the sender is accepted or the transaction fails */

static int mail_callback(struct smtps_session *s, const struct smtps_reply *r,
			         void *closure)
{
    SMTPS_UNUSED(closure);
    if (r->code >= 300 && r->code < 400)
	return protocol_error(s, r, "MAIL FROM");
    return smtps_action_for_code(r->code);
}

/* mail_stage - during or after MAIL FROM */

static int mail_stage(struct smtps_session *s, int awaiting, void *closure)
{
    SMTPS_UNUSED(s);
    SMTPS_UNUSED(closure);
    return awaiting ? SMTPS_STAGE_MAIL : SMTPS_STAGE_MAIL_DONE;
}

/* rcpt_line - format RCPT TO for recipient i */

static size_t rcpt_line(const struct smtps_session *s, size_t i, char *line,
			        size_t cap)
{
    const struct smtps_rcpt *rc = &s->tx->rcpt[i];
    char    orcpt[SMTPS_ADDRESS_MAX * 3 + 1];
    size_t  n;
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
     * XXX A non-ASCII ORCPT needs RFC 6533's utf-8 address type; until
     * that is written, such an ORCPT is left out rather than mangled.
     */
    if (rc->orcpt != NULL && n < cap
	&& smtps_check_text(rc->orcpt, strlen(rc->orcpt), SMTPS_ADDRESS_MAX,
			    &non_ascii) == SMTPS_OK && !non_ascii
	&& xtext(orcpt, sizeof(orcpt), rc->orcpt) > 0)
	n += (size_t) snprintf(line + n, cap - n, " ORCPT=rfc822;%s", orcpt);
    return n;
}

/* rcpt_setup - RCPT TO for the next recipient, or a pipelined batch */

static int rcpt_setup(struct smtps_session *s, void *closure)
{
    char    line[SMTPS_LINE_MAX];
    size_t  n;
    int     sent = 0, rc;

    SMTPS_UNUSED(closure);
    while (s->rcpt_next < s->tx->nrcpt) {
	/* A batch stays within the output bound; the rest comes next round. */
	if (sent > 0 && (!s->pipelining
			 || s->out.end - s->out.start >= SMTPS_OUT_HIGH))
	    break;
	n = rcpt_line(s, s->rcpt_next, line, sizeof(line));
	if (n >= sizeof(line))
	    return SMTPS_ETOOBIG;
	if ((rc = smtps_session_send_line(s, line, n)) != SMTPS_OK)
	    return sent > 0 ? sent : rc;
	s->rcpt_next++;
	sent++;
    }
    if (s->rcpt_next < s->tx->nrcpt)
	s->no_lookahead = 1;			/* DATA must not pass them */
    return sent;
}

/* rcpt_callback - record each recipient; decide after the last one */

static int rcpt_callback(struct smtps_session *s, const struct smtps_reply *r,
			         void *closure)
{
    size_t  i, temp = 0;

    SMTPS_UNUSED(closure);
    if (r == NULL)				/* no recipients left to send */
	return SMTPS_ACT_NEXT;
    s->rcpt_index = (int) s->rcpt_replied;
    (void) smtps_session_set_rcpt_result(s, s->rcpt_replied, r);
    s->rcpt_replied++;
    if (r->code >= 200 && r->code < 300)
	s->rcpt_accepted++;
    else if (r->code < 400)
	return protocol_error(s, r, "RCPT TO");
    if (s->rcpt_replied < s->rcpt_next)
	return SMTPS_ACT_NEXT;			/* more replies of this batch */
    if (s->rcpt_next < s->tx->nrcpt)
	return SMTPS_ACT_RETRY;			/* send the next recipients */
    if (s->rcpt_accepted > 0)
	return SMTPS_ACT_NEXT;
    smtps_session_set_reason(s, "every recipient was refused");
    for (i = 0; i < s->txres->nrcpt; i++)
	temp += s->txres->rcpt[i].status == SMTPS_STATUS_TEMPFAIL;
    return temp ? SMTPS_ACT_TEMPFAIL_TX : SMTPS_ACT_PERMFAIL_TX;
}

/* rcpt_stage - during or after RCPT TO */

static int rcpt_stage(struct smtps_session *s, int awaiting, void *closure)
{
    SMTPS_UNUSED(s);
    SMTPS_UNUSED(closure);
    return awaiting ? SMTPS_STAGE_RCPT : SMTPS_STAGE_RCPT_DONE;
}

/* data_setup - DATA, unless BDAT will carry the content */

static int data_setup(struct smtps_session *s, void *closure)
{
    int     rc;

    SMTPS_UNUSED(closure);
    if (s->caps.ext & SMTPS_EXT_CHUNKING)
	return 0;
    if ((rc = smtps_session_send_line(s, "DATA", 4)) != SMTPS_OK)
	return rc;
    s->data_sent = 1;
    return 1;
}

/* data_callback - 354 goes on to the body */

static int data_callback(struct smtps_session *s, const struct smtps_reply *r,
			         void *closure)
{
    SMTPS_UNUSED(closure);
    if (r == NULL)
	return SMTPS_ACT_NEXT;
    if (r->code == 354) {
	s->data_mode = 1;			/* what follows is message text */
	return SMTPS_ACT_NEXT;
    }
    if (r->code < 400)
	return protocol_error(s, r, "DATA");
    return smtps_action_for_code(r->code);
}

/* data_stage - during or after DATA */

static int data_stage(struct smtps_session *s, int awaiting, void *closure)
{
    SMTPS_UNUSED(s);
    SMTPS_UNUSED(closure);
    return awaiting ? SMTPS_STAGE_DATA : SMTPS_STAGE_DATA_DONE;
}

/* body_setup - start streaming the content */

static int body_setup(struct smtps_session *s, void *closure)
{
    char    line[64];
    int     chunking = (s->caps.ext & SMTPS_EXT_CHUNKING) != 0, rc, n;

    SMTPS_UNUSED(closure);
    if (chunking) {
	n = snprintf(line, sizeof(line), "BDAT %llu LAST", (unsigned long long)
		     smtps_body_encoded_length(s->tx->body, s->tx->body_len));
	if ((rc = smtps_session_send_line(s, line, (size_t) n)) != SMTPS_OK)
	    return rc;
    }
    smtps_session_start_body(s, chunking);
    if ((rc = smtps_session_pump_body(s)) != SMTPS_OK)
	return rc;
    return 1;
}

/* body_callback - the reply to the final dot (or the last BDAT) */

static int body_callback(struct smtps_session *s, const struct smtps_reply *r,
			         void *closure)
{
    SMTPS_UNUSED(closure);
    /* It cannot have seen the final dot (or last BDAT byte) yet. */
    if (!smtps_session_body_done(s)) {
	smtps_session_set_reason(s, "the server replied before the end of "
				 "the message data");
	return SMTPS_ACT_FAIL_CONN;
    }
    s->tx_final_replied = 1;			/* the transaction is over */
    s->need_reset = 0;
    if (r->code >= 200 && r->code < 300) {
	smtps_session_decide(s, SMTPS_STATUS_DELIVERED, SMTPS_STATE_BODY, r,
			     NULL);
	return SMTPS_ACT_NEXT;
    }
    if (r->code < 400)
	return protocol_error(s, r, "the end of data");
    return smtps_action_for_code(r->code);
}

/* body_stage - sending the body, then waiting for its confirmation */

static int body_stage(struct smtps_session *s, int awaiting, void *closure)
{
    SMTPS_UNUSED(closure);
    return awaiting && !smtps_session_body_done(s) ? SMTPS_STAGE_BODY :
	SMTPS_STAGE_CONFIRM;
}

/* rset_setup - RSET only when a failed transaction is open and mail waits */

static int rset_setup(struct smtps_session *s, void *closure)
{
    int     rc;

    SMTPS_UNUSED(closure);
    if (!s->need_reset || s->queue == NULL)
	return 0;
    if ((rc = smtps_session_send_line(s, "RSET", 4)) != SMTPS_OK)
	return rc;
    return 1;
}

/* rset_callback - back to MAIL for the next message, or on to QUIT */

static int rset_callback(struct smtps_session *s, const struct smtps_reply *r,
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

/* rset_stage - during or after RSET */

static int rset_stage(struct smtps_session *s, int awaiting, void *closure)
{
    SMTPS_UNUSED(s);
    SMTPS_UNUSED(closure);
    return awaiting ? SMTPS_STAGE_RSET : SMTPS_STAGE_RSET_DONE;
}

/* quit_setup - say goodbye */

static int quit_setup(struct smtps_session *s, void *closure)
{
    int     rc;

    SMTPS_UNUSED(closure);
    if ((rc = smtps_session_send_line(s, "QUIT", 4)) != SMTPS_OK)
	return rc;
    return 1;
}

/* quit_callback - whatever the reply, the connection ends after it */

static int quit_callback(struct smtps_session *s, const struct smtps_reply *r,
			         void *closure)
{
    SMTPS_UNUSED(s);
    SMTPS_UNUSED(r);
    SMTPS_UNUSED(closure);
    return SMTPS_ACT_NEXT;
}

/* quit_stage - QUIT happens when the connection is idle */

static int quit_stage(struct smtps_session *s, int awaiting, void *closure)
{
    SMTPS_UNUSED(s);
    SMTPS_UNUSED(awaiting);
    SMTPS_UNUSED(closure);
    return SMTPS_STAGE_IDLE;
}
