/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	dispatch 1
 * SUMMARY
 *	nanoseconds per state transition in the C dispatch loop
 * SYNOPSIS
 *	dispatch [transitions]
 * DESCRIPTION
 *	Measures, in one run, the dispatch loop of csrc/dispatch.c against
 *	the floor of a plain C function-pointer call:
 *
 *	floor_call: a loop calling, through a volatile function pointer,
 *	a function with the signature and body of the states' callback
 *	below (decrement a counter, compare, return an action).
 *
 *	retry: a machine with one no-op C state before BANNER whose
 *	callback returns SMTPS_ACT_RETRY until its counter runs out. Each
 *	RETRY is one transition: the loop re-enters the state (its setup
 *	runs), then hands it its NULL reply (its callback runs) and acts
 *	on the answer. Such a state awaits no reply, so it takes the
 *	loop's tight path (smtps_dispatch_run()), not the in-flight FIFO.
 *
 *	retry_nosetup: the same with a NULL setup (allowed: it awaits no
 *	reply), so that one indirect call per transition is left, as in
 *	floor_call.
 *
 *	cycle: 50 distinct no-op states before BANNER; the last one jumps
 *	back to the first with smtp_next_state() until the counter runs
 *	out, so every transition enters a different state.
 *
 *	Each runs inside smtps_session_start() of a fresh session (the
 *	states come before BANNER, so no server is needed). A session allows
 *	RUN (1000) entries of states that never wait in a row before it
 *	fails the connection (a loop), so the transitions are made in many
 *	sessions of RUN each; the cost of a session itself (new, start,
 *	free) is measured with sessions of one transition and taken away:
 *	(T(RUN) - T(1)) / (RUN - 1) per transition. Medians of 5
 *	interleaved repeats. Prints "RESULT name value unit" lines.
 * SEE ALSO
 *	csrc/dispatch.c (begin, smtps_dispatch_run), benchmarks/run.py.
 *--*/

#include <stdlib.h>

#include "smtpstate.h"
#include "bench.h"

#define CYCLE_STATES 50
#define REPEATS 5
#define RUN 1000			/* entries without a reply a session allows */

struct counter {
    long    left;			/* transitions still to make */
    smtp_state *first;			/* cycle: where the last state jumps */
};

static int noop_setup(struct smtps_session *, void *);
static int retry_callback(struct smtps_session *, const struct smtps_reply *, void *);
static int next_callback(struct smtps_session *, const struct smtps_reply *, void *);
static int cycle_callback(struct smtps_session *, const struct smtps_reply *, void *);
static double per_session(struct smtps_machine *m, struct counter *c,
			  long k, long sessions);
static double median(double *v, int n);

/* noop_setup - a state that sends nothing and awaits no reply */

static int noop_setup(struct smtps_session *s, void *closure)
{
    (void) s;
    (void) closure;
    return 0;
}

/* retry_callback - enter the same state again until the counter is out */

static int retry_callback(struct smtps_session *s,
			          const struct smtps_reply *r, void *closure)
{
    struct counter *c = closure;

    (void) s;
    (void) r;
    return --c->left > 0 ? SMTPS_ACT_RETRY : SMTPS_ACT_NEXT;
}

/* next_callback - on to the next state */

static int next_callback(struct smtps_session *s,
			         const struct smtps_reply *r, void *closure)
{
    struct counter *c = closure;

    (void) s;
    (void) r;
    --c->left;
    return SMTPS_ACT_NEXT;
}

/* cycle_callback - the last of the cycle: back to the first */

static int cycle_callback(struct smtps_session *s,
			          const struct smtps_reply *r, void *closure)
{
    struct counter *c = closure;

    (void) r;
    if (--c->left > 0) {
	smtp_next_state(s, c->first);
	return SMTPS_ACT_JUMP;
    }
    return SMTPS_ACT_NEXT;
}

/* floor_callback - the same body, for the function-pointer floor */

__attribute__((noinline))
static int floor_callback(struct smtps_session *s,
			          const struct smtps_reply *r, void *closure)
{
    struct counter *c = closure;

    (void) s;
    (void) r;
    return --c->left > 0 ? SMTPS_ACT_RETRY : SMTPS_ACT_NEXT;
}

static SMTPStateCallback volatile floor_pointer = floor_callback;

/*
 * per_session - CPU seconds per session, over sessions that each make k
 * transitions among their front states
 */

static double per_session(struct smtps_machine *m, struct counter *c,
			          long k, long sessions)
{
    struct smtps_session *s;
    double  t = bench_cpu();
    long    i;

    for (i = 0; i < sessions; i++) {
	if ((s = smtps_session_new(m, "bench.test", NULL)) == NULL) {
	    fprintf(stderr, "dispatch: cannot make a session\n");
	    exit(1);
	}
	c->left = k;
	if (smtps_session_start(s, 0) != SMTPS_OK || c->left > 0
	    || smtps_session_status(s) != SMTPS_SESS_ACTIVE) {
	    fprintf(stderr, "dispatch: a session stopped early\n");
	    exit(1);
	}
	smtps_session_free(s);
    }
    return (bench_cpu() - t) / (double) sessions;
}

/* median - the middle of n values (sorted in place) */

static double median(double *v, int n)
{
    int     i, j;
    double  x;

    for (i = 1; i < n; i++)			/* n is small: insertion sort */
	for (j = i; j > 0 && v[j - 1] > v[j]; j--) {
	    x = v[j];
	    v[j] = v[j - 1];
	    v[j - 1] = x;
	}
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* add_state - register a no-op state after after, or die */

static int add_state(struct smtps_machine *m, const char *name, int after,
		             SMTPStateCallback cb, struct counter *c, int setup)
{
    smtp_state st = {0};
    int     id;

    st.sizeof_smtp_state = sizeof(st);
    st.name = name;
    st.setup = setup ? noop_setup : NULL;
    st.callback = cb;
    st.closure = c;
    if ((id = smtps_machine_register(m, &st, after)) < 0) {
	fprintf(stderr, "dispatch: cannot register %s\n", name);
	exit(1);
    }
    return id;
}

int     main(int argc, char **argv)
{
    long    n = argc > 1 ? atol(argv[1]) : 20000000L;
    struct counter rc = {0}, cc = {0};
    struct smtps_machine *retry, *bare, *cycle;
    double  t;
    char    name[32];
    int     i, r, id, first = -1;

    /* The retry machine: one state at the very front. */
    retry = smtps_machine_new();
    add_state(retry, "NOOP", -1, retry_callback, &rc, 1);
    bare = smtps_machine_new();
    add_state(bare, "NOOP", -1, retry_callback, &rc, 0);

    /* The cycle machine: CYCLE_STATES states at the front, in order. */
    cycle = smtps_machine_new();
    for (i = 0, id = -1; i < CYCLE_STATES; i++) {
	snprintf(name, sizeof(name), "NOOP%d", i);
	id = add_state(cycle, name, id, i == CYCLE_STATES - 1 ?
		       cycle_callback : next_callback, &cc, 1);
	if (first < 0)
	    first = id;
    }
    cc.first = smtps_machine_get(cycle, first);

    /* Interleaved repeats; per transition, the session's own cost taken away. */
    double  floor_ns[REPEATS], retry_ns[REPEATS], bare_ns[REPEATS],
	    cycle_ns[REPEATS];
    long    sessions = n / RUN > 0 ? n / RUN : 1;

    for (r = 0; r < REPEATS; r++) {
	struct counter fc = {n, NULL};
	double  one;

	t = bench_cpu();
	while (floor_pointer(NULL, NULL, &fc) == SMTPS_ACT_RETRY)
	     /* void */ ;
	t = bench_cpu() - t;
	bench_sink += (unsigned long) fc.left;
	floor_ns[r] = t / (double) n * 1e9;

	one = per_session(retry, &rc, 1, sessions);
	retry_ns[r] = (per_session(retry, &rc, RUN, sessions) - one)
	    / (RUN - 1) * 1e9;
	one = per_session(bare, &rc, 1, sessions);
	bare_ns[r] = (per_session(bare, &rc, RUN, sessions) - one)
	    / (RUN - 1) * 1e9;
	/* A cycle's session makes at least CYCLE_STATES transitions. */
	one = per_session(cycle, &cc, CYCLE_STATES, sessions);
	cycle_ns[r] = (per_session(cycle, &cc, RUN, sessions) - one)
	    / (RUN - CYCLE_STATES) * 1e9;
    }
    bench_report("floor_call_ns", median(floor_ns, REPEATS), "ns/call");
    bench_report("retry_transition_ns", median(retry_ns, REPEATS), "ns/transition");
    bench_report("retry_nosetup_transition_ns", median(bare_ns, REPEATS),
		 "ns/transition");
    bench_report("cycle_transition_ns", median(cycle_ns, REPEATS), "ns/transition");
    smtps_machine_free(retry);
    smtps_machine_free(bare);
    smtps_machine_free(cycle);
    return 0;
}
