#include "group.h"

#include <stdlib.h>
#include <string.h>

int group_init(engine_group *g, comm *world, int tp, int ep, const dsv4_config *cfg, const kctx *k, mill_err *e) {
    memset(g, 0, sizeof *g);
    par_sizes s;
    TRY(par_engine(tp, ep, &s, e));
    int W = s.tp * s.dp;
    if (world->size != W)
        return mill_errf(e, "engine: tp %d, ep %d make an engine of %d ranks, but the job has %d", tp, ep, W,
                         world->size);
    if (W == 1) { /* the engine alone: no groups to make (nor NCCL's, on a GPU) */
        g->size = g->tp = g->ep = g->n_att = 1;
        g->stage = model_stage_all(cfg);
        return 0;
    }
    TRY(dist_init(&g->d, world, &s, cfg, 0, k, e));
    g->size = W;
    g->rank = world->rank;
    g->tp = tp;
    g->ep = ep;
    g->n_att = s.dp;
    g->att = g->d.par.dp_rank;
    g->stage = g->d.stage;
    g->stage.tp_exact = 1;
    return 0;
}

void group_free(engine_group *g) {
    if (g->size > 1) dist_free(&g->d);
    memset(g, 0, sizeof *g);
}

void group_model_io(engine_group *g, dsv4_model *m) {
    if (g->size > 1) dist_ep_io(&g->d, m);
}

int group_cast(engine_group *g, int op, const void *buf, size_t n, mill_err *e) {
    if (!g || g->size < 2) return 0;
    comm *w = g->d.par.world_c;
    int64_t hdr[2] = {op, (int64_t)n};
    comm_watch_idle(w, 1); /* the followers wait for it idle: the same (non-blocking) broadcast here, as MPI
                            * matches a blocking collective only with a blocking one */
    int rc = comm_broadcast(w, hdr, 2, DTYPE_I64, 0, e);
    comm_watch_idle(w, 0);
    TRY(rc);
    return n ? comm_broadcast(w, (void *)buf, n, DTYPE_U8, 0, e) : 0;
}

int group_take(engine_group *g, int *op, void **buf, size_t *n, mill_err *e) {
    comm *w = g->d.par.world_c;
    int64_t hdr[2] = {0, 0};
    *buf = NULL;
    comm_watch_idle(w, 1); /* the leader may wait on its socket for long */
    int rc = comm_broadcast(w, hdr, 2, DTYPE_I64, 0, e);
    comm_watch_idle(w, 0);
    TRY(rc);
    *op = (int)hdr[0];
    *n = (size_t)hdr[1];
    if (!(*buf = malloc(*n ? *n : 1))) return mill_errf(e, "engine: rank %d: out of memory for a command", g->rank);
    if (*n && comm_broadcast(w, *buf, *n, DTYPE_U8, 0, e)) {
        free(*buf);
        *buf = NULL;
        return -1;
    }
    return 0;
}
