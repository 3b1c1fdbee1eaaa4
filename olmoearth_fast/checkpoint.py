"""Checkpoints: reference-format weight import/export.

Parameter names follow the reference's Feb layout (Conv2d patch embeddings), so the mapping is
a prefix rename:

    ours                                   reference (olmoearth_pretrain LatentMIM)
    patch_embeddings.<k>                   encoder.patch_embeddings.<k>
    encoder.<k>                            encoder.<k>
    decoder.<k>                            decoder.<k>
    target_patch_embeddings.<k>            target_encoder.patch_embeddings.<k>

The reference's target encoder also holds a full copy of the encoder's transformer, encodings
and norms; with token_exit_cfg all 0 they never run, so import skips them and export fills
them with the online encoder's weights (the reference loads them strictly, never uses them).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

_PREFIXES = (  # (ours, reference), most specific first
    ("target_patch_embeddings.", "target_encoder.patch_embeddings."),
    ("patch_embeddings.", "encoder.patch_embeddings."),
    ("encoder.", "encoder."),
    ("decoder.", "decoder."),
)
_UNUSED_REFERENCE_PREFIX = "target_encoder."


def _to_reference_key(key: str) -> str:
    for ours, ref in _PREFIXES:
        if key.startswith(ours):
            return ref + key[len(ours):]
    raise KeyError(f"no reference name for parameter {key!r}")


def _from_reference_key(key: str) -> str | None:
    for ours, ref in _PREFIXES:
        if key.startswith(ref):
            return ours + key[len(ref):]
    return None


def import_reference_state_dict(model: nn.Module, ref_state: Mapping[str, Tensor]) -> None:
    """Load a reference LatentMIM state_dict (Feb layout) into ``model``, strictly.

    Every parameter of ``model`` must be found, and every reference key must map to one,
    except the unused part of the reference's target encoder. Shapes must match.
    """
    ours = model.state_dict()
    new_state, unexpected = {}, []
    for key, value in ref_state.items():
        mapped = _from_reference_key(key)
        if mapped is None:
            if not key.startswith(_UNUSED_REFERENCE_PREFIX):
                unexpected.append(key)
            continue
        if mapped not in ours:
            unexpected.append(key)
            continue
        if ours[mapped].shape != value.shape:
            raise ValueError(f"shape mismatch for {key!r} -> {mapped!r}: reference {tuple(value.shape)}, "
                             f"model {tuple(ours[mapped].shape)}")
        new_state[mapped] = value
    missing = sorted(set(ours) - set(new_state))
    if unexpected or missing:
        raise KeyError("reference state_dict does not match this model: "
                       + (f"unexpected reference keys {unexpected[:10]}" if unexpected else "")
                       + ("; " if unexpected and missing else "")
                       + (f"missing model keys {missing[:10]}" if missing else "")
                       + " (is the reference model configured Feb-style, use_linear_patch_embed=False, "
                       "with the same modalities, tokenization and size?)")
    model.load_state_dict(new_state, strict=True)


def export_reference_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s weights under the reference's LatentMIM names, target encoder included."""
    state = {_to_reference_key(k): v.detach().clone() for k, v in model.state_dict().items()}
    for key in list(state):
        if key.startswith("encoder.") and not key.startswith("encoder.patch_embeddings.") \
                and not key.startswith("encoder.bandset_merge."):
            state["target_encoder." + key[len("encoder."):]] = state[key].clone()
    return state


def checkpoint_tensors_equal(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> list[str]:
    """Keys whose tensors differ (or exist on one side only); empty when identical."""
    keys = set(a) | set(b)
    return sorted(k for k in keys if k not in a or k not in b or not torch.equal(a[k], b[k]))


# ---------------------------------------------------------------------------------------------
# Resume checkpoints: written atomically (temporary file, fsync, rename), so a crash or a kill
# during a save leaves the previous checkpoint intact.

_CKPT_PREFIX = "step_"


def rng_state() -> dict:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj, path: str) -> None:
    import os
    import tempfile

    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints in ``run_dir``, oldest first."""
    import os

    if not os.path.isdir(run_dir):
        return []
    out = []
    for name in os.listdir(run_dir):
        if name.startswith(_CKPT_PREFIX) and name.endswith(".pt") and name[len(_CKPT_PREFIX):-3].isdigit():
            out.append((int(name[len(_CKPT_PREFIX):-3]), os.path.join(run_dir, name)))
    return sorted(out)


def save_checkpoint(state: dict, run_dir: str, step: int, keep_last: int = 2) -> str:
    import os

    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, f"{_CKPT_PREFIX}{step:08d}.pt")
    _atomic_save(state, path)
    for _, old in checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        os.unlink(old)
    return path


def load_checkpoint(path_or_dir: str) -> dict:
    """A checkpoint file, or the latest complete one in a run directory."""
    import os

    path = path_or_dir
    if os.path.isdir(path_or_dir):
        found = checkpoints(path_or_dir)
        if not found:
            raise FileNotFoundError(f"no checkpoint (step_*.pt) in {path_or_dir}")
        path = found[-1][1]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def reference_model_config(cfg) -> dict:
    """The reference's olmo-core config dict (``config.json["model"]``) of ``cfg.model``.

    It names the reference's classes (``_CLASS_``) and the fields that differ from their
    defaults, Feb-style (Conv2d patch embeddings), so `olmoearth_pretrain.model_loader` builds
    the same architecture. Bandset merging has no counterpart in the released reference.
    """
    from olmoearth_fast.model.latent_mim import MODEL_SIZES
    from olmoearth_fast.modalities import as_tokenization

    m = cfg.model
    if m.merge_bandsets:
        raise ValueError("bandset-merge models (exps 9, 10, 12) cannot be exported: the reference package has "
                         "no BandsetMerge (it was removed on 2026-02-20)")
    d, depth, heads, dd, ddepth, dheads, mlp = m.dims or MODEL_SIZES[m.size]
    tok = as_tokenization(cfg.data.tokenization)
    tok_cfg = {"overrides": {name: {"band_groups": [list(g) for g in tok.band_groups(name)],
                                    "_CLASS_": "olmoearth_pretrain.nn.tokenization.ModalityTokenization"}
                             for name in m.modalities},
               "_CLASS_": "olmoearth_pretrain.nn.tokenization.TokenizationConfig"}
    mods = list(m.modalities)
    encoder = {"supported_modality_names": mods, "embedding_size": d, "max_patch_size": 8, "num_heads": heads,
               "mlp_ratio": mlp, "depth": depth, "drop_path": m.drop_path, "max_sequence_length": 12,
               "use_linear_patch_embed": False, "tokenization_config": tok_cfg,
               "band_dropout_rate": m.band_dropout_rate, "random_band_dropout": m.random_band_dropout,
               "_CLASS_": "olmoearth_pretrain.nn.flexi_vit.EncoderConfig"}
    decoder = {"supported_modality_names": mods, "encoder_embedding_size": d, "decoder_embedding_size": dd,
               "depth": ddepth, "mlp_ratio": mlp, "num_heads": dheads, "max_sequence_length": 12,
               "drop_path": m.decoder_drop_path, "tokenization_config": tok_cfg,
               "_CLASS_": "olmoearth_pretrain.nn.flexi_vit.PredictorConfig"}
    return {"encoder_config": encoder, "decoder_config": decoder,
            "_CLASS_": "olmoearth_pretrain.nn.latent_mim.LatentMIMConfig"}


def export_reference(model: nn.Module, cfg, out_dir: str) -> None:
    """Write ``config.json`` and ``weights.pth`` that `olmoearth_pretrain.model_loader.
    load_model_from_path(out_dir)` loads; our run config rides along under "olmoearth_fast"."""
    import json
    import os

    from olmoearth_fast.config import to_dict

    config = {"model": reference_model_config(cfg), "olmoearth_fast": to_dict(cfg)}
    os.makedirs(out_dir, exist_ok=True)
    _atomic_save(export_reference_state_dict(model), os.path.join(out_dir, "weights.pth"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


# ---------------------------------------------------------------------------------------------
# wandb: imported lazily, offline unless an API key is set, never required; the run id is kept
# in the run directory so a resumed run continues the same wandb run.


def start_wandb(cfg, run_dir: str):
    import json
    import os

    if not cfg.logging.wandb:
        return None
    try:
        import wandb
    except ImportError:
        print("wandb is not installed: logging to the console only (logging.wandb=false silences this)")
        return None
    os.makedirs(run_dir, exist_ok=True)
    id_file = os.path.join(run_dir, "wandb_id.txt")
    run_id = open(id_file).read().strip() if os.path.exists(id_file) else wandb.util.generate_id()
    with open(id_file, "w") as f:
        f.write(run_id)
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    from olmoearth_fast.config import to_dict

    return wandb.init(project=cfg.logging.project, entity=cfg.logging.entity, name=cfg.logging.run_name or cfg.name,
                      id=run_id, resume="allow", mode=mode, dir=run_dir, config=json.loads(json.dumps(to_dict(cfg))))
