/* kernels/attention.h — DeepSeek-V4 attention pieces: the sink attention over
 * one shared K=V head (sliding window plus chosen compressed entries), the
 * compressor's gated pooling, and the lightning indexer's scores and top-k.
 * Shapes are per sequence; the caller loops over the batch. The full-sequence ops take q0: their T
 * query rows sit at positions q0 .. q0+T-1 of the sequence, so a rank holding a slice of its queries
 * (context parallelism) runs them against the whole sequence's keys; q0 = 0 is the whole sequence. */
#ifndef MILL_ATTENTION_H
#define MILL_ATTENTION_H

#include <stdint.h>

#include "backend.h"

/* out[T, H, d] = softmax([q.k * scale, sink_h]) @ k (values are the keys), per query row i at
 *   position p = q0 + i over the window keys kv[j], max(0, p-window+1) <= j <= p, and the compressed
 *   entries comp[comp_idx[i, c]] for c < n_comp with comp_idx >= 0 (-1 marks an empty slot).
 * q: [T, H, d]; kv: [q0 + T, d] from the sequence's row 0; comp: [Tc, d] (may be NULL when
 * n_comp == 0); comp_idx: [T, n_comp]; sinks: [H]. */
int op_sink_attention(const kctx *k, float *out, const float *q, const float *kv, const float *comp,
                      const int32_t *comp_idx, int n_comp, const float *sinks, int T, int q0, int H, int d, int window,
                      float scale, mill_err *e);

/* Gated pooling of windows of `ratio` tokens into n_win = T / ratio entries, before the norm.
 * overlap == 0 (HCA): a, g are [T, d]; entry w = sum over its window of softmax_t(g + ape[t]) * a.
 * overlap == 1 (CSA): a, g are [T, 2d]; entry w pools window w-1's first half (channels [0, d))
 *   and window w's second half (channels [d, 2d)) over 2*ratio slots; window -1 is empty.
 * ape: [ratio, width]; out: [n_win, d]. */
int op_compress_pool(const kctx *k, float *out, const float *a, const float *g, const float *ape, int T, int d,
                     int ratio, int overlap, mill_err *e);

/* score[i, w] = sum_h weights[i, h] * relu(q[i, h, :] . keys[w, :]) * scale_qk, masked to -inf
 * where w >= (q0 + i + 1) / ratio (row i at position q0 + i). q: [T, nh, hd]; keys: [Tc, hd] (the
 * whole sequence's); weights: [T, nh] (already scaled). */
int op_indexer_scores(const kctx *k, float *score, const float *q, const float *keys, const float *weights, int T,
                      int q0, int Tc, int nh, int hd, float scale_qk, int ratio, mill_err *e);

/* For each query row of score [T, Tc], the indices of its top `topk` visible entries
 * (visible: w < (q0 + i + 1) / ratio) in idx[T, topk], -1 padded; all visible ones when fewer. */
int op_topk_visible(const kctx *k, int32_t *idx, const float *score, int T, int q0, int Tc, int topk, int ratio,
                    mill_err *e);

/* idx[T, n] = the causal compressed entries for HCA: entry w for w < (q0 + i + 1) / ratio, -1 padded. */
int op_causal_entries(const kctx *k, int32_t *idx, int T, int q0, int Tc, int ratio, mill_err *e);

/* Backward of op_sink_attention (probabilities recomputed). Accumulates into dq [T,H,d],
 * dkv [q0 + T, d] (kv's rows), dcomp [Tc,d] (may be NULL when n_comp == 0) and dsinks [H]. */
int op_sink_attention_backward(const kctx *k, float *dq, float *dkv, float *dcomp, float *dsinks, const float *dout,
                               const float *q, const float *kv, const float *comp, const int32_t *comp_idx, int n_comp,
                               const float *sinks, int T, int q0, int H, int d, int window, float scale, mill_err *e);

/* Backward of op_compress_pool: accumulates into da, dg ([T, width]) and dape ([ratio, width]). */
int op_compress_pool_backward(const kctx *k, float *da, float *dg, float *dape, const float *dout, const float *a,
                              const float *g, const float *ape, int T, int d, int ratio, int overlap, mill_err *e);

/* ---- The cached engine's decode state and the batched ops over it.
 * A sequence's cache of one layer (pointers into its cache block, on the op's device):
 *   ring: [window, d] the K=V rows of the last `window` positions, position p in row p % window;
 *   comp (compressed KV, ratio != 0) and index (the CSA indexer's keys), each with the open
 *   window's projections cur_a/cur_g [ratio, width], the previous window's prev_a/prev_g (overlap
 *   layers only) and the emitted entries [max_tokens / ratio + 1, dim], normed and rotated.
 * After position p a compressor has emitted (p + 1) / ratio entries, so no counts are stored. */
typedef struct {
    float *cur_a, *cur_g, *prev_a, *prev_g, *entries;
} attn_comp_cache;

typedef struct {
    float *ring;
    attn_comp_cache comp, index;
} attn_layer_cache;

/* A wave: n tokens of n distinct sequences, so their cache updates are independent. Token j is
 * row[j] of the step's activations, at position pos[j] of the sequence whose layer caches are
 * seq[j][0 .. layers). The arrays are in the op's memory (device memory on CUDA). */
typedef struct {
    int n;
    const int32_t *row, *pos;
    attn_layer_cache *const *seq;
} attn_wave;

/* ring[pos % window] = kv[row] for each token of the wave; kv: [rows, d]. */
int op_cache_push_kv(const kctx *k, attn_wave w, int layer, const float *kv, int d, int window, mill_err *e);

/* Each token's a, g rows ([rows, width], width = overlap ? 2 dim : dim) go into its open window
 * (index: the indexer's compressor, else the KV one). A token that closes window w = pos / ratio
 * pools it (overlap: with the previous window's first half, when w > 0) as op_compress_pool does,
 * then RMS-norms the entry (weight norm, eps), rotates it at position w * ratio (inv_freq,
 * rope_dim) and stores it as entry w; overlap layers keep the window as the next one's previous. */
int op_cache_push_comp(const kctx *k, attn_wave w, int layer, int index, const float *a, const float *g,
                       const float *ape, const float *norm, const float *inv_freq, int ratio, int dim, int overlap,
                       int rope_dim, float eps, mill_err *e);

/* The indexer for each token of the wave over its sequence's (pos + 1) / ratio visible index
 * entries: scores as op_indexer_scores (q: [rows, nh, hd], weights: [rows, nh] already scaled) into
 * score [n, max_entries], then sel [n, topk] = the top entries as op_topk_visible (-1 padded). */
int op_cache_index_topk(const kctx *k, int32_t *sel, float *score, attn_wave w, int layer, const float *q,
                        const float *weights, int nh, int hd, float scale_qk, int ratio, int max_entries, int topk,
                        mill_err *e);

/* out[row] = the sink attention of q[row] ([rows, H, d]) over the token's keys, in
 * op_sink_attention's order: the window's ring rows, then the compressed entries: none when
 * ratio == 0, all (pos + 1) / ratio visible ones when sel is NULL (HCA), else sel[j, 0..topk)
 * where >= 0 (CSA). max_entries bounds the visible entries of any token of the wave. */
int op_cache_attend(const kctx *k, float *out, const float *q, attn_wave w, int layer, const int32_t *sel, int topk,
                    int ratio, int max_entries, const float *sinks, int H, int d, int window, float scale,
                    mill_err *e);

#endif
