/* CPU forward and training (forward + backward) throughput on the tiny golden models (a benchmark: it reports, it never fails
 * on time). Prints tokens/s, achieved GFLOP/s against the dense matmul FLOPs of the model,
 * and the ratio to this machine's measured sgemm peak (the physical floor for our GEMMs).
 * The HF transformers ratio needs the GPU machine: tests/bench/README.md says how. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <omp.h>

#include "kernels/dense.h"

#include "trainer/model.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Per-token matmul FLOPs of the projections (2 * weights touched per token); attention
 * scores and the indexer are excluded, so this understates the work. */
static double flops_per_token(const dsv4_model *m) {
    const dsv4_config *c = &m->cfg;
    double f = 0;
    for (int i = 0; i < m->n_params; i++) {
        const param_info *p = &m->params[i];
        if (p->kind != PARAM_WEIGHT || p->ndim != 2 || strcmp(p->name, "embed.weight") == 0) continue;
        if (strstr(p->name, ".experts.")) f += 2.0 * (double)p->numel * c->num_experts_per_tok / c->n_routed_experts;
        else if (strstr(p->name, ".ape")) continue;
        else f += 2.0 * (double)p->numel;
    }
    return f;
}

/* The GEMM rate our kernels get on a large square problem: the floor for the projections. */
static double sgemm_peak(const kctx *k) {
    int n = 1024;
    mill_err e;
    float *a = calloc((size_t)n * n, 4), *b = calloc((size_t)n * n, 4), *c = calloc((size_t)n * n, 4);
    op_linear(k, c, a, b, n, n, n, 0, 0, 0, &e);
    double t0 = now();
    int reps = 10;
    for (int r = 0; r < reps; r++) op_linear(k, c, a, b, n, n, n, 0, 0, 0, &e);
    double dt = now() - t0;
    free(a);
    free(b);
    free(c);
    return 2.0 * n * n * n * reps / dt;
}

int main(int argc, char **argv) {
    const char *root = argc > 1 ? argv[1] : "tests/data";
    const char *cfgs[] = {"tiny-a", "tiny-b"};
    kctx kc;
    mill_err e0;
    kctx_init(&kc, DEVICE_CPU, &e0);
    double peak = sgemm_peak(&kc);
    printf("sgemm on this machine: %.1f GFLOP/s (1024^3 through op_linear, %d threads)\n", peak / 1e9,
           omp_get_max_threads());
    for (int i = 0; i < 2; i++) {
        char dir[1024];
        snprintf(dir, sizeof dir, "%s/%s", root, cfgs[i]);
        mill_err e = {{0}};
        dsv4_model m;
        if (model_load(&m, dir, &e)) {
            fprintf(stderr, "bench: %s\n", e.msg);
            return 1;
        }
        kctx k;
        arena a;
        kctx_init(&k, DEVICE_CPU, &e);
        arena_init(&a, 1 << 20, &e);
        int B = 4, T = 512, N = B * T;
        int32_t *ids = malloc(sizeof(int32_t) * (size_t)N);
        for (int t = 0; t < N; t++) ids[t] = (int32_t)((t * 7919u + 13u) % (unsigned)m.cfg.vocab_size);
        float *logits = malloc(sizeof(float) * (size_t)N * (size_t)m.cfg.vocab_size);
        if (model_forward(&m, &k, ids, B, T, logits, NULL, &a, &e)) { /* warm-up */
            fprintf(stderr, "bench: %s\n", e.msg);
            return 1;
        }
        int reps = 3;
        double t0 = now();
        for (int r = 0; r < reps; r++) model_forward(&m, &k, ids, B, T, logits, NULL, &a, &e);
        double dt = (now() - t0) / reps, tps = N / dt, gf = flops_per_token(&m) * tps;
        printf("%-7s forward  B=%d T=%d: %8.0f tokens/s  %.2f GFLOP/s of projections = %.3f x sgemm peak  "
               "(activation arena peak %.1f MiB)\n",
               cfgs[i], B, T, tps, gf / 1e9, gf / peak, (double)a.peak / (1 << 20));
        /* training: forward + backward (3x the forward's matmul FLOPs) */
        int32_t *tg = malloc(sizeof(int32_t) * (size_t)N);
        float *grads = calloc(m.n_floats, sizeof(float));
        for (int t = 0; t < N; t++) tg[t] = t % T + 1 < T ? ids[t + 1] : -1;
        model_loss loss;
        if (model_forward_backward(&m, &k, ids, tg, B, T, NULL, grads, &loss, &a, &e)) {
            fprintf(stderr, "bench: %s\n", e.msg);
            return 1;
        }
        t0 = now();
        for (int r = 0; r < reps; r++) model_forward_backward(&m, &k, ids, tg, B, T, NULL, grads, &loss, &a, &e);
        dt = (now() - t0) / reps;
        tps = N / dt;
        gf = 3 * flops_per_token(&m) * tps;
        printf("%-7s train    B=%d T=%d: %8.0f tokens/s  %.2f GFLOP/s of projections = %.3f x sgemm peak  "
               "(activation arena peak %.1f MiB)\n",
               cfgs[i], B, T, tps, gf / 1e9, gf / peak, (double)a.peak / (1 << 20));
        free(tg);
        free(grads);
        free(ids);
        free(logits);
        arena_free(&a);
        model_free(&m);
    }
    return 0;
}
