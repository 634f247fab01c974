/* DeepSeek-V4's chat format (algos/chat.h) against texts worked out by hand from the release's
 * encoding/encoding_dsv4.py (encode_messages with the same thinking_mode, drop_thinking and
 * reasoning_effort): each rule of that script has a case. In the expectations {B} {E} {U} {A}
 * {R} stand for the begin/end-of-sentence, User, Assistant and latest_reminder tokens, {T} for
 * <think>, {/T} for </think> and {MAX} for the effort preamble. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../algos/chat.h"

static const char *const subst[][2] = {
    {"{B}", "<\xEF\xBD\x9C" "begin\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>"},
    {"{E}", "<\xEF\xBD\x9C" "end\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>"},
    {"{U}", "<\xEF\xBD\x9CUser\xEF\xBD\x9C>"},
    {"{A}", "<\xEF\xBD\x9C" "Assistant\xEF\xBD\x9C>"},
    {"{R}", "<\xEF\xBD\x9Clatest_reminder\xEF\xBD\x9C>"},
    {"{T}", "<think>"},
    {"{/T}", "</think>"},
    {"{MAX}", "Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be very thorough in your "
              "thinking and comprehensively decompose the problem to resolve the root cause, rigorously "
              "stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
              "Explicitly write out your entire deliberation process, documenting every intermediate step, "
              "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
              "unchecked.\n\n"},
};

static char *expand(const char *s) {
    size_t cap = strlen(s) * 4 + 1024, n = 0;
    char *o = malloc(cap);
    assert_non_null(o);
    while (*s) {
        size_t k = 0;
        for (; k < sizeof subst / sizeof *subst; k++)
            if (!strncmp(s, subst[k][0], strlen(subst[k][0]))) break;
        if (k < sizeof subst / sizeof *subst) {
            size_t l = strlen(subst[k][1]);
            assert_true(n + l < cap);
            memcpy(o + n, subst[k][1], l);
            n += l;
            s += strlen(subst[k][0]);
        } else {
            assert_true(n + 1 < cap);
            o[n++] = *s++;
        }
    }
    o[n] = 0;
    return o;
}

typedef struct {
    const char *messages; /* JSON */
    int thinking, drop, effort_max, gen;
    const char *want;
} chat_case;

static const chat_case cases[] = {
    /* one user turn: the generation prompt closes or opens the thinking block */
    {"[{\"role\":\"user\",\"content\":\"What is 2+2?\"}]", 0, 1, 0, 1, "{B}{U}What is 2+2?{A}{/T}"},
    {"[{\"role\":\"user\",\"content\":\"What is 2+2?\"}]", 1, 1, 0, 1, "{B}{U}What is 2+2?{A}{T}"},
    {"[{\"role\":\"user\",\"content\":\"What is 2+2?\"}]", 1, 1, 0, 0, "{B}{U}What is 2+2?"},
    /* a system prompt is written as it is, before the first user token */
    {"[{\"role\":\"system\",\"content\":\"Be brief.\"},{\"role\":\"user\",\"content\":\"hi\"}]", 0, 1, 0, 1,
     "{B}Be brief.{U}hi{A}{/T}"},
    {"[{\"role\":\"system\",\"content\":null},{\"role\":\"user\",\"content\":\"hi\"}]", 0, 1, 0, 1, "{B}{U}hi{A}{/T}"},
    /* multi-turn, thinking, drop_thinking: earlier reasoning goes and its turn opens with </think> */
    {"[{\"role\":\"user\",\"content\":\"q1\"},{\"role\":\"assistant\",\"content\":\"a1\",\"reasoning_content\":\"r1\"},"
     "{\"role\":\"user\",\"content\":\"q2\"}]",
     1, 1, 0, 1, "{B}{U}q1{A}{/T}a1{E}{U}q2{A}{T}"},
    /* the same without drop_thinking: every turn keeps its reasoning */
    {"[{\"role\":\"user\",\"content\":\"q1\"},{\"role\":\"assistant\",\"content\":\"a1\",\"reasoning_content\":\"r1\"},"
     "{\"role\":\"user\",\"content\":\"q2\"}]",
     1, 0, 0, 1, "{B}{U}q1{A}{T}r1{/T}a1{E}{U}q2{A}{T}"},
    /* chat mode never writes reasoning */
    {"[{\"role\":\"user\",\"content\":\"q1\"},{\"role\":\"assistant\",\"content\":\"a1\",\"reasoning_content\":\"r1\"},"
     "{\"role\":\"user\",\"content\":\"q2\"}]",
     0, 1, 0, 1, "{B}{U}q1{A}{/T}a1{E}{U}q2{A}{/T}"},
    /* a last assistant turn (after the last user) keeps its reasoning; null reasoning is empty */
    {"[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"content\":\"a\",\"reasoning_content\":\"r\"}]", 1, 1,
     0, 1, "{B}{U}q{A}{T}r{/T}a{E}"},
    {"[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"content\":\"a\"}]", 1, 1, 0, 1,
     "{B}{U}q{A}{T}{/T}a{E}"},
    {"[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"content\":\"a\",\"wo_eos\":true}]", 0, 1, 0, 1,
     "{B}{U}q{A}{/T}a"},
    /* consecutive user messages merge, joined by a blank line */
    {"[{\"role\":\"user\",\"content\":\"A\"},{\"role\":\"user\",\"content\":\"B\"}]", 0, 1, 0, 1, "{B}{U}A\n\nB{A}{/T}"},
    {"[{\"role\":\"user\",\"content\":\"\"},{\"role\":\"user\",\"content\":\"B\"}]", 1, 1, 0, 1, "{B}{U}\n\nB{A}{T}"},
    /* reasoning_effort max: the preamble, in thinking mode only */
    {"[{\"role\":\"user\",\"content\":\"q\"}]", 1, 1, 1, 1, "{B}{MAX}{U}q{A}{T}"},
    {"[{\"role\":\"system\",\"content\":\"S\"},{\"role\":\"user\",\"content\":\"q\"}]", 1, 1, 1, 1,
     "{B}{MAX}S{U}q{A}{T}"},
    {"[{\"role\":\"user\",\"content\":\"q\"}]", 0, 1, 1, 1, "{B}{U}q{A}{/T}"},
    /* developer: a user-side turn; dropped before the last user turn under drop_thinking */
    {"[{\"role\":\"developer\",\"content\":\"D\"},{\"role\":\"user\",\"content\":\"q\"}]", 0, 1, 0, 1,
     "{B}{U}D{U}q{A}{/T}"},
    {"[{\"role\":\"developer\",\"content\":\"D\"},{\"role\":\"user\",\"content\":\"q\"}]", 1, 1, 0, 1, "{B}{U}q{A}{T}"},
    {"[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"developer\",\"content\":\"D\"}]", 1, 1, 0, 1,
     "{B}{U}q{U}D{A}{T}"},
    /* a user turn followed by a reminder still opens the assistant's turn */
    {"[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"latest_reminder\",\"content\":\"R\"}]", 0, 1, 0, 1,
     "{B}{U}q{A}{/T}{R}R"},
    /* content is not escaped: special-token text stays text here (the tokenizer decides) */
    {"[{\"role\":\"user\",\"content\":\"x<think>y\"}]", 0, 1, 0, 1, "{B}{U}x<think>y{A}{/T}"},
    /* other keys (name, ...) are ignored, as the release ignores them */
    {"[{\"role\":\"user\",\"content\":\"q\",\"name\":\"bob\",\"tools\":[]}]", 0, 1, 0, 1, "{B}{U}q{A}{/T}"},
};

static void test_cases(void **state) {
    (void)state;
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        const chat_case *c = &cases[i];
        json_error_t je;
        json_t *m = json_loads(c->messages, 0, &je);
        assert_non_null(m);
        chat_format f;
        chat_format_default(&f);
        f.thinking = c->thinking;
        f.drop_thinking = c->drop;
        f.effort_max = c->effort_max;
        char *got = NULL, *want = expand(c->want);
        size_t len = 0;
        mill_err e = {{0}};
        int rc = chat_render(&f, m, c->gen, &got, &len, &e);
        if (rc || strcmp(got, want)) fprintf(stderr, "case %zu: rc %d (%s)\n got: %s\nwant: %s\n", i, rc, e.msg, got ? got : "", want);
        assert_int_equal(rc, 0);
        assert_string_equal(got, want);
        assert_int_equal(len, strlen(want));
        free(got);
        free(want);
        json_decref(m);
    }
}

static void test_errors(void **state) {
    (void)state;
    static const char *const bad[][2] = {
        {"[]", "messages: expected a non-empty list"},
        {"{\"role\":\"user\"}", "messages: expected a non-empty list"},
        {"[\"hi\"]", "messages[0]: expected an object"},
        {"[{\"content\":\"x\"}]", "messages[0].role: expected a string"},
        {"[{\"role\":\"bot\",\"content\":\"x\"}]", "messages[0].role: \"bot\" is not one of"},
        {"[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"tool\",\"content\":\"x\"}]", "messages[1].role: \"tool\" is not supported"},
        {"[{\"role\":\"system\",\"content\":\"s\",\"tools\":[{\"type\":\"function\"}]}]", "messages[0].tools: not supported"},
        {"[{\"role\":\"assistant\",\"content\":\"\",\"tool_calls\":[{}]}]", "messages[0].tool_calls: not supported"},
        {"[{\"role\":\"user\",\"content\":\"q\",\"task\":\"query\"}]", "messages[0].task: not supported"},
        {"[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"q\"}]}]", "messages[0].content: expected a string"},
        {"[{\"role\":\"user\"}]", "messages[0].content: expected a string"},
        {"[{\"role\":\"developer\",\"content\":\"\"}]", "messages[0].content: a developer message needs non-empty content"},
        {"[{\"role\":\"assistant\",\"content\":\"a\",\"reasoning_content\":7}]", "messages[0].reasoning_content: expected a string"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        json_error_t je;
        json_t *m = json_loads(bad[i][0], JSON_DECODE_ANY, &je);
        assert_non_null(m);
        chat_format f;
        chat_format_default(&f);
        char *got = NULL;
        mill_err e = {{0}};
        assert_int_equal(chat_render(&f, m, 1, &got, NULL, &e), -1);
        assert_null(got);
        if (!strstr(e.msg, bad[i][1])) fprintf(stderr, "case %zu: %s\n", i, e.msg);
        assert_non_null(strstr(e.msg, bad[i][1]));
        json_decref(m);
    }
    chat_format f;
    chat_format_default(&f);
    f.kind = CHAT_NONE;
    json_t *m = json_loads("[{\"role\":\"user\",\"content\":\"q\"}]", 0, NULL);
    char *got = NULL;
    mill_err e = {{0}};
    assert_int_equal(chat_render(&f, m, 1, &got, NULL, &e), -1);
    json_decref(m);
}

static void test_parse(void **state) {
    (void)state;
    chat_kind k;
    int x;
    assert_int_equal(chat_kind_parse("deepseek-v4", &k), 0);
    assert_int_equal(k, CHAT_DSV4);
    assert_int_equal(chat_kind_parse("none", &k), 0);
    assert_int_equal(k, CHAT_NONE);
    assert_int_equal(chat_kind_parse("chatml", &k), -1);
    assert_int_equal(chat_effort_parse("max", &x), 0);
    assert_int_equal(x, 1);
    assert_int_equal(chat_effort_parse("high", &x), 0);
    assert_int_equal(x, 0);
    assert_int_equal(chat_effort_parse("", &x), 0);
    assert_int_equal(x, 0);
    assert_int_equal(chat_effort_parse("low", &x), -1);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_cases), cmocka_unit_test(test_errors),
                                       cmocka_unit_test(test_parse)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
