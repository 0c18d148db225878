/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	conn.c 3
 * SUMMARY
 *	the engine's connections: a socket and the session that talks on it
 * SYNOPSIS
 *	#include "engine_private.h"
 *
 *	int	smtps_conn_open(d, now)
 *	void	smtps_conn_update(c, now)
 *	...
 *	const char *smtps_conn_host(c)
 *	int	smtps_conn_tls_level(c)
 *	int	smtps_conn_dane(c)
 * DESCRIPTION
 *	A connection belongs to one destination (dest.c) and moves bytes
 *	between its socket and its sans-I/O session (session.c).
 *
 *	Connecting tries the destination's addresses in the order dest.c
 *	made, beginning with one of the most preferred in turn, skipping
 *	those that failed lately; each attempt has connect_timeout_ms. It
 *	binds first to a source address when the engine has some (the
 *	destination's own, or each in turn that has the address's family),
 *	and that source's HELO name is used unless the destination names
 *	one. The session's settings that depend on the address (the TLS
 *	server name: the MX host's; DANE's records; the host's slot of TLS
 *	session resumption, unless the engine was made without it) are
 *	applied once connected.
 *
 *	One message per session at a time, and one more behind its final
 *	dot: a message is submitted to a session when it is connected
 *	(before smtps_session_start(), so that a refused greeting is
 *	reported on that message in the server's own words) and then
 *	whenever the session is IDLE again; with PIPELINING, the session
 *	also takes the next one from the queue (conn_feed()) once a final
 *	dot is queued, so that its commands leave in the same write (not
 *	for LMTP, where the dot has one reply per recipient). The other
 *	messages wait in the destination's queue, where any connection can
 *	take them, as the message rate allows. After its
 *	messages_per_connection, or idle_timeout_ms in the pool, a
 *	connection is ended with QUIT.
 *
 *	A session that fails before any transaction hands its messages back
 *	(smtps_session_set_hand_back()): they go back to the head of the
 *	queue and the address counts as failed (dest.c, fallback), so that
 *	the next connection tries the next one.
 *
 *	Sockets are nonblocking (SOCK_NONBLOCK | SOCK_CLOEXEC, TCP_NODELAY)
 *	and watched level-triggered with epoll: EPOLLOUT while connecting,
 *	then EPOLLIN | EPOLLRDHUP, plus EPOLLOUT only while output is
 *	pending. Output is written as soon as a session produces it.
 *	Reads take one buffer full per wake-up, except after EPOLLRDHUP,
 *	when the socket is read to its end before anything is written: a
 *	server that sent its reply and closed is then seen as closed before
 *	we send it more, which keeps "lost before the final dot" apart from
 *	"lost after it" (RFC 1047).
 *
 *	TLS handshakes take turns: at most the engine's max_tls_handshakes
 *	run at once, and a connection whose handshake would begin beyond
 *	that (at the 220 to STARTTLS) waits, first come first served, until
 *	one ends (up, failed or closed): smtps_conn_tls_turns() gives the
 *	turns that came free at the top of every round of the loop. A
 *	handshake holds up to some 80 KiB of OpenSSL's at its peak, an
 *	established connection under 20 KiB: thousands of handshakes at
 *	once leave the heap full of holes between the connections that
 *	stay, which the allocator cannot give back (docs/tls.md, "Memory").
 *	In turns, the next handshakes reuse the same memory. A waiting
 *	connection holds nothing of OpenSSL's yet, and when its turn comes
 *	it may resume the TLS session that one before it left.
 *
 *	Every connection has one timer in the engine's heap: the connect
 *	deadline while connecting, the session's own smtps_session_deadline()
 *	while it talks, the idle deadline in the pool, and a linger deadline
 *	while a closing session flushes.
 * SEE ALSO
 *	dest.c, engine.c, session.c, epoll(7).
 *--*/

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>

#include "engine_private.h"

#define LINGER_MS 10000			/* flushing the last output */
#define CONN_IOV_MAX 256			/* pieces per sendmsg(): a session has at
					 * most 2 * SMTPS_SEG_MAX + 1, and the
					 * next call takes the rest */

static int conn_connect(struct smtps_conn *c, int64_t now);
static void conn_connected(struct smtps_conn *c, int64_t now);
static void conn_close(struct smtps_conn *c, int64_t now);
static void conn_want(struct smtps_conn *c, uint32_t events);
static struct smtps_message *conn_feed(struct smtps_session *s, void *closure);
static int conn_tls_gate(struct smtps_session *s, void *closure);
static void conn_turn_release(struct smtps_conn *c);

/* conn_why_errno - record why a connection failed: "what: strerror" */

static void conn_why_errno(struct smtps_conn *c, const char *what, int err)
{
    char    buf[128];

    if (strerror_r(err, buf, sizeof(buf)) != 0)
	snprintf(buf, sizeof(buf), "error %d", err);
    snprintf(c->why, sizeof(c->why), "%.270s%.120s", what, buf);
}

/* smtps_conn_host - the name of the host whose address c uses */

const char *smtps_conn_host(const struct smtps_conn *c)
{
    const struct smtps_dest *d = c->d;

    if (c->addr < 0)
	return d->host ? d->host : d->label;
    return d->hosts[d->addr_host[c->addr]].name;
}

/* conn_where - "host[address]:port" of the address in use */

static void conn_where(const struct smtps_conn *c, char *buf, size_t len)
{
    if (c->d->addr[c->addr < 0 ? 0 : c->addr].ss.ss_family == AF_UNIX)
	snprintf(buf, len, "%.200s", smtps_conn_host(c));
    else
	snprintf(buf, len, "%.190s[%s]:%d", smtps_conn_host(c), c->addrtext,
		 c->d->port);
}

/* smtps_conn_dest_host - the host whose address c uses */

struct smtps_dest_host *smtps_conn_dest_host(const struct smtps_conn *c)
{
    return c->addr >= 0 && c->d->nhosts > 0 ?
	&c->d->hosts[c->d->addr_host[c->addr]] : NULL;
}

/*
 * smtps_conn_dane - the session is authenticated by the host's TLSA
 * records (usable ones), or, with records none of which is usable, encrypted
 * without authentication (RFC 7672 2.2) -- unless an MTA-STS policy is in
 * force: then the certificate is verified
 */

int     smtps_conn_dane(const struct smtps_conn *c)
{
    const struct smtps_dest_host *h = smtps_conn_dest_host(c);
    int     state = h != NULL ? smtps_dest_tlsa(c->d, h) : TLSA_NONE;

    return state == TLSA_USABLE || (state == TLSA_UNUSABLE
				    && !(c->d->site_flags & SMTPS_SITE_STS));
}

/*
 * smtps_conn_tls_level - the TLS this connection uses: the destination's
 * level, made concrete for the host. DANE (RFC 7672 2.2) first: TLS
 * authenticated by its records (smtps_conn_dane()); else, under an
 * MTA-STS policy in force (RFC 8461 4.2), TLS verified against the MX
 * host's name; else opportunistic ("dane") or not at all ("dane-only":
 * -1, as for TLSA records that fail validation). "mta-sts" is the same
 * without DANE. A level given explicitly ("opportunistic", "verify",
 * ...) is the caller's choice and stays.
 */

int     smtps_conn_tls_level(const struct smtps_conn *c)
{
    const struct smtps_dest_host *h = smtps_conn_dest_host(c);
    int     mode = c->d->tls_mode;

    if (mode == SMTPS_TLS_MTA_STS)
	return c->d->site_flags & SMTPS_SITE_STS ? SMTPS_TLS_VERIFY :
	    SMTPS_TLS_OPPORTUNISTIC;
    if (mode != SMTPS_TLS_DANE && mode != SMTPS_TLS_DANE_ONLY)
	return mode;
    if (h != NULL && smtps_dest_tlsa(c->d, h) == TLSA_BOGUS)
	return -1;
    if (smtps_conn_dane(c))
	return SMTPS_TLS_VERIFY;
    if (mode == SMTPS_TLS_DANE_ONLY)
	return -1;
    return c->d->site_flags & SMTPS_SITE_STS ? SMTPS_TLS_VERIFY :
	SMTPS_TLS_OPPORTUNISTIC;
}

/* conn_dane_refusal - why DANE forbids this address, in c->why; 0: it does not */

static int conn_dane_refusal(struct smtps_conn *c, const char *where)
{
    const struct smtps_dest_host *h = smtps_conn_dest_host(c);

    if (smtps_conn_tls_level(c) >= 0)
	return 0;
    if (h != NULL && smtps_dest_tlsa(c->d, h) == TLSA_BOGUS) {
	snprintf(c->why, sizeof(c->why), "%.150s: not used: its TLSA records "
		 "(%.80s) cannot be trusted: %.100s", where,
		 h->tlsa_name ? h->tlsa_name : "?", h->tlsa_why);
	smtps_tlsrpt_refused(c, 1);
    } else {
	snprintf(c->why, sizeof(c->why), "%.150s: not used: tls=\"dane-only\" "
		 "and no DNSSEC-validated TLSA records for %.150s", where,
		 h != NULL ? h->name : "it");
	smtps_tlsrpt_refused(c, 0);
    }
    return 1;
}

/*
 * conn_in_clear - opportunistic TLS failed at this address's handshake:
 * this connection goes in clear (Postfix's "may" does the same), once
 * per address until its addresses are looked up again
 */

static int conn_in_clear(const struct smtps_conn *c)
{
    return smtps_conn_tls_level(c) == SMTPS_TLS_OPPORTUNISTIC && c->addr >= 0
	&& c->addr < 32 && (c->d->clear & (1u << c->addr));
}

/* conn_setup - the destination's settings, for the address in use */

static int conn_setup(struct smtps_conn *c)
{
    struct smtps_dest *d = c->d;
    struct smtps_engine *e = c->e;
    struct smtps_dest_host *h;
    const char *helo = d->helo;
    int     rc, id, level;

    if (helo == NULL && c->source >= 0)
	helo = e->sources[c->source].helo;
    if (helo != NULL && (rc = smtps_session_set_helo(c->s, helo)) != SMTPS_OK) {
	snprintf(c->why, sizeof(c->why), "cannot use HELO name %.200s: %s",
		 helo, smtps_strerror(rc));
	return rc;
    }
    c->in_clear = conn_in_clear(c);
    level = smtps_conn_tls_level(c);
    if (level > SMTPS_TLS_NONE && !c->in_clear) {
	/* An MX host is checked by its own name (RFC 7672, RFC 8461). */
	rc = smtps_session_set_tls(c->s, level, d->tls,
				   d->servername ? d->servername :
				   d->addr[c->addr < 0 ? 0 : c->addr].ss.ss_family
				   == AF_UNIX ? NULL : smtps_conn_host(c));
	h = smtps_conn_dest_host(c);
	if (rc == SMTPS_OK && level == SMTPS_TLS_VERIFY
	    && (d->tls_mode == SMTPS_TLS_DANE || d->tls_mode == SMTPS_TLS_DANE_ONLY)
	    && smtps_conn_dane(c) && h != NULL)
	    rc = smtps_session_set_dane(c->s, h->tlsa, h->ntlsa);
	/* The host's last session, if made under the same policy (tls.c). */
	if (rc == SMTPS_OK && e->tls_resume && h != NULL)
	    rc = smtps_session_set_tls_resume(c->s, &h->tls_resume);
	if (rc == SMTPS_OK)
	    rc = smtps_session_set_tls_gate(c->s, conn_tls_gate, c);
	if (rc != SMTPS_OK) {
	    snprintf(c->why, sizeof(c->why), "cannot set up TLS: %s",
		     smtps_strerror(rc));
	    return rc;
	}
    }
    smtps_tlsrpt_begin(c);
    if ((rc = smtps_session_set_protocol(c->s, d->protocol)) != SMTPS_OK) {
	snprintf(c->why, sizeof(c->why), "cannot use protocol %d: %s",
		 d->protocol, smtps_strerror(rc));
	return rc;
    }
    if (d->auth_user != NULL) {
	rc = smtps_session_set_auth(c->s, d->auth_user, d->auth_secret,
				    d->auth_mechs, d->auth_plain);
	if (rc != SMTPS_OK) {
	    snprintf(c->why, sizeof(c->why), "cannot set up AUTH: %s",
		     smtps_strerror(rc));
	    return rc;
	}
    }
    if (d->timeout_ms > 0)
	for (id = 0; id < SMTPS_MAX_STATES; id++)
	    if (smtps_session_set_timeout(c->s, id, d->timeout_ms) != SMTPS_OK)
		break;				/* past the machine's last id */
    return SMTPS_OK;
}

/* smtps_conn_open - a new connection to d; -1 when it failed at once */

int     smtps_conn_open(struct smtps_dest *d, int64_t now)
{
    struct smtps_engine *e = d->e;
    struct smtps_conn *c;
    size_t  i, k = 0, first;

    if (smtps_engine_reserve_timers(e, 1) != SMTPS_OK
	|| (c = calloc(1, sizeof(*c))) == NULL) {
	if (d->nconns == 0)
	    smtps_dest_fail_queue(d, UINT64_MAX, SMTPS_STATUS_TEMPFAIL, "",
				  "out of memory");
	return -1;
    }
    c->e = e;
    c->d = d;
    c->fd = -1;
    c->addr = -1;
    c->source = -1;
    smtps_timer_init(&c->timer, TIMER_CONN);
    c->s = smtps_session_new(e->machine, d->helo ? d->helo : e->helo, e->user);
    if (c->s == NULL) {
	if (d->nconns == 0)
	    smtps_dest_fail_queue(d, UINT64_MAX, SMTPS_STATUS_TEMPFAIL, "",
				  "cannot make a session: out of memory");
	free(c);
	return -1;
    }
    /* conn_flush() writes iovecs: a body goes from the message itself. */
    smtps_session_set_gather(c->s, 1);
    if (e->trace != NULL)
	(void) smtps_session_set_trace(c->s, e->trace, e->trace_closure);
    if (d->protocol == SMTPS_PROTO_SMTP)
	smtps_session_set_runahead(c->s, conn_feed, c);
    smtps_session_set_hand_back(c->s);
    /* One of the most preferred first, in turn; then the rest in order. */
    first = d->nfirst > 0 ? d->addr_rr++ % d->nfirst : 0;
    for (i = 0; i < d->nfirst; i++)
	c->order[k++] = (uint8_t) ((first + i) % d->nfirst);
    for (i = d->nfirst; i < d->naddr; i++)
	c->order[k++] = (uint8_t) i;
    c->phase = CONN_CONNECTING;
    c->next = e->conns;
    if (e->conns != NULL)
	e->conns->prev = c;
    e->conns = c;
    e->nconns++;
    d->nconns++;
    d->nconnecting++;
    c->covers = d->nadded;
    return conn_connect(c, now);
}

/* conn_source - the source to bind for an address of family; -1: none */

static int conn_source(struct smtps_conn *c, int family)
{
    struct smtps_engine *e = c->e;
    struct smtps_dest *d = c->d;
    size_t  i, k;

    if (e->nsources == 0 || family == AF_UNIX)
	return -1;
    if (d->source > 0)
	return (size_t) d->source <= e->nsources
	    && e->sources[d->source - 1].addr.ss.ss_family == family ?
	    d->source - 1 : -2;
    for (i = 0; i < e->nsources; i++) {
	k = (d->source_rr + i) % e->nsources;
	if (e->sources[k].addr.ss.ss_family == family) {
	    d->source_rr = (unsigned) (k + 1);
	    return (int) k;
	}
    }
    return -2;					/* none of that family */
}

/* conn_connect - try the next address; -1 when none is left (c closed) */

static int conn_connect(struct smtps_conn *c, int64_t now)
{
    struct smtps_engine *e = c->e;
    struct smtps_dest *d = c->d;
    struct smtps_sockaddr *a;
    struct epoll_event ev;
    char    what[SMTPS_WHY_MAX], where[300];
    int     fd, one = 1, err, i;

    while (c->tries < d->naddr) {
	i = c->order[c->tries++];
	if (d->failed & (1u << i))
	    continue;				/* it failed lately: the next */
	c->addr = i;
	a = &d->addr[i];
	c->addrtext[0] = 0;
	if (a->ss.ss_family == AF_INET6)
	    inet_ntop(AF_INET6, &((struct sockaddr_in6 *) &a->ss)->sin6_addr,
		      c->addrtext, sizeof(c->addrtext));
	else if (a->ss.ss_family == AF_INET)
	    inet_ntop(AF_INET, &((struct sockaddr_in *) &a->ss)->sin_addr,
		      c->addrtext, sizeof(c->addrtext));
	conn_where(c, where, sizeof(where));
	snprintf(what, sizeof(what), "connect to %s: ", where);
	if (conn_dane_refusal(c, where)) {
	    smtps_dest_addr_failed(d, i, 0, c->why);
	    continue;
	}
	if ((c->source = conn_source(c, a->ss.ss_family)) == -2) {
	    snprintf(c->why, sizeof(c->why), "connect to %s: no source "
		     "address of its family", where);
	    c->source = -1;
	    smtps_dest_addr_failed(d, i, 0, c->why);
	    continue;
	}
	fd = socket(a->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
	    conn_why_errno(c, what, errno);
	    smtps_dest_addr_failed(d, i, 0, c->why);
	    continue;
	}
	/* Commands are small and every one waits for a reply: no Nagle. */
	if (a->ss.ss_family != AF_UNIX)
	    (void) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (c->source >= 0
	    && bind(fd, (struct sockaddr *) &e->sources[c->source].addr.ss,
		    e->sources[c->source].addr.len) != 0) {
	    err = errno;
	    close(fd);
	    snprintf(what, sizeof(what), "bind to %.60s for %s: ",
		     e->sources[c->source].address, where);
	    conn_why_errno(c, what, err);
	    smtps_dest_addr_failed(d, i, 0, c->why);
	    continue;
	}
	if (connect(fd, (struct sockaddr *) &a->ss, a->len) != 0
	    && errno != EINPROGRESS && errno != EAGAIN) {
	    err = errno;
	    close(fd);
	    conn_why_errno(c, what, err);
	    smtps_dest_addr_failed(d, i, 0, c->why);
	    continue;
	}
	memset(&ev, 0, sizeof(ev));
	ev.events = EPOLLOUT;
	ev.data.ptr = c;
	if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, fd, &ev) != 0) {
	    err = errno;
	    close(fd);
	    conn_why_errno(c, what, err);
	    smtps_dest_addr_failed(d, i, 0, c->why);
	    continue;
	}
	c->fd = fd;
	c->events = EPOLLOUT;
	snprintf(c->why, sizeof(c->why), "%.270stimed out", what);
	smtps_timer_set(&e->timers, &c->timer,
			smtps_time_after(now, smtps_dest_connect_ms(d)));
	return 0;
    }
    conn_close(c, now);
    return -1;
}

/* smtps_conn_connect_done - the socket became writable (or failed) */

void    smtps_conn_connect_done(struct smtps_conn *c, int64_t now)
{
    char    what[SMTPS_WHY_MAX], where[300];
    socklen_t len = sizeof(int);
    int     err = 0;

    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0)
	err = errno;
    if (err == 0) {
	conn_connected(c, now);
	return;
    }
    close(c->fd);
    c->fd = -1;
    conn_where(c, where, sizeof(where));
    snprintf(what, sizeof(what), "connect to %s: ", where);
    conn_why_errno(c, what, err);
    smtps_dest_addr_failed(c->d, c->addr, 0, c->why);
    (void) conn_connect(c, now);
}

/* sockaddr_text - numeric host and port of a socket address */

static int sockaddr_text(const struct sockaddr_storage *ss, char *host,
			         size_t hostlen, int *port)
{
    if (ss->ss_family == AF_INET) {
	const struct sockaddr_in *in = (const struct sockaddr_in *) ss;

	*port = ntohs(in->sin_port);
	return inet_ntop(AF_INET, &in->sin_addr, host, (socklen_t) hostlen) ? 0 : -1;
    }
    if (ss->ss_family == AF_INET6) {
	const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *) ss;

	*port = ntohs(in6->sin6_port);
	return inet_ntop(AF_INET6, &in6->sin6_addr, host, (socklen_t) hostlen) ? 0 : -1;
    }
    return -1;
}

/* conn_record_addresses - tell the session both ends (for PROXY, XCLIENT) */

static void conn_record_addresses(struct smtps_conn *c)
{
    struct sockaddr_storage peer, local;
    socklen_t plen = sizeof(peer), llen = sizeof(local);
    char    ph[INET6_ADDRSTRLEN], lh[INET6_ADDRSTRLEN];
    int     pp, lp;

    if (getpeername(c->fd, (struct sockaddr *) &peer, &plen) == 0
	&& getsockname(c->fd, (struct sockaddr *) &local, &llen) == 0
	&& sockaddr_text(&peer, ph, sizeof(ph), &pp) == 0
	&& sockaddr_text(&local, lh, sizeof(lh), &lp) == 0)
	(void) smtps_session_set_addresses(c->s, ph, pp, lh, lp);
}

/* conn_connected - connected: set up, bind the first message, start */

static void conn_connected(struct smtps_conn *c, int64_t now)
{
    struct smtps_dest *d = c->d;
    int     rc;

    c->phase = CONN_OPEN;
    d->nconnecting--;
    c->why[0] = 0;
    smtps_timer_cancel(&c->e->timers, &c->timer);
    conn_want(c, EPOLLIN | EPOLLRDHUP);
    if ((rc = conn_setup(c)) != SMTPS_OK) {
	/* The same settings fail for every connection: fail the queue. */
	smtps_dest_fail_queue(d, UINT64_MAX, rc == SMTPS_ENOMEM ?
			      SMTPS_STATUS_TEMPFAIL : SMTPS_STATUS_PERMFAIL,
			      "", c->why);
	conn_close(c, now);
	return;
    }
    conn_record_addresses(c);
    (void) smtps_conn_submit_next(c, now);
    if (smtps_session_start(c->s, now) != SMTPS_OK)
	smtps_session_closed(c->s, "the session would not start", now);
    smtps_conn_update(c, now);
}

/* smtps_conn_submit_next - hand the session the next queued message */

int     smtps_conn_submit_next(struct smtps_conn *c, int64_t now)
{
    struct smtps_message *m;
    int     rc;

    if (c->d->qhead == NULL || !smtps_dest_may_send(c->d, now)
	|| (m = smtps_dest_pop(c->d)) == NULL)
	return 0;
    /* The result made at submit becomes the session's; ours if it refuses. */
    rc = smtps_session_submit_prepared(c->s, m, now);
    if (rc != SMTPS_OK) {
	m->qnext = NULL;
	smtps_engine_fail_message(c->e, m, SMTPS_STATUS_TEMPFAIL,
				  "cannot hand the message to a session: ",
				  smtps_strerror(rc));
	return 0;
    }
    smtps_dest_sent(c->d, now);
    c->submitted++;
    if (c->tls_event)
	smtps_tlsrpt_note(c, m);
    return 1;
}

/* conn_spent - c carried as many messages as it may */

static int conn_spent(const struct smtps_conn *c)
{
    int     max = c->d->shape.messages_per_connection;

    return max > 0 && c->submitted >= (unsigned) max;
}

/*
 * conn_yields - c should give its slot to a destination waiting for one
 * (when the engine's max_connections are all taken): any such, once c
 * has nothing more to send; otherwise the neediest (the first waiting,
 * dest.c's dest_starve()), if it holds two connections fewer than c's
 * destination or more. A full engine thus ends up with its slots shared
 * evenly among the destinations that have work, not held by whichever
 * came first, and a connection does not stop pipelining for one that
 * holds as many as its own. Enough connections already quitting for
 * those waiting: no more need to.
 */

static int conn_yields(const struct smtps_conn *c)
{
    const struct smtps_engine *e = c->e;

    if (e->nstarved <= e->nquitting)
	return 0;
    if (c->d->qhead == NULL)
	return 1;
    return c->d->nconns > e->starved->nconns + 1;
}

/*
 * conn_feed - the session may start the next message behind a final dot
 * (session.c, maybe_run_ahead()). The same limits as for an idle
 * session apply: messages_per_connection, the message rate, a QUIT under
 * way, and a destination waiting for the slot (conn_yields()). The
 * message's result, made at submit, becomes the session's.
 */

static struct smtps_message *conn_feed(struct smtps_session *s, void *closure)
{
    struct smtps_conn *c = closure;
    struct smtps_message *m;
    int64_t now = smtps_clock_ms();

    SMTPS_UNUSED(s);
    if (c->quitting || conn_spent(c) || conn_yields(c)
	|| c->d->qhead == NULL || !smtps_dest_may_send(c->d, now)
	|| (m = smtps_dest_pop(c->d)) == NULL)
	return NULL;
    smtps_dest_sent(c->d, now);
    c->submitted++;
    if (c->tls_event)
	smtps_tlsrpt_note(c, m);
    return m;
}

/*
 * conn_tls_gate - the session's handshake would begin: now, if a turn is
 * free and nobody waits for one (1), else in its turn (0)
 */

static int conn_tls_gate(struct smtps_session *s, void *closure)
{
    struct smtps_conn *c = closure;
    struct smtps_engine *e = c->e;

    SMTPS_UNUSED(s);
    if (c->tls_turn != TURN_NONE)		/* one handshake per session */
	return c->tls_turn == TURN_HELD;
    if (e->turns == NULL && e->ntls_hs < e->max_tls_hs) {
	c->tls_turn = TURN_HELD;
	e->ntls_hs++;
	return 1;
    }
    c->tls_turn = TURN_WAITING;
    c->turn_next = NULL;
    c->turn_prev = e->turns_tail;
    if (e->turns_tail != NULL)
	e->turns_tail->turn_next = c;
    else
	e->turns = c;
    e->turns_tail = c;
    return 0;
}

/* conn_turn_release - c needs its turn no more, held or waited for */

static void conn_turn_release(struct smtps_conn *c)
{
    struct smtps_engine *e = c->e;

    if (c->tls_turn == TURN_HELD) {
	e->ntls_hs--;
    } else if (c->tls_turn == TURN_WAITING) {
	if (c->turn_prev != NULL)
	    c->turn_prev->turn_next = c->turn_next;
	else
	    e->turns = c->turn_next;
	if (c->turn_next != NULL)
	    c->turn_next->turn_prev = c->turn_prev;
	else
	    e->turns_tail = c->turn_prev;
	c->turn_prev = c->turn_next = NULL;
    }
    c->tls_turn = TURN_NONE;
}

/*
 * smtps_conn_tls_turns - turns that came free go to those waiting, first
 * come first served; each begins its handshake now. Not from inside a
 * connection's update (a failure there would close connections under
 * it): the engine's loop calls this at the top of every round.
 */

void    smtps_conn_tls_turns(struct smtps_engine *e, int64_t now)
{
    struct smtps_conn *c;

    while ((c = e->turns) != NULL && e->ntls_hs < e->max_tls_hs) {
	conn_turn_release(c);			/* off the list */
	if (!smtps_session_tls_in_handshake(c->s))
	    continue;				/* it ended while it waited */
	c->tls_turn = TURN_HELD;
	e->ntls_hs++;
	(void) smtps_session_tls_proceed(c->s, now);
	smtps_conn_update(c, now);		/* the ClientHello goes out */
    }
}

/* conn_route - say on a result where its recipients went */

static void conn_route(struct smtps_conn *c, struct smtps_result *r)
{
    size_t  i;
    int     k;

    if (r->nroute > 0 || (k = smtps_result_add_route(r, smtps_conn_host(c),
						     c->addrtext)) < 0)
	return;
    for (i = 0; i < r->nrcpt; i++)
	r->rcpt[i].route = k;
}

/* conn_collect - move the session's results to the engine */

static void conn_collect(struct smtps_conn *c)
{
    struct smtps_result *r;

    while ((r = smtps_session_next_result(c->s)) != NULL) {
	/*
	 * A transaction began: greeting and EHLO worked, whatever became
	 * of that message. Its failure is its own, not the destination's.
	 */
	if (!c->usable && smtps_session_transactions(c->s) > 0) {
	    c->usable = 1;
	    smtps_dest_connected(c->d);
	}
	/* 421: the server is going away, and says so; others should wait. */
	if (r->reply.code == 421)
	    smtps_dest_backoff(c->d, smtps_clock_ms(), r->reply.text);
	conn_route(c, r);
	if (!smtps_route_result(c->e, r))
	    smtps_engine_push_result(c->e, r);
    }
    /* A state asked to stop (Ctrl-C): the run returns at once. */
    if (smtps_session_interrupted(c->s))
	c->e->interrupted = 1;
}

/* conn_want - register the epoll interest, only when it changes */

static void conn_want(struct smtps_conn *c, uint32_t events)
{
    struct epoll_event ev;

    if (c->events == events || c->fd < 0)
	return;
    memset(&ev, 0, sizeof(ev));
    ev.events = events;
    ev.data.ptr = c;
    if (epoll_ctl(c->e->epfd, EPOLL_CTL_MOD, c->fd, &ev) == 0)
	c->events = events;
}

/* conn_idle_add - into the pool, most recently used first */

static void conn_idle_add(struct smtps_conn *c, int64_t now)
{
    struct smtps_engine *e = c->e;
    struct smtps_dest *d = c->d;

    if (c->in_idle)
	return;
    c->in_idle = 1;
    c->idle_prev = NULL;
    c->idle_next = d->idle;
    if (d->idle != NULL)
	d->idle->idle_prev = c;
    d->idle = c;
    c->lru_next = NULL;
    c->lru_prev = e->lru_tail;
    if (e->lru_tail != NULL)
	e->lru_tail->lru_next = c;
    else
	e->lru = c;
    e->lru_tail = c;
    smtps_timer_set(&e->timers, &c->timer, smtps_time_after(now, e->idle_ms));
}

/* smtps_conn_idle_remove - out of the pool */

void    smtps_conn_idle_remove(struct smtps_conn *c)
{
    struct smtps_engine *e = c->e;
    struct smtps_dest *d = c->d;

    if (!c->in_idle)
	return;
    c->in_idle = 0;
    if (c->idle_prev != NULL)
	c->idle_prev->idle_next = c->idle_next;
    else
	d->idle = c->idle_next;
    if (c->idle_next != NULL)
	c->idle_next->idle_prev = c->idle_prev;
    if (c->lru_prev != NULL)
	c->lru_prev->lru_next = c->lru_next;
    else
	e->lru = c->lru_next;
    if (c->lru_next != NULL)
	c->lru_next->lru_prev = c->lru_prev;
    else
	e->lru_tail = c->lru_prev;
    c->idle_prev = c->idle_next = c->lru_prev = c->lru_next = NULL;
    smtps_timer_cancel(&e->timers, &c->timer);
}

/* smtps_conn_quit - end the connection politely once the session may */

void    smtps_conn_quit(struct smtps_conn *c, int64_t now)
{
    smtps_conn_idle_remove(c);
    if (c->quitting)
	return;
    c->quitting = 1;
    c->e->nquitting++;
    (void) smtps_session_quit(c->s, now);
}

/*
 * conn_flush - write what the session has; -1 when the socket failed
 *
 * One sendmsg() takes the commands and the body's pieces together: the
 * runs of a body that go unchanged are written from the message, and the
 * session's buffer holds only what the encoder added between them (a
 * stuffed dot, a CR LF, the final dot). A short write is taken as far as
 * it went; the next call starts exactly there.
 */

static int conn_flush(struct smtps_conn *c, int64_t now)
{
    struct iovec iov[CONN_IOV_MAX];
    struct msghdr mh;
    int     n;
    ssize_t w;
    char    buf[128];

    for (;;) {
	if (smtps_session_status(c->s) == SMTPS_SESS_CLOSED)
	    return -1;
	if ((n = smtps_session_output_iov(c->s, iov, CONN_IOV_MAX)) == 0)
	    return 0;
	memset(&mh, 0, sizeof(mh));
	mh.msg_iov = iov;
	mh.msg_iovlen = (size_t) n;
	w = sendmsg(c->fd, &mh, MSG_NOSIGNAL);
	if (w > 0) {
	    smtps_session_consume(c->s, (size_t) w, now);
	    continue;
	}
	if (w < 0 && errno == EINTR)
	    continue;
	if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
	    return 0;
	if (w == 0 || strerror_r(errno, buf, sizeof(buf)) != 0)
	    snprintf(buf, sizeof(buf), "send failed");
	smtps_session_closed(c->s, buf, now);
	return -1;
    }
}

/* smtps_conn_read - the socket is readable (or hung up) */

void    smtps_conn_read(struct smtps_conn *c, uint32_t events, int64_t now)
{
    struct smtps_engine *e = c->e;
    ssize_t n;
    char    buf[128];

    for (;;) {
	n = recv(c->fd, e->rbuf, sizeof(e->rbuf), 0);
	if (n > 0) {
	    (void) smtps_session_feed(c->s, e->rbuf, (size_t) n, now);
	    /*
	     * Level-triggered: what is left is reported again, so one read
	     * is enough - unless the peer shut down, when the end must be
	     * seen before anything more is written.
	     */
	    if ((size_t) n < sizeof(e->rbuf)
		&& !(events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)))
		return;
	    continue;
	}
	if (n == 0) {
	    smtps_session_closed(c->s, "the server closed the connection", now);
	    return;
	}
	if (errno == EINTR)
	    continue;
	if (errno == EAGAIN || errno == EWOULDBLOCK)
	    return;
	if (strerror_r(errno, buf, sizeof(buf)) != 0)
	    snprintf(buf, sizeof(buf), "recv failed");
	smtps_session_closed(c->s, buf, now);
	return;
    }
}

/* smtps_conn_update - after any change: write, collect, settle the phase */

void    smtps_conn_update(struct smtps_conn *c, int64_t now)
{
    struct smtps_engine *e = c->e;
    struct smtps_dest *d = c->d;
    const char *data;
    int     spent, yields, out;

    if (c->tls_event)
	smtps_tlsrpt_conn(c, 0);		/* as soon as TLS is settled */
    /* The handshake is over (or will not run): its turn is someone else's. */
    if (c->tls_turn != TURN_NONE && !smtps_session_tls_in_handshake(c->s))
	conn_turn_release(c);
    for (;;) {
	(void) conn_flush(c, now);
	conn_collect(c);
	out = smtps_session_output(c->s, &data) > 0;
	switch (smtps_session_status(c->s)) {
	case SMTPS_SESS_CLOSED:
	    conn_close(c, now);
	    return;
	case SMTPS_SESS_CLOSING:
	    if (!out) {
		smtps_session_closed(c->s, "closed", now);
		conn_collect(c);
		conn_close(c, now);
		return;
	    }
	    smtps_conn_idle_remove(c);
	    if (!c->lingering) {
		c->lingering = 1;
		smtps_timer_set(&e->timers, &c->timer,
				smtps_time_after(now, LINGER_MS));
	    }
	    conn_want(c, EPOLLIN | EPOLLRDHUP | EPOLLOUT);
	    return;
	case SMTPS_SESS_IDLE:
	    if (!c->usable) {
		c->usable = 1;
		smtps_dest_connected(d);
	    }
	    spent = conn_spent(c);
	    yields = !c->quitting && conn_yields(c);
	    if (!spent && !yields && !c->quitting && d->qhead != NULL && !out) {
		smtps_conn_idle_remove(c);
		if (smtps_conn_submit_next(c, now))
		    continue;
	    }
	    /* A slot some other destination waits for is worth more. */
	    if (!c->quitting && (spent || yields)) {
		smtps_conn_quit(c, now);
		if (d->qhead != NULL)
		    smtps_dest_dirty(d);	/* another connection must take them */
		continue;
	    }
	    conn_want(c, EPOLLIN | EPOLLRDHUP | (out ? EPOLLOUT : 0));
	    if (!c->quitting)
		conn_idle_add(c, now);
	    return;
	default:				/* ACTIVE */
	    smtps_conn_idle_remove(c);
	    conn_want(c, EPOLLIN | EPOLLRDHUP | (out ? EPOLLOUT : 0));
	    smtps_timer_set(&e->timers, &c->timer, smtps_session_deadline(c->s));
	    return;
	}
    }
}

/* smtps_conn_timer - c's deadline passed */

void    smtps_conn_timer(struct smtps_conn *c, int64_t now)
{
    if (c->phase == CONN_CONNECTING) {
	/* c->why already says "connect to ...: timed out". */
	close(c->fd);
	c->fd = -1;
	smtps_dest_addr_failed(c->d, c->addr, 0, c->why);
	(void) conn_connect(c, now);
	return;
    }
    if (c->in_idle) {				/* idle_timeout_ms */
	smtps_conn_quit(c, now);
	smtps_conn_update(c, now);
	return;
    }
    if (c->lingering) {
	smtps_session_closed(c->s, "timed out sending the last commands", now);
	conn_collect(c);
	conn_close(c, now);
	return;
    }
    (void) smtps_session_tick(c->s, now);
    smtps_conn_update(c, now);
}

/*
 * conn_take_back - the session failed before any transaction: its
 * messages go back to the head of the queue, in their order, and the
 * address counts as failed (for good when the server refused so); how
 * many went back
 */

static size_t conn_take_back(struct smtps_conn *c)
{
    struct smtps_message *m, *list = NULL, *next;
    char    where[300];
    int     status = 0, perm = 0;
    size_t  n = 0;

    while ((m = smtps_session_take_back(c->s, &status)) != NULL) {
	m->qnext = list;			/* reversed, */
	list = m;
	m->handed_back = 1;			/* it was attempted */
	perm = status == SMTPS_STATUS_PERMFAIL;
	n++;
    }
    for (m = list; m != NULL; m = next) {	/* so pushed back in order */
	next = m->qnext;
	smtps_dest_requeue(c->d, m);
    }
    c->refused_perm |= perm;
    /* Opportunistic TLS that broke: the same address again, in clear. */
    if (c->addr >= 0 && c->addr < 32 && !c->usable && !c->in_clear
	&& smtps_conn_tls_level(c) == SMTPS_TLS_OPPORTUNISTIC
	&& smtps_tls_handshake_failed(c->s)) {
	c->d->clear |= 1u << c->addr;
	return n;
    }
    if (c->addr >= 0 && !c->usable) {
	conn_where(c, where, sizeof(where));
	snprintf(c->why, sizeof(c->why), "%.200s: %.190s", where,
		 smtps_session_reason(c->s));
	smtps_dest_addr_failed(c->d, c->addr, c->refused_perm, c->why);
    }
    return n;
}

/* conn_close - the connection is over: settle, account, bury */

static void conn_close(struct smtps_conn *c, int64_t now)
{
    struct smtps_engine *e = c->e;
    struct smtps_dest *d = c->d;
    int     was_connecting = c->phase == CONN_CONNECTING;
    uint64_t covered;
    struct smtps_message *m;
    int     status;
    const char *why;

    if (c->phase == CONN_DEAD)
	return;
    smtps_conn_idle_remove(c);
    smtps_timer_cancel(&e->timers, &c->timer);
    if (c->fd >= 0) {
	close(c->fd);				/* leaves the epoll set too */
	c->fd = -1;
    }
    conn_turn_release(c);
    if (c->s != NULL) {
	if (smtps_session_status(c->s) != SMTPS_SESS_CLOSED)
	    smtps_session_closed(c->s, c->why[0] ? c->why : "closed", now);
	smtps_tlsrpt_conn(c, 1);
	conn_collect(c);
	if (!was_connecting)
	    (void) conn_take_back(c);
	smtps_session_free(c->s);
	c->s = NULL;
    }
    if (c->quitting)
	e->nquitting--;
    e->nconns--;
    d->nconns--;
    if (was_connecting)
	d->nconnecting--;

    /*
     * A connection that never became usable says something about the
     * address it used: the next connection tries the next one. When no
     * address is left and no other connection works, the messages that
     * were waiting when it was opened fail, with what every address did
     * (those queued since get an attempt of their own, after the
     * back-off).
     */
    if (!c->usable && (smtps_dest_all_failed(d) || d->naddr == 0)) {
	smtps_dest_backoff(d, now, d->tried[0] ? d->tried : c->why);
	if (d->nconns == 0) {
	    /*
	     * Those a session held failed where it said: this connection's,
	     * and those other connections handed back before they ended
	     * (requeued behind them, so counting this one's is not enough:
	     * each message says whether it was attempted). The others
	     * queued were never in a session, as when connecting failed.
	     */
	    covered = c->covers > d->ntaken ? c->covers - d->ntaken : 0;
	    status = d->failed_perm && d->tried[0] ? SMTPS_STATUS_PERMFAIL :
		SMTPS_STATUS_TEMPFAIL;
	    why = d->tried[0] ? d->tried : c->why[0] ? c->why :
		"connection failed";
	    while (covered-- > 0 && (m = smtps_dest_pop(d)) != NULL)
		smtps_engine_fail_message(e, m, status, was_connecting
					  || m->handed_back ? "" :
					  "not attempted: ", why);
	    d->failed = 0;
	    d->failed_perm = 1;
	    d->tried[0] = 0;
	}
    }
    c->phase = CONN_DEAD;
    if (c->prev != NULL)
	c->prev->next = c->next;
    else
	e->conns = c->next;
    if (c->next != NULL)
	c->next->prev = c->prev;
    /* Freed after this round: an event for it may still be in hand. */
    c->prev = NULL;
    c->next = e->dead;
    e->dead = c;
    smtps_dest_dirty(d);
    smtps_engine_wake_starved(e);
}

/* smtps_conn_teardown - drop a connection at engine end, QUIT if cheap */

void    smtps_conn_teardown(struct smtps_conn *c)
{
    struct smtps_result *r;
    const char *data;
    size_t  n;

    if (c->s != NULL && c->fd >= 0 && c->phase == CONN_OPEN
	&& smtps_session_status(c->s) == SMTPS_SESS_IDLE
	&& smtps_session_quit(c->s, smtps_clock_ms()) == SMTPS_OK
	&& (n = smtps_session_output(c->s, &data)) > 0)
	(void) send(c->fd, data, n, MSG_NOSIGNAL);	/* one try, no wait */
    if (c->fd >= 0)
	close(c->fd);
    if (c->s != NULL) {
	smtps_session_closed(c->s, "the engine was freed", smtps_clock_ms());
	while ((r = smtps_session_next_result(c->s)) != NULL)
	    smtps_result_free(r);
	smtps_session_free(c->s);		/* and the messages it held */
    }
    /* Its timer must leave the heap: later cancels move heap entries. */
    smtps_timer_cancel(&c->e->timers, &c->timer);
    smtps_tlsrpt_end(c);
    conn_turn_release(c);
    free(c);
}
