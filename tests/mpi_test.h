/* tests/mpi_test.h — for cmocka programs that run as several MPI ranks (test_comm, test_parallel):
 * checks that keep every rank going (CHECK, each failure printed with its rank) and end a test on
 * every rank alike (mpi_test_agree); one rank speaks (the others' stdout goes to /dev/null unless
 * MILL_TEST_ALL_RANKS is set); every rank exits with the same verdict. Header only: include it after
 * <cmocka.h>, once per program. */
#ifndef MILL_MPI_TEST_H
#define MILL_MPI_TEST_H

#include <stdio.h>
#include <stdlib.h>

#include "trainer/comm.h"

static comm *W;   /* the world */
static int R, N;  /* its rank and size */
static int n_bad; /* this rank's failed checks in the test under way */

#define CHECK(cond, ...)                                                                                   \
    do {                                                                                                   \
        if (!(cond)) {                                                                                     \
            n_bad++;                                                                                       \
            fprintf(stderr, "rank %d of %d: %s:%d: check failed (%s): ", R, N, __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                                                  \
            fputc('\n', stderr);                                                                           \
        }                                                                                                  \
    } while (0)

/* Ends the test on every rank alike: the failed checks summed over the world. */
static inline void mpi_test_agree(const char *test) {
    mill_err e = {{0}};
    double bad = n_bad;
    n_bad = 0;
    if (comm_sum_f64(W, &bad, 1, &e)) fail_msg("rank %d: %s: summing the failed checks: %s", R, test, e.msg);
    if (bad != 0) fail_msg("rank %d of %d: %s: %.0f checks failed over the ranks (each printed above)", R, N, test, bad);
}

/* 0, or -1 when rank r's stdout could not be silenced. */
static inline int mpi_test_quiet(int r) {
    return r && !getenv("MILL_TEST_ALL_RANKS") && !freopen("/dev/null", "w", stdout) ? -1 : 0;
}

/* The exit status of every rank: non-zero when any rank failed; ends the world. */
static inline int mpi_test_verdict(comm *w, int failed) {
    mill_err e;
    double f = failed;
    if (comm_sum_f64(w, &f, 1, &e)) {
        fprintf(stderr, "rank %d: %s\n", w->rank, e.msg);
        f = 1;
    }
    comm_world_end(w, 0);
    return f != 0;
}

#endif
