/* common/tokenizer.h — text <-> token ids.
 * Owns: the opaque tokenizer (kind, vocabulary size, special-token ids).
 * Today there is one kind, the byte tokenizer of the tiny models: ids 0..255 are
 * the bytes, then 256 "<|bos|>", 257 "<|eos|>", 258 "<|pad|>"; ids 259..vocab_size-1
 * are reserved (the model's embedding has rows for them, the tokenizer never emits
 * them and refuses to decode them).
 * An HF tokenizer.json byte-level BPE (PCRE2 pre-tokenizer, merges, added tokens)
 * is meant to slot in later as a second kind behind these same calls: callers
 * only use the functions below and never assume one id per byte. */
#ifndef MILL_TOKENIZER_H
#define MILL_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

typedef struct tokenizer tokenizer;

/* The byte tokenizer; vocab_size (the model's) must be >= 259. */
int tokenizer_bytes_new(tokenizer **out, int vocab_size, mill_err *e);
void tokenizer_free(tokenizer *t);

int tokenizer_vocab_size(const tokenizer *t);
int tokenizer_bos(const tokenizer *t);
int tokenizer_eos(const tokenizer *t);
int tokenizer_pad(const tokenizer *t);

/* len bytes of text (any bytes, NUL included; text may be NULL when len is 0) into
 * out[0..*n_out). Special-token names in the text are plain text, never specials:
 * a prompt cannot inject an eos. Error when cap is too small. */
int tokenizer_encode(const tokenizer *t, const char *text, size_t len, int32_t *out, int cap, int *n_out, mill_err *e);
/* n ids into out, NUL-terminated; specials are written as their names. Errors: an id
 * outside [0, vocab_size) or a reserved id (naming the id and its position), or
 * cap too small for the text and its NUL. */
int tokenizer_decode(const tokenizer *t, const int32_t *ids, int n, char *out, size_t cap, mill_err *e);
/* The same for model output, which may hold any id: one with no text becomes "<|id:N|>" (at most
 * 16 bytes) instead of an error; only a too-small cap fails. */
int tokenizer_decode_lossy(const tokenizer *t, const int32_t *ids, int n, char *out, size_t cap, mill_err *e);

/* "<|bos|>", "<|eos|>", "<|pad|>" -> id; -1 for any other name. */
int tokenizer_special_id(const tokenizer *t, const char *name);

#endif
