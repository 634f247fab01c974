#include "grpo.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void grpo_config_default(grpo_config *c) {
    memset(c, 0, sizeof *c);
    c->eps_low = 0.2;
    c->eps_high = 0.28;
    c->kl_type = KL_K3;
}

void grpo_advantages(const float *rewards, int n_groups, int group_size, int std_normalize, float *adv) {
    for (int g = 0; g < n_groups; g++) {
        const float *r = rewards + (long)g * group_size;
        double mean = 0, var = 0;
        for (int i = 0; i < group_size; i++) mean += r[i];
        mean /= group_size;
        for (int i = 0; i < group_size; i++) var += (r[i] - mean) * (r[i] - mean);
        double sd = group_size > 1 ? sqrt(var / (group_size - 1)) : 0.0; /* unbiased, as torch.std */
        for (int i = 0; i < group_size; i++)
            adv[(long)g * group_size + i] = (float)(std_normalize ? (r[i] - mean) / (sd + 1e-6) : r[i] - mean);
    }
}

/* The KL estimator of the policy against the reference at one token (x = ref_logp - logp, lr the
 * token's log-ratio to the old policy) and its derivative in logp. */
static void kl_term(grpo_kl type, double x, double lr, double *kl, double *dkl) {
    *kl = *dkl = 0.0;
    switch (type) {
    case KL_K1: *kl = -x, *dkl = 1.0; break;
    case KL_K2: *kl = 0.5 * x * x, *dkl = -x; break;
    case KL_ABS: *kl = fabs(x), *dkl = x > 0 ? -1.0 : x < 0 ? 1.0 : 0.0; break;
    case KL_K3:
    case KL_UNBIASED: {
        double k3 = exp(x) - x - 1.0, dk3 = -exp(x) + 1.0;
        if (k3 > 10.0) k3 = 10.0, dk3 = 0.0; /* clamped: no gradient past the bound (verl) */
        if (type == KL_K3) {
            *kl = k3, *dkl = dk3;
        } else { /* the samples are the old policy's: weight by pi / pi_old (d r / d logp = r) */
            double r = exp(lr);
            *kl = r * k3, *dkl = r * k3 + r * dk3;
        }
        break;
    }
    }
}

int grpo_loss(grpo_batch *b, const float *logp, const float *ent, int n, float *dlogp, float *dent, double *loss,
              mill_err *e) {
    const grpo_config *c = b->cfg;
    const float *old = b->old_logp ? b->old_logp : logp;
    grpo_agg agg = c->agg != AGG_TOKEN_MEAN ? c->agg : c->seq_mean ? AGG_SEQ_MEAN_TOKEN_MEAN : AGG_TOKEN_MEAN;
    if (agg == AGG_SEQ_MEAN_TOKEN_SUM_NORM && !(c->agg_horizon > 0))
        return mill_errf(e, "grpo: seq-mean-token-sum-norm needs a positive horizon, got %g", c->agg_horizon);
    /* per sequence: its token count and (GSPO) the sum of its log-ratios */
    double *len = calloc(2 * (size_t)b->n_seqs + 1, sizeof(double)), *slr = len ? len + b->n_seqs : NULL;
    if (!len) return mill_errf(e, "grpo: out of memory");
    for (int t = 0; t < n; t++) {
        int s = b->seq[t];
        const char *bad = isnan(logp[t]) ? "logprob" : isnan(old[t]) ? "old-policy logprob"
                          : b->rollout_logp && isnan(b->rollout_logp[t]) ? "rollout logprob"
                          : b->ref_logp && isnan(b->ref_logp[t]) ? "reference logprob"
                          : ent && isnan(ent[t]) ? "entropy" : NULL;
        if (s < 0 || s >= b->n_seqs || bad) {
            free(len);
            return bad ? mill_errf(e, "grpo: token %d of sequence %d has a NaN %s", t, s, bad)
                       : mill_errf(e, "grpo: token %d belongs to sequence %d of %d", t, s, b->n_seqs);
        }
        len[s]++;
        slr[s] += (double)logp[t] - old[t];
    }
    if (b->share && b->share(b->share_ctx, len, 2 * b->n_seqs, e)) {
        free(len);
        return -1;
    }
    int used = 0;
    for (int s = 0; s < b->n_seqs; s++) used += len[s] > 0;
    double nseq = (double)(b->norm_seqs ? b->norm_seqs : used), ntok = (double)(b->norm_tokens ? b->norm_tokens : n);
    grpo_stats st = {0};
    double total = 0;
    for (int t = 0; t < n; t++) {
        int s = b->seq[t];
        double w = agg == AGG_TOKEN_MEAN ? 1.0 / ntok
                   : agg == AGG_SEQ_MEAN_TOKEN_MEAN ? 1.0 / (nseq * len[s])
                   : agg == AGG_SEQ_MEAN_TOKEN_SUM ? 1.0 / nseq
                                                   : 1.0 / c->agg_horizon;
        double tlr = (double)logp[t] - old[t], lr = c->ratio == RATIO_GSPO ? slr[s] / len[s] : tlr;
        double live = 1.0; /* 0 where a clamp cut the log-ratio's gradient */
        if (c->ratio == RATIO_GSPO && lr > 10.0) lr = 10.0, live = 0.0; /* verl's bound on the sequence ratio */
        if (c->log_ratio_clamp > 0 && fabs(lr) > c->log_ratio_clamp) {
            lr = copysign(c->log_ratio_clamp, lr);
            live = 0.0;
        }
        double A = b->adv[s], ratio = exp(lr);
        double clipped = fmin(fmax(ratio, 1.0 - c->eps_low), 1.0 + c->eps_high);
        double s1 = ratio * A, s2 = clipped * A;
        double tis = 1.0;
        if (b->rollout_logp) {
            double d = (double)old[t] - b->rollout_logp[t];
            st.max_abs_dlogp_old = fmax(st.max_abs_dlogp_old, fabs(d));
            if (c->tis_cap > 0) tis = fmin(exp(d), c->tis_cap);
        }
        /* -min(s1, s2): the unclipped branch carries the gradient d(-ratio*A)/dlogp = -ratio*A (GSPO:
         * the sequence's ratio, each token's log-probability entering it with weight one) */
        double pg = -fmin(s1, s2), g = s1 <= s2 ? -ratio * A * live : 0.0;
        if (c->clip_ratio_c > 0 && A < 0 && -A * c->clip_ratio_c < pg) { /* dual-clip: a constant bound */
            pg = -A * c->clip_ratio_c;
            g = 0.0;
        }
        double l = pg * tis;
        g *= tis;
        st.clip_frac += s1 > s2 ? 1.0 / n : 0.0;
        st.max_ratio = fmax(st.max_ratio, ratio);
        if (c->kl_coef != 0 && b->ref_logp) {
            double kl, dkl;
            kl_term(c->kl_type, (double)b->ref_logp[t] - logp[t], tlr, &kl, &dkl);
            st.kl += kl / n;
            l += c->kl_coef * kl;
            g += c->kl_coef * dkl;
        }
        if (ent) {
            st.entropy += ent[t] / n;
            if (c->entropy_coef != 0 && dent) {
                l -= c->entropy_coef * ent[t];
                dent[t] = (float)(-w * c->entropy_coef);
            }
        }
        total += w * l;
        dlogp[t] = (float)(w * g);
    }
    free(len);
    st.loss = total;
    st.tokens = n;
    b->stats = st;
    *loss = total;
    return 0;
}
