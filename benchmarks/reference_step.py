"""The reference's training step, built from `olmoearth-pretrain==0.1.2`, for side-by-side runs.

Two configurations of the reference compute what our `Trainer.train_step` computes (exp14-style
contrastive LatentMIM: per view encoder + decoder, frozen projection target, masked-negatives
loss + InfoNCE, clip, AdamW):

* ``best`` (provider ``ref_best``): the reference's fastest faithful configuration:
  `LatentMIM(projection_only_target=True)` (the target is the frozen patch projection only),
  the vectorised `ModalityPatchDiscriminationMaskedNegativesVec`, fused AdamW (CPU and CUDA
  support it in torch ≥ 2.4), band dropout switched on with `encoder.enable_band_dropout()` as
  its train module does, and the patch projection as Linear or Conv2d, whichever is faster on the
  device (`BEST_PATCH_EMBED`; the two are equal after a weight reshape).
* ``feb`` (provider ``ref``): the February 2026 path these experiments ran: full deep-copied
  target encoder (called with all token exits 0), the per-sample-loop
  `ModalityPatchDiscriminationMaskedNegatives`, Conv2d patch projection, AdamW (foreach).

Both run the model in bf16 autocast on CUDA (the reference's FSDP bf16-param policy is not
available in one process) with the loss in fp32, and fp32 on CPU. Used by
`bench_train_step.py` and `scripts/compare_loss_curves.py`.
"""

from __future__ import annotations

import pytest
import torch

ref_flexi = pytest.importorskip("olmoearth_pretrain.nn.flexi_vit")
from olmoearth_pretrain.datatypes import MaskedOlmoEarthSample  # noqa: E402
from olmoearth_pretrain.nn.latent_mim import LatentMIMConfig  # noqa: E402
from olmoearth_pretrain.nn.tokenization import ModalityTokenization  # noqa: E402
from olmoearth_pretrain.nn.tokenization import TokenizationConfig as RefTokenization  # noqa: E402
from olmoearth_pretrain.train import loss as ref_loss  # noqa: E402

from olmoearth_fast.modalities import as_tokenization  # noqa: E402
from olmoearth_fast.model.latent_mim import MODEL_SIZES  # noqa: E402

# Which patch projection ref_best uses per device type. Linear (0.1.2's default) on both: on
# the 2-core CPU the reference's FlexiPatchEmbed forward + backward (S2, 12 bands, p=4,
# hw_p=6, T=12, best of 15 interleaved) took conv 78 / 18 / 26 ms vs linear 59 / 12 / 14 ms at
# (B, D) = (32, 128) / (8, 192) / (4, 768); on CUDA it is one cuBLAS GEMM.
BEST_PATCH_EMBED = {"cpu": "linear", "cuda": "linear"}
VARIANTS = ("best", "feb")


def reference_model(cfg, variant: str = "feb", device_type: str = "cpu"):
    """The reference LatentMIM for ``cfg`` (a RunConfig), Conv2d-layout weights for ``feb``.

    ``best`` builds the projection-only target and the device's faster patch projection.
    Initialise both from the same weights with `copy_weights`.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    tok = as_tokenization(cfg.data.tokenization)
    ref_tok = RefTokenization(overrides={m: ModalityTokenization(band_groups=[list(g) for g in tok.band_groups(m)])
                                         for m in ("sentinel2_l2a", "landsat") if m in cfg.model.modalities})
    d, depth, heads, dd, ddepth, dheads, mlp = cfg.model.dims or MODEL_SIZES[cfg.model.size]
    mods = list(cfg.model.modalities)
    linear = variant == "best" and BEST_PATCH_EMBED.get(device_type, "conv") == "linear"
    enc = ref_flexi.EncoderConfig(supported_modality_names=mods, embedding_size=d, num_heads=heads, depth=depth,
                                  mlp_ratio=mlp, drop_path=cfg.model.drop_path, use_linear_patch_embed=linear,
                                  tokenization_config=ref_tok, band_dropout_rate=cfg.model.band_dropout_rate,
                                  random_band_dropout=cfg.model.random_band_dropout)
    dec = ref_flexi.PredictorConfig(supported_modality_names=mods, encoder_embedding_size=d,
                                    decoder_embedding_size=dd, depth=ddepth, num_heads=dheads, mlp_ratio=mlp,
                                    tokenization_config=ref_tok)
    model = LatentMIMConfig(encoder_config=enc, decoder_config=dec,
                            projection_only_target=variant == "best").build()
    # 0.1.2 keeps band dropout off until the train module enables it on the online encoder
    model.encoder.enable_band_dropout()
    return model


def copy_weights(dst, src) -> None:
    """Load the weights of reference model ``src`` into reference model ``dst`` (any variant).

    Patch projections are reshaped between the Conv2d layout [D, C, 8, 8] and the Linear layout
    [D, 8·8·C] (the Linear flattens a patch as (row, column, channel)); a projection-only target
    takes the target encoder's patch embeddings and drops the rest.
    """
    want = dst.state_dict()
    out = {}
    for k, v in src.state_dict().items():
        if k not in want:
            if k.startswith("target_encoder."):
                continue  # transformer blocks of a full target encoder: not in a projection-only target
            raise KeyError(f"copy_weights: {k} has no counterpart in the destination model")
        w = want[k]
        if v.shape != w.shape:
            if v.dim() == 4 and w.dim() == 2:  # conv -> linear
                v = v.permute(0, 2, 3, 1).reshape(w.shape)
            elif v.dim() == 2 and w.dim() == 4:  # linear -> conv
                v = v.reshape(w.shape[0], w.shape[2], w.shape[3], w.shape[1]).permute(0, 3, 1, 2)
            else:
                raise ValueError(f"copy_weights: {k} is {tuple(v.shape)} here, {tuple(w.shape)} there")
        out[k] = v.contiguous()
    missing = [k for k in want if k not in out]
    if missing:
        raise KeyError(f"copy_weights: the destination's {missing[:5]} have no source")
    dst.load_state_dict(out, strict=True)


class ReferenceStep:
    """The reference's contrastive LatentMIM `train_batch` without olmo-core's trainer around it."""

    def __init__(self, model, cfg, variant: str = "best", device: torch.device | str = "cpu"):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.device = torch.device(device)
        self.on_gpu = self.device.type == "cuda"
        self.model, self.cfg, self.variant = model.to(self.device), cfg, variant
        loss_cls = ref_loss.ModalityPatchDiscriminationMaskedNegativesVec if variant == "best" \
            else ref_loss.ModalityPatchDiscriminationMaskedNegatives
        self.loss = loss_cls(tau=cfg.loss.tau, same_target_threshold=cfg.loss.same_target_threshold,
                             mask_negatives_for_modalities=list(cfg.loss.mask_negatives_for_modalities))
        self.infonce = ref_loss.InfoNCELoss(tau=cfg.loss.infonce_tau, weight=cfg.loss.infonce_weight)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                     fused=variant == "best" or None)
        self.exits = {m: 0 for m in cfg.model.modalities}

    def _sample(self, mb, view):
        masks = {f"{m}_mask": mk.long() for m, mk in mb.masks[view].items()}
        return MaskedOlmoEarthSample(timestamps=mb.timestamps, **mb.data, **masks)

    def __call__(self, batch):
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        micro = batch.microbatches(self.cfg.data.rank_microbatch_size)
        p = batch.patch_size
        for mb in micro:
            mb = mb.to(self.device)
            losses, pooled = [], []
            for view in (0, 1):
                sample = self._sample(mb, view)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.on_gpu):
                    _, decoded, pooled_v, _, _ = self.model(sample, patch_size=p)
                    with torch.no_grad():
                        target = self.model.target_encoder(sample.unmask(), patch_size=p,
                                                           token_exit_cfg=self.exits)["tokens_and_masks"]
                with torch.autocast(self.device.type, enabled=False):
                    losses.append(self.loss.compute(decoded, target))
                pooled.append(pooled_v)
            loss = (losses[0] + losses[1]) / 2 + self.infonce.compute(pooled[0], pooled[1])
            (loss / len(micro)).backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm)
        self.opt.step()
        return loss
