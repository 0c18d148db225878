/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	outbuf.c 3
 * SUMMARY
 *	a session's output: the bounded buffer and the command lines in it
 * SYNOPSIS
 *	#include "smtpstate.h"
 *
 *	int	smtps_session_send_line(s, line, len)
 *
 *	#include "session_private.h"
 *
 *	int	smtps_buf_reserve(b, need)
 *	int	smtps_session_queue_bytes(s, data, len)
 *	int	smtps_session_queue_secret(s, data, len)
 *	void	smtps_session_queue_run(s, owner, data, len)
 *	size_t	smtps_session_unsent(s)
 *	size_t	smtps_session_take(s, n)
 *	int	smtps_session_runs_of(s, owner)
 *	void	smtps_session_drop_output(s)
 *	void	smtps_session_wipe_output(s)
 *
 *	#include "internal.h"
 *
 *	void	smtps_session_set_gather(s, on)
 *	int	smtps_session_output_iov(s, iov, max)
 * DESCRIPTION
 *	What the states queue waits in one buffer until the driver takes it
 *	(or, with TLS, until tls.c encrypts it). The buffer never holds more
 *	than SMTPS_OUT_MAX bytes; the body pump stops at SMTPS_OUT_HIGH.
 *
 *	Runs. A driver that writes with writev() or sendmsg() says so
 *	(smtps_session_set_gather(), the engine does); then the body pump
 *	(transaction.c) leaves the parts of a body in memory that go to the
 *	wire unchanged where they are and queues them as runs
 *	(smtps_session_queue_run()): the output is the buffer's bytes with
 *	the runs between them, each run after the buffer bytes queued before
 *	it (its gap). At most SMTPS_SEG_MAX runs wait at once.
 *	smtps_session_output_iov() gives the output in that order, at most
 *	max pieces; smtps_session_output() its first piece;
 *	smtps_session_take() takes n bytes off its front, from buffer and
 *	runs alike. A run points into its message: the message is not freed
 *	while one of its runs waits (smtps_session_runs_of(), transaction.c).
 *	With TLS nothing changes: SSL_write() needs the bytes in one place,
 *	so the pump copies as before.
 *
 *	Command lines. smtps_session_send_line() refuses control bytes, so
 *	that nothing a state is given can inject a second command, and
 *	refuses any line while the server reads message data (after the 354,
 *	before the final dot), where it would become message text.
 *
 *	Secrets. What AUTH sends goes through smtps_session_queue_secret():
 *	the transcript gets "AUTH PLAIN [credentials redacted]", never the
 *	credentials. Every block the buffer leaves behind is wiped first:
 *	when it grows (realloc would free the old block with a token still
 *	in it) and when the session ends.
 * DIAGNOSTICS
 *	SMTPS_ETOOBIG past SMTPS_OUT_MAX or SMTPS_LINE_MAX, SMTPS_ENOMEM,
 *	SMTPS_EINVAL for a control byte, SMTPS_ESTATE out of turn.
 *--*/

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

#include "session_private.h"

/* smtps_buf_reserve - room for need more bytes, within SMTPS_OUT_MAX */

int     smtps_buf_reserve(struct smtps_buf *b, size_t need)
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

    /*
     * Not realloc(): it may free the old block as it is, and what it held
     * (an AUTH response) would stay readable in freed memory. Growth is
     * rare; the copy and the wipe cost nothing that matters.
     */
    if ((p = malloc(cap)) == NULL)
	return SMTPS_ENOMEM;
    if (b->data != NULL) {
	memcpy(p, b->data, used);
	smtps_wipe(b->data, b->cap);
	free(b->data);
    }
    b->data = p;
    b->cap = cap;
    return SMTPS_OK;
}

/* smtps_session_queue_bytes - append bytes to the output */

int     smtps_session_queue_bytes(struct smtps_session *s, const char *data,
				          size_t len)
{
    int     rc;

    if ((rc = smtps_buf_reserve(&s->out, len)) != SMTPS_OK)
	return rc;
    memcpy(s->out.data + s->out.end, data, len);
    s->out.end += len;
    s->out_produced += len;
    return SMTPS_OK;
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
    if (s->tx != NULL && smtps_tx_in_data(s, s->tx))
	return SMTPS_ESTATE;		/* it would become message text */
    for (i = 0; i < len; i++)
	if ((unsigned char) line[i] < 0x20 || line[i] == 0x7f)
	    return SMTPS_EINVAL;		/* no injected commands */
    if ((rc = smtps_buf_reserve(&s->out, len + 2)) != SMTPS_OK)
	return rc;
    memcpy(s->out.data + s->out.end, line, len);
    memcpy(s->out.data + s->out.end + len, "\r\n", 2);
    s->out.end += len + 2;
    s->out_produced += len + 2;
    smtps_session_trace(s, SMTPS_TRACE_SENT, line, len);
    return SMTPS_OK;
}

/*
 * smtps_session_queue_secret - queue bytes as they are (an AUTH command
 * or response, CRLF included), showing the transcript only the command
 * and mechanism ("AUTH PLAIN [credentials redacted]")
 */

int     smtps_session_queue_secret(struct smtps_session *s, const char *data,
				           size_t len)
{
    static const char redacted[] = "[credentials redacted]";
    char    line[64];
    size_t  n, words;
    int     rc;

    if (s->status != SMTPS_SESS_ACTIVE)
	return SMTPS_ESTATE;
    if ((rc = smtps_session_queue_bytes(s, data, len)) != SMTPS_OK
	|| s->trace == NULL)
	return rc;
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

/* smtps_session_set_gather - the driver takes output as iovecs */

void    smtps_session_set_gather(struct smtps_session *s, int on)
{
    /* Runs already queued stay valid either way: output() serves them. */
    if (s != NULL)
	s->gather = (on != 0);
}

/* smtps_session_queue_run - len bytes of owner's body, not copied */

void    smtps_session_queue_run(struct smtps_session *s,
				        const struct smtps_message *owner,
				        const char *data, size_t len)
{
    struct smtps_seg *g;
    size_t  buffered = s->out.end - s->out.start;

    /* The pump checks nseg first: a full ring is a broken invariant. */
    if (s->nseg >= SMTPS_SEG_MAX || len == 0)
	abort();
    g = &s->segs[(s->seg_head + s->nseg) % SMTPS_SEG_MAX];
    g->data = data;
    g->len = len;
    g->gap = buffered - s->seg_gaps;	/* queued since the last run */
    g->owner = owner;
    s->nseg++;
    s->seg_gaps += g->gap;
    s->seg_bytes += len;
    s->out_produced += len;
}

/* smtps_session_unsent - bytes queued and not taken (not under TLS) */

size_t  smtps_session_unsent(const struct smtps_session *s)
{
    return s->out.end - s->out.start + s->seg_bytes;
}

/*
 * smtps_session_take - the driver sent the first n bytes: off the buffer
 * and the runs in output order; returns how many there were (<= n)
 */

size_t  smtps_session_take(struct smtps_session *s, size_t n)
{
    size_t  left = n, t;
    struct smtps_seg *g;

    while (left > 0 && s->nseg > 0) {
	g = &s->segs[s->seg_head];
	if (g->gap > 0) {			/* buffer bytes before the run */
	    t = left < g->gap ? left : g->gap;
	    s->out.start += t;
	    g->gap -= t;
	    s->seg_gaps -= t;
	} else {
	    t = left < g->len ? left : g->len;
	    g->data += t;
	    g->len -= t;
	    s->seg_bytes -= t;
	    if (g->len == 0) {
		s->seg_head = (s->seg_head + 1) % SMTPS_SEG_MAX;
		s->nseg--;
	    }
	}
	left -= t;
    }
    if (s->nseg == 0)
	s->seg_head = 0;
    t = s->out.end - s->out.start;		/* after the last run */
    if (t > left)
	t = left;
    s->out.start += t;
    left -= t;
    if (s->out.start == s->out.end)
	s->out.start = s->out.end = 0;
    return n - left;
}

/* smtps_session_runs_of - does a run of owner's body still wait */

int     smtps_session_runs_of(const struct smtps_session *s,
			              const struct smtps_message *owner)
{
    int     i;

    for (i = 0; i < s->nseg; i++)
	if (s->segs[(s->seg_head + i) % SMTPS_SEG_MAX].owner == owner)
	    return 1;
    return 0;
}

/*
 * smtps_session_output_iov - the output as at most max pieces, in order:
 * how many were filled (0: nothing to send). With TLS, the ciphertext.
 */

int     smtps_session_output_iov(struct smtps_session *s, struct iovec *iov,
				         int max)
{
    const char *data;
    const char *buf;
    size_t  n, rest;
    int     i, k = 0;
    const struct smtps_seg *g;

    if (s == NULL || iov == NULL || max <= 0)
	return 0;
    if (s->nseg == 0 || smtps_tls_engaged(s)) {
	if ((n = smtps_session_output(s, &data)) == 0)
	    return 0;
	iov[0].iov_base = (void *) data;
	iov[0].iov_len = n;
	return 1;
    }
    buf = s->out.data != NULL ? s->out.data + s->out.start : NULL;
    rest = s->out.end - s->out.start;
    for (i = 0; i < s->nseg && k < max; i++) {
	g = &s->segs[(s->seg_head + i) % SMTPS_SEG_MAX];
	if (g->gap > 0) {
	    iov[k].iov_base = (void *) buf;
	    iov[k].iov_len = g->gap;
	    buf += g->gap;
	    rest -= g->gap;
	    if (++k == max)
		break;
	}
	iov[k].iov_base = (void *) g->data;
	iov[k].iov_len = g->len;
	k++;
    }
    if (i == s->nseg && k < max && rest > 0) {	/* after the last run */
	iov[k].iov_base = (void *) buf;
	iov[k].iov_len = rest;
	k++;
    }
    return k;
}

/* smtps_session_drop_output - send nothing more of what is queued */

void    smtps_session_drop_output(struct smtps_session *s)
{
    s->nseg = s->seg_head = 0;
    s->seg_bytes = s->seg_gaps = 0;
    s->out.start = s->out.end = 0;
    if (s->tx != NULL)
	s->tx->body_active = 0;
    if (s->prev != NULL)
	s->prev->body_active = 0;
    smtps_tls_discard(s);
}

/* smtps_session_wipe_output - clear the buffer where credentials passed */

void    smtps_session_wipe_output(struct smtps_session *s)
{
    if (s->cred != NULL && s->out.data != NULL)
	smtps_wipe(s->out.data, s->out.cap);
}
