#include "optim.h"

#ifdef MILL_CUDA
#include "cuda/cuda_ops.h"
#endif

#include <math.h>

int op_adamw(const kctx *k, float *p, const float *g, float *m, float *v, long n, adamw_hparams hp, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_adamw(k, p, g, m, v, n, hp, e));
    TRY(kctx_require_cpu(k, "op_adamw", e));
    float decay = 1.0f - hp.lr * hp.weight_decay;
    for (long i = 0; i < n; i++) {
        float gi = g[i] * hp.grad_scale;
        m[i] = hp.beta1 * m[i] + (1.0f - hp.beta1) * gi;
        v[i] = hp.beta2 * v[i] + (1.0f - hp.beta2) * gi * gi;
        float mh = m[i] / hp.bias_c1, vh = v[i] / hp.bias_c2;
        p[i] = p[i] * decay - hp.lr * mh / (sqrtf(vh) + hp.eps);
    }
    return 0;
}

int op_sumsq(const kctx *k, const float *x, long n, double *acc, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_sumsq(k, x, n, acc, e));
    TRY(kctx_require_cpu(k, "op_sumsq", e));
    double s = 0.0;
    for (long i = 0; i < n; i++) s += (double)x[i] * x[i];
    *acc += s;
    return 0;
}

int op_sumsq_segments(const kctx *k, const float *x, const long *offsets, const long *lengths, int n_seg,
                      double *acc, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_sumsq_segments(k, x, offsets, lengths, n_seg, acc, e));
    TRY(kctx_require_cpu(k, "op_sumsq_segments", e));
    for (int sg = 0; sg < n_seg; sg++) { /* op_sumsq's loop, segment by segment */
        const float *p = x + offsets[sg];
        double s = 0.0;
        for (long i = 0; i < lengths[sg]; i++) s += (double)p[i] * p[i];
        *acc += s;
    }
    return 0;
}

int op_scale(const kctx *k, float *x, long n, float s, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_scale(k, x, n, s, e));
    TRY(kctx_require_cpu(k, "op_scale", e));
    for (long i = 0; i < n; i++) x[i] *= s;
    return 0;
}
