"""Performance accounting: the work of one training step, and the device's limit.

`step_work(batch, cfg)` counts the floating-point operations of one training step from the
actual batch (the token counts of every view after masking, the crop, the model size), per
component, twice:

* ``ours``: what olmoearth_fast computes: visible tokens packed (Σ len, Σ len² in attention),
  both views in one pass, the frozen target projection once per microbatch, the decoder and its
  output head at DECODER positions only, the loss over each (sample, modality)'s c decoded
  tokens (c² pairs).
* ``ref``: what the reference computes on the same batch in its fastest faithful configuration
  (projection-only target, vectorised loss): per view, every token patch-embedded, the target
  projection per view, the encoder padded to the microbatch's longest ONLINE count L
  (B·L tokens, B·L² attention scores), the decoder's input projection and output head on every
  token, queries and context padded to the longest DECODER / ONLINE counts, and the loss over
  all N_m tokens of a modality (B·N_m² pairs).

Counting convention (the one of `torch.utils.flop_counter.FlopCounterMode`): a multiply-add is
2 FLOPs; a Linear's backward is twice its forward (input and weight gradients); attention is
QKᵀ + PV, backward twice that; the patch embedding's backward is the weight gradient only (the
pixels need none); the frozen target has no backward. Elementwise work (norms, activations,
the optimizer) is listed apart in ``elementwise``; it is memory-bound, not FLOP-bound.

`peak_flops(device)` is the limit those FLOPs are measured against: on CPU a large fp32 matmul
timed once per process at the current thread count (the faster of MKL's sgemm and oneDNN's inner
product, the two GEMMs the step uses), on GPUs the bf16 dense tensor-core peak
from a table. `gpu_step_floor` turns the work into a paper time floor on a GPU (FLOPs at the
tensor-core peak, bytes at HBM bandwidth, kernel launches at a few µs each); it is a prediction
until a GPU measures it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from olmoearth_fast.modalities import MODALITIES, MaskValue, TokenizationConfig, as_tokenization
from olmoearth_fast.model.layout import TokenLayout
from olmoearth_fast.ops import cpu_model
from olmoearth_fast.ops.linear import backend as linear_backend
from olmoearth_fast.ops.linear import onednn_matmul
from olmoearth_fast.ops.patch_embed import embeds_only_rows

ONLINE, DECODER = int(MaskValue.ONLINE_ENCODER), int(MaskValue.DECODER)
BASE_PATCH = 8  # the patch projection is an 8×8 kernel on the image resized by 8/p

# bf16 dense tensor-core peak and HBM bandwidth of the GPUs this project targets (vendor
# datasheets: H100 SXM5 989.4 TFLOP/s and 3.35 TB/s; H200 the same compute, 4.8 TB/s).
GPU_SPECS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 4.8e12),
    "H100": (989e12, 3.35e12),
    "A100": (312e12, 2.0e12),
}


@dataclass
class Work:
    """FLOPs of one step per component, for ours and for the reference on the same batch."""

    ours: dict[str, float] = field(default_factory=dict)
    ref: dict[str, float] = field(default_factory=dict)
    elementwise: dict[str, float] = field(default_factory=dict)  # not in the totals
    tokens: dict[str, float] = field(default_factory=dict)  # token counts behind the figures

    @property
    def ours_total(self) -> float:
        return sum(self.ours.values())

    @property
    def ref_total(self) -> float:
        return sum(self.ref.values())

    @property
    def ratio(self) -> float:
        """Reference FLOPs / ours: the most that doing less work can buy on this batch."""
        return self.ref_total / max(self.ours_total, 1.0)

    def add(self, other: Work) -> None:
        for mine, theirs in ((self.ours, other.ours), (self.ref, other.ref), (self.elementwise, other.elementwise),
                             (self.tokens, other.tokens)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0.0) + v


def model_dims(model_cfg) -> tuple[int, int, int, int, int, int, float]:
    """(enc D, enc depth, enc heads, dec D, dec depth, dec heads, mlp ratio) of a ModelConfig."""
    from olmoearth_fast.model.latent_mim import MODEL_SIZES

    if model_cfg.dims is not None:
        return tuple(model_cfg.dims)
    if model_cfg.size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {model_cfg.size!r}; valid sizes: {', '.join(MODEL_SIZES)}")
    return MODEL_SIZES[model_cfg.size]


def _block_linear(tokens: float, dim: int, mlp: float) -> float:
    """Forward FLOPs of a pre-norm block's Linear layers on `tokens` rows: q, k, v, proj, fc1, fc2."""
    return 2.0 * tokens * dim * dim * (4 + 2 * mlp)


def microbatch_work(layout: TokenLayout, codes: Tensor, model_cfg, tokenization: TokenizationConfig,
                    mask_neg: tuple[str, ...] | None, band_dropout: bool, training: bool,
                    embed_only_rows: bool = True, skip_dropped: float = 0.0) -> Work:
    """Work of one microbatch from its layout and token codes ``[V, B, N]`` (host tensors).

    ``embed_only_rows``: ours patch-embeds only the ONLINE tokens and the target at the DECODER
    positions (`ops.patch_embed.embeds_only_rows`: eager CPU), or every position (the fused GPU
    kernel). ``skip_dropped``: the DropPath rate when ours skips the encoder branches a sample
    drops (`model.attention.Block` with host-drawn DropPath): their work counts in expectation,
    ``1 − rate`` of it (plus the rare draw where every sample drops a branch, which runs it)."""
    d, depth, _, dd, ddepth, _, mlp = model_dims(model_cfg)
    views, b, n = codes.shape
    bwd = 2.0 if training else 0.0  # backward = 2× forward for matmuls that need input and weight grads
    w = Work()
    # --- patch embedding: 2·C·64·D per token and bandset, forward; weight gradient alike
    embed, embed_rows, pixels, resized = 0.0, 0.0, 0.0, 0.0
    for s in layout.segments:
        if MODALITIES[s.modality].is_spatial:
            k = BASE_PATCH * BASE_PATCH
            per_pos = s.h * s.w * s.t
        else:  # time-only: Linear(C, D) per timestep
            k, per_pos = 1, s.t
        for chans in tokenization.bands_per_bandset(s.modality):
            embed += 2.0 * b * per_pos * chans * k * d
            embed_rows += b * per_pos
            pixels += b * per_pos * chans * (layout.patch_size ** 2 if k > 1 else 1)
            resized += b * per_pos * chans * k  # the image resized by 8/p: 8×8 pixels per patch
    if embed_only_rows:  # per bandset: its ONLINE tokens of every view, the target at its DECODER ones
        w.ours["patch_embed"] = 0.0
        for s in layout.segments:
            k = BASE_PATCH * BASE_PATCH if MODALITIES[s.modality].is_spatial else 1
            per_bs = codes[:, :, s.slice].reshape(-1, s.bs)
            on, de = (per_bs == ONLINE).sum(0).double(), (per_bs == DECODER).sum(0).double()
            for i, chans in enumerate(tokenization.bands_per_bandset(s.modality)):
                w.ours["patch_embed"] += 2.0 * chans * k * d * (float(on[i]) * (1 + bwd / 2) + float(de[i]))
    else:
        online_views = views if band_dropout else 1  # without dropout the views share one embedding
        w.ours["patch_embed"] = embed * online_views * (1 + bwd / 2) + embed  # + target once
    w.ref["patch_embed"] = embed * views * (1 + bwd / 2) + embed * views  # + target per view

    online = (codes == ONLINE).sum(-1).double()  # [V, B]
    dec = (codes == DECODER).sum(-1).double()
    t_on, t_dec = float(online.sum()), float(dec.sum())
    w.tokens.update(encoder_tokens=t_on, decoder_queries=t_dec, positions=float(views * b * n))
    f = 1.0 + bwd
    # attention score counts: packed Σ len², padded Σ B·L² (L: the view's longest sample)
    l_on, l_dec = online.max(-1).values, dec.max(-1).values  # [V] the reference's pad lengths
    enc_scores, ref_enc_scores = float((online ** 2).sum()), float((b * l_on ** 2).sum())
    dec_scores, ref_dec_scores = float((online * dec).sum()), float((b * l_on * l_dec).sum())
    # --- encoder
    kept = 1.0 - skip_dropped + skip_dropped ** (views * b) if skip_dropped > 0 else 1.0
    enc_lin = kept * depth * _block_linear(t_on, d, mlp) + 2.0 * views * b * d * d  # + pooled projection
    enc_attn = kept * depth * 4.0 * enc_scores * d
    ref_on = float((b * l_on).sum())
    ref_enc_lin = depth * _block_linear(ref_on, d, mlp) + 2.0 * views * b * d * d
    ref_enc_attn = depth * 4.0 * ref_enc_scores * d
    w.ours["encoder_linear"], w.ref["encoder_linear"] = enc_lin * f, ref_enc_lin * f
    w.ours["encoder_attention"], w.ref["encoder_attention"] = enc_attn * f, ref_enc_attn * f
    # --- decoder: context = Linear(LN(encoder tokens)); queries at DECODER positions
    ref_q = float((b * l_dec).sum())
    q_lin = ddepth * 2.0 * dd * dd * (2 + 2 * mlp)  # per query: q, proj, fc1, fc2
    kv_lin = ddepth * 2.0 * dd * dd * 2  # per context token: k, v
    ours_dec = t_on * (2.0 * d * dd + kv_lin) + t_dec * (q_lin + 2.0 * dd * d)
    # reference: input projection and output head on every position, k/v on B·Lk, q on B·Lq
    ref_dec = views * b * n * (2.0 * d * dd + 2.0 * dd * d) + ref_on * kv_lin + ref_q * q_lin
    w.ours["decoder_linear"], w.ref["decoder_linear"] = ours_dec * f, ref_dec * f
    w.ours["decoder_attention"] = ddepth * 4.0 * dec_scores * dd * f
    w.ref["decoder_attention"] = ddepth * 4.0 * ref_dec_scores * dd * f
    w.tokens.update(ref_encoder_tokens=ref_on, ref_decoder_queries=ref_q, embed_rows=embed_rows, pixels=pixels,
                    enc_scores=enc_scores, dec_scores=dec_scores, ref_enc_scores=ref_enc_scores,
                    ref_dec_scores=ref_dec_scores, resized_pixels=resized, microbatches=1.0, views=float(views))
    # --- loss: scores p̂·ĝ (forward, and the prediction gradient), target self-similarity where
    # same-target negatives are masked; per (view, sample, modality) c decoded tokens
    loss, ref_loss, pairs, ref_pairs = 0.0, 0.0, 0.0, 0.0
    for s in layout.segments:
        c = (codes[:, :, s.slice] == DECODER).sum(-1).double()  # [V, B]
        masked = mask_neg is None or s.modality in mask_neg
        per_pair = 2.0 * d * ((1 + bwd / 2) + (1 if masked else 0))
        seg_pairs, seg_ref_pairs = float((c ** 2).sum()), views * b * float(s.numel) ** 2
        pairs += seg_pairs
        ref_pairs += seg_ref_pairs
        loss += seg_pairs * per_pair
        ref_loss += seg_ref_pairs * per_pair
    w.ours["loss"], w.ref["loss"] = loss, ref_loss
    w.tokens.update(loss_pairs=pairs, ref_loss_pairs=ref_pairs)
    w.ours["infonce"] = w.ref["infonce"] = 2.0 * b * b * d * f if views == 2 else 0.0
    # --- bandset merge / unmerge (experiments 9, 10, 12): small MLPs on merged positions
    if model_cfg.merge_bandsets:
        merge = 0.0
        for s in layout.segments:
            if s.bs > 1:
                pos_on = (codes[:, :, s.slice].unflatten(-1, (-1, s.bs)) == ONLINE).any(-1).sum()
                merge += float(pos_on) * 2.0 * (s.bs * d * d + d * d)  # merge MLP
                merge += views * b * (s.numel // s.bs) * 2.0 * d * s.bs * d  # unmerge Linear
        w.ours["bandset_merge"] = w.ref["bandset_merge"] = merge * f
    # elementwise passes over the activations (memory-bound; reported, not in the totals)
    w.elementwise["encoder"] = kept * depth * t_on * d * (12 + 8 * mlp) * f
    w.elementwise["decoder"] = ddepth * t_dec * dd * (12 + 8 * mlp) * f
    return w


def step_work(batch, cfg, training: bool = True, device_type: str = "cpu") -> Work:
    """FLOPs of one training step of ``batch`` (a `MaskedViews` rank batch) under ``cfg`` (a
    RunConfig) on a ``device_type`` device: its microbatches as the trainer splits them, forward
    and backward, plus the optimizer's elementwise work. Host-side arithmetic on the masks only
    (no model run)."""
    tok = as_tokenization(cfg.data.tokenization)
    parts = []
    for mb in batch.microbatches(cfg.data.rank_microbatch_size):
        layout = TokenLayout.build(mb.data, mb.patch_size, tok, cfg.model.modalities)
        parts.append((layout, torch.stack([layout.token_masks(m) for m in mb.masks])))
    return _sum_work(parts, cfg, tok, training, device_type)


def plan_work(plans, cfg, training: bool = True, device_type: str = "cpu") -> Work:
    """`step_work` from the trainer's host plans (`model/plan.py`) of the step's microbatches."""
    parts = [(p.layout, p.masks.view(p.num_views, -1, p.masks.shape[-1])) for p in plans]
    return _sum_work(parts, cfg, as_tokenization(cfg.data.tokenization), training, device_type)


def _sum_work(parts, cfg, tok: TokenizationConfig, training: bool, device_type: str) -> Work:
    mc = cfg.model
    dropout = training and mc.band_dropout_rate > 0
    # the bandset-merge models embed every position (`LatentMIM.forward`)
    only_rows = embeds_only_rows(device_type) and not mc.merge_bandsets
    # training steps of the unmerged models skip dropped encoder branches (`LatentMIM.plan`)
    skip = mc.drop_path if training and not mc.merge_bandsets else 0.0
    total = Work()
    for layout, codes in parts:
        total.add(microbatch_work(layout, codes, mc, tok, cfg.loss.mask_negatives_for_modalities, dropout, training,
                                  only_rows, skip))
    if training:
        total.elementwise["optimizer"] = 12.0 * num_parameters(mc, tok)  # AdamW: ~12 ops per weight
    return total


class _OperatorCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_operators(fn, *args, **kwargs) -> int:
    """The operators that compute (views excluded) when ``fn(*args, **kwargs)`` runs, counted below
    autograd (the backward's too, where ``fn`` runs one): on a GPU each is a kernel launch, or
    more; Triton kernels launched outside torch.library are not seen. The count slows ``fn``."""
    with _OperatorCounter() as counter:
        fn(*args, **kwargs)
    return counter.count


def num_parameters(model_cfg, tokenization: TokenizationConfig) -> int:
    """Trainable parameters of the model (the Linear and conv weights; encodings included)."""
    d, depth, _, dd, ddepth, _, mlp = model_dims(model_cfg)
    hidden = int(d * mlp)
    block = 4 * (d * d + d) + (d * hidden + hidden) + (hidden * d + d) + 4 * d
    dhidden = int(dd * mlp)
    dblock = 4 * (dd * dd + dd) + (dd * dhidden + dhidden) + (dhidden * dd + dd) + 4 * dd
    embed = 0
    for m in model_cfg.modalities:
        k = BASE_PATCH * BASE_PATCH if MODALITIES[m].is_spatial else 1
        embed += sum(c * k * d + d for c in tokenization.bands_per_bandset(m))
    return depth * block + ddepth * dblock + embed + d * d + d + 2 * d + d * dd + dd * d + dd + 3 * dd


# ---------------------------------------------------------------------------------------------
# The limit


_CPU_PEAK: dict[int, float] = {}
_WARM: set[tuple[int, int]] = set()  # (threads, n) already timed once in this process


def _time_matmul(threads: int, n: int, reps: int) -> float:
    """fp32 FLOP/s of an ``n``² matmul at ``threads``: the best of ``reps`` timings of each fp32
    GEMM the training step uses, taken over both: MKL's sgemm (``torch.mm``: the Linear
    gradients of narrow layers, the reference's Linear layers, the blocks' Linear layers on Intel
    CPUs) and oneDNN's inner product (`ops.linear.onednn_matmul`: the blocks' Linear layers on AMD
    CPUs). On AMD CPUs MKL runs its AVX2 kernels, oneDNN AVX-512: there oneDNN's is ~15% faster,
    and a peak probed with MKL alone would let the step's GEMMs pass 100% of it. The first call
    per (threads, n) warms each GEMM up with an untimed call first."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)  # its own generator: training's RNG stream is untouched
        a, bm = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        out = torch.empty(n, n)
        best = float("inf")
        for matmul in (lambda: torch.mm(a, bm, out=out), lambda: onednn_matmul(a, bm)):
            if (threads, n) not in _WARM:
                matmul()
            for _ in range(reps):
                t0 = time.perf_counter()
                matmul()
                best = min(best, time.perf_counter() - t0)
        _WARM.add((threads, n))
    finally:
        torch.set_num_threads(old)
    return 2.0 * n ** 3 / best


def measure_cpu_peak(threads: int | None = None, n: int = 2048, reps: int = 3, fresh: bool = False) -> float:
    """fp32 FLOP/s of a large square matmul at ``threads`` (default: torch's current count),
    the faster of MKL's and oneDNN's, best of ``reps`` (`_time_matmul`); cached per thread count
    (about 1 s the first time on a 2-core machine, where it reads 205–220 GFLOP/s on the AMD
    EPYC VMs, oneDNN's; MKL's sgemm reads 175–195). ``fresh``: measure again now and leave the
    cache alone (a shared machine's speed drifts; `benchmarks/conftest.py` probes it beside each
    round of an interleaved benchmark: about 0.3 s a probe at ``reps=1``)."""
    threads = threads or torch.get_num_threads()
    if fresh:
        return _time_matmul(threads, n, reps)
    if threads not in _CPU_PEAK:
        _CPU_PEAK[threads] = _time_matmul(threads, n, reps)
    return _CPU_PEAK[threads]


def gpu_spec(name: str) -> tuple[float, float] | None:
    """(bf16 dense FLOP/s, HBM bytes/s) of a GPU by (a substring of) its name, or None."""
    for key, spec in GPU_SPECS.items():
        if key in name.upper():
            return spec
    return None


def describe_device(device: torch.device | str) -> str:
    """The device in the run's first line and the benchmarks' header: the GPU's name, or the
    CPU's model, thread count and the library that runs the Linear layers (`ops.linear.backend`):
    the fraction of the peak depends on them."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type != "cpu":
        return str(device)
    library = {"onednn": "oneDNN", "mkl": "MKL"}[linear_backend()]
    return f"cpu ({cpu_model()[1]}, {torch.get_num_threads()} threads, Linear layers on {library})"


def peak_flops(device: torch.device | str) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) for the step line and the benchmarks."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        spec = gpu_spec(name)
        if spec is None:
            raise ValueError(f"no bf16 peak known for {name!r}; add it to perf.GPU_SPECS")
        return spec[0], f"{name} bf16 dense (datasheet)"
    return measure_cpu_peak(), (f"cpu fp32 matmul at {torch.get_num_threads()} threads (measured: the faster of "
                                "MKL's sgemm and oneDNN's inner product)")


# ---------------------------------------------------------------------------------------------
# A GPU time floor on paper


@dataclass
class Floor:
    """Per-component time floors of one step on a GPU (seconds) and what they rest on."""

    flops_s: dict[str, float]
    bytes_s: dict[str, float]
    launches: int
    launch_s: float

    def component(self, k: str) -> float:
        return max(self.flops_s.get(k, 0.0), self.bytes_s.get(k, 0.0))

    @property
    def total(self) -> float:
        keys = set(self.flops_s) | set(self.bytes_s)
        return sum(self.component(k) for k in keys) + self.launch_s


# Kernel launches per transformer block, forward + backward. Ours with compiled blocks: 5 GEMMs
# (fused q/k/v), 1 varlen attention and ~4 fused elementwise kernels forward, about twice that
# backward. The reference in eager mode: 6 GEMMs, SDPA plus its mask expansion, 2 LayerNorms,
# GELU, DropPath as rand / div / mul per branch, 2 residual adds and the head reshapes, about
# 25 forward and 50 backward. Per-view overhead of the reference (token sort/gather per view,
# composite encodings built per modality, the per-modality vectorised loss): ~1000 kernels.
LAUNCHES_PER_BLOCK = {"ours": 30, "ref": 75}
LAUNCHES_PER_PASS = {"ours": 300, "ref": 1000}  # per microbatch pass (ours: both views at once)
BF16, FP32 = 2, 4


def gpu_traffic(work: Work, model_cfg, side: str) -> tuple[dict[str, float], int]:
    """Least HBM bytes per component and kernel launches of one training step (a model).

    Activations in bf16; every GEMM reads its input and weight and writes its output, its
    backward about twice that; elementwise passes per block (norms, GELU, residuals, DropPath):
    ours fused by compile (~12 activation-sized passes per block forward + backward), the
    reference eager (~30); its SDPA reads a materialised boolean mask [B, H, Lq, Lk]. The patch
    embedding: ours reads the pixels once per projection (fused kernel), the reference writes
    and reads the image resized by 8/p (fp32) per view, online and target. Losses in fp32.
    """
    d, depth, heads, dd, ddepth, dheads, mlp = model_dims(model_cfg)
    t = work.tokens
    ours = side == "ours"
    enc = t["encoder_tokens"] if ours else t["ref_encoder_tokens"]
    q = t["decoder_queries"] if ours else t["ref_decoder_queries"]
    passes = 3.0  # forward, backward (input and weight gradients)
    gemm_io = (4 + 2 * mlp) + (4 + 2 * mlp)  # per token and block: inputs read + outputs written, × D
    elementwise = 12 if ours else 30
    b = {}
    b["encoder_linear"] = depth * enc * d * (gemm_io + elementwise) * BF16 * passes / 2
    b["decoder_linear"] = ddepth * (q * dd * (gemm_io + elementwise) + enc * dd * 4) * BF16 * passes / 2
    if not ours:  # input projection and output head at every position
        b["decoder_linear"] += t["positions"] * (d + dd) * 2 * BF16 * passes
    attn_io = 4 * BF16 * passes
    b["encoder_attention"] = depth * enc * d * attn_io
    b["decoder_attention"] = ddepth * (q + enc) * dd * attn_io
    if not ours:  # the boolean key-padding mask, expanded to [B, H, Lq, Lk] per block, fwd + bwd
        b["encoder_attention"] += depth * heads * t["ref_enc_scores"] * 2
        b["decoder_attention"] += ddepth * dheads * t["ref_dec_scores"] * 2
    rows = t["embed_rows"]
    views = t["views"] / t["microbatches"]  # summed over microbatches by Work.add
    if ours:
        b["patch_embed"] = (views + 1) * (t["pixels"] * FP32 + rows * d * BF16) * 2
    else:  # the image resized by 8/p, written then read (fp32), per view for online and target
        b["patch_embed"] = 2 * views * (t["pixels"] + 2 * t["resized_pixels"]) * FP32 * 2 + \
            2 * views * rows * d * BF16 * 2
    if ours:  # flash-style: rows read forward and backward, gradient written; no pair matrix
        b["loss"] = t["decoder_queries"] * d * FP32 * 5
    else:  # [B, N, N] fp32 scores, target similarities, masks, softmax and its gradient
        b["loss"] = t["positions"] * d * FP32 * 5 + t["ref_loss_pairs"] * FP32 * 8
    launches = int(t["microbatches"] * ((depth + ddepth) * LAUNCHES_PER_BLOCK[side] * (1 if ours else views)
                                        + LAUNCHES_PER_PASS[side] * (1 if ours else views)))
    return b, launches


def gpu_step_floor(work: Work, model_cfg, side: str, spec: tuple[float, float], launch_us: float = 4.0) -> Floor:
    """Floor of one step on a GPU: each component takes at least its FLOPs at the bf16 peak and
    at least its bytes at HBM bandwidth (whichever is larger), plus launches × a few µs
    (a kernel costs at least its launch when kernels are short). A prediction, not a measurement."""
    flops = work.ours if side == "ours" else work.ref
    peak, bw = spec
    traffic, launches = gpu_traffic(work, model_cfg, side)
    return Floor({k: v / peak for k, v in flops.items()}, {k: v / bw for k, v in traffic.items()},
                 launches, launches * launch_us * 1e-6)
