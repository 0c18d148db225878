/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	result.c 3
 * SUMMARY
 *	what became of one message
 * SYNOPSIS
 *	#include "smtpstate.h"
 *
 *	void	smtps_result_free(r)
 * DESCRIPTION
 *	A result is made when a message is submitted, filled as replies come
 *	in, and handed to the driver exactly once. Every string in it is
 *	owned by it and never NULL, so readers need no checks.
 *
 *	smtps_result_settle() is where statuses become final, for every
 *	path a message can end by (its transaction, a connection that
 *	failed before it began, an engine that never reached a server):
 *
 *	a recipient refused at RCPT keeps that verdict; one accepted takes
 *	the message's verdict (delivered, tempfail, permfail, unknown), or
 *	NOT_SENT when a state ended the transaction before the data by a
 *	decision of its own, or with no verdict at all (as an address check
 *	does); one never answered takes a failed message's status and the
 *	reply that failed it, else NOT_SENT. Under LMTP a recipient settled
 *	by its own reply to the end of data keeps that status too
 *	(transaction.c), whatever the message's verdict. The message is
 *	DELIVERED when every recipient was, PARTIAL when some were, else its
 *	verdict (PERMFAIL without one): so an LMTP message with recipients
 *	delivered and others unknown (the connection died between their
 *	replies) is PARTIAL, and its recipients say which are which.
 *--*/

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static char empty_text[1];

/* reply_clear - free a reply's text */

static void reply_clear(struct smtps_result_reply *r)
{
    if (r->text != empty_text)
	free(r->text);
    r->text = empty_text;
}

/* smtps_result_new - a result with nrcpt pending recipients */

struct smtps_result *smtps_result_new(uint64_t tag, size_t nrcpt)
{
    struct smtps_result *r = calloc(1, sizeof(*r));
    size_t  i;

    if (r == NULL)
	return NULL;
    if (nrcpt && (r->rcpt = calloc(nrcpt, sizeof(*r->rcpt))) == NULL) {
	free(r);
	return NULL;
    }
    r->tag = tag;
    r->nrcpt = nrcpt;
    r->status = SMTPS_STATUS_TEMPFAIL;
    r->state = -1;
    r->stage = SMTPS_STAGE_NOT_CONNECTED;
    strcpy(r->stage_name, smtps_stage_name(r->stage));
    r->reply.text = empty_text;
    r->reason = empty_text;
    for (i = 0; i < nrcpt; i++) {
	r->rcpt[i].reply.text = empty_text;
	r->rcpt[i].route = -1;
    }
    return r;
}

/*
 * smtps_result_add_route - a place recipients went (or were last tried):
 * its index in r->route, -1 when out of memory (the result itself is
 * never lost for it); the caller marks its recipients
 */

int     smtps_result_add_route(struct smtps_result *r, const char *mx,
			               const char *ip)
{
    struct smtps_result_route *grown, *rt;

    if ((grown = realloc(r->route, (r->nroute + 1) * sizeof(*grown))) == NULL)
	return -1;
    r->route = grown;
    rt = &r->route[r->nroute];
    snprintf(rt->mx, sizeof(rt->mx), "%s", mx ? mx : "");
    snprintf(rt->ip, sizeof(rt->ip), "%s", ip ? ip : "");
    return (int) r->nroute++;
}

/* smtps_result_set_reply - copy a parsed reply into a result */

void smtps_result_set_reply(struct smtps_result_reply *dst,
			    const struct smtps_reply *reply)
{
    char   *text;

    reply_clear(dst);
    dst->code = 0;
    dst->enhanced[0] = 0;
    if (reply == NULL)
	return;
    dst->code = reply->code;
    memcpy(dst->enhanced, reply->enhanced, sizeof(dst->enhanced));
    dst->enhanced[sizeof(dst->enhanced) - 1] = 0;
    /* Out of memory loses the text, never the result. */
    if ((text = smtps_strndup(reply->text, reply->text_len)) != NULL)
	dst->text = text;
}

/* smtps_result_copy_reply - copy one result reply into another */

void    smtps_result_copy_reply(struct smtps_result_reply *dst,
				        const struct smtps_result_reply *src)
{
    struct smtps_reply r;

    if (src->code == 0) {
	smtps_result_set_reply(dst, NULL);
	return;
    }
    memset(&r, 0, sizeof(r));
    r.code = src->code;
    memcpy(r.enhanced, src->enhanced, sizeof(r.enhanced));
    r.text = src->text;
    r.text_len = strlen(src->text);
    smtps_result_set_reply(dst, &r);
}

/*
 * rcpt_final - recipient i's final status from the message's verdict;
 * shared: whether a recipient the server accepted shares it
 */

static void rcpt_final(struct smtps_result *r, size_t i, int verdict,
		               int shared)
{
    struct smtps_result_rcpt *rc = &r->rcpt[i];
    int     failed = verdict == SMTPS_STATUS_TEMPFAIL
	|| verdict == SMTPS_STATUS_PERMFAIL;

    switch (rc->status) {
    case SMTPS_RCPT_ACCEPTED:
	/* The server took the address: the message's fate is its fate. */
	rc->status = verdict != 0 && shared ? verdict : SMTPS_STATUS_NOT_SENT;
	break;
    case SMTPS_RCPT_PENDING:
	/*
	 * Never answered: a failure of the whole message (MAIL refused, a
	 * 421, a lost connection) is its failure too, with the reply that
	 * said so; otherwise the message simply never went to it.
	 */
	if (failed) {
	    rc->status = verdict;
	    smtps_result_copy_reply(&rc->reply, &r->reply);
	} else
	    rc->status = SMTPS_STATUS_NOT_SENT;
	break;
    default:
	/* Refused at RCPT, or settled by its own LMTP reply: final. */
	break;
    }
}

/*
 * smtps_result_settle - every status final, from verdict (SMTPS_STATUS_*,
 * or 0 when the transaction ended without one): the recipients', then
 * the message's from them. shared is 0 when a state ended the transaction
 * by a decision of its own before the data (an address check): the
 * recipients the server accepted were then simply not sent the message.
 */

void    smtps_result_settle(struct smtps_result *r, int verdict, int shared)
{
    size_t  i, delivered = 0;

    for (i = 0; i < r->nrcpt; i++) {
	rcpt_final(r, i, verdict, shared);
	delivered += r->rcpt[i].status == SMTPS_STATUS_DELIVERED;
    }
    /* From the recipients first: under LMTP, any verdict may have them. */
    if (verdict != SMTPS_STATUS_DELIVERED && delivered == 0)
	r->status = verdict != 0 ? verdict : SMTPS_STATUS_PERMFAIL;
    else if (delivered == r->nrcpt)
	r->status = SMTPS_STATUS_DELIVERED;
    else if (delivered > 0)
	r->status = SMTPS_STATUS_PARTIAL;
    else {
	/* A machine of the caller's took it past RCPT without recipients. */
	r->status = SMTPS_STATUS_PERMFAIL;
	if (r->reason[0] == 0)
	    (void) smtps_result_set_reason(r, "the server took the message, "
					   "but none of its recipients");
    }
}

/* smtps_result_set_reason - say why, when no reply says it */

int smtps_result_set_reason(struct smtps_result *r, const char *text)
{
    char   *copy;

    if ((copy = smtps_strndup(text, strlen(text))) == NULL)
	return SMTPS_ENOMEM;
    if (r->reason != empty_text)
	free(r->reason);
    r->reason = copy;
    return SMTPS_OK;
}

/* smtps_result_free - release a result handed out by a session */

void    smtps_result_free(struct smtps_result *r)
{
    size_t  i;

    if (r == NULL)
	return;
    for (i = 0; i < r->nrcpt; i++)
	reply_clear(&r->rcpt[i].reply);
    free(r->rcpt);
    free(r->route);
    reply_clear(&r->reply);
    if (r->reason != empty_text)
	free(r->reason);
    free(r);
}
