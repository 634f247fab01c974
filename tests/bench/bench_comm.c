/* Collective bandwidth through mill's communicator (a benchmark: it prints, never fails on time;
 * it exits non-zero only when a result is wrong), in the manner of nccl-tests.
 *
 * For each op (--ops) and each size from --min-bytes doubling to --max-bytes: --warmup calls, a
 * barrier, then --iters calls timed together (stream-ordered on CUDA, comm_flush at the end); the
 * time per call is the slowest rank's. Then the inputs are filled afresh, one more call is made and
 * its result checked on every rank ("ok" / "WRONG"). float32 data; "bytes" is nccl-tests' size:
 * all_reduce the buffer, all_gather the gathered buffer, reduce_scatter the input buffer, all_to_all
 * what one rank sends (all peers, itself included). algbw = bytes / time; busbw = algbw * 2(n-1)/n
 * for all_reduce and algbw * (n-1)/n for the others (nccl-tests' PERFORMANCE.md).
 *
 * The floor it is held against: on the CPU (MPI backend, host buffers) a memcpy of the same bytes
 * timed on every rank at once in the same run (busbw / memcpy GB/s); on CUDA (NCCL backend, one GPU
 * per rank: comm_world_init points CUDA_VISIBLE_DEVICES at this rank's GPU, so device 0) the same op
 * called on NCCL directly (ncclAllReduce, ncclAllGather, ncclReduceScatter, grouped
 * ncclSend/ncclRecv) on an ncclComm made here the nccl-tests way (unique id broadcast over MPI), on
 * the same stream and buffers: mill/nccl is the communicator's overhead (all_gather: mill's
 * all_gatherv is n grouped broadcasts, so the gap there is the algorithm's, not a wrapper's).
 *
 * usage: mpiexec -n N bench_comm [--device cpu|cuda] [--min-bytes B] [--max-bytes B] [--iters I]
 *                                [--warmup W] [--ops all_reduce,all_gather,reduce_scatter,all_to_all] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench_util.h"
#include "trainer/comm.h"
#ifdef MILL_CUDA
#include <cuda_runtime.h>
#include <nccl.h>
#endif

enum { OP_AR, OP_AG, OP_RS, OP_A2A, N_OPS };
static const char *const op_name[N_OPS] = {"all_reduce", "all_gather", "reduce_scatter", "all_to_all"};

typedef struct {
    comm *world, *c; /* c: the comm the ops go through (world on the CPU, its NCCL twin on CUDA) */
    int gpu, n, rank;
    float *buf, *recv, *host; /* buf, recv: on the device; host: staging for fills and checks */
    size_t *counts, *displs;  /* every rank's piece, for all_gatherv / all_to_allv */
#ifdef MILL_CUDA
    cudaStream_t st;
    ncclComm_t nc; /* the direct one */
#endif
} bench;

/* Exact in float32 once summed over any sane number of ranks. */
static float val(int r, size_t i) { return (float)(((size_t)r * 131 + i * 7) % 1021); }

static int xfer(bench *b, void *dst, const void *src, size_t bytes, mill_err *e) {
#ifdef MILL_CUDA
    if (b->gpu) {
        /* on the ops' stream (non-blocking: it does not wait for the default stream), then waited for */
        cudaError_t r = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, b->st);
        if (r == cudaSuccess) r = cudaStreamSynchronize(b->st);
        return r == cudaSuccess ? 0 : mill_errf(e, "cudaMemcpy of %zu bytes: %s", bytes, cudaGetErrorString(r));
    }
#endif
    (void)b, (void)e;
    memcpy(dst, src, bytes);
    return 0;
}

/* Fresh inputs for op: total floats in buf (recv set to -1 for all_to_all). */
static int fill(bench *b, int op, size_t total, mill_err *e) {
    size_t piece = total / (size_t)b->n;
    for (size_t i = 0; i < total; i++)
        b->host[i] = op == OP_AG && i / piece != (size_t)b->rank ? -1.0f : val(b->rank, i);
    TRY(xfer(b, b->buf, b->host, total * sizeof(float), e));
    if (op != OP_A2A) return 0;
    for (size_t i = 0; i < total; i++) b->host[i] = -1.0f;
    return xfer(b, b->recv, b->host, total * sizeof(float), e);
}

/* 1 in *bad when this rank's result of op differs from what it must be. */
static int check(bench *b, int op, size_t total, int *bad, mill_err *e) {
    size_t piece = total / (size_t)b->n, lo = op == OP_RS ? (size_t)b->rank * piece : 0,
           hi = op == OP_RS ? lo + piece : total;
    TRY(xfer(b, b->host, op == OP_A2A ? b->recv : b->buf, total * sizeof(float), e));
    *bad = 0;
    for (size_t i = lo; i < hi && !*bad; i++) {
        float want = 0;
        if (op == OP_AR || op == OP_RS)
            for (int r = 0; r < b->n; r++) want += val(r, i);
        else if (op == OP_AG) want = val((int)(i / piece), i);
        else want = val((int)(i / piece), (size_t)b->rank * piece + i % piece); /* peer i/piece's slot for me */
        *bad = b->host[i] != want;
    }
    return 0;
}

/* One call of op, through mill's communicator (direct = 0) or on NCCL itself (direct = 1). */
static int call(bench *b, int op, int direct, size_t total, mill_err *e) {
    size_t piece = total / (size_t)b->n;
    if (!direct) {
        switch (op) {
        case OP_AR: return comm_all_reduce(b->c, b->buf, total, DTYPE_F32, e);
        case OP_AG: return comm_all_gatherv(b->c, b->buf, b->counts, b->displs, DTYPE_F32, e);
        case OP_RS: return comm_reduce_scatter(b->c, b->buf, piece, DTYPE_F32, e);
        default:
            return comm_all_to_allv(b->c, b->buf, b->counts, b->displs, b->recv, b->counts, b->displs, DTYPE_F32, e);
        }
    }
#ifdef MILL_CUDA
    ncclResult_t r = ncclSuccess;
    float *mine = b->buf + (size_t)b->rank * piece;
    switch (op) {
    case OP_AR: r = ncclAllReduce(b->buf, b->buf, total, ncclFloat32, ncclSum, b->nc, b->st); break;
    case OP_AG: r = ncclAllGather(mine, b->buf, piece, ncclFloat32, b->nc, b->st); break;
    case OP_RS: r = ncclReduceScatter(b->buf, mine, piece, ncclFloat32, ncclSum, b->nc, b->st); break;
    default:
        r = ncclGroupStart();
        for (int p = 0; p < b->n && r == ncclSuccess; p++) {
            r = ncclSend(b->buf + (size_t)p * piece, piece, ncclFloat32, p, b->nc, b->st);
            if (r == ncclSuccess) r = ncclRecv(b->recv + (size_t)p * piece, piece, ncclFloat32, p, b->nc, b->st);
        }
        ncclResult_t g = ncclGroupEnd();
        if (r == ncclSuccess) r = g;
    }
    if (r != ncclSuccess) return mill_errf(e, "NCCL %s (direct) failed: %s", op_name[op], ncclGetErrorString(r));
    return 0;
#else
    return mill_errf(e, "direct NCCL without CUDA");
#endif
}

/* Waits for the calls made so far. */
static int finish(bench *b, int direct, mill_err *e) {
#ifdef MILL_CUDA
    if (direct) {
        cudaError_t r = cudaStreamSynchronize(b->st);
        ncclResult_t a = ncclSuccess;
        if (r != cudaSuccess) return mill_errf(e, "stream sync: %s", cudaGetErrorString(r));
        if (ncclCommGetAsyncError(b->nc, &a) != ncclSuccess || a != ncclSuccess)
            return mill_errf(e, "NCCL (direct): asynchronous error %s", ncclGetErrorString(a));
        return 0;
    }
#endif
    (void)direct;
    return comm_flush(b->c, e);
}

/* Seconds per call (the slowest rank's) and whether the checked call's result is wrong on any rank. */
static int timed(bench *b, int op, int direct, size_t total, int warmup, int iters, double *sec, int *bad,
                 mill_err *e) {
    TRY(fill(b, op, total, e));
    for (int i = 0; i < warmup; i++) TRY(call(b, op, direct, total, e));
    TRY(finish(b, direct, e));
    TRY(comm_barrier(b->world, e));
    double t0 = bench_now();
    for (int i = 0; i < iters; i++) TRY(call(b, op, direct, total, e));
    TRY(finish(b, direct, e));
    double v[2] = {(bench_now() - t0) / iters, 0};
    TRY(fill(b, op, total, e));
    TRY(call(b, op, direct, total, e));
    TRY(finish(b, direct, e));
    TRY(check(b, op, total, bad, e));
    v[1] = *bad;
    TRY(comm_max_f64(b->world, v, 2, e));
    *sec = v[0];
    *bad = v[1] != 0;
    return 0;
}

/* Host memcpy rate at this size, all ranks copying at once (the slowest rank's). */
static int memcpy_rate(bench *b, size_t bytes, int iters, double *rate, mill_err *e) {
    size_t mult = ((size_t)16 << 20) / bytes;
    int reps = iters * (int)(mult < 1 ? 1 : mult > 1000 ? 1000 : mult);
    TRY(comm_barrier(b->world, e));
    TRY(bench_copy_rate(DEVICE_CPU, bytes, reps, rate, e));
    double s = (double)bytes / *rate;
    TRY(comm_max_f64(b->world, &s, 1, e));
    *rate = (double)bytes / s;
    return 0;
}

static int run(bench *b, const int *ops, size_t lo, size_t hi, int iters, int warmup, int *wrong, mill_err *e) {
    char host[256] = "?", gpu_name[300] = "";
    gethostname(host, sizeof host - 1);
    size_t maxf = hi / sizeof(float);
    b->counts = malloc(sizeof(size_t) * (size_t)b->n);
    b->displs = malloc(sizeof(size_t) * (size_t)b->n);
    b->host = malloc(maxf * sizeof(float));
    if (!b->counts || !b->displs || !b->host) return mill_errf(e, "out of memory for %zu-byte buffers", hi);
    if (!b->gpu) {
        b->buf = malloc(maxf * sizeof(float));
        b->recv = malloc(maxf * sizeof(float));
        if (!b->buf || !b->recv) return mill_errf(e, "out of memory for two %zu-byte buffers", hi);
        b->c = b->world;
    } else {
#ifdef MILL_CUDA
        struct cudaDeviceProp p;
        cudaError_t r = cudaSetDevice(0);
        if (r == cudaSuccess) r = cudaGetDeviceProperties(&p, 0);
        if (r == cudaSuccess) r = cudaStreamCreateWithFlags(&b->st, cudaStreamNonBlocking);
        if (r == cudaSuccess) r = cudaMalloc((void **)&b->buf, maxf * sizeof(float));
        if (r == cudaSuccess) r = cudaMalloc((void **)&b->recv, maxf * sizeof(float));
        if (r != cudaSuccess) return mill_errf(e, "CUDA setup (%zu-byte buffers): %s", hi, cudaGetErrorString(r));
        snprintf(gpu_name, sizeof gpu_name, ", GPU %s", p.name);
        TRY(comm_nccl_from(b->world, b->st, &b->c, e));
        ncclUniqueId id;
        memset(&id, 0, sizeof id);
        ncclResult_t nr = b->rank ? ncclSuccess : ncclGetUniqueId(&id);
        if (nr != ncclSuccess) return mill_errf(e, "ncclGetUniqueId: %s", ncclGetErrorString(nr));
        TRY(comm_broadcast(b->world, &id, sizeof id, DTYPE_U8, 0, e));
        if ((nr = ncclCommInitRank(&b->nc, b->n, id, b->rank)) != ncclSuccess)
            return mill_errf(e, "ncclCommInitRank (direct): %s", ncclGetErrorString(nr));
#endif
    }
    if (!b->rank) {
        printf("bench_comm: host %s (rank 0), %d ranks, device %s%s, float32, %d iters after %d warmup, "
               "time = slowest rank\n", host, b->n, b->gpu ? "cuda" : "cpu", gpu_name, iters, warmup);
        if (b->gpu)
            printf("| op | bytes | us/call | algbw GB/s | busbw GB/s | nccl us/call | nccl busbw GB/s | mill/nccl | check |\n"
                   "|---|---|---|---|---|---|---|---|---|\n");
        else
            printf("| op | bytes | us/call | algbw GB/s | busbw GB/s | memcpy GB/s | busbw/memcpy | check |\n"
                   "|---|---|---|---|---|---|---|---|\n");
        fflush(stdout);
    }
    int n_sizes = 0;
    double mrate[64];
    for (size_t s = lo; s <= hi && n_sizes < 64; s *= 2, n_sizes++)
        if (!b->gpu) TRY(memcpy_rate(b, s, iters, &mrate[n_sizes], e));
    for (int op = 0; op < N_OPS; op++) {
        if (!ops[op]) continue;
        double f = (double)(b->n - 1) / b->n * (op == OP_AR ? 2 : 1);
        for (int k = 0; k < n_sizes; k++) {
            size_t total = (lo << k) / sizeof(float);
            if (op != OP_AR) total -= total % (size_t)b->n;
            if (total < (size_t)b->n) continue; /* less than a float per rank */
            for (int r = 0; r < b->n; r++) b->counts[r] = total / (size_t)b->n, b->displs[r] = (size_t)r * b->counts[r];
            double bytes = (double)total * sizeof(float), t = 0, tn = 0;
            int bad = 0, badn = 0;
            TRY(timed(b, op, 0, total, warmup, iters, &t, &bad, e));
            if (b->gpu) TRY(timed(b, op, 1, total, warmup, iters, &tn, &badn, e));
            *wrong |= bad | badn;
            if (b->rank) continue;
            double bus = bytes / t / 1e9 * f;
            if (b->gpu)
                printf("| %s | %.0f | %.1f | %.2f | %.2f | %.1f | %.2f | %.3f | %s |\n", op_name[op], bytes, t * 1e6,
                       bytes / t / 1e9, bus, tn * 1e6, bytes / tn / 1e9 * f, tn / t,
                       bad ? "WRONG" : badn ? "WRONG (direct NCCL)" : "ok");
            else
                printf("| %s | %.0f | %.1f | %.2f | %.2f | %.2f | %.3f | %s |\n", op_name[op], bytes, t * 1e6,
                       bytes / t / 1e9, bus, mrate[k] / 1e9, bus / (mrate[k] / 1e9), bad ? "WRONG" : "ok");
            fflush(stdout);
        }
    }
    return 0;
}

static void release(bench *b) {
#ifdef MILL_CUDA
    if (b->gpu) {
        if (b->nc) ncclCommDestroy(b->nc);
        if (b->c && b->c != b->world) comm_free(b->c);
        cudaFree(b->buf);
        cudaFree(b->recv);
        if (b->st) cudaStreamDestroy(b->st);
        b->buf = b->recv = NULL;
    }
#endif
    if (!b->gpu) free(b->buf), free(b->recv);
    free(b->host), free(b->counts), free(b->displs);
}

int main(int argc, char **argv) {
    bench b = {0};
    mill_err e = {{0}};
    if (comm_world_init(&b.world, &e)) {
        fprintf(stderr, "bench_comm: rank ?: %s\n", e.msg);
        return 1;
    }
    b.n = b.world->size;
    b.rank = b.world->rank;
    const char *dev = bench_arg(argc, argv, "--device", "cpu"), *opl = bench_arg(argc, argv, "--ops", NULL);
    b.gpu = !strcmp(dev, "cuda");
    size_t lo = strtoull(bench_arg(argc, argv, "--min-bytes", "1024"), NULL, 10),
           hi = strtoull(bench_arg(argc, argv, "--max-bytes", b.gpu ? "268435456" : "67108864"), NULL, 10);
    int iters = atoi(bench_arg(argc, argv, "--iters", "20")), warmup = atoi(bench_arg(argc, argv, "--warmup", "5"));
    int ops[N_OPS] = {1, 1, 1, 1}, bad_op = 0;
    if (opl) {
        memset(ops, 0, sizeof ops);
        for (const char *p = opl; *p;) {
            size_t len = strcspn(p, ","), k = 0;
            while (k < N_OPS && (strlen(op_name[k]) != len || strncmp(p, op_name[k], len))) k++;
            if (k < N_OPS) ops[k] = 1;
            else bad_op = 1;
            p += len + (p[len] == ',');
        }
    }
#ifndef MILL_CUDA
    if (b.gpu) {
        if (!b.rank) fprintf(stderr, "bench_comm: rank 0: this mill was built without CUDA\n");
        comm_world_end(b.world, 0);
        return 2;
    }
#endif
    if ((!b.gpu && strcmp(dev, "cpu")) || lo < 4 || hi < lo || iters < 1 || warmup < 0 || bad_op) {
        if (!b.rank)
            fprintf(stderr, "bench_comm: rank 0: usage: mpiexec -n N bench_comm [--device cpu|cuda] [--min-bytes B] "
                            "[--max-bytes B] [--iters I] [--warmup W] [--ops all_reduce,all_gather,reduce_scatter,all_to_all]\n");
        comm_world_end(b.world, 0);
        return 2;
    }
    if (b.n == 1) {
        printf("bench_comm: a world of one rank moves nothing (every comm_* op returns at once); "
               "run it as mpiexec -n N bench_comm with N >= 2\n");
        comm_world_end(b.world, 0);
        return 0;
    }
    int wrong = 0;
    if (run(&b, ops, lo, hi, iters, warmup, &wrong, &e)) {
        fprintf(stderr, "bench_comm: rank %d: %s\n", b.rank, e.msg);
        fflush(stderr);
        comm_world_end(b.world, 1); /* ends every rank: the others may wait in a collective */
        return 1;
    }
    if (wrong && !b.rank) fprintf(stderr, "bench_comm: rank 0: a result was WRONG (see the check column)\n");
    release(&b);
    comm_world_end(b.world, 0);
    return wrong ? 1 : 0;
}
