/* tests/fuzz/fuzz_chat.c — fuzz target for the chat format (algos/chat.c): chat_render on any
 * JSON (a message list, or anything else a dataset row or a `mill tokenize` line may hold).
 * Input: JSON text, read with JSON_ALLOW_NUL as `mill tokenize` reads its lines (so contents may
 * hold NUL bytes). Each input renders under four formats (chat mode; thinking with drop_thinking;
 * thinking without it and with reasoning_effort max; chat mode without drop) and both values of
 * add_generation_prompt; the parse helpers see the strings a recipe or command line might pass.
 * A render that succeeds starts with BOS and is NUL-terminated at *len; one that fails says why
 * and leaves *out NULL; the plain format (CHAT_NONE) always refuses. */
#include <jansson.h>

#include "algos/chat.h"
#include "fuzz_common.h"

#define DSV4_BOS_TEXT "<\xef\xbd\x9c" "begin\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    json_t *m = json_loadb((const char *)data, size, JSON_ALLOW_NUL | JSON_DECODE_ANY, NULL);
    if (!m) return 0;
    chat_format f[4];
    for (int i = 0; i < 4; i++) chat_format_default(&f[i]);
    f[1].thinking = 1;
    f[2].thinking = 1, f[2].drop_thinking = 0, f[2].effort_max = 1;
    f[3].drop_thinking = 0;
    for (int i = 0; i < 4; i++)
        for (int gen = 0; gen < 2; gen++) {
            char *out = (char *)&out; /* must be cleared on failure */
            size_t len = 12345;
            mill_err e;
            e.msg[0] = 0;
            int rc = chat_render(&f[i], m, gen, &out, &len, &e);
            FUZZ_CHECK(rc == 0 || rc == -1);
            if (rc == 0) {
                FUZZ_CHECK(out != NULL && out[len] == 0 && strlen(out) <= len);
                FUZZ_CHECK(len >= sizeof DSV4_BOS_TEXT - 1 && memcmp(out, DSV4_BOS_TEXT, sizeof DSV4_BOS_TEXT - 1) == 0);
                free(out);
            } else {
                FUZZ_CHECK(out == NULL && e.msg[0] != 0);
                fuzz_refused("chat_render", e.msg);
            }
        }
    chat_format none;
    chat_format_default(&none);
    none.kind = CHAT_NONE;
    char *out;
    mill_err e;
    FUZZ_CHECK(chat_render(&none, m, 1, &out, NULL, &e) == -1 && out == NULL);
    /* the name parsers, on the strings the input holds */
    const char *s = json_string_value(json_is_array(m) ? json_array_get(m, 0) : m);
    if (s) {
        chat_kind k;
        int em = 0;
        if (chat_kind_parse(s, &k) == 0) FUZZ_CHECK(k == CHAT_NONE || k == CHAT_DSV4);
        if (chat_effort_parse(s, &em) == 0) FUZZ_CHECK(em == 0 || em == 1);
    }
    json_decref(m);
    return 0;
}
