#!/usr/bin/python3
"""Plot and tabulate the quality run of train_charlm (examples/charlm/quality_run.sh).

    /usr/bin/python3 examples/charlm/plot_quality.py OUT_DIR PNG MARKDOWN [TITLE]

OUT_DIR holds runs.tsv (label, kind, context, batch, steps, seed, csv), the CSV logs of
train_charlm (step, train_loss, val_bpc, seconds, val_chars) and timing.tsv (kind, context,
batch, threads, ms_per_step, load_before) from the quiet timing pass. A curve is the periodic
evaluations on a fixed subset of the validation split, then the last row, which scores the
whole split at the last step; a kind's curve is the mean over its seeds. The wall-clock axis
and the times to quality are steps x the timed ms/step, so they do not depend on the load the
curves were trained under. A time to quality compares subset evaluations only (the whole split
is scored at the end alone), interpolating the mean curve linearly between them.
"""
import csv
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {"softmax": "black", "polynomial": "tab:blue", "polysketch": "tab:orange", "learned": "tab:green"}
LABELS = {"softmax": "softmax", "polynomial": "polynomial p=4", "polysketch": "polysketch r=32, local_exact",
          "learned": "learned r=32, local_exact"}
ORDER = ["softmax", "polynomial", "polysketch", "learned"]


def read_tsv(path):
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def read_curve(path):
    with open(path) as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    if len(rows) < 2:
        return None  # (a run that has just started)
    subset = rows[0]["val_chars"]
    return [(r["step"], r["val_bpc"]) for r in rows[:-1] if r["val_chars"] == subset] + \
        [(rows[-1]["step"], rows[-1]["val_bpc"])]


def read_groups(out_dir):
    """(context, kind) -> {batch, steps, seeds, curves, mean, final, ms_per_step, threads}"""
    groups = defaultdict(lambda: {"seeds": [], "curves": []})
    for r in read_tsv(os.path.join(out_dir, "runs.tsv")):
        path = os.path.join(out_dir, r["csv"])
        if not os.path.exists(path):
            print(f"plot_quality: {r['csv']} not run yet; left out", file=sys.stderr)
            continue
        curve = read_curve(path)
        if curve is None or curve[-1][0] != int(r["steps"]):
            at = 0 if curve is None else curve[-1][0]
            print(f"plot_quality: {r['csv']} stops at step {at:.0f} of {r['steps']}; left out", file=sys.stderr)
            continue
        g = groups[(int(r["context"]), r["kind"])]
        g["batch"], g["steps"] = int(r["batch"]), int(r["steps"])
        g["seeds"].append(int(r["seed"]))
        g["curves"].append(curve)
    timing = {(int(t["context"]), t["kind"]): t for t in read_tsv(os.path.join(out_dir, "timing.tsv"))}
    for key, g in groups.items():
        steps = [s for s, _ in g["curves"][0]]
        if any([s for s, _ in c] != steps for c in g["curves"]):
            raise SystemExit(f"plot_quality: the seeds of {key} were evaluated at different steps")
        g["mean"] = [(s, sum(c[i][1] for c in g["curves"]) / len(g["curves"])) for i, s in enumerate(steps)]
        g["final"] = g["mean"][-1][1]
        t = timing.get(key)
        g["ms_per_step"] = float(t["ms_per_step"]) if t else None
        g["threads"] = t["threads"] if t else None
        g["load"] = t["load_before"] if t else None
    return groups


def first_step_at(curve, target):
    """The first step at which the curve reaches target (linear between evaluations), or None."""
    prev = None
    for s, b in curve:
        if b <= target:
            if prev is None or prev[1] == b:
                return s
            return prev[0] + (prev[1] - target) / (prev[1] - b) * (s - prev[0])
        prev = (s, b)
    return None


def plot(groups, png, title):
    contexts = sorted({c for c, _ in groups})
    fig, axes = plt.subplots(len(contexts), 2, figsize=(12, 4.2 * len(contexts)), squeeze=False)
    for row, ctx in enumerate(contexts):
        for kind in ORDER:
            g = groups.get((ctx, kind))
            if g is None:
                continue
            c = COLOURS[kind]
            ms = g["ms_per_step"]
            for col in (0, 1):
                if col == 1 and ms is None:
                    continue
                x = (lambda s: s) if col == 0 else (lambda s, ms=ms: s * ms / 1000)
                ax = axes[row][col]
                for curve in g["curves"]:
                    ax.plot([x(s) for s, _ in curve], [b for _, b in curve], color=c, lw=0.6, alpha=0.45)
                ax.plot([x(s) for s, _ in g["mean"]], [b for _, b in g["mean"]], color=c, lw=1.6,
                        label=f"{LABELS[kind]} ({len(g['seeds'])} seed{'s' if len(g['seeds']) > 1 else ''})")
                ax.plot([x(g["mean"][-1][0])], [g["final"]], "o", color=c)
        for col, xlabel in enumerate(("training step", "seconds: steps x quiet ms/step (evaluations excluded)")):
            ax = axes[row][col]
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation bits/char")
            ax.set_ylim(top=min(3.2, ax.get_ylim()[1]))
            ax.grid(alpha=0.3)
            ax.set_title(f"context {ctx}: " + ("against steps" if col == 0 else "against wall-clock"))
        axes[row][0].legend()
    fig.suptitle(title or "train_charlm on the King James Bible, with RoPE (thin: each seed; thick: mean; "
                 "dot: whole validation split)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def fmt_time(steps, ms):
    if steps is None:
        return "not reached"
    return f"step {steps:.0f}" + ("" if ms is None else f", {steps * ms / 1000:.0f} s")


def table(groups):
    lines = ["| context | attention | steps | seeds | final bits/char: mean (each seed) | vs softmax | "
             "ms/step | tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    contexts = sorted({c for c, _ in groups})
    for ctx in contexts:
        base = groups.get((ctx, "softmax"))
        for kind in ORDER:
            g = groups.get((ctx, kind))
            if g is None:
                continue
            each = " / ".join(f"{c[-1][1]:.3f}" for c in g["curves"])
            rel = "" if base is None or kind == "softmax" else f"{100 * (g['final'] / base['final'] - 1):+.1f} %"
            ms = g["ms_per_step"]
            speed = ("–", "–") if ms is None else (f"{ms:.0f}", f"{g['batch'] * ctx * 1000 / ms:.0f}")
            lines.append(f"| {ctx} | {LABELS[kind]} | {g['steps']} | {len(g['seeds'])} | {g['final']:.3f} ({each}) | "
                         f"{rel} | {speed[0]} | {speed[1]} |")
    lines += ["", "Time to quality, from the mean curves on the validation subset (the periodic evaluations; "
              "the whole split is scored only at the end): when each kind reaches softmax's last subset value, "
              "and when softmax reaches each kind's last subset value (the best the kind reaches).", "",
              "| context | attention | reaches softmax's last | softmax reaches this kind's last | "
              "reaches 2.2 bits/char |", "| --- | --- | --- | --- | --- |"]
    for ctx in contexts:
        base = groups.get((ctx, "softmax"))
        if base is None:
            continue
        for kind in ORDER:
            g = groups.get((ctx, kind))
            if g is None:
                continue
            ms = g["ms_per_step"]
            mine, theirs = g["mean"][:-1], base["mean"][:-1]  # the subset evaluations
            to_base = fmt_time(first_step_at(mine, theirs[-1][1]), ms)
            base_to = fmt_time(first_step_at(theirs, mine[-1][1]), base["ms_per_step"])
            to_22 = fmt_time(first_step_at(mine, 2.2), ms)
            lines.append(f"| {ctx} | {LABELS[kind]} | {to_base} | {base_to} | {to_22} |")
    timed = [g for g in groups.values() if g["ms_per_step"] is not None]
    if timed:
        threads = sorted({g["threads"] for g in timed})
        loads = ", ".join(f"{k} at {c}: {g['load']}" for (c, k), g in sorted(groups.items()) if g["load"] is not None)
        lines += ["", f"ms/step: training time of steps 20–60 with {'/'.join(threads)} threads, one run at a time "
                  f"(load average before each: {loads})."]
    return "\n".join(lines) + "\n"


def main():
    if len(sys.argv) not in (4, 5):
        raise SystemExit(__doc__)
    out_dir, png, md = sys.argv[1:4]
    groups = read_groups(out_dir)
    if not groups:
        print("plot_quality: no finished run yet; no plot or table written", file=sys.stderr)
        return
    plot(groups, png, sys.argv[4] if len(sys.argv) == 5 else None)
    text = table(groups)
    with open(md, "w") as f:
        f.write(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
