"""Self-attention of one encoder layer, forward + backward, over a batch of variable-length samples.

Providers:

* ``ours``: `olmoearth_fast.ops.segment_attention` on the packed tokens (CPU: the C++ op over
  every segment and head; cost Σ len²).
* ``sdpa_per_segment``: its reference, PyTorch's SDPA (the CPU flash kernel) once per sample,
  what ours ran before the C++ op.
* ``ref``: the reference's own computation (olmoearth_pretrain ``Attention.sdpa``): every
  sample padded to the longest, a key-padding mask repeated to ``[B, H, L, L]``, one SDPA call
  (cost B·L², plus the mask).

Shapes: the exp14 encoder at nano (H=8, head dim 16, 32 samples: 16 × two views) and tiny (H=3,
head dim 64, 16 samples), lengths drawn uniformly from 90-470 (what the demo loader's masks give
at p=4, hw_p=6). CPU only: on CUDA the model runs PyTorch's varlen flash kernel.
"""

import itertools

import pytest
import torch

from olmoearth_fast.ops import segment_attention as sa

if torch.cuda.is_available():  # pragma: no cover - the CPU op has no CUDA path
    pytest.skip("CPU op (CUDA runs torch's varlen flash attention)", allow_module_level=True)

SHAPES = {"nano": (32, 8, 16), "tiny": (16, 3, 64)}  # samples, heads, head dim


def _case(size: str):
    b, h, d = SHAPES[size]
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(90, 471, (b,), generator=g).tolist()
    cu = [0, *itertools.accumulate(lengths)]
    q, k, v = (torch.randn(cu[-1], h, d, generator=g, requires_grad=True) for _ in range(3))
    return lengths, cu, q, k, v, torch.randn(cu[-1], h, d, generator=g)


def _padded_reference(lengths, q, k, v):
    """The reference's attention on the padded batch (its Attention.sdpa, key-padding mask)."""
    ref = pytest.importorskip("olmoearth_pretrain.nn.attention")
    b, h, d, n = len(lengths), q.shape[1], q.shape[2], max(lengths)
    attn = ref.Attention(dim=h * d, num_heads=h)
    pad = torch.zeros(b, n, dtype=torch.long)
    valid = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    rows = torch.cat([torch.arange(s, s + m) for s, m in zip([0, *itertools.accumulate(lengths)], lengths)])
    pad[valid] = rows
    qp, kp, vp = (t[pad].masked_fill(~valid[..., None, None], 0).transpose(1, 2) for t in (q, k, v))
    out = attn.sdpa(qp, kp, vp, n, attn_mask=valid)  # [B, H, L, d]
    return out.transpose(1, 2)[valid]


@pytest.mark.parametrize("size", list(SHAPES))
@pytest.mark.parametrize("provider", ["ours", "sdpa_per_segment", "ref"])
def test_attention_fwd_bwd(bench, provider, size):
    lengths, cu, q, k, v, grad = _case(size)
    fns = {"ours": lambda: sa.segment_attention(q, k, v, cu, cu),
           "sdpa_per_segment": lambda: sa.segment_attention_ref(q, k, v, cu, cu),
           "ref": lambda: _padded_reference(lengths, q, k, v)}
    fn = fns[provider]
    torch.testing.assert_close(fn(), sa.segment_attention_ref(q, k, v, cu, cu), rtol=1e-4, atol=1e-5)

    def step():
        return torch.autograd.grad(fn(), [q, k, v], grad)

    b, h, d = SHAPES[size]
    pairs = sum(n * n for n in lengths) if provider != "ref" else b * max(lengths) ** 2
    median = bench(step, group=f"attention fwd+bwd {size}: B={b} H={h} d={d} lengths 90-470", provider=provider,
                   flops=12.0 * pairs * h * d, uses_kernel=provider == "ours" and sa.uses_kernel(q))
    print(f"{provider} {size}: {median * 1e3:.1f} ms")
