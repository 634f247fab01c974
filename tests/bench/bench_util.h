/* tests/bench/bench_util.h — small helpers the benchmarks share (header only: each bench is one
 * executable). Owns: the clock, flag lookup, and the measured copy rate that the memory-bound
 * floors divide by. */
#ifndef MILL_BENCH_UTIL_H
#define MILL_BENCH_UTIL_H

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/err.h"
#include "common/tensor.h"
#ifdef MILL_CUDA
#include "common/cuda_util.h"
#endif

static inline double bench_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* The value after flag `name`, or def. */
static inline const char *bench_arg(int argc, char **argv, const char *name, const char *def) {
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], name)) return argv[i + 1];
    return def;
}

/* Bytes copied per second by one copy of `bytes` within the device's memory (cudaMemcpy
 * device-to-device timed with events on CUDA; memcpy on the CPU), the mean of reps after one
 * untimed copy. A copy reads and writes every byte, so the memory traffic it sustains is twice this
 * rate: the floors for read-dominated work (decode) divide by 2 x rate, those for copies (weight
 * refresh) by the rate itself. */
static inline int bench_copy_rate(mill_device dev, size_t bytes, int reps, double *bytes_per_s, mill_err *e) {
    double sec = 0;
    if (dev == DEVICE_CUDA) {
#ifdef MILL_CUDA
        if (cuda_time_d2d_copy(bytes, reps, &sec, e)) return -1;
#else
        return mill_errf(e, "this mill was built without CUDA (nvcc not found at configure time)");
#endif
    } else {
        char *src = malloc(bytes), *dst = malloc(bytes);
        if (!src || !dst) {
            free(src);
            free(dst);
            return mill_errf(e, "bench: out of memory for two %zu-byte copy buffers", bytes);
        }
        memset(src, 1, bytes); /* touch every page before timing */
        memcpy(dst, src, bytes);
        double t0 = bench_now();
        for (int r = 0; r < reps; r++) memcpy(r % 2 ? src : dst, r % 2 ? dst : src, bytes);
        sec = (bench_now() - t0) / reps;
        volatile char sink = (char)(src[bytes - 1] + dst[bytes / 2]); /* keeps the copies observable */
        (void)sink;
        free(src);
        free(dst);
    }
    if (sec <= 0) return mill_errf(e, "bench: copy of %zu bytes timed at %g s", bytes, sec);
    *bytes_per_s = (double)bytes / sec;
    return 0;
}

#endif
