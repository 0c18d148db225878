/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	fuzz.h 3h
 * SUMMARY
 *	helpers shared by the fuzz targets
 * SYNOPSIS
 *	#include "fuzz.h"
 * DESCRIPTION
 *	A byte reader over the fuzzer's input (reads past the end give 0,
 *	so that short inputs mean "the default choice" everywhere), a
 *	growable byte buffer, the reference body normaliser and the
 *	server-side DATA decoder the targets compare the client against,
 *	and FUZZ_CHECK(), which reports a broken invariant and aborts so
 *	that libFuzzer (or the standalone driver) keeps the input.
 *
 *	Each target defines LLVMFuzzerTestOneInput(). Built with clang
 *	-fsanitize=fuzzer it runs under libFuzzer (fuzz/run.sh); built with
 *	fuzz/standalone.c it replays files (tests/test_fuzz_regressions.py).
 * SEE ALSO
 *	fuzz/README.md
 *--*/

#ifndef SMTPS_FUZZ_H
#define SMTPS_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int     LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* FUZZ_CHECK - an invariant; a broken one aborts with where and what */
#define FUZZ_CHECK(cond) do { \
	if (!(cond)) { \
	    fprintf(stderr, "%s:%d: invariant broken: %s\n", __FILE__, \
		    __LINE__, #cond); \
	    abort(); \
	} \
    } while (0)

/* The input, read front to back. */
struct fz_reader {
    const uint8_t *p;
    size_t  n;
};

/* fz_u8 - next byte, 0 once the input is used up */

static inline unsigned fz_u8(struct fz_reader *r)
{
    if (r->n == 0)
	return 0;
    r->n--;
    return *r->p++;
}

/* fz_u16 - next two bytes, little-endian */

static inline unsigned fz_u16(struct fz_reader *r)
{
    unsigned lo = fz_u8(r);

    return lo | fz_u8(r) << 8;
}

/* fz_take - up to max bytes of input, by pointer; returns how many */

static inline size_t fz_take(struct fz_reader *r, size_t max,
			             const uint8_t **out)
{
    size_t  n = r->n < max ? r->n : max;

    *out = r->p;
    r->p += n;
    r->n -= n;
    return n;
}

/* A growable byte buffer; a failed allocation aborts (not a finding). */
struct fz_buf {
    unsigned char *data;
    size_t  len;
    size_t  cap;
};

/* fz_add - append n bytes */

static inline void fz_add(struct fz_buf *b, const void *p, size_t n)
{
    size_t  cap;

    if (b->cap - b->len < n) {
	for (cap = b->cap ? b->cap : 256; cap - b->len < n; cap *= 2)
	     /* void */ ;
	if ((b->data = realloc(b->data, cap)) == NULL)
	    abort();
	b->cap = cap;
    }
    if (n > 0)
	memcpy(b->data + b->len, p, n);
    b->len += n;
}

/* fz_adds - append a string */

static inline void fz_adds(struct fz_buf *b, const char *s)
{
    fz_add(b, s, strlen(s));
}

/* fz_drop - forget the first n bytes */

static inline void fz_drop(struct fz_buf *b, size_t n)
{
    if (n >= b->len) {
	b->len = 0;
	return;
    }
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
}

/* fz_free - release a buffer */

static inline void fz_free(struct fz_buf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

/* fz_reserve - room for n more bytes; returns where they go */

static inline unsigned char *fz_reserve(struct fz_buf *b, size_t n)
{
    size_t  cap;

    if (b->data == NULL || b->cap - b->len < n) {
	for (cap = b->cap ? b->cap : 256; cap - b->len < n; cap *= 2)
	     /* void */ ;
	if ((b->data = realloc(b->data, cap)) == NULL)
	    abort();
	b->cap = cap;
    }
    return b->data + b->len;
}

/*
 * fz_normalize - the reference body normaliser (RFC 5321 2.3.8), written
 * the obvious way, byte by byte: CR LF, a bare CR and a bare LF each
 * become CR LF, and a non-empty body whose last line is unterminated
 * gets CR LF. No dot-stuffing.
 */
static inline void fz_normalize(struct fz_buf *out, const unsigned char *in,
				        size_t len)
{
    unsigned char *o = fz_reserve(out, 2 * len + 2), *start = o;
    size_t  i;

    for (i = 0; i < len; i++) {
	if (in[i] == '\r') {
	    *o++ = '\r';
	    *o++ = '\n';
	    if (i + 1 < len && in[i + 1] == '\n')
		i++;
	} else if (in[i] == '\n') {
	    *o++ = '\r';
	    *o++ = '\n';
	} else {
	    *o++ = in[i];
	}
    }
    if (len > 0 && in[len - 1] != '\r' && in[len - 1] != '\n') {
	*o++ = '\r';
	*o++ = '\n';
    }
    out->len += (size_t) (o - start);
}

/*
 * fz_bare_eol - offset of the first CR not followed by LF or LF not
 * preceded by CR in buf, or -1. A CR as the very last byte counts only
 * when final is set (otherwise its LF may still come).
 */
static inline long fz_bare_eol(const unsigned char *buf, size_t len,
			               int final)
{
    size_t  i;

    for (i = 0; i < len; i++) {
	if (buf[i] == '\n' && (i == 0 || buf[i - 1] != '\r'))
	    return (long) i;
	if (buf[i] == '\r' && (i + 1 < len ? buf[i + 1] != '\n' : final))
	    return (long) i;
    }
    return -1;
}

/*
 * fz_data_end - a server reading DATA (RFC 5321 4.5.2): the offset just
 * past the end-of-data line ".\r\n" in the DATA stream buf, or 0 while it
 * has not come. The stream starts at a line start. *scan (0 at first) is
 * a line start before which no end-of-data line can be: the search
 * resumes there, so feeding a stream in many pieces stays linear.
 */
static inline size_t fz_data_end(const unsigned char *buf, size_t len,
				         size_t *scan)
{
    const unsigned char *p;
    size_t  i = *scan;

    while (i < len) {
	if (len - i < 3)
	    break;
	if (memcmp(buf + i, ".\r\n", 3) == 0)
	    return i + 3;
	/* Skip to the next line start. */
	for (p = buf + i;; p++) {
	    p = memchr(p, '\r', len - (size_t) (p - buf));
	    if (p == NULL || p + 1 >= buf + len)
		goto partial;
	    if (p[1] == '\n')
		break;
	}
	i = (size_t) (p - buf) + 2;
	*scan = i;
    }
  partial:
    return 0;
}

/*
 * fz_unstuff - a server's view of a DATA stream up to (not including)
 * its end-of-data line: each line's leading dot removed (RFC 5321
 * 4.5.2). The stream is CRLF-lined.
 */
static inline void fz_unstuff(struct fz_buf *out, const unsigned char *buf,
			              size_t len)
{
    unsigned char *o = fz_reserve(out, len), *start = o;
    size_t  i;
    int     bol = 1;

    for (i = 0; i < len; i++) {
	if (bol && buf[i] == '.') {
	    bol = 0;
	    continue;
	}
	*o++ = buf[i];
	bol = (buf[i] == '\n' && i > 0 && buf[i - 1] == '\r');
    }
    out->len += (size_t) (o - start);
}

#endif /* SMTPS_FUZZ_H */
