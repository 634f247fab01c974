/* Cached-engine throughput on CPU (a benchmark: it prints, never fails on time): prefill tokens/s
 * for a batch of 8 prompts of 256 tokens, and decode tokens/s at batch 1, 8 and 32 (each sequence
 * 64 prompt tokens, then 64 single-token steps), with the recompute path's decode rate beside it
 * for scale. Usage: bench_decode [MODEL_DIR] (default tests/data/tiny-a). */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "rollout/engine.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : "tests/data/tiny-a";
    mill_err e = {{0}};
    dsv4_model m;
    if (model_load(&m, dir, &e)) {
        fprintf(stderr, "bench: %s\n", e.msg);
        return 1;
    }
    kctx k;
    kctx_init(&k, DEVICE_CPU, &e);
    int V = m.cfg.vocab_size, P = 64, steps = 64, batches[3] = {1, 8, 32};
    float *logits = malloc(sizeof(float) * (size_t)8 * 256 * V);
    int32_t *toks = malloc(sizeof(int32_t) * 8 * 256);
    for (int i = 0; i < 8 * 256; i++) toks[i] = (int32_t)((i * 7919u + 13u) % (unsigned)V);
    engine en;
    engine_init(&en, &m, &k, (size_t)4 << 30, &e);
    { /* prefill */
        engine_seq *s[8];
        const int32_t *tp[8];
        int nt[8];
        for (int i = 0; i < 8; i++) {
            engine_seq_new(&en, 256, &s[i], &e);
            tp[i] = toks + i * 256;
            nt[i] = 256;
        }
        double t0 = now();
        if (engine_step(&en, s, tp, nt, 8, logits, NULL, &e)) {
            fprintf(stderr, "bench: %s\n", e.msg);
            return 1;
        }
        printf("%s prefill 8 x 256 tokens: %.0f tokens/s\n", dir, 8 * 256 / (now() - t0));
        for (int i = 0; i < 8; i++) engine_seq_free(&en, s[i]);
    }
    for (int bi = 0; bi < 3; bi++) {
        int B = batches[bi];
        engine_seq **s = malloc(sizeof *s * (size_t)B);
        const int32_t **tp = malloc(sizeof *tp * (size_t)B);
        int *nt = malloc(sizeof(int) * (size_t)B);
        float *lg = malloc(sizeof(float) * (size_t)B * P * V);
        for (int i = 0; i < B; i++) {
            engine_seq_new(&en, P + steps, &s[i], &e);
            tp[i] = toks + (i % 8) * 256;
            nt[i] = P;
        }
        engine_step(&en, s, tp, nt, B, lg, NULL, &e);
        double t0 = now();
        for (int st = 0; st < steps; st++) {
            for (int i = 0; i < B; i++) {
                tp[i] = toks + (i % 8) * 256 + P + st; /* teacher-forced next token */
                nt[i] = 1;
            }
            if (engine_step(&en, s, tp, nt, B, lg, NULL, &e)) {
                fprintf(stderr, "bench: %s\n", e.msg);
                return 1;
            }
        }
        double dt = now() - t0;
        /* the re-forward path for scale: one step at length P + steps for the whole batch */
        arena a;
        arena_init(&a, 1 << 20, &e);
        int32_t *ids = malloc(sizeof(int32_t) * (size_t)B * (P + steps));
        float *fl = malloc(sizeof(float) * (size_t)B * (P + steps) * V);
        for (int i = 0; i < B; i++)
            for (int t = 0; t < P + steps; t++) ids[i * (P + steps) + t] = toks[(i % 8) * 256 + t];
        double t1 = now();
        model_forward(&m, &k, ids, B, P + steps, fl, NULL, &a, &e);
        double re = now() - t1;
        printf("%s decode batch %2d: %8.0f tokens/s (%.2f ms per step); re-forward path at this length: %.0f tokens/s\n",
               dir, B, B * steps / dt, 1e3 * dt / steps, B / re);
        for (int i = 0; i < B; i++) engine_seq_free(&en, s[i]);
        free(s);
        free(tp);
        free(nt);
        free(lg);
        free(ids);
        free(fl);
        arena_free(&a);
    }
    engine_free(&en);
    free(logits);
    free(toks);
    model_free(&m);
    return 0;
}
