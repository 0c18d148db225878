/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	fuzz_session 1
 * SUMMARY
 *	fuzz target: a whole sans-I/O session against a hostile server
 * SYNOPSIS
 *	LLVMFuzzerTestOneInput(data, size)
 * DESCRIPTION
 *	One session (csrc/session.c, states.c, auth.c, tls.c, reply.c,
 *	body.c) with a few messages, driven by the input as a program of
 *	operations: deliver server bytes (in chunks of the input's choosing),
 *	let the driver take some or all of the client's output, move the
 *	clock and tick, submit another message, ask to quit, hang up.
 *
 *	The first byte picks one of two servers:
 *
 *	raw	the server bytes are the input's own bytes, as they come;
 *		TLS (any mode, with an unverified policy) and AUTH may be
 *		on, so that 334 challenges and TLS records are fuzzed too.
 *
 *	model	a server that reads the client's commands and answers each
 *		one, usually correctly (EHLO with capabilities the input
 *		picks, 354 to DATA, ...) and otherwise as the input says:
 *		4xx, 5xx, 421, a random code, 354 or 334 anywhere, silence,
 *		garbage, a line too long, a NUL, two replies, a hang-up. It
 *		reads DATA up to the end-of-data line and BDAT chunks by
 *		their size, as a real server does.
 *
 *	The input, read front to back (bytes past its end read as 0, which
 *	means "the usual" everywhere: the correct reply, a round trip):
 *
 *	byte 0	bit 0: raw (1) or model (0); bits 1-2: TLS mode (raw only);
 *		bit 3: AUTH with user/secret, plaintext allowed; bit 4: only
 *		LOGIN; bit 5: transactions run ahead behind the final dot
 *		(as the engine runs them, fed from the session's queue);
 *		bit 6: 5 s reply deadlines instead of RFC 5321's; bit 7:
 *		LMTP (RFC 2033) instead of SMTP: the model server answers
 *		LHLO as EHLO and the end of data once per recipient it
 *		accepted, each reply as the input says
 *	byte 1	messages submitted before the start, 1 + byte % 4
 *	per message: a shape byte (recipients, a non-ASCII one, NOTIFY,
 *		ORCPT, RET/ENVID) and a body byte (one of bodies[], 0xff: a
 *		big one, 0x80 | n: the next n input bytes)
 *	then operations, one byte each plus arguments: 0 round trip, 1 n
 *		server bytes (raw: the next n + 1 input bytes), 2 n client
 *		bytes taken, 3 d clock + d s (0xff: to the deadline) and
 *		tick, 4 submit another message, 5 quit, 6 the server
 *		misbehaves (model) or 2-byte-length raw bytes, 7 b hang up
 *		when b >= 0xf0, the driver's turn for a TLS handshake
 *		(smtps_session_tls_proceed()) when 0xe0 <= b < 0xf0. The
 *		model server reads a byte per reply it makes (0 or >= 0x40:
 *		correct; else a fault) and per EHLO.
 *
 *	With TLS (raw), the session has a driver's gate for handshakes, as
 *	the engine gives it (smtps_session_set_tls_gate()): a handshake
 *	that would begin while the clock's seconds are odd waits for its
 *	turn (op 7, or the end of the input), and the bytes that come
 *	meanwhile are fuzzed too.
 *
 *	FUZZ_TRACE=1 prints the dialogue ("S:" and "C:" lines).
 *
 *	Invariants (a broken one aborts):
 *
 *	*	the client never writes a CR or LF outside a CR LF pair
 *		(clear text sessions);
 *	*	model: every command line is printable and within
 *		SMTPS_LINE_MAX; the content a server reads after its 354 to
 *		DATA (dot-unstuffed, up to the first end-of-data line) is
 *		either empty (a 354 the client drains with a lone dot, and
 *		then no RCPT since the MAIL got a 2xx) or
 *		exactly the normalised body of the message named by the last
 *		MAIL FROM: so no command is ever sent after a 354 but the
 *		body, and no body ends the data early; a BDAT chunk carries
 *		exactly the normalised body and announces its size; a data
 *		stream cut off by a hang-up is a prefix of that body;
 *	*	no loss: at every step, messages pending plus results taken
 *		equal messages submitted; after smtps_session_closed()
 *		every submitted message has exactly one result, with sane
 *		fields;
 *	*	no hang: a session in the dialogue with nothing to send and
 *		nothing to read always has a deadline;
 *	*	model: "delivered" only when the server answered the
 *		complete data with 2xx, "unknown" only when the server got
 *		the complete data (both unless the server injected or
 *		swallowed replies: then any client believes the wrong one);
 *	*	LMTP: the client greets with LHLO only (never EHLO or HELO);
 *		never sends a lone dot; sends nothing after the end of data
 *		before its replies came (no running ahead, bit 5 or not);
 *		the protocol cannot change once the
 *		session started; model: a recipient is "delivered" only when
 *		the server answered the complete data with 2xx for that
 *		recipient, "unknown" only when the server got the complete
 *		data, and a message is "delivered" or "partial" only when
 *		some recipient's reply was 2xx.
 *--*/

#include "fuzz.h"
#include "smtpstate.h"
#include "internal.h"			/* smtps_session_set_runahead() */

#define MAX_MSGS 8
#define MAX_OPS 2000
#define SERVER_OUT_MAX (1u << 20)
#define LINE_MAX_SEEN 4096

enum kind {
    K_BANNER, K_EHLO, K_HELO, K_MAIL, K_RCPT, K_DATA, K_DOT, K_BDAT,
    K_RSET, K_QUIT, K_AUTH, K_AUTHCONT, K_OTHER
};

#define MAX_RCPTS 3			/* recipients per message (make_message) */

enum smode {
    S_CMD,				/* reading command lines */
    S_DATA,				/* reading DATA up to ".\r\n" */
    S_BDAT				/* reading bdat_left chunk bytes */
};

struct msg {
    uint64_t tag;
    char    sender[32];
    struct fz_buf norm;			/* the reference normalisation */
    size_t  nrcpt;
    int     submitted;
    int     results;			/* results taken for it */
    int     accepted;			/* the server 2xx'd its whole data (LMTP:
					 * for at least one recipient) */
    int     complete;			/* the server has its whole data */
    int     rcpt_took[MAX_RCPTS];	/* LMTP: the server 2xx'd the whole
					 * data for this recipient */
};

struct model {
    struct fz_buf in;			/* client bytes not yet read */
    struct fz_buf out;			/* server bytes not yet delivered */
    struct fz_buf data;			/* DATA or BDAT content so far */
    int     mode;			/* enum smode */
    size_t  bdat_left;
    size_t  scan;			/* DATA: no end-of-data line before */
    int     cur;			/* message of the last MAIL FROM, -1 */
    int     cont;			/* the next line answers a 334 */
    int     login;			/* the AUTH under way is LOGIN */
    int     login_step;			/* 334 prompts sent for it */
    int     desync;			/* replies no longer match commands */
    int     rcpt_ok;			/* RCPT 2xx in the open transaction */
    int     rcpt_acc[MAX_RCPTS * 4];	/* LMTP: which recipients, in order */
    int     hangup;			/* close once out is delivered */
};

struct fuzz {
    struct fz_reader rd;
    struct smtps_session *s;
    struct model m;
    struct msg msgs[MAX_MSGS];
    int     nmsgs;
    int     raw;
    int     lmtp;			/* the session speaks LMTP */
    int     check_wire;			/* clear text: check CR LF pairs */
    int     last_out;			/* the client's previous byte, -1 */
    size_t  taken;			/* results taken */
    int64_t now;
};

static struct smtps_tls_config *tls_cfg;
static int trace;			/* FUZZ_TRACE set: print the dialogue */

/* tls_gate - a driver's turns: none free while the seconds are odd */

static int tls_gate(struct smtps_session *s, void *closure)
{
    struct fuzz *f = closure;

    (void) s;
    return (f->now / 1000) % 2 == 0;
}

static struct smtps_message *make_message(struct fuzz *f, int i);
static void submit(struct fuzz *f);
static void take_results(struct fuzz *f);
static void say(struct fuzz *f, const void *p, size_t n);
static int correct_code(struct fuzz *f, int kind, const char *line);
static void ehlo_reply(struct fuzz *f, int lf_only);
static int reply(struct fuzz *f, int kind, const char *line);
static int msg_of_mail(struct fuzz *f, const char *line);
static int rcpt_of_line(const char *line);
static void data_done(struct fuzz *f, const unsigned char *content,
		      size_t len, int kind);
static void server_line(struct fuzz *f, char *line, size_t len);
static void server_read(struct fuzz *f);
static void server_end(struct fuzz *f);
static void show(const char *who, const void *p, size_t n);
static void wire_check(struct fuzz *f, const unsigned char *p, size_t n);
static size_t take_output(struct fuzz *f, size_t max);
static size_t deliver(struct fuzz *f, size_t max);
static void closed(struct fuzz *f, const char *why);
static int settle(struct fuzz *f);
static int round_trip(struct fuzz *f);
static void tick(struct fuzz *f, unsigned d);
int     LLVMFuzzerInitialize(int *argc, char ***argv);

static const char *const bodies[] = {
    "Subject: hi\r\n\r\nhello\r\n",
    "",
    ".",
    "\n.\n",
    "\r.\r",
    "a\r\n.\r\nMAIL FROM:<evil@example>\r\nRCPT TO:<x@example>\r\nDATA\r\n",
    "..\r\n.\r\n.",
    "line\rline\nline\r\n\r\n",
    "\x80\xff eight bit\n",
    ".\r\n",
    "\r\n.\r\nQUIT\r\n",
    "x\n.\r\nRSET\n",
};

#define NBODIES (sizeof(bodies) / sizeof(bodies[0]))

/* ------------------------------------------------------------------ */
/* Messages                                                            */
/* ------------------------------------------------------------------ */

/* make_message - message i, shaped by the input; NULL when refused */

static struct smtps_message *make_message(struct fuzz *f, int i)
{
    struct smtps_message *m = smtps_message_new();
    struct msg *mi = &f->msgs[i];
    struct fz_buf body = {0};
    const uint8_t *p;
    char    rcpt[64];
    unsigned b, shape, n, k;
    size_t  len;

    FUZZ_CHECK(m != NULL);
    memset(mi, 0, sizeof(*mi));
    mi->tag = (uint64_t) i + 1;
    snprintf(mi->sender, sizeof(mi->sender), "s%d@fz.example", i);
    FUZZ_CHECK(smtps_message_set_sender(m, mi->sender, strlen(mi->sender)) == 0);
    shape = fz_u8(&f->rd);
    n = 1 + shape % 3;
    for (k = 0; k < n; k++) {
	/* A non-ASCII recipient now and then: it needs SMTPUTF8. */
	snprintf(rcpt, sizeof(rcpt), (shape & 0x40) && k == 1 ?
		 "r%u\xc3\xa9@fz.example" : "r%u@fz.example", k);
	FUZZ_CHECK(smtps_message_add_recipient(m, rcpt, strlen(rcpt),
					       (shape >> 2) & 1 ?
					       SMTPS_NOTIFY_FAILURE : 0,
					       (shape >> 3) & 1 ? rcpt : NULL,
					       strlen(rcpt)) == 0);
    }
    mi->nrcpt = n;
    if (shape & 0x10)
	FUZZ_CHECK(smtps_message_set_dsn(m, SMTPS_DSN_RET_HDRS, "env+id=1", 8) == 0);
    b = fz_u8(&f->rd);
    if (b == 0xff) {
	/* Big: past the session's output high-water mark, many dots. */
	for (k = 0; k < 7000; k++)
	    fz_adds(&body, k % 7 ? "line of text\n" : ".\n");
    } else if (b & 0x80) {
	len = fz_take(&f->rd, b & 0x7f, &p);
	fz_add(&body, p, len);
    } else {
	fz_adds(&body, bodies[b % NBODIES]);
    }
    /* A NUL is refused (smuggling through lenient hops); then without. */
    if (body.len > 0 && memchr(body.data, 0, body.len) != NULL) {
	FUZZ_CHECK(smtps_message_set_body(m, (const char *) body.data,
					  body.len) == SMTPS_EINVAL);
	for (k = 0; k < body.len; k++)
	    if (body.data[k] == 0)
		body.data[k] = '@';
    }
    FUZZ_CHECK(smtps_message_set_body(m, (const char *) body.data, body.len) == 0);
    fz_normalize(&mi->norm, body.data, body.len);
    fz_free(&body);
    return m;
}

/* submit - submit the next message, if any is left */

static void submit(struct fuzz *f)
{
    struct smtps_message *m;
    int     i = f->nmsgs, rc;

    if (i >= MAX_MSGS)
	return;
    m = make_message(f, i);
    f->nmsgs++;
    rc = smtps_session_submit(f->s, m, f->msgs[i].tag, f->now);
    if (rc == SMTPS_OK) {
	f->msgs[i].submitted = 1;
	return;
    }
    FUZZ_CHECK(rc == SMTPS_ECLOSED);
    smtps_message_free(m);
}

/* take_results - collect finished results; check the no-loss count */

static void take_results(struct fuzz *f)
{
    struct smtps_result *r;
    struct msg *mi;
    size_t  submitted = 0, i, delivered;
    int     k;

    while ((r = smtps_session_next_result(f->s)) != NULL) {
	FUZZ_CHECK(r->tag >= 1 && r->tag <= (uint64_t) f->nmsgs);
	mi = &f->msgs[r->tag - 1];
	FUZZ_CHECK(mi->submitted);
	FUZZ_CHECK(mi->results == 0);
	mi->results++;
	f->taken++;
	/* Final statuses only (transaction.c, result.c). */
	FUZZ_CHECK((r->status >= SMTPS_STATUS_DELIVERED
		    && r->status <= SMTPS_STATUS_UNKNOWN)
		   || r->status == SMTPS_STATUS_PARTIAL);
	FUZZ_CHECK(r->reason != NULL && r->reply.text != NULL);
	FUZZ_CHECK(memchr(r->stage_name, 0, sizeof(r->stage_name)) != NULL);
	FUZZ_CHECK(memchr(r->reply.enhanced, 0, sizeof(r->reply.enhanced)) != NULL);
	FUZZ_CHECK(r->reply.code == 0
		   || (r->reply.code >= 200 && r->reply.code <= 559));
	FUZZ_CHECK(r->nrcpt == mi->nrcpt);
	delivered = 0;
	for (i = 0; i < r->nrcpt; i++) {
	    k = r->rcpt[i].status;
	    FUZZ_CHECK((k >= SMTPS_STATUS_DELIVERED && k <= SMTPS_STATUS_UNKNOWN)
		       || k == SMTPS_STATUS_NOT_SENT);
	    delivered += k == SMTPS_STATUS_DELIVERED;
	    FUZZ_CHECK(r->rcpt[i].reply.text != NULL);
	}
	/* The message's status is its recipients'. */
	FUZZ_CHECK((r->status == SMTPS_STATUS_DELIVERED) == (delivered == r->nrcpt));
	FUZZ_CHECK((r->status == SMTPS_STATUS_PARTIAL)
		   == (delivered > 0 && delivered < r->nrcpt));
	if (!f->raw && !f->m.desync) {
	    if (r->status == SMTPS_STATUS_DELIVERED)
		FUZZ_CHECK(mi->accepted);
	    if (r->status == SMTPS_STATUS_UNKNOWN)
		FUZZ_CHECK(mi->complete);
	    /* LMTP: each recipient's fate is its own reply's. */
	    if (f->lmtp && r->status == SMTPS_STATUS_PARTIAL)
		FUZZ_CHECK(mi->accepted);
	    for (i = 0; f->lmtp && i < r->nrcpt && i < MAX_RCPTS; i++) {
		if (r->rcpt[i].status == SMTPS_STATUS_DELIVERED)
		    FUZZ_CHECK(mi->rcpt_took[i]);
		if (r->rcpt[i].status == SMTPS_STATUS_UNKNOWN)
		    FUZZ_CHECK(mi->complete);
	    }
	}
	smtps_result_free(r);
    }
    for (k = 0; k < f->nmsgs; k++)
	submitted += f->msgs[k].submitted;
    FUZZ_CHECK(smtps_session_pending(f->s) + f->taken == submitted);
}

/* ------------------------------------------------------------------ */
/* The model server                                                    */
/* ------------------------------------------------------------------ */

/* say - queue server bytes, bounded */

static void say(struct fuzz *f, const void *p, size_t n)
{
    if (f->m.out.len + n <= SERVER_OUT_MAX)
	fz_add(&f->m.out, p, n);
}

/* correct_code - what a well-behaved server answers */

static int correct_code(struct fuzz *f, int kind, const char *line)
{
    switch (kind) {
    case K_BANNER:
	return 220;
    case K_DATA:
	return 354;
    case K_QUIT:
	return 221;
    case K_AUTH:
	if (strncmp(line, "AUTH LOGIN", 10) == 0
	    || strncmp(line, "AUTH CRAM-MD5", 13) == 0)
	    return 334;
	return 235;
    case K_AUTHCONT:
	if (strcmp(line, "*") == 0)
	    return 501;
	return f->m.login && f->m.login_step == 1 ? 334 : 235;
    case K_OTHER:
	return 500;
    default:
	return 250;
    }
}

/* ehlo_reply - 250 with the capabilities the input picks */

static void ehlo_reply(struct fuzz *f, int lf_only)
{
    const char *eol = lf_only ? "\n" : "\r\n";
    char    line[128];
    unsigned caps = fz_u8(&f->rd) ^ 0x6d, mechs;

    snprintf(line, sizeof(line), "250-fz.example hello%s", eol);
    say(f, line, strlen(line));
    if (caps & 0x01)
	say(f, "250-PIPELINING", 14), say(f, eol, strlen(eol));
    if (caps & 0x02)
	say(f, "250-CHUNKING", 12), say(f, eol, strlen(eol));
    if (caps & 0x04)
	say(f, "250-8BITMIME", 12), say(f, eol, strlen(eol));
    if (caps & 0x08) {
	snprintf(line, sizeof(line), "250-SIZE %u%s", fz_u16(&f->rd) * 4, eol);
	say(f, line, strlen(line));
    }
    if (caps & 0x10)
	say(f, "250-SMTPUTF8", 12), say(f, eol, strlen(eol));
    if (caps & 0x20)
	say(f, "250-DSN", 7), say(f, eol, strlen(eol));
    if (caps & 0x40) {
	mechs = fz_u8(&f->rd) ^ 0x0f;
	snprintf(line, sizeof(line), "250-AUTH%s%s%s%s%s",
		 mechs & 1 ? " PLAIN" : "", mechs & 2 ? " LOGIN" : "",
		 mechs & 4 ? " CRAM-MD5" : "", mechs & 8 ? " XOAUTH2" : "", eol);
	say(f, line, strlen(line));
    }
    if (caps & 0x80)
	say(f, "250-ENHANCEDSTATUSCODES", 23), say(f, eol, strlen(eol));
    say(f, "250 HELP", 8);
    say(f, eol, strlen(eol));
}

/*
 * reply - answer one command (or the banner, or the end of data). Most
 * input bytes mean "the correct reply", in one of four wire shapes; the
 * rest pick a misbehaviour. Returns the code of the reply's first line,
 * or 0 when the reply is malformed or absent.
 */
static int reply(struct fuzz *f, int kind, const char *line)
{
    unsigned c = fz_u8(&f->rd), v;
    int     code = correct_code(f, kind, line), ok = 1;
    char    buf[256];
    const uint8_t *p;
    size_t  n;

    if (c == 0 || c >= 0x40) {
	v = c & 3;
	if (kind == K_EHLO && code == 250) {
	    ehlo_reply(f, v == 2);
	    return code;
	}
    } else {
	v = 4 + c % 16;
    }
    switch (v) {
    case 0:					/* correct, plain */
    case 1:					/* correct, two lines */
    case 2:					/* correct, LF only */
    case 3:					/* correct, enhanced code */
	break;
    case 4:
	code = kind == K_MAIL || kind == K_RCPT ? 452 : 451;
	break;
    case 5:
	code = kind == K_BANNER ? 554 : 550;
	break;
    case 6:
	code = 421;
	break;
    case 7:
	code = 200 + (int) (fz_u16(&f->rd) % 360);
	if (code / 10 % 10 > 5)
	    code -= 40;
	break;
    case 8:
	code = 354;
	break;
    case 9:					/* 334 with any text */
	n = fz_take(&f->rd, fz_u8(&f->rd) % 48, &p);
	say(f, "334 ", 4);
	say(f, p, n);
	say(f, "\r\n", 2);
	/* A line end inside makes more replies than commands. */
	if (memchr(p, '\n', n) != NULL || memchr(p, '\r', n) != NULL
	    || memchr(p, 0, n) != NULL)
	    f->m.desync = 1;
	return 334;				/* it now reads a SASL line */
    case 10:					/* silence */
	f->m.desync = 1;
	return 0;
    case 11:					/* garbage */
	n = fz_take(&f->rd, fz_u8(&f->rd) % 32, &p);
	say(f, p, n);
	say(f, "\r\n", 2);
	f->m.desync = 1;
	return 0;
    case 12:					/* a line too long */
	memset(buf, 'x', sizeof(buf));
	say(f, "250 ", 4);
	for (n = 0; n < 12; n++)
	    say(f, buf, sizeof(buf));
	say(f, "\r\n", 2);
	return 0;
    case 13:					/* the right reply, then one more */
	f->m.desync = 1;
	ok = 2;
	break;
    case 14:					/* a NUL inside */
	say(f, "250 a\0b\r\n", 9);
	return 0;
    case 15:					/* hang up after this one */
	f->m.hangup = 1;
	break;
    case 16:
	code = 250;
	break;
    case 17:
	code = 221;
	break;
    case 18:
	code = 500;
	break;
    default:					/* the code changes mid-reply */
	snprintf(buf, sizeof(buf), "%d-first\r\n%d second\r\n", code,
		 code == 250 ? 251 : 250);
	say(f, buf, strlen(buf));
	return 0;
    }
    if (code == 334) {
	/* LOGIN prompts, or a CRAM-MD5 challenge ("<1.2@fz.example>"). */
	if (kind == K_AUTH && strncmp(line, "AUTH CRAM-MD5", 13) == 0)
	    snprintf(buf, sizeof(buf), "334 PDEuMkBmei5leGFtcGxlPg==");
	else
	    snprintf(buf, sizeof(buf), "334 %s", f->m.login_step == 0 ?
		     "VXNlcm5hbWU6" : "UGFzc3dvcmQ6");
	f->m.login_step++;
    } else if (v == 1) {
	snprintf(buf, sizeof(buf), "%d-fz.example first line\r\n%d second", code,
		 code);
    } else if (v == 3 && code >= 200) {
	snprintf(buf, sizeof(buf), "%d %d.0.0 with enhanced code", code,
		 code / 100);
    } else {
	snprintf(buf, sizeof(buf), "%d fz.example says %d", code, code);
    }
    say(f, buf, strlen(buf));
    say(f, v == 2 ? "\n" : "\r\n", v == 2 ? 1 : 2);
    if (ok == 2)
	say(f, "250 and one more\r\n", 18);
    return code;
}

/* msg_of_mail - the message a MAIL FROM line names, or -1 */

static int msg_of_mail(struct fuzz *f, const char *line)
{
    int     i;
    size_t  n;

    if (strncmp(line, "MAIL FROM:<", 11) != 0)
	return -1;
    for (i = 0; i < f->nmsgs; i++) {
	n = strlen(f->msgs[i].sender);
	if (strncmp(line + 11, f->msgs[i].sender, n) == 0 && line[11 + n] == '>')
	    return i;
    }
    return -1;
}

/* rcpt_of_line - the recipient a RCPT TO line names (rK@...), or -1 */

static int rcpt_of_line(const char *line)
{
    if (strncmp(line, "RCPT TO:<r", 10) != 0 || line[10] < '0'
	|| line[10] >= '0' + MAX_RCPTS)
	return -1;
    return line[10] - '0';
}

/* data_done - the server has the whole DATA or BDAT content: check it */

static void data_done(struct fuzz *f, const unsigned char *content, size_t len,
		              int kind)
{
    struct msg *mi;
    int     code, whole = 0, n, i, k;

    if (f->m.cur >= 0) {
	mi = &f->msgs[f->m.cur];
	if (!f->m.desync && (kind == K_BDAT || len > 0)) {
	    FUZZ_CHECK(len == mi->norm.len);
	    FUZZ_CHECK(len == 0 || memcmp(content, mi->norm.data, len) == 0);
	}
	whole = len == mi->norm.len
	    && (len == 0 || memcmp(content, mi->norm.data, len) == 0);
	if (whole)
	    mi->complete = 1;
	/* An empty data (a drained 354's lone dot) with recipients accepted
	 * is an empty message delivered to them. */
	if (!f->m.desync && kind == K_DOT && len == 0)
	    FUZZ_CHECK(f->m.rcpt_ok == 0 || mi->norm.len == 0);
	/* LMTP: no lone dot at all (nobody would answer one). */
	if (f->lmtp && !f->m.desync && kind == K_DOT && len == 0)
	    FUZZ_CHECK(mi->norm.len == 0);
    }
    n = f->m.rcpt_ok;
    f->m.rcpt_ok = 0;
    if (!f->lmtp || n == 0) {
	code = reply(f, kind, "");
	if (whole && code >= 200 && code < 300)
	    f->msgs[f->m.cur].accepted = 1;
	return;
    }
    /* LMTP (RFC 2033 4.2): one reply per recipient accepted, in order. */
    for (i = 0; i < n; i++) {
	code = reply(f, kind, "");
	if (!whole || code < 200 || code >= 300)
	    continue;
	f->msgs[f->m.cur].accepted = 1;
	k = i < (int) (sizeof(f->m.rcpt_acc) / sizeof(f->m.rcpt_acc[0])) ?
	    f->m.rcpt_acc[i] : -1;
	if (k >= 0)
	    f->msgs[f->m.cur].rcpt_took[k] = 1;
    }
}

/* server_line - the server read one command line (CRLF stripped) */

static void server_line(struct fuzz *f, char *line, size_t len)
{
    size_t  i;
    unsigned long n;
    int     kind, code;

    if (!f->m.desync) {
	FUZZ_CHECK(len + 2 <= SMTPS_LINE_MAX);
	for (i = 0; i < len; i++)
	    FUZZ_CHECK((unsigned char) line[i] >= 0x20 && line[i] != 0x7f);
    }
    if (f->m.cont) {
	f->m.cont = 0;
	kind = K_AUTHCONT;
    } else if (strncmp(line, "AUTH ", 5) == 0) {
	kind = K_AUTH;
	f->m.login = strncmp(line, "AUTH LOGIN", 10) == 0;
	f->m.login_step = 0;
    } else if (strncmp(line, "EHLO ", 5) == 0
	       || strncmp(line, "LHLO ", 5) == 0)
	kind = K_EHLO;
    else if (strncmp(line, "HELO ", 5) == 0)
	kind = K_HELO;
    else if (strncmp(line, "MAIL FROM:", 10) == 0)
	kind = K_MAIL;
    else if (strncmp(line, "RCPT TO:", 8) == 0)
	kind = K_RCPT;
    else if (strcmp(line, "DATA") == 0)
	kind = K_DATA;
    else if (strncmp(line, "BDAT ", 5) == 0)
	kind = K_BDAT;
    else if (strcmp(line, "RSET") == 0)
	kind = K_RSET;
    else if (strcmp(line, "QUIT") == 0)
	kind = K_QUIT;
    else
	kind = K_OTHER;

    /* Each protocol its own greeting; LMTP has no HELO (RFC 2033 4.1). */
    if (!f->m.desync && (kind == K_EHLO || kind == K_HELO))
	FUZZ_CHECK(f->lmtp ? line[0] == 'L' : line[0] != 'L');
    if (kind == K_MAIL) {
	f->m.cur = msg_of_mail(f, line);
	if (!f->m.desync)
	    FUZZ_CHECK(f->m.cur >= 0);
    }
    if (kind == K_BDAT) {
	/* The chunk follows the command at once; the reply comes after. */
	n = strtoul(line + 5, NULL, 10);
	if (!f->m.desync) {
	    FUZZ_CHECK(strstr(line, " LAST") != NULL);
	    FUZZ_CHECK(f->m.cur >= 0 && n == f->msgs[f->m.cur].norm.len);
	}
	f->m.mode = S_BDAT;
	f->m.bdat_left = n;
	f->m.data.len = 0;
	if (n == 0) {
	    f->m.mode = S_CMD;
	    data_done(f, NULL, 0, K_BDAT);
	}
	return;
    }
    code = reply(f, kind, line);
    if (kind == K_MAIL || kind == K_RSET || kind == K_EHLO || kind == K_HELO)
	f->m.rcpt_ok = 0;
    if (kind == K_RCPT && code >= 200 && code < 300) {
	if ((size_t) f->m.rcpt_ok
	    < sizeof(f->m.rcpt_acc) / sizeof(f->m.rcpt_acc[0]))
	    f->m.rcpt_acc[f->m.rcpt_ok] = rcpt_of_line(line);
	f->m.rcpt_ok++;
    }
    if (code == 334)
	f->m.cont = 1;
    if (kind == K_DATA && code == 354) {
	f->m.mode = S_DATA;
	f->m.data.len = 0;
	f->m.scan = 0;
    }
    if (kind == K_QUIT && code == 221)
	f->m.hangup = 1;
}

/* server_read - the server takes what the client sent */

static void server_read(struct fuzz *f)
{
    struct model *m = &f->m;
    struct fz_buf plain = {0};
    unsigned char *eol;
    size_t  n, end;
    char    line[LINE_MAX_SEEN + 1];

    for (;;) {
	if (m->in.len == 0)
	    return;
	switch (m->mode) {
	case S_BDAT:
	    n = m->in.len < m->bdat_left ? m->in.len : m->bdat_left;
	    fz_add(&m->data, m->in.data, n);
	    fz_drop(&m->in, n);
	    m->bdat_left -= n;
	    if (m->bdat_left > 0)
		return;
	    /* LMTP never runs ahead: nothing follows the last chunk yet. */
	    if (f->lmtp && !m->desync)
		FUZZ_CHECK(m->in.len == 0);
	    m->mode = S_CMD;
	    data_done(f, m->data.data, m->data.len, K_BDAT);
	    continue;
	case S_DATA:
	    fz_add(&m->data, m->in.data, m->in.len);
	    m->in.len = 0;
	    if ((end = fz_data_end(m->data.data, m->data.len, &m->scan)) == 0)
		return;
	    /* LMTP never runs ahead: nothing follows the dot yet. */
	    if (f->lmtp && !m->desync)
		FUZZ_CHECK(m->data.len == end);
	    /* Whatever follows the end-of-data line is commands again. */
	    fz_add(&m->in, m->data.data + end, m->data.len - end);
	    m->data.len = end;
	    fz_unstuff(&plain, m->data.data, end - 3);
	    m->mode = S_CMD;
	    data_done(f, plain.data, plain.len, K_DOT);
	    fz_free(&plain);
	    continue;
	default:
	    eol = memchr(m->in.data, '\n', m->in.len);
	    if (eol == NULL) {
		if (!m->desync)
		    FUZZ_CHECK(m->in.len < SMTPS_LINE_MAX);
		return;
	    }
	    n = (size_t) (eol - m->in.data);
	    FUZZ_CHECK(n > 0 && m->in.data[n - 1] == '\r');
	    n--;
	    if (n > LINE_MAX_SEEN) {
		FUZZ_CHECK(m->desync);
		n = LINE_MAX_SEEN;
	    }
	    memcpy(line, m->in.data, n);
	    line[n] = 0;
	    fz_drop(&m->in, (size_t) (eol - m->in.data) + 1);
	    server_line(f, line, n);
	    continue;
	}
    }
}

/* server_end - the connection is gone: check a cut-off data stream */

static void server_end(struct fuzz *f)
{
    struct fz_buf plain = {0};
    struct msg *mi;
    size_t  whole;

    if (f->raw || f->m.desync || f->m.cur < 0)
	return;
    mi = &f->msgs[f->m.cur];
    if (f->m.mode == S_DATA) {
	/*
	 * Only complete lines: a cut-off last line may be the start of a
	 * stuffed dot or of the end-of-data line itself.
	 */
	fz_add(&f->m.data, f->m.in.data, f->m.in.len);
	for (whole = f->m.data.len; whole >= 2; whole--)
	    if (f->m.data.data[whole - 2] == '\r'
		&& f->m.data.data[whole - 1] == '\n')
		break;
	if (whole < 2)
	    whole = 0;
	fz_unstuff(&plain, f->m.data.data, whole);
	FUZZ_CHECK(plain.len <= mi->norm.len);
	FUZZ_CHECK(plain.len == 0
		   || memcmp(plain.data, mi->norm.data, plain.len) == 0);
	fz_free(&plain);
    } else if (f->m.mode == S_BDAT) {
	FUZZ_CHECK(f->m.data.len <= mi->norm.len);
	FUZZ_CHECK(f->m.data.len == 0
		   || memcmp(f->m.data.data, mi->norm.data, f->m.data.len) == 0);
    }
}

/* ------------------------------------------------------------------ */
/* The driver                                                          */
/* ------------------------------------------------------------------ */

/* show - with FUZZ_TRACE, one side's bytes, escaped */

static void show(const char *who, const void *p, size_t n)
{
    const unsigned char *c = p;
    size_t  i;

    if (!trace)
	return;
    fprintf(stderr, "%s: \"", who);
    for (i = 0; i < n && i < 600; i++)
	if (c[i] == '\r')
	    fputs("\\r", stderr);
	else if (c[i] == '\n')
	    fputs("\\n", stderr);
	else if (c[i] < 0x20 || c[i] >= 0x7f || c[i] == '"' || c[i] == '\\')
	    fprintf(stderr, "\\x%02x", c[i]);
	else
	    fputc(c[i], stderr);
    fprintf(stderr, "\"%s\n", n > 600 ? "..." : "");
}

/* wire_check - the client's bytes have no bare CR or LF */

static void wire_check(struct fuzz *f, const unsigned char *p, size_t n)
{
    size_t  i;

    if (!f->check_wire)
	return;
    for (i = 0; i < n; i++) {
	if (p[i] == '\n')
	    FUZZ_CHECK(f->last_out == '\r');
	else if (f->last_out == '\r')
	    FUZZ_CHECK(0 && "CR without LF");
	f->last_out = p[i];
    }
}

/* take_output - the driver sends up to max bytes (0: all); returns how many */

static size_t take_output(struct fuzz *f, size_t max)
{
    const char *out = NULL;
    size_t  n = smtps_session_output(f->s, &out), total = 0;

    while (n > 0) {
	FUZZ_CHECK(out != NULL);
	if (max > 0 && n > max - total)
	    n = max - total;
	wire_check(f, (const unsigned char *) out, n);
	show("C", out, n);
	if (!f->raw)
	    fz_add(&f->m.in, out, n);
	smtps_session_consume(f->s, n, f->now);
	total += n;
	if (max > 0 && total >= max)
	    break;
	n = smtps_session_output(f->s, &out);
    }
    if (!f->raw && total > 0)
	server_read(f);
    return total;
}

/* deliver - the server's bytes reach the client, up to max (0: all) */

static size_t deliver(struct fuzz *f, size_t max)
{
    size_t  n = f->m.out.len;

    if (max > 0 && n > max)
	n = max;
    if (n == 0)
	return 0;
    show("S", f->m.out.data, n);
    (void) smtps_session_feed(f->s, (const char *) f->m.out.data, n, f->now);
    fz_drop(&f->m.out, n);
    return n;
}

/* closed - the connection is gone */

static void closed(struct fuzz *f, const char *why)
{
    smtps_session_closed(f->s, why, f->now);
    server_end(f);
}

/* settle - what a driver does after each step: close when told to */

static int settle(struct fuzz *f)
{
    const char *out;
    int     st = smtps_session_status(f->s);

    take_results(f);
    if (st == SMTPS_SESS_CLOSED)
	return 1;
    if (st == SMTPS_SESS_CLOSING && smtps_session_output(f->s, &out) == 0) {
	closed(f, "the client closed");
	return 1;
    }
    if (!f->raw && f->m.hangup && f->m.out.len == 0) {
	closed(f, "the server hung up");
	return 1;
    }
    return 0;
}

/* round - deliver everything, take everything; 1 when anything moved */

static int round_trip(struct fuzz *f)
{
    size_t  moved = 0;

    if (!f->raw)
	moved += deliver(f, 0);
    moved += take_output(f, 0);
    return moved > 0;
}

/* tick - move the clock */

static void tick(struct fuzz *f, unsigned d)
{
    int64_t dl = smtps_session_deadline(f->s);

    if (d == 0xff && dl >= 0)
	f->now = dl;
    else
	f->now += (int64_t) d * 1000;
    (void) smtps_session_tick(f->s, f->now);
}

/* LLVMFuzzerInitialize - one TLS policy for every run */

int     LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void) argc;
    (void) argv;
    tls_cfg = smtps_tls_config_new(NULL, 1);
    trace = getenv("FUZZ_TRACE") != NULL;
    return 0;
}

/* LLVMFuzzerTestOneInput - one session, one program of operations */

int     LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct fuzz f;
    unsigned hdr, op, i, n;
    int     ops, done = 0, still;

    memset(&f, 0, sizeof(f));
    f.rd.p = data;
    f.rd.n = size;
    f.now = 1000000;
    f.last_out = -1;
    f.m.cur = -1;
    hdr = fz_u8(&f.rd);
    f.raw = hdr & 1;
    f.s = smtps_session_new(NULL, "client.fz.example", NULL);
    FUZZ_CHECK(f.s != NULL);
    FUZZ_CHECK(smtps_session_set_addresses(f.s, "192.0.2.1", 25, "192.0.2.2",
					   40000) == 0);
    if (f.raw && (hdr >> 1 & 3) != SMTPS_TLS_NONE && tls_cfg != NULL) {
	FUZZ_CHECK(smtps_session_set_tls(f.s, (int) (hdr >> 1 & 3), tls_cfg,
					 "mx.fz.example") == 0);
	FUZZ_CHECK(smtps_session_set_tls_gate(f.s, tls_gate, &f) == 0);
    }
    f.check_wire = !(f.raw && (hdr >> 1 & 3) != SMTPS_TLS_NONE);
    if (hdr & 0x08)
	FUZZ_CHECK(smtps_session_set_auth(f.s, "user", "secret",
					  (hdr >> 4) & 1 ? SMTPS_AUTH_LOGIN : 0,
					  1) == 0);
    f.lmtp = (hdr >> 7) & 1;
    if (f.lmtp)
	FUZZ_CHECK(smtps_session_set_protocol(f.s, SMTPS_PROTO_LMTP) == 0);
    if (hdr & 0x20)
	smtps_session_set_runahead(f.s, NULL, NULL);
    if (hdr & 0x40)
	for (i = 0; i < SMTPS_STATE__COUNT; i++)
	    FUZZ_CHECK(smtps_session_set_timeout(f.s, (int) i, 5000) == 0);
    n = 1 + fz_u8(&f.rd) % 4;
    for (i = 0; i < n; i++)
	submit(&f);
    FUZZ_CHECK(smtps_session_start(f.s, f.now) == SMTPS_OK);
    FUZZ_CHECK(smtps_session_set_protocol(f.s, SMTPS_PROTO_SMTP) == SMTPS_ESTATE);
    FUZZ_CHECK(smtps_session_protocol(f.s) == (f.lmtp ? SMTPS_PROTO_LMTP :
					       SMTPS_PROTO_SMTP));
    if (!f.raw)
	reply(&f, K_BANNER, "");

    for (ops = 0; f.rd.n > 0 && ops < MAX_OPS && !done; ops++) {
	op = fz_u8(&f.rd);
	switch (op % 8) {
	case 0:				/* a full round trip */
	    round_trip(&f);
	    break;
	case 1:				/* some server bytes */
	    n = fz_u8(&f.rd);
	    if (f.raw) {
		const uint8_t *p;
		size_t  len = fz_take(&f.rd, n + 1, &p);

		show("S", p, len);
		(void) smtps_session_feed(f.s, (const char *) p, len, f.now);
	    } else {
		deliver(&f, n + 1);
	    }
	    break;
	case 2:				/* some client bytes */
	    take_output(&f, fz_u8(&f.rd) + 1);
	    break;
	case 3:
	    tick(&f, fz_u8(&f.rd));
	    break;
	case 4:
	    submit(&f);
	    break;
	case 5:
	    FUZZ_CHECK(smtps_session_quit(f.s, f.now) == SMTPS_OK);
	    break;
	case 6:				/* the server misbehaves on its own */
	    if (f.raw) {
		const uint8_t *p;
		size_t  len = fz_take(&f.rd, fz_u16(&f.rd) % 4096, &p);

		show("S", p, len);
		(void) smtps_session_feed(f.s, (const char *) p, len, f.now);
		break;
	    }
	    f.m.desync = 1;
	    switch (fz_u8(&f.rd) % 4) {
	    case 0:
		say(&f, "250 unsolicited\r\n", 17);
		break;
	    case 1:
		say(&f, "421 going away\r\n", 16);
		break;
	    case 2:
		say(&f, "354 go ahead\r\n", 14);
		break;
	    default:
		f.m.hangup = 1;
		break;
	    }
	    break;
	default:
	    if ((n = fz_u8(&f.rd)) >= 0xf0) {
		closed(&f, "the driver hung up");
		done = 1;
	    } else if (n >= 0xe0) {		/* SMTPS_ESTATE unless it waits */
		(void) smtps_session_tls_proceed(f.s, f.now);
	    }
	    break;
	}
	if (!done)
	    done = settle(&f);
    }

    /*
     * Let the dialogue finish: the server answers correctly from here on
     * (the input is used up), the clock jumps to each deadline when
     * nothing moves, and the client is asked to quit once idle.
     */
    for (ops = 0; ops < 200 && !done; ops++) {
	(void) smtps_session_tls_proceed(f.s, f.now);	/* a turn, if waiting */
	still = !round_trip(&f);
	if ((done = settle(&f)))
	    break;
	if (smtps_session_status(f.s) == SMTPS_SESS_IDLE)
	    FUZZ_CHECK(smtps_session_quit(f.s, f.now) == SMTPS_OK);
	else if (still)
	    tick(&f, 0xff);
	/*
	 * Nothing moves, the session is in the dialogue and no deadline
	 * will end the wait: a real driver would wait forever.
	 */
	FUZZ_CHECK(!(still && smtps_session_deadline(f.s) < 0
		     && smtps_session_status(f.s) == SMTPS_SESS_ACTIVE));
	done = settle(&f);
    }
    if (!done)
	closed(&f, "the fuzzer is done");
    take_results(&f);

    /* Every submitted message has exactly one result. */
    FUZZ_CHECK(smtps_session_status(f.s) == SMTPS_SESS_CLOSED);
    FUZZ_CHECK(smtps_session_pending(f.s) == 0);
    FUZZ_CHECK(smtps_session_next_result(f.s) == NULL);
    for (i = 0; i < (unsigned) f.nmsgs; i++)
	FUZZ_CHECK(f.msgs[i].results == f.msgs[i].submitted);
    FUZZ_CHECK(smtps_session_feed(f.s, "250 late\r\n", 10, f.now) == SMTPS_ECLOSED);

    smtps_session_free(f.s);
    for (i = 0; i < MAX_MSGS; i++)
	fz_free(&f.msgs[i].norm);
    fz_free(&f.m.in);
    fz_free(&f.m.out);
    fz_free(&f.m.data);
    return 0;
}
