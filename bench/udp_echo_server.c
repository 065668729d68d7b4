/*
 * udp_echo_server: a minimal epoll UDP echo server in C, the baseline of the UDP rows.
 *
 * One socket on 127.0.0.1, level-triggered; each readiness event echoes up to 64
 * datagrams: with plain recvfrom()/sendto() one call each, or with --mmsg in one
 * recvmmsg() and one sendmmsg() per batch. A reply that does not fit the send buffer is
 * dropped (as epolld does). No limits, no logs. Prints
 * {"event": "listening", "address": "udp:127.0.0.1:PORT"} on stdout once bound.
 *
 * Usage: udp_echo_server [--port 0] [--backlog N (ignored)] [--mmsg]
 * Build: gcc -O2 -Wall -o udp_echo_server udp_echo_server.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BATCH 64           /* datagrams per readiness event */
#define MAX_DATAGRAM 65536 /* bytes: the largest UDP payload fits */

static void die(const char *what) {
    fprintf(stderr, "udp_echo_server: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void serve_plain(int fd, char *buf) {
    for (int i = 0; i < BATCH; i++) {
        struct sockaddr_in peer;
        socklen_t len = sizeof peer;
        ssize_t n = recvfrom(fd, buf, MAX_DATAGRAM, 0, (struct sockaddr *)&peer, &len);
        if (n < 0) return; /* EAGAIN, or an ICMP error: nothing to echo */
        sendto(fd, buf, (size_t)n, 0, (struct sockaddr *)&peer, len);
    }
}

static void serve_mmsg(int fd, char *bufs) {
    static struct mmsghdr msgs[BATCH];
    static struct iovec iov[BATCH];
    static struct sockaddr_in peers[BATCH];
    for (int i = 0; i < BATCH; i++) {
        iov[i] = (struct iovec){bufs + (size_t)i * MAX_DATAGRAM, MAX_DATAGRAM};
        msgs[i].msg_hdr = (struct msghdr){.msg_name = &peers[i], .msg_namelen = sizeof peers[i],
                                          .msg_iov = &iov[i], .msg_iovlen = 1};
    }
    int n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
    if (n <= 0) return;
    for (int i = 0; i < n; i++) iov[i].iov_len = msgs[i].msg_len; /* echo what came */
    sendmmsg(fd, msgs, (unsigned)n, MSG_DONTWAIT);
}

int main(int argc, char **argv) {
    int port = 0, mmsg = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--port") && i + 1 < argc) port = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--backlog") && i + 1 < argc) ++i;
        else if (!strcmp(argv[i], "--mmsg")) mmsg = 1;
        else {
            fprintf(stderr, "usage: udp_echo_server [--port P] [--mmsg]\n");
            return 2;
        }
    }
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    socklen_t len = sizeof addr;
    if (getsockname(fd, (struct sockaddr *)&addr, &len) < 0) die("getsockname");
    int epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
    char *buf = malloc((size_t)MAX_DATAGRAM * (mmsg ? BATCH : 1));
    if (!buf) die("malloc");
    printf("{\"event\": \"listening\", \"address\": \"udp:127.0.0.1:%d\", \"io\": \"%s\"}\n",
           ntohs(addr.sin_port), mmsg ? "mmsg" : "plain");
    fflush(stdout);
    for (;;) {
        int n = epoll_wait(epfd, &ev, 1, -1);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        if (n > 0) {
            if (mmsg) serve_mmsg(fd, buf);
            else serve_plain(fd, buf);
        }
    }
}
