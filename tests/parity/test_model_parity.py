"""Model parity with the reference package (olmoearth-pretrain==0.1.2, configured Feb-style).

Same weights (imported from a randomly initialised reference LatentMIM), same masked batch,
eval mode, fp32: encoder tokens, pooled projection, decoder outputs at DECODER positions and the
frozen targets agree within 1e-4 relative.
"""

import pytest
import torch

ref_flexi = pytest.importorskip("olmoearth_pretrain.nn.flexi_vit")
from olmoearth_pretrain.datatypes import MaskedOlmoEarthSample  # noqa: E402
from olmoearth_pretrain.nn.latent_mim import LatentMIMConfig  # noqa: E402
from olmoearth_pretrain.nn.tokenization import ModalityTokenization  # noqa: E402
from olmoearth_pretrain.nn.tokenization import TokenizationConfig as RefTokenization  # noqa: E402

from olmoearth_fast.checkpoint import (  # noqa: E402
    checkpoint_tensors_equal,
    export_reference_state_dict,
    import_reference_state_dict,
)
from olmoearth_fast.modalities import MaskValue, tokenization_preset  # noqa: E402
from olmoearth_fast.model.latent_mim import LatentMIM, ModelConfig  # noqa: E402
from tests.helpers.parity_batch import random_masked_batch  # noqa: E402

MODS = ("sentinel2_l2a", "sentinel1", "landsat", "worldcover", "era5_10")


def _ref_model(tok, drop_path=0.1):
    ref_tok = RefTokenization(overrides={m: ModalityTokenization(band_groups=[list(g) for g in tok.band_groups(m)])
                                         for m in ("sentinel2_l2a", "landsat")})
    enc = ref_flexi.EncoderConfig(supported_modality_names=list(MODS), embedding_size=64, num_heads=4, depth=2,
                                  mlp_ratio=2.0, drop_path=drop_path, use_linear_patch_embed=False,
                                  tokenization_config=ref_tok)
    dec = ref_flexi.PredictorConfig(supported_modality_names=list(MODS), encoder_embedding_size=64,
                                    decoder_embedding_size=64, depth=2, num_heads=4, mlp_ratio=2.0,
                                    tokenization_config=ref_tok)
    return LatentMIMConfig(encoder_config=enc, decoder_config=dec).build()


def _our_model(tok, drop_path=0.1):
    return LatentMIM(ModelConfig(dims=(64, 2, 4, 64, 2, 4, 2.0), modalities=MODS, drop_path=drop_path), tok)


def _assert_close(ours, ref, what):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    scale = ref.abs().max().clamp(min=1.0)
    err = (ours - ref).abs().max() / scale
    assert err < 1e-4, f"{what}: max error {err:.3e} relative to {scale:.3g}"


@pytest.mark.parametrize("tok_name", ["single_bandset", "default"])
@pytest.mark.parametrize("p,hw,t", [(1, 1, 3), (3, 5, 2), (8, 12, 1), (1, 12, 1), (8, 1, 2), (3, 1, 1)])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_model_matches_reference(tok_name, p, hw, t, mode):
    """Eval mode (the reference attends to its zero padding, replicated by default) and train
    mode with DropPath off (key-padding masks, i.e. per-sample attention)."""
    torch.manual_seed(0)
    tok = tokenization_preset(tok_name)
    drop = 0.1 if mode == "eval" else 0.0
    ref = _ref_model(tok, drop).train(mode == "train")
    ours = _our_model(tok, drop).train(mode == "train")
    import_reference_state_dict(ours, ref.state_dict())
    data, masks, timestamps = random_masked_batch(tok, MODS, p, hw, t, b=3)

    sample = MaskedOlmoEarthSample(timestamps=timestamps, **data, **{f"{m}_mask": masks[m] for m in MODS})
    with torch.no_grad():
        ref_latent, ref_decoded, ref_pooled, _, _ = ref(sample, patch_size=p)
        ref_target = ref.target_encoder(sample.unmask(), patch_size=p,
                                        token_exit_cfg={m: 0 for m in MODS})["tokens_and_masks"]
        layout = ours.layout(data, p)
        token_masks = layout.token_masks(masks)
        out = ours(data, timestamps, token_masks, layout)
        target = layout.unflatten(ours.target(data, layout))
        enc_full = layout.unflatten(out.encoded.full())
        dec_full = layout.unflatten(out.decoded.full())

    _assert_close(out.pooled, ref_pooled, "pooled projection")
    for m in MODS:
        mk = layout.unflatten(token_masks)[m]
        ref_enc = getattr(ref_latent, m)
        _assert_close(enc_full[m], ref_enc, f"encoder tokens {m}")
        assert torch.all(enc_full[m][mk != MaskValue.ONLINE_ENCODER] == 0)
        dec = mk == MaskValue.DECODER
        _assert_close(dec_full[m][dec], getattr(ref_decoded, m)[dec], f"decoder output {m}")
        _assert_close(target[m], getattr(ref_target, m), f"target {m}")


def test_state_dict_round_trip():
    tok = tokenization_preset("single_bandset")
    ref = _ref_model(tok)
    ours = _our_model(tok)
    import_reference_state_dict(ours, ref.state_dict())
    exported = export_reference_state_dict(ours)
    # every reference key is exported, with the same values (the unused target copy aside)
    ref_state = ref.state_dict()
    assert set(exported) == set(ref_state)
    used = {k: v for k, v in ref_state.items() if not k.startswith("target_encoder.")
            or k.startswith("target_encoder.patch_embeddings.")}
    assert checkpoint_tensors_equal({k: exported[k] for k in used}, used) == []
    ref.load_state_dict(exported, strict=True)
    again = _our_model(tok)
    import_reference_state_dict(again, exported)
    assert checkpoint_tensors_equal(again.state_dict(), ours.state_dict()) == []


def test_import_errors_name_the_key():
    tok = tokenization_preset("single_bandset")
    ours = _our_model(tok)
    state = _ref_model(tok).state_dict()
    state.pop("decoder.mask_token")
    with pytest.raises(KeyError, match="decoder.mask_token"):
        import_reference_state_dict(ours, state)
    state = _ref_model(tok).state_dict()
    state["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="encoder.extra.weight"):
        import_reference_state_dict(ours, state)
    state = _ref_model(tokenization_preset("default")).state_dict()
    with pytest.raises((ValueError, KeyError), match="sentinel2_l2a"):
        import_reference_state_dict(ours, state)


def test_model_sizes_match_reference():
    utils = pytest.importorskip("olmoearth_pretrain.internal.utils")
    from olmoearth_fast.model.latent_mim import MODEL_SIZES

    assert set(MODEL_SIZES) == set(utils.MODEL_SIZE_ARGS)
    for name, a in utils.MODEL_SIZE_ARGS.items():
        assert MODEL_SIZES[name] == (a["encoder_embedding_size"], a["encoder_depth"], a["encoder_num_heads"],
                                     a["decoder_embedding_size"], a["decoder_depth"], a["decoder_num_heads"],
                                     a["mlp_ratio"]), name


def test_export_loads_in_reference_package(tmp_path):
    """`export_reference` writes what `olmoearth_pretrain.model_loader.load_model_from_path` loads."""
    loader = pytest.importorskip("olmoearth_pretrain.model_loader")
    from olmoearth_fast import experiments
    from olmoearth_fast.checkpoint import export_reference
    from olmoearth_fast.config import apply_overrides
    from olmoearth_fast.trainer import build_model

    cfg = apply_overrides(experiments.get("exp14"), ["model.size=nano"])
    ours = build_model(cfg, torch.device("cpu"))
    with torch.no_grad():  # make every tensor distinguishable from a fresh init
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    export_reference(ours, cfg, str(tmp_path))
    ref = loader.load_model_from_path(str(tmp_path))
    assert type(ref).__name__ == "LatentMIM"
    exported = export_reference_state_dict(ours)
    assert checkpoint_tensors_equal(ref.state_dict(), exported) == []
    back = build_model(cfg, torch.device("cpu"))
    import_reference_state_dict(back, ref.state_dict())
    assert checkpoint_tensors_equal(back.state_dict(), ours.state_dict()) == []
