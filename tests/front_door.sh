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
if "$fm" "${small[@]}" --artifact-dir "$tmp/run" >"$tmp/run.log" 2>&1; then
    pass=$((pass + 1))
    expect 1 "the record was saved with" "$fm" --artifact-dir "$tmp/run" --epochs 2 --resume 1 --method sam \
        --train-subset 512 --test-subset 256
    # Overwrite 4 KiB in the middle of the optimizer file (tensor data, under the checksum; a few
    # bytes alone could fall in alignment padding, which holds no data).
    optim="$tmp/run/checkpoint/optim-1.bpk"
    head -c 4096 /dev/zero | tr '\0' '\377' |
        dd of="$optim" bs=1 seek=$(($(stat -c %s "$optim") / 2)) conv=notrunc status=none
    expect 1 "optim-1.bpk" "$fm" --artifact-dir "$tmp/run" --epochs 2 --resume 1 --train-subset 512 --test-subset 256
    rm "$tmp/run/checkpoint/scheduler-1.bpk"
    expect 1 "scheduler-1.bpk" "$fm" --artifact-dir "$tmp/run" --epochs 2 --resume 1 --train-subset 512
else
    echo "FAIL: a small training run failed:"
    tail -n 20 "$tmp/run.log"
    fail=$((fail + 1))
fi

echo "front door: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
