/* kernels/cuda/cuda_ops.h — the CUDA implementations behind the op_* calls (built under MILL_CUDA).
 * Owns: one cuda_op_* per op_*, same arguments, called by kernels/{dense,rope,...}.c when k->device == DEVICE_CUDA.
 * Every pointer is a DEVICE pointer (fp32 buffers, int32 ids; `work` buffers are device memory of
 * the size the CPU op documents) except these, which stay on the host:
 *   op_cross_entropy: loss_sum and count (the op waits for the stream to fill them);
 *   op_sumsq: acc (likewise); op_sumsq_segments: acc, offsets and lengths (one sync for all);
 *   the op_cache_* ops: the attn_wave struct is passed by value; its arrays, and the caches
 *     they point to, are DEVICE memory;
 *   op_token_logp: count (the op waits for the stream to fill it);
 *   op_copy_from_host: host_src; op_copy_to_host: host_dst (the op waits for the copy);
 *   op_sample: rows, the per-row parameters (copied to the device on the stream);
 *   the by-value structs (hc_dims, moe_route_cfg, adamw_hparams) and scalars.
 * Ops whose CPU version validates ids (embedding, cross-entropy targets, routing's given_ids, expert
 * ids) check on the device and read one flag back, so they also synchronise the stream; with
 * kctx_defer_checks the embedding, gather, routing and expert-grouping ones record instead.
 * Precision: GEMMs keep fp32 storage in and out and run on bf16 tensor cores with fp32 accumulation:
 * each GEMM rounds its two operands to bf16 scratch copies (a model's weights are read from their
 * bf16 shadow instead: kctx_shadow_add, kept current by the ops that write weights) and calls
 * cublasGemmEx with bf16 inputs (op_linear of <= 32 rows: one kernel of dense.cu's that rounds x
 * and reads the shadow itself, mma.sync bf16 -> fp32; kctx.linear_cublas sends it to cuBLAS too)
 * (CUBLAS_COMPUTE_32F_FAST_16BF on fp32 matrices was tried first: cuBLAS 13.0 on an H100 ran TF32
 * kernels for it, not bf16). The hyper-connection logits stay full fp32 like the rest of the mHC
 * math; every other kernel is fp32 (doubles where the CPU path uses them). */
#ifndef MILL_CUDA_OPS_H
#define MILL_CUDA_OPS_H

#ifdef __cplusplus
extern "C" {
#endif

#include <stddef.h>
#include <stdint.h>

#include "../attention.h"
#include "../backend.h"
#include "../dense.h"
#include "../hc.h"
#include "../moe.h"
#include "../optim.h"
#include "../rope.h"
#include "../sample.h"

/* dense.cu */
int cuda_op_linear(const kctx *k, float *y, const float *x, const float *w, int M, int N, int K, int ldx, int ldy,
                   int accumulate, mill_err *e);
int cuda_op_matmul_nn(const kctx *k, float *y, const float *a, const float *b, int M, int N, int K, mill_err *e);
int cuda_op_rmsnorm(const kctx *k, float *y, const float *x, const float *w, int rows, int dim, int ld, float eps,
                    mill_err *e);
int cuda_op_embedding_part(const kctx *k, float *out, const float *table, const int32_t *ids, int n, int dim,
                           int vocab, int v0, int v1, mill_err *e);
int cuda_op_swiglu_clamp(const kctx *k, float *h, const float *g, const float *u, long n, float limit, mill_err *e);
int cuda_op_linear_backward(const kctx *k, float *dx, float *dw, const float *dy, const float *x, const float *w,
                            int M, int N, int K, int ldx, int ldy, mill_err *e);
int cuda_op_rmsnorm_backward(const kctx *k, float *dx, float *dw, const float *dy, const float *x, const float *w,
                             int rows, int dim, int ld, float eps, mill_err *e);
int cuda_op_embedding_part_backward(const kctx *k, float *dtable, const float *dout, const int32_t *ids, int n,
                                    int dim, int v0, int v1, mill_err *e);
int cuda_op_swiglu_clamp_backward(const kctx *k, float *dg, float *du, const float *dh, const float *g,
                                  const float *u, long n, float limit, mill_err *e);
int cuda_op_cross_entropy(const kctx *k, float *dlogits, double *loss_sum, long *count, const float *logits,
                          const int32_t *targets, int n, int vocab, float grad_scale, mill_err *e);
int cuda_op_token_logp_part(const kctx *k, const float *logits, double *part, const int32_t *targets, int n, int vl,
                            int v0, int vocab, float temperature, mill_err *e);
int cuda_op_token_logp(const kctx *k, float *logits, float *logp, float *ent, int32_t *rows, long *count,
                       const double *parts, int n_parts, const int32_t *targets, int n, int vl, int vocab,
                       float temperature, mill_err *e);
int cuda_op_token_logp_backward(const kctx *k, float *probs, const int32_t *rows, long count, const float *dlogp,
                                const float *dent, const float *ent, const int32_t *targets, int n, int vl, int v0,
                                float temperature, mill_err *e);
int cuda_op_copy(const kctx *k, void *dst, const void *src, size_t bytes, mill_err *e);
int cuda_op_copy_2d(const kctx *k, void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, long rows,
                    mill_err *e);
int cuda_op_zero(const kctx *k, void *x, size_t bytes, mill_err *e);
int cuda_op_copy_from_host(const kctx *k, void *dst, const void *host_src, size_t bytes, mill_err *e);
int cuda_op_copy_to_host(const kctx *k, void *host_dst, const void *src, size_t bytes, mill_err *e);
int cuda_op_copy_to_host_async(const kctx *k, void *host_dst, const void *src, size_t bytes, mill_err *e);
int cuda_op_to_bf16(const kctx *k, uint16_t *dst, const float *src, size_t n, mill_err *e);
int cuda_op_from_bf16(const kctx *k, float *dst, const uint16_t *src, size_t n, mill_err *e);
int cuda_op_repeat_rows(const kctx *k, float *dst, const float *src, int rows, int reps, int dim, mill_err *e);
int cuda_op_repeat_rows_backward(const kctx *k, float *dsrc, const float *ddst, int rows, int reps, int dim,
                                 mill_err *e);
int cuda_op_gather_i32(const kctx *k, int32_t *out, const int32_t *table, const int32_t *ids, int n, int width,
                       int rows, mill_err *e);

/* deferred checks, CUDA graphs and pinned host memory behind kernels/backend.h (graph.cu) */
int cuda_checks_defer(const kctx *k, int on, mill_err *e);
int cuda_checks_report(const kctx *k, mill_err *e);
void cuda_checks_free(kctx_checks *c);
int cuda_graph_begin(const kctx *k, mill_err *e);
int cuda_graph_end(const kctx *k, void **graph, mill_err *e);
int cuda_graph_launch(const kctx *k, void *graph, mill_err *e);
void cuda_graph_free(void *graph);
void *cuda_alloc_host(size_t bytes, mill_err *e);
void cuda_free_host(void *p);

/* the bf16 weight shadows of kctx (dense.cu) */
int cuda_shadow_add(const kctx *k, const float *src, size_t n, mill_err *e);
int cu_shadow_refresh(const kctx *k, const void *dst, size_t bytes, mill_err *e);

/* rope_optim.cu */
int cuda_op_rope(const kctx *k, float *x, int n_tok, int n_vec, int dim, int rope_dim, const int32_t *pos,
                 const float *inv_freq, int sign, mill_err *e);
int cuda_op_adamw(const kctx *k, float *p, const float *g, float *m, float *v, long n, adamw_hparams hp, mill_err *e);
int cuda_op_sumsq(const kctx *k, const float *x, long n, double *acc, mill_err *e);
int cuda_op_sumsq_segments(const kctx *k, const float *x, const long *offsets, const long *lengths, int n_seg,
                           double *acc, mill_err *e);
int cuda_op_scale(const kctx *k, float *x, long n, float s, mill_err *e);

/* attention.cu */
int cuda_op_sink_attention(const kctx *k, float *out, const float *q, const float *kv, const float *comp,
                           const int32_t *comp_idx, int n_comp, const float *sinks, int T, int q0, int H, int d,
                           int window, float scale, mill_err *e);
int cuda_op_compress_pool(const kctx *k, float *out, const float *a, const float *g, const float *ape, int T, int d,
                          int ratio, int overlap, mill_err *e);
int cuda_op_indexer_scores(const kctx *k, float *score, const float *q, const float *keys, const float *weights,
                           int T, int q0, int Tc, int nh, int hd, float scale_qk, int ratio, mill_err *e);
int cuda_op_topk_visible(const kctx *k, int32_t *idx, const float *score, int T, int q0, int Tc, int topk, int ratio,
                         mill_err *e);
int cuda_op_cache_push_kv(const kctx *k, attn_wave w, int layer, const float *kv, int d, int window, mill_err *e);
int cuda_op_cache_push_comp(const kctx *k, attn_wave w, int layer, int index, const float *a, const float *g,
                            const float *ape, const float *norm, const float *inv_freq, int ratio, int dim,
                            int overlap, int rope_dim, float eps, mill_err *e);
int cuda_op_cache_index_topk(const kctx *k, int32_t *sel, float *score, attn_wave w, int layer, const float *q,
                             const float *weights, int nh, int hd, float scale_qk, int ratio, int max_entries,
                             int topk, mill_err *e);
int cuda_op_cache_attend(const kctx *k, float *out, const float *q, attn_wave w, int layer, const int32_t *sel,
                         int topk, int ratio, int max_entries, const float *sinks, int H, int d, int window,
                         float scale, mill_err *e);
int cuda_op_causal_entries(const kctx *k, int32_t *idx, int T, int q0, int Tc, int ratio, mill_err *e);
int cuda_op_sink_attention_backward(const kctx *k, float *dq, float *dkv, float *dcomp, float *dsinks,
                                    const float *dout, const float *q, const float *kv, const float *comp,
                                    const int32_t *comp_idx, int n_comp, const float *sinks, int T, int q0, int H,
                                    int d, int window, float scale, mill_err *e);
int cuda_op_compress_pool_backward(const kctx *k, float *da, float *dg, float *dape, const float *dout,
                                   const float *a, const float *g, const float *ape, int T, int d, int ratio,
                                   int overlap, mill_err *e);

/* hc.cu. With hc_mult up to CUDA_HC_FUSED_MAX_STREAMS, op_hc_pre and op_hc_head run as one kernel:
 * a block per token up to CUDA_HC_FUSED_ONE_TOKEN_MAX tokens (decode), a block per 4 tokens past it,
 * a token's bits the same either way (batch-invariant); larger hc_mult takes the general path
 * (RMSNorm, split fp32 GEMM, mixing, collapse). Both are fp32; the fused one writes f (op_hc_head:
 * pre) into work but not the normed rows, which no caller reads. */
#define CUDA_HC_FUSED_ONE_TOKEN_MAX 256
#define CUDA_HC_FUSED_MAX_STREAMS 4
int cuda_op_hc_pre(const kctx *k, float *x, float *pre, float *post, float *comb, const float *h, const float *fn,
                   const float *base, const float *scale, int N, hc_dims dm, float *work, mill_err *e);
int cuda_op_hc_post(const kctx *k, float *h_out, const float *h, const float *y, const float *post,
                    const float *comb, int N, int n, int D, mill_err *e);
int cuda_op_hc_head(const kctx *k, float *x, const float *h, const float *fn, const float *base, const float *scale,
                    int N, hc_dims dm, float *work, mill_err *e);
int cuda_op_hc_post_backward(const kctx *k, float *dh, float *dy, float *dpost, float *dcomb, const float *dh_out,
                             const float *h, const float *y, const float *post, const float *comb, int N, int n,
                             int D, mill_err *e);
int cuda_op_hc_pre_backward(const kctx *k, float *dh, float *dfn, float *dbase, float *dscale, const float *dx,
                            const float *dpost, const float *dcomb, const float *h, const float *fn,
                            const float *base, const float *scale, int N, hc_dims dm, float *work, mill_err *e);
int cuda_op_hc_head_backward(const kctx *k, float *dh, float *dfn, float *dbase, float *dscale, const float *dx,
                             const float *h, const float *fn, const float *base, const float *scale, int N,
                             hc_dims dm, float *work, mill_err *e);

/* moe.cu */
int cuda_op_moe_route(const kctx *k, float *scores, int32_t *ids, float *weights, const float *logits,
                      const float *bias, const int32_t *given_ids, int N, moe_route_cfg rc, mill_err *e);
int cuda_op_moe_experts(const kctx *k, float *out, const float *x, const int32_t *ids, const float *weights,
                        const float *w1, const float *w3, const float *w2, int N, int D, int I, int E, int K,
                        float limit, int accumulate, float *work, mill_err *e);
int cuda_op_moe_combine(const kctx *k, float *out, const float *y, const float *weights, int N, int K, int D,
                        mill_err *e);
int cuda_op_moe_combine_backward(const kctx *k, float *dy, float *dweights, const float *dout, const float *y,
                                 const float *weights, int N, int K, int D, mill_err *e);
int cuda_op_moe_route_backward(const kctx *k, float *dlogits, const float *dweights, const float *scores,
                               const float *logits, const int32_t *ids, int N, moe_route_cfg rc, mill_err *e);
int cuda_op_moe_experts_backward(const kctx *k, float *dx, float *dw1, float *dw3, float *dw2, float *dweights,
                                 const float *dout, const float *x, const int32_t *ids, const float *weights,
                                 const float *w1, const float *w3, const float *w2, int N, int D, int I, int E,
                                 int K, float limit, float *work, mill_err *e);
/* 1 when cuBLAS accepts the experts' grouped GEMM (bf16 x bf16 -> fp32; op_moe_experts then makes one
 * grouped call per projection), 0 when it falls back to one GEMM per expert, -1 on error. */
int cuda_moe_grouped_gemm_supported(const kctx *k, mill_err *e);
/* "bf16->fp32/32F:no fp32->fp32/FAST_TF32:ok ..." — what this cuBLAS takes for grouped GEMMs. */
int cuda_moe_grouped_gemm_types(const kctx *k, char *buf, size_t n, mill_err *e);
/* The experts' grouped tensor-core GEMM on its own (op_moe_experts' NT/NN products; tests call it
 * directly): for every expert e < E and its rows r of offs[e] .. offs[e + 1] (a DEVICE array [E + 1]),
 *   nn 0: C[r, n] = beta C[r, n] + sum_k A[r, k] B_e[n, k]   (B_e [N, K] rows)
 *   nn 1: C[r, n] = beta C[r, n] + sum_k A[r, k] B_e[k, n]   (B_e [K, N] rows)
 * with B_e = B + e * b_stride; A and B are bf16 bit patterns in device memory (row strides lda, ldb),
 * C fp32 (row stride ldc). max_rows: the largest offs[e + 1] - offs[e] (rows past it are not
 * computed). Needs N and K multiples of 16, lda, ldb and b_stride multiples of 8, A and B 16-byte
 * aligned; -1 with e set otherwise. No host wait. */
int cuda_moe_wmma_gemm(const kctx *k, int nn, const int32_t *offs, int E, int max_rows, int N, int K, const void *A,
                       int lda, const void *B, long b_stride, int ldb, float *C, int ldc, float beta, mill_err *e);
/* Its weight-gradient form (op_moe_experts_backward's GEMM_TN; tests call it directly): for every
 * expert e < E, the reduction over its rows r of offs[e] .. offs[e + 1] (a DEVICE array [E + 1]),
 *   C_e[m, n] = beta C_e[m, n] + sum_r A[r, m] B[r, n]   (m < M, n < N; C_e = C + e * c_stride)
 * with A [rows, lda] and B [rows, ldb] bf16 bit patterns in device memory (grouped token rows), C_e
 * fp32 with row stride ldc. Each element is one fp32 sum in increasing r (deterministic). An empty
 * expert's C_e is left alone with beta 1, and becomes beta C_e (beta 0: zeros) otherwise. Needs M and
 * N multiples of 8, lda and ldb multiples of 8, A and B 16-byte aligned, the C_e not overlapping;
 * -1 with e set otherwise. No host wait. */
int cuda_moe_wmma_tn_gemm(const kctx *k, const int32_t *offs, int E, int M, int N, const void *A, int lda,
                          const void *B, int ldb, float *C, long c_stride, int ldc, float beta, mill_err *e);

/* sample.cu */
int cuda_op_sample(const kctx *k, int32_t *tok, float *logprob, const float *logits, int M, int V,
                   const sample_row *rows, mill_err *e);

#ifdef __cplusplus
}
#endif

#endif
