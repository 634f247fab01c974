/* common/yamlcfg.h — YAML run configs (libyaml), read into a jansson tree so recipes
 * are checked with the same typed getters as JSON. Plain scalars resolve as YAML 1.2
 * core: null, true/false, integers, floats; quoted scalars stay strings.
 * Owns: yamlcfg_load and the typed lookups by dotted path ("optimizer.lr"). */
#ifndef MILL_YAMLCFG_H
#define MILL_YAMLCFG_H

#include <jansson.h>

#include "err.h"

/* The document's root (caller json_decref's it); errors name the file, line and column. */
json_t *yamlcfg_load(const char *path, mill_err *e);
json_t *yamlcfg_parse(const char *text, size_t len, const char *source, mill_err *e);

/* Typed getters by dotted path; absent keys take the default, a wrong type is an error
 * naming source and path. Integer-valued numbers are accepted for doubles. */
int yamlcfg_int(json_t *root, const char *path, long long def, long long lo, long long hi, long long *out,
                const char *source, mill_err *e);
/* A number in [lo, hi] (absent or null: def). */
int yamlcfg_num(json_t *root, const char *path, double def, double lo, double hi, double *out, const char *source,
                mill_err *e);
int yamlcfg_str(json_t *root, const char *path, const char *def, const char **out, const char *source, mill_err *e);
int yamlcfg_bool(json_t *root, const char *path, int def, int *out, const char *source, mill_err *e);
/* Keys of the mapping at path (NULL: root) not in the NULL-terminated `known` list are an error. */
int yamlcfg_known_keys(json_t *root, const char *path, const char *const *known, const char *source, mill_err *e);
json_t *yamlcfg_get(json_t *root, const char *path);

#endif
