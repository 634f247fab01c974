/* rollout/engine.h — cached, batched inference for the DeepSeek-V4 model.
 * Owns: the per-sequence caches, following the reference's decode state layer by layer:
 *   - the sliding-window K=V ring (the last sliding_window rotated kv rows),
 *   - the compressor's open window (projections of the tokens since the last closed window)
 *     and, on ratio-4 layers, the previous window's rows (the overlap half),
 *   - the compressed entries emitted every `ratio` tokens (normed, rotated),
 *   - on CSA layers, the same three for the lightning indexer's own compressor (its keys),
 * and the step that advances any set of sequences by any number of tokens each (prefill
 * chunks and single-token decode in one batch; sequences join and leave between steps).
 * A memory budget bounds the caches: a sequence is admitted only if its worst case fits.
 * On CUDA nothing in a step waits for the host until its results are copied out (id checks are
 * deferred to the step's end), and a decode step (one token per sequence, none fresh) is
 * captured as a CUDA graph the second time its shape (batch, admission size, outputs) recurs and
 * replayed from then on: one launch instead of a few thousand.
 * The caches and activations live on k's device (CPU or GPU): the projections, MoE and head run
 * batched over all the step's tokens through the same model code as the full forward
 * (model_attn_project, model_moe, ...); a fresh sequence's first chunk runs through the full
 * forward's attention ops and fills its caches from their results; every other token's cache
 * updates and attention run in waves of tokens of distinct sequences (kernels/attention.h
 * op_cache_*), so a decode step is one wave. On the CPU every logit equals the full forward's bit
 * for bit. */
#ifndef MILL_ENGINE_H
#define MILL_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "../kernels/sample.h"
#include "../trainer/model.h"
#include "group.h"

typedef struct engine_seq engine_seq;
typedef struct engine_graph engine_graph;

typedef struct {
    const dsv4_model *m;
    const kctx *k;
    size_t budget, used; /* cache bytes */
    engine_seq *pool;     /* freed sequences kept for reuse (cudaMalloc per admission is slow) */
    size_t pooled;        /* their bytes: used + pooled stays within the budget */
    arena a;             /* per-step activations, on k's device */
    arena scratch;       /* per-layer prefill scratch (indexer scores, pooled rows), on k's device */
    arena host;          /* per-step host scratch (the step's layout before it is copied over) */
    int graphs;          /* CUDA: replay decode steps as CUDA graphs (engine_init sets 1; 0 runs them op by op) */
    engine_graph *graph; /* decode steps seen or captured, by shape (engine.c) */
    int n_graph;
    long graph_steps;    /* steps that ran as a CUDA graph */
    int32_t *route_host; /* the step's routing, copied without a wait of its own (pinned on CUDA) */
    size_t route_cap;
    void *pick;          /* engine_step_sample's tokens and logprobs, in the engine's memory */
    size_t pick_cap;
    engine_group *g;     /* the engine's ranks (engine_init_group; NULL: this process alone) */
    size_t *att_used;    /* the leader's: cache bytes admitted in each attention group */
    int32_t *pend;       /* the leader's admissions and frees the followers learn with the next step */
    int n_pend, cap_pend, n_live; /* records, their room, the sequences held */
    engine_seq **by_id;  /* sequences by id: the leader's every one, a follower's own */
    int n_ids;
    /* the steps, [0] prefill or mixed, [1] decode (one token a sequence): how many, their seconds, and
     * on a rank of a group the bytes they sent to other ranks (the experts' all-to-all, the tp
     * collectives, the leader's commands, the results) */
    long steps[2];
    double step_s[2], sent[2];
} engine;

int engine_init(engine *en, const dsv4_model *m, const kctx *k, size_t budget_bytes, mill_err *e);
/* The same on one rank of an engine of several (rollout/group.h; m loaded with g->stage and wired
 * with group_model_io; budget_bytes: each rank's). On the leader (rank 0) the functions below are the
 * whole engine's: a new sequence goes to the attention group with the most free cache, a step runs
 * on every rank (each attention group's sequences where their caches are, the experts' rows through
 * the all-to-all) and the results come back to the leader; the followers run engine_follow. Decode
 * steps run op by op there (a CUDA graph cannot hold the experts' host-side plan). */
int engine_init_group(engine *en, const dsv4_model *m, const kctx *k, size_t budget_bytes, engine_group *g,
                      mill_err *e);
/* A follower's share of the leader's GROUP_STEP command (cmd: its n bytes): the admissions and frees
 * since the last step, its attention group's sequences through the step, and, on an attention
 * group's first rank, their results to the leader. */
int engine_follow(engine *en, const void *cmd, size_t n, mill_err *e);
/* A follower's GROUP_RELEASE or GROUP_RESUME (op), which the leader's engine_release and
 * engine_resume cast with the admissions and frees since the last step (cmd: n bytes). */
int engine_follow_memory(engine *en, int op, const void *cmd, size_t n, mill_err *e);
/* Colocated turns: give back the activation memory and the pooled caches while the trainer works
 * (no sequence may hold a cache), and take them again. The engine leaves the weights alone: the
 * rollout server drops its device copy after engine_release and restores it before engine_resume
 * (model_device_drop / _restore; the engine reads them through en->m, which stays valid). */
int engine_release(engine *en, mill_err *e);
int engine_resume(engine *en, mill_err *e);
void engine_free(engine *en);
/* Cache bytes a sequence of at most max_tokens needs (sized at admission: no growth later). */
size_t engine_seq_bytes(const engine *en, int max_tokens);
/* Admits a sequence of at most max_tokens (reusing a freed one of that size when the engine has
 * one); fails with an error naming the budget when it does not fit. */
int engine_seq_new(engine *en, int max_tokens, engine_seq **out, mill_err *e);
void engine_seq_free(engine *en, engine_seq *s);
int engine_seq_len(const engine_seq *s);

/* Feeds seqs[i] its next n_tokens[i] tokens (tokens[i], host arrays); logits [sum n, vocab] receive
 * every fed position's logits in order, or with last_only [n_seqs, vocab] each sequence's last
 * position's (what sampling needs: the head is the largest GEMM of a prefill; every sequence must
 * then feed a token) (NULL: none); routing [layers, sum n, k] the experts used (NULL: none).
 * logits and routing are HOST buffers on every device (the step waits for them). */
int engine_step(engine *en, engine_seq *const *seqs, const int32_t *const *tokens, const int *n_tokens, int n_seqs,
                float *logits, int last_only, int32_t *routing, mill_err *e);
/* The same step with each sequence's last position sampled where the logits are (op_sample with
 * rows[i], a HOST array): only tok[i] and logprob[i] (host) come back, not [n_seqs, vocab] logits.
 * Every sequence must feed a token. */
int engine_step_sample(engine *en, engine_seq *const *seqs, const int32_t *const *tokens, const int *n_tokens,
                       int n_seqs, const sample_row *rows, int32_t *tok, float *logprob, int32_t *routing, mill_err *e);

#endif
