/* kernels/cuda/rope_optim.cu — CUDA paths of kernels/rope.h (interleaved partial RoPE) and
 * kernels/optim.h (AdamW, sum of squares, scale): elementwise fp32 kernels, and a two-pass
 * fixed-order double reduction for the sum of squares. */
#include "cuda_internal.cuh"

#include <cuda_bf16.h>

/* One thread per (token, pair, vector): the angle in fp32 as on the CPU. */
__global__ void rope_kernel(float *x, int n_tok, int n_vec, int dim, int rope_dim, const int32_t *pos,
                            const float *inv_freq, int sign) {
    int half = rope_dim / 2;
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)n_tok * half * n_vec) return;
    int v = (int)(i % n_vec), p = (int)((i / n_vec) % half);
    long t = i / ((long)n_vec * half);
    float ang = (float)pos[t] * inv_freq[p];
    float c = cosf(ang), s = sinf(ang) * (float)sign;
    float *q = x + (t * n_vec + v) * dim + (dim - rope_dim) + 2 * p;
    float a = q[0], b = q[1];
    q[0] = a * c - b * s;
    q[1] = b * c + a * s;
}

int cuda_op_rope(const kctx *k, float *x, int n_tok, int n_vec, int dim, int rope_dim, const int32_t *pos,
                 const float *inv_freq, int sign, mill_err *e) {
    long n = (long)n_tok * (rope_dim / 2) * n_vec;
    if (n <= 0) return 0;
    rope_kernel<<<cu_blocks(n, 256), 256, 0, cu_stream(k)>>>(x, n_tok, n_vec, dim, rope_dim, pos, inv_freq, sign);
    LAUNCH_CHECK("rope_kernel");
    return 0;
}

/* s16: p's bf16 shadow (kctx_shadow_add) or NULL, rounded as to_bf16_kernel rounds. */
__global__ void adamw_kernel(float *p, const float *g, float *m, float *v, long n, adamw_hparams hp,
                             __nv_bfloat16 *s16) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float decay = 1.0f - hp.lr * hp.weight_decay;
    float mi = hp.beta1 * m[i] + (1.0f - hp.beta1) * g[i];
    float vi = hp.beta2 * v[i] + (1.0f - hp.beta2) * g[i] * g[i];
    m[i] = mi;
    v[i] = vi;
    float mh = mi / hp.bias_c1, vh = vi / hp.bias_c2;
    float pi = p[i] * decay - hp.lr * mh / (sqrtf(vh) + hp.eps);
    p[i] = pi;
    if (s16) s16[i] = __float2bfloat16_rn(pi);
}

int cuda_op_adamw(const kctx *k, float *p, const float *g, float *m, float *v, long n, adamw_hparams hp, mill_err *e) {
    if (n <= 0) return 0;
    __nv_bfloat16 *s16 = (__nv_bfloat16 *)cu_shadow_of(k, p, n);
    adamw_kernel<<<cu_blocks(n, 256), 256, 0, cu_stream(k)>>>(p, g, m, v, n, hp, s16);
    LAUNCH_CHECK("adamw_kernel");
    return s16 ? 0 : cu_shadow_refresh(k, p, sizeof(float) * (size_t)n, e); /* a partial overlap */
}

#define SUMSQ_BLOCKS 1024

/* Each block sums a grid-strided slice into its own slot; one block adds the slots in order. */
__global__ void sumsq_partial_kernel(double *part, const float *x, long n) {
    __shared__ double sh[32];
    double s = 0.0;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        s += (double)x[i] * x[i];
    s = cu_block_sum(s, sh);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}

__global__ void sumsq_final_kernel(double *out, const double *part, int np) {
    __shared__ double sh[32];
    double s = 0.0;
    for (int i = threadIdx.x; i < np; i += blockDim.x) s += part[i];
    s = cu_block_sum(s, sh);
    if (threadIdx.x == 0) out[0] = s;
}

int cuda_op_sumsq(const kctx *k, const float *x, long n, double *acc, mill_err *e) {
    if (n <= 0) return 0;
    double *part = NULL, res = 0.0;
    int nb = (int)cu_blocks(n, 256);
    if (nb > SUMSQ_BLOCKS) nb = SUMSQ_BLOCKS;
    TRY(cu_scratch((void **)&part, sizeof(double) * (size_t)(nb + 1), k, e));
    sumsq_partial_kernel<<<nb, 256, 0, cu_stream(k)>>>(part + 1, x, n);
    sumsq_final_kernel<<<1, 1024, 0, cu_stream(k)>>>(part, part + 1, nb);
    cudaError_t le = cudaGetLastError();
    int rc = le == cudaSuccess ? cu_copy_to_host_sync(&res, part, sizeof(double), k, e)
                               : mill_errf(e, "op_sumsq: launch failed: %s", cudaGetErrorString(le));
    cu_scratch_free(part, k);
    if (rc) return rc;
    *acc += res;
    return 0;
}

__global__ void scale_kernel(float *x, long n, float s) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= s;
}

int cuda_op_scale(const kctx *k, float *x, long n, float s, mill_err *e) {
    if (n <= 0) return 0;
    scale_kernel<<<cu_blocks(n, 256), 256, 0, cu_stream(k)>>>(x, n, s);
    LAUNCH_CHECK("scale_kernel");
    return cu_shadow_refresh(k, x, sizeof(float) * (size_t)n, e);
}
