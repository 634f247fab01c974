/* trainer/comm.c — what every backend shares: the checks and the one-rank shortcut of each op,
 * the process runtime (MPI or a world of one) and the watchdog thread. */
#include "comm.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "comm_impl.h"

int comm_in_launch(void) {
    static const char *const vars[] = {"PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", NULL};
    for (const char *const *v = vars; *v; v++)
        if (getenv(*v)) return 1;
    /* srun without an MPI plugin still numbers its tasks */
    const char *n = getenv("SLURM_STEP_NUM_TASKS");
    return getenv("SLURM_PROCID") && n && atoi(n) > 1;
}

/* ----------------------------------------------------------------- watchdog */

static void *watchdog_main(void *arg) {
    comm_runtime *rt = arg;
    pthread_mutex_lock(&rt->mu);
    while (!rt->stop) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += 1;
        pthread_cond_timedwait(&rt->cv, &rt->mu, &until);
        if (rt->stop || !rt->op) continue;
        double held = mill_now() - rt->t0;
        if (held < rt->timeout) continue;
        fprintf(stderr,
                "mill: rank %d: %s on group %s (%d ranks, this rank %d) has not returned in %.0f s "
                "(MILL_COMM_TIMEOUT_S); ending the job\n",
                rt->world_rank, rt->op, rt->group, rt->group_size, rt->group_rank, held);
        fflush(stderr);
        pthread_mutex_unlock(&rt->mu);
        comm_rt_abort(rt, 3);
        _exit(3); /* not reached when the backend's abort ends the job */
    }
    pthread_mutex_unlock(&rt->mu);
    return NULL;
}

void comm_watch_idle(comm *c, int idle) {
    if (c->rt) c->rt->idle = idle;
}

void comm_watch_begin(comm *c, const char *op) {
    comm_runtime *rt = c->rt;
    if (!rt || !rt->wd_on || rt->idle) return;
    pthread_mutex_lock(&rt->mu);
    rt->op = op;
    snprintf(rt->group, sizeof rt->group, "%s", c->name);
    rt->group_size = c->size;
    rt->group_rank = c->rank;
    rt->t0 = mill_now();
    pthread_mutex_unlock(&rt->mu);
}

void comm_watch_end(comm *c) {
    comm_runtime *rt = c->rt;
    if (!rt || !rt->wd_on) return;
    pthread_mutex_lock(&rt->mu);
    rt->op = NULL;
    pthread_mutex_unlock(&rt->mu);
}

/* ------------------------------------------------------------------ runtime */

int comm_world_init(comm **world, mill_err *e) {
    *world = NULL;
    comm_runtime *rt = calloc(1, sizeof *rt);
    if (!rt) return mill_errf(e, "comm: out of memory");
    pthread_mutex_init(&rt->mu, NULL);
    pthread_cond_init(&rt->cv, NULL);
    const char *tmo = getenv("MILL_COMM_TIMEOUT_S");
    rt->timeout = tmo && atof(tmo) > 0 ? atof(tmo) : 600;
    int rc = comm_in_launch() ? comm_mpi_world(rt, world, e) : comm_local(rt, "world", DEVICE_CPU, world, e);
    if (rc) {
        free(rt);
        return -1;
    }
    rt->world_rank = (*world)->rank;
    rt->mpi_size = (*world)->size;
    if ((*world)->size > 1) {
        if (pthread_create(&rt->wd, NULL, watchdog_main, rt)) {
            comm_world_end(*world, 1);
            *world = NULL;
            return mill_errf(e, "comm: cannot start the watchdog thread");
        }
        rt->wd_on = 1;
    }
    return 0;
}

void comm_world_end(comm *world, int failed) {
    if (!world) return;
    comm_runtime *rt = world->rt;
    if (failed && world->size > 1) comm_abort(world, "this rank failed");
    if (rt->wd_on) {
        pthread_mutex_lock(&rt->mu);
        rt->stop = 1;
        pthread_cond_signal(&rt->cv);
        pthread_mutex_unlock(&rt->mu);
        pthread_join(rt->wd, NULL);
    }
    comm_free(world);
    if (rt->mpi_on) comm_rt_finalize(rt);
    pthread_mutex_destroy(&rt->mu);
    pthread_cond_destroy(&rt->cv);
    free(rt);
}

/* A comm of one rank: no backend is ever called on it. */
int comm_local(comm_runtime *rt, const char *name, mill_device dev, comm **out, mill_err *e) {
    comm *c = calloc(1, sizeof *c);
    if (!c) return mill_errf(e, "comm: out of memory");
    c->ops = &comm_mpi_ops;
    c->rank = 0;
    c->size = 1;
    c->device = dev;
    c->host = c;
    c->rt = rt;
    snprintf(c->name, sizeof c->name, "%s", name);
    *out = c;
    return 0;
}

/* --------------------------------------------------------------------- ops */

static int dt_ok(comm *c, const char *op, mill_dtype dt, int reduce, mill_err *e) {
    if (dt == DTYPE_F32 || dt == DTYPE_I32 || dt == DTYPE_I64 || (!reduce && (dt == DTYPE_U8 || dt == DTYPE_BF16 ||
                                                                           dt == DTYPE_U16 || dt == DTYPE_F16)))
        return 0;
    return mill_errf(e, "comm %s: %s of dtype %s is not supported", c->name, op, dtype_name(dt));
}

int comm_all_reduce(comm *c, void *buf, size_t count, mill_dtype dt, mill_err *e) {
    if (c->size == 1 || !count) return 0;
    TRY(dt_ok(c, "all_reduce", dt, 1, e));
    return c->ops->all_reduce(c, buf, count, dt, e);
}

int comm_all_reduce_async(comm *c, void *buf, size_t count, mill_dtype dt, mill_err *e) {
    if (c->size == 1 || !count) return 0;
    TRY(dt_ok(c, "all_reduce", dt, 1, e));
    return c->ops->all_reduce_async(c, buf, count, dt, e);
}

int comm_flush(comm *c, mill_err *e) { return c->size == 1 ? 0 : c->ops->flush(c, e); }

int comm_all_gatherv(comm *c, void *buf, const size_t *counts, const size_t *displs, mill_dtype dt, mill_err *e) {
    if (c->size == 1) return 0;
    TRY(dt_ok(c, "all_gather", dt, 0, e));
    return c->ops->all_gatherv(c, buf, counts, displs, dt, e);
}

int comm_reduce_scatter(comm *c, void *buf, size_t count, mill_dtype dt, mill_err *e) {
    if (c->size == 1 || !count) return 0;
    TRY(dt_ok(c, "reduce_scatter", dt, 1, e));
    return c->ops->reduce_scatter(c, buf, count, dt, e);
}

int comm_all_to_allv(comm *c, const void *send, const size_t *scounts, const size_t *sdispls, void *recv,
                     const size_t *rcounts, const size_t *rdispls, mill_dtype dt, mill_err *e) {
    if (c->size == 1) { /* to itself */
        if (scounts[0] != rcounts[0])
            return mill_errf(e, "comm %s: all_to_all sends %zu to itself but expects %zu", c->name, scounts[0],
                             rcounts[0]);
        if (c->device == DEVICE_CPU) memmove((char *)recv + rdispls[0] * dtype_size(dt),
                                             (const char *)send + sdispls[0] * dtype_size(dt), scounts[0] * dtype_size(dt));
        else return c->ops->all_to_allv(c, send, scounts, sdispls, recv, rcounts, rdispls, dt, e);
        return 0;
    }
    TRY(dt_ok(c, "all_to_all", dt, 0, e));
    return c->ops->all_to_allv(c, send, scounts, sdispls, recv, rcounts, rdispls, dt, e);
}

int comm_sendrecv(comm *c, const comm_p2p *ops, int n, mill_dtype dt, mill_err *e) {
    for (int i = 0; i < n; i++)
        if (ops[i].peer < 0 || ops[i].peer >= c->size || ops[i].peer == c->rank)
            return mill_errf(e, "comm %s: rank %d cannot %s rank %d (the group has %d ranks)", c->name, c->rank,
                             ops[i].send ? "send to" : "receive from", ops[i].peer, c->size);
    if (!n) return 0;
    TRY(dt_ok(c, "send/recv", dt, 0, e));
    return c->ops->sendrecv(c, ops, n, dt, e);
}

int comm_broadcast(comm *c, void *buf, size_t count, mill_dtype dt, int root, mill_err *e) {
    if (root < 0 || root >= c->size)
        return mill_errf(e, "comm %s: broadcast root %d is not a rank of the group (%d ranks)", c->name, root, c->size);
    if (c->size == 1 || !count) return 0;
    TRY(dt_ok(c, "broadcast", dt, 0, e));
    return c->ops->broadcast(c, buf, count, dt, root, e);
}

int comm_barrier(comm *c, mill_err *e) { return c->size == 1 ? 0 : c->ops->barrier(c, e); }

int comm_split(comm *c, int color, int key, const char *name, comm **out, mill_err *e) {
    /* a device comm of one keeps its backend (its all_to_all to itself is a device copy) */
    if (c->size == 1 && c->device == DEVICE_CPU) return comm_local(c->rt, name, c->device, out, e);
    return c->ops->split(c, color, key, name, out, e);
}

void comm_abort(comm *c, const char *why) {
    if (c->size == 1) return;
    fprintf(stderr, "mill: rank %d: ending the job (%s)\n", c->rt ? c->rt->world_rank : c->rank, why);
    fflush(stderr);
    c->ops->abort(c);
}

void comm_free(comm *c) {
    if (!c) return;
    if (c->impl) c->ops->free(c);
    free(c);
}
