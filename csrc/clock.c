/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	clock.c 3
 * SUMMARY
 *	deadline arithmetic that cannot overflow, and the monotonic clock
 * SYNOPSIS
 *	#include "internal.h"
 *
 *	int64_t	smtps_time_after(now, ms)
 *	int64_t	smtps_clock_ms(void)
 * DESCRIPTION
 *	Deadlines are absolute milliseconds, and -1 means "none". A caller
 *	may give any timeout and any clock reading, so now + ms is computed
 *	here, saturated: never past INT64_MAX (signed overflow is undefined
 *	behaviour) and never negative (which would read as "no deadline").
 *
 *	smtps_clock_ms() is CLOCK_MONOTONIC in milliseconds: the engine's
 *	clock, and the one a session uses to time states that never wait
 *	(dispatch.c), which only ever compares it with itself.
 *--*/

#include <stdint.h>
#include <time.h>

#include "internal.h"

/* smtps_time_after - now + ms, saturated to 0..INT64_MAX */

int64_t smtps_time_after(int64_t now, int64_t ms)
{
    if (now < 0)
	now = 0;
    if (ms < 0)
	ms = 0;
    if (ms > SMTPS_TIMEOUT_MAX)
	ms = SMTPS_TIMEOUT_MAX;
    if (now > INT64_MAX - ms)
	return INT64_MAX;
    return now + ms;
}

/* smtps_clock_ms - monotonic milliseconds */

int64_t smtps_clock_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}
