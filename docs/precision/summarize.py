#!/usr/bin/env python3
"""Tables of docs/precision/bench.sh's runs: per method and precision, the final and best test
accuracy (mean ± sd over seeds), SAM's gain and the retention of it, the training time relative
to SGD of the same precision and to the same method in f32, and the process's peak resident
memory. Writes OUT/summary.md and prints it."""
import json
import re
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1] if len(sys.argv) > 1 else "target/precision-bench")
methods = ["sgd", "sam", "vsam", "vsam-trend"]
precisions = ["f32", "bf16"]


def runs(name):
    path = out / name / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def peak_mib(name):
    text = (out / f"{name}.time").read_text()
    kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    return kib / 1024


def mean_sd(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


rows = {}
for precision in precisions:
    for method in methods:
        name = f"{precision}-{method}"
        result = runs(name)
        if result is None:
            continue
        finals = [r["epochs"][-1]["test_accuracy"] * 100 for r in result]
        bests = [max(e["test_accuracy"] for e in r["epochs"]) * 100 for r in result]
        rows[(precision, method)] = {
            "final": finals,
            "best": bests,
            "seconds": statistics.mean(r["train_seconds"] for r in result),
            "sam_fraction": statistics.mean(r["sam_steps"] / max(r["steps"], 1) for r in result),
            "non_finite": sum(r["non_finite_steps"] for r in result),
            "failed": [r["seed"] for r in result if r["epochs"][-1]["test_accuracy"] < 0.2],
            "peak": peak_mib(name),
            "seeds": len(result),
        }

lines = [
    f"Runs of commit `{(out / 'commit').read_text().strip()[:7]}`; accuracies in %, mean ± sd over seeds; "
    "retention = (acc − acc_SGD) / (acc_SAM − acc_SGD) of the means, same precision; "
    "time = training seconds (optimizer steps only) of the mean run; peak = the process's maximum resident memory.",
    "",
    "| precision | method | seeds | final | best epoch | retention (final) | SAM fraction | time vs SGD | time vs f32 | peak MiB | non-finite steps | failed seeds |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
]
for precision in precisions:
    sgd, sam = rows.get((precision, "sgd")), rows.get((precision, "sam"))
    for method in methods:
        row = rows.get((precision, method))
        if row is None:
            continue
        final, best = mean_sd(row["final"]), mean_sd(row["best"])
        retention = "–"
        if sgd and sam:
            gain = statistics.mean(sam["final"]) - statistics.mean(sgd["final"])
            retention = f"{(final[0] - statistics.mean(sgd['final'])) / gain:.2f}" if gain >= 1.0 else f"(SAM gain {gain:+.2f})"
        vs_sgd = f"{row['seconds'] / sgd['seconds']:.2f}×" if sgd else "–"
        f32 = rows.get(("f32", method))
        vs_f32 = f"{row['seconds'] / f32['seconds']:.2f}×" if f32 else "–"
        lines.append(
            f"| {precision} | {method} | {row['seeds']} | {final[0]:.2f} ± {final[1]:.2f} | {best[0]:.2f} ± {best[1]:.2f} | "
            f"{retention} | {row['sam_fraction']:.3f} | {vs_sgd} | {vs_f32} | {row['peak']:.0f} | {row['non_finite']} | "
            f"{', '.join(map(str, row['failed'])) or 'none'} |"
        )
# Paired bf16 − f32 differences of the final accuracy per method.
# Two-sided 90 % Student t quantiles by degrees of freedom.
T90 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812}
lines += ["", "| method | bf16 − f32, final accuracy, paired over seeds: mean [90 % t-interval] (per seed) |", "|---|---|"]
for method in methods:
    a, b = rows.get(("bf16", method)), rows.get(("f32", method))
    if a and b and len(a["final"]) == len(b["final"]):
        diffs = [x - y for x, y in zip(a["final"], b["final"])]
        m, sd = mean_sd(diffs)
        half = T90.get(len(diffs) - 1, 1.645) * sd / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
        lines.append(
            f"| {method} | {m:+.2f} pp [{m - half:+.2f}, {m + half:+.2f}] ({', '.join(f'{d:+.2f}' for d in diffs)}) |"
        )
lines += ["", "| precision | method | − sgd, final accuracy, paired over seeds: mean [90 % t-interval] |", "|---|---|---|"]
for precision in precisions:
    sgd = rows.get((precision, "sgd"))
    for method in methods[1:]:
        row = rows.get((precision, method))
        if sgd and row and len(sgd["final"]) == len(row["final"]) > 1:
            diffs = [x - y for x, y in zip(row["final"], sgd["final"])]
            m, sd = mean_sd(diffs)
            half = T90.get(len(diffs) - 1, 1.645) * sd / len(diffs) ** 0.5
            lines.append(f"| {precision} | {method} | {m:+.2f} pp [{m - half:+.2f}, {m + half:+.2f}] |")
text = "\n".join(lines) + "\n"
(out / "summary.md").write_text(text)
print(text)
