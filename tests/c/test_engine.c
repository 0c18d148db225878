/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	test_engine 1
 * SUMMARY
 *	table-driven tests of the engine (csrc/engine.c, timers.c, resolve.c)
 * SYNOPSIS
 *	test_engine
 * DESCRIPTION
 *	Runs every test of the table in main() and prints "RUN label", then
 *	"PASS label" or "FAIL label: why", and a final "N passed, N failed"
 *	line. Under ASan and UBSan, every test must also leave nothing
 *	allocated behind.
 *
 *	The peers are tiny SMTP servers of this file: each is one thread
 *	running a poll() loop over its listening socket and connections on
 *	127.0.0.1 (or ::1), with a behaviour: accept everything (offering
 *	PIPELINING), answer 421 at the greeting, stall after the greeting,
 *	or hang up after taking the final dot. They count connections,
 *	connections open at once, messages taken, recipients and QUITs.
 *
 *	Covered: many messages over a bounded pool with
 *	messages_per_connection; connect refused and an unresolvable name
 *	(tempfail, stage "not connected"); 421 greetings; a hang-up after
 *	the final dot (unknown); IPv6 literals; freeing an engine with work
 *	in flight; the argument checks; smtps_engine_submit_plain()
 *	(batch.c): what it refuses, and every recipient of what it takes
 *	delivered; the deadline heap against a plain
 *	array; the service calls (wakeup.c, cancel.c): a wake-up from
 *	another thread ending a wait at once, smtps_engine_serve(e, 0)
 *	driven by poll() on smtps_engine_fileno() until idle connections
 *	quit, and cancelling queued messages by tag.
 *
 *	Build it with every C source and run it under ASan and UBSan:
 *
 *	gcc -std=c11 -D_POSIX_C_SOURCE=200809L -Wall -Wextra -Werror -O1 -g
 *	    -fsanitize=address,undefined -fno-sanitize-recover=all
 *	    -Iinclude -Icsrc tests/c/test_engine.c csrc/[a-z]*.c
 *	    -lssl -lcrypto -lpthread -o /tmp/test_engine && /tmp/test_engine
 * DIAGNOSTICS
 *	The exit status is 1 when any test fails, else 0.
 * SEE ALSO
 *	csrc/engine.c, the code under test; tests/test_engine.py, the same
 *	against real servers.
 *--*/

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "smtpstate.h"
#include "engine_private.h"

#define WHY_MAX 512
#define REASON_MAX 512
#define MAX_SCONN 64			/* connections one server takes at once */
#define SBUF 8192

/* Fail the current test with the condition's text, then clean up. */
#define CHECK(cond) do { \
	if (!(cond)) { \
	    (void) fail("line %d: %s", __LINE__, #cond); \
	    goto out; \
	} \
    } while (0)

enum behaviour {
    B_ACCEPT,				/* everything 250, PIPELINING offered */
    B_421,				/* 421 greeting, then close */
    B_STALL,				/* greeting, then silence */
    B_DROP_DOT				/* close on the final dot, no reply */
};

struct sconn {
    int     fd;				/* -1: free slot */
    char    buf[SBUF];
    size_t  len;
    int     in_data;
};

struct server {
    int     lfd;
    int     port;
    int     behaviour;
    int     stop[2];			/* a pipe: written to stop */
    pthread_t tid;
    struct sconn conn[MAX_SCONN];
    int     connections, active, max_active, messages, quits, rcpts;
};

static char why[WHY_MAX];

static int fail(const char *fmt,...) __attribute__((format(printf, 1, 2)));
static int server_start(struct server *s, int behaviour, const char *addr);
static void server_stop(struct server *s);
static void *server_run(void *arg);
static void server_accept(struct server *s);
static void server_read(struct server *s, struct sconn *c);
static int server_line(struct server *s, struct sconn *c, const char *line);
static void server_close(struct server *s, struct sconn *c);
static void say(struct sconn *c, const char *text);
static struct smtps_message *message(int i);
static void destination(struct smtps_destination *d, const char *host,
			        int port, int64_t timeout_ms);
static int drain(struct smtps_engine *e, int *count, int *status_counts,
		         int64_t limit_ms, char *first_reason, size_t cap,
		         int *first_stage);
static int closed_port(void);

/* fail - record why the current test failed; returns 0 */

static int fail(const char *fmt,...)
{
    va_list ap;

    if (why[0] != 0)			/* keep the first reason */
	return (0);
    va_start(ap, fmt);
    vsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    return (0);
}

/*
 * say - write a reply line (the peer is fast and local: one write). A
 * failed write is left for the next recv() to notice as EOF or an error:
 * touching the buffer here would pull it from under server_read().
 */

static void say(struct sconn *c, const char *text)
{
    (void) send(c->fd, text, strlen(text), MSG_NOSIGNAL);
}

/* server_start - listen on addr (127.0.0.1 or ::1) and run a thread */

static int server_start(struct server *s, int behaviour, const char *addr)
{
    struct sockaddr_storage ss;
    socklen_t len;
    int     i, one = 1;

    memset(s, 0, sizeof(*s));
    s->behaviour = behaviour;
    for (i = 0; i < MAX_SCONN; i++)
	s->conn[i].fd = -1;
    memset(&ss, 0, sizeof(ss));
    if (strchr(addr, ':') != NULL) {
	struct sockaddr_in6 *a6 = (struct sockaddr_in6 *) &ss;

	a6->sin6_family = AF_INET6;
	inet_pton(AF_INET6, addr, &a6->sin6_addr);
	len = sizeof(*a6);
    } else {
	struct sockaddr_in *a4 = (struct sockaddr_in *) &ss;

	a4->sin_family = AF_INET;
	inet_pton(AF_INET, addr, &a4->sin_addr);
	len = sizeof(*a4);
    }
    if ((s->lfd = socket(ss.ss_family, SOCK_STREAM, 0)) < 0)
	return fail("socket: %s", strerror(errno));
    (void) setsockopt(s->lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(s->lfd, (struct sockaddr *) &ss, len) != 0
	|| listen(s->lfd, 256) != 0
	|| getsockname(s->lfd, (struct sockaddr *) &ss, &len) != 0) {
	close(s->lfd);
	return fail("listen on %s: %s", addr, strerror(errno));
    }
    s->port = ntohs(ss.ss_family == AF_INET6 ?
		    ((struct sockaddr_in6 *) &ss)->sin6_port :
		    ((struct sockaddr_in *) &ss)->sin_port);
    if (pipe(s->stop) != 0) {
	close(s->lfd);
	return fail("pipe: %s", strerror(errno));
    }
    if (pthread_create(&s->tid, NULL, server_run, s) != 0) {
	close(s->lfd);
	close(s->stop[0]);
	close(s->stop[1]);
	return fail("pthread_create failed");
    }
    return 1;
}

/* server_stop - stop the thread; close everything */

static void server_stop(struct server *s)
{
    int     i;

    if (write(s->stop[1], "x", 1) != 1)
	return;
    pthread_join(s->tid, NULL);
    for (i = 0; i < MAX_SCONN; i++)
	if (s->conn[i].fd >= 0)
	    server_close(s, &s->conn[i]);
    close(s->lfd);
    close(s->stop[0]);
    close(s->stop[1]);
}

/* server_close - one connection is over */

static void server_close(struct server *s, struct sconn *c)
{
    close(c->fd);
    c->fd = -1;
    c->len = 0;
    c->in_data = 0;
    s->active--;
}

/* server_accept - a new connection: greet it */

static void server_accept(struct server *s)
{
    struct sconn *c = NULL;
    int     fd, i;

    if ((fd = accept(s->lfd, NULL, NULL)) < 0)
	return;
    for (i = 0; i < MAX_SCONN; i++)
	if (s->conn[i].fd < 0) {
	    c = &s->conn[i];
	    break;
	}
    if (c == NULL) {
	close(fd);
	return;
    }
    c->fd = fd;
    c->len = 0;
    c->in_data = 0;
    s->connections++;
    if (++s->active > s->max_active)
	s->max_active = s->active;
    if (s->behaviour == B_421) {
	say(c, "421 4.3.2 test server busy\r\n");
	server_close(s, c);
	return;
    }
    say(c, "220 test.example ESMTP\r\n");
}

/* server_line - act on one line; 0 when the connection must end */

static int server_line(struct server *s, struct sconn *c, const char *line)
{
    if (c->in_data) {
	if (strcmp(line, ".") != 0)
	    return 1;
	c->in_data = 0;
	s->messages++;
	if (s->behaviour == B_DROP_DOT)
	    return 0;
	say(c, "250 2.0.0 queued\r\n");
	return 1;
    }
    if (s->behaviour == B_STALL)
	return 1;
    if (strncmp(line, "EHLO", 4) == 0)
	say(c, "250-test.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n");
    else if (strncmp(line, "DATA", 4) == 0) {
	c->in_data = 1;
	say(c, "354 go ahead\r\n");
    } else if (strncmp(line, "RCPT", 4) == 0) {
	s->rcpts++;
	say(c, "250 2.1.5 ok\r\n");
    } else if (strncmp(line, "QUIT", 4) == 0) {
	s->quits++;
	say(c, "221 2.0.0 bye\r\n");
	return 0;
    } else
	say(c, "250 2.0.0 ok\r\n");
    return 1;
}

/* server_read - take bytes; act on every complete line */

static void server_read(struct server *s, struct sconn *c)
{
    ssize_t n;
    char   *nl, *start;

    n = recv(c->fd, c->buf + c->len, sizeof(c->buf) - 1 - c->len, 0);
    if (n <= 0) {
	server_close(s, c);
	return;
    }
    c->len += (size_t) n;
    c->buf[c->len] = 0;
    start = c->buf;
    while ((nl = strstr(start, "\r\n")) != NULL) {
	*nl = 0;
	if (!server_line(s, c, start)) {
	    server_close(s, c);
	    return;
	}
	start = nl + 2;
    }
    c->len -= (size_t) (start - c->buf);
    memmove(c->buf, start, c->len);
    if (c->len == sizeof(c->buf) - 1)	/* a line too long: drop it */
	c->len = 0;
}

/* server_run - the server's poll() loop */

static void *server_run(void *arg)
{
    struct server *s = arg;
    struct pollfd pfd[MAX_SCONN + 2];
    struct sconn *who[MAX_SCONN + 2];
    int     i, n;

    for (;;) {
	n = 0;
	pfd[n].fd = s->stop[0];
	pfd[n++].events = POLLIN;
	pfd[n].fd = s->lfd;
	pfd[n++].events = POLLIN;
	for (i = 0; i < MAX_SCONN; i++)
	    if (s->conn[i].fd >= 0) {
		who[n] = &s->conn[i];
		pfd[n].fd = s->conn[i].fd;
		pfd[n++].events = POLLIN;
	    }
	if (poll(pfd, (nfds_t) n, -1) < 0) {
	    if (errno == EINTR)
		continue;
	    return NULL;
	}
	if (pfd[0].revents)
	    return NULL;
	if (pfd[1].revents & POLLIN)
	    server_accept(s);
	for (i = 2; i < n; i++)
	    if (pfd[i].revents && who[i]->fd == pfd[i].fd)
		server_read(s, who[i]);
    }
}

/* closed_port - a loopback port nobody listens on */

static int closed_port(void)
{
    struct sockaddr_in a;
    socklen_t len = sizeof(a);
    int     fd = socket(AF_INET, SOCK_STREAM, 0), port = 1;

    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd >= 0 && bind(fd, (struct sockaddr *) &a, sizeof(a)) == 0
	&& getsockname(fd, (struct sockaddr *) &a, &len) == 0)
	port = ntohs(a.sin_port);
    if (fd >= 0)
	close(fd);
    return port;
}

/* message - a small message numbered i */

static struct smtps_message *message(int i)
{
    struct smtps_message *m = smtps_message_new();
    char    body[128], rcpt[64];
    int     n;

    if (m == NULL)
	return NULL;
    n = snprintf(body, sizeof(body), "Subject: %d\r\n\r\n.line %d\r\n", i, i);
    snprintf(rcpt, sizeof(rcpt), "r%d@example.test", i);
    if (smtps_message_set_sender(m, "s@client.test", 13) != SMTPS_OK
	|| smtps_message_add_recipient(m, rcpt, strlen(rcpt), 0, NULL, 0) != SMTPS_OK
	|| smtps_message_set_body(m, body, (size_t) n) != SMTPS_OK) {
	smtps_message_free(m);
	return NULL;
    }
    return m;
}

/* destination - host:port with a reply deadline */

static void destination(struct smtps_destination *d, const char *host,
			        int port, int64_t timeout_ms)
{
    memset(d, 0, sizeof(*d));
    d->sizeof_destination = sizeof(*d);
    d->host = host;
    d->port = port;
    d->timeout_ms = timeout_ms;
}

/*
 * drain - run until nothing is pending (or limit_ms), counting results by
 * status; the first result's reason and stage are copied out. Returns 0
 * when it took too long or a tag came back twice.
 */
static int drain(struct smtps_engine *e, int *count, int *status_counts,
		         int64_t limit_ms, char *first_reason, size_t cap,
		         int *first_stage)
{
    struct smtps_result *r;
    struct timespec t0, t1;
    static unsigned char seen[4096];
    int     rc;

    memset(seen, 0, sizeof(seen));
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (smtps_engine_pending(e) > 0) {
	if ((rc = smtps_engine_run(e, 200)) < 0)
	    return fail("smtps_engine_run: %s", smtps_strerror(rc));
	while ((r = smtps_engine_next_result(e)) != NULL) {
	    if (r->tag >= sizeof(seen) || seen[r->tag]++) {
		smtps_result_free(r);
		return fail("tag %llu came back twice", (unsigned long long) r->tag);
	    }
	    if (*count == 0 && first_reason != NULL) {
		snprintf(first_reason, cap, "%s", r->reason);
		*first_stage = r->stage;
	    }
	    (*count)++;
	    if (r->status >= 1 && r->status <= 4)
		status_counts[r->status]++;
	    smtps_result_free(r);
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	if ((t1.tv_sec - t0.tv_sec) * 1000 > limit_ms)
	    return fail("still %zu pending after %lld ms", smtps_engine_pending(e),
			(long long) limit_ms);
    }
    return 1;
}

/* test_pool - 200 messages, at most 8 connections, 20 messages each */

static int test_pool(void)
{
    struct smtps_engine_config cfg;
    struct smtps_destination d;
    struct smtps_engine *e = NULL;
    struct smtps_message *m;
    struct server s;
    int     i, count = 0, st[5] = {0}, ok = 0, started;

    if (!(started = server_start(&s, B_ACCEPT, "127.0.0.1")))
	return 0;
    memset(&cfg, 0, sizeof(cfg));
    cfg.sizeof_config = sizeof(cfg);
    cfg.max_per_destination = 8;
    cfg.messages_per_connection = 20;
    cfg.helo = "client.test";
    CHECK((e = smtps_engine_new(NULL, &cfg, NULL)) != NULL);
    destination(&d, "127.0.0.1", s.port, 5000);
    for (i = 1; i <= 200; i++) {
	CHECK((m = message(i)) != NULL);
	if (smtps_engine_submit(e, m, &d, (uint64_t) i) != SMTPS_OK) {
	    smtps_message_free(m);
	    CHECK(!"submit failed");
	}
    }
    CHECK(smtps_engine_pending(e) == 200);
    CHECK(drain(e, &count, st, 20000, NULL, 0, NULL));
    CHECK(count == 200 && st[SMTPS_STATUS_DELIVERED] == 200);
    CHECK(smtps_engine_connections(e) <= 8);
    smtps_engine_free(e);
    e = NULL;
    server_stop(&s);
    started = 0;
    CHECK(s.messages == 200);
    CHECK(s.max_active <= 8 && s.max_active >= 2);
    CHECK(s.connections >= 10);		/* 200 / 20 */
    ok = 1;
out:
    smtps_engine_free(e);
    if (started)
	server_stop(&s);
    return ok;
}

/* test_refused - no listener: tempfail, not connected */

static int test_refused(void)
{
    struct smtps_destination d;
    struct smtps_engine *e;
    struct smtps_message *m;
    char    reason[REASON_MAX] = "";
    int     count = 0, st[5] = {0}, stage = -1, ok = 0, i;

    if ((e = smtps_engine_new(NULL, NULL, NULL)) == NULL)
	return fail("smtps_engine_new");
    destination(&d, "127.0.0.1", closed_port(), 2000);
    for (i = 1; i <= 3; i++) {
	CHECK((m = message(i)) != NULL);
	CHECK(smtps_engine_submit(e, m, &d, (uint64_t) i) == SMTPS_OK);
    }
    CHECK(drain(e, &count, st, 10000, reason, sizeof(reason), &stage));
    CHECK(count == 3 && st[SMTPS_STATUS_TEMPFAIL] == 3);
    CHECK(stage == SMTPS_STAGE_NOT_CONNECTED);
    CHECK(strstr(reason, "Connection refused") != NULL);
    CHECK(smtps_engine_connections(e) == 0);
    ok = 1;
out:
    if (!ok && reason[0])
	fail("reason: %s", reason);
    smtps_engine_free(e);
    return ok;
}

/* test_unresolvable - a .invalid name: tempfail, not connected */

static int test_unresolvable(void)
{
    struct smtps_engine_config cfg;
    struct smtps_destination d;
    struct smtps_engine *e;
    struct smtps_message *m;
    char    reason[REASON_MAX] = "";
    int     count = 0, st[5] = {0}, stage = -1, ok = 0;

    memset(&cfg, 0, sizeof(cfg));
    cfg.sizeof_config = sizeof(cfg);
    cfg.connect_timeout_ms = 3000;	/* also the DNS deadline */
    if ((e = smtps_engine_new(NULL, &cfg, NULL)) == NULL)
	return fail("smtps_engine_new");
    destination(&d, "no-such-host.smtpstate.invalid", 25, 0);
    CHECK((m = message(1)) != NULL);
    CHECK(smtps_engine_submit(e, m, &d, 1) == SMTPS_OK);
    CHECK(drain(e, &count, st, 10000, reason, sizeof(reason), &stage));
    CHECK(count == 1 && st[SMTPS_STATUS_TEMPFAIL] == 1);
    CHECK(stage == SMTPS_STAGE_NOT_CONNECTED);
    CHECK(strncmp(reason, "cannot resolve no-such-host", 27) == 0);
    ok = 1;
out:
    if (!ok && reason[0])
	fail("reason: %s", reason);
    smtps_engine_free(e);
    return ok;
}

/* run_behaviour - n messages to a server of one behaviour */

static int run_behaviour(int behaviour, const char *addr, int n, int status,
			         int64_t timeout_ms, int *messages_seen)
{
    struct smtps_engine_config cfg;
    struct smtps_destination d;
    struct smtps_engine *e = NULL;
    struct smtps_message *m;
    struct server s;
    char    reason[REASON_MAX] = "";
    int     i, count = 0, st[5] = {0}, stage, ok = 0, started;

    if (!(started = server_start(&s, behaviour, addr)))
	return 0;
    memset(&cfg, 0, sizeof(cfg));
    cfg.sizeof_config = sizeof(cfg);
    cfg.max_per_destination = n;	/* a connection per message */
    CHECK((e = smtps_engine_new(NULL, &cfg, NULL)) != NULL);
    destination(&d, addr, s.port, timeout_ms);
    for (i = 1; i <= n; i++) {
	CHECK((m = message(i)) != NULL);
	CHECK(smtps_engine_submit(e, m, &d, (uint64_t) i) == SMTPS_OK);
    }
    CHECK(drain(e, &count, st, 20000, reason, sizeof(reason), &stage));
    CHECK(count == n);
    if (st[status] != n)
	fail("%d of %d with status %d; first: %s", st[status], n, status, reason);
    CHECK(st[status] == n);
    ok = 1;
out:
    smtps_engine_free(e);
    if (started) {
	server_stop(&s);
	if (messages_seen != NULL)
	    *messages_seen = s.messages;
    }
    return ok;
}

/* test_421 - every message tempfails */

static int test_421(void)
{
    return run_behaviour(B_421, "127.0.0.1", 4, SMTPS_STATUS_TEMPFAIL, 5000, NULL);
}

/* test_stall - the reply deadline ends it */

static int test_stall(void)
{
    return run_behaviour(B_STALL, "127.0.0.1", 3, SMTPS_STATUS_TEMPFAIL, 300, NULL);
}

/* test_drop_dot - lost after the final dot: unknown */

static int test_drop_dot(void)
{
    int     seen = 0;

    if (!run_behaviour(B_DROP_DOT, "127.0.0.1", 3, SMTPS_STATUS_UNKNOWN, 5000, &seen))
	return 0;
    return seen == 3 ? 1 : fail("the server took %d messages, not 3", seen);
}

/* test_ipv6 - an IPv6 literal, with and without brackets */

static int test_ipv6(void)
{
    int     fd = socket(AF_INET6, SOCK_STREAM, 0);
    struct sockaddr_in6 a;

    memset(&a, 0, sizeof(a));
    a.sin6_family = AF_INET6;
    a.sin6_addr = in6addr_loopback;
    if (fd < 0 || bind(fd, (struct sockaddr *) &a, sizeof(a)) != 0) {
	if (fd >= 0)
	    close(fd);
	printf("(no IPv6 loopback here: skipped)\n");
	return 1;
    }
    close(fd);
    return run_behaviour(B_ACCEPT, "::1", 3, SMTPS_STATUS_DELIVERED, 5000, NULL);
}

/* test_free_in_flight - free with connections open and messages queued */

static int test_free_in_flight(void)
{
    struct smtps_engine_config cfg;
    struct smtps_destination d1, d2, d3;
    struct smtps_engine *e = NULL;
    struct smtps_message *m;
    struct server stall, good;
    int     i, ok = 0, s1, s2 = 0;

    if (!(s1 = server_start(&stall, B_STALL, "127.0.0.1")))
	return 0;
    if (!(s2 = server_start(&good, B_ACCEPT, "127.0.0.1")))
	goto out;
    memset(&cfg, 0, sizeof(cfg));
    cfg.sizeof_config = sizeof(cfg);
    cfg.max_per_destination = 2;
    CHECK((e = smtps_engine_new(NULL, &cfg, NULL)) != NULL);
    destination(&d1, "127.0.0.1", stall.port, 60000);
    destination(&d2, "127.0.0.1", good.port, 60000);
    destination(&d3, "no-such-host.smtpstate.invalid", 25, 0);
    for (i = 1; i <= 30; i++) {
	CHECK((m = message(i)) != NULL);
	CHECK(smtps_engine_submit(e, m, i % 3 == 0 ? &d1 : i % 3 == 1 ? &d2 : &d3,
				  (uint64_t) i) == SMTPS_OK);
    }
    CHECK(smtps_engine_run(e, 100) >= 0);
    CHECK(smtps_engine_connections(e) > 0);
    smtps_engine_free(e);		/* ASan: nothing may be left */
    e = NULL;
    ok = 1;
out:
    smtps_engine_free(e);
    if (s2)
	server_stop(&good);
    server_stop(&stall);
    return ok;
}

/* test_arguments - what submit and new refuse */

static int test_arguments(void)
{
    struct smtps_engine_config cfg;
    struct smtps_destination d;
    struct smtps_engine *e = NULL;
    struct smtps_message *m = NULL;
    int     ok = 0;

    memset(&cfg, 0, sizeof(cfg));
    cfg.sizeof_config = sizeof(cfg) + 8;	/* a newer caller's */
    CHECK(smtps_engine_new(NULL, &cfg, NULL) == NULL);
    cfg.sizeof_config = 4;
    CHECK(smtps_engine_new(NULL, &cfg, NULL) == NULL);
    cfg.sizeof_config = sizeof(cfg);
    cfg.max_connections = -1;
    CHECK(smtps_engine_new(NULL, &cfg, NULL) == NULL);
    cfg.max_connections = 0;
    cfg.helo = "bad helo";
    CHECK(smtps_engine_new(NULL, &cfg, NULL) == NULL);
    if ((e = smtps_engine_new(NULL, NULL, NULL)) == NULL)
	return fail("smtps_engine_new(defaults)");
    CHECK((m = message(1)) != NULL);
    destination(&d, "127.0.0.1", 25, 0);
    CHECK(smtps_engine_submit(NULL, m, &d, 1) == SMTPS_EINVAL);
    CHECK(smtps_engine_submit(e, NULL, &d, 1) == SMTPS_EINVAL);
    CHECK(smtps_engine_submit(e, m, NULL, 1) == SMTPS_EINVAL);
    d.port = 0;
    CHECK(smtps_engine_submit(e, m, &d, 1) == SMTPS_EINVAL);
    d.port = 25;
    d.host = "has space";
    CHECK(smtps_engine_submit(e, m, &d, 1) == SMTPS_EINVAL);
    d.host = "";
    CHECK(smtps_engine_submit(e, m, &d, 1) == SMTPS_EINVAL);
    d.host = "127.0.0.1";
    d.tls_mode = 9;
    CHECK(smtps_engine_submit(e, m, &d, 1) == SMTPS_EINVAL);
    d.tls_mode = SMTPS_TLS_NONE;
    d.auth_user = "user";			/* without a secret */
    CHECK(smtps_engine_submit(e, m, &d, 1) == SMTPS_EINVAL);
    d.auth_user = NULL;
    d.sizeof_destination = sizeof(d) + 8;
    CHECK(smtps_engine_submit(e, m, &d, 1) == SMTPS_EINVAL);
    d.sizeof_destination = sizeof(d);
    CHECK(smtps_engine_pending(e) == 0);
    CHECK(smtps_engine_run(e, 0) == 0);	/* nothing to do */
    CHECK(smtps_engine_next_result(e) == NULL);
    ok = 1;
out:
    smtps_message_free(m);
    smtps_engine_free(e);
    return ok;
}

/*
 * test_submit_plain - smtps_engine_submit_plain() refuses what the setters
 * refuse and a recipient list that does not hold nrcpt addresses, submits
 * nothing then, and delivers what it takes to every recipient.
 */
static int test_submit_plain(void)
{
    static const char rcpts[] = "a@example.test\nb@example.test\nc@example.test";
    static const char body[] = "Subject: plain\r\n\r\n.dot\r\n";
    struct smtps_engine_config cfg;
    struct smtps_destination d;
    struct smtps_engine *e = NULL;
    struct server s;
    size_t  rlen = sizeof(rcpts) - 1, blen = sizeof(body) - 1;
    int     i, count = 0, st[5] = {0}, ok = 0, started;

    if (!(started = server_start(&s, B_ACCEPT, "127.0.0.1")))
	return 0;
    memset(&cfg, 0, sizeof(cfg));
    cfg.sizeof_config = sizeof(cfg);
    cfg.max_per_destination = 4;
    cfg.helo = "client.test";
    CHECK((e = smtps_engine_new(NULL, &cfg, NULL)) != NULL);
    destination(&d, "127.0.0.1", s.port, 5000);
    CHECK(smtps_engine_submit_plain(NULL, "s@c.test", 8, rcpts, rlen, 3, body, blen, &d, 1)
	  == SMTPS_EINVAL);
    CHECK(smtps_engine_submit_plain(e, NULL, 8, rcpts, rlen, 3, body, blen, &d, 1)
	  == SMTPS_EINVAL);
    CHECK(smtps_engine_submit_plain(e, "s@c.test", 8, rcpts, rlen, 0, body, blen, &d, 1)
	  == SMTPS_EINVAL);
    CHECK(smtps_engine_submit_plain(e, "s@c.test", 8, rcpts, rlen, 3, NULL, blen, &d, 1)
	  == SMTPS_EINVAL);
    CHECK(smtps_engine_submit_plain(e, "s@c.test", 8, rcpts, rlen, 3, body, blen, NULL, 1)
	  == SMTPS_EINVAL);
    /* Fewer or more addresses than said, an empty one: refused whole. */
    CHECK(smtps_engine_submit_plain(e, "s@c.test", 8, rcpts, rlen, 2, body, blen, &d, 1)
	  == SMTPS_EINVAL);
    CHECK(smtps_engine_submit_plain(e, "s@c.test", 8, rcpts, rlen, 4, body, blen, &d, 1)
	  == SMTPS_EINVAL);
    CHECK(smtps_engine_submit_plain(e, "s@c.test", 8, "a@x.test\n", 9, 2, body, blen, &d, 1)
	  != SMTPS_OK);
    /* What the setters refuse: CR in an address, a NUL in the body. */
    CHECK(smtps_engine_submit_plain(e, "s@c.test\r", 9, rcpts, rlen, 3, body, blen, &d, 1)
	  != SMTPS_OK);
    CHECK(smtps_engine_submit_plain(e, "s@c.test", 8, "a@x\r.test", 9, 1, body, blen, &d, 1)
	  != SMTPS_OK);
    CHECK(smtps_engine_submit_plain(e, "s@c.test", 8, rcpts, rlen, 3, "a\0b", 3, &d, 1)
	  != SMTPS_OK);
    d.port = 0;
    CHECK(smtps_engine_submit_plain(e, "s@c.test", 8, rcpts, rlen, 3, body, blen, &d, 1)
	  == SMTPS_EINVAL);
    d.port = s.port;
    CHECK(smtps_engine_pending(e) == 0);
    for (i = 1; i <= 40; i++)
	CHECK(smtps_engine_submit_plain(e, "s@client.test", 13, rcpts, rlen, 3, body, blen,
					&d, (uint64_t) i) == SMTPS_OK);
    /* One recipient, and the null reverse-path as sender. */
    CHECK(smtps_engine_submit_plain(e, "", 0, "z@example.test", 14, 1, body, blen,
				    &d, 41) == SMTPS_OK);
    CHECK(drain(e, &count, st, 20000, NULL, 0, NULL));
    CHECK(count == 41 && st[SMTPS_STATUS_DELIVERED] == 41);
    smtps_engine_free(e);
    e = NULL;
    server_stop(&s);
    started = 0;
    CHECK(s.messages == 41 && s.rcpts == 121);
    ok = 1;
out:
    smtps_engine_free(e);
    if (started)
	server_stop(&s);
    return ok;
}

/* test_timers - the heap agrees with a plain array under random use */

static int test_timers(void)
{
    enum {
    N = 200};
    struct smtps_timer_heap h;
    struct smtps_timer t[N], *first;
    int64_t min;
    unsigned seed = 12345;
    int     i, k, ok = 0, step;

    memset(&h, 0, sizeof(h));
    for (i = 0; i < N; i++)
	smtps_timer_init(&t[i], 1);
    CHECK(smtps_timers_reserve(&h, N) == SMTPS_OK);
    CHECK(smtps_timers_first(&h) == NULL);
    for (step = 0; step < 20000; step++) {
	seed = seed * 1103515245u + 12345u;
	k = (int) ((seed >> 8) % N);
	seed = seed * 1103515245u + 12345u;
	if ((seed >> 8) % 5 == 0)
	    smtps_timer_cancel(&h, &t[k]);
	else
	    smtps_timer_set(&h, &t[k], (int64_t) ((seed >> 4) % 1000));
	min = -1;
	for (i = 0; i < N; i++)
	    if (t[i].index != SMTPS_TIMER_UNARMED && (min < 0 || t[i].when < min))
		min = t[i].when;
	first = smtps_timers_first(&h);
	CHECK((min < 0) == (first == NULL));
	CHECK(first == NULL || first->when == min);
    }
    /* Popping in order gives non-decreasing deadlines. */
    min = -1;
    while ((first = smtps_timers_first(&h)) != NULL) {
	CHECK(first->when >= min);
	min = first->when;
	smtps_timer_cancel(&h, first);
    }
    ok = 1;
out:
    smtps_timers_free(&h);
    return ok;
}

/* waker - wake the engine from another thread after 100 ms */

static void *waker(void *arg)
{
    struct timespec ts = {0, 100 * 1000 * 1000};

    nanosleep(&ts, NULL);
    (void) smtps_engine_wake((struct smtps_engine *) arg);
    return NULL;
}

/* ms_since - milliseconds since t0 */

static int64_t ms_since(const struct timespec *t0)
{
    struct timespec t1;

    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (int64_t) (t1.tv_sec - t0->tv_sec) * 1000
	+ (t1.tv_nsec - t0->tv_nsec) / 1000000;
}

/* test_wake - serve() with nothing pending returns when woken, at once */

static int test_wake(void)
{
    struct smtps_engine *e = NULL;
    struct timespec t0;
    pthread_t tid;
    int     ok = 0, rc, joined = 1;

    CHECK((e = smtps_engine_new(NULL, NULL, NULL)) != NULL);
    CHECK(smtps_engine_fileno(e) >= 0);
    CHECK(smtps_engine_next_deadline(e) == -1);	/* nothing armed */
    /* A wake-up before the wait is not lost. */
    CHECK(smtps_engine_wake(e) == SMTPS_OK);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    CHECK(smtps_engine_serve(e, 5000) == 0);
    CHECK(ms_since(&t0) < 500);
    /* Nothing pending: serve() waits (run() would return at once)... */
    clock_gettime(CLOCK_MONOTONIC, &t0);
    CHECK(smtps_engine_serve(e, 50) == 0);
    CHECK(ms_since(&t0) >= 45);
    /* ... until another thread wakes it. */
    CHECK(pthread_create(&tid, NULL, waker, e) == 0);
    joined = 0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    rc = smtps_engine_serve(e, 5000);
    pthread_join(tid, NULL);
    joined = 1;
    CHECK(rc == 0);
    CHECK(ms_since(&t0) >= 90 && ms_since(&t0) < 1000);
    CHECK(smtps_engine_wake(NULL) == SMTPS_EINVAL);
    ok = 1;
out:
    if (!joined)
	pthread_join(tid, NULL);
    smtps_engine_free(e);
    return ok;
}

/*
 * test_step - another event loop's way: poll() on the descriptor until
 * the next deadline, then serve(e, 0); the results come, and the idle
 * connections quit at idle_timeout with nothing pending
 */

static int test_step(void)
{
    struct smtps_engine_config cfg;
    struct smtps_destination d;
    struct smtps_engine *e = NULL;
    struct smtps_message *m;
    struct smtps_result *r;
    struct server s;
    struct pollfd p;
    struct timespec t0;
    int64_t wait;
    int     i, count = 0, ok = 0, started, rc;

    if (!(started = server_start(&s, B_ACCEPT, "127.0.0.1")))
	return 0;
    memset(&cfg, 0, sizeof(cfg));
    cfg.sizeof_config = sizeof(cfg);
    cfg.max_per_destination = 2;
    cfg.idle_timeout_ms = 200;
    cfg.helo = "client.test";
    CHECK((e = smtps_engine_new(NULL, &cfg, NULL)) != NULL);
    destination(&d, "127.0.0.1", s.port, 5000);
    for (i = 1; i <= 10; i++) {
	CHECK((m = message(i)) != NULL);
	if (smtps_engine_submit(e, m, &d, (uint64_t) i) != SMTPS_OK) {
	    smtps_message_free(m);
	    CHECK(!"submit failed");
	}
    }
    CHECK(smtps_engine_next_deadline(e) == 0);	/* work to start now */
    p.fd = smtps_engine_fileno(e);
    p.events = POLLIN;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while ((count < 10 || smtps_engine_connections(e) > 0) && ms_since(&t0) < 10000) {
	wait = smtps_engine_next_deadline(e);
	(void) poll(&p, 1, wait < 0 || wait > 1000 ? 1000 : (int) wait);
	CHECK((rc = smtps_engine_serve(e, 0)) >= 0);
	while ((r = smtps_engine_next_result(e)) != NULL) {
	    if (r->status == SMTPS_STATUS_DELIVERED)
		count++;
	    smtps_result_free(r);
	}
    }
    CHECK(count == 10);
    CHECK(smtps_engine_connections(e) == 0);	/* quit while idle */
    CHECK(smtps_engine_next_deadline(e) == -1);
    smtps_engine_free(e);
    e = NULL;
    server_stop(&s);
    started = 0;
    CHECK(s.messages == 10 && s.quits >= 1);
    ok = 1;
out:
    smtps_engine_free(e);
    if (started)
	server_stop(&s);
    return ok;
}

/*
 * test_cancel - one connection stalls after its greeting: the message it
 * holds (not begun) and those queued behind it are withdrawn by tag,
 * each with its result at once; an unknown tag is not found
 */

static int test_cancel(void)
{
    struct smtps_engine_config cfg;
    struct smtps_destination d;
    struct smtps_engine *e = NULL;
    struct smtps_message *m;
    struct smtps_result *r;
    struct server s;
    int     i, ok = 0, started, got = 0;

    if (!(started = server_start(&s, B_STALL, "127.0.0.1")))
	return 0;
    memset(&cfg, 0, sizeof(cfg));
    cfg.sizeof_config = sizeof(cfg);
    cfg.max_per_destination = 1;
    cfg.helo = "client.test";
    CHECK((e = smtps_engine_new(NULL, &cfg, NULL)) != NULL);
    destination(&d, "127.0.0.1", s.port, 5000);
    for (i = 1; i <= 3; i++) {
	CHECK((m = message(i)) != NULL);
	if (smtps_engine_submit(e, m, &d, (uint64_t) i) != SMTPS_OK) {
	    smtps_message_free(m);
	    CHECK(!"submit failed");
	}
    }
    /* Connected, the first message handed to the session, the greeting late. */
    for (i = 0; i < 20 && smtps_engine_connections(e) == 0; i++)
	CHECK(smtps_engine_serve(e, 20) >= 0);
    CHECK(smtps_engine_serve(e, 100) >= 0);
    CHECK(smtps_engine_cancel(e, 3) == SMTPS_CANCEL_DONE);	/* queued */
    CHECK(smtps_engine_cancel(e, 1) == SMTPS_CANCEL_DONE);	/* in the session */
    CHECK(smtps_engine_cancel(e, 3) == SMTPS_ENOTFOUND);	/* once */
    CHECK(smtps_engine_cancel(e, 99) == SMTPS_ENOTFOUND);
    CHECK(smtps_engine_cancel(NULL, 1) == SMTPS_EINVAL);
    while ((r = smtps_engine_next_result(e)) != NULL) {
	if ((r->tag == 1 || r->tag == 3) && r->status == SMTPS_STATUS_TEMPFAIL
	    && strstr(r->reason, "cancelled") != NULL)
	    got++;
	smtps_result_free(r);
    }
    CHECK(got == 2);
    CHECK(smtps_engine_pending(e) == 1);		/* the second goes on */
    ok = 1;
out:
    smtps_engine_free(e);
    if (started)
	server_stop(&s);
    return ok;
}

int     main(void)
{
    static const struct {
	const char *label;
	int     (*fn) (void);
    }       tests[] = {
	{"timers: heap order under random set/cancel", test_timers},
	{"arguments refused", test_arguments},
	{"submit_plain: refusals, and every recipient delivered", test_submit_plain},
	{"200 messages over at most 8 connections", test_pool},
	{"connect refused: tempfail, not connected", test_refused},
	{"unresolvable name: tempfail, not connected", test_unresolvable},
	{"421 greeting: tempfail", test_421},
	{"stalled server: the deadline ends it", test_stall},
	{"hang-up after the final dot: unknown", test_drop_dot},
	{"IPv6 literal ::1", test_ipv6},
	{"freed with work in flight", test_free_in_flight},
	{"wake-up from another thread ends serve() at once", test_wake},
	{"serve(e, 0) driven by poll(): results, then idle QUIT", test_step},
	{"cancel by tag: queued and in a session before its greeting", test_cancel},
    };
    size_t  ntests = sizeof(tests) / sizeof(tests[0]);
    size_t  i;
    int     passed = 0, failed = 0;

    setvbuf(stdout, NULL, _IOLBF, 0);	/* lines out before any crash */
    for (i = 0; i < ntests; i++) {
	printf("RUN %s\n", tests[i].label);
	why[0] = 0;
	if (tests[i].fn()) {
	    printf("PASS %s\n", tests[i].label);
	    passed++;
	} else {
	    printf("FAIL %s: %s\n", tests[i].label, why[0] ? why : "(no reason)");
	    failed++;
	}
    }
    printf("%d passed, %d failed\n", passed, failed);
    return (failed ? 1 : 0);
}
