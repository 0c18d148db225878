/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	clock.c 3
 * SUMMARY
 *	the monotonic clock
 * SYNOPSIS
 *	#include "internal.h"
 *
 *	int64_t	smtps_clock_ms(void)
 * DESCRIPTION
 *	Deadlines are absolute milliseconds, and -1 means "none"; they are
 *	computed with smtps_time_after() (internal.h), which saturates.
 *
 *	smtps_clock_ms() is CLOCK_MONOTONIC in milliseconds: the engine's
 *	clock, and the one a session uses to time states that never wait
 *	(dispatch.c), which only ever compares it with itself.
 *--*/

#include <stdint.h>
#include <time.h>

#include "internal.h"

/* smtps_clock_ms - monotonic milliseconds */

int64_t smtps_clock_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}
