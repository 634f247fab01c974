/* launch/grpo_recipe.c — the GRPO recipe: YAML keys, `--set key=value` overrides, checks at
 * parse time (grpo.h's grpo_recipe_load and grpo_recipe_parse). The keys, their defaults and
 * ranges are in recipe_from_tree below; grpo.h's grpo_recipe says what each one sets. */
#include "grpo.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../common/ledger.h"
#include "../common/yamlcfg.h"
#include "../kernels/backend.h"
#include "recipe.h"

/* Sets root[dotted key] = value (a YAML scalar), creating sections as needed. */
static int apply_override(json_t *root, const char *kv, mill_err *e) {
    const char *eq = strchr(kv, '=');
    if (!eq || eq == kv) return mill_errf(e, "--set %s: expected key=value, e.g. optimizer.lr=1e-4", kv);
    char key[256];
    if ((size_t)(eq - kv) >= sizeof key) return mill_errf(e, "--set %s: the key is too long", kv);
    memcpy(key, kv, (size_t)(eq - kv));
    key[eq - kv] = 0;
    /* the value as YAML reads it under a key (so 1e-4 is a number and [1, 2] a list) */
    size_t vl = strlen(eq + 1);
    char *yml = malloc(vl + 8);
    if (!yml) return mill_errf(e, "out of memory");
    memcpy(yml, "v: ", 3);
    memcpy(yml + 3, eq + 1, vl + 1);
    json_t *wrap = yamlcfg_parse(yml, vl + 3, "--set", e);
    free(yml);
    if (!wrap) return mill_err_wrap(e, "--set %s", kv);
    json_t *doc = json_incref(json_object_get(wrap, "v"));
    json_decref(wrap);
    if (!doc) doc = json_null();
    json_t *node = root;
    for (char *p = key, *dot; (dot = strchr(p, '.')) != NULL; p = dot + 1) {
        *dot = 0;
        json_t *next = json_object_get(node, p);
        if (!next) {
            next = json_object();
            if (json_object_set_new(node, p, next)) { /* jansson refuses a non-UTF-8 key and frees next */
                json_decref(doc);
                return mill_errf(e, "--set %s: the key is not valid UTF-8", kv);
            }
        }
        if (!json_is_object(next)) {
            json_decref(doc);
            return mill_errf(e, "--set %s: \"%s\" is not a section", kv, p);
        }
        node = next;
        *dot = '.';
    }
    const char *leaf = strrchr(key, '.') ? strrchr(key, '.') + 1 : key;
    if (json_object_set_new(node, leaf, json_is_null(doc) ? json_string("") : doc))
        return mill_errf(e, "--set %s: the key is not valid UTF-8", kv); /* not dropped without a word */
    return 0;
}

static int copy_str(char *dst, size_t cap, const char *src, const char *what, const char *path, mill_err *e) {
    if (strlen(src) >= cap) return mill_errf(e, "%s: %s is longer than %zu characters", path, what, cap - 1);
    snprintf(dst, cap, "%s", src);
    return 0;
}

/* Whether an address list names another host over TCP (anything but loopback). */
static int addrs_remote(const char *list) {
    for (const char *a = list; (a = strstr(a, "tcp://")) != NULL; a += 6) {
        const char *h = a + 6;
        if (strncmp(h, "127.", 4) && strncmp(h, "localhost:", 10) && strncmp(h, "[::1]:", 6)) return 1;
    }
    return 0;
}

/* data.tokenizer: "auto" is init_from's tokenizer.json when it has one, else the byte tokenizer
 * ("bytes"); data.chat needs a tokenizer.json (the format's markers are its added tokens). */
static int recipe_tokenizer(grpo_recipe *r, const char *tok, const char *chat, int think, const char *effort,
                            const char *path, mill_err *e) {
    char auto_path[1100];
    snprintf(auto_path, sizeof auto_path, "%s/tokenizer.json", r->init_from);
    if (!strcmp(tok, "auto")) tok = access(auto_path, R_OK) == 0 ? r->init_from : "";
    else if (!strcmp(tok, "bytes")) tok = "";
    else if (!*tok) return mill_errf(e, "%s: data.tokenizer is empty; expected auto, bytes or a tokenizer.json path", path);
    if (copy_str(r->tokenizer, sizeof r->tokenizer, tok, "data.tokenizer", path, e)) return -1;
    chat_format_default(&r->chat);
    if (chat_kind_parse(chat, &r->chat.kind))
        return mill_errf(e, "%s: data.chat \"%s\" must be \"none\" or \"deepseek-v4\"", path, chat);
    if (chat_effort_parse(effort, &r->chat.effort_max))
        return mill_errf(e, "%s: data.reasoning_effort \"%s\" must be \"high\" or \"max\" (or unset)", path, effort);
    r->chat.thinking = think;
    if (r->chat.kind != CHAT_NONE && !*tok)
        return mill_errf(e, "%s: data.chat %s needs a tokenizer.json: set data.tokenizer (the byte tokenizer has no "
                            "chat markers)", path, chat);
    if (r->chat.kind == CHAT_NONE && (think || *effort))
        return mill_errf(e, "%s: data.thinking and data.reasoning_effort need data.chat: deepseek-v4", path);
    return 0;
}

static int recipe_from_tree(json_t *y, const char *path, grpo_recipe *r, mill_err *e) {
    static const char *const top[] = {"name", "ledger", "model", "data", "rollout", "reward", "algorithm", "train",
                                      "optimizer", "eval", "checkpoint", "debug", NULL};
    static const char *const model_k[] = {"init_from", NULL};
    static const char *const data_k[] = {"kind", "levels", "seed", "pool", "path", "prompt_key", "label_key",
                                         "template", "skip_bad_rows", "tokenizer", "chat", "thinking",
                                         "reasoning_effort", NULL};
    static const char *const roll_k[] = {"prompts_per_step", "samples_per_prompt", "max_new_tokens", "temperature",
                                         "top_p", "seed", "layout", "engines", "addresses", "cache_mb", "device", "timeout_s",
                                         "dynamic_sampling", "max_draws", "async", "curve", "curve_keys", "parallel", "max_restarts",
                                         "heartbeat_s", "exact", NULL};
    static const char *const rew_k[] = {"kind", "url", "timeout_s", "retries", "backoff_s", "fallback_last_number", NULL};
    static const char *const algo_k[] = {"eps_low",      "eps_high",     "std_normalize", "seq_mean",
                                         "kl_coef",      "kl_type",      "tis_cap",       "entropy_coef",
                                         "loss_agg_mode", "policy_loss", "clip_ratio_c",  "log_ratio_clamp", NULL};
    static const char *const train_k[] = {"steps",    "updates_per_step", "micro_batch", "device",
                                          "parallel", "max_restarts",     "address",     "heartbeat_s", NULL};
    static const char *const eval_k[] = {"every", "problems", "seed", "path", NULL};
    static const char *const ck_k[] = {"dir", "every", NULL};
    static const char *const dbg_k[] = {"kill_engine_at_step", "kill_trainer_at_step", "kill_trainer_rank", "wedge_trainer_at_step", NULL};
    static const char *const eng_k[] = {"tp", "ep", NULL};
    if (yamlcfg_known_keys(y, NULL, top, path, e) || yamlcfg_known_keys(y, "model", model_k, path, e) ||
        yamlcfg_known_keys(y, "data", data_k, path, e) || yamlcfg_known_keys(y, "rollout", roll_k, path, e) ||
        yamlcfg_known_keys(y, "reward", rew_k, path, e) || yamlcfg_known_keys(y, "algorithm", algo_k, path, e) ||
        yamlcfg_known_keys(y, "train", train_k, path, e) || yamlcfg_known_keys(y, "eval", eval_k, path, e) ||
        yamlcfg_known_keys(y, "checkpoint", ck_k, path, e) || yamlcfg_known_keys(y, "debug", dbg_k, path, e) ||
        yamlcfg_known_keys(y, "rollout.parallel", eng_k, path, e))
        return -1;
    optim_config_default(&r->optim);
    grpo_config_default(&r->algo);
    r->optim.schedule = LR_CONSTANT;
    r->optim.lr = 1e-4;
    r->optim.weight_decay = 0.0;
    r->optim.min_lr = r->optim.lr;
    const char *name, *ledger, *from, *kind, *dpath, *pk, *lk, *tmpl, *layout, *rkind, *url, *klt, *evpath, *dir, *dev, *rdev, *curve, *ckeys, *taddr, *aggm, *pol, *tokp, *chat, *effort;
    long long dseed, pool, pps, spp, mnt, sseed, neng, draws, retries, steps, upd, mb, evev, evn, evseed, ckev, kill,
        restarts, tkill, tkrank, twedge, etp, eep, erestarts;
    int skip, dyn, stdn, seqm, async, think, exact;
    if (yamlcfg_str(y, "name", "", &name, path, e) || yamlcfg_str(y, "ledger", ledger_default_path(), &ledger, path, e) ||
        yamlcfg_str(y, "model.init_from", "", &from, path, e) ||
        yamlcfg_str(y, "data.kind", "arithmetic", &kind, path, e) ||
        yamlcfg_int(y, "data.seed", 1, 0, INT64_MAX, &dseed, path, e) ||
        yamlcfg_int(y, "data.pool", 20000, 1, 1 << 26, &pool, path, e) ||
        yamlcfg_str(y, "data.path", "", &dpath, path, e) || yamlcfg_str(y, "data.prompt_key", "prompt", &pk, path, e) ||
        yamlcfg_str(y, "data.label_key", "label", &lk, path, e) || yamlcfg_str(y, "data.template", "", &tmpl, path, e) ||
        yamlcfg_bool(y, "data.skip_bad_rows", 0, &skip, path, e) ||
        yamlcfg_str(y, "data.tokenizer", "auto", &tokp, path, e) || yamlcfg_str(y, "data.chat", "none", &chat, path, e) ||
        yamlcfg_bool(y, "data.thinking", 0, &think, path, e) ||
        yamlcfg_str(y, "data.reasoning_effort", "", &effort, path, e) ||
        yamlcfg_int(y, "rollout.prompts_per_step", 16, 1, 4096, &pps, path, e) ||
        yamlcfg_int(y, "rollout.samples_per_prompt", 8, 2, 1024, &spp, path, e) ||
        yamlcfg_int(y, "rollout.max_new_tokens", 8, 1, 1 << 16, &mnt, path, e) ||
        yamlcfg_num(y, "rollout.temperature", 1.0, 1e-6, 100, &r->temperature, path, e) ||
        yamlcfg_num(y, "rollout.top_p", 1.0, 1e-9, 1, &r->top_p, path, e) ||
        yamlcfg_int(y, "rollout.seed", 1, 0, INT64_MAX / 2, &sseed, path, e) ||
        yamlcfg_str(y, "rollout.layout", "colocated", &layout, path, e) ||
        yamlcfg_int(y, "rollout.engines", 1, 1, 64, &neng, path, e) ||
        yamlcfg_num(y, "rollout.cache_mb", 1024, 1, 1e7, &r->cache_mb, path, e) ||
        yamlcfg_str(y, "rollout.device", "auto", &rdev, path, e) ||
        yamlcfg_str(y, "rollout.curve", "auto", &curve, path, e) ||
        yamlcfg_str(y, "rollout.curve_keys", "", &ckeys, path, e) ||
        yamlcfg_num(y, "rollout.timeout_s", 300, 1e-3, 1e6, &r->timeout_s, path, e) ||
        yamlcfg_bool(y, "rollout.dynamic_sampling", 0, &dyn, path, e) ||
        yamlcfg_bool(y, "rollout.exact", 0, &exact, path, e) ||
        yamlcfg_bool(y, "rollout.async", 0, &async, path, e) ||
        yamlcfg_int(y, "rollout.max_draws", 4, 1, 1000, &draws, path, e) ||
        yamlcfg_int(y, "rollout.parallel.tp", 1, 1, 1 << 20, &etp, path, e) ||
        yamlcfg_int(y, "rollout.parallel.ep", 1, 1, 1 << 20, &eep, path, e) ||
        yamlcfg_int(y, "rollout.max_restarts", 10, 0, 1000, &erestarts, path, e) ||
        yamlcfg_num(y, "rollout.heartbeat_s", 120, 0, 1e6, &r->rollout_heartbeat_s, path, e) ||
        yamlcfg_str(y, "reward.kind", "", &rkind, path, e) || yamlcfg_str(y, "reward.url", "", &url, path, e) ||
        yamlcfg_num(y, "reward.timeout_s", 10, 1e-3, 3600, &r->reward_timeout_s, path, e) ||
        yamlcfg_int(y, "reward.retries", 3, 0, 100, &retries, path, e) ||
        yamlcfg_num(y, "reward.backoff_s", 0.5, 0, 3600, &r->reward_backoff_s, path, e) ||
        yamlcfg_bool(y, "reward.fallback_last_number", 0, &r->reward_fallback_last_number, path, e) ||
        yamlcfg_num(y, "algorithm.eps_low", 0.2, 0, 1, &r->algo.eps_low, path, e) ||
        yamlcfg_num(y, "algorithm.eps_high", 0.28, 0, 10, &r->algo.eps_high, path, e) ||
        yamlcfg_bool(y, "algorithm.std_normalize", 1, &stdn, path, e) ||
        yamlcfg_bool(y, "algorithm.seq_mean", 0, &seqm, path, e) ||
        yamlcfg_num(y, "algorithm.kl_coef", 0.0, 0, 1e6, &r->algo.kl_coef, path, e) ||
        yamlcfg_str(y, "algorithm.kl_type", "low_var_kl", &klt, path, e) ||
        yamlcfg_num(y, "algorithm.tis_cap", 2.0, 0, 1e6, &r->algo.tis_cap, path, e) ||
        yamlcfg_num(y, "algorithm.entropy_coef", 0.0, -1e3, 1e3, &r->algo.entropy_coef, path, e) ||
        yamlcfg_str(y, "algorithm.loss_agg_mode", "", &aggm, path, e) ||
        yamlcfg_str(y, "algorithm.policy_loss", "vanilla", &pol, path, e) ||
        yamlcfg_num(y, "algorithm.clip_ratio_c", 0.0, 0, 1e6, &r->algo.clip_ratio_c, path, e) ||
        yamlcfg_num(y, "algorithm.log_ratio_clamp", 0.0, 0, 1e6, &r->algo.log_ratio_clamp, path, e) ||
        yamlcfg_int(y, "train.steps", 0, 1, 1 << 30, &steps, path, e) ||
        yamlcfg_int(y, "train.updates_per_step", 1, 1, 1024, &upd, path, e) ||
        yamlcfg_int(y, "train.micro_batch", 0, 0, 1 << 20, &mb, path, e) ||
        yamlcfg_str(y, "train.device", "auto", &dev, path, e) || recipe_optimizer(y, path, &r->optim, e) ||
        recipe_parallel(y, path, &r->par, e) || yamlcfg_int(y, "train.max_restarts", 3, 0, 1000, &restarts, path, e) ||
        yamlcfg_str(y, "train.address", "", &taddr, path, e) ||
        yamlcfg_num(y, "train.heartbeat_s", 600, 0, 1e6, &r->train_heartbeat_s, path, e) ||
        yamlcfg_int(y, "eval.every", 0, 0, 1 << 30, &evev, path, e) ||
        yamlcfg_int(y, "eval.problems", 256, 1, 1 << 20, &evn, path, e) ||
        yamlcfg_int(y, "eval.seed", 12345, 0, INT64_MAX, &evseed, path, e) ||
        yamlcfg_str(y, "eval.path", "", &evpath, path, e) ||
        yamlcfg_str(y, "checkpoint.dir", "runs/grpo", &dir, path, e) ||
        yamlcfg_int(y, "checkpoint.every", 10, 0, 1 << 30, &ckev, path, e) ||
        yamlcfg_int(y, "debug.kill_engine_at_step", 0, 0, 1 << 30, &kill, path, e) ||
        yamlcfg_int(y, "debug.kill_trainer_at_step", 0, 0, 1 << 30, &tkill, path, e) ||
        yamlcfg_int(y, "debug.kill_trainer_rank", 0, 0, 1 << 20, &tkrank, path, e) ||
        yamlcfg_int(y, "debug.wedge_trainer_at_step", 0, 0, 1 << 30, &twedge, path, e))
        return -1;
    if (!*from) return mill_errf(e, "%s: model.init_from (the warm start's directory) is required", path);
    if (par_engine((int)etp, (int)eep, &r->engine_par, e)) return mill_err_wrap(e, "%s: rollout.parallel", path);
    if (exact && (etp > 1 || eep > 1))
        return mill_errf(e, "%s: rollout.exact needs engines of one rank (rollout.parallel.tp and ep 1)", path);
    if (!yamlcfg_get(y, "train.steps")) return mill_errf(e, "%s: train.steps is required", path);
    if (copy_str(r->name, sizeof r->name, name, "name", path, e) ||
        copy_str(r->ledger, sizeof r->ledger, ledger, "ledger", path, e) ||
        copy_str(r->init_from, sizeof r->init_from, from, "model.init_from", path, e) ||
        copy_str(r->data_path, sizeof r->data_path, dpath, "data.path", path, e) ||
        copy_str(r->prompt_key, sizeof r->prompt_key, pk, "data.prompt_key", path, e) ||
        copy_str(r->label_key, sizeof r->label_key, lk, "data.label_key", path, e) ||
        copy_str(r->template_, sizeof r->template_, tmpl, "data.template", path, e) ||
        copy_str(r->reward_url, sizeof r->reward_url, url, "reward.url", path, e) ||
        copy_str(r->eval_path, sizeof r->eval_path, evpath, "eval.path", path, e) ||
        copy_str(r->out_dir, sizeof r->out_dir, dir, "checkpoint.dir", path, e))
        return -1;
    if (recipe_tokenizer(r, tokp, chat, think, effort, path, e)) return -1;
    if (!strcmp(kind, "jsonl")) {
        r->jsonl = 1;
        if (!*dpath) return mill_errf(e, "%s: data.kind jsonl needs data.path (a JSONL file)", path);
    } else if (!strcmp(kind, "arithmetic")) {
        if (r->chat.kind != CHAT_NONE) return mill_errf(e, "%s: data.chat is for data.kind jsonl", path);
        if (recipe_levels(y, path, r->levels, &r->n_levels, e)) return -1;
    } else {
        return mill_errf(e, "%s: data.kind \"%s\" must be \"arithmetic\" or \"jsonl\"", path, kind);
    }
    mill_device td, rd; /* auto: this machine's GPU when it has one */
    if (kctx_device_parse(dev, &td))
        return mill_errf(e, "%s: train.device \"%s\" must be \"auto\", \"cpu\" or \"cuda\"", path, dev);
    r->train_gpu = td == DEVICE_CUDA;
    if (kctx_device_parse(rdev, &rd))
        return mill_errf(e, "%s: rollout.device \"%s\" must be \"auto\", \"cpu\" or \"cuda\"", path, rdev);
    r->rollout_gpu = rd == DEVICE_CUDA;
    if (strcmp(curve, "auto") && strcmp(curve, "on") && strcmp(curve, "off"))
        return mill_errf(e, "%s: rollout.curve \"%s\" must be \"auto\", \"on\" or \"off\"", path, curve);
    r->curve = !strcmp(curve, "on") ? 1 : !strcmp(curve, "off") ? 0 : -1;
    if (copy_str(r->curve_keys, sizeof r->curve_keys, ckeys, "rollout.curve_keys", path, e)) return -1;
    if (!strcmp(layout, "disaggregated")) r->disaggregated = 1;
    else if (strcmp(layout, "colocated")) return mill_errf(e, "%s: rollout.layout \"%s\" must be \"colocated\" or \"disaggregated\"", path, layout);
    json_t *addrs = yamlcfg_get(y, "rollout.addresses");
    if (addrs && !json_is_null(addrs)) {
        if (!json_is_array(addrs) || !json_array_size(addrs))
            return mill_errf(e, "%s: rollout.addresses must be a list of engine addresses (tcp://HOST:PORT)", path);
        if (!r->disaggregated)
            return mill_errf(e, "%s: rollout.addresses needs rollout.layout: disaggregated", path);
        for (size_t i = 0; i < json_array_size(addrs); i++) {
            const char *a = json_string_value(json_array_get(addrs, i));
            if (!a || strncmp(a, "tcp://", 6) || strchr(a, ','))
                return mill_errf(e, "%s: rollout.addresses[%zu] must be a string tcp://HOST:PORT", path, i);
            size_t used = strlen(r->engine_addrs);
            if (used + strlen(a) + 2 > sizeof r->engine_addrs) return mill_errf(e, "%s: rollout.addresses is too long", path);
            snprintf(r->engine_addrs + used, sizeof r->engine_addrs - used, "%s%s", used ? "," : "", a);
        }
        neng = (long long)json_array_size(addrs);
    }
    if (*taddr && (strncmp(taddr, "tcp://", 6) || strchr(taddr, ',')))
        return mill_errf(e, "%s: train.address must be tcp://HOST:PORT (a trainer started outside the run)", path);
    if (copy_str(r->trainer_addr, sizeof r->trainer_addr, taddr, "train.address", path, e)) return -1;
    /* auto: on when an engine or the trainer is on another host */
    if (r->curve == -1) r->curve = addrs_remote(r->engine_addrs) || addrs_remote(r->trainer_addr);
    if ((r->engine_addrs[0] || r->trainer_addr[0]) && !r->curve_keys[0] && r->curve)
        return mill_errf(e, "%s: rollout.curve is on with external engines or trainer: make a key file with `mill keys "
                            "--out FILE`, start each of them with --curve FILE, and set rollout.curve_keys: FILE", path);
    if (async && !r->disaggregated)
        return mill_errf(e, "%s: rollout.async needs rollout.layout: disaggregated (colocated engines take turns with "
                            "the trainer)", path);
    r->async = async;
    if (!r->disaggregated && neng != 1)
        return mill_errf(e, "%s: a colocated run has one engine (rollout.engines: %lld); use layout: disaggregated", path, neng);
    if (!*rkind) rkind = r->jsonl ? "math" : "arithmetic";
    if (!strcmp(rkind, "arithmetic")) r->reward = REWARD_ARITH;
    else if (!strcmp(rkind, "math")) r->reward = REWARD_MATH;
    else if (!strcmp(rkind, "remote")) r->reward = REWARD_REMOTE;
    else return mill_errf(e, "%s: reward.kind \"%s\" must be arithmetic, math or remote", path, rkind);
    if (r->reward == REWARD_REMOTE && strncmp(url, "http://", 7) && strncmp(url, "https://", 8))
        return mill_errf(e, "%s: reward.kind remote needs reward.url (http://HOST:PORT/PATH)", path);
    if (r->reward == REWARD_ARITH && r->jsonl)
        return mill_errf(e, "%s: reward.kind arithmetic needs data.kind arithmetic (use math for JSONL)", path);
    if (!strcmp(klt, "k1")) r->algo.kl_type = KL_K1;
    else if (!strcmp(klt, "k2")) r->algo.kl_type = KL_K2;
    else if (!strcmp(klt, "low_var_kl") || !strcmp(klt, "k3")) r->algo.kl_type = KL_K3;
    else if (!strcmp(klt, "abs")) r->algo.kl_type = KL_ABS;
    else if (!strcmp(klt, "unbiased")) r->algo.kl_type = KL_UNBIASED;
    else return mill_errf(e, "%s: algorithm.kl_type \"%s\" must be k1, k2, low_var_kl, abs or unbiased", path, klt);
    static const char *const aggs[] = {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                       "seq-mean-token-sum-norm"}; /* verl's names, grpo_agg's order */
    r->algo.agg = AGG_TOKEN_MEAN;
    if (*aggm) {
        int k = 0;
        while (k < 4 && strcmp(aggm, aggs[k])) k++;
        if (k == 4)
            return mill_errf(e, "%s: algorithm.loss_agg_mode \"%s\" must be token-mean, seq-mean-token-mean, "
                                "seq-mean-token-sum or seq-mean-token-sum-norm", path, aggm);
        if (yamlcfg_get(y, "algorithm.seq_mean"))
            return mill_errf(e, "%s: algorithm.seq_mean and algorithm.loss_agg_mode both set: keep one", path);
        r->algo.agg = (grpo_agg)k;
        seqm = k == AGG_SEQ_MEAN_TOKEN_MEAN;
    }
    r->algo.agg_horizon = (double)mnt; /* seq-mean-token-sum-norm: the response budget */
    if (!strcmp(pol, "gspo")) r->algo.ratio = RATIO_GSPO;
    else if (!strcmp(pol, "vanilla")) r->algo.ratio = RATIO_TOKEN;
    else return mill_errf(e, "%s: algorithm.policy_loss \"%s\" must be vanilla or gspo", path, pol);
    if (r->algo.clip_ratio_c != 0 && !(r->algo.clip_ratio_c > 1))
        return mill_errf(e, "%s: algorithm.clip_ratio_c = %g must be above 1 (dual-clip; 0: off)", path,
                         r->algo.clip_ratio_c);
    if (r->eval_path[0] && !r->jsonl) return mill_errf(e, "%s: eval.path is for JSONL data", path);
    r->data_seed = (uint64_t)dseed;
    r->pool = pool;
    r->skip_bad = skip;
    r->prompts_per_step = (int)pps;
    r->samples_per_prompt = (int)spp;
    r->max_new_tokens = (int)mnt;
    r->sample_seed = (uint64_t)sseed;
    r->n_engines = (int)neng;
    r->dynamic_sampling = dyn;
    r->exact = exact;
    r->max_draws = (int)draws;
    r->reward_retries = (int)retries;
    r->std_normalize = stdn;
    r->algo.std_normalize = stdn;
    r->algo.seq_mean = seqm;
    r->steps = steps;
    r->updates_per_step = (int)upd;
    r->micro_batch = (int)mb;
    r->optim.total_steps = steps * upd;
    r->eval_every = (int)evev;
    r->eval_problems = (int)evn;
    r->eval_seed = (uint64_t)evseed;
    r->checkpoint_every = (int)ckev;
    r->kill_engine_at_step = (int)kill;
    r->kill_trainer_at_step = (int)tkill;
    r->kill_trainer_rank = (int)tkrank;
    r->wedge_trainer_at_step = (int)twedge;
    r->max_restarts = (int)restarts;
    r->engine_max_restarts = (int)erestarts;
    return 0;
}

int grpo_recipe_load(const char *path, char *const *overrides, int n_overrides, grpo_recipe *r, mill_err *e) {
    memset(r, 0, sizeof *r);
    json_t *y = yamlcfg_load(path, e);
    if (!y) return -1;
    int rc = -1;
    for (int i = 0; i < n_overrides; i++)
        if (apply_override(y, overrides[i], e)) goto out;
    if (recipe_from_tree(y, path, r, e)) goto out;
    /* what the ledger keeps: JSON is YAML, so `mill resume` reads it back with the same loader */
    r->text = json_dumps(y, JSON_SORT_KEYS | JSON_INDENT(1));
    if (!r->text) {
        mill_errf(e, "%s: out of memory", path);
        goto out;
    }
    rc = 0;
out:
    json_decref(y);
    return rc;
}

int grpo_recipe_parse(const char *text, const char *path, grpo_recipe *r, mill_err *e) {
    json_t *y = yamlcfg_parse(text, strlen(text), "the ledger's recipe", e);
    if (!y) return -1;
    int rc = recipe_from_tree(y, path, r, e);
    json_decref(y);
    return rc;
}

void grpo_recipe_free(grpo_recipe *r) {
    free(r->text);
    r->text = NULL;
}
