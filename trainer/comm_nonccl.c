/* trainer/comm_nonccl.c — comm_nccl_from in a build without CUDA: a clear error. */
#include "comm.h"

int comm_nccl_from(comm *c, void *stream, comm **out, mill_err *e) {
    (void)stream;
    *out = NULL;
    return mill_errf(e, "comm %s: this mill was built without CUDA, so there is no NCCL backend", c->name);
}
