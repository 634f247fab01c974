/* trainer/comm.h — communicators: one interface, two backends picked at run time.
 * Owns: comm (a group of ranks and the backend that moves its data), the MPI runtime of a
 * process (comm_world_init / comm_world_end), the watchdog that ends a stuck job, and the
 * NCCL unique id's trip over MPI.
 *
 * Backends sit behind comm_ops (ggml-backend's shape): MPI for host buffers (CPU ranks, and the
 * CPU collectives of GPU ranks), NCCL for device buffers (built with CUDA). A comm of one rank
 * never calls its backend: every op is a no-op (or a local copy) there, so the single-process
 * path runs the same code with no special case. Every backend call is checked (COMM_CHECK /
 * NCCL_CHECK) and its failure names the op, the group and the rank.
 *
 * Failure ends the job, never hangs it: a rank whose command fails calls comm_abort (MPI_Abort,
 * after ncclCommAbort on NCCL comms), which mpiexec / srun turns into the end of every rank; a
 * rank killed outright is noticed by the launcher the same way; and the watchdog ends a rank
 * whose collective has not returned in MILL_COMM_TIMEOUT_S seconds (default 600), naming the op,
 * the group and the rank on stderr first. */
#ifndef MILL_COMM_H
#define MILL_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "../common/err.h"
#include "../common/tensor.h"

typedef struct comm comm;

/* One point-to-point transfer of a batch (comm_sendrecv). */
typedef struct {
    int peer;   /* rank in the comm */
    int send;   /* 1 send, 0 receive */
    void *buf;  /* count elements of dtype */
    size_t count;
} comm_p2p;

typedef struct {
    const char *name; /* "mpi", "nccl" */
    /* in place: buf [count] summed over the group */
    int (*all_reduce)(comm *c, void *buf, size_t count, mill_dtype dt, mill_err *e);
    /* in place, started now and finished by flush (the backward's per-layer reductions) */
    int (*all_reduce_async)(comm *c, void *buf, size_t count, mill_dtype dt, mill_err *e);
    int (*flush)(comm *c, mill_err *e);
    /* in place: rank r's piece is buf[displs[r] .. + counts[r]) on entry (its own) and on exit (all) */
    int (*all_gatherv)(comm *c, void *buf, const size_t *counts, const size_t *displs, mill_dtype dt, mill_err *e);
    /* in place: buf [size * count]; on exit buf[rank * count .. + count) holds this rank's sum */
    int (*reduce_scatter)(comm *c, void *buf, size_t count, mill_dtype dt, mill_err *e);
    /* send [sum scounts] to each peer's recv; counts and displacements in elements */
    int (*all_to_allv)(comm *c, const void *send, const size_t *scounts, const size_t *sdispls, void *recv,
                       const size_t *rcounts, const size_t *rdispls, mill_dtype dt, mill_err *e);
    int (*sendrecv)(comm *c, const comm_p2p *ops, int n, mill_dtype dt, mill_err *e);
    int (*broadcast)(comm *c, void *buf, size_t count, mill_dtype dt, int root, mill_err *e);
    int (*barrier)(comm *c, mill_err *e);
    /* the ranks with the same color, ordered by key, as a new comm of this backend */
    int (*split)(comm *c, int color, int key, const char *name, comm **out, mill_err *e);
    void (*abort)(comm *c);
    void (*free)(comm *c);
} comm_ops;

struct comm {
    const comm_ops *ops;
    int rank, size;
    char name[32];      /* "world", "dp", "tp", ... in messages */
    mill_device device; /* where its buffers live */
    void *impl;         /* the backend's handles */
    struct comm *host;  /* the MPI comm of the same ranks (itself on MPI): host scalars, the NCCL id */
    struct comm_runtime *rt;
};

/* The process's MPI runtime. Inside a launch (mpiexec, srun: the PMI / Slurm environment) it
 * initialises MPI and gives the world comm over MPI; outside one it gives a world of one rank
 * without touching MPI. Starts the watchdog. Call once, first thing in a command that may run
 * on several ranks. */
int comm_world_init(comm **world, mill_err *e);
/* Orderly end (MPI_Finalize) after success; after a failure (failed != 0) with more than one rank,
 * ends every rank of the job instead (comm_abort). Frees world. */
void comm_world_end(comm *world, int failed);
/* 1 when this process runs inside a launcher (mpiexec / srun environment). */
int comm_in_launch(void);

/* A comm of the same ranks over NCCL on the current CUDA device (the unique id goes from rank 0
 * over c, an MPI comm). stream: the cudaStream_t the collectives are ordered on (the kctx's).
 * Errors without CUDA. */
int comm_nccl_from(comm *c, void *stream, comm **out, mill_err *e);

/* The ops: each checks the comm, and on one rank returns at once. */
int comm_all_reduce(comm *c, void *buf, size_t count, mill_dtype dt, mill_err *e);
int comm_all_reduce_async(comm *c, void *buf, size_t count, mill_dtype dt, mill_err *e);
int comm_flush(comm *c, mill_err *e);
int comm_all_gatherv(comm *c, void *buf, const size_t *counts, const size_t *displs, mill_dtype dt, mill_err *e);
int comm_reduce_scatter(comm *c, void *buf, size_t count, mill_dtype dt, mill_err *e);
int comm_all_to_allv(comm *c, const void *send, const size_t *scounts, const size_t *sdispls, void *recv,
                     const size_t *rcounts, const size_t *rdispls, mill_dtype dt, mill_err *e);
int comm_sendrecv(comm *c, const comm_p2p *ops, int n, mill_dtype dt, mill_err *e);
int comm_broadcast(comm *c, void *buf, size_t count, mill_dtype dt, int root, mill_err *e);
int comm_barrier(comm *c, mill_err *e);
int comm_split(comm *c, int color, int key, const char *name, comm **out, mill_err *e);
/* Ends every rank of the job now (a rank that cannot go on must not leave the others waiting). */
void comm_abort(comm *c, const char *why);
void comm_free(comm *c);

/* Sums (maxes) n host doubles over the group, in place (through c->host: any backend's comm). */
int comm_sum_f64(comm *c, double *v, int n, mill_err *e);
int comm_max_f64(comm *c, double *v, int n, mill_err *e);

/* The watchdog's view of a blocking op (the backends call these around each one). */
void comm_watch_begin(comm *c, const char *op);
void comm_watch_end(comm *c);
/* While idle (1), ops are not watched: a rank waiting for its next request may wait as long as
 * the controller takes (rank 0 waits on its socket meanwhile). */
void comm_watch_idle(comm *c, int idle);

/* The MPI backend (comm_mpi.c) and the NCCL backend (comm_nccl.c, CUDA builds only). */
extern const comm_ops comm_mpi_ops;
extern const comm_ops comm_nccl_ops;

#endif
