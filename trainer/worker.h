/* trainer/worker.h — the trainer worker: one process per rank (a single CPU rank today) that owns
 * the fp32 master weights and the AdamW state, and serves the controller over ZeroMQ.
 * Owns: the GRPO training step (old-policy logprobs recomputed here, routing replay, minibatch
 * updates split into micro-batches), weight publication to rollout engines in buckets (version
 * v+1 after each step), checkpoints, and release/resume of its activation memory in colocated
 * runs. The messages are in trainer/PROTOCOL.md. */
#ifndef MILL_WORKER_H
#define MILL_WORKER_H

#include "../common/err.h"
#include "../common/wire.h"

/* Serves on `bind` (a ROUTER socket; ipc:// or tcp://) until "shutdown"; with curve (not NULL and
 * on) its socket and its publish connections to engines use the run's CURVE keys. */
int trainer_worker_run(const char *bind, const wire_curve *curve, mill_err *e);

#endif
