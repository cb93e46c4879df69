#!/usr/bin/env python3
"""Numbers for the hand-written reading of docs/benchmarks.md, from the benchmark's raw results.

Usage: python3 docs/benchmarks/analyze.py [docs/benchmarks/results.json]

Prints, per setting: each gate's trace summarized per quarter of the run (SAM fraction, target,
mean PSF ratio, vSAM's m_r / m_v and quota, vSAM-trend's level), the epoch where SGD starts to
memorize the flipped labels, and per-seed final accuracies and training times.
"""
import json
import statistics
import sys
from collections import defaultdict

path = sys.argv[1] if len(sys.argv) > 1 else "docs/benchmarks/results.json"
runs = json.load(open(path))


def mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else float("nan")


def per_epoch(group, methods, key, what):
    print(f"{what} per epoch (%, mean of seeds), every 3rd epoch:")
    for m in methods:
        rs = [r for r in group if r["variant"] == m]
        epochs = len(rs[0]["epochs"])
        row = [mean([r["epochs"][e][key] for r in rs]) * 100 for e in range(epochs)]
        print(f"  {m:18s} " + " ".join(f"{v:5.1f}" for v in row[::3]) + f"  (last {row[-1]:.1f})")


by_setting = defaultdict(list)
for run in runs:
    by_setting[run["noise"]].append(run)

for noise in sorted(by_setting, reverse=True):
    group = by_setting[noise]
    print(f"== label noise {noise:.2f}")
    methods = list(dict.fromkeys(r["variant"] for r in group))
    print("per seed: final test accuracy (%) / training seconds")
    for m in methods:
        rs = sorted((r for r in group if r["variant"] == m), key=lambda r: r["seed"])
        cells = ", ".join(f"s{r['seed']} {100 * r['epochs'][-1]['test_accuracy']:.2f}/{r['train_seconds']:.1f}" for r in rs)
        print(f"  {m:18s} {cells}")
    if noise > 0:
        per_epoch(group, methods, "memorized", "memorized flipped labels")
        per_epoch(group, methods, "test_accuracy", "test accuracy")
    for m in methods:
        rs = [r for r in group if r["variant"] == m and r["windows"]]
        if not rs:
            continue
        print(f"gate trace of {m}, per quarter of the run (mean of seeds):")
        print("   quarter  SAM-frac  target  psf_ratio   m_r      m_v     quota  level")
        n = min(len(r["windows"]) for r in rs)
        for q in range(4):
            lo, hi = q * n // 4, (q + 1) * n // 4
            ws = [w for r in rs for w in r["windows"][lo:hi]]
            frac = mean([w["sam_steps"] / 50 for w in ws])
            target = mean([w["target_fraction"] for w in ws])
            ratio = mean([w["psf_ratio"] for w in ws])
            mr = mean([w["changes"][0] if w["changes"] else None for w in ws])
            mv = mean([w["changes"][1] if w["changes"] else None for w in ws])
            quota = mean([w["quota"] for w in ws])
            level = mean([w["level"] for w in ws])
            print(f"   {q + 1}        {frac:7.3f}  {target:6.3f}  {ratio:8.3f}  {mr:7.4f}  {mv:7.4f}  {quota:6.3f}  {level:6.3f}")
        finals = [r["windows"][-1] for r in rs]
        print(f"   final quota per seed: {[w['quota'] for w in finals]}; final target: {[round(w['target_fraction'], 3) for w in finals]}")
