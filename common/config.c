#include "config.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

const char *config_attn_kind_name(int ratio) {
    switch (ratio) {
    case ATTN_SLIDING: return "sliding";
    case ATTN_CSA: return "csa";
    case ATTN_HCA: return "hca";
    default: return "?";
    }
}

/* Each getter: absent -> default (or error when required); wrong type -> error naming the key. */
static int get_int(json_t *o, const char *key, int required, long long def, long long lo, long long hi,
                   long long *out, const char *src, mill_err *e) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        if (required) return mill_errf(e, "%s: missing required key \"%s\" (an integer)", src, key);
        *out = def;
        return 0;
    }
    if (!json_is_integer(v)) return mill_errf(e, "%s: key \"%s\" must be an integer", src, key);
    long long x = json_integer_value(v);
    if (x < lo || x > hi) return mill_errf(e, "%s: key \"%s\" = %lld is out of range [%lld, %lld]", src, key, x, lo, hi);
    *out = x;
    return 0;
}

static int get_i32(json_t *o, const char *key, int required, int def, int lo, int hi, int *out, const char *src,
                   mill_err *e) {
    long long x = 0;
    if (get_int(o, key, required, def, lo, hi, &x, src, e)) return -1;
    *out = (int)x;
    return 0;
}

static int get_num(json_t *o, const char *key, double def, double *out, const char *src, mill_err *e) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        *out = def;
        return 0;
    }
    if (!json_is_number(v)) return mill_errf(e, "%s: key \"%s\" must be a number", src, key);
    *out = json_number_value(v);
    return 0;
}

static int get_bool(json_t *o, const char *key, int def, int *out, const char *src, mill_err *e) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        *out = def;
        return 0;
    }
    if (!json_is_boolean(v)) return mill_errf(e, "%s: key \"%s\" must be true or false", src, key);
    *out = json_is_true(v);
    return 0;
}

/* bos/eos may be an integer, a list (first entry is used) or null (-1). */
static int get_token_id(json_t *o, const char *key, int def, int *out, const char *src, mill_err *e) {
    json_t *v = json_object_get(o, key);
    if (v && json_is_array(v)) {
        if (!json_array_size(v)) { /* an empty list: no such token */
            *out = -1;
            return 0;
        }
        v = json_array_get(v, 0);
    }
    if (!v || json_is_null(v)) {
        *out = v ? -1 : def;
        return 0;
    }
    if (!json_is_integer(v)) return mill_errf(e, "%s: key \"%s\" must be an integer token id", src, key);
    if (json_integer_value(v) < INT_MIN || json_integer_value(v) > INT_MAX) /* not cut to an int that fits */
        return mill_errf(e, "%s: key \"%s\" = %lld must lie inside the vocabulary", src, key,
                         (long long)json_integer_value(v));
    *out = (int)json_integer_value(v);
    return 0;
}

static int parse_rope_scaling(json_t *o, dsv4_config *c, const char *src, mill_err *e) {
    dsv4_rope_scaling *rs = &c->rope_scaling;
    memset(rs, 0, sizeof *rs);
    json_t *v = json_object_get(o, "rope_scaling");
    if (!v || json_is_null(v)) return 0;
    if (!json_is_object(v)) return mill_errf(e, "%s: key \"rope_scaling\" must be an object", src);
    json_t *t = json_object_get(v, "type");
    if (!t) t = json_object_get(v, "rope_type");
    if (t && !json_is_string(t)) return mill_errf(e, "%s: key \"rope_scaling.type\" must be a string", src);
    const char *type = t ? json_string_value(t) : "default";
    if (strcmp(type, "default") == 0) return 0;
    if (strcmp(type, "yarn") != 0)
        return mill_errf(e, "%s: rope_scaling.type \"%s\" is not supported (expected \"yarn\")", src, type);
    rs->type_yarn = 1;
    long long omax;
    char key[64];
    snprintf(key, sizeof key, "rope_scaling.original_max_position_embeddings");
    json_t *ov = json_object_get(v, "original_max_position_embeddings");
    if (!ov || !json_is_integer(ov) || json_integer_value(ov) <= 0 || json_integer_value(ov) > INT_MAX)
        return mill_errf(e, "%s: key \"%s\" must be a positive integer", src, key);
    omax = json_integer_value(ov);
    rs->original_max_position_embeddings = (int)omax;
    if (get_num(v, "factor", 0.0, &rs->factor, src, e) || get_num(v, "beta_fast", 32.0, &rs->beta_fast, src, e) ||
        get_num(v, "beta_slow", 1.0, &rs->beta_slow, src, e))
        return mill_err_wrap(e, "in rope_scaling");
    json_t *fv = json_object_get(v, "factor"); /* given: a stretch of the context, so positive */
    if (fv && !json_is_null(fv) && !(rs->factor > 0.0))
        return mill_errf(e, "%s: rope_scaling.factor = %g must be positive", src, rs->factor);
    if (rs->beta_fast < 0.0 || rs->beta_slow < 0.0)
        return mill_errf(e, "%s: rope_scaling.beta_fast = %g and beta_slow = %g must not be negative", src,
                         rs->beta_fast, rs->beta_slow);
    /* HF: a missing factor falls back to max_position_embeddings / original. */
    if (rs->factor <= 0.0) rs->factor = (double)c->max_position_embeddings / (double)omax;
    /* HF treats 0 as unset ("or 32", "or 1"). */
    if (rs->beta_fast == 0.0) rs->beta_fast = 32.0;
    if (rs->beta_slow == 0.0) rs->beta_slow = 1.0;
    return 0;
}

int config_parse(const char *text, const char *src, dsv4_config *c, mill_err *e) {
    json_error_t jerr;
    json_t *o = json_loads(text, 0, &jerr);
    if (!o) return mill_errf(e, "%s: not valid JSON (line %d: %s)", src, jerr.line, jerr.text);
    int rc = -1;
    memset(c, 0, sizeof *c);
    if (!json_is_object(o)) {
        mill_errf(e, "%s: expected a JSON object at the top level", src);
        goto done;
    }
    const int BIG = 1 << 30;
#define REQ(k, lo) \
    if (get_i32(o, #k, 1, 0, lo, BIG, &c->k, src, e)) goto done
#define OPT(k, def, lo) \
    if (get_i32(o, #k, 0, def, lo, BIG, &c->k, src, e)) goto done
    REQ(vocab_size, 1);
    REQ(hidden_size, 1);
    REQ(num_hidden_layers, 1);
    REQ(num_attention_heads, 1);
    OPT(num_key_value_heads, 1, 1);
    REQ(head_dim, 2);
    REQ(qk_rope_head_dim, 0);
    REQ(q_lora_rank, 1);
    REQ(o_groups, 1);
    REQ(o_lora_rank, 1);
    REQ(n_routed_experts, 1);
    OPT(n_shared_experts, 1, 0);
    REQ(num_experts_per_tok, 1);
    REQ(moe_intermediate_size, 1);
    OPT(num_hash_layers, 0, 0);
    OPT(hc_mult, 4, 1);
    OPT(hc_sinkhorn_iters, 20, 1);
    OPT(sliding_window, 128, 1);
    REQ(index_n_heads, 1);
    REQ(index_head_dim, 2);
    REQ(index_topk, 1);
    OPT(num_nextn_predict_layers, 0, 0);
#undef REQ
#undef OPT
    if (get_int(o, "max_position_embeddings", 0, 1048576, 1, (long long)1 << 40, &c->max_position_embeddings, src, e))
        goto done;
    json_t *sf = json_object_get(o, "scoring_func");
    if (sf && !json_is_string(sf)) {
        mill_errf(e, "%s: key \"scoring_func\" must be a string", src);
        goto done;
    }
    const char *sfs = sf ? json_string_value(sf) : "sqrtsoftplus";
    if (strcmp(sfs, "sqrtsoftplus") == 0) c->scoring_func = SCORE_SQRTSOFTPLUS;
    else if (strcmp(sfs, "sigmoid") == 0) c->scoring_func = SCORE_SIGMOID;
    else if (strcmp(sfs, "softmax") == 0) c->scoring_func = SCORE_SOFTMAX;
    else {
        mill_errf(e, "%s: scoring_func \"%s\" is not one of sqrtsoftplus, sigmoid, softmax", src, sfs);
        goto done;
    }
    if (get_bool(o, "norm_topk_prob", 1, &c->norm_topk_prob, src, e) ||
        get_bool(o, "tie_word_embeddings", 0, &c->tie_word_embeddings, src, e) ||
        get_num(o, "routed_scaling_factor", 1.5, &c->routed_scaling_factor, src, e) ||
        get_num(o, "swiglu_limit", 10.0, &c->swiglu_limit, src, e) ||
        get_num(o, "hc_eps", 1e-6, &c->hc_eps, src, e) || get_num(o, "rope_theta", 10000.0, &c->rope_theta, src, e) ||
        get_num(o, "compress_rope_theta", 160000.0, &c->compress_rope_theta, src, e) ||
        get_num(o, "rms_norm_eps", 1e-6, &c->rms_norm_eps, src, e) ||
        get_token_id(o, "bos_token_id", 0, &c->bos_token_id, src, e) ||
        get_token_id(o, "eos_token_id", 1, &c->eos_token_id, src, e))
        goto done;
    if (c->num_hidden_layers > DSV4_MAX_LAYERS) {
        mill_errf(e, "%s: num_hidden_layers = %d exceeds the supported %d", src, c->num_hidden_layers, DSV4_MAX_LAYERS);
        goto done;
    }
    /* compress_ratios: one per layer, possibly one more for the MTP layer (only the first L are used). */
    json_t *cr = json_object_get(o, "compress_ratios");
    if (!cr) {
        mill_errf(e, "%s: missing required key \"compress_ratios\" (a list of 0, 4 or 128 per layer)", src);
        goto done;
    }
    if (!json_is_array(cr) || (int)json_array_size(cr) < c->num_hidden_layers) {
        mill_errf(e, "%s: key \"compress_ratios\" must be a list of at least num_hidden_layers (%d) integers", src,
                  c->num_hidden_layers);
        goto done;
    }
    for (int i = 0; i < c->num_hidden_layers; i++) {
        json_t *r = json_array_get(cr, (size_t)i);
        long long x = json_is_integer(r) ? json_integer_value(r) : -1;
        if (x != 0 && x != 4 && x != 128) {
            mill_errf(e, "%s: compress_ratios[%d] must be 0 (sliding), 4 (CSA) or 128 (HCA)", src, i);
            goto done;
        }
        c->compress_ratios[i] = (int)x;
    }
    if (parse_rope_scaling(o, c, src, e)) goto done;
    rc = config_validate(c, src, e);
done:
    json_decref(o);
    return rc;
}

int config_validate(const dsv4_config *c, const char *src, mill_err *e) {
    if (c->num_key_value_heads != 1)
        return mill_errf(e, "%s: num_key_value_heads = %d, but DeepSeek-V4 has one shared KV head", src,
                         c->num_key_value_heads);
    if (c->qk_rope_head_dim % 2 || c->qk_rope_head_dim > c->head_dim)
        return mill_errf(e, "%s: qk_rope_head_dim = %d must be even and at most head_dim (%d)", src,
                         c->qk_rope_head_dim, c->head_dim);
    if (c->qk_rope_head_dim > c->index_head_dim)
        return mill_errf(e, "%s: qk_rope_head_dim = %d must be at most index_head_dim (%d)", src, c->qk_rope_head_dim,
                         c->index_head_dim);
    if (((long long)c->num_attention_heads * c->head_dim) % c->o_groups) /* each up to 2^30: the product in 64 bits */
        return mill_errf(e, "%s: o_groups = %d must divide num_attention_heads*head_dim = %lld", src, c->o_groups,
                         (long long)c->num_attention_heads * c->head_dim);
    if (c->num_experts_per_tok > c->n_routed_experts)
        return mill_errf(e, "%s: num_experts_per_tok = %d exceeds n_routed_experts = %d", src, c->num_experts_per_tok,
                         c->n_routed_experts);
    if (c->num_hash_layers > c->num_hidden_layers)
        return mill_errf(e, "%s: num_hash_layers = %d exceeds num_hidden_layers = %d", src, c->num_hash_layers,
                         c->num_hidden_layers);
    if (c->n_routed_experts > 65536)
        return mill_errf(e, "%s: n_routed_experts = %d exceeds 65536 (routing records are uint16)", src,
                         c->n_routed_experts);
    /* the numbers a forward divides by, takes the log of or clamps with */
    const struct {
        const char *key;
        double v;
        int zero_ok;
    } pos[] = {{"rope_theta", c->rope_theta, 0},       {"compress_rope_theta", c->compress_rope_theta, 0},
               {"rms_norm_eps", c->rms_norm_eps, 0},   {"hc_eps", c->hc_eps, 1},
               {"swiglu_limit", c->swiglu_limit, 0},   {"routed_scaling_factor", c->routed_scaling_factor, 0}};
    for (size_t i = 0; i < sizeof pos / sizeof pos[0]; i++)
        if (!(pos[i].zero_ok ? pos[i].v >= 0.0 : pos[i].v > 0.0) || !isfinite(pos[i].v))
            return mill_errf(e, "%s: %s = %g must be %s", src, pos[i].key, pos[i].v,
                             pos[i].zero_ok ? "finite and not negative" : "finite and positive");
    if (c->bos_token_id >= c->vocab_size || c->eos_token_id >= c->vocab_size || c->bos_token_id < -1 ||
        c->eos_token_id < -1)
        return mill_errf(e, "%s: bos_token_id = %d and eos_token_id = %d must lie inside the vocabulary [0, %d) (or be "
                            "null)", src, c->bos_token_id, c->eos_token_id, c->vocab_size);
    return 0;
}

int config_load(const char *path, dsv4_config *c, mill_err *e) {
    char buf[4096];
    struct stat sb;
    if (stat(path, &sb) == 0 && S_ISDIR(sb.st_mode)) {
        snprintf(buf, sizeof buf, "%s/config.json", path);
        path = buf;
    }
    FILE *f = fopen(path, "rb");
    if (!f) return mill_errf(e, "%s: cannot open config: %s", path, strerror(errno));
    if (fseek(f, 0, SEEK_END) || ftell(f) < 0 || ftell(f) > (1 << 24)) {
        fclose(f);
        return mill_errf(e, "%s: not a readable config (larger than 16 MiB?)", path);
    }
    long n = ftell(f);
    rewind(f);
    char *text = malloc((size_t)n + 1);
    if (!text || fread(text, 1, (size_t)n, f) != (size_t)n) {
        free(text);
        fclose(f);
        return mill_errf(e, "%s: read failed", path);
    }
    fclose(f);
    text[n] = 0;
    int rc = config_parse(text, path, c, e);
    free(text);
    return rc;
}

int config_save(const dsv4_config *c, const char *path, mill_err *e) {
    static const char *score[] = {"sqrtsoftplus", "sigmoid", "softmax"};
    json_t *o = json_object(), *cr = json_array();
    for (int i = 0; i < c->num_hidden_layers; i++) json_array_append_new(cr, json_integer(c->compress_ratios[i]));
#define I(k) json_object_set_new(o, #k, json_integer(c->k))
#define R(k) json_object_set_new(o, #k, json_real(c->k))
    json_object_set_new(o, "architectures", json_pack("[s]", "DeepseekV4ForCausalLM"));
    json_object_set_new(o, "model_type", json_string("deepseek_v4"));
    I(vocab_size); I(hidden_size); I(num_hidden_layers); I(num_attention_heads); I(num_key_value_heads);
    I(head_dim); I(qk_rope_head_dim); I(q_lora_rank); I(o_groups); I(o_lora_rank); I(n_routed_experts);
    I(n_shared_experts); I(num_experts_per_tok); I(moe_intermediate_size);
    json_object_set_new(o, "scoring_func", json_string(score[c->scoring_func]));
    json_object_set_new(o, "norm_topk_prob", json_boolean(c->norm_topk_prob));
    R(routed_scaling_factor); I(num_hash_layers); R(swiglu_limit); I(hc_mult); I(hc_sinkhorn_iters); R(hc_eps);
    I(sliding_window);
    json_object_set_new(o, "compress_ratios", cr);
    I(index_n_heads); I(index_head_dim); I(index_topk); R(rope_theta); R(compress_rope_theta);
    if (c->rope_scaling.type_yarn)
        json_object_set_new(o, "rope_scaling",
                            json_pack("{s:s, s:f, s:i, s:f, s:f}", "type", "yarn", "factor", c->rope_scaling.factor,
                                      "original_max_position_embeddings",
                                      c->rope_scaling.original_max_position_embeddings, "beta_fast",
                                      c->rope_scaling.beta_fast, "beta_slow", c->rope_scaling.beta_slow));
    I(max_position_embeddings); R(rms_norm_eps); I(num_nextn_predict_layers);
    json_object_set_new(o, "tie_word_embeddings", json_boolean(c->tie_word_embeddings));
    I(bos_token_id); I(eos_token_id);
    json_object_set_new(o, "torch_dtype", json_string("float32"));
#undef I
#undef R
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int rc = json_dump_file(o, tmp, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(o);
    if (rc) return mill_errf(e, "%s: cannot write", tmp);
    FILE *f = fopen(tmp, "rb");
    if (!f || fsync(fileno(f)) != 0) {
        if (f) fclose(f);
        return mill_errf(e, "%s: fsync failed", tmp);
    }
    fclose(f);
    if (rename(tmp, path)) return mill_errf(e, "%s: cannot rename into place", path);
    return 0;
}
