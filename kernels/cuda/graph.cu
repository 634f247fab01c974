/* kernels/cuda/graph.cu — what lets a step run without waiting on the host: deferred id checks,
 * CUDA graph capture and replay on kctx.stream, and pinned host memory for asynchronous copies
 * (kernels/backend.h kctx_defer_checks / kctx_graph_* / mem_alloc_host). */
#include "cuda_internal.cuh"

#include <stdlib.h>

int cuda_checks_defer(const kctx *k, int on, mill_err *e) {
    kctx_checks *c = k->checks;
    if (!c) return mill_errf(e, "kctx_defer_checks: this kctx has no check records");
    if (on && !c->slots) {
        CU_CHECK(cudaMalloc(&c->slots, sizeof(cu_check) * CU_CHECKS));
        CU_CHECK(cudaMemsetAsync(c->slots, 0xFF, sizeof(cu_check) * CU_CHECKS, cu_stream(k)));
    }
    if (!on && c->on) TRY(cuda_checks_report(k, e)); /* nothing recorded is dropped */
    c->on = on;
    return 0;
}

int cuda_checks_report(const kctx *k, mill_err *e) {
    kctx_checks *c = k->checks;
    if (!c || !c->slots) return 0;
    cu_check h[CU_CHECKS];
    TRY(cu_copy_to_host_sync(h, c->slots, sizeof h, k, e));
    int kind = 0;
    while (kind < CU_CHECKS && h[kind].first == ~0ULL) kind++;
    if (kind == CU_CHECKS) return 0;
    CU_CHECK(cudaMemsetAsync(c->slots, 0xFF, sizeof h, cu_stream(k)));
    int pos = (int)(h[kind].first >> 32), id = (int)(unsigned)(h[kind].first & 0xFFFFFFFFu), bound = h[kind].bound;
    switch (kind) { /* the immediate checks' messages */
    case CU_CHECK_EMBEDDING:
        return mill_errf(e, "token id %d at position %d is outside the vocabulary [0, %d)", id, pos, bound);
    case CU_CHECK_GATHER:
        return mill_errf(e, "id %d at position %d is outside the table's rows [0, %d)", id, pos, bound);
    case CU_CHECK_ROUTE:
        return mill_errf(e, "routing: expert id %d for token %d is outside [0, %d)", id, pos, bound);
    default:
        return mill_errf(e, "moe: expert id %d outside [0, %d)", id, bound);
    }
}

void cuda_checks_free(kctx_checks *c) {
    if (c && c->slots) cudaFree(c->slots);
    free(c);
}

/* Thread-local capture: another thread's CUDA calls (a sampler, a logger) neither join the graph
 * nor break it. */
int cuda_graph_begin(const kctx *k, mill_err *e) {
    CU_CHECK(cudaStreamBeginCapture(cu_stream(k), cudaStreamCaptureModeThreadLocal));
    return 0;
}

int cuda_graph_end(const kctx *k, void **graph, mill_err *e) {
    cudaGraph_t g = NULL;
    cudaGraphExec_t x = NULL;
    *graph = NULL;
    cudaError_t st = cudaStreamEndCapture(cu_stream(k), &g);
    if (st != cudaSuccess || !g) {
        cudaGetLastError(); /* the capture's failure is reported here, not left for the next call */
        return mill_errf(e, "CUDA graph capture failed: %s", cudaGetErrorString(st));
    }
    st = cudaGraphInstantiate(&x, g, 0);
    cudaGraphDestroy(g);
    if (st != cudaSuccess) {
        cudaGetLastError();
        return mill_errf(e, "CUDA graph instantiation failed: %s", cudaGetErrorString(st));
    }
    *graph = x;
    return 0;
}

int cuda_graph_launch(const kctx *k, void *graph, mill_err *e) {
    CU_CHECK(cudaGraphLaunch((cudaGraphExec_t)graph, cu_stream(k)));
    return 0;
}

void cuda_graph_free(void *graph) {
    if (graph) cudaGraphExecDestroy((cudaGraphExec_t)graph);
}

void *cuda_alloc_host(size_t bytes, mill_err *e) {
    void *p = NULL;
    cudaError_t st = cudaMallocHost(&p, bytes ? bytes : 1);
    if (st != cudaSuccess) {
        mill_errf(e, "cudaMallocHost of %zu bytes failed: %s", bytes, cudaGetErrorString(st));
        return NULL;
    }
    return p;
}

void cuda_free_host(void *p) {
    if (p) cudaFreeHost(p);
}
