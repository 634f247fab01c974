/* kernels/backend.h — where ops run.
 * Owns: kctx, the per-process backend context every op takes first. On CPU
 * the ops are fp32 and call OpenBLAS; on CUDA the same calls dispatch to
 * kernels/cuda/ (device pointers; see kernels/cuda/cuda_ops.h for the few
 * host-side arguments). Callers never branch on the device themselves. Every op returns 0, or -1 with e filled. */
#ifndef MILL_BACKEND_H
#define MILL_BACKEND_H

#include "../common/err.h"
#include "../common/tensor.h"

/* CUDA: bf16 copies of registered fp32 buffers (a device model's weights), which the GEMMs read
 * instead of rounding the fp32 operand on every call (kctx_shadow_add). */
#define KCTX_SHADOWS 4
typedef struct {
    const float *src; /* NULL: a free slot */
    void *bf16;       /* n bf16 values, element i = bf16(src[i]) */
    size_t n;
} kctx_shadow;

/* CUDA: where deferred id checks land (kctx_defer_checks). */
typedef struct {
    int on;
    void *slots; /* device memory: one record per checking op kind (kernels/cuda/graph.cu) */
} kctx_checks;

typedef struct {
    mill_device device;
    void *cublas; /* cublasHandle_t on CUDA */
    void *stream; /* cudaStream_t on CUDA */
    void *blas_ws; /* CUDA: cuBLAS's workspace */
    int gemm_fp32; /* CUDA: every GEMM in full fp32 instead of bf16 operands (parity checks; slower) */
    int moe_cublas; /* CUDA: the experts' GEMMs (NT/NN and the TN weight gradients) on cuBLAS, one call per
                     * expert, instead of the grouped tensor-core kernels (A/B checks; MILL_MOE_GEMM=cublas in
                     * the environment sets it) */
    int linear_cublas; /* CUDA: op_linear of <= 32 rows (decode) on cuBLAS too, instead of the few-row kernel
                        * (A/B checks; MILL_SKINNY=0 in the environment sets it) */
    int attention_tc; /* CUDA: the training path's sink attention on the tensor-core kernels
                       * (attention_tc.cu) instead of the fp32 ones; MILL_ATTENTION=tc in the environment
                       * sets it. Off by default until test_cuda_ops has checked them on a GPU */
    int exact; /* CUDA: a token's forward bits independent of the batch it is in: op_linear for every M
                * on the grouped tensor-core kernel as one group, the experts always on the grouped
                * path (never the few-row one), so a sequence's logprobs are the same alone or in any
                * micro-batch (rollout.exact); the CPU's always are */
    int gemm_rows;  /* CPU: op_linear's row block, probed at kctx_init for the loaded OpenBLAS kernel */
    int gemm_batch; /* CPU: 1 when one call may cover several blocks with the same bits (else one call per block) */
    kctx_shadow *shadows; /* CUDA: [KCTX_SHADOWS], owned; mutable through a const kctx */
    struct kprof *prof;   /* CUDA with MILL_PROFILE=1 in the environment: per-op times, else NULL */
    kctx_checks *checks;  /* CUDA: owned; mutable through a const kctx */
} kctx;

/* CPU: also pins OpenBLAS to one thread, since ops split work across OpenMP threads
 * (OMP_NUM_THREADS sets how many). CUDA: MILL_PROFILE=1 makes every op wait for the device before
 * and after it and sum its time by name; kctx_free prints the table to stderr (slows everything). */
int kctx_init(kctx *k, mill_device dev, mill_err *e);
void kctx_free(kctx *k);

/* A device name: "cpu", "cuda", or "auto" (cuda when this mill has CUDA and a GPU is visible, else
 * cpu); -1 for anything else. */
int kctx_device_parse(const char *name, mill_device *dev);


/* Memory on a device: a copy of bytes of host memory at src (NULL: zeroed), or NULL with e set;
 * and its release (NULL is fine). CPU: malloc; CUDA: cudaMalloc. */
void *mem_alloc_copy(mill_device dev, const void *src, size_t bytes, mill_err *e);
void mem_free(mill_device dev, void *p);

/* Waits for the work queued on k (CPU: returns at once). */
int kctx_sync(const kctx *k, mill_err *e);

/* CUDA: keeps a bf16 copy of the n floats at src (device memory: a model's weights) for the GEMMs,
 * which then read it instead of rounding src on each call: the same bits, one rounding per update
 * instead of one per GEMM. Writes into src through op_adamw, op_copy, op_copy_from_host, op_zero
 * and op_scale keep it current; nothing else may write there. At most KCTX_SHADOWS buffers (more
 * are simply not shadowed). Remove it before src is freed, and before kctx_free. CPU: no-ops. */
int kctx_shadow_add(const kctx *k, const float *src, size_t n, mill_err *e);
void kctx_shadow_remove(const kctx *k, const float *src);
/* After something other than the ops above wrote bytes at dst (an NCCL collective into a model's
 * weights): round that part of any shadow again. CPU: a no-op. */
int kctx_shadow_touched(const kctx *k, const void *dst, size_t bytes, mill_err *e);

/* Sharing device memory with another process on the same GPU (CUDA IPC): the MEM_IPC_HANDLE_BYTES
 * handle of a whole mem_alloc_copy allocation (the other side maps the allocation's start, so p
 * must be where it begins), that mapping, and its release. CPU memory gets a clear error. */
#define MEM_IPC_HANDLE_BYTES 64
int mem_ipc_handle(mill_device dev, const void *p, unsigned char *handle, mill_err *e);
void *mem_ipc_open(mill_device dev, const unsigned char *handle, mill_err *e);
void mem_ipc_close(mill_device dev, void *p);

/* Ops that validate ids (token ids, hash-table rows, given and grouped expert ids) normally wait
 * for the device to report a bad one at once. Deferred (CUDA), they record the first bad id per op
 * kind in device memory and go on without waiting, which a captured CUDA graph needs. Turning
 * deferral off waits for the device and reports what was recorded with the op's usual message (the
 * lowest bad position per kind), then clears it. CPU: checks are immediate; this returns 0. */
int kctx_defer_checks(const kctx *k, int on, mill_err *e);

/* CUDA graphs: kctx_graph_begin starts capturing the ops queued on k (nothing runs), _end turns the
 * capture into a launchable graph (*graph; -1 if an op could not be captured, e.g. one that waits
 * for the device), _launch runs it again on k's stream, _free releases it (NULL is fine). A graph
 * replays the same kernels on the same pointers with the same sizes: callers capture only work
 * whose buffers and shapes repeat. kctx_graphs reports whether k can capture (CUDA only). */
int kctx_graphs(const kctx *k);
int kctx_graph_begin(const kctx *k, mill_err *e);
int kctx_graph_end(const kctx *k, void **graph, mill_err *e);
int kctx_graph_launch(const kctx *k, void *graph, mill_err *e);
void kctx_graph_free(void *graph);

/* Host memory the device copies into without staging (CUDA: pinned; CPU: malloc), and its release. */
void *mem_alloc_host(mill_device dev, size_t bytes, mill_err *e);
void mem_free_host(mill_device dev, void *p);

/* The CPU bodies start with this: anything but the CPU gets a clear error. */
int kctx_require_cpu(const kctx *k, const char *op, mill_err *e);

/* First line of every op: on a CUDA kctx, hand the same arguments (device pointers) to its
 * kernels/cuda/ twin. Without MILL_CUDA the call is dropped unexpanded, so it need not exist. */
#ifdef MILL_CUDA
double kprof_begin(const kctx *k);
int kprof_end(const kctx *k, const char *op, double t0, int rc);
void kprof_reset(const kctx *k); /* MILL_PROFILE: forget what was timed so far (benchmarks' warm-up) */
#define MILL_CUDA_DISPATCH(call)                                                         \
    do {                                                                                 \
        if (k->device == DEVICE_CUDA) {                                                  \
            if (!k->prof) return (call);                                                 \
            double t0_ = kprof_begin(k);                                                 \
            return kprof_end(k, __func__, t0_, (call));                                  \
        }                                                                                \
    } while (0)
#else
#define MILL_CUDA_DISPATCH(call) \
    do {                         \
    } while (0)
#endif

#endif
