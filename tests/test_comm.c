/* Communicators (trainer/comm*.c). Under mpiexec (test_comm_mpi3: 3 ranks) every op of the MPI
 * backend against the answer computed locally on each rank, its error paths and comm_split; run
 * alone (test_comm: a world of one, no MPI) every op is a no-op or a local copy, and, in a CUDA
 * build on a machine with a GPU, the NCCL backend's ops are called directly (c->ops: the comm_*
 * wrappers short-cut groups of one) on device buffers.
 *
 * Every rank reaches the same verdict without leaving another waiting in a collective: a check
 * that fails is printed on stderr with its rank and counted, every rank runs the same collectives
 * to the end of the test, and the test ends by summing the counts over the world (agree), so the
 * ranks pass or fail each test together. Ranks other than 0 send cmocka's report to /dev/null
 * (MILL_TEST_ALL_RANKS=1 keeps it); their failures still reach stderr. MILL_COMM_TIMEOUT_S
 * defaults to 60 here, so a hang ends the job instead of the test's time. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "trainer/comm.h"
#include "mpi_test.h"
#ifdef MILL_CUDA
#include <cuda_runtime.h>
#endif

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) comm_abort(W, "test_comm: out of memory"), abort();
    return p;
}

/* ------------------------------------------------------------- the values */

/* An integer that every dtype here holds exactly (|v| < 2^20, so sums over up to 16 ranks stay
 * exact in f32), different for each rank, index and salt. */
static int64_t val(int r, size_t i, int salt) {
    return (int64_t)(((uint64_t)(r + 1) * 7919u + (uint64_t)i * 31u + (uint64_t)salt * 101u) % 2000003u) - 1000000;
}

/* i64 also gets high bits, so a reduction done in 32 bits shows. */
static int64_t valt(int r, size_t i, int salt, mill_dtype dt) {
    return val(r, i, salt) + (dt == DTYPE_I64 ? (int64_t)(r + 1) << 36 : 0);
}

static void put(void *b, mill_dtype dt, size_t i, int64_t v) {
    switch (dt) {
    case DTYPE_F32: ((float *)b)[i] = (float)v; break;
    case DTYPE_I32: ((int32_t *)b)[i] = (int32_t)v; break;
    case DTYPE_I64: ((int64_t *)b)[i] = v; break;
    case DTYPE_U8: ((uint8_t *)b)[i] = (uint8_t)v; break;
    default: ((uint16_t *)b)[i] = (uint16_t)v; break; /* bf16, f16, u16: moved as bits */
    }
}

static int64_t get(const void *b, mill_dtype dt, size_t i) {
    switch (dt) {
    case DTYPE_F32: return (int64_t)((const float *)b)[i];
    case DTYPE_I32: return ((const int32_t *)b)[i];
    case DTYPE_I64: return ((const int64_t *)b)[i];
    case DTYPE_U8: return ((const uint8_t *)b)[i];
    default: return ((const uint16_t *)b)[i];
    }
}

/* Checks got[i] == want[i] bit for bit over [lo, hi); the first mismatches are printed. */
static void expect_same(const char *what, const void *got, const void *want, mill_dtype dt, size_t lo, size_t hi) {
    size_t es = dtype_size(dt), bad = 0;
    for (size_t i = lo; i < hi; i++)
        if (memcmp((const char *)got + i * es, (const char *)want + i * es, es)) {
            if (bad < 3)
                fprintf(stderr, "rank %d of %d: %s (%s): element %zu is %lld, want %lld\n", R, N, what, dtype_name(dt),
                        i, (long long)get(got, dt, i), (long long)get(want, dt, i));
            bad++;
        }
    CHECK(bad == 0, "%s (%s): %zu of %zu elements differ", what, dtype_name(dt), bad, hi - lo);
}

static const int64_t SENTINEL = 77;

/* ---------------------------------------------------------- MPI, N ranks */

static void test_all_reduce(void **st) {
    (void)st;
    const mill_dtype dts[] = {DTYPE_F32, DTYPE_I32, DTYPE_I64};
    const size_t sizes[] = {0, 1, 1000, (1u << 20) + 3};
    for (size_t a = 0; a < 3; a++)
        for (size_t b = 0; b < 4; b++) {
            mill_dtype dt = dts[a];
            size_t n = sizes[b], es = dtype_size(dt);
            int salt = (int)(a * 4 + b);
            void *buf = n ? xmalloc(n * es) : NULL, *want = xmalloc(n * es);
            for (size_t i = 0; i < n; i++) {
                put(buf, dt, i, valt(R, i, salt, dt));
                int64_t s = 0;
                for (int q = 0; q < N; q++) s += valt(q, i, salt, dt);
                put(want, dt, i, s);
            }
            mill_err e = {{0}};
            int rc = comm_all_reduce(W, buf, n, dt, &e);
            CHECK(rc == 0, "all_reduce of %zu %s: %s", n, dtype_name(dt), e.msg);
            char what[64];
            snprintf(what, sizeof what, "all_reduce of %zu", n);
            expect_same(what, buf, want, dt, 0, n);
            free(buf);
            free(want);
        }
    mpi_test_agree("all_reduce");
}

/* 100 reductions in flight on disjoint parts of one buffer (past the first 64 requests' room),
 * some of them empty, then a second round on the same comm after the flush. */
static void test_all_reduce_async(void **st) {
    (void)st;
    mill_err e = {{0}};
    CHECK(comm_flush(W, &e) == 0, "flush with nothing in flight: %s", e.msg);
    for (int round = 0; round < 2; round++) {
        mill_dtype dt = round ? DTYPE_I64 : DTYPE_F32;
        size_t es = dtype_size(dt), n = 0, off[101];
        for (int p = 0; p < 100; p++) off[p] = n, n += (size_t)(p % 7) * 13;
        off[100] = n;
        void *buf = xmalloc(n * es), *want = xmalloc(n * es);
        for (size_t i = 0; i < n; i++) {
            put(buf, dt, i, valt(R, i, 40 + round, dt));
            int64_t s = 0;
            for (int q = 0; q < N; q++) s += valt(q, i, 40 + round, dt);
            put(want, dt, i, s);
        }
        int rc = 0;
        for (int p = 0; p < 100; p++)
            rc |= comm_all_reduce_async(W, (char *)buf + off[p] * es, off[p + 1] - off[p], dt, &e);
        CHECK(rc == 0, "all_reduce_async: %s", e.msg);
        rc = comm_flush(W, &e);
        CHECK(rc == 0, "flush: %s", e.msg);
        expect_same("all_reduce_async + flush", buf, want, dt, 0, n);
        free(buf);
        free(want);
    }
    CHECK(comm_flush(W, &e) == 0, "a second flush: %s", e.msg);
    mpi_test_agree("all_reduce_async");
}

/* Uneven pieces (rank 1's empty), with gaps between them that must stay as they were, in rank
 * order and in reverse rank order. */
static void test_all_gatherv(void **st) {
    (void)st;
    const mill_dtype dts[] = {DTYPE_F32, DTYPE_I64, DTYPE_U8, DTYPE_BF16};
    size_t *counts = xmalloc(sizeof *counts * (size_t)N), *displs = xmalloc(sizeof *displs * (size_t)N);
    for (int layout = 0; layout < 2; layout++)
        for (size_t a = 0; a < 4; a++) {
            mill_dtype dt = dts[a];
            size_t es = dtype_size(dt), total = 1;
            for (int k = 0; k < N; k++) {
                int q = layout ? N - 1 - k : k;
                counts[q] = q % 3 == 1 ? 0 : (size_t)(1 + 5 * q) + (q == 2 ? 1000 : 0);
                displs[q] = total;
                total += counts[q] + 2;
            }
            void *buf = xmalloc(total * es), *want = xmalloc(total * es);
            for (size_t i = 0; i < total; i++) put(buf, dt, i, SENTINEL), put(want, dt, i, SENTINEL);
            for (int q = 0; q < N; q++)
                for (size_t j = 0; j < counts[q]; j++) {
                    put(want, dt, displs[q] + j, val(q, j, 50));
                    if (q == R) put(buf, dt, displs[q] + j, val(q, j, 50));
                }
            mill_err e = {{0}};
            int rc = comm_all_gatherv(W, buf, counts, displs, dt, &e);
            CHECK(rc == 0, "all_gatherv: %s", e.msg);
            expect_same(layout ? "all_gatherv (pieces in reverse order)" : "all_gatherv", buf, want, dt, 0, total);
            free(buf);
            free(want);
        }
    /* every piece empty */
    for (int q = 0; q < N; q++) counts[q] = 0, displs[q] = 0;
    float x = 5;
    mill_err e = {{0}};
    CHECK(comm_all_gatherv(W, &x, counts, displs, DTYPE_F32, &e) == 0 && x == 5, "all_gatherv of nothing: %s", e.msg);
    free(counts);
    free(displs);
    mpi_test_agree("all_gatherv");
}

/* In place: on exit buf[rank * count .. + count) holds this rank's piece summed over the ranks. */
static void test_reduce_scatter(void **st) {
    (void)st;
    const mill_dtype dts[] = {DTYPE_F32, DTYPE_I32, DTYPE_I64};
    const size_t sizes[] = {1, 7, 1000};
    for (size_t a = 0; a < 3; a++)
        for (size_t b = 0; b < 3; b++) {
            mill_dtype dt = dts[a];
            size_t n = sizes[b], es = dtype_size(dt), total = n * (size_t)N;
            int salt = 60 + (int)(a * 3 + b);
            void *buf = xmalloc(total * es), *want = xmalloc(total * es);
            for (size_t i = 0; i < total; i++) {
                put(buf, dt, i, valt(R, i, salt, dt));
                int64_t s = 0;
                for (int q = 0; q < N; q++) s += valt(q, i, salt, dt);
                put(want, dt, i, s);
            }
            mill_err e = {{0}};
            int rc = comm_reduce_scatter(W, buf, n, dt, &e);
            CHECK(rc == 0, "reduce_scatter of %zu: %s", n, e.msg);
            char what[64];
            snprintf(what, sizeof what, "reduce_scatter of %zu a rank", n);
            expect_same(what, buf, want, dt, (size_t)R * n, (size_t)(R + 1) * n);
            free(buf);
            free(want);
        }
    float x[4] = {1, 2, 3, 4};
    mill_err e = {{0}};
    CHECK(comm_reduce_scatter(W, x, 0, DTYPE_F32, &e) == 0 && x[0] == 1 && x[3] == 4, "reduce_scatter of 0: %s", e.msg);
    mpi_test_agree("reduce_scatter");
}

/* Rank a sends rank b this many elements: uneven, zero for some pairs (rank 0 to itself). */
static size_t a2a_count(int a, int b) { return (size_t)((a + 2 * b) % 4) * 3 + (a == 1 && b == 2 ? 500 : 0); }

static void test_all_to_allv(void **st) {
    (void)st;
    const mill_dtype dts[] = {DTYPE_I32, DTYPE_F32, DTYPE_BF16, DTYPE_U8, DTYPE_I64};
    size_t p = (size_t)N;
    size_t *sc = xmalloc(sizeof(size_t) * p), *sd = xmalloc(sizeof(size_t) * p);
    size_t *rc = xmalloc(sizeof(size_t) * p), *rd = xmalloc(sizeof(size_t) * p);
    for (size_t a = 0; a < 5; a++) {
        mill_dtype dt = dts[a];
        size_t es = dtype_size(dt), stot = 1, rtot = 1;
        for (int k = N - 1; k >= 0; k--) { /* send pieces in reverse peer order */
            sc[k] = a2a_count(R, k);
            sd[k] = stot;
            stot += sc[k] + 1;
        }
        for (int q = 0; q < N; q++) {
            rc[q] = a2a_count(q, R);
            rd[q] = rtot;
            rtot += rc[q] + 1;
        }
        void *send = xmalloc(stot * es), *recv = xmalloc(rtot * es), *want = xmalloc(rtot * es);
        for (size_t i = 0; i < stot; i++) put(send, dt, i, -SENTINEL);
        for (size_t i = 0; i < rtot; i++) put(recv, dt, i, SENTINEL), put(want, dt, i, SENTINEL);
        for (int q = 0; q < N; q++) {
            for (size_t j = 0; j < sc[q]; j++) put(send, dt, sd[q] + j, valt(R * 64 + q, j, 70, dt));
            for (size_t j = 0; j < rc[q]; j++) put(want, dt, rd[q] + j, valt(q * 64 + R, j, 70, dt));
        }
        mill_err e = {{0}};
        int x = comm_all_to_allv(W, send, sc, sd, recv, rc, rd, dt, &e);
        CHECK(x == 0, "all_to_allv: %s", e.msg);
        expect_same("all_to_allv", recv, want, dt, 0, rtot);
        free(send);
        free(recv);
        free(want);
    }
    /* nothing to anyone */
    for (size_t q = 0; q < p; q++) sc[q] = sd[q] = rc[q] = rd[q] = 0;
    int32_t s = 1, r = 2;
    mill_err e = {{0}};
    CHECK(comm_all_to_allv(W, &s, sc, sd, &r, rc, rd, DTYPE_I32, &e) == 0 && r == 2, "all_to_allv of nothing: %s",
          e.msg);
    free(sc), free(sd), free(rc), free(rd);
    mpi_test_agree("all_to_allv");
}

/* A ring in one batch: send to the next rank, receive from the previous; then two messages each
 * way (they must arrive in the order posted). */
static void test_sendrecv(void **st) {
    (void)st;
    int next = (R + 1) % N, prev = (R + N - 1) % N;
    const mill_dtype dts[] = {DTYPE_F32, DTYPE_I64, DTYPE_U16};
    for (size_t a = 0; a < 3; a++) {
        mill_dtype dt = dts[a];
        size_t n = 1000, m = 37, es = dtype_size(dt);
        void *s1 = xmalloc(n * es), *s2 = xmalloc(m * es), *r1 = xmalloc(n * es), *r2 = xmalloc(m * es);
        void *w1 = xmalloc(n * es), *w2 = xmalloc(m * es);
        for (size_t i = 0; i < n; i++) put(s1, dt, i, valt(R, i, 80, dt)), put(w1, dt, i, valt(prev, i, 80, dt));
        for (size_t i = 0; i < m; i++) put(s2, dt, i, valt(R, i, 81, dt)), put(w2, dt, i, valt(prev, i, 81, dt));
        mill_err e = {{0}};
        comm_p2p ring[2] = {{next, 1, s1, n}, {prev, 0, r1, n}};
        int rc = comm_sendrecv(W, ring, 2, dt, &e);
        CHECK(rc == 0, "sendrecv ring: %s", e.msg);
        expect_same("sendrecv ring", r1, w1, dt, 0, n);
        memset(r1, 0, n * es);
        comm_p2p two[4] = {{prev, 0, r1, n}, {next, 1, s1, n}, {next, 1, s2, m}, {prev, 0, r2, m}};
        rc = comm_sendrecv(W, two, 4, dt, &e);
        CHECK(rc == 0, "sendrecv, two each way: %s", e.msg);
        expect_same("sendrecv, first of two", r1, w1, dt, 0, n);
        expect_same("sendrecv, second of two", r2, w2, dt, 0, m);
        free(s1), free(s2), free(r1), free(r2), free(w1), free(w2);
    }
    mill_err e = {{0}};
    CHECK(comm_sendrecv(W, NULL, 0, DTYPE_F32, &e) == 0, "an empty batch: %s", e.msg);
    mpi_test_agree("sendrecv");
}

static void test_broadcast(void **st) {
    (void)st;
    const mill_dtype dts[] = {DTYPE_F32, DTYPE_U8, DTYPE_I64};
    for (int root = 0; root < N; root++)
        for (size_t a = 0; a < 3; a++) {
            mill_dtype dt = dts[a];
            size_t n = 1000, es = dtype_size(dt);
            void *buf = xmalloc(n * es), *want = xmalloc(n * es);
            for (size_t i = 0; i < n; i++)
                put(buf, dt, i, valt(R, i, 90 + root, dt)), put(want, dt, i, valt(root, i, 90 + root, dt));
            mill_err e = {{0}};
            int rc = comm_broadcast(W, buf, n, dt, root, &e);
            CHECK(rc == 0, "broadcast from %d: %s", root, e.msg);
            char what[64];
            snprintf(what, sizeof what, "broadcast from root %d", root);
            expect_same(what, buf, want, dt, 0, n);
            free(buf);
            free(want);
        }
    float x = (float)R;
    mill_err e = {{0}};
    CHECK(comm_broadcast(W, &x, 0, DTYPE_F32, N - 1, &e) == 0 && x == (float)R, "broadcast of 0: %s", e.msg);
    mpi_test_agree("broadcast");
}

static void test_barrier(void **st) {
    (void)st;
    mill_err e = {{0}};
    for (int i = 0; i < 3; i++) CHECK(comm_barrier(W, &e) == 0, "barrier %d: %s", i, e.msg);
    mpi_test_agree("barrier");
}

/* Even and odd world ranks, the key reversing the order: sub-rank 0 is the highest world rank. */
static void test_split(void **st) {
    (void)st;
    const char *name = R % 2 ? "odd" : "even";
    mill_err e = {{0}};
    comm *g = NULL;
    int rc = comm_split(W, R % 2, N - R, name, &g, &e);
    CHECK(rc == 0 && g, "split: %s", e.msg);
    if (!g) comm_abort(W, "test_comm: no comm from split"), abort();
    int size = 0, rank = 0, top = -1;
    for (int q = R % 2; q < N; q += 2) {
        size++;
        rank += q > R;
        top = q > top ? q : top;
    }
    CHECK(g->size == size, "split %s: size %d, want %d", name, g->size, size);
    CHECK(g->rank == rank, "split %s: rank %d, want %d", name, g->rank, rank);
    CHECK(!strcmp(g->name, name), "split: name %s, want %s", g->name, name);
    CHECK(g->device == DEVICE_CPU && g->ops == &comm_mpi_ops && g->host == g, "split %s: not a CPU comm over MPI", name);
    int64_t v[2] = {R + 1, (int64_t)1 << 40};
    rc = comm_all_reduce(g, v, 2, DTYPE_I64, &e);
    int64_t want = 0;
    for (int q = R % 2; q < N; q += 2) want += q + 1;
    CHECK(rc == 0 && v[0] == want && v[1] == (int64_t)size << 40, "all_reduce in %s: %lld %lld, want %lld %lld (%s)",
          name, (long long)v[0], (long long)v[1], (long long)want, (long long)size << 40, e.msg);
    float b[3] = {(float)R, (float)R, (float)R};
    rc = comm_broadcast(g, b, 3, DTYPE_F32, 0, &e);
    CHECK(rc == 0 && b[0] == (float)top && b[2] == (float)top, "broadcast in %s from its rank 0: %g, want %d (%s)", name,
          b[0], top, e.msg);
    double d = 0.5 * R;
    rc = comm_sum_f64(g, &d, 1, &e);
    CHECK(rc == 0 && d == 0.5 * (double)(want - size), "sum_f64 in %s: %g (%s)", name, d, e.msg);
    CHECK(comm_barrier(g, &e) == 0, "barrier in %s: %s", name, e.msg);
    /* an error on the subgroup names it */
    rc = comm_broadcast(g, b, 1, DTYPE_F32, g->size, &e);
    CHECK(rc == -1 && strstr(e.msg, name), "a bad root on %s: rc %d, message \"%s\"", name, rc, e.msg);
    comm_free(g);
    mpi_test_agree("split");
}

static void test_f64(void **st) {
    (void)st;
    mill_err e = {{0}};
    double s[3] = {R + 0.5, -(double)R, 0.25 * R};
    int rc = comm_sum_f64(W, s, 3, &e);
    double t = 0.5 * N * (N - 1);
    CHECK(rc == 0 && s[0] == t + 0.5 * N && s[1] == -t && s[2] == 0.25 * t, "sum_f64: %g %g %g (%s)", s[0], s[1], s[2],
          e.msg);
    double m[3] = {R, -(double)R, R == 1 ? 1e300 : -1e300};
    rc = comm_max_f64(W, m, 3, &e);
    CHECK(rc == 0 && m[0] == N - 1 && m[1] == 0 && m[2] == 1e300, "max_f64: %g %g %g (%s)", m[0], m[1], m[2], e.msg);
    double z = 3;
    CHECK(comm_sum_f64(W, &z, 0, &e) == 0 && comm_max_f64(W, &z, 0, &e) == 0 && z == 3, "f64 of 0: %s", e.msg);
    mpi_test_agree("sum_f64 / max_f64");
}

/* Refused before any MPI call, on every rank alike: a failure names the group. */
static void test_errors(void **st) {
    (void)st;
    mill_err e = {{0}};
    float b[4] = {0};
    int rc = comm_broadcast(W, b, 4, DTYPE_F32, N, &e);
    CHECK(rc == -1 && strstr(e.msg, "world") && strstr(e.msg, "root"), "broadcast root %d: rc %d, \"%s\"", N, rc, e.msg);
    rc = comm_broadcast(W, b, 4, DTYPE_F32, -1, &e);
    CHECK(rc == -1 && strstr(e.msg, "world"), "broadcast root -1: rc %d, \"%s\"", rc, e.msg);
    comm_p2p self[1] = {{R, 1, b, 4}};
    rc = comm_sendrecv(W, self, 1, DTYPE_F32, &e);
    CHECK(rc == -1 && strstr(e.msg, "world") && strstr(e.msg, "send to"), "send to itself: rc %d, \"%s\"", rc, e.msg);
    comm_p2p bad[2] = {{(R + 1) % N, 1, b, 4}, {R, 0, b + 2, 2}};
    rc = comm_sendrecv(W, bad, 2, DTYPE_F32, &e);
    CHECK(rc == -1 && strstr(e.msg, "world") && strstr(e.msg, "receive from"), "receive from itself: rc %d, \"%s\"", rc,
          e.msg);
    comm_p2p out[1] = {{N, 0, b, 4}};
    rc = comm_sendrecv(W, out, 1, DTYPE_F32, &e);
    CHECK(rc == -1 && strstr(e.msg, "world"), "receive from rank %d: rc %d, \"%s\"", N, rc, e.msg);
    uint8_t u[4] = {1, 2, 3, 4};
    rc = comm_all_reduce(W, u, 4, DTYPE_U8, &e);
    CHECK(rc == -1 && strstr(e.msg, "world") && strstr(e.msg, "not supported"), "all_reduce of u8: rc %d, \"%s\"", rc,
          e.msg);
    CHECK(u[0] == 1 && u[3] == 4, "a refused all_reduce changed its buffer");
    rc = comm_all_reduce_async(W, u, 4, DTYPE_U8, &e);
    CHECK(rc == -1 && strstr(e.msg, "not supported"), "all_reduce_async of u8: rc %d, \"%s\"", rc, e.msg);
    uint16_t h[8] = {0};
    rc = comm_reduce_scatter(W, h, 2, DTYPE_BF16, &e);
    CHECK(rc == -1 && strstr(e.msg, "not supported"), "reduce_scatter of bf16: rc %d, \"%s\"", rc, e.msg);
    rc = comm_all_reduce(W, h, 2, DTYPE_F16, &e);
    CHECK(rc == -1 && strstr(e.msg, "not supported"), "all_reduce of f16: rc %d, \"%s\"", rc, e.msg);
    /* nothing was left in flight: the world still works */
    CHECK(comm_flush(W, &e) == 0, "flush after the refusals: %s", e.msg);
    int32_t one = 1;
    rc = comm_all_reduce(W, &one, 1, DTYPE_I32, &e);
    CHECK(rc == 0 && one == N, "all_reduce after the refusals: %d (%s)", one, e.msg);
    mpi_test_agree("error paths");
}

/* ----------------------------------------------------------- a world of one */

static void test_one_ops(void **st) {
    (void)st;
    mill_err e = {{0}};
    assert_int_equal(W->size, 1);
    assert_int_equal(W->rank, 0);
    assert_string_equal(W->name, "world");
    assert_true(W->device == DEVICE_CPU);
    size_t n = 1000;
    float *f = xmalloc(sizeof(float) * n), *w = xmalloc(sizeof(float) * n);
    for (size_t i = 0; i < n; i++) f[i] = w[i] = (float)val(0, i, 1);
    assert_int_equal(comm_all_reduce(W, f, n, DTYPE_F32, &e), 0);
    assert_int_equal(comm_all_reduce(W, NULL, 0, DTYPE_F32, &e), 0);
    for (int p = 0; p < 4; p++) assert_int_equal(comm_all_reduce_async(W, f + 250 * p, 250, DTYPE_F32, &e), 0);
    assert_int_equal(comm_flush(W, &e), 0);
    size_t cnt[1] = {300}, dsp[1] = {17};
    assert_int_equal(comm_all_gatherv(W, f, cnt, dsp, DTYPE_F32, &e), 0);
    assert_int_equal(comm_reduce_scatter(W, f, n, DTYPE_F32, &e), 0);
    assert_int_equal(comm_broadcast(W, f, n, DTYPE_F32, 0, &e), 0);
    assert_int_equal(comm_barrier(W, &e), 0);
    assert_memory_equal(f, w, sizeof(float) * n);
    int64_t big[2] = {(int64_t)1 << 40, -3};
    assert_int_equal(comm_all_reduce(W, big, 2, DTYPE_I64, &e), 0);
    assert_true(big[0] == (int64_t)1 << 40 && big[1] == -3);

    /* all_to_all to itself: a copy between the displacements */
    int32_t s[20], r[20];
    for (int i = 0; i < 20; i++) s[i] = 100 + i, r[i] = -1;
    size_t sc[1] = {10}, sd[1] = {3}, rc[1] = {10}, rd[1] = {6};
    assert_int_equal(comm_all_to_allv(W, s, sc, sd, r, rc, rd, DTYPE_I32, &e), 0);
    for (int i = 0; i < 20; i++) assert_int_equal(r[i], i >= 6 && i < 16 ? 100 + i - 3 : -1);
    size_t z[1] = {0};
    assert_int_equal(comm_all_to_allv(W, s, z, z, r, z, z, DTYPE_I32, &e), 0);
    assert_int_equal(r[0], -1);
    rc[0] = 9;
    assert_int_equal(comm_all_to_allv(W, s, sc, sd, r, rc, rd, DTYPE_I32, &e), -1);
    assert_non_null(strstr(e.msg, "world"));

    /* no peer to talk to; roots other than 0 refused */
    assert_int_equal(comm_sendrecv(W, NULL, 0, DTYPE_F32, &e), 0);
    comm_p2p self[1] = {{0, 1, f, 4}};
    assert_int_equal(comm_sendrecv(W, self, 1, DTYPE_F32, &e), -1);
    assert_non_null(strstr(e.msg, "world"));
    assert_int_equal(comm_broadcast(W, f, n, DTYPE_F32, 1, &e), -1);
    assert_non_null(strstr(e.msg, "world"));

    /* split: another comm of one */
    comm *g = NULL;
    assert_int_equal(comm_split(W, 3, 7, "sub", &g, &e), 0);
    assert_non_null(g);
    assert_int_equal(g->size, 1);
    assert_int_equal(g->rank, 0);
    assert_string_equal(g->name, "sub");
    assert_true(g->host == g && g->device == DEVICE_CPU);
    assert_int_equal(comm_all_reduce(g, f, n, DTYPE_F32, &e), 0);
    assert_int_equal(comm_broadcast(g, f, 1, DTYPE_F32, 1, &e), -1);
    assert_non_null(strstr(e.msg, "sub"));
    comm_free(g);

    double d[2] = {1.5, -2};
    assert_int_equal(comm_sum_f64(W, d, 2, &e), 0);
    assert_int_equal(comm_max_f64(W, d, 2, &e), 0);
    assert_true(d[0] == 1.5 && d[1] == -2);
    comm_abort(W, "test_comm: a world of one has no one to end"); /* returns */
    assert_memory_equal(f, w, sizeof(float) * n);
    free(f);
    free(w);
}

#ifdef MILL_CUDA
#define CU(x)                                                                                 \
    do {                                                                                      \
        cudaError_t r_ = (x);                                                                 \
        if (r_ != cudaSuccess) fail_msg("%s: %s", #x, cudaGetErrorString(r_));                \
    } while (0)

/* buf (device, n floats) holds want? */
static void dev_expect(const char *what, const float *dbuf, const float *want, size_t n) {
    float *h = xmalloc(sizeof(float) * n);
    CU(cudaMemcpy(h, dbuf, sizeof(float) * n, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; i++)
        if (h[i] != want[i]) fail_msg("NCCL %s: element %zu is %g, want %g", what, i, h[i], want[i]);
    free(h);
}
#endif

/* The NCCL backend over one GPU: its ops called directly (the wrappers short-cut a comm of one). */
static void test_one_nccl(void **st) {
    (void)st;
    mill_err e = {{0}};
#ifndef MILL_CUDA
    comm *c = W;
    assert_int_equal(comm_nccl_from(W, NULL, &c, &e), -1);
    assert_null(c);
    assert_non_null(strstr(e.msg, "without CUDA"));
    skip(); /* no NCCL backend in this build */
#else
    int nd = 0;
    if (cudaGetDeviceCount(&nd) != cudaSuccess || nd < 1) {
        (void)cudaGetLastError();
        print_message("no CUDA device: the NCCL backend is not tried\n");
        skip();
    }
    CU(cudaSetDevice(0));
    cudaStream_t stream;
    CU(cudaStreamCreate(&stream));
    comm *c = NULL;
    if (comm_nccl_from(W, stream, &c, &e)) fail_msg("comm_nccl_from: %s", e.msg);
    assert_true(c->ops == &comm_nccl_ops && c->device == DEVICE_CUDA && c->host == W);
    assert_int_equal(c->size, 1);
    assert_int_equal(c->rank, 0);
    assert_string_equal(c->name, "world");
    const comm_ops *o = c->ops;
    size_t n = 4096;
    float *h = xmalloc(sizeof(float) * n), *w = xmalloc(sizeof(float) * n);
    for (size_t i = 0; i < n; i++) h[i] = w[i] = (float)val(0, i, 3);
    float *d = NULL, *d2 = NULL;
    CU(cudaMalloc((void **)&d, sizeof(float) * n));
    CU(cudaMalloc((void **)&d2, sizeof(float) * n));
    CU(cudaMemcpy(d, h, sizeof(float) * n, cudaMemcpyHostToDevice));
#define OK(call) \
    if ((call) != 0) fail_msg("%s: %s", #call, e.msg)
    OK(o->all_reduce(c, d, n, DTYPE_F32, &e));
    OK(o->flush(c, &e));
    dev_expect("all_reduce", d, w, n);
    for (int p = 0; p < 4; p++) OK(o->all_reduce_async(c, d + 1024 * p, 1024, DTYPE_F32, &e));
    OK(o->flush(c, &e));
    dev_expect("all_reduce_async", d, w, n);
    size_t cnt[1] = {1000}, dsp[1] = {123};
    OK(o->all_gatherv(c, d, cnt, dsp, DTYPE_F32, &e));
    OK(o->reduce_scatter(c, d, n, DTYPE_F32, &e));
    OK(o->broadcast(c, d, n, DTYPE_F32, 0, &e));
    size_t zero[1] = {0};
    OK(o->all_gatherv(c, d, zero, zero, DTYPE_F32, &e)); /* an empty piece (a rank with none) */
    OK(o->all_to_allv(c, d, zero, zero, d2, zero, zero, DTYPE_F32, &e));
    OK(o->flush(c, &e));
    dev_expect("all_gatherv, reduce_scatter, broadcast", d, w, n);

    /* all_to_all to itself: the piece lands at its displacement, the rest untouched */
    float *r = xmalloc(sizeof(float) * n);
    for (size_t i = 0; i < n; i++) r[i] = -7;
    size_t sc[1] = {500}, sd[1] = {11}, rc[1] = {500}, rd[1] = {1000};
    CU(cudaMemcpy(d2, r, sizeof(float) * n, cudaMemcpyHostToDevice));
    OK(o->all_to_allv(c, d, sc, sd, d2, rc, rd, DTYPE_F32, &e));
    OK(o->flush(c, &e));
    for (size_t i = 0; i < 500; i++) r[1000 + i] = w[11 + i];
    dev_expect("all_to_allv", d2, r, n);
    /* the same through the wrapper, which hands a device comm of one to its backend */
    sd[0] = 2000, rd[0] = 3000;
    OK(comm_all_to_allv(c, d, sc, sd, d2, rc, rd, DTYPE_F32, &e));
    OK(comm_flush(c, &e));
    for (size_t i = 0; i < 500; i++) r[3000 + i] = w[2000 + i];
    dev_expect("comm_all_to_allv", d2, r, n);
    /* send/recv to itself in one batch */
    comm_p2p p2p[2] = {{0, 1, d + 64, 100}, {0, 0, d2, 100}};
    OK(o->sendrecv(c, p2p, 2, DTYPE_F32, &e));
    OK(o->flush(c, &e));
    for (size_t i = 0; i < 100; i++) r[i] = w[64 + i];
    dev_expect("sendrecv to itself", d2, r, n);
    OK(o->barrier(c, &e));

    /* a split of it is an NCCL comm of one too, whose all_to_all copies on the device */
    comm *g = NULL;
    OK(comm_split(c, 0, 0, "nsub", &g, &e));
    assert_non_null(g);
    assert_int_equal(g->size, 1);
    assert_string_equal(g->name, "nsub");
    assert_true(g->device == DEVICE_CUDA && g->ops == &comm_nccl_ops && g->host && g->host != g);
    sd[0] = 5, rd[0] = 200;
    OK(comm_all_to_allv(g, d, sc, sd, d2, rc, rd, DTYPE_F32, &e));
    OK(comm_flush(g, &e));
    for (size_t i = 0; i < 500; i++) r[200 + i] = w[5 + i];
    dev_expect("all_to_allv on a split", d2, r, n);
    double v[2] = {2.5, -1};
    OK(comm_sum_f64(g, v, 2, &e));
    OK(comm_max_f64(c, v, 2, &e));
    assert_true(v[0] == 2.5 && v[1] == -1);
    comm_free(g);
#undef OK
    comm_free(c);
    CU(cudaFree(d));
    CU(cudaFree(d2));
    CU(cudaStreamDestroy(stream));
    free(h), free(w), free(r);
#endif
}

int main(void) {
    setenv("MILL_COMM_TIMEOUT_S", "60", 0);
    mill_err e = {{0}};
    if (comm_world_init(&W, &e)) {
        fprintf(stderr, "test_comm: %s\n", e.msg);
        return 1;
    }
    R = W->rank;
    N = W->size;
    if (mpi_test_quiet(R)) return 1;
    const struct CMUnitTest ranks[] = {
        cmocka_unit_test(test_all_reduce),  cmocka_unit_test(test_all_reduce_async), cmocka_unit_test(test_all_gatherv),
        cmocka_unit_test(test_reduce_scatter), cmocka_unit_test(test_all_to_allv),   cmocka_unit_test(test_sendrecv),
        cmocka_unit_test(test_broadcast),   cmocka_unit_test(test_barrier),          cmocka_unit_test(test_split),
        cmocka_unit_test(test_f64),         cmocka_unit_test(test_errors),
    };
    const struct CMUnitTest one[] = {
        cmocka_unit_test(test_one_ops),
        cmocka_unit_test(test_one_nccl),
    };
    int failed = N > 1 ? cmocka_run_group_tests_name("comm over MPI ranks", ranks, NULL, NULL)
                       : cmocka_run_group_tests_name("comm, a world of one", one, NULL, NULL);
    return mpi_test_verdict(W, failed); /* the same verdict on every rank */
}
