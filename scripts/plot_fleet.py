#!/usr/bin/python3
"""CDF of per-device completion times from bench_fleet's CSV: mesh, hub-only, a BitTorrent
swarm and the Kumar-Ross minimum distribution time, one panel per image size. With
several runs per mode (--runs), the run whose last device is the median one is drawn.

    scripts/plot_fleet.py bench-results/fleet-n100.csv bench-results/fleet-n100.png "N = 100"
"""
import csv
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src, out, title = sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""
runs = defaultdict(lambda: defaultdict(list))
t_min = {}
with open(src) as f:
    for row in csv.DictReader(f):
        size = int(row["image_mib"])
        runs[(size, row["mode"])][row.get("run", "0")].append(float(row["completion_s"]))
        t_min[size] = float(row["t_min_s"])


def median_run(by_run):
    ordered = sorted(by_run.values(), key=max)
    return ordered[(len(ordered) - 1) // 2]


times = {key: median_run(by_run) for key, by_run in runs.items()}

sizes = sorted(t_min)
fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4), squeeze=False)
for ax, size in zip(axes[0], sizes):
    for mode, style in (("mesh", "-"), ("hub-only", "--"), ("bittorrent", "-.")):
        ts = sorted(times.get((size, mode), []))
        if ts:
            ys = [(i + 1) / len(ts) for i in range(len(ts))]
            ax.step(ts, ys, style, where="post", label=f"{mode} (max {ts[-1]:.1f} s)")
    ax.axvline(t_min[size], color="k", linestyle=":", label=f"T_min {t_min[size]:.1f} s")
    ax.set_xscale("log")
    ax.set_xlabel("seconds from announcement to all chunks verified")
    ax.set_ylabel("fraction of devices")
    ax.set_title(f"{title}, {size} MiB image")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
fig.tight_layout()
fig.savefig(out, dpi=110)
