#include "backend.h"

#ifdef MILL_CUDA /* first: cblas.h pulls in complex.h, whose macro I would clash with op parameters */
#include "../common/cuda_util.h"
#include "cuda/cuda_ops.h"
#endif

#include <cblas.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NO_CUDA_MSG "this mill was built without CUDA (nvcc was not found, or MILL_NO_CUDA was set)"

#ifdef MILL_CUDA
/* MILL_PROFILE's table: wall time per op name, each op bracketed by device syncs. */
#define KPROF_OPS 128
struct kprof {
    char *name[KPROF_OPS]; /* owned copies: callers may pass names built on the stack (per-shape rows) */
    long calls[KPROF_OPS];
    double sec[KPROF_OPS];
    double t_start;
};
#endif

/* ---- op_linear's row blocks (kernels/dense.c), chosen for the OpenBLAS kernel this process loaded.
 * A row's bits must not depend on its batch: the engine's decode and the trainer feed the same
 * token in different company. Measured on one CPU through OPENBLAS_CORETYPE (0.3.21): the Prescott
 * kernels give a row the same bits in any call of a multiple of 4 rows; the Haswell and SkylakeX
 * ones only in calls of one fixed row count, since a row's place in a 16-row call and the call's
 * length change its summation (16 vs 32 rows differ). So probe: the smallest R whose R-row calls
 * give every row the same bits wherever it sits, and whether calls of several blocks agree. */
#define BLAS_PROBE_MAX_R 32

static uint32_t probe_next(uint32_t *s) {
    *s = *s * 1664525u + 1013904223u;
    return *s;
}

/* One shape: R-row calls at every shift agree row by row (and, in *batch, a 4R-row call agrees
 * with four R-row calls). */
static int probe_shape(int R, int N, int K, float *x, float *w, float *a, float *b, int *batch) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, R, N, K, 1.0f, x, K, w, K, 0.0f, a, N);
    for (int s = 1; s < R; s++) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, R, N, K, 1.0f, x + (long)s * K, K, w, K, 0.0f, b, N);
        for (int r = s; r < R; r++)
            if (memcmp(a + (long)r * N, b + (long)(r - s) * N, sizeof(float) * (size_t)N)) return 0;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, 4 * R, N, K, 1.0f, x, K, w, K, 0.0f, a, N);
    for (int i = 0; i < 4; i++)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, R, N, K, 1.0f, x + (long)i * R * K, K, w, K, 0.0f,
                    b + (long)i * R * N, N);
    if (memcmp(a, b, sizeof(float) * 4 * (size_t)R * N)) *batch = 0;
    return 1;
}

static int blas_rows_probe(kctx *k, mill_err *e) {
    static const int shapes[][2] = {{64, 64}, {40, 72}, {256, 256}, {24, 1024}}; /* (N, K): tails, sizes */
    int maxn = 256, maxk = 1024;
    float *x = malloc(sizeof(float) * 4 * BLAS_PROBE_MAX_R * maxk), *w = malloc(sizeof(float) * (size_t)maxn * maxk);
    float *a = malloc(sizeof(float) * 4 * BLAS_PROBE_MAX_R * maxn), *b = malloc(sizeof(float) * 4 * BLAS_PROBE_MAX_R * maxn);
    int rc = 0;
    if (!x || !w || !a || !b) rc = mill_errf(e, "kctx_init: out of memory for the sgemm probe");
    uint32_t seed = 12345;
    for (long i = 0; !rc && i < 4L * BLAS_PROBE_MAX_R * maxk; i++) x[i] = (float)(probe_next(&seed) >> 8) / 16777216.0f - 0.5f;
    for (long i = 0; !rc && i < (long)maxn * maxk; i++) w[i] = (float)(probe_next(&seed) >> 8) / 16777216.0f - 0.5f;
    k->gemm_rows = 1; /* gemv per row: the same path for every row, whatever the kernel */
    k->gemm_batch = 0;
    for (int R = 4; !rc && R <= BLAS_PROBE_MAX_R; R *= 2) {
        int ok = 1, batch = 1;
        for (size_t i = 0; ok && i < sizeof shapes / sizeof *shapes; i++)
            ok = probe_shape(R, shapes[i][0], shapes[i][1], x, w, a, b, &batch);
        if (ok) {
            k->gemm_rows = R;
            k->gemm_batch = batch;
            break;
        }
    }
    free(x);
    free(w);
    free(a);
    free(b);
    return rc;
}

int kctx_init(kctx *k, mill_device dev, mill_err *e) {
    memset(k, 0, sizeof *k);
    k->device = dev;
    /* OpenBLAS runs single-threaded inside our OpenMP-split GEMMs (kernels/dense.c): a process-wide
     * library setting, made here because every CPU op goes through a kctx. */
    if (dev == DEVICE_CPU) {
        openblas_set_num_threads(1);
        return blas_rows_probe(k, e);
    }
#ifdef MILL_CUDA
    k->shadows = calloc(KCTX_SHADOWS, sizeof(kctx_shadow));
    k->checks = calloc(1, sizeof(kctx_checks));
    if (!k->shadows || !k->checks || cuda_backend_init(&k->cublas, &k->stream, &k->blas_ws, e)) {
        if (!k->shadows || !k->checks) mill_errf(e, "kctx_init: out of memory");
        cuda_backend_free(k->cublas, k->stream, k->blas_ws);
        free(k->shadows);
        free(k->checks);
        memset(k, 0, sizeof *k);
        return -1;
    }
    const char *moe = getenv("MILL_MOE_GEMM");
    k->moe_cublas = moe && !strcmp(moe, "cublas");
    const char *skinny = getenv("MILL_SKINNY");
    k->linear_cublas = skinny && !strcmp(skinny, "0");
    const char *att = getenv("MILL_ATTENTION");
    k->attention_tc = att && !strcmp(att, "tc");
    const char *prof = getenv("MILL_PROFILE");
    if (prof && !strcmp(prof, "1") && (k->prof = calloc(1, sizeof *k->prof))) k->prof->t_start = mill_now();
    return 0;
#else
    return mill_errf(e, NO_CUDA_MSG);
#endif
}

#ifdef MILL_CUDA
double kprof_begin(const kctx *k) {
    mill_err e;
    (void)k;
    cuda_sync(&e);
    return mill_now();
}

int kprof_end(const kctx *k, const char *op, double t0, int rc) {
    mill_err e;
    cuda_sync(&e);
    struct kprof *p = k->prof;
    int i = 0;
    while (i < KPROF_OPS - 1 && p->name[i] && strcmp(p->name[i], op)) i++;
    if (!p->name[i]) p->name[i] = strdup(op); /* the last slot collects any overflow */
    p->calls[i]++;
    p->sec[i] += mill_now() - t0;
    return rc;
}

static void kprof_names_free(struct kprof *p) {
    for (int i = 0; i < KPROF_OPS; i++) free(p->name[i]);
}

void kprof_reset(const kctx *k) {
    if (!k->prof) return;
    kprof_names_free(k->prof);
    memset(k->prof, 0, sizeof *k->prof);
    k->prof->t_start = mill_now();
}

static void kprof_print(struct kprof *p) {
    double total = mill_now() - p->t_start, in_ops = 0;
    for (int i = 0; i < KPROF_OPS && p->name[i]; i++) in_ops += p->sec[i];
    fprintf(stderr, "[mill profile] %.3f s since kctx_init, %.3f s in ops (device-synced):\n", total, in_ops);
    for (;;) { /* largest first, printing each once */
        int best = -1;
        for (int i = 0; i < KPROF_OPS && p->name[i]; i++)
            if (p->calls[i] > 0 && (best < 0 || p->sec[i] > p->sec[best])) best = i;
        if (best < 0) break;
        fprintf(stderr, "[mill profile] %-34s %9ld calls %9.3f s %5.1f%%  %8.1f us/call\n", p->name[best],
                p->calls[best], p->sec[best], 100 * p->sec[best] / (in_ops > 0 ? in_ops : 1),
                1e6 * p->sec[best] / (double)p->calls[best]);
        p->calls[best] = 0;
    }
}
#endif

void kctx_free(kctx *k) {
#ifdef MILL_CUDA
    if (k->device == DEVICE_CUDA) {
        if (k->prof) {
            kprof_print(k->prof);
            kprof_names_free(k->prof);
        }
        free(k->prof);
        for (int i = 0; k->shadows && i < KCTX_SHADOWS; i++) kctx_shadow_remove(k, k->shadows[i].src);
        free(k->shadows);
        cuda_checks_free(k->checks);
        cuda_backend_free(k->cublas, k->stream, k->blas_ws);
    }
#endif
    memset(k, 0, sizeof *k);
}

int kctx_device_parse(const char *name, mill_device *dev) {
    if (!strcmp(name, "cpu")) *dev = DEVICE_CPU;
    else if (!strcmp(name, "cuda")) *dev = DEVICE_CUDA;
    else if (!strcmp(name, "auto")) {
        *dev = DEVICE_CPU;
#ifdef MILL_CUDA
        if (cuda_device_count() > 0) *dev = DEVICE_CUDA;
#endif
    } else return -1;
    return 0;
}

int kctx_require_cpu(const kctx *k, const char *op, mill_err *e) {
    if (k->device == DEVICE_CPU) return 0;
    return mill_errf(e, "%s: no CUDA implementation yet (run with the CPU backend)", op);
}

void *mem_alloc_copy(mill_device dev, const void *src, size_t bytes, mill_err *e) {
    if (dev == DEVICE_CPU) {
        void *p = src ? malloc(bytes ? bytes : 1) : calloc(bytes ? bytes : 1, 1);
        if (!p) mill_errf(e, "out of memory for %zu bytes", bytes);
        else if (src) memcpy(p, src, bytes);
        return p;
    }
#ifdef MILL_CUDA
    void *p = NULL;
    if (src ? cuda_alloc(&p, bytes, e) : cuda_alloc_zero(&p, bytes, e)) return NULL;
    if (src && bytes && cuda_copy_to_device(p, src, bytes, e)) {
        cuda_free(p);
        return NULL;
    }
    return p;
#else
    mill_errf(e, NO_CUDA_MSG);
    return NULL;
#endif
}

void mem_free(mill_device dev, void *p) {
    if (dev == DEVICE_CPU) free(p);
#ifdef MILL_CUDA
    else if (p) cuda_free(p);
#endif
}

int kctx_sync(const kctx *k, mill_err *e) {
#ifdef MILL_CUDA
    if (k->device == DEVICE_CUDA) return cuda_sync(e);
#endif
    (void)k;
    (void)e;
    return 0;
}

int kctx_defer_checks(const kctx *k, int on, mill_err *e) {
#ifdef MILL_CUDA
    if (k->device == DEVICE_CUDA) return cuda_checks_defer(k, on, e);
#endif
    (void)k;
    (void)on;
    (void)e;
    return 0;
}

int kctx_graphs(const kctx *k) { return k->device == DEVICE_CUDA; }

int kctx_graph_begin(const kctx *k, mill_err *e) {
#ifdef MILL_CUDA
    if (k->device == DEVICE_CUDA) return cuda_graph_begin(k, e);
#endif
    (void)k;
    return mill_errf(e, "CUDA graphs need a CUDA kctx");
}

int kctx_graph_end(const kctx *k, void **graph, mill_err *e) {
    *graph = NULL;
#ifdef MILL_CUDA
    if (k->device == DEVICE_CUDA) return cuda_graph_end(k, graph, e);
#endif
    (void)k;
    return mill_errf(e, "CUDA graphs need a CUDA kctx");
}

int kctx_graph_launch(const kctx *k, void *graph, mill_err *e) {
#ifdef MILL_CUDA
    if (k->device == DEVICE_CUDA) return cuda_graph_launch(k, graph, e);
#endif
    (void)graph;
    (void)k;
    return mill_errf(e, "CUDA graphs need a CUDA kctx");
}

void kctx_graph_free(void *graph) {
#ifdef MILL_CUDA
    cuda_graph_free(graph);
#else
    (void)graph;
#endif
}

void *mem_alloc_host(mill_device dev, size_t bytes, mill_err *e) {
#ifdef MILL_CUDA
    if (dev == DEVICE_CUDA) return cuda_alloc_host(bytes, e);
#endif
    (void)dev;
    void *p = malloc(bytes ? bytes : 1);
    if (!p) mill_errf(e, "out of memory for %zu bytes", bytes);
    return p;
}

void mem_free_host(mill_device dev, void *p) {
#ifdef MILL_CUDA
    if (dev == DEVICE_CUDA) {
        cuda_free_host(p);
        return;
    }
#endif
    (void)dev;
    free(p);
}

int mem_ipc_handle(mill_device dev, const void *p, unsigned char *handle, mill_err *e) {
#ifdef MILL_CUDA
    if (dev == DEVICE_CUDA) return cuda_ipc_handle(p, handle, e);
#endif
    (void)p;
    (void)handle;
    return mill_errf(e, "IPC handles are for CUDA memory (this is %s)", dev == DEVICE_CPU ? "CPU memory" : NO_CUDA_MSG);
}

void *mem_ipc_open(mill_device dev, const unsigned char *handle, mill_err *e) {
#ifdef MILL_CUDA
    void *p;
    if (dev == DEVICE_CUDA) return cuda_ipc_open(handle, &p, e) ? NULL : p;
#endif
    (void)handle;
    mill_errf(e, "IPC handles are for CUDA memory (this is %s)", dev == DEVICE_CPU ? "CPU memory" : NO_CUDA_MSG);
    return NULL;
}

void mem_ipc_close(mill_device dev, void *p) {
#ifdef MILL_CUDA
    if (dev == DEVICE_CUDA && p) cuda_ipc_close(p);
#endif
    (void)dev;
    (void)p;
}

int kctx_shadow_add(const kctx *k, const float *src, size_t n, mill_err *e) {
#ifdef MILL_CUDA
    if (k->device == DEVICE_CUDA) return cuda_shadow_add(k, src, n, e);
#endif
    (void)k;
    (void)src;
    (void)n;
    (void)e;
    return 0;
}

int kctx_shadow_touched(const kctx *k, const void *dst, size_t bytes, mill_err *e) {
#ifdef MILL_CUDA
    if (k->device == DEVICE_CUDA) return cu_shadow_refresh(k, dst, bytes, e);
#endif
    (void)k, (void)dst, (void)bytes, (void)e;
    return 0;
}

void kctx_shadow_remove(const kctx *k, const float *src) {
    for (int i = 0; src && k->shadows && i < KCTX_SHADOWS; i++)
        if (k->shadows[i].src == src) {
#ifdef MILL_CUDA
            cuda_free(k->shadows[i].bf16);
#endif
            memset(&k->shadows[i], 0, sizeof k->shadows[i]);
        }
}
