#!/usr/bin/python3
"""Turns polyattn_bench's JSON output into a markdown table and a PNG plot.

usage: report.py RESULTS.json OUTDIR

Writes OUTDIR/report.md and OUTDIR/report.png. Fails loudly (non-zero exit, message on
stderr) when the JSON lacks what a table or plot needs, rather than drawing an empty picture.
"""
import json
import math
import os
import sys

KERNELS = [  # (label, benchmark name, extra args that select the variant)
    ("softmax_attention", "softmax_attention", {}),
    ("flash_attention", "flash_attention", {}),
    ("polynomial_attention (p=4)", "polynomial_attention", {}),
    ("polysketch r=32", "polysketch_attention", {"r": 32, "local_exact": 0}),
    ("polysketch r=32 local_exact", "polysketch_attention", {"r": 32, "local_exact": 1}),
    ("linear_attention m=528", "linear_attention", {"m": 528}),
    ("flash window=256", "flash_attention_window", {"window": 256}),
    ("flash window=512", "flash_attention_window", {"window": 512}),
    ("flash window=4096", "flash_attention_window", {"window": 4096}),
    ("performer m=256", "performer_attention", {"m": 256}),
]
# non-causal, d = 64: Linformer (kp projected keys) against flash (label, benchmark name, extra args)
NON_CAUSAL = [
    ("flash_attention", "flash_attention", {}),
    ("linformer kp=256", "linformer_attention", {"kp": 256}),
]
EXACT = ["softmax_attention", "flash_attention", "polynomial_attention"]
# backward passes: GFLOP/s counted as 10·N²·d per backward (14·N²·d forward + backward), half causal
BACKWARD = ["flash_attention_backward", "polynomial_attention_backward",
            "flash_attention_fwd_bwd", "polynomial_attention_fwd_bwd"]
# a training step (forward with stats + backward), causal, d = 64: (label, benchmark name, extra args)
TRAINING = [
    ("flash_attention", "flash_attention_fwd_bwd", {}),
    ("polynomial_attention (p=4)", "polynomial_attention_fwd_bwd", {}),
    ("polysketch r=32 local_exact", "polysketch_attention_fwd_bwd", {"r": 32, "local_exact": 1}),
    ("sketched r=32 local_exact", "sketched_attention_fwd_bwd", {"r": 32, "local_exact": 1}),
]


def die(msg):
    print(f"report.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


def parse_name(name):
    """'flash_attention/N:1024/d:64/causal:1/threads:2/min_time:0.100/real_time' -> (kernel, args)."""
    parts = name.split("/")
    args = {}
    for p in parts[1:]:
        if ":" in p:
            k, v = p.split(":", 1)
            try:
                args[k] = int(v)
            except ValueError:
                pass
    return parts[0], args


def to_ms(b):
    scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[b["time_unit"]]
    return b["real_time"] * scale


def load(path):
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        die(f"cannot read {path}: {e}")
    # per run: the median over repetitions when there were several, else the single run
    chosen = {}
    for b in data.get("benchmarks", []):
        if "error_occurred" in b:
            continue
        key = b.get("run_name", b["name"])
        if b.get("run_type") == "aggregate":
            if b.get("aggregate_name") == "median":
                chosen[key] = b
        elif key not in chosen:
            chosen[key] = b
    rows = []
    for key, b in chosen.items():
        kernel, args = parse_name(key)
        rows.append({"kernel": kernel, "args": args, "ms": to_ms(b), "bench": b})
    if not rows:
        die(f"{path} holds no benchmark results")
    return data.get("context", {}), rows


def select(rows, kernel, want):
    out = {}
    for r in rows:
        if r["kernel"] != kernel:
            continue
        if all(r["args"].get(k) == v for k, v in want.items()):
            out[r["args"]["N"]] = r
    return out


def select_by(rows, kernel, key):
    return {r["args"][key]: r for r in rows if r["kernel"] == kernel and key in r["args"]}


def fmt_us(row):
    return f"{row['ms'] * 1e3:.3g}" if row else "–"


def fmt_ms(ms):
    if ms is None:
        return "–"
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def crossover(flash, sketch):
    """Smallest N from which polysketch stays faster than flash (None if never)."""
    ns = sorted(set(flash) & set(sketch))
    cross = None
    for n in reversed(ns):
        if sketch[n]["ms"] < flash[n]["ms"]:
            cross = n
        else:
            break
    return cross


def machine_warning(rows, threads):
    """A warning when the machine was not quiet: the FMA peak before and after the sweep
    disagreeing by more than 10 %, or a 1-minute load average above the threads in use."""
    state = {r["args"]["when"]: r["bench"] for r in rows if r["kernel"] == "machine" and "when" in r["args"]}
    if 0 not in state or 1 not in state:
        return []
    before, after = state[0], state[1]
    p0, p1 = before.get("fma_GFLOP/s_1thread", 0), after.get("fma_GFLOP/s_1thread", 0)
    l0, l1 = before.get("load1", 0), after.get("load1", 0)
    lines = [f"Machine: one core's fp32 FMA peak {p0:.0f} GFLOP/s before the sweep, {p1:.0f} after; "
             f"1-minute load average {l0:.2f} before, {l1:.2f} after ({threads} threads in use).", ""]
    reasons = []
    if p0 > 0 and abs(p1 - p0) > 0.1 * p0:
        reasons.append(f"the FMA peak changed by {100 * (p1 - p0) / p0:+.0f} % during the sweep")
    if max(l0, l1) > threads:
        reasons.append(f"the load average ({max(l0, l1):.2f}) exceeded the {threads} threads in use")
    if reasons:
        lines = [f"> **Warning: the machine was not quiet** ({'; '.join(reasons)}): other work shared the cores, "
                 "and the times below may be slower than this machine can do.", ""] + lines
    return lines


def contention_table(rows, threads):
    """Quiet and contended medians side by side (rows named contended_<kernel>)."""
    out = []
    for r in sorted((r for r in rows if r["kernel"].startswith("contended_")),
                    key=lambda r: (r["kernel"], r["args"]["N"])):
        kernel = r["kernel"][len("contended_"):]
        want = {k: v for k, v in r["args"].items() if k != "threads"}
        quiet = {r2["args"]["threads"]: r2 for r2 in rows
                 if r2["kernel"] == kernel and all(r2["args"].get(k) == v for k, v in want.items())}
        one, many = quiet.get(1), quiet.get(r["args"]["threads"])
        ratio = f"{r['ms'] / one['ms']:.2f}" if one else "–"
        paired, paired_ratio = r["bench"].get("paired_1thread_ms"), r["bench"].get("busy_over_paired_1thread")
        out.append(f"| {kernel} | {r['args']['N']} | {fmt_ms(many['ms']) if many else '–'} | "
                   f"{fmt_ms(one['ms']) if one else '–'} | {fmt_ms(r['ms'])} | {ratio} | "
                   f"{fmt_ms(paired) if paired else '–'} | {f'{paired_ratio:.2f}' if paired_ratio else '–'} |")
    if not out:
        return []
    return [f"## Under contention: one core held by a busy process, {threads} threads, causal, d = 64 (ms)", "",
            "The benchmark starts the busy process before each contended row and stops it after; "
            "target: contended ≤ 1.25 × the quiet 1-thread time. The quiet rows ran earlier in the sweep; "
            "the paired columns come from the contended row itself, each timed call followed by the same "
            "call on 1 thread (the busy process still running), so their ratio (the median of the "
            "per-pair ratios) compares calls a moment apart, whatever the machine's neighbours did in between.", "",
            f"| kernel | N | quiet, {threads} threads | quiet, 1 thread | one core busy, {threads} threads | "
            "busy / quiet 1 thread | paired 1 thread, busy | busy / paired 1 thread |",
            "|---|---|---|---|---|---|---|---|"] + out + [""]


PRECISION_CALLS = [
    ("precision_flash", "flash forward", ("N", "H", "causal")),
    ("precision_flash_fwd_bwd", "flash forward + backward", ("N", "H", "causal")),
    ("precision_polysketch", "polysketch r=32 local_exact causal", ("N", "backward")),
    ("precision_decode", "decode step (flash, Nq = 1)", ("context",)),
]
DTYPES = {0: "fp32", 1: "bf16", 2: "f16"}


def precision_table(rows):
    """fp32, bf16 and f16 storage side by side (rows named precision_*, dtype 0/1/2), with the
    bf16 dot-product peak beside the fp32 FMA peak."""
    prec = [r for r in rows if r["kernel"].startswith("precision_")]
    if not prec:
        return []
    out = ["## Precision: fp32, bf16 and f16 storage, same run", ""]
    dot = [r["bench"] for r in rows if r["kernel"] == "peak" and "fp32_GFLOP/s" in r["bench"]]
    if dot and dot[0].get("GFLOP/s", 0) > 0:
        ratio = dot[0]["GFLOP/s"] / dot[0]["fp32_GFLOP/s"]
        out.append(f"vdpbf16ps peak (one core): {dot[0]['GFLOP/s']:.0f} GFLOP/s, {ratio:.2f}× the fp32 FMA peak "
                   f"of {dot[0]['fp32_GFLOP/s']:.0f}.")
    else:
        out.append("No AVX512-BF16 in this build: bf16 and f16 tiles are widened to fp32 (docs/design.md §10).")
    out.append("% of peak is of the fp32 FMA peak (bf16 may exceed 100 %); decode rows give GB/s of K and V read.")
    out.append("")
    out.append("| call | shape | threads | fp32 ms | bf16 ms | fp32 / bf16 | f16 ms | fp32 / f16 | bf16 % of peak |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for kernel, label, keys in PRECISION_CALLS:
        groups = {}
        for r in prec:
            if r["kernel"] == kernel:
                key = tuple(r["args"].get(k) for k in keys) + (r["args"].get("threads"),)
                groups.setdefault(key, {})[r["args"].get("dtype")] = r
        for key in sorted(groups):
            g = groups[key]
            shape = ", ".join(f"{k} = {v}" for k, v in zip(keys, key))
            base = g.get(0)
            cells = [label, shape, str(key[-1]), fmt_ms(base["ms"]) if base else "–"]
            for dt in (1, 2):
                r = g.get(dt)
                cells.append(fmt_ms(r["ms"]) if r else "–")
                cells.append(f"{base['ms'] / r['ms']:.2f}×" if r and base else "–")
            b16 = g.get(1, {}).get("bench", {})
            cells.append(f"{b16['pct_peak']:.0f} %" if "pct_peak" in b16 else
                         (f"{b16['GB/s']:.1f} GB/s" if "GB/s" in b16 else "–"))
            out.append("| " + " | ".join(cells) + " |")
    out.append("")
    return out


def serving_table(rows):
    """Decode steps (rows named serving_decode/<dtype>) against the read roofs measured in the
    same run (roof/read_bandwidth rows): GB/s of K and V, % of a warm read of as many bytes, % of
    a read from memory, the speed-up from 1 to 2 threads and the cost of a GQA step against 1:1."""
    dec = [r for r in rows if r["kernel"] == "serving_decode"]
    roofs = [r for r in rows if r["bench"]["name"].startswith("roof/read_bandwidth")]
    if not dec and not roofs:
        return []
    out = ["## Serving: decode steps against the read bandwidth, same run", ""]
    if roofs:
        cells = [f"{r['bench']['buffer_MiB']:.0f} MiB on {r['args'].get('threads')} thread(s): {r['bench']['GB/s']:.1f} GB/s"
                 for r in sorted(roofs, key=lambda r: (r["args"].get("threads", 0), r["bench"]["buffer_MiB"]))]
        out.append("Streaming read (warm, best pass): " + "; ".join(cells) + ". The largest buffer is beyond the "
                   "last-level cache (the memory roof); a decode step is quoted against a read of as many bytes as "
                   "its K and V (the warm roof), because a benchmark repeats the step over the same cache.")
        out.append("")
    if not dec:
        return out
    keys = ("context", "batch", "heads", "kv_heads", "threads")
    index = {(r["bench"]["name"].split("/")[1],) + tuple(r["args"].get(k) for k in keys): r for r in dec}
    out.append("| dtype | context | B | H | Hk | threads | µs | GB/s of K, V | % of warm roof | % of memory roof "
               "| 1 → 2 threads | step / 1:1 step |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key in sorted(index):
        r = index[key]
        dtype, ctx, b, h, hk, t = key
        one = index.get((dtype, ctx, b, h, hk, 1)) if t == 2 else None
        flat = index.get((dtype, ctx, 1, 1, 1, t)) if (b, h, hk) != (1, 1, 1) and b == 1 else None
        bm = r["bench"]
        cells = [dtype, str(ctx), str(b), str(h), str(hk), str(t), f"{r['ms'] * 1e3:.4g}",
                 f"{bm.get('GB/s', 0):.1f}", f"{bm.get('pct_read_roof', 0):.0f} %", f"{bm.get('pct_memory_roof', 0):.0f} %",
                 f"{one['ms'] / r['ms']:.2f}×" if one else "–", f"{r['ms'] / flat['ms']:.2f}×" if flat else "–"]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    return out


def serving_extras(rows):
    """The other serving rows, as ratios from the same run: score modifiers against plain flash,
    cache decode steps against a copy of their state and against flash decode, packed varlen
    batches against per-sequence calls and padding, paged decode against contiguous decode."""
    by = {}
    for r in rows:
        by.setdefault(r["kernel"], []).append(r)
    out = []

    def find(name, **want):
        for r in by.get(name, []):
            if all(r["args"].get(k) == v for k, v in want.items()):
                return r
        return None

    mods = by.get("modifiers_flash", []) + by.get("modifiers_flash_fwd_bwd", [])
    if mods:
        out += ["### Score modifiers: flash with one modifier / plain flash", "",
                "| call | N | H | causal | threads | plain ms | sinks | softcap | ALiBi |", "|---|---|---|---|---|---|---|---|---|"]
        keys = sorted({(r["kernel"], r["args"].get("N"), r["args"].get("H"), r["args"].get("causal"), r["args"].get("threads"))
                       for r in mods})
        for kernel, n, h, c, t in keys:
            base = find(kernel, N=n, H=h, causal=c, threads=t, modifier=0)
            cells = [kernel, str(n), str(h), str(c), str(t), fmt_ms(base["ms"]) if base else "–"]
            for m in (1, 2, 3):
                r = find(kernel, N=n, H=h, causal=c, threads=t, modifier=m)
                cells.append(f"{r['ms'] / base['ms']:.2f}×" if r and base else "–")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    steps = [k for k in by if k.startswith("cache_step_") and k not in ("cache_step_state_copy", "cache_step_flash_decode")]
    if steps:
        out += ["### Cache decode steps (µs) against one read + write of their state", "",
                "| cache | B·H | threads | µs | / state copy |", "|---|---|---|---|---|"]
        for k in sorted(steps):
            for r in sorted(by[k], key=lambda r: (r["args"].get("BH", 0), r["args"].get("threads", 0))):
                copy = find("cache_step_state_copy", BH=r["args"].get("BH"))
                out.append(f"| {k[len('cache_step_'):]} | {r['args'].get('BH')} | {r['args'].get('threads')} | "
                           f"{r['ms'] * 1e3:.3g} | " + (f"{r['ms'] / copy['ms']:.2f}×" if copy else "–") + " |")
        one = find("cache_step_polysketch", BH=1, threads=1)
        for ctx in (32768, 131072):
            fl = find("cache_step_flash_decode", context=ctx, threads=1)
            if one and fl:
                out.append(f"\nflash decode over {ctx} keys / polysketch_cache step (1 thread): {fl['ms'] / one['ms']:.0f}×")
        out.append("")
    if "varlen" in by:
        out += ["### Packed variable-length batches (64 causal sequences, H = 4, d = 64)", "",
                "| tokens | call | packed ms | per-sequence calls / packed | padded / packed |", "|---|---|---|---|---|"]
        names = {0: "flash forward", 1: "flash forward + backward", 2: "polysketch forward"}
        for total in sorted({r["args"].get("total") for r in by["varlen"]}):
            for kern in (0, 1, 2):
                p_, s_, d_ = (find("varlen", total=total, kernel=kern, layout=x) for x in (0, 1, 2))
                if p_:
                    out.append(f"| {total} | {names[kern]} | {fmt_ms(p_['ms'])} | "
                               + (f"{s_['ms'] / p_['ms']:.2f}×" if s_ else "–") + " | "
                               + (f"{d_['ms'] / p_['ms']:.2f}×" if d_ else "–") + " |")
        out.append("")
    if "paged_decode" in by:
        out += ["### Paged decode / contiguous decode", "",
                "| context | B | H | threads | contiguous µs | pages of 16 | pages of 256 |", "|---|---|---|---|---|---|---|"]
        keys = sorted({(r["args"].get("context"), r["args"].get("batch"), r["args"].get("heads"), r["args"].get("threads"))
                       for r in by["paged_decode"]})
        for ctx, b, h, t in keys:
            base = find("paged_decode", context=ctx, batch=b, heads=h, threads=t, page_size=0)
            cells = [str(ctx), str(b), str(h), str(t), f"{base['ms'] * 1e3:.4g}" if base else "–"]
            for ps in (16, 256):
                r = find("paged_decode", context=ctx, batch=b, heads=h, threads=t, page_size=ps)
                cells.append(f"{r['ms'] / base['ms']:.2f}×" if r and base else "–")
            out.append("| " + " | ".join(cells) + " |")
        pages = {(r["args"].get("page_KiB"), r["args"].get("threads")): r["bench"] for r in rows
                 if r["bench"]["name"].startswith("roof/read_pages")}
        cells = [f"{t} thread(s): {kib} KiB pages {pages[(kib, t)]['GB/s'] / pages[(0, t)]['GB/s'] * 100:.0f} %"
                 for (kib, t) in sorted(pages) if kib and (0, t) in pages]
        if cells:
            out.append("")
            out.append("Read rate of shuffled pages (two 64 MiB pools, a K page then its V page) against the same bytes "
                       "in order, same run: " + "; ".join(cells) + ". A paged step cannot beat its pages' read rate.")
        out.append("")
    return out


def main():
    if len(sys.argv) != 3:
        die("usage: report.py RESULTS.json OUTDIR")
    ctx, rows = load(sys.argv[1])
    outdir = sys.argv[2]
    os.makedirs(outdir, exist_ok=True)
    threads = max(r["args"].get("threads", 1) for r in rows if "threads" in r["args"])
    peak = {r["args"]["threads"]: r["bench"].get("GFLOP/s") for r in rows
            if r["kernel"] == "peak" and "fp32_GFLOP/s" not in r["bench"]}  # (not the bf16-dot row)

    lines = ["# polyattn benchmark report", ""]
    lines.append(
        f"CPU: {ctx.get('cpu_model', '?')}, ISA: {ctx.get('isa', '?')}, compiler: {ctx.get('compiler', '?')}, "
        f"threads: {threads}; fp32 FMA peak (threads × one core's measured peak): "
        + ", ".join(f"{peak[t]:.0f} GFLOP/s ({t} thread{'s' if t > 1 else ''})" for t in sorted(peak))
    )
    lines.append("")
    lines += machine_warning(rows, threads)
    figures = {}
    for d in (64, 128):
        sel = {label: select(rows, k, dict(extra, d=d, causal=1, threads=threads)) for label, k, extra in KERNELS}
        ns = sorted(set().union(*[set(s) for s in sel.values()]))
        if not ns:
            continue
        flash = sel["flash_attention"]
        sketch = sel["polysketch r=32 local_exact"]
        performer = sel["performer m=256"]
        lines.append(f"## Causal attention, one head, d = {d}, {threads} threads: time per call (ms)")
        lines.append("")
        lines.append("performer: favor_features (queries and keys) + linear_attention, the feature maps included.")
        lines.append("")
        header = ["N"] + [label for label, _, _ in KERNELS] + ["flash / polysketch (local_exact)", "flash / performer"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for n in ns:
            cells = [str(n)] + [fmt_ms(sel[label][n]["ms"]) if n in sel[label] else "–" for label, _, _ in KERNELS]
            for other in (sketch, performer):
                ratio = flash[n]["ms"] / other[n]["ms"] if n in flash and n in other else None
                cells.append(f"{ratio:.1f}×" if ratio else "–")
            lines.append("| " + " | ".join(cells) + " |")
        cross = crossover(flash, sketch)
        lines.append("")
        lines.append(f"polysketch (r = 32, local_exact) is faster than flash from N = {cross}." if cross else
                     "polysketch (r = 32, local_exact) is not faster than flash at any measured N.")
        if 32768 in flash and 32768 in performer:
            lines.append(f"Causal performer (m = 256) is {flash[32768]['ms'] / performer[32768]['ms']:.1f}× faster than "
                         "causal flash at N = 32768.")
        win = sel.get("flash window=512", {})
        if 32768 in win and 32768 in flash:
            w = win[32768]
            lines.append(f"Causal window w = 512 at N = 32768: {flash[32768]['ms'] / w['ms']:.1f}× faster than full "
                         f"causal flash, {w['bench'].get('pct_peak', float('nan')):.0f} % of peak counting only the "
                         "unmasked pairs.")
        big = [n for n in (32768, 65536) if n in sketch]
        if len(big) == 2:
            lines.append(f"time(65536) / time(32768) of polysketch: {sketch[65536]['ms'] / sketch[32768]['ms']:.2f}.")
        if 65536 in sketch:
            mib = {label: sel[label][65536]["bench"].get("extra_MiB") for label, _, _ in KERNELS if 65536 in sel[label]}
            lines.append("Extra memory at N = 65536 (MiB): " +
                         ", ".join(f"{k} {v:.1f}" for k, v in mib.items() if v is not None) + ".")
        lines.append("")
        figures[d] = sel

    # non-causal approximations: Linformer against flash
    non_causal = {label: select(rows, k, dict(extra, d=64, causal=0, threads=threads)) for label, k, extra in NON_CAUSAL}
    nc_ns = sorted(set(non_causal["linformer kp=256"]))
    if nc_ns:
        flash_nc, lin = non_causal["flash_attention"], non_causal["linformer kp=256"]
        lines.append(f"## Non-causal attention, one head, d = 64, {threads} threads: time per call (ms)")
        lines.append("")
        lines.append("linformer: linformer_attention with E, F [kp, N] given (the projections E·K, F·V included).")
        lines.append("")
        lines.append("| N | flash_attention | linformer kp=256 | flash / linformer |")
        lines.append("|---|---|---|---|")
        for n in nc_ns:
            f, l = flash_nc.get(n), lin[n]
            ratio = f"{f['ms'] / l['ms']:.1f}×" if f else "–"
            lines.append(f"| {n} | {fmt_ms(f['ms']) if f else '–'} | {fmt_ms(l['ms'])} | {ratio} |")
        lines.append("")

    # exact kernels: GFLOP/s and % of peak for every configuration measured
    exact_rows = [r for r in rows if r["kernel"] in EXACT and "GFLOP/s" in r["bench"]]
    if exact_rows:
        lines.append("## Exact kernels: GFLOP/s and % of the measured FMA peak")
        lines.append("")
        lines.append("| kernel | N | d | causal | threads | ms | GFLOP/s | % of peak |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for r in sorted(exact_rows, key=lambda r: (r["kernel"], r["args"]["d"], r["args"]["causal"],
                                                    r["args"]["threads"], r["args"]["N"])):
            a, b = r["args"], r["bench"]
            lines.append(f"| {r['kernel']} | {a['N']} | {a['d']} | {a['causal']} | {a['threads']} | {fmt_ms(r['ms'])} | "
                         f"{b['GFLOP/s']:.1f} | {b['pct_peak']:.0f} % |")
        lines.append("")

    # linear kernels: % of peak by the FLOP model (causal rows)
    lin_rows = [r for r in rows if r["kernel"] in ("polysketch_attention", "linear_attention")
                and "pct_peak" in r["bench"]]
    if lin_rows:
        lines.append("## Linear kernels (causal): % of the measured FMA peak by the FLOP model, extra memory")
        lines.append("")
        lines.append("FLOPs per token: 4·m·(dv+1) for the state, b/2·(2·local dim + 2·dv) for the local block, "
                     "8·d·r for the two degree-4 sketches (docs/design.md).")
        lines.append("")
        lines.append("| kernel | N | d | r / m | local_exact | threads | ms | GFLOP/s (model) | % of peak | extra MiB |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in sorted(lin_rows, key=lambda r: (r["kernel"], r["args"]["d"], r["args"].get("r", r["args"].get("m", 0)),
                                                  r["args"].get("local_exact", 0), r["args"]["threads"], r["args"]["N"])):
            a, b = r["args"], r["bench"]
            lines.append(f"| {r['kernel']} | {a['N']} | {a['d']} | {a.get('r', a.get('m'))} | {a.get('local_exact', '–')} | "
                         f"{a['threads']} | {fmt_ms(r['ms'])} | {b['GFLOP/s']:.1f} | {b['pct_peak']:.0f} % | "
                         f"{b.get('extra_MiB', float('nan')):.1f} |")
        lines.append("")

    # decode: one token against a cached context
    decode = {k: select_by(rows, k, "context") for k in ("decode_flash", "decode_polysketch")}
    if decode["decode_flash"] or decode["decode_polysketch"]:
        lines.append("## Decode step: one query against a cached context, one head, d = 64, 1 thread")
        lines.append("")
        lines.append("flash_attention with Nq = 1 over the cached K, V against polysketch_cache (r = 32, b = 256, "
                     "local_exact) appending one token; bytes kept per sequence and kv head.")
        lines.append("")
        lines.append("| context | flash µs | polysketch_cache µs | flash / polysketch | KV cache KiB | polysketch state KiB |")
        lines.append("|---|---|---|---|---|---|")
        for c in sorted(set(decode["decode_flash"]) | set(decode["decode_polysketch"])):
            f, p = decode["decode_flash"].get(c), decode["decode_polysketch"].get(c)
            ratio = f"{f['ms'] / p['ms']:.1f}×" if f and p else "–"
            lines.append(f"| {c} | {fmt_us(f)} | {fmt_us(p)} | {ratio} | "
                         f"{f['bench'].get('state_KiB', float('nan')) if f else float('nan'):.0f} | "
                         f"{p['bench'].get('state_KiB', float('nan')) if p else float('nan'):.0f} |")
        lines.append("")

    # backward passes: one row per shape, backward and forward + backward side by side
    bwd_rows = [r for r in rows if r["kernel"] in BACKWARD and "GFLOP/s" in r["bench"]]
    if bwd_rows:
        lines.append("## Backward passes: GFLOP/s and % of the measured FMA peak")
        lines.append("")
        lines.append("FLOPs: 10·N²·d per backward pass, 14·N²·d for forward + backward; half of it causal. "
                     "`bwd / fwd` is the backward's time over the forward's (same shape, same run).")
        lines.append("")
        lines.append("| kernel | N | d | causal | threads | bwd ms | bwd GFLOP/s | bwd % of peak | fwd+bwd ms | "
                     "fwd+bwd GFLOP/s | bwd / fwd |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        index = {(r["kernel"], r["args"].get("N"), r["args"].get("d"), r["args"].get("causal"),
                  r["args"].get("threads")): r for r in rows}
        for r in sorted((r for r in bwd_rows if r["kernel"].endswith("_backward")),
                        key=lambda r: (r["kernel"], r["args"]["d"], r["args"]["causal"], r["args"]["threads"],
                                       r["args"]["N"])):
            a, b = r["args"], r["bench"]
            base = r["kernel"][:-len("_backward")]
            key = (a["N"], a["d"], a["causal"], a["threads"])
            both = index.get((base + "_fwd_bwd",) + key)
            fwd = index.get((base,) + key)
            cells = [base, str(a["N"]), str(a["d"]), str(a["causal"]), str(a["threads"]), fmt_ms(r["ms"]),
                     f"{b['GFLOP/s']:.1f}", f"{b['pct_peak']:.0f} %",
                     fmt_ms(both["ms"]) if both else "–",
                     f"{both['bench']['GFLOP/s']:.1f}" if both else "–",
                     f"{r['ms'] / fwd['ms']:.2f}" if fwd else "–"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    # training step: forward + backward over N, the crossover, and polysketch's backward / forward
    training = {label: select(rows, k, dict(extra, d=64, causal=1, threads=threads)) for label, k, extra in TRAINING}
    train_ns = sorted(set().union(*[set(t) for t in training.values()]))
    if train_ns:
        flash_t, sketch_t = training["flash_attention"], training["polysketch r=32 local_exact"]
        bwd = select(rows, "polysketch_attention_backward", {"d": 64, "causal": 1, "threads": threads, "r": 32,
                                                             "local_exact": 1})
        fwd = figures.get(64, {}).get("polysketch r=32 local_exact", {})
        lines.append(f"## Training step (forward with stats + backward), causal, one head, d = 64, {threads} threads: "
                     "time per step (ms)")
        lines.append("")
        header = ["N"] + [label for label, _, _ in TRAINING] + ["flash / polysketch", "polysketch bwd / fwd",
                                                                "polysketch % of peak (model)", "extra MiB"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for n in train_ns:
            cells = [str(n)] + [fmt_ms(training[label][n]["ms"]) if n in training[label] else "–"
                                for label, _, _ in TRAINING]
            cells.append(f"{flash_t[n]['ms'] / sketch_t[n]['ms']:.1f}×" if n in flash_t and n in sketch_t else "–")
            cells.append(f"{bwd[n]['ms'] / fwd[n]['ms']:.2f}" if n in bwd and n in fwd else "–")
            st = sketch_t.get(n, {}).get("bench", {})
            cells.append(f"{st['pct_peak']:.0f} %" if "pct_peak" in st else "–")
            cells.append(f"{st['extra_MiB']:.1f}" if "extra_MiB" in st else "–")
            lines.append("| " + " | ".join(cells) + " |")
        cross = crossover(flash_t, sketch_t)
        lines.append("")
        lines.append(f"A polysketch training step (r = 32, local_exact) is faster than flash's from N = {cross}." if cross
                     else "A polysketch training step is not faster than flash's at any measured N.")
        lines.append("FLOP model of the polysketch step: the forward's (above) plus, per token, 10·m·dv + 4·m for two "
                     "state updates and three read-outs, b/2·(8·local dim + 6·dv) for the local block, and the "
                     "sketches again (docs/design.md §7.6).")
        lines.append("")

    # shaped attention (SAS) beside flash at the same shapes, same run
    shaped = [r for r in rows if r["kernel"] == "shaped_attention"]
    if shaped:
        index = {(r["kernel"], r["args"].get("N"), r["args"].get("d"), r["args"].get("causal"),
                  r["args"].get("threads"), r["args"].get("alpha")): r for r in rows}
        lines.append("## Shaped attention (α·v_pos + β·softmax − γ·mean) against flash_attention, same run")
        lines.append("")
        lines.append("Forward time per call; `shaped / flash` is the cost of the identity and mean terms "
                     "(target: within 10 %).")
        lines.append("")
        lines.append("| N | d | causal | threads | flash ms | shaped ms | shaped / flash |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in sorted(shaped, key=lambda r: (r["args"]["d"], r["args"]["causal"], r["args"]["threads"],
                                                r["args"]["N"])):
            a = r["args"]
            f = index.get(("flash_attention", a["N"], a["d"], a["causal"], a["threads"], None))
            ratio = f"{r['ms'] / f['ms']:.3f}" if f else "–"
            lines.append(f"| {a['N']} | {a['d']} | {a['causal']} | {a['threads']} | {fmt_ms(f['ms']) if f else '–'} | "
                         f"{fmt_ms(r['ms'])} | {ratio} |")
        lines.append("")
        sb = [r for r in rows if r["kernel"] == "shaped_attention_backward" and r["args"].get("alpha") == 1]
        if sb:
            lines.append("Backward and forward + backward: flash's, shaped's with α = β = γ = 1 (softmax output "
                         "reconstructed from out) and with α = 8 (|α| + |γ| > 4|β|: recomputed by one more "
                         "forward pass); ratios to flash in parentheses.")
            lines.append("")
            lines.append("| N | d | causal | threads | flash bwd ms | shaped bwd ms | shaped bwd α = 8 ms | "
                         "flash fwd+bwd ms | shaped fwd+bwd ms | shaped fwd+bwd α = 8 ms |")
            lines.append("|---|---|---|---|---|---|---|---|---|---|")

            def cell(kernel, a, alpha, base):
                r = index.get((kernel, a["N"], a["d"], a["causal"], a["threads"], alpha))
                if not r:
                    return "–"
                return f"{fmt_ms(r['ms'])} ({r['ms'] / base['ms']:.2f}×)" if base else fmt_ms(r["ms"])

            for r in sorted(sb, key=lambda r: (r["args"]["d"], r["args"]["causal"], r["args"]["threads"],
                                               r["args"]["N"])):
                a = r["args"]
                fb = index.get(("flash_attention_backward", a["N"], a["d"], a["causal"], a["threads"], None))
                ff = index.get(("flash_attention_fwd_bwd", a["N"], a["d"], a["causal"], a["threads"], None))
                cells = [str(a["N"]), str(a["d"]), str(a["causal"]), str(a["threads"]),
                         fmt_ms(fb["ms"]) if fb else "–", cell("shaped_attention_backward", a, 1, fb),
                         cell("shaped_attention_backward", a, 8, fb), fmt_ms(ff["ms"]) if ff else "–",
                         cell("shaped_attention_fwd_bwd", a, 1, ff), cell("shaped_attention_fwd_bwd", a, 8, ff)]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")

    lines += precision_table(rows)
    lines += serving_table(rows)
    lines += serving_extras(rows)
    lines += contention_table(rows, threads)
    if 64 not in figures:
        die("no causal d = 64 results: nothing to plot (did the filter exclude them?)")
    with open(os.path.join(outdir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(figures[64], training if train_ns else None, non_causal if nc_ns else None, rows, threads,
         os.path.join(outdir, "report.png"))
    print(f"report.py: wrote {os.path.join(outdir, 'report.md')} and {os.path.join(outdir, 'report.png')}")


def plot(sel, training, non_causal, rows, threads, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        die(f"matplotlib is missing ({e}); install python3-matplotlib and run with /usr/bin/python3")
    decode = {k: select_by(rows, k, "context") for k in ("decode_flash", "decode_polysketch")}
    precision = {dt: sorted((r["args"]["N"], r["ms"]) for r in rows if r["kernel"] == "precision_flash"
                            and r["args"].get("causal") == 1 and r["args"].get("threads") == threads
                            and r["args"].get("dtype") == dt) for dt in DTYPES}
    has_precision = any(precision.values())
    panels = 2 + (1 if any(decode.values()) else 0) + (1 if training else 0) + (1 if has_precision else 0)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5.2))
    ax1, ax2 = axes[0], axes[1]
    next_panel = 2
    drawn = 0
    for label, _, _ in KERNELS:
        pts = sorted((n, r["ms"]) for n, r in sel[label].items())
        if pts:
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            drawn += 1
    if drawn == 0:
        die("no series to plot")
    for label, _, _ in NON_CAUSAL if non_causal else []:
        pts = sorted((n, r["ms"]) for n, r in non_causal[label].items())
        if pts:
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], "--", marker="x", label=f"{label} (non-causal)")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    cross = crossover(sel["flash_attention"], sel["polysketch r=32 local_exact"])
    if cross:
        ax1.axvline(cross, color="grey", linestyle=":", linewidth=1)
        ax1.annotate(f"polysketch (local_exact)\nfaster than flash\nfrom N = {cross}", xy=(cross, 0.04),
                     xycoords=("data", "axes fraction"), xytext=(5, 0), textcoords="offset points", fontsize=8,
                     color="dimgrey")
    ax1.set_xlabel("sequence length N")
    ax1.set_ylabel("time per call (ms)")
    ax1.set_title(f"attention, one head, d = 64, {threads} threads (dashed: non-causal)")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)

    for kernel in EXACT + BACKWARD[:2]:
        for causal, style in ((1, "-"), (0, "--")):
            pts = sorted((r["args"]["N"], r["bench"]["pct_peak"]) for r in rows
                         if r["kernel"] == kernel and r["args"].get("d") == 64 and r["args"].get("causal") == causal
                         and r["args"].get("threads") == threads and "pct_peak" in r["bench"])
            if pts:
                ax2.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o",
                         label=f"{kernel} {'causal' if causal else 'non-causal'}")
    ax2.set_xscale("log", base=2)
    ax2.set_ylim(0, 100)
    ax2.set_xlabel("sequence length N")
    ax2.set_ylabel("% of measured fp32 FMA peak")
    ax2.set_title(f"exact kernels, d = 64, {threads} threads (causal counts unmasked FLOPs)")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    if any(decode.values()):
        ax3 = axes[next_panel]
        next_panel += 1
        for k, label in (("decode_flash", "flash_attention, Nq = 1"), ("decode_polysketch", "polysketch_cache, n = 1")):
            pts = sorted((c, r["ms"] * 1e3) for c, r in decode[k].items())
            if pts:
                ax3.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax3.set_xscale("log", base=2)
        ax3.set_yscale("log")
        ax3.set_xlabel("context length")
        ax3.set_ylabel("time per decode step (µs)")
        ax3.set_title("decode step, one head, d = 64, 1 thread")
        ax3.grid(True, which="both", alpha=0.3)
        ax3.legend(fontsize=8)
    if training:
        ax4 = axes[next_panel]
        for label, _, _ in TRAINING:
            pts = sorted((n, r["ms"]) for n, r in training[label].items())
            if pts:
                ax4.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        cross = crossover(training["flash_attention"], training["polysketch r=32 local_exact"])
        if cross:
            ax4.axvline(cross, color="grey", linestyle=":", linewidth=1)
        ax4.set_xscale("log", base=2)
        ax4.set_yscale("log")
        ax4.set_xlabel("sequence length N")
        ax4.set_ylabel("time per training step (ms)")
        ax4.set_title(f"forward + backward, causal, d = 64, {threads} threads")
        ax4.grid(True, which="both", alpha=0.3)
        ax4.legend(fontsize=8)
    if has_precision:
        ax5 = axes[-1]
        for dt, name in DTYPES.items():
            pts = precision[dt]
            if pts:
                ax5.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"flash, {name} storage")
        ax5.set_xscale("log", base=2)
        ax5.set_yscale("log")
        ax5.set_xlabel("sequence length N")
        ax5.set_ylabel("time per call (ms)")
        ax5.set_title(f"causal flash, d = 64, H = 4 to N = 4096 then 1, {threads} threads")
        ax5.grid(True, which="both", alpha=0.3)
        ax5.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
