"""Reference checkpoints in the layouts users hold import strictly and compute what they computed.

* olmoearth-pretrain 0.1.2's default Linear patch embedding: built here from the package;
* February-2026 checkpoints carrying `pos_embed` time tables: the package's own table function
  makes them, and the package's model (which drops them on load) is the reference;
* the merged-bandset models of exps 9, 10, 12 (`encoder.bandset_merge_modules.*`,
  `decoder.bandset_unmerge_modules.*`): 0.1.2 no longer has them, so `data/feb_merge.json`
  records, for three small models built by the code of allenai/olmoearth_pretrain at 95a90af6
  (the last commit with `nn/bandset_merge.py`), their state_dict key names and shapes, their
  fixed tables, and their outputs on the batch of `batch` with the weights of `feb_weights`
  (`make_feb_fixture.py` wrote it; decoder outputs only at DECODER positions, targets once).

Outputs (encoder tokens, pooled projection, decoder outputs at DECODER positions, targets) agree
within 1e-4 relative, in eval mode and in train mode without DropPath.
"""

from __future__ import annotations

import base64
import json
import math
import os

import numpy as np
import pytest
import torch

from olmoearth_fast.checkpoint import (
    _to_reference_key,
    export_reference_state_dict,
    import_reference_state_dict,
    init_from,
    load_reference,
    reference_run_config,
)
from olmoearth_fast.errors import UserError, UserKeyError, UserValueError
from olmoearth_fast.modalities import MODALITIES, MaskValue, tokenization_preset
from olmoearth_fast.model.latent_mim import LatentMIM, ModelConfig
from tests.helpers.parity_batch import random_masked_batch as batch  # noqa: F401  (make_feb_fixture.py uses T.batch)

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "feb_merge.json")
MODS_012 = ("sentinel2_l2a", "sentinel1", "landsat", "worldcover", "era5_10")
# the three merged-bandset set-ups, at toy size: (tokenization preset, merge_after_layer)
FEB_CASES = {"exp9": ("default", -1), "exp10": ("default", 0), "exp12": ("two_bandset", 0)}
FEB_MODS = ("sentinel2_l2a", "landsat", "worldcover")
FEB_DIMS = (16, 2, 2, 16, 2, 2, 2.0)
FEB_SHAPE = {"p": 2, "hw": 2, "t": 2, "b": 3}


# ---------------------------------------------------------------------------------------------
# recipes shared with make_feb_fixture.py (which runs them against the February code)


def feb_weights(shapes: dict[str, list[int]], tables: dict[str, torch.Tensor], seed: int = 0) -> dict:
    """A state_dict for the recorded key names and shapes: the fixed tables as recorded, every
    other tensor seeded random (fan-in scaled matrices, norm weights near 1, small vectors)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape = shapes[key]
        if key in tables:
            out[key] = tables[key].clone()
        elif len(shape) >= 2:
            out[key] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        elif key.endswith(".weight"):
            out[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[key] = 0.1 * torch.randn(shape, generator=g)
    return out


def encode_array(x: torch.Tensor) -> dict:
    return {"shape": list(x.shape), "float32": base64.b64encode(x.float().numpy().tobytes()).decode()}


def decode_array(d: dict) -> torch.Tensor:
    raw = np.frombuffer(base64.b64decode(d["float32"]), dtype=np.float32)
    return torch.from_numpy(raw.copy()).reshape(d["shape"])


# ---------------------------------------------------------------------------------------------


def _ours(tok, mods=MODS_012, dims=(64, 2, 4, 64, 2, 4, 2.0), **kw) -> LatentMIM:
    return LatentMIM(ModelConfig(dims=dims, modalities=mods, drop_path=0.0, **kw), tok)


def _ours_outputs(model, data, masks, timestamps, p):
    with torch.no_grad():
        layout = model.layout(data, p)
        token_masks = layout.token_masks(masks)
        out = model(data, timestamps, token_masks, layout)
        enc = out.encoded.layout.unflatten(out.encoded.full())
        return {"pooled": out.pooled, "encoded": enc, "decoded": layout.unflatten(out.decoded.full()),
                "target": layout.unflatten(model.target(data, layout)), "masks": layout.unflatten(token_masks)}


def _close(ours, ref, what):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    if ref.numel():
        scale = ref.abs().max().clamp(min=1.0)
        err = float((ours - ref).abs().max() / scale)
        assert err < 1e-4, f"{what}: max error {err:.3e} relative to {float(scale):.3g}"


def _assert_same(ours: dict, ref: dict, mods):
    """``ref``: {"pooled", "encoded"/"decoded"/"target": {modality: full tensor}}."""
    _close(ours["pooled"], ref["pooled"], "pooled projection")
    for m in mods:
        _close(ours["encoded"][m], ref["encoded"][m], f"encoder tokens {m}")
        dec = ours["masks"][m] == MaskValue.DECODER
        _close(ours["decoded"][m][dec], ref["decoded"][m][dec], f"decoder output {m}")
        _close(ours["target"][m], ref["target"][m], f"target {m}")


def _ref_outputs(ref, data, masks, timestamps, p, mods):
    from olmoearth_pretrain.datatypes import MaskedOlmoEarthSample

    sample = MaskedOlmoEarthSample(timestamps=timestamps, **data, **{f"{m}_mask": masks[m] for m in mods})
    with torch.no_grad():
        latent, decoded, pooled, _, _ = ref(sample, patch_size=p)
        target = ref.target_encoder(sample.unmask(), patch_size=p,
                                    token_exit_cfg={m: 0 for m in mods})["tokens_and_masks"]
    return {"pooled": pooled, "encoded": {m: getattr(latent, m) for m in mods},
            "decoded": {m: getattr(decoded, m) for m in mods}, "target": {m: getattr(target, m) for m in mods}}


def _ref_012(tok, linear: bool, num_heads: int = 4):
    flexi = pytest.importorskip("olmoearth_pretrain.nn.flexi_vit")
    from olmoearth_pretrain.nn.latent_mim import LatentMIMConfig
    from olmoearth_pretrain.nn.tokenization import ModalityTokenization
    from olmoearth_pretrain.nn.tokenization import TokenizationConfig as RefTokenization

    ref_tok = RefTokenization(overrides={m: ModalityTokenization(band_groups=[list(g) for g in tok.band_groups(m)])
                                         for m in ("sentinel2_l2a", "landsat")})
    enc = flexi.EncoderConfig(supported_modality_names=list(MODS_012), embedding_size=64, num_heads=num_heads,
                              depth=2, mlp_ratio=2.0, drop_path=0.0, use_linear_patch_embed=linear,
                              tokenization_config=ref_tok)
    dec = flexi.PredictorConfig(supported_modality_names=list(MODS_012), encoder_embedding_size=64,
                                decoder_embedding_size=64, depth=2, num_heads=4, mlp_ratio=2.0,
                                tokenization_config=ref_tok)
    cfg = LatentMIMConfig(encoder_config=enc, decoder_config=dec)
    return cfg.build(), cfg


def _pos_embed_table(n: int, length: int = 12) -> torch.Tensor:
    """The February code's time table, from the reference package's own encoding function."""
    from olmoearth_pretrain.nn.encodings import get_1d_sincos_pos_encoding

    return get_1d_sincos_pos_encoding(torch.arange(length), n).float()


# ---------------------------------------------------------------------------------------------
# olmoearth-pretrain 0.1.2: Linear patch embeddings


@pytest.mark.parametrize("tok_name", ["single_bandset", "default"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_linear_patch_embedding_imports_and_matches(tok_name, mode):
    torch.manual_seed(0)
    tok = tokenization_preset(tok_name)
    ref, _ = _ref_012(tok, linear=True)
    state = ref.state_dict()
    s2 = "encoder.patch_embeddings.per_modality_embeddings.sentinel2_l2a.sentinel2_l2a__0.proj.weight"
    assert state[s2].dim() == 2  # the Linear layout
    ours = _ours(tok)
    notes = import_reference_state_dict(ours, state)
    spatial = sum(tok.num_bandsets(m) for m in MODS_012 if MODALITIES[m].is_spatial)
    assert notes == [f"{2 * spatial} Linear patch embeddings reshaped to Conv2d"]  # online + target
    ref.train(mode == "train")
    ours.train(mode == "train")
    for p, hw, t in ((1, 3, 2), (4, 2, 1), (8, 1, 2)):
        data, masks, ts = batch(tok, MODS_012, p, hw, t, b=3, seed=p)
        _assert_same(_ours_outputs(ours, data, masks, ts, p), _ref_outputs(ref, data, masks, ts, p, MODS_012),
                     MODS_012)


def test_linear_weight_of_another_size_is_refused():
    tok = tokenization_preset("single_bandset")
    state = _ref_012(tok, linear=True)[0].state_dict()
    key = "encoder.patch_embeddings.per_modality_embeddings.landsat.landsat__0.proj.weight"
    state[key] = state[key][:, :-1]
    with pytest.raises(UserValueError, match="shape mismatch for 'encoder.patch_embeddings.*landsat__0"):
        import_reference_state_dict(_ours(tok), state)


# ---------------------------------------------------------------------------------------------
# February 2026: pos_embed tables


def _with_pos_embed(state: dict, n: int) -> dict:
    state = dict(state)
    for part in ("encoder", "decoder", "target_encoder"):
        state[f"{part}.composite_encodings.pos_embed"] = _pos_embed_table(n)
    return state


def test_pos_embed_tables_are_checked_and_dropped():
    torch.manual_seed(1)
    tok = tokenization_preset("single_bandset")
    ref, _ = _ref_012(tok, linear=False)
    state = _with_pos_embed(ref.state_dict(), 16)
    ref.load_state_dict(state)  # the reference drops them on load too (its pre-hook)
    ours = _ours(tok)
    assert import_reference_state_dict(ours, state) == ["2 pos_embed tables checked and dropped"]
    ref.eval()
    ours.eval()
    data, masks, ts = batch(tok, MODS_012, 2, 3, 3, b=3)
    _assert_same(_ours_outputs(ours, data, masks, ts, 2), _ref_outputs(ref, data, masks, ts, 2, MODS_012), MODS_012)


def test_pos_embed_that_the_model_would_not_compute_is_refused():
    tok = tokenization_preset("single_bandset")
    state = _with_pos_embed(_ref_012(tok, linear=False)[0].state_dict(), 16)
    state["decoder.composite_encodings.pos_embed"] = state["decoder.composite_encodings.pos_embed"] * 1.01
    with pytest.raises(UserValueError, match="decoder.composite_encodings.pos_embed differs"):
        import_reference_state_dict(_ours(tok), state)
    state["decoder.composite_encodings.pos_embed"] = _pos_embed_table(20)
    with pytest.raises(UserValueError, match="pos_embed has shape \\(12, 20\\)"):
        import_reference_state_dict(_ours(tok), state)


# ---------------------------------------------------------------------------------------------
# February 2026: the merge/unmerge modules of exps 9, 10, 12 (recorded fixture)


def _feb_fixture() -> dict:
    with open(FIXTURE) as f:
        return json.load(f)


def _feb_model(name: str) -> LatentMIM:
    preset, after = FEB_CASES[name]
    return _ours(tokenization_preset(preset), FEB_MODS, FEB_DIMS, merge_bandsets=True, merge_after_layer=after)


@pytest.mark.parametrize("name", list(FEB_CASES))
def test_feb_merge_checkpoint_reproduces_the_february_model(name):
    case = _feb_fixture()["cases"][name]
    assert case["tokenization"] == FEB_CASES[name][0] and case["merge_after_layer"] == FEB_CASES[name][1]
    tables = {k: decode_array(v) for k, v in case["tables"].items()}
    state = feb_weights(case["keys"], tables, seed=case["seed"])
    assert any(k.startswith("encoder.bandset_merge_modules.") for k in state)
    assert any(k.startswith("decoder.bandset_unmerge_modules.") for k in state)
    ours = _feb_model(name)
    notes = import_reference_state_dict(ours, state)
    assert notes == ["2 pos_embed tables checked and dropped"]
    merge = ours.encoder.bandset_merge["sentinel2_l2a"].proj[0].weight
    assert torch.equal(merge, state["encoder.bandset_merge_modules.sentinel2_l2a.proj.0.weight"])
    tok = tokenization_preset(FEB_CASES[name][0])
    data, masks, ts = batch(tok, FEB_MODS, **FEB_SHAPE)
    for mode, recorded in case["outputs"].items():
        ours.train(mode == "train")
        got = _ours_outputs(ours, data, masks, ts, FEB_SHAPE["p"])
        _close(got["pooled"], decode_array(recorded["pooled"]), f"{mode}: pooled projection")
        for m in FEB_MODS:
            _close(got["encoded"][m], decode_array(recorded["encoded"][m]), f"{mode}: encoder tokens {m}")
            dec = got["decoded"][m][got["masks"][m] == MaskValue.DECODER]
            _close(dec, decode_array(recorded["decoded_at_decoder_positions"][m]), f"{mode}: decoder output {m}")
            _close(got["target"][m], decode_array(case["target"][m]), f"target {m}")


def test_feb_merge_names_are_the_reference_names():
    """Export writes the February layout (pos_embed aside), and only that layout imports."""
    fixture = _feb_fixture()["cases"]["exp10"]
    ours = _feb_model("exp10")
    exported = export_reference_state_dict(ours)
    recorded = {k: v for k, v in fixture["keys"].items() if not k.endswith(".pos_embed")}
    assert {k: list(v.shape) for k, v in exported.items()} == recorded
    renamed = {k.replace("bandset_merge_modules", "bandset_merge"): v for k, v in exported.items()}
    with pytest.raises(UserKeyError, match="unexpected reference keys \\['encoder.bandset_merge.sentinel2_l2a"):
        import_reference_state_dict(_feb_model("exp10"), renamed)
    again = _feb_model("exp10")
    import_reference_state_dict(again, exported)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))
    assert _to_reference_key("decoder.bandset_unmerge.landsat.proj.bias") == \
        "decoder.bandset_unmerge_modules.landsat.proj.bias"


# ---------------------------------------------------------------------------------------------
# reference checkpoint directories (config.json + weights.pth): eval --checkpoint, --init-from


def _reference_dir(path, tok_name="single_bandset", num_heads=4):
    ref, cfg = _ref_012(tokenization_preset(tok_name), linear=True, num_heads=num_heads)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model": cfg.as_config_dict(), "trainer": {"note": "olmo-core run config"}}, f)
    torch.save(ref.state_dict(), os.path.join(path, "weights.pth"))
    return ref


def test_reference_directory_loads_as_the_reference_model(tmp_path):
    ref = _reference_dir(tmp_path / "ref").eval()
    model, cfg = load_reference(str(tmp_path / "ref"))
    assert cfg.model.dims == (64, 2, 4, 64, 2, 4, 2.0) and cfg.model.modalities == MODS_012
    tok = tokenization_preset("single_bandset")
    data, masks, ts = batch(tok, MODS_012, 4, 2, 2, b=3)
    _assert_same(_ours_outputs(model, data, masks, ts, 4), _ref_outputs(ref, data, masks, ts, 4, MODS_012), MODS_012)
    fresh, _ = load_reference(str(tmp_path / "ref"), random_init=True)
    assert not torch.equal(fresh.decoder.to_output_embed.weight, model.decoder.to_output_embed.weight)


def test_init_from_checks_what_shapes_do_not_show(tmp_path):
    _reference_dir(tmp_path / "ref", num_heads=8)  # the shapes of 4 heads, the attention of 8
    cfg = reference_run_config(json.load(open(tmp_path / "ref" / "config.json"))["model"])
    assert cfg.model.dims == (64, 2, 8, 64, 2, 4, 2.0)
    model = LatentMIM(cfg.model, tokenization_preset("single_bandset"))
    assert "Linear patch embeddings reshaped to Conv2d" in init_from(model, cfg, str(tmp_path / "ref"))
    cfg.model.dims = (64, 2, 4, 64, 2, 4, 2.0)
    with pytest.raises(UserValueError, match="another architecture: model dims \\(64, 2, 8"):
        init_from(LatentMIM(cfg.model, tokenization_preset("single_bandset")), cfg, str(tmp_path / "ref"))
    # a bare weights file has no config: shapes and names still have to match, strictly
    with pytest.raises(UserError, match="sentinel2_l2a"):
        init_from(_ours(tokenization_preset("default")), cfg, str(tmp_path / "ref" / "weights.pth"))


def test_eval_cli_takes_a_reference_directory(tmp_path, capsys):
    from olmoearth_fast.eval import __main__ as cli
    from tests.helpers.eurosat_fixtures import make_eurosat_fixture

    _reference_dir(tmp_path / "ref")
    data = make_eurosat_fixture(tmp_path / "eurosat", "torchgeo", {"train": 4, "valid": 2, "test": 2}, 16, 3)
    cli.main(["knn", "--checkpoint", str(tmp_path / "ref"), "--dataset", str(data), "--k", "3"])
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "custom" and out["num_samples"] == {"train": 12, "valid": 6, "test": 6}
    assert 0 <= out["valid_acc"] <= 1


def test_unsupported_reference_options_are_named():
    _, cfg = _ref_012(tokenization_preset("single_bandset"), linear=True)
    config = cfg.as_config_dict()
    config["encoder_config"]["num_register_tokens"] = 4
    with pytest.raises(UserValueError, match="encoder_config.num_register_tokens=4 is not implemented"):
        reference_run_config(config)


def test_training_starts_from_a_reference_checkpoint(tmp_path, capsys):
    """`--init-from` with a 0.1.2 checkpoint (Linear layout) of exp14's model, through the launcher."""
    from olmoearth_pretrain.config import Config

    from olmoearth_fast import experiments
    from olmoearth_fast.checkpoint import reference_model_config
    from olmoearth_fast.data.demo import ensure_demo_dataset
    from olmoearth_fast.train import main
    from olmoearth_fast.trainer import build_model

    cfg = experiments.resolve("exp14", [], demo_run=True)
    config = reference_model_config(cfg)
    config["encoder_config"]["use_linear_patch_embed"] = True
    torch.manual_seed(3)
    ref = Config.from_dict(config).build()
    with torch.no_grad():  # every tensor distinguishable from a fresh init
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "config.json").write_text(json.dumps({"model": config}))
    torch.save(ref.state_dict(), tmp_path / "ref" / "weights.pth")
    model = build_model(cfg, torch.device("cpu"))
    init_from(model, cfg, str(tmp_path / "ref"))
    assert torch.equal(model.decoder.mask_token, ref.decoder.mask_token)
    assert torch.equal(model.encoder.norm.weight, ref.encoder.norm.weight)
    data = ensure_demo_dataset(tmp_path / "demo_data", num_samples=8, tile_size=32)
    main(["--demo", f"data.dataset={data}", f"checkpoint.dir={tmp_path / 'run'}", "data.num_workers=0",
          "data.global_batch_size=4", "data.rank_microbatch_size=4", "trainer.max_steps=1", "logging.plot=False",
          "--init-from", str(tmp_path / "ref")])
    out = capsys.readouterr().out
    assert f"initialised with weights from {tmp_path / 'ref'} (reference layout; " in out
    assert "Linear patch embeddings reshaped to Conv2d" in out
