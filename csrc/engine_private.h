/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	engine_private.h 3h
 * SUMMARY
 *	the engine's own modules: the deadline heap and the name resolver
 * SYNOPSIS
 *	#include "engine_private.h"
 * DESCRIPTION
 *	Declarations shared by engine.c, timers.c and resolve.c, never seen
 *	by cffi and not public API.
 *
 *	timers.c: every deadline of an engine (connect timeouts, session
 *	deadlines, idle timeouts, DNS timeouts, back-off ends) lives in one
 *	binary min-heap of struct smtps_timer, embedded in the object that
 *	owns it. Room is reserved when an owner is made, so that arming a
 *	timer never allocates and never fails.
 *
 *	resolve.c: host names are looked up with getaddrinfo() in detached
 *	worker threads; a finished lookup is queued and an eventfd becomes
 *	readable in the engine's epoll set. Literal addresses never get
 *	there: smtps_resolve_literal() parses them at once.
 * SEE ALSO
 *	engine.c, timers.c, resolve.c.
 *--*/

#ifndef SMTPS_ENGINE_PRIVATE_H
#define SMTPS_ENGINE_PRIVATE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

/* ------------------------------------------------------------------ */
/* timers.c                                                            */
/* ------------------------------------------------------------------ */

#define SMTPS_TIMER_UNARMED ((size_t) -1)

struct smtps_timer {
    int64_t when;			/* absolute ms on the engine's clock */
    size_t  index;			/* slot in the heap, or SMTPS_TIMER_UNARMED */
    int     kind;			/* what embeds it; the engine's business */
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

#define SMTPS_RESOLVE_MAX 8		/* addresses kept per name */
#define SMTPS_RESOLVE_WORKERS 4		/* lookups at once, per engine */

struct smtps_sockaddr {
    struct sockaddr_storage ss;
    socklen_t len;
};

struct smtps_resolve_req {
    /* Written by the engine before submitting; read by the worker. */
    char   *host;
    int     port;
    /* The engine's; workers never touch it (NULL: abandoned). */
    void   *owner;
    /* Written by the worker; read by the engine once handed back. */
    int     error;			/* 0, or a getaddrinfo() EAI_* code */
    size_t  naddr;
    struct smtps_sockaddr addr[SMTPS_RESOLVE_MAX];
    struct smtps_resolve_req *next;
};

struct smtps_resolver;

int     smtps_resolve_literal(const char *host, int port,
			              struct smtps_sockaddr *addr);
struct smtps_resolve_req *smtps_resolve_req_new(const char *host, int port,
						        void *owner);
void    smtps_resolve_req_free(struct smtps_resolve_req *req);
struct smtps_resolver *smtps_resolver_new(void);
int     smtps_resolver_fd(const struct smtps_resolver *r);
int     smtps_resolver_submit(struct smtps_resolver *r,
			              struct smtps_resolve_req *req);
struct smtps_resolve_req *smtps_resolver_done(struct smtps_resolver *r);
void    smtps_resolver_free(struct smtps_resolver *r);

#endif /* SMTPS_ENGINE_PRIVATE_H */
