/* common/cuda_util.cu — CUDA memory, copies and the cuBLAS handle behind common/cuda_util.h. */
#include "cuda_util.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "cuda_check.h"

int cuda_alloc_zero(void **p, size_t bytes, mill_err *e) {
    *p = NULL;
    CUDA_CHECK(cudaMalloc(p, bytes ? bytes : 1));
    CUDA_CHECK(cudaMemset(*p, 0, bytes));
    /* the fill runs on the legacy default stream, which ops on a non-blocking kctx stream do not
     * wait for: finish it here so the memory is zero before any op can touch it */
    CUDA_CHECK(cudaDeviceSynchronize());
    return 0;
}

int cuda_alloc(void **p, size_t bytes, mill_err *e) {
    *p = NULL;
    CUDA_CHECK(cudaMalloc(p, bytes ? bytes : 1));
    return 0;
}

int cuda_zero_async(void *p, size_t bytes, void *stream, mill_err *e) {
    CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, (cudaStream_t)stream));
    return 0;
}

void cuda_free(void *p) { cudaFree(p); } /* errors at free time have no caller to report to */

int cuda_copy_to_device(void *dst, const void *src, size_t bytes, mill_err *e) {
    CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
    /* from pageable memory cudaMemcpy may return before the DMA lands, and ops on a non-blocking
     * kctx stream do not wait for the legacy stream: finish it here */
    CUDA_CHECK(cudaStreamSynchronize(0));
    return 0;
}

int cuda_copy_to_host(void *dst, const void *src, size_t bytes, mill_err *e) {
    CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
    return 0;
}

int cuda_sync(mill_err *e) {
    CUDA_CHECK(cudaDeviceSynchronize());
    return 0;
}

static_assert(sizeof(cudaIpcMemHandle_t) == CUDA_IPC_HANDLE_BYTES, "CUDA IPC handle size");

int cuda_ipc_handle(const void *p, unsigned char *handle, mill_err *e) {
    cudaIpcMemHandle_t h;
    CUDA_CHECK(cudaIpcGetMemHandle(&h, (void *)p));
    memcpy(handle, &h, sizeof h);
    return 0;
}

int cuda_ipc_open(const unsigned char *handle, void **p, mill_err *e) {
    cudaIpcMemHandle_t h;
    memcpy(&h, handle, sizeof h);
    *p = NULL;
    CUDA_CHECK(cudaIpcOpenMemHandle(p, h, cudaIpcMemLazyEnablePeerAccess));
    return 0;
}

void cuda_ipc_close(void *p) { cudaIpcCloseMemHandle(p); } /* as cuda_free: nobody to tell */

/* cuBLAS gets a workspace of its own up front: inside a CUDA graph capture it may not allocate one. */
#define CUDA_BLAS_WORKSPACE (32u << 20)

int cuda_backend_init(void **cublas, void **stream, void **workspace, mill_err *e) {
    cudaStream_t s;
    cublasHandle_t h;
    *cublas = *stream = *workspace = NULL;
    CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    *stream = s;
    CUBLAS_CHECK(cublasCreate(&h));
    *cublas = h;
    CUBLAS_CHECK(cublasSetStream(h, s));
    CUDA_CHECK(cudaMalloc(workspace, CUDA_BLAS_WORKSPACE));
    CUBLAS_CHECK(cublasSetWorkspace(h, *workspace, CUDA_BLAS_WORKSPACE));
    /* the ops' stream-ordered scratch (cudaMallocAsync) keeps its memory across syncs: by default
     * the pool gives it back at every sync, and each large scratch is then mapped anew */
    int dev = 0;
    cudaMemPool_t pool;
    uint64_t keep = UINT64_MAX;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, dev));
    CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
    return 0;
}

void cuda_backend_free(void *cublas, void *stream, void *workspace) {
    if (cublas) cublasDestroy((cublasHandle_t)cublas);
    if (stream) cudaStreamDestroy((cudaStream_t)stream);
    if (workspace) cudaFree(workspace);
}

/* The timed loop of cuda_time_d2d_copy (its caller owns and frees the buffers and events). */
static int time_copies(void *dst, const void *src, size_t bytes, int reps, cudaEvent_t t0, cudaEvent_t t1,
                       double *seconds, mill_err *e) {
    float ms = 0;
    CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice)); /* untimed: first-touch costs */
    CUDA_CHECK(cudaEventRecord(t0, 0));
    for (int r = 0; r < reps; r++) CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, 0));
    CUDA_CHECK(cudaEventRecord(t1, 0));
    CUDA_CHECK(cudaEventSynchronize(t1));
    CUDA_CHECK(cudaEventElapsedTime(&ms, t0, t1));
    *seconds = 1e-3 * (double)ms / reps;
    return 0;
}

static int make_events(cudaEvent_t *t0, cudaEvent_t *t1, mill_err *e) {
    CUDA_CHECK(cudaEventCreate(t0));
    CUDA_CHECK(cudaEventCreate(t1));
    return 0;
}

int cuda_time_d2d_copy(size_t bytes, int reps, double *seconds, mill_err *e) {
    void *src = NULL, *dst = NULL;
    cudaEvent_t t0 = NULL, t1 = NULL;
    int rc = -1;
    if (!bytes || reps < 1) return mill_errf(e, "cuda_time_d2d_copy: needs bytes > 0 and reps >= 1");
    if (!cuda_alloc_zero(&src, bytes, e) && !cuda_alloc(&dst, bytes, e) && !make_events(&t0, &t1, e))
        rc = time_copies(dst, src, bytes, reps, t0, t1, seconds, e);
    /* teardown errors have no caller to report to (as in cuda_free) */
    if (t0) cudaEventDestroy(t0);
    if (t1) cudaEventDestroy(t1);
    cuda_free(src);
    cuda_free(dst);
    return rc;
}

int cuda_mem_info(size_t *free_bytes, size_t *total_bytes, mill_err *e) {
    CUDA_CHECK(cudaMemGetInfo(free_bytes, total_bytes));
    return 0;
}

int cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError(); /* no driver or no device: not an error for the caller */
        return 0;
    }
    return n;
}

int cuda_device_describe(char *buf, size_t n, mill_err *e) {
    int count = 0, dev = 0;
    CUDA_CHECK(cudaGetDeviceCount(&count));
    if (count == 0) return mill_errf(e, "no CUDA device");
    CUDA_CHECK(cudaGetDevice(&dev));
    cudaDeviceProp p;
    CUDA_CHECK(cudaGetDeviceProperties(&p, dev));
    snprintf(buf, n, "%s, sm_%d%d, %.1f GiB", p.name, p.major, p.minor, (double)p.totalGlobalMem / (1 << 30));
    return 0;
}
