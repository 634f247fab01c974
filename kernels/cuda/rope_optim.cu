/* kernels/cuda/rope_optim.cu — CUDA paths of kernels/rope.h (interleaved partial RoPE) and
 * kernels/optim.h (AdamW, sum of squares, scale): elementwise fp32 kernels, and two-pass
 * fixed-order double reductions for the sums of squares (one tensor, or many with one sync). */
#include "cuda_internal.cuh"

#include <cuda_bf16.h>
#include <stdlib.h>

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
    float gi = g[i] * hp.grad_scale; /* its own rounding: the bits of scaling g in place first */
    float mi = hp.beta1 * m[i] + (1.0f - hp.beta1) * gi;
    float vi = hp.beta2 * v[i] + (1.0f - hp.beta2) * gi * gi;
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

/* Sum of squares over many segments with one read-back (the optimizer's global norm: one segment
 * per parameter tensor). The segments are cut into chunks of at most SEGSQ_CHUNK floats; block c sums
 * chunk c in double, then one thread per segment adds its chunks in order. The host adds the segment
 * sums into *acc in segment order, as a loop of op_sumsq calls would. */
#define SEGSQ_CHUNK 65536L

__global__ void segsq_chunk_kernel(double *part, const float *x, const long *chunk_off, const int *chunk_len) {
    __shared__ double sh[32];
    const float *p = x + chunk_off[blockIdx.x];
    int n = chunk_len[blockIdx.x];
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += (double)p[i] * p[i];
    s = cu_block_sum(s, sh);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}

__global__ void segsq_seg_kernel(double *seg, const double *part, const int *first, int n_seg) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_seg) return;
    double s = 0.0;
    for (int c = first[i]; c < first[i + 1]; c++) s += part[c];
    seg[i] = s;
}

int cuda_op_sumsq_segments(const kctx *k, const float *x, const long *offsets, const long *lengths, int n_seg,
                           double *acc, mill_err *e) {
    if (n_seg <= 0) return 0;
    long nch = 0;
    for (int i = 0; i < n_seg; i++)
        if (lengths[i] > 0) nch += (lengths[i] + SEGSQ_CHUNK - 1) / SEGSQ_CHUNK;
    if (nch > 2147483647L - n_seg) return mill_errf(e, "op_sumsq_segments: %ld chunks is too many", nch);
    /* one host table, one upload: chunk offsets [nch] (long), chunk lengths [nch], segment starts [n_seg + 1] */
    size_t tab_bytes = sizeof(long) * (size_t)nch + sizeof(int) * (size_t)(nch + n_seg + 1);
    char *tab = (char *)malloc(tab_bytes);
    double *seg_h = (double *)malloc(sizeof(double) * (size_t)n_seg);
    if (!tab || !seg_h) {
        free(tab);
        free(seg_h);
        return mill_errf(e, "op_sumsq_segments: out of memory");
    }
    long *c_off = (long *)tab;
    int *c_len = (int *)(c_off + nch), *first = c_len + nch;
    long c = 0;
    for (int i = 0; i < n_seg; i++) {
        first[i] = (int)c;
        for (long a = 0; a < lengths[i]; a += SEGSQ_CHUNK, c++) {
            c_off[c] = offsets[i] + a;
            c_len[c] = (int)(lengths[i] - a < SEGSQ_CHUNK ? lengths[i] - a : SEGSQ_CHUNK);
        }
    }
    first[n_seg] = (int)c;
    /* device: the table, then (8-aligned) chunk partials [nch] and segment sums [n_seg] */
    size_t tab_al = (tab_bytes + 7) / 8 * 8;
    char *dev = NULL;
    int rc = cu_scratch((void **)&dev, tab_al + sizeof(double) * (size_t)(nch + n_seg), k, e);
    if (!rc) {
        double *part = (double *)(dev + tab_al), *seg = part + nch;
        const long *d_off = (const long *)dev;
        const int *d_len = (const int *)(d_off + nch), *d_first = d_len + nch;
        if (cudaMemcpyAsync(dev, tab, tab_bytes, cudaMemcpyHostToDevice, cu_stream(k)) != cudaSuccess)
            rc = mill_errf(e, "op_sumsq_segments: table copy failed");
        if (!rc && nch > 0) segsq_chunk_kernel<<<(unsigned)nch, 256, 0, cu_stream(k)>>>(part, x, d_off, d_len);
        if (!rc) segsq_seg_kernel<<<cu_blocks(n_seg, 256), 256, 0, cu_stream(k)>>>(seg, part, d_first, n_seg);
        cudaError_t le = cudaGetLastError();
        if (!rc && le != cudaSuccess) rc = mill_errf(e, "op_sumsq_segments: launch failed: %s", cudaGetErrorString(le));
        if (!rc) rc = cu_copy_to_host_sync(seg_h, seg, sizeof(double) * (size_t)n_seg, k, e);
        cu_scratch_free(dev, k);
    }
    if (!rc)
        for (int i = 0; i < n_seg; i++) *acc += seg_h[i];
    free(tab); /* after the sync: the upload has read it */
    free(seg_h);
    return rc;
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
