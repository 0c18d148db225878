/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	transaction.c 3
 * SUMMARY
 *	one message on one connection: its recipients, its body, its fate
 * SYNOPSIS
 *	#include "session_private.h"
 *
 *	struct smtps_tx *smtps_tx_start(s)
 *	void	smtps_tx_rcpt_reply(s, tx, i, reply)
 *	int	smtps_tx_lmtp_reply(s, tx, reply)
 *	void	smtps_tx_settle(s, tx, status, id, reply, why)
 *	int	smtps_tx_abandon(s, tx, id, reply, status)
 *	void	smtps_tx_finish(s, tx)
 *	int	smtps_tx_dot_sent(s, tx)
 *	int	smtps_tx_in_data(s, tx)
 *	int	smtps_tx_bdat(s, tx)
 *	void	smtps_tx_start_body(s, chunking)
 *	int	smtps_tx_pump_body(s, tx)
 *	void	smtps_session_enqueue(s, m)
 *	void	smtps_session_push_result(s, r)
 * DESCRIPTION
 *	A transaction (struct smtps_tx) holds everything that belongs to one
 *	message on this connection: the message, the result being built,
 *	where its recipients and its body stand. The session owns at most
 *	two (session_private.h); starting one takes the next queued message
 *	and the result that was made for it at submit.
 *
 *	The failure funnel. Statuses are decided here and nowhere else, in
 *	the manner of Postfix's smtp_rcpt_fail() and smtp_mesg_fail():
 *
 *	smtps_tx_rcpt_reply()	a recipient's RCPT reply: 2xx accepts it
 *				(its fate is then the message's), 5xx fails
 *				it for good, anything else for now;
 *	smtps_tx_lmtp_reply()	LMTP (RFC 2033 4.2): the end of data is
 *				answered once per accepted recipient, in
 *				RCPT order; each reply is its recipient's
 *				final status and reply, and the last one
 *				settles the message from them;
 *	smtps_tx_settle()	the message's outcome: the first cause
 *				decides (a reply, a timeout, a lost
 *				connection); later ones only add a reason;
 *	smtps_tx_finish()	the end: smtps_result_settle() (result.c)
 *				turns the outcome into each recipient's
 *				final status, then the message's.
 *
 *	The body. smtps_tx_start_body() begins it; smtps_tx_pump_body()
 *	encodes (CRLF, dot-stuffing, the final dot) into the output up to
 *	SMTPS_OUT_HIGH and is called again as the driver takes output, so a
 *	large body is never queued whole. body_end marks where it ends in
 *	the output: once the driver has taken that much, the dot is sent.
 *	For a driver that writes iovecs (the engine's), a body that is the
 *	message's own and cannot change goes without the copy: the runs
 *	that need no change are queued as references into the message
 *	(pump_runs(), outbuf.c), which is then not freed while one waits.
 *
 *	A body in memory was checked when it was set (message.c); a copy
 *	of our own (or another message's that outlives this one, a part's)
 *	goes as it is. A body the caller keeps (a reference) may
 *	have changed since, so it is scanned again ahead of the encoder (a
 *	piece at a time for DATA, whole before a BDAT chunk). A body read as
 *	it is sent (a source) is read SMTPS_STAGE_MAX bytes at a time into
 *	the session's stage, each piece checked before any of it is encoded.
 *	A NUL, an overlong line, 8-bit content MAIL did not declare, or a
 *	size other than the one declared (SIZE, BDAT) stops it there, and
 *	the connection closes before the final dot (dispatch.c), so that
 *	the server discards what it got. A BDAT chunk never gets more
 *	octets than it announced.
 * SEE ALSO
 *	dispatch.c, which decides when; states.c (RCPT, DATA, BODY).
 *--*/

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "session_private.h"

/* smtps_tx_start - the next queued message becomes the live transaction */

struct smtps_tx *smtps_tx_start(struct smtps_session *s)
{
    struct smtps_message *m = s->queue;
    struct smtps_tx *tx = s->prev == &s->txs[0] ? &s->txs[1] : &s->txs[0];

    s->queue = m->qnext;
    if (s->queue == NULL)
	s->queue_tail = NULL;
    s->nqueued--;
    m->qnext = NULL;
    memset(tx, 0, sizeof(*tx));
    tx->msg = m;
    tx->res = m->qresult;
    m->qresult = NULL;
    tx->rcpt_index = -1;
    tx->out_start = s->out_produced;
    s->tx = tx;
    s->transactions++;
    s->srv_accepted = 0;			/* a new MAIL starts over */
    return tx;
}

/* smtps_tx_rcpt_reply - the recipient funnel: settle recipient i's RCPT */

void    smtps_tx_rcpt_reply(struct smtps_session *s, struct smtps_tx *tx,
			            size_t i, const struct smtps_reply *reply)
{
    struct smtps_result_rcpt *rc = &tx->res->rcpt[i];
    int     was_accepted = rc->status == SMTPS_RCPT_ACCEPTED;

    smtps_result_set_reply(&rc->reply, reply);
    if (reply->code >= 200 && reply->code < 300) {
	rc->status = SMTPS_RCPT_ACCEPTED;
	if (!was_accepted) {
	    tx->rcpt_accepted++;
	    if (tx == s->tx)
		s->srv_accepted++;
	}
	return;
    }
    if (was_accepted) {
	tx->rcpt_accepted--;
	if (tx == s->tx && s->srv_accepted > 0)
	    s->srv_accepted--;
    }

    /*
     * 5xx is the server's final word on the address. 4xx says try again;
     * so does a 1xx or 3xx, which no RCPT may get (a protocol error of
     * the server's that says nothing about the address).
     */
    rc->status = reply->code >= 500 && reply->code < 600 ?
	SMTPS_STATUS_PERMFAIL : SMTPS_STATUS_TEMPFAIL;
}

/* What an LMTP reply says of its recipient, by kind (lmtp_kind()). */
static const int lmtp_status[3] = {
    SMTPS_STATUS_DELIVERED, SMTPS_STATUS_TEMPFAIL, SMTPS_STATUS_PERMFAIL
};

/*
 * lmtp_kind - 0 for 2xx, 2 for 5xx, 1 for anything else (4xx, and the
 * 1xx or 3xx no end of data may get: a protocol error that says nothing
 * final, as for RCPT)
 */

static int lmtp_kind(int code)
{
    if (code >= 200 && code < 300)
	return 0;
    return code >= 500 && code < 600 ? 2 : 1;
}

/*
 * smtps_tx_lmtp_reply - the recipient funnel after the data, for LMTP.
 * The reply is the next accepted recipient's (RFC 2033 4.2: one per
 * recipient that got a 2xx to RCPT, in that order): 2xx delivers to it,
 * 5xx fails it for good, anything else for now, and the reply becomes its
 * own, the one its result shows. Once every reply owed has come, the
 * message is settled from them: delivered when any recipient took it
 * (smtps_result_settle() then calls it delivered or partial), else
 * tempfail when any failed for now, else permfail; the first reply of
 * that kind is the message's. Returns 1 when that was the last reply.
 */

int     smtps_tx_lmtp_reply(struct smtps_session *s, struct smtps_tx *tx,
			            const struct smtps_reply *reply)
{
    struct smtps_result *r = tx->res;
    struct smtps_reply decider;
    const struct smtps_result_reply *src;
    size_t  i;
    int     kind = lmtp_kind(reply->code);

    /* Settled ones are no longer ACCEPTED: the next one is the next owed. */
    for (i = tx->lmtp_next; i < r->nrcpt; i++)
	if (r->rcpt[i].status == SMTPS_RCPT_ACCEPTED)
	    break;
    if (i < r->nrcpt) {
	tx->lmtp_next = i + 1;
	smtps_result_set_reply(&r->rcpt[i].reply, reply);
	r->rcpt[i].status = lmtp_status[kind];
	if (tx->lmtp_first[kind] == 0)
	    tx->lmtp_first[kind] = i + 1;
    }
    if (++tx->lmtp_got < tx->lmtp_due)
	return 0;
    tx->final_replied = 1;			/* the transaction is over */

    /* The best news decides: one recipient that has it is a delivery. */
    for (kind = 0; kind < 2 && tx->lmtp_first[kind] == 0; kind++)
	 /* void */ ;
    if (tx->lmtp_first[kind] == 0) {
	/*
	 * No reply found a recipient (a state of the caller's changed
	 * their RCPT results under us): this reply speaks for the message.
	 */
	smtps_tx_settle(s, tx, lmtp_status[lmtp_kind(reply->code)],
			SMTPS_STATE_BODY, reply, NULL);
	return 1;
    }
    src = &r->rcpt[tx->lmtp_first[kind] - 1].reply;
    memset(&decider, 0, sizeof(decider));
    decider.code = src->code;
    memcpy(decider.enhanced, src->enhanced, sizeof(decider.enhanced));
    decider.text = src->text;
    decider.text_len = strlen(src->text);
    smtps_tx_settle(s, tx, lmtp_status[kind], SMTPS_STATE_BODY, &decider, NULL);
    return 1;
}

/* smtps_tx_settle - the message funnel: decide the outcome once */

void    smtps_tx_settle(struct smtps_session *s, struct smtps_tx *tx,
			        int status, int id,
			        const struct smtps_reply *reply,
			        const char *why)
{
    struct smtps_result *r = tx->res;

    if (tx->outcome == 0) {
	tx->outcome = status;
	smtps_result_set_reply(&r->reply, reply);
	smtps_dispatch_set_stage(s, r, id, reply != NULL
				 || status == SMTPS_STATUS_UNKNOWN
				 || smtps_dispatch_awaiting(s, id));

	/*
	 * MAIL refused the message before sending anything (too large for
	 * the server's SIZE, UTF-8 without SMTPUTF8, REQUIRETLS that
	 * cannot be met): no transaction was ever open, so "after MAIL
	 * FROM" would say what did not happen.
	 */
	if (id == SMTPS_STATE_MAIL && reply == NULL
	    && s->out_produced == tx->out_start) {
	    r->stage = SMTPS_STAGE_BEFORE_MAIL;
	    snprintf(r->stage_name, sizeof(r->stage_name), "%s",
		     smtps_stage_name(r->stage));
	}
    }
    /* Keep the first reason: it is the cause, later ones are effects. */
    if (why != NULL && why[0] != 0 && r->reason[0] == 0)
	(void) smtps_result_set_reason(r, why);
}

/*
 * smtps_tx_abandon - the connection ends under the transaction: settle it
 * (unknown when its final dot went and no reply came) and finish it.
 * Returns 1 when the connection must close at once: mid-data, any
 * further byte would be read as message text, and the rest of the body
 * ends in the final dot, which would deliver a message reported failed.
 */

int     smtps_tx_abandon(struct smtps_session *s, struct smtps_tx *tx, int id,
			         const struct smtps_reply *reply, int status)
{
    char    text[SMTPS_REASON_MAX];
    const char *why = s->reason[0] ? s->reason : "connection closed";
    int     close_now = 0;

    if (tx->outcome == 0 && smtps_tx_dot_sent(s, tx) && !tx->final_replied) {
	/*
	 * LMTP: the recipients whose replies came keep them; the others
	 * are unknown, and the message is partial when one was delivered.
	 */
	if (tx->lmtp_due > 0)
	    snprintf(text, sizeof(text), "connection lost after the final "
		     "dot, with %zu of its %zu replies (one per recipient) "
		     "read: %.380s", tx->lmtp_got, tx->lmtp_due, why);
	else
	    snprintf(text, sizeof(text), "connection lost after the final "
		     "dot, before its reply: %.400s", why);
	smtps_tx_settle(s, tx, SMTPS_STATUS_UNKNOWN, id, NULL, text);
    }
    if (smtps_tx_in_data(s, tx)) {
	close_now = 1;
	smtps_session_drop_output(s);
    }
    smtps_tx_settle(s, tx, status, id, reply, why);
    smtps_tx_finish(s, tx);
    return close_now;
}

/* smtps_tx_finish - final statuses, the result out, the message freed */

void    smtps_tx_finish(struct smtps_session *s, struct smtps_tx *tx)
{
    struct smtps_result *r = tx->res;
    int     verdict = tx->outcome;

    /* Ended without a verdict (a state left the transaction): not sent. */
    if (verdict == 0)
	smtps_tx_settle(s, tx, SMTPS_STATUS_PERMFAIL, s->cur, NULL,
			"transaction ended before the message was sent");
    smtps_result_settle(r, verdict, !tx->state_verdict || tx->data_sent);
    smtps_session_push_result(s, r);

    /*
     * A run of its body still queued would point into freed memory. It
     * cannot be (a transaction ends mid-data only through
     * smtps_tx_abandon(), which drops the output first, and otherwise
     * after its final dot went), but if it were, the rest of its body
     * must not go either: it would end in a dot for a settled message.
     */
    if (s->nseg > 0 && smtps_session_runs_of(s, tx->msg))
	smtps_session_drop_output(s);
    smtps_message_free(tx->msg);
    memset(tx, 0, sizeof(*tx));
    if (s->tx == tx)
	s->tx = NULL;
    if (s->prev == tx)
	s->prev = NULL;
}

/* smtps_tx_dot_sent - the driver has taken the final dot (or last BDAT byte) */

int     smtps_tx_dot_sent(const struct smtps_session *s,
			          const struct smtps_tx *tx)
{
    return tx->body_end > 0 && s->out_consumed >= tx->body_end;
}

/* smtps_tx_in_data - the server reads this transaction's text, not commands */

int     smtps_tx_in_data(const struct smtps_session *s,
			         const struct smtps_tx *tx)
{
    return (tx->data_mode || tx->body_started) && !smtps_tx_dot_sent(s, tx);
}

/*
 * smtps_tx_bdat - the content goes by BDAT (RFC 3030): the server offers
 * CHUNKING and the body is in memory, so that its one chunk announces its
 * exact length. A body read as it is sent goes by DATA.
 */

int     smtps_tx_bdat(const struct smtps_session *s, const struct smtps_tx *tx)
{
    return (s->caps.ext & SMTPS_EXT_CHUNKING) != 0 && tx->msg->body_read == NULL;
}

/* smtps_tx_start_body - begin streaming the live transaction's content */

void    smtps_tx_start_body(struct smtps_session *s, int chunking)
{
    struct smtps_tx *tx = s->tx;

    smtps_body_init(&tx->enc, !chunking);
    smtps_body_scan_init(&tx->scan, tx->msg->body_flags);
    tx->body_chunking = chunking;
    tx->body_off = 0;
    tx->body_end = 0;
    tx->stage_off = tx->stage_len = 0;
    tx->source_done = 0;
    tx->scan_off = 0;
    tx->body_active = 1;
    tx->body_started = 1;
    tx->data_sent = 1;
    /* The transcript shows the content as given, then the dot it ends with. */
    if (s->trace != NULL) {
	if (tx->msg->body_read == NULL)
	    smtps_session_trace(s, SMTPS_TRACE_DATA, tx->msg->body,
				tx->msg->body_len);
	if (!chunking)
	    smtps_session_trace(s, SMTPS_TRACE_SENT, ".", 1);
    }
}

/* body_refuse - a piece of a body not ours may not go: why, and the code */

static int body_refuse(struct smtps_session *s, struct smtps_tx *tx)
{
    const struct smtps_body_scan *sc = &tx->scan;

    if (sc->problem == SMTPS_BODY_NUL)
	snprintf(s->state_reason, sizeof(s->state_reason), "the message body "
		 "has a NUL byte (line %llu, offset %llu), which is never sent",
		 (unsigned long long) sc->problem_line,
		 (unsigned long long) sc->problem_offset);
    else if (sc->problem == SMTPS_BODY_LONG_LINE)
	snprintf(s->state_reason, sizeof(s->state_reason), "line %llu of the "
		 "message body is longer than %d octets (RFC 5322 2.1.1)",
		 (unsigned long long) sc->problem_line, SMTPS_LINE_OCTETS_MAX);
    else
	snprintf(s->state_reason, sizeof(s->state_reason), "8-bit content "
		 "needs 8BITMIME, which the server does not offer");
    return SMTPS_EINVAL;
}

/*
 * body_changed - a body not ours is not what was checked and declared
 * (SIZE, BDAT's length) when the message was made: its file or buffer
 * was changed since
 */

static int body_changed(struct smtps_session *s, struct smtps_tx *tx,
			        uint64_t now, int more)
{
    snprintf(s->state_reason, sizeof(s->state_reason), "the message body "
	     "changed since it was checked: %lld octets were declared, it "
	     "now makes %s%llu", (long long) tx->msg->body_size,
	     more ? "more than " : "", (unsigned long long) now);
    return SMTPS_EINVAL;
}

/* scan_end - all of a body not ours was scanned: is it what was declared? */

static int pump_runs(struct smtps_session *s, struct smtps_tx *tx);

static int scan_end(struct smtps_session *s, struct smtps_tx *tx)
{
    tx->source_done = 1;
    (void) smtps_body_scan_finish(&tx->scan);
    if (tx->msg->body_size >= 0
	&& tx->scan.size != (uint64_t) tx->msg->body_size)
	return body_changed(s, tx, tx->scan.size, 0);
    return SMTPS_OK;
}

/*
 * source_read - the next piece of a source body into s->stage, checked
 * before any of it goes: 0 with a piece (or at the end), or an SMTPS_E*
 * code (and s->state_reason says why)
 */

static int source_read(struct smtps_session *s, struct smtps_tx *tx)
{
    struct smtps_message *m = tx->msg;
    char    why[SMTPS_REASON_MAX - 64];
    long    n;

    if (s->stage == NULL && (s->stage = malloc(SMTPS_STAGE_MAX)) == NULL)
	return SMTPS_ENOMEM;
    why[0] = 0;
    n = m->body_read(m->body_closure, tx->body_off, s->stage, SMTPS_STAGE_MAX,
		     why, sizeof(why));
    if (n < 0 || (size_t) n > SMTPS_STAGE_MAX) {
	why[sizeof(why) - 1] = 0;		/* whatever the reader did */
	snprintf(s->state_reason, sizeof(s->state_reason), "the message body "
		 "could not be read: %s", why[0] ? why : n < 0 ?
		 smtps_strerror((int) n) :
		 "the reader said it read more than it was given room for");
	return n < 0 && n >= INT32_MIN ? (int) n : SMTPS_EINVAL;
    }
    tx->stage_off = 0;
    tx->stage_len = (size_t) n;
    if (n == 0)
	return scan_end(s, tx);
    tx->body_off += (size_t) n;
    if (smtps_body_scan(&tx->scan, s->stage, (size_t) n) != 0
	|| (tx->scan.is_8bit && !tx->eight_bit_ok))
	return body_refuse(s, tx);
    smtps_session_trace(s, SMTPS_TRACE_DATA, s->stage, (size_t) n);
    return SMTPS_OK;
}

/*
 * body_window - the next input to encode, and only what was checked: a
 * source's piece in the stage (source_read()); a copy of our own as it
 * is; a body the caller keeps (a reference), which may have changed since
 * it was set, scanned again just ahead of the encoder, a piece at a time
 * for DATA, whole for BDAT, whose length must be known right before the
 * first byte of the chunk goes.
 */

static int body_window(struct smtps_session *s, struct smtps_tx *tx,
		               const char **in, size_t *left)
{
    struct smtps_message *m = tx->msg;
    size_t  piece;
    int     rc;

    if (m->body_read != NULL) {
	if (tx->stage_off == tx->stage_len && !tx->source_done
	    && (rc = source_read(s, tx)) != SMTPS_OK)
	    return rc;
	*left = tx->stage_len - tx->stage_off;
	*in = *left > 0 ? s->stage + tx->stage_off : NULL;
	return SMTPS_OK;
    }
    if (!m->body_owned && !m->body_shared && tx->scan_off == tx->body_off
	&& !tx->source_done) {
	piece = m->body_len - tx->scan_off;
	if (piece > SMTPS_STAGE_MAX && !tx->body_chunking)
	    piece = SMTPS_STAGE_MAX;
	if (piece > 0
	    && (smtps_body_scan(&tx->scan, m->body + tx->scan_off, piece) != 0
		|| (tx->scan.is_8bit && !tx->eight_bit_ok)))
	    return body_refuse(s, tx);
	tx->scan_off += piece;
	if (tx->scan_off == m->body_len && (rc = scan_end(s, tx)) != SMTPS_OK)
	    return rc;
    }
    *left = (m->body_owned || m->body_shared ? m->body_len : tx->scan_off)
	- tx->body_off;
    *in = *left > 0 ? m->body + tx->body_off : NULL;	/* (NULL if empty) */
    return SMTPS_OK;
}

/*
 * pump_runs - smtps_tx_pump_body() for a driver that writes iovecs: the
 * encoder steps through the body (smtps_body_step()); what it adds or
 * changes goes into the output buffer, the runs it leaves as they are
 * stay in the message's memory (smtps_session_queue_run()), unless they
 * are too short to be worth an iovec entry. Only for a body that is the
 * message's own (a copy, a part's share of one that outlives it, fixed
 * bytes its envelope shares): its bytes cannot change after the check
 * and live as long as the message, which is not freed while its runs
 * wait (smtps_tx_finish()). Up to SMTPS_RUN_HIGH bytes of runs wait at
 * once, besides SMTPS_OUT_HIGH in the buffer. The
 * bytes on the wire are those of the copying pump, which is the same
 * encoder.
 */

static int pump_runs(struct smtps_session *s, struct smtps_tx *tx)
{
    struct smtps_message *m = tx->msg;
    const char *in = NULL;
    size_t  used, n, room, verbatim, left = 0;
    uint64_t limit;
    int     rc;

    if (s->segs == NULL
	&& (s->segs = malloc(SMTPS_SEG_MAX * sizeof(*s->segs))) == NULL)
	return SMTPS_ENOMEM;
    while (tx->body_active && s->out.end - s->out.start < SMTPS_OUT_HIGH
	   && s->seg_bytes < SMTPS_RUN_HIGH && s->nseg < SMTPS_SEG_MAX) {
	if ((rc = smtps_buf_reserve(&s->out, 1024)) != SMTPS_OK)
	    return rc;
	room = s->out.cap - s->out.end;
	if ((rc = body_window(s, tx, &in, &left)) != SMTPS_OK)
	    return rc;
	/* A BDAT chunk: never a byte past its announced length. */
	limit = tx->body_chunking ?
	    (uint64_t) m->body_size - tx->enc.out_total : UINT64_MAX;
	if (tx->body_chunking && left == 0
	    && limit != (tx->enc.at_line_start ? 0 : 2))
	    return body_changed(s, tx, (uint64_t) m->body_size - limit
				+ (tx->enc.at_line_start ? 0 : 2), 0);
	if (left == 0) {
	    n = smtps_body_finish(&tx->enc, s->out.data + s->out.end, room,
				  !tx->body_chunking);
	    tx->body_active = 0;
	    s->out.end += n;
	    s->out_produced += n;
	    tx->body_end = s->out_produced;
	    break;
	}
	n = smtps_body_step(&tx->enc, in, left, &used, s->out.data + s->out.end,
			    room, limit > SIZE_MAX ? SIZE_MAX : (size_t) limit,
			    &verbatim);
	if (used == 0 && n == 0)		/* only the limit can stop it */
	    return body_changed(s, tx, (uint64_t) m->body_size, 1);
	s->out.end += n;
	s->out_produced += n;
	tx->body_off += used;
	if (verbatim == 0)
	    continue;
	in += used - verbatim;
	if (verbatim >= SMTPS_GATHER_MIN) {
	    smtps_session_queue_run(s, m, in, verbatim);
	    continue;
	}
	if ((rc = smtps_session_queue_bytes(s, in, verbatim)) != SMTPS_OK)
	    return rc;
    }
    return SMTPS_OK;
}

/*
 * smtps_tx_pump_body - queue body bytes up to the high-water mark. A
 * failure (a source that cannot be read, a body that holds what may not
 * go or changed since it was checked) says why in s->state_reason:
 * SMTPS_EINVAL for the content, another code for the reading. A BDAT
 * chunk never gets more than the length it announced.
 */

int     smtps_tx_pump_body(struct smtps_session *s, struct smtps_tx *tx)
{
    struct smtps_message *m = tx->msg;
    const char *in = NULL;
    size_t  used, n, room, left = 0;
    uint64_t announced;
    int     rc;

    if (s->gather && m->body_read == NULL && (m->body_owned || m->body_shared)
	&& !smtps_tls_engaged(s))
	return pump_runs(s, tx);
    while (tx->body_active && s->out.end - s->out.start < SMTPS_OUT_HIGH) {
	if ((rc = smtps_buf_reserve(&s->out, 16384)) != SMTPS_OK)
	    return rc;
	room = s->out.cap - s->out.end;
	if (room > 16384)
	    room = 16384;
	if ((rc = body_window(s, tx, &in, &left)) != SMTPS_OK)
	    return rc;
	/*
	 * The chunk is as long as BDAT said, never a byte more, whatever
	 * happens to a body not ours after the check in body_window() (the
	 * caller promised to leave it alone, but its bytes past the chunk
	 * would be read as commands). Shorter, it never ends.
	 */
	if (tx->body_chunking) {
	    announced = (uint64_t) m->body_size - tx->enc.out_total;
	    if (room > announced)
		room = (size_t) announced;
	    if (left == 0 && announced != (tx->enc.at_line_start ? 0 : 2))
		return body_changed(s, tx, (uint64_t) m->body_size - announced
				    + (tx->enc.at_line_start ? 0 : 2), 0);
	}
	if (left > 0) {
	    n = smtps_body_encode(&tx->enc, in, left, &used,
				  s->out.data + s->out.end, room);
	    if (used == 0)			/* only the cap can stop it */
		return body_changed(s, tx, (uint64_t) m->body_size, 1);
	    if (m->body_read != NULL)
		tx->stage_off += used;
	    else
		tx->body_off += used;
	} else {
	    n = smtps_body_finish(&tx->enc, s->out.data + s->out.end,
				  s->out.cap - s->out.end, !tx->body_chunking);
	    tx->body_active = 0;
	}
	s->out.end += n;
	s->out_produced += n;
	if (!tx->body_active)
	    tx->body_end = s->out_produced;
    }
    return SMTPS_OK;
}

/* smtps_session_enqueue - append a message that carries its result */

void    smtps_session_enqueue(struct smtps_session *s, struct smtps_message *m)
{
    m->qnext = NULL;
    if (s->queue_tail != NULL)
	s->queue_tail->qnext = m;
    else
	s->queue = m;
    s->queue_tail = m;
    s->nqueued++;
}

/* smtps_session_push_result - a final result joins what the driver collects */

void    smtps_session_push_result(struct smtps_session *s,
				          struct smtps_result *r)
{
    smtps_bounce_classify_result(r);		/* final now: give it its class */
    r->next = NULL;
    if (s->results_tail != NULL)
	s->results_tail->next = r;
    else
	s->results = r;
    s->results_tail = r;
}
