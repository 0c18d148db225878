/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	body 3
 * SUMMARY
 *	message body encoder: CRLF normalisation and dot-stuffing
 * SYNOPSIS
 *	#include "smtpstate.h"
 *
 *	void	smtps_body_init(e, dot_stuff)
 *	struct smtps_body_encoder *e;
 *	int	dot_stuff;
 *
 *	size_t	smtps_body_encode(e, in, inlen, in_used, out, outcap)
 *	struct smtps_body_encoder *e;
 *	const char *in;
 *	size_t	inlen;
 *	size_t	*in_used;
 *	char	*out;
 *	size_t	outcap;
 *
 *	#include "internal.h"
 *
 *	size_t	smtps_body_step(e, in, inlen, in_used, out, outcap, limit,
 *				verbatim)
 *	struct smtps_body_encoder *e;
 *	const char *in;
 *	size_t	inlen;
 *	size_t	*in_used;
 *	char	*out;
 *	size_t	outcap;
 *	size_t	limit;
 *	size_t	*verbatim;
 *
 *	int	smtps_body_inspect(in, len, flags, size, is_8bit)
 *	const char *in;
 *	size_t	len;
 *	unsigned flags;
 *	uint64_t *size;
 *	int	*is_8bit;
 *
 *	size_t	smtps_body_finish(e, out, outcap, end_dot)
 *	struct smtps_body_encoder *e;
 *	char	*out;
 *	size_t	outcap;
 *	int	end_dot;
 *
 *	uint64_t smtps_body_encoded_length(in, len)
 *	const char *in;
 *	size_t	len;
 *
 *	int	smtps_body_is_8bit(in, len)
 *	const char *in;
 *	size_t	len;
 *
 *	void	smtps_body_scan_init(sc, flags)
 *	int	smtps_body_scan(sc, in, len)
 *	int	smtps_body_scan_finish(sc)
 *	int	smtps_body_check(in, len, flags)
 * DESCRIPTION
 *	This module turns a message body, as the user gave it, into the
 *	bytes that go on the wire after DATA (dot_stuff = 1) or inside
 *	BDAT chunks (dot_stuff = 0).
 *
 *	Every line ending becomes CR LF: CR LF stays, a bare CR and a bare
 *	LF each become CR LF. With dot_stuff, a '.' that starts a line
 *	(the start of the body counts) is doubled (RFC 5321 4.5.2). Other
 *	bytes, NUL and 8-bit bytes included, pass through unchanged.
 *
 *	smtps_body_init() prepares an encoder; the body starts at a line
 *	start.
 *
 *	smtps_body_encode() encodes as much of in as fits into out and
 *	stores in *in_used how many input bytes it consumed. It never
 *	splits the output of one input byte, so a call may consume less
 *	than all input; with outcap >= SMTPS_BODY_STEP_MAX it consumes at
 *	least one byte of non-empty input. The output does not depend on
 *	how the input is split into calls.
 *
 *	smtps_body_step() is smtps_body_encode() for a sender that writes
 *	from the caller's memory (writev): one step consumes *in_used input
 *	bytes and stands for the bytes it wrote to out (what the encoder
 *	adds or changes: a CR LF for a bare CR or LF, the extra dot of a
 *	stuffed one) followed by the last *verbatim of those input bytes,
 *	which go to the wire as they are. Its output, step after step, is
 *	byte for byte smtps_body_encode()'s. A step's output (the written
 *	bytes and the verbatim ones) is never more than limit octets (a
 *	BDAT chunk's length); with outcap >= SMTPS_BODY_STEP_MAX and limit
 *	>= SMTPS_BODY_STEP_MAX it consumes at least one byte of non-empty
 *	input.
 *
 *	smtps_body_inspect() is smtps_body_scan() of a whole body for what
 *	a message keeps of it: its first problem (0: none), and when there
 *	is none its RFC 1870 size and whether it is 8-bit. The usual body
 *	(smtps_body_check()'s quick case) is measured by counting CRs, LFs
 *	and CR LF pairs, 16 bytes at a time with SSE2: the size is the
 *	length plus one for every CR and every LF not in a pair, plus two
 *	for an unterminated last line, which is what the scan adds up.
 *
 *	smtps_body_finish() completes an unterminated last line with CR
 *	LF and then, with end_dot, appends the end-of-data line ".\r\n".
 *	It writes nothing unless outcap >= SMTPS_BODY_FINISH_MAX.
 *
 *	smtps_body_encoded_length() is the size the body has after
 *	normalisation and completion of its last line, without
 *	dot-stuffing: what BDAT announces. An empty body has length 0.
 *
 *	smtps_body_is_8bit() tells whether any byte has the high bit set,
 *	that is, whether the body needs 8BITMIME.
 *
 *	smtps_body_scan() learns, in one pass split anywhere, what decides
 *	whether and how a body may be sent (smtpstate.h says why each
 *	matters): its first NUL, its first line over SMTPS_LINE_OCTETS_MAX
 *	octets (unless allowed), whether it is 8-bit, and its RFC 1870 size,
 *	which smtps_body_scan_finish() completes. Line endings count as the
 *	encoder treats them, a CR LF split between two pieces included.
 *
 *	smtps_body_check() gives the problem smtps_body_scan() would find
 *	in a whole body (0: none). A body without NUL whose LFs are never
 *	more than SMTPS_LINE_OCTETS_MAX octets apart, the usual one, is
 *	settled by memchr() and a step back from every 999th octet to the
 *	LF before it, without the scan; any other is scanned.
 *
 *	Invariant: after smtps_body_finish(), the output holds no CR or LF
 *	outside a CR LF pair, and no line other than the final one is a
 *	lone ".". So no body, however hostile (for example "\n.\n" or
 *	"\r.\r", the SMTP smuggling vectors), can end the data early.
 * DIAGNOSTICS
 *	smtps_body_encode() and smtps_body_finish() return the number of
 *	bytes written; 0 with a NULL encoder or buffer.
 * SEE ALSO
 *	RFC 5321 2.3.8 (lines), 4.5.2 (transparency); RFC 3030 (BDAT);
 *	RFC 6152 (8BITMIME).
 *--*/

#include <string.h>

#include "internal.h"

/*
 * Runs of ordinary bytes end at the next CR or LF. With SSE2 (every
 * x86-64) one pass looks for both, 16 bytes at a time. Elsewhere two
 * memchr() searches do it, and their results are cached across one
 * smtps_body_encode() call: [p, next_cr) holds no CR, and next_cr is
 * either a CR or the end of the window searched; a cached position at or
 * before p is stale. The cache keeps each byte searched at most once per
 * call, also for a body with no CR (or no LF) at all. Define
 * SMTPS_BODY_NO_SSE2 to build and test the portable code on x86.
 */
#if defined(__SSE2__) && !defined(SMTPS_BODY_NO_SSE2)
#define BODY_USE_SSE2
#include <emmintrin.h>
#endif

struct body_scan {
    const char *next_cr;		/* portable code only */
    const char *next_lf;		/* portable code only */
};

static const char *body_eol(struct body_scan *sc, const char *p,
			           const char *lim);
static const char *body_special(const char *p, const char *end, int *hi);
static void scan_problem(struct smtps_body_scan *sc, int kind,
			 uint64_t offset);
static void scan_line_end(struct smtps_body_scan *sc);
static int body_surely_fine(const char *in, size_t len, uint64_t limit);
static void body_measure(const char *in, size_t len, uint64_t *size,
			         int *is_8bit);

/* body_eol - first CR or LF in [p, lim), or lim */

static const char *body_eol(struct body_scan *sc, const char *p,
			           const char *lim)
{
#ifdef BODY_USE_SSE2
    const __m128i cr = _mm_set1_epi8('\r');
    const __m128i lf = _mm_set1_epi8('\n');

    (void) sc;
    while (lim - p >= 16) {
	__m128i v = _mm_loadu_si128((const __m128i *) p);
	int     hit = _mm_movemask_epi8(_mm_or_si128(_mm_cmpeq_epi8(v, cr),
						      _mm_cmpeq_epi8(v, lf)));

	if (hit != 0)
	    return (p + __builtin_ctz((unsigned) hit));
	p += 16;
    }
    while (p < lim && *p != '\r' && *p != '\n')
	p++;
    return (p);
#else
    const char *stop;

    if (sc->next_cr <= p
	&& (sc->next_cr = memchr(p, '\r', (size_t) (lim - p))) == 0)
	sc->next_cr = lim;
    if (sc->next_lf <= p
	&& (sc->next_lf = memchr(p, '\n', (size_t) (lim - p))) == 0)
	sc->next_lf = lim;
    stop = (sc->next_cr < sc->next_lf) ? sc->next_cr : sc->next_lf;
    return (stop < lim ? stop : lim);
#endif
}

/* smtps_body_init - prepare an encoder for a new body */

void    smtps_body_init(struct smtps_body_encoder *e, int dot_stuff)
{
    if (e == 0)
	return;
    e->dot_stuff = (dot_stuff != 0);
    e->at_line_start = 1;
    e->after_cr = 0;
    e->out_total = 0;
}

/* smtps_body_encode - normalise and dot-stuff as much input as fits */

size_t  smtps_body_encode(struct smtps_body_encoder *e, const char *in,
			  size_t inlen, size_t *in_used, char *out,
			  size_t outcap)
{
    const char *ip;
    const char *iend;
    const char *lim;
    char   *op;
    char   *oend;
    size_t  room;
    size_t  n;
    int     at_line_start;
    int     after_cr;
    struct body_scan scan;

    if (in_used)
	*in_used = 0;
    if (e == 0 || in_used == 0 || (in == 0 && inlen > 0)
	|| (out == 0 && outcap > 0) || inlen == 0)
	return (0);
    ip = in;
    iend = in + inlen;
    op = out;
    oend = out + outcap;
    at_line_start = e->at_line_start;
    after_cr = e->after_cr;
    scan.next_cr = scan.next_lf = in;

    /*
     * One line ending or one stuffed dot per iteration, otherwise a whole
     * run of ordinary bytes copied at once. The per-byte rules, which the
     * runs must agree with:
     * 
     * CR: emit CR LF, remember the CR. LF right after a CR: emit nothing,
     * that CR already produced the LF. Any other LF: emit CR LF. This
     * needs no lookahead, so a CR at the end of one call and its LF at
     * the start of the next give the same bytes as one call.
     * 
     * '.' at a line start with dot_stuff: emit "..". Anything else: copy.
     */
    while (ip < iend) {
	unsigned char c = (unsigned char) *ip;

	if (c == '\r') {
	    if (oend - op < 2)
		break;
	    *op++ = '\r';
	    *op++ = '\n';
	    at_line_start = 1;
	    /* Swallow the LF of a CR LF pair now when it is here. */
	    if (iend - ip >= 2 && ip[1] == '\n') {
		ip += 2;
		after_cr = 0;
	    } else {
		ip += 1;
		after_cr = 1;
	    }
	    continue;
	}
	if (c == '\n') {
	    if (after_cr) {
		ip++;
		after_cr = 0;
		continue;
	    }
	    if (oend - op < 2)
		break;
	    *op++ = '\r';
	    *op++ = '\n';
	    at_line_start = 1;
	    ip++;
	    continue;
	}
	if (c == '.' && at_line_start && e->dot_stuff) {
	    if (oend - op < 2)
		break;
	    *op++ = '.';
	    *op++ = '.';
	    at_line_start = 0;
	    after_cr = 0;
	    ip++;
	    continue;
	}

	/*
	 * A run of ordinary bytes: up to the next CR or LF, and no longer
	 * than the room left, since each yields exactly one byte. Dots
	 * inside the run are not at a line start.
	 */
	if ((room = (size_t) (oend - op)) == 0)
	    break;
	lim = ((size_t) (iend - ip) > room) ? ip + room : iend;
	n = (size_t) (body_eol(&scan, ip, lim) - ip);
	memcpy(op, ip, n);
	op += n;
	ip += n;
	at_line_start = 0;
	after_cr = 0;
    }

    e->at_line_start = at_line_start;
    e->after_cr = after_cr;
    e->out_total += (uint64_t) (op - out);
    *in_used = (size_t) (ip - in);
    return ((size_t) (op - out));
}

/*
 * smtps_body_step - one step of the encoding without copying the input:
 * the bytes the encoder adds or changes into out, then a run of input
 * bytes that go as they are
 */

size_t  smtps_body_step(struct smtps_body_encoder *e, const char *in,
			        size_t inlen, size_t *in_used, char *out,
			        size_t outcap, size_t limit, size_t *verbatim)
{
    const char *ip, *iend, *run, *lim;
    char   *op, *oend;
    int     at_line_start, after_cr;
    struct body_scan scan;

    if (in_used)
	*in_used = 0;
    if (verbatim)
	*verbatim = 0;
    if (e == 0 || in_used == 0 || verbatim == 0 || in == 0 || inlen == 0
	|| (out == 0 && outcap > 0))
	return (0);
    ip = in;
    iend = in + inlen;
    op = out;
    oend = out + (outcap < limit ? outcap : limit);
    at_line_start = e->at_line_start;
    after_cr = e->after_cr;
    scan.next_cr = scan.next_lf = in;

    /*
     * First what cannot go as it is, by the rules of smtps_body_encode():
     * a bare CR or LF becomes CR LF, the LF of a CR LF split across calls
     * yields nothing, a dot at a line start is doubled. The first dot is
     * written here and the second is the input's own, which then starts
     * the verbatim run: the wire gets ".." either way.
     */
    while (ip < iend) {
	unsigned char c = (unsigned char) *ip;

	if (c == '\n' && after_cr) {
	    ip++;
	    after_cr = 0;
	    continue;
	}
	if (c == '\n' || (c == '\r' && (iend - ip < 2 || ip[1] != '\n'))) {
	    if (oend - op < 2)
		break;
	    *op++ = '\r';
	    *op++ = '\n';
	    at_line_start = 1;
	    after_cr = (c == '\r');
	    ip++;
	    continue;
	}
	if (c == '.' && at_line_start && e->dot_stuff) {
	    if (oend - op < 1)
		break;
	    *op++ = '.';
	    at_line_start = 0;
	}
	break;
    }

    /*
     * Then the run that goes as it is: ordinary bytes, CR LF pairs whole
     * (a CR whose LF is not in this input is not taken: it may be bare),
     * and dots not at a line start, up to what the limit leaves.
     */
    run = ip;
    lim = iend;
    if ((size_t) (lim - ip) > limit - (size_t) (op - out))
	lim = ip + (limit - (size_t) (op - out));
    while (ip < lim) {
	unsigned char c = (unsigned char) *ip;

	if (c == '\r') {
	    if (lim - ip < 2 || ip[1] != '\n')
		break;
	    ip += 2;
	    at_line_start = 1;
	    after_cr = 0;
	    continue;
	}
	if (c == '\n' || (c == '.' && at_line_start && e->dot_stuff))
	    break;
	ip = body_eol(&scan, ip, lim);
	at_line_start = 0;
	after_cr = 0;
    }

    e->at_line_start = at_line_start;
    e->after_cr = after_cr;
    *verbatim = (size_t) (ip - run);
    *in_used = (size_t) (ip - in);
    e->out_total += (uint64_t) (op - out) + *verbatim;
    return ((size_t) (op - out));
}

/* smtps_body_finish - end the last line, then the end-of-data line */

size_t  smtps_body_finish(struct smtps_body_encoder *e, char *out,
			  size_t outcap, int end_dot)
{
    char   *op = out;

    if (e == 0 || out == 0 || outcap < SMTPS_BODY_FINISH_MAX)
	return (0);
    if (!e->at_line_start) {
	*op++ = '\r';
	*op++ = '\n';
    }
    if (end_dot) {
	*op++ = '.';
	*op++ = '\r';
	*op++ = '\n';
    }

    /*
     * The body is complete: whatever follows starts a new line, and a
     * pending CR was ended already (its CR LF is in the output).
     */
    e->at_line_start = 1;
    e->after_cr = 0;
    e->out_total += (uint64_t) (op - out);
    return ((size_t) (op - out));
}

/* smtps_body_encoded_length - size of the normalised body, no stuffing */

uint64_t smtps_body_encoded_length(const char *in, size_t len)
{
    struct smtps_body_scan sc;

    smtps_body_scan_init(&sc, SMTPS_BODY_ALLOW_LONG_LINES);
    (void) smtps_body_scan(&sc, in, len);
    (void) smtps_body_scan_finish(&sc);
    return (sc.size);
}

/* smtps_body_is_8bit - does any byte have the high bit set */

int     smtps_body_is_8bit(const char *in, size_t len)
{
    const unsigned char *p = (const unsigned char *) in;
    const unsigned char *end;

    if (in == 0)
	return (0);
    end = p + len;

    /*
     * Eight bytes at a time; memcpy keeps the loads legal at any
     * alignment and compiles to one load.
     */
    while (end - p >= 8) {
	uint64_t w;

	memcpy(&w, p, sizeof(w));
	if ((w & UINT64_C(0x8080808080808080)) != 0)
	    return (1);
	p += 8;
    }
    while (p < end)
	if (*p++ & 0x80)
	    return (1);
    return (0);
}

/*
 * body_special - first CR, LF or NUL in [p, end), or end; *hi set when a
 * byte before it has the high bit set. SSE2 looks at 16 bytes at a time.
 */

static const char *body_special(const char *p, const char *end, int *hi)
{
#ifdef BODY_USE_SSE2
    const __m128i cr = _mm_set1_epi8('\r');
    const __m128i lf = _mm_set1_epi8('\n');
    const __m128i nul = _mm_setzero_si128();

    while (end - p >= 16) {
	__m128i v = _mm_loadu_si128((const __m128i *) p);
	unsigned special = (unsigned) _mm_movemask_epi8(
	    _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, cr),
				      _mm_cmpeq_epi8(v, lf)),
			 _mm_cmpeq_epi8(v, nul)));
	unsigned high = (unsigned) _mm_movemask_epi8(v);

	if (special != 0) {
	    if (high & ((1u << __builtin_ctz(special)) - 1))
		*hi = 1;
	    return (p + __builtin_ctz(special));
	}
	if (high)
	    *hi = 1;
	p += 16;
    }
#endif
    for (; p < end; p++) {
	if (*p == '\r' || *p == '\n' || *p == 0)
	    break;
	if (*p & 0x80)
	    *hi = 1;
    }
    return (p);
}

/* scan_problem - remember the first problem and where it is */

static void scan_problem(struct smtps_body_scan *sc, int kind,
			         uint64_t offset)
{
    if (sc->problem != 0)
	return;
    sc->problem = kind;
    sc->problem_line = sc->line;
    sc->problem_offset = offset;
}

/* scan_line_end - a line ended (a CR, or an LF not after a CR) */

static void scan_line_end(struct smtps_body_scan *sc)
{
    if (sc->line_len > sc->longest)
	sc->longest = sc->line_len;
    sc->line++;
    sc->line_len = 0;
}

/* smtps_body_scan_init - a scan of a body from its start */

void    smtps_body_scan_init(struct smtps_body_scan *sc, unsigned flags)
{
    memset(sc, 0, sizeof(*sc));
    sc->flags = flags;
    sc->line = 1;
}

/*
 * smtps_body_scan - learn what the next piece of a body holds
 *
 * Line endings count as smtps_body_encode() treats them: CR LF, a bare CR
 * and a bare LF each end a line and are sent as CR LF (two octets). A CR
 * at the end of one piece and an LF at the start of the next are one CR
 * LF, so that no split changes what is learned.
 */

int     smtps_body_scan(struct smtps_body_scan *sc, const char *in, size_t len)
{
    const char *p = in, *end, *run;
    uint64_t limit = (sc->flags & SMTPS_BODY_ALLOW_LONG_LINES) ?
	UINT64_MAX : SMTPS_LINE_OCTETS_MAX;
    uint64_t before, n;
    int     hi = 0;

    if (in == 0)				/* (NULL + 0 is undefined too) */
	return (sc->problem);
    end = in + len;
    while (p < end) {
	run = body_special(p, end, &hi);
	if (run > p) {
	    n = (uint64_t) (run - p);
	    before = sc->line_len;
	    sc->after_cr = 0;
	    sc->line_len += n;
	    sc->size += n;
	    /* Over the limit: where is the first octet too many. */
	    if (sc->line_len > limit)
		scan_problem(sc, SMTPS_BODY_LONG_LINE, sc->offset
			     + (before < limit ? limit - before : 0));
	    sc->offset += n;
	    p = run;
	    if (p == end)
		break;
	}
	switch (*p) {
	case '\r':
	    sc->size += 2;			/* sent as CR LF */
	    sc->after_cr = 1;
	    scan_line_end(sc);
	    break;
	case '\n':
	    if (sc->after_cr)			/* the LF of a CR LF: counted */
		sc->after_cr = 0;
	    else {
		sc->size += 2;
		scan_line_end(sc);
	    }
	    break;
	default:				/* NUL */
	    sc->after_cr = 0;
	    scan_problem(sc, SMTPS_BODY_NUL, sc->offset);
	    sc->size++;
	    if (++sc->line_len > limit)
		scan_problem(sc, SMTPS_BODY_LONG_LINE, sc->offset);
	    break;
	}
	sc->offset++;
	p++;
    }
    if (hi)
	sc->is_8bit = 1;
    return (sc->problem);
}

/*
 * body_surely_fine - no NUL byte, and no line over limit octets: 1; 0 when
 * it cannot tell so quickly
 *
 * A line ends at a CR or an LF, so a body in which no run of more than
 * limit octets is without an LF has no line over limit either, whatever
 * its line endings. The window of limit + 1 octets after each LF found
 * must hold another LF (its last one is taken, so that a body of short
 * lines is crossed about limit octets at a time), until what is left is
 * no longer than limit. Never 1 where smtps_body_scan() finds a problem;
 * 0 sends a body with bare CR line endings, or a long line, to the scan.
 */

static int body_surely_fine(const char *in, size_t len, uint64_t limit)
{
    size_t  off = 0, i;

    if (len == 0)
	return (1);
    if (memchr(in, 0, len) != NULL)
	return (0);
    while ((uint64_t) (len - off) > limit) {
	i = off + (size_t) limit;		/* the window: [off, i] */
	while (i > off && in[i] != '\n')
	    i--;
	if (in[i] != '\n')
	    return (0);
	off = i + 1;
    }
    return (1);
}

/* smtps_body_check - scan a whole body at once: 0, or its first problem */

int     smtps_body_check(const char *in, size_t len, unsigned flags)
{
    struct smtps_body_scan sc;

    /* The usual body: one quick look, no line counting. */
    if (in != NULL
	&& body_surely_fine(in, len, (flags & SMTPS_BODY_ALLOW_LONG_LINES) ?
			    UINT64_MAX : SMTPS_LINE_OCTETS_MAX))
	return (0);
    smtps_body_scan_init(&sc, flags);
    (void) smtps_body_scan(&sc, in, len);
    return (smtps_body_scan_finish(&sc));
}

/*
 * body_measure - size and 8-bit of a body without NUL: len, plus one for
 * each CR and each LF that is not part of a CR LF pair (each becomes CR
 * LF), plus two when the last line is unterminated
 */

static void body_measure(const char *in, size_t len, uint64_t *size,
			         int *is_8bit)
{
    const unsigned char *p = (const unsigned char *) in;
    const unsigned char *end = p + len;
    uint64_t ncr = 0, nlf = 0, npair = 0;
    unsigned hi = 0;

#ifdef BODY_USE_SSE2

    /*
     * Per byte lane, a count in each of three accumulators: a match is
     * -1, subtracted. A lane holds 255 at most, so every 255 blocks the
     * lanes are summed (psadbw) and cleared. A pair is a CR whose next
     * byte, read by the load one byte further on, is an LF: that load
     * needs 17 bytes, so the blocks stop one byte short.
     */
    const __m128i cr = _mm_set1_epi8('\r');
    const __m128i lf = _mm_set1_epi8('\n');
    const __m128i zero = _mm_setzero_si128();
    __m128i acr = zero, alf = zero, apair = zero, ahi = zero;
    unsigned k = 0;

    while (end - p >= 17) {
	__m128i v = _mm_loadu_si128((const __m128i *) p);
	__m128i w = _mm_loadu_si128((const __m128i *) (p + 1));
	__m128i ccr = _mm_cmpeq_epi8(v, cr);

	acr = _mm_sub_epi8(acr, ccr);
	alf = _mm_sub_epi8(alf, _mm_cmpeq_epi8(v, lf));
	apair = _mm_sub_epi8(apair, _mm_and_si128(ccr, _mm_cmpeq_epi8(w, lf)));
	ahi = _mm_or_si128(ahi, v);
	p += 16;
	if (++k == 255 || end - p < 17) {
	    __m128i t;

	    t = _mm_sad_epu8(acr, zero);
	    ncr += (uint64_t) _mm_cvtsi128_si32(t)
		+ (uint64_t) _mm_cvtsi128_si32(_mm_srli_si128(t, 8));
	    t = _mm_sad_epu8(alf, zero);
	    nlf += (uint64_t) _mm_cvtsi128_si32(t)
		+ (uint64_t) _mm_cvtsi128_si32(_mm_srli_si128(t, 8));
	    t = _mm_sad_epu8(apair, zero);
	    npair += (uint64_t) _mm_cvtsi128_si32(t)
		+ (uint64_t) _mm_cvtsi128_si32(_mm_srli_si128(t, 8));
	    acr = alf = apair = zero;
	    k = 0;
	}
    }
    hi = (unsigned) _mm_movemask_epi8(ahi);
#endif
    for (; p < end; p++) {
	hi |= *p & 0x80;
	if (*p == '\r') {
	    ncr++;
	    npair += (end - p >= 2 && p[1] == '\n');
	} else if (*p == '\n')
	    nlf++;
    }
    *size = (uint64_t) len + (ncr - npair) + (nlf - npair);
    if (len > 0 && in[len - 1] != '\r' && in[len - 1] != '\n')
	*size += 2;
    *is_8bit = hi != 0;
}

/* smtps_body_inspect - a whole body's problem, or its size and 8-bit */

int     smtps_body_inspect(const char *in, size_t len, unsigned flags,
			           uint64_t *size, int *is_8bit)
{
    struct smtps_body_scan sc;

    if (in != NULL
	&& body_surely_fine(in, len, (flags & SMTPS_BODY_ALLOW_LONG_LINES) ?
			    UINT64_MAX : SMTPS_LINE_OCTETS_MAX)) {
	body_measure(in, len, size, is_8bit);
	return (0);
    }
    smtps_body_scan_init(&sc, flags);
    (void) smtps_body_scan(&sc, in, len);
    if (smtps_body_scan_finish(&sc) != 0)
	return (sc.problem);
    *size = sc.size;
    *is_8bit = sc.is_8bit;
    return (0);
}

/* smtps_body_scan_finish - the body ended: complete its size */

int     smtps_body_scan_finish(struct smtps_body_scan *sc)
{
    if (sc->line_len > 0) {			/* an unterminated last line */
	sc->size += 2;
	if (sc->line_len > sc->longest)
	    sc->longest = sc->line_len;
    }
    return (sc->problem);
}

