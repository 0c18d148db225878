/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	trace.c 3
 * SUMMARY
 *	a session's transcript, for drivers that log the dialogue
 * SYNOPSIS
 *	#include "smtpstate.h"
 *
 *	int	smtps_session_set_trace(s, fn, closure)
 *
 *	#include "session_private.h"
 *
 *	void	smtps_session_trace(s, kind, data, len)
 *	void	smtps_session_trace_reply(s, reply)
 * DESCRIPTION
 *	With a trace function set, every command line is traced as it is
 *	queued (outbuf.c), every reply line as it is parsed, the content once
 *	as given (transaction.c): plaintext, whatever TLS does on the wire.
 *	What AUTH queues is traced as "[credentials redacted]" (outbuf.c).
 *	Without one, nothing is copied or formatted for it.
 *--*/

#include <stdio.h>
#include <string.h>

#include "session_private.h"

/* smtps_session_trace - hand the transcript function one event */

void    smtps_session_trace(struct smtps_session *s, int kind,
			            const char *data, size_t len)
{
    if (s->trace != NULL)
	s->trace(s, kind, data, len, s->trace_closure);
}

/* smtps_session_trace_reply - one event per reply line, as the server wrote it */

void    smtps_session_trace_reply(struct smtps_session *s,
				          const struct smtps_reply *r)
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
