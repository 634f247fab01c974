/* common/safetensors.c — safetensors reader (mmap, single file or sharded) and
 * atomic writer. See safetensors.h for the contract. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* strndup, fsync, mmap under -std=c11 */
#endif
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define ST_INDEX_NAME "model.safetensors.index.json"
#define ST_SINGLE_NAME "model.safetensors"
/* Tensor names come from the file: cap how much of one goes into a message. */
#define NAMEFMT "'%.200s'"

/* ---- name -> index hash table (open addressing, keys borrowed) ---- */

typedef struct {
    const char *key; /* NULL = empty slot */
    int idx;
} st_slot;

typedef struct {
    st_slot *slots;
    size_t cap, n; /* cap is a power of two, kept at least 2n */
} st_names;

static uint64_t st_hash(const char *s) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

static int st_names_find(const st_names *h, const char *key) {
    if (!h->cap) return -1;
    for (size_t i = st_hash(key) & (h->cap - 1);; i = (i + 1) & (h->cap - 1)) {
        if (!h->slots[i].key) return -1;
        if (strcmp(h->slots[i].key, key) == 0) return h->slots[i].idx;
    }
}

static void st_names_put(st_slot *slots, size_t cap, const char *key, int idx) {
    size_t i = st_hash(key) & (cap - 1);
    while (slots[i].key) i = (i + 1) & (cap - 1);
    slots[i].key = key;
    slots[i].idx = idx;
}

/* Adds key (caller checked it is absent); key must outlive the table. */
static int st_names_add(st_names *h, const char *key, int idx) {
    if ((h->n + 1) * 2 > h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 64;
        st_slot *s = calloc(cap, sizeof *s);
        if (!s) return -1;
        for (size_t i = 0; i < h->cap; i++)
            if (h->slots[i].key) st_names_put(s, cap, h->slots[i].key, h->slots[i].idx);
        free(h->slots);
        h->slots = s;
        h->cap = cap;
    }
    st_names_put(h->slots, h->cap, key, idx);
    h->n++;
    return 0;
}

static void st_names_free(st_names *h) {
    free(h->slots);
    memset(h, 0, sizeof *h);
}

/* ---- reader ---- */

typedef struct {
    char *path;
    void *map;
    size_t size;
} st_file;

typedef struct {
    char *key, *value;
} st_meta;

struct safetensors {
    st_file *files;
    int nfiles;
    safetensors_entry *entries;
    int count, cap;
    st_names names;
    st_meta *meta; /* __metadata__ of the first file */
    int nmeta;
};

static char *st_strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = malloc(n);
    if (p) memcpy(p, s, n);
    return p;
}

static char *st_join(const char *dir, const char *name) {
    size_t a = strlen(dir), b = strlen(name);
    char *p = malloc(a + b + 2);
    if (!p) return NULL;
    memcpy(p, dir, a);
    p[a] = '/';
    memcpy(p + a + 1, name, b + 1);
    return p;
}

static int st_ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

static uint64_t st_le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static void st_dtype_list(char *buf, size_t n) {
    size_t off = 0;
    buf[0] = '\0';
    for (int i = 0; i < DTYPE_COUNT && off < n; i++)
        off += (size_t)snprintf(buf + off, n - off, i ? ", %s" : "%s", dtype_name((mill_dtype)i));
}

static int st_push(safetensors *st, mill_err *e) {
    if (st->count == st->cap) {
        if (st->cap > INT_MAX / 4) return mill_errf(e, "safetensors: too many tensors (%d)", st->count);
        int cap = st->cap ? st->cap * 2 : 64;
        safetensors_entry *p = realloc(st->entries, (size_t)cap * sizeof *p);
        if (!p) return mill_errf(e, "safetensors: out of memory for %d entries", cap);
        st->entries = p;
        st->cap = cap;
    }
    return 0;
}

/* Checks one header entry and appends it; base is the data section. */
static int st_parse_entry(safetensors *st, const char *path, const char *name, json_t *v, int file,
                          const unsigned char *base, size_t data_len, mill_err *e) {
    if (!json_is_object(v)) return mill_errf(e, "%s: tensor " NAMEFMT ": entry is not an object", path, name);

    json_t *jd = json_object_get(v, "dtype");
    char list[128];
    mill_dtype dt;
    st_dtype_list(list, sizeof list);
    if (!json_is_string(jd))
        return mill_errf(e, "%s: tensor " NAMEFMT ": dtype is missing or not a string (expected one of %s)", path, name,
                         list);
    if (dtype_from_name(json_string_value(jd), &dt) != 0)
        return mill_errf(e, "%s: tensor " NAMEFMT ": unknown dtype \"%.40s\" (expected one of %s)", path, name,
                         json_string_value(jd), list);

    json_t *js = json_object_get(v, "shape");
    if (!json_is_array(js) || json_array_size(js) > TENSOR_MAX_DIMS)
        return mill_errf(e, "%s: tensor " NAMEFMT ": shape must be an array of at most %d non-negative integers", path,
                         name, TENSOR_MAX_DIMS);
    int ndim = (int)json_array_size(js);
    int64_t shape[TENSOR_MAX_DIMS] = {0};
    /* Count bytes in uint64 with an explicit overflow check: a hostile shape
     * must not wrap around to match a small byte range. */
    uint64_t need = dtype_size(dt);
    int overflow = 0;
    for (int i = 0; i < ndim; i++) {
        json_t *d = json_array_get(js, (size_t)i);
        if (!json_is_integer(d) || json_integer_value(d) < 0)
            return mill_errf(e, "%s: tensor " NAMEFMT ": shape must be an array of at most %d non-negative integers",
                             path, name, TENSOR_MAX_DIMS);
        shape[i] = (int64_t)json_integer_value(d);
        uint64_t dim = (uint64_t)shape[i];
        if (dim && need > UINT64_MAX / dim) overflow = 1;
        else need *= dim;
    }
    /* A zero dim makes the product 0 even if an earlier partial product overflowed. */
    for (int i = 0; i < ndim; i++)
        if (shape[i] == 0) overflow = 0, need = 0;

    json_t *jo = json_object_get(v, "data_offsets");
    json_t *jb = json_array_get(jo, 0), *je = json_array_get(jo, 1);
    if (!json_is_array(jo) || json_array_size(jo) != 2 || !json_is_integer(jb) || !json_is_integer(je) ||
        json_integer_value(jb) < 0 || json_integer_value(jb) > json_integer_value(je))
        return mill_errf(e, "%s: tensor " NAMEFMT ": data_offsets must be two integers [begin, end] with 0 <= begin <= end",
                         path, name);
    uint64_t begin = (uint64_t)json_integer_value(jb), end = (uint64_t)json_integer_value(je);
    if (end > data_len)
        return mill_errf(e,
                         "%s: tensor " NAMEFMT ": data_offsets [%llu, %llu] extend beyond the %zu-byte data section "
                         "(truncated file?)",
                         path, name, (unsigned long long)begin, (unsigned long long)end, data_len);
    char sbuf[160];
    if (overflow || need != end - begin) {
        tensor_shape_str(ndim, shape, sbuf, sizeof sbuf);
        if (overflow)
            return mill_errf(e, "%s: tensor " NAMEFMT ": shape %s with dtype %s overflows the byte count", path, name,
                             sbuf, dtype_name(dt));
        return mill_errf(e, "%s: tensor " NAMEFMT ": shape %s with dtype %s needs %llu bytes but data_offsets span %llu",
                         path, name, sbuf, dtype_name(dt), (unsigned long long)need, (unsigned long long)(end - begin));
    }

    if (st_push(st, e)) return mill_err_wrap(e, "%s", path);
    safetensors_entry *en = &st->entries[st->count];
    memset(en, 0, sizeof *en);
    en->name = st_strdup(name);
    if (!en->name) return mill_errf(e, "%s: out of memory", path);
    en->dtype = dt;
    en->ndim = ndim;
    memcpy(en->shape, shape, sizeof shape);
    en->data = base + begin;
    en->nbytes = (size_t)(end - begin);
    en->file = file;
    st->count++;
    return 0;
}

static int st_parse_metadata(safetensors *st, const char *path, json_t *m, int keep, mill_err *e) {
    if (!json_is_object(m)) return mill_errf(e, "%s: __metadata__ is not an object of strings", path);
    const char *k;
    json_t *v;
    json_object_foreach(m, k, v) {
        if (!json_is_string(v))
            return mill_errf(e, "%s: __metadata__ key " NAMEFMT ": value is not a string", path, k);
    }
    if (!keep) return 0;
    size_t n = json_object_size(m);
    st->meta = calloc(n ? n : 1, sizeof *st->meta);
    if (!st->meta) return mill_errf(e, "%s: out of memory", path);
    json_object_foreach(m, k, v) {
        st_meta *p = &st->meta[st->nmeta];
        p->key = st_strdup(k);
        p->value = st_strdup(json_string_value(v));
        st->nmeta++; /* counted before the check so close frees a half-made pair */
        if (!p->key || !p->value) return mill_errf(e, "%s: out of memory", path);
    }
    return 0;
}

static int st_entry_cmp(const void *a, const void *b) {
    const safetensors_entry *x = a, *y = b;
    if (x->data != y->data) return (const char *)x->data < (const char *)y->data ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* Maps one file and appends its tensors as shard number `file`. */
static int st_load_file(safetensors *st, const char *path, mill_err *e) {
    st_file *fs = realloc(st->files, (size_t)(st->nfiles + 1) * sizeof *fs);
    if (!fs) return mill_errf(e, "%s: out of memory", path);
    st->files = fs;
    int file = st->nfiles;
    st_file *f = &st->files[file];
    memset(f, 0, sizeof *f);
    f->path = st_strdup(path);
    if (!f->path) return mill_errf(e, "%s: out of memory", path);
    st->nfiles++; /* from here safetensors_close releases f */

    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return mill_errf(e, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int err = errno;
        close(fd);
        return mill_errf(e, "%s: cannot stat: %s", path, strerror(err));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return mill_errf(e, "%s: not a regular file", path);
    }
    if (sb.st_size < 8) {
        close(fd);
        return mill_errf(e, "%s: file is %lld bytes, shorter than the 8-byte header length (empty or truncated file)",
                         path, (long long)sb.st_size);
    }
    if ((unsigned long long)sb.st_size > SIZE_MAX) {
        close(fd);
        return mill_errf(e, "%s: file too large to map", path);
    }
    f->size = (size_t)sb.st_size;
    void *map = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
    int err = errno;
    close(fd); /* the mapping stays valid without the descriptor */
    if (map == MAP_FAILED) return mill_errf(e, "%s: mmap of %zu bytes failed: %s", path, f->size, strerror(err));
    f->map = map;

    const unsigned char *p = map;
    uint64_t hlen = st_le64(p);
    if (hlen > f->size - 8)
        return mill_errf(e, "%s: header length %llu exceeds the %zu bytes after it (truncated or not a safetensors file)",
                         path, (unsigned long long)hlen, f->size - 8);
    json_error_t je;
    json_t *root = json_loadb((const char *)p + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &je);
    if (!root)
        return mill_errf(e, "%s: header is not valid JSON: %s (line %d, column %d)", path, je.text, je.line, je.column);
    int rc = 0;
    if (!json_is_object(root)) {
        rc = mill_errf(e, "%s: header JSON is not an object", path);
        goto out;
    }
    const unsigned char *base = p + 8 + hlen;
    size_t data_len = f->size - 8 - (size_t)hlen;
    int first = st->count;
    const char *name;
    json_t *v;
    json_object_foreach(root, name, v) {
        if (strcmp(name, "__metadata__") == 0) rc = st_parse_metadata(st, path, v, file == 0, e);
        else rc = st_parse_entry(st, path, name, v, file, base, data_len, e);
        if (rc) goto out;
    }
    /* On-disk order gives a stable listing independent of JSON key order. */
    if (st->count > first) /* no tensors: entries may be NULL, and NULL + 0 is UB (tests/fuzz) */
        qsort(st->entries + first, (size_t)(st->count - first), sizeof *st->entries, st_entry_cmp);
out:
    json_decref(root);
    return rc;
}

static int st_build_names(safetensors *st, mill_err *e) {
    for (int i = 0; i < st->count; i++) {
        const safetensors_entry *en = &st->entries[i];
        int j = st_names_find(&st->names, en->name);
        if (j >= 0)
            return mill_errf(e, "%s: tensor " NAMEFMT " is duplicated: also in %s", st->files[en->file].path, en->name,
                             st->files[st->entries[j].file].path);
        if (st_names_add(&st->names, en->name, i)) return mill_errf(e, "safetensors: out of memory for the name table");
    }
    return 0;
}

/* Opens the shards named by an index's weight_map and checks each listed
 * tensor is in the shard the index says. */
static int st_load_index(safetensors *st, const char *ipath, mill_err *e) {
    json_error_t je;
    json_t *root = json_load_file(ipath, JSON_REJECT_DUPLICATES, &je);
    if (!root) return mill_errf(e, "%s: cannot read index JSON: %s (line %d, column %d)", ipath, je.text, je.line, je.column);
    int rc = 0;
    char *dir = NULL, *spath = NULL;
    const char **shards = NULL;
    json_t *wm = json_object_get(root, "weight_map");
    if (!json_is_object(root) || !json_is_object(wm) || json_object_size(wm) == 0) {
        rc = mill_errf(e, "%s: expected an object with a non-empty \"weight_map\" object", ipath);
        goto out;
    }
    /* Shard paths are relative to the index's directory. */
    const char *slash = strrchr(ipath, '/');
    dir = slash ? strndup(ipath, (size_t)(slash - ipath) + (slash == ipath)) : st_strdup(".");
    shards = calloc(json_object_size(wm), sizeof *shards);
    if (!dir || !shards) {
        rc = mill_errf(e, "%s: out of memory", ipath);
        goto out;
    }
    int nshards = 0;
    const char *tname;
    json_t *v;
    json_object_foreach(wm, tname, v) {
        const char *s = json_string_value(v);
        if (!s || !*s || s[0] == '/') {
            rc = mill_errf(e, "%s: weight_map[" NAMEFMT "] must be a relative shard file name", ipath, tname);
            goto out;
        }
        int seen = 0;
        for (int i = 0; i < nshards && !seen; i++) seen = strcmp(shards[i], s) == 0;
        if (seen) continue;
        shards[nshards++] = s;
        spath = slash ? st_join(dir, s) : st_strdup(s);
        if (!spath) {
            rc = mill_errf(e, "%s: out of memory", ipath);
            goto out;
        }
        if ((rc = st_load_file(st, spath, e))) {
            mill_err_wrap(e, "%s: shard \"%.200s\"", ipath, s);
            goto out;
        }
        free(spath);
        spath = NULL;
    }
    if ((rc = st_build_names(st, e))) goto out;
    json_object_foreach(wm, tname, v) {
        int shard = 0;
        while (strcmp(shards[shard], json_string_value(v)) != 0) shard++;
        int j = st_names_find(&st->names, tname);
        if (j < 0) {
            rc = mill_errf(e, "%s: tensor " NAMEFMT " listed for shard %s is missing from it", ipath, tname,
                           st->files[shard].path);
            goto out;
        }
        if (st->entries[j].file != shard) {
            rc = mill_errf(e, "%s: tensor " NAMEFMT " listed for shard %s is missing from it (found in %s)", ipath,
                           tname, st->files[shard].path, st->files[st->entries[j].file].path);
            goto out;
        }
    }
out:
    free(spath);
    free(shards);
    free(dir);
    json_decref(root);
    return rc;
}

int safetensors_open(const char *path, safetensors **out, mill_err *e) {
    *out = NULL;
    safetensors *st = calloc(1, sizeof *st);
    if (!st) return mill_errf(e, "%s: out of memory", path);
    char *dir = NULL, *cand = NULL;
    int rc;
    struct stat sb;
    if (stat(path, &sb) != 0) {
        rc = mill_errf(e, "%s: cannot open: %s", path, strerror(errno));
    } else if (S_ISDIR(sb.st_mode)) {
        /* Trailing slashes would make shard paths read "dir//x". */
        size_t n = strlen(path);
        while (n > 1 && path[n - 1] == '/') n--;
        dir = strndup(path, n);
        cand = dir ? st_join(dir, ST_INDEX_NAME) : NULL;
        if (!cand) {
            rc = mill_errf(e, "%s: out of memory", path);
        } else if (stat(cand, &sb) == 0) {
            rc = st_load_index(st, cand, e);
        } else {
            free(cand);
            cand = st_join(dir, ST_SINGLE_NAME);
            if (!cand) rc = mill_errf(e, "%s: out of memory", path);
            else if (stat(cand, &sb) == 0) rc = st_load_file(st, cand, e) || st_build_names(st, e) ? -1 : 0;
            else rc = mill_errf(e, "%s: directory has neither " ST_INDEX_NAME " nor " ST_SINGLE_NAME, path);
        }
    } else if (st_ends_with(path, ".json")) {
        rc = st_load_index(st, path, e);
    } else {
        rc = st_load_file(st, path, e) || st_build_names(st, e) ? -1 : 0;
    }
    free(cand);
    free(dir);
    if (rc) {
        safetensors_close(st);
        return -1;
    }
    *out = st;
    return 0;
}

void safetensors_close(safetensors *st) {
    if (!st) return;
    for (int i = 0; i < st->nfiles; i++) {
        if (st->files[i].map) munmap(st->files[i].map, st->files[i].size);
        free(st->files[i].path);
    }
    for (int i = 0; i < st->count; i++) free((char *)st->entries[i].name);
    for (int i = 0; i < st->nmeta; i++) {
        free(st->meta[i].key);
        free(st->meta[i].value);
    }
    st_names_free(&st->names);
    free(st->meta);
    free(st->entries);
    free(st->files);
    free(st);
}

int safetensors_count(const safetensors *st) { return st ? st->count : 0; }

const safetensors_entry *safetensors_at(const safetensors *st, int i) {
    return st && i >= 0 && i < st->count ? &st->entries[i] : NULL;
}

const safetensors_entry *safetensors_find(const safetensors *st, const char *name) {
    if (!st || !name) return NULL;
    int i = st_names_find(&st->names, name);
    return i < 0 ? NULL : &st->entries[i];
}

int safetensors_index(const safetensors *st, const safetensors_entry *en) {
    if (!st || !en || en < st->entries || en >= st->entries + st->count) return -1;
    return (int)(en - st->entries);
}

const char *safetensors_file_of(const safetensors *st, const safetensors_entry *en) {
    if (!st || !en || en->file < 0 || en->file >= st->nfiles) return NULL;
    return st->files[en->file].path;
}

const char *safetensors_metadata(const safetensors *st, const char *key) {
    if (!st || !key) return NULL;
    for (int i = 0; i < st->nmeta; i++)
        if (strcmp(st->meta[i].key, key) == 0) return st->meta[i].value;
    return NULL;
}

/* ---- writer ---- */

typedef struct {
    char *name;
    mill_dtype dtype;
    int ndim;
    int64_t shape[TENSOR_MAX_DIMS];
    void *data;
    size_t nbytes;
} st_wtensor;

struct safetensors_writer {
    st_wtensor *t;
    int n, cap;
    st_names names;
    st_meta *meta;
    int nmeta;
};

safetensors_writer *safetensors_writer_new(void) { return calloc(1, sizeof(safetensors_writer)); }

void safetensors_writer_free(safetensors_writer *w) {
    if (!w) return;
    for (int i = 0; i < w->n; i++) {
        free(w->t[i].name);
        free(w->t[i].data);
    }
    for (int i = 0; i < w->nmeta; i++) {
        free(w->meta[i].key);
        free(w->meta[i].value);
    }
    st_names_free(&w->names);
    free(w->t);
    free(w->meta);
    free(w);
}

int safetensors_writer_add(safetensors_writer *w, const char *name, mill_dtype dt, int ndim, const int64_t *shape,
                           const void *data, mill_err *e) {
    if (!name || !*name) return mill_errf(e, "safetensors_writer_add: empty tensor name");
    if (strcmp(name, "__metadata__") == 0)
        return mill_errf(e, "safetensors_writer_add: \"__metadata__\" is reserved, not a tensor name");
    if ((unsigned)dt >= DTYPE_COUNT)
        return mill_errf(e, "safetensors_writer_add: tensor " NAMEFMT ": invalid dtype %d", name, (int)dt);
    if (ndim < 0 || ndim > TENSOR_MAX_DIMS || (ndim > 0 && !shape))
        return mill_errf(e, "safetensors_writer_add: tensor " NAMEFMT ": %d dims (expected 0..%d)", name, ndim,
                         TENSOR_MAX_DIMS);
    uint64_t nb = dtype_size(dt);
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0)
            return mill_errf(e, "safetensors_writer_add: tensor " NAMEFMT ": negative dim %lld", name, (long long)shape[i]);
        if (shape[i] && nb > (uint64_t)INT64_MAX / (uint64_t)shape[i])
            return mill_errf(e, "safetensors_writer_add: tensor " NAMEFMT ": byte count overflows", name);
        nb *= (uint64_t)shape[i];
    }
    if (nb > SIZE_MAX) return mill_errf(e, "safetensors_writer_add: tensor " NAMEFMT ": too large", name);
    if (nb && !data) return mill_errf(e, "safetensors_writer_add: tensor " NAMEFMT ": NULL data", name);
    /* The header is JSON: catch a name jansson would refuse now, not at save. */
    json_t *js = json_string(name);
    if (!js) return mill_errf(e, "safetensors_writer_add: tensor name is not valid UTF-8");
    json_decref(js);
    if (st_names_find(&w->names, name) >= 0)
        return mill_errf(e, "safetensors_writer_add: duplicate tensor name " NAMEFMT, name);
    if (w->n == w->cap) {
        if (w->cap > INT_MAX / 4) return mill_errf(e, "safetensors_writer_add: too many tensors");
        int cap = w->cap ? w->cap * 2 : 64;
        st_wtensor *p = realloc(w->t, (size_t)cap * sizeof *p);
        if (!p) return mill_errf(e, "safetensors_writer_add: out of memory");
        w->t = p;
        w->cap = cap;
    }
    st_wtensor *t = &w->t[w->n];
    memset(t, 0, sizeof *t);
    t->name = st_strdup(name);
    t->data = malloc(nb ? (size_t)nb : 1);
    if (!t->name || !t->data || st_names_add(&w->names, t->name, w->n)) {
        free(t->name);
        free(t->data);
        return mill_errf(e, "safetensors_writer_add: tensor " NAMEFMT ": out of memory for %llu bytes", name,
                         (unsigned long long)nb);
    }
    if (nb) memcpy(t->data, data, (size_t)nb);
    t->dtype = dt;
    t->ndim = ndim;
    for (int i = 0; i < ndim; i++) t->shape[i] = shape[i];
    t->nbytes = (size_t)nb;
    w->n++;
    return 0;
}

int safetensors_writer_set_metadata(safetensors_writer *w, const char *key, const char *value, mill_err *e) {
    if (!key || !value) return mill_errf(e, "safetensors_writer_set_metadata: NULL key or value");
    json_t *jk = json_string(key), *jv = json_string(value);
    json_decref(jk);
    json_decref(jv);
    if (!jk || !jv) return mill_errf(e, "safetensors_writer_set_metadata: key or value is not valid UTF-8");
    char *v = st_strdup(value);
    if (!v) return mill_errf(e, "safetensors_writer_set_metadata: out of memory");
    for (int i = 0; i < w->nmeta; i++)
        if (strcmp(w->meta[i].key, key) == 0) { /* last write wins */
            free(w->meta[i].value);
            w->meta[i].value = v;
            return 0;
        }
    st_meta *m = realloc(w->meta, (size_t)(w->nmeta + 1) * sizeof *m);
    char *k = st_strdup(key);
    if (m) w->meta = m;
    if (!m || !k) {
        free(v);
        free(k);
        return mill_errf(e, "safetensors_writer_set_metadata: out of memory");
    }
    w->meta[w->nmeta].key = k;
    w->meta[w->nmeta].value = v;
    w->nmeta++;
    return 0;
}

/* Builds the header JSON; NULL on allocation failure. */
static char *st_header_json(const safetensors_writer *w) {
    json_t *root = json_object();
    if (!root) return NULL;
    int bad = 0;
    if (w->nmeta) {
        json_t *m = json_object();
        bad |= json_object_set_new(root, "__metadata__", m);
        for (int i = 0; i < w->nmeta && !bad; i++) bad |= json_object_set_new(m, w->meta[i].key, json_string(w->meta[i].value));
    }
    uint64_t off = 0;
    for (int i = 0; i < w->n && !bad; i++) {
        const st_wtensor *t = &w->t[i];
        json_t *shape = json_array(), *offs = json_array();
        bad |= json_object_set_new(root, t->name,
                                   json_pack("{s:s, s:o, s:o}", "dtype", dtype_name(t->dtype), "shape", shape,
                                             "data_offsets", offs)) != 0;
        for (int d = 0; d < t->ndim && !bad; d++) bad |= json_array_append_new(shape, json_integer(t->shape[d]));
        if (!bad) bad |= json_array_append_new(offs, json_integer((json_int_t)off));
        off += t->nbytes;
        if (!bad) bad |= json_array_append_new(offs, json_integer((json_int_t)off));
    }
    char *s = bad ? NULL : json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(root);
    return s;
}

static int st_fsync_dir(const char *path, mill_err *e) {
    const char *slash = strrchr(path, '/');
    char *dir = slash ? strndup(path, (size_t)(slash - path) + (slash == path)) : st_strdup(".");
    if (!dir) return mill_errf(e, "%s: out of memory", path);
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int rc = 0;
    if (fd < 0 || fsync(fd) != 0) rc = mill_errf(e, "%s: fsync of directory %s failed: %s", path, dir, strerror(errno));
    if (fd >= 0) close(fd);
    free(dir);
    return rc;
}

int safetensors_writer_save(safetensors_writer *w, const char *path, mill_err *e) {
    char *hdr = st_header_json(w);
    if (!hdr) return mill_errf(e, "%s: cannot build the safetensors header (out of memory)", path);
    /* Pad with spaces so the data section starts 8-byte aligned, as the
     * Python library does; mmap readers then see aligned tensors. */
    size_t hlen = strlen(hdr), padded = (hlen + 7) & ~(size_t)7;
    char *tmp = malloc(strlen(path) + 5);
    if (!tmp) {
        free(hdr);
        return mill_errf(e, "%s: out of memory", path);
    }
    sprintf(tmp, "%s.tmp", path);
    FILE *fp = fopen(tmp, "wb");
    if (!fp) {
        int err = errno;
        free(hdr);
        free(tmp);
        return mill_errf(e, "%s: cannot create %s.tmp: %s", path, path, strerror(err));
    }
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    int ok = fwrite(len8, 1, 8, fp) == 8 && fwrite(hdr, 1, hlen, fp) == hlen;
    for (size_t i = hlen; i < padded && ok; i++) ok = fputc(' ', fp) != EOF;
    for (int i = 0; i < w->n && ok; i++) ok = fwrite(w->t[i].data, 1, w->t[i].nbytes, fp) == w->t[i].nbytes;
    free(hdr);
    /* Data must be on disk before the rename makes it visible under path. */
    ok = ok && fflush(fp) == 0 && fsync(fileno(fp)) == 0;
    int err = errno;
    if (fclose(fp) != 0 && ok) ok = 0, err = errno;
    if (!ok) {
        unlink(tmp);
        free(tmp);
        return mill_errf(e, "%s: writing %s.tmp failed: %s", path, path, strerror(err));
    }
    if (rename(tmp, path) != 0) {
        err = errno;
        unlink(tmp);
        free(tmp);
        return mill_errf(e, "%s: rename from .tmp failed: %s", path, strerror(err));
    }
    free(tmp);
    return st_fsync_dir(path, e); /* makes the rename itself durable */
}
