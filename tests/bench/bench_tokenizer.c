/* tests/bench/bench_tokenizer.c — mill's tokenizer.json BPE encode speed, one thread.
 * Reads a corpus of NUL-separated documents, encodes each with tokenizer_encode_hf (no special
 * tokens added), and prints per pass: MB/s, the token count, and a CRC-32 of the ids (each id as a
 * little-endian int32, chained over the documents: zlib.crc32's), which tokenizer_speed.sh checks
 * against HF tokenizers' ids for the same corpus.
 * usage: bench_tokenizer TOKENIZER_DIR CORPUS [PASSES] */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "common/tokenizer.h"

static uint32_t crc_table[256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32_ids(uint32_t crc, const int32_t *ids, int n) {
    crc = ~crc;
    for (int i = 0; i < n; i++) {
        uint32_t v = (uint32_t)ids[i];
        for (int k = 0; k < 4; k++) crc = crc_table[(crc ^ (v >> (8 * k))) & 0xFF] ^ (crc >> 8);
    }
    return ~crc;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s TOKENIZER_DIR CORPUS [PASSES]\n", argv[0]);
        return 2;
    }
    int passes = argc > 3 ? atoi(argv[3]) : 2;
    mill_err e = {{0}};
    tokenizer *t = NULL;
    if (tokenizer_load(&t, argv[1], &e)) {
        fprintf(stderr, "bench_tokenizer: %s\n", e.msg);
        return 1;
    }
    FILE *f = fopen(argv[2], "rb");
    if (!f) {
        fprintf(stderr, "bench_tokenizer: cannot open %s\n", argv[2]);
        return 1;
    }
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)size + 1);
    if (!buf || fread(buf, 1, (size_t)size, f) != (size_t)size) {
        fprintf(stderr, "bench_tokenizer: cannot read %s\n", argv[2]);
        return 1;
    }
    fclose(f);
    buf[size] = 0;
    size_t ndocs = 1, maxlen = 0;
    for (long i = 0; i < size; i++) ndocs += buf[i] == 0;
    const char **doc = malloc(ndocs * sizeof *doc);
    size_t *len = malloc(ndocs * sizeof *len), d = 0, start = 0;
    for (long i = 0; i <= size; i++)
        if (buf[i] == 0) {
            doc[d] = buf + start;
            len[d] = (size_t)i - start;
            if (len[d] > maxlen) maxlen = len[d];
            d++;
            start = (size_t)i + 1;
        }
    int cap = (int)(3 * maxlen + 64);
    int32_t *ids = malloc(sizeof *ids * (size_t)cap);
    crc_init();
    for (int p = 1; p <= passes; p++) {
        uint32_t crc = 0;
        long long ntok = 0;
        double t0 = mill_now();
        for (size_t i = 0; i < ndocs; i++) {
            int n = 0;
            if (tokenizer_encode_hf(t, doc[i], len[i], 0, ids, cap, &n, &e)) {
                fprintf(stderr, "bench_tokenizer: document %zu: %s\n", i, e.msg);
                return 1;
            }
            ntok += n;
            crc = crc32_ids(crc, ids, n);
        }
        double dt = mill_now() - t0;
        printf("mill: pass %d: %.2f MB/s (%.1f MB, %zu documents, %.2f s), %lld tokens, crc32 0x%08x\n", p,
               (double)size / 1e6 / dt, (double)size / 1e6, ndocs, dt, ntok, crc);
    }
    tokenizer_free(t);
    free(ids);
    free(doc);
    free(len);
    free(buf);
    return 0;
}
