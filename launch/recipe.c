#include "recipe.h"

#include <stdio.h>
#include <string.h>

#include "../common/yamlcfg.h"

const char *const recipe_optimizer_keys[] = {"lr",        "min_lr", "schedule", "warmup_steps", "weight_decay",
                                             "clip_grad", "beta1",  "beta2",    "eps",          "freeze",
                                             NULL};

int recipe_optimizer(json_t *y, const char *path, optim_config *o, mill_err *e) {
    const char *sched;
    long long warm;
    if (yamlcfg_known_keys(y, "optimizer", recipe_optimizer_keys, path, e) ||
        yamlcfg_num(y, "optimizer.lr", o->lr, 0, 10, &o->lr, path, e) ||
        yamlcfg_num(y, "optimizer.min_lr", o->min_lr, 0, 10, &o->min_lr, path, e) ||
        yamlcfg_str(y, "optimizer.schedule", o->schedule == LR_COSINE ? "cosine" : "constant", &sched, path, e) ||
        yamlcfg_int(y, "optimizer.warmup_steps", o->warmup_steps, 0, 1 << 30, &warm, path, e) ||
        yamlcfg_num(y, "optimizer.weight_decay", o->weight_decay, 0, 10, &o->weight_decay, path, e) ||
        yamlcfg_num(y, "optimizer.clip_grad", o->clip_grad, -1, 1e30, &o->clip_grad, path, e) ||
        yamlcfg_num(y, "optimizer.beta1", o->beta1, 0, 1, &o->beta1, path, e) ||
        yamlcfg_num(y, "optimizer.beta2", o->beta2, 0, 1, &o->beta2, path, e) ||
        yamlcfg_num(y, "optimizer.eps", o->eps, 0, 1, &o->eps, path, e))
        return -1;
    if (strcmp(sched, "cosine") == 0) o->schedule = LR_COSINE;
    else if (strcmp(sched, "constant") == 0) o->schedule = LR_CONSTANT;
    else return mill_errf(e, "%s: optimizer.schedule \"%s\" must be \"cosine\" or \"constant\"", path, sched);
    o->warmup_steps = warm;
    json_t *fr = yamlcfg_get(y, "optimizer.freeze");
    if (!fr || json_is_null(fr)) return 0;
    if (!json_is_array(fr) || json_array_size(fr) > OPTIM_MAX_FREEZE)
        return mill_errf(e, "%s: optimizer.freeze must be a list of at most %d name patterns", path, OPTIM_MAX_FREEZE);
    o->n_freeze = 0;
    for (size_t i = 0; i < json_array_size(fr); i++) {
        json_t *v = json_array_get(fr, i);
        if (!json_is_string(v) || strlen(json_string_value(v)) >= sizeof o->freeze[0])
            return mill_errf(e, "%s: optimizer.freeze[%zu] must be a string under %zu characters", path, i,
                             sizeof o->freeze[0]);
        snprintf(o->freeze[o->n_freeze++], sizeof o->freeze[0], "%s", json_string_value(v));
    }
    return 0;
}

int recipe_data(json_t *y, const char *path, int *levels, int *n_levels, uint64_t *seed, mill_err *e) {
    static const char *const keys[] = {"kind", "levels", "seed", NULL};
    const char *kind;
    long long sd;
    if (yamlcfg_known_keys(y, "data", keys, path, e) || yamlcfg_str(y, "data.kind", "arithmetic", &kind, path, e) ||
        yamlcfg_int(y, "data.seed", 1, 0, INT64_MAX, &sd, path, e))
        return -1;
    if (strcmp(kind, "arithmetic") != 0)
        return mill_errf(e, "%s: data.kind \"%s\" is not supported yet (expected \"arithmetic\")", path, kind);
    *seed = (uint64_t)sd;
    return recipe_levels(y, path, levels, n_levels, e);
}

int recipe_levels(json_t *y, const char *path, int *levels, int *n_levels, mill_err *e) {
    json_t *lv = yamlcfg_get(y, "data.levels");
    *n_levels = 0;
    if (!lv) {
        levels[(*n_levels)++] = 1;
        return 0;
    }
    if (!json_is_array(lv) || json_array_size(lv) == 0 || json_array_size(lv) > 4)
        return mill_errf(e, "%s: data.levels must be a list of 1 to 4 levels", path);
    for (size_t i = 0; i < json_array_size(lv); i++) {
        json_t *v = json_array_get(lv, i);
        if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > 4)
            return mill_errf(e, "%s: data.levels[%zu] must be an integer from 1 to 4", path, i);
        levels[(*n_levels)++] = (int)json_integer_value(v);
    }
    return 0;
}

int recipe_parallel(json_t *y, const char *path, par_sizes *s, mill_err *e) {
    static const char *const keys[] = {"tp", "pp", "ep", "cp", "dp", "vpp", "pp_layers", "pp_dtype", "sp", NULL};
    int *dst[] = {&s->tp, &s->pp, &s->ep, &s->cp, &s->dp, &s->vpp};
    *s = par_sizes_one();
    TRY(yamlcfg_known_keys(y, "train.parallel", keys, path, e));
    json_t *split = yamlcfg_get(y, "train.parallel.pp_layers"); /* each stage's layer count, in order */
    if (split && !json_is_null(split)) {
        if (!json_is_array(split) || json_array_size(split) < 1 || json_array_size(split) > PAR_MAX_STAGES)
            return mill_errf(e, "%s: train.parallel.pp_layers must be a list of 1 to %d layer counts", path,
                             PAR_MAX_STAGES);
        for (size_t i = 0; i < json_array_size(split); i++) {
            json_t *v = json_array_get(split, i);
            if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > 1 << 20)
                return mill_errf(e, "%s: train.parallel.pp_layers[%zu] must be a positive layer count", path, i);
            s->pp_layers[i] = (int)json_integer_value(v);
        }
    }
    for (int i = 0; i < 6; i++) {
        char key[32];
        long long v;
        snprintf(key, sizeof key, "train.parallel.%s", keys[i]);
        TRY(yamlcfg_int(y, key, 1, 1, 1 << 20, &v, path, e));
        *dst[i] = (int)v;
    }
    json_t *wire = yamlcfg_get(y, "train.parallel.pp_dtype"); /* the streams between stages */
    if (wire && !json_is_null(wire) && (!json_is_string(wire) || par_wire_parse(json_string_value(wire), &s->pp_wire)))
        return mill_errf(e, "%s: train.parallel.pp_dtype must be auto, fp32 or bf16", path);
    json_t *sp = yamlcfg_get(y, "train.parallel.sp"); /* sequence parallelism over the tp ranks */
    if (sp && !json_is_null(sp) && !json_is_boolean(sp))
        return mill_errf(e, "%s: train.parallel.sp must be true or false", path);
    s->sp = sp && json_is_true(sp);
    return 0;
}
