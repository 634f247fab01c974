/* launch/tokenize_cli.h — `mill tokenize`: a tokenizer and a chat format, line by line.
 *   mill tokenize --tokenizer DIR --input IN.jsonl --output OUT.jsonl [--chat deepseek-v4|none]
 *                 [--thinking] [--reasoning-effort high|max] [--keep-thinking]
 * Each input line is one of
 *   {"text": "..." [, "add_special_tokens": true]}      -> {"ids": [...]}    (HF's encode)
 *   {"ids": [...] [, "skip_special_tokens": false]}     -> {"text": "..."}   (HF's decode)
 *   {"messages": [...] [, "add_generation_prompt": false, "thinking_mode": "chat"|"thinking",
 *    "reasoning_effort": "high"|"max", "drop_thinking": true]}
 *                                                      -> {"text": "...", "ids": [...]}
 * (the chat format of algos/chat.h, then encode without the post-processor: the text holds its
 * BOS). The options give the defaults of the per-line keys. Blank lines are skipped; any bad line
 * ends the command with one error "IN.jsonl:LINE: ..." and leaves no OUT behind (it is written
 * beside OUT and renamed when complete). Takes main's argc/argv; returns the exit status. */
#ifndef MILL_TOKENIZE_CLI_H
#define MILL_TOKENIZE_CLI_H

int cli_tokenize(int argc, char **argv);

#endif
