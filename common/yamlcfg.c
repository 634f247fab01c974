#include "yamlcfg.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

static json_t *scalar_value(const yaml_event_t *ev) {
    const char *s = (const char *)ev->data.scalar.value;
    size_t n = ev->data.scalar.length;
    if (ev->data.scalar.style != YAML_PLAIN_SCALAR_STYLE) return json_stringn(s, n);
    if (n == 0 || !strcmp(s, "~") || !strcmp(s, "null") || !strcmp(s, "Null") || !strcmp(s, "NULL")) return json_null();
    if (!strcmp(s, "true") || !strcmp(s, "True") || !strcmp(s, "TRUE")) return json_true();
    if (!strcmp(s, "false") || !strcmp(s, "False") || !strcmp(s, "FALSE")) return json_false();
    char *end;
    errno = 0;
    long long i = strtoll(s, &end, 10);
    if (*end == 0 && errno == 0) return json_integer(i);
    errno = 0;
    double d = strtod(s, &end);
    if (*end == 0 && errno == 0 && strcspn(s, "0123456789") < n) return json_real(d);
    return json_stringn(s, n);
}

/* Recursive descent over the event stream: builds the node that starts with `ev`. */
static json_t *build(yaml_parser_t *p, yaml_event_t *ev, const char *src, mill_err *e, int depth) {
    if (depth > 64) {
        mill_errf(e, "%s: line %zu: nesting deeper than 64", src, ev->start_mark.line + 1);
        return NULL;
    }
    if (ev->type == YAML_SCALAR_EVENT) return scalar_value(ev);
    if (ev->type == YAML_ALIAS_EVENT) {
        mill_errf(e, "%s: line %zu: YAML aliases are not supported in run configs", src, ev->start_mark.line + 1);
        return NULL;
    }
    int map = ev->type == YAML_MAPPING_START_EVENT;
    if (!map && ev->type != YAML_SEQUENCE_START_EVENT) {
        mill_errf(e, "%s: line %zu: unexpected YAML event", src, ev->start_mark.line + 1);
        return NULL;
    }
    json_t *node = map ? json_object() : json_array();
    for (;;) {
        yaml_event_t k;
        if (!yaml_parser_parse(p, &k)) {
            mill_errf(e, "%s: line %zu col %zu: %s", src, p->problem_mark.line + 1, p->problem_mark.column + 1,
                      p->problem ? p->problem : "YAML syntax error");
            json_decref(node);
            return NULL;
        }
        if (k.type == YAML_MAPPING_END_EVENT || k.type == YAML_SEQUENCE_END_EVENT) {
            yaml_event_delete(&k);
            return node;
        }
        if (!map) {
            json_t *v = build(p, &k, src, e, depth + 1);
            yaml_event_delete(&k);
            if (!v) {
                json_decref(node);
                return NULL;
            }
            json_array_append_new(node, v);
            continue;
        }
        if (k.type != YAML_SCALAR_EVENT) {
            mill_errf(e, "%s: line %zu: mapping keys must be plain strings", src, k.start_mark.line + 1);
            yaml_event_delete(&k);
            json_decref(node);
            return NULL;
        }
        char *key = strndup((const char *)k.data.scalar.value, k.data.scalar.length);
        size_t line = k.start_mark.line + 1;
        yaml_event_delete(&k);
        yaml_event_t v;
        if (!key || !yaml_parser_parse(p, &v)) {
            mill_errf(e, "%s: line %zu: %s", src, line, key ? (p->problem ? p->problem : "YAML syntax error") : "out of memory");
            free(key);
            json_decref(node);
            return NULL;
        }
        json_t *val = build(p, &v, src, e, depth + 1);
        yaml_event_delete(&v);
        if (!val || json_object_get(node, key)) {
            if (val) mill_errf(e, "%s: line %zu: duplicate key \"%s\"", src, line, key);
            json_decref(val);
            free(key);
            json_decref(node);
            return NULL;
        }
        json_object_set_new(node, key, val);
        free(key);
    }
}

json_t *yamlcfg_parse(const char *text, size_t len, const char *src, mill_err *e) {
    yaml_parser_t p;
    if (!yaml_parser_initialize(&p)) {
        mill_errf(e, "%s: cannot start the YAML parser", src);
        return NULL;
    }
    yaml_parser_set_input_string(&p, (const unsigned char *)text, len);
    json_t *root = NULL;
    yaml_event_t ev;
    for (;;) {
        if (!yaml_parser_parse(&p, &ev)) {
            mill_errf(e, "%s: line %zu col %zu: %s", src, p.problem_mark.line + 1, p.problem_mark.column + 1,
                      p.problem ? p.problem : "YAML syntax error");
            json_decref(root);
            root = NULL;
            break;
        }
        yaml_event_type_t t = ev.type;
        if (t == YAML_STREAM_END_EVENT) {
            yaml_event_delete(&ev);
            break;
        }
        if (t == YAML_MAPPING_START_EVENT || t == YAML_SEQUENCE_START_EVENT || t == YAML_SCALAR_EVENT ||
            t == YAML_ALIAS_EVENT) {
            if (root) {
                mill_errf(e, "%s: more than one YAML document", src);
                yaml_event_delete(&ev);
                json_decref(root);
                root = NULL;
                break;
            }
            root = build(&p, &ev, src, e, 0);
            yaml_event_delete(&ev);
            if (!root) break;
            continue;
        }
        yaml_event_delete(&ev);
    }
    yaml_parser_delete(&p);
    if (root && !json_is_object(root)) {
        mill_errf(e, "%s: the top level must be a mapping of sections", src);
        json_decref(root);
        return NULL;
    }
    if (!root && !e->msg[0]) mill_errf(e, "%s: empty document", src);
    return root;
}

json_t *yamlcfg_load(const char *path, mill_err *e) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        mill_errf(e, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    char *buf = NULL;
    size_t len = 0, cap = 0, n;
    char chunk[8192];
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) {
        if (len + n > (1u << 24)) {
            free(buf);
            fclose(f);
            mill_errf(e, "%s: larger than 16 MiB", path);
            return NULL;
        }
        if (len + n > cap) {
            cap = (len + n) * 2;
            char *nb = realloc(buf, cap);
            if (!nb) {
                free(buf);
                fclose(f);
                mill_errf(e, "%s: out of memory", path);
                return NULL;
            }
            buf = nb;
        }
        memcpy(buf + len, chunk, n);
        len += n;
    }
    fclose(f);
    e->msg[0] = 0;
    json_t *root = yamlcfg_parse(buf ? buf : "", len, path, e);
    free(buf);
    return root;
}

json_t *yamlcfg_get(json_t *root, const char *path) {
    if (!path) return root;
    char key[256];
    json_t *cur = root;
    while (cur && *path) {
        size_t n = strcspn(path, ".");
        if (n >= sizeof key) return NULL;
        memcpy(key, path, n);
        key[n] = 0;
        cur = json_is_object(cur) ? json_object_get(cur, key) : NULL;
        path += n + (path[n] == '.');
    }
    return cur;
}

int yamlcfg_int(json_t *root, const char *path, long long def, long long lo, long long hi, long long *out,
                const char *src, mill_err *e) {
    json_t *v = yamlcfg_get(root, path);
    if (!v || json_is_null(v)) {
        *out = def;
        return 0;
    }
    if (!json_is_integer(v)) return mill_errf(e, "%s: %s must be an integer", src, path);
    long long x = json_integer_value(v);
    if (x < lo || x > hi) return mill_errf(e, "%s: %s = %lld is outside [%lld, %lld]", src, path, x, lo, hi);
    *out = x;
    return 0;
}

int yamlcfg_num(json_t *root, const char *path, double def, double lo, double hi, double *out, const char *src,
                mill_err *e) {
    json_t *v = yamlcfg_get(root, path);
    if (!v || json_is_null(v)) {
        *out = def;
        return 0;
    }
    if (!json_is_number(v)) return mill_errf(e, "%s: %s must be a number", src, path);
    double x = json_number_value(v);
    if (!(x >= lo && x <= hi)) return mill_errf(e, "%s: %s = %g is outside [%g, %g]", src, path, x, lo, hi);
    *out = x;
    return 0;
}

int yamlcfg_str(json_t *root, const char *path, const char *def, const char **out, const char *src, mill_err *e) {
    json_t *v = yamlcfg_get(root, path);
    if (!v || json_is_null(v)) {
        *out = def;
        return 0;
    }
    if (!json_is_string(v)) return mill_errf(e, "%s: %s must be a string", src, path);
    *out = json_string_value(v);
    return 0;
}

int yamlcfg_bool(json_t *root, const char *path, int def, int *out, const char *src, mill_err *e) {
    json_t *v = yamlcfg_get(root, path);
    if (!v || json_is_null(v)) {
        *out = def;
        return 0;
    }
    if (!json_is_boolean(v)) return mill_errf(e, "%s: %s must be true or false", src, path);
    *out = json_is_true(v);
    return 0;
}

/* Edit distance (insert, delete, substitute), for suggesting the key a typo meant. */
static int edit_distance(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    if (la > 63 || lb > 63) return 99;
    int row[64];
    for (size_t j = 0; j <= lb; j++) row[j] = (int)j;
    for (size_t i = 1; i <= la; i++) {
        int diag = row[0];
        row[0] = (int)i;
        for (size_t j = 1; j <= lb; j++) {
            int up = row[j], best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best) best = up + 1;
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            diag = up;
            row[j] = best;
        }
    }
    return row[lb];
}

int yamlcfg_known_keys(json_t *root, const char *path, const char *const *known, const char *src, mill_err *e) {
    json_t *node = yamlcfg_get(root, path);
    if (!node || json_is_null(node)) return 0;
    if (!json_is_object(node)) return mill_errf(e, "%s: %s must be a mapping", src, path ? path : "the top level");
    const char *key;
    json_t *v;
    json_object_foreach(node, key, v) {
        int ok = 0;
        for (const char *const *k = known; *k; k++) ok |= strcmp(key, *k) == 0;
        if (!ok) {
            const char *near = NULL;
            int best = 3; /* suggest only close matches */
            for (const char *const *k = known; *k; k++) {
                int d = edit_distance(key, *k);
                if (d < best) {
                    best = d;
                    near = *k;
                }
            }
            if (near)
                return mill_errf(e, "%s: unknown key \"%s%s%s\" (did you mean \"%s\"?)", src, path ? path : "",
                                 path ? "." : "", key, near);
            char list[512] = "";
            for (const char *const *k = known; *k; k++) {
                strncat(list, *k, sizeof list - strlen(list) - 1);
                if (k[1]) strncat(list, ", ", sizeof list - strlen(list) - 1);
            }
            return mill_errf(e, "%s: unknown key \"%s%s%s\" (expected one of: %s)", src, path ? path : "",
                             path ? "." : "", key, list);
        }
    }
    return 0;
}
