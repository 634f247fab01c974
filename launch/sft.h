/* launch/sft.h — supervised fine-tuning on the synthetic arithmetic data.
 * Owns: the SFT recipe (YAML), the training loop (batches with loss on the response
 * only, AdamW, logging, periodic greedy evaluation on held-out problems, checkpoints)
 * and resume from a checkpoint, bit-identical to an uninterrupted run. On a GPU (train.device
 * cuda) the model, the Adam moments, the gradients and the step live on the device; the host
 * model and optimizer are the images that checkpoints and the evaluation read. */
#ifndef MILL_SFT_H
#define MILL_SFT_H

#include <stdint.h>

#include "../algos/arith.h"
#include "../common/tokenizer.h"
#include "../trainer/checkpoint.h"
#include "../trainer/dist.h"

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
    mill_device device; /* train.device: where the training step runs (the default, 0, is the CPU) */
    par_sizes par;      /* train.parallel.{tp,pp,ep,cp,dp} (the command line's --dp ... override them) */
    int micro_batches;  /* train.micro_batches: each rank's rows of a batch in this many, through the
                         * pipeline stages by 1F1B (default 1) */
} sft_recipe;

/* "cpu" or "cuda" into *dev; -1 for anything else (the caller names the file or option). */
/* Reads and checks a recipe; unknown keys and wrong types are errors naming the key. */
int sft_recipe_load(const char *path, sft_recipe *r, mill_err *e);

typedef struct {
    dsv4_model model; /* the host image: what checkpoints save and the evaluation runs */
    optimizer opt;
    train_state ts;
    tokenizer *tok;
    kctx k;      /* the training device's */
    arena *arenas; /* activations, in k's memory: one per micro-batch */
    int n_arenas;
    float *grads; /* [n_floats] in k's memory */
    /* on a GPU: the copies that train (model and opt are brought up to date by sft_sync_host) */
    int gpu;
    dsv4_model dm;
    optimizer dopt;
    /* the rank layout: each dp rank trains its rows of every batch, keeps its shard of the moments */
    comm *world, *own_world; /* own_world: made here when the caller gave none */
    dist_ctx d;
} sft_state;

/* Fresh (or init_from) model, or the checkpoint in resume_dir when given (made with any dp), as a
 * rank of world under r->par (world NULL: this process alone). */
int sft_open(sft_state *s, const sft_recipe *r, const char *resume_dir, comm *world, mill_err *e);
void sft_close(sft_state *s);

typedef struct {
    double loss, grad_norm, lr;
    long tokens; /* response tokens trained on */
} sft_step_stats;

/* The model and optimizer the step trains: the device copies on a GPU, else the host ones. */
dsv4_model *sft_train_model(sft_state *s);
optimizer *sft_train_opt(sft_state *s);
/* Brings s->model's weights (and with moments, s->opt) up to date with the device's; no-op on CPU. */
int sft_sync_host(sft_state *s, int moments, mill_err *e);
/* A checkpoint of the current state into dir (from the host images, synced first). */
int sft_checkpoint(sft_state *s, const char *dir, mill_err *e);

/* One optimizer step on the next batch of the data stream. */
int sft_step(sft_state *s, const sft_recipe *r, sft_step_stats *st, mill_err *e);
/* Greedy accuracy on n held-out problems (drawn from eval_seed, same every call), on the CPU from
 * the host model (synced first), in rank 0's *accuracy (0 elsewhere). With pipeline stages every
 * rank calls it: they gather the whole model first. */
int sft_eval(sft_state *s, const sft_recipe *r, int n, double *accuracy, mill_err *e);
/* Greedy accuracy of a model on n held-out arithmetic problems (levels drawn uniformly, seed fixed);
 * per_level [4] (optional): the accuracy at each level 1..4, -1 where none was drawn. */
int arith_eval(const dsv4_model *m, const kctx *k, const tokenizer *tok, const int *levels, int n_levels, uint64_t seed,
               int n, double *accuracy, double *per_level, mill_err *e);
/* The answer text of a generated response: its bytes up to the first non-byte id. */
int arith_decode_answer(const tokenizer *tok, const int32_t *ids, int n, char *text, size_t cap, mill_err *e);

/* The whole run: steps, logs, evals, checkpoints under out_dir; rank 0 prints to stdout. */
int sft_run(const sft_recipe *r, const char *resume_dir, comm *world, mill_err *e);

#endif
