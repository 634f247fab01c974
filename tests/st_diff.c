/* tests/st_diff.c — compares the float tensors two safetensors files (or model directories) share
 * by name: prints the largest relative difference, max|a - b| / max(max|b|, 1e-30) per tensor,
 * worst first, and exits 1 when it exceeds the tolerance or a tensor of B is missing from A.
 *   st_diff A B TOL [PREFIX]   (PREFIX: only tensors whose name starts with it) */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/safetensors.h"

static double value(const safetensors_entry *en, size_t i) {
    if (en->dtype == DTYPE_F32) return ((const float *)en->data)[i];
    if (en->dtype == DTYPE_I64) return (double)((const int64_t *)en->data)[i];
    if (en->dtype == DTYPE_I32) return ((const int32_t *)en->data)[i];
    return NAN;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: st_diff A B TOL [PREFIX]\n");
        return 2;
    }
    mill_err e;
    safetensors *a, *b;
    if (safetensors_open(argv[1], &a, &e) || safetensors_open(argv[2], &b, &e)) {
        fprintf(stderr, "st_diff: %s\n", e.msg);
        return 2;
    }
    double tol = atof(argv[3]), worst = 0;
    const char *prefix = argc > 4 ? argv[4] : "", *worst_name = "-";
    int n = 0, bad = 0;
    for (int i = 0; i < safetensors_count(b); i++) {
        const safetensors_entry *eb = safetensors_at(b, i);
        if (strncmp(eb->name, prefix, strlen(prefix))) continue;
        const safetensors_entry *ea = safetensors_find(a, eb->name);
        size_t cnt = 1;
        for (int d = 0; d < eb->ndim; d++) cnt *= (size_t)eb->shape[d];
        if (!ea || ea->ndim != eb->ndim || memcmp(ea->shape, eb->shape, sizeof(int64_t) * (size_t)eb->ndim)) {
            fprintf(stderr, "st_diff: %s: missing or of another shape in %s\n", eb->name, argv[1]);
            bad = 1;
            continue;
        }
        double md = 0, mb = 1e-30;
        for (size_t j = 0; j < cnt; j++) {
            double x = value(ea, j), y = value(eb, j);
            if (fabs(x - y) > md || isnan(x - y)) md = isnan(x - y) ? INFINITY : fabs(x - y);
            if (fabs(y) > mb) mb = fabs(y);
        }
        double rel = md / mb;
        if (rel > worst || n == 0) {
            worst = rel;
            worst_name = eb->name;
        }
        n++;
    }
    printf("st_diff: %d tensors, worst relative difference %.3g (%s), tolerance %g\n", n, worst, worst_name, tol);
    safetensors_close(a);
    safetensors_close(b);
    return bad || !(worst <= tol) || n == 0;
}
