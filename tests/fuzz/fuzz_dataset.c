/* tests/fuzz/fuzz_dataset.c — fuzz target for JSONL prompt datasets (algos/dataset.c): the line
 * reader, row JSON, dotted keys, labels (strings and numbers), templates, skip_bad, and rows as
 * chat-message lists rendered by the DeepSeek-V4 chat format (algos/chat.c).
 * Input: the JSONL file, opened under one of four configurations, chosen by the input's size mod 4
 * (plain strict; plain skip_bad with dapo-math's keys and a template; chat in chat mode; chat in
 * thinking mode with reasoning_effort max and drop_thinking off, max_rows 3).
 * An opened dataset must keep dataset.h's promises: rows in source order with non-empty prompts
 * and labels, dataset_row_at inside the rows for any cursor, dataset_format exact about its cap. */
#include "algos/dataset.h"
#include "fuzz_common.h"

static void exercise(dataset *d, long max_rows) {
    long n = dataset_size(d);
    FUZZ_CHECK(n >= 1);
    FUZZ_CHECK(max_rows == 0 || n <= max_rows);
    FUZZ_CHECK(dataset_row_get(d, -1) == NULL && dataset_row_get(d, n) == NULL);
    long last_line = 0;
    for (long i = 0; i < n; i++) {
        const dataset_row *r = dataset_row_get(d, i);
        FUZZ_CHECK(r != NULL && r->id == i && r->line > last_line);
        last_line = r->line;
        FUZZ_CHECK(r->prompt && r->prompt[0] && r->label && r->label[0]);
        char buf[256];
        mill_err e;
        int rc = dataset_format(d, r, buf, sizeof buf, &e);
        FUZZ_CHECK(rc == 0 || rc == -1);
        if (rc == 0) {
            size_t k = strlen(buf); /* the exact fit works, one byte less does not */
            char *exact = malloc(k + 1);
            FUZZ_CHECK(exact && dataset_format(d, r, exact, k + 1, &e) == 0 && strcmp(exact, buf) == 0);
            if (k > 0) FUZZ_CHECK(dataset_format(d, r, exact, k, &e) == -1 && exact[0] == 0);
            free(exact);
        } else {
            FUZZ_CHECK(buf[0] == 0);
        }
    }
    for (long cur = 0; cur < 2 * n + 3 && cur < 40; cur++) {
        const dataset_row *r = dataset_row_at(d, 7, cur);
        FUZZ_CHECK(r != NULL && r->id >= 0 && r->id < n && dataset_row_get(d, r->id) == r);
    }
    FUZZ_CHECK(dataset_row_at(d, 7, -1) == NULL);
    for (int i = 0; i < DATASET_SKIP_REASONS + 1; i++) {
        const char *why = dataset_skip_reason(d, i);
        if (why) FUZZ_CHECK(why[0] != 0 && i < dataset_skipped(d));
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char path[600];
    fuzz_path(fuzz_tmp("dataset"), "data.jsonl", path, sizeof path);
    fuzz_write(path, data, size);
    chat_format chat, think;
    chat_format_default(&chat);
    chat_format_default(&think);
    think.thinking = 1;
    think.effort_max = 1;
    think.drop_thinking = 0;
    const dataset_jsonl_config cfgs[] = {
        {.path = path},
        {.path = path, .prompt_key = "prompt", .label_key = "reward_model.ground_truth", .skip_bad = 1,
         .prompt_template = "Q: {prompt}\nA: {prompt}"},
        {.path = path, .label_key = "reward_model.ground_truth", .skip_bad = 1, .chat = &chat},
        {.path = path, .prompt_key = "extra.question", .skip_bad = 1, .max_rows = 3, .chat = &think,
         .prompt_template = "{prompt} Think step by step."},
    };
    { /* one configuration per input (its size picks): each open costs a 1 MiB arena, slow under ASan */
        size_t i = size % (sizeof cfgs / sizeof cfgs[0]);
        dataset *d = NULL;
        mill_err e;
        e.msg[0] = 0;
        int rc = dataset_open_jsonl(&d, &cfgs[i], &e);
        FUZZ_CHECK(rc == 0 || rc == -1);
        if (rc == 0) {
            FUZZ_CHECK(d != NULL);
            exercise(d, cfgs[i].max_rows);
            dataset_free(d);
        } else {
            FUZZ_CHECK(d == NULL && e.msg[0] != 0);
            fuzz_refused("dataset_open_jsonl", e.msg);
        }
    }
    return 0;
}
