/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	message.c 3
 * SUMMARY
 *	one message: envelope, DSN options, body
 * SYNOPSIS
 *	#include "smtpstate.h"
 *
 *	struct smtps_message *smtps_message_new(void)
 *	void	smtps_message_free(m)
 *	int	smtps_message_set_sender(m, addr, len)
 *	int	smtps_message_add_recipient(m, addr, len, notify, orcpt, orcpt_len)
 *	int	smtps_message_set_body(m, data, len)
 *	int	smtps_message_set_dsn(m, ret, envid, envid_len)
 * DESCRIPTION
 *	A message is built before it is submitted and never changes after.
 *	Everything that will be written into a command line is checked here,
 *	once: no control byte (CR and LF above all: command injection), no
 *	angle bracket, bounded length. What the checks learn (non-ASCII
 *	addresses, 8-bit body) decides which extensions MAIL asks for.
 * DIAGNOSTICS
 *	SMTPS_EINVAL for refused input, SMTPS_ENOMEM, SMTPS_EFULL past
 *	SMTPS_MAX_RECIPIENTS.
 *--*/

#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* smtps_strndup - copy len bytes and terminate */

char   *smtps_strndup(const char *s, size_t len)
{
    char   *p = malloc(len + 1);

    if (p == NULL)
	return NULL;
    if (len)
	memcpy(p, s, len);
    p[len] = 0;
    return p;
}

/* smtps_check_text - refuse what must never reach a command line */

int smtps_check_text(const char *s, size_t len, size_t max, int *non_ascii)
{
    size_t i;
    unsigned char c;

    if (len > max || (len > 0 && s == NULL))
	return SMTPS_EINVAL;
    for (i = 0; i < len; i++) {
	c = (unsigned char) s[i];
	if (c < 0x20 || c == 0x7f || c == '<' || c == '>')
	    return SMTPS_EINVAL;
	if (c >= 0x80 && non_ascii != NULL)
	    *non_ascii = 1;
    }
    return SMTPS_OK;
}

/* smtps_message_new - an empty message */

struct smtps_message *smtps_message_new(void)
{
    struct smtps_message *m = calloc(1, sizeof(*m));

    if (m == NULL)
	return NULL;
    if ((m->sender = smtps_strndup("", 0)) == NULL) {
	free(m);
	return NULL;
    }
    return m;
}

/* smtps_message_free - release a message not handed to a session */

void smtps_message_free(struct smtps_message *m)
{
    size_t i;

    if (m == NULL)
	return;
    for (i = 0; i < m->nrcpt; i++) {
	free(m->rcpt[i].addr);
	free(m->rcpt[i].orcpt);
    }
    free(m->rcpt);
    free(m->sender);
    free(m->body);
    free(m->envid);
    free(m);
}

/* smtps_message_set_sender - the reverse-path; "" is the null sender */

int smtps_message_set_sender(struct smtps_message *m, const char *addr,
			     size_t len)
{
    int     non_ascii = 0;
    char   *copy;

    if (m == NULL || smtps_check_text(addr, len, SMTPS_ADDRESS_MAX, &non_ascii))
	return SMTPS_EINVAL;
    if ((copy = smtps_strndup(addr, len)) == NULL)
	return SMTPS_ENOMEM;
    free(m->sender);
    m->sender = copy;
    m->needs_smtputf8 |= non_ascii;
    return SMTPS_OK;
}

/* smtps_message_add_recipient - one forward-path with its DSN options */

int smtps_message_add_recipient(struct smtps_message *m, const char *addr,
				size_t len, unsigned notify,
				const char *orcpt, size_t orcpt_len)
{
    int     non_ascii = 0;
    struct smtps_rcpt r, *grown;
    size_t  cap;

    if (m == NULL || len == 0
	|| smtps_check_text(addr, len, SMTPS_ADDRESS_MAX, &non_ascii)
	|| (orcpt != NULL
	    && smtps_check_text(orcpt, orcpt_len, SMTPS_ADDRESS_MAX, NULL))
	|| (notify & ~0xfu) != 0
	|| ((notify & SMTPS_NOTIFY_NEVER) && notify != SMTPS_NOTIFY_NEVER))
	return SMTPS_EINVAL;
    if (m->nrcpt >= SMTPS_MAX_RECIPIENTS)
	return SMTPS_EFULL;
    if (m->nrcpt == m->rcpt_cap) {
	cap = m->rcpt_cap ? 2 * m->rcpt_cap : 4;
	if ((grown = realloc(m->rcpt, cap * sizeof(*grown))) == NULL)
	    return SMTPS_ENOMEM;
	m->rcpt = grown;
	m->rcpt_cap = cap;
    }
    r.notify = notify;
    r.orcpt = NULL;
    if ((r.addr = smtps_strndup(addr, len)) == NULL)
	return SMTPS_ENOMEM;
    if (orcpt != NULL && (r.orcpt = smtps_strndup(orcpt, orcpt_len)) == NULL) {
	free(r.addr);
	return SMTPS_ENOMEM;
    }
    m->rcpt[m->nrcpt++] = r;
    m->needs_smtputf8 |= non_ascii;
    return SMTPS_OK;
}

/* smtps_message_set_body - copy the content (headers and body) */

int smtps_message_set_body(struct smtps_message *m, const char *data,
			   size_t len)
{
    char   *copy;

    if (m == NULL || (len > 0 && data == NULL))
	return SMTPS_EINVAL;
    if ((copy = smtps_strndup(data, len)) == NULL)
	return SMTPS_ENOMEM;
    free(m->body);
    m->body = copy;
    m->body_len = len;
    m->is_8bit = smtps_body_is_8bit(data, len);
    return SMTPS_OK;
}

/* smtps_message_set_dsn - RET and ENVID of RFC 3461 */

int smtps_message_set_dsn(struct smtps_message *m, int ret,
			  const char *envid, size_t envid_len)
{
    int     non_ascii = 0;
    char   *copy = NULL;

    if (m == NULL || ret < SMTPS_DSN_RET_NONE || ret > SMTPS_DSN_RET_HDRS
	|| (envid != NULL
	    && (envid_len == 0 || envid_len > 100
		|| smtps_check_text(envid, envid_len, 100, &non_ascii)
		|| non_ascii)))
	return SMTPS_EINVAL;
    if (envid != NULL && (copy = smtps_strndup(envid, envid_len)) == NULL)
	return SMTPS_ENOMEM;
    free(m->envid);
    m->envid = copy;
    m->dsn_ret = ret;
    return SMTPS_OK;
}

/* smtps_message_sender - the reverse-path as given */

const char *smtps_message_sender(const struct smtps_message *m)
{
    return m ? m->sender : NULL;
}

/* smtps_message_recipient_count - how many forward-paths */

size_t smtps_message_recipient_count(const struct smtps_message *m)
{
    return m ? m->nrcpt : 0;
}

/* smtps_message_recipient - the i-th forward-path, or NULL */

const char *smtps_message_recipient(const struct smtps_message *m, size_t i)
{
    return m && i < m->nrcpt ? m->rcpt[i].addr : NULL;
}

/* smtps_message_size - content bytes as given */

uint64_t smtps_message_size(const struct smtps_message *m)
{
    return m ? m->body_len : 0;
}

/* smtps_message_tag - the tag given to smtps_session_submit() */

uint64_t smtps_message_tag(const struct smtps_message *m)
{
    return m ? m->tag : 0;
}
