/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	fuzz_caps 1
 * SUMMARY
 *	fuzz target: the EHLO capability parser (smtps_caps_parse)
 * SYNOPSIS
 *	LLVMFuzzerTestOneInput(data, size)
 * DESCRIPTION
 *	The input is the text of a 250 reply (lines joined by '\n', any
 *	bytes). smtps_caps_parse() must agree with a reference written
 *	differently (a copy of each line, tokens compared after upper-casing
 *	them), set no bit outside the known ones, ignore the greeting line,
 *	refuse any code but 250 with caps zeroed, and give the same answer
 *	when the text arrives as a wire reply through the reply parser.
 *--*/

#include <ctype.h>

#include "fuzz.h"
#include "smtpstate.h"

#define EXT_ALL (SMTPS_EXT_PIPELINING | SMTPS_EXT_SIZE | SMTPS_EXT_8BITMIME \
	| SMTPS_EXT_SMTPUTF8 | SMTPS_EXT_STARTTLS | SMTPS_EXT_AUTH \
	| SMTPS_EXT_DSN | SMTPS_EXT_CHUNKING | SMTPS_EXT_ENHANCEDSTATUSCODES \
	| SMTPS_EXT_XCLIENT | SMTPS_EXT_BINARYMIME | SMTPS_EXT_REQUIRETLS)

static const struct {
    const char *name;
    unsigned bit;
} ref_ext[] = {
    {"PIPELINING", SMTPS_EXT_PIPELINING}, {"SIZE", SMTPS_EXT_SIZE},
    {"8BITMIME", SMTPS_EXT_8BITMIME}, {"SMTPUTF8", SMTPS_EXT_SMTPUTF8},
    {"STARTTLS", SMTPS_EXT_STARTTLS}, {"AUTH", SMTPS_EXT_AUTH},
    {"DSN", SMTPS_EXT_DSN}, {"CHUNKING", SMTPS_EXT_CHUNKING},
    {"ENHANCEDSTATUSCODES", SMTPS_EXT_ENHANCEDSTATUSCODES},
    {"XCLIENT", SMTPS_EXT_XCLIENT}, {"BINARYMIME", SMTPS_EXT_BINARYMIME},
    {"REQUIRETLS", SMTPS_EXT_REQUIRETLS},
}, ref_auth[] = {
    {"PLAIN", SMTPS_AUTH_PLAIN}, {"LOGIN", SMTPS_AUTH_LOGIN},
    {"CRAM-MD5", SMTPS_AUTH_CRAM_MD5}, {"XOAUTH2", SMTPS_AUTH_XOAUTH2},
}, ref_xclient[] = {
    {"NAME", SMTPS_XCLIENT_NAME}, {"ADDR", SMTPS_XCLIENT_ADDR},
    {"PORT", SMTPS_XCLIENT_PORT}, {"PROTO", SMTPS_XCLIENT_PROTO},
    {"HELO", SMTPS_XCLIENT_HELO}, {"LOGIN", SMTPS_XCLIENT_LOGIN},
    {"DESTADDR", SMTPS_XCLIENT_DESTADDR}, {"DESTPORT", SMTPS_XCLIENT_DESTPORT},
};

#define NELEM(a) (sizeof(a) / sizeof((a)[0]))

static unsigned ref_lookup(const char *tok, size_t n, int which);
static void ref_caps(const char *text, size_t len, struct smtps_caps *c);

/* ref_lookup - bit of an upper-cased token in a table, 0 if none */

static unsigned ref_lookup(const char *tok, size_t n, int which)
{
    size_t  i, count = which == 0 ? NELEM(ref_ext) : which == 1 ?
	NELEM(ref_auth) : NELEM(ref_xclient);
    const char *name;

    for (i = 0; i < count; i++) {
	name = which == 0 ? ref_ext[i].name : which == 1 ? ref_auth[i].name :
	    ref_xclient[i].name;
	if (strlen(name) == n && memcmp(name, tok, n) == 0)
	    return which == 0 ? ref_ext[i].bit : which == 1 ? ref_auth[i].bit :
		ref_xclient[i].bit;
    }
    return 0;
}

/* ref_caps - the reference parser: one line at a time, tokens upper-cased */

static void ref_caps(const char *text, size_t len, struct smtps_caps *c)
{
    char   *line, *tok[64];
    size_t  start, end, i, ntok, k;
    unsigned bit;
    uint64_t v;
    int     first = 1, ok;

    memset(c, 0, sizeof(*c));
    for (start = 0; start <= len; start = end + 1) {
	for (end = start; end < len && text[end] != '\n'; end++)
	     /* void */ ;
	if (first) {				/* the greeting */
	    first = 0;
	    if (end >= len)
		return;
	    continue;
	}
	if ((line = malloc(end - start + 1)) == NULL)
	    abort();
	memcpy(line, text + start, end - start);
	line[end - start] = 0;
	/* Tokens: split at space and tab; NUL bytes stay inside tokens. */
	ntok = 0;
	for (i = 0; i < end - start && ntok < NELEM(tok);) {
	    while (i < end - start && (line[i] == ' ' || line[i] == '\t'))
		line[i++] = 0;
	    if (i >= end - start)
		break;
	    tok[ntok++] = line + i;
	    while (i < end - start && line[i] != ' ' && line[i] != '\t') {
		if (line[i] >= 'a' && line[i] <= 'z')
		    line[i] = (char) (line[i] - 'a' + 'A');
		i++;
	    }
	    if (i < end - start)
		line[i++] = 0;
	}
	/* Token lengths: up to the next NUL we wrote or the line end. */
	if (ntok > 0) {
	    size_t  tl[64];

	    for (k = 0; k < ntok; k++) {
		size_t  o = (size_t) (tok[k] - line);

		for (tl[k] = 0; o + tl[k] < end - start
		     && line[o + tl[k]] != 0; tl[k]++)
		     /* void */ ;
		/* A NUL byte of the input ends the token too, unlike the
		 * real parser: skip lines that have one. */
	    }
	    if (memchr(text + start, 0, end - start) != NULL) {
		free(line);
		c->ext = (unsigned) -1;		/* "don't compare" */
		return;
	    }
	    bit = ref_lookup(tok[0], tl[0], 0);
	    c->ext |= bit;
	    if (bit == SMTPS_EXT_SIZE) {
		v = 0;
		ok = ntok > 1;
		for (k = 0; ok && k < tl[1]; k++) {
		    if (!isdigit((unsigned char) tok[1][k])
			|| v > (UINT64_MAX - (unsigned) (tok[1][k] - '0')) / 10)
			ok = 0;
		    else
			v = v * 10 + (unsigned) (tok[1][k] - '0');
		}
		c->size_max = ok ? v : 0;
	    }
	    for (k = 1; k < ntok; k++) {
		if (bit == SMTPS_EXT_AUTH)
		    c->auth |= ref_lookup(tok[k], tl[k], 1);
		if (bit == SMTPS_EXT_XCLIENT)
		    c->xclient |= ref_lookup(tok[k], tl[k], 2);
	    }
	    if (ntok == NELEM(tok))
		c->ext = (unsigned) -1;		/* too many tokens to compare */
	}
	free(line);
	if (c->ext == (unsigned) -1 || end >= len)
	    return;
    }
}

/* LLVMFuzzerTestOneInput - parse as caps, compare with the reference */

int     LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct smtps_reply r, parsed;
    struct smtps_caps caps, again, ref;
    struct smtps_reply_parser *p;
    struct fz_buf wire = {0};
    size_t  i, start, used;
    int     rc;

    if (size > 65536)
	return 0;
    memset(&r, 0, sizeof(r));
    r.code = 250;
    r.text = (const char *) data;
    r.text_len = size;
    FUZZ_CHECK(smtps_caps_parse(&r, &caps) == SMTPS_OK);
    FUZZ_CHECK((caps.ext & ~EXT_ALL) == 0);
    FUZZ_CHECK((caps.auth & ~0xfu) == 0);
    FUZZ_CHECK((caps.xclient & ~0xffu) == 0);
    FUZZ_CHECK(caps.auth == 0 || (caps.ext & SMTPS_EXT_AUTH));
    FUZZ_CHECK(caps.xclient == 0 || (caps.ext & SMTPS_EXT_XCLIENT));
    FUZZ_CHECK(caps.size_max == 0 || (caps.ext & SMTPS_EXT_SIZE));

    /* The same again: no hidden state. */
    FUZZ_CHECK(smtps_caps_parse(&r, &again) == SMTPS_OK);
    FUZZ_CHECK(memcmp(&caps, &again, sizeof(caps)) == 0);

    ref_caps((const char *) data, size, &ref);
    if (ref.ext != (unsigned) -1) {
	FUZZ_CHECK(ref.ext == caps.ext);
	FUZZ_CHECK(ref.auth == caps.auth);
	FUZZ_CHECK(ref.xclient == caps.xclient);
	FUZZ_CHECK(ref.size_max == caps.size_max);
    }

    /* Any other code: refused, caps zeroed. */
    r.code = size == 0 ? 251 : (data[0] & 1) ? 220 : 550;
    memset(&again, 0xff, sizeof(again));
    FUZZ_CHECK(smtps_caps_parse(&r, &again) == SMTPS_EINVAL);
    FUZZ_CHECK(again.ext == 0 && again.auth == 0 && again.size_max == 0
	       && again.xclient == 0);

    /*
     * Through the wire: "250-line" for every line but the last, which is
     * "250 line". Only texts the reply parser can carry (no NUL, no CR).
     */
    if (memchr(data, 0, size) == NULL && memchr(data, '\r', size) == NULL) {
	for (start = 0, i = 0; i <= size; i++) {
	    if (i < size && data[i] != '\n')
		continue;
	    fz_adds(&wire, i < size ? "250-" : "250 ");
	    fz_add(&wire, data + start, i - start);
	    fz_adds(&wire, "\r\n");
	    start = i + 1;
	}
	p = smtps_reply_parser_new();
	FUZZ_CHECK(p != NULL);
	rc = smtps_reply_parse(p, (const char *) wire.data, wire.len, &used,
			       &parsed);
	if (rc == 1) {
	    FUZZ_CHECK(used == wire.len);
	    FUZZ_CHECK(parsed.text_len == size);
	    FUZZ_CHECK(smtps_caps_parse(&parsed, &again) == SMTPS_OK);
	    FUZZ_CHECK(memcmp(&caps, &again, sizeof(caps)) == 0);
	} else {
	    FUZZ_CHECK(rc == SMTPS_ETOOBIG);	/* a line or the reply too long */
	}
	smtps_reply_parser_free(p);
	fz_free(&wire);
    }
    return 0;
}
