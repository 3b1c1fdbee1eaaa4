"""Frozen-encoder embeddings for evaluation: model loading and mean-pooled token embeddings.

As the reference's eval path (`evals/eval_wrapper.py`, `evals/embeddings.py`): the online
encoder in eval mode under no_grad, bf16 autocast on CUDA, patch size 4, and the embedding of
a sample is the mean of all its output tokens (after the encoder's final LayerNorm; no
projection) over space, time, bandsets and modalities.

Token roles. Eval datasets (EuroSAT) hand every token to the encoder (the reference's
"fast pass": masks all ONLINE_ENCODER); pretraining H5 samples mark a token MISSING where a band
of its bandset is missing at the token's pixel and leave it out, as the reference's
`PretrainSubsetDataset._missing_aware_masked_sample` does (`missing="mask"`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from olmoearth_fast.config import RunConfig, from_dict
from olmoearth_fast.model.encoder import mean_pool
from olmoearth_fast.model.latent_mim import LatentMIM

EVAL_PATCH_SIZE = 4
PRECISIONS = ("auto", "bf16", "fp32")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Resolve "auto" to cuda when available, else cpu."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def use_autocast(precision: str, device: torch.device) -> bool:
    """bf16 autocast? "auto": on CUDA only (the reference autocasts; CPU bf16 is slow here)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def config_from_saved(saved: dict) -> RunConfig:
    """The run config of a checkpoint, tolerating keys this version no longer has.

    Evaluation only needs the model (``model.*``, ``data.tokenization``, ``trainer.init_seed``):
    other unknown keys (say, a removed trainer option) are dropped with a warning; an unknown
    ``model.*`` key is an error, since the model could not be rebuilt as trained.
    """
    import warnings

    from olmoearth_fast.config import to_dict

    known = to_dict(RunConfig())
    clean, dropped = {}, []
    for section, value in saved.items():
        if section not in known:
            dropped.append(section)
        elif isinstance(value, dict) and isinstance(known[section], dict):
            clean[section] = {k: v for k, v in value.items() if k in known[section]}
            dropped += [f"{section}.{k}" for k in value if k not in known[section]]
        else:
            clean[section] = value
    bad = [k for k in dropped if k == "model" or k.startswith("model.")]
    if bad:
        raise KeyError(
            f"saved config has model keys {bad} unknown to this olmoearth_fast version; "
            f"the model cannot be rebuilt as it was trained"
        )
    if dropped:
        warnings.warn(
            f"ignoring saved config keys unknown to this version: {dropped}", stacklevel=2
        )
    return from_dict(clean)


def load_model(
    checkpoint: str | os.PathLike, device: str | torch.device = "auto", random_init: bool = False
) -> tuple[LatentMIM, RunConfig]:
    """Rebuild the model of a checkpoint in eval mode.

    Args:
        checkpoint: a resume checkpoint (``step_*.pt``), a run directory (its latest checkpoint),
            or a reference-format export directory (``config.json`` + ``weights.pth``).
        device: "auto", "cpu", "cuda", …
        random_init: keep the freshly initialised weights (same config and init seed): the
            random-encoder baseline.

    Raises:
        FileNotFoundError: nothing loadable at ``checkpoint``.
    """
    from olmoearth_fast import checkpoint as ckpt
    from olmoearth_fast.model.latent_mim import build_model

    path = os.fspath(checkpoint)
    device = resolve_device(device)
    export = (
        os.path.isdir(path)
        and os.path.isfile(os.path.join(path, "config.json"))
        and os.path.isfile(os.path.join(path, "weights.pth"))
    )
    if export:
        with open(os.path.join(path, "config.json")) as f:
            saved = json.load(f)
        if "olmoearth_fast" in saved:  # our run config rides along the reference model config
            saved = saved["olmoearth_fast"]
        elif "model" in saved and "trainer" not in saved:
            raise ValueError(
                f"{path}/config.json is a reference model config without an olmoearth_fast "
                f"run config; expected an export written by olmoearth_fast.checkpoint."
                f"export_reference"
            )
        cfg = config_from_saved(saved)
        model = build_model(cfg, device)
        if not random_init:
            ckpt.import_reference_state_dict(
                model,
                torch.load(
                    os.path.join(path, "weights.pth"), map_location=device, weights_only=True
                ),
            )
    else:
        if os.path.isdir(path) and not ckpt.checkpoints(path):
            raise FileNotFoundError(
                f"--checkpoint {path}: expected a checkpoint file (step_*.pt), a run "
                f"directory holding one, or an export directory (config.json + weights.pth)"
            )
        state = ckpt.load_checkpoint(path)
        cfg = config_from_saved(json.loads(state["config"]))
        model = build_model(cfg, device)
        if not random_init:
            model.load_state_dict(state["model"], strict=True)
    return model.eval(), cfg


@torch.no_grad()
def embed_batch(
    model: LatentMIM,
    data: dict[str, Tensor],
    timestamps: Tensor,
    patch_size: int = EVAL_PATCH_SIZE,
    missing: str = "online",
    autocast: bool = False,
) -> Tensor:
    """[B, D] float32 mean of every sample's encoder output tokens.

    Args:
        data: {modality: [B, H, W, T, C_all] | [B, T, C_all]} normalised, on the model's device.
        timestamps: [B, T, 3] long.
        missing: "online" (every token encoded, the reference's fast pass) or "mask" (tokens
            with a missing band at their pixel are left out).
    """
    if missing not in ("online", "mask"):
        raise ValueError(f"missing must be 'online' or 'mask', got {missing!r}")
    was_training = model.training
    model.eval()
    try:
        masks = None
        if missing == "online":
            n = model.layout(data, patch_size).seqlen
            masks = torch.zeros(timestamps.shape[0], n, dtype=torch.long, device=timestamps.device)
        with torch.autocast(
            device_type=timestamps.device.type, dtype=torch.bfloat16, enabled=autocast
        ):
            tokens, _ = model.encode(data, timestamps, patch_size, masks=masks)
            pooled = mean_pool(tokens)
        return pooled.float()
    finally:
        model.train(was_training)


def s2_batch(
    images: np.ndarray, device: torch.device, timestamp: tuple[int, int, int]
) -> tuple[dict[str, Tensor], Tensor]:
    """Single-date S2 L2A images [B, H, W, 12] -> model input (T = 1)."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(device)
    ts = torch.tensor(timestamp, dtype=torch.long, device=device).expand(x.shape[0], 1, 3)
    return {"sentinel2_l2a": x[:, :, :, None, :]}, ts


def embed_images(
    model: LatentMIM,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    patch_size: int = EVAL_PATCH_SIZE,
    precision: str = "auto",
    timestamp: tuple[int, int, int] = (1, 6, 2020),
) -> tuple[Tensor, Tensor]:
    """Embed (images [B, H, W, 12], labels [B]) batches of single-date S2 images.

    Returns:
        (embeddings [N, D] float32 on CPU, labels [N] int64).
    """
    if "sentinel2_l2a" not in model.cfg.modalities:
        raise ValueError(
            f"the model has no sentinel2_l2a input (modalities {model.cfg.modalities})"
        )
    device = next(model.parameters()).device
    autocast = use_autocast(precision, device)
    embs, labels = [], []
    for images, y in batches:
        data, ts = s2_batch(images, device, timestamp)
        embs.append(embed_batch(model, data, ts, patch_size, "online", autocast).cpu())
        labels.append(torch.as_tensor(y, dtype=torch.long))
    if not embs:
        raise ValueError("no samples to embed")
    return torch.cat(embs), torch.cat(labels)


def chunks(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(start + size, n))
