/* trainer/optimizer.h — AdamW over the model's flat fp32 parameters.
 * Owns: the Adam moments (same layout as the parameters), the learning-rate
 * schedule, global-norm clipping, and freezing by parameter-name pattern
 * (fnmatch globs over the original release names). Buffers (router bias) and
 * tid2eid are never updated; parameters the loss does not reach (the indexer)
 * keep their values. */
#ifndef MILL_OPTIMIZER_H
#define MILL_OPTIMIZER_H

#include <stdint.h>

#include "comm.h"
#include "model.h"

typedef enum { LR_CONSTANT = 0, LR_COSINE } lr_schedule;

#define OPTIM_MAX_FREEZE 16

typedef struct {
    double lr, min_lr, beta1, beta2, eps, weight_decay, clip_grad; /* clip_grad <= 0: off */
    lr_schedule schedule;
    long warmup_steps, total_steps;
    char freeze[OPTIM_MAX_FREEZE][96]; /* glob patterns, e.g. "layers.*.ffn.gate.weight" */
    int n_freeze;
} optim_config;

typedef struct {
    optim_config cfg;
    /* The distributed optimizer (Megatron's, ZeRO-1): the dp ranks share the moments, rank r keeping
     * those of the floats [lo, hi) = model_shard_range(r, dp); it updates only those parameters,
     * then the updated shards are all-gathered. dp NULL or of one rank: the whole layout. */
    comm *dp;         /* the group (NCCL on a GPU); not owned */
    comm *pp;         /* the pipeline stages (host; NULL: one): the norm adds up over them, checkpoints
                       * number the stages' files by its rank */
    comm *tp;         /* heads over ranks (NULL: none): the sliced tensors' part of the norm adds up over
                       * it; checkpoints number its ranks' moment files */
    comm *ep, *dense; /* experts over ranks (NULL: none): dp above is then the group that holds the
                       * same experts (edp), ep the ranks that split them (the routed experts' part of
                       * the norm adds up over it; checkpoints number its ranks' files), dense the
                       * group the other gradients were reduced over (dp: the step waits for it too) */
    size_t lo, hi;
    float *m, *v;     /* [hi - lo], in `device` memory: element i is parameter float lo + i */
    mill_device device;
    uint8_t *update;  /* per parameter-table entry: 1 when the step changes it */
    long step;        /* steps taken */
    size_t n_floats;
    int n_params;
} optimizer;

void optim_config_default(optim_config *c);
int optimizer_init(optimizer *o, const dsv4_model *m, const optim_config *cfg, mill_err *e);
/* The same for this rank's shard over dp (NULL: the whole layout, as optimizer_init). */
int optimizer_init_shard(optimizer *o, const dsv4_model *m, const optim_config *cfg, comm *dp, mill_err *e);
void optimizer_free(optimizer *o);
/* dst = src with the moments copied to k's device (where its model trains); update flags and the
 * step stay on the host. */
int optimizer_to_device(optimizer *dst, const optimizer *src, const kctx *k, mill_err *e);
/* The moments and step of a device optimizer into a host one of the same model (for checkpoints). */
int optimizer_copy_to_host(optimizer *host, const optimizer *dev, const kctx *k, mill_err *e);
/* Learning rate at 0-based step s: linear warm-up to lr, then constant or cosine to min_lr. */
double optimizer_lr(const optim_config *c, long s);
/* One step with grads [n_floats] (summed over the dp ranks: the step first waits for the
 * reductions the backward started on o->dp): clips by the global norm over updated parameters
 * (each rank's shard summed once over dp), applies AdamW (weight decay on matrices only) to this
 * rank's shard, all-gathers the shards over dp, increments step. *grad_norm gets the norm before
 * clipping; the clipping factor is applied inside the update (grads are not written). */
int optimizer_step(optimizer *o, dsv4_model *m, const kctx *k, float *grads, double *grad_norm, double *lr_used,
                   mill_err *e);
int optimizer_n_updated(const optimizer *o, const dsv4_model *m, size_t *floats);

#endif
