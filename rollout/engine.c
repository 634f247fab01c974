#include "engine.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/attention.h"
#include "../kernels/dense.h"
#include "../kernels/hc.h"
#include "../kernels/optim.h"
#include "../kernels/rope.h"
#include "../kernels/sample.h"

struct engine_seq {
    int len, max_tokens;
    int id, att;  /* an engine of several ranks: its number there, and the attention group holding it */
    int remote;   /* the leader's record of a sequence another attention group holds (no caches here) */
    size_t bytes;
    engine_seq *next; /* in the engine's pool of freed sequences */
    attn_layer_cache *layers;     /* host array of pointers into block */
    attn_layer_cache *dev_layers; /* the same array in the engine's memory: what the wave ops read */
    float *block;                 /* every cache array, in the engine's memory */
};

/* Where a step's results are in the engine's memory. */
typedef struct {
    const float *logits; /* [M, vocab] or NULL */
    const int32_t *route; /* [layers, N, k] */
    int M, N;
} step_out;

/* A decode step's shape, and its graph once captured. */
#define ENGINE_GRAPHS 16
struct engine_graph {
    int n_seqs, max_tokens, flags;
    const void *block; /* the activation block (en->a's only one) its pointers are in */
    size_t block_cap;
    void *exec;        /* NULL: seen (run op by op) but not captured yet */
    int failed;        /* capture failed: this shape runs op by op */
    step_out out;
};

static void graphs_free(engine *en) {
    for (int i = 0; i < en->n_graph; i++) kctx_graph_free(en->graph[i].exec);
    free(en->graph);
    en->graph = NULL;
    en->n_graph = 0;
}

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

/* The device arenas (made at init and at resume). */
static int arenas_make(engine *en, mill_err *e) {
    if (!en->a.head && arena_init_device(&en->a, 8 << 20, en->k->device, en->k->stream, e)) return -1;
    return en->scratch.head ? 0 : arena_init_device(&en->scratch, 1 << 20, en->k->device, en->k->stream, e);
}

/* An engine of several ranks (with one, every group call is a no-op and nothing here differs). */
static int grouped(const engine *en) { return en->g && en->g->size > 1; }

int engine_init_group(engine *en, const dsv4_model *m, const kctx *k, size_t budget_bytes, engine_group *g,
                      mill_err *e) {
    memset(en, 0, sizeof *en);
    en->m = m;
    en->k = k;
    en->budget = budget_bytes;
    en->g = g;
    en->graphs = !grouped(en);
    if (arena_init(&en->host, 1 << 16, e) || arenas_make(en, e) ||
        (grouped(en) && !(en->att_used = calloc((size_t)g->n_att, sizeof(size_t))) &&
         mill_errf(e, "engine: out of memory"))) {
        engine_free(en);
        return -1;
    }
    return 0;
}

int engine_init(engine *en, const dsv4_model *m, const kctx *k, size_t budget_bytes, mill_err *e) {
    return engine_init_group(en, m, k, budget_bytes, NULL, e);
}

/* Frees a sequence's memory for good (engine_seq_free only pools it). */
static void seq_destroy(engine *en, engine_seq *s) {
    mem_free(en->k->device, s->dev_layers);
    mem_free(en->k->device, s->block);
    free(s->layers);
    free(s);
}

static void pool_drain(engine *en) {
    while (en->pool) {
        engine_seq *s = en->pool;
        en->pool = s->next;
        en->pooled -= s->bytes;
        seq_destroy(en, s);
    }
}

void engine_free(engine *en) {
    for (int i = 0; i < en->n_ids; i++) /* a group's records of sequences still held */
        if (en->by_id[i] && en->by_id[i]->remote) free(en->by_id[i]);
    free(en->by_id);
    free(en->att_used);
    free(en->pend);
    if (en->k) {
        pool_drain(en);
        mem_free_host(en->k->device, en->route_host);
        mem_free(en->k->device, en->pick);
    }
    graphs_free(en);
    arena_free(&en->a);
    arena_free(&en->scratch);
    arena_free(&en->host);
    memset(en, 0, sizeof *en);
}

size_t engine_seq_bytes(const engine *en, int max_tokens) {
    return seq_floats(&en->m->cfg, max_tokens) * sizeof(float) +
           2 * (size_t)en->m->cfg.num_hidden_layers * sizeof(attn_layer_cache) + sizeof(engine_seq);
}

static float *take(float **p, size_t n) {
    float *r = *p;
    *p += n;
    return r;
}

static void comp_layout(attn_comp_cache *cc, float **p, int ratio, int width, int dim, int max_tokens, int overlap) {
    cc->cur_a = take(p, (size_t)ratio * width);
    cc->cur_g = take(p, (size_t)ratio * width);
    if (overlap) {
        cc->prev_a = take(p, (size_t)ratio * width);
        cc->prev_g = take(p, (size_t)ratio * width);
    }
    cc->entries = take(p, (size_t)(max_tokens / ratio + 1) * dim);
}

/* This rank's caches for a sequence (the budget checked here). */
static int seq_admit(engine *en, int max_tokens, engine_seq **out, mill_err *e) {
    const dsv4_config *c = &en->m->cfg;
    *out = NULL;
    if (max_tokens <= 0) return mill_errf(e, "engine: a sequence needs room for at least one token");
    size_t bytes = engine_seq_bytes(en, max_tokens);
    if (en->used + bytes > en->budget)
        return mill_errf(e, "engine: a sequence of %d tokens needs %zu cache bytes; %zu of the %zu-byte budget are free",
                         max_tokens, bytes, en->budget - en->used, en->budget);
    /* a freed sequence of the same size is reused as it is: every cache row is written before it
     * is read (ring rows, window slots, entries and the previous window alike), so no zeroing */
    for (engine_seq **pp = &en->pool; *pp; pp = &(*pp)->next)
        if ((*pp)->max_tokens == max_tokens) {
            engine_seq *s = *pp;
            *pp = s->next;
            en->pooled -= s->bytes;
            s->next = NULL;
            s->len = 0;
            en->used += bytes;
            *out = s;
            return 0;
        }
    if (en->used + en->pooled + bytes > en->budget) pool_drain(en); /* the pool gives its memory back */
    engine_seq *s = calloc(1, sizeof *s);
    if (!s) return mill_errf(e, "engine: out of memory");
    mill_device dev = en->k->device;
    size_t floats = seq_floats(c, max_tokens);
    s->layers = calloc((size_t)c->num_hidden_layers, sizeof(attn_layer_cache));
    s->block = mem_alloc_copy(dev, NULL, floats * sizeof(float), e); /* zeroed */
    if (!s->layers || !s->block) {
        int said = s->layers != NULL; /* else mem_alloc_copy said why */
        seq_destroy(en, s);
        return said ? -1 : mill_errf(e, "engine: out of memory");
    }
    float *p = s->block;
    for (int l = 0; l < c->num_hidden_layers; l++) {
        attn_layer_cache *lc = &s->layers[l];
        int r = c->compress_ratios[l], csa = r == ATTN_CSA;
        lc->ring = take(&p, (size_t)c->sliding_window * c->head_dim);
        if (r) comp_layout(&lc->comp, &p, r, csa ? 2 * c->head_dim : c->head_dim, c->head_dim, max_tokens, csa);
        if (csa) comp_layout(&lc->index, &p, r, 2 * c->index_head_dim, c->index_head_dim, max_tokens, 1);
    }
    size_t lbytes = sizeof(attn_layer_cache) * (size_t)c->num_hidden_layers;
    s->dev_layers = mem_alloc_copy(dev, NULL, lbytes, e); /* filled on the engine's stream, where it is read */
    if (!s->dev_layers || op_copy_from_host(en->k, s->dev_layers, s->layers, lbytes, e)) {
        seq_destroy(en, s);
        return -1;
    }
    s->max_tokens = max_tokens;
    s->bytes = bytes;
    en->used += bytes;
    *out = s;
    return 0;
}

/* Its caches back to the pool. */
static void seq_release(engine *en, engine_seq *s) {
    en->used -= s->bytes;
    en->pooled += s->bytes;
    s->next = en->pool;
    en->pool = s;
}

/* ---- an engine of several ranks: the leader's bookkeeping of where each sequence is */

enum { PEND_NEW = 1, PEND_FREE };
#define PEND_INTS 4 /* kind, id, attention group, max_tokens */

/* Room for the records of one more admission and of every held sequence's free to come (a free must
 * never fail to be recorded): n_pend + n_live + 2. */
static int pend_room(engine *en, mill_err *e) {
    if (en->n_pend + en->n_live + 2 <= en->cap_pend) return 0;
    int cap = 2 * (en->n_pend + en->n_live + 2);
    int32_t *np = realloc(en->pend, sizeof(int32_t) * PEND_INTS * (size_t)cap);
    if (!np) return mill_errf(e, "engine: out of memory");
    en->pend = np;
    en->cap_pend = cap;
    return 0;
}

static void pend_add(engine *en, int kind, int id, int att, int max_tokens) {
    int32_t *r = en->pend + PEND_INTS * en->n_pend++;
    r[0] = kind, r[1] = id, r[2] = att, r[3] = max_tokens;
}

/* Slot id of by_id, grown to hold it. */
static int ids_room(engine *en, int id, mill_err *e) {
    if (id < en->n_ids) return 0;
    int n = id + 1 > 2 * en->n_ids ? id + 1 : 2 * en->n_ids;
    engine_seq **nb = realloc(en->by_id, sizeof *nb * (size_t)n);
    if (!nb) return mill_errf(e, "engine: out of memory");
    memset(nb + en->n_ids, 0, sizeof *nb * (size_t)(n - en->n_ids));
    en->by_id = nb;
    en->n_ids = n;
    return 0;
}

int engine_seq_new(engine *en, int max_tokens, engine_seq **out, mill_err *e) {
    if (!grouped(en)) return seq_admit(en, max_tokens, out, e);
    *out = NULL;
    if (max_tokens <= 0) return mill_errf(e, "engine: a sequence needs room for at least one token");
    size_t bytes = engine_seq_bytes(en, max_tokens);
    int a = -1, least = 0; /* the attention group with the most free cache */
    for (int i = 0; i < en->g->n_att; i++) {
        if (en->att_used[i] < en->att_used[least]) least = i;
        if (en->att_used[i] + bytes <= en->budget && (a < 0 || en->att_used[i] < en->att_used[a])) a = i;
    }
    if (a < 0)
        return mill_errf(e, "engine: a sequence of %d tokens needs %zu cache bytes; %zu of the %zu-byte budget are free "
                            "in the emptiest of the %d attention groups", max_tokens, bytes,
                         en->budget - en->att_used[least], en->budget, en->g->n_att);
    int id = 0;
    while (id < en->n_ids && en->by_id[id]) id++;
    TRY(pend_room(en, e));
    TRY(ids_room(en, id, e));
    engine_seq *s = NULL;
    if (a == en->g->att) TRY(seq_admit(en, max_tokens, &s, e));
    else if (!(s = calloc(1, sizeof *s))) return mill_errf(e, "engine: out of memory");
    else s->max_tokens = max_tokens, s->bytes = bytes, s->remote = 1;
    s->id = id, s->att = a;
    en->by_id[id] = s;
    en->n_live++;
    en->att_used[a] += bytes;
    pend_add(en, PEND_NEW, id, a, max_tokens);
    *out = s;
    return 0;
}

void engine_seq_free(engine *en, engine_seq *s) {
    if (!s) return;
    if (grouped(en)) { /* the followers free theirs with the next step (pend_room kept room for it) */
        en->att_used[s->att] -= s->bytes;
        en->by_id[s->id] = NULL;
        en->n_live--;
        pend_add(en, PEND_FREE, s->id, s->att, 0);
        if (s->remote) {
            free(s);
            return;
        }
    }
    seq_release(en, s);
}

/* A follower takes the leader's admissions and frees (n records), those of its attention group. */
static int pend_apply(engine *en, const int32_t *pend, int n, mill_err *e) {
    for (int i = 0; i < n; i++) {
        const int32_t *r = pend + PEND_INTS * i;
        if (r[2] != en->g->att) continue;
        TRY(ids_room(en, r[1], e));
        if (r[0] == PEND_NEW) TRY(seq_admit(en, r[3], &en->by_id[r[1]], e));
        else if (en->by_id[r[1]]) seq_release(en, en->by_id[r[1]]), en->by_id[r[1]] = NULL;
    }
    return 0;
}

/* The leader of a group tells the followers op (release or resume) with the pending records. */
static int pend_cast(engine *en, int op, mill_err *e) {
    if (!grouped(en) || en->g->rank) return 0;
    TRY(group_cast(en->g, op, en->pend, sizeof(int32_t) * PEND_INTS * (size_t)en->n_pend, e));
    en->n_pend = 0;
    return 0;
}

int engine_follow_memory(engine *en, int op, const void *cmd, size_t n, mill_err *e) {
    int rc = pend_apply(en, cmd, (int)(n / (sizeof(int32_t) * PEND_INTS)), e) ||
             (op == GROUP_RELEASE ? engine_release(en, e) : engine_resume(en, e));
    if (rc) comm_abort(en->g->d.par.world_c, e->msg); /* the ranks no longer agree */
    return rc;
}

int engine_release(engine *en, mill_err *e) {
    if (en->used) return mill_errf(e, "engine: %zu cache bytes are in use", en->used);
    TRY(pend_cast(en, GROUP_RELEASE, e));
    pool_drain(en);
    graphs_free(en); /* their pointers are into the arena */
    arena_free(&en->a);
    arena_free(&en->scratch);
    return 0;
}

int engine_resume(engine *en, mill_err *e) {
    TRY(pend_cast(en, GROUP_RESUME, e));
    return arenas_make(en, e);
}

int engine_seq_len(const engine_seq *s) { return s->len; }

#define AF(ptr, count)                                                                  \
    do {                                                                                \
        (ptr) = (void *)arena_floats(&en->a, (size_t)(count));                          \
        if (!(ptr)) return mill_errf(e, "engine: out of activation memory");          \
    } while (0)

/* The step's tokens in waves: wave i holds the i-th token of every sequence that feeds more than
 * i tokens, so a wave's tokens belong to distinct sequences and the wave ops may run them in
 * parallel; waves run in order, so a token sees the caches as its predecessors left them.
 * row/pos/seq are in the engine's memory, wave-major; off[i] is wave i's first token.
 * A fresh sequence (nothing cached yet) is not in the waves: its chunk runs through the full
 * forward's ops at once, and its caches are filled from their results (prefill_fresh). */
typedef struct {
    int n_waves, *off;
    int32_t *row, *pos;
    attn_layer_cache **seq;
    int max_tokens; /* the largest sequence admission of the step: bounds compressed entries */
    float *score;   /* the indexer's scratch for the widest wave (wave 0): [off[1], max_tokens / 4 + 1] */
    int32_t *sel;   /* [off[1], index_topk] */
    int n_fresh;    /* fresh sequences: their first row, token count and (host) cache table */
    int *fresh_row, *fresh_n;
    const attn_layer_cache **fresh;
} step_waves;

static attn_wave wave_at(const step_waves *sw, int i) {
    attn_wave w = {sw->off[i + 1] - sw->off[i], sw->row + sw->off[i], sw->pos + sw->off[i], sw->seq + sw->off[i]};
    return w;
}

/* A compressor's window state after positions 0..T-1, as T pushes leave it: the open window's rows
 * (positions from the last closed window on) and, on overlap layers, the last closed window. */
static int fill_window(const kctx *k, const attn_comp_cache *cc, const float *a, const float *g, int T, int ratio,
                       int width, int overlap, mill_err *e) {
    int closed = T / ratio, open = T - closed * ratio;
    size_t row = sizeof(float) * (size_t)width;
    TRY(op_copy(k, cc->cur_a, a + (long)closed * ratio * width, row * (size_t)open, e));
    TRY(op_copy(k, cc->cur_g, g + (long)closed * ratio * width, row * (size_t)open, e));
    if (!overlap || !closed) return 0;
    TRY(op_copy(k, cc->prev_a, a + (long)(closed - 1) * ratio * width, row * (size_t)ratio, e));
    return op_copy(k, cc->prev_g, g + (long)(closed - 1) * ratio * width, row * (size_t)ratio, e);
}

/* A compressor's entries for positions 0..T-1 (a, g: the chunk's rows), as the full forward makes
 * them: pooled, normed and rotated at w * ratio (wpos), straight into the cache. */
static int fill_entries(engine *en, const attn_comp_cache *cc, const float *a, const float *g, const float *ape,
                        const float *norm, const int32_t *wpos, int T, int ratio, int dim, int overlap, mill_err *e) {
    const dsv4_config *c = &en->m->cfg;
    int Tc = T / ratio;
    if (!Tc) return 0;
    float *pooled = arena_floats(&en->scratch, (size_t)Tc * dim);
    if (!pooled) return mill_errf(e, "engine: out of activation memory");
    TRY(op_compress_pool(en->k, pooled, a, g, ape, T, dim, ratio, overlap, e));
    TRY(op_rmsnorm(en->k, cc->entries, pooled, norm, Tc, dim, 0, (float)c->rms_norm_eps, e));
    return op_rope(en->k, cc->entries, Tc, 1, dim, c->qk_rope_head_dim, wpos, en->m->inv_freq_compress, 1, e);
}

/* A fresh sequence's first T tokens (rows r0..) through layer l: its attention output rows of o
 * and its caches, with the full forward's ops (model_forward computes the same calls for the
 * same tokens, so the outputs and cached entries are the same bits). */
static int prefill_fresh(engine *en, int l, const attn_layer_cache *lc, int r0, int T, const float *q, const float *kv,
                         const float *ca, const float *cg, const float *ia, const float *ig, const float *iq,
                         const float *iw, float *o, mill_err *e) {
    const dsv4_model *m = en->m;
    const dsv4_config *c = &m->cfg;
    const dsv4_layer *L = &m->layers[l];
    const kctx *k = en->k;
    int H = model_heads(m), d = c->head_dim, W = c->sliding_window, ratio = L->ratio; /* tp: this slice's heads */
    int csa = ratio == ATTN_CSA, ih = c->index_head_dim, nh = c->index_n_heads, width = csa ? 2 * d : d;
    int Tc = ratio ? T / ratio : 0, n_comp = 0;
    int32_t *idx = NULL, *wpos = NULL;
    arena_reset(&en->scratch); /* reused layer after layer: stream order keeps earlier kernels' data */
    if (Tc) { /* entry w sits at position w * ratio */
        int32_t *hw = arena_alloc(&en->host, sizeof(int32_t) * (size_t)Tc);
        wpos = (int32_t *)arena_floats(&en->scratch, (size_t)Tc);
        if (!hw || !wpos) return mill_errf(e, "engine: out of memory for a prefill of %d tokens", T);
        for (int w = 0; w < Tc; w++) hw[w] = w * ratio;
        TRY(op_copy_from_host(k, wpos, hw, sizeof(int32_t) * (size_t)Tc, e));
    }
    if (ratio) {
        TRY(fill_entries(en, &lc->comp, ca + (long)r0 * width, cg + (long)r0 * width, L->c_ape, L->c_norm, wpos, T,
                         ratio, d, csa, e));
        TRY(fill_window(k, &lc->comp, ca + (long)r0 * width, cg + (long)r0 * width, T, ratio, width, csa, e));
    }
    if (csa) {
        TRY(fill_entries(en, &lc->index, ia + (long)r0 * 2 * ih, ig + (long)r0 * 2 * ih, L->i_ape, L->i_norm, wpos, T,
                         ratio, ih, 1, e));
        TRY(fill_window(k, &lc->index, ia + (long)r0 * 2 * ih, ig + (long)r0 * 2 * ih, T, ratio, 2 * ih, 1, e));
    }
    if (Tc) {
        n_comp = csa ? (c->index_topk < Tc ? c->index_topk : Tc) : Tc;
        idx = (int32_t *)arena_floats(&en->scratch, (size_t)T * n_comp);
        if (!idx) return mill_errf(e, "engine: out of activation memory");
        if (csa) {
            float *score = arena_floats(&en->scratch, (size_t)T * Tc);
            if (!score) return mill_errf(e, "engine: out of activation memory");
            TRY(op_indexer_scores(k, score, iq + (long)r0 * nh * ih, lc->index.entries, iw + (long)r0 * nh, T, 0, Tc,
                                  nh, ih, 1.0f / sqrtf((float)ih), ratio, e));
            TRY(op_topk_visible(k, idx, score, T, 0, Tc, n_comp, ratio, e));
        } else {
            TRY(op_causal_entries(k, idx, T, 0, Tc, ratio, e));
        }
    }
    /* r0 is the sequence's first row in the step's activations; its queries start at position 0 */
    TRY(op_sink_attention(k, o + (long)r0 * H * d, q + (long)r0 * H * d, kv + (long)r0 * d, Tc ? lc->comp.entries : NULL,
                          idx, n_comp, L->attn_sink, T, 0, H, d, W, 1.0f / sqrtf((float)d), e));
    for (int p = T - W > 0 ? T - W : 0; p < T;) { /* the ring keeps the last W rows, position p at p % W */
        int slot = p % W, n = T - p < W - slot ? T - p : W - slot;
        TRY(op_copy(k, lc->ring + (long)slot * d, kv + ((long)r0 + p) * d, sizeof(float) * (size_t)n * d, e));
        p += n;
    }
    return 0;
}

/* Attention sublayer for the step's N tokens (xn: normed inputs; pos: each row's position). */
static int attention_step(engine *en, int l, const step_waves *sw, const int32_t *pos, int N, const float *xn,
                          float *y, mill_err *e) {
    const dsv4_model *m = en->m;
    const dsv4_config *c = &m->cfg;
    const dsv4_layer *L = &m->layers[l];
    const kctx *k = en->k;
    int D = c->hidden_size, H = model_heads(m), d = c->head_dim, W = c->sliding_window, ratio = L->ratio;
    int csa = ratio == ATTN_CSA, ih = c->index_head_dim, nh = c->index_n_heads, G = c->o_groups, R = c->o_lora_rank;
    int width = csa ? 2 * d : d, rd = c->qk_rope_head_dim, topk = c->index_topk;
    int max_entries = ratio ? sw->max_tokens / ratio + 1 : 0;
    float eps = (float)c->rms_norm_eps;
    float *qr_raw, *qr, *q_raw, *q, *kv_raw, *kv, *o, *o_rot, *z, *zg = NULL, *ca = NULL, *cg = NULL, *ia = NULL,
                                                                             *ig = NULL, *iq = NULL, *iw = NULL;
    AF(qr_raw, (long)N * c->q_lora_rank);
    AF(qr, (long)N * c->q_lora_rank);
    AF(q_raw, (long)N * H * d);
    AF(q, (long)N * H * d);
    AF(kv_raw, (long)N * d);
    AF(kv, (long)N * d);
    AF(o, (long)N * H * d);
    AF(o_rot, (long)N * H * d);
    AF(z, (long)N * G * R); /* every group's: tp gathers them (model_attn_output) */
    if (m->stage.tp > 1) AF(zg, (long)N * G * R);
    TRY(model_attn_project(m, k, l, xn, pos, N, qr_raw, qr, q_raw, q, kv_raw, kv, e));
    if (ratio) {
        AF(ca, (long)N * width);
        AF(cg, (long)N * width);
        TRY(op_linear(k, ca, xn, L->c_wkv, N, width, D, 0, 0, 0, e));
        TRY(op_linear(k, cg, xn, L->c_wgate, N, width, D, 0, 0, 0, e));
    }
    if (csa) {
        AF(ia, (long)N * 2 * ih);
        AF(ig, (long)N * 2 * ih);
        AF(iq, (long)N * nh * ih);
        AF(iw, (long)N * nh);
        TRY(op_linear(k, ia, xn, L->i_wkv, N, 2 * ih, D, 0, 0, 0, e));
        TRY(op_linear(k, ig, xn, L->i_wgate, N, 2 * ih, D, 0, 0, 0, e));
        TRY(op_linear(k, iq, qr, L->i_wq_b, N, nh * ih, c->q_lora_rank, 0, 0, 0, e));
        TRY(op_rope(k, iq, N, nh, ih, rd, pos, m->inv_freq_compress, 1, e));
        TRY(op_linear(k, iw, xn, L->i_wproj, N, nh, D, 0, 0, 0, e));
        TRY(op_scale(k, iw, (long)N * nh, 1.0f / sqrtf((float)nh), e));
    }
    for (int i = 0; i < sw->n_fresh; i++)
        TRY(prefill_fresh(en, l, &sw->fresh[i][l], sw->fresh_row[i], sw->fresh_n[i], q, kv, ca, cg, ia, ig, iq, iw, o, e));
    for (int i = 0; i < sw->n_waves; i++) {
        attn_wave w = wave_at(sw, i);
        TRY(op_cache_push_kv(k, w, l, kv, d, W, e));
        if (ratio)
            TRY(op_cache_push_comp(k, w, l, 0, ca, cg, L->c_ape, L->c_norm, m->inv_freq_compress, ratio, d, csa, rd, eps,
                                   e));
        if (csa) {
            TRY(op_cache_push_comp(k, w, l, 1, ia, ig, L->i_ape, L->i_norm, m->inv_freq_compress, ratio, ih, 1, rd, eps,
                                   e));
            TRY(op_cache_index_topk(k, sw->sel, sw->score, w, l, iq, iw, nh, ih, 1.0f / sqrtf((float)ih), ratio,
                                    max_entries, topk, e));
        }
        TRY(op_cache_attend(k, o, q, w, l, csa ? sw->sel : NULL, topk, ratio, max_entries, L->attn_sink, H, d, W,
                            1.0f / sqrtf((float)d), e));
    }
    return model_attn_output(m, k, l, o, pos, N, o_rot, z, zg, y, e);
}

/* Lays out the step's rows and waves on the host and copies them to the engine's memory in one go:
 * ids [N], pos [N], then the waves' row [N], pos [N] and seq [N]. */
static int step_layout(engine *en, engine_seq *const *seqs, const int32_t *const *tokens, const int *n_tokens,
                       int n_seqs, int N, int32_t **ids, int32_t **pos, step_waves *sw, mill_err *e) {
    arena *h = &en->host;
    arena_reset(h);
    int max_n = 0;
    sw->max_tokens = 0;
    sw->n_fresh = 0;
    sw->fresh_row = arena_alloc(h, sizeof(int) * (size_t)n_seqs);
    sw->fresh_n = arena_alloc(h, sizeof(int) * (size_t)n_seqs);
    sw->fresh = arena_alloc(h, sizeof(attn_layer_cache *) * (size_t)n_seqs);
    int32_t *first = arena_alloc(h, sizeof(int32_t) * (size_t)n_seqs); /* each sequence's first row */
    if (!sw->fresh_row || !sw->fresh_n || !sw->fresh || !first) return mill_errf(e, "engine: out of memory");
    for (int i = 0, t = 0; i < n_seqs; t += n_tokens[i], i++) {
        first[i] = t;
        if (seqs[i]->max_tokens > sw->max_tokens) sw->max_tokens = seqs[i]->max_tokens;
        if (!seqs[i]->len && n_tokens[i]) { /* fresh: the prefill path */
            sw->fresh_row[sw->n_fresh] = first[i];
            sw->fresh_n[sw->n_fresh] = n_tokens[i];
            sw->fresh[sw->n_fresh++] = seqs[i]->layers;
        } else if (n_tokens[i] > max_n) {
            max_n = n_tokens[i];
        }
    }
    size_t ints = 4 * (size_t)N, bytes = ints * sizeof(int32_t) + (size_t)N * sizeof(attn_layer_cache *);
    int32_t *hb = arena_alloc(h, bytes);
    sw->off = arena_alloc(h, sizeof(int) * (size_t)(max_n + 1));
    char *db = arena_alloc(&en->a, bytes);
    if (!hb || !sw->off || !db) return mill_errf(e, "engine: out of memory for a step of %d tokens", N);
    attn_layer_cache **hseq = (attn_layer_cache **)(hb + ints);
    for (int i = 0; i < n_seqs; i++)
        for (int j = 0; j < n_tokens[i]; j++) {
            hb[first[i] + j] = tokens[i][j];
            hb[N + first[i] + j] = seqs[i]->len + j;
        }
    int n = 0;
    for (int w = 0; w < max_n; w++) {
        sw->off[w] = n;
        for (int i = 0; i < n_seqs; i++)
            if (n_tokens[i] > w && seqs[i]->len) {
                hb[2 * N + n] = first[i] + w;
                hb[3 * N + n] = seqs[i]->len + w;
                hseq[n++] = seqs[i]->dev_layers;
            }
    }
    sw->off[max_n] = n;
    sw->n_waves = max_n;
    TRY(op_copy_from_host(en->k, db, hb, bytes, e));
    *ids = (int32_t *)db;
    *pos = *ids + N;
    sw->row = *ids + 2 * N;
    sw->pos = *ids + 3 * N;
    sw->seq = (attn_layer_cache **)(*ids + ints);
    return 0;
}

/* The step's device work once its layout is there: every layer, then the head. */
static int step_run(engine *en, step_waves *sw, const int32_t *ids, const int32_t *pos, const int *n_tokens,
                    int n_seqs, int N, int want_logits, int last_only, step_out *out, mill_err *e) {
    const dsv4_model *m = en->m;
    const dsv4_config *c = &m->cfg;
    const kctx *k = en->k;
    int D = c->hidden_size, n = c->hc_mult, K = c->num_experts_per_tok, E = c->n_routed_experts;
    int V = c->vocab_size, Lc = c->num_hidden_layers;
    int has_csa = 0;
    for (int l = 0; l < Lc; l++) has_csa |= m->layers[l].ratio == ATTN_CSA;
    if (has_csa && sw->n_waves) { /* wave 0 is the widest: every waved sequence feeds it */
        AF(sw->score, (long)sw->off[1] * (sw->max_tokens / ATTN_CSA + 1));
        AF(sw->sel, (long)sw->off[1] * c->index_topk);
    }
    float *h, *h2, *x, *xn, *y, *pre, *post, *comb, *work, *mlog, *msc, *mw;
    int32_t *route;
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
    AF(route, (long)Lc * N * K);
    int tp = m->stage.tp > 1 ? m->stage.tp : 1, v0, v1;
    model_vocab_range(m, &v0, &v1);
    if (tp > 1) { /* this slice's rows of the table, the others' zeros: the sum is every row exactly */
        TRY(op_embedding_part(k, x, m->embed, ids, N, D, V, v0, v1, e));
        TRY(m->tp.all_reduce(m->tp.ctx, x, (size_t)N * D, e));
    } else {
        TRY(op_embedding(k, x, m->embed, ids, N, D, V, e));
    }
    TRY(op_repeat_rows(k, h, x, N, n, D, e));
    hc_dims dm = {n, D, c->hc_sinkhorn_iters, (float)c->hc_eps, (float)c->rms_norm_eps};
    float eps = (float)c->rms_norm_eps;
    for (int l = 0; l < Lc; l++) {
        const dsv4_layer *L = &m->layers[l];
        TRY(op_hc_pre(k, x, pre, post, comb, h, L->hc_attn_fn, L->hc_attn_base, L->hc_attn_scale, N, dm, work, e));
        TRY(op_rmsnorm(k, xn, x, L->attn_norm, N, D, 0, eps, e));
        TRY(attention_step(en, l, sw, pos, N, xn, y, e));
        TRY(op_hc_post(k, h2, h, y, post, comb, N, n, D, e));
        TRY(op_hc_pre(k, x, pre, post, comb, h2, L->hc_ffn_fn, L->hc_ffn_base, L->hc_ffn_scale, N, dm, work, e));
        TRY(op_rmsnorm(k, xn, x, L->ffn_norm, N, D, 0, eps, e));
        int64_t n0 = 0, n1 = N; /* tp: each slice routes its share of the tokens, then all are gathered */
        if (tp > 1) model_split_range(N, tp, m->stage.tp_rank, &n0, &n1);
        TRY(model_moe(m, k, l, xn + n0 * D, ids + n0, (int)(n1 - n0), NULL, y + n0 * D, mlog, msc,
                      route + (long)l * N * K + n0 * K, mw, &en->a, e));
        if (tp > 1 && (m->tp.gather_rows(m->tp.ctx, y, N, (size_t)D, DTYPE_F32, e) ||
                       m->tp.gather_rows(m->tp.ctx, route + (long)l * N * K, N, (size_t)K, DTYPE_I32, e)))
            return -1;
        TRY(op_hc_post(k, h, h2, y, post, comb, N, n, D, e));
    }
    out->route = route;
    out->logits = NULL;
    out->M = 0;
    if (!want_logits) return 0;
    int M = N; /* the head's rows: every fed position, or each sequence's last one (the head is
                * row-invariant, so the same bits either way) */
    const float *hh = h;
    if (last_only && M != n_seqs) { /* else every sequence fed one token: its rows are the last ones */
        float *hl;
        AF(hl, (long)n_seqs * n * D);
        for (int i = 0, t = 0; i < n_seqs; t += n_tokens[i], i++)
            TRY(op_copy(k, hl + (long)i * n * D, h + (long)(t + n_tokens[i] - 1) * n * D, sizeof(float) * (size_t)n * D,
                        e));
        hh = hl;
    }
    if (last_only) M = n_seqs;
    float *lg;
    AF(lg, (long)M * V);
    TRY(op_hc_head(k, x, hh, m->hc_head_fn, m->hc_head_base, m->hc_head_scale, M, dm, work, e));
    TRY(op_rmsnorm(k, xn, x, m->norm, M, D, 0, eps, e));
    if (tp > 1) { /* each slice's columns (in the head's model_vocab_rows), gathered into whole rows */
        int Vp = (int)model_vocab_rows(V, tp);
        float *lp;
        AF(lp, (long)tp * M * Vp);
        TRY(op_linear(k, lp + (long)m->stage.tp_rank * M * Vp, xn, m->head, M, Vp, D, 0, 0, 0, e));
        TRY(m->tp.all_gather(m->tp.ctx, lp, (size_t)M * Vp, DTYPE_F32, e));
        for (int t = 0; t < tp; t++) {
            int64_t lo, hi;
            model_vocab_split(V, tp, t, &lo, &hi);
            TRY(op_copy_2d(k, lg + lo, sizeof(float) * V, lp + (long)t * M * Vp, sizeof(float) * Vp,
                           sizeof(float) * (size_t)(hi - lo), M, e));
        }
    } else {
        TRY(op_linear(k, lg, xn, m->head, M, V, D, 0, 0, 0, e));
    }
    out->logits = lg;
    out->M = M;
    return 0;
}

/* The one block of the activation arena (NULL when it has several: a step grew it). */
static const void *arena_block_of(const arena *a, size_t *cap) {
    *cap = a->head ? a->head->cap : 0;
    return a->head && !a->head->next ? (const void *)a->head->data : NULL;
}

/* The shape's record (made on first sight), or NULL when the step is no graph candidate. */
static engine_graph *graph_slot(engine *en, int n_seqs, int max_tokens, int flags) {
    if (!en->graphs || !kctx_graphs(en->k)) return NULL;
    if (!en->graph && !(en->graph = calloc(ENGINE_GRAPHS, sizeof(engine_graph)))) return NULL;
    for (int i = 0; i < en->n_graph; i++) {
        engine_graph *g = &en->graph[i];
        if (g->n_seqs == n_seqs && g->max_tokens == max_tokens && g->flags == flags) return g;
    }
    engine_graph *g = &en->graph[en->n_graph < ENGINE_GRAPHS ? en->n_graph++ : (n_seqs + max_tokens) % ENGINE_GRAPHS];
    kctx_graph_free(g->exec);
    *g = (engine_graph){.n_seqs = n_seqs, .max_tokens = max_tokens, .flags = flags};
    return g;
}

/* A step up to its results in the engine's memory (*out), checks deferred and the routing copy
 * queued: validation, layout, then the layers and head op by op, or as a CUDA graph. */
/* A step's arguments checked (by the leader for every rank's sequences before any runs it); *N: its
 * token count, *decode: one token for each sequence, none fresh. */
static int step_check(const engine *en, engine_seq *const *seqs, const int32_t *const *tokens, const int *n_tokens,
                      int n_seqs, int need_last, int *N, int *decode, mill_err *e) {
    int V = en->m->cfg.vocab_size;
    *N = 0;
    *decode = 1;
    for (int i = 0; i < n_seqs; i++) {
        if (n_tokens[i] < 0 || seqs[i]->len + n_tokens[i] > seqs[i]->max_tokens)
            return mill_errf(e, "engine: sequence %d would hold %d tokens, more than the %d it was admitted with", i,
                             seqs[i]->len + n_tokens[i], seqs[i]->max_tokens);
        for (int j = 0; j < i; j++)
            if (seqs[j] == seqs[i]) return mill_errf(e, "engine: sequence %d appears twice in one step", i);
        if (need_last && !n_tokens[i])
            return mill_errf(e, "engine: sequence %d feeds no token, so it has no last logits", i);
        for (int j = 0; j < n_tokens[i]; j++) /* here, so the device's own check never has to stop a step */
            if (tokens[i][j] < 0 || tokens[i][j] >= V)
                return mill_errf(e, "engine: token id %d of sequence %d is outside the vocabulary [0, %d)", tokens[i][j],
                                 i, V);
        *decode &= n_tokens[i] == 1 && seqs[i]->len > 0;
        *N += n_tokens[i];
    }
    return 0;
}

static int step_exec(engine *en, engine_seq *const *seqs, const int32_t *const *tokens, const int *n_tokens,
                     int n_seqs, int want_logits, int last_only, int routing, step_out *out, mill_err *e) {
    const dsv4_config *c = &en->m->cfg;
    const kctx *k = en->k;
    int N, K = c->num_experts_per_tok, Lc = c->num_hidden_layers, decode;
    TRY(step_check(en, seqs, tokens, n_tokens, n_seqs, last_only && want_logits, &N, &decode, e));
    out->N = N;
    if (!N && !grouped(en)) return 0; /* a rank of a group takes part in every step, with tokens or not */
    size_t rbytes = sizeof(int32_t) * (size_t)Lc * N * K;
    if (routing && rbytes > en->route_cap) {
        mem_free_host(k->device, en->route_host);
        en->route_cap = 0;
        if (!(en->route_host = mem_alloc_host(k->device, rbytes, e))) return -1;
        en->route_cap = rbytes;
    }
    arena_reset(&en->a);
    size_t cap;
    const void *block = arena_block_of(&en->a, &cap);
    int32_t *ids = NULL, *pos = NULL;
    step_waves sw = {0};
    TRY(step_layout(en, seqs, tokens, n_tokens, n_seqs, N, &ids, &pos, &sw, e));
    engine_graph *g =
        decode ? graph_slot(en, n_seqs, sw.max_tokens, want_logits | (last_only ? 2 : 0) | (routing ? 4 : 0)) : NULL;
    if (g && (g->block != block || g->block_cap != cap)) { /* seen with other activation memory */
        kctx_graph_free(g->exec);
        g->exec = NULL;
        g->failed = 0;
        g->block = NULL;
    }
    TRY(kctx_defer_checks(k, 1, e));
    int rc = 0;
    if (g && g->exec) {
        rc = kctx_graph_launch(k, g->exec, e);
        *out = g->out;
        en->graph_steps++;
    } else if (g && g->block && !g->failed) { /* the shape's second sighting in this memory: capture */
        void *exec = NULL;
        mill_err ce;
        int crc = kctx_graph_begin(k, &ce);
        if (!crc) {
            crc = step_run(en, &sw, ids, pos, n_tokens, n_seqs, N, want_logits, last_only, out, &ce);
            int erc = kctx_graph_end(k, &exec, crc ? &(mill_err){0} : &ce);
            crc = crc ? crc : erc;
        }
        if (!crc) {
            g->exec = exec;
            g->out = *out;
            rc = kctx_graph_launch(k, exec, e);
            en->graph_steps++;
        } else { /* nothing ran: the same step op by op (and never a capture for this shape again) */
            g->failed = 1;
            fprintf(stderr, "[mill warn] engine: decode step of %d sequences runs without a CUDA graph: %s\n", n_seqs,
                    ce.msg);
            arena_reset(&en->a);
            rc = step_layout(en, seqs, tokens, n_tokens, n_seqs, N, &ids, &pos, &sw, e) ||
                 step_run(en, &sw, ids, pos, n_tokens, n_seqs, N, want_logits, last_only, out, e);
        }
    } else {
        rc = step_run(en, &sw, ids, pos, n_tokens, n_seqs, N, want_logits, last_only, out, e);
        if (!rc && g) g->block = arena_block_of(&en->a, &g->block_cap); /* NULL if the step grew the arena */
    }
    if (!rc && routing) rc = op_copy_to_host_async(k, en->route_host, out->route, rbytes, e);
    if (rc) kctx_defer_checks(k, 0, &(mill_err){0});
    return rc;
}

/* After the result copies are queued (N: the step's tokens): wait and report a deferred check,
 * hand over the routing and advance the sequences. */
static int step_finish(engine *en, engine_seq *const *seqs, const int *n_tokens, int n_seqs, int N, int32_t *routing,
                       int rc, mill_err *e) {
    int drc = kctx_defer_checks(en->k, 0, rc ? &(mill_err){0} : e); /* waits for the step */
    if (rc || drc) return -1;
    if (routing && N)
        memcpy(routing, en->route_host,
               sizeof(int32_t) * (size_t)en->m->cfg.num_hidden_layers * N * en->m->cfg.num_experts_per_tok);
    for (int i = 0; i < n_seqs; i++) seqs[i]->len += n_tokens[i];
    return 0;
}

/* This rank's step: with rows, each sequence's last position sampled (tok, logprob), else the logits
 * (NULL: none; last_only as engine_step) copied out; routing as engine_step. */
static int step_local(engine *en, engine_seq *const *seqs, const int32_t *const *tokens, const int *n_tokens,
                      int n_seqs, const sample_row *rows, int32_t *tok, float *logprob, float *logits, int last_only,
                      int32_t *routing, mill_err *e) {
    const kctx *k = en->k;
    size_t need = (sizeof(int32_t) + sizeof(float)) * (size_t)n_seqs;
    if (rows && need > en->pick_cap) { /* its own memory: a replayed graph's buffers are in the arena */
        mem_free(k->device, en->pick);
        en->pick_cap = 0;
        if (!(en->pick = mem_alloc_copy(k->device, NULL, need, e))) return -1;
        en->pick_cap = need;
    }
    step_out out = {0};
    TRY(step_exec(en, seqs, tokens, n_tokens, n_seqs, rows || logits, rows ? 1 : last_only, routing != NULL, &out, e));
    if (!out.N && !grouped(en)) return 0;
    int rc = 0;
    if (rows && n_seqs) {
        int32_t *dtok = en->pick;
        float *dlp = (float *)(dtok + n_seqs);
        rc = op_sample(k, dtok, dlp, out.logits, n_seqs, en->m->cfg.vocab_size, rows, e);
        if (!rc) rc = op_copy_to_host_async(k, tok, dtok, sizeof(int32_t) * (size_t)n_seqs, e);
        if (!rc) rc = op_copy_to_host(k, logprob, dlp, sizeof(float) * (size_t)n_seqs, e);
    } else if (!rows && logits && out.M) {
        rc = op_copy_to_host(k, logits, out.logits, sizeof(float) * (size_t)out.M * en->m->cfg.vocab_size, e);
    }
    return step_finish(en, seqs, n_tokens, n_seqs, out.N, routing, rc, e);
}

/* ---- an engine of several ranks: a step, told by the leader, run by every rank
 * The command: {flags, pending records, sequences, tokens}, then the records [PEND_INTS each], each
 * sequence's {id, attention group, token count}, the tokens, and with STEP_SAMPLE the sample rows.
 * Each attention group's first rank sends its sequences' results to the leader: ints (sampled
 * tokens, then routing [layers, its tokens, k]) and floats (logprobs, or logits rows). */
enum { STEP_LOGITS = 1, STEP_LAST = 2, STEP_ROUTING = 4, STEP_SAMPLE = 8 };

typedef struct {
    int flags, n_pend, n_seqs, N;
    const int32_t *pend, *seq, *tokens;
    const sample_row *rows;
    size_t bytes; /* the whole command's */
} step_cmd;

static int cmd_parse(const engine *en, const void *buf, size_t n, step_cmd *c, mill_err *e) {
    const int32_t *h = buf;
    if (n < 4 * sizeof(int32_t)) return mill_errf(e, "engine: rank %d: a step command of %zu bytes", en->g->rank, n);
    *c = (step_cmd){h[0], h[1], h[2], h[3], h + 4, NULL, NULL, NULL, n};
    c->seq = c->pend + (size_t)PEND_INTS * c->n_pend;
    c->tokens = c->seq + 3 * (size_t)c->n_seqs;
    c->rows = (const sample_row *)(c->tokens + c->N);
    size_t want = (size_t)((const char *)c->rows - (const char *)buf) +
                  (c->flags & STEP_SAMPLE ? sizeof(sample_row) * (size_t)c->n_seqs : 0);
    if (c->n_pend < 0 || c->n_seqs < 0 || c->N < 0 || want != n)
        return mill_errf(e, "engine: rank %d: a step command of %zu bytes, %zu expected", en->g->rank, n, want);
    return 0;
}

/* The sizes of attention group a's results: ints and floats. */
static void result_sizes(const engine *en, const step_cmd *c, int a, size_t *ni, size_t *nf) {
    const dsv4_config *cfg = &en->m->cfg;
    long n = 0, N = 0;
    for (int i = 0; i < c->n_seqs; i++)
        if (c->seq[3 * i + 1] == a) n++, N += c->seq[3 * i + 2];
    int sample = c->flags & STEP_SAMPLE, last = sample || (c->flags & STEP_LAST);
    *ni = (size_t)(sample ? n : 0) + (c->flags & STEP_ROUTING ? (size_t)cfg->num_hidden_layers * N * cfg->num_experts_per_tok : 0);
    *nf = sample ? (size_t)n : c->flags & STEP_LOGITS ? (size_t)(last ? n : N) * cfg->vocab_size : 0;
}

/* Every rank's part of a step command; on the leader, the results in the caller's order into tok,
 * logprob, logits and routing (engine_step's and engine_step_sample's arrays). */
static int cmd_run(engine *en, const step_cmd *c, int32_t *tok, float *logprob, float *logits, int32_t *routing,
                   mill_err *e) {
    const dsv4_config *cfg = &en->m->cfg;
    engine_group *g = en->g;
    double b0 = g->d.ep_bytes + g->d.tp_bytes;
    int L = cfg->num_hidden_layers, K = cfg->num_experts_per_tok, V = cfg->vocab_size, lead = g->rank == 0;
    int sample = c->flags & STEP_SAMPLE, last = sample || (c->flags & STEP_LAST), routes = c->flags & STEP_ROUTING;
    if (!lead && pend_apply(en, c->pend, c->n_pend, e)) { /* the leader made its own as they came */
        comm_abort(g->d.par.world_c, e->msg);
        return -1;
    }
    /* this attention group's sequences, in the command's order */
    int nl = 0, *nt = malloc(sizeof(int) * (size_t)(c->n_seqs + 1));
    engine_seq **ls = malloc(sizeof *ls * (size_t)(c->n_seqs + 1));
    const int32_t **lt = malloc(sizeof *lt * (size_t)(c->n_seqs + 1));
    sample_row *lr = malloc(sizeof *lr * (size_t)(c->n_seqs + 1));
    size_t ni[2], nf[2], mi = 0, mf = 0; /* this group's result sizes; the largest of any group */
    for (int a = 0; a < g->n_att; a++) {
        result_sizes(en, c, a, &ni[0], &nf[0]);
        mi = ni[0] > mi ? ni[0] : mi, mf = nf[0] > mf ? nf[0] : mf;
    }
    result_sizes(en, c, g->att, &ni[1], &nf[1]);
    int32_t *ri = malloc(sizeof(int32_t) * (mi + 1));
    float *rf = malloc(sizeof(float) * (mf + 1));
    int rc = !nt || !ls || !lt || !lr || !ri || !rf ? mill_errf(e, "engine: out of memory") : 0;
    for (int i = 0, off = 0; !rc && i < c->n_seqs; off += c->seq[3 * i + 2], i++) {
        int id = c->seq[3 * i], a = c->seq[3 * i + 1];
        if (a != g->att) continue;
        if (id < 0 || id >= en->n_ids || !en->by_id[id] || en->by_id[id]->remote)
            rc = mill_errf(e, "engine: rank %d: sequence %d of the step is not held here", g->rank, id);
        else {
            if (sample) lr[nl] = c->rows[i];
            ls[nl] = en->by_id[id], lt[nl] = c->tokens + off, nt[nl++] = c->seq[3 * i + 2];
        }
    }
    if (!rc)
        rc = step_local(en, ls, lt, nt, nl, sample ? lr : NULL, ri, rf, sample || !(c->flags & STEP_LOGITS) ? NULL : rf,
                        c->flags & STEP_LAST, routes ? ri + (sample ? nl : 0) : NULL, e);
    /* the results to the leader, one attention group's at a time (its first rank sends them; the
     * leader's own group, 0, is in ri and rf already) */
    for (int a = 0; !rc && a < g->n_att; a++) {
        comm_p2p op[2] = {{0, 1, ri, ni[1]}, {0, 1, rf, nf[1]}};
        if (lead && a != g->att) {
            result_sizes(en, c, a, &ni[0], &nf[0]);
            op[0] = (comm_p2p){a * g->tp, 0, ri, ni[0]}, op[1] = (comm_p2p){a * g->tp, 0, rf, nf[0]};
        }
        int sends = !lead && a == g->att && g->rank == a * g->tp;
        if ((lead && a != g->att) || sends)
            rc = comm_sendrecv(g->d.par.world_c, &op[0], 1, DTYPE_I32, e) ||
                 comm_sendrecv(g->d.par.world_c, &op[1], 1, DTYPE_F32, e);
        if (sends) b0 -= 4.0 * (double)(ni[1] + nf[1]); /* counted as sent */
        if (rc || !lead) continue;
        long na = 0, Na = 0; /* group a's sequences and tokens */
        for (int i = 0; i < c->n_seqs; i++)
            if (c->seq[3 * i + 1] == a) na++, Na += c->seq[3 * i + 2];
        const int32_t *rr = ri + (sample ? na : 0); /* its routing [layers, Na, k] */
        for (int i = 0, off = 0, j = 0, goff = 0; i < c->n_seqs; off += c->seq[3 * i + 2], i++) {
            int n_i = c->seq[3 * i + 2];
            if (c->seq[3 * i + 1] != a) continue;
            if (sample) tok[i] = ri[j], logprob[i] = rf[j];
            else if (logits && last) memcpy(logits + (long)i * V, rf + (long)j * V, sizeof(float) * (size_t)V);
            else if (logits) memcpy(logits + (long)off * V, rf + (long)goff * V, sizeof(float) * (size_t)n_i * V);
            for (int l = 0; routes && l < L; l++)
                memcpy(routing + ((long)l * c->N + off) * K, rr + ((long)l * Na + goff) * K,
                       sizeof(int32_t) * (size_t)n_i * K);
            j++, goff += n_i;
        }
    }
    free(nt), free(ls), free(lt), free(lr), free(ri), free(rf);
    int decode = c->N == c->n_seqs;
    en->sent[decode] += g->d.ep_bytes + g->d.tp_bytes - b0;
    if (lead) en->sent[decode] += (double)(g->size - 1) * (double)c->bytes; /* the command, to each follower */
    if (rc) { /* the ranks no longer agree on the sequences: the engine cannot go on */
        char why[sizeof e->msg + 32];
        snprintf(why, sizeof why, "engine rank %d: %s", g->rank, e->msg);
        comm_abort(g->d.par.world_c, why);
    }
    return rc;
}

int engine_follow(engine *en, const void *cmd, size_t n, mill_err *e) {
    step_cmd c;
    if (cmd_parse(en, cmd, n, &c, e)) {
        comm_abort(en->g->d.par.world_c, e->msg);
        return -1;
    }
    return cmd_run(en, &c, NULL, NULL, NULL, NULL, e);
}

/* The leader's step of a whole engine: checked here, told to every rank, run, results gathered. */
static int group_step(engine *en, engine_seq *const *seqs, const int32_t *const *tokens, const int *n_tokens,
                      int n_seqs, const sample_row *rows, int32_t *tok, float *logprob, float *logits, int last_only,
                      int32_t *routing, mill_err *e) {
    int N, decode;
    TRY(step_check(en, seqs, tokens, n_tokens, n_seqs, rows || (logits && last_only), &N, &decode, e));
    size_t ints = 4 + (size_t)PEND_INTS * en->n_pend + 3 * (size_t)n_seqs + (size_t)N;
    size_t bytes = sizeof(int32_t) * ints + (rows ? sizeof(sample_row) * (size_t)n_seqs : 0);
    int32_t *b = malloc(bytes);
    if (!b) return mill_errf(e, "engine: out of memory for a step of %d tokens", N);
    b[0] = (logits ? STEP_LOGITS : 0) | (last_only ? STEP_LAST : 0) | (routing ? STEP_ROUTING : 0) | (rows ? STEP_SAMPLE : 0);
    b[1] = en->n_pend, b[2] = n_seqs, b[3] = N;
    memcpy(b + 4, en->pend, sizeof(int32_t) * PEND_INTS * (size_t)en->n_pend);
    int32_t *sq = b + 4 + PEND_INTS * en->n_pend, *tk = sq + 3 * n_seqs;
    for (int i = 0; i < n_seqs; i++) {
        sq[3 * i] = seqs[i]->id, sq[3 * i + 1] = seqs[i]->att, sq[3 * i + 2] = n_tokens[i];
        memcpy(tk, tokens[i], sizeof(int32_t) * (size_t)n_tokens[i]);
        tk += n_tokens[i];
    }
    if (rows) memcpy(tk, rows, sizeof(sample_row) * (size_t)n_seqs);
    step_cmd c;
    int rc = group_cast(en->g, GROUP_STEP, b, bytes, e) || cmd_parse(en, b, bytes, &c, e) ||
             cmd_run(en, &c, tok, logprob, logits, routing, e);
    free(b);
    if (rc) return -1;
    en->n_pend = 0;
    for (int i = 0; i < n_seqs; i++) /* the leader's records of sequences held elsewhere */
        if (seqs[i]->remote) seqs[i]->len += n_tokens[i];
    return 0;
}

/* A step timed into en->steps and en->step_s: decode when every sequence feeds one token. */
static int timed(engine *en, int decode, int rc, double t0) {
    en->steps[decode]++;
    en->step_s[decode] += mill_now() - t0;
    return rc;
}

static int one_each(const int *n_tokens, int n) {
    for (int i = 0; i < n; i++)
        if (n_tokens[i] != 1) return 0;
    return 1;
}

int engine_step(engine *en, engine_seq *const *seqs, const int32_t *const *tokens, const int *n_tokens, int n_seqs,
                float *logits, int last_only, int32_t *routing, mill_err *e) {
    double t0 = mill_now();
    int rc = grouped(en)
                 ? group_step(en, seqs, tokens, n_tokens, n_seqs, NULL, NULL, NULL, logits, last_only, routing, e)
                 : step_local(en, seqs, tokens, n_tokens, n_seqs, NULL, NULL, NULL, logits, last_only, routing, e);
    return timed(en, one_each(n_tokens, n_seqs), rc, t0);
}

int engine_step_sample(engine *en, engine_seq *const *seqs, const int32_t *const *tokens, const int *n_tokens,
                       int n_seqs, const sample_row *rows, int32_t *tok, float *logprob, int32_t *routing, mill_err *e) {
    double t0 = mill_now();
    int rc = grouped(en) ? group_step(en, seqs, tokens, n_tokens, n_seqs, rows, tok, logprob, NULL, 1, routing, e)
                         : step_local(en, seqs, tokens, n_tokens, n_seqs, rows, tok, logprob, NULL, 1, routing, e);
    return timed(en, one_each(n_tokens, n_seqs), rc, t0);
}
