"""A pre-norm block's residual add and the LayerNorm after it, forward + backward, at the exp14
step's shapes.

Providers:

* ``ours``: `olmoearth_fast.ops.residual_norm` (the C++ pass on CPU): the branch output added to
  the residual stream at the rows that kept the branch, times the DropPath factor, and the
  LayerNorm of the rows that keep the next branch, in one pass forward and one backward;
* ``ref``: `residual_norm_ref`, the same with PyTorch ops (what `model.attention.Block` ran
  before: ``index_add`` of the scaled branch, the kept rows' gather, ``F.layer_norm``; the
  backward adds the LayerNorm's input gradient to the stream's).

Shapes: the tokens one exp14 microbatch sends through a block (mlp_shapes.py) at each size;
the DropPath draws of the encoder blocks (rate 0.1: the branch added to 90% of the rows, the
next branch reading another 90%) and the decoder's plain add. ``min_bytes``: the traffic the
fused pass cannot avoid (forward: x, r read, s, y written; backward: ds, dy, s read, dx, dr
written), so GB/s beside each time. Timed interleaved, call by call (`bench.paired`).
"""

import pytest
import torch

from mlp_shapes import CASES
from olmoearth_fast.model.plan import keep_factor
from olmoearth_fast.ops import residual_norm as rn

if torch.cuda.is_available():  # pragma: no cover - the C++ op is CPU only
    pytest.skip("CPU op (CUDA: torch.compile fuses the add and the norm)", allow_module_level=True)


@pytest.mark.parametrize("drop", ["droppath", "plain"])
@pytest.mark.parametrize("size", list(CASES))
def test_residual_norm_fwd_bwd(bench, size, drop):
    t, d = CASES[size]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(t, d, generator=g, requires_grad=True)
    w, b = torch.randn(d, generator=g, requires_grad=True), torch.randn(d, generator=g, requires_grad=True)
    if drop == "droppath":  # samples of ~100 rows, 90% of them keeping each branch
        blocks = torch.arange(t) // 100
        r_rows = torch.nonzero(blocks % 10 != 3).flatten()
        y_rows = torch.nonzero(blocks % 10 != 7).flatten()
        alpha = keep_factor(0.1)
    else:
        r_rows = y_rows = None
        alpha = 1.0
    nr, ny = (t if r_rows is None else len(r_rows)), (t if y_rows is None else len(y_rows))
    r = torch.randn(nr, d, generator=g, requires_grad=True)
    ds, dy = torch.randn(t, d, generator=g), torch.randn(ny, d, generator=g)
    fns = {"ours": rn.residual_norm, "ref": rn.residual_norm_ref}
    outs = {n: f(x, r, w, b, 1e-5, r_rows, alpha, y_rows) for n, f in fns.items()}
    torch.testing.assert_close(outs["ours"], outs["ref"], rtol=1e-5, atol=1e-5)

    def step(fn):
        return lambda: torch.autograd.grad(fn(x, r, w, b, 1e-5, r_rows, alpha, y_rows), [x, r, w, b], [ds, dy])

    moved = 4 * d * ((t + nr + t + ny) + (t + ny + t + t + nr))
    bench.paired({n: step(f) for n, f in fns.items()}, group=f"residual add + LayerNorm fwd+bwd {size} {drop}: "
                 f"[{t}, {d}]", rounds=30, warmup=3, uses_kernel=rn.uses_kernel(x), min_bytes=moved)
