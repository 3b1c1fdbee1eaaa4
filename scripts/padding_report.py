"""How much work the reference's padded layout does that the packed layout skips.

    python scripts/padding_report.py [exp14] [--batches 4] [dotted overrides ...]

The reference removes masked tokens by sorting and truncating each view to the batch's largest
ONLINE count, and pads the decoder's queries the same way; olmoearth_fast packs exactly the
ONLINE / DECODER tokens. For real masks from the loader (default: the demo dataset at the GPU
benchmark's shape, B=64, microbatch 32, p=4, hw_p=8) this counts, per view and microbatch:
encoder tokens, decoder queries and attention score entries (Σ len² vs B·max len²; the
decoder's cross-attention counts queries × keys), packed vs padded. The ratios bound what
packing alone can gain in the linear layers and in attention; no timing is involved.
"""

from __future__ import annotations

import argparse
import json

import torch

from olmoearth_fast import experiments
from olmoearth_fast.config import apply_overrides
from olmoearth_fast.data.demo import ensure_demo_dataset
from olmoearth_fast.modalities import MaskValue
from olmoearth_fast.trainer import build_loader, build_model


def count(codes: torch.Tensor) -> dict[str, int]:
    """Packed and padded work of one view of one microbatch; codes [B, N] token mask values."""
    on = (codes == MaskValue.ONLINE_ENCODER).sum(1).double()
    dec = (codes == MaskValue.DECODER).sum(1).double()
    b = codes.shape[0]
    return {
        "encoder_tokens": on.sum(), "encoder_tokens_padded": on.max() * b,
        "decoder_queries": dec.sum(), "decoder_queries_padded": dec.max() * b,
        "encoder_scores": (on * on).sum(), "encoder_scores_padded": on.max() ** 2 * b,
        "decoder_scores": (dec * on).sum(), "decoder_scores_padded": dec.max() * on.max() * b,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment", nargs="?", default="exp14")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--dataset", default=None, help="H5 dataset directory (default: the demo data)")
    args, overrides = ap.parse_known_args()
    dataset = args.dataset or str(ensure_demo_dataset("runs/demo_data_256", num_samples=256))
    cfg = apply_overrides(experiments.get(args.experiment), [
        f"data.dataset={dataset}", "data.global_batch_size=64", "data.rank_microbatch_size=32",
        "data.patch_sizes=[4]", "data.hw_p_list=[8]", "data.num_workers=0", "checkpoint.dir=runs/padding_report",
        *overrides])
    loader = build_loader(cfg, 0, 1, "runs/padding_report")
    model = build_model(cfg, torch.device("cpu"))
    totals: dict[str, float] = {}
    for step in range(min(args.batches, len(loader))):
        batch = loader.make_batch(1, step)
        for mb in batch.microbatches(cfg.data.rank_microbatch_size):
            layout = model.layout(mb.data, mb.patch_size)
            for view_masks in mb.masks:
                for k, v in count(layout.token_masks(view_masks)).items():
                    totals[k] = totals.get(k, 0.0) + float(v)
    report = {k: totals[k] for k in totals if not k.endswith("_padded")}
    ratios = {f"{k}_padded/packed": round(totals[k + "_padded"] / max(totals[k], 1.0), 3) for k in report}
    print(json.dumps({"experiment": args.experiment, "batches": min(args.batches, len(loader)),
                      "global_batch": cfg.data.global_batch_size, "microbatch": cfg.data.rank_microbatch_size,
                      "packed": report, **ratios}, indent=1))


if __name__ == "__main__":
    main()
