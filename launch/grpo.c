#include "grpo.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "../algos/arith.h"
#include "../common/tokenizer.h"
#include "../common/yamlcfg.h"
#include "../rollout/generate.h"
#include "../trainer/checkpoint.h"
#include "recipe.h"
#include "sft.h"

int grpo_recipe_load(const char *path, grpo_recipe *r, mill_err *e) {
    json_t *y = yamlcfg_load(path, e);
    if (!y) return -1;
    memset(r, 0, sizeof *r);
    optim_config_default(&r->optim);
    grpo_config_default(&r->algo);
    r->optim.schedule = LR_CONSTANT;
    r->optim.lr = 5e-4;
    r->optim.weight_decay = 0.0;
    r->optim.min_lr = r->optim.lr;
    int rc = -1;
    static const char *const top[] = {"model", "data", "rollout", "algorithm", "train", "optimizer", "eval",
                                      "checkpoint", NULL};
    static const char *const model_k[] = {"init_from", NULL};
    static const char *const roll_k[] = {"prompts_per_step", "samples_per_prompt", "max_new_tokens", "temperature",
                                         "seed", NULL};
    static const char *const algo_k[] = {"eps_low", "eps_high", "std_normalize", "seq_mean", "kl_coef", "tis_cap", NULL};
    static const char *const train_k[] = {"steps", NULL};
    static const char *const eval_k[] = {"every", "problems", "seed", NULL};
    static const char *const ck_k[] = {"dir", "every", NULL};
    if (yamlcfg_known_keys(y, NULL, top, path, e) || yamlcfg_known_keys(y, "model", model_k, path, e) ||
        yamlcfg_known_keys(y, "rollout", roll_k, path, e) ||
        yamlcfg_known_keys(y, "algorithm", algo_k, path, e) || yamlcfg_known_keys(y, "train", train_k, path, e) ||
        yamlcfg_known_keys(y, "eval", eval_k, path, e) ||
        yamlcfg_known_keys(y, "checkpoint", ck_k, path, e))
        goto done;
    const char *from, *dir;
    long long sseed, pps, spp, mnt, steps, evev, evn, evseed, ckev;
    int stdn, seqm;
    if (yamlcfg_str(y, "model.init_from", "", &from, path, e) ||
        recipe_data(y, path, r->levels, &r->n_levels, &r->data_seed, e) ||
        yamlcfg_int(y, "rollout.prompts_per_step", 16, 1, 1 << 16, &pps, path, e) ||
        yamlcfg_int(y, "rollout.samples_per_prompt", 8, 2, 1 << 10, &spp, path, e) ||
        yamlcfg_int(y, "rollout.max_new_tokens", 8, 1, 1 << 16, &mnt, path, e) ||
        yamlcfg_num(y, "rollout.temperature", 1.0, &r->temperature, path, e) ||
        yamlcfg_int(y, "rollout.seed", 1, 0, INT64_MAX, &sseed, path, e) ||
        yamlcfg_num(y, "algorithm.eps_low", 0.2, &r->algo.eps_low, path, e) ||
        yamlcfg_num(y, "algorithm.eps_high", 0.28, &r->algo.eps_high, path, e) ||
        yamlcfg_bool(y, "algorithm.std_normalize", 1, &stdn, path, e) ||
        yamlcfg_bool(y, "algorithm.seq_mean", 0, &seqm, path, e) ||
        yamlcfg_num(y, "algorithm.kl_coef", 0.0, &r->algo.kl_coef, path, e) ||
        yamlcfg_num(y, "algorithm.tis_cap", 2.0, &r->algo.tis_cap, path, e) ||
        yamlcfg_int(y, "train.steps", 0, 1, 1 << 30, &steps, path, e) ||
        recipe_optimizer(y, path, &r->optim, e) ||
        yamlcfg_int(y, "eval.every", 0, 0, 1 << 30, &evev, path, e) ||
        yamlcfg_int(y, "eval.problems", 256, 1, 1 << 20, &evn, path, e) ||
        yamlcfg_int(y, "eval.seed", 12345, 0, INT64_MAX, &evseed, path, e) ||
        yamlcfg_str(y, "checkpoint.dir", "runs/grpo", &dir, path, e) ||
        yamlcfg_int(y, "checkpoint.every", 0, 0, 1 << 30, &ckev, path, e))
        goto done;
    if (!*from) {
        mill_errf(e, "%s: model.init_from (the SFT warm start's directory) is required", path);
        goto done;
    }
    if (!yamlcfg_get(y, "train.steps")) {
        mill_errf(e, "%s: train.steps is required", path);
        goto done;
    }
    if (r->algo.kl_coef != 0) {
        mill_errf(e, "%s: algorithm.kl_coef must be 0 for now (no reference model is loaded yet)", path);
        goto done;
    }
    if (strlen(from) >= sizeof r->init_from || strlen(dir) >= sizeof r->out_dir) {
        mill_errf(e, "%s: a path is longer than %zu characters", path, sizeof r->init_from - 1);
        goto done;
    }
    snprintf(r->init_from, sizeof r->init_from, "%s", from);
    snprintf(r->out_dir, sizeof r->out_dir, "%s", dir);
    r->sample_seed = (uint64_t)sseed;
    r->prompts_per_step = (int)pps;
    r->samples_per_prompt = (int)spp;
    r->max_new_tokens = (int)mnt;
    r->algo.std_normalize = stdn;
    r->algo.seq_mean = seqm;
    r->steps = steps;
    r->optim.total_steps = steps;
    r->eval_every = (int)evev;
    r->eval_problems = (int)evn;
    r->eval_seed = (uint64_t)evseed;
    r->checkpoint_every = (int)ckev;
    rc = 0;
done:
    json_decref(y);
    return rc;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int grpo_loss_cb(void *ctx, const float *logp, int n, float *dlogp, double *loss, mill_err *e) {
    return grpo_loss(ctx, logp, n, dlogp, loss, e);
}

/* One GRPO step: rollout, rewards, advantages, one policy-gradient update with routing replay. */
typedef struct {
    double reward, loss, grad_norm, clip_frac, max_dlogp, mean_len, gen_s, train_s;
    long tokens;
} step_stats;

static int grpo_step(const grpo_recipe *r, dsv4_model *m, const kctx *k, optimizer *opt, const tokenizer *tok,
                     rng *data_rng, long step, float *grads, arena *a, step_stats *out, mill_err *e) {
    const dsv4_config *c = &m->cfg;
    int P = r->prompts_per_step, G = r->samples_per_prompt, n = P * G, maxn = r->max_new_tokens;
    int L = c->num_hidden_layers, K = c->num_experts_per_tok;
    int rc = -1;
    arith_problem *probs = malloc(sizeof *probs * (size_t)P);
    int32_t **rows = calloc((size_t)n, sizeof *rows);
    int *lens = malloc(sizeof(int) * (size_t)n);
    float *rewards = malloc(sizeof(float) * (size_t)n), *adv = malloc(sizeof(float) * (size_t)n);
    gen_result res = {0};
    int32_t *ids = NULL, *targets = NULL, *replay = NULL, *seq_of = NULL;
    float *old = NULL;
    if (!probs || !rows || !lens || !rewards || !adv) {
        mill_errf(e, "grpo: out of memory");
        goto out;
    }
    for (int p = 0; p < P; p++) {
        int level = r->levels[r->n_levels > 1 ? rng_below(data_rng, (uint64_t)r->n_levels) : 0];
        arith_draw(&probs[p], level, 0, data_rng);
        char text[256];
        arith_format_prompt(&probs[p], text, sizeof text);
        int32_t buf[256];
        buf[0] = tokenizer_bos(tok);
        int nt;
        if (tokenizer_encode(tok, text, strlen(text), buf + 1, 255, &nt, e)) goto out;
        for (int g = 0; g < G; g++) {
            rows[p * G + g] = malloc(sizeof(int32_t) * (size_t)(nt + 1));
            if (!rows[p * G + g]) {
                mill_errf(e, "grpo: out of memory");
                goto out;
            }
            memcpy(rows[p * G + g], buf, sizeof(int32_t) * (size_t)(nt + 1));
            lens[p * G + g] = nt + 1;
        }
    }
    sample_params sp = {.temperature = (float)r->temperature, .top_p = 1, .seed = r->sample_seed + (uint64_t)step * n,
                        .max_new_tokens = maxn, .n_stop = 1};
    sp.stop[0] = tokenizer_eos(tok);
    double t0 = now();
    if (generate_cached(m, k, (const int32_t *const *)rows, lens, n, &sp, (size_t)1 << 30, &res, e)) goto out;
    out->gen_s = now() - t0;
    double rsum = 0, lsum = 0;
    for (int i = 0; i < n; i++) {
        char text[64];
        if (arith_decode_answer(tok, res.out_ids + (long)i * maxn, res.out_len[i], text, sizeof text, e)) goto out;
        /* the reward asks for the answer and a clean stop */
        rewards[i] = (float)(arith_check(text, &probs[i / G]) && res.finish[i] == FINISH_STOP);
        rsum += rewards[i];
        lsum += res.out_len[i];
    }
    out->reward = rsum / n;
    out->mean_len = lsum / n;
    grpo_advantages(rewards, P, G, r->algo.std_normalize, adv);
    /* training batch: prompt + response, right-padded; targets on response tokens only */
    int T = 0;
    for (int i = 0; i < n; i++) T = lens[i] + res.out_len[i] > T ? lens[i] + res.out_len[i] : T;
    ids = calloc((size_t)n * T, sizeof(int32_t));
    targets = malloc(sizeof(int32_t) * (size_t)n * T);
    replay = calloc((size_t)L * n * T * K, sizeof(int32_t));
    seq_of = malloc(sizeof(int32_t) * (size_t)n * T);
    old = malloc(sizeof(float) * (size_t)n * T);
    if (!ids || !targets || !replay || !seq_of || !old) {
        mill_errf(e, "grpo: out of memory");
        goto out;
    }
    int cnt = 0;
    for (int i = 0; i < n; i++) {
        int len = lens[i] + res.out_len[i];
        for (int t = 0; t < T; t++) {
            int32_t tokv = t < lens[i] ? rows[i][t] : t < len ? res.out_ids[(long)i * maxn + t - lens[i]] : tokenizer_pad(tok);
            ids[(long)i * T + t] = tokv;
        }
        for (int t = 0; t < T; t++) {
            int resp = t + 1 >= lens[i] && t + 1 < len; /* position t predicts response token t+1 */
            targets[(long)i * T + t] = resp ? ids[(long)i * T + t + 1] : -1;
            if (resp) {
                seq_of[cnt] = i;
                old[cnt++] = res.logprobs[(long)i * maxn + t + 1 - lens[i]];
            }
        }
        /* replay: the experts the engine used; padding repeats the row's last token's experts */
        for (int l = 0; l < L; l++)
            for (int t = 0; t < T; t++) {
                int src = t < len ? t : len - 1;
                memcpy(replay + (((long)l * n + i) * T + t) * K, res.routing[i] + ((long)l * len + src) * K,
                       sizeof(int32_t) * (size_t)K);
            }
    }
    /* The engine's logprobs are the behaviour policy; the trainer recomputes its own in the same
     * forward (weights unchanged since sampling) and the gap is reported. */
    grpo_batch gb = {.cfg = &r->algo, .seq = seq_of, .n_seqs = n, .adv = adv, .old_logp = old, .rollout_logp = old};
    memset(grads, 0, sizeof(float) * m->n_floats);
    double loss;
    long count;
    float *logp = malloc(sizeof(float) * (size_t)cnt);
    if (!logp) {
        mill_errf(e, "grpo: out of memory");
        goto out;
    }
    t0 = now();
    int frc = model_forward_backward_tokens(m, k, ids, targets, n, T, replay, (float)(r->temperature > 0 ? r->temperature : 1),
                                            grads, grpo_loss_cb, &gb, logp, &loss, &count, a, e);
    double maxd = 0;
    for (int i = 0; !frc && i < cnt; i++) maxd = fmax(maxd, fabs((double)logp[i] - old[i]));
    free(logp);
    if (frc) goto out;
    double lr;
    if (optimizer_step(opt, m, k, grads, &out->grad_norm, &lr, e)) goto out;
    out->train_s = now() - t0;
    out->loss = loss;
    out->clip_frac = gb.stats.clip_frac;
    out->max_dlogp = maxd;
    out->tokens = count;
    rc = 0;
out:
    if (rows)
        for (int i = 0; i < n; i++) free(rows[i]);
    free(rows);
    free(probs);
    free(lens);
    free(rewards);
    free(adv);
    free(ids);
    free(targets);
    free(replay);
    free(seq_of);
    free(old);
    gen_result_free(&res);
    return rc;
}

static void print_levels(const double *lv) {
    printf("  [");
    for (int l = 0, first = 1; l < 4; l++)
        if (lv[l] >= 0) {
            printf("%slevel %d: %.3f", first ? "" : ", ", l + 1, lv[l]);
            first = 0;
        }
    printf("]\n");
}

int grpo_run(const grpo_recipe *r, mill_err *e) {
    dsv4_model m;
    if (model_load(&m, r->init_from, e)) return -1;
    kctx k;
    optimizer opt;
    tokenizer *tok = NULL;
    arena a = {0};
    float *grads = NULL;
    int rc = -1;
    rng data_rng;
    rng_seed(&data_rng, r->data_seed);
    if (kctx_init(&k, DEVICE_CPU, e)) goto done_model;
    if (optimizer_init(&opt, &m, &r->optim, e)) goto done_model;
    if (tokenizer_bytes_new(&tok, m.cfg.vocab_size, e) || arena_init(&a, 16 << 20, e)) goto done;
    grads = malloc(sizeof(float) * m.n_floats);
    if (!grads) {
        mill_errf(e, "grpo: out of memory");
        goto done;
    }
    double acc0, lv[4];
    if (arith_eval(&m, &k, tok, r->levels, r->n_levels, r->eval_seed, r->eval_problems, &acc0, lv, e)) goto done;
    printf("grpo: %s, %ld steps of %d prompts x %d samples; held-out greedy accuracy before: %.3f (%d problems)",
           r->init_from, r->steps, r->prompts_per_step, r->samples_per_prompt, acc0, r->eval_problems);
    print_levels(lv);
    fflush(stdout);
    double t_start = now();
    for (long s = 0; s < r->steps; s++) {
        step_stats st = {0};
        if (grpo_step(r, &m, &k, &opt, tok, &data_rng, s, grads, &a, &st, e)) goto done;
        printf("step %4ld  reward %.3f  loss %+.4f  grad_norm %.3f  clip %.3f  max|dlogp| %.2e  len %.1f  "
               "rollout %.2fs train %.2fs\n",
               s + 1, st.reward, st.loss, st.grad_norm, st.clip_frac, st.max_dlogp, st.mean_len, st.gen_s, st.train_s);
        fflush(stdout);
        if ((r->eval_every && (s + 1) % r->eval_every == 0) || s + 1 == r->steps) {
            double acc;
            if (arith_eval(&m, &k, tok, r->levels, r->n_levels, r->eval_seed, r->eval_problems, &acc, lv, e)) goto done;
            printf("step %4ld  held-out greedy accuracy %.3f (before: %.3f)  %.1f min", s + 1, acc, acc0,
                   (now() - t_start) / 60);
            print_levels(lv);
            fflush(stdout);
        }
        if ((r->checkpoint_every && (s + 1) % r->checkpoint_every == 0) || s + 1 == r->steps) {
            char ck[1200];
            train_state ts = {s + 1, (uint64_t)(s + 1) * r->prompts_per_step, data_rng};
            snprintf(ck, sizeof ck, "%s/step-%06ld", r->out_dir, s + 1);
            if (mkdir(r->out_dir, 0755) && errno != EEXIST) {
                mill_errf(e, "%s: cannot create: %s", r->out_dir, strerror(errno));
                goto done;
            }
            if (checkpoint_save(ck, &m, &opt, &ts, e)) goto done;
            printf("step %4ld  checkpoint %s\n", s + 1, ck);
        }
    }
    rc = 0;
done:
    optimizer_free(&opt);
done_model:
    free(grads);
    if (tok) tokenizer_free(tok);
    arena_free(&a);
    kctx_free(&k);
    model_free(&m);
    return rc;
}
