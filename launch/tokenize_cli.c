#include "tokenize_cli.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../algos/chat.h"
#include "../common/err.h"
#include "../common/tokenizer.h"

typedef struct {
    const tokenizer *tok;
    chat_format chat; /* the defaults of the per-line keys */
} tk_ctx;

/* A per-line boolean: absent or null keeps dflt. */
static int line_bool(json_t *o, const char *key, int dflt, int *out, mill_err *e) {
    json_t *v = json_object_get(o, key);
    *out = dflt;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_boolean(v)) return mill_errf(e, "\"%s\" must be true or false", key);
    *out = json_is_true(v);
    return 0;
}

static int encode(const tk_ctx *c, const char *text, size_t len, int add_special, json_t *out, mill_err *e) {
    int cap = (int)(3 * len + 16), n = 0; /* U+FFFD's three bytes per bad byte, plus the post-processor's */
    int32_t *ids = malloc(sizeof *ids * (size_t)cap);
    json_t *arr = json_array();
    int rc = !ids || !arr ? mill_errf(e, "out of memory") : tokenizer_encode_hf(c->tok, text, len, add_special, ids, cap, &n, e);
    for (int i = 0; !rc && i < n; i++)
        if (json_array_append_new(arr, json_integer(ids[i]))) rc = mill_errf(e, "out of memory");
    if (!rc && json_object_set_new(out, "ids", arr)) rc = mill_errf(e, "out of memory");
    else if (rc) json_decref(arr);
    free(ids);
    return rc;
}

static int decode(const tk_ctx *c, json_t *arr, int skip, json_t *out, mill_err *e) {
    size_t n = json_array_size(arr);
    int32_t *ids = malloc(sizeof *ids * (n ? n : 1));
    if (!ids) return mill_errf(e, "out of memory");
    int V = tokenizer_vocab_size(c->tok);
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(arr, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= V) {
            free(ids);
            return mill_errf(e, "\"ids\"[%zu] must be an integer in [0, %d)", i, V);
        }
        ids[i] = (int32_t)json_integer_value(v);
    }
    size_t cap = n * tokenizer_max_piece(c->tok) + 1;
    char *t = malloc(cap);
    int rc = !t ? mill_errf(e, "out of memory") : tokenizer_decode_hf(c->tok, ids, (int)n, skip, t, cap, e);
    if (!rc) {
        json_t *s = json_string(t);
        rc = !s || json_object_set_new(out, "text", s) ? mill_errf(e, "decoded text is not valid UTF-8") : 0;
    }
    free(t);
    free(ids);
    return rc;
}

static int chat_line(const tk_ctx *c, json_t *o, json_t *out, mill_err *e) {
    chat_format f = c->chat;
    int gen;
    json_t *tm = json_object_get(o, "thinking_mode"), *re = json_object_get(o, "reasoning_effort");
    if (line_bool(o, "add_generation_prompt", 0, &gen, e) || line_bool(o, "drop_thinking", f.drop_thinking, &f.drop_thinking, e))
        return -1;
    if (tm && !json_is_null(tm)) {
        const char *s = json_string_value(tm);
        if (!s || (strcmp(s, "chat") && strcmp(s, "thinking")))
            return mill_errf(e, "\"thinking_mode\" must be \"chat\" or \"thinking\"");
        f.thinking = !strcmp(s, "thinking");
    }
    if (re && !json_is_null(re) && (!json_is_string(re) || chat_effort_parse(json_string_value(re), &f.effort_max)))
        return mill_errf(e, "\"reasoning_effort\" must be \"high\" or \"max\"");
    if (f.kind == CHAT_NONE) return mill_errf(e, "\"messages\" needs a chat format (--chat deepseek-v4)");
    char *text;
    size_t len;
    if (chat_render(&f, json_object_get(o, "messages"), gen, &text, &len, e)) return -1;
    json_t *s = json_stringn(text, len);
    int rc = !s || json_object_set_new(out, "text", s) ? mill_errf(e, "out of memory") : encode(c, text, len, 0, out, e);
    free(text);
    return rc;
}

/* One input line (a JSON object) into out. */
static int tk_line(const tk_ctx *c, json_t *o, json_t *out, mill_err *e) {
    if (!json_is_object(o)) return mill_errf(e, "expected a JSON object with \"text\", \"ids\" or \"messages\"");
    json_t *t = json_object_get(o, "text"), *ids = json_object_get(o, "ids"), *m = json_object_get(o, "messages");
    if ((t != NULL) + (ids != NULL) + (m != NULL) != 1)
        return mill_errf(e, "expected exactly one of \"text\", \"ids\" or \"messages\"");
    int flag;
    if (t) {
        if (!json_is_string(t)) return mill_errf(e, "\"text\" must be a string");
        if (line_bool(o, "add_special_tokens", 1, &flag, e)) return -1;
        return encode(c, json_string_value(t), json_string_length(t), flag, out, e);
    }
    if (ids) {
        if (!json_is_array(ids)) return mill_errf(e, "\"ids\" must be a list of token ids");
        if (line_bool(o, "skip_special_tokens", 0, &flag, e)) return -1;
        return decode(c, ids, flag, out, e);
    }
    return chat_line(c, o, out, e);
}

static int tk_file(const tk_ctx *c, const char *in, const char *outp, mill_err *e) {
    FILE *f = fopen(in, "rb");
    if (!f) return mill_errf(e, "%s: cannot open", in);
    char tmp[4200];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", outp) >= (int)sizeof tmp) {
        fclose(f);
        return mill_errf(e, "--output %s: path too long", outp);
    }
    FILE *o = fopen(tmp, "wb");
    if (!o) {
        fclose(f);
        return mill_errf(e, "%s: cannot write", tmp);
    }
    char *line = NULL;
    size_t cap = 0;
    long no = 0, done = 0;
    int rc = 0;
    for (ssize_t len; !rc && (len = getline(&line, &cap, f)) >= 0;) {
        no++;
        if (strspn(line, " \t\r\n") == (size_t)len) continue; /* blank lines */
        json_error_t je;
        json_t *obj = json_loadb(line, (size_t)len, JSON_ALLOW_NUL, &je), *res = json_object();
        mill_err le = {{0}};
        char *s = NULL;
        if (!obj) rc = mill_errf(e, "%s:%ld: not JSON (%s)", in, no, je.text);
        else if (!res || tk_line(c, obj, res, &le)) rc = mill_errf(e, "%s:%ld: %s", in, no, res ? le.msg : "out of memory");
        else if (!(s = json_dumps(res, JSON_COMPACT)) || fprintf(o, "%s\n", s) < 0)
            rc = mill_errf(e, "%s: write failed", tmp);
        free(s);
        json_decref(obj);
        json_decref(res);
        done += !rc;
    }
    free(line);
    fclose(f);
    if (fclose(o) != 0 && !rc) rc = mill_errf(e, "%s: write failed", tmp);
    if (!rc && rename(tmp, outp) != 0) rc = mill_errf(e, "%s: cannot rename to %s", tmp, outp);
    if (rc) remove(tmp);
    else printf("tokenize: %ld lines -> %s\n", done, outp);
    return rc;
}

static int tk_main(int argc, char **argv, mill_err *e) {
    const char *dir = NULL, *in = NULL, *out = NULL, *chat = "deepseek-v4", *effort = "";
    int thinking = 0, keep = 0;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--thinking")) thinking = 1;
        else if (!strcmp(a, "--keep-thinking")) keep = 1;
        else if (!strcmp(a, "--tokenizer") || !strcmp(a, "--input") || !strcmp(a, "--output") || !strcmp(a, "--chat") ||
                 !strcmp(a, "--reasoning-effort")) {
            if (i + 1 >= argc) return mill_errf(e, "option %s needs a value", a);
            const char *v = argv[++i];
            if (!strcmp(a, "--tokenizer")) dir = v;
            else if (!strcmp(a, "--input")) in = v;
            else if (!strcmp(a, "--output")) out = v;
            else if (!strcmp(a, "--chat")) chat = v;
            else effort = v;
        } else {
            return mill_errf(e, "unknown option \"%s\"", a);
        }
    }
    if (!dir || !in || !out) return mill_errf(e, "mill tokenize needs --tokenizer DIR --input IN.jsonl --output OUT.jsonl");
    tk_ctx c;
    chat_format_default(&c.chat);
    if (chat_kind_parse(chat, &c.chat.kind)) return mill_errf(e, "--chat must be deepseek-v4 or none, got \"%s\"", chat);
    if (chat_effort_parse(effort, &c.chat.effort_max))
        return mill_errf(e, "--reasoning-effort must be high or max, got \"%s\"", effort);
    c.chat.thinking = thinking;
    c.chat.drop_thinking = !keep;
    tokenizer *t;
    if (tokenizer_load(&t, dir, e)) return -1;
    c.tok = t;
    int rc = tk_file(&c, in, out, e);
    tokenizer_free(t);
    return rc;
}

int cli_tokenize(int argc, char **argv) {
    mill_err e = {{0}};
    if (tk_main(argc, argv, &e) == 0) return 0;
    fprintf(stderr, "mill tokenize: error: %s\n", e.msg);
    return 1;
}
