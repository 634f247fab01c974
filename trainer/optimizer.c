#include "optimizer.h"

#include "../kernels/dense.h"

#include <fnmatch.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/optim.h"

void optim_config_default(optim_config *c) {
    memset(c, 0, sizeof *c);
    c->lr = 1e-3;
    c->min_lr = 1e-4;
    c->beta1 = 0.9;
    c->beta2 = 0.95;
    c->eps = 1e-8;
    c->weight_decay = 0.01;
    c->clip_grad = 1.0;
    c->schedule = LR_COSINE;
    c->total_steps = 1000;
}

int optimizer_init(optimizer *o, const dsv4_model *m, const optim_config *cfg, mill_err *e) {
    return optimizer_init_shard(o, m, cfg, NULL, e);
}

int optimizer_init_shard(optimizer *o, const dsv4_model *m, const optim_config *cfg, comm *dp, mill_err *e) {
    memset(o, 0, sizeof *o);
    o->cfg = *cfg;
    o->n_floats = m->n_floats;
    o->n_params = m->n_params;
    o->dp = dp;
    if (dp) model_shard_range(m, dp->rank, dp->size, &o->lo, &o->hi);
    else o->hi = m->n_floats;
    size_t n = o->hi - o->lo;
    o->m = calloc(n ? n : 1, sizeof(float));
    o->v = calloc(n ? n : 1, sizeof(float));
    o->update = calloc((size_t)m->n_params, 1);
    if (!o->m || !o->v || !o->update) {
        optimizer_free(o);
        return mill_errf(e, "optimizer: out of memory for %zu moments", n);
    }
    int matched[OPTIM_MAX_FREEZE] = {0};
    for (int i = 0; i < m->n_params; i++) {
        const param_info *p = &m->params[i];
        int frozen = 0;
        for (int f = 0; f < cfg->n_freeze; f++)
            if (fnmatch(cfg->freeze[f], p->name, 0) == 0) frozen = matched[f] = 1;
        o->update[i] = model_param_has_grad(p) && !frozen;
    }
    for (int f = 0; f < cfg->n_freeze; f++)
        if (!matched[f]) {
            optimizer_free(o);
            return mill_errf(e, "optimizer: freeze pattern \"%s\" matches no parameter", cfg->freeze[f]);
        }
    return 0;
}

void optimizer_free(optimizer *o) {
    mem_free(o->device, o->m);
    mem_free(o->device, o->v);
    free(o->update);
    memset(o, 0, sizeof *o);
}

int optimizer_to_device(optimizer *dst, const optimizer *src, const kctx *k, mill_err *e) {
    size_t bytes = sizeof(float) * (src->hi - src->lo);
    *dst = *src;
    dst->device = k->device;
    dst->update = malloc((size_t)src->n_params ? (size_t)src->n_params : 1);
    dst->m = mem_alloc_copy(k->device, src->m, bytes, e);
    dst->v = dst->m ? mem_alloc_copy(k->device, src->v, bytes, e) : NULL;
    if (!dst->update || !dst->m || !dst->v) {
        if (!dst->update) mill_errf(e, "out of memory");
        optimizer_free(dst);
        return mill_err_wrap(e, "optimizer_to_device");
    }
    memcpy(dst->update, src->update, (size_t)src->n_params);
    return 0;
}

int optimizer_copy_to_host(optimizer *host, const optimizer *dev, const kctx *k, mill_err *e) {
    size_t bytes = sizeof(float) * (dev->hi - dev->lo);
    if (host->device != DEVICE_CPU || host->lo != dev->lo || host->hi != dev->hi)
        return mill_errf(e, "optimizer_copy_to_host: the host optimizer does not match");
    TRY(op_copy_to_host(k, host->m, dev->m, bytes, e));
    TRY(op_copy_to_host(k, host->v, dev->v, bytes, e));
    host->step = dev->step;
    return 0;
}

double optimizer_lr(const optim_config *c, long s) {
    if (c->warmup_steps > 0 && s < c->warmup_steps) return c->lr * (double)(s + 1) / (double)c->warmup_steps;
    if (c->schedule == LR_CONSTANT) return c->lr;
    long span = c->total_steps - c->warmup_steps;
    double t = span > 0 ? (double)(s - c->warmup_steps) / (double)span : 1.0;
    if (t > 1.0) t = 1.0;
    return c->min_lr + 0.5 * (c->lr - c->min_lr) * (1.0 + cos(M_PI * t));
}

int optimizer_n_updated(const optimizer *o, const dsv4_model *m, size_t *floats) {
    int n = 0;
    *floats = 0;
    for (int i = 0; i < m->n_params; i++)
        if (o->update[i]) {
            n++;
            *floats += m->params[i].numel;
        }
    return n;
}

/* The end of the run of updated parameters that starts at i: the next ones follow it contiguously in
 * the flat buffer and take the same weight decay. Elementwise ops over the run
 * give the bits of one call per parameter, with a fraction of the launches on a GPU. */
static int optim_run_end(const optimizer *o, const dsv4_model *m, int i) {
    int j = i + 1;
    while (j < m->n_params && o->update[j] &&
           m->params[j].offset == m->params[j - 1].offset + m->params[j - 1].numel &&
           (m->params[j].ndim >= 2) == (m->params[i].ndim >= 2))
        j++;
    return j;
}

/* The floats of parameter i inside [lo, hi): [*a, *b), empty when a == b. */
static void clip_range(const param_info *p, size_t lo, size_t hi, size_t *a, size_t *b) {
    *a = p->offset > lo ? p->offset : lo;
    *b = p->offset + p->numel < hi ? p->offset + p->numel : hi;
    if (*b < *a) *b = *a;
}

/* Every rank's updated shard to every rank (and the bf16 shadow of what others wrote). */
static int gather_shards(optimizer *o, dsv4_model *m, const kctx *k, mill_err *e) {
    comm *c = o->dp;
    size_t *cnt = malloc(sizeof(size_t) * 2 * (size_t)c->size), *dsp = cnt + c->size;
    if (!cnt) return mill_errf(e, "optimizer: out of memory");
    for (int r = 0; r < c->size; r++) {
        size_t lo, hi;
        model_shard_range(m, r, c->size, &lo, &hi);
        dsp[r] = lo;
        cnt[r] = hi - lo;
    }
    int rc = comm_all_gatherv(c, m->data, cnt, dsp, DTYPE_F32, e);
    for (int r = 0; !rc && r < c->size; r++)
        if (r != c->rank) rc = kctx_shadow_touched(k, m->data + dsp[r], sizeof(float) * cnt[r], e);
    free(cnt);
    return rc ? mill_err_wrap(e, "optimizer: gathering the updated shards") : 0;
}

int optimizer_step(optimizer *o, dsv4_model *m, const kctx *k, float *grads, double *grad_norm, double *lr_used,
                   mill_err *e) {
    int sharded = o->dp && o->dp->size > 1, split = o->ep && o->ep->size > 1, sliced = o->tp && o->tp->size > 1;
    if ((o->dp && comm_flush(o->dp, e)) || (o->dense && comm_flush(o->dense, e)))
        return mill_err_wrap(e, "optimizer: the gradients' reduction");
    /* the global norm: one segment per updated tensor (its part in this shard), summed in table order
     * (one sync on a GPU), then over the shards; with experts over ranks the routed experts' part
     * apart, summed over the ep ranks too, and with heads over ranks the sliced tensors' over tp
     * (the rest is the same on each) */
    long *seg = malloc(sizeof(long) * 2 * (size_t)(m->n_params ? m->n_params : 1));
    if (!seg) return mill_errf(e, "optimizer: out of memory");
    double ss[3] = {0.0, 0.0, 0.0};
    int rc = 0;
    for (int part = 0; part < 3 && !rc; part++) {
        if ((part == 1 && !split) || (part == 2 && !sliced)) continue;
        int n_seg = 0;
        for (int i = 0; i < m->n_params; i++) {
            size_t a, b;
            clip_range(&m->params[i], o->lo, o->hi, &a, &b);
            const param_info *p = &m->params[i];
            int which = split && strstr(p->name, ".ffn.experts.") ? 1 : sliced && p->split >= 0 ? 2 : 0;
            if (o->update[i] && a < b && which == part) {
                seg[n_seg] = (long)a;
                seg[m->n_params + n_seg] = (long)(b - a);
                n_seg++;
            }
        }
        rc = op_sumsq_segments(k, grads, seg, seg + m->n_params, n_seg, &ss[part], e);
    }
    free(seg);
    if (rc) return rc;
    if ((sharded && comm_sum_f64(o->dp, ss, 3, e)) || (o->pp && comm_sum_f64(o->pp, ss, 3, e)) ||
        (split && comm_sum_f64(o->ep, ss + 1, 1, e)) || (sliced && comm_sum_f64(o->tp, ss + 2, 1, e)))
        return mill_err_wrap(e, "optimizer: the gradient norm");
    double norm = sqrt(ss[0] + ss[1] + ss[2]);
    if (!isfinite(norm)) return mill_errf(e, "optimizer: gradient norm is %g at step %ld (not finite)", norm, o->step);
    *grad_norm = norm;
    float clip = 1.0f;
    if (o->cfg.clip_grad > 0 && norm > o->cfg.clip_grad) clip = (float)(o->cfg.clip_grad / (norm + 1e-6));
    double lr = optimizer_lr(&o->cfg, o->step);
    *lr_used = lr;
    long t = o->step + 1;
    adamw_hparams hp = {.lr = (float)lr, .beta1 = (float)o->cfg.beta1, .beta2 = (float)o->cfg.beta2,
                        .eps = (float)o->cfg.eps, .bias_c1 = (float)(1.0 - pow(o->cfg.beta1, (double)t)),
                        .bias_c2 = (float)(1.0 - pow(o->cfg.beta2, (double)t)), .grad_scale = clip};
    for (int i = 0; i < m->n_params;) {
        if (!o->update[i]) {
            i++;
            continue;
        }
        int j = optim_run_end(o, m, i);
        const param_info *p = &m->params[i], *last = &m->params[j - 1];
        param_info run = *p; /* the run's floats, then their part in this shard */
        run.numel = last->offset + last->numel - p->offset;
        size_t a, b;
        clip_range(&run, o->lo, o->hi, &a, &b);
        i = j;
        if (a >= b) continue;
        long n = (long)(b - a);
        float *g = grads + a; /* clipped inside the update (hp.grad_scale): no pass of its own */
        hp.weight_decay = p->ndim >= 2 ? (float)o->cfg.weight_decay : 0.0f; /* no decay on norms, scales, sinks */
        TRY(op_adamw(k, m->data + a, g, o->m + (a - o->lo), o->v + (a - o->lo), n, hp, e));
    }
    o->step = t;
    return sharded ? gather_shards(o, m, k, e) : 0;
}
