#!/usr/bin/env bash
# Faults survived, counted: a custom-loop run that seals a checkpoint set after every epoch is
# killed with SIGKILL at random moments; after each kill, `--resume latest` must restore a sealed
# set of that same run (or, when none was sealed yet, a fresh start must be accepted), and the
# finished run's weights must equal an uninterrupted run's (the digest of every parameter).
# Needs the release examples (see tests/front_door.sh) and the Fashion-MNIST data.
# Usage: tests/crash_injection.sh [TRIALS] (default 50).
set -u
cd "$(dirname "$0")/.."
bin=${EXAMPLES_DIR:-${CARGO_TARGET_DIR:-target}/release/examples}
trials=${1:-50}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
run=(--epochs 4 --train-subset 512 --test-subset 64 --batch-size 32 --warmup-steps 4)

start=$(date +%s%N)
"$bin/custom_loop" "${run[@]}" --artifact-dir "$tmp/straight" >"$tmp/straight.log" 2>&1 || {
    echo "FAIL: the uninterrupted run failed"; tail -n 20 "$tmp/straight.log"; exit 1; }
span_ms=$(( ($(date +%s%N) - start) / 1000000 ))
want=$(grep -o 'weights digest .*' "$tmp/straight.log")
# When the uninterrupted run wrote each set (from the files' modification times): every other
# kill falls in a window around one of these moments, to catch runs in the middle of writing.
writes=()
for manifest in "$tmp/straight"/set-*.json; do
    epoch=${manifest##*/set-}; epoch=${epoch%.json}
    first=$(stat -c %.3Y "$tmp/straight/model-$epoch.bpk" | tr -d .)
    last=$(stat -c %.3Y "$manifest" | tr -d .)
    writes+=("$(( first - start / 1000000 )):$(( last - start / 1000000 ))")
done

# RANDOM is seeded so that the kill moments repeat.
RANDOM=2026
ok=0 failed=0 no_set=0 finished=0 mid_write=0 resumed_from=()
for trial in $(seq "$trials"); do
    dir="$tmp/trial-$trial"
    # Odd trials: a moment anywhere in the run (data loading included); even trials: within
    # 30 ms of one of the uninterrupted run's set writes.
    draw=$(( RANDOM * 32768 + RANDOM ))
    if [ $((trial % 2)) -eq 1 ] || [ ${#writes[@]} -eq 0 ]; then
        delay_ms=$(( draw % (span_ms + 1) ))
    else
        window=${writes[$(( draw % ${#writes[@]} ))]}
        from=$(( ${window%%:*} - 30 )); to=$(( ${window##*:} + 30 ))
        delay_ms=$(( from + RANDOM % (to - from + 1) ))
        [ "$delay_ms" -lt 0 ] && delay_ms=0
    fi
    "$bin/custom_loop" "${run[@]}" --artifact-dir "$dir" >"$dir.killed.log" 2>&1 &
    pid=$!
    sleep "$(printf '%d.%03d' $((delay_ms / 1000)) $((delay_ms % 1000)))"
    kill -9 "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    # Killed while writing a set: files of an epoch without its manifest, or a temporary file.
    for model in "$dir"/model-*.bpk; do
        [ -e "$model" ] || continue
        epoch=${model##*/model-}; epoch=${epoch%.bpk}
        [ -e "$dir/set-$epoch.json" ] || { mid_write=$((mid_write + 1)); break; }
    done
    if ls "$dir"/*.tmp >/dev/null 2>&1; then mid_write=$((mid_write + 1)); fi
    if "$bin/custom_loop" "${run[@]}" --artifact-dir "$dir" --resume latest >"$dir.log" 2>&1; then
        resumed_from+=("$(grep -o 'saved after epoch [0-9]*' "$dir.log" | grep -o '[0-9]*$')")
    elif grep -q "nothing is left to train after epoch ${run[1]}" "$dir.log"; then
        # Killed after its last set was sealed: that set holds the finished run.
        finished=$((finished + 1))
    elif grep -q "no complete checkpoint" "$dir.log"; then
        no_set=$((no_set + 1))
        "$bin/custom_loop" "${run[@]}" --artifact-dir "$dir" >"$dir.log" 2>&1
    fi
    got=$(grep -o 'weights digest .*' "$dir.log")
    if [ -n "$got" ] && [ "$got" = "$want" ]; then
        ok=$((ok + 1))
    else
        failed=$((failed + 1))
        echo "FAIL: trial $trial (killed after $delay_ms ms):"
        tail -n 5 "$dir.log"
    fi
    rm -rf "$dir"
done
counts=$(printf '%s\n' "${resumed_from[@]}" | sort | uniq -c | awk '{printf "%s×epoch %s, ", $1, $2}')
echo "crash injection: $trials kills over a ${span_ms} ms run; resumed from ${counts}fresh start (no set sealed yet) $no_set, already finished (last set sealed) $finished; killed while writing a set $mid_write"
echo "$ok passed, $failed failed"
[ "$failed" -eq 0 ]
