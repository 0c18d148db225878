/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	engine_load 1
 * SUMMARY
 *	the C engine driven from C: the floor under the Python Engine
 * SYNOPSIS
 *	engine_load host port messages concurrency message-file [idle]
 *		[tls=CA_FILE]
 * DESCRIPTION
 *	Submits messages copies of the content in message-file (one
 *	sender, one recipient, as benchmarks/run.py sends everywhere) to
 *	host:port through one smtps_engine with max_connections and
 *	max_per_destination equal to concurrency, runs the loop until
 *	every result is in, and prints the wall time and the CPU time of
 *	this process (user and system) as RESULT lines. Building each C
 *	message (copying the content) is part of the measured work, as it
 *	is for the Python Engine.
 *
 *	With idle, the engine keeps its connections open (a long idle
 *	timeout) and the program also prints its resident set size before
 *	the engine was made and after every result was in (rss0_kib,
 *	rss1_kib, KiB from /proc/self/status) and the connections then open.
 *	In idle mode a few undelivered messages (at most 5%: connects lost
 *	to a full accept queue) are reported, not fatal. With glibc 2.33 or
 *	later it also says where the memory is, before and after (KiB):
 *	heap0/heap1_kib, bytes in use in the heap (mallinfo2() uordblks);
 *	free0/free1_kib, free bytes the heap holds (fordblks: what the
 *	allocator cannot return to the system); ossl0/ossl1_kib, bytes in
 *	use that OpenSSL allocated (counted through
 *	CRYPTO_set_mem_functions(), with malloc_usable_size()).
 *	With tls=CA_FILE, every connection uses STARTTLS, verifying the
 *	server against CA_FILE with the name 127.0.0.1.
 * DIAGNOSTICS
 *	Exit status 1 when a message is not delivered.
 * SEE ALSO
 *	benchmarks/run.py, csrc/engine.c.
 *--*/

#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#if defined(__GLIBC__) && (__GLIBC__ > 2 || __GLIBC_MINOR__ >= 33)
#define HAVE_MALLINFO2 1
#include <malloc.h>
#include <openssl/crypto.h>
#endif

#include "smtpstate.h"
#include "bench.h"

static const char sender[] = "bench@client.test";
static const char rcpt[] = "sink@example.test";

/* rusage_cpu - user and system seconds of this process */

static double rusage_cpu(void)
{
    struct rusage ru;

    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6
	+ ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

/* rss_kib - VmRSS of this process, KiB */

static long rss_kib(void)
{
    FILE   *f = fopen("/proc/self/status", "r");
    char    line[256];
    long    kib = 0;

    if (f == NULL)
	return 0;
    while (fgets(line, sizeof(line), f) != NULL)
	if (strncmp(line, "VmRSS:", 6) == 0)
	    kib = atol(line + 6);
    fclose(f);
    return kib;
}

#ifdef HAVE_MALLINFO2

/*
 * OpenSSL's allocations go through these (set before its first), so that
 * what it holds can be told from what smtpstate holds.
 */
static size_t ossl_bytes;

/* ossl_malloc - malloc, counted */

static void *ossl_malloc(size_t n, const char *file, int line)
{
    void   *p = malloc(n);

    (void) file;
    (void) line;
    if (p != NULL)
	ossl_bytes += malloc_usable_size(p);
    return p;
}

/* ossl_realloc - realloc, counted */

static void *ossl_realloc(void *p, size_t n, const char *file, int line)
{
    size_t  old = p != NULL ? malloc_usable_size(p) : 0;
    void   *q = realloc(p, n);

    (void) file;
    (void) line;
    if (q != NULL)
	ossl_bytes = ossl_bytes - old + malloc_usable_size(q);
    else if (n == 0)				/* freed */
	ossl_bytes -= old;
    return q;
}

/* ossl_free - free, counted */

static void ossl_free(void *p, const char *file, int line)
{
    (void) file;
    (void) line;
    if (p != NULL)
	ossl_bytes -= malloc_usable_size(p);
    free(p);
}

/* heap_report - where the memory is now: in use, free, OpenSSL's */

static void heap_report(const char *when)
{
    struct mallinfo2 mi = mallinfo2();
    char    name[32];

    snprintf(name, sizeof(name), "heap%s_kib", when);
    bench_report(name, mi.uordblks / 1024.0, "KiB");
    snprintf(name, sizeof(name), "free%s_kib", when);
    bench_report(name, mi.fordblks / 1024.0, "KiB");
    snprintf(name, sizeof(name), "ossl%s_kib", when);
    bench_report(name, ossl_bytes / 1024.0, "KiB");
}

#endif

/* read_file - the whole file, or die */

static char *read_file(const char *path, size_t *len)
{
    FILE   *f = fopen(path, "rb");
    char   *buf = malloc(1 << 20);

    if (f == NULL || buf == NULL) {
	perror(path);
	exit(2);
    }
    *len = fread(buf, 1, 1 << 20, f);
    fclose(f);
    return buf;
}

int     main(int argc, char **argv)
{
    struct smtps_engine_config cfg = {0};
    struct smtps_destination d = {0};
    struct smtps_engine *e;
    struct smtps_message *m;
    struct smtps_result *r;
    long    n, i, bad = 0, got = 0;
    int     conc, rc, idle = 0, a;
    struct smtps_tls_config *tls = NULL;
    long    rss0 = 0;
    size_t  len;
    char   *data;
    double  t0, c0;

#ifdef HAVE_MALLINFO2
    (void) CRYPTO_set_mem_functions(ossl_malloc, ossl_realloc, ossl_free);
#endif
    if (argc < 6) {
	fprintf(stderr, "usage: %s host port messages concurrency message-file"
		" [idle] [tls=CA_FILE]\n", argv[0]);
	return 2;
    }
    for (a = 6; a < argc; a++) {
	if (strcmp(argv[a], "idle") == 0)
	    idle = 1;
	else if (strncmp(argv[a], "tls=", 4) == 0
		 && (tls = smtps_tls_config_new(argv[a] + 4, 0)) == NULL) {
	    fprintf(stderr, "engine_load: cannot load %s\n", argv[a] + 4);
	    return 2;
	}
    }
    n = atol(argv[3]);
    conc = atoi(argv[4]);
    data = read_file(argv[5], &len);
    cfg.sizeof_config = sizeof(cfg);
    cfg.max_connections = conc;
    cfg.max_per_destination = conc;
    cfg.idle_timeout_ms = 600000;
    cfg.connect_timeout_ms = 120000;
    cfg.helo = "client.test";
    d.sizeof_destination = sizeof(d);
    d.host = argv[1];
    d.port = atoi(argv[2]);
    d.timeout_ms = 60000;
    if (tls != NULL) {
	d.tls_mode = SMTPS_TLS_STARTTLS;
	d.tls = tls;
	d.tls_servername = "127.0.0.1";
    }
    rss0 = rss_kib();
#ifdef HAVE_MALLINFO2
    if (idle)
	heap_report("0");
#endif

    t0 = bench_now();
    c0 = rusage_cpu();
    if ((e = smtps_engine_new(NULL, &cfg, NULL)) == NULL)
	return 2;
    for (i = 0; i < n; i++) {
	if ((m = smtps_message_new()) == NULL
	    || smtps_message_set_sender(m, sender, strlen(sender)) != SMTPS_OK
	    || smtps_message_add_recipient(m, rcpt, strlen(rcpt), 0, NULL, 0) != SMTPS_OK
	    || smtps_message_set_body(m, data, len) != SMTPS_OK
	    || smtps_engine_submit(e, m, &d, (uint64_t) i + 1) != SMTPS_OK) {
	    fprintf(stderr, "engine_load: cannot submit\n");
	    return 2;
	}
    }
    while (got < n) {
	if ((rc = smtps_engine_run(e, 1000)) < 0) {
	    fprintf(stderr, "engine_load: %s\n", smtps_strerror(rc));
	    return 2;
	}
	while ((r = smtps_engine_next_result(e)) != NULL) {
	    if (r->status != SMTPS_STATUS_DELIVERED && bad++ == 0)
		fprintf(stderr, "engine_load: %s\n", r->reason);
	    got++;
	    smtps_result_free(r);
	}
    }
    bench_report("wall_s", bench_now() - t0, "s");
    bench_report("cpu_s", rusage_cpu() - c0, "s");
    if (idle) {
	bench_report("rss0_kib", (double) rss0, "KiB");
	bench_report("rss1_kib", (double) rss_kib(), "KiB");
#ifdef HAVE_MALLINFO2
	heap_report("1");
#endif
	bench_report("connections", (double) smtps_engine_connections(e), "");
	bench_report("undelivered", (double) bad, "");
	/* A few lost to an overflowing accept queue only cost their time. */
	if (bad <= n / 20)
	    bad = 0;
    }
    smtps_engine_free(e);
    smtps_tls_config_free(tls);
    free(data);
    return bad ? 1 : 0;
}
