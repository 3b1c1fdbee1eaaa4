"""Tests for olmoearth_fast.ops.patch_embed: reference parity, effective path, band dropout, op.

Tolerances near missing pixels. A -99999 pixel enters the resize and the conv as an ordinary
value (the reference does the same), so a polluted token sums terms of ~1e5 that may cancel
to a small result. Float32 rounding of *either* implementation is then ~sqrt(n)*eps times
sum |term| (n = 64*C terms), which can exceed 1e-4 of the (small) result. The checks
therefore bound each error by rtol*|ref| + atol_scale*S, where S = sum |term| for that entry
(`patch_embed_abs_scale`): S equals ~|ref| for clean tokens, so the check stays a ~1e-4
relative one there, and S ~ 1e5 for polluted ones. Clean tokens (no missing pixel in their
receptive field) are additionally checked with a plain per-token relative norm of 1e-4.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from olmoearth_fast.ops.band_dropout import band_dropout_keep
from olmoearth_fast.ops.patch_embed import (
    patch_embed,
    patch_embed_effective,
    patch_embed_multi,
    patch_embed_ref,
    patch_embed_rows,
    patch_embed_rows_ref,
)
from olmoearth_fast.ops.patch_embed_plan import (
    aa_bicubic_matrix,
    effective_plan,
    effective_weight_grad,
    effective_weights,
)
from tests.helpers.patch_embed_bounds import patch_embed_abs_scale

MISSING = -99999.0
RTOL = 1e-4
# sum-of-|terms| scale factor: ~40 fp32 eps, the sqrt(n)*eps rounding of a length-640..1920 sum.
ATOL_SCALE = 1e-5


def make_case(B=2, H=10, W=15, T=3, C=4, c_all=6, D=16, p=5, missing=0.05, dropout=True,
              seed=0):
    """Random channels-last input with missing pixels, gather indices, keep, weight, bias."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, W, T, c_all, generator=g)
    miss = torch.rand(B, H, W, T, 1, generator=g) < missing  # MISSING is per pixel, all bands
    x = torch.where(miss, torch.full_like(x, MISSING), x)
    band_index = torch.randperm(c_all, generator=g)[:C]
    keep = band_dropout_keep(B, C, 0.5, generator=g) if dropout else None
    bound = 1 / (64 * C) ** 0.5  # the reference's Conv2d default init range
    weight = (torch.rand(D, C, 8, 8, generator=g) * 2 - 1) * bound
    bias = (torch.rand(D, generator=g) * 2 - 1) * bound
    return x, weight, bias, p, keep, band_index


def assert_mixed_close(ours, ref, scale, what, rtol=RTOL, atol_scale=ATOL_SCALE):
    err = (ours.double() - ref.double()).abs()
    bound = rtol * ref.double().abs() + atol_scale * scale
    if not bool((err <= bound).all()):
        worst = (err / bound).nan_to_num(posinf=float("inf")).max().item()
        raise AssertionError(f"{what}: error reaches {worst:.3g}x the bound "
                             f"rtol*|ref| + {atol_scale}*S")


def assert_clean_tokens_close(ours, ref, x, weight, p, keep, band_index, rtol=RTOL):
    """Per-token relative norm on tokens whose receptive field holds no missing pixel."""
    ind = (x == MISSING).to(x.dtype)
    polluted = patch_embed_abs_scale(ind, weight, p, keep, band_index)[0].amax(-1) > 0
    diff = (ours.double() - ref.double()).norm(dim=-1)
    ok = diff <= rtol * ref.double().norm(dim=-1) + 1e-12
    assert bool(ok[~polluted].all()), "clean tokens differ by more than 1e-4 relative"


# ------------------------------------------------------------------ reference package parity


@pytest.mark.parametrize("p", [1, 3, 8])
@pytest.mark.parametrize("dropout", [False, True])
def test_ref_matches_reference_package(p, dropout):
    pytest.importorskip("olmoearth_pretrain")
    from olmoearth_pretrain.data.constants import Modality
    from olmoearth_pretrain.nn.flexi_patch_embed import FlexiPatchEmbed

    hw_p, C, D = 3, 4, 16
    x, _, _, _, keep, band_index = make_case(H=hw_p * p, W=(hw_p + 1) * p, C=C, D=D, p=p,
                                             dropout=dropout, seed=p)
    module = FlexiPatchEmbed(modality_spec=Modality.SENTINEL2_L2A, base_patch_size_at_16=8,
                             in_chans=C, embedding_size=D, use_linear_patch_embed=False)
    # The reference way (MultiModalPatchEmbeddings.apply_embedding_to_modality): index_select,
    # then x * keep as [B,1,1,1,C], then the module with the requested patch size.
    inp = torch.index_select(x, -1, band_index)
    if keep is not None:
        inp = inp * keep.view(keep.shape[0], 1, 1, 1, C).to(inp.dtype)
    expected = module(inp, patch_size=p)
    grad = torch.randn_like(expected)
    expected.backward(grad)

    weight = module.proj.weight.detach().clone().requires_grad_()
    bias = module.proj.bias.detach().clone().requires_grad_()
    out = patch_embed_ref(x, weight, bias, p, keep, band_index)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # same ops, same order
    assert out.shape == (x.shape[0], x.shape[1] // p, x.shape[2] // p, x.shape[3], D)

    # The op's hand-written backward (impl="ref") equals the reference's autograd.
    out = patch_embed(x, weight, bias, p, keep, band_index, impl="ref")
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    gw, gb = torch.autograd.grad(out, (weight, bias), grad)
    torch.testing.assert_close(gw, module.proj.weight.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gb, module.proj.bias.grad, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ effective-kernel construction


@pytest.mark.parametrize("in_size,out_size", [(1, 8), (3, 24), (5, 40), (12, 96), (7, 56),
                                              (60, 96), (16, 8), (13, 5)])
def test_aa_bicubic_matrix_matches_interpolate(in_size, out_size):
    img = torch.eye(in_size, dtype=torch.float64)[:, None, :, None].expand(-1, 1, -1, 2)
    got = F.interpolate(img, size=(out_size, 2), mode="bicubic", antialias=True)[:, 0, :, 0].T
    torch.testing.assert_close(aa_bicubic_matrix(in_size, out_size), got, rtol=0, atol=1e-13)


@pytest.mark.parametrize("p", range(1, 9))
def test_effective_plan_classes(p):
    for n_tok in (1, 2, 5, 12):
        plan = effective_plan(p, n_tok * p, 3 * p)
        assert plan.taps == (8 if p == 8 else p + 4)
        rows = [i for i0, ni in plan.row_classes for i in range(i0, i0 + ni)]
        assert rows == list(range(n_tok))  # classes tile the token rows in order
        # Interior rows exist iff some window lies inside the image; borders are ceil(2/p) wide.
        n_border = 0 if p == 8 else -(-2 // p)
        expected = 1 if p == 8 else min(n_tok, 2 * n_border + 1)
        assert len(plan.row_classes) == expected


def test_effective_weight_grad_is_adjoint():
    plan = effective_plan(2, 10, 14)
    w = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    g = torch.randn(plan.num_classes, plan.taps, plan.taps, 3, 5, dtype=torch.float64)
    lhs = (effective_weights(w, plan) * g).sum()
    rhs = (w * effective_weight_grad(g, plan)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=0)


@pytest.mark.parametrize("p", range(1, 9))
def test_effective_matches_ref(p):
    x, w, b, _, keep, bi = make_case(H=2 * p, W=5 * p, C=3, D=8, p=p, seed=10 + p)
    w.requires_grad_()
    b.requires_grad_()
    ref = patch_embed_ref(x, w, b, p, keep, bi)
    grad = torch.randn_like(ref)
    gw_ref, gb_ref = torch.autograd.grad(ref, (w, b), grad)
    s_out, s_w = patch_embed_abs_scale(x, w, p, keep, bi, grad)
    # Autograd through the differentiable effective path.
    out = patch_embed_effective(x, w, b, p, keep, bi)
    gw, gb = torch.autograd.grad(out, (w, b), grad)
    assert_mixed_close(out, ref, s_out, "effective out")
    assert_clean_tokens_close(out, ref, x, w, p, keep, bi)
    assert_mixed_close(gw, gw_ref, s_w, "effective dW (autograd)")
    assert_mixed_close(gb, gb_ref, grad.double().abs().sum((0, 1, 2, 3)), "db")
    # The op's hand-written effective backward.
    out = patch_embed(x, w, b, p, keep, bi, impl="effective")
    gw, gb = torch.autograd.grad(out, (w, b), grad)
    assert_mixed_close(gw, gw_ref, s_w, "effective dW (op)")
    assert_mixed_close(gb, gb_ref, grad.double().abs().sum((0, 1, 2, 3)), "db")


def test_effective_clean_data_relative():
    """Without missing pixels everything is a plain 1e-4 relative check."""
    for p in (1, 2, 5):
        x, w, b, _, keep, bi = make_case(H=4 * p, W=3 * p, C=5, p=p, missing=0.0, seed=p)
        w.requires_grad_()
        ref = patch_embed_ref(x, w, b, p, keep, bi)
        out = patch_embed(x, w, b, p, keep, bi, impl="effective")
        grad = torch.randn_like(ref)
        torch.testing.assert_close(out, ref, rtol=RTOL, atol=1e-6)
        gw_ref, = torch.autograd.grad(ref, w, grad)
        gw, = torch.autograd.grad(out, w, grad)
        assert (gw - gw_ref).norm() <= RTOL * gw_ref.norm()


def test_missing_pixel_pollution_is_kept():
    """A missing pixel changes the neighbouring token's value exactly like the reference."""
    p = 2
    x = torch.randn(1, 8, 8, 1, 2)
    w, b = torch.randn(4, 2, 8, 8) * 0.05, torch.zeros(4)
    clean = patch_embed_ref(x, w, b, p)
    x[0, 3, 3, 0, :] = MISSING  # pixel of token (1, 1); bicubic reach 2 px touches (2, 2) too
    dirty = patch_embed_ref(x, w, b, p)
    changed = (dirty - clean).abs().amax((-1, -2))[0] > 1e-3
    assert changed[1, 1] and changed[2, 2] and changed[1, 2] and not changed[3, 3]
    eff = patch_embed(x, w, b, p, impl="effective")
    assert_mixed_close(eff, dirty, patch_embed_abs_scale(x, w, p)[0], "polluted")


# ------------------------------------------------------------------ band dropout


def test_band_dropout_keep_fixed_rate_statistics():
    g = torch.Generator().manual_seed(1)
    keep = band_dropout_keep(20000, 12, 0.3, generator=g)
    assert keep.shape == (20000, 12) and keep.dtype == torch.float32
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    assert bool((keep.sum(1) >= 1).all())
    # P(all 12 dropped) = 0.3**12 ~ 5e-7, so the drop fraction is the rate; sd ~ 0.0013.
    assert abs((1 - keep.mean()).item() - 0.3) < 0.006
    # Independent per band: every band's drop fraction is ~ the rate as well.
    assert ((1 - keep.mean(0)) - 0.3).abs().max().item() < 0.02


def test_band_dropout_keep_at_least_one_uniform():
    g = torch.Generator().manual_seed(2)
    keep = band_dropout_keep(12000, 6, 1.0, generator=g)  # everything drops: one forced band
    assert bool((keep.sum(1) == 1).all())
    counts = keep.sum(0)  # uniform replacement: 2000 each, sd ~ 41
    assert (counts - 2000).abs().max().item() < 200
    assert bool((band_dropout_keep(100, 1, 0.9, generator=g) == 1).all())  # 1 band: kept
    assert bool((band_dropout_keep(100, 5, 0.0, generator=g) == 1).all())  # rate 0: all kept


def test_band_dropout_keep_random_rate():
    g = torch.Generator().manual_seed(3)
    fracs = torch.stack([1 - band_dropout_keep(400, 12, 0.5, random_rate=True, generator=g).mean()
                         for _ in range(300)])
    # One rate per call ~ U(0, 0.5): mean 0.25, spread of a uniform (sd 0.144), not of a
    # per-call binomial mean (sd 0.007 for 4800 draws).
    assert abs(fracs.mean().item() - 0.25) < 0.03
    assert 0.11 < fracs.std().item() < 0.18
    assert fracs.max().item() < 0.5 + 0.03


def test_band_dropout_keep_matches_reference_distribution():
    pytest.importorskip("olmoearth_pretrain")
    from olmoearth_pretrain.nn.flexi_vit import MultiModalPatchEmbeddings

    torch.manual_seed(4)
    ones = torch.ones(20000, 1, 1, 1, 4)
    ref_keep = MultiModalPatchEmbeddings._apply_band_dropout(ones, 0.7).reshape(20000, 4)
    ours = band_dropout_keep(20000, 4, 0.7, generator=torch.Generator().manual_seed(5))
    # Same per-band keep rate including the forced bands: 0.3 + 0.7**4 / 4 = 0.36.
    assert abs(ref_keep.mean().item() - ours.mean().item()) < 0.012
    assert abs(ours.mean().item() - (0.3 + 0.7**4 / 4)) < 0.01
    assert bool((ref_keep.sum(1) >= 1).all()) and bool((ours.sum(1) >= 1).all())


def test_band_dropout_keep_draws_are_independent_calls():
    """``draws=V``: V multipliers in one call, each distributed as one call's: its own random
    rate (the V rates independent, not one shared), at least one band per sample and draw."""
    g = torch.Generator().manual_seed(6)
    keeps = band_dropout_keep(400, 12, 0.5, random_rate=True, draws=300, generator=g)
    assert keeps.shape == (300, 400, 12) and keeps.dtype == torch.float32
    assert bool((keeps.sum(-1) >= 1).all())
    fracs = 1 - keeps.mean((1, 2))  # per draw: its rate ~ U(0, 0.5), as test_band_dropout_keep_random_rate
    assert abs(fracs.mean().item() - 0.25) < 0.03
    assert 0.11 < fracs.std().item() < 0.18
    pairs = fracs.view(150, 2)  # neighbouring draws do not share a rate
    assert abs(torch.corrcoef(pairs.T)[0, 1].item()) < 0.25
    fixed = band_dropout_keep(10000, 6, 1.0, draws=2, generator=g)  # everything drops: one forced band
    assert bool((fixed.sum(-1) == 1).all())
    assert (fixed.sum(1) - 10000 / 6).abs().max().item() < 250  # uniform replacement in each draw
    assert not torch.equal(fixed[0], fixed[1])
    one = band_dropout_keep(20000, 12, 0.3, draws=1, generator=g)[0]
    assert abs((1 - one.mean()).item() - 0.3) < 0.006


def test_band_dropout_keep_validation():
    with pytest.raises(ValueError, match="rate"):
        band_dropout_keep(2, 3, 1.5)
    with pytest.raises(ValueError, match="num_bands"):
        band_dropout_keep(2, 0, 0.5)
    with pytest.raises(ValueError, match="draws"):
        band_dropout_keep(2, 3, 0.5, draws=0)


@pytest.mark.parametrize("impl", ["ref", "effective"])
def test_keep_is_shared_over_h_w_t(impl):
    """keep[b, c] = 0 equals zeroing band c of sample b at every pixel and timestep."""
    x, w, b, p, _, bi = make_case(p=5, missing=0.0)
    keep = torch.ones(2, 4)
    keep[0, 1] = 0
    keep[1, 3] = 0
    zeroed = torch.index_select(x, -1, bi).clone()
    zeroed[0, ..., 1] = 0
    zeroed[1, ..., 3] = 0
    torch.testing.assert_close(patch_embed(x, w, b, p, keep, bi, impl=impl),
                               patch_embed(zeroed, w, b, p, impl=impl), rtol=0, atol=0)


# ------------------------------------------------------------------ the registered op


def test_input_validation():
    x, w, b, p, keep, bi = make_case()
    with pytest.raises(ValueError, match="x must be"):
        patch_embed(x[0], w, b, p, keep, bi)
    with pytest.raises(ValueError, match="multiples of patch_size"):
        patch_embed(x, w, b, 3, keep, bi)
    with pytest.raises(ValueError, match="patch_size must be in"):
        patch_embed(x, w, b, 9, keep, bi)
    with pytest.raises(ValueError, match="keep must be"):
        patch_embed(x, w, b, p, keep[:, :2], bi)
    with pytest.raises(ValueError, match="band_index has"):
        patch_embed(x, w, b, p, keep, bi[:3])
    with pytest.raises(ValueError, match="band_index values"):
        patch_embed(x, w, b, p, keep, bi + 3)
    with pytest.raises(ValueError, match="weight has C"):
        patch_embed(x, w, b, p, keep)
    with pytest.raises(ValueError, match="bias must be"):
        patch_embed(x, w, b[:3], p, keep, bi)
    with pytest.raises(ValueError, match="impl must be"):
        patch_embed(x, w, b, p, keep, bi, impl="cuda")


@pytest.mark.parametrize("impl", ["ref", "effective"])
def test_opcheck(impl):
    op = torch.ops.olmoearth_fast.patch_embed.default
    x, w, b, p, keep, bi = make_case(B=2, H=4, W=6, T=2, C=3, c_all=5, D=8, p=2)
    w.requires_grad_()
    b.requires_grad_()
    x_perm = x.permute(0, 2, 1, 3, 4).contiguous().permute(0, 2, 1, 3, 4)  # non-contiguous
    x8 = make_case(B=1, H=8, W=16, T=1, C=3, c_all=3, D=8, p=8)[0]
    for args in [(x, w, b, p, keep, bi, impl), (x_perm, w, None, p, None, bi, impl),
                 (x[..., :3], w.detach(), b, p, None, None, impl),
                 (x8, w, b, 8, keep[:1], None, impl)]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("impl", ["ref", "effective"])
def test_compile_fullgraph_forward_backward(impl):
    x, w, b, p, keep, bi = make_case(B=2, H=6, W=4, T=2, C=3, c_all=5, D=8, p=2)
    w.requires_grad_()
    b.requires_grad_()

    def step(x, w, b, keep, bi):
        out = patch_embed(x, w, b, 2, keep, bi, impl=impl)
        return (out * out).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grads_eager = torch.autograd.grad(step(x, w, b, keep, bi), (w, b))
    grads_comp = torch.autograd.grad(compiled(x, w, b, keep, bi), (w, b))
    for ge, gc in zip(grads_eager, grads_comp):
        torch.testing.assert_close(gc, ge)


def test_compile_inductor():
    x, w, b, p, keep, bi = make_case(B=2, H=6, W=4, T=2, C=3, c_all=5, D=8, p=2)
    w.requires_grad_()

    @torch.compile(fullgraph=True)
    def step(x, w, b, keep, bi):
        return patch_embed(x, w, b, 2, keep, bi).relu().sum()

    out = step(x, w, b, keep, bi)
    gw, = torch.autograd.grad(out, w)
    ref = patch_embed_ref(x, w, b, 2, keep, bi).relu().sum()
    gw_ref, = torch.autograd.grad(ref, w)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gw, gw_ref)


def test_no_grad_for_data_and_bf16_dtype():
    x, w, b, p, keep, bi = make_case(p=5)
    x.requires_grad_()
    w.requires_grad_()
    out = patch_embed(x, w, b, p, keep, bi)
    out.sum().backward()
    assert x.grad is None and w.grad is not None  # pixels get no gradient
    out16 = patch_embed(x.detach().bfloat16(), w, b, p, keep, bi, impl="effective")
    assert out16.dtype == torch.bfloat16


@pytest.mark.parametrize("p", range(1, 9))
def test_multi_shares_the_resize_exactly(p):
    """Views + target from one resized image equal separate patch_embed calls bit for bit
    (resize(x*keep) == resize(x)*keep for 0/1 keep), forward and weight/bias gradients."""
    g = torch.Generator().manual_seed(p)
    x = torch.randn(3, 2 * p, 3 * p, 2, 7, generator=g)
    x[0, 0, 1, 0, 3] = MISSING
    bi = torch.tensor([6, 0, 2, 3])
    projections = [((torch.randn(8, 4, 8, 8, generator=g) * 0.05).requires_grad_(),
                    torch.randn(8, generator=g).requires_grad_(), band_dropout_keep(3, 4, 0.5, generator=g))
                   for _ in range(2)]
    projections.append((torch.randn(8, 4, 8, 8, generator=g), None, None))  # the frozen target
    got = patch_embed_multi(x, projections, p, bi)
    want = [patch_embed(x, w, b, p, k, bi) for w, b, k in projections]
    for a, e in zip(got, want):
        assert torch.equal(a, e)
    cot = [torch.randn(a.shape, generator=g) for a in got[:2]]
    params = [t for w, b, _ in projections[:2] for t in (w, b)]
    g_got = torch.autograd.grad(sum((a * c).sum() for a, c in zip(got, cot)), params)
    g_want = torch.autograd.grad(sum((a * c).sum() for a, c in zip(want, cot)), params)
    for a, e in zip(g_got, g_want):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
    assert not got[2].requires_grad


@pytest.mark.parametrize("missing", [False, True])
@pytest.mark.parametrize("p", range(1, 9))
def test_rows_equal_the_full_embedding_at_those_rows(p, missing):
    """`patch_embed_rows` on CPU (one resize, each row's patch gathered, one GEMM) equals the
    full embedding taken at the rows: two views with their own keeps (rows in any order,
    repeated, every border token), the frozen target at other rows, an empty projection; values
    and weight/bias gradients. With a missing pixel (-99999) the polluted tokens are ~1e3 and
    the bound scales with them."""
    g = torch.Generator().manual_seed(100 + p)
    B, h, w, T = 3, 3, 4, 2
    x = torch.randn(B, h * p, w * p, T, 7, generator=g)
    if missing:
        x[1, 0, p, 0, :] = MISSING
    bi = torch.tensor([6, 0, 2, 3])
    n_grid = B * T * h * w
    rows = torch.cat([torch.randperm(n_grid, generator=g), torch.randint(0, n_grid, (9,), generator=g)])
    online = ((torch.randn(8, 4, 8, 8, generator=g) * 0.05).requires_grad_(),
              torch.randn(8, generator=g).requires_grad_(),
              [band_dropout_keep(B, 4, 0.5, generator=g) for _ in range(2)], rows,
              torch.randint(0, 2, rows.shape, generator=g))
    target = (torch.randn(8, 4, 8, 8, generator=g) * 0.05, torch.randn(8, generator=g),
              None, torch.randint(0, n_grid, (11,), generator=g), None)
    empty = (torch.randn(8, 4, 8, 8, generator=g), None, None, torch.zeros(0, dtype=torch.long), None)
    got = patch_embed_rows(x, [online, target, empty], p, bi)
    want = patch_embed_rows_ref(x, [online, target, empty], p, bi)
    for a, e in zip(got, want):
        assert a.shape == e.shape
        scale = float(e.detach().abs().max()) if missing and e.numel() else 1e-1
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * scale)
    cot = torch.randn(got[0].shape, generator=g)
    g_got = torch.autograd.grad((got[0] * cot).sum(), online[:2])
    g_want = torch.autograd.grad((want[0] * cot).sum(), online[:2])
    for a, e in zip(g_got, g_want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * float(e.abs().max()))
    assert not got[1].requires_grad and got[2].shape == (0, 8)


def test_multi_validates_every_projection():
    x = torch.randn(2, 4, 4, 1, 3)
    w = torch.randn(5, 3, 8, 8)
    assert patch_embed_multi(x, [], 2) == []
    with pytest.raises(ValueError, match="keep must be"):
        patch_embed_multi(x, [(w, None, None), (w, None, torch.ones(2, 4))], 2)
    with pytest.raises(ValueError, match="same kernel size"):
        patch_embed_multi(x, [(w, None, None), (torch.randn(5, 3, 4, 4), None, None)], 2)


# ------------------------------------------------------------------ autocast


def test_effective_weights_ignore_the_callers_autocast():
    """The two matmuls that compose the weight with the resize maps run in fp32 under a bf16
    autocast too (before, they ran in bf16: maps and weights rounded to 8 bits, ~4e-3)."""
    for p in (1, 3, 7):
        plan = effective_plan(p, 4 * p, 5 * p)
        w = torch.randn(16, 3, 8, 8)
        want = effective_weights(w, plan)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = effective_weights(w, plan)
            g = effective_weight_grad(torch.ones_like(want), plan)
        assert got.dtype == torch.float32 and torch.equal(got, want)
        assert torch.equal(g, effective_weight_grad(torch.ones_like(want), plan))


@pytest.mark.parametrize("impl", ["auto", "ref", "effective"])
def test_patch_embed_ignores_the_callers_autocast(impl):
    """patch_embed computes in x.dtype: under CPU bf16 autocast the fp32 output and the weight
    gradient are those without autocast, bit for bit."""
    x, w, b, p, keep, bi = make_case(p=3, H=6, W=9, missing=0.0)
    w.requires_grad_()
    grad = torch.randn(2, 2, 3, 3, 16)
    want = patch_embed(x, w, b, p, keep, bi, impl=impl)
    gw_want, = torch.autograd.grad(want, w, grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = patch_embed(x, w, b, p, keep, bi, impl=impl)
        gw, = torch.autograd.grad(got, w, grad)
    assert got.dtype == torch.float32
    assert torch.equal(got, want) and torch.equal(gw, gw_want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        multi = patch_embed_multi(x, [(w, b, keep), (w, None, None)], p, bi)
    assert torch.equal(multi[0], patch_embed(x, w, b, p, keep, bi))
