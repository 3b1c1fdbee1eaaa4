"""The diagnostic scripts under scripts/."""

import importlib.util
import os

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
