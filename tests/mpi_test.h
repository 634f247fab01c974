/* tests/mpi_test.h — for cmocka programs that run as several MPI ranks (test_comm, test_parallel):
 * one rank speaks (the others' stdout goes to /dev/null unless MILL_TEST_ALL_RANKS is set), and
 * every rank ends with the same verdict, the failures summed over the world. Header only. */
#ifndef MILL_MPI_TEST_H
#define MILL_MPI_TEST_H

#include <stdio.h>
#include <stdlib.h>

#include "trainer/comm.h"

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
