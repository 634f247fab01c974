#include "backend.h"

#ifdef MILL_CUDA /* first: cblas.h pulls in complex.h, whose macro I would clash with op parameters */
#include "../common/cuda_util.h"
#include "cuda/cuda_ops.h"
#endif

#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NO_CUDA_MSG "this mill was built without CUDA (nvcc was not found, or MILL_NO_CUDA was set)"

#ifdef MILL_CUDA
/* MILL_PROFILE's table: wall time per op name, each op bracketed by device syncs. */
#define KPROF_OPS 128
struct kprof {
    const char *name[KPROF_OPS];
    long calls[KPROF_OPS];
    double sec[KPROF_OPS];
    double t_start;
};

static double kprof_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}
#endif

int kctx_init(kctx *k, mill_device dev, mill_err *e) {
    memset(k, 0, sizeof *k);
    k->device = dev;
    /* OpenBLAS runs single-threaded inside our OpenMP-split GEMMs (kernels/dense.c): a process-wide
     * library setting, made here because every CPU op goes through a kctx. */
    if (dev == DEVICE_CPU) {
        openblas_set_num_threads(1);
        /* op_linear's row blocks must be a multiple of the sgemm micro-kernel's rows for a row to
         * get the same bits in any batch: 16 covers the AVX2 / AVX-512 kernels; the SSE3 ones
         * OpenBLAS falls back to on CPUs it does not know use 4 (measured: the same bits as 16
         * there), which makes a 1-row decode step 4x cheaper than padding to 16 */
        const char *core = openblas_get_corename();
        k->gemm_rows = core && (!strcmp(core, "Prescott") || !strcmp(core, "Core2")) ? 4 : 16;
        return 0;
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
    const char *prof = getenv("MILL_PROFILE");
    if (prof && !strcmp(prof, "1") && (k->prof = calloc(1, sizeof *k->prof))) k->prof->t_start = kprof_now();
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
    return kprof_now();
}

int kprof_end(const kctx *k, const char *op, double t0, int rc) {
    mill_err e;
    cuda_sync(&e);
    struct kprof *p = k->prof;
    int i = 0;
    while (i < KPROF_OPS - 1 && p->name[i] && strcmp(p->name[i], op)) i++;
    p->name[i] = p->name[i] ? p->name[i] : op; /* the last slot collects any overflow */
    p->calls[i]++;
    p->sec[i] += kprof_now() - t0;
    return rc;
}

void kprof_reset(const kctx *k) {
    if (!k->prof) return;
    memset(k->prof, 0, sizeof *k->prof);
    k->prof->t_start = kprof_now();
}

static void kprof_print(struct kprof *p) {
    double total = kprof_now() - p->t_start, in_ops = 0;
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
        if (k->prof) kprof_print(k->prof);
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

int kctx_check(const kctx *k, mill_err *e) {
#ifdef MILL_CUDA
    if (k->device == DEVICE_CUDA) return cuda_checks_report(k, e);
#endif
    (void)k;
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

void kctx_shadow_remove(const kctx *k, const float *src) {
    for (int i = 0; src && k->shadows && i < KCTX_SHADOWS; i++)
        if (k->shadows[i].src == src) {
#ifdef MILL_CUDA
            cuda_free(k->shadows[i].bf16);
#endif
            memset(&k->shadows[i], 0, sizeof k->shadows[i]);
        }
}
