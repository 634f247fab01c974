/* Cached-engine throughput on the CPU or CUDA (a benchmark: it prints, never fails on time), through
 * the engine API the rollout server uses (engine_init, engine_seq_new, engine_step for prefill, engine_step_sample for decode):
 * prefill tokens/s for 8 prompts of 256 tokens, then for each batch size B: B sequences of P prompt
 * tokens (prefilled untimed), two untimed decode steps (a CUDA graph is captured at the second), then S timed single-token decode steps,
 * teacher-forced (every sequence's next token is fixed, so each run does the same work; each step
 * still samples every sequence at temperature 1 where the logits are, as the server does). Each
 * sequence has its own tokens, so the batch routes like B independent requests.
 *
 * Every decode figure is set against a memory-bandwidth floor: the bytes a decode step must read
 * divided by the memory traffic rate measured here (2 x the rate of one large copy within the
 * device's memory: a copy reads and writes every byte). Bytes read per step:
 *   - every dense, attention, norm, HC and shared-expert weight, the routers and the LM head;
 *   - per MoE layer, the distinct routed experts the batch activates: the EXPECTED count for B
 *     independent tokens, E (1 - (1 - k/E)^B), not a measured one;
 *   - the B tokens' embedding rows (and tid2eid rows on hash layers): negligible;
 *   - per sequence, the cache reads of attention at its current length: the sliding-window ring
 *     (min(length, window) rows), on HCA layers every compressed entry, on CSA layers the indexer
 *     keys of every entry plus the index_topk selected entries, and the open compressor windows,
 *     pooled when a window closes (amortised per token).
 * Floors: what the engine reads today (the headline): on the CPU fp32 weights and cache, on CUDA
 * the weights' bf16 shadow (kctx_shadow_add) and the fp32 cache; and bf16 weights and cache (an
 * ideal engine). Activations and logits are not counted, so every floor is a lower bound on the
 * time.
 *
 * On CUDA it first times op_linear at decode's row counts, the few-row kernel against the cuBLAS
 * path (bench_linear).
 *
 * usage: bench_decode [MODEL_DIR | --model DIR | --config FILE] [--device cpu|cuda]
 *                     [--batches 1,8,32] [--prompt P] [--steps S] [--copy-mib M]
 * Defaults: tests/data/tiny-a on the CPU, batches 1,8,32, P = S = 64; --config builds a randomly
 * initialised model from a config.json (as bench_train does). */
#include <cblas.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_util.h"
#include "kernels/dense.h"
#include "rollout/engine.h"

#define BENCH_MAX_BATCHES 16

static const char *const usage =
    "usage: bench_decode [MODEL_DIR | --model DIR | --config FILE] [--device cpu|cuda] [--batches 1,8,32]\n"
    "                    [--prompt P] [--steps S] [--copy-mib M]\n";

/* Token t of sequence `row`: a fixed hash, so runs repeat and sequences differ. */
static int32_t bench_token(int row, int t, int V) {
    uint64_t x = ((uint64_t)(unsigned)row << 32 | (unsigned)t) + 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return (int32_t)((x ^ (x >> 31)) % (uint64_t)V);
}

/* The weights of a model split by how a decode step reads them (element counts). */
typedef struct {
    double dense;      /* read whole every step (routers, shared experts and LM head included) */
    double experts;    /* all routed experts of all MoE layers */
    double embed_row;  /* one embedding row */
    int hash_layers, E, k, V;
} weight_split;

static weight_split split_weights(const dsv4_model *m) {
    const dsv4_config *c = &m->cfg;
    weight_split w = {0};
    w.E = c->n_routed_experts;
    w.k = c->num_experts_per_tok;
    w.V = c->vocab_size;
    w.hash_layers = c->num_hash_layers;
    w.embed_row = c->hidden_size;
    for (int i = 0; i < m->n_params; i++) {
        const param_info *p = &m->params[i];
        if (p->kind == PARAM_INDEX) continue; /* tid2eid: B rows, counted in weight_bytes */
        if (!strcmp(p->name, "embed.weight") && !c->tie_word_embeddings) continue; /* B rows */
        if (strstr(p->name, ".ffn.experts.")) w.experts += (double)p->numel;
        else w.dense += (double)p->numel;
    }
    return w;
}

/* Expected distinct experts of E that B independent tokens with k distinct experts each activate. */
static double distinct_experts(const weight_split *w, int B) {
    if (w->k >= w->E) return w->E;
    return w->E * (1.0 - pow(1.0 - (double)w->k / w->E, B));
}

/* Bytes of weights one decode step of B tokens reads, elements stored in `bpe` bytes. */
static double weight_bytes(const weight_split *w, int B, double bpe) {
    double rows = B < w->V ? B : w->V;
    return bpe * (w->dense + w->experts * distinct_experts(w, B) / w->E + rows * w->embed_row) +
           4.0 * B * w->k * w->hash_layers;
}

/* Cache floats attention reads for one token of a sequence that holds len tokens (this one included). */
static double cache_floats_read(const dsv4_config *c, int len) {
    int d = c->head_dim, ih = c->index_head_dim, W = c->sliding_window;
    double f = 0;
    for (int l = 0; l < c->num_hidden_layers; l++) {
        int r = c->compress_ratios[l], csa = r == ATTN_CSA;
        f += (double)(len < W ? len : W) * d; /* ring: keys = values, read once */
        if (!r) continue;
        int ne = len / r, width = csa ? 2 * d : d;
        f += (csa ? 2.0 : 1.0) * 2.0 * width; /* kv and gate window rows pooled, per token */
        if (csa) f += (double)ne * ih + (double)(ne < c->index_topk ? ne : c->index_topk) * d + 2.0 * 2.0 * 2 * ih;
        else f += (double)ne * d;
    }
    return f;
}

static int parse_batches(const char *s, int *out, int *n) {
    *n = 0;
    for (const char *p = s; *p;) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 1 || v > 65536 || *n == BENCH_MAX_BATCHES || (*end && *end != ',')) return -1;
        out[(*n)++] = (int)v;
        p = *end ? end + 1 : end;
    }
    return *n ? 0 : -1;
}

/* The re-forward path for scale (CPU only): one full forward at length T for the whole batch. */
static int reforward_rate(const dsv4_model *m, const kctx *k, int B, int T, double *tok_s, mill_err *e) {
    int V = m->cfg.vocab_size, rc = -1;
    arena a = {0};
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)B * T);
    float *fl = malloc(sizeof(float) * (size_t)B * T * V);
    if (!ids || !fl) {
        mill_errf(e, "bench: out of memory for the re-forward");
        goto out;
    }
    for (int i = 0; i < B; i++)
        for (int t = 0; t < T; t++) ids[(size_t)i * T + t] = bench_token(i, t, V);
    if (arena_init(&a, 1 << 20, e)) goto out;
    double t0 = bench_now();
    if (model_forward(m, k, ids, B, T, fl, NULL, &a, e)) goto out;
    *tok_s = B / (bench_now() - t0);
    rc = 0;
out:
    free(ids);
    free(fl);
    arena_free(&a);
    return rc;
}

typedef struct {
    const dsv4_model *m;
    const kctx *k;
    engine *en;
    weight_split ws;
    double traffic; /* bytes/s of memory traffic: 2 x the measured copy rate */
    int P, S, gpu;
} bench_ctx;

/* B sequences' decode rate; graphs = 0: every step op by op (CUDA), for the graphs' ratio. */
static int bench_batch(const bench_ctx *bc, int B, int graphs, mill_err *e) {
    const dsv4_config *c = &bc->m->cfg;
    int V = c->vocab_size, P = bc->P, S = bc->S, len = P + 2 + S, rc = -1;
    engine_seq **s = calloc((size_t)B, sizeof *s);
    const int32_t **tp = calloc((size_t)B, sizeof *tp);
    int *nt = calloc((size_t)B, sizeof(int));
    int32_t *toks = malloc(sizeof(int32_t) * (size_t)B * len);
    sample_row *rows = malloc(sizeof(sample_row) * (size_t)B);
    int32_t *pick = malloc(sizeof(int32_t) * (size_t)B);
    float *lp = malloc(sizeof(float) * (size_t)B);
    if (!s || !tp || !nt || !toks || !rows || !pick || !lp) {
        mill_errf(e, "bench: out of memory for batch %d", B);
        goto out;
    }
    for (int i = 0; i < B; i++)
        for (int t = 0; t < len; t++) toks[(size_t)i * len + t] = bench_token(i, t, V);
    for (int i = 0; i < B; i++) {
        if (engine_seq_new(bc->en, len, &s[i], e)) goto out;
        tp[i] = toks + (size_t)i * len;
        nt[i] = P;
    }
    if (engine_step(bc->en, s, tp, nt, B, NULL, 0, NULL, e)) goto out; /* prefill, untimed, no logits */
    bc->en->graphs = graphs;
    long g0 = bc->en->graph_steps;
    double t0 = 0;
    for (int st = -2; st < S; st++) { /* two untimed decode steps: a graph is captured at the second */
        if (st == 0) {
#ifdef MILL_CUDA
            if (!graphs) kprof_reset(bc->k); /* MILL_PROFILE=1: the table shows op-by-op decode steps only */
#endif
            t0 = bench_now();
        }
        for (int i = 0; i < B; i++) {
            tp[i] = toks + (size_t)i * len + P + 2 + st;
            nt[i] = 1;
        }
        for (int i = 0; i < B; i++) /* what the rollout server does: sample at T = 1 where the logits are */
            rows[i] = (sample_row){.temperature = 1.0f, .top_p = 1.0f, .top_k = 0, .u = 0.5f};
        if (engine_step_sample(bc->en, s, tp, nt, B, rows, pick, lp, NULL, e)) goto out; /* waits for the device */
    }
    double dt = bench_now() - t0, tok_s = (double)B * S / dt;
    if (!graphs) {
        printf("decode B=%d op by op (no CUDA graphs): %.1f tok/s, %.2f ms/step\n", B, tok_s, 1e3 * dt / S);
        rc = 0;
        goto out;
    }
    /* floors: S steps of weight reads plus each sequence's cache reads at its length then */
    double cache_f = 0;
    for (int st = 0; st < S; st++) cache_f += cache_floats_read(c, P + 3 + st);
    double w32 = weight_bytes(&bc->ws, B, bc->gpu ? 2 : 4), w16 = weight_bytes(&bc->ws, B, 2);
    double f32 = (double)B * S * bc->traffic / (S * w32 + 4.0 * B * cache_f);
    double f16 = (double)B * S * bc->traffic / (S * w16 + 2.0 * B * cache_f);
    printf("decode B=%d: %.1f tok/s, floor %.1f tok/s (fraction %.3f)%s\n", B, tok_s, f32, tok_s / f32,
           bc->en->graph_steps - g0 >= S ? " (CUDA graphs)" : "");
    printf("  %.2f ms/step; bytes read per step (weights in %s, cache in fp32): weights %.1f MiB (%.2f of %d routed "
           "experts per MoE layer, "
           "expected E(1-(1-k/E)^B)), cache %.2f MiB (%d sequences, mean length %.0f; %.2f MiB allocated each); "
           "bf16 floor %.0f tok/s (fraction %.3f)\n",
           1e3 * dt / S, bc->gpu ? "bf16" : "fp32", w32 / (1 << 20), distinct_experts(&bc->ws, B), bc->ws.E,
           4.0 * B * cache_f / S / (1 << 20), B,
           P + 3 + (S - 1) / 2.0, (double)engine_seq_bytes(bc->en, len) / (1 << 20), f16, tok_s / f16);
    if (!bc->gpu && (double)B * len * V * sizeof(float) <= (double)(1u << 30)) {
        double re;
        if (reforward_rate(bc->m, bc->k, B, len, &re, e)) goto out;
        printf("  re-forward path at this length: %.3g tokens/s\n", re);
    }
    rc = 0;
out:
    for (int i = 0; i < B && s; i++) engine_seq_free(bc->en, s[i]);
    free(s);
    free(tp);
    free(nt);
    free(toks);
    free(rows);
    free(pick);
    free(lp);
    return rc;
}

/* CUDA: op_linear at decode's row counts (M = 1, 8, 32; N = K = 1024, and N = 32768, K = 1024 as an
 * LM head), through the few-row kernel (cu_skinny_linear) and through the cuBLAS path
 * (kctx.linear_cublas, which MILL_SKINNY=0 sets for a whole run), each timed as a CUDA graph of 64
 * calls replayed 10 times after one untimed replay (the engine replays its decode step as a graph).
 * w is a registered buffer with a bf16 shadow, like a model's weights: 128 MiB of bf16, and the
 * calls cycle through it, so they read more weight than L2 holds (as a decode step's ~185 distinct
 * weights do). GB/s: bf16 weight bytes per second, then that over the memory traffic rate (2 x the
 * copy rate): 1.00 would be a read at full bandwidth. Skipped under MILL_PROFILE (its syncs would
 * break the capture). */
static int bench_linear(kctx *k, double traffic, mill_err *e) {
    enum { CALLS = 64, REPS = 10, KD = 1024, ROWS = 65536 };
    static const int Ms[] = {1, 8, 32}, Ns[] = {1024, 32768};
    if (k->prof || !kctx_graphs(k)) return 0;
    float *w = mem_alloc_copy(k->device, NULL, sizeof(float) * (size_t)ROWS * KD, e);
    float *x = w ? mem_alloc_copy(k->device, NULL, sizeof(float) * 32 * KD, e) : NULL;
    float *y = x ? mem_alloc_copy(k->device, NULL, sizeof(float) * 32 * 32768, e) : NULL;
    int rc = !y || kctx_shadow_add(k, w, (size_t)ROWS * KD, e) ? -1 : 0, was = k->linear_cublas;
    for (size_t ni = 0; !rc && ni < sizeof Ns / sizeof *Ns; ni++)
        for (size_t mi = 0; !rc && mi < sizeof Ms / sizeof *Ms; mi++) {
            int M = Ms[mi], N = Ns[ni], slices = ROWS / N;
            double us[2] = {0, 0};
            for (int path = 0; !rc && path < 2; path++) {
                k->linear_cublas = path; /* 0: the few-row kernel, 1: cuBLAS */
                void *g = NULL;
                rc = kctx_graph_begin(k, e);
                for (int c = 0; !rc && c < CALLS; c++)
                    rc = op_linear(k, y, x, w + (size_t)(c % slices) * N * KD, M, N, KD, 0, 0, 0, e);
                mill_err ge;
                if (kctx_graph_end(k, &g, rc ? &ge : e)) rc = -1; /* ends the capture even after a failure */
                if (!rc) rc = kctx_graph_launch(k, g, e) || kctx_sync(k, e); /* untimed */
                double t0 = bench_now();
                for (int it = 0; !rc && it < REPS; it++) rc = kctx_graph_launch(k, g, e);
                if (!rc) rc = kctx_sync(k, e);
                us[path] = (bench_now() - t0) * 1e6 / ((double)REPS * CALLS);
                kctx_graph_free(g);
            }
            if (rc) break;
            double gb = 2.0 * N * KD / 1e3; /* bf16 weight bytes / 1e9 per microsecond */
            printf("op_linear M=%d N=%d K=%d: few-row kernel %.2f us/call (%.0f GB/s of bf16 weights, %.2f of the "
                   "memory rate), cuBLAS path %.2f us/call (%.0f GB/s, %.2f)\n",
                   M, N, KD, us[0], gb / us[0], gb / us[0] * 1e9 / traffic, us[1], gb / us[1],
                   gb / us[1] * 1e9 / traffic);
        }
    k->linear_cublas = was;
    kctx_shadow_remove(k, w);
    mem_free(k->device, y);
    mem_free(k->device, x);
    mem_free(k->device, w);
    fflush(stdout);
    return rc;
}

int main(int argc, char **argv) {
    const char *dir = "tests/data/tiny-a", *cfgp = NULL, *dev = bench_arg(argc, argv, "--device", "cpu");
    int batches[BENCH_MAX_BATCHES], nb = 0;
    for (int i = 1; i < argc; i++) { /* flags take one value; a bare argument is the model directory */
        static const char *const known[] = {"--device", "--config", "--model", "--batches", "--prompt", "--steps", "--copy-mib"};
        int ok = argv[i][0] != '-';
        for (size_t j = 0; !ok && j < sizeof known / sizeof *known; j++) ok = !strcmp(argv[i], known[j]) && i + 1 < argc;
        if (!ok) {
            fprintf(stderr, "bench_decode: bad argument \"%s\"\n%s", argv[i], usage);
            return 2;
        }
        if (argv[i][0] != '-') dir = argv[i];
        else i++;
    }
    dir = bench_arg(argc, argv, "--model", dir);
    cfgp = bench_arg(argc, argv, "--config", NULL);
    int gpu = !strcmp(dev, "cuda"), P = atoi(bench_arg(argc, argv, "--prompt", "64")),
        S = atoi(bench_arg(argc, argv, "--steps", "64")), mib = atoi(bench_arg(argc, argv, "--copy-mib", gpu ? "1024" : "256"));
    if ((!gpu && strcmp(dev, "cpu")) || P < 1 || S < 1 || mib < 1 ||
        parse_batches(bench_arg(argc, argv, "--batches", "1,8,32"), batches, &nb)) {
        fprintf(stderr, "%s", usage);
        return 2;
    }
    mill_err e = {{0}};
    dsv4_model host, dm = {0};
    const dsv4_model *m = &host;
    kctx k = {0};
    engine en = {0};
    int have_host = 0, have_engine = 0, rc = 1;
    const char *what = cfgp ? cfgp : dir;
    if (kctx_init(&k, gpu ? DEVICE_CUDA : DEVICE_CPU, &e)) goto done; /* first: no device fails fast */
    if (cfgp) {
        dsv4_config cfg;
        if (config_load(cfgp, &cfg, &e) || model_init(&host, &cfg, &e)) goto done;
        model_init_random(&host, 1, 0.02f);
    } else if (model_load(&host, dir, &e)) {
        goto done;
    }
    have_host = 1;
    if (gpu) { /* the engine runs on the model's device copy, as launch/main.c's model_on does */
        if (model_to_device(&dm, &host, &k, &e)) goto done;
        m = &dm;
    }
    bench_ctx bc = {m, &k, &en, split_weights(m), 0, P, S, gpu};
    double rate = 0;
    if (bench_copy_rate(k.device, (size_t)mib << 20, 5, &rate, &e)) goto done;
    bc.traffic = 2 * rate;
    char desc[256];
    snprintf(desc, sizeof desc, "CPU, OpenBLAS %s kernels, op_linear in %s of %d rows", openblas_get_corename(),
             k.gemm_batch ? "blocks" : "calls", k.gemm_rows);
#ifdef MILL_CUDA
    if (gpu && cuda_device_describe(desc, sizeof desc, &e)) goto done;
#endif
    printf("%s on %s (%s): %.1f M parameters; %s copy of %d MiB: %.1f GB/s copied = %.1f GB/s read + written "
           "(the floors' rate)\n",
           what, dev, desc, host.n_floats / 1e6, gpu ? "cudaMemcpy device-to-device" : "memcpy", mib, rate / 1e9,
           bc.traffic / 1e9);
    if (gpu && bench_linear(&k, bc.traffic, &e)) goto done;
    /* a budget that admits the largest phase: 8 prefill sequences, or the largest batch */
    int maxB = 8;
    for (int i = 0; i < nb; i++) maxB = batches[i] > maxB ? batches[i] : maxB;
    if (engine_init(&en, m, &k, 1 << 20, &e)) goto done;
    size_t need8 = 8 * engine_seq_bytes(&en, 256), needB = (size_t)maxB * engine_seq_bytes(&en, P + 1 + S);
    engine_free(&en);
    if (engine_init(&en, m, &k, (need8 > needB ? need8 : needB) + (1 << 20), &e)) goto done;
    have_engine = 1;
    { /* prefill: 8 prompts of 256 tokens with every position's logits (also the warm-up) */
        int V = m->cfg.vocab_size;
        engine_seq *s[8] = {0};
        const int32_t *tp[8];
        int nt[8], ok = 1;
        int32_t *toks = malloc(sizeof(int32_t) * 8 * 256);
        float *logits = malloc(sizeof(float) * (size_t)8 * 256 * V);
        if (!toks || !logits) ok = !mill_errf(&e, "bench: out of memory for the prefill");
        for (int i = 0; ok && i < 8 * 256; i++) toks[i] = bench_token(i / 256, i % 256, V);
        for (int i = 0; ok && i < 8; i++) {
            ok = !engine_seq_new(&en, 256, &s[i], &e);
            tp[i] = toks + i * 256;
            nt[i] = 256;
        }
        double t0 = bench_now();
        if (ok && !engine_step(&en, s, tp, nt, 8, logits, 0, NULL, &e))
            printf("prefill 8 x 256 tokens: %.0f tokens/s\n", 8 * 256 / (bench_now() - t0));
        else ok = 0;
        for (int i = 0; i < 8; i++) engine_seq_free(&en, s[i]);
        free(toks);
        free(logits);
        if (!ok) goto done;
    }
    printf("decode: P = %d prompt tokens, 2 untimed + %d timed steps per batch\n", P, S);
    fflush(stdout); /* partial results survive a timeout (gpu_bench.sh) */
    for (int i = 0; i < nb; i++) {
        if (bench_batch(&bc, batches[i], 1, &e) || (gpu && bench_batch(&bc, batches[i], 0, &e))) goto done;
        fflush(stdout);
    }
    rc = 0;
done:
    if (rc) fprintf(stderr, "bench_decode: %s\n", e.msg);
    if (have_engine) engine_free(&en);
    model_free(&dm);
    if (have_host) model_free(&host);
    kctx_free(&k);
    return rc;
}
