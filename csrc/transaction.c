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
 *	void	smtps_tx_settle(s, tx, status, id, reply, why)
 *	int	smtps_tx_abandon(s, tx, id, reply, status)
 *	void	smtps_tx_finish(s, tx)
 *	int	smtps_tx_dot_sent(s, tx)
 *	int	smtps_tx_in_data(s, tx)
 *	uint64_t smtps_tx_size(tx)
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
	snprintf(text, sizeof(text), "connection lost after the final dot, "
		 "before its reply: %.400s", why);
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
 * smtps_tx_size - the message size RFC 1870 declares and the server's
 * limit is checked against: the octets sent after the 354, CR LF pairs
 * included, the doubled quoting dots and the final dot not (RFC 1870 3).
 * That is also what BDAT announces (RFC 3030). Counted once.
 */

uint64_t smtps_tx_size(struct smtps_tx *tx)
{
    if (!tx->size_known) {
	tx->size = smtps_body_encoded_length(tx->msg->body, tx->msg->body_len);
	tx->size_known = 1;
    }
    return tx->size;
}

/* smtps_tx_start_body - begin streaming the live transaction's content */

void    smtps_tx_start_body(struct smtps_session *s, int chunking)
{
    struct smtps_tx *tx = s->tx;

    smtps_body_init(&tx->enc, !chunking);
    tx->body_chunking = chunking;
    tx->body_off = 0;
    tx->body_end = 0;
    tx->body_active = 1;
    tx->body_started = 1;
    tx->data_sent = 1;
    /* The transcript shows the content as given, then the dot it ends with. */
    if (s->trace != NULL) {
	smtps_session_trace(s, SMTPS_TRACE_DATA, tx->msg->body,
			    tx->msg->body_len);
	if (!chunking)
	    smtps_session_trace(s, SMTPS_TRACE_SENT, ".", 1);
    }
}

/* smtps_tx_pump_body - queue body bytes up to the high-water mark */

int     smtps_tx_pump_body(struct smtps_session *s, struct smtps_tx *tx)
{
    struct smtps_message *m = tx->msg;
    size_t  used, n, room;
    int     rc;

    while (tx->body_active && s->out.end - s->out.start < SMTPS_OUT_HIGH) {
	if ((rc = smtps_buf_reserve(&s->out, 16384)) != SMTPS_OK)
	    return rc;
	room = s->out.cap - s->out.end;
	if (room > 16384)
	    room = 16384;
	if (tx->body_off < m->body_len) {
	    n = smtps_body_encode(&tx->enc, m->body + tx->body_off,
				  m->body_len - tx->body_off, &used,
				  s->out.data + s->out.end, room);
	    tx->body_off += used;
	} else {
	    n = smtps_body_finish(&tx->enc, s->out.data + s->out.end, room,
				  !tx->body_chunking);
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
