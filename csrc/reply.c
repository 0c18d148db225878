/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	reply 3
 * SUMMARY
 *	SMTP reply parser and EHLO capability parser
 * SYNOPSIS
 *	#include "smtpstate.h"
 *
 *	struct smtps_reply_parser *smtps_reply_parser_new(void)
 *
 *	void	smtps_reply_parser_free(p)
 *	struct smtps_reply_parser *p;
 *
 *	int	smtps_reply_parse(p, data, len, consumed, out)
 *	struct smtps_reply_parser *p;
 *	const char *data;
 *	size_t	len;
 *	size_t	*consumed;
 *	struct smtps_reply *out;
 *
 *	int	smtps_caps_parse(ehlo, caps)
 *	const struct smtps_reply *ehlo;
 *	struct smtps_caps *caps;
 *
 *	const char *smtps_extension_name(bit)
 *	const char *smtps_auth_mech_name(bit)
 *	const char *smtps_xclient_attr_name(bit)
 *	unsigned bit;
 * DESCRIPTION
 *	smtps_reply_parser_new() makes an incremental reply parser. A
 *	fresh parser is a small struct and owns no buffer: the engine keeps
 *	thousands of idle sessions, each with a parser.
 *
 *	smtps_reply_parser_free() releases a parser and its buffer. A NULL
 *	argument is allowed.
 *
 *	smtps_reply_parse() consumes server bytes until one reply
 *	(RFC 5321 4.2) is complete. Each line is three digits (2-5, 0-5,
 *	0-9), then '-' (more lines follow), ' ' and text (last line), or
 *	the end of the line (a code-only last line such as "250"). Every
 *	line of one reply carries the same code. CR LF ends a line; a bare
 *	LF does too, and one CR right before it is dropped. A CR anywhere
 *	else in the text is kept as text. The reply text is every line's
 *	text (after the code and its separator) joined by '\n' and
 *	NUL-terminated; out->enhanced is the RFC 3463 status code that
 *	starts the first line's text, if any. The bytes may be split
 *	anywhere across calls, down to one byte per call: the result is
 *	the same.
 *
 *	When a reply completes, *consumed says how many bytes of data it
 *	used; the rest belongs to the next reply and is given to the next
 *	call. out is written only then, and its pointers stay valid until
 *	the next call on p. The text buffer grows as needed, never past the
 *	bounds, and is reused for the next reply.
 *
 *	smtps_caps_parse() fills caps from a 250 EHLO reply. The first line
 *	(the greeting) is skipped; on every other line the first
 *	whitespace-delimited token is the keyword, matched exactly and
 *	case-insensitively (RFC 5321 4.1.1.1). SIZE takes an optional
 *	decimal limit (RFC 1870); AUTH (RFC 4954) and XCLIENT take lists
 *	of mechanisms and attributes, also matched case-insensitively.
 *	Unknown keywords, mechanisms and attributes are ignored.
 * DIAGNOSTICS
 *	smtps_reply_parser_new() returns NULL when memory runs out.
 *
 *	smtps_reply_parse() returns 1 when a reply is complete, 0 when all
 *	of data was consumed and more is needed, SMTPS_EINVAL for a NULL p,
 *	consumed or out (or NULL data with len > 0), SMTPS_EPROTO for a
 *	malformed line, a code change inside a reply or a NUL byte,
 *	SMTPS_ETOOBIG for a line over SMTPS_REPLY_LINE_MAX bytes (CR LF
 *	included) or a reply text over SMTPS_REPLY_MAX bytes (the joining
 *	'\n' included), SMTPS_ENOMEM when the buffer cannot grow. On an
 *	error *consumed is the number of bytes examined, the offending byte
 *	included. Errors other than SMTPS_EINVAL are sticky: every later
 *	call returns the same error and consumes nothing.
 *
 *	smtps_caps_parse() returns SMTPS_OK, or SMTPS_EINVAL (caps zeroed
 *	when not NULL) for a NULL argument or a reply code other than 250.
 * SEE ALSO
 *	RFC 5321 4.2 (replies), 4.1.1.1 (EHLO); RFC 3463, RFC 2034
 *	(enhanced status codes); RFC 1870 (SIZE); RFC 4954 (AUTH).
 *--*/

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "smtpstate.h"

/*
 * Where the parser is inside the current line. The code digits come
 * first, then the separator, then text up to the line end.
 */
enum reply_pos {
    RP_DIGIT1,				/* first code digit, 2-5 */
    RP_DIGIT2,				/* second code digit, 0-5 */
    RP_DIGIT3,				/* third code digit, 0-9 */
    RP_SEP,				/* '-', ' ', CR or LF */
    RP_SEP_CR,				/* code-only line saw CR: LF must follow */
    RP_TEXT				/* text up to LF */
};

/*
 * The whole parser state. Keep it small: no fixed buffers (10,000 idle
 * sessions each hold one). The text buffer is allocated on first use.
 * Invariants: line_len <= SMTPS_REPLY_LINE_MAX, len <= SMTPS_REPLY_MAX,
 * and when buf is not NULL, cap > len (room for the NUL).
 */
struct smtps_reply_parser {
    char   *buf;			/* reply text so far, lines joined by '\n' */
    size_t  cap;			/* bytes allocated for buf */
    size_t  len;			/* text bytes in buf */
    size_t  line_len;			/* wire bytes of the current line so far */
    size_t  nlines;			/* lines completed in this reply */
    int     code;			/* the reply's code (RFC 5321 4.2) */
    int     line_code;			/* the current line's digits so far */
    int     err;			/* sticky error, 0 when none */
    unsigned char pos;			/* enum reply_pos */
    unsigned char cr_pending;		/* text saw a CR; LF would drop it */
    unsigned char last_line;		/* the current line ends the reply */
    unsigned char done;			/* a reply was handed out: reset first */
};

/*
 * After a reply, a buffer larger than this is given back rather than
 * kept: one huge EHLO reply must not pin 64 KiB in an idle session.
 */
#define REPLY_KEEP_CAP	4096
#define REPLY_MIN_CAP	128

/* What an EHLO keyword's parameters mean. */
enum caps_params {
    CAPS_NONE,				/* parameters ignored */
    CAPS_SIZE,				/* optional decimal limit (RFC 1870) */
    CAPS_AUTH,				/* SASL mechanisms (RFC 4954) */
    CAPS_XCLIENT			/* XCLIENT attributes (Postfix) */
};

struct caps_keyword {
    const char *name;
    unsigned ext;			/* SMTPS_EXT_* */
    enum caps_params params;
};

/* AUTH mechanisms and XCLIENT attributes, by name. */
struct caps_flag {
    const char *name;
    unsigned bit;
};

static void reply_reset(struct smtps_reply_parser *p);
static int reply_fail(struct smtps_reply_parser *p, int err, size_t used,
		      size_t *consumed);
static int reply_reserve(struct smtps_reply_parser *p, size_t n);
static int reply_append(struct smtps_reply_parser *p, const char *s,
			size_t n);
static size_t reply_text_span(const unsigned char *s, size_t n);
static void reply_enhanced(const char *text, size_t len, int code,
			   char *dst);
static int is_digit(int ch);
static int caps_token(const char **cp, const char *end, const char **tok,
		      size_t *tok_len);
static int caps_equal(const char *tok, size_t tok_len, const char *name);
static void caps_line(struct smtps_caps *caps, const char *cp,
		      const char *end);
static unsigned caps_flags(const char *cp, const char *end,
			   const struct caps_flag *table);
static uint64_t caps_size(const char *tok, size_t tok_len);
static const char *flag_name(const struct caps_flag *table, unsigned bit);

/*
 * The EHLO keywords we know, the AUTH mechanisms and the XCLIENT
 * attributes, made from smtpstate.h's lists. Read-only; all matching is
 * exact and case-insensitive.
 */
#define SMTPS_X_KEYWORD(n, b, s, p) {s, SMTPS_EXT_##n, CAPS_##p},
static const struct caps_keyword caps_keywords[] = {
    SMTPS_EXTENSIONS(SMTPS_X_KEYWORD)
    {0, 0, CAPS_NONE},
};
#undef SMTPS_X_KEYWORD

#define SMTPS_X_FLAG(n, b, s) {s, 1u << b},
static const struct caps_flag caps_auth_mechs[] = {
    SMTPS_AUTH_MECHS(SMTPS_X_FLAG)
    {0, 0},
};

static const struct caps_flag caps_xclient_attrs[] = {
    SMTPS_XCLIENT_ATTRS(SMTPS_X_FLAG)
    {0, 0},
};
#undef SMTPS_X_FLAG

/* flag_name - the name of bit in a keyword table, NULL if none */

static const char *flag_name(const struct caps_flag *table, unsigned bit)
{
    for (; table->name != 0; table++)
	if (table->bit == bit)
	    return table->name;
    return NULL;
}

/* smtps_extension_name - the EHLO keyword of one SMTPS_EXT_* bit */

const char *smtps_extension_name(unsigned bit)
{
    const struct caps_keyword *k;

    for (k = caps_keywords; k->name != 0; k++)
	if (k->ext == bit)
	    return k->name;
    return NULL;
}

/* smtps_auth_mech_name - the name of one SMTPS_AUTH_* bit */

const char *smtps_auth_mech_name(unsigned bit)
{
    return flag_name(caps_auth_mechs, bit);
}

/* smtps_xclient_attr_name - the name of one SMTPS_XCLIENT_* bit */

const char *smtps_xclient_attr_name(unsigned bit)
{
    return flag_name(caps_xclient_attrs, bit);
}

/* smtps_reply_parser_new - make an empty parser */

struct smtps_reply_parser *smtps_reply_parser_new(void)
{
    return (calloc(1, sizeof(struct smtps_reply_parser)));
}

/* smtps_reply_parser_free - release a parser and its buffer */

void    smtps_reply_parser_free(struct smtps_reply_parser *p)
{
    if (p == NULL)
	return;
    free(p->buf);
    free(p);
}

/* reply_reset - forget the reply handed out last */

static void reply_reset(struct smtps_reply_parser *p)
{
    if (p->cap > REPLY_KEEP_CAP) {
	free(p->buf);
	p->buf = NULL;
	p->cap = 0;
    }
    p->len = 0;
    p->nlines = 0;
    p->code = 0;
    p->done = 0;
}

/* reply_fail - make an error sticky and report it */

static int reply_fail(struct smtps_reply_parser *p, int err, size_t used,
		      size_t *consumed)
{
    p->err = err;
    free(p->buf);
    p->buf = NULL;
    p->cap = 0;
    p->len = 0;
    *consumed = used;
    return (err);
}

/* reply_reserve - make room for n more text bytes and the NUL */

static int reply_reserve(struct smtps_reply_parser *p, size_t n)
{
    size_t  need = p->len + n + 1;
    size_t  cap;
    char   *nbuf;

    if (need <= p->cap)
	return (SMTPS_OK);

    /*
     * Callers check the bounds first, so need <= SMTPS_REPLY_MAX + 1 and
     * the doubling below never exceeds what the clamp allows.
     */
    for (cap = p->cap ? p->cap : REPLY_MIN_CAP; cap < need; cap *= 2)
	 /* void */ ;
    if (cap > SMTPS_REPLY_MAX + 1)
	cap = SMTPS_REPLY_MAX + 1;
    if ((nbuf = realloc(p->buf, cap)) == NULL)
	return (SMTPS_ENOMEM);
    p->buf = nbuf;
    p->cap = cap;
    return (SMTPS_OK);
}

/* reply_append - add text bytes; the caller has checked the bounds */

static int reply_append(struct smtps_reply_parser *p, const char *s,
			size_t n)
{
    if (reply_reserve(p, n) != SMTPS_OK)
	return (SMTPS_ENOMEM);
    memcpy(p->buf + p->len, s, n);
    p->len += n;
    return (SMTPS_OK);
}

/* reply_text_span - count leading bytes that are plain text */

static size_t reply_text_span(const unsigned char *s, size_t n)
{
    size_t  i;

    for (i = 0; i < n; i++)
	if (s[i] == '\n' || s[i] == '\r' || s[i] == '\0')
	    break;
    return (i);
}

/* is_digit - ASCII digit, whatever the locale */

static int is_digit(int ch)
{
    return (ch >= '0' && ch <= '9');
}

/* reply_enhanced - find the RFC 3463 status code that starts the text */

static void reply_enhanced(const char *text, size_t len, int code,
			   char *dst)
{
    size_t  i;
    size_t  n;
    int     part;

    /*
     * class "." subject "." detail, class 2, 4 or 5 and equal to the
     * reply's first digit (RFC 3463 2, RFC 2034 4), subject and detail 1-3
     * digits, then a space or the end of the first line. At most 9 bytes,
     * so it fits in the 16-byte field.
     */
    dst[0] = 0;
    if (len < 5 || text[0] != '0' + code / 100
	|| (text[0] != '2' && text[0] != '4' && text[0] != '5'))
	return;
    for (i = 1, part = 0; part < 2; part++) {
	if (i >= len || text[i] != '.')
	    return;
	for (i++, n = 0; i < len && n < 4 && is_digit(text[i]); i++, n++)
	     /* void */ ;
	if (n < 1 || n > 3)
	    return;
    }
    if (i < len && text[i] != ' ')
	return;
    memcpy(dst, text, i);
    dst[i] = 0;
}

/* smtps_reply_parse - consume server bytes until one reply is complete */

int     smtps_reply_parse(struct smtps_reply_parser *p, const char *data,
			  size_t len, size_t *consumed,
			  struct smtps_reply *out)
{
    const unsigned char *in = (const unsigned char *) data;
    size_t  i = 0;
    size_t  n;
    size_t  room;
    const char *nl;
    int     ch;

    if (consumed != NULL)
	*consumed = 0;
    if (p == NULL || consumed == NULL || out == NULL
	|| (data == NULL && len > 0))
	return (SMTPS_EINVAL);
    if (p->err != 0)
	return (p->err);
    if (p->done)
	reply_reset(p);

    while (i < len) {

	/*
	 * Fast path: copy a run of plain text at once. It must behave
	 * exactly like the byte-at-a-time path below, so that the result
	 * never depends on how the input was split: the offending byte is
	 * the first one that would take the line past SMTPS_REPLY_LINE_MAX or
	 * the text past SMTPS_REPLY_MAX.
	 */
	if (p->pos == RP_TEXT && !p->cr_pending
	    && (n = reply_text_span(in + i, len - i)) > 0) {
	    room = SMTPS_REPLY_LINE_MAX - p->line_len;
	    if (SMTPS_REPLY_MAX - p->len < room)
		room = SMTPS_REPLY_MAX - p->len;
	    if (n > room)
		return (reply_fail(p, SMTPS_ETOOBIG, i + room + 1, consumed));
	    if (reply_append(p, data + i, n) != SMTPS_OK)
		return (reply_fail(p, SMTPS_ENOMEM, i + 1, consumed));
	    p->line_len += n;
	    i += n;
	    continue;
	}

	/*
	 * One byte at a time: line structure, CR and LF, NUL.
	 */
	ch = in[i++];
	if (ch == '\0')
	    return (reply_fail(p, SMTPS_EPROTO, i, consumed));
	if (++p->line_len > SMTPS_REPLY_LINE_MAX)
	    return (reply_fail(p, SMTPS_ETOOBIG, i, consumed));

	switch (p->pos) {
	case RP_DIGIT1:
	    if (ch < '2' || ch > '5')
		return (reply_fail(p, SMTPS_EPROTO, i, consumed));
	    p->line_code = (ch - '0') * 100;
	    p->pos = RP_DIGIT2;
	    continue;
	case RP_DIGIT2:
	    if (ch < '0' || ch > '5')
		return (reply_fail(p, SMTPS_EPROTO, i, consumed));
	    p->line_code += (ch - '0') * 10;
	    p->pos = RP_DIGIT3;
	    continue;
	case RP_DIGIT3:
	    if (!is_digit(ch))
		return (reply_fail(p, SMTPS_EPROTO, i, consumed));
	    p->line_code += ch - '0';
	    /* RFC 5321 4.2.1: every line of a reply has the same code. */
	    if (p->nlines > 0 && p->line_code != p->code)
		return (reply_fail(p, SMTPS_EPROTO, i, consumed));
	    p->code = p->line_code;
	    p->pos = RP_SEP;
	    continue;
	case RP_SEP:
	    if (ch == '-' || ch == ' ') {
		p->last_line = (ch == ' ');
		p->pos = RP_TEXT;
		continue;
	    }
	    p->last_line = 1;			/* code-only line: "250" */
	    if (ch == '\r') {
		p->pos = RP_SEP_CR;
		continue;
	    }
	    if (ch != '\n')
		return (reply_fail(p, SMTPS_EPROTO, i, consumed));
	    break;				/* the line ends */
	case RP_SEP_CR:
	    if (ch != '\n')
		return (reply_fail(p, SMTPS_EPROTO, i, consumed));
	    break;				/* the line ends */
	case RP_TEXT:
	    if (ch == '\n')
		break;				/* the line ends, pending CR dropped */

	    /*
	     * A CR not followed by LF is text. It is held back until the
	     * next byte shows which it is, then counted like any text byte.
	     */
	    if (p->cr_pending) {
		if (p->len >= SMTPS_REPLY_MAX)
		    return (reply_fail(p, SMTPS_ETOOBIG, i, consumed));
		if (reply_append(p, "\r", 1) != SMTPS_OK)
		    return (reply_fail(p, SMTPS_ENOMEM, i, consumed));
		p->cr_pending = 0;
	    }
	    if (ch == '\r') {
		p->cr_pending = 1;
		continue;
	    }
	    if (p->len >= SMTPS_REPLY_MAX)
		return (reply_fail(p, SMTPS_ETOOBIG, i, consumed));
	    if (reply_append(p, data + i - 1, 1) != SMTPS_OK)
		return (reply_fail(p, SMTPS_ENOMEM, i, consumed));
	    continue;
	default:
	    /* Our own invariant broke; treat it like bad input, never crash. */
	    return (reply_fail(p, SMTPS_EPROTO, i, consumed));
	}

	/*
	 * The line ended (LF seen). Either the reply is complete, or the
	 * next line's text will follow a '\n', which counts toward
	 * SMTPS_REPLY_MAX like any text byte.
	 */
	p->nlines++;
	p->line_len = 0;
	p->cr_pending = 0;
	p->pos = RP_DIGIT1;
	if (!p->last_line) {
	    if (p->len >= SMTPS_REPLY_MAX)
		return (reply_fail(p, SMTPS_ETOOBIG, i, consumed));
	    if (reply_append(p, "\n", 1) != SMTPS_OK)
		return (reply_fail(p, SMTPS_ENOMEM, i, consumed));
	    continue;
	}
	if (p->buf != NULL)
	    p->buf[p->len] = 0;			/* reply_reserve() left room */
	out->code = p->code;
	out->text = p->buf != NULL ? p->buf : "";
	out->text_len = p->len;
	out->nlines = p->nlines;
	nl = p->len > 0 ? memchr(p->buf, '\n', p->len) : NULL;
	reply_enhanced(out->text, nl != NULL ? (size_t) (nl - p->buf) : p->len,
		       p->code, out->enhanced);
	p->done = 1;
	*consumed = i;
	return (1);
    }
    *consumed = len;
    return (0);
}

/* caps_token - next whitespace-delimited token of a line, 0 at the end */

static int caps_token(const char **cp, const char *end, const char **tok,
		      size_t *tok_len)
{
    const char *s = *cp;

    while (s < end && (*s == ' ' || *s == '\t'))
	s++;
    if (s >= end)
	return (0);
    *tok = s;
    while (s < end && *s != ' ' && *s != '\t')
	s++;
    *tok_len = (size_t) (s - *tok);
    *cp = s;
    return (1);
}

/* caps_equal - exact ASCII case-insensitive match of a token */

static int caps_equal(const char *tok, size_t tok_len, const char *name)
{
    size_t  i;
    int     ch;

    for (i = 0; i < tok_len; i++) {
	if (name[i] == 0)
	    return (0);
	ch = (unsigned char) tok[i];
	if (ch >= 'a' && ch <= 'z')
	    ch -= 'a' - 'A';
	if (ch != (unsigned char) name[i])
	    return (0);
    }
    return (name[i] == 0);
}

/* caps_flags - OR the bits of every known parameter on a line */

static unsigned caps_flags(const char *cp, const char *end,
			   const struct caps_flag *table)
{
    const struct caps_flag *f;
    const char *tok;
    size_t  tok_len;
    unsigned bits = 0;

    while (caps_token(&cp, end, &tok, &tok_len))
	for (f = table; f->name != 0; f++)
	    if (caps_equal(tok, tok_len, f->name))
		bits |= f->bit;
    return (bits);
}

/* caps_size - the SIZE limit (RFC 1870), 0 when absent or unusable */

static uint64_t caps_size(const char *tok, size_t tok_len)
{
    uint64_t val = 0;
    size_t  i;
    unsigned d;

    /*
     * Only plain decimal digits count. Garbage and overflow mean "no
     * usable limit", which is 0: better to send and let the server
     * refuse than to refuse ourselves on a number we cannot read.
     */
    for (i = 0; i < tok_len; i++) {
	if (!is_digit((unsigned char) tok[i]))
	    return (0);
	d = (unsigned) (tok[i] - '0');
	if (val > (UINT64_MAX - d) / 10)
	    return (0);
	val = val * 10 + d;
    }
    return (val);
}

/* caps_line - apply one EHLO line (not the greeting) */

static void caps_line(struct smtps_caps *caps, const char *cp,
		      const char *end)
{
    const struct caps_keyword *k;
    const char *tok;
    size_t  tok_len;

    if (!caps_token(&cp, end, &tok, &tok_len))
	return;
    for (k = caps_keywords; k->name != 0; k++)
	if (caps_equal(tok, tok_len, k->name))
	    break;
    if (k->name == 0)
	return;					/* unknown keyword */
    caps->ext |= k->ext;
    switch (k->params) {
    case CAPS_SIZE:
	caps->size_max = caps_token(&cp, end, &tok, &tok_len) ?
	    caps_size(tok, tok_len) : 0;
	break;
    case CAPS_AUTH:
	caps->auth |= caps_flags(cp, end, caps_auth_mechs);
	break;
    case CAPS_XCLIENT:
	caps->xclient |= caps_flags(cp, end, caps_xclient_attrs);
	break;
    case CAPS_NONE:
	break;
    }
}

/* smtps_caps_parse - what a 250 EHLO reply offers */

int     smtps_caps_parse(const struct smtps_reply *ehlo,
			 struct smtps_caps *caps)
{
    const char *cp;
    const char *end;
    const char *nl;

    if (caps != NULL)
	memset(caps, 0, sizeof(*caps));
    if (ehlo == NULL || caps == NULL || ehlo->code != 250
	|| (ehlo->text == NULL && ehlo->text_len > 0))
	return (SMTPS_EINVAL);
    if (ehlo->text_len == 0)
	return (SMTPS_OK);

    /*
     * The first line is the greeting ("mx.example.com Hello ..."): its
     * words are not keywords, even when one looks like one.
     */
    cp = ehlo->text;
    end = cp + ehlo->text_len;
    if ((nl = memchr(cp, '\n', ehlo->text_len)) == NULL)
	return (SMTPS_OK);
    for (cp = nl + 1; cp < end; cp = nl < end ? nl + 1 : end) {
	if ((nl = memchr(cp, '\n', (size_t) (end - cp))) == NULL)
	    nl = end;
	caps_line(caps, cp, nl);
    }
    return (SMTPS_OK);
}
