"""Flexible-patch patch embedding of one bandset: the op, its reference and its effective path.

One (modality, bandset) of the reference (docs/reference_semantics.md §3.2) computes, in order:

    x = index_select(data, -1, band_index)                    # [B,H,W,T,C]
    x = x * keep[:, None, None, None, :]                       # band dropout, no rescale (§3.3)
    x = "b h w t c -> (b t) c h w"
    x = F.interpolate(x, (H/p*8, W/p*8), "bicubic", antialias=True)   # only when p != 8
    y = Conv2d(C, D, 8, stride=8)(x) -> [B, H/p, W/p, T, D]

Missing pixels (-99999) are ordinary values throughout: they enter the resize and bleed into
neighbouring tokens, exactly as in the reference (§3.4).

Three implementations compute it:

* `patch_embed_ref`: the order above, literally (used on CPU and as the test oracle).
* `patch_embed_effective`: resize and conv are both linear, so "resize then 8x8/stride-8 conv"
  equals one stride-p conv of the original pixels with an effective kernel of K = p+4 taps per
  axis, one kernel per token class (`olmoearth_fast.ops.patch_embed_plan`). Plain PyTorch,
  differentiable; it is the CPU mirror of the fused Triton kernel.
* the Triton kernel (`olmoearth_fast.kernels.patch_embed`): the same effective weights, one
  kernel that reads the channels-last input once, with the band gather and the keep multiplier
  folded into its loads. Backward = dW through the effective-kernel mapping, and dbias.

`patch_embed` is the registered op (custom_op + fake + autograd, so it works under
torch.compile). impl="auto" runs the Triton kernel on CUDA and the reference on CPU, where it
is bit-identical to the reference package; OLMOEARTH_FAST_KERNELS overrides the choice
(`olmoearth_fast.ops.forced_kernels`). The keep multiplier comes from
`olmoearth_fast.ops.band_dropout.band_dropout_keep`.

Precision: every path computes in x.dtype, whatever autocast the caller runs under (autocast is
switched off inside; the model casts x to the autocast dtype itself). The effective weights are
always composed in fp32 (fp64 for an fp64 weight), see `patch_embed_plan`.

Determinism: the Triton backward reduces its per-chunk partials in a fixed order (no atomics),
so fwd + bwd are run-to-run deterministic on a GPU, as the reference paths are.
"""

from __future__ import annotations

import functools
import importlib.util
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from olmoearth_fast.ops import forced_kernels, no_autocast
from olmoearth_fast.ops.patch_embed_plan import (
    EffectivePlan,
    effective_plan,
    effective_weight_grad,
    effective_weights,
)
from olmoearth_fast.ops.resize_patches import resize_images, resize_patches

__all__ = [
    "embeds_only_rows",
    "patch_embed",
    "patch_embed_effective",
    "patch_embed_multi",
    "patch_embed_ref",
    "patch_embed_rows",
    "patch_embed_rows_ref",
]

IMPLS = ("auto", "ref", "effective", "triton")


# --------------------------------------------------------------------------------------------
# Reference path
# --------------------------------------------------------------------------------------------

# band_index tensors already validated: id -> (weak reference, version at the check)
_CHECKED_BAND_INDEX: dict[int, tuple[weakref.ref, int]] = {}


def _band_index_checked(band_index: Tensor) -> bool:
    ref = _CHECKED_BAND_INDEX.get(id(band_index))
    return ref is not None and ref[0]() is band_index and ref[1] == band_index._version


def _remember_band_index(band_index: Tensor) -> None:
    if len(_CHECKED_BAND_INDEX) > 4096:  # dead entries of short-lived tensors
        for k in [k for k, (r, _) in _CHECKED_BAND_INDEX.items() if r() is None]:
            del _CHECKED_BAND_INDEX[k]
    _CHECKED_BAND_INDEX[id(band_index)] = (weakref.ref(band_index), band_index._version)


def _check_inputs(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    patch_size: int,
    keep: Tensor | None,
    band_index: Tensor | None,
) -> None:
    """Raise a clear error for any malformed argument of the patch-embed functions."""
    if x.dim() != 5:
        raise ValueError(f"patch_embed: x must be [B,H,W,T,C] (5-D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"patch_embed: x must be floating point, got {x.dtype}")
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"patch_embed: weight must be [D,C,k,k], got {tuple(weight.shape)}")
    B, H, W, T, c_all = x.shape
    D, C, base = weight.shape[0], weight.shape[1], weight.shape[2]
    if band_index is not None:
        if band_index.dim() != 1 or band_index.dtype not in (torch.int32, torch.int64):
            raise ValueError("patch_embed: band_index must be a 1-D int32/int64 tensor, got "
                             f"{band_index.dtype} {tuple(band_index.shape)}")
        if band_index.numel() != C:
            raise ValueError(f"patch_embed: band_index has {band_index.numel()} bands but weight "
                             f"has C={C} input channels")
        if band_index.device != x.device:
            raise ValueError(f"patch_embed: band_index is on {band_index.device}, x on {x.device}")
        # Value check only where it costs no device sync (and not on fake tensors), once per
        # index tensor: a module's band buffers are checked on their first call, not every step.
        if (band_index.device.type == "cpu" and band_index.numel() and not torch.compiler.is_compiling()
                and not _band_index_checked(band_index)):
            if int(band_index.min()) < 0 or int(band_index.max()) >= c_all:
                raise ValueError(f"patch_embed: band_index values must lie in [0, {c_all}), got "
                                 f"{band_index.tolist()}")
            _remember_band_index(band_index)
    elif c_all != C:
        raise ValueError(f"patch_embed: x has {c_all} channels but weight has C={C} (pass "
                         "band_index to gather a bandset)")
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"patch_embed: bias must be [D]=[{D}], got {tuple(bias.shape)}")
    if isinstance(patch_size, bool) or not isinstance(patch_size, int):
        raise TypeError(f"patch_embed: patch_size must be an int, got {patch_size!r}")
    if not 1 <= patch_size <= base:
        raise ValueError(f"patch_embed: patch_size must be in [1, {base}] (the weight's kernel "
                         f"size), got {patch_size}")
    if H % patch_size or W % patch_size:
        raise ValueError(f"patch_embed: H={H} and W={W} must be multiples of patch_size="
                         f"{patch_size}")
    if keep is not None and tuple(keep.shape) != (B, C):
        raise ValueError(f"patch_embed: keep must be [B,C]=[{B},{C}], got {tuple(keep.shape)}")


def _gather_drop_resize(
    x: Tensor, patch_size: int, base: int, keep: Tensor | None, band_index: Tensor | None
) -> Tensor:
    """Steps 1-4 of the reference: gather, keep multiply, to [(B T), C, H, W], resize."""
    if band_index is not None:
        x = torch.index_select(x, -1, band_index)
    if keep is not None:
        x = x * keep.to(x.dtype)[:, None, None, None, :]
    B, H, W, T, C = x.shape
    x = x.permute(0, 3, 4, 1, 2).reshape(B * T, C, H, W)
    if patch_size != base:
        x = resize_images(x, (H // patch_size * base, W // patch_size * base))
    return x


def patch_embed_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    patch_size: int,
    keep: Tensor | None = None,
    band_index: Tensor | None = None,
) -> Tensor:
    """Reference patch embedding, in the reference's order of operations (module docstring).

    Args:
        x: [B,H,W,T,C_all] channels-last (or the gathered [B,H,W,T,C] when band_index is None).
        weight: Conv weight [D,C,k,k] (k = 8 = max patch size); cast to x.dtype.
        bias: [D] or None.
        patch_size: p in [1, k]; H and W must be multiples of p.
        keep: Optional [B,C] band-dropout multiplier (0/1).
        band_index: Optional [C] indices into the last axis of x.

    Returns:
        [B, H/p, W/p, T, D] in x.dtype, contiguous.
    """
    _check_inputs(x, weight, bias, patch_size, keep, band_index)
    B, T = x.shape[0], x.shape[3]
    base = weight.shape[-1]
    img = _gather_drop_resize(x, patch_size, base, keep, band_index)
    b = None if bias is None else bias.to(x.dtype)
    y = F.conv2d(img, weight.to(x.dtype), b, stride=base)  # [(B T), D, h, w]
    D, h, w = y.shape[1:]
    return y.reshape(B, T, D, h, w).permute(0, 3, 4, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# Effective-kernel path (PyTorch)
# --------------------------------------------------------------------------------------------


def _padded_channels_last(
    x: Tensor, plan: EffectivePlan, keep: Tensor | None, band_index: Tensor | None
) -> Tensor:
    """Gather + keep multiply (the reference's first steps), as [(B T), H+2h, W+2h, C] with a
    zero halo h: padded taps carry zero weight, so padding only keeps windows in bounds."""
    if band_index is not None:
        x = torch.index_select(x, -1, band_index)
    if keep is not None:
        x = x * keep.to(x.dtype)[:, None, None, None, :]
    B, H, W, T, C = x.shape
    x = x.permute(0, 3, 1, 2, 4)
    if plan.halo:
        x = F.pad(x, (0, 0) + (plan.halo,) * 4)
    return x.reshape(B * T, H + 2 * plan.halo, W + 2 * plan.halo, C)


def _class_windows(img: Tensor, plan: EffectivePlan, q: int) -> Tensor:
    """Input windows of class q's tokens as a [(BT ni nj), K*K*C] matrix (a strided gather)."""
    i0, ni, j0, nj = plan.class_rects()[q]
    p, K = plan.patch_size, plan.taps
    s = img.stride()
    win = img[:, p * i0:, p * j0:].as_strided(
        (img.shape[0], ni, nj, K, K, img.shape[3]), (s[0], p * s[1], p * s[2], s[1], s[2], s[3]))
    return win.reshape(-1, K * K * img.shape[3])


def patch_embed_effective(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    patch_size: int,
    keep: Tensor | None = None,
    band_index: Tensor | None = None,
) -> Tensor:
    """Effective-kernel patch embedding in plain PyTorch (differentiable through autograd).

    Builds the per-class effective weights, then per token class one GEMM of the class's input
    windows [tokens, K*K*C] with its weight [K*K*C, D]: the CPU mirror of the Triton kernel.
    Same arguments and result as `patch_embed_ref`, equal to it up to float rounding.
    """
    _check_inputs(x, weight, bias, patch_size, keep, band_index)
    B, H, W, T = x.shape[:4]
    D, C, base = weight.shape[0], weight.shape[1], weight.shape[-1]
    plan = effective_plan(patch_size, H, W, base)
    K = plan.taps
    e = effective_weights(weight, plan).to(x.dtype).reshape(plan.num_classes, K * K * C, D)
    img = _padded_channels_last(x, plan, keep, band_index)
    h, w = H // patch_size, W // patch_size
    # Assemble the class rectangles with cat, not slice assignment: autograd's CopySlices
    # would clone the whole output gradient once per class (25 classes at p = 1).
    rects = plan.class_rects()
    n_cols = len(plan.col_classes)
    e = e.unbind(0)  # one backward node; e[q] would zero-fill all of dE once per class
    rows = []
    for r in range(len(plan.row_classes)):
        tiles = []
        for q in range(r * n_cols, (r + 1) * n_cols):
            _, ni, _, nj = rects[q]
            tiles.append((_class_windows(img, plan, q) @ e[q]).reshape(B * T, ni, nj, D))
        rows.append(torch.cat(tiles, dim=2))
    out = torch.cat(rows, dim=1)  # [(B T), h, w, D]
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.reshape(B, T, h, w, D).permute(0, 2, 3, 1, 4).contiguous()


def _effective_backward(
    grad: Tensor, x: Tensor, weight: Tensor, patch_size: int, keep: Tensor | None,
    band_index: Tensor | None,
) -> Tensor:
    """dL/dweight of `patch_embed_effective`: per class windows^T @ dY, mapped back to 8x8."""
    B, H, W, T = x.shape[:4]
    D, C, base = weight.shape[0], weight.shape[1], weight.shape[-1]
    plan = effective_plan(patch_size, H, W, base)
    K = plan.taps
    img = _padded_channels_last(x, plan, keep, band_index)
    g = grad.to(x.dtype).permute(0, 3, 1, 2, 4)  # [B, T, h, w, D]
    g = g.reshape(B * T, H // patch_size, W // patch_size, D)
    grad_e = torch.empty(plan.num_classes, K * K * C, D, dtype=torch.float32, device=x.device)
    for q, (i0, ni, j0, nj) in enumerate(plan.class_rects()):
        g_q = g[:, i0:i0 + ni, j0:j0 + nj].reshape(-1, D)
        grad_e[q] = _class_windows(img, plan, q).float().T @ g_q.float()  # fp32 accumulate
    return effective_weight_grad(grad_e.reshape(plan.num_classes, K, K, C, D), plan)


# --------------------------------------------------------------------------------------------
# Registered op
# --------------------------------------------------------------------------------------------


_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _resolve_impl(impl: str, x: Tensor) -> str:
    if impl == "auto":
        forced = forced_kernels()
        if forced is not None:
            return "triton" if forced == "triton" and x.dtype in _TRITON_DTYPES else "ref"
        fused = x.device.type == "cuda" and x.dtype in _TRITON_DTYPES and _have_triton()
        return "triton" if fused else "ref"
    if impl == "triton" and x.dtype not in _TRITON_DTYPES:
        raise TypeError(f"patch_embed: impl='triton' supports x in {_TRITON_DTYPES}, got {x.dtype}")
    return impl


@torch.library.custom_op("olmoearth_fast::patch_embed", mutates_args=())
def _patch_embed_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    patch_size: int,
    keep: Tensor | None,
    band_index: Tensor | None,
    impl: str,
) -> Tensor:
    impl = _resolve_impl(impl, x)
    with no_autocast(x.device):
        if impl == "ref":
            return patch_embed_ref(x, weight, bias, patch_size, keep, band_index)
        if impl == "effective":
            return patch_embed_effective(x, weight, bias, patch_size, keep, band_index)
        from olmoearth_fast.kernels.patch_embed import patch_embed_fwd

        B, H, W, T = x.shape[:4]
        plan = effective_plan(patch_size, H, W, weight.shape[-1])
        e = effective_weights(weight, plan)
        return patch_embed_fwd(x, e, bias, plan, keep, band_index)


@_patch_embed_op.register_fake
def _(x, weight, bias, patch_size, keep, band_index, impl):
    B, H, W, T = x.shape[:4]
    return x.new_empty(B, H // patch_size, W // patch_size, T, weight.shape[0])


@torch.library.custom_op("olmoearth_fast::patch_embed_backward", mutates_args=())
def _patch_embed_backward_op(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    patch_size: int,
    keep: Tensor | None,
    band_index: Tensor | None,
    impl: str,
) -> tuple[Tensor, Tensor]:
    with no_autocast(x.device):
        return _patch_embed_backward(grad, x, weight, patch_size, keep, band_index,
                                     _resolve_impl(impl, x))


def _patch_embed_backward(grad, x, weight, patch_size, keep, band_index, impl):
    grad = grad.contiguous()
    grad_bias = grad.sum(dim=(0, 1, 2, 3), dtype=torch.float32).to(weight.dtype)
    if impl == "ref":
        base = weight.shape[-1]
        img = _gather_drop_resize(x, patch_size, base, keep, band_index)
        B, h, w, T, D = grad.shape
        g = grad.to(x.dtype).permute(0, 3, 4, 1, 2).reshape(B * T, D, h, w)
        # What autograd of the reference's Conv2d computes for its weight.
        grad_weight = torch.ops.aten.convolution_backward(
            g, img, weight.to(x.dtype), None, [base, base], [0, 0], [1, 1], False, [0, 0], 1,
            [False, True, False])[1]
    elif impl == "effective":
        grad_weight = _effective_backward(grad, x, weight, patch_size, keep, band_index)
    else:
        from olmoearth_fast.kernels.patch_embed import patch_embed_bwd_effective

        B, H, W, T = x.shape[:4]
        plan = effective_plan(patch_size, H, W, weight.shape[-1])
        grad_e = patch_embed_bwd_effective(grad, x, plan, weight.shape[1], keep, band_index)
        grad_weight = effective_weight_grad(grad_e, plan)
    return grad_weight.to(weight.dtype).contiguous(), grad_bias


@_patch_embed_backward_op.register_fake
def _(grad, x, weight, patch_size, keep, band_index, impl):
    return weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, patch_size, keep, band_index, impl = inputs
    ctx.save_for_backward(x, weight, keep, band_index)
    ctx.patch_size, ctx.impl, ctx.has_bias = patch_size, impl, bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    x, weight, keep, band_index = ctx.saved_tensors
    need_w, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    grad_weight = grad_bias = None
    if need_w or need_b:
        gw, gb = _patch_embed_backward_op(grad, x, weight, ctx.patch_size, keep, band_index,
                                          ctx.impl)
        grad_weight = gw if need_w else None
        grad_bias = gb.to(ctx.bias_dtype) if need_b else None
    # Pixels, the keep multiplier and the band indices get no gradient (data, not parameters).
    return None, grad_weight, grad_bias, None, None, None, None


_patch_embed_op.register_autograd(_backward, setup_context=_setup_context)


def patch_embed(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    patch_size: int,
    keep: Tensor | None = None,
    band_index: Tensor | None = None,
    *,
    impl: str = "auto",
) -> Tensor:
    """Band dropout + flexible-patch resize + 8x8/stride-8 projection of one bandset.

    Computes what `patch_embed_ref` computes (the reference's order of operations, missing
    values included). Gradients flow to `weight` and `bias` only.

    Args:
        x: [B,H,W,T,C_all] channels-last, any strides (or the gathered [B,H,W,T,C] when
            band_index is None); float32 or bfloat16: the compute and output dtype, also under
            autocast (switched off inside).
        weight: Conv weight [D,C,8,8] (the reference's Feb layout); any float dtype.
        bias: [D] or None.
        patch_size: p in [1, 8]; H and W must be multiples of p.
        keep: Optional [B,C] band-dropout multiplier (see `band_dropout_keep`).
        band_index: Optional [C] int64/int32 indices of the bandset's bands in x's last axis.
        impl: "auto" (Triton on CUDA, reference on CPU), "ref", "effective" (PyTorch
            effective-kernel path) or "triton" (also runs on CPU under TRITON_INTERPRET=1).

    Returns:
        [B, H/p, W/p, T, D] in x.dtype.
    """
    if impl not in IMPLS:
        raise ValueError(f"patch_embed: impl must be one of {IMPLS}, got {impl!r}")
    _check_inputs(x, weight, bias, patch_size, keep, band_index)
    if impl == "auto" and _resolve_impl(impl, x) == "ref" and not torch.compiler.is_compiling():
        # Eager CPU: plain autograd through the reference keeps the resized image for dW,
        # where the registered op's backward recomputes it (the fused GPU kernel's trade-off,
        # which only pays where the image is not stored): 1.4x faster fwd+bwd on CPU.
        # detached: the op's contract is gradients for weight and bias only
        with no_autocast(x.device):
            return patch_embed_ref(x.detach(), weight, bias, patch_size,
                                   None if keep is None else keep.detach(), band_index)
    return _patch_embed_op(x, weight, bias, patch_size, keep, band_index, impl)


def patch_embed_multi(
    x: Tensor,
    projections: list[tuple[Tensor, Tensor | None, Tensor | None]],
    patch_size: int,
    band_index: Tensor | None = None,
) -> list[Tensor]:
    """Several projections of one bandset: ``[patch_embed(x, w, b, p, keep, band_index) for
    (w, b, keep) in projections]`` (the online embedding of each view and the frozen target).

    On eager CPU the reference path resizes the gathered image once and multiplies the keep
    factors in after the resize, instead of resizing x·keep once per projection: the resize is
    linear per band and keep is 0/1 per (sample, band), so resize(x·keep) = resize(x)·keep
    exactly (0 · finite = 0, 1 · v = v). Elsewhere (CUDA: the fused kernel reads the pixels
    directly, nothing to share; torch.compile) it is the plain loop over `patch_embed`.
    """
    if not projections:
        return []
    for weight, bias, keep in projections:
        _check_inputs(x, weight, bias, patch_size, keep, band_index)
    if len(projections) == 1 or _resolve_impl("auto", x) != "ref" or torch.compiler.is_compiling():
        return [patch_embed(x, w, b, patch_size, k, band_index) for w, b, k in projections]
    base = projections[0][0].shape[-1]
    if any(w.shape[-1] != base for w, _, _ in projections):
        raise ValueError("patch_embed_multi: every weight must have the same kernel size, got "
                         f"{[tuple(w.shape) for w, _, _ in projections]}")
    with no_autocast(x.device):  # computes in x.dtype, as patch_embed does
        return _multi_ref(x, projections, patch_size, band_index, base)


def _multi_ref(x, projections, patch_size, band_index, base):
    B, T = x.shape[0], x.shape[3]
    img = _gather_drop_resize(x.detach(), patch_size, base, None, band_index)  # [(B T), C, H', W']
    out = []
    for weight, bias, keep in projections:
        # keep[b, c] on the (b t) rows, as the reference's x * keep before the resize
        xi = img if keep is None else img * keep.detach().to(img.dtype).repeat_interleave(T, 0)[:, :, None, None]
        y = F.conv2d(xi, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), stride=base)
        D, h, w = y.shape[1:]
        out.append(y.reshape(B, T, D, h, w).permute(0, 3, 4, 1, 2).contiguous())
    return out


# --------------------------------------------------------------------------------------------
# Only some tokens: the packed rows a step reads
# --------------------------------------------------------------------------------------------


def embeds_only_rows(device_type: str) -> bool:
    """Whether `patch_embed_rows` computes only the requested tokens on a ``device_type``
    device (the eager PyTorch path), or embeds every token and takes the rows (the fused
    Triton kernel on CUDA); for the work model (`olmoearth_fast.perf`)."""
    forced = forced_kernels()
    if forced is not None:
        return forced == "pytorch"
    return not (device_type == "cuda" and _have_triton())


# (weight, bias, keeps, rows, view) of one projection of `patch_embed_rows`
RowsProjection = tuple[Tensor, "Tensor | None", "list[Tensor] | None", Tensor, "Tensor | None"]


def _check_rows(keeps: list[Tensor] | None, rows: Tensor, view: Tensor | None) -> None:
    if rows.dim() != 1 or rows.dtype != torch.long:
        raise ValueError(f"patch_embed_rows: rows must be a 1-D int64 tensor, got {tuple(rows.shape)} {rows.dtype}")
    if keeps is not None and (view is None or view.shape != rows.shape):
        raise ValueError("patch_embed_rows: per-view keeps need a view index of the rows' shape, got "
                         f"{None if view is None else tuple(view.shape)} for rows {tuple(rows.shape)}")


def patch_embed_rows_ref(x: Tensor, projections: list[RowsProjection], patch_size: int,
                         band_index: Tensor | None = None) -> list[Tensor]:
    """`patch_embed_rows` as the full embedding of every token, then the rows taken from it."""
    out = []
    for weight, bias, keeps, rows, view in projections:
        _check_rows(keeps, rows, view)
        full = [patch_embed(x, weight, bias, patch_size, k, band_index) for k in (keeps or [None])]
        # [B, h, w, T, D] per view → [V, B·T·h·w, D]: rows index (b, t, i, j) of the grid
        grid = torch.stack([f.permute(0, 3, 1, 2, 4).flatten(0, 3) for f in full])
        out.append(grid[0].index_select(0, rows) if keeps is None else grid[view, rows])
    return out


def patch_embed_rows(x: Tensor, projections: list[RowsProjection], patch_size: int,
                     band_index: Tensor | None = None) -> list[Tensor]:
    """Some tokens of a bandset's patch embedding, for several projections (the online views and
    the frozen target): what `patch_embed` computes, at the given rows only.

    Each projection is ``(weight, bias, keeps, rows, view)``: ``rows [n]`` (int64) index the
    token grid flattened as ``((b·T + t)·h + i)·w + j``; ``keeps`` is None (no band dropout) or
    one ``[B, C]`` multiplier per view, and then ``view [n]`` says which view's keep row ``r``
    uses. Returns one ``[n, D]`` tensor per projection, gradients to weight and bias only.

    On eager CPU only those tokens are computed: the bands are resized once for all projections
    into one row per token (`ops.resize_patches`, the token's 8×8×C pixels), each projection
    gathers its rows, multiplies them by its keep factors (resize(x·keep) = resize(x)·keep,
    `patch_embed_multi`) and projects them by one GEMM; a training step embeds its ONLINE tokens
    and the target at its DECODER positions, a fifth to a quarter of the positions. Elsewhere
    (CUDA: the fused kernel embeds every token in one pass; torch.compile) it is
    `patch_embed_rows_ref`.
    """
    if not projections:
        return []
    for weight, bias, keeps, rows, view in projections:
        _check_rows(keeps, rows, view)
        for k in keeps or [None]:
            _check_inputs(x, weight, bias, patch_size, k, band_index)
    if _resolve_impl("auto", x) != "ref" or torch.compiler.is_compiling():
        return patch_embed_rows_ref(x, projections, patch_size, band_index)
    base = projections[0][0].shape[-1]
    if any(p[0].shape[-1] != base for p in projections):
        raise ValueError("patch_embed_rows: every weight must have the same kernel size, got "
                         f"{[tuple(p[0].shape) for p in projections]}")
    with no_autocast(x.device):  # computes in x.dtype, as patch_embed does
        T, h, w = x.shape[3], x.shape[1] // patch_size, x.shape[2] // patch_size
        patches = resize_patches(x.detach(), band_index, patch_size, base)  # [(B T h w), base·base·C]
        C = patches.shape[1] // (base * base)
        out = []
        for weight, bias, keeps, rows, view in projections:
            p = patches.index_select(0, rows)  # pixel-major, bands innermost
            if keeps is not None:
                keep = torch.stack([k.detach() for k in keeps]).to(p.dtype)  # [V, B, C]
                p = (p.view(-1, base * base, C) * keep[view, rows // (T * h * w)][:, None, :]).view(p.shape)
            # the weight as [D, (u v C)], the rows' order
            w_rows = weight.to(x.dtype).permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
            y = F.linear(p, w_rows, None if bias is None else bias.to(x.dtype))
            out.append(y)
        return out
