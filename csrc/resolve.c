/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	resolve.c 3
 * SUMMARY
 *	DNS for the engine: libunbound, asynchronous, watched by epoll
 * SYNOPSIS
 *	#include "engine_private.h"
 *
 *	int	smtps_resolve_literal(host, port, addr)
 *
 *	struct smtps_dns *smtps_dns_new(cfg, timers, deadline_ms, why, whylen)
 *	int	smtps_dns_fd(dns)
 *	int	smtps_dns_query(dns, name, rrtype, priority, req)
 *	void	smtps_dns_cancel(dns, req)
 *	void	smtps_dns_process(dns)
 *	void	smtps_dns_timer(timer, now)
 *	void	smtps_dns_free(dns)
 *
 *	size_t	smtps_dns_mx(answer, mx, max)
 *	size_t	smtps_dns_addresses(answer, port, addr, max)
 *	int	smtps_dns_tlsa(answer, &recs, &n, &seen)
 *	void	smtps_tlsa_free(recs, n)
 *	int	smtps_tlsa_copy(recs, n, &out)
 * DESCRIPTION
 *	Every name the engine looks up goes through one libunbound context
 *	per engine: it caches answers for their TTLs, asks the name servers
 *	it was given (or those of resolv.conf), answers names in /etc/hosts
 *	and local records itself, and validates DNSSEC once it has a trust
 *	anchor. Queries are asynchronous: libunbound's own thread does the
 *	network work, and its answers wait behind a descriptor that the
 *	engine's epoll set watches; smtps_dns_process() then runs the
 *	callbacks, in the engine's thread. Nothing here parses DNS messages:
 *	libunbound hands over each record's data, and an MX exchange name is
 *	expanded by the C library's dn_expand().
 *
 *	smtps_dns_new() makes a context from a resolver configuration:
 *	name servers "ip" or "ip@port" (forwarders, asked with recursion
 *	desired; an authoritative server answers for its own zones),
 *	/etc/hosts, trust anchors (DS or DNSKEY records), local records
 *	(zone-file lines answered without asking anyone). Name servers on
 *	loopback are allowed (libunbound refuses them by default), and
 *	names the caller's own servers may serve ("test", "home.arpa") are
 *	asked of them rather than answered NXDOMAIN by libunbound. Its
 *	deadlines live in the engine's timer heap, timers (NULL: a context
 *	made only to try the settings, which must not be asked anything).
 *
 *	smtps_dns_query() asks for a lookup for req, a record the caller
 *	owns (embedded in what waits for the answer) with its done and arg
 *	set, and a name that lives until the answer: req->done(req->arg,
 *	answer) runs once, from smtps_dns_process() or smtps_dns_timer(),
 *	unless smtps_dns_cancel() came first; req->active says it has not
 *	run yet, and req must not be freed while it is.
 *
 *	At most max_in_flight lookups (default 100) are sent at once; the
 *	others wait in a queue per priority, addresses of MX hosts
 *	(SMTPS_DNS_URGENT: a connection waits for them) before MX records
 *	(SMTPS_DNS_ROUTINE), each in the order asked. Without the limit, a
 *	thousand new domains at once would be a thousand queries at the
 *	name servers, and the address lookups that would let the first
 *	connections start would wait behind all of them. A lookup's
 *	deadline (timeout times attempts) runs from when it is sent: the
 *	lookups in flight are kept oldest first, so the oldest one's
 *	deadline is the resolver's one timer in the engine's heap; at
 *	expiry the lookup is cancelled and answered TEMPFAIL "timed out".
 *	A lookup libunbound refuses when its turn comes is answered
 *	TEMPFAIL from that timer too, not in the middle of whatever freed
 *	its place.
 *	The answer's status says what the caller decides on: OK (records),
 *	NODATA (the name exists, not this type), NXDOMAIN, BOGUS (DNSSEC
 *	validation failed) or TEMPFAIL (SERVFAIL, REFUSED, no server
 *	answered, an error in libunbound).
 *
 *	smtps_dns_mx() decodes MX records (preference and exchange, lower
 *	case, without the final dot); smtps_dns_addresses() turns A or AAAA
 *	records into socket addresses with the given port; smtps_dns_tlsa()
 *	keeps the TLSA records SMTP may use (RFC 7672 3: DANE-TA and
 *	DANE-EE, selectors 0 and 1, matching types 0, 1 and 2, of a length
 *	that fits) and says how many there were (records present but none
 *	usable mean "encrypt, do not authenticate", RFC 7672 2.2).
 *
 *	smtps_resolve_literal() needs no lookup: it parses an IPv4 or IPv6
 *	literal (brackets allowed, "[::1]") with AI_NUMERICHOST, which never
 *	touches the network, or "unix:/path" for a unix-domain socket. It
 *	returns 1 for a literal, 0 for a name.
 *
 *	libunbound starts its thread at the first query, and a new thread
 *	inherits the signal mask of its creator: every query is made with
 *	all signals blocked, so that Ctrl-C is always delivered to the
 *	application's own threads (Python handles it in its main thread).
 * DIAGNOSTICS
 *	smtps_dns_new() returns NULL and says why in why[] for a setting
 *	libunbound refuses or when memory or a thread is not available.
 *	smtps_dns_query() returns SMTPS_OK, SMTPS_EINVAL for a name
 *	libunbound refuses, SMTPS_ESYS when libunbound cannot run.
 * SEE ALSO
 *	engine.c, route.c; libunbound(3), dn_expand(3).
 *--*/

#include <errno.h>
#include <netdb.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <arpa/inet.h>
#include <arpa/nameser.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <resolv.h>
#include <sys/un.h>
#include <unbound.h>

#include "internal.h"
#include "engine_private.h"

#define DNS_RCODE_SERVFAIL 2
#define DNS_RCODE_NXDOMAIN 3
#define SMTPS_DNS_IN_FLIGHT 100	/* lookups sent at once, by default */

/* Where a lookup is: the resolver's lists. */
enum dns_list_id {
    DNS_QUEUED,				/* + priority: waiting to be sent */
    DNS_SENT = DNS_QUEUED + SMTPS_DNS_PRIORITIES,	/* oldest first */
    DNS_UNSENT,				/* libunbound refused: done() to run */
    DNS_LISTS
};

struct dns_list {
    struct smtps_dns_req *head, *tail;
};

struct smtps_dns {
    struct ub_ctx *ctx;
    struct smtps_timer_heap *timers;	/* the engine's */
    struct smtps_timer timer;		/* the oldest lookup's deadline */
    int64_t deadline_ms;		/* a lookup's, from when it is sent */
    size_t  max_sent;			/* lookups in flight at once */
    int     dnssec;			/* SMTPS_DNSSEC_* */
    size_t  nsent;
    struct dns_list lists[DNS_LISTS];
};

static const char *const private_zones[] = {
    "test. transparent",
    "home.arpa. transparent",
};

/*
 * The root zone's trust anchors (IANA, data.iana.org/root-anchors): the
 * DS records of KSK-2017 (tag 20326) and KSK-2024 (tag 38696), both in
 * force while the root rolls over to the latter.
 */
static const char *const root_anchors[] = {
    ". IN DS 20326 8 2 E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D",
    ". IN DS 38696 8 2 683D2D0ACB8C9B712A1948B27F741219298D0A450D612C483AF444A4C0FB2B16",
};

/*
 * Names no public zone delegates (RFC 6761, RFC 8375): the root's
 * signed denial would make them bogus, so they are taken as unsigned
 * under the root's anchors (an anchor given for one of them still
 * counts: unbound lets trust anchors override domain-insecure).
 */
static const char *const insecure_zones[] = {
    "test.", "home.arpa.", "localhost.", "invalid.", "local.",
};

#define DNS_PROBE_MS 3000		/* the root's keys, at most this long */

static void dns_callback(void *mydata, int err, struct ub_result *result);

/* dns_fail - smtps_dns_new() gives up, saying why */

static struct smtps_dns *dns_fail(struct smtps_dns *dns, char *why,
				          size_t whylen, const char *what,
				          const char *value, int err)
{
    if (why != NULL && whylen > 0)
	snprintf(why, whylen, "%s%s%s%s: %s", what, value ? " \"" : "",
		 value ? value : "", value ? "\"" : "", ub_strerror(err));
    smtps_dns_free(dns);
    return NULL;
}

/* dns_make - a libunbound context with the caller's settings; root: its anchors */

static struct smtps_dns *dns_make(const struct smtps_resolver_config *cfg,
				          struct smtps_timer_heap *timers,
				          int64_t deadline_ms, int root,
				          char *why, size_t whylen)
{
    struct smtps_dns *dns;
    size_t  i;
    int     rc;

    if ((dns = calloc(1, sizeof(*dns))) == NULL
	|| (dns->ctx = ub_ctx_create()) == NULL) {
	free(dns);
	if (why != NULL && whylen > 0)
	    snprintf(why, whylen, "cannot start the resolver: out of memory");
	return NULL;
    }
    dns->timers = timers;
    dns->deadline_ms = deadline_ms;
    smtps_timer_init(&dns->timer, TIMER_DNS);
    /* (cfg is the engine's own full-size copy.) */
    dns->max_sent = cfg != NULL && cfg->max_in_flight > 0 ?
	(size_t) cfg->max_in_flight : SMTPS_DNS_IN_FLIGHT;
    /* A thread, not a forked process: fork() is no friend of Python. */
    if ((rc = ub_ctx_async(dns->ctx, 1)) != 0)
	return dns_fail(dns, why, whylen, "threads", NULL, rc);
    /* Test and site resolvers live on loopback: let them be asked. */
    if ((rc = ub_ctx_set_option(dns->ctx, "do-not-query-localhost:", "no")) != 0)
	return dns_fail(dns, why, whylen, "do-not-query-localhost", NULL, rc);
    if (cfg == NULL || cfg->nameservers_count == 0) {
	if ((rc = ub_ctx_resolvconf(dns->ctx, NULL)) != 0)
	    return dns_fail(dns, why, whylen, "resolv.conf", NULL, rc);
    } else {
	for (i = 0; i < cfg->nameservers_count; i++)
	    if ((rc = ub_ctx_set_fwd(dns->ctx, cfg->nameservers[i])) != 0)
		return dns_fail(dns, why, whylen, "name server",
				cfg->nameservers[i], rc);
	/*
	 * Names the caller's own servers may well serve (RFC 6761 "test",
	 * RFC 8375 "home.arpa"): asked of them too, not answered "no such
	 * domain" by libunbound's defaults.
	 */
	for (i = 0; i < sizeof(private_zones) / sizeof(private_zones[0]); i++)
	    if ((rc = ub_ctx_set_option(dns->ctx, "local-zone:",
					private_zones[i])) != 0)
		return dns_fail(dns, why, whylen, "local zone",
				private_zones[i], rc);
    }
    if (cfg != NULL && cfg->hosts_file
	&& (rc = ub_ctx_hosts(dns->ctx, NULL)) != 0)
	return dns_fail(dns, why, whylen, "/etc/hosts", NULL, rc);
    for (i = 0; cfg != NULL && !cfg->no_dnssec && i < cfg->trust_anchors_count; i++)
	if ((rc = ub_ctx_add_ta(dns->ctx, cfg->trust_anchors[i])) != 0)
	    return dns_fail(dns, why, whylen, "trust anchor",
			    cfg->trust_anchors[i], rc);
    for (i = 0; root && i < sizeof(root_anchors) / sizeof(root_anchors[0]); i++)
	if ((rc = ub_ctx_add_ta(dns->ctx, root_anchors[i])) != 0)
	    return dns_fail(dns, why, whylen, "trust anchor", root_anchors[i], rc);
    for (i = 0; i < sizeof(insecure_zones) / sizeof(insecure_zones[0]); i++)
	if (!(cfg != NULL && cfg->no_dnssec)
	    && (rc = ub_ctx_set_option(dns->ctx, "domain-insecure:",
				       insecure_zones[i])) != 0)
	    return dns_fail(dns, why, whylen, "insecure zone", insecure_zones[i], rc);
    dns->dnssec = (cfg != NULL && cfg->no_dnssec) || (!root && (cfg == NULL
				|| cfg->trust_anchors_count == 0)) ?
	SMTPS_DNSSEC_OFF : SMTPS_DNSSEC_ON;
    for (i = 0; cfg != NULL && i < cfg->local_data_count; i++)
	if ((rc = ub_ctx_data_add(dns->ctx, cfg->local_data[i])) != 0)
	    return dns_fail(dns, why, whylen, "local record",
			    cfg->local_data[i], rc);
    return dns;
}

/*
 * dns_strips_dnssec - the name servers' answer for the root's keys fails
 * validation: they strip DNSSEC (no signatures), and under the root's
 * anchors every answer would be bogus. No answer in time proves nothing.
 */

static int dns_strips_dnssec(struct smtps_dns *dns, int64_t timeout_ms)
{
    struct smtps_dns_answer a;
    int     stripped;

    if (smtps_dns_lookup(dns, ".", ns_t_dnskey, timeout_ms < DNS_PROBE_MS ?
			 timeout_ms : DNS_PROBE_MS, &a) != SMTPS_OK)
	return 0;
    stripped = a.status == SMTPS_DNS_BOGUS;
    ub_resolve_free(a.ub);
    return stripped;
}

/*
 * smtps_dns_new - a libunbound context with the caller's settings. With
 * neither trust anchors nor no_dnssec, the root's anchors validate; a
 * context that will be asked (deadline_ms > 0) first asks for the root's
 * keys, at most DNS_PROBE_MS, and when the name servers turn out to
 * strip DNSSEC it is made again without them: mail must still flow
 * through such a resolver, without DANE (SMTPS_DNSSEC_STRIPPED says so).
 */

struct smtps_dns *smtps_dns_new(const struct smtps_resolver_config *cfg,
				        struct smtps_timer_heap *timers,
				        int64_t deadline_ms,
				        char *why, size_t whylen)
{
    struct smtps_dns *dns;
    int     root = cfg == NULL || (!cfg->no_dnssec && cfg->trust_anchors_count == 0);

    if ((dns = dns_make(cfg, timers, deadline_ms, root, why, whylen)) == NULL
	|| !root || deadline_ms <= 0 || !dns_strips_dnssec(dns, deadline_ms))
	return dns;
    smtps_dns_free(dns);
    if ((dns = dns_make(cfg, timers, deadline_ms, 0, why, whylen)) != NULL)
	dns->dnssec = SMTPS_DNSSEC_STRIPPED;
    return dns;
}

/* smtps_dns_dnssec - SMTPS_DNSSEC_*: what this context validates */

int     smtps_dns_dnssec(const struct smtps_dns *dns)
{
    return dns->dnssec;
}

/* smtps_dns_fd - readable when answers wait for smtps_dns_process() */

int     smtps_dns_fd(const struct smtps_dns *dns)
{
    return ub_fd(dns->ctx);
}

/* dns_append - req to the end of one of the resolver's lists */

static void dns_append(struct smtps_dns *dns, int id, struct smtps_dns_req *req)
{
    struct dns_list *l = &dns->lists[id];

    req->list = id;
    req->next = NULL;
    req->prev = l->tail;
    if (l->tail != NULL)
	l->tail->next = req;
    else
	l->head = req;
    l->tail = req;
}

/* dns_remove - req off the list it is on */

static void dns_remove(struct smtps_dns *dns, struct smtps_dns_req *req)
{
    struct dns_list *l = &dns->lists[req->list];

    if (req->prev != NULL)
	req->prev->next = req->next;
    else
	l->head = req->next;
    if (req->next != NULL)
	req->next->prev = req->prev;
    else
	l->tail = req->prev;
    req->prev = req->next = NULL;
    if (req->list == DNS_SENT)
	dns->nsent--;
}

/* dns_rearm - the timer at the next thing due: a refusal, a deadline */

static void dns_rearm(struct smtps_dns *dns)
{
    struct smtps_dns_req *oldest = dns->lists[DNS_SENT].head;

    if (dns->timers == NULL)
	return;
    if (dns->lists[DNS_UNSENT].head != NULL)
	smtps_timer_set(dns->timers, &dns->timer, smtps_clock_ms());
    else if (oldest != NULL)
	smtps_timer_set(dns->timers, &dns->timer,
			smtps_time_after(oldest->sent_at, dns->deadline_ms));
    else
	smtps_timer_cancel(dns->timers, &dns->timer);
}

/* dns_send - hand req to libunbound */

static int dns_send(struct smtps_dns *dns, struct smtps_dns_req *req)
{
    sigset_t all, old;
    int     rc;

    /* The first query starts libunbound's thread: it must inherit this. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    rc = ub_resolve_async(dns->ctx, req->name, req->rrtype, 1 /* IN */ , req,
			  dns_callback, &req->id);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0)
	return rc == UB_SYNTAX ? SMTPS_EINVAL : rc == UB_NOMEM ?
	    SMTPS_ENOMEM : SMTPS_ESYS;
    req->sent_at = smtps_clock_ms();
    dns_append(dns, DNS_SENT, req);
    dns->nsent++;
    return SMTPS_OK;
}

/*
 * dns_send_queued - send what waits while there is room, the urgent
 * first; one libunbound refuses is answered from the timer, not here,
 * where the caller may be in the middle of something
 */

static void dns_send_queued(struct smtps_dns *dns)
{
    struct smtps_dns_req *req;
    int     p;

    for (p = 0; p < SMTPS_DNS_PRIORITIES && dns->nsent < dns->max_sent; p++)
	while (dns->nsent < dns->max_sent
	       && (req = dns->lists[DNS_QUEUED + p].head) != NULL) {
	    dns_remove(dns, req);
	    if ((req->err = dns_send(dns, req)) != SMTPS_OK)
		dns_append(dns, DNS_UNSENT, req);
	}
    dns_rearm(dns);
}

/* dns_queue_empty - nothing waits to be sent */

static int dns_queue_empty(const struct smtps_dns *dns)
{
    int     p;

    for (p = 0; p < SMTPS_DNS_PRIORITIES; p++)
	if (dns->lists[DNS_QUEUED + p].head != NULL)
	    return 0;
    return 1;
}

/* smtps_dns_query - look up name's rrtype records for req */

int     smtps_dns_query(struct smtps_dns *dns, const char *name, int rrtype,
			        int priority, struct smtps_dns_req *req)
{
    int     rc;

    if (req->active)
	return SMTPS_ESTATE;
    if (priority < 0 || priority >= SMTPS_DNS_PRIORITIES)
	return SMTPS_EINVAL;
    req->dns = dns;
    req->name = name;
    req->rrtype = rrtype;
    req->active = 1;
    /* Room, and nothing ahead of it: sent now, and a refusal said now. */
    if (dns->nsent < dns->max_sent && dns_queue_empty(dns)) {
	if ((rc = dns_send(dns, req)) != SMTPS_OK) {
	    req->active = 0;
	    return rc;
	}
	dns_rearm(dns);
	return SMTPS_OK;
    }
    dns_append(dns, DNS_QUEUED + priority, req);
    return SMTPS_OK;
}

/* smtps_dns_cancel - forget req's lookup: its done() will not run */

void    smtps_dns_cancel(struct smtps_dns *dns, struct smtps_dns_req *req)
{
    int     sent;

    if (!req->active)
	return;
    req->active = 0;
    if (dns == NULL)
	return;
    sent = req->list == DNS_SENT;
    dns_remove(dns, req);
    if (sent)
	(void) ub_cancel(dns->ctx, req->id);
    dns_send_queued(dns);
}

/* req_fail - req's done() with a failure for now of its own */

static void req_fail(struct smtps_dns_req *req, const char *why)
{
    struct smtps_dns_answer a;

    memset(&a, 0, sizeof(a));
    a.status = SMTPS_DNS_TEMPFAIL;
    a.why = why;
    req->active = 0;
    req->done(req->arg, &a);
}

/* dns_callback - one answer, in smtps_dns_process() */

static void dns_callback(void *mydata, int err, struct ub_result *result)
{
    struct smtps_dns_req *req = mydata;
    struct smtps_dns_answer a;

    memset(&a, 0, sizeof(a));
    a.ub = result;
    if (err != 0 || result == NULL) {
	a.status = SMTPS_DNS_TEMPFAIL;
	a.why = ub_strerror(err);
    } else if (result->bogus) {
	a.status = SMTPS_DNS_BOGUS;
	a.why = result->why_bogus ? result->why_bogus : "DNSSEC validation failed";
    } else if (result->havedata) {
	a.status = SMTPS_DNS_OK;
    } else if (result->rcode == DNS_RCODE_NXDOMAIN || result->nxdomain) {
	a.status = SMTPS_DNS_NXDOMAIN;
	a.why = "no such domain (NXDOMAIN)";
    } else if (result->rcode == 0) {
	a.status = SMTPS_DNS_NODATA;
	a.why = "no records of that type";
    } else {
	a.status = SMTPS_DNS_TEMPFAIL;
	a.why = result->rcode == DNS_RCODE_SERVFAIL ? "server failure (SERVFAIL)"
	    : "the name servers gave no usable answer";
    }
    if (result != NULL) {
	a.secure = result->secure;
	a.ttl = result->ttl;
    }
    /* Off the list first: done() may ask for more. (req knows its list.) */
    dns_remove(req->dns, req);
    req->active = 0;
    req->done(req->arg, &a);
    ub_resolve_free(result);
}

/* One blocking lookup's answer, handed over by whichever thread ran it. */
struct dns_wait {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int     done;
    int     err;
    struct ub_result *result;
};

/* dns_wait_done - libunbound's callback: the answer, to its waiter */

static void dns_wait_done(void *arg, int err, struct ub_result *result)
{
    struct dns_wait *w = arg;

    pthread_mutex_lock(&w->lock);
    w->err = err;
    w->result = result;
    w->done = 1;
    pthread_cond_signal(&w->cond);		/* before unlocking: w may go */
    pthread_mutex_unlock(&w->lock);
}

/* dns_wait_over - 1 once w has its answer */

static int dns_wait_over(struct dns_wait *w)
{
    int     done;

    pthread_mutex_lock(&w->lock);
    done = w->done;
    pthread_mutex_unlock(&w->lock);
    return done;
}

/*
 * smtps_dns_lookup - one lookup that blocks the calling thread for at
 * most timeout_ms, for the caller's own threads (smtpstate's MTA-STS
 * discovery), never for the engine's loop; a->ub is the caller's to free
 * with ub_resolve_free(). libunbound's own blocking call has no deadline
 * of ours (it retries a silent server for many seconds), so the lookup is
 * asynchronous: the thread waits on the context's descriptor in short
 * slices, running whatever answers arrived, its own or other threads'
 * (each goes to its waiter), and cancels its lookup at the deadline.
 */

int     smtps_dns_lookup(struct smtps_dns *dns, const char *name, int rrtype,
			         int64_t timeout_ms, struct smtps_dns_answer *a)
{
    struct dns_wait w;
    struct ub_result *result;
    struct pollfd pfd;
    sigset_t all, old;
    int64_t deadline = smtps_time_after(smtps_clock_ms(), timeout_ms), left;
    int     id, err, canceled = 0;

    memset(a, 0, sizeof(*a));
    memset(&w, 0, sizeof(w));
    pthread_mutex_init(&w.lock, NULL);
    pthread_cond_init(&w.cond, NULL);
    /* A first query starts libunbound's thread, as in dns_send(). */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    err = ub_resolve_async(dns->ctx, name, rrtype, 1 /* IN */ , &w,
			   dns_wait_done, &id);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err != 0) {
	w.done = 1;
	w.err = err;
    }
    while (!dns_wait_over(&w)) {
	if ((left = deadline - smtps_clock_ms()) <= 0) {
	    if (ub_cancel(dns->ctx, id) == 0) {
		canceled = 1;			/* its callback will not run */
		break;
	    }
	    /* Being answered in another thread right now: it will be done. */
	    pthread_mutex_lock(&w.lock);
	    while (!w.done)
		pthread_cond_wait(&w.cond, &w.lock);
	    pthread_mutex_unlock(&w.lock);
	    break;
	}
	pfd.fd = ub_fd(dns->ctx);
	pfd.events = POLLIN;
	if (poll(&pfd, 1, (int) (left < 20 ? left : 20)) > 0)
	    (void) ub_process(dns->ctx);
    }
    pthread_mutex_destroy(&w.lock);
    pthread_cond_destroy(&w.cond);
    if (canceled) {
	a->status = SMTPS_DNS_TEMPFAIL;
	a->why = "no answer in time";
	return SMTPS_OK;
    }
    result = w.result;
    a->ub = result;
    if (w.err != 0 || result == NULL) {
	a->status = SMTPS_DNS_TEMPFAIL;
	a->why = ub_strerror(w.err);
	return w.err == UB_SYNTAX ? SMTPS_EINVAL : SMTPS_OK;
    }
    a->secure = result->secure;
    a->ttl = result->ttl;
    if (result->bogus)
	a->status = SMTPS_DNS_BOGUS;
    else if (result->havedata)
	a->status = SMTPS_DNS_OK;
    else if (result->rcode == DNS_RCODE_NXDOMAIN || result->nxdomain)
	a->status = SMTPS_DNS_NXDOMAIN;
    else if (result->rcode == 0)
	a->status = SMTPS_DNS_NODATA;
    else
	a->status = SMTPS_DNS_TEMPFAIL;
    return SMTPS_OK;
}

/* smtps_dns_process - run the callbacks of the answers that arrived */

void    smtps_dns_process(struct smtps_dns *dns)
{
    (void) ub_process(dns->ctx);
    dns_send_queued(dns);
}

/*
 * smtps_dns_timer - lookups sent longest ago that ran out of time fail
 * for now, as do those libunbound would not take
 */

void    smtps_dns_timer(struct smtps_timer *t, int64_t now)
{
    struct smtps_dns *dns = (struct smtps_dns *)
	((char *) t - offsetof(struct smtps_dns, timer));
    struct smtps_dns_req *req;

    while ((req = dns->lists[DNS_UNSENT].head) != NULL) {
	dns_remove(dns, req);
	req_fail(req, smtps_strerror(req->err));
    }
    while ((req = dns->lists[DNS_SENT].head) != NULL
	   && smtps_time_after(req->sent_at, dns->deadline_ms) <= now) {
	dns_remove(dns, req);
	(void) ub_cancel(dns->ctx, req->id);
	req_fail(req, "timed out");
    }
    dns_send_queued(dns);
}

/* smtps_dns_free - stop libunbound's thread, drop what is in flight */

void    smtps_dns_free(struct smtps_dns *dns)
{
    if (dns == NULL)
	return;
    if (dns->timers != NULL)
	smtps_timer_cancel(dns->timers, &dns->timer);
    if (dns->ctx != NULL)
	ub_ctx_delete(dns->ctx);
    free(dns);
}

/* smtps_dns_mx - the MX records of an answer: preference and exchange */

size_t  smtps_dns_mx(const struct smtps_dns_answer *a, struct smtps_mx *mx,
		             size_t max)
{
    const unsigned char *rd;
    char    name[NS_MAXDNAME];
    size_t  n = 0, len, i;
    int     k;

    if (a->status != SMTPS_DNS_OK || a->ub == NULL)
	return 0;
    for (k = 0; a->ub->data[k] != NULL && n < max; k++) {
	rd = (const unsigned char *) a->ub->data[k];
	if (a->ub->len[k] < 3)
	    continue;
	/* The exchange is not compressed in record data libunbound gives. */
	if (dn_expand(rd, rd + a->ub->len[k], rd + 2, name, sizeof(name)) < 0)
	    continue;
	len = strlen(name);
	if (len > 0 && name[len - 1] == '.')
	    name[--len] = 0;
	if (len > SMTPS_HOST_NAME_MAX)
	    continue;
	for (i = 0; i < len; i++)
	    if (name[i] >= 'A' && name[i] <= 'Z')
		name[i] = (char) (name[i] - 'A' + 'a');
	mx[n].pref = (rd[0] << 8) | rd[1];
	memcpy(mx[n].name, name, len + 1);
	n++;
    }
    return n;
}

/* smtps_tlsa_free - records made by smtps_dns_tlsa() (or copied) */

void    smtps_tlsa_free(struct smtps_tlsa *recs, size_t n)
{
    size_t  i;

    for (i = 0; recs != NULL && i < n; i++)
	free(recs[i].data);
    free(recs);
}

/* smtps_tlsa_copy - a copy of n records in *out (NULL for none); SMTPS_ENOMEM */

int     smtps_tlsa_copy(const struct smtps_tlsa *recs, size_t n,
			        struct smtps_tlsa **out)
{
    struct smtps_tlsa *copy;
    size_t  i;

    *out = NULL;
    if (n == 0)
	return SMTPS_OK;
    if ((copy = calloc(n, sizeof(*copy))) == NULL)
	return SMTPS_ENOMEM;
    for (i = 0; i < n; i++) {
	copy[i] = recs[i];
	if ((copy[i].data = malloc(recs[i].len > 0 ? recs[i].len : 1)) == NULL) {
	    smtps_tlsa_free(copy, i);
	    return SMTPS_ENOMEM;
	}
	memcpy(copy[i].data, recs[i].data, recs[i].len);
    }
    *out = copy;
    return SMTPS_OK;
}

/* tlsa_usable - a record RFC 7672 lets SMTP use (3.1, 3.2) */

static int tlsa_usable(unsigned usage, unsigned selector, unsigned mtype,
		               size_t len)
{
    if ((usage != 2 && usage != 3) || selector > 1)
	return 0;
    switch (mtype) {
    case 0:
	return len > 0;				/* the whole certificate or key */
    case 1:
	return len == 32;			/* SHA2-256 */
    case 2:
	return len == 64;			/* SHA2-512 */
    default:
	return 0;
    }
}

/*
 * smtps_dns_tlsa - the usable TLSA records of an answer (DANE-TA and
 * DANE-EE, known selectors and matching types, of the right length);
 * *seen: how many records there were in all. SMTPS_ENOMEM, or SMTPS_OK.
 */

int     smtps_dns_tlsa(const struct smtps_dns_answer *a, struct smtps_tlsa **out,
		               size_t *n, size_t *seen)
{
    const unsigned char *rd;
    struct smtps_tlsa *recs = NULL, *r;
    size_t  len, count = 0, k;

    *out = NULL;
    *n = *seen = 0;
    if (a->status != SMTPS_DNS_OK || a->ub == NULL)
	return SMTPS_OK;
    while (a->ub->data[count] != NULL)
	count++;
    *seen = count;
    if (count == 0 || (recs = calloc(count, sizeof(*recs))) == NULL)
	return count == 0 ? SMTPS_OK : SMTPS_ENOMEM;
    for (k = 0; k < count; k++) {
	rd = (const unsigned char *) a->ub->data[k];
	if (a->ub->len[k] < 3)
	    continue;
	len = (size_t) a->ub->len[k] - 3;
	if (!tlsa_usable(rd[0], rd[1], rd[2], len))
	    continue;
	r = &recs[*n];
	if ((r->data = malloc(len)) == NULL) {
	    smtps_tlsa_free(recs, *n);
	    *n = 0;
	    return SMTPS_ENOMEM;
	}
	memcpy(r->data, rd + 3, len);
	r->len = len;
	r->usage = rd[0];
	r->selector = rd[1];
	r->mtype = rd[2];
	(*n)++;
    }
    if (*n == 0) {
	free(recs);
	recs = NULL;
    }
    *out = recs;
    return SMTPS_OK;
}

/* smtps_dns_addresses - A or AAAA records as socket addresses */

size_t  smtps_dns_addresses(const struct smtps_dns_answer *a, int port,
			            struct smtps_sockaddr *addr, size_t max)
{
    struct sockaddr_in *in;
    struct sockaddr_in6 *in6;
    size_t  n = 0;
    int     k;

    if (a->status != SMTPS_DNS_OK || a->ub == NULL)
	return 0;
    for (k = 0; a->ub->data[k] != NULL && n < max; k++) {
	memset(&addr[n], 0, sizeof(addr[n]));
	if (a->ub->qtype == ns_t_a && a->ub->len[k] == 4) {
	    in = (struct sockaddr_in *) &addr[n].ss;
	    in->sin_family = AF_INET;
	    in->sin_port = htons((uint16_t) port);
	    memcpy(&in->sin_addr, a->ub->data[k], 4);
	    addr[n++].len = sizeof(*in);
	} else if (a->ub->qtype == ns_t_aaaa && a->ub->len[k] == 16) {
	    in6 = (struct sockaddr_in6 *) &addr[n].ss;
	    in6->sin6_family = AF_INET6;
	    in6->sin6_port = htons((uint16_t) port);
	    memcpy(&in6->sin6_addr, a->ub->data[k], 16);
	    addr[n++].len = sizeof(*in6);
	}
    }
    return n;
}

/* smtps_resolve_literal - parse an address literal; 1 if it was one */

int     smtps_resolve_literal(const char *host, int port,
			              struct smtps_sockaddr *addr)
{
    struct addrinfo hints, *ai = NULL;
    struct sockaddr_un *un;
    char    buf[256], service[16];
    size_t  len = strlen(host);
    int     rc;

    /* "unix:/path": a local socket (LMTP servers listen on these). */
    if (strncmp(host, "unix:", 5) == 0) {
	un = (struct sockaddr_un *) &addr->ss;
	if (len - 5 == 0 || len - 5 >= sizeof(un->sun_path))
	    return 0;
	memset(addr, 0, sizeof(*addr));
	un->sun_family = AF_UNIX;
	memcpy(un->sun_path, host + 5, len - 5 + 1);
	addr->len = (socklen_t) (offsetof(struct sockaddr_un, sun_path) + len - 5 + 1);
	return 1;
    }
    /* "[2001:db8::1]", as in URLs; "[IPv6:2001:db8::1]" (RFC 5321 4.1.3). */
    if (len >= 2 && host[0] == '[' && host[len - 1] == ']') {
	if (len - 2 >= sizeof(buf))
	    return 0;
	memcpy(buf, host + 1, len - 2);
	buf[len - 2] = 0;
	host = strncasecmp(buf, "IPv6:", 5) == 0 ? buf + 5 : buf;
    }
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
    snprintf(service, sizeof(service), "%d", port);
    if ((rc = getaddrinfo(host, service, &hints, &ai)) != 0 || ai == NULL)
	return 0;
    rc = 0;
    if (ai->ai_addrlen <= sizeof(addr->ss)
	&& (ai->ai_family == AF_INET || ai->ai_family == AF_INET6)) {
	memcpy(&addr->ss, ai->ai_addr, ai->ai_addrlen);
	addr->len = ai->ai_addrlen;
	rc = 1;
    }
    freeaddrinfo(ai);
    return rc;
}
