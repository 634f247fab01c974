/* algos/dataset.h — prompt datasets for GRPO: rows of {prompt, label, id}.
 * Owns: loading rows from JSONL files (dapo-math-17k layout) or from the built-in
 * arithmetic generator, the prompt template, and the deterministic order in which a
 * run draws rows (a per-epoch permutation addressed by a cursor the ledger saves).
 *
 * JSONL: one JSON object a line. The prompt and label are found at keys that may be
 * dotted paths ("prompt", "extra.question", "reward_model.ground_truth"); dots always
 * separate levels (a key that itself holds a dot cannot be named).
 *   prompt: a string, or a chat-message list [{"role": "...", "content": "..."}, ...].
 *           Without a chat format (below), a list renders as the messages' contents in
 *           order, joined by "\n\n", roles dropped (a dapo-math row's single user
 *           message thus renders as its content).
 *           A prompt that is empty or only whitespace is a bad row.
 *   label:  a string (non-empty) or a number; numbers render as the shortest decimal
 *           text that reads back as the same value (34 -> "34", 0.5 -> "0.5",
 *           34.0 -> "34").
 * Blank lines (only whitespace) are skipped. A bad row (not JSON — invalid UTF-8
 * included, as jansson rejects it —, not an object, key missing, wrong type, empty
 * prompt, a line over DATASET_MAX_LINE bytes) fails the load with
 * "FILE:LINE: what was wrong; expected ...", or with skip_bad is counted and skipped
 * (the first DATASET_SKIP_REASONS messages are kept for a warning). Zero usable rows
 * is an error naming the file.
 *
 * Template: every "{prompt}" in it is replaced by the row's prompt; nothing else is
 * special (other braces are literal, there is no escape). A template without
 * "{prompt}" is an error. Defaults: "{prompt}" for JSONL; for the arithmetic source
 * "Q: {prompt}\nA: ", which reproduces arith_format_prompt exactly.
 *
 * Chat: with a chat format (chat.h) a prompt is a list of messages (a string is one user
 * message); the template is applied to the last user message's content, and the row's prompt
 * is the rendered text (special-token text included: BOS, the user and assistant markers), which
 * dataset_format then returns as it is. A list the format refuses is a bad row naming the
 * message ("prompt \"prompt\": messages[1].role: ...").
 *
 * Order: dataset_row_at(d, seed, cursor) with cursor = rows drawn since the run began:
 * epoch = cursor / n, position = cursor % n, row = perm_epoch[position], where
 * perm_epoch is a Fisher-Yates shuffle of 0..n-1 driven by common/rng.h seeded from
 * (seed, epoch). The same seed and cursor give the same row on every machine.
 * The current epoch's permutation is cached in the dataset, so dataset_row_at is not
 * safe to call on one dataset from two threads at once. */
#ifndef MILL_DATASET_H
#define MILL_DATASET_H

#include <stddef.h>
#include <stdint.h>

#include "../common/err.h"
#include "chat.h"

enum {
    DATASET_MAX_LINE = 1 << 20, /* bytes in one JSONL line, newline excluded */
    DATASET_SKIP_REASONS = 3,   /* skipped-row messages kept for the warning line */
};

typedef struct {
    const char *prompt; /* rendered text, owned by the dataset */
    const char *label;  /* the reference answer */
    long id;            /* 0-based index of the row in the source (among usable rows) */
    long line;          /* 1-based line in the JSONL file; 0 for the arithmetic source */
    int level;          /* arithmetic difficulty 1..4; 0 for JSONL */
} dataset_row;

typedef struct dataset dataset;

typedef struct {
    const char *path;
    const char *prompt_key;      /* dotted path; NULL means "prompt" */
    const char *label_key;       /* dotted path; NULL means "label" */
    const char *prompt_template; /* NULL means "{prompt}" */
    int skip_bad;                /* 1: count and skip bad rows instead of failing */
    long max_rows;               /* stop after this many usable rows; 0 = all */
    const chat_format *chat;     /* NULL or kind CHAT_NONE: plain prompts (above); else see Chat */
} dataset_jsonl_config;

int dataset_open_jsonl(dataset **out, const dataset_jsonl_config *c, mill_err *e);

/* n training-split problems (arith_draw with heldout 0) from one rng seeded by seed;
 * row i has level levels[i % n_levels] (each in 1..4). Labels are the answers.
 * prompt_template NULL means "Q: {prompt}\nA: ". */
int dataset_arith(dataset **out, const int *levels, int n_levels, long n, uint64_t seed,
                  const char *prompt_template, mill_err *e);

long dataset_size(const dataset *d);
/* Bad rows skipped under skip_bad, and the i-th kept message (NULL past the last). */
long dataset_skipped(const dataset *d);
const char *dataset_skip_reason(const dataset *d, int i);

/* Row i in source order (0 <= i < size), for evaluation passes; NULL otherwise. */
const dataset_row *dataset_row_get(const dataset *d, long i);

/* The row drawn at cursor (see Order above); NULL when d is NULL or cursor < 0.
 * The pointer stays valid until dataset_free. */
const dataset_row *dataset_row_at(dataset *d, uint64_t seed, long cursor);

/* The model's input for r: the template with the prompt substituted. -1 when it does
 * not fit in cap (out then holds "" when cap > 0). */
int dataset_format(const dataset *d, const dataset_row *r, char *out, size_t cap, mill_err *e);

void dataset_free(dataset *d);

#endif
