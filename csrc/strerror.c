/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	strerror 3
 * SUMMARY
 *	names of error codes, connection stages and protocols
 * SYNOPSIS
 *	#include "smtpstate.h"
 *
 *	const char *smtps_strerror(code)
 *	int	code;
 *
 *	const char *smtps_stage_name(stage)
 *	int	stage;
 *
 *	const char *smtps_protocol_name(protocol)
 *	int	protocol;
 * DESCRIPTION
 *	smtps_strerror() describes an enum smtps_error value, in the words
 *	of the SMTPS_ERRORS list that makes the enum.
 *
 *	smtps_stage_name() names an enum smtps_stage value, as senders log
 *	it ("sending RCPT TO"). The names come from the SMTPS_STAGES list
 *	in smtpstate.h, the same list that makes the enum, so that the two
 *	cannot drift apart.
 *
 *	smtps_protocol_name() names an enum smtps_protocol value ("smtp",
 *	"lmtp"), from the SMTPS_PROTOCOLS list; drivers read their option
 *	values from it.
 *
 *	All three return static strings and keep no state.
 * DIAGNOSTICS
 *	smtps_strerror() returns "unknown error" for a code it does not
 *	know; smtps_stage_name() returns "unknown" for a stage out of range;
 *	smtps_protocol_name() returns NULL for a value that names none.
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

/* smtps_protocol_name - name a protocol, NULL when the value names none */

const char *smtps_protocol_name(int protocol)
{
#define SMTPS_X_PROTOCOL_NAME(n, v, s, g) case v: return (s);
    switch (protocol) {
	SMTPS_PROTOCOLS(SMTPS_X_PROTOCOL_NAME)
    default:
	return (0);
    }
#undef SMTPS_X_PROTOCOL_NAME
}
