/* kernels/quant.h — quantization (FP8/FP4 decode): the released DeepSeek-V4 weight formats to fp32.
 * Owns: the scalar decodes (fp8 e4m3fn, e8m0, e2m1) and the two block dequantizations the release
 * uses:
 *   FP8: weight [R, C] in e4m3fn, scale [ceil(R/br), ceil(C/bc)] (e8m0 or F32; br = bc = 128 in the
 *        release): w[r][c] = fp8(q[r][c]) * scale[r/br][c/bc]
 *   FP4: packed bytes [R, C/2], two e2m1 codes each (the even column in the low nibble), scale
 *        [R, C/32] in e8m0: w[r][c] = fp4(nibble of q[r][c/2]) * scale[r][c/32]
 * Each product is one fp32 multiply of the two decoded values, as torch computes
 * `q.float() * scale.float()` (HF's Fp8Dequantize with an fp32 target); so the result equals torch's
 * bit for bit, -0.0 included. CPU only: dequantization happens once, at load time, on the host (a
 * GPU model is made from the fp32 host copy). A code that decodes to NaN (fp8 0x7f / 0xff, e8m0 0xff)
 * is refused with an error naming the element: a checkpoint never holds one on purpose. Facts and
 * sources: kernels/README.md, "Quantized checkpoints". */
#ifndef MILL_QUANT_H
#define MILL_QUANT_H

#include <stdint.h>

#include "../common/err.h"
#include "../common/tensor.h"

#define QUANT_FP8_BLOCK 128 /* the release's weight_block_size, both ways */
#define QUANT_FP4_GROUP 32  /* input columns per e8m0 scale of a packed FP4 weight */

/* e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; subnormals m * 2^-9; no infinities;
 * 0x7f and 0xff are NaN; largest finite 448. */
float quant_fp8_e4m3(uint8_t code);
/* e8m0: an unsigned power of two, 2^(code - 127); code 0 is 2^-127 (an fp32 subnormal); 0xff is NaN. */
float quant_e8m0(uint8_t code);
/* e2m1 (low 4 bits of code): sign, 2 exponent bits (bias 1), 1 mantissa bit:
 * 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives (code 8 is -0.0). */
float quant_e2m1(uint8_t code);

/* Scale grid of an FP8 weight [rows, cols] in blocks of br x bc: ceil(rows/br) x ceil(cols/bc). */
void quant_fp8_scale_shape(int64_t rows, int64_t cols, int br, int bc, int64_t out[2]);

/* FP8 block dequantization into out[rows * cols]. scale_dtype: DTYPE_F8_E8M0 or DTYPE_F32 (read
 * with memcpy: any alignment). Fails on a NaN weight or scale code, or another scale dtype. */
int quant_dequant_fp8(const uint8_t *q, const void *scale, mill_dtype scale_dtype, int64_t rows, int64_t cols, int br,
                      int bc, float *out, mill_err *e);
/* FP4 dequantization into out[rows * cols]: packed [rows, cols/2], scale e8m0 [rows, cols/32];
 * cols must be a multiple of QUANT_FP4_GROUP. Fails on a NaN scale code or a bad cols. */
int quant_dequant_fp4(const uint8_t *packed, const uint8_t *scale, int64_t rows, int64_t cols, float *out,
                      mill_err *e);

#endif
