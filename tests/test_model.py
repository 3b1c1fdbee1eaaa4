"""Model pieces: varlen attention, DropPath, band dropout, bandset merge/unmerge, sizes."""

import pytest
import torch
import torch.nn.functional as F

from olmoearth_fast.modalities import MODALITIES, MaskValue, tokenization_preset
from olmoearth_fast.model.attention import Attention, Segments, drop_path
from olmoearth_fast.model.bandset_merge import BandsetMerge, BandsetUnmerge, merged_mask
from olmoearth_fast.model.decoder import gather_targets
from olmoearth_fast.model.latent_mim import MODEL_SIZES, LatentMIM, ModelConfig
from olmoearth_fast.model.plan import PackPlan

MODS = ("sentinel2_l2a", "sentinel1", "landsat", "worldcover")


def _segments(lengths):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return Segments.from_cu_seqlens(cu, int(cu[-1]), max(lengths))


@pytest.mark.parametrize("lengths", [[5, 1, 7], [3], [4, 0, 2], [1, 1]])
def test_varlen_attention_equals_per_sample_attention(lengths):
    attn = Attention(16, 4)
    seg = _segments(lengths)
    x = torch.randn(sum(lengths), 16, requires_grad=True)
    out = attn(x, seg)
    ref = []
    for i, n in enumerate(lengths):
        if n == 0:
            continue
        xi = x[int(seg.cu_seqlens[i]):int(seg.cu_seqlens[i + 1])]
        q, k, v = (lin(xi).unflatten(-1, (4, -1)).transpose(0, 1) for lin in (attn.q, attn.k, attn.v))
        ref.append(attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(0, 1).flatten(-2)))
    torch.testing.assert_close(out, torch.cat(ref))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_cross_attention_segments_differ():
    attn = Attention(8, 2)
    q_seg, k_seg = _segments([2, 3]), _segments([4, 1])
    q, y = torch.randn(5, 8), torch.randn(5, 8)
    out = attn(q, q_seg, y, k_seg)
    # sample 1's queries see only sample 1's single key: softmax weight 1 on it
    v1 = attn.v(y[4:5])
    torch.testing.assert_close(out[2:], attn.proj(v1).expand(3, -1))


def test_drop_path_is_per_sample():
    seg = _segments([50, 50, 50, 50, 50, 50, 50, 50])
    x = torch.ones(400, 3)
    torch.manual_seed(1)
    y = drop_path(x, seg, 0.5, training=True)
    per_sample = y.view(8, 50, 3)
    for s in per_sample:
        assert torch.all(s == s[0, 0]) and s[0, 0].item() in (0.0, 2.0)
    assert torch.equal(drop_path(x, seg, 0.5, training=False), x)


@pytest.mark.parametrize("keep", [[1, 0, 1, 0, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 0, 1, 0, 0]])
def test_host_drawn_drop_path_skips_dropped_samples_with_the_same_result(keep):
    """A block given host DropPath draws (`BranchDrop`) runs each branch on the kept samples' rows
    only, and gives what the per-sample multiply gives: values and every parameter's gradient
    (zero, not None, for a branch no sample keeps). One sample has no tokens."""
    from olmoearth_fast.model.attention import Block
    from olmoearth_fast.model.plan import BranchDrop

    torch.manual_seed(0)
    blk = Block(32, 2, 2.0, drop_path=0.5).train()
    seg = _segments([5, 0, 7, 3, 4])
    seg.host()
    x = torch.randn(19, 32, requires_grad=True)
    g = torch.randn(19, 32)
    keep_t = torch.tensor(keep, dtype=torch.bool)
    skipping = (BranchDrop.from_keep(seg, keep_t, 0.5), BranchDrop.from_keep(seg, ~keep_t, 0.5))
    multiply = tuple(BranchDrop(d.keep, d.rate) for d in skipping)  # rows None: the multiply path
    assert (skipping[0].rows is not None) == (0 < sum(keep) < 5)
    out = {}
    for name, drops in (("skip", skipping), ("mul", multiply)):
        y = blk(x, seg, drops=drops)
        grads = torch.autograd.grad(y, [x, *blk.parameters()], g)
        out[name] = (y, grads)
    torch.testing.assert_close(out["skip"][0], out["mul"][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(out["skip"][1], out["mul"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the multiply path is the in-forward DropPath given the same draws (attention's, then the MLP's)
    torch.manual_seed(7)
    draws = [torch.rand(5) < 0.5 for _ in range(2)]
    torch.manual_seed(7)
    want = blk(x, seg)
    got = blk(x, seg, drops=tuple(BranchDrop.from_keep(seg, k, 0.5) for k in draws))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_host_drawn_drop_path_skips_in_compiled_blocks():
    """A compiled block (`trainer.compile`, dynamic shapes) skips the dropped samples' branches as
    the eager one does: the same values and gradients as the eager multiply path, for draws that
    keep different numbers of samples and rows, without building a graph per draw."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from olmoearth_fast.model.attention import Block
    from olmoearth_fast.model.plan import BranchDrop

    torch._dynamo.reset()
    torch.manual_seed(0)
    blk = Block(32, 2, 2.0, drop_path=0.5).train()
    compiled = torch.compile(blk, dynamic=True)
    seg = _segments([5, 0, 7, 3, 4, 6])
    seg.host()
    x = torch.randn(25, 32, requires_grad=True)
    g = torch.randn(25, 32)
    graphs = []
    for keep in ([1, 0, 1, 0, 1, 1], [0, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 1], [0, 0, 1, 1, 1, 0]):
        keep_t = torch.tensor(keep, dtype=torch.bool)
        skipping = (BranchDrop.from_keep(seg, keep_t, 0.5), BranchDrop.from_keep(seg, ~keep_t, 0.5))
        assert all(d.rows is not None for d in skipping)
        multiply = tuple(BranchDrop(d.keep, d.rate) for d in skipping)
        y = compiled(x, seg, drops=skipping)
        got = torch.autograd.grad(y, [x, *blk.parameters()], g)
        want_y = blk(x, seg, drops=multiply)
        want = torch.autograd.grad(want_y, [x, *blk.parameters()], g)
        torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[-1] - graphs[1] == 0, graphs  # the graphs of the first draws serve the later ones
    # and the compiled graph does skip: the kept rows' branch is added back with index_add
    # (the multiply path has none)
    captured = []

    def recording(gm, example_inputs):
        captured.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(blk, backend=recording, dynamic=True)(x, seg, drops=skipping)
    assert any("index_add" in code for code in captured)


def test_host_drawn_drop_path_under_autocast():
    """Under bf16 autocast (the GPU recipe; CPU autocast here) the branch outputs are bf16 and the
    residual stream fp32: the skipping path adds them back in the residual's dtype, with the
    factor's product rounded once in the branch's dtype as the in-forward DropPath rounds it."""
    from olmoearth_fast.model.attention import Block
    from olmoearth_fast.model.plan import BranchDrop

    torch.manual_seed(0)
    blk = Block(32, 2, 2.0, drop_path=0.1).train()
    seg = _segments([5, 6, 7])
    seg.host()
    x = torch.randn(18, 32)
    keep = torch.tensor([True, False, True])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = blk(x, seg, drops=(BranchDrop.from_keep(seg, keep, 0.1), BranchDrop.from_keep(seg, ~keep, 0.1)))
        want = blk(x, seg, drops=(BranchDrop(keep, 0.1), BranchDrop(~keep, 0.1)))
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_merged_mask_rule():
    m = torch.tensor([[0, 2, 3], [2, 1, 3], [3, 3, 3], [1, 2, 1]])
    assert merged_mask(m).flatten().tolist() == [0, 1, 3, 1]


@pytest.mark.parametrize("s", [2, 3])
def test_bandset_merge_matches_dense_reference(s):
    merge = BandsetMerge(8, s)
    tokens = torch.randn(3, 4, 2, s, 8)
    mask = torch.randint(0, 4, (3, 4, 2, s))
    out, mk = merge(tokens, mask)
    ref, mk_ref = merge.forward_ref(tokens, mask)
    torch.testing.assert_close(out, ref)
    assert torch.equal(mk, mk_ref) and out.shape == (3, 4, 2, 1, 8) and mk.shape == (3, 4, 2, 1)


def test_bandset_merge_mean_pool_weights_give_the_mean():
    s, d = 3, 6
    merge = BandsetMerge(d, s)
    with torch.no_grad():  # the "intended" mean-pool init: block-diagonal I/S, then GELU-free identity path
        merge.proj[0].weight.copy_(torch.cat([torch.eye(d) / s] * s, dim=1))
        merge.proj[0].bias.zero_()
    merge.proj[1] = torch.nn.Identity()
    merge.proj[2] = torch.nn.Identity()
    tokens = torch.randn(2, 5, s, d)
    mask = torch.zeros(2, 5, s, dtype=torch.long)  # every bandset encoded
    out, mk = merge(tokens, mask)
    torch.testing.assert_close(out.squeeze(-2), tokens.mean(-2))
    assert torch.all(mk == MaskValue.ONLINE_ENCODER)


def test_bandset_unmerge_shape():
    un = BandsetUnmerge(8, 3)
    assert un(torch.randn(2, 4, 1, 8)).shape == (2, 4, 3, 8)


def _batch(tok, p=2, hw=3, t=2, b=2):
    from olmoearth_fast.modalities import MODALITIES

    data, masks = {}, {}
    for m in MODS:
        spec = MODALITIES[m]
        tt = t if spec.is_multitemporal else 1
        data[m] = torch.randn(b, hw * p, hw * p, tt, spec.num_bands)
        codes = torch.randint(0, 3, (b, hw, hw, tt, tok.num_bandsets(m)))
        codes[:, 0, 0, 0, 0] = MaskValue.ONLINE_ENCODER
        codes[:, 0, 1, 0, 0] = MaskValue.DECODER
        masks[m] = codes.repeat_interleave(p, 1).repeat_interleave(p, 2)
    ts = torch.stack([torch.ones(b, t), torch.randint(0, 12, (b, t)), torch.full((b, t), 2020)], -1).long()
    return data, masks, ts


@pytest.mark.parametrize("merge_after", [-1, 0])
def test_merged_model_forward_backward(merge_after):
    tok = tokenization_preset("default")
    model = LatentMIM(ModelConfig(dims=(32, 2, 2, 32, 1, 2, 2.0), modalities=MODS, merge_bandsets=True,
                                  merge_after_layer=merge_after), tok)
    data, masks, ts = _batch(tok)
    layout = model.layout(data, 2)
    mk = layout.token_masks(masks)
    out = model(data, ts, mk, layout)
    # the encoder ran on the merged layout (one token per S2 / Landsat position) ...
    assert out.encoded.layout.segment("sentinel2_l2a").bs == 1 and out.encoded.layout.segment("landsat").bs == 1
    # ... and the decoder predicts every DECODER token of the original per-bandset layout
    assert out.decoded.tokens.shape[0] == int((mk == MaskValue.DECODER).sum())
    (out.decoded.tokens.square().mean() + out.pooled.square().mean()).backward()
    for name in ("encoder.bandset_merge.sentinel2_l2a.proj.0.weight", "decoder.bandset_unmerge.landsat.proj.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name


def test_band_dropout_only_online_and_training():
    tok = tokenization_preset("single_bandset")
    model = LatentMIM(ModelConfig(dims=(32, 1, 2, 32, 1, 2, 2.0), modalities=MODS, band_dropout_rate=0.9), tok)
    data, masks, ts = _batch(tok)
    layout = model.layout(data, 2)
    model.train()
    a = model.patch_embeddings(data, 2)["sentinel2_l2a"]
    b = model.patch_embeddings(data, 2)["sentinel2_l2a"]
    assert not torch.equal(a, b)  # fresh draws per call
    target = model.target(data, layout)
    assert torch.equal(target, model.target(data, layout))  # the target never drops bands
    model.eval()
    assert torch.equal(model.patch_embeddings(data, 2)["sentinel2_l2a"], model.patch_embeddings(data, 2)["sentinel2_l2a"])
    assert torch.equal(layout.flatten(model.patch_embeddings(data, 2)), target)  # step 0: same weights
    assert all(not p.requires_grad for p in model.target_patch_embeddings.parameters())


def test_forward_with_target_equals_target():
    """The target computed in the forward's patch-embedding pass (at the decoded positions only)
    is the frozen projection `target()` computes there, and it takes no gradient."""
    tok = tokenization_preset("single_bandset")
    model = LatentMIM(ModelConfig(dims=(32, 1, 2, 32, 1, 2, 2.0), modalities=MODS, band_dropout_rate=0.5), tok)
    data, masks, ts = _batch(tok)
    layout = model.layout(data, 2)
    with torch.no_grad():  # perturb the online weights: target and online must not be confused
        for prm in model.patch_embeddings.parameters():
            prm.add_(0.1)
    model.train()
    codes = torch.cat([layout.token_masks(masks)] * 2)
    out = model(data, ts, codes, layout, with_target=True)
    want = gather_targets(model.target(data, layout), out.decoded.index, layout.batch)
    assert out.target.shape == out.decoded.tokens.shape
    torch.testing.assert_close(out.target, want, rtol=1e-5, atol=1e-5)
    assert not out.target.requires_grad
    assert model(data, ts, codes, layout).target is None


@pytest.mark.parametrize("preset,p", [("single_bandset", 2), ("single_bandset", 8), ("default", 4)])
def test_packed_patch_embedding_equals_full_at_its_positions(preset, p):
    """`MultiModalPatchEmbeddings.packed` (only the tokens a step reads) equals the embedding of
    every position packed afterwards: the same band-dropout draws, values, weight gradients;
    the target rows equal the full target at the DECODER positions. Spatial and time-only
    (era5_10) modalities, one and several bandsets."""
    tok = tokenization_preset(preset)
    mods = MODS + ("era5_10",)
    model = LatentMIM(ModelConfig(dims=(32, 1, 2, 32, 1, 2, 2.0), modalities=mods, band_dropout_rate=0.5,
                                  random_band_dropout=True), tok)
    data, masks, ts = _batch(tok, p=p)
    data["era5_10"] = torch.randn(2, 2, MODALITIES["era5_10"].num_bands)
    masks["era5_10"] = torch.randint(0, 3, (2, 2, tok.num_bandsets("era5_10")))
    layout = model.layout(data, p)
    masks_b = {m: v.flip(0) for m, v in masks.items()}  # a second view
    codes = torch.cat([layout.token_masks(masks), layout.token_masks(masks_b)])
    online = PackPlan.build(codes == MaskValue.ONLINE_ENCODER, layout)
    decoder = PackPlan.build(codes == MaskValue.DECODER, layout)
    model.train()
    torch.manual_seed(3)
    full, full_target = model.patch_embeddings(data, p, num_views=2, target=model.target_patch_embeddings)
    want = layout.flatten(full).flatten(0, 1)[online.index]
    want_target = gather_targets(layout.flatten(full_target), decoder.index, layout.batch)
    torch.manual_seed(3)
    got, got_target = model.patch_embeddings.packed(data, p, online.rows, 2, model.target_patch_embeddings,
                                                    decoder.rows)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_target, want_target, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(got)
    params = list(model.patch_embeddings.parameters())
    grads_want = torch.autograd.grad(want, params, g, allow_unused=True)
    grads_got = torch.autograd.grad(got, params, g, allow_unused=True)
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_two_views_one_pass_matches_separate_passes():
    tok = tokenization_preset("single_bandset")
    model = LatentMIM(ModelConfig(dims=(32, 2, 2, 32, 1, 2, 2.0), modalities=MODS), tok).eval()
    model.encoder.eval_attend_padding = False  # per-sample attention: views must not interact
    data, masks_a, ts = _batch(tok)
    _, masks_b, _ = _batch(tok)
    layout = model.layout(data, 2)
    ma, mb = layout.token_masks(masks_a), layout.token_masks(masks_b)
    both = model(data, ts, torch.cat([ma, mb]), layout)
    sep = [model(data, ts, m, layout) for m in (ma, mb)]
    torch.testing.assert_close(both.pooled, torch.cat([s.pooled for s in sep]))
    torch.testing.assert_close(both.decoded.tokens, torch.cat([s.decoded.tokens for s in sep]))


@pytest.mark.parametrize("size", ["nano", "tiny"])
def test_sizes_build_and_run(size):
    tok = tokenization_preset("single_bandset")
    model = LatentMIM(ModelConfig(size=size, modalities=MODS), tok)
    d = MODEL_SIZES[size][0]
    data, masks, ts = _batch(tok, b=1)
    layout = model.layout(data, 2)
    out = model(data, ts, layout.token_masks(masks), layout)
    assert out.pooled.shape == (1, d) and out.decoded.tokens.shape[-1] == d


def test_unknown_size_error_lists_valid():
    with pytest.raises(ValueError, match="valid sizes: nano"):
        LatentMIM(ModelConfig(size="huge", modalities=MODS), tokenization_preset("default"))



def test_encode_marks_missing_tokens():
    from olmoearth_fast.model.encoder import mean_pool

    tok = tokenization_preset("single_bandset")
    model = LatentMIM(ModelConfig(dims=(32, 1, 2, 32, 1, 2, 2.0), modalities=MODS), tok).eval()
    data, _, ts = _batch(tok, p=2, hw=3)
    data["sentinel1"][0, :2, :2, 0, 1] = -99999  # top-left pixel of token (0, 0, t=0), one band
    tokens, pooled = model.encode(data, ts, 2)
    layout = model.layout(data, 2)
    n_tokens = layout.seqlen * 2
    assert tokens.tokens.shape[0] == n_tokens - 1  # everything ONLINE except the missing token
    assert pooled.shape == (2, 32) and mean_pool(tokens).shape == (2, 32)


@pytest.mark.parametrize("lengths", [[5, 1, 7], [4, 0, 2], [3, 3, 3]])
def test_padded_attention_backend_matches_segment_backend(lengths):
    # the CUDA fallback (padded + key mask) and the CPU backend (per segment) agree
    from olmoearth_fast.model.attention import _padded_sdpa
    from olmoearth_fast.ops.segment_attention import segment_attention

    seg = _segments(lengths)
    k_seg = _segments([2, 0, 4])
    q = torch.randn(sum(lengths), 2, 16)
    kv = torch.randn(6, 2, 16)
    torch.testing.assert_close(_padded_sdpa(q, q, q, seg, seg), segment_attention(q, q, q, seg.host(), seg.host()))
    out = segment_attention(q, kv, kv, seg.host(), k_seg.host())
    torch.testing.assert_close(out[lengths[0]:lengths[0] + lengths[1]], torch.zeros(lengths[1], 2, 16))
    ref = _padded_sdpa(q, kv, kv, seg, k_seg)
    rows = [i for i in range(sum(lengths)) if not lengths[0] <= i < lengths[0] + lengths[1]]
    torch.testing.assert_close(out[rows], ref[rows])


@pytest.mark.parametrize("preset,dim", [("single_bandset", 32), ("default", 34)])
def test_encodings_from_kept_tables_equal_built_ones(preset, dim):
    """`CompositeEncodings.forward` (the layout's parameter-free tables made once and kept)
    gives `forward_ref`'s values bit for bit, at a subset of positions and for all of them,
    with spatial, multitemporal and time-only (ERA5) modalities, several bandsets, and a width
    whose slots leave dims at zero (34 = 4·8 + 2); the channel tables' gradients agree; a second
    call with the same layout makes no new table."""
    from olmoearth_fast.model.encodings import CompositeEncodings, fixed_tables
    from olmoearth_fast.model.layout import TokenLayout
    from olmoearth_fast.perf import count_operators

    tok = tokenization_preset(preset)
    mods = (*MODS, "era5_10")
    enc = CompositeEncodings(dim, {m: tok.num_bandsets(m) for m in mods})
    with torch.no_grad():
        for p in enc.per_modality_channel_embeddings.values():
            p.normal_()
    data, _, ts = _batch(tok, p=2, hw=3, t=3, b=2)
    data["era5_10"] = torch.randn(2, 3, MODALITIES["era5_10"].num_bands)
    layout = TokenLayout.build(data, 2, tok)
    assert {s.modality for s in layout.segments} == set(mods)
    positions = torch.randperm(2 * layout.seqlen)[:40]
    fixed_tables.cache_clear()
    for pos in (positions, None):
        got, want = enc(layout, ts, 2, positions=pos), enc.forward_ref(layout, ts, 2, positions=pos)
        assert got.shape == want.shape and torch.equal(got, want)
        w, chans = torch.randn_like(want), list(enc.per_modality_channel_embeddings.values())
        grads = [torch.autograd.grad((out * w).sum(), chans) for out in (got, want)]
        for g, r in zip(*grads):
            torch.testing.assert_close(g, r)
    info = fixed_tables.cache_info()
    assert info.misses == 1 and info.hits == 1

    # operators that compute (on a GPU, each a kernel launch), against building the tables per call
    assert count_operators(enc, layout, ts, 2, positions=positions) <= 16
    assert count_operators(enc.forward_ref, layout, ts, 2, positions=positions) > 100  # 5 modalities
