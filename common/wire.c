/* common/wire.c — msgpack headers plus raw data frames over ZeroMQ (see wire.h).
 * The decoder never trusts a byte: the header is pre-scanned so that msgpack-c's allocations are
 * bounded by the header length, then every field is type- and range-checked before use. */
#include "wire.h"

#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <msgpack.h>
#include <zmq.h>

#define WIRE_MAX_KEY 64
#define WIRE_MAX_TYPE 31
#define WIRE_MAX_NAME 127
#define WIRE_MAX_IDENTITY 256
#define WIRE_MAX_TOTAL ((size_t)1 << 30) /* bytes of one received multipart message */
#define WIRE_MAX_PARTS (WIRE_MAX_FRAMES + 2)  /* identity + header + frames */

struct wire_msg {
    char *hdr;           /* own copy of the header: msgpack strings point into it */
    msgpack_unpacked up; /* owns the object tree */
    const msgpack_object_map *map;
    char type[WIRE_MAX_TYPE + 1];
    uint64_t id;
    int n_frames;
    wire_frame frames[WIRE_MAX_FRAMES];
};

/* ------------------------------------------------------------ pre-scan */

static uint64_t be_read(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = (v << 8) | p[i];
    return v;
}

/* Walks one msgpack object without allocating. msgpack-c allocates a container's element array
 * from its declared count before reading the elements, so a 5-byte "array of 2^32" would ask for
 * ~128 GiB; here every pending element must have at least one byte left, which bounds the whole
 * tree by the header length. Also rejects truncation, reserved bytes and trailing bytes. */
static int wire_prescan(const uint8_t *p, size_t len, mill_err *e) {
    size_t off = 0;
    uint64_t need = 1; /* objects still to read */
    while (need > 0) {
        if (off >= len) return mill_errf(e, "wire header: truncated msgpack (%zu bytes, more expected)", len);
        uint8_t b = p[off++];
        uint64_t skip = 0, items = 0; /* payload bytes after the length field; child objects */
        int lenbytes = 0;
        need--;
        if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) {
            /* fixint, nil, bool: no payload */
        } else if (b <= 0x8f) {
            items = 2u * (b & 0x0f);
        } else if (b <= 0x9f) {
            items = b & 0x0f;
        } else if (b <= 0xbf) {
            skip = b & 0x1f;
        } else if (b == 0xc1) {
            return mill_errf(e, "wire header: invalid msgpack byte 0xc1 at offset %zu", off - 1);
        } else {
            switch (b) {
            case 0xc4: case 0xd9: lenbytes = 1; break;                  /* bin8, str8 */
            case 0xc5: case 0xda: lenbytes = 2; break;                  /* bin16, str16 */
            case 0xc6: case 0xdb: lenbytes = 4; break;                  /* bin32, str32 */
            case 0xc7: lenbytes = 1; skip = 1; break;                   /* ext8: + type byte */
            case 0xc8: lenbytes = 2; skip = 1; break;
            case 0xc9: lenbytes = 4; skip = 1; break;
            case 0xca: skip = 4; break;
            case 0xcb: skip = 8; break;
            case 0xcc: case 0xd0: skip = 1; break;
            case 0xcd: case 0xd1: skip = 2; break;
            case 0xce: case 0xd2: skip = 4; break;
            case 0xcf: case 0xd3: skip = 8; break;
            case 0xd4: skip = 2; break; /* fixext: type byte + 1/2/4/8/16 */
            case 0xd5: skip = 3; break;
            case 0xd6: skip = 5; break;
            case 0xd7: skip = 9; break;
            case 0xd8: skip = 17; break;
            case 0xdc: case 0xde: lenbytes = 2; break; /* array16, map16 */
            case 0xdd: case 0xdf: lenbytes = 4; break; /* array32, map32 */
            default: return mill_errf(e, "wire header: invalid msgpack byte 0x%02x at offset %zu", b, off - 1);
            }
            if (lenbytes) {
                if (len - off < (size_t)lenbytes)
                    return mill_errf(e, "wire header: truncated msgpack length at offset %zu", off);
                uint64_t n = be_read(p + off, lenbytes);
                off += (size_t)lenbytes;
                if (b == 0xdc || b == 0xdd) items = n;
                else if (b == 0xde || b == 0xdf) items = 2 * n;
                else skip += n;
            }
        }
        if (skip > len - off)
            return mill_errf(e, "wire header: truncated msgpack: %llu bytes declared at offset %zu, %zu left",
                             (unsigned long long)skip, off, len - off);
        off += (size_t)skip;
        if (items > (uint64_t)(len - off) || need + items > (uint64_t)(len - off))
            return mill_errf(e, "wire header: truncated msgpack: container at offset %zu declares %llu items, only %zu bytes left",
                             off, (unsigned long long)items, len - off);
        need += items;
    }
    if (off != len) return mill_errf(e, "wire header: %zu trailing bytes after the msgpack map", len - off);
    return 0;
}

/* ------------------------------------------------------------ helpers */

static int str_eq(const msgpack_object *o, const char *s) {
    size_t n = strlen(s);
    return o->type == MSGPACK_OBJECT_STR && o->via.str.size == n && memcmp(o->via.str.ptr, s, n) == 0;
}

/* The value under key in a map whose keys are all strings, or NULL. */
static const msgpack_object *map_find(const msgpack_object_map *map, const char *key) {
    for (uint32_t i = 0; i < map->size; i++)
        if (str_eq(&map->ptr[i].key, key)) return &map->ptr[i].val;
    return NULL;
}

static const char *mp_type_name(msgpack_object_type t) {
    switch (t) {
    case MSGPACK_OBJECT_NIL: return "nil";
    case MSGPACK_OBJECT_BOOLEAN: return "bool";
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: return "integer";
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64: return "float";
    case MSGPACK_OBJECT_STR: return "string";
    case MSGPACK_OBJECT_ARRAY: return "array";
    case MSGPACK_OBJECT_MAP: return "map";
    case MSGPACK_OBJECT_BIN: return "bin";
    case MSGPACK_OBJECT_EXT: return "ext";
    }
    return "unknown";
}

static int check_keys(const msgpack_object_map *map, const char *where, mill_err *e) {
    for (uint32_t i = 0; i < map->size; i++) {
        const msgpack_object *k = &map->ptr[i].key;
        if (k->type != MSGPACK_OBJECT_STR)
            return mill_errf(e, "%s: key %u is a %s, expected a string", where, i, mp_type_name(k->type));
        if (k->via.str.size > WIRE_MAX_KEY)
            return mill_errf(e, "%s: key %u is %u bytes, expected at most %d", where, i, k->via.str.size,
                             WIRE_MAX_KEY);
    }
    return 0;
}

/* An integer object as int64; 0 when it fits, -1 when it is not an integer or exceeds int64. */
static int obj_int64(const msgpack_object *o, int64_t *out) {
    if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
        if (o->via.u64 > (uint64_t)INT64_MAX) return -1;
        *out = (int64_t)o->via.u64;
        return 0;
    }
    if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
        *out = o->via.i64;
        return 0;
    }
    return -1;
}

/* Copies a string object (1..cap-1 bytes, no NUL) into buf. */
static int copy_name(const msgpack_object *o, char *buf, size_t cap) {
    if (o->type != MSGPACK_OBJECT_STR || o->via.str.size == 0 || o->via.str.size >= cap) return -1;
    if (memchr(o->via.str.ptr, 0, o->via.str.size)) return -1;
    memcpy(buf, o->via.str.ptr, o->via.str.size);
    buf[o->via.str.size] = 0;
    return 0;
}

/* ------------------------------------------------------------ decoding */

static int decode_frame_desc(wire_msg *m, int i, const msgpack_object *d, mill_err *e) {
    wire_frame *f = &m->frames[i];
    char where[64];
    snprintf(where, sizeof where, "wire header: frames[%d]", i);
    if (d->type != MSGPACK_OBJECT_MAP) return mill_errf(e, "%s is a %s, expected a map", where, mp_type_name(d->type));
    if (check_keys(&d->via.map, where, e)) return -1;

    const msgpack_object *name = map_find(&d->via.map, "name");
    if (!name) return mill_errf(e, "%s: missing \"name\"", where);
    if (copy_name(name, f->name, sizeof f->name))
        return mill_errf(e, "%s: \"name\" must be a string of 1..%d bytes without NUL", where, WIRE_MAX_NAME);
    for (int j = 0; j < i; j++)
        if (strcmp(m->frames[j].name, f->name) == 0)
            return mill_errf(e, "%s: duplicate frame name \"%s\" (also frames[%d])", where, f->name, j);

    const msgpack_object *dt = map_find(&d->via.map, "dtype");
    char dtbuf[16];
    if (!dt) return mill_errf(e, "%s (\"%s\"): missing \"dtype\"", where, f->name);
    if (copy_name(dt, dtbuf, sizeof dtbuf) || dtype_from_name(dtbuf, &f->dtype))
        return mill_errf(e, "%s (\"%s\"): \"dtype\" must be a dtype name (F32, BF16, I32, ...)", where, f->name);

    const msgpack_object *sh = map_find(&d->via.map, "shape");
    if (!sh) return mill_errf(e, "%s (\"%s\"): missing \"shape\"", where, f->name);
    if (sh->type != MSGPACK_OBJECT_ARRAY || sh->via.array.size > TENSOR_MAX_DIMS)
        return mill_errf(e, "%s (\"%s\"): \"shape\" must be an array of at most %d integers", where, f->name,
                         TENSOR_MAX_DIMS);
    f->ndim = (int)sh->via.array.size;
    int has_zero = 0;
    for (int k = 0; k < f->ndim; k++) {
        const msgpack_object *v = &sh->via.array.ptr[k];
        if (v->type != MSGPACK_OBJECT_POSITIVE_INTEGER || v->via.u64 > (uint64_t)INT64_MAX)
            return mill_errf(e, "%s (\"%s\"): shape[%d] must be a non-negative integer below 2^63", where, f->name,
                             k);
        f->shape[k] = (int64_t)v->via.u64;
        has_zero |= f->shape[k] == 0;
    }
    /* A zero dimension makes the tensor empty whatever the other dimensions are. */
    uint64_t numel = has_zero ? 0 : 1;
    for (int k = 0; k < f->ndim && !has_zero; k++) {
        if (numel > (uint64_t)INT64_MAX / (uint64_t)f->shape[k])
            return mill_errf(e, "%s (\"%s\"): shape overflows (element count above 2^63)", where, f->name);
        numel *= (uint64_t)f->shape[k];
    }
    size_t dsz = dtype_size(f->dtype);
    if (numel > SIZE_MAX / dsz)
        return mill_errf(e, "%s (\"%s\"): shape overflows (byte size above SIZE_MAX)", where, f->name);
    f->nbytes = (size_t)numel * dsz;
    return 0;
}

int wire_decode(wire_msg **out, const void *header, size_t header_len, const void *const *frames,
                const size_t *frame_lens, int n_frames, mill_err *e) {
    if (!out) return mill_errf(e, "wire_decode: out is NULL");
    *out = NULL;
    if (!header && header_len) return mill_errf(e, "wire header: NULL buffer");
    if (header_len == 0) return mill_errf(e, "wire header: empty, expected a msgpack map");
    if (header_len > WIRE_MAX_HEADER)
        return mill_errf(e, "wire header: %zu bytes, expected at most %d", header_len, WIRE_MAX_HEADER);
    if (n_frames < 0 || n_frames > WIRE_MAX_FRAMES)
        return mill_errf(e, "wire frames: %d data frames, expected 0..%d", n_frames, WIRE_MAX_FRAMES);
    if (n_frames > 0 && (!frames || !frame_lens)) return mill_errf(e, "wire frames: NULL frame arrays");
    if (wire_prescan(header, header_len, e)) return -1;
    if (((const uint8_t *)header)[0] < 0x80 || ((const uint8_t *)header)[0] > 0x8f) {
        uint8_t b = ((const uint8_t *)header)[0];
        if (b != 0xde && b != 0xdf) return mill_errf(e, "wire header: not a msgpack map (first byte 0x%02x)", b);
    }

    wire_msg *m = calloc(1, sizeof *m);
    if (!m) return mill_errf(e, "wire header: out of memory");
    m->hdr = malloc(header_len);
    if (!m->hdr) {
        free(m);
        return mill_errf(e, "wire header: out of memory");
    }
    memcpy(m->hdr, header, header_len);
    msgpack_unpacked_init(&m->up);
    size_t off = 0;
    msgpack_unpack_return r = msgpack_unpack_next(&m->up, m->hdr, header_len, &off);
    if ((r != MSGPACK_UNPACK_SUCCESS && r != MSGPACK_UNPACK_EXTRA_BYTES) || off != header_len) {
        mill_errf(e, "wire header: malformed msgpack (unpack result %d, %zu of %zu bytes used; nested too deep?)",
                  (int)r, off, header_len);
        goto fail;
    }
    if (m->up.data.type != MSGPACK_OBJECT_MAP) {
        mill_errf(e, "wire header: a %s, expected a msgpack map", mp_type_name(m->up.data.type));
        goto fail;
    }
    m->map = &m->up.data.via.map;
    if (check_keys(m->map, "wire header", e)) goto fail;

    const msgpack_object *o = map_find(m->map, "type");
    if (!o) {
        mill_errf(e, "wire header: missing required field \"type\"");
        goto fail;
    }
    if (o->type != MSGPACK_OBJECT_STR || o->via.str.size < 1 || o->via.str.size > WIRE_MAX_TYPE) {
        mill_errf(e, "wire header: \"type\" must be a string of 1..%d characters", WIRE_MAX_TYPE);
        goto fail;
    }
    for (uint32_t i = 0; i < o->via.str.size; i++)
        if ((unsigned char)o->via.str.ptr[i] < 0x20 || (unsigned char)o->via.str.ptr[i] > 0x7e) {
            mill_errf(e, "wire header: \"type\" byte %u is 0x%02x, expected printable ASCII", i,
                      (unsigned char)o->via.str.ptr[i]);
            goto fail;
        }
    memcpy(m->type, o->via.str.ptr, o->via.str.size);
    m->type[o->via.str.size] = 0;

    o = map_find(m->map, "v");
    if (!o || o->type != MSGPACK_OBJECT_POSITIVE_INTEGER || o->via.u64 != WIRE_VERSION) {
        if (!o) mill_errf(e, "wire header: missing required field \"v\" (expected version %d)", WIRE_VERSION);
        else if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER)
            mill_errf(e, "wire header: \"v\" is version %llu, expected version %d", (unsigned long long)o->via.u64,
                      WIRE_VERSION);
        else mill_errf(e, "wire header: \"v\" is a %s, expected version %d", mp_type_name(o->type), WIRE_VERSION);
        goto fail;
    }

    o = map_find(m->map, "id");
    if (!o || o->type != MSGPACK_OBJECT_POSITIVE_INTEGER) {
        if (!o) mill_errf(e, "wire header: missing required field \"id\"");
        else if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER)
            mill_errf(e, "wire header: \"id\" is below 0, expected a non-negative integer");
        else mill_errf(e, "wire header: \"id\" is a %s, expected a non-negative integer", mp_type_name(o->type));
        goto fail;
    }
    m->id = o->via.u64;

    o = map_find(m->map, "frames");
    uint32_t n_desc = 0;
    if (o) {
        if (o->type != MSGPACK_OBJECT_ARRAY) {
            mill_errf(e, "wire header: \"frames\" is a %s, expected an array", mp_type_name(o->type));
            goto fail;
        }
        n_desc = o->via.array.size;
        if (n_desc > WIRE_MAX_FRAMES) {
            mill_errf(e, "wire header: \"frames\" has %u entries, expected at most %d", n_desc, WIRE_MAX_FRAMES);
            goto fail;
        }
    }
    if (n_desc != (uint32_t)n_frames) {
        mill_errf(e, "wire header: \"frames\" describes %u frames, but %d data frames arrived", n_desc, n_frames);
        goto fail;
    }
    for (int i = 0; i < n_frames; i++) {
        if (decode_frame_desc(m, i, &o->via.array.ptr[i], e)) goto fail;
        wire_frame *f = &m->frames[i];
        if (frame_lens[i] != f->nbytes) {
            char sb[128];
            tensor_shape_str(f->ndim, f->shape, sb, sizeof sb);
            mill_errf(e, "wire frame \"%s\" (frames[%d]): %zu bytes arrived, expected %zu (%s %s)", f->name, i,
                      frame_lens[i], f->nbytes, dtype_name(f->dtype), sb);
            goto fail;
        }
        if (!frames[i] && f->nbytes) {
            mill_errf(e, "wire frame \"%s\" (frames[%d]): NULL data", f->name, i);
            goto fail;
        }
        f->data = frames[i];
    }
    m->n_frames = n_frames;
    *out = m;
    return 0;
fail:
    wire_msg_free(m);
    return -1;
}

void wire_msg_free(wire_msg *m) {
    if (!m) return;
    msgpack_unpacked_destroy(&m->up);
    free(m->hdr);
    free(m);
}

const char *wire_type(const wire_msg *m) { return m ? m->type : ""; }
uint64_t wire_id(const wire_msg *m) { return m ? m->id : 0; }
int wire_n_frames(const wire_msg *m) { return m ? m->n_frames : 0; }

const wire_frame *wire_frame_at(const wire_msg *m, int i) {
    if (!m || i < 0 || i >= m->n_frames) return NULL;
    return &m->frames[i];
}

const wire_frame *wire_frame_named(const wire_msg *m, const char *name) {
    if (!m || !name) return NULL;
    for (int i = 0; i < m->n_frames; i++)
        if (strcmp(m->frames[i].name, name) == 0) return &m->frames[i];
    return NULL;
}

/* ------------------------------------------------------------ getters */

/* Finds key: 1 present (*o set), 0 absent and optional, -1 absent and required (e set). */
static int field(const wire_msg *m, const char *key, int required, const msgpack_object **o, mill_err *e) {
    if (!m || !key) return mill_errf(e, "wire field: NULL message or key");
    *o = map_find(m->map, key);
    if (*o) return 1;
    if (required) return mill_errf(e, "wire field \"%s\": missing (required)", key);
    return 0;
}

int wire_get_int(const wire_msg *m, const char *key, int required, int64_t def, int64_t lo, int64_t hi, int64_t *out,
                 mill_err *e) {
    const msgpack_object *o;
    int r = field(m, key, required, &o, e);
    if (r < 0) return -1;
    if (r == 0) {
        *out = def;
        return 0;
    }
    int64_t v;
    if (obj_int64(o, &v)) {
        if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER)
            return mill_errf(e, "wire field \"%s\": %llu is out of range, expected an integer in [%lld, %lld]", key,
                             (unsigned long long)o->via.u64, (long long)lo, (long long)hi);
        return mill_errf(e, "wire field \"%s\": a %s, expected an integer", key, mp_type_name(o->type));
    }
    if (v < lo || v > hi)
        return mill_errf(e, "wire field \"%s\": %lld is out of range, expected an integer in [%lld, %lld]", key,
                         (long long)v, (long long)lo, (long long)hi);
    *out = v;
    return 0;
}

int wire_get_num(const wire_msg *m, const char *key, int required, double def, double lo, double hi, double *out,
                 mill_err *e) {
    const msgpack_object *o;
    int r = field(m, key, required, &o, e);
    if (r < 0) return -1;
    if (r == 0) {
        *out = def;
        return 0;
    }
    double v;
    switch (o->type) {
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64: v = o->via.f64; break;
    case MSGPACK_OBJECT_POSITIVE_INTEGER: v = (double)o->via.u64; break;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: v = (double)o->via.i64; break;
    default: return mill_errf(e, "wire field \"%s\": a %s, expected a number", key, mp_type_name(o->type));
    }
    if (!(v >= lo && v <= hi)) /* NaN fails too */
        return mill_errf(e, "wire field \"%s\": %g is out of range, expected a number in [%g, %g]", key, v, lo, hi);
    *out = v;
    return 0;
}

int wire_get_bool(const wire_msg *m, const char *key, int required, int def, int *out, mill_err *e) {
    const msgpack_object *o;
    int r = field(m, key, required, &o, e);
    if (r < 0) return -1;
    if (r == 0) {
        *out = def;
        return 0;
    }
    if (o->type != MSGPACK_OBJECT_BOOLEAN)
        return mill_errf(e, "wire field \"%s\": a %s, expected a bool", key, mp_type_name(o->type));
    *out = o->via.boolean ? 1 : 0;
    return 0;
}

int wire_get_str(const wire_msg *m, const char *key, int required, const char *def, char *buf, size_t cap,
                 mill_err *e) {
    if (!buf || cap == 0) return mill_errf(e, "wire field \"%s\": no buffer", key ? key : "?");
    const msgpack_object *o;
    int r = field(m, key, required, &o, e);
    if (r < 0) return -1;
    if (r == 0) {
        size_t n = def ? strlen(def) : 0;
        if (n >= cap) return mill_errf(e, "wire field \"%s\": default is %zu bytes, buffer holds %zu", key, n, cap - 1);
        memcpy(buf, def ? def : "", n + 1);
        return 0;
    }
    if (o->type != MSGPACK_OBJECT_STR)
        return mill_errf(e, "wire field \"%s\": a %s, expected a string", key, mp_type_name(o->type));
    if (o->via.str.size >= cap)
        return mill_errf(e, "wire field \"%s\": %u bytes, expected at most %zu", key, o->via.str.size, cap - 1);
    /* A NUL inside would silently cut the C string the caller sees. */
    if (memchr(o->via.str.ptr, 0, o->via.str.size))
        return mill_errf(e, "wire field \"%s\": string contains a NUL byte", key);
    memcpy(buf, o->via.str.ptr, o->via.str.size);
    buf[o->via.str.size] = 0;
    return 0;
}

int wire_get_int_array(const wire_msg *m, const char *key, int required, int64_t lo, int64_t hi, int64_t *out, int cap,
                       int *n, mill_err *e) {
    const msgpack_object *o;
    int r = field(m, key, required, &o, e);
    if (r < 0) return -1;
    *n = 0;
    if (r == 0) return 0;
    if (o->type != MSGPACK_OBJECT_ARRAY)
        return mill_errf(e, "wire field \"%s\": a %s, expected an array of integers", key, mp_type_name(o->type));
    if (cap < 0 || o->via.array.size > (uint32_t)cap)
        return mill_errf(e, "wire field \"%s\": %u elements, expected at most %d", key, o->via.array.size, cap);
    for (uint32_t i = 0; i < o->via.array.size; i++) {
        int64_t v;
        if (obj_int64(&o->via.array.ptr[i], &v) || v < lo || v > hi)
            return mill_errf(e, "wire field \"%s\": element %u must be an integer in [%lld, %lld]", key, i,
                             (long long)lo, (long long)hi);
        out[i] = v;
    }
    *n = (int)o->via.array.size;
    return 0;
}

/* ------------------------------------------------------------ encoding */

typedef enum { FIELD_INT, FIELD_NUM, FIELD_BOOL, FIELD_STR, FIELD_INTS } field_kind;

typedef struct {
    char key[WIRE_MAX_KEY + 1];
    field_kind kind;
    int64_t i, ints[WIRE_MAX_INTS];
    int n_ints;
    double d;
    char *s;
} wire_field;

struct wire_builder {
    char type[WIRE_MAX_TYPE + 2]; /* one spare byte to notice an over-long type */
    uint64_t id;
    wire_field *fields;
    int n_fields, cap_fields;
    wire_frame frames[WIRE_MAX_FRAMES];
    int n_frames;
    msgpack_sbuffer sbuf;
    char err[256]; /* the first put error: puts return void, so pack reports it */
};

wire_builder *wire_builder_new(const char *type, uint64_t id) {
    wire_builder *b = calloc(1, sizeof *b);
    if (!b) return NULL;
    msgpack_sbuffer_init(&b->sbuf);
    b->id = id;
    if (!type) snprintf(b->err, sizeof b->err, "wire builder: NULL type");
    else snprintf(b->type, sizeof b->type, "%s", type);
    return b;
}

static void put_error(wire_builder *b, const char *key, const char *why) {
    if (!b->err[0]) snprintf(b->err, sizeof b->err, "wire field \"%.64s\": %s", key ? key : "(null)", why);
}

/* A new field slot, or NULL after recording why. */
static wire_field *put_field(wire_builder *b, const char *key, field_kind kind) {
    if (!b) return NULL;
    if (!key || !key[0] || strlen(key) > WIRE_MAX_KEY) {
        put_error(b, key, "key must be 1..64 bytes");
        return NULL;
    }
    if (!strcmp(key, "type") || !strcmp(key, "v") || !strcmp(key, "id") || !strcmp(key, "frames")) {
        put_error(b, key, "reserved key");
        return NULL;
    }
    for (int i = 0; i < b->n_fields; i++)
        if (!strcmp(b->fields[i].key, key)) {
            put_error(b, key, "put twice");
            return NULL;
        }
    if (b->n_fields == b->cap_fields) {
        int cap = b->cap_fields ? 2 * b->cap_fields : 8;
        wire_field *f = realloc(b->fields, (size_t)cap * sizeof *f);
        if (!f) {
            put_error(b, key, "out of memory");
            return NULL;
        }
        b->fields = f;
        b->cap_fields = cap;
    }
    wire_field *f = &b->fields[b->n_fields++];
    memset(f, 0, sizeof *f);
    strcpy(f->key, key);
    f->kind = kind;
    return f;
}

void wire_put_int(wire_builder *b, const char *key, int64_t v) {
    wire_field *f = put_field(b, key, FIELD_INT);
    if (f) f->i = v;
}

void wire_put_int_array(wire_builder *b, const char *key, const int64_t *v, int n) {
    if (n < 0 || n > WIRE_MAX_INTS) {
        put_error(b, key, "too many integers");
        return;
    }
    wire_field *f = put_field(b, key, FIELD_INTS);
    if (!f) return;
    memcpy(f->ints, v, sizeof(int64_t) * (size_t)n);
    f->n_ints = n;
}

void wire_put_num(wire_builder *b, const char *key, double v) {
    wire_field *f = put_field(b, key, FIELD_NUM);
    if (f) f->d = v;
}

void wire_put_bool(wire_builder *b, const char *key, int v) {
    wire_field *f = put_field(b, key, FIELD_BOOL);
    if (f) f->i = v != 0;
}

void wire_put_str(wire_builder *b, const char *key, const char *v) {
    if (b && !v) {
        put_error(b, key, "NULL string");
        return;
    }
    wire_field *f = put_field(b, key, FIELD_STR);
    if (!f) return;
    f->s = strdup(v);
    if (!f->s) {
        b->n_fields--;
        put_error(b, key, "out of memory");
    }
}

int wire_put_frame(wire_builder *b, const char *name, mill_dtype dt, int ndim, const int64_t *shape, const void *data,
                   mill_err *e) {
    if (!b) return mill_errf(e, "wire_put_frame: NULL builder");
    if (!name || !name[0] || strlen(name) > WIRE_MAX_NAME)
        return mill_errf(e, "wire frame: name must be 1..%d bytes", WIRE_MAX_NAME);
    if (b->n_frames >= WIRE_MAX_FRAMES)
        return mill_errf(e, "wire frame \"%s\": already %d frames, at most %d", name, b->n_frames, WIRE_MAX_FRAMES);
    for (int i = 0; i < b->n_frames; i++)
        if (!strcmp(b->frames[i].name, name)) return mill_errf(e, "wire frame \"%s\": duplicate name", name);
    if ((unsigned)dt >= DTYPE_COUNT) return mill_errf(e, "wire frame \"%s\": invalid dtype %d", name, (int)dt);
    if (ndim < 0 || ndim > TENSOR_MAX_DIMS || (ndim > 0 && !shape))
        return mill_errf(e, "wire frame \"%s\": ndim %d, expected 0..%d", name, ndim, TENSOR_MAX_DIMS);
    wire_frame *f = &b->frames[b->n_frames];
    memset(f, 0, sizeof *f);
    uint64_t numel = 1;
    for (int k = 0; k < ndim; k++) {
        if (shape[k] < 0) return mill_errf(e, "wire frame \"%s\": shape[%d] = %lld, expected >= 0", name, k,
                                           (long long)shape[k]);
        if (shape[k] && numel > (uint64_t)INT64_MAX / (uint64_t)shape[k])
            return mill_errf(e, "wire frame \"%s\": shape overflows", name);
        numel *= (uint64_t)shape[k];
        f->shape[k] = shape[k];
    }
    if (numel > SIZE_MAX / dtype_size(dt)) return mill_errf(e, "wire frame \"%s\": shape overflows", name);
    f->nbytes = (size_t)numel * dtype_size(dt);
    if (f->nbytes && !data) return mill_errf(e, "wire frame \"%s\": NULL data for %zu bytes", name, f->nbytes);
    strcpy(f->name, name);
    f->dtype = dt;
    f->ndim = ndim;
    f->data = data;
    b->n_frames++;
    return 0;
}

static int pack_cstr(msgpack_packer *pk, const char *s) {
    size_t n = strlen(s);
    return msgpack_pack_str(pk, n) || msgpack_pack_str_body(pk, s, n);
}

static int pack_all(wire_builder *b, msgpack_packer *pk) {
    if (msgpack_pack_map(pk, 4 + (size_t)b->n_fields)) return -1;
    if (pack_cstr(pk, "type") || pack_cstr(pk, b->type)) return -1;
    if (pack_cstr(pk, "v") || msgpack_pack_int(pk, WIRE_VERSION)) return -1;
    if (pack_cstr(pk, "id") || msgpack_pack_uint64(pk, b->id)) return -1;
    for (int i = 0; i < b->n_fields; i++) {
        const wire_field *f = &b->fields[i];
        int r = pack_cstr(pk, f->key);
        switch (f->kind) {
        case FIELD_INT: r = r || msgpack_pack_int64(pk, f->i); break;
        case FIELD_NUM: r = r || msgpack_pack_double(pk, f->d); break;
        case FIELD_BOOL: r = r || (f->i ? msgpack_pack_true(pk) : msgpack_pack_false(pk)); break;
        case FIELD_STR: r = r || pack_cstr(pk, f->s); break;
        case FIELD_INTS:
            r = r || msgpack_pack_array(pk, (size_t)f->n_ints);
            for (int k = 0; !r && k < f->n_ints; k++) r = msgpack_pack_int64(pk, f->ints[k]);
            break;
        }
        if (r) return -1;
    }
    if (pack_cstr(pk, "frames") || msgpack_pack_array(pk, (size_t)b->n_frames)) return -1;
    for (int i = 0; i < b->n_frames; i++) {
        const wire_frame *f = &b->frames[i];
        if (msgpack_pack_map(pk, 3) || pack_cstr(pk, "name") || pack_cstr(pk, f->name) || pack_cstr(pk, "dtype") ||
            pack_cstr(pk, dtype_name(f->dtype)) || pack_cstr(pk, "shape") || msgpack_pack_array(pk, (size_t)f->ndim))
            return -1;
        for (int k = 0; k < f->ndim; k++)
            if (msgpack_pack_int64(pk, f->shape[k])) return -1;
    }
    return 0;
}

int wire_builder_pack(wire_builder *b, const void **header, size_t *header_len, mill_err *e) {
    if (!b) return mill_errf(e, "wire_builder_pack: NULL builder (out of memory?)");
    if (b->err[0]) return mill_errf(e, "%s", b->err);
    size_t tn = strlen(b->type);
    if (tn < 1 || tn > WIRE_MAX_TYPE) return mill_errf(e, "wire \"type\": must be 1..%d characters", WIRE_MAX_TYPE);
    for (size_t i = 0; i < tn; i++)
        if ((unsigned char)b->type[i] < 0x20 || (unsigned char)b->type[i] > 0x7e)
            return mill_errf(e, "wire \"type\": byte %zu is not printable ASCII", i);
    msgpack_sbuffer_clear(&b->sbuf);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &b->sbuf, msgpack_sbuffer_write);
    if (pack_all(b, &pk)) return mill_errf(e, "wire header: out of memory while packing");
    if (b->sbuf.size > WIRE_MAX_HEADER)
        return mill_errf(e, "wire header: %zu bytes packed, at most %d allowed", b->sbuf.size, WIRE_MAX_HEADER);
    *header = b->sbuf.data;
    *header_len = b->sbuf.size;
    return 0;
}

int wire_builder_n_frames(const wire_builder *b) { return b ? b->n_frames : 0; }

void wire_builder_frame(const wire_builder *b, int i, const void **data, size_t *len) {
    if (!b || i < 0 || i >= b->n_frames) {
        *data = NULL;
        *len = 0;
        return;
    }
    *data = b->frames[i].data;
    *len = b->frames[i].nbytes;
}

void wire_builder_free(wire_builder *b) {
    if (!b) return;
    for (int i = 0; i < b->n_fields; i++) free(b->fields[i].s);
    free(b->fields);
    msgpack_sbuffer_destroy(&b->sbuf);
    free(b);
}

/* ------------------------------------------------------------ ZeroMQ */

/* Sends one part (copied into a zmq message, so the caller may free its buffer at once). */
static int send_part(void *sock, const void *data, size_t len, int more, const char *what, mill_err *e) {
    zmq_msg_t msg;
    if (zmq_msg_init_size(&msg, len))
        return mill_errf(e, "wire_send: %s: zmq_msg_init_size(%zu): %s", what, len, zmq_strerror(zmq_errno()));
    if (len) memcpy(zmq_msg_data(&msg), data, len);
    for (;;) {
        if (zmq_msg_send(&msg, sock, more ? ZMQ_SNDMORE : 0) >= 0) return 0; /* zmq now owns msg */
        if (zmq_errno() != EINTR) break;
    }
    int err = zmq_errno();
    zmq_msg_close(&msg);
    return mill_errf(e, "wire_send: %s: zmq_msg_send: %s", what, zmq_strerror(err));
}

int wire_send(void *sock, const void *identity, size_t identity_len, wire_builder *b, mill_err *e) {
    if (!sock || !b) return mill_errf(e, "wire_send: NULL socket or builder");
    const void *hdr;
    size_t hlen;
    if (wire_builder_pack(b, &hdr, &hlen, e)) return -1;
    int nf = b->n_frames;
    /* Once the first part is queued ZeroMQ cannot cancel the message, so a later failure leaves a
     * partial multipart message; in practice only the first send fails (unroutable peer). */
    if (identity && send_part(sock, identity, identity_len, 1, "identity", e)) return -1;
    if (send_part(sock, hdr, hlen, nf > 0, "header", e)) return -1;
    for (int i = 0; i < nf; i++) {
        char what[160];
        snprintf(what, sizeof what, "frame \"%s\"", b->frames[i].name);
        if (send_part(sock, b->frames[i].data, b->frames[i].nbytes, i + 1 < nf, what, e)) return -1;
    }
    return 0;
}

struct wire_raw {
    zmq_msg_t parts[WIRE_MAX_PARTS];
    int n;
};

int wire_raw_parts(const wire_raw *raw, int is_router, const void **data, size_t *lens, int cap) {
    int n = 0;
    for (int i = is_router ? 1 : 0; i < raw->n && n < cap; i++, n++) {
        data[n] = zmq_msg_data((zmq_msg_t *)&raw->parts[i]);
        lens[n] = zmq_msg_size((zmq_msg_t *)&raw->parts[i]);
    }
    return n;
}

uint64_t wire_peek_id(const void *header, size_t header_len) {
    mill_err e;
    if (!header || !header_len || header_len > WIRE_MAX_HEADER || wire_prescan(header, header_len, &e)) return 0;
    msgpack_unpacked up;
    msgpack_unpacked_init(&up);
    size_t off = 0;
    uint64_t id = 0;
    msgpack_unpack_return r = msgpack_unpack_next(&up, header, header_len, &off);
    if ((r == MSGPACK_UNPACK_SUCCESS || r == MSGPACK_UNPACK_EXTRA_BYTES) && up.data.type == MSGPACK_OBJECT_MAP) {
        const msgpack_object *o = map_find(&up.data.via.map, "id");
        if (o && o->type == MSGPACK_OBJECT_POSITIVE_INTEGER) id = o->via.u64;
    }
    msgpack_unpacked_destroy(&up);
    return id;
}

uint64_t wire_raw_id(const wire_raw *raw, int is_router) {
    const void *data[1];
    size_t len[1];
    return raw && wire_raw_parts(raw, is_router, data, len, 1) == 1 ? wire_peek_id(data[0], len[0]) : 0;
}

void wire_recv_free(wire_raw *raw) {
    if (!raw) return;
    for (int i = 0; i < raw->n; i++) zmq_msg_close(&raw->parts[i]);
    free(raw);
}

static int recv_part(void *sock, zmq_msg_t *msg, mill_err *e) {
    if (zmq_msg_init(msg)) return mill_errf(e, "wire_recv: zmq_msg_init: %s", zmq_strerror(zmq_errno()));
    for (;;) {
        if (zmq_msg_recv(msg, sock, 0) >= 0) return 0;
        if (zmq_errno() != EINTR) break;
    }
    int err = zmq_errno();
    zmq_msg_close(msg);
    return mill_errf(e, "wire_recv: zmq_msg_recv: %s", zmq_strerror(err));
}

/* Reads and drops the remaining parts of the current message so the next recv starts clean. */
static void drain(void *sock) {
    int more = 1;
    size_t sz = sizeof more;
    while (zmq_getsockopt(sock, ZMQ_RCVMORE, &more, &sz) == 0 && more) {
        zmq_msg_t msg;
        if (recv_part(sock, &msg, NULL)) return;
        zmq_msg_close(&msg);
        sz = sizeof more;
    }
}

int wire_recv(void *sock, int is_router, int timeout_ms, unsigned char *identity, size_t *identity_len, wire_msg **msg,
              wire_raw **raw, mill_err *e) {
    if (!sock || !msg || !raw) return mill_errf(e, "wire_recv: NULL socket or output");
    *msg = NULL;
    *raw = NULL;
    if (identity_len) *identity_len = 0;
    if (timeout_ms >= 0) {
        zmq_pollitem_t it = {.socket = sock, .events = ZMQ_POLLIN};
        int r = zmq_poll(&it, 1, timeout_ms);
        if (r < 0) return mill_errf(e, "wire_recv: zmq_poll: %s", zmq_strerror(zmq_errno()));
        if (r == 0 || !(it.revents & ZMQ_POLLIN)) return 1;
    }
    wire_raw *w = calloc(1, sizeof *w);
    if (!w) return mill_errf(e, "wire_recv: out of memory");
    int limit = WIRE_MAX_PARTS - (is_router ? 0 : 1);
    size_t total = 0;
    for (;;) {
        if (w->n == limit) {
            drain(sock);
            mill_errf(e, "wire_recv: more than %d message parts (at most %d data frames)", limit, WIRE_MAX_FRAMES);
            goto fail;
        }
        if (recv_part(sock, &w->parts[w->n], e)) goto fail_drain;
        zmq_msg_t *p = &w->parts[w->n++];
        if (is_router && w->n == 1) {
            /* Copied first, so the caller can address an error reply whatever goes wrong next. */
            size_t idn = zmq_msg_size(p);
            if (idn > WIRE_MAX_IDENTITY) {
                mill_errf(e, "wire_recv: peer identity is %zu bytes, expected at most %d", idn, WIRE_MAX_IDENTITY);
                goto fail_drain;
            }
            if (identity && idn) memcpy(identity, zmq_msg_data(p), idn);
            if (identity_len) *identity_len = idn;
        }
        total += zmq_msg_size(p);
        if (total > WIRE_MAX_TOTAL) {
            mill_errf(e, "wire_recv: message exceeds %zu bytes", WIRE_MAX_TOTAL);
            goto fail_drain;
        }
        if (!zmq_msg_more(p)) break;
    }
    int h = is_router ? 1 : 0;
    if (w->n <= h) {
        mill_errf(e, "wire_recv: message has no header frame");
        goto fail;
    }
    const void *frames[WIRE_MAX_FRAMES];
    size_t lens[WIRE_MAX_FRAMES];
    int nf = w->n - h - 1;
    for (int i = 0; i < nf; i++) {
        frames[i] = zmq_msg_data(&w->parts[h + 1 + i]);
        lens[i] = zmq_msg_size(&w->parts[h + 1 + i]);
    }
    if (wire_decode(msg, zmq_msg_data(&w->parts[h]), zmq_msg_size(&w->parts[h]), frames, lens, nf, e)) {
        if (!is_router) goto fail;
        *raw = w; /* a server's error reply names the request when its id is readable (wire_raw_id) */
        return -1;
    }
    *raw = w;
    return 0;
fail_drain:
    drain(sock);
fail:
    wire_recv_free(w);
    return -1;
}

/* ------------------------------------------------------------------ CURVE */

int wire_curve_new(wire_curve *c, mill_err *e) {
    memset(c, 0, sizeof *c);
    if (!zmq_has("curve")) return mill_errf(e, "this libzmq has no CURVE support (it needs libsodium)");
    if (zmq_curve_keypair(c->server_public, c->server_secret) || zmq_curve_keypair(c->client_public, c->client_secret))
        return mill_errf(e, "cannot make CURVE keys: %s", zmq_strerror(zmq_errno()));
    c->on = 1;
    return 0;
}

int wire_curve_save(const wire_curve *c, const char *path, mill_err *e) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    FILE *f = fd < 0 ? NULL : fdopen(fd, "w");
    if (!f) {
        if (fd >= 0) close(fd);
        return mill_errf(e, "%s: cannot write the CURVE keys: %s", path, strerror(errno));
    }
    int bad = fprintf(f, "%s\n%s\n%s\n%s\n", c->server_public, c->server_secret, c->client_public, c->client_secret) < 0;
    bad |= fclose(f) != 0;
    return bad ? mill_errf(e, "%s: cannot write the CURVE keys", path) : 0;
}

int wire_curve_load(wire_curve *c, const char *path, mill_err *e) {
    memset(c, 0, sizeof *c);
    FILE *f = fopen(path, "r");
    if (!f) return mill_errf(e, "%s: cannot read the CURVE keys: %s", path, strerror(errno));
    char *keys[4] = {c->server_public, c->server_secret, c->client_public, c->client_secret};
    static const char *const what[4] = {"server public", "server secret", "client public", "client secret"};
    char line[128];
    for (int i = 0; i < 4; i++) {
        if (!fgets(line, sizeof line, f)) {
            fclose(f);
            return mill_errf(e, "%s: line %d (the %s key) is missing", path, i + 1, what[i]);
        }
        line[strcspn(line, "\r\n")] = 0;
        uint8_t raw[32];
        if (strlen(line) != 40 || !zmq_z85_decode(raw, line)) {
            fclose(f);
            return mill_errf(e, "%s: line %d is not a 40-character Z85 %s key", path, i + 1, what[i]);
        }
        memcpy(keys[i], line, 41);
    }
    fclose(f);
    c->on = 1;
    return 0;
}

int wire_curve_server(void *sock, const wire_curve *c, mill_err *e) {
    int one = 1;
    if (!c || !c->on) return 0;
    if (zmq_setsockopt(sock, ZMQ_CURVE_SERVER, &one, sizeof one) ||
        zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, c->server_secret, 40))
        return mill_errf(e, "cannot set the CURVE server keys: %s", zmq_strerror(zmq_errno()));
    return 0;
}

int wire_curve_client(void *sock, const wire_curve *c, mill_err *e) {
    if (!c || !c->on) return 0;
    if (zmq_setsockopt(sock, ZMQ_CURVE_SERVERKEY, c->server_public, 40) ||
        zmq_setsockopt(sock, ZMQ_CURVE_PUBLICKEY, c->client_public, 40) ||
        zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, c->client_secret, 40))
        return mill_errf(e, "cannot set the CURVE client keys: %s", zmq_strerror(zmq_errno()));
    return 0;
}

/* ZAP (ZeroMQ RFC 27): requests [version, request id, domain, address, identity, mechanism,
 * credentials...]; replies [version, request id, status code, status text, user id, metadata]. */
struct wire_zap {
    void *zctx, *sock;
    uint8_t client_key[32];
    pthread_t thread;
};

static void *zap_main(void *arg) {
    wire_zap *z = arg;
    for (;;) {
        zmq_msg_t part[8];
        int n = 0, more = 1, failed = 0;
        while (more) { /* one request: up to 8 frames kept, the rest drained */
            zmq_msg_t m;
            zmq_msg_init(&m);
            if (zmq_msg_recv(&m, z->sock, 0) < 0) {
                zmq_msg_close(&m);
                failed = 1;
                break;
            }
            more = zmq_msg_more(&m);
            if (n < 8) part[n++] = m;
            else zmq_msg_close(&m);
        }
        if (failed) { /* the context is shutting down */
            for (int i = 0; i < n; i++) zmq_msg_close(&part[i]);
            break;
        }
        int ok = n >= 7 && zmq_msg_size(&part[5]) == 5 && !memcmp(zmq_msg_data(&part[5]), "CURVE", 5) &&
                 zmq_msg_size(&part[6]) == 32 && !memcmp(zmq_msg_data(&part[6]), z->client_key, 32);
        const char *code = ok ? "200" : "400", *text = ok ? "OK" : "not this run's client key";
        if (n >= 2) { /* echo version and request id */
            zmq_send(z->sock, zmq_msg_data(&part[0]), zmq_msg_size(&part[0]), ZMQ_SNDMORE);
            zmq_send(z->sock, zmq_msg_data(&part[1]), zmq_msg_size(&part[1]), ZMQ_SNDMORE);
            zmq_send(z->sock, code, 3, ZMQ_SNDMORE);
            zmq_send(z->sock, text, strlen(text), ZMQ_SNDMORE);
            zmq_send(z->sock, "", 0, ZMQ_SNDMORE);
            zmq_send(z->sock, "", 0, 0);
        }
        for (int i = 0; i < n; i++) zmq_msg_close(&part[i]);
    }
    zmq_close(z->sock);
    return NULL;
}

int wire_zap_start(void *zctx, const wire_curve *c, wire_zap **out, mill_err *e) {
    *out = NULL;
    if (!c || !c->on) return 0;
    wire_zap *z = calloc(1, sizeof *z);
    if (!z) return mill_errf(e, "ZAP: out of memory");
    z->zctx = zctx;
    int linger = 0;
    if (!zmq_z85_decode(z->client_key, c->client_public) || !(z->sock = zmq_socket(zctx, ZMQ_REP)) ||
        zmq_setsockopt(z->sock, ZMQ_LINGER, &linger, sizeof linger) || zmq_bind(z->sock, "inproc://zeromq.zap.01")) {
        mill_errf(e, "ZAP: cannot start the handler: %s", zmq_strerror(zmq_errno()));
        if (z->sock) zmq_close(z->sock);
        free(z);
        return -1;
    }
    if (pthread_create(&z->thread, NULL, zap_main, z)) {
        zmq_close(z->sock);
        free(z);
        return mill_errf(e, "ZAP: cannot start the handler thread");
    }
    *out = z;
    return 0;
}

void wire_zap_stop(wire_zap *z) {
    if (!z) return;
    zmq_ctx_shutdown(z->zctx); /* the handler's recv returns ETERM; it closes its socket and ends */
    pthread_join(z->thread, NULL);
    free(z);
}
