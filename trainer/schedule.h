/* trainer/schedule.h — pipeline schedules: which micro-batch each pipeline rank runs when, and
 * which boundary transfers go out together.
 * Owns: the op order of Megatron's 1F1B and its interleaved variant (several model chunks per rank,
 * virtual stage s = chunk * pp + rank), the rule that groups transfers into batches, and each op's
 * peers. Pure functions: tests/test_schedule.c runs every rank's batches against each other and
 * checks they neither deadlock nor mismatch. */
#ifndef MILL_SCHEDULE_H
#define MILL_SCHEDULE_H

typedef struct {
    int micro, chunk, backward;
    int steady; /* a steady-state forward: its backward partner runs before the next batch */
} pipe_op;

/* The ops of rank r of pp (vpp chunks each) over n_micro micro-batches into order (2 x n_micro x
 * vpp entries; backward 0: the n_micro x vpp forwards only, in the same forward order). Warm-up
 * forwards (pp - r - 1; interleaved (pp - r - 1) x 2 + (vpp - 1) x pp), then one forward and one
 * backward, then the cool-down backwards. Forward k runs chunk (k / pp) mod vpp of micro-batch
 * (k / (pp vpp)) pp + k mod pp (the last group of fewer than pp micro-batches likewise); backward
 * k the same micro-batch and chunk vpp - 1 - (k / pp) mod vpp. Returns the count,
 * or -1 when vpp > 1 and pp does not divide n_micro (Megatron's rule for the interleaved 1F1B;
 * forwards only take any count). */
int pipe_schedule(int pp, int vpp, int r, int n_micro, int backward, pipe_op *order);

/* The peer rank an op receives its input from and sends its output to (-1: none): forwards from
 * r - 1 and to r + 1, backwards the other way, modulo pp (interleaved chunks wrap from the last
 * rank to the first); the first virtual stage's forward receives nothing, the last's sends nothing
 * (and the reverse for backwards). */
int pipe_recv_peer(int pp, int vpp, int r, const pipe_op *op);
int pipe_send_peer(int pp, int vpp, int r, const pipe_op *op);

/* Batching (Megatron's): after op j (j = -1: before the first) a batch goes out with the sends of
 * the ops since the last batch, then receives (*rf a forward's input, *rb a backward's gradient,
 * op indices, else -1). 1F1B: after every op, with op j + 1's receive (a forward's output leaves
 * before its backward partner runs). Interleaved: not after a steady forward; the receive of the
 * next forward's input not yet asked for, then that of the next backward's gradient once it is due
 * (op j + 1, or j + 2 after a steady forward). Returns whether a batch goes out. */
typedef struct {
    int interleaved;    /* set by the caller: vpp > 1 */
    int next_f, next_b; /* the first op indices not yet asked for (start at 0) */
} pipe_plan;
int pipe_batch(const pipe_op *order, int n, int j, pipe_plan *st, int *rf, int *rb);

#endif
