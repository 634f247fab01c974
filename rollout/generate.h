/* rollout/generate.h — batched generation with sampling, per-token logprobs and routing capture.
 * Owns: sampling parameters and the sampler, and the reference generation path: every step
 * re-runs the full forward over each row's tokens so far (right-padded rows; causal attention
 * and window-closed compression make a row's last-position logits independent of the padding
 * after it). The cached decode engine must reproduce this path token for token.
 *
 * Sampling: softmax(logits / temperature) restricted to the top-k tokens (k > 0), then to the
 * smallest set whose probability reaches top_p (top_p < 1), renormalised. Logprobs: for each
 * generated token, log p(token) under the whole softmax(logits / temperature), truncation or not
 * (what the trainer computes from the same logits, so truncated importance sampling weighs only
 * the engine's numerical difference; vLLM's raw logprobs). temperature 0 is greedy: the argmax,
 * its logprob under softmax(logits) (temperature 1). */
#ifndef MILL_GENERATE_H
#define MILL_GENERATE_H

#include <stdint.h>

#include "../common/rng.h"
#include "../kernels/sample.h"
#include "../trainer/model.h"
#include "engine.h"

typedef struct {
    float temperature; /* 0: greedy */
    float top_p;       /* 1: off */
    int top_k;         /* 0: off */
    uint64_t seed;     /* row i samples from rng_seed(seed + i): reproducible per request */
    int max_new_tokens;
    int n_stop;
    int32_t stop[8]; /* token ids that end a row (kept in the output, like eos) */
} sample_params;

typedef enum { FINISH_LENGTH = 0, FINISH_STOP } finish_reason;

typedef struct {
    int n;              /* rows */
    int *prompt_len;    /* [n] */
    int *out_len;       /* [n] tokens generated (a stop token included) */
    int32_t *out_ids;   /* [n, max_new_tokens] */
    float *logprobs;    /* [n, max_new_tokens] */
    finish_reason *finish;
    /* [n][layers * (prompt_len + out_len) * k]: the experts each token used in each MoE layer,
     * prompt and response tokens; as int32 here, narrowed to uint8/uint16 on the wire */
    int32_t **routing;
} gen_result;

/* Samples one token from logits [V]; returns the id and its logprob (see above). work:
 * SAMPLE_WORK_FLOATS(V) floats of scratch (kernels/sample.h, which also has sample_order_desc and
 * the row sampler this calls with one rng_uniform draw from r; greedy rows draw nothing). */
int32_t sample_token(const float *logits, int V, const sample_params *sp, rng *r, float *logprob, float *work);
/* The row sample_token samples with: sp's parameters and, unless greedy, one rng_uniform draw (for
 * op_sample / engine_step_sample, which sample where the logits are). */
sample_row sample_draw(const sample_params *sp, rng *r);

/* Whether a row whose n_out-th token is tok is finished: a stop id (FINISH_STOP) or the length
 * limit (FINISH_LENGTH). Returns 1 and sets *why, or 0. */
int sample_finished(const sample_params *sp, int32_t tok, int n_out, finish_reason *why);

/* Routing ids on the wire and in files: U8 when the experts fit a byte, else U16. */
mill_dtype routing_dtype(int n_experts);
/* Narrows n expert ids into dst (n elements of dtype dt from routing_dtype). */
void routing_narrow(const int32_t *src, long n, mill_dtype dt, void *dst);

/* Generates for n prompts (prompts[i] of lens[i] tokens) by full re-forward: the reference path.
 * res is filled (gen_result_free). */
int generate(const dsv4_model *m, const kctx *k, const int32_t *const *prompts, const int *lens, int n,
             const sample_params *sp, gen_result *res, arena *a, mill_err *e);
/* The same through the cached engine (rollout/engine.h): one batched prefill, then one token per
 * unfinished row per step; finished rows leave the batch. Caches are admitted against
 * budget_bytes. Same tokens, logprobs (bit for bit on the CPU) and routing. */
int generate_cached(const dsv4_model *m, const kctx *k, const int32_t *const *prompts, const int *lens, int n,
                    const sample_params *sp, size_t budget_bytes, gen_result *res, mill_err *e);
/* The same on an engine made by the caller: on an engine of several ranks, its leader (the followers
 * run generate_follow until the leader casts GROUP_STOP). */
int generate_engine(engine *en, const int32_t *const *prompts, const int *lens, int n, const sample_params *sp,
                    gen_result *res, mill_err *e);
/* A follower rank of an engine: runs the leader's steps until GROUP_STOP. */
int generate_follow(engine *en, mill_err *e);
void gen_result_free(gen_result *res);

#endif
