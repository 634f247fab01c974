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

int grpo_loss(grpo_batch *b, const float *logp, const float *ent, int n, float *dlogp, float *dent, double *loss,
              mill_err *e) {
    const grpo_config *c = b->cfg;
    const float *old = b->old_logp ? b->old_logp : logp;
    /* token weights of the aggregation: 1/n, or 1/(n_seqs * len(seq)) for the sequence mean */
    int *len = calloc((size_t)b->n_seqs, sizeof(int));
    if (!len) return mill_errf(e, "grpo: out of memory");
    for (int t = 0; t < n; t++) {
        if (b->seq[t] < 0 || b->seq[t] >= b->n_seqs) {
            free(len);
            return mill_errf(e, "grpo: token %d belongs to sequence %d of %d", t, b->seq[t], b->n_seqs);
        }
        len[b->seq[t]]++;
    }
    int used = 0;
    for (int s = 0; s < b->n_seqs; s++) used += len[s] > 0;
    grpo_stats st = {0};
    double total = 0;
    for (int t = 0; t < n; t++) {
        int s = b->seq[t];
        double w = c->seq_mean ? 1.0 / ((double)(b->norm_seqs ? b->norm_seqs : used) * len[s])
                               : 1.0 / (double)(b->norm_tokens ? b->norm_tokens : n);
        double A = b->adv[s], lr = (double)logp[t] - old[t], ratio = exp(lr);
        double clipped = fmin(fmax(ratio, 1.0 - c->eps_low), 1.0 + c->eps_high);
        double s1 = ratio * A, s2 = clipped * A;
        double tis = 1.0;
        if (b->rollout_logp) {
            double d = (double)old[t] - b->rollout_logp[t];
            st.max_abs_dlogp_old = fmax(st.max_abs_dlogp_old, fabs(d));
            if (c->tis_cap > 0) tis = fmin(exp(d), c->tis_cap);
        }
        /* -min(s1, s2): the unclipped branch carries the gradient d(-ratio*A)/dlogp = -ratio*A */
        double l = -fmin(s1, s2) * tis, g = s1 <= s2 ? -ratio * A * tis : 0.0;
        st.clip_frac += s1 > s2 ? 1.0 / n : 0.0;
        st.max_ratio = fmax(st.max_ratio, ratio);
        if (c->kl_coef != 0 && b->ref_logp) {
            double x = (double)b->ref_logp[t] - logp[t], kl, dkl; /* dkl = d kl / d logp */
            if (c->kl_type == KL_K1) {
                kl = -x;
                dkl = 1.0;
            } else if (c->kl_type == KL_K2) {
                kl = 0.5 * x * x;
                dkl = -x;
            } else {
                kl = exp(x) - x - 1.0;
                dkl = -exp(x) + 1.0;
                if (kl > 10.0) { /* clamped: no gradient past the bound */
                    kl = 10.0;
                    dkl = 0.0;
                }
            }
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
