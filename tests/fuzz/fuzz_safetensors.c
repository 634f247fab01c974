/* tests/fuzz/fuzz_safetensors.c — fuzz target for the safetensors reader (common/safetensors.c):
 * the 8-byte header length, the JSON header (dtypes, shapes, data_offsets, __metadata__) and the
 * sharded layout (model.safetensors.index.json's weight_map naming shard files).
 * Input: one part (split at FUZZ_SEP) is a .safetensors file, opened by path; two or more are an
 * index JSON and shard files s1.safetensors, s2.safetensors, ... opened through their directory.
 * The reader mmaps files; run_fuzz.sh compiles safetensors.c for this target with
 * -Dmmap=fuzz_mmap -Dmunmap=fuzz_munmap, and those read the file into an exact-size heap block,
 * because a mapping is rounded up to a page and ASan cannot see a read past the file's end there.
 * A file that opens must keep the reader's promises: every entry's bytes lie inside its file
 * (all touched), its byte count is the shape's, names are unique and found again. */
#include <fcntl.h>
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common/safetensors.h"
#include "fuzz_common.h"

void *fuzz_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off);
int fuzz_munmap(void *addr, size_t len);

void *fuzz_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    (void)addr, (void)prot, (void)flags;
    FUZZ_CHECK(off == 0 && len > 0);
    uint8_t *p = malloc(len);
    if (!p) return MAP_FAILED;
    for (size_t got = 0; got < len;) {
        ssize_t k = pread(fd, p + got, len - got, (off_t)got);
        if (k <= 0) {
            free(p);
            return MAP_FAILED;
        }
        got += (size_t)k;
    }
    return p;
}

int fuzz_munmap(void *addr, size_t len) {
    (void)len;
    free(addr);
    return 0;
}

static const char *const shard_names[] = {"s1.safetensors", "s2.safetensors", "s3.safetensors"};
enum { N_SHARDS = sizeof shard_names / sizeof shard_names[0] };

/* Every promise of safetensors.h about an opened file. */
static void exercise(const safetensors *st) {
    int n = safetensors_count(st);
    FUZZ_CHECK(n >= 0);
    FUZZ_CHECK(safetensors_at(st, -1) == NULL && safetensors_at(st, n) == NULL);
    for (int i = 0; i < n; i++) {
        const safetensors_entry *en = safetensors_at(st, i);
        FUZZ_CHECK(en != NULL && en->name != NULL);
        FUZZ_CHECK(safetensors_find(st, en->name) == en);
        FUZZ_CHECK(safetensors_index(st, en) == i);
        FUZZ_CHECK(safetensors_file_of(st, en) != NULL);
        FUZZ_CHECK((int)en->dtype >= 0 && en->dtype < DTYPE_COUNT);
        FUZZ_CHECK(en->ndim >= 0 && en->ndim <= TENSOR_MAX_DIMS);
        uint64_t numel = 1;
        for (int k = 0; k < en->ndim; k++) {
            FUZZ_CHECK(en->shape[k] >= 0);
            numel *= (uint64_t)en->shape[k];
        }
        FUZZ_CHECK(en->nbytes == numel * dtype_size(en->dtype));
        const volatile uint8_t *p = en->data; /* every byte: ASan flags one outside the file */
        uint8_t acc = 0;
        for (size_t j = 0; j < en->nbytes; j++) acc ^= p[j];
        (void)acc;
    }
    static const char *const keys[] = {"format", "mill", "", "__metadata__", "x"};
    for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++) {
        const char *v = safetensors_metadata(st, keys[k]);
        if (v) (void)strlen(v);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *dir = fuzz_tmp("safetensors");
    char pi[600], ps[600], pf[600];
    const uint8_t *part[1 + N_SHARDS];
    size_t len[1 + N_SHARDS];
    int np = fuzz_split(data, size, part, len, 1 + N_SHARDS);
    const char *index = fuzz_path(dir, "model.safetensors.index.json", pi, sizeof pi);
    const char *single = fuzz_path(dir, "model.safetensors", pf, sizeof pf);
    /* a clean directory each time: a shard left from the last input must not be read */
    unlink(index);
    unlink(single);
    for (int i = 0; i < N_SHARDS; i++) unlink(fuzz_path(dir, shard_names[i], ps, sizeof ps));
    const char *open_path;
    if (np == 1) {
        fuzz_write(single, part[0], len[0]);
        open_path = size % 2 ? dir : single; /* both ways in: the directory and the file */
    } else {
        fuzz_write(index, part[0], len[0]);
        for (int i = 1; i < np; i++) fuzz_write(fuzz_path(dir, shard_names[i - 1], ps, sizeof ps), part[i], len[i]);
        open_path = size % 2 ? dir : index;
    }
    safetensors *st = NULL;
    mill_err e;
    e.msg[0] = 0;
    int rc = safetensors_open(open_path, &st, &e);
    FUZZ_CHECK(rc == 0 || rc == -1);
    if (rc == 0) {
        FUZZ_CHECK(st != NULL);
        exercise(st);
        safetensors_close(st);
    } else {
        FUZZ_CHECK(st == NULL && e.msg[0] != 0); /* every refusal explains itself */
        fuzz_refused("safetensors_open", e.msg);
    }
    return 0;
}
