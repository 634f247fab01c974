/* kernels/quant.c — FP8 / FP4 decode and block dequantization (CPU). See quant.h. */
#include "quant.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float quant_fp8_e4m3(uint8_t code) {
    uint32_t sign = (uint32_t)(code >> 7) << 31, exp = (code >> 3) & 15u, man = code & 7u;
    if (exp == 15 && man == 7) return NAN;
    if (exp == 0) { /* subnormal: man * 2^-9, exact in fp32 */
        float f = (float)man * 0x1p-9f;
        return sign ? -f : f;
    }
    /* rebias 7 -> 127 and move the 3 mantissa bits to the top of fp32's 23 */
    return bits_f32(sign | ((exp + 120u) << 23) | (man << 20));
}

float quant_e8m0(uint8_t code) {
    if (code == 0xff) return NAN;
    if (code == 0) return bits_f32(0x00400000u); /* 2^-127: below fp32's normal range */
    return bits_f32((uint32_t)code << 23);
}

float quant_e2m1(uint8_t code) {
    static const float mag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    float f = mag[code & 7];
    return code & 8 ? -f : f; /* code 8 gives -0.0, as torch's and HF's tables do */
}

void quant_fp8_scale_shape(int64_t rows, int64_t cols, int br, int bc, int64_t out[2]) {
    out[0] = (rows + br - 1) / br;
    out[1] = (cols + bc - 1) / bc;
}

/* n scales of dtype dt -> fp32, refusing NaN and infinities (no valid block has them). */
static int decode_scales(const void *src, mill_dtype dt, int64_t n, int64_t ncols, float *dst, mill_err *e) {
    for (int64_t i = 0; i < n; i++) {
        float s;
        if (dt == DTYPE_F8_E8M0) s = quant_e8m0(((const uint8_t *)src)[i]);
        else memcpy(&s, (const char *)src + 4 * i, 4);
        if (!isfinite(s)) {
            if (dt == DTYPE_F8_E8M0)
                return mill_errf(e, "scale [%lld, %lld] is e8m0 code 0xff (NaN)", (long long)(i / ncols),
                                 (long long)(i % ncols));
            return mill_errf(e, "scale [%lld, %lld] is %g, expected a finite number", (long long)(i / ncols),
                             (long long)(i % ncols), (double)s);
        }
        dst[i] = s;
    }
    return 0;
}

int quant_dequant_fp8(const uint8_t *q, const void *scale, mill_dtype scale_dtype, int64_t rows, int64_t cols, int br,
                      int bc, float *out, mill_err *e) {
    if (scale_dtype != DTYPE_F8_E8M0 && scale_dtype != DTYPE_F32)
        return mill_errf(e, "FP8 block scales must be F8_E8M0 or F32, not %s", dtype_name(scale_dtype));
    if (rows < 0 || cols < 0 || br <= 0 || bc <= 0)
        return mill_errf(e, "FP8 dequantization of [%lld, %lld] in %d x %d blocks: bad arguments", (long long)rows,
                         (long long)cols, br, bc);
    int64_t g[2];
    quant_fp8_scale_shape(rows, cols, br, bc, g);
    int64_t ns = g[0] * g[1];
    float *s = malloc(sizeof(float) * (size_t)(ns > 0 ? ns : 1));
    if (!s) return mill_errf(e, "FP8 dequantization: out of memory for %lld scales", (long long)(g[0] * g[1]));
    if (decode_scales(scale, scale_dtype, g[0] * g[1], g[1], s, e)) {
        free(s);
        return -1;
    }
    float lut[256];
    for (int c = 0; c < 256; c++) lut[c] = quant_fp8_e4m3((uint8_t)c);
    int64_t bad = INT64_MAX; /* first element whose code is NaN */
#pragma omp parallel for reduction(min : bad) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *srow = s + (r / br) * g[1];
        const uint8_t *qr = q + r * cols;
        float *o = out + r * cols;
        for (int64_t c = 0; c < cols; c++) {
            if ((qr[c] & 0x7f) == 0x7f && r * cols + c < bad) bad = r * cols + c;
            o[c] = lut[qr[c]] * srow[c / bc]; /* one fp32 multiply: torch's q.float() * s.float() */
        }
    }
    free(s);
    if (bad != INT64_MAX)
        return mill_errf(e, "element [%lld, %lld] is fp8 code 0x%02x (NaN)", (long long)(bad / cols),
                         (long long)(bad % cols), q[bad]);
    return 0;
}

int quant_dequant_fp4(const uint8_t *packed, const uint8_t *scale, int64_t rows, int64_t cols, float *out,
                      mill_err *e) {
    if (rows < 0 || cols < 0 || cols % QUANT_FP4_GROUP)
        return mill_errf(e, "packed FP4 of logical shape [%lld, %lld]: the width must be a multiple of %d",
                         (long long)rows, (long long)cols, QUANT_FP4_GROUP);
    int64_t ng = cols / QUANT_FP4_GROUP, half = cols / 2;
    float *s = malloc(sizeof(float) * (size_t)(rows * ng > 0 ? rows * ng : 1));
    if (!s) return mill_errf(e, "FP4 dequantization: out of memory for %lld scales", (long long)(rows * ng));
    if (decode_scales(scale, DTYPE_F8_E8M0, rows * ng, ng, s, e)) {
        free(s);
        return -1;
    }
    float lut[16];
    for (int c = 0; c < 16; c++) lut[c] = quant_e2m1((uint8_t)c);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *pr = packed + r * half;
        const float *sr = s + r * ng;
        float *o = out + r * cols;
        for (int64_t j = 0; j < half; j++) {
            float sc = sr[(2 * j) / QUANT_FP4_GROUP]; /* a group is even-sized: both nibbles share it */
            o[2 * j] = lut[pr[j] & 15] * sc;
            o[2 * j + 1] = lut[pr[j] >> 4] * sc;
        }
    }
    free(s);
    return 0;
}
