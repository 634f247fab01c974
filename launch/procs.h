/* launch/procs.h — the processes a run is made of, and requests to them.
 * Owns: starting `mill` children that die with their parent (PR_SET_PDEATHSIG), noticing how one
 * ended, restarting it as it was started, the DEALER socket to each, and request/reply over it
 * (common/wire.h messages; a reply is matched by request id, an `error` reply becomes an error
 * naming the peer, and a peer that dies or stays silent past the timeout is an error too). */
#ifndef MILL_PROCS_H
#define MILL_PROCS_H

#include <stdint.h>
#include <sys/types.h>

#include "../common/wire.h"

#define PROC_MAX_ARGS 31

typedef struct {
    pid_t pid;        /* 0: external (not ours to restart) */
    char addr[256];   /* where it listens */
    char log[1200];   /* its stdout/stderr */
    char *argv[PROC_MAX_ARGS + 1]; /* how it was started (for restarts) */
    char argbuf[4096];
    void *sock;       /* our DEALER to it */
    int wedged;       /* alive but silent past its heartbeat (proc_wait): to be killed and restarted */
} proc;

/* A run's processes: the trainer worker and up to 64 engines; next_id numbers requests. */
typedef struct {
    void *zctx;
    wire_curve curve;     /* the run's keys when its sockets use CURVE (curve.on) */
    char curve_file[1200]; /* and the file they come from (passed to the processes it starts) */
    proc trainer;
    proc engines[64];
    int n_engines;
    uint64_t next_id;
    char exe[1024];
} procs;

/* Starts `exe p->argv...` as a child whose output goes to p->log. */
int proc_spawn(proc *p, const char *exe, mill_err *e);
/* 0 while p runs (or is not ours); -1 with e naming how it ended. A stopped p (SIGSTOP) is killed and
 * reported as ended: within one check it is restarted like a dead one. */
int proc_check(proc *p, const char *what, mill_err *e);
void proc_stop(proc *p);
/* A fresh DEALER socket to p->addr (a CURVE client when curve is on). */
int proc_connect(proc *p, void *zctx, const wire_curve *curve, mill_err *e);
/* A free loopback TCP port. */
int proc_free_port(int *port, mill_err *e);
/* p->argv = args (NULL-terminated; copied); an error when they do not fit. */
int proc_set_argv(proc *p, const char *const *args, mill_err *e);

/* A new request (free it only if it is not sent). */
wire_builder *proc_msg(procs *ps, const char *type);
/* Sends b (consumed); *id gets its request id. */
int proc_send(procs *ps, proc *p, const char *what, wire_builder *b, uint64_t *id, mill_err *e);
/* Waits for the reply to id of type `want`; training `progress` messages show on a terminal.
 * heartbeat_s > 0: p must send something (progress counts) at least that often, else it is
 * marked wedged and the wait fails at once, well before timeout_s. */
int proc_wait(proc *p, const char *what, uint64_t id, const char *want, double timeout_s, double heartbeat_s,
              wire_msg **reply, wire_raw **raw, mill_err *e);
int proc_rpc(procs *ps, proc *p, const char *what, wire_builder *b, const char *want, double timeout_s,
             wire_msg **reply, wire_raw **raw, mill_err *e);
/* A request with no payload whose reply carries nothing needed. */
int proc_rpc_simple(procs *ps, proc *p, const char *what, const char *type, const char *want, double tmo,
                    mill_err *e);

#endif
