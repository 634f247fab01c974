#include "server.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "../common/wire.h"
#include "../kernels/dense.h"
#include "engine.h"
#include "generate.h"
#include "group.h"

typedef struct {
    unsigned char peer[256];
    size_t peer_len;
    uint64_t id;
    sample_params sp;
    int n, remaining;
} request;

typedef struct {
    request *req;
    int index, plen, nout, state; /* state: 0 waiting, 1 prefill next, 2 decoding, 3 route last, 4 done */
    int32_t *tokens;               /* [plen + max_new] */
    float *logprobs;               /* [max_new] */
    int32_t *routing;              /* [layers, plen + max_new, k] */
    size_t bytes;                  /* of the three buffers above (the queue's budget counts them) */
    engine_seq *seq;
    rng r;
    long version_start;
    finish_reason finish;
} sample;

/* At most this many senders (trainer ranks) share one weight version. */
#define UPDATE_MAX_SENDERS 65536

/* One sender's device buffer mapped here over CUDA IPC, kept while its handle repeats. */
typedef struct {
    unsigned char handle[MEM_IPC_HANDLE_BYTES];
    void *src; /* NULL: nothing mapped */
} ipc_map;

/* One sender's part of a version gathered over CUDA IPC: floats [offset, offset + floats) of the
 * flat layout, read from src. floats is 0 until the sender has arrived. */
typedef struct {
    int64_t offset, floats;
    int sender;
    const void *src;
} ipc_range;

typedef struct {
    dsv4_model *m;   /* the host weights (this rank's part of an engine of several): staging and swaps happen here */
    dsv4_model table; /* the whole model's parameter table (no buffers): what an update is checked against */
    engine_group *g;  /* the engine's ranks (NULL or one: this process alone) */
    const dsv4_model *run; /* what the engine runs: m, or its device copy */
    dsv4_model *dev; /* that device copy (NULL on the CPU): released, its flat buffer is given back too */
    kctx kown;     /* the kctx the server made (k points at it), unless the caller gave one */
    const kctx *k;
    int exact;       /* server_config.exact */
    arena exact_mem; /* rescore's activations (on k's device), made at its first use */
    int exact_mem_on;
    long exact_samples; /* samples rescored, and the seconds it took (stats) */
    double exact_s;
    engine en;
    void *sock;
    sample **samples;
    int n_samples, cap_samples;
    size_t queued_bytes, queue_budget; /* the samples' buffers, and their bound */
    long version, steps, tokens_out, requests;
    int released, stop;
    /* staged weight update: buckets of one version from senders 0..staged_senders-1, applied when
     * every sender has sent its last bucket */
    float *staged;
    uint8_t *staged_set;  /* [n_params]: sent in this version */
    uint8_t *staged_last; /* [staged_senders]: this sender's last bucket came */
    long staged_version;
    int staged_senders, staged_n_last;
    int max_batch;
    /* CUDA IPC updates: each sender's buffer mapped here (slot = sender, kept while its handle
     * repeats); after one, the host copy m is stale until the next bucket update refreshes it */
    ipc_map *ipc_maps;
    int ipc_n_maps;
    /* a version gathered over CUDA IPC (ipc_got != NULL): one range per sender, copied to the
     * device when all ipc_senders have arrived */
    ipc_range *ipc_got;
    int ipc_senders, ipc_n;
    long ipc_version;
    int host_stale;
    /* resumed with a stale host copy: the device buffer came back empty, and nothing is generated
     * until an update brings a whole version (update_weights_ipc, or buckets of every parameter) */
    int weights_missing;
} server;

/* The device copy's flat buffer is given back (released on a GPU). */
static int weights_dropped(const server *s) { return s->dev && s->dev->dropped_base; }

/* What dropping the device copy gives back: the fp32 weights and their bf16 shadow. */
static double weights_mib(const server *s) { return (double)s->m->n_floats * (sizeof(float) + 2) / (1 << 20); }

static void reply_error(server *s, const unsigned char *peer, size_t peer_len, uint64_t id, const char *msg) {
    if (!s->sock) return; /* a follower rank: the leader answers */
    wire_builder *b = wire_builder_new("error", id);
    mill_err e;
    if (!b) return;
    wire_put_str(b, "message", msg);
    wire_send(s->sock, peer, peer_len, b, &e); /* a peer that left cannot be told; keep serving */
    wire_builder_free(b);
}

static void reply_simple(server *s, const unsigned char *peer, size_t peer_len, const char *type, uint64_t id) {
    wire_builder *b = wire_builder_new(type, id);
    mill_err e;
    if (!b) return;
    wire_put_int(b, "weight_version", s->version);
    wire_put_bool(b, "released", s->released);
    wire_put_bool(b, "weights_missing", s->weights_missing);
    wire_send(s->sock, peer, peer_len, b, &e);
    wire_builder_free(b);
}

static void sample_free(server *s, sample *sm) {
    if (sm->seq) engine_seq_free(&s->en, sm->seq);
    s->queued_bytes -= sm->bytes;
    free(sm->tokens);
    free(sm->logprobs);
    free(sm->routing);
    free(sm);
}

static int handle_generate(server *s, const wire_msg *msg, const unsigned char *peer, size_t peer_len, mill_err *e) {
    const dsv4_config *c = &s->m->cfg;
    if (s->released) return mill_errf(e, "generate: the engine's memory is released; send resume first");
    if (s->weights_missing)
        return mill_errf(e, "generate: the weights were given back with the engine's memory and the last version came "
                            "over CUDA IPC; send update_weights_ipc or a full update_weights");
    int64_t n, maxn, topk, seed, stop[8];
    double temp, topp;
    int n_stop;
    if (wire_get_int(msg, "n", 0, 1, 1, 1024, &n, e) || wire_get_int(msg, "max_new_tokens", 1, 0, 0, 1 << 20, &maxn, e) ||
        wire_get_num(msg, "temperature", 0, 1.0, 0, 100, &temp, e) || wire_get_num(msg, "top_p", 0, 1.0, 1e-9, 1, &topp, e) ||
        wire_get_int(msg, "top_k", 0, 0, 0, c->vocab_size, &topk, e) ||
        wire_get_int(msg, "seed", 0, 0, 0, INT64_MAX, &seed, e) ||
        wire_get_int_array(msg, "stop", 0, 0, c->vocab_size - 1, stop, 8, &n_stop, e))
        return -1;
    /* one prompt (frame "prompt"), or a batch of P prompts admitted together (frames "prompts",
     * concatenated, and "prompt_lens" [P]): n samples each, sample p * n + i from prompt p */
    const wire_frame *pf = wire_frame_named(msg, "prompt"), *lf = wire_frame_named(msg, "prompt_lens");
    int32_t one_len;
    const int32_t *plens = &one_len;
    int P = 1;
    if (lf) {
        pf = wire_frame_named(msg, "prompts");
        if (lf->dtype != DTYPE_I32 || lf->ndim != 1 || lf->shape[0] < 1 || lf->shape[0] > 4096)
            return mill_errf(e, "generate: frame \"prompt_lens\" must be I32 of shape [1..4096]");
        P = (int)lf->shape[0];
        plens = lf->data;
    }
    if (!pf || pf->dtype != DTYPE_I32 || pf->ndim != 1 || pf->shape[0] < 1)
        return mill_errf(e, "generate: needs a frame \"%s\" of dtype I32 and shape [length >= 1]", lf ? "prompts" : "prompt");
    if (!lf) one_len = (int32_t)pf->shape[0];
    int64_t total = 0;
    int maxplen = 0;
    for (int p = 0; p < P; p++) {
        if (plens[p] < 1 || plens[p] > pf->shape[0])
            return mill_errf(e, "generate: prompt_lens[%d] = %d is outside [1, %lld]", p, plens[p],
                             (long long)pf->shape[0]);
        total += plens[p];
        maxplen = plens[p] > maxplen ? plens[p] : maxplen;
    }
    if (total != pf->shape[0])
        return mill_errf(e, "generate: prompt_lens sum to %lld but \"prompts\" holds %lld tokens", (long long)total,
                         (long long)pf->shape[0]);
    if (n * P > 65536) return mill_errf(e, "generate: %lld samples in one request (at most 65536)", (long long)(n * P));
    const int32_t *prompt = pf->data;
    for (int64_t t = 0; t < total; t++)
        if (prompt[t] < 0 || prompt[t] >= c->vocab_size)
            return mill_errf(e, "generate: prompt token %lld = %d is outside the vocabulary [0, %d)", (long long)t,
                             prompt[t], c->vocab_size);
    if (engine_seq_bytes(&s->en, maxplen + (int)maxn) > s->en.budget)
        return mill_errf(e, "generate: one sample of %lld tokens needs %zu cache bytes, more than the %zu-byte budget",
                         (long long)(maxplen + maxn), engine_seq_bytes(&s->en, maxplen + (int)maxn), s->en.budget);
    int L = c->num_hidden_layers, K = c->num_experts_per_tok;
    size_t need = 0; /* backpressure: a request that would take the queue past its budget waits outside */
    for (int p = 0; p < P; p++)
        need += (size_t)n * (sizeof(int32_t) * (size_t)(plens[p] + maxn) * (size_t)(1 + L * K) +
                             sizeof(float) * (size_t)(maxn ? maxn : 1));
    if (s->queued_bytes + need > s->queue_budget)
        return mill_errf(e, "generate: busy: %d samples queued take %.1f MiB, this request's %lld need %.1f MiB more "
                            "than the %.1f MiB queue budget; retry once some finish",
                         s->n_samples, (double)s->queued_bytes / 1048576.0, (long long)(n * P), (double)need / 1048576.0,
                         (double)s->queue_budget / 1048576.0);
    request *rq = calloc(1, sizeof *rq);
    if (!rq) return mill_errf(e, "generate: out of memory");
    memcpy(rq->peer, peer, peer_len);
    rq->peer_len = peer_len;
    rq->id = wire_id(msg);
    rq->n = rq->remaining = (int)(n * P);
    rq->sp = (sample_params){.temperature = (float)temp, .top_p = (float)topp, .top_k = (int)topk,
                             .seed = (uint64_t)seed, .max_new_tokens = (int)maxn, .n_stop = n_stop};
    for (int i = 0; i < n_stop; i++) rq->sp.stop[i] = (int32_t)stop[i];
    const int32_t *pp = prompt;
    for (int i = 0; i < rq->n; i++) {
        int plen = plens[i / n];
        sample *sm = calloc(1, sizeof *sm);
        if (sm) {
            sm->tokens = malloc(sizeof(int32_t) * (size_t)(plen + maxn));
            sm->logprobs = malloc(sizeof(float) * (size_t)(maxn ? maxn : 1));
            sm->routing = malloc(sizeof(int32_t) * (size_t)L * (size_t)(plen + maxn) * K);
            sm->bytes = sizeof(int32_t) * (size_t)(plen + maxn) * (size_t)(1 + L * K) +
                        sizeof(float) * (size_t)(maxn ? maxn : 1);
            s->queued_bytes += sm->bytes;
        }
        if (s->n_samples == s->cap_samples) {
            int cap = s->cap_samples ? 2 * s->cap_samples : 64;
            sample **ns = realloc(s->samples, sizeof *ns * (size_t)cap);
            if (ns) {
                s->samples = ns;
                s->cap_samples = cap;
            }
        }
        if (!sm || !sm->tokens || !sm->logprobs || !sm->routing || s->n_samples == s->cap_samples) {
            if (sm) sample_free(s, sm);
            rq->remaining -= rq->n - i; /* the samples already queued still answer; the rest fail */
            if (!rq->remaining) free(rq);
            return mill_errf(e, "generate: out of memory for sample %d", i);
        }
        sm->req = rq;
        sm->index = i;
        sm->plen = plen;
        memcpy(sm->tokens, pp, sizeof(int32_t) * (size_t)plen);
        if ((i + 1) % n == 0) pp += plen;
        rng_seed(&sm->r, (uint64_t)seed + (uint64_t)i); /* sample i of a request = row i of mill generate */
        s->samples[s->n_samples++] = sm;
    }
    s->requests++;
    return 0;
}

/* Sends a finished sample: tokens, logprobs and routing (U8 when experts fit a byte) as frames. */
static void send_sample(server *s, sample *sm) {
    const dsv4_config *c = &s->m->cfg;
    int L = c->num_hidden_layers, K = c->num_experts_per_tok, len = sm->plen + sm->nout;
    int maxn = sm->req->sp.max_new_tokens;
    mill_dtype rdt = routing_dtype(c->n_routed_experts);
    void *rt = malloc((size_t)L * len * K * dtype_size(rdt));
    wire_builder *b = wire_builder_new("sample", sm->req->id);
    mill_err e;
    if (rt && b) {
        for (int l = 0; l < L; l++) /* rows were filled at stride prompt + max_new */
            routing_narrow(sm->routing + (long)l * (sm->plen + maxn) * K, (long)len * K, rdt,
                           (char *)rt + (size_t)l * len * K * dtype_size(rdt));
        int64_t sh1 = sm->nout, shr[3] = {L, len, K};
        wire_put_int(b, "index", sm->index);
        wire_put_int(b, "prompt_len", sm->plen);
        wire_put_str(b, "finish_reason", sm->finish == FINISH_STOP ? "stop" : "length");
        wire_put_int(b, "weight_version", sm->version_start);
        wire_put_int(b, "weight_version_end", s->version);
        if (!wire_put_frame(b, "tokens", DTYPE_I32, 1, &sh1, sm->tokens + sm->plen, &e) &&
            !wire_put_frame(b, "logprobs", DTYPE_F32, 1, &sh1, sm->logprobs, &e) &&
            !wire_put_frame(b, "routing", rdt, 3, shr, rt, &e))
            wire_send(s->sock, sm->req->peer, sm->req->peer_len, b, &e);
    }
    wire_builder_free(b);
    free(rt);
    s->tokens_out += sm->nout;
    if (--sm->req->remaining == 0) {
        wire_builder *d = wire_builder_new("done", sm->req->id);
        if (d) {
            wire_put_int(d, "n", sm->req->n);
            wire_send(s->sock, sm->req->peer, sm->req->peer_len, d, &e);
            wire_builder_free(d);
        }
        free(sm->req);
    }
}

/* rollout.exact: a finished sample's logprobs again, from the trainer's forward over its prompt and
 * tokens with its routing replayed (model_forward_backward_tokens without a loss: the trainer's
 * kernels and sums) on a copy of the kctx with exact (op_linear and the experts row-invariant; the decode
 * steps keep the fast kernels), so they are the trainer's logprobs of the same tokens to the bit. */
static int rescore(server *s, sample *sm, mill_err *e) {
    const dsv4_config *c = &s->m->cfg;
    int L = c->num_hidden_layers, K = c->num_experts_per_tok, len = sm->plen + sm->nout;
    int maxn = sm->req->sp.max_new_tokens;
    if (!sm->nout) return 0;
    if (!s->exact_mem_on) {
        if (arena_init_device(&s->exact_mem, 16 << 20, s->k->device, s->k->stream, e)) return -1;
        s->exact_mem_on = 1;
    }
    int32_t *tg = malloc(sizeof(int32_t) * (size_t)len), *rp = malloc(sizeof(int32_t) * (size_t)L * len * K);
    float *lp = malloc(sizeof(float) * (size_t)sm->nout);
    int rc = -1;
    if (!tg || !rp || !lp) {
        mill_errf(e, "server: exact logprobs: out of memory");
        goto out;
    }
    for (int t = 0; t < len; t++) tg[t] = t >= sm->plen - 1 && t < len - 1 ? sm->tokens[t + 1] : -1;
    for (int l = 0; l < L; l++) /* rows were filled at stride prompt + max_new */
        memcpy(rp + (long)l * len * K, sm->routing + (long)l * (sm->plen + maxn) * K,
               sizeof(int32_t) * (size_t)len * K);
    double t0 = mill_now();
    kctx kx = *s->k;
    kx.exact = 1;
    float temp = sample_greedy(sm->req->sp.temperature) ? 1.0f : sm->req->sp.temperature; /* greedy: T = 1 */
    double loss;
    long count = 0;
    if (model_forward_backward_tokens(s->run, &kx, sm->tokens, tg, 1, len, rp, temp, NULL, NULL, NULL, lp, &loss,
                                      &count, &s->exact_mem, e))
        goto out;
    if (count != sm->nout) {
        mill_errf(e, "server: exact logprobs: %ld positions scored for %d tokens", count, sm->nout);
        goto out;
    }
    memcpy(sm->logprobs, lp, sizeof(float) * (size_t)sm->nout);
    s->exact_samples++;
    s->exact_s += mill_now() - t0;
    rc = 0;
out:
    free(tg);
    free(rp);
    free(lp);
    return rc;
}

/* One engine step over the samples that have (or can get) a cache; finished samples are sent. */
static int step(server *s, mill_err *e) {
    const dsv4_config *c = &s->m->cfg;
    int L = c->num_hidden_layers, K = c->num_experts_per_tok;
    engine_seq **seqs = malloc(sizeof *seqs * (size_t)s->n_samples);
    const int32_t **toks = malloc(sizeof *toks * (size_t)s->n_samples);
    int *nt = malloc(sizeof(int) * (size_t)s->n_samples), *who = malloc(sizeof(int) * (size_t)s->n_samples);
    int n = 0, total = 0, rc = -1;
    sample_row *rows = NULL;
    float *lps = malloc(sizeof(float) * (size_t)s->n_samples);
    int32_t *routing = NULL, *picks = malloc(sizeof(int32_t) * (size_t)s->n_samples);
    if (!seqs || !toks || !nt || !who || !lps || !picks) {
        mill_errf(e, "server: out of memory");
        goto out;
    }
    for (int i = 0; i < s->n_samples && n < s->max_batch; i++) {
        sample *sm = s->samples[i];
        if (sm->state == 0) { /* admission: wait while the budget is full */
            mill_err ae;
            if (engine_seq_new(&s->en, sm->plen + sm->req->sp.max_new_tokens, &sm->seq, &ae)) continue;
            sm->state = 1;
            sm->version_start = s->version;
        }
        seqs[n] = sm->seq;
        int len = sm->plen + sm->nout, done = engine_seq_len(sm->seq);
        toks[n] = sm->tokens + done;
        nt[n] = len - done;
        who[n++] = i;
        total += len - done;
    }
    if (!n) {
        rc = 0;
        goto out;
    }
    rows = malloc(sizeof(sample_row) * (size_t)n);
    routing = malloc(sizeof(int32_t) * (size_t)L * total * K);
    if (!rows || !routing) {
        mill_errf(e, "server: out of memory");
        goto out;
    }
    for (int j = 0; j < n; j++) { /* a finished sample only routes its last token: greedy, no draw, ignored */
        sample *sm = s->samples[who[j]];
        int done = sm->state == 3 || sm->req->sp.max_new_tokens == 0;
        rows[j] = done ? (sample_row){.temperature = 0.0f, .top_p = 1.0f} : sample_draw(&sm->req->sp, &sm->r);
    }
    if (engine_step_sample(&s->en, seqs, toks, nt, n, rows, picks, lps, routing, e)) goto out;
    s->steps++;
    for (int j = 0, off = 0; j < n; off += nt[j], j++) {
        sample *sm = s->samples[who[j]];
        int maxn = sm->req->sp.max_new_tokens, p0 = engine_seq_len(sm->seq) - nt[j];
        for (int l = 0; l < L; l++)
            memcpy(sm->routing + ((long)l * (sm->plen + maxn) + p0) * K, routing + ((long)l * total + off) * K,
                   sizeof(int32_t) * (size_t)nt[j] * K);
        if (sm->state == 3 || maxn == 0) { /* its last token is routed: finished */
            if (maxn == 0) sm->finish = FINISH_LENGTH;
            sm->state = 4;
            continue;
        }
        int32_t tok = picks[j];
        sm->tokens[sm->plen + sm->nout] = tok;
        sm->logprobs[sm->nout++] = lps[j];
        sm->state = sample_finished(&sm->req->sp, tok, sm->nout, &sm->finish) ? 3 : 2;
    }
    int keep = 0; /* send and drop finished samples, keeping arrival order */
    for (int i = 0; i < s->n_samples; i++) {
        sample *sm = s->samples[i];
        if (sm->state == 4) {
            if (s->exact && rescore(s, sm, e)) goto out;
            send_sample(s, sm);
            sample_free(s, sm);
        } else {
            s->samples[keep++] = sm;
        }
    }
    s->n_samples = keep;
    rc = 0;
out:
    free(seqs);
    free(toks);
    free(nt);
    free(who);
    free(rows);
    free(lps);
    free(picks);
    free(routing);
    return rc;
}

/* Forgets the version being staged (its buckets are dropped). */
static void staged_drop(server *s) {
    free(s->staged);
    free(s->staged_set);
    free(s->staged_last);
    s->staged = NULL;
    s->staged_set = s->staged_last = NULL;
    s->staged_n_last = 0;
}

/* Forgets the version being gathered over CUDA IPC (the mappings stay cached). */
static void ipc_gather_drop(server *s) {
    free(s->ipc_got);
    s->ipc_got = NULL;
    s->ipc_n = 0;
}

/* Replies {version, bucket} with this type: bucket_ok, or weights_ok once the version is in. */
static int reply_version(server *s, const unsigned char *peer, size_t peer_len, const char *type, uint64_t id,
                         int64_t version, int64_t bucket, mill_err *e) {
    if (!s->sock) return 0; /* a follower rank: the leader answers */
    wire_builder *b = wire_builder_new(type, id);
    if (!b) return mill_errf(e, "%s: out of memory", type);
    wire_put_int(b, "version", version);
    wire_put_int(b, "bucket", bucket);
    wire_send(s->sock, peer, peer_len, b, e); /* a peer that left cannot be told; keep serving */
    wire_builder_free(b);
    return 0;
}

/* Checks a bucket's frames before any is staged (the caller drops the version a bad one belongs to). */
static int update_check_frames(const server *s, const wire_msg *msg, const char *who, mill_err *e) {
    for (int i = 0; i < wire_n_frames(msg); i++) {
        const wire_frame *f = wire_frame_at(msg, i);
        const param_info *p = model_find_param(&s->table, f->name);
        if (!p || p->kind == PARAM_INDEX)
            return mill_errf(e, "%s: \"%s\" is not a float parameter of this model", who, f->name);
        if (f->ndim != p->ndim || memcmp(f->shape, p->shape, sizeof(int64_t) * (size_t)p->ndim))
            return mill_errf(e, "%s: \"%s\" has the wrong shape", who, f->name);
        if (f->dtype != DTYPE_F32 && f->dtype != DTYPE_BF16)
            return mill_errf(e, "%s: \"%s\" must be F32 or BF16, got %s", who, f->name, dtype_name(f->dtype));
    }
    return 0;
}

/* The checks every message of a version from several senders passes, buckets or IPC alike: the
 * version being gathered (active: one is; cur_version, cur_senders) and the sender's number. Each
 * failure drops what was gathered (drop): its other senders' parts cannot make it whole. */
static int sender_check(server *s, const char *what, int64_t version, int64_t sender, int64_t senders, int active,
                        long cur_version, int cur_senders, void (*drop)(server *), mill_err *e) {
    if (active && version != cur_version) {
        drop(s);
        return mill_errf(e, "%s: version %lld (sender %lld) while version %ld is being gathered (dropped both)", what,
                         (long long)version, (long long)sender, cur_version);
    }
    if (sender < 0 || sender >= senders) {
        drop(s);
        return mill_errf(e, "%s: version %lld, sender %lld: sender must be in [0, %lld)%s", what, (long long)version,
                         (long long)sender, (long long)senders, active ? " (version dropped)" : "");
    }
    if (active && senders != cur_senders) {
        drop(s);
        return mill_errf(e, "%s: version %lld, sender %lld: senders = %lld, but earlier messages of this version said "
                            "%d (version dropped)",
                         what, (long long)version, (long long)sender, (long long)senders, cur_senders);
    }
    return 0;
}

/* A checked frame (a whole tensor) into the staged version: all of it, or on a rank of an engine of
 * several the part this rank holds (its tensor-parallel slice; nothing of another rank's experts). */
static int update_take(server *s, const wire_frame *f, mill_err *e) {
    const param_info *p = model_find_param(s->m, f->name);
    if (!p) return 0;
    if (p->split < 0) return dtype_convert_to_f32(f->dtype, f->data, s->staged + p->offset, p->numel, e);
    size_t n = model_whole_numel(p);
    float *whole = malloc(sizeof(float) * n);
    if (!whole) return mill_errf(e, "update_weights: out of memory for \"%s\"", f->name);
    int rc = dtype_convert_to_f32(f->dtype, f->data, whole, n, e);
    if (!rc) model_slice_copy(p, s->m->stage.tp, s->m->stage.tp_rank, s->staged + p->offset, whole, 0);
    free(whole);
    return rc;
}

static int handle_update(server *s, const wire_msg *msg, const unsigned char *peer, size_t peer_len, mill_err *e) {
    int64_t version, bucket, senders, sender;
    int last;
    /* sender: any integer here, so that one out of range is this version's error (below) */
    if (wire_get_int(msg, "version", 1, 0, 0, INT64_MAX, &version, e) ||
        wire_get_int(msg, "bucket", 1, 0, 0, 1 << 30, &bucket, e) || wire_get_bool(msg, "last", 1, 0, &last, e) ||
        wire_get_int(msg, "senders", 0, 1, 1, UPDATE_MAX_SENDERS, &senders, e) ||
        wire_get_int(msg, "sender", 0, 0, INT64_MIN, INT64_MAX, &sender, e))
        return -1;
    dsv4_model *m = s->m;
    if (s->ipc_got) { /* buckets are the fallback of a refused IPC update: they win */
        log_warn("update_weights: dropped version %ld, gathered over CUDA IPC from %d of %d senders, for buckets "
                 "of version %lld", s->ipc_version, s->ipc_n, s->ipc_senders, (long long)version);
        ipc_gather_drop(s);
    }
    if (sender_check(s, "update_weights", version, sender, senders, s->staged != NULL, s->staged_version,
                     s->staged_senders, staged_drop, e))
        return -1;
    if (s->staged && s->staged_last[sender]) {
        staged_drop(s);
        return mill_errf(e, "update_weights: version %lld, sender %lld: %s (version dropped)", (long long)version,
                         (long long)sender, last ? "a second last bucket" : "a bucket after this sender's last one");
    }
    char who[96] = "update_weights";
    if (senders > 1)
        snprintf(who, sizeof who, "update_weights: version %lld, sender %lld", (long long)version, (long long)sender);
    if (update_check_frames(s, msg, who, e)) { /* the version cannot come whole: the next one is taken */
        if (!s->staged) return -1;
        char why[sizeof e->msg];
        snprintf(why, sizeof why, "%s", e->msg);
        staged_drop(s);
        return mill_errf(e, "%s (version dropped)", why);
    }
    /* tensors not sent keep the values the engine runs: after an IPC update only the device has
     * them. Not while the device copy is given back or came back empty: the staging base is then
     * stale, and the version must bring every float parameter (checked when it is complete). */
    if (!s->staged && s->host_stale && !weights_dropped(s) && !s->weights_missing) {
        if (op_copy_to_host(s->k, m->data, s->run->data, sizeof(float) * m->n_floats, e)) return -1;
        s->host_stale = 0;
    }
    if (!s->staged) {
        s->staged = malloc(sizeof(float) * m->n_floats);
        s->staged_set = calloc((size_t)s->table.n_params, 1);
        s->staged_last = calloc((size_t)senders, 1);
        if (!s->staged || !s->staged_set || !s->staged_last) {
            staged_drop(s);
            return mill_errf(e, "update_weights: out of memory for staging");
        }
        memcpy(s->staged, m->data, sizeof(float) * m->n_floats); /* tensors not sent keep their values */
        s->staged_version = version;
        s->staged_senders = (int)senders;
    }
    for (int i = 0; i < wire_n_frames(msg); i++) {
        const wire_frame *f = wire_frame_at(msg, i);
        const param_info *p = model_find_param(&s->table, f->name);
        /* one sender may overwrite its own tensor (as ever); of several, each tensor has one owner */
        if (senders > 1 && s->staged_set[p - s->table.params]) {
            staged_drop(s);
            return mill_errf(e, "%s: \"%s\" was already sent in this version (version dropped)", who, f->name);
        }
        s->staged_set[p - s->table.params] = 1;
        if (update_take(s, f, e)) return -1;
    }
    if (last) {
        s->staged_last[sender] = 1;
        s->staged_n_last++;
    }
    if (s->staged_n_last < s->staged_senders)
        return reply_version(s, peer, peer_len, "bucket_ok", wire_id(msg), version, bucket, e);
    /* every sender's last bucket came: swap between engine steps, so no token sees a mix of versions */
    for (int i = 0; s->host_stale && i < s->table.n_params; i++) /* a stale base: all must have come */
        if (s->table.params[i].kind != PARAM_INDEX && !s->staged_set[i]) {
            staged_drop(s);
            return mill_errf(e, "update_weights: version %lld did not send \"%s\"; the last version came over "
                                "CUDA IPC and the device copy was given back since, so a bucketed update must "
                                "send every float parameter (version dropped)",
                             (long long)version, s->table.params[i].name);
        }
    /* the device copy first: if it fails, the host copy still holds the running version. Given
     * back (released), the host copy alone takes it, and resume copies it over. */
    if (s->run != m && !weights_dropped(s) &&
        op_copy_from_host(s->k, s->run->data, s->staged, sizeof(float) * m->n_floats, e)) {
        staged_drop(s);
        return mill_err_wrap(e, "update_weights: version %lld", (long long)version);
    }
    memcpy(m->data, s->staged, sizeof(float) * m->n_floats);
    s->version = version;
    s->host_stale = s->weights_missing = 0; /* the host holds the whole version now */
    staged_drop(s);
    return reply_version(s, peer, peer_len, "weights_ok", wire_id(msg), version, bucket, e);
}

/* Closes sender i's mapping unless another sender's slot maps the same buffer. */
static void ipc_unmap(server *s, int i) {
    void *p = s->ipc_maps[i].src;
    s->ipc_maps[i].src = NULL;
    for (int j = 0; p && j < s->ipc_n_maps; j++)
        if (s->ipc_maps[j].src == p) return;
    mem_ipc_close(s->k->device, p);
}

/* Sender's buffer mapped here: the cached mapping while its handle repeats, another sender's when it
 * already maps that handle (CUDA opens a handle once per process), else opened now. */
static const void *ipc_map_get(server *s, int sender, const unsigned char *h, mill_err *e) {
    if (sender >= s->ipc_n_maps) {
        ipc_map *nm = realloc(s->ipc_maps, sizeof *nm * (size_t)(sender + 1));
        if (!nm) return mill_errf(e, "update_weights_ipc: out of memory"), NULL;
        memset(nm + s->ipc_n_maps, 0, sizeof *nm * (size_t)(sender + 1 - s->ipc_n_maps));
        s->ipc_maps = nm;
        s->ipc_n_maps = sender + 1;
    }
    ipc_map *mp = &s->ipc_maps[sender];
    if (mp->src && !memcmp(mp->handle, h, MEM_IPC_HANDLE_BYTES)) return mp->src;
    void *src = NULL;
    for (int j = 0; !src && j < s->ipc_n_maps; j++)
        if (s->ipc_maps[j].src && !memcmp(s->ipc_maps[j].handle, h, MEM_IPC_HANDLE_BYTES)) src = s->ipc_maps[j].src;
    ipc_unmap(s, sender); /* never one a gathered range reads: its sender has not arrived yet */
    if (!src && !(src = mem_ipc_open(s->k->device, h, e))) return NULL;
    memcpy(mp->handle, h, MEM_IPC_HANDLE_BYTES);
    mp->src = src;
    return src;
}

static int ipc_range_cmp(const void *a, const void *b) {
    int64_t x = ((const ipc_range *)a)->offset, y = ((const ipc_range *)b)->offset;
    return (x > y) - (x < y);
}

/* Every sender of the gathered version has arrived: their ranges must tile the flat layout exactly;
 * then each is copied device to device (between engine steps, like a bucket swap), and waited for
 * before the reply, since a sender's next step overwrites its buffer. */
static int ipc_complete(server *s, mill_err *e) {
    ipc_range *r = s->ipc_got;
    int n = s->ipc_senders;
    int64_t end = 0, nf = (int64_t)s->m->n_floats;
    qsort(r, (size_t)n, sizeof *r, ipc_range_cmp);
    for (int i = 0; i < n; end = r[i].offset + r[i].floats, i++) {
        if (r[i].offset < end)
            return mill_errf(e, "update_weights_ipc: version %ld: sender %d's floats [%lld, %lld) overlap sender %d's "
                                "[%lld, %lld) (version dropped)",
                             s->ipc_version, r[i].sender, (long long)r[i].offset,
                             (long long)(r[i].offset + r[i].floats), r[i - 1].sender, (long long)r[i - 1].offset,
                             (long long)end);
        if (r[i].offset > end)
            return mill_errf(e, "update_weights_ipc: version %ld: no sender sent floats [%lld, %lld) (version dropped)",
                             s->ipc_version, (long long)end, (long long)r[i].offset);
    }
    if (end < nf)
        return mill_errf(e, "update_weights_ipc: version %ld: no sender sent floats [%lld, %lld) (version dropped)",
                         s->ipc_version, (long long)end, (long long)nf);
    for (int i = 0; i < n; i++)
        if (op_copy(s->k, (float *)s->run->data + r[i].offset, r[i].src, sizeof(float) * (size_t)r[i].floats, e))
            return mill_err_wrap(e, "update_weights_ipc: version %ld, sender %d", s->ipc_version, r[i].sender);
    return kctx_sync(s->k, e);
}

/* update_weights_ipc: a version copied from the trainer's device buffers on this GPU, one range of
 * the flat layout per sender. */
static int handle_update_ipc(server *s, const wire_msg *msg, const unsigned char *peer, size_t peer_len, mill_err *e) {
    int64_t version, floats, offset, src_offset, senders, sender;
    if (wire_get_int(msg, "version", 1, 0, 0, INT64_MAX, &version, e) ||
        wire_get_int(msg, "floats", 1, 0, 0, INT64_MAX, &floats, e) ||
        wire_get_int(msg, "offset", 0, 0, 0, INT64_MAX, &offset, e) ||
        wire_get_int(msg, "src_offset", 0, 0, 0, INT64_MAX / 4, &src_offset, e) ||
        wire_get_int(msg, "senders", 0, 1, 1, UPDATE_MAX_SENDERS, &senders, e) ||
        wire_get_int(msg, "sender", 0, 0, INT64_MIN, INT64_MAX, &sender, e))
        return -1;
    const wire_frame *h = wire_frame_named(msg, "handle");
    if (!h || h->dtype != DTYPE_U8 || h->nbytes != MEM_IPC_HANDLE_BYTES)
        return mill_errf(e, "update_weights_ipc: needs a frame \"handle\" of %d U8 bytes", MEM_IPC_HANDLE_BYTES);
    if (s->k->device != DEVICE_CUDA)
        return mill_errf(e, "update_weights_ipc: this engine runs on the CPU; send update_weights buckets");
    if (s->released) /* the device buffer to copy into is given back */
        return mill_errf(e, "update_weights_ipc: the engine's memory (its device weights too) is released; send "
                            "resume first");
    if (s->staged)
        return mill_errf(e, "update_weights_ipc: version %ld is being staged in buckets", s->staged_version);
    int64_t nf = (int64_t)s->m->n_floats;
    if (sender_check(s, "update_weights_ipc", version, sender, senders, s->ipc_got != NULL, s->ipc_version,
                     s->ipc_senders, ipc_gather_drop, e))
        return -1;
    if (s->ipc_got && s->ipc_got[sender].floats) {
        ipc_gather_drop(s);
        return mill_errf(e, "update_weights_ipc: version %lld, sender %lld: this sender already sent its range "
                            "(version dropped)",
                         (long long)version, (long long)sender);
    }
    if (senders == 1 && (offset || floats != nf))
        return mill_errf(e, "update_weights_ipc: %lld floats offered at offset %lld, this model has %zu (a single "
                            "sender sends them all)",
                         (long long)floats, (long long)offset, s->m->n_floats);
    if (floats < 1 || offset % 16 || offset > nf || floats > nf - offset) {
        const char *dropped = s->ipc_got ? " (version dropped)" : "";
        ipc_gather_drop(s);
        return mill_errf(e, "update_weights_ipc: version %lld, sender %lld: floats [%lld, %lld) must be a non-empty "
                            "range of the model's %lld, starting at a multiple of 16%s",
                         (long long)version, (long long)sender, (long long)offset, (long long)(offset + floats),
                         (long long)nf, dropped);
    }
    if (!s->ipc_got) {
        if (!(s->ipc_got = calloc((size_t)senders, sizeof *s->ipc_got)))
            return mill_errf(e, "update_weights_ipc: out of memory");
        s->ipc_senders = (int)senders;
        s->ipc_version = version;
    }
    const void *src = ipc_map_get(s, (int)sender, h->data, e);
    if (!src) {
        ipc_gather_drop(s);
        return mill_err_wrap(e, "update_weights_ipc: version %lld, sender %lld (version dropped)", (long long)version,
                             (long long)sender);
    }
    /* the range starts src_offset floats into the sender's buffer (a whole flat layout: its offset) */
    s->ipc_got[sender] = (ipc_range){offset, floats, (int)sender, (const float *)src + src_offset};
    /* an earlier sender's range is only remembered: its buffer must hold until the version is in */
    if (++s->ipc_n < s->ipc_senders)
        return reply_version(s, peer, peer_len, "bucket_ok", wire_id(msg), version, sender, e);
    int rc = ipc_complete(s, e);
    ipc_gather_drop(s);
    if (rc) return -1;
    s->version = version;
    s->host_stale = 1;
    s->weights_missing = 0; /* every float was copied */
    return reply_version(s, peer, peer_len, "weights_ok", wire_id(msg), version, sender, e);
}

static void handle_stats(server *s, const unsigned char *peer, size_t peer_len, uint64_t id) {
    wire_builder *b = wire_builder_new("stats", id);
    mill_err e;
    if (!b) return;
    int active = 0;
    for (int i = 0; i < s->n_samples; i++) active += s->samples[i]->state != 0;
    wire_put_int(b, "active", active);
    wire_put_int(b, "queued", s->n_samples - active);
    wire_put_int(b, "cache_used", (int64_t)s->en.used);
    wire_put_int(b, "cache_budget", (int64_t)s->en.budget);
    wire_put_int(b, "steps", s->steps);
    wire_put_int(b, "tokens_generated", s->tokens_out);
    wire_put_int(b, "requests", s->requests);
    wire_put_int(b, "weight_version", s->version);
    wire_put_int(b, "exact_samples", s->exact_samples);
    wire_put_num(b, "exact_s", s->exact_s);
    wire_send(s->sock, peer, peer_len, b, &e);
    wire_builder_free(b);
}

/* release_memory's part beyond the engine's: the device copy of the weights goes too. */
static void weights_release(server *s) {
    if (!s->dev || weights_dropped(s)) return;
    model_device_drop(s->dev);
    log_info("release_memory: gave back the device weights, %.1f MiB (fp32 and their bf16 shadow)", weights_mib(s));
}

/* resume's: the device copy comes back from the host copy when that is current (the engine runs what
 * it ran before); after an IPC update only the trainer has the version, so it comes back empty. */
static int weights_resume(server *s, mill_err *e) {
    if (!weights_dropped(s)) return 0;
    if (model_device_restore(s->dev, s->k, s->host_stale ? NULL : s->m->data, e)) return mill_err_wrap(e, "resume");
    s->weights_missing = s->host_stale;
    log_info("resume: took %.1f MiB back for the device weights (%s)", weights_mib(s),
             s->weights_missing ? "empty: the last version came over CUDA IPC, waiting for the next update"
                                : "copied from the host copy");
    return 0;
}

/* An engine of several ranks: the leader hands a received message to the followers (its parts packed
 * as {count, lengths, bytes}), which decode and handle it as the leader does (without replying). */
static int relay(server *s, const wire_raw *raw, mill_err *e) {
    const void *parts[WIRE_MAX_FRAMES + 1];
    size_t lens[WIRE_MAX_FRAMES + 1], total = 0;
    int n = wire_raw_parts(raw, 1, parts, lens, WIRE_MAX_FRAMES + 1);
    for (int i = 0; i < n; i++) total += lens[i];
    int64_t *b = malloc(sizeof(int64_t) * (size_t)(n + 1) + total);
    if (!b) return mill_errf(e, "server: out of memory to relay a message");
    b[0] = n;
    char *p = (char *)(b + n + 1);
    for (int i = 0; i < n; p += lens[i], i++) b[1 + i] = (int64_t)lens[i], memcpy(p, parts[i], lens[i]);
    int rc = group_cast(s->g, GROUP_RELAY, b, sizeof(int64_t) * (size_t)(n + 1) + total, e);
    free(b);
    return rc;
}

static int grouped(const server *s) { return s->g && s->g->size > 1; }

static void handle(server *s, const wire_msg *msg, const wire_raw *raw, const unsigned char *peer, size_t peer_len) {
    mill_err e = {{0}};
    const char *t = wire_type(msg);
    uint64_t id = wire_id(msg);
    int rc = 0;
    if (!strcmp(t, "health")) reply_simple(s, peer, peer_len, "health_ok", id);
    else if (!strcmp(t, "stats")) handle_stats(s, peer, peer_len, id);
    else if (!strcmp(t, "generate")) rc = handle_generate(s, msg, peer, peer_len, &e);
    else if (!strcmp(t, "update_weights")) { /* every rank stages its part of each bucket alike */
        if (grouped(s) && relay(s, raw, &e)) comm_abort(s->g->d.par.world_c, e.msg);
        rc = handle_update(s, msg, peer, peer_len, &e);
    } else if (!strcmp(t, "update_weights_ipc") && grouped(s))
        rc = mill_errf(&e, "update_weights_ipc: an engine of %d ranks takes weights in update_weights buckets",
                       s->g->size);
    else if (!strcmp(t, "update_weights_ipc")) rc = handle_update_ipc(s, msg, peer, peer_len, &e);
    else if (!strcmp(t, "release_memory")) {
        if (s->n_samples) rc = mill_errf(&e, "release_memory: %d samples are in flight", s->n_samples);
        else if (!(rc = engine_release(&s->en, &e))) {
            weights_release(s);
            if (s->exact_mem_on) arena_free(&s->exact_mem); /* made again at the next rescore */
            s->exact_mem_on = 0;
            s->released = 1;
            reply_simple(s, peer, peer_len, "released", id);
        }
    } else if (!strcmp(t, "resume")) {
        if (!(rc = weights_resume(s, &e)) && !(rc = engine_resume(&s->en, &e))) {
            s->released = 0;
            reply_simple(s, peer, peer_len, "resumed", id);
        }
    } else if (!strcmp(t, "shutdown")) {
        s->stop = 1;
        reply_simple(s, peer, peer_len, "bye", id);
    } else {
        rc = mill_errf(&e, "unknown message type \"%s\" (see rollout/PROTOCOL.md)", t);
    }
    if (rc) reply_error(s, peer, peer_len, id, e.msg);
}

/* A follower rank of an engine of several: the leader's steps, memory turns and relayed updates,
 * until GROUP_STOP. A command that fails here ends the job (the ranks would no longer agree). */
static int follow(server *s, mill_err *e) {
    for (int op = 0; op != GROUP_STOP;) {
        void *cmd;
        size_t n;
        TRY(group_take(s->g, &op, &cmd, &n, e));
        int rc = 0;
        if (op == GROUP_STEP) rc = engine_follow(&s->en, cmd, n, e);
        else if (op == GROUP_RELEASE) {
            if (!(rc = engine_follow_memory(&s->en, op, cmd, n, e))) weights_release(s), s->released = 1;
        } else if (op == GROUP_RESUME) {
            if (!(rc = weights_resume(s, e) || engine_follow_memory(&s->en, op, cmd, n, e))) s->released = 0;
        } else if (op == GROUP_RELAY) { /* {count, lengths, bytes}: a message the leader received */
            const int64_t *h = cmd;
            const void *parts[WIRE_MAX_FRAMES + 1];
            size_t lens[WIRE_MAX_FRAMES + 1];
            const char *p = (const char *)(h + h[0] + 1);
            for (int i = 0; i < h[0] && i <= WIRE_MAX_FRAMES; p += h[1 + i], i++) parts[i] = p, lens[i] = (size_t)h[1 + i];
            wire_msg *msg = NULL;
            if (!(rc = wire_decode(&msg, parts[0], lens[0], parts + 1, lens + 1, (int)h[0] - 1, e))) {
                mill_err me = {{0}}; /* a bad update fails alike on every rank: the leader answers it */
                if (handle_update(s, msg, NULL, 0, &me)) log_info("rank %d: %s", s->g->rank, me.msg);
            }
            wire_msg_free(msg);
        } else if (op != GROUP_STOP) {
            rc = mill_errf(e, "server rank %d: command %d from the leader", s->g->rank, op);
        }
        free(cmd);
        if (rc) {
            comm_abort(s->g->d.par.world_c, e->msg);
            return -1;
        }
    }
    return 0;
}

int rollout_server_run(dsv4_model *m, const server_config *sc, mill_err *e) {
    server s = {0};
    s.m = m;
    s.g = sc->group;
    s.max_batch = sc->max_batch > 0 ? sc->max_batch : 64;
    s.queue_budget = sc->queue_budget ? sc->queue_budget : (size_t)16 << 30;
    dsv4_model dm = {0};
    s.run = m;
    void *ctx = NULL;
    wire_zap *zap = NULL;
    int rc = -1, linger = 0, lead = !grouped(&s) || s.g->rank == 0;
    if (!sc->k && kctx_init(&s.kown, sc->device, e)) return -1;
    s.k = sc->k ? sc->k : &s.kown;
    s.exact = sc->exact;
    if (s.exact && grouped(&s)) {
        mill_errf(e, "rollout-server: --exact on needs an engine of one rank (this one has %d)", s.g->size);
        goto out;
    }
    if (model_layout(&s.table, &m->cfg, e)) goto out; /* the whole model's names and shapes */
    if (s.k->device != DEVICE_CPU) {
        if (model_to_device(&dm, m, s.k, e)) goto out;
        s.run = s.dev = &dm;
    }
    if (s.g) group_model_io(s.g, (dsv4_model *)s.run);
    if (engine_init_group(&s.en, s.run, s.k, sc->cache_budget, s.g, e)) goto out;
    if (!lead) {
        rc = follow(&s, e);
        goto out;
    }
    if (!(ctx = zmq_ctx_new())) {
        mill_errf(e, "server: cannot create a ZeroMQ context: %s", zmq_strerror(zmq_errno()));
        goto out;
    }
    s.sock = zmq_socket(ctx, ZMQ_ROUTER);
    /* a reply waits (up to a second) for a client still reading rather than being dropped at a full
     * queue; one to a client that has gone is dropped at once (mandatory routing says so) */
    int mandatory = 1, send_ms = 1000;
    if (!s.sock || zmq_setsockopt(s.sock, ZMQ_LINGER, &linger, sizeof linger) ||
        zmq_setsockopt(s.sock, ZMQ_ROUTER_MANDATORY, &mandatory, sizeof mandatory) ||
        zmq_setsockopt(s.sock, ZMQ_SNDTIMEO, &send_ms, sizeof send_ms)) {
        mill_errf(e, "server: cannot make a socket: %s", zmq_strerror(zmq_errno()));
        goto out;
    }
    if (wire_curve_server(s.sock, sc->curve, e) || wire_zap_start(ctx, sc->curve, &zap, e)) goto out;
    if (zmq_bind(s.sock, sc->bind)) {
        mill_errf(e, "server: cannot bind %s: %s", sc->bind, zmq_strerror(zmq_errno()));
        goto out;
    }
    log_info("rollout server on %s (cache budget %zu bytes%s; %d rank(s))", sc->bind, sc->cache_budget,
             sc->curve && sc->curve->on ? ", CURVE" : "", s.g ? s.g->size : 1);
    while (!s.stop) {
        /* drain what has arrived (wait only when there is nothing to generate) */
        for (int first = 1;; first = 0) {
            unsigned char peer[256];
            size_t peer_len = 0;
            wire_msg *msg = NULL;
            wire_raw *raw = NULL;
            mill_err re = {{0}};
            int r = wire_recv(s.sock, 1, first && !s.n_samples ? 100 : 0, peer, &peer_len, &msg, &raw, &re);
            if (r == 1) break;
            if (r < 0) {
                if (peer_len) reply_error(&s, peer, peer_len, wire_raw_id(raw, 1), re.msg); /* its id, if readable */
                wire_recv_free(raw);
                continue;
            }
            handle(&s, msg, raw, peer, peer_len);
            wire_msg_free(msg);
            wire_recv_free(raw);
            if (s.stop) break;
        }
        if (!s.stop && s.n_samples && step(&s, e)) goto out;
    }
    rc = group_cast(s.g, GROUP_STOP, NULL, 0, e);
out:
    for (int i = 0; i < s.n_samples; i++) {
        request *rq = s.samples[i]->req;
        if (--rq->remaining == 0) free(rq);
        sample_free(&s, s.samples[i]);
    }
    free(s.samples);
    staged_drop(&s);
    if (s.sock) zmq_close(s.sock);
    wire_zap_stop(zap);
    if (ctx) zmq_ctx_term(ctx);
    engine_free(&s.en);
    ipc_gather_drop(&s);
    for (int i = 0; i < s.ipc_n_maps; i++) ipc_unmap(&s, i);
    free(s.ipc_maps);
    model_free(&dm);
    model_free(&s.table);
    if (s.exact_mem_on) arena_free(&s.exact_mem);
    if (s.k == &s.kown) kctx_free(&s.kown);
    return rc;
}
