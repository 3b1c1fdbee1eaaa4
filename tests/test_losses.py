"""Unit tests of olmoearth_fast.losses that need no reference package (parity: tests/parity)."""

import pytest
import torch
import torch.nn.functional as F

from olmoearth_fast.losses import LOSS_FIELD_ORDER, info_nce, modality_patch_disc_masked_neg
from olmoearth_fast.modalities import MaskValue
from olmoearth_fast.ops.masked_neg_loss import masked_neg_loss_ref
from tests.helpers.masked_neg_loss_dict import pack_loss_inputs

DEC, ENC = int(MaskValue.DECODER), int(MaskValue.ONLINE_ENCODER)


def _hand_loss(p, t, tau):
    """2 tau * mean_i CE(p_hat_i . t_hat / tau, i) for one segment without masking."""
    s = F.normalize(p, dim=-1) @ F.normalize(t, dim=-1).T / tau
    return 2 * tau * (torch.logsumexp(s, -1) - s.diagonal()).mean()


def test_reduction_order_by_hand():
    """Per-sample mean, mean over counted samples (c = 1 counts as 0, skipped ones do not),
    sum over modalities, times weight."""
    tau, d = 0.1, 16
    p = torch.randn(3, 4, d)
    t = torch.randn(3, 4, d)
    t[2, 1] = t[2, 0] * 3.0  # sample 2: its two DECODER targets are the same direction
    mask = torch.full((3, 4), ENC)
    mask[0, :3] = DEC  # c = 3
    mask[1, 2] = DEC  # c = 1: counted, loss 0
    mask[2, :2] = DEC  # c = 2, duplicates: skipped when masked
    la = _hand_loss(p[0, :3], t[0, :3], tau)
    lc = _hand_loss(p[2, :2], t[2, :2], tau)
    one = {"worldcover": p}, {"worldcover": t}, {"worldcover": mask}
    masked = modality_patch_disc_masked_neg(*one, tau=tau)
    torch.testing.assert_close(masked, (la + 0.0) / 2, atol=1e-6, rtol=0)
    unmasked = modality_patch_disc_masked_neg(*one, tau=tau, mask_negatives_for_modalities=[])
    torch.testing.assert_close(unmasked, (la + 0.0 + lc) / 3, atol=1e-6, rtol=0)
    two = ({"worldcover": p, "cdl": p}, {"worldcover": t, "cdl": t},
           {"worldcover": mask, "cdl": mask})
    both = modality_patch_disc_masked_neg(*two, tau=tau, weight=0.5,
                                          mask_negatives_for_modalities=["cdl"])
    torch.testing.assert_close(both, 0.5 * ((la + lc) / 3 + la / 2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_dense_matches_per_segment_ref(seed):
    g = torch.Generator().manual_seed(seed)
    classes = torch.randn(3, 24, generator=g)
    pred, target, mask = {}, {}, {}
    for m, n in (("sentinel2_l2a", 40), ("worldcover", 33), ("srtm", 5)):
        pred[m] = torch.randn(4, n, 24, generator=g).requires_grad_()
        target[m] = (classes[torch.randint(0, 3, (4, n), generator=g)] if m != "sentinel2_l2a"
                     else torch.randn(4, n, 24, generator=g))
        mask[m] = torch.randint(0, 4, (4, n), generator=g)
    mask["srtm"][:] = ENC  # empty modality
    mask["worldcover"][1] = ENC
    mask["worldcover"][1, 3] = DEC  # c = 1
    kw = dict(mask_negatives_for_modalities=["worldcover", "srtm"])
    got = modality_patch_disc_masked_neg(pred, target, mask, **kw)
    g1 = torch.autograd.grad(got, list(pred.values()))
    p = pack_loss_inputs(pred, target, mask, **kw)
    want = masked_neg_loss_ref(p.pred, p.target, p.seg_offsets, p.seg_modality, p.seg_mask_neg,
                               len(p.modalities), row_index=p.row_index).sum()
    g2 = torch.autograd.grad(want, list(pred.values()))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_dense_loss_is_fp32_under_autocast():
    p = {"worldcover": torch.randn(2, 9, 16).bfloat16()}
    t = {"worldcover": torch.randn(2, 9, 16).bfloat16()}
    k = {"worldcover": torch.full((2, 9), DEC)}
    want = modality_patch_disc_masked_neg({m: v.float() for m, v in p.items()},
                                          {m: v.float() for m, v in t.items()}, k)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = modality_patch_disc_masked_neg(p, t, k)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_info_nce_by_hand():
    p, q = torch.randn(5, 8), torch.randn(5, 8)
    logits = F.normalize(p, dim=-1) @ F.normalize(q, dim=-1).T / 0.2
    want = 0.3 * (torch.logsumexp(logits, -1) - logits.diagonal()).mean()
    torch.testing.assert_close(info_nce(p, q, tau=0.2, weight=0.3), want, atol=1e-6, rtol=0)
    assert float(info_nce(p[:1], q[:1])) == 0.0
    with pytest.raises(ValueError, match="p and q"):
        info_nce(p, q[:4])


def test_loss_inputs_are_validated():
    p = {"worldcover": torch.randn(2, 9, 16)}
    k = {"worldcover": torch.full((2, 9), DEC)}
    assert "latlon" in LOSS_FIELD_ORDER and LOSS_FIELD_ORDER[0] == "sentinel2_l2a"
    with pytest.raises(ValueError, match="not in LOSS_FIELD_ORDER"):
        modality_patch_disc_masked_neg({"s2": p["worldcover"]}, {"s2": p["worldcover"]},
                                       {"s2": k["worldcover"]})
    with pytest.raises(ValueError, match="target must have the keys"):
        modality_patch_disc_masked_neg(p, {}, k)
    with pytest.raises(ValueError, match="mask lacks"):
        modality_patch_disc_masked_neg(p, p, {})
    with pytest.raises(ValueError, match=r"target\['worldcover'\]"):
        modality_patch_disc_masked_neg(p, {"worldcover": p["worldcover"][:, :8]}, k)
    with pytest.raises(ValueError, match="pred is empty"):
        modality_patch_disc_masked_neg({}, {}, {})


def test_dense_loss_traces_without_graph_breaks():
    """fullgraph=True fails on any host sync (.item(), data-dependent shapes) or graph break."""
    p = {"worldcover": torch.randn(3, 10, 16), "sentinel2_l2a": torch.randn(3, 7, 16)}
    t = {m: torch.randn_like(v) for m, v in p.items()}
    k = {m: torch.randint(0, 4, v.shape[:2]) for m, v in p.items()}
    kw = dict(mask_negatives_for_modalities=["worldcover"])
    compiled = torch.compile(modality_patch_disc_masked_neg, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(p, t, k, **kw), modality_patch_disc_masked_neg(p, t, k, **kw))
    compiled_nce = torch.compile(info_nce, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled_nce(p["worldcover"][:, 0], t["worldcover"][:, 0]),
                               info_nce(p["worldcover"][:, 0], t["worldcover"][:, 0]))
