/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	timers.c 3
 * SUMMARY
 *	the engine's deadlines: one binary min-heap
 * SYNOPSIS
 *	#include "engine_private.h"
 *
 *	void	smtps_timer_init(t, kind)
 *	int	smtps_timers_reserve(h, n)
 *	void	smtps_timer_set(h, t, when)
 *	void	smtps_timer_cancel(h, t)
 *	struct smtps_timer *smtps_timers_first(h)
 *	void	smtps_timers_free(h)
 * DESCRIPTION
 *	A timer is a struct smtps_timer embedded in whatever owns the
 *	deadline; the heap holds pointers to them, ordered by when, and each
 *	timer remembers its slot so that re-arming or cancelling is
 *	O(log n) without a search.
 *
 *	smtps_timer_init() makes an unarmed timer. smtps_timers_reserve()
 *	makes room for n armed timers in all; smtps_timer_set() arms or
 *	moves a timer (when < 0 cancels it) and relies on that room, so that
 *	it never allocates: the engine reserves when it makes an owner,
 *	where failing is still simple. smtps_timers_first() is the earliest
 *	armed timer, or NULL.
 * DIAGNOSTICS
 *	smtps_timers_reserve() returns SMTPS_OK or SMTPS_ENOMEM.
 *	smtps_timer_set() aborts if room was not reserved: that is our bug.
 *--*/

#include <stdlib.h>

#include "internal.h"
#include "engine_private.h"

static void heap_swap(struct smtps_timer_heap *h, size_t i, size_t j);
static void heap_up(struct smtps_timer_heap *h, size_t i);
static void heap_down(struct smtps_timer_heap *h, size_t i);

/* smtps_timer_init - an unarmed timer of the given kind */

void    smtps_timer_init(struct smtps_timer *t, int kind)
{
    t->when = -1;
    t->index = SMTPS_TIMER_UNARMED;
    t->kind = kind;
}

/* smtps_timers_free - release the heap (the timers belong to others) */

void    smtps_timers_free(struct smtps_timer_heap *h)
{
    free(h->slot);
    h->slot = NULL;
    h->count = h->cap = 0;
}

/* smtps_timers_reserve - room for n armed timers in all */

int     smtps_timers_reserve(struct smtps_timer_heap *h, size_t n)
{
    struct smtps_timer **p;
    size_t  cap;

    if (n <= h->cap)
	return SMTPS_OK;
    cap = h->cap ? h->cap : 64;
    while (cap < n)
	cap *= 2;
    if ((p = realloc(h->slot, cap * sizeof(*p))) == NULL)
	return SMTPS_ENOMEM;
    h->slot = p;
    h->cap = cap;
    return SMTPS_OK;
}

/* heap_swap - exchange two slots, keeping each timer's index true */

static void heap_swap(struct smtps_timer_heap *h, size_t i, size_t j)
{
    struct smtps_timer *t = h->slot[i];

    h->slot[i] = h->slot[j];
    h->slot[j] = t;
    h->slot[i]->index = i;
    h->slot[j]->index = j;
}

/* heap_up - move slot i towards the root while it is earlier */

static void heap_up(struct smtps_timer_heap *h, size_t i)
{
    size_t  parent;

    while (i > 0) {
	parent = (i - 1) / 2;
	if (h->slot[parent]->when <= h->slot[i]->when)
	    break;
	heap_swap(h, i, parent);
	i = parent;
    }
}

/* heap_down - move slot i towards the leaves while it is later */

static void heap_down(struct smtps_timer_heap *h, size_t i)
{
    size_t  l, r, min;

    for (;;) {
	l = 2 * i + 1;
	r = l + 1;
	min = i;
	if (l < h->count && h->slot[l]->when < h->slot[min]->when)
	    min = l;
	if (r < h->count && h->slot[r]->when < h->slot[min]->when)
	    min = r;
	if (min == i)
	    return;
	heap_swap(h, i, min);
	i = min;
    }
}

/* smtps_timer_cancel - disarm a timer (armed or not) */

void    smtps_timer_cancel(struct smtps_timer_heap *h, struct smtps_timer *t)
{
    struct smtps_timer *moved;
    size_t  i = t->index, last;

    if (i == SMTPS_TIMER_UNARMED)
	return;
    last = --h->count;
    if (i != last) {
	moved = h->slot[last];
	h->slot[i] = moved;
	moved->index = i;
	/* The moved timer may belong above or below its new slot. */
	heap_up(h, i);
	heap_down(h, moved->index);
    }
    t->index = SMTPS_TIMER_UNARMED;
    t->when = -1;
}

/* smtps_timer_set - arm or move a timer; when < 0 cancels it */

void    smtps_timer_set(struct smtps_timer_heap *h, struct smtps_timer *t,
			        int64_t when)
{
    int64_t old = t->when;

    if (when < 0) {
	smtps_timer_cancel(h, t);
	return;
    }
    if (t->index == SMTPS_TIMER_UNARMED) {
	if (h->count >= h->cap)
	    abort();				/* smtps_timers_reserve() was not called */
	t->when = when;
	t->index = h->count;
	h->slot[h->count++] = t;
	heap_up(h, t->index);
	return;
    }
    t->when = when;
    if (when < old)
	heap_up(h, t->index);
    else if (when > old)
	heap_down(h, t->index);
}

/* smtps_timers_first - the earliest armed timer, or NULL */

struct smtps_timer *smtps_timers_first(const struct smtps_timer_heap *h)
{
    return h->count > 0 ? h->slot[0] : NULL;
}
