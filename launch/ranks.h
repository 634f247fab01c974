/* launch/ranks.h — starting and joining the ranks of a parallel command.
 * Owns: the --tp --pp --ep --cp --dp --vpp --pp-layers --pp-dtype options, the choice between starting the ranks here (a
 * command whose world is over 1, run by hand, execs `mpiexec -n WORLD` on itself) and joining a
 * launch already made (mpiexec or srun started this process: comm_in_launch), and the mpiexec
 * that is used (MILL_MPIEXEC, else the launcher of the MPI mill was built with, on PATH: MPICH's
 * mpiexec.hydra or mpiexec.mpich, then plain mpiexec, which may be another MPI's). */
#ifndef MILL_RANKS_H
#define MILL_RANKS_H

#include "../trainer/parallel.h"

/* Reads --tp/--pp/--ep/--cp/--dp/--vpp N (absent: 1; each at most once), --pp-layers and
 * --pp-dtype from argv into *s. */
int ranks_parse(int argc, char **argv, par_sizes *s, mill_err *e);
/* The same for a rollout engine (rollout/group.h): --tp and --ep only (any other layout option is an
 * error), both dividing the larger, laid out as tp x attention groups (dp) with the experts folded
 * over them (par_sizes.fold): world = max(tp, ep). */
int ranks_engine_sizes(int argc, char **argv, par_sizes *s, mill_err *e);
/* 1 when argv[i] is one of the layout options. */
int ranks_is_option(const char *arg);
/* Checks the layout against the model (cfg, NULL: none) and the batch (batch_rows, 0: none) first,
 * so a bad layout is one error line before any rank starts. world = tp * pp * cp * dp: over 1 and
 * outside a launch, execs mpiexec on this command (does not return unless that fails). Otherwise
 * joins: *world gets the job's world comm (one rank without a launch), checked against the sizes. */
int ranks_start(int argc, char **argv, const par_sizes *s, const dsv4_config *cfg, long batch_rows, comm **world,
                mill_err *e);
/* The mpiexec to start ranks with (a full path), or an error naming what was tried. */
int ranks_mpiexec(char *path, size_t n, mill_err *e);

#endif
