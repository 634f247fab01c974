/* kernels/rope.h — DeepSeek-V4's interleaved partial RoPE.
 * Pairs (2i, 2i+1) of the trailing rope_dim channels of each vector rotate by
 * pos * inv_freq[i]; the leading channels are untouched. sign = -1 applies the
 * inverse rotation (used on the attention output). */
#ifndef MILL_ROPE_H
#define MILL_ROPE_H

#include <stdint.h>

#include "backend.h"

/* inv_freq[rope_dim/2] for base theta, plain or YaRN (HF's _compute_yarn_parameters with
 * attention_factor 1: no mscale on cos/sin). yarn == 0 ignores the remaining arguments. */
void rope_inv_freq(float *inv_freq, int rope_dim, double theta, int yarn, double factor, double beta_fast,
                   double beta_slow, int original_max_pos);

/* x: [n_tok, n_vec, dim]; token t rotates at position pos[t]. */
int op_rope(const kctx *k, float *x, int n_tok, int n_vec, int dim, int rope_dim, const int32_t *pos,
            const float *inv_freq, int sign, mill_err *e);

#endif
