/* rollout/server.h — the rollout server: the cached engine behind a ZeroMQ ROUTER socket.
 * Owns: the request loop, continuous batching across requests (samples join the engine as the
 * cache budget allows and leave when finished), weight updates applied between decode steps,
 * release/resume of the engine's memory (on a GPU the device copy of the weights too), and the
 * protocol (rollout/PROTOCOL.md). One thread; it answers messages between engine steps, so a slow
 * client never stalls generation and a malformed message gets an error reply while the server
 * keeps serving. */
#ifndef MILL_SERVER_H
#define MILL_SERVER_H

#include <stddef.h>

#include "../common/wire.h"
#include "../trainer/model.h"
#include "group.h"

typedef struct {
    const char *bind;    /* e.g. tcp://127.0.0.1:5555 (loopback unless told otherwise) */
    size_t cache_budget; /* bytes of sequence caches */
    int max_batch;       /* sequences per engine step */
    mill_device device;  /* where the engine runs (CUDA: a device copy of the weights, refreshed on each swap) */
    const wire_curve *curve; /* the run's CURVE keys (NULL: a plain socket) */
    size_t queue_budget; /* bytes the queued samples' buffers may take (0: 16 GiB); a generate past it
                          * answers error "busy" (backpressure) and queues nothing */
    const kctx *k;       /* the kctx to run on (NULL: the server makes one for device) */
    int exact;           /* rollout.exact: each finished sample's logprobs come from the trainer's forward
                          * (model_forward_backward_tokens over its prompt and tokens, its routing
                          * replayed, kctx.exact), not from decode: the trainer's bits on a GPU
                          * too. One rank only. */
    engine_group *group; /* an engine of several ranks (rollout/group.h; m holds this rank's part, loaded
                          * with its stage; NULL: this process alone): rank 0 serves the socket and leads,
                          * the others follow until it shuts down */
} server_config;

/* Serves until a "shutdown" message; the model's weights may be replaced by update_weights (on an
 * engine of several ranks every rank stages its part of each bucket, and swaps at the same step). */
int rollout_server_run(dsv4_model *m, const server_config *sc, mill_err *e);

#endif
