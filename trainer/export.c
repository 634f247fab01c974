#include "export.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../common/config.h"
#include "../common/safetensors.h"
#include "model.h"

/* ------------------------------------------------------------------ names */

/* Release name -> HF state-dict name: the reverse of transformers 5.17's conversion mapping for
 * deepseek_v4 (tests/reference/make_goldens.py's hf_to_orig is the same table, checked there by
 * loading; tests/data/hf-keys-*.json lists what DeepseekV4ForCausalLM.state_dict() holds). */
static const struct {
    const char *rel, *hf;
} top_names[] = {
    {"embed.weight", "model.embed_tokens.weight"}, {"head.weight", "lm_head.weight"},
    {"norm.weight", "model.norm.weight"},          {"hc_head_fn", "model.hc_head.hc_fn"},
    {"hc_head_base", "model.hc_head.hc_base"},     {"hc_head_scale", "model.hc_head.hc_scale"},
};

static const struct {
    const char *rel, *hf; /* inside layers.N. */
} layer_names[] = {
    {"attn_norm.weight", "input_layernorm.weight"},
    {"ffn_norm.weight", "post_attention_layernorm.weight"},
    {"hc_attn_fn", "attn_hc.fn"},
    {"hc_attn_base", "attn_hc.base"},
    {"hc_attn_scale", "attn_hc.scale"},
    {"hc_ffn_fn", "ffn_hc.fn"},
    {"hc_ffn_base", "ffn_hc.base"},
    {"hc_ffn_scale", "ffn_hc.scale"},
    {"attn.wq_a.weight", "self_attn.q_a_proj.weight"},
    {"attn.q_norm.weight", "self_attn.q_a_norm.weight"},
    {"attn.wq_b.weight", "self_attn.q_b_proj.weight"},
    {"attn.wkv.weight", "self_attn.kv_proj.weight"},
    {"attn.kv_norm.weight", "self_attn.kv_norm.weight"},
    {"attn.wo_a.weight", "self_attn.o_a_proj.weight"},
    {"attn.wo_b.weight", "self_attn.o_b_proj.weight"},
    {"attn.attn_sink", "self_attn.sinks"},
    {"attn.compressor.wkv.weight", "self_attn.compressor.kv_proj.weight"},
    {"attn.compressor.wgate.weight", "self_attn.compressor.gate_proj.weight"},
    {"attn.compressor.ape", "self_attn.compressor.position_bias"},
    {"attn.compressor.norm.weight", "self_attn.compressor.kv_norm.weight"},
    /* HF nests the indexer inside the compressor module */
    {"attn.indexer.wq_b.weight", "self_attn.compressor.indexer.q_b_proj.weight"},
    {"attn.indexer.weights_proj.weight", "self_attn.compressor.indexer.scorer.weights_proj.weight"},
    {"attn.indexer.compressor.wkv.weight", "self_attn.compressor.indexer.kv_proj.weight"},
    {"attn.indexer.compressor.wgate.weight", "self_attn.compressor.indexer.gate_proj.weight"},
    {"attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias"},
    {"attn.indexer.compressor.norm.weight", "self_attn.compressor.indexer.kv_norm.weight"},
    {"ffn.gate.weight", "mlp.gate.weight"},
    {"ffn.gate.bias", "mlp.gate.e_score_correction_bias"},
    {"ffn.gate.tid2eid", "mlp.gate.tid2eid"},
    {"ffn.shared_experts.w1.weight", "mlp.shared_experts.gate_proj.weight"},
    {"ffn.shared_experts.w2.weight", "mlp.shared_experts.down_proj.weight"},
    {"ffn.shared_experts.w3.weight", "mlp.shared_experts.up_proj.weight"},
};

static int hf_name(const char *rel, char *out, size_t n) {
    for (size_t i = 0; i < sizeof top_names / sizeof top_names[0]; i++)
        if (!strcmp(rel, top_names[i].rel)) return snprintf(out, n, "%s", top_names[i].hf) < (int)n ? 0 : -1;
    int l, at = 0;
    if (sscanf(rel, "layers.%d.%n", &l, &at) != 1 || !at) return -1;
    for (size_t i = 0; i < sizeof layer_names / sizeof layer_names[0]; i++)
        if (!strcmp(rel + at, layer_names[i].rel))
            return snprintf(out, n, "model.layers.%d.%s", l, layer_names[i].hf) < (int)n ? 0 : -1;
    return -1;
}

/* HF's DeepseekV4PreTrainedModel._keep_in_fp32_modules_strict: a tensor one of whose dotted name
 * segments is one of these stays fp32 in a bf16 model, so HF's own bf16 save writes it F32. */
static int keeps_fp32(const char *hf) {
    static const char *const keep[] = {"attn_hc", "ffn_hc", "hc_head", "sinks", "position_bias",
                                       "e_score_correction_bias", "q_a_norm", "kv_norm", "input_layernorm",
                                       "post_attention_layernorm", "norm", NULL};
    for (const char *s = hf; *s;) {
        size_t len = strcspn(s, ".");
        for (const char *const *k = keep; *k; k++)
            if (strlen(*k) == len && !strncmp(s, *k, len)) return 1;
        s += len + (s[len] == '.');
    }
    return 0;
}

/* ------------------------------------------------------------------ the plan */

typedef enum { FROM_TENSOR, FROM_INDEX, FROM_GATE_UP, FROM_DOWN } ex_from;

/* One tensor of the output, in writing order: where it comes from, which loaded stage holds it,
 * which file it goes to. */
typedef struct {
    char hf[160], rel[96];
    ex_from from;
    int layer, stage, file;
    mill_dtype dt;
    int ndim;
    int64_t shape[3];
    size_t bytes;
} ex_entry;

typedef struct {
    ex_entry *v;
    int n, cap, files;
    size_t bytes;
} ex_plan;

static ex_entry *plan_push(ex_plan *pl, mill_err *e) {
    if (pl->n == pl->cap) {
        int cap = pl->cap ? 2 * pl->cap : 256;
        ex_entry *v = realloc(pl->v, sizeof *v * (size_t)cap);
        if (!v) return mill_errf(e, "export: out of memory for the tensor list"), NULL;
        pl->v = v, pl->cap = cap;
    }
    ex_entry *x = &pl->v[pl->n++];
    memset(x, 0, sizeof *x);
    return x;
}

/* Table entry p of the whole layout as the output tensor(s) it makes (none for the experts after
 * the first: the fused tensors take every expert at once). */
static int plan_param(ex_plan *pl, const dsv4_config *c, const param_info *p, int stage, mill_dtype dt, mill_err *e) {
    int l, x, w, at = 0;
    ex_entry *o;
    if (sscanf(p->name, "layers.%d.ffn.experts.%d.w%d.weight%n", &l, &x, &w, &at) == 3 && at) {
        if (x != 0 || w == 3) return 0;
        if (!(o = plan_push(pl, e))) return -1;
        int64_t E = c->n_routed_experts, I = c->moe_intermediate_size, D = c->hidden_size;
        o->from = w == 1 ? FROM_GATE_UP : FROM_DOWN;
        snprintf(o->hf, sizeof o->hf, "model.layers.%d.mlp.experts.%s", l, w == 1 ? "gate_up_proj" : "down_proj");
        o->ndim = 3;
        o->shape[0] = E, o->shape[1] = w == 1 ? 2 * I : D, o->shape[2] = w == 1 ? D : I;
    } else {
        if (!(o = plan_push(pl, e))) return -1;
        if (hf_name(p->name, o->hf, sizeof o->hf))
            return mill_errf(e, "export: no HF name for tensor %s (a parameter table entry the map lacks)", p->name);
        o->from = p->kind == PARAM_INDEX ? FROM_INDEX : FROM_TENSOR;
        o->ndim = p->ndim;
        memcpy(o->shape, p->shape, sizeof o->shape);
    }
    snprintf(o->rel, sizeof o->rel, "%s", p->name);
    o->layer = p->layer;
    o->stage = stage;
    o->dt = o->from == FROM_INDEX ? DTYPE_I64 : dt == DTYPE_BF16 && !keeps_fp32(o->hf) ? DTYPE_BF16 : DTYPE_F32;
    o->bytes = dtype_size(o->dt);
    for (int d = 0; d < o->ndim; d++) o->bytes *= (size_t)o->shape[d];
    return 0;
}

/* Every output tensor in writing order: the embedding, each layer's tensors (its router bias or
 * tid2eid with it), the tail (final norm, HC head, LM head); stage s of n_stages loads them. Files:
 * a new one starts when the next tensor would take the current one past max bytes (a tensor larger
 * than max gets a file of its own), as HF's sharding does. */
static int plan_build(const dsv4_model *whole, const export_opts *o, int n_stages, ex_plan *pl, mill_err *e) {
    const dsv4_config *c = &whole->cfg;
    int L = c->num_hidden_layers;
    for (int i = 0; i < whole->n_params; i++)
        if (!strcmp(whole->params[i].name, "embed.weight")) TRY(plan_param(pl, c, &whole->params[i], 0, o->dtype, e));
    for (int l = 0; l < L; l++)
        for (int i = 0; i < whole->n_params; i++)
            if (whole->params[i].layer == l)
                TRY(plan_param(pl, c, &whole->params[i], n_stages > 1 ? l : 0, o->dtype, e));
    for (int i = 0; i < whole->n_params; i++)
        if (whole->params[i].layer < 0 && strcmp(whole->params[i].name, "embed.weight"))
            TRY(plan_param(pl, c, &whole->params[i], n_stages - 1, o->dtype, e));
    size_t cur = 0;
    int f = 0;
    for (int i = 0; i < pl->n; i++) {
        if (i && cur + pl->v[i].bytes > o->max_shard_bytes) f++, cur = 0;
        pl->v[i].file = f;
        cur += pl->v[i].bytes;
        pl->bytes += pl->v[i].bytes;
    }
    pl->files = f + 1;
    return 0;
}

static void file_name(char *buf, size_t n, int f, int nf) {
    if (nf == 1) snprintf(buf, n, "model.safetensors");
    else snprintf(buf, n, "model-%05d-of-%05d.safetensors", f + 1, nf);
}

/* ------------------------------------------------------------------ tensor data */

static void put(void *dst, mill_dtype dt, size_t at, const float *src, size_t n) {
    if (dt == DTYPE_F32) {
        memcpy((float *)dst + at, src, sizeof(float) * n);
        return;
    }
    uint16_t *d = (uint16_t *)dst + at;
    for (size_t i = 0; i < n; i++) d[i] = f32_to_bf16(src[i]); /* round to nearest even, as torch's .to() */
}

static const param_info *need(const dsv4_model *m, const char *name, mill_err *e) {
    const param_info *p = model_find_param(m, name);
    if (!p) mill_errf(e, "export: the loaded stage has no tensor %s", name);
    return p;
}

/* x's bytes from the loaded stage m into buf. */
static int fill(const ex_entry *x, const dsv4_model *m, void *buf, mill_err *e) {
    const param_info *p;
    if (x->from == FROM_TENSOR || x->from == FROM_INDEX) {
        if (!(p = need(m, x->rel, e))) return -1;
        if (x->from == FROM_TENSOR) put(buf, x->dt, 0, m->data + p->offset, p->numel);
        for (size_t i = 0; x->from == FROM_INDEX && i < p->numel; i++)
            ((int64_t *)buf)[i] = m->index_data[p->offset + i]; /* HF's tid2eid buffer is int64 */
        return 0;
    }
    size_t E = (size_t)x->shape[0], I = (size_t)m->cfg.moe_intermediate_size, D = (size_t)m->cfg.hidden_size;
    char nm[96];
    for (size_t ex = 0; ex < E; ex++) {
        if (x->from == FROM_DOWN) { /* w2 [D, I] as it is */
            snprintf(nm, sizeof nm, "layers.%d.ffn.experts.%zu.w2.weight", x->layer, ex);
            if (!(p = need(m, nm, e))) return -1;
            put(buf, x->dt, ex * D * I, m->data + p->offset, D * I);
            continue;
        }
        for (int half = 0; half < 2; half++) { /* gate_up [2I, D]: w1's rows, then w3's */
            snprintf(nm, sizeof nm, "layers.%d.ffn.experts.%zu.w%d.weight", x->layer, ex, half ? 3 : 1);
            if (!(p = need(m, nm, e))) return -1;
            put(buf, x->dt, (2 * ex + (size_t)half) * I * D, m->data + p->offset, I * D);
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ JSON as Python writes it */

/* The shortest decimal that reads back as v, spelled as Python's repr (1e-06, 10000.0, 0.5). */
static void py_float(double v, char *out, size_t n) {
    if (!isfinite(v)) {
        snprintf(out, n, "%s", isnan(v) ? "NaN" : v > 0 ? "Infinity" : "-Infinity");
        return;
    }
    char buf[40];
    int p = 1;
    for (; p < 17; p++) {
        snprintf(buf, sizeof buf, "%.*e", p - 1, v);
        if (strtod(buf, NULL) == v) break;
    }
    snprintf(buf, sizeof buf, "%.*e", p - 1, v);
    char digits[24], *ex = strchr(buf, 'e');
    int k = 0, neg = buf[0] == '-', exp10 = atoi(ex + 1);
    for (char *s = buf + neg; s < ex; s++)
        if (*s != '.') digits[k++] = *s;
    digits[k] = 0;
    char *o = out;
    size_t left = n;
#define OUT(...) (o += snprintf(o, left, __VA_ARGS__), left = n - (size_t)(o - out))
    if (neg) OUT("-");
    if (exp10 < -4 || exp10 >= 16) {
        OUT("%c", digits[0]);
        if (k > 1) OUT(".%s", digits + 1);
        OUT("e%c%02d", exp10 < 0 ? '-' : '+', abs(exp10));
    } else if (exp10 < 0) {
        OUT("0.");
        for (int i = 0; i < -exp10 - 1; i++) OUT("0");
        OUT("%s", digits);
    } else {
        for (int i = 0; i <= exp10; i++) OUT("%c", i < k ? digits[i] : '0');
        OUT(".%s", k > exp10 + 1 ? digits + exp10 + 1 : "0");
    }
#undef OUT
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(const char *const *)a, *(const char *const *)b); }

/* json.dumps(v, indent=2, sort_keys=True): HF's layout for config.json and the index. */
static int emit(FILE *f, json_t *v, int depth) {
    char num[48];
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        size_t n = json_object_size(v), i = 0;
        if (!n) return fputs("{}", f) < 0 ? -1 : 0;
        const char **keys = malloc(sizeof *keys * n);
        if (!keys) return -1;
        const char *k;
        json_t *x;
        json_object_foreach(v, k, x) keys[i++] = k;
        qsort(keys, n, sizeof *keys, cmp_str);
        fputs("{\n", f);
        int rc = 0;
        for (i = 0; i < n && !rc; i++) {
            json_t *key = json_string(keys[i]);
            char *ks = key ? json_dumps(key, JSON_ENCODE_ANY | JSON_ENSURE_ASCII) : NULL;
            rc = !ks || fprintf(f, "%*s%s: ", 2 * (depth + 1), "", ks) < 0 ||
                 emit(f, json_object_get(v, keys[i]), depth + 1) || fputs(i + 1 < n ? ",\n" : "\n", f) < 0;
            free(ks);
            json_decref(key);
        }
        free(keys);
        return rc || fprintf(f, "%*s}", 2 * depth, "") < 0 ? -1 : 0;
    }
    case JSON_ARRAY: {
        size_t n = json_array_size(v);
        if (!n) return fputs("[]", f) < 0 ? -1 : 0;
        fputs("[\n", f);
        for (size_t i = 0; i < n; i++)
            if (fprintf(f, "%*s", 2 * (depth + 1), "") < 0 || emit(f, json_array_get(v, i), depth + 1) ||
                fputs(i + 1 < n ? ",\n" : "\n", f) < 0)
                return -1;
        return fprintf(f, "%*s]", 2 * depth, "") < 0 ? -1 : 0;
    }
    case JSON_STRING: {
        char *s = json_dumps(v, JSON_ENCODE_ANY | JSON_ENSURE_ASCII);
        int rc = !s || fputs(s, f) < 0;
        free(s);
        return rc ? -1 : 0;
    }
    case JSON_INTEGER: return fprintf(f, "%lld", (long long)json_integer_value(v)) < 0 ? -1 : 0;
    case JSON_REAL:
        py_float(json_real_value(v), num, sizeof num);
        return fputs(num, f) < 0 ? -1 : 0;
    case JSON_TRUE: return fputs("true", f) < 0 ? -1 : 0;
    case JSON_FALSE: return fputs("false", f) < 0 ? -1 : 0;
    default: return fputs("null", f) < 0 ? -1 : 0;
    }
}

static int fsync_path(const char *path, mill_err *e) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return mill_errf(e, "%s: cannot open to fsync: %s", path, strerror(errno));
    int rc = fsync(fd);
    close(fd);
    return rc ? mill_errf(e, "%s: fsync failed: %s", path, strerror(errno)) : 0;
}

/* v (not stolen) as path, fsynced. */
static int write_json(const char *path, json_t *v, mill_err *e) {
    if (!v) return mill_errf(e, "%s: out of memory", path);
    FILE *f = fopen(path, "wb");
    if (!f) return mill_errf(e, "%s: cannot create: %s", path, strerror(errno));
    int rc = emit(f, v, 0) || fputs("\n", f) < 0 || fflush(f) || fsync(fileno(f));
    if (fclose(f)) rc = 1;
    return rc ? mill_errf(e, "%s: cannot write: %s", path, strerror(errno)) : 0;
}

/* ------------------------------------------------------------------ config */

static const char *layer_type(int ratio) {
    return ratio == ATTN_CSA ? "compressed_sparse_attention"
           : ratio == ATTN_HCA ? "heavily_compressed_attention" : "sliding_attention";
}

/* What HF cannot hold of c, as one error naming the field (HF would run another model). */
static int hf_representable(const dsv4_config *c, const char *src, mill_err *e) {
    if (c->n_shared_experts != 1)
        return mill_errf(e, "%s/config.json: n_shared_experts = %d, but HF's DeepseekV4 has exactly one shared expert "
                            "of moe_intermediate_size", src, c->n_shared_experts);
    if (!c->norm_topk_prob)
        return mill_errf(e, "%s/config.json: norm_topk_prob is false, but HF's DeepseekV4 always normalises the top-k "
                            "router weights", src);
    double prf = (double)c->qk_rope_head_dim / c->head_dim;
    if ((int)(c->head_dim * prf) != c->qk_rope_head_dim)
        return mill_errf(e, "%s/config.json: qk_rope_head_dim = %d does not survive HF's partial_rotary_factor "
                            "(int(head_dim %d x %.17g) = %d)", src, c->qk_rope_head_dim, c->head_dim, prf,
                         (int)(c->head_dim * prf));
    return 0;
}

/* config.json as DeepseekV4Config.save_pretrained writes it: HF's field names, the derived fields
 * (layer_types, mlp_layer_types, partial_rotary_factor, rope_parameters) spelled out, and HF's
 * defaults for the fields mill has no use for. */
static json_t *hf_config(const dsv4_config *c, mill_dtype dt) {
    static const char *const score[] = {"sqrtsoftplus", "sigmoid", "softmax"};
    json_t *o = json_object(), *lt = json_array(), *mt = json_array();
    for (int l = 0; l < c->num_hidden_layers; l++) {
        json_array_append_new(lt, json_string(layer_type(c->compress_ratios[l])));
        json_array_append_new(mt, json_string(l < c->num_hash_layers ? "hash_moe" : "moe"));
    }
    double prf = (double)c->qk_rope_head_dim / c->head_dim;
    json_t *main_rope = json_pack("{s:s, s:f, s:f}", "rope_type", "default", "rope_theta", c->rope_theta,
                                  "partial_rotary_factor", prf);
    const dsv4_rope_scaling *rs = &c->rope_scaling;
    /* YaRN on the compressed layers only; attention_factor 1 (no mscale), as HF's config sets it */
    json_t *comp = rs->type_yarn
                       ? json_pack("{s:s, s:f, s:f, s:f, s:i, s:f, s:f, s:f}", "rope_type", "yarn", "rope_theta",
                                   c->compress_rope_theta, "partial_rotary_factor", prf, "factor", rs->factor,
                                   "original_max_position_embeddings", rs->original_max_position_embeddings,
                                   "beta_fast", rs->beta_fast, "beta_slow", rs->beta_slow, "attention_factor", 1.0)
                       : json_pack("{s:s, s:f, s:f}", "rope_type", "default", "rope_theta", c->compress_rope_theta,
                                   "partial_rotary_factor", prf);
#define I(k) json_object_set_new(o, #k, json_integer(c->k))
#define R(k) json_object_set_new(o, #k, json_real(c->k))
#define SET(k, v) json_object_set_new(o, k, v)
    SET("architectures", json_pack("[s]", "DeepseekV4ForCausalLM"));
    SET("model_type", json_string("deepseek_v4"));
    SET("dtype", json_string(dt == DTYPE_BF16 ? "bfloat16" : "float32"));
    I(vocab_size); I(hidden_size); I(moe_intermediate_size); I(num_hidden_layers); I(num_attention_heads);
    I(num_key_value_heads); I(head_dim); I(q_lora_rank); I(num_experts_per_tok); I(n_routed_experts);
    I(n_shared_experts);
    SET("scoring_func", json_string(score[c->scoring_func]));
    SET("norm_topk_prob", json_boolean(c->norm_topk_prob));
    R(routed_scaling_factor); I(max_position_embeddings); R(rope_theta);
    SET("layer_types", lt);
    SET("compress_rates", json_pack("{s:i, s:i}", "compressed_sparse_attention", ATTN_CSA,
                                    "heavily_compressed_attention", ATTN_HCA));
    R(compress_rope_theta); I(hc_mult); I(hc_sinkhorn_iters); R(hc_eps);
    SET("mlp_layer_types", mt);
    R(swiglu_limit); I(sliding_window); I(o_groups); I(o_lora_rank); I(index_n_heads); I(index_head_dim);
    I(index_topk); I(num_nextn_predict_layers);
    R(rms_norm_eps);
    SET("bos_token_id", c->bos_token_id >= 0 ? json_integer(c->bos_token_id) : json_null());
    SET("eos_token_id", c->eos_token_id >= 0 ? json_integer(c->eos_token_id) : json_null());
    SET("pad_token_id", json_null());
    SET("tie_word_embeddings", json_boolean(c->tie_word_embeddings));
    SET("rope_parameters", json_pack("{s:o, s:o}", "main", main_rope, "compress", comp));
    SET("partial_rotary_factor", json_real(prf));
    I(qk_rope_head_dim); /* HF's config keeps it as an attribute, so its save writes it too (read back: unused) */
    /* HF's defaults for what mill does not model (training aux loss, dropout, biases) */
    SET("output_router_logits", json_false());
    SET("router_aux_loss_coef", json_real(0.001));
    SET("router_jitter_noise", json_real(0.0));
    SET("hidden_act", json_string("silu"));
    SET("initializer_range", json_real(0.02));
    SET("use_cache", json_true());
    SET("attention_bias", json_false());
    SET("mlp_bias", json_false());
    SET("attention_dropout", json_real(0.0));
#undef I
#undef R
#undef SET
    return o;
}

/* GenerationConfig.from_model_config's file, for a source without generation_config.json: the keys
 * transformers 5.17's save_pretrained writes (tests/data/hf-keys-*.json, from the GPU machine). */
static json_t *hf_generation_config(const dsv4_config *c) {
    json_t *o = json_pack("{s:b, s:b, s:b, s:b}", "_from_model_config", 1, "output_attentions", 0,
                          "output_hidden_states", 0, "use_cache", 1);
    if (o && c->bos_token_id >= 0) json_object_set_new(o, "bos_token_id", json_integer(c->bos_token_id));
    if (o && c->eos_token_id >= 0) json_object_set_new(o, "eos_token_id", json_integer(c->eos_token_id));
    return o;
}

/* ------------------------------------------------------------------ files */

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

static int rm_tree(const char *path) {
    struct stat sb;
    if (lstat(path, &sb) != 0) return 0;
    return nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* from -> to, fsynced (symbolic links followed: a hub cache's files are links into its blobs). */
static int copy_file(const char *from, const char *to, mill_err *e) {
    FILE *in = fopen(from, "rb");
    if (!in) return mill_errf(e, "%s: cannot open: %s", from, strerror(errno));
    FILE *out = fopen(to, "wb");
    if (!out) {
        fclose(in);
        return mill_errf(e, "%s: cannot create: %s", to, strerror(errno));
    }
    char buf[1 << 16];
    size_t n;
    int rc = 0;
    while (!rc && (n = fread(buf, 1, sizeof buf, in)) > 0) rc = fwrite(buf, 1, n, out) != n;
    rc = rc || ferror(in) || fflush(out) || fsync(fileno(out));
    fclose(in);
    if (fclose(out)) rc = 1;
    return rc ? mill_errf(e, "%s: cannot copy to %s: %s", from, to, strerror(errno)) : 0;
}

/* The regular files under from (folders to depth 4) into to; *n counts them. */
static int copy_tree(const char *from, const char *to, int depth, int *n, mill_err *e) {
    if (mkdir(to, 0755)) return mill_errf(e, "%s: cannot create: %s", to, strerror(errno));
    DIR *d = opendir(from);
    if (!d) return mill_errf(e, "%s: cannot read: %s", from, strerror(errno));
    int rc = 0;
    for (struct dirent *de; !rc && (de = readdir(d));) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        char a[PATH_MAX + 64], b[PATH_MAX + 64];
        struct stat sb;
        if (snprintf(a, sizeof a, "%s/%s", from, de->d_name) >= (int)sizeof a ||
            snprintf(b, sizeof b, "%s/%s", to, de->d_name) >= (int)sizeof b)
            rc = mill_errf(e, "%s/%s: path too long", from, de->d_name);
        else if (stat(a, &sb)) continue; /* a dangling link: nothing to copy */
        else if (S_ISDIR(sb.st_mode)) rc = depth < 4 ? copy_tree(a, b, depth + 1, n, e) : 0;
        else if (S_ISREG(sb.st_mode)) rc = copy_file(a, b, e), *n += !rc;
    }
    closedir(d);
    return rc;
}

/* The tokenizer and chat-encoding files the release ships beside the weights: HF's tokenizer reads
 * them from the same directory. */
static int copy_side_files(const char *src, const char *tmp, int *n, mill_err *e) {
    static const char *const files[] = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                        "tokenizer.model", "chat_template.jinja", "generation_config.json", NULL};
    char a[PATH_MAX + 64], b[PATH_MAX + 64];
    struct stat sb;
    for (const char *const *f = files; *f; f++) {
        snprintf(a, sizeof a, "%s/%s", src, *f);
        snprintf(b, sizeof b, "%s/%s", tmp, *f);
        if (stat(a, &sb) == 0 && S_ISREG(sb.st_mode)) {
            TRY(copy_file(a, b, e));
            ++*n;
        }
    }
    snprintf(a, sizeof a, "%s/encoding", src);
    snprintf(b, sizeof b, "%s/encoding", tmp);
    if (stat(a, &sb) == 0 && S_ISDIR(sb.st_mode)) TRY(copy_tree(a, b, 0, n, e));
    return 0;
}

static int dir_empty(const char *path) {
    DIR *d = opendir(path);
    if (!d) return 0;
    int n = 0;
    for (struct dirent *de; (de = readdir(d));) n += strcmp(de->d_name, ".") && strcmp(de->d_name, "..");
    closedir(d);
    return n == 0;
}

/* The folders above path, as mkdir -p makes them (HF's save_pretrained makes them too). */
static int make_parents(const char *path, mill_err *e) {
    char buf[PATH_MAX];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *s = strchr(buf + 1, '/'); s; s = strchr(s + 1, '/')) {
        *s = 0;
        struct stat sb;
        if (stat(buf, &sb) && mkdir(buf, 0755) && errno != EEXIST)
            return mill_errf(e, "%s: cannot create %s: %s", path, buf, strerror(errno));
        *s = '/';
    }
    return 0;
}

/* The destination may be taken: absent, an empty folder, or (force) anything but the source or a
 * folder holding it. */
static int check_dest(const char *src, const char *out, int force, mill_err *e) {
    struct stat sb;
    if (lstat(out, &sb)) return 0;
    char rs[PATH_MAX], ro[PATH_MAX];
    if (realpath(src, rs) && realpath(out, ro)) {
        size_t n = strlen(ro);
        if (!strcmp(rs, ro) || (!strncmp(rs, ro, n) && (rs[n] == '/' || !strcmp(ro, "/"))))
            return mill_errf(e, "%s: holds the source model %s; export to another directory", out, src);
    }
    if (S_ISDIR(sb.st_mode) && dir_empty(out)) return 0;
    if (!force) return mill_errf(e, "%s: exists and is not an empty directory (--force replaces it)", out);
    return 0;
}

/* tmp (complete, fsynced) becomes out: over an empty folder by rename, over anything else (force)
 * by moving it aside first and removing it once the new one is in place. */
static int put_in_place(const char *tmp, const char *out, int force, mill_err *e) {
    struct stat sb;
    char old[PATH_MAX + 32];
    int aside = 0;
    if (lstat(out, &sb) == 0 && !(S_ISDIR(sb.st_mode) && dir_empty(out))) {
        if (!force) return mill_errf(e, "%s: exists and is not an empty directory (--force replaces it)", out);
        snprintf(old, sizeof old, "%s.old-%ld", out, (long)getpid());
        if (rm_tree(old) || rename(out, old)) return mill_errf(e, "%s: cannot move aside: %s", out, strerror(errno));
        aside = 1;
    }
    if (rename(tmp, out)) {
        int err = errno;
        if (aside) rename(old, out);
        return mill_errf(e, "%s: cannot rename %s into place: %s", out, tmp, strerror(err));
    }
    if (aside) rm_tree(old);
    char parent[PATH_MAX];
    snprintf(parent, sizeof parent, "%s", out);
    char *slash = strrchr(parent, '/');
    if (!slash) snprintf(parent, sizeof parent, ".");
    else if (slash == parent) parent[1] = 0;
    else *slash = 0;
    return fsync_path(parent, e);
}

/* ------------------------------------------------------------------ export */

static int save_file(safetensors_writer *w, const char *tmp, int f, int nf, mill_err *e) {
    char name[64], path[PATH_MAX + 64];
    file_name(name, sizeof name, f, nf);
    if (snprintf(path, sizeof path, "%s/%s", tmp, name) >= (int)sizeof path)
        return mill_errf(e, "mill export: the path %s/%s is too long", tmp, name);
    return safetensors_writer_save(w, path, e);
}

/* The output tensors of stage s (one loaded layer, or the whole model) into their files; *w is the
 * open file's writer (file *wf), saved when the next tensor belongs to another file. */
static int write_stage(const ex_plan *pl, int *next, const dsv4_model *m, int s, const char *tmp,
                       safetensors_writer **w, int *wf, mill_err *e) {
    for (; *next < pl->n && pl->v[*next].stage == s; ++*next) {
        const ex_entry *x = &pl->v[*next];
        if (x->file != *wf) {
            if (*w && save_file(*w, tmp, *wf, pl->files, e)) return -1;
            safetensors_writer_free(*w);
            *w = safetensors_writer_new();
            *wf = x->file;
            if (!*w) return mill_errf(e, "export: out of memory");
            TRY(safetensors_writer_set_metadata(*w, "format", "pt", e)); /* what HF's loader expects */
        }
        void *buf = malloc(x->bytes ? x->bytes : 1);
        if (!buf) return mill_errf(e, "export: out of memory for %s (%zu bytes)", x->hf, x->bytes);
        int rc = fill(x, m, buf, e) || safetensors_writer_add(*w, x->hf, x->dt, x->ndim, x->shape, buf, e);
        free(buf);
        if (rc) return -1;
    }
    return 0;
}

static int write_index(const ex_plan *pl, const char *tmp, mill_err *e) {
    json_t *map = json_object();
    char name[64], path[PATH_MAX + 64];
    for (int i = 0; map && i < pl->n; i++) {
        file_name(name, sizeof name, pl->v[i].file, pl->files);
        json_object_set_new(map, pl->v[i].hf, json_string(name));
    }
    json_t *root = map ? json_pack("{s:{s:I}, s:o}", "metadata", "total_size", (json_int_t)pl->bytes, "weight_map", map)
                       : NULL;
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", tmp);
    int rc = write_json(path, root, e);
    json_decref(root);
    return rc;
}

/* Everything into tmp; the caller renames it into place. */
static int export_into(const char *src, const char *tmp, const dsv4_config *cfg, const export_opts *o,
                       export_report *r, mill_err *e) {
    int L = cfg->num_hidden_layers;
    /* one layer a stage; tied embeddings cannot be split over stages (model_layout_stage) */
    int n_stages = cfg->tie_word_embeddings ? 1 : L;
    dsv4_model whole;
    ex_plan pl = {0};
    if (model_layout(&whole, cfg, e)) return -1;
    int rc = plan_build(&whole, o, n_stages, &pl, e);
    model_free(&whole);
    safetensors_writer *w = NULL;
    int wf = -1, next = 0;
    for (int s = 0; !rc && s < n_stages; s++) {
        model_stage st = model_stage_all(cfg);
        if (n_stages > 1) st.first = s == 0, st.last = s == n_stages - 1, st.l0[0] = s, st.l1[0] = s + 1;
        dsv4_model m;
        if (model_load_stage(&m, src, &st, e)) {
            rc = -1;
            break;
        }
        if (st.last) r->dropped = m.n_extra; /* mtp.*: HF's model has no MTP block and skips them on load */
        rc = write_stage(&pl, &next, &m, s, tmp, &w, &wf, e);
        model_free(&m);
    }
    if (!rc && next != pl.n)
        rc = mill_errf(e, "export: %d of %d tensors were not written (a plan bug)", pl.n - next, pl.n);
    if (!rc && w) rc = save_file(w, tmp, wf, pl.files, e);
    safetensors_writer_free(w);
    if (!rc && pl.files > 1) rc = write_index(&pl, tmp, e);
    char path[PATH_MAX + 64];
    if (!rc) {
        json_t *c = hf_config(cfg, o->dtype);
        snprintf(path, sizeof path, "%s/config.json", tmp);
        rc = write_json(path, c, e);
        json_decref(c);
    }
    if (!rc) rc = copy_side_files(src, tmp, &r->copied, e);
    snprintf(path, sizeof path, "%s/generation_config.json", tmp);
    struct stat sb;
    if (!rc && stat(path, &sb)) { /* none copied: HF's from_model_config one */
        json_t *g = hf_generation_config(cfg);
        rc = write_json(path, g, e);
        json_decref(g);
    }
    r->tensors = pl.n, r->files = pl.files, r->bytes = pl.bytes;
    free(pl.v);
    return rc ? -1 : fsync_path(tmp, e);
}

int export_hf(const char *src, const char *out_arg, const export_opts *o, export_report *report, mill_err *e) {
    export_report r = {0};
    struct stat sb;
    if (o->dtype != DTYPE_BF16 && o->dtype != DTYPE_F32) return mill_errf(e, "export: dtype must be BF16 or F32");
    if (!o->max_shard_bytes) return mill_errf(e, "export: the shard size must be positive");
    if (stat(src, &sb)) return mill_errf(e, "%s: cannot open the model directory: %s", src, strerror(errno));
    if (!S_ISDIR(sb.st_mode))
        return mill_errf(e, "%s: not a directory (a model directory or training checkpoint)", src);
    char out[PATH_MAX], tmp[PATH_MAX + 16], path[PATH_MAX + 16];
    size_t n = strlen(out_arg);
    while (n > 1 && out_arg[n - 1] == '/') n--; /* "DIR/" names DIR */
    if (!n || n >= sizeof out) return mill_errf(e, "export: --out must be a path shorter than %d", PATH_MAX);
    memcpy(out, out_arg, n);
    out[n] = 0;
    snprintf(path, sizeof path, "%s/state.json", src);
    r.checkpoint = stat(path, &sb) == 0;
    dsv4_config cfg;
    TRY(config_load(src, &cfg, e));
    TRY(hf_representable(&cfg, src, e));
    TRY(check_dest(src, out, o->force, e));
    TRY(make_parents(out, e));
    snprintf(tmp, sizeof tmp, "%s.tmp-XXXXXX", out); /* beside out: the rename stays on one filesystem */
    if (!mkdtemp(tmp))
        return mill_errf(e, "%s: cannot create a temporary directory beside it: %s", out, strerror(errno));
    chmod(tmp, 0755); /* mkdtemp's 0700 would make the export private */
    if (export_into(src, tmp, &cfg, o, &r, e) || put_in_place(tmp, out, o->force, e)) {
        rm_tree(tmp); /* never a half-written export */
        return -1;
    }
    if (report) *report = r;
    return 0;
}

int export_parse_size(const char *s, size_t *bytes, mill_err *e) {
    static const struct {
        const char *unit;
        double mult;
    } units[] = {{"", 1},         {"B", 1},           {"KB", 1e3},          {"MB", 1e6},
                 {"GB", 1e9},     {"TB", 1e12},       {"KIB", 1024.0},      {"MIB", 1048576.0},
                 {"GIB", 1073741824.0}, {"TIB", 1099511627776.0}};
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    char u[8];
    size_t k = 0;
    for (; end[k] && k < sizeof u - 1; k++) u[k] = (char)(end[k] >= 'a' && end[k] <= 'z' ? end[k] - 32 : end[k]);
    u[k] = 0;
    for (size_t i = 0; end != s && !errno && !end[k] && i < sizeof units / sizeof units[0]; i++)
        if (!strcmp(u, units[i].unit) && v * units[i].mult >= 1 && v * units[i].mult < 1.8e19) {
            *bytes = (size_t)(v * units[i].mult);
            return 0;
        }
    return mill_errf(e, "--max-shard-size must be a positive size such as 5GB, 500MB, 2GiB or a byte count, got \"%s\"",
                     s);
}
