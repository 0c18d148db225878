/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	cancel.c 3
 * SUMMARY
 *	withdrawing a submitted message by its tag
 * SYNOPSIS
 *	#include "smtpstate.h"
 *
 *	int	smtps_engine_cancel(e, tag)
 * DESCRIPTION
 *	A caller that no longer wants a message (an asyncio task cancelled
 *	while it awaited its result) withdraws it as far as SMTP allows,
 *	and no further: the message still ends in exactly one result.
 *
 *	Where it is decides what can be done. Waiting in a destination's
 *	queue (dest.c), it is taken out and failed at once ("not attempted:
 *	cancelled"), as if no address could be reached. Handed to a session
 *	but not begun, the same (session.c). In a transaction whose DATA or
 *	BDAT has not gone out, it is marked: its next reply fails the
 *	transaction, which RSET then clears on the server, so the other
 *	messages of the connection go on (dispatch.c). Once its data is on
 *	the way nothing short of closing the connection would stop it, which
 *	would make the message ahead of it (past its final dot, awaiting its
 *	reply) unknown: that is not done; the result comes as it will.
 *
 *	A message routed by MX is split into parts with the same tag, each
 *	withdrawn where it is; a part still waiting for its route's DNS
 *	answers is not found and goes on.
 * DIAGNOSTICS
 *	SMTPS_CANCEL_DONE, _PENDING, _TOO_LATE (the least withdrawn of its
 *	parts), SMTPS_ENOTFOUND, SMTPS_EINVAL for NULL, SMTPS_ESTATE when
 *	called from a state inside the loop (a session would be changed
 *	under its own dispatch).
 * SEE ALSO
 *	dest.c, session.c, dispatch.c, engine.c.
 *--*/

#include "engine_private.h"

/* cancel_worse - of two outcomes, the one that withdrew less */

static int cancel_worse(int a, int b)
{
    if (a == SMTPS_ENOTFOUND)
	return b;
    if (b == SMTPS_ENOTFOUND)
	return a;
    return a > b ? a : b;
}

/* smtps_engine_cancel - withdraw the message submitted with tag */

int     smtps_engine_cancel(struct smtps_engine *e, uint64_t tag)
{
    struct smtps_dest *d;
    struct smtps_conn *c, *next;
    int64_t now;
    size_t  i;
    int     rc = SMTPS_ENOTFOUND, one;

    if (e == NULL)
	return SMTPS_EINVAL;
    if (e->running)
	return SMTPS_ESTATE;
    now = smtps_clock_ms();
    /* In sessions first: a queue never holds a part a session holds. */
    for (c = e->conns; c != NULL; c = next) {
	next = c->next;				/* c may close below */
	if (c->phase != CONN_OPEN || c->s == NULL)
	    continue;
	one = smtps_session_cancel(c->s, tag);
	if (one == SMTPS_ENOTFOUND)
	    continue;
	rc = cancel_worse(rc, one);
	/* Its result may be ready, or the session may have more to do. */
	smtps_conn_update(c, now);
    }
    for (i = 0; i < e->nbuckets; i++)
	for (d = e->buckets[i]; d != NULL; d = d->hnext)
	    if (smtps_dest_cancel(d, tag))
		rc = cancel_worse(rc, SMTPS_CANCEL_DONE);
    return rc;
}
