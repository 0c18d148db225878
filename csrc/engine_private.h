/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	engine_private.h 3h
 * SUMMARY
 *	the engine's own modules and the objects they share
 * SYNOPSIS
 *	#include "engine_private.h"
 * DESCRIPTION
 *	Declarations shared by the engine's files, never seen by cffi and
 *	not public API:
 *
 *	engine.c	the entry points: make, configure, submit, run, free;
 *	dest.c		destinations: their table, queues, addresses,
 *			fallback, back-off and dispatch;
 *	conn.c		connections: sockets and the sessions on them;
 *	route.c		recipient domains to destinations by their MX
 *			records, and messages split over several;
 *	limits.c	traffic shaping rules and rates;
 *	resolve.c	DNS (libunbound): lookups in a window, deadlines;
 *	sts.c		MTA-STS policies the caller gives, by domain;
 *	timers.c	every deadline, in one heap.
 *
 *	Every deadline of an engine (connect timeouts, session deadlines,
 *	idle timeouts, DNS deadlines, back-off and rate waits, cache
 *	expiries) lives in one binary min-heap of struct smtps_timer,
 *	embedded in the object that owns it. Room is reserved when an owner
 *	is made, so that arming a timer never allocates and never fails.
 * SEE ALSO
 *	engine.c, dest.c, conn.c, route.c, limits.c, resolve.c, sts.c,
 *	timers.c.
 *--*/

#ifndef SMTPS_ENGINE_PRIVATE_H
#define SMTPS_ENGINE_PRIVATE_H

#include <stddef.h>
#include <stdint.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include "internal.h"

/* ------------------------------------------------------------------ */
/* timers.c                                                            */
/* ------------------------------------------------------------------ */

#define SMTPS_TIMER_UNARMED ((size_t) -1)

struct smtps_timer {
    int64_t when;			/* absolute ms on the engine's clock */
    size_t  index;			/* slot in the heap, or SMTPS_TIMER_UNARMED */
    int     kind;			/* what embeds it: enum timer_kind */
};

struct smtps_timer_heap {
    struct smtps_timer **slot;		/* slot[0] is the earliest */
    size_t  count;
    size_t  cap;
};

void    smtps_timer_init(struct smtps_timer *t, int kind);
void    smtps_timers_free(struct smtps_timer_heap *h);
int     smtps_timers_reserve(struct smtps_timer_heap *h, size_t n);
void    smtps_timer_set(struct smtps_timer_heap *h, struct smtps_timer *t,
			        int64_t when);
void    smtps_timer_cancel(struct smtps_timer_heap *h, struct smtps_timer *t);
struct smtps_timer *smtps_timers_first(const struct smtps_timer_heap *h);

/* ------------------------------------------------------------------ */
/* resolve.c                                                           */
/* ------------------------------------------------------------------ */

#define SMTPS_HOST_NAME_MAX 253		/* a domain name, without the last dot */

struct smtps_sockaddr {
    struct sockaddr_storage ss;
    socklen_t len;
};

struct smtps_mx {
    int     pref;
    char    name[SMTPS_HOST_NAME_MAX + 1];	/* lower case, no final dot */
};

enum smtps_dns_status {
    SMTPS_DNS_OK,			/* records */
    SMTPS_DNS_NODATA,			/* the name exists, not this type */
    SMTPS_DNS_NXDOMAIN,			/* the name does not exist */
    SMTPS_DNS_BOGUS,			/* DNSSEC validation failed */
    SMTPS_DNS_TEMPFAIL			/* SERVFAIL, no answer, an error */
};

struct ub_result;

struct smtps_dns_answer {
    int     status;			/* enum smtps_dns_status */
    int     secure;			/* DNSSEC validated */
    int     ttl;			/* seconds */
    const char *why;			/* a failure, in words */
    struct ub_result *ub;		/* the records (resolve.c reads them) */
};

typedef void (*smtps_dns_done) (void *arg, const struct smtps_dns_answer *a);

/*
 * Which lookups are sent first when more wait than may be in flight: a
 * host's addresses (a connection waits for them) before a domain's MX
 * records (more messages to route).
 */
enum smtps_dns_priority {
    SMTPS_DNS_URGENT,			/* the addresses of an MX host */
    SMTPS_DNS_ROUTINE,			/* a domain's MX records */
    SMTPS_DNS_PRIORITIES
};

/* A lookup, owned by whoever waits for it. */
struct smtps_dns_req {
    smtps_dns_done done;
    void   *arg;
    int     active;			/* asked for, done() not run yet */
    /* resolve.c's own: */
    struct smtps_dns *dns;		/* asked of */
    int     id;				/* libunbound's, once sent */
    int     list;			/* which of the resolver's lists */
    const char *name;			/* the caller's, kept until done() */
    int     rrtype;
    int     err;			/* SMTPS_E*: why it could not be sent */
    int64_t sent_at;			/* smtps_clock_ms() */
    struct smtps_dns_req *prev, *next;
};

struct smtps_dns;

int     smtps_resolve_literal(const char *host, int port,
			              struct smtps_sockaddr *addr);
struct smtps_dns *smtps_dns_new(const struct smtps_resolver_config *cfg,
				        struct smtps_timer_heap *timers,
				        int64_t deadline_ms,
				        char *why, size_t whylen);
int     smtps_dns_fd(const struct smtps_dns *dns);
int     smtps_dns_dnssec(const struct smtps_dns *dns);	/* SMTPS_DNSSEC_* */
int     smtps_dns_query(struct smtps_dns *dns, const char *name, int rrtype,
			        int priority, struct smtps_dns_req *req);
void    smtps_dns_cancel(struct smtps_dns *dns, struct smtps_dns_req *req);
void    smtps_dns_process(struct smtps_dns *dns);
/* A lookup's defaults (struct smtps_resolver_config's zeros). */
#define SMTPS_DNS_TIMEOUT_MS 5000	/* per attempt */
#define SMTPS_DNS_ATTEMPTS 2
int     smtps_dns_lookup(struct smtps_dns *dns, const char *name, int rrtype,
			         int64_t timeout_ms, struct smtps_dns_answer *a);
void    smtps_dns_timer(struct smtps_timer *t, int64_t now);
void    smtps_dns_free(struct smtps_dns *dns);
size_t  smtps_dns_mx(const struct smtps_dns_answer *a, struct smtps_mx *mx,
		             size_t max);
size_t  smtps_dns_addresses(const struct smtps_dns_answer *a, int port,
			            struct smtps_sockaddr *addr, size_t max);
int     smtps_dns_tlsa(const struct smtps_dns_answer *a, struct smtps_tlsa **out,
		               size_t *n, size_t *seen);

/* ------------------------------------------------------------------ */
/* limits.c                                                            */
/* ------------------------------------------------------------------ */

/*
 * A smooth rate (GCRA, the generic cell rate algorithm): one event per
 * interval, no bursts. tat is the theoretical arrival time of the next.
 */
struct smtps_rate {
    int64_t interval_us;		/* 0: no limit */
    int64_t tat_us;
};

/* What a destination may do, from the first rule that matches it. */
struct smtps_shape {
    int     connections;		/* at once */
    int     messages_per_connection;	/* 0: no limit */
    double  connection_rate;		/* per second; 0: none */
    double  message_rate;
};

struct smtps_rules;

struct smtps_rules *smtps_rules_new(const struct smtps_limits *limits,
				            size_t n);
void    smtps_rules_free(struct smtps_rules *rules);
int     smtps_rules_match(const struct smtps_rules *rules,
			          const char *domain, const char *const *mx,
			          size_t nmx, struct smtps_shape *shape);
void    smtps_rate_init(struct smtps_rate *r, double per_second);
int64_t smtps_rate_wait(const struct smtps_rate *r, int64_t now);
void    smtps_rate_take(struct smtps_rate *r, int64_t now);

/* ------------------------------------------------------------------ */
/* The engine's objects                                                */
/* ------------------------------------------------------------------ */

#define SMTPS_ADDR_MAX 16		/* addresses a destination keeps */
#define SMTPS_MX_MAX 16			/* MX hosts kept per domain */
#define SMTPS_WHY_MAX 400		/* one failure, in words */
#define SMTPS_TRIED_MAX 1500		/* every address tried, in words */
#define SMTPS_HOST_MAX 255

/* An MTA-STS policy (RFC 8461) for one recipient domain (sts.c). */
struct smtps_sts {
    char   *domain;			/* lower case not needed: compared without */
    int     mode;			/* SMTPS_STS_* */
    char  **mx;				/* patterns: "mx.example.net", "*.example.net" */
    size_t  nmx;
    uint64_t hash;
    struct smtps_sts *next;
};

struct smtps_sts_table {
    struct smtps_sts **buckets;
    size_t  nbuckets;
    size_t  n;
};

enum timer_kind {
    TIMER_CONN = 1,			/* in struct smtps_conn */
    TIMER_DEST = 2,			/* in struct smtps_dest */
    TIMER_ROUTE = 3,			/* in struct smtps_route */
    TIMER_DNS = 4			/* in resolve.c's struct smtps_dns */
};

enum conn_phase {
    CONN_CONNECTING,			/* nonblocking connect() in progress */
    CONN_OPEN,				/* the session runs */
    CONN_DEAD				/* closed; freed after this round */
};

/* A connection's turn for a TLS handshake (conn.c, conn_tls_gate()). */
enum conn_tls_turn {
    TURN_NONE,				/* no handshake, or it is over */
    TURN_WAITING,			/* on e->turns: its handshake waits */
    TURN_HELD				/* its handshake runs: one of max_tls_hs */
};

enum addr_state {
    ADDR_NONE,				/* not known */
    ADDR_RESOLVING,			/* lookups in flight */
    ADDR_OK				/* addr[] is good until addr_expires */
};

struct smtps_dest;
struct smtps_route;

/* One connection: a socket and the session that talks over it. */
struct smtps_conn {
    struct smtps_engine *e;
    struct smtps_dest *d;
    struct smtps_session *s;		/* NULL once freed */
    int     fd;				/* -1 when none */
    int     phase;			/* enum conn_phase */
    uint32_t events;			/* epoll interest registered */
    struct smtps_timer timer;
    uint8_t order[SMTPS_ADDR_MAX];	/* the destination's addresses, in the
					 * order this connection tries them */
    size_t  tries;			/* addresses tried so far */
    int     addr;			/* d->addr[] index in use; -1 none */
    int     source;			/* e->sources[] index bound; -1 none */
    unsigned submitted;			/* messages handed to the session */
    uint64_t covers;			/* d->nadded when it was opened */
    int     usable;			/* the session got to a transaction */
    int     in_clear;			/* opportunistic TLS left out: it failed here */
    int     refused_perm;		/* 5xx before any transaction */
    int     in_idle;			/* in the destination's pool */
    int     quitting;			/* we asked for QUIT */
    int     lingering;			/* CLOSING, flushing output */
    int     tls_turn;			/* enum conn_tls_turn */
    struct smtps_conn *turn_prev, *turn_next;	/* e->turns, first come first */
    char    addrtext[64];		/* numeric address in use */
    int     tls_event;			/* a TLS event is due (tlsrpt.c) */
    char   *tls_domains;		/* the domains it is for, so far */
    char    why[SMTPS_WHY_MAX];		/* why it failed, for results */
    struct smtps_conn *prev, *next;	/* e->conns, or e->dead */
    struct smtps_conn *idle_prev, *idle_next;	/* d->idle, MRU first */
    struct smtps_conn *lru_prev, *lru_next;	/* e->lru, oldest first */
};

/* A host of a destination (the one given, or an MX host of a site). */
struct smtps_dest_host {
    struct smtps_dest *d;
    char   *name;
    int     pref;
    struct smtps_dns_req req[3];	/* A, AAAA, TLSA */
    struct smtps_sockaddr addr[SMTPS_ADDR_MAX];
    size_t  naddr;
    int     ttl;			/* seconds, the shortest answer's */
    int     tempfail;			/* a lookup failed for now */
    int     nxdomain;			/* the name does not exist */
    int     insecure;			/* an address answer was not validated */
    char    why[160];			/* the last failed lookup */
    /* DANE (RFC 7672): this host's TLSA records, when its MX was secure */
    char   *tlsa_name;			/* "_25._tcp.host" */
    int     tlsa_state;			/* enum smtps_tlsa_state */
    struct smtps_tlsa *tlsa;		/* usable ones (DANE-TA, DANE-EE) */
    size_t  ntlsa;
    char    tlsa_why[160];		/* BOGUS: how */
    /* The TLS session of the last handshake with it, for the next. */
    struct smtps_tls_resume tls_resume;
};

enum smtps_tlsa_state {
    TLSA_NONE,				/* none, or not validated: no DANE */
    TLSA_USABLE,			/* some DANE-TA(2) or DANE-EE(3) */
    TLSA_UNUSABLE,			/* records, none usable: encrypt only */
    TLSA_BOGUS				/* validation failed: not this host */
};

/*
 * A destination: where messages go (a host, or a site: the MX hosts a
 * set of domains share) and how (every field of the key), its queue, its
 * pool of connections and its addresses.
 */
struct smtps_dest {
    struct smtps_engine *e;
    struct smtps_dest *hnext;		/* hash chain */
    uint64_t hash;
    int     in_table;

    /* The key: struct smtps_destination, strings copied. */
    char   *host;			/* NULL for a site */
    char   *site;			/* the MX set ("10 a 20 b"); NULL: host */
    int     site_flags;			/* SMTPS_SITE_*, part of its identity */
    int     port;
    int     tls_mode;
    struct smtps_tls_config *tls;
    char   *servername;
    char   *auth_user;
    char   *auth_secret;
    unsigned auth_mechs;
    int     auth_plain;
    int64_t timeout_ms;
    char   *helo;
    int     protocol;
    int     source;			/* 1 + e->sources[] index; 0: any */

    /* What it may do (limits.c), and its name for people. */
    struct smtps_shape shape;
    struct smtps_rate conn_rate, msg_rate;
    char   *label;			/* a domain or the host */

    /* Messages waiting for a connection, linked through qnext. */
    struct smtps_message *qhead, *qtail;
    size_t  nqueued;
    uint64_t nadded;			/* messages ever queued */
    uint64_t ntaken;			/* messages ever taken off */

    /* Connections. */
    int     nconns;			/* any phase but dead */
    int     nconnecting;
    struct smtps_conn *idle;		/* pool, most recently used first */
    int64_t backoff_until;		/* no new connection before this */
    int     fails;			/* in a row: the back-off grows */
    char   *backoff_why;		/* what made it back off */
    unsigned source_rr;			/* the next source to use */

    /* Hosts and their addresses, in the order they are tried. */
    struct smtps_dest_host *hosts;
    size_t  nhosts;
    int     addr_state;			/* enum addr_state */
    size_t  lookups;			/* in flight */
    struct smtps_sockaddr addr[SMTPS_ADDR_MAX];
    uint8_t addr_host[SMTPS_ADDR_MAX];	/* hosts[] index of each */
    size_t  naddr;
    size_t  nfirst;			/* of the most preferred hosts */
    size_t  addr_rr;			/* rotates the first among those */
    int64_t addr_expires;		/* -1: a literal, never */

    /* Fallback: addresses that failed since the last success. */
    uint32_t failed;			/* bit i: addr[i] */
    uint32_t clear;			/* bit i: addr[i]'s TLS handshake failed:
					 * opportunistic TLS goes there in clear */
    int     failed_perm;		/* each of them refused for good */
    char    tried[SMTPS_TRIED_MAX];	/* each of them, in words */

    struct smtps_timer timer;		/* back-off, rate */
    int     dirty;			/* on e->dirty */
    struct smtps_dest *dirty_next;
    int     starved;			/* on e->starved */
    struct smtps_dest *starved_next;
};

struct smtps_engine_source {
    struct smtps_sockaddr addr;		/* port 0 */
    char   *address;
    char   *helo;
};

struct smtps_engine {
    struct smtps_machine *machine;
    void   *user;
    int     max_conns;
    int     max_per_dest;
    int     msgs_per_conn;
    int64_t idle_ms;
    int64_t connect_ms;
    int     mx_address_limit;
    int     inet_protocols;		/* SMTPS_INET_* */
    int     address_preference;		/* SMTPS_INET_* */
    int     tls_resume;			/* resume TLS sessions (tls.c) */
    int     max_tls_hs;			/* TLS handshakes at once (conn.c) */
    int     ntls_hs;			/* turns held now */
    char    helo[SMTPS_HELO_MAX + 1];
    SMTPSTrace trace;			/* given to each new session; NULL: none */
    void   *trace_closure;

    int     epfd;
    int     wakefd;			/* eventfd in epfd: smtps_engine_wake() (wakeup.c) */
    char    wake_mark;			/* its epoll data.ptr points here */
    int     running;			/* inside smtps_engine_run() */
    int     interrupted;		/* a session's state asked to stop */
    struct smtps_timer_heap timers;
    uint64_t rand;			/* shuffles equal MX preferences */

    /* DNS: made at the first lookup, from the resolver settings. */
    struct smtps_dns *dns;
    struct smtps_resolver_config dns_cfg;	/* strings owned */
    int64_t dns_ms;			/* a lookup's deadline */
    size_t  dns_users;			/* lookups in flight */

    struct smtps_rules *rules;		/* NULL: none */
    struct smtps_engine_source *sources;
    size_t  nsources;

    struct smtps_dest **buckets;
    size_t  nbuckets;
    size_t  ndests;
    struct smtps_dest *dirty;		/* to dispatch */
    struct smtps_dest *starved;		/* waiting for a slot, neediest first */
    size_t  nstarved;

    struct smtps_sts_table sts;		/* MTA-STS policies by domain (sts.c) */
    struct smtps_route **routes;	/* recipient domains (route.c) */
    size_t  nroute_buckets;
    size_t  nroutes;
    size_t  nrouted;			/* messages waiting for routes */
    uint64_t route_mark;		/* one per routed submit */

    struct smtps_conn *conns;		/* every live connection */
    struct smtps_conn *dead;		/* closed this round */
    struct smtps_conn *lru, *lru_tail;	/* idle connections, oldest first */
    struct smtps_conn *turns, *turns_tail;	/* waiting for a TLS handshake */
    size_t  nconns;
    size_t  nquitting;

    struct smtps_result *results, *results_tail;
    size_t  nresults;

    struct smtps_tls_event_rec *tls_events, *tls_events_tail;	/* tlsrpt.c */
    struct smtps_tls_event_rec *tls_event_taken;	/* handed out last */
    size_t  ntls_events;
    size_t  tls_events_max;		/* 0: none recorded */
    uint64_t tls_events_dropped;
    size_t  npending;			/* submitted, result not taken */

    struct epoll_event events[256];
    char    rbuf[65536];
};

/*
 * tlsrpt.c: TLS events. smtps_tlsrpt_begin() at connection set-up decides
 * whether one is due; _note() adds the domains of each message handed to
 * the session until it is sent; _conn() sends it once the outcome is
 * known (over: the connection is ending); _refused() is for an address
 * DANE forbids, _sts_unmatched() for a domain whose MTA-STS policy
 * matches none of its MX hosts.
 */
struct smtps_tls_event_rec;
void    smtps_tlsrpt_begin(struct smtps_conn *c);
void    smtps_tlsrpt_note(struct smtps_conn *c, const struct smtps_message *m);
void    smtps_tlsrpt_conn(struct smtps_conn *c, int over);
void    smtps_tlsrpt_refused(struct smtps_conn *c, int bogus);
void    smtps_tlsrpt_sts_unmatched(struct smtps_engine *e, const char *domain);
void    smtps_tlsrpt_end(struct smtps_conn *c);
void    smtps_tlsrpt_free(struct smtps_engine *e);

/* wakeup.c */
int     smtps_wakeup_open(struct smtps_engine *e);
void    smtps_wakeup_drain(struct smtps_engine *e);
void    smtps_wakeup_close(struct smtps_engine *e);
#define SMTPS_WAKEUP_MARK(e) ((void *) &(e)->wake_mark)

/* engine.c */
int     smtps_engine_reserve_timers(struct smtps_engine *e, size_t more);
struct smtps_dns *smtps_engine_dns(struct smtps_engine *e, char *why,
				           size_t whylen);
void    smtps_engine_push_result(struct smtps_engine *e, struct smtps_result *r);
void    smtps_engine_fail_message(struct smtps_engine *e,
				          struct smtps_message *m, int status,
				          const char *prefix, const char *why);
void    smtps_engine_make_room(struct smtps_engine *e);
void    smtps_engine_wake_starved(struct smtps_engine *e);
uint64_t smtps_engine_random(struct smtps_engine *e);

/* dest.c */
int     smtps_dest_cancel(struct smtps_dest *d, uint64_t tag);
uint64_t smtps_hash_str(uint64_t h, const char *s);
char   *smtps_str_copy(const char *s, int *err);
int     smtps_dest_check_key(const struct smtps_destination *k);
/* What a site's MX records say besides its hosts (smtps_dest_get()). */
#define SMTPS_SITE_SECURE 1		/* DNSSEC-validated (a host given counts) */
#define SMTPS_SITE_STS 2		/* an MTA-STS policy in force (sts.c) */
#define SMTPS_SITE_STS_TESTING 4	/* one in testing mode: TLS checked for
					 * reports, not enforced */

struct smtps_dest *smtps_dest_get(struct smtps_engine *e,
				          const struct smtps_destination *k,
				          const char *site, int site_flags,
				          const char *label);
void    smtps_dest_free(struct smtps_dest *d);

/* sts.c */
const struct smtps_sts *smtps_sts_get(struct smtps_sts_table *t,
				              const char *domain);
int     smtps_sts_matches(const struct smtps_sts *p, const char *host);
void    smtps_sts_free(struct smtps_sts_table *t);
int     smtps_dest_tlsa(const struct smtps_dest *d,
			        const struct smtps_dest_host *h);
void    smtps_dest_enqueue(struct smtps_dest *d, struct smtps_message *m);
void    smtps_dest_requeue(struct smtps_dest *d, struct smtps_message *m);
struct smtps_message *smtps_dest_pop(struct smtps_dest *d);
void    smtps_dest_dirty(struct smtps_dest *d);
void    smtps_dest_unstarve(struct smtps_dest *d);
void    smtps_dest_dispatch(struct smtps_dest *d, int64_t now);
void    smtps_dest_timer(struct smtps_dest *d, int64_t now);
int64_t smtps_dest_connect_ms(const struct smtps_dest *d);
void    smtps_dest_fail_queue(struct smtps_dest *d, uint64_t count,
			              int status, const char *prefix,
			              const char *why);
int     smtps_dest_may_send(struct smtps_dest *d, int64_t now);
void    smtps_dest_sent(struct smtps_dest *d, int64_t now);
void    smtps_dest_addr_failed(struct smtps_dest *d, int i, int perm,
				       const char *why);
void    smtps_dest_connected(struct smtps_dest *d);
void    smtps_dest_backoff(struct smtps_dest *d, int64_t now, const char *why);
int     smtps_dest_all_failed(const struct smtps_dest *d);

/* conn.c */
int     smtps_conn_open(struct smtps_dest *d, int64_t now);
const char *smtps_conn_host(const struct smtps_conn *c);
struct smtps_dest_host *smtps_conn_dest_host(const struct smtps_conn *c);
int     smtps_conn_dane(const struct smtps_conn *c);
int     smtps_conn_tls_level(const struct smtps_conn *c);	/* -1: not used */
int     smtps_conn_submit_next(struct smtps_conn *c, int64_t now);
void    smtps_conn_update(struct smtps_conn *c, int64_t now);
void    smtps_conn_connect_done(struct smtps_conn *c, int64_t now);
void    smtps_conn_read(struct smtps_conn *c, uint32_t events, int64_t now);
void    smtps_conn_quit(struct smtps_conn *c, int64_t now);
void    smtps_conn_timer(struct smtps_conn *c, int64_t now);
void    smtps_conn_idle_remove(struct smtps_conn *c);
void    smtps_conn_teardown(struct smtps_conn *c);
void    smtps_conn_tls_turns(struct smtps_engine *e, int64_t now);

/* route.c */
int     smtps_route_submit(struct smtps_engine *e, struct smtps_message *m,
			           const struct smtps_destination *k);
void    smtps_route_forget(struct smtps_engine *e, const char *domain);
uint64_t smtps_lower_hash(const char *s, size_t len);
void    smtps_route_timer(struct smtps_timer *t, int64_t now);
int     smtps_route_result(struct smtps_engine *e, struct smtps_result *r);
void    smtps_routes_free(struct smtps_engine *e);

#endif /* SMTPS_ENGINE_PRIVATE_H */
