/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	sts.c 3
 * SUMMARY
 *	MTA-STS policies (RFC 8461) the engine enforces, by recipient domain
 * SYNOPSIS
 *	#include "engine_private.h"
 *
 *	int	smtps_engine_set_sts_policy(e, domain, mode, mx, nmx)
 *
 *	const struct smtps_sts *smtps_sts_get(table, domain)
 *	int	smtps_sts_matches(policy, host)
 *	void	smtps_sts_free(table)
 * DESCRIPTION
 *	The engine does not fetch policies: its caller does (Python's
 *	smtpstate.mta_sts, over HTTPS, off the engine's loop) and hands each
 *	one over, by recipient domain, before the messages for that domain.
 *	This file keeps them, one per domain (a new one replaces the old),
 *	and answers route.c's two questions: which policy a domain has, and
 *	whether an MX host matches it (RFC 8461 4.1: the names compared
 *	without case and a final dot; "*.example.net" stands for exactly one
 *	label more than "example.net").
 *
 *	What enforcing means is route.c's (only the MX hosts that match are
 *	used; none: the recipients fail for now) and conn.c's (TLS required
 *	with the certificate verified against the MX host's name, unless
 *	DANE authenticates it: DANE wins, RFC 8461 2). "testing" and "none"
 *	are kept and change nothing: a testing policy is for reports.
 *
 *	smtps_engine_set_sts_policy() forgets a domain's MX route unless
 *	messages wait for it, so that the next message looks it up again
 *	under the new policy.
 * DIAGNOSTICS
 *	SMTPS_EINVAL for a bad domain, mode or pattern; SMTPS_ENOMEM.
 * SEE ALSO
 *	RFC 8461; route.c, conn.c; smtpstate/mta_sts.py.
 *--*/

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "engine_private.h"

/* sts_find - the slot of domain's policy (or where it would go) */

static struct smtps_sts **sts_find(struct smtps_sts_table *t, const char *domain,
				           uint64_t hash)
{
    struct smtps_sts **pp;

    for (pp = &t->buckets[hash & (t->nbuckets - 1)]; *pp != NULL; pp = &(*pp)->next)
	if ((*pp)->hash == hash && strcasecmp((*pp)->domain, domain) == 0)
	    break;
    return pp;
}

/* sts_release - one policy's memory */

static void sts_release(struct smtps_sts *p)
{
    size_t  i;

    for (i = 0; i < p->nmx; i++)
	free(p->mx[i]);
    free(p->mx);
    free(p->domain);
    free(p);
}

/* sts_name_ok - a domain or pattern we can compare: printable, no space */

static int sts_name_ok(const char *s, int pattern)
{
    size_t  len = strlen(s), i;

    if (len == 0 || len > SMTPS_HOST_MAX)
	return 0;
    for (i = 0; i < len; i++)
	if (s[i] <= ' ' || s[i] > '~' || (s[i] == '*' && !(pattern && i == 0
							       && s[1] == '.')))
	    return 0;
    return 1;
}

/* sts_lower_hash - the hash of a name, without case or a final dot */

static uint64_t sts_lower_hash(const char *s)
{
    size_t  len = strlen(s);

    return smtps_lower_hash(s, len > 0 && s[len - 1] == '.' ? len - 1 : len);
}

/* sts_copy_name - a copy without the final dot; NULL without memory */

static char *sts_copy_name(const char *s)
{
    size_t  len = strlen(s);

    if (len > 0 && s[len - 1] == '.')
	len--;
    return smtps_strndup(s, len);
}

/* smtps_engine_set_sts_policy - domain's policy from now on */

int     smtps_engine_set_sts_policy(struct smtps_engine *e, const char *domain,
				            int mode, const char *const *mx, size_t nmx)
{
    struct smtps_sts_table *t;
    struct smtps_sts *p, **pp;
    uint64_t hash;
    size_t  i;

    if (e == NULL || domain == NULL || !sts_name_ok(domain, 0)
	|| mode < SMTPS_STS_NONE || mode > SMTPS_STS_ENFORCE
	|| (nmx > 0 && mx == NULL) || nmx > SMTPS_MX_MAX * 4)
	return SMTPS_EINVAL;
    for (i = 0; i < nmx; i++)
	if (mx[i] == NULL || !sts_name_ok(mx[i], 1))
	    return SMTPS_EINVAL;
    t = &e->sts;
    if (t->nbuckets == 0) {
	if ((t->buckets = calloc(64, sizeof(*t->buckets))) == NULL)
	    return SMTPS_ENOMEM;
	t->nbuckets = 64;
    }
    if ((p = calloc(1, sizeof(*p))) == NULL
	|| (p->domain = sts_copy_name(domain)) == NULL
	|| (nmx > 0 && (p->mx = calloc(nmx, sizeof(*p->mx))) == NULL)) {
	if (p != NULL)
	    sts_release(p);
	return SMTPS_ENOMEM;
    }
    for (i = 0; i < nmx; i++, p->nmx++)
	if ((p->mx[i] = sts_copy_name(mx[i])) == NULL) {
	    sts_release(p);
	    return SMTPS_ENOMEM;
	}
    p->mode = mode;
    p->hash = hash = sts_lower_hash(domain);
    pp = sts_find(t, p->domain, hash);
    if (*pp != NULL) {				/* replaced */
	p->next = (*pp)->next;
	sts_release(*pp);
    } else {
	p->next = NULL;
	t->n++;
    }
    *pp = p;
    smtps_route_forget(e, p->domain);
    return SMTPS_OK;
}

/* smtps_sts_get - domain's policy, or NULL */

const struct smtps_sts *smtps_sts_get(struct smtps_sts_table *t,
				              const char *domain)
{
    if (t->nbuckets == 0 || t->n == 0)
	return NULL;
    return *sts_find(t, domain, sts_lower_hash(domain));
}

/* sts_name_eq - equal names, without case or a final dot on b */

static int sts_name_eq(const char *a, const char *b, size_t blen)
{
    return strlen(a) == blen && strncasecmp(a, b, blen) == 0;
}

/* smtps_sts_matches - host is one of the policy's MX patterns (4.1) */

int     smtps_sts_matches(const struct smtps_sts *p, const char *host)
{
    size_t  len = strlen(host), i;
    const char *dot;

    if (len > 0 && host[len - 1] == '.')
	len--;
    for (i = 0; i < p->nmx; i++) {
	if (p->mx[i][0] != '*') {
	    if (sts_name_eq(p->mx[i], host, len))
		return 1;
	    continue;
	}
	/* "*.example.net": one label, then ".example.net" exactly. */
	if ((dot = memchr(host, '.', len)) == NULL || dot == host)
	    continue;
	if (sts_name_eq(p->mx[i] + 2, dot + 1, len - (size_t) (dot + 1 - host)))
	    return 1;
    }
    return 0;
}

/* smtps_sts_free - every policy */

void    smtps_sts_free(struct smtps_sts_table *t)
{
    struct smtps_sts *p, *next;
    size_t  i;

    for (i = 0; i < t->nbuckets; i++)
	for (p = t->buckets[i]; p != NULL; p = next) {
	    next = p->next;
	    sts_release(p);
	}
    free(t->buckets);
    memset(t, 0, sizeof(*t));
}
