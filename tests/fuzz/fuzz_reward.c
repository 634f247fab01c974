/* tests/fuzz/fuzz_reward.c — fuzz target for the reward side's decoders: `mill reward`'s JSONL
 * rows (launch/reward_cli.c, included for its static read_rows), the math verifier on every
 * response and label (algos/verify.c, verify_cmp.c, mathexpr.c: extraction, normalisation,
 * equality by structure and value), and
 * the remote reward service's reply and request bodies (algos/reward_remote.c, included for its
 * static rr_parse and rr_request_body).
 * Input: the JSONL rows; after FUZZ_SEP, a reply body for a batch of 1 to 3 samples.
 * Promises checked: rewards are 0 or 1; extraction with the response's own length never runs out
 * of room; equality is symmetric, and reflexive exactly when the normal form is non-empty; a reply
 * that parses gives finite float rewards; any bytes make a request body that is valid JSON. */
#include <math.h>

#include "fuzz_common.h"
#include "algos/reward_remote.c"
#include "launch/reward_cli.c"

/* raw: label is resp itself (reflexivity); else a row's pair (symmetry). */
static void check_verify(const char *resp, const char *label, int raw) {
    float r = verify_math_reward(resp, label);
    FUZZ_CHECK(r == 0.0f || r == 1.0f);
    size_t n = strlen(resp) + 1;
    char *out = malloc(n), *norm = malloc(4 * n + 64);
    FUZZ_CHECK(out && norm);
    int rc = verify_extract(resp, out, n);
    FUZZ_CHECK(rc == 0 || rc == 1);
    FUZZ_CHECK(strlen(out) < n && (rc == 1 || out[0] == 0));
    rc = verify_extract(resp, out, 1); /* room for "" only */
    FUZZ_CHECK(rc >= -1 && rc <= 1 && out[0] == 0);
    if (raw) {
        int ok = verify_normalize(resp, norm, 4 * n + 64) == 0 && norm[0];
        FUZZ_CHECK(verify_equal(resp, resp) == ok);
    } else {
        FUZZ_CHECK(verify_equal(resp, label) == verify_equal(label, resp));
    }
    free(out);
    free(norm);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const uint8_t *part[2];
    size_t len[2];
    int np = fuzz_split(data, size, part, len, 2);
    char path[600];
    fuzz_path(fuzz_tmp("reward"), "rows.jsonl", path, sizeof path);
    fuzz_write(path, part[0], len[0]);
    reward_rows rows = {0};
    mill_err e;
    e.msg[0] = 0;
    if (read_rows(path, &rows, &e) == 0) {
        for (int i = 0; i < rows.n && i < 8; i++) {
            FUZZ_CHECK(rows.response[i] && rows.label[i]);
            check_verify(rows.response[i], rows.label[i], 0);
        }
        if (rows.n > 0) { /* the batch as the service would get it */
            int k = rows.n < 8 ? rows.n : 8;
            char *body = rr_request_body((const char *const *)rows.prompt, (const char *const *)rows.response,
                                         (const char *const *)rows.label, k);
            FUZZ_CHECK(body != NULL);
            json_t *back = json_loads(body, 0, NULL);
            FUZZ_CHECK(json_array_size(json_object_get(back, "samples")) == (size_t)k);
            json_decref(back);
            free(body);
        }
    } else {
        FUZZ_CHECK(e.msg[0] != 0);
        fuzz_refused("read_rows", e.msg);
    }
    rows_free(&rows);
    char *text = fuzz_cstr(part[0], len[0]); /* the raw bytes as a response, against themselves */
    check_verify(text, text, 1);
    free(text);
    if (np > 1) {
        remote_reward_config c = {.url = "http://127.0.0.1:1/score"};
        rr_buf b = {.p = fuzz_dup(part[1], len[1]), .n = len[1]};
        float rw[3];
        for (int n = 1; n <= 3; n++) {
            e.msg[0] = 0;
            if (rr_parse(&c, &b, n, rw, &e) == 0) {
                for (int i = 0; i < n; i++) FUZZ_CHECK(isfinite(rw[i]));
            } else {
                FUZZ_CHECK(e.msg[0] != 0);
                fuzz_refused("rr_parse", e.msg);
            }
        }
        free(b.p);
    }
    return 0;
}
