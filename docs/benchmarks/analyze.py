#!/usr/bin/env python3
"""Numbers for the hand-written reading of docs/benchmarks.md, from the benchmark's raw results.

Usage: python3 docs/benchmarks/analyze.py [docs/benchmarks/results.json]

Prints, per setting: each gate's trace summarized per quarter of the run (SAM fraction, target,
mean PSF ratio, vSAM's m_r / m_v and quota, vSAM-trend's level), the epoch where SGD starts to
memorize the flipped labels, per-seed final accuracies and training times, and each method's
retention of SAM's final-epoch gain over SGD with a 95 % Fieller interval over the paired seeds.
"""
import json
import math
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


T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 10: 2.262}  # Student t, n - 1 d.o.f.


def retentions(group, methods):
    """(acc - acc_SGD) / (acc_SAM - acc_SGD) at the final epoch, paired by seed, with a 95 %
    Fieller interval for the ratio of the two paired means."""
    finals = {
        m: [r["epochs"][-1]["test_accuracy"] for r in sorted((r for r in group if r["variant"] == m), key=lambda r: r["seed"])]
        for m in methods
    }
    if "sgd" not in finals or "sam" not in finals:
        return
    n = len(finals["sgd"])
    if n not in T95:
        return
    t = T95[n]
    gain = [s - g for s, g in zip(finals["sam"], finals["sgd"])]
    print(f"retention of SAM's final-epoch gain, 95 % Fieller interval ({n} paired seeds):")
    for m in methods:
        if m in ("sgd", "sam"):
            continue
        d = [v - g for v, g in zip(finals[m], finals["sgd"])]
        ma, mb = statistics.mean(d), statistics.mean(gain)
        saa, sbb = statistics.variance(d) / n, statistics.variance(gain) / n
        sab = sum((x - ma) * (y - mb) for x, y in zip(d, gain)) / (n - 1) / n
        a, b, c = mb * mb - t * t * sbb, -2 * (ma * mb - t * t * sab), ma * ma - t * t * saa
        disc = b * b - 4 * a * c
        bounds = f"[{(-b - math.sqrt(disc)) / (2 * a):.2f}, {(-b + math.sqrt(disc)) / (2 * a):.2f}]" if a > 0 and disc > 0 else "unbounded"
        print(f"  {m:18s} {ma / mb:5.2f}  {bounds}")


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
        retentions(group, methods)
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
