/* tests/fuzz/fuzz_common.h — helpers every fuzz target shares (header-only: each target is one
 * translation unit, and libFuzzer links exactly one target per binary).
 * - FUZZ_CHECK: an invariant the decoder promises; a failure traps, so libFuzzer and the
 *   standalone driver (fuzz_main.c) both report it as a crash and keep the input.
 * - Inputs that hold several files (a tokenizer.json and its tokenizer_config.json, a shard index
 *   and its shards, a recipe and its --set overrides) are split at FUZZ_SEP, a line of its own
 *   that no valid seed holds, so seeds stay readable and the dictionaries can insert it.
 * - Decoders that only read paths get their bytes through a per-process scratch directory on
 *   tmpfs (/dev/shm, or $MILL_FUZZ_TMP), removed at exit. */
#ifndef MILL_FUZZ_COMMON_H
#define MILL_FUZZ_COMMON_H

#include <dirent.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define FUZZ_CHECK(c)                                                                                          \
    do {                                                                                                       \
        if (!(c)) {                                                                                            \
            fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #c);                         \
            __builtin_trap();                                                                                  \
        }                                                                                                      \
    } while (0)

#define FUZZ_SEP "\n=====\n"
#define FUZZ_MAX_PARTS 8

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* MILL_FUZZ_VERBOSE=1: each refusal's message on stderr (to see which seeds a decoder accepts). */
static inline void fuzz_refused(const char *what, const char *msg) {
    static int verbose = -1;
    if (verbose < 0) verbose = getenv("MILL_FUZZ_VERBOSE") != NULL;
    if (verbose) fprintf(stderr, "refused (%s): %s\n", what, msg);
}

/* A NUL-terminated malloc'd copy of n bytes (the decoders that take C strings). */
static inline char *fuzz_cstr(const uint8_t *p, size_t n) {
    char *s = malloc(n + 1);
    FUZZ_CHECK(s != NULL);
    if (n) memcpy(s, p, n);
    s[n] = 0;
    return s;
}

/* An exact-size copy: ASan then flags a read one byte past the input, which a view into
 * libFuzzer's larger buffer would hide. */
static inline void *fuzz_dup(const uint8_t *p, size_t n) {
    void *d = malloc(n ? n : 1);
    FUZZ_CHECK(d != NULL);
    if (n) memcpy(d, p, n);
    return d;
}

/* Splits at FUZZ_SEP into at most max parts (the last takes the rest); returns the count (>= 1). */
static inline int fuzz_split(const uint8_t *d, size_t n, const uint8_t **part, size_t *len, int max) {
    const size_t sl = sizeof FUZZ_SEP - 1;
    int k = 0;
    const uint8_t *p = d;
    size_t left = n;
    while (k + 1 < max) {
        const uint8_t *s = left >= sl ? memmem(p, left, FUZZ_SEP, sl) : NULL;
        if (!s) break;
        part[k] = p;
        len[k++] = (size_t)(s - p);
        left -= (size_t)(s - p) + sl;
        p = s + sl;
    }
    part[k] = p;
    len[k++] = left;
    return k;
}

/* ---- the scratch directory ---- */

static char fuzz_tmp_dir[512];

/* dir/name into buf. */
static inline const char *fuzz_path(const char *dir, const char *name, char *buf, size_t cap) {
    snprintf(buf, cap, "%s/%s", dir, name);
    return buf;
}

static inline void fuzz_tmp_cleanup(void) {
    if (!fuzz_tmp_dir[0]) return;
    DIR *d = opendir(fuzz_tmp_dir); /* flat: the targets write plain files only */
    char p[1024];
    for (struct dirent *de; d && (de = readdir(d)) != NULL;)
        if (strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))
            unlink(fuzz_path(fuzz_tmp_dir, de->d_name, p, sizeof p));
    if (d) closedir(d);
    rmdir(fuzz_tmp_dir);
}

/* The per-process scratch directory, made on first use. */
static inline const char *fuzz_tmp(const char *target) {
    if (fuzz_tmp_dir[0]) return fuzz_tmp_dir;
    const char *root = getenv("MILL_FUZZ_TMP");
    struct stat sb;
    if (!root || !*root) root = stat("/dev/shm", &sb) == 0 && S_ISDIR(sb.st_mode) ? "/dev/shm" : "/tmp";
    snprintf(fuzz_tmp_dir, sizeof fuzz_tmp_dir, "%s/mill-fuzz-%s-%ld", root, target, (long)getpid());
    if (mkdir(fuzz_tmp_dir, 0700) != 0 && !(stat(fuzz_tmp_dir, &sb) == 0 && S_ISDIR(sb.st_mode))) {
        fprintf(stderr, "fuzz: cannot make %s\n", fuzz_tmp_dir);
        abort();
    }
    atexit(fuzz_tmp_cleanup);
    return fuzz_tmp_dir;
}

static inline void fuzz_write(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    FUZZ_CHECK(f != NULL);
    FUZZ_CHECK(n == 0 || fwrite(p, 1, n, f) == n);
    FUZZ_CHECK(fclose(f) == 0);
}

#endif
