/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	internal.h 3h
 * SUMMARY
 *	declarations shared by the C files, never seen by cffi
 * SYNOPSIS
 *	#include "internal.h"
 * DESCRIPTION
 *	The layout of machines, order snapshots, messages and results, the
 *	output buffer, the clock helpers, and what the engine may ask of a
 *	session beyond the public API. Nothing here is public API.
 *
 *	A session's own layout is not here: it is in session_private.h,
 *	which only the files that make up a session include (session.c,
 *	dispatch.c, transaction.c, outbuf.c, trace.c, session_info.c,
 *	states.c, tls.c). Everyone else, the engine and the AUTH state
 *	included, uses a session through functions.
 *--*/

#ifndef SMTPS_INTERNAL_H
#define SMTPS_INTERNAL_H

#include <pthread.h>
#include "smtpstate.h"

#define SMTPS_UNUSED(x) ((void) (x))

/*
 * An order snapshot: which ids exist and in which order they run. It is
 * immutable once published; registration publishes a new one. Sessions
 * hold a reference, so registering while sessions run never changes the
 * order a running session sees.
 */
struct smtps_order {
    int refs;				/* atomic */
    int count;				/* ids 0..count-1 exist */
    int head;				/* first id in the order */
    int next[SMTPS_MAX_STATES];		/* next id in the order, -1 at the end */
};

/*
 * A machine: the state records (stable addresses, fields immutable after
 * registration except next, which mirrors the newest order) and the newest
 * order. The lock serialises registration and snapshotting.
 */
struct smtps_machine {
    pthread_mutex_t lock;
    int refs;				/* atomic; sessions hold one each */
    int is_default;			/* never freed */
    smtp_state states[SMTPS_MAX_STATES];
    char names[SMTPS_MAX_STATES][SMTPS_STATE_NAME_MAX + 1];
    struct smtps_order *order;
};

/* machine.c */
struct smtps_order *smtps_machine_snapshot(struct smtps_machine *m);
void smtps_order_release(struct smtps_order *o);
void smtps_machine_retain(struct smtps_machine *m);

/* states.c: the built-in state records and default reply timeouts */
const smtp_state *smtps_builtin_state(int id);
int64_t smtps_builtin_timeout(int id);

/* message.c */
struct smtps_rcpt {
    char *addr;
    char *orcpt;			/* NULL when not given */
    unsigned notify;			/* SMTPS_NOTIFY_* (RFC 3461) */
};

struct smtps_message {
    char *sender;			/* "" = null reverse-path */
    struct smtps_rcpt *rcpt;
    size_t nrcpt, rcpt_cap;
    char *body;				/* in memory: copied (body_owned) or not */
    size_t body_len;
    int body_owned;
    int body_fixed;			/* a reference that never changes and
					 * outlives every copy: copies share it */
    int body_shared;			/* another message's copy, which
					 * outlives this one: checked already */
    unsigned body_flags;		/* SMTPS_BODY_ALLOW_* */
    int64_t body_size;			/* RFC 1870 size; -1: unknown */
    SMTPSBodyRead body_read;		/* a source: read as sent; else NULL */
    void *body_closure;
    int dsn_ret;			/* SMTPS_DSN_RET_* */
    char *envid;			/* NULL when not given */
    int needs_smtputf8;			/* a non-ASCII address (RFC 6531), or asked */
    int want_smtputf8;			/* SMTPUTF8 asked for, ASCII or not: a
					 * relay that received it so keeps it */
    int require_tls;			/* REQUIRETLS (RFC 8689) */
    int is_8bit;			/* a body byte >= 0x80 (RFC 6152); -1: unknown */
    uint64_t tag;
    struct smtps_message *qnext;	/* session queue link */
    struct smtps_result *qresult;	/* made at submit, so none is lost */
    int handed_back;			/* a session held it, then gave it
					 * back (conn.c): it was attempted */
};

int smtps_check_text(const char *s, size_t len, size_t max, int *non_ascii);
/* message.c, for route.c: recipients idx[0..n) of m, sharing its body */
struct smtps_message *smtps_message_part(const struct smtps_message *m,
					 const size_t *idx, size_t n);
char *smtps_strndup(const char *s, size_t len);

/* result.c */
struct smtps_result *smtps_result_new(uint64_t tag, size_t nrcpt);
int smtps_result_add_route(struct smtps_result *r, const char *mx,
			   const char *ip);
void smtps_result_set_reply(struct smtps_result_reply *dst,
			    const struct smtps_reply *reply);
int smtps_result_set_reason(struct smtps_result *r, const char *text);
void smtps_result_copy_reply(struct smtps_result_reply *dst,
			     const struct smtps_result_reply *src);
void smtps_result_settle(struct smtps_result *r, int verdict, int shared);

/* An output buffer: bytes queued for the driver to send. */
struct smtps_buf {
    char *data;
    size_t start;			/* first unsent byte */
    size_t end;				/* one past the last queued byte */
    size_t cap;
};

/* outbuf.c: room for need more bytes, within SMTPS_OUT_MAX */
int smtps_buf_reserve(struct smtps_buf *b, size_t need);

/*
 * Output as an iovec array, for a driver that writes with writev() or
 * sendmsg() (the engine): body runs then go from the message's memory
 * (outbuf.c). The plain smtps_session_output() gives the first piece.
 */
struct iovec;
void smtps_session_set_gather(struct smtps_session *s, int on);
int smtps_session_output_iov(struct smtps_session *s, struct iovec *iov,
			     int max);

/* body.c: a whole body's problem (0: none), else its size and 8-bit */
int smtps_body_inspect(const char *in, size_t len, unsigned flags,
		       uint64_t *size, int *is_8bit);

/* body.c: one encoder step that leaves unchanged input where it is */
size_t smtps_body_step(struct smtps_body_encoder *e, const char *in,
		       size_t inlen, size_t *in_used, char *out,
		       size_t outcap, size_t limit, size_t *verbatim);

#define SMTPS_OUT_HIGH 65536		/* stop producing body above this */
#define SMTPS_OUT_MAX (1024 * 1024)	/* hard bound on queued output */
#define SMTPS_REASON_MAX 512

/* clock.c */
int64_t smtps_clock_ms(void);

/*
 * smtps_time_after - now + ms, saturated to 0..INT64_MAX: a deadline can
 * neither overflow (undefined behaviour) nor turn negative (which reads
 * as "no deadline"), whatever the timeout and the clock. Inline: the
 * dispatch loop computes one per transition.
 */
static inline int64_t smtps_time_after(int64_t now, int64_t ms)
{
    if (now < 0)
	now = 0;
    if (ms < 0)
	ms = 0;
    if (ms > SMTPS_TIMEOUT_MAX)
	ms = SMTPS_TIMEOUT_MAX;
    return now > INT64_MAX - ms ? INT64_MAX : now + ms;
}

/*
 * A driver's source of further messages (the engine's destination queue):
 * called inside the loop when a transaction could start ahead of time.
 * It returns a message whose qresult was made for it (smtps_result_new
 * with its tag and recipient count), or NULL for none now.
 */
typedef struct smtps_message *(*SMTPSFeeder) (struct smtps_session *s,
					       void *closure);

/* session.c, for engine.c: start transactions ahead, fed by fn */
void smtps_session_set_runahead(struct smtps_session *s, SMTPSFeeder fn,
				void *closure);
/*
 * session.c, for engine.c: when the connection fails before any
 * transaction began (no greeting, 421 or 554, EHLO or STARTTLS refused,
 * lost), the queued messages are not failed but held, their results
 * unsettled but telling where it failed (state and stage), for
 * the driver to take back and try elsewhere. *status says what they
 * would have got (SMTPS_STATUS_PERMFAIL for a permanent refusal).
 */
void smtps_session_set_hand_back(struct smtps_session *s);
/* session_info.c, for engine.c: the EHLO name of a source, before start */
int smtps_session_set_helo(struct smtps_session *s, const char *helo);
struct smtps_message *smtps_session_take_back(struct smtps_session *s,
					      int *status);
/* session.c, for cancel.c: withdraw message tag (SMTPS_CANCEL_*, ENOTFOUND) */
int smtps_session_cancel(struct smtps_session *s, uint64_t tag);
/*
 * tls.c, for engine.c: TLS failed before it was up (the handshake: a
 * certificate refused, a protocol broken), after which an opportunistic
 * destination tries the same address in clear
 */
int smtps_tls_handshake_failed(const struct smtps_session *s);
/*
 * A TLSA record (RFC 6698) for OpenSSL's DANE matching: certificate
 * usage, selector, matching type and the data to match.
 */
struct smtps_tlsa {
    uint8_t usage;
    uint8_t selector;
    uint8_t mtype;
    size_t  len;
    unsigned char *data;
};
void smtps_tlsa_free(struct smtps_tlsa *recs, size_t n);
int smtps_tlsa_copy(const struct smtps_tlsa *recs, size_t n,
		    struct smtps_tlsa **out);
/*
 * tls.c, for engine.c: authenticate this session's TLS with DANE (RFC
 * 7672) against recs (copied), the server's name its reference
 * identifier; n == 0: TLS is mandatory but not authenticated (RFC 7672
 * 2.2, records that are all unusable). After smtps_session_set_tls().
 */
int smtps_session_set_dane(struct smtps_session *s,
			   const struct smtps_tlsa *recs, size_t n);
/*
 * tls.c, for engine.c: where the TLS session of the last handshake with
 * one server waits for the next connection to it (RFC 5077, RFC 8446
 * 2.2), with the digest of the policy it was made under (mode, checks,
 * TLSA records, server name): it is offered only under the same one.
 * All zero: empty. The owner (a host of a destination) empties it with
 * smtps_tls_resume_clear(), and gives it to each session with
 * smtps_session_set_tls_resume() after smtps_session_set_tls() and
 * smtps_session_set_dane(); it must outlive those sessions.
 */
#define SMTPS_TLS_POLICY_LEN 32		/* SHA-256 */
struct ssl_session_st;			/* OpenSSL's SSL_SESSION */
struct smtps_tls_resume {
    struct ssl_session_st *sess;	/* NULL: none; one reference, ours */
    unsigned char policy[SMTPS_TLS_POLICY_LEN];
};
int smtps_session_set_tls_resume(struct smtps_session *s,
				 struct smtps_tls_resume *slot);
void smtps_tls_resume_clear(struct smtps_tls_resume *slot);
/*
 * session.c and tls.c, for engine.c: a driver's turns for TLS
 * handshakes. A handshake holds far more memory while it runs than the
 * connection keeps once TLS is up (record buffers, key shares, the
 * certificate being checked), so a driver with many connections may
 * bound how many run at once. With a gate set (before start), the
 * session asks fn when its handshake would begin (the 220 to STARTTLS;
 * the start, for implicit TLS): 1 lets it begin now, 0 makes it wait --
 * no SSL object made, no byte sent, the EHLO that follows held back --
 * until the driver calls smtps_session_tls_proceed(). fn must not call
 * the session.
 * smtps_session_tls_in_handshake() says whether the session still needs
 * its turn (the handshake waits or runs on a live connection: not up,
 * not failed, not closing). Drivers that set no gate are not concerned.
 */
typedef int (*SMTPSTlsGate) (struct smtps_session *s, void *closure);
int smtps_session_set_tls_gate(struct smtps_session *s, SMTPSTlsGate fn,
			       void *closure);
int smtps_session_tls_proceed(struct smtps_session *s, int64_t now);
int smtps_session_tls_in_handshake(const struct smtps_session *s);
/* smtps_session_submit() for a message whose qresult was made for it */
int smtps_session_submit_prepared(struct smtps_session *s,
				  struct smtps_message *msg, int64_t now);

/* tls.c */
void smtps_tls_config_retain(struct smtps_tls_config *c);
/* 1 once the config holds its trusted CAs (loaded lazily: tests look) */
int smtps_tls_config_trusted(const struct smtps_tls_config *c);
void smtps_wipe(void *p, size_t len);

/*
 * The built-in states' functions (states.c, and auth.c for AUTH), named
 * from the one list: smtps_<prefix>_setup and _callback for each, and
 * _init_local and _free for those that keep per-connection data. They
 * are what states.c's table is made of.
 */
#define SMTPS_X_LOCAL_NOLOCAL(f)
#define SMTPS_X_LOCAL_LOCAL(f) \
    int smtps_##f##_init_local(struct smtps_session *, void *, void **); \
    void smtps_##f##_free(struct smtps_session *, void *, void *);
#define SMTPS_X_PROTO(n, f, l, sa, sd, t, fl) \
    int smtps_##f##_setup(struct smtps_session *, void *); \
    int smtps_##f##_callback(struct smtps_session *, \
			     const struct smtps_reply *, void *); \
    SMTPS_X_LOCAL_##l(f)
SMTPS_BUILTIN_STATES(SMTPS_X_PROTO)
#undef SMTPS_X_PROTO

/*
 * What the AUTH state (auth.c) reads of its session beyond the public
 * API: the credentials the driver set (smtps_session_set_auth(), kept
 * and wiped by the session), and a way to queue a line that must never
 * reach the transcript.
 */
#define SMTPS_AUTH_USER_MAX 512		/* bytes of user name */
#define SMTPS_AUTH_SECRET_MAX 8192	/* bytes of password or token */
#define SMTPS_X_MECH_BIT(n, b, s) | SMTPS_AUTH_##n
#define SMTPS_AUTH_ALL (0 SMTPS_AUTH_MECHS(SMTPS_X_MECH_BIT))

struct smtps_credentials {
    char *user;
    size_t user_len;
    char *secret;
    size_t secret_len;
    unsigned mechs;			/* allowed SMTPS_AUTH_* (0: the default) */
    int allow_plaintext;
};

const struct smtps_credentials *smtps_session_credentials(const struct smtps_session *s);
int smtps_session_queue_secret(struct smtps_session *s, const char *data,
			       size_t len);

/* auth.c: base64 (RFC 4648), bounded */
size_t smtps_base64_encode(const unsigned char *in, size_t len, char *out,
			   size_t cap);
int smtps_base64_decode(const char *in, size_t len, unsigned char *out,
			size_t cap, size_t *outlen);

#endif /* SMTPS_INTERNAL_H */
