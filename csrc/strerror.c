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
 *	smtps_strerror() describes an enum smtps_error value.
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
    switch (code) {
    case SMTPS_OK:
	return ("success");
    case SMTPS_ENOMEM:
	return ("out of memory");
    case SMTPS_EINVAL:
	return ("invalid argument");
    case SMTPS_ETOOBIG:
	return ("size limit exceeded");
    case SMTPS_EPROTO:
	return ("SMTP protocol error");
    case SMTPS_ESTATE:
	return ("operation not allowed in this session state");
    case SMTPS_EFULL:
	return ("table or queue full");
    case SMTPS_ECLOSED:
	return ("session closed");
    case SMTPS_ENOTFOUND:
	return ("no such state");
    case SMTPS_ETLS:
	return ("TLS failure");
    case SMTPS_ENOTSUP:
	return ("not supported");
    case SMTPS_ESYS:
	return ("system call failed");
    default:
	return ("unknown error");
    }
}

/* smtps_stage_name - name a connection stage */

const char *smtps_stage_name(int stage)
{
    if (stage < 0 || stage >= SMTPS_STAGE__COUNT || stage_names[stage] == 0)
	return ("unknown");
    return (stage_names[stage]);
}
