/* tests/test_config.c — config.json loading: the two tiny goldens' configs,
 * optional keys and their defaults, HF spelling variants, and bad configs
 * (each must fail with -1 and a message naming the source and the key). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "common/config.h"

#define TINY_A MILL_TEST_DATA "/tiny-a/config.json"
#define TINY_B MILL_TEST_DATA "/tiny-b/config.json"
#define SRC "variant-config.json" /* the source name given to config_parse for edited configs */

/* ------------------------------------------------------------- helpers */

/* tiny-a's config.json as a JSON object, to be edited by a test. */
static json_t *base_json(void) {
    json_error_t je;
    json_t *o = json_load_file(TINY_A, 0, &je);
    if (!o) fail_msg("%s: %s (line %d)", TINY_A, je.text, je.line);
    assert_true(json_is_object(o));
    return o;
}

/* Dumps o, parses it with config_parse(SRC), and releases o. */
static int parse_json(json_t *o, dsv4_config *c, mill_err *e) {
    char *text = json_dumps(o, 0);
    json_decref(o);
    assert_non_null(text);
    memset(e, 0, sizeof *e);
    int rc = config_parse(text, SRC, c, e);
    free(text);
    return rc;
}

static void parse_ok(json_t *o, dsv4_config *c) {
    mill_err e;
    int rc = parse_json(o, c, &e);
    if (rc != 0) fail_msg("config_parse failed: %s", e.msg);
}

static void assert_msg_has(const mill_err *e, const char *needle) {
    if (!strstr(e->msg, needle)) fail_msg("error message \"%s\" does not contain \"%s\"", e->msg, needle);
}

/* Parsing o must fail with -1 and a one-line message naming SRC and every needle. */
static void parse_fails(json_t *o, const char *needle, const char *needle2) {
    dsv4_config c;
    mill_err e;
    int rc = parse_json(o, &c, &e);
    if (rc != -1) fail_msg("config_parse returned %d, expected -1 (needle \"%s\")", rc, needle);
    assert_msg_has(&e, SRC);
    assert_msg_has(&e, needle);
    if (needle2) assert_msg_has(&e, needle2);
    assert_null(strchr(e.msg, '\n'));
}

static void text_fails(const char *text, const char *needle) {
    dsv4_config c;
    mill_err e;
    memset(&e, 0, sizeof e);
    int rc = config_parse(text, SRC, &c, &e);
    if (rc != -1) fail_msg("config_parse returned %d for \"%s\", expected -1", rc, text);
    assert_msg_has(&e, SRC);
    if (needle) assert_msg_has(&e, needle);
}

static void set_int(json_t *o, const char *k, long long v) { assert_int_equal(json_object_set_new(o, k, json_integer(v)), 0); }

/* --------------------------------------------------------- valid configs */

static void test_load_tiny_a(void **state) {
    (void)state;
    dsv4_config c;
    mill_err e = {{0}};
    if (config_load(TINY_A, &c, &e)) fail_msg("%s", e.msg);
    assert_int_equal(c.vocab_size, 256);
    assert_int_equal(c.hidden_size, 64);
    assert_int_equal(c.num_hidden_layers, 4);
    assert_int_equal(c.num_attention_heads, 4);
    assert_int_equal(c.num_key_value_heads, 1);
    assert_int_equal(c.head_dim, 32);
    assert_int_equal(c.qk_rope_head_dim, 16);
    assert_int_equal(c.q_lora_rank, 32);
    assert_int_equal(c.o_groups, 2);
    assert_int_equal(c.o_lora_rank, 16);
    assert_int_equal(c.n_routed_experts, 8);
    assert_int_equal(c.n_shared_experts, 1);
    assert_int_equal(c.num_experts_per_tok, 2);
    assert_int_equal(c.moe_intermediate_size, 32);
    /* compress_ratios has 5 entries (the last one for the MTP layer); only 4 are layers */
    assert_int_equal(c.compress_ratios[0], 0);
    assert_int_equal(c.compress_ratios[1], 4);
    assert_int_equal(c.compress_ratios[2], 128);
    assert_int_equal(c.compress_ratios[3], 4);
    assert_int_equal(c.compress_ratios[4], 0);
    assert_int_equal(c.num_hash_layers, 2);
    assert_int_equal(c.index_n_heads, 16);
    assert_int_equal(c.index_head_dim, 32);
    assert_int_equal(c.index_topk, 8);
    assert_int_equal(c.hc_mult, 4);
    assert_int_equal(c.hc_sinkhorn_iters, 20);
    assert_true(c.hc_eps == 1e-6);
    assert_int_equal(c.sliding_window, 16);
    assert_true(c.swiglu_limit == 1.5);
    assert_true(c.routed_scaling_factor == 1.5);
    assert_int_equal(c.scoring_func, SCORE_SQRTSOFTPLUS);
    assert_int_equal(c.norm_topk_prob, 1);
    assert_true(c.rope_theta == 10000.0);
    assert_true(c.compress_rope_theta == 160000.0);
    assert_int_equal(c.rope_scaling.type_yarn, 1);
    assert_true(c.rope_scaling.factor == 4.0);
    assert_int_equal(c.rope_scaling.original_max_position_embeddings, 64);
    assert_true(c.rope_scaling.beta_fast == 32.0);
    assert_true(c.rope_scaling.beta_slow == 1.0);
    assert_int_equal(c.max_position_embeddings, 256);
    assert_true(c.rms_norm_eps == 1e-6);
    assert_int_equal(c.num_nextn_predict_layers, 1);
    assert_int_equal(c.tie_word_embeddings, 0);
    assert_int_equal(c.bos_token_id, 0);
    assert_int_equal(c.eos_token_id, 1);
}

static void test_load_tiny_b(void **state) {
    (void)state;
    dsv4_config c;
    mill_err e = {{0}};
    if (config_load(TINY_B, &c, &e)) fail_msg("%s", e.msg);
    assert_int_equal(c.vocab_size, 320);
    assert_int_equal(c.hidden_size, 96);
    assert_int_equal(c.num_hidden_layers, 3);
    assert_int_equal(c.num_attention_heads, 8);
    assert_int_equal(c.head_dim, 48);
    assert_int_equal(c.qk_rope_head_dim, 8);
    assert_int_equal(c.q_lora_rank, 40);
    assert_int_equal(c.o_groups, 4);
    assert_int_equal(c.o_lora_rank, 12);
    assert_int_equal(c.n_routed_experts, 16);
    assert_int_equal(c.num_experts_per_tok, 4);
    assert_int_equal(c.moe_intermediate_size, 24);
    /* the list is [128, 0, 4, 4]: the 4th entry is the MTP layer's and must not be stored */
    assert_int_equal(c.compress_ratios[0], 128);
    assert_int_equal(c.compress_ratios[1], 0);
    assert_int_equal(c.compress_ratios[2], 4);
    assert_int_equal(c.compress_ratios[3], 0);
    assert_int_equal(c.num_hash_layers, 1);
    assert_int_equal(c.index_n_heads, 12);
    assert_int_equal(c.index_head_dim, 24);
    assert_int_equal(c.index_topk, 48);
    assert_int_equal(c.hc_mult, 3);
    assert_int_equal(c.hc_sinkhorn_iters, 7);
    assert_true(c.hc_eps == 1e-5);
    assert_int_equal(c.sliding_window, 40);
    assert_true(c.swiglu_limit == 10.0);
    assert_true(c.routed_scaling_factor == 2.5);
    assert_int_equal(c.scoring_func, SCORE_SQRTSOFTPLUS);
    assert_true(c.rope_theta == 5000.0);
    assert_true(c.compress_rope_theta == 40000.0);
    assert_int_equal(c.rope_scaling.type_yarn, 1);
    assert_true(c.rope_scaling.factor == 8.0);
    assert_int_equal(c.rope_scaling.original_max_position_embeddings, 32);
    assert_true(c.rope_scaling.beta_fast == 16.0);
    assert_true(c.rope_scaling.beta_slow == 2.0);
    assert_int_equal(c.max_position_embeddings, 1024);
    assert_true(c.rms_norm_eps == 1e-5);
    assert_int_equal(c.eos_token_id, 1);
    assert_int_equal(c.bos_token_id, 0);
}

static void test_load_directory(void **state) {
    (void)state;
    dsv4_config a, b;
    mill_err e = {{0}};
    if (config_load(TINY_B, &a, &e)) fail_msg("%s", e.msg);
    if (config_load(MILL_TEST_DATA "/tiny-b", &b, &e)) fail_msg("%s", e.msg);
    assert_int_equal(b.hidden_size, 96);
    assert_int_equal(b.num_hidden_layers, 3);
    assert_memory_equal(&a, &b, sizeof a);
    /* with a trailing slash too */
    if (config_load(MILL_TEST_DATA "/tiny-b/", &b, &e)) fail_msg("%s", e.msg);
    assert_memory_equal(&a, &b, sizeof a);
}

static void test_unknown_key_ignored(void **state) {
    (void)state;
    dsv4_config ref, c;
    parse_ok(base_json(), &ref);
    json_t *o = base_json();
    json_object_set_new(o, "some_future_key", json_pack("{s:[i,i], s:s}", "x", 1, 2, "y", "z"));
    json_object_set_new(o, "quantization_config", json_pack("{s:s}", "quant_method", "fp8"));
    json_object_set_new(o, "transformers_version", json_string("5.17.0"));
    parse_ok(o, &c);
    assert_memory_equal(&ref, &c, sizeof c);
}

static void test_defaults(void **state) {
    (void)state;
    static const char *optional[] = {"num_key_value_heads", "n_shared_experts", "num_hash_layers", "hc_mult",
                                     "hc_sinkhorn_iters", "sliding_window", "num_nextn_predict_layers",
                                     "max_position_embeddings", "scoring_func", "norm_topk_prob",
                                     "tie_word_embeddings", "routed_scaling_factor", "swiglu_limit", "hc_eps",
                                     "rope_theta", "compress_rope_theta", "rms_norm_eps", "rope_scaling",
                                     "bos_token_id", "eos_token_id", NULL};
    json_t *o = base_json();
    for (const char **k = optional; *k; k++) assert_int_equal(json_object_del(o, *k), 0);
    dsv4_config c;
    parse_ok(o, &c);
    assert_int_equal(c.hidden_size, 64); /* required keys still read */
    assert_int_equal(c.num_key_value_heads, 1);
    assert_int_equal(c.n_shared_experts, 1);
    assert_int_equal(c.num_hash_layers, 0);
    assert_int_equal(c.hc_mult, 4);
    assert_int_equal(c.hc_sinkhorn_iters, 20);
    assert_int_equal(c.sliding_window, 128);
    assert_int_equal(c.num_nextn_predict_layers, 0);
    assert_int_equal(c.max_position_embeddings, 1048576);
    assert_int_equal(c.scoring_func, SCORE_SQRTSOFTPLUS);
    assert_int_equal(c.norm_topk_prob, 1);
    assert_int_equal(c.tie_word_embeddings, 0);
    assert_true(c.routed_scaling_factor == 1.5);
    assert_true(c.swiglu_limit == 10.0);
    assert_true(c.hc_eps == 1e-6);
    assert_true(c.rope_theta == 10000.0);
    assert_true(c.compress_rope_theta == 160000.0);
    assert_true(c.rms_norm_eps == 1e-6);
    assert_int_equal(c.rope_scaling.type_yarn, 0);
    assert_int_equal(c.bos_token_id, 0);
    assert_int_equal(c.eos_token_id, 1);

    /* null counts as absent */
    o = base_json();
    json_object_set_new(o, "hc_sinkhorn_iters", json_null());
    json_object_set_new(o, "sliding_window", json_null());
    parse_ok(o, &c);
    assert_int_equal(c.hc_sinkhorn_iters, 20);
    assert_int_equal(c.sliding_window, 128);
}

static void test_other_scoring_funcs(void **state) {
    (void)state;
    dsv4_config c;
    json_t *o = base_json();
    json_object_set_new(o, "scoring_func", json_string("sigmoid"));
    parse_ok(o, &c);
    assert_int_equal(c.scoring_func, SCORE_SIGMOID);
    o = base_json();
    json_object_set_new(o, "scoring_func", json_string("softmax"));
    parse_ok(o, &c);
    assert_int_equal(c.scoring_func, SCORE_SOFTMAX);
}

static void test_rope_type_spelling(void **state) {
    (void)state;
    dsv4_config c;
    json_t *o = base_json();
    json_object_set_new(o, "rope_scaling", json_pack("{s:s, s:f, s:i, s:i, s:i}", "rope_type", "yarn", "factor", 16.0,
                                                     "original_max_position_embeddings", 128, "beta_fast", 24,
                                                     "beta_slow", 3));
    parse_ok(o, &c);
    assert_int_equal(c.rope_scaling.type_yarn, 1);
    assert_true(c.rope_scaling.factor == 16.0);
    assert_int_equal(c.rope_scaling.original_max_position_embeddings, 128);
    assert_true(c.rope_scaling.beta_fast == 24.0);
    assert_true(c.rope_scaling.beta_slow == 3.0);

    /* "default" means plain RoPE */
    o = base_json();
    json_object_set_new(o, "rope_scaling", json_pack("{s:s}", "rope_type", "default"));
    parse_ok(o, &c);
    assert_int_equal(c.rope_scaling.type_yarn, 0);
}

static void test_eos_list(void **state) {
    (void)state;
    dsv4_config c;
    json_t *o = base_json();
    json_object_set_new(o, "eos_token_id", json_pack("[i,i]", 7, 1));
    parse_ok(o, &c);
    assert_int_equal(c.eos_token_id, 7);
    o = base_json();
    json_object_set_new(o, "eos_token_id", json_pack("[i]", 255));
    parse_ok(o, &c);
    assert_int_equal(c.eos_token_id, 255);
    o = base_json();
    json_object_set_new(o, "eos_token_id", json_null());
    parse_ok(o, &c);
    assert_int_equal(c.eos_token_id, -1);
}

/* ---------------------------------------------------------- bad configs */

static void test_malformed_json(void **state) {
    (void)state;
    text_fails("{\"vocab_size\": 256, \"hidden_size\": ", "JSON");
    text_fails("", "JSON");
    text_fails("{\"vocab_size\": 256,}", "JSON");
}

static void test_top_level_array(void **state) {
    (void)state;
    text_fails("[{\"vocab_size\": 256}]", "object");
    text_fails("42", NULL);
}

static void test_missing_required(void **state) {
    (void)state;
    static const char *required[] = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                     "head_dim", "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank",
                                     "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                                     "index_n_heads", "index_head_dim", "index_topk", "compress_ratios", NULL};
    for (const char **k = required; *k; k++) {
        json_t *o = base_json();
        assert_int_equal(json_object_del(o, *k), 0);
        char quoted[64];
        snprintf(quoted, sizeof quoted, "\"%s\"", *k);
        parse_fails(o, quoted, "missing");
    }
}

static void test_wrong_types(void **state) {
    (void)state;
    json_t *o = base_json();
    json_object_set_new(o, "hidden_size", json_string("64"));
    parse_fails(o, "hidden_size", NULL);

    o = base_json();
    json_object_set_new(o, "hidden_size", json_real(64.0));
    parse_fails(o, "hidden_size", NULL);

    o = base_json();
    set_int(o, "norm_topk_prob", 1);
    parse_fails(o, "norm_topk_prob", NULL);

    o = base_json();
    json_object_set_new(o, "compress_ratios", json_pack("{s:i}", "0", 0));
    parse_fails(o, "compress_ratios", NULL);

    o = base_json();
    json_object_set_new(o, "swiglu_limit", json_string("1.5"));
    parse_fails(o, "swiglu_limit", NULL);

    o = base_json();
    json_object_set_new(o, "scoring_func", json_integer(0));
    parse_fails(o, "scoring_func", NULL);

    o = base_json();
    json_object_set_new(o, "rope_scaling", json_string("yarn"));
    parse_fails(o, "rope_scaling", NULL);

    o = base_json();
    json_object_set_new(o, "eos_token_id", json_string("</s>"));
    parse_fails(o, "eos_token_id", NULL);
}

static void test_compress_ratios_short(void **state) {
    (void)state;
    json_t *o = base_json();
    json_object_set_new(o, "compress_ratios", json_pack("[i,i,i]", 0, 4, 128)); /* 4 layers */
    parse_fails(o, "compress_ratios", NULL);
    o = base_json();
    json_object_set_new(o, "compress_ratios", json_array());
    parse_fails(o, "compress_ratios", NULL);
}

static void test_compress_ratio_7(void **state) {
    (void)state;
    json_t *o = base_json();
    json_object_set_new(o, "compress_ratios", json_pack("[i,i,i,i,i]", 0, 7, 128, 4, 0));
    parse_fails(o, "compress_ratios[1]", NULL);
    /* a non-integer entry as well */
    o = base_json();
    json_object_set_new(o, "compress_ratios", json_pack("[i,i,s,i]", 0, 4, "128", 4));
    parse_fails(o, "compress_ratios[2]", NULL);
}

static void test_kv_heads_2(void **state) {
    (void)state;
    json_t *o = base_json();
    set_int(o, "num_key_value_heads", 2);
    parse_fails(o, "num_key_value_heads", NULL);
}

static void test_rope_head_dim(void **state) {
    (void)state;
    json_t *o = base_json();
    set_int(o, "qk_rope_head_dim", 15); /* odd */
    parse_fails(o, "qk_rope_head_dim", NULL);
    o = base_json();
    set_int(o, "qk_rope_head_dim", 34); /* > head_dim (32) */
    parse_fails(o, "qk_rope_head_dim", "head_dim");
}

static void test_o_groups(void **state) {
    (void)state;
    json_t *o = base_json();
    set_int(o, "o_groups", 3); /* heads*head_dim = 128 */
    parse_fails(o, "o_groups", NULL);
}

static void test_experts_per_tok(void **state) {
    (void)state;
    json_t *o = base_json();
    set_int(o, "num_experts_per_tok", 9); /* 8 routed experts */
    parse_fails(o, "num_experts_per_tok", "n_routed_experts");
}

static void test_rope_linear(void **state) {
    (void)state;
    json_t *o = base_json();
    json_object_set_new(o, "rope_scaling", json_pack("{s:s, s:f}", "type", "linear", "factor", 2.0));
    parse_fails(o, "rope_scaling", "linear");
    o = base_json();
    json_object_set_new(o, "rope_scaling", json_pack("{s:s, s:f}", "rope_type", "linear", "factor", 2.0));
    parse_fails(o, "rope_scaling", "linear");
}

static void test_scoring_relu(void **state) {
    (void)state;
    json_t *o = base_json();
    json_object_set_new(o, "scoring_func", json_string("relu"));
    parse_fails(o, "scoring_func", "relu");
}

/* The numbers a forward divides by or takes the log of, and the special token ids, refused out of
 * range at parse time, each naming its key. */
static void test_value_ranges(void **state) {
    (void)state;
    const char *keys[] = {"rope_theta", "compress_rope_theta", "rms_norm_eps", "swiglu_limit", "routed_scaling_factor"};
    for (int i = 0; i < 5; i++) {
        json_t *o = base_json();
        json_object_set_new(o, keys[i], json_real(i % 2 ? 0.0 : -1.0));
        parse_fails(o, keys[i], "positive");
    }
    json_t *o = base_json();
    json_object_set_new(o, "hc_eps", json_real(-1e-6));
    parse_fails(o, "hc_eps", "not negative");
    o = base_json();
    json_object_set_new(o, "rope_scaling", json_pack("{s:s, s:f, s:i}", "type", "yarn", "factor", -4.0,
                                                     "original_max_position_embeddings", 64));
    parse_fails(o, "rope_scaling.factor", "positive");
    o = base_json();
    set_int(o, "eos_token_id", 256); /* the vocabulary is 256 */
    parse_fails(o, "eos_token_id", "vocabulary");
    o = base_json();
    set_int(o, "bos_token_id", -5);
    parse_fails(o, "bos_token_id", "vocabulary");
}

static void test_nonexistent_file(void **state) {
    (void)state;
    const char *path = MILL_TEST_DATA "/no-such-model/config.json";
    dsv4_config c;
    mill_err e;
    memset(&e, 0, sizeof e);
    assert_int_equal(config_load(path, &c, &e), -1);
    assert_msg_has(&e, path);
    /* a directory without config.json */
    memset(&e, 0, sizeof e);
    assert_int_equal(config_load(MILL_TEST_DATA, &c, &e), -1);
    assert_msg_has(&e, MILL_TEST_DATA "/config.json");
}

/* Errors from config_load name the file's path, not a generic source. */
static void test_load_error_names_path(void **state) {
    (void)state;
    char dir[] = "/tmp/test_config_XXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[128];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fputs("{\"vocab_size\": \"many\"}", f);
    assert_int_equal(fclose(f), 0);
    dsv4_config c;
    mill_err e;
    memset(&e, 0, sizeof e);
    int rc = config_load(dir, &c, &e);
    remove(path);
    rmdir(dir);
    assert_int_equal(rc, -1);
    assert_msg_has(&e, path);
    assert_msg_has(&e, "vocab_size");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_load_tiny_a),
        cmocka_unit_test(test_load_tiny_b),
        cmocka_unit_test(test_load_directory),
        cmocka_unit_test(test_unknown_key_ignored),
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_other_scoring_funcs),
        cmocka_unit_test(test_rope_type_spelling),
        cmocka_unit_test(test_eos_list),
        cmocka_unit_test(test_malformed_json),
        cmocka_unit_test(test_top_level_array),
        cmocka_unit_test(test_missing_required),
        cmocka_unit_test(test_wrong_types),
        cmocka_unit_test(test_compress_ratios_short),
        cmocka_unit_test(test_compress_ratio_7),
        cmocka_unit_test(test_kv_heads_2),
        cmocka_unit_test(test_rope_head_dim),
        cmocka_unit_test(test_o_groups),
        cmocka_unit_test(test_experts_per_tok),
        cmocka_unit_test(test_rope_linear),
        cmocka_unit_test(test_scoring_relu),
        cmocka_unit_test(test_value_ranges),
        cmocka_unit_test(test_nonexistent_file),
        cmocka_unit_test(test_load_error_names_path),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
