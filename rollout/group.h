/* rollout/group.h — an engine of several ranks: their layout and rank 0's command channel.
 * Owns: engine_group, the W ranks that run one engine together: tp T splits the attention heads (and
 * the vocabulary) T ways, ep E spreads the routed experts over E ranks, W = max(T, E), both dividing
 * W. Ranks t + T a form attention group a (of W / T): its T ranks hold the same sequences and
 * caches, and the groups run attention data-parallel, each on its own sequences (SGLang's
 * DP-attention); the experts are folded over all W ranks (trainer/parallel.h's fold: ep rank = rank
 * % E), each tp rank routing its slice of its group's tokens. The model is the trainer's, in the
 * exact tensor-parallel layout (model_stage.tp_exact): every logit has the single-process bits.
 * Rank 0 (the leader) drives: it serves the socket or the generation, and tells the others
 * (followers) what to do through group_cast, each command a tag and a byte string broadcast over
 * the group; a follower takes them (group_take) until GROUP_STOP. */
#ifndef MILL_GROUP_H
#define MILL_GROUP_H

#include "../trainer/dist.h"

enum { GROUP_STOP = 1, GROUP_STEP, GROUP_RELEASE, GROUP_RESUME, GROUP_RELAY };

typedef struct {
    dist_ctx d;      /* the layout's groups: d.tp (heads), d.ep (experts), d.par.world_c (all W) */
    int size, rank;  /* W, and this rank */
    int tp, ep;      /* the sizes */
    int n_att, att;  /* attention groups (W / tp), and this rank's */
    model_stage stage; /* what this rank holds (load its model with model_load_stage) */
} engine_group;

/* Checks tp and ep against cfg and world (W = max(tp, ep), both dividing it; heads, output groups,
 * experts divisible) with one-line errors naming the size, then makes the groups; k: this rank's
 * device (NCCL twins of the tp and ep groups on a GPU). */
int group_init(engine_group *g, comm *world, int tp, int ep, const dsv4_config *cfg, const kctx *k, mill_err *e);
void group_free(engine_group *g);
/* m (loaded with g->stage) reaches the other ranks through g: the tp gathers and the experts'
 * all-to-all (model_tp_io, model_ep_io). */
void group_model_io(engine_group *g, dsv4_model *m);
/* Leader: command op with n bytes of buf to every follower (none on one rank, or g NULL). */
int group_cast(engine_group *g, int op, const void *buf, size_t n, mill_err *e);
/* Follower: the next command; *buf (malloc'd, the caller frees it) holds its *n bytes. Waits as long
 * as the leader takes (the watchdog is idle meanwhile). */
int group_take(engine_group *g, int *op, void **buf, size_t *n, mill_err *e);

#endif
