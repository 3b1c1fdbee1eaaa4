"""Write data/feb_merge.json: three merged-bandset models as the February 2026 code built them.

Needs that code, which olmoearth-pretrain 0.1.2 no longer contains: a checkout of
allenai/olmoearth_pretrain at 95a90af6 (the last commit with `nn/bandset_merge.py`) first on
the path, with this repository installed:

    git -C olmoearth_pretrain archive 95a90af6 olmoearth_pretrain | tar -x -C /tmp/feb
    PYTHONPATH=/tmp/feb python tests/parity/make_feb_fixture.py

For each case of `FEB_CASES` it builds the reference LatentMIM (toy size, bandset merge and
unmerge on), records its state_dict key names and shapes and its fixed tables (pos_embed,
month_embed), loads the seeded weights of `feb_weights`, and records the reference's outputs
on `batch` in eval mode and in train mode (DropPath off).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("ckpt_import", os.path.join(HERE, "test_checkpoint_import.py"))
T = importlib.util.module_from_spec(spec)
spec.loader.exec_module(T)


def build(preset: str, after: int):
    import olmoearth_pretrain
    from olmoearth_pretrain.nn.flexi_vit import EncoderConfig, PredictorConfig
    from olmoearth_pretrain.nn.latent_mim import LatentMIMConfig
    from olmoearth_pretrain.nn.tokenization import ModalityTokenization, TokenizationConfig

    assert os.path.isfile(os.path.join(os.path.dirname(olmoearth_pretrain.__file__), "nn", "bandset_merge.py")), \
        "put a checkout of allenai/olmoearth_pretrain at 95a90af6 first on PYTHONPATH"
    tok = T.tokenization_preset(preset)
    ref_tok = TokenizationConfig(overrides={m: ModalityTokenization(band_groups=[list(g) for g in groups])
                                            for m, groups in tok.overrides.items()})
    d, depth, heads, dd, ddepth, dheads, mlp = T.FEB_DIMS
    enc = EncoderConfig(supported_modality_names=list(T.FEB_MODS), embedding_size=d, num_heads=heads, depth=depth,
                        mlp_ratio=mlp, drop_path=0.0, tokenization_config=ref_tok, merge_bandsets=True,
                        merge_after_layer=after)
    dec = PredictorConfig(supported_modality_names=list(T.FEB_MODS), encoder_embedding_size=d,
                          decoder_embedding_size=dd, depth=ddepth, num_heads=dheads, mlp_ratio=mlp,
                          tokenization_config=ref_tok, unmerge_bandsets=True)
    return LatentMIMConfig(encoder_config=enc, decoder_config=dec).build(), tok


def main() -> None:
    import olmoearth_pretrain

    src = os.path.dirname(os.path.dirname(olmoearth_pretrain.__file__))
    try:
        commit = subprocess.run(["git", "-C", src, "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "95a90af6 (git archive)"
    out = {"source": f"allenai/olmoearth_pretrain {commit}: nn/bandset_merge.py, nn/flexi_vit.py, nn/latent_mim.py",
           "made_by": "tests/parity/make_feb_fixture.py", "cases": {}}
    for name, (preset, after) in T.FEB_CASES.items():
        torch.manual_seed(0)
        ref, tok = build(preset, after)
        state = ref.state_dict()
        keys = {k: list(v.shape) for k, v in state.items()}
        tables = {k: v for k, v in state.items() if k.endswith((".pos_embed", ".month_embed.weight"))}
        ref.load_state_dict(T.feb_weights(keys, tables, seed=0), strict=True)
        data, masks, ts = T.batch(tok, T.FEB_MODS, **T.FEB_SHAPE)
        token_masks = {m: x[:, ::T.FEB_SHAPE["p"], ::T.FEB_SHAPE["p"]] if x.dim() == 5 else x
                       for m, x in masks.items()}  # a token's code is its top-left pixel's
        outputs = {}
        for mode in ("eval", "train"):
            ref.train(mode == "train")
            r = T._ref_outputs(ref, data, masks, ts, T.FEB_SHAPE["p"], T.FEB_MODS)
            # the decoder head at DECODER positions only (the loss reads no other), in mask order
            dec = {m: r["decoded"][m][token_masks[m] == T.MaskValue.DECODER] for m in T.FEB_MODS}
            outputs[mode] = {"pooled": T.encode_array(r["pooled"]),
                             "encoded": {m: T.encode_array(x) for m, x in r["encoded"].items()},
                             "decoded_at_decoder_positions": {m: T.encode_array(x) for m, x in dec.items()}}
        out["cases"][name] = {"tokenization": preset, "merge_after_layer": after, "seed": 0, "keys": keys,
                              "tables": {k: T.encode_array(v) for k, v in tables.items()},
                              "target": {m: T.encode_array(x) for m, x in r["target"].items()},  # mode-free
                              "outputs": outputs}
    path = os.path.join(HERE, "data", "feb_merge.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f)
    print(f"wrote {path} ({os.path.getsize(path) / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
