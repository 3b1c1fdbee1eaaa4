"""Error scale of the patch embedding near missing pixels (for the patch-embed tests).

A -99999 pixel enters the resize and the conv as an ordinary value (as in the reference), so a
token near one sums terms of ~1e5 that may cancel to a small result; float rounding of any
implementation is then O(eps * sum |term|), far above a relative tolerance of the result.
`patch_embed_abs_scale` gives that sum of |terms| per output (and weight-gradient) entry.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from olmoearth_fast.ops.patch_embed_plan import aa_bicubic_matrix


@torch.no_grad()
def patch_embed_abs_scale(
    x: Tensor,
    weight: Tensor,
    patch_size: int,
    keep: Tensor | None = None,
    band_index: Tensor | None = None,
    grad: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Magnitude of the terms summed into each output (and weight-gradient) entry.

    out_scale = conv(|weight|, |R_h| |x * keep| |R_w|^T) bounds sum |term| for both the
    reference (resize then conv) and the effective path (|E| <= |W| |R| |R|), so float
    rounding of either is O(eps * out_scale). Near a missing pixel (-99999) out_scale is
    ~1e5 while the output may be small after cancellation: this is the scale an error bound
    has to use there. With `grad`, also the same bound for dL/dweight (sum over tokens).

    Returns:
        (out_scale [B,h,w,T,D], weight_grad_scale [D,C,k,k] or None), float64.
    """
    B, H, W, T = x.shape[:4]
    base = weight.shape[-1]
    img = x.double()
    if band_index is not None:
        img = torch.index_select(img, -1, band_index)
    if keep is not None:
        img = img * keep.double()[:, None, None, None, :]
    img = img.abs().permute(0, 3, 4, 1, 2).reshape(B * T, -1, H, W)
    if patch_size != base:
        r_h = aa_bicubic_matrix(H, H // patch_size * base).abs().to(x.device)
        r_w = aa_bicubic_matrix(W, W // patch_size * base).abs().to(x.device)
        img = r_h @ img @ r_w.T
    w_abs = weight.double().abs()
    out = F.conv2d(img, w_abs, stride=base)
    D, h, w = out.shape[1:]
    out = out.reshape(B, T, D, h, w).permute(0, 3, 4, 1, 2)
    if grad is None:
        return out, None
    g = grad.double().abs().permute(0, 3, 4, 1, 2).reshape(B * T, D, h, w)
    gw = torch.ops.aten.convolution_backward(g, img, w_abs, None, [base, base], [0, 0], [1, 1],
                                             False, [0, 0], 1, [False, True, False])[1]
    return out, gw
