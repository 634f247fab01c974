/* trainer/export.h — a model in HF transformers' own layout (`mill export`).
 * Owns: the map from the parameter table's release names to DeepseekV4ForCausalLM.state_dict()'s
 * names (model.layers.N.self_attn.q_a_proj.weight, lm_head.weight, ...; a layer's routed experts
 * fused into mlp.experts.gate_up_proj [E, 2I, D] (w1 rows, then w3 rows, per expert) and
 * mlp.experts.down_proj [E, D, I]), the config.json DeepseekV4Config.save_pretrained writes
 * (layer_types, mlp_layer_types, compress_rates, partial_rotary_factor, rope_parameters {main,
 * compress}, ... instead of compress_ratios, num_hash_layers, qk_rope_head_dim, rope_scaling), and
 * the writing of such a directory: atomically (a temporary directory beside it, renamed into place
 * last; an error leaves nothing at the destination).
 * Input: a model directory or a training checkpoint (trainer/checkpoint.h: a model directory plus
 * optimizer shards and state.json); read one layer at a time (model_load_stage), so memory holds one
 * layer and one output shard, never the whole model.
 * Like HF's own save: mtp.* is dropped (HF ignores it on load), tid2eid is I64, and in bf16 the
 * modules HF keeps in fp32 (_keep_in_fp32_modules_strict: norms, hyper-connections, sinks, position
 * biases, the router bias) stay F32. */
#ifndef MILL_EXPORT_H
#define MILL_EXPORT_H

#include <stddef.h>

#include "../common/err.h"
#include "../common/tensor.h"

#define EXPORT_DEFAULT_SHARD_BYTES 5000000000ull /* HF's "5GB" (decimal, like HF's parser) */

typedef struct {
    mill_dtype dtype;        /* DTYPE_BF16 or DTYPE_F32 for the floating tensors */
    size_t max_shard_bytes;  /* a file holds at most this, unless one tensor alone is larger */
    int force;               /* replace an existing non-empty destination */
} export_opts;

typedef struct {
    int tensors, files, dropped; /* dropped: mtp.* tensors left out */
    size_t bytes;                /* the tensors' bytes (the index's total_size) */
    int checkpoint;              /* the source was a training checkpoint (state.json) */
    int copied;                  /* tokenizer / generation files copied from the source */
} export_report;

/* src (a model directory or training checkpoint) into out in HF's layout; report (may be NULL). */
int export_hf(const char *src, const char *out, const export_opts *o, export_report *report, mill_err *e);

/* "5GB", "500MB", "2GiB", "123" (bytes) into *bytes (> 0); HF's units: KB/MB/GB/TB are powers of
 * 1000, KiB/MiB/GiB/TiB of 1024. */
int export_parse_size(const char *s, size_t *bytes, mill_err *e);

#endif
