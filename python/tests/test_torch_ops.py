"""The PyTorch operators against plain float64 PyTorch references (reference.py), gradcheck on tiny
shapes, Sketch leaf gradients against autograd through a plain-PyTorch sketch, layouts and strided
views, bf16, thread-count determinism, the streaming cache, and ValueErrors on bad input."""
import os
import sys
import types

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402
import polyattn  # noqa: E402

D64 = torch.float64


def rand(*shape, dtype=D64, seed=None, positive=False):
    g = torch.Generator().manual_seed(seed if seed is not None else sum(shape) * 7919 + len(shape))
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return (x.abs() + 0.1).to(dtype) if positive else x.to(dtype)


def bnhd(x):
    """[B, H, N, d] -> the [B, N, H, d] layout (a contiguous tensor)."""
    return x.transpose(1, 2).contiguous()


def problem(nq=7, nk=7, h=2, hk=1, d=3, dv=2, seed=1):
    """q, k, v in [B, H, N, d] (layout 'bhnd'), float64, requiring grad."""
    q, k, v = rand(2, h, nq, d, seed=seed), rand(2, hk, nk, d, seed=seed + 1), rand(2, hk, nk, dv, seed=seed + 2)
    return [t.requires_grad_() for t in (q, k, v)]


def check_against(op, reference, inputs, tol=1e-10):
    """op's output and its gradients (from a random dout) against the reference's, through autograd."""
    out = op(*inputs)
    expect = reference(*inputs)
    assert out.shape == expect.shape
    torch.testing.assert_close(out, expect, rtol=tol, atol=tol)
    dout = rand(*out.shape, seed=99)
    got = torch.autograd.grad(out, inputs, dout, allow_unused=True)
    want = torch.autograd.grad(expect, inputs, dout, allow_unused=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w if w is not None else torch.zeros_like(g), rtol=tol, atol=tol)


# ---- flash_attention --------------------------------------------------------------------------

FLASH_CASES = [
    dict(causal=False),
    dict(causal=True),
    dict(causal=True, window=(2, -1)),
    dict(causal=False, window=(1, 2), global_positions=[0, 5]),
    dict(causal=False, scale=0.7),
]


@pytest.mark.parametrize("kw", FLASH_CASES)
def test_flash_matches_reference_and_gradcheck(kw):
    q, k, v = problem(nq=6, nk=8)
    op = lambda q, k, v: polyattn.flash_attention(q, k, v, layout="bhnd", **kw)  # noqa: E731
    refkw = {**kw, "global_positions": tuple(kw.get("global_positions", ()))}
    check_against(op, lambda q, k, v: ref.softmax_attention(q, k, v, **refkw), [q, k, v])
    assert torch.autograd.gradcheck(op, (q, k, v))


def test_flash_bnhd_layout_and_fully_masked_rows():
    q, k, v = problem(nq=5, nk=5, h=2, hk=2)
    # window 0 on the left and right and causal with Nq > Nk: rows with no key are 0, not NaN
    out = polyattn.flash_attention(bnhd(q), bnhd(k[:, :, :3]), bnhd(v[:, :, :3]), causal=True)
    expect = ref.softmax_attention(q, k[:, :, :3], v[:, :, :3], causal=True)
    assert out.shape == (2, 5, 2, 2)
    torch.testing.assert_close(out.transpose(1, 2), expect, rtol=1e-12, atol=1e-12)
    assert torch.all(out[:, :2] == 0) and not torch.isnan(out).any()


MODIFIER_CASES = [
    dict(causal=False, sinks=True),
    dict(causal=True, softcap=1.5),
    dict(causal=False, alibi_slopes=[0.5, -0.25, 0.125, 1.0]),
    dict(causal=True, sinks=True, softcap=2.0, alibi_slopes=[0.3, 0.2, 0.1, 0.05], window=(3, -1)),
]


@pytest.mark.parametrize("kw", MODIFIER_CASES)
def test_flash_score_modifiers_match_reference_and_gradcheck(kw):
    # GQA 4:2, Nq > Nk with causal (rows that see no key but the sink), gradients of the sinks too
    q, k, v = problem(nq=9, nk=7, h=4, hk=2)
    kw = dict(kw)
    if kw.pop("sinks", False):
        kw["sinks"] = rand(4, seed=5).requires_grad_()
    inputs = [q, k, v] + ([kw["sinks"]] if "sinks" in kw else [])

    def call(fn, *xs):
        return fn(*xs[:3], **{**kw, **({"sinks": xs[3]} if len(xs) > 3 else {})})

    op = lambda *xs: call(lambda *a, **o: polyattn.flash_attention(*a, layout="bhnd", **o), *xs)  # noqa: E731
    check_against(op, lambda *xs: call(ref.softmax_attention, *xs), inputs)
    assert torch.autograd.gradcheck(op, tuple(inputs))


def test_flash_score_modifiers_float32_and_validation():
    q, k, v = problem(nq=5, nk=6, h=2, hk=1)
    sinks = torch.tensor([0.5, -1.0])
    got = polyattn.flash_attention(*(t.detach().float() for t in (q, k, v)), layout="bhnd", sinks=sinks, softcap=3.0)
    want = ref.softmax_attention(q.detach(), k.detach(), v.detach(), sinks=sinks, softcap=3.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sinks"):
        polyattn.flash_attention(q, k, v, layout="bhnd", sinks=[0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="softcap"):
        polyattn.flash_attention(q, k, v, layout="bhnd", softcap=-1.0)


# ---- flash_attention_varlen -------------------------------------------------------------------

def packed_problem(lens_q, lens_k, h=4, hk=2, d=3, dv=2, seed=11):
    """q [Tq, H, d], k [Tk, Hk, d], v [Tk, Hk, dv] (float64, requiring grad) and the int64 offsets."""
    tq, tk = sum(lens_q), sum(lens_k)
    q, k, v = rand(tq, h, d, seed=seed), rand(tk, hk, d, seed=seed + 1), rand(tk, hk, dv, seed=seed + 2)
    cu = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int64)  # noqa: E731
    return [t.requires_grad_() for t in (q, k, v)], cu(lens_q), cu(lens_k)


def per_sequence_reference(cu_q, cu_k, **kw):
    """The reference of each sequence alone ([n, H, d] rows as a batch of one), concatenated."""
    def run(q, k, v, *sinks):
        outs = []
        for s in range(len(cu_q) - 1):
            a, b, c, e = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
            seq = [x.transpose(0, 1)[None] for x in (q[a:b], k[c:e], v[c:e])]
            extra = {"sinks": sinks[0]} if sinks else {}
            outs.append(ref.softmax_attention(*seq, **kw, **extra)[0].transpose(0, 1))
        return torch.cat(outs, dim=0)
    return run


@pytest.mark.parametrize("kw", [dict(causal=False), dict(causal=True), dict(causal=True, window=(1, -1), softcap=2.0),
                                dict(causal=True, sinks=True, alibi_slopes=[0.5, 0.25, -0.5, 1.0])])
def test_flash_varlen_matches_per_sequence_reference_and_gradcheck(kw):
    # sequences of 3, 0, 5 and 1 queries over 4, 2, 5 and 6 keys (Nq > Nk, Nq < Nk, an empty one), GQA 4:2
    (q, k, v), cu_q, cu_k = packed_problem([3, 0, 5, 1], [4, 2, 5, 6])
    kw = dict(kw)
    inputs = [q, k, v]
    if kw.pop("sinks", False):
        inputs.append(rand(4, seed=6).requires_grad_())

    def op(q, k, v, *sinks):
        return polyattn.flash_attention_varlen(q, k, v, cu_q, cu_k, **kw, **({"sinks": sinks[0]} if sinks else {}))

    check_against(op, per_sequence_reference(cu_q, cu_k, **kw), inputs)
    assert torch.autograd.gradcheck(op, tuple(inputs))


def test_flash_varlen_float32_threads_and_validation():
    (q, k, v), cu_q, cu_k = packed_problem([6, 2, 9], [6, 7, 9], h=2, hk=2, d=8, dv=8)
    q, k, v = (t.detach().float() for t in (q, k, v))
    dense = polyattn.flash_attention(q[None, :6], k[None, :6], v[None, :6], causal=True)[0]  # sequence 0 alone
    threads = torch.get_num_threads()
    outs = []
    for n in (1, 2):
        torch.set_num_threads(n)
        outs.append(polyattn.flash_attention_varlen(q, k, v, cu_q, cu_k, causal=True))
    torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0][:6], dense, rtol=0, atol=0)  # the same bits as the dense call
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        polyattn.flash_attention_varlen(q, k, v, cu_q, torch.tensor([0, 6, 13, 21]))  # ends short of total_k
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        polyattn.flash_attention_varlen(q, k, v, cu_q.float(), cu_k)
    with pytest.raises(ValueError, match=r"argument 'k' has shape \[1, 22, 2, 8\]; expected 3 dimensions"):
        polyattn.flash_attention_varlen(q, k[None], v, cu_q, cu_k)
    with pytest.raises(ValueError, match="argument 'v' has dtype Double but 'q' has Float"):
        polyattn.flash_attention_varlen(q, k, v.double(), cu_q, cu_k)
    with pytest.raises(ValueError, match="flash_attention_varlen: argument 'sinks' has shape"):
        polyattn.flash_attention_varlen(q, k, v, cu_q, cu_k, sinks=torch.zeros(2, 2))
    # int32 offsets, as FlashAttention's varlen functions take them: the same call
    assert torch.equal(polyattn.flash_attention_varlen(q, k, v, cu_q.int(), cu_k.int(), causal=True), outs[0])


# ---- polynomial_attention ---------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(degree=4, causal=False), dict(degree=2, causal=True, scale=0.5, normalizer_bias=0.3),
                                dict(degree=4, causal=True, window=(1, 0), global_positions=[2])])
def test_polynomial_matches_reference_and_gradcheck(kw):
    q, k, v = problem()
    op = lambda q, k, v: polyattn.polynomial_attention(q, k, v, layout="bhnd", **kw)  # noqa: E731
    refkw = dict(degree=kw["degree"], scale=kw.get("scale", 1.0), bias=kw.get("normalizer_bias", 1.0),
                 causal=kw["causal"], window=kw.get("window", (-1, -1)),
                 global_positions=tuple(kw.get("global_positions", ())))
    check_against(op, lambda q, k, v: ref.polynomial_attention(q, k, v, **refkw), [q, k, v])
    assert torch.autograd.gradcheck(op, (q, k, v))


# ---- polysketch_attention and Sketch ----------------------------------------------------------

def as_sketch(leaves, degree, head_dim):
    return types.SimpleNamespace(leaves=list(leaves), degree=degree, packed=True, head_dim=head_dim)


@pytest.mark.parametrize("kw", [dict(causal=True), dict(causal=False), dict(causal=True, local_exact=True, block_size=3),
                                dict(causal=False, local_exact=True, block_size=4, scale=0.8, normalizer_bias=0.5)])
def test_polysketch_matches_reference_and_gradcheck(kw):
    q, k, v = problem()
    sk = polyattn.Sketch(3, degree=4, sketch_size=3, seed=5, dtype=D64)
    leaves = [t.detach().clone().requires_grad_() for t in sk.leaves]
    op = lambda q, k, v, *ls: polyattn.polysketch_attention(q, k, v, as_sketch(ls, 4, 3), layout="bhnd", **kw)  # noqa
    refkw = dict(causal=kw["causal"], local_exact=kw.get("local_exact", False), block=kw.get("block_size", 256),
                 scale=kw.get("scale", 1.0), bias=kw.get("normalizer_bias", 1.0))
    check_against(op, lambda q, k, v, *ls: ref.polysketch_attention(q, k, v, ls, 4, **refkw), [q, k, v, *leaves])
    assert torch.autograd.gradcheck(op, (q, k, v, *leaves))


def test_sketch_leaf_gradients_degree_8_against_autograd_through_plain_sketch():
    q, k, v = problem(nq=6, nk=6, h=2, hk=2, d=4, seed=3)
    sk = polyattn.Sketch(4, degree=8, sketch_size=3, seed=2, dtype=D64)
    assert len(sk.leaves) == 6 and all(isinstance(p, torch.nn.Parameter) for p in sk.leaves)
    dout = rand(2, 2, 6, 2, seed=4)
    (polyattn.polysketch_attention(q, k, v, sk, layout="bhnd", local_exact=True, block_size=2) * dout).sum().backward()
    plain = [p.detach().clone().requires_grad_() for p in sk.leaves]
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    expect = ref.polysketch_attention(qq, kk, vv, plain, 8, causal=True, local_exact=True, block=2)
    (expect * dout).sum().backward()
    for p, r in zip(sk.leaves, plain):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(q.grad, qq.grad, rtol=1e-10, atol=1e-12)


def test_sketch_draw_from_leaves_and_degree_2():
    a, b = polyattn.Sketch(5, degree=4, sketch_size=4, seed=9), polyattn.Sketch(5, degree=4, sketch_size=4, seed=9)
    assert [t.shape for t in a.leaves] == [(5, 4), (5, 4)] and a.leaves[0].dtype == torch.float32
    assert all(torch.equal(x, y) for x, y in zip(a.leaves, b.leaves))
    c = polyattn.Sketch.from_leaves([t.detach() for t in a.leaves])
    assert c.degree == 4 and c.head_dim == 5
    # degree 2 is the exact identity sketch: (scale q·k)² weights, i.e. polynomial attention of degree 2
    q, k, v = problem(nq=5, nk=5, hk=2)
    two = polyattn.Sketch(3, degree=2)
    assert len(two.leaves) == 0
    out = polyattn.polysketch_attention(q, k, v, two, causal=True, scale=0.6, layout="bhnd")
    torch.testing.assert_close(out, ref.polynomial_attention(q, k, v, degree=2, scale=0.6, causal=True),
                               rtol=1e-12, atol=1e-12)


# ---- sketched_attention and linear_attention --------------------------------------------------

@pytest.mark.parametrize("kw", [dict(causal=True), dict(causal=False, local_exact=True, block_size=3, degree=2, scale=0.9)])
def test_sketched_matches_reference_and_gradcheck(kw):
    q, k, v = problem()
    sq, skk = rand(2, 2, 7, 4, seed=11).requires_grad_(), rand(2, 1, 7, 4, seed=12).requires_grad_()
    op = lambda q, k, sq, sk, v: polyattn.sketched_attention(q, k, sq, sk, v, layout="bhnd", **kw)  # noqa: E731
    refkw = dict(causal=kw["causal"], local_exact=kw.get("local_exact", False), block=kw.get("block_size", 256),
                 degree=kw.get("degree", 4), scale=kw.get("scale", 1.0))
    check_against(op, lambda q, k, sq, sk, v: ref.sketched_attention(q, k, sq, sk, v, **refkw), [q, k, sq, skk, v])
    assert torch.autograd.gradcheck(op, (q, k, sq, skk, v))


@pytest.mark.parametrize("causal,bias", [(False, 0.0), (True, 0.5)])
def test_linear_matches_reference_and_gradcheck(causal, bias):
    pq = rand(2, 2, 7, 5, seed=21, positive=True).requires_grad_()
    pk = rand(2, 1, 7, 5, seed=22, positive=True).requires_grad_()
    v = rand(2, 1, 7, 3, seed=23).requires_grad_()
    op = lambda a, b, c: polyattn.linear_attention(a, b, c, causal=causal, normalizer_bias=bias, layout="bhnd")  # noqa
    check_against(op, lambda a, b, c: ref.linear_attention(a, b, c, causal, bias), [pq, pk, v])
    assert torch.autograd.gradcheck(op, (pq, pk, v))


# ---- layouts, strided views, half storage, threads ------------------------------------------

def test_strided_views_and_layouts_agree():
    qkv = rand(2, 9, 3, 2, 4, seed=31)  # a fused projection [B, N, 3, H, d]: q, k, v are strided views
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert not q.is_contiguous() and q.stride(-1) == 1
    out = polyattn.flash_attention(q, k, v, causal=True)
    torch.testing.assert_close(out, polyattn.flash_attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True),
                               rtol=0, atol=0)
    out_bhnd = polyattn.flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                        layout="bhnd")
    torch.testing.assert_close(out_bhnd.transpose(1, 2), out, rtol=0, atol=0)
    # an innermost dimension that is not contiguous is copied once, same result
    qt = q.contiguous().transpose(-1, -2).contiguous().transpose(-1, -2)
    assert qt.stride(-1) != 1
    torch.testing.assert_close(polyattn.flash_attention(qt, k, v, causal=True), out, rtol=0, atol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.02), (torch.float16, 0.002)])
def test_half_follows_fp32_of_the_rounded_inputs(dtype, tol):
    # outputs and gradients of bf16 / f16 storage against float64 autograd of the rounded inputs;
    # absolute tolerances about 4x the errors seen (bf16: 0.005 out, 0.015 dv; f16: 0.0005, 0.0015),
    # so f16 computed at bf16's precision would fail
    q, k, v = (t.detach() for t in problem(nq=40, nk=40, h=2, hk=1, d=8, dv=8, seed=41))
    qb, kb, vb = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out = polyattn.flash_attention(qb, kb, vb, causal=True, layout="bhnd")
    assert out.dtype == dtype
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (qb, kb, vb))
    expect = ref.softmax_attention(qd, kd, vd, causal=True)
    torch.testing.assert_close(out.double(), expect.detach(), rtol=0, atol=tol)
    dout = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    out.backward(dout.to(dtype))
    expect.backward(dout.to(dtype).double())
    for got, want in ((qb, qd), (kb, kd), (vb, vd)):
        assert got.grad.dtype == dtype
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=0, atol=2 * tol)
    if dtype != torch.bfloat16:
        return
    sk = polyattn.Sketch(8, degree=4, sketch_size=4)
    ps = polyattn.polysketch_attention(qb, kb, vb, sk, layout="bhnd")
    ps.float().sum().backward()
    assert sk.leaves[0].grad is not None and sk.leaves[0].grad.dtype == torch.float32


def test_same_bits_for_one_and_two_threads():
    before = torch.get_num_threads()
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        q, k, v = problem(nq=300, nk=300, h=2, hk=1, d=16, dv=16, seed=51)
        sk = polyattn.Sketch(16, degree=4, sketch_size=8, dtype=D64)
        out = polyattn.flash_attention(q, k, v, causal=True, layout="bhnd") + polyattn.polysketch_attention(
            q, k, v, sk, block_size=64, local_exact=True, layout="bhnd")
        out.pow(2).sum().backward()
        results.append([out.detach(), q.grad, k.grad, v.grad, sk.leaves[0].grad])
    torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---- PolySketchCache --------------------------------------------------------------------------

def test_cache_continues_causal_polysketch():
    q, k, v = (t.detach() for t in problem(nq=9, nk=9, h=2, hk=1, d=3, seed=61))
    sk = polyattn.Sketch(3, degree=4, sketch_size=3, dtype=D64)
    whole = polyattn.polysketch_attention(bnhd(q), bnhd(k), bnhd(v), sk, block_size=4, local_exact=True)
    cache = polyattn.PolySketchCache(sk, batch=2, kv_heads=1, value_dim=2, block_size=4, local_exact=True, dtype=D64)
    parts = []
    for lo, hi in ((0, 5), (5, 6), (6, 9)):
        parts.append(cache.forward(bnhd(q[:, :, lo:hi]), bnhd(k[:, :, lo:hi]), bnhd(v[:, :, lo:hi])))
    assert len(cache) == 9
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-12, atol=1e-12)


# ---- bad input -------------------------------------------------------------------------------

def test_bad_inputs_raise_value_error_with_polyattn_message():
    q, k, v = (t.detach() for t in problem())
    with pytest.raises(ValueError, match=r"flash_attention: .*'k' has shape \[2, 1, 7, 2\]"):
        polyattn.flash_attention(q, k[..., :2], v, layout="bhnd")
    with pytest.raises(ValueError, match=r"polynomial_attention.*degree"):
        polyattn.polynomial_attention(q, k, v, degree=3, layout="bhnd")
    with pytest.raises(ValueError, match=r"polyattn.flash_attention: argument 'k' has dtype Float but 'q' has Double"):
        polyattn.flash_attention(q, k.float(), v)
    with pytest.raises(ValueError, match=r"argument 'v' has shape \[1, 7, 2\]; expected 4 dimensions"):
        polyattn.flash_attention(q, k, v[0])
    with pytest.raises(ValueError, match=r"layout"):
        polyattn.flash_attention(q, k, v, layout="nhd")
    with pytest.raises(ValueError, match=r"polysketch_attention.*head dim"):
        polyattn.polysketch_attention(q, k, v, polyattn.Sketch(4, sketch_size=3, dtype=D64), layout="bhnd")
    with pytest.raises(ValueError, match=r"from_matrices"):
        polyattn.Sketch.from_leaves([torch.zeros(3, 4), torch.zeros(3, 5)])
    with pytest.raises(ValueError, match=r"sketched_attention.*'sk'"):
        polyattn.sketched_attention(q, k, rand(2, 2, 7, 4), rand(2, 1, 7, 3), v, layout="bhnd")
    with pytest.raises(ValueError, match=r"linear_attention.*'phi_k'"):
        polyattn.linear_attention(q, k[..., :2], v, layout="bhnd")
    with pytest.raises(ValueError, match=r"head count"):  # GQA needs H % Hk == 0
        polyattn.flash_attention(rand(1, 3, 4, 3), rand(1, 2, 4, 3), rand(1, 2, 4, 3), layout="bhnd")


def test_bad_call_leaves_the_cache_untouched():
    sk = polyattn.Sketch(3, degree=4, sketch_size=3, dtype=D64)
    q, k, v = (bnhd(t.detach()) for t in problem(nq=6, nk=6, h=2, hk=1, seed=71))
    cache, fresh = (polyattn.PolySketchCache(sk, 2, 1, 2, block_size=4, dtype=D64) for _ in range(2))
    cache.forward(q[:, :3], k[:, :3], v[:, :3])
    fresh.forward(q[:, :3], k[:, :3], v[:, :3])
    with pytest.raises(ValueError, match=r"polysketch_cache::forward"):
        cache.forward(q[:, 3:], k[:, 3:, :, :2], v[:, 3:])
    with pytest.raises(ValueError, match=r"PolySketchCache.forward: argument 'k' has dtype Float"):
        cache.forward(q[:, 3:], k[:, 3:].float(), v[:, 3:])
    assert len(cache) == 3
    assert torch.equal(cache.forward(q[:, 3:], k[:, 3:], v[:, 3:]), fresh.forward(q[:, 3:], k[:, 3:], v[:, 3:]))
