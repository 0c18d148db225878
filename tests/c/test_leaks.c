/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	test_leaks 1
 * SUMMARY
 *	memory returns to its baseline across many thousands of sessions
 * SYNOPSIS
 *	test_leaks [sessions [engine-messages]]
 * DESCRIPTION
 *	LeakSanitizer (test_c_units.py builds every tests/c program with
 *	ASan, which includes it) finds memory nobody points to at exit. It
 *	cannot see memory still referenced but never given back: a list that
 *	only grows, a cache, a buffer kept per connection. So this program
 *	counts the bytes allocated and in use (ASan's own counter, or
 *	mallinfo2() without ASan), takes a baseline after a warm-up, and
 *	checks that the count comes back to it:
 *
 *	sessions
 *		20,000 sans-I/O sessions (csrc/session.c and everything it
 *		calls), nine scenarios in turn: two messages delivered with
 *		PIPELINING; MAIL refused, replies drained, RSET, the next one
 *		delivered; a DATA timeout; the connection lost mid-body; a
 *		malformed reply; freed while active with messages queued and
 *		results not taken; AUTH PLAIN refused with 535; STARTTLS
 *		begun (an OpenSSL object made) and the connection lost in
 *		the handshake; a BDAT body past the output high-water mark.
 *		The count is read every 2,000 sessions.
 *
 *	engine	10,000 messages through engines (csrc/engine.c), one
 *		message per connection, so 10,000 connections and sessions,
 *		against a loopback server thread of this file that answers
 *		MAIL with 421 on one connection in seven and hangs up at the
 *		final dot on one in eleven; some messages go to a closed
 *		port. The
 *		count is read after each batch of 500 with every result
 *		freed: ten engines, each freed after its batch, must each
 *		give back every byte; then one engine runs ten batches, and
 *		the count after each must be a fixed amount plus a fixed
 *		amount per connection still open (still saying QUIT when the
 *		batch ends), within SLACK.
 *
 *	idle	a session that delivered a body of 150,000 bytes (its output
 *		buffer grew past 16 KiB for it) holds, once IDLE with its
 *		output taken, no more than IDLE_MAX bytes beyond what it
 *		held before its first message: an idle pooled connection
 *		keeps no buffer of its own (session.c, release_idle()).
 *
 *	Each line "memory: ..." shows the numbers. A count more than
 *	SLACK bytes above the baseline fails.
 * DIAGNOSTICS
 *	The exit status is 1 when any test fails, else 0.
 * SEE ALSO
 *	tests/test_c_units.py (builds and runs it), tests/test_leaks.py
 *	(the same check through the Python API).
 *--*/

#include <errno.h>
#include <malloc.h>
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

#if defined(__SANITIZE_ADDRESS__)
#define HAVE_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define HAVE_ASAN 1
#endif
#endif

#ifdef HAVE_ASAN
size_t  __sanitizer_get_current_allocated_bytes(void);
#endif

#define WHY_MAX 512
#define SLACK 16384			/* bytes of noise allowed over the baseline */
#define MAX_SCONN 64
#define SBUF 8192
#define MAX_BATCHES 100
#define IDLE_MAX 2048			/* bytes an idle session may keep for a message */

#define CHECK(cond) do { \
	if (!(cond)) { \
	    (void) fail("line %d: %s", __LINE__, #cond); \
	    goto out; \
	} \
    } while (0)

static char why[WHY_MAX];
static long n_sessions = 20000;
static long n_engine = 5000;

/* fail - record why the current test failed; returns 0 */

static int fail(const char *fmt,...) __attribute__((format(printf, 1, 2)));

static int fail(const char *fmt,...)
{
    va_list ap;

    if (why[0] != 0)
	return 0;
    va_start(ap, fmt);
    vsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    return 0;
}

/* in_use - bytes allocated and not freed, process-wide */

static long in_use(void)
{
#ifdef HAVE_ASAN
    return (long) __sanitizer_get_current_allocated_bytes();
#else
    struct mallinfo2 mi = mallinfo2();

    return (long) mi.uordblks;
#endif
}

/* ------------------------------------------------------------------ */
/* Sessions, scripted in memory                                        */
/* ------------------------------------------------------------------ */

static struct smtps_tls_config *tls_cfg;
static char *big_body;
static size_t big_len;

/* message - a small message (or the big one) */

static struct smtps_message *message(int big)
{
    struct smtps_message *m = smtps_message_new();
    static const char body[] = "Subject: leak test\r\n\r\n.a line\r\n";

    if (m == NULL)
	return NULL;
    if (smtps_message_set_sender(m, "s@client.test", 13) != SMTPS_OK
	|| smtps_message_add_recipient(m, "r@server.test", 13, SMTPS_NOTIFY_FAILURE,
				       "r@server.test", 13) != SMTPS_OK
	|| smtps_message_add_recipient(m, "q@server.test", 13, 0, NULL, 0) != SMTPS_OK
	|| smtps_message_set_body(m, big ? big_body : body,
				  big ? big_len : sizeof(body) - 1) != SMTPS_OK) {
	smtps_message_free(m);
	return NULL;
    }
    return m;
}

/* drain_out - the driver sends everything the session has */

static void drain_out(struct smtps_session *s, int64_t now)
{
    const char *p;
    size_t  n;

    while ((n = smtps_session_output(s, &p)) > 0)
	smtps_session_consume(s, n, now);
}

/* feed - the server says text; the client's answer is taken */

static void feed(struct smtps_session *s, const char *text, int64_t now)
{
    (void) smtps_session_feed(s, text, strlen(text), now);
    drain_out(s, now);
}

/* submit - a message into the session; 0 on failure */

static int submit(struct smtps_session *s, int big, uint64_t tag, int64_t now)
{
    struct smtps_message *m = message(big);

    if (m == NULL)
	return 0;
    if (smtps_session_submit(s, m, tag, now) != SMTPS_OK) {
	smtps_message_free(m);
	return 0;
    }
    return 1;
}

/* one_session - scenario k; 1 when it ran as scripted */

static int one_session(int k)
{
    struct smtps_session *s;
    struct smtps_result *r;
    int64_t now = 1000;
    int     ok = 0, results = 0, want = 1;

    if ((s = smtps_session_new(NULL, "client.test", NULL)) == NULL)
	return fail("smtps_session_new");
    if (k == 6 && smtps_session_set_auth(s, "user", "secret", SMTPS_AUTH_PLAIN, 1) != 0)
	goto out;
    if (k == 7 && smtps_session_set_tls(s, SMTPS_TLS_STARTTLS, tls_cfg, "mx.test") != 0)
	goto out;
    CHECK(submit(s, k == 8, 1, now));
    if (k == 0 || k == 1 || k == 5) {
	CHECK(submit(s, 0, 2, now));
	want = 2;
    }
    CHECK(smtps_session_start(s, now) == SMTPS_OK);
    feed(s, "220 mx.test ESMTP\r\n", now);
    switch (k) {
    case 0:					/* two delivered, pipelined */
	feed(s, "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250 DSN\r\n", now);
	feed(s, "250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n", now);
	feed(s, "250 queued\r\n", now);
	feed(s, "250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n", now);
	feed(s, "250 queued\r\n", now);
	CHECK(smtps_session_quit(s, now) == SMTPS_OK);
	drain_out(s, now);
	feed(s, "221 bye\r\n", now);
	break;
    case 1:					/* MAIL refused, drained, RSET */
	feed(s, "250-mx.test\r\n250 PIPELINING\r\n", now);
	feed(s, "550 no\r\n503 no\r\n503 no\r\n503 no\r\n", now);
	feed(s, "250 reset\r\n", now);
	feed(s, "250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n250 queued\r\n", now);
	break;
    case 2:					/* DATA times out */
	feed(s, "250 mx.test\r\n", now);
	feed(s, "250 ok\r\n", now);
	feed(s, "250 ok\r\n", now);
	feed(s, "250 ok\r\n", now);
	now += SMTPS_TIMEOUT_DATA + 1;
	CHECK(smtps_session_tick(s, now) == SMTPS_OK);
	break;
    case 3:					/* lost mid-body */
	feed(s, "250 mx.test\r\n250 ok\r\n250 ok\r\n250 ok\r\n", now);
	(void) smtps_session_feed(s, "354 go\r\n", 8, now);
	break;
    case 4:					/* a malformed reply */
	feed(s, "250-mx.test\r\n2x0 what\r\n", now);
	break;
    case 5:					/* freed while active */
	feed(s, "250 mx.test\r\n", now);
	smtps_session_free(s);		/* results never taken */
	return 1;
    case 6:					/* AUTH PLAIN refused */
	feed(s, "250-mx.test\r\n250 AUTH PLAIN\r\n", now);
	feed(s, "535 5.7.8 no\r\n", now);
	feed(s, "221 bye\r\n", now);
	break;
    case 7:					/* STARTTLS, lost in the handshake */
	feed(s, "250-mx.test\r\n250 STARTTLS\r\n", now);
	feed(s, "220 go ahead\r\n", now);
	break;
    default:					/* BDAT, a big body */
	feed(s, "250-mx.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n", now);
	feed(s, "250 ok\r\n250 ok\r\n250 ok\r\n", now);
	feed(s, "250 queued\r\n", now);
	break;
    }
    smtps_session_closed(s, "test over", now);
    while ((r = smtps_session_next_result(s)) != NULL) {
	results++;
	smtps_result_free(r);
    }
    CHECK(results == want);
    ok = 1;
out:
    smtps_session_free(s);
    return ok;
}

/* test_sessions - 20,000 sessions come back to the baseline */

static int test_sessions(void)
{
    long    base = 0, now_used, worst = 0, i;
    int     ok = 0;

    big_len = 150000;
    if ((big_body = malloc(big_len)) == NULL)
	return fail("malloc");
    for (i = 0; i < (long) big_len; i++)
	big_body[i] = i % 61 == 60 ? '\n' : i % 61 == 0 ? '.' : 'x';
    tls_cfg = smtps_tls_config_new(NULL, 1);
    CHECK(tls_cfg != NULL);
    for (i = 0; i < 90; i++)			/* warm-up: one-time allocations */
	CHECK(one_session((int) (i % 9)));
    base = in_use();
    for (i = 1; i <= n_sessions; i++) {
	CHECK(one_session((int) (i % 9)));
	if (i % 2000 == 0 || i == n_sessions) {
	    now_used = in_use();
	    if (now_used - base > worst)
		worst = now_used - base;
	    CHECK(now_used - base <= SLACK);
	}
    }
    printf("memory: sessions: baseline %ld bytes in use, %ld sessions, "
	   "at most %+ld bytes over it, %+ld at the end\n", base, n_sessions,
	   worst, in_use() - base);
    ok = 1;
out:
    if (!ok)
	printf("memory: sessions: baseline %ld, now %ld\n", base, in_use());
    smtps_tls_config_free(tls_cfg);
    free(big_body);
    return ok;
}

/*
 * test_idle - what a session holds once IDLE after a big message, against
 * what it held before its first: no output buffer, no body stage
 */

static int test_idle(void)
{
    struct smtps_session *s = NULL;
    struct smtps_result *r;
    long    fresh = 0, idle = 0, i;
    int64_t now = 1000;
    int     ok = 0;

    big_len = 150000;
    if ((big_body = malloc(big_len)) == NULL)
	return fail("malloc");
    for (i = 0; i < (long) big_len; i++)
	big_body[i] = i % 61 == 60 ? '\n' : i % 61 == 0 ? '.' : 'x';
    CHECK((s = smtps_session_new(NULL, "client.test", NULL)) != NULL);
    CHECK(smtps_session_start(s, now) == SMTPS_OK);
    feed(s, "220 mx.test ESMTP\r\n", now);
    feed(s, "250 mx.test\r\n", now);
    CHECK(smtps_session_status(s) == SMTPS_SESS_IDLE);
    fresh = in_use();
    CHECK(submit(s, 1, 1, now));
    drain_out(s, now);				/* MAIL */
    feed(s, "250 ok\r\n", now);
    feed(s, "250 ok\r\n", now);
    feed(s, "250 ok\r\n", now);
    feed(s, "354 go\r\n", now);			/* the body, all taken */
    feed(s, "250 queued\r\n", now);
    CHECK(smtps_session_status(s) == SMTPS_SESS_IDLE);
    CHECK((r = smtps_session_next_result(s)) != NULL);
    CHECK(r->status == SMTPS_STATUS_DELIVERED);
    smtps_result_free(r);
    idle = in_use();
    printf("memory: idle: %+ld bytes after a %zu-byte message\n",
	   idle - fresh, big_len);
    CHECK(idle - fresh <= IDLE_MAX);
    ok = 1;
out:
    smtps_session_free(s);
    free(big_body);
    big_body = NULL;
    return ok;
}

/* ------------------------------------------------------------------ */
/* The engine, against a loopback server thread                        */
/* ------------------------------------------------------------------ */

struct sconn {
    int     fd;
    char    buf[SBUF];
    size_t  len;
    int     in_data;
    int     drop_dot;			/* hang up at the final dot */
    int     mail_421;			/* 421 to MAIL, then hang up */
};

struct server {
    int     lfd, port, stop[2];
    pthread_t tid;
    struct sconn conn[MAX_SCONN];
    unsigned accepted;
};

/* say - one reply (loopback: one write does it) */

static void say(struct sconn *c, const char *text)
{
    (void) send(c->fd, text, strlen(text), MSG_NOSIGNAL);
}

/* sclose - a connection is over */

static void sclose(struct sconn *c)
{
    close(c->fd);
    c->fd = -1;
}

/* sline - one line from the client; 0 when the connection ends */

static int sline(struct sconn *c, const char *line)
{
    if (c->in_data) {
	if (strcmp(line, ".") != 0)
	    return 1;
	c->in_data = 0;
	if (c->drop_dot)
	    return 0;
	say(c, "250 2.0.0 queued\r\n");
	return 1;
    }
    if (strncmp(line, "EHLO", 4) == 0)
	say(c, "250-test.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n");
    else if (c->mail_421 && strncmp(line, "MAIL", 4) == 0) {
	say(c, "421 4.3.2 closing\r\n");
	return 0;
    }
    else if (strcmp(line, "DATA") == 0) {
	c->in_data = 1;
	say(c, "354 go ahead\r\n");
    } else if (strcmp(line, "QUIT") == 0) {
	say(c, "221 2.0.0 bye\r\n");
	return 0;
    } else
	say(c, "250 2.0.0 ok\r\n");
    return 1;
}

/* sread - bytes from a client; every complete line acted on */

static void sread(struct sconn *c)
{
    ssize_t n = recv(c->fd, c->buf + c->len, sizeof(c->buf) - 1 - c->len, 0);
    char   *nl, *start;

    if (n <= 0) {
	sclose(c);
	return;
    }
    c->len += (size_t) n;
    c->buf[c->len] = 0;
    for (start = c->buf; (nl = strstr(start, "\r\n")) != NULL; start = nl + 2) {
	*nl = 0;
	if (!sline(c, start)) {
	    sclose(c);
	    return;
	}
    }
    c->len -= (size_t) (start - c->buf);
    memmove(c->buf, start, c->len);
    if (c->len == sizeof(c->buf) - 1)
	c->len = 0;
}

/* server_run - accept, greet, answer; no allocation of its own */

static void *server_run(void *arg)
{
    struct server *s = arg;
    struct pollfd pfd[MAX_SCONN + 2];
    struct sconn *who[MAX_SCONN + 2];
    struct sconn *c;
    int     i, n, fd;

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
	if ((pfd[1].revents & POLLIN) && (fd = accept(s->lfd, NULL, NULL)) >= 0) {
	    for (c = NULL, i = 0; i < MAX_SCONN && c == NULL; i++)
		if (s->conn[i].fd < 0)
		    c = &s->conn[i];
	    if (c == NULL) {
		close(fd);
	    } else {
		s->accepted++;
		c->fd = fd;
		c->len = 0;
		c->in_data = 0;
		c->drop_dot = s->accepted % 11 == 0;
		c->mail_421 = s->accepted % 7 == 0;
		say(c, "220 test.example ESMTP\r\n");
	    }
	}
	for (i = 2; i < n; i++)
	    if (pfd[i].revents && who[i]->fd == pfd[i].fd)
		sread(who[i]);
    }
}

/* server_start - listen on 127.0.0.1, run the thread */

static int server_start(struct server *s)
{
    struct sockaddr_in a;
    socklen_t len = sizeof(a);
    int     i;

    memset(s, 0, sizeof(*s));
    for (i = 0; i < MAX_SCONN; i++)
	s->conn[i].fd = -1;
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if ((s->lfd = socket(AF_INET, SOCK_STREAM, 0)) < 0
	|| bind(s->lfd, (struct sockaddr *) &a, sizeof(a)) != 0
	|| listen(s->lfd, 256) != 0
	|| getsockname(s->lfd, (struct sockaddr *) &a, &len) != 0
	|| pipe(s->stop) != 0)
	return fail("listen: %s", strerror(errno));
    s->port = ntohs(a.sin_port);
    if (pthread_create(&s->tid, NULL, server_run, s) != 0)
	return fail("pthread_create failed");
    return 1;
}

/* server_stop - stop the thread, close everything */

static void server_stop(struct server *s)
{
    int     i;

    if (write(s->stop[1], "x", 1) == 1)
	pthread_join(s->tid, NULL);
    for (i = 0; i < MAX_SCONN; i++)
	if (s->conn[i].fd >= 0)
	    sclose(&s->conn[i]);
    close(s->lfd);
    close(s->stop[0]);
    close(s->stop[1]);
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

/* batch - submit n messages, run until all are back; counts statuses */

static int batch(struct smtps_engine *e, const struct smtps_destination *good,
		         const struct smtps_destination *refused, long first,
		         long n, long *by_status)
{
    struct smtps_result *r;
    struct smtps_message *m;
    struct timespec t0, t1;
    long    i, got = 0;

    for (i = 0; i < n; i++) {
	if ((m = message(0)) == NULL)
	    return fail("message");
	if (smtps_engine_submit(e, m, (first + i) % 13 == 0 ? refused : good,
				(uint64_t) (first + i)) != SMTPS_OK) {
	    smtps_message_free(m);
	    return fail("submit");
	}
    }
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (got < n) {
	if (smtps_engine_run(e, 200) < 0)
	    return fail("smtps_engine_run");
	while ((r = smtps_engine_next_result(e)) != NULL) {
	    got++;
	    if (r->status >= 1 && r->status <= 4)
		by_status[r->status]++;
	    smtps_result_free(r);
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	if (t1.tv_sec - t0.tv_sec > 120)
	    return fail("%ld of %ld results after 120 s", got, n);
    }
    /*
     * smtps_engine_run() returns once nothing is pending, so connections
     * still saying QUIT stay until a later run (or smtps_engine_free()).
     */
    return smtps_engine_pending(e) == 0 ? 1 :
	fail("pending %zu", smtps_engine_pending(e));
}

/*
 * test_engine - 10,000 connections: memory does not grow from batch to
 * batch, and freeing an engine gives everything back
 */
static int test_engine(void)
{
    struct smtps_engine_config cfg;
    struct smtps_destination good, refused;
    struct smtps_engine *e = NULL;
    struct server srv;
    long    before, now_used, freed = 0, done, by_status[5] = {0};
    double  mem[MAX_BATCHES], open[MAX_BATCHES], mx, my, sxx, sxy, slope, r,
            worst = 0;
    int     ok = 0, started, k, batches;

    if (!(started = server_start(&srv)))
	return 0;
    memset(&cfg, 0, sizeof(cfg));
    cfg.sizeof_config = sizeof(cfg);
    cfg.max_connections = 32;
    cfg.max_per_destination = 32;
    cfg.messages_per_connection = 1;
    memset(&good, 0, sizeof(good));
    good.sizeof_destination = sizeof(good);
    good.host = "127.0.0.1";
    good.port = srv.port;
    good.timeout_ms = 30000;
    refused = good;
    refused.port = closed_port();

    /* Warm-up: one-time allocations (OpenSSL, epoll, the timer heap). */
    CHECK((e = smtps_engine_new(NULL, &cfg, NULL)) != NULL);
    CHECK(batch(e, &good, &refused, 1, 100, by_status));
    smtps_engine_free(e);
    e = NULL;
    before = in_use();

    /* An engine per batch: each one freed gives back every byte. */
    for (done = 0; done < n_engine; done += 500) {
	CHECK((e = smtps_engine_new(NULL, &cfg, NULL)) != NULL);
	CHECK(batch(e, &good, &refused, 1000 + done, 500, by_status));
	smtps_engine_free(e);
	e = NULL;
	now_used = in_use() - before;
	if (now_used > freed)
	    freed = now_used;
	CHECK(now_used <= SLACK);
    }

    /*
     * One engine for every batch. smtps_engine_run() returns once nothing
     * is pending, so connections may still be saying QUIT when a batch
     * ends, each holding its buffers. So the count after batch k must be
     * a + b * open_k for one a and b (a least-squares line through the
     * points): memory that grows with the connections made, not open,
     * leaves the line.
     */
    CHECK((e = smtps_engine_new(NULL, &cfg, NULL)) != NULL);
    batches = (int) (n_engine / 500);
    CHECK(batches >= 2 && batches <= MAX_BATCHES);
    for (k = 0; k < batches; k++) {
	CHECK(batch(e, &good, &refused, 1000000 + 500L * k, 500, by_status));
	mem[k] = (double) (in_use() - before);
	open[k] = (double) smtps_engine_connections(e);
	if (getenv("LEAKS_VERBOSE"))
	    printf("batch %d: %+.0f bytes, %.0f connections open\n", k, mem[k],
		   open[k]);
    }
    for (k = 0, mx = my = 0; k < batches; k++) {
	mx += open[k] / batches;
	my += mem[k] / batches;
    }
    for (k = 0, sxx = sxy = 0; k < batches; k++) {
	sxx += (open[k] - mx) * (open[k] - mx);
	sxy += (open[k] - mx) * (mem[k] - my);
    }
    slope = sxx > 0 ? sxy / sxx : 0;
    for (k = 0, worst = 0; k < batches; k++) {
	r = mem[k] - (my + slope * (open[k] - mx));
	if (r < 0)
	    r = -r;
	if (r > worst)
	    worst = r;
    }
    smtps_engine_free(e);
    e = NULL;
    now_used = in_use() - before;
    printf("memory: engine: %ld connections (%ld delivered, %ld tempfail, "
	   "%ld permfail, %ld unknown); %ld engines of 500, each freed: at "
	   "most %+ld bytes against the baseline; one engine for %d batches: "
	   "%+.0f bytes + %.0f per connection still open, within %.0f bytes; "
	   "freed: %+ld\n", 2 * n_engine + 100, by_status[1], by_status[2],
	   by_status[3], by_status[4], n_engine / 500, freed, batches,
	   my - slope * mx, slope, worst, now_used);
    CHECK(worst <= SLACK);
    CHECK(now_used <= SLACK);
    CHECK(by_status[1] > 0 && by_status[2] > 0 && by_status[4] > 0);
    ok = 1;
out:
    smtps_engine_free(e);
    if (started)
	server_stop(&srv);
    return ok;
}

int     main(int argc, char **argv)
{
    static const struct {
	const char *label;
	int     (*fn) (void);
    }       tests[] = {
	{"sessions: memory back to the baseline", test_sessions},
	{"idle: a session keeps no buffer between messages", test_idle},
	{"engine: memory back to the baseline", test_engine},
    };
    size_t  i;
    int     passed = 0, failed = 0;

    if (argc > 1)
	n_sessions = atol(argv[1]);
    if (argc > 2)
	n_engine = atol(argv[2]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (i = 0; i < sizeof(tests) / sizeof(tests[0]); i++) {
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
    return failed ? 1 : 0;
}
