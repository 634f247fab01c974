#include "engine.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/attention.h"
#include "../kernels/dense.h"
#include "../kernels/hc.h"
#include "../kernels/rope.h"

/* One compressor's decode state: the open window's projection rows, the previous closed
 * window's rows (overlap layers only) and the emitted entries. */
typedef struct {
    float *cur_a, *cur_g;   /* [ratio, width] */
    float *prev_a, *prev_g; /* [ratio, width] (overlap) */
    int has_prev;
    float *entries; /* [max_entries, dim] */
    int n_entries;
} comp_cache;

typedef struct {
    float *ring; /* [window, head_dim] */
    comp_cache comp, index;
} layer_cache;

struct engine_seq {
    int len, max_tokens;
    size_t bytes;
    layer_cache *layers;
    float *block; /* one allocation for all cache arrays */
};

static size_t comp_floats(int ratio, int width, int dim, int max_tokens, int overlap) {
    return (size_t)ratio * width * (overlap ? 4 : 2) + (size_t)(max_tokens / ratio + 1) * dim;
}

static size_t seq_floats(const dsv4_config *c, int max_tokens) {
    size_t f = 0;
    for (int l = 0; l < c->num_hidden_layers; l++) {
        int r = c->compress_ratios[l], csa = r == ATTN_CSA;
        f += (size_t)c->sliding_window * c->head_dim;
        if (r) f += comp_floats(r, csa ? 2 * c->head_dim : c->head_dim, c->head_dim, max_tokens, csa);
        if (csa) f += comp_floats(r, 2 * c->index_head_dim, c->index_head_dim, max_tokens, 1);
    }
    return f;
}

int engine_init(engine *en, const dsv4_model *m, const kctx *k, size_t budget_bytes, mill_err *e) {
    memset(en, 0, sizeof *en);
    en->m = m;
    en->k = k;
    en->budget = budget_bytes;
    return arena_init(&en->a, 8 << 20, e);
}

int engine_release(engine *en, mill_err *e) {
    if (en->used) return mill_errf(e, "engine: %zu cache bytes are in use", en->used);
    arena_free(&en->a);
    return 0;
}

int engine_resume(engine *en, mill_err *e) {
    return en->a.head ? 0 : arena_init(&en->a, 8 << 20, e);
}

void engine_free(engine *en) {
    arena_free(&en->a);
    memset(en, 0, sizeof *en);
}

size_t engine_seq_bytes(const engine *en, int max_tokens) {
    return seq_floats(&en->m->cfg, max_tokens) * sizeof(float) +
           (size_t)en->m->cfg.num_hidden_layers * sizeof(layer_cache) + sizeof(engine_seq);
}

static float *take(float **p, size_t n) {
    float *r = *p;
    *p += n;
    return r;
}

static void comp_layout(comp_cache *cc, float **p, int ratio, int width, int dim, int max_tokens, int overlap) {
    cc->cur_a = take(p, (size_t)ratio * width);
    cc->cur_g = take(p, (size_t)ratio * width);
    if (overlap) {
        cc->prev_a = take(p, (size_t)ratio * width);
        cc->prev_g = take(p, (size_t)ratio * width);
    }
    cc->entries = take(p, (size_t)(max_tokens / ratio + 1) * dim);
}

int engine_seq_new(engine *en, int max_tokens, engine_seq **out, mill_err *e) {
    const dsv4_config *c = &en->m->cfg;
    *out = NULL;
    if (max_tokens <= 0) return mill_errf(e, "engine: a sequence needs room for at least one token");
    size_t bytes = engine_seq_bytes(en, max_tokens);
    if (en->used + bytes > en->budget)
        return mill_errf(e, "engine: a sequence of %d tokens needs %zu cache bytes; %zu of the %zu-byte budget are free",
                         max_tokens, bytes, en->budget - en->used, en->budget);
    engine_seq *s = calloc(1, sizeof *s);
    if (!s) return mill_errf(e, "engine: out of memory");
    s->layers = calloc((size_t)c->num_hidden_layers, sizeof(layer_cache));
    s->block = calloc(seq_floats(c, max_tokens), sizeof(float));
    if (!s->layers || !s->block) {
        free(s->layers);
        free(s->block);
        free(s);
        return mill_errf(e, "engine: out of memory for %zu cache bytes", bytes);
    }
    float *p = s->block;
    for (int l = 0; l < c->num_hidden_layers; l++) {
        layer_cache *lc = &s->layers[l];
        int r = c->compress_ratios[l], csa = r == ATTN_CSA;
        lc->ring = take(&p, (size_t)c->sliding_window * c->head_dim);
        if (r) comp_layout(&lc->comp, &p, r, csa ? 2 * c->head_dim : c->head_dim, c->head_dim, max_tokens, csa);
        if (csa) comp_layout(&lc->index, &p, r, 2 * c->index_head_dim, c->index_head_dim, max_tokens, 1);
    }
    s->max_tokens = max_tokens;
    s->bytes = bytes;
    en->used += bytes;
    *out = s;
    return 0;
}

void engine_seq_free(engine *en, engine_seq *s) {
    if (!s) return;
    en->used -= s->bytes;
    free(s->layers);
    free(s->block);
    free(s);
}

int engine_seq_len(const engine_seq *s) { return s->len; }

/* Takes token row a/g (width floats) at position p into the open window; when the window closes,
 * pools it (with the previous window's first half on overlap layers) exactly as the full forward's
 * op_compress_pool does, norms and rotates it at w * ratio, and appends the entry. */
static int comp_push(engine *en, comp_cache *cc, const float *a, const float *g, const float *ape, const float *norm,
                     int p, int ratio, int dim, int overlap, mill_err *e) {
    const dsv4_config *c = &en->m->cfg;
    int width = overlap ? 2 * dim : dim, slot = p % ratio;
    memcpy(cc->cur_a + (long)slot * width, a, sizeof(float) * (size_t)width);
    memcpy(cc->cur_g + (long)slot * width, g, sizeof(float) * (size_t)width);
    if (slot != ratio - 1) return 0;
    int w = p / ratio, two = overlap && cc->has_prev, rows = two ? 2 * ratio : ratio;
    float *ba = arena_floats(&en->a, (size_t)rows * width), *bg = arena_floats(&en->a, (size_t)rows * width);
    float *pooled = arena_floats(&en->a, (size_t)2 * dim);
    if (!ba || !bg || !pooled) return mill_errf(e, "engine: out of activation memory");
    if (two) { /* [previous window; this window] pools into entries (w-1, w); keep the second */
        memcpy(ba, cc->prev_a, sizeof(float) * (size_t)ratio * width);
        memcpy(bg, cc->prev_g, sizeof(float) * (size_t)ratio * width);
    }
    memcpy(ba + (two ? (long)ratio * width : 0), cc->cur_a, sizeof(float) * (size_t)ratio * width);
    memcpy(bg + (two ? (long)ratio * width : 0), cc->cur_g, sizeof(float) * (size_t)ratio * width);
    TRY(op_compress_pool(en->k, pooled, ba, bg, ape, rows, dim, ratio, overlap, e));
    float *entry = cc->entries + (long)cc->n_entries * dim;
    int32_t wpos = w * ratio;
    TRY(op_rmsnorm(en->k, entry, pooled + (two ? dim : 0), norm, 1, dim, 0, (float)c->rms_norm_eps, e));
    TRY(op_rope(en->k, entry, 1, 1, dim, c->qk_rope_head_dim, &wpos, en->m->inv_freq_compress, 1, e));
    cc->n_entries++;
    if (overlap) {
        memcpy(cc->prev_a, cc->cur_a, sizeof(float) * (size_t)ratio * width);
        memcpy(cc->prev_g, cc->cur_g, sizeof(float) * (size_t)ratio * width);
        cc->has_prev = 1;
    }
    return 0;
}

#define AF(ptr, count)                                                                  \
    do {                                                                                \
        (ptr) = (void *)arena_floats(&en->a, (size_t)(count));                          \
        if (!(ptr)) return mill_errf(e, "engine: out of activation memory");          \
    } while (0)

/* Attention sublayer for N tokens (xn: normed inputs) of the step, token by token through the caches. */
static int attention_step(engine *en, int l, engine_seq *const *owner, const int32_t *pos, int N, const float *xn,
                          float *y, mill_err *e) {
    const dsv4_model *m = en->m;
    const dsv4_config *c = &m->cfg;
    const dsv4_layer *L = &m->layers[l];
    int D = c->hidden_size, H = c->num_attention_heads, d = c->head_dim, W = c->sliding_window, ratio = L->ratio;
    int csa = ratio == ATTN_CSA, ih = c->index_head_dim, nh = c->index_n_heads, G = c->o_groups, R = c->o_lora_rank;
    int width = csa ? 2 * d : d;
    float *qr_raw, *qr, *q_raw, *q, *kv_raw, *kv, *o, *o_rot, *z, *ca = NULL, *cg = NULL, *ia = NULL, *ig = NULL,
                                                                    *iq = NULL, *iw = NULL, *score = NULL;
    AF(qr_raw, (long)N * c->q_lora_rank);
    AF(qr, (long)N * c->q_lora_rank);
    AF(q_raw, (long)N * H * d);
    AF(q, (long)N * H * d);
    AF(kv_raw, (long)N * d);
    AF(kv, (long)N * d);
    AF(o, (long)N * H * d);
    AF(o_rot, (long)N * H * d);
    AF(z, (long)N * G * R);
    TRY(model_attn_project(m, en->k, l, xn, pos, N, qr_raw, qr, q_raw, q, kv_raw, kv, e));
    if (ratio) {
        AF(ca, (long)N * width);
        AF(cg, (long)N * width);
        TRY(op_linear(en->k, ca, xn, L->c_wkv, N, width, D, 0, 0, 0, e));
        TRY(op_linear(en->k, cg, xn, L->c_wgate, N, width, D, 0, 0, 0, e));
    }
    if (csa) {
        AF(ia, (long)N * 2 * ih);
        AF(ig, (long)N * 2 * ih);
        AF(iq, (long)N * nh * ih);
        AF(iw, (long)N * nh);
        TRY(op_linear(en->k, ia, xn, L->i_wkv, N, 2 * ih, D, 0, 0, 0, e));
        TRY(op_linear(en->k, ig, xn, L->i_wgate, N, 2 * ih, D, 0, 0, 0, e));
        TRY(op_linear(en->k, iq, qr, L->i_wq_b, N, nh * ih, c->q_lora_rank, 0, 0, 0, e));
        TRY(op_rope(en->k, iq, N, nh, ih, c->qk_rope_head_dim, pos, m->inv_freq_compress, 1, e));
        TRY(op_linear(en->k, iw, xn, L->i_wproj, N, nh, D, 0, 0, 0, e));
        float ws = 1.0f / sqrtf((float)nh);
        for (long i = 0; i < (long)N * nh; i++) iw[i] *= ws;
    }
    int max_entries = 1; /* the most compressed entries any of these sequences can hold */
    for (int t = 0; t < N; t++)
        if (ratio && owner[t]->max_tokens / ratio + 1 > max_entries) max_entries = owner[t]->max_tokens / ratio + 1;
    int max_keys = W + max_entries;
    if (csa) AF(score, max_entries);
    const float **keys = (const float **)arena_alloc(&en->a, sizeof(float *) * (size_t)max_keys);
    int32_t *sel = (int32_t *)arena_alloc(&en->a, sizeof(int32_t) * (size_t)max_keys);
    if (!keys || !sel) return mill_errf(e, "engine: out of activation memory");
    for (int t = 0; t < N; t++) { /* in order: a token sees the caches as its predecessors left them */
        engine_seq *s = owner[t];
        layer_cache *lc = &s->layers[l];
        int p = pos[t];
        memcpy(lc->ring + (long)(p % W) * d, kv + (long)t * d, sizeof(float) * (size_t)d);
        if (ratio) TRY(comp_push(en, &lc->comp, ca + (long)t * width, cg + (long)t * width, L->c_ape, L->c_norm, p, ratio,
                                 d, csa, e));
        if (csa) TRY(comp_push(en, &lc->index, ia + (long)t * 2 * ih, ig + (long)t * 2 * ih, L->i_ape, L->i_norm, p, ratio,
                               ih, 1, e));
        int nk = 0;
        for (int j = p - W + 1 < 0 ? 0 : p - W + 1; j <= p; j++) keys[nk++] = lc->ring + (long)(j % W) * d;
        int ne = lc->comp.n_entries; /* all emitted entries are visible: w < (p + 1) / ratio */
        if (ratio && !csa)
            for (int w = 0; w < ne; w++) keys[nk++] = lc->comp.entries + (long)w * d;
        if (csa && ne) {
            int topk = c->index_topk < ne ? c->index_topk : ne;
            TRY(op_indexer_score_at(en->k, score, iq + (long)t * nh * ih, lc->index.entries, iw + (long)t * nh, p, ne, nh,
                                    ih, 1.0f / sqrtf((float)ih), ratio, e));
            TRY(op_topk_at(en->k, sel, score, p, ne, topk, ratio, e));
            for (int j = 0; j < topk; j++)
                if (sel[j] >= 0) keys[nk++] = lc->comp.entries + (long)sel[j] * d;
        }
        TRY(op_attend_keys(en->k, o + (long)t * H * d, q + (long)t * H * d, keys, nk, L->attn_sink, H, d,
                           1.0f / sqrtf((float)d), e));
    }
    return model_attn_output(m, en->k, l, o, pos, N, o_rot, z, y, e);
}

int engine_step(engine *en, engine_seq *const *seqs, const int32_t *const *tokens, const int *n_tokens, int n_seqs,
                float *logits, int32_t *routing, mill_err *e) {
    const dsv4_model *m = en->m;
    const dsv4_config *c = &m->cfg;
    const kctx *k = en->k;
    int N = 0, D = c->hidden_size, n = c->hc_mult, K = c->num_experts_per_tok, E = c->n_routed_experts;
    for (int i = 0; i < n_seqs; i++) {
        if (n_tokens[i] < 0 || seqs[i]->len + n_tokens[i] > seqs[i]->max_tokens)
            return mill_errf(e, "engine: sequence %d would hold %d tokens, more than the %d it was admitted with", i,
                             seqs[i]->len + n_tokens[i], seqs[i]->max_tokens);
        for (int j = 0; j < i; j++)
            if (seqs[j] == seqs[i]) return mill_errf(e, "engine: sequence %d appears twice in one step", i);
        N += n_tokens[i];
    }
    if (!N) return 0;
    arena_reset(&en->a);
    int32_t *ids, *pos, *route;
    engine_seq **owner;
    float *h, *h2, *x, *xn, *y, *pre, *post, *comb, *work, *mlog, *msc, *mw;
    AF(ids, N);
    AF(pos, N);
    owner = (engine_seq **)arena_alloc(&en->a, sizeof(engine_seq *) * (size_t)N);
    if (!owner) return mill_errf(e, "engine: out of activation memory");
    for (int i = 0, t = 0; i < n_seqs; i++)
        for (int j = 0; j < n_tokens[i]; j++, t++) {
            ids[t] = tokens[i][j];
            pos[t] = seqs[i]->len + j;
            owner[t] = seqs[i];
        }
    AF(h, (long)N * n * D);
    AF(h2, (long)N * n * D);
    AF(x, (long)N * D);
    AF(xn, (long)N * D);
    AF(y, (long)N * D);
    AF(pre, (long)N * n);
    AF(post, (long)N * n);
    AF(comb, (long)N * n * n);
    AF(work, (long)N * (n * D + (2 + n) * n));
    AF(mlog, (long)N * E);
    AF(msc, (long)N * E);
    AF(mw, (long)N * K);
    AF(route, (long)N * K);
    TRY(op_embedding(k, x, m->embed, ids, N, D, c->vocab_size, e));
    for (int t = 0; t < N; t++)
        for (int j = 0; j < n; j++) memcpy(h + ((long)t * n + j) * D, x + (long)t * D, sizeof(float) * (size_t)D);
    hc_dims dm = {n, D, c->hc_sinkhorn_iters, (float)c->hc_eps, (float)c->rms_norm_eps};
    float eps = (float)c->rms_norm_eps;
    for (int l = 0; l < c->num_hidden_layers; l++) {
        const dsv4_layer *L = &m->layers[l];
        TRY(op_hc_pre(k, x, pre, post, comb, h, L->hc_attn_fn, L->hc_attn_base, L->hc_attn_scale, N, dm, work, e));
        TRY(op_rmsnorm(k, xn, x, L->attn_norm, N, D, 0, eps, e));
        TRY(attention_step(en, l, owner, pos, N, xn, y, e));
        TRY(op_hc_post(k, h2, h, y, post, comb, N, n, D, e));
        TRY(op_hc_pre(k, x, pre, post, comb, h2, L->hc_ffn_fn, L->hc_ffn_base, L->hc_ffn_scale, N, dm, work, e));
        TRY(op_rmsnorm(k, xn, x, L->ffn_norm, N, D, 0, eps, e));
        int32_t *ro = routing ? routing + (long)l * N * K : route;
        TRY(model_moe(m, k, l, xn, ids, N, NULL, y, mlog, msc, ro, mw, &en->a, e));
        TRY(op_hc_post(k, h, h2, y, post, comb, N, n, D, e));
    }
    for (int i = 0; i < n_seqs; i++) seqs[i]->len += n_tokens[i];
    if (!logits) return 0;
    TRY(op_hc_head(k, x, h, m->hc_head_fn, m->hc_head_base, m->hc_head_scale, N, dm, work, e));
    TRY(op_rmsnorm(k, xn, x, m->norm, N, D, 0, eps, e));
    return op_linear(k, logits, xn, m->head, N, c->vocab_size, D, 0, 0, 0, e);
}
