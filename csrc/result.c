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
 *	A result is made when a transaction starts, filled as replies come
 *	in, and handed to the driver exactly once. Every string in it is
 *	owned by it and never NULL, so readers need no checks.
 *--*/

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
    for (i = 0; i < nrcpt; i++)
	r->rcpt[i].reply.text = empty_text;
    return r;
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
    reply_clear(&r->reply);
    if (r->reason != empty_text)
	free(r->reason);
    free(r);
}
