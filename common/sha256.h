/* common/sha256.h — SHA-256 and SHA-1 (FIPS 180-4), streaming.
 * Owns: the two digests `mill download` checks files with (launch/hub.h): SHA-256 is the hub's LFS
 * object id, SHA-1 over "blob <size>\0" + content is git's blob id (a small file's ETag).
 * Written here because none of the libraries mill links (libcurl, SQLite, jansson, ZeroMQ, ...)
 * exports a hash. Not constant-time; for integrity checks, never for secrets. */
#ifndef MILL_SHA256_H
#define MILL_SHA256_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint32_t h[8];
    uint64_t len; /* bytes hashed so far */
    uint8_t buf[64];
} sha256_ctx;

typedef struct {
    uint32_t h[5];
    uint64_t len;
    uint8_t buf[64];
} sha1_ctx;

void sha256_init(sha256_ctx *c);
void sha256_update(sha256_ctx *c, const void *data, size_t n);
void sha256_final(sha256_ctx *c, uint8_t out[32]); /* c must be re-initialised before reuse */

void sha1_init(sha1_ctx *c);
void sha1_update(sha1_ctx *c, const void *data, size_t n);
void sha1_final(sha1_ctx *c, uint8_t out[20]);

/* n bytes as 2n lowercase hex digits and a NUL into out (2n + 1 bytes). */
void sha_hex(const uint8_t *d, size_t n, char *out);

#endif
