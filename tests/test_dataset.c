/* tests/test_dataset.c — prompt datasets: JSONL rows (string and chat prompts, dotted
 * keys, numeric labels), templates, the epoch order (determinism, permutations,
 * resume by cursor), every kind of bad row with its FILE:LINE, skip_bad, empty and
 * missing files, the arithmetic source, a 10,000-row load, the bundled sample. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* mkdtemp, clock_gettime under -std=c11 */
#endif
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "algos/arith.h"
#include "algos/dataset.h"
#include "common/rng.h"

/* ---- a scratch directory per test run ---- */

typedef struct {
    char dir[256];
    int n_files;
} scratch;

static int setup(void **state) {
    scratch *s = calloc(1, sizeof *s);
    if (!s) return -1;
    snprintf(s->dir, sizeof s->dir, "%s/mill-dataset-XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(s->dir)) return -1;
    *state = s;
    return 0;
}

static int teardown(void **state) {
    scratch *s = *state;
    char path[512];
    for (int i = 0; i < s->n_files; i++) {
        snprintf(path, sizeof path, "%s/f%d.jsonl", s->dir, i);
        unlink(path);
    }
    rmdir(s->dir);
    free(s);
    return 0;
}

/* Writes text to a fresh file in the scratch dir; its path goes to path. */
static void put(scratch *s, const char *text, char *path, size_t cap) {
    snprintf(path, cap, "%s/f%d.jsonl", s->dir, s->n_files++);
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(text, 1, strlen(text), fp), strlen(text));
    assert_int_equal(fclose(fp), 0);
}

static dataset *open_text(scratch *s, const char *text, const char *pkey, const char *lkey, const char *tmpl) {
    char path[512];
    put(s, text, path, sizeof path);
    dataset_jsonl_config c = {.path = path, .prompt_key = pkey, .label_key = lkey, .prompt_template = tmpl};
    dataset *d = NULL;
    mill_err e = {{0}};
    if (dataset_open_jsonl(&d, &c, &e) != 0) fail_msg("open failed: %s", e.msg);
    return d;
}

/* ---- JSONL rows ---- */

static void test_string_prompts(void **state) {
    dataset *d = open_text(*state,
                           "{\"prompt\":\"What is 1 + 1?\",\"label\":\"2\"}\n"
                           "\n"
                           "   \r\n"
                           "{\"label\":\"b\",\"prompt\":\"line one\\nline two\",\"extra\":[1,2]}\r\n"
                           "{\"prompt\":\"caf\\u00e9 \xe2\x9c\x93\",\"label\":\"\xce\xbb\"}", /* no final newline */
                           NULL, NULL, NULL);
    assert_int_equal(dataset_size(d), 3);
    assert_int_equal(dataset_skipped(d), 0);
    const dataset_row *r = dataset_row_get(d, 0);
    assert_string_equal(r->prompt, "What is 1 + 1?");
    assert_string_equal(r->label, "2");
    assert_int_equal(r->id, 0);
    assert_int_equal(r->line, 1);
    assert_int_equal(r->level, 0);
    r = dataset_row_get(d, 1);
    assert_string_equal(r->prompt, "line one\nline two");
    assert_string_equal(r->label, "b");
    assert_int_equal(r->line, 4);
    r = dataset_row_get(d, 2);
    assert_string_equal(r->prompt, "caf\xc3\xa9 \xe2\x9c\x93");
    assert_string_equal(r->label, "\xce\xbb");
    assert_int_equal(r->line, 5);
    assert_null(dataset_row_get(d, 3));
    assert_null(dataset_row_get(d, -1));
    dataset_free(d);
}

static void test_chat_prompts(void **state) {
    dataset *d = open_text(*state,
                           "{\"prompt\":[{\"role\":\"user\",\"content\":\"Only the user.\"}],\"label\":\"1\"}\n"
                           "{\"prompt\":[{\"role\":\"system\",\"content\":\"Be brief.\"},"
                           "{\"role\":\"user\",\"content\":\"What is 2 + 2?\"},"
                           "{\"role\":\"assistant\",\"content\":\"Let me think.\"}],\"label\":\"4\"}\n"
                           "{\"prompt\":[{\"content\":\"\"},{\"content\":\"no role, empty first\"}],\"label\":\"x\"}\n",
                           "prompt", "label", NULL);
    assert_int_equal(dataset_size(d), 3);
    assert_string_equal(dataset_row_get(d, 0)->prompt, "Only the user.");
    assert_string_equal(dataset_row_get(d, 1)->prompt, "Be brief.\n\nWhat is 2 + 2?\n\nLet me think.");
    assert_string_equal(dataset_row_get(d, 2)->prompt, "\n\nno role, empty first");
    dataset_free(d);
}

/* With a chat format: a string prompt is one user turn, the template wraps the last user turn,
 * the row's text is the rendered conversation; a list the format refuses is a bad row. */
static void test_chat_format(void **state) {
    char path[512];
    put(*state,
        "{\"prompt\":\"2+2?\",\"label\":\"4\"}\n"
        "{\"prompt\":[{\"role\":\"system\",\"content\":\"S\"},{\"role\":\"user\",\"content\":\"a\"},"
        "{\"role\":\"assistant\",\"content\":\"b\"},{\"role\":\"user\",\"content\":\"c\"}],\"label\":\"1\"}\n",
        path, sizeof path);
    chat_format f;
    chat_format_default(&f);
    dataset_jsonl_config c = {.path = path, .prompt_template = "Q: {prompt}!", .chat = &f};
    dataset *d = NULL;
    mill_err e = {{0}};
    assert_int_equal(dataset_open_jsonl(&d, &c, &e), 0);
    char out[512];
#define U "<\xEF\xBD\x9CUser\xEF\xBD\x9C>"
#define A "<\xEF\xBD\x9C" "Assistant\xEF\xBD\x9C></think>"
#define B "<\xEF\xBD\x9C" "begin\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>"
#define E "<\xEF\xBD\x9C" "end\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>"
    assert_int_equal(dataset_format(d, dataset_row_get(d, 0), out, sizeof out, &e), 0);
    assert_string_equal(out, B U "Q: 2+2?!" A);
    assert_int_equal(dataset_format(d, dataset_row_get(d, 1), out, sizeof out, &e), 0);
    assert_string_equal(out, B "S" U "a" A "b" E U "Q: c!" A);
#undef U
#undef A
#undef B
#undef E
    dataset_free(d);
    put(*state, "{\"prompt\":[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"tool\",\"content\":\"x\"}],\"label\":\"1\"}\n",
        path, sizeof path);
    c.path = path;
    assert_int_equal(dataset_open_jsonl(&d, &c, &e), -1);
    assert_non_null(strstr(e.msg, ":1: prompt \"prompt\": messages[1].role: \"tool\" is not supported"));
}

static void test_dotted_keys(void **state) {
    dataset *d = open_text(*state,
                           "{\"extra\":{\"question\":\"Q1\",\"deep\":{\"x\":{\"y\":\"Q1deep\"}}},"
                           "\"reward_model\":{\"ground_truth\":\"34\",\"style\":\"rule\"}}\n"
                           "{\"reward_model\":{\"ground_truth\":\"35\"},\"extra\":{\"question\":\"Q2\",\"deep\":{\"x\":{\"y\":\"Q2deep\"}}}}\n",
                           "extra.question", "reward_model.ground_truth", NULL);
    assert_int_equal(dataset_size(d), 2);
    assert_string_equal(dataset_row_get(d, 0)->prompt, "Q1");
    assert_string_equal(dataset_row_get(d, 0)->label, "34");
    assert_string_equal(dataset_row_get(d, 1)->prompt, "Q2");
    assert_string_equal(dataset_row_get(d, 1)->label, "35");
    dataset_free(d);
    d = open_text(*state, "{\"extra\":{\"deep\":{\"x\":{\"y\":\"deep one\"}}},\"answer\":7}\n", "extra.deep.x.y", "answer",
                  NULL);
    assert_string_equal(dataset_row_get(d, 0)->prompt, "deep one");
    assert_string_equal(dataset_row_get(d, 0)->label, "7");
    dataset_free(d);
}

static void test_numeric_labels(void **state) {
    static const struct {
        const char *json, *want;
    } cases[] = {
        {"34", "34"},       {"0.5", "0.5"},     {"34.0", "34"},     {"-3", "-3"},
        {"0", "0"},         {"-0.0", "0"},      {"0.1", "0.1"},     {"1e-7", "1e-07"},
        {"2.5e20", "2.5e+20"}, {"1e3", "1000"}, {"-12.25", "-12.25"}, {"9007199254740993", "9007199254740993"},
        {"0.3333333333333333", "0.3333333333333333"},
    };
    enum { N = sizeof cases / sizeof cases[0] };
    char text[4096];
    size_t n = 0;
    for (int i = 0; i < N; i++)
        n += (size_t)snprintf(text + n, sizeof text - n, "{\"prompt\":\"p%d\",\"label\":%s}\n", i, cases[i].json);
    dataset *d = open_text(*state, text, NULL, NULL, NULL);
    assert_int_equal(dataset_size(d), N);
    for (int i = 0; i < N; i++) {
        const char *got = dataset_row_get(d, i)->label;
        if (strcmp(got, cases[i].want) != 0) fail_msg("label %s rendered \"%s\", expected \"%s\"", cases[i].json, got, cases[i].want);
    }
    dataset_free(d);
}

/* ---- templates ---- */

static void test_template(void **state) {
    const char *text = "{\"prompt\":\"What is 3 + 4?\",\"label\":\"7\"}\n";
    char out[256];
    mill_err e = {{0}};
    dataset *d = open_text(*state, text, NULL, NULL, "Q: {prompt}\nA: ");
    const dataset_row *r = dataset_row_get(d, 0);
    assert_int_equal(dataset_format(d, r, out, sizeof out, &e), 0);
    assert_string_equal(out, "Q: What is 3 + 4?\nA: ");
    /* the exact fit, and one byte short */
    size_t need = strlen("Q: What is 3 + 4?\nA: ") + 1;
    assert_int_equal(dataset_format(d, r, out, need, &e), 0);
    assert_int_equal(dataset_format(d, r, out, need - 1, &e), -1);
    assert_string_equal(out, "");
    assert_non_null(strstr(e.msg, "does not fit"));
    dataset_free(d);

    /* only {prompt} is special; every occurrence is replaced */
    d = open_text(*state, text, NULL, NULL, "{{x}} {prompt} | {prompt}} {promp");
    assert_int_equal(dataset_format(d, dataset_row_get(d, 0), out, sizeof out, &e), 0);
    assert_string_equal(out, "{{x}} What is 3 + 4? | What is 3 + 4?} {promp");
    dataset_free(d);

    /* default: the prompt alone */
    d = open_text(*state, text, NULL, NULL, NULL);
    assert_int_equal(dataset_format(d, dataset_row_get(d, 0), out, sizeof out, &e), 0);
    assert_string_equal(out, "What is 3 + 4?");
    assert_int_equal(dataset_format(d, NULL, out, sizeof out, &e), -1);
    assert_int_equal(dataset_format(d, dataset_row_get(d, 0), out, 0, &e), -1);
    dataset_free(d);

    /* no {prompt}: refused at open, for both sources */
    char path[512];
    put(*state, text, path, sizeof path);
    dataset_jsonl_config c = {.path = path, .prompt_template = "Q: {question}\nA: "};
    d = (dataset *)1;
    assert_int_equal(dataset_open_jsonl(&d, &c, &e), -1);
    assert_null(d);
    assert_non_null(strstr(e.msg, "{prompt}"));
    int lv[] = {1};
    assert_int_equal(dataset_arith(&d, lv, 1, 5, 1, "no slot", &e), -1);
    assert_non_null(strstr(e.msg, "{prompt}"));
}

/* ---- order ---- */

static dataset *open_n(scratch *s, int n) {
    char *text = malloc((size_t)n * 64 + 1);
    assert_non_null(text);
    size_t k = 0;
    for (int i = 0; i < n; i++) k += (size_t)sprintf(text + k, "{\"prompt\":\"row %d\",\"label\":\"%d\"}\n", i, i);
    dataset *d = open_text(s, text, NULL, NULL, NULL);
    free(text);
    return d;
}

static void test_determinism(void **state) {
    enum { N = 13, EPOCHS = 3 };
    dataset *a = open_n(*state, N), *b = open_n(*state, N), *c = open_n(*state, N);
    long seq[EPOCHS * N];
    int differ_seed = 0, differ_epoch = 0;
    for (long cur = 0; cur < EPOCHS * N; cur++) {
        const dataset_row *ra = dataset_row_at(a, 42, cur), *rb = dataset_row_at(b, 42, cur);
        const dataset_row *rc = dataset_row_at(c, 43, cur);
        assert_non_null(ra);
        assert_int_equal(ra->id, rb->id);
        assert_string_equal(ra->prompt, rb->prompt);
        char want[32];
        snprintf(want, sizeof want, "row %ld", ra->id);
        assert_string_equal(ra->prompt, want);
        differ_seed += ra->id != rc->id;
        seq[cur] = ra->id;
    }
    assert_true(differ_seed > 0);
    for (int ep = 0; ep < EPOCHS; ep++) {
        int seen[N] = {0};
        for (int p = 0; p < N; p++) seen[seq[ep * N + p]]++;
        for (int i = 0; i < N; i++) assert_int_equal(seen[i], 1);
        if (ep) {
            for (int p = 0; p < N; p++) differ_epoch += seq[ep * N + p] != seq[(ep - 1) * N + p];
        }
    }
    assert_true(differ_epoch > 0);
    /* resume: a fresh object jumping straight to any cursor, in any order, agrees */
    dataset_free(b);
    b = open_n(*state, N);
    for (long cur = EPOCHS * N - 1; cur >= 0; cur -= 5) assert_int_equal(dataset_row_at(b, 42, cur)->id, seq[cur]);
    assert_int_equal(dataset_row_at(b, 42, 2 * N + 3)->id, seq[2 * N + 3]);
    assert_int_equal(dataset_row_at(b, 42, 3)->id, seq[3]);
    /* switching seeds back and forth does not disturb the cached order */
    assert_int_equal(dataset_row_at(b, 43, 0)->id, dataset_row_at(c, 43, 0)->id);
    assert_int_equal(dataset_row_at(b, 42, 5)->id, seq[5]);
    assert_null(dataset_row_at(b, 42, -1));
    assert_null(dataset_row_at(NULL, 42, 0));
    /* a large cursor is fine */
    assert_non_null(dataset_row_at(b, 42, 1L << 40));
    dataset_free(a);
    dataset_free(b);
    dataset_free(c);

    /* a one-row dataset always gives its row */
    dataset *one = open_n(*state, 1);
    for (long cur = 0; cur < 5; cur++) assert_int_equal(dataset_row_at(one, 7, cur)->id, 0);
    dataset_free(one);
}

/* ---- bad rows ---- */

static const char GOOD[] = "{\"prompt\":\"p\",\"label\":\"l\"}\n";

static const struct {
    const char *line; /* without newline */
    const char *says; /* a piece of the message */
} BAD[] = {
    {"{\"prompt\":\"p\",\"label\":\"l\"", "not JSON"},
    {"prompt: p", "not JSON"},
    {"{\"prompt\":\"p\",\"label\":\"l\"} trailing", "not JSON"},
    {"{\"prompt\":\"\xff\xfe\",\"label\":\"l\"}", "not JSON"},
    {"[\"p\",\"l\"]", "is a list; expected a JSON object"},
    {"42", "is a number; expected a JSON object"},
    {"\"just a string\"", "is a string; expected a JSON object"},
    {"{\"question\":\"p\",\"label\":\"l\"}", "no key \"prompt\" (the row has keys: question, label)"},
    {"{\"prompt\":\"p\",\"answer\":\"l\"}", "no key \"label\""},
    {"{\"prompt\":7,\"label\":\"l\"}", "prompt \"prompt\" is a number"},
    {"{\"prompt\":null,\"label\":\"l\"}", "prompt \"prompt\" is null"},
    {"{\"prompt\":{\"content\":\"p\"},\"label\":\"l\"}", "prompt \"prompt\" is an object"},
    {"{\"prompt\":\"p\",\"label\":true}", "label \"label\" is a boolean; expected a string or a number"},
    {"{\"prompt\":\"p\",\"label\":null}", "label \"label\" is null"},
    {"{\"prompt\":\"p\",\"label\":[\"1\"]}", "label \"label\" is a list"},
    {"{\"prompt\":\"p\",\"label\":\"\"}", "label \"label\" is empty"},
    {"{\"prompt\":\"\",\"label\":\"l\"}", "prompt \"prompt\" is empty"},
    {"{\"prompt\":\" \\n\\t \",\"label\":\"l\"}", "prompt \"prompt\" is empty"},
    {"{\"prompt\":[],\"label\":\"l\"}", "is an empty list"},
    {"{\"prompt\":[\"hi\"],\"label\":\"l\"}", "prompt \"prompt\"[0] is a string"},
    {"{\"prompt\":[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"user\"}],\"label\":\"l\"}",
     "prompt \"prompt\"[1] has no \"content\""},
    {"{\"prompt\":[{\"role\":7,\"content\":\"a\"}],\"label\":\"l\"}", "prompt \"prompt\"[0] has a number \"role\""},
    {"{\"prompt\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\"}]}],\"label\":\"l\"}",
     "prompt \"prompt\"[0] has a list \"content\""},
    {"{\"prompt\":[{\"role\":\"user\",\"content\":\"  \"}],\"label\":\"l\"}", "only empty messages"},
    {"{\"prompt\":\"a\\u0000b\",\"label\":\"l\"}", "not JSON"},
};
enum { N_BAD = sizeof BAD / sizeof BAD[0] };

static void test_bad_rows(void **state) {
    scratch *s = *state;
    char path[512], want[600];
    for (int k = 0; k < N_BAD; k++) {
        /* two good rows and a blank line first: the bad one is line 4 */
        char text[1024];
        snprintf(text, sizeof text, "%s%s\n%s\n%s", GOOD, GOOD, BAD[k].line, GOOD);
        put(s, text, path, sizeof path);
        dataset_jsonl_config c = {.path = path};
        dataset *d = (dataset *)1;
        mill_err e = {{0}};
        assert_int_equal(dataset_open_jsonl(&d, &c, &e), -1);
        assert_null(d);
        snprintf(want, sizeof want, "%s:4: ", path);
        if (strncmp(e.msg, want, strlen(want)) != 0 || !strstr(e.msg, BAD[k].says))
            fail_msg("bad row %d (%s): got \"%s\", expected \"%s...%s\"", k, BAD[k].line, e.msg, want, BAD[k].says);
    }
    /* dotted keys: a parent that is missing or not an object */
    put(s, "{\"reward_model\":\"34\",\"prompt\":\"p\"}\n", path, sizeof path);
    dataset_jsonl_config c = {.path = path, .label_key = "reward_model.ground_truth"};
    dataset *d;
    mill_err e = {{0}};
    assert_int_equal(dataset_open_jsonl(&d, &c, &e), -1);
    snprintf(want, sizeof want, "%s:1: \"reward_model\" is a string, not an object", path);
    assert_non_null(strstr(e.msg, want));
    put(s, "{\"reward_model\":{\"style\":\"rule\"},\"prompt\":\"p\"}\n", path, sizeof path);
    assert_int_equal(dataset_open_jsonl(&d, &c, &e), -1);
    assert_non_null(strstr(e.msg, "no key \"reward_model.ground_truth\" (\"reward_model\" has keys: style)"));

    /* a line over the cap, then a good row after it: the reader resynchronises */
    size_t big = DATASET_MAX_LINE + 100;
    char *text = malloc(big + 200);
    assert_non_null(text);
    size_t n = (size_t)sprintf(text, "%s", GOOD);
    n += (size_t)sprintf(text + n, "{\"prompt\":\"");
    memset(text + n, 'x', big);
    n += big;
    n += (size_t)sprintf(text + n, "\",\"label\":\"1\"}\n%s", GOOD);
    put(s, text, path, sizeof path);
    free(text);
    c = (dataset_jsonl_config){.path = path};
    assert_int_equal(dataset_open_jsonl(&d, &c, &e), -1);
    snprintf(want, sizeof want, "%s:2: the line is longer than", path);
    assert_non_null(strstr(e.msg, want));
    c.skip_bad = 1;
    assert_int_equal(dataset_open_jsonl(&d, &c, &e), 0);
    assert_int_equal(dataset_size(d), 2);
    assert_int_equal(dataset_skipped(d), 1);
    assert_int_equal(dataset_row_get(d, 1)->line, 3);
    dataset_free(d);
}

static void test_skip_bad(void **state) {
    scratch *s = *state;
    /* good rows interleaved with every bad kind */
    size_t cap = 64 * 1024, n = 0;
    char *text = malloc(cap);
    assert_non_null(text);
    for (int k = 0; k < N_BAD; k++) n += (size_t)snprintf(text + n, cap - n, "%s%s\n", GOOD, BAD[k].line);
    char path[512];
    put(s, text, path, sizeof path);
    free(text);
    dataset_jsonl_config c = {.path = path, .skip_bad = 1};
    dataset *d = NULL;
    mill_err e = {{0}};
    assert_int_equal(dataset_open_jsonl(&d, &c, &e), 0);
    assert_int_equal(dataset_size(d), N_BAD);
    assert_int_equal(dataset_skipped(d), N_BAD);
    char want[600];
    for (int i = 0; i < DATASET_SKIP_REASONS; i++) {
        const char *why = dataset_skip_reason(d, i);
        assert_non_null(why);
        snprintf(want, sizeof want, "%s:%d: ", path, 2 * i + 2);
        assert_true(strncmp(why, want, strlen(want)) == 0);
        assert_non_null(strstr(why, BAD[i].says));
    }
    assert_null(dataset_skip_reason(d, DATASET_SKIP_REASONS));
    assert_null(dataset_skip_reason(d, -1));
    for (long i = 0; i < dataset_size(d); i++) assert_int_equal(dataset_row_get(d, i)->line, 2 * i + 1);
    dataset_free(d);

    /* only bad rows: still an error, naming the file and the first reason */
    put(s, "[1]\n{\"prompt\":\"\",\"label\":\"1\"}\n", path, sizeof path);
    c.path = path;
    assert_int_equal(dataset_open_jsonl(&d, &c, &e), -1);
    assert_non_null(strstr(e.msg, path));
    assert_non_null(strstr(e.msg, "no usable rows (2 bad rows skipped"));
}

static void test_empty_and_missing(void **state) {
    scratch *s = *state;
    char path[512];
    mill_err e = {{0}};
    dataset *d = (dataset *)1;
    const char *empties[] = {"", "\n\n", "  \r\n\t\n"};
    for (int i = 0; i < 3; i++) {
        put(s, empties[i], path, sizeof path);
        dataset_jsonl_config c = {.path = path};
        assert_int_equal(dataset_open_jsonl(&d, &c, &e), -1);
        assert_null(d);
        assert_non_null(strstr(e.msg, path));
        assert_non_null(strstr(e.msg, "no rows"));
    }
    snprintf(path, sizeof path, "%s/no-such-file.jsonl", s->dir);
    dataset_jsonl_config c = {.path = path};
    assert_int_equal(dataset_open_jsonl(&d, &c, &e), -1);
    assert_non_null(strstr(e.msg, path));
    /* a directory opens but cannot be read */
    c.path = s->dir;
    assert_int_equal(dataset_open_jsonl(&d, &c, &e), -1);
    assert_non_null(strstr(e.msg, s->dir));
    /* bad configs */
    assert_int_equal(dataset_open_jsonl(&d, NULL, &e), -1);
    c = (dataset_jsonl_config){.path = ""};
    assert_int_equal(dataset_open_jsonl(&d, &c, &e), -1);
    put(s, GOOD, path, sizeof path);
    const char *keys[] = {"", ".a", "a.", "a..b"};
    for (int i = 0; i < 4; i++) {
        c = (dataset_jsonl_config){.path = path, .label_key = keys[i]};
        assert_int_equal(dataset_open_jsonl(&d, &c, &e), -1);
        assert_non_null(strstr(e.msg, "label key"));
    }
    c = (dataset_jsonl_config){.path = path, .max_rows = -1};
    assert_int_equal(dataset_open_jsonl(&d, &c, &e), -1);
    assert_int_equal(dataset_size(NULL), 0);
    dataset_free(NULL);
}

/* Random bytes and cut-off rows never crash the loader; with skip_bad the good rows survive. */
static void test_garbage(void **state) {
    scratch *s = *state;
    rng r;
    rng_seed(&r, 2024);
    size_t cap = 1 << 20, n = 0;
    char *text = malloc(cap);
    assert_non_null(text);
    const char *row = "{\"prompt\":[{\"role\":\"user\",\"content\":\"x\"}],\"reward_model\":{\"ground_truth\":3}}";
    int good = 0;
    for (int i = 0; i < 400; i++) {
        int kind = (int)rng_below(&r, 3);
        if (kind == 0) {
            n += (size_t)sprintf(text + n, "%s\n", row);
            good++;
        } else if (kind == 1) {
            size_t cut = (size_t)rng_below(&r, strlen(row));
            memcpy(text + n, row, cut);
            n += cut;
            text[n++] = '\n';
        } else {
            int len = (int)rng_below(&r, 200);
            for (int j = 0; j < len; j++) {
                char ch = (char)rng_below(&r, 256);
                text[n++] = ch == '\n' || ch == 0 ? '?' : ch;
            }
            text[n++] = '\n';
        }
    }
    text[n] = 0;
    char path[512];
    put(s, text, path, sizeof path);
    free(text);
    dataset_jsonl_config c = {.path = path, .prompt_key = "prompt", .label_key = "reward_model.ground_truth", .skip_bad = 1};
    dataset *d = NULL;
    mill_err e = {{0}};
    assert_int_equal(dataset_open_jsonl(&d, &c, &e), 0);
    /* a cut at full length minus nothing cannot happen, and whitespace-only garbage is blank */
    assert_int_equal(dataset_size(d), good);
    for (long i = 0; i < dataset_size(d); i++) {
        assert_string_equal(dataset_row_get(d, i)->prompt, "x");
        assert_string_equal(dataset_row_get(d, i)->label, "3");
    }
    dataset_free(d);
}

/* ---- the arithmetic source ---- */

static void test_arith_source(void **state) {
    (void)state;
    int levels[] = {1, 3, 4};
    mill_err e = {{0}};
    dataset *d = NULL;
    assert_int_equal(dataset_arith(&d, levels, 3, 60, 77, NULL, &e), 0);
    assert_int_equal(dataset_size(d), 60);
    rng r;
    rng_seed(&r, 77);
    for (long i = 0; i < 60; i++) {
        arith_problem p;
        arith_draw(&p, levels[i % 3], 0, &r);
        const dataset_row *row = dataset_row_get(d, i);
        assert_string_equal(row->prompt, p.prompt);
        assert_string_equal(row->label, p.answer);
        assert_int_equal(row->level, p.level);
        assert_int_equal(row->id, i);
        assert_int_equal(row->line, 0);
        assert_false(arith_is_heldout(&p));
        char want[256], got[256];
        assert_int_equal(arith_format_prompt(&p, want, sizeof want), 0);
        assert_int_equal(dataset_format(d, row, got, sizeof got, &e), 0);
        assert_string_equal(got, want);
    }
    /* the same order machinery as JSONL */
    int seen[60] = {0};
    for (long cur = 60; cur < 120; cur++) seen[dataset_row_at(d, 5, cur)->id]++;
    for (int i = 0; i < 60; i++) assert_int_equal(seen[i], 1);
    dataset_free(d);

    /* a custom template */
    assert_int_equal(dataset_arith(&d, levels, 1, 3, 77, "Problem: {prompt}\nAnswer:", &e), 0);
    char got[256];
    assert_int_equal(dataset_format(d, dataset_row_get(d, 0), got, sizeof got, &e), 0);
    assert_true(strncmp(got, "Problem: ", 9) == 0);
    assert_true(strcmp(got + strlen(got) - 8, "\nAnswer:") == 0);
    dataset_free(d);

    int bad_level[] = {2, 5};
    assert_int_equal(dataset_arith(&d, bad_level, 2, 10, 1, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "level 5"));
    assert_int_equal(dataset_arith(&d, levels, 0, 10, 1, NULL, &e), -1);
    assert_int_equal(dataset_arith(&d, NULL, 1, 10, 1, NULL, &e), -1);
    assert_int_equal(dataset_arith(&d, levels, 1, 0, 1, NULL, &e), -1);
    assert_int_equal(dataset_arith(&d, levels, 1, -4, 1, NULL, &e), -1);
}

/* arith_export_jsonl's file reads back as the same problems */
static void test_arith_export_roundtrip(void **state) {
    scratch *s = *state;
    char path[512];
    snprintf(path, sizeof path, "%s/f%d.jsonl", s->dir, s->n_files++);
    mill_err e = {{0}};
    assert_int_equal(arith_export_jsonl(path, 25, 2, 9, &e), 0);
    dataset_jsonl_config c = {.path = path, .prompt_template = "Q: {prompt}\nA: "};
    dataset *a = NULL, *b = NULL;
    assert_int_equal(dataset_open_jsonl(&a, &c, &e), 0);
    int lv = 2;
    assert_int_equal(dataset_arith(&b, &lv, 1, 25, 9, NULL, &e), 0);
    assert_int_equal(dataset_size(a), 25);
    char fa[256], fb[256];
    for (long i = 0; i < 25; i++) {
        assert_string_equal(dataset_row_get(a, i)->label, dataset_row_get(b, i)->label);
        assert_int_equal(dataset_format(a, dataset_row_get(a, i), fa, sizeof fa, &e), 0);
        assert_int_equal(dataset_format(b, dataset_row_get(b, i), fb, sizeof fb, &e), 0);
        assert_string_equal(fa, fb);
        assert_int_equal(dataset_row_at(a, 3, 40 + i)->id, dataset_row_at(b, 3, 40 + i)->id);
    }
    dataset_free(a);
    dataset_free(b);
}

/* ---- scale and the bundled sample ---- */

static void test_large_file(void **state) {
    enum { N = 10000 };
    scratch *s = *state;
    size_t cap = (size_t)N * 300, n = 0;
    char *text = malloc(cap);
    assert_non_null(text);
    for (int i = 0; i < N; i++)
        n += (size_t)snprintf(text + n, cap - n,
                              "{\"data_source\":\"math_dapo\",\"prompt\":[{\"content\":\"Solve step by step: what is %d + %d? "
                              "Put the answer after Answer:.\",\"role\":\"user\"}],\"reward_model\":{\"ground_truth\":\"%d\"}}\n",
                              i, i + 1, 2 * i + 1);
    char path[512];
    put(s, text, path, sizeof path);
    free(text);
    dataset_jsonl_config c = {.path = path, .label_key = "reward_model.ground_truth"};
    dataset *d = NULL;
    mill_err e = {{0}};
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    assert_int_equal(dataset_open_jsonl(&d, &c, &e), 0);
    long sum = 0;
    for (long cur = 0; cur < 2 * N; cur++) sum += dataset_row_at(d, 1, cur)->id;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
    print_message("loaded %d rows and drew 2 epochs in %.1f ms\n", N, ms);
    assert_true(ms < 2000); /* ~tens of ms; generous for a shared machine */
    assert_int_equal(dataset_size(d), N);
    assert_int_equal(sum, 2L * N * (N - 1) / 2);
    assert_string_equal(dataset_row_get(d, 9999)->label, "19999");
    dataset_free(d);

    c.max_rows = 100;
    assert_int_equal(dataset_open_jsonl(&d, &c, &e), 0);
    assert_int_equal(dataset_size(d), 100);
    assert_int_equal(dataset_row_get(d, 99)->line, 100);
    dataset_free(d);
}

static void test_sample_file(void **state) {
    (void)state;
    dataset_jsonl_config c = {
        .path = MILL_TEST_DATA "/math-sample.jsonl", .prompt_key = "prompt", .label_key = "reward_model.ground_truth"};
    dataset *d = NULL;
    mill_err e = {{0}};
    if (dataset_open_jsonl(&d, &c, &e) != 0) fail_msg("%s", e.msg);
    assert_int_equal(dataset_size(d), 20);
    assert_int_equal(dataset_skipped(d), 0);
    const dataset_row *r = dataset_row_get(d, 0);
    const char *head = "Solve the following math problem step by step.";
    assert_true(strncmp(r->prompt, head, strlen(head)) == 0);
    assert_non_null(strstr(r->prompt, "\n\nWhat is 17 + 25?\n\n"));
    assert_string_equal(r->label, "42");
    assert_string_equal(dataset_row_get(d, 13)->label, "5/6");
    for (long i = 0; i < 20; i++) {
        assert_non_null(strstr(dataset_row_get(d, i)->prompt, "Answer:"));
        assert_true(strlen(dataset_row_get(d, i)->label) > 0);
    }
    dataset_free(d);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_string_prompts),
        cmocka_unit_test(test_chat_prompts),
        cmocka_unit_test(test_chat_format),
        cmocka_unit_test(test_dotted_keys),
        cmocka_unit_test(test_numeric_labels),
        cmocka_unit_test(test_template),
        cmocka_unit_test(test_determinism),
        cmocka_unit_test(test_bad_rows),
        cmocka_unit_test(test_skip_bad),
        cmocka_unit_test(test_empty_and_missing),
        cmocka_unit_test(test_garbage),
        cmocka_unit_test(test_arith_source),
        cmocka_unit_test(test_arith_export_roundtrip),
        cmocka_unit_test(test_large_file),
        cmocka_unit_test(test_sample_file),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
