#include "generate.h"

#include "../kernels/dense.h"

#include "engine.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* The row sampler lives in kernels/sample.c, shared with op_sample; the draw happens here, so a
 * row's rng advances exactly as before: one rng_uniform per non-greedy token, none when greedy. */
sample_row sample_draw(const sample_params *sp, rng *r) {
    sample_row sr = {.temperature = sp->temperature, .top_p = sp->top_p, .top_k = sp->top_k, .u = 0.0f};
    if (!sample_greedy(sr.temperature)) sr.u = rng_uniform(r);
    return sr;
}

int32_t sample_token(const float *logits, int V, const sample_params *sp, rng *r, float *logprob, float *work) {
    sample_row sr = sample_draw(sp, r);
    return sample_row_pick(logits, V, &sr, logprob, work);
}

void gen_result_free(gen_result *res) {
    if (res->routing)
        for (int i = 0; i < res->n; i++) free(res->routing[i]);
    free(res->routing);
    free(res->prompt_len);
    free(res->out_len);
    free(res->out_ids);
    free(res->logprobs);
    free(res->finish);
    memset(res, 0, sizeof *res);
}

/* Non-empty prompts and a sane length; the longest prompt and the total prompt tokens. */
static int check_request(const int *lens, int n, int maxn, int *maxp, int *total, mill_err *e) {
    if (n <= 0 || maxn < 0) return mill_errf(e, "generate: %d prompts, %d new tokens", n, maxn);
    for (int i = 0; i < n; i++) {
        if (lens[i] <= 0) return mill_errf(e, "generate: prompt %d is empty", i);
        if (maxp && lens[i] > *maxp) *maxp = lens[i];
        if (total) *total += lens[i];
    }
    return 0;
}

/* Result arrays for n rows; each row's routing sized for its prompt + max_new tokens. */
static int result_alloc(gen_result *res, int n, const int *lens, int maxn, int per_token, mill_err *e) {
    memset(res, 0, sizeof *res);
    res->n = n;
    res->prompt_len = malloc(sizeof(int) * (size_t)n);
    res->out_len = calloc((size_t)n, sizeof(int));
    res->out_ids = calloc((size_t)n * (size_t)(maxn ? maxn : 1), sizeof(int32_t));
    res->logprobs = calloc((size_t)n * (size_t)(maxn ? maxn : 1), sizeof(float));
    res->finish = calloc((size_t)n, sizeof(finish_reason));
    res->routing = calloc((size_t)n, sizeof(int32_t *));
    if (!res->prompt_len || !res->out_len || !res->out_ids || !res->logprobs || !res->finish || !res->routing) {
        gen_result_free(res);
        return mill_errf(e, "generate: out of memory");
    }
    for (int i = 0; i < n; i++) {
        res->prompt_len[i] = lens[i];
        res->routing[i] = malloc(sizeof(int32_t) * (size_t)(lens[i] + maxn) * (size_t)per_token);
        if (!res->routing[i]) {
            gen_result_free(res);
            return mill_errf(e, "generate: out of memory");
        }
    }
    return 0;
}

int sample_finished(const sample_params *sp, int32_t tok, int n_out, finish_reason *why) {
    for (int s = 0; s < sp->n_stop; s++)
        if (tok == sp->stop[s]) {
            *why = FINISH_STOP;
            return 1;
        }
    if (n_out == sp->max_new_tokens) {
        *why = FINISH_LENGTH;
        return 1;
    }
    return 0;
}

mill_dtype routing_dtype(int n_experts) { return n_experts <= 256 ? DTYPE_U8 : DTYPE_U16; }

void routing_narrow(const int32_t *src, long n, mill_dtype dt, void *dst) {
    for (long j = 0; j < n; j++) {
        if (dt == DTYPE_U8) ((uint8_t *)dst)[j] = (uint8_t)src[j];
        else ((uint16_t *)dst)[j] = (uint16_t)src[j];
    }
}

/* Records a sampled token; returns 1 when the row is finished (stop id or length). */
static int record_token(gen_result *res, const sample_params *sp, int i, int32_t tok, float lp) {
    int maxn = sp->max_new_tokens;
    res->out_ids[(long)i * maxn + res->out_len[i]] = tok;
    res->logprobs[(long)i * maxn + res->out_len[i]] = lp;
    res->out_len[i]++;
    return sample_finished(sp, tok, res->out_len[i], &res->finish[i]);
}

/* Routing rows were filled at stride prompt + max_new; compact to layers x (prompt + out) x k. */
static void compact_routing(gen_result *res, int L, int K, int maxn) {
    for (int i = 0; i < res->n; i++) {
        int total = res->prompt_len[i] + maxn, len = res->prompt_len[i] + res->out_len[i];
        for (int l = 1; l < L; l++)
            memmove(res->routing[i] + (long)l * len * K, res->routing[i] + (long)l * total * K,
                    sizeof(int32_t) * (size_t)len * K);
    }
}

/* Copies the routing of positions [p0, p1) of batch row b (of Tb tokens, nb rows) into row i's record. */
static void take_routing(gen_result *res, int i, const int32_t *routing, int L, int nb, int Tb, int b, int p0, int p1,
                         int K, int total_len) {
    for (int l = 0; l < L; l++)
        for (int p = p0; p < p1; p++)
            memcpy(res->routing[i] + ((long)l * total_len + p) * K, routing + (((long)l * nb + b) * Tb + p) * K,
                   sizeof(int32_t) * (size_t)K);
}

int generate(const dsv4_model *m, const kctx *k, const int32_t *const *prompts, const int *lens, int n,
             const sample_params *sp, gen_result *res, arena *a, mill_err *e) {
    const dsv4_config *c = &m->cfg;
    int V = c->vocab_size, L = c->num_hidden_layers, K = c->num_experts_per_tok, maxn = sp->max_new_tokens, maxp = 0;
    memset(res, 0, sizeof *res);
    TRY(check_request(lens, n, maxn, &maxp, NULL, e));
    int T = maxp + maxn;
    if (result_alloc(res, n, lens, maxn, L * K, e)) return -1;
    int32_t *seq = malloc(sizeof(int32_t) * (size_t)n * (size_t)T), *batch = malloc(sizeof(int32_t) * (size_t)n * T);
    int *rows = malloc(sizeof(int) * (size_t)n), *done = calloc((size_t)n, sizeof(int));
    float *logits = malloc(sizeof(float) * (size_t)n * (size_t)T * (size_t)V), *work = malloc(sizeof(float) * SAMPLE_WORK_FLOATS(V));
    int32_t *routing = malloc(sizeof(int32_t) * (size_t)L * (size_t)n * (size_t)T * (size_t)K);
    rng *rngs = malloc(sizeof(rng) * (size_t)n);
    int rc = -1;
    if (!seq || !batch || !rows || !done || !logits || !work || !routing || !rngs) {
        mill_errf(e, "generate: out of memory");
        goto out;
    }
    for (int i = 0; i < n; i++) {
        memcpy(seq + (long)i * T, prompts[i], sizeof(int32_t) * (size_t)lens[i]);
        rng_seed(&rngs[i], sp->seed + (uint64_t)i);
    }
    /* Step s feeds each active row its tokens so far; the routing of a row's newest input
     * position(s) is what the engine used for it. One extra pass at the end routes the last
     * sampled tokens, which no step fed in. */
    for (int step = 0; step <= maxn; step++) {
        int nb = 0, Tb = 0;
        for (int i = 0; i < n; i++) {
            int len = lens[i] + res->out_len[i];
            if (done[i] == 2) continue;
            rows[nb++] = i;
            Tb = len > Tb ? len : Tb;
        }
        if (!nb) break;
        for (int b = 0; b < nb; b++) {
            int i = rows[b], len = lens[i] + res->out_len[i];
            for (int t = 0; t < Tb; t++) batch[(long)b * Tb + t] = t < len ? seq[(long)i * T + t] : seq[(long)i * T];
        }
        if (model_forward(m, k, batch, nb, Tb, logits, routing, a, e)) goto out;
        for (int b = 0; b < nb; b++) {
            int i = rows[b], len = lens[i] + res->out_len[i];
            int total = lens[i] + maxn;
            if (step == 0) take_routing(res, i, routing, L, nb, Tb, b, 0, len, K, total);
            else take_routing(res, i, routing, L, nb, Tb, b, len - 1, len, K, total);
            if (done[i]) { /* this pass only routed its last token */
                done[i] = 2;
                continue;
            }
            if (res->out_len[i] == maxn) {
                res->finish[i] = FINISH_LENGTH;
                done[i] = 2;
                continue;
            }
            float lp;
            int32_t tok = sample_token(logits + ((long)b * Tb + len - 1) * V, V, sp, &rngs[i], &lp, work);
            seq[(long)i * T + len] = tok;
            done[i] = record_token(res, sp, i, tok, lp);
        }
    }
    compact_routing(res, L, K, maxn);
    rc = 0;
out:
    free(seq);
    free(batch);
    free(rows);
    free(done);
    free(logits);
    free(work);
    free(routing);
    free(rngs);
    if (rc) gen_result_free(res);
    return rc;
}

int generate_cached(const dsv4_model *m, const kctx *k, const int32_t *const *prompts, const int *lens, int n,
                    const sample_params *sp, size_t budget_bytes, gen_result *res, mill_err *e) {
    engine en;
    memset(res, 0, sizeof *res);
    TRY(engine_init(&en, m, k, budget_bytes, e));
    int rc = generate_engine(&en, prompts, lens, n, sp, res, e);
    engine_free(&en);
    return rc;
}

int generate_follow(engine *en, mill_err *e) {
    for (;;) {
        int op;
        void *cmd;
        size_t n;
        TRY(group_take(en->g, &op, &cmd, &n, e));
        int rc = op == GROUP_STEP ? engine_follow(en, cmd, n, e)
                 : op == GROUP_STOP ? 0
                                    : mill_errf(e, "generate: rank %d: command %d from the leader", en->g->rank, op);
        free(cmd);
        if (rc || op == GROUP_STOP) return rc;
    }
}

int generate_engine(engine *en, const int32_t *const *prompts, const int *lens, int n, const sample_params *sp,
                    gen_result *res, mill_err *e) {
    const dsv4_config *c = &en->m->cfg;
    int L = c->num_hidden_layers, K = c->num_experts_per_tok, maxn = sp->max_new_tokens, total = 0;
    memset(res, 0, sizeof *res);
    TRY(check_request(lens, n, maxn, NULL, &total, e));
    if (result_alloc(res, n, lens, maxn, L * K, e)) return -1;
    engine_seq **seqs = calloc((size_t)n, sizeof *seqs), **act = calloc((size_t)n, sizeof *act);
    const int32_t **toks = calloc((size_t)n, sizeof *toks);
    int *nt = calloc((size_t)n, sizeof(int)), *row = calloc((size_t)n, sizeof(int)), *state = calloc((size_t)n, sizeof(int));
    int32_t *last = calloc((size_t)n, sizeof(int32_t));
    float *lps = malloc(sizeof(float) * (size_t)n);
    int32_t *picks = malloc(sizeof(int32_t) * (size_t)n);
    sample_row *rows = malloc(sizeof(sample_row) * (size_t)n);
    int32_t *routing = malloc(sizeof(int32_t) * (size_t)L * (size_t)(total > n ? total : n) * K);
    rng *rngs = malloc(sizeof(rng) * (size_t)n);
    int rc = -1;
    if (!seqs || !act || !toks || !nt || !row || !state || !last || !lps || !picks || !rows || !routing || !rngs) {
        mill_errf(e, "generate: out of memory");
        goto out;
    }
    for (int i = 0; i < n; i++) {
        if (engine_seq_new(en, lens[i] + maxn, &seqs[i], e)) goto out;
        rng_seed(&rngs[i], sp->seed + (uint64_t)i);
    }
    /* state: 0 generating, 1 finished but its last token not yet routed, 2 done */
    for (int step = 0;; step++) {
        int na = 0;
        for (int i = 0; i < n; i++) {
            if (state[i] == 2) continue;
            act[na] = seqs[i];
            row[na] = i;
            toks[na] = step == 0 ? prompts[i] : &last[i];
            nt[na] = step == 0 ? lens[i] : 1;
            na++;
        }
        if (!na) break;
        int ntot = 0;
        for (int j = 0; j < na; j++) { /* a row that only routes its last token samples greedily, no draw */
            ntot += nt[j];
            int i = row[j];
            rows[j] = state[i] == 1 || (step == 0 && maxn == 0) ? (sample_row){.temperature = 0.0f, .top_p = 1.0f}
                                                                 : sample_draw(sp, &rngs[i]);
        }
        if (engine_step_sample(en, act, toks, nt, na, rows, picks, lps, routing, e)) goto out;
        for (int j = 0, off = 0; j < na; off += nt[j], j++) {
            int i = row[j], p0 = engine_seq_len(act[j]) - nt[j];
            for (int l = 0; l < L; l++)
                memcpy(res->routing[i] + ((long)l * (lens[i] + maxn) + p0) * K, routing + ((long)l * ntot + off) * K,
                       sizeof(int32_t) * (size_t)nt[j] * K);
            if (state[i] == 1 || (step == 0 && maxn == 0)) { /* only routed its last token */
                if (maxn == 0) res->finish[i] = FINISH_LENGTH;
                state[i] = 2;
                continue;
            }
            last[i] = picks[j];
            state[i] = record_token(res, sp, i, last[i], lps[j]);
        }
    }
    compact_routing(res, L, K, maxn);
    rc = 0;
out:
    if (seqs)
        for (int i = 0; i < n; i++) engine_seq_free(en, seqs[i]);
    free(seqs);
    free(act);
    free(toks);
    free(nt);
    free(row);
    free(state);
    free(last);
    free(lps);
    free(picks);
    free(rows);
    free(routing);
    free(rngs);
    if (rc) gen_result_free(res);
    return rc;
}
