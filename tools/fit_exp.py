#!/usr/bin/python3
"""The coefficients of the float exponential (include/polyattn/detail/core/simd.hpp, vexp).

    /usr/bin/python3 tools/fit_exp.py

exp(x) = 2^n · e^f with n = round(x / ln 2) and f = x − n·ln 2 in [−ln2/2, ln2/2]; on that interval
e^f ~ 1 + f + f²·R(f), R of degree 4, for the least maximum relative error: Lawson's iteratively
reweighted least squares on (e^f − 1 − f)/f² = R(f) with the weights of e^f's relative error, in
double. The kernel evaluates the polynomial as one Horner chain of fused multiply-adds in float,
c6 down to c2, then the coefficients 1 and 1: p = fma(p, f, c) six times. Prints the
coefficients (lowest degree first) and the error of that float32 evaluation (each fma rounded
once, emulated in double) against exp in double, over f in the interval.
"""
import numpy as np

H, DEG = np.log(2.0) / 2, 4


def fit(iterations=60):
    f = np.sort(np.concatenate([np.linspace(-H, H, 40001), H * np.cos(np.linspace(0, np.pi, 40001))]))
    f = f[np.abs(f) > 1e-6]
    target = (np.expm1(f) - f) / f ** 2
    w = np.ones_like(f)
    best = None
    for _ in range(iterations):
        a = np.stack([f ** i for i in range(DEG + 1)], 1)
        scale = f ** 2 / np.exp(f)  # an error of R is f²·error relative to e^f
        coef, *_ = np.linalg.lstsq(a * (w * scale)[:, None], target * w * scale, rcond=None)
        err = np.abs(np.polyval(coef[::-1], f) - target) * scale
        if best is None or err.max() < best[0]:
            best = (err.max(), coef.copy())
        w = w * np.sqrt(err / err.max()) + 1e-3
    return best


def fma32(a, b, c):
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def float32_error(c):
    f = np.linspace(-H, H, 2000001).astype(np.float32)
    p = np.full_like(f, np.float32(c[-1]))
    for k in list(c[-2::-1]) + [1.0, 1.0]:
        p = fma32(p, f, np.full_like(f, np.float32(k)))
    ref = np.exp(f.astype(np.float64))
    ulp = np.spacing(ref.astype(np.float32)).astype(np.float64)
    d = np.abs(p.astype(np.float64) - ref)
    return np.max(d / ref), np.max(d / ulp)


if __name__ == "__main__":
    e, c = fit()
    rel, ulps = float32_error(c)
    print(f"max relative error: {e:.2e} exact, {rel:.2e} ({ulps:.2f} ulp) in float32")
    print("c2..c6:", ", ".join(f"{x:.9e}" for x in c))
