/* Helpers shared by the golden tests. */
#ifndef MILL_TEST_UTIL_H
#define MILL_TEST_UTIL_H

#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* cmocka state for tests that write files: a fresh directory under /tmp and a path inside it. */
typedef struct {
    char dir[64];
    char path[192]; /* dir/file (file NULL: dir/) */
} test_dir;

static inline int test_dir_setup(void **state, const char *name, const char *file) {
    test_dir *f = calloc(1, sizeof *f);
    if (!f) return -1;
    snprintf(f->dir, sizeof f->dir, "/tmp/%s_XXXXXX", name);
    if (!mkdtemp(f->dir)) {
        free(f);
        return -1;
    }
    snprintf(f->path, sizeof f->path, "%s/%s", f->dir, file ? file : "");
    *state = f;
    return 0;
}

static inline int test_dir_teardown(void **state) {
    test_dir *f = *state;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", f->dir);
    int rc = system(cmd);
    free(f);
    return rc == 0 ? 0 : -1;
}

/* {"input_ids": [[...], ...]} (rows of equal length) -> ids [B*T]; NULL when unreadable. */
static inline int32_t *test_load_ids(const char *path, int *B, int *T) {
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    *B = *T = 0;
    if (!root) return NULL;
    json_t *rows = json_object_get(root, "input_ids");
    *B = (int)json_array_size(rows);
    *T = (int)json_array_size(json_array_get(rows, 0));
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)(*B * *T));
    for (int b = 0; ids && b < *B; b++)
        for (int t = 0; t < *T; t++)
            ids[b * *T + t] = (int32_t)json_integer_value(json_array_get(json_array_get(rows, (size_t)b), (size_t)t));
    json_decref(root);
    return ids;
}

#endif
