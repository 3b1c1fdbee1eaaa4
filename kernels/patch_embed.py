"""Fused band dropout + flexible-patch resize + 8x8/stride-8 patch projection (Triton).

The reference upsamples each image by 8/p with antialiased bicubic and applies an 8x8 stride-8
conv; at p = 1 that materialises an image 64x the input. Both steps are linear, so each token
is one dot product of its (p+4) x (p+4) x C input window with an effective weight
(`olmoearth_fast.ops.patch_embed_plan.effective_weights`): one weight per token class (interior
tokens share one; the first/last ceil(2/p) token rows and columns, where the resize
renormalises its truncated taps, get their own).

Forward kernel: a GEMM over the tokens of one class, [M tokens] x [KRED = K*K*C] x [D], whose
A-tile load *is* the patchify: it reads the channels-last [B,H,W,T,C_all] input at computed
addresses, with the band gather (band_index) and the band-dropout multiplier keep[b, c] folded
into the load, and zero for taps outside the image (they carry zero weight; masking keeps
out-of-bounds reads out of the sum). Epilogue: + bias, store [B,h,w,T,D] in the input dtype.
Each input pixel is read from HBM once (the halo overlap of neighbouring windows hits L2).

Backward kernel: dE[q] = sum over the class's tokens of window^T @ dY (the same masked A-load,
transposed), in token chunks written to fp32 partials; a second kernel sums each class's chunks
in chunk order. Run to run deterministic on a GPU: no atomics anywhere (an `index_add_` of the
partials, the obvious reduction, adds atomically on CUDA in an unspecified order). The caller
maps dE back to the 8x8 weight. dbias = sum dY. Pixels get no gradient.

Grids. CUDA limits grid axes y and z to 65535 programs (x: 2**31 - 1). The forward runs one
program per (M-tile, D-tile) pair on axis x (`_fwd_grid`): with the M-tiles on axis y it failed
to launch from 65536 M-tiles, i.e. 4.2 M tokens per call at BLOCK_M = 64 (fp32) or 8.4 M at 128
(bf16), e.g. a p = 1 embedding of 64 samples of 256 x 256 pixels. The backward keeps its chunks
on axis z and sizes them so that there are at most 65535 (`_bwd_chunk`).

Both kernels accumulate in fp32. fp32 inputs use tf32x3 dots on GPU (fp32-level accuracy on
tensor cores); the interpreter (TRITON_INTERPRET=1) computes dots in fp32 regardless.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["FP32_DOT_PRECISION", "patch_embed_bwd_effective", "patch_embed_fwd"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# GPU fp32 dots: "tf32x3" splits each fp32 operand into two TF32 halves (3 MMAs): ~fp32
# accuracy at ~1/3 of TF32 speed; plain "tf32" would give ~1e-3 relative error.
FP32_DOT_PRECISION = "tf32x3"
_CLS_COLS = 8  # class table row: first M-tile, i0, ni, j0, nj, (padding)
_IDX32_LIMIT = 2**31  # input span / output size from which indices are 64-bit
_GRID_X_LIMIT = 2**31 - 1  # CUDA's largest grid on axis x
_GRID_YZ_LIMIT = 65535  # ... and on axes y and z
_REDUCE_BLOCK = 1024  # elements of dE per program of the chunk reduction


@triton.jit
def _token_coords(m, q_ni, q_nj, T):
    """Tokens of a class enumerate (b, ii, jj, t) with t fastest (the output's memory order)."""
    t = m % T
    rest = m // T
    jj = rest % q_nj
    rest = rest // q_nj
    return rest // q_ni, rest % q_ni, jj, t


@triton.jit
def _token_index(m, q_i0, q_ni, q_j0, q_nj, h, w, T, IDX64: tl.constexpr):
    """Row of token m of the class in the [B*h*w*T, D] output (and dY).

    32-bit unless the tensors are that large: 64-bit row indices double the registers of the
    [BLOCK_M, BLOCK_N] pointer tile, which made the epilogue spill at 128x128 tiles.
    """
    b, ii, jj, t = _token_coords(m, q_ni, q_nj, T)
    if IDX64:
        b = b.to(tl.int64)
    return ((b * h + q_i0 + ii) * w + q_j0 + jj) * T + t


@triton.jit
def _window_load(
    x_ptr, band_ptr, keep_ptr, m, r, q_i0, q_ni, q_j0, q_nj, n_tok, KRED, H, W, T, C,
    sxb, sxh, sxw, sxt, sxc, skb, skc,
    P: tl.constexpr, K: tl.constexpr, HALO: tl.constexpr, HAS_BAND: tl.constexpr,
    HAS_KEEP: tl.constexpr, IDX64: tl.constexpr,
):
    """Window tile [m, r]: x[b, P*i - HALO + kh, P*j - HALO + kw, t, band[c]] * keep[b, c].

    r enumerates (kh, kw, c) with c fastest (the input's channels-last order). Taps outside
    the image load 0. The keep product is rounded to x's dtype, as the reference's x * keep.
    """
    b, ii, jj, t = _token_coords(m, q_ni, q_nj, T)
    c = r % C
    kk = r // C
    kw = kk % K
    kh = kk // K
    r_ok = r < KRED
    rows = (P * (q_i0 + ii) - HALO)[:, None] + kh[None, :]
    cols = (P * (q_j0 + jj) - HALO)[:, None] + kw[None, :]
    ok = ((m < n_tok)[:, None] & r_ok[None, :] & (rows >= 0) & (rows < H) & (cols >= 0)
          & (cols < W))
    if HAS_BAND:
        band = tl.load(band_ptr + c, mask=r_ok, other=0)
    else:
        band = c
    if IDX64:  # inputs spanning >= 2**31 elements: 64-bit addressing
        b, t, band = b.to(tl.int64), t.to(tl.int64), band.to(tl.int64)
        rows, cols = rows.to(tl.int64), cols.to(tl.int64)
    else:  # 32-bit offsets halve the address registers of the [BLOCK_M, BLOCK_K] gather
        band = band.to(tl.int32)
    off = (b * sxb + t * sxt)[:, None] + rows * sxh + cols * sxw + (band * sxc)[None, :]
    a = tl.load(x_ptr + off, mask=ok, other=0.0)
    if HAS_KEEP:
        kp = tl.load(keep_ptr + b[:, None] * skb + c[None, :] * skc, mask=ok, other=0.0)
        a = (a.to(tl.float32) * kp).to(x_ptr.dtype.element_ty)
    return a


@triton.jit
def _patch_embed_fwd_kernel(
    x_ptr, band_ptr, keep_ptr, e_ptr, bias_ptr, out_ptr, cls_ptr,
    B, H, W, T, C, D, h, w, KRED,
    sxb, sxh, sxw, sxt, sxc, skb, skc,
    NQ_P2: tl.constexpr, P: tl.constexpr, K: tl.constexpr, HALO: tl.constexpr,
    HAS_BAND: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_BIAS: tl.constexpr,
    IDX64: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One axis (x: up to 2**31 - 1 programs) of (M-tile, D-tile) pairs, D-tiles fastest: the
    # D-tiles of one token tile run together and share its gathered A-tile in L2.
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(D, BLOCK_N)
    pid_n = pid % n_tiles_n
    pid_m = pid // n_tiles_n
    # This M-tile's class: the last class whose first tile is <= pid_m.
    starts = tl.load(cls_ptr + tl.arange(0, NQ_P2) * 8)  # 8 = _CLS_COLS
    q = tl.sum((starts <= pid_m).to(tl.int32), axis=0) - 1
    q_t0 = tl.load(cls_ptr + q * 8)
    q_i0 = tl.load(cls_ptr + q * 8 + 1)
    q_ni = tl.load(cls_ptr + q * 8 + 2)
    q_j0 = tl.load(cls_ptr + q * 8 + 3)
    q_nj = tl.load(cls_ptr + q * 8 + 4)
    n_tok = B * T * q_ni * q_nj

    m = (pid_m - q_t0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < D
    e_base = e_ptr + q.to(tl.int64) * KRED * D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KRED, BLOCK_K):
        r = k0 + tl.arange(0, BLOCK_K)
        a = _window_load(x_ptr, band_ptr, keep_ptr, m, r, q_i0, q_ni, q_j0, q_nj, n_tok, KRED,
                         H, W, T, C, sxb, sxh, sxw, sxt, sxc, skb, skc,
                         P, K, HALO, HAS_BAND, HAS_KEEP, IDX64)
        e = tl.load(e_base + r[:, None] * D + n[None, :],
                    mask=(r < KRED)[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, e, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]

    # Output [B,h,w,T,D] contiguous: token (b, i, j, t) at ((b*h + i)*w + j)*T + t.
    tok = _token_index(m, q_i0, q_ni, q_j0, q_nj, h, w, T, IDX64)
    tl.store(out_ptr + tok[:, None] * D + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(m < n_tok)[:, None] & n_ok[None, :])


@triton.jit
def _patch_embed_bwd_kernel(
    x_ptr, band_ptr, keep_ptr, g_ptr, part_ptr, cls_ptr, chunk_ptr,
    B, H, W, T, C, D, h, w, KRED,
    sxb, sxh, sxw, sxt, sxc, skb, skc,
    P: tl.constexpr, K: tl.constexpr, HALO: tl.constexpr,
    HAS_BAND: tl.constexpr, HAS_KEEP: tl.constexpr, IDX64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    chunk = tl.program_id(2)
    q = tl.load(chunk_ptr + chunk * 3)
    m_start = tl.load(chunk_ptr + chunk * 3 + 1)
    steps = tl.load(chunk_ptr + chunk * 3 + 2)  # BLOCK_M steps of this chunk
    q_i0 = tl.load(cls_ptr + q * 8 + 1)
    q_ni = tl.load(cls_ptr + q * 8 + 2)
    q_j0 = tl.load(cls_ptr + q * 8 + 3)
    q_nj = tl.load(cls_ptr + q * 8 + 4)
    n_tok = B * T * q_ni * q_nj

    r = pid_r * BLOCK_K + tl.arange(0, BLOCK_K)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < D
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for s in range(0, steps):
        m = m_start + s * BLOCK_M + tl.arange(0, BLOCK_M)
        a = _window_load(x_ptr, band_ptr, keep_ptr, m, r, q_i0, q_ni, q_j0, q_nj, n_tok, KRED,
                         H, W, T, C, sxb, sxh, sxw, sxt, sxc, skb, skc,
                         P, K, HALO, HAS_BAND, HAS_KEEP, IDX64)
        tok = _token_index(m, q_i0, q_ni, q_j0, q_nj, h, w, T, IDX64)
        g = tl.load(g_ptr + tok[:, None] * D + n[None, :],
                    mask=(m < n_tok)[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), g.to(x_ptr.dtype.element_ty), acc,
                     input_precision=DOT_PRECISION)
    ptrs = part_ptr + chunk.to(tl.int64) * KRED * D + r[:, None] * D + n[None, :]
    tl.store(ptrs, acc, mask=(r < KRED)[:, None] & n_ok[None, :])


@triton.jit
def _reduce_chunks_kernel(part_ptr, out_ptr, first_ptr, N, BLOCK: tl.constexpr):
    """out[q, i] = sum of part[c, i] over class q's chunks first[q] <= c < first[q + 1], added
    in chunk order: the same sum, bit for bit, on every run (and the same as a sequential
    fp32 loop, e.g. CPU `index_add_`)."""
    pid = tl.program_id(0)
    q = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    c0 = tl.load(first_ptr + q)
    c1 = tl.load(first_ptr + q + 1)
    src = part_ptr + c0.to(tl.int64) * N + offs
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(c0, c1):
        acc += tl.load(src, mask=ok, other=0.0)
        src += N
    tl.store(out_ptr + q.to(tl.int64) * N + offs, acc, mask=ok)


def _config(dtype: torch.dtype, kred: int, d: int, backward: bool = False) -> dict:
    """Tile sizes (forward: BLOCK_M tokens x BLOCK_N of D, K-steps of BLOCK_K window taps;
    backward: BLOCK_K taps x BLOCK_N of D per program, token steps of BLOCK_M)."""
    if _INTERPRET:  # big tiles: fewer (numpy-vectorised) programs and steps
        return dict(BLOCK_M=64, BLOCK_N=max(16, min(64, triton.next_power_of_2(d))),
                    BLOCK_K=max(16, min(256, triton.next_power_of_2(kred))), num_warps=4,
                    num_stages=1)
    # GPU (sm_90, register use checked with ptxas -res-usage for p = 1, 4, 7, 8): the A-tile
    # is a gather with per-element addresses, masks and keep factors, so registers bound the
    # tile. bf16 forward 128x128x32, 8 warps, 2 stages: 242 regs, no spill (BLOCK_K=64 or 3
    # stages spill ~1 KB/thread); fp32 (tf32x3 splits each operand in two) 64x128x16: 170.
    # Backward: 128 taps x 128 of D per program (dY is re-read once per 128 taps), token
    # steps of 32 (bf16, ~245 regs) / 16 (fp32, ~245 regs), no spill.
    fp32 = dtype == torch.float32
    if backward:
        return dict(BLOCK_M=16 if fp32 else 32, BLOCK_N=128, BLOCK_K=128, num_warps=8,
                    num_stages=2)
    if fp32:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=16, num_warps=8, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=2)


def _dot_precision(dtype: torch.dtype) -> str:
    # The flag only matters for fp32 operands; bf16 dots always run on tensor cores.
    return FP32_DOT_PRECISION if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=256)
def _class_table(
    plan, B: int, T: int, block_m: int, device: torch.device
) -> tuple[Tensor, int, int]:
    """int32 [NQ_P2, 8] rows (first M-tile, i0, ni, j0, nj) on device, NQ_P2, total M-tiles.

    Cached per shape, so steady-state calls issue no host-to-device copy.
    """
    rects = plan.class_rects()
    nq_p2 = max(2, triton.next_power_of_2(len(rects)))
    rows = [[2**31 - 1] + [0] * (_CLS_COLS - 1) for _ in range(nq_p2)]
    tiles = 0
    for q, (i0, ni, j0, nj) in enumerate(rects):
        rows[q][:5] = [tiles, i0, ni, j0, nj]
        tiles += triton.cdiv(B * T * ni * nj, block_m)
    return torch.tensor(rows, dtype=torch.int32, device=device), nq_p2, tiles


@functools.lru_cache(maxsize=256)
def _chunk_table(plan, B: int, T: int, block_m: int, chunk: int, device: torch.device):
    """int32 [n_chunks, 3] rows (class, first token, BLOCK_M steps), grouped by class, and
    int32 [nq + 1] first chunk of each class (class q owns chunks first[q] .. first[q+1]-1)."""
    rows = []
    first = [0]
    for q, (i0, ni, j0, nj) in enumerate(plan.class_rects()):
        n_tok = B * T * ni * nj
        rows += [[q, m0, triton.cdiv(min(chunk, n_tok - m0), block_m)]
                 for m0 in range(0, n_tok, chunk)]
        first.append(len(rows))
    table = torch.tensor(rows, dtype=torch.int32, device=device).reshape(-1, 3)
    return table, torch.tensor(first, dtype=torch.int32, device=device)


def _fwd_grid(d: int, tiles: int, block_m: int, block_n: int) -> tuple[int]:
    """Forward launch grid for `tiles` M-tiles of BLOCK_M tokens and D outputs per token.

    One axis of (M-tile, D-tile) programs (see the module docstring). Raises where even that
    cannot be launched, or where token numbers no longer fit the kernel's int32 arithmetic.
    """
    programs = triton.cdiv(d, block_n) * tiles
    if programs > _GRID_X_LIMIT or tiles * block_m >= 2**31:
        raise ValueError(f"patch_embed: {tiles} tiles of {block_m} tokens x {d} outputs is too large "
                         f"for one launch ({programs} programs, at most {_GRID_X_LIMIT}; tokens "
                         "must stay below 2**31): split the batch")
    return (programs,)


def _bwd_chunk(n_tokens: int, nq: int, block_m: int, chunk_tokens: int) -> int:
    """Tokens per backward chunk: `chunk_tokens` rounded up to BLOCK_M, and raised where needed
    so that the chunks (at most n_tokens / chunk + nq of them: each class ends in a partial
    one) fit grid axis z (65535)."""
    least = triton.cdiv(n_tokens, _GRID_YZ_LIMIT - nq)
    return triton.cdiv(max(chunk_tokens, least, 1), block_m) * block_m


def _bwd_grid(d: int, kred: int, n_chunks: int, block_n: int, block_k: int) -> tuple[int, int, int]:
    """Backward launch grid: (D-tiles, KRED-tiles, chunks), axes y and z within 65535."""
    grid = (triton.cdiv(d, block_n), triton.cdiv(kred, block_k), n_chunks)
    if grid[0] > _GRID_X_LIMIT or grid[1] > _GRID_YZ_LIMIT or grid[2] > _GRID_YZ_LIMIT:
        raise ValueError(f"patch_embed backward: grid {grid} exceeds CUDA's limits "
                         f"({_GRID_X_LIMIT}, {_GRID_YZ_LIMIT}, {_GRID_YZ_LIMIT})")
    return grid


def _common(x: Tensor, keep: Tensor | None, band_index: Tensor | None, out_numel: int) -> dict:
    """Kernel arguments shared by forward and backward (dummy pointers for absent tensors)."""
    dummy = x.new_empty(1)
    keep_f = None if keep is None else keep.to(torch.float32)
    # Largest element offset the A-load can form (halo taps are masked but still computed),
    # and the output (dY) size: 32-bit indices below 2**31.
    span = sum((s - 1) * abs(st) for s, st in zip(x.shape, x.stride())) + 4 * max(x.stride())
    span = max(span, out_numel)
    return dict(
        # the kernels read band_index[c] at band_ptr + c: contiguous, whatever the caller's view
        band=dummy if band_index is None else band_index.contiguous(),
        keep=dummy if keep_f is None else keep_f,
        keep_strides=(0, 0) if keep_f is None else keep_f.stride(),
        flags=dict(HAS_BAND=band_index is not None, HAS_KEEP=keep_f is not None,
                   IDX64=span >= _IDX32_LIMIT),
    )


def patch_embed_fwd(
    x: Tensor,
    e: Tensor,
    bias: Tensor | None,
    plan,
    keep: Tensor | None = None,
    band_index: Tensor | None = None,
) -> Tensor:
    """Launch the fused forward.

    Args:
        x: [B,H,W,T,C_all] input, any strides, float32 or bfloat16 (compute/output dtype).
        e: Effective weights [nq, K, K, C, D] (`effective_weights(weight, plan)`).
        bias: [D] or None.
        plan: The `EffectivePlan` e was built with.
        keep: Optional [B, C] multiplier.
        band_index: Optional [C] int32/int64 indices into x's last axis.

    Returns:
        [B, H/p, W/p, T, D] contiguous, x.dtype.
    """
    B, H, W, T = x.shape[:4]
    nq, K, _, C, D = e.shape
    p = plan.patch_size
    h, w = H // p, W // p
    kred = K * K * C
    out = x.new_empty(B, h, w, T, D)
    if out.numel() == 0:
        return out
    e2 = e.to(x.dtype).reshape(nq, kred, D).contiguous()
    cfg = _config(x.dtype, kred, D)
    table, nq_p2, tiles = _class_table(plan, B, T, cfg["BLOCK_M"], x.device)
    a = _common(x, keep, band_index, out.numel())
    grid = _fwd_grid(D, tiles, cfg["BLOCK_M"], cfg["BLOCK_N"])
    _patch_embed_fwd_kernel[grid](
        x, a["band"], a["keep"], e2, x.new_empty(1) if bias is None else bias.contiguous(), out,
        table,
        B, H, W, T, C, D, h, w, kred, *x.stride(), *a["keep_strides"],
        NQ_P2=nq_p2, P=p, K=K, HALO=plan.halo, HAS_BIAS=bias is not None,
        DOT_PRECISION=_dot_precision(x.dtype), **a["flags"], **cfg,
    )
    return out


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def patch_embed_bwd_effective(
    grad: Tensor,
    x: Tensor,
    plan,
    num_bands: int,
    keep: Tensor | None = None,
    band_index: Tensor | None = None,
    *,
    chunk_tokens: int | None = None,
) -> Tensor:
    """dL/dE [nq, K, K, C, D] (float32) for the effective weights of `patch_embed_fwd`.

    Deterministic: per-chunk partials, then an in-order sum per class (no atomics).

    Args:
        grad: dL/dout [B,h,w,T,D].
        x, plan, keep, band_index: As in the forward.
        num_bands: C.
        chunk_tokens: Tokens per partial sum (rounded up to the tile, and raised if the
            chunks would not fit one grid axis); default: enough chunks to fill the GPU about
            twice over.
    """
    B, H, W, T = x.shape[:4]
    D = grad.shape[-1]
    C, K = num_bands, plan.taps
    p = plan.patch_size
    h, w = H // p, W // p
    kred = K * K * C
    nq = plan.num_classes
    if grad.numel() == 0:
        return torch.zeros(nq, K, K, C, D, dtype=torch.float32, device=x.device)
    grad = grad.contiguous()
    cfg = _config(x.dtype, kred, D, backward=True)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    table, _, _ = _class_table(plan, B, T, bm, x.device)
    if chunk_tokens is None:
        # The reduction over tokens (up to ~37k per class here) is split so that
        # (chunks x KRED-tiles x D-tiles) programs fill the GPU about twice.
        out_tiles = triton.cdiv(kred, bk) * triton.cdiv(D, bn)
        want_chunks = max(1, 2 * _num_sms(x.device) // out_tiles)
        chunk_tokens = triton.cdiv(B * T * h * w, want_chunks)
    chunk = _bwd_chunk(B * T * h * w, nq, bm, chunk_tokens)
    chunks, first = _chunk_table(plan, B, T, bm, chunk, x.device)
    part = torch.empty(chunks.shape[0], kred, D, dtype=torch.float32, device=x.device)
    a = _common(x, keep, band_index, grad.numel())
    grid = _bwd_grid(D, kred, chunks.shape[0], bn, bk)
    _patch_embed_bwd_kernel[grid](
        x, a["band"], a["keep"], grad, part, table, chunks,
        B, H, W, T, C, D, h, w, kred, *x.stride(), *a["keep_strides"],
        P=p, K=K, HALO=plan.halo, DOT_PRECISION=_dot_precision(x.dtype), **a["flags"], **cfg,
    )
    grad_e = torch.empty(nq, kred, D, dtype=torch.float32, device=x.device)
    _reduce_chunks_kernel[(triton.cdiv(kred * D, _REDUCE_BLOCK), nq)](
        part, grad_e, first, kred * D, BLOCK=_REDUCE_BLOCK, num_warps=4)
    return grad_e.reshape(nq, K, K, C, D)
