/* tests/fuzz/fuzz_main.c — the standalone driver: a main() for any fuzz target where clang's
 * libFuzzer is missing (built with -DFUZZ_STANDALONE by tests/run_fuzz.sh, under gcc's ASan+UBSan).
 * No coverage feedback: it replays every input it is given (the committed corpus, regression cases
 * included), then runs bounded random mutations of them with libFuzzer's flag spelling, so the
 * same command lines and dictionaries serve both builds:
 *   fuzz_X_sa [-runs=N] [-seed=S] [-dict=FILE] [-max_len=N] [-max_total_time=S] FILE|DIR...
 * Mutations: bit flips, random and boundary bytes, insertions, deletions, truncation, chunk copies,
 * 16/32/64-bit extremes in either byte order, dictionary tokens, ASCII numbers swapped for edge
 * values, and splices of two inputs. A crash is the sanitizer's report or a FUZZ_CHECK trap; the
 * input that caused it is written to ./crash-standalone, so it can be kept as a regression. */
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv) __attribute__((weak));

typedef struct {
    uint8_t *p;
    size_t n, cap;
} fm_buf;

typedef struct {
    fm_buf *v;
    int n, cap;
} fm_list;

static void fm_put(fm_buf *b, const void *d, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        if (!b->p) abort();
    }
    if (n) memcpy(b->p + b->n, d, n);
    b->n += n;
}

static void fm_add(fm_list *l, const void *d, size_t n) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->v = realloc(l->v, (size_t)l->cap * sizeof *l->v);
        if (!l->v) abort();
    }
    l->v[l->n] = (fm_buf){0};
    fm_put(&l->v[l->n++], d, n);
}

static int fm_read_file(const char *path, fm_buf *b) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    char tmp[65536];
    size_t k;
    b->n = 0;
    while ((k = fread(tmp, 1, sizeof tmp, f)) > 0) fm_put(b, tmp, k);
    fclose(f);
    return 0;
}

static int fm_name_cmp(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* A file, or every plain file of a directory in name order (a replay is then reproducible). */
static void fm_load(const char *path, fm_list *l) {
    struct stat sb;
    fm_buf b = {0};
    if (stat(path, &sb) != 0) {
        fprintf(stderr, "fuzz: %s: no such file or directory\n", path);
        exit(2);
    }
    if (!S_ISDIR(sb.st_mode)) {
        if (fm_read_file(path, &b) == 0) fm_add(l, b.p, b.n);
        free(b.p);
        return;
    }
    DIR *d = opendir(path);
    if (!d) return;
    char **names = NULL;
    size_t nn = 0, cn = 0;
    for (struct dirent *de; (de = readdir(d)) != NULL;) {
        if (de->d_name[0] == '.') continue;
        if (nn == cn) {
            cn = cn ? 2 * cn : 64;
            names = realloc(names, cn * sizeof *names);
            if (!names) abort();
        }
        names[nn++] = strdup(de->d_name);
    }
    closedir(d);
    qsort(names, nn, sizeof *names, fm_name_cmp);
    for (size_t i = 0; i < nn; i++) {
        char p[4096];
        snprintf(p, sizeof p, "%s/%s", path, names[i]);
        if (stat(p, &sb) == 0 && S_ISREG(sb.st_mode) && fm_read_file(p, &b) == 0) fm_add(l, b.p, b.n);
        free(names[i]);
    }
    free(names);
    free(b.p);
}

/* libFuzzer's dictionary format: one token a line, `"..."` or `name="..."`, with \\ \" \xNN. */
static void fm_load_dict(const char *path, fm_list *l) {
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "fuzz: cannot read the dictionary %s\n", path);
        exit(2);
    }
    char line[4096];
    while (fgets(line, sizeof line, f)) {
        char *q = strchr(line, '"');
        if (line[0] == '#' || !q) continue;
        fm_buf t = {0};
        for (char *s = q + 1; *s && *s != '"'; s++) {
            uint8_t c = (uint8_t)*s;
            if (*s == '\\' && s[1] == 'x' && s[2] && s[3]) {
                char hx[3] = {s[2], s[3], 0};
                c = (uint8_t)strtoul(hx, NULL, 16);
                s += 3;
            } else if (*s == '\\' && s[1]) {
                c = (uint8_t)*++s;
            }
            fm_put(&t, &c, 1);
        }
        if (t.n) fm_add(l, t.p, t.n);
        free(t.p);
    }
    fclose(f);
}

static uint64_t fm_rng;

static uint64_t fm_next(void) { /* xorshift64 */
    uint64_t x = fm_rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return fm_rng = x;
}

static size_t fm_below(size_t n) { return n ? (size_t)(fm_next() % n) : 0; }

static void fm_insert(fm_buf *b, size_t at, const void *d, size_t n) {
    fm_put(b, d, n); /* grow, then open the gap */
    memmove(b->p + at + n, b->p + at, b->n - n - at);
    memcpy(b->p + at, d, n);
}

static void fm_erase(fm_buf *b, size_t at, size_t n) {
    if (n > b->n - at) n = b->n - at;
    memmove(b->p + at, b->p + at + n, b->n - at - n);
    b->n -= n;
}

/* Bytes that steer parsers: JSON/YAML structure, msgpack type markers, UTF-8 lead bytes. */
static const uint8_t fm_bytes[] = {0x00, 0x01, 0x09, 0x0a, 0x0d, ' ', '"', '\'', ',', ':', '{', '}', '[', ']', '\\',
                                   '-', '#', '&', '*', '|', '>', '.', '0', '9', 'e', 0x7f, 0x80, 0x8f, 0x90, 0xa0, 0xbf,
                                   0xc0, 0xc1, 0xc3, 0xcb, 0xd9, 0xdc, 0xde, 0xe0, 0xed, 0xef, 0xf0, 0xf4, 0xf8, 0xff};
static const char *const fm_numbers[] = {"0",   "-1",         "1",          "65536",      "2147483648", "-2147483649",
                                         "4294967296", "9223372036854775807", "18446744073709551616", "1e308",
                                         "-0",  "0.5",        "1e-320",     "255",        "256",        "128"};

static void fm_mutate(fm_buf *b, const fm_list *seeds, const fm_list *dict, size_t max_len) {
    int rounds = 1 + (int)fm_below(4);
    for (int r = 0; r < rounds; r++) {
        uint64_t x = fm_next();
        size_t at = fm_below(b->n), k;
        switch (x % 13) {
        case 0: /* flip a bit */
            if (b->n) b->p[at] ^= (uint8_t)(1u << (x >> 8) % 8);
            break;
        case 1: /* a random byte */
            if (b->n) b->p[at] = (uint8_t)(x >> 8);
            break;
        case 2: /* a boundary byte */
            if (b->n) b->p[at] = fm_bytes[(x >> 8) % sizeof fm_bytes];
            break;
        case 3: /* insert one */
            fm_insert(b, fm_below(b->n + 1), &fm_bytes[(x >> 8) % sizeof fm_bytes], 1);
            break;
        case 4: /* delete a run */
            if (b->n) fm_erase(b, at, 1 + (size_t)((x >> 8) % 8));
            break;
        case 5: /* truncate, rarely */
            if (x % 5 == 0) b->n = at;
            break;
        case 6: /* copy a chunk somewhere */
            if (b->n) {
                k = 1 + (size_t)((x >> 8) % 32);
                if (k > b->n - at) k = b->n - at;
                uint8_t tmp[32];
                memcpy(tmp, b->p + at, k);
                fm_insert(b, fm_below(b->n + 1), tmp, k);
            }
            break;
        case 7: { /* a 16/32/64-bit extreme, little or big endian (safetensors and msgpack lengths) */
            static const uint64_t v[] = {0, 1, 0x7f, 0x80, 0xff, 0xffff, 0x10000, 0x7fffffff, 0x80000000u,
                                         0xffffffffu, 0x100000000ull, 0x7fffffffffffffffull, UINT64_MAX};
            int w = 2 << (int)((x >> 8) % 3), be = (int)((x >> 12) & 1);
            uint64_t val = v[(x >> 16) % (sizeof v / sizeof v[0])];
            if (b->n >= (size_t)w) {
                at = fm_below(b->n - (size_t)w + 1);
                for (int i = 0; i < w; i++) b->p[at + (size_t)(be ? w - 1 - i : i)] = (uint8_t)(val >> (8 * i));
            }
            break;
        }
        case 8: /* insert a dictionary token */
        case 9: /* or write one over the bytes there */
            if (dict->n) {
                const fm_buf *t = &dict->v[fm_below((size_t)dict->n)];
                if (x % 13 == 9 && b->n >= t->n) memcpy(b->p + fm_below(b->n - t->n + 1), t->p, t->n);
                else fm_insert(b, fm_below(b->n + 1), t->p, t->n);
            }
            break;
        case 10: /* an ASCII number swapped for an edge value */
            for (k = 0; k < 16 && b->n; k++, at = fm_below(b->n)) {
                if (b->p[at] < '0' || b->p[at] > '9') continue;
                size_t e = at;
                while (at > 0 && b->p[at - 1] >= '0' && b->p[at - 1] <= '9') at--;
                while (e < b->n && b->p[e] >= '0' && b->p[e] <= '9') e++;
                const char *num = fm_numbers[(x >> 8) % (sizeof fm_numbers / sizeof fm_numbers[0])];
                fm_erase(b, at, e - at);
                fm_insert(b, at, num, strlen(num));
                break;
            }
            break;
        case 11: /* splice: this input's head, another's tail */
            if (seeds->n) {
                const fm_buf *o = &seeds->v[fm_below((size_t)seeds->n)];
                size_t from = fm_below(o->n + 1);
                b->n = at;
                fm_put(b, o->p + from, o->n - from);
            }
            break;
        case 12: /* a run of one byte: long strings, deep nesting */
            if (b->n) {
                uint8_t run[64];
                memset(run, b->p[at], sizeof run);
                fm_insert(b, at, run, 1 + (size_t)((x >> 8) % sizeof run));
            }
            break;
        }
    }
    if (b->n > max_len) b->n = max_len;
}

/* The input running now: a crash writes it to ./crash-standalone (a regression case to keep). */
static const uint8_t *volatile fm_cur;
static volatile size_t fm_cur_n;

static void fm_dump(void) { /* async-signal-safe: it may run from a signal handler */
    int fd = open("crash-standalone", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return;
    for (size_t off = 0; off < fm_cur_n;) {
        ssize_t w = write(fd, (const uint8_t *)fm_cur + off, fm_cur_n - off);
        if (w <= 0) break;
        off += (size_t)w;
    }
    close(fd);
    const char msg[] = "standalone: the crashing input is in ./crash-standalone\n";
    if (write(2, msg, sizeof msg - 1) < 0) return;
}

static void fm_on_signal(int sig) {
    fm_dump();
    signal(sig, SIG_DFL);
    raise(sig);
}

/* Sanitizer reports end in their death callback; traps (FUZZ_CHECK) and aborts in a signal. */
void __sanitizer_set_death_callback(void (*cb)(void)) __attribute__((weak));

static void fm_run(const fm_buf *b) {
    uint8_t *copy = malloc(b->n ? b->n : 1); /* exact size: ASan sees any overread */
    if (!copy) abort();
    if (b->n) memcpy(copy, b->p, b->n);
    fm_cur = copy;
    fm_cur_n = b->n;
    LLVMFuzzerTestOneInput(copy, b->n);
    fm_cur_n = 0;
    free(copy);
}

int main(int argc, char **argv) {
    long runs = 10000, max_len = 65536;
    double max_time = 0;
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    fm_list seeds = {0}, dict = {0};
    if (LLVMFuzzerInitialize) LLVMFuzzerInitialize(&argc, &argv);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strncmp(a, "-runs=", 6)) runs = strtol(a + 6, NULL, 10);
        else if (!strncmp(a, "-seed=", 6)) seed = strtoull(a + 6, NULL, 10) | 1;
        else if (!strncmp(a, "-dict=", 6)) fm_load_dict(a + 6, &dict);
        else if (!strncmp(a, "-max_len=", 9)) max_len = strtol(a + 9, NULL, 10);
        else if (!strncmp(a, "-max_total_time=", 16)) max_time = strtod(a + 16, NULL);
        else if (a[0] == '-') fprintf(stderr, "fuzz: ignoring %s (a libFuzzer flag the standalone driver lacks)\n", a);
        else fm_load(a, &seeds);
    }
    if (max_len < 1) max_len = 65536;
    fm_rng = seed;
    if (!seeds.n) fm_add(&seeds, "", 0);
    if (__sanitizer_set_death_callback) __sanitizer_set_death_callback(fm_dump);
    signal(SIGILL, fm_on_signal);
    signal(SIGABRT, fm_on_signal);
    signal(SIGFPE, fm_on_signal);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < seeds.n; i++) fm_run(&seeds.v[i]);
    fm_buf work = {0};
    long done = 0;
    for (; done < runs; done++) {
        if (max_time > 0 && (done & 255) == 0) {
            clock_gettime(CLOCK_MONOTONIC, &t1);
            if ((double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec) > max_time) break;
        }
        const fm_buf *s = &seeds.v[fm_below((size_t)seeds.n)];
        work.n = 0;
        fm_put(&work, s->p, s->n);
        fm_mutate(&work, &seeds, &dict, (size_t)max_len);
        fm_run(&work);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("standalone: %d inputs replayed, %ld mutations in %.1f s, no crash\n", seeds.n, done,
           (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec));
    for (int i = 0; i < seeds.n; i++) free(seeds.v[i].p);
    for (int i = 0; i < dict.n; i++) free(dict.v[i].p);
    free(seeds.v);
    free(dict.v);
    free(work.p);
    return 0;
}
