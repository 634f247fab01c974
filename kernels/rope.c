#include "rope.h"

#ifdef MILL_CUDA
#include "cuda/cuda_ops.h"
#endif

#include <math.h>

/* HF computes these in fp32 (torch.arange(...).float()); mirror that so angles agree. */
void rope_inv_freq(float *inv_freq, int rope_dim, double theta, int yarn, double factor, double beta_fast,
                   double beta_slow, int original_max_pos) {
    int half = rope_dim / 2;
    for (int i = 0; i < half; i++) {
        float pos_freq = powf((float)theta, (float)(2 * i) / (float)rope_dim);
        inv_freq[i] = 1.0f / pos_freq;
    }
    if (!yarn) return;
    /* YaRN: blend interpolated (1/(factor*f)) and extrapolated (1/f) frequencies with a
     * linear ramp between the correction dims for beta_fast and beta_slow rotations. */
    double lo = rope_dim * log(original_max_pos / (beta_fast * 2 * M_PI)) / (2 * log(theta));
    double hi = rope_dim * log(original_max_pos / (beta_slow * 2 * M_PI)) / (2 * log(theta));
    lo = floor(lo);
    hi = ceil(hi);
    if (lo < 0) lo = 0;
    if (hi > rope_dim - 1) hi = rope_dim - 1;
    if (lo == hi) hi += 0.001;
    for (int i = 0; i < half; i++) {
        float ramp = (float)(((float)i - (float)lo) / (float)(hi - lo));
        ramp = ramp < 0 ? 0 : (ramp > 1 ? 1 : ramp);
        float extra = 1.0f - ramp; /* weight of the extrapolated (unscaled) frequency */
        float f_ex = inv_freq[i];
        float f_in = 1.0f / ((float)factor * powf((float)theta, (float)(2 * i) / (float)rope_dim));
        inv_freq[i] = f_in * (1.0f - extra) + f_ex * extra;
    }
}

int op_rope(const kctx *k, float *x, int n_tok, int n_vec, int dim, int rope_dim, const int32_t *pos,
            const float *inv_freq, int sign, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_rope(k, x, n_tok, n_vec, dim, rope_dim, pos, inv_freq, sign, e));
    TRY(kctx_require_cpu(k, "op_rope", e));
    int half = rope_dim / 2, off = dim - rope_dim;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < n_tok; t++) {
        for (int i = 0; i < half; i++) {
            float ang = (float)pos[t] * inv_freq[i];
            float c = cosf(ang), s = sinf(ang) * (float)sign;
            for (int v = 0; v < n_vec; v++) {
                float *p = x + ((long)t * n_vec + v) * dim + off + 2 * i;
                float a = p[0], b = p[1];
                p[0] = a * c - b * s;
                p[1] = b * c + a * s;
            }
        }
    }
    return 0;
}
