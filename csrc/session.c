/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	session.c 3
 * SUMMARY
 *	one SMTP client connection, sans I/O: the dispatch loop
 * SYNOPSIS
 *	#include "smtpstate.h"
 *
 *	struct smtps_session *smtps_session_new(machine, helo, user)
 *	int	smtps_session_start(s, now)
 *	int	smtps_session_feed(s, data, len, now)
 *	size_t	smtps_session_output(s, &data)
 *	void	smtps_session_consume(s, n, now)
 *	int	smtps_session_tick(s, now)
 *	void	smtps_session_closed(s, why, now)
 *	int	smtps_session_submit(s, msg, tag)
 *	int	smtps_session_quit(s)
 *	struct smtps_result *smtps_session_next_result(s)
 *	int	smtps_session_set_trace(s, fn, closure)
 * DESCRIPTION
 *	A session runs one connection on a snapshot of its machine's order.
 *	It never touches a socket: the driver feeds received bytes, sends
 *	what smtps_session_output() holds, and ticks the clock.
 *
 *	The loop. Entering a state runs its setup, which queues commands and
 *	says how many replies it awaits; the state then sits in the in-flight
 *	FIFO. Each complete reply goes to the callback of the state at the
 *	head of the FIFO; the action returned for its last reply picks the
 *	next state. A state awaiting no reply gets one callback with NULL.
 *
 *	Pipelining (RFC 2920). When the server offers it, a state marked
 *	SMTPS_STATE_PIPELINABLE whose default next state is pipelinable too
 *	lets that next state run its setup at once, before any reply: MAIL,
 *	RCPT and DATA leave in one write and their replies are matched to
 *	them in FIFO order. If a reply then sends the machine anywhere but to
 *	the state already in flight, every reply still owed is drained (read
 *	and dropped) before the new state is entered, so a reply is never
 *	paired with the wrong command. Draining answers a 354 with a lone
 *	dot and a 334 with "*", so the server is never left waiting; but
 *	a 354 or 334 with more of our commands still owed a reply ends the
 *	connection, since the server would read those commands as its data.
 *
 *	Transactions. The part of the order from MAIL up to RSET runs once per
 *	message. Reaching MAIL without a message starts the next queued one,
 *	or leaves the session IDLE; reaching RSET ends the transaction and
 *	hands out its result. RSET itself sends a command only when a failed
 *	transaction is still open on the server.
 *
 *	A reply is paired with a command only once the driver has taken
 *	that command's first line: a server that answers what it has not
 *	been sent yet (a reply "ahead", or two replies to one command) has
 *	lost step with us, and the connection ends at once, without QUIT.
 *
 *	Message data. From the 354 to DATA (or the BDAT line) until the
 *	driver has taken the final dot (the last BDAT byte), the server
 *	reads everything as message text: no command line may be queued
 *	then, and a transaction that fails in between (a state after DATA
 *	raised or refused) ends the connection without a dot, without RSET
 *	and without QUIT, so that the partial message is discarded.
 *
 *	Deadlines are absolute: set when a command is issued, renewed only by
 *	progress (a complete reply, or the driver taking body output), never
 *	by a trickle of bytes. A deadline that passes closes the connection.
 *
 *	Nothing is lost: every submitted message ends in exactly one result.
 *	After the final dot has been taken by the driver and before its reply,
 *	a lost connection gives SMTPS_STATUS_UNKNOWN (RFC 1047).
 *
 *	TLS (tls.c) sits between the loop and the driver. Once it is engaged,
 *	feed() takes ciphertext and hands the plaintext to
 *	smtps_session_take_replies(); output() hands out ciphertext; states
 *	still queue plaintext in s->out, which every call that runs the loop
 *	encrypts before it returns (settle()). out_consumed then counts the
 *	plaintext whose ciphertext the driver has taken, so "the final dot
 *	was sent" keeps its meaning.
 *
 *	The transcript. With a trace function set, every command line is
 *	traced as it is queued, every reply line as it is parsed, the
 *	content once as given: plaintext, whatever TLS does on the wire.
 *	What AUTH queues is traced as "[credentials redacted]".
 *
 *	Results get their bounce class (classify.c) when they are final,
 *	as they join the queue the driver collects.
 * DIAGNOSTICS
 *	SMTPS_ESTATE for calls made from inside a callback or in the wrong
 *	session status, and for a command line queued while the server
 *	reads message data; SMTPS_ECLOSED after the end, SMTPS_EPROTO when the
 *	peer broke the protocol (the session is then CLOSING).
 * SEE ALSO
 *	states.c (the built-in states), machine.c (the order), reply.c.
 *--*/

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static const smtp_state *state_of(const struct smtps_session *s, int id);
static int default_next(const struct smtps_session *s, int id);
static void enter(struct smtps_session *s, int id);
static void in_flight(struct smtps_session *s, int id, int n,
		      uint64_t before);
static void go(struct smtps_session *s, int target);
static void transition(struct smtps_session *s, int target);
static void run(struct smtps_session *s);
static void on_reply(struct smtps_session *s, const struct smtps_reply *r);
static void act_on(struct smtps_session *s, int id, int act,
		   const struct smtps_reply *reply);
static void fail_conn(struct smtps_session *s, int id,
		      const struct smtps_reply *reply, int status,
		      const char *why, int close_now);
static void fail_queue(struct smtps_session *s, int id, int awaiting,
		       int status, const char *why);
static void start_tx(struct smtps_session *s);
static void emit_tx(struct smtps_session *s);
static void push_result(struct smtps_session *s, struct smtps_result *r);
static void set_stage(struct smtps_session *s, struct smtps_result *r, int id,
		      int awaiting);
static int call_callback(struct smtps_session *s, int id,
			 const struct smtps_reply *reply);
static void refresh_deadline(struct smtps_session *s);
static int dot_sent(const struct smtps_session *s);
static int in_message_data(const struct smtps_session *s);
static void drop_output(struct smtps_session *s);
static int awaiting_reply(const struct smtps_session *s, int id);
static int buf_reserve(struct smtps_buf *b, size_t need);
static int queue_bytes(struct smtps_session *s, const char *data, size_t len);
static void set_reason(char *dst, const char *fmt, const char *a,
		       const char *b);
static void settle(struct smtps_session *s);
static void trace_reply(struct smtps_session *s, const struct smtps_reply *r);
static void tx_swap(struct smtps_session *s);
static int live_head(const struct smtps_session *s);
static void maybe_run_ahead(struct smtps_session *s);
static void finish_prev(struct smtps_session *s, const struct smtps_reply *r);
static int fail_tx(struct smtps_session *s, int id,
		   const struct smtps_reply *reply, int status);
static void lost_tx(struct smtps_session *s, int id);
static void enqueue(struct smtps_session *s, struct smtps_message *m);

/* state_of - the record of id in the session's machine */

static const smtp_state *state_of(const struct smtps_session *s, int id)
{
    return &s->machine->states[id];
}

/* default_next - the state after id in the session's snapshot */

static int default_next(const struct smtps_session *s, int id)
{
    return s->order->next[id];
}

/* set_reason - format a reason string, bounded */

static void set_reason(char *dst, const char *fmt, const char *a,
		       const char *b)
{
    snprintf(dst, SMTPS_REASON_MAX, fmt, a ? a : "", b ? b : "");
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
	s->timeout[id] = SMTPS_TIMEOUT_OTHER;
    s->timeout[SMTPS_STATE_BANNER] = SMTPS_TIMEOUT_BANNER;
    s->timeout[SMTPS_STATE_MAIL] = SMTPS_TIMEOUT_MAIL;
    s->timeout[SMTPS_STATE_RCPT] = SMTPS_TIMEOUT_RCPT;
    s->timeout[SMTPS_STATE_DATA] = SMTPS_TIMEOUT_DATA;
    s->timeout[SMTPS_STATE_BODY] = SMTPS_TIMEOUT_FINAL;
    memcpy(s->helo, helo, len + 1);
    s->user = user;
    s->status = SMTPS_SESS_NEW;
    s->cur = -1;
    s->forced_next = -1;
    s->pending = -1;
    s->deadline = -1;
    s->rcpt_index = -1;
    s->fail_state = -1;
    s->fail_stage = -1;
    return s;
}

/* smtps_session_free - release a session and whatever it still holds */

void    smtps_session_free(struct smtps_session *s)
{
    struct smtps_message *m;
    struct smtps_result *r;
    const smtp_state *st;
    int     id;

    if (s == NULL)
	return;
    /* Per-state data goes back through each state's own free. */
    if (s->order != NULL && s->local_made != NULL)
	for (id = 0; id < s->order->count; id++) {
	    st = state_of(s, id);
	    if (s->local_made[id] && st->free != NULL)
		st->free(s, s->local[id], st->closure);
	}
    while ((m = s->queue) != NULL) {
	s->queue = m->qnext;
	smtps_result_free((struct smtps_result *) m->qresult);
	smtps_message_free(m);
    }
    if (s->tx != NULL)
	smtps_message_free(s->tx);
    smtps_result_free(s->txres);
    if (s->prev.tx != NULL)
	smtps_message_free(s->prev.tx);
    smtps_result_free(s->prev.txres);
    while ((r = s->results) != NULL) {
	s->results = r->next;
	smtps_result_free(r);
    }
    smtps_reply_parser_free(s->parser);
    smtps_tls_session_free(s);
    /* AUTH lines passed through the output buffer: wipe it with the rest. */
    if (s->auth != NULL && s->out.data != NULL)
	smtps_wipe(s->out.data, s->out.cap);
    smtps_auth_session_free(s);
    free(s->out.data);
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
    s->timeout[state_id] = ms;
    return SMTPS_OK;
}

/* call_callback - hand one reply (or NULL) to the state's callback */

static int call_callback(struct smtps_session *s, int id,
			         const struct smtps_reply *reply)
{
    const smtp_state *st = state_of(s, id);

    s->forced_next = -1;
    s->cur = id;
    return st->callback(s, reply, st->closure);
}

/* enter - run a state's setup and put it in flight */

static void enter(struct smtps_session *s, int id)
{
    const smtp_state *st = state_of(s, id);
    uint64_t before = s->out_produced;
    int     n = 0;

    if (s->nfifo >= SMTPS_INFLIGHT_MAX) {
	/* Only a machine of more pipelinable states than we track. */
	fail_conn(s, id, NULL, SMTPS_STATUS_TEMPFAIL,
		  "too many pipelined states in flight", 0);
	return;
    }
    s->cur = id;
    s->no_lookahead = 0;
    s->state_reason[0] = 0;
    if (!s->local_made[id]) {
	s->local_made[id] = 1;
	if (st->init_local_state != NULL)
	    n = st->init_local_state(s, st->closure, &s->local[id]);
    }
    if (n >= 0 && st->setup != NULL)
	n = st->setup(s, st->closure);
    in_flight(s, id, n, before);
}

/*
 * in_flight - the rest of enter(), once setup returned n: act on its
 * failure, or put the state in the FIFO and maybe run ahead. Apart from
 * enter() so that run()'s tight path, which runs setups itself, can hand
 * it every entry that is not a plain zero-reply one.
 */

static void in_flight(struct smtps_session *s, int id, int n, uint64_t before)
{
    const smtp_state *st = state_of(s, id);
    struct smtps_inflight *e;
    size_t  tail;
    const char *p, *nl;
    int     next;

    if (n < 0) {
	if (s->state_reason[0] == 0)
	    set_reason(s->state_reason, "state %s could not start: %s",
		       st->name, smtps_strerror(n));
	act_on(s, id, n == SMTPS_ETOOBIG || n == SMTPS_EINVAL ?
	       SMTPS_ACT_PERMFAIL_TX : SMTPS_ACT_TEMPFAIL_TX, NULL);
	return;
    }
    e = &s->fifo[s->nfifo++];
    e->state = id;
    e->awaiting = n;
    e->handled = 0;
    e->called = 0;
    e->first_end = 0;
    /* What setup queued is the tail of the output: find its first line. */
    tail = (size_t) (s->out_produced - before);
    if (n > 0 && tail > 0 && tail <= s->out.end - s->out.start) {
	p = s->out.data + s->out.end - tail;
	nl = memchr(p, '\n', tail);
	e->first_end = before + (nl != NULL ? (size_t) (nl - p) + 1 : tail);
    }
    if (s->nfifo == 1)
	refresh_deadline(s);

    /*
     * Run ahead (RFC 2920): the next state's commands join this write.
     * The next state must be the default one, since that is where this
     * state's success leads; go() drains it if the replies say otherwise.
     */
    if (n > 0 && s->pipelining && !s->no_lookahead
	&& (st->flags & SMTPS_STATE_PIPELINABLE)
	&& (next = default_next(s, id)) >= 0
	&& (state_of(s, next)->flags & SMTPS_STATE_PIPELINABLE)
	&& s->status == SMTPS_SESS_ACTIVE)
	enter(s, next);
    else if (id == SMTPS_STATE_BODY)
	maybe_run_ahead(s);
}

/* go - move to target once every reply still owed has been read */

static void go(struct smtps_session *s, int target)
{
    /* The earlier transaction's BODY, run past, keeps its reply. */
    int     i, keep = s->prev_open;

    if (s->nfifo > keep) {
	if (s->draining == 0 && s->fifo[keep].state == target)
	    return;				/* already in flight */
	for (i = keep; i < s->nfifo; i++)
	    s->draining += s->fifo[i].awaiting - s->fifo[i].handled;
	s->nfifo = keep;
    }
    if (s->draining > 0) {
	s->pending = target;
	refresh_deadline(s);
	return;
    }
    transition(s, target);
}

/* transition - enter target, minding the transaction boundaries */

static void transition(struct smtps_session *s, int target)
{
    if (s->status != SMTPS_SESS_ACTIVE)
	return;
    if (target < 0) {				/* the end of the order */
	s->status = SMTPS_SESS_CLOSING;
	s->deadline = -1;
	return;
    }
    if (target == SMTPS_STATE_MAIL && s->tx == NULL) {
	if (s->queue != NULL && !s->conn_failed) {
	    if (s->need_reset) {
		enter(s, SMTPS_STATE_RSET);
		return;
	    }
	    start_tx(s);
	    enter(s, SMTPS_STATE_MAIL);
	    return;
	}
	if (s->quit_requested) {
	    enter(s, SMTPS_STATE_RSET);
	    return;
	}
	s->status = SMTPS_SESS_IDLE;
	s->cur = SMTPS_STATE_MAIL;
	s->deadline = -1;
	return;
    }
    if (target == SMTPS_STATE_RSET && s->tx != NULL) {
	/* A state jumped out of the message data: only closing ends it. */
	if (in_message_data(s)) {
	    fail_conn(s, s->cur, NULL, SMTPS_STATUS_TEMPFAIL,
		      "the transaction ended inside the message data", 1);
	    return;
	}
	emit_tx(s);
    }
    enter(s, target);
}

/*
 * run - give 0-reply states at the head of the FIFO their callback
 *
 * The tight path. When a state awaiting no reply returns NEXT, RETRY or
 * JUMP (after smtp_next_state()) and nothing else is in flight or being
 * drained, act_on(), go() and transition() come down to enter(target),
 * unless the target is a transaction boundary (MAIL, RSET), BODY (whose
 * deadline is special) or entered for the first time (init_local_state).
 * This loop then enters the target itself, and when its setup awaits no
 * reply either and left the session as it was, calls its callback at
 * once: the FIFO push and pop, the checks that cannot fail here and the
 * calls between them were most of a transition's cost (~15 ns against
 * ~2 ns for the callback itself). Whatever else happens (a failure, a
 * reply awaited, the end of the order, a callback or setup that failed
 * or closed the session) goes the general way, through act_on() or
 * in_flight(), with the same effects as before.
 */

static void run(struct smtps_session *s)
{
    /* Fixed for the session's life: kept in registers across the calls. */
    const smtp_state *states = s->machine->states;
    const int *next = s->order->next;
    const unsigned char *made = s->local_made;
    const int64_t *timeout = s->timeout;
    const smtp_state *st;
    uint64_t before;
    int64_t t;
    int     act, id, target, n, i;

    while (s->status == SMTPS_SESS_ACTIVE && s->draining == 0
	   && s->nfifo > 0 && s->fifo[0].awaiting == 0) {
	id = s->fifo[0].state;
	for (i = 1; i < s->nfifo; i++)
	    s->fifo[i - 1] = s->fifo[i];
	s->nfifo--;
	for (;;) {
	    s->reply_index = 0;
	    act = call_callback(s, id, NULL);
	    if (act == SMTPS_ACT_RETRY)
		target = id;
	    else if (act == SMTPS_ACT_NEXT)
		target = s->forced_next >= 0 ? s->forced_next : next[id];
	    else if (act == SMTPS_ACT_JUMP && s->forced_next >= 0)
		target = s->forced_next;
	    else
		break;
	    /* Anything go() or transition() do besides enter(): general way. */
	    if (s->status != SMTPS_SESS_ACTIVE || s->nfifo != 0
		|| s->draining != 0 || target < 0
		|| target == SMTPS_STATE_MAIL || target == SMTPS_STATE_RSET
		|| target == SMTPS_STATE_BODY || !made[target])
		break;
	    /* enter(), for a state whose per-state data exists already. */
	    st = &states[target];
	    before = s->out_produced;
	    s->cur = target;
	    s->no_lookahead = 0;
	    s->state_reason[0] = 0;
	    n = st->setup != NULL ? st->setup(s, st->closure) : 0;
	    if (n != 0 || s->status != SMTPS_SESS_ACTIVE || s->nfifo != 0
		|| s->draining != 0) {
		in_flight(s, target, n, before);	/* enter()'s own end */
		goto next_head;
	    }
	    /*
	     * Awaiting nothing: in flight alone, so refresh_deadline() would
	     * set the target's deadline, and run() would pop it straight away.
	     */
	    t = timeout[target];
	    s->deadline = t > 0 ? s->now + t : -1;
	    id = target;
	}
	act_on(s, id, act, NULL);
next_head:;
    }
}

/* on_reply - route one complete reply */

static void on_reply(struct smtps_session *s, const struct smtps_reply *r)
{
    struct smtps_inflight *e;
    char    why[SMTPS_REASON_MAX];
    int     act, id, i, left;

    /* Replies come in order: the first one owed is the earlier final dot's. */
    if (s->prev_open) {
	finish_prev(s, r);
	return;
    }
    if (s->draining > 0) {
	s->draining--;

	/*
	 * A 354 or 334 asks for data or a SASL line. Only when it answers
	 * our last command may the server get one (a lone dot, "*"): with
	 * more of our pipelined commands on the wire behind it, the server
	 * reads those as the data or the SASL line, and our dot would end
	 * a message made of our own commands. End the connection instead.
	 */
	if ((r->code == 354 || r->code == 334) && s->draining > 0) {
	    snprintf(why, sizeof(why), "the server answered a pipelined "
		     "command with %d while more commands were on the wire",
		     r->code);
	    fail_conn(s, s->cur, r, SMTPS_STATUS_TEMPFAIL, why, 1);
	    return;
	}
	if (r->code == 354 && queue_bytes(s, ".\r\n", 3) == SMTPS_OK) {
	    smtps_session_trace(s, SMTPS_TRACE_SENT, ".", 1);
	    s->draining++;
	} else if (r->code == 334 && queue_bytes(s, "*\r\n", 3) == SMTPS_OK) {
	    smtps_session_trace(s, SMTPS_TRACE_SENT, "*", 1);
	    s->draining++;
	}
	if (r->code == 421) {
	    fail_conn(s, s->cur, r, SMTPS_STATUS_TEMPFAIL, NULL, 1);
	    return;
	}
	if (s->draining == 0) {
	    id = s->pending;
	    s->pending = -1;
	    transition(s, id);
	} else
	    refresh_deadline(s);
	return;
    }
    if (s->nfifo == 0) {
	fail_conn(s, s->cur, r, SMTPS_STATUS_TEMPFAIL, r->code == 421 ? NULL :
		  "the server sent a reply nobody asked for", 1);
	return;
    }
    e = &s->fifo[0];

    /*
     * The server answered a command it cannot have read yet: it sent a
     * reply ahead, or two to one command. Every later reply would be
     * paired with the wrong command, so nothing it says can be trusted
     * (BODY checks its own end: the reply must follow the final dot).
     */
    if (e->handled == 0 && e->state != SMTPS_STATE_BODY
	&& s->out_consumed < e->first_end) {
	set_reason(s->reason, "the server replied to %s before it was sent "
		   "(a reply ahead of its command)", state_of(s, e->state)->name,
		   NULL);
	fail_conn(s, e->state, r, SMTPS_STATUS_TEMPFAIL, NULL, 1);
	return;
    }
    s->reply_index = (size_t) e->handled;
    act = call_callback(s, e->state, r);
    e = &s->fifo[0];
    e->handled++;
    if (r->code == 421)				/* RFC 5321 3.8: it is closing */
	act = SMTPS_ACT_FAIL_CONN;
    if (e->handled < e->awaiting && (act == SMTPS_ACT_NEXT
				     || act == SMTPS_ACT_JUMP
				     || act == SMTPS_ACT_RETRY)) {
	refresh_deadline(s);
	return;
    }
    id = e->state;
    left = e->awaiting - e->handled;
    for (i = 1; i < s->nfifo; i++)
	s->fifo[i - 1] = s->fifo[i];
    s->nfifo--;
    s->draining += left;
    act_on(s, id, act, r);
    if (s->status == SMTPS_SESS_ACTIVE)
	refresh_deadline(s);
}

/* act_on - carry out what state id's callback decided */

static void act_on(struct smtps_session *s, int id, int act,
		           const struct smtps_reply *reply)
{
    const char *why;
    int     status;

    switch (act) {
    case SMTPS_ACT_NEXT:
	go(s, s->forced_next >= 0 ? s->forced_next : default_next(s, id));
	return;
    case SMTPS_ACT_JUMP:
	if (s->forced_next >= 0) {
	    go(s, s->forced_next);
	    return;
	}
	set_reason(s->state_reason,
		   "state %s returned JUMP without smtp_next_state()",
		   state_of(s, id)->name, NULL);
	act = SMTPS_ACT_ERROR;
	break;
    case SMTPS_ACT_RETRY:
	go(s, id);
	return;
    case SMTPS_ACT_TEMPFAIL_TX:
    case SMTPS_ACT_PERMFAIL_TX:
    case SMTPS_ACT_FAIL_CONN:
	break;
    default:
	act = SMTPS_ACT_ERROR;
	break;
    }
    if (act == SMTPS_ACT_ERROR && s->state_reason[0] == 0)
	set_reason(s->state_reason, "state %s failed", state_of(s, id)->name,
		   NULL);
    why = s->state_reason[0] ? s->state_reason : NULL;
    if (act == SMTPS_ACT_TEMPFAIL_TX)
	status = SMTPS_STATUS_TEMPFAIL;
    else if (act == SMTPS_ACT_FAIL_CONN)
	status = reply && reply->code >= 500 ? SMTPS_STATUS_PERMFAIL :
	    SMTPS_STATUS_TEMPFAIL;
    else
	status = SMTPS_STATUS_PERMFAIL;

    /* A failure with no transaction open can only end the connection. */
    if (act == SMTPS_ACT_FAIL_CONN || s->tx == NULL) {
	fail_conn(s, id, reply, status, why, 0);
	return;
    }
    smtps_session_decide(s, status, id, reply, why);

    /*
     * After the 354 and before the final dot, the server takes every
     * line as message text: RSET or QUIT now would become part of the
     * message, and a dot would deliver it cut short. Only closing the
     * connection makes the server discard it.
     */
    if (in_message_data(s)) {
	fail_conn(s, id, reply, status, why != NULL ? why :
		  "the transaction failed inside the message data", 1);
	return;
    }
    /* Refused before a command went out (SIZE, 8BITMIME...): nothing to reset. */
    if (!s->tx_final_replied && s->out_produced > s->tx_out_start)
	s->need_reset = 1;
    go(s, SMTPS_STATE_RSET);
}

/* smtps_session_decide - settle the current message's status once */

void    smtps_session_decide(struct smtps_session *s, int status, int id,
			             const struct smtps_reply *reply,
			             const char *why)
{
    struct smtps_result *r = s->txres;

    if (r == NULL)
	return;
    if (!s->tx_decided) {
	s->tx_decided = 1;
	r->status = status;
	smtps_result_set_reply(&r->reply, reply);
	set_stage(s, r, id, reply != NULL || status == SMTPS_STATUS_UNKNOWN
		  || awaiting_reply(s, id));
    }
    /* Keep the first reason: it is the cause, later ones are effects. */
    if (why != NULL && r->reason[0] == 0)
	(void) smtps_result_set_reason(r, why);
}

/* set_stage - the stage of state id, from its tostage/tostring */

static void set_stage(struct smtps_session *s, struct smtps_result *r, int id,
		              int awaiting)
{
    const smtp_state *st;
    const char *name = NULL;

    r->state = id;
    if (id < 0) {
	r->stage = SMTPS_STAGE_NOT_CONNECTED;
    } else {
	st = state_of(s, id);
	r->stage = st->tostage ? st->tostage(s, awaiting, st->closure) :
	    SMTPS_STAGE_UNKNOWN;
	if (st->tostring != NULL)
	    name = st->tostring(r->stage, st->closure);
    }
    if (name == NULL)
	name = smtps_stage_name(r->stage);
    snprintf(r->stage_name, sizeof(r->stage_name), "%s", name);
}

/* fail_conn - the connection cannot go on: settle everything, then end */

static void fail_conn(struct smtps_session *s, int id,
		              const struct smtps_reply *reply, int status,
		              const char *why, int close_now)
{
    char    text[SMTPS_REASON_MAX];
    /*
     * A refusal before any transaction (554 greeting, HELO refused) is the
     * server's word on every message; after one, the queue was simply
     * never tried on this connection.
     */
    int     queue_status = s->transactions > 0 ? SMTPS_STATUS_TEMPFAIL : status;

    if (why != NULL && s->reason[0] == 0)
	snprintf(s->reason, sizeof(s->reason), "%s", why);
    if (s->reason[0] == 0 && reply != NULL)
	snprintf(s->reason, sizeof(s->reason), "server said %d %.400s",
		 reply->code, reply->text);
    s->conn_failed = 1;
    if (s->prev_open) {
	if (id == SMTPS_STATE_BODY)
	    id = live_head(s);			/* BODY was the earlier one's */
	tx_swap(s);
	s->prev_open = 0;
	close_now |= fail_tx(s, SMTPS_STATE_BODY, reply, status);
	tx_swap(s);
    }
    if (s->tx != NULL)
	close_now |= fail_tx(s, id, reply, status);
    snprintf(text, sizeof(text), "not attempted: %.480s", s->reason);
    fail_queue(s, id, reply != NULL || awaiting_reply(s, id), queue_status, text);

    /*
     * After a 421, a broken reply stream or a timeout, nothing the server
     * says can be trusted to match our commands: close without QUIT. The
     * same once TLS has begun but is not up: the stream is neither clear
     * text nor usable TLS, and QUIT must never go out in clear then.
     */
    if (close_now || (reply != NULL && reply->code == 421)
	|| id == SMTPS_STATE_QUIT || smtps_tls_handshaking(s)) {
	s->nfifo = 0;
	s->draining = 0;
	s->pending = -1;
	s->status = SMTPS_SESS_CLOSING;
	s->deadline = -1;
	return;
    }
    go(s, SMTPS_STATE_QUIT);
}

/* fail_tx - the transaction ends with its connection; 1: close at once */

static int fail_tx(struct smtps_session *s, int id,
		           const struct smtps_reply *reply, int status)
{
    char    text[SMTPS_REASON_MAX];
    int     close_now = 0;

    if (!s->tx_decided && dot_sent(s) && !s->tx_final_replied) {
	snprintf(text, sizeof(text), "connection failed after the final "
		 "dot, before its reply: %.400s", s->reason);
	smtps_session_decide(s, SMTPS_STATUS_UNKNOWN, id, NULL, text);
    }

    /*
     * Mid-body, any further command would be read as message data, and
     * the rest of the body still queued ends in the final dot: sent now,
     * it would deliver a message we report as failed. Nothing more of it
     * may leave.
     */
    if (in_message_data(s)) {
	close_now = 1;
	drop_output(s);
    }
    smtps_session_decide(s, status, id, reply, s->reason);
    emit_tx(s);
    return close_now;
}

/* fail_queue - every queued message gets its result now */

static void fail_queue(struct smtps_session *s, int id, int awaiting,
		               int status, const char *why)
{
    struct smtps_message *m;
    struct smtps_result *r;

    while ((m = s->queue) != NULL) {
	s->queue = m->qnext;
	s->nqueued--;
	r = (struct smtps_result *) m->qresult;
	r->status = status;
	set_stage(s, r, -1, 0);
	/* The connection part (STARTTLS, the handshake, AUTH) failed them. */
	if (s->fail_stage >= 0 && s->transactions == 0) {
	    r->state = s->fail_state;
	    r->stage = s->fail_stage;
	    snprintf(r->stage_name, sizeof(r->stage_name), "%s",
		     smtps_stage_name(s->fail_stage));
	} else if (id >= 0 && s->transactions == 0) {
	    /* Before any transaction (the banner, EHLO, a state of the
	     * connection part): where the connection failed them. */
	    set_stage(s, r, id, awaiting);
	}
	(void) smtps_result_set_reason(r, why);
	push_result(s, r);
	smtps_message_free(m);
    }
    s->queue_tail = NULL;
}

/* start_tx - the next queued message becomes the transaction */

static void start_tx(struct smtps_session *s)
{
    struct smtps_message *m = s->queue;

    s->queue = m->qnext;
    if (s->queue == NULL)
	s->queue_tail = NULL;
    s->nqueued--;
    m->qnext = NULL;
    s->tx = m;
    s->txres = (struct smtps_result *) m->qresult;
    m->qresult = NULL;
    s->tx_decided = 0;
    s->tx_final_replied = 0;
    s->tx_out_start = s->out_produced;
    s->transactions++;
    s->body_started = 0;
    s->data_sent = 0;
    s->data_mode = 0;
    s->rcpt_next = 0;
    s->rcpt_replied = 0;
    s->rcpt_accepted = 0;
    s->rcpt_index = -1;
    s->body_active = 0;
    s->body_off = 0;
    s->body_end = 0;
}

/* emit_tx - hand out the transaction's result and forget the message */

static void emit_tx(struct smtps_session *s)
{
    struct smtps_result *r = s->txres;
    size_t  i;

    if (!s->tx_decided)
	smtps_session_decide(s, SMTPS_STATUS_PERMFAIL, s->cur, NULL,
			     "transaction ended before the message was sent");
    for (i = 0; i < r->nrcpt; i++) {
	if (r->rcpt[i].status != SMTPS_RCPT_ACCEPTED)
	    continue;
	/* Accepted at RCPT: the message's fate is theirs, once data went. */
	if (r->status == SMTPS_STATUS_DELIVERED || s->data_sent)
	    r->rcpt[i].status = r->status;
    }
    push_result(s, r);
    smtps_message_free(s->tx);
    s->tx = NULL;
    s->txres = NULL;
    s->body_active = 0;
}

/* push_result - append to the results the driver collects */

static void push_result(struct smtps_session *s, struct smtps_result *r)
{
    smtps_bounce_classify_result(r);		/* final now: give it its class */
    r->next = NULL;
    if (s->results_tail != NULL)
	s->results_tail->next = r;
    else
	s->results = r;
    s->results_tail = r;
}

/*
 * Running ahead across transactions (RFC 2920 3.1: message content may
 * begin a group). Once a message's final dot is queued and nothing else
 * is in flight, the next message's MAIL, RCPT and DATA are queued behind
 * it, so both leave in one write and the server's replies to the dot
 * and to the new commands come back together: one write and one read
 * per message instead of two of each. The earlier transaction is
 * swapped out into s->prev with its BODY entry left at the head of the
 * FIFO; the first reply to arrive is its final reply (finish_prev()).
 * Only drivers that ask for it (the engine) get this, and only when the
 * order goes from BODY straight to RSET: no state of the caller's sits
 * between one message's end and the next one's MAIL.
 */

/* tx_swap - exchange the live transaction with the one run past */

static void tx_swap(struct smtps_session *s)
{
    struct smtps_txsave t = s->prev;

#define SWAP(f) do { s->prev.f = s->f; s->f = t.f; } while (0)
    SWAP(tx);
    SWAP(txres);
    SWAP(tx_decided);
    SWAP(tx_final_replied);
    SWAP(data_sent);
    SWAP(data_mode);
    SWAP(tx_out_start);
    SWAP(rcpt_next);
    SWAP(rcpt_replied);
    SWAP(rcpt_accepted);
    SWAP(rcpt_index);
    SWAP(body_active);
    SWAP(body_started);
    SWAP(body_chunking);
    SWAP(body_off);
    SWAP(body_end);
    SWAP(enc);
#undef SWAP
}

/* live_head - the live transaction's first state in flight (or cur) */

static int live_head(const struct smtps_session *s)
{
    int     k = s->prev_open;

    return s->nfifo > k ? s->fifo[k].state : s->cur;
}

/* maybe_run_ahead - start the next transaction behind this final dot */

static void maybe_run_ahead(struct smtps_session *s)
{
    struct smtps_message *m;

    if (!s->tx_runahead || !s->pipelining || s->prev_open
	|| s->status != SMTPS_SESS_ACTIVE || s->draining > 0
	|| s->tx == NULL || s->tx_decided || s->body_active
	|| s->body_end == 0 || s->nfifo != 1
	|| s->fifo[0].state != SMTPS_STATE_BODY || s->need_reset
	|| s->conn_failed || s->quit_requested
	|| default_next(s, SMTPS_STATE_BODY) != SMTPS_STATE_RSET)
	return;
    if (s->queue == NULL) {
	if (s->feeder == NULL
	    || (m = s->feeder(s, s->feeder_closure)) == NULL)
	    return;
	enqueue(s, m);
    }
    tx_swap(s);					/* into s->prev: it awaits */
    s->prev_open = 1;
    start_tx(s);
    enter(s, SMTPS_STATE_MAIL);
}

/* finish_prev - the final reply of the transaction run past */

static void finish_prev(struct smtps_session *s, const struct smtps_reply *r)
{
    const char *why;
    int     act, i, cur = s->cur, failed = 0;

    for (i = 1; i < s->nfifo; i++)
	s->fifo[i - 1] = s->fifo[i];
    s->nfifo--;
    s->prev_open = 0;
    tx_swap(s);
    s->state_reason[0] = 0;
    s->reply_index = 0;
    act = call_callback(s, SMTPS_STATE_BODY, r);
    if (r->code == 421)				/* RFC 5321 3.8: it is closing */
	act = SMTPS_ACT_FAIL_CONN;
    why = s->state_reason[0] ? s->state_reason : NULL;
    if (act == SMTPS_ACT_TEMPFAIL_TX || act == SMTPS_ACT_PERMFAIL_TX)
	smtps_session_decide(s, act == SMTPS_ACT_TEMPFAIL_TX ?
			     SMTPS_STATUS_TEMPFAIL : SMTPS_STATUS_PERMFAIL,
			     SMTPS_STATE_BODY, r, why);
    else if (act != SMTPS_ACT_NEXT) {
	failed = 1;
	smtps_session_decide(s, r->code >= 500 ? SMTPS_STATUS_PERMFAIL :
			     SMTPS_STATUS_TEMPFAIL, SMTPS_STATE_BODY, r,
			     why != NULL ? why : "the end of data failed");
    }
    emit_tx(s);
    tx_swap(s);					/* s->prev is empty again */
    s->cur = cur;

    /*
     * The server broke off at the final dot: the commands behind it are
     * not to be trusted to a QUIT that drains them (a 354 would be
     * answered with a dot). Close; the live message was only begun.
     */
    if (failed) {
	fail_conn(s, live_head(s), r, SMTPS_STATUS_TEMPFAIL, why, 1);
	return;
    }
    refresh_deadline(s);
}

/* dot_sent - the driver has taken the final dot (or last BDAT byte) */

static int dot_sent(const struct smtps_session *s)
{
    return s->body_end > 0 && s->out_consumed >= s->body_end;
}

/* in_message_data - the server reads message text, not commands, now */

static int in_message_data(const struct smtps_session *s)
{
    return s->tx != NULL && (s->data_mode || s->body_started) && !dot_sent(s);
}

/* drop_output - send nothing more of what is queued, clear or encrypted */

static void drop_output(struct smtps_session *s)
{
    s->out.start = s->out.end = 0;
    s->body_active = 0;
    smtps_tls_discard(s);
}

/* awaiting_reply - state id is in flight with replies still owed */

static int awaiting_reply(const struct smtps_session *s, int id)
{
    int     i;

    for (i = 0; i < s->nfifo; i++)
	if (s->fifo[i].state == id && s->fifo[i].handled < s->fifo[i].awaiting)
	    return 1;
    return 0;
}

/* refresh_deadline - a new absolute deadline after progress */

static void refresh_deadline(struct smtps_session *s)
{
    int     id;
    int64_t t;

    if (s->nfifo == 0 && s->draining == 0) {
	s->deadline = -1;
	return;
    }
    id = s->nfifo > 0 ? s->fifo[0].state : s->cur;
    t = id >= 0 ? s->timeout[id] : SMTPS_TIMEOUT_OTHER;
    /*
     * While the body is being written, each block must go within the
     * data-block timeout (RFC 5321 4.5.3.2.5), or sooner when the caller
     * asked for a shorter deadline for this state.
     */
    if (s->nfifo > 0 && s->fifo[0].state == SMTPS_STATE_BODY
	&& !(s->prev_open ? s->out_consumed >= s->prev.body_end : dot_sent(s)))
	t = t > 0 && t < SMTPS_TIMEOUT_BLOCK ? t : SMTPS_TIMEOUT_BLOCK;
    s->deadline = t > 0 ? s->now + t : -1;
}

/* buf_reserve - room for need more bytes, within SMTPS_OUT_MAX */

static int buf_reserve(struct smtps_buf *b, size_t need)
{
    size_t  used = b->end - b->start, cap;
    char   *p;

    if (b->cap - b->end >= need)
	return SMTPS_OK;
    if (used + need > SMTPS_OUT_MAX)
	return SMTPS_ETOOBIG;
    if (b->start > 0) {				/* slide down before growing */
	memmove(b->data, b->data + b->start, used);
	b->start = 0;
	b->end = used;
	if (b->cap - b->end >= need)
	    return SMTPS_OK;
    }
    cap = b->cap ? b->cap : 1024;
    while (cap - used < need)
	cap *= 2;
    if ((p = realloc(b->data, cap)) == NULL)
	return SMTPS_ENOMEM;
    b->data = p;
    b->cap = cap;
    return SMTPS_OK;
}

/* smtps_buf_reserve - buf_reserve for tls.c's ciphertext buffer */

int     smtps_buf_reserve(struct smtps_buf *b, size_t need)
{
    return buf_reserve(b, need);
}

/* queue_bytes - append bytes to the output */

static int queue_bytes(struct smtps_session *s, const char *data, size_t len)
{
    int     rc;

    if ((rc = buf_reserve(&s->out, len)) != SMTPS_OK)
	return rc;
    memcpy(s->out.data + s->out.end, data, len);
    s->out.end += len;
    s->out_produced += len;
    return SMTPS_OK;
}

/* smtps_session_queue_raw - queue bytes as they are (AUTH responses) */

int     smtps_session_queue_raw(struct smtps_session *s, const char *data,
				        size_t len)
{
    static const char redacted[] = "[credentials redacted]";
    char    line[64];
    size_t  n, words;
    int     rc;

    if (s->status != SMTPS_SESS_ACTIVE)
	return SMTPS_ESTATE;
    if ((rc = queue_bytes(s, data, len)) != SMTPS_OK || s->trace == NULL)
	return rc;

    /*
     * Only AUTH sends raw bytes, and what it sends is credentials: the
     * transcript gets the command and mechanism ("AUTH PLAIN"), never
     * what follows them.
     */
    for (n = 0, words = 0; n < len && n < 32 && data[n] != '\r'; n++)
	if (data[n] == ' ' && ++words == 2)
	    break;
    if (len >= 5 && strncmp(data, "AUTH ", 5) == 0) {
	snprintf(line, sizeof(line), "%.*s%s%s", (int) n, data,
		 n < len && data[n] == ' ' ? " " : "",
		 n < len && data[n] == ' ' ? redacted : "");
	smtps_session_trace(s, SMTPS_TRACE_SENT, line, strlen(line));
    } else
	smtps_session_trace(s, SMTPS_TRACE_SENT, redacted, sizeof(redacted) - 1);
    return SMTPS_OK;
}

/* smtps_session_trace - hand the transcript function one event */

void    smtps_session_trace(struct smtps_session *s, int kind,
			            const char *data, size_t len)
{
    if (s->trace != NULL)
	s->trace(s, kind, data, len, s->trace_closure);
}

/* trace_reply - one trace event per line of a reply, as the server wrote it */

static void trace_reply(struct smtps_session *s, const struct smtps_reply *r)
{
    char    line[SMTPS_REPLY_LINE_MAX + 8];
    const char *p = r->text, *end = r->text + r->text_len, *nl;
    int     n;

    for (;;) {
	nl = memchr(p, '\n', (size_t) (end - p));
	n = snprintf(line, sizeof(line), "%03d%c%.*s", r->code,
		     nl != NULL ? '-' : ' ', (int) ((nl ? nl : end) - p), p);
	if (n > (int) sizeof(line) - 1)
	    n = (int) sizeof(line) - 1;
	smtps_session_trace(s, SMTPS_TRACE_RECEIVED, line, (size_t) n);
	if (nl == NULL)
	    break;
	p = nl + 1;
    }
}

/* smtps_session_set_trace - the driver's transcript function (NULL: none) */

int     smtps_session_set_trace(struct smtps_session *s, SMTPSTrace fn,
				        void *closure)
{
    if (s == NULL)
	return SMTPS_EINVAL;
    s->trace = fn;
    s->trace_closure = fn != NULL ? closure : NULL;
    return SMTPS_OK;
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
    fail_conn(s, s->cur, NULL, SMTPS_STATUS_TEMPFAIL, why, 1);
}

/* settle - before a call returns: encrypt what the states queued */

static void settle(struct smtps_session *s)
{
    if (smtps_tls_engaged(s))
	(void) smtps_tls_flush(s);
}

/* smtps_session_send_line - queue one command line; CRLF is added */

int     smtps_session_send_line(struct smtps_session *s, const char *line,
				        size_t len)
{
    size_t  i;
    int     rc;

    if (s == NULL || line == NULL || len == 0 || len + 2 > SMTPS_LINE_MAX)
	return s && line && len ? SMTPS_ETOOBIG : SMTPS_EINVAL;
    if (s->status != SMTPS_SESS_ACTIVE)
	return SMTPS_ESTATE;
    if (in_message_data(s))
	return SMTPS_ESTATE;		/* it would become message text */
    for (i = 0; i < len; i++)
	if ((unsigned char) line[i] < 0x20 || line[i] == 0x7f)
	    return SMTPS_EINVAL;		/* no injected commands */
    if ((rc = buf_reserve(&s->out, len + 2)) != SMTPS_OK)
	return rc;
    memcpy(s->out.data + s->out.end, line, len);
    memcpy(s->out.data + s->out.end + len, "\r\n", 2);
    s->out.end += len + 2;
    s->out_produced += len + 2;
    smtps_session_trace(s, SMTPS_TRACE_SENT, line, len);
    return SMTPS_OK;
}

/* smtps_session_start_body - begin streaming the message content */

void    smtps_session_start_body(struct smtps_session *s, int chunking)
{
    smtps_body_init(&s->enc, !chunking);
    s->body_chunking = chunking;
    s->body_off = 0;
    s->body_end = 0;
    s->body_active = 1;
    s->body_started = 1;
    s->data_sent = 1;
    /* The transcript shows the content as given, then the dot it ends with. */
    if (s->trace != NULL) {
	smtps_session_trace(s, SMTPS_TRACE_DATA, s->tx->body, s->tx->body_len);
	if (!chunking)
	    smtps_session_trace(s, SMTPS_TRACE_SENT, ".", 1);
    }
}

/* smtps_session_body_done - the driver has taken the whole body */

int     smtps_session_body_done(const struct smtps_session *s)
{
    return dot_sent(s);
}

/* smtps_session_pump_body - queue body bytes up to the high-water mark */

int     smtps_session_pump_body(struct smtps_session *s)
{
    struct smtps_message *m = s->tx;
    size_t  used, n, room;
    int     rc;

    while (s->body_active && s->out.end - s->out.start < SMTPS_OUT_HIGH) {
	if ((rc = buf_reserve(&s->out, 16384)) != SMTPS_OK)
	    return rc;
	room = s->out.cap - s->out.end;
	if (room > 16384)
	    room = 16384;
	if (s->body_off < m->body_len) {
	    n = smtps_body_encode(&s->enc, m->body + s->body_off,
				  m->body_len - s->body_off, &used,
				  s->out.data + s->out.end, room);
	    s->body_off += used;
	} else {
	    n = smtps_body_finish(&s->enc, s->out.data + s->out.end, room,
				  !s->body_chunking);
	    s->body_active = 0;
	}
	s->out.end += n;
	s->out_produced += n;
	if (!s->body_active)
	    s->body_end = s->out_produced;
    }
    return SMTPS_OK;
}

/* smtps_session_start - the connection is up: enter the first state */

int     smtps_session_start(struct smtps_session *s, int64_t now)
{
    if (s == NULL)
	return SMTPS_EINVAL;
    if (s->status != SMTPS_SESS_NEW || s->in_dispatch)
	return SMTPS_ESTATE;
    s->now = now;
    s->status = SMTPS_SESS_ACTIVE;
    s->in_dispatch = 1;
    transition(s, s->order->head);
    run(s);

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
    s->now = now;
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
	    set_reason(s->reason, "malformed reply from the server: %s",
		       smtps_strerror(rc), NULL);
	    fail_conn(s, s->cur, NULL, SMTPS_STATUS_TEMPFAIL, NULL, 1);
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
	    trace_reply(s, &reply);
	on_reply(s, &reply);
	run(s);

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

/* smtps_session_output - bytes waiting to be sent */

size_t  smtps_session_output(struct smtps_session *s, const char **data)
{
    if (s == NULL || data == NULL)
	return 0;
    if (smtps_tls_engaged(s))
	return smtps_tls_output(s, data);	/* ciphertext */
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
    int     was_sent, was_active;

    if (s == NULL)
	return;
    was_sent = dot_sent(s);
    was_active = s->body_active;
    s->now = now;
    if (smtps_tls_engaged(s)) {
	/* n is ciphertext; this is the plaintext it finished carrying. */
	n = smtps_tls_consume(s, n);
    } else {
	if (n > s->out.end - s->out.start)
	    n = s->out.end - s->out.start;
	s->out.start += n;
	if (s->out.start == s->out.end)
	    s->out.start = s->out.end = 0;
    }
    s->out_consumed += n;
    if (s->body_active && smtps_session_pump_body(s) != SMTPS_OK) {
	set_reason(s->reason, "cannot queue the message body", NULL, NULL);
	fail_conn(s, s->cur, NULL, SMTPS_STATUS_TEMPFAIL, NULL, 1);
	return;
    }
    /* A long body has just been queued to its end: the next may follow. */
    if (was_active && !s->body_active && !s->in_dispatch) {
	s->in_dispatch = 1;
	maybe_run_ahead(s);
	s->in_dispatch = 0;
    }
    settle(s);
    /* Writing the body is progress; its last byte starts the final wait. */
    if (n > 0 && s->nfifo > 0 && s->fifo[0].state == SMTPS_STATE_BODY
	&& (!was_sent || !dot_sent(s)))
	refresh_deadline(s);
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
    s->now = now;
    if (s->deadline < 0 || now < s->deadline
	|| (s->status != SMTPS_SESS_ACTIVE && s->status != SMTPS_SESS_IDLE))
	return SMTPS_OK;
    id = s->nfifo > 0 ? s->fifo[0].state : s->cur;
    if (smtps_tls_handshaking(s))
	snprintf(why, sizeof(why), "timeout: the TLS handshake did not "
		 "complete");
    else
	snprintf(why, sizeof(why), "timeout: no reply in state %s",
		 id >= 0 ? state_of(s, id)->name : "none");
    s->in_dispatch = 1;
    fail_conn(s, id, NULL, SMTPS_STATUS_TEMPFAIL, why, 1);
    s->in_dispatch = 0;
    return SMTPS_OK;
}

/* smtps_session_closed - the connection is gone (EOF, error, closed) */

void    smtps_session_closed(struct smtps_session *s, const char *why,
			             int64_t now)
{
    int     id;

    if (s == NULL || s->status == SMTPS_SESS_CLOSED)
	return;
    s->now = now;
    if (s->reason[0] == 0 && s->status != SMTPS_SESS_CLOSING)
	snprintf(s->reason, sizeof(s->reason), "connection lost%s: %s",
		 smtps_tls_handshaking(s) ? " during the TLS handshake" : "",
		 why ? why : "closed");
    id = live_head(s);
    if (s->prev_open) {
	tx_swap(s);
	s->prev_open = 0;
	lost_tx(s, SMTPS_STATE_BODY);
	tx_swap(s);
    }
    if (s->tx != NULL)
	lost_tx(s, id);
    fail_queue(s, id, id >= 0 && awaiting_reply(s, id), SMTPS_STATUS_TEMPFAIL,
	       s->reason[0] ? s->reason : "connection closed");
    s->nfifo = 0;
    s->draining = 0;
    s->deadline = -1;
    s->status = SMTPS_SESS_CLOSED;
}

/* lost_tx - the connection is gone under the transaction */

static void lost_tx(struct smtps_session *s, int id)
{
    char    text[SMTPS_REASON_MAX];
    int     status;

    status = dot_sent(s) && !s->tx_final_replied ?
	SMTPS_STATUS_UNKNOWN : SMTPS_STATUS_TEMPFAIL;
    snprintf(text, sizeof(text), status == SMTPS_STATUS_UNKNOWN ?
	     "connection lost after the final dot, before its reply: %s" :
	     "%s", s->reason[0] ? s->reason : "connection closed");
    smtps_session_decide(s, status, id, NULL, text);
    emit_tx(s);
}

/* smtps_session_status - where the session is (enum smtps_session_status) */

int     smtps_session_status(const struct smtps_session *s)
{
    return s ? s->status : SMTPS_EINVAL;
}

/* smtps_session_submit - queue a message; the session owns it on success */

int     smtps_session_submit(struct smtps_session *s, struct smtps_message *msg,
			             uint64_t tag)
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
    if ((rc = smtps_session_submit_prepared(s, msg)) != SMTPS_OK) {
	msg->qresult = NULL;
	smtps_result_free(r);
    }
    return rc;
}

/* smtps_session_submit_prepared - queue a message that carries its result */

int     smtps_session_submit_prepared(struct smtps_session *s,
				              struct smtps_message *msg)
{
    if (msg->qnext != NULL || msg->qresult == NULL)
	return SMTPS_EINVAL;
    if (s->in_dispatch)
	return SMTPS_ESTATE;
    if (s->status == SMTPS_SESS_CLOSED || s->status == SMTPS_SESS_CLOSING
	|| s->conn_failed || s->quit_requested)
	return SMTPS_ECLOSED;
    enqueue(s, msg);
    if (s->status == SMTPS_SESS_IDLE) {
	s->status = SMTPS_SESS_ACTIVE;
	s->in_dispatch = 1;
	transition(s, SMTPS_STATE_MAIL);
	run(s);
	settle(s);
	s->in_dispatch = 0;
    }
    return SMTPS_OK;
}

/* enqueue - append a message that carries its result to the queue */

static void enqueue(struct smtps_session *s, struct smtps_message *m)
{
    m->qnext = NULL;
    if (s->queue_tail != NULL)
	s->queue_tail->qnext = m;
    else
	s->queue = m;
    s->queue_tail = m;
    s->nqueued++;
}

/* smtps_session_set_runahead - let transactions start before the last ends */

void    smtps_session_set_runahead(struct smtps_session *s, SMTPSFeeder fn,
				           void *closure)
{
    s->tx_runahead = 1;
    s->feeder = fn;
    s->feeder_closure = fn != NULL ? closure : NULL;
}

/* smtps_session_quit - end the connection once the queue is done */

int     smtps_session_quit(struct smtps_session *s)
{
    if (s == NULL)
	return SMTPS_EINVAL;
    if (s->in_dispatch)
	return SMTPS_ESTATE;
    s->quit_requested = 1;
    if (s->status == SMTPS_SESS_NEW) {
	fail_queue(s, -1, 0, SMTPS_STATUS_TEMPFAIL, "quit before connecting");
	s->status = SMTPS_SESS_CLOSED;
    } else if (s->status == SMTPS_SESS_IDLE) {
	s->status = SMTPS_SESS_ACTIVE;
	s->in_dispatch = 1;
	transition(s, SMTPS_STATE_MAIL);
	run(s);
	settle(s);
	s->in_dispatch = 0;
    }
    return SMTPS_OK;
}

/* smtps_session_pending - messages submitted that have no result yet */

size_t  smtps_session_pending(const struct smtps_session *s)
{
    return s ? s->nqueued + (s->tx != NULL) + (size_t) s->prev_open : 0;
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

/* smtp_next_state - Momentum: choose the state entered next */

void    smtp_next_state(struct smtps_session *session, smtp_state *state)
{
    if (session == NULL)
	return;
    if (state == NULL)
	session->forced_next = -1;
    else if (state->id >= 0 && state->id < session->order->count)
	session->forced_next = state->id;
}

/* smtps_session_caps - what the server's EHLO offered */

const struct smtps_caps *smtps_session_caps(const struct smtps_session *s)
{
    return s ? &s->caps : NULL;
}

/* smtps_session_pipelining - 1 when RFC 2920 pipelining is in use */

int     smtps_session_pipelining(const struct smtps_session *s)
{
    return s ? s->pipelining : 0;
}

/* smtps_session_message - the message in its transaction, or NULL */

const struct smtps_message *smtps_session_message(const struct smtps_session *s)
{
    return s ? s->tx : NULL;
}

/* smtps_session_user - the driver's pointer given at creation */

void   *smtps_session_user(const struct smtps_session *s)
{
    return s ? s->user : NULL;
}

/* smtps_session_set_user - replace the driver's pointer (NULL: detach) */

void    smtps_session_set_user(struct smtps_session *s, void *user)
{
    if (s != NULL)
	s->user = user;
}

/* smtps_session_set_addresses - the driver says where the connection runs */

int     smtps_session_set_addresses(struct smtps_session *s, const char *peer,
				            int peer_port, const char *local,
				            int local_port)
{
    size_t  pl, ll;

    if (s == NULL || peer == NULL || local == NULL
	|| (pl = strlen(peer)) > SMTPS_ADDRESS_TEXT_MAX
	|| (ll = strlen(local)) > SMTPS_ADDRESS_TEXT_MAX
	|| smtps_check_text(peer, pl, SMTPS_ADDRESS_TEXT_MAX, NULL) != SMTPS_OK
	|| smtps_check_text(local, ll, SMTPS_ADDRESS_TEXT_MAX, NULL) != SMTPS_OK
	|| peer_port < 0 || peer_port > 65535 || local_port < 0
	|| local_port > 65535)
	return SMTPS_EINVAL;
    memcpy(s->peer_host, peer, pl + 1);
    memcpy(s->local_host, local, ll + 1);
    s->peer_port = peer_port;
    s->local_port = local_port;
    return SMTPS_OK;
}

/* smtps_session_peer - the server's address, "" when unknown */

const char *smtps_session_peer(const struct smtps_session *s, int *port)
{
    if (port != NULL)
	*port = s ? s->peer_port : 0;
    return s ? s->peer_host : "";
}

/* smtps_session_local_address - our end of the connection, "" when unknown */

const char *smtps_session_local_address(const struct smtps_session *s,
					        int *port)
{
    if (port != NULL)
	*port = s ? s->local_port : 0;
    return s ? s->local_host : "";
}

/* smtps_session_local - per-session data of state_id */

void   *smtps_session_local(const struct smtps_session *s, int state_id)
{
    if (s == NULL || state_id < 0 || state_id >= s->order->count)
	return NULL;
    return s->local[state_id];
}

/* smtps_session_state - the state being run */

int     smtps_session_state(const struct smtps_session *s)
{
    return s ? s->cur : SMTPS_EINVAL;
}

/* smtps_session_reply_index - which of its awaited replies this is */

size_t  smtps_session_reply_index(const struct smtps_session *s)
{
    return s ? s->reply_index : 0;
}

/* smtps_session_set_reason - a state says why it fails */

int     smtps_session_set_reason(struct smtps_session *s, const char *text)
{
    if (s == NULL || text == NULL)
	return SMTPS_EINVAL;
    snprintf(s->state_reason, sizeof(s->state_reason), "%s", text);
    return SMTPS_OK;
}

/* smtps_session_reason - why the session failed or closed ("" if not) */

const char *smtps_session_reason(const struct smtps_session *s)
{
    return s ? s->reason : "";
}

/* smtps_session_rcpt_index - the recipient whose RCPT reply is at hand */

int     smtps_session_rcpt_index(const struct smtps_session *s)
{
    return s ? s->rcpt_index : -1;
}

/* smtps_session_set_rcpt_result - record recipient i's RCPT reply */

int     smtps_session_set_rcpt_result(struct smtps_session *s, size_t i,
				              const struct smtps_reply *reply)
{
    struct smtps_result_rcpt *rc;

    if (s == NULL || s->txres == NULL || i >= s->txres->nrcpt || reply == NULL)
	return SMTPS_EINVAL;
    rc = &s->txres->rcpt[i];
    smtps_result_set_reply(&rc->reply, reply);
    rc->status = reply->code < 300 ? SMTPS_RCPT_ACCEPTED :
	reply->code < 500 ? SMTPS_STATUS_TEMPFAIL : SMTPS_STATUS_PERMFAIL;
    return SMTPS_OK;
}

/* smtps_action_for_code - the usual action for a reply code */

int     smtps_action_for_code(int code)
{
    if (code == 421)
	return SMTPS_ACT_FAIL_CONN;
    if (code >= 200 && code < 400)
	return SMTPS_ACT_NEXT;
    return code >= 500 ? SMTPS_ACT_PERMFAIL_TX : SMTPS_ACT_TEMPFAIL_TX;
}
