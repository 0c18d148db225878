/* SPDX-License-Identifier: MIT */
/* The man-page header nests comment openers on purpose (Postfix style). */
#pragma GCC diagnostic ignored "-Wcomment"
/*++
/* NAME
/*	test_gather 1
/* SUMMARY
/*	the body sent from the message's memory: the same bytes on the wire
/* SYNOPSIS
/*	test_gather
/* DESCRIPTION
/*	smtps_body_step() against smtps_body_encode(): random bodies (text
/*	lines, bare CR and LF, CR LF split anywhere, dots at line starts,
/*	long runs), fed in random pieces, with random room for the added
/*	bytes and random limits, must give, step after step, exactly the
/*	bytes of one smtps_body_encode() call, and never more than the
/*	limit in one step.
/*
/*	Then whole sessions: the same message is sent by a session whose
/*	driver takes its output as one buffer (smtps_session_output()) and
/*	by one that takes iovecs (smtps_session_set_gather(),
/*	smtps_session_output_iov()) and writes only part of them each time,
/*	at random (one byte, or any prefix of any number of pieces). Both
/*	must put the same bytes on the wire, from the greeting's answer to
/*	QUIT, by DATA and by BDAT, and deliver the message. A connection
/*	lost halfway through a body sent from the message's memory must
/*	drop the rest and free nothing twice (AddressSanitizer watches).
/*
/*	smtps_body_inspect(), which measures the usual body instead of
/*	scanning it, must agree with smtps_body_scan() (problem, size,
/*	8-bit) on random bodies of every kind, with pairs cut at every
/*	16-byte block edge.
/*
/*	Prints "RUN label", then "PASS label" or "FAIL label: why", and
/*	finally "N passed, N failed".
/* DIAGNOSTICS
/*	Exit status 0 when every test passed, 1 otherwise.
/* SEE ALSO
/*	csrc/body.c, csrc/outbuf.c, csrc/transaction.c.
/*--*/

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

#include "smtpstate.h"
#include "internal.h"

#define WHY_MAX 512

static char why[WHY_MAX];
static int most_pieces;			/* the most one output_iov() gave */

struct sink {
    char   *buf;
    size_t  len, cap;
};

static void *xmalloc(size_t);
static void sink_put(struct sink *, const char *, size_t);
static uint64_t rnd_next(uint64_t *);
static char *random_body(uint64_t *, size_t, int, unsigned);
static int first_diff(const struct sink *, const struct sink *);
static int test_step_random(void);
static int test_step_limit(void);
static int run_session(const char *, size_t, int, int, uint64_t *,
		               struct sink *);
static int test_sessions(void);
static int test_lost_midway(void);
static int test_inspect(void);

/* xmalloc - malloc or die: a test has nothing better to do */

static void *xmalloc(size_t n)
{
    void   *p = malloc(n ? n : 1);

    if (p == NULL) {
	fprintf(stderr, "out of memory\n");
	exit(2);
    }
    return p;
}

/* sink_put - append bytes */

static void sink_put(struct sink *s, const char *data, size_t len)
{
    if (s->len + len > s->cap) {
	size_t  cap = s->cap ? s->cap : 4096;
	char   *p;

	while (cap < s->len + len)
	    cap *= 2;
	p = xmalloc(cap);
	if (s->len)
	    memcpy(p, s->buf, s->len);
	free(s->buf);
	s->buf = p;
	s->cap = cap;
    }
    if (len)
	memcpy(s->buf + s->len, data, len);
    s->len += len;
}

/* rnd_next - xorshift64*: the same bodies and splits on every run */

static uint64_t rnd_next(uint64_t *x)
{
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    return *x * UINT64_C(2685821657736338717);
}

/*
 * random_body - len bytes: text lines, crlf in 1000 of them ended by CR
 * LF, the others by a bare LF or CR, some starting with a dot; clean (a
 * body smtps_message_set_body() takes: no NUL, no line over 998) when
 * asked, which the session tests need
 */

static char *random_body(uint64_t *rnd, size_t len, int clean,
			         unsigned crlf)
{
    char   *b = xmalloc(len);
    size_t  i = 0, line = 0;

    while (i < len) {
	unsigned r = (unsigned) (rnd_next(rnd) % 1000);
	char    c;

	if (line > 0 && (r < 15 || (clean && line >= 900))) {
	    /* A line ending: CR LF mostly, else bare LF, bare CR, or CR CR LF. */
	    unsigned k = (unsigned) (rnd_next(rnd) % 1000);

	    if (k < crlf && i + 1 < len) {
		b[i++] = '\r';
		b[i++] = '\n';
	    } else
		b[i++] = k % 3 ? '\n' : '\r';
	    line = 0;
	    if (i < len && rnd_next(rnd) % 6 == 0)
		b[i++] = '.', line++;		/* a dot at a line start */
	    continue;
	}
	c = (char) ('a' + r % 26);
	if (r % 97 == 0)
	    c = '.';
	else if (!clean && r % 331 == 0)
	    c = '\0';
	b[i++] = c;
	line++;
    }
    return b;
}

/* first_diff - 1 when equal; else say where they differ */

static int first_diff(const struct sink *a, const struct sink *b)
{
    size_t  i, n = a->len < b->len ? a->len : b->len;

    for (i = 0; i < n && a->buf[i] == b->buf[i]; i++)
	 /* void */ ;
    if (i == n && a->len == b->len)
	return 1;
    snprintf(why, WHY_MAX, "lengths %zu and %zu, first difference at %zu",
	     a->len, b->len, i);
    return 0;
}

/*
 * test_step_random - smtps_body_step(), piece by piece, gives what one
 * smtps_body_encode() call gives, whatever the pieces and the room
 */

static int test_step_random(void)
{
    uint64_t rnd = UINT64_C(0x9e3779b97f4a7c15);
    struct sink want = {0, 0, 0}, got = {0, 0, 0};
    struct smtps_body_encoder e;
    char    out[64], *ref, *body;
    size_t  len, off, end, used, verbatim, n, cap, piece, limit, refcap;
    int     iter, stuff, ok = 1;

    for (iter = 0; ok && iter < 2000; iter++) {
	stuff = iter & 1;
	len = (size_t) (rnd_next(&rnd) % (iter < 1000 ? 64 : 6000));
	body = random_body(&rnd, len, 0, 700);
	refcap = 3 * len + SMTPS_BODY_FINISH_MAX;
	ref = xmalloc(refcap);
	smtps_body_init(&e, stuff);
	n = smtps_body_encode(&e, body, len, &used, ref, refcap);
	n += smtps_body_finish(&e, ref + n, refcap - n, stuff);
	want.len = got.len = 0;
	sink_put(&want, ref, n);

	smtps_body_init(&e, stuff);
	piece = 1 + (size_t) (rnd_next(&rnd) % 400);
	for (off = 0; ok && off < len; off = end) {
	    end = off + piece < len ? off + piece : len;
	    while (off < end) {
		cap = SMTPS_BODY_STEP_MAX + (size_t) (rnd_next(&rnd) % 8);
		limit = rnd_next(&rnd) % 4 ? SIZE_MAX
		    : SMTPS_BODY_STEP_MAX + (size_t) (rnd_next(&rnd) % 50);
		n = smtps_body_step(&e, body + off, end - off, &used, out,
				    cap, limit, &verbatim);
		if ((used == 0 && n == 0) || n > cap || n + verbatim > limit
		    || verbatim > used) {
		    snprintf(why, WHY_MAX, "iteration %d at %zu: step wrote "
			     "%zu, used %zu, verbatim %zu, room %zu, limit %zu",
			     iter, off, n, used, verbatim, cap, limit);
		    ok = 0;
		    break;
		}
		sink_put(&got, out, n);
		sink_put(&got, body + off + used - verbatim, verbatim);
		off += used;
	    }
	}
	if (ok) {
	    n = smtps_body_finish(&e, out, sizeof(out), stuff);
	    sink_put(&got, out, n);
	    if (!first_diff(&want, &got)) {
		size_t  w = strlen(why);

		snprintf(why + w, WHY_MAX - w, " (iteration %d)", iter);
		ok = 0;
	    } else if (e.out_total != got.len) {
		snprintf(why, WHY_MAX, "out_total %llu, %zu bytes",
			 (unsigned long long) e.out_total, got.len);
		ok = 0;
	    }
	}
	free(ref);
	free(body);
    }
    free(want.buf);
    free(got.buf);
    return ok;
}

/*
 * test_step_limit - the edges: a CR LF pair never split by the limit, a
 * stuffed dot whose second dot the limit holds back, a bare CR at the
 * end of the input, and the LF of a CR LF that comes in the next piece
 */

static int test_step_limit(void)
{
    static const struct {
	const char *in;
	int     stuff;
	size_t  limit;
	const char *out;			/* what the step wrote */
	size_t  used, verbatim;
    }       cases[] = {
	{"ab\r\ncd", 1, 3, "", 2, 2},		/* "ab" and not half a CR LF */
	{"ab\r\ncd", 1, 4, "", 4, 4},
	{".x", 1, 1, ".", 0, 0},		/* the first dot only */
	{".x", 1, 9, ".", 2, 2},
	{".x", 0, 9, "", 2, 2},			/* BDAT: no stuffing */
	{"ab\r", 1, 9, "", 2, 2},		/* the CR may be bare */
	{"\r", 1, 9, "\r\n", 1, 0},
	{"\n\n.a", 1, 9, "\r\n\r\n.", 4, 2},
	{"a\nb", 1, 9, "", 1, 1},
    };
    struct smtps_body_encoder e;
    char    out[16];
    size_t  i, n, used, verbatim;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
	smtps_body_init(&e, cases[i].stuff);
	n = smtps_body_step(&e, cases[i].in, strlen(cases[i].in), &used, out,
			    sizeof(out), cases[i].limit, &verbatim);
	if (n != strlen(cases[i].out) || memcmp(out, cases[i].out, n) != 0
	    || used != cases[i].used || verbatim != cases[i].verbatim) {
	    snprintf(why, WHY_MAX, "case %zu: wrote %zu, used %zu, verbatim "
		     "%zu", i, n, used, verbatim);
	    return 0;
	}
    }
    /* A CR at the end of one piece, its LF at the start of the next. */
    smtps_body_init(&e, 1);
    n = smtps_body_step(&e, "a\r", 2, &used, out, sizeof(out), SIZE_MAX,
			&verbatim);			/* "a" */
    n = smtps_body_step(&e, "\r", 1, &used, out, sizeof(out), SIZE_MAX,
			&verbatim);			/* CR LF */
    n = smtps_body_step(&e, "\n.b", 3, &used, out, sizeof(out), SIZE_MAX,
			&verbatim);			/* the LF is in it */
    if (n != 1 || out[0] != '.' || used != 3 || verbatim != 2) {
	snprintf(why, WHY_MAX, "split CR LF: wrote %zu, used %zu, verbatim "
		 "%zu", n, used, verbatim);
	return 0;
    }
    return 1;
}

/*
 * drain - the driver writes what the session has. gather 0: all of
 * smtps_session_output() each time. gather 1: smtps_session_output_iov()
 * with room for 1 to 64 pieces, and a write that takes one byte, all of
 * them, or a random part, as a socket would.
 */

static void drain(struct smtps_session *s, int gather, uint64_t *rnd,
		          struct sink *wire)
{
    struct iovec iov[64];
    const char *data;
    size_t  n, total, k, t;
    int     cnt, i, max;

    for (;;) {
	if (!gather) {
	    if ((n = smtps_session_output(s, &data)) == 0)
		return;
	    sink_put(wire, data, n);
	    smtps_session_consume(s, n, 1000);
	    continue;
	}
	max = 1 + (int) (rnd_next(rnd) % 64);
	if ((cnt = smtps_session_output_iov(s, iov, max)) == 0)
	    return;
	if (cnt > most_pieces)
	    most_pieces = cnt;
	for (total = 0, i = 0; i < cnt; i++)
	    total += iov[i].iov_len;
	switch (rnd_next(rnd) % 4) {
	case 0:
	    k = 1;
	    break;
	case 1:
	    k = total;
	    break;
	default:
	    k = 1 + (size_t) (rnd_next(rnd) % total);
	    break;
	}
	for (i = 0, t = k; t > 0; i++) {
	    n = iov[i].iov_len < t ? iov[i].iov_len : t;
	    sink_put(wire, iov[i].iov_base, n);
	    t -= n;
	}
	smtps_session_consume(s, k, 1000);
    }
}

/*
 * run_session - one message (body as given) over one session: greeting,
 * EHLO (with CHUNKING when bdat), MAIL, RCPT, DATA or BDAT, QUIT, one
 * reply at a time; the client's bytes in wire. 1: delivered.
 */

static int run_session(const char *body, size_t len, int bdat, int gather,
		               uint64_t *rnd, struct sink *wire)
{
    static const char *data_replies[] = {
	"250 ok\r\n", "250 ok\r\n", "354 go\r\n", "250 queued\r\n", 0,
    };
    static const char *bdat_replies[] = {
	"250 ok\r\n", "250 ok\r\n", "250 queued\r\n", 0,
    };
    const char **reply = bdat ? bdat_replies : data_replies;
    struct smtps_session *s = smtps_session_new(NULL, "client.test", NULL);
    struct smtps_message *m = smtps_message_new();
    struct smtps_result *r;
    const char *ehlo = bdat ? "250-mx.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n"
    : "250-mx.test\r\n250 PIPELINING\r\n";
    int     ok = 0;

    if (s == NULL || m == NULL || smtps_message_set_sender(m, "a@b.test", 8)
	|| smtps_message_add_recipient(m, "c@d.test", 8, 0, NULL, 0)
	|| smtps_message_set_body(m, body, len)) {
	snprintf(why, WHY_MAX, "could not make the message");
	smtps_message_free(m);
	smtps_session_free(s);
	return 0;
    }
    smtps_session_set_gather(s, gather);
    if (smtps_session_submit(s, m, 1, 1000) != SMTPS_OK
	|| smtps_session_start(s, 1000) != SMTPS_OK) {
	snprintf(why, WHY_MAX, "could not start the session");
	smtps_session_free(s);
	return 0;
    }
    (void) smtps_session_feed(s, "220 mx.test ESMTP\r\n", 19, 1000);
    drain(s, gather, rnd, wire);
    (void) smtps_session_feed(s, ehlo, strlen(ehlo), 1000);
    drain(s, gather, rnd, wire);
    for (; *reply != NULL; reply++) {
	(void) smtps_session_feed(s, *reply, strlen(*reply), 1000);
	drain(s, gather, rnd, wire);
    }
    if ((r = smtps_session_next_result(s)) != NULL
	&& r->status == SMTPS_STATUS_DELIVERED)
	ok = 1;
    else
	snprintf(why, WHY_MAX, "%s, gather %d: %s", bdat ? "BDAT" : "DATA",
		 gather, r == NULL ? "no result" : r->reason);
    smtps_result_free(r);
    (void) smtps_session_quit(s, 1000);
    drain(s, gather, rnd, wire);
    (void) smtps_session_feed(s, "221 bye\r\n", 9, 1000);
    smtps_session_free(s);
    return ok;
}

/*
 * test_sessions - the copying driver and the iovec driver put the same
 * bytes on the wire, for bodies small and large (past SMTPS_OUT_HIGH and
 * SMTPS_SEG_MAX runs), by DATA and by BDAT
 */

static int test_sessions(void)
{
    static const size_t sizes[] = {0, 1, 700, 5000, 70000, 300000, 1100000};
    uint64_t rnd = UINT64_C(0x2545f4914f6cdd1d);
    struct sink a = {0, 0, 0}, b = {0, 0, 0};
    size_t  i;
    int     bdat, round, ok = 1;
    char   *body;

    for (i = 0; ok && i < sizeof(sizes) / sizeof(sizes[0]); i++) {
	for (round = 0; ok && round < (sizes[i] > 100000 ? 2 : 6); round++) {
	    /* Bare line endings often (short runs), or seldom (long ones). */
	    body = random_body(&rnd, sizes[i], 1, round & 1 ? 995 : 700);
	    for (bdat = 0; ok && bdat < 2; bdat++) {
		a.len = b.len = 0;
		ok = run_session(body, sizes[i], bdat, 0, &rnd, &a)
		    && run_session(body, sizes[i], bdat, 1, &rnd, &b);
		if (ok && !first_diff(&a, &b)) {
		    size_t  w = strlen(why);

		    snprintf(why + w, WHY_MAX - w, " (%zu octets, %s)",
			     sizes[i], bdat ? "BDAT" : "DATA");
		    ok = 0;
		}
	    }
	    free(body);
	}
    }
    free(a.buf);
    free(b.buf);
    if (ok && most_pieces < 16) {
	snprintf(why, WHY_MAX, "the iovec driver never got more than %d "
		 "pieces: the runs were not exercised", most_pieces);
	ok = 0;
    }
    return ok;
}

/*
 * test_lost_midway - the connection is lost with runs of the body still
 * queued: the rest is dropped, the message is freed once, the result
 * says it was not delivered
 */

static int test_lost_midway(void)
{
    uint64_t rnd = UINT64_C(0x1234567);
    struct smtps_session *s = smtps_session_new(NULL, "client.test", NULL);
    struct smtps_message *m = smtps_message_new();
    struct smtps_result *r;
    struct iovec iov[8];
    size_t  len = 200000;
    char   *body = random_body(&rnd, len, 1, 995);
    const char *script[] = {
	"220 mx.test ESMTP\r\n", "250-mx.test\r\n250 PIPELINING\r\n",
	"250 ok\r\n", "250 ok\r\n", "354 go\r\n",
    };
    size_t  i;
    int     ok = 1, cnt;

    if (s == NULL || m == NULL || smtps_message_set_sender(m, "a@b.test", 8)
	|| smtps_message_add_recipient(m, "c@d.test", 8, 0, NULL, 0)
	|| smtps_message_set_body(m, body, len)) {
	snprintf(why, WHY_MAX, "could not make the message");
	smtps_message_free(m);
	smtps_session_free(s);
	free(body);
	return 0;
    }
    free(body);					/* the message has its copy */
    smtps_session_set_gather(s, 1);
    (void) smtps_session_submit(s, m, 1, 1000);
    (void) smtps_session_start(s, 1000);
    for (i = 0; i < sizeof(script) / sizeof(script[0]); i++) {
	const char *data;
	size_t  n;

	(void) smtps_session_feed(s, script[i], strlen(script[i]), 1000);
	if (i + 1 < sizeof(script) / sizeof(script[0]))
	    while ((n = smtps_session_output(s, &data)) > 0)
		smtps_session_consume(s, n, 1000);
    }
    /* Part of the body goes; a run of it is still queued. */
    cnt = smtps_session_output_iov(s, iov, 8);
    if (cnt < 2) {
	snprintf(why, WHY_MAX, "the body was not sent from the message "
		 "(%d pieces)", cnt);
	ok = 0;
    }
    smtps_session_consume(s, iov[0].iov_len + 1, 1000);
    smtps_session_closed(s, "connection reset", 1000);
    if (smtps_session_output_iov(s, iov, 8) != 0) {
	snprintf(why, WHY_MAX, "output left after the connection was lost");
	ok = 0;
    }
    r = smtps_session_next_result(s);
    if (r == NULL || r->status == SMTPS_STATUS_DELIVERED) {
	snprintf(why, WHY_MAX, "result: %s", r == NULL ? "none" : "delivered");
	ok = 0;
    }
    smtps_result_free(r);
    smtps_session_free(s);
    return ok;
}

/* test_inspect - the quick measure and the scan agree */

static int test_inspect(void)
{
    uint64_t rnd = UINT64_C(0x5851f42d4c957f2d);
    struct smtps_body_scan sc;
    uint64_t size;
    char   *body;
    size_t  len, i;
    int     iter, hi, problem, want, ok = 1;
    unsigned flags;

    for (iter = 0; ok && iter < 3000; iter++) {
	len = (size_t) (rnd_next(&rnd) % (iter < 2000 ? 80 : 5000));
	body = random_body(&rnd, len, iter % 3 != 0, iter % 2 ? 995 : 500);
	/* Now and then an 8-bit byte, or a CR LF cut at a block edge. */
	if (len > 40 && iter % 5 == 0)
	    body[rnd_next(&rnd) % len] = (char) 0xe9;
	if (len > 40 && iter % 7 == 0) {
	    i = 15 + 16 * (size_t) (rnd_next(&rnd) % (len / 16));
	    if (i + 1 < len)
		body[i] = '\r', body[i + 1] = '\n';
	}
	flags = iter % 11 == 0 ? SMTPS_BODY_ALLOW_LONG_LINES : 0;
	smtps_body_scan_init(&sc, flags);
	(void) smtps_body_scan(&sc, body, len);
	want = smtps_body_scan_finish(&sc);
	size = 0;
	hi = -1;
	problem = smtps_body_inspect(body, len, flags, &size, &hi);
	if (problem != want
	    || (want == 0 && (size != sc.size || hi != sc.is_8bit))) {
	    snprintf(why, WHY_MAX, "iteration %d (%zu octets): problem %d/%d, "
		     "size %llu/%llu, 8-bit %d/%d", iter, len, problem, want,
		     (unsigned long long) size, (unsigned long long) sc.size,
		     hi, sc.is_8bit);
	    ok = 0;
	}
	free(body);
    }
    return ok;
}

/* main - run them all */

int     main(void)
{
    static const struct {
	const char *label;
	int     (*fn) (void);
    }       tests[] = {
	{"step equals encode, random", test_step_random},
	{"step at its limits", test_step_limit},
	{"iovec driver, same wire as the copying one", test_sessions},
	{"connection lost with runs queued", test_lost_midway},
	{"inspect agrees with the scan", test_inspect},
    };
    size_t  i;
    int     passed = 0, failed = 0;

    for (i = 0; i < sizeof(tests) / sizeof(tests[0]); i++) {
	printf("RUN %s\n", tests[i].label);
	why[0] = 0;
	if (tests[i].fn()) {
	    printf("PASS %s\n", tests[i].label);
	    passed++;
	} else {
	    printf("FAIL %s: %s\n", tests[i].label, why);
	    failed++;
	}
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
