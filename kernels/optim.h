/* kernels/optim.h — optimizer math on flat fp32 ranges (master weights and Adam moments). */
#ifndef MILL_OPTIM_H
#define MILL_OPTIM_H

#include "backend.h"

typedef struct {
    float lr, beta1, beta2, eps, weight_decay;
    float bias_c1, bias_c2; /* 1 - beta^step */
    float grad_scale;       /* each g is multiplied by it first (gradient clipping's factor; 1: none) */
} adamw_hparams;

/* PyTorch AdamW on n elements, with g = grad_scale g (one rounding, as scaling g in place first
 * would give, without that pass over the gradients): p *= 1 - lr*wd; m = b1 m + (1-b1) g;
 * v = b2 v + (1-b2) g^2; p -= lr * (m / c1) / (sqrt(v / c2) + eps). g is not written. */
int op_adamw(const kctx *k, float *p, const float *g, float *m, float *v, long n, adamw_hparams hp, mill_err *e);
/* sum of squares of n elements (double accumulation), added to *acc. */
int op_sumsq(const kctx *k, const float *x, long n, double *acc, mill_err *e);
/* The same over n_seg segments x[offsets[i], offsets[i] + lengths[i]) in one call: each segment
 * summed in double as op_sumsq does, each sum added to *acc in segment order (the CPU gives the bits
 * of a loop of op_sumsq calls). offsets and lengths are host arrays; on CUDA one sync for all. */
int op_sumsq_segments(const kctx *k, const float *x, const long *offsets, const long *lengths, int n_seg,
                      double *acc, mill_err *e);
int op_scale(const kctx *k, float *x, long n, float s, mill_err *e);

#endif
