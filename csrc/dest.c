/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	dest.c 3
 * SUMMARY
 *	the engine's destinations: queues, pools, addresses, fallback
 * SYNOPSIS
 *	#include "engine_private.h"
 *
 *	struct smtps_dest *smtps_dest_get(e, key, site, site_flags, label)
 *	int	smtps_dest_tlsa(d, host)
 *	void	smtps_dest_enqueue(d, m)
 *	void	smtps_dest_dispatch(d, now)
 *	...
 * DESCRIPTION
 *	A destination is where messages go and how: a host the caller named,
 *	or a site, the MX hosts that one or more recipient domains share
 *	(route.c makes those), together with every delivery setting of
 *	struct smtps_destination. Its key is all of that, so that a
 *	connection only ever carries messages that asked for exactly its
 *	settings. It holds its queue, its pool of connections (at most its
 *	rule's connections, else max_per_destination, and max_connections
 *	in all), its hosts and their addresses. It is freed when it has
 *	neither messages nor connections.
 *
 *	Addresses. A literal (IPv4, IPv6, "unix:/path") needs no lookup.
 *	Names are looked up (A and AAAA, as inet_protocols allows) through
 *	the engine's resolver, all hosts at once, ahead of the MX lookups
 *	that wait (a connection waits for these), each failing for now at
 *	the resolver's deadline; the answers are kept for their TTL. With
 *	DANE, each host's TLSA records are looked up with its addresses
 *	(smtps_dest_tlsa() says what they allow). Addresses are tried in
 *	the order of the hosts' MX preferences (RFC 5321 5.1), hosts of
 *	equal preference shuffled, each host's addresses in the order
 *	address_preference asks (ALL: a random one of its two families
 *	first, as Postfix's "any"), and no more than mx_address_limit in
 *	all. A host that
 *	resolves to nothing is skipped. New connections begin with one of
 *	the most preferred addresses, in turn, so that they spread over
 *	equal MX hosts.
 *
 *	Fallback. An address fails when connecting to it fails or times
 *	out, or when its connection ends before any transaction (a 4xx or
 *	5xx greeting, EHLO refused, STARTTLS failed where TLS is required,
 *	a hang-up): conn.c takes the messages back and the next connection
 *	tries the next address that has not failed. A reply to MAIL, RCPT or
 *	DATA is the destination's answer and is never a reason to go
 *	elsewhere. When every address has failed, the messages that were
 *	waiting fail with a reason that names each address tried and what
 *	it did, permanently only when each refused permanently; the
 *	destination then backs off.
 *
 *	Back-off. Failing twice in a row (every address failed, or a 421),
 *	a destination opens no new connection for a while: 1 s, doubled at
 *	each further failure, at most 60 s, and over at the first
 *	transaction that works. Messages
 *	that arrive meanwhile wait for a connection still up; with none,
 *	they fail at once (tempfail, "not attempted", with what made it
 *	back off): retrying later is the caller's queue's business.
 *
 *	Rates. connection_rate spaces new connections and message_rate the
 *	messages handed to sessions (limits.c); a destination that must
 *	wait arms its timer and is dispatched again when it fires.
 *
 *	TLS resumption. Each host keeps the TLS session of the last
 *	handshake with it (struct smtps_tls_resume, tls.c), for the next
 *	connection to it: one per host, so the cache is bounded by the
 *	hosts of the destinations alive, and freed with the destination.
 * SEE ALSO
 *	engine.c, conn.c, route.c, limits.c.
 *--*/

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <arpa/nameser.h>

#include "engine_private.h"

#define ADDR_TTL_MIN_MS 1000		/* answers kept at least this long */
#define ADDR_TTL_MAX_MS 86400000	/* and at most a day */
#define BACKOFF_FIRST_MS 1000
#define BACKOFF_MAX_MS 60000

static void dest_host_answer(void *arg, const struct smtps_dns_answer *a);
static void dest_tlsa_answer(void *arg, const struct smtps_dns_answer *a);
static void dest_wait_until(struct smtps_dest *d, int64_t when);

/* str_eq - equal strings, NULL equal only to NULL */

static int str_eq(const char *a, const char *b)
{
    if (a == NULL || b == NULL)
	return a == b;
    return strcmp(a, b) == 0;
}

/* smtps_str_copy - a copy of s (NULL stays NULL); *err set on failure */

char   *smtps_str_copy(const char *s, int *err)
{
    char   *copy;

    if (s == NULL)
	return NULL;
    if ((copy = smtps_strndup(s, strlen(s))) == NULL)
	*err = 1;
    return copy;
}

/* str_wipe - clear a secret before its memory goes back */

static void str_wipe(char *s)
{
    volatile char *p = s;

    if (s == NULL)
	return;
    while (*p)
	*p++ = 0;
    free(s);
}

/* hash_bytes - FNV-1a over n bytes */

static uint64_t hash_bytes(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = p;

    while (n-- > 0) {
	h ^= *b++;
	h *= 1099511628211ULL;
    }
    return h;
}

/* smtps_hash_str - FNV-1a over a string, NULL distinct from "" */

uint64_t smtps_hash_str(uint64_t h, const char *s)
{
    unsigned char tag = s != NULL;

    h = hash_bytes(h, &tag, 1);
    return s ? hash_bytes(h, s, strlen(s) + 1) : h;
}

/* check_name - a host or HELO name: 1..max printable bytes, no space */

static int check_name(const char *s, size_t max)
{
    size_t  len;

    if (s == NULL || (len = strlen(s)) == 0 || len > max
	|| smtps_check_text(s, len, max, NULL) != SMTPS_OK
	|| strchr(s, ' ') != NULL)
	return SMTPS_EINVAL;
    return SMTPS_OK;
}

/* smtps_dest_check_key - a destination the engine can use (host may be NULL) */

int     smtps_dest_check_key(const struct smtps_destination *k)
{
    if ((k->host != NULL && check_name(k->host, SMTPS_HOST_MAX) != SMTPS_OK)
	|| k->port < 1 || k->port > 65535
	|| k->tls_mode < SMTPS_TLS_NONE || k->tls_mode > SMTPS_TLS_MTA_STS
	|| (k->tls_mode == SMTPS_TLS_MTA_STS && k->host != NULL)
	|| k->timeout_ms < 0
	|| (k->helo != NULL && check_name(k->helo, SMTPS_HELO_MAX) != SMTPS_OK)
	|| (k->tls_servername != NULL
	    && check_name(k->tls_servername, SMTPS_HOST_MAX) != SMTPS_OK)
	|| (k->auth_user != NULL && k->auth_secret == NULL)
	|| k->protocol < 0 || k->protocol >= SMTPS_PROTO__COUNT
	|| k->source < 0)
	return SMTPS_EINVAL;
    return SMTPS_OK;
}

/* dest_hash - the hash of a destination key */

static uint64_t dest_hash(const struct smtps_destination *k, const char *site,
			          int site_flags)
{
    uint64_t h = 14695981039346656037ULL;

    h = smtps_hash_str(h, k->host);
    h = smtps_hash_str(h, site);
    h = hash_bytes(h, &site_flags, sizeof(site_flags));
    h = hash_bytes(h, &k->port, sizeof(k->port));
    h = hash_bytes(h, &k->tls_mode, sizeof(k->tls_mode));
    h = hash_bytes(h, &k->tls, sizeof(k->tls));
    h = smtps_hash_str(h, k->tls_servername);
    h = smtps_hash_str(h, k->auth_user);
    h = smtps_hash_str(h, k->auth_secret);
    h = hash_bytes(h, &k->auth_mechs, sizeof(k->auth_mechs));
    h = hash_bytes(h, &k->auth_allow_plaintext, sizeof(k->auth_allow_plaintext));
    h = hash_bytes(h, &k->timeout_ms, sizeof(k->timeout_ms));
    h = hash_bytes(h, &k->protocol, sizeof(k->protocol));
    h = hash_bytes(h, &k->source, sizeof(k->source));
    return smtps_hash_str(h, k->helo);
}

/* dest_matches - d has exactly key k and site */

static int dest_matches(const struct smtps_dest *d,
			        const struct smtps_destination *k,
			        const char *site, int site_flags)
{
    return d->port == k->port && d->tls_mode == k->tls_mode
	&& d->site_flags == site_flags
	&& d->tls == k->tls && d->auth_mechs == k->auth_mechs
	&& d->auth_plain == k->auth_allow_plaintext
	&& d->timeout_ms == k->timeout_ms && d->protocol == k->protocol
	&& d->source == k->source && str_eq(d->host, k->host)
	&& str_eq(d->site, site) && str_eq(d->servername, k->tls_servername)
	&& str_eq(d->auth_user, k->auth_user)
	&& str_eq(d->auth_secret, k->auth_secret) && str_eq(d->helo, k->helo);
}

/* dest_rehash - double the bucket array */

static int dest_rehash(struct smtps_engine *e)
{
    struct smtps_dest **b, *d, *next;
    size_t  n = e->nbuckets ? e->nbuckets * 2 : 64, i;

    if ((b = calloc(n, sizeof(*b))) == NULL)
	return SMTPS_ENOMEM;
    for (i = 0; i < e->nbuckets; i++)
	for (d = e->buckets[i]; d != NULL; d = next) {
	    next = d->hnext;
	    d->hnext = b[d->hash & (n - 1)];
	    b[d->hash & (n - 1)] = d;
	}
    free(e->buckets);
    e->buckets = b;
    e->nbuckets = n;
    return SMTPS_OK;
}

/*
 * dest_hosts - the hosts of a destination: the one given, or those of a
 * site, whose key lists them as "pref name pref name ...", by preference
 */

static int dest_hosts(struct smtps_dest *d)
{
    const char *p;
    char    name[SMTPS_HOST_NAME_MAX + 1];
    size_t  n = 1, i;
    int     pref, used;

    if (d->site != NULL)
	for (n = 0, p = d->site; *p; p++)
	    n += *p == ' ';
    if (d->site != NULL)
	n = (n + 1) / 2;
    if (n == 0 || (d->hosts = calloc(n, sizeof(*d->hosts))) == NULL)
	return SMTPS_ENOMEM;
    for (i = 0, p = d->site; i < n; i++) {
	d->hosts[i].d = d;
	d->hosts[i].req[0].done = d->hosts[i].req[1].done = dest_host_answer;
	d->hosts[i].req[0].arg = d->hosts[i].req[1].arg = &d->hosts[i];
	d->hosts[i].req[2].done = dest_tlsa_answer;
	d->hosts[i].req[2].arg = &d->hosts[i];
	if (d->site == NULL) {
	    d->hosts[i].name = smtps_strndup(d->host, strlen(d->host));
	} else {
	    if (sscanf(p, "%d %253s%n", &pref, name, &used) != 2)
		return SMTPS_EINVAL;
	    p += used;
	    while (*p == ' ')
		p++;
	    d->hosts[i].pref = pref;
	    d->hosts[i].name = smtps_strndup(name, strlen(name));
	}
	if (d->hosts[i].name == NULL)
	    return SMTPS_ENOMEM;
	d->nhosts++;
    }
    return SMTPS_OK;
}

/* dest_shape - what d may do: its rule's limits, or the engine's */

static void dest_shape(struct smtps_dest *d)
{
    struct smtps_engine *e = d->e;
    const char *names[SMTPS_MX_MAX];
    size_t  i, n = 0;

    memset(&d->shape, 0, sizeof(d->shape));
    for (i = 0; i < d->nhosts && n < SMTPS_MX_MAX; i++)
	names[n++] = d->hosts[i].name;
    (void) smtps_rules_match(e->rules, d->site ? d->label : NULL, names, n,
			     &d->shape);
    if (d->shape.connections <= 0)
	d->shape.connections = e->max_per_dest;
    if (d->shape.messages_per_connection <= 0)
	d->shape.messages_per_connection = e->msgs_per_conn;
    smtps_rate_init(&d->conn_rate, d->shape.connection_rate);
    smtps_rate_init(&d->msg_rate, d->shape.message_rate);
}

/* dest_new - a destination for key k (and site), in the table */

static struct smtps_dest *dest_new(struct smtps_engine *e,
				           const struct smtps_destination *k,
				           const char *site, int site_flags,
				           const char *label, uint64_t hash)
{
    struct smtps_dest *d;
    int     err = 0;

    if ((e->ndests + 1 > e->nbuckets * 2 && dest_rehash(e) != SMTPS_OK)
	|| smtps_engine_reserve_timers(e, 1) != SMTPS_OK
	|| (d = calloc(1, sizeof(*d))) == NULL)
	return NULL;
    d->e = e;
    d->hash = hash;
    d->host = smtps_str_copy(k->host, &err);
    d->site = smtps_str_copy(site, &err);
    d->site_flags = site_flags;
    d->label = smtps_str_copy(label ? label : k->host, &err);
    d->port = k->port;
    d->tls_mode = k->tls_mode;
    d->tls = k->tls;
    if (d->tls != NULL)
	smtps_tls_config_retain(d->tls);	/* the caller may drop its own */
    d->servername = smtps_str_copy(k->tls_servername, &err);
    d->auth_user = smtps_str_copy(k->auth_user, &err);
    d->auth_secret = smtps_str_copy(k->auth_secret, &err);
    d->auth_mechs = k->auth_mechs;
    d->auth_plain = k->auth_allow_plaintext;
    d->timeout_ms = k->timeout_ms;
    d->helo = smtps_str_copy(k->helo, &err);
    d->protocol = k->protocol;
    d->source = k->source;
    smtps_timer_init(&d->timer, TIMER_DEST);
    if (err || d->label == NULL || dest_hosts(d) != SMTPS_OK) {
	smtps_dest_free(d);
	return NULL;
    }
    dest_shape(d);
    d->hnext = e->buckets[hash & (e->nbuckets - 1)];
    e->buckets[hash & (e->nbuckets - 1)] = d;
    d->in_table = 1;
    e->ndests++;
    return d;
}

/* smtps_dest_get - the destination for key k (and site); made if new */

struct smtps_dest *smtps_dest_get(struct smtps_engine *e,
				          const struct smtps_destination *k,
				          const char *site, int site_flags,
				          const char *label)
{
    uint64_t hash = dest_hash(k, site, site_flags);
    struct smtps_dest *d;

    if (e->nbuckets > 0)
	for (d = e->buckets[hash & (e->nbuckets - 1)]; d != NULL; d = d->hnext)
	    if (d->hash == hash && dest_matches(d, k, site, site_flags))
		return d;
    return dest_new(e, k, site, site_flags, label, hash);
}

/* dest_cancel_lookups - drop the lookups in flight */

static void dest_cancel_lookups(struct smtps_dest *d)
{
    struct smtps_engine *e = d->e;
    size_t  i;
    int     j;

    for (i = 0; i < d->nhosts; i++)
	for (j = 0; j < 3; j++)
	    if (d->hosts[i].req[j].active) {
		smtps_dns_cancel(e->dns, &d->hosts[i].req[j]);
		e->dns_users--;
	    }
    d->lookups = 0;
}

/* smtps_dest_free - unlink and release a destination with nothing left */

void    smtps_dest_free(struct smtps_dest *d)
{
    struct smtps_engine *e = d->e;
    struct smtps_dest **pp;
    size_t  i;

    if (d->in_table) {
	for (pp = &e->buckets[d->hash & (e->nbuckets - 1)]; *pp != d;
	     pp = &(*pp)->hnext)
	     /* void */ ;
	*pp = d->hnext;
	e->ndests--;
    }
    smtps_dest_unstarve(d);
    smtps_timer_cancel(&e->timers, &d->timer);
    dest_cancel_lookups(d);
    for (i = 0; i < d->nhosts; i++) {
	free(d->hosts[i].name);
	free(d->hosts[i].tlsa_name);
	smtps_tlsa_free(d->hosts[i].tlsa, d->hosts[i].ntlsa);
	smtps_tls_resume_clear(&d->hosts[i].tls_resume);
    }
    free(d->hosts);
    free(d->host);
    free(d->site);
    free(d->label);
    free(d->backoff_why);
    free(d->servername);
    free(d->auth_user);
    str_wipe(d->auth_secret);
    free(d->helo);
    smtps_tls_config_free(d->tls);		/* NULL-safe: drops our reference */
    free(d);
}

/* smtps_dest_dirty - dispatch d at the next opportunity */

void    smtps_dest_dirty(struct smtps_dest *d)
{
    if (d->dirty)
	return;
    d->dirty = 1;
    d->dirty_next = d->e->dirty;
    d->e->dirty = d;
}

/*
 * dest_starve - d waits for a connection slot: behind those holding as
 * few connections or fewer, so that the first on the list is the one
 * that needs a slot most (conn.c's conn_yields() looks at it)
 */

static void dest_starve(struct smtps_dest *d)
{
    struct smtps_engine *e = d->e;
    struct smtps_dest **pp;

    if (d->starved)
	return;
    d->starved = 1;
    for (pp = &e->starved; *pp != NULL && (*pp)->nconns <= d->nconns;
	 pp = &(*pp)->starved_next)
	 /* void */ ;
    d->starved_next = *pp;
    *pp = d;
    e->nstarved++;
}

/* smtps_dest_unstarve - take d off the waiting list */

void    smtps_dest_unstarve(struct smtps_dest *d)
{
    struct smtps_engine *e = d->e;
    struct smtps_dest **pp;

    if (!d->starved)
	return;
    for (pp = &e->starved; *pp != NULL; pp = &(*pp)->starved_next)
	if (*pp == d) {
	    *pp = d->starved_next;
	    break;
	}
    d->starved = 0;
    d->starved_next = NULL;
    e->nstarved--;
}

/* smtps_dest_enqueue - a message waits for a connection of d */

void    smtps_dest_enqueue(struct smtps_dest *d, struct smtps_message *m)
{
    m->qnext = NULL;
    if (d->qtail != NULL)
	d->qtail->qnext = m;
    else
	d->qhead = m;
    d->qtail = m;
    d->nqueued++;
    d->nadded++;
    smtps_dest_dirty(d);
}

/* smtps_dest_requeue - a message taken back goes first again */

void    smtps_dest_requeue(struct smtps_dest *d, struct smtps_message *m)
{
    m->qnext = d->qhead;
    d->qhead = m;
    if (d->qtail == NULL)
	d->qtail = m;
    d->nqueued++;
    d->ntaken--;				/* waiting again, as before */
    smtps_dest_dirty(d);
}

/* smtps_dest_pop - take the oldest queued message */

struct smtps_message *smtps_dest_pop(struct smtps_dest *d)
{
    struct smtps_message *m = d->qhead;

    if (m == NULL)
	return NULL;
    d->qhead = m->qnext;
    if (d->qhead == NULL)
	d->qtail = NULL;
    m->qnext = NULL;
    d->nqueued--;
    d->ntaken++;
    return m;
}

/*
 * smtps_dest_cancel - every queued message of d with this tag fails now,
 * not attempted (cancel.c); 1 when there was one
 */

int     smtps_dest_cancel(struct smtps_dest *d, uint64_t tag)
{
    struct smtps_message *m, *prev = NULL, *next;
    int     found = 0;

    for (m = d->qhead; m != NULL; m = next) {
	next = m->qnext;
	if (m->tag != tag) {
	    prev = m;
	    continue;
	}
	if (prev != NULL)
	    prev->qnext = next;
	else
	    d->qhead = next;
	if (d->qtail == m)
	    d->qtail = prev;
	m->qnext = NULL;
	d->nqueued--;
	d->ntaken++;				/* as if popped: covers stay right */
	found = 1;
	smtps_engine_fail_message(d->e, m, SMTPS_STATUS_TEMPFAIL,
				  "not attempted: ", "cancelled by the caller");
    }
    if (found)
	smtps_dest_dirty(d);			/* freed by the next run if empty */
    return found;
}

/* smtps_dest_fail_queue - the first count queued messages of d fail now */

void    smtps_dest_fail_queue(struct smtps_dest *d, uint64_t count, int status,
			              const char *prefix, const char *why)
{
    struct smtps_message *m;

    while (count-- > 0 && (m = smtps_dest_pop(d)) != NULL)
	smtps_engine_fail_message(d->e, m, status, prefix, why);
}

/* smtps_dest_connect_ms - the connect deadline: both limits apply */

int64_t smtps_dest_connect_ms(const struct smtps_dest *d)
{
    if (d->timeout_ms > 0 && d->timeout_ms < d->e->connect_ms)
	return d->timeout_ms;
    return d->e->connect_ms;
}

/* family_first - which family of a host's addresses goes first */

static int family_first(struct smtps_engine *e)
{
    if (e->address_preference == SMTPS_INET_IPV4)
	return AF_INET;
    if (e->address_preference == SMTPS_INET_IPV6)
	return AF_INET6;
    return smtps_engine_random(e) & 1 ? AF_INET : AF_INET6;
}

/* add_host_addresses - host i's addresses of family, up to the limit */

static void add_host_addresses(struct smtps_dest *d, size_t i, int family)
{
    struct smtps_dest_host *h = &d->hosts[i];
    size_t  k;

    for (k = 0; k < h->naddr; k++)
	if (h->addr[k].ss.ss_family == family
	    && d->naddr < (size_t) d->e->mx_address_limit) {
	    d->addr[d->naddr] = h->addr[k];
	    d->addr_host[d->naddr++] = (uint8_t) i;
	}
}

/*
 * dest_build - every lookup is in: the addresses, in the order they are
 * tried. Hosts of equal preference are shuffled each time, so that the
 * load spreads over them (RFC 5321 5.1).
 */

static void dest_build(struct smtps_dest *d, int64_t now)
{
    struct smtps_engine *e = d->e;
    size_t  order[SMTPS_MX_MAX * 4], n = 0, i, j, k, group, tmp, before;
    int     ttl = -1, first, best = -1;

    for (i = 0; i < d->nhosts && n < sizeof(order) / sizeof(order[0]); i++)
	order[n++] = i;
    for (i = 0; i < n; i = group) {
	for (group = i + 1; group < n
	     && d->hosts[order[group]].pref == d->hosts[order[i]].pref; group++)
	     /* void */ ;
	for (j = group - 1; j > i; j--) {	/* Fisher-Yates, in the group */
	    k = i + (size_t) (smtps_engine_random(e) % (j - i + 1));
	    tmp = order[j];
	    order[j] = order[k];
	    order[k] = tmp;
	}
    }
    d->naddr = d->nfirst = 0;
    for (i = 0; i < n; i++) {
	struct smtps_dest_host *h = &d->hosts[order[i]];

	if (h->naddr > 0 && (ttl < 0 || h->ttl < ttl))
	    ttl = h->ttl;
	before = d->naddr;
	first = family_first(e);
	add_host_addresses(d, order[i], first);
	add_host_addresses(d, order[i], first == AF_INET ? AF_INET6 : AF_INET);
	add_host_addresses(d, order[i], AF_UNIX);
	/* The most preferred hosts that have addresses: spread over them. */
	if (d->naddr > before && best < 0)
	    best = h->pref;
	if (d->naddr > before && h->pref == best)
	    d->nfirst = d->naddr;
    }
    d->failed = 0;
    d->clear = 0;
    d->failed_perm = 1;
    d->tried[0] = 0;
    d->addr_state = ADDR_OK;
    d->addr_expires = smtps_time_after(now, ttl < 1 ? ADDR_TTL_MIN_MS :
				       ttl > ADDR_TTL_MAX_MS / 1000 ?
				       ADDR_TTL_MAX_MS : (int64_t) ttl * 1000);
}

/*
 * dest_lookup_failed - no address came of the lookups: the queue fails.
 * A host the caller named that does not resolve is a tempfail (it is the
 * sender's setting, which may be fixed); MX hosts that do not exist are
 * the domain's final word, unless a lookup failed for now.
 */

static void dest_lookup_failed(struct smtps_dest *d)
{
    char    why[SMTPS_TRIED_MAX];
    size_t  i, len;
    int     temp = d->site == NULL;

    if (d->site == NULL)
	snprintf(why, sizeof(why), "cannot resolve %s: %s", d->host,
		 d->hosts[0].why[0] ? d->hosts[0].why : "no address");
    else {
	len = (size_t) snprintf(why, sizeof(why), "no MX host of %s has an "
				"address:", d->label);
	for (i = 0; i < d->nhosts && len < sizeof(why); i++) {
	    temp |= d->hosts[i].tempfail;
	    len += (size_t) snprintf(why + len, sizeof(why) - len, "%s %s: %s",
				     i ? ";" : "", d->hosts[i].name,
				     d->hosts[i].why[0] ? d->hosts[i].why :
				     "no address");
	}
    }
    d->addr_state = ADDR_NONE;
    d->naddr = 0;
    smtps_dest_fail_queue(d, UINT64_MAX, temp ? SMTPS_STATUS_TEMPFAIL :
			  SMTPS_STATUS_PERMFAIL, "", why);
}

/* dest_lookups_done - the last answer came (records, failure, timeout) */

static void dest_lookups_done(struct smtps_dest *d, int64_t now)
{
    dest_build(d, now);
    if (d->naddr == 0)
	dest_lookup_failed(d);
    smtps_dest_dirty(d);
}

/* dest_host_answer - an A or AAAA answer for one host */

static void dest_host_answer(void *arg, const struct smtps_dns_answer *a)
{
    struct smtps_dest_host *h = arg;
    struct smtps_dest *d = h->d;
    size_t  room = SMTPS_ADDR_MAX - h->naddr;

    d->e->dns_users--;
    d->lookups--;
    if (!a->secure)
	h->insecure = 1;			/* RFC 7672 2.2.2: no DANE then */
    if (a->status == SMTPS_DNS_OK) {
	h->naddr += smtps_dns_addresses(a, d->port, h->addr + h->naddr, room);
	if (h->ttl == 0 || a->ttl < h->ttl)
	    h->ttl = a->ttl > 0 ? a->ttl : 1;
    } else if (a->status != SMTPS_DNS_NODATA) {
	h->tempfail |= a->status == SMTPS_DNS_TEMPFAIL
	    || a->status == SMTPS_DNS_BOGUS;
	h->nxdomain |= a->status == SMTPS_DNS_NXDOMAIN;
	snprintf(h->why, sizeof(h->why), "%s", a->why);
    } else if (h->why[0] == 0)
	snprintf(h->why, sizeof(h->why), "no address records");
    if (d->lookups == 0)
	dest_lookups_done(d, smtps_clock_ms());
}

/* dest_tlsa_answer - the TLSA records of one host (RFC 7672 2.2) */

static void dest_tlsa_answer(void *arg, const struct smtps_dns_answer *a)
{
    struct smtps_dest_host *h = arg;
    struct smtps_dest *d = h->d;
    size_t  seen = 0;

    d->e->dns_users--;
    d->lookups--;
    smtps_tlsa_free(h->tlsa, h->ntlsa);
    h->tlsa = NULL;
    h->ntlsa = 0;
    h->tlsa_state = TLSA_NONE;
    if (a->status == SMTPS_DNS_OK && a->secure) {
	if (smtps_dns_tlsa(a, &h->tlsa, &h->ntlsa, &seen) != SMTPS_OK) {
	    h->tlsa_state = TLSA_BOGUS;		/* cannot hold them: not now */
	    snprintf(h->tlsa_why, sizeof(h->tlsa_why), "out of memory");
	} else
	    h->tlsa_state = h->ntlsa > 0 ? TLSA_USABLE : TLSA_UNUSABLE;
    } else if (a->status == SMTPS_DNS_BOGUS || a->status == SMTPS_DNS_TEMPFAIL) {
	/* Not knowing may be an attack: this host is not used for now. */
	h->tlsa_state = TLSA_BOGUS;
	snprintf(h->tlsa_why, sizeof(h->tlsa_why), "%s", a->why ? a->why :
		 "lookup failed");
    }
    if (d->lookups == 0)
	dest_lookups_done(d, smtps_clock_ms());
}

/* dest_dane - the destination's TLS level asks for DANE */

static int dest_dane(const struct smtps_dest *d)
{
    return d->tls_mode == SMTPS_TLS_DANE || d->tls_mode == SMTPS_TLS_DANE_ONLY;
}

/*
 * smtps_dest_tlsa - what DANE can do for h: its TLSA records count only
 * when the MX records and the host's addresses were validated too (RFC
 * 7672 2.2)
 */

int     smtps_dest_tlsa(const struct smtps_dest *d,
			        const struct smtps_dest_host *h)
{
    if (!dest_dane(d) || !(d->site_flags & SMTPS_SITE_SECURE) || h->insecure)
	return TLSA_NONE;
    return h->tlsa_state;
}

/* dest_addresses - 1 when d's addresses are known; else look them up */

static int dest_addresses(struct smtps_dest *d, int64_t now)
{
    struct smtps_engine *e = d->e;
    struct smtps_dns *dns;
    struct smtps_dest_host *h;
    char    why[SMTPS_WHY_MAX];
    size_t  i;
    int     rc;

    if (d->addr_state == ADDR_OK && (d->addr_expires < 0 || now < d->addr_expires))
	return 1;
    if (d->addr_state == ADDR_RESOLVING)
	return 0;
    d->addr_state = ADDR_RESOLVING;
    dns = NULL;
    for (i = 0; i < d->nhosts; i++) {
	h = &d->hosts[i];
	h->naddr = 0;
	h->ttl = 0;
	h->tempfail = h->nxdomain = h->insecure = 0;
	h->why[0] = 0;
	h->tlsa_state = TLSA_NONE;
	h->tlsa_why[0] = 0;
	/* A literal needs no lookup, hence no wait. */
	if (smtps_resolve_literal(h->name, d->port, &h->addr[0])) {
	    h->naddr = 1;
	    h->ttl = ADDR_TTL_MAX_MS / 1000;
	    continue;
	}
	if (dns == NULL && (dns = smtps_engine_dns(e, why, sizeof(why))) == NULL) {
	    d->addr_state = ADDR_NONE;
	    smtps_dest_fail_queue(d, UINT64_MAX, SMTPS_STATUS_TEMPFAIL, "", why);
	    return 0;
	}
	if (e->inet_protocols != SMTPS_INET_IPV6) {
	    if ((rc = smtps_dns_query(dns, h->name, ns_t_a, SMTPS_DNS_URGENT,
				     &h->req[0])) == SMTPS_OK) {
		d->lookups++;
		e->dns_users++;
	    } else
		snprintf(h->why, sizeof(h->why), "%s", smtps_strerror(rc));
	}
	if (e->inet_protocols != SMTPS_INET_IPV4) {
	    if ((rc = smtps_dns_query(dns, h->name, ns_t_aaaa, SMTPS_DNS_URGENT,
				     &h->req[1])) == SMTPS_OK) {
		d->lookups++;
		e->dns_users++;
	    } else
		snprintf(h->why, sizeof(h->why), "%s", smtps_strerror(rc));
	}
	/* DANE: the host's TLSA records, at the same time (RFC 7672 2.2). */
	if (dest_dane(d) && (d->site_flags & SMTPS_SITE_SECURE) && d->port != 0) {
	    free(h->tlsa_name);
	    if ((h->tlsa_name = malloc(SMTPS_HOST_MAX + 32)) == NULL) {
		h->tlsa_state = TLSA_BOGUS;
		snprintf(h->tlsa_why, sizeof(h->tlsa_why), "out of memory");
	    } else {
		snprintf(h->tlsa_name, SMTPS_HOST_MAX + 32, "_%d._tcp.%s",
			 d->port, h->name);
		if ((rc = smtps_dns_query(dns, h->tlsa_name, ns_t_tlsa,
					  SMTPS_DNS_URGENT, &h->req[2])) == SMTPS_OK) {
		    d->lookups++;
		    e->dns_users++;
		} else {
		    h->tlsa_state = TLSA_BOGUS;
		    snprintf(h->tlsa_why, sizeof(h->tlsa_why), "%s",
			     smtps_strerror(rc));
		}
	    }
	}
    }
    if (d->lookups == 0) {			/* literals, or nothing could start */
	dest_lookups_done(d, now);
	return d->addr_state == ADDR_OK && d->naddr > 0;
    }
    return 0;
}

/*
 * smtps_dest_timer - a wait ended (a back-off, a rate); a lookup's
 * deadline is the resolver's: it answers "timed out"
 */

void    smtps_dest_timer(struct smtps_dest *d, int64_t now)
{
    SMTPS_UNUSED(now);
    smtps_dest_dirty(d);
}

/* dest_wait_until - be dispatched again at when */

static void dest_wait_until(struct smtps_dest *d, int64_t when)
{
    if (d->timer.index == SMTPS_TIMER_UNARMED || when < d->timer.when)
	smtps_timer_set(&d->e->timers, &d->timer, when);
}

/* smtps_dest_may_send - 1 when the message rate lets one go now */

int     smtps_dest_may_send(struct smtps_dest *d, int64_t now)
{
    int64_t wait = smtps_rate_wait(&d->msg_rate, now);

    if (wait == 0)
	return 1;
    dest_wait_until(d, now + wait);
    return 0;
}

/* smtps_dest_sent - one message was handed to a session */

void    smtps_dest_sent(struct smtps_dest *d, int64_t now)
{
    smtps_rate_take(&d->msg_rate, now);
}

/* smtps_dest_addr_failed - addr[i] failed: say how, try another next */

void    smtps_dest_addr_failed(struct smtps_dest *d, int i, int perm,
				       const char *why)
{
    size_t  len = strlen(d->tried);

    if (i < 0 || (size_t) i >= d->naddr || (d->failed & (1u << i)))
	return;
    d->failed |= 1u << i;
    d->failed_perm &= perm;
    if (len < sizeof(d->tried) - 1)
	snprintf(d->tried + len, sizeof(d->tried) - len, "%s%s",
		 len ? "; " : "", why);
}

/* smtps_dest_all_failed - no address is left to try */

int     smtps_dest_all_failed(const struct smtps_dest *d)
{
    return d->naddr > 0 && d->failed == (d->naddr >= 32 ? UINT32_MAX :
					 (1u << d->naddr) - 1);
}

/* smtps_dest_connected - a transaction began: the destination works */

void    smtps_dest_connected(struct smtps_dest *d)
{
    d->failed = 0;
    d->failed_perm = 1;
    d->tried[0] = 0;
    d->fails = 0;
    d->backoff_until = 0;
    free(d->backoff_why);
    d->backoff_why = NULL;
}

/* smtps_dest_backoff - no new connection for a while, longer each time */

void    smtps_dest_backoff(struct smtps_dest *d, int64_t now, const char *why)
{
    int64_t ms = BACKOFF_FIRST_MS;
    int     i;

    /* One failure may be chance (or ours): the next message tries again. */
    if (++d->fails < 2)
	return;
    for (i = 2; i < d->fails && ms < BACKOFF_MAX_MS; i++)
	ms *= 2;
    if (ms > BACKOFF_MAX_MS)
	ms = BACKOFF_MAX_MS;
    d->backoff_until = smtps_time_after(now, ms);
    free(d->backoff_why);
    d->backoff_why = why ? smtps_strndup(why, strlen(why)) : NULL;
}

/*
 * dest_backed_off - while d backs off: messages wait for connections
 * still up, or, with none, fail now for the reason it backs off (a
 * queue, a retry later, is the caller's: not a wait here)
 */

static int dest_backed_off(struct smtps_dest *d, int64_t now)
{
    char    why[SMTPS_TRIED_MAX + 128];

    if (now >= d->backoff_until)
	return 0;
    if (d->nconns > 0) {
	dest_wait_until(d, d->backoff_until);
	return 1;
    }
    snprintf(why, sizeof(why), "not attempted: %s backs off for %lld ms "
	     "after failures: %.1400s", d->label,
	     (long long) (d->backoff_until - now),
	     d->backoff_why ? d->backoff_why : "connection failed");
    smtps_dest_fail_queue(d, UINT64_MAX, SMTPS_STATUS_TEMPFAIL, "", why);
    return 1;
}

/* smtps_dest_dispatch - give d's queue to connections, opening some */

void    smtps_dest_dispatch(struct smtps_dest *d, int64_t now)
{
    struct smtps_engine *e = d->e;
    struct smtps_conn *c;
    int64_t wait;

    /* A warm connection first: no handshake to pay. */
    while (d->qhead != NULL && (c = d->idle) != NULL) {
	if (!smtps_dest_may_send(d, now))
	    return;
	smtps_conn_idle_remove(c);
	(void) smtps_conn_submit_next(c, now);
	smtps_conn_update(c, now);		/* back to the pool if refused */
    }
    if (d->nqueued <= (size_t) d->nconnecting
	|| d->addr_state == ADDR_RESOLVING)
	return;
    if (dest_backed_off(d, now) || !dest_addresses(d, now))
	return;
    /*
     * Every address failed while other connections still carried
     * messages, and those are gone now: what is left gets a round of its
     * own (conn.c fails the messages of a round that fails everywhere).
     * Without this, nothing would ever take them.
     */
    if (d->nconns == 0 && smtps_dest_all_failed(d)) {
	d->failed = 0;
	d->failed_perm = 1;
	d->tried[0] = 0;
    }
    while (d->nqueued > (size_t) d->nconnecting
	   && d->nconns < d->shape.connections && !smtps_dest_all_failed(d)) {
	if (e->nconns >= (size_t) e->max_conns) {
	    dest_starve(d);
	    smtps_engine_make_room(e);
	    return;
	}
	if ((wait = smtps_rate_wait(&d->conn_rate, now)) > 0) {
	    dest_wait_until(d, now + wait);
	    return;
	}
	smtps_rate_take(&d->conn_rate, now);
	if (smtps_conn_open(d, now) < 0)
	    return;
    }
}
