/* algos/chat.h — chat formats: a list of messages -> the text a model is prompted with.
 * Owns: DeepSeek-V4's format, exactly as the release's encoding/encoding_dsv4.py (encode_messages)
 * writes it, for the turns RL prompts use:
 *   <｜begin▁of▁sentence｜>  then per message
 *   system          its content
 *   user            <｜User｜>content        (consecutive user messages merge, joined by "\n\n")
 *   developer       <｜User｜>content        (non-empty content)
 *   latest_reminder <｜latest_reminder｜>content
 *   assistant       [reasoning</think>]content<｜end▁of▁sentence｜>
 * and after a user/developer message that is last or followed by an assistant/latest_reminder,
 * the opening <｜Assistant｜> plus "<think>" (thinking mode, at or after the last user turn) or
 * "</think>" (chat mode, or an earlier turn). In thinking mode with drop_thinking (the release's
 * default) the reasoning of assistant turns before the last user turn is dropped, and developer
 * messages before it too; reasoning_effort "max" puts the release's effort preamble before the
 * first message. add_generation_prompt 0 leaves out the final opening after a last user turn
 * (the text then ends with the user's content, as HF's add_generation_prompt=False does).
 * Not supported (an error naming the message and field): tools, tool_calls, tool messages,
 * response_format, task, content blocks. Nothing is escaped: content holding special-token text
 * is tokenized as those tokens, as the release's pipeline (encode_messages, then encode) does. */
#ifndef MILL_CHAT_H
#define MILL_CHAT_H

#include <jansson.h>
#include <stddef.h>

#include "../common/err.h"

typedef enum { CHAT_NONE = 0, CHAT_DSV4 } chat_kind;

typedef struct {
    chat_kind kind;
    int thinking;      /* thinking_mode "thinking" (1) or "chat" (0) */
    int drop_thinking; /* the release's drop_thinking (default 1) */
    int effort_max;    /* reasoning_effort "max" (thinking mode only; "high" and none add nothing) */
} chat_format;

/* kind deepseek-v4, chat mode, drop_thinking on, no effort preamble */
void chat_format_default(chat_format *f);
/* "none" or "deepseek-v4"; -1 for anything else */
int chat_kind_parse(const char *name, chat_kind *out);
/* "" / "none" / "high" (no preamble) or "max"; -1 for anything else */
int chat_effort_parse(const char *name, int *effort_max);

/* Renders messages (a JSON array of objects with "role", "content" and, for assistants,
 * "reasoning_content") into *out (malloc'd, NUL-terminated, *len bytes). kind CHAT_NONE is an
 * error (callers keep their own plain path). Errors name "messages[i].field". */
int chat_render(const chat_format *f, const json_t *messages, int add_generation_prompt, char **out, size_t *len,
                mill_err *e);

#endif
