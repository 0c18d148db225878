/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	fuzz_reply 1
 * SUMMARY
 *	fuzz target: the incremental reply parser (csrc/reply.c)
 * SYNOPSIS
 *	LLVMFuzzerTestOneInput(data, size)
 * DESCRIPTION
 *	The first two bytes seed the split; the rest is server bytes. They
 *	are parsed three ways: whole (one call per reply), in chunks whose
 *	sizes come from the seed, and one byte per call (inputs up to 4 KiB).
 *	Every way must give the same replies and end the same way (the same
 *	error at the same absolute byte, or "more needed").
 *
 *	Every reply must be well formed: a code of three digits 2-5, 0-5,
 *	0-9; text NUL-terminated at text_len, with no NUL inside, no longer
 *	than SMTPS_REPLY_MAX and with nlines - 1 '\n'; an enhanced code that
 *	is empty or a prefix of the text with the same class as the code.
 *	Errors must be sticky and consume nothing afterwards.
 *--*/

#include "fuzz.h"
#include "smtpstate.h"

struct outcome {
    size_t  nreplies;
    uint64_t hash;			/* of every reply's fields, in order */
    int     end;			/* 0: more needed; < 0: the error */
    size_t  err_pos;			/* absolute offset the error names */
};

static uint64_t mix(uint64_t h, const void *p, size_t n);
static void check_reply(const struct smtps_reply *r);
static void run(const uint8_t *in, size_t len, unsigned seed, int mode,
		struct outcome *o);

/* mix - FNV-1a over n bytes */

static uint64_t mix(uint64_t h, const void *p, size_t n)
{
    const unsigned char *c = p;
    size_t  i;

    for (i = 0; i < n; i++)
	h = (h ^ c[i]) * UINT64_C(1099511628211);
    return h;
}

/* check_reply - what every complete reply must look like */

static void check_reply(const struct smtps_reply *r)
{
    size_t  i, nl = 0, elen;

    FUZZ_CHECK(r->code >= 200 && r->code <= 559);
    FUZZ_CHECK(r->code / 10 % 10 <= 5);
    FUZZ_CHECK(r->text != NULL);
    FUZZ_CHECK(r->text_len <= SMTPS_REPLY_MAX);
    FUZZ_CHECK(r->text[r->text_len] == 0);
    FUZZ_CHECK(strlen(r->text) == r->text_len);
    FUZZ_CHECK(r->nlines >= 1);
    for (i = 0; i < r->text_len; i++)
	nl += r->text[i] == '\n';
    FUZZ_CHECK(nl == r->nlines - 1);
    elen = strnlen(r->enhanced, sizeof(r->enhanced));
    FUZZ_CHECK(elen < sizeof(r->enhanced));
    if (elen > 0) {
	FUZZ_CHECK(elen >= 5 && elen <= 9);
	FUZZ_CHECK(r->enhanced[0] == '0' + r->code / 100);
	FUZZ_CHECK(strncmp(r->enhanced, r->text, elen) == 0);
	FUZZ_CHECK(r->text[elen] == 0 || r->text[elen] == ' '
		   || r->text[elen] == '\n');
    }
}

/*
 * run - parse in[0..len) with mode 0 (whole), 1 (seeded chunks) or 2
 * (byte by byte)
 */
static void run(const uint8_t *in, size_t len, unsigned seed, int mode,
		        struct outcome *o)
{
    struct smtps_reply_parser *p = smtps_reply_parser_new();
    struct smtps_reply r;
    size_t  off = 0, chunk, used, used2, base;
    uint32_t rng = seed * 2654435761u + 1;
    int     rc;

    FUZZ_CHECK(p != NULL);
    memset(o, 0, sizeof(*o));
    o->hash = UINT64_C(14695981039346656037);
    while (off < len) {
	if (mode == 0)
	    chunk = len - off;
	else if (mode == 2)
	    chunk = 1;
	else {
	    rng = rng * 1103515245u + 12345u;
	    chunk = 1 + (rng >> 16) % 97;
	}
	if (chunk > len - off)
	    chunk = len - off;
	base = off;
	for (;;) {
	    rc = smtps_reply_parse(p, (const char *) in + off, chunk - (off - base),
				   &used, &r);
	    if (rc < 0) {
		FUZZ_CHECK(rc == SMTPS_EPROTO || rc == SMTPS_ETOOBIG);
		FUZZ_CHECK(used >= 1 && used <= chunk - (off - base));
		o->end = rc;
		o->err_pos = off + used;
		/* Sticky, and nothing more is consumed. */
		FUZZ_CHECK(smtps_reply_parse(p, "220 x\r\n", 7, &used2, &r) == rc);
		FUZZ_CHECK(used2 == 0);
		smtps_reply_parser_free(p);
		return;
	    }
	    if (rc == 0) {
		FUZZ_CHECK(used == chunk - (off - base));
		off = base + chunk;
		break;
	    }
	    FUZZ_CHECK(rc == 1);
	    FUZZ_CHECK(used >= 1 && used <= chunk - (off - base));
	    check_reply(&r);
	    o->nreplies++;
	    o->hash = mix(o->hash, &r.code, sizeof(r.code));
	    /* Only up to its NUL: the bytes after it are not written. */
	    o->hash = mix(o->hash, r.enhanced, strlen(r.enhanced) + 1);
	    o->hash = mix(o->hash, &r.nlines, sizeof(r.nlines));
	    o->hash = mix(o->hash, &r.text_len, sizeof(r.text_len));
	    o->hash = mix(o->hash, r.text, r.text_len);
	    off += used;
	    if (off == base + chunk)
		break;
	}
    }
    smtps_reply_parser_free(p);
}

/* LLVMFuzzerTestOneInput - parse whole, chunked and bytewise; compare */

int     LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct outcome whole, chunked, bytewise;
    unsigned seed;

    if (size < 2)
	return 0;
    seed = data[0] | (unsigned) data[1] << 8;
    data += 2;
    size -= 2;
    run(data, size, seed, 0, &whole);
    run(data, size, seed, 1, &chunked);
    FUZZ_CHECK(whole.nreplies == chunked.nreplies);
    FUZZ_CHECK(whole.hash == chunked.hash);
    FUZZ_CHECK(whole.end == chunked.end);
    FUZZ_CHECK(whole.err_pos == chunked.err_pos);
    if (size <= 4096) {
	run(data, size, seed, 2, &bytewise);
	FUZZ_CHECK(whole.nreplies == bytewise.nreplies);
	FUZZ_CHECK(whole.hash == bytewise.hash);
	FUZZ_CHECK(whole.end == bytewise.end);
	FUZZ_CHECK(whole.err_pos == bytewise.err_pos);
    }
    return 0;
}
