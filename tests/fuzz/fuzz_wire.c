/* tests/fuzz/fuzz_wire.c — fuzz target for the wire decoder (common/wire.c).
 * Input layout: 2 bytes header length (little endian, taken modulo what is left), 1 byte frame
 * count (mod 4), the header, then the frames: each but the last prefixed by a 2-byte length (mod
 * what is left), the last taking the rest. Every part is copied into its own exact-size buffer so
 * ASan sees any overread. A decoded message must satisfy the decoder's promises (checked with
 * __builtin_trap) and survive re-encoding through wire_builder.
 * Seeds: corpus/wire/ (a generate request with three frames, a ping, a result with an empty frame,
 * a weights message); dict/wire.dict holds msgpack's type markers. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/wire.h"
#include "fuzz_common.h"

#define CHECK(c) FUZZ_CHECK(c)

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

/* Decodes one input; 1 when it decoded. */
static int fuzz_one(const uint8_t *data, size_t size) {
    if (size < 3) return 0;
    size_t left = size - 3;
    size_t hlen = ((size_t)data[0] | (size_t)data[1] << 8) % (left + 1);
    int nf = data[2] % 4;
    const uint8_t *p = data + 3;
    void *hdr = fuzz_dup(p, hlen);
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
        fr[i] = fuzz_dup(p, n);
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

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_one(data, size);
    return 0;
}
