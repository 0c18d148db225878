/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	test_machine 1
 * SUMMARY
 *	table-driven tests of the state table: Momentum's registration contract
 * SYNOPSIS
 *	test_machine
 * DESCRIPTION
 *	Runs every test of the table in main() and prints "RUN label", then
 *	"PASS label" or "FAIL label: why", and a final "N passed, N failed"
 *	line.
 *
 *	The contract under test is register_smtp_client_state() with its
 *	friends smtp_get_state(), smtp_get_state_machine() and
 *	smtp_next_state() on the default machine, and the same operations
 *	on fresh machines (smtps_machine_new(), smtps_machine_register() and
 *	the lookups): the built-in order; insertion at the front, after a
 *	built-in and after a custom state; every refusal returns -1 and
 *	changes nothing (count, order, next id); copy-out of every field but
 *	closure, which is kept as the very pointer given; the
 *	sizeof_smtp_state ABI guard with structs from older callers
 *	allocated at their exact size; closure identity and call counts in
 *	every callback of custom states run by real sessions on scripted
 *	replies, the exact bytes sent each step; smtp_next_state() to keep
 *	the default or to jump; registration while sessions run (also from
 *	inside a callback); and freeing a machine that a session still
 *	holds.
 *
 *	The default machine is process-wide, so the tests that register
 *	into it use unique names and run after the one that checks its
 *	built-in order.
 *
 *	Build it with every C source and run it under ASan and UBSan:
 *
 *	gcc -std=c11 -D_POSIX_C_SOURCE=200809L -Wall -Wextra -Werror -O1 -g
 *	    -fsanitize=address,undefined -fno-sanitize-recover=all
 *	    -Iinclude -Icsrc tests/c/test_machine.c csrc/[a-z]*.c -lpthread
 *	    -o /tmp/test_machine && /tmp/test_machine
 * DIAGNOSTICS
 *	The exit status is 1 when any test fails, else 0.
 * SEE ALSO
 *	csrc/machine.c, the code under test; csrc/session.c, which runs it.
 *--*/

#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "smtpstate.h"

#define WHY_MAX 512
#define HELO "client.example"
#define MAX_PROBES 16
#define PROBE_STAGE 99			/* a stage code of the probes' own */
#define NTHREADS 4
#define PER_THREAD 12

/* Fail the current test with the condition's text, then clean up. */
#define CHECK(cond) do { \
	if (!(cond)) { \
	    (void) fail("line %d: %s", __LINE__, #cond); \
	    goto out; \
	} \
    } while (0)

/* Run a helper that records its own reason; clean up when it fails. */
#define TRY(call) do { \
	if (!(call)) \
	    goto out; \
    } while (0)

/* What a probe's callback does with its reply. */
enum probe_mode {
    P_NEXT,				/* return NEXT */
    P_RESET_NEXT,			/* smtp_next_state(QUIT), then NULL; NEXT */
    P_PERMFAIL,				/* set a reason, return PERMFAIL_TX */
    P_JUMP_QUIT,			/* smtp_next_state(default QUIT); JUMP */
    P_JUMP_BARE,			/* JUMP without smtp_next_state() */
    P_REGISTER				/* register inner into m, then NEXT */
};

/*
 * A custom state's closure. Every callback first checks that the closure
 * it got is a probe this test registered (a stray pointer is counted, never
 * dereferenced), then that the session is running this very state.
 */
struct probe {
    const char *name;
    int     id;				/* the id registration returned */
    enum probe_mode mode;
    const char *send;			/* the line setup sends, or NULL */
    int     awaits;			/* what setup returns */
    struct smtps_machine *m;		/* P_REGISTER: where */
    smtp_state *inner;			/* P_REGISTER: what */
    int     inner_after;
    int     inner_id;
    int     init, setup, callback, free, tostage, tostring;
    int     null_replies, replies, last_code;
    int     wrong_state;		/* called while another state ran */
    int     wrong_local;		/* free got a local init did not make */
};

/* An output collector that grows as needed. */
struct sink {
    char   *buf;
    size_t  len;
    size_t  cap;
};

/* One refused registration: a good template with one thing spoiled. */
enum spoil {
    S_NULL_STATE, S_AFTER, S_NAME, S_NULL_NAME, S_UNTERMINATED_NAME,
    S_NULL_CALLBACK, S_SIZE
};

struct bad_case {
    const char *label;
    enum spoil spoil;
    int     after;			/* S_AFTER: insert_after */
    const char *name;			/* S_NAME: the name */
    size_t  size;			/* S_SIZE: sizeof_smtp_state */
};

struct thread_arg {
    struct smtps_machine *m;
    int     t;
    int     ids[PER_THREAD];
};

static char why[WHY_MAX];
static struct probe *known[MAX_PROBES];
static int nknown;
static int stray;			/* callbacks with an unknown closure */
static int closureless_frees;		/* closureless_free() calls */
static struct sink sent;		/* what the client sent in this test */
static char long_name[SMTPS_STATE_NAME_MAX + 2];	/* NAME_MAX + 1 bytes */
static char max_name[SMTPS_STATE_NAME_MAX + 1];	/* exactly NAME_MAX */

static int fail(const char *fmt,...) __attribute__((format(printf, 1, 2)));
static void *xmalloc(size_t n);
static void sink_put(struct sink *k, const char *data, size_t len);
static const char *show(const char *data, size_t len);
static struct probe *probe_of(void *closure);
static void probe_add(struct probe *p);
static int probe_init(struct smtps_session *s, void *closure, void **local);
static int probe_setup(struct smtps_session *s, void *closure);
static int probe_callback(struct smtps_session *s,
			  const struct smtps_reply *reply, void *closure);
static void probe_free(struct smtps_session *s, void *local, void *closure);
static int probe_tostage(struct smtps_session *s, int awaiting, void *closure);
static const char *probe_tostring(int stage, void *closure);
static int plain_callback(struct smtps_session *s,
			  const struct smtps_reply *reply, void *closure);
static void closureless_free(struct smtps_session *s, void *local,
			     void *closure);
static smtp_state probe_state(struct probe *p);
static smtp_state plain_state(const char *name);
static int register_probe(struct smtps_machine *m, struct probe *p, int after);
static int order_of(smtp_state *head, int *ids, int max);
static int same_order(struct smtps_machine *m, const int *ids, int n);
static struct smtps_message *make_message(void);
static int step(struct smtps_session *s, const char *feed, const char *want);
static int to_idle(struct smtps_session *s, const char *first);
static int only_result(struct smtps_session *s, int status,
		       struct smtps_result **out);
static int run_bad_case(const struct bad_case *c);
static void *register_many(void *arg);
static int test_builtin_order(void);
static int test_default_insert(void);
static int test_fresh_insert(void);
static int test_default_refusals(void);
static int test_table_full(void);
static int test_max_name(void);
static int test_copy_out(void);
static int test_abi_guard(void);
static int test_min_size(void);
static int test_size_mid_field(void);
static int test_closure_in_session(void);
static int test_next_state_null(void);
static int test_next_state_permfail(void);
static int test_next_state_jump(void);
static int test_jump_without_target(void);
static int test_register_while_running(void);
static int test_default_session(void);
static int test_lookups(void);
static int test_free_held_machine(void);
static int test_threads(void);

/* Refusals, each on a fresh machine that holds one custom state, CUSTOM. */
static const struct bad_case bad_cases[] = {
    {"refused: NULL state", S_NULL_STATE, 0, 0, 0},
    {"refused: insert_after 999", S_AFTER, 999, 0, 0},
    {"refused: insert_after -2", S_AFTER, -2, 0, 0},
    {"refused: insert_after the next id", S_AFTER, SMTPS_STATE__COUNT + 1,
    0, 0},
    {"refused: insert_after INT32_MIN", S_AFTER, INT32_MIN, 0, 0},
    {"refused: duplicate built-in name", S_NAME, 0, "MAIL", 0},
    {"refused: duplicate custom name", S_NAME, 0, "CUSTOM", 0},
    {"refused: empty name", S_NAME, 0, "", 0},
    {"refused: name of NAME_MAX + 1 bytes", S_NAME, 0, long_name, 0},
    {"refused: NULL name", S_NULL_NAME, 0, 0, 0},
    {"refused: name unterminated in NAME_MAX + 1 bytes",
    S_UNTERMINATED_NAME, 0, 0, 0},
    {"refused: NULL callback", S_NULL_CALLBACK, 0, 0, 0},
    {"refused: sizeof_smtp_state 0", S_SIZE, 0, 0, 0},
    {"refused: sizeof_smtp_state MIN_SIZE - 1", S_SIZE, 0, 0,
    SMTPS_STATE_MIN_SIZE - 1},
    {"refused: sizeof_smtp_state sizeof + 1", S_SIZE, 0, 0,
    sizeof(smtp_state) + 1},
    {"refused: sizeof_smtp_state huge", S_SIZE, 0, 0, (size_t) -1},
};

#define NBAD (sizeof(bad_cases) / sizeof(bad_cases[0]))

/* fail - record why a test failed; returns 0 */

static int fail(const char *fmt,...)
{
    va_list ap;

    if (why[0] != 0)			/* keep the first reason */
	return (0);
    va_start(ap, fmt);
    vsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    return (0);
}

/* xmalloc - malloc that exits on failure */

static void *xmalloc(size_t n)
{
    void   *p = malloc(n ? n : 1);

    if (p == NULL) {
	perror("malloc");
	exit(2);
    }
    return (p);
}

/* sink_put - append bytes */

static void sink_put(struct sink *k, const char *data, size_t len)
{
    char   *p;

    if (k->len + len + 1 > k->cap) {
	k->cap = (k->len + len + 1) * 2;
	if ((p = realloc(k->buf, k->cap)) == NULL) {
	    perror("realloc");
	    exit(2);
	}
	k->buf = p;
    }
    memcpy(k->buf + k->len, data, len);
    k->len += len;
    k->buf[k->len] = 0;
}

/* show - bytes made printable for a message (one of 3 static buffers) */

static const char *show(const char *data, size_t len)
{
    static char bufs[3][200];
    static int turn;
    char   *buf = bufs[turn++ % 3];
    size_t  i, n = 0;

    for (i = 0; i < len && n + 5 < sizeof(buf); i++) {
	if (data[i] == '\r') {
	    buf[n++] = '\\';
	    buf[n++] = 'r';
	} else if (data[i] == '\n') {
	    buf[n++] = '\\';
	    buf[n++] = 'n';
	} else {
	    buf[n++] = data[i];
	}
    }
    buf[n] = 0;
    return (buf);
}

/* probe_of - the probe a closure names, or NULL (counted as stray) */

static struct probe *probe_of(void *closure)
{
    int     i;

    for (i = 0; i < nknown; i++)
	if (known[i] == closure)
	    return (known[i]);
    stray++;
    return (NULL);
}

/* probe_add - a probe whose pointer may come back as a closure */

static void probe_add(struct probe *p)
{
    if (nknown < MAX_PROBES)
	known[nknown++] = p;
}

/* probe_init - count; make the local that free must get back */

static int probe_init(struct smtps_session *s, void *closure, void **local)
{
    struct probe *p = probe_of(closure);

    if (p == NULL)
	return (SMTPS_EINVAL);
    p->init++;
    if (smtps_session_state(s) != p->id)
	p->wrong_state++;
    if (*local != NULL)
	p->wrong_local++;
    *local = p;
    return (0);
}

/* probe_setup - count; send the probe's line; await what it says */

static int probe_setup(struct smtps_session *s, void *closure)
{
    struct probe *p = probe_of(closure);
    int     rc;

    if (p == NULL)
	return (SMTPS_EINVAL);
    p->setup++;
    if (smtps_session_state(s) != p->id)
	p->wrong_state++;
    if (p->send != NULL
	&& (rc = smtps_session_send_line(s, p->send, strlen(p->send))) != 0)
	return (rc);
    return (p->awaits);
}

/* probe_callback - count; do what the probe's mode says */

static int probe_callback(struct smtps_session *s,
			          const struct smtps_reply *reply, void *closure)
{
    struct probe *p = probe_of(closure);

    if (p == NULL)
	return (SMTPS_ACT_ERROR);
    p->callback++;
    if (smtps_session_state(s) != p->id)
	p->wrong_state++;
    if (reply == NULL) {
	p->null_replies++;
    } else {
	p->replies++;
	p->last_code = reply->code;
    }
    switch (p->mode) {
    case P_NEXT:
	return (SMTPS_ACT_NEXT);
    case P_RESET_NEXT:
	smtp_next_state(s, smtp_get_state(SMTPS_STATE_QUIT));
	smtp_next_state(s, NULL);
	return (SMTPS_ACT_NEXT);
    case P_PERMFAIL:
	smtps_session_set_reason(s, "probe refuses the message");
	return (SMTPS_ACT_PERMFAIL_TX);
    case P_JUMP_QUIT:
	/* A record of the default machine names the same id here. */
	smtp_next_state(s, smtp_get_state(SMTPS_STATE_QUIT));
	return (SMTPS_ACT_JUMP);
    case P_JUMP_BARE:
	return (SMTPS_ACT_JUMP);
    case P_REGISTER:
	p->inner_id = smtps_machine_register(p->m, p->inner, p->inner_after);
	if (p->inner_id >= 0)
	    ((struct probe *) p->inner->closure)->id = p->inner_id;
	return (SMTPS_ACT_NEXT);
    }
    return (SMTPS_ACT_ERROR);
}

/* probe_free - count; the local must be the one init made */

static void probe_free(struct smtps_session *s, void *local, void *closure)
{
    struct probe *p = probe_of(closure);

    (void) s;
    if (p == NULL)
	return;
    p->free++;
    if (local != p)
	p->wrong_local++;
}

/* probe_tostage - count; a stage code of our own */

static int probe_tostage(struct smtps_session *s, int awaiting, void *closure)
{
    struct probe *p = probe_of(closure);

    (void) s;
    (void) awaiting;
    if (p == NULL)
	return (SMTPS_STAGE_UNKNOWN);
    p->tostage++;
    return (PROBE_STAGE);
}

/* probe_tostring - count; name our own stage code */

static const char *probe_tostring(int stage, void *closure)
{
    struct probe *p = probe_of(closure);

    if (p == NULL)
	return (NULL);
    p->tostring++;
    return (stage == PROBE_STAGE ? "probe stage" : NULL);
}

/* plain_callback - a callback for states that never run */

static int plain_callback(struct smtps_session *s,
			          const struct smtps_reply *reply, void *closure)
{
    (void) s;
    (void) reply;
    (void) closure;
    return (SMTPS_ACT_NEXT);
}

/* closureless_free - count; for states registered without a closure */

static void closureless_free(struct smtps_session *s, void *local,
			             void *closure)
{
    (void) s;
    (void) local;
    closureless_frees++;
    if (closure != NULL)
	stray++;
}

/* probe_state - a full smtp_state whose closure is the probe */

static smtp_state probe_state(struct probe *p)
{
    smtp_state st;

    memset(&st, 0, sizeof(st));
    st.sizeof_smtp_state = sizeof(st);
    st.name = p->name;
    st.id = -1;
    st.init_local_state = probe_init;
    st.setup = probe_setup;
    st.callback = probe_callback;
    st.free = probe_free;
    st.tostage = probe_tostage;
    st.tostring = probe_tostring;
    st.closure = p;
    return (st);
}

/* plain_state - a minimal valid smtp_state called name */

static smtp_state plain_state(const char *name)
{
    smtp_state st;

    memset(&st, 0, sizeof(st));
    st.sizeof_smtp_state = sizeof(st);
    st.name = name;
    st.callback = plain_callback;
    return (st);
}

/* register_probe - register p in m (NULL: Momentum's default machine) */

static int register_probe(struct smtps_machine *m, struct probe *p, int after)
{
    smtp_state st = probe_state(p);

    probe_add(p);
    p->id = m ? smtps_machine_register(m, &st, after) :
	register_smtp_client_state(&st, after);
    return (p->id);
}

/* order_of - the ids from head along next; -1 when longer than max */

static int order_of(smtp_state *head, int *ids, int max)
{
    int     n = 0;

    for (; head != NULL; head = head->next) {
	if (n >= max)
	    return (-1);
	ids[n++] = head->id;
    }
    return (n);
}

/* same_order - m's order is exactly ids[0..n-1] */

static int same_order(struct smtps_machine *m, const int *ids, int n)
{
    int     now[SMTPS_MAX_STATES + 1];
    int     k = order_of(smtps_machine_head(m), now, SMTPS_MAX_STATES + 1);

    return (k == n && memcmp(now, ids, (size_t) n * sizeof(int)) == 0);
}

/* make_message - a one-recipient message */

static struct smtps_message *make_message(void)
{
    struct smtps_message *msg = smtps_message_new();

    if (msg == NULL
	|| smtps_message_set_sender(msg, "a@example.org", 13) != SMTPS_OK
	|| smtps_message_add_recipient(msg, "b@example.org", 13, 0,
				       NULL, 0) != SMTPS_OK
	|| smtps_message_set_body(msg, "hi\r\n", 4) != SMTPS_OK) {
	fprintf(stderr, "cannot make a message\n");
	exit(2);
    }
    return (msg);
}

/* step - feed a server reply (or nothing); exactly want must be sent */

static int step(struct smtps_session *s, const char *feed, const char *want)
{
    const char *data;
    size_t  n;
    int     rc;

    if (feed != NULL
	&& (rc = smtps_session_feed(s, feed, strlen(feed), 0)) != SMTPS_OK)
	return (fail("feeding \"%s\": %s", show(feed, strlen(feed)),
		     smtps_strerror(rc)));
    n = smtps_session_output(s, &data);
    if (n != strlen(want) || (n > 0 && memcmp(data, want, n) != 0)) {
	return (fail("after \"%s\" the client sent \"%s\", want \"%s\"",
		     feed ? show(feed, strlen(feed)) : "", show(data, n),
		     show(want, strlen(want))));
    }
    if (n > 0)
	sink_put(&sent, data, n);
    smtps_session_consume(s, n, 0);
    return (1);
}

/* to_idle - from the banner to IDLE; first is what start must send */

static int to_idle(struct smtps_session *s, const char *first)
{
    if (smtps_session_start(s, 0) != SMTPS_OK)
	return (fail("smtps_session_start failed"));
    if (!step(s, NULL, first) || !step(s, "220 hi\r\n", "EHLO " HELO "\r\n")
	|| !step(s, "250 ok\r\n", ""))
	return (0);
    if (smtps_session_status(s) != SMTPS_SESS_IDLE)
	return (fail("status %d after EHLO, want IDLE",
		     smtps_session_status(s)));
    return (1);
}

/* only_result - the session's one result, with this status */

static int only_result(struct smtps_session *s, int status,
		               struct smtps_result **out)
{
    struct smtps_result *r = smtps_session_next_result(s);
    struct smtps_result *more;

    if (r == NULL)
	return (fail("no result"));
    if ((more = smtps_session_next_result(s)) != NULL) {
	smtps_result_free(more);
	smtps_result_free(r);
	return (fail("more than one result"));
    }
    if (status != 0 && r->status != status) {
	(void) fail("result status %d, want %d (%s)", r->status, status,
		    r->reason);
	smtps_result_free(r);
	return (0);
    }
    *out = r;
    return (1);
}

/* test_builtin_order - the default machine, before any registration */

static int test_builtin_order(void)
{
    static const char *names[] = {"BANNER", "EHLO", "STARTTLS", "AUTH",
    "MAIL", "RCPT", "DATA", "BODY", "RSET", "QUIT"};
    smtp_state *st;
    int     id, ok = 0;

    CHECK(SMTPS_STATE__COUNT == 10);
    st = smtp_get_state_machine();
    for (id = 0; id < SMTPS_STATE__COUNT; id++, st = st->next) {
	CHECK(st != NULL);
	CHECK(st->id == id);
	CHECK(strcmp(st->name, names[id]) == 0);
	CHECK(st == smtp_get_state(id));
	CHECK(st->sizeof_smtp_state == sizeof(smtp_state));
	CHECK(st->callback != NULL);
	/* A built-in's closure is its row of the state list: stages, timeout. */
	CHECK(st->closure != NULL && st->tostage != NULL);
	CHECK(smtps_machine_find(smtps_default_machine(), names[id]) == id);
    }
    CHECK(st == NULL);
    CHECK(smtp_get_state(-1) == NULL);
    CHECK(smtp_get_state(9999) == NULL);
    CHECK(smtp_get_state(SMTPS_STATE__COUNT) == NULL);
    CHECK(smtp_get_state(SMTPS_MAX_STATES) == NULL);
    CHECK(smtps_machine_count(smtps_default_machine()) == SMTPS_STATE__COUNT);
    CHECK(smtp_get_state(SMTPS_STATE_MAIL)->flags & SMTPS_STATE_PIPELINABLE);
    CHECK(!(smtp_get_state(SMTPS_STATE_BODY)->flags & SMTPS_STATE_PIPELINABLE));
    ok = 1;
out:
    return (ok);
}

/* test_default_insert - Momentum's names: front, after MAIL, after custom */

static int test_default_insert(void)
{
    smtp_state a = plain_state("test-default-front");
    smtp_state b = plain_state("test-default-after-mail");
    smtp_state c = plain_state("test-default-after-custom");
    smtp_state *old_head, *sa, *sb, *sc;
    int     count, ida, idb, idc, ok = 0;

    old_head = smtp_get_state_machine();
    count = smtps_machine_count(smtps_default_machine());
    ida = register_smtp_client_state(&a, -1);
    CHECK(ida >= SMTPS_STATE__COUNT);
    sa = smtp_get_state(ida);
    CHECK(sa != NULL && sa->id == ida);
    CHECK(smtp_get_state_machine() == sa);	/* the head changed */
    CHECK(sa->next == old_head);

    idb = register_smtp_client_state(&b, SMTPS_STATE_MAIL);
    CHECK(idb > ida);
    sb = smtp_get_state(idb);
    CHECK(sb != NULL);
    CHECK(smtp_get_state(SMTPS_STATE_MAIL)->next == sb);
    CHECK(sb->next == smtp_get_state(SMTPS_STATE_RCPT));

    idc = register_smtp_client_state(&c, idb);
    CHECK(idc > idb);
    sc = smtp_get_state(idc);
    CHECK(sc != NULL);
    CHECK(sb->next == sc);
    CHECK(sc->next == smtp_get_state(SMTPS_STATE_RCPT));
    CHECK(smtps_machine_count(smtps_default_machine()) == count + 3);
    CHECK(smtps_machine_find(smtps_default_machine(),
			     "test-default-after-custom") == idc);
    ok = 1;
out:
    return (ok);
}

/* test_fresh_insert - the same on a fresh machine, with exact ids */

static int test_fresh_insert(void)
{
    static const int want[] = {10, 0, 1, 2, 3, 4, 11, 12, 5, 6, 7, 8, 9, 13};
    struct smtps_machine *m = smtps_machine_new();
    smtp_state a = plain_state("front");
    smtp_state b = plain_state("after-mail");
    smtp_state c = plain_state("after-custom");
    smtp_state d = plain_state("after-quit");
    int     ok = 0;

    CHECK(m != NULL);
    CHECK(smtps_machine_register(m, &a, -1) == 10);
    CHECK(smtps_machine_head(m) == smtps_machine_get(m, 10));
    CHECK(smtps_machine_register(m, &b, SMTPS_STATE_MAIL) == 11);
    CHECK(smtps_machine_register(m, &c, 11) == 12);
    CHECK(smtps_machine_register(m, &d, SMTPS_STATE_QUIT) == 13);
    CHECK(same_order(m, want, 14));
    CHECK(smtps_machine_get(m, 13)->next == NULL);
    /* The default machine saw none of it. */
    CHECK(smtps_machine_find(smtps_default_machine(), "after-quit")
	  == SMTPS_ENOTFOUND);
    ok = 1;
out:
    smtps_machine_free(m);
    return (ok);
}

/* run_bad_case - one refusal: -1, and nothing changes */

static int run_bad_case(const struct bad_case *c)
{
    struct smtps_machine *m = smtps_machine_new();
    smtp_state custom = plain_state("CUSTOM");
    smtp_state st = plain_state("good-name");
    smtp_state next = plain_state("after-refusal");
    smtp_state *arg = &st;
    char   *unterminated = NULL;
    int     before[SMTPS_MAX_STATES], n, after = SMTPS_STATE_MAIL, ok = 0;

    CHECK(m != NULL);
    CHECK(smtps_machine_register(m, &custom, SMTPS_STATE_MAIL) == 10);
    n = order_of(smtps_machine_head(m), before, SMTPS_MAX_STATES);
    CHECK(n == 11);
    switch (c->spoil) {
    case S_NULL_STATE:
	arg = NULL;
	break;
    case S_AFTER:
	after = c->after;
	break;
    case S_NAME:
	st.name = c->name;
	break;
    case S_NULL_NAME:
	st.name = NULL;
	break;
    case S_UNTERMINATED_NAME:
	/* Exactly NAME_MAX + 1 bytes, no NUL: ASan catches a read past. */
	unterminated = xmalloc(SMTPS_STATE_NAME_MAX + 1);
	memset(unterminated, 'u', SMTPS_STATE_NAME_MAX + 1);
	st.name = unterminated;
	break;
    case S_NULL_CALLBACK:
	st.callback = NULL;
	break;
    case S_SIZE:
	st.sizeof_smtp_state = c->size;
	break;
    }
    CHECK(smtps_machine_register(m, arg, after) == -1);
    CHECK(smtps_machine_count(m) == 11);
    CHECK(same_order(m, before, n));
    CHECK(smtps_machine_get(m, 11) == NULL);
    CHECK(smtps_machine_find(m, "good-name") == SMTPS_ENOTFOUND);
    /* The next id was not used up. */
    CHECK(smtps_machine_register(m, &next, 10) == 11);
    ok = 1;
out:
    free(unterminated);
    smtps_machine_free(m);
    return (ok);
}

/* test_default_refusals - refusals through Momentum's name change nothing */

static int test_default_refusals(void)
{
    smtp_state st = plain_state("BANNER");
    int     before[SMTPS_MAX_STATES], n, count, ok = 0;

    count = smtps_machine_count(smtps_default_machine());
    n = order_of(smtp_get_state_machine(), before, SMTPS_MAX_STATES);
    CHECK(n == count);
    CHECK(register_smtp_client_state(NULL, -1) == -1);
    CHECK(register_smtp_client_state(&st, -1) == -1);	/* duplicate */
    st.name = "test-default-refused";
    CHECK(register_smtp_client_state(&st, 9999) == -1);
    CHECK(register_smtp_client_state(&st, -2) == -1);
    st.callback = NULL;
    CHECK(register_smtp_client_state(&st, -1) == -1);
    st.callback = plain_callback;
    st.sizeof_smtp_state = 0;
    CHECK(register_smtp_client_state(&st, -1) == -1);
    CHECK(smtps_machine_count(smtps_default_machine()) == count);
    CHECK(same_order(smtps_default_machine(), before, n));
    CHECK(smtps_machine_find(smtps_default_machine(), "test-default-refused")
	  == SMTPS_ENOTFOUND);
    ok = 1;
out:
    return (ok);
}

/* test_table_full - register until SMTPS_MAX_STATES, then -1 */

static int test_table_full(void)
{
    struct smtps_machine *m = smtps_machine_new();
    char    name[32];
    smtp_state st;
    int     before[SMTPS_MAX_STATES], i, n, ok = 0;

    CHECK(m != NULL);
    for (i = SMTPS_STATE__COUNT; i < SMTPS_MAX_STATES; i++) {
	snprintf(name, sizeof(name), "fill-%d", i);
	st = plain_state(name);
	CHECK(smtps_machine_register(m, &st, i - 1) == i);
    }
    CHECK(smtps_machine_count(m) == SMTPS_MAX_STATES);
    CHECK(smtps_machine_get(m, SMTPS_MAX_STATES - 1) != NULL);
    CHECK(smtps_machine_get(m, SMTPS_MAX_STATES) == NULL);
    CHECK(strcmp(smtps_machine_get(m, 20)->name, "fill-20") == 0);
    n = order_of(smtps_machine_head(m), before, SMTPS_MAX_STATES);
    CHECK(n == SMTPS_MAX_STATES);
    st = plain_state("one-too-many");
    CHECK(smtps_machine_register(m, &st, -1) == -1);
    CHECK(smtps_machine_register(m, &st, SMTPS_STATE_QUIT) == -1);
    CHECK(smtps_machine_count(m) == SMTPS_MAX_STATES);
    CHECK(same_order(m, before, n));
    CHECK(smtps_machine_find(m, "one-too-many") == SMTPS_ENOTFOUND);
    ok = 1;
out:
    smtps_machine_free(m);
    return (ok);
}

/* test_max_name - a name of exactly SMTPS_STATE_NAME_MAX bytes is fine */

static int test_max_name(void)
{
    struct smtps_machine *m = smtps_machine_new();
    smtp_state st = plain_state(max_name);
    int     ok = 0;

    CHECK(m != NULL);
    CHECK(strlen(max_name) == SMTPS_STATE_NAME_MAX);
    CHECK(smtps_machine_register(m, &st, -1) == 10);
    CHECK(strcmp(smtps_machine_get(m, 10)->name, max_name) == 0);
    CHECK(smtps_machine_find(m, max_name) == 10);
    CHECK(smtps_machine_find(m, long_name) == SMTPS_ENOTFOUND);
    ok = 1;
out:
    smtps_machine_free(m);
    return (ok);
}

/* test_copy_out - every field copied, the name deep; closure kept */

static int test_copy_out(void)
{
    struct smtps_machine *m = smtps_machine_new();
    static int closure_target;
    smtp_state *heap, *got;
    char   *name;
    int     id, ok = 0;

    CHECK(m != NULL);
    heap = xmalloc(sizeof(*heap));
    name = xmalloc(16);
    memcpy(name, "copied-out", 11);
    memset(heap, 0x5a, sizeof(*heap));	/* id and next are garbage */
    heap->sizeof_smtp_state = sizeof(*heap);
    heap->name = name;
    heap->init_local_state = probe_init;
    heap->setup = probe_setup;
    heap->callback = probe_callback;
    heap->free = probe_free;
    heap->tostage = probe_tostage;
    heap->tostring = probe_tostring;
    heap->closure = &closure_target;
    heap->flags = SMTPS_STATE_PIPELINABLE;
    id = smtps_machine_register(m, heap, SMTPS_STATE_MAIL);
    memset(name, 0xa5, 16);
    memset(heap, 0xa5, sizeof(*heap));
    free(name);
    free(heap);

    CHECK(id == 10);
    got = smtps_machine_get(m, id);
    CHECK(got != NULL);
    CHECK(strcmp(got->name, "copied-out") == 0);
    CHECK(got->sizeof_smtp_state == sizeof(smtp_state));
    CHECK(got->id == id);
    CHECK(got->init_local_state == probe_init);
    CHECK(got->setup == probe_setup);
    CHECK(got->callback == probe_callback);
    CHECK(got->free == probe_free);
    CHECK(got->tostage == probe_tostage);
    CHECK(got->tostring == probe_tostring);
    CHECK(got->closure == (void *) &closure_target);	/* exactly */
    CHECK(got->flags == SMTPS_STATE_PIPELINABLE);
    CHECK(got->next == smtps_machine_get(m, SMTPS_STATE_RCPT));
    CHECK(smtps_machine_get(m, SMTPS_STATE_MAIL)->next == got);
    CHECK(smtps_machine_find(m, "copied-out") == id);
    ok = 1;
out:
    smtps_machine_free(m);
    return (ok);
}

/* test_abi_guard - an older caller's struct, without flags */

static int test_abi_guard(void)
{
    struct smtps_machine *m = smtps_machine_new();
    const size_t old = offsetof(smtp_state, flags);
    static int closure_target;
    smtp_state full;
    unsigned char *exact, *padded;
    int     id1, id2, ok = 0;

    CHECK(m != NULL);
    full = plain_state("older-exact");
    full.sizeof_smtp_state = old;
    full.setup = probe_setup;
    full.closure = &closure_target;
    full.flags = SMTPS_STATE_PIPELINABLE;	/* not part of old */

    /* Exactly old bytes: a read of flags is a heap overflow under ASan. */
    exact = xmalloc(old);
    memcpy(exact, &full, old);
    id1 = smtps_machine_register(m, (smtp_state *) exact, -1);
    free(exact);

    /* Then inside a larger buffer whose bytes after old are poisoned. */
    full.name = "older-padded";
    padded = xmalloc(sizeof(smtp_state) + 16);
    memset(padded, 0xff, sizeof(smtp_state) + 16);
    memcpy(padded, &full, old);
    id2 = smtps_machine_register(m, (smtp_state *) padded, SMTPS_STATE_MAIL);
    free(padded);

    CHECK(id1 == 10);
    CHECK(id2 == 11);
    CHECK(smtps_machine_get(m, id1)->flags == 0);
    CHECK(smtps_machine_get(m, id2)->flags == 0);
    CHECK(smtps_machine_get(m, id2)->closure == (void *) &closure_target);
    CHECK(smtps_machine_get(m, id2)->setup == probe_setup);
    CHECK(smtps_machine_get(m, id2)->sizeof_smtp_state == sizeof(smtp_state));
    CHECK(strcmp(smtps_machine_get(m, id2)->name, "older-padded") == 0);
    ok = 1;
out:
    smtps_machine_free(m);
    return (ok);
}

/* test_min_size - a struct ending at callback: the rest reads as zero */

static int test_min_size(void)
{
    struct smtps_machine *m = smtps_machine_new();
    smtp_state full = plain_state("minimal");
    smtp_state *got;
    unsigned char *exact;
    int     id, ok = 0;

    CHECK(m != NULL);
    full.sizeof_smtp_state = SMTPS_STATE_MIN_SIZE;
    exact = xmalloc(SMTPS_STATE_MIN_SIZE);
    memcpy(exact, &full, SMTPS_STATE_MIN_SIZE);
    id = smtps_machine_register(m, (smtp_state *) exact, -1);
    free(exact);
    CHECK(id == 10);
    got = smtps_machine_get(m, id);
    CHECK(got->callback == plain_callback);
    CHECK(got->free == NULL && got->tostage == NULL && got->tostring == NULL);
    CHECK(got->closure == NULL && got->flags == 0);
    ok = 1;
out:
    smtps_machine_free(m);
    return (ok);
}

/* test_size_mid_field - a size ending inside a field lacks that field */

static int test_size_mid_field(void)
{
#define MID(f, n) offsetof(smtp_state, f) + n, offsetof(smtp_state, f)
#define WHOLE(f) (offsetof(smtp_state, f) + sizeof(((smtp_state *) 0)->f))
    static const struct {
	size_t  size;			/* sizeof_smtp_state */
	size_t  good;			/* bytes of it not poisoned */
	const char *name;
    }       sizes[] = {
	{MID(free, 1), "mid-free"},
	{MID(tostage, 4), "mid-tostage"},
	{MID(tostring, 7), "mid-tostring"},
	{MID(closure, 2), "mid-closure"},
	{MID(flags, 1), "mid-flags"},
	{WHOLE(flags), WHOLE(flags), "flags-exactly"},
    };
#undef MID
#undef WHOLE
    struct smtps_machine *m = smtps_machine_new();
    struct smtps_session *s = NULL;
    struct probe p = {.name = "", .send = "XMID"};
    smtp_state full, *got;
    unsigned char *buf;
    size_t  i;
    int     id, ok = 0;

    CHECK(m != NULL);
    probe_add(&p);
    for (i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
	/* Bytes past the last whole field are 0xff, the partial one too. */
	full = probe_state(&p);
	if (sizes[i].size < offsetof(smtp_state, closure) + sizeof(void *)) {
	    full.init_local_state = NULL;	/* these need the closure */
	    full.setup = NULL;
	    full.callback = plain_callback;
	    full.free = closureless_free;
	}
	full.name = sizes[i].name;
	full.flags = SMTPS_STATE_PIPELINABLE;
	full.sizeof_smtp_state = sizes[i].size;
	buf = xmalloc(sizeof(smtp_state));
	memset(buf, 0xff, sizeof(smtp_state));
	memcpy(buf, &full, sizes[i].good);
	id = smtps_machine_register(m, (smtp_state *) buf, -1);
	free(buf);
	CHECK(id == 10 + (int) i);
	got = smtps_machine_get(m, id);
	if (sizes[i].size < offsetof(smtp_state, free) + sizeof(got->free))
	    CHECK(got->free == NULL);
	if (sizes[i].size < offsetof(smtp_state, tostage) + sizeof(got->tostage))
	    CHECK(got->tostage == NULL);
	if (sizes[i].size < offsetof(smtp_state, tostring) + sizeof(got->tostring))
	    CHECK(got->tostring == NULL);
	if (sizes[i].size < offsetof(smtp_state, closure) + sizeof(got->closure))
	    CHECK(got->closure == NULL);
	else
	    CHECK(got->closure == (void *) &p);
	if (sizes[i].size < offsetof(smtp_state, flags) + sizeof(got->flags))
	    CHECK(got->flags == 0);
	else
	    CHECK(got->flags == SMTPS_STATE_PIPELINABLE);
    }

    /* The states run: no half pointer is ever called. */
    closureless_frees = 0;
    s = smtps_session_new(m, HELO, NULL);
    CHECK(s != NULL);
    TRY(to_idle(s, "XMID\r\nXMID\r\n"));
    CHECK(p.setup == 2 && p.callback == 2);
    smtps_session_free(s);
    s = NULL;
    CHECK(p.free == 2);			/* mid-flags and flags-exactly */
    CHECK(closureless_frees == 3);	/* mid-tostage, -tostring, -closure */
    CHECK(stray == 0);
    ok = 1;
out:
    smtps_session_free(s);
    smtps_machine_free(m);
    return (ok);
}

/* test_closure_in_session - every callback gets the very closure */

static int test_closure_in_session(void)
{
    struct smtps_machine *m = smtps_machine_new();
    struct smtps_session *s = NULL;
    struct smtps_result *r = NULL;
    struct probe front = {.name = "front", .send = "XFRONT", .awaits = 0};
    struct probe mail = {.name = "after-mail", .send = "XMAIL", .awaits = 1};
    int     ok = 0;

    CHECK(m != NULL);
    CHECK(register_probe(m, &front, -1) == 10);
    CHECK(register_probe(m, &mail, SMTPS_STATE_MAIL) == 11);
    s = smtps_session_new(m, HELO, NULL);
    CHECK(s != NULL);
    TRY(to_idle(s, "XFRONT\r\n"));
    CHECK(front.init == 1 && front.setup == 1 && front.callback == 1);
    CHECK(front.null_replies == 1 && front.replies == 0);
    CHECK(mail.setup == 0);

    CHECK(smtps_session_submit(s, make_message(), 7, 0) == SMTPS_OK);
    TRY(step(s, NULL, "MAIL FROM:<a@example.org>\r\n"));
    TRY(step(s, "250 ok\r\n", "XMAIL\r\n"));
    CHECK(mail.init == 1 && mail.setup == 1 && mail.callback == 0);
    TRY(step(s, "250 2.0.0 xmail ok\r\n", "RCPT TO:<b@example.org>\r\n"));
    CHECK(mail.callback == 1 && mail.replies == 1 && mail.last_code == 250);
    CHECK(mail.null_replies == 0);
    TRY(step(s, "250 ok\r\n", "DATA\r\n"));
    TRY(step(s, "354 go\r\n", "hi\r\n.\r\n"));
    TRY(step(s, "250 queued\r\n", ""));
    TRY(only_result(s, SMTPS_STATUS_DELIVERED, &r));
    CHECK(r->tag == 7);
    CHECK(smtps_session_quit(s, 0) == SMTPS_OK);
    TRY(step(s, NULL, "QUIT\r\n"));
    TRY(step(s, "221 bye\r\n", ""));
    CHECK(smtps_session_status(s) == SMTPS_SESS_CLOSING);
    smtps_session_closed(s, NULL, 0);
    CHECK(smtps_session_status(s) == SMTPS_SESS_CLOSED);
    smtps_session_free(s);
    s = NULL;

    CHECK(front.free == 1 && mail.free == 1);
    CHECK(front.init == 1 && front.setup == 1 && front.callback == 1);
    CHECK(mail.init == 1 && mail.setup == 1 && mail.callback == 1);
    CHECK(front.tostage == 0 && mail.tostage == 0);	/* nothing failed */
    CHECK(front.wrong_state == 0 && mail.wrong_state == 0);
    CHECK(front.wrong_local == 0 && mail.wrong_local == 0);
    CHECK(stray == 0);
    ok = 1;
out:
    smtps_result_free(r);
    smtps_session_free(s);
    smtps_machine_free(m);
    return (ok);
}

/* test_next_state_null - NULL after a target: the default next state */

static int test_next_state_null(void)
{
    struct smtps_machine *m = smtps_machine_new();
    struct smtps_session *s = NULL;
    struct smtps_result *r = NULL;
    struct probe gate = {.name = "gate", .mode = P_RESET_NEXT};
    int     ok = 0;

    CHECK(m != NULL);
    CHECK(register_probe(m, &gate, SMTPS_STATE_RCPT) == 10);
    s = smtps_session_new(m, HELO, NULL);
    CHECK(s != NULL);
    TRY(to_idle(s, ""));
    CHECK(smtps_session_submit(s, make_message(), 1, 0) == SMTPS_OK);
    TRY(step(s, NULL, "MAIL FROM:<a@example.org>\r\n"));
    TRY(step(s, "250 ok\r\n", "RCPT TO:<b@example.org>\r\n"));
    TRY(step(s, "250 ok\r\n", "DATA\r\n"));	/* not QUIT */
    CHECK(gate.callback == 1 && gate.null_replies == 1);
    TRY(step(s, "354 go\r\n", "hi\r\n.\r\n"));
    TRY(step(s, "250 queued\r\n", ""));
    TRY(only_result(s, SMTPS_STATUS_DELIVERED, &r));
    CHECK(gate.tostage == 0 && stray == 0 && gate.wrong_state == 0);
    ok = 1;
out:
    smtps_result_free(r);
    smtps_session_free(s);
    smtps_machine_free(m);
    return (ok);
}

/* test_next_state_permfail - a state after RCPT refuses: no DATA */

static int test_next_state_permfail(void)
{
    struct smtps_machine *m = smtps_machine_new();
    struct smtps_session *s = NULL;
    struct smtps_result *r = NULL;
    struct probe gate = {.name = "gate", .mode = P_PERMFAIL};
    static const char want[] = "EHLO " HELO "\r\n"
	"MAIL FROM:<a@example.org>\r\n" "RCPT TO:<b@example.org>\r\n"
	"QUIT\r\n";
    int     ok = 0;

    CHECK(m != NULL);
    CHECK(register_probe(m, &gate, SMTPS_STATE_RCPT) == 10);
    s = smtps_session_new(m, HELO, NULL);
    CHECK(s != NULL);
    TRY(to_idle(s, ""));
    CHECK(smtps_session_submit(s, make_message(), 2, 0) == SMTPS_OK);
    TRY(step(s, NULL, "MAIL FROM:<a@example.org>\r\n"));
    TRY(step(s, "250 ok\r\n", "RCPT TO:<b@example.org>\r\n"));
    TRY(step(s, "250 ok\r\n", ""));
    TRY(only_result(s, SMTPS_STATUS_PERMFAIL, &r));
    CHECK(r->state == gate.id);
    CHECK(r->stage == PROBE_STAGE);
    CHECK(strcmp(r->stage_name, "probe stage") == 0);
    CHECK(strstr(r->reason, "probe refuses the message") != NULL);
    CHECK(gate.tostage >= 1 && gate.tostring >= 1);
    CHECK(smtps_session_status(s) == SMTPS_SESS_IDLE);
    CHECK(smtps_session_quit(s, 0) == SMTPS_OK);
    TRY(step(s, NULL, "QUIT\r\n"));
    TRY(step(s, "221 bye\r\n", ""));
    CHECK(sent.len == sizeof(want) - 1 && strcmp(sent.buf, want) == 0);
    CHECK(gate.callback == 1 && stray == 0 && gate.wrong_state == 0);
    ok = 1;
out:
    smtps_result_free(r);
    smtps_session_free(s);
    smtps_machine_free(m);
    return (ok);
}

/* test_next_state_jump - a state after RCPT jumps to QUIT: no DATA */

static int test_next_state_jump(void)
{
    struct smtps_machine *m = smtps_machine_new();
    struct smtps_session *s = NULL;
    struct smtps_result *r = NULL;
    struct probe gate = {.name = "gate", .mode = P_JUMP_QUIT};
    static const char want[] = "EHLO " HELO "\r\n"
	"MAIL FROM:<a@example.org>\r\n" "RCPT TO:<b@example.org>\r\n"
	"QUIT\r\n";
    int     ok = 0;

    CHECK(m != NULL);
    CHECK(register_probe(m, &gate, SMTPS_STATE_RCPT) == 10);
    s = smtps_session_new(m, HELO, NULL);
    CHECK(s != NULL);
    TRY(to_idle(s, ""));
    CHECK(smtps_session_submit(s, make_message(), 3, 0) == SMTPS_OK);
    TRY(step(s, NULL, "MAIL FROM:<a@example.org>\r\n"));
    TRY(step(s, "250 ok\r\n", "RCPT TO:<b@example.org>\r\n"));
    TRY(step(s, "250 ok\r\n", "QUIT\r\n"));
    TRY(step(s, "221 bye\r\n", ""));
    CHECK(smtps_session_status(s) == SMTPS_SESS_CLOSING);
    smtps_session_closed(s, NULL, 0);
    TRY(only_result(s, 0, &r));
    CHECK(r->status != SMTPS_STATUS_DELIVERED);
    CHECK(sent.len == sizeof(want) - 1 && strcmp(sent.buf, want) == 0);
    CHECK(gate.callback == 1 && stray == 0 && gate.wrong_state == 0);
    ok = 1;
out:
    smtps_result_free(r);
    smtps_session_free(s);
    smtps_machine_free(m);
    return (ok);
}

/* test_jump_without_target - JUMP with no smtp_next_state() fails */

static int test_jump_without_target(void)
{
    struct smtps_machine *m = smtps_machine_new();
    struct smtps_session *s = NULL;
    struct smtps_result *r = NULL;
    struct probe gate = {.name = "gate", .mode = P_JUMP_BARE};
    int     ok = 0;

    CHECK(m != NULL);
    CHECK(register_probe(m, &gate, SMTPS_STATE_RCPT) == 10);
    s = smtps_session_new(m, HELO, NULL);
    CHECK(s != NULL);
    TRY(to_idle(s, ""));
    CHECK(smtps_session_submit(s, make_message(), 4, 0) == SMTPS_OK);
    TRY(step(s, NULL, "MAIL FROM:<a@example.org>\r\n"));
    TRY(step(s, "250 ok\r\n", "RCPT TO:<b@example.org>\r\n"));
    TRY(step(s, "250 ok\r\n", ""));
    TRY(only_result(s, SMTPS_STATUS_PERMFAIL, &r));
    CHECK(r->state == gate.id);
    CHECK(strstr(r->reason, "smtp_next_state") != NULL);
    CHECK(strstr(sent.buf, "DATA") == NULL);
    ok = 1;
out:
    smtps_result_free(r);
    smtps_session_free(s);
    smtps_machine_free(m);
    return (ok);
}

/* test_register_while_running - running sessions keep their order */

static int test_register_while_running(void)
{
    struct smtps_machine *m = smtps_machine_new();
    struct smtps_session *s1 = NULL, *s2 = NULL, *s3 = NULL;
    struct probe late = {.name = "late", .send = "XLATE", .mode = P_REGISTER};
    struct probe inner = {.name = "inner", .send = "XINNER"};
    smtp_state inner_st = probe_state(&inner);
    int     ok = 0;

    CHECK(m != NULL);
    probe_add(&inner);
    late.m = m;
    late.inner = &inner_st;
    late.inner_after = SMTPS_STATE_BANNER;

    s1 = smtps_session_new(m, HELO, NULL);
    CHECK(s1 != NULL);
    CHECK(register_probe(m, &late, -1) == 10);	/* s1 exists already */
    s2 = smtps_session_new(m, HELO, NULL);
    CHECK(s2 != NULL);
    CHECK(smtps_machine_count(m) == 11);

    /* s1 runs the order it was made with: the banner comes first. */
    TRY(to_idle(s1, ""));
    CHECK(late.init == 0 && late.setup == 0 && late.callback == 0);
    CHECK(smtps_session_local(s1, late.id) == NULL);
    CHECK(smtps_session_set_timeout(s1, late.id, 1000) == SMTPS_EINVAL);

    /* s2 sees late; late registers inner after BANNER while s2 runs. */
    TRY(to_idle(s2, "XLATE\r\n"));
    CHECK(late.setup == 1 && late.callback == 1);
    CHECK(late.inner_id == 11);
    CHECK(smtps_machine_get(m, SMTPS_STATE_BANNER)->next
	  == smtps_machine_get(m, 11));
    CHECK(inner.setup == 0 && inner.callback == 0);	/* not for s2 */

    /* A new session sees both. */
    s3 = smtps_session_new(m, HELO, NULL);
    CHECK(s3 != NULL);
    CHECK(smtps_session_start(s3, 0) == SMTPS_OK);
    TRY(step(s3, NULL, "XLATE\r\n"));
    CHECK(late.inner_id == -1);		/* s3's late: "inner" exists */
    TRY(step(s3, "220 hi\r\n", "XINNER\r\nEHLO " HELO "\r\n"));
    CHECK(inner.init == 1 && inner.setup == 1 && inner.callback == 1);
    CHECK(inner.null_replies == 1);
    CHECK(smtps_session_state(s3) == SMTPS_STATE_EHLO);

    smtps_session_free(s1);
    s1 = NULL;
    CHECK(late.free == 0);		/* s1 never entered it */
    smtps_session_free(s2);
    s2 = NULL;
    CHECK(late.free == 1 && inner.free == 0);
    smtps_session_free(s3);
    s3 = NULL;
    CHECK(late.free == 2 && inner.free == 1);
    CHECK(stray == 0 && late.wrong_state == 0 && inner.wrong_state == 0);
    CHECK(late.wrong_local == 0 && inner.wrong_local == 0);
    ok = 1;
out:
    smtps_session_free(s1);
    smtps_session_free(s2);
    smtps_session_free(s3);
    smtps_machine_free(m);
    return (ok);
}

/* test_default_session - sessions on the default machine see its states */

static int test_default_session(void)
{
    struct smtps_session *s = NULL, *before = NULL;

    /* Static: the default machine keeps the closure for good. */
    static struct probe p = {.name = "test-default-probe", .send = "XDEFAULT"};
    const char *data;
    size_t  n;
    int     ok = 0;

    before = smtps_session_new(NULL, HELO, NULL);
    CHECK(before != NULL);
    CHECK(register_probe(NULL, &p, -1) > SMTPS_STATE__COUNT);
    CHECK(smtp_get_state_machine() == smtp_get_state(p.id));
    CHECK(smtp_get_state(p.id)->closure == (void *) &p);

    s = smtps_session_new(smtps_default_machine(), HELO, NULL);
    CHECK(s != NULL);
    CHECK(smtps_session_start(s, 0) == SMTPS_OK);
    TRY(step(s, NULL, "XDEFAULT\r\n"));
    CHECK(p.setup == 1 && p.callback == 1 && p.null_replies == 1);

    /* A session made before the registration does not run it. */
    CHECK(smtps_session_start(before, 0) == SMTPS_OK);
    n = smtps_session_output(before, &data);
    CHECK(n == 0);
    CHECK(p.setup == 1 && p.callback == 1);
    smtps_session_free(s);
    s = NULL;
    CHECK(p.free == 1 && stray == 0 && p.wrong_state == 0);
    ok = 1;
out:
    smtps_session_free(s);
    smtps_session_free(before);
    return (ok);
}

/* test_lookups - find, count, get and head on fresh machines */

static int test_lookups(void)
{
    struct smtps_machine *m1 = smtps_machine_new();
    struct smtps_machine *m2 = smtps_machine_new();
    smtp_state a = plain_state("only-in-m1");
    int     ok = 0;

    CHECK(m1 != NULL && m2 != NULL && m1 != m2);
    CHECK(smtps_machine_count(m1) == SMTPS_STATE__COUNT);
    CHECK(smtps_machine_find(m1, "BANNER") == SMTPS_STATE_BANNER);
    CHECK(smtps_machine_find(m1, "QUIT") == SMTPS_STATE_QUIT);
    CHECK(smtps_machine_find(m1, "nope") == SMTPS_ENOTFOUND);
    CHECK(smtps_machine_find(m1, "") == SMTPS_ENOTFOUND);
    CHECK(smtps_machine_find(m1, NULL) == SMTPS_EINVAL);
    CHECK(smtps_machine_find(NULL, "BANNER") == SMTPS_EINVAL);
    CHECK(smtps_machine_count(NULL) == SMTPS_EINVAL);
    CHECK(smtps_machine_get(NULL, 0) == NULL);
    CHECK(smtps_machine_head(NULL) == NULL);
    CHECK(smtps_machine_register(NULL, &a, -1) == -1);
    CHECK(smtps_machine_get(m1, -1) == NULL);
    CHECK(smtps_machine_get(m1, SMTPS_STATE__COUNT) == NULL);
    CHECK(smtps_machine_head(m1) == smtps_machine_get(m1, 0));
    CHECK(strcmp(smtps_machine_get(m1, SMTPS_STATE_RSET)->name, "RSET") == 0);
    /* Each machine has its own records. */
    CHECK(smtps_machine_get(m1, 0) != smtps_machine_get(m2, 0));
    CHECK(smtps_machine_get(m1, 0) != smtp_get_state(0));

    CHECK(smtps_machine_register(m1, &a, SMTPS_STATE_QUIT) == 10);
    CHECK(smtps_machine_count(m1) == 11);
    CHECK(smtps_machine_find(m1, "only-in-m1") == 10);
    CHECK(smtps_machine_get(m1, 10) != NULL);
    CHECK(smtps_machine_get(m1, SMTPS_STATE_QUIT)->next
	  == smtps_machine_get(m1, 10));
    CHECK(smtps_machine_count(m2) == SMTPS_STATE__COUNT);
    CHECK(smtps_machine_find(m2, "only-in-m1") == SMTPS_ENOTFOUND);
    CHECK(smtps_machine_get(m2, 10) == NULL);
    CHECK(smtps_machine_get(m2, SMTPS_STATE_QUIT)->next == NULL);
    /* The same state may be registered in another machine. */
    CHECK(smtps_machine_register(m2, &a, -1) == 10);
    ok = 1;
out:
    smtps_machine_free(m1);
    smtps_machine_free(m2);
    return (ok);
}

/* test_free_held_machine - a session keeps its machine alive */

static int test_free_held_machine(void)
{
    struct smtps_machine *m = smtps_machine_new();
    struct smtps_session *s = NULL;
    struct probe p = {.name = "held", .send = "XHELD"};
    int     ok = 0;

    CHECK(m != NULL);
    CHECK(register_probe(m, &p, -1) == 10);
    s = smtps_session_new(m, HELO, NULL);
    CHECK(s != NULL);
    smtps_machine_free(m);		/* the session still holds it */
    m = NULL;
    TRY(to_idle(s, "XHELD\r\n"));
    CHECK(smtps_session_submit(s, make_message(), 5, 0) == SMTPS_OK);
    TRY(step(s, NULL, "MAIL FROM:<a@example.org>\r\n"));
    smtps_session_free(s);		/* frees the machine too */
    s = NULL;
    CHECK(p.free == 1 && stray == 0);

    /* Freeing NULL or the default machine does nothing. */
    smtps_machine_free(NULL);
    smtps_machine_free(smtps_default_machine());
    CHECK(smtp_get_state(SMTPS_STATE_QUIT) != NULL);
    CHECK(smtps_machine_count(smtps_default_machine()) >= SMTPS_STATE__COUNT);
    ok = 1;
out:
    smtps_session_free(s);
    smtps_machine_free(m);
    return (ok);
}

/* register_many - a thread registering PER_THREAD states at the front */

static void *register_many(void *arg)
{
    struct thread_arg *a = arg;
    char    name[32];
    smtp_state st;
    int     i;

    for (i = 0; i < PER_THREAD; i++) {
	snprintf(name, sizeof(name), "thread-%d-%d", a->t, i);
	st = plain_state(name);
	a->ids[i] = smtps_machine_register(a->m, &st, -1);
    }
    return (NULL);
}

/* test_threads - concurrent registrations get distinct ids, none lost */

static int test_threads(void)
{
    struct smtps_machine *m = smtps_machine_new();
    struct thread_arg args[NTHREADS];
    pthread_t tid[NTHREADS];
    int     seen[SMTPS_MAX_STATES] = {0};
    int     order[SMTPS_MAX_STATES];
    char    name[32];
    int     started = 0, t, i, id, ok = 0;

    CHECK(m != NULL);
    for (t = 0; t < NTHREADS; t++) {
	args[t].m = m;
	args[t].t = t;
	if (pthread_create(&tid[t], NULL, register_many, &args[t]) != 0)
	    break;
	started++;
    }
    for (t = 0; t < started; t++)
	pthread_join(tid[t], NULL);
    CHECK(started == NTHREADS);
    CHECK(smtps_machine_count(m) == SMTPS_STATE__COUNT + NTHREADS * PER_THREAD);
    for (t = 0; t < NTHREADS; t++)
	for (i = 0; i < PER_THREAD; i++) {
	    id = args[t].ids[i];
	    CHECK(id >= SMTPS_STATE__COUNT && id < SMTPS_MAX_STATES);
	    CHECK(seen[id]++ == 0);
	    snprintf(name, sizeof(name), "thread-%d-%d", t, i);
	    CHECK(smtps_machine_find(m, name) == id);
	    CHECK(i == 0 || id > args[t].ids[i - 1]);
	}
    CHECK(order_of(smtps_machine_head(m), order, SMTPS_MAX_STATES)
	  == SMTPS_STATE__COUNT + NTHREADS * PER_THREAD);
    ok = 1;
out:
    smtps_machine_free(m);
    return (ok);
}

/* main - run the table, then the refusal cases */

int     main(void)
{
    static const struct {
	const char *label;
	int     (*fn) (void);
    }       tests[] = {
	/* First: it needs the default machine untouched. */
	{"default machine: built-in ids and order", test_builtin_order},
	{"default machine: insert front, after MAIL, after custom",
	test_default_insert},
	{"default machine: refusals change nothing", test_default_refusals},
	{"fresh machine: insert front, after built-in, after custom",
	test_fresh_insert},
	{"refused: table full at SMTPS_MAX_STATES", test_table_full},
	{"name of exactly SMTPS_STATE_NAME_MAX bytes", test_max_name},
	{"copy-out: heap struct and name freed; closure kept", test_copy_out},
	{"ABI guard: older struct without flags", test_abi_guard},
	{"ABI guard: struct of SMTPS_STATE_MIN_SIZE", test_min_size},
	{"ABI guard: a size ending inside a field", test_size_mid_field},
	{"closure identity in a real session", test_closure_in_session},
	{"smtp_next_state(NULL) keeps the default next", test_next_state_null},
	{"PERMFAIL_TX after RCPT: no DATA", test_next_state_permfail},
	{"smtp_next_state jump to QUIT: no DATA", test_next_state_jump},
	{"JUMP without smtp_next_state fails", test_jump_without_target},
	{"registering while sessions run", test_register_while_running},
	{"default machine sessions see registrations", test_default_session},
	{"find, count, get, head on fresh machines", test_lookups},
	{"machine freed while a session holds it", test_free_held_machine},
	{"concurrent registration", test_threads},
    };
    size_t  ntests = sizeof(tests) / sizeof(tests[0]);
    size_t  i;
    int     passed = 0, failed = 0, ok;
    const char *label;

    setvbuf(stdout, NULL, _IOLBF, 0);	/* lines out before any crash */
    memset(long_name, 'n', SMTPS_STATE_NAME_MAX + 1);
    memset(max_name, 'x', SMTPS_STATE_NAME_MAX);
    for (i = 0; i < ntests + NBAD; i++) {
	label = i < ntests ? tests[i].label : bad_cases[i - ntests].label;
	printf("RUN %s\n", label);
	why[0] = 0;
	nknown = 0;
	stray = 0;
	sent.len = 0;
	ok = i < ntests ? tests[i].fn() : run_bad_case(&bad_cases[i - ntests]);
	if (ok) {
	    printf("PASS %s\n", label);
	    passed++;
	} else {
	    printf("FAIL %s: %s\n", label, why[0] ? why : "(no reason)");
	    failed++;
	}
    }
    free(sent.buf);
    printf("%d passed, %d failed\n", passed, failed);
    return (failed ? 1 : 0);
}
