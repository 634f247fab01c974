/* launch/grpo.h — `mill run` and `mill resume`: the GRPO controller.
 * Owns: the GRPO recipe (YAML, `--set key=value` overrides), the processes of a run (a trainer
 * worker and rollout engines, spawned and supervised here, or external engines reached over TCP),
 * and the loop: draw prompts at the dataset cursor, sample groups on the engines (logprobs and
 * routing recorded), score them, group advantages (dynamic sampling optional), one training step
 * on the trainer with routing replay, weight refresh to the engines (version = step), evaluation,
 * checkpoints, and every step, sample, checkpoint and fault in the run ledger, so that
 * `mill resume RUN` continues from the last complete checkpoint bit for bit.
 * Layouts: colocated (one engine on this host; engine and trainer take turns and each releases
 * its memory while the other works) and disaggregated (engines as separate processes over TCP,
 * spawned here or started by hand with `mill rollout-server`), optionally async: step s + 1 is
 * generated while step s trains, by weights one version behind, which TIS corrects. */
#ifndef MILL_GRPO_RUN_H
#define MILL_GRPO_RUN_H

#include "../algos/chat.h"
#include "../algos/grpo.h"
#include "../trainer/optimizer.h"
#include "../trainer/parallel.h"

typedef enum { REWARD_ARITH = 0, REWARD_MATH, REWARD_REMOTE } reward_kind;

typedef struct {
    char name[128]; /* run name ("" = generated) */
    char ledger[1024];
    char init_from[1024];
    /* data */
    int jsonl; /* 0: arithmetic generator */
    int levels[4], n_levels;
    long pool; /* arithmetic problems in the training pool */
    uint64_t data_seed;
    char data_path[1024], prompt_key[128], label_key[128], template_[512];
    int skip_bad;
    char tokenizer[1024]; /* data.tokenizer: a tokenizer.json (file or directory); "" = the byte tokenizer */
    chat_format chat;     /* data.chat (kind), data.thinking, data.reasoning_effort */
    /* rollout */
    int prompts_per_step, samples_per_prompt, max_new_tokens;
    double temperature, top_p;
    uint64_t sample_seed;
    int disaggregated, n_engines, dynamic_sampling, max_draws;
    int async; /* disaggregated: generate step s + 1 while step s trains (one version behind) */
    int exact; /* rollout.exact: the engines' logprobs from the trainer's forward (server_config.exact), and
                * the trainer's op_linear row-invariant (kctx.exact): rollout = trainer to the bit */
    char engine_addrs[2048]; /* comma-separated external engines ("" = spawn n_engines) */
    double cache_mb, timeout_s;
    par_sizes engine_par; /* rollout.parallel.{tp, ep}: each spawned engine's ranks (par_engine) */
    /* reward */
    reward_kind reward;
    char reward_url[512];
    double reward_timeout_s, reward_backoff_s;
    int reward_retries;
    int reward_fallback_last_number; /* reward.fallback_last_number: no box or Answer: -> last number */
    /* algorithm and training */
    grpo_config algo;
    int std_normalize;
    long steps;
    int updates_per_step, micro_batch;
    int train_gpu;   /* train.device: cuda (the trainer worker on the GPU) */
    par_sizes par;   /* train.parallel: the trainer's rank layout (its ranks start under mpiexec when over 1) */
    char trainer_addr[256]; /* train.address: a trainer started outside the run (srun), "" = the run starts it */
    int rollout_gpu; /* rollout.device: cuda (spawned engines on the GPU) */
    int curve;       /* rollout.curve: on (1) or off (0); auto resolves to on when an engine address is another host */
    char curve_keys[1024]; /* rollout.curve_keys: the key file (mill keys); "" = one made in the run dir */
    optim_config optim;
    /* eval, checkpoints */
    int eval_every, eval_problems;
    uint64_t eval_seed;
    char eval_path[1024];
    int checkpoint_every;
    char out_dir[1024];
    int kill_engine_at_step; /* fault injection for tests: SIGKILL engine 0 mid-rollout of that step */
    int max_restarts;        /* train.max_restarts: how often a dead trainer is started again (default 3) */
    int engine_max_restarts; /* rollout.max_restarts: how often dead engines are started again in a run (default 10) */
    int kill_trainer_at_step, kill_trainer_rank; /* fault injection for tests: that trainer rank SIGKILLs itself
                                                  * when that step's training begins (first attempt only) */
    int wedge_trainer_at_step; /* ... or hangs there (debug.wedge_trainer_at_step), alive, for the heartbeat */
    double train_heartbeat_s;  /* train.heartbeat_s: a training step silent this long is wedged (0: off) */
    double rollout_heartbeat_s; /* rollout.heartbeat_s: an engine owing samples silent this long is wedged (0: off) */
    char *text;              /* the effective recipe as JSON (what the ledger keeps) */
} grpo_recipe;

/* Loads a recipe; overrides are "dotted.key=value" strings (values read as YAML scalars). */
int grpo_recipe_load(const char *path, char *const *overrides, int n_overrides, grpo_recipe *r, mill_err *e);
/* The same from a recipe's text as the ledger keeps it (r->text); path names the recipe in errors. */
int grpo_recipe_parse(const char *text, const char *path, grpo_recipe *r, mill_err *e);
void grpo_recipe_free(grpo_recipe *r);

/* A new run (recorded in r->ledger), to the end. */
int grpo_run(const grpo_recipe *r, const char *recipe_path, mill_err *e);
/* Continues run `name` of the ledger at ledger_path from its last complete checkpoint. */
int grpo_resume(const char *ledger_path, const char *name, mill_err *e);

#endif
