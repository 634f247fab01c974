#include "export_cli.h"

#include <stdio.h>
#include <string.h>

#include "../trainer/export.h"

static int export_main(int argc, char **argv, mill_err *e) {
    const char *model = NULL, *out = NULL, *dtype = "bf16", *shard = NULL;
    export_opts o = {.dtype = DTYPE_BF16, .max_shard_bytes = EXPORT_DEFAULT_SHARD_BYTES};
    for (int i = 2; i < argc; i++) {
        const char **slot = !strcmp(argv[i], "--model")            ? &model
                            : !strcmp(argv[i], "--out")            ? &out
                            : !strcmp(argv[i], "--dtype")          ? &dtype
                            : !strcmp(argv[i], "--max-shard-size") ? &shard
                                                                   : NULL;
        if (!strcmp(argv[i], "--force")) o.force = 1;
        else if (!slot) return mill_errf(e, "unknown option %s for mill export", argv[i]);
        else if (i + 1 >= argc) return mill_errf(e, "option %s needs a value", argv[i]);
        else *slot = argv[++i];
    }
    if (!model || !out) return mill_errf(e, "mill export needs --model DIR --out HFDIR");
    /* bf16 by default: the release's dtype for what is not FP8/FP4 and what HF loads it in; fp32
     * keeps a training checkpoint's master weights bit for bit */
    if (!strcmp(dtype, "bf16")) o.dtype = DTYPE_BF16;
    else if (!strcmp(dtype, "fp32")) o.dtype = DTYPE_F32;
    else return mill_errf(e, "--dtype must be bf16 or fp32, got \"%s\"", dtype);
    if (shard && export_parse_size(shard, &o.max_shard_bytes, e)) return -1;
    export_report r;
    if (export_hf(model, out, &o, &r, e)) return -1;
    printf("mill export: %s%s -> %s: %d tensors, %.3f GB (%s) in %d file%s, %d tokenizer/generation file%s copied; "
           "%d mtp.* tensor%s dropped (HF's DeepseekV4 has no MTP block)\n",
           model, r.checkpoint ? " (training checkpoint)" : "", out, r.tensors, (double)r.bytes / 1e9,
           o.dtype == DTYPE_BF16 ? "bf16, HF's fp32 modules F32" : "fp32", r.files, r.files == 1 ? "" : "s",
           r.copied, r.copied == 1 ? "" : "s", r.dropped, r.dropped == 1 ? "" : "s");
    return 0;
}

int cli_export(int argc, char **argv) {
    mill_err e = {{0}};
    if (export_main(argc, argv, &e) == 0) return 0;
    fprintf(stderr, "mill export: error: %s\n", e.msg);
    return 1;
}
