/* kernels/attention.h — DeepSeek-V4 attention pieces: the sink attention over
 * one shared K=V head (sliding window plus chosen compressed entries), the
 * compressor's gated pooling, and the lightning indexer's scores and top-k.
 * Shapes are per sequence; the caller loops over the batch. */
#ifndef MILL_ATTENTION_H
#define MILL_ATTENTION_H

#include <stdint.h>

#include "backend.h"

/* out[T, H, d] = softmax([q.k * scale, sink_h]) @ k (values are the keys), per query i over
 *   the window keys kv[j], max(0, i-window+1) <= j <= i, and the compressed entries
 *   comp[comp_idx[i, c]] for c < n_comp with comp_idx >= 0 (-1 marks an empty slot).
 * q: [T, H, d]; kv: [T, d]; comp: [Tc, d] (may be NULL when n_comp == 0); sinks: [H]. */
int op_sink_attention(const kctx *k, float *out, const float *q, const float *kv, const float *comp,
                      const int32_t *comp_idx, int n_comp, const float *sinks, int T, int H, int d, int window,
                      float scale, mill_err *e);

/* One query (H heads, q [H, d]) over an explicit list of nk key rows: what op_sink_attention
 * computes per query, for the cached engine. */
int op_attend_keys(const kctx *k, float *out, const float *q, const float *const *keys, int nk, const float *sinks,
                   int H, int d, float scale, mill_err *e);

/* Gated pooling of windows of `ratio` tokens into n_win = T / ratio entries, before the norm.
 * overlap == 0 (HCA): a, g are [T, d]; entry w = sum over its window of softmax_t(g + ape[t]) * a.
 * overlap == 1 (CSA): a, g are [T, 2d]; entry w pools window w-1's first half (channels [0, d))
 *   and window w's second half (channels [d, 2d)) over 2*ratio slots; window -1 is empty.
 * ape: [ratio, width]; out: [n_win, d]. */
int op_compress_pool(const kctx *k, float *out, const float *a, const float *g, const float *ape, int T, int d,
                     int ratio, int overlap, mill_err *e);

/* score[i, w] = sum_h weights[i, h] * relu(q[i, h, :] . keys[w, :]) * scale_qk, masked to -inf
 * where w >= (i + 1) / ratio. q: [T, nh, hd]; keys: [Tc, hd]; weights: [T, nh] (already scaled). */
int op_indexer_scores(const kctx *k, float *score, const float *q, const float *keys, const float *weights, int T,
                      int Tc, int nh, int hd, float scale_qk, int ratio, mill_err *e);

/* One query at absolute position pos: score [Tc] (q [nh, hd], weights [nh]). */
int op_indexer_score_at(const kctx *k, float *score, const float *q, const float *keys, const float *weights, int pos,
                        int Tc, int nh, int hd, float scale_qk, int ratio, mill_err *e);

/* For each query row of score [T, Tc], the indices of its top `topk` visible entries
 * (visible: w < (i + 1) / ratio) in idx[T, topk], -1 padded; all visible ones when fewer. */
int op_topk_visible(const kctx *k, int32_t *idx, const float *score, int T, int Tc, int topk, int ratio,
                    mill_err *e);

/* One query at absolute position pos: idx [topk]. */
int op_topk_at(const kctx *k, int32_t *idx, const float *score, int pos, int Tc, int topk, int ratio, mill_err *e);

/* idx[T, n] = the causal compressed entries for HCA: entry w for w < (i + 1) / ratio, -1 padded. */
int op_causal_entries(const kctx *k, int32_t *idx, int T, int Tc, int ratio, mill_err *e);

/* Backward of op_sink_attention (probabilities recomputed). Accumulates into dq [T,H,d],
 * dkv [T,d], dcomp [Tc,d] (may be NULL when n_comp == 0) and dsinks [H]. */
int op_sink_attention_backward(const kctx *k, float *dq, float *dkv, float *dcomp, float *dsinks, const float *dout,
                               const float *q, const float *kv, const float *comp, const int32_t *comp_idx, int n_comp,
                               const float *sinks, int T, int H, int d, int window, float scale, mill_err *e);

/* Backward of op_compress_pool: accumulates into da, dg ([T, width]) and dape ([ratio, width]). */
int op_compress_pool_backward(const kctx *k, float *da, float *dg, float *dape, const float *dout, const float *a,
                              const float *g, const float *ape, int T, int d, int ratio, int overlap, mill_err *e);

#endif
