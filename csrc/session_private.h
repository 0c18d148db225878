/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	session_private.h 3h
 * SUMMARY
 *	the layout of a session and its transactions, for the files that make one
 * SYNOPSIS
 *	#include "session_private.h"
 * DESCRIPTION
 *	A session is split by job, and these are the files that share its
 *	layout; nothing else includes this header (the engine, batch.c and
 *	the AUTH state use sessions through functions only):
 *
 *	session.c	life cycle and the driver's calls (start, feed,
 *			output, consume, tick, closed, submit, quit, results)
 *	dispatch.c	the loop: entering states, pairing replies with
 *			them, pipelining, draining, failures, running ahead
 *	transaction.c	struct smtps_tx: one message on this connection,
 *			its recipients, its body, and the failure funnel
 *	outbuf.c	the output buffer, command lines, and the runs of
 *			a body sent from the message's own memory
 *	trace.c		the transcript
 *	session_info.c	what states and drivers read and set
 *	states.c	the built-in states
 *	tls.c		TLS over memory BIOs
 *
 *	A transaction is an object (struct smtps_tx): everything that
 *	belongs to one message on one connection lives there, never flat in
 *	the session. The session owns at most two, by pointer: tx, the live
 *	one, and prev, one whose final dot is out and whose final reply is
 *	still awaited while tx runs ahead behind it (RFC 2920 3.1).
 *
 *	Every decision about a message or recipient status goes through
 *	transaction.c: smtps_tx_rcpt_reply() settles a recipient from its
 *	RCPT reply (and, under LMTP, smtps_tx_lmtp_reply() from its own
 *	reply to the end of data), smtps_tx_settle() the message's outcome, and
 *	smtps_tx_finish() turns both into the final statuses of the result
 *	(smtps_result_settle(), result.c).
 *--*/

#ifndef SMTPS_SESSION_PRIVATE_H
#define SMTPS_SESSION_PRIVATE_H

#include "internal.h"

/* One state whose setup ran and whose replies are still awaited. */
struct smtps_inflight {
    int     state;
    int     awaiting;			/* replies setup asked for */
    int     handled;			/* replies handed to callback so far */
    uint64_t first_end;			/* out_produced at the end of its first
					 * command line; 0: it sent none */
};

/* One message on this connection: from its MAIL to its result. */
struct smtps_tx {
    struct smtps_message *msg;		/* owned until the transaction ends */
    struct smtps_result *res;		/* made at submit, handed out at the end */
    int     outcome;			/* 0 while open, then SMTPS_STATUS_*: the
					 * first cause decides (smtps_tx_fail) */
    int     state_verdict;		/* a state decided it, with no reply */
    int     final_replied;		/* the end-of-data reply arrived */
    int     data_sent;			/* DATA or BDAT was issued */
    int     cancelled;			/* the caller withdrew it: fail it at
					 * its next reply, before any data */
    int     data_mode;			/* 354 came: until the final dot is
					 * taken, the server reads message data */
    uint64_t out_start;			/* out_produced when it began */
    int     eight_bit_ok;		/* MAIL said BODY=8BITMIME */

    /* Recipients. */
    size_t  rcpt_next;			/* next recipient to send */
    size_t  rcpt_replied;		/* RCPT replies seen */
    size_t  rcpt_accepted;
    int     rcpt_index;			/* recipient of the reply at hand, -1 */

    /*
     * LMTP (RFC 2033 4.2): the end of data is answered once per recipient
     * accepted at RCPT, in RCPT order (smtps_tx_lmtp_reply()).
     */
    size_t  lmtp_due;			/* replies owed to the end of data; 0:
					 * one reply for the message (SMTP) */
    size_t  lmtp_got;			/* of them, read */
    size_t  lmtp_next;			/* where the next one's recipient is
					 * looked for */
    size_t  lmtp_first[3];		/* 1 + the first recipient whose reply
					 * was 2xx, 4xx (or odd), 5xx; 0: none */

    /* The body pump. */
    int     body_active;		/* producing body bytes */
    int     body_started;		/* the body began */
    int     body_chunking;		/* BDAT (RFC 3030) instead of DATA */
    size_t  body_off;			/* input bytes encoded (read, from a source) */
    uint64_t body_end;			/* out_produced at the end of the body */
    struct smtps_body_encoder enc;

    /* A body read as it is sent (a source): the piece in s->stage. */
    size_t  stage_off, stage_len;
    int     source_done;		/* all read (a source) or scanned */
    size_t  scan_off;			/* a reference: bytes checked so far */
    struct smtps_body_scan scan;	/* what the pieces held so far */
};

/*
 * A run of a message body that goes to the wire from the message's own
 * memory (writev), not through the output buffer: after gap more bytes
 * of the buffer, len bytes at data. owner is the message the bytes
 * belong to, which must not be freed while the run waits (outbuf.c).
 */
struct smtps_seg {
    const char *data;
    size_t  len;
    size_t  gap;			/* buffer bytes that go before it */
    const struct smtps_message *owner;
};

#define SMTPS_SEG_MAX 128		/* runs waiting at once: the pump stops
					 * there until the driver takes some */
#define SMTPS_RUN_HIGH (4 * SMTPS_OUT_HIGH)	/* bytes in runs waiting: they
					 * cost no memory, and a larger write
					 * saves calls and wake-ups */
#define SMTPS_GATHER_MIN 512		/* shorter runs are copied: an iovec
					 * entry costs more than the copy */

#define SMTPS_INFLIGHT_MAX 16		/* states pipelined at once */
#define SMTPS_STAGE_MAX 16384		/* bytes read from a body source at once */

/*
 * A state that awaits no reply and sends the machine to another such
 * state (or itself) makes no progress the server could time: past this
 * many in a row the connection fails. The clock is read from
 * SMTPS_ZERO_CLOCK_AFTER on: at every entry while entries take time,
 * every SMTPS_ZERO_CLOCK_EVERY entries while they do not, so that ordinary
 * machines never pay for it and fast loops pay little (dispatch.c).
 */
#define SMTPS_ZERO_REPLY_MAX 1000
#define SMTPS_ZERO_CLOCK_AFTER 16
#define SMTPS_ZERO_CLOCK_EVERY 64

struct smtps_session {
    struct smtps_machine *machine;
    struct smtps_order *order;
    void   *user;
    void  **local;			/* per state id, from init_local_state */
    unsigned char *local_made;		/* per state id */
    int64_t *timeout;			/* per state id, ms; 0 = none */
    char    helo[SMTPS_HELO_MAX + 1];
    char    peer_host[SMTPS_ADDRESS_TEXT_MAX + 1];	/* numeric, "" unknown */
    char    local_host[SMTPS_ADDRESS_TEXT_MAX + 1];
    int     peer_port, local_port;
    int     status;			/* enum smtps_session_status */
    int     protocol;			/* enum smtps_protocol, set before start */

    /* The dispatch loop (dispatch.c). */
    int     cur;			/* the state entered last */
    int     forced_next;		/* smtp_next_state() target, -1 none */
    struct smtps_inflight fifo[SMTPS_INFLIGHT_MAX];
    int     nfifo;
    int     draining;			/* replies to discard before pending */
    struct smtps_drained {		/* whose they are, in order: a run of */
	int     state;			/* replies to one state (-1: our own */
	int     left;			/* dot or "*"), drain_add() */
    }       drainq[SMTPS_INFLIGHT_MAX + 2];
    int     ndrainq;
    int     pending;			/* state to enter once drained, -1 none */
    size_t  reply_index;
    int64_t now;
    int64_t deadline;			/* absolute ms, -1 none */
    int     in_dispatch;		/* re-entrancy guard */
    int     no_lookahead;		/* setup: do not run ahead of me */
    unsigned zero_run;			/* zero-reply entries in a row */
    unsigned zero_check;		/* at this count, look at the clock */
    int64_t zero_since;			/* smtps_clock_ms() when timing began */
    int64_t zero_last;			/* ... at the last look */
    int     interrupted;		/* a state returned ABORT or EINTR */
    struct smtps_reply_parser *parser;

    /* Output (outbuf.c). */
    struct smtps_buf out;
    char   *stage;			/* SMTPS_STAGE_MAX bytes read from a body
					 * source, made when one is first sent */
    int     gather;			/* the driver takes output as iovecs:
					 * body runs may stay in the message */
    struct smtps_seg *segs;		/* SMTPS_SEG_MAX, a ring from seg_head;
					 * made with a body's first run */
    int     seg_head, nseg;
    size_t  seg_bytes;			/* in the runs, not yet taken */
    size_t  seg_gaps;			/* their gaps, summed */
    uint64_t out_produced;		/* bytes ever queued */
    uint64_t out_consumed;		/* bytes the driver took */

    /* What the server offers. */
    struct smtps_caps caps;
    int     use_helo;			/* EHLO was refused: HELO (RFC 5321 4.1.4) */
    int     pipelining;			/* RFC 2920 in use */

    /* Messages (transaction.c). */
    struct smtps_message *queue, *queue_tail;
    size_t  nqueued;
    struct smtps_tx txs[2];		/* where tx and prev live */
    struct smtps_tx *tx;		/* the live transaction, or NULL */
    struct smtps_tx *prev;		/* run past: awaits its final reply */
    int     need_reset;			/* a failed transaction is open on the server */
    size_t  srv_accepted;		/* RCPT 2xx since our last MAIL: what a
					 * lone dot would deliver */
    unsigned transactions;		/* started on this connection */
    int     quit_requested;
    int     conn_failed;
    struct smtps_result *results, *results_tail;
    char    reason[SMTPS_REASON_MAX];	/* why the session failed or closed */
    char    state_reason[SMTPS_REASON_MAX];	/* set by a state for its failure */

    /* TLS (RFC 3207) and AUTH (RFC 4954); NULL when not asked for. */
    struct smtps_tls *tls;		/* tls.c */
    struct smtps_credentials *cred;	/* session_info.c; read by auth.c */
    int     tls_reehlo;			/* EHLO again after STARTTLS, then skip it */
    SMTPSTlsGate tls_gate;		/* the driver's turns for handshakes; NULL: none */
    void   *tls_gate_closure;
    int     fail_state;			/* queued messages' state when the */
    int     fail_stage;			/* connection part fails; -1: none */

    /* The transcript (trace.c), for drivers that log it; NULL: none. */
    SMTPSTrace trace;
    void   *trace_closure;

    /* Transactions run ahead of the previous final reply (engine only). */
    int     tx_runahead;		/* allowed */
    SMTPSFeeder feeder;			/* NULL: only the session's queue */
    void   *feeder_closure;

    /*
     * A connection that fails before any transaction keeps its queue
     * for the driver to try elsewhere (engine only: the next address).
     */
    int     hand_back;			/* asked for */
    int     held_status;		/* what they would have got; 0: none */
};

/* dispatch.c */
void    smtps_dispatch_enter(struct smtps_session *s, int id);
void    smtps_dispatch_run(struct smtps_session *s);
void    smtps_dispatch_reply(struct smtps_session *s,
			             const struct smtps_reply *r);
void    smtps_dispatch_transition(struct smtps_session *s, int target);
void    smtps_dispatch_fail_conn(struct smtps_session *s, int id,
				         const struct smtps_reply *reply,
				         int status, const char *why,
				         int close_now);
void    smtps_dispatch_fail_queue(struct smtps_session *s, int id,
				          int awaiting, int status,
				          const char *why);
void    smtps_dispatch_lost(struct smtps_session *s);
void    smtps_dispatch_run_ahead(struct smtps_session *s);
void    smtps_dispatch_refresh_deadline(struct smtps_session *s);
void    smtps_dispatch_body_failed(struct smtps_session *s, int rc);
void    smtps_dispatch_set_stage(struct smtps_session *s,
				         struct smtps_result *r, int id,
				         int awaiting);
int     smtps_dispatch_awaiting(const struct smtps_session *s, int id);

/* transaction.c */
struct smtps_tx *smtps_tx_start(struct smtps_session *s);
void    smtps_tx_rcpt_reply(struct smtps_session *s, struct smtps_tx *tx,
			            size_t i, const struct smtps_reply *reply);
void    smtps_tx_settle(struct smtps_session *s, struct smtps_tx *tx,
			        int status, int id,
			        const struct smtps_reply *reply,
			        const char *why);
int     smtps_tx_lmtp_reply(struct smtps_session *s, struct smtps_tx *tx,
			            const struct smtps_reply *reply);
int     smtps_tx_abandon(struct smtps_session *s, struct smtps_tx *tx,
			         int id, const struct smtps_reply *reply,
			         int status);
void    smtps_tx_finish(struct smtps_session *s, struct smtps_tx *tx);
int     smtps_tx_dot_sent(const struct smtps_session *s,
			          const struct smtps_tx *tx);
int     smtps_tx_in_data(const struct smtps_session *s,
			         const struct smtps_tx *tx);
int     smtps_tx_bdat(const struct smtps_session *s,
		              const struct smtps_tx *tx);
void    smtps_tx_start_body(struct smtps_session *s, int chunking);
int     smtps_tx_pump_body(struct smtps_session *s, struct smtps_tx *tx);
void    smtps_session_enqueue(struct smtps_session *s,
			              struct smtps_message *m);
void    smtps_session_push_result(struct smtps_session *s,
				          struct smtps_result *r);

/* outbuf.c */
int     smtps_session_queue_bytes(struct smtps_session *s, const char *data,
				          size_t len);
void    smtps_session_queue_run(struct smtps_session *s,
				        const struct smtps_message *owner,
				        const char *data, size_t len);
size_t  smtps_session_unsent(const struct smtps_session *s);
size_t  smtps_session_take(struct smtps_session *s, size_t n);
int     smtps_session_runs_of(const struct smtps_session *s,
			              const struct smtps_message *owner);
void    smtps_session_drop_output(struct smtps_session *s);
void    smtps_session_wipe_output(struct smtps_session *s);

/* trace.c */
void    smtps_session_trace(struct smtps_session *s, int kind,
			            const char *data, size_t len);
void    smtps_session_trace_reply(struct smtps_session *s,
				          const struct smtps_reply *r);

/* session.c, for tls.c */
int     smtps_session_take_replies(struct smtps_session *s,
				           const char *data, size_t len);
void    smtps_session_fail_now(struct smtps_session *s, int state, int stage,
			               const char *why);

/* session_info.c: the credentials go with the session */
void    smtps_credentials_free(struct smtps_credentials *c);

/* session_info.c, for states.c */
int     smtps_action_for_code(int code);

/*
 * tls.c: OpenSSL over memory BIOs. Once TLS is engaged (smtps_tls_begin()
 * ran), output() hands out the ciphertext buffer, feed() takes ciphertext,
 * and plaintext queued in s->out waits there until the handshake is done
 * and smtps_tls_flush() encrypts it.
 */
int     smtps_tls_mode(const struct smtps_session *s);	/* SMTPS_TLS_* */
int     smtps_tls_engaged(const struct smtps_session *s);	/* begun, maybe not up */
int     smtps_tls_handshaking(const struct smtps_session *s);
int     smtps_tls_verified(const struct smtps_session *s);	/* up, server
								 * authenticated */
int     smtps_tls_begin(struct smtps_session *s);
int     smtps_tls_proceed(struct smtps_session *s);	/* the turn came */
int     smtps_tls_in_handshake(const struct smtps_session *s);
int     smtps_tls_feed(struct smtps_session *s, const char *data, size_t len);
int     smtps_tls_flush(struct smtps_session *s);
size_t  smtps_tls_output(struct smtps_session *s, const char **data);
size_t  smtps_tls_consume(struct smtps_session *s, size_t n);
void    smtps_tls_discard(struct smtps_session *s);
void    smtps_tls_session_free(struct smtps_session *s);

/* What became of TLS on a session, for TLS reports (smtps_tls_outcome()). */
#define SMTPS_TLSO_PENDING 0		/* not yet known, or never tried */
#define SMTPS_TLSO_UP 1			/* negotiated */
#define SMTPS_TLSO_NOT_OFFERED 2	/* no STARTTLS in the EHLO reply */
#define SMTPS_TLSO_REFUSED 3		/* STARTTLS answered 4xx or 5xx */
#define SMTPS_TLSO_FAILED 4		/* the handshake failed */
void    smtps_tls_note_refusal(struct smtps_session *s, int outcome);
int     smtps_tls_observe(struct smtps_session *s);
long    smtps_tls_observed(const struct smtps_session *s);
int     smtps_tls_outcome(const struct smtps_session *s, int over,
			          long *verify_err);

#endif /* SMTPS_SESSION_PRIVATE_H */
