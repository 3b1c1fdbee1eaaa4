"""The work model (`olmoearth_fast.perf`): hand counts on a small case, and agreement with
`torch.utils.flop_counter.FlopCounterMode` on real training steps, ours and the reference's."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from olmoearth_fast import experiments, perf
from olmoearth_fast.config import ModelConfig, RunConfig, apply_overrides
from olmoearth_fast.data.collate import MaskedViews
from olmoearth_fast.trainer import Trainer, build_loader, build_model

S2 = "sentinel2_l2a"


def _tiny_case(dropout: float) -> tuple[MaskedViews, RunConfig]:
    """B=2 samples, two views, S2 only (12 bands, one bandset), p=1, 2×2 pixels, T=1: N=4."""
    cfg = RunConfig()
    cfg.model = ModelConfig(dims=(8, 1, 2, 8, 1, 2, 2.0), modalities=(S2,), band_dropout_rate=dropout, drop_path=0.0)
    cfg.data.rank_microbatch_size = 2
    codes = [[[0, 0, 2, 2], [0, 2, 2, 1]],  # view A: ONLINE 2, 1; DECODER 2, 2
             [[2, 0, 0, 0], [0, 0, 2, 2]]]  # view B: ONLINE 3, 2; DECODER 1, 2
    masks = [{S2: torch.tensor(v, dtype=torch.uint8).view(2, 2, 2, 1, 1)} for v in codes]
    data = {S2: torch.zeros(2, 2, 2, 1, 12)}
    return MaskedViews(data, torch.zeros(2, 1, 3, dtype=torch.long), masks, patch_size=1, hw_p=2), cfg


@pytest.fixture
def embed_every_token(monkeypatch):
    """The work model as on a GPU with the fused patch-embed kernel (every position embedded)."""
    monkeypatch.setattr(perf, "embeds_only_rows", lambda device_type: False)


def test_hand_counts_small_case(embed_every_token):
    batch, cfg = _tiny_case(dropout=0.3)
    w = perf.step_work(batch, cfg)
    # D = 8, depth 1, MLP ratio 2: a block's Linears cost 2·D²·(4 + 2·2) = 1024 FLOPs per token;
    # every matmul's forward + backward = 3× forward.
    embed = 2 * 2 * 4 * 12 * 64 * 8  # B · positions · C · 8·8 · D · 2 = 98,304 per embedding pass
    assert w.ours["patch_embed"] == embed * (2 * 2 + 1)  # 2 views fwd + dW, target once
    assert w.ref["patch_embed"] == embed * (2 * 2 + 2)  # ... target per view
    # ONLINE counts 2, 1 | 3, 2: packed 8 tokens, Σlen² = 18; padded 2·2 + 2·3 = 10, Σ B·L² = 26
    assert w.ours["encoder_linear"] == 3 * (8 * 1024 + 2 * 4 * 64)  # + pooled projection of 4 rows
    assert w.ref["encoder_linear"] == 3 * (10 * 1024 + 2 * 4 * 64)
    assert w.ours["encoder_attention"] == 3 * 4 * 18 * 8
    assert w.ref["encoder_attention"] == 3 * 4 * 26 * 8
    # decoder: per context token in-projection 2·64 + k, v 2·2·64 = 384; per query q, proj,
    # fc1, fc2 2·64·6 = 768 + output head 128. Ours: 8 context, 7 queries. Reference: in-
    # projection and head at all 16 positions, k/v on 10 padded context rows, q on 2·2+2·2 = 8.
    assert w.ours["decoder_linear"] == 3 * (8 * 384 + 7 * 896)
    assert w.ref["decoder_linear"] == 3 * (16 * 256 + 10 * 256 + 8 * 768)
    # cross-attention pairs: Σ online·decoder = 2·2 + 1·2 + 3·1 + 2·2 = 13; padded 2·2·2 + 2·3·2 = 20
    assert w.ours["decoder_attention"] == 3 * 4 * 13 * 8
    assert w.ref["decoder_attention"] == 3 * 4 * 20 * 8
    # loss (S2 does not mask negatives): scores forward + prediction gradient, 2·D·2 per pair;
    # Σc² = 4 + 4 + 1 + 4 = 13 pairs; the reference scores all 4² pairs of 4 (view, sample)s
    assert w.ours["loss"] == 32 * 13
    assert w.ref["loss"] == 32 * 64
    assert w.ours["infonce"] == w.ref["infonce"] == 3 * 2 * 2 * 2 * 8
    assert w.tokens["encoder_tokens"] == 8 and w.tokens["decoder_queries"] == 7
    assert w.ratio == pytest.approx(w.ref_total / w.ours_total)
    assert w.elementwise["optimizer"] > 0


def test_without_dropout_views_share_the_embedding(embed_every_token):
    batch, cfg = _tiny_case(dropout=0.0)
    embed = 2 * 2 * 4 * 12 * 64 * 8
    w = perf.step_work(batch, cfg)
    assert w.ours["patch_embed"] == embed * (2 + 1)
    assert perf.step_work(batch, cfg, training=False).ours["patch_embed"] == embed * 2  # no backward


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_cpu_embeds_only_the_tokens_the_step_reads(dropout):
    """On CPU ours embeds the 8 ONLINE tokens of both views (forward + dW) and the target at the
    7 DECODER positions: 2·C·64·D = 12,288 FLOPs a token, dropout or not."""
    batch, cfg = _tiny_case(dropout=dropout)
    assert perf.embeds_only_rows("cpu")
    assert perf.step_work(batch, cfg).ours["patch_embed"] == 12288 * (8 * 2 + 7)
    assert perf.step_work(batch, cfg, training=False).ours["patch_embed"] == 12288 * (8 + 7)
    assert perf.step_work(batch, cfg).ref["patch_embed"] == 2 * 4 * 12288 * (2 * 2 + 2)  # every position


def test_skipped_drop_path_branches_count_in_expectation():
    """With DropPath rate r ours skips the encoder branches a sample drops: its block work counts
    (1 − r + r⁴) times (4 samples: 2 views × 2; all four dropping runs the branch), compiled
    blocks included; not in eval, never for the reference (it multiplies by 0)."""
    batch, cfg = _tiny_case(dropout=0.3)
    full = perf.step_work(batch, cfg)
    cfg.model.drop_path = 0.1
    w = perf.step_work(batch, cfg)
    kept = 0.9 + 0.1 ** 4
    pooled = 3 * 2 * 4 * 64  # the pooled projection is not in a block
    assert w.ours["encoder_attention"] == pytest.approx(kept * full.ours["encoder_attention"])
    assert w.ours["encoder_linear"] == pytest.approx(kept * (full.ours["encoder_linear"] - pooled) + pooled)
    assert w.ours["decoder_linear"] == full.ours["decoder_linear"]
    assert w.ref["encoder_linear"] == full.ref["encoder_linear"]
    cfg.model.drop_path = 0.0
    evaluation = perf.step_work(batch, cfg, training=False).ours["encoder_linear"]
    cfg.model.drop_path = 0.1
    assert perf.step_work(batch, cfg, training=False).ours["encoder_linear"] == evaluation


def test_masked_modality_adds_the_target_similarity():
    batch, cfg = _tiny_case(dropout=0.0)
    cfg.loss.mask_negatives_for_modalities = (S2,)
    assert perf.step_work(batch, cfg).ours["loss"] == 48 * 13  # + ĝ·ĝ, 2·D per pair


def test_microbatches_add_up():
    batch, cfg = _tiny_case(dropout=0.3)
    whole = perf.step_work(batch, cfg)
    cfg.data.rank_microbatch_size = 1
    split = perf.step_work(batch, cfg)
    # packed work is per sample: the same; padded work shrinks with one sample per microbatch
    assert split.ours["encoder_linear"] == whole.ours["encoder_linear"]
    assert split.ref["encoder_attention"] < whole.ref["encoder_attention"]


def test_num_parameters_matches_the_model():
    cfg = apply_overrides(experiments.get("exp14"), ["model.size=nano"])
    from olmoearth_fast.modalities import as_tokenization

    model = build_model(cfg, torch.device("cpu"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert perf.num_parameters(cfg.model, as_tokenization(cfg.data.tokenization)) == pytest.approx(trainable, rel=0.02)


def test_cpu_peak_is_measured_and_cached():
    peak = perf.measure_cpu_peak(1, n=256, reps=1)
    assert peak > 1e8
    assert perf.measure_cpu_peak(1) == peak
    assert perf.gpu_spec("NVIDIA H200") == (989e12, 4.8e12)
    assert perf.gpu_spec("NVIDIA H100 80GB HBM3")[1] == 3.35e12
    assert perf.gpu_spec("Tesla T4") is None


# --------------------------------------------------------------------------------------------
# Against the flop counter, on real steps. CPU SDPA's flash kernel and our segment-attention op
# have no formula in torch's counter; these count QKᵀ + PV (and twice that backward) as the
# model does.


def _sdpa_cpu_fwd(q, k, v, *args, out_shape=None, **kwargs):
    b, h, s, d = q
    return 4 * b * h * s * k[2] * d


def _sdpa_cpu_bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
    b, h, s, d = q
    return 8 * b * h * s * k[2] * d


def _segment_scores(q, q_cu, k_cu) -> int:
    """Σ over segments of Lq·Lk, times heads and head dim (the op's offsets are host lists)."""
    pairs = sum((q_cu[i + 1] - q_cu[i]) * (k_cu[i + 1] - k_cu[i]) for i in range(len(q_cu) - 1))
    return pairs * q[1] * q[2]


def _segment_fwd(q, k, v, q_cu, k_cu, scale, out_shape=None, **kwargs):
    return 4 * _segment_scores(q, q_cu, k_cu)


def _segment_bwd(grad_out, q, k, v, out, lse, q_cu, k_cu, scale, dq, dk, dv, out_shape=None, **kwargs):
    return 8 * _segment_scores(q, q_cu, k_cu)


def _inner_product(x, w, b, attr, scalars, algorithm, out_shape=None, **kwargs):
    """oneDNN's Linear forward (`ops.linear`): 2·M·K·N."""
    return 2 * math.prod(x[:-1]) * x[-1] * w[0]


_COUNTER_EXTRAS = {torch.ops.mkldnn._linear_pointwise: _inner_product,
                   torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_fwd,
                   torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_bwd,
                   torch.ops.olmoearth_fast.segment_attention_fwd: _segment_fwd,
                   torch.ops.olmoearth_fast.segment_attention_bwd: _segment_bwd}
_GROUPS = {"conv": ("convolution", "convolution_backward"), "linear": ("mm", "addmm", "_linear_pointwise"),
           "attention": ("_scaled_dot_product_flash_attention_for_cpu",
                         "_scaled_dot_product_flash_attention_for_cpu_backward",
                         "segment_attention_fwd", "segment_attention_bwd"), "bmm": ("bmm",)}


def _counted(fn) -> dict[str, float]:
    counter = FlopCounterMode(display=False, custom_mapping=_COUNTER_EXTRAS)
    with counter:
        fn()
    per_op = {str(k).split(".")[1]: v for k, v in counter.get_flop_counts()["Global"].items()}
    return {g: float(sum(per_op.get(o, 0) for o in ops)) for g, ops in _GROUPS.items()}


def _exp14(size: str, batch: int, tmp_path, demo_dataset):
    cfg = apply_overrides(experiments.get("exp14"), [
        f"model.size={size}", f"data.dataset={demo_dataset}", f"checkpoint.dir={tmp_path}/run",
        f"data.global_batch_size={batch}", f"data.rank_microbatch_size={batch}", "data.patch_sizes=[4]",
        "data.hw_p_list=[6]", "data.num_workers=0", "logging.wandb=False", "trainer.max_steps=10"])
    loader = build_loader(cfg, 0, 1, str(tmp_path / "run"))
    return cfg, loader, loader.make_batch(1, 0)


@pytest.fixture(scope="module")
def demo_dataset(tmp_path_factory):
    from olmoearth_fast.data.demo import ensure_demo_dataset

    return str(ensure_demo_dataset(tmp_path_factory.mktemp("perf") / "demo", num_samples=16))


@pytest.mark.parametrize("size,batch", [("nano", 16), ("tiny", 4)])
def test_ours_agrees_with_the_flop_counter(size, batch, tmp_path, demo_dataset):
    cfg, loader, b = _exp14(size, batch, tmp_path, demo_dataset)
    trainer = Trainer(cfg, loader, build_model(cfg, torch.device("cpu")), torch.device("cpu"), str(tmp_path / "run"),
                      log=lambda *a: None)
    seen = _counted(lambda: trainer.train_step(b))
    w = perf.step_work(b, cfg)
    # on CPU the patch projection is a Linear on the gathered patches of the tokens it embeds
    assert seen["conv"] == 0
    linear = w.ours["patch_embed"] + w.ours["encoder_linear"] + w.ours["decoder_linear"] + w.ours["infonce"]
    assert seen["linear"] == pytest.approx(linear, rel=0.05)
    attention = w.ours["encoder_attention"] + w.ours["decoder_attention"]
    assert seen["attention"] == pytest.approx(attention, rel=0.05)
    assert sum(seen.values()) == pytest.approx(w.ours_total - w.ours["loss"], rel=0.05)  # the loss is one op


def test_reference_agrees_with_the_flop_counter(tmp_path, demo_dataset):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    reference_step = pytest.importorskip("reference_step")
    cfg, _, b = _exp14("nano", 8, tmp_path, demo_dataset)
    model = reference_step.reference_model(cfg, "best")
    step = reference_step.ReferenceStep(model, cfg, "best")
    seen = _counted(lambda: step(b))
    w = perf.step_work(b, cfg)
    # ref_best's patch projection is a Linear on CPU (a conv elsewhere): one group with the Linears
    linear = w.ref["patch_embed"] + w.ref["encoder_linear"] + w.ref["decoder_linear"] + w.ref["infonce"]
    assert seen["conv"] + seen["linear"] == pytest.approx(linear, rel=0.05)
    assert seen["bmm"] == pytest.approx(w.ref["loss"], rel=0.05)  # the vectorised loss's two bmm + backward
    assert w.ratio > 1.2  # padding, per-view target and the all-token head and loss


def test_gpu_floor_on_paper():
    batch, cfg = _tiny_case(dropout=0.3)
    w = perf.step_work(batch, cfg)
    spec = perf.GPU_SPECS["H200"]
    ours, ref = (perf.gpu_step_floor(w, cfg.model, side, spec) for side in ("ours", "ref"))
    assert ours.launches < ref.launches  # one pass for both views, fused blocks
    assert 0 < ours.total < ref.total
    for f, flops in ((ours, w.ours), (ref, w.ref)):
        for k, v in flops.items():
            assert f.flops_s[k] == pytest.approx(v / spec[0])
            assert f.component(k) >= f.flops_s[k]
    traffic, _ = perf.gpu_traffic(w, cfg.model, "ref")
    assert traffic["patch_embed"] > perf.gpu_traffic(w, cfg.model, "ours")[0]["patch_embed"]  # resized image


def test_a_fresh_peak_measurement_leaves_the_cache_alone():
    perf._CPU_PEAK[1] = 123.0
    try:
        fresh = perf.measure_cpu_peak(1, n=128, reps=1, fresh=True)
        assert fresh > 0 and fresh != 123.0
        assert perf._CPU_PEAK[1] == 123.0 and perf.measure_cpu_peak(1) == 123.0
    finally:
        perf._CPU_PEAK.pop(1, None)
    perf.measure_cpu_peak(1, n=128, reps=1, fresh=True)
    assert 1 not in perf._CPU_PEAK  # nothing cached where nothing was


def test_measuring_the_peak_leaves_the_global_rng_alone():
    perf._CPU_PEAK.pop(1, None)
    state = torch.get_rng_state()
    perf.measure_cpu_peak(1, n=128, reps=1)
    assert torch.equal(torch.get_rng_state(), state)


def test_cpu_peak_is_the_faster_of_the_two_gemms(monkeypatch):
    """Both fp32 GEMMs a step may use are timed (MKL's `torch.mm`, oneDNN's inner product,
    `ops.linear.onednn_matmul`) and the faster sets the peak."""
    n = 256
    calls = []
    monkeypatch.setattr(perf, "onednn_matmul", lambda a, b: calls.append(b.shape))  # a "GEMM" that takes no time
    assert perf.measure_cpu_peak(1, n=n, reps=2, fresh=True) > 1e13
    assert calls[-2:] == [(n, n)] * 2  # both timed calls (after an untimed first one, the first time)
    monkeypatch.setattr(perf, "onednn_matmul", lambda a, b: time.sleep(0.05))  # one slower than any sgemm
    assert perf.measure_cpu_peak(1, n=n, reps=2, fresh=True) > 10 * 2 * n ** 3 / 0.05  # torch.mm's time counted


def test_the_device_line_names_the_cpu_and_its_linear_library(monkeypatch):
    from olmoearth_fast.ops import cpu_model

    line = perf.describe_device(torch.device("cpu"))
    assert line.startswith(f"cpu ({cpu_model()[1]}, {torch.get_num_threads()} threads, Linear layers on ")
    monkeypatch.setenv("OLMOEARTH_FAST_CPU_LINEAR", "onednn")
    assert perf.describe_device(torch.device("cpu")).endswith("Linear layers on oneDNN)")
    monkeypatch.setenv("OLMOEARTH_FAST_CPU_LINEAR", "mkl")
    assert perf.describe_device(torch.device("cpu")).endswith("Linear layers on MKL)")


def test_count_operators_counts_computing_operators_not_views():
    from olmoearth_fast.perf import count_operators

    x = torch.randn(4, 3, requires_grad=True)
    assert count_operators(lambda: (x + 1).view(-1).t() * 2) == 2  # add, mul; view and t are views
    # with a backward: its operators count too (mul's backward: one mul; add's: none)
    assert count_operators(lambda: (x * 3).sum().backward()) > 2
