/* trainer/parallel.h — the rank layout: the one place that maps a rank to its groups.
 * Owns: par_sizes {tp, pp, ep, cp, dp}, their validation against a model and a batch, this
 * rank's coordinates and its communicators.
 *
 * Megatron-Core's rules and rank order: world = tp * pp * cp * dp; ranks are numbered tp first,
 * then cp, then dp, then pp (rank = tp_r + tp * (cp_r + cp * (dp_r + dp * pp_r))). Experts are laid
 * over the same ranks as tp, ep, expert-dp, pp with ep dividing dp * cp (expert-dp = dp * cp / ep).
 * Groups: tp, cp, dp, pp, ep, edp (expert data parallel), dpcp (dense gradients are reduced over
 * it: the ranks that hold the same dense weights) and mp (tp * pp: the ranks that together hold
 * one copy of the model; the gradient norm is summed over it after each rank's own shard).
 * Every group of size one is a comm of one rank (no calls), so the single-process layout runs the
 * same code. pp (with vpp), ep, dp, tp and cp run. With fold, the experts are laid over tp too
 * (rank = ep_r + ep * edp_r within a pipeline stage). */
#ifndef MILL_PARALLEL_H
#define MILL_PARALLEL_H

#include "../common/config.h"
#include "comm.h"

#define PAR_MAX_STAGES 64 /* virtual pipeline stages, pp x vpp */
#define PAR_MAX_VPP 16     /* model chunks per pipeline rank (MODEL_MAX_CHUNKS) */

enum { PAR_WIRE_AUTO, PAR_WIRE_F32, PAR_WIRE_BF16 }; /* auto: bf16 on a GPU, fp32 on the CPU */
/* "auto", "fp32" or "bf16" into *wire (PAR_WIRE_*), -1 for anything else; and the name of one. */
int par_wire_parse(const char *v, int *wire);
const char *par_wire_name(int wire);

typedef struct {
    int tp, pp, ep, cp, dp;
    int pp_layers[PAR_MAX_STAGES]; /* layers of each virtual stage, in order (all 0: an even split,
                                    * the remainder on the first stages) */
    int vpp; /* model chunks per pipeline rank (Megatron's virtual pipeline stages; 0 or 1: 1F1B):
              * virtual stage s = c * pp + r is chunk c of pp rank r, run by the interleaved 1F1B */
    int pp_wire; /* the boundary streams' type between stages: PAR_WIRE_* (bf16: half the bytes,
                  * rounded once per hop) */
    int sp; /* sequence parallelism (Megatron's, with tp > 1; a no-op without): each tp rank keeps the
             * hyper-connection streams and runs the per-token ops of its slice of the tokens only */
    int fold; /* MoE parallel folding (Megatron-Core's, expert tensor parallelism 1): the ep ranks are laid
               * over tp x cp x dp in rank order (ep divides that; edp = tp x cp x dp / ep), each tp rank
               * routing its own slice of the tokens. The rollout engine's layout (SGLang's DP-attention
               * with EP); the trainer's experts lie over dp x cp */
} par_sizes;

typedef struct {
    par_sizes sz;
    int world, rank;
    int tp_rank, cp_rank, dp_rank, pp_rank, ep_rank, edp_rank;
    /* host (MPI) comms; on a GPU the trainer makes NCCL twins of the ones it reduces over */
    comm *world_c, *tp, *cp, *dp, *pp, *ep, *edp, *dpcp, *mp;
} par_state;

/* All ones. */
par_sizes par_sizes_one(void);
/* s->vpp, 0 read as 1. */
int par_vpp(const par_sizes *s);
/* "tp 1, pp 1, ep 1, cp 1, dp 2" (", vpp 2" when interleaved, ", sp" with sequence parallelism) */
const char *par_sizes_str(const par_sizes *s, char *buf, size_t n);
/* "on" / "off" (also true / false, 1 / 0) into *on, -1 for anything else. */
int par_switch_parse(const char *v, int *on);
/* Every rule in one place, each broken rule a one-line error naming the size and the model's value:
 * sizes >= 1; world (0: not checked) = tp * pp * cp * dp; ep divides dp * cp; heads, o_groups (and
 * the shared experts' hidden units) divisible by tp; routed experts divisible by ep; at least pp layers;
 * batch_rows (0: not checked) divisible by dp; vpp chunks only with pp > 1, at least one layer per
 * virtual stage. cfg may be NULL (no model rules). */
int par_validate(const par_sizes *s, const dsv4_config *cfg, int world, long batch_rows, mill_err *e);
/* The rollout engine's layout (rollout/group.h) for tp and ep into *s: W = max(tp, ep) ranks, both
 * dividing W, as tp x W / tp attention groups (dp) with the experts folded over all of them. */
int par_engine(int tp, int ep, par_sizes *s, mill_err *e);
/* The interleaved 1F1B (vpp > 1) runs micro-batches in groups of pp: n_micro must be a multiple. */
int par_validate_micro(const par_sizes *s, long n_micro, mill_err *e);
/* The layers [l0, l1) of virtual pipeline stage v (of pp x vpp): s->pp_layers when given, else an
 * even split in order with the remainder on the first stages. */
void par_stage_layers(const par_sizes *s, int n_layers, int v, int *l0, int *l1);
/* This rank's coordinates and groups over world (the caller keeps world; par_free frees the
 * groups). Validates the sizes against world's size first. */
int par_init(par_state *p, comm *world, const par_sizes *s, mill_err *e);
void par_free(par_state *p);
/* The first and one-past-last of n items (rows, floats) that rank r of k takes: contiguous, in
 * order, the remainder spread over the first ranks. */
void par_range(long n, int r, int k, long *lo, long *hi);

#endif
