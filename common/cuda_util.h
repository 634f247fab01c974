/* common/cuda_util.h — CUDA memory and handles (built only when nvcc is found).
 * Owns: device allocation and copies, the cuBLAS handle and stream (the checked-call macros are
 * in cuda_check.h). */
#ifndef MILL_CUDA_UTIL_H
#define MILL_CUDA_UTIL_H

#include <stddef.h>

#include "err.h"

#ifdef __cplusplus
extern "C" {
#endif

int cuda_alloc_zero(void **p, size_t bytes, mill_err *e);
int cuda_alloc(void **p, size_t bytes, mill_err *e); /* not filled */
/* Zeroes bytes at p in stream order (stream: a cudaStream_t, NULL for the default stream). */
int cuda_zero_async(void *p, size_t bytes, void *stream, mill_err *e);
void cuda_free(void *p);
int cuda_copy_to_device(void *dst, const void *src, size_t bytes, mill_err *e);
int cuda_copy_to_host(void *dst, const void *src, size_t bytes, mill_err *e);
/* Waits for all device work (every stream): the copies above use the default stream, while ops run
 * on kctx.stream, which does not wait for it. */
int cuda_sync(mill_err *e);
/* CUDA IPC (kernels/backend.h mem_ipc_*): the CUDA_IPC_HANDLE_BYTES-byte handle of memory from
 * cuda_alloc, which another process on the same GPU opens (mapped until cuda_ipc_close). */
#define CUDA_IPC_HANDLE_BYTES 64
int cuda_ipc_handle(const void *p, unsigned char *handle, mill_err *e);
int cuda_ipc_open(const unsigned char *handle, void **p, mill_err *e);
void cuda_ipc_close(void *p);
/* The op stream, its cuBLAS handle and that handle's workspace (freed by cuda_backend_free, also
 * after a failed init). */
int cuda_backend_init(void **cublas, void **stream, void **workspace, mill_err *e);
void cuda_backend_free(void *cublas, void *stream, void *workspace);
/* Mean seconds of one device-to-device cudaMemcpy of `bytes` over reps copies (after one untimed
 * copy), timed with CUDA events on the default stream; the buffers are allocated and freed here.
 * For benchmarks: a copy reads and writes `bytes`, so 2 * bytes / seconds is the traffic rate. */
int cuda_time_d2d_copy(size_t bytes, int reps, double *seconds, mill_err *e);
/* The current GPU's free and total memory in bytes (cudaMemGetInfo): tests check what a release
 * gives back. */
int cuda_mem_info(size_t *free_bytes, size_t *total_bytes, mill_err *e);
/* The GPUs this process sees (0 also when there is no driver). */
int cuda_device_count(void);
/* "NVIDIA H100 80GB HBM3, sm_90, 79.1 GiB" into buf; -1 when no device. */
int cuda_device_describe(char *buf, size_t n, mill_err *e);

#ifdef __cplusplus
}
#endif

#endif
