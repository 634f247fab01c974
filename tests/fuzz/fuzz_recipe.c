/* tests/fuzz/fuzz_recipe.c — fuzz target for run recipes: the YAML reader (common/yamlcfg.c:
 * libyaml into a jansson tree, YAML 1.2 core scalars, the typed getters by dotted path) and the
 * GRPO recipe on top of it (launch/grpo_recipe.c: known keys, ranges, the cross-field checks,
 * `--set key=value` overrides).
 * Input: the recipe text; after FUZZ_SEP, optional override lines (one `key=value` each).
 * Each input runs three ways: yamlcfg_parse on the raw bytes (NULs included) with the getters
 * probing odd paths; grpo_recipe_parse on the text (what `mill resume` does with the ledger's
 * copy); and grpo_recipe_load of the text as a file with the overrides (what `mill run` does).
 * A recipe that loads must parse again from the JSON it records (r.text) into the same recipe,
 * or a run could not be resumed as it was started. */
#include <jansson.h>

#include "common/yamlcfg.h"
#include "fuzz_common.h"
#include "launch/grpo.h"

static const char *const probe_paths[] = {"name", "data.kind", "rollout", "rollout.parallel.tp", "a.b.c", "",
                                          ".",    "a..b",      "x.",      "optimizer.lr",        "train.steps"};

static void probe(json_t *y) {
    mill_err e;
    for (size_t i = 0; i < sizeof probe_paths / sizeof probe_paths[0]; i++) {
        const char *p = probe_paths[i], *s = NULL;
        long long iv = 0;
        double dv = 0;
        int bv = 0;
        if (yamlcfg_int(y, p, 7, -5, 1000, &iv, "fuzz", &e) == 0) FUZZ_CHECK(iv >= -5 && iv <= 1000);
        if (yamlcfg_num(y, p, 0.5, -1, 2, &dv, "fuzz", &e) == 0) FUZZ_CHECK(dv >= -1 && dv <= 2);
        if (yamlcfg_bool(y, p, 0, &bv, "fuzz", &e) == 0) FUZZ_CHECK(bv == 0 || bv == 1);
        if (yamlcfg_str(y, p, "d", &s, "fuzz", &e) == 0) FUZZ_CHECK(s != NULL);
        (void)yamlcfg_get(y, p);
    }
    static const char *const known[] = {"name", "data", "train", NULL};
    (void)yamlcfg_known_keys(y, NULL, known, "fuzz", &e);
    (void)yamlcfg_known_keys(y, "data", known, "fuzz", &e);
}

/* What the ledger keeps must read back into the same recipe. */
static void check_resumable(const grpo_recipe *r) {
    FUZZ_CHECK(r->text != NULL);
    grpo_recipe back;
    memset(&back, 0, sizeof back);
    mill_err e;
    if (grpo_recipe_parse(r->text, "fuzz", &back, &e) != 0) {
        fprintf(stderr, "recorded recipe refused: %s\n", e.msg);
        FUZZ_CHECK(!"the recorded recipe parses");
    }
    grpo_recipe a = *r;
    a.text = NULL;
    back.text = NULL;
    FUZZ_CHECK(memcmp(&a, &back, sizeof a) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const uint8_t *part[2];
    size_t len[2];
    int np = fuzz_split(data, size, part, len, 2);
    mill_err e;
    e.msg[0] = 0;

    char *raw = fuzz_dup(part[0], len[0]); /* not NUL-terminated: the parser has len */
    json_t *y = yamlcfg_parse(raw, len[0], "fuzz", &e);
    if (y) probe(y);
    else FUZZ_CHECK(e.msg[0] != 0);
    json_decref(y);
    free(raw);

    char *text = fuzz_cstr(part[0], len[0]);
    grpo_recipe r;
    memset(&r, 0, sizeof r);
    e.msg[0] = 0;
    if (grpo_recipe_parse(text, "fuzz", &r, &e) != 0) {
        FUZZ_CHECK(e.msg[0] != 0);
        fuzz_refused("grpo_recipe_parse", e.msg);
    }
    grpo_recipe_free(&r);

    char path[600];
    fuzz_path(fuzz_tmp("recipe"), "recipe.yaml", path, sizeof path);
    fuzz_write(path, part[0], len[0]);
    char *ov = np > 1 ? fuzz_cstr(part[1], len[1]) : NULL, *lines[16];
    int n = 0;
    for (char *s = ov, *nl; s && *s && n < 16; s = nl ? nl + 1 : NULL) {
        nl = strchr(s, '\n');
        if (nl) *nl = 0;
        lines[n++] = s;
    }
    e.msg[0] = 0;
    if (grpo_recipe_load(path, lines, n, &r, &e) == 0) {
        check_resumable(&r);
    } else {
        FUZZ_CHECK(e.msg[0] != 0);
        fuzz_refused("grpo_recipe_load", e.msg);
    }
    grpo_recipe_free(&r);
    free(ov);
    free(text);
    return 0;
}
