/* algos/grpo.h — GRPO advantages and the clipped policy loss over per-token log-probabilities.
 * Owns: group advantages, the per-token loss and its gradient d loss / d logp (the trainer turns
 * that into logits gradients), KL estimators against a reference policy, truncated importance
 * sampling between the rollout's and the trainer's old-policy logprobs, and step statistics. */
#ifndef MILL_GRPO_H
#define MILL_GRPO_H

#include <stdint.h>

#include "../common/err.h"

/* k1 = log-ratio, k2 = half squared log-ratio, k3 = low_var_kl (Schulman's estimator, clamped to
 * [-10, 10] as verl does), abs = |log-ratio| (verl's "abs"), unbiased = k3 weighted by the
 * current-over-old ratio (DeepSeek-V3.2's unbiased KL estimate, the samples being the old policy's) */
typedef enum { KL_K1 = 1, KL_K2 = 2, KL_K3 = 3, KL_ABS = 4, KL_UNBIASED = 5 } grpo_kl;

/* How token losses become the loss (verl's loss_agg_mode): the mean over all tokens, the mean over
 * sequences of per-sequence means, of per-sequence sums (Dr. GRPO), or the sum over all tokens
 * divided by a constant horizon (seq-mean-token-sum-norm). */
typedef enum { AGG_TOKEN_MEAN, AGG_SEQ_MEAN_TOKEN_MEAN, AGG_SEQ_MEAN_TOKEN_SUM, AGG_SEQ_MEAN_TOKEN_SUM_NORM } grpo_agg;

/* The importance ratio: per token (PPO/GRPO), or GSPO's per sequence (the geometric mean of its
 * tokens' ratios, each token's gradient carrying it). */
typedef enum { RATIO_TOKEN, RATIO_GSPO } grpo_ratio;

typedef struct {
    double eps_low, eps_high; /* ratio clipped to [1 - eps_low, 1 + eps_high] (0.2, 0.28) */
    int std_normalize;        /* divide advantages by the group's std (+1e-6) */
    int seq_mean;             /* 0: mean over all tokens; 1: mean over sequences of per-sequence means */
    grpo_agg agg;             /* overrides seq_mean when not AGG_TOKEN_MEAN */
    double agg_horizon;       /* AGG_SEQ_MEAN_TOKEN_SUM_NORM's divisor (the response length budget) */
    grpo_ratio ratio;
    double clip_ratio_c;      /* dual-clip: with a negative advantage the loss is at most -A * c (> 1; 0: off) */
    double log_ratio_clamp;   /* log-ratios clamped to [-c, c] before exp (no gradient past it; 0: off) */
    double kl_coef;           /* 0: no reference policy needed */
    grpo_kl kl_type;
    double tis_cap;      /* truncated importance sampling weight cap (0: off) */
    double entropy_coef; /* entropy bonus: loss -= entropy_coef * mean entropy (0: off) */
} grpo_config;

void grpo_config_default(grpo_config *c);

/* adv[i] for n_groups groups of group_size rewards: reward - group mean (then / (std + 1e-6)). */
void grpo_advantages(const float *rewards, int n_groups, int group_size, int std_normalize, float *adv);

typedef struct {
    double loss, clip_frac, kl, entropy, max_ratio, max_abs_dlogp_old; /* last: max |old - rollout| */
    long tokens;
} grpo_stats;

/* Inputs per counted token t (n of them, in batch order): seq[t] its sequence, adv[seq] the
 * sequence's advantage, old_logp (the behaviour policy as the trainer computes it), rollout_logp
 * (what the engine reported; NULL when TIS is off), ref_logp (NULL when kl_coef is 0).
 * old_logp NULL: the current policy is the old one (one update per batch), so old = logp, detached.
 * logp, ent: the current policy's log-probabilities and entropies. Writes dlogp [n], dent [n]
 * (when entropy_coef != 0) and the loss/statistics. A NaN in any logprob or entropy fails with
 * an error naming the token and its sequence (fmin/fmax would hide it as a clipped value). */
typedef struct {
    const grpo_config *cfg;
    const int32_t *seq;
    int n_seqs;
    const float *adv, *old_logp, *rollout_logp, *ref_logp;
    /* the aggregation's denominators when a minibatch is split into micro-batches: the tokens
     * (token mean) or sequences with tokens (sequence mean) of the whole minibatch; 0: this call's */
    long norm_tokens;
    int norm_seqs;
    /* context parallelism: a sequence's tokens lie on several ranks; share (NULL: none) sums v [2 x
     * n_seqs] (each sequence's token count, then its log-ratio sum) over them, in place, before the
     * per-sequence terms (sequence means, GSPO's ratio) use them */
    int (*share)(void *ctx, double *v, int n, mill_err *e);
    void *share_ctx;
    grpo_stats stats;
} grpo_batch;

int grpo_loss(grpo_batch *b, const float *logp, const float *ent, int n, float *dlogp, float *dent, double *loss,
              mill_err *e);

#endif
