/* launch/main.c — the `mill` command line.
 * Subcommands so far: forward, info. runs/show/plot live in runs_cli.c. Each error
 * is one line on stderr and a non-zero exit status. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../common/safetensors.h"
#include "../kernels/dense.h"
#include "../trainer/model.h"
#include "../rollout/generate.h"
#include "../rollout/server.h"
#include "../common/ledger.h"
#include "../trainer/worker.h"
#include "grpo.h"
#include "ranks.h"
#include "../trainer/dist.h"
#include "download_cli.h"
#include "export_cli.h"
#include "reward_cli.h"
#include "runs_cli.h"
#include "sft.h"
#include "tokenize_cli.h"
#include <errno.h>
#include <sys/stat.h>

static int usage(FILE *to) {
    fprintf(to,
            "usage: mill <command> [options]\n"
            "  forward --model DIR --input IN.json --output OUT.safetensors [--device auto|cpu|cuda] [--dp N] [--pp N]\n"
            "          IN.json: {\"input_ids\": [[...], ...]} (rows of equal length); OUT holds logits [B, T, vocab] f32\n"
            "          (and routing [layers, B, T, k] I32, the experts each token used)\n"
            "  grad    --model DIR --input IN.json --output OUT.safetensors [--device auto|cpu|cuda] [--dp N] [--pp N]\n"
            "          [--micro-batches N]  (the rows of each rank in N micro-batches, through the stages by 1F1B)\n"
            "          mean next-token cross-entropy over all B*(T-1) positions (labels = inputs shifted by one):\n"
            "          OUT holds loss [1] and grad.<original tensor name> (f32) for every tensor the loss reaches\n"
            "  generate --model DIR --input IN.json --max-new-tokens N --temperature T [--top-p P] [--top-k K]\n"
            "          [--seed S] [--stop ID]... [--cache-mb MB] [--device auto|cpu|cuda] --output OUT.json\n"
            "          [--routing ROUTING.safetensors] [--tp N] [--ep N]\n"
            "          OUT: output_ids, logprobs, finish_reason per row (rows may differ in length);\n"
            "          ROUTING: routing.<row> [layers, prompt+generated, k] expert ids (U8, or U16 past 256 experts)\n"
            "  rollout-server --model DIR --bind ADDR [--cache-mb MB] [--max-batch N] [--queue-mb MB] [--device auto|cpu|cuda]\n"
            "          [--curve FILE] [--tp N] [--ep N] [--exact on|off]\n"
            "          serve generation over ZeroMQ (rollout/PROTOCOL.md); ADDR e.g. tcp://127.0.0.1:5555;\n"
            "          --exact on: each finished sample's logprobs from the training step's forward (its bits;\n"
            "          one rank)\n"
            "          generate and rollout-server on an engine of max(tp, ep) ranks (started with mpiexec): tp\n"
            "          splits the heads and vocabulary, ep the experts; the tp groups run attention data-parallel\n"
            "  info    --model DIR [--dp N]   config, layer schedule and parameter counts (and what a rank holds at dp N)\n"
            "  reward  --input IN.jsonl --output OUT.jsonl [--remote URL] [--timeout S]   score responses against\n"
            "          labels ({\"response\", \"label\"} per line -> {\"reward\", \"extracted\"}) with the math\n"
            "          verifier, or an HTTP scorer: a dataset and a reward checked before a run\n"
            "  tokenize --tokenizer DIR --input IN.jsonl --output OUT.jsonl [--chat deepseek-v4|none] [--thinking]\n"
            "          [--reasoning-effort high|max] [--keep-thinking]   a tokenizer.json and the chat format, line by\n"
            "          line: {\"text\"} -> {\"ids\"}, {\"ids\"} -> {\"text\"}, {\"messages\"} -> {\"text\", \"ids\"}\n"
            "  download REPO_ID --out DIR [--revision R] [--include GLOB]... [--repo-type model|dataset]   a hub repo's\n"
            "          files, resumed and hash-checked ($HF_ENDPOINT, $HF_TOKEN; [--timeout S] [--retries N] [--verify])\n"
            "  init    --config configs/models/NAME.json --out DIR [--seed S] [--std 0.02]\n"
            "          a randomly initialised model in the original release format\n"
            "  export  --model DIR --out HFDIR [--dtype bf16|fp32] [--max-shard-size 5GB] [--force]   a model or\n"
            "          training checkpoint in HF transformers' layout (DeepseekV4ForCausalLM.from_pretrained(HFDIR))\n"
            "  sft     RECIPE.yaml [--device auto|cpu|cuda] [--resume CHECKPOINT_DIR] [--dp N] [--pp N]   supervised\n"
            "          fine-tuning\n"
            "          (configs/runs/sft-*.yaml); --device overrides the recipe's train.device (default auto)\n"
            "  run     RECIPE.yaml [--set key=value]...   a GRPO run (configs/runs/grpo-*.yaml): starts the trainer\n"
            "          worker and rollout engines, records every step in the run ledger\n"
            "  resume  RUN [--ledger PATH]   continue a stopped run from its last complete checkpoint\n"
            "  trainer-worker --bind ADDR [--curve FILE]    the trainer process a run starts (trainer/PROTOCOL.md)\n"
            "  keys    --out FILE       CURVE keys for a run across hosts (rollout.curve_keys, --curve)\n"
            "  runs    [--ledger PATH]  the runs in the ledger: status, steps, last reward and accuracy\n"
            "  show    RUN [--ledger PATH] [--samples N]   a run's fields, step metrics, checkpoints, events\n"
            "  plot    RUN --out FILE.png [--ledger PATH]  reward, accuracy, kl, entropy, response_len by step (gnuplot)\n"
            "          RUN: a run name or id; the ledger: --ledger, else $MILL_LEDGER, else runs/ledger.db\n"
            "          (mill run uses the recipe's `ledger:` key, with the same default)\n"
            "  layout: --tp N --pp N --ep N --cp N --dp N [--vpp N] [--pp-layers 2,1,1] [--pp-dtype auto|fp32|bf16]\n"
            "          [--sp on|off] (sequence parallelism over the tp ranks)\n"
            "          on forward, grad and sft (recipes: train.parallel.*; vpp: model chunks per pipeline rank,\n"
            "          the interleaved 1F1B; pp_layers: each (virtual) stage's layer count, else an even split;\n"
            "          pp_dtype: the streams between stages, auto = bf16 on a GPU) start tp x pp x cp x dp ranks\n"
            "          with mpiexec (or join the mpiexec / srun launch they run in); dp and pp (stages, 1F1B,\n"
            "          interleaved), ep (experts over ranks), tp (heads and vocabulary over ranks), sp and cp\n"
            "          (positions over ranks; forward, grad and sft) work\n");
    return to == stderr ? 2 : 0;
}

/* --name VALUE pairs; returns NULL when absent. */
static const char *opt(int argc, char **argv, const char *name) {
    for (int i = 0; i + 1 < argc; i++)
        if (strcmp(argv[i], name) == 0) return argv[i + 1];
    return NULL;
}

static int check_opts(int argc, char **argv, const char *const *known, mill_err *e) {
    for (int i = 2; i < argc; i += 2) {
        int ok = 0;
        for (const char *const *k = known; *k; k++) ok |= strcmp(argv[i], *k) == 0;
        if (!ok) return mill_errf(e, "unknown option %s for mill %s", argv[i], argv[1]);
        if (i + 1 >= argc) return mill_errf(e, "option %s needs a value", argv[i]);
    }
    return 0;
}

/* Reads {"input_ids": [[int, ...], ...]}, ids in [0, vocab). Rows must be of equal length unless
 * lens is given ([B] row lengths; ids then [B, max length], right-padded with 0). */
static int read_input_rows(const char *path, int vocab, int32_t **ids_out, int *B, int *T, int **lens, mill_err *e) {
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    if (!root && jerr.line < 0) return mill_errf(e, "%s: cannot read: %s", path, jerr.text);
    if (!root) return mill_errf(e, "%s: not valid JSON (line %d: %s)", path, jerr.line, jerr.text);
    int rc = -1;
    int32_t *ids = NULL;
    json_t *rows = json_object_get(root, "input_ids");
    if (!json_is_array(rows) || json_array_size(rows) == 0) {
        mill_errf(e, "%s: expected key \"input_ids\" holding a non-empty list of rows", path);
        goto done;
    }
    *B = (int)json_array_size(rows);
    json_t *r0 = json_array_get(rows, 0);
    if (!json_is_array(r0) || json_array_size(r0) == 0) {
        mill_errf(e, "%s: input_ids[0] must be a non-empty list of token ids", path);
        goto done;
    }
    *T = (int)json_array_size(r0);
    for (int b = 0; lens && b < *B; b++) {
        json_t *row = json_array_get(rows, (size_t)b);
        if (json_is_array(row) && (int)json_array_size(row) > *T) *T = (int)json_array_size(row);
    }
    ids = calloc((size_t)*B * (size_t)*T, sizeof(int32_t));
    if (lens) *lens = calloc((size_t)*B, sizeof(int));
    if (!ids || (lens && !*lens)) {
        mill_errf(e, "%s: out of memory", path);
        goto done;
    }
    for (int b = 0; b < *B; b++) {
        json_t *row = json_array_get(rows, (size_t)b);
        int len = json_is_array(row) ? (int)json_array_size(row) : -1;
        if (lens && len <= 0) {
            mill_errf(e, "%s: input_ids[%d] must be a non-empty list of token ids", path, b);
            goto done;
        }
        if (!lens && len != *T) {
            mill_errf(e, "%s: input_ids[%d] must be a list of %d token ids (rows of equal length)", path, b, *T);
            goto done;
        }
        if (lens) (*lens)[b] = len;
        for (int t = 0; t < len; t++) {
            json_t *v = json_array_get(row, (size_t)t);
            if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= vocab) {
                mill_errf(e, "%s: input_ids[%d][%d] must be an integer token id in [0, %d)", path, b, t, vocab);
                goto done;
            }
            ids[(long)b * *T + t] = (int32_t)json_integer_value(v);
        }
    }
    *ids_out = ids;
    ids = NULL;
    rc = 0;
done:
    free(ids);
    if (rc && lens) {
        free(*lens);
        *lens = NULL;
    }
    json_decref(root);
    return rc;
}

static int read_input_ids(const char *path, int vocab, int32_t **ids_out, int *B, int *T, mill_err *e) {
    return read_input_rows(path, vocab, ids_out, B, T, NULL, e);
}

/* --device auto|cpu|cuda (default auto: the GPU when there is one). */
static int opt_device(int argc, char **argv, mill_device *dev, mill_err *e) {
    const char *d = opt(argc, argv, "--device");
    if (kctx_device_parse(d ? d : "auto", dev)) return mill_errf(e, "--device must be auto, cpu or cuda, got \"%s\"", d);
    return 0;
}

/* --curve FILE: the run's CURVE keys (mill keys), or plain sockets. */
static int opt_curve(int argc, char **argv, wire_curve *c, mill_err *e) {
    const char *f = opt(argc, argv, "--curve");
    memset(c, 0, sizeof *c);
    return f ? wire_curve_load(c, f, e) : 0;
}

/* The model to run on k's device: m itself on the CPU, else a device copy in *dm. */
static const dsv4_model *model_on(const dsv4_model *m, dsv4_model *dm, const kctx *k, mill_err *e) {
    if (k->device == DEVICE_CPU) return m;
    return model_to_device(dm, m, k, e) ? NULL : dm;
}

static int parse_num(const char *name, const char *v, double lo, double hi, double *out, mill_err *e);

/* The known options of a command plus the layout options (--tp ... --dp). */
static int check_opts_par(int argc, char **argv, const char *const *known, mill_err *e) {
    const char *all[40];
    int n = 0;
    for (const char *const *k = known; *k && n < 26; k++) all[n++] = *k;
    const char *par[] = {"--tp", "--pp", "--ep", "--cp", "--dp", "--vpp", "--pp-layers", "--pp-dtype", "--sp"};
    for (int i = 0; i < 9; i++) all[n++] = par[i];
    all[n] = NULL;
    return check_opts(argc, argv, all, e);
}

/* Joins (or starts: mpiexec) the ranks that the layout options ask for, once the layout has been
 * checked against the model in dir and the input's rows (every bad layout fails here, on one line). */
static int start_ranks(int argc, char **argv, const char *dir, const char *in, par_sizes *s, comm **world, mill_err *e) {
    dsv4_config cfg;
    int32_t *ids = NULL;
    int B = 0, T = 0;
    if (ranks_parse(argc, argv, s, e) || config_load(dir, &cfg, e) || read_input_ids(in, cfg.vocab_size, &ids, &B, &T, e))
        return -1;
    free(ids);
    return ranks_start(argc, argv, s, &cfg, B, world, e);
}

/* Every rank's rows of [rows, width] values (rank r's at rows_lo(r)) gathered on every rank, in place. */
static int gather_rows(dist_ctx *d, void *buf, long rows, long width, mill_dtype dt, mill_err *e) {
    comm *c = d->par.dp;
    size_t *cnt = malloc(sizeof(size_t) * 2 * (size_t)c->size), *dsp = cnt ? cnt + c->size : NULL;
    if (!cnt) return mill_errf(e, "out of memory");
    for (int r = 0; r < c->size; r++) {
        long lo, hi;
        par_range(rows, r, c->size, &lo, &hi);
        dsp[r] = (size_t)(lo * width);
        cnt[r] = (size_t)((hi - lo) * width);
    }
    int rc = comm_all_gatherv(c, buf, cnt, dsp, dt, e);
    free(cnt);
    return rc;
}

/* Every tp rank's columns of rows x cols floats (rank r's slice of cols, [rows, its width], at buf
 * on entry) into whole rows [rows, cols] at buf on every rank: the output of `mill forward`. */
static int gather_columns(comm *c, float *buf, long rows, int cols, mill_err *e) {
    if (c->size == 1 || rows == 0) return 0;
    size_t *cnt = malloc(sizeof(size_t) * 2 * (size_t)c->size), *dsp = cnt ? cnt + c->size : NULL;
    float *all = malloc(sizeof(float) * (size_t)rows * (size_t)cols);
    int rc = !cnt || !all ? mill_errf(e, "forward: out of memory for the logits") : 0;
    for (int r = 0; !rc && r < c->size; r++) {
        int64_t lo, hi;
        model_vocab_split(cols, c->size, r, &lo, &hi);
        cnt[r] = (size_t)(rows * (hi - lo)), dsp[r] = (size_t)(rows * lo);
        if (r == c->rank) memcpy(all + dsp[r], buf, sizeof(float) * cnt[r]);
    }
    rc = rc || comm_all_gatherv(c, all, cnt, dsp, DTYPE_F32, e);
    for (int r = 0; !rc && r < c->size; r++) { /* [rows, width] blocks into whole rows */
        long w = (long)cnt[r] / rows, lo = (long)dsp[r] / rows;
        for (long i = 0; i < rows; i++) memcpy(buf + i * cols + lo, all + dsp[r] + i * w, sizeof(float) * (size_t)w);
    }
    free(cnt);
    free(all);
    return rc;
}

/* Every cp rank's positions of rows rows (rank r's [rows, its slice of T, width] at mine) into whole
 * rows [rows, T, width] at out, on every rank: the output of `mill forward`. */
static int gather_positions(comm *c, const void *mine, void *out, long rows, int T, size_t width, mill_dtype dt,
                            mill_err *e) {
    size_t es = dtype_size(dt), *cnt = malloc(sizeof(size_t) * 2 * (size_t)c->size), *dsp = cnt ? cnt + c->size : NULL;
    char *all = malloc(es * (size_t)rows * (size_t)T * width + 1);
    int rc = !cnt || !all ? mill_errf(e, "forward: out of memory for the outputs") : 0;
    for (int r = 0; !rc && r < c->size; r++) {
        int64_t lo, hi;
        model_split_range(T, c->size, r, &lo, &hi);
        cnt[r] = (size_t)(rows * (hi - lo)) * width, dsp[r] = (size_t)(rows * lo) * width;
        if (r == c->rank) memcpy(all + dsp[r] * es, mine, es * cnt[r]);
    }
    rc = rc || comm_all_gatherv(c, all, cnt, dsp, dt, e);
    for (int r = 0; !rc && r < c->size; r++) { /* [rows, n, width] blocks into whole rows */
        size_t n = cnt[r] / (size_t)rows / width, lo = dsp[r] / (size_t)rows / width;
        for (long i = 0; i < rows; i++)
            memcpy((char *)out + es * ((size_t)i * (size_t)T + lo) * width, all + es * (dsp[r] + (size_t)i * n * width),
                   es * n * width);
    }
    free(cnt);
    free(all);
    return rc;
}

/* The forward of this rank's rows, one op of the pipeline at a time (forwards only). */
typedef struct {
    const kctx *k;
    const int32_t *ids;
    int B, T;
    float *logits;
    int32_t *routing;
    arena *a;
} fwd_run;

static int forward_op(void *ctx, const pipe_op *op, const dsv4_model *chunk, mill_err *e) {
    (void)op;
    const fwd_run *r = ctx;
    return model_forward(chunk, r->k, r->ids, r->B, r->T, r->logits, r->routing, r->a, e);
}

static int cmd_forward(int argc, char **argv, comm **world, mill_err *e) {
    static const char *const known[] = {"--model", "--input", "--output", "--device", NULL};
    if (check_opts_par(argc, argv, known, e)) return -1;
    const char *dir = opt(argc, argv, "--model"), *in = opt(argc, argv, "--input"), *out = opt(argc, argv, "--output");
    if (!dir || !in || !out) return mill_errf(e, "mill forward needs --model DIR --input IN.json --output OUT.safetensors");
    mill_device dev;
    par_sizes ps;
    if (opt_device(argc, argv, &dev, e) || start_ranks(argc, argv, dir, in, &ps, world, e)) return -1;
    dsv4_model m = {0}, dm = {0};
    dsv4_config cfg;
    int rc = -1, B = 0, T = 0;
    int32_t *ids = NULL, *routing = NULL, *rl = NULL, *rc_ = NULL;
    float *logits = NULL, *lc = NULL; /* lc, rc_: this rank's positions' logits and routing */
    arena a = {0};
    kctx k = {0};
    dist_ctx d = {0};
    tensor tl = {0}, tr = {0}; /* logits and routing on the device */
    dsv4_model *run = NULL;
    safetensors_writer *w = NULL;
    if (config_load(dir, &cfg, e) || kctx_init(&k, dev, e) || read_input_ids(in, cfg.vocab_size, &ids, &B, &T, e) ||
        dist_init(&d, *world, &ps, &cfg, B, &k, e) || model_load_stage(&m, dir, &d.stage, e)) /* this rank's layers */
        goto done;
    if (!(run = (dsv4_model *)model_on(&m, &dm, &k, e))) goto done;
    dist_ep_io(&d, run); /* routed experts over the ep ranks */
    const dsv4_config *c = &m.cfg;
    long N = (long)B * T, r0, r1;
    dist_rows(&d, B, &r0, &r1); /* this rank's rows */
    int64_t p0, p1; /* context parallelism: this rank's positions of its rows */
    model_split_range(T, d.par.sz.cp, d.par.cp_rank, &p0, &p1);
    long Nl = (r1 - r0) * T, Nc = (r1 - r0) * (p1 - p0), L = c->num_hidden_layers, K = c->num_experts_per_tok;
    logits = malloc(sizeof(float) * (size_t)N * (size_t)c->vocab_size);
    routing = malloc(sizeof(int32_t) * (size_t)(L * N * K));
    rl = malloc(sizeof(int32_t) * (size_t)(L * N * K));
    lc = malloc(sizeof(float) * (size_t)Nc * (size_t)c->vocab_size);
    rc_ = malloc(sizeof(int32_t) * (size_t)(L * Nc * K));
    if (!logits || !routing || !rl || !lc || !rc_) {
        mill_errf(e, "forward: out of memory for %ld x %d logits", N, c->vocab_size);
        goto done;
    }
    int v0, v1; /* tensor parallelism: this rank's columns of the logits */
    model_vocab_range(run, &v0, &v1);
    int64_t nl = Nc * (v1 - v0), nr = L * Nc * K;
    if (arena_init_device(&a, 64 << 20, dev, k.stream, e) || tensor_alloc(&tl, DTYPE_F32, dev, 1, &nl, e) ||
        tensor_alloc(&tr, DTYPE_I32, dev, 1, &nr, e))
        goto done;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    fwd_run fr = {&k, ids + r0 * T, (int)(r1 - r0), T, tl.data, tr.data, &a};
    size_t elems = dist_stream_elems(&d, run, r1 - r0, T); /* the streams between stages */
    if (dist_pipeline(&d, run, 1, 0, &elems, forward_op, &fr, e) || op_copy_to_host(&k, lc, tl.data, tensor_nbytes(&tl), e) ||
        op_copy_to_host(&k, rc_, tr.data, tensor_nbytes(&tr), e) || gather_columns(d.par.tp, lc, Nc, c->vocab_size, e) ||
        gather_positions(d.par.cp, lc, logits + r0 * T * c->vocab_size, r1 - r0, T, (size_t)c->vocab_size, DTYPE_F32, e))
        goto done;
    for (long l = 0; l < L; l++)
        if (gather_positions(d.par.cp, rc_ + l * Nc * K, rl + l * Nl * K, r1 - r0, T, (size_t)K, DTYPE_I32, e)) goto done;
    /* stages: each filled its layers' routing (the rest is zero) and the last one the logits */
    if (comm_all_reduce(d.par.pp, rl, (size_t)(L * Nl * K), DTYPE_I32, e) ||
        comm_all_reduce(d.par.pp, logits + r0 * T * c->vocab_size, (size_t)(Nl * c->vocab_size), DTYPE_F32, e))
        goto done;
    /* routing [L, rows * T, K]: each layer's rows gathered from the ranks */
    for (long l = 0; l < L; l++) {
        memcpy(routing + (l * N + r0 * T) * K, rl + l * Nl * K, sizeof(int32_t) * (size_t)(Nl * K));
        if (gather_rows(&d, routing + l * N * K, B, T * K, DTYPE_I32, e)) goto done;
    }
    if (gather_rows(&d, logits, B, (long)T * c->vocab_size, DTYPE_F32, e)) goto done;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double sec = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    if (d.par.rank != 0) { /* rank 0 writes the output */
        rc = 0;
        goto done;
    }
    w = safetensors_writer_new();
    int64_t ls[3] = {B, T, c->vocab_size}, rs[4] = {c->num_hidden_layers, B, T, c->num_experts_per_tok};
    if (!w || safetensors_writer_add(w, "logits", DTYPE_F32, 3, ls, logits, e) ||
        safetensors_writer_add(w, "routing", DTYPE_I32, 4, rs, routing, e) ||
        safetensors_writer_save(w, out, e))
        goto done;
    log_info("forward: %d x %d tokens in %.3f s (%.0f tokens/s) on %d rank(s) -> %s", B, T, sec, (double)N / sec,
             d.par.world, out);
    rc = 0;
done:
    safetensors_writer_free(w);
    arena_free(&a);
    tensor_free(&tl);
    tensor_free(&tr);
    model_free(&dm);
    dist_free(&d);
    kctx_free(&k);
    free(ids);
    free(logits);
    free(routing);
    free(rl);
    free(lc);
    free(rc_);
    model_free(&m);
    return rc;
}

/* 1234567 -> "1.23 M" */
static const char *human(double x, char *buf, size_t n) {
    const char *unit[] = {"", " K", " M", " B", " T"};
    int u = 0;
    while (x >= 1000 && u < 4) {
        x /= 1000;
        u++;
    }
    snprintf(buf, n, u ? "%.2f%s" : "%.0f%s", x, unit[u]);
    return buf;
}

static int cmd_grad(int argc, char **argv, comm **world, mill_err *e) {
    static const char *const known[] = {"--model", "--input", "--output", "--device", "--micro-batches", NULL};
    if (check_opts_par(argc, argv, known, e)) return -1;
    const char *dir = opt(argc, argv, "--model"), *in = opt(argc, argv, "--input"), *out = opt(argc, argv, "--output");
    if (!dir || !in || !out) return mill_errf(e, "mill grad needs --model DIR --input IN.json --output OUT.safetensors");
    mill_device dev;
    par_sizes ps;
    double mbs = 1; /* micro-batches of this rank's rows, through the stages by 1F1B */
    if (opt(argc, argv, "--micro-batches") &&
        parse_num("--micro-batches", opt(argc, argv, "--micro-batches"), 1, 1 << 20, &mbs, e))
        return -1;
    if (ranks_parse(argc, argv, &ps, e) || par_validate_micro(&ps, (long)mbs, e) || opt_device(argc, argv, &dev, e) ||
        start_ranks(argc, argv, dir, in, &ps, world, e))
        return -1;
    int n_micro = (int)mbs;
    dsv4_model m = {0}, dm = {0};
    dsv4_config cfg;
    int rc = -1, B = 0, T = 0;
    int32_t *ids = NULL, *targets = NULL;
    float *grads = NULL;
    arena *arenas = NULL; /* one per micro-batch and model chunk */
    int n_arenas = 0;
    kctx k = {0};
    dist_ctx d = {0};
    tensor tg = {0}; /* the gradients on the device */
    dsv4_model *run = NULL, full = {0}; /* full: the gradients in the whole model's layout */
    safetensors_writer *w = NULL;
    if (config_load(dir, &cfg, e) || kctx_init(&k, dev, e) || read_input_ids(in, cfg.vocab_size, &ids, &B, &T, e) ||
        dist_init(&d, *world, &ps, &cfg, B, &k, e) || model_load_stage(&m, dir, &d.stage, e)) /* this rank's layers */
        goto done;
    if (!(run = (dsv4_model *)model_on(&m, &dm, &k, e))) goto done;
    dist_ep_io(&d, run); /* routed experts over the ep ranks */
    if (T < 2) {
        mill_errf(e, "%s: rows need at least 2 tokens for a next-token loss", in);
        goto done;
    }
    targets = malloc(sizeof(int32_t) * (size_t)B * (size_t)T);
    grads = calloc(m.n_floats, sizeof(float));
    if (!targets || !grads) {
        mill_errf(e, "grad: out of memory");
        goto done;
    }
    for (int b = 0; b < B; b++) /* labels = inputs shifted by one; the last position has none */
        for (int t = 0; t < T; t++) targets[b * T + t] = t + 1 < T ? ids[b * T + t + 1] : -1;
    int64_t nf = (int64_t)m.n_floats;
    if (n_micro > B / ps.dp) {
        mill_errf(e, "--micro-batches %d: each rank has only %d rows", n_micro, B / ps.dp);
        goto done;
    }
    n_arenas = n_micro * par_vpp(&ps);
    if (!(arenas = calloc((size_t)n_arenas, sizeof *arenas))) {
        mill_errf(e, "grad: out of memory");
        goto done;
    }
    for (int i = 0; i < n_arenas; i++)
        if (arena_init_device(&arenas[i], 64 << 20, dev, k.stream, e)) goto done;
    if (tensor_alloc(&tg, DTYPE_F32, dev, 1, &nf, e)) goto done;
    model_loss loss;
    long r0, r1;
    dist_rows(&d, B, &r0, &r1); /* this rank's rows; the gradients are summed over the ranks */
    dist_hook(&d, run, tg.data);
    if (dist_ce_step(&d, run, &k, ids + r0 * T, targets + r0 * T, (int)(r1 - r0), T, n_micro, tg.data, &loss, arenas,
                     e) ||
        comm_flush(d.dp, e) || op_copy_to_host(&k, grads, tg.data, tensor_nbytes(&tg), e))
        goto done;
    dist_unhook(run);
    /* every tp rank routes the same rows (the experts are not sliced): tp copies */
    double ep_bytes = d.ep_bytes, ep_uniform = (double)B * T * cfg.num_experts_per_tok * (ps.ep - 1) / ps.ep *
                                             (4.0 * cfg.hidden_size * sizeof(float) + sizeof(int32_t)) *
                                             cfg.num_hidden_layers * ps.tp;
    double act = 0; /* activation memory: the arenas' peaks (micro-batches in flight at once), the largest rank's */
    for (int i = 0; i < n_arenas; i++) act += (double)arenas[i].peak;
    if (comm_sum_f64(*world, &ep_bytes, 1, e) || comm_max_f64(*world, &act, 1, e)) goto done;
    /* every stage's gradients (in its own layout) into the whole model's layout */
    if (model_init(&full, &cfg, e) || dist_gather_stages(&d, grads, NULL, &full, e)) goto done;
    int n_out = 0;
    if (d.par.rank == 0) { /* rank 0 writes the output */
        w = safetensors_writer_new();
        int64_t one = 1;
        float lossf = (float)loss.loss;
        if (!w || safetensors_writer_add(w, "loss", DTYPE_F32, 1, &one, &lossf, e)) goto done;
        for (int i = 0; i < full.n_params; i++) {
            const param_info *p = &full.params[i];
            if (!model_param_has_grad(p)) continue;
            char name[128];
            snprintf(name, sizeof name, "grad.%s", p->name);
            if (safetensors_writer_add(w, name, DTYPE_F32, p->ndim, p->shape, full.data + p->offset, e)) goto done;
            n_out++;
        }
        if (safetensors_writer_save(w, out, e)) goto done;
    }
    if (d.par.rank != 0) {
        rc = 0;
        goto done;
    }
    log_info("grad: loss %.6f over %ld positions, %d gradient tensors, %d rank(s) -> %s; activations %.1f MiB on the "
             "largest rank", loss.loss, loss.count, n_out, d.par.world, out, act / 1048576.0);
    if (ps.ep > 1) /* measured against what uniform routing sends: 4 row moves (x, y; dy, dx) and the expert ids */
        log_info("grad: the expert all-to-alls sent %.3f MiB to other ranks; uniform routing: %.3f MiB (x%.3f)",
                 ep_bytes / 1048576.0, ep_uniform / 1048576.0, ep_bytes / ep_uniform);
    rc = 0;
done:
    safetensors_writer_free(w);
    for (int i = 0; arenas && i < n_arenas; i++) arena_free(&arenas[i]);
    free(arenas);
    tensor_free(&tg);
    model_free(&dm);
    dist_free(&d);
    kctx_free(&k);
    free(ids);
    free(targets);
    free(grads);
    model_free(&full);
    model_free(&m);
    return rc;
}

static int cmd_init(int argc, char **argv, mill_err *e) {
    static const char *const known[] = {"--config", "--out", "--seed", "--std", NULL};
    if (check_opts(argc, argv, known, e)) return -1;
    const char *cfgp = opt(argc, argv, "--config"), *out = opt(argc, argv, "--out");
    const char *seed_s = opt(argc, argv, "--seed"), *std_s = opt(argc, argv, "--std");
    if (!cfgp || !out) return mill_errf(e, "mill init needs --config FILE --out DIR");
    char *end;
    unsigned long long seed = seed_s ? strtoull(seed_s, &end, 10) : 1;
    if (seed_s && *end) return mill_errf(e, "--seed must be a non-negative integer, got \"%s\"", seed_s);
    double std = std_s ? strtod(std_s, &end) : 0.02;
    if (std_s && (*end || std <= 0)) return mill_errf(e, "--std must be a positive number, got \"%s\"", std_s);
    dsv4_config cfg;
    dsv4_model m;
    if (config_load(cfgp, &cfg, e) || model_init(&m, &cfg, e)) return -1;
    model_init_random(&m, seed, (float)std);
    int rc = -1;
    if (mkdir(out, 0755) && errno != EEXIST) mill_errf(e, "%s: cannot create: %s", out, strerror(errno));
    else if (!model_save(&m, out, e)) rc = 0;
    if (!rc) printf("initialised %zu parameters (seed %llu, std %g) -> %s\n", m.n_trainable, seed, std, out);
    model_free(&m);
    return rc;
}

static int cmd_sft(int argc, char **argv, comm **world, mill_err *e) {
    if (argc < 3 || argv[2][0] == '-')
        return mill_errf(e, "mill sft needs a recipe: mill sft RECIPE.yaml [--device auto|cpu|cuda] [--resume DIR] "
                            "[--tp N --pp N --ep N --cp N --dp N]");
    for (int i = 3; i < argc; i += 2) {
        if (strcmp(argv[i], "--resume") != 0 && strcmp(argv[i], "--device") != 0 && !ranks_is_option(argv[i]))
            return mill_errf(e, "unknown option %s for mill sft", argv[i]);
        if (i + 1 >= argc) return mill_errf(e, "option %s needs a value", argv[i]);
    }
    const char *dev = opt(argc, argv, "--device"); /* overrides the recipe's train.device */
    mill_device d = DEVICE_CPU;
    if (dev && kctx_device_parse(dev, &d)) return mill_errf(e, "--device must be auto, cpu or cuda, got \"%s\"", dev);
    sft_recipe r;
    par_sizes ps;
    if (sft_recipe_load(argv[2], &r, e) || ranks_parse(argc, argv, &ps, e)) return -1;
    if (dev) r.device = d;
    int *rp[8] = {&r.par.tp, &r.par.pp, &r.par.ep, &r.par.cp, &r.par.dp, &r.par.vpp, &r.par.pp_wire, &r.par.sp};
    int *cp[8] = {&ps.tp, &ps.pp, &ps.ep, &ps.cp, &ps.dp, &ps.vpp, &ps.pp_wire, &ps.sp};
    const char *names[8] = {"--tp", "--pp", "--ep", "--cp", "--dp", "--vpp", "--pp-dtype", "--sp"};
    for (int i = 0; i < 8; i++) /* the command line's layout over the recipe's */
        if (opt(argc, argv, names[i])) *rp[i] = *cp[i];
    if (opt(argc, argv, "--pp-layers")) memcpy(r.par.pp_layers, ps.pp_layers, sizeof ps.pp_layers);
    dsv4_config cfg; /* the layout is checked against the model before any rank starts */
    const char *resume = opt(argc, argv, "--resume");
    if (config_load(resume ? resume : *r.init_from ? r.init_from : r.model_config, &cfg, e) ||
        par_validate_micro(&r.par, r.micro_batches, e) || ranks_start(argc, argv, &r.par, &cfg, r.batch_size, world, e))
        return -1;
    return sft_run(&r, resume, *world, e);
}

static int parse_num(const char *name, const char *v, double lo, double hi, double *out, mill_err *e) {
    char *end;
    *out = strtod(v, &end);
    if (*end || !(*out >= lo && *out <= hi)) return mill_errf(e, "%s must be a number in [%g, %g], got \"%s\"", name, lo, hi, v);
    return 0;
}

static int cmd_generate(int argc, char **argv, comm **world, mill_err *e) {
    static const char *const known[] = {"--model", "--input", "--output", "--max-new-tokens", "--temperature",
                                        "--top-p", "--top-k", "--seed", "--stop", "--routing", "--cache-mb",
                                        "--device", NULL};
    if (check_opts_par(argc, argv, known, e)) return -1;
    const char *dir = opt(argc, argv, "--model"), *in = opt(argc, argv, "--input"), *out = opt(argc, argv, "--output");
    const char *mnt = opt(argc, argv, "--max-new-tokens"), *temp = opt(argc, argv, "--temperature");
    if (!dir || !in || !out || !mnt || !temp)
        return mill_errf(e, "mill generate needs --model --input --max-new-tokens --temperature --output");
    sample_params sp = {.top_p = 1.0f};
    double v;
    if (parse_num("--max-new-tokens", mnt, 0, 1 << 20, &v, e)) return -1;
    sp.max_new_tokens = (int)v;
    if (parse_num("--temperature", temp, 0, 100, &v, e)) return -1;
    sp.temperature = (float)v;
    if (opt(argc, argv, "--top-p")) {
        if (parse_num("--top-p", opt(argc, argv, "--top-p"), 1e-6, 1, &v, e)) return -1;
        sp.top_p = (float)v;
    }
    if (opt(argc, argv, "--top-k")) {
        if (parse_num("--top-k", opt(argc, argv, "--top-k"), 0, 1 << 30, &v, e)) return -1;
        sp.top_k = (int)v;
    }
    if (opt(argc, argv, "--seed")) {
        if (parse_num("--seed", opt(argc, argv, "--seed"), 0, 9e15, &v, e)) return -1;
        sp.seed = (uint64_t)v;
    }
    double cache_mb = 1024;
    if (opt(argc, argv, "--cache-mb") && parse_num("--cache-mb", opt(argc, argv, "--cache-mb"), 1, 1 << 24, &cache_mb, e))
        return -1;
    mill_device dev;
    dsv4_config cfg;
    par_sizes ps; /* the engine's ranks: --tp, --ep (rollout/group.h) */
    if (opt_device(argc, argv, &dev, e) || config_load(dir, &cfg, e) || ranks_engine_sizes(argc, argv, &ps, e))
        return -1;
    for (int i = 2; i + 1 < argc; i += 2)
        if (strcmp(argv[i], "--stop") == 0) {
            if (sp.n_stop == 8) return mill_errf(e, "at most 8 --stop ids");
            if (parse_num("--stop", argv[i + 1], 0, cfg.vocab_size - 1, &v, e)) return -1;
            sp.stop[sp.n_stop++] = (int32_t)v;
        }
    if (ranks_start(argc, argv, &ps, &cfg, 0, world, e)) return -1;
    dsv4_model m = {0}, dm = {0};
    int rc = -1, B = 0, T = 0, *lens = NULL;
    int32_t *ids = NULL;
    const int32_t **rows = NULL;
    kctx k = {0};
    gen_result res = {0};
    json_t *o = NULL;
    safetensors_writer *w = NULL;
    const dsv4_model *run = NULL;
    engine_group g = {0};
    engine en = {0};
    if (kctx_init(&k, dev, e) || read_input_rows(in, cfg.vocab_size, &ids, &B, &T, &lens, e) ||
        group_init(&g, *world, ps.tp, ps.ep, &cfg, &k, e) || model_load_stage(&m, dir, &g.stage, e) ||
        !(run = model_on(&m, &dm, &k, e)))
        goto done;
    group_model_io(&g, (dsv4_model *)run);
    if (engine_init_group(&en, run, &k, (size_t)(cache_mb * (1 << 20)), &g, e)) goto done;
    if (g.rank > 0) { /* a follower: the leader's steps until it is done, then its bytes to the leader */
        rc = generate_follow(&en, e) || comm_sum_f64(*world, en.sent, 2, e);
        goto done;
    }
    rows = malloc(sizeof *rows * (size_t)B);
    if (!rows) {
        mill_errf(e, "generate: out of memory");
        goto done;
    }
    for (int b = 0; b < B; b++) rows[b] = ids + (long)b * T;
    if (generate_engine(&en, rows, lens, B, &sp, &res, e) || group_cast(&g, GROUP_STOP, NULL, 0, e)) goto done;
    if (g.size > 1 && comm_sum_f64(*world, en.sent, 2, e)) goto done; /* what moved, summed over the ranks */
    long toks = 0;
    for (int b = 0; b < B; b++) toks += res.out_len[b];
    double ds = en.step_s[1] > 0 ? en.step_s[1] : 1e-9, dtoks = (double)(toks - B); /* the first token: prefill's */
    log_info("generate: engine of %d rank(s) (tp %d, ep %d, %d attention group(s)): %ld decode steps in %.3f s, %.1f "
             "tokens/s (%.1f a rank), %.1f KiB a decode step between ranks; %ld prefill step(s) in %.3f s, %.1f KiB",
             g.size, g.tp, g.ep, g.n_att, en.steps[1], en.step_s[1], dtoks / ds, dtoks / ds / g.size,
             en.sent[1] / 1024.0 / (double)(en.steps[1] ? en.steps[1] : 1), en.steps[0], en.step_s[0], en.sent[0] / 1024.0);
    o = json_pack("{s:[], s:[], s:[]}", "output_ids", "logprobs", "finish_reason");
    for (int b = 0; b < B; b++) {
        json_t *oi = json_array(), *lp = json_array();
        for (int t = 0; t < res.out_len[b]; t++) {
            json_array_append_new(oi, json_integer(res.out_ids[(long)b * sp.max_new_tokens + t]));
            json_array_append_new(lp, json_real(res.logprobs[(long)b * sp.max_new_tokens + t]));
        }
        json_array_append_new(json_object_get(o, "output_ids"), oi);
        json_array_append_new(json_object_get(o, "logprobs"), lp);
        json_array_append_new(json_object_get(o, "finish_reason"),
                              json_string(res.finish[b] == FINISH_STOP ? "stop" : "length"));
    }
    if (json_dump_file(o, out, JSON_COMPACT)) {
        mill_errf(e, "%s: cannot write", out);
        goto done;
    }
    const char *rpath = opt(argc, argv, "--routing");
    if (rpath) {
        int L = m.cfg.num_hidden_layers, K = m.cfg.num_experts_per_tok;
        mill_dtype rdt = routing_dtype(m.cfg.n_routed_experts);
        w = safetensors_writer_new();
        if (!w) {
            mill_errf(e, "generate: out of memory");
            goto done;
        }
        for (int b = 0; b < B; b++) {
            long cnt = (long)L * (lens[b] + res.out_len[b]) * K;
            void *buf = malloc((size_t)cnt * dtype_size(rdt));
            if (!buf) {
                mill_errf(e, "generate: out of memory");
                goto done;
            }
            routing_narrow(res.routing[b], cnt, rdt, buf);
            char name[32];
            snprintf(name, sizeof name, "routing.%d", b);
            int64_t shape[3] = {L, lens[b] + res.out_len[b], K};
            int arc = safetensors_writer_add(w, name, rdt, 3, shape, buf, e);
            free(buf);
            if (arc) goto done;
        }
        if (safetensors_writer_save(w, rpath, e)) goto done;
    }
    log_info("generate: %d rows -> %s", B, out);
    rc = 0;
done:
    safetensors_writer_free(w);
    json_decref(o);
    gen_result_free(&res);
    engine_free(&en);
    model_free(&dm);
    group_free(&g); /* its NCCL comms before the kctx whose stream they use */
    kctx_free(&k);
    free(rows);
    free(ids);
    free(lens);
    model_free(&m);
    return rc;
}

static int cmd_rollout_server(int argc, char **argv, comm **world, mill_err *e) {
    static const char *const known[] = {"--model", "--bind", "--cache-mb", "--max-batch", "--device", "--curve",
                                        "--queue-mb", "--exact", NULL};
    if (check_opts_par(argc, argv, known, e)) return -1;
    const char *dir = opt(argc, argv, "--model"), *bind = opt(argc, argv, "--bind");
    if (!dir || !bind) return mill_errf(e, "mill rollout-server needs --model DIR --bind ADDR");
    double mb = 1024, mbatch = 64, qmb = 16384;
    if (opt(argc, argv, "--cache-mb") && parse_num("--cache-mb", opt(argc, argv, "--cache-mb"), 1, 1 << 24, &mb, e))
        return -1;
    if (opt(argc, argv, "--queue-mb") && parse_num("--queue-mb", opt(argc, argv, "--queue-mb"), 1, 1 << 24, &qmb, e))
        return -1;
    if (opt(argc, argv, "--max-batch") && parse_num("--max-batch", opt(argc, argv, "--max-batch"), 1, 1 << 16, &mbatch, e))
        return -1;
    const char *exact = opt(argc, argv, "--exact");
    if (exact && strcmp(exact, "on") && strcmp(exact, "off"))
        return mill_errf(e, "mill rollout-server: --exact \"%s\" must be on or off", exact);
    mill_device dev;
    wire_curve curve;
    dsv4_config cfg;
    par_sizes ps; /* the engine's ranks: --tp, --ep (rollout/group.h) */
    if (opt_device(argc, argv, &dev, e) || opt_curve(argc, argv, &curve, e) || config_load(dir, &cfg, e) ||
        ranks_engine_sizes(argc, argv, &ps, e) || ranks_start(argc, argv, &ps, &cfg, 0, world, e))
        return -1;
    dsv4_model m = {0};
    kctx k = {0};
    engine_group g = {0};
    int rc = -1;
    if (!kctx_init(&k, dev, e) && !group_init(&g, *world, ps.tp, ps.ep, &cfg, &k, e) &&
        !model_load_stage(&m, dir, &g.stage, e)) { /* this rank's heads, experts and vocabulary rows */
        server_config sc = {bind, (size_t)(mb * (1 << 20)), (int)mbatch, dev, &curve, (size_t)(qmb * (1 << 20)), &k,
                            exact && !strcmp(exact, "on"), &g};
        rc = rollout_server_run(&m, &sc, e);
    }
    model_free(&m);
    group_free(&g);
    kctx_free(&k);
    return rc;
}

static int cmd_run(int argc, char **argv, mill_err *e) {
    if (argc < 3 || argv[2][0] == '-')
        return mill_errf(e, "mill run needs a recipe: mill run RECIPE.yaml [--set key=value]...");
    char *sets[64];
    int n = 0;
    for (int i = 3; i < argc; i += 2) {
        if (strcmp(argv[i], "--set") || i + 1 >= argc) return mill_errf(e, "mill run: expected --set key=value, got %s", argv[i]);
        if (n == 64) return mill_errf(e, "mill run: at most 64 --set options");
        sets[n++] = argv[i + 1];
    }
    grpo_recipe r;
    if (grpo_recipe_load(argv[2], sets, n, &r, e)) return -1;
    int rc = grpo_run(&r, argv[2], e);
    grpo_recipe_free(&r);
    return rc;
}

static int cmd_resume(int argc, char **argv, mill_err *e) {
    static const char *const known[] = {"--ledger", NULL};
    if (argc < 3 || argv[2][0] == '-') return mill_errf(e, "mill resume needs a run: mill resume RUN [--ledger PATH]");
    for (int i = 3; i < argc; i += 2) {
        if (strcmp(argv[i], known[0]) || i + 1 >= argc) return mill_errf(e, "mill resume: unknown option %s", argv[i]);
    }
    const char *lp = argc >= 5 ? argv[4] : ledger_default_path();
    return grpo_resume(lp, argv[2], e);
}

static int cmd_trainer_worker(int argc, char **argv, mill_err *e) {
    static const char *const known[] = {"--bind", "--curve", NULL};
    if (check_opts(argc, argv, known, e)) return -1;
    const char *bind = opt(argc, argv, "--bind");
    if (!bind) return mill_errf(e, "mill trainer-worker needs --bind ADDR");
    wire_curve c;
    if (opt_curve(argc, argv, &c, e)) return -1;
    return trainer_worker_run(bind, &c, e);
}

static int cmd_keys(int argc, char **argv, mill_err *e) {
    static const char *const known[] = {"--out", NULL};
    if (check_opts(argc, argv, known, e)) return -1;
    const char *out = opt(argc, argv, "--out");
    if (!out) return mill_errf(e, "mill keys needs --out FILE");
    wire_curve c;
    if (wire_curve_new(&c, e) || wire_curve_save(&c, out, e)) return -1;
    log_info("keys: CURVE keys for a run's sockets -> %s (mode 0600; copy it to every host of the run)", out);
    return 0;
}

/* What one rank holds under data parallelism (the distributed optimizer's shards, model_shard_range):
 * the largest shard's bytes, as sft and the trainer allocate them. */
static void print_rank_bytes(const dsv4_model *m, int dp) {
    size_t worst = 0;
    for (int r = 0; r < dp; r++) {
        size_t lo, hi;
        model_shard_range(m, r, dp, &lo, &hi);
        if (hi - lo > worst) worst = hi - lo;
    }
    double gib = 1.0 / (1 << 30), p = (double)m->n_floats * sizeof(float);
    printf("per rank at dp %d: parameters %.3f GiB, gradients %.3f GiB, Adam moments %.3f GiB (fp32)\n", dp, p * gib,
           p * gib, 2.0 * (double)worst * sizeof(float) * gib);
}

static int cmd_info(int argc, char **argv, mill_err *e) {
    static const char *const known[] = {"--model", "--dp", NULL};
    if (check_opts(argc, argv, known, e)) return -1;
    par_sizes ps;
    if (ranks_parse(argc, argv, &ps, e)) return -1;
    const char *dir = opt(argc, argv, "--model");
    if (!dir) return mill_errf(e, "mill info needs --model DIR");
    /* A directory with only config.json gets the layout and counts (e.g. a full-size config). */
    dsv4_config cfg;
    if (config_load(dir, &cfg, e)) return -1;
    safetensors *st = NULL;
    mill_err probe;
    int have_weights = safetensors_open(dir, &st, &probe) == 0;
    safetensors_close(st);
    dsv4_model m;
    if (have_weights ? model_load(&m, dir, e) : model_layout(&m, &cfg, e)) return -1;
    const dsv4_config *c = &m.cfg;
    printf("model %s%s\n", dir, have_weights ? "" : " (config only: no weights found)");
    printf("  vocab %d  hidden %d  layers %d  heads %d x %d (rope %d)  q_lora %d  o_groups %d x %d\n", c->vocab_size,
           c->hidden_size, c->num_hidden_layers, c->num_attention_heads, c->head_dim, c->qk_rope_head_dim,
           c->q_lora_rank, c->o_groups, c->o_lora_rank);
    printf("  experts %d (+%d shared) top-%d  inter %d  scoring %s  routed_scale %g  swiglu_limit %g\n",
           c->n_routed_experts, c->n_shared_experts, c->num_experts_per_tok, c->moe_intermediate_size,
           c->scoring_func == SCORE_SQRTSOFTPLUS ? "sqrtsoftplus" : c->scoring_func == SCORE_SIGMOID ? "sigmoid" : "softmax",
           c->routed_scaling_factor, c->swiglu_limit);
    printf("  hc_mult %d  sinkhorn %d  hc_eps %g  window %d  indexer %d x %d top-%d\n", c->hc_mult,
           c->hc_sinkhorn_iters, c->hc_eps, c->sliding_window, c->index_n_heads, c->index_head_dim, c->index_topk);
    printf("  rope_theta %g  compress_rope_theta %g  yarn %s (factor %g, original %d, beta %g/%g)\n", c->rope_theta,
           c->compress_rope_theta, c->rope_scaling.type_yarn ? "on" : "off", c->rope_scaling.factor,
           c->rope_scaling.original_max_position_embeddings, c->rope_scaling.beta_fast, c->rope_scaling.beta_slow);
    printf("layer schedule:\n");
    for (int l = 0; l < c->num_hidden_layers; l++) {
        size_t nl = 0;
        for (int i = 0; i < m.n_params; i++)
            if (m.params[i].layer == l && m.params[i].kind == PARAM_WEIGHT) nl += m.params[i].numel;
        printf("  %3d  attn %-7s (ratio %3d)  moe %-6s  %zu params\n", l, config_attn_kind_name(c->compress_ratios[l]),
               c->compress_ratios[l], l < c->num_hash_layers ? "hash" : "routed", nl);
    }
    size_t bufs = 0, extra = 0;
    for (int i = 0; i < m.n_params; i++)
        if (m.params[i].kind == PARAM_BUFFER) bufs += m.params[i].numel;
    for (int i = 0; i < m.n_extra; i++) extra += (size_t)tensor_numel(&m.extra[i].t);
    size_t active = 0;
    for (int i = 0; i < m.n_params; i++) {
        const param_info *p = &m.params[i];
        if (p->kind != PARAM_WEIGHT || strcmp(p->name, "embed.weight") == 0) continue;
        active += strstr(p->name, ".experts.") ? p->numel * (size_t)c->num_experts_per_tok / (size_t)c->n_routed_experts
                                               : p->numel;
    }
    char h1[32], h2[32];
    printf("parameters: %zu trainable (%s; %s active per token, embedding excluded), %zu buffer floats, %zu tid2eid entries, %d tensors / %zu values of mtp.* "
           "(loaded, not run)\n",
           m.n_trainable, human((double)m.n_trainable, h1, sizeof h1), human((double)active, h2, sizeof h2), bufs, m.n_index, m.n_extra, extra);
    if (opt(argc, argv, "--dp")) print_rank_bytes(&m, ps.dp);
    model_free(&m);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) return usage(stderr);
    mill_err e = {{0}};
    int rc;
    comm *world = NULL; /* the ranks of a parallel command (forward, grad, sft) */
    if (strcmp(argv[1], "forward") == 0) rc = cmd_forward(argc, argv, &world, &e);
    else if (strcmp(argv[1], "grad") == 0) rc = cmd_grad(argc, argv, &world, &e);
    else if (strcmp(argv[1], "generate") == 0) rc = cmd_generate(argc, argv, &world, &e);
    else if (strcmp(argv[1], "rollout-server") == 0) rc = cmd_rollout_server(argc, argv, &world, &e);
    else if (strcmp(argv[1], "info") == 0) rc = cmd_info(argc, argv, &e);
    else if (strcmp(argv[1], "init") == 0) rc = cmd_init(argc, argv, &e);
    else if (strcmp(argv[1], "sft") == 0) rc = cmd_sft(argc, argv, &world, &e);
    else if (strcmp(argv[1], "run") == 0) rc = cmd_run(argc, argv, &e);
    else if (strcmp(argv[1], "runs") == 0) return cli_runs(argc, argv);
    else if (strcmp(argv[1], "reward") == 0) return cli_reward(argc, argv);
    else if (strcmp(argv[1], "download") == 0) return cli_download(argc, argv);
    else if (strcmp(argv[1], "export") == 0) return cli_export(argc, argv);
    else if (strcmp(argv[1], "tokenize") == 0) return cli_tokenize(argc, argv);
    else if (strcmp(argv[1], "show") == 0) return cli_show(argc, argv);
    else if (strcmp(argv[1], "plot") == 0) return cli_plot(argc, argv);
    else if (strcmp(argv[1], "resume") == 0) rc = cmd_resume(argc, argv, &e);
    else if (strcmp(argv[1], "trainer-worker") == 0) rc = cmd_trainer_worker(argc, argv, &e);
    else if (strcmp(argv[1], "keys") == 0) rc = cmd_keys(argc, argv, &e);
    else if (strcmp(argv[1], "help") == 0 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)
        return usage(stdout);
    else {
        fprintf(stderr, "mill: unknown command \"%s\"\n", argv[1]);
        return usage(stderr);
    }
    if (rc) {
        if (world && world->size > 1) fprintf(stderr, "mill %s: rank %d: error: %s\n", argv[1], world->rank, e.msg);
        else fprintf(stderr, "mill %s: error: %s\n", argv[1], e.msg);
    }
    comm_world_end(world, rc != 0); /* a failed rank ends the whole job */
    return rc ? 1 : 0;
}
