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
 *	int	smtps_engine_submit(e, msg, dest, tag)
 *	int	smtps_engine_run(e, max_wait_ms)
 *	struct smtps_result *smtps_engine_next_result(e)
 *	size_t	smtps_engine_pending(e)
 *	size_t	smtps_engine_connections(e)
 *	int	smtps_engine_set_trace(e, fn, closure)
 * DESCRIPTION
 *	An engine moves bytes between sockets and sans-I/O sessions
 *	(session.c) for thousands of connections in the caller's thread. What
 *	to send and what a reply means is the sessions' business; the engine
 *	owns sockets, time, queues and pools.
 *
 *	Destinations. Messages are queued per destination: every field of
 *	struct smtps_destination (host, port, TLS mode, TLS policy pointer,
 *	server name, AUTH user, secret, mechanisms and plaintext permission,
 *	timeout, HELO name) is part of the key, so that a connection only
 *	ever carries messages that asked for exactly its settings. A
 *	destination holds its queue, its pool of connections (at most
 *	max_per_destination, and max_connections in all) and its addresses.
 *	It is freed when it has neither messages nor connections.
 *
 *	Dispatch. A queued message goes to an idle pooled connection of its
 *	destination when there is one (most recently used first: its socket
 *	is warm). Otherwise a new connection is opened while the queue is
 *	longer than the number of connections still connecting, within both
 *	limits. When max_connections is what stops it, the least recently
 *	used idle connection of any destination is closed (QUIT) to make
 *	room, and the destination waits, first come first served, for a
 *	connection to end.
 *
 *	One message per session at a time, and one more behind its final
 *	dot: a message is submitted to a session when it is connected
 *	(before smtps_session_start(), so that a refused greeting is
 *	reported on that message in the server's own words) and then
 *	whenever the session is IDLE again; with PIPELINING, the session
 *	also takes the next one from the queue (conn_feed()) once a final
 *	dot is queued, so that its commands leave in the same write. The
 *	other messages wait in the destination's queue, where any
 *	connection can take them. After messages_per_connection messages, or idle_timeout_ms
 *	in the pool, a connection is ended with QUIT; the session decides
 *	whether RSET is needed between messages.
 *
 *	Sockets are nonblocking (SOCK_NONBLOCK | SOCK_CLOEXEC, TCP_NODELAY)
 *	and watched level-triggered with epoll: EPOLLOUT while connecting,
 *	then EPOLLIN | EPOLLRDHUP, plus EPOLLOUT only while output is
 *	pending. Output is written as soon as a session produces it (most
 *	writes complete at once, so EPOLLOUT is rarely asked for at all).
 *	Reads take one buffer full per wake-up, except after EPOLLRDHUP, when
 *	the socket is read to its end before anything is written: a server
 *	that sent its reply and closed is then seen as closed before we send
 *	it more, which keeps "lost before the final dot" apart from "lost
 *	after it" (RFC 1047).
 *
 *	Connecting tries each address of the destination in turn, starting
 *	at a rotating index so that connections spread over them; each
 *	attempt has connect_timeout_ms. IPv4 and IPv6 literals are used as
 *	they are; names are resolved by resolve.c in worker threads, with
 *	the connect deadline as the DNS deadline too, and kept for five
 *	minutes. The connect deadline is connect_timeout_ms, or the
 *	destination's timeout_ms when that is shorter.
 *
 *	Deadlines. Every connection has one timer in the engine's heap
 *	(timers.c): the connect deadline while connecting, the session's own
 *	smtps_session_deadline() while it talks, the idle deadline in the
 *	pool, and a linger deadline while a closing session flushes. Every
 *	destination has one too: its DNS deadline or the end of a back-off.
 *
 *	Failures. Every submitted message ends in exactly one result. A
 *	message that never reached a session gets one made here: tempfail
 *	at stage "not connected" when the name does not resolve or no
 *	address accepts a connection. Once a session holds a message, the
 *	session makes its result, whatever happens to the connection. A
 *	connection that ends before it ever became usable (connect failed,
 *	no greeting, a 421 or 554 greeting, EHLO refused, dropped) says
 *	something about its destination. When it was the destination's last
 *	connection, the messages that were already queued when it was opened
 *	fail with its reason (permanently when the server refused
 *	permanently before any transaction; messages queued since get an
 *	attempt of their own); otherwise new connections wait
 *	SMTPS_BACKOFF_MS, so that a refusing server is not hammered while
 *	other connections still work.
 *
 *	smtps_engine_run() processes submissions, expired deadlines and
 *	socket events until a result is ready, nothing is pending, max_wait_ms
 *	has passed, a signal interrupted the wait or a state interrupted its
 *	session (SMTPS_EINTR: Ctrl-C in a Python state), so that the caller
 *	can handle it. Idle pooled connections are only timed out while it runs.
 *	smtps_engine_submit() only queues, so it may even be called from a
 *	state running inside smtps_engine_run().
 *
 *	Memory: no global mutable state; one 64 KiB read buffer per engine;
 *	output is bounded by the sessions; results wait in one list.
 *	RLIMIT_NOFILE's soft limit is raised to the hard limit when it is
 *	below max_connections + 64.
 * DIAGNOSTICS
 *	smtps_engine_new() returns NULL for a bad configuration or when
 *	epoll or memory is not available. smtps_engine_submit() returns
 *	SMTPS_EINVAL for a bad destination or message, SMTPS_ENOMEM.
 *	smtps_engine_run() returns the number of results ready, SMTPS_ESTATE
 *	when called from inside itself, SMTPS_ESYS when epoll fails.
 * SEE ALSO
 *	session.c (the sessions), timers.c, resolve.c, epoll(7).
 *--*/

#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>

#include "internal.h"
#include "engine_private.h"

#define SMTPS_ENGINE_EVENTS 256		/* epoll events taken per wait */
#define SMTPS_ENGINE_READ 65536		/* bytes read per recv() */
#define SMTPS_ADDR_TTL_MS 300000	/* resolve a name again after this */
#define SMTPS_BACKOFF_MS 1000		/* after a connection failed early */
#define SMTPS_LINGER_MS 10000		/* flushing the last output */
#define SMTPS_HOST_MAX 255
#define SMTPS_WHY_MAX 400

#define ALL UINT64_MAX			/* dest_fail_queue(): every message */

#define DEF_MAX_CONNECTIONS 1000
#define DEF_MAX_PER_DEST 10
#define DEF_IDLE_MS 5000
#define DEF_CONNECT_MS 30000

/* The smallest ABI sizes accepted: callers older than these are refused. */
#define DEST_MIN_SIZE \
    (offsetof(struct smtps_destination, port) + sizeof(int))
#define CONFIG_MIN_SIZE \
    (offsetof(struct smtps_engine_config, max_connections) + sizeof(int))

enum timer_kind {
    TIMER_CONN = 1,			/* in struct smtps_conn */
    TIMER_DEST = 2			/* in struct smtps_dest */
};

enum conn_phase {
    CONN_CONNECTING,			/* nonblocking connect() in progress */
    CONN_OPEN,				/* the session runs */
    CONN_DEAD				/* closed; freed after this round */
};

enum addr_state {
    ADDR_NONE,				/* not known */
    ADDR_RESOLVING,			/* a worker is on it */
    ADDR_OK				/* addr[] is good until addr_expires */
};

struct smtps_dest;

/* One connection: a socket and the session that talks over it. */
struct smtps_conn {
    struct smtps_engine *e;
    struct smtps_dest *d;
    struct smtps_session *s;		/* NULL once freed */
    int     fd;				/* -1 when none */
    int     phase;			/* enum conn_phase */
    uint32_t events;			/* epoll interest registered */
    struct smtps_timer timer;
    size_t  addr_first;			/* first address index tried */
    size_t  tries;			/* addresses tried so far */
    unsigned submitted;			/* messages handed to the session */
    uint64_t covers;			/* d->nadded when it was opened */
    int     usable;			/* the session got to a transaction */
    int     refused_perm;		/* 5xx before any transaction */
    int     in_idle;			/* in the destination's pool */
    int     quitting;			/* we asked for QUIT */
    int     lingering;			/* CLOSING, flushing output */
    char    addrtext[INET6_ADDRSTRLEN + 2];
    char    why[SMTPS_WHY_MAX];		/* why it failed, for results */
    struct smtps_conn *prev, *next;	/* e->conns, or e->dead */
    struct smtps_conn *idle_prev, *idle_next;	/* d->idle, MRU first */
    struct smtps_conn *lru_prev, *lru_next;	/* e->lru, oldest first */
};

/* A destination: its key, queue, pool and addresses. */
struct smtps_dest {
    struct smtps_engine *e;
    struct smtps_dest *hnext;		/* hash chain */
    uint64_t hash;
    int     in_table;

    /* The key: struct smtps_destination, strings copied. */
    char   *host;
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

    /* Addresses. */
    int     addr_state;			/* enum addr_state */
    struct smtps_sockaddr addr[SMTPS_RESOLVE_MAX];
    size_t  naddr;
    size_t  addr_rr;			/* rotating first address */
    int64_t addr_expires;		/* -1: a literal, never */
    struct smtps_resolve_req *req;	/* the lookup in flight */
    struct smtps_timer timer;		/* DNS deadline or back-off end */

    int     dirty;			/* on e->dirty */
    struct smtps_dest *dirty_next;
    int     starved;			/* on e->starved */
    struct smtps_dest *starved_next;
};

struct smtps_engine {
    struct smtps_machine *machine;
    void   *user;
    int     max_conns;
    int     max_per_dest;
    int     msgs_per_conn;
    int64_t idle_ms;
    int64_t connect_ms;
    char    helo[SMTPS_HELO_MAX + 1];
    SMTPSTrace trace;			/* given to each new session; NULL: none */
    void   *trace_closure;

    int     epfd;
    int     running;			/* inside smtps_engine_run() */
    int     interrupted;		/* a session's state asked to stop */
    struct smtps_resolver *resolver;	/* made for the first name */
    struct smtps_timer_heap timers;

    struct smtps_dest **buckets;
    size_t  nbuckets;
    size_t  ndests;
    struct smtps_dest *dirty;		/* to dispatch */
    struct smtps_dest *starved, *starved_tail;	/* waiting for a slot */
    size_t  nstarved;

    struct smtps_conn *conns;		/* every live connection */
    struct smtps_conn *dead;		/* closed this round */
    struct smtps_conn *lru, *lru_tail;	/* idle connections, oldest first */
    size_t  nconns;
    size_t  nquitting;

    struct smtps_result *results, *results_tail;
    size_t  nresults;
    size_t  npending;			/* submitted, result not taken */

    struct epoll_event events[SMTPS_ENGINE_EVENTS];
    char    rbuf[SMTPS_ENGINE_READ];
};

static void raise_nofile(rlim_t want);
static int check_name(const char *s, size_t max, int no_space);
static int str_eq(const char *a, const char *b);
static char *str_copy(const char *s, int *err);
static void str_wipe(char *s);
static uint64_t hash_bytes(uint64_t h, const void *p, size_t n);
static uint64_t hash_str(uint64_t h, const char *s);
static uint64_t dest_hash(const struct smtps_destination *k);
static int dest_matches(const struct smtps_dest *d,
			        const struct smtps_destination *k);
static struct smtps_dest *dest_find(struct smtps_engine *e,
				            const struct smtps_destination *k,
				            uint64_t hash);
static struct smtps_dest *dest_new(struct smtps_engine *e,
				           const struct smtps_destination *k,
				           uint64_t hash);
static int dest_rehash(struct smtps_engine *e);
static void dest_free(struct smtps_dest *d);
static void dest_dirty(struct smtps_dest *d);
static void dest_starve(struct smtps_dest *d);
static void dest_unstarve(struct smtps_dest *d);
static void dest_dispatch(struct smtps_dest *d, int64_t now);
static int dest_addresses(struct smtps_dest *d, int64_t now);
static int64_t dest_connect_ms(const struct smtps_dest *d);
static void dest_resolved(struct smtps_engine *e,
			          struct smtps_resolve_req *req, int64_t now);
static void dest_timer(struct smtps_dest *d, int64_t now);
static void dest_fail_queue(struct smtps_dest *d, uint64_t count, int status,
			            const char *prefix, const char *why);
static struct smtps_message *dest_pop(struct smtps_dest *d);
static void fail_message(struct smtps_engine *e, struct smtps_message *m,
			         int status, const char *prefix,
			         const char *why);
static void push_result(struct smtps_engine *e, struct smtps_result *r);
static void engine_dirty_run(struct smtps_engine *e, int64_t now);
static void engine_timers_run(struct smtps_engine *e, int64_t now);
static void engine_resolver_run(struct smtps_engine *e, int64_t now);
static void engine_wake_starved(struct smtps_engine *e);
static void engine_make_room(struct smtps_engine *e);
static void engine_bury(struct smtps_engine *e);
static int conn_open(struct smtps_dest *d, int64_t now);
static int conn_setup(struct smtps_conn *c);
static int conn_connect(struct smtps_conn *c, int64_t now);
static void conn_connect_done(struct smtps_conn *c, int64_t now);
static void conn_connected(struct smtps_conn *c, int64_t now);
static void conn_record_addresses(struct smtps_conn *c);
static int sockaddr_text(const struct sockaddr_storage *ss, char *host,
			 size_t hostlen, int *port);
static int conn_submit_next(struct smtps_conn *c, int64_t now);
static struct smtps_message *conn_feed(struct smtps_session *s, void *closure);
static void conn_update(struct smtps_conn *c, int64_t now);
static int conn_flush(struct smtps_conn *c, int64_t now);
static void conn_read(struct smtps_conn *c, uint32_t events, int64_t now);
static void conn_collect(struct smtps_conn *c);
static void conn_quit(struct smtps_conn *c, int64_t now);
static void conn_timer(struct smtps_conn *c, int64_t now);
static void conn_close(struct smtps_conn *c, int64_t now);
static void conn_want(struct smtps_conn *c, uint32_t events);
static void conn_idle_add(struct smtps_conn *c, int64_t now);
static void conn_idle_remove(struct smtps_conn *c);
static void conn_why_errno(struct smtps_conn *c, const char *what, int err);
static void conn_teardown(struct smtps_conn *c);

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

/* check_name - a host or HELO name: 1..max printable bytes */

static int check_name(const char *s, size_t max, int no_space)
{
    size_t  len;

    if (s == NULL || (len = strlen(s)) == 0 || len > max
	|| smtps_check_text(s, len, max, NULL) != SMTPS_OK)
	return SMTPS_EINVAL;
    if (no_space && strchr(s, ' ') != NULL)
	return SMTPS_EINVAL;
    return SMTPS_OK;
}

/* str_eq - equal strings, NULL equal only to NULL */

static int str_eq(const char *a, const char *b)
{
    if (a == NULL || b == NULL)
	return a == b;
    return strcmp(a, b) == 0;
}

/* str_copy - a copy of s (NULL stays NULL); *err set on failure */

static char *str_copy(const char *s, int *err)
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

/* hash_str - FNV-1a over a string, NULL distinct from "" */

static uint64_t hash_str(uint64_t h, const char *s)
{
    unsigned char tag = s != NULL;

    h = hash_bytes(h, &tag, 1);
    return s ? hash_bytes(h, s, strlen(s) + 1) : h;
}

/* dest_hash - the hash of a destination key */

static uint64_t dest_hash(const struct smtps_destination *k)
{
    uint64_t h = 14695981039346656037ULL;

    h = hash_str(h, k->host);
    h = hash_bytes(h, &k->port, sizeof(k->port));
    h = hash_bytes(h, &k->tls_mode, sizeof(k->tls_mode));
    h = hash_bytes(h, &k->tls, sizeof(k->tls));
    h = hash_str(h, k->tls_servername);
    h = hash_str(h, k->auth_user);
    h = hash_str(h, k->auth_secret);
    h = hash_bytes(h, &k->auth_mechs, sizeof(k->auth_mechs));
    h = hash_bytes(h, &k->auth_allow_plaintext, sizeof(k->auth_allow_plaintext));
    h = hash_bytes(h, &k->timeout_ms, sizeof(k->timeout_ms));
    return hash_str(h, k->helo);
}

/* dest_matches - d has exactly key k */

static int dest_matches(const struct smtps_dest *d,
			        const struct smtps_destination *k)
{
    return d->port == k->port && d->tls_mode == k->tls_mode
	&& d->tls == k->tls && d->auth_mechs == k->auth_mechs
	&& d->auth_plain == k->auth_allow_plaintext
	&& d->timeout_ms == k->timeout_ms && str_eq(d->host, k->host)
	&& str_eq(d->servername, k->tls_servername)
	&& str_eq(d->auth_user, k->auth_user)
	&& str_eq(d->auth_secret, k->auth_secret) && str_eq(d->helo, k->helo);
}

/* dest_find - the destination with key k, or NULL */

static struct smtps_dest *dest_find(struct smtps_engine *e,
				            const struct smtps_destination *k,
				            uint64_t hash)
{
    struct smtps_dest *d;

    if (e->nbuckets == 0)
	return NULL;
    for (d = e->buckets[hash & (e->nbuckets - 1)]; d != NULL; d = d->hnext)
	if (d->hash == hash && dest_matches(d, k))
	    return d;
    return NULL;
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

/* dest_new - a destination for key k, in the table */

static struct smtps_dest *dest_new(struct smtps_engine *e,
				           const struct smtps_destination *k,
				           uint64_t hash)
{
    struct smtps_dest *d;
    int     err = 0;

    if ((e->ndests + 1 > e->nbuckets * 2 && dest_rehash(e) != SMTPS_OK)
	|| smtps_timers_reserve(&e->timers, e->nconns + e->ndests + 1) != SMTPS_OK
	|| (d = calloc(1, sizeof(*d))) == NULL)
	return NULL;
    d->e = e;
    d->hash = hash;
    d->host = str_copy(k->host, &err);
    d->port = k->port;
    d->tls_mode = k->tls_mode;
    d->tls = k->tls;
    if (d->tls != NULL)
	smtps_tls_config_retain(d->tls);	/* the caller may drop its own */
    d->servername = str_copy(k->tls_servername, &err);
    d->auth_user = str_copy(k->auth_user, &err);
    d->auth_secret = str_copy(k->auth_secret, &err);
    d->auth_mechs = k->auth_mechs;
    d->auth_plain = k->auth_allow_plaintext;
    d->timeout_ms = k->timeout_ms;
    d->helo = str_copy(k->helo, &err);
    smtps_timer_init(&d->timer, TIMER_DEST);
    if (err) {
	dest_free(d);
	return NULL;
    }
    d->hnext = e->buckets[hash & (e->nbuckets - 1)];
    e->buckets[hash & (e->nbuckets - 1)] = d;
    d->in_table = 1;
    e->ndests++;
    return d;
}

/* dest_free - unlink and release a destination with nothing left */

static void dest_free(struct smtps_dest *d)
{
    struct smtps_engine *e = d->e;
    struct smtps_dest **pp;

    if (d->in_table) {
	for (pp = &e->buckets[d->hash & (e->nbuckets - 1)]; *pp != d;
	     pp = &(*pp)->hnext)
	     /* void */ ;
	*pp = d->hnext;
	e->ndests--;
    }
    dest_unstarve(d);
    smtps_timer_cancel(&e->timers, &d->timer);
    if (d->req != NULL)
	d->req->owner = NULL;			/* its answer will be dropped */
    free(d->host);
    free(d->servername);
    free(d->auth_user);
    str_wipe(d->auth_secret);
    free(d->helo);
    smtps_tls_config_free(d->tls);		/* NULL-safe: drops our reference */
    free(d);
}

/* dest_dirty - dispatch d at the next opportunity */

static void dest_dirty(struct smtps_dest *d)
{
    if (d->dirty)
	return;
    d->dirty = 1;
    d->dirty_next = d->e->dirty;
    d->e->dirty = d;
}

/* dest_starve - d waits for a connection slot, first come first served */

static void dest_starve(struct smtps_dest *d)
{
    struct smtps_engine *e = d->e;

    if (d->starved)
	return;
    d->starved = 1;
    d->starved_next = NULL;
    if (e->starved_tail != NULL)
	e->starved_tail->starved_next = d;
    else
	e->starved = d;
    e->starved_tail = d;
    e->nstarved++;
}

/* dest_unstarve - take d off the waiting list */

static void dest_unstarve(struct smtps_dest *d)
{
    struct smtps_engine *e = d->e;
    struct smtps_dest **pp, *prev = NULL;

    if (!d->starved)
	return;
    for (pp = &e->starved; *pp != NULL; prev = *pp, pp = &(*pp)->starved_next)
	if (*pp == d) {
	    *pp = d->starved_next;
	    if (e->starved_tail == d)
		e->starved_tail = prev;
	    break;
	}
    d->starved = 0;
    d->starved_next = NULL;
    e->nstarved--;
}

/* dest_pop - take the oldest queued message */

static struct smtps_message *dest_pop(struct smtps_dest *d)
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

/* push_result - a result is ready for smtps_engine_next_result() */

static void push_result(struct smtps_engine *e, struct smtps_result *r)
{
    r->next = NULL;
    if (e->results_tail != NULL)
	e->results_tail->next = r;
    else
	e->results = r;
    e->results_tail = r;
    e->nresults++;
}

/* fail_message - a message that never reached a session gets its result */

static void fail_message(struct smtps_engine *e, struct smtps_message *m,
			         int status, const char *prefix,
			         const char *why)
{
    struct smtps_result *r = m->qresult;
    char    text[SMTPS_REASON_MAX];

    /* Made at submit, so that even now memory cannot lose a result. */
    m->qresult = NULL;
    snprintf(text, sizeof(text), "%s%s", prefix, why);
    (void) smtps_result_set_reason(r, text);
    smtps_result_settle(r, status, 1);
    smtps_bounce_classify_result(r);
    push_result(e, r);
    smtps_message_free(m);
}

/* dest_fail_queue - the first count queued messages of d fail now */

static void dest_fail_queue(struct smtps_dest *d, uint64_t count, int status,
			            const char *prefix, const char *why)
{
    struct smtps_message *m;

    while (count-- > 0 && (m = dest_pop(d)) != NULL)
	fail_message(d->e, m, status, prefix, why);
}

/* dest_connect_ms - the connect (and DNS) deadline: both limits apply */

static int64_t dest_connect_ms(const struct smtps_dest *d)
{
    if (d->timeout_ms > 0 && d->timeout_ms < d->e->connect_ms)
	return d->timeout_ms;
    return d->e->connect_ms;
}

/* dest_addresses - 1 when d's addresses are known; else resolve them */

static int dest_addresses(struct smtps_dest *d, int64_t now)
{
    struct smtps_engine *e = d->e;
    struct smtps_resolve_req *req;
    struct epoll_event ev;
    char    why[SMTPS_WHY_MAX];

    if (d->addr_state == ADDR_OK && (d->addr_expires < 0 || now < d->addr_expires))
	return 1;
    if (d->addr_state == ADDR_RESOLVING)
	return 0;
    /* A literal needs no lookup, hence no thread and no wait. */
    if (smtps_resolve_literal(d->host, d->port, &d->addr[0])) {
	d->naddr = 1;
	d->addr_state = ADDR_OK;
	d->addr_expires = -1;
	return 1;
    }
    if (e->resolver == NULL) {
	if ((e->resolver = smtps_resolver_new()) == NULL) {
	    dest_fail_queue(d, ALL, SMTPS_STATUS_TEMPFAIL, "",
			    "cannot start the name resolver");
	    return 0;
	}
	memset(&ev, 0, sizeof(ev));
	ev.events = EPOLLIN;
	ev.data.ptr = NULL;			/* NULL marks the resolver */
	if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, smtps_resolver_fd(e->resolver),
		      &ev) != 0) {
	    smtps_resolver_free(e->resolver);
	    e->resolver = NULL;
	    dest_fail_queue(d, ALL, SMTPS_STATUS_TEMPFAIL, "",
			    "cannot watch the name resolver");
	    return 0;
	}
    }
    if ((req = smtps_resolve_req_new(d->host, d->port, d)) == NULL
	|| smtps_resolver_submit(e->resolver, req) != SMTPS_OK) {
	smtps_resolve_req_free(req);
	snprintf(why, sizeof(why), "cannot look up %s: no resolver thread",
		 d->host);
	dest_fail_queue(d, ALL, SMTPS_STATUS_TEMPFAIL, "", why);
	return 0;
    }
    d->req = req;
    d->addr_state = ADDR_RESOLVING;
    smtps_timer_set(&e->timers, &d->timer, smtps_time_after(now, dest_connect_ms(d)));
    return 0;
}

/* dest_resolved - a lookup came back */

static void dest_resolved(struct smtps_engine *e,
			          struct smtps_resolve_req *req, int64_t now)
{
    struct smtps_dest *d = req->owner;
    char    why[SMTPS_WHY_MAX];
    size_t  i;

    if (d == NULL) {				/* abandoned: timed out, or freed */
	smtps_resolve_req_free(req);
	return;
    }
    d->req = NULL;
    smtps_timer_cancel(&e->timers, &d->timer);
    if (req->error != 0) {
	d->addr_state = ADDR_NONE;
	d->naddr = 0;
	snprintf(why, sizeof(why), "cannot resolve %s: %s", d->host,
		 gai_strerror(req->error));
	dest_fail_queue(d, ALL, SMTPS_STATUS_TEMPFAIL, "", why);
    } else {
	for (i = 0; i < req->naddr; i++)
	    d->addr[i] = req->addr[i];
	d->naddr = req->naddr;
	d->addr_state = ADDR_OK;
	d->addr_expires = smtps_time_after(now, SMTPS_ADDR_TTL_MS);
    }
    smtps_resolve_req_free(req);
    dest_dirty(d);
}

/* dest_timer - d's DNS deadline passed, or its back-off ended */

static void dest_timer(struct smtps_dest *d, int64_t now)
{
    char    why[SMTPS_WHY_MAX];

    SMTPS_UNUSED(now);
    if (d->addr_state == ADDR_RESOLVING) {
	d->req->owner = NULL;
	d->req = NULL;
	d->addr_state = ADDR_NONE;
	snprintf(why, sizeof(why), "cannot resolve %s: timed out", d->host);
	dest_fail_queue(d, ALL, SMTPS_STATUS_TEMPFAIL, "", why);
    }
    dest_dirty(d);
}

/* dest_dispatch - give d's queue to connections, opening some if needed */

static void dest_dispatch(struct smtps_dest *d, int64_t now)
{
    struct smtps_engine *e = d->e;
    struct smtps_conn *c;

    /* A warm connection first: no handshake to pay. */
    while (d->qhead != NULL && (c = d->idle) != NULL) {
	conn_idle_remove(c);
	(void) conn_submit_next(c, now);
	conn_update(c, now);			/* back to the pool if refused */
    }
    if (d->nqueued <= (size_t) d->nconnecting
	|| d->addr_state == ADDR_RESOLVING)
	return;
    if (now < d->backoff_until) {
	smtps_timer_set(&e->timers, &d->timer, d->backoff_until);
	return;
    }
    if (!dest_addresses(d, now))
	return;
    while (d->nqueued > (size_t) d->nconnecting && d->nconns < e->max_per_dest) {
	if (e->nconns >= (size_t) e->max_conns) {
	    dest_starve(d);
	    engine_make_room(e);
	    return;
	}
	if (conn_open(d, now) < 0)
	    return;
    }
}

/* engine_make_room - end the oldest idle connection for a waiting one */

static void engine_make_room(struct smtps_engine *e)
{
    struct smtps_conn *c = e->lru;

    /* Connections already quitting will free their slots soon enough. */
    if (c == NULL || e->nquitting >= e->nstarved)
	return;
    int64_t now = smtps_clock_ms();

    conn_quit(c, now);
    conn_update(c, now);
}

/* engine_wake_starved - a slot was freed: waiting destinations try again */

static void engine_wake_starved(struct smtps_engine *e)
{
    struct smtps_dest *d;

    while ((d = e->starved) != NULL) {
	dest_unstarve(d);
	dest_dirty(d);
    }
}

/* engine_dirty_run - dispatch every dirty destination; free empty ones */

static void engine_dirty_run(struct smtps_engine *e, int64_t now)
{
    struct smtps_dest *d;

    while ((d = e->dirty) != NULL) {
	e->dirty = d->dirty_next;
	d->dirty = 0;
	d->dirty_next = NULL;
	dest_dispatch(d, now);
	/* Dispatching may have made it dirty again: then it is kept. */
	if (!d->dirty && d->qhead == NULL && d->nconns == 0
	    && d->addr_state != ADDR_RESOLVING)
	    dest_free(d);
    }
}

/* conn_why_errno - record why a connection failed: "what: strerror" */

static void conn_why_errno(struct smtps_conn *c, const char *what, int err)
{
    char    buf[128];

    if (strerror_r(err, buf, sizeof(buf)) != 0)
	snprintf(buf, sizeof(buf), "error %d", err);
    snprintf(c->why, sizeof(c->why), "%.270s%.120s", what, buf);
}

/* conn_setup - apply the destination's settings to a new session */

static int conn_setup(struct smtps_conn *c)
{
    struct smtps_dest *d = c->d;
    int     rc, id;

    if (d->tls_mode != SMTPS_TLS_NONE) {
	rc = smtps_session_set_tls(c->s, d->tls_mode, d->tls,
				   d->servername ? d->servername : d->host);
	if (rc != SMTPS_OK) {
	    snprintf(c->why, sizeof(c->why), "cannot set up TLS: %s",
		     smtps_strerror(rc));
	    return rc;
	}
    }
    if (d->auth_user != NULL) {
	rc = smtps_session_set_auth(c->s, d->auth_user, d->auth_secret,
				    d->auth_mechs, d->auth_plain);
	if (rc != SMTPS_OK) {
	    snprintf(c->why, sizeof(c->why), "cannot set up AUTH: %s",
		     smtps_strerror(rc));
	    return rc;
	}
    }
    if (d->timeout_ms > 0)
	for (id = 0; id < SMTPS_MAX_STATES; id++)
	    if (smtps_session_set_timeout(c->s, id, d->timeout_ms) != SMTPS_OK)
		break;				/* past the machine's last id */
    return SMTPS_OK;
}

/* conn_open - a new connection to d; -1 when it failed at once */

static int conn_open(struct smtps_dest *d, int64_t now)
{
    struct smtps_engine *e = d->e;
    struct smtps_conn *c;
    int     rc = SMTPS_OK;

    if (smtps_timers_reserve(&e->timers, e->nconns + e->ndests + 1) != SMTPS_OK
	|| (c = calloc(1, sizeof(*c))) == NULL) {
	if (d->nconns == 0)
	    dest_fail_queue(d, ALL, SMTPS_STATUS_TEMPFAIL, "", "out of memory");
	return -1;
    }
    c->e = e;
    c->d = d;
    c->fd = -1;
    smtps_timer_init(&c->timer, TIMER_CONN);
    c->s = smtps_session_new(e->machine, d->helo ? d->helo : e->helo, e->user);
    if (c->s != NULL && e->trace != NULL)
	(void) smtps_session_set_trace(c->s, e->trace, e->trace_closure);
    if (c->s != NULL)
	smtps_session_set_runahead(c->s, conn_feed, c);
    if (c->s == NULL || (rc = conn_setup(c)) != SMTPS_OK) {
	/* The same settings fail for every connection: fail the queue. */
	if (c->s == NULL)
	    dest_fail_queue(d, ALL, SMTPS_STATUS_TEMPFAIL, "",
			    "cannot make a session: out of memory");
	else
	    dest_fail_queue(d, ALL, rc == SMTPS_ENOMEM ? SMTPS_STATUS_TEMPFAIL :
			    SMTPS_STATUS_PERMFAIL, "", c->why);
	smtps_session_free(c->s);
	free(c);
	return -1;
    }
    c->phase = CONN_CONNECTING;
    c->next = e->conns;
    if (e->conns != NULL)
	e->conns->prev = c;
    e->conns = c;
    e->nconns++;
    d->nconns++;
    d->nconnecting++;
    c->covers = d->nadded;
    c->addr_first = d->addr_rr++ % d->naddr;
    return conn_connect(c, now);
}

/* conn_connect - try the next address; -1 when none is left (c closed) */

static int conn_connect(struct smtps_conn *c, int64_t now)
{
    struct smtps_engine *e = c->e;
    struct smtps_dest *d = c->d;
    struct smtps_sockaddr *a;
    struct epoll_event ev;
    char    what[SMTPS_WHY_MAX];
    int     fd, one = 1, err;

    while (c->tries < d->naddr) {
	a = &d->addr[(c->addr_first + c->tries++) % d->naddr];
	if (a->ss.ss_family == AF_INET6)
	    inet_ntop(AF_INET6, &((struct sockaddr_in6 *) &a->ss)->sin6_addr,
		      c->addrtext, sizeof(c->addrtext));
	else
	    inet_ntop(AF_INET, &((struct sockaddr_in *) &a->ss)->sin_addr,
		      c->addrtext, sizeof(c->addrtext));
	snprintf(what, sizeof(what), "connect to %.190s[%s]:%d: ", d->host,
		 c->addrtext, d->port);
	fd = socket(a->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
	    conn_why_errno(c, what, errno);
	    continue;
	}
	/* Commands are small and every one waits for a reply: no Nagle. */
	(void) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(fd, (struct sockaddr *) &a->ss, a->len) != 0
	    && errno != EINPROGRESS) {
	    err = errno;
	    close(fd);
	    conn_why_errno(c, what, err);
	    continue;
	}
	memset(&ev, 0, sizeof(ev));
	ev.events = EPOLLOUT;
	ev.data.ptr = c;
	if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, fd, &ev) != 0) {
	    err = errno;
	    close(fd);
	    conn_why_errno(c, what, err);
	    continue;
	}
	c->fd = fd;
	c->events = EPOLLOUT;
	snprintf(c->why, sizeof(c->why), "%.270stimed out", what);
	smtps_timer_set(&e->timers, &c->timer, smtps_time_after(now, dest_connect_ms(d)));
	return 0;
    }
    conn_close(c, now);
    return -1;
}

/* conn_connect_done - the socket became writable (or failed) */

static void conn_connect_done(struct smtps_conn *c, int64_t now)
{
    char    what[SMTPS_WHY_MAX];
    socklen_t len = sizeof(int);
    int     err = 0;

    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0)
	err = errno;
    if (err == 0) {
	conn_connected(c, now);
	return;
    }
    close(c->fd);
    c->fd = -1;
    snprintf(what, sizeof(what), "connect to %.190s[%s]:%d: ", c->d->host,
	     c->addrtext, c->d->port);
    conn_why_errno(c, what, err);
    (void) conn_connect(c, now);
}

/* sockaddr_text - numeric host and port of a socket address */

static int sockaddr_text(const struct sockaddr_storage *ss, char *host,
			         size_t hostlen, int *port)
{
    if (ss->ss_family == AF_INET) {
	const struct sockaddr_in *in = (const struct sockaddr_in *) ss;

	*port = ntohs(in->sin_port);
	return inet_ntop(AF_INET, &in->sin_addr, host, (socklen_t) hostlen) ? 0 : -1;
    }
    if (ss->ss_family == AF_INET6) {
	const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *) ss;

	*port = ntohs(in6->sin6_port);
	return inet_ntop(AF_INET6, &in6->sin6_addr, host, (socklen_t) hostlen) ? 0 : -1;
    }
    return -1;
}

/* conn_record_addresses - tell the session both ends (for PROXY, XCLIENT) */

static void conn_record_addresses(struct smtps_conn *c)
{
    struct sockaddr_storage peer, local;
    socklen_t plen = sizeof(peer), llen = sizeof(local);
    char    ph[INET6_ADDRSTRLEN], lh[INET6_ADDRSTRLEN];
    int     pp, lp;

    if (getpeername(c->fd, (struct sockaddr *) &peer, &plen) == 0
	&& getsockname(c->fd, (struct sockaddr *) &local, &llen) == 0
	&& sockaddr_text(&peer, ph, sizeof(ph), &pp) == 0
	&& sockaddr_text(&local, lh, sizeof(lh), &lp) == 0)
	(void) smtps_session_set_addresses(c->s, ph, pp, lh, lp);
}

/* conn_connected - TCP is up: bind the first message, start the session */

static void conn_connected(struct smtps_conn *c, int64_t now)
{
    c->phase = CONN_OPEN;
    c->d->nconnecting--;
    c->why[0] = 0;
    smtps_timer_cancel(&c->e->timers, &c->timer);
    conn_want(c, EPOLLIN | EPOLLRDHUP);
    conn_record_addresses(c);
    (void) conn_submit_next(c, now);
    if (smtps_session_start(c->s, now) != SMTPS_OK)
	smtps_session_closed(c->s, "the session would not start", now);
    conn_update(c, now);
}

/* conn_submit_next - hand the session the next queued message */

static int conn_submit_next(struct smtps_conn *c, int64_t now)
{
    struct smtps_message *m;
    int     rc;

    if ((m = dest_pop(c->d)) == NULL)
	return 0;
    /* The result made at submit becomes the session's; ours if it refuses. */
    rc = smtps_session_submit_prepared(c->s, m, now);
    if (rc != SMTPS_OK) {
	m->qnext = NULL;
	fail_message(c->e, m, SMTPS_STATUS_TEMPFAIL,
		     "cannot hand the message to a session: ",
		     smtps_strerror(rc));
	return 0;
    }
    c->submitted++;
    return 1;
}

/*
 * conn_feed - the session may start the next message behind a final dot
 * (session.c, maybe_run_ahead()). The same limits as for an idle
 * session apply: messages_per_connection, a QUIT under way, and other
 * destinations waiting for a connection slot. The message's result,
 * made at submit, becomes the session's.
 */

static struct smtps_message *conn_feed(struct smtps_session *s, void *closure)
{
    struct smtps_conn *c = closure;
    struct smtps_engine *e = c->e;
    struct smtps_message *m;

    SMTPS_UNUSED(s);
    if (c->quitting || e->nstarved > e->nquitting
	|| (e->msgs_per_conn > 0 && c->submitted >= (unsigned) e->msgs_per_conn)
	|| (m = dest_pop(c->d)) == NULL)
	return NULL;
    c->submitted++;
    return m;
}

/* conn_collect - move the session's results to the engine */

static void conn_collect(struct smtps_conn *c)
{
    struct smtps_result *r;

    while ((r = smtps_session_next_result(c->s)) != NULL) {
	/*
	 * A transaction began: greeting and EHLO worked, whatever became
	 * of that message. Its failure is its own, not the destination's.
	 */
	if (r->status == SMTPS_STATUS_DELIVERED
	    || r->status == SMTPS_STATUS_PARTIAL
	    || smtps_session_transactions(c->s) > 0)
	    c->usable = 1;
	/* The session's word for a refusal before any transaction. */
	else if (!c->usable && r->status == SMTPS_STATUS_PERMFAIL)
	    c->refused_perm = 1;
	push_result(c->e, r);
    }
    /* A state asked to stop (Ctrl-C): the run returns at once. */
    if (smtps_session_interrupted(c->s))
	c->e->interrupted = 1;
}

/* conn_want - register the epoll interest, only when it changes */

static void conn_want(struct smtps_conn *c, uint32_t events)
{
    struct epoll_event ev;

    if (c->events == events || c->fd < 0)
	return;
    memset(&ev, 0, sizeof(ev));
    ev.events = events;
    ev.data.ptr = c;
    if (epoll_ctl(c->e->epfd, EPOLL_CTL_MOD, c->fd, &ev) == 0)
	c->events = events;
}

/* conn_idle_add - into the pool, most recently used first */

static void conn_idle_add(struct smtps_conn *c, int64_t now)
{
    struct smtps_engine *e = c->e;
    struct smtps_dest *d = c->d;

    if (c->in_idle)
	return;
    c->in_idle = 1;
    c->idle_prev = NULL;
    c->idle_next = d->idle;
    if (d->idle != NULL)
	d->idle->idle_prev = c;
    d->idle = c;
    c->lru_next = NULL;
    c->lru_prev = e->lru_tail;
    if (e->lru_tail != NULL)
	e->lru_tail->lru_next = c;
    else
	e->lru = c;
    e->lru_tail = c;
    smtps_timer_set(&e->timers, &c->timer, smtps_time_after(now, e->idle_ms));
}

/* conn_idle_remove - out of the pool */

static void conn_idle_remove(struct smtps_conn *c)
{
    struct smtps_engine *e = c->e;
    struct smtps_dest *d = c->d;

    if (!c->in_idle)
	return;
    c->in_idle = 0;
    if (c->idle_prev != NULL)
	c->idle_prev->idle_next = c->idle_next;
    else
	d->idle = c->idle_next;
    if (c->idle_next != NULL)
	c->idle_next->idle_prev = c->idle_prev;
    if (c->lru_prev != NULL)
	c->lru_prev->lru_next = c->lru_next;
    else
	e->lru = c->lru_next;
    if (c->lru_next != NULL)
	c->lru_next->lru_prev = c->lru_prev;
    else
	e->lru_tail = c->lru_prev;
    c->idle_prev = c->idle_next = c->lru_prev = c->lru_next = NULL;
    smtps_timer_cancel(&e->timers, &c->timer);
}

/* conn_quit - end the connection politely once the session may */

static void conn_quit(struct smtps_conn *c, int64_t now)
{
    conn_idle_remove(c);
    if (c->quitting)
	return;
    c->quitting = 1;
    c->e->nquitting++;
    (void) smtps_session_quit(c->s, now);
}

/* conn_flush - write what the session has; -1 when the socket failed */

static int conn_flush(struct smtps_conn *c, int64_t now)
{
    const char *data;
    size_t  n;
    ssize_t w;
    char    buf[128];

    for (;;) {
	if (smtps_session_status(c->s) == SMTPS_SESS_CLOSED)
	    return -1;
	if ((n = smtps_session_output(c->s, &data)) == 0)
	    return 0;
	w = send(c->fd, data, n, MSG_NOSIGNAL);
	if (w > 0) {
	    smtps_session_consume(c->s, (size_t) w, now);
	    continue;
	}
	if (w < 0 && errno == EINTR)
	    continue;
	if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
	    return 0;
	if (w == 0 || strerror_r(errno, buf, sizeof(buf)) != 0)
	    snprintf(buf, sizeof(buf), "send failed");
	smtps_session_closed(c->s, buf, now);
	return -1;
    }
}

/* conn_read - the socket is readable (or hung up) */

static void conn_read(struct smtps_conn *c, uint32_t events, int64_t now)
{
    struct smtps_engine *e = c->e;
    ssize_t n;
    char    buf[128];

    for (;;) {
	n = recv(c->fd, e->rbuf, sizeof(e->rbuf), 0);
	if (n > 0) {
	    (void) smtps_session_feed(c->s, e->rbuf, (size_t) n, now);
	    /*
	     * Level-triggered: what is left is reported again, so one read
	     * is enough - unless the peer shut down, when the end must be
	     * seen before anything more is written.
	     */
	    if ((size_t) n < sizeof(e->rbuf)
		&& !(events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)))
		return;
	    continue;
	}
	if (n == 0) {
	    smtps_session_closed(c->s, "the server closed the connection", now);
	    return;
	}
	if (errno == EINTR)
	    continue;
	if (errno == EAGAIN || errno == EWOULDBLOCK)
	    return;
	if (strerror_r(errno, buf, sizeof(buf)) != 0)
	    snprintf(buf, sizeof(buf), "recv failed");
	smtps_session_closed(c->s, buf, now);
	return;
    }
}

/* conn_update - after any change: write, collect, and settle the phase */

static void conn_update(struct smtps_conn *c, int64_t now)
{
    struct smtps_engine *e = c->e;
    struct smtps_dest *d = c->d;
    const char *data;
    int     spent, out;

    for (;;) {
	(void) conn_flush(c, now);
	conn_collect(c);
	out = smtps_session_output(c->s, &data) > 0;
	switch (smtps_session_status(c->s)) {
	case SMTPS_SESS_CLOSED:
	    conn_close(c, now);
	    return;
	case SMTPS_SESS_CLOSING:
	    if (!out) {
		smtps_session_closed(c->s, "closed", now);
		conn_collect(c);
		conn_close(c, now);
		return;
	    }
	    conn_idle_remove(c);
	    if (!c->lingering) {
		c->lingering = 1;
		smtps_timer_set(&e->timers, &c->timer,
				smtps_time_after(now, SMTPS_LINGER_MS));
	    }
	    conn_want(c, EPOLLIN | EPOLLRDHUP | EPOLLOUT);
	    return;
	case SMTPS_SESS_IDLE:
	    c->usable = 1;
	    spent = e->msgs_per_conn > 0 && c->submitted >= (unsigned) e->msgs_per_conn;
	    if (!spent && !c->quitting && d->qhead != NULL && !out) {
		conn_idle_remove(c);
		if (conn_submit_next(c, now))
		    continue;
	    }
	    /* A slot some other destination waits for is worth more. */
	    if (!c->quitting && (spent || e->nstarved > e->nquitting)) {
		conn_quit(c, now);
		if (d->qhead != NULL)
		    dest_dirty(d);		/* another connection must take them */
		continue;
	    }
	    conn_want(c, EPOLLIN | EPOLLRDHUP | (out ? EPOLLOUT : 0));
	    if (!c->quitting)
		conn_idle_add(c, now);
	    return;
	default:				/* ACTIVE */
	    conn_idle_remove(c);
	    conn_want(c, EPOLLIN | EPOLLRDHUP | (out ? EPOLLOUT : 0));
	    smtps_timer_set(&e->timers, &c->timer, smtps_session_deadline(c->s));
	    return;
	}
    }
}

/* conn_timer - c's deadline passed */

static void conn_timer(struct smtps_conn *c, int64_t now)
{
    if (c->phase == CONN_CONNECTING) {
	/* c->why already says "connect to ...: timed out". */
	close(c->fd);
	c->fd = -1;
	(void) conn_connect(c, now);
	return;
    }
    if (c->in_idle) {				/* idle_timeout_ms */
	conn_quit(c, now);
	conn_update(c, now);
	return;
    }
    if (c->lingering) {
	smtps_session_closed(c->s, "timed out sending the last commands", now);
	conn_collect(c);
	conn_close(c, now);
	return;
    }
    (void) smtps_session_tick(c->s, now);
    conn_update(c, now);
}

/* conn_close - the connection is over: settle, account, bury */

static void conn_close(struct smtps_conn *c, int64_t now)
{
    struct smtps_engine *e = c->e;
    struct smtps_dest *d = c->d;
    const char *prefix = "";
    int     was_connecting = c->phase == CONN_CONNECTING;

    if (c->phase == CONN_DEAD)
	return;
    conn_idle_remove(c);
    smtps_timer_cancel(&e->timers, &c->timer);
    if (c->fd >= 0) {
	close(c->fd);				/* leaves the epoll set too */
	c->fd = -1;
    }
    if (c->s != NULL) {
	if (smtps_session_status(c->s) != SMTPS_SESS_CLOSED)
	    smtps_session_closed(c->s, c->why[0] ? c->why : "closed", now);
	conn_collect(c);
	if (!was_connecting) {
	    snprintf(c->why, sizeof(c->why), "%s", smtps_session_reason(c->s));
	    prefix = "not attempted: ";
	}
	smtps_session_free(c->s);
	c->s = NULL;
    }
    if (c->quitting)
	e->nquitting--;
    e->nconns--;
    d->nconns--;
    if (was_connecting)
	d->nconnecting--;

    /*
     * A connection that never became usable says something about the
     * destination. The last one standing fails the messages that were
     * waiting when it was opened (else nothing would ever end them; those
     * queued since deserve an attempt of their own); while others still
     * work, new connections wait a little.
     */
    if (!c->usable) {
	if (d->nconns == 0)
	    dest_fail_queue(d, c->covers > d->ntaken ? c->covers - d->ntaken : 0,
			    c->refused_perm ? SMTPS_STATUS_PERMFAIL :
			    SMTPS_STATUS_TEMPFAIL, prefix,
			    c->why[0] ? c->why : "connection failed");
	else
	    d->backoff_until = smtps_time_after(now, SMTPS_BACKOFF_MS);
    }
    c->phase = CONN_DEAD;
    if (c->prev != NULL)
	c->prev->next = c->next;
    else
	e->conns = c->next;
    if (c->next != NULL)
	c->next->prev = c->prev;
    /* Freed after this round: an event for it may still be in hand. */
    c->prev = NULL;
    c->next = e->dead;
    e->dead = c;
    dest_dirty(d);
    engine_wake_starved(e);
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
	    conn_timer((struct smtps_conn *)
		       ((char *) t - offsetof(struct smtps_conn, timer)), now);
	else
	    dest_timer((struct smtps_dest *)
		       ((char *) t - offsetof(struct smtps_dest, timer)), now);
    }
}

/* engine_resolver_run - take the lookups that came back */

static void engine_resolver_run(struct smtps_engine *e, int64_t now)
{
    struct smtps_resolve_req *req;

    if (e->resolver == NULL)
	return;
    while ((req = smtps_resolver_done(e->resolver)) != NULL)
	dest_resolved(e, req, now);
}

/* smtps_engine_new - an engine with no connection yet */

struct smtps_engine *smtps_engine_new(struct smtps_machine *m,
				              const struct smtps_engine_config *cfg,
				              void *user)
{
    struct smtps_engine_config c;
    struct smtps_engine *e;

    memset(&c, 0, sizeof(c));
    if (cfg != NULL) {
	if (cfg->sizeof_config < CONFIG_MIN_SIZE || cfg->sizeof_config > sizeof(c))
	    return NULL;
	memcpy(&c, cfg, cfg->sizeof_config);
    }
    if (c.max_connections < 0 || c.max_per_destination < 0
	|| c.messages_per_connection < 0 || c.idle_timeout_ms < 0
	|| c.connect_timeout_ms < 0
	|| (c.helo != NULL && check_name(c.helo, SMTPS_HELO_MAX, 1) != SMTPS_OK))
	return NULL;
    if ((e = calloc(1, sizeof(*e))) == NULL)
	return NULL;
    if ((e->epfd = epoll_create1(EPOLL_CLOEXEC)) < 0) {
	free(e);
	return NULL;
    }
    e->max_conns = c.max_connections ? c.max_connections : DEF_MAX_CONNECTIONS;
    e->max_per_dest = c.max_per_destination ? c.max_per_destination :
	DEF_MAX_PER_DEST;
    e->msgs_per_conn = c.messages_per_connection;
    e->idle_ms = c.idle_timeout_ms ? c.idle_timeout_ms : DEF_IDLE_MS;
    e->connect_ms = c.connect_timeout_ms ? c.connect_timeout_ms : DEF_CONNECT_MS;
    /* Longer than anything can wait: cut, so that deadlines cannot overflow. */
    if (e->idle_ms > SMTPS_TIMEOUT_MAX)
	e->idle_ms = SMTPS_TIMEOUT_MAX;
    if (e->connect_ms > SMTPS_TIMEOUT_MAX)
	e->connect_ms = SMTPS_TIMEOUT_MAX;
    snprintf(e->helo, sizeof(e->helo), "%s", c.helo ? c.helo : "localhost");
    e->machine = m ? m : smtps_default_machine();
    smtps_machine_retain(e->machine);
    e->user = user;
    raise_nofile((rlim_t) e->max_conns + 64);
    return e;
}

/* conn_teardown - drop a connection at engine end, QUIT if cheap */

static void conn_teardown(struct smtps_conn *c)
{
    struct smtps_result *r;
    const char *data;
    size_t  n;

    if (c->s != NULL && c->fd >= 0 && c->phase == CONN_OPEN
	&& smtps_session_status(c->s) == SMTPS_SESS_IDLE
	&& smtps_session_quit(c->s, smtps_clock_ms()) == SMTPS_OK
	&& (n = smtps_session_output(c->s, &data)) > 0)
	(void) send(c->fd, data, n, MSG_NOSIGNAL);	/* one try, no wait */
    if (c->fd >= 0)
	close(c->fd);
    if (c->s != NULL) {
	smtps_session_closed(c->s, "the engine was freed", smtps_clock_ms());
	while ((r = smtps_session_next_result(c->s)) != NULL)
	    smtps_result_free(r);
	smtps_session_free(c->s);
    }
    /* Its timer must leave the heap: later cancels move heap entries. */
    smtps_timer_cancel(&c->e->timers, &c->timer);
    free(c);
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
	conn_teardown(c);
    }
    for (i = 0; i < e->nbuckets; i++)
	while ((d = e->buckets[i]) != NULL) {
	    while ((m = dest_pop(d)) != NULL) {
		smtps_result_free(m->qresult);
		smtps_message_free(m);
	    }
	    dest_free(d);
	}
    while ((r = e->results) != NULL) {
	e->results = r->next;
	smtps_result_free(r);
    }
    smtps_resolver_free(e->resolver);	/* after dest_free() dropped owners */
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
    struct smtps_dest *d;
    uint64_t hash;

    if (e == NULL || msg == NULL || dest == NULL
	|| dest->sizeof_destination < DEST_MIN_SIZE
	|| dest->sizeof_destination > sizeof(k))
	return SMTPS_EINVAL;
    /* Fields an older caller did not have read as zero. */
    memset(&k, 0, sizeof(k));
    memcpy(&k, dest, dest->sizeof_destination);
    if (check_name(k.host, SMTPS_HOST_MAX, 1) != SMTPS_OK
	|| k.port < 1 || k.port > 65535
	|| k.tls_mode < SMTPS_TLS_NONE || k.tls_mode > SMTPS_TLS_IMPLICIT
	|| k.timeout_ms < 0
	|| (k.helo != NULL && check_name(k.helo, SMTPS_HELO_MAX, 1) != SMTPS_OK)
	|| (k.tls_servername != NULL
	    && check_name(k.tls_servername, SMTPS_HOST_MAX, 1) != SMTPS_OK)
	|| (k.auth_user != NULL && k.auth_secret == NULL)
	|| msg->nrcpt == 0 || msg->qnext != NULL || msg->qresult != NULL)
	return SMTPS_EINVAL;
    if (k.timeout_ms > SMTPS_TIMEOUT_MAX)
	k.timeout_ms = SMTPS_TIMEOUT_MAX;	/* deadlines cannot overflow */
    hash = dest_hash(&k);
    if ((d = dest_find(e, &k, hash)) == NULL
	&& (d = dest_new(e, &k, hash)) == NULL)
	return SMTPS_ENOMEM;
    /* The result exists before the message is taken: none can be lost. */
    if ((msg->qresult = smtps_result_new(tag, msg->nrcpt)) == NULL) {
	dest_dirty(d);				/* freed by the next run if empty */
	return SMTPS_ENOMEM;
    }
    msg->tag = tag;
    msg->qnext = NULL;
    if (d->qtail != NULL)
	d->qtail->qnext = msg;
    else
	d->qhead = msg;
    d->qtail = msg;
    d->nqueued++;
    d->nadded++;
    e->npending++;
    dest_dirty(d);
    return SMTPS_OK;
}

/* smtps_engine_run - drive everything until a result is ready */

int     smtps_engine_run(struct smtps_engine *e, int64_t max_wait_ms)
{
    struct smtps_timer *t;
    struct smtps_conn *c;
    int64_t now, end, wait;
    uint32_t ev;
    int     n, i, rc = SMTPS_OK, polled = 0;

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
	engine_dirty_run(e, now);
	engine_bury(e);
	if (e->interrupted) {
	    e->interrupted = 0;
	    rc = SMTPS_EINTR;
	    break;
	}
	/* Even with no time to wait, look at the sockets once. */
	if (e->nresults > 0 || e->npending == 0 || (polled && end >= 0 && now >= end))
	    break;
	wait = end >= 0 ? (end > now ? end - now : 0) : -1;
	if ((t = smtps_timers_first(&e->timers)) != NULL
	    && (wait < 0 || t->when - now < wait))
	    wait = t->when > now ? t->when - now : 0;
	if (wait > 3600000)
	    wait = 3600000;			/* epoll_wait() takes an int */
	n = epoll_wait(e->epfd, e->events, SMTPS_ENGINE_EVENTS, (int) wait);
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
	    if ((c = e->events[i].data.ptr) == NULL) {
		engine_resolver_run(e, now);
		continue;
	    }
	    if (c->phase == CONN_DEAD)
		continue;
	    if (c->phase == CONN_CONNECTING) {
		conn_connect_done(c, now);
		continue;
	    }
	    if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
		conn_read(c, ev, now);
	    conn_update(c, now);
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
