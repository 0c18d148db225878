/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	test_plain 1
 * SUMMARY
 *	the quick checks agree with the full ones
 * SYNOPSIS
 *	test_plain
 * DESCRIPTION
 *	body check
 *		smtps_body_check() first looks at a body quickly (a NUL, a
 *		window of 999 octets without an LF) and counts lines only
 *		when it cannot tell. Its answer must be the full scan's
 *		(smtps_body_scan() in one piece): for a table of bodies at
 *		the edges (lines of 998 and 999 octets ended by LF, CR, CR LF
 *		or nothing, NULs) and for random bodies of lines around the
 *		limit, with and without SMTPS_BODY_ALLOW_LONG_LINES.
 *
 *	plain envelope
 *		smtps_message_check_plain(): a table of senders, recipient
 *		lists and bodies with the answer each must get; then random
 *		addresses over an alphabet of the bytes that matter, where 1
 *		must mean that the message functions take the address too
 *		and that it is printable ASCII without angle brackets.
 * DIAGNOSTICS
 *	Prints "RUN label", then "PASS label" or "FAIL label: why", and
 *	finally "N passed, N failed". The exit status is 1 when any test
 *	fails, else 0.
 * SEE ALSO
 *	csrc/body.c, csrc/message.c; tests/test_message_fast.py (the same
 *	for Message(), both ways).
 *--*/

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "smtpstate.h"

#define WHY_MAX 256

static char why[WHY_MAX];

static int fail(const char *, ...) __attribute__((format(printf, 1, 2)));
static uint64_t rnd_next(uint64_t *);
static int full_scan(const char *, size_t, unsigned);
static int check_body(const char *, const char *, size_t);
static int test_body_edges(void);
static int test_body_random(void);
static int test_plain_table(void);
static int test_plain_random(void);

/* fail - say why, for the FAIL line; 0 */

static int fail(const char *fmt,...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    return (0);
}

/* rnd_next - xorshift64*: the same sequence on every run */

static uint64_t rnd_next(uint64_t *state)
{
    uint64_t x = *state;

    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return (x * UINT64_C(2685821657736338717));
}

/* full_scan - what the full scan finds in body, in one piece */

static int full_scan(const char *in, size_t len, unsigned flags)
{
    struct smtps_body_scan sc;

    smtps_body_scan_init(&sc, flags);
    (void) smtps_body_scan(&sc, in, len);
    return (smtps_body_scan_finish(&sc));
}

/* check_body - smtps_body_check() gives the full scan's answer, both ways */

static int check_body(const char *label, const char *in, size_t len)
{
    static const unsigned flags[] = {0, SMTPS_BODY_ALLOW_LONG_LINES};
    size_t  i;
    int     got, want;

    for (i = 0; i < sizeof(flags) / sizeof(flags[0]); i++) {
	got = smtps_body_check(in, len, flags[i]);
	want = full_scan(in, len, flags[i]);
	if (got != want)
	    return (fail("%s (%zu octets, flags %u): check %d, scan %d",
			 label, len, flags[i], got, want));
    }
    return (1);
}

/* test_body_edges - lines at the limit, every ending, NULs */

static int test_body_edges(void)
{
    static const struct {
	const char *label;
	size_t  before;			/* short lines before the long one */
	size_t  line;			/* octets of the long line */
	const char *eol;		/* how each line ends */
	int     nul;			/* a NUL in the last short line */
    }       cases[] = {
	{"998 LF", 0, 998, "\n", 0},
	{"999 LF", 0, 999, "\n", 0},
	{"998 CRLF", 3, 998, "\r\n", 0},
	{"999 CRLF", 3, 999, "\r\n", 0},
	{"998 CR", 3, 998, "\r", 0},
	{"999 CR", 3, 999, "\r", 0},
	{"998 unended", 20, 998, "", 0},
	{"999 unended", 20, 999, "", 0},
	{"1000 LF after many", 40, 1000, "\n", 0},
	{"short CR lines", 60, 10, "\r", 0},
	{"NUL in short lines", 5, 10, "\n", 1},
	{"NUL and a long line", 5, 2000, "\n", 1},
    };
    char   *buf, *p;
    size_t  i, k, eol;
    int     ok = 1;

    if ((buf = malloc(64 * 100 + 4000)) == NULL)
	return (fail("out of memory"));
    for (i = 0; ok && i < sizeof(cases) / sizeof(cases[0]); i++) {
	eol = strlen(cases[i].eol);
	p = buf;
	for (k = 0; k < cases[i].before; k++) {
	    memset(p, 'a', 70);
	    if (cases[i].nul && k + 1 == cases[i].before)
		p[35] = 0;
	    p += 70;
	    memcpy(p, eol ? cases[i].eol : "\n", eol ? eol : 1);
	    p += eol ? eol : 1;
	}
	memset(p, 'x', cases[i].line);
	p += cases[i].line;
	memcpy(p, cases[i].eol, eol);
	p += eol;
	ok = check_body(cases[i].label, buf, (size_t) (p - buf));
    }
    if (ok)
	ok = check_body("empty", "", 0) && check_body("NUL alone", "\0", 1)
	    && check_body("LF alone", "\n", 1);
    free(buf);
    return (ok);
}

/* test_body_random - lines around the limit, any ending, now and then a NUL */

static int test_body_random(void)
{
    static const char *const eols[] = {"\n", "\r\n", "\r", "\n\r", ""};
    uint64_t rnd = UINT64_C(0x9e3779b97f4a7c15);
    char   *buf, *p;
    size_t  lines, k, n, eol;
    char    label[64];
    int     iter, ok = 1;

    if ((buf = malloc(8 * 1100 + 64)) == NULL)
	return (fail("out of memory"));
    for (iter = 0; ok && iter < 3000; iter++) {
	p = buf;
	lines = 1 + (size_t) (rnd_next(&rnd) % 8);
	for (k = 0; k < lines; k++) {
	    /* Mostly short lines; one in four near the limit. */
	    n = rnd_next(&rnd) % 4 ? (size_t) (rnd_next(&rnd) % 120)
		: 990 + (size_t) (rnd_next(&rnd) % 16);
	    memset(p, 'a' + (int) (k % 26), n);
	    if (n > 0 && rnd_next(&rnd) % 50 == 0)
		p[rnd_next(&rnd) % n] = 0;
	    p += n;
	    eol = (size_t) (rnd_next(&rnd) % 5);
	    if (k + 1 < lines && eol == 4)	/* only the last may be unended */
		eol = 0;
	    memcpy(p, eols[eol], strlen(eols[eol]));
	    p += strlen(eols[eol]);
	}
	snprintf(label, sizeof(label), "iteration %d", iter);
	ok = check_body(label, buf, (size_t) (p - buf));
    }
    free(buf);
    return (ok);
}

/* test_plain_table - senders, recipients and bodies with their answers */

static int test_plain_table(void)
{
    static const char good_body[] = "Subject: x\r\n\r\nbody\r\n";
    static char long_addr[SMTPS_ADDRESS_MAX + 2];
    static char long_body[1200];
    static const struct {
	const char *label;
	const char *sender;
	size_t  sender_len;
	const char *rcpts;
	size_t  rcpts_len;
	size_t  nrcpt;
	int     body;			/* 0 good, 1 a NUL, 2 a long line */
	int     want;
    }       cases[] = {
#define S(s) s, sizeof(s) - 1
	{"usual", S("s@x.test"), S("r@x.test"), 1, 0, 1},
	{"null sender", S(""), S("r@x.test"), 1, 0, 1},
	{"two recipients", S("s@x.test"), S("a@x.test\nb@x.test"), 2, 0, 1},
	{"spaces and quotes", S("\"a b\"@x.test"), S("r+tag@x.test"), 1, 0, 1},
	{"no recipient", S("s@x.test"), S(""), 0, 0, 0},
	{"empty recipient", S("s@x.test"), S(""), 1, 0, 0},
	{"LF inside, counted", S("s@x.test"), S("a@x\nb@x"), 1, 0, 0},
	{"trailing LF", S("s@x.test"), S("a@x\n"), 1, 0, 0},
	{"trailing LF, two", S("s@x.test"), S("a@x\nb@x\n"), 2, 0, 0},
	{"leading LF", S("s@x.test"), S("\na@x"), 1, 0, 0},
	{"empty between", S("s@x.test"), S("a@x\n\nb@x"), 3, 0, 0},
	{"fewer than said", S("s@x.test"), S("a@x\nb@x"), 3, 0, 0},
	{"CR in sender", S("s\r@x.test"), S("r@x.test"), 1, 0, 0},
	{"NUL in sender", S("s\0@x.test"), S("r@x.test"), 1, 0, 0},
	{"NUL in recipient", S("s@x.test"), S("r\0@x.test"), 1, 0, 0},
	{"tab", S("s@x.test"), S("r\t@x.test"), 1, 0, 0},
	{"DEL", S("s@x.test"), S("r\x7f@x.test"), 1, 0, 0},
	{"angle", S("<s@x.test>"), S("r@x.test"), 1, 0, 0},
	{"angle in recipient", S("s@x.test"), S("r@x.test> X=1"), 1, 0, 0},
	{"UTF-8", S("s@x.test"), S("j\xc3\xb6rg@x.test"), 1, 0, 0},
	{"C1 as UTF-8", S("s\xc2\x85@x.test"), S("r@x.test"), 1, 0, 0},
	{"NUL in body", S("s@x.test"), S("r@x.test"), 1, 1, 0},
	{"long body line", S("s@x.test"), S("r@x.test"), 1, 2, 0},
#undef S
    };
    const char *body;
    size_t  i, body_len;
    int     got;

    memset(long_addr, 'a', sizeof(long_addr));
    memset(long_body, 'b', sizeof(long_body));
    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
	body = cases[i].body == 0 ? good_body : cases[i].body == 1 ? "a\0b" : long_body;
	body_len = cases[i].body == 0 ? sizeof(good_body) - 1
	    : cases[i].body == 1 ? 3 : sizeof(long_body);
	got = smtps_message_check_plain(cases[i].sender, cases[i].sender_len,
					cases[i].rcpts, cases[i].rcpts_len,
					cases[i].nrcpt, body, body_len);
	if (got != cases[i].want)
	    return (fail("%s: %d, not %d", cases[i].label, got, cases[i].want));
    }
    /* SMTPS_ADDRESS_MAX octets, then one more. */
    if (smtps_message_check_plain(long_addr, SMTPS_ADDRESS_MAX, "r", 1, 1, "", 0) != 1
	|| smtps_message_check_plain(long_addr, SMTPS_ADDRESS_MAX + 1, "r", 1, 1, "", 0)
	|| smtps_message_check_plain("", 0, long_addr, SMTPS_ADDRESS_MAX, 1, "", 0) != 1
	|| smtps_message_check_plain("", 0, long_addr, SMTPS_ADDRESS_MAX + 1, 1, "", 0))
	return (fail("the SMTPS_ADDRESS_MAX edge"));
    if (smtps_message_check_plain("", 0, "r", 1, SMTPS_MAX_RECIPIENTS + 1, "", 0))
	return (fail("more than SMTPS_MAX_RECIPIENTS"));
    if (smtps_message_check_plain("", 0, NULL, 0, 1, "", 0)
	|| smtps_message_check_plain(NULL, 1, "r", 1, 1, "", 0)
	|| smtps_message_check_plain("", 0, "r", 1, 1, NULL, 1))
	return (fail("a NULL pointer was taken"));
    return (1);
}

/* test_plain_random - 1 only for what the message functions take, plain */

static int test_plain_random(void)
{
    static const unsigned char alphabet[] = {
	'a', 'z', '@', '.', ' ', '"', '+', '=', '~', '!',
	'<', '>', '\r', '\n', '\t', 0, 0x1f, 0x7f, 0x80, 0xc3, 0xff,
    };
    uint64_t rnd = UINT64_C(0x0123456789abcdef);
    unsigned char addr[16];
    struct smtps_message *m;
    size_t  len, i;
    int     iter, plain, plain_bytes, taken;

    for (iter = 0; iter < 20000; iter++) {
	len = (size_t) (rnd_next(&rnd) % sizeof(addr));
	plain_bytes = 1;
	for (i = 0; i < len; i++) {
	    /* Mostly letters, so that plain addresses come up often. */
	    addr[i] = rnd_next(&rnd) % 3 ? 'a' + (unsigned char) (i % 26)
		: alphabet[rnd_next(&rnd) % sizeof(alphabet)];
	    if (addr[i] < 0x20 || addr[i] > 0x7e || addr[i] == '<' || addr[i] == '>')
		plain_bytes = 0;
	}
	/* As the sender: "" is the null sender, plain too. */
	plain = smtps_message_check_plain((const char *) addr, len, "r", 1, 1, "", 0);
	if (plain != plain_bytes)
	    return (fail("sender of %zu octets (iteration %d): %d, not %d",
			 len, iter, plain, plain_bytes));
	if ((m = smtps_message_new()) == NULL)
	    return (fail("out of memory"));
	taken = smtps_message_set_sender(m, (const char *) addr, len) == SMTPS_OK;
	smtps_message_free(m);
	if (plain && !taken)
	    return (fail("plain sender refused by smtps_message_set_sender"));
	/* As the one recipient: never empty. */
	plain = smtps_message_check_plain("", 0, (const char *) addr, len, 1, "", 0);
	if (plain != (plain_bytes && len > 0))
	    return (fail("recipient of %zu octets (iteration %d): %d", len, iter, plain));
	if ((m = smtps_message_new()) == NULL)
	    return (fail("out of memory"));
	taken = smtps_message_add_recipient(m, (const char *) addr, len, 0, NULL, 0)
	    == SMTPS_OK;
	smtps_message_free(m);
	if (plain && !taken)
	    return (fail("plain recipient refused by smtps_message_add_recipient"));
    }
    return (1);
}

/* main - run every test */

int     main(void)
{
    static const struct {
	const char *label;
	int     (*fn) (void);
    }       tests[] = {
	{"body check: edges", test_body_edges},
	{"body check: random", test_body_random},
	{"plain envelope: table", test_plain_table},
	{"plain envelope: random", test_plain_random},
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
    return (failed ? 1 : 0);
}
