/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	limits.c 3
 * SUMMARY
 *	traffic shaping: which rule a destination follows, and smooth rates
 * SYNOPSIS
 *	#include "engine_private.h"
 *
 *	struct smtps_rules *smtps_rules_new(limits, n)
 *	void	smtps_rules_free(rules)
 *	int	smtps_rules_match(rules, domain, mx, nmx, shape)
 *
 *	void	smtps_rate_init(rate, per_second)
 *	int64_t	smtps_rate_wait(rate, now)
 *	void	smtps_rate_take(rate, now)
 * DESCRIPTION
 *	Rules are the caller's struct smtps_limits, copied. A destination
 *	follows one rule, chosen when it is made, the most specific first:
 *	a rule naming its domain (the recipient domain that made a site,
 *	compared without case), then the first "mx:" rule whose glob
 *	matches one of its hosts (fnmatch(3); patterns and names compared
 *	in lower case), then "*".
 *	smtps_rules_match() returns 1 and fills in shape when one matches,
 *	else 0 (the engine's own settings apply).
 *
 *	A rate is the generic cell rate algorithm with no burst tolerance:
 *	events are spaced one interval apart, however they are asked for, so
 *	that "20 per second" never means 20 at once and then a pause. Time
 *	is kept in microseconds, so that high rates stay exact on a clock of
 *	milliseconds. smtps_rate_wait() is how many ms to wait before the
 *	next event may happen (0: now); smtps_rate_take() records one.
 * DIAGNOSTICS
 *	smtps_rules_new() returns NULL for a rule it cannot use (no
 *	pattern, a negative number) or without memory.
 * SEE ALSO
 *	dest.c, which applies them; fnmatch(3).
 *--*/

#include <fnmatch.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "engine_private.h"

struct smtps_rule {
    char   *pattern;			/* a domain, an mx: glob, or "*" */
    struct smtps_shape shape;
};

struct smtps_rules {
    struct smtps_rule *rule;
    size_t  n;
};

/* lower - a name or pattern in lower case, in place */

static char *lower(char *s)
{
    char   *p;

    for (p = s; *p; p++)
	if (*p >= 'A' && *p <= 'Z')
	    *p = (char) (*p - 'A' + 'a');
    return s;
}

/* smtps_rules_new - a copy of the caller's rules, checked */

struct smtps_rules *smtps_rules_new(const struct smtps_limits *limits,
				            size_t n)
{
    struct smtps_rules *rules;
    size_t  i;

    if ((rules = calloc(1, sizeof(*rules))) == NULL
	|| (n > 0 && (rules->rule = calloc(n, sizeof(*rules->rule))) == NULL)) {
	free(rules);
	return NULL;
    }
    for (i = 0; i < n; i++) {
	const struct smtps_limits *l = &limits[i];

	if (l->pattern == NULL || l->pattern[0] == 0 || l->connections < 0
	    || l->messages_per_connection < 0 || !(l->connection_rate >= 0)
	    || !(l->message_rate >= 0)
	    || (rules->rule[i].pattern = smtps_strndup(l->pattern,
						       strlen(l->pattern))) == NULL) {
	    rules->n = i;
	    smtps_rules_free(rules);
	    return NULL;
	}
	lower(rules->rule[i].pattern);
	rules->rule[i].shape.connections = l->connections;
	rules->rule[i].shape.messages_per_connection = l->messages_per_connection;
	rules->rule[i].shape.connection_rate = l->connection_rate;
	rules->rule[i].shape.message_rate = l->message_rate;
	rules->n = i + 1;
    }
    return rules;
}

/* smtps_rules_free - release the rules */

void    smtps_rules_free(struct smtps_rules *rules)
{
    size_t  i;

    if (rules == NULL)
	return;
    for (i = 0; i < rules->n; i++)
	free(rules->rule[i].pattern);
    free(rules->rule);
    free(rules);
}

/* smtps_rules_match - the rule a destination follows; 0: none */

int     smtps_rules_match(const struct smtps_rules *rules,
			          const char *domain, const char *const *mx,
			          size_t nmx, struct smtps_shape *shape)
{
    const struct smtps_rule *r;
    char    name[SMTPS_HOST_MAX + 1];
    size_t  i, k, len;

    if (rules == NULL)
	return 0;
    for (i = 0; domain != NULL && i < rules->n; i++) {
	r = &rules->rule[i];
	if (strncmp(r->pattern, "mx:", 3) != 0 && strcmp(r->pattern, "*") != 0
	    && strcasecmp(r->pattern, domain) == 0) {
	    *shape = r->shape;
	    return 1;
	}
    }
    for (i = 0; i < rules->n; i++) {
	r = &rules->rule[i];
	if (strncmp(r->pattern, "mx:", 3) != 0)
	    continue;
	for (k = 0; k < nmx; k++) {
	    if ((len = strlen(mx[k])) > SMTPS_HOST_MAX)
		continue;
	    memcpy(name, mx[k], len + 1);
	    if (fnmatch(r->pattern + 3, lower(name), 0) == 0) {
		*shape = r->shape;
		return 1;
	    }
	}
    }
    for (i = 0; i < rules->n; i++)
	if (strcmp(rules->rule[i].pattern, "*") == 0) {
	    *shape = rules->rule[i].shape;
	    return 1;
	}
    return 0;
}

/* smtps_rate_init - per_second events at most, evenly spaced; 0: any */

void    smtps_rate_init(struct smtps_rate *r, double per_second)
{
    r->tat_us = 0;
    r->interval_us = per_second > 0 ? (int64_t) (1e6 / per_second) : 0;
    if (per_second > 0 && r->interval_us < 1)
	r->interval_us = 1;
}

/* smtps_rate_wait - ms until the next event may happen; 0: now */

int64_t smtps_rate_wait(const struct smtps_rate *r, int64_t now)
{
    int64_t now_us = now * 1000;

    if (r->interval_us == 0 || r->tat_us <= now_us)
	return 0;
    return (r->tat_us - now_us + 999) / 1000;
}

/* smtps_rate_take - an event happens now */

void    smtps_rate_take(struct smtps_rate *r, int64_t now)
{
    int64_t now_us = now * 1000;

    if (r->interval_us == 0)
	return;
    r->tat_us = (r->tat_us > now_us ? r->tat_us : now_us) + r->interval_us;
}
