/* algos/chat.c — DeepSeek-V4's chat format (see chat.h for the contract). */
#include "chat.h"

#include <stdlib.h>
#include <string.h>

/* The release's special-token texts (tokenizer.json's added tokens). */
#define DSV4_BOS "<\xEF\xBD\x9C" "begin\xE2\x96\x81" "of\xE2\x96\x81" "sentence\xEF\xBD\x9C>"
#define DSV4_EOS "<\xEF\xBD\x9C" "end\xE2\x96\x81" "of\xE2\x96\x81" "sentence\xEF\xBD\x9C>"
#define DSV4_USER "<\xEF\xBD\x9CUser\xEF\xBD\x9C>"
#define DSV4_ASSISTANT "<\xEF\xBD\x9C" "Assistant\xEF\xBD\x9C>"
#define DSV4_REMINDER "<\xEF\xBD\x9Clatest_reminder\xEF\xBD\x9C>"
#define DSV4_THINK "<think>"
#define DSV4_THINK_END "</think>"
/* encoding_dsv4.py's REASONING_EFFORT_MAX, put before the first message */
static const char dsv4_effort_max[] =
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, "
    "rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n";

typedef enum { R_SYSTEM, R_USER, R_DEVELOPER, R_ASSISTANT, R_REMINDER } chat_role;

typedef struct {
    chat_role role;
    const char *content; /* user: NULL when merged (parts below) */
    size_t content_len;
    const char *reasoning;
    size_t reasoning_len;
    int wo_eos;
    int first, n_parts; /* user: its merged messages, [first, first + n_parts) of the input */
} chat_msg;

typedef struct {
    char *p;
    size_t n, cap;
    int oom;
} chat_buf;

static void put(chat_buf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

static void puts_(chat_buf *b, const char *s) { put(b, s, strlen(s)); }

void chat_format_default(chat_format *f) {
    memset(f, 0, sizeof *f);
    f->kind = CHAT_DSV4;
    f->drop_thinking = 1;
}

int chat_kind_parse(const char *name, chat_kind *out) {
    if (!strcmp(name, "none")) *out = CHAT_NONE;
    else if (!strcmp(name, "deepseek-v4")) *out = CHAT_DSV4;
    else return -1;
    return 0;
}

int chat_effort_parse(const char *name, int *effort_max) {
    if (!*name || !strcmp(name, "none") || !strcmp(name, "high")) *effort_max = 0;
    else if (!strcmp(name, "max")) *effort_max = 1;
    else return -1;
    return 0;
}

/* A string field: 0 with *s (NULL when absent or null), -1 with an error otherwise. */
static int str_field(const json_t *m, const char *key, size_t i, const char **s, size_t *n, mill_err *e) {
    json_t *v = json_object_get(m, key);
    *s = NULL;
    *n = 0;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_string(v)) return mill_errf(e, "messages[%zu].%s: expected a string", i, key);
    *s = json_string_value(v);
    *n = json_string_length(v);
    return 0;
}

/* Python truthiness of a field the release acts on when set. */
static int truthy(const json_t *v) {
    if (!v || json_is_null(v) || json_is_false(v)) return 0;
    if (json_is_array(v)) return json_array_size(v) > 0;
    if (json_is_object(v)) return json_object_size(v) > 0;
    if (json_is_string(v)) return json_string_length(v) > 0;
    return 1;
}

/* Reads and checks one message; consecutive user messages merge into the previous one as
 * merge_tool_messages does. */
static int read_msg(const json_t *m, size_t i, chat_msg *list, int *n, mill_err *e) {
    if (!json_is_object(m)) return mill_errf(e, "messages[%zu]: expected an object {\"role\": ..., \"content\": ...}", i);
    static const char *const unsupported[] = {"tools", "tool_calls", "response_format", "content_blocks"};
    for (size_t k = 0; k < sizeof unsupported / sizeof *unsupported; k++)
        if (truthy(json_object_get(m, unsupported[k])))
            return mill_errf(e, "messages[%zu].%s: not supported by mill's chat format (plain turns only)", i,
                             unsupported[k]);
    json_t *task = json_object_get(m, "task");
    if (task && !json_is_null(task))
        return mill_errf(e, "messages[%zu].task: not supported by mill's chat format (plain turns only)", i);
    const char *role = json_string_value(json_object_get(m, "role"));
    if (!role) return mill_errf(e, "messages[%zu].role: expected a string (system, user, developer, assistant)", i);
    chat_msg c = {0};
    if (!strcmp(role, "system")) c.role = R_SYSTEM;
    else if (!strcmp(role, "user")) c.role = R_USER;
    else if (!strcmp(role, "developer")) c.role = R_DEVELOPER;
    else if (!strcmp(role, "assistant")) c.role = R_ASSISTANT;
    else if (!strcmp(role, "latest_reminder")) c.role = R_REMINDER;
    else if (!strcmp(role, "tool"))
        return mill_errf(e, "messages[%zu].role: \"tool\" is not supported by mill's chat format (plain turns only)", i);
    else
        return mill_errf(e, "messages[%zu].role: \"%s\" is not one of system, user, developer, assistant, latest_reminder",
                         i, role);
    if (str_field(m, "content", i, &c.content, &c.content_len, e)) return -1;
    if (c.role == R_ASSISTANT && str_field(m, "reasoning_content", i, &c.reasoning, &c.reasoning_len, e)) return -1;
    json_t *wo = json_object_get(m, "wo_eos");
    c.wo_eos = c.role == R_ASSISTANT && json_is_true(wo);
    /* what the release cannot render: a null user text, an empty developer message, a null reminder */
    if (!c.content && (c.role == R_USER || c.role == R_REMINDER))
        return mill_errf(e, "messages[%zu].content: expected a string", i);
    if (c.role == R_DEVELOPER && !c.content_len)
        return mill_errf(e, "messages[%zu].content: a developer message needs non-empty content", i);
    if (c.role == R_USER) {
        if (*n > 0 && list[*n - 1].role == R_USER) {
            list[*n - 1].n_parts++;
            return 0;
        }
        c.first = (int)i;
        c.n_parts = 1;
    }
    list[(*n)++] = c;
    return 0;
}

static int last_user(const chat_msg *l, int n) {
    for (int i = n - 1; i >= 0; i--)
        if (l[i].role == R_USER || l[i].role == R_DEVELOPER) return i;
    return -1;
}

int chat_render(const chat_format *f, const json_t *messages, int add_generation_prompt, char **out, size_t *len,
                mill_err *e) {
    *out = NULL;
    if (len) *len = 0;
    if (f->kind != CHAT_DSV4) return mill_errf(e, "chat: no chat format chosen");
    if (!json_is_array(messages) || !json_array_size(messages))
        return mill_errf(e, "messages: expected a non-empty list of {\"role\": ..., \"content\": ...}");
    size_t cnt = json_array_size(messages);
    chat_msg *l = calloc(cnt, sizeof *l);
    if (!l) return mill_errf(e, "chat: out of memory");
    int n = 0;
    for (size_t i = 0; i < cnt; i++)
        if (read_msg(json_array_get(messages, i), i, l, &n, e)) {
            free(l);
            return -1;
        }
    const int drop = f->drop_thinking;
    if (f->thinking && drop) { /* _drop_thinking_messages: earlier reasoning and developer turns go */
        int lu = last_user(l, n), k = 0;
        for (int i = 0; i < n; i++) {
            if (i < lu && l[i].role == R_DEVELOPER) continue;
            if (i < lu && l[i].role == R_ASSISTANT) l[i].reasoning = NULL, l[i].reasoning_len = 0;
            l[k++] = l[i];
        }
        n = k;
    }
    const int lu = last_user(l, n);
    chat_buf b = {0};
    puts_(&b, DSV4_BOS);
    for (int i = 0; i < n; i++) {
        const chat_msg *m = &l[i];
        if (i == 0 && f->thinking && f->effort_max) puts_(&b, dsv4_effort_max);
        switch (m->role) {
        case R_SYSTEM: put(&b, m->content ? m->content : "", m->content_len); break;
        case R_DEVELOPER:
            puts_(&b, DSV4_USER);
            put(&b, m->content, m->content_len);
            break;
        case R_USER:
            puts_(&b, DSV4_USER);
            for (int p = 0; p < m->n_parts; p++) {
                json_t *c = json_object_get(json_array_get(messages, (size_t)(m->first + p)), "content");
                if (p) puts_(&b, "\n\n");
                put(&b, json_string_value(c), json_string_length(c));
            }
            break;
        case R_REMINDER:
            puts_(&b, DSV4_REMINDER);
            put(&b, m->content, m->content_len);
            break;
        case R_ASSISTANT:
            if (f->thinking && (!drop || i > lu)) {
                put(&b, m->reasoning ? m->reasoning : "", m->reasoning_len);
                puts_(&b, DSV4_THINK_END);
            }
            put(&b, m->content ? m->content : "", m->content_len);
            if (!m->wo_eos) puts_(&b, DSV4_EOS);
            break;
        }
        /* the opening of the assistant's turn, unless a user-side message follows */
        if (i + 1 < n && l[i + 1].role != R_ASSISTANT && l[i + 1].role != R_REMINDER) continue;
        if (m->role != R_USER && m->role != R_DEVELOPER) continue;
        if (i == n - 1 && !add_generation_prompt) continue;
        puts_(&b, DSV4_ASSISTANT);
        puts_(&b, f->thinking && (!drop || i >= lu) ? DSV4_THINK : DSV4_THINK_END);
    }
    free(l);
    if (b.oom || !b.p) {
        free(b.p);
        return mill_errf(e, "chat: out of memory");
    }
    *out = b.p;
    if (len) *len = b.n;
    return 0;
}
