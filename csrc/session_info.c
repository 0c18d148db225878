/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	session_info.c 3
 * SUMMARY
 *	what states and drivers read and set on a session
 * SYNOPSIS
 *	#include "smtpstate.h"
 *
 *	void	smtp_next_state(s, state)
 *	const struct smtps_caps *smtps_session_caps(s)
 *	int	smtps_session_pipelining(s)
 *	const struct smtps_message *smtps_session_message(s)
 *	void	*smtps_session_user(s)
 *	void	smtps_session_set_user(s, user)
 *	int	smtps_session_set_addresses(s, peer, peer_port, local, local_port)
 *	int	smtps_session_set_helo(s, helo)
 *	const char *smtps_session_peer(s, &port)
 *	const char *smtps_session_local_address(s, &port)
 *	void	*smtps_session_local(s, state_id)
 *	int	smtps_session_state(s)
 *	size_t	smtps_session_reply_index(s)
 *	int	smtps_session_set_reason(s, text)
 *	const char *smtps_session_reason(s)
 *	int	smtps_session_rcpt_index(s)
 *	int	smtps_session_set_rcpt_result(s, i, reply)
 *	unsigned smtps_session_transactions(s)
 *	int	smtps_session_dispatching(s)
 *	int	smtps_session_interrupted(s)
 *	int	smtps_session_set_auth(s, user, secret, mechs, allow_plaintext)
 *	int	smtps_session_set_protocol(s, protocol)
 *	int	smtps_session_protocol(s)
 * DESCRIPTION
 *	The session's surface apart from the driver's calls (session.c):
 *	what a state may ask while it runs, what a driver records before the
 *	start (addresses, credentials) and reads after. Every function takes
 *	NULL and answers with a neutral value, so that a caller with a
 *	session that failed to be made does not crash.
 *
 *	Credentials. smtps_session_set_auth() copies the user and secret
 *	into the session, which wipes them when it ends; the AUTH state
 *	(auth.c) reads them with smtps_session_credentials() and keeps its
 *	dialogue in its own per-connection data, as any state would.
 *
 *	The protocol (SMTP or LMTP, RFC 2033) is set before the start and
 *	fixed for the session's life: the built-in states and the loop read
 *	it (states.c: the greeting and the replies to the end of data;
 *	dispatch.c: no running ahead of a final dot).
 *--*/

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "session_private.h"

/* smtp_next_state - Momentum: choose the state entered next */

void    smtp_next_state(struct smtps_session *session, smtp_state *state)
{
    if (session == NULL)
	return;
    if (state == NULL)
	session->forced_next = -1;
    else if (state->id >= 0 && state->id < session->order->count)
	session->forced_next = state->id;
}

/* smtps_session_caps - what the server's EHLO offered */

const struct smtps_caps *smtps_session_caps(const struct smtps_session *s)
{
    return s ? &s->caps : NULL;
}

/* smtps_session_pipelining - 1 when RFC 2920 pipelining is in use */

int     smtps_session_pipelining(const struct smtps_session *s)
{
    return s ? s->pipelining : 0;
}

/* smtps_session_message - the message in its transaction, or NULL */

const struct smtps_message *smtps_session_message(const struct smtps_session *s)
{
    return s && s->tx ? s->tx->msg : NULL;
}

/* smtps_session_user - the driver's pointer given at creation */

void   *smtps_session_user(const struct smtps_session *s)
{
    return s ? s->user : NULL;
}

/* smtps_session_set_user - replace the driver's pointer (NULL: detach) */

void    smtps_session_set_user(struct smtps_session *s, void *user)
{
    if (s != NULL)
	s->user = user;
}

/* smtps_session_set_helo - another EHLO name, before the start */

int     smtps_session_set_helo(struct smtps_session *s, const char *helo)
{
    size_t  len;

    if (s == NULL || helo == NULL || (len = strlen(helo)) == 0
	|| len > SMTPS_HELO_MAX
	|| smtps_check_text(helo, len, SMTPS_HELO_MAX, NULL) != SMTPS_OK
	|| strchr(helo, ' ') != NULL)
	return SMTPS_EINVAL;
    if (s->status != SMTPS_SESS_NEW)
	return SMTPS_ESTATE;
    memcpy(s->helo, helo, len + 1);
    return SMTPS_OK;
}

/* smtps_session_set_addresses - the driver says where the connection runs */

int     smtps_session_set_addresses(struct smtps_session *s, const char *peer,
				            int peer_port, const char *local,
				            int local_port)
{
    size_t  pl, ll;

    if (s == NULL || peer == NULL || local == NULL
	|| (pl = strlen(peer)) > SMTPS_ADDRESS_TEXT_MAX
	|| (ll = strlen(local)) > SMTPS_ADDRESS_TEXT_MAX
	|| smtps_check_text(peer, pl, SMTPS_ADDRESS_TEXT_MAX, NULL) != SMTPS_OK
	|| smtps_check_text(local, ll, SMTPS_ADDRESS_TEXT_MAX, NULL) != SMTPS_OK
	|| peer_port < 0 || peer_port > 65535 || local_port < 0
	|| local_port > 65535)
	return SMTPS_EINVAL;
    memcpy(s->peer_host, peer, pl + 1);
    memcpy(s->local_host, local, ll + 1);
    s->peer_port = peer_port;
    s->local_port = local_port;
    return SMTPS_OK;
}

/* smtps_session_peer - the server's address, "" when unknown */

const char *smtps_session_peer(const struct smtps_session *s, int *port)
{
    if (port != NULL)
	*port = s ? s->peer_port : 0;
    return s ? s->peer_host : "";
}

/* smtps_session_local_address - our end of the connection, "" when unknown */

const char *smtps_session_local_address(const struct smtps_session *s,
					        int *port)
{
    if (port != NULL)
	*port = s ? s->local_port : 0;
    return s ? s->local_host : "";
}

/* smtps_session_local - per-session data of state_id */

void   *smtps_session_local(const struct smtps_session *s, int state_id)
{
    if (s == NULL || state_id < 0 || state_id >= s->order->count)
	return NULL;
    return s->local[state_id];
}

/* smtps_session_state - the state being run */

int     smtps_session_state(const struct smtps_session *s)
{
    return s ? s->cur : SMTPS_EINVAL;
}

/* smtps_session_reply_index - which of its awaited replies this is */

size_t  smtps_session_reply_index(const struct smtps_session *s)
{
    return s ? s->reply_index : 0;
}

/* smtps_session_set_reason - a state says why it fails */

int     smtps_session_set_reason(struct smtps_session *s, const char *text)
{
    if (s == NULL || text == NULL)
	return SMTPS_EINVAL;
    snprintf(s->state_reason, sizeof(s->state_reason), "%s", text);
    return SMTPS_OK;
}

/* smtps_session_reason - why the session failed or closed ("" if not) */

const char *smtps_session_reason(const struct smtps_session *s)
{
    return s ? s->reason : "";
}

/* smtps_session_rcpt_index - the recipient whose RCPT reply is at hand */

int     smtps_session_rcpt_index(const struct smtps_session *s)
{
    return s && s->tx ? s->tx->rcpt_index : -1;
}

/* smtps_session_set_rcpt_result - record recipient i's RCPT reply */

int     smtps_session_set_rcpt_result(struct smtps_session *s, size_t i,
				              const struct smtps_reply *reply)
{
    if (s == NULL || s->tx == NULL || i >= s->tx->res->nrcpt || reply == NULL)
	return SMTPS_EINVAL;
    smtps_tx_rcpt_reply(s, s->tx, i, reply);
    return SMTPS_OK;
}

/* smtps_session_transactions - transactions begun on this connection */

unsigned smtps_session_transactions(const struct smtps_session *s)
{
    return s ? s->transactions : 0;
}

/* smtps_session_dispatching - 1 while the session runs a state */

int     smtps_session_dispatching(const struct smtps_session *s)
{
    return s ? s->in_dispatch : 0;
}

/* smtps_session_interrupted - 1 once a state asked to stop at once */

int     smtps_session_interrupted(const struct smtps_session *s)
{
    return s ? s->interrupted : 0;
}

/* smtps_action_for_code - the usual action for a reply code */

int     smtps_action_for_code(int code)
{
    if (code == 421)
	return SMTPS_ACT_FAIL_CONN;
    if (code >= 200 && code < 400)
	return SMTPS_ACT_NEXT;
    return code >= 500 ? SMTPS_ACT_PERMFAIL_TX : SMTPS_ACT_TEMPFAIL_TX;
}

/* smtps_credentials_free - wipe and release credentials */

void    smtps_credentials_free(struct smtps_credentials *c)
{
    if (c == NULL)
	return;
    if (c->user != NULL)
	smtps_wipe(c->user, c->user_len);
    if (c->secret != NULL)
	smtps_wipe(c->secret, c->secret_len);
    free(c->user);
    free(c->secret);
    smtps_wipe(c, sizeof(*c));
    free(c);
}

/* smtps_session_credentials - what smtps_session_set_auth() recorded */

const struct smtps_credentials *smtps_session_credentials(const struct smtps_session *s)
{
    return s ? s->cred : NULL;
}

/* smtps_session_set_auth - credentials for AUTH; before start */

int     smtps_session_set_auth(struct smtps_session *s, const char *user,
			               const char *secret, unsigned mechs,
			               int allow_plaintext)
{
    struct smtps_credentials *c;
    size_t  ulen, slen;

    if (s == NULL)
	return SMTPS_EINVAL;
    if (s->status != SMTPS_SESS_NEW)
	return SMTPS_ESTATE;
    if (user == NULL && secret == NULL) {	/* no AUTH after all */
	smtps_credentials_free(s->cred);
	s->cred = NULL;
	return SMTPS_OK;
    }
    if (user == NULL || secret == NULL || (mechs & ~SMTPS_AUTH_ALL) != 0)
	return SMTPS_EINVAL;
    ulen = strlen(user);
    slen = strlen(secret);
    if (ulen == 0 || ulen > SMTPS_AUTH_USER_MAX || slen == 0
	|| slen > SMTPS_AUTH_SECRET_MAX)
	return SMTPS_EINVAL;
    /* 0x01 separates XOAUTH2's fields. */
    if ((mechs & SMTPS_AUTH_XOAUTH2)
	&& (memchr(user, 1, ulen) != NULL || memchr(secret, 1, slen) != NULL))
	return SMTPS_EINVAL;
    if ((c = calloc(1, sizeof(*c))) == NULL)
	return SMTPS_ENOMEM;
    c->user = smtps_strndup(user, ulen);
    c->secret = smtps_strndup(secret, slen);
    c->user_len = ulen;
    c->secret_len = slen;
    if (c->user == NULL || c->secret == NULL) {
	smtps_credentials_free(c);
	return SMTPS_ENOMEM;
    }
    c->mechs = mechs;
    c->allow_plaintext = allow_plaintext != 0;
    smtps_credentials_free(s->cred);		/* a second call replaces */
    s->cred = c;
    return SMTPS_OK;
}

/* smtps_session_set_protocol - SMTP or LMTP; before start */

int     smtps_session_set_protocol(struct smtps_session *s, int protocol)
{
    if (s == NULL || smtps_protocol_name(protocol) == NULL)
	return SMTPS_EINVAL;
    /* The greeting may be out already, in the other protocol's words. */
    if (s->status != SMTPS_SESS_NEW)
	return SMTPS_ESTATE;
    s->protocol = protocol;
    return SMTPS_OK;
}

/* smtps_session_protocol - the protocol the session speaks */

int     smtps_session_protocol(const struct smtps_session *s)
{
    return s ? s->protocol : SMTPS_PROTO_SMTP;
}
