/* SPDX-License-Identifier: MIT */
/* The man-page header nests comment openers on purpose (Postfix style). */
#pragma GCC diagnostic ignored "-Wcomment"
/*++
/* NAME
/*	test_body 1
/* SUMMARY
/*	table-driven test of the body encoder (csrc/body.c)
/* SYNOPSIS
/*	test_body
/* DESCRIPTION
/*	Each table case gives a body, the dot_stuff mode and the exact
/*	bytes expected from smtps_body_encode() followed by
/*	smtps_body_finish() with end_dot equal to dot_stuff (DATA ends with
/*	".\r\n", BDAT does not). Every case is run with the whole input in
/*	one call, split in two at every position, one byte at a time, and
/*	with tiny output buffers; all must give the expected bytes. Each
/*	output buffer is allocated at its exact size, so that a write past
/*	outcap is a heap overflow that AddressSanitizer reports.
/*
/*	smtps_body_encoded_length() must equal the length of the actual
/*	non-stuffed output for every case, and smtps_body_is_8bit() must
/*	agree with a plain byte loop.
/*
/*	Randomised checks: short bodies over {CR, LF, '.', 'a', 0x80} are
/*	encoded for DATA, then decoded by a reference server-side decoder
/*	written here; the result must equal a reference normalisation of
/*	the input, and the output must hold no CR or LF outside a CR LF
/*	pair and no end-of-data sequence before the true end. Longer
/*	bodies with long runs, split at random points into random output
/*	buffer sizes, must equal a byte-at-a-time reference encoder.
/*
/*	Prints "RUN label", then "PASS label" or "FAIL label: why", and
/*	finally "N passed, N failed".
/* DIAGNOSTICS
/*	Exit status 0 when every test passed, 1 otherwise.
/* SEE ALSO
/*	csrc/body.c, RFC 5321 4.5.2.
/*--*/

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "smtpstate.h"

/* A byte string literal with its length; literals may hold NUL bytes. */
#define B(s) s, sizeof(s) - 1

struct body_case {
    const char *label;
    const char *in;
    size_t  inlen;
    int     dot_stuff;
    const char *out;			/* encode; finish(end_dot=dot_stuff) */
    size_t  outlen;
};

static const struct body_case cases[] = {
    {"empty DATA", B(""), 1, B(".\r\n")},
    {"empty BDAT", B(""), 0, B("")},
    {"one line", B("abc\r\n"), 1, B("abc\r\n.\r\n")},
    {"no final newline", B("abc"), 1, B("abc\r\n.\r\n")},
    {"no final newline BDAT", B("abc"), 0, B("abc\r\n")},
    {"two lines", B("ab\r\ncd\r\n"), 1, B("ab\r\ncd\r\n.\r\n")},
    {"leading dot", B(".abc\r\n"), 1, B("..abc\r\n.\r\n")},
    {"leading dot BDAT", B(".abc\r\n"), 0, B(".abc\r\n")},
    {"lone dot body", B("."), 1, B("..\r\n.\r\n")},
    {"lone dot line", B(".\r\n"), 1, B("..\r\n.\r\n")},
    {"dot line inside", B("a\r\n.\r\nb\r\n"), 1, B("a\r\n..\r\nb\r\n.\r\n")},
    {"dot line inside BDAT", B("a\r\n.\r\nb\r\n"), 0, B("a\r\n.\r\nb\r\n")},
    {"double dot line", B("a\r\n..\r\n"), 1, B("a\r\n...\r\n.\r\n")},
    {"dots not at line start", B("a.b.\r\nc..\r\n"), 1,
    B("a.b.\r\nc..\r\n.\r\n")},
    {"dot after empty line", B("\r\n.x"), 1, B("\r\n..x\r\n.\r\n")},
    {"dot lines in a row", B(".\r\n.\r\n."), 1, B("..\r\n..\r\n..\r\n.\r\n")},
    {"bare LF", B("a\nb\n"), 1, B("a\r\nb\r\n.\r\n")},
    {"bare LF only", B("\n"), 1, B("\r\n.\r\n")},
    {"bare LFs", B("\n\n"), 1, B("\r\n\r\n.\r\n")},
    {"bare CR", B("a\rb\r"), 1, B("a\r\nb\r\n.\r\n")},
    {"bare CR only", B("\r"), 1, B("\r\n.\r\n")},
    {"bare CRs", B("\r\r"), 1, B("\r\n\r\n.\r\n")},
    {"CRLF only", B("\r\n"), 1, B("\r\n.\r\n")},
    {"empty lines", B("\r\n\r\n"), 1, B("\r\n\r\n.\r\n")},
    {"CR CR LF", B("a\r\r\nb"), 1, B("a\r\n\r\nb\r\n.\r\n")},
    {"LF CR", B("a\n\rb"), 1, B("a\r\n\r\nb\r\n.\r\n")},
    {"LF CR LF", B("a\n\r\nb"), 1, B("a\r\n\r\nb\r\n.\r\n")},
    {"CR LF LF", B("a\r\n\nb"), 1, B("a\r\n\r\nb\r\n.\r\n")},
    {"mixed endings BDAT", B("a\rb\nc\r\nd"), 0, B("a\r\nb\r\nc\r\nd\r\n")},

    /* SMTP smuggling: each must stay an ordinary line with its dot doubled. */
    {"smuggle LF.LF", B("a\n.\nb\r\n"), 1, B("a\r\n..\r\nb\r\n.\r\n")},
    {"smuggle CR.CR", B("a\r.\rb\r\n"), 1, B("a\r\n..\r\nb\r\n.\r\n")},
    {"smuggle LF.CRLF", B("a\n.\r\nb"), 1, B("a\r\n..\r\nb\r\n.\r\n")},
    {"smuggle CRLF.CR", B("a\r\n.\rb"), 1, B("a\r\n..\r\nb\r\n.\r\n")},
    {"smuggle CR.CRLF", B("a\r.\r\nb"), 1, B("a\r\n..\r\nb\r\n.\r\n")},
    {"smuggle CRLF.LF", B("a\r\n.\nb"), 1, B("a\r\n..\r\nb\r\n.\r\n")},
    {"smuggle LF.LF at end", B("a\n.\n"), 1, B("a\r\n..\r\n.\r\n")},
    {"smuggle CRLF.CR at end", B("a\r\n.\r"), 1, B("a\r\n..\r\n.\r\n")},
    {"smuggle at start", B(".\n"), 1, B("..\r\n.\r\n")},
    {"smuggle with commands", B("x\n.\nMAIL FROM:<a@b>\r\n"), 1,
    B("x\r\n..\r\nMAIL FROM:<a@b>\r\n.\r\n")},

    /* Bytes that pass through unchanged. */
    {"8-bit", B("caf\xc3\xa9\r\n\x80\xff"), 1,
    B("caf\xc3\xa9\r\n\x80\xff\r\n.\r\n")},
    {"NUL bytes", B("a\0b\r\n\0"), 1, B("a\0b\r\n\0\r\n.\r\n")},
    {"NUL then dot", B("\0.\r\n"), 1, B("\0.\r\n.\r\n")},
    {"long line", B("0123456789012345678901234567890123456789"
		    "0123456789012345678901234567890123456789"
		    "\n.0123456789012345678901234567890123456789"), 1,
    B("0123456789012345678901234567890123456789"
      "0123456789012345678901234567890123456789"
      "\r\n..0123456789012345678901234567890123456789\r\n.\r\n")},
};

#define NCASES (sizeof(cases) / sizeof(cases[0]))

/* An output collector that grows as needed. */
struct sink {
    char   *buf;
    size_t  len;
    size_t  cap;
};

/* Why the current test failed; printed by main(). */
static char why[256];

static int fail(const char *, ...) __attribute__((format(printf, 1, 2)));
static void *xmalloc(size_t);
static void sink_put(struct sink *, const char *, size_t);
static int sink_is(const struct sink *, const char *, size_t, const char *);
static long encode_run(const char *, size_t, int, size_t, size_t, size_t,
		               struct sink *);
static int run_case(const struct body_case *);
static void ref_normalise(const char *, size_t, struct sink *);
static void ref_encode(const char *, size_t, int, struct sink *);
static int ref_decode(const char *, size_t, struct sink *);
static int check_wire(const char *, size_t);
static uint64_t rnd_next(uint64_t *);
static int test_finish(void);
static int test_progress(void);
static int test_is_8bit(void);
static int test_random_decode(void);
static int test_random_chunks(void);

/* fail - record why a test failed; returns 0 */

static int fail(const char *fmt,...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    return (0);
}

/* xmalloc - malloc that exits on failure; n may be 0 */

static void *xmalloc(size_t n)
{
    void   *p = malloc(n ? n : 1);

    if (p == 0) {
	perror("malloc");
	exit(2);
    }
    return (p);
}

/* sink_put - append bytes to a sink */

static void sink_put(struct sink *s, const char *data, size_t len)
{
    if (s->len + len > s->cap) {
	size_t  cap = s->cap ? s->cap : 64;

	while (cap < s->len + len)
	    cap *= 2;
	if ((s->buf = realloc(s->buf, cap)) == 0) {
	    perror("realloc");
	    exit(2);
	}
	s->cap = cap;
    }
    if (len > 0)
	memcpy(s->buf + s->len, data, len);
    s->len += len;
}

/* sink_is - compare what a sink holds with the expected bytes */

static int sink_is(const struct sink *s, const char *want, size_t wantlen,
		           const char *how)
{
    size_t  i;

    if (s->len == wantlen
	&& (wantlen == 0 || memcmp(s->buf, want, wantlen) == 0))
	return (1);
    for (i = 0; i < s->len && i < wantlen && s->buf[i] == want[i]; i++)
	 /* void */ ;
    return (fail("%s: got %zu bytes, want %zu, first difference at %zu",
		 how, s->len, wantlen, i));
}

/*
 * encode_run - encode in, fed as a first piece of first bytes and then
 * pieces of piece bytes, each call into a fresh buffer of exactly outcap
 * bytes (so ASan sees any write past outcap), then finish with end_dot =
 * dot_stuff. A piece is fed again until consumed. Returns the number of
 * smtps_body_encode() calls, or -1 when a call made no progress (s then
 * holds the output so far) or out_total disagreed (why says so).
 */

static long encode_run(const char *in, size_t inlen, int dot_stuff,
		               size_t first, size_t piece, size_t outcap,
		               struct sink *s)
{
    struct smtps_body_encoder e;
    char   *out = xmalloc(outcap);
    size_t  off = 0;
    size_t  end;
    size_t  used;
    size_t  n;
    long    calls = 0;

    smtps_body_init(&e, dot_stuff);
    for (end = first; off < inlen; end += piece) {
	if (end > inlen)
	    end = inlen;
	while (off < end) {
	    n = smtps_body_encode(&e, in + off, end - off, &used, out, outcap);
	    calls++;
	    sink_put(s, out, n);
	    off += used;
	    if (used == 0 && n == 0) {
		free(out);
		fail("outcap %zu: no progress at byte %zu", outcap, off);
		return (-1);
	    }
	}
    }
    free(out);

    /* Exactly SMTPS_BODY_FINISH_MAX bytes of room. */
    out = xmalloc(SMTPS_BODY_FINISH_MAX);
    n = smtps_body_finish(&e, out, SMTPS_BODY_FINISH_MAX, dot_stuff);
    sink_put(s, out, n);
    free(out);
    if (e.out_total != s->len) {
	fail("out_total %llu, produced %zu",
	     (unsigned long long) e.out_total, s->len);
	return (-1);
    }
    return (calls);
}

/* run_case - every way of feeding one table case */

static int run_case(const struct body_case *c)
{
    struct sink s = {0, 0, 0};
    size_t  big = 2 * c->inlen;		/* "." or CR at most doubles */
    char    how[64];
    size_t  pos;
    size_t  cap;
    long    calls;
    uint64_t length;
    int     want_8bit = 0;
    int     ok = 0;

    /* Whole input, one call. */
    if ((calls = encode_run(c->in, c->inlen, c->dot_stuff, c->inlen, 1,
			    big, &s)) < 0
	|| !sink_is(&s, c->out, c->outlen, "whole"))
	goto done;
    if (calls != (c->inlen > 0)) {
	fail("whole: %ld calls with a big buffer", calls);
	goto done;
    }

    /* Split in two at every position, 0 and inlen included. */
    for (pos = 0; pos <= c->inlen; pos++) {
	s.len = 0;
	snprintf(how, sizeof(how), "split at %zu", pos);
	if ((calls = encode_run(c->in, c->inlen, c->dot_stuff, pos, c->inlen,
				big, &s)) < 0
	    || !sink_is(&s, c->out, c->outlen, how))
	    goto done;
	if (calls > 2) {
	    fail("%s: %ld calls with a big buffer", how, calls);
	    goto done;
	}
    }

    /* One byte at a time: each call must take its whole byte. */
    s.len = 0;
    if ((calls = encode_run(c->in, c->inlen, c->dot_stuff, 1, 1,
			    SMTPS_BODY_STEP_MAX, &s)) < 0
	|| !sink_is(&s, c->out, c->outlen, "bytewise"))
	goto done;
    if ((size_t) calls != c->inlen) {
	fail("bytewise: %ld calls for %zu bytes", calls, c->inlen);
	goto done;
    }

    /*
     * Tiny output buffers, all input offered at once. From
     * SMTPS_BODY_STEP_MAX up every call must make progress; below it a
     * stall is allowed, but what came out until then must be a prefix.
     */
    for (cap = 0; cap <= 9; cap++) {
	s.len = 0;
	snprintf(how, sizeof(how), "outcap %zu", cap);
	if (encode_run(c->in, c->inlen, c->dot_stuff, c->inlen, 1, cap,
		       &s) >= 0) {
	    if (!sink_is(&s, c->out, c->outlen, how))
		goto done;
	} else if (cap >= SMTPS_BODY_STEP_MAX) {
	    goto done;
	} else if (s.len > c->outlen
		   || (s.len > 0 && memcmp(s.buf, c->out, s.len) != 0)) {
	    fail("%s: stalled output is not a prefix", how);
	    goto done;
	}
    }

    /* The BDAT size must be the length of the actual non-stuffed output. */
    s.len = 0;
    if (encode_run(c->in, c->inlen, 0, c->inlen, 1, big, &s) < 0)
	goto done;
    if ((length = smtps_body_encoded_length(c->in, c->inlen)) != s.len) {
	fail("encoded_length %llu, non-stuffed output %zu",
	     (unsigned long long) length, s.len);
	goto done;
    }
    for (pos = 0; pos < c->inlen; pos++)
	if ((unsigned char) c->in[pos] >= 0x80)
	    want_8bit = 1;
    if (smtps_body_is_8bit(c->in, c->inlen) != want_8bit) {
	fail("is_8bit says %d", !want_8bit);
	goto done;
    }
    ok = 1;

done:
    free(s.buf);
    return (ok);
}

/* ref_normalise - byte-at-a-time CR LF normalisation, last line completed */

static void ref_normalise(const char *in, size_t len, struct sink *s)
{
    size_t  i;

    for (i = 0; i < len; i++) {
	if (in[i] == '\r')
	    sink_put(s, "\r\n", 2);
	else if (in[i] == '\n') {
	    if (i == 0 || in[i - 1] != '\r')
		sink_put(s, "\r\n", 2);
	} else
	    sink_put(s, in + i, 1);
    }
    if (len > 0 && in[len - 1] != '\r' && in[len - 1] != '\n')
	sink_put(s, "\r\n", 2);
}

/* ref_encode - normalise, double each dot that starts a line, end line */

static void ref_encode(const char *in, size_t len, int dot_stuff,
		               struct sink *s)
{
    struct sink norm = {0, 0, 0};
    size_t  i;

    ref_normalise(in, len, &norm);
    for (i = 0; i < norm.len; i++) {
	if (dot_stuff && norm.buf[i] == '.'
	    && (i == 0 || norm.buf[i - 1] == '\n'))
	    sink_put(s, ".", 1);
	sink_put(s, norm.buf + i, 1);
    }
    if (dot_stuff)
	sink_put(s, ".\r\n", 3);
    free(norm.buf);
}

/*
 * ref_decode - what an SMTP server makes of the bytes after DATA: CR LF
 * lines; the lone "." line ends the data and must be the very last line;
 * one leading dot is removed from other lines. Returns 1 on success.
 */

static int ref_decode(const char *wire, size_t len, struct sink *s)
{
    size_t  start = 0;
    size_t  i;

    for (i = 0; i + 1 < len; i++) {
	if (wire[i] != '\r' || wire[i + 1] != '\n')
	    continue;
	if (i - start == 1 && wire[start] == '.') {
	    if (i + 2 != len)
		return (fail("end of data after %zu of %zu bytes",
			     i + 2, len));
	    return (1);
	}
	if (i > start && wire[start] == '.')
	    start++;
	sink_put(s, wire + start, i + 2 - start);
	start = i + 2;
	i++;
    }
    return (fail("no end-of-data line"));
}

/*
 * check_wire - no CR or LF outside a CR LF pair, and the end-of-data
 * sequence CR LF . CR LF nowhere but at the very end (the CR LF that ends
 * the DATA command counts before the body: ".\r\n" first is the end).
 */

static int check_wire(const char *buf, size_t len)
{
    size_t  i;

    for (i = 0; i < len; i++) {
	if (buf[i] == '\r' && (i + 1 == len || buf[i + 1] != '\n'))
	    return (fail("bare CR at %zu", i));
	if (buf[i] == '\n' && (i == 0 || buf[i - 1] != '\r'))
	    return (fail("bare LF at %zu", i));
    }
    if (len > 3 && memcmp(buf, ".\r\n", 3) == 0)
	return (fail("the body starts with the end-of-data line"));
    for (i = 0; i + 5 < len; i++)
	if (memcmp(buf + i, "\r\n.\r\n", 5) == 0)
	    return (fail("end of data after %zu of %zu bytes", i + 5, len));
    return (1);
}

/* rnd_next - xorshift64*, deterministic, state owned by the caller */

static uint64_t rnd_next(uint64_t *state)
{
    uint64_t x = *state;

    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return (x * UINT64_C(2685821657736338717));
}

/* test_finish - too little room writes nothing and changes nothing */

static int test_finish(void)
{
    struct smtps_body_encoder e;
    char    out[SMTPS_BODY_FINISH_MAX];
    size_t  used;
    size_t  n;

    smtps_body_init(&e, 1);
    if ((n = smtps_body_encode(&e, "ab", 2, &used, out, sizeof(out))) != 2)
	return (fail("encode wrote %zu", n));
    memset(out, 'x', sizeof(out));
    if (smtps_body_finish(&e, out, SMTPS_BODY_FINISH_MAX - 1, 1) != 0
	|| memchr(out, '\r', sizeof(out)) != 0 || e.out_total != 2
	|| e.at_line_start)
	return (fail("finish without room wrote or changed state"));
    n = smtps_body_finish(&e, out, sizeof(out), 1);
    if (n != 5 || memcmp(out, "\r\n.\r\n", 5) != 0 || e.out_total != 7)
	return (fail("finish wrote %zu bytes", n));
    return (1);
}

/* test_progress - no room, no input, a CR LF split, a dot never split */

static int test_progress(void)
{
    struct smtps_body_encoder e;
    char    out[4];
    size_t  used;
    size_t  n;

    smtps_body_init(&e, 1);
    n = smtps_body_encode(&e, "abc", 3, &used, out, 0);
    if (n != 0 || used != 0)
	return (fail("outcap 0: wrote %zu, consumed %zu", n, used));
    n = smtps_body_encode(&e, "", 0, &used, out, sizeof(out));
    if (n != 0 || used != 0 || !e.at_line_start || e.after_cr)
	return (fail("no input: wrote %zu, consumed %zu", n, used));

    /* A CR ends one call; the LF that starts the next adds nothing. */
    n = smtps_body_encode(&e, "a\r", 2, &used, out, 3);
    if (n != 3 || used != 2 || memcmp(out, "a\r\n", 3) != 0 || !e.after_cr)
	return (fail("a CR: wrote %zu, consumed %zu", n, used));
    n = smtps_body_encode(&e, "\n.", 2, &used, out, 0);
    if (n != 0 || used != 1)
	return (fail("LF after CR, outcap 0: wrote %zu, consumed %zu",
		     n, used));

    /* A stuffed dot is never split. */
    n = smtps_body_encode(&e, ".", 1, &used, out, 1);
    if (n != 0 || used != 0)
	return (fail("dot, outcap 1: wrote %zu, consumed %zu", n, used));
    n = smtps_body_encode(&e, ".", 1, &used, out, 2);
    if (n != 2 || used != 1 || memcmp(out, "..", 2) != 0)
	return (fail("dot, outcap 2: wrote %zu, consumed %zu", n, used));
    return (1);
}

/* test_is_8bit - one high byte at every position and alignment */

static int test_is_8bit(void)
{
    char    buf[40];
    size_t  start;
    size_t  len;
    size_t  hi;

    memset(buf, 'a', sizeof(buf));
    for (start = 0; start < 8; start++) {
	for (len = 0; start + len <= sizeof(buf); len++) {
	    if (smtps_body_is_8bit(buf + start, len) != 0)
		return (fail("ASCII (start %zu, len %zu) is 8-bit",
			     start, len));
	    for (hi = 0; hi < len; hi++) {
		buf[start + hi] = (char) 0x80;
		if (smtps_body_is_8bit(buf + start, len) != 1)
		    return (fail("0x80 at %zu (start %zu, len %zu) missed",
				 hi, start, len));
		buf[start + hi] = 'a';
	    }
	}
    }
    return (1);
}

/*
 * test_random_decode - 10,000 short bodies over {CR, LF, '.', 'a', 0x80},
 * encoded for DATA into random small buffers, must come back from
 * ref_decode() as their reference normalisation.
 */

static int test_random_decode(void)
{
    static const char alphabet[] = {'\r', '\n', '.', 'a', (char) 0x80};
    uint64_t rnd = UINT64_C(0x9e3779b97f4a7c15);
    struct sink wire = {0, 0, 0};
    struct sink got = {0, 0, 0};
    struct sink want = {0, 0, 0};
    char    in[32];
    size_t  len;
    size_t  cap;
    size_t  i;
    int     iter;
    int     ok = 0;

    for (iter = 0; iter < 10000; iter++) {
	len = (size_t) (rnd_next(&rnd) % (sizeof(in) + 1));
	for (i = 0; i < len; i++)
	    in[i] = alphabet[rnd_next(&rnd) % sizeof(alphabet)];
	cap = SMTPS_BODY_STEP_MAX + (size_t) (rnd_next(&rnd) % 8);
	wire.len = got.len = want.len = 0;
	if (encode_run(in, len, 1, len, 1, cap, &wire) < 0
	    || !check_wire(wire.buf, wire.len)
	    || !ref_decode(wire.buf, wire.len, &got))
	    break;
	ref_normalise(in, len, &want);
	if (!sink_is(&got, want.buf, want.len, "decoded body"))
	    break;
	if (smtps_body_encoded_length(in, len) != want.len) {
	    fail("encoded_length %llu, want %zu",
		 (unsigned long long) smtps_body_encoded_length(in, len),
		 want.len);
	    break;
	}
    }
    if (iter < 10000) {
	size_t  used = strlen(why);

	snprintf(why + used, sizeof(why) - used, " (iteration %d)", iter);
    } else
	ok = 1;
    free(wire.buf);
    free(got.buf);
    free(want.buf);
    return (ok);
}

/*
 * test_random_chunks - bodies of up to 5000 bytes with long runs, fed in
 * random pieces into random buffers, against ref_encode().
 */

static int test_random_chunks(void)
{
    uint64_t rnd = UINT64_C(0x0123456789abcdef);
    struct sink got = {0, 0, 0};
    struct sink want = {0, 0, 0};
    char   *in;
    size_t  len;
    size_t  i;
    int     iter;
    int     ok = 1;

    for (iter = 0; ok && iter < 300; iter++) {
	int     dot_stuff = iter & 1;
	size_t  piece = 1 + (size_t) (rnd_next(&rnd) % 700);
	size_t  cap = SMTPS_BODY_STEP_MAX + (size_t) (rnd_next(&rnd) % 900);

	len = (size_t) (rnd_next(&rnd) % 5000);
	in = xmalloc(len);
	for (i = 0; i < len; i++) {
	    unsigned r = (unsigned) (rnd_next(&rnd) % 100);

	    in[i] = r < 2 ? '\r' : r < 4 ? '\n' : r < 6 ? '.' : r < 7 ? '\0'
		: (char) ('a' + r % 26);
	}
	got.len = want.len = 0;
	ref_encode(in, len, dot_stuff, &want);
	if (encode_run(in, len, dot_stuff, piece, piece, cap, &got) < 0
	    || !sink_is(&got, want.buf, want.len, "against ref_encode")) {
	    size_t  used = strlen(why);

	    snprintf(why + used, sizeof(why) - used, " (iteration %d)", iter);
	    ok = 0;
	}
	free(in);
    }
    free(got.buf);
    free(want.buf);
    return (ok);
}

/* main - run the table, then the other tests */

int     main(void)
{
    static const struct {
	const char *label;
	int     (*fn) (void);
    }       tests[] = {
	{"finish needs room", test_finish},
	{"progress and stalls", test_progress},
	{"is_8bit positions", test_is_8bit},
	{"random decode", test_random_decode},
	{"random chunks", test_random_chunks},
    };
    size_t  ntests = sizeof(tests) / sizeof(tests[0]);
    size_t  i;
    int     passed = 0;
    int     failed = 0;

    for (i = 0; i < NCASES + ntests; i++) {
	const char *label =
	    i < NCASES ? cases[i].label : tests[i - NCASES].label;
	int     ok;

	printf("RUN %s\n", label);
	why[0] = 0;
	ok = i < NCASES ? run_case(cases + i) : tests[i - NCASES].fn();
	if (ok) {
	    printf("PASS %s\n", label);
	    passed++;
	} else {
	    printf("FAIL %s: %s\n", label, why);
	    failed++;
	}
    }
    printf("%d passed, %d failed\n", passed, failed);
    return (failed ? 1 : 0);
}
