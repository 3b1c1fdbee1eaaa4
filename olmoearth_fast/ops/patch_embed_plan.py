"""The effective kernel of the patch embedding: resize and 8x8 projection composed into one map.

`patch_embed` (`olmoearth_fast.ops.patch_embed`) upsamples each image by 8/p with antialiased
bicubic, then applies an 8x8/stride-8 conv (the reference's order, docs/reference_semantics.md
§3.2). Both steps are linear and separable, so token (i, j) is one dot product of its input
window of K = p + 4 pixels per axis (its own p pixels plus a 2-pixel halo, the reach of the
Keys cubic) with an effective weight. The resize renormalises its taps where they leave the
image, so the first and last ceil(2/p) token rows and columns get their own weights ("token
classes"); interior tokens share one.

This module builds that mapping for one (p, H, W) (`effective_plan`, cached), composes a conv
weight with it (`effective_weights`) and maps a gradient back (`effective_weight_grad`). The
PyTorch effective path (`patch_embed_effective`) and the Triton kernel
(`olmoearth_fast.kernels.patch_embed`) both run on it.

Precision: the maps are float64; the composition runs in fp32 (fp64 for an fp64 weight) with
autocast off, so a caller's bf16 autocast cannot round the maps and the weights to 8 bits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from olmoearth_fast.ops import no_autocast

__all__ = [
    "EffectivePlan",
    "aa_bicubic_matrix",
    "effective_plan",
    "effective_weight_grad",
    "effective_weights",
]

# Reach of the Keys cubic when upsampling: taps at |d| < 2 input pixels, so a token of p pixels
# reads p + 2*2 pixels per axis (derivation in `_axis_classes`).
HALO = 2


def _keys_cubic(d: Tensor, a: float = -0.5) -> Tensor:
    """Keys cubic convolution kernel; PyTorch's antialiased bicubic uses a = -0.5 (PIL)."""
    d = d.abs()
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return torch.where(d < 1, near, torch.where(d < 2, far, torch.zeros_like(d)))


@functools.lru_cache(maxsize=256)
def _aa_bicubic_matrix_cached(in_size: int, out_size: int) -> Tensor:
    scale = in_size / out_size  # what F.interpolate derives from size= (align_corners=False)
    # Antialias widens the support by the scale only when downsampling (scale > 1).
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        # int() truncates toward zero, like the C++ static_cast, before clamping to the image.
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = _keys_cubic((torch.arange(lo, hi, dtype=torch.float64) - center + 0.5) * inv_scale)
        m[i, lo:hi] = taps / taps.sum()  # renormalised per output pixel (truncated at borders)
    return m


def aa_bicubic_matrix(in_size: int, out_size: int) -> Tensor:
    """1-D matrix [out, in] (float64) of `F.interpolate(mode="bicubic", antialias=True)`.

    The 2-D resize is separable: resized = M_h @ img @ M_w^T. Weights follow PyTorch's
    antialiased path: Keys a = -0.5, support 2 input pixels (scaled when downsampling),
    truncated at the image border and normalised to sum 1 per output pixel.
    """
    return _aa_bicubic_matrix_cached(int(in_size), int(out_size)).clone()


@dataclass(frozen=True, eq=False)  # identity semantics: plans are cached singletons
class EffectivePlan:
    """Token classes and 1-D effective maps of one (patch size, H, W).

    Attributes:
        patch_size: p.
        base: Conv kernel size k (8).
        taps: K, effective taps per axis (p + 4, or k when p == k).
        halo: Input pixels read before a token's own p pixels (2, or 0 when p == k).
        row_classes: (first token row, number of rows) per row class.
        col_classes: Same for columns.
        row_maps: [n_row_classes, k, K] float64: resized row u of a token <- input tap kk.
        col_maps: [n_col_classes, k, K] float64.
    """

    patch_size: int
    base: int
    taps: int
    halo: int
    row_classes: tuple[tuple[int, int], ...]
    col_classes: tuple[tuple[int, int], ...]
    row_maps: Tensor
    col_maps: Tensor

    @property
    def num_classes(self) -> int:
        return len(self.row_classes) * len(self.col_classes)

    def class_rects(self) -> list[tuple[int, int, int, int]]:
        """(i0, ni, j0, nj) per class q = row_class * n_col_classes + col_class."""
        return [(i0, ni, j0, nj) for i0, ni in self.row_classes for j0, nj in self.col_classes]


def _axis_classes(size: int, p: int, base: int) -> tuple[tuple[tuple[int, int], ...], Tensor]:
    """Token classes and per-class [base, K] maps along one axis of `size` input pixels."""
    n_tok = size // p
    if p == base:  # no resize: the conv reads each token's own pixels
        return ((0, n_tok),), torch.eye(base, dtype=torch.float64)[None]
    K = p + 2 * HALO
    m = _aa_bicubic_matrix_cached(size, n_tok * base)  # [n_tok*base, size]
    # Token i's resized rows base*i .. base*i+base-1 have centres in [p*i, p*i + p) and taps
    # h with |h + 0.5 - centre| < 2, i.e. h in [p*i - 2, p*i + p + 1]: K = p + 4 taps.
    padded = F.pad(m, (HALO, HALO))  # column h + HALO holds input pixel h
    maps = torch.stack([padded[base * i: base * (i + 1), p * i: p * i + K] for i in range(n_tok)])
    if not torch.allclose(maps.sum((1, 2)), torch.full((n_tok,), float(base), dtype=m.dtype)):
        raise AssertionError("effective_plan: resize taps fall outside the p+4 window")
    # A token is interior when its whole window lies inside the image: then nothing was
    # truncated, and its map is the translation-invariant interior one.
    interior = [i for i in range(n_tok) if p * i - HALO >= 0 and p * i + p + HALO <= size]
    classes: list[tuple[int, int]] = []
    reps: list[int] = []
    i = 0
    while i < n_tok:
        if interior and i == interior[0]:
            classes.append((i, len(interior)))
            reps.append(i)
            if not all(torch.equal(maps[j], maps[i]) for j in interior):
                raise AssertionError("effective_plan: interior taps are not translation-invariant")
            i += len(interior)
        else:
            classes.append((i, 1))
            reps.append(i)
            i += 1
    return tuple(classes), maps[reps].contiguous()


@functools.lru_cache(maxsize=256)
def effective_plan(patch_size: int, height: int, width: int, base: int = 8) -> EffectivePlan:
    """Token classes and 1-D effective maps for a p x p patch on a `height` x `width` image.

    Args:
        patch_size: p in [1, base]; height and width must be multiples of p.
        height: Image height H in pixels.
        width: Image width W in pixels.
        base: Conv kernel size (the reference's max patch size, 8).

    Returns:
        The cached EffectivePlan (its tensors are float64 on CPU; treat them as read-only).
    """
    p = patch_size
    if not 1 <= p <= base or height % p or width % p:
        raise ValueError(f"effective_plan: need 1 <= p <= {base} dividing H, W; got p={p}, "
                         f"H={height}, W={width}")
    rows, row_maps = _axis_classes(height, p, base)
    cols, col_maps = _axis_classes(width, p, base)
    taps = base if p == base else p + 2 * HALO
    halo = 0 if p == base else HALO
    return EffectivePlan(p, base, taps, halo, rows, cols, row_maps, col_maps)


@functools.lru_cache(maxsize=128)
def _maps_on(
    plan: EffectivePlan, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Row and column maps as [k, n_classes*K] on `device` (cached: no per-call H2D copy)."""
    k = plan.base
    a_r = plan.row_maps.permute(1, 0, 2).reshape(k, -1)
    a_c = plan.col_maps.permute(1, 0, 2).reshape(k, -1)
    return a_r.to(device, dtype), a_c.to(device, dtype)


def effective_weights(weight: Tensor, plan: EffectivePlan) -> Tensor:
    """Compose the conv weight with the resize: E[q, kh, kw, c, d], shape [nq, K, K, C, D].

    E[q] = sum_{u,v} A_r[u, kh] * A_c[v, kw] * weight[d, c, u, v] for class q = (r, c); token
    (i, j) of class q is then sum_{kh,kw,c} E[q, kh, kw, c, :] * x[p*i - halo + kh,
    p*j - halo + kw, c]. Two GEMMs over all classes at once; float32 (float64 for a float64
    weight) whatever the caller's autocast; differentiable.
    """
    dt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    D, C, k = weight.shape[0], weight.shape[1], weight.shape[2]
    nr, nc, K = len(plan.row_classes), len(plan.col_classes), plan.taps
    a_r, a_c = _maps_on(plan, weight.device, dt)  # [u, (i kh)], [v, (j kw)]
    with no_autocast(weight.device):  # bf16 autocast would round maps and weights to 8 bits
        half = weight.to(dt).reshape(D * C * k, k) @ a_c  # [(d c u), (j kw)]
        full = a_r.T @ half.reshape(D * C, k, nc * K)  # [(d c), (i kh), (j kw)]
    e = full.reshape(D, C, nr, K, nc, K).permute(2, 4, 3, 5, 1, 0)  # [i, j, kh, kw, c, d]
    return e.reshape(nr * nc, K, K, C, D).contiguous()


def effective_weight_grad(grad_e: Tensor, plan: EffectivePlan) -> Tensor:
    """Map dL/dE [nq, K, K, C, D] back to dL/dweight [D, C, k, k] (adjoint of effective_weights)."""
    nr, nc, K = len(plan.row_classes), len(plan.col_classes), plan.taps
    C, D = grad_e.shape[-2], grad_e.shape[-1]
    k = plan.base
    a_r, a_c = _maps_on(plan, grad_e.device, grad_e.dtype)
    g = grad_e.reshape(nr, nc, K, K, C, D).permute(5, 4, 0, 2, 1, 3)  # [d, c, i, kh, j, kw]
    with no_autocast(grad_e.device):  # in grad_e's dtype (fp32), like effective_weights
        half = a_r @ g.reshape(D * C, nr * K, nc * K)  # [(d c), u, (j kw)]
        return (half.reshape(D * C * k, nc * K) @ a_c.T).reshape(D, C, k, k)

