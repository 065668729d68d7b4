/*
 * loadgen: an epoll load generator for echo servers that verifies every byte.
 *
 * One thread, many non-blocking connections on one epoll instance, so that on
 * its own core it outruns any Python server. Every connection sends a
 * deterministic byte stream (a pseudo-random table indexed by stream offset
 * modulo a prime, shifted per connection), so each echoed byte is compared
 * with memcmp against what must come back at that offset: a lost, reordered,
 * duplicated or corrupted byte, or one from another connection, is an error.
 *
 * Modes:
 *   pingpong  send SIZE bytes, wait for the whole echo, record the latency, repeat
 *   stream    keep WINDOW bytes in flight per connection, send in SIZE chunks
 * --idle N opens N more connections that only echo one probe byte and then
 * stay open (the "10,000 open, 100 active" workload). Connection set-up is
 * timed: all connect()s complete (connect_all_s), all probes echoed (probe_all_s).
 * --conns 0 makes a process that only holds idle connections.
 *
 * Several load generators can work together (bench/epolld_bench starts them):
 *   --hold-stdin      after the probe phase write "established" to stderr, then run the
 *                     workload until stdin reaches EOF (bounded by warmup + duration)
 *   --source-addrs K  bind connection i to 127.0.0.(2 + (OFFSET + i) % K) before connect()
 *                     (IP_BIND_ADDRESS_NO_PORT: the port is picked per 4-tuple), so that more
 *                     connections than one address's ephemeral ports fit; --source-offset OFFSET
 *   --source-ports    with --source-addrs: bind connection i to a port of its own too,
 *                     10000 + (OFFSET + i) / K, instead of letting connect() search for a free
 *                     one: that search walks the ports in use, and grows slow (milliseconds
 *                     per connect) with tens of thousands per address; a taken port falls back
 *                     to the search
 *   --reprobe         on release, every idle connection echoes one more byte (within the
 *                     drain timeout; one that does not is "stalled"): that each of them still
 *                     echoes after what happened meanwhile (a restart handoff); reprobed, reprobe_s
 *   --expect-close    an idle connection the server closes (an idle timeout) is counted in
 *                     closed_by_server with the first and last time, not as an error
 * Times of the phases are also printed on CLOCK_MONOTONIC (*_mono_s), so that the
 * results of processes started together can be combined.
 *
 * Phases: connect -> probe -> warmup -> measure -> drain. Every phase is bounded
 * in time, the measure phase also by a round-trip count and a byte count.
 * With --server-pid, the server's utime+stime from /proc/PID/stat is read at
 * the exact start and end of the measure phase; with --watch-cpu N, so is how busy
 * CPU N was (from /proc/stat), to detect other load on the server's core. The result is one JSON object
 * on stdout; the exit status is 0 if the run completed without errors.
 *
 * Build: gcc -O2 -Wall -o loadgen loadgen.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAT_LEN 1000003u           /* prime: pattern period in bytes */
#define MAX_IO (256u * 1024u)      /* bytes per send()/recv() call */
#define MAX_EVENTS 1024
#define HIST_SUB_BITS 6            /* 64 sub-buckets per power of two: <1.6% error */
#define HIST_SUB (1u << HIST_SUB_BITS)
#define HIST_LEN (64u * HIST_SUB)

enum mode { PINGPONG, STREAM };
enum phase { P_CONNECT, P_PROBE, P_WARMUP, P_MEASURE, P_DRAIN, P_DONE };
enum cstate { C_CONNECTING, C_PROBING, C_IDLE, C_ACTIVE, C_CLOSED, C_DEAD };

#define STDIN_TAG UINT32_MAX /* epoll data of stdin in --hold-stdin mode */

struct conn {
    int fd;
    enum cstate state;
    int active;          /* takes part in the workload after the probe */
    uint32_t mask;       /* current epoll events */
    uint64_t base;       /* this connection's pattern shift */
    uint64_t sent;       /* stream offset: bytes sent so far */
    uint64_t rcvd;       /* stream offset: bytes received and verified */
    uint64_t target;     /* pingpong: end offset of the current message */
    uint64_t t0;         /* pingpong: when the current message started, ns */
};

struct errors {
    uint64_t connect, mismatch, excess, eof, reset, other, lost_bytes, stalled;
};

static unsigned char *pat;     /* PAT_LEN + MAX_IO bytes; the tail repeats the head */
static unsigned char *rbuf;
static struct conn *conns;
static int nconns;
static int epfd;
static enum mode mode = PINGPONG;
static enum phase phase = P_CONNECT;
static uint64_t size = 1024, window = 256 * 1024;
static uint64_t hist[HIST_LEN];
static uint64_t round_trips, bytes_echoed;
static uint64_t total_rcvd;          /* every connection, every phase: for the stall check */
static int n_connecting, n_probing, n_active; /* connections in those states */
static struct errors err;
static int expect_close, released;   /* --expect-close; stdin reached EOF (--hold-stdin) */
static int reprobe;                  /* --reprobe */
static int source_ports;             /* --source-ports */
#define SOURCE_PORT_BASE 10000u
#define SOURCE_PORTS 55000u          /* 10000-64999 */
static uint64_t closed_by_server, first_close_ns, last_close_ns;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static unsigned hist_index(uint64_t v) {
    if (v < HIST_SUB) return (unsigned)v;
    unsigned e = 63u - (unsigned)__builtin_clzll(v); /* e >= HIST_SUB_BITS */
    unsigned sub = (unsigned)(v >> (e - HIST_SUB_BITS)) & (HIST_SUB - 1);
    return (e - HIST_SUB_BITS + 1) * HIST_SUB + sub;
}

static uint64_t hist_value(unsigned i) { /* the lowest value of bucket i */
    if (i < HIST_SUB) return i;
    unsigned e = i / HIST_SUB + HIST_SUB_BITS - 1, sub = i % HIST_SUB;
    return ((uint64_t)(HIST_SUB + sub)) << (e - HIST_SUB_BITS);
}

static double hist_pct(double q) { /* in microseconds */
    uint64_t total = 0, seen = 0;
    for (unsigned i = 0; i < HIST_LEN; i++) total += hist[i];
    if (!total) return 0;
    uint64_t rank = (uint64_t)(q * (double)total);
    if (rank >= total) rank = total - 1;
    for (unsigned i = 0; i < HIST_LEN; i++) {
        seen += hist[i];
        if (seen > rank) return (double)hist_value(i) / 1000.0;
    }
    return 0;
}

static double hist_max(void) {
    for (unsigned i = HIST_LEN; i-- > 0;)
        if (hist[i]) return (double)hist_value(i) / 1000.0;
    return 0;
}

static const unsigned char *expect(const struct conn *c, uint64_t off) {
    return pat + (c->base + off) % PAT_LEN;
}

static void set_mask(struct conn *c, uint32_t mask) {
    if (c->mask == mask) return;
    struct epoll_event ev = {.events = mask, .data.u32 = (uint32_t)(c - conns)};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl MOD");
    c->mask = mask;
}

static void set_state(struct conn *c, enum cstate s) {
    n_connecting += (s == C_CONNECTING) - (c->state == C_CONNECTING);
    n_probing += (s == C_PROBING) - (c->state == C_PROBING);
    n_active += (s == C_ACTIVE) - (c->state == C_ACTIVE);
    c->state = s;
}

static void kill_conn(struct conn *c) {
    if (c->state == C_DEAD) return;
    if (c->sent > c->rcvd) err.lost_bytes += c->sent - c->rcvd;
    if (c->state != C_CLOSED) epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    set_state(c, C_DEAD);
}

static void io_error(struct conn *c, int e) {
    if (e == ECONNRESET || e == EPIPE) err.reset++;
    else err.other++;
    kill_conn(c);
}

/* Send until c->target or EAGAIN; EPOLLOUT is armed only while bytes wait. */
static void pump_send(struct conn *c) {
    uint64_t chunk = mode == STREAM && size < MAX_IO ? size : MAX_IO;
    while (c->sent < c->target) {
        uint64_t n = c->target - c->sent;
        if (n > chunk) n = chunk;
        ssize_t w = send(c->fd, expect(c, c->sent), n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN) { set_mask(c, EPOLLIN | EPOLLOUT); return; }
            if (errno == EINTR) continue;
            io_error(c, errno);
            return;
        }
        c->sent += (uint64_t)w;
    }
    set_mask(c, EPOLLIN);
}

static int sending_allowed(void) { return phase == P_WARMUP || phase == P_MEASURE; }

static void start_message(struct conn *c, uint64_t t) {
    if (mode == PINGPONG) {
        c->target = c->sent + size;
        c->t0 = t;
    } else {
        c->target = c->rcvd + window; /* refill the window */
    }
    pump_send(c);
}

static void on_readable(struct conn *c, uint64_t t) {
    ssize_t n = recv(c->fd, rbuf, MAX_IO, 0);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) return;
        io_error(c, errno);
        return;
    }
    if (n == 0) {
        if (expect_close && c->state == C_IDLE && c->rcvd == c->sent) {
            /* Closed by the server's idle timeout: close our end only after the run, so
             * that the wave costs this process (and the probe beside it) no close() calls. */
            closed_by_server++;
            if (!first_close_ns) first_close_ns = t;
            last_close_ns = t;
            epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
            set_state(c, C_CLOSED);
            return;
        }
        err.eof++;
        kill_conn(c);
        return;
    }
    if (c->rcvd + (uint64_t)n > c->sent) {
        err.excess++;
        kill_conn(c);
        return;
    }
    if (memcmp(rbuf, expect(c, c->rcvd), (size_t)n) != 0) {
        err.mismatch++;
        kill_conn(c);
        return;
    }
    c->rcvd += (uint64_t)n;
    total_rcvd += (uint64_t)n;
    if (c->state == C_PROBING) {
        if (c->rcvd == c->sent) set_state(c, c->active ? C_ACTIVE : C_IDLE);
        return;
    }
    if (mode == STREAM) {
        if (phase == P_MEASURE) bytes_echoed += (uint64_t)n;
        if (sending_allowed()) start_message(c, t);
        return;
    }
    if (c->rcvd == c->target) {
        if (phase == P_MEASURE) {
            round_trips++;
            bytes_echoed += size;
            hist[hist_index(t - c->t0)]++;
        }
        if (sending_allowed()) start_message(c, t);
    }
}

static void on_connected(struct conn *c) {
    int e = 0;
    socklen_t len = sizeof e;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &e, &len) < 0) e = errno;
    if (e) {
        err.connect++;
        kill_conn(c);
        return;
    }
    set_state(c, C_PROBING);
    set_mask(c, EPOLLIN);
}

static void on_stdin(void) {
    char buf[256];
    ssize_t n = read(0, buf, sizeof buf);
    if (n > 0 || (n < 0 && (errno == EAGAIN || errno == EINTR))) return;
    released = 1;
    epoll_ctl(epfd, EPOLL_CTL_DEL, 0, NULL);
}

static void dispatch(struct epoll_event *ev, uint64_t t) {
    if (ev->data.u32 == STDIN_TAG) {
        on_stdin();
        return;
    }
    struct conn *c = &conns[ev->data.u32];
    if (c->state == C_DEAD || c->state == C_CLOSED) return;
    if (c->state == C_CONNECTING) {
        on_connected(c);
        return;
    }
    /* HUP/ERR: let recv()/send() report the error. */
    if (ev->events & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_readable(c, t);
    if (c->state != C_DEAD && (ev->events & EPOLLOUT)) pump_send(c);
}

static int poll_once(int timeout_ms) {
    static struct epoll_event evs[MAX_EVENTS];
    int n = epoll_wait(epfd, evs, MAX_EVENTS, timeout_ms);
    if (n < 0) {
        if (errno == EINTR) return 0;
        die("epoll_wait");
    }
    uint64_t t = now_ns();
    for (int i = 0; i < n; i++) dispatch(&evs[i], t);
    return n;
}

static uint64_t outstanding(void) {
    uint64_t k = 0;
    for (int i = 0; i < nconns; i++)
        if (conns[i].state != C_DEAD) k += conns[i].sent - conns[i].rcvd;
    return k;
}

/* utime+stime of pid in clock ticks, or -1; *user gets utime alone. */
static long long one_cpu_ticks(int pid, long long *user) {
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* comm may contain spaces */
    if (!p) return -1;
    unsigned long long ut = 0, st = 0;
    /* after ')': state(3) ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime(14) stime(15) */
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
        return -1;
    *user = (long long)ut;
    return (long long)(ut + st);
}

/* The same for pid and its children (epolld's worker processes, workers: N > 1). */
static long long proc_cpu_ticks(int pid, long long *user) {
    long long total = one_cpu_ticks(pid, user);
    if (total < 0) return -1;
    char path[96], buf[4096];
    snprintf(path, sizeof path, "/proc/%d/task/%d/children", pid, pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return total;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    buf[n > 0 ? n : 0] = 0;
    for (char *tok = strtok(buf, " \n"); tok; tok = strtok(NULL, " \n")) {
        long long u = 0, t = one_cpu_ticks(atoi(tok), &u);
        if (t > 0) {
            total += t;
            *user += u;
        }
    }
    return total;
}

/* Busy and total jiffies of CPU n from /proc/stat; 0 on failure. */
static int cpu_jiffies(int n, unsigned long long *busy, unsigned long long *total) {
    char name[16], line[512];
    snprintf(name, sizeof name, "cpu%d ", n);
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return 0;
    int ok = 0;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, name, strlen(name))) continue;
        unsigned long long v[8] = {0};
        sscanf(line + strlen(name), "%llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2],
               &v[3], &v[4], &v[5], &v[6], &v[7]);
        *total = 0;
        for (int i = 0; i < 8; i++) *total += v[i];
        *busy = *total - v[3] - v[4]; /* minus idle and iowait */
        ok = 1;
        break;
    }
    fclose(f);
    return ok;
}

static double rusage_cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen --port P [--host 127.0.0.1] [--mode pingpong|stream] [--conns N]\n"
            "  [--size BYTES] [--window BYTES] [--idle N] [--warmup S] [--duration S]\n"
            "  [--max-round-trips N] [--max-bytes N] [--server-pid PID] [--connect-timeout S]\n"
            "  [--drain-timeout S] [--stall-timeout S] [--watch-cpu N] [--hold-stdin]\n"
            "  [--source-addrs K] [--source-offset N] [--expect-close] [--reprobe]\n  [--source-ports]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    int port = 0, active = 1, idle = 0, server_pid = 0, watch_cpu = -1;
    int hold_stdin = 0, source_addrs = 0, source_offset = 0;
    double warmup = 0.5, duration = 2.0, connect_timeout = 10, drain_timeout = 3, stall_timeout = 5;
    uint64_t max_rt = 100000000, max_bytes = 1ull << 40;
    static struct option opts[] = {
        {"host", 1, 0, 'h'}, {"port", 1, 0, 'p'}, {"mode", 1, 0, 'm'}, {"conns", 1, 0, 'c'},
        {"size", 1, 0, 's'}, {"window", 1, 0, 'w'}, {"idle", 1, 0, 'i'}, {"warmup", 1, 0, 'W'},
        {"duration", 1, 0, 'd'}, {"max-round-trips", 1, 0, 'R'}, {"max-bytes", 1, 0, 'B'},
        {"server-pid", 1, 0, 'P'}, {"connect-timeout", 1, 0, 'C'}, {"drain-timeout", 1, 0, 'D'},
        {"stall-timeout", 1, 0, 'S'}, {"watch-cpu", 1, 0, 'X'}, {"hold-stdin", 0, 0, 'H'},
        {"source-addrs", 1, 0, 'A'}, {"source-offset", 1, 0, 'O'}, {"expect-close", 0, 0, 'E'},
        {"reprobe", 0, 0, 'r'}, {"source-ports", 0, 0, 'q'}, {0, 0, 0, 0}};
    for (int o; (o = getopt_long(argc, argv, "", opts, NULL)) != -1;) {
        switch (o) {
        case 'h': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'm':
            if (!strcmp(optarg, "pingpong")) mode = PINGPONG;
            else if (!strcmp(optarg, "stream")) mode = STREAM;
            else usage();
            break;
        case 'c': active = atoi(optarg); break;
        case 's': size = strtoull(optarg, NULL, 10); break;
        case 'w': window = strtoull(optarg, NULL, 10); break;
        case 'i': idle = atoi(optarg); break;
        case 'W': warmup = atof(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'R': max_rt = strtoull(optarg, NULL, 10); break;
        case 'B': max_bytes = strtoull(optarg, NULL, 10); break;
        case 'P': server_pid = atoi(optarg); break;
        case 'C': connect_timeout = atof(optarg); break;
        case 'D': drain_timeout = atof(optarg); break;
        case 'S': stall_timeout = atof(optarg); break;
        case 'X': watch_cpu = atoi(optarg); break;
        case 'H': hold_stdin = 1; break;
        case 'A': source_addrs = atoi(optarg); break;
        case 'O': source_offset = atoi(optarg); break;
        case 'E': expect_close = 1; break;
        case 'r': reprobe = 1; break;
        case 'q': source_ports = 1; break;
        default: usage();
        }
    }
    if (port <= 0 || port > 65535 || active < 0 || idle < 0 || active + idle < 1 || size < 1 ||
        window < 1 || source_addrs < 0 || source_addrs > 65000 || source_offset < 0)
        usage();
    nconns = active + idle;

    /* Each connection needs one fd; keep 64 spare. */
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    if (rl.rlim_cur < (rlim_t)nconns + 64) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        getrlimit(RLIMIT_NOFILE, &rl);
        if (rl.rlim_cur < (rlim_t)nconns + 64) {
            fprintf(stderr, "loadgen: RLIMIT_NOFILE %llu is too low for %d connections\n",
                    (unsigned long long)rl.rlim_cur, nconns);
            return 2;
        }
    }

    pat = malloc(PAT_LEN + MAX_IO);
    rbuf = malloc(MAX_IO);
    conns = calloc((size_t)nconns, sizeof *conns);
    if (!pat || !rbuf || !conns) die("malloc");
    uint64_t x = 0x9E3779B97F4A7C15ull; /* xorshift64: deterministic content */
    for (unsigned i = 0; i < PAT_LEN; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        pat[i] = (unsigned char)(x >> 24);
    }
    memcpy(pat + PAT_LEN, pat, MAX_IO);

    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) usage();
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");

    /* Phase connect: every connection at once, like a thundering herd of clients.
     * The active ones are spread evenly among the idle ones. */
    int stride = active ? nconns / active : 1;
    uint64_t t_begin = now_ns();
    for (int i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        c->active = active && (i % stride == 0) && (i / stride < active);
        c->base = (uint64_t)i * 7919u * 13u;
        c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (c->fd < 0) die("socket");
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (source_addrs) {
            /* 127.0.0.2, .3, ...: each source address has its own ephemeral ports. */
            struct sockaddr_in src = {.sin_family = AF_INET};
            src.sin_addr.s_addr =
                htonl(0x7F000002u + (uint32_t)((source_offset + i) % source_addrs));
            int bound = 0;
            if (source_ports) {
                uint32_t g = (uint32_t)(source_offset + i) / (uint32_t)source_addrs;
                src.sin_port = htons((uint16_t)(SOURCE_PORT_BASE + g % SOURCE_PORTS));
                setsockopt(c->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
                bound = bind(c->fd, (struct sockaddr *)&src, sizeof src) == 0;
                src.sin_port = 0; /* taken (by another program): let connect() search */
            }
            if (!bound) {
                setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
                if (bind(c->fd, (struct sockaddr *)&src, sizeof src) < 0)
                    die("bind source address");
            }
        }
        c->state = C_IDLE; /* placeholder until set_state counts it */
        set_state(c, C_CONNECTING);
        c->mask = EPOLLOUT;
        struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)i};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl ADD");
        if (connect(c->fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) {
            err.connect++;
            kill_conn(c);
        } /* else: connected or in progress; EPOLLOUT reports it either way */
    }
    uint64_t deadline = t_begin + (uint64_t)(connect_timeout * 1e9);
    while (n_connecting && now_ns() < deadline) poll_once(10);
    double connect_all_s = (double)(now_ns() - t_begin) / 1e9;
    int not_connected = n_connecting;
    err.connect += (uint64_t)not_connected;

    /* Phase probe: one byte echoed on every connection proves the server accepted it. */
    phase = P_PROBE;
    for (int i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        if (c->state == C_CONNECTING) { kill_conn(c); continue; }
        if (c->state != C_PROBING) continue;
        c->target = 1;
        pump_send(c);
    }
    while (n_probing && now_ns() < deadline) poll_once(10);
    double probe_all_s = (double)(now_ns() - t_begin) / 1e9;
    int not_probed = n_probing;
    err.stalled += (uint64_t)not_probed;
    uint64_t t_probed = now_ns();
    if (hold_stdin) {
        fprintf(stderr, "established\n");
        fflush(stderr);
        fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = STDIN_TAG};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev) < 0) die("epoll_ctl ADD stdin");
    }

    /* Phases warmup and measure: the workload on the active connections. */
    phase = P_WARMUP;
    uint64_t t = now_ns();
    for (int i = 0; i < nconns; i++)
        if (conns[i].state == C_ACTIVE) start_message(&conns[i], t);
    uint64_t measure_at = t + (uint64_t)(warmup * 1e9);
    uint64_t end_at = measure_at + (uint64_t)(duration * 1e9);
    uint64_t t_measure = 0, t_end = 0, last_progress = t, last_rcvd = 0;
    long long cpu0 = -1, cpu1 = -1, ucpu0 = 0, ucpu1 = 0;
    double ccpu0 = 0, ccpu1 = 0;
    unsigned long long wb0 = 0, wt0 = 0, wb1 = 0, wt1 = 0; /* the watched CPU's jiffies */
    unsigned long long ob0 = 0, ot0 = 0, ob1 = 0, ot1 = 0; /* this process's CPU's jiffies */
    int own_cpu = sched_getcpu(); /* pinned by taskset, so it stays */
    for (;;) {
        poll_once(10);
        t = now_ns();
        if (phase == P_WARMUP && t >= measure_at) {
            phase = P_MEASURE;
            round_trips = bytes_echoed = 0;
            memset(hist, 0, sizeof hist);
            if (server_pid) cpu0 = proc_cpu_ticks(server_pid, &ucpu0);
            if (watch_cpu >= 0) cpu_jiffies(watch_cpu, &wb0, &wt0);
            if (own_cpu >= 0) cpu_jiffies(own_cpu, &ob0, &ot0);
            ccpu0 = rusage_cpu_s();
            t_measure = now_ns();
            end_at = t_measure + (uint64_t)(duration * 1e9);
        }
        if (phase == P_WARMUP && released) { /* released before the warm-up ended */
            if (server_pid) cpu0 = proc_cpu_ticks(server_pid, &ucpu0);
            ccpu0 = rusage_cpu_s();
            t_measure = now_ns();
            phase = P_MEASURE;
        }
        if (phase == P_MEASURE && (t >= end_at || released || round_trips >= max_rt ||
                                   bytes_echoed >= max_bytes)) {
            if (server_pid) cpu1 = proc_cpu_ticks(server_pid, &ucpu1);
            if (watch_cpu >= 0) cpu_jiffies(watch_cpu, &wb1, &wt1);
            if (own_cpu >= 0) cpu_jiffies(own_cpu, &ob1, &ot1);
            ccpu1 = rusage_cpu_s();
            t_end = now_ns();
            break;
        }
        /* stall check: something must come back every stall_timeout */
        if (total_rcvd != last_rcvd || !active) { last_rcvd = total_rcvd; last_progress = t; }
        else if (t - last_progress > (uint64_t)(stall_timeout * 1e9)) {
            err.stalled++;
            if (server_pid) cpu1 = proc_cpu_ticks(server_pid, &ucpu1);
            ccpu1 = rusage_cpu_s();
            t_end = now_ns();
            if (!t_measure) t_measure = t_end;
            break;
        }
        if (active && !n_active) { /* every active connection failed */
            t_end = now_ns();
            if (!t_measure) t_measure = t_end;
            break;
        }
    }

    /* --reprobe: one more byte echoed on every idle connection, all at once. */
    uint64_t reprobed = 0;
    double reprobe_s = 0;
    if (reprobe) {
        phase = P_PROBE;
        uint64_t t_reprobe = now_ns();
        for (int i = 0; i < nconns; i++) {
            struct conn *c = &conns[i];
            if (c->state != C_IDLE) continue;
            c->target = c->sent + 1;
            set_state(c, C_PROBING);
            pump_send(c);
        }
        int asked = n_probing;
        deadline = t_reprobe + (uint64_t)(drain_timeout * 1e9);
        while (n_probing && now_ns() < deadline) poll_once(10);
        reprobe_s = (double)(now_ns() - t_reprobe) / 1e9;
        reprobed = (uint64_t)(asked - n_probing);
        err.stalled += (uint64_t)n_probing;
    }

    /* Phase drain: no new messages; whatever does not come back in time is lost. */
    phase = P_DRAIN;
    deadline = now_ns() + (uint64_t)(drain_timeout * 1e9);
    while (outstanding() && now_ns() < deadline) poll_once(10);
    for (int i = 0; i < nconns; i++) kill_conn(&conns[i]);
    phase = P_DONE;

    double secs = (double)(t_end - t_measure) / 1e9;
    long hz = sysconf(_SC_CLK_TCK);
    uint64_t nerr = err.connect + err.mismatch + err.excess + err.eof + err.reset + err.other +
                    err.lost_bytes + err.stalled;
    printf("{\"mode\": \"%s\", \"conns\": %d, \"idle\": %d, \"size\": %llu, \"window\": %llu,",
           mode == PINGPONG ? "pingpong" : "stream", active, idle, (unsigned long long)size,
           mode == STREAM ? (unsigned long long)window : 0ull);
    printf(" \"duration_s\": %.6f, \"round_trips\": %llu, \"bytes\": %llu,", secs,
           (unsigned long long)(mode == STREAM ? bytes_echoed / size : round_trips),
           (unsigned long long)bytes_echoed);
    printf(" \"round_trips_per_s\": %.1f, \"mb_per_s\": %.2f,",
           secs > 0 ? (double)(mode == STREAM ? bytes_echoed / size : round_trips) / secs : 0.0,
           secs > 0 ? (double)bytes_echoed / secs / 1e6 : 0.0);
    if (mode == PINGPONG)
        printf(" \"latency_us\": {\"p50\": %.1f, \"p99\": %.1f, \"p99_9\": %.1f, \"max\": %.1f},",
               hist_pct(0.5), hist_pct(0.99), hist_pct(0.999), hist_max());
    else
        printf(" \"latency_us\": null,");
    if (cpu0 >= 0 && cpu1 >= 0)
        printf(" \"server_cpu_s\": %.3f, \"server_user_s\": %.3f,", (double)(cpu1 - cpu0) / (double)hz,
               (double)(ucpu1 - ucpu0) / (double)hz);
    else
        printf(" \"server_cpu_s\": null, \"server_user_s\": null,");
    if (wt1 > wt0)
        printf(" \"watched_cpu_busy\": %.3f,", (double)(wb1 - wb0) / (double)(wt1 - wt0));
    else
        printf(" \"watched_cpu_busy\": null,");
    if (ot1 > ot0)
        printf(" \"client_cpu_busy\": %.3f,", (double)(ob1 - ob0) / (double)(ot1 - ot0));
    else
        printf(" \"client_cpu_busy\": null,");
    printf(" \"client_cpu_s\": %.3f, \"connect_all_s\": %.4f, \"probe_all_s\": %.4f,",
           ccpu1 - ccpu0, connect_all_s, probe_all_s);
    printf(" \"t_begin_mono_s\": %.6f, \"t_connected_mono_s\": %.6f, \"t_probed_mono_s\": %.6f,"
           " \"measure_start_mono_s\": %.6f, \"measure_end_mono_s\": %.6f,",
           (double)t_begin / 1e9, (double)t_begin / 1e9 + connect_all_s, (double)t_probed / 1e9,
           (double)t_measure / 1e9, (double)t_end / 1e9);
    printf(" \"reprobed\": %llu, \"reprobe_s\": %.4f,", (unsigned long long)reprobed, reprobe_s);
    printf(" \"closed_by_server\": %llu, \"first_close_mono_s\": %.6f,"
           " \"last_close_mono_s\": %.6f,",
           (unsigned long long)closed_by_server, (double)first_close_ns / 1e9,
           (double)last_close_ns / 1e9);
    printf(" \"errors\": {\"connect\": %llu, \"mismatch\": %llu, \"excess\": %llu, \"eof\": %llu,"
           " \"reset\": %llu, \"other\": %llu, \"lost_bytes\": %llu, \"stalled\": %llu},"
           " \"error_total\": %llu}\n",
           (unsigned long long)err.connect, (unsigned long long)err.mismatch,
           (unsigned long long)err.excess, (unsigned long long)err.eof,
           (unsigned long long)err.reset, (unsigned long long)err.other,
           (unsigned long long)err.lost_bytes, (unsigned long long)err.stalled,
           (unsigned long long)nerr);
    return nerr ? 1 : 0;
}
