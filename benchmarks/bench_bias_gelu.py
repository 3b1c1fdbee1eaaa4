"""An MLP's fc1 and GELU, forward + backward (input, weight and bias gradients), at the exp14
step's shapes.

Providers:

* ``ours``: what `model.attention.Mlp` runs on CPU: ``x · W1ᵀ`` without its bias (``F.linear``
  here on both sides, so that the two differ only in the bias and GELU), then
  `olmoearth_fast.ops.bias_gelu` (the bias added inside the GELU pass; its backward writes dh and
  sums the bias gradient in one pass);
* ``ref``: ``F.gelu(F.linear(x, W1, b1))``, the reference's ``Mlp`` (the bias in the GEMM, then
  GELU; gelu_backward and a column sum for the bias gradient).

Shapes: fc1's at each size (mlp_shapes.py). FLOPs beside each time are the GEMMs' (6·M·D·4D
per call). The two are timed interleaved, call by call in turn (`bench.paired`): the op saves
a few ms of a ~30 ms call, less than a shared VM drifts between separate runs.
"""

import pytest
import torch
import torch.nn.functional as F

from mlp_shapes import CASES, fc1_inputs
from olmoearth_fast.ops import bias_gelu as bg

if torch.cuda.is_available():  # pragma: no cover - the C++ op is CPU only
    pytest.skip("CPU op (CUDA runs Linear → GELU)", allow_module_level=True)


@pytest.mark.parametrize("size", list(CASES))
def test_fc1_gelu_fwd_bwd(bench, size):
    x, w, b, grad = fc1_inputs(size)
    m, d = x.shape
    fns = {"ours": lambda: bg.bias_gelu(F.linear(x, w), b), "ref": lambda: F.gelu(F.linear(x, w, b))}
    torch.testing.assert_close(fns["ours"](), fns["ref"](), rtol=1e-5, atol=1e-5)

    def step(fn):
        return lambda: torch.autograd.grad(fn(), [x, w, b], grad)

    flops = 6.0 * m * d * 4 * d
    bench.paired({name: step(fn) for name, fn in fns.items()}, group=f"fc1 + GELU fwd+bwd {size}: [{m}, {d}] -> {4 * d}",
                 rounds=30, warmup=3, flops={"ours": flops, "ref": flops}, uses_kernel=bg.uses_kernel(x))
