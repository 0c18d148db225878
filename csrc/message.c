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
 *	int	smtps_message_set_body_options(m, flags)
 *	int	smtps_message_set_body(m, data, len)
 *	int	smtps_message_set_body_ref(m, data, len)
 *	int	smtps_message_set_body_fixed(m, data, len)
 *	int	smtps_message_set_body_source(m, read, closure, size, is_8bit)
 *	int	smtps_message_set_dsn(m, ret, envid, envid_len)
 *	int	smtps_message_set_require_tls(m, require)
 *	int	smtps_message_set_smtputf8(m, on)
 *	int	smtps_message_require_tls(m)
 *
 *	int	smtps_message_check_plain(sender, sender_len, rcpts, rcpts_len,
 *					  nrcpt, body, body_len)
 * DESCRIPTION
 *	A message is built before it is submitted and never changes after.
 *	Everything that will be written into a command line is checked here,
 *	once: no control byte (CR and LF above all: command injection), no
 *	angle bracket, bounded length. What the checks learn (non-ASCII
 *	addresses, 8-bit body, the RFC 1870 size) decides which extensions
 *	MAIL asks for.
 *
 *	The body is in memory (copied, or referenced and kept alive by the
 *	caller) and checked here: no NUL byte, no line over 998 octets unless
 *	the body options allow it (smtps_body_scan(), body.c). Or it is a
 *	source, read while it is sent, and checked as it goes (transaction.c).
 *
 *	smtps_message_check_plain() is for a binding's fast path: 1 when a
 *	sender, nrcpt recipients (rcpts: joined by one LF each) and an
 *	in-memory body are certainly acceptable as they are, else 0. Every
 *	address is then printable ASCII without angle brackets, at most
 *	SMTPS_ADDRESS_MAX bytes, a recipient not empty; the body passes
 *	smtps_body_check() with no option. It never says why: 0 means only
 *	"not this way", and the caller checks again, in full, to find out.
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

/* plain_address - printable ASCII, no angle bracket, 1 to SMTPS_ADDRESS_MAX */

static int plain_address(const unsigned char *s, size_t len)
{
    size_t  i;

    if (len == 0 || len > SMTPS_ADDRESS_MAX)
	return 0;
    for (i = 0; i < len; i++)
	if (s[i] < 0x20 || s[i] > 0x7e || s[i] == '<' || s[i] == '>')
	    return 0;
    return 1;
}

/*
 * smtps_message_check_plain - an envelope and body certainly fine as they are
 *
 * One call instead of one per address and one for the body: a binding
 * pays for each call across (cffi releases and takes back the GIL), more
 * than this costs for a usual message. The recipients come joined by LF,
 * which no plain address holds; counting them is what tells an LF between
 * two of them from one inside an address.
 */

int     smtps_message_check_plain(const char *sender, size_t sender_len,
				          const char *rcpts, size_t rcpts_len,
				          size_t nrcpt, const char *body,
				          size_t body_len)
{
    const unsigned char *p = (const unsigned char *) rcpts, *end, *lf;
    size_t  n = 0;

    if ((sender_len > 0 && (sender == NULL
			    || !plain_address((const unsigned char *) sender,
					      sender_len)))
	|| rcpts == NULL || nrcpt == 0 || nrcpt > SMTPS_MAX_RECIPIENTS
	|| (body_len > 0 && body == NULL))
	return 0;
    end = p + rcpts_len;
    for (;;) {
	lf = memchr(p, '\n', (size_t) (end - p));
	if (!plain_address(p, (size_t) ((lf ? lf : end) - p)) || ++n > nrcpt)
	    return 0;
	if (lf == NULL)
	    break;
	p = lf + 1;
    }
    return (n == nrcpt && smtps_body_check(body, body_len, 0) == 0);
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
    m->body_size = 0;				/* an empty body */
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
    if (m->body_owned)
	free(m->body);
    free(m->envid);
    free(m);
}

/* copy_rcpt - one recipient, into a message being made */

static int copy_rcpt(struct smtps_message *m, const struct smtps_rcpt *src)
{
    struct smtps_rcpt *dst = &m->rcpt[m->nrcpt++];	/* counted: freed */
    int     non_ascii = 0;

    dst->notify = src->notify;
    if ((dst->addr = smtps_strndup(src->addr, strlen(src->addr))) == NULL
	|| (src->orcpt != NULL
	    && (dst->orcpt = smtps_strndup(src->orcpt, strlen(src->orcpt))) == NULL))
	return SMTPS_ENOMEM;
    (void) smtps_check_text(dst->addr, strlen(dst->addr), SMTPS_ADDRESS_MAX,
			    &non_ascii);
    m->needs_smtputf8 |= non_ascii;
    return SMTPS_OK;
}

/*
 * smtps_message_part - the recipients idx[0..n) of m, in a message of
 * their own with m's envelope, going to another destination. The body is
 * m's: its own copy shared (m must outlive the part), the same buffer,
 * or the same source (read by position, so parts may read at once).
 */

struct smtps_message *smtps_message_part(const struct smtps_message *m,
					         const size_t *idx, size_t n)
{
    struct smtps_message *p;
    size_t  i;
    int     non_ascii = 0;

    if ((p = smtps_message_new()) == NULL)
	return NULL;
    free(p->sender);
    if ((p->sender = smtps_strndup(m->sender, strlen(m->sender))) == NULL
	|| (n > 0 && (p->rcpt = calloc(n, sizeof(*p->rcpt))) == NULL)
	|| (m->envid != NULL
	    && (p->envid = smtps_strndup(m->envid, strlen(m->envid))) == NULL))
	goto nomem;
    p->rcpt_cap = n;
    (void) smtps_check_text(p->sender, strlen(p->sender), SMTPS_ADDRESS_MAX,
			    &non_ascii);
    p->needs_smtputf8 = non_ascii;
    for (i = 0; i < n; i++)
	if (idx[i] >= m->nrcpt || copy_rcpt(p, &m->rcpt[idx[i]]) != SMTPS_OK)
	    goto nomem;
    p->dsn_ret = m->dsn_ret;
    p->require_tls = m->require_tls;		/* every part keeps it */
    p->want_smtputf8 = m->want_smtputf8;	/* and SMTPUTF8 asked for */
    p->needs_smtputf8 |= m->want_smtputf8;
    p->body = m->body;
    p->body_len = m->body_len;
    p->body_owned = 0;
    p->body_shared = m->body_owned || m->body_shared;
    p->body_flags = m->body_flags;
    p->body_size = m->body_size;
    p->body_read = m->body_read;
    p->body_closure = m->body_closure;
    p->is_8bit = m->is_8bit;
    return p;

nomem:
    smtps_message_free(p);
    return NULL;
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

/* smtps_message_set_body_options - SMTPS_BODY_ALLOW_*, before the body */

int     smtps_message_set_body_options(struct smtps_message *m, unsigned flags)
{
    if (m == NULL || (flags & ~SMTPS_BODY_ALLOW_LONG_LINES) != 0)
	return SMTPS_EINVAL;
    m->body_flags = flags;
    return SMTPS_OK;
}

/* body_drop - forget the body the message has */

static void body_drop(struct smtps_message *m)
{
    if (m->body_owned)
	free(m->body);
    m->body = NULL;
    m->body_len = 0;
    m->body_owned = 0;
    m->body_shared = 0;
    m->body_fixed = 0;
    m->body_read = NULL;
    m->body_closure = NULL;
    m->body_size = 0;
    m->is_8bit = 0;
}

/*
 * body_keep - an in-memory body, after the checks that protect the wire:
 * no NUL, no overlong line unless allowed (smtpstate.h says why)
 */

static int body_keep(struct smtps_message *m, const char *data, size_t len,
		             int copy)
{
    char   *kept = (char *) data;
    uint64_t size = 0;
    int     is_8bit = 0;

    if (m == NULL || (len > 0 && data == NULL))
	return SMTPS_EINVAL;
    /* The usual body is measured in one quick pass, not scanned. */
    if (len > 0 && smtps_body_inspect(data, len, m->body_flags, &size,
				      &is_8bit) != 0)
	return SMTPS_EINVAL;
    if (copy && (kept = smtps_strndup(data, len)) == NULL)
	return SMTPS_ENOMEM;
    body_drop(m);
    m->body = kept;
    m->body_len = len;
    m->body_owned = copy;
    m->body_size = (int64_t) size;
    m->is_8bit = is_8bit;
    return SMTPS_OK;
}

/* smtps_message_set_body - copy the content (headers and body) */

int     smtps_message_set_body(struct smtps_message *m, const char *data,
			               size_t len)
{
    return body_keep(m, data, len, 1);
}

/* smtps_message_set_body_ref - the content, not copied: the caller keeps it */

int     smtps_message_set_body_ref(struct smtps_message *m, const char *data,
				           size_t len)
{
    return body_keep(m, data, len, 0);
}

/*
 * smtps_message_set_body_fixed - the content, not copied, never changed:
 * the copies made from this message share it as checked here
 */

int     smtps_message_set_body_fixed(struct smtps_message *m,
				             const char *data, size_t len)
{
    int     rc;

    if ((rc = body_keep(m, data, len, 0)) == SMTPS_OK)
	m->body_fixed = 1;
    return rc;
}

/* smtps_message_set_body_source - the content, read as it is sent */

int     smtps_message_set_body_source(struct smtps_message *m,
				              SMTPSBodyRead read, void *closure,
				              int64_t size, int is_8bit)
{
    if (m == NULL || read == NULL || size < -1 || is_8bit < -1 || is_8bit > 1)
	return SMTPS_EINVAL;
    body_drop(m);
    m->body_read = read;
    m->body_closure = closure;
    m->body_size = size;
    m->is_8bit = is_8bit;
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

/*
 * smtps_message_set_require_tls - REQUIRETLS (RFC 8689): the message goes
 * only over verified TLS to a server that offers the extension (states.c)
 */

int     smtps_message_set_require_tls(struct smtps_message *m, int require)
{
    if (m == NULL || (require != 0 && require != 1))
	return SMTPS_EINVAL;
    m->require_tls = require;
    return SMTPS_OK;
}

/*
 * smtps_message_set_smtputf8 - SMTPUTF8 (RFC 6531) on MAIL FROM even for
 * an ASCII envelope: a relay that received the message with it must not
 * take it off (the content may be UTF-8), so a server without it gets no
 * MAIL for it (states.c), as for a non-ASCII address
 */

int     smtps_message_set_smtputf8(struct smtps_message *m, int on)
{
    if (m == NULL || (on != 0 && on != 1))
	return SMTPS_EINVAL;
    m->want_smtputf8 = on;
    if (on)
	m->needs_smtputf8 = 1;
    return SMTPS_OK;
}

/* smtps_message_require_tls - 1 when the message requires TLS (RFC 8689) */

int     smtps_message_require_tls(const struct smtps_message *m)
{
    return m != NULL && m->require_tls;
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

/* smtps_message_size - content bytes as given (UINT64_MAX: a source) */

uint64_t smtps_message_size(const struct smtps_message *m)
{
    if (m == NULL)
	return 0;
    return m->body_read != NULL ? UINT64_MAX : m->body_len;
}

/* smtps_message_tag - the tag given to smtps_session_submit() */

uint64_t smtps_message_tag(const struct smtps_message *m)
{
    return m ? m->tag : 0;
}
