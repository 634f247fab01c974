#include "reward_cli.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../algos/reward_remote.h"
#include "../algos/verify.h"
#include "../common/err.h"

typedef struct {
    char **prompt, **response, **label; /* [n] each; prompt entries may be NULL */
    int n, cap;
} reward_rows;

static void rows_free(reward_rows *r) {
    for (int i = 0; i < r->n; i++) free(r->prompt[i]), free(r->response[i]), free(r->label[i]);
    free(r->prompt), free(r->response), free(r->label);
    memset(r, 0, sizeof *r);
}

static char *dup_or_null(const char *s) { return s ? strdup(s) : NULL; }

/* Every line of path: a JSON object with a string response and a string or numeric label. */
static int read_rows(const char *path, reward_rows *r, mill_err *e) {
    FILE *f = fopen(path, "rb");
    if (!f) return mill_errf(e, "%s: cannot open", path);
    char *line = NULL;
    size_t cap = 0;
    long no = 0;
    int rc = 0;
    for (ssize_t len; !rc && (len = getline(&line, &cap, f)) >= 0;) {
        no++;
        if (len == 0 || strspn(line, " \t\r\n") == (size_t)len) continue; /* blank lines */
        json_error_t je;
        json_t *o = json_loadb(line, (size_t)len, 0, &je), *resp = o ? json_object_get(o, "response") : NULL;
        json_t *lab = o ? json_object_get(o, "label") : NULL, *pr = o ? json_object_get(o, "prompt") : NULL;
        char num[64];
        const char *ls = json_is_string(lab) ? json_string_value(lab) : NULL;
        if (json_is_integer(lab)) snprintf(num, sizeof num, "%lld", (long long)json_integer_value(lab)), ls = num;
        else if (json_is_real(lab)) snprintf(num, sizeof num, "%.17g", json_real_value(lab)), ls = num;
        if (!o) rc = mill_errf(e, "%s:%ld: not JSON (%s)", path, no, je.text);
        else if (!json_is_object(o)) rc = mill_errf(e, "%s:%ld: expected an object", path, no);
        else if (!json_is_string(resp)) rc = mill_errf(e, "%s:%ld: \"response\" must be a string", path, no);
        else if (!ls) rc = mill_errf(e, "%s:%ld: \"label\" must be a string or a number", path, no);
        else if (pr && !json_is_null(pr) && !json_is_string(pr))
            rc = mill_errf(e, "%s:%ld: \"prompt\" must be a string when given", path, no);
        if (!rc && r->n == r->cap) {
            int nc = r->cap ? 2 * r->cap : 64;
            char **a = realloc(r->prompt, sizeof *a * (size_t)nc), **b = a ? realloc(r->response, sizeof *b * (size_t)nc) : NULL;
            char **c = b ? realloc(r->label, sizeof *c * (size_t)nc) : NULL;
            if (a) r->prompt = a;
            if (b) r->response = b;
            if (c) r->label = c, r->cap = nc;
            else rc = mill_errf(e, "%s: out of memory", path);
        }
        if (!rc) {
            r->prompt[r->n] = dup_or_null(json_is_string(pr) ? json_string_value(pr) : NULL);
            r->response[r->n] = strdup(json_string_value(resp));
            r->label[r->n] = strdup(ls);
            if (!r->response[r->n] || !r->label[r->n]) rc = mill_errf(e, "%s: out of memory", path);
            r->n++;
        }
        json_decref(o);
    }
    free(line);
    fclose(f);
    return rc;
}

static int reward_main(int argc, char **argv, mill_err *e) {
    const char *in = NULL, *out = NULL, *url = NULL;
    double timeout = 30;
    for (int i = 2; i < argc; i += 2) {
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) return mill_errf(e, "option %s needs a value", argv[i]);
        if (!strcmp(argv[i], "--input")) in = v;
        else if (!strcmp(argv[i], "--output")) out = v;
        else if (!strcmp(argv[i], "--remote")) url = v;
        else if (!strcmp(argv[i], "--timeout")) {
            char *end;
            timeout = strtod(v, &end);
            if (*end || !(timeout > 0)) return mill_errf(e, "--timeout must be a positive number of seconds, got \"%s\"", v);
        } else {
            return mill_errf(e, "unknown option %s (mill reward --input IN.jsonl --output OUT.jsonl [--remote URL] "
                                "[--timeout S])", argv[i]);
        }
    }
    if (!in || !out) return mill_errf(e, "mill reward needs --input IN.jsonl --output OUT.jsonl");
    if (url && strncmp(url, "http://", 7) && strncmp(url, "https://", 8))
        return mill_errf(e, "--remote must be an http:// or https:// URL, got \"%s\"", url);
    reward_rows r = {0};
    float *rew = NULL;
    FILE *f = NULL;
    int rc = -1;
    if (read_rows(in, &r, e)) goto done;
    if (!(rew = calloc((size_t)(r.n ? r.n : 1), sizeof(float)))) {
        mill_errf(e, "out of memory");
        goto done;
    }
    if (url) { /* the scorer in batches of 256 */
        remote_reward_config rc_ = {.timeout_s = timeout, .retries = 3, .backoff_s = 0.5};
        snprintf(rc_.url, sizeof rc_.url, "%s", url);
        for (int i = 0; i < r.n; i += 256) {
            int k = r.n - i < 256 ? r.n - i : 256;
            if (reward_remote_score(&rc_, (const char *const *)r.prompt + i, (const char *const *)r.response + i,
                                    (const char *const *)r.label + i, k, rew + i, e))
                goto done;
        }
    } else {
        for (int i = 0; i < r.n; i++) rew[i] = verify_math_reward(r.response[i], r.label[i]);
    }
    if (!(f = fopen(out, "wb"))) {
        mill_errf(e, "%s: cannot write", out);
        goto done;
    }
    double sum = 0;
    int none = 0;
    for (int i = 0; i < r.n; i++) {
        char ext[4096];
        if (verify_extract(r.response[i], ext, sizeof ext) != 1) ext[0] = 0, none++;
        json_t *o = json_pack("{s:f, s:s}", "reward", (double)rew[i], "extracted", ext);
        char *s = o ? json_dumps(o, JSON_COMPACT | JSON_ENSURE_ASCII) : NULL;
        int bad = !s || fprintf(f, "%s\n", s) < 0;
        free(s);
        json_decref(o);
        if (bad) {
            mill_errf(e, "%s: cannot write line %d", out, i + 1);
            goto done;
        }
        sum += rew[i];
    }
    if (fclose(f)) {
        f = NULL;
        mill_errf(e, "%s: cannot write", out);
        goto done;
    }
    f = NULL;
    printf("mill reward: %d responses, mean reward %.4f (%s), %d without a final answer -> %s\n", r.n,
           r.n ? sum / r.n : 0.0, url ? url : "math verifier", none, out);
    rc = 0;
done:
    if (f) fclose(f);
    free(rew);
    rows_free(&r);
    return rc;
}

int cli_reward(int argc, char **argv) {
    mill_err e = {{0}};
    if (reward_main(argc, argv, &e) == 0) return 0;
    fprintf(stderr, "mill reward: error: %s\n", e.msg);
    return 1;
}
