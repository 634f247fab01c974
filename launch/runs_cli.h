/* launch/runs_cli.h — the commands that read the run ledger (common/ledger.h):
 *   mill runs [--ledger PATH]                          every run: id, name, status, steps, last reward
 *                                                      and accuracy, created, out_dir
 *   mill show RUN [--ledger PATH] [--samples N]        one run: fields, per-step metrics, checkpoints,
 *                                                      events, and its N most recent samples
 *   mill plot RUN --out FILE.png [--ledger PATH]       reward, accuracy, kl, entropy and response_len
 *                                                      against step, drawn by gnuplot
 * RUN is a run name or id. The ledger is PATH, else $MILL_LEDGER, else runs/ledger.db relative to
 * the working directory; these commands never create one.
 * Each takes main's argc/argv (argv[1] is the command), prints its result on stdout, and returns the
 * exit status: 0, or 1 after one line "mill CMD: error: ..." on stderr. */
#ifndef MILL_RUNS_CLI_H
#define MILL_RUNS_CLI_H

int cli_runs(int argc, char **argv);
int cli_show(int argc, char **argv);
int cli_plot(int argc, char **argv);

#endif
