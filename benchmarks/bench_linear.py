"""The blocks' Linear layers, forward alone and forward + backward, at the exp14 step's shapes.

Providers:

* ``ours``: `olmoearth_fast.ops.linear`: on CPU in fp32, oneDNN's inner product forward, MKL's
  sgemm for the gradients;
* ``ref``: ``F.linear`` (MKL's sgemm), what the reference's ``nn.Linear`` runs.

The two are timed interleaved, call by call in turn (`bench.paired`): on a shared VM whose
speed drifts by 30% within a minute, separate runs of a few-ms op do not give a ratio.

Rows: the tokens one exp14 microbatch sends through a block at p=4, hw_p=6 (two views): about
8200 (nano, B=16), 4340 (tiny, B=8) and 2050 (base_shallow_decoder, B=4); the fc1 shape
[rows, D] → 4·D. FLOPs: 2·M·K·N forward, three times that forward + backward.
"""

import pytest
import torch
import torch.nn.functional as F

from olmoearth_fast.ops import linear as lin

if torch.cuda.is_available():  # pragma: no cover - CUDA runs F.linear
    pytest.skip("CPU op (CUDA runs F.linear)", allow_module_level=True)

CASES = {"nano": (8192, 128), "tiny": (4340, 192), "base": (2048, 768)}  # rows, D


@pytest.mark.parametrize("size", list(CASES))
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_linear(bench, pass_, size):
    m, d = CASES[size]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, d, generator=g, requires_grad=True)
    w = (torch.randn(4 * d, d, generator=g) / d ** 0.5).requires_grad_()
    b = (0.1 * torch.randn(4 * d, generator=g)).requires_grad_()
    grad = torch.randn(m, 4 * d, generator=g)
    torch.testing.assert_close(lin.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)

    def step(fn):
        def forward():
            with torch.no_grad():
                return fn(x, w, b)

        return forward if pass_ == "fwd" else lambda: torch.autograd.grad(fn(x, w, b), [x, w, b], grad)

    flops = 2.0 * m * d * 4 * d * (1 if pass_ == "fwd" else 3)
    bench.paired({"ours": step(lin.linear), "ref": step(F.linear)}, group=f"Linear {pass_} {size}: [{m}, {d}] -> {4 * d}",
                 rounds=40, warmup=3, flops={"ours": flops, "ref": flops}, uses_kernel=lin.uses_kernel(x))
