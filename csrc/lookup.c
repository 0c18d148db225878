/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	lookup.c 3
 * SUMMARY
 *	blocking lookups for a caller's own threads: TXT and addresses
 * SYNOPSIS
 *	#include "smtpstate.h"
 *
 *	struct smtps_lookup *smtps_lookup_new(cfg, why, whylen)
 *	int	smtps_lookup_txt(l, name, out, outlen)
 *	int	smtps_lookup_address(l, name, out, outlen)
 *	void	smtps_lookup_free(l)
 * DESCRIPTION
 *	What a caller must know before it gives the engine its messages,
 *	and may find out in threads of its own while the engine runs:
 *	Python's MTA-STS discovery asks for a domain's "_mta-sts" TXT
 *	records and the address of its "mta-sts" host through these, with
 *	the engine's resolver settings (resolve.c, libunbound: the same name
 *	servers, trust anchors and local records), so that a name the
 *	engine can route is a name this can find. One context serves any
 *	number of threads at once (libunbound locks it).
 *
 *	smtps_lookup_txt() writes the name's TXT records into out, each
 *	record's strings joined, records separated by a newline; it returns
 *	how many there were (0: none, or no such name). A record that would
 *	not fit, or that holds a NUL or a newline, is left out.
 *	smtps_lookup_address() writes the name's first IPv4 address, else
 *	its first IPv6 address, as text; 1 when there was one, else 0.
 * DIAGNOSTICS
 *	SMTPS_EAGAIN: the lookup failed for now (SERVFAIL, no answer, DNSSEC
 *	bogus); SMTPS_EINVAL: a bad name or argument; SMTPS_ENOMEM.
 *	smtps_lookup_new() returns NULL and says why in why[].
 * SEE ALSO
 *	resolve.c; smtpstate/mta_sts.py, smtpstate/engine.py.
 *--*/

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <arpa/nameser.h>
#include <unbound.h>

#include "engine_private.h"

struct smtps_lookup {
    struct smtps_dns *dns;
    int64_t timeout_ms;			/* a lookup's, all its attempts */
};

/* smtps_lookup_new - a context with these resolver settings */

struct smtps_lookup *smtps_lookup_new(const struct smtps_resolver_config *cfg,
				              char *why, size_t whylen)
{
    struct smtps_resolver_config copy;
    struct smtps_lookup *l;

    if (cfg == NULL || cfg->sizeof_config > sizeof(copy)) {
	if (why != NULL && whylen > 0)
	    snprintf(why, whylen, "bad resolver settings");
	return NULL;
    }
    memset(&copy, 0, sizeof(copy));
    memcpy(&copy, cfg, cfg->sizeof_config);
    if ((l = calloc(1, sizeof(*l))) == NULL) {
	if (why != NULL && whylen > 0)
	    snprintf(why, whylen, "out of memory");
	return NULL;
    }
    /* As the engine's lookups: the timeout of each attempt, all of them. */
    l->timeout_ms = (copy.timeout_ms > 0 ? copy.timeout_ms : SMTPS_DNS_TIMEOUT_MS)
	* (copy.attempts > 0 ? copy.attempts : SMTPS_DNS_ATTEMPTS);
    if ((l->dns = smtps_dns_new(&copy, NULL, l->timeout_ms, why, whylen)) == NULL) {
	free(l);
	return NULL;
    }
    return l;
}

/* lookup_status - what a lookup's answer means for the caller */

static int lookup_status(const struct smtps_dns_answer *a)
{
    switch (a->status) {
    case SMTPS_DNS_OK:
	return 1;
    case SMTPS_DNS_NODATA:
    case SMTPS_DNS_NXDOMAIN:
	return 0;
    default:
	return SMTPS_EAGAIN;
    }
}

/* smtps_lookup_txt - name's TXT records, one a line */

int     smtps_lookup_txt(struct smtps_lookup *l, const char *name, char *out,
			         size_t outlen)
{
    struct smtps_dns_answer a;
    const unsigned char *rd;
    size_t  used = 0, start, pos, n, len;
    int     rc, k, count = 0, bad;

    if (l == NULL || name == NULL || out == NULL || outlen == 0)
	return SMTPS_EINVAL;
    out[0] = 0;
    if ((rc = smtps_dns_lookup(l->dns, name, ns_t_txt, l->timeout_ms, &a)) != SMTPS_OK)
	return rc;
    if ((rc = lookup_status(&a)) <= 0) {
	ub_resolve_free(a.ub);
	return rc;
    }
    for (k = 0; a.ub->data[k] != NULL; k++) {
	/* RDATA: character-strings, each a length byte and its bytes. */
	rd = (const unsigned char *) a.ub->data[k];
	len = (size_t) a.ub->len[k];
	start = used + (count > 0);
	bad = start >= outlen;
	for (pos = 0, n = start; !bad && pos < len; pos += 1 + rd[pos]) {
	    if (pos + 1 + rd[pos] > len || n + rd[pos] >= outlen
		|| memchr(rd + pos + 1, 0, rd[pos]) != NULL
		|| memchr(rd + pos + 1, '\n', rd[pos]) != NULL) {
		bad = 1;
		break;
	    }
	    memcpy(out + n, rd + pos + 1, rd[pos]);
	    n += rd[pos];
	}
	if (bad) {
	    out[used] = 0;			/* what it wrote is not kept */
	    continue;
	}
	if (count > 0)
	    out[used] = '\n';
	used = n;
	out[used] = 0;
	count++;
    }
    ub_resolve_free(a.ub);
    return count;
}

/* lookup_first - the first address of a name's rrtype records */

static int lookup_first(struct smtps_lookup *l, const char *name, int rrtype,
			        int family, char *out, size_t outlen)
{
    struct smtps_dns_answer a;
    int     rc;

    if ((rc = smtps_dns_lookup(l->dns, name, rrtype, l->timeout_ms, &a)) != SMTPS_OK)
	return rc;
    if ((rc = lookup_status(&a)) == 1) {
	if (a.ub->len[0] != (family == AF_INET ? 4 : 16)
	    || inet_ntop(family, a.ub->data[0], out, (socklen_t) outlen) == NULL)
	    rc = 0;
    }
    ub_resolve_free(a.ub);
    return rc;
}

/* smtps_lookup_address - name's first address, IPv4 first */

int     smtps_lookup_address(struct smtps_lookup *l, const char *name, char *out,
			             size_t outlen)
{
    int     rc;

    if (l == NULL || name == NULL || out == NULL || outlen < INET6_ADDRSTRLEN)
	return SMTPS_EINVAL;
    out[0] = 0;
    if ((rc = lookup_first(l, name, ns_t_a, AF_INET, out, outlen)) != 0)
	return rc;
    return lookup_first(l, name, ns_t_aaaa, AF_INET6, out, outlen);
}

/* smtps_lookup_free - the context */

void    smtps_lookup_free(struct smtps_lookup *l)
{
    if (l == NULL)
	return;
    smtps_dns_free(l->dns);
    free(l);
}
