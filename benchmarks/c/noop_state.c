/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	noop_state 3
 * SUMMARY
 *	a no-op C state, as a shared library for benchmarks/run.py
 * SYNOPSIS
 *	int	bench_noop_register(m, after, reg)
 *	struct smtps_machine *m;
 *	int	after;
 *	int	(*reg)(struct smtps_machine *, smtp_state *, int);
 *
 *	long	bench_noop_calls(void)
 * DESCRIPTION
 *	Built at run time with cc against include/smtpstate.h only. The
 *	extension exports no C symbols (-fvisibility=hidden), so the caller
 *	passes smtps_machine_register() itself (ffi.addressof(lib, ...))
 *	together with the machine to register into; the state is then a
 *	C state like any other, called directly by the dispatch loop.
 *
 *	The state sends nothing, awaits no reply, counts its setups in
 *	bench_noop_calls() and goes on to the next state.
 * DIAGNOSTICS
 *	bench_noop_register() returns the new state id, or -1.
 *--*/

#include "smtpstate.h"

typedef int (*bench_register_fn) (struct smtps_machine *, smtp_state *, int);

static long calls;

/* noop_setup - count, send nothing, await nothing */

static int noop_setup(struct smtps_session *s, void *closure)
{
    (void) s;
    ++*(long *) closure;
    return 0;
}

/* noop_callback - on to the next state */

static int noop_callback(struct smtps_session *s, const struct smtps_reply *r,
			         void *closure)
{
    (void) s;
    (void) r;
    (void) closure;
    return SMTPS_ACT_NEXT;
}

/* bench_noop_register - register the state after id after in m */

int     bench_noop_register(struct smtps_machine *m, int after,
			            bench_register_fn reg)
{
    smtp_state st = {0};

    st.sizeof_smtp_state = sizeof(st);
    st.name = "BENCH_C_NOOP";
    st.setup = noop_setup;
    st.callback = noop_callback;
    st.closure = &calls;
    return reg(m, &st, after);
}

/* bench_noop_calls - how many times the state was entered */

long    bench_noop_calls(void)
{
    return calls;
}
