/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	unique_sink 1
 * SUMMARY
 *	an SMTP sink that puts a new queue id in every reply to a message
 * SYNOPSIS
 *	unique_sink [same] [max-connections]
 * DESCRIPTION
 *	Listens on 127.0.0.1, on a port the kernel picks, prints that port
 *	on a line of its own on stdout, and answers SMTP on every
 *	connection as a Postfix smtpd that discards the mail would: EHLO
 *	offers PIPELINING, 8BITMIME and ENHANCEDSTATUSCODES (no CHUNKING,
 *	as smtp-sink), MAIL gets "250 2.1.0 Ok", RCPT "250 2.1.5 Ok", DATA
 *	"354 End data with <CR><LF>.<CR><LF>", and the end of the data
 *	"250 2.0.0 Ok: queued as " and a queue id that no other message
 *	of the run gets (a counter, in ten hexadecimal digits).
 *
 *	Why it exists: smtp-sink gives every message the same reply text,
 *	which the client's result collector (csrc/batch.c) finds in its
 *	reply cache every time; Postfix and most MTAs put a queue id in
 *	the reply to the data, and a client measured only against
 *	smtp-sink never pays for a reply it has not seen before. With
 *	"same", every message gets the queue id 0000000000: the same
 *	program and replies of the same length, so that a run against
 *	each measures what the unique replies alone cost the client.
 *
 *	One process, one thread, non-blocking sockets and level-triggered
 *	epoll. Memory is bounded: per connection, one input buffer
 *	(IN_MAX bytes; a command line that does not fit ends the
 *	connection) and one reply buffer (OUT_MAX bytes; when it could not
 *	take the longest reply, commands wait in the input buffer and
 *	nothing more is read until it has drained). Message content is
 *	scanned for its end and dropped, never kept. Connections beyond
 *	max-connections (default 20000) get a 421 and are closed.
 *
 *	SIGTERM or SIGINT, read through a signalfd (no handler, no global
 *	flag), ends it; it then prints "messages N" (messages whose end
 *	of data it answered) on stdout.
 * DIAGNOSTICS
 *	Exit status 1 when it cannot listen or set up epoll; 0 after a
 *	signal.
 * SEE ALSO
 *	benchmarks/run.py (builds and starts it), csrc/batch.c (the reply
 *	cache).
 *--*/

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#define IN_MAX		16384		/* bytes read ahead per connection */
#define OUT_MAX		4096		/* replies queued per connection */
#define REPLY_MAX	128		/* the longest reply (EHLO's) fits */
#define EVENTS_MAX	256		/* epoll events per wait */

/*
 * Where the end of data "\r\n.\r\n" has got to, carried from one read to
 * the next: the dot that ends the data can arrive in another read than
 * the line end before it.
 */
enum data_pos {
    DATA_MID,				/* inside a line */
    DATA_CR,				/* after CR */
    DATA_BOL,				/* after CRLF: a line begins */
    DATA_DOT,				/* after CRLF "." */
    DATA_DOT_CR,			/* after CRLF "." CR */
};

struct conn {
    int     fd;
    uint32_t events;			/* what epoll watches now */
    int     in_data;			/* between 354 and the end of data */
    enum data_pos pos;			/* in the data: see above */
    int     quit;			/* 221 queued: close once it is sent */
    int     stalled;			/* input left for want of reply room */
    size_t  in_len;
    size_t  out_len;
    char    in[IN_MAX];
    char    out[OUT_MAX];
    struct conn *prev, *next;		/* every open connection, to free */
};

struct sink {
    int     epfd;
    int     listen_fd;
    int     sig_fd;
    int     same;			/* every message gets queue id 0 */
    long    max_conns;
    long    nconns;
    unsigned long long messages;	/* ends of data answered */
    struct conn *conns;
};

static int sink_listen(struct sink *s);
static void sink_accept(struct sink *s);
static void conn_close(struct sink *s, struct conn *c);
static int conn_event(struct sink *s, struct conn *c, uint32_t ev);
static int conn_process(struct sink *s, struct conn *c);
static void conn_command(struct sink *s, struct conn *c, const char *line, size_t len);
static size_t conn_data(struct conn *c, const char *p, size_t len);
static void conn_reply(struct conn *c, const char *text, size_t len);
static int conn_flush(struct conn *c);
static int conn_want(struct sink *s, struct conn *c, uint32_t events);

/* sink_listen - listen on 127.0.0.1, a port of the kernel's choice; print it */

static int sink_listen(struct sink *s)
{
    struct sockaddr_in sa;
    socklen_t sl = sizeof(sa);
    int     one = 1;

    s->listen_fd = socket(AF_INET, SOCK_STREAM, 0);
    if (s->listen_fd < 0)
	return -1;
    setsockopt(s->listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(s->listen_fd, (struct sockaddr *) &sa, sizeof(sa)) < 0
	|| listen(s->listen_fd, 4096) < 0
	|| getsockname(s->listen_fd, (struct sockaddr *) &sa, &sl) < 0
	|| fcntl(s->listen_fd, F_SETFL, O_NONBLOCK) < 0)
	return -1;
    printf("%u\n", (unsigned) ntohs(sa.sin_port));
    fflush(stdout);
    return 0;
}

/* sink_accept - take every pending connection and greet it */

static void sink_accept(struct sink *s)
{
    static const char greeting[] = "220 sink.test ESMTP unique_sink\r\n";
    static const char busy[] = "421 4.3.2 Too many connections\r\n";
    struct epoll_event ev;
    struct conn *c;
    int     fd;
    int     one = 1;

    while ((fd = accept(s->listen_fd, NULL, NULL)) >= 0) {
	if (s->nconns >= s->max_conns
	    || fcntl(fd, F_SETFL, O_NONBLOCK) < 0
	    || (c = calloc(1, sizeof(*c))) == NULL) {
	    /* Best effort: the socket is new, its buffer takes 33 bytes. */
	    (void) send(fd, busy, sizeof(busy) - 1, MSG_NOSIGNAL | MSG_DONTWAIT);
	    close(fd);
	    continue;
	}
	/*
	 * Replies are written once per batch of commands; with Nagle on, a
	 * reply written while the previous one is unacknowledged would
	 * wait for the client's delayed ACK.
	 */
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	c->fd = fd;
	c->events = EPOLLIN;
	memset(&ev, 0, sizeof(ev));
	ev.events = EPOLLIN;
	ev.data.ptr = c;
	if (epoll_ctl(s->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
	    close(fd);
	    free(c);
	    continue;
	}
	c->next = s->conns;
	if (s->conns)
	    s->conns->prev = c;
	s->conns = c;
	s->nconns++;
	conn_reply(c, greeting, sizeof(greeting) - 1);
	if (conn_flush(c) < 0 || (c->out_len > 0 && conn_want(s, c, EPOLLOUT) < 0))
	    conn_close(s, c);
    }
}

/* conn_close - forget a connection */

static void conn_close(struct sink *s, struct conn *c)
{
    close(c->fd);				/* also leaves the epoll set */
    if (c->prev)
	c->prev->next = c->next;
    else
	s->conns = c->next;
    if (c->next)
	c->next->prev = c->prev;
    s->nconns--;
    free(c);
}

/* conn_want - make epoll watch the connection for these events */

static int conn_want(struct sink *s, struct conn *c, uint32_t events)
{
    struct epoll_event ev;

    if (c->events == events)
	return 0;
    memset(&ev, 0, sizeof(ev));
    ev.events = events;
    ev.data.ptr = c;
    if (epoll_ctl(s->epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0)
	return -1;
    c->events = events;
    return 0;
}

/* conn_event - read what came, answer it, send; -1: close the connection */

static int conn_event(struct sink *s, struct conn *c, uint32_t ev)
{
    ssize_t n;

    /*
     * Read only while no reply is waiting to go out: a client that does
     * not read its replies must not make us queue more of them.
     */
    if ((ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) && c->out_len == 0) {
	n = read(c->fd, c->in + c->in_len, sizeof(c->in) - c->in_len);
	if (n == 0)
	    return -1;
	if (n < 0)
	    return errno == EAGAIN || errno == EINTR ? 0 : -1;
	c->in_len += (size_t) n;
    }
    for (;;) {
	if (conn_process(s, c) < 0 || conn_flush(c) < 0)
	    return -1;
	if (c->out_len > 0)
	    return conn_want(s, c, EPOLLOUT);
	if (c->quit)
	    return -1;
	if (!c->stalled)
	    break;
    }
    return conn_want(s, c, EPOLLIN);
}

/* conn_process - answer the commands and data in the input buffer */

static int conn_process(struct sink *s, struct conn *c)
{
    char    reply[REPLY_MAX];
    size_t  at = 0;
    const char *nl;
    int     len;

    c->stalled = 0;
    while (at < c->in_len && !c->quit) {
	if (sizeof(c->out) - c->out_len < REPLY_MAX) {
	    c->stalled = 1;
	    break;
	}
	if (c->in_data) {
	    at += conn_data(c, c->in + at, c->in_len - at);
	    if (!c->in_data) {
		/* The reply that makes a client's reply cache miss. */
		s->messages++;
		len = snprintf(reply, sizeof(reply), "250 2.0.0 Ok: queued as %010llX\r\n",
			       s->same ? 0ULL : s->messages);
		conn_reply(c, reply, (size_t) len);
	    }
	    continue;
	}
	nl = memchr(c->in + at, '\n', c->in_len - at);
	if (nl == NULL)
	    break;
	conn_command(s, c, c->in + at, (size_t) (nl - (c->in + at)));
	at = (size_t) (nl - c->in) + 1;
    }
    memmove(c->in, c->in + at, c->in_len - at);
    c->in_len -= at;
    /* A full buffer without a line end: a command line we cannot hold. */
    if (!c->stalled && !c->in_data && c->in_len == sizeof(c->in))
	return -1;
    return 0;
}

/* conn_command - answer one command line (without its LF) */

static void conn_command(struct sink *s, struct conn *c, const char *line, size_t len)
{
#define REPLY(text) conn_reply(c, (text), sizeof(text) - 1)
    (void) s;
    if (len < 4) {
	REPLY("500 5.5.2 Error: bad syntax\r\n");
    } else if (strncasecmp(line, "EHLO", 4) == 0) {
	REPLY("250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
	      "250 ENHANCEDSTATUSCODES\r\n");
    } else if (strncasecmp(line, "HELO", 4) == 0) {
	REPLY("250 sink.test\r\n");
    } else if (strncasecmp(line, "MAIL", 4) == 0) {
	REPLY("250 2.1.0 Ok\r\n");
    } else if (strncasecmp(line, "RCPT", 4) == 0) {
	REPLY("250 2.1.5 Ok\r\n");
    } else if (strncasecmp(line, "DATA", 4) == 0) {
	REPLY("354 End data with <CR><LF>.<CR><LF>\r\n");
	c->in_data = 1;
	c->pos = DATA_BOL;			/* "." alone on the first line ends it */
    } else if (strncasecmp(line, "RSET", 4) == 0 || strncasecmp(line, "NOOP", 4) == 0) {
	REPLY("250 2.0.0 Ok\r\n");
    } else if (strncasecmp(line, "QUIT", 4) == 0) {
	REPLY("221 2.0.0 Bye\r\n");
	c->quit = 1;
    } else {
	REPLY("502 5.5.2 Error: command not recognized\r\n");
    }
#undef REPLY
}

/* conn_data - skip message content up to its end; return bytes consumed */

static size_t conn_data(struct conn *c, const char *p, size_t len)
{
    size_t  i;
    const char *cr;

    for (i = 0; i < len; i++) {
	/* Inside a line, nothing matters until the next CR. */
	if (c->pos == DATA_MID) {
	    cr = memchr(p + i, '\r', len - i);
	    if (cr == NULL)
		return len;
	    i = (size_t) (cr - p);
	}
	switch (p[i]) {
	case '\r':
	    c->pos = c->pos == DATA_DOT ? DATA_DOT_CR : DATA_CR;
	    break;
	case '\n':
	    if (c->pos == DATA_DOT_CR) {
		c->in_data = 0;
		return i + 1;
	    }
	    c->pos = c->pos == DATA_CR ? DATA_BOL : DATA_MID;
	    break;
	case '.':
	    c->pos = c->pos == DATA_BOL ? DATA_DOT : DATA_MID;
	    break;
	default:
	    c->pos = DATA_MID;
	    break;
	}
    }
    return len;
}

/* conn_reply - queue a reply; the caller made sure it fits */

static void conn_reply(struct conn *c, const char *text, size_t len)
{
    if (len > sizeof(c->out) - c->out_len)
	abort();				/* our own bug: room is checked first */
    memcpy(c->out + c->out_len, text, len);
    c->out_len += len;
}

/* conn_flush - send queued replies as far as the socket takes them */

static int conn_flush(struct conn *c)
{
    ssize_t n;

    while (c->out_len > 0) {
	n = send(c->fd, c->out, c->out_len, MSG_NOSIGNAL);
	if (n < 0)
	    return errno == EAGAIN || errno == EINTR ? 0 : -1;
	memmove(c->out, c->out + n, c->out_len - (size_t) n);
	c->out_len -= (size_t) n;
    }
    return 0;
}

int     main(int argc, char **argv)
{
    struct sink sink;
    struct epoll_event ev, events[EVENTS_MAX];
    sigset_t mask;
    int     i, n, running = 1;

    memset(&sink, 0, sizeof(sink));
    sink.max_conns = 20000;
    for (i = 1; i < argc; i++) {
	if (strcmp(argv[i], "same") == 0)
	    sink.same = 1;
	else if ((sink.max_conns = atol(argv[i])) < 1) {
	    fprintf(stderr, "usage: unique_sink [same] [max-connections]\n");
	    return 1;
	}
    }
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0
	|| (sink.sig_fd = signalfd(-1, &mask, 0)) < 0
	|| (sink.epfd = epoll_create1(0)) < 0 || sink_listen(&sink) < 0) {
	perror("unique_sink");
	return 1;
    }
    /* The two descriptors of the sink itself are told apart by address. */
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN;
    ev.data.ptr = &sink.listen_fd;
    if (epoll_ctl(sink.epfd, EPOLL_CTL_ADD, sink.listen_fd, &ev) < 0) {
	perror("unique_sink: epoll_ctl");
	return 1;
    }
    ev.data.ptr = &sink.sig_fd;
    if (epoll_ctl(sink.epfd, EPOLL_CTL_ADD, sink.sig_fd, &ev) < 0) {
	perror("unique_sink: epoll_ctl");
	return 1;
    }
    while (running) {
	n = epoll_wait(sink.epfd, events, EVENTS_MAX, -1);
	if (n < 0 && errno != EINTR) {
	    perror("unique_sink: epoll_wait");
	    break;
	}
	for (i = 0; i < n; i++) {
	    if (events[i].data.ptr == &sink.listen_fd)
		sink_accept(&sink);
	    else if (events[i].data.ptr == &sink.sig_fd)
		running = 0;
	    else if (conn_event(&sink, events[i].data.ptr, events[i].events) < 0)
		conn_close(&sink, events[i].data.ptr);
	}
    }
    while (sink.conns)
	conn_close(&sink, sink.conns);
    close(sink.listen_fd);
    close(sink.sig_fd);
    close(sink.epfd);
    printf("messages %llu\n", sink.messages);
    return 0;
}
