"""Masked-negatives patch-discrimination loss, forward + backward: fused op vs the reference.

Providers:
* `ours`: the fused op `masked_neg_loss` on the dict-form inputs (`masked_neg_loss_from_dict`
  of tests/helpers: one pack, then the op; Triton kernels on CUDA, the chunked path on CPU);
* `ref`: the reference package's `modality_patch_discrimination_masked_negatives_vec`
  (`ModalityPatchDiscriminationMaskedNegativesVec`, present in 0.1.2), eager fp32;
* `compile_ref`: `torch.compile` of the same `compute` (GPU only: compiling it takes minutes on
  the 2-core CPU machine).

Workload (docs/reference_semantics.md §9.4, single-bandset tokenization): a rank microbatch of
B = 32, D = 768, hw_p in {4, 8, 12} with T = 12, 4, 1, i.e. hw_p^2 T tokens each for
sentinel2_l2a, sentinel1 and landsat plus hw_p^2 for each of the six decode-only maps (672,
1152, 1296 tokens per sample). Each token is DECODER with probability 0.5 (cross_random's decode
ratio); map targets are copies of 10 class vectors (exact duplicates, as frozen-conv targets of
class maps are), the others random; negatives are masked for the six maps, as in the
experiments. CPU: hw_p = 12 only (the issue's CPU target: ours >= 3x the reference there).
"""

from __future__ import annotations

import pytest
import torch

ref_loss = pytest.importorskip("olmoearth_pretrain.train.loss")
from olmoearth_pretrain.datatypes import TokensAndMasks  # noqa: E402

from olmoearth_fast.modalities import MaskValue  # noqa: E402
from tests.helpers.masked_neg_loss_dict import masked_neg_loss_from_dict  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
B, D = 32, 768
T_OF_HW = {4: 12, 8: 4, 12: 1}
HW_P = [4, 8, 12] if ON_GPU else [12]
MAPS = ("worldcover", "srtm", "openstreetmap_raster", "wri_canopy_height_map", "cdl", "worldcereal")
TIMED = ("sentinel2_l2a", "sentinel1", "landsat")
PROVIDERS = ["ours", "ref"] + (["compile_ref"] if ON_GPU else [])


def _inputs(hw: int):
    g = torch.Generator().manual_seed(hw)
    t_steps = T_OF_HW[hw]
    pred, target, mask = {}, {}, {}
    for m in TIMED + MAPS:
        grid = (B, hw, hw, t_steps if m in TIMED else 1, 1)
        if m in MAPS:
            classes = torch.randn(10, D, generator=g)
            target[m] = classes[torch.randint(0, 10, grid, generator=g)]
        else:
            target[m] = torch.randn(*grid, D, generator=g)
        pred[m] = torch.randn(*grid, D, generator=g)
        dec = torch.rand(grid, generator=g) < 0.5
        mask[m] = torch.where(dec, int(MaskValue.DECODER), int(MaskValue.ONLINE_ENCODER))
    move = lambda d: {m: v.to(DEVICE) for m, v in d.items()}  # noqa: E731
    pred = {m: v.requires_grad_() for m, v in move(pred).items()}
    return pred, move(target), move(mask)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("hw", HW_P)
def test_bench_masked_neg_loss(bench, provider, hw):
    pred, target, mask = _inputs(hw)
    leaves = list(pred.values())
    tokens = sum(v.shape[1] * v.shape[2] * v.shape[3] for v in pred.values())
    if provider == "ours":
        flat = lambda d, k: {m: v.reshape(B, -1, *k) for m, v in d.items()}  # noqa: E731
        p, t, k = flat(pred, (D,)), flat(target, (D,)), flat(mask, ())

        def loss():
            return masked_neg_loss_from_dict(p, t, k, mask_negatives_for_modalities=MAPS)
    else:
        vec = ref_loss.ModalityPatchDiscriminationMaskedNegativesVec(
            tau=0.1, same_target_threshold=0.999, mask_negatives_for_modalities=list(MAPS))
        masks = {f"{m}_mask": v for m, v in mask.items()}
        p, t = TokensAndMasks(**pred, **masks), TokensAndMasks(**target, **masks)
        compute = torch.compile(vec.compute) if provider == "compile_ref" else vec.compute

        def loss():
            return compute(p, t)

    def fwd_bwd():
        return torch.autograd.grad(loss(), leaves)

    bench(fwd_bwd, group=f"masked_neg_loss fwd+bwd B={B} hw_p={hw} T={T_OF_HW[hw]} D={D}",
          provider=provider, B=B, hw_p=hw, T=T_OF_HW[hw], D=D, tokens_per_sample=tokens)
