#!/usr/bin/python3
"""Plot and tabulate the quality run of train_charlm (examples/charlm/quality_run.sh).

    /usr/bin/python3 examples/charlm/plot_quality.py OUT_DIR PNG MARKDOWN [TITLE]

OUT_DIR holds runs.tsv (label, kind, context, batch, steps, csv, load_before) and the CSV logs
of train_charlm (step, train_loss, val_bpc, seconds, val_chars). The curves are the periodic
evaluations on a fixed subset of the validation split; the table's final value is the last row,
which scores the whole split. seconds counts training only (evaluations excluded).
"""
import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {"softmax": "black", "polynomial": "tab:blue", "polysketch": "tab:orange", "learned": "tab:green"}
LABELS = {"softmax": "softmax", "polynomial": "polynomial p=4", "polysketch": "polysketch r=32, local_exact",
          "learned": "learned r=32, local_exact"}


def read_runs(out_dir):
    with open(os.path.join(out_dir, "runs.tsv")) as f:
        runs = list(csv.DictReader(f, delimiter="\t"))
    for r in runs:
        with open(os.path.join(out_dir, r["csv"])) as f:
            rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
        if len(rows) < 2:
            raise SystemExit(f"plot_quality: {r['csv']} has no evaluations")
        for k in ("context", "batch", "steps"):
            r[k] = int(r[k])
        subset = rows[0]["val_chars"]
        r["curve"] = [row for row in rows[:-1] if row["val_chars"] == subset]
        r["final"] = rows[-1]
        tokens = r["steps"] * r["batch"] * r["context"]
        r["tokens_per_s"] = tokens / r["final"]["seconds"]
        r["ms_per_step"] = 1000 * r["final"]["seconds"] / r["steps"]
    return runs


def plot(runs, png, title):
    contexts = sorted({r["context"] for r in runs})
    fig, axes = plt.subplots(len(contexts), 2, figsize=(12, 4.2 * len(contexts)), squeeze=False)
    for row, ctx in enumerate(contexts):
        for r in (r for r in runs if r["context"] == ctx):
            c, name = COLOURS.get(r["kind"], None), LABELS.get(r["kind"], r["kind"])
            steps = [p["step"] for p in r["curve"]]
            secs = [p["seconds"] for p in r["curve"]]
            bpc = [p["val_bpc"] for p in r["curve"]]
            axes[row][0].plot(steps, bpc, color=c, label=name)
            axes[row][1].plot(secs, bpc, color=c, label=name)
            axes[row][0].plot([r["final"]["step"]], [r["final"]["val_bpc"]], "o", color=c)
            axes[row][1].plot([r["final"]["seconds"]], [r["final"]["val_bpc"]], "o", color=c)
        for col, xlabel in enumerate(("training step", "training seconds (evaluations excluded)")):
            ax = axes[row][col]
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation bits/char")
            ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
            ax.grid(alpha=0.3)
            ax.set_title(f"context {ctx}: " + ("against steps" if col == 0 else "against wall-clock"))
        axes[row][0].legend()
    fig.suptitle(title or "train_charlm on the King James Bible (dots: final value on the whole validation split)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def table(runs):
    lines = ["| context | attention | steps | final validation bits/char | vs softmax | tokens/s | ms/step |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for ctx in sorted({r["context"] for r in runs}):
        group = [r for r in runs if r["context"] == ctx]
        base = next((r for r in group if r["kind"] == "softmax"), None)
        for r in group:
            bpc = r["final"]["val_bpc"]
            rel = "" if base is None or r is base else f"{100 * (bpc / base['final']['val_bpc'] - 1):+.1f} %"
            lines.append(f"| {ctx} | {LABELS.get(r['kind'], r['kind'])} | {r['steps']} | {bpc:.3f} | {rel} | "
                         f"{r['tokens_per_s']:.0f} | {r['ms_per_step']:.0f} |")
    loads = ", ".join(f"{r['label']} {r['load_before']}" for r in runs)
    lines.append("")
    lines.append(f"Load average before each run: {loads}.")
    return "\n".join(lines) + "\n"


def main():
    if len(sys.argv) not in (4, 5):
        raise SystemExit(__doc__)
    out_dir, png, md = sys.argv[1:4]
    runs = read_runs(out_dir)
    plot(runs, png, sys.argv[4] if len(sys.argv) == 5 else None)
    text = table(runs)
    with open(md, "w") as f:
        f.write(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
