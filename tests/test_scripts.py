"""The diagnostic scripts under scripts/."""

import importlib.util
import os

import pytest
import torch

from olmoearth_fast.modalities import MaskValue

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_padding_report_counts():
    count = _load("padding_report").count
    on, dec, miss = int(MaskValue.ONLINE_ENCODER), int(MaskValue.DECODER), int(MaskValue.MISSING)
    codes = torch.tensor([[on, on, on, dec, miss],    # 3 online, 1 decoder
                          [on, dec, dec, dec, miss]])  # 1 online, 3 decoder
    c = {k: float(v) for k, v in count(codes).items()}
    assert c["encoder_tokens"] == 4 and c["encoder_tokens_padded"] == 6
    assert c["decoder_queries"] == 4 and c["decoder_queries_padded"] == 6
    assert c["encoder_scores"] == 9 + 1 and c["encoder_scores_padded"] == 2 * 9
    assert c["decoder_scores"] == 1 * 3 + 3 * 1 and c["decoder_scores_padded"] == 2 * 3 * 3


def test_loss_curve_windows_and_verdict():
    pytest.importorskip("olmoearth_pretrain")
    mod = _load("compare_loss_curves")
    g = torch.Generator().manual_seed(0)
    batch_effect = torch.randn(40, generator=g).tolist()  # shared by both: cancels in the pairs
    ref = [4.0 + b for b in batch_effect]
    noisy = [r + 0.01 * float(e) for r, e in zip(ref, torch.randn(40, generator=g))]
    rows = mod.paired_windows(noisy, ref, 20)
    assert [(r["first"], r["last"]) for r in rows] == [(1, 20), (21, 40)]
    assert rows[0]["ours"] == pytest.approx(sum(noisy[:20]) / 20)
    assert mod.within_noise(rows)["ok"]
    shifted = [x + 0.05 for x in noisy]  # a systematic offset of 5 noise sd: detected
    verdict = mod.within_noise(mod.paired_windows(shifted, ref, 20))
    assert not verdict["ok"] and verdict["max_abs_diff"] == pytest.approx(0.05, abs=0.01)
    assert "DIFFER" in verdict["text"]
    assert mod.within_noise(mod.paired_windows([1.0], [1.0], 20))["text"].startswith("curves too short")


def test_profile_step_categories():
    pytest.importorskip("olmoearth_pretrain")
    categorise = _load("profile_step").categorise
    expected = {
        "aten::mm": "matmul", "aten::addmm": "matmul", "mkldnn::_linear_pointwise": "matmul",
        "aten::convolution_backward": "matmul",
        "olmoearth_fast::segment_attention_fwd": "attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
        "olmoearth_fast::bias_gelu_bwd": "elementwise / norms", "aten::native_layer_norm": "elementwise / norms",
        "olmoearth_fast::gather_rows": "data movement / indexing", "aten::copy_": "data movement / indexing",
        "aten::_fused_adamw_": "optimizer",
    }
    assert {name: categorise(name) for name in expected} == expected
