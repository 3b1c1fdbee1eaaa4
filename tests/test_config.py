"""Experiments, config tree, dotted overrides, --dry-run."""

import json

import pytest

from olmoearth_fast import experiments
from olmoearth_fast.config import RunConfig, apply_overrides, dumps, from_dict, to_dict
from olmoearth_fast.modalities import ONLY_DECODE_MODALITIES
from olmoearth_fast.train import main


@pytest.mark.parametrize("name", list(experiments.EXPERIMENTS))
def test_every_experiment_dry_run(name, capsys):
    main([name, "--dry-run"])
    printed = json.loads(capsys.readouterr().out)
    cfg = experiments.get(name)
    assert printed == to_dict(cfg)
    assert from_dict(printed) == cfg  # JSON round trip


def test_base_settings_match_reference():
    cfg = experiments.get("exp14")
    assert cfg.model.size == "base_shallow_decoder" and cfg.model.drop_path == 0.1
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.max_grad_norm) == (1e-4, 0.02, 1.0)
    assert (cfg.schedule.warmup_steps, cfg.schedule.alpha_f * cfg.optim.lr) == (8000, pytest.approx(1e-5))
    assert (cfg.data.global_batch_size, cfg.data.rank_microbatch_size, cfg.data.num_views) == (512, 32, 2)
    assert cfg.data.token_budget == 2250 and cfg.data.patch_sizes == tuple(range(1, 9))
    assert cfg.data.hw_p_list == tuple(range(1, 13)) and cfg.trainer.epochs == 300
    assert cfg.masking.name == "modality_cross_random" and cfg.masking.allow_encoding_decoding_same_bandset
    assert cfg.masking.only_decode_modalities == ONLY_DECODE_MODALITIES
    assert cfg.loss.mask_negatives_for_modalities == ONLY_DECODE_MODALITIES
    assert (cfg.loss.infonce_weight, cfg.loss.tau) == (0.1, 0.1)
    assert (cfg.model.band_dropout_rate, cfg.model.random_band_dropout) == (0.3, True)


def test_experiment_differences():
    e = experiments.get
    assert e("exp1").model.band_dropout_rate == 0.0 and e("exp1").data.tokenization == "single_bandset"
    assert e("exp2").masking.name == "random_with_decode"
    assert e("exp3").data.tokenization == "single_bandset_no60m"
    assert e("exp4").data.tokenization == "single_bandset_10m_only"
    assert (e("exp5").model.band_dropout_rate, e("exp5").model.random_band_dropout) == (0.3, False)
    assert e("exp6").model.band_dropout_rate == 0.5
    assert "era5_10" in e("exp7").model.modalities and "era5_10" in e("exp7").loss.mask_negatives_for_modalities
    assert e("exp7").masking.name == "random_with_decode" and "era5_10" in e("exp7").masking.only_decode_modalities
    assert e("exp8").data.tokenization == "two_bandset"
    assert (e("exp9").model.merge_bandsets, e("exp9").model.merge_after_layer, e("exp9").data.tokenization) == \
        (True, -1, "default")
    assert (e("exp10").model.merge_after_layer, e("exp12").model.merge_after_layer) == (3, 3)
    assert e("exp11").data.tokenization == "default_explicit" and not e("exp11").model.merge_bandsets
    assert e("exp12").data.tokenization == "two_bandset"
    assert e("exp13").data.tokenization == "single_bandset_no60m" and e("exp13").model.random_band_dropout


def test_lookup_by_number_and_reference_key():
    key = "single_bandset_all12_random_band_dropout_cross_random_masked_neg"
    assert experiments.get("14") == experiments.get("exp14") == experiments.get(key)
    assert experiments.get("single_bandset_band_dropout_0.3_cross_random_masked_neg").name == \
        experiments.get("exp5").name
    # exp 13 under the script's key and under its README's
    assert experiments.get("single_bandset_random_band_dropout_cross_random_masked_neg") == \
        experiments.get("single_bandset_no60m_random_band_dropout_cross_random_masked_neg") == experiments.get("13")
    with pytest.raises(KeyError, match="valid: exp1"):
        experiments.get("exp99")


def test_overrides_typed():
    cfg = apply_overrides(RunConfig(), ["data.global_batch_size=64", "--optim.lr=3e-4", "model.size=nano",
                                        "data.patch_sizes=[2,4]", "optim.fused=None", "model.dims=None",
                                        "data.tokenization=default", "optim.weight_decay=0"])
    assert cfg.data.global_batch_size == 64 and cfg.optim.lr == 3e-4 and cfg.model.size == "nano"
    assert cfg.data.patch_sizes == (2, 4) and cfg.optim.fused is None and cfg.optim.weight_decay == 0.0
    assert isinstance(cfg.optim.weight_decay, float)
    assert RunConfig().data.global_batch_size == 512  # defaults untouched


def test_unknown_key_lists_closest():
    with pytest.raises(KeyError, match=r"closest: data.global_batch_size"):
        apply_overrides(RunConfig(), ["data.global_batch_sise=64"])


@pytest.mark.parametrize("item, key", [("data.global_batch_size=big", "data.global_batch_size"),
                                        ("optim.lr=[1]", "optim.lr"),
                                        ("model.drop_path=True", "model.drop_path"),
                                        ("data.patch_sizes=3", "data.patch_sizes")])
def test_wrong_type_names_the_key(item, key):
    with pytest.raises(TypeError, match=key):
        apply_overrides(RunConfig(), [item])


def test_malformed_override():
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(RunConfig(), ["data.global_batch_size"])


def test_dry_run_applies_overrides(capsys):
    main(["exp1", "--dry-run", "model.size=tiny", "--data.num_workers=0"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["size"] == "tiny" and printed["data"]["num_workers"] == 0
    assert dumps(from_dict(printed)) == json.dumps(printed, indent=2)
