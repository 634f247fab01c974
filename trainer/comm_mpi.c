/* trainer/comm_mpi.c — the MPI backend: host buffers, CPU ranks, and the job's runtime
 * (MPI_Init_thread, MPI_Abort, MPI_Finalize). MPI errors are returned (MPI_ERRORS_RETURN), never
 * fatal inside MPI, so each names its op, group and rank. Large counts use MPI-4's _c calls. */
#include <limits.h>
#include <mpi.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "comm_impl.h"

/* GCC reads MPICH's MPI_STATUSES_IGNORE (a null pointer) as a zero-sized array */
#pragma GCC diagnostic ignored "-Wstringop-overflow"

typedef struct {
    MPI_Comm mc;
    MPI_Request *reqs; /* all_reduce_async in flight */
    int n_reqs, cap_reqs;
} mpi_impl;

#define MC(c) (((mpi_impl *)(c)->impl)->mc)

static int mpi_fail(comm *c, const char *op, int rc, mill_err *e) {
    char s[MPI_MAX_ERROR_STRING];
    int n = 0;
    MPI_Error_string(rc, s, &n);
    return mill_errf(e, "MPI %s on group %s (rank %d of %d) failed: %s", op, c->name, c->rank, c->size, s);
}

/* Every MPI call goes through this: watched while it blocks, its error named. */
#define MPI_CHECK(c, op, call)                                 \
    do {                                                       \
        comm_watch_begin(c, op);                               \
        int rc_ = (call);                                      \
        comm_watch_end(c);                                     \
        if (rc_ != MPI_SUCCESS) return mpi_fail(c, op, rc_, e); \
    } while (0)

static MPI_Datatype mpi_type(mill_dtype dt) {
    switch (dt) {
    case DTYPE_F32: return MPI_FLOAT;
    case DTYPE_I32: return MPI_INT32_T;
    case DTYPE_I64: return MPI_INT64_T;
    case DTYPE_U8: return MPI_UINT8_T;
    default: return MPI_UINT16_T; /* bf16 / f16 / u16: moved, never reduced */
    }
}

#if MPI_VERSION >= 4
typedef MPI_Count mcount;
typedef MPI_Aint mdisp;
#define CNT(x) ((MPI_Count)(x))
#define MPI_(f) f##_c
#else
typedef int mcount;
typedef int mdisp;
#define CNT(x) ((int)(x))
#define MPI_(f) f
#endif

static int count_ok(comm *c, const char *op, size_t n, mill_err *e) {
#if MPI_VERSION >= 4
    (void)c, (void)op, (void)n, (void)e;
    return 0;
#else
    return n > INT_MAX ? mill_errf(e, "MPI %s on group %s: %zu elements need MPI 4 (large counts)", op, c->name, n) : 0;
#endif
}

static int m_all_reduce(comm *c, void *buf, size_t n, mill_dtype dt, mill_err *e) {
    TRY(count_ok(c, "all_reduce", n, e));
    MPI_CHECK(c, "all_reduce", MPI_(MPI_Allreduce)(MPI_IN_PLACE, buf, CNT(n), mpi_type(dt), MPI_SUM, MC(c)));
    return 0;
}

static int m_all_reduce_async(comm *c, void *buf, size_t n, mill_dtype dt, mill_err *e) {
    mpi_impl *m = c->impl;
    TRY(count_ok(c, "all_reduce", n, e));
    if (m->n_reqs == m->cap_reqs) {
        int cap = m->cap_reqs ? 2 * m->cap_reqs : 64;
        MPI_Request *r = realloc(m->reqs, sizeof *r * (size_t)cap);
        if (!r) return mill_errf(e, "comm %s: out of memory", c->name);
        m->reqs = r;
        m->cap_reqs = cap;
    }
    MPI_CHECK(c, "all_reduce (started)",
              MPI_(MPI_Iallreduce)(MPI_IN_PLACE, buf, CNT(n), mpi_type(dt), MPI_SUM, m->mc, &m->reqs[m->n_reqs]));
    m->n_reqs++;
    return 0;
}

static int m_flush(comm *c, mill_err *e) {
    mpi_impl *m = c->impl;
    int n = m->n_reqs;
    m->n_reqs = 0;
    if (n) MPI_CHECK(c, "all_reduce (wait)", MPI_Waitall(n, m->reqs, MPI_STATUSES_IGNORE));
    return 0;
}

static int m_all_gatherv(comm *c, void *buf, const size_t *counts, const size_t *displs, mill_dtype dt, mill_err *e) {
    mcount *cn = malloc(sizeof *cn * (size_t)c->size);
    mdisp *dp = malloc(sizeof *dp * (size_t)c->size);
    if (!cn || !dp) {
        free(cn), free(dp);
        return mill_errf(e, "comm %s: out of memory", c->name);
    }
    int bad = 0;
    for (int r = 0; r < c->size; r++) {
        bad |= count_ok(c, "all_gather", counts[r] + displs[r], e);
        cn[r] = CNT(counts[r]);
        dp[r] = (mdisp)displs[r];
    }
    int rc = bad ? MPI_ERR_COUNT : MPI_SUCCESS;
    if (!bad) {
        comm_watch_begin(c, "all_gather");
        rc = MPI_(MPI_Allgatherv)(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buf, cn, dp, mpi_type(dt), MC(c));
        comm_watch_end(c);
    }
    free(cn);
    free(dp);
    if (bad) return -1;
    return rc == MPI_SUCCESS ? 0 : mpi_fail(c, "all_gather", rc, e);
}

static int m_reduce_scatter(comm *c, void *buf, size_t n, mill_dtype dt, mill_err *e) {
    TRY(count_ok(c, "reduce_scatter", n * (size_t)c->size, e));
    /* in place, MPI leaves the result at the front; it belongs at this rank's place */
    MPI_CHECK(c, "reduce_scatter", MPI_(MPI_Reduce_scatter_block)(MPI_IN_PLACE, buf, CNT(n), mpi_type(dt), MPI_SUM, MC(c)));
    size_t es = dtype_size(dt);
    if (c->rank) memmove((char *)buf + (size_t)c->rank * n * es, buf, n * es);
    return 0;
}

static int m_all_to_allv(comm *c, const void *send, const size_t *sc, const size_t *sd, void *recv, const size_t *rc,
                         const size_t *rd, mill_dtype dt, mill_err *e) {
    size_t p = (size_t)c->size;
    mcount *cn = malloc(sizeof *cn * 2 * p);
    mdisp *dp = malloc(sizeof *dp * 2 * p);
    if (!cn || !dp) {
        free(cn), free(dp);
        return mill_errf(e, "comm %s: out of memory", c->name);
    }
    int bad = 0;
    for (size_t r = 0; r < p; r++) {
        bad |= count_ok(c, "all_to_all", sc[r] + sd[r], e) || count_ok(c, "all_to_all", rc[r] + rd[r], e);
        cn[r] = CNT(sc[r]), dp[r] = (mdisp)sd[r];
        cn[p + r] = CNT(rc[r]), dp[p + r] = (mdisp)rd[r];
    }
    int x = MPI_SUCCESS;
    if (!bad) {
        MPI_Datatype t = mpi_type(dt);
        comm_watch_begin(c, "all_to_all");
        x = MPI_(MPI_Alltoallv)(send, cn, dp, t, recv, cn + p, dp + p, t, MC(c));
        comm_watch_end(c);
    }
    free(cn);
    free(dp);
    if (bad) return -1;
    return x == MPI_SUCCESS ? 0 : mpi_fail(c, "all_to_all", x, e);
}

static int m_sendrecv(comm *c, const comm_p2p *ops, int n, mill_dtype dt, mill_err *e) {
    MPI_Request *r = malloc(sizeof *r * (size_t)n);
    if (!r) return mill_errf(e, "comm %s: out of memory", c->name);
    int x = MPI_SUCCESS, posted = 0;
    for (int i = 0; i < n && x == MPI_SUCCESS; i++, posted++) {
        if (count_ok(c, "send/recv", ops[i].count, e)) {
            x = MPI_ERR_COUNT;
            break;
        }
        x = ops[i].send ? MPI_(MPI_Isend)(ops[i].buf, CNT(ops[i].count), mpi_type(dt), ops[i].peer, 0, MC(c), &r[i])
                        : MPI_(MPI_Irecv)(ops[i].buf, CNT(ops[i].count), mpi_type(dt), ops[i].peer, 0, MC(c), &r[i]);
    }
    if (x == MPI_SUCCESS) {
        comm_watch_begin(c, "send/recv");
        x = MPI_Waitall(posted, r, MPI_STATUSES_IGNORE);
        comm_watch_end(c);
    }
    free(r);
    return x == MPI_SUCCESS ? 0 : mpi_fail(c, "send/recv", x, e);
}

static int m_broadcast(comm *c, void *buf, size_t n, mill_dtype dt, int root, mill_err *e) {
    TRY(count_ok(c, "broadcast", n, e));
    if (c->rt && c->rt->idle) { /* a rank waiting for work: MPI's blocking wait spins a core; poll gently */
        MPI_Request rq;
        int done = 0, rc = MPI_(MPI_Ibcast)(buf, CNT(n), mpi_type(dt), root, MC(c), &rq);
        for (long us = 50; rc == MPI_SUCCESS; us = us < 5000 ? 2 * us : 5000) {
            rc = MPI_Test(&rq, &done, MPI_STATUS_IGNORE);
            if (done || rc != MPI_SUCCESS) break;
            struct timespec ts = {0, us * 1000};
            nanosleep(&ts, NULL);
        }
        return rc == MPI_SUCCESS ? 0 : mpi_fail(c, "broadcast", rc, e);
    }
    MPI_CHECK(c, "broadcast", MPI_(MPI_Bcast)(buf, CNT(n), mpi_type(dt), root, MC(c)));
    return 0;
}

static int m_barrier(comm *c, mill_err *e) {
    MPI_CHECK(c, "barrier", MPI_Barrier(MC(c)));
    return 0;
}

static int wrap(comm_runtime *rt, MPI_Comm mc, const char *name, comm **out, mill_err *e) {
    comm *c = calloc(1, sizeof *c);
    mpi_impl *m = calloc(1, sizeof *m);
    if (!c || !m) {
        free(c), free(m);
        MPI_Comm_free(&mc);
        return mill_errf(e, "comm: out of memory");
    }
    MPI_Comm_set_errhandler(mc, MPI_ERRORS_RETURN);
    MPI_Comm_rank(mc, &c->rank);
    MPI_Comm_size(mc, &c->size);
    m->mc = mc;
    c->ops = &comm_mpi_ops;
    c->impl = m;
    c->device = DEVICE_CPU;
    c->host = c;
    c->rt = rt;
    snprintf(c->name, sizeof c->name, "%s", name);
    *out = c;
    return 0;
}

static int m_split(comm *c, int color, int key, const char *name, comm **out, mill_err *e) {
    MPI_Comm nc;
    MPI_CHECK(c, "split", MPI_Comm_split(MC(c), color, key, &nc));
    return wrap(c->rt, nc, name, out, e);
}

static void m_abort(comm *c) { MPI_Abort(MC(c), 1); }

static void m_free(comm *c) {
    mpi_impl *m = c->impl;
    if (m->mc != MPI_COMM_NULL) MPI_Comm_free(&m->mc);
    free(m->reqs);
    free(m);
    c->impl = NULL;
}

const comm_ops comm_mpi_ops = {"mpi",      m_all_reduce, m_all_reduce_async, m_flush, m_all_gatherv,
                               m_reduce_scatter, m_all_to_allv, m_sendrecv, m_broadcast, m_barrier,
                               m_split,    m_abort,      m_free};

/* CUDA_VISIBLE_DEVICES for the local_rank-th rank of a machine: its entry of the list already
 * there, or the GPU of that number. A list too short is left alone (CPU ranks need no GPU; GPU
 * ranks sharing one are refused by NCCL, by name). */
static void comm_pick_gpu(int local_rank) {
    const char *v = getenv("CUDA_VISIBLE_DEVICES");
    char pick[64];
    if (!v || !*v) {
        snprintf(pick, sizeof pick, "%d", local_rank);
    } else {
        const char *p = v;
        for (int i = 0; i < local_rank && p; i++) {
            p = strchr(p, ',');
            if (p) p++;
        }
        if (!p || !*p) return;
        size_t n = strcspn(p, ",");
        snprintf(pick, sizeof pick, "%.*s", (int)(n < 63 ? n : 63), p);
    }
    setenv("CUDA_VISIBLE_DEVICES", pick, 1);
}

int comm_mpi_world(comm_runtime *rt, comm **world, mill_err *e) {
    int provided = 0, rc = MPI_Init_thread(NULL, NULL, MPI_THREAD_MULTIPLE, &provided);
    if (rc != MPI_SUCCESS) return mill_errf(e, "MPI_Init_thread failed (error %d)", rc);
    rt->mpi_on = 1;
    /* the watchdog ends the job from its own thread: MPI_Abort needs MPI_THREAD_MULTIPLE for that */
    rt->abort_ok = provided >= MPI_THREAD_MULTIPLE;
    MPI_Comm mc, node;
    if (MPI_Comm_dup(MPI_COMM_WORLD, &mc) != MPI_SUCCESS) return mill_errf(e, "MPI_Comm_dup of the world failed");
    /* one GPU per rank: the i-th rank on a machine sees only the i-th of its visible GPUs (set
     * before anything touches CUDA; CPU ranks ignore it), and a part of its cores */
    int lr = 0, ln = 1;
    if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) == MPI_SUCCESS) {
        MPI_Comm_rank(node, &lr);
        MPI_Comm_size(node, &ln);
        MPI_Comm_free(&node);
    }
    if (ln > 1) {
        comm_pick_gpu(lr);
        /* the ranks of a machine share its cores: each one's OpenMP pool gets its part */
        long cores = sysconf(_SC_NPROCESSORS_ONLN);
        if (!getenv("OMP_NUM_THREADS")) omp_set_num_threads(cores / ln > 1 ? (int)(cores / ln) : 1);
    }
    return wrap(rt, mc, "world", world, e);
}

void comm_rt_abort(comm_runtime *rt, int code) {
    if (rt->mpi_on && rt->abort_ok) MPI_Abort(MPI_COMM_WORLD, code);
}

void comm_rt_finalize(comm_runtime *rt) {
    if (rt->mpi_on) MPI_Finalize();
    rt->mpi_on = 0;
}

static int reduce_f64(comm *c, double *v, int n, MPI_Op op, mill_err *e) {
    comm *h = c->host;
    if (h->size == 1 || n == 0) return 0;
    MPI_CHECK(h, "all_reduce (f64)", MPI_Allreduce(MPI_IN_PLACE, v, n, MPI_DOUBLE, op, MC(h)));
    return 0;
}

int comm_sum_f64(comm *c, double *v, int n, mill_err *e) { return reduce_f64(c, v, n, MPI_SUM, e); }
int comm_max_f64(comm *c, double *v, int n, mill_err *e) { return reduce_f64(c, v, n, MPI_MAX, e); }

/* For comm_nccl.c: a byte broadcast over an MPI comm (the NCCL unique id). */
int comm_mpi_bcast_bytes(comm *c, void *buf, int n, mill_err *e) {
    MPI_CHECK(c, "broadcast (nccl id)", MPI_Bcast(buf, n, MPI_BYTE, 0, MC(c)));
    return 0;
}
