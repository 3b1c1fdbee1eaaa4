"""The patch embedding's resize of one bandset, as the exp14 step needs it on CPU.

Providers:

* ``ours``: `olmoearth_fast.ops.resize_patches` (C++): the bands gathered from the channels-last
  data, resized (antialiased bicubic, PyTorch's own weights, bit-identical) straight into one row
  per token, so the step's row gather is a row copy;
* ``ref``: `resize_patches_ref`: the reference's gather, permute and `F.interpolate`, then the
  same token rows (a strided copy; the step before this op gathered each token's patch out of
  the NCHW image instead).

Shapes: Sentinel-2 (12 bands, 9 timesteps) of an exp14 microbatch of 16 samples on a 24×24-pixel
crop, at p=4 (6×6 tokens) and p=2 (12×12 tokens); the output is 64 values per token and band.
`min_bytes`: the data read once and the rows written once.
"""

import pytest
import torch

from olmoearth_fast.ops import resize_patches as rp

if torch.cuda.is_available():  # pragma: no cover - the C++ op is CPU only
    pytest.skip("CPU op (CUDA's fused patch-embedding kernel resizes inside)", allow_module_level=True)

CASES = {"p4": 4, "p2": 2}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("provider", ["ours", "ref"])
def test_resize_patches(bench, provider, case):
    p = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 24, 24, 9, 12, generator=g)
    bands = torch.arange(12)
    fn = (lambda: rp.resize_patches(x, bands, p)) if provider == "ours" else (lambda: rp.resize_patches_ref(x, bands, p))
    assert torch.equal(fn(), rp.resize_patches_ref(x, bands, p))
    tokens = 16 * 9 * (24 // p) ** 2
    bench(fn, group=f"resize_patches {case}: B=16 T=9 C=12 24x24 px, {24 // p}x{24 // p} tokens", provider=provider,
          min_bytes=4 * (x.numel() + tokens * 64 * 12))
