#!/usr/bin/env bash
# The examples' front door: every bad input must end with exit 2 (a bad command line) or 1 (a
# failure at run time) and a message that names the problem, never a panic (101) or a silent run.
# Needs the release examples (`cargo build --release -p burn-sam-sample-examples --examples`; found in
# $EXAMPLES_DIR, else $CARGO_TARGET_DIR/release/examples, else target/release/examples)
# and the Fashion-MNIST data where the examples look for it by default.
set -u
cd "$(dirname "$0")/.."
bin=${EXAMPLES_DIR:-${CARGO_TARGET_DIR:-target}/release/examples}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pass=0
fail=0

# expect CODE NEEDLE COMMAND...: COMMAND exits with CODE and prints NEEDLE.
expect() {
    local code=$1 needle=$2
    shift 2
    local out rc
    out=$("$@" 2>&1)
    rc=$?
    if [ "$rc" -eq "$code" ] && grep -qF -- "$needle" <<<"$out"; then
        pass=$((pass + 1))
    else
        echo "FAIL: $* -> exit $rc, expected $code and '$needle'; output ends:"
        tail -n 5 <<<"$out"
        fail=$((fail + 1))
    fi
}

# expect_file CODE RC NEEDLE LOG WHAT: a command already run exited with RC and wrote LOG.
expect_file() {
    if [ "$2" -eq "$1" ] && grep -qF -- "$3" "$4"; then
        pass=$((pass + 1))
    else
        echo "FAIL: $5 -> exit $2, expected $1 and '$3'; output ends:"
        tail -n 5 "$4"
        fail=$((fail + 1))
    fi
}

# same_weights LOG LOG: both runs printed the same digest of their final weights.
same_weights() {
    local a b
    a=$(grep -o 'weights digest .*' "$1")
    b=$(grep -o 'weights digest .*' "$2")
    [ -n "$a" ] && [ "$a" = "$b" ]
}

fm="$bin/fashion_mnist"
cl="$bin/custom_loop"
small=(--epochs 1 --train-subset 512 --test-subset 256)

# Bad numbers are usage errors that name the flag.
expect 2 "--epochs" "$fm" --epochs 0
expect 2 "--lr" "$fm" --lr nan
expect 2 "--lr" "$cl" --lr=-1
expect 2 "--batch-size" "$cl" --batch-size 0
expect 2 "--train-subset" "$fm" --train-subset 0
expect 2 "--test-subset" "$fm" --test-subset 0
expect 2 "--min-accuracy" "$fm" --min-accuracy nan
expect 2 "--workers" "$fm" --workers 0
expect 2 "--resume" "$fm" --resume newest
expect 2 "--rho" "$cl" --rho inf
expect 2 "unknown method \`nosuch\`" "$bin/benchmark" --quick --methods sgd,nosuch
expect 2 "--label-noise" "$bin/benchmark" --quick --label-noise 1.5
expect 2 "--precision" "$bin/benchmark" --quick --precision fp8
expect 2 "\`fp16\` is not a cache precision" "$bin/benchmark" --quick --cache-precision fp16
expect 1 "--precision bf16: the device" "$bin/benchmark" --quick --backend ndarray --precision bf16 --out "$tmp/b.md"
expect 2 "--rho-grid" "$bin/benchmark" --quick --rho-grid 0.05,-1
expect 2 "--validation 60000" "$bin/benchmark" --quick --validation 60000
expect 2 "--runs-at: only with the \`report\` step" "$bin/benchmark" run --quick --runs-at 7cad086
expect 2 "is not a commit" "$bin/benchmark" report --quick --runs-at HEAD~1
expect 2 "commit 7cad086 is named twice" "$bin/benchmark" report --quick --runs-at 7cad086,cd081f4,7cad086
printf 'not a record\n{}\n' > "$tmp/runs.jsonl"
expect 1 "line 1: not a run record" "$bin/benchmark" --quick --results "$tmp/runs.jsonl" --out "$tmp/c.md"
expect 1 "selection runs for label noise" "$bin/benchmark" report --quick --results "$tmp/none.jsonl" --out "$tmp/d.md"
expect 2 "--precision must be bf16 or f16" "$bin/ascent_rounding" --precision f32
# A run too long to count.
expect 1 "too many steps" "$fm" --epochs 18446744073709551615

# A named data folder that cannot serve is an error, not a fallback.
expect 1 "does not exist" "$fm" --data-dir "$tmp/nowhere" "${small[@]}"
mkdir -p "$tmp/empty"
expect 1 "lacks train-images-idx3-ubyte" "$cl" --data-dir "$tmp/empty" --epochs 1 --train-subset 512
touch "$tmp/a-file"
expect 1 "FASHION_MNIST_DIR names" env FASHION_MNIST_DIR="$tmp/a-file" "$fm" "${small[@]}"

# Artifact folders and checkpoints.
expect 1 "is not a folder" "$fm" --artifact-dir "$tmp/a-file" "${small[@]}"
expect 1 "checkpoint 1" "$fm" --artifact-dir "$tmp/never-trained" --epochs 2 --resume 1 --train-subset 512
expect 1 "nothing is left to train" "$fm" --artifact-dir "$tmp/never-trained" --epochs 1 --resume 1
expect 1 "no complete checkpoint" "$fm" --artifact-dir "$tmp/never-trained" --epochs 2 --resume latest
run_opts=(--train-subset 512 --test-subset 256 --batch-size 32 --augment)
run=(--epochs 3 "${run_opts[@]}" --warmup-steps 4)
if "$fm" "${run[@]}" --artifact-dir "$tmp/run" >"$tmp/run.log" 2>&1; then
    pass=$((pass + 1))
    # Killed after epoch 2: only that set is there. The resumed run ends with the same weights
    # (the digest of every parameter's values) and prints the same result.
    mkdir -p "$tmp/resumed/checkpoint"
    cp "$tmp/run/checkpoint/"*-2.* "$tmp/resumed/checkpoint/"
    if "$fm" "${run[@]}" --artifact-dir "$tmp/resumed" --resume latest >"$tmp/resumed.log" 2>&1 &&
        grep -qF "resuming from checkpoint 2 in $tmp/resumed/checkpoint" "$tmp/resumed.log" &&
        [ "$(grep -o 'test accuracy.*steps [0-9]*' "$tmp/run.log")" = "$(grep -o 'test accuracy.*steps [0-9]*' "$tmp/resumed.log")" ] &&
        same_weights "$tmp/run.log" "$tmp/resumed.log"; then
        pass=$((pass + 1))
    else
        echo "FAIL: the resumed run differs from the uninterrupted one:"
        tail -n 2 "$tmp/run.log" "$tmp/resumed.log"
        fail=$((fail + 1))
    fi
    cp -r "$tmp/run" "$tmp/other"
    expect 1 "--method: vsam in the checkpoint, sam now" "$fm" --artifact-dir "$tmp/other" --epochs 3 --resume 2 \
        --method sam "${run_opts[@]}"
    # Overwrite 4 KiB in the middle of the optimizer file, then of the model file.
    for name in optim model; do
        file="$tmp/run/checkpoint/$name-2.bpk"
        head -c 4096 /dev/zero | tr '\0' '\377' |
            dd of="$file" bs=1 seek=$(($(stat -c %s "$file") / 2)) conv=notrunc status=none
        expect 1 "$name-2.bpk is damaged" "$fm" --artifact-dir "$tmp/run" "${run[@]}" --resume 2
    done
    # A set whose manifest was never written (killed while saving) is incomplete, and `latest`
    # falls back to an older complete one or none.
    rm "$tmp/other/checkpoint/set-3.json"
    expect 1 "incomplete" "$fm" --artifact-dir "$tmp/other" --epochs 4 "${run_opts[@]}" --warmup-steps 4 \
        --allow-epochs-change --resume 3
    rm "$tmp/other/checkpoint/scheduler-2.bpk"
    expect 1 "scheduler-2.bpk" "$fm" --artifact-dir "$tmp/other" "${run[@]}" --resume 2
    expect 1 "no complete checkpoint" "$fm" --artifact-dir "$tmp/other" --epochs 4 "${run_opts[@]}" \
        --warmup-steps 4 --allow-epochs-change --resume latest
else
    echo "FAIL: a small training run failed:"
    tail -n 20 "$tmp/run.log"
    fail=$((fail + 1))
fi

# The custom loop resumes too, and exactly.
cl_run=(--epochs 2 --train-subset 512 --batch-size 32 --warmup-steps 4)
if "$cl" "${cl_run[@]}" --artifact-dir "$tmp/cl" >"$tmp/cl.log" 2>&1; then
    mkdir -p "$tmp/cl-resumed"
    cp "$tmp/cl/"*-1.* "$tmp/cl-resumed/"
    "$cl" "${cl_run[@]}" --artifact-dir "$tmp/cl-resumed" --resume latest >"$tmp/cl-resumed.log" 2>&1
    expect_file 0 $? "resumed from the state saved after epoch 1" "$tmp/cl-resumed.log" "custom_loop --resume latest"
    # Resuming a finished run trains nothing: an error naming both numbers, and what its last
    # set holds.
    expect 1 "nothing is left to train after epoch 2" "$cl" "${cl_run[@]}" --artifact-dir "$tmp/cl" --resume latest
    expect 1 "checkpoint 2 holds the finished run: weights digest" "$cl" "${cl_run[@]}" --artifact-dir "$tmp/cl" \
        --resume latest
    if same_weights "$tmp/cl.log" "$tmp/cl-resumed.log"; then
        pass=$((pass + 1))
    else
        echo "FAIL: the resumed custom loop ends with other weights"
        fail=$((fail + 1))
    fi
else
    echo "FAIL: a small custom-loop run failed:"
    tail -n 20 "$tmp/cl.log"
    fail=$((fail + 1))
fi

# Options a method does not use, and the small programs' options.
expect 2 "--warmup-steps is vSAM's warm-up" "$fm" --method sam --warmup-steps 4 "${small[@]}"
expect 2 "--steps" "$bin/soak" --steps 0
expect 2 "--steps" "$bin/quickstart" --steps 0
expect 1 "error: invalid configuration: \`backend\` = tpu" "$bin/soak" --backend tpu
expect 1 "error: invalid configuration: \`backend\` = tpu" "$bin/quickstart" --backend tpu
expect 2 "--overwrite" "$fm" --resume latest --overwrite

expect 2 "takes no options" "$bin/learner_minimal" --epochs 3
expect 1 "--out /proc/sam-bench/b.md: cannot create /proc/sam-bench/b" "$bin/benchmark" --quick --out /proc/sam-bench/b.md

# A closed stdout ends the program quietly (SIGPIPE, as Unix tools do), never a panic.
for program in quickstart soak; do
    "$bin/$program" --steps 5 2>"$tmp/pipe.err" | head -c 1 >/dev/null
    rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 101 ] && [ "$rc" -ne 134 ] && ! grep -q panicked "$tmp/pipe.err"; then
        pass=$((pass + 1))
    else
        echo "FAIL: $program | head -> exit $rc:"
        tail -n 3 "$tmp/pipe.err"
        fail=$((fail + 1))
    fi
done

# An artifact folder that cannot be created is an error before Burn starts.
expect 1 "cannot create /proc/sam-artifacts" "$fm" --artifact-dir /proc/sam-artifacts "${small[@]}"
expect 1 "cannot create /proc/sam-artifacts" "$cl" --artifact-dir /proc/sam-artifacts "${small[@]}"

# A gzip whose idx header announces 4.1 M images is refused before anything is inflated.
mkdir -p "$tmp/bomb"
python3 - "$tmp/bomb" <<'PY'
import gzip, struct, sys
d = sys.argv[1]
heads = {"train-images-idx3-ubyte": (3, [4_100_000, 28, 28]), "train-labels-idx1-ubyte": (1, [60_000]),
         "t10k-images-idx3-ubyte": (3, [10_000, 28, 28]), "t10k-labels-idx1-ubyte": (1, [10_000])}
for name, (rank, dims) in heads.items():
    with gzip.open(f"{d}/{name}.gz", "wb") as f:
        f.write(bytes([0, 0, 8, rank]) + b"".join(struct.pack(">I", x) for x in dims) + bytes(4096))
PY
expect 1 "dimension 0 is 4100000, expected 60000" "$fm" --data-dir "$tmp/bomb" "${small[@]}"

# Runs tied to their checkpoints: other options, another run's sets, one writer at a time.
tied=(--epochs 2 --train-subset 256 --test-subset 128 --batch-size 32 --warmup-steps 4)
if "$fm" "${tied[@]}" --artifact-dir "$tmp/tied" >"$tmp/tied.log" 2>&1; then
    pass=$((pass + 1))
    expect 1 "other options" "$fm" --artifact-dir "$tmp/tied" --resume 2 --epochs 3 --train-subset 256 \
        --test-subset 128 --batch-size 64 --warmup-steps 4
    expect 1 "--seed: 0 in the checkpoint, 9 now" "$fm" --artifact-dir "$tmp/tied" --resume 2 --epochs 3 \
        --train-subset 256 --test-subset 128 --batch-size 32 --warmup-steps 4 --seed 9
    expect 1 "--lr: 0.05 in the checkpoint, 0.5 now" "$fm" --artifact-dir "$tmp/tied" --resume latest --epochs 3 \
        --train-subset 256 --test-subset 128 --batch-size 32 --warmup-steps 4 --lr 0.5
    expect 1 "--epochs: 2 in the checkpoint, 3 now" "$fm" --artifact-dir "$tmp/tied" --resume 2 --epochs 3 \
        --train-subset 256 --test-subset 128 --batch-size 32 --warmup-steps 4
    expect 0 "resuming from checkpoint 2" "$fm" --artifact-dir "$tmp/tied" --resume 2 --epochs 3 \
        --allow-epochs-change --train-subset 256 --test-subset 128 --batch-size 32 --warmup-steps 4
    # A fresh run with another seed refuses the directory, and `latest` never picks another run.
    expect 1 "holds checkpoints of another run" "$fm" "${tied[@]}" --seed 7 --lr 0.1 --artifact-dir "$tmp/tied"
    expect 0 "test accuracy" "$fm" --epochs 1 --train-subset 256 --test-subset 128 --batch-size 32 --warmup-steps 4 \
        --seed 7 --lr 0.1 --artifact-dir "$tmp/tied" --overwrite
    expect 1 "no checkpoint of this run" "$fm" "${tied[@]}" --artifact-dir "$tmp/tied" --resume latest
    # One writer per directory: a second run is refused while the first holds the lock; a
    # killed holder does not block the next run.
    "$fm" --epochs 30 --train-subset 2048 --test-subset 128 --batch-size 32 --artifact-dir "$tmp/busy" \
        >"$tmp/busy.log" 2>&1 &
    holder=$!
    for _ in $(seq 200); do
        [ -s "$tmp/busy/checkpoint/.lock" ] && break
        sleep 0.1
    done
    expect 1 "is in use by another run (process $holder)" "$fm" "${small[@]}" --artifact-dir "$tmp/busy"
    kill -9 "$holder" 2>/dev/null
    wait "$holder" 2>/dev/null
    expect 0 "test accuracy" "$fm" "${small[@]}" --artifact-dir "$tmp/busy" --overwrite
else
    echo "FAIL: a small training run failed:"
    tail -n 20 "$tmp/tied.log"
    fail=$((fail + 1))
fi

echo "front door: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
