"""polyattn's PyTorch ops against PyTorch's own CPU attention, in one run.

    PYTHONPATH=build/test/python python3 bench/bench_torch.py [--threads 2] [--reps 3] [--overhead-only]

Rows (B = 1, H = 4 heads, d = 64, float32, layout [B, H, N, d], the given threads for both):
  * N = 4096, causal and not: PyTorch's matmul-softmax-matmul (what a user writes; torch 1.13
    has no scaled_dot_product_attention, it is used where the installed torch has it) against
    polyattn.flash_attention, forward and forward+backward, time (median of --reps) and peak
    resident memory above the start of the call (VmHWM after resetting it, /proc/self/clear_refs);
    and flash's forward+backward called from C++ on the same tensors (the op's cost over it);
  * N = --long (32768), causal forward+backward: flash_attention against polysketch_attention
    (degree 4, r = 32, local_exact, blocks of 256) — PyTorch's N x N scores would need 17 GB;
  * N = 256: the per-call overhead of the op (Python wrapper -> torch dispatcher -> polyattn)
    over the same polyattn call from C++, forward without grad.
The BLAS that PyTorch's matmuls use is reported (the libblas.so.3 mapped into this process).
"""
import argparse
import gc
import os
import statistics
import subprocess
import sys
import time

import torch

import polyattn


def vm(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def measure(fn, reps):
    """(median seconds, peak resident bytes above the start) of fn() over reps runs after a warm-up."""
    fn()
    times, peaks = [], []
    for _ in range(reps):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        base = vm("VmRSS")
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        peaks.append(vm("VmHWM") - base)
    return statistics.median(times), max(peaks)


def torch_attention(q, k, v, causal):
    if hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def inputs(n, d=64, heads=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, n, d, generator=g).requires_grad_() for _ in range(3)]


def fwd(attn, q, k, v):
    def run():
        with torch.no_grad():
            attn(q, k, v)
    return run


def fwd_bwd(attn, q, k, v):
    dout = torch.randn_like(q)

    def run():
        for t in (q, k, v):
            t.grad = None
        attn(q, k, v).backward(dout)
    return run


def blas():
    with open("/proc/self/maps") as f:
        libs = {line.split()[-1] for line in f if "blas" in line.lower() and "/" in line}
    return ", ".join(sorted(libs)) or "none mapped"


def main():
    # the overhead rows run with glibc's own allocator policy (in a child process of their own in a
    # full run): with the threshold below every output tensor of 128 KiB or more would be fresh
    # pages, whose faults (60-90 us at N = 256) are not the op's cost
    if "--overhead-only" not in sys.argv and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # large buffers straight from mmap and back on free, so the resident peak of a call is its
        # own (else glibc keeps freed buffers resident and the peaks of later calls read 0)
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--long", type=int, default=32768)
    ap.add_argument("--overhead-only", action="store_true", help="only the per-call overhead rows")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.zeros(8, 8) @ torch.zeros(8, 8)  # loads the BLAS
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, BLAS: {blas()}")
    if a.overhead_only:
        overhead()
        return 0
    compare(a)
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    return subprocess.run([sys.executable, os.path.abspath(__file__), "--overhead-only", "--threads", str(a.threads)],
                          env=env).returncode


def compare(a):
    """The PyTorch against polyattn rows (N = --n) and flash against polysketch (N = --long)."""
    mib = 1 / 2**20
    print(f"\n| N = {a.n}, 4 heads, d = 64 | PyTorch ms | polyattn ms | speed-up | PyTorch peak MiB | polyattn peak MiB |")
    print("|---|---|---|---|---|---|")
    q, k, v = inputs(a.n)
    for causal in (False, True):
        flash = lambda q, k, v: polyattn.flash_attention(q, k, v, causal=causal, layout="bhnd")  # noqa: E731
        plain = lambda q, k, v: torch_attention(q, k, v, causal)  # noqa: E731
        for name, mk in (("forward", fwd), ("forward+backward", fwd_bwd)):
            tt, mt = measure(mk(plain, q, k, v), a.reps)
            tp, mp = measure(mk(flash, q, k, v), a.reps)
            label = f"{name}{' causal' if causal else ''}"
            print(f"| {label} | {tt * 1e3:.0f} | {tp * 1e3:.0f} | {tt / tp:.2f}x | {mt * mib:.0f} | {mp * mib:.1f} |",
                  flush=True)
        cpp_call = lambda: torch.ops.polyattn._cpp_flash_seconds(q.detach(), k.detach(), v.detach(), causal,  # noqa
                                                                 True, 1, True)
        cpp_call()
        cpp = statistics.median(cpp_call() for _ in range(a.reps))
        print(f"| forward+backward{' causal' if causal else ''}, polyattn from C++ | | {cpp * 1e3:.0f} | "
              f"op / C++ = {tp / cpp:.3f} | | |", flush=True)

    print(f"\n| N = {a.long}, causal forward+backward | ms | peak MiB |")
    print("|---|---|---|")
    q, k, v = inputs(a.long)
    sketch = polyattn.Sketch(64, degree=4, sketch_size=32)
    flash = lambda q, k, v: polyattn.flash_attention(q, k, v, causal=True, layout="bhnd")  # noqa: E731
    poly = lambda q, k, v: polyattn.polysketch_attention(q, k, v, sketch, causal=True, local_exact=True,  # noqa
                                                         block_size=256, scale=0.125, layout="bhnd")
    tf, mf = measure(fwd_bwd(flash, q, k, v), 1)
    ts, ms = measure(fwd_bwd(poly, q, k, v), a.reps)
    print(f"| flash_attention | {tf * 1e3:.0f} | {mf * mib:.0f} |")
    print(f"| polysketch_attention (r = 32, local_exact, b = 256) | {ts * 1e3:.0f} | {ms * mib:.0f} |")
    print(f"| speed-up of polysketch over flash | {tf / ts:.1f}x | |")


def overhead():
    """The three ways to call the same forward, interleaved round by round, the fastest round of
    each (robust to the load of a shared machine); at N = 256 and at N = 1, where the kernel is
    almost free and what is left is the per-call cost."""
    print("\n| forward, 4 heads, d = 64 | µs per call | over C++ µs |")
    print("|---|---|---|")
    for n in (256, 1):
        q, k, v = (t.detach() for t in inputs(n))
        args = (False, None, -1, -1, [], True)
        iters = 200 if n > 1 else 5000
        ways = {"polyattn::flash_attention from C++": None,
                "torch.ops.polyattn.flash_forward": lambda: torch.ops.polyattn.flash_forward(q, k, v, *args),
                "polyattn.flash_attention (Python)": lambda: polyattn.flash_attention(q, k, v, layout="bhnd")}
        best = {name: float("inf") for name in ways}
        for _ in range(15):
            for name, fn in ways.items():
                if fn is None:
                    t = torch.ops.polyattn._cpp_flash_seconds(q, k, v, False, False, iters, True)
                else:
                    t0 = time.perf_counter()
                    for _ in range(iters):
                        fn()
                    t = (time.perf_counter() - t0) / iters
                best[name] = min(best[name], t)
        cpp = best["polyattn::flash_attention from C++"]
        for name, t in best.items():
            over = "" if name.endswith("C++") else f"{(t - cpp) * 1e6:.1f}"
            print(f"| N = {n}: {name} | {t * 1e6:.1f} | {over} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
