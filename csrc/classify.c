/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	classify.c 3
 * SUMMARY
 *	bounce classification of failed messages and recipients
 * SYNOPSIS
 *	#include "smtpstate.h"
 *
 *	int	smtps_bounce_classify(code, enhanced, text, text_len)
 *	int	smtps_bounce_classify_reason(status, reason)
 *	int	smtps_bounce_local_enhanced(status, reason, out, cap)
 *	void	smtps_bounce_classify_result(r)
 *	int	smtps_bounce_class_name(bounce_class, out, cap)
 *	int	smtps_bounce_register_class(code, name)
 *	int	smtps_bounce_add_rule(rule)
 *	void	smtps_bounce_reset()
 * DESCRIPTION
 *	Every failure gets one class of the taxonomy senders have long
 *	used (enum smtps_bounce_class): invalid recipient, mailbox full,
 *	mail block, and so on. The decision, for a reply:
 *
 *	1. the caller's rules (smtps_bounce_add_rule()), in the order added;
 *	2. the enhanced status code (RFC 3463), when it is specific: X.1.1
 *	   is an invalid recipient whatever the text says;
 *	3. the reply text, against the built-in phrase table (ASCII,
 *	   case-insensitive): "Relay access denied", "over quota";
 *	4. a vague enhanced code (X.7.1, X.5.0...) for what it says;
 *	5. the reply code: 4xx a soft bounce, 5xx a generic bounce.
 *
 *	A temporary reply (4xx) never makes a hard class: an invalid
 *	recipient, "no RCPT" or a generic bounce becomes a soft bounce,
 *	since the server itself says to try again.
 *
 *	A failure with no reply (a timeout, a name that does not resolve, a
 *	lost connection, a refusal before anything was sent) is classified
 *	from the result's reason: the caller's text-only rules, then our own
 *	reasons' wording, then the status ("unknown" is undetermined, a
 *	temporary failure transient, a permanent one an admin failure: we
 *	refused it ourselves).
 *
 *	Results are classified once, when a session or the engine hands
 *	them to the driver: a failed recipient with a failing RCPT reply by
 *	that reply, any other recipient of a failed message by the message's
 *	class, delivered ones and those the message was not sent to not at
 *	all (0). A partial delivery takes its first failed recipient's class.
 *
 *	A failure decided here, without a failing reply, also gets the
 *	RFC 3463 enhanced code a reply would have carried (4.4.1 for a
 *	connection refused or not answered, 4.4.2 for one lost, 5.3.4 for a
 *	message over the server's SIZE, 5.6.7 for a UTF-8 address and no
 *	SMTPUTF8, ...): from the same reasons, by one table (local_codes),
 *	so that relays can answer their own clients (and write DSNs) from
 *	any driver's results alike.
 *
 *	The registered classes and rules are process-wide, guarded by one
 *	mutex; the built-in tables are constant.
 * DIAGNOSTICS
 *	SMTPS_EINVAL for a bad class code, name or rule; SMTPS_EFULL when
 *	the tables of registered classes or rules are full.
 * SEE ALSO
 *	RFC 3463 (enhanced status codes), RFC 5321 4.2 (reply codes).
 *--*/

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* An enhanced status code, parsed; -1 in a rule pattern means any. */
struct enhanced {
    int klass, subject, detail;
};

/* A built-in verdict on an enhanced code (class digit aside). */
struct enhanced_rule {
    int     subject, detail;		/* detail -1: any detail */
    int     bounce_class;
    int     specific;			/* 1: decides; 0: only when the text does not */
};

/* A built-in phrase: both needles (b may be NULL) must be in the text. */
struct text_rule {
    const char *a;
    const char *b;
    int     bounce_class;
};

/* One of our own reasons: both needles, and its code's subject.detail. */
struct local_rule {
    const char *a;
    const char *b;				/* NULL: a alone */
    const char *detail;				/* "4.1": X.4.1 */
};

/* A caller's rule, copied. */
struct user_rule {
    int     bounce_class;
    int     code;
    int     has_enhanced;
    struct enhanced enhanced;
    char   *text;			/* NULL: any */
};

struct user_class {
    int     code;
    char    name[SMTPS_BOUNCE_NAME_MAX + 1];
};

static int parse_enhanced(const char *s, struct enhanced *e, int pattern);
static int ci_contains(const char *hay, size_t len, const char *needle);
static int by_enhanced(const struct enhanced *e, int *specific);
static int by_text(const char *text, size_t len);
static int by_user_rules(int code, const struct enhanced *e, const char *text,
			 size_t len, int reason_only);
static int known_class(int code);
static int soften(int bounce_class, int temporary);
static const char *skip_not_attempted(const char *reason);
static size_t leading_code(const char *text);
static void local_enhanced(int status, const char *reason, char *out);
static int failed(int status);

/*
 * What enhanced codes say, by subject and detail (RFC 3463 and the IANA
 * registry). The first match wins, so a subject's catch-all comes last.
 */
static const struct enhanced_rule enhanced_rules[] = {
    {1, 1, SMTPS_BOUNCE_INVALID_RECIPIENT, 1},	/* bad destination mailbox */
    {1, 2, SMTPS_BOUNCE_DNS_FAILURE, 1},	/* bad destination system */
    {1, 3, SMTPS_BOUNCE_INVALID_RECIPIENT, 1},	/* bad mailbox syntax */
    {1, 6, SMTPS_BOUNCE_INVALID_RECIPIENT, 1},	/* mailbox has moved */
    {1, 7, SMTPS_BOUNCE_MAIL_BLOCK, 0},	/* bad sender address syntax */
    {1, 8, SMTPS_BOUNCE_MAIL_BLOCK, 0},	/* bad sender system address */
    {1, 10, SMTPS_BOUNCE_INVALID_RECIPIENT, 1},	/* null MX (RFC 7505) */
    {1, -1, SMTPS_BOUNCE_INVALID_RECIPIENT, 0},
    {2, 1, SMTPS_BOUNCE_INVALID_RECIPIENT, 1},	/* mailbox disabled */
    {2, 2, SMTPS_BOUNCE_MAILBOX_FULL, 1},
    {2, 3, SMTPS_BOUNCE_TOO_LARGE, 1},		/* over the mailbox's limit */
    {2, -1, SMTPS_BOUNCE_GENERIC_BOUNCE, 0},
    {3, 1, SMTPS_BOUNCE_MAILBOX_FULL, 1},	/* mail system full */
    {3, 4, SMTPS_BOUNCE_TOO_LARGE, 1},		/* too big for the system */
    {3, -1, SMTPS_BOUNCE_GENERIC_BOUNCE, 0},
    {4, 1, SMTPS_BOUNCE_TIMEOUT, 0},		/* no answer from host */
    {4, 3, SMTPS_BOUNCE_DNS_FAILURE, 1},	/* directory server failure */
    {4, 4, SMTPS_BOUNCE_DNS_FAILURE, 1},	/* unable to route */
    {4, 7, SMTPS_BOUNCE_TIMEOUT, 1},		/* delivery time expired */
    {4, -1, SMTPS_BOUNCE_GENERIC_BOUNCE, 0},
    {5, -1, SMTPS_BOUNCE_GENERIC_BOUNCE, 0},	/* protocol: 5.5.1 no valid rcpt... */
    {6, -1, SMTPS_BOUNCE_GENERIC_BOUNCE, 0},	/* media and content */
    {7, 8, SMTPS_BOUNCE_ADMIN_FAILURE, 1},	/* our credentials are invalid */
    {7, 9, SMTPS_BOUNCE_ADMIN_FAILURE, 1},	/* mechanism too weak */
    {7, 13, SMTPS_BOUNCE_INVALID_RECIPIENT, 1},	/* user account disabled */
    {7, 17, SMTPS_BOUNCE_INVALID_RECIPIENT, 1},	/* mailbox owner changed */
    {7, 18, SMTPS_BOUNCE_INVALID_RECIPIENT, 1},	/* domain owner changed */
    {7, 23, SMTPS_BOUNCE_MAIL_BLOCK, 1},	/* SPF validation failed */
    {7, 25, SMTPS_BOUNCE_MAIL_BLOCK, 1},	/* reverse DNS failed */
    {7, 26, SMTPS_BOUNCE_MAIL_BLOCK, 1},	/* authentication checks failed */
    {7, 27, SMTPS_BOUNCE_MAIL_BLOCK, 1},	/* sender address has null MX */
    {7, -1, SMTPS_BOUNCE_MAIL_BLOCK, 0},	/* 5.7.1: the text tells more */
};

/*
 * Phrases servers use, most specific first: "Recipient address rejected:
 * User unknown" must be an invalid recipient before "rejected" could be
 * anything else, and "mailbox size limit" mailbox full before "size
 * limit" is too large. Lower case; matched ASCII case-insensitively.
 */
static const struct text_rule text_rules[] = {
    {"challenge", "response", SMTPS_BOUNCE_CHALLENGE_RESPONSE},
    {"unsubscribe", 0, SMTPS_BOUNCE_UNSUBSCRIBE},
    {"subscription request", 0, SMTPS_BOUNCE_SUBSCRIBE},
    {"subscribe request", 0, SMTPS_BOUNCE_SUBSCRIBE},
    {"out of office", 0, SMTPS_BOUNCE_AUTO_REPLY},
    {"out of the office", 0, SMTPS_BOUNCE_AUTO_REPLY},
    {"auto-reply", 0, SMTPS_BOUNCE_AUTO_REPLY},
    {"autoreply", 0, SMTPS_BOUNCE_AUTO_REPLY},
    {"automatic reply", 0, SMTPS_BOUNCE_AUTO_REPLY},
    {"relay", "denied", SMTPS_BOUNCE_RELAYING_DENIED},
    {"relay", "not permitted", SMTPS_BOUNCE_RELAYING_DENIED},
    {"relay", "not allowed", SMTPS_BOUNCE_RELAYING_DENIED},
    {"unable to relay", 0, SMTPS_BOUNCE_RELAYING_DENIED},
    {"do not relay", 0, SMTPS_BOUNCE_RELAYING_DENIED},
    {"no relaying", 0, SMTPS_BOUNCE_RELAYING_DENIED},
    {"attachment", "not allowed", SMTPS_BOUNCE_PROHIBITED_ATTACHMENT},
    {"attachment", "prohibited", SMTPS_BOUNCE_PROHIBITED_ATTACHMENT},
    {"attachment", "blocked", SMTPS_BOUNCE_PROHIBITED_ATTACHMENT},
    {"attachment", "rejected", SMTPS_BOUNCE_PROHIBITED_ATTACHMENT},
    {"attachment", "banned", SMTPS_BOUNCE_PROHIBITED_ATTACHMENT},
    {"file type", 0, SMTPS_BOUNCE_PROHIBITED_ATTACHMENT},
    {"virus", 0, SMTPS_BOUNCE_PROHIBITED_ATTACHMENT},
    {"malware", 0, SMTPS_BOUNCE_PROHIBITED_ATTACHMENT},
    {"infected", 0, SMTPS_BOUNCE_PROHIBITED_ATTACHMENT},
    {"spam", "content", SMTPS_BOUNCE_SPAM_CONTENT},
    {"looks like spam", 0, SMTPS_BOUNCE_SPAM_CONTENT},
    {"as spam", 0, SMTPS_BOUNCE_SPAM_CONTENT},	/* classified/detected as spam */
    {"spam score", 0, SMTPS_BOUNCE_SPAM_CONTENT},
    {"likely spam", 0, SMTPS_BOUNCE_SPAM_CONTENT},
    {"unsolicited", 0, SMTPS_BOUNCE_SPAM_CONTENT},
    {"content rejected", 0, SMTPS_BOUNCE_SPAM_CONTENT},
    {"blacklist", 0, SMTPS_BOUNCE_SPAM_BLOCK},
    {"black list", 0, SMTPS_BOUNCE_SPAM_BLOCK},
    {"blocklist", 0, SMTPS_BOUNCE_SPAM_BLOCK},
    {"block list", 0, SMTPS_BOUNCE_SPAM_BLOCK},
    {"spamhaus", 0, SMTPS_BOUNCE_SPAM_BLOCK},
    {"spamcop", 0, SMTPS_BOUNCE_SPAM_BLOCK},
    {"dnsbl", 0, SMTPS_BOUNCE_SPAM_BLOCK},
    {"listed in", 0, SMTPS_BOUNCE_SPAM_BLOCK},
    {"listed at", 0, SMTPS_BOUNCE_SPAM_BLOCK},
    {"listed on", 0, SMTPS_BOUNCE_SPAM_BLOCK},
    {"reputation", 0, SMTPS_BOUNCE_SPAM_BLOCK},
    {"spam", 0, SMTPS_BOUNCE_SPAM_BLOCK},
    {"mailbox full", 0, SMTPS_BOUNCE_MAILBOX_FULL},
    {"mailbox is full", 0, SMTPS_BOUNCE_MAILBOX_FULL},
    {"inbox is full", 0, SMTPS_BOUNCE_MAILBOX_FULL},
    {"over quota", 0, SMTPS_BOUNCE_MAILBOX_FULL},
    {"overquota", 0, SMTPS_BOUNCE_MAILBOX_FULL},
    {"quota exceeded", 0, SMTPS_BOUNCE_MAILBOX_FULL},
    {"exceeded", "quota", SMTPS_BOUNCE_MAILBOX_FULL},
    {"mailbox size limit", 0, SMTPS_BOUNCE_MAILBOX_FULL},
    {"insufficient", "storage", SMTPS_BOUNCE_MAILBOX_FULL},
    {"storage allocation", 0, SMTPS_BOUNCE_MAILBOX_FULL},
    {"too large", 0, SMTPS_BOUNCE_TOO_LARGE},
    {"too big", 0, SMTPS_BOUNCE_TOO_LARGE},
    {"size limit", 0, SMTPS_BOUNCE_TOO_LARGE},
    {"size exceeds", 0, SMTPS_BOUNCE_TOO_LARGE},
    {"length exceeds", 0, SMTPS_BOUNCE_TOO_LARGE},
    {"no valid recipient", 0, SMTPS_BOUNCE_NO_RCPT},
    {"need rcpt", 0, SMTPS_BOUNCE_NO_RCPT},
    {"no recipients", 0, SMTPS_BOUNCE_NO_RCPT},
    {"user unknown", 0, SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"unknown user", 0, SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"recipient unknown", 0, SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"unknown recipient", 0, SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"address unknown", 0, SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"unknown address", 0, SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"mailbox unknown", 0, SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"no such user", 0, SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"no such mailbox", 0, SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"no such recipient", 0, SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"no such address", 0, SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"no mailbox", 0, SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"invalid recipient", 0, SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"invalid mailbox", 0, SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"invalid address", 0, SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"mailbox unavailable", 0, SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"mailbox not found", 0, SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"user not found", 0, SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"recipient not found", 0, SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"does not exist", 0, SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"not a valid mailbox", 0, SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"mailbox disabled", 0, SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"account disabled", 0, SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"account has been disabled", 0, SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"unrouteable address", 0, SMTPS_BOUNCE_INVALID_RECIPIENT},
    {"reverse dns", 0, SMTPS_BOUNCE_MAIL_BLOCK},	/* before "dns" */
    {"host not found", 0, SMTPS_BOUNCE_DNS_FAILURE},
    {"domain not found", 0, SMTPS_BOUNCE_DNS_FAILURE},
    {"name not found", 0, SMTPS_BOUNCE_DNS_FAILURE},
    {"name or service not known", 0, SMTPS_BOUNCE_DNS_FAILURE},
    {"nxdomain", 0, SMTPS_BOUNCE_DNS_FAILURE},
    {"no mx", 0, SMTPS_BOUNCE_DNS_FAILURE},
    {"mx record", 0, SMTPS_BOUNCE_DNS_FAILURE},
    {"resolve", 0, SMTPS_BOUNCE_DNS_FAILURE},
    {"dns", 0, SMTPS_BOUNCE_DNS_FAILURE},
    {"timed out", 0, SMTPS_BOUNCE_TIMEOUT},
    {"timeout", 0, SMTPS_BOUNCE_TIMEOUT},
    {"time out", 0, SMTPS_BOUNCE_TIMEOUT},
    {"delivery time expired", 0, SMTPS_BOUNCE_TIMEOUT},
    {"greylist", 0, SMTPS_BOUNCE_TRANSIENT_FAILURE},
    {"graylist", 0, SMTPS_BOUNCE_TRANSIENT_FAILURE},
    {"try again later", 0, SMTPS_BOUNCE_TRANSIENT_FAILURE},
    {"try later", 0, SMTPS_BOUNCE_TRANSIENT_FAILURE},
    {"temporarily", 0, SMTPS_BOUNCE_TRANSIENT_FAILURE},
    {"too many connections", 0, SMTPS_BOUNCE_TRANSIENT_FAILURE},
    {"rate limit", 0, SMTPS_BOUNCE_TRANSIENT_FAILURE},
    {"throttl", 0, SMTPS_BOUNCE_TRANSIENT_FAILURE},
    {"authentication required", 0, SMTPS_BOUNCE_ADMIN_FAILURE},
    {"must issue a starttls", 0, SMTPS_BOUNCE_ADMIN_FAILURE},
    {"access denied", 0, SMTPS_BOUNCE_MAIL_BLOCK},
    {"blocked", 0, SMTPS_BOUNCE_MAIL_BLOCK},
    {"not authorized", 0, SMTPS_BOUNCE_MAIL_BLOCK},
    {"not authorised", 0, SMTPS_BOUNCE_MAIL_BLOCK},
    {"unauthorized", 0, SMTPS_BOUNCE_MAIL_BLOCK},
    {"policy", 0, SMTPS_BOUNCE_MAIL_BLOCK},
    {"banned", 0, SMTPS_BOUNCE_MAIL_BLOCK},
    {"sender address rejected", 0, SMTPS_BOUNCE_MAIL_BLOCK},
    {"sender rejected", 0, SMTPS_BOUNCE_MAIL_BLOCK},
    {"client host rejected", 0, SMTPS_BOUNCE_MAIL_BLOCK},
    {"helo command rejected", 0, SMTPS_BOUNCE_MAIL_BLOCK},
    {"dmarc", 0, SMTPS_BOUNCE_MAIL_BLOCK},
    {"spf", 0, SMTPS_BOUNCE_MAIL_BLOCK},
};

/*
 * Our own reasons, for failures without a reply (session.c, engine.c,
 * states.c, tls.c, resolve.c say these): their bounce class, the first
 * match wins.
 */
static const struct text_rule reason_rules[] = {
    {"resolve", 0, SMTPS_BOUNCE_DNS_FAILURE},
    {"name or service not known", 0, SMTPS_BOUNCE_DNS_FAILURE},
    {"no address", 0, SMTPS_BOUNCE_DNS_FAILURE},
    /*
     * dest.c: "no MX host of <domain> has an address: <host>: <why>",
     * whose why ("no such domain (NXDOMAIN)", "server failure
     * (SERVFAIL)") has no word above: a DNS failure all the same, as
     * route.c's for the domain itself. Before "timed out": a lookup that
     * timed out is the DNS failing too.
     */
    {"no mx host of", 0, SMTPS_BOUNCE_DNS_FAILURE},
    {"timed out", 0, SMTPS_BOUNCE_TIMEOUT},
    {"timeout", 0, SMTPS_BOUNCE_TIMEOUT},
    {"size limit", 0, SMTPS_BOUNCE_TOO_LARGE},
    /*
     * The server cannot take the message as it is (states.c refuses it
     * before MAIL): a bounce for this destination, not an act of ours.
     */
    {"needs smtputf8", 0, SMTPS_BOUNCE_GENERIC_BOUNCE},
    {"needs 8bitmime", 0, SMTPS_BOUNCE_GENERIC_BOUNCE},
};

/*
 * The same reasons' RFC 3463 enhanced codes: the one list every driver's
 * results take them from (smtps_bounce_local_enhanced()). Each row gives
 * the subject.detail that follows the status's class digit; the first
 * match wins, so specific rows come first: a connect that timed out is
 * "no answer" (X.4.1), any other timeout a conversation that broke
 * (X.4.2), as Postfix words them (smtp_trouble.c); a DNS lookup that
 * timed out is the DNS failing (X.4.3); "certificate has expired" is TLS
 * (X.7.5), not a delivery time that expired (X.4.7). A reason that
 * starts with a code of its own (route.c's "4.4.4 cannot route ...",
 * states.c's "5.7.30 REQUIRETLS ...") keeps it, and no row is read.
 */
static const struct local_rule local_codes[] = {
    /* The DNS failing: names that do not resolve, no MX host address. */
    {"resolve", 0, "4.3"},
    {"name or service not known", 0, "4.3"},
    {"no address", 0, "4.3"},
    {"no mx host of", 0, "4.3"},
    {"cannot look up", 0, "4.3"},
    {"cannot route", 0, "4.4"},			/* unable to route */
    /* What the server cannot take: refused before MAIL, nothing sent. */
    {"size limit", 0, "3.4"},			/* too big for the system */
    {"needs smtputf8", 0, "6.7"},		/* RFC 6531 3.5 */
    {"needs 8bitmime", 0, "6.3"},		/* conversion not supported */
    /* Session timeouts (session.c's "timeout: ..."), TLS or not. */
    {"timeout:", 0, "4.2"},
    /* TLS I/O failing mid-conversation is the connection breaking. */
    {"tls read failed", 0, "4.2"},
    {"tls write failed", 0, "4.2"},
    {"connection lost", 0, "4.2"},
    /* TLS required but not there (X.7.4), or not working (X.7.5). */
    {"tls is required", 0, "7.4"},
    {"does not offer starttls", 0, "7.4"},
    {"plaintext auth", 0, "7.4"},
    {"tls", "handshake", "7.5"},
    {"tls not verified", 0, "7.5"},
    {"cannot start tls", 0, "7.5"},
    {"cannot set up tls", 0, "7.5"},
    {"tlsa", 0, "7.5"},
    {"dane", 0, "7.5"},
    {"certificate", 0, "7.5"},
    /* No connection: refused, unreachable, or no answer in time. */
    {"connect to", 0, "4.1"},			/* and "cannot connect to" */
    {"expired", 0, "4.7"},			/* delivery time expired */
    {"timed out", 0, "4.2"},
    {"timeout", 0, "4.2"},
    /* The connection ended under the message. */
    {"closed the connection", 0, "4.2"},
    {"ended the connection", 0, "4.2"},
    {"connection closed", 0, "4.2"},
    {"connection reset", 0, "4.2"},
    {"broken pipe", 0, "4.2"},
    {"replied to", "before it was sent", "5.0"},	/* protocol error */
    {"protocol error", 0, "5.0"},
    /* Our own trouble: memory, a state of the caller's, an interrupt. */
    {"out of memory", 0, "3.0"},
    {"internal error", 0, "3.0"},
    {"could not start", 0, "3.0"},
    {"interrupted", 0, "3.0"},
    {"cannot submit", 0, "3.0"},
    {"cancel", 0, "3.0"},
};

#define X_BUILTIN_NAME(n, v, s) {v, s},
static const struct {
    int     code;
    const char *name;
} builtin_classes[] = {
    SMTPS_BOUNCE_CLASSES(X_BUILTIN_NAME)
};
#undef X_BUILTIN_NAME

#define NELEM(a) (sizeof(a) / sizeof((a)[0]))

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct user_class user_classes[SMTPS_BOUNCE_USER_CLASSES];
static int nuser_classes;
static struct user_rule user_rules[SMTPS_BOUNCE_USER_RULES];
static int nuser_rules;

/* parse_enhanced - "5.7.1" (with pattern, '*' parts too) into e */

static int parse_enhanced(const char *s, struct enhanced *e, int pattern)
{
    int     part[3], i, n, digits;

    if (s == NULL)
	return 0;
    for (i = 0; i < 3; i++) {
	if (pattern && *s == '*') {
	    part[i] = -1;
	    s++;
	} else {
	    for (n = 0, digits = 0; *s >= '0' && *s <= '9'; s++) {
		if (++digits > 3)
		    return 0;
		n = n * 10 + (*s - '0');
	    }
	    if (digits == 0)
		return 0;
	    part[i] = n;
	}
	if (i < 2 && *s++ != '.')
	    return 0;
    }
    if (*s != 0)
	return 0;
    /* RFC 3463: the class is 2, 4 or 5 (any, in a pattern). */
    if (part[0] != -1 && part[0] != 2 && part[0] != 4 && part[0] != 5)
	return 0;
    e->klass = part[0];
    e->subject = part[1];
    e->detail = part[2];
    return 1;
}

/* ci_contains - 1 when needle (lower case) is in hay, ASCII case-insensitively */

static int ci_contains(const char *hay, size_t len, const char *needle)
{
    size_t  n = strlen(needle), i, j;
    unsigned char c;

    if (n == 0)
	return 1;
    for (i = 0; i + n <= len; i++) {
	for (j = 0; j < n; j++) {
	    c = (unsigned char) hay[i + j];
	    if (c >= 'A' && c <= 'Z')
		c = (unsigned char) (c - 'A' + 'a');
	    if (c != (unsigned char) needle[j])
		break;
	}
	if (j == n)
	    return 1;
    }
    return 0;
}

/* by_enhanced - the built-in verdict on an enhanced code, 0 if none */

static int by_enhanced(const struct enhanced *e, int *specific)
{
    size_t  i;

    for (i = 0; i < NELEM(enhanced_rules); i++)
	if (enhanced_rules[i].subject == e->subject
	    && (enhanced_rules[i].detail == -1
		|| enhanced_rules[i].detail == e->detail)) {
	    *specific = enhanced_rules[i].specific;
	    return enhanced_rules[i].bounce_class;
	}
    *specific = 0;
    return 0;
}

/* by_text - the built-in verdict on a reply text, 0 if none */

static int by_text(const char *text, size_t len)
{
    size_t  i;

    for (i = 0; i < NELEM(text_rules); i++)
	if (ci_contains(text, len, text_rules[i].a)
	    && (text_rules[i].b == NULL
		|| ci_contains(text, len, text_rules[i].b)))
	    return text_rules[i].bounce_class;
    return 0;
}

/* by_user_rules - the first caller's rule that matches, 0 if none */

static int by_user_rules(int code, const struct enhanced *e, const char *text,
			         size_t len, int reason_only)
{
    const struct user_rule *u;
    int     i, found = 0;

    pthread_mutex_lock(&lock);
    for (i = 0; i < nuser_rules && !found; i++) {
	u = &user_rules[i];
	/* A reason is text alone: only text-only rules can judge it. */
	if (reason_only && (u->code != 0 || u->has_enhanced))
	    continue;
	if (u->code >= 200 ? u->code != code :
	    u->code > 0 ? u->code != code / 100 : 0)
	    continue;
	if (u->has_enhanced
	    && (e == NULL
		|| (u->enhanced.klass != -1 && u->enhanced.klass != e->klass)
		|| (u->enhanced.subject != -1
		    && u->enhanced.subject != e->subject)
		|| (u->enhanced.detail != -1
		    && u->enhanced.detail != e->detail)))
	    continue;
	if (u->text != NULL && !ci_contains(text, len, u->text))
	    continue;
	found = u->bounce_class;
    }
    pthread_mutex_unlock(&lock);
    return found;
}

/* soften - a temporary failure never gets a hard class */

static int soften(int bounce_class, int temporary)
{
    if (temporary && (bounce_class == SMTPS_BOUNCE_INVALID_RECIPIENT
		      || bounce_class == SMTPS_BOUNCE_NO_RCPT
		      || bounce_class == SMTPS_BOUNCE_GENERIC_BOUNCE))
	return SMTPS_BOUNCE_SOFT_BOUNCE;
    return bounce_class;
}

/* smtps_bounce_classify - the class of a failure reply */

int     smtps_bounce_classify(int code, const char *enhanced, const char *text,
			              size_t text_len)
{
    struct enhanced e;
    int     have_e, cls, weak = 0, specific = 0, temporary;

    if (code < 400 || code > 599)
	return SMTPS_BOUNCE_NONE;
    if (text == NULL)
	text_len = 0;
    have_e = parse_enhanced(enhanced != NULL && *enhanced ? enhanced : NULL,
			    &e, 0);
    temporary = code < 500;
    if ((cls = by_user_rules(code, have_e ? &e : NULL, text, text_len, 0)) != 0)
	return cls;				/* the caller knows best */
    if (have_e && (weak = by_enhanced(&e, &specific)) != 0 && specific)
	return soften(weak, temporary);
    if ((cls = by_text(text, text_len)) != 0)
	return soften(cls, temporary);
    if (weak != 0)
	return soften(weak, temporary);
    return temporary ? (code == 421 ? SMTPS_BOUNCE_TRANSIENT_FAILURE :
			SMTPS_BOUNCE_SOFT_BOUNCE) : SMTPS_BOUNCE_GENERIC_BOUNCE;
}

/* smtps_bounce_classify_reason - the class of a failure without a reply */

int     smtps_bounce_classify_reason(int status, const char *reason)
{
    size_t  len, i;
    int     cls;

    if (status == SMTPS_STATUS_DELIVERED)
	return SMTPS_BOUNCE_NONE;
    if (status == SMTPS_STATUS_UNKNOWN)
	return SMTPS_BOUNCE_UNDETERMINED;	/* maybe delivered (RFC 1047) */
    if (reason == NULL)
	reason = "";
    len = strlen(reason);
    if ((cls = by_user_rules(0, NULL, reason, len, 1)) != 0)
	return cls;
    for (i = 0; i < NELEM(reason_rules); i++)
	if (ci_contains(reason, len, reason_rules[i].a))
	    return reason_rules[i].bounce_class;
    return status == SMTPS_STATUS_PERMFAIL ? SMTPS_BOUNCE_ADMIN_FAILURE :
	SMTPS_BOUNCE_TRANSIENT_FAILURE;
}

/* skip_not_attempted - a queued message's reason, without its prefix */

static const char *skip_not_attempted(const char *reason)
{
    static const char prefix[] = "not attempted: ";

    return strncmp(reason, prefix, sizeof(prefix) - 1) == 0 ?
	reason + sizeof(prefix) - 1 : reason;
}

/*
 * leading_code - the length of an enhanced code that starts text and is
 * followed by a space or the end ("4.4.4 cannot route"), else 0
 */

static size_t leading_code(const char *text)
{
    size_t  n = 0;
    int     part, digits;

    if (text[0] != '2' && text[0] != '4' && text[0] != '5')
	return 0;
    n = 1;
    for (part = 0; part < 2; part++) {
	if (text[n++] != '.')
	    return 0;
	for (digits = 0; text[n] >= '0' && text[n] <= '9'; n++)
	    if (++digits > 3)
		return 0;
	if (digits == 0)
	    return 0;
    }
    return text[n] == ' ' || text[n] == 0 ? n : 0;
}

/*
 * local_enhanced - out (16 bytes) gets the enhanced code of a failure
 * without a reply: a code the reason starts with, else the first row of
 * local_codes that matches, else X.0.0 (other or undefined status); the
 * class digit always the status's (RFC 3463 2: 4 persistent transient,
 * 5 permanent), so that a code never contradicts the reply it goes with
 */

static void local_enhanced(int status, const char *reason, char *out)
{
    char    digit = status == SMTPS_STATUS_PERMFAIL ? '5' : '4';
    const char *why = skip_not_attempted(reason != NULL ? reason : "");
    const char *detail = "0.0";
    size_t  len = strlen(why), n, i;

    if ((n = leading_code(why)) != 0 && n < 16) {
	memcpy(out, why, n);
	out[n] = 0;
	out[0] = digit;
	return;
    }
    for (i = 0; i < NELEM(local_codes); i++)
	if (ci_contains(why, len, local_codes[i].a)
	    && (local_codes[i].b == NULL
		|| ci_contains(why, len, local_codes[i].b))) {
	    detail = local_codes[i].detail;
	    break;
	}
    snprintf(out, 16, "%c.%s", digit, detail);
}

/* smtps_bounce_local_enhanced - the enhanced code of a failure without a reply */

int     smtps_bounce_local_enhanced(int status, const char *reason, char *out,
				            size_t cap)
{
    if (out == NULL || cap < 16)
	return SMTPS_EINVAL;
    out[0] = 0;
    if (status == SMTPS_STATUS_TEMPFAIL || status == SMTPS_STATUS_PERMFAIL
	|| status == SMTPS_STATUS_UNKNOWN)
	local_enhanced(status, reason, out);
    return SMTPS_OK;
}

/* failed - 1 for a status that is a failure (UNKNOWN too: maybe one) */

static int failed(int status)
{
    return status == SMTPS_STATUS_TEMPFAIL || status == SMTPS_STATUS_PERMFAIL
	|| status == SMTPS_STATUS_UNKNOWN;
}

/* smtps_bounce_classify_result - classify a result and its recipients */

void    smtps_bounce_classify_result(struct smtps_result *r)
{
    struct smtps_result_rcpt *rc;
    size_t  i;
    /* No failing reply decided the message: we did, and say so. */
    int     local = r != NULL && r->reply.code < 400;

    if (r == NULL)
	return;
    r->enhanced[0] = 0;
    if (local && failed(r->status))
	local_enhanced(r->status, r->reason, r->enhanced);
    if (r->status == SMTPS_STATUS_DELIVERED || r->status == SMTPS_STATUS_PARTIAL)
	r->bounce_class = SMTPS_BOUNCE_NONE;	/* a partial: see below */
    else if (r->status == SMTPS_STATUS_UNKNOWN)
	r->bounce_class = SMTPS_BOUNCE_UNDETERMINED;
    else if (r->reply.code >= 400)
	r->bounce_class = smtps_bounce_classify(r->reply.code, r->reply.enhanced,
						r->reply.text,
						strlen(r->reply.text));
    else
	r->bounce_class = smtps_bounce_classify_reason(r->status, r->reason);
    for (i = 0; i < r->nrcpt; i++) {
	rc = &r->rcpt[i];
	/*
	 * A recipient that failed with no failing reply of its own nor the
	 * message's (accepted at RCPT, then the connection was lost; never
	 * answered when the connect failed): the message's reason is its
	 * reason, with its own status's class digit.
	 */
	rc->enhanced[0] = 0;
	if (failed(rc->status) && rc->reply.code < 400 && local)
	    local_enhanced(rc->status, r->reason, rc->enhanced);
	switch (rc->status) {
	case SMTPS_STATUS_TEMPFAIL:
	case SMTPS_STATUS_PERMFAIL:
	    /* Its own refusal, or (accepted, then) the message's. */
	    rc->bounce_class = rc->reply.code >= 400 ?
		smtps_bounce_classify(rc->reply.code, rc->reply.enhanced,
				      rc->reply.text, strlen(rc->reply.text)) :
		r->bounce_class;
	    break;
	case SMTPS_STATUS_UNKNOWN:
	    rc->bounce_class = SMTPS_BOUNCE_UNDETERMINED;
	    break;
	case SMTPS_RCPT_PENDING:		/* not final: never handed out */
	    rc->bounce_class = r->bounce_class;
	    break;
	default:				/* delivered, not sent */
	    rc->bounce_class = SMTPS_BOUNCE_NONE;
	    break;
	}
	/* A partial delivery failed as its first failed recipient did. */
	if (r->status == SMTPS_STATUS_PARTIAL && r->bounce_class == SMTPS_BOUNCE_NONE)
	    r->bounce_class = rc->bounce_class;
    }
}

/* known_class - 1 when code names a built-in or registered class */

static int known_class(int code)
{
    char    name[SMTPS_BOUNCE_NAME_MAX + 1];

    return smtps_bounce_class_name(code, name, sizeof(name)) == SMTPS_OK;
}

/* smtps_bounce_class_name - copy the name of a class out */

int     smtps_bounce_class_name(int bounce_class, char *out, size_t cap)
{
    size_t  i;
    int     j, rc = SMTPS_ENOTFOUND;

    if (out == NULL || cap == 0)
	return SMTPS_EINVAL;
    for (i = 0; i < NELEM(builtin_classes); i++)
	if (builtin_classes[i].code == bounce_class) {
	    snprintf(out, cap, "%s", builtin_classes[i].name);
	    return SMTPS_OK;
	}

    /*
     * A registered name lives in a table that a reset (or a registration
     * after it) rewrites: it is copied while the lock is held, never
     * handed out by address.
     */
    pthread_mutex_lock(&lock);
    for (j = 0; j < nuser_classes; j++)
	if (user_classes[j].code == bounce_class) {
	    snprintf(out, cap, "%s", user_classes[j].name);
	    rc = SMTPS_OK;
	    break;
	}
    pthread_mutex_unlock(&lock);
    return rc;
}

/* smtps_bounce_register_class - a class of the caller's own */

int     smtps_bounce_register_class(int code, const char *name)
{
    size_t  i, len;
    int     j, rc = SMTPS_OK;

    if (code < 1 || code > SMTPS_BOUNCE_CLASS_MAX || name == NULL)
	return SMTPS_EINVAL;
    len = strlen(name);
    if (len == 0 || len > SMTPS_BOUNCE_NAME_MAX)
	return SMTPS_EINVAL;
    for (i = 0; i < len; i++)
	if ((unsigned char) name[i] < 0x20 || (unsigned char) name[i] > 0x7e)
	    return SMTPS_EINVAL;
    for (i = 0; i < NELEM(builtin_classes); i++)
	if (builtin_classes[i].code == code)
	    return SMTPS_EINVAL;
    pthread_mutex_lock(&lock);
    for (j = 0; j < nuser_classes; j++)
	if (user_classes[j].code == code)
	    break;
    if (j < nuser_classes) {
	if (strcmp(user_classes[j].name, name) != 0)
	    rc = SMTPS_EINVAL;			/* taken, by another name */
    } else if (nuser_classes >= SMTPS_BOUNCE_USER_CLASSES) {
	rc = SMTPS_EFULL;
    } else {
	user_classes[nuser_classes].code = code;
	memcpy(user_classes[nuser_classes].name, name, len + 1);
	nuser_classes++;
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

/* smtps_bounce_add_rule - a rule of the caller's, tried before ours */

int     smtps_bounce_add_rule(const struct smtps_bounce_rule *rule)
{
    struct user_rule u;
    size_t  i, len;
    int     rc = SMTPS_OK;

    if (rule == NULL || rule->sizeof_bounce_rule < sizeof(*rule)
	|| !known_class(rule->bounce_class))
	return SMTPS_EINVAL;
    memset(&u, 0, sizeof(u));
    u.bounce_class = rule->bounce_class;
    u.code = rule->code;
    if (!(u.code == 0 || (u.code >= 2 && u.code <= 5)
	  || (u.code >= 200 && u.code <= 599)))
	return SMTPS_EINVAL;
    if (rule->enhanced != NULL) {
	if (!parse_enhanced(rule->enhanced, &u.enhanced, 1))
	    return SMTPS_EINVAL;
	u.has_enhanced = 1;
    }
    if (rule->text != NULL) {
	len = strlen(rule->text);
	if (len == 0 || len > SMTPS_REPLY_LINE_MAX)
	    return SMTPS_EINVAL;
	if ((u.text = smtps_strndup(rule->text, len)) == NULL)
	    return SMTPS_ENOMEM;
	/* Stored lower case: the text it is held against is folded. */
	for (i = 0; i < len; i++)
	    if (u.text[i] >= 'A' && u.text[i] <= 'Z')
		u.text[i] = (char) (u.text[i] - 'A' + 'a');
    }
    if (u.code == 0 && !u.has_enhanced && u.text == NULL)
	return SMTPS_EINVAL;			/* a rule that matches everything */
    pthread_mutex_lock(&lock);
    if (nuser_rules >= SMTPS_BOUNCE_USER_RULES)
	rc = SMTPS_EFULL;
    else
	user_rules[nuser_rules++] = u;
    pthread_mutex_unlock(&lock);
    if (rc != SMTPS_OK)
	free(u.text);
    return rc;
}

/* smtps_bounce_reset - forget the caller's classes and rules */

void    smtps_bounce_reset(void)
{
    int     i;

    pthread_mutex_lock(&lock);
    for (i = 0; i < nuser_rules; i++)
	free(user_rules[i].text);
    nuser_rules = 0;
    nuser_classes = 0;
    pthread_mutex_unlock(&lock);
}
