/* trainer/dist.h — a trainer under a rank layout: what data and pipeline parallelism add to a step.
 * Owns: dist_ctx (the layout's groups, and the dp and pp groups on the model's device: NCCL twins
 * on a GPU, the MPI comms on the CPU), the backward's per-layer gradient reduction (llm.c's idiom:
 * each layer's all-reduce starts as soon as its gradients exist; the optimizer step waits for
 * them), this rank's rows of a batch, the pipeline runner (trainer/schedule.h's order, each op on
 * one model chunk, the boundary streams between stages in batches) and losses whose normaliser is
 * global (token mean over the whole batch, as one process computes it). */
#ifndef MILL_DIST_H
#define MILL_DIST_H

#include "model.h"
#include "parallel.h"
#include "schedule.h"

typedef struct dist_wire dist_wire;

typedef struct {
    par_state par;
    comm *dp;          /* the ranks holding the same dense weights, par.dpcp (dp x cp; par.dp without
                        * context parallelism) on the CPU; its NCCL twin (owned) on a GPU, one rank too */
    comm *cp;          /* par.cp, its NCCL twin on a GPU when cp > 1 (positions over ranks) */
    comm *pp;          /* par.pp on the CPU; its NCCL twin (owned) on a GPU when pp > 1 */
    comm *ep, *edp;    /* par.ep and par.edp, NCCL twins on a GPU when ep > 1 (experts over ranks) */
    comm *tp;          /* par.tp, its NCCL twin on a GPU when tp > 1 (heads over ranks) */
    double ep_bytes;   /* bytes the expert all-to-alls sent to other ranks (the experts' rows) */
    double tp_bytes;   /* bytes the tp collectives sent to other ranks (a ring's: all-reduce 2 (P-1)/P of the
                        * buffer, a gather this rank's piece P-1 times) */
    model_stage stage; /* this rank's chunks of the model (dist_init: set for cfg) */
    const kctx *k;
    mill_dtype wire;   /* the boundary streams' type between stages: DTYPE_F32 or DTYPE_BF16 */
    dist_wire *bufs;   /* the boundary's staging buffers (grown on use) */
    double t_wait;     /* seconds spent in boundary transfers (waits included): the bubble */
    float *grads;      /* the buffer the hook reduces (dist_hook) */
} dist_ctx;

/* Groups of world for sizes s (validated against cfg and batch_rows, 0: unchecked; pp over 1 is
 * allowed here: commands that cannot run stages refuse it with par_validate first); k: the device
 * the trainer runs on (CUDA: the dp and pp groups get NCCL twins on k's stream; k is kept). cfg
 * NULL: no stage is set. world stays the caller's. */
int dist_init(dist_ctx *d, comm *world, const par_sizes *s, const dsv4_config *cfg, long batch_rows, const kctx *k,
              mill_err *e);
void dist_free(dist_ctx *d);
/* What pipeline rank r, expert rank q and tensor-parallel rank t hold under s: virtual stages r,
 * r + pp, ... (the embedding with virtual stage 0, the head with the last), the q-th of ep equal
 * blocks of cfg's routed experts, and slice t of tp of the heads, output groups and shared experts. */
model_stage dist_rank_stage(const par_sizes *s, const dsv4_config *cfg, int r, int q, int t);
/* m (holding this rank's experts and slices: d->stage) sends the rows of its routed experts over
 * the ep group (model_ep_io) and sums its slices' partial results over the tp group
 * (model_tp_io); nothing with ep and tp 1. */
void dist_ep_io(dist_ctx *d, dsv4_model *m);
/* Runs one op of a pipeline schedule on chunk (a view of the rank's model holding op->chunk's
 * layers, whose boundary streams travel between the stages). */
typedef int (*dist_op_fn)(void *ctx, const pipe_op *op, const dsv4_model *chunk, mill_err *e);
/* Runs n_micro micro-batches through the stages: this rank's ops (pipe_schedule: 1F1B, interleaved
 * with vpp > 1; backward 0: the forwards only) each as fn, the boundary streams (elems[i] floats
 * for micro-batch i, in d->wire on the way) sent and received in Megatron's batches. m's grad hook
 * runs in each chunk's backward of the last micro-batch only (the gradients are final there). One
 * stage: fn on the whole model, in order, with no transfers. */
int dist_pipeline(dist_ctx *d, const dsv4_model *m, int n_micro, int backward, const size_t *elems, dist_op_fn fn,
                  void *ctx, mill_err *e);
/* Every stage's part of a flat buffer in its stage layout (mine: this rank's stage's floats, and
 * mine_index its tid2eid tables or NULL) into full (model_init of the whole model: its data, and
 * index_data when given), on every rank of the pp group (collective over it; a copy with one stage). */
int dist_gather_stages(dist_ctx *d, const float *mine, const int32_t *mine_index, dsv4_model *full, mill_err *e);
/* This rank's rows [lo, hi) of a batch of n rows (dp splits them in order; the cp ranks of a dp
 * rank share its rows, each with a slice of their positions). */
void dist_rows(const dist_ctx *d, long n, long *lo, long *hi);
/* The floats of the boundary streams [rows, T, hc_mult, hidden] this rank sends and receives for a
 * micro-batch of rows rows of T positions: its positions' (cp), of them its tokens' (sp). */
size_t dist_stream_elems(const dist_ctx *d, const dsv4_model *m, long rows, int T);
/* From now on m's backward starts the dp all-reduce of each layer's part of grads as soon as it
 * is final (m->grad_ready; a layer's routed experts over the expert-data-parallel group instead;
 * with tp, the attention's replicated weights, whose gradients each slice has in part, over tp
 * first); dist_unhook stops it. */
void dist_hook(dist_ctx *d, dsv4_model *m, float *grads);
void dist_unhook(dsv4_model *m);
/* A rank with no tokens in a step takes part in the same reductions, in the backward's order,
 * with its zero gradients (the others' hooked backward waits for them). */
int dist_reduce_idle(dist_ctx *d, const dsv4_model *m, float *grads, mill_err *e);
/* Mean next-token cross-entropy over the whole batch (every rank's rows, global token count) and
 * its gradient for this rank's B rows and stage, accumulated into grads: model_forward_backward's
 * computation, normalised globally, in n_micro micro-batches through the stages (arenas[n_micro x
 * vpp]: one per micro-batch and chunk, as many may be in flight). out: the global loss (summed
 * over dp and the stages) and count. The gradients' dp reduction is started by the hook
 * (m->grad_ready); the caller flushes (optimizer_step does). */
int dist_ce_step(dist_ctx *d, const dsv4_model *m, const kctx *k, const int32_t *ids, const int32_t *targets, int B,
                 int T, int n_micro, float *grads, model_loss *out, arena *arenas, mill_err *e);

#endif
