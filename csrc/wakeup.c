/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	wakeup.c 3
 * SUMMARY
 *	the engine's wake-up: an eventfd in its epoll set, and what another
 *	event loop needs to watch the engine
 * SYNOPSIS
 *	#include "smtpstate.h"
 *
 *	int	smtps_engine_wake(e)
 *	int	smtps_engine_fileno(e)
 *	int64_t smtps_engine_next_deadline(e)
 *
 *	#include "engine_private.h"
 *
 *	int	smtps_wakeup_open(e)
 *	void	smtps_wakeup_drain(e)
 *	void	smtps_wakeup_close(e)
 * DESCRIPTION
 *	This module owns the one thing about an engine that another thread
 *	may touch: its wake-up descriptor. An engine's loop sleeps in
 *	epoll_wait() with the GIL released; a message handed over by another
 *	thread, or a request to stop, must end that sleep at once rather than
 *	at the next timer. smtps_engine_wake() writes to an eventfd that is in
 *	the engine's epoll set; the loop sees it readable, drains it
 *	(smtps_wakeup_drain()) and returns to its caller, who takes what was
 *	handed over. The descriptor is made with the engine and never
 *	changes until the engine is freed, so reading e->wakefd from another
 *	thread is safe; write(2) on an eventfd is atomic and async-signal-safe,
 *	so no lock is needed, and the single-threaded path pays nothing.
 *
 *	smtps_engine_fileno() and smtps_engine_next_deadline() let another
 *	event loop (selectors, asyncio, trio, gevent) drive the engine with
 *	smtps_engine_serve(e, 0): the epoll descriptor is readable whenever
 *	a socket, the resolver or the wake-up has something, and the next
 *	deadline says when the engine must run although nothing is readable.
 * DIAGNOSTICS
 *	smtps_wakeup_open() returns SMTPS_ESYS when no eventfd could be made
 *	or watched. smtps_engine_wake() returns SMTPS_EINVAL for NULL,
 *	SMTPS_ESYS when the write failed (never for a full counter: a wake-up
 *	already pending is as good).
 * SEE ALSO
 *	engine.c, eventfd(2), epoll(7).
 *--*/

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>

#include "engine_private.h"

/* smtps_wakeup_open - make the eventfd and put it in the epoll set */

int     smtps_wakeup_open(struct smtps_engine *e)
{
    struct epoll_event ev;

    if ((e->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0)
	return SMTPS_ESYS;
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN;
    ev.data.ptr = SMTPS_WAKEUP_MARK(e);
    if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, e->wakefd, &ev) != 0) {
	close(e->wakefd);
	e->wakefd = -1;
	return SMTPS_ESYS;
    }
    return SMTPS_OK;
}

/* smtps_wakeup_drain - the loop saw the wake-up: reset it */

void    smtps_wakeup_drain(struct smtps_engine *e)
{
    uint64_t n;

    /* Nonblocking: EAGAIN when another drain got there first. */
    while (read(e->wakefd, &n, sizeof(n)) < 0 && errno == EINTR)
	continue;
}

/* smtps_wakeup_close - at engine end */

void    smtps_wakeup_close(struct smtps_engine *e)
{
    if (e->wakefd >= 0)
	close(e->wakefd);			/* leaves the epoll set too */
    e->wakefd = -1;
}

/* smtps_engine_wake - end the loop's wait now; any thread, any time */

int     smtps_engine_wake(struct smtps_engine *e)
{
    uint64_t one = 1;
    ssize_t n;

    if (e == NULL)
	return SMTPS_EINVAL;
    do
	n = write(e->wakefd, &one, sizeof(one));
    while (n < 0 && errno == EINTR);
    /* EAGAIN: the counter is full, so a wake-up is pending anyway. */
    if (n < 0 && errno != EAGAIN)
	return SMTPS_ESYS;
    return SMTPS_OK;
}

/* smtps_engine_fileno - the descriptor another event loop watches */

int     smtps_engine_fileno(const struct smtps_engine *e)
{
    return e != NULL ? e->epfd : SMTPS_EINVAL;
}

/*
 * smtps_engine_next_deadline - ms until the engine must run with nothing
 * readable; 0 when work is ready (destinations to dispatch, results not
 * taken), -1 when no timer is armed
 */

int64_t smtps_engine_next_deadline(const struct smtps_engine *e)
{
    const struct smtps_timer *t;
    int64_t now;

    if (e == NULL)
	return -1;
    if (e->dirty != NULL || e->nresults > 0)
	return 0;
    if ((t = smtps_timers_first(&e->timers)) == NULL)
	return -1;
    now = smtps_clock_ms();
    return t->when > now ? t->when - now : 0;
}
