/* trainer/comm_impl.h — between comm.c and its backends (not for other modules).
 * Owns: comm_runtime, the per-process state behind every comm: whether MPI is up, and the
 * watchdog's view of the blocking op in progress. */
#ifndef MILL_COMM_IMPL_H
#define MILL_COMM_IMPL_H

#include <pthread.h>

#include "comm.h"


typedef struct comm_runtime {
    int mpi_on, mpi_size, world_rank;
    int abort_ok; /* MPI_Abort may be called from the watchdog's thread (MPI_THREAD_MULTIPLE) */
    /* watchdog: the op in progress (NULL: none), its group and when it began */
    pthread_t wd;
    int wd_on, stop, idle;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    const char *op;
    char group[32];
    int group_size, group_rank;
    double t0, timeout;
} comm_runtime;

/* comm_mpi.c: MPI_Init_thread and the world comm; MPI_Abort; MPI_Finalize. */
int comm_mpi_world(comm_runtime *rt, comm **world, mill_err *e);
void comm_rt_abort(comm_runtime *rt, int code);
void comm_rt_finalize(comm_runtime *rt);
/* comm_mpi.c, for comm_nccl.c: n bytes from rank 0 of an MPI comm. */
int comm_mpi_bcast_bytes(comm *c, void *buf, int n, mill_err *e);
/* comm.c: a comm of one rank (no backend calls). */
int comm_local(comm_runtime *rt, const char *name, mill_device dev, comm **out, mill_err *e);

#endif
