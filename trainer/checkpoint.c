#include "checkpoint.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <jansson.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../common/safetensors.h"

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int rm_tree(const char *path) {
    struct stat sb;
    if (lstat(path, &sb) != 0) return 0;
    return nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static int fsync_path(const char *path, mill_err *e) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return mill_errf(e, "%s: cannot open to fsync: %s", path, strerror(errno));
    int rc = fsync(fd);
    close(fd);
    if (rc) return mill_errf(e, "%s: fsync failed: %s", path, strerror(errno));
    return 0;
}

static int write_state(const char *path, const train_state *ts, const optimizer *o, mill_err *e) {
    char rs[4][24];
    for (int i = 0; i < 4; i++) snprintf(rs[i], sizeof rs[i], "%016" PRIx64, ts->data_rng.s[i]);
    json_t *j = json_pack("{s:I, s:I, s:[s,s,s,s], s:I}", "step", (json_int_t)ts->step, "data_position",
                          (json_int_t)ts->data_position, "data_rng", rs[0], rs[1], rs[2], rs[3], "optimizer_step",
                          (json_int_t)o->step);
    if (!j) return mill_errf(e, "%s: cannot build state", path);
    int rc = json_dump_file(j, path, JSON_INDENT(2));
    json_decref(j);
    if (rc) return mill_errf(e, "%s: cannot write", path);
    return fsync_path(path, e);
}

int checkpoint_save(const char *dir, const dsv4_model *m, const optimizer *o, const train_state *ts, mill_err *e) {
    char tmp[4096], path[4200], old[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", dir);
    if (rm_tree(tmp)) return mill_errf(e, "%s: cannot clear a stale temporary checkpoint", tmp);
    if (mkdir(tmp, 0755)) return mill_errf(e, "%s: cannot create: %s", tmp, strerror(errno));
    if (model_save(m, tmp, e)) return mill_err_wrap(e, "checkpoint %s", dir);
    safetensors_writer *w = safetensors_writer_new();
    int64_t n = (int64_t)o->n_floats;
    char step[32];
    snprintf(step, sizeof step, "%ld", o->step);
    snprintf(path, sizeof path, "%s/optimizer.safetensors", tmp);
    int rc = !w || safetensors_writer_add(w, "adam.m", DTYPE_F32, 1, &n, o->m, e) ||
             safetensors_writer_add(w, "adam.v", DTYPE_F32, 1, &n, o->v, e) ||
             safetensors_writer_set_metadata(w, "step", step, e) || safetensors_writer_save(w, path, e);
    safetensors_writer_free(w);
    if (rc) return -1;
    snprintf(path, sizeof path, "%s/state.json", tmp);
    if (write_state(path, ts, o, e)) return -1;
    if (fsync_path(tmp, e)) return -1;
    /* Replace an existing DIR only after the new one is complete. */
    snprintf(old, sizeof old, "%s.old", dir);
    struct stat sb;
    if (stat(dir, &sb) == 0) {
        if (rm_tree(old) || rename(dir, old)) return mill_errf(e, "%s: cannot move the previous checkpoint aside", dir);
    }
    if (rename(tmp, dir)) return mill_errf(e, "%s: cannot rename into place: %s", dir, strerror(errno));
    rm_tree(old);
    char parent[4096];
    snprintf(parent, sizeof parent, "%s", dir);
    return fsync_path(dirname(parent), e);
}

static int read_state(const char *path, train_state *ts, long *opt_step, mill_err *e) {
    json_error_t je;
    json_t *j = json_load_file(path, 0, &je);
    if (!j) return mill_errf(e, "%s: not valid JSON (line %d: %s)", path, je.line, je.text);
    json_int_t step, pos, ostep;
    const char *rs[4];
    int rc = json_unpack_ex(j, &je, JSON_STRICT, "{s:I, s:I, s:[ssss], s:I}", "step", &step, "data_position", &pos,
                            "data_rng", &rs[0], &rs[1], &rs[2], &rs[3], "optimizer_step", &ostep);
    if (rc) {
        json_decref(j);
        return mill_errf(e, "%s: %s (expected step, data_position, data_rng[4], optimizer_step)", path, je.text);
    }
    for (int i = 0; i < 4; i++) {
        char *end;
        ts->data_rng.s[i] = strtoull(rs[i], &end, 16);
        if (*end || strlen(rs[i]) != 16) {
            json_decref(j);
            return mill_errf(e, "%s: data_rng[%d] must be 16 hex digits", path, i);
        }
    }
    ts->step = (long)step;
    ts->data_position = (uint64_t)pos;
    *opt_step = (long)ostep;
    json_decref(j);
    return 0;
}

int checkpoint_load(const char *dir, dsv4_model *m, optimizer *o, const optim_config *cfg, train_state *ts,
                    mill_err *e) {
    if (model_load(m, dir, e)) return -1;
    if (optimizer_init(o, m, cfg, e)) goto fail_model;
    char path[4200];
    snprintf(path, sizeof path, "%s/optimizer.safetensors", dir);
    safetensors *st;
    if (safetensors_open(path, &st, e)) goto fail;
    const char *names[2] = {"adam.m", "adam.v"};
    float *dst[2] = {o->m, o->v};
    for (int i = 0; i < 2; i++) {
        const safetensors_entry *en = safetensors_find(st, names[i]);
        if (!en || en->dtype != DTYPE_F32 || en->ndim != 1 || (size_t)en->shape[0] != o->n_floats) {
            mill_errf(e, "%s: tensor %s must be F32 [%zu] (the model's parameter count)", path, names[i], o->n_floats);
            safetensors_close(st);
            goto fail;
        }
        memcpy(dst[i], en->data, sizeof(float) * o->n_floats);
    }
    safetensors_close(st);
    snprintf(path, sizeof path, "%s/state.json", dir);
    if (read_state(path, ts, &o->step, e)) goto fail;
    return 0;
fail:
    optimizer_free(o);
fail_model:
    model_free(m);
    return -1;
}
