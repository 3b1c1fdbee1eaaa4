"""Launcher: `torchrun --nproc_per_node=N -m olmoearth_fast.train exp14 [a.b=c ...]`.

Also `python -m olmoearth_fast.train exp14` (one process), `--demo` (nano model on the embedded
demo dataset, minutes on a CPU), `--dry-run` (print the resolved config as JSON and exit),
`--resume` (continue from the latest checkpoint of the run directory).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from olmoearth_fast import checkpoint as ckpt
from olmoearth_fast import experiments
from olmoearth_fast.config import apply_overrides, dumps
from olmoearth_fast.trainer import (
    Trainer,
    build_loader,
    build_model,
    check_dataset_modalities,
    plot_history,
)


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="olmoearth_fast.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", nargs="?", default=None, help="exp1 … exp17 or a reference key")
    ap.add_argument("--demo", action="store_true", help="nano model, demo dataset, a few minutes on CPU")
    ap.add_argument("--dry-run", action="store_true", help="print the resolved config as JSON and exit")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    ap.add_argument("--export", metavar="DIR", help="write the run's latest checkpoint in the reference layout "
                    "(config.json + weights.pth for olmoearth_pretrain.model_loader) to DIR and exit")
    args, rest = ap.parse_known_args(argv)
    if args.experiment is not None and "=" in args.experiment:  # `--demo a.b=c`: an override, not a name
        rest.insert(0, args.experiment)
        args.experiment = None
    if args.experiment is None and not args.demo:
        ap.error("name an experiment (exp1 … exp14) or pass --demo")
    cfg = experiments.get(args.experiment or "exp14")
    if args.demo:
        cfg = experiments.demo(cfg)
    cfg = apply_overrides(cfg, rest)
    if args.resume:
        cfg.checkpoint.resume = True
    return cfg, args


def main(argv=None) -> None:
    cfg, args = parse(argv)
    if args.dry_run:
        print(dumps(cfg))
        return
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if cfg.trainer.device == "auto":
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    else:
        device = torch.device(cfg.trainer.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    log = print if rank == 0 else (lambda *a, **k: None)
    run_dir = cfg.checkpoint.dir.format(run_name=cfg.logging.run_name or cfg.name)
    if args.export:
        model = build_model(cfg, torch.device("cpu"))
        model.load_state_dict(ckpt.load_checkpoint(run_dir)["model"], strict=True)
        ckpt.export_reference(model, cfg, args.export)
        log(f"exported {run_dir} to {args.export}")
        return

    loader = build_loader(cfg, rank, world_size, run_dir, pin_memory=device.type == "cuda")
    check_dataset_modalities(loader.dataset, cfg.model.modalities)
    model = build_model(cfg, device)
    trainer = Trainer(cfg, loader, model, device, run_dir, rank, world_size, log)
    if cfg.checkpoint.resume and ckpt.checkpoints(run_dir):
        trainer.load_state_dict(ckpt.load_checkpoint(run_dir))
        log(f"resumed from step {trainer.step} ({run_dir})")
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"{cfg.name}: {cfg.model.size} ({n_params / 1e6:.2f}M trainable), {len(loader.dataset)} samples, "
        f"global batch {cfg.data.global_batch_size} on {world_size} rank(s), {device}, {trainer.max_steps} steps")
    try:
        history = trainer.fit()
    except torch.OutOfMemoryError as e:
        raise SystemExit(f"out of GPU memory ({e}); lower the microbatch, e.g. data.rank_microbatch_size="
                         f"{max(1, cfg.data.rank_microbatch_size // 2)}") from None
    if rank == 0 and cfg.logging.plot and history:
        log(f"loss curve: {plot_history(history, run_dir)}")
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
