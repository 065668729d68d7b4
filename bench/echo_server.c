/*
 * echo_server: a minimal epoll echo server in C, the practical limit on this
 * machine for the benchmark's ratios.
 *
 * Level-triggered, one recv() per readiness event, send() at once and buffer
 * only the remainder (then EPOLLOUT on, EPOLLIN off until it is flushed), accept
 * until EAGAIN. No features: no limits, timeouts, logs or stats. Prints
 * {"event": "listening", "address": "127.0.0.1:PORT"} on stdout once bound.
 *
 * --processes N: N processes, each with its own SO_REUSEPORT listener on the same port (the
 * kernel spreads the connections by 4-tuple), as epolld's `workers: N` does: the reference of
 * the 100,000-connection workload, where one process may hold at most 20,000 descriptors.
 * The first process binds (port 0 picks the port), forks the others, and prints the address
 * once they all listen; they exit when it does (PR_SET_PDEATHSIG).
 *
 * Usage: echo_server [--port 0] [--backlog 511] [--processes 1]
 * Build: gcc -O2 -Wall -o echo_server echo_server.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define RECV_SIZE (256 * 1024) /* bytes per recv(), as epolld's default read size */
#define MAX_EVENTS 1024

struct pending { char *buf; size_t len, off; };

static struct pending *pend; /* indexed by fd */
static int max_fds, epfd;

static void die(const char *what) {
    fprintf(stderr, "echo_server: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void watch(int fd, uint32_t events, int op) {
    struct epoll_event ev = {.events = events, .data.fd = fd};
    if (epoll_ctl(epfd, op, fd, &ev) < 0) die("epoll_ctl");
}

static void drop(int fd) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    free(pend[fd].buf);
    pend[fd] = (struct pending){0};
}

static void on_writable(int fd) {
    struct pending *p = &pend[fd];
    while (p->off < p->len) {
        ssize_t w = send(fd, p->buf + p->off, p->len - p->off, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN) return;
            if (errno == EINTR) continue;
            drop(fd);
            return;
        }
        p->off += (size_t)w;
    }
    free(p->buf);
    *p = (struct pending){0};
    watch(fd, EPOLLIN, EPOLL_CTL_MOD);
}

static void on_readable(int fd, char *buf) {
    ssize_t n = recv(fd, buf, RECV_SIZE, 0);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
        drop(fd);
        return;
    }
    if (n < 0) return;
    ssize_t w = send(fd, buf, (size_t)n, MSG_NOSIGNAL);
    if (w < 0) {
        if (errno != EAGAIN) { drop(fd); return; }
        w = 0;
    }
    if (w < n) { /* the peer is slow: keep the rest, stop reading until it is sent */
        struct pending *p = &pend[fd];
        p->len = (size_t)(n - w);
        p->off = 0;
        p->buf = malloc(p->len);
        if (!p->buf) die("malloc");
        memcpy(p->buf, buf + w, p->len);
        watch(fd, EPOLLOUT, EPOLL_CTL_MOD);
    }
}

static void on_acceptable(int lfd, int backlog) {
    for (int i = 0; i < backlog; i++) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return; /* EAGAIN, or EMFILE: a real server would back off */
        if (fd >= max_fds) { close(fd); continue; }
        watch(fd, EPOLLIN, EPOLL_CTL_ADD);
    }
}

/* A listening socket on 127.0.0.1:port; with reuseport, one of a SO_REUSEPORT group. */
static int listen_on(int port, int backlog, int reuseport) {
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0) die("socket");
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (reuseport && setsockopt(lfd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) < 0)
        die("SO_REUSEPORT");
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
    if (listen(lfd, backlog) < 0) die("listen");
    return lfd;
}

int main(int argc, char **argv) {
    int port = 0, backlog = 511, processes = 1;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--backlog")) backlog = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--processes")) processes = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "usage: echo_server [--port N] [--backlog N] [--processes N]\n");
            return 2;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    max_fds = (int)rl.rlim_cur;
    pend = calloc((size_t)max_fds, sizeof *pend);
    char *buf = malloc(RECV_SIZE);
    if (!pend || !buf) die("malloc");

    int lfd = listen_on(port, backlog, processes > 1);
    struct sockaddr_in sa;
    socklen_t len = sizeof sa;
    getsockname(lfd, (struct sockaddr *)&sa, &len);
    pid_t leader = getpid();
    int ready[2]; /* each sibling writes a byte here once it listens */
    if (pipe(ready) < 0) die("pipe");
    for (int i = 1; i < processes; i++) {
        pid_t pid = fork();
        if (pid < 0) die("fork");
        if (pid == 0) { /* a sibling: a listener of its own in the same group, then serve */
            prctl(PR_SET_PDEATHSIG, SIGTERM);
            if (getppid() != leader) return 0;
            close(lfd);
            lfd = listen_on(ntohs(sa.sin_port), backlog, 1);
            if (write(ready[1], "r", 1) != 1) die("write");
            break;
        }
    }
    if (getpid() == leader) { /* wait until every sibling listens */
        char c;
        for (int i = 1; i < processes; i++)
            if (read(ready[0], &c, 1) != 1) die("a sibling did not start");
    }
    close(ready[0]);
    close(ready[1]);
    if (getpid() == leader)
    printf("{\"event\": \"listening\", \"address\": \"127.0.0.1:%d\", \"server\": \"c-epoll\"}\n",
           ntohs(sa.sin_port));
    fflush(stdout);

    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");
    watch(lfd, EPOLLIN, EPOLL_CTL_ADD);
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(epfd, evs, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            uint32_t e = evs[i].events;
            if (fd == lfd) { on_acceptable(lfd, backlog); continue; }
            if (pend[fd].buf) { /* flushing: only EPOLLOUT (or HUP/ERR) is armed */
                on_writable(fd);
                continue;
            }
            if (e & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_readable(fd, buf);
        }
    }
}
