/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	smtpstate.h 3h
 * SUMMARY
 *	public C API of the smtpstate SMTP client engine
 * SYNOPSIS
 *	#include "smtpstate.h"
 * DESCRIPTION
 *	This header is the whole public C surface: the state table with
 *	Momentum's registration contract (register_smtp_client_state() and
 *	friends), machines, the sans-I/O session, messages, results, the
 *	reply and capability parsers and the body encoder.
 *
 *	The session never touches a socket. A driver feeds it the bytes the
 *	server sent (smtps_session_feed()), writes what it asks to send
 *	(smtps_session_output() then smtps_session_consume()), and calls
 *	smtps_session_tick() when smtps_session_deadline() has passed. All
 *	times are milliseconds on a monotonic clock chosen by the driver.
 *
 *	Threads: a machine may be used from several threads (registration
 *	takes its lock). A session belongs to one thread at a time.
 * DIAGNOSTICS
 *	Functions of our own return SMTPS_OK (0) or a negative SMTPS_E*
 *	code; smtps_strerror() names it. Momentum's functions keep their
 *	convention: -1 or NULL on failure.
 * SEE ALSO
 *	RFC 5321 (SMTP), RFC 2920 (PIPELINING), RFC 3030 (CHUNKING),
 *	RFC 3461 (DSN), RFC 3463/2034 (enhanced status codes),
 *	RFC 6531 (SMTPUTF8), RFC 1870 (SIZE), RFC 6152 (8BITMIME),
 *	RFC 2033 (LMTP), RFC 8689 (REQUIRETLS).
 *--*/

#ifndef SMTPSTATE_H
#define SMTPSTATE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Error codes, with the words smtps_strerror() gives them. One list, so
 * that the enum and the texts cannot drift apart; each value is written
 * out so that they never shift.
 */
#define SMTPS_ERRORS(X) \
    X(OK, 0, "success") \
    X(ENOMEM, -1, "out of memory") \
    X(EINVAL, -2, "invalid argument")	/* NULL, control byte, ... */ \
    X(ETOOBIG, -3, "size limit exceeded")	/* a line, reply or buffer bound */ \
    X(EPROTO, -4, "SMTP protocol error")	/* the peer broke the protocol */ \
    X(ESTATE, -5, "operation not allowed in this session state") \
    X(EFULL, -6, "table or queue full") \
    X(ECLOSED, -7, "session closed") \
    X(ENOTFOUND, -8, "not found")	/* no such state id, name or class */ \
    X(ETLS, -9, "TLS failure")	/* TLS setup or handshake failed */ \
    X(ENOTSUP, -10, "not supported") \
    X(ESYS, -11, "system call failed")	/* errno says more */ \
    X(EINTR, -12, "interrupted")	/* a state asked to stop at once */ \
    X(EAGAIN, -13, "failed for now")	/* a lookup: SERVFAIL, no answer */

#define SMTPS_X_ERROR(n, v, s) SMTPS_##n = v,
enum smtps_error {
    SMTPS_ERRORS(SMTPS_X_ERROR)
};
#undef SMTPS_X_ERROR

const char *smtps_strerror(int code);

/*
 * What a state's callback tells the dispatch loop. 0 is ERROR on purpose:
 * a callback that fails without saying anything (cffi's default error
 * value) must never read as "carry on".
 */
enum smtps_action {
    SMTPS_ACT_ERROR = 0,	/* the callback failed: fail the transaction */
    SMTPS_ACT_NEXT = 1,		/* go to the next state (smtp_next_state() or default) */
    SMTPS_ACT_JUMP = 2,		/* go to the state set by smtp_next_state(); required */
    SMTPS_ACT_RETRY = 3,	/* enter this same state again (setup runs again) */
    SMTPS_ACT_TEMPFAIL_TX = 4,	/* transaction failed, temporary (4xx) */
    SMTPS_ACT_PERMFAIL_TX = 5,	/* transaction failed, permanent (5xx) */
    SMTPS_ACT_FAIL_CONN = 6,	/* the connection is unusable: end it */
    SMTPS_ACT_ABORT = 7		/* stop now: close without QUIT, fail what is
				 * in hand, and tell the driver (Ctrl-C) */
};

/*
 * Built-in states, in their default order. One list makes the enum, the
 * state table (states.c), the stage each state reports while its replies
 * are awaited and after them, and the default reply timeouts (RFC 5321
 * 4.5.3.2), so that none of them can drift from the others. Columns:
 * name, the prefix of its functions in the library, whether it keeps
 * per-connection data (LOCAL or NOLOCAL), stage awaiting, stage after,
 * timeout, flags.
 */
#define SMTPS_BUILTIN_STATES(X) \
    X(BANNER, banner, NOLOCAL, BANNER, BANNER, SMTPS_TIMEOUT_BANNER, 0) \
    X(EHLO, ehlo, NOLOCAL, EHLO, EHLO_DONE, SMTPS_TIMEOUT_OTHER, 0) \
    X(STARTTLS, starttls, NOLOCAL, STARTTLS, STARTTLS_DONE, SMTPS_TIMEOUT_OTHER, 0) \
    X(AUTH, auth, LOCAL, AUTH, AUTH_DONE, SMTPS_TIMEOUT_OTHER, 0) \
    X(MAIL, mail, NOLOCAL, MAIL, MAIL_DONE, SMTPS_TIMEOUT_MAIL, SMTPS_STATE_PIPELINABLE) \
    X(RCPT, rcpt, NOLOCAL, RCPT, RCPT_DONE, SMTPS_TIMEOUT_RCPT, SMTPS_STATE_PIPELINABLE) \
    X(DATA, data, NOLOCAL, DATA, DATA_DONE, SMTPS_TIMEOUT_DATA, SMTPS_STATE_PIPELINABLE) \
    X(BODY, body, NOLOCAL, BODY, CONFIRM, SMTPS_TIMEOUT_FINAL, 0) \
    X(RSET, rset, NOLOCAL, RSET, RSET_DONE, SMTPS_TIMEOUT_OTHER, 0) \
    X(QUIT, quit, NOLOCAL, IDLE, IDLE, SMTPS_TIMEOUT_OTHER, 0)

#define SMTPS_X_ENUM(n, f, l, sa, sd, t, fl) SMTPS_STATE_##n,
enum smtps_builtin_state {
    SMTPS_BUILTIN_STATES(SMTPS_X_ENUM)
    SMTPS_STATE__COUNT
};
#undef SMTPS_X_ENUM

#define SMTPS_MAX_STATES 64		/* built-in + custom, per machine */
#define SMTPS_STATE_NAME_MAX 63		/* bytes, without the NUL */

/*
 * Connection stages: the classic codes senders log, so that results say
 * where a connection was when something happened.
 */
#define SMTPS_STAGES(X) \
    X(NOT_CONNECTED, 0, "not connected") \
    X(IDLE, 1, "idle") \
    X(MAIL, 2, "sending MAIL FROM") \
    X(MAIL_DONE, 3, "after MAIL FROM") \
    X(RCPT, 4, "sending RCPT TO") \
    X(RCPT_DONE, 5, "after RCPT TO") \
    X(DATA, 6, "sending DATA") \
    X(DATA_DONE, 7, "after DATA") \
    X(BODY, 8, "sending message body") \
    X(CONFIRM, 9, "reading final confirmation") \
    X(EHLO, 10, "sending EHLO") \
    X(EHLO_DONE, 11, "after EHLO") \
    X(BANNER, 12, "reading banner") \
    X(RSET, 13, "sending RSET") \
    X(RSET_DONE, 14, "after RSET") \
    X(STARTTLS, 15, "sending STARTTLS") \
    X(STARTTLS_DONE, 16, "after STARTTLS") \
    X(TLS_HANDSHAKE, 17, "TLS handshake") \
    X(TLS_RENEGOTIATION, 18, "TLS renegotiation") \
    X(XCLIENT, 19, "sending XCLIENT") \
    X(XCLIENT_DONE, 20, "after XCLIENT") \
    X(UNKNOWN, 22, "unknown") \
    X(AUTH, 23, "sending AUTH") \
    X(AUTH_DONE, 24, "after AUTH") \
    X(BEFORE_MAIL, 25, "before MAIL FROM (nothing sent)")

#define SMTPS_X_STAGE(n, v, s) SMTPS_STAGE_##n = v,
enum smtps_stage {
    SMTPS_STAGES(SMTPS_X_STAGE)
    SMTPS_STAGE__COUNT		/* one past the highest code */
};
#undef SMTPS_X_STAGE

const char *smtps_stage_name(int stage);	/* "unknown" for bad codes */

/* ------------------------------------------------------------------ */
/* Replies and capabilities                                            */
/* ------------------------------------------------------------------ */

#define SMTPS_REPLY_LINE_MAX 2048	/* bytes in one reply line, CRLF included */
#define SMTPS_REPLY_MAX 65536		/* bytes in one whole reply */

/*
 * One complete server reply. text holds every line's text (after the code
 * and its separator), lines joined by '\n', NUL-terminated. The pointers
 * belong to whoever produced the reply and are valid only during the call
 * that hands the reply over.
 */
struct smtps_reply {
    int code;				/* 200..599, exactly three digits */
    char enhanced[16];			/* "5.1.1" (RFC 3463/2034) or "" */
    const char *text;
    size_t text_len;
    size_t nlines;
};

struct smtps_reply_parser;		/* opaque, incremental, bounded */

struct smtps_reply_parser *smtps_reply_parser_new(void);
void smtps_reply_parser_free(struct smtps_reply_parser *p);

/*
 * Parse bytes until one reply is complete. Returns 1 when a reply is
 * complete (*consumed says how many bytes of data it used; *out is valid
 * until the next call on p), 0 when all data was consumed and more is
 * needed, SMTPS_EPROTO for a malformed reply, SMTPS_ETOOBIG past a bound.
 * After an error the parser keeps returning that error.
 */
int smtps_reply_parse(struct smtps_reply_parser *p, const char *data,
		      size_t len, size_t *consumed, struct smtps_reply *out);

/*
 * EHLO extensions, AUTH mechanisms and XCLIENT attributes: the bit each
 * gets and the keyword that names it. One list each makes the bits, the
 * parser's keyword tables (reply.c), the AUTH state's names (auth.c) and
 * the names drivers show (smtps_extension_name() and its two siblings).
 * Extension columns: enum suffix, bit, keyword, what its parameters mean
 * to the parser (NONE, SIZE, AUTH, XCLIENT).
 */
#define SMTPS_EXTENSIONS(X) \
    X(PIPELINING, 0, "PIPELINING", NONE)	/* RFC 2920 */ \
    X(SIZE, 1, "SIZE", SIZE)			/* RFC 1870 */ \
    X(8BITMIME, 2, "8BITMIME", NONE)		/* RFC 6152 */ \
    X(SMTPUTF8, 3, "SMTPUTF8", NONE)		/* RFC 6531 */ \
    X(STARTTLS, 4, "STARTTLS", NONE)		/* RFC 3207 */ \
    X(AUTH, 5, "AUTH", AUTH)			/* RFC 4954 */ \
    X(DSN, 6, "DSN", NONE)			/* RFC 3461 */ \
    X(CHUNKING, 7, "CHUNKING", NONE)		/* RFC 3030 */ \
    X(ENHANCEDSTATUSCODES, 8, "ENHANCEDSTATUSCODES", NONE)	/* RFC 2034 */ \
    X(XCLIENT, 9, "XCLIENT", XCLIENT)		/* Postfix XCLIENT */ \
    X(BINARYMIME, 10, "BINARYMIME", NONE)	/* RFC 3030 */ \
    X(REQUIRETLS, 11, "REQUIRETLS", NONE)	/* RFC 8689 */

/* AUTH mechanisms: suffix, bit, name; the AUTH state prefers the first. */
#define SMTPS_AUTH_MECHS(X) \
    X(CRAM_MD5, 2, "CRAM-MD5")		/* RFC 2195 */ \
    X(PLAIN, 0, "PLAIN")		/* RFC 4616 */ \
    X(LOGIN, 1, "LOGIN")		/* draft-murchison-sasl-login */ \
    X(XOAUTH2, 3, "XOAUTH2")		/* Google's; only when asked for */

/* XCLIENT attributes (Postfix XCLIENT_README): suffix, bit, name. */
#define SMTPS_XCLIENT_ATTRS(X) \
    X(NAME, 0, "NAME") \
    X(ADDR, 1, "ADDR") \
    X(PORT, 2, "PORT") \
    X(PROTO, 3, "PROTO") \
    X(HELO, 4, "HELO") \
    X(LOGIN, 5, "LOGIN") \
    X(DESTADDR, 6, "DESTADDR") \
    X(DESTPORT, 7, "DESTPORT")

#define SMTPS_X_EXT(n, b, s, p) SMTPS_EXT_##n = 1 << b,
enum smtps_extension {
    SMTPS_EXTENSIONS(SMTPS_X_EXT)
};
#undef SMTPS_X_EXT

#define SMTPS_X_MECH(n, b, s) SMTPS_AUTH_##n = 1 << b,
enum smtps_auth_mech {
    SMTPS_AUTH_MECHS(SMTPS_X_MECH)
};
#undef SMTPS_X_MECH

#define SMTPS_X_XCLIENT(n, b, s) SMTPS_XCLIENT_##n = 1 << b,
enum smtps_xclient_attr {
    SMTPS_XCLIENT_ATTRS(SMTPS_X_XCLIENT)
};
#undef SMTPS_X_XCLIENT

/* The keyword of one bit, or NULL when the bit names nothing. */
const char *smtps_extension_name(unsigned bit);
const char *smtps_auth_mech_name(unsigned bit);
const char *smtps_xclient_attr_name(unsigned bit);

struct smtps_caps {
    unsigned ext;			/* SMTPS_EXT_* */
    uint64_t size_max;			/* SIZE limit; 0 = none declared */
    unsigned auth;			/* SMTPS_AUTH_* */
    unsigned xclient;			/* SMTPS_XCLIENT_* */
};

/*
 * Fill caps from a 250 EHLO reply (its first line, the greeting, is
 * skipped). Keywords match exactly, case-insensitively. Returns SMTPS_OK,
 * or SMTPS_EINVAL for a NULL argument or a reply that is not 250.
 */
int smtps_caps_parse(const struct smtps_reply *ehlo, struct smtps_caps *caps);

/* ------------------------------------------------------------------ */
/* Body encoding (RFC 5321 4.5.2, 2.3.8)                               */
/* ------------------------------------------------------------------ */

/*
 * Incremental encoder: bare CR, bare LF and CR LF all become CR LF; with
 * dot_stuff, a '.' at the start of a line is doubled. Chunk boundaries
 * never change the output.
 */
struct smtps_body_encoder {
    int dot_stuff;			/* 1 for DATA, 0 for BDAT */
    int at_line_start;			/* next output byte starts a line */
    int after_cr;			/* last input byte was a CR */
    uint64_t out_total;			/* bytes produced so far */
};

#define SMTPS_BODY_STEP_MAX 3		/* most bytes one input byte yields */
#define SMTPS_BODY_FINISH_MAX 5		/* "\r\n.\r\n" */

void smtps_body_init(struct smtps_body_encoder *e, int dot_stuff);

/*
 * Encode from in into out while both have room. Returns bytes written;
 * *in_used says how much input was consumed. It stops early rather than
 * split one input byte's output, so outcap < SMTPS_BODY_STEP_MAX may
 * consume nothing.
 */
size_t smtps_body_encode(struct smtps_body_encoder *e, const char *in,
			 size_t inlen, size_t *in_used, char *out,
			 size_t outcap);

/*
 * End the body: CR LF when the last line is unterminated, then, with
 * end_dot, the end-of-data line ".\r\n". Needs SMTPS_BODY_FINISH_MAX bytes
 * of room; returns bytes written, or 0 when outcap is too small.
 */
size_t smtps_body_finish(struct smtps_body_encoder *e, char *out,
			 size_t outcap, int end_dot);

/* Length of the normalised body (unterminated last line completed), no
 * dot-stuffing, no end-of-data line: the size BDAT announces. */
uint64_t smtps_body_encoded_length(const char *in, size_t len);

/* 1 when any byte has the high bit set (needs 8BITMIME), else 0. */
int smtps_body_is_8bit(const char *in, size_t len);

/*
 * What a body holds that decides whether and how it may be sent, learned
 * in one pass that may be split anywhere (a file read in pieces, a stream):
 *
 * - NUL bytes are refused: a lenient hop may drop them, and "CR LF NUL .
 *   CR LF" then ends the data early (BINARYMIME, which could carry them,
 *   is not supported);
 * - a line longer than SMTPS_LINE_OCTETS_MAX octets (RFC 5322 2.1.1, CR LF
 *   not counted) is refused unless allowed: a hop may fold, cut or refuse
 *   it, so the message that arrives is not the one sent;
 * - 8-bit bytes need 8BITMIME (RFC 6152);
 * - size is what RFC 1870 declares: the octets sent, CR LF included, the
 *   quoting dots not (smtps_body_scan_finish() adds the CR LF that
 *   completes an unterminated last line).
 */
#define SMTPS_LINE_OCTETS_MAX 998

#define SMTPS_BODY_NUL 1		/* problem: a NUL byte */
#define SMTPS_BODY_LONG_LINE 2		/* problem: a line over the limit */

#define SMTPS_BODY_ALLOW_LONG_LINES (1u << 0)	/* body option: no line limit */

struct smtps_body_scan {
    unsigned flags;			/* SMTPS_BODY_ALLOW_* */
    uint64_t offset;			/* input bytes scanned */
    uint64_t size;			/* RFC 1870 size so far */
    uint64_t line;			/* number of the line being scanned, from 1 */
    uint64_t line_len;			/* its octets so far */
    uint64_t longest;			/* the longest line seen, in octets */
    int after_cr;			/* the last byte was a CR */
    int is_8bit;			/* a byte >= 0x80 was seen */
    int problem;			/* SMTPS_BODY_NUL, _LONG_LINE: the first; 0 none */
    uint64_t problem_line;		/* where it is */
    uint64_t problem_offset;
};

void smtps_body_scan_init(struct smtps_body_scan *sc, unsigned flags);

/* Scan the next piece; returns sc->problem (0 while there is none). */
int smtps_body_scan(struct smtps_body_scan *sc, const char *in, size_t len);

/* The end of the body: completes sc->size; returns sc->problem. */
int smtps_body_scan_finish(struct smtps_body_scan *sc);

/*
 * A whole body in memory at once: the problem init, scan and finish would
 * find (0: none); the usual body is settled without the scan (body.c).
 */
int smtps_body_check(const char *in, size_t len, unsigned flags);

/* ------------------------------------------------------------------ */
/* The state table: Momentum's contract                                */
/* ------------------------------------------------------------------ */

struct smtps_session;
typedef struct smtp_state smtp_state;

/*
 * SMTPStateInitLocal - make this state's per-session data. Called once per
 * session, the first time the state is entered; *local starts NULL.
 * Returns 0, or a negative SMTPS_E* code (the transaction then fails).
 */
typedef int (*SMTPStateInitLocal) (struct smtps_session *session,
				   void *closure, void **local);

/*
 * SMTPStateSetup - the state is entered. May queue command lines with
 * smtps_session_send_line(). Returns the number of replies the state
 * awaits (0 or more), or a negative SMTPS_E* code (the transaction fails).
 * A NULL setup awaits 0 replies.
 */
typedef int (*SMTPStateSetup) (struct smtps_session *session, void *closure);

/*
 * SMTPStateCallback - called once per awaited reply, in order; when setup
 * awaited 0 replies it is called once with reply == NULL. Returns an
 * enum smtps_action. Only the action returned for the last awaited reply
 * moves the machine; for earlier replies, any failure action fails at
 * once and NEXT means "keep going". Required.
 */
typedef int (*SMTPStateCallback) (struct smtps_session *session,
				  const struct smtps_reply *reply,
				  void *closure);

/* SMTPStateFree - release what init_local_state made; the session ends. */
typedef void (*SMTPStateFree) (struct smtps_session *session, void *local,
			       void *closure);

/*
 * SMTPStateToStage - the connection stage (enum smtps_stage, or a code of
 * the module's own) the session is in while in this state. awaiting is 1
 * while replies are still expected. NULL means SMTPS_STAGE_UNKNOWN.
 */
typedef int (*SMTPStateToStage) (struct smtps_session *session, int awaiting,
				 void *closure);

/* SMTPStageToString - a stage code's name. NULL means smtps_stage_name(). */
typedef const char *(*SMTPStageToString) (int stage, void *closure);

/* State flags (our extension, appended after Momentum's fields). */
#define SMTPS_STATE_PIPELINABLE (1u << 0)	/* may run ahead under RFC 2920 */

struct smtp_state {
    size_t sizeof_smtp_state;		/* ABI guard: sizeof what the caller built */
    const char *name;			/* unique, 1..SMTPS_STATE_NAME_MAX bytes */
    int id;				/* assigned at registration */
    SMTPStateInitLocal init_local_state;
    SMTPStateSetup setup;
    SMTPStateCallback callback;
    SMTPStateFree free;
    SMTPStateToStage tostage;
    SMTPStageToString tostring;
    smtp_state *next;			/* the next state in the order */
    void *closure;			/* handed back untouched to every callback */
    unsigned flags;			/* SMTPS_STATE_*; absent in older callers */
};

/* The smallest sizeof_smtp_state accepted: a struct ending at callback. */
#define SMTPS_STATE_MIN_SIZE \
    (offsetof(struct smtp_state, callback) + sizeof(SMTPStateCallback))

/*
 * Register a custom state after the state with id insert_after (-1: at the
 * very front, before BANNER) in the default machine. Every field is copied
 * (the name deep-copied) except closure, kept as given. Returns the new id,
 * or -1 (NULL state, unknown insert_after, duplicate or empty name, NULL
 * callback, unacceptable sizeof_smtp_state, table full).
 */
int register_smtp_client_state(smtp_state *state, int insert_after);

/* The state with this id in the default machine, or NULL. */
smtp_state *smtp_get_state(int id);

/* The first state of the default machine; next walks the whole order. */
smtp_state *smtp_get_state_machine(void);

/*
 * From inside a callback: make state the one entered next (NULL: the
 * default next state). Only the id of state is used, so a pointer from any
 * machine's table names the same id in the session's own snapshot.
 */
void smtp_next_state(struct smtps_session *session, smtp_state *state);

/* ------------------------------------------------------------------ */
/* Machines                                                            */
/* ------------------------------------------------------------------ */

struct smtps_machine;

struct smtps_machine *smtps_default_machine(void);
struct smtps_machine *smtps_machine_new(void);	/* the built-in order */
void smtps_machine_free(struct smtps_machine *m);	/* drops a reference */

int smtps_machine_register(struct smtps_machine *m, smtp_state *state,
			   int insert_after);
smtp_state *smtps_machine_get(struct smtps_machine *m, int id);
smtp_state *smtps_machine_head(struct smtps_machine *m);
int smtps_machine_find(struct smtps_machine *m, const char *name);	/* id or SMTPS_ENOTFOUND */
int smtps_machine_count(struct smtps_machine *m);

/* ------------------------------------------------------------------ */
/* Messages                                                            */
/* ------------------------------------------------------------------ */

/* DSN RET (RFC 3461) */
#define SMTPS_DSN_RET_NONE 0
#define SMTPS_DSN_RET_FULL 1
#define SMTPS_DSN_RET_HDRS 2

/* DSN NOTIFY flags; 0 = not asked */
#define SMTPS_NOTIFY_NEVER	(1u << 0)
#define SMTPS_NOTIFY_SUCCESS	(1u << 1)
#define SMTPS_NOTIFY_FAILURE	(1u << 2)
#define SMTPS_NOTIFY_DELAY	(1u << 3)

struct smtps_message;

/*
 * Addresses and parameters are validated: a control byte (below 0x20, or
 * 0x7f), an angle bracket or a byte over SMTPS_ADDRESS_MAX gives
 * SMTPS_EINVAL. Non-ASCII addresses mark the message as needing SMTPUTF8.
 */
#define SMTPS_ADDRESS_MAX 1024
#define SMTPS_MAX_RECIPIENTS 10000

struct smtps_message *smtps_message_new(void);
void smtps_message_free(struct smtps_message *m);
int smtps_message_set_sender(struct smtps_message *m, const char *addr,
			     size_t len);
int smtps_message_add_recipient(struct smtps_message *m, const char *addr,
				size_t len, unsigned notify,
				const char *orcpt, size_t orcpt_len);
/*
 * The content, three ways. Each refuses (SMTPS_EINVAL) a body with a NUL
 * byte, or with a line over SMTPS_LINE_OCTETS_MAX octets unless the
 * options allow it (smtps_body_scan() says where): set the options first.
 *
 * smtps_message_set_body() copies data. smtps_message_set_body_ref()
 * keeps a pointer to it: the caller keeps it alive and unchanged until
 * the message's result is out (a mapped file, a large buffer: no copy).
 * smtps_message_set_body_fixed() is set_body_ref() for bytes that can
 * never change (a Python bytes object) and that the caller keeps alive
 * until the results of every message copied from this one
 * (smtps_message_copy() with body NULL) are out: the copies share them,
 * checked once here, and a driver that writes iovecs sends them from
 * where they are.
 * smtps_message_set_body_source() reads the content as it is sent (a
 * file, a stream): read(closure, offset, buf, cap, why, why_cap) fills
 * buf with up to cap bytes from offset and returns how many (0: the end),
 * or a negative SMTPS_E* code (SMTPS_EINVAL: the content is wrong,
 * SMTPS_EINTR: stop the driver) after writing why in why (NUL-terminated,
 * why_cap bytes with the NUL). size is the RFC 1870 size
 * when known (smtps_body_scan()), else -1; is_8bit 0 or 1 when known,
 * else -1. Such a body is checked as it goes: a NUL, an overlong line or
 * 8-bit content the server cannot take then fails the message and closes
 * the connection before the final dot, so that nothing is delivered. It
 * always goes by DATA: a BDAT chunk must announce its length.
 */
typedef long (*SMTPSBodyRead) (void *closure, uint64_t offset, char *buf,
			       size_t cap, char *why, size_t why_cap);

int smtps_message_set_body_options(struct smtps_message *m, unsigned flags);
int smtps_message_set_body(struct smtps_message *m, const char *data,
			   size_t len);	/* copied */
int smtps_message_set_body_ref(struct smtps_message *m, const char *data,
			       size_t len);
int smtps_message_set_body_fixed(struct smtps_message *m, const char *data,
				 size_t len);	/* immutable, shared */
int smtps_message_set_body_source(struct smtps_message *m, SMTPSBodyRead read,
				  void *closure, int64_t size, int is_8bit);
int smtps_message_set_dsn(struct smtps_message *m, int ret,
			  const char *envid, size_t envid_len);
/*
 * REQUIRETLS (RFC 8689): require is 1 or 0. A message that requires TLS
 * goes only to a server that offers REQUIRETLS in its EHLO reply over TLS
 * whose certificate was verified (or authenticated by DANE), with the
 * REQUIRETLS parameter of MAIL FROM; any other server gets no MAIL for it,
 * and every recipient fails for good (5.7.30, before MAIL: no transaction
 * is opened). SMTPS_EINVAL for another value.
 */
int smtps_message_set_require_tls(struct smtps_message *m, int require);
int smtps_message_require_tls(const struct smtps_message *m);	/* 1 or 0 */
/*
 * SMTPUTF8 (RFC 6531) on MAIL FROM even when every address is ASCII (on
 * is 1 or 0): a relay that received the message with SMTPUTF8 keeps it.
 * A server without the extension then gets no MAIL for it: the message
 * fails for good (5.6.7), as one with a non-ASCII address does.
 * SMTPS_EINVAL for another value.
 */
int smtps_message_set_smtputf8(struct smtps_message *m, int on);
const char *smtps_message_sender(const struct smtps_message *m);
size_t smtps_message_recipient_count(const struct smtps_message *m);
const char *smtps_message_recipient(const struct smtps_message *m, size_t i);
uint64_t smtps_message_size(const struct smtps_message *m);	/* body bytes; UINT64_MAX: a source */
uint64_t smtps_message_tag(const struct smtps_message *m);	/* set at submit */
/*
 * 1 when sender, the nrcpt recipients in rcpts (joined by one LF each,
 * none after the last) and an in-memory body are certainly acceptable as
 * they are: every address printable ASCII without angle brackets, at most
 * SMTPS_ADDRESS_MAX bytes, a recipient not empty, at most
 * SMTPS_MAX_RECIPIENTS of them, and the body passes smtps_body_check()
 * with no option. Else 0, which says only "check in full": a binding's
 * fast path, one call for what is usually all fine.
 */
int smtps_message_check_plain(const char *sender, size_t sender_len,
			      const char *rcpts, size_t rcpts_len,
			      size_t nrcpt, const char *body, size_t body_len);

/*
 * A new message with the sender, recipients, DSN, REQUIRETLS and body
 * options of envelope (a message set up as above, only read here) and a
 * copy of body: what is sent many times is built and checked once. With body
 * NULL (and len 0), the envelope's own body instead: a reference or a
 * source is shared, a copied body copied.
 */
struct smtps_message *smtps_message_copy(const struct smtps_message *envelope,
					 const char *body, size_t len);

/* ------------------------------------------------------------------ */
/* Results                                                             */
/* ------------------------------------------------------------------ */

/*
 * What became of a message, and of each of its recipients. A result handed
 * to a driver holds only final statuses: a message is DELIVERED (to every
 * recipient), PARTIAL (to some), TEMPFAIL, PERMFAIL or UNKNOWN; a
 * recipient is DELIVERED, TEMPFAIL, PERMFAIL, UNKNOWN or NOT_SENT.
 */
enum smtps_status {
    SMTPS_STATUS_DELIVERED = 1,	/* final reply 2xx */
    SMTPS_STATUS_TEMPFAIL = 2,	/* try again later */
    SMTPS_STATUS_PERMFAIL = 3,	/* do not try again */
    SMTPS_STATUS_UNKNOWN = 4,	/* lost after the final dot: maybe delivered (RFC 1047) */
    SMTPS_STATUS_PARTIAL = 6,	/* message: delivered to some recipients only */
    SMTPS_STATUS_NOT_SENT = 7	/* recipient: the message was not sent to it
				 * (a state ended the transaction first, or
				 * its RCPT never had an answer) */
};

/*
 * A recipient's status while its transaction runs, never in a final
 * result: a state reading smtps_session_rcpt_index() may meet them.
 */
#define SMTPS_RCPT_PENDING 0		/* no RCPT reply yet */
#define SMTPS_RCPT_ACCEPTED 5		/* RCPT 2xx; the message's fate decides */

struct smtps_result_reply {
    int code;				/* 0 when there was no reply */
    char enhanced[16];
    char *text;				/* NUL-terminated, never NULL */
};

struct smtps_result_rcpt {
    int status;				/* enum smtps_status */
    struct smtps_result_reply reply;	/* its RCPT reply; without one, the
					 * reply that failed the message */
    int bounce_class;			/* enum smtps_bounce_class; 0: not failed */
    int route;				/* its index in route[]; -1: none */
    char enhanced[16];			/* RFC 3463 code of a failure decided
					 * here, without a failing reply of
					 * its own or the message's ("4.4.2");
					 * "" otherwise */
};

/*
 * Where recipients went (the engine fills it in): the host it was
 * delivered to or last tried (an MX host, the host given, or
 * "unix:/path") and the address. A message routed to several
 * destinations has one entry per destination.
 */
#define SMTPS_RESULT_HOST_MAX 255
struct smtps_result_route {
    char mx[SMTPS_RESULT_HOST_MAX + 1];	/* "" when none was reached */
    char ip[48];			/* numeric; "" when none */
};

struct smtps_result {
    uint64_t tag;			/* the tag given to smtps_session_submit() */
    int status;				/* enum smtps_status, from its recipients */
    int state;				/* id of the state it ended in */
    int stage;				/* connection stage it ended in */
    char stage_name[64];
    struct smtps_result_reply reply;	/* the deciding reply */
    char *reason;			/* why, when no reply says it; never NULL */
    size_t nrcpt;
    struct smtps_result_rcpt *rcpt;
    struct smtps_result *next;		/* the session's queue; ignore */
    int bounce_class;			/* enum smtps_bounce_class; 0: delivered */
    size_t nroute;
    struct smtps_result_route *route;
    void *owner;			/* the engine's (a part of a message); ignore */
    char enhanced[16];			/* RFC 3463 code of a failure decided
					 * here, no failing reply ("4.4.1",
					 * "5.3.4"); "" otherwise */
};

void smtps_result_free(struct smtps_result *r);

/* ------------------------------------------------------------------ */
/* Bounce classification (classify.c)                                  */
/* ------------------------------------------------------------------ */

/*
 * The classic bounce classes senders use, with their numeric codes. One
 * list, so that the enum and the names cannot drift apart. A result that
 * failed, and each of its recipients that failed, carries one of these
 * (or a class registered with smtps_bounce_register_class()); 0 means
 * "not a failure".
 */
#define SMTPS_BOUNCE_CLASSES(X) \
    X(UNDETERMINED, 1, "undetermined") \
    X(INVALID_RECIPIENT, 10, "invalid recipient") \
    X(SOFT_BOUNCE, 20, "soft bounce") \
    X(DNS_FAILURE, 21, "DNS failure") \
    X(MAILBOX_FULL, 22, "mailbox full") \
    X(TOO_LARGE, 23, "too large") \
    X(TIMEOUT, 24, "timeout") \
    X(ADMIN_FAILURE, 25, "admin failure") \
    X(NO_RCPT, 30, "generic bounce: no RCPT") \
    X(GENERIC_BOUNCE, 40, "generic bounce") \
    X(MAIL_BLOCK, 50, "mail block") \
    X(SPAM_BLOCK, 51, "spam block") \
    X(SPAM_CONTENT, 52, "spam content") \
    X(PROHIBITED_ATTACHMENT, 53, "prohibited attachment") \
    X(RELAYING_DENIED, 54, "relaying denied") \
    X(AUTO_REPLY, 60, "auto-reply") \
    X(TRANSIENT_FAILURE, 70, "transient failure") \
    X(SUBSCRIBE, 80, "subscribe") \
    X(UNSUBSCRIBE, 90, "unsubscribe") \
    X(CHALLENGE_RESPONSE, 100, "challenge-response")

#define SMTPS_X_BOUNCE(n, v, s) SMTPS_BOUNCE_##n = v,
enum smtps_bounce_class {
    SMTPS_BOUNCE_NONE = 0,		/* not a failure */
    SMTPS_BOUNCE_CLASSES(SMTPS_X_BOUNCE)
    SMTPS_BOUNCE_CLASS_MAX = 999	/* the highest code a class may have */
};
#undef SMTPS_X_BOUNCE

#define SMTPS_BOUNCE_NAME_MAX 63	/* bytes in a class name, without the NUL */
#define SMTPS_BOUNCE_USER_CLASSES 64	/* classes that may be registered */
#define SMTPS_BOUNCE_USER_RULES 256	/* rules that may be added */

/*
 * A rule of the caller's: when a reply matches every condition given, it
 * gets bounce_class. Rules are tried in the order added, before the
 * built-in ones. At least one condition must be given.
 */
struct smtps_bounce_rule {
    size_t sizeof_bounce_rule;		/* ABI guard */
    int bounce_class;			/* built-in or registered */
    int code;				/* 0: any; 2..5: first digit; 200..599: exact */
    const char *enhanced;		/* "5.7.1", "5.7.*", "*.1.1"; NULL: any */
    const char *text;			/* ASCII case-insensitive substring; NULL: any */
};

/*
 * Classify a failure reply (code, RFC 3463 enhanced code or "" or NULL,
 * its text). The enhanced code decides first when it is specific, then
 * the text, then the code. Returns a class, or SMTPS_BOUNCE_NONE for a
 * code below 400. Thread-safe.
 */
int smtps_bounce_classify(int code, const char *enhanced, const char *text,
			  size_t text_len);

/*
 * Classify a failure no reply decided (status is SMTPS_STATUS_*): a
 * timeout, a name that does not resolve, a lost connection, a refusal
 * before sending. reason is the result's reason text.
 */
int smtps_bounce_classify_reason(int status, const char *reason);

/*
 * The RFC 3463 enhanced code of a failure decided here, without a reply
 * (status SMTPS_STATUS_*, reason the result's reason): "4.4.1" for a
 * connection refused or not answered, "5.3.4" for a message over the
 * server's SIZE, ... (classify.c has the one list). A code at the start
 * of the reason ("5.7.30 REQUIRETLS ...") is taken as it is. The class
 * digit is the status's: 5 for PERMFAIL, else 4. Writes "" for a status
 * that is no failure. SMTPS_OK, SMTPS_EINVAL for a NULL out or cap < 16.
 */
int smtps_bounce_local_enhanced(int status, const char *reason, char *out,
				size_t cap);

/*
 * Set r->bounce_class and each recipient's from what r says, and the
 * enhanced codes of failures decided here (r->enhanced, each
 * recipient's enhanced).
 */
void smtps_bounce_classify_result(struct smtps_result *r);

/*
 * Copy a class's name into out (cap bytes, NUL-terminated, truncated to
 * fit). Copied under the registry's lock, so that a class re-registered
 * or reset by another thread never leaves the caller a changing string.
 * SMTPS_OK, SMTPS_ENOTFOUND when no class has that code, SMTPS_EINVAL for
 * a NULL out or cap 0.
 */
int smtps_bounce_class_name(int bounce_class, char *out, size_t cap);

/*
 * Register a class of one's own: code 1..SMTPS_BOUNCE_CLASS_MAX, not a
 * built-in one; name 1..SMTPS_BOUNCE_NAME_MAX printable ASCII bytes
 * (copied). Registering the same code with the same name again is
 * SMTPS_OK. SMTPS_EINVAL for a bad or taken code or a bad name,
 * SMTPS_EFULL past SMTPS_BOUNCE_USER_CLASSES.
 */
int smtps_bounce_register_class(int code, const char *name);

/* Add a rule (copied). SMTPS_EINVAL for a bad one, SMTPS_EFULL when full. */
int smtps_bounce_add_rule(const struct smtps_bounce_rule *rule);

/* Forget every registered class and added rule. */
void smtps_bounce_reset(void);

/* ------------------------------------------------------------------ */
/* Sessions: one SMTP connection, sans I/O                             */
/* ------------------------------------------------------------------ */

enum smtps_session_status {
    SMTPS_SESS_NEW = 0,		/* not started */
    SMTPS_SESS_ACTIVE = 1,	/* in the dialogue */
    SMTPS_SESS_IDLE = 2,	/* ready for a message (queue empty) */
    SMTPS_SESS_CLOSING = 3,	/* flush the output, then close */
    SMTPS_SESS_CLOSED = 4	/* done; every message has its result */
};

/* RFC 5321 4.5.3.2 default deadlines, milliseconds. */
#define SMTPS_TIMEOUT_BANNER	300000
#define SMTPS_TIMEOUT_MAIL	300000
#define SMTPS_TIMEOUT_RCPT	300000
#define SMTPS_TIMEOUT_DATA	120000
#define SMTPS_TIMEOUT_BLOCK	180000
#define SMTPS_TIMEOUT_FINAL	600000
#define SMTPS_TIMEOUT_OTHER	300000

/*
 * The longest timeout anything takes (30 days, in ms): a longer one is
 * cut to it, so that a deadline (now + timeout) can never overflow.
 */
#define SMTPS_TIMEOUT_MAX	2592000000LL

#define SMTPS_HELO_MAX 255
#define SMTPS_LINE_MAX 2048		/* a command line sent, CRLF included */

/* A session on a snapshot of m taken now; helo is the EHLO/HELO name. */
struct smtps_session *smtps_session_new(struct smtps_machine *m,
					const char *helo, void *user);
void smtps_session_free(struct smtps_session *s);

/*
 * Deadline for replies while in state id (0: disable; above
 * SMTPS_TIMEOUT_MAX: SMTPS_TIMEOUT_MAX). Times given to the session
 * ("now") are milliseconds, 0 or more, on one monotonic clock.
 */
int smtps_session_set_timeout(struct smtps_session *s, int state_id, int64_t ms);

int smtps_session_start(struct smtps_session *s, int64_t now);	/* connected */
int smtps_session_feed(struct smtps_session *s, const char *data, size_t len,
		       int64_t now);
/*
 * The bytes to send, in *data: valid until the next call on s (consume()
 * may free the buffer, as an idle session keeps none).
 */
size_t smtps_session_output(struct smtps_session *s, const char **data);
void smtps_session_consume(struct smtps_session *s, size_t n, int64_t now);
int64_t smtps_session_deadline(const struct smtps_session *s);	/* -1: none */
int smtps_session_tick(struct smtps_session *s, int64_t now);
void smtps_session_closed(struct smtps_session *s, const char *why, int64_t now);
int smtps_session_status(const struct smtps_session *s);

/*
 * Queue msg; the session owns it on SMTPS_OK only. An idle session starts
 * it at once, its deadlines counted from now.
 */
int smtps_session_submit(struct smtps_session *s, struct smtps_message *msg,
			 uint64_t tag, int64_t now);
/* End the connection (QUIT) once the queue is done. */
int smtps_session_quit(struct smtps_session *s, int64_t now);
size_t smtps_session_pending(const struct smtps_session *s);	/* submitted, no result yet */
struct smtps_result *smtps_session_next_result(struct smtps_session *s);
unsigned smtps_session_transactions(const struct smtps_session *s);	/* begun here */

/*
 * 1 while the session runs a state (inside feed(), start(), consume(),
 * tick(), submit() or quit()): a driver must not free it then, and
 * smtps_session_free() called from a state does nothing.
 */
int smtps_session_dispatching(const struct smtps_session *s);

/* 1 once a state returned SMTPS_ACT_ABORT or SMTPS_EINTR: stop driving. */
int smtps_session_interrupted(const struct smtps_session *s);

/* For states, from inside their callbacks. */
int smtps_session_send_line(struct smtps_session *s, const char *line,
			    size_t len);	/* CRLF added; control bytes refused */
const struct smtps_caps *smtps_session_caps(const struct smtps_session *s);
int smtps_session_pipelining(const struct smtps_session *s);
const struct smtps_message *smtps_session_message(const struct smtps_session *s);
void *smtps_session_user(const struct smtps_session *s);
void smtps_session_set_user(struct smtps_session *s, void *user);

/*
 * Drivers record the connection's addresses (numeric, e.g. "127.0.0.1",
 * "::1") before smtps_session_start(), so that states can use them (a
 * PROXY protocol line, XCLIENT). The getters return "" and port 0 when
 * unknown.
 */
#define SMTPS_ADDRESS_TEXT_MAX 63
int smtps_session_set_addresses(struct smtps_session *s, const char *peer,
				int peer_port, const char *local,
				int local_port);
const char *smtps_session_peer(const struct smtps_session *s, int *port);
const char *smtps_session_local_address(const struct smtps_session *s,
					int *port);
void *smtps_session_local(const struct smtps_session *s, int state_id);
int smtps_session_state(const struct smtps_session *s);	/* current state id */
size_t smtps_session_reply_index(const struct smtps_session *s);
int smtps_session_set_reason(struct smtps_session *s, const char *text);
const char *smtps_session_reason(const struct smtps_session *s);	/* why it closed */
int smtps_session_rcpt_index(const struct smtps_session *s);	/* RCPT being answered */
int smtps_session_set_rcpt_result(struct smtps_session *s, size_t i,
				  const struct smtps_reply *reply);

/*
 * The transcript (our extension): a driver that wants to log the dialogue
 * sets a trace function, called with the plaintext as it is queued or
 * parsed, whatever TLS does to it on the wire. Nothing is copied for it
 * when none is set. What AUTH sends is never shown: the function gets
 * "AUTH PLAIN [credentials redacted]" and the like instead. Server text
 * is handed over as received: control characters included, so a logger
 * must make them harmless.
 */
#define SMTPS_TRACE_SENT 1		/* one command line we queued, no CRLF */
#define SMTPS_TRACE_RECEIVED 2		/* one reply line ("250-SIZE 1000"), no CRLF */
#define SMTPS_TRACE_DATA 3		/* the message content as given, before encoding */
#define SMTPS_TRACE_NOTE 4		/* an event in words ("TLS is up: TLSv1.3 ...") */

typedef void (*SMTPSTrace) (struct smtps_session *session, int kind,
			    const char *data, size_t len, void *closure);

/* Set (or, with NULL, remove) the trace function; any time. */
int smtps_session_set_trace(struct smtps_session *s, SMTPSTrace fn,
			    void *closure);

/* ------------------------------------------------------------------ */
/* The protocol a session speaks: SMTP or LMTP (RFC 2033)              */
/* ------------------------------------------------------------------ */

/*
 * One list makes the enum, the names drivers show (smtps_protocol_name())
 * and the greeting each protocol sends (states.c). Columns: suffix,
 * value, name, greeting command.
 *
 * LMTP differs from SMTP in three places only: the greeting is LHLO
 * (never HELO: a refused LHLO ends the connection); the end of data
 * (the final dot, or BDAT ... LAST) is answered once per recipient
 * accepted at RCPT, in RCPT order, and each of those replies is that
 * recipient's final status and reply; and a session never starts the
 * next transaction behind a final dot (smtps_session_set_runahead() is
 * ignored), since the replies owed to that dot are not one.
 */
#define SMTPS_PROTOCOLS(X) \
    X(SMTP, 0, "smtp", "EHLO")		/* RFC 5321; the default */ \
    X(LMTP, 1, "lmtp", "LHLO")		/* RFC 2033 */

#define SMTPS_X_PROTOCOL(n, v, s, g) SMTPS_PROTO_##n = v,
enum smtps_protocol {
    SMTPS_PROTOCOLS(SMTPS_X_PROTOCOL)
    SMTPS_PROTO__COUNT
};
#undef SMTPS_X_PROTOCOL

/* The name of a protocol ("smtp", "lmtp"), or NULL when it names none. */
const char *smtps_protocol_name(int protocol);

/*
 * Before smtps_session_start(): the protocol this session speaks
 * (SMTPS_PROTO_*; SMTPS_PROTO_SMTP unless set). SMTPS_EINVAL for an
 * unknown one, SMTPS_ESTATE once the session has started.
 */
int smtps_session_set_protocol(struct smtps_session *s, int protocol);
int smtps_session_protocol(const struct smtps_session *s);	/* SMTPS_PROTO_* */

/* ------------------------------------------------------------------ */
/* TLS (RFC 3207) and AUTH (RFC 4954), per session                     */
/* ------------------------------------------------------------------ */

/* TLS modes */
#define SMTPS_TLS_NONE 0		/* never; STARTTLS is not sent */
#define SMTPS_TLS_OPPORTUNISTIC 1	/* STARTTLS when offered, certificate not
					 * checked (RFC 7435); else clear */
#define SMTPS_TLS_STARTTLS 2		/* STARTTLS required, certificate and name
					 * verified: only QUIT in clear otherwise */
#define SMTPS_TLS_VERIFY SMTPS_TLS_STARTTLS
#define SMTPS_TLS_DANE 4		/* engine: DANE (RFC 7672) where an MX host has
					 * DNSSEC-validated TLSA records, else
					 * opportunistic (Postfix's "dane") */
#define SMTPS_TLS_DANE_ONLY 5		/* engine: DANE or nothing */
#define SMTPS_TLS_MTA_STS 6		/* engine, by MX: verified where the domain's
					 * MTA-STS policy is enforced, else
					 * opportunistic; no TLSA lookups */
#define SMTPS_TLS_IMPLICIT 3		/* TLS from the first byte (port 465, RFC 8314) */

/* TLS protocol versions, as on the wire (RFC 8446 4.2.1) */
#define SMTPS_TLS_V1_2 0x0303
#define SMTPS_TLS_V1_3 0x0304

/*
 * A TLS policy: an OpenSSL SSL_CTX, verifying peers against the CAs of
 * ca_file (PEM) and ca_path (a directory of hashed certificates, as
 * "openssl rehash" makes) or, when both are NULL, the system store. The
 * files are read when the policy is made; the system store only when the
 * first handshake that verifies a certificate needs it (opportunistic TLS
 * never does). With insecure_no_verify the certificate and host name are
 * NOT checked: the name says it. A client certificate (cert_file, its key
 * in key_file or in cert_file) is offered to a server that asks for one.
 * Every field may be zero or NULL: OpenSSL's defaults, TLS 1.2 at least.
 */
struct smtps_tls_settings {
    size_t sizeof_settings;		/* ABI guard */
    const char *ca_file;		/* PEM file of the CAs to trust */
    const char *ca_path;		/* directory of hashed CA certificates */
    int insecure_no_verify;		/* 1: check no certificate and no name */
    const char *cert_file;		/* client certificate chain, PEM, leaf
					 * first; NULL: none */
    const char *key_file;		/* its private key, PEM; NULL: in cert_file */
    const char *key_password;		/* for an encrypted key; NULL: none
					 * (never asked for on a terminal) */
    int min_version;			/* SMTPS_TLS_V1_2 (0 too) or SMTPS_TLS_V1_3 */
    const char *ciphers;		/* OpenSSL cipher list for TLS 1.2;
					 * NULL: OpenSSL's default */
    const char *ciphersuites;		/* TLS 1.3 suites, ':'-separated;
					 * NULL: OpenSSL's default */
};

struct smtps_tls_config;

/*
 * A policy from settings, checked whole: SMTPS_OK and *cfg; SMTPS_EINVAL
 * when a setting is wrong (a file missing or unreadable, a key that does
 * not match its certificate, an unknown version, a cipher list OpenSSL
 * refuses), with why (why_len bytes, may be 0) saying which and OpenSSL's
 * reason; SMTPS_ENOMEM; SMTPS_ETLS when OpenSSL fails otherwise.
 * Shared by any number of sessions (reference counted).
 */
int smtps_tls_config_make(const struct smtps_tls_settings *ts,
			  struct smtps_tls_config **cfg, char *why,
			  size_t why_len);
/* The same with only ca_file and insecure_no_verify; NULL on failure. */
struct smtps_tls_config *smtps_tls_config_new(const char *ca_file,
					      int insecure_no_verify);
void smtps_tls_config_free(struct smtps_tls_config *c);

/*
 * Before smtps_session_start(): how this session uses TLS. servername is
 * sent as SNI and is the name the certificate must match (NULL: no SNI,
 * and then verification needs insecure_no_verify). cfg is retained.
 */
int smtps_session_set_tls(struct smtps_session *s, int mode,
			  struct smtps_tls_config *cfg, const char *servername);
int smtps_session_tls_active(const struct smtps_session *s);	/* 1 once the handshake is done */
const char *smtps_session_tls_version(const struct smtps_session *s);	/* "TLSv1.3" or "" */
int smtps_session_tls_resumed(const struct smtps_session *s);	/* 1: up on a resumed session */

/* AUTH mechanisms choice: 0 = the best the server offers */
#define SMTPS_AUTH_ANY 0

/*
 * Before smtps_session_start(): authenticate as user with secret (a
 * password, or an OAuth 2 token for XOAUTH2). mechs limits the choice to
 * SMTPS_AUTH_* bits. Credentials are never sent before TLS is active
 * unless allow_plaintext is 1. Copied.
 */
int smtps_session_set_auth(struct smtps_session *s, const char *user,
			   const char *secret, unsigned mechs,
			   int allow_plaintext);

/* ------------------------------------------------------------------ */
/* The engine: many sessions, nonblocking sockets, epoll, one thread   */
/* ------------------------------------------------------------------ */

struct smtps_engine;

/* Where and how to deliver; copied at submit. */
struct smtps_destination {
    size_t sizeof_destination;		/* ABI guard */
    const char *host;			/* name, address literal (v4 or v6) or
					 * "unix:/path"; NULL: each recipient's
					 * domain, by its MX records */
    int port;				/* of host, or of every MX host */
    int tls_mode;			/* SMTPS_TLS_* */
    struct smtps_tls_config *tls;	/* NULL: default policy when TLS is used */
    const char *tls_servername;		/* NULL: host */
    const char *auth_user;		/* NULL: no AUTH */
    const char *auth_secret;
    unsigned auth_mechs;		/* SMTPS_AUTH_ANY or SMTPS_AUTH_* bits */
    int auth_allow_plaintext;
    int64_t timeout_ms;			/* every reply deadline; 0: RFC 5321 defaults */
    const char *helo;			/* NULL: the engine's (or its source's) */
    int protocol;			/* SMTPS_PROTO_* */
    int source;				/* 1 + index of the engine's source to
					 * use; 0: any, in turn */
};

struct smtps_engine_config {
    size_t sizeof_config;		/* ABI guard */
    int max_connections;		/* in total; 0: 1000 */
    int max_per_destination;		/* 0: 10 */
    int messages_per_connection;	/* 0: no limit */
    int64_t idle_timeout_ms;		/* close an idle pooled connection; 0: 5000 */
    int64_t connect_timeout_ms;		/* 0: 30000 */
    const char *helo;			/* NULL: "localhost" */
    int mx_address_limit;		/* addresses tried per delivery; 0: 5 */
    int inet_protocols;			/* SMTPS_INET_*: the families used */
    int address_preference;		/* SMTPS_INET_*: tried first (ALL: any) */
    int tls_no_resumption;		/* 1: a full TLS handshake every time;
					 * 0: resume the last TLS session with
					 * each host (one kept per host) */
    int max_tls_handshakes;		/* TLS handshakes running at once, in
					 * all; others wait for their turn
					 * after the 220 to STARTTLS; 0: 100 */
};

#define SMTPS_INET_ALL 0
#define SMTPS_INET_IPV4 4
#define SMTPS_INET_IPV6 6

/*
 * How the engine finds its way (resolve.c, libunbound). Name servers are
 * "ip" or "ip@port" (none: those of /etc/resolv.conf); trust anchors are
 * DS or DNSKEY records (none: no DNSSEC validation); local data are
 * zone-file records answered without asking anyone. A lookup gets
 * timeout_ms times attempts in all, counted from when it is sent: at
 * most max_in_flight are, the others wait their turn (a host's addresses
 * before a domain's MX records), so that a burst of new domains neither
 * floods the name servers nor holds up the connections that could start.
 */
struct smtps_resolver_config {
    size_t sizeof_config;		/* ABI guard */
    const char *const *nameservers;
    size_t nameservers_count;
    int hosts_file;			/* answer names in /etc/hosts */
    int64_t timeout_ms;			/* 0: 5000 */
    int attempts;			/* 0: 2 */
    const char *const *trust_anchors;
    size_t trust_anchors_count;
    const char *const *local_data;
    size_t local_data_count;
    int max_in_flight;			/* lookups sent at once; 0: 100 */
    int no_dnssec;			/* 1: validate nothing; 0: DNSSEC from
					 * trust_anchors or, when there are
					 * none, the root's (resolve.c) */
};

/*
 * An engine's DNSSEC, once its resolver started (at the first lookup):
 * SMTPS_DNSSEC_UNKNOWN before; _OFF; _ON; _STRIPPED: the root's anchors
 * were dropped because the name servers strip DNSSEC (their answer for
 * the root's keys failed validation), so nothing is validated.
 */
#define SMTPS_DNSSEC_UNKNOWN (-1)
#define SMTPS_DNSSEC_OFF 0
#define SMTPS_DNSSEC_ON 1
#define SMTPS_DNSSEC_STRIPPED 2
int smtps_engine_dnssec(const struct smtps_engine *e);

/*
 * Traffic shaping, per destination (a site: the domains that share one
 * set of MX hosts, or a host given). pattern is a recipient domain,
 * "mx:" and a glob on an MX host name, or "*". Rates are per second and
 * smooth (no bursts); 0: none.
 */
struct smtps_limits {
    const char *pattern;
    int connections;			/* at once; 0: max_per_destination */
    int messages_per_connection;	/* 0: the engine's */
    double connection_rate;		/* new connections per second */
    double message_rate;		/* messages per second */
};

/* A local address to connect from, and the HELO name to use from it. */
struct smtps_source {
    const char *address;		/* an IPv4 or IPv6 literal */
    const char *helo;			/* NULL: the destination's or engine's */
};

/*
 * An engine runs sessions on machine m (NULL: the default machine). user is
 * handed to sessions as their smtps_session_user() pointer.
 */
struct smtps_engine *smtps_engine_new(struct smtps_machine *m,
				      const struct smtps_engine_config *cfg,
				      void *user);
void smtps_engine_free(struct smtps_engine *e);	/* results not taken are freed */

/*
 * Queue msg for dest; the engine owns msg on SMTPS_OK only. From the
 * thread that runs the loop, or from a state running inside it (it only
 * queues); not from another thread (see smtps_engine_wake() below).
 */
int smtps_engine_submit(struct smtps_engine *e, struct smtps_message *msg,
			const struct smtps_destination *dest, uint64_t tag);

/*
 * Run the loop until at least one result is ready, nothing is pending,
 * smtps_engine_wake() was called, or max_wait_ms passed (-1: no limit). Returns the number of results ready,
 * or a negative SMTPS_E* code: SMTPS_EINTR as soon as a state interrupted
 * its session (the rest waits for the next call). Call it without holding
 * the GIL (cffi releases it); Python states take it back when they are
 * called.
 */
int smtps_engine_run(struct smtps_engine *e, int64_t max_wait_ms);
struct smtps_result *smtps_engine_next_result(struct smtps_engine *e);
size_t smtps_engine_pending(const struct smtps_engine *e);	/* submitted, no result taken */
size_t smtps_engine_connections(const struct smtps_engine *e);	/* open now */

/*
 * The engine as a service (docs/service.md). smtps_engine_serve() is
 * smtps_engine_run() that does not return because nothing is pending: it
 * keeps connections, idle pools and DNS going and returns when a result
 * is ready, when smtps_engine_wake() was called, or after max_wait_ms
 * (0: do what is ready now, never block; the step of another event
 * loop). smtps_engine_run() also returns (0) when woken.
 *
 * smtps_engine_fileno() is the engine's epoll descriptor: it is readable
 * when a socket, the resolver or a wake-up has something, so that another
 * event loop can watch it and call smtps_engine_serve(e, 0).
 * smtps_engine_next_deadline() is the time in ms until the engine must
 * run again without any descriptor being readable (its next timer; 0:
 * now, work is ready; -1: no timer).
 *
 * Threads: smtps_engine_wake() alone may be called from any thread (or a
 * signal handler) at any time; it writes to an eventfd. Everything else,
 * smtps_engine_submit() included, belongs to the thread that runs the
 * loop, or to a state running inside it (submit only queues); another
 * thread hands its messages to that thread and wakes it, as the Python
 * Engine does.
 *
 * smtps_engine_cancel() withdraws every part of the message submitted
 * with tag: SMTPS_CANCEL_DONE when each was still queued (its result,
 * tempfail "not attempted: cancelled", is ready now); SMTPS_CANCEL_PENDING
 * when one is in a session before any of its data went out: it fails at
 * its next reply with RSET, the connection's other messages untouched;
 * SMTPS_CANCEL_TOO_LATE when one is in its data or past its final dot
 * (its result comes as it will); SMTPS_ENOTFOUND when no part was found
 * (done, or still waiting for its route's DNS).
 */
int smtps_engine_serve(struct smtps_engine *e, int64_t max_wait_ms);
int smtps_engine_fileno(const struct smtps_engine *e);
int64_t smtps_engine_next_deadline(const struct smtps_engine *e);
int smtps_engine_wake(struct smtps_engine *e);
#define SMTPS_CANCEL_DONE 0
#define SMTPS_CANCEL_PENDING 1
#define SMTPS_CANCEL_TOO_LATE 2
int smtps_engine_cancel(struct smtps_engine *e, uint64_t tag);

/* The trace function of every session the engine makes from now on. */
int smtps_engine_set_trace(struct smtps_engine *e, SMTPSTrace fn,
			   void *closure);

/*
 * Settings copied into the engine; only while no lookup or message is
 * in flight (else SMTPS_ESTATE). set_resolver fails with SMTPS_EINVAL
 * and says why in why[] for a setting libunbound refuses. set_sources
 * fails with SMTPS_EINVAL when an address cannot be bound.
 */
int smtps_engine_set_resolver(struct smtps_engine *e,
			      const struct smtps_resolver_config *cfg,
			      char *why, size_t whylen);
int smtps_engine_set_limits(struct smtps_engine *e,
			    const struct smtps_limits *limits, size_t n);
int smtps_engine_set_sources(struct smtps_engine *e,
			     const struct smtps_source *sources, size_t n,
			     char *why, size_t whylen);

/*
 * MTA-STS (RFC 8461): a recipient domain's policy, fetched by the caller
 * (smtpstate.mta_sts) and given before its messages. ENFORCE: only MX
 * hosts matching one of mx[] ("mx.example.net", "*.example.net") are
 * used, each with TLS verified against its name (or authenticated by
 * DANE); none matching: the domain's recipients fail for now. TESTING
 * and NONE change nothing. A later call replaces a domain's policy.
 */
#define SMTPS_STS_NONE 0
#define SMTPS_STS_TESTING 1
#define SMTPS_STS_ENFORCE 2
int smtps_engine_set_sts_policy(struct smtps_engine *e, const char *domain,
				int mode, const char *const *mx, size_t nmx);

/*
 * TLS events (RFC 8460 reports). With smtps_engine_set_tls_events(e,
 * max) the engine records what became of each connection's TLS: once per
 * connection that wanted TLS, when it is known (negotiated, not offered,
 * refused, the handshake failed), for each host DANE kept it from using,
 * and for each domain none of whose MX hosts matched its MTA-STS policy.
 * At most max wait to be taken (the oldest are dropped, and counted);
 * 0 (the default) records none. smtps_engine_next_tls_event() fills ev
 * with the oldest (1) or says there is none (0); its strings live until
 * the next call or smtps_engine_free().
 */
struct smtps_tls_event {
    const char *domains;		/* the recipient domains the connection
					 * was for, one per line (a named
					 * host: its own name) */
    const char *mx_host;		/* "" when no host was tried */
    const char *mx_ip;			/* "" when none */
    const char *source_ip;		/* "" when not known */
    const char *level;			/* the TLS it was to use: "opportunistic",
					 * "verify", "implicit", "dane" (the
					 * host's TLSA records), "mta-sts" */
    const char *policy;			/* "tlsa" where DANE applied, "sts" where
					 * an MTA-STS policy was, else "" */
    const char *tlsa;			/* the host's TLSA records, a line each:
					 * "3 1 1 <hex>" */
    const char *result;			/* "success" or an RFC 8460 result type */
    const char *detail;			/* what failed, in words; "" on success */
    const char *version;		/* "TLSv1.3"; "" when TLS did not come up */
    int verified;			/* the server was authenticated */
    int resumed;			/* on a resumed TLS session */
};
int smtps_engine_set_tls_events(struct smtps_engine *e, size_t max);
int smtps_engine_next_tls_event(struct smtps_engine *e,
				struct smtps_tls_event *ev);
uint64_t smtps_engine_tls_events_dropped(const struct smtps_engine *e);

/*
 * Blocking lookups for a caller's own threads, with the settings of an
 * engine's resolver (lookup.c): a name's TXT records (each record's
 * strings joined, records a line each; returns how many) and its first
 * address (IPv4 first; 1 found, 0 none). SMTPS_EAGAIN: failed for now.
 */
struct smtps_lookup;
struct smtps_lookup *smtps_lookup_new(const struct smtps_resolver_config *cfg,
				      char *why, size_t whylen);
int smtps_lookup_txt(struct smtps_lookup *l, const char *name, char *out,
		     size_t outlen);
int smtps_lookup_address(struct smtps_lookup *l, const char *name, char *out,
			 size_t outlen);
void smtps_lookup_free(struct smtps_lookup *l);

/*
 * Fast paths for drivers (batch.c). smtps_engine_submit_copy() submits
 * smtps_message_copy(envelope, body, len) in one call.
 * smtps_engine_submit_plain() makes a message of sender, nrcpt recipient
 * addresses in rcpts (one LF between each two; no DSN options) and body,
 * with every check of the setters, and submits it in one call; body is
 * not copied: as for smtps_message_set_body_fixed(), it stays alive and
 * unchanged until the message's result is out.
 *
 * smtps_engine_collect() takes up to max ready results (at most
 * SMTPS_COLLECT_MAX) and writes three numbers per result into out: its
 * tag, its shape slot and its reply slot. The shape is the whole result
 * but its tag and deciding reply. A slot below SMTPS_COLLECT_SLOTS is one
 * the collector described before (the result is freed); slot +
 * SMTPS_COLLECT_SLOTS is new: read it with smtps_collector_shape() or
 * smtps_collector_reply() before the next call. Reply slot 0: no reply.
 * smtps_engine_run_collect() is smtps_engine_run() then
 * smtps_engine_collect(), smtps_engine_serve_collect() the same for
 * smtps_engine_serve(). A collector is used by one thread at a time.
 */
#define SMTPS_COLLECT_SLOTS 64
#define SMTPS_COLLECT_MAX 32

struct smtps_collector;

int smtps_engine_submit_copy(struct smtps_engine *e,
			     const struct smtps_message *envelope,
			     const char *body, size_t len,
			     const struct smtps_destination *dest,
			     uint64_t tag);
int smtps_engine_submit_plain(struct smtps_engine *e, const char *sender,
			     size_t slen, const char *rcpts, size_t rlen,
			     size_t nrcpt, const char *body, size_t len,
			     const struct smtps_destination *dest,
			     uint64_t tag);
struct smtps_collector *smtps_collector_new(void);
void smtps_collector_free(struct smtps_collector *c);
int smtps_engine_collect(struct smtps_engine *e, struct smtps_collector *c,
			 uint64_t *out, size_t max);
int smtps_engine_run_collect(struct smtps_engine *e, int64_t max_wait_ms,
			     struct smtps_collector *c, uint64_t *out,
			     size_t max);
int smtps_engine_serve_collect(struct smtps_engine *e, int64_t max_wait_ms,
			       struct smtps_collector *c, uint64_t *out,
			       size_t max);
const struct smtps_result *smtps_collector_shape(const struct smtps_collector *c,
						 size_t slot);
const struct smtps_result_reply *smtps_collector_reply(const struct smtps_collector *c,
						       size_t slot);

#ifdef __cplusplus
}
#endif

#endif /* SMTPSTATE_H */
