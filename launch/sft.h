/* launch/sft.h — supervised fine-tuning on the synthetic arithmetic data.
 * Owns: the SFT recipe (YAML), the training loop (batches with loss on the response
 * only, AdamW, logging, periodic greedy evaluation on held-out problems, checkpoints)
 * and resume from a checkpoint, bit-identical to an uninterrupted run. */
#ifndef MILL_SFT_H
#define MILL_SFT_H

#include <stdint.h>

#include "../algos/arith.h"
#include "../common/tokenizer.h"
#include "../trainer/checkpoint.h"

typedef struct {
    char model_config[1024]; /* configs/models/NAME.json, for a fresh model */
    char init_from[1024];    /* or a model directory to start from ("" = fresh) */
    uint64_t init_seed;
    double init_std;
    int levels[4], n_levels; /* arithmetic difficulty levels, drawn uniformly */
    uint64_t data_seed;
    long steps;
    int batch_size, max_len;
    optim_config optim;
    int log_every, eval_every, eval_problems, checkpoint_every;
    uint64_t eval_seed;
    char out_dir[1024];
} sft_recipe;

/* Reads and checks a recipe; unknown keys and wrong types are errors naming the key. */
int sft_recipe_load(const char *path, sft_recipe *r, mill_err *e);

typedef struct {
    dsv4_model model;
    optimizer opt;
    train_state ts;
    tokenizer *tok;
    kctx k;
    arena a;
    float *grads;
} sft_state;

/* Fresh (or init_from) model, or the checkpoint in resume_dir when given. */
int sft_open(sft_state *s, const sft_recipe *r, const char *resume_dir, mill_err *e);
void sft_close(sft_state *s);

typedef struct {
    double loss, grad_norm, lr;
    long tokens; /* response tokens trained on */
} sft_step_stats;

/* One optimizer step on the next batch of the data stream. */
int sft_step(sft_state *s, const sft_recipe *r, sft_step_stats *st, mill_err *e);
/* Greedy accuracy on n held-out problems (drawn from eval_seed, same every call). */
int sft_eval(sft_state *s, const sft_recipe *r, int n, double *accuracy, mill_err *e);
/* Greedy accuracy of a model on n held-out arithmetic problems (levels drawn uniformly, seed fixed);
 * per_level [4] (optional): the accuracy at each level 1..4, -1 where none was drawn. */
int arith_eval(const dsv4_model *m, const kctx *k, const tokenizer *tok, const int *levels, int n_levels, uint64_t seed,
               int n, double *accuracy, double *per_level, mill_err *e);
/* The answer text of a generated response: its bytes up to the first non-byte id. */
int arith_decode_answer(const tokenizer *tok, const int32_t *ids, int n, char *text, size_t cap, mill_err *e);

/* The whole run: steps, logs, evals, checkpoints under out_dir; prints to stdout. */
int sft_run(const sft_recipe *r, const char *resume_dir, mill_err *e);

#endif
