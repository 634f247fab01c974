/* Pipeline schedules (trainer/schedule.c): every rank's batches of transfers, run against each
 * other under rendezvous rules (a batch completes only when each of its sends meets the matching
 * receive posted by the peer, and the reverse; transfers between two ranks match in order, as NCCL
 * and MPI without tags match them). For every pp, vpp and micro-batch count tried: no deadlock,
 * every transfer meets the one meant for it, every op's input was asked for before it runs, and
 * the order is a valid 1F1B (each micro-batch and chunk forward once, backward once, after). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "../trainer/schedule.h"

#define MAXP 8
#define MAXOPS 512

typedef struct {
    int send, peer;
    long msg; /* which tensor: (backward, micro, virtual stage of the producer) */
    int pos;  /* its place among the transfers between this pair, in this direction */
} xfer;

typedef struct {
    xfer x[8];
    int n;
} batch;

typedef struct {
    batch b[2 * MAXOPS + 2];
    int n;
} rank_plan;

static long msg_id(int backward, int micro, int vstage) { return ((long)backward * 1000 + micro) * 1000 + vstage; }

/* Rank r's batches, the way dist_pipeline issues them. */
static void plan_rank(int pp, int vpp, int r, int m, int backward, rank_plan *rp, int (*pos)[MAXP]) {
    pipe_op order[2 * MAXOPS];
    int n = pipe_schedule(pp, vpp, r, m, backward, order);
    assert_true(n == (backward ? 2 : 1) * m * vpp);
    /* a valid order: each (micro, chunk) forward once, its backward once after it */
    static int seen[MAXOPS][2];
    memset(seen, 0, sizeof seen);
    for (int j = 0; j < n; j++) {
        int id = order[j].micro * vpp + order[j].chunk;
        assert_true(order[j].micro >= 0 && order[j].micro < m && order[j].chunk >= 0 && order[j].chunk < vpp);
        assert_int_equal(seen[id][order[j].backward]++, 0);
        if (order[j].backward) assert_int_equal(seen[id][0], 1);
    }
    pipe_plan st = {.interleaved = vpp > 1};
    int asked[2 * MAXOPS] = {0};
    xfer pend[4];
    int np = 0;
    rp->n = 0;
    for (int j = -1; j < n; j++) {
        if (j >= 0) {
            const pipe_op *op = &order[j];
            int s = op->chunk * pp + r, from = pipe_recv_peer(pp, vpp, r, op), to = pipe_send_peer(pp, vpp, r, op);
            if (from >= 0) assert_true(asked[j]); /* its input is in before it runs */
            if (to >= 0) {
                assert_true(np < 4);
                pend[np++] = (xfer){1, to, msg_id(op->backward, op->micro, s), pos[r][to]++};
            }
        }
        int rf, rb;
        if (!pipe_batch(order, n, j, &st, &rf, &rb)) continue;
        batch *b = &rp->b[rp->n];
        b->n = 0;
        for (int i = 0; i < np; i++) b->x[b->n++] = pend[i];
        np = 0;
        int want[2] = {rf, rb};
        for (int i = 0; i < 2; i++) {
            if (want[i] < 0) continue;
            const pipe_op *op = &order[want[i]];
            asked[want[i]] = 1;
            int from = pipe_recv_peer(pp, vpp, r, op), s = op->chunk * pp + r;
            if (from < 0) continue;
            /* the producer's virtual stage: the one before (forward) or after (backward) */
            b->x[b->n++] = (xfer){0, from, msg_id(op->backward, op->micro, op->backward ? s + 1 : s - 1), -1};
        }
        if (b->n) rp->n++;
    }
    assert_int_equal(np, 0); /* every send went out */
}

/* Runs the ranks' batches; returns 0 when all complete with every transfer meeting its partner. */
static int simulate(int pp, int vpp, int m, int backward) {
    static rank_plan rp[MAXP];
    int sendpos[MAXP][MAXP] = {{0}};
    for (int r = 0; r < pp; r++) plan_rank(pp, vpp, r, m, backward, &rp[r], sendpos);
    /* receive positions: in each rank's batch order, per source (sends got theirs in plan_rank) */
    int recvpos[MAXP][MAXP] = {{0}};
    for (int r = 0; r < pp; r++)
        for (int i = 0; i < rp[r].n; i++)
            for (int k = 0; k < rp[r].b[i].n; k++) {
                xfer *x = &rp[r].b[i].x[k];
                if (!x->send) x->pos = recvpos[x->peer][r]++;
            }
    for (int a = 0; a < pp; a++)
        for (int b = 0; b < pp; b++)
            if (sendpos[a][b] != recvpos[a][b])
                fail_msg("pp %d vpp %d m %d: %d sends %d->%d, %d receives", pp, vpp, m, sendpos[a][b], a, b, recvpos[a][b]);
    int at[MAXP] = {0};
    for (;;) {
        int moved = 0, done = 1;
        for (int r = 0; r < pp; r++) {
            if (at[r] >= rp[r].n) continue;
            done = 0;
            const batch *b = &rp[r].b[at[r]];
            int ok = 1;
            for (int k = 0; k < b->n && ok; k++) { /* is the partner posted: in the peer's current or an earlier batch */
                const xfer *x = &b->x[k];
                int found = 0;
                for (int i = 0; i <= at[x->peer] && i < rp[x->peer].n && !found; i++)
                    for (int q = 0; q < rp[x->peer].b[i].n; q++) {
                        const xfer *y = &rp[x->peer].b[i].x[q];
                        if (y->send != x->send && y->peer == r && y->pos == x->pos) {
                            if (y->msg != x->msg)
                                fail_msg("pp %d vpp %d m %d: rank %d's transfer %ld meets rank %d's %ld", pp, vpp, m, r,
                                         x->msg, x->peer, y->msg);
                            found = 1;
                            break;
                        }
                    }
                ok = found;
            }
            if (ok) {
                at[r]++;
                moved = 1;
            }
        }
        if (done) return 0;
        if (!moved) {
            fail_msg("pp %d vpp %d m %d backward %d: deadlock (ranks at batches %d %d ...)", pp, vpp, m, backward, at[0], at[1]);
            return -1;
        }
    }
}

static void every_layout(void **state) {
    (void)state;
    int runs = 0;
    for (int pp = 2; pp <= MAXP; pp++)
        for (int vpp = 1; vpp <= 4; vpp++)
            for (int m = 1; m <= 3 * pp + 1; m++) {
                if (vpp > 1 && m % pp) { /* Megatron's rule for the interleaved 1F1B (other counts deadlock) */
                    pipe_op o[2 * MAXOPS];
                    assert_int_equal(pipe_schedule(pp, vpp, 0, m, 1, o), -1);
                }
                for (int bw = 0; bw < 2; bw++, runs++)
                    if (!bw || vpp == 1 || m % pp == 0) assert_int_equal(simulate(pp, vpp, m, bw), 0);
            }
    assert_true(runs > 100);
}

/* "F0 F1 B0 ..." (with chunks: "F0.1 ..."): the order as text. */
static void order_text(const pipe_op *o, int n, int chunks, char *buf) {
    char *p = buf;
    *p = 0;
    for (int j = 0; j < n; j++) {
        p += sprintf(p, "%s%c%d", j ? " " : "", o[j].backward ? 'B' : 'F', o[j].micro);
        if (chunks) p += sprintf(p, ".%d", o[j].chunk);
    }
}

/* The plain 1F1B of pp 4, rank 1, 5 micro-batches: 2 warm-up forwards, steady pairs, cool-down. */
static void one_f_one_b(void **state) {
    (void)state;
    pipe_op o[10];
    assert_int_equal(pipe_schedule(4, 1, 1, 5, 1, o), 10);
    char got[64];
    order_text(o, 10, 0, got);
    assert_string_equal(got, "F0 F1 F2 B0 F3 B1 F4 B2 B3 B4");
    assert_false(o[1].steady);
    assert_true(o[2].steady);
}

/* Interleaved pp 2, vpp 2, 4 micro-batches on rank 0 (Megatron's order). */
static void interleaved_order(void **state) {
    (void)state;
    pipe_op o[16];
    assert_int_equal(pipe_schedule(2, 2, 0, 4, 1, o), 16);
    char got[160];
    order_text(o, 16, 1, got);
    assert_string_equal(got, "F0.0 F1.0 F0.1 F1.1 F2.0 B0.1 F3.0 B1.1 F2.1 B0.0 F3.1 B1.0 B2.1 B3.1 B2.0 B3.0");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(one_f_one_b),
        cmocka_unit_test(interleaved_order),
        cmocka_unit_test(every_layout),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
