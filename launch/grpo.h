/* launch/grpo.h — a colocated GRPO run in one process: the first working step of `mill run`.
 * Owns: the GRPO recipe (YAML) and the loop: draw prompts, sample groups on the cached engine
 * (logprobs and routing recorded), score with the arithmetic verifier, group advantages, a
 * training step with routing replay and the clipped policy loss, evaluation and checkpoints.
 * Trainer and engine share the weights in memory, so the refresh is immediate (version = step).
 * Not yet here: separate trainer/engine processes over ZeroMQ, the SQLite ledger, resume. */
#ifndef MILL_GRPO_RUN_H
#define MILL_GRPO_RUN_H

#include "../algos/grpo.h"
#include "../trainer/optimizer.h"

typedef struct {
    char init_from[1024];
    int levels[4], n_levels;
    uint64_t data_seed, sample_seed;
    int prompts_per_step, samples_per_prompt, max_new_tokens;
    double temperature;
    grpo_config algo;
    long steps;
    optim_config optim;
    int eval_every, eval_problems, checkpoint_every;
    uint64_t eval_seed;
    char out_dir[1024];
} grpo_recipe;

int grpo_recipe_load(const char *path, grpo_recipe *r, mill_err *e);
int grpo_run(const grpo_recipe *r, mill_err *e);

#endif
