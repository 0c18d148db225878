/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	test_classify 1
 * SUMMARY
 *	table-driven tests of bounce classification
 * SYNOPSIS
 *	test_classify
 * DESCRIPTION
 *	Runs every case of the tables below and prints "RUN label", then
 *	"PASS label" or "FAIL label: why", and a final "N passed, N
 *	failed" line: replies (enhanced code first, text second, code
 *	last, 4xx never hard), failures without a reply (by reason), whole
 *	results (message and recipients), and the caller's classes and
 *	rules (order, wildcards, reasons, refusals, reset).
 *
 *	gcc -std=c11 -Wall -Wextra -Werror -O1 -g
 *	    -fsanitize=address,undefined -fno-sanitize-recover=all
 *	    -Iinclude -Icsrc tests/c/test_classify.c csrc/classify.c csrc/message.c
 *	    csrc/body.c
 *	    -lssl -lcrypto -o /tmp/test_classify && /tmp/test_classify
 * DIAGNOSTICS
 *	The exit status is 1 when any case fails, else 0.
 * SEE ALSO
 *	csrc/classify.c, the code under test.
 *--*/

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "smtpstate.h"

#define WHY_MAX 256
#define NITEMS(a) (sizeof(a) / sizeof((a)[0]))

struct reply_case {
    const char *label;
    int     code;
    const char *enhanced;
    const char *text;
    int     want;
};

static const struct reply_case reply_cases[] = {
    {"2xx is no failure", 250, "2.0.0", "ok", SMTPS_BOUNCE_NONE},
    {"3xx is no failure", 354, "", "go ahead", SMTPS_BOUNCE_NONE},
    {"5.1.1 invalid recipient", 550, "5.1.1", "no thanks", SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"5.1.1 beats the text", 550, "5.1.1", "mailbox full", SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"4.1.1 is only soft", 450, "4.1.1", "unverified address", SMTPS_BOUNCE_SOFT_BOUNCE},
    {"5.1.2 DNS", 550, "5.1.2", "bad system", SMTPS_BOUNCE_DNS_FAILURE},
    {"5.2.2 mailbox full", 552, "5.2.2", "over quota", SMTPS_BOUNCE_MAILBOX_FULL},
    {"4.2.2 mailbox full stays", 452, "4.2.2", "full", SMTPS_BOUNCE_MAILBOX_FULL},
    {"5.3.4 too large", 552, "5.3.4", "Message size exceeds fixed limit", SMTPS_BOUNCE_TOO_LARGE},
    {"4.4.7 timeout", 451, "4.4.7", "expired", SMTPS_BOUNCE_TIMEOUT},
    {"5.7.26 mail block", 550, "5.7.26", "DMARC", SMTPS_BOUNCE_MAIL_BLOCK},
    {"5.7.1 relay by text", 554, "5.7.1", "<x@y>: Relay access denied", SMTPS_BOUNCE_RELAYING_DENIED},
    {"5.7.1 spam content by text", 550, "5.7.1", "Message rejected as spam", SMTPS_BOUNCE_SPAM_CONTENT},
    {"5.7.1 blocklist by text", 554, "5.7.1", "Service unavailable; client [192.0.2.1] blocked using zen.spamhaus.org", SMTPS_BOUNCE_SPAM_BLOCK},
    {"5.7.1 user unknown by text", 550, "5.7.1", "Recipient address rejected: user unknown", SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"5.7.1 alone mail block", 550, "5.7.1", "go away", SMTPS_BOUNCE_MAIL_BLOCK},
    {"5.5.1 no valid recipients", 554, "5.5.1", "Error: no valid recipients", SMTPS_BOUNCE_NO_RCPT},
    {"no enhanced, text", 550, "", "User unknown", SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"no enhanced, case", 550, NULL, "MAILBOX IS FULL", SMTPS_BOUNCE_MAILBOX_FULL},
    {"mailbox size limit is full", 552, "", "mailbox size limit exceeded", SMTPS_BOUNCE_MAILBOX_FULL},
    {"size limit is large", 552, "", "message size limit exceeded", SMTPS_BOUNCE_TOO_LARGE},
    {"attachment", 554, "", "Prohibited attachment type", SMTPS_BOUNCE_PROHIBITED_ATTACHMENT},
    {"greylisting", 450, "", "Greylisted, please try again", SMTPS_BOUNCE_TRANSIENT_FAILURE},
    {"reverse dns is a block", 550, "", "no reverse DNS for your IP", SMTPS_BOUNCE_MAIL_BLOCK},
    {"auto-reply", 550, "", "Out of office until Monday", SMTPS_BOUNCE_AUTO_REPLY},
    {"unsubscribe", 550, "", "please unsubscribe me", SMTPS_BOUNCE_UNSUBSCRIBE},
    {"challenge", 550, "", "challenge/response: verify you are human", SMTPS_BOUNCE_CHALLENGE_RESPONSE},
    {"bare 5xx", 550, "", "no", SMTPS_BOUNCE_GENERIC_BOUNCE},
    {"bare 4xx", 451, "", "local error", SMTPS_BOUNCE_SOFT_BOUNCE},
    {"bare 421", 421, "", "closing", SMTPS_BOUNCE_TRANSIENT_FAILURE},
    {"4xx user unknown softened", 450, "", "user unknown", SMTPS_BOUNCE_SOFT_BOUNCE},
    {"bad enhanced ignored", 550, "9.9.9", "user unknown", SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"NULL text", 550, "5.1.1", NULL, SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"NUL in text stops nothing", 550, "", "x\0user unknown", SMTPS_BOUNCE_GENERIC_BOUNCE},
};

struct reason_case {
    const char *label;
    int     status;
    const char *reason;
    int     want;
};

static const struct reason_case reason_cases[] = {
    {"delivered", SMTPS_STATUS_DELIVERED, "", SMTPS_BOUNCE_NONE},
    {"unknown", SMTPS_STATUS_UNKNOWN, "connection lost", SMTPS_BOUNCE_UNDETERMINED},
    {"resolve", SMTPS_STATUS_TEMPFAIL, "cannot resolve x.invalid: Name or service not known", SMTPS_BOUNCE_DNS_FAILURE},
    {"resolve timed out is DNS", SMTPS_STATUS_TEMPFAIL, "cannot resolve x: timed out", SMTPS_BOUNCE_DNS_FAILURE},
    {"timeout", SMTPS_STATUS_TEMPFAIL, "timeout: no reply in state RCPT", SMTPS_BOUNCE_TIMEOUT},
    {"SIZE", SMTPS_STATUS_PERMFAIL, "message of 9 bytes exceeds the server's SIZE limit of 3", SMTPS_BOUNCE_TOO_LARGE},
    {"lost", SMTPS_STATUS_TEMPFAIL, "connection lost: reset", SMTPS_BOUNCE_TRANSIENT_FAILURE},
    {"our refusal", SMTPS_STATUS_PERMFAIL, "a state said no", SMTPS_BOUNCE_ADMIN_FAILURE},
    {"no 8BITMIME", SMTPS_STATUS_PERMFAIL, "8-bit content needs 8BITMIME", SMTPS_BOUNCE_GENERIC_BOUNCE},
    {"no SMTPUTF8", SMTPS_STATUS_PERMFAIL, "a non-ASCII address needs SMTPUTF8, which the server does not offer", SMTPS_BOUNCE_GENERIC_BOUNCE},
    {"NULL reason", SMTPS_STATUS_TEMPFAIL, NULL, SMTPS_BOUNCE_TRANSIENT_FAILURE},
};

/* The RFC 3463 code of a failure without a reply (smtps_bounce_local_enhanced). */
struct local_case {
    const char *label;
    int     status;
    const char *reason;
    const char *want;
};

static const struct local_case local_cases[] = {
    {"refused", SMTPS_STATUS_TEMPFAIL, "connect to a[192.0.2.1]:25: Connection refused", "4.4.1"},
    {"connect timed out", SMTPS_STATUS_TEMPFAIL, "connect to a[192.0.2.1]:25: timed out", "4.4.1"},
    {"queued behind it", SMTPS_STATUS_TEMPFAIL, "not attempted: connect to a: refused", "4.4.1"},
    {"reply timeout", SMTPS_STATUS_TEMPFAIL, "timeout: no reply in state RCPT", "4.4.2"},
    {"handshake timeout", SMTPS_STATUS_TEMPFAIL, "timeout: the TLS handshake did not complete", "4.4.2"},
    {"lost", SMTPS_STATUS_TEMPFAIL, "connection lost: reset", "4.4.2"},
    {"unknown", SMTPS_STATUS_UNKNOWN, "connection lost after the final dot", "4.4.2"},
    {"DNS", SMTPS_STATUS_TEMPFAIL, "cannot resolve x: timed out", "4.4.3"},
    {"route.c's own", SMTPS_STATUS_TEMPFAIL, "4.4.4 cannot route x: no MX", "4.4.4"},
    {"own code, digit from status", SMTPS_STATUS_TEMPFAIL, "5.7.30 REQUIRETLS", "4.7.30"},
    {"not a code", SMTPS_STATUS_PERMFAIL, "5.7.3000 x", "5.0.0"},
    {"code alone", SMTPS_STATUS_PERMFAIL, "5.1.10", "5.1.10"},
    {"expired", SMTPS_STATUS_TEMPFAIL, "delivery time expired", "4.4.7"},
    {"certificate expired is TLS", SMTPS_STATUS_TEMPFAIL, "TLS handshake failed: certificate has expired", "4.7.5"},
    {"TLS not offered", SMTPS_STATUS_TEMPFAIL, "TLS is required, but the server does not offer STARTTLS", "4.7.4"},
    {"SIZE", SMTPS_STATUS_PERMFAIL, "message of 9 bytes exceeds the server's SIZE limit of 3", "5.3.4"},
    {"SMTPUTF8", SMTPS_STATUS_PERMFAIL, "a non-ASCII address needs SMTPUTF8, which the server does not offer", "5.6.7"},
    {"SMTPUTF8 asked", SMTPS_STATUS_PERMFAIL, "the message needs SMTPUTF8 (asked for), which the server does not offer", "5.6.7"},
    {"8BITMIME", SMTPS_STATUS_PERMFAIL, "8-bit content needs 8BITMIME", "5.6.3"},
    {"anything else", SMTPS_STATUS_PERMFAIL, "a state said no", "5.0.0"},
    {"NULL reason", SMTPS_STATUS_TEMPFAIL, NULL, "4.0.0"},
    {"delivered", SMTPS_STATUS_DELIVERED, "connect to", ""},
    {"partial", SMTPS_STATUS_PARTIAL, "connect to", ""},
};

/* report - print PASS or FAIL and count it */

static void report(const char *label, int ok, const char *why, int *pass,
		           int *fail)
{
    if (ok) {
	printf("PASS %s\n", label);
	(*pass)++;
    } else {
	printf("FAIL %s: %s\n", label, why);
	(*fail)++;
    }
}

/* text_len - the case's text length: up to the last byte of the literal */

static size_t text_len(const struct reply_case *c)
{
    if (c->text == NULL)
	return 0;
    /* "x\0user unknown" must be looked at whole: strlen stops at the NUL. */
    if (strcmp(c->label, "NUL in text stops nothing") == 0)
	return 1;
    return strlen(c->text);
}

/* check_result - a whole result: message and recipients */

static int check_result(char *why)
{
    struct smtps_result r;
    struct smtps_result_rcpt rc[4];
    char    t0[] = "User unknown", t1[] = "", t2[] = "", t3[] = "";

    memset(&r, 0, sizeof(r));
    memset(rc, 0, sizeof(rc));
    r.status = SMTPS_STATUS_PERMFAIL;
    r.reply.code = 554;
    strcpy(r.reply.enhanced, "5.7.1");
    r.reply.text = (char *) "Message rejected as spam";
    r.reason = (char *) "";
    r.nrcpt = 4;
    r.rcpt = rc;
    rc[0].status = SMTPS_STATUS_PERMFAIL;	/* refused at RCPT */
    rc[0].reply.code = 550;
    strcpy(rc[0].reply.enhanced, "5.1.1");
    rc[0].reply.text = t0;
    rc[1].status = SMTPS_STATUS_PERMFAIL;	/* accepted, then the message failed */
    rc[1].reply.text = t1;
    rc[2].status = SMTPS_STATUS_NOT_SENT;	/* not failed: not sent */
    rc[2].reply.text = t2;
    rc[3].status = SMTPS_RCPT_PENDING;	/* never tried */
    rc[3].reply.text = t3;
    smtps_bounce_classify_result(&r);
    if (r.bounce_class != SMTPS_BOUNCE_SPAM_CONTENT || rc[0].bounce_class != SMTPS_BOUNCE_INVALID_RECIPIENT
	|| rc[1].bounce_class != SMTPS_BOUNCE_SPAM_CONTENT || rc[2].bounce_class != SMTPS_BOUNCE_NONE
	|| rc[3].bounce_class != SMTPS_BOUNCE_SPAM_CONTENT) {
	snprintf(why, WHY_MAX, "classes %d: %d %d %d %d", r.bounce_class,
		 rc[0].bounce_class, rc[1].bounce_class, rc[2].bounce_class,
		 rc[3].bounce_class);
	return 0;
    }
    r.status = SMTPS_STATUS_DELIVERED;
    r.reply.code = 250;
    rc[0].status = rc[1].status = SMTPS_STATUS_DELIVERED;
    smtps_bounce_classify_result(&r);
    if (r.bounce_class != 0 || rc[0].bounce_class != 0 || rc[1].bounce_class != 0) {
	snprintf(why, WHY_MAX, "delivered got classes");
	return 0;
    }
    /* A partial delivery fails as its first failed recipient. */
    r.status = SMTPS_STATUS_PARTIAL;
    rc[0].status = SMTPS_STATUS_DELIVERED;
    rc[1].status = SMTPS_STATUS_PERMFAIL;
    rc[1].reply.code = 550;
    strcpy(rc[1].reply.enhanced, "5.1.1");
    rc[3].status = SMTPS_STATUS_NOT_SENT;
    smtps_bounce_classify_result(&r);
    if (r.bounce_class != SMTPS_BOUNCE_INVALID_RECIPIENT || rc[0].bounce_class != 0
	|| rc[1].bounce_class != SMTPS_BOUNCE_INVALID_RECIPIENT
	|| rc[3].bounce_class != 0) {
	snprintf(why, WHY_MAX, "partial: %d: %d %d %d", r.bounce_class,
		 rc[0].bounce_class, rc[1].bounce_class, rc[3].bounce_class);
	return 0;
    }
    return 1;
}

/* check_user - the caller's classes and rules */

static int check_user(char *why)
{
    struct smtps_bounce_rule rule;
    char    name[SMTPS_BOUNCE_NAME_MAX + 1];

#define EXPECT(cond, ...) do { if (!(cond)) { snprintf(why, WHY_MAX, __VA_ARGS__); \
    smtps_bounce_reset(); return 0; } } while (0)

    EXPECT(smtps_bounce_register_class(10, "mine") == SMTPS_EINVAL, "built-in code taken");
    EXPECT(smtps_bounce_register_class(0, "zero") == SMTPS_EINVAL, "code 0");
    EXPECT(smtps_bounce_register_class(1000, "big") == SMTPS_EINVAL, "code 1000");
    EXPECT(smtps_bounce_register_class(200, "") == SMTPS_EINVAL, "empty name");
    EXPECT(smtps_bounce_register_class(200, "bad\nname") == SMTPS_EINVAL, "control in name");
    EXPECT(smtps_bounce_register_class(200, "quarantined") == SMTPS_OK, "register");
    EXPECT(smtps_bounce_register_class(200, "quarantined") == SMTPS_OK, "again, same name");
    EXPECT(smtps_bounce_register_class(200, "other") == SMTPS_EINVAL, "again, other name");
    EXPECT(smtps_bounce_class_name(200, name, sizeof(name)) == SMTPS_OK
	   && strcmp(name, "quarantined") == 0, "name of 200");
    EXPECT(smtps_bounce_class_name(201, name, sizeof(name)) == SMTPS_ENOTFOUND,
	   "no class 201");
    EXPECT(smtps_bounce_class_name(200, name, 4) == SMTPS_OK
	   && strcmp(name, "qua") == 0, "a name cut to fit");
    EXPECT(smtps_bounce_class_name(200, NULL, 4) == SMTPS_EINVAL
	   && smtps_bounce_class_name(200, name, 0) == SMTPS_EINVAL, "no room");

    memset(&rule, 0, sizeof(rule));
    rule.sizeof_bounce_rule = sizeof(rule);
    rule.bounce_class = 200;
    EXPECT(smtps_bounce_add_rule(&rule) == SMTPS_EINVAL, "a rule matching everything");
    rule.bounce_class = 201;
    rule.text = "quarantine";
    EXPECT(smtps_bounce_add_rule(&rule) == SMTPS_EINVAL, "unknown class");
    rule.bounce_class = 200;
    rule.code = 6;
    EXPECT(smtps_bounce_add_rule(&rule) == SMTPS_EINVAL, "bad code 6");
    rule.code = 550;
    rule.enhanced = "5.x.1";
    EXPECT(smtps_bounce_add_rule(&rule) == SMTPS_EINVAL, "bad pattern");
    rule.enhanced = NULL;
    rule.text = "QUARANTINE";
    EXPECT(smtps_bounce_add_rule(&rule) == SMTPS_OK, "text rule");
    EXPECT(smtps_bounce_classify(550, "5.1.1", "held in quarantine", 18) == 200,
	   "a rule beats a specific enhanced code");
    EXPECT(smtps_bounce_classify(554, "5.1.1", "held in quarantine", 18)
	   == SMTPS_BOUNCE_INVALID_RECIPIENT, "code 550 only");
    rule.code = 0;
    rule.text = NULL;
    rule.enhanced = "5.7.*";
    rule.bounce_class = SMTPS_BOUNCE_SPAM_BLOCK;
    EXPECT(smtps_bounce_add_rule(&rule) == SMTPS_OK, "pattern rule");
    EXPECT(smtps_bounce_classify(550, "5.7.26", "dmarc", 5) == SMTPS_BOUNCE_SPAM_BLOCK,
	   "5.7.* matches 5.7.26");
    EXPECT(smtps_bounce_classify(550, "", "dmarc", 5) == SMTPS_BOUNCE_MAIL_BLOCK,
	   "a pattern needs an enhanced code");
    rule.enhanced = NULL;
    rule.text = "no such domain";
    rule.bounce_class = SMTPS_BOUNCE_DNS_FAILURE;
    EXPECT(smtps_bounce_add_rule(&rule) == SMTPS_OK, "text-only rule");
    EXPECT(smtps_bounce_classify_reason(SMTPS_STATUS_TEMPFAIL, "No such domain here")
	   == SMTPS_BOUNCE_DNS_FAILURE, "text-only rules judge reasons");
    rule.code = 4;
    rule.text = "connection lost";
    EXPECT(smtps_bounce_add_rule(&rule) == SMTPS_OK, "coded rule");
    EXPECT(smtps_bounce_classify_reason(SMTPS_STATUS_TEMPFAIL, "connection lost")
	   == SMTPS_BOUNCE_TRANSIENT_FAILURE, "coded rules never judge reasons");
    EXPECT(smtps_bounce_classify(451, "", "connection lost", 15) == SMTPS_BOUNCE_DNS_FAILURE,
	   "first digit 4");
    smtps_bounce_reset();
    EXPECT(smtps_bounce_class_name(200, name, sizeof(name)) == SMTPS_ENOTFOUND,
	   "reset forgets classes");
    EXPECT(smtps_bounce_classify(550, "5.1.1", "held in quarantine", 18)
	   == SMTPS_BOUNCE_INVALID_RECIPIENT, "reset forgets rules");
#undef EXPECT
    return 1;
}

/* check_full - the rule table has a bound */

static int check_full(char *why)
{
    struct smtps_bounce_rule rule;
    int     i, rc = SMTPS_OK;

    memset(&rule, 0, sizeof(rule));
    rule.sizeof_bounce_rule = sizeof(rule);
    rule.bounce_class = SMTPS_BOUNCE_MAIL_BLOCK;
    rule.text = "filler";
    for (i = 0; i < SMTPS_BOUNCE_USER_RULES && rc == SMTPS_OK; i++)
	rc = smtps_bounce_add_rule(&rule);
    if (rc == SMTPS_OK)
	rc = smtps_bounce_add_rule(&rule);
    smtps_bounce_reset();
    if (rc != SMTPS_EFULL) {
	snprintf(why, WHY_MAX, "rule %d: %d, not SMTPS_EFULL", i, rc);
	return 0;
    }
    return 1;
}

int     main(void)
{
    char    why[WHY_MAX], label[160];
    char    name[SMTPS_BOUNCE_NAME_MAX + 1];
    size_t  i;
    int     pass = 0, fail = 0, got;

    for (i = 0; i < NITEMS(reply_cases); i++) {
	const struct reply_case *c = reply_cases + i;

	snprintf(label, sizeof(label), "reply: %s", c->label);
	printf("RUN %s\n", label);
	got = smtps_bounce_classify(c->code, c->enhanced, c->text, text_len(c));
	snprintf(why, sizeof(why), "%d, want %d", got, c->want);
	report(label, got == c->want, why, &pass, &fail);
    }
    for (i = 0; i < NITEMS(reason_cases); i++) {
	const struct reason_case *c = reason_cases + i;

	snprintf(label, sizeof(label), "reason: %s", c->label);
	printf("RUN %s\n", label);
	got = smtps_bounce_classify_reason(c->status, c->reason);
	snprintf(why, sizeof(why), "%d, want %d", got, c->want);
	report(label, got == c->want, why, &pass, &fail);
    }
    for (i = 0; i < NITEMS(local_cases); i++) {
	const struct local_case *c = local_cases + i;
	char    code[16];

	snprintf(label, sizeof(label), "local code: %s", c->label);
	printf("RUN %s\n", label);
	memset(code, 'x', sizeof(code));
	got = smtps_bounce_local_enhanced(c->status, c->reason, code, sizeof(code));
	snprintf(why, sizeof(why), "%d \"%.15s\", want \"%s\"", got, code, c->want);
	report(label, got == SMTPS_OK && memchr(code, 0, sizeof(code)) != NULL
	       && strcmp(code, c->want) == 0, why, &pass, &fail);
    }
    {
	char    small[8];

	printf("RUN local code bounds\n");
	report("local code bounds",
	       smtps_bounce_local_enhanced(SMTPS_STATUS_TEMPFAIL, "x", small,
					   sizeof(small)) == SMTPS_EINVAL
	       && smtps_bounce_local_enhanced(SMTPS_STATUS_TEMPFAIL, "x", NULL,
					      16) == SMTPS_EINVAL,
	       "a short buffer accepted", &pass, &fail);
    }
    printf("RUN names\n");
    report("names", smtps_bounce_class_name(SMTPS_BOUNCE_RELAYING_DENIED, name,
					    sizeof(name)) == SMTPS_OK
	   && strcmp(name, "relaying denied") == 0
	   && smtps_bounce_class_name(0, name, sizeof(name)) == SMTPS_ENOTFOUND
	   && smtps_bounce_class_name(-1, name, sizeof(name)) == SMTPS_ENOTFOUND,
	   "bad names", &pass, &fail);
    printf("RUN result\n");
    why[0] = 0;
    report("result", check_result(why), why, &pass, &fail);
    printf("RUN user classes and rules\n");
    why[0] = 0;
    report("user classes and rules", check_user(why), why, &pass, &fail);
    printf("RUN rule table bound\n");
    why[0] = 0;
    report("rule table bound", check_full(why), why, &pass, &fail);
    printf("%d passed, %d failed\n", pass, fail);
    return fail ? 1 : 0;
}
