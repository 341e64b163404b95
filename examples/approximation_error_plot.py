#!/usr/bin/python3
"""Plots the CSV of examples/approximation_error.cpp: relative error against time per call, log-log,
one panel per (N, inputs), one line per method (its parameter sweep), the exact kernels' times as
vertical lines.

usage: approximation_error_plot.py RESULTS.csv OUT.png

Fails (non-zero exit, message on stderr) on a CSV without approximation rows.
"""
import csv
import sys


def die(msg):
    print(f"approximation_error_plot.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    if len(sys.argv) != 3:
        die("usage: approximation_error_plot.py RESULTS.csv OUT.png")
    try:
        with open(sys.argv[1], newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        die(f"cannot read {sys.argv[1]}: {e}")
    for r in rows:
        r["N"], r["error"], r["ms"] = int(r["N"]), float(r["error"]), float(r["ms"])
    approx = [r for r in rows if r["error"] >= 0]
    if not approx:
        die(f"{sys.argv[1]} holds no approximation rows")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        die(f"matplotlib is missing ({e}); install python3-matplotlib and run with /usr/bin/python3")

    lengths = sorted({r["N"] for r in rows})
    inputs = list(dict.fromkeys(r["inputs"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in approx))
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(len(lengths), len(inputs), figsize=(4.6 * len(inputs), 4.0 * len(lengths)),
                             squeeze=False)
    for a, n in enumerate(lengths):
        for b, name in enumerate(inputs):
            ax = axes[a][b]
            for m in methods:
                pts = [(r["ms"], r["error"], r["parameter"]) for r in approx
                       if r["N"] == n and r["inputs"] == name and r["method"] == m]
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colours[m], label=m)
                for x, y, label in (pts[0], pts[-1]):
                    ax.annotate(label.replace(" ", ""), (x, y), fontsize=6, color=colours[m],
                                xytext=(3, 3), textcoords="offset points")
            for i, r in enumerate(r for r in rows if r["error"] < 0 and r["N"] == n and r["inputs"] == name):
                ax.axvline(r["ms"], color="grey", linestyle=[":", "--", "-."][i % 3], linewidth=1,
                           label=f"{r['method']}, {r['parameter']}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{name}, N = {n}", fontsize=10)
            ax.set_xlabel("time per call (ms)")
            ax.set_ylabel("relative error")
            ax.grid(True, which="both", alpha=0.3)
            if a == 0 and b == 0:
                ax.legend(fontsize=7)
    fig.suptitle("Approximate attention: relative error against the exact kernel vs time (one head, d = 64)")
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=100)
    print(f"approximation_error_plot.py: wrote {sys.argv[2]}")


if __name__ == "__main__":
    main()
