#include "parallel.h"

#include <stdio.h>
#include <string.h>

par_sizes par_sizes_one(void) { return (par_sizes){.tp = 1, .pp = 1, .ep = 1, .cp = 1, .dp = 1, .vpp = 1}; }

const char *par_sizes_str(const par_sizes *s, char *buf, size_t n) {
    int k = snprintf(buf, n, "tp %d, pp %d, ep %d, cp %d, dp %d", s->tp, s->pp, s->ep, s->cp, s->dp);
    if (s->vpp > 1 && k >= 0 && (size_t)k < n) k += snprintf(buf + k, n - (size_t)k, ", vpp %d", s->vpp);
    if (s->sp && s->tp > 1 && k >= 0 && (size_t)k < n) k += snprintf(buf + k, n - (size_t)k, ", sp");
    if (s->fold && s->ep > 1 && k >= 0 && (size_t)k < n) snprintf(buf + k, n - (size_t)k, ", folded");
    return buf;
}

int par_switch_parse(const char *v, int *on) {
    static const char *const yes[] = {"on", "true", "1"}, *const no[] = {"off", "false", "0"};
    for (int i = 0; i < 3; i++) {
        if (!strcmp(v, yes[i])) return *on = 1, 0;
        if (!strcmp(v, no[i])) return *on = 0, 0;
    }
    return -1;
}

int par_vpp(const par_sizes *s) { return s->vpp > 1 ? s->vpp : 1; }

static const char *const wire_names[] = {"auto", "fp32", "bf16"}; /* PAR_WIRE_* */

int par_wire_parse(const char *v, int *wire) {
    for (int i = 0; i < 3; i++)
        if (!strcmp(v, wire_names[i])) return *wire = i, 0;
    return -1;
}

const char *par_wire_name(int wire) { return wire >= 0 && wire < 3 ? wire_names[wire] : "?"; }

int par_validate(const par_sizes *s, const dsv4_config *cfg, int world, long batch_rows, mill_err *e) {
    const char *names[5] = {"tp", "pp", "ep", "cp", "dp"};
    const int v[5] = {s->tp, s->pp, s->ep, s->cp, s->dp};
    for (int i = 0; i < 5; i++)
        if (v[i] < 1 || v[i] > 1 << 20) return mill_errf(e, "parallel: %s must be a positive size, got %d", names[i], v[i]);
    if (s->vpp < 0 || s->vpp > PAR_MAX_VPP)
        return mill_errf(e, "parallel: vpp must be 1 to %d model chunks per pipeline rank, got %d", PAR_MAX_VPP, s->vpp);
    if (s->vpp > 1 && s->pp < 2)
        return mill_errf(e, "parallel: vpp %d interleaves pipeline stages; it needs pp > 1 (pp is %d)", s->vpp, s->pp);
    int vs = s->pp * par_vpp(s); /* virtual stages */
    double w = (double)s->tp * s->pp * s->cp * s->dp; /* up to 2^80: no long holds it */
    if (world > 0 && w != world)
        return mill_errf(e, "parallel: tp x pp x cp x dp = %d x %d x %d x %d = %.0f ranks, but the job has %d", s->tp,
                         s->pp, s->cp, s->dp, w, world);
    if (s->fold && ((long)s->tp * s->dp * s->cp) % s->ep)
        return mill_errf(e, "parallel: ep %d must divide tp x dp x cp = %ld (experts are spread over the ranks of a "
                            "stage)", s->ep, (long)s->tp * s->dp * s->cp);
    if (!s->fold && ((long)s->dp * s->cp) % s->ep)
        return mill_errf(e, "parallel: ep %d must divide dp x cp = %ld (experts are spread over the data-parallel ranks)",
                         s->ep, (long)s->dp * s->cp);
    if (cfg) {
        if (cfg->num_attention_heads % s->tp)
            return mill_errf(e, "parallel: tp %d must divide num_attention_heads %d", s->tp, cfg->num_attention_heads);
        if (cfg->o_groups % s->tp)
            return mill_errf(e, "parallel: tp %d must divide o_groups %d (wo_a is split by output groups)", s->tp,
                             cfg->o_groups);
        if ((cfg->moe_intermediate_size * cfg->n_shared_experts) % s->tp)
            return mill_errf(e, "parallel: tp %d must divide the shared experts' hidden units %d", s->tp,
                             cfg->moe_intermediate_size * cfg->n_shared_experts);
        if (cfg->n_routed_experts % s->ep)
            return mill_errf(e, "parallel: ep %d must divide n_routed_experts %d", s->ep, cfg->n_routed_experts);
        if (cfg->num_hidden_layers < vs && vs == s->pp)
            return mill_errf(e, "parallel: pp %d stages need at least as many layers; the model has %d", s->pp,
                             cfg->num_hidden_layers);
        if (cfg->num_hidden_layers < vs)
            return mill_errf(e, "parallel: pp %d x vpp %d = %d stages need at least as many layers; the model has %d",
                             s->pp, s->vpp, vs, cfg->num_hidden_layers);
        if (s->pp_layers[0] > 0) { /* an explicit split: one count per stage, each at least 1, all the layers */
            int sum = 0, n = 0;
            for (; n < PAR_MAX_STAGES && s->pp_layers[n] > 0; n++) sum += s->pp_layers[n];
            if (n != vs || sum != cfg->num_hidden_layers)
                return mill_errf(e, "parallel: pp_layers gives %d stage(s) of %d layers in all; %s is %d and the "
                                    "model has %d layers", n, sum, vs == s->pp ? "pp" : "pp x vpp", vs,
                                 cfg->num_hidden_layers);
        }
    }
    if (batch_rows > 0 && batch_rows % s->dp)
        return mill_errf(e, "parallel: the batch's %ld rows must divide evenly over dp %d", batch_rows, s->dp);
    if (vs > PAR_MAX_STAGES)
        return mill_errf(e, "parallel: pp %d x vpp %d: at most %d pipeline stages", s->pp, par_vpp(s), PAR_MAX_STAGES);
    if (cfg && s->pp > 1 && cfg->tie_word_embeddings)
        return mill_errf(e, "parallel: pp %d: a model with tied embeddings cannot be split into stages", s->pp);
    return 0;
}

int par_engine(int tp, int ep, par_sizes *s, mill_err *e) {
    *s = par_sizes_one();
    if (tp < 1 || ep < 1 || tp > 1 << 20 || ep > 1 << 20)
        return mill_errf(e, "parallel: an engine's tp and ep must be positive sizes, got tp %d, ep %d", tp, ep);
    int W = tp > ep ? tp : ep;
    if (W % tp || W % ep)
        return mill_errf(e, "parallel: an engine's tp %d and ep %d must both divide its %d ranks (the larger of the two)",
                         tp, ep, W);
    s->tp = tp;
    s->ep = ep;
    s->dp = W / tp; /* the attention groups */
    s->fold = 1;
    return 0;
}

int par_validate_micro(const par_sizes *s, long n_micro, mill_err *e) {
    if (par_vpp(s) > 1 && n_micro % s->pp)
        return mill_errf(e, "parallel: the interleaved 1F1B (vpp %d) runs micro-batches in groups of pp %d; %ld "
                            "micro-batches are not a multiple of %d", par_vpp(s), s->pp, n_micro, s->pp);
    return 0;
}

void par_stage_layers(const par_sizes *s, int n_layers, int v, int *l0, int *l1) {
    if (s->pp_layers[0] > 0) {
        *l0 = 0;
        for (int i = 0; i < v; i++) *l0 += s->pp_layers[i];
        *l1 = *l0 + s->pp_layers[v];
        return;
    }
    long lo, hi;
    par_range(n_layers, v, s->pp * par_vpp(s), &lo, &hi);
    *l0 = (int)lo;
    *l1 = (int)hi;
}

void par_range(long n, int r, int k, long *lo, long *hi) {
    long q = n / k, rem = n % k;
    *lo = (long)r * q + (r < rem ? r : rem);
    *hi = *lo + q + (r < rem);
}

int par_init(par_state *p, comm *world, const par_sizes *s, mill_err *e) {
    memset(p, 0, sizeof *p);
    TRY(par_validate(s, NULL, world->size, 0, e));
    p->sz = *s;
    p->world = world->size;
    p->rank = world->rank;
    p->world_c = world;
    int tp = s->tp, cp = s->cp, dp = s->dp, ep = s->ep, r = world->rank;
    p->tp_rank = r % tp;
    p->cp_rank = r / tp % cp;
    p->dp_rank = r / (tp * cp) % dp;
    p->pp_rank = r / (tp * cp * dp);
    int stage = tp * cp * dp, local = r % stage, edp = s->fold ? stage / ep : cp * dp / ep, et = s->fold ? 1 : tp;
    p->ep_rank = local / et % ep;
    p->edp_rank = local / (et * ep);
    int t = p->tp_rank, c = p->cp_rank, d = p->dp_rank, q = p->pp_rank, ft = s->fold ? 0 : t; /* folded: over tp */
    struct {
        comm **out;
        const char *name;
        int color, key;
    } g[] = {
        {&p->tp, "tp", r / tp, t},
        {&p->cp, "cp", t + tp * (d + dp * q), c},
        {&p->dp, "dp", t + tp * (c + cp * q), d},
        {&p->pp, "pp", local, q},
        {&p->dpcp, "dpcp", t + tp * q, c + cp * d},
        {&p->mp, "mp", c + cp * d, t + tp * q},
        {&p->ep, "ep", ft + tp * (p->edp_rank + edp * q), p->ep_rank},
        {&p->edp, "edp", ft + tp * (p->ep_rank + ep * q), p->edp_rank},
    };
    for (size_t i = 0; i < sizeof g / sizeof g[0]; i++)
        if (comm_split(world, g[i].color, g[i].key, g[i].name, g[i].out, e)) {
            par_free(p);
            return mill_err_wrap(e, "parallel: group %s of rank %d", g[i].name, r);
        }
    return 0;
}

void par_free(par_state *p) {
    comm *g[] = {p->tp, p->cp, p->dp, p->pp, p->ep, p->edp, p->dpcp, p->mp};
    for (size_t i = 0; i < sizeof g / sizeof g[0]; i++) comm_free(g[i]);
    memset(p, 0, sizeof *p);
}
