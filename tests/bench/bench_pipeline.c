/* The pipeline schedule's bubble (a benchmark: it reports, it never fails on time). Run as pp
 * ranks: `mpiexec -n P bench_pipeline [--config configs/models/dsv4-tiny.json] [--batch B]
 * [--seq T] [--micro M] [--vpp V] [--reps R]`. Each rank holds one stage of a random model (V chunks
 * of it with --vpp: the interleaved schedule) and runs R training steps (forward + backward of B rows
 * in M micro-batches by 1F1B, dist_ce_step). The bubble a stage sees is the share of the step it
 * spends waiting at its boundaries (the time inside its sends and receives, transfers included);
 * the theory is (P - 1) / (V M + P - 1) when every stage does the same work (V = 1: 1F1B's
 * (P - 1) / (M + P - 1); the interleaved schedule divides the bubble's time by V). Printed per stage and averaged, beside the theory. Ranks that share cores (more ranks
 * than cores) wait for the CPU too: their figures overstate the bubble. */
#include <stdio.h>
#include <stdlib.h>

#include "bench_util.h"
#include "common/rng.h"
#include "kernels/dense.h"
#include "trainer/dist.h"

int main(int argc, char **argv) {
    mill_err e = {{0}};
    comm *world = NULL;
    if (comm_world_init(&world, &e)) {
        fprintf(stderr, "bench_pipeline: %s\n", e.msg);
        return 1;
    }
    const char *cfgp = bench_arg(argc, argv, "--config", "configs/models/dsv4-tiny.json");
    int B = atoi(bench_arg(argc, argv, "--batch", "16")), T = atoi(bench_arg(argc, argv, "--seq", "64"));
    int M = atoi(bench_arg(argc, argv, "--micro", "8")), reps = atoi(bench_arg(argc, argv, "--reps", "3"));
    int V = atoi(bench_arg(argc, argv, "--vpp", "1"));
    int P = world->size, rc = 1;
    dsv4_config cfg;
    dsv4_model m = {0};
    kctx k = {0};
    dist_ctx d = {0};
    arena *arenas = calloc((size_t)(M > 0 && V > 0 ? M * V : 1), sizeof *arenas);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)B * T), *tg = malloc(sizeof(int32_t) * (size_t)B * T);
    float *grads = NULL;
    double *idle = calloc((size_t)P, sizeof(double));
    par_sizes ps = par_sizes_one();
    ps.pp = P;
    ps.vpp = V;
    if (!arenas || !ids || !tg || !idle || M < 1 || M > B || B < 1 || T < 2 || V < 1) {
        mill_errf(&e, "bad sizes (need 1 <= micro <= batch, seq >= 2, vpp >= 1) or out of memory");
        goto out;
    }
    if (config_load(cfgp, &cfg, &e) || kctx_init(&k, DEVICE_CPU, &e) || dist_init(&d, world, &ps, &cfg, 0, &k, &e) ||
        model_init_stage(&m, &cfg, d.stage, &e))
        goto out;
    model_init_random(&m, 1, 0.02f);
    rng g;
    rng_seed(&g, 7);
    for (long i = 0; i < (long)B * T; i++) ids[i] = (int32_t)rng_below(&g, (uint64_t)cfg.vocab_size);
    for (long i = 0; i < (long)B * T; i++) tg[i] = (i + 1) % T ? ids[i + 1] : -1;
    if (!(grads = calloc(m.n_floats ? m.n_floats : 1, sizeof(float)))) {
        mill_errf(&e, "out of memory");
        goto out;
    }
    for (int i = 0; i < M * V; i++)
        if (arena_init_device(&arenas[i], 16 << 20, DEVICE_CPU, NULL, &e)) goto out;
    double step = 0, wait = 0;
    for (int r = 0; r <= reps; r++) { /* the first step warms up */
        model_loss loss;
        d.t_wait = 0;
        double t0 = bench_now();
        if (dist_ce_step(&d, &m, &k, ids, tg, B, T, M, grads, &loss, arenas, &e)) goto out;
        double dt = bench_now() - t0;
        if (comm_max_f64(world, &dt, 1, &e)) goto out;
        if (r) step += dt, wait += d.t_wait;
    }
    idle[d.par.pp_rank] = wait / step;
    if (comm_sum_f64(world, idle, P, &e)) goto out;
    if (world->rank == 0) {
        double mean = 0, theory = (double)(P - 1) / ((double)V * M + P - 1);
        printf("bench_pipeline: %s, %d stages x %d chunks (layers split by par_stage_layers), batch %d x %d in %d "
               "micro-batches, %s, CPU, %d reps\n", cfgp, P, V, B, T, M, V > 1 ? "interleaved 1F1B" : "1F1B", reps);
        printf("| stage | bubble (waiting share of the step) |\n|---|---|\n");
        for (int s = 0; s < P; s++) {
            printf("| %d | %.3f |\n", s, idle[s]);
            mean += idle[s] / P;
        }
        printf("step %.1f ms; mean bubble %.3f against the theory (P - 1) / (V M + P - 1) = %.3f (ratio %.2f)\n",
               1e3 * step / reps, mean, theory, theory > 0 ? mean / theory : 0);
    }
    rc = 0;
out:
    if (rc) fprintf(stderr, "bench_pipeline: rank %d: %s\n", world->rank, e.msg);
    for (int i = 0; arenas && i < M * V; i++) arena_free(&arenas[i]);
    free(arenas);
    free(ids);
    free(tg);
    free(grads);
    free(idle);
    model_free(&m);
    dist_free(&d);
    kctx_free(&k);
    comm_world_end(world, rc);
    return rc;
}
