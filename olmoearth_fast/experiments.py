"""The experiments of the reference's `single_bandset_masked_neg.py` (exp1 … exp17).

Each is a named function returning a full `RunConfig`; `get("exp14")` and
`get("single_bandset_all12_random_band_dropout_cross_random_masked_neg")` are the same. Base
settings (docs/reference_semantics.md §10): base_shallow_decoder, drop_path 0.1, AdamW lr 1e-4
wd 0.02, warmup 8000 then cosine to 1e-5, clip 1.0, global batch 512, microbatch 32, two views,
token budget 2250, patch size 1–8, hw_p 1–12, 300 epochs, modality_cross_random (allow the same
bandset to be encoded and decoded), masked-negatives loss (τ 0.1, threshold 0.999, negatives
masked in the decode-only maps) + InfoNCE (weight 0.1, τ 0.1). Differences: the table of §10.
"""

from __future__ import annotations

from collections.abc import Callable

from olmoearth_fast.config import DEMO_DATASET, RunConfig, apply_overrides
from olmoearth_fast.data.masking import MaskingConfig
from olmoearth_fast.errors import UserKeyError, UserValueError
from olmoearth_fast.modalities import ONLY_DECODE_MODALITIES, TRAINING_MODALITIES

WITH_ERA5 = ONLY_DECODE_MODALITIES + ("era5_10",)


def base(name: str) -> RunConfig:
    cfg = RunConfig(name=name)
    cfg.masking = MaskingConfig(name="modality_cross_random", encode_ratio=0.5, decode_ratio=0.5,
                                only_decode_modalities=ONLY_DECODE_MODALITIES,
                                allow_encoding_decoding_same_bandset=True, min_encoded_bandsets=2)
    cfg.logging.project = "2026_02_08_masked_neg"
    return cfg


def _random_decode(cfg: RunConfig, only_decode=ONLY_DECODE_MODALITIES) -> RunConfig:
    cfg.masking = MaskingConfig(name="random_with_decode", encode_ratio=0.5, decode_ratio=0.5,
                                only_decode_modalities=only_decode)
    return cfg


def _era5_decode_only(cfg: RunConfig) -> RunConfig:
    cfg.model.modalities = TRAINING_MODALITIES + ("era5_10",)
    cfg.masking.only_decode_modalities = WITH_ERA5
    cfg.loss.mask_negatives_for_modalities = WITH_ERA5
    return cfg


def _dropout(cfg: RunConfig, rate: float, random: bool) -> RunConfig:
    cfg.model.band_dropout_rate = rate
    cfg.model.random_band_dropout = random
    return cfg


def _merge(cfg: RunConfig, after_layer: int) -> RunConfig:
    cfg.model.merge_bandsets = True
    cfg.model.merge_after_layer = after_layer
    return cfg


def _tok(cfg: RunConfig, preset: str | None) -> RunConfig:
    cfg.data.tokenization = preset
    return cfg


def exp1() -> RunConfig:
    return base("single_bandset_cross_random_masked_neg")


def exp2() -> RunConfig:
    return _random_decode(base("single_bandset_random_decode_masked_neg"))


def exp3() -> RunConfig:
    return _tok(base("single_bandset_no60m_cross_random_masked_neg"), "single_bandset_no60m")


def exp4() -> RunConfig:
    return _tok(base("single_bandset_10m_only_cross_random_masked_neg"), "single_bandset_10m_only")


def exp5() -> RunConfig:
    return _dropout(base("single_bandset_band_dropout_cross_random_masked_neg"), 0.3, random=False)


def exp6() -> RunConfig:
    return _dropout(base("single_bandset_band_dropout_0.5_cross_random_masked_neg"), 0.5, random=False)


def exp7() -> RunConfig:
    return _era5_decode_only(_random_decode(base("single_bandset_era5_decode_only_masked_neg")))


def exp8() -> RunConfig:
    return _tok(base("two_bandset_cross_random_masked_neg"), "two_bandset")


def exp9() -> RunConfig:
    return _merge(_tok(base("merged_bandsets_cross_random_masked_neg"), "default"), -1)


def exp10() -> RunConfig:
    return _merge(_tok(base("midlayer_merged_bandsets_cross_random_masked_neg"), "default"), 3)


def exp11() -> RunConfig:
    return _tok(base("default_bandsets_via_tokenconfig_cross_random_masked_neg"), "default_explicit")


def exp12() -> RunConfig:
    return _merge(_tok(base("two_bandset_midlayer_merged_cross_random_masked_neg"), "two_bandset"), 3)


def exp13() -> RunConfig:
    cfg = _tok(base("single_bandset_no60m_random_band_dropout_cross_random_masked_neg"), "single_bandset_no60m")
    return _dropout(cfg, 0.3, random=True)


def exp14() -> RunConfig:
    return _dropout(base("single_bandset_all12_random_band_dropout_cross_random_masked_neg"), 0.3, random=True)


def exp15() -> RunConfig:
    cfg = _random_decode(base("single_bandset_all12_random_band_dropout_era5_random_decode_masked_neg"))
    return _era5_decode_only(_dropout(cfg, 0.3, random=True))


def exp16() -> RunConfig:
    cfg = base("single_bandset_all12_random_band_dropout_era5_cross_random_masked_neg")
    return _era5_decode_only(_dropout(cfg, 0.3, random=True))


def exp17() -> RunConfig:
    cfg = _random_decode(base("single_bandset_all12_random_band_dropout_random_decode_masked_neg"))
    return _dropout(cfg, 0.3, random=True)


EXPERIMENTS: dict[str, Callable[[], RunConfig]] = {f"exp{i}": globals()[f"exp{i}"] for i in range(1, 18)}
# the reference's keys (exp 5 was also called ..._band_dropout_0.3_... in an earlier version;
# exp 13's key in the script's experiment dict lacks the "no60m" its README gives it)
KEYS: dict[str, str] = {fn().name: short for short, fn in EXPERIMENTS.items()}
KEYS["single_bandset_band_dropout_0.3_cross_random_masked_neg"] = "exp5"
KEYS["single_bandset_random_band_dropout_cross_random_masked_neg"] = "exp13"


def get(name: str) -> RunConfig:
    """An experiment by short name (``exp14``, ``14``) or by the reference's key."""
    short = f"exp{name}" if name.isdigit() else KEYS.get(name, name)
    if short not in EXPERIMENTS:
        raise UserKeyError(f"unknown experiment {name!r}; valid: {', '.join(EXPERIMENTS)} or a reference key "
                           f"such as {next(iter(KEYS))!r}")
    return EXPERIMENTS[short]()


def demo(cfg: RunConfig) -> RunConfig:
    """The README's demo: ``cfg`` at nano size on the embedded demo dataset, minutes on a 2-core CPU."""
    cfg.model.size = "nano"
    cfg.data.dataset = DEMO_DATASET
    cfg.data.demo_samples = 256
    cfg.data.global_batch_size = 16
    cfg.data.rank_microbatch_size = 16
    # batches made between steps: on a 2-core CPU a worker process slows the step more than it
    # saves (trainer.loader_core_contention)
    cfg.data.num_workers = 0
    cfg.data.token_budget = 600
    # one crop shape (16 px, 4×4 tokens, T = 5): the loss depends on the token count, so a fixed
    # shape makes the curve comparable from step to step
    cfg.data.patch_sizes = (4,)
    cfg.data.hw_p_list = (4,)
    cfg.trainer.max_steps = 300
    cfg.schedule.warmup_steps = 20
    cfg.checkpoint.overwrite = True  # `make demo` again starts the demo again
    cfg.optim.lr = 1e-3
    cfg.checkpoint.save_every = 100
    cfg.checkpoint.dir = "runs/demo"
    cfg.logging.wandb = False
    return cfg


def resolve(name: str | None, overrides: list[str], demo_run: bool = False) -> RunConfig:
    """The checked run config of experiment ``name`` (exp14 when None), under `demo` if
    ``demo_run``, with ``a.b=c`` overrides applied.

    Raises:
        UserError: an unknown experiment, key or model size, a value of the wrong type, or a
            setting no run can start with; the message names the setting and the fix.
    """
    cfg = get(name or "exp14")
    if demo_run:
        cfg = demo(cfg)
    cfg = apply_overrides(cfg, overrides)
    check(cfg)
    return cfg


def check(cfg: RunConfig) -> None:
    """Settings that fail before the first step, caught before data or model are built."""
    import os

    import torch

    from olmoearth_fast.modalities import as_tokenization, check_modalities
    from olmoearth_fast.model.latent_mim import MODEL_SIZES

    m, d, t = cfg.model, cfg.data, cfg.trainer
    if m.dims is None and m.size not in MODEL_SIZES:
        raise UserKeyError(f"unknown model size model.size={m.size!r}; valid: {', '.join(MODEL_SIZES)} "
                           f"(or model.dims=[D, depth, heads, dec D, dec depth, dec heads, mlp_ratio])")
    try:
        check_modalities(m.modalities, "model.modalities")
        as_tokenization(d.tokenization)
    except ValueError as e:  # the message names the bad modality/band and lists the valid ones
        raise UserValueError(str(e)) from None
    if d.global_batch_size < 1 or d.rank_microbatch_size < 1:
        raise UserValueError(f"data.global_batch_size={d.global_batch_size} and data.rank_microbatch_size="
                             f"{d.rank_microbatch_size} must be >= 1")
    if d.num_workers < 0 or d.prefetch_factor < 1:
        raise UserValueError(f"data.num_workers={d.num_workers} must be >= 0 (0: batches made between steps) and "
                             f"data.prefetch_factor={d.prefetch_factor} >= 1 (batches each worker makes ahead)")
    if t.grad_bucket_mb < 0:
        raise UserValueError(f"trainer.grad_bucket_mb={t.grad_bucket_mb} must be >= 0 (MB per all-reduce bucket; "
                             "0: one all-reduce after the backward)")
    if t.precision not in ("auto", "bf16", "fp32"):
        raise UserValueError(f"trainer.precision={t.precision!r}: use auto, bf16 or fp32")
    if t.device not in ("auto", "cpu") and not t.device.startswith("cuda"):
        raise UserValueError(f"trainer.device={t.device!r}: use auto, cpu or cuda")
    if t.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserValueError(f"trainer.device={t.device} but torch sees no CUDA device: use trainer.device=auto")
    if cfg.eval.knn_dataset is not None and not os.path.exists(cfg.eval.knn_dataset):
        raise UserValueError(f"eval.knn_dataset={cfg.eval.knn_dataset}: no such path; point it at a GEO-Bench "
                             f"m-eurosat or torchgeo EuroSATallBands directory, or drop the override")
