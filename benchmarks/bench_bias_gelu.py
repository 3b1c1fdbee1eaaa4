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
per call).
"""

import pytest
import torch
import torch.nn.functional as F

from mlp_shapes import CASES, fc1_inputs
from olmoearth_fast.ops import bias_gelu as bg

if torch.cuda.is_available():  # pragma: no cover - the C++ op is CPU only
    pytest.skip("CPU op (CUDA runs Linear → GELU)", allow_module_level=True)


@pytest.mark.parametrize("size", list(CASES))
@pytest.mark.parametrize("provider", ["ours", "ref"])
def test_fc1_gelu_fwd_bwd(bench, provider, size):
    x, w, b, grad = fc1_inputs(size)
    m, d = x.shape

    def fn():
        if provider == "ours":
            return bg.bias_gelu(F.linear(x, w), b)
        return F.gelu(F.linear(x, w, b))

    torch.testing.assert_close(fn(), F.gelu(F.linear(x, w, b)), rtol=1e-5, atol=1e-5)

    def step():
        return torch.autograd.grad(fn(), [x, w, b], grad)

    median = bench(step, group=f"fc1 + GELU fwd+bwd {size}: [{m}, {d}] -> {4 * d}", provider=provider,
                   flops=6.0 * m * d * 4 * d, uses_kernel=provider == "ours" and bg.uses_kernel(x))
    print(f"{provider} {size}: {median * 1e3:.2f} ms")
