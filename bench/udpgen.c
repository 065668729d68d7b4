/*
 * udpgen: an epoll UDP load generator for echo servers that verifies every datagram.
 *
 * --conns N connected UDP sockets, each with --window W datagrams in flight. A datagram
 * of --size bytes (at least 8) carries its sequence number in its first 8 bytes and a
 * deterministic pattern after it, so each echo is checked with memcmp: a reply of
 * another length, with other bytes, or with a sequence number that is not in flight is
 * an error (mismatch). A datagram not answered within --loss-timeout is counted lost
 * and replaced by a new one; its echo, should it come later, is counted late. Loss is
 * reported, not an error: UDP may lose, and the report shows how much.
 *
 * Phases: warmup -> measure (--duration) -> drain. With --server-pid, the server's
 * utime+stime from /proc/PID/stat is read at the start and end of the measure phase;
 * with --watch-cpu N, so is how busy CPU N was (other load on the server's core).
 * The result is one JSON object on stdout, with the keys bench/loadgen.c uses where
 * they mean the same (round_trips: datagrams echoed in the measure phase).
 *
 * Usage: udpgen --port P [--host 127.0.0.1] [--mode udp] [--conns N] [--window W]
 *   [--size BYTES] [--warmup S] [--duration S] [--loss-timeout S] [--server-pid PID]
 *   [--watch-cpu N]
 * Build: gcc -O2 -Wall -o udpgen udpgen.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAT_LEN 65537u    /* prime: pattern period in bytes */
#define MAX_SIZE 65507u   /* the largest UDP payload over IPv4 */
#define HIST_US 100000u   /* latency histogram: 1 us buckets up to 100 ms */

/* Slot j of a socket sends sequence numbers j, j + W, j + 2W, ...: seq % W finds it. */
struct slot { uint64_t seq, sent_ns; int live; };
struct sock { int fd; struct slot *slots; };

static unsigned char pat[PAT_LEN + MAX_SIZE];
static unsigned char sbuf[MAX_SIZE], rbuf[MAX_SIZE + 1];
static struct sock *socks;
static int nsocks = 1, window = 16, measuring;
static uint64_t size = 64;
static uint64_t hist[HIST_US + 1];
static uint64_t echoed, lost, late, mismatch, other, send_full;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "udpgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static const unsigned char *body(uint64_t seq) { return pat + (seq * 7919u) % PAT_LEN; }

static void send_slot(struct sock *s, struct slot *sl, uint64_t now) {
    uint64_t seq = sl->seq + (uint64_t)window;
    memcpy(sbuf, &seq, 8);
    memcpy(sbuf + 8, body(seq), size - 8);
    sl->seq = seq;
    sl->sent_ns = now;
    sl->live = 1;
    if (send(s->fd, sbuf, size, 0) < 0) {
        if (errno == EAGAIN || errno == ENOBUFS) send_full++;
        else if (errno != ECONNREFUSED) other++;
        sl->live = 0; /* retried at the next timeout scan */
    }
}

static void on_readable(struct sock *s) {
    for (;;) {
        ssize_t n = recv(s->fd, rbuf, sizeof rbuf, 0);
        if (n < 0) {
            if (errno != EAGAIN && errno != ECONNREFUSED) other++;
            return;
        }
        uint64_t seq = 0, now = now_ns();
        if ((uint64_t)n != size) { mismatch++; continue; }
        memcpy(&seq, rbuf, 8);
        struct slot *sl = &s->slots[seq % (uint64_t)window];
        if (!sl->live || sl->seq != seq) {
            if (seq < sl->seq && (seq % (uint64_t)window) == (sl->seq % (uint64_t)window)) late++;
            else mismatch++;
            continue;
        }
        if (memcmp(rbuf + 8, body(seq), size - 8)) { mismatch++; continue; }
        if (measuring) {
            uint64_t us = (now - sl->sent_ns) / 1000u;
            hist[us < HIST_US ? us : HIST_US]++;
            echoed++;
        }
        send_slot(s, sl, now);
    }
}

static void expire(uint64_t now, uint64_t timeout_ns) {
    for (int i = 0; i < nsocks; i++)
        for (int j = 0; j < window; j++) {
            struct slot *sl = &socks[i].slots[j];
            if (sl->live && now - sl->sent_ns < timeout_ns) continue;
            if (sl->live && measuring) lost++;
            send_slot(&socks[i], sl, now);
        }
}

static double pct(double q) {
    uint64_t total = 0, seen = 0;
    for (unsigned i = 0; i <= HIST_US; i++) total += hist[i];
    if (!total) return 0;
    uint64_t rank = (uint64_t)(q * (double)total);
    if (rank >= total) rank = total - 1;
    for (unsigned i = 0; i <= HIST_US; i++) {
        seen += hist[i];
        if (seen > rank) return (double)i;
    }
    return 0;
}

static long long proc_cpu_ticks(int pid, long long *user) {
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    unsigned long long ut = 0, st = 0;
    if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
        return -1;
    *user = (long long)ut;
    return (long long)(ut + st);
}

static int cpu_jiffies(int n, unsigned long long *busy, unsigned long long *total) {
    char name[16], line[512];
    snprintf(name, sizeof name, "cpu%d ", n);
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return 0;
    int ok = 0;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, name, strlen(name))) continue;
        unsigned long long v[8] = {0};
        sscanf(line + strlen(name), "%llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1],
               &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]);
        *total = 0;
        for (int i = 0; i < 8; i++) *total += v[i];
        *busy = *total - v[3] - v[4];
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

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    int port = -1, server_pid = 0, watch_cpu = -1;
    double warmup = 1.0, duration = 5.0, loss_timeout = 0.2;
    static struct option opts[] = {
        {"host", 1, 0, 'h'}, {"port", 1, 0, 'p'}, {"mode", 1, 0, 'm'}, {"conns", 1, 0, 'c'},
        {"window", 1, 0, 'w'}, {"size", 1, 0, 's'}, {"warmup", 1, 0, 'W'},
        {"duration", 1, 0, 'd'}, {"loss-timeout", 1, 0, 'l'}, {"server-pid", 1, 0, 'P'},
        {"watch-cpu", 1, 0, 'C'}, {0, 0, 0, 0}};
    for (int o; (o = getopt_long(argc, argv, "", opts, NULL)) != -1;) {
        switch (o) {
        case 'h': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'm': if (strcmp(optarg, "udp")) { fprintf(stderr, "udpgen: --mode udp only\n"); return 2; } break;
        case 'c': nsocks = atoi(optarg); break;
        case 'w': window = atoi(optarg); break;
        case 's': size = strtoull(optarg, NULL, 10); break;
        case 'W': warmup = atof(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'l': loss_timeout = atof(optarg); break;
        case 'P': server_pid = atoi(optarg); break;
        case 'C': watch_cpu = atoi(optarg); break;
        default: fprintf(stderr, "udpgen: see the comment at the top of udpgen.c\n"); return 2;
        }
    }
    if (port < 0 || nsocks < 1 || window < 1 || size < 8 || size > MAX_SIZE) {
        fprintf(stderr, "udpgen: --port P, --conns >= 1, --window >= 1, 8 <= --size <= %u\n",
                MAX_SIZE);
        return 2;
    }
    for (unsigned i = 0; i < sizeof pat; i++) pat[i] = (unsigned char)((i * 2654435761u) >> 24);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) die("inet_pton");
    int epfd = epoll_create1(0);
    if (epfd < 0) die("epoll_create1");
    socks = calloc((size_t)nsocks, sizeof *socks);
    for (int i = 0; i < nsocks; i++) {
        struct sock *s = &socks[i];
        s->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        if (s->fd < 0) die("socket");
        int rcvbuf = 4 << 20;
        setsockopt(s->fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
        if (connect(s->fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
        s->slots = calloc((size_t)window, sizeof *s->slots);
        for (int j = 0; j < window; j++) s->slots[j].seq = (uint64_t)j; /* first sent: j + W */
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, s->fd, &ev) < 0) die("epoll_ctl");
        for (int j = 0; j < window; j++) send_slot(s, &s->slots[j], now_ns());
    }
    uint64_t timeout_ns = (uint64_t)(loss_timeout * 1e9), t0 = now_ns();
    uint64_t t_measure = t0 + (uint64_t)(warmup * 1e9);
    uint64_t t_stop = t_measure + (uint64_t)(duration * 1e9), t_end = 0, last_scan = t0;
    long long cpu0 = -1, cpu1 = -1, ucpu0 = 0, ucpu1 = 0;
    unsigned long long wb0 = 0, wt0 = 0, wb1 = 0, wt1 = 0;
    double ccpu0 = 0, ccpu1 = 0;
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(epfd, evs, 256, 10);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) on_readable(&socks[evs[i].data.u32]);
        uint64_t now = now_ns();
        if (!measuring && !t_end && now >= t_measure) {
            if (server_pid) cpu0 = proc_cpu_ticks(server_pid, &ucpu0);
            if (watch_cpu >= 0) cpu_jiffies(watch_cpu, &wb0, &wt0);
            ccpu0 = rusage_cpu_s();
            t_measure = now;
            measuring = 1;
        }
        if (measuring && now >= t_stop) {
            if (server_pid) cpu1 = proc_cpu_ticks(server_pid, &ucpu1);
            if (watch_cpu >= 0) cpu_jiffies(watch_cpu, &wb1, &wt1);
            ccpu1 = rusage_cpu_s();
            t_end = now;
            measuring = 0;
            break;
        }
        if (now - last_scan >= 10000000u) { /* every 10 ms */
            expire(now, timeout_ns);
            last_scan = now;
        }
    }
    double secs = (double)(t_end - t_measure) / 1e9;
    long hz = sysconf(_SC_CLK_TCK);
    uint64_t nerr = mismatch + other;
    printf("{\"mode\": \"udp\", \"conns\": %d, \"idle\": 0, \"size\": %llu, \"window\": %d,",
           nsocks, (unsigned long long)size, window);
    printf(" \"duration_s\": %.6f, \"round_trips\": %llu, \"bytes\": %llu,", secs,
           (unsigned long long)echoed, (unsigned long long)(echoed * size));
    printf(" \"round_trips_per_s\": %.1f, \"mb_per_s\": %.2f,", secs > 0 ? (double)echoed / secs : 0,
           secs > 0 ? (double)(echoed * size) / secs / 1e6 : 0);
    printf(" \"latency_us\": {\"p50\": %.1f, \"p99\": %.1f, \"p99_9\": %.1f, \"max\": null},",
           pct(0.5), pct(0.99), pct(0.999));
    if (cpu0 >= 0 && cpu1 >= 0)
        printf(" \"server_cpu_s\": %.3f, \"server_user_s\": %.3f,",
               (double)(cpu1 - cpu0) / (double)hz, (double)(ucpu1 - ucpu0) / (double)hz);
    else
        printf(" \"server_cpu_s\": null, \"server_user_s\": null,");
    if (wt1 > wt0)
        printf(" \"watched_cpu_busy\": %.3f,", (double)(wb1 - wb0) / (double)(wt1 - wt0));
    else
        printf(" \"watched_cpu_busy\": null,");
    printf(" \"client_cpu_busy\": null, \"client_cpu_s\": %.3f,", ccpu1 - ccpu0);
    printf(" \"lost\": %llu, \"late\": %llu, \"loss_ratio\": %.6f, \"send_full\": %llu,",
           (unsigned long long)lost, (unsigned long long)late,
           echoed + lost ? (double)lost / (double)(echoed + lost) : 0.0,
           (unsigned long long)send_full);
    printf(" \"errors\": {\"mismatch\": %llu, \"other\": %llu}, \"error_total\": %llu}\n",
           (unsigned long long)mismatch, (unsigned long long)other, (unsigned long long)nerr);
    return nerr ? 1 : 0;
}
