/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	engine.c 3
 * SUMMARY
 *	the native driver: many sessions, nonblocking sockets, epoll, one thread
 * SYNOPSIS
 *	#include "smtpstate.h"
 *
 *	struct smtps_engine *smtps_engine_new(machine, cfg, user)
 *	void	smtps_engine_free(e)
 *	int	smtps_engine_set_resolver(e, cfg, why, whylen)
 *	int	smtps_engine_set_limits(e, limits, n)
 *	int	smtps_engine_set_sources(e, sources, n, why, whylen)
 *	int	smtps_engine_submit(e, msg, dest, tag)
 *	int	smtps_engine_run(e, max_wait_ms)
 *	int	smtps_engine_serve(e, max_wait_ms)
 *	struct smtps_result *smtps_engine_next_result(e)
 *	size_t	smtps_engine_pending(e)
 *	size_t	smtps_engine_connections(e)
 *	int	smtps_engine_set_trace(e, fn, closure)
 * DESCRIPTION
 *	An engine moves bytes between sockets and sans-I/O sessions
 *	(session.c) for thousands of connections in the caller's thread. What
 *	to send and what a reply means is the sessions' business; the engine
 *	owns sockets, time, DNS, queues and pools. This file holds its entry
 *	points and its loop; destinations (dest.c), connections (conn.c),
 *	routes by MX (route.c), traffic shaping (limits.c) and DNS
 *	(resolve.c) are modules of their own.
 *
 *	Submitting. A message with a host goes to that host (a smart host,
 *	or an LMTP server over TCP or "unix:/path"); without one, each
 *	recipient goes where its domain's MX records say (route.c), a
 *	message to several destinations being split and its results joined
 *	into one. Either way the result exists from the moment the message
 *	is taken, so that none can be lost. smtps_engine_submit() only
 *	queues (and may start DNS lookups), so it may even be called from a
 *	state running inside smtps_engine_run() (the Python Engine allows it
 *	too, through its inbox). It is not for other threads: those hand
 *	their messages to the loop's thread and call smtps_engine_wake()
 *	(wakeup.c), the one call any thread may make.
 *
 *	smtps_engine_run() processes submissions, expired deadlines, DNS
 *	answers and socket events until a result is ready, nothing is
 *	pending, max_wait_ms has passed, a signal interrupted the wait or a
 *	state interrupted its session (SMTPS_EINTR: Ctrl-C in a Python
 *	state), so that the caller can handle it, or smtps_engine_wake()
 *	was called (wakeup.c). smtps_engine_serve() is the same loop that
 *	does not stop when nothing is pending: a service keeps calling it,
 *	so that idle pooled connections are timed out on time (they are
 *	only timed out while one of the two runs); with max_wait_ms 0 it is
 *	the non-blocking step another event loop calls when
 *	smtps_engine_fileno() is readable or the next deadline passed.
 *
 *	Failures. Every submitted message ends in exactly one result. A
 *	message that never reached a session gets one made here (tempfail
 *	at stage "not connected" when no address could be reached, with
 *	what each one did; a domain that cannot be routed fails its
 *	recipients as route.c says). Once a session holds a message, the
 *	session makes its result, whatever happens to the connection,
 *	except before any transaction began, when it hands it back to be
 *	tried at the next address (conn.c).
 *
 *	Settings. The resolver (name servers, /etc/hosts, trust anchors,
 *	local records, deadlines), the traffic shaping rules and the source
 *	addresses are set after smtps_engine_new(), while nothing is in
 *	flight; the resolver itself (libunbound) starts at the first lookup.
 *
 *	Memory: no global mutable state; one 64 KiB read buffer per engine;
 *	output is bounded by the sessions; results wait in one list; at most
 *	max_tls_handshakes TLS handshakes run at once (conn.c).
 *	RLIMIT_NOFILE's soft limit is raised to the hard limit when it is
 *	below max_connections + 64.
 * DIAGNOSTICS
 *	smtps_engine_new() returns NULL for a bad configuration or when
 *	epoll or memory is not available. smtps_engine_submit() returns
 *	SMTPS_EINVAL for a bad destination or message, SMTPS_ENOMEM.
 *	smtps_engine_run() and smtps_engine_serve() return the number of
 *	results ready (0: woken or out of time), SMTPS_ESTATE when called
 *	from inside either, SMTPS_ESYS when epoll fails.
 * SEE ALSO
 *	dest.c, conn.c, route.c, limits.c, resolve.c, timers.c, session.c,
 *	wakeup.c, cancel.c, epoll(7).
 *--*/

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>

#include "engine_private.h"

#define DEF_MAX_CONNECTIONS 1000
#define DEF_MAX_PER_DEST 10
#define DEF_IDLE_MS 5000
#define DEF_CONNECT_MS 30000
#define DEF_ADDRESS_LIMIT 5		/* Postfix's smtp_mx_address_limit */
#define DEF_TLS_HANDSHAKES 100		/* conn.c, conn_tls_gate() */

/* The smallest ABI sizes accepted: callers older than these are refused. */
#define DEST_MIN_SIZE \
    (offsetof(struct smtps_destination, port) + sizeof(int))
#define CONFIG_MIN_SIZE \
    (offsetof(struct smtps_engine_config, max_connections) + sizeof(int))
#define RESOLVER_MIN_SIZE \
    (offsetof(struct smtps_resolver_config, nameservers_count) + sizeof(size_t))

/* raise_nofile - lift the soft descriptor limit to the hard one if low */

static void raise_nofile(rlim_t want)
{
    struct rlimit rl;

    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= want
	|| rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur >= rl.rlim_max)
	return;
    rl.rlim_cur = rl.rlim_max;
    (void) setrlimit(RLIMIT_NOFILE, &rl);	/* best effort */
}

/* check_helo - a HELO name: 1..SMTPS_HELO_MAX printable bytes, no space */

static int check_helo(const char *s)
{
    size_t  len;

    if (s == NULL || (len = strlen(s)) == 0 || len > SMTPS_HELO_MAX
	|| smtps_check_text(s, len, SMTPS_HELO_MAX, NULL) != SMTPS_OK
	|| strchr(s, ' ') != NULL)
	return SMTPS_EINVAL;
    return SMTPS_OK;
}

/*
 * smtps_engine_reserve_timers - room for more timers' owners (and the
 * resolver's one), so that setting a timer never needs memory
 */

int     smtps_engine_reserve_timers(struct smtps_engine *e, size_t more)
{
    return smtps_timers_reserve(&e->timers, e->nconns + e->ndests
				+ e->nroutes + 1 + more);
}

/* smtps_engine_random - a cheap random number (xorshift64*) */

uint64_t smtps_engine_random(struct smtps_engine *e)
{
    e->rand ^= e->rand >> 12;
    e->rand ^= e->rand << 25;
    e->rand ^= e->rand >> 27;
    return e->rand * 2685821657736338717ULL;
}

/* smtps_engine_push_result - a result is ready for smtps_engine_next_result() */

void    smtps_engine_push_result(struct smtps_engine *e, struct smtps_result *r)
{
    r->next = NULL;
    if (e->results_tail != NULL)
	e->results_tail->next = r;
    else
	e->results = r;
    e->results_tail = r;
    e->nresults++;
}

/* smtps_engine_fail_message - a message no session settled gets its result */

void    smtps_engine_fail_message(struct smtps_engine *e,
				          struct smtps_message *m, int status,
				          const char *prefix, const char *why)
{
    struct smtps_result *r = m->qresult;
    char    text[SMTPS_REASON_MAX];

    /* Made at submit, so that even now memory cannot lose a result. */
    m->qresult = NULL;
    snprintf(text, sizeof(text), "%s%s", prefix, why);
    (void) smtps_result_set_reason(r, text);
    smtps_result_settle(r, status, 1);
    smtps_bounce_classify_result(r);
    /* A part's result joins its message's; any other goes out. */
    if (!smtps_route_result(e, r))
	smtps_engine_push_result(e, r);
    smtps_message_free(m);
}

/* smtps_engine_make_room - end the oldest idle connection for a waiting one */

void    smtps_engine_make_room(struct smtps_engine *e)
{
    struct smtps_conn *c = e->lru;
    int64_t now;

    /* Connections already quitting will free their slots soon enough. */
    if (c == NULL || e->nquitting >= e->nstarved)
	return;
    now = smtps_clock_ms();
    smtps_conn_quit(c, now);
    smtps_conn_update(c, now);
}

/*
 * smtps_engine_wake_starved - a slot was freed: the destination that
 * needs it most (the first waiting) tries again; waking them all would
 * give it to whichever is dispatched first, maybe one of those that
 * gave a connection up for the others
 */

void    smtps_engine_wake_starved(struct smtps_engine *e)
{
    struct smtps_dest *d;

    if ((d = e->starved) != NULL) {
	smtps_dest_unstarve(d);
	smtps_dest_dirty(d);
    }
}

/* engine_dirty_run - dispatch every dirty destination; free empty ones */

static void engine_dirty_run(struct smtps_engine *e, int64_t now)
{
    struct smtps_dest *d;

    for (;;) {
	while ((d = e->dirty) != NULL) {
	    e->dirty = d->dirty_next;
	    d->dirty = 0;
	    d->dirty_next = NULL;
	    smtps_dest_dispatch(d, now);
	    /* Dispatching may have made it dirty again: then it is kept. */
	    if (d->dirty || d->qhead != NULL || d->nconns > 0
		|| d->addr_state == ADDR_RESOLVING)
		continue;
	    /* Backing off: kept until then, so that new messages wait too. */
	    if (now < d->backoff_until)
		smtps_timer_set(&e->timers, &d->timer, d->backoff_until);
	    else
		smtps_dest_free(d);
	}
	/*
	 * A slot still free: the one woken did not take it (backing off,
	 * resolving, a rate), so the next waiting may. Each round either
	 * fills a slot or takes one off the list: this ends.
	 */
	if (e->starved == NULL || e->nconns >= (size_t) e->max_conns)
	    break;
	smtps_engine_wake_starved(e);
    }
}

/* engine_bury - free the connections closed this round */

static void engine_bury(struct smtps_engine *e)
{
    struct smtps_conn *c;

    while ((c = e->dead) != NULL) {
	e->dead = c->next;
	free(c);
    }
}

/* engine_timers_run - fire every deadline that has passed */

static void engine_timers_run(struct smtps_engine *e, int64_t now)
{
    struct smtps_timer *t;

    while ((t = smtps_timers_first(&e->timers)) != NULL && t->when <= now) {
	smtps_timer_cancel(&e->timers, t);
	if (t->kind == TIMER_CONN)
	    smtps_conn_timer((struct smtps_conn *)
			     ((char *) t - offsetof(struct smtps_conn, timer)), now);
	else if (t->kind == TIMER_DEST)
	    smtps_dest_timer((struct smtps_dest *)
			     ((char *) t - offsetof(struct smtps_dest, timer)), now);
	else if (t->kind == TIMER_DNS)
	    smtps_dns_timer(t, now);
	else
	    smtps_route_timer(t, now);
    }
}

/*
 * smtps_engine_dns - the resolver, started at the first lookup from the
 * engine's settings and watched by epoll (its data pointer NULL marks it)
 */

struct smtps_dns *smtps_engine_dns(struct smtps_engine *e, char *why,
				           size_t whylen)
{
    struct epoll_event ev;

    if (e->dns != NULL)
	return e->dns;
    if (smtps_engine_reserve_timers(e, 0) != SMTPS_OK) {
	snprintf(why, whylen, "cannot start the resolver: out of memory");
	return NULL;
    }
    if ((e->dns = smtps_dns_new(&e->dns_cfg, &e->timers, e->dns_ms,
				   why, whylen)) == NULL)
	return NULL;
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN;
    ev.data.ptr = NULL;
    if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, smtps_dns_fd(e->dns), &ev) != 0) {
	snprintf(why, whylen, "cannot watch the resolver: %s", strerror(errno));
	smtps_dns_free(e->dns);
	e->dns = NULL;
	return NULL;
    }
    return e->dns;
}

/* strings_free - a copied list of strings */

static void strings_free(const char *const *list, size_t n)
{
    size_t  i;

    for (i = 0; i < n; i++)
	free((char *) list[i]);
    free((void *) list);
}

/* strings_copy - a copy of a list of strings; NULL when it failed */

static const char *const *strings_copy(const char *const *list, size_t n,
				               int *err)
{
    char  **copy;
    size_t  i;

    if (n == 0)
	return NULL;
    if (list == NULL || (copy = calloc(n, sizeof(*copy))) == NULL) {
	*err = 1;
	return NULL;
    }
    for (i = 0; i < n; i++)
	if (list[i] == NULL
	    || (copy[i] = smtps_strndup(list[i], strlen(list[i]))) == NULL) {
	    strings_free((const char *const *) copy, i);
	    *err = 1;
	    return NULL;
	}
    return (const char *const *) copy;
}

/* resolver_forget - drop the resolver settings' copies */

static void resolver_forget(struct smtps_resolver_config *c)
{
    strings_free(c->nameservers, c->nameservers_count);
    strings_free(c->trust_anchors, c->trust_anchors_count);
    strings_free(c->local_data, c->local_data_count);
    memset(c, 0, sizeof(*c));
}

/* smtps_engine_set_resolver - how names are looked up, from now on */

int     smtps_engine_set_resolver(struct smtps_engine *e,
				          const struct smtps_resolver_config *cfg,
				          char *why, size_t whylen)
{
    struct smtps_resolver_config c, copy;
    struct smtps_dns *probe;
    int     err = 0;

    if (why != NULL && whylen > 0)
	why[0] = 0;
    if (e == NULL || cfg == NULL || cfg->sizeof_config < RESOLVER_MIN_SIZE
	|| cfg->sizeof_config > sizeof(c))
	return SMTPS_EINVAL;
    if (e->dns_users > 0 || e->nrouted > 0 || e->running)
	return SMTPS_ESTATE;
    memset(&c, 0, sizeof(c));
    memcpy(&c, cfg, cfg->sizeof_config);
    if (c.timeout_ms < 0 || c.attempts < 0 || c.max_in_flight < 0)
	return SMTPS_EINVAL;
    memset(&copy, 0, sizeof(copy));
    copy.sizeof_config = sizeof(copy);
    copy.nameservers = strings_copy(c.nameservers, c.nameservers_count, &err);
    copy.nameservers_count = c.nameservers_count;
    copy.trust_anchors = strings_copy(c.trust_anchors, c.trust_anchors_count, &err);
    copy.trust_anchors_count = c.trust_anchors_count;
    copy.local_data = strings_copy(c.local_data, c.local_data_count, &err);
    copy.local_data_count = c.local_data_count;
    copy.hosts_file = c.hosts_file;
    copy.timeout_ms = c.timeout_ms;
    copy.attempts = c.attempts;
    copy.max_in_flight = c.max_in_flight;
    copy.no_dnssec = c.no_dnssec;
    if (err) {
	resolver_forget(&copy);
	return SMTPS_ENOMEM;
    }
    /* Tried now, so that a bad setting is an error here, not a bounce. */
    if ((probe = smtps_dns_new(&copy, NULL, 0, why, whylen)) == NULL) {
	resolver_forget(&copy);
	return SMTPS_EINVAL;
    }
    smtps_dns_free(probe);
    if (e->dns != NULL) {
	smtps_dns_free(e->dns);			/* (leaves the epoll set) */
	e->dns = NULL;
    }
    resolver_forget(&e->dns_cfg);
    e->dns_cfg = copy;
    e->dns_ms = (copy.timeout_ms ? copy.timeout_ms : SMTPS_DNS_TIMEOUT_MS)
	* (copy.attempts ? copy.attempts : SMTPS_DNS_ATTEMPTS);
    if (e->dns_ms > SMTPS_TIMEOUT_MAX)
	e->dns_ms = SMTPS_TIMEOUT_MAX;
    return SMTPS_OK;
}

/* smtps_engine_dnssec - SMTPS_DNSSEC_*: what the resolver validates */

int     smtps_engine_dnssec(const struct smtps_engine *e)
{
    return e == NULL || e->dns == NULL ? SMTPS_DNSSEC_UNKNOWN : smtps_dns_dnssec(e->dns);
}

/* smtps_engine_set_limits - the traffic shaping rules of new destinations */

int     smtps_engine_set_limits(struct smtps_engine *e,
				        const struct smtps_limits *limits,
				        size_t n)
{
    struct smtps_rules *rules = NULL;

    if (e == NULL || (n > 0 && limits == NULL))
	return SMTPS_EINVAL;
    if (e->npending > 0 || e->nconns > 0 || e->running)
	return SMTPS_ESTATE;
    if (n > 0 && (rules = smtps_rules_new(limits, n)) == NULL)
	return SMTPS_EINVAL;
    smtps_rules_free(e->rules);
    e->rules = rules;
    return SMTPS_OK;
}

/* sources_free - release the source addresses */

static void sources_free(struct smtps_engine_source *s, size_t n)
{
    size_t  i;

    for (i = 0; i < n; i++) {
	free(s[i].address);
	free(s[i].helo);
    }
    free(s);
}

/* smtps_engine_set_sources - the local addresses connections come from */

int     smtps_engine_set_sources(struct smtps_engine *e,
				         const struct smtps_source *sources,
				         size_t n, char *why, size_t whylen)
{
    struct smtps_engine_source *s;
    size_t  i;
    int     fd, err = 0;

    if (why != NULL && whylen > 0)
	why[0] = 0;
    if (e == NULL || (n > 0 && sources == NULL))
	return SMTPS_EINVAL;
    if (e->npending > 0 || e->nconns > 0 || e->running)
	return SMTPS_ESTATE;
    if (n > 0 && (s = calloc(n, sizeof(*s))) == NULL)
	return SMTPS_ENOMEM;
    if (n == 0)
	s = NULL;
    for (i = 0; i < n; i++) {
	if (sources[i].address == NULL
	    || !smtps_resolve_literal(sources[i].address, 0, &s[i].addr)
	    || s[i].addr.ss.ss_family == AF_UNIX
	    || (sources[i].helo != NULL && check_helo(sources[i].helo) != SMTPS_OK)) {
	    snprintf(why, whylen, "source %zu: \"%.100s\" is not an IPv4 or "
		     "IPv6 address (or its HELO name is not usable)", i + 1,
		     sources[i].address ? sources[i].address : "");
	    sources_free(s, n);
	    return SMTPS_EINVAL;
	}
	s[i].address = smtps_str_copy(sources[i].address, &err);
	s[i].helo = smtps_str_copy(sources[i].helo, &err);
	/* Bound once now: an address this host does not have is an error here. */
	if ((fd = socket(s[i].addr.ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0
	    || bind(fd, (struct sockaddr *) &s[i].addr.ss, s[i].addr.len) != 0) {
	    snprintf(why, whylen, "source %.100s cannot be bound: %s",
		     sources[i].address, strerror(errno));
	    if (fd >= 0)
		close(fd);
	    sources_free(s, n);
	    return SMTPS_EINVAL;
	}
	close(fd);
    }
    if (err) {
	sources_free(s, n);
	return SMTPS_ENOMEM;
    }
    sources_free(e->sources, e->nsources);
    e->sources = s;
    e->nsources = n;
    return SMTPS_OK;
}

/* smtps_engine_new - an engine with no connection yet */

struct smtps_engine *smtps_engine_new(struct smtps_machine *m,
				              const struct smtps_engine_config *cfg,
				              void *user)
{
    struct smtps_engine_config c;
    struct smtps_engine *e;
    struct timespec ts;

    memset(&c, 0, sizeof(c));
    if (cfg != NULL) {
	if (cfg->sizeof_config < CONFIG_MIN_SIZE || cfg->sizeof_config > sizeof(c))
	    return NULL;
	memcpy(&c, cfg, cfg->sizeof_config);
    }
    if (c.max_connections < 0 || c.max_per_destination < 0
	|| c.messages_per_connection < 0 || c.idle_timeout_ms < 0
	|| c.connect_timeout_ms < 0 || c.mx_address_limit < 0
	|| c.max_tls_handshakes < 0
	|| c.mx_address_limit > SMTPS_ADDR_MAX
	|| (c.inet_protocols != SMTPS_INET_ALL && c.inet_protocols != SMTPS_INET_IPV4
	    && c.inet_protocols != SMTPS_INET_IPV6)
	|| (c.address_preference != SMTPS_INET_ALL
	    && c.address_preference != SMTPS_INET_IPV4
	    && c.address_preference != SMTPS_INET_IPV6)
	|| (c.helo != NULL && check_helo(c.helo) != SMTPS_OK))
	return NULL;
    if ((e = calloc(1, sizeof(*e))) == NULL)
	return NULL;
    if ((e->epfd = epoll_create1(EPOLL_CLOEXEC)) < 0) {
	free(e);
	return NULL;
    }
    if (smtps_wakeup_open(e) != SMTPS_OK) {
	close(e->epfd);
	free(e);
	return NULL;
    }
    e->max_conns = c.max_connections ? c.max_connections : DEF_MAX_CONNECTIONS;
    e->max_per_dest = c.max_per_destination ? c.max_per_destination :
	DEF_MAX_PER_DEST;
    e->msgs_per_conn = c.messages_per_connection;
    e->idle_ms = c.idle_timeout_ms ? c.idle_timeout_ms : DEF_IDLE_MS;
    e->connect_ms = c.connect_timeout_ms ? c.connect_timeout_ms : DEF_CONNECT_MS;
    e->mx_address_limit = c.mx_address_limit ? c.mx_address_limit :
	DEF_ADDRESS_LIMIT;
    e->inet_protocols = c.inet_protocols;
    e->address_preference = c.address_preference;
    e->tls_resume = !c.tls_no_resumption;
    e->max_tls_hs = c.max_tls_handshakes ? c.max_tls_handshakes :
	DEF_TLS_HANDSHAKES;
    /* Longer than anything can wait: cut, so that deadlines cannot overflow. */
    if (e->idle_ms > SMTPS_TIMEOUT_MAX)
	e->idle_ms = SMTPS_TIMEOUT_MAX;
    if (e->connect_ms > SMTPS_TIMEOUT_MAX)
	e->connect_ms = SMTPS_TIMEOUT_MAX;
    snprintf(e->helo, sizeof(e->helo), "%s", c.helo ? c.helo : "localhost");
    /* The system's resolver until told otherwise: resolv.conf, /etc/hosts. */
    e->dns_cfg.sizeof_config = sizeof(e->dns_cfg);
    e->dns_cfg.hosts_file = 1;
    e->dns_ms = SMTPS_DNS_TIMEOUT_MS * SMTPS_DNS_ATTEMPTS;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    e->rand = ((uint64_t) ts.tv_nsec << 20) ^ (uint64_t) ts.tv_sec
	^ (uint64_t) (uintptr_t) e;
    if (e->rand == 0)
	e->rand = 88172645463325252ULL;
    e->machine = m ? m : smtps_default_machine();
    smtps_machine_retain(e->machine);
    e->user = user;
    raise_nofile((rlim_t) e->max_conns + 64);
    return e;
}

/* smtps_engine_free - close everything; results not taken are dropped */

void    smtps_engine_free(struct smtps_engine *e)
{
    struct smtps_conn *c;
    struct smtps_dest *d;
    struct smtps_message *m;
    struct smtps_result *r;
    size_t  i;

    if (e == NULL)
	return;
    engine_bury(e);
    while ((c = e->conns) != NULL) {
	e->conns = c->next;
	smtps_conn_teardown(c);
    }
    for (i = 0; i < e->nbuckets; i++)
	while ((d = e->buckets[i]) != NULL) {
	    while ((m = smtps_dest_pop(d)) != NULL) {
		smtps_result_free(m->qresult);
		smtps_message_free(m);
	    }
	    smtps_dest_free(d);
	}
    smtps_routes_free(e);
    smtps_sts_free(&e->sts);
    smtps_tlsrpt_free(e);
    while ((r = e->results) != NULL) {
	e->results = r->next;
	smtps_result_free(r);
    }
    smtps_dns_free(e->dns);		/* after every lookup was cancelled */
    resolver_forget(&e->dns_cfg);
    smtps_rules_free(e->rules);
    sources_free(e->sources, e->nsources);
    smtps_wakeup_close(e);
    close(e->epfd);
    smtps_timers_free(&e->timers);
    free(e->buckets);
    smtps_machine_free(e->machine);
    free(e);
}

/* smtps_engine_submit - queue msg for dest; the engine owns it on OK */

int     smtps_engine_submit(struct smtps_engine *e, struct smtps_message *msg,
			            const struct smtps_destination *dest,
			            uint64_t tag)
{
    struct smtps_destination k;
    struct smtps_dest *d = NULL;
    int     rc;

    if (e == NULL || msg == NULL || dest == NULL
	|| dest->sizeof_destination < DEST_MIN_SIZE
	|| dest->sizeof_destination > sizeof(k))
	return SMTPS_EINVAL;
    /* Fields an older caller did not have read as zero. */
    memset(&k, 0, sizeof(k));
    memcpy(&k, dest, dest->sizeof_destination);
    if (smtps_dest_check_key(&k) != SMTPS_OK
	|| (k.source > 0 && (size_t) k.source > e->nsources)
	|| (k.host == NULL && k.protocol == SMTPS_PROTO_LMTP)
	|| msg->nrcpt == 0 || msg->qnext != NULL || msg->qresult != NULL)
	return SMTPS_EINVAL;
    if (k.timeout_ms > SMTPS_TIMEOUT_MAX)
	k.timeout_ms = SMTPS_TIMEOUT_MAX;	/* deadlines cannot overflow */
    /* A host the caller names needs no MX records: as good as secure. */
    if (k.host != NULL && (d = smtps_dest_get(e, &k, NULL, SMTPS_SITE_SECURE,
					       NULL)) == NULL)
	return SMTPS_ENOMEM;
    /* The result exists before the message is taken: none can be lost. */
    if ((msg->qresult = smtps_result_new(tag, msg->nrcpt)) == NULL) {
	if (d != NULL)
	    smtps_dest_dirty(d);		/* freed by the next run if empty */
	return SMTPS_ENOMEM;
    }
    msg->tag = tag;
    msg->qnext = NULL;
    if (d != NULL)
	smtps_dest_enqueue(d, msg);
    else if ((rc = smtps_route_submit(e, msg, &k)) != SMTPS_OK) {
	smtps_result_free(msg->qresult);
	msg->qresult = NULL;
	return rc;
    }
    e->npending++;
    return SMTPS_OK;
}

/* engine_dns_run - the resolver has answers: run their callbacks */

static void engine_dns_run(struct smtps_engine *e)
{
    if (e->dns != NULL)
	smtps_dns_process(e->dns);
}

/*
 * engine_loop - drive everything until a result is ready, max_wait_ms
 * passed, a wake-up came, a signal or a state interrupted; and, unless
 * forever, until nothing is pending
 */

static int engine_loop(struct smtps_engine *e, int64_t max_wait_ms, int forever)
{
    struct smtps_timer *t;
    struct smtps_conn *c;
    int64_t now, end, wait;
    uint32_t ev;
    void   *ptr;
    int     n, i, rc = SMTPS_OK, polled = 0, woken = 0;

    if (e == NULL)
	return SMTPS_EINVAL;
    if (e->running)
	return SMTPS_ESTATE;
    e->running = 1;
    now = smtps_clock_ms();
    end = max_wait_ms < 0 ? -1 : smtps_time_after(now, max_wait_ms);
    for (;;) {
	/* Deadlines first: an expired idle connection is not reused. */
	engine_timers_run(e, now);
	smtps_conn_tls_turns(e, now);		/* before new connections */
	engine_dirty_run(e, now);
	engine_bury(e);
	if (e->interrupted) {
	    e->interrupted = 0;
	    rc = SMTPS_EINTR;
	    break;
	}
	/*
	 * Even with no time to wait, look at the sockets once. A wake-up
	 * returns to the caller, who has something to hand over or wants
	 * the loop to stop (wakeup.c).
	 */
	if (e->nresults > 0 || woken || (!forever && e->npending == 0)
	    || (polled && end >= 0 && now >= end))
	    break;
	wait = end >= 0 ? (end > now ? end - now : 0) : -1;
	if ((t = smtps_timers_first(&e->timers)) != NULL
	    && (wait < 0 || t->when - now < wait))
	    wait = t->when > now ? t->when - now : 0;
	if (wait > 3600000)
	    wait = 3600000;			/* epoll_wait() takes an int */
	n = epoll_wait(e->epfd, e->events,
		       (int) (sizeof(e->events) / sizeof(e->events[0])), (int) wait);
	now = smtps_clock_ms();
	polled = 1;
	if (n < 0) {
	    /* A signal: return, so that the caller can handle it. */
	    if (errno != EINTR)
		rc = SMTPS_ESYS;
	    break;
	}
	for (i = 0; i < n; i++) {
	    ev = e->events[i].events;
	    if ((ptr = e->events[i].data.ptr) == NULL) {
		engine_dns_run(e);
		continue;
	    }
	    if (ptr == SMTPS_WAKEUP_MARK(e)) {
		smtps_wakeup_drain(e);
		woken = 1;
		continue;
	    }
	    c = ptr;
	    if (c->phase == CONN_DEAD)
		continue;
	    if (c->phase == CONN_CONNECTING) {
		smtps_conn_connect_done(c, now);
		continue;
	    }
	    if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
		smtps_conn_read(c, ev, now);
	    smtps_conn_update(c, now);
	    if (e->interrupted)
		break;				/* level-triggered: the rest waits */
	}
    }
    engine_bury(e);
    e->running = 0;
    if (rc != SMTPS_OK)
	return rc;
    return e->nresults > 0x7fffffff ? 0x7fffffff : (int) e->nresults;
}

/* smtps_engine_run - drive everything until a result is ready */

int     smtps_engine_run(struct smtps_engine *e, int64_t max_wait_ms)
{
    return engine_loop(e, max_wait_ms, 0);
}

/*
 * smtps_engine_serve - the same, but with nothing pending it goes on
 * (idle connections timed out, DNS answered) until woken or max_wait_ms
 */

int     smtps_engine_serve(struct smtps_engine *e, int64_t max_wait_ms)
{
    return engine_loop(e, max_wait_ms, 1);
}

/* smtps_engine_next_result - take the oldest ready result */

struct smtps_result *smtps_engine_next_result(struct smtps_engine *e)
{
    struct smtps_result *r;

    if (e == NULL || (r = e->results) == NULL)
	return NULL;
    e->results = r->next;
    if (e->results == NULL)
	e->results_tail = NULL;
    r->next = NULL;
    e->nresults--;
    e->npending--;
    return r;
}

/* smtps_engine_pending - messages submitted whose result was not taken */

size_t  smtps_engine_pending(const struct smtps_engine *e)
{
    return e ? e->npending : 0;
}

/* smtps_engine_connections - connections open or opening now */

size_t  smtps_engine_connections(const struct smtps_engine *e)
{
    return e ? e->nconns : 0;
}

/* smtps_engine_set_trace - the transcript function of new sessions */

int     smtps_engine_set_trace(struct smtps_engine *e, SMTPSTrace fn,
			               void *closure)
{
    if (e == NULL)
	return SMTPS_EINVAL;
    e->trace = fn;
    e->trace_closure = fn != NULL ? closure : NULL;
    return SMTPS_OK;
}
