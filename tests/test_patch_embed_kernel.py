"""Fused Triton patch-embed kernel (kernels/patch_embed.py) against the reference path.

Without CUDA the kernel runs under TRITON_INTERPRET=1 (set by conftest) in fp32 on CPU; with
CUDA the same fp32 tests run compiled (tf32x3 dots) and the `gpu` tests add bf16. Tensors go
where the kernels run (the `kernel_device` fixture); the fp32 reference's cuDNN convolution
runs in IEEE fp32 there (conftest turns TF32 off: its ~5e-4 error exceeds RTOL).

Tolerance (see tests/test_patch_embed.py): |ours - ref| <= 1e-4 |ref| + 1e-5 S per entry, with
S = sum |terms| (`patch_embed_abs_scale`), plus a plain 1e-4 per-token relative norm on tokens
without a missing pixel in reach. -99999 pixels make polluted tokens sums of ~1e5-sized terms
that cancel; fp32 rounding of the *reference itself* is ~sqrt(n) eps S there, so a pure
relative check would measure the reference's rounding, not our correctness. A wrong tap or a
missed border renormalisation moves an entry by >= 1e-3 S, far outside the bound.

The acceptance grid (p 1..8 x hw_p {1,2,5,12} x C {1,4,10,12,30} x T {1,3} x dropout) is
sampled: a full (p, hw_p, dropout) sweep at C=4, and every C x T at eight (p, hw_p) pairs with
dropout alternating, always with missing pixels; ~45 s under the interpreter on 2 cores.
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")

from olmoearth_fast.kernels.patch_embed import patch_embed_bwd_effective  # noqa: E402

from olmoearth_fast.ops.band_dropout import band_dropout_keep  # noqa: E402
from olmoearth_fast.ops.patch_embed import patch_embed, patch_embed_ref  # noqa: E402
from olmoearth_fast.ops.patch_embed_plan import effective_plan, effective_weight_grad  # noqa: E402
from tests.helpers.patch_embed_bounds import patch_embed_abs_scale  # noqa: E402

MISSING = -99999.0
RTOL, ATOL_SCALE = 1e-4, 1e-5

# Full patch-size sweep at C=4 (T=3 on small grids, T=1 at hw_p=12 to bound interpreter time).
SWEEP_P = [(p, hw, 4, 3 if hw <= 5 else 1, dropout)
           for p in range(1, 9) for hw in (1, 2, 5, 12) for dropout in (False, True)]
# Every C x T, spread over patch sizes and grid sizes, dropout alternating.
_PAIRS = [(1, 5), (3, 2), (6, 1), (8, 2), (2, 12), (7, 2), (4, 5), (5, 1)]
SWEEP_C = [(p, hw, c, t, i % 2 == 1)
           for i, ((c, t), (p, hw)) in enumerate(zip(itertools.product((1, 10, 12, 30), (1, 3)),
                                                      _PAIRS))]


def make_case(p, hw, C, T, dropout, *, device, B=2, D=16, seed=0, dtype=torch.float32):
    """Channels-last input (H = hw*p, W = (hw+1)*p: non-square) with 5% missing pixels, a
    band gather from C+2 bands, an optional keep, and reference-init weights."""
    g = torch.Generator().manual_seed(seed)
    H, W = hw * p, (hw + 1) * p
    x = torch.randn(B, H, W, T, C + 2, generator=g)
    miss = torch.rand(B, H, W, T, 1, generator=g) < 0.05
    x = torch.where(miss, torch.full_like(x, MISSING), x)
    band_index = torch.randperm(C + 2, generator=g)[:C]
    keep = band_dropout_keep(B, C, 0.5, generator=g) if dropout else None
    bound = 1 / (64 * C) ** 0.5
    w = (torch.rand(D, C, 8, 8, generator=g) * 2 - 1) * bound
    b = (torch.rand(D, generator=g) * 2 - 1) * bound
    grad = torch.randn(B, hw, hw + 1, T, D, generator=g)
    to = dict(device=device)
    return (x.to(dtype=dtype, **to), w.to(**to).requires_grad_(), b.to(**to).requires_grad_(),
            None if keep is None else keep.to(**to), band_index.to(**to), grad.to(**to))


def assert_mixed_close(ours, ref, scale, what):
    err = (ours.double() - ref.double()).abs()
    bound = RTOL * ref.double().abs() + ATOL_SCALE * scale
    if not bool((err <= bound).all()):
        worst = (err / bound).nan_to_num(posinf=float("inf")).max().item()
        raise AssertionError(f"{what}: error reaches {worst:.3g}x the mixed bound")


def check_against_ref(p, hw, C, T, dropout, device, seed=0):
    x, w, b, keep, bi, grad = make_case(p, hw, C, T, dropout, seed=seed, device=device)
    ref = patch_embed_ref(x, w, b, p, keep, bi)
    gw_ref, gb_ref = torch.autograd.grad(ref, (w, b), grad)
    out = patch_embed(x, w, b, p, keep, bi, impl="triton")
    gw, gb = torch.autograd.grad(out, (w, b), grad)
    s_out, s_w = patch_embed_abs_scale(x, w, p, keep, bi, grad)
    tag = f"p={p} hw={hw} C={C} T={T} dropout={dropout}"
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert_mixed_close(out, ref, s_out, f"out {tag}")
    assert_mixed_close(gw, gw_ref, s_w, f"dW {tag}")
    assert_mixed_close(gb, gb_ref, grad.double().abs().sum((0, 1, 2, 3)), f"db {tag}")
    # Tokens whose receptive field holds no missing pixel: plain 1e-4 relative per token.
    ind = (x == MISSING).to(x.dtype)
    polluted = patch_embed_abs_scale(ind, w, p, keep, bi)[0].amax(-1) > 0
    diff = (out - ref).double().norm(dim=-1)
    clean_ok = diff <= RTOL * ref.double().norm(dim=-1) + 1e-12
    assert bool(clean_ok[~polluted].all()), f"clean tokens {tag}"


@pytest.mark.parametrize("p,hw,C,T,dropout", SWEEP_P)
def test_kernel_patch_size_sweep(p, hw, C, T, dropout, kernel_device):
    check_against_ref(p, hw, C, T, dropout, kernel_device, seed=p * 100 + hw)


@pytest.mark.parametrize("p,hw,C,T,dropout", SWEEP_C)
def test_kernel_band_time_sweep(p, hw, C, T, dropout, kernel_device):
    check_against_ref(p, hw, C, T, dropout, kernel_device, seed=C * 10 + T)


def test_kernel_clean_data_relative(kernel_device):
    """No missing pixels: output and weight gradient within 1e-4 relative, no scale term."""
    for p, hw in ((1, 5), (3, 2), (8, 2)):
        x, w, b, keep, bi, grad = make_case(p, hw, 5, 2, True, seed=p, device=kernel_device)
        x = torch.where(x == MISSING, torch.zeros_like(x), x)
        ref = patch_embed_ref(x, w, b, p, keep, bi)
        out = patch_embed(x, w, b, p, keep, bi, impl="triton")
        torch.testing.assert_close(out, ref, rtol=RTOL, atol=1e-6)
        gw_ref, = torch.autograd.grad(ref, w, grad)
        gw, = torch.autograd.grad(out, w, grad)
        assert (gw - gw_ref).norm() <= RTOL * gw_ref.norm()


def test_kernel_strided_input_and_all_missing_sample(kernel_device):
    """A non-contiguous view is read in place; a fully missing sample is just large values."""
    p, hw = 2, 3
    x, w, b, keep, bi, grad = make_case(p, hw, 4, 2, True, seed=7, device=kernel_device)
    big = torch.randn(x.shape[0], x.shape[1] + 2, 2 * x.shape[2], x.shape[3], 9, device=kernel_device)
    view = big[:, 1:-1, ::2, :, 2:8]  # strided in H, W and C
    view[0] = MISSING
    ref = patch_embed_ref(view, w, b, p, keep, bi)
    out = patch_embed(view, w, b, p, keep, bi, impl="triton")
    assert_mixed_close(out, ref, patch_embed_abs_scale(view, w, p, keep, bi)[0], "strided")


def test_kernel_64bit_offsets(monkeypatch, kernel_device):
    """The 64-bit addressing variant (inputs of >= 2**31 elements) computes the same."""
    import olmoearth_fast.kernels.patch_embed as kernel

    x, w, b, keep, bi, grad = make_case(3, 2, 4, 2, True, seed=11, device=kernel_device)
    out32 = patch_embed(x, w, b, 3, keep, bi, impl="triton")
    gw32, = torch.autograd.grad(out32, w, grad)
    monkeypatch.setattr(kernel, "_IDX32_LIMIT", 0)
    out64 = patch_embed(x, w, b, 3, keep, bi, impl="triton")
    gw64, = torch.autograd.grad(out64, w, grad)
    torch.testing.assert_close(out64, out32, rtol=0, atol=0)
    torch.testing.assert_close(gw64, gw32, rtol=0, atol=0)


def test_kernel_backward_chunking(kernel_device):
    """Splitting a class's token reduction into several chunks gives the same dE."""
    p, hw = 1, 5
    x, w, b, keep, bi, grad = make_case(p, hw, 3, 3, True, seed=3, device=kernel_device)
    x = torch.where(x == MISSING, torch.zeros_like(x), x)
    plan = effective_plan(p, x.shape[1], x.shape[2])
    whole = patch_embed_bwd_effective(grad, x, plan, 3, keep, bi, chunk_tokens=10**6)
    split = patch_embed_bwd_effective(grad, x, plan, 3, keep, bi, chunk_tokens=64)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    gw = effective_weight_grad(split, plan)
    ref = patch_embed_ref(x, w, b, p, keep, bi)
    gw_ref, = torch.autograd.grad(ref, w, grad)
    assert (gw - gw_ref).norm() <= RTOL * gw_ref.norm()


def test_kernel_empty_batch(kernel_device):
    x, w, b, keep, bi, grad = make_case(2, 2, 3, 1, False, B=0, device=kernel_device)
    out = patch_embed(x, w, b, 2, None, bi, impl="triton")
    assert out.shape == (0, 2, 3, 1, 16)
    gw, gb = torch.autograd.grad(out.sum(), (w, b), allow_unused=True)
    assert gw is None or bool((gw == 0).all())


def test_kernel_opcheck(kernel_device):
    op = torch.ops.olmoearth_fast.patch_embed.default
    x, w, b, keep, bi, _ = make_case(2, 1, 3, 2, True, B=2, D=16, device=kernel_device)
    torch.library.opcheck(op, (x, w, b, 2, keep, bi, "triton"))
    torch.library.opcheck(op, (x[..., :3], w, None, 2, None, None, "triton"))


def test_kernel_compile_fullgraph(kernel_device):
    x, w, b, keep, bi, grad = make_case(3, 2, 3, 1, True, device=kernel_device)

    def step(x, w, b, keep, bi):
        return (patch_embed(x, w, b, 3, keep, bi, impl="triton") * grad).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    ge = torch.autograd.grad(step(x, w, b, keep, bi), (w, b))
    gc = torch.autograd.grad(compiled(x, w, b, keep, bi), (w, b))
    for a, e in zip(gc, ge):
        torch.testing.assert_close(a, e)


# ------------------------------------------------------------------ half precision


def _scaled_err(val, gt, scale):
    return ((val.double() - gt).abs() / (scale + 1e-30)).max().item()


# bf16 only on a GPU: the interpreter stores bf16 as uint16 and computes on the bits. fp16 runs
# the same half-precision code path (casts, keep rounding, fp32 accumulation, output rounding)
# under the interpreter too.
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=pytest.mark.gpu), torch.float16],
                         ids=["bf16", "fp16"])
@pytest.mark.parametrize("p", range(1, 9))
@pytest.mark.parametrize("hw,C", [(1, 4), (5, 12), (12, 12)])
def test_kernel_half_vs_pytorch_half(p, hw, C, dtype, kernel_device):
    """bf16 / fp16: error vs an fp64 reference <= 2x plain PyTorch's error in the same dtype
    (+ a tiny slack).

    Errors are measured per entry in units of S (sum |terms|), so entries polluted by
    missing pixels and clean ones weigh alike.
    """
    x, w, b, keep, bi, grad = make_case(p, hw, C, 3, True, B=4, D=64, seed=p + hw,
                                        device=kernel_device)
    if dtype == torch.float16:  # -99999 overflows fp16 (and the resize rings): a smaller outlier
        x = torch.where(x == MISSING, torch.full_like(x, -3000.0), x)
    x16 = x.to(dtype)
    xd = x16.double()  # the ground truth sees the same (bf16-rounded) pixels
    wd, bd = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    gt = patch_embed_ref(xd, wd, bd, p, keep, bi)
    gw_gt, gb_gt = torch.autograd.grad(gt, (wd, bd), grad.double())
    w16, b16 = w.detach().to(dtype).requires_grad_(), b.detach().to(dtype).requires_grad_()
    pt = patch_embed_ref(x16, w16, b16, p, keep, bi)
    gw_pt, gb_pt = torch.autograd.grad(pt, (w16, b16), grad.to(dtype))
    ours = patch_embed(x16, w, b, p, keep, bi, impl="triton")
    assert ours.dtype == dtype
    gw, gb = torch.autograd.grad(ours, (w, b), grad.to(dtype))
    s_out, s_w = patch_embed_abs_scale(xd, wd, p, keep, bi, grad)
    slack = 1e-5
    assert _scaled_err(ours, gt, s_out) <= 2 * _scaled_err(pt, gt, s_out) + slack
    assert _scaled_err(gw, gw_gt, s_w) <= 2 * _scaled_err(gw_pt, gw_gt, s_w) + slack
    gb_scale = grad.double().abs().sum((0, 1, 2, 3))
    assert _scaled_err(gb, gb_gt, gb_scale) <= 2 * _scaled_err(gb_pt, gb_gt, gb_scale) + slack


@pytest.mark.gpu
def test_kernel_auto_dispatch_is_triton_on_cuda():
    x, w, b, keep, bi, grad = make_case(2, 5, 12, 2, True, device="cuda")
    torch.testing.assert_close(patch_embed(x, w, b, 2, keep, bi),
                               patch_embed(x, w, b, 2, keep, bi, impl="triton"), rtol=0, atol=0)


# ------------------------------------------------------------------ launch limits, layouts


def test_forward_grid_fits_cuda_limits_at_any_size():
    """The forward grid is one axis of (M-tile, D-tile) programs: 16 M tokens at p = 1 (which
    put 262144 M-tiles on axis y, limit 65535, before) launch; absurd sizes raise clearly."""
    import olmoearth_fast.kernels.patch_embed as kernel

    for block_m in (64, 128):
        tiles = 16 * 2**20 // block_m
        grid = kernel._fwd_grid(768, tiles, block_m, 128)
        assert len(grid) == 1 and grid[0] == 6 * tiles <= 2**31 - 1
    with pytest.raises(ValueError, match="too large for one launch"):
        kernel._fwd_grid(768, 2**30, 64, 128)


def test_backward_chunks_fit_grid_axis_z():
    import olmoearth_fast.kernels.patch_embed as kernel

    for n_tokens, nq, chunk_tokens in ((10**9, 25, 64), (5 * 10**6, 9, 1), (1000, 1, 10**6)):
        chunk = kernel._bwd_chunk(n_tokens, nq, 32, chunk_tokens)
        assert chunk % 32 == 0 and chunk >= chunk_tokens
        assert n_tokens // chunk + nq <= 65535  # the most chunks the classes can need
        assert kernel._bwd_grid(768, 300, n_tokens // chunk + nq, 128, 128)[2] <= 65535
    with pytest.raises(ValueError, match="exceeds CUDA's limits"):
        kernel._bwd_grid(768, 300, 70000, 128, 128)


def test_kernel_strided_band_index_and_bias(kernel_device):
    """band_index and bias are read at ptr + i: strided views must give the contiguous result
    (a band_index[::2] view used to be read as if contiguous: the wrong bands)."""
    x, w, b, keep, bi, grad = make_case(2, 3, 4, 2, True, seed=13, device=kernel_device)
    bi_view = torch.stack([bi, bi.flip(0)], 1)[:, 0]  # stride 2, same values
    b_view = torch.stack([b.detach(), -b.detach()], 1)[:, 0].requires_grad_()
    assert not bi_view.is_contiguous() and not b_view.is_contiguous()
    out = patch_embed(x, w, b_view, 2, keep, bi_view, impl="triton")
    want = patch_embed(x, w, b, 2, keep, bi, impl="triton")
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    gw, = torch.autograd.grad(out, w, grad)
    gw_want, = torch.autograd.grad(want, w, grad)
    torch.testing.assert_close(gw, gw_want, rtol=0, atol=0)


def test_kernel_backward_reduction_is_ordered(monkeypatch, kernel_device):
    """The chunk partials are summed by the ordered reduction kernel, not by `index_add_`
    (atomic on CUDA, hence run-to-run nondeterministic there): with index_add_ disabled the
    backward runs, and its dE equals an in-order fp32 sum of the partials bit for bit."""
    import olmoearth_fast.kernels.patch_embed as kernel

    p, hw = 1, 12  # the interior class has 2 x 3 x 8 x 9 = 432 tokens: 7 chunks of 64
    x, w, b, keep, bi, grad = make_case(p, hw, 3, 3, True, seed=3, device=kernel_device)
    plan = effective_plan(p, x.shape[1], x.shape[2])
    parts = {}
    real_empty = torch.empty

    def spy_empty(*shape, **kw):  # keep a handle on the partials buffer
        t = real_empty(*shape, **kw)
        parts.setdefault("part", t)
        return t

    def no_index_add(*a, **kw):
        raise AssertionError("index_add_ in the patch-embed backward")

    monkeypatch.setattr(torch.Tensor, "index_add_", no_index_add)
    monkeypatch.setattr(kernel.torch, "empty", spy_empty)
    got = patch_embed_bwd_effective(grad, x, plan, 3, keep, bi, chunk_tokens=64)
    monkeypatch.undo()
    part = parts["part"]
    cfg = kernel._config(x.dtype, plan.taps**2 * 3, grad.shape[-1], backward=True)
    chunk = kernel._bwd_chunk(grad[..., 0].numel(), plan.num_classes, cfg["BLOCK_M"], 64)
    _, first = kernel._chunk_table(plan, x.shape[0], x.shape[3], cfg["BLOCK_M"], chunk, x.device)
    first = first.tolist()
    assert max(b - a for a, b in zip(first, first[1:])) > 1  # some class has several chunks
    want = torch.zeros(plan.num_classes, *part.shape[1:], device=part.device)
    for q in range(plan.num_classes):
        for c in range(first[q], first[q + 1]):
            want[q] += part[c]
    assert torch.equal(got.reshape(want.shape), want)


def test_kernel_ignores_the_callers_autocast(kernel_device):
    """Under a bf16 autocast the Triton path's effective weights stay fp32: output and weight
    gradient equal those without autocast (CPU autocast here; the same code runs under CUDA's)."""
    x, w, b, keep, bi, grad = make_case(1, 3, 4, 2, True, seed=17, device=kernel_device)
    want = patch_embed(x, w, b, 1, keep, bi, impl="triton")
    gw_want, = torch.autograd.grad(want, w, grad)
    with torch.autocast(kernel_device, dtype=torch.bfloat16):
        got = patch_embed(x, w, b, 1, keep, bi, impl="triton")
        gw, = torch.autograd.grad(got, w, grad)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(gw, gw_want, rtol=0, atol=0)
