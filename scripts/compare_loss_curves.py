"""Train ours and the reference side by side on the same batches and compare the loss curves.

    python scripts/compare_loss_curves.py --steps 100 --size nano [--out curves.json]

Both start from the same weights (the reference model's random init, imported into ours), see
the same rank batches (same crops, same two masks per sample) and use the same optimizer,
schedule and clipping; dropout draws (band dropout, DropPath) are independent, so the curves
agree within noise, not bit for bit. Prints mean losses over windows of steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_train_step import ReferenceStep, _reference_model  # noqa: E402

from olmoearth_fast import experiments  # noqa: E402
from olmoearth_fast.checkpoint import import_reference_state_dict  # noqa: E402
from olmoearth_fast.config import apply_overrides  # noqa: E402
from olmoearth_fast.data.demo import ensure_demo_dataset  # noqa: E402
from olmoearth_fast.trainer import Trainer, build_loader, build_model, lr_at  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--size", default="nano")
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--out", default=None)
    args, overrides = ap.parse_known_args()
    root = ensure_demo_dataset("runs/demo_data", num_samples=256)
    cfg = experiments.demo(experiments.get("exp14"))
    cfg = apply_overrides(cfg, [f"data.dataset={root}", f"model.size={args.size}", "data.num_workers=0",
                                f"trainer.max_steps={args.steps}", "checkpoint.dir=runs/compare", *overrides])
    loader = build_loader(cfg, 0, 1, "runs/compare")
    batches = [loader.make_batch(1 + s // len(loader), s % len(loader)) for s in range(args.steps)]
    torch.manual_seed(cfg.trainer.init_seed)
    ref_model = _reference_model(cfg)
    ours = build_model(cfg, torch.device("cpu"))
    import_reference_state_dict(ours, ref_model.state_dict())
    trainer = Trainer(cfg, loader, ours, torch.device("cpu"), "runs/compare", log=lambda *a: None)
    ref = ReferenceStep(ref_model, cfg, vec=True)
    curves = {"ours": [], "ref": []}
    times = {"ours": 0.0, "ref": 0.0}
    for step, batch in enumerate(batches):
        t0 = time.perf_counter()
        stats, _ = trainer.train_step(batch)
        times["ours"] += time.perf_counter() - t0
        curves["ours"].append(stats.loss)
        for g in ref.opt.param_groups:
            g["lr"] = lr_at(step, cfg, args.steps)
        t0 = time.perf_counter()
        curves["ref"].append(float(ref(batch).detach()))
        times["ref"] += time.perf_counter() - t0
    w = args.window
    print(f"{'steps':>12} {'ours':>8} {'ref':>8}")
    for s in range(0, args.steps, w):
        o = sum(curves["ours"][s:s + w]) / len(curves["ours"][s:s + w])
        r = sum(curves["ref"][s:s + w]) / len(curves["ref"][s:s + w])
        print(f"{s + 1:>5}-{min(s + w, args.steps):<6} {o:8.4f} {r:8.4f}")
    print(f"time: ours {times['ours']:.1f}s, ref {times['ref']:.1f}s ({times['ref'] / times['ours']:.2f}x)")
    if args.out:
        Path(args.out).write_text(json.dumps(curves))


if __name__ == "__main__":
    main()
