#!/bin/sh
# tests/dist_cli.sh — data parallelism on CPU ranks over MPI, through the CLI as a user runs it
# (each command starts its own ranks with mpiexec):
#   - mill grad --dp 2 equals one process (and the HF goldens) on both golden models;
#   - mill forward --dp 2 equals one process bit for bit (logits and routing);
#   - mill grad / forward over pipeline stages (--pp 2, 3, 4; uneven splits; with --dp 2) equal one
#     process (bit for bit at one thread) and the HF goldens;
#   - mill sft --dp 2 for 20 steps against --dp 1; its sharded checkpoint resumed at dp 2 (bit for
#     bit), at dp 1 and the reverse; the checkpoint is a model directory mill forward reads;
#   - mill sft --pp 2 (with micro-batches through 1F1B, with --dp 2) against one process, resumed;
#   - the interleaved schedule (--vpp 2) in grad, forward and sft, its checkpoints resumed at other
#     layouts; bf16 streams between stages;
#   - experts over ranks (--ep 2 with dp 2, with stages; ep 2 and 4 over dp 4) in grad and forward;
#     sft --ep 2 against dp 2, its checkpoints resumed at ep 2 and dp 2;
#   - heads and vocabulary over ranks (--tp 2, with ep x dp and with stages; --tp 3 on a 3-head
#     model), also with sequence parallelism (--sp on; 14 tokens over 3 ranks), in grad and forward
#     against one process and the HF goldens; sft --tp 2 (--sp on), its checkpoints resumed at other
#     layouts;
#   - positions over ranks (--cp 2, 3, 4; with stages, experts, tp and sp) in grad and forward against
#     one process and the HF goldens; sft --cp 2, resumed;
#   - bad layouts fail on one line before any rank starts; a rank that fails ends the job.
# usage: tests/dist_cli.sh PATH/TO/mill PATH/TO/st_diff SOURCE_DIR
# Prints "ok - CASE" or "not ok - CASE: REASON" per case and the figures, then "N passed, M failed".

if [ $# -ne 3 ]; then
    echo "usage: $0 PATH/TO/mill PATH/TO/st_diff SOURCE_DIR" >&2
    exit 2
fi
MILL=$1
DIFF=$2
SRC=$3
DATA=$SRC/tests/data
T=$(mktemp -d "${TMPDIR:-/tmp}/dist_cli.XXXXXX") || exit 2
trap 'rm -rf "$T"' EXIT
trap 'exit 130' INT TERM
. "$SRC/tests/expect.sh"
cd "$SRC" || exit 2

# same CASE A B TOL [PREFIX]: st_diff within TOL
same() {
    name=$1
    shift
    if out=$("$DIFF" "$@" 2>&1); then ok "$name ($out)"; else not_ok "$name" "$out"; fi
}

for m in tiny-a tiny-b; do
    "$MILL" grad --model "$DATA/$m" --input "$DATA/$m/input.json" --output "$T/g1.st" --device cpu 2>"$T/stderr" &&
        "$MILL" grad --model "$DATA/$m" --input "$DATA/$m/input.json" --output "$T/g2.st" --device cpu --dp 2 \
            2>>"$T/stderr" || not_ok "grad $m" "$(first_err)"
    same "grad --dp 2 = --dp 1 on $m" "$T/g2.st" "$T/g1.st" 1e-5
    cp "$T/g1.st" "$T/g1.st.$m"
    same "grad --dp 2 = HF goldens on $m" "$T/g2.st" "$DATA/$m/grads.safetensors" 1e-3 grad.
    "$MILL" forward --model "$DATA/$m" --input "$DATA/$m/input.json" --output "$T/f1.st" --device cpu 2>"$T/stderr" &&
        "$MILL" forward --model "$DATA/$m" --input "$DATA/$m/input.json" --output "$T/f2.st" --device cpu --dp 2 \
            2>>"$T/stderr" || not_ok "forward $m" "$(first_err)"
    same "forward --dp 2 = --dp 1 bit for bit on $m (logits, routing)" "$T/f2.st" "$T/f1.st" 0
    same "forward --dp 2 = HF goldens on $m" "$T/f2.st" "$DATA/$m/expected.safetensors" 1e-4 logits
done

# Pipeline stages (Distributed trainer II, first step: one micro-batch through the stages). With one
# OpenMP thread everywhere (a CPU kernel's sums may follow the thread count), the stages give the
# single process's bits: they run the same kernels on the same rows.
for m in tiny-a tiny-b; do
    OMP_NUM_THREADS=1 "$MILL" grad --model "$DATA/$m" --input "$DATA/$m/input.json" --output "$T/g1t.st" --device cpu \
        2>"$T/stderr" || not_ok "grad $m, one thread" "$(first_err)"
    OMP_NUM_THREADS=1 "$MILL" forward --model "$DATA/$m" --input "$DATA/$m/input.json" --output "$T/f1t.st" \
        --device cpu 2>"$T/stderr" || not_ok "forward $m, one thread" "$(first_err)"
    for lay in "--pp 2" "--pp 3" "--pp 4" "--pp 2 --dp 2" "--pp 3 --pp-layers 1,2,1" "--pp 2 --pp-layers 1,2"; do
        [ "$m" = tiny-b ] && { [ "$lay" = "--pp 4" ] || [ "$lay" = "--pp 3 --pp-layers 1,2,1" ]; } && continue # 3 layers
        [ "$m" = tiny-a ] && [ "$lay" = "--pp 2 --pp-layers 1,2" ] && continue # 4 layers
        tol=0
        [ "$lay" = "--pp 2 --dp 2" ] && tol=1e-5 # the rows' gradients summed in another order
        # shellcheck disable=SC2086
        OMP_NUM_THREADS=1 "$MILL" grad --model "$DATA/$m" --input "$DATA/$m/input.json" --output "$T/gp.st" \
            --device cpu $lay 2>"$T/stderr" || { not_ok "grad $lay on $m" "$(first_err)"; continue; }
        same "grad $lay = one process on $m" "$T/gp.st" "$T/g1t.st" $tol
        same "grad $lay = HF goldens on $m" "$T/gp.st" "$DATA/$m/grads.safetensors" 1e-3 grad.
        # shellcheck disable=SC2086
        OMP_NUM_THREADS=1 "$MILL" forward --model "$DATA/$m" --input "$DATA/$m/input.json" --output "$T/fp.st" \
            --device cpu $lay 2>"$T/stderr" || { not_ok "forward $lay on $m" "$(first_err)"; continue; }
        same "forward $lay = one process bit for bit on $m" "$T/fp.st" "$T/f1t.st" 0
    done
done

# the 1F1B schedule: the rows in 2 micro-batches through 2, 3 and 4 stages give one process's bits
# with the same micro-batches (the gradients accumulate micro-batch after micro-batch either way)
G1="grad --model $DATA/tiny-a --input $DATA/tiny-a/input.json --device cpu --micro-batches 2"
# shellcheck disable=SC2086
OMP_NUM_THREADS=1 "$MILL" $G1 --output "$T/gm1.st" 2>"$T/stderr" || not_ok "grad, 2 micro-batches" "$(first_err)"
for pp in 2 3 4 "2 --vpp 2"; do
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=1 "$MILL" $G1 --output "$T/gm.st" --pp $pp 2>"$T/stderr" || not_ok "grad 1F1B pp $pp" "$(first_err)"
    same "grad --pp $pp --micro-batches 2 = one process bit for bit" "$T/gm.st" "$T/gm1.st" 0
done
# interleaved forwards (any micro-batch count), with an explicit split over the 4 virtual stages
OMP_NUM_THREADS=1 "$MILL" forward --model "$DATA/tiny-a" --input "$DATA/tiny-a/input.json" --output "$T/fa1.st" \
    --device cpu 2>"$T/stderr" || not_ok "forward tiny-a, one thread" "$(first_err)"
for lay in "--vpp 2" "--vpp 2 --pp-layers 1,1,1,1"; do
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=1 "$MILL" forward --model "$DATA/tiny-a" --input "$DATA/tiny-a/input.json" --output "$T/fv.st" \
        --device cpu --pp 2 $lay 2>"$T/stderr" || not_ok "forward --pp 2 $lay" "$(first_err)"
    same "forward --pp 2 $lay = one process bit for bit" "$T/fv.st" "$T/fa1.st" 0
done
# Experts over ranks (Distributed trainer III, first step): each rank holds 1/ep of every layer's
# routed experts; the (token, slot) rows travel to their experts and back by all-to-all. On both
# golden models: forward bit for bit, gradients against dp alone and the HF goldens; with a 4-row
# input, ep 2 over dp 4 (the experts' gradients reduced over their 2 holders), ep 4, and with stages.
for m in tiny-a tiny-b; do
    OMP_NUM_THREADS=1 "$MILL" forward --model "$DATA/$m" --input "$DATA/$m/input.json" --output "$T/fe1.st" \
        --device cpu --dp 2 2>"$T/stderr" || not_ok "forward --dp 2 on $m" "$(first_err)"
    for lay in "--dp 2 --ep 2" "--dp 2 --ep 2 --pp 2"; do
        # shellcheck disable=SC2086
        OMP_NUM_THREADS=1 "$MILL" forward --model "$DATA/$m" --input "$DATA/$m/input.json" --output "$T/fe.st" \
            --device cpu $lay 2>"$T/stderr" || not_ok "forward $lay on $m" "$(first_err)"
        same "forward $lay = dp 2 bit for bit on $m" "$T/fe.st" "$T/fe1.st" 0
        # shellcheck disable=SC2086
        "$MILL" grad --model "$DATA/$m" --input "$DATA/$m/input.json" --output "$T/ge.st" --device cpu $lay \
            2>"$T/stderr" || not_ok "grad $lay on $m" "$(first_err)"
        same "grad $lay = HF goldens on $m" "$T/ge.st" "$DATA/$m/grads.safetensors" 1e-3 grad.
        same "grad $lay = one process on $m" "$T/ge.st" "$T/g1.st.$m" 1e-5
    done
done
sed 's/\[\[\(.*\)\]\]/[[\1],[\1]]/' "$DATA/tiny-a/input.json" >"$T/in4.json" # the 2 rows twice
"$MILL" grad --model "$DATA/tiny-a" --input "$T/in4.json" --output "$T/q1.st" --device cpu 2>"$T/stderr" ||
    not_ok "grad, 4 rows" "$(first_err)"
for lay in "--dp 4 --ep 2" "--dp 4 --ep 4" "--dp 2 --ep 2 --pp 2 --vpp 2 --micro-batches 2"; do
    # shellcheck disable=SC2086
    "$MILL" grad --model "$DATA/tiny-a" --input "$T/in4.json" --output "$T/q2.st" --device cpu $lay >"$T/stdout" \
        2>"$T/stderr" || not_ok "grad $lay" "$(first_err)"
    same "grad $lay = one process (4 rows)" "$T/q2.st" "$T/q1.st" 1e-5
done
if grep -q "expert all-to-alls sent" "$T/stderr"; then
    ok "the expert all-to-alls' bytes against uniform routing's: $(sed -n 's/.*sent \(.*\)/\1/p' "$T/stderr")"
else
    not_ok "the expert all-to-alls' bytes" "no report: $(cat "$T/stderr")"
fi

# Heads over ranks (Distributed trainer III, tensor parallelism in forward and grad): each tp rank
# holds a slice of the attention heads (wq_b, attn_sink), the output groups (wo_a rows, wo_b
# columns), the shared experts' hidden units and the vocabulary (embedding and head rows: log-softmax,
# logprobs and entropy joined from three numbers a row, no rank forms a whole row of logits); the
# partial sums are all-reduced over tp. Against one process and HF on both golden models; with ep,
# dp and stages; tp 3 on a model with 3 heads and 3 output groups, its 256-row vocabulary in slices
# of 80, 80 and 96 (model_vocab_split; random weights: against one process only; its gradients are ~1e-6, so the
# tolerance is relative to cancellation noise)
for m in tiny-a tiny-b; do
    for lay in "--tp 2" "--tp 2 --ep 2 --dp 2" "--tp 2 --pp 2" "--tp 2 --sp on" "--tp 2 --sp on --ep 2 --dp 2" \
        "--tp 2 --sp on --pp 2"; do
        # shellcheck disable=SC2086
        OMP_NUM_THREADS=1 "$MILL" grad --model "$DATA/$m" --input "$DATA/$m/input.json" --output "$T/gt.st" --device cpu \
            $lay 2>"$T/stderr" || { not_ok "grad $lay on $m" "$(first_err)"; continue; }
        same "grad $lay = one process on $m" "$T/gt.st" "$T/g1.st.$m" 3e-5
        same "grad $lay = HF goldens on $m" "$T/gt.st" "$DATA/$m/grads.safetensors" 1e-3 grad.
    done
    OMP_NUM_THREADS=1 "$MILL" forward --model "$DATA/$m" --input "$DATA/$m/input.json" --output "$T/ft.st" --device cpu \
        --tp 2 2>"$T/stderr" || not_ok "forward --tp 2 on $m" "$(first_err)"
    same "forward --tp 2 = HF goldens on $m" "$T/ft.st" "$DATA/$m/expected.safetensors" 1e-4 logits
    OMP_NUM_THREADS=1 "$MILL" forward --model "$DATA/$m" --input "$DATA/$m/input.json" --output "$T/ft.st" --device cpu \
        --tp 2 --sp on 2>"$T/stderr" || not_ok "forward --tp 2 --sp on on $m" "$(first_err)"
    same "forward --tp 2 --sp on = HF goldens on $m" "$T/ft.st" "$DATA/$m/expected.safetensors" 1e-4
done
"$MILL" init --config tests/data/tp3-config.json --out "$T/h3" --seed 5 >/dev/null 2>"$T/stderr" ||
    not_ok "init the 3-head model" "$(first_err)"
H3="grad --model $T/h3 --input $DATA/tiny-a/input.json --device cpu"
# shellcheck disable=SC2086
OMP_NUM_THREADS=1 "$MILL" $H3 --output "$T/h3a.st" 2>"$T/stderr" || not_ok "grad on the 3-head model" "$(first_err)"
for lay in "--tp 3" "--tp 3 --pp 2"; do
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=1 "$MILL" $H3 --output "$T/h3b.st" $lay 2>"$T/stderr" || not_ok "grad $lay, 3 heads" "$(first_err)"
    same "grad $lay = one process on a model with 3 heads and 3 output groups" "$T/h3b.st" "$T/h3a.st" 1e-4
done
OMP_NUM_THREADS=1 "$MILL" forward --model "$T/h3" --input "$DATA/tiny-a/input.json" --device cpu --output "$T/h3f1.st" \
    2>"$T/stderr" || not_ok "forward on the 3-head model" "$(first_err)"
OMP_NUM_THREADS=1 "$MILL" forward --model "$T/h3" --input "$DATA/tiny-a/input.json" --device cpu --output "$T/h3f3.st" \
    --tp 3 2>"$T/stderr" || not_ok "forward --tp 3, 3 heads" "$(first_err)"
same "forward --tp 3 = one process (a vocabulary of 256 in 3 slices)" "$T/h3f3.st" "$T/h3f1.st" 1e-5 logits
# sequence parallelism over 3 ranks with 14 tokens (slices of 4, 5 and 5: gathered unevenly, summed
# whole instead of reduce-scattered), with and without stages; the routing gathered too
printf '{"input_ids": [[5, 77, 130, 2, 255, 9, 40], [18, 0, 201, 99, 3, 160, 71]]}\n' >"$T/in7.json"
H3S="--model $T/h3 --input $T/in7.json --device cpu"
# shellcheck disable=SC2086
OMP_NUM_THREADS=1 "$MILL" grad $H3S --output "$T/h3s1.st" 2>"$T/stderr" || not_ok "grad, 14 tokens" "$(first_err)"
for lay in "--tp 3 --sp on" "--tp 3 --sp on --pp 2"; do
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=1 "$MILL" grad $H3S --output "$T/h3s.st" $lay 2>"$T/stderr" || not_ok "grad $lay, 14 tokens" "$(first_err)"
    same "grad $lay = one process on 14 tokens" "$T/h3s.st" "$T/h3s1.st" 1e-4
done
# shellcheck disable=SC2086
OMP_NUM_THREADS=1 "$MILL" forward $H3S --output "$T/h3sf1.st" 2>"$T/stderr" &&
    OMP_NUM_THREADS=1 "$MILL" forward $H3S --output "$T/h3sf.st" --tp 3 --sp on 2>>"$T/stderr" ||
    not_ok "forward --tp 3 --sp on, 14 tokens" "$(first_err)"
same "forward --tp 3 --sp on = one process on 14 tokens (logits and routing)" "$T/h3sf.st" "$T/h3sf1.st" 1e-5

# Positions over ranks (Distributed trainer IV, context parallelism): each cp rank holds a slice of
# every row's positions (300 and 280 positions: no multiple of anything), its queries against the
# whole rows' keys (the window's KV, the compressor's and the indexer's projections gathered), the
# key side's gradients summed back to their owners. Against one process and HF; with stages, with
# experts over ranks, with tp and sp; uneven slices (cp 3 over 280); the forward bit for bit.
for m in tiny-a tiny-b; do
    for lay in "--cp 2" "--cp 4" "--cp 2 --pp 2" "--cp 2 --ep 2 --dp 2"; do
        # shellcheck disable=SC2086
        OMP_NUM_THREADS=1 "$MILL" grad --model "$DATA/$m" --input "$DATA/$m/input.json" --output "$T/gc.st" --device cpu \
            $lay 2>"$T/stderr" || { not_ok "grad $lay on $m" "$(first_err)"; continue; }
        same "grad $lay = one process on $m" "$T/gc.st" "$T/g1.st.$m" 3e-5
        same "grad $lay = HF goldens on $m" "$T/gc.st" "$DATA/$m/grads.safetensors" 1e-3 grad.
    done
done
for lay in "--cp 3" "--cp 2 --tp 2 --sp on"; do
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=1 "$MILL" grad --model "$DATA/tiny-b" --input "$DATA/tiny-b/input.json" --output "$T/gc.st" \
        --device cpu $lay 2>"$T/stderr" || not_ok "grad $lay on tiny-b" "$(first_err)"
    same "grad $lay = one process on tiny-b" "$T/gc.st" "$T/g1.st.tiny-b" 3e-5
done
OMP_NUM_THREADS=1 "$MILL" forward --model "$DATA/tiny-b" --input "$DATA/tiny-b/input.json" --output "$T/fc1.st" \
    --device cpu 2>"$T/stderr" &&
    OMP_NUM_THREADS=1 "$MILL" forward --model "$DATA/tiny-b" --input "$DATA/tiny-b/input.json" --output "$T/fc3.st" \
        --device cpu --cp 3 2>>"$T/stderr" || not_ok "forward --cp 3 on tiny-b" "$(first_err)"
same "forward --cp 3 = one process bit for bit (logits and routing)" "$T/fc3.st" "$T/fc1.st" 0

# bf16 streams between the stages (the GPU's default): rounded once per hop, so not the fp32 bits,
# but the same loss within bf16's rounding
OMP_NUM_THREADS=1 "$MILL" $G1 --output "$T/gbf.st" --pp 2 --pp-dtype bf16 2>"$T/stderr" || not_ok "grad bf16 streams" "$(first_err)"
if "$DIFF" "$T/gbf.st" "$T/gm1.st" 0 >/dev/null 2>&1; then
    not_ok "grad --pp 2 --pp-dtype bf16" "equal to fp32 bit for bit: the streams were not rounded"
else
    same "grad --pp 2 --pp-dtype bf16: the loss within bf16's rounding of fp32's" "$T/gbf.st" "$T/gm1.st" 1e-3 loss
fi

# SFT: 20 steps, checkpoints at 10 and 20 (tests/data/sft-dist.yaml writes runs/sft-dist)
R=runs/sft-dist
sft() { # sft OUTDIR ARGS...: a run whose checkpoints end up in $T/OUTDIR
    out=$1
    shift
    rm -rf "$R"
    if "$MILL" sft tests/data/sft-dist.yaml "$@" >"$T/stdout" 2>"$T/stderr"; then
        mv "$R" "$T/$out"
    else
        not_ok "sft $*" "$(first_err)"
    fi
}
sft dp1
sft dp2 --dp 2
grep "per rank" "$T/stdout"
same "sft 20 steps --dp 2 against --dp 1 (final weights)" "$T/dp2/step-000020" "$T/dp1/step-000020" 1e-2
if [ -f "$T/dp2/step-000020/optimizer-00002-of-00002.safetensors" ] &&
    [ -f "$T/dp2/step-000020/model.safetensors.index.json" ]; then
    ok "the dp 2 checkpoint is per-rank shards plus an index"
else
    not_ok "the dp 2 checkpoint is per-rank shards plus an index" "$(ls "$T/dp2/step-000020" | tr '\n' ' ')"
fi
sft r22 --dp 2 --resume "$T/dp2/step-000010"
same "dp 2 checkpoint resumed at dp 2 = uninterrupted, bit for bit" "$T/r22/step-000020" "$T/dp2/step-000020" 0
same "... and its optimizer shards too" "$T/r22/step-000020/optimizer-00002-of-00002.safetensors" \
    "$T/dp2/step-000020/optimizer-00002-of-00002.safetensors" 0
sft r21 --resume "$T/dp2/step-000010"
same "dp 2 checkpoint resumed at dp 1 against the uninterrupted dp 2 run" "$T/r21/step-000020" "$T/dp2/step-000020" 1e-2
sft r12 --dp 2 --resume "$T/dp1/step-000010"
same "dp 1 checkpoint resumed at dp 2 against the uninterrupted dp 1 run" "$T/r12/step-000020" "$T/dp1/step-000020" 1e-2
if "$MILL" forward --model "$T/dp2/step-000020" --input "$DATA/tiny-a/input.json" --output "$T/fc.st" --device cpu \
    2>"$T/stderr"; then ok "mill forward reads the sharded checkpoint"; else not_ok "forward on the checkpoint" "$(first_err)"; fi

# bad layouts: one line, before any rank starts
bad() { # bad CASE PATTERN ARGS...
    name=$1
    pat=$2
    shift 2
    "$MILL" "$@" >"$T/stdout" 2>"$T/stderr"
    st=$?
    if one_error_line "$name" "$st"; then
        if grep -q -e "$pat" "$T/stderr"; then ok "$name"; else not_ok "$name" "expected \"$pat\": $(first_err)"; fi
    fi
}
G="grad --model $DATA/tiny-a --input $DATA/tiny-a/input.json --output $T/bad.st --device cpu"
# shellcheck disable=SC2086
{
    bad "rows not divisible by dp" "the batch's 2 rows must divide evenly over dp 3" $G --dp 3
    bad "more stages than layers" "pp 5 stages need at least as many layers; the model has 4" $G --pp 5
    bad "tp must divide heads" "tp 3 must divide num_attention_heads" $G --tp 3
    bad "a bad sequence-parallel switch" "--sp (sequence parallelism) must be on or off" $G --tp 2 --sp yes
    bad "experts divisible by ep" "ep 3 must divide" $G --dp 3 --ep 3
    bad "a size of 0" "dp needs a positive integer" $G --dp 0
    bad "a stage split that misses layers" "pp_layers gives 2 stage(s) of 2 layers in all; pp is 2 and the model has 4" \
        $G --pp 2 --pp-layers 1,1
    bad "interleaving without stages" "vpp 2 interleaves pipeline stages; it needs pp > 1" $G --vpp 2
    bad "interleaved micro-batches not in groups of pp" "runs micro-batches in groups of pp 2; 1 micro-batches" \
        $G --pp 2 --vpp 2
    bad "a bad stream type" "pp-dtype must be auto, fp32 or bf16" $G --pp 2 --pp-dtype fp16
}

# SFT over pipeline stages (1F1B; one thread everywhere, as the one-process reference):
# bit for bit at pp 2 (also with 2 micro-batches against one process with 2), resume at pp 2 bit for
# bit, at dp 2 x pp 2 against one process; a pp 2 checkpoint refused at pp 1 by name
export OMP_NUM_THREADS=1
sft t1
sft p2 --pp 2
same "sft --pp 2, 20 steps = one process bit for bit" "$T/p2/step-000020" "$T/t1/step-000020" 0
sft p2r --pp 2 --resume "$T/p2/step-000010"
same "pp 2 checkpoint resumed at pp 2 = uninterrupted, bit for bit" "$T/p2r/step-000020" "$T/p2/step-000020" 0
sed 's/^  max_len: 48/  max_len: 48\n  micro_batches: 2/' tests/data/sft-dist.yaml > "$T/sft-mb2.yaml"
sft_mb() { out=$1; shift; rm -rf "$R"; "$MILL" sft "$T/sft-mb2.yaml" "$@" >"$T/stdout" 2>"$T/stderr" && mv "$R" "$T/$out" ||
    not_ok "sft (2 micro-batches) $*" "$(first_err)"; }
sft_mb m1
sft_mb m2 --pp 2
same "sft --pp 2 with 2 micro-batches (1F1B) = one process with 2, bit for bit" "$T/m2/step-000020" "$T/m1/step-000020" 0
sft p2d2 --pp 2 --dp 2
same "sft --pp 2 --dp 2 against one process (final weights)" "$T/p2d2/step-000020" "$T/t1/step-000020" 3e-2
sft p21 --resume "$T/p2/step-000010"
same "pp 2 checkpoint resumed at pp 1 = uninterrupted, bit for bit" "$T/p21/step-000020" "$T/t1/step-000020" 0
sft p12 --pp 2 --resume "$T/t1/step-000010"
same "pp 1 checkpoint resumed at pp 2 = uninterrupted, bit for bit" "$T/p12/step-000020" "$T/t1/step-000020" 0
sft p2d2r --pp 2 --dp 2 --resume "$T/p2/step-000010"
same "pp 2 checkpoint resumed at pp 2 x dp 2 against uninterrupted" "$T/p2d2r/step-000020" "$T/p2/step-000020" 3e-2
# experts over ranks (ep 2 x dp 2: the moments sharded over the ranks that hold the same experts,
# the experts' norm summed over ep, each rank's experts in its own checkpoint files): against dp 2,
# resumed at ep 2 bit for bit, and across ep 2 <-> dp 2
sft e22 --dp 2 --ep 2
same "sft --dp 2 --ep 2 against --dp 2 (final weights)" "$T/e22/step-000020" "$T/dp2/step-000020" 1e-2
sft e22r --dp 2 --ep 2 --resume "$T/e22/step-000010"
same "ep 2 checkpoint resumed at ep 2 = uninterrupted, bit for bit" "$T/e22r/step-000020" "$T/e22/step-000020" 0
sft e2d --dp 2 --resume "$T/e22/step-000010"
same "ep 2 checkpoint resumed at dp 2 against uninterrupted" "$T/e2d/step-000020" "$T/e22/step-000020" 1e-2
sft d2e --dp 2 --ep 2 --resume "$T/dp2/step-000010"
same "dp 2 checkpoint resumed at ep 2 against uninterrupted" "$T/d2e/step-000020" "$T/dp2/step-000020" 1e-2
# heads over ranks (tp 2: the tp ranks gather each sliced tensor whole into the checkpoint; each
# writes its moments as pieces of the whole layout, a column slice row by row): against one process,
# resumed at tp 2 bit for bit, and across layouts both ways: tp 2 -> one process, tp 2 -> tp 2 x pp
# 2, one process -> tp 2 x pp 2 (the moments then differ only by the layouts' rounding: misplaced,
# the same checks gave 0.47)
sft t2 --tp 2
same "sft --tp 2 against one process (final weights)" "$T/t2/step-000020" "$T/t1/step-000020" 3e-2
sft t2r --tp 2 --resume "$T/t2/step-000010"
same "tp 2 checkpoint resumed at tp 2 = uninterrupted, bit for bit" "$T/t2r/step-000020" "$T/t2/step-000020" 0
sft t21 --resume "$T/t2/step-000010"
same "tp 2 checkpoint resumed by one process against uninterrupted" "$T/t21/step-000020" "$T/t2/step-000020" 1e-2
sft t2p --tp 2 --pp 2 --resume "$T/t2/step-000010"
same "tp 2 checkpoint resumed at tp 2 x pp 2 against uninterrupted" "$T/t2p/step-000020" "$T/t2/step-000020" 1e-2
# positions over ranks (cp 2: every rank's prompt-only slices add nothing but join the exchanges):
# against one process, resumed at cp 2 bit for bit, and by one process
sft c2 --cp 2
same "sft --cp 2 against one process (final weights)" "$T/c2/step-000020" "$T/t1/step-000020" 3e-2
sft c2r --cp 2 --resume "$T/c2/step-000010"
same "cp 2 checkpoint resumed at cp 2 = uninterrupted, bit for bit" "$T/c2r/step-000020" "$T/c2/step-000020" 0
sft c21 --resume "$T/c2/step-000010"
same "cp 2 checkpoint resumed by one process against uninterrupted" "$T/c21/step-000020" "$T/c2/step-000020" 1e-2
sft t2s --tp 2 --sp on
same "sft --tp 2 --sp on against --tp 2 (final weights)" "$T/t2s/step-000020" "$T/t2/step-000020" 1e-2
sft t12 --tp 2 --pp 2 --resume "$T/t1/step-000010" # each slice's moments from their places in the whole layout
same "one process's checkpoint resumed at tp 2 x pp 2 against uninterrupted" "$T/t12/step-000020" "$T/t1/step-000020" 1e-2
# interleaved (vpp 2: two chunks per stage, the moments in two pieces per rank): bit for bit, and its
# checkpoint resumed by one process and by pp 2 without chunks
sft_mb v2 --pp 2 --vpp 2
same "sft --pp 2 --vpp 2 (interleaved 1F1B) = one process with 2 micro-batches, bit for bit" "$T/v2/step-000020" "$T/m1/step-000020" 0
sft_mb v21 --resume "$T/v2/step-000010"
same "pp 2 x vpp 2 checkpoint resumed by one process = uninterrupted, bit for bit" "$T/v21/step-000020" "$T/m1/step-000020" 0
sft_mb v2p --pp 2 --resume "$T/v2/step-000010"
same "pp 2 x vpp 2 checkpoint resumed at pp 2 = uninterrupted, bit for bit" "$T/v2p/step-000020" "$T/m1/step-000020" 0
sft_mb v2d --pp 2 --vpp 2 --dp 2 --resume "$T/m1/step-000010"
same "one process's checkpoint resumed at pp 2 x vpp 2 x dp 2 against uninterrupted" "$T/v2d/step-000020" "$T/m1/step-000020" 3e-2
unset OMP_NUM_THREADS

# a rank that fails ends the job: rank 1's optimizer shard is damaged, rank 0's is fine
cp -r "$T/dp2/step-000010" "$T/broken"
printf 'junk' >"$T/broken/optimizer-00002-of-00002.safetensors"
start=$(date +%s)
timeout 120 "$MILL" sft tests/data/sft-dist.yaml --dp 2 --resume "$T/broken" >"$T/stdout" 2>"$T/stderr"
st=$?
took=$(($(date +%s) - start))
if [ "$st" -ne 0 ] && [ "$st" -ne 124 ] && grep -q "rank 1: error: .*optimizer-00002-of-00002.safetensors" "$T/stderr"; then
    ok "a failing rank ends the job (exit $st in ${took} s, naming the rank and the file)"
else
    not_ok "a failing rank ends the job" "exit $st after ${took} s: $(first_err)"
fi
rm -rf "$R"
echo "$PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
