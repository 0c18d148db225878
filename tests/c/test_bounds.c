/* SPDX-License-Identifier: MIT */
/* test_c_units: -Wl,--wrap=free -Wl,--wrap=realloc */
/*++
 * NAME
 *	test_bounds 1
 * SUMMARY
 *	secrets never reach freed memory; timeouts never overflow
 * SYNOPSIS
 *	test_bounds
 * DESCRIPTION
 *	secrets	Every free() and every realloc() that moves a block, from the
 *		library or this program, goes through a wrapper (the link
 *		flags above: test_c_units.py reads them) that looks in the
 *		block about to be given back for the AUTH PLAIN response and
 *		the password. A session authenticates, the driver takes the
 *		AUTH line, and then a large body grows the output buffer: the
 *		old block, where the AUTH line was, must have been wiped. So
 *		must every other block, down to the session's end.
 *
 *	timeouts
 *		Timeouts of INT64_MAX and clock readings near INT64_MAX (and
 *		below zero): every deadline saturates, never wraps (signed
 *		overflow, which UBSan traps) and never turns negative (which
 *		would read as "no deadline"). The engine's timeouts likewise.
 * DIAGNOSTICS
 *	The exit status is 1 when any test fails, else 0.
 * SEE ALSO
 *	csrc/outbuf.c (the wipe), csrc/clock.c (the arithmetic).
 *--*/

#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "smtpstate.h"
#include "internal.h"

#define WHY_MAX 256

static char why[WHY_MAX];

/* What must never be found in a block given back. */
static char needle_b64[64];
static char needle_secret[64];
static int watching;
static int found;

void   *__real_realloc(void *p, size_t n);
void    __real_free(void *p);
void   *__wrap_realloc(void *p, size_t n);
void    __wrap_free(void *p);

/* holds_secret - the live block p contains a needle */

static int holds_secret(void *p)
{
    size_t  n, i, len;
    const char *b = p;
    const char *needles[2] = {needle_b64, needle_secret};
    int     k;

    if (!watching || p == NULL)
	return 0;
    n = malloc_usable_size(p);
    for (k = 0; k < 2; k++) {
	len = strlen(needles[k]);
	for (i = 0; len > 0 && i + len <= n; i++)
	    if (memcmp(b + i, needles[k], len) == 0)
		return 1;
    }
    return 0;
}

/* __wrap_free - look before the block goes back */

void    __wrap_free(void *p)
{
    if (holds_secret(p))
	found++;
    __real_free(p);
}

/* __wrap_realloc - a moved block goes back as it was */

void   *__wrap_realloc(void *p, size_t n)
{
    int     had = holds_secret(p);
    void   *q = __real_realloc(p, n);

    if (had && q != NULL && q != p)
	found++;
    return q;
}

/* take - the driver sends everything queued */

static size_t take(struct smtps_session *s, char *copy, size_t cap)
{
    const char *data;
    size_t  n, total = 0;

    while ((n = smtps_session_output(s, &data)) > 0) {
	if (copy != NULL && total + n < cap) {
	    memcpy(copy + total, data, n);
	    copy[total + n] = 0;
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

/* test_secrets - the AUTH response is wiped before its block is freed */

static int test_secrets(void)
{
    struct smtps_session *s;
    struct smtps_message *m;
    struct smtps_result *r;
    char    secret[601], payload[700], b64[1000], line[4096];
    char   *body;
    size_t  i, plen, blen = 200000;
    int     ok = 0;

    for (i = 0; i < sizeof(secret) - 1; i++)
	secret[i] = (char) ('a' + (i * 7) % 26);
    secret[sizeof(secret) - 1] = 0;
    plen = (size_t) snprintf(payload, sizeof(payload), "%cuser%c%s", 0, 0, secret);
    if (smtps_base64_encode((const unsigned char *) payload, plen, b64,
			    sizeof(b64)) == 0)
	return (snprintf(why, WHY_MAX, "base64"), 0);
    /* A stretch from the middle: what outlives a shorter line written over it. */
    memcpy(needle_b64, b64 + 400, 40);
    memcpy(needle_secret, secret + 300, 40);

    if ((s = smtps_session_new(NULL, "client.test", NULL)) == NULL
	|| smtps_session_set_auth(s, "user", secret, SMTPS_AUTH_PLAIN, 1) != 0)
	return (snprintf(why, WHY_MAX, "session"), 0);
    watching = 1;
    if (smtps_session_start(s, 1000) != SMTPS_OK)
	goto out;
    feed(s, "220 mx.test ESMTP\r\n");
    take(s, NULL, 0);
    feed(s, "250-mx.test\r\n250 AUTH PLAIN\r\n");
    take(s, line, sizeof(line));
    if (strstr(line, needle_b64) == NULL) {
	snprintf(why, WHY_MAX, "the AUTH line was not sent");
	goto out;
    }
    feed(s, "235 2.7.0 ok\r\n");

    /* A body far beyond the first buffer: it grows, and moves. */
    if ((body = malloc(blen)) == NULL || (m = smtps_message_new()) == NULL)
	goto out;
    memset(body, 'x', blen);
    for (i = 76; i < blen; i += 78)
	body[i] = '\n';
    if (smtps_message_set_sender(m, "a@b.test", 8) != 0
	|| smtps_message_add_recipient(m, "c@d.test", 8, 0, NULL, 0) != 0
	|| smtps_message_set_body(m, body, blen) != 0
	|| smtps_session_submit(s, m, 1, 1000) != SMTPS_OK) {
	snprintf(why, WHY_MAX, "submit");
	free(body);
	goto out;
    }
    free(body);
    take(s, NULL, 0);
    feed(s, "250 ok\r\n");
    take(s, NULL, 0);
    feed(s, "250 ok\r\n");
    take(s, NULL, 0);
    feed(s, "354 go\r\n");
    take(s, NULL, 0);
    feed(s, "250 queued\r\n");
    if ((r = smtps_session_next_result(s)) == NULL
	|| r->status != SMTPS_STATUS_DELIVERED) {
	snprintf(why, WHY_MAX, "the message was not delivered");
	smtps_result_free(r);
	goto out;
    }
    smtps_result_free(r);
    ok = 1;
out:
    smtps_session_free(s);
    watching = 0;
    if (ok && found > 0) {
	snprintf(why, WHY_MAX, "%d freed block(s) still held the AUTH secret", found);
	ok = 0;
    }
    return ok;
}

/* test_session_timeouts - deadlines saturate, whatever the times */

static int test_session_timeouts(void)
{
    struct smtps_session *s;
    int64_t near_end = INT64_MAX - 10, d;
    int     id, ok = 0;

    if ((s = smtps_session_new(NULL, "client.test", NULL)) == NULL)
	return (snprintf(why, WHY_MAX, "session"), 0);
    for (id = 0; id < SMTPS_STATE__COUNT; id++)
	if (smtps_session_set_timeout(s, id, INT64_MAX) != SMTPS_OK) {
	    snprintf(why, WHY_MAX, "set_timeout(INT64_MAX) refused");
	    goto out;
	}
    if (smtps_session_set_timeout(s, 0, -1) != SMTPS_EINVAL) {
	snprintf(why, WHY_MAX, "a negative timeout was taken");
	goto out;
    }
    if (smtps_session_start(s, near_end) != SMTPS_OK)
	goto out;
    d = smtps_session_deadline(s);
    if (d != INT64_MAX) {
	snprintf(why, WHY_MAX, "deadline %lld after start near the end of time",
		 (long long) d);
	goto out;
    }
    /* Not yet: the deadline is far away, not in the past. */
    if (smtps_session_tick(s, near_end + 5) != SMTPS_OK
	|| smtps_session_status(s) != SMTPS_SESS_ACTIVE) {
	snprintf(why, WHY_MAX, "a saturated deadline fired");
	goto out;
    }
    (void) smtps_session_feed(s, "220 hi\r\n", 8, -5000);	/* a clock below 0 */
    d = smtps_session_deadline(s);
    if (d < 0 || d > SMTPS_TIMEOUT_MAX) {
	snprintf(why, WHY_MAX, "deadline %lld from a negative clock", (long long) d);
	goto out;
    }
    ok = 1;
out:
    smtps_session_free(s);
    return ok;
}

/* test_engine_timeouts - the engine's own deadlines saturate too */

static int test_engine_timeouts(void)
{
    struct smtps_engine_config cfg;
    struct smtps_destination dest;
    struct smtps_engine *e;
    struct smtps_message *m;
    int     ok = 0;

    memset(&cfg, 0, sizeof(cfg));
    cfg.sizeof_config = sizeof(cfg);
    cfg.idle_timeout_ms = INT64_MAX;
    cfg.connect_timeout_ms = INT64_MAX;
    if ((e = smtps_engine_new(NULL, &cfg, NULL)) == NULL)
	return (snprintf(why, WHY_MAX, "engine"), 0);
    /* Nothing pending: returns at once, its end computed without overflow. */
    if (smtps_engine_run(e, INT64_MAX) != 0) {
	snprintf(why, WHY_MAX, "run with INT64_MAX");
	goto out;
    }
    memset(&dest, 0, sizeof(dest));
    dest.sizeof_destination = sizeof(dest);
    dest.host = "127.0.0.1";
    dest.port = 9;				/* discard: nobody listens */
    dest.timeout_ms = INT64_MAX;
    if ((m = smtps_message_new()) == NULL
	|| smtps_message_set_sender(m, "a@b.test", 8) != 0
	|| smtps_message_add_recipient(m, "c@d.test", 8, 0, NULL, 0) != 0
	|| smtps_engine_submit(e, m, &dest, 1) != SMTPS_OK) {
	smtps_message_free(m);
	snprintf(why, WHY_MAX, "submit");
	goto out;
    }
    /* Connection refused at once: a result, no wrapped deadline on the way. */
    while (smtps_engine_pending(e) > 0) {
	struct smtps_result *r;

	if (smtps_engine_run(e, 5000) < 0)
	    break;
	while ((r = smtps_engine_next_result(e)) != NULL)
	    smtps_result_free(r);
    }
    ok = smtps_engine_pending(e) == 0;
    if (!ok)
	snprintf(why, WHY_MAX, "no result for the refused connection");
out:
    smtps_engine_free(e);
    return ok;
}

int     main(void)
{
    static const struct {
	const char *label;
	int     (*fn) (void);
    }       tests[] = {
	{"secrets: a grown buffer leaves no AUTH line behind", test_secrets},
	{"timeouts: session deadlines saturate", test_session_timeouts},
	{"timeouts: engine deadlines saturate", test_engine_timeouts},
    };
    size_t  i;
    int     passed = 0, failed = 0;

    setvbuf(stdout, NULL, _IOLBF, 0);
    for (i = 0; i < sizeof(tests) / sizeof(tests[0]); i++) {
	printf("RUN %s\n", tests[i].label);
	why[0] = 0;
	if (tests[i].fn()) {
	    printf("PASS %s\n", tests[i].label);
	    passed++;
	} else {
	    printf("FAIL %s: %s\n", tests[i].label, why[0] ? why : "(no reason)");
	    failed++;
	}
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
