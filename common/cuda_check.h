/* common/cuda_check.h — checked CUDA and cuBLAS calls (CUDA sources only).
 * Owns: CUDA_CHECK and CUBLAS_CHECK, which turn a failed call into `return mill_errf(e, ...)`
 * naming the call, file and line; the enclosing function has a `mill_err *e` and returns int. */
#ifndef MILL_CUDA_CHECK_H
#define MILL_CUDA_CHECK_H

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "err.h"

#define CUDA_CHECK(call)                                                                                      \
    do {                                                                                                      \
        cudaError_t err_ = (call);                                                                            \
        if (err_ != cudaSuccess)                                                                              \
            return mill_errf(e, "%s:%d: %s failed: %s", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
    } while (0)

#define CUBLAS_CHECK(call)                                                                                  \
    do {                                                                                                    \
        cublasStatus_t st_ = (call);                                                                        \
        if (st_ != CUBLAS_STATUS_SUCCESS)                                                                   \
            return mill_errf(e, "%s:%d: %s failed: cuBLAS status %d", __FILE__, __LINE__, #call, (int)st_); \
    } while (0)

#endif
