/* common/bpe.h — private to common/tokenizer.c: the HF tokenizers `tokenizer.json` byte-level BPE.
 * Owns: the loaded tokenizer (vocabulary, merge ranks, added tokens, normalizer, pre-tokenizer
 * regexes, post-processor template, decoded bytes of every id) and each thread's word cache.
 * The contract callers see is in tokenizer.h; this header is the seam tokenizer.c dispatches on. */
#ifndef MILL_BPE_H
#define MILL_BPE_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

typedef struct bpe bpe;

/* json_path: the tokenizer.json file; config_path: tokenizer_config.json or NULL (then bos/eos/pad
 * are -1). Every refusal is one line naming the file and the JSON field. */
int bpe_load(bpe **out, const char *json_path, const char *config_path, mill_err *e);
void bpe_free(bpe *b);

int bpe_vocab_size(const bpe *b); /* highest id + 1 */
int bpe_bos(const bpe *b);
int bpe_eos(const bpe *b);
int bpe_pad(const bpe *b);

/* match_added: find added tokens in the text (HF encode); 0 reads every byte as text.
 * add_special: apply the post-processor's special tokens. */
int bpe_encode(const bpe *b, const char *text, size_t len, int match_added, int add_special, int32_t *out, int cap,
               int *n_out, mill_err *e);
/* lossy: an id with no token becomes "<|id:N|>" instead of an error. */
int bpe_decode(const bpe *b, const int32_t *ids, int n, int skip_special, int lossy, char *out, size_t cap,
               mill_err *e);
int bpe_token_id(const bpe *b, const char *token);
/* The most bytes one id adds to any decode's output (see tokenizer_max_piece). */
size_t bpe_max_piece(const bpe *b);

/* Writes in[0..n) to out with every maximal invalid UTF-8 subpart replaced by U+FFFD (what
 * Python's bytes.decode("utf-8", "replace") and Rust's from_utf8_lossy give); out needs 3n bytes.
 * Returns the bytes written. */
size_t bpe_utf8_repair(const unsigned char *in, size_t n, char *out);

#endif
