"""Loss parity with the reference package (olmoearth-pretrain==0.1.2).

`olmoearth_fast.losses.modality_patch_disc_masked_neg` (dense) and the fused op's dict form
(`masked_neg_loss_from_dict`, chunked CPU path) against the reference's
`modality_patch_discrimination_masked_negatives` (per-sample loop) and its `_vec` variant, and
`info_nce` against the reference's InfoNCE: value and prediction gradient within 1e-5.

Inputs (the edge cases of docs/reference_semantics.md §8.1): map-like targets that are exact
copies of a few class vectors (pairwise cosine exactly 1 or <= 0.99, so the 0.999 rule cannot
flip between implementations), c = 1 samples, all-duplicate (skipped) samples, a modality whose
every sample is skipped, an empty modality, latlon ([B, D] tokens), and modalities excluded
from negative masking. Tokens are [B, h, w, t, bs, D] as in TokensAndMasks; our dict form is
their row-major flattening, like the reference's `flatten_tokens_and_masks_per_modality`.
"""

import pytest
import torch
import torch.nn.functional as F

ref_loss = pytest.importorskip("olmoearth_pretrain.train.loss")
from olmoearth_pretrain.datatypes import TokensAndMasks  # noqa: E402

from olmoearth_fast.losses import info_nce, modality_patch_disc_masked_neg  # noqa: E402
from olmoearth_fast.modalities import MaskValue  # noqa: E402
from tests.helpers.masked_neg_loss_dict import masked_neg_loss_from_dict  # noqa: E402

B, D = 6, 32
DEC = int(MaskValue.DECODER)
# modality -> (token grid per sample, DECODER count per sample, target kind, all-duplicate samples)
# "cls" targets are copies of 5 class vectors (map-like), "uniq" targets are all distinct.
SPEC = {
    "sentinel2_l2a": ((4, 4, 4, 4), [0, 2, 47, 123, 256, 1], "uniq", ()),
    "worldcover": ((10, 10, 3, 1), [1, 2, 47, 123, 256, 47], "cls", (5,)),
    "latlon": ((), [1, 0, 1, 1, 0, 1], "uniq", ()),
    "openstreetmap_raster": ((4, 4, 1, 1), [3, 2, 0, 0, 5, 0], "cls", (0, 1, 2, 3, 4, 5)),
    "srtm": ((4, 4, 1, 1), [0, 0, 0, 0, 0, 0], "cls", ()),
    "cdl": ((5, 5, 2, 1), [3, 5, 50, 1, 7, 0], "cls", (4,)),
    "worldcereal": ((3, 3, 1, 1), [4, 2, 8, 0, 3, 1], "cls", (0, 1, 2, 3, 4, 5)),
    "era5_10": ((12, 1), [0, 5, 12, 3, 1, 2], "uniq", ()),
}
# Masking excludes sentinel2_l2a and cdl (cdl has duplicates, so there they are negatives).
MASK_LISTS = [None, ["worldcover", "openstreetmap_raster", "srtm", "worldcereal", "latlon",
                     "era5_10"]]


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    classes = torch.randn(5, D, generator=g)
    pred, target, mask = {}, {}, {}
    for m, (grid, counts, kind, dup_all) in SPEC.items():
        n = 1
        for s in grid:
            n *= s
        codes = torch.zeros(B, n, dtype=torch.long)
        for b, c in enumerate(counts):
            codes[b, torch.randperm(n, generator=g)[:c]] = DEC
            # the other tokens carry every non-DECODER role
            other = codes[b] != DEC
            codes[b, other] = torch.tensor([0, 1, 3])[torch.randint(0, 3, (n - c,), generator=g)]
        if kind == "cls":
            assign = torch.randint(0, 5, (B, n), generator=g)
            assign[list(dup_all)] = 1
            tgt = classes[assign]
        else:
            tgt = torch.randn(B, n, D, generator=g)
        pred[m] = torch.randn(B, *grid, D, generator=g).requires_grad_()
        target[m] = tgt.reshape(B, *grid, D)
        mask[m] = codes.reshape(B, *grid)
    # within a sample, target cosines are exactly 1 (copies) or far below the 0.999 threshold
    for m in SPEC:
        t = F.normalize(target[m].reshape(B, -1, D), dim=-1)
        cos = t @ t.transpose(1, 2)
        assert bool(((cos > 0.99999) | (cos <= 0.99)).all())
    return pred, target, mask


def _tam(tokens, mask):
    return TokensAndMasks(**tokens, **{f"{m}_mask": v for m, v in mask.items()})


def _flat(tokens):
    return {m: v.reshape(B, -1, D) for m, v in tokens.items()}


def _flat_mask(mask):
    return {m: v.reshape(B, -1) for m, v in mask.items()}


def _value_and_grad(fn, pred):
    for v in pred.values():
        v.grad = None
    loss = fn()
    loss.backward()
    # The reference's loop never touches a modality without DECODER tokens: grad None = 0.
    return loss.detach(), {m: torch.zeros_like(v) if v.grad is None else v.grad.clone()
                           for m, v in pred.items()}


def _assert_close(got, want):
    loss, grads = got
    loss_ref, grads_ref = want
    print(f"loss {float(loss):.7f} vs {float(loss_ref):.7f}; max grad diff "
          f"{max(float((grads[m] - grads_ref[m]).abs().max()) for m in grads):.2e}")
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=0)
    for m in grads:
        torch.testing.assert_close(grads[m], grads_ref[m], atol=1e-5, rtol=0, msg=m)


@pytest.mark.parametrize("mask_list", MASK_LISTS, ids=["mask_all", "mask_some"])
@pytest.mark.parametrize("tau,weight", [(0.1, 1.0), (0.07, 0.5)])
@pytest.mark.parametrize("ours", ["dense", "fused_chunked"])
def test_masked_neg_loss_matches_reference(ours, tau, weight, mask_list):
    pred, target, mask = _inputs()
    kw = dict(tau=tau, same_target_threshold=0.999, mask_negatives_for_modalities=mask_list)
    loop = ref_loss.ModalityPatchDiscriminationMaskedNegatives(weight=weight, **kw)
    vec = ref_loss.ModalityPatchDiscriminationMaskedNegativesVec(weight=weight, **kw)
    fn = (modality_patch_disc_masked_neg if ours == "dense"
          else lambda *a, **k: masked_neg_loss_from_dict(*a, impl="chunked", **k))
    got = _value_and_grad(lambda: fn(_flat(pred), _flat(target), _flat_mask(mask), weight=weight,
                                     **kw), pred)
    want_loop = _value_and_grad(lambda: loop.compute(_tam(pred, mask), _tam(target, mask)), pred)
    want_vec = _value_and_grad(lambda: vec.compute(_tam(pred, mask), _tam(target, mask)), pred)
    _assert_close(got, want_loop)
    _assert_close(got, want_vec)
    # the fixture really has skipped samples, a fully skipped modality and an empty one
    assert float(got[0]) > 0
    for m in ("openstreetmap_raster", "srtm"):
        assert float(got[1][m].abs().max()) == 0.0


def test_masking_changes_the_loss():
    """Guard against a fixture where the mask list has no effect (cdl duplicates)."""
    pred, target, mask = _inputs()
    pred = {m: v.detach() for m, v in pred.items()}
    a = modality_patch_disc_masked_neg(_flat(pred), _flat(target), _flat_mask(mask))
    b = modality_patch_disc_masked_neg(_flat(pred), _flat(target), _flat_mask(mask),
                                       mask_negatives_for_modalities=MASK_LISTS[1])
    assert abs(float(a) - float(b)) > 1e-3


@pytest.mark.parametrize("ours", ["dense", "fused_chunked"])
def test_masked_neg_loss_ignores_autocast(ours):
    """The loss runs in fp32 with autocast off, so bf16 autocast must not change it."""
    pred, target, mask = _inputs(1)
    fn = (modality_patch_disc_masked_neg if ours == "dense"
          else lambda *a, **k: masked_neg_loss_from_dict(*a, impl="chunked", **k))
    args = (_flat(pred), _flat(target), _flat_mask(mask))
    want = fn(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(*args)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("batch", [1, 2, 7])
@pytest.mark.parametrize("tau,weight", [(0.1, 0.1), (0.2, 1.0)])
def test_info_nce_matches_reference(batch, tau, weight):
    p = (torch.randn(batch, 24) * 3).requires_grad_()
    q = torch.randn(batch, 24).requires_grad_()
    ref = ref_loss.InfoNCELoss(tau=tau, weight=weight)
    want = ref.compute(p, q)
    gp_ref, gq_ref = torch.autograd.grad(want, (p, q))
    got = info_nce(p, q, tau=tau, weight=weight)
    gp, gq = torch.autograd.grad(got, (p, q))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gp, gp_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gq, gq_ref, atol=1e-6, rtol=1e-5)
    if batch == 1:
        assert float(got.detach()) == 0.0
