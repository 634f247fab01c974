/* trainer/checkpoint.h — training checkpoints that resume bit for bit.
 * Owns: the checkpoint directory format and its atomic write:
 *   DIR/config.json, DIR/model.safetensors   (model_save: original names)
 *   DIR/optimizer.safetensors                (Adam m and v, flat, parameter layout)
 *   DIR/state.json                           (step, data position, RNG state, lr schedule)
 * written into DIR.tmp, each file fsynced, then renamed to DIR and the parent fsynced. */
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

int checkpoint_save(const char *dir, const dsv4_model *m, const optimizer *o, const train_state *ts, mill_err *e);
/* Loads the model (model_load), then the optimizer moments and state. o must be unset:
 * it is initialised here with cfg (the run's optimizer settings). */
int checkpoint_load(const char *dir, dsv4_model *m, optimizer *o, const optim_config *cfg, train_state *ts,
                    mill_err *e);

#endif
