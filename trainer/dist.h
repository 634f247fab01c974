/* trainer/dist.h — a trainer under a rank layout: what data parallelism adds to a step.
 * Owns: dist_ctx (the layout's groups, and the dp group on the model's device: an NCCL twin on a
 * GPU, the MPI comm on the CPU), the backward's per-layer gradient reduction (llm.c's idiom: each
 * layer's all-reduce starts as soon as its gradients exist; the optimizer step waits for them),
 * this rank's rows of a batch, and losses whose normaliser is global (token mean over the whole
 * batch, as one process computes it). */
#ifndef MILL_DIST_H
#define MILL_DIST_H

#include "model.h"
#include "parallel.h"

typedef struct {
    par_state par;
    comm *dp;       /* par.dp on the CPU; its NCCL twin (owned) on a GPU, one rank too */
    comm *pp;       /* par.pp on the CPU; its NCCL twin (owned) on a GPU when pp > 1 */
    model_stage stage; /* this rank's pipeline stage of the model (dist_init: set for cfg) */
    double t_wait; /* seconds spent in this stage's boundary transfers (waits included): the bubble */
    struct {
        float *buf; /* a send waiting for this stage's next receive (dist_stage_io) */
        size_t n;
        int peer;
    } pend;
    float *grads;   /* the buffer the hook reduces (dist_hook) */
} dist_ctx;

/* Groups of world for sizes s (validated against cfg and batch_rows, 0: unchecked; pp over 1 is
 * allowed here: commands that cannot run stages refuse it with par_validate first); k: the device
 * the trainer runs on (CUDA: the dp and pp groups get NCCL twins on k's stream). cfg NULL: no stage
 * is set. world stays the caller's. */
int dist_init(dist_ctx *d, comm *world, const par_sizes *s, const dsv4_config *cfg, long batch_rows, const kctx *k,
              mill_err *e);
void dist_free(dist_ctx *d);
/* m (this rank's stage, model_load_stage with d->stage) sends and receives its boundary streams
 * over the pp group (model_stage_io); a no-op with one stage. */
void dist_stage_io(dist_ctx *d, dsv4_model *m);
/* The send still waiting at the end of a schedule goes out now (a no-op with one stage). */
int dist_stage_flush(dist_ctx *d, mill_err *e);
/* Every stage's part of a flat buffer in its stage layout (mine: this rank's stage's floats, and
 * mine_index its tid2eid tables or NULL) into full (model_init of the whole model: its data, and
 * index_data when given), on every rank of the pp group (collective over it; a copy with one stage). */
int dist_gather_stages(dist_ctx *d, const float *mine, const int32_t *mine_index, dsv4_model *full, mill_err *e);
/* 1F1B for stage `stage` of pp over n_micro micro-batches: order[2 * n_micro] lists forward i as i
 * and backward i as -1 - i (warm-up forwards, then one forward and one backward, then cool-down). */
void dist_schedule_1f1b(int pp, int stage, int n_micro, int *order);
/* This rank's rows [lo, hi) of a batch of n rows (dp splits them in order). */
void dist_rows(const dist_ctx *d, long n, long *lo, long *hi);
/* From now on m's backward starts the dp all-reduce of each layer's part of grads as soon as it
 * is final (m->grad_ready); dist_unhook stops it (micro-batches before the last one of a step). */
void dist_hook(dist_ctx *d, dsv4_model *m, float *grads);
void dist_unhook(dsv4_model *m);
/* A rank with no tokens in a step takes part in the same reductions, in the backward's order,
 * with its zero gradients (the others' hooked backward waits for them). */
int dist_reduce_idle(dist_ctx *d, const dsv4_model *m, float *grads, mill_err *e);
/* Mean next-token cross-entropy over the whole batch (every rank's rows, global token count) and
 * its gradient for this rank's B rows and stage, accumulated into grads: model_forward_backward's
 * computation, normalised globally, in n_micro micro-batches run by the 1F1B schedule across the
 * stages (arenas[n_micro]: one per micro-batch, as many may be in flight). out: the global loss
 * (summed over dp and the stages) and count. The gradients' dp reduction is started by the hook
 * (m->grad_ready), in the last micro-batch's backward only; the caller flushes (optimizer_step does). */
int dist_ce_step(dist_ctx *d, const dsv4_model *m, const kctx *k, const int32_t *ids, const int32_t *targets, int B,
                 int T, int n_micro, float *grads, model_loss *out, arena *arenas, mill_err *e);

#endif
