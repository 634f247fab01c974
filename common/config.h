/* common/config.h — the DeepSeek-V4 model config, read from an HF config.json
 * written with the original release keys.
 * Owns: dsv4_config and its loader. Unknown keys are ignored; a missing
 * required key or a key of the wrong type is an error naming file and key. */
#ifndef MILL_CONFIG_H
#define MILL_CONFIG_H

#include "err.h"

#define DSV4_MAX_LAYERS 256

typedef enum { ATTN_SLIDING = 0, ATTN_CSA = 4, ATTN_HCA = 128 } dsv4_attn_kind;
typedef enum { SCORE_SQRTSOFTPLUS = 0, SCORE_SIGMOID, SCORE_SOFTMAX } dsv4_score_func;

typedef struct {
    int type_yarn; /* 0: plain RoPE on compressed layers too */
    double factor, beta_fast, beta_slow;
    int original_max_position_embeddings;
} dsv4_rope_scaling;

typedef struct {
    int vocab_size, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads;
    int head_dim, qk_rope_head_dim, q_lora_rank, o_groups, o_lora_rank;
    int n_routed_experts, n_shared_experts, num_experts_per_tok, moe_intermediate_size;
    dsv4_score_func scoring_func;
    int norm_topk_prob;
    double routed_scaling_factor;
    int num_hash_layers;
    double swiglu_limit;
    int hc_mult, hc_sinkhorn_iters;
    double hc_eps;
    int sliding_window;
    int compress_ratios[DSV4_MAX_LAYERS]; /* first num_hidden_layers entries: 0, 4 or 128 */
    int index_n_heads, index_head_dim, index_topk;
    double rope_theta, compress_rope_theta;
    dsv4_rope_scaling rope_scaling;
    long long max_position_embeddings;
    double rms_norm_eps;
    int num_nextn_predict_layers;
    int tie_word_embeddings;
    int bos_token_id, eos_token_id;
} dsv4_config;

/* path: config.json or the model directory holding it. */
int config_load(const char *path, dsv4_config *c, mill_err *e);
/* Parses JSON text; `source` names it in errors. */
int config_parse(const char *json_text, const char *source, dsv4_config *c, mill_err *e);
/* Checks the relations between fields (divisibility, ranges). */
int config_validate(const dsv4_config *c, const char *source, mill_err *e);
const char *config_attn_kind_name(int ratio);
/* Writes cfg as config.json with the original release keys (path.tmp, fsync, rename). */
int config_save(const dsv4_config *c, const char *path, mill_err *e);

#endif
