/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	test_lmtp 1
 * SUMMARY
 *	LMTP sessions never run ahead of a final dot
 * SYNOPSIS
 *	test_lmtp
 * DESCRIPTION
 *	The engine lets a session start the next message behind a final
 *	dot (smtps_session_set_runahead(), internal to the library, so
 *	tested here in C rather than from Python). Under LMTP the dot is
 *	owed one reply per accepted recipient, and the session must wait
 *	for all of them before the next MAIL.
 *
 *	smtp_runs_ahead
 *		The control: the same script under SMTP puts the second
 *		message's MAIL, RCPT and DATA in the write that carries the
 *		first one's dot, so the cases below would see it if LMTP
 *		ran ahead too.
 *	lmtp_waits
 *		Under LMTP, with run-ahead asked for before or after the
 *		protocol is set, nothing follows the dot until the last of
 *		the three recipients' replies; then the second message
 *		starts, and both get their results (partial, delivered).
 *	lmtp_queue_fed_waits
 *		The same with a feeder that hands out the second message
 *		only when asked, as the engine's destination queue does: it
 *		is never asked, and the session rests IDLE after the last
 *		reply, where the engine submits the next message itself.
 * DIAGNOSTICS
 *	The exit status is 1 when any test fails, else 0.
 * SEE ALSO
 *	csrc/dispatch.c (smtps_dispatch_run_ahead()), csrc/states.c (BODY).
 *--*/

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "smtpstate.h"
#include "internal.h"

#define WHY_MAX 256
#define OUT_MAX 4096

static char why[WHY_MAX];
static int feeder_calls;

/* take - the driver sends everything queued; a copy in out */

static size_t take(struct smtps_session *s, char *out, size_t cap)
{
    const char *data;
    size_t  n, total = 0;

    out[0] = 0;
    while ((n = smtps_session_output(s, &data)) > 0) {
	if (total + n < cap) {
	    memcpy(out + total, data, n);
	    out[total + n] = 0;
	}
	total += n;
	smtps_session_consume(s, n, 1000);
    }
    return total;
}

/* feed - the server says text */

static void feed(struct smtps_session *s, const char *text)
{
    (void) smtps_session_feed(s, text, strlen(text), 1000);
}

/* message - a message from a@b.test to n recipients */

static struct smtps_message *message(int n)
{
    struct smtps_message *m = smtps_message_new();
    char    rcpt[32];
    int     i;

    if (m == NULL || smtps_message_set_sender(m, "a@b.test", 8) != 0
	|| smtps_message_set_body(m, "hi\r\n", 4) != 0) {
	smtps_message_free(m);
	return NULL;
    }
    for (i = 0; i < n; i++) {
	snprintf(rcpt, sizeof(rcpt), "r%d@d.test", i);
	if (smtps_message_add_recipient(m, rcpt, strlen(rcpt), 0, NULL, 0) != 0) {
	    smtps_message_free(m);
	    return NULL;
	}
    }
    return m;
}

/* feeder - the engine's queue: one more message, once */

static struct smtps_message *feeder(struct smtps_session *s, void *closure)
{
    struct smtps_message **next = closure;
    struct smtps_message *m = *next;

    (void) s;
    feeder_calls++;
    *next = NULL;
    return m;
}

/*
 * script - greet, send the first message (three recipients) up to its
 * dot; out gets the write that carries the dot. protocol and the order of
 * the two set-up calls vary; fed: the second message comes from the
 * feeder rather than the queue.
 */

static struct smtps_session *script(int protocol, int runahead_first,
				            int fed, struct smtps_message **spare,
				            char *out, size_t cap)
{
    struct smtps_session *s = smtps_session_new(NULL, "client.test", NULL);
    struct smtps_message *m1 = message(3), *m2 = message(1);

    if (s == NULL || m1 == NULL || m2 == NULL)
	goto fail;
    if (runahead_first)
	smtps_session_set_runahead(s, fed ? feeder : NULL, spare);
    if (smtps_session_set_protocol(s, protocol) != SMTPS_OK)
	goto fail;
    if (!runahead_first)
	smtps_session_set_runahead(s, fed ? feeder : NULL, spare);
    if (smtps_session_submit(s, m1, 1, 1000) != SMTPS_OK)
	goto fail;
    m1 = NULL;
    if (fed) {
	/* The feeder's message carries a result made for it, as the engine's. */
	struct smtps_result *r = smtps_result_new(2, 1);

	if (r == NULL)
	    goto fail;
	m2->tag = 2;
	m2->qresult = r;
	*spare = m2;
    } else if (smtps_session_submit(s, m2, 2, 1000) != SMTPS_OK) {
	goto fail;
    }
    m2 = NULL;
    if (smtps_session_start(s, 1000) != SMTPS_OK)
	goto fail;
    feed(s, protocol == SMTPS_PROTO_LMTP ? "220 lmtp.test LMTP\r\n" :
	 "220 mx.test ESMTP\r\n");
    take(s, out, cap);
    feed(s, "250-server.test\r\n250 PIPELINING\r\n");
    take(s, out, cap);
    feed(s, "250 ok\r\n250 ok\r\n550 no\r\n250 ok\r\n354 go\r\n");
    take(s, out, cap);
    return s;

fail:
    snprintf(why, WHY_MAX, "could not set the session up");
    smtps_message_free(m1);
    smtps_message_free(m2);
    smtps_session_free(s);
    return NULL;
}

/* result_is - the next result has this tag and status */

static int result_is(struct smtps_session *s, uint64_t tag, int status)
{
    struct smtps_result *r = smtps_session_next_result(s);
    int     ok = r != NULL && r->tag == tag && r->status == status;

    if (!ok)
	snprintf(why, WHY_MAX, "result %llu: got %s, status %d; wanted %d",
		 (unsigned long long) tag, r == NULL ? "none" : "one",
		 r == NULL ? 0 : r->status, status);
    smtps_result_free(r);
    return ok;
}

/* test_smtp_runs_ahead - the control: SMTP's next MAIL rides with the dot */

static int test_smtp_runs_ahead(void)
{
    struct smtps_message *spare = NULL;
    struct smtps_session *s;
    char    out[OUT_MAX];
    int     ok = 0;

    if ((s = script(SMTPS_PROTO_SMTP, 0, 0, &spare, out, sizeof(out))) == NULL)
	return 0;
    if (strstr(out, "hi\r\n.\r\nMAIL FROM:<a@b.test>") == NULL) {
	snprintf(why, WHY_MAX, "SMTP did not run ahead: \"%.100s\"", out);
	goto out;
    }
    feed(s, "250 queued\r\n");
    ok = result_is(s, 1, SMTPS_STATUS_PARTIAL);
out:
    smtps_session_free(s);
    return ok;
}

/* lmtp_waits - the LMTP script, run-ahead asked for as runahead_first says */

static int lmtp_waits(int runahead_first, int fed)
{
    struct smtps_message *spare = NULL;
    struct smtps_session *s;
    char    out[OUT_MAX];
    int     ok = 0;

    feeder_calls = 0;
    if ((s = script(SMTPS_PROTO_LMTP, runahead_first, fed, &spare, out,
		    sizeof(out))) == NULL)
	return 0;
    if (strcmp(out, "hi\r\n.\r\n") != 0) {
	snprintf(why, WHY_MAX, "the dot's write was \"%.100s\"", out);
	goto out;
    }
    feed(s, "250 r0\r\n");
    take(s, out, sizeof(out));
    if (out[0] != 0 || smtps_session_next_result(s) != NULL) {
	snprintf(why, WHY_MAX, "moved after one reply of two: \"%.100s\"", out);
	goto out;
    }
    if (feeder_calls != 0) {
	snprintf(why, WHY_MAX, "the feeder was asked %d time(s) while "
		 "replies were owed", feeder_calls);
	goto out;
    }
    feed(s, "452 r2 later\r\n");
    take(s, out, sizeof(out));
    if (fed) {
	if (out[0] != 0 || feeder_calls != 0
	    || smtps_session_status(s) != SMTPS_SESS_IDLE) {
	    snprintf(why, WHY_MAX, "fed: after the last reply, \"%.60s\", "
		     "%d feeder call(s), status %d", out, feeder_calls,
		     smtps_session_status(s));
	    goto out;
	}
	if (smtps_session_submit_prepared(s, spare, 1000) != SMTPS_OK) {
	    snprintf(why, WHY_MAX, "fed: submit");
	    goto out;
	}
	spare = NULL;
	take(s, out, sizeof(out));
    }
    if (strcmp(out, "MAIL FROM:<a@b.test>\r\nRCPT TO:<r0@d.test>\r\n"
	       "DATA\r\n") != 0) {
	snprintf(why, WHY_MAX, "after the last reply: \"%.100s\"", out);
	goto out;
    }
    if (!result_is(s, 1, SMTPS_STATUS_PARTIAL))
	goto out;
    feed(s, "250 ok\r\n250 ok\r\n354 go\r\n");
    take(s, out, sizeof(out));
    feed(s, "250 r0 delivered\r\n");
    ok = result_is(s, 2, SMTPS_STATUS_DELIVERED);
out:
    smtps_session_free(s);
    if (spare != NULL) {
	smtps_result_free(spare->qresult);
	smtps_message_free(spare);
    }
    return ok;
}

static int test_lmtp_waits(void)
{
    return lmtp_waits(0, 0) && lmtp_waits(1, 0);
}

static int test_lmtp_queue_fed_waits(void)
{
    return lmtp_waits(0, 1) && lmtp_waits(1, 1);
}

int     main(void)
{
    static const struct {
	const char *label;
	int     (*fn) (void);
    } tests[] = {
	{"smtp_runs_ahead", test_smtp_runs_ahead},
	{"lmtp_waits", test_lmtp_waits},
	{"lmtp_queue_fed_waits", test_lmtp_queue_fed_waits},
    };
    size_t  i;
    int     failed = 0;

    for (i = 0; i < sizeof(tests) / sizeof(tests[0]); i++) {
	why[0] = 0;
	printf("RUN %s\n", tests[i].label);
	if (tests[i].fn()) {
	    printf("PASS %s\n", tests[i].label);
	} else {
	    printf("FAIL %s: %s\n", tests[i].label, why[0] ? why : "(no reason)");
	    failed = 1;
	}
    }
    return failed;
}
