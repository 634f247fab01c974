/* trainer/checkpoint.h — training checkpoints that resume bit for bit.
 * Owns: the checkpoint directory format and its atomic write:
 *   DIR/config.json, DIR/model.safetensors   (model_save: original names)
 *   DIR/optimizer.safetensors                (Adam m and v, flat, parameter layout)
 *   DIR/state.json                           (step, data position, RNG state, lr schedule,
 *                                             optimizer_shards)
 * written into DIR.tmp, each file fsynced, then renamed to DIR and the parent fsynced.
 * Written by the K ranks of a data-parallel group, the model and the moments are sharded:
 * model-RRRRR-of-KKKKK.safetensors + model.safetensors.index.json (HF's sharded layout: a model
 * directory mill forward reads) and optimizer-RRRRR-of-KKKKK.safetensors holding the moments of
 * the rank's optimizer shard: adam.m and adam.v, runs of the whole model's trainable floats one
 * after another, and pieces [n, 2] (I64: each run's global offset and length), so a checkpoint of any
 * layout (dp, pp, vpp, ep, tp) resumes in any other; optimizer_shards = K. P pipeline stages number
 * their files after the earlier stages' (stage * K + R), the model index merged from the stages'
 * parts; pipeline_stages = P. Expert and tensor parallelism multiply the files a stage writes. */
#ifndef MILL_CHECKPOINT_H
#define MILL_CHECKPOINT_H

#include <stdint.h>

#include "../common/rng.h"
#include "optimizer.h"

typedef struct {
    long step;              /* optimizer steps taken */
    uint64_t data_position; /* samples drawn from the data stream */
    rng data_rng;           /* the data stream's generator */
} train_state;

/* m and o live in k's memory (k NULL: the host): a device model and its moments are copied to the
 * host one shard at a time, so no rank ever stages more than what it writes. */
int checkpoint_save(const char *dir, const dsv4_model *m, const optimizer *o, const train_state *ts, const kctx *k,
                    mill_err *e);
/* Loads the model (model_load), then the optimizer moments and state. o must be unset:
 * it is initialised here with cfg (the run's optimizer settings). */
int checkpoint_load(const char *dir, dsv4_model *m, optimizer *o, const optim_config *cfg, train_state *ts,
                    mill_err *e);
/* The same for this rank's optimizer shard over dp (optimizer_init_shard) and its pipeline stage
 * (stage, pp: NULL for the whole model), from a checkpoint made by any layout: the moments are
 * saved in the whole model's coordinates, so each rank reads the runs that overlap its own. */
int checkpoint_load_shard(const char *dir, dsv4_model *m, optimizer *o, const optim_config *cfg, comm *dp,
                          const model_stage *stage, comm *pp, train_state *ts, mill_err *e);

#endif
