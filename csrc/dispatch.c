/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	dispatch.c 3
 * SUMMARY
 *	the dispatch loop of a session: states, replies, pipelining, failures
 * SYNOPSIS
 *	#include "session_private.h"
 *
 *	void	smtps_dispatch_enter(s, id)
 *	void	smtps_dispatch_run(s)
 *	void	smtps_dispatch_reply(s, reply)
 *	void	smtps_dispatch_transition(s, target)
 *	void	smtps_dispatch_fail_conn(s, id, reply, status, why, close_now)
 *	void	smtps_dispatch_fail_queue(s, id, awaiting, status, why)
 *	void	smtps_dispatch_lost(s)
 *	void	smtps_dispatch_run_ahead(s)
 *	void	smtps_dispatch_refresh_deadline(s)
 * DESCRIPTION
 *	The loop. Entering a state runs its setup, which queues commands and
 *	says how many replies it awaits; the state then sits in the in-flight
 *	FIFO. Each complete reply goes to the callback of the state at the
 *	head of the FIFO; the action returned for its last reply picks the
 *	next state. A state awaiting no reply gets one callback with NULL.
 *	There is one way into a state, begin(): every entry, the tight path
 *	of smtps_dispatch_run() included, runs init_local_state (the first
 *	time) and setup through it.
 *
 *	Pipelining (RFC 2920). When the server offers it, a state marked
 *	SMTPS_STATE_PIPELINABLE whose default next state is pipelinable too
 *	lets that next state run its setup at once, before any reply: MAIL,
 *	RCPT and DATA leave in one write and their replies are matched to
 *	them in FIFO order. If a reply then sends the machine anywhere but to
 *	the state already in flight, every reply still owed is drained (read
 *	and dropped) before the new state is entered, so a reply is never
 *	paired with the wrong command. Draining answers a 334 with "*" and a
 *	354 with a lone dot, so the server is never left waiting; but a 354
 *	or 334 with more of our commands still owed a reply ends the
 *	connection, since the server would read those commands as its data,
 *	and so does a 354 once the server accepted a recipient since our
 *	last MAIL: the lone dot would deliver an empty message to it. Under
 *	LMTP every drained 354 ends the connection (drain_reply()).
 *
 *	Transactions. The part of the order from MAIL up to RSET runs once per
 *	message. Reaching MAIL without a transaction starts the next queued
 *	message, or leaves the session IDLE; reaching RSET ends the
 *	transaction and hands out its result. RSET itself sends a command
 *	only when a failed transaction is still open on the server.
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
 *	Running ahead across transactions (RFC 2920 3.1: message content
 *	may begin a group). Once a message's final dot is queued and nothing
 *	else is in flight, the next message's MAIL, RCPT and DATA are queued
 *	behind it, so both leave in one write: one write and one read per
 *	message instead of two of each. The earlier transaction becomes
 *	s->prev with its BODY entry left at the head of the FIFO, and the
 *	first reply to arrive is its final reply (finish_prev()). Only
 *	drivers that ask for it (the engine) get this, only when the order
 *	goes from BODY straight to RSET, and never under LMTP (see
 *	smtps_dispatch_run_ahead()).
 *
 *	States that never wait. A state awaiting no reply that keeps the
 *	machine among such states (RETRY, or two JUMPing to each other) gives
 *	the server nothing to answer and no deadline a reply could meet:
 *	past SMTPS_ZERO_REPLY_MAX entries in a row, or the state's own
 *	timeout on the real clock, the connection fails with a reason.
 *
 *	Deadlines are absolute: set when a command is issued, renewed only by
 *	progress (a complete reply, or the driver taking body output), never
 *	by a trickle of bytes. A deadline that passes closes the connection.
 *
 *	Failures. smtps_dispatch_fail_conn() is the one way a connection
 *	fails: it settles the transactions in hand (transaction.c), fails the
 *	queue ("not attempted: ..."), and ends with QUIT or, when nothing the
 *	server says can be trusted any more, at once. A state returning
 *	SMTPS_ACT_ABORT (or a setup returning SMTPS_EINTR) ends it at once
 *	and marks the session interrupted, so that the driver stops.
 * SEE ALSO
 *	session.c (the driver's calls), transaction.c (the statuses),
 *	states.c (the built-in states).
 *--*/

#include <stdio.h>
#include <string.h>

#include "session_private.h"

static inline int begin(struct smtps_session *s, int id);
static void in_flight(struct smtps_session *s, int id, int n,
		      uint64_t before);
static int call_callback(struct smtps_session *s, int id,
			 const struct smtps_reply *reply);
static int fast_target(const struct smtps_session *s, int id, int act);
static inline void zero_reset(struct smtps_session *s);
static int zero_reply_check(struct smtps_session *s, int id);
static void fifo_pop(struct smtps_session *s);
static void go(struct smtps_session *s, int target);
static void act_on(struct smtps_session *s, int id, int act,
		   const struct smtps_reply *reply);
static void interrupt(struct smtps_session *s, int id,
		      const struct smtps_reply *reply);
static void drain_reply(struct smtps_session *s, const struct smtps_reply *r);
static void describe_failure(struct smtps_session *s, struct smtps_result *r,
			             int id, int awaiting);
static void drain_add(struct smtps_session *s, int state, int n);
static int drain_owner(struct smtps_session *s);
static void finish_prev(struct smtps_session *s, const struct smtps_reply *r);
static int live_head(const struct smtps_session *s);
static void set_reason(char *dst, const char *fmt, const char *a,
		       const char *b);

/* set_reason - format a reason string, bounded */

static void set_reason(char *dst, const char *fmt, const char *a,
		               const char *b)
{
    snprintf(dst, SMTPS_REASON_MAX, fmt, a ? a : "", b ? b : "");
}

/* call_callback - hand one reply (or NULL) to the state's callback */

static int call_callback(struct smtps_session *s, int id,
			         const struct smtps_reply *reply)
{
    const smtp_state *st = &s->machine->states[id];

    s->forced_next = -1;
    s->cur = id;
    return st->callback(s, reply, st->closure);
}

/*
 * begin - the way into a state: its per-connection data the first time,
 * then its setup. Returns what setup returned: replies awaited, or an
 * SMTPS_E* code. Inline: the tight path of smtps_dispatch_run() enters
 * through it for every transition.
 */

__attribute__((always_inline))
static inline int begin(struct smtps_session *s, int id)
{
    const smtp_state *st = &s->machine->states[id];
    int     n = 0;

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
    return n;
}

/* smtps_dispatch_enter - run a state's setup and put it in flight */

void    smtps_dispatch_enter(struct smtps_session *s, int id)
{
    uint64_t before = s->out_produced;

    if (s->nfifo >= SMTPS_INFLIGHT_MAX) {
	/* Only a machine of more pipelinable states than we track. */
	smtps_dispatch_fail_conn(s, id, NULL, SMTPS_STATUS_TEMPFAIL,
				 "too many pipelined states in flight", 0);
	return;
    }
    in_flight(s, id, begin(s, id), before);
}

/*
 * in_flight - the rest of an entry, once setup returned n: act on its
 * failure, or put the state in the FIFO and maybe run ahead.
 */

static void in_flight(struct smtps_session *s, int id, int n, uint64_t before)
{
    const smtp_state *st = &s->machine->states[id];
    struct smtps_inflight *e;
    size_t  tail;
    const char *p, *nl;
    int     next;

    if (n < 0) {
	if (n == SMTPS_EINTR) {
	    interrupt(s, id, NULL);
	    return;
	}
	if (s->state_reason[0] == 0)
	    set_reason(s->state_reason, "state %s could not start: %s",
		       st->name, smtps_strerror(n));
	act_on(s, id, n == SMTPS_ETOOBIG || n == SMTPS_EINVAL ?
	       SMTPS_ACT_PERMFAIL_TX : SMTPS_ACT_TEMPFAIL_TX, NULL);
	return;
    }
    if (n > 0)
	zero_reset(s);				/* the server has something to answer */
    e = &s->fifo[s->nfifo++];
    e->state = id;
    e->awaiting = n;
    e->handled = 0;
    e->first_end = 0;
    /* What setup queued is the tail of the output: find its first line. */
    tail = (size_t) (s->out_produced - before);
    if (n > 0 && tail > 0 && tail <= s->out.end - s->out.start) {
	p = s->out.data + s->out.end - tail;
	nl = memchr(p, '\n', tail);
	e->first_end = before + (nl != NULL ? (size_t) (nl - p) + 1 : tail);
    }
    if (s->nfifo == 1)
	smtps_dispatch_refresh_deadline(s);

    /*
     * Run ahead (RFC 2920): the next state's commands join this write.
     * The next state must be the default one, since that is where this
     * state's success leads; go() drains it if the replies say otherwise.
     */
    if (n > 0 && s->pipelining && !s->no_lookahead
	&& (st->flags & SMTPS_STATE_PIPELINABLE)
	&& (next = s->order->next[id]) >= 0
	&& (s->machine->states[next].flags & SMTPS_STATE_PIPELINABLE)
	&& s->status == SMTPS_SESS_ACTIVE)
	smtps_dispatch_enter(s, next);
    else if (id == SMTPS_STATE_BODY)
	smtps_dispatch_run_ahead(s);
}

/* fifo_pop - the head of the FIFO is done */

static void fifo_pop(struct smtps_session *s)
{
    int     i;

    for (i = 1; i < s->nfifo; i++)
	s->fifo[i - 1] = s->fifo[i];
    s->nfifo--;
}

/*
 * fast_target - where act leads when nothing else is in the way: the
 * state to enter, or -2 when the action needs act_on()
 */

static int fast_target(const struct smtps_session *s, int id, int act)
{
    if (act == SMTPS_ACT_RETRY)
	return id;
    if (act == SMTPS_ACT_NEXT)
	return s->forced_next >= 0 ? s->forced_next : s->order->next[id];
    if (act == SMTPS_ACT_JUMP && s->forced_next >= 0)
	return s->forced_next;
    return -2;
}

/* zero_reset - a reply is awaited (or the session rests): a new run */

static inline void zero_reset(struct smtps_session *s)
{
    s->zero_run = 0;
    s->zero_check = SMTPS_ZERO_CLOCK_AFTER;
}

/*
 * zero_reply_check - the bound and the timeout of a run without replies,
 * when the run's count (smtps_dispatch_run()) reaches zero_check: 1 when
 * the connection was failed. The run is timed from its
 * SMTPS_ZERO_CLOCK_AFTER'th entry. Entries that
 * take time (a state that sleeps, or does I/O of its own) are looked at
 * one by one, so that a timeout is noticed at once; fast ones only every
 * SMTPS_ZERO_CLOCK_EVERY entries, so that the clock costs them nothing
 * that matters (they meet the count first anyway).
 */

__attribute__((noinline))
static int zero_reply_check(struct smtps_session *s, int id)
{
    char    why[SMTPS_REASON_MAX];
    const char *name = s->machine->states[id].name;
    int64_t now, t = s->timeout[id];
    unsigned next;

    if (s->zero_run > SMTPS_ZERO_REPLY_MAX) {
	snprintf(why, sizeof(why), "state %s was entered %u times in a row "
		 "without awaiting a reply: a loop of states that never wait "
		 "(RETRY or JUMP among them)", name, s->zero_run - 1);
	goto fail;
    }
    now = smtps_clock_ms();
    if (s->zero_run == SMTPS_ZERO_CLOCK_AFTER)
	s->zero_since = s->zero_last = now;
    if (t > 0 && now - s->zero_since >= t) {
	snprintf(why, sizeof(why), "timeout: state %s ran for %lld ms "
		 "without awaiting a reply", name,
		 (long long) (now - s->zero_since));
	goto fail;
    }
    next = s->zero_run + (now - s->zero_last >= 1 ? 1 : SMTPS_ZERO_CLOCK_EVERY);
    s->zero_check = next <= SMTPS_ZERO_REPLY_MAX ? next : SMTPS_ZERO_REPLY_MAX + 1;
    s->zero_last = now;
    return 0;

fail:
    zero_reset(s);
    smtps_dispatch_fail_conn(s, id, NULL, SMTPS_STATUS_TEMPFAIL, why, 0);
    return 1;
}

/*
 * smtps_dispatch_run - give the 0-reply states at the head of the FIFO
 * their callback
 *
 * The tight path. When a state awaiting no reply returns NEXT, RETRY or
 * JUMP (after smtp_next_state()) and nothing else is in flight or being
 * drained, act_on(), go() and the transition come down to entering the
 * target, unless the target is a transaction boundary (MAIL, RSET).
 * This loop then enters the target itself through begin(), and when its
 * setup awaits no reply either and left the session as it was, calls its
 * callback at once, without the FIFO push and pop and the checks that
 * cannot fail here (most of a transition's cost). Anything else (a
 * failure, a reply awaited, the end of the order, a setup or callback
 * that failed or closed the session) goes the general way, through
 * act_on() or in_flight(), with the same effects.
 */

void    smtps_dispatch_run(struct smtps_session *s)
{
    uint64_t before;
    unsigned run;
    int     act, id, target, n;

    while (s->status == SMTPS_SESS_ACTIVE && s->draining == 0
	   && s->nfifo > 0 && s->fifo[0].awaiting == 0) {
	id = s->fifo[0].state;
	fifo_pop(s);

	/*
	 * The count of entries without a reply (zero_reply_check()) lives
	 * in a register for the run: kept in the session, its increment
	 * and the next entry's read of it would chain every transition
	 * through memory. Nothing in the run changes it but the check; it
	 * goes back before anything else may.
	 */
	run = s->zero_run;
	for (;;) {
	    if (__builtin_expect(++run >= s->zero_check, 0)) {
		s->zero_run = run;
		if (zero_reply_check(s, id))
		    goto next_head;
	    }
	    s->reply_index = 0;
	    act = call_callback(s, id, NULL);
	    target = fast_target(s, id, act);
	    /* Anything go() or the transition do besides entering: general way. */
	    if (target < 0 || s->status != SMTPS_SESS_ACTIVE || s->nfifo != 0
		|| s->draining != 0 || target == SMTPS_STATE_MAIL
		|| target == SMTPS_STATE_RSET)
		break;
	    before = s->out_produced;
	    n = begin(s, target);
	    if (n != 0 || s->status != SMTPS_SESS_ACTIVE || s->nfifo != 0
		|| s->draining != 0) {
		s->zero_run = run;
		in_flight(s, target, n, before);
		goto next_head;
	    }
	    /*
	     * Awaiting nothing, so no deadline: whatever ends the run (a
	     * state that awaits a reply, IDLE, a failure, the end) sets the
	     * deadline it needs on the general path.
	     */
	    id = target;
	}
	s->zero_run = run;
	act_on(s, id, act, NULL);
next_head:;
    }
}

/* go - move to target once every reply still owed has been read */

static void go(struct smtps_session *s, int target)
{
    /* The earlier transaction's BODY, run past, keeps its reply. */
    int     i, keep = s->prev != NULL;

    if (s->nfifo > keep) {
	if (s->draining == 0 && s->fifo[keep].state == target)
	    return;				/* already in flight */
	for (i = keep; i < s->nfifo; i++)
	    drain_add(s, s->fifo[i].state,
		      s->fifo[i].awaiting - s->fifo[i].handled);
	s->nfifo = keep;
    }
    if (s->draining > 0) {
	s->pending = target;
	smtps_dispatch_refresh_deadline(s);
	return;
    }
    smtps_dispatch_transition(s, target);
}

/* smtps_dispatch_transition - enter target, minding transaction boundaries */

void    smtps_dispatch_transition(struct smtps_session *s, int target)
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
		smtps_dispatch_enter(s, SMTPS_STATE_RSET);
		return;
	    }
	    zero_reset(s);			/* a new message is progress */
	    smtps_tx_start(s);
	    smtps_dispatch_enter(s, SMTPS_STATE_MAIL);
	    return;
	}
	if (s->quit_requested) {
	    smtps_dispatch_enter(s, SMTPS_STATE_RSET);
	    return;
	}
	/* Ready for a message; an earlier final reply may still be owed. */
	s->status = SMTPS_SESS_IDLE;
	s->cur = SMTPS_STATE_MAIL;
	zero_reset(s);
	smtps_dispatch_refresh_deadline(s);
	return;
    }
    if (target == SMTPS_STATE_RSET && s->tx != NULL) {
	/* A state jumped out of the message data: only closing ends it. */
	if (smtps_tx_in_data(s, s->tx)) {
	    smtps_dispatch_fail_conn(s, s->cur, NULL, SMTPS_STATUS_TEMPFAIL,
				     "the transaction ended inside the message "
				     "data", 1);
	    return;
	}
	/* Left before its final reply: the server's transaction is open. */
	if (!s->tx->final_replied && s->out_produced > s->tx->out_start)
	    s->need_reset = 1;
	smtps_tx_finish(s, s->tx);
    }
    smtps_dispatch_enter(s, target);
}

/* smtps_dispatch_reply - route one complete reply */

void    smtps_dispatch_reply(struct smtps_session *s, const struct smtps_reply *r)
{
    struct smtps_inflight *e;
    int     act, id, left;

    zero_reset(s);
    /* Replies come in order: the first one owed is the earlier final dot's. */
    if (s->prev != NULL) {
	finish_prev(s, r);
	return;
    }
    if (s->draining > 0) {
	drain_reply(s, r);
	return;
    }
    if (s->nfifo == 0) {
	smtps_dispatch_fail_conn(s, s->cur, r, SMTPS_STATUS_TEMPFAIL,
				 r->code == 421 ? NULL :
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
		   "(a reply ahead of its command)",
		   s->machine->states[e->state].name, NULL);
	smtps_dispatch_fail_conn(s, e->state, r, SMTPS_STATUS_TEMPFAIL, NULL, 1);
	return;
    }
    s->reply_index = (size_t) e->handled;
    act = call_callback(s, e->state, r);
    e = &s->fifo[0];
    e->handled++;
    /*
     * The caller withdrew the live message (cancel.c) while none of its
     * data had gone out: it fails here, as if this state had said so, and
     * RSET clears it on the server. Settled first, without this reply, so
     * that its result says why rather than quoting a 250.
     */
    if (s->tx != NULL && s->tx->cancelled && !s->tx->data_sent
	&& s->tx->outcome == 0 && (act == SMTPS_ACT_NEXT
				   || act == SMTPS_ACT_JUMP
				   || act == SMTPS_ACT_RETRY)) {
	smtps_tx_settle(s, s->tx, SMTPS_STATUS_TEMPFAIL, e->state, NULL,
			"not sent: cancelled by the caller");
	act = SMTPS_ACT_TEMPFAIL_TX;
    }
    if (r->code == 421 && act != SMTPS_ACT_ABORT)	/* RFC 5321 3.8: closing */
	act = SMTPS_ACT_FAIL_CONN;
    if (e->handled < e->awaiting && (act == SMTPS_ACT_NEXT
				     || act == SMTPS_ACT_JUMP
				     || act == SMTPS_ACT_RETRY)) {
	smtps_dispatch_refresh_deadline(s);
	return;
    }
    id = e->state;
    left = e->awaiting - e->handled;
    fifo_pop(s);
    drain_add(s, id, left);
    act_on(s, id, act, r);
    if (s->status == SMTPS_SESS_ACTIVE)
	smtps_dispatch_refresh_deadline(s);
}

/*
 * drain_add - n more replies of state's to read and drop, after those
 * queued. Whose they are matters: a recipient among them may be accepted
 * all the same. The queue holds one run per state still in flight, one
 * for our dot or "*", and the rest of the reply that sent us elsewhere;
 * its last slot takes what cannot be (counted as a recipient's, the
 * careful way).
 */

static void drain_add(struct smtps_session *s, int state, int n)
{
    int     cap = (int) (sizeof(s->drainq) / sizeof(s->drainq[0]));

    if (n <= 0)
	return;
    s->draining += n;
    if (s->ndrainq > 0 && s->drainq[s->ndrainq - 1].state == state) {
	s->drainq[s->ndrainq - 1].left += n;
    } else if (s->ndrainq < cap) {
	s->drainq[s->ndrainq].state = state;
	s->drainq[s->ndrainq++].left = n;
    } else {
	s->drainq[cap - 1].state = SMTPS_STATE_RCPT;
	s->drainq[cap - 1].left += n;
    }
}

/* drain_owner - whose the next drained reply is (-1: ours, or unknown) */

static int drain_owner(struct smtps_session *s)
{
    int     owner, i;

    if (s->ndrainq == 0)
	return -1;
    owner = s->drainq[0].state;
    if (--s->drainq[0].left == 0) {
	for (i = 1; i < s->ndrainq; i++)
	    s->drainq[i - 1] = s->drainq[i];
	s->ndrainq--;
    }
    return owner;
}

/* drain_reply - a reply owed to a command whose outcome no longer matters */

static void drain_reply(struct smtps_session *s, const struct smtps_reply *r)
{
    char    why[SMTPS_REASON_MAX];
    int     id;

    s->draining--;
    /* A recipient the server accepted is one all the same. */
    if (drain_owner(s) == SMTPS_STATE_RCPT && r->code >= 200 && r->code < 300)
	s->srv_accepted++;

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
	smtps_dispatch_fail_conn(s, s->cur, r, SMTPS_STATUS_TEMPFAIL, why, 1);
	return;
    }

    /*
     * A lone dot ends an empty message, which the server delivers to
     * every recipient it accepted since our MAIL, drained replies
     * included: with any, a retry would deliver twice. Only closing
     * makes the server discard it.
     */
    if (r->code == 354 && s->srv_accepted > 0) {
	snprintf(why, sizeof(why), "the server answered DATA with 354 after "
		 "the transaction had failed, with %zu recipient(s) accepted; "
		 "the connection is closed, since a lone dot would deliver "
		 "an empty message to them", s->srv_accepted);
	smtps_dispatch_fail_conn(s, s->cur, r, SMTPS_STATUS_TEMPFAIL, why, 1);
	return;
    }

    /*
     * LMTP answers the end of data once per accepted recipient, so a
     * lone dot with none accepted is owed no reply at all, and we could
     * not tell how many to read; and an LMTP server must refuse DATA
     * when no RCPT succeeded (RFC 2033 4.2). A 354 here is a server that
     * does not keep to the protocol: close.
     */
    if (r->code == 354 && s->protocol == SMTPS_PROTO_LMTP) {
	smtps_dispatch_fail_conn(s, s->cur, r, SMTPS_STATUS_TEMPFAIL,
				 "the LMTP server answered DATA with 354 "
				 "after the transaction had failed; the "
				 "connection is closed rather than send "
				 "a lone dot", 1);
	return;
    }
    if (r->code == 354
	&& smtps_session_queue_bytes(s, ".\r\n", 3) == SMTPS_OK) {
	smtps_session_trace(s, SMTPS_TRACE_SENT, ".", 1);
	drain_add(s, -1, 1);
    } else if (r->code == 334
	       && smtps_session_queue_bytes(s, "*\r\n", 3) == SMTPS_OK) {
	smtps_session_trace(s, SMTPS_TRACE_SENT, "*", 1);
	drain_add(s, -1, 1);
    }
    if (r->code == 421) {
	smtps_dispatch_fail_conn(s, s->cur, r, SMTPS_STATUS_TEMPFAIL, NULL, 1);
	return;
    }
    if (s->draining == 0) {
	id = s->pending;
	s->pending = -1;
	smtps_dispatch_transition(s, id);
    } else
	smtps_dispatch_refresh_deadline(s);
}

/* act_on - carry out what state id's callback decided */

static void act_on(struct smtps_session *s, int id, int act,
		           const struct smtps_reply *reply)
{
    const char *why;
    int     status;

    switch (act) {
    case SMTPS_ACT_NEXT:
	go(s, s->forced_next >= 0 ? s->forced_next : s->order->next[id]);
	return;
    case SMTPS_ACT_JUMP:
	if (s->forced_next >= 0) {
	    go(s, s->forced_next);
	    return;
	}
	set_reason(s->state_reason,
		   "state %s returned JUMP without smtp_next_state()",
		   s->machine->states[id].name, NULL);
	act = SMTPS_ACT_ERROR;
	break;
    case SMTPS_ACT_RETRY:
	go(s, id);
	return;
    case SMTPS_ACT_ABORT:
	interrupt(s, id, reply);
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
	set_reason(s->state_reason, "state %s failed",
		   s->machine->states[id].name, NULL);
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
	smtps_dispatch_fail_conn(s, id, reply, status, why, 0);
	return;
    }
    /* A state's own decision, no reply behind it (an address check). */
    if (s->tx->outcome == 0 && reply == NULL)
	s->tx->state_verdict = 1;
    smtps_tx_settle(s, s->tx, status, id, reply, why);

    /*
     * After the 354 and before the final dot, the server takes every
     * line as message text: RSET or QUIT now would become part of the
     * message, and a dot would deliver it cut short. Only closing the
     * connection makes the server discard it.
     */
    if (smtps_tx_in_data(s, s->tx)) {
	smtps_dispatch_fail_conn(s, id, reply, status, why != NULL ? why :
				 "the transaction failed inside the message "
				 "data", 1);
	return;
    }
    /* Refused before a command went out (SIZE, 8BITMIME...): nothing to reset. */
    if (!s->tx->final_replied && s->out_produced > s->tx->out_start)
	s->need_reset = 1;
    go(s, SMTPS_STATE_RSET);
}

/*
 * interrupt - a state asked to stop now (Ctrl-C in a Python state): end
 * the connection at once, fail what is in hand, and mark the session so
 * that its driver stops driving too
 */

static void interrupt(struct smtps_session *s, int id,
		              const struct smtps_reply *reply)
{
    char    why[SMTPS_REASON_MAX];

    s->interrupted = 1;
    if (s->state_reason[0] != 0)
	snprintf(why, sizeof(why), "interrupted: %.480s", s->state_reason);
    else
	snprintf(why, sizeof(why), "interrupted in state %.200s",
		 s->machine->states[id].name);
    smtps_dispatch_fail_conn(s, id, reply, SMTPS_STATUS_TEMPFAIL, why, 1);
}

/*
 * smtps_dispatch_body_failed - the body could not go on (a source that
 * cannot be read or holds what may not go, no room): mid-data, so the
 * connection closes before the final dot
 */

void    smtps_dispatch_body_failed(struct smtps_session *s, int rc)
{
    const char *why = s->state_reason[0] ? s->state_reason :
	"cannot queue the message body";
    int     status = rc == SMTPS_EINVAL ? SMTPS_STATUS_PERMFAIL :
	SMTPS_STATUS_TEMPFAIL;

    if (rc == SMTPS_EINTR) {
	interrupt(s, SMTPS_STATE_BODY, NULL);
	return;
    }
    if (s->tx != NULL)
	smtps_tx_settle(s, s->tx, status, SMTPS_STATE_BODY, NULL, why);
    smtps_dispatch_fail_conn(s, SMTPS_STATE_BODY, NULL, status, why, 1);
}

/* smtps_dispatch_set_stage - the stage of state id, from its tostage/tostring */

void    smtps_dispatch_set_stage(struct smtps_session *s,
				         struct smtps_result *r, int id,
				         int awaiting)
{
    const smtp_state *st;
    const char *name = NULL;

    r->state = id;
    if (id < 0) {
	r->stage = SMTPS_STAGE_NOT_CONNECTED;
    } else {
	st = &s->machine->states[id];
	r->stage = st->tostage ? st->tostage(s, awaiting, st->closure) :
	    SMTPS_STAGE_UNKNOWN;
	if (st->tostring != NULL)
	    name = st->tostring(r->stage, st->closure);
    }
    if (name == NULL)
	name = smtps_stage_name(r->stage);
    snprintf(r->stage_name, sizeof(r->stage_name), "%s", name);
}

/* smtps_dispatch_fail_conn - the connection cannot go on: settle, then end */

void    smtps_dispatch_fail_conn(struct smtps_session *s, int id,
				         const struct smtps_reply *reply,
				         int status, const char *why,
				         int close_now)
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
    if (s->prev != NULL) {
	if (id == SMTPS_STATE_BODY)
	    id = live_head(s);			/* BODY was the earlier one's */
	close_now |= smtps_tx_abandon(s, s->prev, SMTPS_STATE_BODY, reply,
				      status);
    }
    if (s->tx != NULL)
	close_now |= smtps_tx_abandon(s, s->tx, id, reply, status);
    snprintf(text, sizeof(text), "not attempted: %.480s", s->reason);
    smtps_dispatch_fail_queue(s, id, reply != NULL
			      || smtps_dispatch_awaiting(s, id),
			      queue_status, text);

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
	s->ndrainq = 0;
	s->pending = -1;
	s->status = SMTPS_SESS_CLOSING;
	s->deadline = -1;
	return;
    }
    go(s, SMTPS_STATE_QUIT);
}

/* describe_failure - where the connection failed a queued message */

static void describe_failure(struct smtps_session *s, struct smtps_result *r,
			             int id, int awaiting)
{
    smtps_dispatch_set_stage(s, r, -1, 0);
    /* The connection part (STARTTLS, the handshake) failed them. */
    if (s->fail_stage >= 0 && s->transactions == 0) {
	r->state = s->fail_state;
	r->stage = s->fail_stage;
	snprintf(r->stage_name, sizeof(r->stage_name), "%s",
		 smtps_stage_name(s->fail_stage));
    } else if (id >= 0 && s->transactions == 0) {
	/* Before any transaction (the banner, EHLO, a state of the
	 * connection part): where the connection failed them. */
	smtps_dispatch_set_stage(s, r, id, awaiting);
    }
}

/*
 * smtps_dispatch_fail_queue - every queued message gets its result now;
 * or, before any transaction and when the driver asked for them back
 * (smtps_session_set_hand_back()), they are kept, unsettled, saying
 * where it failed.
 */

void    smtps_dispatch_fail_queue(struct smtps_session *s, int id,
				          int awaiting, int status,
				          const char *why)
{
    struct smtps_message *m;
    struct smtps_result *r;
    /* Before any transaction, with a driver that may try elsewhere. */
    int     hold = s->hand_back && s->transactions == 0
	&& s->status != SMTPS_SESS_NEW;

    if (hold) {
	if (s->held_status == 0) {		/* the first word is the cause */
	    for (m = s->queue; m != NULL; m = m->qnext)
		describe_failure(s, m->qresult, id, awaiting);
	    s->held_status = status;
	}
	return;					/* smtps_session_take_back() */
    }
    while ((m = s->queue) != NULL) {
	s->queue = m->qnext;
	s->nqueued--;
	r = m->qresult;
	describe_failure(s, r, id, awaiting);
	(void) smtps_result_set_reason(r, why);
	smtps_result_settle(r, status, 1);
	smtps_session_push_result(s, r);
	smtps_message_free(m);
    }
    s->queue_tail = NULL;
}

/* smtps_dispatch_lost - the connection is gone: every message ends now */

void    smtps_dispatch_lost(struct smtps_session *s)
{
    int     id = live_head(s);

    if (s->prev != NULL)
	(void) smtps_tx_abandon(s, s->prev, SMTPS_STATE_BODY, NULL,
				SMTPS_STATUS_TEMPFAIL);
    if (s->tx != NULL)
	(void) smtps_tx_abandon(s, s->tx, id, NULL, SMTPS_STATUS_TEMPFAIL);
    smtps_dispatch_fail_queue(s, id, id >= 0 && smtps_dispatch_awaiting(s, id),
			      SMTPS_STATUS_TEMPFAIL,
			      s->reason[0] ? s->reason : "connection closed");
}

/* live_head - the live transaction's first state in flight (or cur) */

static int live_head(const struct smtps_session *s)
{
    int     k = s->prev != NULL;

    return s->nfifo > k ? s->fifo[k].state : s->cur;
}

/*
 * smtps_dispatch_run_ahead - start the next transaction behind this final
 * dot
 *
 * Never under LMTP. The earlier transaction is then owed one reply per
 * accepted recipient, not one, and finish_prev() reads exactly one before
 * the live transaction's replies; a 421 or a lost connection half-way
 * through those replies would also have to settle two transactions'
 * recipients at once, some known and some not. Saving one round trip per
 * message is not worth a second way to pair replies with recipients:
 * LMTP sessions wait for the last reply, as drivers that do not ask for
 * running ahead always do.
 */

void    smtps_dispatch_run_ahead(struct smtps_session *s)
{
    struct smtps_message *m;
    struct smtps_tx *tx = s->tx;

    if (!s->tx_runahead || s->protocol == SMTPS_PROTO_LMTP
	|| !s->pipelining || s->prev != NULL
	|| s->status != SMTPS_SESS_ACTIVE || s->draining > 0
	|| tx == NULL || tx->outcome != 0 || tx->body_active
	|| tx->body_end == 0 || s->nfifo != 1
	|| s->fifo[0].state != SMTPS_STATE_BODY || s->need_reset
	|| s->conn_failed || s->quit_requested
	|| s->order->next[SMTPS_STATE_BODY] != SMTPS_STATE_RSET)
	return;
    if (s->queue == NULL) {
	if (s->feeder == NULL
	    || (m = s->feeder(s, s->feeder_closure)) == NULL)
	    return;
	smtps_session_enqueue(s, m);
    }
    s->prev = tx;				/* it awaits its final reply */
    s->tx = NULL;
    smtps_tx_start(s);
    smtps_dispatch_enter(s, SMTPS_STATE_MAIL);
}

/*
 * finish_prev - the final reply of the transaction run past. BODY's
 * callback reads the session's transaction, so for the length of the call
 * that is the earlier one; then the live one is back.
 */

static void finish_prev(struct smtps_session *s, const struct smtps_reply *r)
{
    struct smtps_tx *prev = s->prev, *live = s->tx;
    const char *why;
    int     act, cur = s->cur, failed = 0;

    fifo_pop(s);
    s->prev = NULL;
    s->tx = prev;
    s->state_reason[0] = 0;
    s->reply_index = 0;
    act = call_callback(s, SMTPS_STATE_BODY, r);
    if (r->code == 421)				/* RFC 5321 3.8: it is closing */
	act = SMTPS_ACT_FAIL_CONN;
    why = s->state_reason[0] ? s->state_reason : NULL;
    if (act == SMTPS_ACT_TEMPFAIL_TX || act == SMTPS_ACT_PERMFAIL_TX)
	smtps_tx_settle(s, prev, act == SMTPS_ACT_TEMPFAIL_TX ?
			SMTPS_STATUS_TEMPFAIL : SMTPS_STATUS_PERMFAIL,
			SMTPS_STATE_BODY, r, why);
    else if (act != SMTPS_ACT_NEXT) {
	failed = 1;
	smtps_tx_settle(s, prev, r->code >= 500 ? SMTPS_STATUS_PERMFAIL :
			SMTPS_STATUS_TEMPFAIL, SMTPS_STATE_BODY, r,
			why != NULL ? why : "the end of data failed");
    }
    smtps_tx_finish(s, prev);
    s->tx = live;
    s->cur = cur;

    /*
     * The server broke off at the final dot: the commands behind it are
     * not to be trusted to a QUIT that drains them (a 354 would be
     * answered with a dot). Close; the live message was only begun.
     */
    if (failed) {
	smtps_dispatch_fail_conn(s, live_head(s), r, SMTPS_STATUS_TEMPFAIL,
				 why, 1);
	return;
    }
    smtps_dispatch_refresh_deadline(s);
}

/* smtps_dispatch_awaiting - state id is in flight with replies still owed */

int     smtps_dispatch_awaiting(const struct smtps_session *s, int id)
{
    int     i;

    for (i = 0; i < s->nfifo; i++)
	if (s->fifo[i].state == id && s->fifo[i].handled < s->fifo[i].awaiting)
	    return 1;
    return 0;
}

/* smtps_dispatch_refresh_deadline - a new absolute deadline after progress */

void    smtps_dispatch_refresh_deadline(struct smtps_session *s)
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
	&& !(s->prev != NULL ? s->out_consumed >= s->prev->body_end :
	     s->tx != NULL && smtps_tx_dot_sent(s, s->tx)))
	t = t > 0 && t < SMTPS_TIMEOUT_BLOCK ? t : SMTPS_TIMEOUT_BLOCK;
    s->deadline = t > 0 ? smtps_time_after(s->now, t) : -1;
}
