/*
 * connect() latency probe for bench/datapath_bench.py (built with gcc at bench time).
 *
 *   connect_lat server PORT
 *       accept and close connections on 0.0.0.0:PORT until killed; pinned to
 *       PROBE_CPU if set. With PROBE_SERVER_SPIN set, the listener is
 *       non-blocking and polled in a loop: the server never sleeps in accept(),
 *       so no client connect() pays for waking it up (a cross-CPU wakeup done in
 *       the softirq that completes the handshake, ~7 us here; see
 *       bench/churn_bench.py for why that matters).
 *   connect_lat client ITERATIONS WARMUP CPU PORT:IP,IP... [PORT:IP,IP...]
 *       pinned to CPU (-1: not pinned), connect to each group's addresses
 *       round-robin, groups taking turns; time only the connect() call with
 *       CLOCK_MONOTONIC; print one line per group:
 *       "n failed min p50 p90 p99 mean" in nanoseconds.
 *   connect_lat churn COUNT CPU PORT:IP,IP...
 *       COUNT sockets through the addresses round-robin, untimed one by one;
 *       prints "n failed elapsed_ns".
 *
 * PROBE_STYLE picks the socket and what is timed:
 *   rst   (default) TCP connect(), closed with SO_LINGER 0 (RST): no TIME_WAIT
 *         piles up, so the ephemeral ports never run out;
 *   fin   TCP connect(), closed with a FIN (run with tcp_tw_reuse and a wide
 *         port range in the namespace);
 *   udp   UDP connect() (connected UDP), then close;
 *   dgram one sendto() of a byte on an unconnected UDP socket, then close
 *         (the DNS-client pattern: one socket per query).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <sched.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return (x > y) - (x < y);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int server(int port)
{
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
	int one = 1, fd = socket(AF_INET, SOCK_STREAM, 0);

	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) || listen(fd, 4096)) {
		perror("server");
		return 1;
	}
	if (getenv("PROBE_CPU")) {
		cpu_set_t set;
		CPU_ZERO(&set);
		CPU_SET(atoi(getenv("PROBE_CPU")), &set);
		sched_setaffinity(0, sizeof(set), &set);
	}
	printf("ready\n");
	fflush(stdout);
	if (getenv("PROBE_SERVER_SPIN")) {
		/* Busy-poll a non-blocking listener: the server never sleeps in
		 * accept(), so no client connect() ever pays for waking it up. */
		int flags = fcntl(fd, F_GETFL);

		fcntl(fd, F_SETFL, flags | O_NONBLOCK);
	}
	for (;;) {
		int c = accept(fd, NULL, NULL);
		if (c >= 0)
			close(c);
	}
}

struct group {
	struct sockaddr_in *targets;
	int ntargets;
	uint64_t *samples;
	long n, failed;
	double sum;
};

enum style { STYLE_RST, STYLE_FIN, STYLE_UDP, STYLE_DGRAM };

static enum style probe_style(void)
{
	const char *s = getenv("PROBE_STYLE");

	if (!s || !strcmp(s, "rst"))
		return STYLE_RST;
	if (!strcmp(s, "fin"))
		return STYLE_FIN;
	if (!strcmp(s, "udp"))
		return STYLE_UDP;
	if (!strcmp(s, "dgram"))
		return STYLE_DGRAM;
	fprintf(stderr, "PROBE_STYLE must be rst, fin, udp or dgram\n");
	exit(2);
}

/*
 * One socket of the given style to target: returns the nanoseconds of the
 * timed call (connect, or sendto for dgram) and sets *rc to its result.
 */
static uint64_t one(enum style style, const struct sockaddr_in *target, int *rc)
{
	static const struct linger rst = {.l_onoff = 1, .l_linger = 0};
	int tcp = style == STYLE_RST || style == STYLE_FIN;
	int fd = socket(AF_INET, tcp ? SOCK_STREAM : SOCK_DGRAM, 0);
	uint64_t t0, t1;

	if (style == STYLE_RST)
		setsockopt(fd, SOL_SOCKET, SO_LINGER, &rst, sizeof(rst));
	t0 = now_ns();
	if (style == STYLE_DGRAM)
		*rc = sendto(fd, "x", 1, 0, (const struct sockaddr *)target, sizeof(*target)) == 1 ? 0 : -1;
	else
		*rc = connect(fd, (const struct sockaddr *)target, sizeof(*target));
	t1 = now_ns();
	close(fd);
	return t1 - t0;
}

static void pin(int cpu)
{
	if (cpu >= 0) {
		cpu_set_t set;
		CPU_ZERO(&set);
		CPU_SET(cpu, &set);
		sched_setaffinity(0, sizeof(set), &set);
	}
}

/* "PORT:IP,IP,..." */
static int parse_group(char *spec, struct group *g, long iterations)
{
	char *colon = strchr(spec, ':'), *ip, *save = NULL;
	int port, cap = 1;

	if (!colon)
		return -1;
	*colon = 0;
	port = atoi(spec);
	for (char *p = colon + 1; *p; p++)
		cap += *p == ',';
	g->targets = calloc(cap, sizeof(*g->targets));
	g->samples = calloc(iterations, sizeof(*g->samples));
	for (ip = strtok_r(colon + 1, ",", &save); ip; ip = strtok_r(NULL, ",", &save)) {
		struct sockaddr_in *t = &g->targets[g->ntargets++];
		t->sin_family = AF_INET;
		t->sin_port = htons(port);
		if (inet_pton(AF_INET, ip, &t->sin_addr) != 1)
			return -1;
	}
	return g->ntargets ? 0 : -1;
}

/*
 * Groups take turns connect by connect, so CPU frequency, interrupts and
 * whatever else drifts during a run weighs on every group alike: the
 * difference of their medians is the cost of what differs between them.
 */
static int client(long iterations, long warmup, int cpu, int ngroups, char **specs)
{
	struct group *groups = calloc(ngroups, sizeof(*groups));
	enum style style = probe_style();

	pin(cpu);
	for (int g = 0; g < ngroups; g++) {
		if (parse_group(specs[g], &groups[g], iterations)) {
			fprintf(stderr, "bad group %s (want PORT:IP,IP...)\n", specs[g]);
			return 2;
		}
	}
	for (long i = 0; i < warmup + iterations; i++) {
		for (int g = 0; g < ngroups; g++) {
			struct group *grp = &groups[g];
			int rc;
			uint64_t took = one(style, &grp->targets[i % grp->ntargets], &rc);

			if (i < warmup)
				continue;
			if (rc) {
				grp->failed++;
				continue;
			}
			grp->samples[grp->n++] = took;
			grp->sum += (double)took;
		}
	}
	for (int g = 0; g < ngroups; g++) {
		struct group *grp = &groups[g];
		long n = grp->n;

		if (n == 0) {
			printf("0 %ld 0 0 0 0 0\n", grp->failed);
			continue;
		}
		qsort(grp->samples, n, sizeof(*grp->samples), cmp_u64);
		printf("%ld %ld %llu %llu %llu %llu %.0f\n", n, grp->failed, (unsigned long long)grp->samples[0],
		       (unsigned long long)grp->samples[n / 2], (unsigned long long)grp->samples[n * 9 / 10],
		       (unsigned long long)grp->samples[n * 99 / 100], grp->sum / n);
	}
	return 0;
}

static int churn(long count, int cpu, char *spec)
{
	struct group g = {0};
	enum style style = probe_style();
	long failed = 0;
	uint64_t t0;

	pin(cpu);
	if (parse_group(spec, &g, 1)) {
		fprintf(stderr, "bad group %s (want PORT:IP,IP...)\n", spec);
		return 2;
	}
	t0 = now_ns();
	for (long i = 0; i < count; i++) {
		int rc;

		one(style, &g.targets[i % g.ntargets], &rc);
		failed += rc != 0;
	}
	printf("%ld %ld %llu\n", count, failed, (unsigned long long)(now_ns() - t0));
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "server"))
		return server(atoi(argv[2]));
	if (argc >= 6 && !strcmp(argv[1], "client"))
		return client(atol(argv[2]), atol(argv[3]), atoi(argv[4]), argc - 5, argv + 5);
	if (argc == 5 && !strcmp(argv[1], "churn"))
		return churn(atol(argv[2]), atoi(argv[3]), argv[4]);
	fprintf(stderr,
		"usage: %s server PORT | client ITERATIONS WARMUP CPU PORT:IP,IP... [PORT:IP,...] | "
		"churn COUNT CPU PORT:IP,IP...\n",
		argv[0]);
	return 2;
}
