/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	route.c 3
 * SUMMARY
 *	recipients to destinations by their domains' MX records
 * SYNOPSIS
 *	#include "engine_private.h"
 *
 *	int	smtps_route_submit(e, m, key)
 *	int	smtps_route_result(e, r)
 *	void	smtps_route_timer(timer, now)
 *	void	smtps_routes_free(e)
 * DESCRIPTION
 *	A message submitted without a host goes where its recipients'
 *	domains say. Each domain has a route: its MX records, looked up once
 *	and kept for their TTL, so that ten thousand messages to one domain
 *	make one query. The MX hosts, by preference (RFC 5321 5.1), are the
 *	domain's site: domains with the same MX hosts share it, and with it
 *	one destination (dest.c): one queue, one pool of connections, one
 *	set of limits, so that every domain a provider hosts goes through
 *	the same connections.
 *
 *	A domain without MX records is its own host (the implicit MX). A
 *	domain whose only MX is "." accepts no mail (null MX, RFC 7505): its
 *	recipients fail at once, as do those of a domain that does not exist
 *	(NXDOMAIN), permanently; a lookup that fails for now (SERVFAIL, no
 *	answer before the resolver's deadline, DNSSEC bogus) fails them for
 *	now, and is not kept. An address literal ("user@[192.0.2.1]") is
 *	its own site.
 *
 *	smtps_route_submit() takes a message whose result was made. If every
 *	route it needs is known, the message is placed at once; otherwise it
 *	waits, holding a copy of its delivery settings, for the lookups it
 *	needs (one per domain, shared by every message that waits for it).
 *	Placing: when all its recipients share one site, the message itself
 *	goes to that site's queue. Otherwise it is split: one part per site,
 *	each a message of its own with those recipients (smtps_message_part:
 *	the body is shared, not copied), each with a result of its own that
 *	knows its part (result->owner). Recipients whose domain failed are
 *	settled at once.
 *
 *	smtps_route_result() joins a part's result into its message's (and
 *	returns 1: the engine must not hand it out); when the last part is
 *	in, the message's result is complete, one result as for any
 *	message: each recipient's status, reply and where it went (the
 *	result's routes), the message's status from its recipients, and the
 *	reply, stage and reason of the part that decided it (the first that
 *	failed, else the last).
 * SEE ALSO
 *	dest.c (sites, addresses, fallback), resolve.c (the lookups).
 *--*/

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/nameser.h>

#include "engine_private.h"

#define ROUTE_TTL_MIN_MS 1000		/* answers kept at least this long */
#define ROUTE_TTL_MAX_MS 86400000	/* and at most a day */
#define TAKEN (-2)			/* route_place(): in a part already */

enum route_state {
    ROUTE_RESOLVING,			/* the MX lookup is in flight */
    ROUTE_READY,			/* site is the domain's MX set */
    ROUTE_FAILED			/* status and why say how */
};

struct smtps_routed;

/* A recipient domain and where it goes. */
struct smtps_route {
    struct smtps_engine *e;
    struct smtps_route *hnext;
    uint64_t hash;
    char   *domain;			/* lower case, no final dot */
    int     state;			/* enum route_state */
    struct smtps_dns_req req;
    struct smtps_timer timer;		/* READY or FAILED: its expiry */
    int64_t expires;
    char   *site;			/* READY: "pref host pref host ..." */
    int     secure;			/* READY: its MX answer was validated */
    int     sts;			/* READY: an MTA-STS policy enforced */
    int     sts_testing;		/* READY: one in testing mode */
    int     status;			/* FAILED: SMTPS_STATUS_* */
    char   *why;			/* FAILED: in words */
    int     null_mx;			/* FAILED by a null MX */
    struct smtps_routed **waiting;	/* messages that wait for it */
    size_t  nwaiting, capwaiting;
    size_t  refs;			/* waiting messages that need it as it is */
    uint64_t mark;			/* smtps_route_submit()'s, once each */
};

/* A message waiting for the routes of its recipients. */
struct smtps_routed {
    struct smtps_engine *e;
    struct smtps_message *m;
    struct smtps_destination k;		/* its settings; strings owned */
    size_t  waiting;			/* routes not known yet */
    struct smtps_route **uses;		/* every route it needs, held */
    size_t  nuses;
    struct smtps_routed *prev, *next;	/* every one, for smtps_routes_free() */
};

struct smtps_join;

/* One part: which of the message's recipients it carries. */
struct smtps_part {
    struct smtps_join *join;
    const size_t *idx;			/* the message's recipient indexes */
    size_t  n;
};

/* A message split over several destinations. */
struct smtps_join {
    struct smtps_message *m;		/* the message: its body is shared */
    struct smtps_result *result;	/* its result, filled as parts end */
    struct smtps_result *decider;	/* the part result that decides */
    size_t  left;			/* parts not ended */
    size_t *idx;			/* recipient indexes, part after part */
    struct smtps_part *parts;		/* one per destination */
    struct smtps_join *prev, *next;	/* every one, for smtps_routes_free() */
};

/* The engine's lists of those, for its end. */
struct route_lists {
    struct smtps_routed *routed;
    struct smtps_join *joins;
};

static void route_answer(void *arg, const struct smtps_dns_answer *a);
static void key_free(struct smtps_destination *k);
static void route_unwait(struct smtps_route *r, struct smtps_routed *w);
static void route_place(struct smtps_engine *e, struct smtps_message *m,
			        const struct smtps_destination *k);

/* route_lists - the engine's lists, made when first needed */

static struct smtps_join **join_list(struct smtps_engine *e);
static struct smtps_routed **routed_list(struct smtps_engine *e);

/*
 * The two lists live in the engine's route table, in a bucket past the
 * last: the table is route.c's business, and this keeps the engine's
 * struct free of route.c's types.
 */
static struct route_lists *lists(struct smtps_engine *e)
{
    return (struct route_lists *) (void *) &e->routes[e->nroute_buckets];
}

static struct smtps_join **join_list(struct smtps_engine *e)
{
    return &lists(e)->joins;
}

static struct smtps_routed **routed_list(struct smtps_engine *e)
{
    return &lists(e)->routed;
}

/* smtps_lower_hash - FNV-1a of a name in lower case, of len bytes */

uint64_t smtps_lower_hash(const char *s, size_t len)
{
    uint64_t h = 14695981039346656037ULL;
    size_t  i;
    unsigned char c;

    for (i = 0; i < len; i++) {
	c = (unsigned char) s[i];
	if (c >= 'A' && c <= 'Z')
	    c = (unsigned char) (c - 'A' + 'a');
	h ^= c;
	h *= 1099511628211ULL;
    }
    return h;
}

/* same_name - s[0..len) is name, without case */

static int same_name(const char *name, const char *s, size_t len)
{
    size_t  i;
    unsigned char a, b;

    for (i = 0; i < len; i++) {
	a = (unsigned char) name[i];
	b = (unsigned char) s[i];
	if (b >= 'A' && b <= 'Z')
	    b = (unsigned char) (b - 'A' + 'a');
	if (a != b)
	    return 0;
    }
    return name[len] == 0;
}

/*
 * rcpt_domain - the domain of an address: after its last "@", without a
 * final dot. 0 with len 0 when it has none.
 */

static const char *rcpt_domain(const char *addr, size_t *len)
{
    const char *at = strrchr(addr, '@');

    *len = 0;
    if (at == NULL)
	return NULL;
    *len = strlen(at + 1);
    if (*len > 0 && at[*len] == '.')
	(*len)--;
    return at + 1;
}

/* table_grow - double the route table (and move its lists along) */

static int table_grow(struct smtps_engine *e)
{
    struct smtps_route **b, *r, *next;
    struct route_lists saved = {NULL, NULL};
    size_t  n = e->nroute_buckets ? e->nroute_buckets * 2 : 64, i;
    size_t  extra = (sizeof(struct route_lists) + sizeof(*b) - 1) / sizeof(*b);

    if (e->routes != NULL)
	saved = *lists(e);
    if ((b = calloc(n + extra, sizeof(*b))) == NULL)
	return SMTPS_ENOMEM;
    for (i = 0; i < e->nroute_buckets; i++)
	for (r = e->routes[i]; r != NULL; r = next) {
	    next = r->hnext;
	    r->hnext = b[r->hash & (n - 1)];
	    b[r->hash & (n - 1)] = r;
	}
    free(e->routes);
    e->routes = b;
    e->nroute_buckets = n;
    *lists(e) = saved;
    return SMTPS_OK;
}

/* route_find - the route of domain[0..len), or NULL */

static struct smtps_route *route_find(struct smtps_engine *e,
				              const char *domain, size_t len,
				              uint64_t hash)
{
    struct smtps_route *r;

    if (e->nroute_buckets == 0)
	return NULL;
    for (r = e->routes[hash & (e->nroute_buckets - 1)]; r != NULL; r = r->hnext)
	if (r->hash == hash && same_name(r->domain, domain, len))
	    return r;
    return NULL;
}

/* route_free - unlink and release a route nobody waits for */

static void route_free(struct smtps_route *r)
{
    struct smtps_engine *e = r->e;
    struct smtps_route **pp;

    for (pp = &e->routes[r->hash & (e->nroute_buckets - 1)]; *pp != r;
	 pp = &(*pp)->hnext)
	 /* void */ ;
    *pp = r->hnext;
    e->nroutes--;
    smtps_timer_cancel(&e->timers, &r->timer);
    if (r->req.active) {
	smtps_dns_cancel(e->dns, &r->req);
	e->dns_users--;
    }
    free(r->domain);
    free(r->site);
    free(r->why);
    free(r->waiting);
    free(r);
}

/* route_fail - the domain cannot be reached: how, for how long */

static void route_fail(struct smtps_route *r, int status, const char *fmt,
		               const char *what, int64_t keep_ms, int64_t now)
{
    char    why[SMTPS_WHY_MAX + SMTPS_HOST_MAX + 64];

    snprintf(why, sizeof(why), fmt, r->domain, what);
    free(r->why);
    r->why = smtps_strndup(why, strlen(why));
    r->state = ROUTE_FAILED;
    r->status = status;
    r->expires = keep_ms > 0 ? smtps_time_after(now, keep_ms) : now;
}

/* keep_ms - how long an answer is kept: its TTL, within bounds */

static int64_t keep_ms(int ttl)
{
    if (ttl < 1)
	return ROUTE_TTL_MIN_MS;
    if (ttl > ROUTE_TTL_MAX_MS / 1000)
	return ROUTE_TTL_MAX_MS;
    return (int64_t) ttl * 1000 < ROUTE_TTL_MIN_MS ? ROUTE_TTL_MIN_MS :
	(int64_t) ttl * 1000;
}

/* mx_order - by preference, then name: the site's canonical form */

static int mx_order(const void *a, const void *b)
{
    const struct smtps_mx *x = a, *y = b;

    if (x->pref != y->pref)
	return x->pref < y->pref ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* route_flags - what the site is besides its hosts (SMTPS_SITE_*) */

static int route_flags(const struct smtps_route *r)
{
    return (r->secure ? SMTPS_SITE_SECURE : 0) | (r->sts ? SMTPS_SITE_STS : 0)
	| (r->sts_testing ? SMTPS_SITE_STS_TESTING : 0);
}

/* route_site - the site of MX records: "pref host pref host ..." */

static int route_site(struct smtps_route *r, struct smtps_mx *mx, size_t n)
{
    char    site[SMTPS_MX_MAX * (SMTPS_HOST_NAME_MAX + 8)];
    size_t  len = 0, i, k = 0;

    const struct smtps_sts *policy = smtps_sts_get(&r->e->sts, r->domain);

    r->sts = policy != NULL && policy->mode == SMTPS_STS_ENFORCE;
    r->sts_testing = policy != NULL && policy->mode == SMTPS_STS_TESTING;
    qsort(mx, n, sizeof(*mx), mx_order);
    for (i = 0; i < n; i++) {
	if (mx[i].name[0] == 0 || (k > 0 && strcmp(mx[i].name, mx[k - 1].name) == 0))
	    continue;				/* "." among others; a repeat */
	if (r->sts && !smtps_sts_matches(policy, mx[i].name))
	    continue;				/* RFC 8461 4.2: not that one */
	mx[k++] = mx[i];
    }
    if (k == 0 && r->sts)
	return SMTPS_ESTATE;			/* none matches: see route_answer() */
    for (i = 0; i < k; i++)
	len += (size_t) snprintf(site + len, sizeof(site) - len, "%s%d %s",
				 i ? " " : "", mx[i].pref, mx[i].name);
    free(r->site);
    if (k == 0 || (r->site = smtps_strndup(site, len)) == NULL)
	return SMTPS_ENOMEM;
    r->state = ROUTE_READY;
    return SMTPS_OK;
}

/*
 * routed_free - a waiting message's record goes (the message does not):
 * out of every route's waiting list, its holds released
 */

static void routed_free(struct smtps_routed *w)
{
    struct smtps_route *r;
    size_t  i;

    for (i = 0; i < w->nuses; i++) {
	r = w->uses[i];
	route_unwait(r, w);
	r->refs--;
    }
    free(w->uses);
    key_free(&w->k);
    free(w);
}

/* route_done - the route is known: the messages waiting for it go on */

static void route_done(struct smtps_route *r, int64_t now)
{
    struct smtps_engine *e = r->e;
    struct smtps_routed *w;
    size_t  i, n = r->nwaiting;

    smtps_timer_set(&e->timers, &r->timer, r->expires);
    r->nwaiting = 0;
    for (i = 0; i < n; i++) {
	w = r->waiting[i];
	if (--w->waiting > 0)
	    continue;
	/* Every route it needs is known: out of the waiting list. */
	if (w->prev != NULL)
	    w->prev->next = w->next;
	else
	    *routed_list(e) = w->next;
	if (w->next != NULL)
	    w->next->prev = w->prev;
	e->nrouted--;
	route_place(e, w->m, &w->k);
	routed_free(w);
    }
    SMTPS_UNUSED(now);
}

/*
 * route_unusable - no site could be made of r's MX hosts: none matches
 * the domain's MTA-STS policy (SMTPS_ESTATE), or no memory
 */

static void route_unusable(struct smtps_route *r, int rc, const char *why,
			           int64_t now)
{
    if (rc == SMTPS_ESTATE) {
	smtps_tlsrpt_sts_unmatched(r->e, r->domain);
	route_fail(r, SMTPS_STATUS_TEMPFAIL, "4.4.4 cannot route %s: %s",
		   "none of its MX hosts matches its MTA-STS policy "
		   "(RFC 8461 4.2)", 0, now);
    } else
	route_fail(r, SMTPS_STATUS_TEMPFAIL, "cannot route %s: %s", why, 0, now);
}

/* route_answer - the MX records of a domain came in */

static void route_answer(void *arg, const struct smtps_dns_answer *a)
{
    struct smtps_route *r = arg;
    struct smtps_mx mx[SMTPS_MX_MAX];
    int64_t now = smtps_clock_ms();
    size_t  n;
    int     rc;

    r->e->dns_users--;
    smtps_timer_cancel(&r->e->timers, &r->timer);
    r->secure = a->secure;			/* DANE needs it (RFC 7672 2.2.1) */
    switch (a->status) {
    case SMTPS_DNS_OK:
	n = smtps_dns_mx(a, mx, SMTPS_MX_MAX);
	if (n == 1 && mx[0].name[0] == 0) {
	    r->null_mx = 1;
	    route_fail(r, SMTPS_STATUS_PERMFAIL, "5.1.10 %s accepts no mail: "
		       "its MX is \".\" (null MX, RFC 7505)%s", "",
		       keep_ms(a->ttl), now);
	} else if ((rc = route_site(r, mx, n)) == SMTPS_OK) {
	    r->expires = smtps_time_after(now, keep_ms(a->ttl));
	} else
	    route_unusable(r, rc, "its MX records could not be used", now);
	break;
    case SMTPS_DNS_NODATA:
	/* No MX: the domain is its own mail host (RFC 5321 5.1). */
	snprintf(mx[0].name, sizeof(mx[0].name), "%s", r->domain);
	mx[0].pref = 0;
	if ((rc = route_site(r, mx, 1)) == SMTPS_OK)
	    r->expires = smtps_time_after(now, keep_ms(a->ttl));
	else
	    route_unusable(r, rc, "out of memory", now);
	break;
    case SMTPS_DNS_NXDOMAIN:
	route_fail(r, SMTPS_STATUS_PERMFAIL, "5.1.2 cannot route %s: the "
		   "domain does not exist (%s)", "NXDOMAIN", keep_ms(a->ttl), now);
	break;
    default:					/* SERVFAIL, bogus, errors */
	route_fail(r, SMTPS_STATUS_TEMPFAIL, "4.4.3 cannot resolve the MX "
		   "records of %s: %s", a->why ? a->why : "lookup failed", 0, now);
	break;
    }
    route_done(r, now);
}

/*
 * smtps_route_timer - a route expired (a lookup's deadline is the
 * resolver's: it answers "timed out")
 */

void    smtps_route_timer(struct smtps_timer *t, int64_t now)
{
    struct smtps_route *r = (struct smtps_route *)
	((char *) t - offsetof(struct smtps_route, timer));
    struct smtps_engine *e = r->e;

    if (r->state == ROUTE_RESOLVING)
	return;
    if (r->refs > 0)				/* held: later */
	smtps_timer_set(&e->timers, &r->timer, smtps_time_after(now, 1000));
    else if (r->nwaiting == 0)
	route_free(r);				/* looked up again when needed */
}

/*
 * smtps_route_forget - domain's MTA-STS policy changed (sts.c): its route
 * is looked up again by the next message, unless messages hold it now
 */

void    smtps_route_forget(struct smtps_engine *e, const char *domain)
{
    size_t  len = strlen(domain);
    struct smtps_route *r = route_find(e, domain, len,
				       smtps_lower_hash(domain, len));

    if (r != NULL && r->state != ROUTE_RESOLVING && r->refs == 0
	&& r->nwaiting == 0)
	route_free(r);
}

/*
 * route_get - the route of domain[0..len), looked up if it is not known
 * or expired; NULL without memory
 */

static struct smtps_route *route_get(struct smtps_engine *e, const char *domain,
				             size_t len, int64_t now, char *why,
				             size_t whylen)
{
    uint64_t hash = smtps_lower_hash(domain, len);
    struct smtps_route *r;
    struct smtps_dns *dns;
    size_t  i;
    int     rc;

    if ((r = route_find(e, domain, len, hash)) != NULL) {
	/* Held by a message waiting for another route: as it is, for now. */
	if (r->state == ROUTE_RESOLVING || now < r->expires || r->refs > 0)
	    return r;
    } else {
	if (e->nroutes + 1 > e->nroute_buckets * 2 && table_grow(e) != SMTPS_OK)
	    return NULL;
	if (smtps_engine_reserve_timers(e, 1) != SMTPS_OK
	    || (r = calloc(1, sizeof(*r))) == NULL)
	    return NULL;
	if ((r->domain = smtps_strndup(domain, len)) == NULL) {
	    free(r);
	    return NULL;
	}
	for (i = 0; i < len; i++)
	    if (r->domain[i] >= 'A' && r->domain[i] <= 'Z')
		r->domain[i] = (char) (r->domain[i] - 'A' + 'a');
	r->e = e;
	r->hash = hash;
	r->req.done = route_answer;
	r->req.arg = r;
	smtps_timer_init(&r->timer, TIMER_ROUTE);
	r->hnext = e->routes[hash & (e->nroute_buckets - 1)];
	e->routes[hash & (e->nroute_buckets - 1)] = r;
	e->nroutes++;
    }
    r->state = ROUTE_RESOLVING;
    /* "[192.0.2.1]": an address literal is its own site, no lookup. */
    if (len > 2 && domain[0] == '[') {
	struct smtps_mx mx = {0, ""};

	snprintf(mx.name, sizeof(mx.name), "%s", r->domain);
	if (route_site(r, &mx, 1) == SMTPS_OK) {
	    r->expires = INT64_MAX;
	    return r;
	}
	return NULL;
    }
    rc = SMTPS_OK;
    if ((dns = smtps_engine_dns(e, why, whylen)) == NULL
	|| (rc = smtps_dns_query(dns, r->domain, ns_t_mx, SMTPS_DNS_ROUTINE,
				 &r->req)) != SMTPS_OK) {
	/* Known, and failed for now: its messages say why. */
	route_fail(r, SMTPS_STATUS_TEMPFAIL, "4.4.3 cannot look up %s: %.200s",
		   dns == NULL ? why : smtps_strerror(rc), 0, now);
	return r;
    }
    e->dns_users++;
    return r;
}

/* key_free - release what key_copy() made */

static void key_free(struct smtps_destination *k)
{
    free((char *) k->tls_servername);
    free((char *) k->auth_user);
    if (k->auth_secret != NULL) {
	smtps_wipe((char *) k->auth_secret, strlen(k->auth_secret));
	free((char *) k->auth_secret);
    }
    free((char *) k->helo);
    smtps_tls_config_free(k->tls);
}

/* key_copy - a message's settings, kept while it waits */

static int key_copy(struct smtps_destination *dst,
		            const struct smtps_destination *k)
{
    int     err = 0;

    *dst = *k;
    dst->host = NULL;
    dst->tls_servername = smtps_str_copy(k->tls_servername, &err);
    dst->auth_user = smtps_str_copy(k->auth_user, &err);
    dst->auth_secret = smtps_str_copy(k->auth_secret, &err);
    dst->helo = smtps_str_copy(k->helo, &err);
    if (dst->tls != NULL)
	smtps_tls_config_retain(dst->tls);
    return err ? SMTPS_ENOMEM : SMTPS_OK;
}

/* route_unwait - the message no longer waits for r */

static void route_unwait(struct smtps_route *r, struct smtps_routed *w)
{
    size_t  i;

    for (i = 0; i < r->nwaiting; i++)
	if (r->waiting[i] == w)
	    r->waiting[i--] = r->waiting[--r->nwaiting];
}

/* wait_add - the message waits for r too */

static int wait_add(struct smtps_route *r, struct smtps_routed *w)
{
    struct smtps_routed **grown;
    size_t  cap;

    if (r->nwaiting == r->capwaiting) {
	cap = r->capwaiting ? r->capwaiting * 2 : 4;
	if ((grown = realloc(r->waiting, cap * sizeof(*grown))) == NULL)
	    return SMTPS_ENOMEM;
	r->waiting = grown;
	r->capwaiting = cap;
    }
    r->waiting[r->nwaiting++] = w;
    w->waiting++;
    return SMTPS_OK;
}

/*
 * smtps_route_submit - m goes where its recipients' domains say. The
 * engine owns m on SMTPS_OK (its result was made): placed now, or
 * waiting for lookups.
 */

int     smtps_route_submit(struct smtps_engine *e, struct smtps_message *m,
			           const struct smtps_destination *k)
{
    struct smtps_routed *w;
    struct smtps_route *r;
    const char *domain;
    char    why[SMTPS_WHY_MAX];
    int64_t now = smtps_clock_ms();
    uint64_t mark = ++e->route_mark;
    size_t  i, len, nroutes = 0, resolving = 0;

    if (e->routes == NULL && table_grow(e) != SMTPS_OK)
	return SMTPS_ENOMEM;
    /* Each domain once, however many recipients it has: known yet? */
    for (i = 0; i < m->nrcpt; i++) {
	domain = rcpt_domain(m->rcpt[i].addr, &len);
	if (len == 0 || len > SMTPS_HOST_NAME_MAX)
	    continue;				/* route_place() fails it */
	if ((r = route_get(e, domain, len, now, why, sizeof(why))) == NULL)
	    return SMTPS_ENOMEM;
	if (r->mark == mark)
	    continue;
	r->mark = mark;
	nroutes++;
	resolving += r->state == ROUTE_RESOLVING;
    }
    if (resolving == 0) {			/* the usual case, once warm */
	route_place(e, m, k);
	return SMTPS_OK;
    }

    /*
     * It waits for the lookups it needs, holding every route it uses, so
     * that none is dropped or looked up again under it meanwhile.
     */
    if ((w = calloc(1, sizeof(*w))) == NULL
	|| (w->uses = calloc(nroutes, sizeof(*w->uses))) == NULL
	|| key_copy(&w->k, k) != SMTPS_OK) {
	if (w != NULL)
	    routed_free(w);
	return SMTPS_ENOMEM;
    }
    w->e = e;
    w->m = m;
    mark = ++e->route_mark;
    for (i = 0; i < m->nrcpt; i++) {
	domain = rcpt_domain(m->rcpt[i].addr, &len);
	if (len == 0 || len > SMTPS_HOST_NAME_MAX
	    || (r = route_find(e, domain, len, smtps_lower_hash(domain, len))) == NULL
	    || r->mark == mark)
	    continue;
	r->mark = mark;
	if (r->state == ROUTE_RESOLVING && wait_add(r, w) != SMTPS_OK) {
	    routed_free(w);			/* (takes it out of each route) */
	    return SMTPS_ENOMEM;
	}
	r->refs++;
	w->uses[w->nuses++] = r;
    }
    w->next = *routed_list(e);
    if (w->next != NULL)
	w->next->prev = w;
    *routed_list(e) = w;
    e->nrouted++;
    return SMTPS_OK;
}

/* route_of - the route of recipient i (known), or NULL when it has none */

static struct smtps_route *route_of(struct smtps_engine *e,
				            const struct smtps_message *m, size_t i)
{
    const char *domain;
    size_t  len;

    domain = rcpt_domain(m->rcpt[i].addr, &len);
    if (len == 0 || len > SMTPS_HOST_NAME_MAX)
	return NULL;
    return route_find(e, domain, len, smtps_lower_hash(domain, len));
}

/* join_free - release a join and its parts */

static void join_free(struct smtps_join *j)
{
    free(j->idx);
    free(j->parts);
    free(j);
}

/* join_finish - the last part is in: the message's result goes out */

static void join_finish(struct smtps_engine *e, struct smtps_join *j)
{
    struct smtps_result *r = j->result, *d = j->decider;
    size_t  i, delivered = 0, unknown = 0, temp = 0;

    for (i = 0; i < r->nrcpt; i++)
	switch (r->rcpt[i].status) {
	case SMTPS_STATUS_DELIVERED:
	    delivered++;
	    break;
	case SMTPS_STATUS_UNKNOWN:
	    unknown++;
	    break;
	case SMTPS_STATUS_TEMPFAIL:
	case SMTPS_STATUS_NOT_SENT:
	    temp++;
	    break;
	}
    r->status = delivered == r->nrcpt ? SMTPS_STATUS_DELIVERED
	: delivered > 0 ? SMTPS_STATUS_PARTIAL
	: unknown > 0 ? SMTPS_STATUS_UNKNOWN
	: temp > 0 ? SMTPS_STATUS_TEMPFAIL : SMTPS_STATUS_PERMFAIL;
    if (d != NULL) {
	r->state = d->state;
	r->stage = d->stage;
	memcpy(r->stage_name, d->stage_name, sizeof(r->stage_name));
	smtps_result_copy_reply(&r->reply, &d->reply);
	if (d->reason[0] != 0 && r->reason[0] == 0)
	    (void) smtps_result_set_reason(r, d->reason);
	else if (d->reason[0] != 0) {		/* a domain failed too: both */
	    char    both[SMTPS_REASON_MAX];

	    snprintf(both, sizeof(both), "%.250s; %.250s", r->reason, d->reason);
	    (void) smtps_result_set_reason(r, both);
	}
	smtps_result_free(d);
    }
    /*
     * The enhanced codes of failures decided here (classify.c's table, as
     * every result has them): the message's when no failing reply decided
     * it, and a failed recipient's that no part or route gave one (out of
     * memory before it was placed).
     */
    r->enhanced[0] = 0;
    if (r->reply.code < 400)
	(void) smtps_bounce_local_enhanced(r->status, r->reason, r->enhanced,
					   sizeof(r->enhanced));
    for (i = 0; i < r->nrcpt; i++)
	if ((r->rcpt[i].status == SMTPS_STATUS_TEMPFAIL
	     || r->rcpt[i].status == SMTPS_STATUS_PERMFAIL
	     || r->rcpt[i].status == SMTPS_STATUS_UNKNOWN)
	    && r->rcpt[i].reply.code < 400 && r->rcpt[i].enhanced[0] == 0
	    && r->reply.code < 400)
	    (void) smtps_bounce_local_enhanced(r->rcpt[i].status, r->reason,
					       r->rcpt[i].enhanced,
					       sizeof(r->rcpt[i].enhanced));
    /* The message's class: the first failed recipient's, as for any. */
    r->bounce_class = SMTPS_BOUNCE_NONE;
    if (r->status == SMTPS_STATUS_UNKNOWN)
	r->bounce_class = SMTPS_BOUNCE_UNDETERMINED;
    else if (r->status != SMTPS_STATUS_DELIVERED)
	for (i = 0; i < r->nrcpt && r->bounce_class == SMTPS_BOUNCE_NONE; i++)
	    r->bounce_class = r->rcpt[i].bounce_class;
    if (j->prev != NULL)
	j->prev->next = j->next;
    else
	*join_list(e) = j->next;
    if (j->next != NULL)
	j->next->prev = j->prev;
    smtps_message_free(j->m);
    join_free(j);
    smtps_engine_push_result(e, r);
}

/* enhanced_of - "5.1.2" from the head of "5.1.2 cannot route ..." */

static const char *enhanced_of(const char *text, char *code)
{
    size_t  n = strspn(text, "0123456789.");

    code[0] = 0;
    if (n >= 5 && n < 16 && text[n] == ' ') {
	memcpy(code, text, n);
	code[n] = 0;
    }
    return code;
}

/* settle_unrouted - recipient i has no route: failed, as its domain says */

static void settle_unrouted(struct smtps_result *r, size_t i,
			            const struct smtps_route *route,
			            const char *addr)
{
    struct smtps_result_rcpt *rc = &r->rcpt[i];
    char    why[SMTPS_WHY_MAX], code[16];
    const char *text;

    if (route == NULL) {
	snprintf(why, sizeof(why), "5.1.3 cannot route %.300s: the address "
		 "has no domain that can be looked up", addr);
	text = why;
	rc->status = SMTPS_STATUS_PERMFAIL;
    } else {
	text = route->why ? route->why : "cannot route the domain";
	rc->status = route->status;
    }
    /* Each failing domain once in the message's reason, in order. */
    if (strstr(r->reason, text) == NULL) {
	char    both[2 * SMTPS_REASON_MAX];

	if (r->reason[0] == 0)
	    (void) smtps_result_set_reason(r, text);
	else if (strlen(r->reason) + strlen(text) + 2 < SMTPS_REASON_MAX) {
	    snprintf(both, sizeof(both), "%.500s; %.500s", r->reason, text);
	    (void) smtps_result_set_reason(r, both);
	}
    }
    /* The enhanced code at the head of our own reason says what it was. */
    rc->bounce_class = smtps_bounce_classify(rc->status == SMTPS_STATUS_PERMFAIL ?
					     550 : 450, enhanced_of(text, code),
					     text, strlen(text));
    /* No server said it: the code our own reason starts with, or the table's. */
    (void) smtps_bounce_local_enhanced(rc->status, text, rc->enhanced,
				       sizeof(rc->enhanced));
}

/*
 * route_place - every route of m is known: m (or its parts) to the
 * destinations, its unroutable recipients settled
 */

static void route_place(struct smtps_engine *e, struct smtps_message *m,
			        const struct smtps_destination *k_dest)
{
    struct smtps_result *res = m->qresult;
    struct smtps_route *r, *first = NULL;
    struct smtps_join *j;
    struct smtps_part *p;
    struct smtps_message *pm;
    struct smtps_dest *d;
    size_t *idx, i, k, n, used = 0, nparts = 0, failed = 0;
    int     single = 1;

    for (i = 0; i < m->nrcpt; i++) {
	r = route_of(e, m, i);
	if (r == NULL || r->state != ROUTE_READY)
	    failed++;
	else if (first == NULL)
	    first = r;
	else if (r != first && (strcmp(r->site, first->site) != 0
				|| route_flags(r) != route_flags(first)))
	    single = 0;
    }
    /* One site for all: the message itself goes, no parts. */
    if (failed == 0 && single && first != NULL) {
	if ((d = smtps_dest_get(e, k_dest, first->site, route_flags(first),
				first->domain)) == NULL) {
	    smtps_engine_fail_message(e, m, SMTPS_STATUS_TEMPFAIL, "",
				      "out of memory");
	    return;
	}
	smtps_dest_enqueue(d, m);
	return;
    }
    if ((j = calloc(1, sizeof(*j))) == NULL
	|| (j->idx = calloc(m->nrcpt, sizeof(*j->idx))) == NULL
	|| (j->parts = calloc(m->nrcpt, sizeof(*j->parts))) == NULL) {
	if (j != NULL)
	    join_free(j);
	smtps_engine_fail_message(e, m, SMTPS_STATUS_TEMPFAIL, "",
				  "out of memory");
	return;
    }
    j->m = m;
    j->result = res;
    m->qresult = NULL;
    j->next = *join_list(e);
    if (j->next != NULL)
	j->next->prev = j;
    *join_list(e) = j;
    j->left = 1;				/* this function's, until the end */
    /* Each site in turn: its recipients, in their order, make one part. */
    for (i = 0; i < m->nrcpt; i++) {
	r = route_of(e, m, i);
	if (r == NULL || r->state != ROUTE_READY) {
	    settle_unrouted(res, i, r, m->rcpt[i].addr);
	    continue;
	}
	if (res->rcpt[i].route == TAKEN)
	    continue;				/* placed with an earlier one */
	idx = j->idx + used;
	for (n = 0, k = i; k < m->nrcpt; k++) {
	    struct smtps_route *r2 = route_of(e, m, k);

	    if (r2 != NULL && r2->state == ROUTE_READY
		&& strcmp(r2->site, r->site) == 0
		&& route_flags(r2) == route_flags(r)) {
		idx[n++] = k;
		res->rcpt[k].route = TAKEN;
	    }
	}
	used += n;
	pm = NULL;
	if ((d = smtps_dest_get(e, k_dest, r->site, route_flags(r), r->domain)) == NULL
	    || (pm = smtps_message_part(m, idx, n)) == NULL
	    || (pm->qresult = smtps_result_new(res->tag, n)) == NULL) {
	    smtps_message_free(pm);
	    for (k = 0; k < n; k++)
		res->rcpt[idx[k]].status = SMTPS_STATUS_TEMPFAIL;
	    if (res->reason[0] == 0)
		(void) smtps_result_set_reason(res, "out of memory");
	    continue;
	}
	p = &j->parts[nparts++];
	p->join = j;
	p->idx = idx;
	p->n = n;
	pm->qresult->owner = p;
	pm->tag = res->tag;
	j->left++;
	smtps_dest_enqueue(d, pm);
    }
    for (i = 0; i < m->nrcpt; i++)
	if (res->rcpt[i].route == TAKEN)
	    res->rcpt[i].route = -1;
    if (--j->left == 0)
	join_finish(e, j);
}

/*
 * smtps_route_result - a part's result: joined into its message's (1),
 * or a result of a message of its own (0)
 */

int     smtps_route_result(struct smtps_engine *e, struct smtps_result *r)
{
    struct smtps_part *p = r->owner;
    struct smtps_join *j;
    struct smtps_result *res;
    struct smtps_result_rcpt *dst, *src;
    int     map[SMTPS_ADDR_MAX];
    size_t  i;
    int     k;

    if (p == NULL)
	return 0;
    j = p->join;
    res = j->result;
    for (i = 0; i < r->nroute && i < SMTPS_ADDR_MAX; i++)
	map[i] = smtps_result_add_route(res, r->route[i].mx, r->route[i].ip);
    for (i = 0; i < p->n && i < r->nrcpt; i++) {
	dst = &res->rcpt[p->idx[i]];
	src = &r->rcpt[i];
	dst->status = src->status;
	dst->bounce_class = src->bounce_class;
	memcpy(dst->enhanced, src->enhanced, sizeof(dst->enhanced));
	smtps_result_copy_reply(&dst->reply, &src->reply);
	k = src->route;
	dst->route = k >= 0 && (size_t) k < r->nroute && k < SMTPS_ADDR_MAX ?
	    map[k] : -1;
    }
    /* The first part that failed decides what the message says; else the last. */
    r->owner = NULL;
    if (j->decider == NULL || (j->decider->status == SMTPS_STATUS_DELIVERED
			       && r->status != SMTPS_STATUS_DELIVERED)) {
	smtps_result_free(j->decider);
	j->decider = r;
    } else
	smtps_result_free(r);
    if (--j->left == 0)
	join_finish(e, j);
    return 1;
}

/*
 * smtps_routes_free - the engine ends: routes, messages still waiting
 * for them (and their results), messages split whose parts are gone
 */

void    smtps_routes_free(struct smtps_engine *e)
{
    struct smtps_routed *w;
    struct smtps_join *j;
    struct smtps_route *r;
    size_t  i;

    if (e->routes == NULL)
	return;
    while ((w = *routed_list(e)) != NULL) {
	*routed_list(e) = w->next;
	smtps_result_free(w->m->qresult);
	smtps_message_free(w->m);
	routed_free(w);
    }
    while ((j = *join_list(e)) != NULL) {
	*join_list(e) = j->next;
	smtps_result_free(j->result);
	smtps_result_free(j->decider);
	smtps_message_free(j->m);
	join_free(j);
    }
    for (i = 0; i < e->nroute_buckets; i++)
	while ((r = e->routes[i]) != NULL) {
	    r->nwaiting = 0;
	    route_free(r);
	}
    free(e->routes);
    e->routes = NULL;
    e->nroute_buckets = 0;
}
