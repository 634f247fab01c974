/* kernels/backend.h — where ops run.
 * Owns: kctx, the per-process backend context every op takes first. On CPU
 * the ops are fp32 and call OpenBLAS; on CUDA (bf16 storage, fp32 accumulate)
 * the same calls will dispatch to kernels/cuda/. Callers never branch on the
 * device themselves. Every op returns 0, or -1 with e filled. */
#ifndef MILL_BACKEND_H
#define MILL_BACKEND_H

#include "../common/err.h"
#include "../common/tensor.h"

typedef struct {
    mill_device device;
    void *cublas; /* cublasHandle_t on CUDA */
    void *stream; /* cudaStream_t on CUDA */
} kctx;

/* CPU: also pins OpenBLAS to one thread, since ops split work across OpenMP threads
 * (OMP_NUM_THREADS sets how many). */
int kctx_init(kctx *k, mill_device dev, mill_err *e);
void kctx_free(kctx *k);

/* Propagate a failure: `TRY(op(...));` inside a function returning int. */
#define TRY(x)                 \
    do {                       \
        if ((x) != 0) return -1; \
    } while (0)

/* Ops implemented on CPU only so far refuse other devices with a clear error. */
int kctx_require_cpu(const kctx *k, const char *op, mill_err *e);

#endif
