/* kernels/cuda/attention_tc.cuh — shared by attention.cu and attention_tc.cu only.
 * Owns: a training-path query's key list (the CPU's order), the shared-memory check every attention
 * launch makes, and the tensor-core sink attention's launchers, which attention.cu's ops call with
 * kctx.attention_tc. */
#ifndef MILL_ATTENTION_TC_CUH
#define MILL_ATTENTION_TC_CUH

#include "cuda_internal.cuh"

/* The key list in the CPU's order, filled by the whole block: window rows lo .. lo + nwin - 1, then
 * entry codes -1 - w for the >= 0 values w of idx[0, n_idx) in order (warp 0 compacts them 32 at a
 * time with a ballot; one thread walking them serially would stall on every load). Returns the
 * count; ends with a barrier. */
static __device__ __forceinline__ int att_fill_list(int *list, int lo, int nwin, const int32_t *idx, int n_idx) {
    __shared__ int nk_sh;
    if (nwin < 0) nwin = 0; /* window <= 0: no window rows */
    for (int t = threadIdx.x; t < nwin; t += blockDim.x) list[t] = lo + t;
    if (threadIdx.x < 32) {
        int lane = threadIdx.x, nk = nwin;
        for (int c0 = 0; c0 < n_idx; c0 += 32) { /* bound uniform over warp 0 */
            int32_t w = c0 + lane < n_idx ? idx[c0 + lane] : -1;
            unsigned m = __ballot_sync(0xffffffffu, w >= 0);
            if (w >= 0) list[nk + __popc(m & ((1u << lane) - 1u))] = -1 - w;
            nk += __popc(m);
        }
        if (lane == 0) nk_sh = nk;
    }
    __syncthreads();
    return nk_sh;
}

static __device__ __forceinline__ const float *att_key(int code, const float *kv, const float *comp, int d) {
    return code >= 0 ? kv + (long)code * d : comp + (long)(-1 - code) * d;
}

/* The device's shared memory per block (the opt-in maximum), 0 when it cannot be read. */
static inline int att_smem_limit(void) {
    int dev = 0, lim = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return 0;
    if (cudaDeviceGetAttribute(&lim, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) return 0;
    return lim;
}

/* Lets kernel fn take smem bytes of dynamic shared memory (past the default 48 KB), or the error. */
static inline int att_smem_ok(const void *fn, size_t smem, mill_err *e) {
    if (smem <= 48 * 1024) return 0;
    int lim = att_smem_limit();
    if (smem > (size_t)lim)
        return mill_errf(e, "attention: %zu bytes of shared memory needed, the device allows %d", smem, lim);
    CU_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    return 0;
}

/* The tensor-core kernels apply (d a multiple of 32 up to 512, rows 16-byte aligned, the shared
 * memory available): 1, else 0 and the caller runs the fp32 kernels. */
int atc_applies(int H, int d, int max_keys, int backward, const void *const *ptrs, int n);
/* op_sink_attention's arguments; the backward writes each (query, head)'s sink gradient to
 * dsink_part [T, H] for the caller's ordered sum. */
int atc_sink_attention(const kctx *k, float *out, const float *q, const float *kv, const float *comp,
                       const int32_t *comp_idx, int n_comp, const float *sinks, int T, int q0, int H, int d,
                       int window, float scale, mill_err *e);
int atc_sink_attention_backward(const kctx *k, float *dq, float *dkv, float *dcomp, float *dsink_part,
                                const float *dout, const float *q, const float *kv, const float *comp,
                                const int32_t *comp_idx, int n_comp, const float *sinks, int T, int q0, int H, int d,
                                int window, float scale, mill_err *e);

#endif
