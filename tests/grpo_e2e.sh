#!/bin/sh
# End-to-end GRPO runs of the tiny model (ctest grpo_e2e): a colocated and a disaggregated run,
# kill -9 of the controller followed by `mill resume`, kill -9 of the trainer (one process, or one
# rank of two) restarted by the controller (weights and Adam state bit-identical to an uninterrupted
# run), a rollout engine killed mid-step (restarted; the ledger holds every sample of the step
# exactly once), trainers over pipeline stages and with the experts over ranks against one
# process or dp, and bad input.
# usage: grpo_e2e.sh MILL SOURCE_DIR ST_DIFF
set -eu
MILL=$1
MILL_DIFF=$3
cd "$2"
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
L=$T/ledger.db
R=tests/data/grpo-smoke.yaml
fail() { echo "FAIL: $*" >&2; exit 1; }
q() { sqlite3 "$L" "$1"; }
run() { # name, extra --set options...
    n=$1; shift
    "$MILL" run $R --set ledger="$L" --set name="$n" --set checkpoint.dir="$T/$n" "$@" > "$T/$n.out" 2> "$T/$n.err" \
        || { cat "$T/$n.out" "$T/$n.err" >&2; fail "mill run $n"; }
}
# the pid of a process whose command line contains $1 (procps may be absent)
pid_of() {
    for p in /proc/[0-9]*; do
        tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep -q -- "$1" && { basename "$p"; return 0; }
    done
    return 1
}
# the pids of $1's children (none once it is gone)
kids() { cat /proc/"$1"/task/*/children 2>/dev/null || true; }
same_state() { # two checkpoint dirs: model and optimizer bit-identical
    cmp -s "$1/model.safetensors" "$2/model.safetensors" || fail "$3: weights differ from the uninterrupted run"
    cmp -s "$1/optimizer.safetensors" "$2/optimizer.safetensors" || fail "$3: Adam state differs"
}
wait_step() { # run name, step: until the ledger records it
    i=0
    while [ "$(q "select coalesce(max(s.step),0) from steps s join runs r on r.id=s.run_id where r.name='$1'")" -lt "$2" ]; do
        i=$((i + 1)); [ $i -lt 600 ] || fail "$1 never reached step $2"; sleep 0.1
    done
}

# 1. colocated, 6 steps, the reference for the resume tests
run ref --set train.steps=6 --set checkpoint.every=1
grep -q "step    6/6" "$T/ref.out" || fail "ref: no step 6 line"
[ "$(q "select status from runs where name='ref'")" = finished ] || fail "ref: not finished"
[ "$(q "select count(*) from samples s join runs r on r.id=s.run_id where r.name='ref'")" = 96 ] || fail "ref: samples"
# the trainer's recomputed old logprobs equal the engine's to the bit (routing replayed, row-invariant GEMMs)
g=$(q "select max(abs(json_extract(s.metrics, '$.max_dlogp'))) from steps s join runs r on r.id=s.run_id where r.name='ref' and s.step > 0")
[ "$g" = "0.0" ] || fail "ref: largest rollout/trainer |dlogp| is $g, expected 0"
echo "colocated: 6 steps, 96 samples, $(grep -c checkpoint "$T/ref.out") checkpoints, max|dlogp| $g"

# 2. disaggregated: two engines over TCP
run dis --set rollout.layout=disaggregated --set rollout.engines=2 --set train.steps=3
grep -q "disaggregated layout, 2 engine" "$T/dis.out" || fail "dis: layout line"
[ "$(q "select status from runs where name='dis'")" = finished ] || fail "dis: not finished"
echo "disaggregated: 3 steps on 2 engines"

# 2c. CURVE on every socket (as across hosts): the run makes its key file (mode 0600) and passes it
# to the processes it starts; an external engine needs a key file made beforehand (mill keys)
run cu --set rollout.layout=disaggregated --set rollout.curve=on --set train.steps=2
[ "$(q "select status from runs where name='cu'")" = finished ] || fail "curve: not finished"
[ "$(stat -c %a "$T/cu/curve.keys")" = 600 ] || fail "curve: key file missing or not private"
grep -q "CURVE" "$T/cu/logs/engine-0.log" || fail "curve: the engine did not serve over CURVE"
"$MILL" keys --out "$T/run.keys" 2> /dev/null || fail "mill keys"
[ "$(wc -l < "$T/run.keys")" = 4 ] || fail "mill keys: not four keys"
if "$MILL" run $R --set ledger="$L" --set name=cu2 --set rollout.layout=disaggregated --set rollout.curve=on \
    --set rollout.addresses='["tcp://10.0.0.1:5555"]' 2> "$T/cu2.err"; then fail "curve without keys accepted"; fi
grep -q "mill keys --out FILE" "$T/cu2.err" || fail "curve without keys: $(cat "$T/cu2.err")"
echo "curve: 2 steps over CURVE sockets, key file private; external engines need mill keys"

# 2a. async: step s + 1 is generated while step s trains, so its samples come from version s - 1
run as --set rollout.layout=disaggregated --set rollout.async=true --set train.steps=4
v=$(q "select group_concat(v, ',') from (select s.step, max(s.weight_version) v from samples s join runs r on r.id=s.run_id where r.name='as' group by s.step order by s.step)")
[ "$v" = "0,0,1,2" ] || fail "async: sample versions by step are $v, expected 0,0,1,2"
echo "async: sample versions by step $v (one version behind)"

# 2b. KL penalty against the frozen reference (loaded because kl_coef != 0), entropy bonus, and
# dynamic sampling (every sample drawn is in the ledger; groups with equal rewards are dropped)
run kl --set train.steps=2 --set algorithm.kl_coef=0.05 --set algorithm.entropy_coef=0.01 --set optimizer.lr=1e-3 \
    --set rollout.dynamic_sampling=true --set rollout.max_draws=3
kl=$(q "select json_extract(s.metrics, '$.kl') from steps s join runs r on r.id=s.run_id where r.name='kl' and s.step=2")
[ -n "$kl" ] && awk "BEGIN { exit !($kl > 0) }" || fail "kl: step 2 KL against the reference is $kl"
for s in 1 2; do
    d=$(q "select json_extract(s.metrics, '$.draws') from steps s join runs r on r.id=s.run_id where r.name='kl' and s.step=$s")
    n=$(q "select count(*) from samples s join runs r on r.id=s.run_id where r.name='kl' and s.step=$s")
    [ "$n" = $((d * 16)) ] || fail "kl: step $s drew $d batches but the ledger holds $n samples"
done
echo "kl_coef 0.05: step 2 KL $kl; dynamic sampling: every drawn sample recorded"

# 3. kill -9 of the controller mid-run, then mill resume
"$MILL" run $R --set ledger="$L" --set name=k1 --set checkpoint.dir="$T/k1" --set train.steps=6 \
    --set checkpoint.every=1 > "$T/k1.out" 2>&1 &
ctl=$!
wait_step k1 3
kill -9 $ctl; wait $ctl 2>/dev/null || true
sleep 0.5
pid_of "$T/k1/trainer.sock" >/dev/null && fail "k1: the trainer outlived its controller"
# the ledger still says running; mill runs sees the controller gone and shows it interrupted
[ "$(q "select status from runs where name='k1'")" = running ] || fail "k1: ledger status $(q "select status from runs where name='k1'")"
"$MILL" runs --ledger "$L" | grep -E "^ *[0-9]+ +k1 +interrupted " >/dev/null || fail "k1: mill runs: $("$MILL" runs --ledger "$L" | grep k1)"
"$MILL" resume k1 --ledger "$L" > "$T/k1r.out" 2>&1 || { cat "$T/k1r.out" >&2; fail "k1: resume"; }
"$MILL" runs --ledger "$L" | grep -E "^ *[0-9]+ +k1 +finished " >/dev/null || fail "k1: after resume: $("$MILL" runs --ledger "$L" | grep k1)"
# the redone steps' first-attempt samples are kept but superseded: each step's live samples are one batch
n=$(q "select group_concat(c, ' ') from (select count(*) c from samples s join runs r on r.id=s.run_id where r.name='k1' and s.superseded=0 group by s.step)")
[ "$n" = "16 16 16 16 16 16" ] || fail "k1: live samples per step: $n"
same_state "$T/ref/step-000006" "$T/k1/step-000006" "controller kill"
echo "controller killed after step 3: resumed, final weights and Adam state bit-identical"

# 4. kill -9 of the trainer worker mid-step (debug.kill_trainer_at_step: it SIGKILLs itself as step 3
# begins training, on the first attempt): the controller starts it again from the last checkpoint
# (step 2) and the run finishes; weights bit-identical, every step's samples once
# a step's records: the samples of its latest attempt (total|distinct) for run $1, step $2
step_samples() {
    q "select count(*), count(distinct s.prompt_id || '/' || s.sample_idx) from samples s join runs r on r.id=s.run_id
       where r.name='$1' and s.step=$2 and s.attempt=(select max(attempt) from steps t where t.run_id=r.id and t.step=$2)"
}
run k2 --set train.steps=6 --set checkpoint.every=2 --set debug.kill_trainer_at_step=3
grep -q "trainer.*killed by signal 9.*restarting the trainer from the last checkpoint" "$T/k2.err" ||
    { cat "$T/k2.err" >&2; fail "k2: no clear message"; }
[ "$(q "select status from runs where name='k2'")" = finished ] || fail "k2: status"
[ "$(q "select count(*) from events e join runs r on r.id=e.run_id where r.name='k2' and e.kind='restart'")" = 1 ] ||
    fail "k2: no restart event"
same_state "$T/ref/step-000006" "$T/k2/step-000006" "trainer kill"
for s in 1 2 3 4 5 6; do [ "$(step_samples k2 $s)" = "16|16" ] || fail "k2: step $s samples $(step_samples k2 $s)"; done
echo "trainer killed in step 3: restarted from step 2, finished; weights and Adam state bit-identical, 16 samples a step"

# 4w. the trainer hangs in step 3, alive (debug.wedge_trainer_at_step): no progress for train.heartbeat_s,
# so the controller kills it and starts it again from step 2's checkpoint; the same final state
run kw --set train.steps=6 --set checkpoint.every=2 --set debug.wedge_trainer_at_step=3 --set train.heartbeat_s=3
grep -q "trainer worker sent nothing for 3 s (its heartbeat): wedged; restarting the trainer from the last checkpoint" \
    "$T/kw.err" || { cat "$T/kw.err" >&2; fail "kw: no clear message"; }
[ "$(q "select count(*) from events e join runs r on r.id=e.run_id where r.name='kw' and e.kind='restart'")" = 1 ] ||
    fail "kw: no restart event"
same_state "$T/ref/step-000006" "$T/kw/step-000006" "trainer wedged"
for s in 1 2 3 4 5 6; do [ "$(step_samples kw $s)" = "16|16" ] || fail "kw: step $s samples $(step_samples kw $s)"; done
echo "trainer wedged in step 3: found by its heartbeat in 3 s, restarted from step 2; weights and Adam state bit-identical"

# 4a. SIGSTOP of the trainer, then of the colocated engine, after step 1: the controller finds each stopped
# (a stopped child is reported to its parent), kills and restarts it, and the run finishes by itself
# with the uninterrupted run's weights and Adam state
for who in trainer engine; do
    n=stop$who
    "$MILL" run $R --set ledger="$L" --set name=$n --set checkpoint.dir="$T/$n" --set train.steps=6 \
        --set checkpoint.every=1 > "$T/$n.out" 2> "$T/$n.err" &
    runner=$!
    wait_step $n 1
    case $who in trainer) pat=trainer-worker ;; *) pat=rollout-server ;; esac
    victim=$(for p in $(kids "$runner"); do grep -q "$pat" "/proc/$p/cmdline" 2>/dev/null && echo "$p"; done | head -n 1)
    [ -n "$victim" ] || fail "$n: no $who process under the run (pid $runner)"
    kill -STOP "$victim"
    wait $runner || { cat "$T/$n.err" >&2; fail "$n: the run did not finish after its $who was stopped"; }
    grep -q "was stopped by signal 19" "$T/$n.err" || { cat "$T/$n.err" >&2; fail "$n: no clear message"; }
    [ "$(q "select count(*) from events e join runs r on r.id=e.run_id where r.name='$n' and e.kind='restart'")" -ge 1 ] ||
        fail "$n: no restart event"
    same_state "$T/ref/step-000006" "$T/$n/step-000006" "$who stopped"
done
echo "trainer, then engine, stopped (SIGSTOP) mid-run: killed, restarted, finished; weights and Adam state bit-identical"

# 4b. the same with two trainer ranks (data parallel over MPI): kill -9 of rank 1 in step 3 ends the
# group (mpiexec), the controller starts the group again; the sharded state equals an uninterrupted dp 2 run
run dp2 --set train.steps=6 --set checkpoint.every=2 --set train.parallel.dp=2
run k4 --set train.steps=6 --set checkpoint.every=2 --set train.parallel.dp=2 --set debug.kill_trainer_at_step=3 \
    --set debug.kill_trainer_rank=1
grep -q "killed by signal 9\|exited with status.*restarting the trainer from the last checkpoint" "$T/k4.err" ||
    { cat "$T/k4.err" >&2; fail "k4: no restart"; }
grep -q "trainer rank 1: debug_kill_step 3" "$T/k4/logs/trainer.log" || fail "k4: rank 1 was not the one killed"
for f in model-00001-of-00002 model-00002-of-00002 optimizer-00001-of-00002 optimizer-00002-of-00002; do
    cmp -s "$T/dp2/step-000006/$f.safetensors" "$T/k4/step-000006/$f.safetensors" || fail "k4: $f differs"
done
for s in 1 2 3 4 5 6; do [ "$(step_samples k4 $s)" = "16|16" ] || fail "k4: step $s samples $(step_samples k4 $s)"; done
echo "dp 2 trainer, rank 1 killed in step 3: group restarted from step 2; sharded weights and Adam state bit-identical"

# 4b'. the experts over the two trainer ranks (train.parallel.ep 2 with dp 2): every (token, slot)
# row goes to its expert's rank and back; the same losses as dp 2, the gradient norm and final
# logits within fp32 noise, the engine's logprobs equal to the trainer's (every rank's experts
# published), and the routing balance in the ledger
run ep2 --set train.steps=6 --set checkpoint.every=2 --set train.parallel.dp=2 --set train.parallel.ep=2
col() { q "select group_concat(json_extract(s.metrics, '\$.$2'), ' ') from steps s join runs r on r.id=s.run_id where r.name='$1' and s.step > 0"; }
# run RUN against REF: losses equal, gradient norms within 1e-5 relative, the logits of their step-STEP
# checkpoints within TOL
like() { # like RUN REF STEP TOL
    [ "$(col "$1" loss)" = "$(col "$2" loss)" ] || fail "$1: losses $(col "$1" loss) vs $2's $(col "$2" loss)"
    echo "$(col "$2" grad_norm) $(col "$1" grad_norm)" | awk '{ for (i = 1; i <= NF / 2; i++) { d = $i - $(i + NF / 2); if (d < 0) d = -d; if (d > 1e-5 * $i) exit 1 } }' ||
        fail "$1: gradient norms $(col "$1" grad_norm) vs $2's $(col "$2" grad_norm)"
    for r in "$2" "$1"; do
        OMP_NUM_THREADS=1 "$MILL" forward --model "$T/$r/step-00000$3" --input tests/data/tiny-a/input.json --device cpu \
            --output "$T/$r.fwd" 2>/dev/null || fail "forward on $r's checkpoint"
    done
    "$MILL_DIFF" "$T/$1.fwd" "$T/$2.fwd" "$4" logits >/dev/null || fail "$1: final logits differ from $2's"
}
like ep2 dp2 6 1e-4
echo "$(col ep2 max_dlogp)" | awk '{ for (i = 1; i <= NF; i++) if ($i != 0) exit 1 }' ||
    fail "ep2: engine and trainer logprobs differ: $(col ep2 max_dlogp)"
echo "$(col ep2 ep_imbalance)" | awk '{ for (i = 1; i <= NF; i++) if ($i < 1) exit 1 }' || fail "ep2: ep_imbalance $(col ep2 ep_imbalance)"
echo "ep 2 x dp 2 trainer: losses equal to dp 2, grad norms within 1e-5, max|dlogp| 0, ep imbalance $(col ep2 ep_imbalance)"

# 4c. two pipeline stages (train.parallel.pp 2, 1F1B over 4 micro-batches), and the same with two
# model chunks per stage (vpp 2: the interleaved 1F1B over 4 virtual stages): the same steps as one
# process with the same micro-batches, at one thread each
# (a CPU kernel's sums may follow the thread count): equal metrics and final weights
export OMP_NUM_THREADS=1
run pp1 --set train.steps=3 --set train.micro_batch=4
run pp2 --set train.steps=3 --set train.parallel.pp=2 --set train.micro_batch=4 # 4 micro-batches by 1F1B
run pp2v2 --set train.steps=3 --set train.parallel.pp=2 --set train.parallel.vpp=2 --set train.micro_batch=4
unset OMP_NUM_THREADS
metrics() { q "select group_concat(s.metrics, '|') from steps s join runs r on r.id=s.run_id where r.name='$1' and s.step > 0"; }
norms() { q "select group_concat(json_extract(s.metrics, '\$.grad_norm'), ' ') from steps s join runs r on r.id=s.run_id where r.name='$1' and s.step > 0"; }
# the timings aside; the gradient norm adds the stages' sums of squares in another order (last digits)
strip() { echo "$1" | sed 's/"[a-z]*_s":[0-9.e+-]*//g; s/"grad_norm":[0-9.e+-]*//g'; }
OMP_NUM_THREADS=1 "$MILL" forward --model "$T/pp1/step-000003" --input tests/data/tiny-a/input.json --device cpu \
    --output "$T/pp1.fwd" 2>/dev/null || fail "pp: forward on pp1's checkpoint"
for r in pp2 pp2v2; do
    [ "$(strip "$(metrics $r)")" = "$(strip "$(metrics pp1)")" ] || fail "$r: step metrics differ from one process: $(metrics $r) vs $(metrics pp1)"
    echo "$(norms pp1) $(norms $r)" | awk '{ for (i = 1; i <= NF / 2; i++) { d = $i - $(i + NF / 2); if (d < 0) d = -d; if (d > 1e-9 * $i) exit 1 } }' ||
        fail "$r: gradient norms $(norms $r) vs one process $(norms pp1)"
    OMP_NUM_THREADS=1 "$MILL" forward --model "$T/$r/step-000003" --input tests/data/tiny-a/input.json --device cpu \
        --output "$T/$r.fwd" 2>/dev/null || fail "pp: forward on $r's checkpoint"
    cmp -s "$T/pp1.fwd" "$T/$r.fwd" || fail "$r: final weights differ from one process"
done
echo "pp 2 trainer (1F1B; and interleaved, vpp 2): step metrics and final weights equal to one process"
# 4d. heads over the two trainer ranks (train.parallel.tp 2), and with sequence parallelism (sp):
# whole tensors published (gathered from the slices), so the engine's logprobs match the trainer's to
# fp32 noise; losses and final logits within fp32 noise of one process (the slices' partial sums add
# in another order)
for r in tp2 tp2sp; do
    sp=false
    [ $r = tp2sp ] && sp=true
    export OMP_NUM_THREADS=1
    run $r --set train.steps=3 --set train.parallel.tp=2 --set train.parallel.sp=$sp --set train.micro_batch=4
    unset OMP_NUM_THREADS
    echo "$(col $r max_dlogp)" | awk '{ for (i = 1; i <= NF; i++) if ($i > 1e-4) exit 1 }' ||
        fail "$r: engine and trainer logprobs differ: $(col $r max_dlogp)"
    echo "$(col pp1 loss) $(col $r loss)" | awk '{ for (i = 1; i <= NF / 2; i++) { d = $i - $(i + NF / 2); if (d < 0) d = -d; if (d > 1e-4) exit 1 } }' ||
        fail "$r: losses $(col $r loss) vs one process $(col pp1 loss)"
    OMP_NUM_THREADS=1 "$MILL" forward --model "$T/$r/step-000003" --input tests/data/tiny-a/input.json --device cpu \
        --output "$T/$r.fwd" 2>/dev/null || fail "$r: forward on its checkpoint"
    "$MILL_DIFF" "$T/$r.fwd" "$T/pp1.fwd" 1e-3 logits >/dev/null || fail "$r: final logits differ from one process's"
    echo "tp 2 trainer (sp $sp): max|dlogp| $(col $r max_dlogp), losses and final logits within fp32 noise of one process"
done

# 4e. positions over the two trainer ranks (train.parallel.cp 2), with GSPO's sequence ratio and the
# sequence-mean aggregation (a sequence's tokens on both ranks: its counts and log-ratio sums shared):
# losses equal to one process with the same options, gradient norms within 1e-5, the engine's
# logprobs equal to the trainer's, final logits within fp32 noise
export OMP_NUM_THREADS=1
G="--set train.steps=3 --set train.micro_batch=4 --set algorithm.policy_loss=gspo --set algorithm.loss_agg_mode=seq-mean-token-mean"
# shellcheck disable=SC2086
run gs1 $G
# shellcheck disable=SC2086
run cp2 $G --set train.parallel.cp=2
unset OMP_NUM_THREADS
like cp2 gs1 3 1e-3
echo "$(col cp2 max_dlogp)" | awk '{ for (i = 1; i <= NF; i++) if ($i > 1e-6) exit 1 }' ||
    fail "cp2: engine and trainer logprobs differ: $(col cp2 max_dlogp)"
echo "cp 2 trainer (GSPO, seq-mean-token-mean): losses equal to one process, grad norms $(col cp2 grad_norm) vs $(col gs1 grad_norm)"

# 5. a rollout engine killed mid-step: restarted, the step completes, no sample lost or repeated
run k3 --set rollout.layout=disaggregated --set rollout.engines=2 --set train.steps=3 --set debug.kill_engine_at_step=2
n=$(q "select count(*), count(distinct s.prompt_id || '/' || s.sample_idx) from samples s join runs r on r.id=s.run_id where r.name='k3' and s.step=2")
[ "$n" = "16|16" ] || fail "k3: step 2 samples (total|distinct) = $n, expected 16|16"
[ "$(q "select count(*) from events e join runs r on r.id=e.run_id where r.name='k3' and e.kind='restart'")" = 1 ] \
    || fail "k3: no restart event"
echo "engine killed mid-step 2: restarted; step 2 has 16 samples, 16 distinct"
# ... and with rollout.max_restarts 0 the same fault ends the run, naming the bound
if "$MILL" run $R --set ledger="$L" --set name=k3b --set checkpoint.dir="$T/k3b" --set rollout.layout=disaggregated \
    --set train.steps=3 --set debug.kill_engine_at_step=2 --set rollout.max_restarts=0 > "$T/k3b.out" 2> "$T/k3b.err"; then
    fail "k3b: the run went on past rollout.max_restarts 0"
fi
grep -q "restarted 0 times in this run (rollout.max_restarts)" "$T/k3b.err" || { cat "$T/k3b.err" >&2; fail "k3b: message"; }

# 5a. engines of several ranks (rollout.parallel): tp 2 x ep 2 (one attention group over two ranks,
# the experts over both) gives the one-engine run bit for bit; a killed rank of an ep 2 engine (two
# attention groups) takes its engine down, and the controller restarts the whole group
run eg --set train.steps=3 --set checkpoint.every=1 --set rollout.parallel.tp=2 --set rollout.parallel.ep=2
grep -q "2 rank(s)" "$T/eg/logs/engine-0.log" || fail "eg: the engine did not run on 2 ranks"
same_state "$T/ref/step-000003" "$T/eg/step-000003" "engine tp 2 x ep 2"
[ "$(col eg max_dlogp)" = "$(col ref max_dlogp | cut -d' ' -f1-3)" ] || fail "eg: max_dlogp $(col eg max_dlogp)"
"$MILL" run $R --set ledger="$L" --set name=egk --set checkpoint.dir="$T/egk" --set train.steps=10 \
    --set rollout.layout=disaggregated --set rollout.parallel.ep=2 > "$T/egk.out" 2> "$T/egk.err" &
runner=$!
wait_step egk 2
victim=$(for m in $(kids "$runner"); do # the engine's last rank: run -> mpiexec -> hydra proxy -> rank
    for x in $(kids "$m"); do kids "$x"; done
done | tr ' ' '\n' | grep . | sort -n | tail -n 1)
[ -n "$victim" ] || fail "egk: no rank of the engine found under the run (pid $runner)"
kill -9 "$victim"
wait $runner || { cat "$T/egk.err" >&2; fail "egk: the run failed after a rank of its engine was killed"; }
[ "$(q "select count(*) from events e join runs r on r.id=e.run_id where r.name='egk' and e.kind='restart'")" -ge 1 ] \
    || fail "egk: no restart event after rank $victim was killed"
n=$(q "select count(*), count(distinct s.step || '/' || s.prompt_id || '/' || s.sample_idx) from samples s join runs r on r.id=s.run_id where r.name='egk' and s.superseded = 0")
[ "$n" = "160|160" ] || fail "egk: live samples (total|distinct) = $n, expected 160|160"
echo "engine of 2 x 2 ranks: = one engine bit for bit; rank $victim of an ep 2 engine killed: restarted, 160 samples once"

# a rank of an ep 2 engine stopped (SIGSTOP): not our child, so only the heartbeat sees it (health
# unanswered, or samples or a bucket's ack missing for rollout.heartbeat_s); the engine is restarted
"$MILL" run $R --set ledger="$L" --set name=egw --set checkpoint.dir="$T/egw" --set train.steps=6 \
    --set rollout.layout=disaggregated --set rollout.parallel.ep=2 --set rollout.heartbeat_s=3 > "$T/egw.out" 2> "$T/egw.err" &
runner=$!
wait_step egw 2
victim=$(for m in $(kids "$runner"); do for x in $(kids "$m"); do kids "$x"; done; done | tr ' ' '\n' | grep . | sort -n | tail -n 1)
[ -n "$victim" ] || fail "egw: no rank of the engine found under the run (pid $runner)"
kill -STOP "$victim"
wait $runner || { cat "$T/egw.err" >&2; fail "egw: the run failed after a rank of its engine was stopped"; }
grep -q "(its heartbeat): wedged; restarting it" "$T/egw.err" || { cat "$T/egw.err" >&2; fail "egw: no clear message"; }
n=$(q "select count(*), count(distinct s.step || '/' || s.prompt_id || '/' || s.sample_idx) from samples s join runs r on r.id=s.run_id where r.name='egw' and s.superseded = 0")
[ "$n" = "96|96" ] || fail "egw: live samples (total|distinct) = $n, expected 96|96"
kill -KILL "$victim" 2>/dev/null || true
echo "a rank of an ep 2 engine stopped: found by the heartbeat, the engine restarted, 96 samples once"

# 5b. the math-dataset recipe (dapo layout, DeepSeek-V4 chat format through the tiny model's BPE
# tokenizer.json, math verifier) runs as shipped, two steps on the CPU: the prompts the ledger keeps are
# the chat texts, and the engine stops at the tokenizer's eos
"$MILL" run configs/runs/grpo-math-dapo.yaml --set ledger="$L" --set checkpoint.dir="$T/dapo" --set train.steps=2 \
    --set train.device=cpu --set rollout.device=cpu --set rollout.max_new_tokens=8 --set rollout.prompts_per_step=4 \
    --set rollout.samples_per_prompt=2 > "$T/dapo.out" 2> "$T/dapo.err" || { cat "$T/dapo.err" >&2; fail "dapo recipe"; }
[ "$(q "select status from runs where name='grpo-math-dapo'")" = finished ] || fail "dapo: not finished"
[ "$(q "select count(*) from steps s join runs r on r.id=s.run_id where r.name='grpo-math-dapo' and s.step > 0")" = 2 ] ||
    fail "dapo: not 2 steps"
[ "$(q "select count(*) from samples s join runs r on r.id=s.run_id where r.name='grpo-math-dapo'")" -ge 16 ] ||
    fail "dapo: samples"
# every prompt length in the ledger is one of the sample's prompts in the chat format, as mill tokenize counts it
python3 -c "import json, sys
for l in open(sys.argv[1]): print(json.dumps({'messages': json.loads(l)['prompt'], 'add_generation_prompt': True}))" \
    tests/data/math-sample.jsonl > "$T/dapo-chat.jsonl"
"$MILL" tokenize --tokenizer configs/models/dsv4-tiny-bpe --input "$T/dapo-chat.jsonl" --output "$T/dapo-ids.jsonl" >/dev/null ||
    fail "dapo: mill tokenize"
python3 -c "import json, sys; print('\n'.join(str(len(json.loads(l)['ids'])) for l in open(sys.argv[1])))" "$T/dapo-ids.jsonl" |
    sort -u > "$T/dapo-lens"
for n in $(q "select distinct prompt_len from samples s join runs r on r.id=s.run_id where r.name='grpo-math-dapo'"); do
    grep -qx "$n" "$T/dapo-lens" || fail "dapo: a prompt of $n tokens is not a chat prompt of the sample ($(tr '\n' ' ' < "$T/dapo-lens"))"
done
echo "dapo recipe: 2 steps on the JSONL sample in DeepSeek-V4's chat format, BPE tokenizer, math verifier"

# the loss options reach the trainer (GSPO with Dr. GRPO's aggregation, dual-clip, the unbiased KL)
run opts --set train.steps=2 --set algorithm.policy_loss=gspo --set algorithm.loss_agg_mode=seq-mean-token-sum \
    --set algorithm.clip_ratio_c=3 --set algorithm.kl_coef=0.05 --set algorithm.kl_type=unbiased
[ "$(q "select count(*) from steps s join runs r on r.id=s.run_id where r.name='opts' and s.step > 0")" = 2 ] ||
    fail "opts: the run with the loss options did not train 2 steps"

# 6. bad input: a misspelt key, a bad dataset row
if "$MILL" run $R --set ledger="$L" --set rollout.tempurature=1 2> "$T/bad.err"; then fail "bad key accepted"; fi
grep -q "rollout.tempurature.*temperature" "$T/bad.err" || fail "bad key: $(cat "$T/bad.err")"
printf '{"prompt":"What is 1 + 1?","label":"2"}\n{"prompt":"x"\n' > "$T/bad.jsonl"
runs_before=$(q "select count(*) from runs")
if "$MILL" run $R --set ledger="$L" --set data.kind=jsonl --set data.path="$T/bad.jsonl" 2> "$T/bad2.err"; then
    fail "bad row accepted"; fi
grep -q "bad.jsonl:2:" "$T/bad2.err" || fail "bad row: $(cat "$T/bad2.err")"
[ "$(q "select count(*) from runs")" = "$runs_before" ] || fail "bad row: a run was recorded for a recipe that cannot start"
if "$MILL" run $R --set ledger="$L" --set rollout.device=gpu 2> "$T/bad3.err"; then fail "bad device accepted"; fi
grep -q 'rollout.device "gpu" must be "auto", "cpu" or "cuda"' "$T/bad3.err" || fail "bad device: $(cat "$T/bad3.err")"
if "$MILL" run $R --set ledger="$L" --set algorithm.loss_agg_mode=token-sum 2> "$T/bad6.err"; then fail "token-sum accepted"; fi
grep -q 'algorithm.loss_agg_mode "token-sum" must be' "$T/bad6.err" || fail "token-sum: $(cat "$T/bad6.err")"
# a value out of range fails as the recipe is read, before any process starts or any run is recorded
if "$MILL" run $R --set ledger="$L" --set algorithm.eps_low=5 2> "$T/bad4.err"; then fail "eps_low 5 accepted"; fi
grep -q 'algorithm.eps_low = 5 is outside \[0, 1\]' "$T/bad4.err" || fail "eps_low 5: $(cat "$T/bad4.err")"
if "$MILL" run $R --set ledger="$L" --set optimizer.beta2=1.5 2> "$T/bad5.err"; then fail "beta2 1.5 accepted"; fi
grep -q 'optimizer.beta2 = 1.5 is outside \[0, 1\]' "$T/bad5.err" || fail "beta2 1.5: $(cat "$T/bad5.err")"
if "$MILL" run $R --set ledger="$L" --set rollout.exact=true --set rollout.parallel.ep=2 2> "$T/bad7.err"; then
    fail "rollout.exact with an engine of 2 ranks accepted"; fi
grep -q 'rollout.exact needs engines of one rank' "$T/bad7.err" || fail "exact ep 2: $(cat "$T/bad7.err")"
[ "$(q "select count(*) from runs")" = "$runs_before" ] || fail "a run was recorded for a recipe with a value out of range"
echo "bad key, bad row, bad device, values out of range, rollout.exact on 2 engine ranks: clear errors, nothing recorded"
