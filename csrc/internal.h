/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	internal.h 3h
 * SUMMARY
 *	declarations shared by the C files, never seen by cffi
 * SYNOPSIS
 *	#include "internal.h"
 * DESCRIPTION
 *	The layout of machines, order snapshots, messages and sessions, and
 *	the hooks between session.c (the dispatch loop), states.c (the
 *	built-in states), tls.c (TLS over memory BIOs) and auth.c (AUTH).
 *	Nothing here is public API, and no OpenSSL type appears here: the
 *	TLS and AUTH records are opaque outside their own files.
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

/* states.c: the built-in state records, by enum smtps_builtin_state */
const smtp_state *smtps_builtin_state(int id);

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
    char *body;
    size_t body_len;
    int dsn_ret;			/* SMTPS_DSN_RET_* */
    char *envid;			/* NULL when not given */
    int needs_smtputf8;			/* a non-ASCII address (RFC 6531) */
    int is_8bit;			/* a body byte >= 0x80 (RFC 6152) */
    uint64_t tag;
    struct smtps_message *qnext;	/* session queue link */
    struct smtps_result *qresult;	/* made at submit, so none is lost */
};

int smtps_check_text(const char *s, size_t len, size_t max, int *non_ascii);
char *smtps_strndup(const char *s, size_t len);

/* result.c */
struct smtps_result *smtps_result_new(uint64_t tag, size_t nrcpt);
void smtps_result_set_reply(struct smtps_result_reply *dst,
			    const struct smtps_reply *reply);
int smtps_result_set_reason(struct smtps_result *r, const char *text);

/* An output buffer: bytes queued for the driver to send. */
struct smtps_buf {
    char *data;
    size_t start;			/* first unsent byte */
    size_t end;				/* one past the last queued byte */
    size_t cap;
};

/* One state whose setup ran and whose replies are still awaited. */
struct smtps_inflight {
    int state;
    int awaiting;			/* replies setup asked for */
    int handled;			/* replies handed to callback so far */
    int called;				/* 0-reply states: callback(NULL) done */
    uint64_t first_end;			/* out_produced at the end of its first
					 * command line; 0: it sent none */
};

/*
 * What one transaction owns of the session. While the reply to one
 * message's final dot is awaited, the next message's MAIL, RCPT and DATA
 * may already be on the wire (RFC 2920 lets message content start a
 * group): the earlier transaction then waits here, swapped out, until
 * that reply arrives. See tx_swap() in session.c.
 */
struct smtps_txsave {
    struct smtps_message *tx;
    struct smtps_result *txres;
    int tx_decided, tx_final_replied, data_sent, data_mode;
    uint64_t tx_out_start;
    size_t rcpt_next, rcpt_replied, rcpt_accepted;
    int rcpt_index;
    int body_active, body_started, body_chunking;
    size_t body_off;
    uint64_t body_end;
    struct smtps_body_encoder enc;
};

/*
 * A driver's source of further messages (the engine's destination queue):
 * called inside the loop when a transaction could start ahead of time.
 * It returns a message whose qresult was made for it (smtps_result_new
 * with its tag and recipient count), or NULL for none now.
 */
typedef struct smtps_message *(*SMTPSFeeder) (struct smtps_session *s,
					       void *closure);

#define SMTPS_INFLIGHT_MAX 16		/* states pipelined at once */
#define SMTPS_OUT_HIGH 65536		/* stop producing body above this */
#define SMTPS_OUT_MAX (1024 * 1024)	/* hard bound on queued output */
#define SMTPS_REASON_MAX 512

struct smtps_session {
    struct smtps_machine *machine;
    struct smtps_order *order;
    void *user;
    void **local;			/* per state id, from init_local_state */
    unsigned char *local_made;		/* per state id */
    int64_t *timeout;			/* per state id, ms; 0 = none */
    char helo[SMTPS_HELO_MAX + 1];
    char peer_host[SMTPS_ADDRESS_TEXT_MAX + 1];	/* numeric, "" unknown */
    char local_host[SMTPS_ADDRESS_TEXT_MAX + 1];
    int peer_port, local_port;
    int status;				/* enum smtps_session_status */

    /* The dispatch loop. */
    int cur;				/* the state entered last */
    int forced_next;			/* smtp_next_state() target, -1 none */
    struct smtps_inflight fifo[SMTPS_INFLIGHT_MAX];
    int nfifo;
    int draining;			/* replies to discard before pending */
    int pending;			/* state to enter once drained, -1 none */
    size_t reply_index;
    int64_t now;
    int64_t deadline;			/* absolute ms, -1 none */
    int in_dispatch;			/* re-entrancy guard */
    int no_lookahead;			/* setup: do not run ahead of me */
    struct smtps_reply_parser *parser;
    struct smtps_buf out;
    uint64_t out_produced;		/* bytes ever queued */
    uint64_t out_consumed;		/* bytes the driver took */

    /* What the server offers. */
    struct smtps_caps caps;
    int use_helo;			/* EHLO was refused: HELO (RFC 5321 4.1.4) */
    int pipelining;			/* RFC 2920 in use */

    /* Messages. */
    struct smtps_message *queue, *queue_tail;
    size_t nqueued;
    struct smtps_message *tx;		/* the message in its transaction */
    struct smtps_result *txres;
    int tx_decided;			/* txres->status is final */
    int tx_final_replied;		/* the end-of-data reply arrived */
    int data_sent;			/* DATA or BDAT was issued */
    int data_mode;			/* DATA got its 354: until the final dot
					 * is taken, the server reads message data */
    int need_reset;			/* a transaction is open on the server */
    uint64_t tx_out_start;		/* out_produced when the transaction began */
    unsigned transactions;		/* started on this connection */
    size_t rcpt_next;			/* next recipient to send */
    size_t rcpt_replied;		/* RCPT replies seen */
    size_t rcpt_accepted;
    int rcpt_index;			/* recipient of the reply at hand, -1 */
    int quit_requested;
    int conn_failed;

    /* The body pump. */
    int body_active;			/* producing body bytes */
    int body_started;			/* this transaction's body began */
    int body_chunking;			/* BDAT (RFC 3030) instead of DATA */
    size_t body_off;			/* input bytes encoded so far */
    uint64_t body_end;			/* out_produced at the end of the body */
    struct smtps_body_encoder enc;

    struct smtps_result *results, *results_tail;
    char reason[SMTPS_REASON_MAX];	/* why the session failed or closed */
    char state_reason[SMTPS_REASON_MAX];	/* set by a state for its failure */

    /* TLS (RFC 3207) and AUTH (RFC 4954); NULL when not asked for. */
    struct smtps_tls *tls;		/* tls.c */
    struct smtps_auth *auth;		/* auth.c */
    int tls_reehlo;			/* EHLO again after STARTTLS, then skip it */
    int fail_state;			/* queued messages' state when the */
    int fail_stage;			/* connection part fails; -1: none */

    /* The transcript, for drivers that log it; NULL: none. */
    SMTPSTrace trace;
    void *trace_closure;

    /* Transactions run ahead of the previous final reply (engine only). */
    int tx_runahead;			/* allowed */
    int prev_open;			/* prev awaits its final reply */
    struct smtps_txsave prev;
    SMTPSFeeder feeder;			/* NULL: only the session's queue */
    void *feeder_closure;
};

/* tls.c */
void smtps_tls_config_retain(struct smtps_tls_config *c);

/* session.c, for states.c */
int smtps_session_pump_body(struct smtps_session *s);
void smtps_session_start_body(struct smtps_session *s, int chunking);
int smtps_session_body_done(const struct smtps_session *s);
void smtps_session_decide(struct smtps_session *s, int status, int state,
			  const struct smtps_reply *reply, const char *reason);
int smtps_action_for_code(int code);

/* session.c, for engine.c: start transactions ahead, fed by fn */
void smtps_session_set_runahead(struct smtps_session *s, SMTPSFeeder fn,
				void *closure);
/* smtps_session_submit() for a message whose qresult was made for it */
int smtps_session_submit_prepared(struct smtps_session *s,
				  struct smtps_message *msg);

/* session.c, for tls.c and auth.c */
int smtps_session_take_replies(struct smtps_session *s, const char *data,
			       size_t len);
int smtps_session_queue_raw(struct smtps_session *s, const char *data,
			    size_t len);
void smtps_session_fail_now(struct smtps_session *s, int state, int stage,
			    const char *why);
void smtps_session_trace(struct smtps_session *s, int kind, const char *data,
			 size_t len);
int smtps_buf_reserve(struct smtps_buf *b, size_t need);

/*
 * tls.c: OpenSSL over memory BIOs, for session.c and states.c. Once TLS is
 * engaged (smtps_tls_begin() ran), output() hands out the ciphertext
 * buffer, feed() takes ciphertext, and plaintext queued in s->out waits
 * there until the handshake is done and smtps_tls_flush() encrypts it.
 */
int smtps_tls_mode(const struct smtps_session *s);	/* SMTPS_TLS_* */
int smtps_tls_engaged(const struct smtps_session *s);	/* begun, maybe not up */
int smtps_tls_handshaking(const struct smtps_session *s);
int smtps_tls_begin(struct smtps_session *s);
int smtps_tls_feed(struct smtps_session *s, const char *data, size_t len);
int smtps_tls_flush(struct smtps_session *s);
size_t smtps_tls_output(struct smtps_session *s, const char **data);
size_t smtps_tls_consume(struct smtps_session *s, size_t n);
void smtps_tls_discard(struct smtps_session *s);
void smtps_tls_session_free(struct smtps_session *s);
void smtps_wipe(void *p, size_t len);

/* auth.c: the AUTH state (RFC 4954) and its helpers */
int smtps_auth_setup(struct smtps_session *s, void *closure);
int smtps_auth_callback(struct smtps_session *s, const struct smtps_reply *r,
			void *closure);
void smtps_auth_session_free(struct smtps_session *s);
size_t smtps_base64_encode(const unsigned char *in, size_t len, char *out,
			   size_t cap);
int smtps_base64_decode(const char *in, size_t len, unsigned char *out,
			size_t cap, size_t *outlen);

#endif /* SMTPS_INTERNAL_H */
