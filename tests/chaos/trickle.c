/*
 * trickle: N clients that each send one byte a second and check its echo, for scenario 5
 * (tests/chaos/slowpeers.py), in C so that 5,000 sends and 5,000 echoes a second cost the
 * two shared cores little: in Python they took a third of a core beside the daemon under
 * test and the probes (docs/reliability.md).
 *
 *   trickle HOST PORT CONNS SECONDS
 *
 * Every 10 ms the next CONNS/100 connections send "t" (each one once a second); each echo
 * must be "t"s and no more than were sent. A connection the server closes is counted as
 * lost. Bounded: it ends SECONDS after the last connect. One line of JSON on stdout:
 * connected, connect_s, verified, lost, errors, first_error, cpu_s.
 *
 * Build: gcc -O2 -Wall -o trickle trickle.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define TURNS_PER_S 100
#define CONNECT_TIMEOUT_S 10

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static long errors;
static char first_error[160];

static void error(const char *what, int err) {
    if (!errors++)
        snprintf(first_error, sizeof first_error, "%s: %s", what, strerror(err));
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: trickle HOST PORT CONNS SECONDS\n");
        return 2;
    }
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) {
        fprintf(stderr, "trickle: bad address %s\n", argv[1]);
        return 2;
    }
    int conns = atoi(argv[3]);
    double seconds = atof(argv[4]);
    int *fds = calloc(conns, sizeof *fds);
    long *owed = calloc(conns, sizeof *owed);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (!fds || !owed || ep < 0) {
        perror("trickle");
        return 2;
    }
    double started = now_s();
    int connected = 0;
    struct timeval timeout = {.tv_sec = CONNECT_TIMEOUT_S};
    for (int i = 0; i < conns; i++) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            error("socket", errno);
            fds[i] = -1;
            continue;
        }
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
            error("connect", errno);
            close(fd);
            fds[i] = -1;
            continue;
        }
        fcntl(fd, F_SETFL, O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
        fds[i] = fd;
        connected++;
    }
    double connect_s = now_s() - started;
    long verified = 0, lost = 0;
    int per_turn = conns / TURNS_PER_S > 0 ? conns / TURNS_PER_S : 1;
    long turn = 0;
    double until = now_s() + seconds, next_turn = now_s();
    struct epoll_event events[256];
    char buf[4096];
    for (;;) {
        double now = now_s();
        if (now >= until)
            break;
        if (now >= next_turn) {
            for (int k = 0; k < per_turn; k++) {
                int i = (int)((turn * per_turn + k) % conns);
                if (fds[i] < 0)
                    continue;
                ssize_t n = send(fds[i], "t", 1, MSG_NOSIGNAL);
                if (n == 1)
                    owed[i]++;
                else if (errno != EAGAIN)
                    error("send", errno);
            }
            turn++;
            next_turn += 1.0 / TURNS_PER_S;
            if (next_turn < now - 0.1) /* held up: skip the missed turns, no burst */
                next_turn = now;
            continue;
        }
        int wait_ms = (int)((next_turn - now) * 1000) + 1;
        int ready = epoll_wait(ep, events, 256, wait_ms);
        for (int e = 0; e < ready; e++) {
            int i = (int)events[e].data.u32;
            ssize_t n = recv(fds[i], buf, sizeof buf, 0);
            if (n < 0 && errno == EAGAIN)
                continue;
            if (n <= 0) {
                if (n < 0)
                    error("recv", errno);
                lost++;
                epoll_ctl(ep, EPOLL_CTL_DEL, fds[i], NULL);
                close(fds[i]);
                fds[i] = -1;
                continue;
            }
            for (ssize_t j = 0; j < n; j++)
                if (buf[j] != 't') {
                    error("echo", EBADMSG);
                    break;
                }
            if (n > owed[i])
                error("echo longer than what was sent", EBADMSG);
            owed[i] -= n;
            verified += n;
        }
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
                 ru.ru_stime.tv_usec / 1e6;
    printf("{\"connected\": %d, \"connect_s\": %.3f, \"verified\": %ld, \"lost\": %ld, "
           "\"errors\": %ld, \"first_error\": \"%s\", \"cpu_s\": %.3f}\n",
           connected, connect_s, verified, lost, errors, first_error, cpu);
    for (int i = 0; i < conns; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    return errors ? 1 : 0;
}
