/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	fuzz_body 1
 * SUMMARY
 *	fuzz target: the body encoder (csrc/body.c)
 * SYNOPSIS
 *	LLVMFuzzerTestOneInput(data, size)
 * DESCRIPTION
 *	The first two bytes seed the input chunks and output room; the rest
 *	is a message body. It is encoded for DATA (dot-stuffed, end-of-data
 *	line) and for BDAT (neither), each whole and in seeded chunks with
 *	seeded output room, down to less than SMTPS_BODY_STEP_MAX.
 *
 *	Invariants: chunked output equals whole output; no CR or LF outside
 *	a CR LF pair; for DATA, the first end-of-data line a server finds
 *	is the last line, and the dot-unstuffed content before it equals
 *	the reference normalisation of the body (so no body can end the data
 *	early: SMTP smuggling); for BDAT, the output is the normalised body
 *	and its length is smtps_body_encoded_length(); out_total counts every
 *	byte; smtps_body_is_8bit() agrees with a plain loop.
 *--*/

#include "fuzz.h"
#include "smtpstate.h"

static void encode(const uint8_t *in, size_t len, int dot_stuff,
		   unsigned seed, struct fz_buf *out);

/* encode - whole (seed 0) or in seeded chunks with seeded output room */

static void encode(const uint8_t *in, size_t len, int dot_stuff,
		           unsigned seed, struct fz_buf *out)
{
    struct smtps_body_encoder e;
    char    room[512];
    size_t  off = 0, chunk, used, n, cap, stalls = 0;
    uint32_t rng = seed * 2654435761u + 7;

    smtps_body_init(&e, dot_stuff);
    while (off < len) {
	if (seed == 0) {
	    chunk = len - off;
	    cap = sizeof(room);
	} else {
	    rng = rng * 1103515245u + 12345u;
	    chunk = 1 + (rng >> 8) % 64;
	    cap = (rng >> 20) % 40;		/* 0 .. 39: often too little */
	}
	if (chunk > len - off)
	    chunk = len - off;
	n = smtps_body_encode(&e, (const char *) in + off, chunk, &used, room,
			      cap);
	FUZZ_CHECK(n <= cap);
	FUZZ_CHECK(used <= chunk);
	/* Enough room always makes progress. */
	if (cap >= SMTPS_BODY_STEP_MAX)
	    FUZZ_CHECK(used > 0);
	stalls = used ? 0 : stalls + 1;
	FUZZ_CHECK(stalls < 1000);
	fz_add(out, room, n);
	off += used;
    }
    /* Too little room for the end writes nothing. */
    FUZZ_CHECK(smtps_body_finish(&e, room, SMTPS_BODY_FINISH_MAX - 1, 1) == 0);
    n = smtps_body_finish(&e, room, SMTPS_BODY_FINISH_MAX, dot_stuff);
    fz_add(out, room, n);
    FUZZ_CHECK(e.out_total == out->len);
}

/* LLVMFuzzerTestOneInput - encode both ways, check the invariants */

int     LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fz_buf whole = {0}, chunked = {0}, norm = {0}, plain = {0};
    unsigned seed;
    size_t  end, i, scan;
    int     dot, eight = 0;

    if (size < 2)
	return 0;
    seed = (data[0] | (unsigned) data[1] << 8) | 1u;
    data += 2;
    size -= 2;
    fz_normalize(&norm, data, size);
    FUZZ_CHECK(smtps_body_encoded_length((const char *) data, size) == norm.len);
    for (i = 0; i < size; i++)
	eight |= data[i] >= 0x80;
    FUZZ_CHECK(smtps_body_is_8bit((const char *) data, size) == eight);

    for (dot = 0; dot <= 1; dot++) {
	whole.len = chunked.len = plain.len = 0;
	encode(data, size, dot, 0, &whole);
	encode(data, size, dot, seed, &chunked);
	FUZZ_CHECK(whole.len == chunked.len);
	FUZZ_CHECK(whole.len == 0
		   || memcmp(whole.data, chunked.data, whole.len) == 0);
	FUZZ_CHECK(fz_bare_eol(whole.data, whole.len, 1) < 0);
	if (!dot) {
	    FUZZ_CHECK(whole.len == norm.len);
	    FUZZ_CHECK(norm.len == 0 || memcmp(whole.data, norm.data, norm.len) == 0);
	    continue;
	}
	/* A server finds the end-of-data line exactly at the end. */
	scan = 0;
	end = fz_data_end(whole.data, whole.len, &scan);
	FUZZ_CHECK(end == whole.len);
	fz_unstuff(&plain, whole.data, whole.len - 3);
	FUZZ_CHECK(plain.len == norm.len);
	FUZZ_CHECK(norm.len == 0 || memcmp(plain.data, norm.data, norm.len) == 0);
    }
    fz_free(&whole);
    fz_free(&chunked);
    fz_free(&norm);
    fz_free(&plain);
    return 0;
}
