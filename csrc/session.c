/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	session.c 3
 * SUMMARY
 *	one SMTP client connection, sans I/O: its life and the driver's calls
 * SYNOPSIS
 *	#include "smtpstate.h"
 *
 *	struct smtps_session *smtps_session_new(machine, helo, user)
 *	void	smtps_session_free(s)
 *	int	smtps_session_set_timeout(s, state_id, ms)
 *	int	smtps_session_start(s, now)
 *	int	smtps_session_feed(s, data, len, now)
 *	size_t	smtps_session_output(s, &data)
 *	void	smtps_session_consume(s, n, now)
 *	int64_t	smtps_session_deadline(s)
 *	int	smtps_session_tick(s, now)
 *	void	smtps_session_closed(s, why, now)
 *	int	smtps_session_submit(s, msg, tag, now)
 *	int	smtps_session_quit(s, now)
 *	size_t	smtps_session_pending(s)
 *	struct smtps_result *smtps_session_next_result(s)
 *
 *	#include "internal.h"
 *
 *	int	smtps_session_set_tls_gate(s, fn, closure)
 *	int	smtps_session_tls_proceed(s, now)
 *	int	smtps_session_tls_in_handshake(s)
 * DESCRIPTION
 *	A session runs one connection on a snapshot of its machine's order.
 *	It never touches a socket: the driver feeds received bytes, sends
 *	what smtps_session_output() holds, and ticks the clock. This file is
 *	the driver's side of it; the loop itself is dispatch.c, a message on
 *	the connection is transaction.c (session_private.h lists the rest).
 *
 *	Every call that may run states (start, feed, consume, tick, submit,
 *	quit) sets in_dispatch for its length: a state calling back into
 *	one of them gets SMTPS_ESTATE, and smtps_session_free() from a state
 *	does nothing, so the loop never runs on a freed session. Each takes
 *	the driver's time, and every deadline is counted from the time of
 *	the call that set it.
 *
 *	TLS (tls.c) sits between the loop and the driver. Once it is engaged,
 *	feed() takes ciphertext and hands the plaintext to
 *	smtps_session_take_replies(); output() hands out ciphertext; states
 *	still queue plaintext in s->out, which every call that runs the loop
 *	encrypts before it returns (settle()). out_consumed then counts the
 *	plaintext whose ciphertext the driver has taken, so "the final dot
 *	was sent" keeps its meaning. A driver may ration handshakes: with a
 *	gate (smtps_session_set_tls_gate()), a handshake whose turn has not
 *	come waits, holding nothing of OpenSSL's, until
 *	smtps_session_tls_proceed().
 *
 *	Memory. An IDLE session gives back its output buffer and its body
 *	stage once nothing waits in them (release_idle(), at the end of
 *	every call): an idle pooled connection keeps no buffer of its own.
 *
 *	Nothing is lost: every submitted message ends in exactly one result,
 *	and a session that closes settles all it holds (dispatch.c).
 * DIAGNOSTICS
 *	SMTPS_ESTATE for calls made from inside a callback or in the wrong
 *	session status; SMTPS_ECLOSED after the end; SMTPS_EPROTO when the
 *	peer broke the protocol (the session is then CLOSING).
 * SEE ALSO
 *	dispatch.c, transaction.c, states.c, machine.c (the order), reply.c.
 *--*/

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "session_private.h"

static int64_t clock_in(int64_t now);
static void settle(struct smtps_session *s);
static int wake(struct smtps_session *s, int64_t now);
static void release_idle(struct smtps_session *s);

/* clock_in - a driver's reading of its clock (never below 0) */

static int64_t clock_in(int64_t now)
{
    return now < 0 ? 0 : now;
}

/* smtps_session_new - a session on a snapshot of machine m */

struct smtps_session *smtps_session_new(struct smtps_machine *m,
					const char *helo, void *user)
{
    struct smtps_session *s;
    size_t  len;
    int     id, count;

    if (m == NULL)
	m = smtps_default_machine();
    if (helo == NULL || (len = strlen(helo)) == 0 || len > SMTPS_HELO_MAX
	|| smtps_check_text(helo, len, SMTPS_HELO_MAX, NULL) != SMTPS_OK
	|| strchr(helo, ' ') != NULL)
	return NULL;
    if ((s = calloc(1, sizeof(*s))) == NULL)
	return NULL;
    smtps_machine_retain(m);
    s->machine = m;
    s->order = smtps_machine_snapshot(m);
    count = s->order->count;
    s->local = calloc((size_t) count, sizeof(*s->local));
    s->local_made = calloc((size_t) count, 1);
    s->timeout = calloc((size_t) count, sizeof(*s->timeout));
    s->parser = smtps_reply_parser_new();
    if (s->local == NULL || s->local_made == NULL || s->timeout == NULL
	|| s->parser == NULL) {
	smtps_session_free(s);
	return NULL;
    }
    for (id = 0; id < count; id++)
	s->timeout[id] = smtps_builtin_timeout(id);
    memcpy(s->helo, helo, len + 1);
    s->user = user;
    s->status = SMTPS_SESS_NEW;
    s->cur = -1;
    s->forced_next = -1;
    s->pending = -1;
    s->deadline = -1;
    s->fail_state = -1;
    s->fail_stage = -1;
    s->zero_check = SMTPS_ZERO_CLOCK_AFTER;	/* dispatch.c, zero_reset() */
    return s;
}

/* smtps_session_free - release a session and whatever it still holds */

void    smtps_session_free(struct smtps_session *s)
{
    struct smtps_message *m;
    struct smtps_result *r;
    const smtp_state *st;
    int     id, i;

    /* From inside one of its own states: the loop still runs on it. */
    if (s == NULL || s->in_dispatch)
	return;
    /* Per-state data goes back through each state's own free. */
    if (s->order != NULL && s->local_made != NULL)
	for (id = 0; id < s->order->count; id++) {
	    st = &s->machine->states[id];
	    if (s->local_made[id] && st->free != NULL) {
		s->cur = id;			/* its data, its name */
		st->free(s, s->local[id], st->closure);
	    }
	}
    while ((m = s->queue) != NULL) {
	s->queue = m->qnext;
	smtps_result_free(m->qresult);
	smtps_message_free(m);
    }
    for (i = 0; i < 2; i++) {
	smtps_message_free(s->txs[i].msg);
	smtps_result_free(s->txs[i].res);
    }
    while ((r = s->results) != NULL) {
	s->results = r->next;
	smtps_result_free(r);
    }
    smtps_reply_parser_free(s->parser);
    smtps_tls_session_free(s);
    smtps_session_wipe_output(s);
    smtps_credentials_free(s->cred);
    free(s->out.data);
    free(s->segs);
    free(s->stage);
    free(s->local);
    free(s->local_made);
    free(s->timeout);
    smtps_order_release(s->order);
    if (s->machine != NULL)
	smtps_machine_free(s->machine);
    free(s);
}

/* smtps_session_set_timeout - deadline for replies in state_id */

int     smtps_session_set_timeout(struct smtps_session *s, int state_id,
				          int64_t ms)
{
    if (s == NULL || state_id < 0 || state_id >= s->order->count || ms < 0)
	return SMTPS_EINVAL;
    s->timeout[state_id] = ms > SMTPS_TIMEOUT_MAX ? SMTPS_TIMEOUT_MAX : ms;
    return SMTPS_OK;
}

/*
 * release_idle - an IDLE session gives back the buffers it can make
 * again: the output buffer once empty (the body pump grew it to 16 KiB
 * and more; wiped first if credentials passed through it), the ring of
 * body runs once empty, and the body source's stage. An idle connection then holds no buffer of its own,
 * and the next message makes them anew, at the cost of one malloc.
 */

static void release_idle(struct smtps_session *s)
{
    if (s->out.data != NULL && s->out.start == s->out.end) {
	smtps_session_wipe_output(s);
	free(s->out.data);
	s->out.data = NULL;
	s->out.start = s->out.end = s->out.cap = 0;
    }
    if (s->segs != NULL && s->nseg == 0) {
	free(s->segs);
	s->segs = NULL;
    }
    if (s->stage != NULL && s->tx == NULL) {
	free(s->stage);
	s->stage = NULL;
    }
}

/* settle - before a call returns: encrypt what the states queued; trim */

static void settle(struct smtps_session *s)
{
    if (smtps_tls_engaged(s))
	(void) smtps_tls_flush(s);
    if (s->status == SMTPS_SESS_IDLE)
	release_idle(s);
}

/* smtps_session_start - the connection is up: enter the first state */

int     smtps_session_start(struct smtps_session *s, int64_t now)
{
    if (s == NULL)
	return SMTPS_EINVAL;
    if (s->status != SMTPS_SESS_NEW || s->in_dispatch)
	return SMTPS_ESTATE;
    s->now = clock_in(now);
    s->status = SMTPS_SESS_ACTIVE;
    s->in_dispatch = 1;
    smtps_dispatch_transition(s, s->order->head);
    smtps_dispatch_run(s);

    /*
     * Implicit TLS (RFC 8314): the handshake comes before the banner. It
     * begins after the states placed before BANNER have run, so that what
     * they queued (a PROXY protocol header) still leaves in clear first.
     */
    if (smtps_tls_mode(s) == SMTPS_TLS_IMPLICIT && !smtps_tls_engaged(s)
	&& s->status == SMTPS_SESS_ACTIVE)
	(void) smtps_tls_begin(s);
    settle(s);
    s->in_dispatch = 0;
    return SMTPS_OK;
}

/* smtps_session_feed - consume bytes received from the server */

int     smtps_session_feed(struct smtps_session *s, const char *data,
			           size_t len, int64_t now)
{
    int     rc;

    if (s == NULL || (data == NULL && len > 0))
	return SMTPS_EINVAL;
    if (s->in_dispatch || s->status == SMTPS_SESS_NEW)
	return SMTPS_ESTATE;
    if (s->status == SMTPS_SESS_CLOSED)
	return SMTPS_ECLOSED;
    s->now = clock_in(now);
    s->in_dispatch = 1;
    if (smtps_tls_engaged(s))
	rc = smtps_tls_feed(s, data, len);	/* decrypts, then takes replies */
    else
	rc = smtps_session_take_replies(s, data, len);
    settle(s);
    s->in_dispatch = 0;
    return rc;
}

/* smtps_session_take_replies - parse plaintext replies and run the loop */

int     smtps_session_take_replies(struct smtps_session *s, const char *data,
				           size_t len)
{
    struct smtps_reply reply;
    size_t  used;
    int     rc = SMTPS_OK, clear = !smtps_tls_engaged(s);

    while (len > 0 && (s->status == SMTPS_SESS_ACTIVE
		       || s->status == SMTPS_SESS_IDLE)) {
	rc = smtps_reply_parse(s->parser, data, len, &used, &reply);
	if (rc < 0) {
	    snprintf(s->reason, sizeof(s->reason), "malformed reply from the "
		     "server: %s", smtps_strerror(rc));
	    smtps_dispatch_fail_conn(s, s->cur, NULL, SMTPS_STATUS_TEMPFAIL,
				     NULL, 1);
	    break;
	}
	if (rc == 0)
	    break;
	rc = SMTPS_OK;
	data += used;
	len -= used;
	if (s->status == SMTPS_SESS_IDLE)	/* e.g. 421 idle timeout */
	    s->status = SMTPS_SESS_ACTIVE;
	if (s->trace != NULL)
	    smtps_session_trace_reply(s, &reply);
	smtps_dispatch_reply(s, &reply);
	smtps_dispatch_run(s);

	/*
	 * That reply started TLS (the 220 to STARTTLS). Whatever else came
	 * in clear with it was sent before the handshake, so a man in the
	 * middle may have written it (CVE-2011-0411, RFC 3207 5): it is
	 * neither parsed as replies nor taken as TLS records.
	 */
	if (clear && smtps_tls_engaged(s)) {
	    if (len > 0) {
		smtps_tls_discard(s);
		smtps_session_fail_now(s, SMTPS_STATE_STARTTLS,
				       SMTPS_STAGE_STARTTLS_DONE,
				       "the server sent clear text after its "
				       "STARTTLS reply, before the TLS handshake "
				       "(response injection?)");
		rc = SMTPS_EPROTO;
	    }
	    break;
	}
    }
    return rc;
}

/* smtps_session_fail_now - end the connection at once, without QUIT */

void    smtps_session_fail_now(struct smtps_session *s, int state, int stage,
			               const char *why)
{
    if (s->status != SMTPS_SESS_ACTIVE && s->status != SMTPS_SESS_IDLE)
	return;
    if (stage >= 0) {
	s->fail_state = state;
	s->fail_stage = stage;
    }
    smtps_dispatch_fail_conn(s, s->cur, NULL, SMTPS_STATUS_TEMPFAIL, why, 1);
}

/* smtps_session_output - bytes waiting to be sent */

size_t  smtps_session_output(struct smtps_session *s, const char **data)
{
    if (s == NULL || data == NULL)
	return 0;
    if (smtps_tls_engaged(s))
	return smtps_tls_output(s, data);	/* ciphertext */
    if (s->nseg > 0) {				/* runs: the first piece */
	const struct smtps_seg *g = &s->segs[s->seg_head];

	if (g->gap > 0) {
	    *data = s->out.data + s->out.start;
	    return g->gap;
	}
	*data = g->data;
	return g->len;
    }
    if (s->out.data == NULL) {			/* nothing queued yet */
	*data = "";
	return 0;
    }
    *data = s->out.data + s->out.start;
    return s->out.end - s->out.start;
}

/* smtps_session_consume - the driver sent n bytes of the output */

void    smtps_session_consume(struct smtps_session *s, size_t n, int64_t now)
{
    struct smtps_tx *tx;
    int     was_sent, was_active, rc;

    if (s == NULL || s->in_dispatch)
	return;
    tx = s->tx;
    was_sent = tx != NULL && smtps_tx_dot_sent(s, tx);
    was_active = tx != NULL && tx->body_active;
    s->now = clock_in(now);
    if (smtps_tls_engaged(s)) {
	/* n is ciphertext; this is the plaintext it finished carrying. */
	n = smtps_tls_consume(s, n);
    } else
	n = smtps_session_take(s, n);		/* the buffer and the runs */
    s->out_consumed += n;
    s->in_dispatch = 1;
    s->state_reason[0] = 0;
    if (was_active && (rc = smtps_tx_pump_body(s, tx)) != SMTPS_OK) {
	smtps_dispatch_body_failed(s, rc);
	s->in_dispatch = 0;
	return;
    }
    /* A long body has just been queued to its end: the next may follow. */
    if (was_active && !tx->body_active)
	smtps_dispatch_run_ahead(s);
    settle(s);
    s->in_dispatch = 0;
    /* Writing the body is progress; its last byte starts the final wait. */
    if (n > 0 && s->nfifo > 0 && s->fifo[0].state == SMTPS_STATE_BODY
	&& (!was_sent || s->tx == NULL || !smtps_tx_dot_sent(s, s->tx)))
	smtps_dispatch_refresh_deadline(s);
}

/* smtps_session_deadline - when tick must be called, -1 for never */

int64_t smtps_session_deadline(const struct smtps_session *s)
{
    return s ? s->deadline : -1;
}

/* smtps_session_tick - the clock moved: enforce the deadline */

int     smtps_session_tick(struct smtps_session *s, int64_t now)
{
    char    why[SMTPS_REASON_MAX];
    int     id;

    if (s == NULL)
	return SMTPS_EINVAL;
    if (s->in_dispatch)
	return SMTPS_ESTATE;
    s->now = clock_in(now);
    if (s->deadline < 0 || s->now < s->deadline
	|| (s->status != SMTPS_SESS_ACTIVE && s->status != SMTPS_SESS_IDLE))
	return SMTPS_OK;
    id = s->nfifo > 0 ? s->fifo[0].state : s->cur;
    if (smtps_tls_handshaking(s))
	snprintf(why, sizeof(why), "timeout: the TLS handshake did not "
		 "complete");
    else
	snprintf(why, sizeof(why), "timeout: no reply in state %s",
		 id >= 0 ? s->machine->states[id].name : "none");
    s->in_dispatch = 1;
    smtps_dispatch_fail_conn(s, id, NULL, SMTPS_STATUS_TEMPFAIL, why, 1);
    s->in_dispatch = 0;
    return SMTPS_OK;
}

/* smtps_session_closed - the connection is gone (EOF, error, closed) */

void    smtps_session_closed(struct smtps_session *s, const char *why,
			             int64_t now)
{
    if (s == NULL || s->status == SMTPS_SESS_CLOSED || s->in_dispatch)
	return;
    s->now = clock_in(now);
    if (s->reason[0] == 0 && s->status != SMTPS_SESS_CLOSING)
	snprintf(s->reason, sizeof(s->reason), "connection lost%s: %s",
		 smtps_tls_handshaking(s) ? " during the TLS handshake" : "",
		 why ? why : "closed");
    s->in_dispatch = 1;
    smtps_dispatch_lost(s);
    s->in_dispatch = 0;
    s->nfifo = 0;
    s->draining = 0;
    s->ndrainq = 0;
    s->deadline = -1;
    s->status = SMTPS_SESS_CLOSED;
}

/* smtps_session_status - where the session is (enum smtps_session_status) */

int     smtps_session_status(const struct smtps_session *s)
{
    return s ? s->status : SMTPS_EINVAL;
}

/* smtps_session_submit - queue a message; the session owns it on success */

int     smtps_session_submit(struct smtps_session *s, struct smtps_message *msg,
			             uint64_t tag, int64_t now)
{
    struct smtps_result *r;
    int     rc;

    if (s == NULL || msg == NULL || msg->nrcpt == 0 || msg->qnext != NULL)
	return SMTPS_EINVAL;
    /* The result exists before the message is accepted: none can be lost. */
    if ((r = smtps_result_new(tag, msg->nrcpt)) == NULL)
	return SMTPS_ENOMEM;
    msg->tag = tag;
    msg->qresult = r;
    if ((rc = smtps_session_submit_prepared(s, msg, now)) != SMTPS_OK) {
	msg->qresult = NULL;
	smtps_result_free(r);
    }
    return rc;
}

/*
 * wake - an IDLE session has work again (a message, QUIT): run it now,
 * with deadlines from now, not from the last event, which may be long past
 */

static int wake(struct smtps_session *s, int64_t now)
{
    s->now = clock_in(now);
    if (s->status != SMTPS_SESS_IDLE)
	return SMTPS_OK;
    s->status = SMTPS_SESS_ACTIVE;
    s->in_dispatch = 1;
    smtps_dispatch_transition(s, SMTPS_STATE_MAIL);
    smtps_dispatch_run(s);
    settle(s);
    s->in_dispatch = 0;
    return SMTPS_OK;
}

/* smtps_session_submit_prepared - queue a message that carries its result */

int     smtps_session_submit_prepared(struct smtps_session *s,
				              struct smtps_message *msg,
				              int64_t now)
{
    if (msg->qnext != NULL || msg->qresult == NULL)
	return SMTPS_EINVAL;
    if (s->in_dispatch)
	return SMTPS_ESTATE;
    if (s->status == SMTPS_SESS_CLOSED || s->status == SMTPS_SESS_CLOSING
	|| s->conn_failed || s->quit_requested)
	return SMTPS_ECLOSED;
    smtps_session_enqueue(s, msg);
    return wake(s, now);
}

/* smtps_session_set_runahead - let transactions start before the last ends */

void    smtps_session_set_runahead(struct smtps_session *s, SMTPSFeeder fn,
				           void *closure)
{
    s->tx_runahead = 1;
    s->feeder = fn;
    s->feeder_closure = fn != NULL ? closure : NULL;
}

/* smtps_session_set_hand_back - hold the queue if connecting fails */

void    smtps_session_set_hand_back(struct smtps_session *s)
{
    s->hand_back = 1;
}

/* smtps_session_set_tls_gate - ask fn before a TLS handshake begins */

int     smtps_session_set_tls_gate(struct smtps_session *s, SMTPSTlsGate fn,
				           void *closure)
{
    if (s == NULL)
	return SMTPS_EINVAL;
    if (s->status != SMTPS_SESS_NEW)
	return SMTPS_ESTATE;
    s->tls_gate = fn;
    s->tls_gate_closure = fn != NULL ? closure : NULL;
    return SMTPS_OK;
}

/*
 * smtps_session_tls_proceed - the driver's turn for a handshake came:
 * begin it (the ClientHello is in the output on return). The time spent
 * waiting was ours, not the server's: the reply deadline starts again.
 */

int     smtps_session_tls_proceed(struct smtps_session *s, int64_t now)
{
    int     rc;

    if (s == NULL)
	return SMTPS_EINVAL;
    if (s->in_dispatch || (s->status != SMTPS_SESS_ACTIVE
			   && s->status != SMTPS_SESS_IDLE))
	return SMTPS_ESTATE;
    s->now = clock_in(now);
    s->in_dispatch = 1;
    /* SMTPS_ESTATE: no handshake waits (any more); nothing was done. */
    if ((rc = smtps_tls_proceed(s)) != SMTPS_ESTATE) {
	if (s->status == SMTPS_SESS_ACTIVE || s->status == SMTPS_SESS_IDLE)
	    smtps_dispatch_refresh_deadline(s);
	settle(s);
    }
    s->in_dispatch = 0;
    return rc;
}

/*
 * smtps_session_tls_in_handshake - the handshake runs or waits for its
 * turn on a live connection: begun, neither up nor failed, not closing
 */

int     smtps_session_tls_in_handshake(const struct smtps_session *s)
{
    return s != NULL && (s->status == SMTPS_SESS_ACTIVE
			 || s->status == SMTPS_SESS_IDLE)
	&& smtps_tls_in_handshake(s);
}

/* smtps_session_take_back - a held message, once the connection failed */

struct smtps_message *smtps_session_take_back(struct smtps_session *s,
					              int *status)
{
    struct smtps_message *m;

    if (s->held_status == 0 || (m = s->queue) == NULL)
	return NULL;
    s->queue = m->qnext;
    if (s->queue == NULL)
	s->queue_tail = NULL;
    s->nqueued--;
    m->qnext = NULL;
    *status = s->held_status;
    return m;
}

/*
 * smtps_session_cancel - withdraw message tag (cancel.c): still queued,
 * it fails at once, not attempted; live with no data sent, it is marked
 * and fails at its next reply (dispatch.c); else too late
 */

int     smtps_session_cancel(struct smtps_session *s, uint64_t tag)
{
    struct smtps_message *m, *prev = NULL;
    struct smtps_result *r;

    if (s->in_dispatch)
	return SMTPS_ESTATE;
    for (m = s->queue; m != NULL; prev = m, m = m->qnext) {
	if (m->tag != tag)
	    continue;
	if (prev != NULL)
	    prev->qnext = m->qnext;
	else
	    s->queue = m->qnext;
	if (s->queue_tail == m)
	    s->queue_tail = prev;
	s->nqueued--;
	m->qnext = NULL;
	r = m->qresult;
	m->qresult = NULL;
	(void) smtps_result_set_reason(r, "not attempted: cancelled by the caller");
	smtps_result_settle(r, SMTPS_STATUS_TEMPFAIL, 1);
	smtps_bounce_classify_result(r);
	smtps_session_push_result(s, r);
	smtps_message_free(m);
	return SMTPS_CANCEL_DONE;
    }
    if (s->tx != NULL && s->tx->msg != NULL && s->tx->msg->tag == tag) {
	if (s->tx->data_sent || s->tx->outcome != 0 || s->tx->final_replied)
	    return SMTPS_CANCEL_TOO_LATE;
	s->tx->cancelled = 1;
	return SMTPS_CANCEL_PENDING;
    }
    if (s->prev != NULL && s->prev->msg != NULL && s->prev->msg->tag == tag)
	return SMTPS_CANCEL_TOO_LATE;
    return SMTPS_ENOTFOUND;
}

/* smtps_session_quit - end the connection once the queue is done */

int     smtps_session_quit(struct smtps_session *s, int64_t now)
{
    if (s == NULL)
	return SMTPS_EINVAL;
    if (s->in_dispatch)
	return SMTPS_ESTATE;
    s->quit_requested = 1;
    if (s->status == SMTPS_SESS_NEW) {
	smtps_dispatch_fail_queue(s, -1, 0, SMTPS_STATUS_TEMPFAIL,
				  "quit before connecting");
	s->status = SMTPS_SESS_CLOSED;
	return SMTPS_OK;
    }
    return wake(s, now);
}

/* smtps_session_pending - messages submitted that have no result yet */

size_t  smtps_session_pending(const struct smtps_session *s)
{
    return s ? s->nqueued + (s->tx != NULL) + (s->prev != NULL) : 0;
}

/* smtps_session_next_result - take the oldest finished result */

struct smtps_result *smtps_session_next_result(struct smtps_session *s)
{
    struct smtps_result *r;

    if (s == NULL || (r = s->results) == NULL)
	return NULL;
    s->results = r->next;
    if (s->results == NULL)
	s->results_tail = NULL;
    r->next = NULL;
    return r;
}
