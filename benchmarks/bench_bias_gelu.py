"""An MLP's fc1 and GELU, forward + backward (input, weight and bias gradients), at the exp14
step's shapes.

Providers:

* ``ours``: what `model.attention.Mlp` runs on CPU: ``x · W1ᵀ`` without its bias, then
  `olmoearth_fast.ops.bias_gelu` (the bias added inside the GELU pass; its backward writes dh and
  sums the bias gradient in one pass);
* ``ref``: ``F.gelu(F.linear(x, W1, b1))``, the reference's ``Mlp`` (the bias in the GEMM, then
  GELU; gelu_backward and a column sum for the bias gradient).

Rows: the tokens one exp14 microbatch sends through a block at p=4, hw_p=6 (two views): about
8200 (nano, B=16), 4340 (tiny, B=8) and 2050 (base_shallow_decoder, B=4); hidden = 4·D. FLOPs
beside each time are the GEMMs' (6·M·D·4D per call).
"""

import pytest
import torch
import torch.nn.functional as F

from olmoearth_fast.ops import bias_gelu as bg

if torch.cuda.is_available():  # pragma: no cover - the C++ op is CPU only
    pytest.skip("CPU op (CUDA runs Linear → GELU)", allow_module_level=True)

CASES = {"nano": (8192, 128), "tiny": (4340, 192), "base": (2048, 768)}  # rows, D


@pytest.mark.parametrize("size", list(CASES))
@pytest.mark.parametrize("provider", ["ours", "ref"])
def test_fc1_gelu_fwd_bwd(bench, provider, size):
    m, d = CASES[size]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, d, generator=g, requires_grad=True)
    w = (torch.randn(4 * d, d, generator=g) / d ** 0.5).requires_grad_()
    b = (0.1 * torch.randn(4 * d, generator=g)).requires_grad_()
    grad = torch.randn(m, 4 * d, generator=g)

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
