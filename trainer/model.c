#include "model.h"

#include <jansson.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "../common/rng.h"
#include "../common/safetensors.h"
#include "../kernels/attention.h"
#include "../kernels/dense.h"
#include "../kernels/hc.h"
#include "../kernels/moe.h"
#include "../kernels/quant.h"
#include "../kernels/rope.h"

/* ---------------------------------------------------------------- layout */

typedef struct {
    param_info *p;
    int n, cap;
    size_t floats, ints;
    model_stage st;  /* the layers (and ends) this model holds */
    int seen_layer; /* a layer's tensor came: later layer -1 tensors are the tail (norm, HC head, head) */
    size_t gfloats;  /* the whole model's float cursor (kept or not) */
    model_run *runs; /* the kept weights' runs of the whole layout */
    int n_runs, cap_runs;
    int expert; /* the routed expert whose tensors come now, -1: none */
    int split;  /* the dimension the next tensor is sliced along under tp, -1: none */
    int vocab;  /* the next tensor is sliced over the vocabulary */
    int x0, x1; /* the routed experts kept */
} layout_builder;

static int add_param(layout_builder *b, int layer, param_kind kind, int ndim, int64_t d0, int64_t d1, int64_t d2,
                     mill_err *e, const char *fmt, ...) __attribute__((format(printf, 9, 10)));

static int add_param(layout_builder *b, int layer, param_kind kind, int ndim, int64_t d0, int64_t d1, int64_t d2,
                     mill_err *e, const char *fmt, ...) {
    b->seen_layer |= layer >= 0;
    int keep = layer >= 0 ? model_stage_holds(&b->st, layer) && (b->expert < 0 || (b->expert >= b->x0 && b->expert < b->x1))
                          : b->seen_layer ? b->st.last : b->st.first;
    size_t numel = (size_t)d0 * (size_t)(ndim > 1 ? d1 : 1) * (size_t)(ndim > 2 ? d2 : 1), goff = 0;
    if (kind != PARAM_INDEX) { /* where it sits in the whole model's layout */
        goff = (b->gfloats + 15) / 16 * 16;
        b->gfloats = goff + numel;
    }
    if (!keep) return 0; /* another pipeline stage's */
    if (b->n == b->cap) {
        int cap = b->cap ? b->cap * 2 : 256;
        param_info *np = realloc(b->p, sizeof *np * (size_t)cap);
        if (!np) return mill_errf(e, "model: out of memory for the parameter table");
        b->p = np;
        b->cap = cap;
    }
    param_info *p = &b->p[b->n++];
    memset(p, 0, sizeof *p);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->name, sizeof p->name, fmt, ap);
    va_end(ap);
    p->ndim = ndim;
    p->shape[0] = d0;
    p->shape[1] = d1;
    p->shape[2] = d2;
    p->numel = (size_t)d0 * (size_t)(ndim > 1 ? d1 : 1) * (size_t)(ndim > 2 ? d2 : 1);
    p->kind = kind;
    p->layer = layer;
    p->goffset = goff;
    p->split = -1;
    if (b->split >= 0 && b->st.tp > 1) { /* this rank's slice of the tensor, in the widest slice's extent */
        p->split = b->split;
        p->vocab = b->vocab;
        p->whole = p->shape[b->split];
        p->shape[b->split] = b->vocab ? model_vocab_rows(p->whole, b->st.tp) : p->whole / b->st.tp;
        p->numel = p->numel / (size_t)p->whole * (size_t)p->shape[b->split];
    }
    if (kind == PARAM_INDEX) {
        p->offset = b->ints;
        b->ints += p->numel;
    } else { /* each tensor on a 64-byte boundary (the gaps stay zero): cuBLAS's fast kernels and
              * vector loads need aligned operands, and a GPU model's bf16 shadow mirrors these offsets */
        p->offset = (b->floats + 15) / 16 * 16;
        b->floats = p->offset + p->numel;
        model_run *r = b->n_runs ? &b->runs[b->n_runs - 1] : NULL;
        if (b->st.tp > 1) return 0; /* slices: no runs of the whole layout */
        if (kind == PARAM_WEIGHT && (!r || goff - p->offset != r->global - r->local)) { /* after a skipped part */
            if (b->n_runs == b->cap_runs) {
                int cap = b->cap_runs ? 2 * b->cap_runs : 8;
                model_run *nr = realloc(b->runs, sizeof *nr * (size_t)cap);
                if (!nr) return mill_errf(e, "model: out of memory for the layout's runs");
                b->runs = nr;
                b->cap_runs = cap;
            }
            r = &b->runs[b->n_runs++];
            *r = (model_run){p->offset, goff, 0};
        }
        if (kind == PARAM_WEIGHT) r->n = p->offset + p->numel - r->local;
    }
    return 0;
}

#define W1(L, d0, ...) TRY(add_param(b, L, PARAM_WEIGHT, 1, d0, 0, 0, e, __VA_ARGS__))
#define W2(L, d0, d1, ...) TRY(add_param(b, L, PARAM_WEIGHT, 2, d0, d1, 0, e, __VA_ARGS__))
/* The same for a tensor sliced along dimension dim under tensor parallelism; W2R for a row-parallel
 * product's weight, whole under stage.tp_exact (its input is gathered instead of its output summed). */
#define W2S(dim, L, d0, d1, ...)                                      \
    do {                                                              \
        b->split = (dim);                                             \
        TRY(add_param(b, L, PARAM_WEIGHT, 2, d0, d1, 0, e, __VA_ARGS__)); \
        b->split = -1;                                                \
    } while (0)
#define W2R(dim, L, d0, d1, ...)                                               \
    do {                                                                       \
        if (b->st.tp_exact) W2(L, d0, d1, __VA_ARGS__);                         \
        else W2S(dim, L, d0, d1, __VA_ARGS__);                                  \
    } while (0)

/* The canonical order: buffers of one kind (all trainable weights, then router biases) are
 * contiguous so the optimizer and freezing can work on ranges. */
static int build_layout(const dsv4_config *c, layout_builder *b, mill_err *e) {
    int D = c->hidden_size, n = c->hc_mult, mix = (2 + n) * n, H = c->num_attention_heads, d = c->head_dim;
    int E = c->n_routed_experts, I = c->moe_intermediate_size, Is = I * c->n_shared_experts;
    b->vocab = 1;
    W2S(0, -1, c->vocab_size, D, "embed.weight");
    b->vocab = 0;
    for (int l = 0; l < c->num_hidden_layers; l++) {
        int ratio = c->compress_ratios[l];
        W1(l, D, "layers.%d.attn_norm.weight", l);
        W1(l, D, "layers.%d.ffn_norm.weight", l);
        W2(l, mix, (int64_t)n * D, "layers.%d.hc_attn_fn", l);
        W1(l, mix, "layers.%d.hc_attn_base", l);
        W1(l, 3, "layers.%d.hc_attn_scale", l);
        W2(l, mix, (int64_t)n * D, "layers.%d.hc_ffn_fn", l);
        W1(l, mix, "layers.%d.hc_ffn_base", l);
        W1(l, 3, "layers.%d.hc_ffn_scale", l);
        W2(l, c->q_lora_rank, D, "layers.%d.attn.wq_a.weight", l);
        W1(l, c->q_lora_rank, "layers.%d.attn.q_norm.weight", l);
        W2S(0, l, (int64_t)H * d, c->q_lora_rank, "layers.%d.attn.wq_b.weight", l);
        W2(l, d, D, "layers.%d.attn.wkv.weight", l);
        W1(l, d, "layers.%d.attn.kv_norm.weight", l);
        W2S(0, l, (int64_t)c->o_groups * c->o_lora_rank, (int64_t)H * d / c->o_groups, "layers.%d.attn.wo_a.weight", l);
        W2R(1, l, D, (int64_t)c->o_groups * c->o_lora_rank, "layers.%d.attn.wo_b.weight", l);
        b->split = 0;
        W1(l, H, "layers.%d.attn.attn_sink", l);
        b->split = -1;
        if (ratio) {
            int cw = ratio == ATTN_CSA ? 2 * d : d;
            W2(l, cw, D, "layers.%d.attn.compressor.wkv.weight", l);
            W2(l, cw, D, "layers.%d.attn.compressor.wgate.weight", l);
            W2(l, ratio, cw, "layers.%d.attn.compressor.ape", l);
            W1(l, d, "layers.%d.attn.compressor.norm.weight", l);
        }
        if (ratio == ATTN_CSA) {
            int ih = c->index_head_dim;
            W2(l, (int64_t)c->index_n_heads * ih, c->q_lora_rank, "layers.%d.attn.indexer.wq_b.weight", l);
            W2(l, c->index_n_heads, D, "layers.%d.attn.indexer.weights_proj.weight", l);
            W2(l, 2 * ih, D, "layers.%d.attn.indexer.compressor.wkv.weight", l);
            W2(l, 2 * ih, D, "layers.%d.attn.indexer.compressor.wgate.weight", l);
            W2(l, ratio, 2 * ih, "layers.%d.attn.indexer.compressor.ape", l);
            W1(l, ih, "layers.%d.attn.indexer.compressor.norm.weight", l);
        }
        W2(l, E, D, "layers.%d.ffn.gate.weight", l);
        for (b->expert = 0; b->expert < E; b->expert++) W2(l, I, D, "layers.%d.ffn.experts.%d.w1.weight", l, b->expert);
        for (b->expert = 0; b->expert < E; b->expert++) W2(l, D, I, "layers.%d.ffn.experts.%d.w2.weight", l, b->expert);
        for (b->expert = 0; b->expert < E; b->expert++) W2(l, I, D, "layers.%d.ffn.experts.%d.w3.weight", l, b->expert);
        b->expert = -1;
        if (Is) {
            W2R(0, l, Is, D, "layers.%d.ffn.shared_experts.w1.weight", l); /* whole with w2 */
            W2R(1, l, D, Is, "layers.%d.ffn.shared_experts.w2.weight", l);
            W2R(0, l, Is, D, "layers.%d.ffn.shared_experts.w3.weight", l);
        }
    }
    W1(-1, D, "norm.weight");
    W2(-1, n, (int64_t)n * D, "hc_head_fn");
    W1(-1, n, "hc_head_base");
    W1(-1, 1, "hc_head_scale");
    b->vocab = 1;
    if (!c->tie_word_embeddings) W2S(0, -1, c->vocab_size, D, "head.weight");
    b->vocab = 0;
    for (int l = c->num_hash_layers; l < c->num_hidden_layers; l++)
        TRY(add_param(b, l, PARAM_BUFFER, 1, E, 0, 0, e, "layers.%d.ffn.gate.bias", l));
    for (int l = 0; l < c->num_hash_layers; l++)
        TRY(add_param(b, l, PARAM_INDEX, 2, c->vocab_size, c->num_experts_per_tok, 0, e, "layers.%d.ffn.gate.tid2eid", l));
    return 0;
}

const param_info *model_find_param(const dsv4_model *m, const char *name) {
    for (int i = 0; i < m->n_params; i++)
        if (strcmp(m->params[i].name, name) == 0) return &m->params[i];
    return NULL;
}

int model_param_has_grad(const param_info *p) {
    return p->kind == PARAM_WEIGHT && !strstr(p->name, ".attn.indexer.");
}

void model_layer_range(const dsv4_model *m, int l, size_t *lo, size_t *hi) {
    int L = m->cfg.num_hidden_layers, seen_layer = 0;
    *lo = *hi = 0;
    for (int i = 0; i < m->n_params; i++) {
        const param_info *p = &m->params[i];
        seen_layer |= p->layer >= 0;
        if (p->kind != PARAM_WEIGHT) continue;
        int mine = l >= 0 && l < L ? p->layer == l : p->layer < 0 && (l < 0 ? !seen_layer : seen_layer);
        if (!mine) continue;
        if (*lo == *hi) *lo = p->offset;
        *hi = p->offset + p->numel;
    }
}

void model_expert_range(const dsv4_model *m, int l, size_t *lo, size_t *hi) {
    *lo = *hi = 0;
    for (int i = 0; i < m->n_params; i++) {
        const param_info *p = &m->params[i];
        if (p->layer != l || p->kind != PARAM_WEIGHT || !strstr(p->name, ".ffn.experts.")) continue;
        if (*lo == *hi) *lo = p->offset;
        *hi = p->offset + p->numel;
    }
}

static float *fp(const dsv4_model *m, const char *fmt, int l) {
    char name[96];
    snprintf(name, sizeof name, fmt, l);
    const param_info *p = model_find_param(m, name);
    return p && p->kind != PARAM_INDEX ? m->data + p->offset : NULL;
}

model_stage model_stage_all(const dsv4_config *cfg) {
    return (model_stage){.n_chunks = 1, .first = 1, .last = 1, .l1 = {cfg->num_hidden_layers}};
}

int model_stage_holds(const model_stage *st, int l) {
    for (int c = 0; c < st->n_chunks; c++)
        if (l >= st->l0[c] && l < st->l1[c]) return 1;
    return 0;
}

model_stage model_stage_chunk(const model_stage *st, int c) {
    model_stage s = *st; /* the same slices of heads, experts and positions */
    memset(s.l0, 0, sizeof s.l0);
    memset(s.l1, 0, sizeof s.l1);
    s.n_chunks = 1;
    s.first = st->first && c == 0;
    s.last = st->last && c == st->n_chunks - 1;
    s.l0[0] = st->l0[c];
    s.l1[0] = st->l1[c];
    return s;
}

void model_split_range(int64_t n, int tp, int r, int64_t *lo, int64_t *hi) {
    tp = tp > 1 ? tp : 1;
    *lo = n * r / tp;
    *hi = n * (r + 1) / tp;
}

void model_vocab_split(int64_t V, int tp, int r, int64_t *lo, int64_t *hi) {
    tp = tp > 1 ? tp : 1;
    if (V < 16 * tp) return model_split_range(V, tp, r, lo, hi);
    *lo = V * r / tp / 16 * 16;
    *hi = r + 1 == tp ? V : V * (r + 1) / tp / 16 * 16;
}

int64_t model_vocab_rows(int64_t V, int tp) {
    int64_t most = 0, lo, hi;
    for (int r = 0; r < (tp > 1 ? tp : 1); r++) {
        model_vocab_split(V, tp, r, &lo, &hi);
        most = hi - lo > most ? hi - lo : most;
    }
    return most;
}

void model_param_split(const param_info *p, int tp, int r, int64_t *lo, int64_t *hi) {
    if (p->vocab) model_vocab_split(p->whole, tp, r, lo, hi);
    else model_split_range(p->whole, tp, r, lo, hi);
}

void model_whole_shape(const param_info *p, int64_t shape[3]) {
    memcpy(shape, p->shape, sizeof(int64_t) * 3);
    if (p->split >= 0) shape[p->split] = p->whole;
}

size_t model_whole_numel(const param_info *p) {
    return p->split < 0 ? p->numel : p->numel / (size_t)p->shape[p->split] * (size_t)p->whole;
}

void model_vocab_range(const dsv4_model *m, int *v0, int *v1) {
    int64_t lo, hi;
    model_vocab_split(m->cfg.vocab_size, m->stage.tp, m->stage.tp > 1 ? m->stage.tp_rank : 0, &lo, &hi);
    *v0 = (int)lo;
    *v1 = (int)hi;
}

int model_heads(const dsv4_model *m) { return m->cfg.num_attention_heads / (m->stage.tp > 1 ? m->stage.tp : 1); }
int model_groups(const dsv4_model *m) { return m->cfg.o_groups / (m->stage.tp > 1 ? m->stage.tp : 1); }

void model_stage_experts(const model_stage *st, const dsv4_config *cfg, int *x0, int *x1) {
    *x0 = st->x1 ? st->x0 : 0;
    *x1 = st->x1 ? st->x1 : cfg->n_routed_experts;
}

int model_layout(dsv4_model *m, const dsv4_config *cfg, mill_err *e) {
    return model_layout_stage(m, cfg, model_stage_all(cfg), e);
}

int model_layout_stage(dsv4_model *m, const dsv4_config *cfg, model_stage st, mill_err *e) {
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    if (st.n_chunks < 1 || st.n_chunks > MODEL_MAX_CHUNKS)
        return mill_errf(e, "model: %d chunks of layers (1 to %d)", st.n_chunks, MODEL_MAX_CHUNKS);
    for (int c = 0; c < st.n_chunks; c++)
        if (st.l0[c] < (c ? st.l1[c - 1] : 0) || st.l1[c] > cfg->num_hidden_layers || st.l0[c] > st.l1[c])
            return mill_errf(e, "model: chunk %d's layers [%d, %d) are outside the model's %d or out of order", c,
                             st.l0[c], st.l1[c], cfg->num_hidden_layers);
    if (st.tp > 1 && (cfg->num_attention_heads % st.tp || cfg->o_groups % st.tp ||
                      (cfg->moe_intermediate_size * cfg->n_shared_experts) % st.tp))
        return mill_errf(e, "model: tp %d must divide the heads (%d), output groups (%d) and shared experts' hidden "
                            "units (%d)", st.tp, cfg->num_attention_heads, cfg->o_groups,
                         cfg->moe_intermediate_size * cfg->n_shared_experts);
    if (st.tp > cfg->vocab_size)
        return mill_errf(e, "model: tp %d is more than the vocabulary's %d rows (each rank holds a slice)", st.tp,
                         cfg->vocab_size);
    if (cfg->tie_word_embeddings && st.first != st.last)
        return mill_errf(e, "model: tied embeddings cannot be split over pipeline stages");
    m->stage = st;
    layout_builder b = {.st = st, .expert = -1, .split = -1};
    model_stage_experts(&st, cfg, &b.x0, &b.x1);
    if (b.x0 < 0 || b.x1 > cfg->n_routed_experts || b.x0 >= b.x1) {
        return mill_errf(e, "model: experts [%d, %d) outside the model's %d", b.x0, b.x1, cfg->n_routed_experts);
    }
    if (build_layout(cfg, &b, e)) {
        free(b.p);
        free(b.runs);
        return -1;
    }
    m->params = b.p;
    m->n_params = b.n;
    m->n_floats = b.floats;
    m->runs = b.runs;
    m->n_runs = b.n_runs;
    m->n_index = b.ints;
    for (int i = 0; i < b.n; i++)
        if (b.p[i].kind == PARAM_WEIGHT) m->n_trainable += b.p[i].numel;
    return 0;
}

int model_init(dsv4_model *m, const dsv4_config *cfg, mill_err *e) {
    return model_init_stage(m, cfg, model_stage_all(cfg), e);
}

int model_init_stage(dsv4_model *m, const dsv4_config *cfg, model_stage st, mill_err *e) {
    if (model_layout_stage(m, cfg, st, e)) return -1;
    m->data = calloc(m->n_floats ? m->n_floats : 1, sizeof(float));
    m->index_data = calloc(m->n_index ? m->n_index : 1, sizeof(int32_t));
    m->layers = calloc((size_t)cfg->num_hidden_layers, sizeof(dsv4_layer));
    int half = cfg->qk_rope_head_dim / 2 ? cfg->qk_rope_head_dim / 2 : 1;
    m->inv_freq_main = calloc((size_t)half, sizeof(float));
    m->inv_freq_compress = calloc((size_t)half, sizeof(float));
    if (!m->data || !m->index_data || !m->layers || !m->inv_freq_main || !m->inv_freq_compress) {
        model_free(m);
        return mill_errf(e, "model: out of memory for %zu parameters", m->n_floats);
    }
    const dsv4_rope_scaling *rs = &cfg->rope_scaling;
    rope_inv_freq(m->inv_freq_main, cfg->qk_rope_head_dim, cfg->rope_theta, 0, 0, 0, 0, 0);
    rope_inv_freq(m->inv_freq_compress, cfg->qk_rope_head_dim, cfg->compress_rope_theta, rs->type_yarn, rs->factor,
                  rs->beta_fast, rs->beta_slow, rs->original_max_position_embeddings);

    m->embed = fp(m, "embed.weight", 0);
    m->norm = fp(m, "norm.weight", 0);
    m->hc_head_fn = fp(m, "hc_head_fn", 0);
    m->hc_head_base = fp(m, "hc_head_base", 0);
    m->hc_head_scale = fp(m, "hc_head_scale", 0);
    m->head = cfg->tie_word_embeddings ? m->embed : fp(m, "head.weight", 0);
    int x0, x1;
    model_stage_experts(&m->stage, cfg, &x0, &x1);
    (void)x1;
    for (int l = 0; l < cfg->num_hidden_layers; l++) {
        dsv4_layer *L = &m->layers[l];
        L->ratio = cfg->compress_ratios[l];
        L->is_hash = l < cfg->num_hash_layers;
        L->attn_norm = fp(m, "layers.%d.attn_norm.weight", l);
        L->ffn_norm = fp(m, "layers.%d.ffn_norm.weight", l);
        L->hc_attn_fn = fp(m, "layers.%d.hc_attn_fn", l);
        L->hc_attn_base = fp(m, "layers.%d.hc_attn_base", l);
        L->hc_attn_scale = fp(m, "layers.%d.hc_attn_scale", l);
        L->hc_ffn_fn = fp(m, "layers.%d.hc_ffn_fn", l);
        L->hc_ffn_base = fp(m, "layers.%d.hc_ffn_base", l);
        L->hc_ffn_scale = fp(m, "layers.%d.hc_ffn_scale", l);
        L->wq_a = fp(m, "layers.%d.attn.wq_a.weight", l);
        L->q_norm = fp(m, "layers.%d.attn.q_norm.weight", l);
        L->wq_b = fp(m, "layers.%d.attn.wq_b.weight", l);
        L->wkv = fp(m, "layers.%d.attn.wkv.weight", l);
        L->kv_norm = fp(m, "layers.%d.attn.kv_norm.weight", l);
        L->wo_a = fp(m, "layers.%d.attn.wo_a.weight", l);
        L->wo_b = fp(m, "layers.%d.attn.wo_b.weight", l);
        L->attn_sink = fp(m, "layers.%d.attn.attn_sink", l);
        L->c_wkv = fp(m, "layers.%d.attn.compressor.wkv.weight", l);
        L->c_wgate = fp(m, "layers.%d.attn.compressor.wgate.weight", l);
        L->c_ape = fp(m, "layers.%d.attn.compressor.ape", l);
        L->c_norm = fp(m, "layers.%d.attn.compressor.norm.weight", l);
        L->i_wq_b = fp(m, "layers.%d.attn.indexer.wq_b.weight", l);
        L->i_wproj = fp(m, "layers.%d.attn.indexer.weights_proj.weight", l);
        L->i_wkv = fp(m, "layers.%d.attn.indexer.compressor.wkv.weight", l);
        L->i_wgate = fp(m, "layers.%d.attn.indexer.compressor.wgate.weight", l);
        L->i_ape = fp(m, "layers.%d.attn.indexer.compressor.ape", l);
        L->i_norm = fp(m, "layers.%d.attn.indexer.compressor.norm.weight", l);
        L->gate = fp(m, "layers.%d.ffn.gate.weight", l);
        L->gate_bias = fp(m, "layers.%d.ffn.gate.bias", l);
        char nm[96]; /* the first expert held */
        snprintf(nm, sizeof nm, "layers.%%d.ffn.experts.%d.w1.weight", x0);
        L->w1 = fp(m, nm, l);
        snprintf(nm, sizeof nm, "layers.%%d.ffn.experts.%d.w2.weight", x0);
        L->w2 = fp(m, nm, l);
        snprintf(nm, sizeof nm, "layers.%%d.ffn.experts.%d.w3.weight", x0);
        L->w3 = fp(m, nm, l);
        L->sw1 = fp(m, "layers.%d.ffn.shared_experts.w1.weight", l);
        L->sw2 = fp(m, "layers.%d.ffn.shared_experts.w2.weight", l);
        L->sw3 = fp(m, "layers.%d.ffn.shared_experts.w3.weight", l);
        if (L->is_hash && model_stage_holds(&st, l)) {
            char name[96];
            snprintf(name, sizeof name, "layers.%d.ffn.gate.tid2eid", l);
            L->tid2eid = m->index_data + model_find_param(m, name)->offset;
        }
    }
    return 0;
}

/* The device-resident buffers of a model: host memory, or CUDA memory after model_to_device. */
static void model_buf_free(const dsv4_model *m, void *p) { mem_free(m->device, p); }

static void *model_buf_copy(const dsv4_model *dst, const void *src, size_t bytes, mill_err *e) {
    void *p = mem_alloc_copy(dst->device, src, bytes, e);
    if (!p) mill_err_wrap(e, "model");
    return p;
}

/* p re-pointed from a buffer that began at `from` to one at `to`: same offset. `from` is a number,
 * not a pointer: after model_device_drop the old buffer is gone. */
static float *rebase(const float *p, uintptr_t from, float *to) {
    return p ? to + ((uintptr_t)p - from) / sizeof(float) : NULL;
}

/* Every float pointer into m->data, moved from a flat buffer at `from` to one at `to`: shared by
 * model_to_device and model_device_restore, so this is the one list of them (a new float field of
 * dsv4_model or dsv4_layer must be added here). */
static void model_repoint(dsv4_model *m, uintptr_t from, float *to) {
    float **top[] = {&m->embed, &m->head, &m->norm, &m->hc_head_fn, &m->hc_head_base, &m->hc_head_scale};
    for (size_t i = 0; i < sizeof top / sizeof top[0]; i++) *top[i] = rebase(*top[i], from, to);
    for (int l = 0; l < m->cfg.num_hidden_layers; l++) {
        dsv4_layer *D = &m->layers[l];
        float **fields[] = {&D->attn_norm, &D->ffn_norm, &D->hc_attn_fn, &D->hc_attn_base, &D->hc_attn_scale,
                            &D->hc_ffn_fn, &D->hc_ffn_base, &D->hc_ffn_scale, &D->wq_a, &D->q_norm, &D->wq_b,
                            &D->wkv, &D->kv_norm, &D->wo_a, &D->wo_b, &D->attn_sink, &D->c_wkv, &D->c_wgate,
                            &D->c_ape, &D->c_norm, &D->i_wq_b, &D->i_wproj, &D->i_wkv, &D->i_wgate, &D->i_ape,
                            &D->i_norm, &D->gate, &D->gate_bias, &D->w1, &D->w2, &D->w3, &D->sw1, &D->sw2,
                            &D->sw3};
        for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) *fields[i] = rebase(*fields[i], from, to);
    }
}

int model_to_device(dsv4_model *dst, const dsv4_model *src, const kctx *k, mill_err *e) {
    memset(dst, 0, sizeof *dst);
    if (src->device != DEVICE_CPU) return mill_errf(e, "model_to_device: the source model must be on the CPU");
    dst->cfg = src->cfg;
    dst->stage = src->stage;
    dst->runs = malloc(sizeof *dst->runs * (size_t)(src->n_runs ? src->n_runs : 1));
    if (!dst->runs) return mill_errf(e, "model_to_device: out of memory");
    memcpy(dst->runs, src->runs, sizeof *dst->runs * (size_t)src->n_runs);
    dst->n_runs = src->n_runs;
    dst->n_params = src->n_params;
    dst->n_floats = src->n_floats;
    dst->n_trainable = src->n_trainable;
    dst->n_index = src->n_index;
    dst->device = k->device;
    int L = src->cfg.num_hidden_layers, half = src->cfg.qk_rope_head_dim / 2 ? src->cfg.qk_rope_head_dim / 2 : 1;
    dst->params = malloc(sizeof *dst->params * (size_t)(src->n_params ? src->n_params : 1));
    dst->layers = malloc(sizeof *dst->layers * (size_t)(L ? L : 1));
    if (!dst->params || !dst->layers) {
        model_free(dst);
        return mill_errf(e, "model_to_device: out of memory");
    }
    memcpy(dst->params, src->params, sizeof *dst->params * (size_t)src->n_params);
    if (!(dst->data = model_buf_copy(dst, src->data, sizeof(float) * src->n_floats, e)) ||
        !(dst->index_data = model_buf_copy(dst, src->index_data, sizeof(int32_t) * src->n_index, e)) ||
        !(dst->inv_freq_main = model_buf_copy(dst, src->inv_freq_main, sizeof(float) * (size_t)half, e)) ||
        !(dst->inv_freq_compress = model_buf_copy(dst, src->inv_freq_compress, sizeof(float) * (size_t)half, e))) {
        model_free(dst);
        return mill_err_wrap(e, "model_to_device");
    }
    /* src's pointers, then moved onto the copy */
    dst->embed = src->embed;
    dst->head = src->head;
    dst->norm = src->norm;
    dst->hc_head_fn = src->hc_head_fn;
    dst->hc_head_base = src->hc_head_base;
    dst->hc_head_scale = src->hc_head_scale;
    memcpy(dst->layers, src->layers, sizeof *dst->layers * (size_t)L);
    model_repoint(dst, (uintptr_t)src->data, dst->data);
    for (int l = 0; l < L; l++) {
        const int32_t *t = src->layers[l].tid2eid;
        dst->layers[l].tid2eid = t ? dst->index_data + (t - src->index_data) : NULL;
    }
    if (dst->device != DEVICE_CPU) { /* the GEMMs read the weights' bf16 shadow */
        if (kctx_shadow_add(k, dst->data, dst->n_floats, e)) {
            model_free(dst);
            return mill_err_wrap(e, "model_to_device: bf16 shadow");
        }
        dst->shadow_k = k;
    }
    return 0;
}

void model_device_drop(dsv4_model *m) {
    if (m->device == DEVICE_CPU || !m->data) return; /* a host model, or dropped already */
    if (m->shadow_k) kctx_shadow_remove(m->shadow_k, m->data);
    m->dropped_base = (uintptr_t)m->data;
    model_buf_free(m, m->data); /* as in model_free: cudaFree waits for the device's queued work */
    m->data = NULL;
}

int model_device_restore(dsv4_model *m, const kctx *k, const float *host_src, mill_err *e) {
    if (!m->dropped_base) return 0;
    if (k->device != m->device) return mill_errf(e, "model_device_restore: the kctx is on the %s, the model on the %s",
                         k->device == DEVICE_CPU ? "CPU" : "GPU", m->device == DEVICE_CPU ? "CPU" : "GPU");
    float *d = mem_alloc_copy(m->device, host_src, sizeof(float) * m->n_floats, e);
    if (!d) return mill_err_wrap(e, "model_device_restore: %zu floats", m->n_floats);
    /* the shadow before anything moves: if it fails, the model is still dropped, as it was */
    if (kctx_shadow_add(k, d, m->n_floats, e)) {
        mem_free(m->device, d);
        return mill_err_wrap(e, "model_device_restore: bf16 shadow");
    }
    model_repoint(m, m->dropped_base, d);
    m->data = d;
    m->dropped_base = 0;
    m->shadow_k = k;
    return 0;
}

void model_free(dsv4_model *m) {
    if (m->shadow_k) kctx_shadow_remove(m->shadow_k, m->data);
    free(m->params);
    free(m->runs);
    model_buf_free(m, m->data);
    model_buf_free(m, m->index_data);
    free(m->layers);
    model_buf_free(m, m->inv_freq_main);
    model_buf_free(m, m->inv_freq_compress);
    for (int i = 0; i < m->n_extra; i++) {
        free(m->extra[i].name);
        tensor_free(&m->extra[i].t);
    }
    free(m->extra);
    memset(m, 0, sizeof *m);
}

/* ------------------------------------------------------------------ load */

static int load_index(dsv4_model *m, const param_info *p, const safetensors_entry *en, const char *file, mill_err *e) {
    int32_t *dst = m->index_data + p->offset;
    int E = m->cfg.n_routed_experts;
    for (size_t i = 0; i < p->numel; i++) {
        int64_t v;
        if (en->dtype == DTYPE_I64) memcpy(&v, (const char *)en->data + i * 8, 8);
        else if (en->dtype == DTYPE_I32) {
            int32_t v32;
            memcpy(&v32, (const char *)en->data + i * 4, 4);
            v = v32;
        } else
            return mill_errf(e, "%s: tensor %s has dtype %s, expected I64 or I32", file, p->name, dtype_name(en->dtype));
        if (v < 0 || v >= E)
            return mill_errf(e, "%s: tensor %s holds expert id %lld at element %zu, expected [0, %d)", file, p->name,
                             (long long)v, i, E);
        dst[i] = (int32_t)v;
    }
    return 0;
}

/* ---- quantized weights (the release's FP8 / packed FP4; kernels/quant.h decodes them) ---- */

/* The FP8 block shape: config.json's quantization_config.weight_block_size, else the release's 128 x 128. */
typedef struct {
    int br, bc;
} quant_cfg;

/* Reads and checks config.json's quantization_config (the release's keys: quant_method "fp8", fmt
 * "e4m3", scale_fmt "ue8m0", weight_block_size [128, 128], activation_scheme, which mill, computing
 * activations in fp32 / bf16, has no use for). Absent: the tensors' dtypes say what is quantized. */
static int quant_config_load(const char *dir, quant_cfg *q, mill_err *e) {
    q->br = q->bc = QUANT_FP8_BLOCK;
    struct stat sb;
    char path[4096];
    if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode)) return 0; /* config_load read it: nothing to add */
    snprintf(path, sizeof path, "%s/config.json", dir);
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    if (!root) return mill_errf(e, "%s: cannot read: %s (line %d)", path, je.text, je.line);
    json_t *qc = json_object_get(root, "quantization_config");
    int rc = 0;
    if (!qc || json_is_null(qc)) goto out;
    if (!json_is_object(qc)) {
        rc = mill_errf(e, "%s: quantization_config must be an object", path);
        goto out;
    }
    static const struct {
        const char *key, *want;
    } strs[] = {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"scale_fmt", "ue8m0"}};
    for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++) {
        json_t *v = json_object_get(qc, strs[i].key);
        if (!v || json_is_null(v)) continue;
        if (!json_is_string(v) || strcmp(json_string_value(v), strs[i].want) != 0) {
            rc = mill_errf(e, "%s: quantization_config.%s is %s%.40s%s, expected \"%s\" (the DeepSeek-V4 release's FP8 / "
                           "packed FP4 format is the one mill reads)", path, strs[i].key, json_is_string(v) ? "\"" : "",
                           json_is_string(v) ? json_string_value(v) : "not a string", json_is_string(v) ? "\"" : "",
                           strs[i].want);
            goto out;
        }
    }
    json_t *bs = json_object_get(qc, "weight_block_size");
    if (bs && !json_is_null(bs)) {
        json_t *a = json_array_get(bs, 0), *b = json_array_get(bs, 1);
        if (!json_is_array(bs) || json_array_size(bs) != 2 || !json_is_integer(a) || !json_is_integer(b) ||
            json_integer_value(a) < 1 || json_integer_value(b) < 1 || json_integer_value(a) > (1 << 20) ||
            json_integer_value(b) > (1 << 20)) {
            rc = mill_errf(e, "%s: quantization_config.weight_block_size must be two positive integers [rows, cols]",
                           path);
            goto out;
        }
        q->br = (int)json_integer_value(a);
        q->bc = (int)json_integer_value(b);
    }
out:
    json_decref(root);
    return rc;
}

static int quant_dtype(mill_dtype dt) { return dt == DTYPE_F8_E4M3 || dt == DTYPE_I8; }

static const char *quant_kind(mill_dtype dt) { return dt == DTYPE_I8 ? "packed FP4 (I8)" : "FP8 (F8_E4M3)"; }

/* "<base>.weight" -> "<base>.scale" into buf; -1 when name is not a .weight. */
static int quant_scale_name(const char *name, char *buf, size_t n) {
    size_t len = strlen(name);
    if (len < 8 || strcmp(name + len - 7, ".weight") != 0 || len + 1 > n) return -1;
    snprintf(buf, n, "%.*s.scale", (int)(len - 7), name);
    return 0;
}

/* Decodes the quantized tensor en, of logical shape [rows, cols], with its .scale into out, and
 * marks the scale seen. Every mismatch of the pair is one line naming the file and tensor. */
static int dequant_entry(const safetensors *st, const safetensors_entry *en, int64_t rows, int64_t cols,
                         const quant_cfg *qc, char *seen, float *out, mill_err *e) {
    const char *file = safetensors_file_of(st, en), *kind = quant_kind(en->dtype);
    int fp4 = en->dtype == DTYPE_I8;
    char sname[160], want[64], got[64], logical[64], what[64];
    int64_t lshape[2] = {rows, cols}, sshape[2];
    tensor_shape_str(2, lshape, logical, sizeof logical);
    if (quant_scale_name(en->name, sname, sizeof sname))
        return mill_errf(e, "%s: tensor %s is %s, but only .weight tensors are stored quantized (beside a .scale)",
                         file, en->name, kind);
    if (fp4 && cols % QUANT_FP4_GROUP)
        return mill_errf(e, "%s: tensor %s is %s of logical shape %s, but its width is not a multiple of %d (one e8m0 "
                            "scale per %d columns)", file, en->name, kind, logical, QUANT_FP4_GROUP, QUANT_FP4_GROUP);
    if (fp4) {
        sshape[0] = rows;
        sshape[1] = cols / QUANT_FP4_GROUP;
        snprintf(what, sizeof what, "one per %d columns", QUANT_FP4_GROUP);
    } else {
        quant_fp8_scale_shape(rows, cols, qc->br, qc->bc, sshape);
        snprintf(what, sizeof what, "one per %dx%d block", qc->br, qc->bc);
    }
    tensor_shape_str(2, sshape, want, sizeof want);
    const char *sdt = fp4 ? "F8_E8M0" : "F8_E8M0 or F32";
    const safetensors_entry *sc = safetensors_find(st, sname);
    if (!sc)
        return mill_errf(e, "%s: tensor %s is %s but its scale %s is missing (expected %s %s, %s)", file, en->name, kind,
                         sname, sdt, want, what);
    const char *sfile = safetensors_file_of(st, sc);
    if (sc->dtype != DTYPE_F8_E8M0 && (fp4 || sc->dtype != DTYPE_F32))
        return mill_errf(e, "%s: tensor %s has dtype %s, expected %s (the scales of %s %s)", sfile, sname,
                         dtype_name(sc->dtype), sdt, kind, en->name);
    if (sc->ndim != 2 || sc->shape[0] != sshape[0] || sc->shape[1] != sshape[1])
        return mill_errf(e, "%s: tensor %s has shape %s, expected %s (%s of %s %s %s)", sfile, sname,
                         tensor_shape_str(sc->ndim, sc->shape, got, sizeof got), want, what, kind, en->name, logical);
    int rc = fp4 ? quant_dequant_fp4(en->data, sc->data, rows, cols, out, e)
                 : quant_dequant_fp8(en->data, sc->data, sc->dtype, rows, cols, qc->br, qc->bc, out, e);
    if (rc) return mill_err_wrap(e, "%s: tensor %s (scale %s in %s)", file, en->name, sname, sfile);
    int i = safetensors_index(st, sc);
    if (i >= 0) seen[i] = 1;
    return 0;
}

/* Parameter p stored quantized as en: its stored shape follows from p's (whole) shape. */
static int load_quantized_param(dsv4_model *m, const safetensors *st, const param_info *p, const safetensors_entry *en,
                                const quant_cfg *qc, char *seen, mill_err *e) {
    const char *file = safetensors_file_of(st, en);
    int fp4 = en->dtype == DTYPE_I8;
    int64_t full[3];
    char want[64], got[64], logical[64];
    model_whole_shape(p, full);
    tensor_shape_str(p->ndim, full, logical, sizeof logical);
    if (p->ndim != 2)
        return mill_errf(e, "%s: tensor %s has dtype %s, but only 2-D weights are stored quantized (expected F32, BF16 "
                            "or F16 for shape %s)", file, p->name, dtype_name(en->dtype), logical);
    if (fp4 && full[1] % QUANT_FP4_GROUP)
        return mill_errf(e, "%s: tensor %s is %s, but its logical width %lld is not a multiple of %d (one e8m0 scale per "
                            "%d columns)", file, p->name, quant_kind(en->dtype), (long long)full[1], QUANT_FP4_GROUP,
                         QUANT_FP4_GROUP);
    int64_t stored[2] = {full[0], fp4 ? full[1] / 2 : full[1]};
    if (en->ndim != 2 || en->shape[0] != stored[0] || en->shape[1] != stored[1]) {
        tensor_shape_str(en->ndim, en->shape, got, sizeof got);
        tensor_shape_str(2, stored, want, sizeof want);
        if (fp4)
            return mill_errf(e, "%s: tensor %s (packed FP4, I8: two columns a byte) has shape %s, expected %s for its "
                                "logical shape %s", file, p->name, got, want, logical);
        return mill_errf(e, "%s: tensor %s has shape %s, expected %s", file, p->name, got, want);
    }
    if (p->split < 0) return dequant_entry(st, en, full[0], full[1], qc, seen, m->data + p->offset, e);
    float *whole = malloc(sizeof(float) * model_whole_numel(p)); /* this rank's tensor-parallel slice of it */
    if (!whole) return mill_errf(e, "model: out of memory for %s", p->name);
    int rc = dequant_entry(st, en, full[0], full[1], qc, seen, whole, e);
    if (!rc) model_slice_copy(p, m->stage.tp, m->stage.tp_rank, m->data + p->offset, whole, 0);
    free(whole);
    return rc;
}

/* A "<base>.scale" whose "<base>.weight" is quantized: read with that weight, never on its own. */
static int quant_scale_of_quantized(const safetensors *st, const char *name) {
    size_t len = strlen(name);
    char w[160];
    if (len < 7 || strcmp(name + len - 6, ".scale") != 0 || len + 2 > sizeof w) return 0;
    snprintf(w, sizeof w, "%.*s.weight", (int)(len - 6), name);
    const safetensors_entry *en = safetensors_find(st, w);
    return en && quant_dtype(en->dtype);
}

static int load_extra(dsv4_model *m, const safetensors *st, const safetensors_entry *en, const quant_cfg *qc,
                      char *seen, mill_err *e) {
    const char *file = safetensors_file_of(st, en);
    int64_t shape[TENSOR_MAX_DIMS];
    memcpy(shape, en->shape, sizeof shape);
    int quant = quant_dtype(en->dtype);
    if (quant && en->ndim != 2)
        return mill_errf(e, "%s: tensor %s is %s, but only 2-D weights are stored quantized", file, en->name,
                         quant_kind(en->dtype));
    if (en->dtype == DTYPE_I8) shape[1] *= 2; /* the logical width of packed FP4 */
    model_extra *x = realloc(m->extra, sizeof *x * (size_t)(m->n_extra + 1));
    if (!x) return mill_errf(e, "model: out of memory");
    m->extra = x;
    model_extra *me = &m->extra[m->n_extra];
    memset(me, 0, sizeof *me);
    if (tensor_alloc(&me->t, DTYPE_F32, DEVICE_CPU, en->ndim, shape, e)) return -1;
    me->name = strdup(en->name);
    m->n_extra++;
    if (!me->name) return mill_errf(e, "model: out of memory");
    if (quant) return dequant_entry(st, en, shape[0], shape[1], qc, seen, me->t.data, e);
    if (dtype_convert_to_f32(en->dtype, en->data, me->t.data, (size_t)tensor_numel(&me->t), e))
        return mill_err_wrap(e, "%s: tensor %s", file, en->name);
    return 0;
}

/* A tensor of the checkpoint that another pipeline stage holds (not this one's, not unexpected). */
static int other_stage(const model_stage *st, int n_layers, const char *name) {
    int l, n = 0;
    int x, n2 = 0;
    if (sscanf(name, "layers.%d.ffn.experts.%d.%n", &l, &x, &n2) == 2 && n2 > 0 && l >= 0 && l < n_layers) {
        return !model_stage_holds(st, l) || (st->x1 && (x < st->x0 || x >= st->x1)); /* another rank's experts too */
    }
    if (sscanf(name, "layers.%d.%n", &l, &n) == 1 && n > 0) return l >= 0 && l < n_layers && !model_stage_holds(st, l);
    if (!strcmp(name, "embed.weight")) return !st->first;
    static const char *const tail[] = {"norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale", "head.weight", NULL};
    for (const char *const *t = tail; *t; t++)
        if (!strcmp(name, *t)) return !st->last;
    return !strncmp(name, "mtp.", 4) && !st->last; /* the MTP block follows the last layer */
}

void model_slice_copy(const param_info *p, int tp, int r, float *dst, const float *whole, int to_whole) {
    int64_t lo, hi;
    model_param_split(p, tp, r, &lo, &hi);
    size_t cols = p->ndim > 1 ? (size_t)p->shape[1] : 1, n = (size_t)(hi - lo);
    if (p->split == 0) { /* rows [lo, hi) */
        if (to_whole) memcpy((float *)whole + (size_t)lo * cols, dst, sizeof(float) * n * cols);
        else {
            memcpy(dst, whole + (size_t)lo * cols, sizeof(float) * n * cols);
            memset(dst + n * cols, 0, sizeof(float) * (p->numel - n * cols));
        }
        return;
    }
    for (int64_t row = 0; row < p->shape[0]; row++) { /* columns [lo, hi) of every row */
        float *w = (float *)whole + (size_t)row * (size_t)p->whole + (size_t)lo, *s = dst + (size_t)row * cols;
        if (to_whole) memcpy(w, s, sizeof(float) * n);
        else {
            memcpy(s, w, sizeof(float) * n);
            memset(s + n, 0, sizeof(float) * (cols - n));
        }
    }
}

int model_gather_slices(const dsv4_model *m, const param_info *p, const float *mine, float *all, float *whole,
                        mill_err *e) {
    TRY(m->tp.gather(m->tp.ctx, mine, all, p->numel, e));
    for (int r = 0; r < m->stage.tp; r++) model_slice_copy(p, m->stage.tp, r, all + (size_t)r * p->numel, whole, 1);
    return 0;
}

/* This rank's tensor-parallel slice of en. */
static int load_slice(dsv4_model *m, const param_info *p, const safetensors_entry *en, mill_err *e) {
    float *whole = malloc(sizeof(float) * model_whole_numel(p));
    if (!whole) return mill_errf(e, "model: out of memory for %s", p->name);
    int rc = dtype_convert_to_f32(en->dtype, en->data, whole, model_whole_numel(p), e);
    if (!rc) model_slice_copy(p, m->stage.tp, m->stage.tp_rank, m->data + p->offset, whole, 0);
    free(whole);
    return rc;
}

int model_load(dsv4_model *m, const char *dir, mill_err *e) { return model_load_stage(m, dir, NULL, e); }

int model_load_stage(dsv4_model *m, const char *dir, const model_stage *stage, mill_err *e) {
    memset(m, 0, sizeof *m); /* model_free is safe on every failure path */
    dsv4_config cfg;
    if (config_load(dir, &cfg, e)) return -1;
    if (model_init_stage(m, &cfg, stage ? *stage : model_stage_all(&cfg), e)) return -1;
    quant_cfg qc;
    if (quant_config_load(dir, &qc, e)) {
        model_free(m);
        return -1;
    }
    safetensors *st = NULL;
    if (safetensors_open(dir, &st, e)) {
        model_free(m);
        return -1;
    }
    int rc = -1;
    char *seen = calloc((size_t)safetensors_count(st) + 1, 1);
    if (!seen) {
        mill_errf(e, "model: out of memory");
        goto done;
    }
    for (int i = 0; i < m->n_params; i++) {
        const param_info *p = &m->params[i];
        const safetensors_entry *en = safetensors_find(st, p->name);
        char want[64], got[64];
        if (!en) {
            mill_errf(e, "%s: missing tensor %s (shape %s, needed by this config)", dir, p->name,
                      tensor_shape_str(p->ndim, p->shape, want, sizeof want));
            goto done;
        }
        const char *file = safetensors_file_of(st, en);
        seen[safetensors_index(st, en)] = 1;
        if (p->kind != PARAM_INDEX && quant_dtype(en->dtype)) { /* FP8 / packed FP4 with its .scale */
            if (load_quantized_param(m, st, p, en, &qc, seen, e)) goto done;
            continue;
        }
        int64_t full[3]; /* a tensor-parallel slice's whole tensor */
        model_whole_shape(p, full);
        if (en->ndim != p->ndim || memcmp(en->shape, full, sizeof(int64_t) * (size_t)p->ndim) != 0) {
            mill_errf(e, "%s: tensor %s has shape %s, expected %s", file, p->name,
                      tensor_shape_str(en->ndim, en->shape, got, sizeof got),
                      tensor_shape_str(p->ndim, full, want, sizeof want));
            goto done;
        }
        if (p->kind == PARAM_INDEX) {
            if (load_index(m, p, en, file, e)) goto done;
        } else if (en->dtype != DTYPE_F32 && en->dtype != DTYPE_BF16 && en->dtype != DTYPE_F16) {
            mill_errf(e, "%s: tensor %s has dtype %s, expected F32, BF16 or F16 (or F8_E4M3, or packed FP4 as I8, "
                      "beside a .scale)", file, p->name, dtype_name(en->dtype));
            goto done;
        } else if (p->split >= 0) {
            if (load_slice(m, p, en, e)) goto done;
        } else if (dtype_convert_to_f32(en->dtype, en->data, m->data + p->offset, p->numel, e)) {
            goto done;
        }
    }
    for (int j = 0; j < safetensors_count(st); j++) {
        const safetensors_entry *en = safetensors_at(st, j);
        if (seen[j] || other_stage(&m->stage, cfg.num_hidden_layers, en->name)) continue;
        if (quant_scale_of_quantized(st, en->name)) continue; /* read (or refused) with its weight */
        if (strncmp(en->name, "mtp.", 4) == 0) {
            if (load_extra(m, st, en, &qc, seen, e)) goto done;
            continue;
        }
        size_t len = strlen(en->name);
        if (len > 6 && strcmp(en->name + len - 6, ".scale") == 0) {
            char w[160];
            snprintf(w, sizeof w, "%.*s.weight", (int)(len - 6), en->name);
            const safetensors_entry *we = safetensors_find(st, w);
            mill_errf(e, "%s: unexpected tensor %s (a quantization scale, but %s %s%s%s)", safetensors_file_of(st, en),
                      en->name, w, we ? "is " : "is missing", we ? dtype_name(we->dtype) : "",
                      we ? ", not F8_E4M3 or packed FP4 (I8)" : "");
            goto done;
        }
        mill_errf(e, "%s: unexpected tensor %s (not part of the DeepSeek-V4 layout of this config.json)",
                  safetensors_file_of(st, en), en->name);
        goto done;
    }
    rc = 0;
done:
    free(seen);
    safetensors_close(st);
    if (rc) model_free(m);
    return rc;
}


void model_shard_range(const dsv4_model *m, int r, int k, size_t *lo, size_t *hi) {
    size_t units = (m->n_floats + 15) / 16, q = units / (size_t)k, rem = units % (size_t)k, rs = (size_t)r;
    size_t u0 = rs * q + (rs < rem ? rs : rem), u1 = u0 + q + (rs < rem);
    *lo = u0 * 16 < m->n_floats ? u0 * 16 : m->n_floats;
    *hi = u1 * 16 < m->n_floats ? u1 * 16 : m->n_floats;
}

static int is_expert(const param_info *p) { return strstr(p->name, ".ffn.experts.") != NULL; }

int model_param_shard(const dsv4_model *m, const param_info *p, int k) {
    if (m->ep.size > 1 && m->ep.rank != 0 && !is_expert(p)) return -1; /* ep rank 0's ranks save the rest */
    if (p->kind == PARAM_INDEX) return 0;
    for (int r = 0; r < k; r++) {
        size_t lo, hi;
        model_shard_range(m, r, k, &lo, &hi);
        if (p->offset >= lo && p->offset < hi) return r;
    }
    return 0;
}

/* File f of nf (f counts the stages' shards in order: stage * n_shards + shard). */
static void shard_file(char *buf, size_t n, int f, int nf) {
    if (nf == 1) snprintf(buf, n, "model.safetensors");
    else snprintf(buf, n, "model-%05d-of-%05d.safetensors", f + 1, nf);
}

/* This stage's part of model.safetensors.index.json (every tensor's file): the whole index with one
 * stage, else STAGE_INDEX_FMT for model_merge_index. */
#define STAGE_INDEX_FMT "%s/model.safetensors.index.stage-%05d.json"
static int save_index(const dsv4_model *m, const char *dir, int n_shards, int stage, int n_stages, mill_err *e) {
    int P = m->ep.size > 1 ? m->ep.size : 1, El = m->cfg.n_routed_experts / P, per = P * n_shards; /* files a stage */
    json_t *map = json_object(), *root = json_pack("{s:{s:I}, s:o}", "metadata", "total_size", (json_int_t)0,
                                                   "weight_map", map);
    if (!root) return mill_errf(e, "model_save: out of memory");
    char file[64], path[4200];
    int nf = n_stages * per;
    json_int_t total = 0;
    for (int q = 0; q < P; q++) { /* every ep rank's tensors (its own layout) */
        dsv4_model lay = {0};
        const dsv4_model *mq = m;
        if (P > 1) {
            model_stage st = m->stage;
            st.x0 = q * El, st.x1 = (q + 1) * El;
            if (model_layout_stage(&lay, &m->cfg, st, e)) return json_decref(root), -1;
            lay.ep = (model_ep_io){P, q, NULL, NULL};
            mq = &lay;
        }
        for (int i = 0; i < mq->n_params; i++) {
            const param_info *p = &mq->params[i];
            int sh = model_param_shard(mq, p, n_shards);
            if (sh < 0) continue;
            shard_file(file, sizeof file, stage * per + q * n_shards + sh, nf);
            json_object_set_new(map, p->name, json_string(file));
            total += (json_int_t)(p->numel * (p->kind == PARAM_INDEX ? sizeof(int64_t) : sizeof(float)));
        }
        model_free(&lay);
    }
    json_object_set_new(json_object_get(root, "metadata"), "total_size", json_integer(total));
    shard_file(file, sizeof file, stage * per, nf);
    for (int i = 0; i < m->n_extra; i++) json_object_set_new(map, m->extra[i].name, json_string(file));
    if (n_stages == 1) snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    else snprintf(path, sizeof path, STAGE_INDEX_FMT, dir, stage);
    int rc = json_dump_file(root, path, JSON_INDENT(1) | JSON_SORT_KEYS);
    json_decref(root);
    return rc ? mill_errf(e, "%s: cannot write", path) : 0;
}

int model_merge_index(const char *dir, int n_stages, mill_err *e) {
    json_t *map = json_object(), *root = json_pack("{s:{s:I}, s:o}", "metadata", "total_size", (json_int_t)0,
                                                   "weight_map", map);
    char path[4200];
    json_int_t total = 0;
    int rc = -1;
    for (int st = 0; st < n_stages; st++) {
        json_error_t je;
        snprintf(path, sizeof path, STAGE_INDEX_FMT, dir, st);
        json_t *part = json_load_file(path, 0, &je);
        json_t *wm = part ? json_object_get(part, "weight_map") : NULL;
        if (!wm) {
            json_decref(part);
            mill_errf(e, "%s: stage %d's index is missing or bad (%s)", path, st, part ? "no weight_map" : je.text);
            goto done;
        }
        json_object_update(map, wm);
        total += json_integer_value(json_object_get(json_object_get(part, "metadata"), "total_size"));
        json_decref(part);
        remove(path);
    }
    json_object_set_new(json_object_get(root, "metadata"), "total_size", json_integer(total));
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    if (json_dump_file(root, path, JSON_INDENT(1) | JSON_SORT_KEYS)) mill_errf(e, "%s: cannot write", path);
    else rc = 0;
done:
    json_decref(root);
    return rc;
}

int model_save_stage_shard(const dsv4_model *m, const kctx *k, const char *dir, int shard, int n_shards, int stage,
                           int n_stages, mill_err *e) {
    char path[4200], file[64];
    if (m->device != DEVICE_CPU && (!k || k->device != m->device))
        return mill_errf(e, "model_save: a device model is saved through its kctx");
    int P = m->ep.size > 1 ? m->ep.size : 1, q = P > 1 ? m->ep.rank : 0, per = P * n_shards; /* files a stage */
    /* heads over ranks: the tp ranks gather each sliced tensor whole, and tp rank 0 writes */
    int tp = m->stage.tp > 1 ? m->stage.tp : 1, writer = tp == 1 || m->stage.tp_rank == 0;
    if (shard == 0 && q == 0 && writer) {
        snprintf(path, sizeof path, "%s/config.json", dir);
        if (stage == 0 && config_save(&m->cfg, path, e)) return -1;
        if (per * n_stages > 1 && save_index(m, dir, n_shards, stage, n_stages, e)) return -1;
    }
    /* a device model's tensors of this shard come over to one host buffer (the shard, not the model) */
    size_t nf = 0, ni = 0, nw = 0, big = 0; /* nw: the whole sliced tensors; big: the largest slice x tp */
    for (int i = 0; i < m->n_params; i++) {
        const param_info *p = &m->params[i];
        if (model_param_shard(m, p, n_shards) != shard) continue;
        if (p->kind == PARAM_INDEX) ni = p->numel > ni ? p->numel : ni;
        else nf += p->numel;
        if (p->split >= 0) nw += model_whole_numel(p), big = p->numel * (size_t)tp > big ? p->numel * (size_t)tp : big;
    }
    safetensors_writer *w = safetensors_writer_new();
    float *host = m->device != DEVICE_CPU ? malloc(sizeof(float) * (nf ? nf : 1)) : NULL;
    float *wholes = nw ? malloc(sizeof(float) * nw) : NULL, *all = big ? malloc(sizeof(float) * big) : NULL;
    int64_t *tmp = malloc(sizeof(int64_t) * (ni ? ni : 1));
    int32_t *itmp = malloc(sizeof(int32_t) * (ni ? ni : 1));
    int rc = -1;
    if (!w || !tmp || !itmp || (m->device != DEVICE_CPU && !host) || (nw && (!wholes || !all))) {
        mill_errf(e, "model_save: out of memory");
        goto done;
    }
    size_t at = 0, wat = 0;
    for (int i = 0; i < m->n_params; i++) {
        const param_info *p = &m->params[i];
        if (model_param_shard(m, p, n_shards) != shard) continue;
        if (p->kind == PARAM_INDEX) { /* written as I64; the writer copies it at add */
            const int32_t *src = m->index_data + p->offset;
            if (m->device != DEVICE_CPU) {
                if (op_copy_to_host(k, itmp, src, sizeof(int32_t) * p->numel, e)) goto done;
                src = itmp;
            }
            for (size_t j = 0; j < p->numel; j++) tmp[j] = src[j];
            if (safetensors_writer_add(w, p->name, DTYPE_I64, p->ndim, p->shape, tmp, e)) goto done;
            continue;
        }
        const float *src = m->data + p->offset;
        if (host) {
            if (op_copy_to_host(k, host + at, src, sizeof(float) * p->numel, e)) goto done;
            src = host + at;
            at += p->numel;
        }
        int64_t shape[3];
        model_whole_shape(p, shape);
        if (p->split >= 0) { /* every slice, whole, in its place */
            if (model_gather_slices(m, p, src, all, wholes + wat, e)) goto done;
            src = wholes + wat;
            wat += model_whole_numel(p);
        }
        if (writer && safetensors_writer_add(w, p->name, DTYPE_F32, p->ndim, shape, src, e)) goto done;
    }
    if (!writer) { /* its slices went to tp rank 0 */
        rc = 0;
        goto done;
    }
    for (int i = 0; shard == 0 && q == 0 && i < m->n_extra; i++)
        if (safetensors_writer_add(w, m->extra[i].name, DTYPE_F32, m->extra[i].t.ndim, m->extra[i].t.shape,
                                   m->extra[i].t.data, e))
            goto done;
    shard_file(file, sizeof file, stage * per + q * n_shards + shard, n_stages * per);
    snprintf(path, sizeof path, "%s/%s", dir, file);
    rc = safetensors_writer_save(w, path, e);
done:
    free(tmp);
    free(itmp);
    free(host);
    free(wholes);
    free(all);
    safetensors_writer_free(w);
    return rc;
}

int model_copy_matching(dsv4_model *dst, const dsv4_model *src, mill_err *e) {
    if (dst->device != DEVICE_CPU || src->device != DEVICE_CPU)
        return mill_errf(e, "model_copy_matching: host models only");
    /* the smaller table is a part of the larger, both in the canonical order: one pass over each */
    int small_dst = dst->n_params <= src->n_params, ns = small_dst ? dst->n_params : src->n_params;
    const dsv4_model *big = small_dst ? src : dst;
    for (int i = 0, j = 0; i < ns; i++) {
        const param_info *p = small_dst ? &dst->params[i] : &src->params[i];
        while (j < big->n_params && strcmp(big->params[j].name, p->name)) j++;
        if (j == big->n_params) return mill_errf(e, "model_copy_matching: %s is in one model only", p->name);
        const param_info *d = small_dst ? p : &dst->params[j], *q = small_dst ? &src->params[j] : p;
        if (p->kind == PARAM_INDEX) {
            if (dst->index_data && src->index_data)
                memcpy(dst->index_data + d->offset, src->index_data + q->offset, sizeof(int32_t) * p->numel);
        } else if (d->split >= 0 && q->split < 0) { /* a tensor-parallel slice of the whole tensor */
            model_slice_copy(d, dst->stage.tp, dst->stage.tp_rank, dst->data + d->offset, src->data + q->offset, 0);
        } else if (d->split < 0 && q->split >= 0) {
            return mill_errf(e, "model_copy_matching: %s is a slice in the source (gather it first)", p->name);
        } else {
            memcpy(dst->data + d->offset, src->data + q->offset, sizeof(float) * d->numel);
        }
    }
    return 0;
}

void model_move_extras(dsv4_model *dst, dsv4_model *src) {
    dst->extra = src->extra;
    dst->n_extra = src->n_extra;
    src->extra = NULL;
    src->n_extra = 0;
}

int model_save(const dsv4_model *m, const char *dir, mill_err *e) {
    return model_save_stage_shard(m, NULL, dir, 0, 1, 0, 1, e);
}

void model_init_random(dsv4_model *m, uint64_t seed, float std) {
    rng r;
    rng_seed(&r, seed);
    for (int i = 0; i < m->n_params; i++) {
        const param_info *p = &m->params[i];
        const char *nm = p->name;
        size_t len = strlen(nm);
#define ENDS(s) (len >= strlen(s) && strcmp(nm + len - strlen(s), s) == 0)
        if (p->kind == PARAM_INDEX) { /* k distinct experts per token */
            int K = (int)p->shape[1], E = m->cfg.n_routed_experts;
            int32_t *t = m->index_data + p->offset;
            for (int64_t v = 0; v < p->shape[0]; v++)
                for (int j = 0; j < K; j++) {
                    int x, dup;
                    do {
                        x = (int)rng_below(&r, (uint64_t)E);
                        dup = 0;
                        for (int q = 0; q < j; q++) dup |= t[v * K + q] == x;
                    } while (dup);
                    t[v * K + j] = x;
                }
            continue;
        }
        float *d = m->data + p->offset, fill = -1.0f;
        if (ENDS("norm.weight") || ENDS("_scale")) fill = 1.0f;
        else if (ENDS("_base") || ENDS("attn_sink") || ENDS(".ape") || ENDS("gate.bias")) fill = 0.0f;
        if (fill >= 0.0f)
            for (size_t j = 0; j < p->numel; j++) d[j] = fill;
        else
            for (size_t j = 0; j < p->numel; j++) d[j] = std * rng_normal(&r);
#undef ENDS
    }
}
