#include "tensor.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef MILL_CUDA
#include "cuda_util.h"
#endif

static const struct {
    const char *name;
    size_t size;
} dtype_info[DTYPE_COUNT] = {
    [DTYPE_F32] = {"F32", 4},     [DTYPE_BF16] = {"BF16", 2},      [DTYPE_F16] = {"F16", 2},
    [DTYPE_F8_E4M3] = {"F8_E4M3", 1}, [DTYPE_F8_E8M0] = {"F8_E8M0", 1}, [DTYPE_I64] = {"I64", 8},
    [DTYPE_I32] = {"I32", 4},     [DTYPE_U8] = {"U8", 1},          [DTYPE_U16] = {"U16", 2},
    [DTYPE_I8] = {"I8", 1},
};

size_t dtype_size(mill_dtype dt) { return dt < DTYPE_COUNT ? dtype_info[dt].size : 0; }
const char *dtype_name(mill_dtype dt) { return dt < DTYPE_COUNT ? dtype_info[dt].name : "?"; }

int dtype_from_name(const char *name, mill_dtype *out) {
    for (int i = 0; i < DTYPE_COUNT; i++)
        if (strcmp(name, dtype_info[i].name) == 0) {
            *out = (mill_dtype)i;
            return 0;
        }
    return -1;
}

int64_t tensor_numel(const tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

size_t tensor_nbytes(const tensor *t) { return (size_t)tensor_numel(t) * dtype_size(t->dtype); }

char *tensor_shape_str(int ndim, const int64_t *shape, char *buf, size_t n) {
    size_t off = (size_t)snprintf(buf, n, "[");
    for (int i = 0; i < ndim && off < n; i++)
        off += (size_t)snprintf(buf + off, n - off, i ? ", %lld" : "%lld", (long long)shape[i]);
    if (off < n) snprintf(buf + off, n - off, "]");
    return buf;
}

int tensor_shape_eq(const tensor *t, int ndim, const int64_t *shape) {
    if (t->ndim != ndim) return 0;
    for (int i = 0; i < ndim; i++)
        if (t->shape[i] != shape[i]) return 0;
    return 1;
}

tensor tensor_view(void *data, mill_dtype dt, mill_device dev, int ndim, const int64_t *shape) {
    tensor t = {.dtype = dt, .device = dev, .ndim = ndim, .data = data, .owns = 0};
    for (int i = 0; i < ndim; i++) t.shape[i] = shape[i];
    return t;
}

int tensor_alloc(tensor *t, mill_dtype dt, mill_device dev, int ndim, const int64_t *shape, mill_err *e) {
    if (ndim < 0 || ndim > TENSOR_MAX_DIMS) return mill_errf(e, "tensor_alloc: %d dims (max %d)", ndim, TENSOR_MAX_DIMS);
    *t = tensor_view(NULL, dt, dev, ndim, shape);
    size_t nb = tensor_nbytes(t);
    if (dev == DEVICE_CPU) {
        t->data = calloc(nb ? nb : 1, 1);
        if (!t->data) return mill_errf(e, "tensor_alloc: out of memory for %zu bytes", nb);
    } else {
#ifdef MILL_CUDA
        if (cuda_alloc_zero(&t->data, nb, e)) return -1;
#else
        return mill_errf(e, "tensor_alloc: this build has no CUDA support");
#endif
    }
    t->owns = 1;
    return 0;
}

void tensor_free(tensor *t) {
    if (t->owns && t->data) {
        if (t->device == DEVICE_CPU) free(t->data);
#ifdef MILL_CUDA
        else cuda_free(t->data);
#endif
    }
    t->data = NULL;
    t->owns = 0;
}

float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float f16_to_f32(uint16_t v) {
    uint32_t sign = (uint32_t)(v >> 15) << 31, exp = (v >> 10) & 0x1f, man = v & 0x3ff;
    float f;
    if (exp == 0) {
        f = ldexpf((float)man, -24);
        return sign ? -f : f;
    }
    uint32_t u = exp == 31 ? sign | 0x7f800000u | (man << 13) : sign | ((exp + 112) << 23) | (man << 13);
    memcpy(&f, &u, 4);
    return f;
}

/* e4m3fn: bias 7, no infinities, 0x7f/0xff are NaN. */
float f8e4m3_to_f32(uint8_t v) {
    int sign = v >> 7, exp = (v >> 3) & 0xf, man = v & 7;
    float f;
    if (exp == 15 && man == 7) return NAN;
    if (exp == 0) f = ldexpf((float)man, -9);
    else f = ldexpf(1.0f + (float)man / 8.0f, exp - 7);
    return sign ? -f : f;
}

/* e8m0: an unsigned power of two, bias 127, 0xff is NaN. */
float f8e8m0_to_f32(uint8_t v) { return v == 0xff ? NAN : ldexpf(1.0f, (int)v - 127); }

int dtype_convert_to_f32(mill_dtype dt, const void *src, float *dst, size_t n, mill_err *e) {
    switch (dt) {
    case DTYPE_F32: memcpy(dst, src, n * 4); return 0;
    case DTYPE_BF16:
        for (size_t i = 0; i < n; i++) dst[i] = bf16_to_f32(((const uint16_t *)src)[i]);
        return 0;
    case DTYPE_F16:
        for (size_t i = 0; i < n; i++) dst[i] = f16_to_f32(((const uint16_t *)src)[i]);
        return 0;
    case DTYPE_F8_E4M3:
        for (size_t i = 0; i < n; i++) dst[i] = f8e4m3_to_f32(((const uint8_t *)src)[i]);
        return 0;
    case DTYPE_F8_E8M0:
        for (size_t i = 0; i < n; i++) dst[i] = f8e8m0_to_f32(((const uint8_t *)src)[i]);
        return 0;
    default: return mill_errf(e, "dtype %s is not a floating type", dtype_name(dt));
    }
}

/* A block's bytes: aligned host memory, or cudaMalloc'ed (256-byte aligned) in device mode. */
static char *arena_bytes_new(mill_device dev, size_t cap) {
    if (dev == DEVICE_CPU) return aligned_alloc(64, (cap + 63) & ~(size_t)63);
#ifdef MILL_CUDA
    void *p = NULL;
    mill_err e;
    return cuda_alloc(&p, cap, &e) ? NULL : p;
#else
    return NULL;
#endif
}

static void arena_bytes_free(mill_device dev, char *p) {
    if (dev == DEVICE_CPU) free(p);
#ifdef MILL_CUDA
    else cuda_free(p);
#endif
}

static arena_block *arena_block_new(mill_device dev, size_t cap) {
    arena_block *b = malloc(sizeof *b);
    if (!b) return NULL;
    b->data = arena_bytes_new(dev, cap);
    if (!b->data) {
        free(b);
        return NULL;
    }
    b->cap = cap;
    b->used = 0;
    b->next = NULL;
    return b;
}

static void arena_blocks_free(arena *a) {
    for (arena_block *b = a->head; b;) {
        arena_block *n = b->next;
        arena_bytes_free(a->device, b->data);
        free(b);
        b = n;
    }
    a->head = NULL;
}

int arena_init(arena *a, size_t block_size, mill_err *e) {
    return arena_init_device(a, block_size, DEVICE_CPU, NULL, e);
}

int arena_init_device(arena *a, size_t block_size, mill_device dev, void *stream, mill_err *e) {
    memset(a, 0, sizeof *a);
#ifndef MILL_CUDA
    if (dev != DEVICE_CPU) return mill_errf(e, "arena_init: this build has no CUDA support");
#endif
    a->device = dev;
    a->stream = stream;
    a->block_size = block_size < 4096 ? 4096 : block_size;
    a->head = arena_block_new(dev, a->block_size);
    if (!a->head) return mill_errf(e, "arena_init: out of %s memory for %zu bytes", dev == DEVICE_CPU ? "host" : "device",
                                   a->block_size);
    return 0;
}

void *arena_alloc(arena *a, size_t bytes) {
    bytes = (bytes + 63) & ~(size_t)63;
    arena_block *b = a->head;
    if (!b || b->cap - b->used < bytes) {
        size_t cap = bytes > a->block_size ? bytes : a->block_size;
        arena_block *nb = arena_block_new(a->device, cap);
        if (!nb) return NULL;
        nb->next = b;
        a->head = b = nb;
    }
    void *p = b->data + b->used;
    b->used += bytes;
    a->used += bytes;
    if (a->used > a->peak) a->peak = a->used;
    return p;
}

float *arena_floats(arena *a, size_t n) {
    float *p = arena_alloc(a, n * sizeof(float));
    if (!p) return NULL;
    if (a->device == DEVICE_CPU) {
        memset(p, 0, n * sizeof(float));
        return p;
    }
#ifdef MILL_CUDA
    mill_err e;
    if (cuda_zero_async(p, n * sizeof(float), a->stream, &e)) return NULL;
#endif
    return p;
}

/* In device mode, freeing a block (cudaFree) waits for the device, so no op still in flight
 * loses its memory. */
void arena_reset(arena *a) {
    if (a->head && a->head->next) { /* coalesce into one block of the peak size */
        arena_blocks_free(a);
        if (a->peak > a->block_size) a->block_size = a->peak;
        a->head = arena_block_new(a->device, a->block_size);
    } else if (a->head) {
        a->head->used = 0;
    }
    a->used = 0;
}

void arena_free(arena *a) {
    arena_blocks_free(a);
    memset(a, 0, sizeof *a);
}
