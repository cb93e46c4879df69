#!/usr/bin/env bash
# The noisy-label setting of docs/benchmarks.md (Fashion-MNIST 5k, 40 % label noise, 30 epochs)
# with the model in bf16 beside f32, on flex: one process per method and precision, so that
# /usr/bin/time -v gives each its peak resident memory. Resumable: a finished pair is skipped.
#
#   bash docs/precision/bench.sh [OUT]     # default OUT: target/precision-bench
#   python3 docs/precision/summarize.py OUT
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-target/precision-bench}
seeds=${SEEDS:-3}
mkdir -p "$out"
bin=target/release/examples/benchmark
cargo build --release -p burn-sam-sample-examples --example benchmark
git rev-parse HEAD > "$out/commit"
for method in sgd sam vsam vsam-trend; do
    for precision in f32 bf16; do
        name="$precision-$method"
        [ -f "$out/$name.done" ] && continue
        /usr/bin/time -v -o "$out/$name.time" "$bin" --epochs 30 --seeds "$seeds" --train-subset 5000 \
            --test-subset 5000 --batch-size 64 --lr 0.05 --schedule cosine --weight-decay 0 --augment false \
            --rho 0.05 --budget 0.2 --channels 16 --hidden 128 --label-noise 0.4 --memorization-images 500 \
            --backend flex --methods "$method" --precision "$precision" --out "$out/$name.md" \
            > "$out/$name.log" 2>&1
        touch "$out/$name.done"
    done
done
python3 docs/precision/summarize.py "$out"
