/* common/tokenizer.h — text <-> token ids.
 * Owns: the opaque tokenizer (kind, vocabulary size, special-token ids). Two kinds sit behind
 * these calls; callers only use the functions below and never assume one id per byte.
 *
 * - The byte tokenizer of the tiny models (tokenizer_bytes_new): ids 0..255 are the bytes, then
 *   256 "<|bos|>", 257 "<|eos|>", 258 "<|pad|>"; ids 259..vocab_size-1 are reserved (the model's
 *   embedding has rows for them, the tokenizer never emits them and refuses to decode them).
 * - An HF tokenizers `tokenizer.json` byte-level BPE (tokenizer_load; common/bpe.c), as DeepSeek-V3/V4
 *   ship it: model BPE (vocab, merges by rank, ignore_merges, byte_fallback, unk_token, fuse_unk),
 *   added_tokens matched in the text the way HF matches them (non-normalized ones on the raw text,
 *   then the normalizer, then the normalized ones; leftmost-longest; single_word, lstrip, rstrip),
 *   normalizers Sequence/Replace/Prepend/Lowercase/Strip, pre-tokenizers Sequence/Split (every
 *   behavior, invert; regexes run by PCRE2 with Oniguruma's meaning of \w, \h, ^ and $) followed by
 *   ByteLevel, decoder ByteLevel, post-processors ByteLevel/TemplateProcessing/Sequence. Anything
 *   else is refused at load with one line naming the file and the JSON field.
 *   Text that is not valid UTF-8 is read as Python's bytes.decode("utf-8", "replace") reads it:
 *   one U+FFFD per maximal invalid subpart. One tokenizer may be used from several threads at once
 *   (each thread keeps its own word cache, for the BPE tokenizer it used last).
 */
#ifndef MILL_TOKENIZER_H
#define MILL_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

typedef struct tokenizer tokenizer;

/* The byte tokenizer; vocab_size (the model's) must be >= 259. */
int tokenizer_bytes_new(tokenizer **out, int vocab_size, mill_err *e);
/* tokenizer.json (HF tokenizers) byte-level BPE: path is the file or its directory; tokenizer_config.json
 * beside it (bos_token, eos_token, pad_token: strings or {"content": ...}) names bos/eos/pad; without
 * it, -1 for those absent. Its add_bos_token / add_eos_token are not read: the special tokens an
 * encode adds are tokenizer.json's post_processor's (DeepSeek's adds the bos add_bos_token names). */
int tokenizer_load(tokenizer **out, const char *path, mill_err *e);
void tokenizer_free(tokenizer *t);

/* Byte tokenizer: the model's vocab_size. BPE: the highest id (vocabulary or added token) + 1. */
int tokenizer_vocab_size(const tokenizer *t);
/* The most bytes one id adds to the output of any decode call (lossy tags and U+FFFD repairs
 * included): n ids never need more than n * tokenizer_max_piece + 1 bytes. */
size_t tokenizer_max_piece(const tokenizer *t);
/* -1 when the tokenizer has none (a BPE without tokenizer_config.json naming it). */
int tokenizer_bos(const tokenizer *t);
int tokenizer_eos(const tokenizer *t);
int tokenizer_pad(const tokenizer *t);

/* len bytes of text (any bytes, NUL included; text may be NULL when len is 0) into
 * out[0..*n_out). Special-token names in the text are plain text, never specials:
 * a prompt cannot inject an eos (a BPE matches no added token here and adds no
 * post-processor tokens). Error when cap is too small. */
int tokenizer_encode(const tokenizer *t, const char *text, size_t len, int32_t *out, int cap, int *n_out, mill_err *e);
/* HF's encode(text, add_special_tokens=add_special): added tokens in the text are matched as HF
 * matches them; add_special applies the post-processor. The byte tokenizer matches its three names
 * here (and adds nothing). Invalid UTF-8 in text is replaced by U+FFFD per maximal subpart (what
 * Python's bytes.decode("utf-8", "replace") gives). Error when cap is too small. */
int tokenizer_encode_hf(const tokenizer *t, const char *text, size_t len, int add_special, int32_t *out, int cap,
                        int *n_out, mill_err *e);
/* n ids into out, NUL-terminated; specials are written as their names. Errors: an id
 * outside [0, vocab_size) or a reserved id / an id with no token (naming the id and its
 * position), or cap too small for the text and its NUL. A BPE decodes as tokenizer_decode_hf
 * with skip_special 0. */
int tokenizer_decode(const tokenizer *t, const int32_t *ids, int n, char *out, size_t cap, mill_err *e);
/* The same for model output, which may hold any id: one with no text becomes "<|id:N|>" (at most
 * 16 bytes) instead of an error; only a too-small cap fails. */
int tokenizer_decode_lossy(const tokenizer *t, const int32_t *ids, int n, char *out, size_t cap, mill_err *e);
/* HF's decode(ids, skip_special_tokens=skip_special): bytes that are not valid UTF-8 become U+FFFD
 * as HF does. Errors as tokenizer_decode's (HF drops an id it has no token for; this refuses it). */
int tokenizer_decode_hf(const tokenizer *t, const int32_t *ids, int n, int skip_special, char *out, size_t cap,
                        mill_err *e);

/* "<|bos|>", "<|eos|>", "<|pad|>" -> the tokenizer's bos, eos, pad id (-1 where it has none); -1 for
 * any other name. */
int tokenizer_special_id(const tokenizer *t, const char *name);
/* The id of a token string (added token or vocabulary entry), -1 if none. The byte tokenizer: its
 * three names and one-byte strings. */
int tokenizer_token_id(const tokenizer *t, const char *token);

#endif
