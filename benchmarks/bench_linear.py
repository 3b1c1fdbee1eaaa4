"""The blocks' Linear layers, forward alone and forward + backward, at the exp14 step's shapes.

Providers:

* ``ours``: `olmoearth_fast.ops.linear`'s oneDNN path (forced with
  ``OLMOEARTH_FAST_CPU_LINEAR=onednn``; ``auto`` takes it on AMD CPUs only): oneDNN's inner
  product forward and input gradient (against the weight transposed by `ops.transpose`); the
  weight gradient on MKL's sgemm (nano, tiny), or at base (both weight dims ≥ 512) on oneDNN's
  inner product too, with the operands transposed by `ops.transpose`;
* ``ref``: ``F.linear`` (MKL's sgemm), what the reference's ``nn.Linear`` runs, and what
  ``auto`` runs on other CPUs.

The group name says which of the two ``auto`` picks on this CPU (`ops.linear.backend`).

The two are timed interleaved, call by call in turn (`bench.paired`): on a shared VM whose
speed drifts by 30% within a minute, separate runs of a few-ms op do not give a ratio.

Shapes: fc1's at each size, [rows, D] → 4·D (mlp_shapes.py). FLOPs: 2·M·K·N forward, three
times that forward + backward.
"""

import pytest
import torch
import torch.nn.functional as F

from mlp_shapes import CASES, fc1_inputs
from olmoearth_fast.ops import linear as lin

if torch.cuda.is_available():  # pragma: no cover - CUDA runs F.linear
    pytest.skip("CPU op (CUDA runs F.linear)", allow_module_level=True)


@pytest.mark.parametrize("size", list(CASES))
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_linear(bench, pass_, size, monkeypatch):
    auto = lin.backend()
    monkeypatch.setenv(lin.CPU_LINEAR_ENV, "onednn")
    x, w, b, grad = fc1_inputs(size)
    m, d = x.shape
    torch.testing.assert_close(lin.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)

    def step(fn):
        def forward():
            with torch.no_grad():
                return fn(x, w, b)

        return forward if pass_ == "fwd" else lambda: torch.autograd.grad(fn(x, w, b), [x, w, b], grad)

    flops = 2.0 * m * d * 4 * d * (1 if pass_ == "fwd" else 3)
    bench.paired({"ours": step(lin.linear), "ref": step(F.linear)},
                 group=f"Linear {pass_} {size}: [{m}, {d}] -> {4 * d}, oneDNN path vs MKL (auto here: {auto})",
                 rounds=40, warmup=3, flops={"ours": flops, "ref": flops}, uses_kernel=lin.uses_kernel(x))
