"""The run configuration: a tree of dataclasses, dotted overrides, JSON round trip.

    cfg = experiments.get("exp14")
    cfg = apply_overrides(cfg, ["data.global_batch_size=64", "--optim.lr=3e-4"])

Override values are parsed with `ast.literal_eval` (bare words stay strings) and checked against
the field's type; an unknown key is an error that lists the closest valid keys.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from olmoearth_fast.data.loader import DataConfig
from olmoearth_fast.data.masking import MaskingConfig
from olmoearth_fast.errors import UserKeyError, UserTypeError, UserValueError
from olmoearth_fast.modalities import ONLY_DECODE_MODALITIES, TRAINING_MODALITIES

DEMO_DATASET = "demo"  # data.dataset value of the generated demo dataset


@dataclass
class ModelConfig:
    size: str = "base_shallow_decoder"
    # explicit (enc D, enc depth, enc heads, dec D, dec depth, dec heads, mlp_ratio) instead of a size
    dims: tuple[int, int, int, int, int, int, float] | None = None
    modalities: tuple[str, ...] = TRAINING_MODALITIES
    drop_path: float = 0.1
    decoder_drop_path: float = 0.0
    band_dropout_rate: float = 0.0
    random_band_dropout: bool = False
    band_dropout_modalities: tuple[str, ...] | None = None
    merge_bandsets: bool = False
    merge_after_layer: int = -1
    # reference quirk: in eval the encoder attends to its zero padding (see model/encoder.py)
    eval_attend_padding: bool = True


@dataclass
class LossConfig:
    tau: float = 0.1
    same_target_threshold: float = 0.999
    # None = mask same-target negatives in every modality
    mask_negatives_for_modalities: tuple[str, ...] | None = ONLY_DECODE_MODALITIES
    weight: float = 1.0
    infonce_weight: float = 0.1
    infonce_tau: float = 0.1


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    fused: bool | None = True  # True: one fused AdamW kernel per step (CPU and CUDA); False/None: foreach


@dataclass
class ScheduleConfig:
    warmup_steps: int = 8000
    alpha_f: float = 0.1  # cosine to alpha_f * lr (1e-5 for lr 1e-4)


@dataclass
class TrainerConfig:
    epochs: int = 300
    max_steps: int | None = None  # overrides epochs when set
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    init_seed: int = 12536
    # torch.compile of the transformer blocks; None = where it measured faster (see trainer.py)
    compile: bool | None = None
    # CPU: keep freed memory in the process instead of an mmap per large tensor (glibc; see
    # trainer.keep_freed_memory: 1.6x at base, microbatch 32)
    keep_freed_memory: bool = True
    # CUDA: the caching allocator grows its segments in place, for batches whose packed size
    # changes every step (see trainer.expandable_cuda_segments); PYTORCH_CUDA_ALLOC_CONF wins
    expandable_segments: bool = True
    # several ranks: gradients averaged in buckets of this many MB, each all-reduce launched
    # while the last microbatch's backward still runs (olmoearth_fast/grad_sync.py); 0 = one
    # all-reduce of all gradients after the backward
    grad_bucket_mb: float = 25.0
    log_every: int = 1


@dataclass
class LoggingConfig:
    wandb: bool = True  # offline unless WANDB_API_KEY is set; never required
    project: str = "olmoearth_fast"
    entity: str | None = None
    run_name: str | None = None
    plot: bool = True  # loss-curve PNG next to the checkpoints at the end of a run


@dataclass
class CheckpointConfig:
    dir: str = "runs/{run_name}"
    save_every: int = 250
    keep_last: int = 2
    resume: bool = False  # continue from the latest checkpoint in `dir`
    # start afresh in a `dir` that holds checkpoints (they are pruned as new ones are written);
    # without it, or resume, the launcher refuses to touch an existing run
    overwrite: bool = False


@dataclass
class EvalConfig:
    """Periodic EuroSAT kNN during training (off unless a dataset is given)."""

    knn_dataset: str | None = None  # GEO-Bench m-eurosat or torchgeo EuroSATallBands directory
    every: int = 4000  # steps (the reference's m-eurosat interval)
    patch_size: int = 4
    batch_size: int = 128
    max_samples: int | None = None  # per split, for a quicker in-loop check


@dataclass
class RunConfig:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskingConfig = field(default_factory=lambda: MaskingConfig(name="modality_cross_random"))
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------
# Overrides


def _leaf_keys(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: field type} for every leaf field."""
    out = {}
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            out.update(_leaf_keys(value, key + "."))
        else:
            out[key] = hints[f.name]
    return out


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if text in ("none", "null"):
            return None
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        return text  # bare word: a string


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp`` (with int→float and list→tuple coercion)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key)
            except TypeError as e:
                errors.append(str(e))
        raise TypeError(f"{key}: {value!r} does not match {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise TypeError(f"{key}: expected None, got {value!r}")
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool):
        if type(value) is tp:
            return value
        raise TypeError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{key}: expected a list/tuple, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(args) != len(value):
            raise TypeError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
        raise TypeError(f"{key}: expected a dict, got {value!r}")
    raise TypeError(f"{key}: unsupported type {tp}")


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``a.b=c`` (or ``--a.b=c``) overrides; returns a new config."""
    cfg = copy_config(cfg)
    leaves = _leaf_keys(cfg)
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise UserValueError(f"override {item!r} is not of the form key=value (e.g. data.global_batch_size=64)")
        key, raw = text.split("=", 1)
        if key not in leaves:
            close = difflib.get_close_matches(key, leaves, n=5, cutoff=0.5)
            hint = f"; closest: {', '.join(close)}" if close else "; `--dry-run` prints every key"
            raise UserKeyError(f"unknown config key {key!r}{hint}")
        try:
            value = _coerce(_parse_value(raw), leaves[key], key)
        except TypeError as e:
            raise UserTypeError(f"bad value for {key}: {e}") from None
        node = cfg
        *path, leaf = key.split(".")
        for part in path:
            node = getattr(node, part)
        setattr(node, leaf, value)
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(d: dict) -> RunConfig:
    """Inverse of `to_dict`: the flattened leaves are applied as overrides onto the defaults."""
    cfg = RunConfig()
    leaves = _leaf_keys(cfg)

    def walk(node: dict, prefix: str = ""):
        for k, v in node.items():
            key = prefix + k
            if isinstance(v, dict) and not any(leaf == key for leaf in leaves):
                yield from walk(v, key + ".")
            else:
                yield key, v

    for key, value in walk(d):
        if key not in leaves:
            raise KeyError(f"unknown config key {key!r} in saved config")
        node = cfg
        *path, leaf = key.split(".")
        for part in path:
            node = getattr(node, part)
        setattr(node, leaf, _coerce(value, leaves[key], key))
    return cfg


def copy_config(cfg: RunConfig) -> RunConfig:
    return from_dict(to_dict(cfg))


def dumps(cfg: RunConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2)
