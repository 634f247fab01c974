/* algos/sft_data.h — supervised fine-tuning batches with the loss on the response only.
 * Owns: sft_batch (ids and next-token targets, malloc'd, freed by sft_batch_free).
 * Row i = [bos] + encode(arith_format_prompt(probs[i])) + encode(answer) + [eos],
 * right-padded with pad to T, the longest row. targets[b*T + t] = ids[b*T + t + 1]
 * when position t + 1 is in the response (the answer's tokens and the eos), else -1
 * (prompt, padding, the last position): the model learns to answer, not to ask. */
#ifndef MILL_SFT_DATA_H
#define MILL_SFT_DATA_H

#include <stdint.h>

#include "../common/err.h"
#include "../common/tokenizer.h"
#include "arith.h"

typedef struct {
    int32_t *ids, *targets; /* [B * T] each, row-major */
    int B, T;
    int n_target; /* targets >= 0 */
} sft_batch;

/* n >= 1 problems; a row longer than T_max is an error naming the row. On error b is
 * left empty (NULL buffers), so sft_batch_free is always safe. */
int sft_batch_make(sft_batch *b, const tokenizer *tok, const arith_problem *probs, int n, int T_max, mill_err *e);
void sft_batch_free(sft_batch *b);

#endif
