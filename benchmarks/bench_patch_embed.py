"""Patch embedding (band gather + dropout + flexible-patch resize + 8x8 conv), forward+backward.

Providers:
  ours         `olmoearth_fast.ops.patch_embed` (impl="auto": fused Triton on CUDA, reference
               on CPU)
  ref          `patch_embed_ref`, eager: index_select, keep multiply, antialiased bicubic
               upsample by 8/p, Conv2d 8x8/8 (the reference's order of operations)
  compile_ref  torch.compile(patch_embed_ref)
  effective    `patch_embed_effective`: per-class effective kernels as GEMMs in plain PyTorch

GPU (issue 6): B=64, hw_p=12, T=4, C=12 (S2 as one bandset), D=768, p in {1, 2, 4, 8}, bf16
(the reference trains with bf16 parameters). CPU: a small fp32 size so the suite stays short.
`min_bytes` is the fused op's compulsory HBM traffic (read pixels, write tokens; backward:
read pixels and dY), to turn a time into achieved bandwidth.
"""

from __future__ import annotations

import pytest
import torch

from olmoearth_fast.ops.band_dropout import band_dropout_keep
from olmoearth_fast.ops.patch_embed import (
    patch_embed,
    patch_embed_effective,
    patch_embed_ref,
)

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if ON_GPU:
    SIZE = dict(B=64, hw_p=12, T=4, C=12, D=768)
    DTYPE = torch.bfloat16
else:
    SIZE = dict(B=4, hw_p=6, T=2, C=12, D=128)
    DTYPE = torch.float32

_compiled_ref = None


def _provider_fn(provider: str):
    global _compiled_ref
    if provider == "ours":
        return patch_embed
    if provider == "ref":
        return patch_embed_ref
    if provider == "effective":
        return patch_embed_effective
    if provider == "compile_ref":
        if _compiled_ref is None:
            # One static graph per shape (automatic dynamic shapes trip an Inductor bug here).
            _compiled_ref = torch.compile(patch_embed_ref, dynamic=False)
        return _compiled_ref
    raise ValueError(provider)


@pytest.mark.parametrize("provider", ["ref", "ours", "compile_ref", "effective"])
@pytest.mark.parametrize("p", [1, 2, 4, 8])
def test_bench_patch_embed(bench, provider, p):
    B, hw, T, C, D = (SIZE[k] for k in ("B", "hw_p", "T", "C", "D"))
    H = W = hw * p
    g = torch.Generator(device=DEVICE).manual_seed(p)
    x = torch.randn(B, H, W, T, C, device=DEVICE, generator=g).to(DTYPE)
    x[:, :2, :2] = -99999.0  # some missing pixels, as in real batches
    band_index = torch.arange(C, device=DEVICE)  # S2 single bandset: gather of all 12 bands
    keep = band_dropout_keep(B, C, 0.3, random_rate=True, generator=g, device=DEVICE)
    weight = (torch.rand(D, C, 8, 8, device=DEVICE, generator=g) * 2 - 1) / (64 * C) ** 0.5
    bias = torch.zeros(D, device=DEVICE)
    if provider != "ours":  # the reference path computes in the input dtype
        weight, bias = weight.to(DTYPE), bias.to(DTYPE)
    weight.requires_grad_()
    bias.requires_grad_()
    grad = torch.randn(B, hw, hw, T, D, device=DEVICE, generator=g).to(DTYPE)
    fn = _provider_fn(provider)

    def step():
        weight.grad = bias.grad = None
        out = fn(x, weight, bias, p, keep, band_index)
        out.backward(grad)
        return out

    elt = x.element_size()
    min_bytes = 2 * x.numel() * elt + 2 * grad.numel() * elt  # fwd read+write, bwd read+read
    bench(step, group=f"patch_embed fwd+bwd p={p} B={B} hw_p={hw} T={T} C={C} D={D} "
                      f"{str(DTYPE).removeprefix('torch.')}",
          provider=provider, p=p, dtype=str(DTYPE), min_bytes=min_bytes, **SIZE)
