/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	count_state.c
 * SUMMARY
 *	an smtpstate state written in C, built by the user as a shared library
 * SYNOPSIS
 *	cc -shared -fPIC -O2 -I include count_state.c -o libcount_state.so
 *
 *	int	count_state_fill(state, api, napi)
 *	smtp_state *state;
 *	void	*const *api;
 *	size_t	napi;
 *
 *	void	count_state_stats(messages, recipients, bytes)
 *	long	*messages, *recipients;
 *	unsigned long long *bytes;
 * DESCRIPTION
 *	A state for after BODY that counts the messages the server accepted,
 *	their recipients and their size. It awaits no reply, so it costs no
 *	round trip, and reports a stage of its own (30, "counting").
 *
 *	count_state_fill() fills in a smtp_state whose callbacks are the C
 *	functions of this library; Python registers it with
 *	Machine.register_c_state(), which calls smtps_machine_register().
 *	The function pointers are plain C addresses, valid in any library of
 *	the process.
 *
 *	Why the API table: the smtpstate core is built with
 *	-fvisibility=hidden and loaded by Python with RTLD_LOCAL, so a library
 *	built apart cannot link against its functions. The few it calls are
 *	handed over as pointers instead, in the order of COUNT_API_*
 *	(Python takes them with ffi.addressof(lib, name)). The header gives
 *	the types; nothing else of smtpstate is needed at build time.
 *--*/

#include <stddef.h>
#include <string.h>

#include "smtpstate.h"

#define COUNT_STAGE 30			/* a stage code of our own */

/* The smtpstate functions we call, by index in the api table. */
#define COUNT_API_SESSION_MESSAGE 0	/* smtps_session_message */
#define COUNT_API_MESSAGE_SIZE 1	/* smtps_message_size */
#define COUNT_API_RECIPIENT_COUNT 2	/* smtps_message_recipient_count */
#define COUNT_API_N 3

struct count_stats {
    long    messages;
    long    recipients;
    unsigned long long bytes;
};

static const struct smtps_message *(*session_message) (const struct smtps_session *);
static uint64_t (*message_size) (const struct smtps_message *);
static size_t (*recipient_count) (const struct smtps_message *);
static struct count_stats stats;

int count_state_fill(smtp_state *state, void *const *api, size_t napi);
void count_state_stats(long *messages, long *recipients, unsigned long long *bytes);

/* count_setup - nothing to send, no reply to wait for */

static int count_setup(struct smtps_session *s, void *closure)
{
    (void) s;
    (void) closure;
    return 0;
}

/* count_callback - called once (reply NULL): count the message in hand */

static int count_callback(struct smtps_session *s, const struct smtps_reply *r,
			          void *closure)
{
    struct count_stats *st = closure;
    const struct smtps_message *m = session_message(s);

    (void) r;
    if (m != NULL) {
	st->messages++;
	st->recipients += (long) recipient_count(m);
	st->bytes += message_size(m);
    }
    return SMTPS_ACT_NEXT;
}

/* count_stage - the stage reported while in this state */

static int count_stage(struct smtps_session *s, int awaiting, void *closure)
{
    (void) s;
    (void) awaiting;
    (void) closure;
    return COUNT_STAGE;
}

/* count_stage_name - our stage's name; NULL: smtpstate names the others */

static const char *count_stage_name(int stage, void *closure)
{
    (void) closure;
    return stage == COUNT_STAGE ? "counting" : NULL;
}

/* count_state_fill - describe the state; 0, or -1 for a short api table */

int     count_state_fill(smtp_state *state, void *const *api, size_t napi)
{
    if (state == NULL || api == NULL || napi < COUNT_API_N)
	return -1;
    /* POSIX (dlsym) guarantees that function pointers survive void *. */
    *(void **) &session_message = api[COUNT_API_SESSION_MESSAGE];
    *(void **) &message_size = api[COUNT_API_MESSAGE_SIZE];
    *(void **) &recipient_count = api[COUNT_API_RECIPIENT_COUNT];
    memset(state, 0, sizeof(*state));
    state->sizeof_smtp_state = sizeof(*state);	/* the ABI guard */
    state->name = "count";			/* copied at registration */
    state->setup = count_setup;
    state->callback = count_callback;
    state->tostage = count_stage;
    state->tostring = count_stage_name;
    state->closure = &stats;			/* handed back untouched */
    return 0;
}

/* count_state_stats - what was counted so far */

void    count_state_stats(long *messages, long *recipients,
			          unsigned long long *bytes)
{
    *messages = stats.messages;
    *recipients = stats.recipients;
    *bytes = stats.bytes;
}
