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

/* A piece of this rank's moment shard: local floats [a, b), at global in the whole model's layout. */
typedef struct {
    size_t a, b, global;
} moment_piece;

/* [lo, hi) met with [a, b), as a piece at global g + (start - a) when not empty. */
static void add_piece(moment_piece *pc, int *n, size_t lo, size_t hi, size_t a, size_t b, size_t g) {
    size_t x = lo > a ? lo : a, y = hi < b ? hi : b;
    if (x < y) pc[(*n)++] = (moment_piece){x, y, g + (x - a)};
}

/* The shard [o->lo, o->hi) met with each of m's runs (at least one piece, maybe empty): *n of them
 * (malloc'd), NULL when out of memory. A tensor-parallel slice is no run: there each tensor maps on
 * its own (a column slice row by row). */
static moment_piece *moment_pieces(const dsv4_model *m, const optimizer *o, int *n, mill_err *e) {
    int tp = m->stage.tp > 1 ? m->stage.tp : 1, r = m->stage.tp_rank;
    size_t cap = (size_t)m->n_runs + 1;
    for (int i = 0; tp > 1 && i < m->n_params; i++)
        cap += m->params[i].split == 1 ? (size_t)m->params[i].shape[0] : 1;
    moment_piece *pc = malloc(sizeof *pc * cap);
    if (!pc) return mill_errf(e, "checkpoint: out of memory"), NULL;
    *n = 0;
    for (int i = 0; tp == 1 && i < m->n_runs; i++)
        add_piece(pc, n, o->lo, o->hi, m->runs[i].local, m->runs[i].local + m->runs[i].n, m->runs[i].global);
    for (int i = 0; tp > 1 && i < m->n_params; i++) {
        const param_info *p = &m->params[i];
        if (p->kind != PARAM_WEIGHT) continue;
        size_t cols = p->ndim > 1 ? (size_t)p->shape[1] : 1;
        int64_t lo, hi; /* the slice's part of the split dimension (its padding is in no piece) */
        if (p->split >= 0) model_param_split(p, tp, r, &lo, &hi);
        if (p->split < 0) add_piece(pc, n, o->lo, o->hi, p->offset, p->offset + p->numel, p->goffset);
        else if (p->split == 0)
            add_piece(pc, n, o->lo, o->hi, p->offset, p->offset + (size_t)(hi - lo) * cols, p->goffset + (size_t)lo * cols);
        else
            for (int64_t row = 0; row < p->shape[0]; row++)
                add_piece(pc, n, o->lo, o->hi, p->offset + (size_t)row * cols,
                          p->offset + (size_t)row * cols + (size_t)(hi - lo),
                          p->goffset + (size_t)row * (size_t)p->whole + (size_t)lo);
    }
    if (!*n) pc[(*n)++] = (moment_piece){o->lo, o->lo, 0};
    return pc;
}

/* Every rank of the grid has arrived (a barrier over dp, tp, ep, then over the stages). */
static int all_here(comm *dp, comm *tp, comm *ep, comm *pp, mill_err *e) {
    if ((dp && comm_barrier(dp, e)) || (tp && comm_barrier(tp, e)) || (ep && comm_barrier(ep, e))) return -1;
    return pp ? comm_barrier(pp, e) : 0;
}

/* The moments of this rank's pieces into path: adam.m and adam.v, the pieces one after another, and
 * pieces [np, 2] (I64: each one's global offset and length), so any layout finds its own in them.
 * Device moments come over as the rank's whole shard at once (k: their kctx). */
static int write_moments(const char *path, const char *step, const optimizer *o, const moment_piece *pc, int np,
                         const kctx *k, mill_err *e) {
    size_t total = 0, shard = o->hi - o->lo;
    for (int j = 0; j < np; j++) total += pc[j].b - pc[j].a;
    float *mv = malloc(sizeof(float) * 2 * (total ? total : 1)), *host = NULL;
    int64_t *idx = malloc(sizeof(int64_t) * 2 * (size_t)np);
    const float *hm = o->m, *hv = o->v;
    int rc = !mv || !idx ? mill_errf(e, "checkpoint: out of memory") : 0;
    if (!rc && o->device != DEVICE_CPU) {
        if (!k) rc = mill_errf(e, "checkpoint: device moments are saved through their kctx");
        else if (!(host = malloc(sizeof(float) * 2 * (shard ? shard : 1)))) rc = mill_errf(e, "checkpoint: out of memory");
        else rc = op_copy_to_host(k, host, o->m, sizeof(float) * shard, e) ||
                  op_copy_to_host(k, host + shard, o->v, sizeof(float) * shard, e);
        hm = host, hv = host + shard;
    }
    size_t at = 0;
    for (int j = 0; !rc && j < np; j++) {
        size_t n = pc[j].b - pc[j].a;
        memcpy(mv + at, hm + (pc[j].a - o->lo), sizeof(float) * n);
        memcpy(mv + total + at, hv + (pc[j].a - o->lo), sizeof(float) * n);
        idx[2 * j] = (int64_t)pc[j].global, idx[2 * j + 1] = (int64_t)n;
        at += n;
    }
    safetensors_writer *w = rc ? NULL : safetensors_writer_new();
    int64_t nt = (int64_t)total, ni[2] = {np, 2};
    rc = rc || !w || safetensors_writer_set_metadata(w, "step", step, e) ||
         safetensors_writer_add(w, "adam.m", DTYPE_F32, 1, &nt, mv, e) ||
         safetensors_writer_add(w, "adam.v", DTYPE_F32, 1, &nt, mv + total, e) ||
         safetensors_writer_add(w, "pieces", DTYPE_I64, 2, ni, idx, e) || safetensors_writer_save(w, path, e);
    safetensors_writer_free(w);
    free(mv);
    free(idx);
    free(host);
    return rc ? -1 : 0;
}

/* Every rank of the optimizer's dp group takes part (a group of one: this process alone). Rank 0
 * makes DIR.tmp; each rank writes and fsyncs its model and moment shards; once all have (a
 * barrier), rank 0 writes state.json, renames DIR.tmp to DIR and fsyncs the parent; a last
 * barrier, so no rank reports the checkpoint before it is complete. A rank that fails ends the
 * job (comm_world_end), so the others never wait on it. */
int checkpoint_save(const char *dir, const dsv4_model *m, const optimizer *o, const train_state *ts, const kctx *kx,
                    mill_err *e) {
    comm *c = o->dp ? o->dp->host : NULL, *pp = o->pp, *ep = o->ep ? o->ep->host : NULL;
    int r = c ? c->rank : 0, k = c ? c->size : 1, st = pp ? pp->rank : 0, ns = pp ? pp->size : 1;
    int q = ep ? ep->rank : 0, P = ep ? ep->size : 1; /* experts over ranks: P x k writers a stage */
    comm *tpc = o->tp && o->tp->size > 1 ? o->tp->host : NULL; /* heads over ranks: T x P x k moment files */
    int t = tpc ? tpc->rank : 0, T = tpc ? tpc->size : 1;
    int lead = r == 0 && st == 0 && q == 0 && t == 0;
    char tmp[4096], path[4200], old[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", dir);
    if (lead) {
        if (rm_tree(tmp)) return mill_errf(e, "%s: cannot clear a stale temporary checkpoint", tmp);
        if (mkdir(tmp, 0755)) return mill_errf(e, "%s: cannot create: %s", tmp, strerror(errno));
    }
    if (all_here(c, tpc, ep, pp, e)) return -1;
    if (model_save_stage_shard(m, kx, tmp, r, k, st, ns, e)) return mill_err_wrap(e, "checkpoint %s", dir);
    /* the moments of this shard's trainable floats, in the whole model's coordinates: a checkpoint
     * any layout (other dp, other pp) can read; one piece per run of the whole layout the shard
     * meets (an interleaved stage holds several), the buffers after them have none */
    int np;
    moment_piece *pc = moment_pieces(m, o, &np, e);
    if (!pc) return -1;
    char step[32];
    snprintf(step, sizeof step, "%ld", o->step);
    optim_file(path, sizeof path, tmp, ((st * P + q) * T + t) * k + r, ns * P * T * k);
    int rc = write_moments(path, step, o, pc, np, kx, e);
    free(pc);
    if (rc) return -1;
    if (all_here(c, tpc, ep, pp, e)) return -1; /* every rank's files are on disk */
    if (lead) {
        snprintf(path, sizeof path, "%s/state.json", tmp);
        if ((ns > 1 && model_merge_index(tmp, ns, e)) || write_state(path, ts, o, P * T * k, ns, e)) return -1;
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
    return all_here(c, tpc, ep, pp, e);
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

/* A run of saved moments: n floats at global, in m and v (the file's memory). */
typedef struct {
    size_t global, n;
    const float *m, *v;
} saved_run;

static int by_global(const void *a, const void *b) {
    size_t x = ((const moment_piece *)a)->global, y = ((const moment_piece *)b)->global;
    return x < y ? -1 : x > y;
}

static int saved_by_global(const void *a, const void *b) {
    size_t x = ((const saved_run *)a)->global, y = ((const saved_run *)b)->global;
    return x < y ? -1 : x > y;
}

/* A file's runs: its pieces index (pieces [np, 2] into adam.m / adam.v), or the earlier format (adam.m.j
 * at metadata global_offset.j; the first files had none: shard [slo, shi) of the whole layout).
 * *out malloc'd, sorted by global. */
static int saved_runs(safetensors *st, const char *path, size_t slo, size_t shi, size_t n_floats, saved_run **out,
                      int *n_out, mill_err *e) {
    const safetensors_entry *ix = safetensors_find(st, "pieces"), *em = safetensors_find(st, "adam.m"),
                            *ev = safetensors_find(st, "adam.v");
    int cap = ix && ix->ndim == 2 ? (int)ix->shape[0] : 1, n = 0;
    for (char nm[32]; !ix && safetensors_find(st, (snprintf(nm, sizeof nm, "adam.m.%d", cap), nm));) cap++;
    saved_run *r = malloc(sizeof *r * (size_t)(cap ? cap : 1));
    if (!r) return mill_errf(e, "checkpoint: out of memory");
    if (ix) {
        if (ix->ndim != 2 || ix->shape[1] != 2 || ix->dtype != DTYPE_I64 || !em || !ev || em->dtype != DTYPE_F32 ||
            ev->dtype != DTYPE_F32 || em->ndim != 1 || ev->ndim != 1 || em->shape[0] != ev->shape[0]) {
            free(r);
            return mill_errf(e, "%s: expected pieces [n, 2] I64 and adam.m, adam.v of one F32 length", path);
        }
        const int64_t *p = ix->data;
        size_t at = 0;
        for (; n < cap; n++) {
            if (p[2 * n] < 0 || p[2 * n + 1] < 0 || (size_t)(p[2 * n] + p[2 * n + 1]) > n_floats ||
                at + (size_t)p[2 * n + 1] > (size_t)em->shape[0]) {
                free(r);
                return mill_errf(e, "%s: piece %d (%" PRId64 " floats at %" PRId64 ") lies outside adam.m or the "
                                    "model's %zu parameter floats", path, n, p[2 * n + 1], p[2 * n], n_floats);
            }
            r[n] = (saved_run){(size_t)p[2 * n], (size_t)p[2 * n + 1], (const float *)em->data + at,
                               (const float *)ev->data + at};
            at += (size_t)p[2 * n + 1];
        }
    }
    for (int j = 0; !ix && j < cap; j++) {
        char nm[32], nv[32], ng[32];
        snprintf(nm, sizeof nm, j ? "adam.m.%d" : "adam.m", j);
        snprintf(nv, sizeof nv, j ? "adam.v.%d" : "adam.v", j);
        snprintf(ng, sizeof ng, j ? "global_offset.%d" : "global_offset", j);
        const char *go = safetensors_metadata(st, ng);
        const safetensors_entry *a = safetensors_find(st, nm), *b = safetensors_find(st, nv);
        size_t g0 = go ? strtoull(go, NULL, 10) : slo;
        if (!a || !b || a->dtype != DTYPE_F32 || b->dtype != DTYPE_F32 || a->ndim != 1 || b->ndim != 1 ||
            a->shape[0] != b->shape[0] || (!go && (size_t)a->shape[0] != shi - slo) || g0 + (size_t)a->shape[0] > n_floats) {
            free(r);
            return mill_errf(e, "%s: tensors %s and %s must be F32, one dimension of one length, inside the model's %zu "
                                "parameter floats", path, nm, nv, n_floats);
        }
        r[n++] = (saved_run){g0, (size_t)a->shape[0], a->data, b->data};
    }
    qsort(r, (size_t)n, sizeof *r, saved_by_global);
    *out = r;
    *n_out = n;
    return 0;
}

/* This rank's moments [o->lo, o->hi) from the checkpoint's files, whatever layout wrote them (any dp,
 * pp, vpp, ep or tp): each file holds runs of the whole model's trainable floats at their global
 * offsets, and this rank's pieces (a tp slice's: a column slice row by row) are met with them in one
 * pass over both, sorted by global offset. */
static int load_moments(const char *dir, const dsv4_model *m, optimizer *o, int shards, int stages, mill_err *e) {
    char path[4200];
    int nw;
    moment_piece *want = moment_pieces(m, o, &nw, e);
    dsv4_model whole = {0};
    if (!want || model_layout(&whole, &m->cfg, e)) return free(want), -1;
    qsort(want, (size_t)nw, sizeof *want, by_global);
    int rc = -1;
    for (int f = 0; f < stages * shards; f++) {
        optim_file(path, sizeof path, dir, f, stages * shards);
        safetensors *st;
        saved_run *sr = NULL;
        int ns = 0;
        size_t slo, shi;
        model_shard_range(&whole, f, shards, &slo, &shi);
        if (safetensors_open(path, &st, e)) goto out;
        if (saved_runs(st, path, slo, shi, whole.n_floats, &sr, &ns, e)) {
            safetensors_close(st);
            goto out;
        }
        for (int i = 0, q = 0; i < ns && q < nw;) { /* the overlaps, both lists by global offset */
            size_t g0 = sr[i].global, g1 = g0 + sr[i].n, w0 = want[q].global, w1 = w0 + (want[q].b - want[q].a);
            size_t a = g0 > w0 ? g0 : w0, b = g1 < w1 ? g1 : w1;
            if (a < b) {
                memcpy(o->m + (want[q].a - o->lo) + (a - w0), sr[i].m + (a - g0), sizeof(float) * (b - a));
                memcpy(o->v + (want[q].a - o->lo) + (a - w0), sr[i].v + (a - g0), sizeof(float) * (b - a));
            }
            if (g1 < w1) i++;
            else q++;
        }
        free(sr);
        safetensors_close(st);
    }
    rc = 0;
out:
    model_free(&whole);
    free(want);
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
