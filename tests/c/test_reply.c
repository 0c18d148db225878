/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	test_reply 1
 * SUMMARY
 *	table-driven tests of the reply and capability parsers
 * SYNOPSIS
 *	test_reply
 * DESCRIPTION
 *	Runs every case of the tables below and prints "RUN label", then
 *	"PASS label" or "FAIL label: why", and a final "N passed, N
 *	failed" line.
 *
 *	Every reply parser case runs five ways: the whole input in one
 *	call; one byte per call; followed by the bytes of another reply
 *	(which must then parse on its own, and *consumed must stop at the
 *	boundary); split in two at every position (short inputs only);
 *	and on a parser that has just parsed another reply. An error must
 *	hit at the same byte every way, and stick.
 *
 *	Build it with the C sources and run it under ASan and UBSan:
 *
 *	gcc -std=c11 -Wall -Wextra -Werror -O1 -g
 *	    -fsanitize=address,undefined -fno-sanitize-recover=all
 *	    -Iinclude -Icsrc tests/c/test_reply.c csrc/reply.c
 *	    csrc/strerror.c -o /tmp/test_reply && /tmp/test_reply
 * DIAGNOSTICS
 *	The exit status is 1 when any case fails, else 0.
 * SEE ALSO
 *	csrc/reply.c, the code under test.
 *--*/

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "smtpstate.h"

#define WHY_MAX 256
#define SPLIT_MAX 600			/* split at every position up to this */

/* A literal and its length, NUL bytes included. */
#define S(s) s, sizeof(s) - 1

/* The reply that follows a case in the "trailing" mode. */
#define TRAIL "221 2.0.0 bye\r\n"
#define TRAIL_CODE 221
#define TRAIL_ENH "2.0.0"
#define TRAIL_TEXT "2.0.0 bye"

/* The reply that precedes a case in the "after" mode. */
#define LEAD "220-lead one\r\n220 lead two\r\n"
#define LEAD_TEXT "lead one\nlead two"

struct parse_case {
    const char *label;
    const char *input;			/* NULL: made by gen */
    size_t  len;
    char   *(*gen) (size_t *len);	/* makes a big input (malloc) */
    int     want_rc;			/* 1, or an SMTPS_E* error */
    size_t  want_pos;			/* error: *consumed, 0 = don't check */
    int     code;
    const char *enhanced;
    const char *text;			/* NULL: check text_len only */
    size_t  text_len;
    size_t  nlines;
};

#define OK(label, in, code, enh, text, nlines) \
    {label, S(in), 0, 1, 0, code, enh, S(text), nlines}
#define ERR(label, in, err, pos) \
    {label, S(in), 0, err, pos, 0, "", 0, 0, 0}
#define GEN_OK(label, gen, code, text_len, nlines) \
    {label, 0, 0, gen, 1, 0, code, "", 0, text_len, nlines}
#define GEN_ERR(label, gen, err, pos) \
    {label, 0, 0, gen, err, pos, 0, "", 0, 0, 0}

struct want_reply {
    int     code;
    const char *enhanced;
    const char *text;
    size_t  nlines;
};

struct seq_case {
    const char *label;
    const char *input;
    size_t  len;
    size_t  nreplies;
    struct want_reply replies[4];
};

struct caps_case {
    const char *label;
    int     code;
    const char *text;			/* lines joined by '\n' */
    int     want_rc;
    unsigned ext;
    uint64_t size_max;
    unsigned auth;
    unsigned xclient;
};

struct misc_case {
    const char *label;
    int     (*fn) (char *why);
};

static char *gen_fill(size_t *len, const char *pattern, size_t count,
		      const char *tail);
static char *gen_line(size_t *len, const char *head, size_t n,
		      const char *eol);
static char *gen_reply(size_t *len, size_t count, size_t n);
static char *gen_line_max(size_t *len);
static char *gen_line_over(size_t *len);
static char *gen_line_max_lf(size_t *len);
static char *gen_line_over_lf(size_t *len);
static char *gen_line_endless(size_t *len);
static char *gen_reply_max(size_t *len);
static char *gen_reply_over(size_t *len);
static char *gen_cont_endless(size_t *len);
static char *gen_empty_endless(size_t *len);
static char *gen_many_lines(size_t *len);
static int check_reply(const struct smtps_reply *r, int code,
		       const char *enhanced, const char *text,
		       size_t text_len, size_t nlines, char *why);
static int feed(struct smtps_reply_parser *p, const char *data, size_t len,
		size_t first, size_t step, size_t *pos,
		struct smtps_reply *out, char *why);
static int expect_case(const struct parse_case *c, const char *mode,
		       struct smtps_reply_parser *p, int rc, size_t pos,
		       size_t want_pos, const struct smtps_reply *out,
		       char *why);
static int run_mode(const struct parse_case *c, const char *mode,
		    const char *in, size_t len, size_t first,
		    size_t step, size_t want_pos, char *why);
static int run_parse_case(const struct parse_case *c, const char *in,
			  size_t len, char *why);
static int run_stream(const struct seq_case *c, size_t first, size_t step,
		      char *why);
static int run_seq_case(const struct seq_case *c, char *why);
static int run_caps_case(const struct caps_case *c, char *why);
static int test_null_args(char *why);
static int test_empty_call(char *why);
static int test_free_null(char *why);
static int test_strerror(char *why);
static int test_stage_name(char *why);
static int test_ehlo_to_caps(char *why);
static int test_buffer_reuse(char *why);
static void report(const char *label, int rc, const char *why, int *pass,
		   int *fail);

static const struct parse_case parse_cases[] = {
    /* Well-formed replies. */
    OK("single line", "250 Ok\r\n", 250, "", "Ok", 1),
    OK("banner", "220 mx.example.com ESMTP Postfix\r\n", 220, "",
       "mx.example.com ESMTP Postfix", 1),
    OK("multi-line EHLO",
       "250-mx.example.com\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n"
       "250-8BITMIME\r\n250 SMTPUTF8\r\n", 250, "",
       "mx.example.com\nPIPELINING\nSIZE 10240000\n8BITMIME\nSMTPUTF8", 5),
    OK("code-only line", "250\r\n", 250, "", "", 1),
    OK("code-only line, LF", "354\n", 354, "", "", 1),
    OK("code-only last line", "250-a\r\n250\r\n", 250, "", "a\n", 2),
    OK("empty text", "250 \r\n", 250, "", "", 1),
    OK("empty continuation", "250-\r\n250 \r\n", 250, "", "\n", 2),
    OK("LF-only endings", "250-one\n250-two\n250 three\n", 250, "",
       "one\ntwo\nthree", 3),
    OK("mixed endings", "250-one\r\n250-two\n250 three\r\n", 250, "",
       "one\ntwo\nthree", 3),
    OK("only one CR dropped", "250 a\r\r\n", 250, "", "a\r", 1),
    OK("bare CR is text", "250 a\rb\r\n", 250, "", "a\rb", 1),
    OK("CR at text start", "250 \rb\r\n", 250, "", "\rb", 1),
    OK("dash in text", "250-a-b\r\n250 c d\r\n", 250, "", "a-b\nc d", 2),
    OK("8-bit text", "250 \xc3\xa9t\xc3\xa9\r\n", 250, "",
       "\xc3\xa9t\xc3\xa9", 1),
    OK("lowest code", "200 x\r\n", 200, "", "x", 1),
    OK("highest code", "559 x\r\n", 559, "", "x", 1),
    OK("3xx", "354 End data with <CR><LF>.<CR><LF>\r\n", 354, "",
       "End data with <CR><LF>.<CR><LF>", 1),

    /* Enhanced status codes (RFC 3463, RFC 2034). */
    OK("enhanced 2.1.0", "250 2.1.0 Ok\r\n", 250, "2.1.0", "2.1.0 Ok", 1),
    OK("enhanced 5.1.1", "550 5.1.1 <x@example.com>: unknown\r\n", 550,
       "5.1.1", "5.1.1 <x@example.com>: unknown", 1),
    OK("enhanced 4.7.1", "451 4.7.1 try later\r\n", 451, "4.7.1",
       "4.7.1 try later", 1),
    OK("enhanced 3-digit parts", "250 2.100.100 x\r\n", 250, "2.100.100",
       "2.100.100 x", 1),
    OK("enhanced at end of text", "250 2.0.0\r\n", 250, "2.0.0", "2.0.0", 1),
    OK("enhanced at end of first line", "250-2.0.0\r\n250 more\r\n", 250,
       "2.0.0", "2.0.0\nmore", 2),
    OK("enhanced first line only", "250-hello\r\n250 2.0.0 ok\r\n", 250,
       "", "hello\n2.0.0 ok", 2),
    OK("enhanced class mismatch", "250 4.1.0 x\r\n", 250, "", "4.1.0 x", 1),
    OK("enhanced class 3", "354 3.0.0 go\r\n", 354, "", "3.0.0 go", 1),
    OK("enhanced class 2 on 3xx", "354 2.0.0 go\r\n", 354, "",
       "2.0.0 go", 1),
    OK("enhanced two parts", "250 2.1 x\r\n", 250, "", "2.1 x", 1),
    OK("enhanced subject too long", "250 2.1000.0 x\r\n", 250, "",
       "2.1000.0 x", 1),
    OK("enhanced detail too long", "250 2.0.1000 x\r\n", 250, "",
       "2.0.1000 x", 1),
    OK("enhanced empty subject", "250 2..0 x\r\n", 250, "", "2..0 x", 1),
    OK("enhanced empty detail", "250 2.0. x\r\n", 250, "", "2.0. x", 1),
    OK("enhanced not followed by space", "250 2.1.0x y\r\n", 250, "",
       "2.1.0x y", 1),
    OK("enhanced followed by tab", "250 2.1.0\tx\r\n", 250, "",
       "2.1.0\tx", 1),
    OK("enhanced after space", "250  2.1.0 x\r\n", 250, "", " 2.1.0 x", 1),
    OK("enhanced followed by dot", "250 2.1.0.1 x\r\n", 250, "",
       "2.1.0.1 x", 1),
    OK("enhanced letter", "250 2.a.0 x\r\n", 250, "", "2.a.0 x", 1),

    /* Malformed lines: the offending byte is given. */
    ERR("letter in code", "2x0 bad\r\n", SMTPS_EPROTO, 2),
    ERR("plus sign", "+25 bad\r\n", SMTPS_EPROTO, 1),
    ERR("four digits", "2500 bad\r\n", SMTPS_EPROTO, 4),
    ERR("leading space", " 250 bad\r\n", SMTPS_EPROTO, 1),
    ERR("two digits", "25\r\n", SMTPS_EPROTO, 3),
    ERR("two digits, LF", "25\n", SMTPS_EPROTO, 3),
    ERR("two digits and text", "25 bad\r\n", SMTPS_EPROTO, 3),
    ERR("empty line", "\r\n", SMTPS_EPROTO, 1),
    ERR("empty line, LF", "\n", SMTPS_EPROTO, 1),
    ERR("first digit 1", "150 x\r\n", SMTPS_EPROTO, 1),
    ERR("first digit 6", "650 x\r\n", SMTPS_EPROTO, 1),
    ERR("first digit 0", "050 x\r\n", SMTPS_EPROTO, 1),
    ERR("second digit 6", "260 x\r\n", SMTPS_EPROTO, 2),
    ERR("third digit letter", "25a x\r\n", SMTPS_EPROTO, 3),
    ERR("bad separator", "250x\r\n", SMTPS_EPROTO, 4),
    ERR("tab separator", "250\tx\r\n", SMTPS_EPROTO, 4),
    ERR("CR then text after code", "250\rx\r\n", SMTPS_EPROTO, 5),
    ERR("mixed codes", "250-a\r\n251 b\r\n", SMTPS_EPROTO, 10),
    ERR("mixed classes", "250-a\r\n550 b\r\n", SMTPS_EPROTO, 10),
    ERR("mixed code, code-only", "250-a\r\n354\r\n", SMTPS_EPROTO, 10),
    ERR("bad continuation separator", "250-a\r\n250x\r\n", SMTPS_EPROTO, 11),
    ERR("empty line inside", "250-a\r\n\r\n", SMTPS_EPROTO, 8),
    ERR("leading space inside", "250-a\r\n 250 b\r\n", SMTPS_EPROTO, 8),

    /* NUL bytes. */
    ERR("NUL in text", "250 o\0k\r\n", SMTPS_EPROTO, 6),
    ERR("NUL first", "\0", SMTPS_EPROTO, 1),
    ERR("NUL in code", "25\0 x\r\n", SMTPS_EPROTO, 3),
    ERR("NUL as separator", "250\0", SMTPS_EPROTO, 4),
    ERR("NUL after CR", "250 ok\r\0\n", SMTPS_EPROTO, 8),
    ERR("NUL after code-only CR", "250\r\0", SMTPS_EPROTO, 5),
    ERR("NUL in second line", "250-ok\r\n250 \0\r\n", SMTPS_EPROTO, 13),

    /* Bounds. */
    GEN_OK("line of exactly SMTPS_REPLY_LINE_MAX", gen_line_max, 250,
	   SMTPS_REPLY_LINE_MAX - 6, 1),
    GEN_ERR("line one byte over", gen_line_over, SMTPS_ETOOBIG,
	    SMTPS_REPLY_LINE_MAX + 1),
    GEN_OK("LF line of exactly SMTPS_REPLY_LINE_MAX", gen_line_max_lf, 250,
	   SMTPS_REPLY_LINE_MAX - 5, 1),
    GEN_ERR("LF line one byte over", gen_line_over_lf, SMTPS_ETOOBIG,
	    SMTPS_REPLY_LINE_MAX + 1),
    GEN_ERR("endless line", gen_line_endless, SMTPS_ETOOBIG,
	    SMTPS_REPLY_LINE_MAX + 1),
    GEN_OK("reply of exactly SMTPS_REPLY_MAX", gen_reply_max, 250,
	   SMTPS_REPLY_MAX, 33),
    GEN_ERR("reply one byte over", gen_reply_over, SMTPS_ETOOBIG,
	    32 * 2048 + 4 + 161),
    GEN_ERR("endless continuation lines", gen_cont_endless, SMTPS_ETOOBIG,
	    32 * 2048 + 4 + 161),
    GEN_ERR("endless empty continuation lines", gen_empty_endless,
	    SMTPS_ETOOBIG, (SMTPS_REPLY_MAX + 1) * 6),
    GEN_OK("many short lines", gen_many_lines, 250, 2001, 1001),
};

static const struct seq_case seq_cases[] = {
    {"two replies in one buffer", S("250-a\r\n250 b\r\n354 go\r\n"), 2, {
	    {250, "", "a\nb", 2},
	    {354, "", "go", 1},
    }},
    {"pipelined replies", S("250 2.1.0 Ok\r\n250 2.1.5 Ok\n"
			    "550 5.1.1 no\r\n354\r\n"), 4, {
	    {250, "2.1.0", "2.1.0 Ok", 1},
	    {250, "2.1.5", "2.1.5 Ok", 1},
	    {550, "5.1.1", "5.1.1 no", 1},
	    {354, "", "", 1},
    }},
    {"long reply then short ones", S("250-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
				     "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
				     "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
				     "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
				     "\r\n250 y\r\n221 z\r\n"), 2, {
	    {250, "", "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
		"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
		"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
		"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\ny", 2},
	    {221, "", "z", 1},
    }},
};

#define ALL_EXT (SMTPS_EXT_PIPELINING | SMTPS_EXT_SIZE | SMTPS_EXT_8BITMIME \
	| SMTPS_EXT_SMTPUTF8 | SMTPS_EXT_STARTTLS | SMTPS_EXT_AUTH \
	| SMTPS_EXT_DSN | SMTPS_EXT_CHUNKING | SMTPS_EXT_ENHANCEDSTATUSCODES \
	| SMTPS_EXT_XCLIENT | SMTPS_EXT_BINARYMIME | SMTPS_EXT_REQUIRETLS)
#define ALL_AUTH (SMTPS_AUTH_PLAIN | SMTPS_AUTH_LOGIN | SMTPS_AUTH_CRAM_MD5 \
	| SMTPS_AUTH_XOAUTH2)
#define ALL_XCLIENT (SMTPS_XCLIENT_NAME | SMTPS_XCLIENT_ADDR \
	| SMTPS_XCLIENT_PORT | SMTPS_XCLIENT_PROTO | SMTPS_XCLIENT_HELO \
	| SMTPS_XCLIENT_LOGIN | SMTPS_XCLIENT_DESTADDR \
	| SMTPS_XCLIENT_DESTPORT)

static const struct caps_case caps_cases[] = {
    {"all keywords", 250, "mx.example.com Hello\nPIPELINING\n"
	"SIZE 10240000\n8BITMIME\nSMTPUTF8\nSTARTTLS\n"
	"AUTH PLAIN LOGIN CRAM-MD5 XOAUTH2\nDSN\nCHUNKING\n"
	"ENHANCEDSTATUSCODES\n"
	"XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT\n"
	"BINARYMIME\nREQUIRETLS", SMTPS_OK, ALL_EXT, 10240000, ALL_AUTH,
	ALL_XCLIENT},
    {"greeting only", 250, "mx.example.com", SMTPS_OK, 0, 0, 0, 0},
    {"empty text", 250, "", SMTPS_OK, 0, 0, 0, 0},
    {"greeting is skipped", 250, "PIPELINING STARTTLS\nSIZE 5", SMTPS_OK,
	SMTPS_EXT_SIZE, 5, 0, 0},
    {"empty line ignored", 250, "mx\n\nDSN", SMTPS_OK, SMTPS_EXT_DSN, 0, 0, 0},
    {"not 250", 220, "mx\nPIPELINING", SMTPS_EINVAL, 0, 0, 0, 0},
    {"not 250 (5xx)", 502, "mx\nPIPELINING", SMTPS_EINVAL, 0, 0, 0, 0},

    /* SIZE (RFC 1870). */
    {"SIZE without value", 250, "mx\nSIZE", SMTPS_OK, SMTPS_EXT_SIZE, 0, 0, 0},
    {"SIZE 0", 250, "mx\nSIZE 0", SMTPS_OK, SMTPS_EXT_SIZE, 0, 0, 0},
    {"SIZE 52428800", 250, "mx\nSIZE 52428800", SMTPS_OK, SMTPS_EXT_SIZE,
	52428800, 0, 0},
    {"SIZE uint64 max", 250, "mx\nSIZE 18446744073709551615", SMTPS_OK,
	SMTPS_EXT_SIZE, UINT64_MAX, 0, 0},
    {"SIZE overflow by one", 250, "mx\nSIZE 18446744073709551616", SMTPS_OK,
	SMTPS_EXT_SIZE, 0, 0, 0},
    {"SIZE overflow by two", 250, "mx\nSIZE 18446744073709551617", SMTPS_OK,
	SMTPS_EXT_SIZE, 0, 0, 0},
    {"SIZE overflow", 250, "mx\nSIZE 999999999999999999999999", SMTPS_OK,
	SMTPS_EXT_SIZE, 0, 0, 0},
    {"SIZE with unit", 250, "mx\nSIZE 10M", SMTPS_OK, SMTPS_EXT_SIZE, 0, 0, 0},
    {"SIZE negative", 250, "mx\nSIZE -1", SMTPS_OK, SMTPS_EXT_SIZE, 0, 0, 0},
    {"SIZE plus sign", 250, "mx\nSIZE +5", SMTPS_OK, SMTPS_EXT_SIZE, 0, 0, 0},
    {"SIZE garbage", 250, "mx\nSIZE lots", SMTPS_OK, SMTPS_EXT_SIZE, 0, 0, 0},
    {"SIZE extra blanks", 250, "mx\nSIZE \t 1000 \t", SMTPS_OK,
	SMTPS_EXT_SIZE, 1000, 0, 0},
    {"SIZE extra word", 250, "mx\nSIZE 1000 junk", SMTPS_OK, SMTPS_EXT_SIZE,
	1000, 0, 0},
    {"SIZE=1000 is not SIZE", 250, "mx\nSIZE=1000", SMTPS_OK, 0, 0, 0, 0},

    /* AUTH (RFC 4954). */
    {"AUTH all mechanisms", 250, "mx\nAUTH XOAUTH2 CRAM-MD5 LOGIN PLAIN",
	SMTPS_OK, SMTPS_EXT_AUTH, 0, ALL_AUTH, 0},
    {"AUTH unknown mechanisms", 250, "mx\nAUTH GSSAPI PLAIN NTLM",
	SMTPS_OK, SMTPS_EXT_AUTH, 0, SMTPS_AUTH_PLAIN, 0},
    {"AUTH lower case", 250, "mx\nauth login cram-md5", SMTPS_OK,
	SMTPS_EXT_AUTH, 0, SMTPS_AUTH_LOGIN | SMTPS_AUTH_CRAM_MD5, 0},
    {"AUTH without mechanisms", 250, "mx\nAUTH", SMTPS_OK, SMTPS_EXT_AUTH,
	0, 0, 0},
    {"AUTH=PLAIN is not AUTH", 250, "mx\nAUTH=PLAIN LOGIN", SMTPS_OK, 0, 0,
	0, 0},
    {"AUTH and AUTH=", 250, "mx\nAUTH PLAIN\nAUTH=LOGIN", SMTPS_OK,
	SMTPS_EXT_AUTH, 0, SMTPS_AUTH_PLAIN, 0},
    {"AUTH mechanisms match exactly", 250, "mx\nAUTH PLAINX XLOGIN CRAM-MD",
	SMTPS_OK, SMTPS_EXT_AUTH, 0, 0, 0},
    {"AUTH on two lines", 250, "mx\nAUTH PLAIN\nAUTH XOAUTH2", SMTPS_OK,
	SMTPS_EXT_AUTH, 0, SMTPS_AUTH_PLAIN | SMTPS_AUTH_XOAUTH2, 0},

    /* XCLIENT (Postfix). */
    {"XCLIENT some attributes", 250, "mx\nXCLIENT NAME addr FOO DESTPORT",
	SMTPS_OK, SMTPS_EXT_XCLIENT, 0, 0,
	SMTPS_XCLIENT_NAME | SMTPS_XCLIENT_ADDR | SMTPS_XCLIENT_DESTPORT},
    {"XCLIENT without attributes", 250, "mx\nXCLIENT", SMTPS_OK,
	SMTPS_EXT_XCLIENT, 0, 0, 0},

    /* Exact, case-insensitive keyword matching. */
    {"keywords match exactly", 250, "mx\nPIPELININGX\nXPIPELINING\n"
	"PIPELINIG\n8BITMIMEX\nSTARTTLS=1\nDSNX\nCHUNK\nSMTPUTF\n"
	"ENHANCEDSTATUSCODE\nXCLIENTS\nBINARYMIMES\nSIZES 100\nREQUIRETLSX",
	SMTPS_OK, 0, 0, 0, 0},
    {"keywords in any case", 250, "mx\npipelining\nSize 100\nStartTLS\n"
	"smtputf8\nchunking\nEnhancedStatusCodes\nbinarymime\ndsn\n8bitmime\n"
	"Auth Plain\nxclient name\nRequireTLS", SMTPS_OK, ALL_EXT, 100,
	SMTPS_AUTH_PLAIN, SMTPS_XCLIENT_NAME},
    {"keyword after blanks", 250, "mx\n  PIPELINING\n\tDSN", SMTPS_OK,
	SMTPS_EXT_PIPELINING | SMTPS_EXT_DSN, 0, 0, 0},
    {"keyword with parameters", 250, "mx\nPIPELINING now\nDSN x y",
	SMTPS_OK, SMTPS_EXT_PIPELINING | SMTPS_EXT_DSN, 0, 0, 0},
    {"unknown keywords", 250, "mx\nVRFY\nETRN\nX-FOO bar\nHELP\nDELIVERBY 5",
	SMTPS_OK, 0, 0, 0, 0},
    {"parameters are not keywords", 250, "mx\nX-EXT PIPELINING SIZE 5",
	SMTPS_OK, 0, 0, 0, 0},
};

static const struct misc_case misc_cases[] = {
    {"NULL arguments", test_null_args},
    {"empty call", test_empty_call},
    {"free NULL", test_free_null},
    {"smtps_strerror", test_strerror},
    {"smtps_stage_name", test_stage_name},
    {"EHLO from the wire to caps", test_ehlo_to_caps},
    {"buffer reuse across replies", test_buffer_reuse},
};

/* gen_fill - count copies of pattern, then tail, in a malloc'd buffer */

static char *gen_fill(size_t *len, const char *pattern, size_t count,
		      const char *tail)
{
    size_t  plen = strlen(pattern);
    size_t  tlen = strlen(tail);
    char   *buf;
    size_t  i;

    *len = plen * count + tlen;
    if ((buf = malloc(*len + 1)) == NULL) {
	perror("malloc");
	exit(2);
    }
    for (i = 0; i < count; i++)
	memcpy(buf + i * plen, pattern, plen);
    memcpy(buf + plen * count, tail, tlen + 1);
    return (buf);
}

/* gen_line - "250 " or "250-", n times 'x', then eol */

static char *gen_line(size_t *len, const char *head, size_t n,
		      const char *eol)
{
    char   *x = gen_fill(len, "x", n, eol);
    char   *buf = gen_fill(len, head, 1, x);

    free(x);
    return (buf);
}

/* gen_line_max - one line of exactly SMTPS_REPLY_LINE_MAX bytes */

static char *gen_line_max(size_t *len)
{
    return (gen_line(len, "250 ", SMTPS_REPLY_LINE_MAX - 6, "\r\n"));
}

/* gen_line_over - one line a byte longer than SMTPS_REPLY_LINE_MAX */

static char *gen_line_over(size_t *len)
{
    return (gen_line(len, "250 ", SMTPS_REPLY_LINE_MAX - 5, "\r\n"));
}

/* gen_line_max_lf - a bare-LF line of exactly SMTPS_REPLY_LINE_MAX */

static char *gen_line_max_lf(size_t *len)
{
    return (gen_line(len, "250 ", SMTPS_REPLY_LINE_MAX - 5, "\n"));
}

/* gen_line_over_lf - a bare-LF line a byte too long */

static char *gen_line_over_lf(size_t *len)
{
    return (gen_line(len, "250 ", SMTPS_REPLY_LINE_MAX - 4, "\n"));
}

/* gen_line_endless - a line that never ends */

static char *gen_line_endless(size_t *len)
{
    return (gen_line(len, "250 ", 3 * SMTPS_REPLY_LINE_MAX, ""));
}

/* gen_reply - count full continuation lines, then a last line of n bytes */

static char *gen_reply(size_t *len, size_t count, size_t n)
{
    size_t  full_len;
    size_t  last_len;
    char   *full = gen_line(&full_len, "250-", SMTPS_REPLY_LINE_MAX - 6,
				"\r\n");
    char   *last = gen_line(&last_len, "250 ", n, "\r\n");
    char   *lines = gen_fill(len, full, count, last);

    free(full);
    free(last);
    return (lines);
}

/*
 * gen_reply_max - text of exactly SMTPS_REPLY_MAX bytes: 32 lines of 2042
 * text bytes and 32 joining '\n' make 65376, and 160 more end it.
 */

static char *gen_reply_max(size_t *len)
{
    return (gen_reply(len, 32, 160));
}

/* gen_reply_over - text one byte over SMTPS_REPLY_MAX */

static char *gen_reply_over(size_t *len)
{
    return (gen_reply(len, 32, 161));
}

/* gen_cont_endless - full continuation lines that never end the reply */

static char *gen_cont_endless(size_t *len)
{
    size_t  full_len;
    char   *full = gen_line(&full_len, "250-", SMTPS_REPLY_LINE_MAX - 6,
				"\r\n");
    char   *lines = gen_fill(len, full, 40, "");

    free(full);
    return (lines);
}

/* gen_empty_endless - empty continuation lines: only '\n' accumulates */

static char *gen_empty_endless(size_t *len)
{
    return (gen_fill(len, "250-\r\n", SMTPS_REPLY_MAX + 10, ""));
}

/* gen_many_lines - 1000 short continuation lines and a last one */

static char *gen_many_lines(size_t *len)
{
    return (gen_fill(len, "250-a\r\n", 1000, "250 z\r\n"));
}

/* check_reply - compare a reply with what is wanted */

static int check_reply(const struct smtps_reply *r, int code,
		       const char *enhanced, const char *text,
		       size_t text_len, size_t nlines, char *why)
{
    if (r->code != code)
	return (snprintf(why, WHY_MAX, "code %d, want %d", r->code, code), -1);
    if (strcmp(r->enhanced, enhanced) != 0)
	return (snprintf(why, WHY_MAX, "enhanced \"%s\", want \"%s\"",
			 r->enhanced, enhanced), -1);
    if (r->text == NULL)
	return (snprintf(why, WHY_MAX, "text is NULL"), -1);
    if (r->text_len != text_len)
	return (snprintf(why, WHY_MAX, "text_len %zu, want %zu",
			 r->text_len, text_len), -1);
    if (r->text[r->text_len] != 0)
	return (snprintf(why, WHY_MAX, "text not NUL-terminated"), -1);
    if (text != NULL && memcmp(r->text, text, text_len) != 0)
	return (snprintf(why, WHY_MAX, "text \"%.80s\", want \"%.80s\"",
			 r->text, text), -1);
    if (text == NULL && strlen(r->text) != text_len)
	return (snprintf(why, WHY_MAX, "NUL inside text"), -1);
    if (r->nlines != nlines)
	return (snprintf(why, WHY_MAX, "nlines %zu, want %zu",
			 r->nlines, nlines), -1);
    return (0);
}

/*
 * feed - give data to p in chunks, the first of first bytes, the others
 * of step bytes, until a reply completes, an error comes or data ends.
 * Returns the parser's answer and the offset where it stopped in *pos;
 * 99 when a call that returned 0 did not consume its whole chunk.
 */

static int feed(struct smtps_reply_parser *p, const char *data, size_t len,
		size_t first, size_t step, size_t *pos,
		struct smtps_reply *out, char *why)
{
    size_t  off = 0;
    size_t  n;
    size_t  used;
    int     rc;

    for (n = first; off < len; off += n, n = step) {
	if (n > len - off)
	    n = len - off;
	used = 12345;
	rc = smtps_reply_parse(p, data + off, n, &used, out);
	if (rc != 0) {
	    if (used > n) {
		snprintf(why, WHY_MAX, "consumed %zu of a %zu-byte chunk",
			 used, n);
		return (99);
	    }
	    *pos = off + used;
	    return (rc);
	}
	if (used != n) {
	    snprintf(why, WHY_MAX, "returned 0 but consumed %zu of %zu",
		     used, n);
	    return (99);
	}
    }
    *pos = len;
    return (0);
}

/* expect_case - check one mode's outcome, including a sticky error */

static int expect_case(const struct parse_case *c, const char *mode,
		       struct smtps_reply_parser *p, int rc, size_t pos,
		       size_t want_pos, const struct smtps_reply *out,
		       char *why)
{
    char    sub[WHY_MAX];
    struct smtps_reply again;
    size_t  used;
    int     i;

    if (rc == 99) {
	snprintf(sub, sizeof(sub), "%s", why);
	snprintf(why, WHY_MAX, "%.60s: %.180s", mode, sub);
	return (-1);
    }
    if (rc != c->want_rc) {
	snprintf(why, WHY_MAX, "%s: returned %d (%s), want %d (%s)", mode, rc,
		 rc < 0 ? smtps_strerror(rc) : "ok", c->want_rc,
		 c->want_rc < 0 ? smtps_strerror(c->want_rc) : "ok");
	return (-1);
    }
    if (pos != want_pos) {
	snprintf(why, WHY_MAX, "%s: stopped at %zu, want %zu", mode, pos,
		 want_pos);
	return (-1);
    }
    if (rc == 1) {
	if (check_reply(out, c->code, c->enhanced, c->text, c->text_len,
			c->nlines, sub) != 0) {
	    snprintf(why, WHY_MAX, "%.60s: %.180s", mode, sub);
	    return (-1);
	}
	return (0);
    }

    /* The error sticks, and nothing more is consumed. */
    for (i = 0; i < 2; i++) {
	used = 12345;
	rc = smtps_reply_parse(p, S("250 ok\r\n"), &used, &again);
	if (rc != c->want_rc || used != 0) {
	    snprintf(why, WHY_MAX, "%s: not sticky: then %d, consumed %zu",
		     mode, rc, used);
	    return (-1);
	}
    }
    return (0);
}

/* run_mode - feed one input one way into a fresh parser and check it */

static int run_mode(const struct parse_case *c, const char *mode,
		    const char *in, size_t len, size_t first,
		    size_t step, size_t want_pos, char *why)
{
    struct smtps_reply_parser *p;
    struct smtps_reply out;
    size_t  pos = 0;
    int     rc;

    if ((p = smtps_reply_parser_new()) == NULL) {
	snprintf(why, WHY_MAX, "%s: smtps_reply_parser_new failed", mode);
	return (-1);
    }
    rc = feed(p, in, len, first, step, &pos, &out, why);
    rc = expect_case(c, mode, p, rc, pos, want_pos, &out, why);
    smtps_reply_parser_free(p);
    return (rc);
}

/* run_parse_case - run one reply case every way */

static int run_parse_case(const struct parse_case *c, const char *in,
			  size_t len, char *why)
{
    struct smtps_reply_parser *p;
    struct smtps_reply out;
    size_t  want_pos;
    size_t  pos = 0;
    size_t  buf_len;
    size_t  used;
    size_t  k;
    char   *buf;
    char    mode[64];
    int     rc;
    int     ret = -1;

    /*
     * Whole first. Where the case gives no offending byte, the whole
     * input's stop point is what the other modes must match.
     */
    want_pos = c->want_rc == 1 ? len : c->want_pos;
    if (want_pos == 0) {
	if ((p = smtps_reply_parser_new()) == NULL)
	    return (snprintf(why, WHY_MAX, "parser_new failed"), -1);
	(void) feed(p, in, len, len, len, &want_pos, &out, why);
	smtps_reply_parser_free(p);
    }
    if (run_mode(c, "whole", in, len, len, len, want_pos, why) != 0)
	return (-1);
    if (run_mode(c, "bytes", in, len, 1, 1, want_pos, why) != 0)
	return (-1);
    for (k = 1; len <= SPLIT_MAX && k < len; k++) {
	snprintf(mode, sizeof(mode), "split at %zu", k);
	if (run_mode(c, mode, in, len, k, len, want_pos, why) != 0)
	    return (-1);
    }

    /*
     * Trailing: the next reply's bytes follow. *consumed must stop at the
     * boundary, and the rest must then parse as a reply of its own.
     */
    buf_len = len + strlen(TRAIL);
    if ((buf = malloc(buf_len)) == NULL) {
	snprintf(why, WHY_MAX, "out of memory");
	return (-1);
    }
    if ((p = smtps_reply_parser_new()) == NULL) {
	snprintf(why, WHY_MAX, "out of memory");
	goto out;
    }
    memcpy(buf, in, len);
    memcpy(buf + len, TRAIL, strlen(TRAIL));
    rc = feed(p, buf, buf_len, buf_len, buf_len, &pos, &out, why);
    if (expect_case(c, "trailing", p, rc, pos, want_pos, &out, why) != 0)
	goto out;
    if (rc == 1) {
	used = 0;
	rc = smtps_reply_parse(p, buf + pos, buf_len - pos, &used, &out);
	if (rc != 1 || used != buf_len - pos) {
	    snprintf(why, WHY_MAX, "trailing: next reply: %d, consumed %zu",
		     rc, used);
	    goto out;
	}
	if (check_reply(&out, TRAIL_CODE, TRAIL_ENH, S(TRAIL_TEXT), 1,
			mode) != 0) {
	    snprintf(why, WHY_MAX, "trailing: next reply: %.180s", mode);
	    goto out;
	}
    }
    smtps_reply_parser_free(p);
    p = NULL;

    /*
     * After: the parser has just handed out another reply; nothing of it
     * may leak into this one.
     */
    if ((p = smtps_reply_parser_new()) == NULL) {
	snprintf(why, WHY_MAX, "out of memory");
	goto out;
    }
    rc = smtps_reply_parse(p, S(LEAD), &used, &out);
    if (rc != 1 || used != strlen(LEAD)
	|| check_reply(&out, 220, "", S(LEAD_TEXT), 2, mode) != 0) {
	snprintf(why, WHY_MAX, "after: leading reply: %d", rc);
	goto out;
    }
    rc = feed(p, in, len, len, len, &pos, &out, why);
    if (expect_case(c, "after", p, rc, pos, want_pos, &out, why) != 0)
	goto out;
    ret = 0;

out:
    smtps_reply_parser_free(p);
    free(buf);
    return (ret);
}

/* run_stream - parse several replies the way a driver would */

static int run_stream(const struct seq_case *c, size_t first, size_t step,
		      char *why)
{
    struct smtps_reply_parser *p;
    struct smtps_reply out;
    const struct want_reply *w;
    size_t  off = 0;
    size_t  end = first < c->len ? first : c->len;
    size_t  got = 0;
    size_t  used;
    char    sub[WHY_MAX];
    int     rc;
    int     ret = -1;

    if ((p = smtps_reply_parser_new()) == NULL)
	return (snprintf(why, WHY_MAX, "out of memory"), -1);
    while (off < c->len) {
	used = 12345;
	rc = smtps_reply_parse(p, c->input + off, end - off, &used, &out);
	if (rc == 1) {
	    if (got >= c->nreplies) {
		snprintf(why, WHY_MAX, "reply %zu is one too many", got + 1);
		goto out;
	    }
	    w = c->replies + got;
	    if (used == 0 || used > end - off
		|| check_reply(&out, w->code, w->enhanced, w->text,
			       strlen(w->text), w->nlines, sub) != 0) {
		snprintf(why, WHY_MAX, "reply %zu: consumed %zu: %.180s", got + 1,
			 used, used == 0 || used > end - off ? "bad" : sub);
		goto out;
	    }
	    got++;
	    off += used;
	} else if (rc == 0 && used == end - off) {
	    off = end;
	} else {
	    snprintf(why, WHY_MAX, "at %zu: returned %d, consumed %zu", off,
		     rc, used);
	    goto out;
	}
	if (off == end)
	    end = step < c->len - off ? off + step : c->len;
    }
    if (got != c->nreplies) {
	snprintf(why, WHY_MAX, "%zu replies, want %zu", got, c->nreplies);
	goto out;
    }
    ret = 0;

out:
    smtps_reply_parser_free(p);
    return (ret);
}

/* run_seq_case - a stream of replies: whole, byte by byte, every split */

static int run_seq_case(const struct seq_case *c, char *why)
{
    char    sub[WHY_MAX];
    size_t  k;

    if (run_stream(c, c->len, c->len, sub) != 0)
	return (snprintf(why, WHY_MAX, "whole: %.180s", sub), -1);
    if (run_stream(c, 1, 1, sub) != 0)
	return (snprintf(why, WHY_MAX, "bytes: %.180s", sub), -1);
    for (k = 1; k < c->len; k++)
	if (run_stream(c, k, c->len, sub) != 0)
	    return (snprintf(why, WHY_MAX, "split at %zu: %.180s", k, sub), -1);
    return (0);
}

/* run_caps_case - parse one EHLO text and compare the capabilities */

static int run_caps_case(const struct caps_case *c, char *why)
{
    struct smtps_reply r;
    struct smtps_caps caps;
    const char *cp;
    int     rc;

    memset(&r, 0, sizeof(r));
    r.code = c->code;
    r.text = c->text;
    r.text_len = strlen(c->text);
    for (r.nlines = 1, cp = c->text; *cp; cp++)
	r.nlines += (*cp == '\n');
    memset(&caps, 0xa5, sizeof(caps));		/* must be zeroed */

    if ((rc = smtps_caps_parse(&r, &caps)) != c->want_rc)
	return (snprintf(why, WHY_MAX, "returned %d, want %d", rc,
			 c->want_rc), -1);
    if (caps.ext != c->ext)
	return (snprintf(why, WHY_MAX, "ext 0x%x, want 0x%x", caps.ext,
			 c->ext), -1);
    if (caps.size_max != c->size_max)
	return (snprintf(why, WHY_MAX, "size_max %llu, want %llu",
			 (unsigned long long) caps.size_max,
			 (unsigned long long) c->size_max), -1);
    if (caps.auth != c->auth)
	return (snprintf(why, WHY_MAX, "auth 0x%x, want 0x%x", caps.auth,
			 c->auth), -1);
    if (caps.xclient != c->xclient)
	return (snprintf(why, WHY_MAX, "xclient 0x%x, want 0x%x",
			 caps.xclient, c->xclient), -1);
    return (0);
}

/* test_null_args - bad arguments are refused and do not stick */

static int test_null_args(char *why)
{
    struct smtps_reply_parser *p = smtps_reply_parser_new();
    struct smtps_reply out;
    struct smtps_reply r;
    struct smtps_caps caps;
    size_t  used;
    int     ret = -1;

    if (p == NULL)
	return (snprintf(why, WHY_MAX, "out of memory"), -1);
    if (smtps_reply_parse(NULL, S("250 ok\r\n"), &used, &out) != SMTPS_EINVAL)
	snprintf(why, WHY_MAX, "NULL parser accepted");
    else if (smtps_reply_parse(p, S("250 ok\r\n"), NULL, &out) != SMTPS_EINVAL)
	snprintf(why, WHY_MAX, "NULL consumed accepted");
    else if (smtps_reply_parse(p, S("250 ok\r\n"), &used, NULL) != SMTPS_EINVAL)
	snprintf(why, WHY_MAX, "NULL out accepted");
    else if (smtps_reply_parse(p, NULL, 5, &used, &out) != SMTPS_EINVAL)
	snprintf(why, WHY_MAX, "NULL data accepted");
    else if (smtps_reply_parse(p, S("250 ok\r\n"), &used, &out) != 1
	     || used != 8 || out.code != 250)
	snprintf(why, WHY_MAX, "SMTPS_EINVAL stuck");
    else if (smtps_caps_parse(NULL, &caps) != SMTPS_EINVAL)
	snprintf(why, WHY_MAX, "caps: NULL reply accepted");
    else if ((r = out, smtps_caps_parse(&r, NULL)) != SMTPS_EINVAL)
	snprintf(why, WHY_MAX, "caps: NULL caps accepted");
    else if ((r.text = NULL, smtps_caps_parse(&r, &caps)) != SMTPS_EINVAL)
	snprintf(why, WHY_MAX, "caps: NULL text accepted");
    else
	ret = 0;
    smtps_reply_parser_free(p);
    return (ret);
}

/* test_empty_call - no bytes: nothing consumed, more needed */

static int test_empty_call(char *why)
{
    struct smtps_reply_parser *p = smtps_reply_parser_new();
    struct smtps_reply out;
    size_t  used = 12345;
    int     ret = -1;

    if (p == NULL)
	return (snprintf(why, WHY_MAX, "out of memory"), -1);
    if (smtps_reply_parse(p, "", 0, &used, &out) != 0 || used != 0)
	snprintf(why, WHY_MAX, "empty call on a fresh parser");
    else if (smtps_reply_parse(p, NULL, 0, &used, &out) != 0 || used != 0)
	snprintf(why, WHY_MAX, "NULL data with len 0");
    else if (smtps_reply_parse(p, S("250-a\r\n250"), &used, &out) != 0
	     || used != 10)
	snprintf(why, WHY_MAX, "partial reply");
    else if (smtps_reply_parse(p, "", 0, &used, &out) != 0 || used != 0)
	snprintf(why, WHY_MAX, "empty call inside a reply");
    else if (smtps_reply_parse(p, S(" b\r\n"), &used, &out) != 1
	     || used != 4 || strcmp(out.text, "a\nb") != 0)
	snprintf(why, WHY_MAX, "reply after an empty call");
    else
	ret = 0;
    smtps_reply_parser_free(p);
    return (ret);
}

/* test_free_null - freeing NULL is allowed */

static int test_free_null(char *why)
{
    (void) why;
    smtps_reply_parser_free(NULL);
    return (0);
}

/* test_strerror - every error code has its own text */

static int test_strerror(char *why)
{
    static const int codes[] = {
	SMTPS_OK, SMTPS_ENOMEM, SMTPS_EINVAL, SMTPS_ETOOBIG, SMTPS_EPROTO,
	SMTPS_ESTATE, SMTPS_EFULL, SMTPS_ECLOSED, SMTPS_ENOTFOUND,
	SMTPS_ETLS, SMTPS_ENOTSUP, SMTPS_ESYS, SMTPS_EINTR, SMTPS_EAGAIN,
    };
    size_t  n = sizeof(codes) / sizeof(codes[0]);
    size_t  i;
    size_t  j;
    const char *s;

    for (i = 0; i < n; i++) {
	s = smtps_strerror(codes[i]);
	if (s == NULL || *s == 0 || strcmp(s, "unknown error") == 0)
	    return (snprintf(why, WHY_MAX, "code %d has no text", codes[i]), -1);
	for (j = 0; j < i; j++)
	    if (strcmp(s, smtps_strerror(codes[j])) == 0)
		return (snprintf(why, WHY_MAX, "codes %d and %d share \"%s\"",
				 codes[i], codes[j], s), -1);
    }
    if (strcmp(smtps_strerror(-14), "unknown error") != 0
	|| strcmp(smtps_strerror(1), "unknown error") != 0
	|| strcmp(smtps_strerror(-1000), "unknown error") != 0)
	return (snprintf(why, WHY_MAX, "unknown code not \"unknown error\""),
		-1);
    return (0);
}

/* test_stage_name - the names come from the SMTPS_STAGES list */

static int test_stage_name(char *why)
{
#define SMTPS_X_STAGE_CHECK(n, v, s) \
    if (strcmp(smtps_stage_name(v), s) != 0) \
	return (snprintf(why, WHY_MAX, "stage %d: \"%s\", want \"%s\"", v, \
			 smtps_stage_name(v), s), -1);
    SMTPS_STAGES(SMTPS_X_STAGE_CHECK)
#undef SMTPS_X_STAGE_CHECK
    if (strcmp(smtps_stage_name(SMTPS_STAGE_RCPT), "sending RCPT TO") != 0)
	return (snprintf(why, WHY_MAX, "RCPT stage misnamed"), -1);
    if (strcmp(smtps_stage_name(-1), "unknown") != 0
	|| strcmp(smtps_stage_name(SMTPS_STAGE__COUNT), "unknown") != 0
	|| strcmp(smtps_stage_name(1000), "unknown") != 0)
	return (snprintf(why, WHY_MAX, "out of range not \"unknown\""), -1);
    return (0);
}

/* test_ehlo_to_caps - a wire EHLO reply through both parsers */

static int test_ehlo_to_caps(char *why)
{
    static const char ehlo[] =
	"250-mx.example.com Hello client [192.0.2.1]\r\n"
	"250-PIPELINING\r\n"
	"250-SIZE 35882577\r\n"
	"250-AUTH LOGIN PLAIN XOAUTH2\r\n"
	"250-ENHANCEDSTATUSCODES\r\n"
	"250-8BITMIME\r\n"
	"250-DSN\r\n"
	"250 CHUNKING\r\n";
    struct smtps_reply_parser *p = smtps_reply_parser_new();
    struct smtps_reply out;
    struct smtps_caps caps;
    size_t  used;
    int     ret = -1;

    if (p == NULL)
	return (snprintf(why, WHY_MAX, "out of memory"), -1);
    if (smtps_reply_parse(p, S(ehlo), &used, &out) != 1
	|| used != sizeof(ehlo) - 1 || out.nlines != 8)
	snprintf(why, WHY_MAX, "reply not parsed");
    else if (smtps_caps_parse(&out, &caps) != SMTPS_OK)
	snprintf(why, WHY_MAX, "caps not parsed");
    else if (caps.ext != (SMTPS_EXT_PIPELINING | SMTPS_EXT_SIZE
			  | SMTPS_EXT_AUTH | SMTPS_EXT_ENHANCEDSTATUSCODES
			  | SMTPS_EXT_8BITMIME | SMTPS_EXT_DSN
			  | SMTPS_EXT_CHUNKING))
	snprintf(why, WHY_MAX, "ext 0x%x", caps.ext);
    else if (caps.size_max != 35882577)
	snprintf(why, WHY_MAX, "size_max %llu",
		 (unsigned long long) caps.size_max);
    else if (caps.auth != (SMTPS_AUTH_LOGIN | SMTPS_AUTH_PLAIN
			   | SMTPS_AUTH_XOAUTH2) || caps.xclient != 0)
	snprintf(why, WHY_MAX, "auth 0x%x xclient 0x%x", caps.auth,
		 caps.xclient);
    else
	ret = 0;
    smtps_reply_parser_free(p);
    return (ret);
}

/* test_buffer_reuse - big, small, big: every reply is right */

static int test_buffer_reuse(char *why)
{
    struct smtps_reply_parser *p = smtps_reply_parser_new();
    struct smtps_reply out;
    size_t  big_len;
    size_t  used;
    char   *big = gen_reply_max(&big_len);
    int     round;
    int     ret = -1;

    if (p == NULL) {
	free(big);
	return (snprintf(why, WHY_MAX, "out of memory"), -1);
    }
    for (round = 0; round < 3; round++) {
	if (smtps_reply_parse(p, big, big_len, &used, &out) != 1
	    || used != big_len
	    || check_reply(&out, 250, "", NULL, SMTPS_REPLY_MAX, 33, why) != 0)
	    goto out;
	if (smtps_reply_parse(p, S("250 2.0.0 small\r\n"), &used, &out) != 1
	    || check_reply(&out, 250, "2.0.0", S("2.0.0 small"), 1, why) != 0)
	    goto out;
	if (smtps_reply_parse(p, S("354\r\n"), &used, &out) != 1
	    || check_reply(&out, 354, "", S(""), 1, why) != 0)
	    goto out;
    }
    ret = 0;

out:
    if (ret != 0 && why[0] == 0)
	snprintf(why, WHY_MAX, "round %d failed", round);
    smtps_reply_parser_free(p);
    free(big);
    return (ret);
}

/* report - print one case's verdict and count it */

static void report(const char *label, int rc, const char *why, int *pass,
		   int *fail)
{
    if (rc == 0) {
	printf("PASS %s\n", label);
	(*pass)++;
    } else {
	printf("FAIL %s: %s\n", label, why);
	(*fail)++;
    }
    fflush(stdout);
}

/* main - run every table */

int     main(void)
{
    char    why[WHY_MAX];
    char    label[128];
    const struct parse_case *c;
    char   *gen_in;
    size_t  gen_len;
    size_t  i;
    int     pass = 0;
    int     fail = 0;
    int     rc;

#define NITEMS(a) (sizeof(a) / sizeof((a)[0]))

    for (i = 0; i < NITEMS(parse_cases); i++) {
	c = parse_cases + i;
	snprintf(label, sizeof(label), "parse: %s", c->label);
	printf("RUN %s\n", label);
	why[0] = 0;
	if (c->gen != NULL) {
	    gen_in = c->gen(&gen_len);
	    rc = run_parse_case(c, gen_in, gen_len, why);
	    free(gen_in);
	} else {
	    rc = run_parse_case(c, c->input, c->len, why);
	}
	report(label, rc, why, &pass, &fail);
    }
    for (i = 0; i < NITEMS(seq_cases); i++) {
	snprintf(label, sizeof(label), "stream: %s", seq_cases[i].label);
	printf("RUN %s\n", label);
	why[0] = 0;
	report(label, run_seq_case(seq_cases + i, why), why, &pass, &fail);
    }
    for (i = 0; i < NITEMS(caps_cases); i++) {
	snprintf(label, sizeof(label), "caps: %s", caps_cases[i].label);
	printf("RUN %s\n", label);
	why[0] = 0;
	report(label, run_caps_case(caps_cases + i, why), why, &pass, &fail);
    }
    for (i = 0; i < NITEMS(misc_cases); i++) {
	snprintf(label, sizeof(label), "misc: %s", misc_cases[i].label);
	printf("RUN %s\n", label);
	why[0] = 0;
	report(label, misc_cases[i].fn(why), why, &pass, &fail);
    }
    printf("%d passed, %d failed\n", pass, fail);
    return (fail != 0);
}
