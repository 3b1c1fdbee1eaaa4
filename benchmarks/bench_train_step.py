"""One exp14 training step, end to end: ours vs a step built from the reference package.

Same configuration (exp14: single-bandset S2/Landsat, random band dropout ≤ 0.3, drop_path 0.1,
modality_cross_random masking, masked-negatives loss + 0.1·InfoNCE, AdamW, clip 1.0), same
weights (imported from the reference model), same rank batch of two masked views, split into
microbatches the same way. Providers:

* ``ours``: `Trainer.train_step` (packed varlen encoder/decoder, both views in one pass, target
  projection once per microbatch, fused/chunked loss).
* ``ref``: the reference `LatentMIM` (Feb-style Conv2d patch embed) run as its contrastive train
  module does: per view encoder+decoder, full target-encoder call, the Feb masked-negatives loss
  (`ModalityPatchDiscriminationMaskedNegatives`, the loss these experiments ran), InfoNCE.
* ``ref_vec``: the same with the later vectorised loss (`..._vec`, HEAD's default), for scale.

CPU: nano, fp32, both at the same thread count. GPU: nano, tiny and base_shallow_decoder, bf16
autocast for ours; the reference runs its model in bf16 autocast too (its FSDP bf16-param
policy is not available in one process), losses in fp32 for both.
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

from olmoearth_fast import experiments  # noqa: E402
from olmoearth_fast.checkpoint import import_reference_state_dict  # noqa: E402
from olmoearth_fast.config import apply_overrides  # noqa: E402
from olmoearth_fast.modalities import as_tokenization  # noqa: E402
from olmoearth_fast.model.latent_mim import MODEL_SIZES  # noqa: E402
from olmoearth_fast.trainer import Trainer, build_loader, build_model  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
SIZES = ["nano", "tiny", "base_shallow_decoder"] if ON_GPU else ["nano"]
# (patch size, hw_p) of the timed rank batch: a mid-size crop of the reference's sampling range
SHAPE = (4, 8) if ON_GPU else (4, 6)
BATCH, MICRO = (64, 32) if ON_GPU else (16, 16)


def _config(size: str, run_dir: str, dataset: str):
    cfg = experiments.get("exp14")
    p, hw = SHAPE
    return apply_overrides(cfg, [f"model.size={size}", f"data.dataset={dataset}", f"checkpoint.dir={run_dir}",
                                 f"data.global_batch_size={BATCH}", f"data.rank_microbatch_size={MICRO}",
                                 f"data.patch_sizes=[{p}]", f"data.hw_p_list=[{hw}]", "data.num_workers=0",
                                 "logging.wandb=False", "trainer.max_steps=1000"])


def _reference_model(cfg):
    tok = as_tokenization(cfg.data.tokenization)
    ref_tok = RefTokenization(overrides={m: ModalityTokenization(band_groups=[list(g) for g in tok.band_groups(m)])
                                         for m in ("sentinel2_l2a", "landsat")})
    d, depth, heads, dd, ddepth, dheads, mlp = MODEL_SIZES[cfg.model.size]
    mods = list(cfg.model.modalities)
    enc = ref_flexi.EncoderConfig(supported_modality_names=mods, embedding_size=d, num_heads=heads, depth=depth,
                                  mlp_ratio=mlp, drop_path=cfg.model.drop_path, use_linear_patch_embed=False,
                                  tokenization_config=ref_tok, band_dropout_rate=cfg.model.band_dropout_rate,
                                  random_band_dropout=cfg.model.random_band_dropout)
    dec = ref_flexi.PredictorConfig(supported_modality_names=mods, encoder_embedding_size=d,
                                    decoder_embedding_size=dd, depth=ddepth, num_heads=dheads, mlp_ratio=mlp,
                                    tokenization_config=ref_tok)
    return LatentMIMConfig(encoder_config=enc, decoder_config=dec).build()


class ReferenceStep:
    """The reference's contrastive LatentMIM train_batch, without olmo-core's trainer around it."""

    def __init__(self, model, cfg, vec: bool, device: torch.device | str | None = None):
        self.device = DEVICE if device is None else torch.device(device)
        self.on_gpu = self.device.type == "cuda"
        self.model, self.cfg = model.to(self.device), cfg
        loss_cls = ref_loss.ModalityPatchDiscriminationMaskedNegativesVec if vec \
            else ref_loss.ModalityPatchDiscriminationMaskedNegatives
        self.loss = loss_cls(tau=cfg.loss.tau, same_target_threshold=cfg.loss.same_target_threshold,
                             mask_negatives_for_modalities=list(cfg.loss.mask_negatives_for_modalities))
        self.infonce = ref_loss.InfoNCELoss(tau=cfg.loss.infonce_tau, weight=cfg.loss.infonce_weight)
        params = [p for p in model.parameters() if p.requires_grad]
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=self.on_gpu)
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


@pytest.fixture(scope="module")
def demo_dataset(tmp_path_factory):
    from olmoearth_fast.data.demo import ensure_demo_dataset

    root = tmp_path_factory.mktemp("bench") / "demo_data"
    return str(ensure_demo_dataset(root, num_samples=max(BATCH, 64)))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("provider", ["ours", "ref", "ref_vec"])
def test_train_step(bench, provider, size, demo_dataset, tmp_path):
    cfg = _config(size, str(tmp_path / "run"), demo_dataset)
    loader = build_loader(cfg, 0, 1, str(tmp_path / "run"))
    batches = [loader.make_batch(1, s) for s in range(2)]  # rotate two batches of the same shape
    ref_model = _reference_model(cfg)
    if provider == "ours":
        model = build_model(cfg, torch.device("cpu"))
        import_reference_state_dict(model, ref_model.state_dict())
        trainer = Trainer(cfg, loader, model.to(DEVICE), DEVICE, str(tmp_path / "run"), log=lambda *a: None)

        def step_fn(b):
            return trainer.train_step(b)
    else:
        step_fn = ReferenceStep(ref_model, cfg, vec=provider == "ref_vec")
    state = {"i": 0}

    def step():
        state["i"] += 1
        return step_fn(batches[state["i"] % 2])

    p, hw = SHAPE
    median = bench(step, group=f"exp14 train step {size} B={BATCH} micro={MICRO} p={p} hw_p={hw}",
                   provider=provider, rounds=None if ON_GPU else 3, warmup=1, size=size, batch=BATCH,
                   microbatch=MICRO, patch_size=p, hw_p=hw, dtype="bf16 autocast" if ON_GPU else "fp32",
                   threads=torch.get_num_threads())
    print(f"{provider} {size}: {BATCH / median:.1f} samples/s")
