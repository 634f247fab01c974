/* trainer/comm_nccl.c — the NCCL backend: device buffers, ordered on the kctx's stream (so a
 * collective follows the kernels that made its data and precedes those that read it; flush waits
 * for the stream). The unique id travels from rank 0 over the MPI comm of the same ranks (the
 * nccl-tests pattern). Every NCCL / CUDA call is checked and names its op, group and rank. */
#include <cuda_runtime.h>
#include <nccl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm_impl.h"

typedef struct {
    ncclComm_t nc;
    cudaStream_t stream;
    int owns_host; /* made by a split: the host twin goes with it */
} nccl_impl;

#define NC(c) (((nccl_impl *)(c)->impl)->nc)
#define ST(c) (((nccl_impl *)(c)->impl)->stream)

#define NCCL_CHECK(c, op, call)                                                                                \
    do {                                                                                                       \
        ncclResult_t r_ = (call);                                                                              \
        if (r_ != ncclSuccess)                                                                                 \
            return mill_errf(e, "NCCL %s on group %s (rank %d of %d) failed: %s (%s)", op, (c)->name, (c)->rank, \
                             (c)->size, ncclGetErrorString(r_), ncclGetLastError(NC(c)));                      \
    } while (0)

#define CUDA_CHECK(c, op, call)                                                                                  \
    do {                                                                                                         \
        cudaError_t r_ = (call);                                                                                 \
        if (r_ != cudaSuccess)                                                                                   \
            return mill_errf(e, "CUDA %s on group %s (rank %d) failed: %s", op, (c)->name, (c)->rank,            \
                             cudaGetErrorString(r_));                                                            \
    } while (0)

static ncclDataType_t nccl_type(mill_dtype dt) {
    switch (dt) {
    case DTYPE_F32: return ncclFloat32;
    case DTYPE_I32: return ncclInt32;
    case DTYPE_I64: return ncclInt64;
    case DTYPE_U8: return ncclUint8;
    case DTYPE_BF16: return ncclBfloat16;
    default: return ncclFloat16; /* f16 / u16: moved, never reduced */
    }
}

static int n_all_reduce(comm *c, void *buf, size_t n, mill_dtype dt, mill_err *e) {
    NCCL_CHECK(c, "all_reduce", ncclAllReduce(buf, buf, n, nccl_type(dt), ncclSum, NC(c), ST(c)));
    return 0;
}

static int n_flush(comm *c, mill_err *e) {
    comm_watch_begin(c, "stream sync (NCCL)");
    cudaError_t r = cudaStreamSynchronize(ST(c));
    comm_watch_end(c);
    CUDA_CHECK(c, "stream sync", r);
    ncclResult_t ar = ncclSuccess;
    NCCL_CHECK(c, "async error", ncclCommGetAsyncError(NC(c), &ar));
    NCCL_CHECK(c, "(asynchronous)", ar);
    return 0;
}

static int n_all_gatherv(comm *c, void *buf, const size_t *counts, const size_t *displs, mill_dtype dt, mill_err *e) {
    size_t es = dtype_size(dt);
    NCCL_CHECK(c, "all_gather", ncclGroupStart());
    for (int r = 0; r < c->size; r++) {
        char *p = (char *)buf + displs[r] * es;
        NCCL_CHECK(c, "all_gather", ncclBroadcast(p, p, counts[r], nccl_type(dt), r, NC(c), ST(c)));
    }
    NCCL_CHECK(c, "all_gather", ncclGroupEnd());
    return 0;
}

static int n_reduce_scatter(comm *c, void *buf, size_t n, mill_dtype dt, mill_err *e) {
    char *mine = (char *)buf + (size_t)c->rank * n * dtype_size(dt);
    NCCL_CHECK(c, "reduce_scatter", ncclReduceScatter(buf, mine, n, nccl_type(dt), ncclSum, NC(c), ST(c)));
    return 0;
}

static int n_all_to_allv(comm *c, const void *send, const size_t *sc, const size_t *sd, void *recv, const size_t *rc,
                         const size_t *rd, mill_dtype dt, mill_err *e) {
    size_t es = dtype_size(dt);
    ncclDataType_t t = nccl_type(dt);
    NCCL_CHECK(c, "all_to_all", ncclGroupStart());
    for (int r = 0; r < c->size; r++) {
        if (sc[r]) NCCL_CHECK(c, "all_to_all", ncclSend((const char *)send + sd[r] * es, sc[r], t, r, NC(c), ST(c)));
        if (rc[r]) NCCL_CHECK(c, "all_to_all", ncclRecv((char *)recv + rd[r] * es, rc[r], t, r, NC(c), ST(c)));
    }
    NCCL_CHECK(c, "all_to_all", ncclGroupEnd());
    return 0;
}

static int n_sendrecv(comm *c, const comm_p2p *ops, int n, mill_dtype dt, mill_err *e) {
    ncclDataType_t t = nccl_type(dt);
    NCCL_CHECK(c, "send/recv", ncclGroupStart());
    for (int i = 0; i < n; i++) {
        if (ops[i].send) NCCL_CHECK(c, "send", ncclSend(ops[i].buf, ops[i].count, t, ops[i].peer, NC(c), ST(c)));
        else NCCL_CHECK(c, "recv", ncclRecv(ops[i].buf, ops[i].count, t, ops[i].peer, NC(c), ST(c)));
    }
    NCCL_CHECK(c, "send/recv", ncclGroupEnd());
    return 0;
}

static int n_broadcast(comm *c, void *buf, size_t n, mill_dtype dt, int root, mill_err *e) {
    NCCL_CHECK(c, "broadcast", ncclBroadcast(buf, buf, n, nccl_type(dt), root, NC(c), ST(c)));
    return 0;
}

static int n_barrier(comm *c, mill_err *e) {
    TRY(n_flush(c, e));
    return comm_barrier(c->host, e);
}

static int wrap(comm *host, ncclComm_t nc, cudaStream_t st, comm **out, mill_err *e) {
    comm *c = calloc(1, sizeof *c);
    nccl_impl *m = calloc(1, sizeof *m);
    if (!c || !m) {
        free(c), free(m);
        ncclCommDestroy(nc);
        return mill_errf(e, "comm: out of memory");
    }
    m->nc = nc;
    m->stream = st;
    c->ops = &comm_nccl_ops;
    c->impl = m;
    c->rank = host->rank;
    c->size = host->size;
    c->device = DEVICE_CUDA;
    c->host = host;
    c->rt = host->rt;
    snprintf(c->name, sizeof c->name, "%s", host->name);
    *out = c;
    return 0;
}

/* The NCCL twin of a split is made from the host comm's split (comm_nccl_from), so every NCCL comm
 * keeps its MPI one for host scalars. */
static int n_split(comm *c, int color, int key, const char *name, comm **out, mill_err *e) {
    comm *h;
    TRY(comm_split(c->host, color, key, name, &h, e));
    if (comm_nccl_from(h, ST(c), out, e)) {
        comm_free(h);
        return -1;
    }
    ((nccl_impl *)(*out)->impl)->owns_host = 1;
    return 0;
}

static void n_abort(comm *c) {
    ncclCommAbort(NC(c));
    ((nccl_impl *)c->impl)->nc = NULL;
    c->host->ops->abort(c->host);
}

static void n_free(comm *c) {
    nccl_impl *m = c->impl;
    if (m->nc) ncclCommDestroy(m->nc);
    if (m->owns_host) comm_free(c->host);
    free(m);
    c->impl = NULL;
}

const comm_ops comm_nccl_ops = {"nccl",      n_all_reduce, n_all_reduce, n_flush, n_all_gatherv,
                                n_reduce_scatter, n_all_to_allv, n_sendrecv, n_broadcast, n_barrier,
                                n_split,     n_abort,      n_free};

int comm_nccl_from(comm *host, void *stream, comm **out, mill_err *e) {
    if (host->ops != &comm_mpi_ops) return mill_errf(e, "comm %s: an NCCL comm is made from an MPI comm", host->name);
    ncclUniqueId id;
    memset(&id, 0, sizeof id);
    if (host->rank == 0) {
        ncclResult_t r = ncclGetUniqueId(&id);
        if (r != ncclSuccess) return mill_errf(e, "NCCL unique id for group %s: %s", host->name, ncclGetErrorString(r));
    }
    if (host->size > 1 && comm_mpi_bcast_bytes(host, &id, (int)sizeof id, e)) return -1;
    ncclComm_t nc;
    comm_watch_begin(host, "NCCL init");
    ncclResult_t r = ncclCommInitRank(&nc, host->size, id, host->rank);
    comm_watch_end(host);
    if (r != ncclSuccess)
        return mill_errf(e, "NCCL init of group %s (rank %d of %d) failed: %s", host->name, host->rank, host->size,
                         ncclGetErrorString(r));
    return wrap(host, nc, (cudaStream_t)stream, out, e);
}
