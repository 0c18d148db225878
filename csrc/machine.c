/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	machine.c 3
 * SUMMARY
 *	state table: copy-out registration, ids, order, lookup
 * SYNOPSIS
 *	#include "smtpstate.h"
 *
 *	int	register_smtp_client_state(state, insert_after)
 *	smtp_state *smtp_get_state(id)
 *	smtp_state *smtp_get_state_machine(void)
 *
 *	struct smtps_machine *smtps_default_machine(void)
 *	struct smtps_machine *smtps_machine_new(void)
 *	void	smtps_machine_free(m)
 *	int	smtps_machine_register(m, state, insert_after)
 *	smtp_state *smtps_machine_get(m, id)
 *	smtp_state *smtps_machine_head(m)
 *	int	smtps_machine_find(m, name)
 *	int	smtps_machine_count(m)
 * DESCRIPTION
 *	A machine owns the state records and the order they run in. This
 *	file holds the only global mutable state of the library: the default
 *	machine, made once, on which Momentum's functions act.
 *
 *	Registration copies every field of the caller's struct, deep-copies
 *	the name and keeps closure as given, so the caller may free or reuse
 *	its struct and string at once. The record gets the next free id; ids
 *	are never reused. The order is published as a new immutable snapshot
 *	(struct smtps_order), so sessions already running keep theirs.
 *
 *	sizeof_smtp_state is the ABI guard: any size from SMTPS_STATE_MIN_SIZE
 *	to sizeof(smtp_state) is accepted and the fields it lacks, wholly or
 *	in part, read as zero; a larger size comes from a newer caller whose
 *	fields we cannot honour, and is refused.
 * DIAGNOSTICS
 *	register functions return the new id or -1; lookups return NULL or
 *	SMTPS_ENOTFOUND.
 * SEE ALSO
 *	session.c, which runs a snapshot; states.c, the built-in records.
 *--*/

#include <stdlib.h>
#include <string.h>

#include "internal.h"

static void machine_init(struct smtps_machine *m);
static void machine_publish(struct smtps_machine *m, struct smtps_order *o);
static int machine_valid_id(const struct smtps_order *o, int id);
static void machine_trim(smtp_state *copy, size_t size);
static void make_default(void);

static struct smtps_machine default_machine;
static pthread_once_t default_once = PTHREAD_ONCE_INIT;

/* machine_init - fill a machine with the built-in states in order */

static void machine_init(struct smtps_machine *m)
{
    struct smtps_order *o;
    int id;

    memset(m, 0, sizeof(*m));
    pthread_mutex_init(&m->lock, NULL);
    m->refs = 1;
    o = calloc(1, sizeof(*o));
    if (o == NULL)
	abort();			/* start-up of the library itself */
    o->refs = 1;
    o->count = SMTPS_STATE__COUNT;
    o->head = 0;
    for (id = 0; id < SMTPS_STATE__COUNT; id++) {
	m->states[id] = *smtps_builtin_state(id);
	m->states[id].sizeof_smtp_state = sizeof(smtp_state);
	m->states[id].id = id;
	strncpy(m->names[id], m->states[id].name, SMTPS_STATE_NAME_MAX);
	m->states[id].name = m->names[id];
	o->next[id] = id + 1 < SMTPS_STATE__COUNT ? id + 1 : -1;
    }
    machine_publish(m, o);
}

/* machine_publish - make o the current order and mirror it into next */

static void machine_publish(struct smtps_machine *m, struct smtps_order *o)
{
    struct smtps_order *old = m->order;
    int id;

    for (id = 0; id < o->count; id++)
	m->states[id].next = o->next[id] < 0 ? NULL : &m->states[o->next[id]];
    m->order = o;
    if (old != NULL)
	smtps_order_release(old);
}

/* machine_valid_id - id names a state of this order */

static int machine_valid_id(const struct smtps_order *o, int id)
{
    return id >= 0 && id < o->count;
}

/* machine_trim - zero the fields a short struct holds only part of */

static void machine_trim(smtp_state *copy, size_t size)
{
#define LACKS(f) (size < offsetof(smtp_state, f) + sizeof(copy->f))
    if (LACKS(free))
	copy->free = NULL;
    if (LACKS(tostage))
	copy->tostage = NULL;
    if (LACKS(tostring))
	copy->tostring = NULL;
    if (LACKS(closure))
	copy->closure = NULL;
    if (LACKS(flags))
	copy->flags = 0;
#undef LACKS
}

/* make_default - pthread_once body for the default machine */

static void make_default(void)
{
    machine_init(&default_machine);
    default_machine.is_default = 1;
}

/* smtps_default_machine - the machine Momentum's functions act on */

struct smtps_machine *smtps_default_machine(void)
{
    pthread_once(&default_once, make_default);
    return &default_machine;
}

/* smtps_machine_new - a machine with the built-in order only */

struct smtps_machine *smtps_machine_new(void)
{
    struct smtps_machine *m = malloc(sizeof(*m));

    if (m == NULL)
	return NULL;
    machine_init(m);
    return m;
}

/* smtps_machine_retain - one more reference (a session) */

void smtps_machine_retain(struct smtps_machine *m)
{
    __atomic_add_fetch(&m->refs, 1, __ATOMIC_RELAXED);
}

/* smtps_machine_free - drop a reference; the last one frees */

void smtps_machine_free(struct smtps_machine *m)
{
    if (m == NULL || m->is_default)
	return;
    if (__atomic_sub_fetch(&m->refs, 1, __ATOMIC_ACQ_REL) != 0)
	return;
    smtps_order_release(m->order);
    pthread_mutex_destroy(&m->lock);
    free(m);
}

/* smtps_machine_snapshot - a reference to the current order */

struct smtps_order *smtps_machine_snapshot(struct smtps_machine *m)
{
    struct smtps_order *o;

    pthread_mutex_lock(&m->lock);
    o = m->order;
    __atomic_add_fetch(&o->refs, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&m->lock);
    return o;
}

/* smtps_order_release - drop a reference to an order */

void smtps_order_release(struct smtps_order *o)
{
    if (o != NULL && __atomic_sub_fetch(&o->refs, 1, __ATOMIC_ACQ_REL) == 0)
	free(o);
}

/* smtps_machine_register - copy a state in after insert_after */

int smtps_machine_register(struct smtps_machine *m, smtp_state *state,
			   int insert_after)
{
    smtp_state copy;
    struct smtps_order *cur, *o;
    size_t size, name_len;
    int id, i;

    if (m == NULL || state == NULL)
	return -1;
    size = state->sizeof_smtp_state;
    if (size < SMTPS_STATE_MIN_SIZE || size > sizeof(smtp_state))
	return -1;

    /*
     * Copy only the bytes the caller says it has; the rest stay zero. This
     * is what lets an older, smaller struct register safely. A size that
     * ends inside a field lacks that field too: never half a pointer.
     */
    memset(&copy, 0, sizeof(copy));
    memcpy(&copy, state, size);
    machine_trim(&copy, size);
    if (copy.name == NULL || copy.callback == NULL)
	return -1;
    name_len = strnlen(copy.name, SMTPS_STATE_NAME_MAX + 1);
    if (name_len == 0 || name_len > SMTPS_STATE_NAME_MAX)
	return -1;

    pthread_mutex_lock(&m->lock);
    cur = m->order;
    id = cur->count;
    if (id >= SMTPS_MAX_STATES
	|| (insert_after != -1 && !machine_valid_id(cur, insert_after)))
	goto fail;
    for (i = 0; i < cur->count; i++)
	if (strcmp(m->names[i], copy.name) == 0)
	    goto fail;
    if ((o = malloc(sizeof(*o))) == NULL)
	goto fail;
    *o = *cur;
    o->refs = 1;
    o->count = id + 1;
    if (insert_after == -1) {
	o->next[id] = o->head;
	o->head = id;
    } else {
	o->next[id] = o->next[insert_after];
	o->next[insert_after] = id;
    }
    memcpy(m->names[id], copy.name, name_len);
    m->names[id][name_len] = 0;
    copy.name = m->names[id];
    copy.id = id;
    copy.sizeof_smtp_state = sizeof(smtp_state);
    m->states[id] = copy;
    machine_publish(m, o);
    pthread_mutex_unlock(&m->lock);
    return id;

fail:
    pthread_mutex_unlock(&m->lock);
    return -1;
}

/* smtps_machine_get - the record of id, or NULL */

smtp_state *smtps_machine_get(struct smtps_machine *m, int id)
{
    smtp_state *st = NULL;

    if (m == NULL)
	return NULL;
    pthread_mutex_lock(&m->lock);
    if (machine_valid_id(m->order, id))
	st = &m->states[id];
    pthread_mutex_unlock(&m->lock);
    return st;
}

/* smtps_machine_head - the first state of the current order */

smtp_state *smtps_machine_head(struct smtps_machine *m)
{
    smtp_state *st;

    if (m == NULL)
	return NULL;
    pthread_mutex_lock(&m->lock);
    st = &m->states[m->order->head];
    pthread_mutex_unlock(&m->lock);
    return st;
}

/* smtps_machine_find - id of the state called name */

int smtps_machine_find(struct smtps_machine *m, const char *name)
{
    int i, id = SMTPS_ENOTFOUND;

    if (m == NULL || name == NULL)
	return SMTPS_EINVAL;
    pthread_mutex_lock(&m->lock);
    for (i = 0; i < m->order->count; i++)
	if (strcmp(m->names[i], name) == 0) {
	    id = i;
	    break;
	}
    pthread_mutex_unlock(&m->lock);
    return id;
}

/* smtps_machine_count - how many states the machine has */

int smtps_machine_count(struct smtps_machine *m)
{
    int n;

    if (m == NULL)
	return SMTPS_EINVAL;
    pthread_mutex_lock(&m->lock);
    n = m->order->count;
    pthread_mutex_unlock(&m->lock);
    return n;
}

/* register_smtp_client_state - Momentum's registration, default machine */

int register_smtp_client_state(smtp_state *state, int insert_after)
{
    return smtps_machine_register(smtps_default_machine(), state, insert_after);
}

/* smtp_get_state - Momentum's lookup by id, default machine */

smtp_state *smtp_get_state(int id)
{
    return smtps_machine_get(smtps_default_machine(), id);
}

/* smtp_get_state_machine - Momentum's head of the order, default machine */

smtp_state *smtp_get_state_machine(void)
{
    return smtps_machine_head(smtps_default_machine());
}
