"""Pack + unpack of encoder tokens: olmoearth_fast._C vs the reference encoder's path.

Reference (olmoearth_pretrain ``Encoder.remove_masked_tokens`` / ``add_removed_tokens``): stable
sort by keep flag, gather, zero the tail, truncate to the longest row (host sync), and on the way
back a boolean-index put plus a scatter. Ours: one index pass (cumsum), one row gather, one row
scatter. ``naive_torch`` is the plain-PyTorch nonzero-and-index pack, for scale.

Shapes: B=32 samples, N=1152 tokens (hw_p=8, T=4 single-bandset, docs/reference_semantics.md
§9.4), D=768, keep ratio 0.25 and 0.5 (the encoder keeps roughly 15–50%).
"""

import pytest
import torch

from olmoearth_fast.ops import packing as P

B, N, D = 32, 1152, 768
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def _reference_encoder():
    ref = pytest.importorskip("olmoearth_pretrain.nn.flexi_vit")
    return ref.Encoder


def _inputs(ratio, copies):
    # rotate several input sets so GPU timings are not served from L2 (each x is 56 MB in bf16)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(B, N, D, generator=gen).to(DEVICE, DTYPE) for _ in range(copies)]
    keeps = [(torch.rand(B, N, generator=gen) < ratio).to(DEVICE) for _ in range(copies)]
    return xs, keeps


def _ours(x, keep):
    packed, _, idx, _ = P.pack(x, keep)
    return P.unpack(packed, idx, B, N)


def _naive(x, keep):
    flat = keep.flatten()
    packed = x.flatten(0, 1)[flat]
    out = x.new_zeros(B * N, D)
    out[flat] = packed
    return out.view(B, N, D)


def _ref(x, keep):
    enc = _reference_encoder()
    tokens, indices, new_mask, _, _ = enc.remove_masked_tokens(x, keep)
    out, _ = enc.add_removed_tokens(tokens, indices, new_mask)
    return out


PROVIDERS = {"ours": _ours, "ref": _ref, "naive_torch": _naive}


@pytest.mark.parametrize("ratio", [0.25, 0.5])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_pack_unpack(bench, provider, ratio):
    fn = PROVIDERS[provider]
    xs, keeps = _inputs(ratio, copies=4 if DEVICE == "cuda" else 2)
    # same result as the reference before timing anything
    expected = _ref(xs[0], keeps[0])
    torch.testing.assert_close(fn(xs[0], keeps[0]), expected, rtol=0, atol=0)
    state = {"i": 0}

    def step():
        i = state["i"] = (state["i"] + 1) % len(xs)
        return fn(xs[i], keeps[i])

    # bytes moved: pack reads + writes r·BND, unpack reads r·BND and writes all BND (zeros included)
    moved = (3 * ratio + 1) * B * N * D * xs[0].element_size()
    median = bench(step, group=f"pack+unpack B={B} N={N} D={D} keep={ratio} {str(DTYPE)[6:]}",
                   provider=provider, gbytes_moved=moved / 1e9, B=B, N=N, D=D, keep_ratio=ratio, dtype=str(DTYPE))
    print(f"{provider}: {median * 1e3:.3f} ms, {moved / median / 1e9:.1f} GB/s")
