#!/usr/bin/python3
"""The coefficients of the float softcap's tanh (include/polyattn/detail/exact/modifiers.hpp, vtanh).

    /usr/bin/python3 tools/fit_tanh.py

tanh(x) ~ x·P(x²)/Q(x²) on [0, 9], P and Q of degree 4 in u = x², Q(0) = 1, for the least maximum
relative error: Lawson's iteratively reweighted least squares on the linearised problem
x·P(u) − tanh(x)·Q(u) = 0 (weights 1/tanh), in double, u scaled to [0, 1] while fitting. Beyond
|x| = 9 the kernel clamps (tanh(9) = 1 − 3e-8 rounds to 1 in float). Prints the coefficients
(lowest degree first) and the error of a float32 Horner evaluation with float32 coefficients
and an exact division; the kernel's reciprocal (rcp14 or rcp, one Newton step) adds about 1 ulp.
"""
import numpy as np

X, DEG_P, DEG_Q = 9.0, 4, 4


def fit(iterations=60):
    xs = np.sort(np.concatenate([np.linspace(1e-4, X, 20000), X * (1 - np.cos(np.linspace(0, np.pi / 2, 20000)))[1:]]))
    u, f, s = xs ** 2 / X ** 2, np.tanh(xs), X ** 2
    w = np.ones_like(xs)
    best = None
    for _ in range(iterations):
        a = np.concatenate([np.stack([xs * u ** i for i in range(DEG_P + 1)], 1),
                            np.stack([-f * u ** j for j in range(1, DEG_Q + 1)], 1)], 1)
        coef, *_ = np.linalg.lstsq(a * (w / f)[:, None], f * (w / f), rcond=None)
        p, q = coef[:DEG_P + 1], np.concatenate([[1.0], coef[DEG_P + 1:]])
        err = np.abs(xs * np.polyval(p[::-1], u) / np.polyval(q[::-1], u) - f) / f
        if best is None or err.max() < best[0]:
            best = (err.max(), p.copy(), q.copy())
        w = w * np.sqrt(err / err.max()) + 1e-3
    e, p, q = best
    return e, [c / s ** i for i, c in enumerate(p)], [c / s ** i for i, c in enumerate(q)]


def float32_error(p, q):
    xs = np.linspace(0, X, 2000001).astype(np.float32)[1:]
    u = xs * xs
    P, Q = np.float32(p[-1]), np.float32(q[-1])
    for c in p[-2::-1]:
        P = P * u + np.float32(c)
    for c in q[-2::-1]:
        Q = Q * u + np.float32(c)
    t = (xs * P / Q).astype(np.float64)
    ref = np.tanh(xs.astype(np.float64))
    ulp = np.spacing(ref.astype(np.float32)).astype(np.float64)
    return np.max(np.abs(t - ref) / ref), np.max(np.abs(t - ref) / ulp)


if __name__ == "__main__":
    e, p, q = fit()
    rel, ulps = float32_error(p, q)
    print(f"max relative error: {e:.2e} exact, {rel:.2e} ({ulps:.1f} ulp) in float32")
    print("P:", ", ".join(f"{c:.9e}" for c in p))
    print("Q:", ", ".join(f"{c:.9e}" for c in q))
