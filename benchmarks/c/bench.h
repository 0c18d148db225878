/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	bench.h 3h
 * SUMMARY
 *	clocks and output shared by the C benchmark programs
 * SYNOPSIS
 *	#include "bench.h"
 *
 *	double	bench_now(void)
 *	double	bench_cpu(void)
 *	void	bench_report(name, value, unit)
 * DESCRIPTION
 *	bench_now() is the monotonic clock and bench_cpu() the process CPU
 *	time (user and system), both in seconds. bench_report() prints one
 *	figure as "RESULT name value unit", the line benchmarks/run.py
 *	reads.
 *
 *	bench_sink is a volatile store that keeps the compiler from
 *	removing work whose result nobody reads.
 *--*/

#ifndef SMTPS_BENCH_H
#define SMTPS_BENCH_H

#include <stdio.h>
#include <time.h>

static volatile unsigned long bench_sink;

/* bench_now - monotonic seconds */

static inline double bench_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* bench_cpu - CPU seconds used by this process */

static inline double bench_cpu(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* bench_report - one figure, for benchmarks/run.py */

static inline void bench_report(const char *name, double value, const char *unit)
{
    printf("RESULT %s %.6g %s\n", name, value, unit);
    fflush(stdout);
}

#endif
