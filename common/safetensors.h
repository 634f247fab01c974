/* common/safetensors.h — safetensors checkpoints: read (mmap) and write.
 * Owns: the reader for one file or a sharded directory
 * (model.safetensors.index.json's "weight_map"), and the writer, which writes
 * a temporary file, fsyncs it and renames it into place.
 * Every header field is checked before use: a truncated file, a corrupt
 * header, an unknown dtype, offsets outside the data section or a shape that
 * does not match the byte count is an error naming the file and tensor.
 * Dtypes: those of common/tensor.h, so the released FP8/FP4 checkpoints read as
 * stored (F8_E4M3 weights, F8_E8M0 or F32 scales, packed FP4 as I8 [out, in/2]);
 * kernels/quant.h decodes them. safetensors' own sub-byte "F4" is not read (the
 * release does not use it). */
#ifndef MILL_SAFETENSORS_H
#define MILL_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "tensor.h"

typedef struct {
    const char *name;
    mill_dtype dtype;
    int ndim;
    int64_t shape[TENSOR_MAX_DIMS];
    const void *data; /* inside the mapping; valid until safetensors_close */
    size_t nbytes;
    int file; /* index of the shard that holds it */
} safetensors_entry;

typedef struct safetensors safetensors;

/* path: a .safetensors file, or a directory holding model.safetensors.index.json
 * (sharded) or model.safetensors, or the index file itself. */
int safetensors_open(const char *path, safetensors **out, mill_err *e);
void safetensors_close(safetensors *st);

int safetensors_count(const safetensors *st);
const safetensors_entry *safetensors_at(const safetensors *st, int i);
const safetensors_entry *safetensors_find(const safetensors *st, const char *name);
/* The i with safetensors_at(st, i) == en, or -1 when en is not one of st's entries. */
int safetensors_index(const safetensors *st, const safetensors_entry *en);
const char *safetensors_file_of(const safetensors *st, const safetensors_entry *en); /* the shard path */
/* The "__metadata__" string value for key, or NULL (first shard only). */
const char *safetensors_metadata(const safetensors *st, const char *key);

/* Writer: tensors are copied in at add time, written in insertion order. */
typedef struct safetensors_writer safetensors_writer;

safetensors_writer *safetensors_writer_new(void);
int safetensors_writer_add(safetensors_writer *w, const char *name, mill_dtype dt, int ndim, const int64_t *shape,
                           const void *data, mill_err *e);
int safetensors_writer_set_metadata(safetensors_writer *w, const char *key, const char *value, mill_err *e);
/* Writes path atomically: path.tmp, fsync, rename, fsync of the directory. */
int safetensors_writer_save(safetensors_writer *w, const char *path, mill_err *e);
void safetensors_writer_free(safetensors_writer *w);

#endif
