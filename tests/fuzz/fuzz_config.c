/* tests/fuzz/fuzz_config.c — fuzz target for the model config reader (common/config.c): an HF
 * config.json with the release keys, parsed by config_parse (config_load's text half).
 * A config that parses must (1) validate again, (2) hold what the JSON said — the integers the
 * harness reads back with jansson equal the struct's, so no value was cut to fit an int — and
 * (3) survive config_save then config_load (the same struct: a saved model reloads as it was). */
#include <jansson.h>

#include "common/config.h"
#include "fuzz_common.h"

/* The integer at key (a list's first entry for the token ids) as the JSON holds it; 0 if none. */
static int json_int_at(json_t *o, const char *key, long long *out) {
    json_t *v = json_object_get(o, key);
    if (json_is_array(v)) v = json_array_get(v, 0);
    if (!json_is_integer(v)) return 0;
    *out = json_integer_value(v);
    return 1;
}

static void check_values(const char *text, const dsv4_config *c) {
    json_t *o = json_loads(text, 0, NULL);
    FUZZ_CHECK(json_is_object(o));
    const struct {
        const char *key;
        long long v;
    } ints[] = {{"vocab_size", c->vocab_size},     {"hidden_size", c->hidden_size},
                {"num_hidden_layers", c->num_hidden_layers}, {"head_dim", c->head_dim},
                {"n_routed_experts", c->n_routed_experts},   {"num_experts_per_tok", c->num_experts_per_tok},
                {"bos_token_id", c->bos_token_id},           {"eos_token_id", c->eos_token_id},
                {"max_position_embeddings", c->max_position_embeddings}};
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        long long want;
        if (json_int_at(o, ints[i].key, &want)) FUZZ_CHECK(want == ints[i].v);
    }
    json_t *rs = json_object_get(o, "rope_scaling");
    long long omax;
    if (c->rope_scaling.type_yarn && json_int_at(rs, "original_max_position_embeddings", &omax))
        FUZZ_CHECK(omax == c->rope_scaling.original_max_position_embeddings);
    json_decref(o);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *text = fuzz_cstr(data, size);
    dsv4_config c;
    mill_err e;
    e.msg[0] = 0;
    int rc = config_parse(text, "fuzz", &c, &e);
    FUZZ_CHECK(rc == 0 || rc == -1);
    if (rc == 0) {
        FUZZ_CHECK(config_validate(&c, "fuzz", &e) == 0);
        FUZZ_CHECK(c.num_hidden_layers >= 1 && c.num_hidden_layers <= DSV4_MAX_LAYERS);
        for (int i = 0; i < c.num_hidden_layers; i++)
            FUZZ_CHECK(c.compress_ratios[i] == 0 || c.compress_ratios[i] == 4 || c.compress_ratios[i] == 128);
        FUZZ_CHECK(c.bos_token_id >= -1 && c.bos_token_id < c.vocab_size);
        FUZZ_CHECK(c.eos_token_id >= -1 && c.eos_token_id < c.vocab_size);
        check_values(text, &c);
        char path[600];
        fuzz_path(fuzz_tmp("config"), "config.json", path, sizeof path);
        FUZZ_CHECK(config_save(&c, path, &e) == 0);
        dsv4_config back;
        if (config_load(path, &back, &e) != 0) {
            fprintf(stderr, "reload: %s\n", e.msg);
            FUZZ_CHECK(!"a saved config reloads");
        }
        FUZZ_CHECK(memcmp(&c, &back, sizeof c) == 0);
    } else {
        FUZZ_CHECK(e.msg[0] != 0);
        fuzz_refused("config_parse", e.msg);
    }
    free(text);
    return 0;
}
