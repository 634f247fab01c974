/* tests/fuzz_wire.c — fuzz target for the wire decoder (common/wire.c).
 * Input layout: 2 bytes header length (little endian, taken modulo what is left), 1 byte frame
 * count (mod 4), the header, then the frames: each but the last prefixed by a 2-byte length (mod
 * what is left), the last taking the rest. Every part is copied into its own exact-size buffer so
 * ASan sees any overread. A decoded message must satisfy the decoder's promises (checked with
 * __builtin_trap) and survive re-encoding through wire_builder.
 * With -DFUZZ_STANDALONE it builds as a plain program: main() mutates a few valid seed messages
 * with a deterministic xorshift for argv[1] iterations (default 100000), a bounded smoke fuzz for
 * machines without libFuzzer; `fuzz_wire_sa --seeds DIR` writes the seeds as a libFuzzer corpus. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/wire.h"

#define CHECK(c)                                                                                               \
    do {                                                                                                       \
        if (!(c)) {                                                                                            \
            fprintf(stderr, "fuzz_wire: invariant failed: %s (line %d)\n", #c, __LINE__);                    \
            __builtin_trap();                                                                                  \
        }                                                                                                      \
    } while (0)

/* Keys the getters probe: the fixed ones, the seeds' fields, and short ones a mutator finds. */
static const char *const probe_keys[] = {"type", "v",     "id", "frames", "max_tokens", "temperature", "stream",
                                         "model", "ids", "a",  "b",      "x",          "",            "k"};

static void exercise(const wire_msg *m) {
    mill_err e;
    const char *type = wire_type(m);
    size_t tn = strlen(type);
    CHECK(tn >= 1 && tn <= 31);
    for (size_t i = 0; i < tn; i++) CHECK(type[i] >= 0x20 && type[i] <= 0x7e);
    (void)wire_id(m);
    for (size_t k = 0; k < sizeof probe_keys / sizeof probe_keys[0]; k++) {
        const char *key = probe_keys[k];
        int64_t iv = 0, arr[8];
        double dv = 0;
        int bv = 0, n = 0;
        char sv[16];
        for (int req = 0; req < 2; req++) {
            if (wire_get_int(m, key, req, 3, -5, 1000, &iv, &e) == 0) CHECK(iv >= -5 && iv <= 1000);
            (void)wire_get_int(m, key, req, 0, INT64_MIN, INT64_MAX, &iv, &e);
            if (wire_get_num(m, key, req, 0.5, -1.0, 2.0, &dv, &e) == 0) CHECK(dv >= -1.0 && dv <= 2.0);
            if (wire_get_bool(m, key, req, 0, &bv, &e) == 0) CHECK(bv == 0 || bv == 1);
            if (wire_get_str(m, key, req, "d", sv, sizeof sv, &e) == 0) CHECK(strlen(sv) < sizeof sv);
            if (wire_get_int_array(m, key, req, -10, 10, arr, 8, &n, &e) == 0) {
                CHECK(n >= 0 && n <= 8);
                for (int i = 0; i < n; i++) CHECK(arr[i] >= -10 && arr[i] <= 10);
            }
        }
    }
    int nf = wire_n_frames(m);
    CHECK(nf >= 0 && nf <= WIRE_MAX_FRAMES);
    CHECK(wire_frame_at(m, -1) == NULL && wire_frame_at(m, nf) == NULL);
    for (int i = 0; i < nf; i++) {
        const wire_frame *f = wire_frame_at(m, i);
        CHECK(f != NULL);
        size_t nl = strlen(f->name);
        CHECK(nl >= 1 && nl <= 127);
        CHECK(wire_frame_named(m, f->name) == f); /* names are unique */
        CHECK((int)f->dtype >= 0 && f->dtype < DTYPE_COUNT);
        CHECK(f->ndim >= 0 && f->ndim <= TENSOR_MAX_DIMS);
        uint64_t numel = 1;
        for (int k = 0; k < f->ndim; k++) {
            CHECK(f->shape[k] >= 0);
            numel *= (uint64_t)f->shape[k];
        }
        CHECK(f->nbytes == numel * dtype_size(f->dtype));
        /* Touch every byte: ASan flags a length that exceeds the real buffer. */
        const volatile uint8_t *p = f->data;
        uint8_t acc = 0;
        for (size_t j = 0; j < f->nbytes; j++) acc ^= p[j];
        (void)acc;
    }
}

/* Re-encodes type, id and frames; the decoder must accept what the builder produces. */
static void reencode(const wire_msg *m) {
    mill_err e;
    wire_builder *b = wire_builder_new(wire_type(m), wire_id(m));
    CHECK(b != NULL);
    int nf = wire_n_frames(m);
    for (int i = 0; i < nf; i++) {
        const wire_frame *f = wire_frame_at(m, i);
        CHECK(wire_put_frame(b, f->name, f->dtype, f->ndim, f->shape, f->data, &e) == 0);
    }
    const void *hdr;
    size_t hlen;
    CHECK(wire_builder_pack(b, &hdr, &hlen, &e) == 0);
    const void *fr[WIRE_MAX_FRAMES];
    size_t lens[WIRE_MAX_FRAMES];
    for (int i = 0; i < nf; i++) wire_builder_frame(b, i, &fr[i], &lens[i]);
    wire_msg *m2 = NULL;
    CHECK(wire_decode(&m2, hdr, hlen, fr, lens, nf, &e) == 0);
    CHECK(strcmp(wire_type(m2), wire_type(m)) == 0 && wire_id(m2) == wire_id(m) && wire_n_frames(m2) == nf);
    for (int i = 0; i < nf; i++) {
        const wire_frame *a = wire_frame_at(m, i), *c = wire_frame_at(m2, i);
        CHECK(strcmp(a->name, c->name) == 0 && a->dtype == c->dtype && a->ndim == c->ndim && a->nbytes == c->nbytes);
        CHECK(memcmp(a->shape, c->shape, (size_t)a->ndim * sizeof a->shape[0]) == 0);
    }
    wire_msg_free(m2);
    wire_builder_free(b);
}

static void *dup_part(const uint8_t *p, size_t n) {
    void *d = malloc(n ? n : 1);
    CHECK(d != NULL);
    if (n) memcpy(d, p, n);
    return d;
}

/* Decodes one input; 1 when it decoded. */
static int fuzz_one(const uint8_t *data, size_t size) {
    if (size < 3) return 0;
    size_t left = size - 3;
    size_t hlen = ((size_t)data[0] | (size_t)data[1] << 8) % (left + 1);
    int nf = data[2] % 4;
    const uint8_t *p = data + 3;
    void *hdr = dup_part(p, hlen);
    p += hlen;
    left -= hlen;
    void *fr[3] = {0};
    size_t lens[3] = {0};
    for (int i = 0; i < nf; i++) {
        size_t n = left;
        if (i + 1 < nf) {
            size_t pre = left >= 2 ? 2 : left;
            size_t v = pre == 2 ? ((size_t)p[0] | (size_t)p[1] << 8) : 0;
            p += pre;
            left -= pre;
            n = v % (left + 1);
        }
        fr[i] = dup_part(p, n);
        lens[i] = n;
        p += n;
        left -= n;
    }
    mill_err e;
    e.msg[0] = 0;
    wire_msg *m = NULL;
    int rc = wire_decode(&m, hdr, hlen, (const void *const *)fr, lens, nf, &e);
    CHECK(rc == 0 || rc == -1);
    if (rc == 0) {
        CHECK(m != NULL);
        exercise(m);
        reencode(m);
        wire_msg_free(m);
    } else {
        CHECK(m == NULL && e.msg[0] != 0); /* every failure explains itself */
    }
    for (int i = 0; i < nf; i++) free(fr[i]);
    free(hdr);
    return rc == 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_one(data, size);
    return 0;
}

#ifdef FUZZ_STANDALONE

typedef struct {
    uint8_t *p;
    size_t n, cap;
} bytes;

static void put(bytes *b, const void *d, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        CHECK(b->p != NULL);
    }
    if (n) memcpy(b->p + b->n, d, n);
    b->n += n;
}

/* Lays a builder's message out in the fuzz input format. */
static void serialize(wire_builder *wb, bytes *out) {
    mill_err e;
    const void *hdr;
    size_t hlen;
    if (wire_builder_pack(wb, &hdr, &hlen, &e)) {
        fprintf(stderr, "seed: %s\n", e.msg);
        exit(1);
    }
    int nf = wire_builder_n_frames(wb);
    CHECK(hlen < 65536 && nf < 4);
    uint8_t pre[3] = {(uint8_t)hlen, (uint8_t)(hlen >> 8), (uint8_t)nf};
    out->n = 0;
    put(out, pre, 3);
    put(out, hdr, hlen);
    for (int i = 0; i < nf; i++) {
        const void *d;
        size_t n;
        wire_builder_frame(wb, i, &d, &n);
        CHECK(n < 65536);
        if (i + 1 < nf) {
            uint8_t l[2] = {(uint8_t)n, (uint8_t)(n >> 8)};
            put(out, l, 2);
        }
        put(out, d, n);
    }
}

#define N_SEEDS 4

static void make_seeds(bytes seeds[N_SEEDS]) {
    static const int32_t ids[6] = {1, 2, 3, 4, 5, 6};
    static const uint8_t mask[5] = {1, 0, 1, 0, 1};
    static const uint16_t hid[8] = {0x3f80, 0x4000, 0, 0xbf80, 1, 2, 3, 4};
    const int64_t s23[] = {2, 3}, s5[] = {5}, s0[] = {0}, s412[] = {4, 1, 2};
    mill_err e;
    wire_builder *b[N_SEEDS];
    b[0] = wire_builder_new("generate", 1);
    wire_put_int(b[0], "max_tokens", 16);
    wire_put_num(b[0], "temperature", 0.7);
    wire_put_bool(b[0], "stream", 1);
    wire_put_str(b[0], "model", "tiny");
    CHECK(wire_put_frame(b[0], "ids", DTYPE_I32, 2, s23, ids, &e) == 0);
    CHECK(wire_put_frame(b[0], "mask", DTYPE_U8, 1, s5, mask, &e) == 0);
    CHECK(wire_put_frame(b[0], "hidden", DTYPE_BF16, 3, s412, hid, &e) == 0);
    b[1] = wire_builder_new("ping", 123456789012345ULL);
    b[2] = wire_builder_new("result", 9);
    wire_put_int(b[2], "a", -5);
    wire_put_str(b[2], "b", "x");
    CHECK(wire_put_frame(b[2], "empty", DTYPE_F32, 1, s0, NULL, &e) == 0);
    b[3] = wire_builder_new("weights", 2);
    wire_put_num(b[3], "x", -1e300);
    CHECK(wire_put_frame(b[3], "w", DTYPE_U8, 1, s5, mask, &e) == 0);
    CHECK(wire_put_frame(b[3], "k", DTYPE_I32, 1, s5, ids, &e) == 0);
    for (int i = 0; i < N_SEEDS; i++) {
        seeds[i] = (bytes){0};
        serialize(b[i], &seeds[i]);
        wire_builder_free(b[i]);
    }
}

static uint64_t xorshift(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

/* Bytes that steer msgpack into interesting places: type markers, length extremes. */
static const uint8_t interesting[] = {0x00, 0x01, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xc0, 0xc1,
                                      0xc2, 0xc3, 0xc4, 0xc7, 0xca, 0xcb, 0xcf, 0xd3, 0xd4, 0xd8, 0xd9,
                                      0xdb, 0xdc, 0xdd, 0xde, 0xdf, 0xe0, 0xff};

static void mutate(bytes *b, uint64_t *rng) {
    int rounds = 1 + (int)(xorshift(rng) % 6);
    for (int r = 0; r < rounds; r++) {
        uint64_t x = xorshift(rng);
        size_t at = b->n ? (size_t)(xorshift(rng) % b->n) : 0;
        switch (x % 8) {
        case 0: /* flip a bit */
            if (b->n) b->p[at] ^= (uint8_t)(1u << (x >> 8) % 8);
            break;
        case 1: /* an interesting byte */
            if (b->n) b->p[at] = interesting[(x >> 8) % sizeof interesting];
            break;
        case 2: /* a random byte */
            if (b->n) b->p[at] = (uint8_t)(x >> 8);
            break;
        case 3: /* insert a byte */
            put(b, "", 1);
            memmove(b->p + at + 1, b->p + at, b->n - 1 - at);
            b->p[at] = interesting[(x >> 8) % sizeof interesting];
            break;
        case 4: /* delete a run */
            if (b->n) {
                size_t k = 1 + (size_t)((x >> 8) % 4);
                if (k > b->n - at) k = b->n - at;
                memmove(b->p + at, b->p + at + k, b->n - at - k);
                b->n -= k;
            }
            break;
        case 5: /* truncate */
            b->n = at;
            break;
        case 6: /* duplicate a chunk at the end */
            if (b->n) {
                size_t k = 1 + (size_t)((x >> 8) % 16);
                if (k > b->n - at) k = b->n - at;
                uint8_t tmp[16];
                memcpy(tmp, b->p + at, k);
                put(b, tmp, k);
            }
            break;
        case 7: /* a 16/32-bit big-endian extreme, as msgpack lengths are */
            if (b->n >= 4 && at + 4 <= b->n) {
                static const uint32_t v[] = {0, 1, 0x7fffffffu, 0x80000000u, 0xffffffffu, 0x10000u, 0xffffu};
                uint32_t w = v[(x >> 8) % (sizeof v / sizeof v[0])];
                b->p[at] = (uint8_t)(w >> 24);
                b->p[at + 1] = (uint8_t)(w >> 16);
                b->p[at + 2] = (uint8_t)(w >> 8);
                b->p[at + 3] = (uint8_t)w;
            }
            break;
        }
    }
}

int main(int argc, char **argv) {
    bytes seeds[N_SEEDS];
    make_seeds(seeds);
    if (argc == 3 && strcmp(argv[1], "--seeds") == 0) {
        int rc = 0;
        for (int i = 0; i < N_SEEDS && rc == 0; i++) {
            char path[4096];
            snprintf(path, sizeof path, "%s/seed%d", argv[2], i);
            FILE *f = fopen(path, "wb");
            int ok = f && fwrite(seeds[i].p, 1, seeds[i].n, f) == seeds[i].n;
            if ((f && fclose(f)) || !ok) {
                fprintf(stderr, "fuzz_wire: cannot write %s\n", path);
                rc = 1;
            }
        }
        for (int i = 0; i < N_SEEDS; i++) free(seeds[i].p);
        return rc;
    }
    long iters = argc > 1 ? strtol(argv[1], NULL, 10) : 100000;
    if (iters <= 0) iters = 100000;
    uint64_t rng = 0x9e3779b97f4a7c15ULL;
    bytes work = {0};
    long decoded = 0;
    for (int i = 0; i < N_SEEDS; i++) CHECK(fuzz_one(seeds[i].p, seeds[i].n) == 1); /* the seeds decode */
    for (long it = 0; it < iters; it++) {
        const bytes *s = &seeds[xorshift(&rng) % N_SEEDS];
        work.n = 0;
        put(&work, s->p, s->n);
        mutate(&work, &rng);
        decoded += fuzz_one(work.p, work.n);
    }
    printf("fuzz_wire standalone: %ld mutated messages, %ld decoded, no crash\n", iters, decoded);
    free(work.p);
    for (int i = 0; i < N_SEEDS; i++) free(seeds[i].p);
    return 0;
}

#endif
