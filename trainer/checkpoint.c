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
#include "../kernels/dense.h"

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

static int write_state(const char *path, const train_state *ts, const optimizer *o, int shards, int stages,
                       mill_err *e) {
    char rs[4][24];
    for (int i = 0; i < 4; i++) snprintf(rs[i], sizeof rs[i], "%016" PRIx64, ts->data_rng.s[i]);
    json_t *j = json_pack("{s:I, s:I, s:[s,s,s,s], s:I, s:i, s:i}", "step", (json_int_t)ts->step, "data_position",
                          (json_int_t)ts->data_position, "data_rng", rs[0], rs[1], rs[2], rs[3], "optimizer_step",
                          (json_int_t)o->step, "optimizer_shards", shards, "pipeline_stages", stages);
    if (!j) return mill_errf(e, "%s: cannot build state", path);
    int rc = json_dump_file(j, path, JSON_INDENT(2));
    json_decref(j);
    if (rc) return mill_errf(e, "%s: cannot write", path);
    return fsync_path(path, e);
}

/* File f of nf: stage * shards + shard (the stages' shards in order). */
static void optim_file(char *buf, size_t n, const char *dir, int f, int nf) {
    if (nf == 1) snprintf(buf, n, "%s/optimizer.safetensors", dir);
    else snprintf(buf, n, "%s/optimizer-%05d-of-%05d.safetensors", dir, f + 1, nf);
}

/* Every rank of the dp x pp grid has arrived (a barrier over dp, then over the stages). */
static int all_here(comm *dp, comm *pp, mill_err *e) {
    if (dp && comm_barrier(dp, e)) return -1;
    return pp ? comm_barrier(pp, e) : 0;
}

/* Every rank of the optimizer's dp group takes part (a group of one: this process alone). Rank 0
 * makes DIR.tmp; each rank writes and fsyncs its model and moment shards; once all have (a
 * barrier), rank 0 writes state.json, renames DIR.tmp to DIR and fsyncs the parent; a last
 * barrier, so no rank reports the checkpoint before it is complete. A rank that fails ends the
 * job (comm_world_end), so the others never wait on it. */
int checkpoint_save(const char *dir, const dsv4_model *m, const optimizer *o, const train_state *ts, const kctx *kx,
                    mill_err *e) {
    comm *c = o->dp ? o->dp->host : NULL, *pp = o->pp;
    int r = c ? c->rank : 0, k = c ? c->size : 1, st = pp ? pp->rank : 0, ns = pp ? pp->size : 1;
    int lead = r == 0 && st == 0;
    char tmp[4096], path[4200], old[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", dir);
    if (lead) {
        if (rm_tree(tmp)) return mill_errf(e, "%s: cannot clear a stale temporary checkpoint", tmp);
        if (mkdir(tmp, 0755)) return mill_errf(e, "%s: cannot create: %s", tmp, strerror(errno));
    }
    if (all_here(c, pp, e)) return -1;
    if (model_save_stage_shard(m, kx, tmp, r, k, st, ns, e)) return mill_err_wrap(e, "checkpoint %s", dir);
    safetensors_writer *w = safetensors_writer_new();
    /* the moments of this shard's trainable floats, in the whole model's coordinates: a checkpoint
     * any layout (other dp, other pp) can read; the buffers after them have none */
    size_t hi = o->hi < m->n_span ? o->hi : m->n_span, lo = o->lo < hi ? o->lo : hi;
    int64_t n = (int64_t)(hi - lo);
    char step[32], goff[32];
    snprintf(step, sizeof step, "%ld", o->step);
    snprintf(goff, sizeof goff, "%zu", m->global_base + lo);
    optim_file(path, sizeof path, tmp, st * k + r, ns * k);
    const float *mm = o->m, *vv = o->v;
    float *stage = NULL; /* device moments: this rank's shard comes over */
    if (o->device != DEVICE_CPU) {
        if (!(stage = malloc(sizeof(float) * 2 * (size_t)(n ? n : 1)))) return mill_errf(e, "checkpoint: out of memory");
        if (!kx || op_copy_to_host(kx, stage, o->m + (lo - o->lo), sizeof(float) * (size_t)n, e) ||
            op_copy_to_host(kx, stage + n, o->v + (lo - o->lo), sizeof(float) * (size_t)n, e)) {
            if (!kx) mill_errf(e, "checkpoint: device moments are saved through their kctx");
            free(stage);
            return -1;
        }
        mm = stage;
        vv = stage + n;
    }
    if (!stage) {
        mm += lo - o->lo;
        vv += lo - o->lo;
    }
    int rc = !w || safetensors_writer_add(w, "adam.m", DTYPE_F32, 1, &n, mm, e) ||
             safetensors_writer_add(w, "adam.v", DTYPE_F32, 1, &n, vv, e) ||
             safetensors_writer_set_metadata(w, "step", step, e) ||
             safetensors_writer_set_metadata(w, "global_offset", goff, e) || safetensors_writer_save(w, path, e);
    safetensors_writer_free(w);
    free(stage);
    if (rc) return -1;
    if (all_here(c, pp, e)) return -1; /* every rank's files are on disk */
    if (lead) {
        snprintf(path, sizeof path, "%s/state.json", tmp);
        if ((ns > 1 && model_merge_index(tmp, ns, e)) || write_state(path, ts, o, k, ns, e)) return -1;
        if (fsync_path(tmp, e)) return -1;
        /* Replace an existing DIR only after the new one is complete. */
        snprintf(old, sizeof old, "%s.old", dir);
        struct stat sb;
        if (stat(dir, &sb) == 0) {
            if (rm_tree(old) || rename(dir, old))
                return mill_errf(e, "%s: cannot move the previous checkpoint aside", dir);
        }
        if (rename(tmp, dir)) return mill_errf(e, "%s: cannot rename into place: %s", dir, strerror(errno));
        rm_tree(old);
        char parent[4096];
        snprintf(parent, sizeof parent, "%s", dir);
        if (fsync_path(dirname(parent), e)) return -1;
    }
    return all_here(c, pp, e);
}

static int read_state(const char *path, train_state *ts, long *opt_step, int *shards, int *stages, mill_err *e) {
    json_error_t je;
    json_t *j = json_load_file(path, 0, &je);
    if (!j) return mill_errf(e, "%s: not valid JSON (line %d: %s)", path, je.line, je.text);
    json_int_t step, pos, ostep;
    const char *rs[4];
    int ns = 1, np = 1; /* checkpoints of one process before sharding have neither count */
    int rc = json_unpack_ex(j, &je, JSON_STRICT, "{s:I, s:I, s:[ssss], s:I, s?i, s?i}", "step", &step,
                            "data_position", &pos, "data_rng", &rs[0], &rs[1], &rs[2], &rs[3], "optimizer_step", &ostep,
                            "optimizer_shards", &ns, "pipeline_stages", &np);
    if (rc) {
        json_decref(j);
        return mill_errf(e, "%s: %s (expected step, data_position, data_rng[4], optimizer_step, optimizer_shards)",
                         path, je.text);
    }
    if (ns < 1 || np < 1) {
        json_decref(j);
        return mill_errf(e, "%s: optimizer_shards and pipeline_stages must be at least 1, got %d and %d", path, ns, np);
    }
    *shards = ns;
    *stages = np;
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

/* This rank's moments [o->lo, o->hi) from the checkpoint's files, whatever layout wrote them (any dp,
 * any pp): each file holds a run of the whole model's trainable floats from its global_offset (files
 * of one process before that key: the saved shards of the whole model's layout, in order). */
static int load_moments(const char *dir, const dsv4_model *m, optimizer *o, int shards, int stages, mill_err *e) {
    char path[4200];
    size_t hi = o->hi < m->n_span ? o->hi : m->n_span, lo = o->lo < hi ? o->lo : hi;
    size_t want0 = m->global_base + lo, want1 = m->global_base + hi; /* in the whole model's floats */
    dsv4_model whole = {0};
    if (model_layout(&whole, &m->cfg, e)) return -1;
    int rc = -1;
    for (int f = 0; f < stages * shards && want0 < want1; f++) {
        optim_file(path, sizeof path, dir, f, stages * shards);
        safetensors *st;
        if (safetensors_open(path, &st, e)) goto out;
        const char *go = safetensors_metadata(st, "global_offset");
        size_t g0, slo, shi;
        model_shard_range(&whole, f, shards, &slo, &shi);
        g0 = go ? strtoull(go, NULL, 10) : slo;
        const char *names[2] = {"adam.m", "adam.v"};
        float *dst[2] = {o->m, o->v};
        for (int i = 0; i < 2; i++) {
            const safetensors_entry *en = safetensors_find(st, names[i]);
            if (!en || en->dtype != DTYPE_F32 || en->ndim != 1 || (!go && (size_t)en->shape[0] != shi - slo) ||
                g0 + (size_t)en->shape[0] > whole.n_floats) {
                mill_errf(e, "%s: tensor %s must be F32, one dimension, inside the model's %zu parameter floats", path,
                          names[i], whole.n_floats);
                safetensors_close(st);
                goto out;
            }
            size_t g1 = g0 + (size_t)en->shape[0], a = g0 > want0 ? g0 : want0, b = g1 < want1 ? g1 : want1;
            if (a < b) memcpy(dst[i] + (a - m->global_base - o->lo), (const float *)en->data + (a - g0), sizeof(float) * (b - a));
        }
        safetensors_close(st);
    }
    rc = 0;
out:
    model_free(&whole);
    return rc;
}

int checkpoint_load(const char *dir, dsv4_model *m, optimizer *o, const optim_config *cfg, train_state *ts,
                    mill_err *e) {
    return checkpoint_load_shard(dir, m, o, cfg, NULL, NULL, NULL, ts, e);
}

int checkpoint_load_shard(const char *dir, dsv4_model *m, optimizer *o, const optim_config *cfg, comm *dp,
                          const model_stage *stage, comm *pp, train_state *ts, mill_err *e) {
    if (model_load_stage(m, dir, stage, e)) return -1;
    if (optimizer_init_shard(o, m, cfg, dp, e)) goto fail_model;
    o->pp = pp;
    char path[4200];
    int shards = 1, stages = 1;
    snprintf(path, sizeof path, "%s/state.json", dir);
    if (read_state(path, ts, &o->step, &shards, &stages, e)) goto fail;
    if (load_moments(dir, m, o, shards, stages, e)) goto fail;
    return 0;
fail:
    optimizer_free(o);
fail_model:
    model_free(m);
    return -1;
}
