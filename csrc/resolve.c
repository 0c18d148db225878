/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	resolve.c 3
 * SUMMARY
 *	host names to addresses without blocking the engine's loop
 * SYNOPSIS
 *	#include "engine_private.h"
 *
 *	int	smtps_resolve_literal(host, port, addr)
 *
 *	struct smtps_resolve_req *smtps_resolve_req_new(host, port, owner)
 *	void	smtps_resolve_req_free(req)
 *
 *	struct smtps_resolver *smtps_resolver_new(void)
 *	int	smtps_resolver_fd(r)
 *	int	smtps_resolver_submit(r, req)
 *	struct smtps_resolve_req *smtps_resolver_done(r)
 *	void	smtps_resolver_free(r)
 * DESCRIPTION
 *	getaddrinfo() blocks for as long as DNS takes, so it must never run
 *	on the engine's thread. A resolver keeps up to SMTPS_RESOLVE_WORKERS
 *	worker threads, started when lookups wait and none is free; each
 *	takes a request, calls getaddrinfo(), queues the answer and bumps an
 *	eventfd that the engine watches with epoll. The engine then collects
 *	answers with smtps_resolver_done().
 *
 *	smtps_resolve_literal() needs no thread: it parses an IPv4 or IPv6
 *	literal (brackets allowed, "[::1]") with AI_NUMERICHOST, which never
 *	touches the network. It returns 1 for a literal, 0 for a name.
 *
 *	Shutdown never waits for DNS. The resolver is reference counted:
 *	the engine holds one reference and every worker one; the workers are
 *	detached. smtps_resolver_free() marks it shut down, drops queued
 *	requests, closes the eventfd and drops the engine's reference; a
 *	worker still inside getaddrinfo() frees its request when it returns,
 *	and the last one out frees the resolver. The eventfd is written only
 *	under the lock and only while not shut down, so a worker can never
 *	write to a descriptor number the process has reused.
 *
 *	Workers block every signal: signals belong to the application's
 *	threads (Python handles them in its main thread).
 * DIAGNOSTICS
 *	smtps_resolver_new() returns NULL when the eventfd or memory is not
 *	available; smtps_resolver_submit() returns SMTPS_OK, or SMTPS_ESYS
 *	when no worker runs and none can be started.
 * SEE ALSO
 *	engine.c, getaddrinfo(3), eventfd(2).
 *--*/

#include <errno.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/eventfd.h>

#include "internal.h"
#include "engine_private.h"

struct smtps_resolver {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int     refs;			/* the engine's, plus one per worker */
    int     shutdown;
    int     nworkers;
    int     nidle;			/* workers waiting for a request */
    size_t  ntodo;
    int     evfd;			/* readable when done is not empty */
    struct smtps_resolve_req *todo, *todo_tail;
    struct smtps_resolve_req *done, *done_tail;
};

static void *resolver_worker(void *arg);
static void resolver_lookup(struct smtps_resolve_req *req);
static void resolver_unref(struct smtps_resolver *r);
static void resolver_drop_list(struct smtps_resolve_req *req);
static int resolver_spawn(struct smtps_resolver *r);
static int copy_addresses(struct smtps_resolve_req *req,
			          const struct addrinfo *ai);

/* copy_addresses - keep up to SMTPS_RESOLVE_MAX stream addresses */

static int copy_addresses(struct smtps_resolve_req *req,
			          const struct addrinfo *ai)
{
    for (req->naddr = 0; ai != NULL && req->naddr < SMTPS_RESOLVE_MAX;
	 ai = ai->ai_next) {
	if ((ai->ai_family != AF_INET && ai->ai_family != AF_INET6)
	    || ai->ai_addrlen > sizeof(struct sockaddr_storage))
	    continue;
	memcpy(&req->addr[req->naddr].ss, ai->ai_addr, ai->ai_addrlen);
	req->addr[req->naddr].len = ai->ai_addrlen;
	req->naddr++;
    }
    return req->naddr > 0 ? 0 : EAI_NONAME;
}

/* smtps_resolve_literal - parse an address literal; 1 if it was one */

int     smtps_resolve_literal(const char *host, int port,
			              struct smtps_sockaddr *addr)
{
    struct addrinfo hints, *ai = NULL;
    char    buf[256], service[16];
    size_t  len = strlen(host);
    int     rc;

    /* "[2001:db8::1]", as in URLs and SMTP address literals. */
    if (len >= 2 && host[0] == '[' && host[len - 1] == ']') {
	if (len - 2 >= sizeof(buf))
	    return 0;
	memcpy(buf, host + 1, len - 2);
	buf[len - 2] = 0;
	host = buf;
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

/* smtps_resolve_req_new - a lookup of host for port */

struct smtps_resolve_req *smtps_resolve_req_new(const char *host, int port,
						        void *owner)
{
    struct smtps_resolve_req *req = calloc(1, sizeof(*req));

    if (req == NULL)
	return NULL;
    if ((req->host = smtps_strndup(host, strlen(host))) == NULL) {
	free(req);
	return NULL;
    }
    req->port = port;
    req->owner = owner;
    return req;
}

/* smtps_resolve_req_free - release a request */

void    smtps_resolve_req_free(struct smtps_resolve_req *req)
{
    if (req == NULL)
	return;
    free(req->host);
    free(req);
}

/* resolver_drop_list - free a chain of requests */

static void resolver_drop_list(struct smtps_resolve_req *req)
{
    struct smtps_resolve_req *next;

    for (; req != NULL; req = next) {
	next = req->next;
	smtps_resolve_req_free(req);
    }
}

/* smtps_resolver_new - an idle resolver with its eventfd */

struct smtps_resolver *smtps_resolver_new(void)
{
    struct smtps_resolver *r = calloc(1, sizeof(*r));

    if (r == NULL)
	return NULL;
    if ((r->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0) {
	free(r);
	return NULL;
    }
    if (pthread_mutex_init(&r->lock, NULL) != 0) {
	close(r->evfd);
	free(r);
	return NULL;
    }
    if (pthread_cond_init(&r->cond, NULL) != 0) {
	pthread_mutex_destroy(&r->lock);
	close(r->evfd);
	free(r);
	return NULL;
    }
    r->refs = 1;
    return r;
}

/* smtps_resolver_fd - the descriptor to watch for finished lookups */

int     smtps_resolver_fd(const struct smtps_resolver *r)
{
    return r->evfd;
}

/* resolver_spawn - start one detached worker; call with the lock held */

static int resolver_spawn(struct smtps_resolver *r)
{
    pthread_attr_t attr;
    pthread_t tid;
    sigset_t all, old;
    int     rc;

    if (pthread_attr_init(&attr) != 0)
	return -1;
    (void) pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    /* The worker inherits this mask: no signal is ever delivered to it. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(&tid, &attr, resolver_worker, r);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (rc != 0)
	return -1;
    r->nworkers++;
    r->refs++;
    return 0;
}

/* smtps_resolver_submit - queue a lookup; a worker will take it */

int     smtps_resolver_submit(struct smtps_resolver *r,
			              struct smtps_resolve_req *req)
{
    int     rc = SMTPS_OK;

    req->next = NULL;
    pthread_mutex_lock(&r->lock);
    if (r->ntodo + 1 > (size_t) r->nidle && r->nworkers < SMTPS_RESOLVE_WORKERS
	&& resolver_spawn(r) != 0 && r->nworkers == 0)
	rc = SMTPS_ESYS;			/* nobody would ever answer */
    if (rc == SMTPS_OK) {
	if (r->todo_tail != NULL)
	    r->todo_tail->next = req;
	else
	    r->todo = req;
	r->todo_tail = req;
	r->ntodo++;
	pthread_cond_signal(&r->cond);
    }
    pthread_mutex_unlock(&r->lock);
    return rc;
}

/* smtps_resolver_done - the next finished lookup, or NULL */

struct smtps_resolve_req *smtps_resolver_done(struct smtps_resolver *r)
{
    struct smtps_resolve_req *req;
    uint64_t count;

    pthread_mutex_lock(&r->lock);
    if ((req = r->done) != NULL) {
	r->done = req->next;
	if (r->done == NULL)
	    r->done_tail = NULL;
	req->next = NULL;
    } else {
	/* Drained: reset the eventfd so epoll stops reporting it. */
	if (read(r->evfd, &count, sizeof(count)) < 0 && errno != EAGAIN)
	    count = 0;
    }
    pthread_mutex_unlock(&r->lock);
    return req;
}

/* resolver_lookup - the blocking part, run by a worker */

static void resolver_lookup(struct smtps_resolve_req *req)
{
    struct addrinfo hints, *ai = NULL;
    char    service[16];

    memset(&hints, 0, sizeof(hints));
    /*
     * No AI_ADDRCONFIG: on a host whose only configured addresses are
     * loopback ones it hides every address, "localhost" included.
     */
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    snprintf(service, sizeof(service), "%d", req->port);
    req->error = getaddrinfo(req->host, service, &hints, &ai);
    if (req->error == 0) {
	req->error = copy_addresses(req, ai);
	freeaddrinfo(ai);
    } else if (req->error == EAI_SYSTEM && errno == 0) {
	req->error = EAI_FAIL;
    }
}

/* resolver_worker - take requests until shut down */

static void *resolver_worker(void *arg)
{
    struct smtps_resolver *r = arg;
    struct smtps_resolve_req *req;
    uint64_t one = 1;

    pthread_mutex_lock(&r->lock);
    for (;;) {
	while (!r->shutdown && r->todo == NULL) {
	    r->nidle++;
	    pthread_cond_wait(&r->cond, &r->lock);
	    r->nidle--;
	}
	if (r->shutdown)
	    break;
	req = r->todo;
	r->todo = req->next;
	if (r->todo == NULL)
	    r->todo_tail = NULL;
	r->ntodo--;
	pthread_mutex_unlock(&r->lock);

	resolver_lookup(req);

	pthread_mutex_lock(&r->lock);
	if (r->shutdown) {			/* nobody wants the answer */
	    smtps_resolve_req_free(req);
	    continue;
	}
	req->next = NULL;
	if (r->done_tail != NULL)
	    r->done_tail->next = req;
	else
	    r->done = req;
	r->done_tail = req;
	/* EAGAIN would mean the counter is full: it is readable anyway. */
	if (write(r->evfd, &one, sizeof(one)) < 0 && errno != EAGAIN)
	    one = 1;
    }
    r->nworkers--;
    pthread_mutex_unlock(&r->lock);
    resolver_unref(r);
    return NULL;
}

/* resolver_unref - drop one reference; the last one frees */

static void resolver_unref(struct smtps_resolver *r)
{
    int     last;

    pthread_mutex_lock(&r->lock);
    last = --r->refs == 0;
    pthread_mutex_unlock(&r->lock);
    if (!last)
	return;
    pthread_cond_destroy(&r->cond);
    pthread_mutex_destroy(&r->lock);
    free(r);
}

/* smtps_resolver_free - shut down without waiting for DNS */

void    smtps_resolver_free(struct smtps_resolver *r)
{
    struct smtps_resolve_req *todo, *done;

    if (r == NULL)
	return;
    pthread_mutex_lock(&r->lock);
    r->shutdown = 1;
    todo = r->todo;
    done = r->done;
    r->todo = r->todo_tail = r->done = r->done_tail = NULL;
    r->ntodo = 0;
    close(r->evfd);
    r->evfd = -1;
    pthread_cond_broadcast(&r->cond);
    pthread_mutex_unlock(&r->lock);
    resolver_drop_list(todo);
    resolver_drop_list(done);
    resolver_unref(r);
}
