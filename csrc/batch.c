/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	batch.c 3
 * SUMMARY
 *	the Python driver's fast paths: prepared envelopes in, results out
 *	in batches
 * SYNOPSIS
 *	#include "smtpstate.h"
 *
 *	struct smtps_message *smtps_message_copy(envelope, body, len)
 *	int	smtps_engine_submit_copy(e, envelope, body, len, dest, tag)
 *	int	smtps_engine_submit_plain(e, sender, slen, rcpts, rlen, nrcpt,
 *					  body, len, dest, tag)
 *
 *	struct smtps_collector *smtps_collector_new(void)
 *	void	smtps_collector_free(c)
 *	int	smtps_engine_collect(e, c, out, max)
 *	int	smtps_engine_run_collect(e, max_wait_ms, c, out, max)
 *	int	smtps_engine_serve_collect(e, max_wait_ms, c, out, max)
 *	const struct smtps_result *smtps_collector_shape(c, slot)
 *	const struct smtps_result_reply *smtps_collector_reply(c, slot)
 * DESCRIPTION
 *	This module owns two things that only make a driver cheaper per
 *	message; neither changes what is delivered or what a result says.
 *	A driver in C gains little from them; one in Python, where every
 *	call and every field read costs more than the C work behind it,
 *	gains most of its per-message overhead back.
 *
 *	Prepared envelopes. A message sent many times (a benchmark, one
 *	newsletter to many servers) is built and checked once, as an
 *	envelope: a message made with smtps_message_new() and set up as
 *	usual, normally without a body, that is never submitted itself.
 *	smtps_message_copy() makes a new message with the envelope's
 *	sender, recipients, DSN, REQUIRETLS and body options and a copy of body
 *	(checked and scanned like smtps_message_set_body() does);
 *	smtps_engine_submit_copy() does that and submits the copy, in one
 *	call. The envelope itself is only read, so any number of threads
 *	may copy it at once. A body in bytes comes from the caller each
 *	time rather than from the envelope, so that a prepared envelope
 *	never holds a second copy of a large body; a body the envelope
 *	references (a mapped file, fixed bytes) or reads as it goes (a
 *	source) is shared by every copy instead (body NULL), never copied.
 *	Fixed bytes (smtps_message_set_body_fixed()) are not scanned again:
 *	shared, they go as checked (body_shared), and given back as body
 *	(the same pointer and length) they are copied without a scan.
 *
 *	Plain messages. Most messages are sent once, with a sender, a few
 *	recipients without options and a body in bytes; for them an
 *	envelope is made, copied once and thrown away, which from Python
 *	is five calls (each releasing and retaking the GIL) where one
 *	would do. smtps_engine_submit_plain() makes the message from
 *	sender (slen bytes), rcpts (rlen bytes: nrcpt addresses, one LF
 *	between each two, as smtps_message_check_plain() takes them) and
 *	body, as smtps_message_new(), smtps_message_set_sender(),
 *	smtps_message_add_recipient() (no DSN options) and
 *	smtps_message_set_body_fixed() would, with every check they make,
 *	and submits it. The body is not copied: like the fixed bytes of an
 *	envelope, it must stay alive and unchanged until the message's
 *	result is out, and it is sent as checked here, from where it is.
 *
 *	Collected results. smtps_engine_collect() takes up to max ready
 *	results of an engine (at most SMTPS_COLLECT_MAX) and describes each
 *	with three numbers in out: its tag, its shape slot and its reply
 *	slot. A server says the same few things again and again, so a
 *	collector remembers the last SMTPS_COLLECT_SLOTS distinct results
 *	and replies:
 *
 *	The shape of a result is everything in it but its tag and its
 *	deciding reply: status, state, stage, stage name, reason, bounce
 *	class and each recipient's status, reply and bounce class. A result
 *	whose shape is remembered is freed at once and described by that
 *	slot, a number below SMTPS_COLLECT_SLOTS; the caller reuses what it
 *	made of the slot before. Otherwise the result itself is kept in a
 *	slot and described as slot + SMTPS_COLLECT_SLOTS: "new, read it
 *	with smtps_collector_shape(c, slot)".
 *
 *	The deciding reply is remembered apart, because servers put queue
 *	ids in it and results whose shapes repeat exactly may still differ
 *	there. Reply slot 0 always means "no reply" (code 0); otherwise a
 *	slot below SMTPS_COLLECT_SLOTS is a reply seen before, and slot +
 *	SMTPS_COLLECT_SLOTS a new one, to read with smtps_collector_reply().
 *
 *	Within one call a new slot is never reused, so everything a call
 *	describes as new stays readable until the next call on the same
 *	collector. Slots are reused in clock order (a slot hit since the
 *	hand last passed gets a second chance), so the shapes and replies
 *	in steady use stay remembered while a stream of one-off replies
 *	passes through. A result or reply too big to be worth keeping
 *	(SMTPS_COLLECT_KEEP bytes) is still described as new, and freed at
 *	the start of the next call: a collector holds a bounded amount of
 *	memory, whatever the servers say.
 *
 *	smtps_engine_run_collect() is smtps_engine_run() followed by
 *	smtps_engine_collect(), one call instead of two per turn of the
 *	driver's loop; smtps_engine_serve_collect() the same for
 *	smtps_engine_serve().
 *
 *	A collector belongs to one caller and is used from one thread at a
 *	time, like the engine; it may serve several engines in turn.
 * DIAGNOSTICS
 *	smtps_message_copy() and smtps_collector_new() return NULL when out
 *	of memory (or, for the copy, for a NULL envelope or a body refused).
 *	smtps_engine_submit_copy() returns what smtps_engine_submit() does,
 *	SMTPS_EINVAL for a NULL envelope or a body refused, SMTPS_ENOMEM; the copy is
 *	freed when it was not taken. smtps_engine_submit_plain() returns
 *	the same, and what the setters return for an address or body they
 *	refuse, or SMTPS_EINVAL when rcpts does not hold nrcpt addresses;
 *	nothing is submitted then. smtps_engine_collect() returns the
 *	number of results described (0 when none is ready), SMTPS_EINVAL
 *	for a NULL argument; smtps_engine_run_collect() also returns
 *	smtps_engine_run()'s errors, and then collects nothing.
 *	smtps_collector_shape() and smtps_collector_reply() return NULL for
 *	a slot that holds nothing.
 * SEE ALSO
 *	message.c, result.c, engine.c.
 *--*/

#include <stdlib.h>
#include <string.h>

#include "internal.h"

static struct smtps_message *message_copy(const struct smtps_message *envelope,
					  const char *body, size_t len,
					  int *rc);

/* Bytes of text (plus recipient records) above which a slot is transient. */
#define SMTPS_COLLECT_KEEP 8192

/* What the clock and the lookups need of any slot: its first member. */
struct slot_mark {
    uint64_t hash;
    int     used;			/* hit since the clock hand passed */
    int     fresh;			/* made in the current call: keep */
    int     transient;			/* free at the start of the next call */
};

struct shape_slot {
    struct slot_mark m;
    struct smtps_result *r;		/* NULL: empty */
};

struct reply_slot {
    struct slot_mark m;
    struct smtps_result_reply reply;	/* text NULL: empty */
};

struct smtps_collector {
    struct shape_slot shape[SMTPS_COLLECT_SLOTS];
    struct reply_slot reply[SMTPS_COLLECT_SLOTS];	/* [0]: no reply */
    size_t  shape_hand;
    size_t  reply_hand;
    size_t  shape_mru;			/* the slot hit or filled last: */
    size_t  reply_mru;			/* compared first, without a hash */
    size_t  ntransient;			/* slots to empty at the next call */
    char    empty[1];			/* slot 0's text */
};

/*
 * The clock must always find a victim that is not fresh: a call makes at
 * most SMTPS_COLLECT_MAX slots fresh, and reply slot 0 is never a victim.
 */
#if SMTPS_COLLECT_MAX + 2 > SMTPS_COLLECT_SLOTS
#error "SMTPS_COLLECT_MAX must leave reusable slots"
#endif

/* hash_bytes - FNV-1a, continued from h */

static uint64_t hash_bytes(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = p;
    size_t  i;

    for (i = 0; i < n; i++) {
	h ^= b[i];
	h *= 0x100000001b3ULL;
    }
    return h;
}

/* hash_int - an int into the hash */

static uint64_t hash_int(uint64_t h, long long v)
{
    return hash_bytes(h, &v, sizeof(v));
}

/* text_of - a result string; never NULL by result.c's contract, but cheap */

static const char *text_of(const char *s)
{
    return s != NULL ? s : "";
}

/* hash_reply - a reply's code, enhanced code and text */

static uint64_t hash_reply(uint64_t h, const struct smtps_result_reply *r,
			           size_t *bytes)
{
    const char *text = text_of(r->text);
    size_t  len = strlen(text);

    h = hash_int(h, r->code);
    h = hash_bytes(h, r->enhanced, strnlen(r->enhanced, sizeof(r->enhanced)));
    h = hash_int(h, (long long) len);
    *bytes += len;
    return hash_bytes(h, text, len);
}

/* reply_equal - same code, enhanced code and text */

static int reply_equal(const struct smtps_result_reply *a,
		               const struct smtps_result_reply *b)
{
    return a->code == b->code
	&& strncmp(a->enhanced, b->enhanced, sizeof(a->enhanced)) == 0
	&& strcmp(text_of(a->text), text_of(b->text)) == 0;
}

/* hash_shape - everything in a result but its tag and deciding reply */

static uint64_t hash_shape(const struct smtps_result *r, size_t *bytes)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    size_t  i, len;

    h = hash_int(h, r->status);
    h = hash_int(h, r->state);
    h = hash_int(h, r->stage);
    h = hash_int(h, r->bounce_class);
    h = hash_int(h, (long long) r->nrcpt);
    len = strnlen(r->stage_name, sizeof(r->stage_name));
    h = hash_bytes(h, r->stage_name, len);
    h = hash_bytes(h, r->enhanced, strnlen(r->enhanced, sizeof(r->enhanced)));
    len = strlen(text_of(r->reason));
    h = hash_int(h, (long long) len);
    h = hash_bytes(h, text_of(r->reason), len);
    /* The deciding reply is not in the shape, but it is in the memory. */
    *bytes = len + strlen(text_of(r->reply.text))
	+ r->nrcpt * sizeof(struct smtps_result_rcpt);
    for (i = 0; i < r->nrcpt; i++) {
	h = hash_int(h, r->rcpt[i].status);
	h = hash_int(h, r->rcpt[i].bounce_class);
	h = hash_int(h, r->rcpt[i].route);
	h = hash_bytes(h, r->rcpt[i].enhanced,
		       strnlen(r->rcpt[i].enhanced, sizeof(r->rcpt[i].enhanced)));
	h = hash_reply(h, &r->rcpt[i].reply, bytes);
    }
    /* Where they went: a result per MX host and address. */
    h = hash_int(h, (long long) r->nroute);
    for (i = 0; i < r->nroute; i++) {
	h = hash_bytes(h, r->route[i].mx, strnlen(r->route[i].mx,
						  sizeof(r->route[i].mx)));
	h = hash_bytes(h, r->route[i].ip, strnlen(r->route[i].ip,
						  sizeof(r->route[i].ip)));
    }
    *bytes += r->nroute * sizeof(struct smtps_result_route);
    return h;
}

/* shape_equal - the same shape, field by field */

static int shape_equal(const struct smtps_result *a,
		               const struct smtps_result *b)
{
    size_t  i;

    if (a->status != b->status || a->state != b->state
	|| a->stage != b->stage || a->bounce_class != b->bounce_class
	|| a->nrcpt != b->nrcpt
	|| strncmp(a->stage_name, b->stage_name, sizeof(a->stage_name)) != 0
	|| strncmp(a->enhanced, b->enhanced, sizeof(a->enhanced)) != 0
	|| strcmp(text_of(a->reason), text_of(b->reason)) != 0)
	return 0;
    for (i = 0; i < a->nrcpt; i++)
	if (a->rcpt[i].status != b->rcpt[i].status
	    || a->rcpt[i].bounce_class != b->rcpt[i].bounce_class
	    || a->rcpt[i].route != b->rcpt[i].route
	    || strncmp(a->rcpt[i].enhanced, b->rcpt[i].enhanced,
		       sizeof(a->rcpt[i].enhanced)) != 0
	    || !reply_equal(&a->rcpt[i].reply, &b->rcpt[i].reply))
	    return 0;
    if (a->nroute != b->nroute)
	return 0;
    for (i = 0; i < a->nroute; i++)
	if (strncmp(a->route[i].mx, b->route[i].mx, sizeof(a->route[i].mx)) != 0
	    || strncmp(a->route[i].ip, b->route[i].ip, sizeof(a->route[i].ip)) != 0)
	    return 0;
    return 1;
}

/* smtps_message_copy - a new message: envelope's envelope, this body */

struct smtps_message *smtps_message_copy(const struct smtps_message *envelope,
					         const char *body, size_t len)
{
    int     rc;

    return message_copy(envelope, body, len, &rc);
}

/* message_copy - smtps_message_copy(), saying why it failed in *rc */

static struct smtps_message *message_copy(const struct smtps_message *envelope,
					          const char *body, size_t len,
					          int *rc)
{
    struct smtps_message *m;
    size_t  i;

    *rc = SMTPS_EINVAL;
    if (envelope == NULL)
	return NULL;
    *rc = SMTPS_ENOMEM;
    if ((m = smtps_message_new()) == NULL)
	return NULL;
    /*
     * The envelope's strings were checked when it was set up; copying
     * them checks nothing again, which is the point.
     */
    free(m->sender);
    m->sender = smtps_strndup(envelope->sender, strlen(envelope->sender));
    if (m->sender == NULL)
	goto nomem;
    if (envelope->nrcpt > 0) {
	if ((m->rcpt = calloc(envelope->nrcpt, sizeof(*m->rcpt))) == NULL)
	    goto nomem;
	m->rcpt_cap = envelope->nrcpt;
	for (i = 0; i < envelope->nrcpt; i++) {
	    const struct smtps_rcpt *src = &envelope->rcpt[i];
	    struct smtps_rcpt *dst = &m->rcpt[i];

	    /* Counted first: smtps_message_free() frees what is counted. */
	    m->nrcpt++;
	    dst->notify = src->notify;
	    if ((dst->addr = smtps_strndup(src->addr, strlen(src->addr))) == NULL)
		goto nomem;
	    if (src->orcpt != NULL
		&& (dst->orcpt = smtps_strndup(src->orcpt,
					       strlen(src->orcpt))) == NULL)
		goto nomem;
	}
    }
    if (envelope->envid != NULL
	&& (m->envid = smtps_strndup(envelope->envid,
				     strlen(envelope->envid))) == NULL)
	goto nomem;
    m->dsn_ret = envelope->dsn_ret;
    m->require_tls = envelope->require_tls;
    m->needs_smtputf8 = envelope->needs_smtputf8;
    m->want_smtputf8 = envelope->want_smtputf8;
    m->body_flags = envelope->body_flags;
    if (envelope->body_fixed && body == envelope->body
	&& len == envelope->body_len) {
	/* The envelope's fixed bytes, copied: checked when it got them. */
	if ((m->body = smtps_strndup(body, len)) == NULL)
	    goto nomem;
	m->body_len = len;
	m->body_owned = 1;
	m->body_size = envelope->body_size;
	m->is_8bit = envelope->is_8bit;
    } else if (body != NULL || len > 0) {
	if ((*rc = smtps_message_set_body(m, body, len)) != SMTPS_OK)
	    goto fail;
    } else if (envelope->body_read != NULL) {	/* a source: shared */
	m->body_read = envelope->body_read;
	m->body_closure = envelope->body_closure;
	m->body_size = envelope->body_size;
	m->is_8bit = envelope->is_8bit;
    } else if (!envelope->body_owned && envelope->body != NULL) {
	/*
	 * A reference: checked when the envelope got it. Bytes that never
	 * change and outlive the copy (body_fixed) are not scanned again
	 * before they go, and may go from where they are (transaction.c).
	 */
	m->body = envelope->body;
	m->body_len = envelope->body_len;
	m->body_shared = envelope->body_fixed;
	m->body_size = envelope->body_size;
	m->is_8bit = envelope->is_8bit;
    } else if ((*rc = smtps_message_set_body(m, envelope->body,
					     envelope->body_len)) != SMTPS_OK)
	goto fail;
    *rc = SMTPS_OK;
    return m;

nomem:
    *rc = SMTPS_ENOMEM;
fail:
    smtps_message_free(m);
    return NULL;
}

/* smtps_engine_submit_copy - copy the envelope with this body, submit it */

int     smtps_engine_submit_copy(struct smtps_engine *e,
				         const struct smtps_message *envelope,
				         const char *body, size_t len,
				         const struct smtps_destination *dest,
				         uint64_t tag)
{
    struct smtps_message *m;
    int     rc;

    if (e == NULL || envelope == NULL || dest == NULL
	|| (len > 0 && body == NULL))
	return SMTPS_EINVAL;
    if ((m = message_copy(envelope, body, len, &rc)) == NULL)
	return rc;
    if ((rc = smtps_engine_submit(e, m, dest, tag)) != SMTPS_OK)
	smtps_message_free(m);
    return rc;
}

/* smtps_engine_submit_plain - make a message without options, submit it */

int     smtps_engine_submit_plain(struct smtps_engine *e, const char *sender,
				          size_t slen, const char *rcpts,
				          size_t rlen, size_t nrcpt,
				          const char *body, size_t len,
				          const struct smtps_destination *dest,
				          uint64_t tag)
{
    struct smtps_message *m;
    const char *p, *end, *lf;
    size_t  n = 0;
    int     rc;

    if (e == NULL || sender == NULL || rcpts == NULL || dest == NULL
	|| nrcpt == 0 || (len > 0 && body == NULL))
	return SMTPS_EINVAL;
    if ((m = smtps_message_new()) == NULL)
	return SMTPS_ENOMEM;
    if ((rc = smtps_message_set_sender(m, sender, slen)) != SMTPS_OK)
	goto fail;
    /* The count bounds the loop: an LF too many is refused, not split. */
    for (p = rcpts, end = rcpts + rlen;; p = lf + 1) {
	lf = memchr(p, '\n', (size_t) (end - p));
	if (++n > nrcpt) {
	    rc = SMTPS_EINVAL;
	    goto fail;
	}
	rc = smtps_message_add_recipient(m, p, (size_t) ((lf ? lf : end) - p), 0, NULL, 0);
	if (rc != SMTPS_OK)
	    goto fail;
	if (lf == NULL)
	    break;
    }
    if (n != nrcpt) {
	rc = SMTPS_EINVAL;
	goto fail;
    }
    /*
     * The body by reference, checked once here, then sent as checked and
     * from where it is, as a copy of a fixed envelope is (body_shared):
     * the caller's bytes never change and outlive the result.
     */
    if ((rc = smtps_message_set_body_ref(m, body, len)) != SMTPS_OK)
	goto fail;
    m->body_shared = 1;
    if ((rc = smtps_engine_submit(e, m, dest, tag)) != SMTPS_OK)
	goto fail;
    return SMTPS_OK;

fail:
    smtps_message_free(m);
    return rc;
}

/* smtps_collector_new - an empty collector */

struct smtps_collector *smtps_collector_new(void)
{
    struct smtps_collector *c = calloc(1, sizeof(*c));

    if (c == NULL)
	return NULL;
    /* Slot 0 is "no reply" for good: a text, so it is never empty. */
    c->reply[0].reply.text = c->empty;
    c->reply_hand = 1;
    c->reply_mru = 1;
    return c;
}

/* shape_clear - empty a shape slot */

static void shape_clear(struct shape_slot *s)
{
    smtps_result_free(s->r);
    s->r = NULL;
    memset(&s->m, 0, sizeof(s->m));
}

/* reply_clear - empty a reply slot (never slot 0) */

static void reply_clear(struct reply_slot *s)
{
    free(s->reply.text);
    memset(&s->reply, 0, sizeof(s->reply));
    memset(&s->m, 0, sizeof(s->m));
}

/* smtps_collector_free - free a collector and what it remembers */

void    smtps_collector_free(struct smtps_collector *c)
{
    size_t  i;

    if (c == NULL)
	return;
    for (i = 0; i < SMTPS_COLLECT_SLOTS; i++)
	shape_clear(&c->shape[i]);
    for (i = 1; i < SMTPS_COLLECT_SLOTS; i++)
	reply_clear(&c->reply[i]);
    free(c);
}

/*
 * The clock: the next slot to reuse is empty, or was not hit since the
 * hand last passed it, and is never fresh. Two turns of the hand are
 * enough (the first clears every used bit), and one exists because a
 * call makes at most SMTPS_COLLECT_MAX slots fresh.
 */

/*
 * clock_victim - the slot to reuse among the SMTPS_COLLECT_SLOTS slots of
 * stride bytes at slots (each begins with its slot_mark), the hand going
 * round from first. Only a filled slot can have been hit (used).
 */

static size_t clock_victim(void *slots, size_t stride, size_t *hand,
			           size_t first)
{
    struct slot_mark *m;
    size_t  n, i;

    for (n = 0; n < 2 * SMTPS_COLLECT_SLOTS; n++) {
	i = *hand;
	*hand = i + 1 < SMTPS_COLLECT_SLOTS ? i + 1 : first;
	m = (struct slot_mark *) ((char *) slots + i * stride);
	if (m->fresh)
	    continue;
	if (m->used) {
	    m->used = 0;
	    continue;
	}
	return i;
    }
    abort();					/* see above: our bug */
}

/* collect_reply - the reply slot code of a deciding reply */

static uint64_t collect_reply(struct smtps_collector *c,
			              const struct smtps_result_reply *r,
			              size_t *fresh, size_t *nfresh)
{
    struct reply_slot *s;
    size_t  i, len = 0;
    uint64_t h;
    char   *text;

    if (r->code == 0)
	return 0;
    /* A server that says the same again: no hash, one comparison. */
    s = &c->reply[c->reply_mru];
    if (s->reply.text != NULL && reply_equal(&s->reply, r)) {
	s->m.used = 1;
	return c->reply_mru;
    }
    h = hash_reply(0xcbf29ce484222325ULL, r, &len);
    for (i = 1; i < SMTPS_COLLECT_SLOTS; i++) {
	s = &c->reply[i];
	if (s->reply.text != NULL && s->m.hash == h && reply_equal(&s->reply, r)) {
	    s->m.used = 1;
	    c->reply_mru = i;
	    return i;
	}
    }
    /*
     * Out of memory: say "no reply" rather than lose the result, as
     * result.c loses a reply's text rather than the result.
     */
    if ((text = smtps_strndup(text_of(r->text), len)) == NULL)
	return 0;
    i = clock_victim(c->reply, sizeof(c->reply[0]), &c->reply_hand, 1);
    s = &c->reply[i];
    reply_clear(s);
    s->m.hash = h;
    s->reply.code = r->code;
    memcpy(s->reply.enhanced, r->enhanced, sizeof(s->reply.enhanced));
    s->reply.enhanced[sizeof(s->reply.enhanced) - 1] = 0;
    s->reply.text = text;
    s->m.fresh = 1;
    s->m.transient = len > SMTPS_COLLECT_KEEP;
    c->ntransient += s->m.transient;
    c->reply_mru = i;
    fresh[(*nfresh)++] = i;
    return i + SMTPS_COLLECT_SLOTS;
}

/* collect_shape - the shape slot code of a result; takes the result */

static uint64_t collect_shape(struct smtps_collector *c,
			              struct smtps_result *r,
			              size_t *fresh, size_t *nfresh)
{
    struct shape_slot *s;
    size_t  i, bytes;
    uint64_t h;

    /* The same outcome as the last one: no hash, one comparison. */
    s = &c->shape[c->shape_mru];
    if (s->r != NULL && shape_equal(s->r, r)) {
	s->m.used = 1;
	smtps_result_free(r);
	return c->shape_mru;
    }
    h = hash_shape(r, &bytes);
    for (i = 0; i < SMTPS_COLLECT_SLOTS; i++) {
	s = &c->shape[i];
	if (s->r != NULL && s->m.hash == h && shape_equal(s->r, r)) {
	    s->m.used = 1;
	    c->shape_mru = i;
	    smtps_result_free(r);
	    return i;
	}
    }
    i = clock_victim(c->shape, sizeof(c->shape[0]), &c->shape_hand, 0);
    s = &c->shape[i];
    shape_clear(s);
    s->m.hash = h;
    s->r = r;
    s->m.fresh = 1;
    s->m.transient = bytes > SMTPS_COLLECT_KEEP;
    c->ntransient += s->m.transient;
    c->shape_mru = i;
    fresh[(*nfresh)++] = i;
    return i + SMTPS_COLLECT_SLOTS;
}

/* smtps_engine_collect - describe up to max ready results in out */

int     smtps_engine_collect(struct smtps_engine *e, struct smtps_collector *c,
			             uint64_t *out, size_t max)
{
    size_t  shape_fresh[SMTPS_COLLECT_MAX], reply_fresh[SMTPS_COLLECT_MAX];
    size_t  nshape = 0, nreply = 0, n, i;
    struct smtps_result *r;

    if (e == NULL || c == NULL || (out == NULL && max > 0))
	return SMTPS_EINVAL;
    if (max > SMTPS_COLLECT_MAX)
	max = SMTPS_COLLECT_MAX;
    /* The caller has read everything the last call described by now. */
    if (c->ntransient > 0) {
	for (i = 0; i < SMTPS_COLLECT_SLOTS; i++) {
	    if (c->shape[i].m.transient)
		shape_clear(&c->shape[i]);
	    if (i > 0 && c->reply[i].m.transient)
		reply_clear(&c->reply[i]);
	}
	c->ntransient = 0;
    }
    /* At most one fresh shape and one fresh reply per result. */
    for (n = 0; n < max && (r = smtps_engine_next_result(e)) != NULL; n++) {
	out[3 * n] = r->tag;
	out[3 * n + 2] = collect_reply(c, &r->reply, reply_fresh, &nreply);
	out[3 * n + 1] = collect_shape(c, r, shape_fresh, &nshape);
    }
    /* Fresh only protects a slot within the call that filled it. */
    for (i = 0; i < nshape; i++)
	c->shape[shape_fresh[i]].m.fresh = 0;
    for (i = 0; i < nreply; i++)
	c->reply[reply_fresh[i]].m.fresh = 0;
    return (int) n;
}

/* smtps_engine_run_collect - run the loop, then collect */

int     smtps_engine_run_collect(struct smtps_engine *e, int64_t max_wait_ms,
				         struct smtps_collector *c,
				         uint64_t *out, size_t max)
{
    int     rc;

    if (e == NULL || c == NULL || (out == NULL && max > 0))
	return SMTPS_EINVAL;
    if ((rc = smtps_engine_run(e, max_wait_ms)) < 0)
	return rc;
    return smtps_engine_collect(e, c, out, max);
}

/* smtps_engine_serve_collect - serve (engine.c), then collect */

int     smtps_engine_serve_collect(struct smtps_engine *e, int64_t max_wait_ms,
				           struct smtps_collector *c,
				           uint64_t *out, size_t max)
{
    int     rc;

    if (e == NULL || c == NULL || (out == NULL && max > 0))
	return SMTPS_EINVAL;
    if ((rc = smtps_engine_serve(e, max_wait_ms)) < 0)
	return rc;
    return smtps_engine_collect(e, c, out, max);
}

/* smtps_collector_shape - the result kept in a shape slot, or NULL */

const struct smtps_result *smtps_collector_shape(const struct smtps_collector *c,
						         size_t slot)
{
    if (c == NULL || slot >= SMTPS_COLLECT_SLOTS)
	return NULL;
    return c->shape[slot].r;
}

/* smtps_collector_reply - the reply kept in a reply slot, or NULL */

const struct smtps_result_reply *smtps_collector_reply(const struct smtps_collector *c,
						               size_t slot)
{
    if (c == NULL || slot >= SMTPS_COLLECT_SLOTS
	|| c->reply[slot].reply.text == NULL)
	return NULL;
    return &c->reply[slot].reply;
}
