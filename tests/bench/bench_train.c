/* Training-step throughput of one model on one device (a benchmark: it reports, it never fails on
 * time). A step is forward + backward (mean cross-entropy) + AdamW on the fp32 master weights.
 * Prints tokens/s, model FLOPs per token (6 x the active projection weights, attention scores
 * excluded, so it understates the work), and the model-FLOPs utilisation against the GEMM rate
 * measured through op_linear on the same device in the same run (bf16 tensor cores on CUDA, fp32
 * sgemm on the CPU). HF transformers' rate on the same config and batch comes from hf_train.py
 * in the same device call (tests/bench/README.md).
 *
 * usage: bench_train [--device cpu|cuda] [--config configs/models/NAME.json] [--batch B] [--seq T]
 *                    [--reps R] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/dense.h"
#include "trainer/model.h"
#include "trainer/optimizer.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* 6 x the projection weights a token touches (routed experts at k of E), embedding excluded. */
static double flops_per_token(const dsv4_model *m) {
    const dsv4_config *c = &m->cfg;
    double f = 0;
    for (int i = 0; i < m->n_params; i++) {
        const param_info *p = &m->params[i];
        if (p->kind != PARAM_WEIGHT || p->ndim < 2 || !strcmp(p->name, "embed.weight") || strstr(p->name, ".ape"))
            continue;
        double share = strstr(p->name, ".experts.") ? (double)c->num_experts_per_tok / c->n_routed_experts : 1.0;
        f += 6.0 * (double)p->numel * share;
    }
    return f;
}

/* The GEMM rate op_linear reaches on a large square problem: the ceiling for the projections. */
static int gemm_peak(const kctx *k, int n, double *flops, mill_err *e) {
    size_t bytes = sizeof(float) * (size_t)n * n;
    float *a = mem_alloc_copy(k->device, NULL, bytes, e), *b = a ? mem_alloc_copy(k->device, NULL, bytes, e) : NULL;
    float *c = b ? mem_alloc_copy(k->device, NULL, bytes, e) : NULL;
    int rc = -1, reps = 10;
    float sync;
    if (!c || op_linear(k, c, a, b, n, n, n, 0, 0, 0, e)) goto out;
    double t0 = now();
    for (int r = 0; r < reps; r++)
        if (op_linear(k, c, a, b, n, n, n, 0, 0, 0, e)) goto out;
    if (op_copy_to_host(k, &sync, c, sizeof sync, e)) goto out; /* waits for the device */
    *flops = 2.0 * n * n * (double)n * reps / (now() - t0);
    rc = 0;
out:
    mem_free(k->device, a);
    mem_free(k->device, b);
    mem_free(k->device, c);
    return rc;
}

static const char *arg(int argc, char **argv, const char *name, const char *def) {
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], name)) return argv[i + 1];
    return def;
}

int main(int argc, char **argv) {
    const char *dev = arg(argc, argv, "--device", "cpu"), *cfgp = arg(argc, argv, "--config", "configs/models/dsv4-tiny.json");
    int B = atoi(arg(argc, argv, "--batch", "4")), T = atoi(arg(argc, argv, "--seq", "512"));
    int reps = atoi(arg(argc, argv, "--reps", "3")), N = B * T;
    mill_err e = {{0}};
    dsv4_config cfg;
    dsv4_model host, dm, *m = &host;
    optimizer hopt, dopt, *opt = &hopt;
    optim_config oc;
    kctx k;
    arena a = {0};
    int gpu = !strcmp(dev, "cuda");
    if (B < 1 || T < 2 || reps < 1 || (strcmp(dev, "cpu") && !gpu)) {
        fprintf(stderr, "usage: bench_train [--device cpu|cuda] [--config FILE] [--batch B] [--seq T] [--reps R]\n");
        return 2;
    }
    optim_config_default(&oc);
    if (config_load(cfgp, &cfg, &e) || kctx_init(&k, gpu ? DEVICE_CUDA : DEVICE_CPU, &e) || model_init(&host, &cfg, &e))
        goto fail;
    model_init_random(&host, 1, 0.02f);
    if (optimizer_init(&hopt, &host, &oc, &e)) goto fail;
    if (gpu) {
        if (model_to_device(&dm, &host, &k, &e) || optimizer_to_device(&dopt, &hopt, &k, &e)) goto fail;
        m = &dm;
        opt = &dopt;
    }
    double peak;
    if (gemm_peak(&k, gpu ? 8192 : 1024, &peak, &e)) goto fail;
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)N), *tg = malloc(sizeof(int32_t) * (size_t)N);
    float *grads = mem_alloc_copy(k.device, NULL, sizeof(float) * m->n_floats, &e);
    if (!ids || !tg || !grads || arena_init_device(&a, 16 << 20, k.device, k.stream, &e)) goto fail;
    for (int t = 0; t < N; t++) ids[t] = (int32_t)((t * 7919u + 13u) % (unsigned)cfg.vocab_size);
    for (int t = 0; t < N; t++) tg[t] = t % T + 1 < T ? ids[t + 1] : -1;
    double fpt = flops_per_token(m), t0 = 0, gn, lr;
    model_loss loss;
    for (int r = -1; r < reps; r++) { /* r = -1: warm-up */
        if (r == 0) t0 = now();
        if (op_zero(&k, grads, sizeof(float) * m->n_floats, &e) ||
            model_forward_backward(m, &k, ids, tg, B, T, NULL, grads, &loss, &a, &e) ||
            optimizer_step(opt, m, &k, grads, &gn, &lr, &e))
            goto fail;
    }
    float sync;
    if (op_copy_to_host(&k, &sync, m->data, sizeof sync, &e)) goto fail;
    double dt = (now() - t0) / reps, tps = N / dt;
    printf("%s on %s: %.2f M parameters; GEMM through op_linear %.4g GFLOP/s\n", cfgp, dev, host.n_floats / 1e6,
           peak / 1e9);
    printf("mill train step B=%d T=%d: %.0f tokens/s, %.3f s/step, loss %.4f; %.4g MFLOP/token x tokens/s = "
           "%.4g GFLOP/s = MFU %.3f of the measured GEMM rate (activation arena peak %.1f MiB)\n",
           B, T, tps, dt, loss.loss, fpt / 1e6, fpt * tps / 1e9, fpt * tps / peak, (double)a.peak / (1 << 20));
    free(ids);
    free(tg);
    mem_free(k.device, grads);
    arena_free(&a);
    if (gpu) {
        optimizer_free(&dopt);
        model_free(&dm);
    }
    optimizer_free(&hopt);
    model_free(&host);
    kctx_free(&k);
    return 0;
fail:
    fprintf(stderr, "bench_train: %s\n", e.msg);
    return 1;
}
