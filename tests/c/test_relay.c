/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	test_relay 1
 * SUMMARY
 *	what a relay passes on: SMTPUTF8 asked for, a UTF-8 ORCPT
 * SYNOPSIS
 *	test_relay
 * DESCRIPTION
 *	Drives a sans-I/O session through scripted replies, table by table,
 *	and checks the exact bytes it sends and the result it hands out:
 *
 *	orcpt	a non-ASCII ORCPT goes as RFC 6533's utf-8 address type in
 *		its utf-8-addr-xtext form (2-, 3- and 4-byte characters, and
 *		the three ASCII characters that must be escaped); an ASCII one
 *		as rfc822 xtext, as before.
 *	smtputf8
 *		smtps_message_set_smtputf8(): SMTPUTF8 on MAIL FROM for an
 *		ASCII envelope when offered; when not offered, nothing is sent
 *		for the message and its result is permfail at stage
 *		BEFORE_MAIL, with the enhanced code 5.6.7 on the message and
 *		on each recipient.
 * DIAGNOSTICS
 *	The exit status is 1 when any test fails, else 0.
 * SEE ALSO
 *	csrc/states.c (rcpt_line, utf8_xtext, the MAIL refusals),
 *	csrc/classify.c (local_codes).
 *--*/

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "smtpstate.h"

#define NITEMS(a) (sizeof(a) / sizeof((a)[0]))
#define OUT_MAX 8192

static char why[256];

/* take - everything the session queued, as text (cut at cap) */

static size_t take(struct smtps_session *s, char *copy, size_t cap)
{
    const char *data;
    size_t  n, total = 0;

    copy[0] = 0;
    while ((n = smtps_session_output(s, &data)) > 0) {
	if (total + n < cap) {
	    memcpy(copy + total, data, n);
	    copy[total + n] = 0;
	}
	total += n;
	smtps_session_consume(s, n, 1000);
    }
    return total;
}

/* feed - the server says text */

static void feed(struct smtps_session *s, const char *text)
{
    (void) smtps_session_feed(s, text, strlen(text), 1000);
}

/* greeted - a session past its EHLO, the server offering ehlo's lines */

static struct smtps_session *greeted(const char *ehlo, char *out)
{
    struct smtps_session *s;

    if ((s = smtps_session_new(NULL, "client.test", NULL)) == NULL)
	return NULL;
    if (smtps_session_start(s, 1000) != SMTPS_OK) {
	smtps_session_free(s);
	return NULL;
    }
    feed(s, "220 mx.test ESMTP\r\n");
    take(s, out, OUT_MAX);
    feed(s, ehlo);
    return s;
}

struct orcpt_case {
    const char *label;
    const char *orcpt;
    const char *want;			/* the RCPT line */
};

static const struct orcpt_case orcpt_cases[] = {
    {"ascii", "Old+Box@old.test",
    "RCPT TO:<c@d.test> ORCPT=rfc822;Old+2BBox@old.test\r\n"},
    {"2-byte", "j\xc3\xb6rg@x.test",
    "RCPT TO:<c@d.test> ORCPT=utf-8;j\\x{F6}rg@x.test\r\n"},
    {"3-byte and escapes", "\xe2\x82\xac+=\\@x.test",
    "RCPT TO:<c@d.test> ORCPT=utf-8;\\x{20AC}\\x{2B}\\x{3D}\\x{5C}@x.test\r\n"},
    {"4-byte", "\xf0\x9f\x93\xa7@x.test",
    "RCPT TO:<c@d.test> ORCPT=utf-8;\\x{1F4E7}@x.test\r\n"},
    {"not UTF-8: left out", "\xc3(@x.test", "RCPT TO:<c@d.test>\r\n"},
    {"surrogate: left out", "\xed\xa0\x80@x.test", "RCPT TO:<c@d.test>\r\n"},
};

/* test_orcpt - one recipient's RCPT line for a case */

static int test_orcpt(const struct orcpt_case *c)
{
    struct smtps_session *s;
    struct smtps_message *m;
    char    out[OUT_MAX];
    const char *rcpt;
    int     ok = 0;

    if ((s = greeted("250-mx.test\r\n250-SMTPUTF8\r\n250 DSN\r\n", out)) == NULL)
	return (snprintf(why, sizeof(why), "session"), 0);
    if ((m = smtps_message_new()) == NULL
	|| smtps_message_set_sender(m, "a@b.test", 8) != SMTPS_OK
	|| smtps_message_set_body(m, "x\r\n", 3) != SMTPS_OK) {
	smtps_message_free(m);
	snprintf(why, sizeof(why), "message");
	goto out;
    }
    if (smtps_message_add_recipient(m, "c@d.test", 8, 0, c->orcpt,
				    strlen(c->orcpt)) != SMTPS_OK) {
	/* Refused up front is as good as left out, for bad UTF-8. */
	smtps_message_free(m);
	ok = strstr(c->want, "ORCPT") == NULL;
	snprintf(why, sizeof(why), "the recipient was refused");
	goto out;
    }
    if (smtps_session_submit(s, m, 1, 1000) != SMTPS_OK) {
	snprintf(why, sizeof(why), "submit");
	goto out;
    }
    take(s, out, sizeof(out));
    if (strncmp(out, "MAIL FROM:<a@b.test>", 20) != 0) {
	feed(s, "250 ok\r\n");
	take(s, out, sizeof(out));
    } else if ((rcpt = strstr(out, "RCPT")) == NULL) {
	feed(s, "250 ok\r\n");
	take(s, out, sizeof(out));
    }
    rcpt = strstr(out, "RCPT");
    ok = rcpt != NULL && strcmp(rcpt, c->want) == 0;
    snprintf(why, sizeof(why), "sent \"%.200s\"", rcpt ? rcpt : out);
out:
    smtps_session_free(s);
    return ok;
}

/* test_smtputf8 - asked for: sent when offered, refused before MAIL if not */

static int test_smtputf8(int offered)
{
    struct smtps_session *s;
    struct smtps_message *m;
    struct smtps_result *r = NULL;
    char    out[OUT_MAX];
    int     ok = 0;

    s = greeted(offered ? "250-mx.test\r\n250 SMTPUTF8\r\n" : "250 mx.test\r\n", out);
    if (s == NULL)
	return (snprintf(why, sizeof(why), "session"), 0);
    if ((m = smtps_message_new()) == NULL
	|| smtps_message_set_sender(m, "a@b.test", 8) != SMTPS_OK
	|| smtps_message_add_recipient(m, "c@d.test", 8, 0, NULL, 0) != SMTPS_OK
	|| smtps_message_add_recipient(m, "e@d.test", 8, 0, NULL, 0) != SMTPS_OK
	|| smtps_message_set_smtputf8(m, 2) != SMTPS_EINVAL
	|| smtps_message_set_smtputf8(m, 1) != SMTPS_OK
	|| smtps_message_set_body(m, "x\r\n", 3) != SMTPS_OK
	|| smtps_session_submit(s, m, 7, 1000) != SMTPS_OK) {
	snprintf(why, sizeof(why), "message");
	goto out;
    }
    take(s, out, sizeof(out));
    if (offered) {
	ok = strncmp(out, "MAIL FROM:<a@b.test> SMTPUTF8\r\n", 31) == 0;
	snprintf(why, sizeof(why), "sent \"%.200s\"", out);
	goto out;
    }
    if (strstr(out, "MAIL") != NULL) {
	snprintf(why, sizeof(why), "MAIL was sent: \"%.200s\"", out);
	goto out;
    }
    if ((r = smtps_session_next_result(s)) == NULL) {
	snprintf(why, sizeof(why), "no result");
	goto out;
    }
    ok = r->tag == 7 && r->status == SMTPS_STATUS_PERMFAIL
	&& r->stage == SMTPS_STAGE_BEFORE_MAIL
	&& strcmp(r->stage_name, "before MAIL FROM (nothing sent)") == 0
	&& strcmp(r->enhanced, "5.6.7") == 0 && r->nrcpt == 2
	&& strcmp(r->rcpt[0].enhanced, "5.6.7") == 0
	&& strcmp(r->rcpt[1].enhanced, "5.6.7") == 0
	&& r->bounce_class == SMTPS_BOUNCE_GENERIC_BOUNCE
	&& strstr(r->reason, "needs SMTPUTF8") != NULL;
    snprintf(why, sizeof(why), "status %d stage %d \"%s\" code \"%s\" class %d: %.100s",
	     r->status, r->stage, r->stage_name, r->enhanced, r->bounce_class,
	     r->reason);
out:
    smtps_result_free(r);
    smtps_session_free(s);
    return ok;
}

/* report - print PASS or FAIL and count it */

static void report(const char *label, int ok, int *pass, int *fail)
{
    if (ok) {
	printf("PASS %s\n", label);
	(*pass)++;
    } else {
	printf("FAIL %s: %s\n", label, why);
	(*fail)++;
    }
}

int     main(void)
{
    char    label[128];
    size_t  i;
    int     pass = 0, fail = 0;

    for (i = 0; i < NITEMS(orcpt_cases); i++) {
	snprintf(label, sizeof(label), "orcpt: %s", orcpt_cases[i].label);
	printf("RUN %s\n", label);
	why[0] = 0;
	report(label, test_orcpt(&orcpt_cases[i]), &pass, &fail);
    }
    printf("RUN smtputf8 offered\n");
    why[0] = 0;
    report("smtputf8 offered", test_smtputf8(1), &pass, &fail);
    printf("RUN smtputf8 not offered\n");
    why[0] = 0;
    report("smtputf8 not offered", test_smtputf8(0), &pass, &fail);
    printf("%d passed, %d failed\n", pass, fail);
    return fail ? 1 : 0;
}
