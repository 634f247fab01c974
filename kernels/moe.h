/* kernels/moe.h — MoE routing and the routed experts.
 * Scores s = score_fn(x @ gate^T). Selection is top-k of s + bias (bias only
 * selects), or given ids (hash layers' tid2eid rows, or a rollout's routing
 * record in replay). Weights w = s[ids] / (sum + 1e-20) * routed_scale. */
#ifndef MILL_MOE_H
#define MILL_MOE_H

#include <stdint.h>

#include "backend.h"
#include "../common/config.h"

typedef struct {
    int E, K;
    dsv4_score_func score_func;
    int norm_topk;
    float routed_scale;
} moe_route_cfg;

/* logits [N, E] -> scores [N, E] (kept for backward), ids [N, K], weights [N, K].
 * bias [E] may be NULL; given_ids [N, K] (NULL: select) are checked against E. */
int op_moe_route(const kctx *k, float *scores, int32_t *ids, float *weights, const float *logits, const float *bias,
                 const int32_t *given_ids, int N, moe_route_cfg rc, mill_err *e);

/* out[N, D] (+)= sum_k weights[t, k] * expert_{ids[t, k]}(x[t]), with
 * expert(x) = (silu(min(x w1^T, L)) * clamp(x w3^T, -L, L)) w2^T.
 * w1, w3: [E, I, D]; w2: [E, D, I]. Tokens are grouped per expert so each expert is
 * two GEMMs. work: moe_experts_work_floats(N, D, I, E, K) floats. */
int op_moe_experts(const kctx *k, float *out, const float *x, const int32_t *ids, const float *weights,
                   const float *w1, const float *w3, const float *w2, int N, int D, int I, int E, int K, float limit,
                   int accumulate, float *work, mill_err *e);

long moe_experts_work_floats(int N, int D, int I, int E, int K);

/* Backward of op_moe_route's weights: dlogits [N, E] += d(weights)/d(logits) applied to dweights [N, K].
 * The selection itself (ids) has no gradient; bias never gets one. */
int op_moe_route_backward(const kctx *k, float *dlogits, const float *dweights, const float *scores,
                          const float *logits, const int32_t *ids, int N, moe_route_cfg rc, mill_err *e);

/* Backward of op_moe_experts (expert outputs recomputed): accumulates dx [N, D], dw1, dw3, dw2;
 * writes dweights [N, K]. work: moe_experts_backward_work_floats(...) floats. */
int op_moe_experts_backward(const kctx *k, float *dx, float *dw1, float *dw3, float *dw2, float *dweights,
                            const float *dout, const float *x, const int32_t *ids, const float *weights,
                            const float *w1, const float *w3, const float *w2, int N, int D, int I, int E, int K,
                            float limit, float *work, mill_err *e);
long moe_experts_backward_work_floats(int N, int D, int I, int E, int K);

/* The weighted sum of the experts' outputs, as op_moe_experts ends: out[t] = sum over k in order
 * of weights[t, k] * y[t * K + k] (y [N * K, D]: each (token, slot)'s expert output, computed
 * elsewhere: expert parallelism). Overwrites out [N, D]. */
int op_moe_combine(const kctx *k, float *out, const float *y, const float *weights, int N, int K, int D, mill_err *e);
/* Its backward: dy[t * K + k] = weights[t, k] * dout[t] and dweights[t, k] = dout[t] . y[t * K + k]
 * (both overwritten). */
int op_moe_combine_backward(const kctx *k, float *dy, float *dweights, const float *dout, const float *y,
                            const float *weights, int N, int K, int D, mill_err *e);

#endif
