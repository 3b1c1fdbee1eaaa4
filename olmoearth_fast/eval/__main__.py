"""`python -m olmoearth_fast.eval knn|linprobe|embed --checkpoint CKPT --dataset PATH [...]`.

    knn       EuroSAT kNN accuracy (k 20, cosine, exp(sim/0.07) votes, patch 4, mean pooling)
    linprobe  EuroSAT linear probe accuracy (BatchNorm + Linear, 50 epochs, lr sweep optional)
    embed     mean-pooled embeddings of an OlmoEarth H5 dataset -> .npy or .parquet

CKPT is a checkpoint file, a run directory (latest checkpoint), an export directory, or a
checkpoint directory of the reference (config.json + weights.pth, as olmoearth_pretrain's
model_loader reads them; Linear or Conv2d patch embeddings, February-2026 pos_embed tables and
the merge modules of exps 9, 10, 12 are all taken). EuroSAT is either GEO-Bench m-eurosat or torchgeo EuroSATallBands
(detected; --layout forces one). Results go to stdout as JSON (and --json FILE).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from olmoearth_fast.errors import UserError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint file, run directory or export directory"
    )
    p.add_argument("--dataset", required=True, help="dataset path")
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128, help="embedding batch size")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "bf16", "fp32"),
        help="encoder autocast: auto = bf16 on CUDA, fp32 on CPU",
    )
    p.add_argument(
        "--random-init", action="store_true", help="the checkpoint's config with fresh weights"
    )
    p.add_argument("--json", default=None, help="also write the results to this file")


def _eurosat(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", default="auto", choices=("auto", "geobench", "torchgeo"))
    p.add_argument(
        "--partition", default="default", help="GEO-Bench partition (default, 0.01x_train, ...)"
    )
    p.add_argument(
        "--norm",
        default="pretrain",
        choices=("pretrain", "dataset"),
        help="pretraining statistics (reference default) or GEO-Bench band_stats.json",
    )
    p.add_argument("--max-samples", type=int, default=None, help="evenly spaced samples per split")


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m olmoearth_fast.eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", required=True)
    knn = sub.add_parser("knn", help="EuroSAT kNN accuracy")
    _common(knn)
    _eurosat(knn)
    knn.add_argument("--k", type=int, default=20)
    lp = sub.add_parser("linprobe", help="EuroSAT linear-probe accuracy")
    _common(lp)
    _eurosat(lp)
    lp.add_argument(
        "--lr",
        default="0.01",
        help="probe lr, or a comma list (best on valid is reported); "
        "'sweep' = the reference's 8 lrs",
    )
    lp.add_argument("--epochs", type=int, default=50)
    lp.add_argument("--probe-batch-size", type=int, default=32)
    lp.add_argument(
        "--probe-precision",
        default="bf16",
        choices=("bf16", "fp32"),
        help="probe autocast (the reference uses bf16)",
    )
    lp.add_argument("--seed", type=int, default=0)
    emb = sub.add_parser("embed", help="embeddings of an OlmoEarth H5 dataset")
    _common(emb)
    emb.set_defaults(batch_size=32)
    emb.add_argument("--out", required=True, help="output .npy or .parquet")
    emb.add_argument("--hw-p", type=int, default=8, help="tokens per crop side; 0 = whole tile")
    emb.add_argument("--modalities", default=None, help="comma list (default: the model's)")
    emb.add_argument("--max-samples", type=int, default=None)
    emb.add_argument("--seed", type=int, default=42)
    return ap.parse_args(argv)


def _lrs(text: str) -> list[float]:
    from olmoearth_fast.eval.linprobe import SWEEP_LRS

    if text == "sweep":
        return list(SWEEP_LRS)
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(
            f"--lr: expected a number, a comma list of numbers or 'sweep', got {text!r}"
        ) from None


def _load(path: str, device: str, random_init: bool):
    """A checkpoint of ours (`load_model`) or a reference checkpoint directory, in eval mode."""
    from olmoearth_fast.checkpoint import load_reference
    from olmoearth_fast.eval.embeddings import load_model, resolve_device

    config = os.path.join(path, "config.json")
    if os.path.isfile(config) and os.path.isfile(os.path.join(path, "weights.pth")):
        with open(config) as f:
            saved = json.load(f)
        if "olmoearth_fast" not in saved and "model" in saved:  # the reference's own, not our export
            return load_reference(path, resolve_device(device), random_init)
    return load_model(path, device, random_init)


def run(args: argparse.Namespace) -> dict:
    from olmoearth_fast.eval.datasets import load_eurosat
    from olmoearth_fast.eval.embeddings import embed_images

    t0 = time.perf_counter()
    ds = None
    if args.command != "embed":  # a bad dataset path fails before the model is loaded
        ds = load_eurosat(args.dataset, args.layout, partition=args.partition, norm=args.norm)
    elif not os.path.isdir(args.dataset):
        raise FileNotFoundError(
            f"--dataset {args.dataset}: expected a directory of OlmoEarth H5 samples (sample_*.h5)"
        )
    model, cfg = _load(args.checkpoint, args.device, args.random_init)
    out = {
        "command": args.command,
        "checkpoint": args.checkpoint,
        "dataset": args.dataset,
        "random_init": args.random_init,
        "model": cfg.model.size,
        "patch_size": args.patch_size,
    }
    if args.command == "embed":
        from olmoearth_fast.eval.embed import embed_h5_dataset, save_embeddings

        mods = args.modalities.split(",") if args.modalities else None
        emb, index = embed_h5_dataset(
            model,
            args.dataset,
            args.patch_size,
            args.hw_p or None,
            args.batch_size,
            mods,
            args.max_samples,
            args.seed,
            args.precision,
        )
        out.update(
            files=[str(p) for p in save_embeddings(args.out, emb, index)],
            num_samples=len(index),
            dim=emb.shape[1],
        )
    else:
        out.update(layout=ds.layout, num_classes=ds.num_classes, norm=args.norm)

        def embed(split: str):
            sp = ds.split(split)
            sp = sp.subset(args.max_samples) if args.max_samples else sp
            return embed_images(model, sp.batches(args.batch_size), args.patch_size, args.precision)

        train = embed("train")
        evals = {s: embed(s) for s in ("valid", "test")}
        out["num_samples"] = {"train": len(train[1]), **{s: len(y) for s, (_, y) in evals.items()}}
        if args.command == "knn":
            from olmoearth_fast.eval.knn import knn_accuracy

            out["k"] = args.k
            for s, (e, y) in evals.items():
                out[f"{s}_acc"] = knn_accuracy(*train, e, y, ds.num_classes, args.k)
        else:
            from olmoearth_fast.eval.linprobe import evaluate_linear_probe

            torch.manual_seed(args.seed)
            res = evaluate_linear_probe(
                train,
                evals,
                ds.num_classes,
                _lrs(args.lr),
                args.epochs,
                args.probe_batch_size,
                next(model.parameters()).device,
                args.probe_precision == "bf16",
            )
            out.update(
                best_lr=res["best_lr"],
                valid_acc=res["valid"],
                test_acc=res["test"],
                per_lr={str(k): v for k, v in res["per_lr"].items()},
            )
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def main(argv=None) -> None:
    args = parse(argv)
    try:
        out = run(args)
    except (UserError, FileNotFoundError, ValueError, KeyError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
