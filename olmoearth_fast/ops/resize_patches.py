"""The patch embedding's resize, laid out as one row per token (C++ op in csrc/resize_patches.cpp).

``resize_patches(x, band_index, patch_size, base)`` takes a bandset's bands of ``x [B, H, W, T,
C_all]`` (channels last, as the data arrive), resizes every image (b, t) by ``base / patch_size``
with PyTorch's antialiased bicubic (the reference's resize, docs/reference_semantics.md §3.2; none
when ``patch_size == base``) and returns ``[B·T·h·w, base·base·C]``: row ``((b·T + t)·h + i)·w + j``
is token (i, j)'s ``base×base`` resized pixels, pixel-major with the C bands innermost
(`resize_patches_ref`: `F.interpolate`, then the same layout). The projection of a token is then
one row times the weight permuted to ``[D, base, base, C]``, and a step's rows are a row gather.

The resize is separable; each axis's taps (first input, weights, count per output pixel) are
read from `F.interpolate` itself (a resize of one-hot images), so the op applies PyTorch's own
float weights, width first, then height, each sum in tap order (checked against
`F.interpolate` in tests/test_resize_patches.py). Forward only: the data need no gradient.
fp32 on CPU; other dtypes and devices take `resize_patches_ref`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from olmoearth_fast import _C  # noqa: F401  (loads the C++ library: registers the ops)

_ops = torch.ops.olmoearth_fast

__all__ = ["resize_images", "resize_patches", "resize_patches_ref", "uses_kernel"]


def uses_kernel(x: Tensor) -> bool:
    """Whether `resize_patches` takes the C++ op for data like ``x``."""
    return x.device.type == "cpu" and x.dtype == torch.float32


@functools.lru_cache(maxsize=256)
def _axis_taps(in_size: int, out_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(start [out] int64, weights [out, S] fp32, count [out] int64) of one axis: PyTorch's
    antialiased bicubic weights, from its resize of the ``in_size`` one-hot rows."""
    if in_size == out_size:  # patch_size == base: no resize, each pixel is its own tap
        return (torch.arange(out_size), torch.ones(out_size, 1), torch.ones(out_size, dtype=torch.long))
    eye = torch.eye(in_size, dtype=torch.float32)[:, None, None, :]  # image k: input pixel k set
    m = F.interpolate(eye, size=(1, out_size), mode="bicubic", antialias=True)[:, 0, 0, :].T  # [out, in]
    # PyTorch's support window per output (not only the nonzero weights: a window tap may weigh 0)
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    start, count = [], []
    for o in range(out_size):
        center = scale * (o + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        start.append(lo)
        count.append(hi - lo)
    w = torch.zeros(out_size, max(count))
    outside = m.clone()  # what PyTorch weighs outside the window: nothing
    for o, (lo, n) in enumerate(zip(start, count)):
        w[o, :n] = m[o, lo:lo + n]
        outside[o, lo:lo + n] = 0
    if outside.abs().max() > 0:  # the window formula no longer matches PyTorch's
        raise AssertionError(f"resize_patches: PyTorch's weights for {in_size} -> {out_size} leave the window")
    return torch.tensor(start), w.contiguous(), torch.tensor(count)


def _check(x: Tensor, band_index: Tensor | None, patch_size: int, base: int) -> None:
    if x.dim() != 5:
        raise ValueError(f"resize_patches: x must be [B, H, W, T, C_all], got {tuple(x.shape)}")
    if not 1 <= patch_size <= base:
        raise ValueError(f"resize_patches: need 1 <= patch_size <= base={base}, got {patch_size}")
    if x.shape[1] % patch_size or x.shape[2] % patch_size:
        raise ValueError(f"resize_patches: H={x.shape[1]} and W={x.shape[2]} must be multiples of "
                         f"patch_size={patch_size}")
    if band_index is not None and (band_index.dim() != 1 or band_index.numel() == 0):
        raise ValueError(f"resize_patches: band_index must be a non-empty 1-D tensor, got {tuple(band_index.shape)}")


def resize_images(img: Tensor, size: tuple[int, int]) -> Tensor:
    """The reference's resize of ``[N, C, H, W]`` images: antialiased bicubic to ``size``."""
    if img.device.type == "cpu" and img.dtype in (torch.bfloat16, torch.float16):
        # PyTorch's CPU antialiased bicubic has no half kernels; CUDA's computes in fp32 and
        # rounds the output, which this reproduces.
        return F.interpolate(img.float(), size=size, mode="bicubic", antialias=True).to(img.dtype)
    return F.interpolate(img, size=size, mode="bicubic", antialias=True)


def resize_patches_ref(x: Tensor, band_index: Tensor | None, patch_size: int, base: int = 8) -> Tensor:
    """`resize_images` on the gathered ``[(B T), C, H, W]`` images, then one row per token."""
    _check(x, band_index, patch_size, base)
    if band_index is not None:
        x = x.index_select(-1, band_index)
    B, H, W, T, C = x.shape
    img = x.permute(0, 3, 4, 1, 2).reshape(B * T, C, H, W)
    h, w = H // patch_size, W // patch_size
    if patch_size != base:
        img = resize_images(img, (h * base, w * base))
    patches = img.reshape(B * T, C, h, base, w, base).permute(0, 2, 4, 3, 5, 1)  # [(B T), h, w, u, v, C]
    return patches.reshape(B * T * h * w, base * base * C)


def resize_patches(x: Tensor, band_index: Tensor | None, patch_size: int, base: int = 8) -> Tensor:
    """The resized bands of ``x`` as ``[B·T·h·w, base·base·C]`` token rows (see the module)."""
    _check(x, band_index, patch_size, base)
    if not uses_kernel(x):
        return resize_patches_ref(x, band_index, patch_size, base)
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError("resize_patches: x requires grad, but the C++ op has no backward (the data need "
                         "none): pass x.detach(), or use resize_patches_ref for a differentiable resize")
    H, W = x.shape[1], x.shape[2]
    if band_index is None:
        band_index = torch.arange(x.shape[-1])
    rows = _axis_taps(H, H // patch_size * base)
    cols = _axis_taps(W, W // patch_size * base)
    return _ops.resize_patches(x.contiguous(), band_index.to("cpu", torch.long).contiguous(), *rows, *cols, base)
