/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	parsers 1
 * SUMMARY
 *	reply parsing rate and body encoding speed, against memcpy
 * SYNOPSIS
 *	parsers
 * DESCRIPTION
 *	reply_single: a buffer of 65536 copies of a single-line reply
 *	("250 2.0.0 Ok: queued as 4Xk9J2mZ3kz1\\r\\n"), parsed reply by
 *	reply with smtps_reply_parse() on one parser; replies per second.
 *
 *	reply_ehlo: the same with a 10-line EHLO reply (smtp-sink's, with
 *	SIZE and CHUNKING added);
 *	replies per second. ehlo_caps: smtps_caps_parse() on the parsed
 *	EHLO reply; calls per second.
 *
 *	body_crlf: smtps_body_encode() with dot-stuffing on a 1 MiB body
 *	of 80-byte CRLF lines, one in ten starting with a dot, into a
 *	64 KiB output buffer (as the session writes it), then
 *	smtps_body_finish(); input GB/s. body_lf: the same body with bare
 *	LF line ends (every line end is rewritten). memcpy: the same
 *	1 MiB copied in 64 KiB pieces, in the same run.
 *
 *	Figures are the best of 5 repeats, each of a fixed amount of
 *	work. Prints "RESULT name value unit" lines.
 * SEE ALSO
 *	csrc/reply.c, csrc/body.c, benchmarks/run.py.
 *--*/

#include <stdlib.h>
#include <string.h>

#include "smtpstate.h"
#include "bench.h"

#define REPEATS 5
#define COPIES 65536
#define BODY_SIZE (1024 * 1024)
#define OUT_SIZE (64 * 1024)
#define BODY_PASSES 200

static const char single[] = "250 2.0.0 Ok: queued as 4Xk9J2mZ3kz1\r\n";
static const char ehlo[] =
"250-smtp-sink\r\n"
"250-PIPELINING\r\n"
"250-8BITMIME\r\n"
"250-AUTH PLAIN LOGIN\r\n"
"250-XCLIENT NAME HELO\r\n"
"250-XFORWARD NAME ADDR PROTO HELO\r\n"
"250-ENHANCEDSTATUSCODES\r\n"
"250-DSN\r\n"
"250-SIZE 10240000\r\n"
"250 CHUNKING\r\n";

/* repeat - copies of one reply, back to back */

static char *repeat(const char *text, size_t *len)
{
    size_t  n = strlen(text), i;
    char   *buf = malloc(n * COPIES);

    if (buf == NULL)
	exit(1);
    for (i = 0; i < COPIES; i++)
	memcpy(buf + i * n, text, n);
    *len = n * COPIES;
    return buf;
}

/* parse_all - seconds to parse every reply in buf; dies on a wrong count */

static double parse_all(const char *buf, size_t len, struct smtps_reply *last)
{
    struct smtps_reply_parser *p = smtps_reply_parser_new();
    size_t  used, count = 0;
    double  t = bench_cpu();
    int     rc;

    while (len > 0) {
	rc = smtps_reply_parse(p, buf, len, &used, last);
	if (rc < 0)
	    exit(2);
	buf += used;
	len -= used;
	if (rc == 1)
	    count++;
    }
    t = bench_cpu() - t;
    if (count != COPIES) {
	fprintf(stderr, "parsers: %zu replies, not %d\n", count, COPIES);
	exit(1);
    }
    bench_sink += (unsigned long) last->code;
    smtps_reply_parser_free(p);
    return t;
}

/* make_body - 80-byte lines, one in ten starting with a dot */

static char *make_body(int crlf)
{
    char   *b = malloc(BODY_SIZE), *q = b;
    size_t  i, line = 0;

    if (b == NULL)
	exit(1);
    while ((size_t) (q - b) + 80 <= BODY_SIZE) {
	for (i = 0; i < 78; i++)
	    q[i] = (char) ('a' + (i + line) % 26);
	if (line % 10 == 0)
	    q[0] = '.';
	if (crlf) {
	    q[78] = '\r';
	    q[79] = '\n';
	    q += 80;
	} else {
	    q[78] = '\n';
	    q += 79;
	}
	line++;
    }
    memset(q, 'z', (size_t) (b + BODY_SIZE - q));
    return b;
}

/* encode - seconds for BODY_PASSES encodings of the body */

static double encode(const char *body, char *out)
{
    struct smtps_body_encoder e;
    size_t  used, off;
    double  t = bench_cpu();
    int     pass;

    for (pass = 0; pass < BODY_PASSES; pass++) {
	smtps_body_init(&e, 1);
	for (off = 0; off < BODY_SIZE; off += used)
	    bench_sink += smtps_body_encode(&e, body + off, BODY_SIZE - off,
					    &used, out, OUT_SIZE);
	bench_sink += smtps_body_finish(&e, out, OUT_SIZE, 1);
    }
    return bench_cpu() - t;
}

/* copy - seconds for BODY_PASSES copies of the body in OUT_SIZE pieces */

static double copy(const char *body, char *out)
{
    double  t = bench_cpu();
    size_t  off;
    int     pass;

    for (pass = 0; pass < BODY_PASSES; pass++) {
	for (off = 0; off < BODY_SIZE; off += OUT_SIZE) {
	    memcpy(out, body + off, OUT_SIZE);
	    __asm__ volatile ("" : : "r"(out) : "memory");
	}
    }
    return bench_cpu() - t;
}

int     main(void)
{
    struct smtps_reply last;
    struct smtps_caps caps;
    size_t  slen, elen;
    char   *sbuf = repeat(single, &slen), *ebuf = repeat(ehlo, &elen);
    char   *crlf = make_body(1), *lf = make_body(0), *out = malloc(OUT_SIZE);
    double  b_single = 1e9, b_ehlo = 1e9, b_caps = 1e9, b_crlf = 1e9,
	    b_lf = 1e9, b_copy = 1e9, t;
    int     r, i;

    if (out == NULL)
	return 1;
    for (r = 0; r < REPEATS; r++) {
	if ((t = parse_all(sbuf, slen, &last)) < b_single)
	    b_single = t;
	if ((t = parse_all(ebuf, elen, &last)) < b_ehlo)
	    b_ehlo = t;
	/* last is the final EHLO reply; its text lives in the freed parser,
	 * so parse one more to keep a valid one for the caps loop. */
	{
	    struct smtps_reply_parser *p = smtps_reply_parser_new();
	    size_t  used;

	    if (smtps_reply_parse(p, ehlo, strlen(ehlo), &used, &last) != 1)
		return 1;
	    t = bench_cpu();
	    for (i = 0; i < COPIES; i++) {
		smtps_caps_parse(&last, &caps);
		bench_sink += caps.ext;
	    }
	    t = bench_cpu() - t;
	    smtps_reply_parser_free(p);
	    if (t < b_caps)
		b_caps = t;
	}
	if ((t = encode(crlf, out)) < b_crlf)
	    b_crlf = t;
	if ((t = encode(lf, out)) < b_lf)
	    b_lf = t;
	if ((t = copy(crlf, out)) < b_copy)
	    b_copy = t;
    }
    bench_report("reply_single_per_s", COPIES / b_single, "replies/s");
    bench_report("reply_ehlo_per_s", COPIES / b_ehlo, "replies/s");
    bench_report("ehlo_caps_per_s", COPIES / b_caps, "calls/s");
    bench_report("body_crlf_gbps", (double) BODY_SIZE * BODY_PASSES / b_crlf / 1e9, "GB/s");
    bench_report("body_lf_gbps", (double) BODY_SIZE * BODY_PASSES / b_lf / 1e9, "GB/s");
    bench_report("memcpy_gbps", (double) BODY_SIZE * BODY_PASSES / b_copy / 1e9, "GB/s");
    free(sbuf);
    free(ebuf);
    free(crlf);
    free(lf);
    free(out);
    return 0;
}
