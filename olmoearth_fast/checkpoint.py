"""Checkpoints: resume checkpoints, reference-format weight import/export.

Parameter names follow the reference's February 2026 layout, so the mapping is a prefix rename:

    ours                                   reference (olmoearth_pretrain LatentMIM)
    patch_embeddings.<k>                   encoder.patch_embeddings.<k>
    encoder.bandset_merge.<m>.<k>          encoder.bandset_merge_modules.<m>.<k>      (exps 9, 10, 12)
    decoder.bandset_unmerge.<m>.<k>        decoder.bandset_unmerge_modules.<m>.<k>    (exps 9, 10, 12)
    encoder.<k>                            encoder.<k>
    decoder.<k>                            decoder.<k>
    target_patch_embeddings.<k>            target_encoder.patch_embeddings.<k>

The reference's target encoder also holds a full copy of the encoder's transformer, encodings
and norms (and merge modules); with token_exit_cfg all 0 they never run, so import skips them
and export fills them with the online encoder's weights (the reference loads them strictly,
never uses them).

Import also takes the two other layouts reference checkpoints come in:

* the Linear patch embedding (olmoearth-pretrain 0.1.2's default, `use_linear_patch_embed`):
  a (D, p·p·C) matrix over patches flattened row, column, channel, reshaped to the Conv2d's
  (D, C, p, p); the two compute the same projection;
* February-2026 checkpoints store the fixed sinusoidal time-position table as
  `encoder.composite_encodings.pos_embed` and `decoder.composite_encodings.pos_embed`
  ([max_sequence_length, D/4]); this model computes the table on the fly, so the stored one is
  checked against it (a different table would change the model's outputs) and dropped.

Anything else that does not match is an error naming the keys.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from olmoearth_fast.errors import UserFileNotFoundError, UserKeyError, UserValueError

_PREFIXES = (  # (ours, reference), most specific first
    ("target_patch_embeddings.", "target_encoder.patch_embeddings."),
    ("patch_embeddings.", "encoder.patch_embeddings."),
    ("encoder.bandset_merge.", "encoder.bandset_merge_modules."),
    ("decoder.bandset_unmerge.", "decoder.bandset_unmerge_modules."),
    ("encoder.", "encoder."),
    ("decoder.", "decoder."),
)
_UNUSED_REFERENCE_PREFIX = "target_encoder."
_POS_EMBED_KEYS = ("encoder.composite_encodings.pos_embed", "decoder.composite_encodings.pos_embed")


def _to_reference_key(key: str) -> str:
    for ours, ref in _PREFIXES:
        if key.startswith(ours):
            return ref + key[len(ours):]
    raise KeyError(f"no reference name for parameter {key!r}")


def _from_reference_key(key: str) -> str | None:
    for ours, ref in _PREFIXES:
        if key.startswith(ref):
            mapped = ours + key[len(ref):]
            # strict: only the reference's own name maps (our `encoder.bandset_merge.*` does not)
            return mapped if _to_reference_key(mapped) == key else None
    return None


def _linear_to_conv(weight: Tensor, conv_shape: torch.Size) -> Tensor | None:
    """A Linear patch-embedding weight (D, p·p·C) as the Conv2d's (D, C, p, p), else None.

    The Linear's input is a patch flattened as (row, column, channel), channel fastest, so the
    matrix unflattens to (D, p, p, C) and moves the channel axis in front of the pixels.
    """
    d, c, ph, pw = conv_shape
    if weight.dim() != 2 or tuple(weight.shape) != (d, ph * pw * c):
        return None
    return weight.reshape(d, ph, pw, c).permute(0, 3, 1, 2).contiguous()


def _check_pos_embed(key: str, table: Tensor, model: nn.Module) -> None:
    """A February-2026 time-position table must equal the one this model computes."""
    from olmoearth_fast.model.encodings import sincos_1d

    module = model.encoder if key.startswith("encoder.") else model.decoder
    n = module.composite_encodings.n
    expected = sincos_1d(torch.arange(table.shape[0]), n) if table.dim() == 2 else None
    if expected is None or table.shape != expected.shape:
        raise UserValueError(f"{key} has shape {tuple(table.shape)}, not the [max_sequence_length, {n}] "
                             f"time-position table of this model: is the checkpoint of the same model size?")
    err = float((table.float() - expected).abs().max())
    if err > 1e-4:
        raise UserValueError(f"{key} differs from the sinusoidal time-position table this model computes (max "
                             f"difference {err:.2e}): the checkpoint used other time encodings and cannot be "
                             f"imported")


def import_reference_state_dict(model: nn.Module, ref_state: Mapping[str, Tensor]) -> list[str]:
    """Load a reference LatentMIM state_dict into ``model``, strictly; returns what was converted.

    Every parameter of ``model`` must be found, and every reference key must map to one,
    except the unused part of the reference's target encoder. Shapes must match, after the
    layout conversions of the module docstring (Linear patch embeddings, pos_embed tables).

    Raises:
        UserKeyError: missing or unexpected keys (named).
        UserValueError: a shape mismatch, or a pos_embed table this model would not compute.
    """
    ours = model.state_dict()
    new_state, unexpected, notes = {}, [], {"linear": 0, "pos_embed": 0}
    for key, value in ref_state.items():
        if key in _POS_EMBED_KEYS:
            _check_pos_embed(key, value, model)
            notes["pos_embed"] += 1
            continue
        mapped = _from_reference_key(key)
        if mapped is None:
            if not key.startswith(_UNUSED_REFERENCE_PREFIX):
                unexpected.append(key)
            continue
        if mapped not in ours:
            unexpected.append(key)
            continue
        want = ours[mapped].shape
        if value.shape != want and len(want) == 4 and mapped.endswith(".proj.weight"):
            conv = _linear_to_conv(value, want)
            if conv is not None:
                value = conv
                notes["linear"] += 1
        if value.shape != want:
            raise UserValueError(f"shape mismatch for {key!r} -> {mapped!r}: reference {tuple(value.shape)}, "
                                 f"model {tuple(want)} (same model size, modalities and tokenization?)")
        new_state[mapped] = value
    missing = sorted(set(ours) - set(new_state))
    if unexpected or missing:
        raise UserKeyError("reference state_dict does not match this model: "
                           + (f"unexpected reference keys {unexpected[:10]}" if unexpected else "")
                           + ("; " if unexpected and missing else "")
                           + (f"missing model keys {missing[:10]}" if missing else "")
                           + " (is it a LatentMIM with the same modalities, tokenization, size and bandset "
                           "merging as this model?)")
    model.load_state_dict(new_state, strict=True)
    out = []
    if notes["linear"]:
        out.append(f"{notes['linear']} Linear patch embeddings reshaped to Conv2d")
    if notes["pos_embed"]:
        out.append(f"{notes['pos_embed']} pos_embed tables checked and dropped")
    return out


def export_reference_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s weights under the reference's LatentMIM names, target encoder included."""
    state = {_to_reference_key(k): v.detach().clone() for k, v in model.state_dict().items()}
    for key in list(state):
        if key.startswith("encoder.") and not key.startswith("encoder.patch_embeddings."):
            # the target encoder's copy of everything but its own (frozen) patch embeddings,
            # merge modules included as in the reference's February layout
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
    if not os.path.isdir(run_dir):
        return []
    out = []
    for name in os.listdir(run_dir):
        if name.startswith(_CKPT_PREFIX) and name.endswith(".pt") and name[len(_CKPT_PREFIX):-3].isdigit():
            out.append((int(name[len(_CKPT_PREFIX):-3]), os.path.join(run_dir, name)))
    return sorted(out)


def save_checkpoint(state: dict, run_dir: str, step: int, keep_last: int = 2) -> str:
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, f"{_CKPT_PREFIX}{step:08d}.pt")
    _atomic_save(state, path)
    for _, old in checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        os.unlink(old)
    return path


def latest_checkpoint(run_dir: str) -> str:
    """Path of the latest complete checkpoint of ``run_dir``."""
    found = checkpoints(run_dir)
    if not found:
        raise UserFileNotFoundError(f"no checkpoint (step_*.pt) in {run_dir}: train the run first, or name its "
                                    f"directory with checkpoint.dir / logging.run_name")
    return found[-1][1]


def load_checkpoint(path_or_dir: str) -> dict:
    """A checkpoint file, or the latest complete one in a run directory.

    Raises:
        UserFileNotFoundError: no checkpoint there.
        UserValueError: the file cannot be read (corrupt or truncated, or not a torch file).
    """
    path = latest_checkpoint(path_or_dir) if os.path.isdir(path_or_dir) else path_or_dir
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # zip, pickle, EOF or I/O errors: whatever torch.load meets in a bad file
        reason = (str(e).strip().splitlines() or [""])[0][:120]
        raise UserValueError(f"{path} cannot be read ({type(e).__name__}: {reason}): the file is corrupt or "
                             f"truncated; delete it to use an older checkpoint, or start a new run") from None


# what must agree between a checkpoint and the run that resumes it: the architecture and what
# the weights mean, and the global batch (the loader's cursor counts global batches)
_RESUME_KEYS = ("model.size", "model.dims", "model.modalities", "model.merge_bandsets", "model.merge_after_layer",
                "data.tokenization", "data.global_batch_size")


def resume_state(run_dir: str, cfg, model: nn.Module) -> dict | None:
    """The latest checkpoint of ``run_dir``, checked against this run; None when there is none.

    Raises:
        UserValueError: the checkpoint is unreadable, not a training checkpoint, or from a run
            whose model or global batch differ (the message lists the settings).
    """
    from olmoearth_fast.config import to_dict

    found = checkpoints(run_dir)
    if not found:
        return None
    step, path = found[-1]
    try:
        state = load_checkpoint(path)
    except UserValueError as e:
        older = f" (the previous one is step {found[-2][0]})" if len(found) > 1 else ""
        raise UserValueError(f"--resume: {e}{older}") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "step", "loader", "config"} <= set(state):
        raise UserValueError(f"--resume: {path} is not an olmoearth_fast training checkpoint; move it out of "
                             f"{run_dir} or set checkpoint.dir to a new directory")
    saved, now = json.loads(state["config"]), to_dict(cfg)
    diffs = []
    for key in _RESUME_KEYS:
        section, name = key.split(".")
        if name in saved.get(section, {}) and saved[section][name] != now[section][name]:
            diffs.append((key, saved[section][name], now[section][name]))
    if not diffs:
        ours = model.state_dict()
        theirs = state["model"]
        bad = sorted(set(ours) ^ set(theirs)) or [k for k in ours if ours[k].shape != theirs[k].shape]
        if bad:
            diffs.append(("model weights", f"{len(theirs)} tensors", f"{len(ours)}, differing at {bad[:3]}"))
    if diffs:
        was = ", ".join(f"{k}={a!r}" for k, a, _ in diffs)
        has = ", ".join(f"{k}={b!r}" for k, _, b in diffs)
        raise UserValueError(f"--resume: {path} was written by another setup ({was}); this run has {has}: resume "
                             f"with the run's settings, or set checkpoint.dir to a new directory")
    return state


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
        raise UserValueError("bandset-merge models (exps 9, 10, 12) cannot be exported: the reference package "
                             "has no BandsetMerge (it was removed on 2026-02-20)")
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
    from olmoearth_fast.config import to_dict

    config = {"model": reference_model_config(cfg), "olmoearth_fast": to_dict(cfg)}
    os.makedirs(out_dir, exist_ok=True)
    _atomic_save(export_reference_state_dict(model), os.path.join(out_dir, "weights.pth"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


# ---------------------------------------------------------------------------------------------
# Reference checkpoints as users hold them: a directory with config.json (the olmo-core run
# config, whose "model" entry is a LatentMIMConfig) and weights.pth (a LatentMIM state_dict), as
# `olmoearth_pretrain.model_loader` reads them; also an export of ours, or a bare state_dict.

# reference encoder/decoder options this model does not implement, with the value it computes
_UNSUPPORTED = {"num_register_tokens": 0, "qk_norm": False, "num_projection_layers": 1,
                "aggregate_then_project": True, "max_patch_size": 8, "patch_embed_hidden_sizes": None,
                "post_proj_hidden_sizes": None, "position_encoding": "absolute", "spatial_pos_encoding": None}


def reference_run_config(model_config: Mapping):
    """Our `RunConfig` for a reference ``config.json["model"]`` (a LatentMIMConfig dict).

    Raises:
        UserValueError: a model this package cannot build (another class, register tokens,
            QK-norm, RoPE, ...); the message names the option.
    """
    from olmoearth_fast.config import RunConfig
    from olmoearth_fast.model.latent_mim import MODEL_SIZES

    cls = str(model_config.get("_CLASS_", "LatentMIMConfig"))
    enc, dec = model_config.get("encoder_config"), model_config.get("decoder_config")
    if not cls.endswith("LatentMIMConfig") or not isinstance(enc, Mapping) or not isinstance(dec, Mapping):
        raise UserValueError(f"the checkpoint's model is a {cls.rsplit('.', 1)[-1]}, not a LatentMIM with "
                             f"encoder_config and decoder_config: it cannot be loaded here")
    for part, conf in (("encoder_config", enc), ("decoder_config", dec)):
        for opt, ours in _UNSUPPORTED.items():
            if conf.get(opt, ours) not in (ours, [] if ours is None else ours):
                raise UserValueError(f"the checkpoint's {part}.{opt}={conf[opt]!r} is not implemented here "
                                     f"(only {ours!r}): this model cannot be loaded")
    if enc.get("mlp_ratio", 1.0) != dec.get("mlp_ratio", 1.0) or \
            dec.get("output_embedding_size") not in (None, enc.get("embedding_size")):
        raise UserValueError("the checkpoint's encoder and decoder differ in mlp_ratio, or its decoder output "
                             "size is not the encoder's: this model cannot be loaded")
    if bool(enc.get("merge_bandsets", False)) != bool(dec.get("unmerge_bandsets", False)):
        raise UserValueError("the checkpoint merges bandsets in the encoder but does not unmerge them in the "
                             "decoder (or the reverse): this model cannot be loaded")
    cfg = RunConfig(name="reference")
    m = cfg.model
    dims = (int(enc.get("embedding_size", 16)), int(enc.get("depth", 2)), int(enc.get("num_heads", 2)),
            int(dec.get("decoder_embedding_size", 16)), int(dec.get("depth", 2)), int(dec.get("num_heads", 2)),
            float(enc.get("mlp_ratio", 1.0)))
    named = [name for name, size in MODEL_SIZES.items() if size == dims]
    m.size, m.dims = (named[0], None) if named else ("custom", dims)  # dims win over the size name
    m.modalities = tuple(enc["supported_modality_names"])
    m.drop_path = float(enc.get("drop_path", 0.1))
    m.decoder_drop_path = float(dec.get("drop_path", 0.0))
    m.band_dropout_rate = float(enc.get("band_dropout_rate", 0.0))
    m.random_band_dropout = bool(enc.get("random_band_dropout", False))
    drop_mods = enc.get("band_dropout_modalities")
    m.band_dropout_modalities = None if drop_mods is None else tuple(drop_mods)
    m.merge_bandsets = bool(enc.get("merge_bandsets", False))
    m.merge_after_layer = int(enc.get("merge_after_layer", -1))
    tok = enc.get("tokenization_config") or {}
    overrides = tok.get("overrides") or {}
    # reference default bandsets unless overridden, as its TokenizationConfig()
    cfg.data.tokenization = {name: [list(g) for g in (v.get("band_groups") if isinstance(v, Mapping) else v)]
                             for name, v in overrides.items()} or "default"
    return cfg


def _architecture(cfg) -> dict:
    """What two configs must share for one's weights to compute the same in the other."""
    from olmoearth_fast.model.latent_mim import MODEL_SIZES
    from olmoearth_fast.modalities import as_tokenization

    m = cfg.model
    tok = as_tokenization(cfg.data.tokenization)
    return {"model dims": tuple(m.dims or MODEL_SIZES[m.size]), "model.modalities": sorted(m.modalities),
            "model.merge_bandsets": m.merge_bandsets,
            "model.merge_after_layer": m.merge_after_layer if m.merge_bandsets else None,
            "bandsets": {name: tok.band_groups(name) for name in m.modalities}}


def _read_weights(path: str) -> tuple[dict, str, Mapping | None]:
    """(state_dict, "ours" | "reference", reference model config or None) of a weights source."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "weights.pth")):
        config = None
        if os.path.isfile(os.path.join(path, "config.json")):
            with open(os.path.join(path, "config.json")) as f:
                config = json.load(f).get("model")
        return _load_tensors(os.path.join(path, "weights.pth")), "reference", config
    if os.path.isdir(path) or os.path.basename(path).startswith(_CKPT_PREFIX):
        state = load_checkpoint(path)  # ours: a run directory or one of its step_*.pt
        if not isinstance(state, dict) or "model" not in state:
            raise UserValueError(f"{path} is not an olmoearth_fast training checkpoint (no 'model' entry)")
        return state["model"], "ours", None
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"{path}: no such file or directory; expected a reference checkpoint directory "
                                    f"(config.json + weights.pth), a weights .pth file, a run directory or a "
                                    f"step_*.pt checkpoint")
    return _load_tensors(path), "reference", None


def _load_tensors(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # as load_checkpoint: a truncated, corrupt or non-torch file
        reason = (str(e).strip().splitlines() or [""])[0][:120]
        raise UserValueError(f"{path} cannot be read as a state_dict ({type(e).__name__}: {reason})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserValueError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return dict(state)


def init_from(model: nn.Module, cfg, path: str) -> str:
    """Load the weights at ``path`` into ``model`` (built from ``cfg``), strictly.

    ``path``: a reference checkpoint directory (config.json + weights.pth, any of the layouts of
    the module docstring; our exports too), a reference weights file, or one of our run
    directories or step_*.pt checkpoints. Returns a one-line description of what was loaded.

    Raises:
        UserError: nothing loadable there, or weights of another architecture (named).
    """
    state, layout, ref_config = _read_weights(path)
    if ref_config is not None:  # settings that change no shape but change what the weights compute
        theirs, ours = _architecture(reference_run_config(ref_config)), _architecture(cfg)
        diffs = [k for k in ours if ours[k] != theirs[k]]
        if diffs:
            raise UserValueError(f"{path} holds another architecture: {', '.join(f'{k} {theirs[k]}' for k in diffs)}"
                                 f"; this run has {', '.join(f'{k} {ours[k]}' for k in diffs)}")
    if layout == "reference":
        notes = import_reference_state_dict(model, state)
    else:
        mine = model.state_dict()
        bad = sorted(set(mine) ^ set(state)) or [k for k in mine if mine[k].shape != state[k].shape]
        if bad:
            raise UserValueError(f"{path} holds weights of another architecture (differing at {bad[:3]}): same "
                                 f"experiment and model.size?")
        model.load_state_dict(state, strict=True)
        notes = []
    return f"weights from {path} ({layout} layout{'; ' + ', '.join(notes) if notes else ''})"


def load_reference(path: str, device: str | torch.device = "cpu", random_init: bool = False):
    """``(model, cfg)`` of a reference checkpoint directory (config.json + weights.pth), eval mode.

    The run config is derived from the reference model config (`reference_run_config`); with
    ``random_init`` the weights stay freshly initialised (the random-encoder baseline).
    """
    from olmoearth_fast.model.latent_mim import build_model

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path) or not os.path.isfile(os.path.join(path, "weights.pth")):
        raise UserFileNotFoundError(f"{path}: expected a reference checkpoint directory with config.json and "
                                    f"weights.pth")
    with open(config_path) as f:
        saved = json.load(f)
    if "model" not in saved:
        raise UserValueError(f"{config_path} has no 'model' entry: not a reference checkpoint config")
    cfg = reference_run_config(saved["model"])
    model = build_model(cfg, torch.device(device))  # seeded as a fresh training run's init
    if not random_init:
        init_from(model, cfg, path)
    return model.eval(), cfg


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
