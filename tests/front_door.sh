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
run=(--epochs 3 --train-subset 512 --test-subset 256 --batch-size 32 --augment --warmup-steps 4)
if "$fm" "${run[@]}" --artifact-dir "$tmp/run" >"$tmp/run.log" 2>&1; then
    pass=$((pass + 1))
    # Killed after epoch 2: only that set is there. The resumed run ends with the same weights
    # (model-3.bpk differs only in the 4 random ids Burn gives BatchNorm's running statistics on
    # load, 8 bytes each) and prints the same result.
    mkdir -p "$tmp/resumed/checkpoint"
    cp "$tmp/run/checkpoint/"*-2.* "$tmp/resumed/checkpoint/"
    if "$fm" "${run[@]}" --artifact-dir "$tmp/resumed" --resume latest >"$tmp/resumed.log" 2>&1 &&
        [ "$(grep -o 'test accuracy.*steps [0-9]*' "$tmp/run.log")" = "$(grep -o 'test accuracy.*steps [0-9]*' "$tmp/resumed.log")" ] &&
        [ "$(cmp -l "$tmp/run/checkpoint/model-3.bpk" "$tmp/resumed/checkpoint/model-3.bpk" | wc -l)" -le 32 ]; then
        pass=$((pass + 1))
    else
        echo "FAIL: the resumed run differs from the uninterrupted one:"
        tail -n 2 "$tmp/run.log" "$tmp/resumed.log"
        fail=$((fail + 1))
    fi
    cp -r "$tmp/run" "$tmp/other"
    expect 1 "the record was saved with" "$fm" --artifact-dir "$tmp/other" --epochs 3 --resume 2 --method sam \
        --train-subset 512 --test-subset 256
    # Overwrite 4 KiB in the middle of the optimizer file, then of the model file.
    for name in optim model; do
        file="$tmp/run/checkpoint/$name-2.bpk"
        head -c 4096 /dev/zero | tr '\0' '\377' |
            dd of="$file" bs=1 seek=$(($(stat -c %s "$file") / 2)) conv=notrunc status=none
        expect 1 "$name-2.bpk is damaged" "$fm" --artifact-dir "$tmp/run" --epochs 3 --resume 2 --train-subset 512
    done
    # A set whose manifest was never written (killed while saving) is incomplete, and `latest`
    # falls back to an older complete one or none.
    rm "$tmp/other/checkpoint/set-3.json"
    expect 1 "incomplete" "$fm" --artifact-dir "$tmp/other" --epochs 4 --resume 3 --train-subset 512
    rm "$tmp/other/checkpoint/scheduler-2.bpk"
    expect 1 "scheduler-2.bpk" "$fm" --artifact-dir "$tmp/other" --epochs 3 --resume 2 --train-subset 512
    expect 1 "no complete checkpoint" "$fm" --artifact-dir "$tmp/other" --epochs 4 --resume latest
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
    expect 0 "resumed from the state saved after epoch 1" "$cl" "${cl_run[@]}" --artifact-dir "$tmp/cl-resumed" \
        --resume latest
    if [ "$(cmp -l "$tmp/cl/model-2.bpk" "$tmp/cl-resumed/model-2.bpk" | wc -l)" -le 32 ]; then
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

echo "front door: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
