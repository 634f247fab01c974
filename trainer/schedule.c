#include "schedule.h"

/* Forward k: the micro-batches in groups of pp (the last group takes the rest), each group through
 * chunk 0, then chunk 1, ... (Megatron's schedule table). */
static pipe_op fwd_op(int pp, int vpp, int n_micro, int k) {
    int g0 = k / (pp * vpp) * pp, size = n_micro - g0 < pp ? n_micro - g0 : pp, i = k - g0 * vpp;
    return (pipe_op){g0 + i % size, i / size, 0, 0};
}

int pipe_schedule(int pp, int vpp, int r, int n_micro, int backward, pipe_op *order) {
    if (vpp > 1 && n_micro % pp && backward) return -1;
    int total = n_micro * vpp, n = 0;
    if (!backward) {
        for (int k = 0; k < total; k++) order[n++] = fwd_op(pp, vpp, n_micro, k);
        return n;
    }
    int warm = vpp > 1 ? (pp - r - 1) * 2 + (vpp - 1) * pp : pp - r - 1, f = 0, b = 0;
    if (warm > total) warm = total;
    while (f < total || b < total) {
        if (f < total && (f < warm || f - warm <= b)) { /* warm-up, or the forward of a steady pair */
            order[n] = fwd_op(pp, vpp, n_micro, f);
            order[n++].steady = f++ >= warm;
        } else {
            pipe_op op = fwd_op(pp, vpp, n_micro, b++);
            op.chunk = vpp - 1 - op.chunk;
            op.backward = 1;
            order[n++] = op;
        }
    }
    return n;
}

int pipe_recv_peer(int pp, int vpp, int r, const pipe_op *op) {
    int s = op->chunk * pp + r, end = op->backward ? pp * vpp - 1 : 0;
    return s == end ? -1 : (r + (op->backward ? 1 : pp - 1)) % pp;
}

int pipe_send_peer(int pp, int vpp, int r, const pipe_op *op) {
    int s = op->chunk * pp + r, end = op->backward ? 0 : pp * vpp - 1;
    return s == end ? -1 : (r + (op->backward ? pp - 1 : 1)) % pp;
}

int pipe_batch(const pipe_op *order, int n, int j, pipe_plan *st, int *rf, int *rb) {
    *rf = *rb = -1;
    if (!st->interleaved) { /* 1F1B: after every op, its sends and the next op's receive */
        if (j + 1 < n) *(order[j + 1].backward ? rb : rf) = j + 1;
        return 1;
    }
    if (j >= 0 && !order[j].backward && order[j].steady) return 0; /* its backward comes first */
    int f = j + 1;
    while (f < n && order[f].backward) f++;
    if (f < n && f >= st->next_f) {
        *rf = f;
        st->next_f = f + 1;
    }
    int x = j + 1 < n && order[j + 1].backward ? j + 1 : j + 1 < n && order[j + 1].steady ? j + 2 : -1;
    if (x >= 0 && x < n && order[x].backward && x >= st->next_b) {
        *rb = x;
        st->next_b = x + 1;
    }
    return 1;
}
