#include "procs.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zmq.h>



/* Starts `mill ARGS...` as a child that dies with us (PDEATHSIG), output appended to p->log. */
int proc_spawn(proc *p, const char *exe, mill_err *e) {
    p->wedged = 0;
    pid_t parent = getpid(), pid = fork();
    if (pid < 0) return mill_errf(e, "cannot start %s: fork: %s", p->argv[1], strerror(errno));
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent) _exit(127);
        int fd = open(p->log, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
        execv(exe, p->argv);
        _exit(127);
    }
    p->pid = pid;
    return 0;
}

/* 0 while running; -1 with e naming how it ended. */
int proc_check(proc *p, const char *what, mill_err *e) {
    if (p->pid <= 0) return 0;
    int st;
    pid_t r = waitpid(p->pid, &st, WNOHANG | WUNTRACED);
    if (r == 0) return 0;
    pid_t pid = p->pid;
    p->pid = -1;
    if (r < 0) return mill_errf(e, "%s (pid %d) is gone: %s", what, (int)pid, strerror(errno));
    if (WIFSTOPPED(st)) { /* stopped (SIGSTOP, SIGTSTP): it would hold the run forever; it is ended here */
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        return mill_errf(e, "%s (pid %d) was stopped by signal %d and has been killed (log: %s)", what, (int)pid,
                         WSTOPSIG(st), p->log);
    }
    if (WIFSIGNALED(st)) return mill_errf(e, "%s (pid %d) was killed by signal %d (log: %s)", what, (int)pid, WTERMSIG(st), p->log);
    return mill_errf(e, "%s (pid %d) exited with status %d (log: %s)", what, (int)pid, WEXITSTATUS(st), p->log);
}

void proc_stop(proc *p) {
    if (p->pid > 0) {
        kill(p->pid, SIGKILL);
        waitpid(p->pid, NULL, 0);
    }
    p->pid = 0;
}

int proc_connect(proc *p, void *zctx, const wire_curve *curve, mill_err *e) {
    int linger = 0;
    if (p->sock) zmq_close(p->sock);
    p->sock = zmq_socket(zctx, ZMQ_DEALER);
    if (!p->sock || zmq_setsockopt(p->sock, ZMQ_LINGER, &linger, sizeof linger))
        return mill_errf(e, "cannot make a socket for %s: %s", p->addr, zmq_strerror(zmq_errno()));
    if (wire_curve_client(p->sock, curve, e)) return -1;
    if (zmq_connect(p->sock, p->addr)) return mill_errf(e, "cannot connect to %s: %s", p->addr, zmq_strerror(zmq_errno()));
    return 0;
}

/* A free loopback TCP port (the kernel's pick; the tiny race before the engine binds it is fine
 * on one host). */
int proc_free_port(int *port, mill_err *e) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) || getsockname(s, (struct sockaddr *)&a, &len)) {
        if (s >= 0) close(s);
        return mill_errf(e, "cannot find a free TCP port: %s", strerror(errno));
    }
    *port = ntohs(a.sin_port);
    close(s);
    return 0;
}

int proc_set_argv(proc *p, const char *const *args, mill_err *e) {
    size_t off = 0;
    int i = 0;
    for (; args[i]; i++) {
        size_t n = strlen(args[i]) + 1;
        if (i == PROC_MAX_ARGS || off + n > sizeof p->argbuf)
            return mill_errf(e, "%s: more than %d arguments or %zu bytes of them", args[0], PROC_MAX_ARGS,
                             sizeof p->argbuf);
        memcpy(p->argbuf + off, args[i], n);
        p->argv[i] = p->argbuf + off;
        off += n;
    }
    p->argv[i] = NULL;
    return 0;
}

/* ------------------------------------------------------------------ requests */

/* Sends b (made by proc_msg) to p; *id gets its request id. */
int proc_send(procs *ps, proc *p, const char *what, wire_builder *b, uint64_t *id, mill_err *e) {
    *id = ps->next_id - 1; /* the builder was made with next_id++ */
    int rc = wire_send(p->sock, NULL, 0, b, e);
    wire_builder_free(b);
    return rc ? mill_err_wrap(e, "%s", what) : 0;
}

/* Waits for p's reply to request id (of type `want`), checking that p lives. */
int proc_wait(proc *p, const char *what, uint64_t id, const char *want, double timeout_s, double heartbeat_s,
              wire_msg **reply, wire_raw **raw, mill_err *e) {
    *reply = NULL;
    *raw = NULL;
    double t_end = mill_now() + timeout_s, heard = mill_now();
    for (;;) {
        int x = wire_recv(p->sock, 0, 200, NULL, NULL, reply, raw, e);
        if (x < 0) return mill_err_wrap(e, "%s sent a malformed reply", what);
        if (x == 0) {
            heard = mill_now();
            if (!strcmp(wire_type(*reply), "progress") && wire_id(*reply) == id) { /* training micro-batches */
                int64_t done = 0, total = 1;
                mill_err pe;
                wire_get_int(*reply, "done", 0, 0, 0, INT64_MAX, &done, &pe);
                wire_get_int(*reply, "total", 0, 1, 1, INT64_MAX, &total, &pe);
                if (isatty(2)) fprintf(stderr, "\r  training: %lld/%lld sequences   ", (long long)done, (long long)total);
                if (isatty(2) && done == total) fprintf(stderr, "\r%40s\r", "");
                wire_msg_free(*reply);
                wire_recv_free(*raw);
                continue;
            }
            if (wire_id(*reply) != id) { /* a late reply to an earlier request */
                wire_msg_free(*reply);
                wire_recv_free(*raw);
                continue;
            }
            if (!strcmp(wire_type(*reply), "error")) {
                char why[900];
                wire_get_str(*reply, "message", 0, "?", why, sizeof why, e);
                wire_msg_free(*reply);
                wire_recv_free(*raw);
                *reply = NULL;
                return mill_errf(e, "%s: %s", what, why);
            }
            if (strcmp(wire_type(*reply), want)) {
                mill_errf(e, "%s answered \"%s\", expected \"%s\"", what, wire_type(*reply), want);
                wire_msg_free(*reply);
                wire_recv_free(*raw);
                *reply = NULL;
                return -1;
            }
            return 0;
        }
        if (proc_check(p, what, e)) return -1;
        if (heartbeat_s > 0 && mill_now() - heard > heartbeat_s) {
            p->wedged = 1; /* alive (proc_check) but silent: stuck in a loop, a lock or a device */
            return mill_errf(e, "%s sent nothing for %g s (its heartbeat): wedged", what, heartbeat_s);
        }
        if (mill_now() > t_end) return mill_errf(e, "%s at %s did not answer within %g s", what, p->addr, timeout_s);
    }
}

int proc_rpc(procs *ps, proc *p, const char *what, wire_builder *b, const char *want, double timeout_s,
               wire_msg **reply, wire_raw **raw, mill_err *e) {
    uint64_t id;
    if (proc_send(ps, p, what, b, &id, e)) return -1;
    return proc_wait(p, what, id, want, timeout_s, 0, reply, raw, e);
}

wire_builder *proc_msg(procs *ps, const char *type) { return wire_builder_new(type, ps->next_id++); }

/* A request with no payload whose reply carries nothing we need. */
int proc_rpc_simple(procs *ps, proc *p, const char *what, const char *type, const char *want, double tmo, mill_err *e) {
    wire_builder *b = proc_msg(ps, type);
    wire_msg *r;
    wire_raw *raw;
    if (!b) return mill_errf(e, "out of memory");
    if (proc_rpc(ps, p, what, b, want, tmo, &r, &raw, e)) return -1;
    wire_msg_free(r);
    wire_recv_free(raw);
    return 0;
}
