"""The table of the train_charlm ablation (examples/charlm/ablation.sh) from its CSV logs.

    /usr/bin/python3 examples/charlm/ablation_table.py OUT_DIR docs/charlm_ablation.md

Per row (a label, runs LABEL_sSEED.csv): validation bits/char at each evaluation, the mean over
the seeds, and at the last step the seeds' values; the first evaluation below 3.0 bits/char (the
bigram plateau is about 3.3) per seed; for the exact kinds, from LABEL_sSEED.attn.csv, the mean
weight that the most previous-character-like head puts on the previous position at the last step.
"""
import csv
import glob
import os
import re
import statistics
import sys

ROWS = [  # label, what changes against the model of docs/design.md §9.1 (no RoPE)
    ("soft", "softmax"),
    ("poly", "polynomial p = 4"),
    ("soft_rope", "softmax + RoPE"),
    ("poly_rope", "polynomial + RoPE"),
    ("ps_rope", "polysketch r = 32 local_exact + RoPE"),
    ("learned_rope", "learned r = 32 local_exact + RoPE"),
    ("poly_lr2e-3", "polynomial, lr 2e-3"),
    ("poly_gain", "polynomial, learned per-head gain on q"),
    ("poly_p8", "polynomial, degree 8"),
    ("poly_nb0", "polynomial, normaliser bias 0"),
    ("poly_qklr3", "polynomial, 3x lr on the q/k path"),
    ("poly_b2", "polynomial, Adam beta2 0.99"),
]


def read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def main(out_dir, md_path):
    runs = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "*_s[0-9]*.csv"))):
        m = re.match(r"(.+)_s(\d+)\.csv$", os.path.basename(path))
        if not m:
            continue
        rows = read(path)
        if len(rows) < 2:
            continue
        runs.setdefault(m.group(1), []).append((int(m.group(2)), rows, path[:-4] + ".attn.csv"))
    steps = sorted({int(r["step"]) for rs in runs.values() for _, rows, _ in rs for r in rows if int(r["step"]) > 0})
    last = steps[-1] if steps else 0
    known = [label for label, _ in ROWS]
    labels = [l for l in known if l in runs] + sorted(l for l in runs if l not in known)
    what = dict(ROWS)
    head = "| row | seeds | " + " | ".join(f"{s}" for s in steps) + f" | {last}: per seed | first < 3.0 | prev weight |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label in labels:
        rs = sorted(runs[label])
        cells = []
        for s in steps:
            vals = [float(r["val_bpc"]) for _, rows, _ in rs for r in rows if int(r["step"]) == s]
            cells.append(f"{statistics.mean(vals):.3f}" if len(vals) == len(rs) else "")
        finals = [next((float(r["val_bpc"]) for r in rows if int(r["step"]) == last), float("nan")) for _, rows, _ in rs]
        escape = [next((r["step"] for r in rows if int(r["step"]) > 0 and float(r["val_bpc"]) < 3.0), "–")
                  for _, rows, _ in rs]
        prev = []
        for _, _, attn in rs:
            if os.path.exists(attn):
                a = [r for r in read(attn) if int(r["step"]) == last]
                if a:
                    prev.append(max(float(r["prev"]) for r in a))
        lines.append(f"| {what.get(label, label)} | {len(rs)} | " + " | ".join(cells) + " | " +
                     " / ".join(f"{x:.3f}" for x in finals) + " | " + " / ".join(escape) + " | " +
                     (f"{statistics.mean(prev):.2f}" if prev else "") + " |")
    text = ("Validation bits/char (65 536 characters; the last column of values the whole split) of "
            f"train_charlm, {last} steps, one thread a run, means over the seeds; 'prev weight' is the "
            "largest over the heads of a head's mean weight on the previous character at the last "
            "step (exact kinds). Made by examples/charlm/ablation.sh.\n\n" + "\n".join(lines) + "\n")
    with open(md_path, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
