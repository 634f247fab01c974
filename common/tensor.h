/* common/tensor.h — the tensor type, dtypes and devices.
 * Owns: tensor (a typed, shaped view of memory on one device), dtype sizes and
 * names (safetensors spelling), bf16/f16/fp8 scalar conversions, and the arena
 * (one bump allocator per model for activations, llm.c style; its blocks live on the CPU or, in
 * device mode, in CUDA memory). */
#ifndef MILL_TENSOR_H
#define MILL_TENSOR_H

#ifdef __cplusplus
extern "C" {
#endif

#include <stddef.h>
#include <stdint.h>

#include "err.h"

typedef enum {
    DTYPE_F32 = 0,
    DTYPE_BF16,
    DTYPE_F16,
    DTYPE_F8_E4M3,
    DTYPE_F8_E8M0,
    DTYPE_I64,
    DTYPE_I32,
    DTYPE_U8,
    DTYPE_U16,
    DTYPE_I8, /* the release's packed FP4 experts: two e2m1 codes a byte (kernels/quant.h) */
    DTYPE_COUNT
} mill_dtype;

typedef enum { DEVICE_CPU = 0, DEVICE_CUDA = 1 } mill_device;

#define TENSOR_MAX_DIMS 6

typedef struct {
    mill_dtype dtype;
    mill_device device;
    int ndim;
    int64_t shape[TENSOR_MAX_DIMS];
    void *data;
    int owns; /* 1 when tensor_free must release data */
} tensor;

size_t dtype_size(mill_dtype dt);
const char *dtype_name(mill_dtype dt); /* "F32", "BF16", ... as in safetensors */
int dtype_from_name(const char *name, mill_dtype *out);

int64_t tensor_numel(const tensor *t);
size_t tensor_nbytes(const tensor *t);
/* "[2, 3, 4]" into buf; returns buf. */
char *tensor_shape_str(int ndim, const int64_t *shape, char *buf, size_t n);
int tensor_shape_eq(const tensor *t, int ndim, const int64_t *shape);

/* A non-owning view. */
tensor tensor_view(void *data, mill_dtype dt, mill_device dev, int ndim, const int64_t *shape);
/* Zero-filled allocation on the given device. */
int tensor_alloc(tensor *t, mill_dtype dt, mill_device dev, int ndim, const int64_t *shape, mill_err *e);
void tensor_free(tensor *t);

float bf16_to_f32(uint16_t v);
uint16_t f32_to_bf16(float f); /* round to nearest even, NaN kept quiet */
float f16_to_f32(uint16_t v);
float f8e4m3_to_f32(uint8_t v);
float f8e8m0_to_f32(uint8_t v);
/* Converts n elements of a floating dtype (F32, BF16, F16, F8_E4M3, F8_E8M0) to fp32. */
int dtype_convert_to_f32(mill_dtype dt, const void *src, float *dst, size_t n, mill_err *e);

/* Bump allocator for activations: 64-byte aligned pieces from a chain of
 * blocks; arena_reset keeps one block as large as the peak so a steady
 * workload settles into a single allocation. A device arena (arena_init_device
 * with DEVICE_CUDA) takes its blocks from cudaMalloc and zero-fills on `stream`
 * (the kctx's), so the fill is ordered with the ops that use the memory; its
 * pointers are device pointers, never dereferenced on the host. */
typedef struct arena_block {
    struct arena_block *next;
    size_t cap, used;
    char *data;
} arena_block;

typedef struct {
    arena_block *head;
    size_t block_size, used, peak;
    mill_device device; /* where the blocks live (a zeroed arena is a CPU one) */
    void *stream;       /* cudaStream_t of the zero fills (device mode) */
} arena;

int arena_init(arena *a, size_t block_size, mill_err *e); /* CPU */
/* DEVICE_CPU: as arena_init. DEVICE_CUDA: device blocks, zero fills on stream (NULL: the default). */
int arena_init_device(arena *a, size_t block_size, mill_device dev, void *stream, mill_err *e);
void *arena_alloc(arena *a, size_t bytes); /* NULL only when malloc / cudaMalloc fails */
float *arena_floats(arena *a, size_t n);   /* zero-filled; NULL also when the device fill fails */
void arena_reset(arena *a);
void arena_free(arena *a);

#ifdef __cplusplus
}
#endif

#endif
