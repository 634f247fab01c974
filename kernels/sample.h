/* kernels/sample.h — one token drawn from each row of logits, with its logprob, on k's device.
 * Owns: sample_row (a row's sampling parameters and its uniform draw), the row sampler that
 * rollout/generate.c's sample_token and op_sample's CPU body share (so both give the same bits),
 * and op_sample, whose CUDA twin (kernels/cuda/sample.cu) lets a GPU engine copy back token ids
 * and logprobs instead of [rows, vocab] logits.
 *
 * Semantics (rollout/generate.h has the logprob convention):
 *   greedy (temperature <= 0): the argmax, ties to the lower index; logprob under softmax(logits).
 *   otherwise p = softmax(logits / temperature); the order is p descending, ties to the lower
 *   index; keep the first top_k (0 or >= V: all), then the shortest prefix of those whose running
 *   mass reaches top_p (top_p < 1); pick by inverse CDF: the first kept token whose running mass
 *   exceeds u * (mass kept). logprob: under the whole distribution, the trainer's logits[pick] / T -
 *   logsumexp_t (kernels/dense.h), truncated or not, so engine and trainer share one formula (vLLM's
 *   raw logprobs; the renormalised truncated one would bias truncated importance sampling). */
#ifndef MILL_SAMPLE_H
#define MILL_SAMPLE_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"

typedef struct {
    float temperature; /* <= 0: greedy */
    float top_p;       /* >= 1 (or NaN): off */
    int top_k;         /* <= 0 or >= V: off */
    float u;           /* uniform in [0, 1): the row's one rng_uniform draw; not read when greedy */
} sample_row;

/* Whether a row is greedy, and so draws no u: the one test both sides use. */
static inline int sample_greedy(float temperature) { return temperature <= 0.0f; }

/* Scratch floats sample_row_pick needs for a vocabulary of V. */
#define SAMPLE_WORK_FLOATS(V) (3 * (size_t)(V))

/* order[0..V) = the indices of p (non-negative floats) by value, descending, ties to the lower
 * index: the order the sampler scans. tmp: V ints. */
void sample_order_desc(int *order, int *tmp, const float *p, int V);

/* One host row of logits [V] (V >= 1): the token and *logprob as above. work:
 * SAMPLE_WORK_FLOATS(V) floats of scratch. */
int32_t sample_row_pick(const float *logits, int V, const sample_row *sr, float *logprob, float *work);

/* tok[r], logprob[r] for each row r < M of logits [M, V] with the parameters rows[r]. logits, tok
 * and logprob are in k's memory; rows is a HOST array (CUDA copies it on k's stream; pageable
 * memory, as from malloc, may be reused once the op returns). The CPU body runs sample_row_pick on
 * each row (rows in parallel; a row's bits do not depend on the others). CUDA: see
 * kernels/cuda/sample.cu for how its sums may differ from the CPU's in the last bits. */
int op_sample(const kctx *k, int32_t *tok, float *logprob, const float *logits, int M, int V, const sample_row *rows,
              mill_err *e);

#endif
