/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	strerror 3
 * SUMMARY
 *	names of error codes and connection stages
 * SYNOPSIS
 *	#include "smtpstate.h"
 *
 *	const char *smtps_strerror(code)
 *	int	code;
 *
 *	const char *smtps_stage_name(stage)
 *	int	stage;
 * DESCRIPTION
 *	smtps_strerror() describes an enum smtps_error value, in the words
 *	of the SMTPS_ERRORS list that makes the enum.
 *
 *	smtps_stage_name() names an enum smtps_stage value, as senders log
 *	it ("sending RCPT TO"). The names come from the SMTPS_STAGES list
 *	in smtpstate.h, the same list that makes the enum, so that the two
 *	cannot drift apart.
 *
 *	Both return static strings and keep no state.
 * DIAGNOSTICS
 *	smtps_strerror() returns "unknown error" for a code it does not
 *	know; smtps_stage_name() returns "unknown" for a stage out of range.
 * SEE ALSO
 *	smtpstate.h, the codes and the stage list.
 *--*/

#include "smtpstate.h"

/*
 * Stage names indexed by value. Designated initialisers put each name at
 * its own value, whatever the order of the list.
 */
#define SMTPS_X_STAGE_NAME(n, v, s) [v] = s,
static const char *const stage_names[SMTPS_STAGE__COUNT] = {
    SMTPS_STAGES(SMTPS_X_STAGE_NAME)
};
#undef SMTPS_X_STAGE_NAME

/* smtps_strerror - describe an error code */

const char *smtps_strerror(int code)
{
#define SMTPS_X_ERROR_TEXT(n, v, s) case v: return (s);
    switch (code) {
	SMTPS_ERRORS(SMTPS_X_ERROR_TEXT)
    default:
	return ("unknown error");
    }
#undef SMTPS_X_ERROR_TEXT
}

/* smtps_stage_name - name a connection stage */

const char *smtps_stage_name(int stage)
{
    if (stage < 0 || stage >= SMTPS_STAGE__COUNT || stage_names[stage] == 0)
	return ("unknown");
    return (stage_names[stage]);
}
