#include "backend.h"

#include <cblas.h>
#include <string.h>

#ifdef MILL_CUDA
#include "../common/cuda_util.h"
#endif

int kctx_init(kctx *k, mill_device dev, mill_err *e) {
    memset(k, 0, sizeof *k);
    k->device = dev;
    /* OpenBLAS runs single-threaded inside our OpenMP-split GEMMs (kernels/dense.c): a process-wide
     * library setting, made here because every CPU op goes through a kctx. */
    if (dev == DEVICE_CPU) {
        openblas_set_num_threads(1);
        return 0;
    }
#ifdef MILL_CUDA
    return cuda_backend_init(&k->cublas, &k->stream, e);
#else
    return mill_errf(e, "this mill was built without CUDA (nvcc not found at configure time)");
#endif
}

void kctx_free(kctx *k) {
#ifdef MILL_CUDA
    if (k->device == DEVICE_CUDA) cuda_backend_free(k->cublas, k->stream);
#endif
    memset(k, 0, sizeof *k);
}

int kctx_require_cpu(const kctx *k, const char *op, mill_err *e) {
    if (k->device == DEVICE_CPU) return 0;
    return mill_errf(e, "%s: no CUDA implementation yet (run with the CPU backend)", op);
}
