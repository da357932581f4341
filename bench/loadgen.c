/* Load generator and echo/sink app of bench/compare.py, one small C program for every path.
 *
 * Compiled at run time by bench/loadgen.py (gcc -O2 -pthread). C, not Python: the point
 * is that the client and the app cost little next to the proxies they measure, so the
 * proxies' figures are not hidden by load-generator overhead (and the Python generator of
 * bench/loopback.py cannot pace 2000 req/s with µs precision while sharing the 2 vCPUs).
 *
 *   loadgen serve HOST PORT [THREADS]       app: a 1-byte preamble picks S(ink) or E(cho);
 *                                           epoll, SO_REUSEPORT listener per thread
 *   loadgen tput OPTS --mode sink|echo --conns N --seconds T
 *   loadgen rr   OPTS --rate R --conns N --seconds T [--size B] [--warm K] [--report S]
 *                                           (--report: also one JSON line per S seconds with
 *                                           that interval's latencies, for bench/soak.py)
 *   loadgen conn OPTS --workers W --seconds T [--size B]
 *   loadgen hold OPTS --count N --workers W  (prints a line when all are open, closes on stdin EOF)
 *
 * OPTS: --connect H:P (where TCP goes), [--socks-dst H:P] (then a SOCKS5 CONNECT there),
 *       [--src IP] or [--src-rotate A.B.C] (source A.B.C.10 .. .249, port picked at connect).
 * Every client mode prints one JSON line on stdout. Latencies in µs.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define BUF (256 * 1024)

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int parse_hostport(const char *s, struct sockaddr_in *out) {
    char host[64];
    const char *colon = strrchr(s, ':');
    if (!colon || (size_t)(colon - s) >= sizeof host) return -1;
    memcpy(host, s, colon - s);
    host[colon - s] = 0;
    memset(out, 0, sizeof *out);
    out->sin_family = AF_INET;
    out->sin_port = htons((uint16_t)atoi(colon + 1));
    return inet_pton(AF_INET, host, &out->sin_addr) == 1 ? 0 : -1;
}

/* -- options -------------------------------------------------------------------------- */

struct opts {
    struct sockaddr_in connect_to, socks_dst;
    int socks;
    char src[32], src_rotate[32];
    const char *mode;
    int conns, workers, count, size, warm;
    double seconds, rate, report;
};

static struct opts O = {.conns = 1, .workers = 1, .count = 1000, .size = 1024, .warm = 20,
                        .seconds = 5, .rate = 1000, .mode = "sink"};

static void parse_opts(int argc, char **argv) {
    for (int i = 0; i < argc; i++) {
        const char *k = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) { fprintf(stderr, "loadgen: %s needs a value\n", k); exit(2); }
        i++;
        if (!strcmp(k, "--connect")) { if (parse_hostport(v, &O.connect_to)) goto bad; }
        else if (!strcmp(k, "--socks-dst")) { if (parse_hostport(v, &O.socks_dst)) goto bad; O.socks = 1; }
        else if (!strcmp(k, "--src")) snprintf(O.src, sizeof O.src, "%s", v);
        else if (!strcmp(k, "--src-rotate")) snprintf(O.src_rotate, sizeof O.src_rotate, "%s", v);
        else if (!strcmp(k, "--mode")) O.mode = v;
        else if (!strcmp(k, "--conns")) O.conns = atoi(v);
        else if (!strcmp(k, "--workers")) O.workers = atoi(v);
        else if (!strcmp(k, "--count")) O.count = atoi(v);
        else if (!strcmp(k, "--size")) O.size = atoi(v);
        else if (!strcmp(k, "--warm")) O.warm = atoi(v);
        else if (!strcmp(k, "--seconds")) O.seconds = atof(v);
        else if (!strcmp(k, "--rate")) O.rate = atof(v);
        else if (!strcmp(k, "--report")) O.report = atof(v);
        else goto bad;
        continue;
    bad:
        fprintf(stderr, "loadgen: bad option %s %s\n", k, v);
        exit(2);
    }
}

/* -- client connections ---------------------------------------------------------------- */

static atomic_uint rotate_seq;

static int io_all(int fd, void *buf, size_t n, int writing) {
    char *p = buf;
    while (n > 0) {
        ssize_t r = writing ? send(fd, p, n, MSG_NOSIGNAL) : recv(fd, p, n, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) { if (r == 0) errno = ECONNRESET; return -1; }
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

/* A blocking, TCP_NODELAY connection to the path's entry, through SOCKS5 if asked. */
static int open_conn(void) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char src[48] = "";
    if (O.src_rotate[0])
        snprintf(src, sizeof src, "%s.%u", O.src_rotate, 10 + atomic_fetch_add(&rotate_seq, 1) % 240);
    else if (O.src[0])
        snprintf(src, sizeof src, "%s", O.src);
    if (src[0]) {
        /* port chosen at connect() by 4-tuple: thousands of connects/s otherwise run out
           of ports on one (src ip) because of TIME_WAIT */
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        struct sockaddr_in sa = {.sin_family = AF_INET};
        inet_pton(AF_INET, src, &sa.sin_addr);
        if (bind(fd, (struct sockaddr *)&sa, sizeof sa)) goto fail;
    }
    if (connect(fd, (struct sockaddr *)&O.connect_to, sizeof O.connect_to)) goto fail;
    if (O.socks) {
        unsigned char req[10] = {5, 1, 0, 1}, rep[10];
        if (io_all(fd, "\x05\x01\x00", 3, 1) || io_all(fd, rep, 2, 0)) goto fail;
        if (rep[0] != 5 || rep[1] != 0) { errno = EPROTO; goto fail; }
        memcpy(req + 4, &O.socks_dst.sin_addr, 4);
        memcpy(req + 8, &O.socks_dst.sin_port, 2);
        if (io_all(fd, req, 10, 1) || io_all(fd, rep, 10, 0)) goto fail;
        if (rep[1] != 0) { errno = ECONNREFUSED; goto fail; }
    }
    return fd;
fail:;
    int saved = errno;
    close(fd);
    errno = saved;
    return -1;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Nearest-rank percentile of a sorted array (the same rule as bench/stats.py). */
static double pct(const double *v, size_t n, double q) {
    if (!n) return -1;
    size_t rank = (size_t)(q / 100.0 * n + 0.999999999);
    if (rank < 1) rank = 1;
    if (rank > n) rank = n;
    return v[rank - 1];
}

static void print_pcts(const char *name, double *v, size_t n) {
    qsort(v, n, sizeof *v, cmp_double);
    printf("\"%s\": {\"n\": %zu, \"p50\": %.1f, \"p90\": %.1f, \"p99\": %.1f, \"p99.9\": %.1f, "
           "\"max\": %.1f}", name, n, pct(v, n, 50), pct(v, n, 90), pct(v, n, 99), pct(v, n, 99.9),
           n ? v[n - 1] : -1.0);
}

static double self_cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec * 1e-6;
}

/* -- tput: one-way to the sink, or echoed both ways ------------------------------------ */

struct tput_res { double bytes, elapsed; int error; };

static void *tput_sink(void *arg) {
    struct tput_res *r = arg;
    static char chunk[BUF];
    int fd = open_conn();
    if (fd < 0) { r->error = errno; return NULL; }
    double start = now_s(), stop = start + O.seconds;
    long long sent = 0;
    if (io_all(fd, "S", 1, 1)) goto fail;
    while (now_s() < stop) {
        if (io_all(fd, chunk, sizeof chunk, 1)) goto fail;
        sent += sizeof chunk;
    }
    shutdown(fd, SHUT_WR);
    char reply[32] = "";
    size_t got = 0;
    ssize_t n;
    while (got < sizeof reply - 1 && (n = recv(fd, reply + got, sizeof reply - 1 - got, 0)) > 0) got += n;
    r->elapsed = now_s() - start;
    if (atoll(reply) != sent) { errno = EPROTO; goto fail; }
    r->bytes = (double)sent;
    close(fd);
    return NULL;
fail:
    r->error = errno ? errno : EIO;
    close(fd);
    return NULL;
}

/* Echo: keep up to 4 MiB in flight, send and receive in one poll loop; stop sending at the
   deadline and count until every byte came back. Bytes counted once (each way moved it). */
static void *tput_echo(void *arg) {
    struct tput_res *r = arg;
    char *wbuf = calloc(1, BUF), *rbuf = malloc(BUF);
    int fd = open_conn();
    if (fd < 0) { r->error = errno; free(wbuf); free(rbuf); return NULL; }
    long long sent = 0, recvd = 0, window = 4 << 20;
    double start = now_s(), stop = start + O.seconds;
    if (io_all(fd, "E", 1, 1)) goto fail;
    fcntl(fd, F_SETFL, O_NONBLOCK);
    int sending = 1;
    while (sending || recvd < sent) {
        if (sending && now_s() >= stop) sending = 0;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (sending && sent - recvd < window) p.events |= POLLOUT;
        if (poll(&p, 1, 10000) <= 0) { errno = ETIMEDOUT; goto fail; }
        if (p.revents & POLLOUT) {
            size_t want = BUF;
            if ((long long)want > window - (sent - recvd)) want = (size_t)(window - (sent - recvd));
            ssize_t n = send(fd, wbuf, want, MSG_NOSIGNAL);
            if (n > 0) sent += n;
            else if (n < 0 && errno != EAGAIN) goto fail;
        }
        if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t n = recv(fd, rbuf, BUF, 0);
            if (n > 0) recvd += n;
            else if (n == 0) { errno = ECONNRESET; goto fail; }
            else if (errno != EAGAIN) goto fail;
        }
    }
    r->elapsed = now_s() - start;
    r->bytes = (double)recvd;
    close(fd);
    free(wbuf); free(rbuf);
    return NULL;
fail:
    r->error = errno ? errno : EIO;
    close(fd);
    free(wbuf); free(rbuf);
    return NULL;
}

static int cmd_tput(void) {
    int echo = !strcmp(O.mode, "echo");
    pthread_t *t = calloc(O.conns, sizeof *t);
    struct tput_res *r = calloc(O.conns, sizeof *r);
    double cpu0 = self_cpu_s(), t0 = now_s();
    for (int i = 0; i < O.conns; i++) pthread_create(&t[i], NULL, echo ? tput_echo : tput_sink, &r[i]);
    double bytes = 0, elapsed = 0;
    int errors = 0, first_error = 0;
    for (int i = 0; i < O.conns; i++) {
        pthread_join(t[i], NULL);
        if (r[i].error) { errors++; if (!first_error) first_error = r[i].error; continue; }
        bytes += r[i].bytes;
        if (r[i].elapsed > elapsed) elapsed = r[i].elapsed;
    }
    double wall = now_s() - t0;
    printf("{\"mode\": \"%s\", \"conns\": %d, \"bytes\": %.0f, \"seconds\": %.4f, \"gbit_s\": %.4f, "
           "\"errors\": %d, \"error\": \"%s\", \"loadgen_cpu_s\": %.4f, \"wall_s\": %.4f}\n",
           O.mode, O.conns, bytes, elapsed, elapsed > 0 ? bytes * 8 / elapsed / 1e9 : 0.0, errors,
           first_error ? strerror(first_error) : "", self_cpu_s() - cpu0, wall);
    return errors ? 1 : 0;
}

/* -- rr: open-loop 1 KiB request/response ---------------------------------------------- */

/* One interval of an rr run (--report): the responses that arrived in it (lat[from..to)),
   how far sending and receiving got, the worst send lag in it. A copy is sorted so the
   whole run's array stays in arrival order for the next interval. */
static void report_interval(double t, const double *lat, long from, long to, long sent,
                            double max_lag) {
    size_t k = (size_t)(to - from);
    double *v = malloc((k ? k : 1) * sizeof *v);
    memcpy(v, lat + from, k * sizeof *v);
    printf("{\"interval\": true, \"t\": %.3f, \"sent\": %ld, \"done\": %ld, "
           "\"max_send_lag_us\": %.1f, ", t, sent, to, max_lag * 1e6);
    print_pcts("latency_us", v, k);
    printf("}\n");
    fflush(stdout);
    free(v);
}

/* Request i is due at t0 + i/rate on connection i % conns and is sent at its due time (at
   once if the loop is late); its latency runs from the due time, not the actual send, so a
   stall is charged to every request it delays (no coordinated omission). Responses on one
   connection come back in order, so the k-th response of connection c answers request
   k*conns + c. The send lag (actual send - due) shows whether this generator kept up. */
static int cmd_rr(void) {
    int C = O.conns, size = O.size;
    long n = (long)(O.rate * O.seconds);
    if (n < 1) n = 1;
    int *fd = calloc(C, sizeof *fd);
    long *resp = calloc(C, sizeof *resp), *pending = calloc(C, sizeof *pending);
    double *lat = calloc(n, sizeof *lat), *lag = calloc(n, sizeof *lag);
    char *req = malloc(size), *rbuf = malloc(BUF);
    memset(req, 0x42, size);
    for (int c = 0; c < C; c++) {
        if ((fd[c] = open_conn()) < 0) die("connect");
        if (io_all(fd[c], "E", 1, 1)) die("preamble");
        for (int w = 0; w < O.warm; w++)  /* certificates, pools, first-use costs */
            if (io_all(fd[c], req, size, 1) || io_all(fd[c], rbuf, size, 0)) die("warm-up");
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    for (int c = 0; c < C; c++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)c};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd[c], &ev);
    }
    double cpu0 = self_cpu_s();
    double t0 = now_s() + 0.01, interval = 1.0 / O.rate, deadline = t0 + (n - 1) * interval + 10;
    long sent = 0, done = 0, reported = 0;
    double early = 50e-6, next_report = O.report > 0 ? t0 + O.report : 1e300, lag_max = 0;
    while (done < n) {
        double now = now_s();
        if (now > deadline) break;
        if (now >= next_report) {
            report_interval(now - t0, lat, reported, done, sent, lag_max);
            reported = done;
            lag_max = 0;
            next_report += O.report;
        }
        while (sent < n && t0 + sent * interval <= now) {
            int c = (int)(sent % C);
            /* 1 KiB into an idle socket buffer: a blocking send returns at once */
            if (io_all(fd[c], req, size, 1)) die("send");
            lag[sent] = now_s() - (t0 + sent * interval);
            if (lag[sent] > lag_max) lag_max = lag[sent];
            sent++;
        }
        /* Wake-ups overshoot by tens of µs in this VM: sleep until `early` before the next
           due time (a running estimate of the overshoot), then poll without sleeping for
           the rest, so sends go out on time and the spin stays short. */
        double before = now_s();
        double wait = sent < n ? t0 + sent * interval - early - before : deadline - before;
        if (wait < 0) wait = 0;
        struct timespec ts = {(time_t)wait, (long)((wait - (time_t)wait) * 1e9)};
        struct epoll_event evs[64];
        /* epoll_pwait2 takes a timespec (ns); timer slack is 1 ns */
        int k = (int)syscall(441 /* epoll_pwait2 */, ep, evs, 64, &ts, NULL, 0);
        if (k < 0 && errno == ENOSYS) k = epoll_wait(ep, evs, 64, (int)(wait * 1000));
        if (k == 0 && wait > 0 && sent < n) {
            double over = now_s() - before - wait;
            early = 0.9 * early + 0.1 * (over < 0 ? 0 : over > 500e-6 ? 500e-6 : over);
        }
        if (k < 0) { if (errno == EINTR) continue; die("epoll"); }
        for (int e = 0; e < k; e++) {
            int c = (int)evs[e].data.u32;
            ssize_t got = recv(fd[c], rbuf, BUF, MSG_DONTWAIT);
            if (got == 0) { errno = ECONNRESET; die("recv"); }
            if (got < 0) { if (errno == EAGAIN) continue; die("recv"); }
            double at = now_s();
            pending[c] += got;
            while (pending[c] >= size) {
                pending[c] -= size;
                long i = resp[c]++ * C + c;
                lat[done++] = (at - (t0 + i * interval)) * 1e6;
            }
        }
    }
    double end = now_s();
    double cpu = self_cpu_s() - cpu0;
    if (O.report > 0 && done > reported) report_interval(end - t0, lat, reported, done, sent, lag_max);
    for (long i = 0; i < sent; i++) lag[i] *= 1e6;
    printf("{\"rate\": %.1f, \"conns\": %d, \"size\": %d, \"sent\": %ld, \"done\": %ld, \"lost\": %ld, "
           "\"achieved\": %.2f, \"loadgen_cpu_s\": %.4f, \"wall_s\": %.4f, ",
           O.rate, C, size, sent, done, n - done, done / (end - t0), cpu, end - t0);
    print_pcts("latency_us", lat, (size_t)done);
    printf(", ");
    print_pcts("send_lag_us", lag, (size_t)sent);
    printf("}\n");
    for (int c = 0; c < C; c++) close(fd[c]);
    return done == n ? 0 : 1;
}

/* -- conn: new connections, each one request, then close ------------------------------- */

struct conn_res { double *lat; size_t n, cap; long errors; int first_error; };

static void *conn_worker(void *arg) {
    struct conn_res *r = arg;
    char *req = malloc(O.size + 1), *rbuf = malloc(O.size);
    req[0] = 'E';
    memset(req + 1, 0x43, O.size);
    double stop = now_s() + O.seconds;
    while (now_s() < stop) {
        double start = now_s();
        int fd = open_conn();
        if (fd < 0 || io_all(fd, req, O.size + 1, 1) || io_all(fd, rbuf, O.size, 0)) {
            r->errors++;
            if (!r->first_error) r->first_error = errno;
            if (fd >= 0) close(fd);
            usleep(1000);  /* do not spin on a refusing path */
            continue;
        }
        close(fd);
        if (r->n == r->cap) {
            r->cap = r->cap ? r->cap * 2 : 4096;
            r->lat = realloc(r->lat, r->cap * sizeof *r->lat);
        }
        r->lat[r->n++] = (now_s() - start) * 1e6;
    }
    free(req); free(rbuf);
    return NULL;
}

static int cmd_conn(void) {
    pthread_t *t = calloc(O.workers, sizeof *t);
    struct conn_res *r = calloc(O.workers, sizeof *r);
    double cpu0 = self_cpu_s(), t0 = now_s();
    for (int i = 0; i < O.workers; i++) pthread_create(&t[i], NULL, conn_worker, &r[i]);
    size_t total = 0;
    long errors = 0;
    int first_error = 0;
    for (int i = 0; i < O.workers; i++) {
        pthread_join(t[i], NULL);
        total += r[i].n;
        errors += r[i].errors;
        if (!first_error) first_error = r[i].first_error;
    }
    double elapsed = now_s() - t0;
    double *all = malloc((total ? total : 1) * sizeof *all);
    size_t k = 0;
    for (int i = 0; i < O.workers; i++) { memcpy(all + k, r[i].lat, r[i].n * sizeof *all); k += r[i].n; }
    printf("{\"workers\": %d, \"conns\": %zu, \"per_s\": %.2f, \"errors\": %ld, \"error\": \"%s\", "
           "\"loadgen_cpu_s\": %.4f, \"wall_s\": %.4f, ", O.workers, total, total / elapsed, errors,
           first_error ? strerror(first_error) : "", self_cpu_s() - cpu0, elapsed);
    print_pcts("latency_us", all, total);
    printf("}\n");
    return 0;
}

/* -- hold: N open connections (each echoed 16 bytes once), until stdin closes ---------- */

struct hold_res { int *fds; int n, opened, errors, first_error; };

static void *hold_worker(void *arg) {
    struct hold_res *r = arg;
    char msg[17] = "E0123456789abcdef", back[16];
    for (int i = 0; i < r->n; i++) {
        int fd = open_conn();
        if (fd < 0 || io_all(fd, msg, 17, 1) || io_all(fd, back, 16, 0)) {
            r->errors++;
            if (!r->first_error) r->first_error = errno;
            if (fd >= 0) close(fd);
            continue;
        }
        r->fds[r->opened++] = fd;
    }
    return NULL;
}

static int cmd_hold(void) {
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    int W = O.workers;
    pthread_t *t = calloc(W, sizeof *t);
    struct hold_res *r = calloc(W, sizeof *r);
    double t0 = now_s();
    for (int i = 0; i < W; i++) {
        r[i].n = O.count / W + (i < O.count % W);
        r[i].fds = calloc(r[i].n ? r[i].n : 1, sizeof(int));
        pthread_create(&t[i], NULL, hold_worker, &r[i]);
    }
    int opened = 0, errors = 0, first_error = 0;
    for (int i = 0; i < W; i++) {
        pthread_join(t[i], NULL);
        opened += r[i].opened;
        errors += r[i].errors;
        if (!first_error) first_error = r[i].first_error;
    }
    printf("{\"count\": %d, \"opened\": %d, \"errors\": %d, \"error\": \"%s\", \"open_s\": %.3f}\n",
           O.count, opened, errors, first_error ? strerror(first_error) : "", now_s() - t0);
    fflush(stdout);
    char c;
    while (read(0, &c, 1) > 0) {}
    for (int i = 0; i < W; i++)
        for (int j = 0; j < r[i].opened; j++) close(r[i].fds[j]);
    return 0;
}

/* -- serve: the app ---------------------------------------------------------------------- */

struct cstate {  /* per accepted connection; pending echo bytes only while a send is short */
    int fd;
    char mode;
    long long count;
    char *out;
    size_t out_len, out_off;
};

static struct sockaddr_in serve_addr;
static pthread_barrier_t serve_ready;

static void conn_close(int ep, struct cstate *s) {
    epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
    close(s->fd);
    free(s->out);
    free(s);
}

/* Returns 0 to keep the connection, -1 to close it. */
static int conn_flush(int ep, struct cstate *s) {
    while (s->out_off < s->out_len) {
        ssize_t n = send(s->fd, s->out + s->out_off, s->out_len - s->out_off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno != EAGAIN) return -1;
            struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = s};
            epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);  /* stop reading until drained */
            return 0;
        }
        s->out_off += (size_t)n;
    }
    free(s->out);
    s->out = NULL;
    s->out_len = s->out_off = 0;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s};
    epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
    return 0;
}

static int conn_readable(int ep, struct cstate *s, char *buf) {
    for (int round = 0; round < 16; round++) {
        ssize_t n = recv(s->fd, buf, BUF, 0);
        if (n < 0) return errno == EAGAIN ? 0 : -1;
        if (n == 0) {
            if (s->mode == 'S') {
                char reply[32];
                int len = snprintf(reply, sizeof reply, "%lld", s->count);
                fcntl(s->fd, F_SETFL, 0);  /* the client waits for this; send it whole */
                io_all(s->fd, reply, (size_t)len, 1);
            }
            return -1;
        }
        char *p = buf;
        if (!s->mode) { s->mode = *p++; n--; }
        if (s->mode == 'S') { s->count += n; continue; }
        if (s->mode != 'E') return -1;
        ssize_t w = n ? send(s->fd, p, (size_t)n, MSG_NOSIGNAL) : 0;
        if (w < 0 && errno != EAGAIN) return -1;
        if (w < 0) w = 0;
        if (w < n) {
            s->out = malloc((size_t)(n - w));
            memcpy(s->out, p + w, (size_t)(n - w));
            s->out_len = (size_t)(n - w);
            s->out_off = 0;
            return conn_flush(ep, s);
        }
    }
    return 0;
}

static void *serve_thread(void *arg) {
    (void)arg;
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    if (bind(lfd, (struct sockaddr *)&serve_addr, sizeof serve_addr)) die("bind");
    if (listen(lfd, 4096)) die("listen");
    pthread_barrier_wait(&serve_ready);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
    char *buf = malloc(BUF);
    struct epoll_event evs[256];
    for (;;) {
        int k = epoll_wait(ep, evs, 256, -1);
        for (int e = 0; e < k; e++) {
            struct cstate *s = evs[e].data.ptr;
            if (!s) {
                int fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct cstate *ns = calloc(1, sizeof *ns);
                    ns->fd = fd;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = ns};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            int rc = s->out ? conn_flush(ep, s) : conn_readable(ep, s, buf);
            if (rc < 0) conn_close(ep, s);
        }
    }
    return NULL;
}

static int cmd_serve(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: loadgen serve HOST PORT [THREADS]\n"); return 2; }
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    char hp[96];
    snprintf(hp, sizeof hp, "%s:%s", argv[0], argv[1]);
    if (parse_hostport(hp, &serve_addr)) { fprintf(stderr, "loadgen: bad address %s\n", hp); return 2; }
    int threads = argc > 2 ? atoi(argv[2]) : 2;
    pthread_barrier_init(&serve_ready, NULL, (unsigned)threads + 1);
    pthread_t t;
    for (int i = 0; i < threads; i++) pthread_create(&t, NULL, serve_thread, NULL);
    pthread_barrier_wait(&serve_ready);  /* every listener bound before we say so */
    printf("listening %s\n", hp);
    fflush(stdout);
    pause();
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0);  /* sleep precision for the paced loop */
    if (argc < 2) goto usage;
    const char *cmd = argv[1];
    if (!strcmp(cmd, "serve")) return cmd_serve(argc - 2, argv + 2);
    parse_opts(argc - 2, argv + 2);
    if (!O.connect_to.sin_port) { fprintf(stderr, "loadgen: --connect is required\n"); return 2; }
    if (!strcmp(cmd, "tput")) return cmd_tput();
    if (!strcmp(cmd, "rr")) return cmd_rr();
    if (!strcmp(cmd, "conn")) return cmd_conn();
    if (!strcmp(cmd, "hold")) return cmd_hold();
usage:
    fprintf(stderr, "usage: loadgen serve|tput|rr|conn|hold ... (see bench/loadgen.c)\n");
    return 2;
}
