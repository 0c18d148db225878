/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	tlsrpt.c 3
 * SUMMARY
 *	TLS events of the engine's connections, the matter of TLS reports
 * SYNOPSIS
 *	#include "engine_private.h"
 *
 *	int	smtps_engine_set_tls_events(e, max)
 *	int	smtps_engine_next_tls_event(e, ev)
 *	uint64_t smtps_engine_tls_events_dropped(e)
 *
 *	void	smtps_tlsrpt_begin(c)
 *	void	smtps_tlsrpt_note(c, m)
 *	void	smtps_tlsrpt_conn(c, over)
 *	void	smtps_tlsrpt_refused(c, bogus)
 *	void	smtps_tlsrpt_sts_unmatched(e, domain)
 *	void	smtps_tlsrpt_end(c)
 *	void	smtps_tlsrpt_free(e)
 * DESCRIPTION
 *	RFC 8460 counts sessions: for each recipient domain, how many of the
 *	connections made to deliver its mail negotiated TLS as its policy
 *	(DANE's TLSA records, MTA-STS, or none) asks, and why the others did
 *	not, in the RFC's words ("certificate-host-mismatch",
 *	"starttls-not-supported", ...). This file turns what the engine saw
 *	into such events, in a queue the caller drains; the aggregation into
 *	reports is the caller's (Python's smtpstate.tlsrpt).
 *
 *	A connection that wants TLS (smtps_tlsrpt_begin(), at set-up) owes
 *	one event. The domains it is for are those of the messages handed to
 *	its session until the event goes (smtps_tlsrpt_note()): in practice
 *	the first message's, as the outcome is known after the first EHLO;
 *	a destination given by host name is its own domain. The event goes
 *	as soon as the session knows what became of TLS (smtps_tls_outcome():
 *	up, not offered, refused, handshake failed), at the latest when the
 *	connection ends; one that ended before (refused greeting, lost
 *	connection) owes none: no TLS was attempted. A connection in clear
 *	after opportunistic TLS failed at its address owes none either: the
 *	failure was the previous one's event.
 *
 *	Where the domain's MTA-STS policy is in testing mode, opportunistic
 *	TLS also checks the certificate against the MX host's name, without
 *	enforcing it (smtps_tls_observe()): a failure is reported, and the
 *	mail goes all the same (RFC 8461 5).
 *
 *	Events that no connection makes: an address DANE forbids (its TLSA
 *	records failed validation: "dnssec-invalid"; "dane-only" and none:
 *	"dane-required"), and a domain whose MTA-STS policy in force
 *	matches none of its MX hosts ("validation-failure", no host).
 *
 *	The queue holds at most max events; the oldest go first when it is
 *	full, and are counted. The MTA-STS policy itself (its text, its mx
 *	patterns) is the caller's: the event only says "sts" where the
 *	domain's policy was in force.
 * SEE ALSO
 *	RFC 8460 4.3 (result types), conn.c, tls.c (smtps_tls_outcome()).
 *--*/

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/x509.h>

#include "engine_private.h"
#include "session_private.h"

#define TLSRPT_DOMAINS_MAX 1024		/* a connection's domains, in bytes */
#define TLSRPT_TLSA_MAX 4096		/* the TLSA records, as text */

/* One event and the strings it points into. */
struct smtps_tls_event_rec {
    struct smtps_tls_event_rec *next;
    struct smtps_tls_event ev;
    char    text[];
};

/* smtps_engine_set_tls_events - record up to max events; 0: none */

int     smtps_engine_set_tls_events(struct smtps_engine *e, size_t max)
{
    if (e == NULL)
	return SMTPS_EINVAL;
    e->tls_events_max = max;
    return SMTPS_OK;
}

/* smtps_engine_tls_events_dropped - events lost to a full queue */

uint64_t smtps_engine_tls_events_dropped(const struct smtps_engine *e)
{
    return e != NULL ? e->tls_events_dropped : 0;
}

/* smtps_engine_next_tls_event - the oldest event in ev (1), or none (0) */

int     smtps_engine_next_tls_event(struct smtps_engine *e,
				            struct smtps_tls_event *ev)
{
    struct smtps_tls_event_rec *r;

    if (e == NULL || ev == NULL)
	return SMTPS_EINVAL;
    free(e->tls_event_taken);			/* its strings were the caller's */
    e->tls_event_taken = NULL;
    if ((r = e->tls_events) == NULL)
	return 0;
    if ((e->tls_events = r->next) == NULL)
	e->tls_events_tail = NULL;
    e->ntls_events--;
    e->tls_event_taken = r;
    *ev = r->ev;
    return 1;
}

/* event_string - copy s into the record's text at *at; its new place */

static const char *event_string(char **at, const char *s)
{
    const char *copy = *at;
    size_t  len = strlen(s) + 1;

    memcpy(*at, s, len);
    *at += len;
    return copy;
}

/* event_push - a copy of ev at the end of the queue */

static void event_push(struct smtps_engine *e, const struct smtps_tls_event *ev)
{
    const char *const strings[] = {ev->domains, ev->mx_host, ev->mx_ip,
	ev->source_ip, ev->level, ev->policy, ev->tlsa, ev->result,
    ev->detail, ev->version};
    struct smtps_tls_event_rec *r, *old;
    size_t  i, len = 0;
    char   *at;

    if (e->tls_events_max == 0)
	return;
    for (i = 0; i < sizeof(strings) / sizeof(strings[0]); i++)
	len += strlen(strings[i]) + 1;
    if ((r = malloc(sizeof(*r) + len)) == NULL) {
	e->tls_events_dropped++;
	return;
    }
    at = r->text;
    r->next = NULL;
    r->ev = *ev;
    r->ev.domains = event_string(&at, ev->domains);
    r->ev.mx_host = event_string(&at, ev->mx_host);
    r->ev.mx_ip = event_string(&at, ev->mx_ip);
    r->ev.source_ip = event_string(&at, ev->source_ip);
    r->ev.level = event_string(&at, ev->level);
    r->ev.policy = event_string(&at, ev->policy);
    r->ev.tlsa = event_string(&at, ev->tlsa);
    r->ev.result = event_string(&at, ev->result);
    r->ev.detail = event_string(&at, ev->detail);
    r->ev.version = event_string(&at, ev->version);
    while (e->ntls_events >= e->tls_events_max && (old = e->tls_events) != NULL) {
	if ((e->tls_events = old->next) == NULL)
	    e->tls_events_tail = NULL;
	e->ntls_events--;
	e->tls_events_dropped++;
	free(old);
    }
    if (e->tls_events_tail != NULL)
	e->tls_events_tail->next = r;
    else
	e->tls_events = r;
    e->tls_events_tail = r;
    e->ntls_events++;
}

/* smtps_tlsrpt_free - the events nobody took */

void    smtps_tlsrpt_free(struct smtps_engine *e)
{
    struct smtps_tls_event_rec *r;

    while ((r = e->tls_events) != NULL) {
	e->tls_events = r->next;
	free(r);
    }
    free(e->tls_event_taken);
    e->tls_event_taken = e->tls_events_tail = NULL;
    e->ntls_events = 0;
}

/* ------------------------------------------------------------------ */
/* A connection's event                                                */
/* ------------------------------------------------------------------ */

/*
 * smtps_tlsrpt_begin - set-up: does this connection owe an event? Under
 * an MTA-STS policy in testing mode, opportunistic TLS also checks the
 * certificate against the MX host's name, for the report only.
 */

void    smtps_tlsrpt_begin(struct smtps_conn *c)
{
    int     level = smtps_conn_tls_level(c);

    c->tls_event = c->e->tls_events_max > 0 && !c->in_clear
	&& level > SMTPS_TLS_NONE;
    free(c->tls_domains);
    c->tls_domains = NULL;
    if (c->tls_event && level == SMTPS_TLS_OPPORTUNISTIC
	&& (c->d->site_flags & SMTPS_SITE_STS_TESTING))
	(void) smtps_tls_observe(c->s);		/* no name, no CAs: not checked */
}

/* domains_add - domain (len bytes) on the list (a line each), if new */

static void domains_add(char **list, const char *domain, size_t len)
{
    const char *p, *eol;
    size_t  have = *list != NULL ? strlen(*list) : 0;
    char   *grown;

    if (len == 0 || len > SMTPS_HOST_MAX)
	return;
    for (p = *list; p != NULL && *p; p = *eol ? eol + 1 : eol) {
	if ((eol = strchr(p, '\n')) == NULL)
	    eol = p + strlen(p);
	if ((size_t) (eol - p) == len && strncasecmp(p, domain, len) == 0)
	    return;
    }
    /* Beyond the bound, the domains are not counted (documented). */
    if (have + len + 2 > TLSRPT_DOMAINS_MAX
	|| (grown = realloc(*list, have + len + 2)) == NULL)
	return;
    if (have > 0)
	grown[have++] = '\n';
    memcpy(grown + have, domain, len);
    grown[have + len] = 0;
    *list = grown;
}

/* smtps_tlsrpt_note - the domains of m, for the event to come */

void    smtps_tlsrpt_note(struct smtps_conn *c, const struct smtps_message *m)
{
    const char *at;
    size_t  i;

    if (!c->tls_event)
	return;
    if (c->d->site == NULL) {			/* a host: its own domain */
	if (c->tls_domains == NULL)
	    domains_add(&c->tls_domains, smtps_conn_host(c),
			strlen(smtps_conn_host(c)));
	return;
    }
    for (i = 0; i < m->nrcpt; i++)
	if ((at = strrchr(m->rcpt[i].addr, '@')) != NULL)
	    domains_add(&c->tls_domains, at + 1, strlen(at + 1));
}

/* tlsa_text - the host's TLSA records, "usage selector mtype hex" a line each */

static void tlsa_text(const struct smtps_dest_host *h, char *buf, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    size_t  i, j, at = 0, need;

    buf[0] = 0;
    for (i = 0; h != NULL && i < h->ntlsa; i++) {
	need = 16 + 2 * h->tlsa[i].len;
	if (at + need >= len)
	    break;				/* the rest would not fit */
	at += (size_t) snprintf(buf + at, len - at, "%s%u %u %u ", at ? "\n" : "",
				h->tlsa[i].usage, h->tlsa[i].selector,
				h->tlsa[i].mtype);
	for (j = 0; j < h->tlsa[i].len; j++) {
	    buf[at++] = hex[h->tlsa[i].data[j] >> 4];
	    buf[at++] = hex[h->tlsa[i].data[j] & 15];
	}
	buf[at] = 0;
    }
}

/* level_name - what the connection was to do, in the words of tls= */

static const char *level_name(const struct smtps_conn *c, int level)
{
    int     mode = c->d->tls_mode;

    if (mode == SMTPS_TLS_DANE || mode == SMTPS_TLS_DANE_ONLY
	|| mode == SMTPS_TLS_MTA_STS) {
	if (mode != SMTPS_TLS_MTA_STS && smtps_conn_dane(c))
	    return "dane";
	if (level == SMTPS_TLS_VERIFY)
	    return "mta-sts";			/* raised by the domain's policy */
    }
    switch (level) {
    case SMTPS_TLS_OPPORTUNISTIC:
	return "opportunistic";
    case SMTPS_TLS_VERIFY:
	return "verify";
    case SMTPS_TLS_IMPLICIT:
	return "implicit";
    default:
	return "none";
    }
}

/*
 * result_type - RFC 8460 4.3's name for what became of TLS: the
 * certificate's faults by OpenSSL's verify result; DANE's records that
 * matched nothing are "tlsa-invalid" (none of them was found valid for
 * the server); a handshake that failed otherwise, "validation-failure"
 */

static const char *result_type(int outcome, long verify)
{
    switch (outcome) {
    case SMTPS_TLSO_UP:
	return "success";
    case SMTPS_TLSO_NOT_OFFERED:
    case SMTPS_TLSO_REFUSED:
	return "starttls-not-supported";
    }
    switch (verify) {
    case X509_V_ERR_HOSTNAME_MISMATCH:
	return "certificate-host-mismatch";
    case X509_V_ERR_CERT_HAS_EXPIRED:
    case X509_V_ERR_CERT_NOT_YET_VALID:
	return "certificate-expired";
    case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
    case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
    case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
    case X509_V_ERR_CERT_UNTRUSTED:
    case X509_V_ERR_CERT_REJECTED:
	return "certificate-not-trusted";
    case X509_V_ERR_DANE_NO_MATCH:
	return "tlsa-invalid";
    default:
	return "validation-failure";
    }
}

/* conn_event - an event of c's, with the fields common to all */

static void conn_event(struct smtps_conn *c, struct smtps_tls_event *ev,
		               char *tlsa, size_t tlsalen)
{
    const struct smtps_dest_host *h = smtps_conn_dest_host(c);
    const char *local = "";
    int     port, state = h != NULL ? smtps_dest_tlsa(c->d, h) : TLSA_NONE;

    if (c->s != NULL)
	local = smtps_session_local_address(c->s, &port);
    memset(ev, 0, sizeof(*ev));
    ev->domains = c->tls_domains != NULL ? c->tls_domains : "";
    ev->mx_host = c->addr >= 0 ? smtps_conn_host(c) : "";
    ev->mx_ip = c->addrtext;
    ev->source_ip = local;
    ev->level = level_name(c, smtps_conn_tls_level(c));
    tlsa_text(h, tlsa, tlsalen);
    ev->tlsa = tlsa;
    ev->policy = state == TLSA_USABLE || state == TLSA_UNUSABLE
	|| state == TLSA_BOGUS ? "tlsa" :
	c->d->site_flags & SMTPS_SITE_STS ? "sts" : "";
    ev->detail = ev->version = "";
}

/* conn_observed - what checking TLS found where it only observes */

static long conn_observed(const struct smtps_conn *c)
{
    return c->d->site_flags & SMTPS_SITE_STS_TESTING ? smtps_tls_observed(c->s) :
	X509_V_OK;
}

/* smtps_tlsrpt_conn - the outcome, if known (or over): the event goes */

void    smtps_tlsrpt_conn(struct smtps_conn *c, int over)
{
    struct smtps_tls_event ev;
    char    tlsa[TLSRPT_TLSA_MAX], detail[200];
    long    verify;
    int     outcome;

    if (!c->tls_event || c->s == NULL)
	return;
    outcome = smtps_tls_outcome(c->s, over, &verify);
    if (outcome == SMTPS_TLSO_PENDING) {
	if (over)
	    smtps_tlsrpt_end(c);		/* never got as far as TLS */
	return;
    }
    if (c->tls_domains == NULL && c->d->site == NULL)
	smtps_tlsrpt_note(c, NULL);
    conn_event(c, &ev, tlsa, sizeof(tlsa));
    ev.result = result_type(outcome, verify);
    if (outcome == SMTPS_TLSO_UP
	&& (verify = conn_observed(c)) != X509_V_OK) {
	/* A testing policy's check failed: delivered all the same. */
	ev.result = result_type(SMTPS_TLSO_FAILED, verify);
	snprintf(detail, sizeof(detail), "certificate verify failed (%s); "
		 "delivered: the MTA-STS policy is in testing mode",
		 X509_verify_cert_error_string(verify));
	ev.detail = detail;
    }
    if (outcome == SMTPS_TLSO_UP) {
	ev.version = smtps_session_tls_version(c->s);
	ev.verified = smtps_tls_verified(c->s);
	ev.resumed = smtps_session_tls_resumed(c->s);
    } else {
	ev.detail = smtps_session_reason(c->s);
	if (outcome == SMTPS_TLSO_NOT_OFFERED)
	    ev.detail = "the server does not offer STARTTLS";
    }
    event_push(c->e, &ev);
    smtps_tlsrpt_end(c);
}

/* smtps_tlsrpt_refused - DANE forbids c's address (c->why says why) */

void    smtps_tlsrpt_refused(struct smtps_conn *c, int bogus)
{
    struct smtps_tls_event ev;
    char    tlsa[TLSRPT_TLSA_MAX];
    const struct smtps_message *m;

    if (c->e->tls_events_max == 0)
	return;
    c->tls_event = 1;
    for (m = c->d->qhead; m != NULL && c->tls_domains == NULL; m = m->qnext)
	smtps_tlsrpt_note(c, m);		/* those it would have been for */
    if (c->d->site == NULL)
	smtps_tlsrpt_note(c, NULL);
    conn_event(c, &ev, tlsa, sizeof(tlsa));
    ev.policy = "tlsa";
    ev.level = "dane";
    ev.result = bogus ? "dnssec-invalid" : "dane-required";
    ev.detail = c->why;
    event_push(c->e, &ev);
    smtps_tlsrpt_end(c);
}

/* smtps_tlsrpt_sts_unmatched - no MX host of domain matches its policy */

void    smtps_tlsrpt_sts_unmatched(struct smtps_engine *e, const char *domain)
{
    struct smtps_tls_event ev;

    memset(&ev, 0, sizeof(ev));
    ev.domains = domain;
    ev.mx_host = ev.mx_ip = ev.source_ip = ev.tlsa = ev.version = "";
    ev.level = "mta-sts";
    ev.policy = "sts";
    ev.result = "validation-failure";
    ev.detail = "none of its MX hosts matches its MTA-STS policy";
    event_push(e, &ev);
}

/* smtps_tlsrpt_end - no event (more) is due from c */

void    smtps_tlsrpt_end(struct smtps_conn *c)
{
    c->tls_event = 0;
    free(c->tls_domains);
    c->tls_domains = NULL;
}
