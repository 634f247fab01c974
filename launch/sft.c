#include "sft.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../algos/sft_data.h"
#include "../common/yamlcfg.h"
#include "../kernels/dense.h"
#include "recipe.h"
#include "../rollout/generate.h"

static int copy_str(char *dst, size_t cap, const char *src, const char *what, const char *file, mill_err *e) {
    if (strlen(src) >= cap) return mill_errf(e, "%s: %s is longer than %zu characters", file, what, cap - 1);
    memcpy(dst, src, strlen(src) + 1);
    return 0;
}

int sft_recipe_load(const char *path, sft_recipe *r, mill_err *e) {
    json_t *y = yamlcfg_load(path, e);
    if (!y) return -1;
    memset(r, 0, sizeof *r);
    optim_config_default(&r->optim);
    int rc = -1;
    static const char *const top[] = {"model", "data", "train", "optimizer", "eval", "checkpoint", NULL};
    static const char *const model_k[] = {"config", "init_from", "init_seed", "init_std", NULL};
    static const char *const train_k[] = {"steps",  "batch_size", "max_len", "log_every", "device",
                                          "parallel", "micro_batches", NULL};
    static const char *const eval_k[] = {"every", "problems", "seed", NULL};
    static const char *const ckpt_k[] = {"dir", "every", NULL};
    if (yamlcfg_known_keys(y, NULL, top, path, e) || yamlcfg_known_keys(y, "model", model_k, path, e) ||
        yamlcfg_known_keys(y, "train", train_k, path, e) ||
        yamlcfg_known_keys(y, "eval", eval_k, path, e) ||
        yamlcfg_known_keys(y, "checkpoint", ckpt_k, path, e) || recipe_parallel(y, path, &r->par, e))
        goto done;
    const char *cfg, *from, *dir, *dev;
    long long iseed, steps, bs, maxlen, logev, evev, evn, evseed, ckev, mbs;
    if (yamlcfg_str(y, "model.config", "", &cfg, path, e) || yamlcfg_str(y, "model.init_from", "", &from, path, e) ||
        yamlcfg_int(y, "model.init_seed", 1, 0, INT64_MAX, &iseed, path, e) ||
        yamlcfg_num(y, "model.init_std", 0.02, 1e-9, 10, &r->init_std, path, e) ||
        recipe_data(y, path, r->levels, &r->n_levels, &r->data_seed, e) ||
        yamlcfg_int(y, "train.steps", 0, 1, 100000000, &steps, path, e) ||
        yamlcfg_int(y, "train.batch_size", 32, 1, 1 << 20, &bs, path, e) ||
        yamlcfg_int(y, "train.max_len", 64, 4, 1 << 20, &maxlen, path, e) ||
        yamlcfg_int(y, "train.log_every", 10, 1, 1 << 30, &logev, path, e) ||
        yamlcfg_int(y, "train.micro_batches", 1, 1, 1 << 20, &mbs, path, e) ||
        yamlcfg_str(y, "train.device", "auto", &dev, path, e) ||
        recipe_optimizer(y, path, &r->optim, e) ||
        yamlcfg_int(y, "eval.every", 0, 0, 1 << 30, &evev, path, e) ||
        yamlcfg_int(y, "eval.problems", 200, 1, 1 << 20, &evn, path, e) ||
        yamlcfg_int(y, "eval.seed", 12345, 0, INT64_MAX, &evseed, path, e) ||
        yamlcfg_str(y, "checkpoint.dir", "runs/sft", &dir, path, e) ||
        yamlcfg_int(y, "checkpoint.every", 0, 0, 1 << 30, &ckev, path, e))
        goto done;
    if (!yamlcfg_get(y, "train.steps")) {
        mill_errf(e, "%s: train.steps is required", path);
        goto done;
    }
    if (kctx_device_parse(dev, &r->device)) {
        mill_errf(e, "%s: train.device \"%s\" must be \"auto\", \"cpu\" or \"cuda\"", path, dev);
        goto done;
    }
    if (!*cfg == !*from) {
        mill_errf(e, "%s: give exactly one of model.config (a fresh model) and model.init_from (a model dir)", path);
        goto done;
    }
    if (copy_str(r->model_config, sizeof r->model_config, cfg, "model.config", path, e) ||
        copy_str(r->init_from, sizeof r->init_from, from, "model.init_from", path, e) ||
        copy_str(r->out_dir, sizeof r->out_dir, dir, "checkpoint.dir", path, e))
        goto done;
    r->init_seed = (uint64_t)iseed;
    r->steps = steps;
    r->batch_size = (int)bs;
    r->max_len = (int)maxlen;
    r->log_every = (int)logev;
    r->micro_batches = (int)mbs;
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

/* Model and optimizer on the host: fresh (or init_from), or the checkpoint in resume_dir. The
 * optimizer keeps this rank's shard of the moments. */
static int open_host(sft_state *s, const sft_recipe *r, const dsv4_config *cfg, const char *resume_dir, mill_err *e) {
    /* pp: the stages; the moments shard over the ranks with the same layout (dp; edp with experts
     * over ranks) */
    int ep = s->d.par.sz.ep > 1;
    comm *dp = ep ? s->d.par.edp : s->d.par.dpcp, *pp = s->d.par.sz.pp > 1 ? s->d.par.pp : NULL;
    const model_stage *stage = &s->d.stage; /* this rank's layers and experts */
    if (resume_dir) {
        TRY(checkpoint_load_shard(resume_dir, &s->model, &s->opt, &r->optim, dp, stage, pp, &s->ts, e));
        goto layout;
    }
    if (*r->init_from) {
        if (model_load_stage(&s->model, r->init_from, stage, e)) return -1;
    } else { /* the whole model's random values (one stream over its tensors), then this stage's part */
        dsv4_model full;
        if (model_init(&full, cfg, e)) return -1;
        model_init_random(&full, r->init_seed, (float)r->init_std);
        if (!pp && !ep && s->d.par.sz.tp == 1) { /* every tensor: the whole model, under this rank's stage (cp) */
            s->model = full;
            s->model.stage = *stage;
        }
        else if (model_init_stage(&s->model, cfg, *stage, e) || model_copy_matching(&s->model, &full, e)) {
            model_free(&full);
            model_free(&s->model);
            return -1;
        } else {
            model_free(&full);
        }
    }
    if (optimizer_init_shard(&s->opt, &s->model, &r->optim, dp, e)) {
        model_free(&s->model);
        return -1;
    }
    rng_seed(&s->ts.data_rng, r->data_seed);
layout:
    s->opt.pp = pp;
    if (ep) s->opt.ep = s->d.par.ep, s->opt.dense = s->d.par.dpcp;
    if (s->d.par.sz.tp > 1) s->opt.tp = s->d.par.tp;
    dist_ep_io(&s->d, &s->model);
    return 0;
}

int sft_open(sft_state *s, const sft_recipe *r, const char *resume_dir, comm *world, mill_err *e) {
    memset(s, 0, sizeof *s);
    if (!world && comm_world_init(&s->own_world, e)) return -1;
    s->world = world ? world : s->own_world;
    /* the device first, so a machine without one fails before the model is built */
    if (kctx_init(&s->k, r->device, e)) {
        kctx_free(&s->k);
        comm_world_end(s->own_world, 0);
        return mill_err_wrap(e, "device %s", r->device == DEVICE_CUDA ? "cuda" : "cpu");
    }
    dsv4_config cfg; /* the layout's stages need the model's layers first */
    if (config_load(resume_dir ? resume_dir : *r->init_from ? r->init_from : r->model_config, &cfg, e) ||
        dist_init(&s->d, s->world, &r->par, &cfg, r->batch_size, &s->k, e)) {
        kctx_free(&s->k);
        comm_world_end(s->own_world, 0);
        return -1;
    }
    if (open_host(s, r, &cfg, resume_dir, e)) {
        dist_free(&s->d);
        kctx_free(&s->k);
        comm_world_end(s->own_world, 0);
        return -1;
    }
    s->gpu = r->device != DEVICE_CPU;
    if (par_validate(&r->par, &s->model.cfg, s->world->size, r->batch_size, e) ||
        (s->gpu && (model_to_device(&s->dm, &s->model, &s->k, e) || optimizer_to_device(&s->dopt, &s->opt, &s->k, e)))) {
        mill_err_wrap(e, "sft");
        sft_close(s);
        return -1;
    }
    /* the device optimizer gathers its shards over the device's comms */
    s->dopt.dp = s->d.par.sz.ep > 1 ? s->d.edp : s->d.dp;
    if (s->d.par.sz.ep > 1) s->dopt.ep = s->d.ep, s->dopt.dense = s->d.dp;
    if (s->d.par.sz.tp > 1) s->dopt.tp = s->d.tp;
    dist_ep_io(&s->d, &s->dm);
    s->n_arenas = r->micro_batches * par_vpp(&r->par);
    if (!(s->grads = mem_alloc_copy(s->k.device, NULL, sizeof(float) * s->model.n_floats, e)) ||
        tokenizer_bytes_new(&s->tok, s->model.cfg.vocab_size, e) ||
        !(s->arenas = calloc((size_t)s->n_arenas, sizeof *s->arenas))) {
        if (!s->arenas) mill_errf(e, "sft: out of memory");
        sft_close(s);
        return -1;
    }
    for (int i = 0; i < s->n_arenas; i++) /* one per micro-batch and chunk: 1F1B keeps several in flight */
        if (arena_init_device(&s->arenas[i], 16 << 20, s->k.device, s->k.stream, e)) {
            sft_close(s);
            return -1;
        }
    return 0;
}

void sft_close(sft_state *s) {
    mem_free(s->k.device, s->grads); /* before kctx_free, which forgets the device */
    if (s->tok) tokenizer_free(s->tok);
    for (int i = 0; s->arenas && i < s->n_arenas; i++) arena_free(&s->arenas[i]);
    free(s->arenas);
    if (s->gpu) {
        optimizer_free(&s->dopt);
        model_free(&s->dm);
    }
    optimizer_free(&s->opt);
    model_free(&s->model);
    dist_free(&s->d);
    kctx_free(&s->k);
    comm_world_end(s->own_world, 0);
    memset(s, 0, sizeof *s);
}

dsv4_model *sft_train_model(sft_state *s) { return s->gpu ? &s->dm : &s->model; }
optimizer *sft_train_opt(sft_state *s) { return s->gpu ? &s->dopt : &s->opt; }

int sft_sync_host(sft_state *s, int moments, mill_err *e) {
    if (!s->gpu) return 0;
    /* the flat buffer only: tid2eid and the RoPE tables never change */
    TRY(op_copy_to_host(&s->k, s->model.data, s->dm.data, sizeof(float) * s->model.n_floats, e));
    return moments ? optimizer_copy_to_host(&s->opt, &s->dopt, &s->k, e) : 0;
}

int sft_checkpoint(sft_state *s, const char *dir, mill_err *e) {
    if (sft_sync_host(s, 1, e)) return mill_err_wrap(e, "checkpoint %s", dir);
    return checkpoint_save(dir, &s->model, &s->opt, &s->ts, NULL, e);
}

static void draw(arith_problem *p, const sft_recipe *r, int heldout, rng *g) {
    int level = r->levels[r->n_levels > 1 ? rng_below(g, (uint64_t)r->n_levels) : 0];
    arith_draw(p, level, heldout, g);
}

int sft_step(sft_state *s, const sft_recipe *r, sft_step_stats *st, mill_err *e) {
    int B = r->batch_size;
    arith_problem *probs = malloc(sizeof *probs * (size_t)B);
    if (!probs) return mill_errf(e, "sft: out of memory");
    for (int i = 0; i < B; i++) draw(&probs[i], r, 0, &s->ts.data_rng);
    s->ts.data_position += (uint64_t)B;
    sft_batch b;
    int rc = sft_batch_make(&b, s->tok, probs, B, r->max_len, e);
    free(probs);
    if (rc) return -1;
    model_loss loss;
    dsv4_model *m = sft_train_model(s);
    optimizer *o = sft_train_opt(s);
    long r0, r1; /* every rank draws the whole batch (one data stream) and trains its rows of it */
    dist_rows(&s->d, b.B, &r0, &r1);
    /* ids and targets are host arrays (model.h); grads, like every op argument, are in k's memory */
    rc = op_zero(&s->k, s->grads, sizeof(float) * m->n_floats, e);
    dist_hook(&s->d, m, s->grads);
    if (!rc)
        rc = dist_ce_step(&s->d, m, &s->k, b.ids + r0 * b.T, b.targets + r0 * b.T, (int)(r1 - r0), b.T,
                          r->micro_batches, s->grads, &loss, s->arenas, e);
    dist_unhook(m);
    if (!rc) rc = optimizer_step(o, m, &s->k, s->grads, &st->grad_norm, &st->lr, e);
    sft_batch_free(&b);
    if (rc) return -1;
    s->ts.step = o->step;
    st->loss = loss.loss;
    st->tokens = loss.count;
    return 0;
}

int arith_eval(const dsv4_model *m, const kctx *k, const tokenizer *tok, const int *levels, int n_levels, uint64_t seed,
               int n, double *accuracy, double *per_level, mill_err *e) {
    rng g;
    rng_seed(&g, seed);
    arith_problem *probs = malloc(sizeof *probs * (size_t)n);
    int32_t **prompts = calloc((size_t)n, sizeof *prompts);
    int *lens = malloc(sizeof(int) * (size_t)n);
    int max_new = 12, rc = -1, correct = 0;
    gen_result res = {0};
    if (!probs || !prompts || !lens) {
        mill_errf(e, "eval: out of memory");
        goto out;
    }
    for (int i = 0; i < n; i++) {
        int level = levels[n_levels > 1 ? rng_below(&g, (uint64_t)n_levels) : 0];
        arith_draw(&probs[i], level, 1, &g);
        char text[256];
        arith_format_prompt(&probs[i], text, sizeof text);
        prompts[i] = malloc(sizeof(int32_t) * 256);
        if (!prompts[i]) {
            mill_errf(e, "eval: out of memory");
            goto out;
        }
        prompts[i][0] = tokenizer_bos(tok);
        int nt;
        if (tokenizer_encode(tok, text, strlen(text), prompts[i] + 1, 255, &nt, e)) goto out;
        lens[i] = nt + 1;
    }
    sample_params sp = {.temperature = 0, .top_p = 1, .max_new_tokens = max_new, .n_stop = 1};
    sp.stop[0] = tokenizer_eos(tok);
    if (generate_cached(m, k, (const int32_t *const *)prompts, lens, n, &sp, (size_t)1 << 30, &res, e)) goto out;
    int lvl_n[5] = {0}, lvl_ok[5] = {0};
    for (int i = 0; i < n; i++) {
        char text[64];
        if (arith_decode_answer(tok, res.out_ids + (long)i * max_new, res.out_len[i], text, sizeof text, e)) goto out;
        int ok = arith_check(text, &probs[i]);
        correct += ok;
        lvl_n[probs[i].level] += 1;
        lvl_ok[probs[i].level] += ok;
    }
    *accuracy = (double)correct / n;
    if (per_level)
        for (int l = 1; l <= 4; l++) per_level[l - 1] = lvl_n[l] ? (double)lvl_ok[l] / lvl_n[l] : -1.0;
    rc = 0;
out:
    if (prompts)
        for (int i = 0; i < n; i++) free(prompts[i]);
    free(prompts);
    free(probs);
    free(lens);
    gen_result_free(&res);
    return rc;
}

int arith_decode_answer(const tokenizer *tok, const int32_t *ids, int n, char *text, size_t cap, mill_err *e) {
    /* the answer is the bytes before the first special or reserved id (an untrained model emits any id) */
    int nb = 0;
    while (nb < n && ids[nb] >= 0 && ids[nb] < 256) nb++;
    return tokenizer_decode(tok, ids, nb, text, cap, e);
}

int sft_eval(sft_state *s, const sft_recipe *r, int n, double *accuracy, mill_err *e) {
    /* on the host model with a CPU kctx; it can move to the GPU rollout engine once that exists */
    *accuracy = 0;
    int lead = s->d.par.rank == 0,
        staged = s->d.par.sz.pp > 1 || s->d.par.sz.ep > 1 || s->d.par.sz.tp > 1 || s->d.par.sz.cp > 1;
    if (!lead && !staged) return 0;
    if (sft_sync_host(s, 0, e)) return -1;
    dsv4_model full = {0}; /* with stages or experts over ranks: the whole model, gathered */
    if (staged && (model_init(&full, &s->model.cfg, e) ||
                   dist_gather_stages(&s->d, s->model.data, s->model.index_data, &full, e))) {
        model_free(&full);
        return -1;
    }
    int rc = 0;
    if (lead) {
        kctx hk;
        rc = kctx_init(&hk, DEVICE_CPU, e) ||
             arith_eval(staged ? &full : &s->model, &hk, s->tok, r->levels, r->n_levels, r->eval_seed, n, accuracy,
                        NULL, e);
        kctx_free(&hk);
    }
    model_free(&full);
    return rc ? -1 : 0;
}

static void progress(long step, long total, double loss, double tps) {
    if (!isatty(2)) return;
    int width = 30, filled = (int)(width * step / (total ? total : 1));
    char bar[64];
    for (int i = 0; i < width; i++) bar[i] = i < filled ? '#' : '.';
    bar[width] = 0;
    fprintf(stderr, "\r[%s] %ld/%ld loss %.4f %.0f tok/s ", bar, step, total, loss, tps);
    fflush(stderr);
}

/* mkdir -p */
static int make_dirs(const char *path) {
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++)
        if (*p == '/') {
            *p = 0;
            if (mkdir(buf, 0755) && errno != EEXIST) return -1;
            *p = '/';
        }
    return mkdir(buf, 0755) && errno != EEXIST ? -1 : 0;
}

/* What one rank holds, in bytes: parameters, gradients, Adam moments (its shard). */
static void print_bytes(const sft_state *s) {
    double mib = 1.0 / (1 << 20), p = (double)s->model.n_floats * sizeof(float);
    printf("sft: per rank: parameters %.1f MiB, gradients %.1f MiB, optimizer state %.1f MiB (%s of the moments)\n",
           p * mib, p * mib, 2.0 * (double)(s->opt.hi - s->opt.lo) * sizeof(float) * mib,
           s->opt.dp && s->opt.dp->size > 1 ? (s->opt.ep ? "a 1/edp shard" : "a 1/dp shard") : "all");
}

int sft_run(const sft_recipe *r, const char *resume_dir, comm *world, mill_err *e) {
    sft_state s;
    if (sft_open(&s, r, resume_dir, world, e)) return -1;
    int lead = s.d.par.rank == 0; /* rank 0 prints and evaluates */
    if (make_dirs(r->out_dir)) {
        sft_close(&s);
        return mill_errf(e, "%s: cannot create the checkpoint directory: %s", r->out_dir, strerror(errno));
    }
    size_t upd;
    int nupd = optimizer_n_updated(&s.opt, &s.model, &upd);
    if (!lead && !freopen("/dev/null", "w", stdout)) log_warn("sft: rank %d keeps its stdout", s.d.par.rank); /* one rank speaks */
    char lay[96];
    printf("sft: %zu parameters, %d tensors / %zu values trained, %ld steps of %d problems (levels", s.model.n_trainable,
           nupd, upd, r->steps, r->batch_size);
    for (int i = 0; i < r->n_levels; i++) printf(" %d", r->levels[i]);
    printf(") on %s, %d rank(s) (%s)%s\n", s.gpu ? "cuda" : "cpu", s.d.par.world, par_sizes_str(&r->par, lay, sizeof lay),
           resume_dir ? ", resumed" : "");
    print_bytes(&s);
    int rc = -1;
    double t0 = mill_now(), loss_acc = 0;
    long tok_acc = 0, n_acc = 0;
    char ck[1100];
    while (s.ts.step < r->steps) {
        sft_step_stats st;
        if (sft_step(&s, r, &st, e)) goto out;
        loss_acc += st.loss;
        tok_acc += st.tokens;
        n_acc++;
        double dt = mill_now() - t0;
        if (lead) progress(s.ts.step, r->steps, st.loss, tok_acc / (dt > 0 ? dt : 1));
        if (s.ts.step % r->log_every == 0 || s.ts.step == r->steps) {
            if (isatty(2)) fputc('\n', stderr);
            printf("step %6ld  loss %.4f  lr %.2e  grad_norm %.3f  %.0f tokens/s\n", s.ts.step, loss_acc / n_acc, st.lr,
                   st.grad_norm, tok_acc / (dt > 0 ? dt : 1));
            fflush(stdout);
            loss_acc = 0;
            n_acc = 0;
            tok_acc = 0;
            t0 = mill_now();
        }
        if ((r->eval_every && s.ts.step % r->eval_every == 0) || s.ts.step == r->steps) {
            double acc; /* rank 0's (every stage takes part in gathering the model) */
            if (sft_eval(&s, r, r->eval_problems, &acc, e)) goto out;
            printf("step %6ld  held-out greedy accuracy %.3f (%d problems)\n", s.ts.step, acc, r->eval_problems);
            fflush(stdout);
            t0 = mill_now();
        }
        if ((r->checkpoint_every && s.ts.step % r->checkpoint_every == 0) || s.ts.step == r->steps) {
            snprintf(ck, sizeof ck, "%s/step-%06ld", r->out_dir, s.ts.step);
            if (sft_checkpoint(&s, ck, e)) goto out;
            printf("step %6ld  checkpoint %s\n", s.ts.step, ck);
            t0 = mill_now();
        }
    }
    rc = 0;
out:
    sft_close(&s);
    return rc;
}
