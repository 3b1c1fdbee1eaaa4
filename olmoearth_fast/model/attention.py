"""Transformer blocks over packed variable-length token sets (docs/reference_semantics.md §4.3).

Tokens live packed as ``[total, D]`` with ``cu_seqlens``; only attention needs to know where one
sample ends. Backends, picked per call:

* CUDA, bf16/fp16, ``torch.nn.attention.varlen`` present (torch ≥ 2.10): ``varlen_attn`` on the
  packed tensors, cost Σ len², no padding, no host sync (max lengths are static upper bounds).
* CPU: `ops.segment_attention` on the packed tensors, cost Σ len² and no mask: one C++ op over
  every segment and head (AVX-512, fp32; 1.4-1.5× PyTorch's flash kernel called per segment at
  the nano and tiny shapes), else SDPA per segment. Per segment is 1.8× faster forward+backward
  than one padded [B, L] SDPA with a key-padding mask (B=32, lengths 250–500, H=8, hd=16).
* CUDA without a varlen kernel (fp32, old torch): segments padded to the longest one, ``[B, L]``,
  SDPA with a key-padding mask (no host sync). Cost B·L²; with the token budget the lengths are
  close, so near Σ len².
Never the (Σ len)² of one block-diagonal mask over the whole batch.

Block = pre-norm attention (separate q/k/v Linear with bias) + GELU MLP, each branch with
per-sample DropPath (one Bernoulli per sample and branch, same rate in every block). Between
blocks the residual stream travels as a `Stream`, its last branch not yet added: the next
LayerNorm adds it (`ops.residual_norm`, one C++ pass on CPU; `run_blocks`). The Linear
layers run `ops.linear` (on AMD CPUs in fp32 oneDNN's inner product, elsewhere PyTorch's Linear);
on CPU (fp32) the MLP adds fc1's bias inside the GELU pass (`ops.bias_gelu`, C++); elsewhere
PyTorch's Linear → GELU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from olmoearth_fast.ops import forced_kernels
from olmoearth_fast.ops.bias_gelu import bias_gelu, uses_kernel
from olmoearth_fast.ops.linear import linear
from olmoearth_fast.ops.packing import gather_rows
from olmoearth_fast.ops.residual_norm import residual_add, residual_norm
from olmoearth_fast.ops.residual_norm import uses_kernel as residual_norm_kernel
from olmoearth_fast.ops.segment_attention import segment_attention, unpack_qkv

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - older torch
    _varlen_attn = None


@dataclass
class Segments:
    """Where each sample's tokens sit in a packed ``[total, D]`` tensor.

    ``cu_seqlens`` (int32, B+1) and ``sample_ids`` ([total], long) live on the tokens' device;
    ``max_len`` is a Python int (an upper bound is enough for the varlen kernels). The padded
    layout used by the SDPA backend is built lazily, once per step, and shared by all blocks.
    """

    cu_seqlens: Tensor
    sample_ids: Tensor
    max_len: int
    _pad: tuple[Tensor, Tensor, Tensor] | None = None
    _host: list[int] | None = None

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: Tensor, total: int, max_len: int) -> Segments:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        sample_ids = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths,
                                             output_size=total)
        return cls(cu_seqlens, sample_ids, max_len)

    @property
    def batch(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    def to(self, device: torch.device, non_blocking: bool = False) -> Segments:
        """On ``device``, keeping the host-side lengths (a plan made on the CPU: no sync later)."""
        return Segments(self.cu_seqlens.to(device, non_blocking=non_blocking),
                        self.sample_ids.to(device, non_blocking=non_blocking), self.max_len, None, self._host)

    def pin_memory(self) -> Segments:
        return Segments(self.cu_seqlens.pin_memory(), self.sample_ids.pin_memory(), self.max_len, None, self._host)

    def host(self) -> list[int]:
        """cu_seqlens as Python ints (a device sync on CUDA; free on CPU), cached."""
        if self._host is None:
            self._host = self.cu_seqlens.tolist()
        return self._host

    def padded(self) -> tuple[Tensor, Tensor, Tensor]:
        """(pad_index [B·L], unpad_index [total], key_valid [B, L]) for L = max_len.

        ``gather_rows(packed, pad_index)`` lays the tokens out as ``[B·L, ...]`` (zero rows as
        padding); ``gather_rows(padded, unpad_index)`` takes them back.
        """
        if self._pad is None:
            length = max(self.max_len, 1)
            starts = self.cu_seqlens[:-1].long()
            lengths = self.cu_seqlens[1:].long() - starts
            slot = torch.arange(length, device=starts.device)
            valid = slot[None, :] < lengths[:, None]
            pad_index = torch.where(valid, starts[:, None] + slot[None, :], torch.full_like(valid, -1, dtype=torch.long))
            token = torch.arange(self.sample_ids.shape[0], device=starts.device)
            unpad_index = self.sample_ids * length + (token - starts[self.sample_ids])
            self._pad = (pad_index.reshape(-1), unpad_index, valid)
        return self._pad


def _use_varlen(x: Tensor) -> bool:
    return _varlen_attn is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def _padded_sdpa(q: Tensor, k: Tensor, v: Tensor, q_seg: Segments, k_seg: Segments) -> Tensor:
    """q [Tq, H, hd], k/v [Tk, H, hd] → [Tq, H, hd] through a padded [B, H, L, hd] SDPA."""
    q_pad, q_unpad, _ = q_seg.padded()
    k_pad, _, k_valid = k_seg.padded()
    b = q_seg.batch
    h, hd = q.shape[1], q.shape[2]
    qp = gather_rows(q.reshape(q.shape[0], -1), q_pad).view(b, -1, h, hd).transpose(1, 2)
    kp = gather_rows(k.reshape(k.shape[0], -1), k_pad).view(b, -1, h, hd).transpose(1, 2)
    vp = gather_rows(v.reshape(v.shape[0], -1), k_pad).view(b, -1, h, hd).transpose(1, 2)
    # a sample without keys would give NaN rows (all −inf); let it see one zero key instead:
    # its queries are padding or meaningless, and NaN must not reach the gradients
    valid = k_valid.clone()
    valid[:, 0] |= ~k_valid.any(1)
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=valid[:, None, None, :])
    return gather_rows(out.transpose(1, 2).reshape(-1, h * hd), q_unpad).view(-1, h, hd)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections (the reference's layout)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding size {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, x_seg: Segments, y: Tensor | None = None, y_seg: Segments | None = None,
                out_bias: bool = True) -> Tensor:
        """``out_bias`` False: without the output projection's bias (`Block._branch` leaves
        ``proj.bias`` to the next `ops.residual_norm`)."""
        h = self.num_heads
        # One GEMM for the projections that read the same input (q, k, v for self-attention;
        # k, v of the context for cross-attention), the weights concatenated: wider GEMMs run
        # closer to peak than three [D, D] ones, and the parameters keep the reference's names.
        # The GEMM's output goes to `attend` packed ([T, 3, H, hd] or [Tk, 2, H, hd]), so that the
        # CPU op writes its gradient packed too (no stack copy behind an unbind).
        if y is None:
            qkv = linear(x, torch.cat([self.q.weight, self.k.weight, self.v.weight]),
                         torch.cat([self.q.bias, self.k.bias, self.v.bias]))
            out = attend(qkv.unflatten(-1, (3, h, -1)), None, None, x_seg, x_seg)
        else:
            kv = linear(y, torch.cat([self.k.weight, self.v.weight]), torch.cat([self.k.bias, self.v.bias]))
            q = linear(x, self.q.weight, self.q.bias)
            out = attend(q.unflatten(-1, (h, -1)), kv.unflatten(-1, (2, h, -1)), None, x_seg, y_seg)
        return linear(out.flatten(-2), self.proj.weight, self.proj.bias if out_bias else None)


@torch.compiler.disable
def attend(q: Tensor, k: Tensor | None, v: Tensor | None, q_seg: Segments, k_seg: Segments) -> Tensor:
    """Attention of packed q [Tq, H, hd] to k/v [Tk, H, hd] within each sample's segment; k and v
    may come packed as ``k`` = [Tk, 2, H, hd] (``v`` None), or q, k, v as ``q`` = [T, 3, H, hd]
    (`ops.segment_attention`'s layouts).

    ``OLMOEARTH_FAST_KERNELS=pytorch`` takes the padded SDPA path on CUDA instead of the varlen
    kernel (as it makes the other ops take their PyTorch paths), e.g. to bisect a difference.
    Left out of `torch.compile` regions (a graph break around it): the segment lengths it
    loops over (CPU) or pads to (CUDA fp32) change every step, and the varlen kernel is already
    one fused kernel; what compile fuses is the elementwise work around it.
    """
    if q.is_cuda:
        q, k, v = unpack_qkv(q, k, v)
        if _use_varlen(q) and forced_kernels() != "pytorch":
            return _varlen_attn(q, k, v, q_seg.cu_seqlens, k_seg.cu_seqlens, q_seg.max_len, k_seg.max_len)
        return _padded_sdpa(q, k, v, q_seg, k_seg)
    return segment_attention(q, k, v, q_seg.host(), k_seg.host())


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, out_bias: bool = True) -> Tensor:
        """``out_bias`` False: without fc2's bias (`Block._branch` leaves ``fc2.bias`` to the next
        `ops.residual_norm`)."""
        if uses_kernel(x):  # CPU fp32: fc1's bias added in the fused GELU pass (`ops.bias_gelu`)
            h = bias_gelu(linear(x, self.fc1.weight), self.fc1.bias)
        else:
            h = F.gelu(linear(x, self.fc1.weight, self.fc1.bias))
        return linear(h, self.fc2.weight, self.fc2.bias if out_bias else None)


def drop_path(x: Tensor, seg: Segments, rate: float, training: bool, keep: Tensor | None = None) -> Tensor:
    """Per-sample stochastic depth on packed tokens: one Bernoulli(1−rate) per sample, drawn here
    or given as ``keep [B]`` (bool, a host draw: `model.plan.BranchDrop`). The reference's ops:
    ``x.div(1 − rate)`` in x's dtype (under bf16 autocast computed in fp32 and rounded once:
    PyTorch's CUDA kernel multiplies by the fp32 reciprocal, its CPU kernel divides), times the
    0/1 keep of each row's sample."""
    if rate == 0.0 or not training:
        return x
    if keep is None:
        keep = torch.rand(seg.batch, device=x.device) < 1.0 - rate
    return x.div(1.0 - rate) * keep.to(x.dtype)[seg.sample_ids, None]


@dataclass
class Stream:
    """The residual stream between pre-norm blocks, its last branch not yet added:
    ``x + alpha·(r + b)`` (r at the rows ``rows`` of x, every row if None; no branch if ``r`` is
    None; ``b`` the bias of the Linear that made r where its GEMM left it out, else None).

    Every LayerNorm of a pre-norm block reads the stream right after a branch was added to it, so
    the add is left to that LayerNorm (`norm`: `ops.residual_norm`, one pass on CPU instead of
    the add, the DropPath factor, the kept rows' gather and the norm, each way)."""

    x: Tensor
    r: Tensor | None = None
    rows: Tensor | None = None
    alpha: float = 1.0
    b: Tensor | None = None

    def norm(self, ln: nn.LayerNorm, rows: Tensor | None = None) -> tuple[Stream, Tensor]:
        """(the stream with its branch added, ``ln`` of its rows ``rows`` (every row if None))."""
        s, y = residual_norm(self.x, self.r, ln.weight, ln.bias, ln.eps, self.rows, self.alpha, rows, self.b)
        return Stream(s), y

    def settle(self) -> Tensor:
        """The stream as one tensor, its branch added."""
        return residual_add(self.x, self.r, self.rows, self.alpha, self.b)


class Block(nn.Module):
    """Pre-norm block; with ``y`` it is the decoder's cross-attention-only block (no LN on y)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x: Tensor, seg: Segments, y: Tensor | None = None, y_seg: Segments | None = None,
                drops=None) -> Tensor:
        """``drops``: this block's (attention, MLP) `model.plan.BranchDrop` draws made on the
        host (self-attention blocks in training), else DropPath draws here."""
        return self.stream(Stream(x), seg, y, y_seg, drops).settle()

    def stream(self, st: Stream, seg: Segments, y: Tensor | None = None, y_seg: Segments | None = None,
               drops=None) -> Stream:
        """The block on a `Stream`; the MLP's output is left for the next LayerNorm to add."""
        host = drops is not None and self.training
        if host and y is not None:
            raise ValueError("Block: host-drawn DropPath is for self-attention blocks (no context y)")
        st = self._branch(st, seg, self.norm1, lambda h, sg, b: self.attn(h, sg, y, y_seg, b), self.attn.proj,
                          drops[0] if host else None)
        return self._branch(st, seg, self.norm2, lambda h, sg, b: self.mlp(h, b), self.mlp.fc2,
                            drops[1] if host else None)

    def _branch(self, st: Stream, seg: Segments, norm: nn.LayerNorm, branch, last: nn.Linear, drop) -> Stream:
        """``st`` plus DropPath(branch(norm(st))), the sum left to the next LayerNorm.

        With a host draw ``drop`` (`model.plan.BranchDrop`) where some samples drop the branch,
        it runs on the kept samples' rows only, which are then the only rows it is added to: the
        FLOPs of the dropped samples (a fraction ``rate`` of the branch's work, in expectation)
        are skipped, values and gradients are the same; compiled blocks too (their shapes are
        dynamic, so other kept row counts reuse the graph). Where all or none keep it: the branch
        on every row, times the factor (0 where none keeps it, so that its parameters still get a
        gradient, zero, as the reference's). A draw without a factor, or none: the per-sample
        `drop_path`.

        ``branch(h, seg, out_bias)``; ``last`` its last Linear. Where the next LayerNorm adds the
        branch and takes its C++ op (`ops.residual_norm`: CPU, fp32), that op adds ``last``'s bias
        too, and the branch's last GEMM runs without it.
        """
        rows = None if drop is None else drop.rows
        st, h = st.norm(norm, rows)
        rate, keep = (self.drop_path, None) if drop is None else (drop.rate, drop.keep)
        factor = drop.factor if drop is not None else None
        if factor is None and rate != 0.0 and self.training:
            out = branch(h, seg if rows is None else drop.seg, True)
            return Stream(st.x + drop_path(out, seg, rate, True, keep))
        fold = residual_norm_kernel(st.x) and last.bias is not None
        out = branch(h, seg if rows is None else drop.seg, not fold)
        if factor is None:
            return Stream(st.x, out, b=last.bias if fold else None)
        return Stream(st.x, out, rows, factor, last.bias if fold else None)


def run_blocks(blocks, x: Tensor, seg: Segments, y: Tensor | None = None, y_seg: Segments | None = None,
               drops: list | None = None, norm: nn.LayerNorm | None = None) -> Tensor:
    """``blocks`` in turn on ``x`` (with context ``y`` for cross-attention blocks; ``drops[i]``
    block i's host DropPath draws), then ``norm`` if given.

    Eager, the stream passes from block to block as a `Stream`, each residual add done by the
    next LayerNorm (`ops.residual_norm`; the last one by ``norm``). A compiled block
    (`torch.compile`d module, `trainer.compile`) is called as the module: inside its graph the
    compiler fuses the adds itself."""
    st = Stream(x)
    for i, blk in enumerate(blocks):
        d = None if drops is None else drops[i]
        if getattr(blk, "_compiled_call_impl", None) is not None:
            st = Stream(blk(st.settle(), seg, y, y_seg, d))
        else:
            st = blk.stream(st, seg, y, y_seg, d)
    return st.settle() if norm is None else st.norm(norm)[1]


def init_linear_xavier(module: nn.Module) -> None:
    """The reference's `_init_weights`: xavier-uniform weights and zero bias for every Linear."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
