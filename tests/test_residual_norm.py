"""ops.residual_norm: the C++ residual add + LayerNorm pass equals PyTorch's add (or DropPath
index_add), gather and LayerNorm, values and gradients; and the blocks that carry the residual
stream to it (`model.attention.Stream`, `run_blocks`) equal the blocks applied one by one."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from olmoearth_fast.model.attention import Block, Segments, run_blocks
from olmoearth_fast.model.plan import BranchDrop, keep_factor
from olmoearth_fast.ops import residual_norm as rn

needs_kernel = pytest.mark.skipif(not rn.kernel_available(), reason="this CPU has no AVX-512F")


@pytest.fixture(autouse=True)
def _auto_kernels(monkeypatch):
    monkeypatch.delenv("OLMOEARTH_FAST_KERNELS", raising=False)


def _rows(n, k, g):
    return torch.randperm(n, generator=g)[:k].sort().values


CASES = [  # (T, D, rows of r, rows of y, alpha)
    (50, 192, None, None, 1.0),
    (50, 40, 20, None, keep_factor(0.1)),
    (64, 128, 30, 25, 0.0),
    (37, 768, None, 25, keep_factor(0.1)),
    (33, 16, 33, 33, 2.5),
]


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("stream_used", [True, False])
@pytest.mark.parametrize("with_r_bias", [False, True])
def test_values_and_gradients_equal_pytorch(case, stream_used, with_r_bias):
    t, d, nr, ny, alpha = case
    g = torch.Generator().manual_seed(t + d)
    r_rows = None if nr is None else _rows(t, nr, g)
    y_rows = None if ny is None else _rows(t, ny, g)
    x = torch.randn(t, d, generator=g, requires_grad=True)
    r = (2 * torch.randn(t if nr is None else nr, d, generator=g)).requires_grad_()
    w = torch.randn(d, generator=g, requires_grad=True)
    b = torch.randn(d, generator=g, requires_grad=True)
    ds, dy = torch.randn(t, d, generator=g), torch.randn(t if ny is None else ny, d, generator=g)
    rb = torch.randn(d, generator=g, requires_grad=True) if with_r_bias else None
    assert rn.uses_kernel(x)
    res = []
    for f in (rn.residual_norm, rn.residual_norm_ref):
        s, y = f(x, r, w, b, 1e-5, r_rows, alpha, y_rows, rb)
        outs, grads = ([s, y], [ds, dy]) if stream_used else ([y], [dy])
        res.append((s, y, *torch.autograd.grad(outs, [x, r, w, b] + ([rb] if with_r_bias else []), grads)))
    (s, y, dx, dr, dw, db, *drb), (s0, y0, dx0, dr0, dw0, db0, *drb0) = res
    assert torch.equal(s, s0)  # the bias added, the product rounded, then added: the same bits
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dr, dr0, rtol=1e-5, atol=1e-5)
    rows = y0.shape[0]  # column sums, summed in another order
    torch.testing.assert_close(dw, dw0, rtol=1e-5, atol=1e-6 * rows)
    torch.testing.assert_close(db, db0, rtol=1e-5, atol=1e-6 * rows)
    if with_r_bias:  # the branch bias's gradient: the column sums of dr
        torch.testing.assert_close(drb[0], drb0[0], rtol=1e-5, atol=1e-6 * dr0.shape[0])
    if alpha == 0.0:
        assert torch.equal(dr, torch.zeros_like(dr))


@needs_kernel
def test_weight_gradients_are_the_same_for_any_thread_count():
    g = torch.Generator().manual_seed(1)
    x, r = torch.randn(1000, 96, generator=g), torch.randn(600, 96, generator=g)
    rows, y_rows = _rows(1000, 600, g), _rows(1000, 700, g)
    w, b, rb = torch.randn(96, generator=g), torch.randn(96, generator=g), torch.randn(96, generator=g)
    ds, dy = torch.randn(1000, 96, generator=g), torch.randn(700, 96, generator=g)
    ops = torch.ops.olmoearth_fast
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            s, y, mean, rstd = ops.residual_norm_fwd(x, r, rb, rows, 1.5, w, b, y_rows, 1e-5)
            results.append((s, y, *ops.residual_norm_bwd(ds, dy, s, mean, rstd, w, rows, y_rows, 1.5, 600, True)))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, c) for a, c in zip(other, results[0]))


def test_keep_factor_is_pytorchs_fp32_division():
    for rate in (0.0, 0.05, 0.1, 0.2, 0.3, 1 / 3, 0.5, 0.9):
        assert keep_factor(rate) == (torch.ones((), dtype=torch.float32) / (1.0 - rate)).item()


def test_bf16_branch_factor_rounds_once_as_the_reference_on_cuda():
    """Under bf16 autocast (the GPU recipe) a kept branch's ``r·(1/(1 − rate))`` is computed in
    fp32 and rounded to bf16 once: the reference's ``r.div(1 − rate)`` on CUDA, which multiplies
    by the fp32 reciprocal. A factor rounded to bf16 first (1/0.9 → 1.109375) gives other bits."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=g)
    r = torch.randn(4096, 64, generator=g).bfloat16()
    f = keep_factor(0.1)
    want = x + (r.float() * f).bfloat16().float()
    assert torch.equal(rn.residual_add(x, r, None, f), want)
    rows = torch.arange(0, 4096, 2)
    assert torch.equal(rn.residual_add(x, r[rows], rows, f), x.index_add(0, rows, (r[rows].float() * f).bfloat16()
                                                                         .float()))
    assert not torch.equal(x + r * torch.tensor(f).bfloat16(), want)  # the factor in bf16 first: other bits


def test_drop_path_is_the_references_ops_in_bf16():
    """The per-sample DropPath (no host factor) is the reference's ``x.div(1 − rate) · keep``,
    also in bf16, where its CPU kernel divides in fp32 and rounds once."""
    from olmoearth_fast.model.attention import drop_path

    g = torch.Generator().manual_seed(1)
    seg = Segments.from_cu_seqlens(torch.tensor([0, 700, 1500, 3000]), 3000, 1500)
    keep = torch.tensor([True, False, True])
    x = torch.randn(3000, 32, generator=g).bfloat16()
    got = drop_path(x, seg, 0.1, True, keep)
    want = torch.cat([(x[:700].float() / np.float32(0.9)).bfloat16(), torch.zeros(800, 32, dtype=torch.bfloat16),
                      (x[1500:].float() / np.float32(0.9)).bfloat16()])
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_which_path(monkeypatch):
    x, r, w, b = torch.randn(6, 8), torch.randn(6, 8), torch.ones(8), torch.zeros(8)
    assert rn.uses_kernel(x) == rn.kernel_available()
    assert not rn.uses_kernel(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not rn.uses_kernel(x)
    monkeypatch.setenv("OLMOEARTH_FAST_KERNELS", "pytorch")
    assert not rn.uses_kernel(x)
    monkeypatch.delenv("OLMOEARTH_FAST_KERNELS")
    s, y = rn.residual_norm(x.double(), r.double(), w.double(), b.double(), 1e-5, alpha=0.5)
    torch.testing.assert_close(s, x.double() + 0.5 * r.double())
    torch.testing.assert_close(y, F.layer_norm(s, (8,), w.double(), b.double()))
    s, y = rn.residual_norm(x, None, w, b, 1e-5, y_rows=torch.tensor([1, 4]))  # no branch: s is x
    assert s is x
    torch.testing.assert_close(y, F.layer_norm(x[[1, 4]], (8,), w, b))


def test_bad_shapes_are_named():
    x, w, b = torch.randn(6, 8), torch.ones(8), torch.zeros(8)
    with pytest.raises(ValueError, match=r"residual_norm: x \(6, 8\), r \(5, 8\) \(every row\)"):
        rn.residual_norm(x, torch.randn(5, 8), w, b, 1e-5)
    with pytest.raises(ValueError, match=r"r \(3, 8\) \(2 rows\)"):
        rn.residual_norm(x, torch.randn(3, 8), w, b, 1e-5, r_rows=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"weight \(7,\)"):
        rn.residual_norm(x, torch.randn(6, 8), torch.ones(7), b, 1e-5)
    with pytest.raises(ValueError, match=r"r_bias \(9,\) do not fit"):
        rn.residual_norm(x, torch.randn(6, 8), w, b, 1e-5, r_bias=torch.zeros(9))
    with pytest.raises(ValueError, match=r"r None .*r_bias \(8,\) do not fit .*r_bias \[D\] with r"):
        rn.residual_norm(x, None, w, b, 1e-5, r_bias=torch.zeros(8))


@needs_kernel
def test_bad_rows_are_named():
    x, r, w, b = torch.randn(6, 8), torch.randn(2, 8), torch.ones(8), torch.zeros(8)
    with pytest.raises(RuntimeError, match=r"r_rows must hold distinct rows in \[0, 6\), got 3 at 1"):
        rn.residual_norm(x, r, w, b, 1e-5, r_rows=torch.tensor([3, 3]))
    with pytest.raises(RuntimeError, match=r"y_rows must hold distinct rows in \[0, 6\), got 6 at 0"):
        rn.residual_norm(x, r, w, b, 1e-5, r_rows=torch.tensor([0, 1]), y_rows=torch.tensor([6]))


def _segments(lengths):
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    seg = Segments.from_cu_seqlens(cu, int(cu[-1]), max(lengths))
    seg.host()
    return seg


def _three_blocks(random_biases=False):
    """Three blocks (DropPath 0.3) and a final norm in training, host draws per block and branch
    that keep some of 5 samples (one of them empty), all, or none; an input, its gradient, the
    parameters. ``random_biases``: biases and norms away from their zero / one init."""
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(Block(32, 2, 2.0, drop_path=0.3) for _ in range(3)).train()
    if random_biases:
        with torch.no_grad():
            for p in blocks.parameters():
                if p.dim() == 1:
                    p.normal_()
    norm = torch.nn.LayerNorm(32)
    seg = _segments([5, 0, 7, 3, 4])
    keeps = [[1, 0, 1, 0, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 1, 1, 0, 1], [1, 1, 0, 1, 1], [0, 0, 1, 0, 0]]
    drops = [tuple(BranchDrop.from_keep(seg, torch.tensor(k, dtype=torch.bool), 0.3) for k in keeps[2 * i:2 * i + 2])
             for i in range(3)]
    x = torch.randn(19, 32, requires_grad=True)
    grad = torch.randn(19, 32)
    return blocks, norm, seg, drops, x, grad, [x, *blocks.parameters(), *norm.parameters()]


@pytest.mark.parametrize("kernels", ["auto", "pytorch"])
def test_blocks_carrying_the_stream_equal_blocks_one_by_one(kernels, monkeypatch):
    """`run_blocks` (the residual add left to the next LayerNorm) gives what the blocks called
    one after the other, then the final norm, give: values and every gradient, with host DropPath
    draws that keep some samples, all of them, or none, and for cross-attention blocks."""
    monkeypatch.setenv("OLMOEARTH_FAST_KERNELS", kernels)
    blocks, norm, seg, drops, x, grad, params = _three_blocks()
    got = run_blocks(blocks, x, seg, drops=drops, norm=norm)
    got_g = torch.autograd.grad(got, params, grad)
    want = x
    for blk, d in zip(blocks, drops):
        want = blk(want, seg, drops=d)
    want = norm(want)
    want_g = torch.autograd.grad(want, params, grad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, c in zip(got_g, want_g):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    # cross-attention blocks (the decoder's), no DropPath, no final norm
    ctx, ctx_seg = torch.randn(12, 32, requires_grad=True), _segments([2, 3, 1, 4, 2])
    blocks.eval()
    got = run_blocks(blocks, x, seg, ctx, ctx_seg)
    want = x
    for blk in blocks:
        want = blk(want, seg, ctx, ctx_seg)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, c in zip(torch.autograd.grad(got, [x, ctx], grad), torch.autograd.grad(want, [x, ctx], grad)):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_branch_output_bias_added_by_the_next_norm(monkeypatch):
    """On the C++ path the attention's output projection and fc2 run without their bias, which
    the next `residual_norm` adds (and sums the gradient of): the blocks' values and every
    gradient equal the PyTorch path's (each Linear with its bias), with host DropPath draws that
    keep some samples, all, or none (a zero gradient for the dropped branch's bias, not None)."""
    import olmoearth_fast.model.attention as attention

    blocks, norm, seg, drops, x, grad, params = _three_blocks(random_biases=True)
    out_weights = {id(b.attn.proj.weight) for b in blocks} | {id(b.mlp.fc2.weight) for b in blocks}
    biased = []
    linear = attention.linear

    def recording(inp, weight, bias=None):
        if id(weight) in out_weights:
            biased.append(bias is not None)
        return linear(inp, weight, bias)

    monkeypatch.setattr(attention, "linear", recording)
    results = []
    for kernels in ("auto", "pytorch"):
        monkeypatch.setenv("OLMOEARTH_FAST_KERNELS", kernels)
        biased.clear()
        out = run_blocks(blocks, x, seg, drops=drops, norm=norm)
        results.append((out, torch.autograd.grad(out, params, grad)))
        assert biased == [kernels == "pytorch"] * 6
    (got, got_g), (want, want_g) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, c in zip(got_g, want_g):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    dropped = next(i for i, p in enumerate(params) if p is blocks[1].attn.proj.bias)  # block 1's attention: none keep it
    assert torch.equal(got_g[dropped], torch.zeros(32))
