/* trainer/model.h — the DeepSeek-V4 model: parameter layout, loading, forward.
 * Owns: dsv4_model. All float parameters (and the float buffers such as the
 * router bias) live in ONE flat fp32 buffer, in a fixed order given by a
 * parameter table built from the config, keyed by the original release names
 * (layers.N.attn.wq_a.weight, ...). A layer's experts are stored contiguously
 * per weight (all w1, then all w2, then all w3), so expert, layer and tensor
 * slices for EP/PP/TP are offset ranges of the table. tid2eid tables are int32.
 * The same definition serves the trainer and the rollout engine. A model lives on
 * one device (model_to_device makes a CUDA copy: flat buffer, tid2eid and RoPE
 * tables in device memory, the parameter table and layer structs on the host); a
 * device copy can give its flat buffer back and take it again (model_device_drop /
 * _restore: a colocated engine's turn while the trainer works). */
#ifndef MILL_MODEL_H
#define MILL_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "../common/config.h"
#include "../common/tensor.h"
#include "../kernels/backend.h"

typedef enum {
    PARAM_WEIGHT = 0, /* trainable */
    PARAM_BUFFER,     /* float, never trained (router bias) */
    PARAM_INDEX       /* int32 table (tid2eid) */
} param_kind;

typedef struct {
    char name[96];
    int ndim;
    int64_t shape[3];
    size_t offset; /* in floats (or int32s for PARAM_INDEX) */
    size_t numel;
    param_kind kind;
    int layer; /* -1 for embed/head/norm/hc_head */
    int split; /* tensor parallelism: the dimension this rank holds a slice of (shape is the slice), -1: whole */
    int64_t whole; /* split >= 0: the whole tensor's extent along split */
    int vocab;     /* split over the vocabulary (the embedding and head: model_vocab_split) */
    size_t goffset; /* where the whole tensor starts in the whole model's float layout */
} param_info;

/* Slice r of tp of an extent n: [n * r / tp, n * (r + 1) / tp). Heads, groups and hidden units
 * divide evenly. */
void model_split_range(int64_t n, int tp, int r, int64_t *lo, int64_t *hi);
/* The vocabulary's slice r of tp (embedding and head rows, logit columns): its boundaries are V r / tp
 * rounded down to a multiple of 16 (the last is V; the plain split when V < 16 tp), so a slice's
 * logits lie on a BLAS kernel's column grid where the whole GEMM's do and have their bits (an
 * unaligned slice's last columns would take the kernel's edge path). Slices are stored in the
 * widest one's rows (model_vocab_rows), the padding after the narrower ones zero (never read, never
 * trained). */
void model_vocab_split(int64_t V, int tp, int r, int64_t *lo, int64_t *hi);
int64_t model_vocab_rows(int64_t V, int tp);
/* The split dimension's range [lo, hi) that slice r of tp of tensor p holds (the vocabulary's rule for
 * the embedding and head, model_split_range's for the rest). */
void model_param_split(const param_info *p, int tp, int r, int64_t *lo, int64_t *hi);
/* The whole tensor's shape and element count of p (p itself when not split). */
void model_whole_shape(const param_info *p, int64_t shape[3]);
size_t model_whole_numel(const param_info *p);
/* Slice r of tp of tensor p (p: the slice's entry, split >= 0): copied from the whole tensor at whole
 * into dst (its padding zeroed), or (to_whole) from dst into its place in whole. */
void model_slice_copy(const param_info *p, int tp, int r, float *dst, const float *whole, int to_whole);

typedef struct {
    int ratio, is_hash;
    float *attn_norm, *ffn_norm;
    float *hc_attn_fn, *hc_attn_base, *hc_attn_scale;
    float *hc_ffn_fn, *hc_ffn_base, *hc_ffn_scale;
    float *wq_a, *q_norm, *wq_b, *wkv, *kv_norm, *wo_a, *wo_b, *attn_sink;
    float *c_wkv, *c_wgate, *c_ape, *c_norm;                   /* compressor (ratio > 0) */
    float *i_wq_b, *i_wproj, *i_wkv, *i_wgate, *i_ape, *i_norm; /* indexer (ratio 4) */
    float *gate, *gate_bias;                                   /* gate_bias: routed layers */
    int32_t *tid2eid;                                          /* hash layers: [vocab, k] */
    float *w1, *w2, *w3;                                       /* [E, I, D], [E, D, I], [E, I, D] */
    float *sw1, *sw2, *sw3;                                    /* shared expert, NULL if none */
} dsv4_layer;

/* Tensors the model parses and keeps but does not run yet (mtp.*). */
typedef struct {
    char *name;
    tensor t; /* fp32 copy */
} model_extra;

struct dsv4_model;
/* Called by the backward as soon as the gradients of layer l of m (model_layer_range: l = the
 * layer count for the head group, -1 for the embedding) are final for this call (the head group
 * first, then each layer from the last, the embedding last): a data-parallel trainer starts their
 * reduction there, while the backward goes on. */
typedef struct {
    int (*fn)(void *ctx, const struct dsv4_model *m, int l, mill_err *e);
    void *ctx;
} model_grad_hook;

/* The layers a model holds, in chunks: chunk c is layers [l0[c], l1[c]) (ascending, disjoint),
 * and the ends: first (the embedding and the stream expansion, before chunk 0) and last (hc_head,
 * the final norm, the head; mtp.*; after the last chunk). A pipeline stage holds one range, an
 * interleaved pipeline rank one per virtual stage; one process holds them all (model_stage_all).
 * The forward and backward run one chunk (model_stage_chunk). */
#define MODEL_MAX_CHUNKS 16
typedef struct {
    int n_chunks, first, last;
    int l0[MODEL_MAX_CHUNKS], l1[MODEL_MAX_CHUNKS];
    int x0, x1; /* the routed experts held, [x0, x1) of every layer (expert parallelism); x1 0: all */
    int tp, tp_rank; /* tensor parallelism (tp > 1): slice tp_rank of the attention heads (wq_b,
                      * attn_sink), output groups (wo_a rows, wo_b columns), the shared experts'
                      * hidden units (sw1, sw3 rows, sw2 columns) and the vocabulary (embedding and
                      * head rows: model_vocab_range) */
    int cp, cp_rank; /* context parallelism (cp > 1): positions [T r / cp, T (r+1) / cp) of every row are
                      * this rank's (its queries and per-token work); the attention's key side (the
                      * window's KV rows, the compressor's and the indexer's projections) is gathered
                      * whole from the cp ranks and its gradients summed back */
    int tp_exact;    /* with tp > 1, the rollout engine's layout: the row-parallel products (wo_b, the shared
                      * experts) stay whole, and their inputs are gathered over tp instead of their
                      * outputs summed, so every output has the single-process bits (model_attn_output);
                      * the caller runs the MoE on its slice of the tokens (model_split_range) */
    int sp;          /* sequence parallelism (with tp > 1): the streams between the sublayers and the
                      * per-token ops (hyper-connections, norms, the router, the routed experts) hold
                      * tokens [N r / tp, N (r+1) / tp) of each micro-batch; the attention, the shared
                      * experts and the head see every token (gathered before, reduce-scattered after) */
} model_stage;

/* The attention heads and output groups this model computes (its tensor-parallel slice's). */
int model_heads(const struct dsv4_model *m);
int model_groups(const struct dsv4_model *m);
/* The vocabulary rows [*v0, *v1) of m's embedding and head (tensor parallelism: its slice). */
void model_vocab_range(const struct dsv4_model *m, int *v0, int *v1);

/* The routed experts st holds: [*x0, *x1) of cfg's. */
void model_stage_experts(const model_stage *st, const dsv4_config *cfg, int *x0, int *x1);

/* Whether st holds layer l. */
int model_stage_holds(const model_stage *st, int l);
/* Chunk c of st as a holding of its own (the embedding with chunk 0, the head with the last). */
model_stage model_stage_chunk(const model_stage *st, int c);

/* A run of a model's trainable floats that is one run of the whole model's layout too: floats
 * [local, local + n) here are [global, global + n) there. */
typedef struct {
    size_t local, global, n;
} model_run;

/* How a pipeline stage's boundary tensors travel (set by the trainer that runs the stage): the
 * hyper-connection streams [B*T, hc_mult, hidden] (4-D: [micro_batch, seq, hc_mult, hidden]) come
 * from the previous stage and go to the next one in the forward (grad 0), and their gradients come
 * back from the next stage and go to the previous one in the backward (grad 1). Buffers are in the
 * model's device memory. fn NULL on a model that holds every layer. */
typedef struct {
    int (*recv)(void *ctx, float *buf, size_t n, int grad, mill_err *e);
    int (*send)(void *ctx, const float *buf, size_t n, int grad, mill_err *e);
    void *ctx;
} model_stage_io;

/* How a model whose routed experts are spread over ranks (expert parallelism, stage.x0/x1) reaches
 * the others: size ranks of which this is rank, experts in equal blocks (rank q holds q * E / size
 * ...); a2a is an all-to-all with per-peer counts and displacements in elements (host 1: host
 * memory, else the model's device memory). size 1 (or 0): every expert is here, no calls. */
typedef struct {
    int size, rank;
    int (*a2a)(void *ctx, const void *send, const size_t *scounts, const size_t *sdispls, void *recv,
               const size_t *rcounts, const size_t *rdispls, mill_dtype dt, int host, mill_err *e);
    void *ctx;
} model_ep_io;

/* How a tensor-parallel slice (stage.tp > 1) completes its partial sums: all_reduce sums n floats
 * of the model's device memory over the tp ranks, in place; all_gather fills buf [tp x n] of the
 * device memory (n elements of dt) with every rank's piece, its own at rank x n on entry; gather
 * puts every rank's n host floats (mine) into all [tp x n] in rank order (to save or publish whole
 * tensors). */
typedef struct {
    int (*all_reduce)(void *ctx, float *buf, size_t n, mill_err *e);
    int (*all_gather)(void *ctx, void *buf, size_t n, mill_dtype dt, mill_err *e);
    /* sequence parallelism, on buf [rows, width] of the device memory, rank r's rows those of
     * model_split_range(rows, tp, r): gather_rows fills every rank's rows from their owner;
     * scatter_rows sums the ranks' partial buffers into each rank's own rows (the others: garbage) */
    int (*gather_rows)(void *ctx, void *buf, long rows, size_t width, mill_dtype dt, mill_err *e);
    int (*scatter_rows)(void *ctx, float *buf, long rows, size_t width, mill_err *e);
    int (*gather)(void *ctx, const float *mine, float *all, size_t n, mill_err *e);
    void *ctx;
} model_tp_io;

/* How a context-parallel rank (stage.cp > 1) reaches the others holding the same rows: gather fills
 * buf (the model's device memory, n elements of dt) with every cp rank's piece (counts, displs in
 * elements, rank order), its own in place on entry; all_reduce sums n floats in place. */
typedef struct {
    int (*gather)(void *ctx, void *buf, const size_t *counts, const size_t *displs, mill_dtype dt, mill_err *e);
    int (*all_reduce)(void *ctx, float *buf, size_t n, mill_err *e);
    void *ctx;
} model_cp_io;

typedef struct dsv4_model {
    dsv4_config cfg;
    model_stage stage;
    model_stage_io io;
    model_ep_io ep;
    model_tp_io tp;
    model_cp_io cp;
    param_info *params;
    int n_params;
    float *data; /* the flat parameter buffer: each tensor at a multiple of 16 floats, the gaps zero */
    size_t n_floats, n_trainable;
    /* Its trainable weights as runs of the whole model's layout, in order (buffers, after them,
     * are in none): {0, 0, the end of the head} for the whole model; more for a pipeline chunk
     * or a subset of the experts. */
    model_run *runs;
    int n_runs;
    int32_t *index_data;
    size_t n_index;
    float *embed, *head, *norm, *hc_head_fn, *hc_head_base, *hc_head_scale;
    dsv4_layer *layers;
    float *inv_freq_main, *inv_freq_compress; /* [qk_rope_head_dim / 2] each */
    model_extra *extra;
    int n_extra;
    mill_device device; /* where data, index_data and the inv_freq tables live */
    const kctx *shadow_k; /* a device model: the kctx holding the bf16 shadow of data (model_to_device) */
    uintptr_t dropped_base; /* after model_device_drop: where data was (the float pointers still point into
                             * that range; restore moves them); 0 when data is there */
    model_grad_hook grad_ready; /* fn NULL: none (set by the trainer that owns the model, per call) */
} dsv4_model;

/* Builds the parameter table for cfg only (no buffers: works for any size, e.g. to count). */
int model_layout(dsv4_model *m, const dsv4_config *cfg, mill_err *e);
/* The table plus zeroed buffers. */
int model_init(dsv4_model *m, const dsv4_config *cfg, mill_err *e);
/* config.json + safetensors (single file or sharded) from a directory. */
int model_load(dsv4_model *m, const char *dir, mill_err *e);
/* The same for one pipeline stage: only its tensors are in the table, the flat buffer and memory
 * (in the canonical order, offsets of its own); the layer structs of other stages stay NULL. A
 * checkpoint's tensors of other stages are skipped (stage NULL: the whole model). */
model_stage model_stage_all(const dsv4_config *cfg);
int model_layout_stage(dsv4_model *m, const dsv4_config *cfg, model_stage st, mill_err *e);
int model_init_stage(dsv4_model *m, const dsv4_config *cfg, model_stage st, mill_err *e);
int model_load_stage(dsv4_model *m, const char *dir, const model_stage *stage, mill_err *e);
void model_free(dsv4_model *m); /* either device */
/* dst = a copy of src (a CPU model) on k's device: the fp32 master weights, buffers, tid2eid and
 * the RoPE tables are copied into device memory and every layer pointer re-pointed into them; the
 * parameter table stays on the host. mtp.* extras are not copied (nothing runs them). On a CPU
 * kctx dst is a plain host copy. On CUDA the weights also get a bf16 shadow in k for the GEMMs
 * (kctx_shadow_add): write them only through the ops that keep it current. Free dst with
 * model_free, before kctx_free(k). */
int model_to_device(dsv4_model *dst, const dsv4_model *src, const kctx *k, mill_err *e);
/* A device model (model_to_device) gives back its flat parameter buffer and that buffer's bf16
 * shadow: data becomes NULL, and until model_device_restore nothing may read the float parameters
 * (tid2eid and the RoPE tables stay: they are small). A no-op on a CPU model or a dropped one. */
void model_device_drop(dsv4_model *m);
/* Takes the buffer again on k's device (the model's), filled from host_src (HOST memory of n_floats,
 * e.g. the CPU model the copy was made from) or zeroed (NULL); every float pointer is re-pointed
 * into it and the bf16 shadow is added again in k. A no-op (0) when m is not dropped. On failure m
 * stays dropped. */
int model_device_restore(dsv4_model *m, const kctx *k, const float *host_src, mill_err *e);
/* config.json + model.safetensors (original names; tid2eid as I64; mtp.* kept) into dir. */
int model_save(const dsv4_model *m, const char *dir, mill_err *e);
/* Shard `shard` of n_shards of pipeline stage `stage` of n_stages of that directory (1 and 1: what
 * model_save writes), as the writers (ranks) make it together: the stage's tensors whose first float
 * lies in model_shard_range(shard) go to model-FFFFF-of-NNNNN.safetensors, numbered after the
 * earlier stages' (stage * n_shards + shard + 1 of n_stages * n_shards; tid2eid and mtp.* with shard
 * 0); shard 0 of stage 0 writes config.json; the index (model.safetensors.index.json, HF's sharded
 * layout, which model_load reads) comes from shard 0 of a single stage, or from each stage's part
 * (a file of its own) merged by model_merge_index once every stage has written. With experts over
 * ranks (m->ep of size P), each stage has P x n_shards files: ep rank q's shard s is file q x
 * n_shards + s of the stage (ep rank 0's hold the other tensors too), and ep rank 0's shard 0 writes
 * the stage's index with every rank's experts. A device model (k: its kctx; NULL for a CPU one) is
 * copied to the host one shard at a time. */
int model_save_stage_shard(const dsv4_model *m, const kctx *k, const char *dir, int shard, int n_shards, int stage,
                           int n_stages, mill_err *e);
int model_merge_index(const char *dir, int n_stages, mill_err *e);
/* The tensors the two host models share, by name, from src into dst: one's table is a part of the
 * other's (a stage's of the whole model's, either way round). tid2eid tables only where both have
 * them. */
int model_copy_matching(dsv4_model *dst, const dsv4_model *src, mill_err *e);
/* Tensor p of m whole: every tp rank's slice (mine: this rank's, host memory) gathered through
 * m->tp into whole [p->numel x tp] (all: scratch of that size). Collective over the tp ranks. */
int model_gather_slices(const dsv4_model *m, const param_info *p, const float *mine, float *all, float *whole,
                        mill_err *e);
/* dst takes src's mtp.* extras (host tensors, which model_to_device does not copy): a device model
 * that saves checkpoints keeps them once its host image is freed. */
void model_move_extras(dsv4_model *dst, dsv4_model *src);
/* Shard r of k of the flat float layout: contiguous, in order, on 16-float boundaries (every tensor
 * starts on one), sizes within 16 floats of each other. The data-parallel optimizer's shards. */
void model_shard_range(const dsv4_model *m, int r, int k, size_t *lo, size_t *hi);
/* The shard (of k) that owns a whole tensor, to save or publish it: the one whose range holds its
 * first float; tid2eid tables go with shard 0. With experts over ranks (m->ep), k shards the ranks
 * that hold the same experts, and a tensor that is not a routed expert's belongs to ep rank 0's
 * ranks only: -1 on the others. */
int model_param_shard(const dsv4_model *m, const param_info *p, int k);
/* Random initialisation as HF's _init_weights does it (normal(0, std) matrices, ones for norms and
 * HC scales, zeros for HC bases, sinks, position biases and the router bias), except tid2eid: HF
 * leaves it zero for a checkpoint to fill; here each token gets k distinct random experts. */
void model_init_random(dsv4_model *m, uint64_t seed, float std);
const param_info *model_find_param(const dsv4_model *m, const char *name);
/* Whether the LM loss reaches a parameter: trainable weights outside the indexer
 * (its top-k selection is not differentiable). */
int model_param_has_grad(const param_info *p);
/* The floats [lo, hi) of the trainable weights of layer l (l = -1: those outside every layer
 * before the first, i.e. the embedding; l = layers: those after the last, the final norm, HC head
 * and LM head); lo == hi when there are none. */
void model_layer_range(const dsv4_model *m, int l, size_t *lo, size_t *hi);
/* Floats [lo, hi) of layer l's routed experts held here (lo == hi: none): inside its layer range,
 * reduced over the expert-data-parallel group where the rest of the layer is reduced over dp. */
void model_expert_range(const dsv4_model *m, int l, size_t *lo, size_t *hi);

/* Memory, for the three entry points below: m, the arena and k share one device. ids, targets and
 * replay are HOST arrays (copied to the device once per call with the positions); logits,
 * routing and grads are in the device's memory (device pointers on CUDA), like every op argument;
 * loss, count, logp_out and the loss_fn arrays are host memory.
 *
 * Forward over B rows of T tokens (positions 0..T-1).
 * logits: [B*T, v1 - v0] out, the columns of m's vocabulary slice [v0, v1) (model_vocab_range: all of
 * it without tensor parallelism). routing (optional): [layers, B*T, k] expert ids used. Under context
 * parallelism ids (targets, replay) are whole rows, and logits and routing hold the rank's
 * positions of each row (T there: the slice's length).
 * Activations come from the arena, which is reset first. */
int model_forward(const dsv4_model *m, const kctx *k, const int32_t *ids, int B, int T, float *logits,
                  int32_t *routing, arena *a, mill_err *e);

/* Sublayer pieces shared by the trainer's forward and the rollout engine (one model definition).
 * Attention projections of layer l for N tokens at positions pos: qr (q_norm'ed low-rank query,
 * the indexer's input too), q [N, H, d] (per-head normed, rotated), kv [N, d] (normed, rotated);
 * the _raw buffers keep the pre-norm values for the backward. */
int model_attn_project(const dsv4_model *m, const kctx *k, int l, const float *x, const int32_t *pos, int N,
                       float *qr_raw, float *qr, float *q_raw, float *q, float *kv_raw, float *kv, mill_err *e);
/* From attention outputs o [N, H, d]: inverse RoPE (o_rot), grouped wo_a (z), wo_b -> y [N, D].
 * Under tensor parallelism y is the slice's partial product (summed over tp by the caller), except
 * with stage.tp_exact: then z [N, o_groups * o_lora_rank] receives every slice's groups, gathered
 * over tp through zg (scratch of z's size; NULL otherwise), and y is whole. */
int model_attn_output(const dsv4_model *m, const kctx *k, int l, const float *o, const int32_t *pos, int N,
                      float *o_rot, float *z, float *zg, float *y, mill_err *e);
/* MoE sublayer of layer l on x [N, D] (ffn-normed) -> y [N, D]; tokens [N] feed the hash layers'
 * tid2eid; replay [N, k] forces the experts (both in k's memory, like every argument here). logits, scores [N, E], ids, wts [N, k] are outputs. */
int model_moe(const dsv4_model *m, const kctx *k, int l, const float *x, const int32_t *tokens, int N,
              const int32_t *replay, float *y, float *logits, float *scores, int32_t *ids, float *wts, arena *a,
              mill_err *e);

typedef struct {
    double loss; /* mean cross-entropy over the counted positions */
    long count;  /* positions with a target >= 0 */
} model_loss;

/* The training math of one micro-batch: forward keeping activations, mean next-token
 * cross-entropy over targets [B*T] (< 0: ignored), hand-written backward.
 * grads: [n_floats] in the parameter layout, ACCUMULATED (zero it per step); buffers
 * (router bias) and the indexer get none. replay [layers, B*T, k]: the experts to use
 * (routing replay) or NULL to route. */
int model_forward_backward(const dsv4_model *m, const kctx *k, const int32_t *ids, const int32_t *targets, int B,
                           int T, const int32_t *replay, float *grads, model_loss *out, arena *a, mill_err *e);

/* A loss over per-token log-probabilities and entropies: given logp [n] and the entropy of each
 * position's distribution ent [n] (the counted positions in order), fill dlogp [n] = d loss / d logp
 * and *loss; dent [n] (zeroed by the caller) takes d loss / d entropy when the loss uses it. */
typedef int (*model_token_loss_fn)(void *ctx, const float *logp, const float *ent, int n, float *dlogp, float *dent,
                                   double *loss, mill_err *e);

/* The general training step: forward (routing replay optional), logp = log_softmax(logits / T) at
 * each target >= 0, then loss_fn and the backward into grads (accumulated). loss_fn NULL: forward
 * only (recompute logprobs). logp_out [count] (optional) gets logp; *count the positions. */
int model_forward_backward_tokens(const dsv4_model *m, const kctx *k, const int32_t *ids, const int32_t *targets, int B,
                                  int T, const int32_t *replay, float temperature, float *grads,
                                  model_token_loss_fn loss_fn, void *ctx, float *logp_out, double *loss, long *count,
                                  arena *a, mill_err *e);

/* The same step in two halves, for pipeline schedules that run other micro-batches in between: the
 * forward (on the last stage also the loss and its gradient; on other stages the streams go on to
 * the next one) keeps its trace in a, which must stay untouched until model_pass_backward (the
 * gradient from the next stage, then the backward into grads); model_pass_free releases it
 * either way. Without loss_fn there is no backward. */
typedef struct model_pass model_pass;
int model_pass_forward(model_pass **out, const dsv4_model *m, const kctx *k, const int32_t *ids, const int32_t *targets,
                       int B, int T, const int32_t *replay, float temperature, model_token_loss_fn loss_fn, void *ctx,
                       float *logp_out, double *loss, long *count, arena *a, mill_err *e);
int model_pass_backward(model_pass *p, float *grads, mill_err *e);
void model_pass_free(model_pass *p);

#endif
