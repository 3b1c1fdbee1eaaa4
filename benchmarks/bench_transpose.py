"""The 2-D transpose behind the Linear layers' oneDNN gradients (`ops.transpose`).

Providers: ``ours`` (csrc/transpose.cpp: 16×16 blocks through AVX-512 registers) and ``ref``
(``x.t().contiguous()``, PyTorch's strided copy), timed interleaved call by call
(`bench.paired`). Shapes: what base's fc1 transposes for its weight gradient at the exp14 step's
rows (dYᵀ of [2048, 3072], Xᵀ of [2048, 768]), and tiny's widest ([4340, 768]); the weights'
own transposes for the input gradient are a few MB at most. Bytes: the matrix read once and
written once.
"""

import pytest
import torch

from olmoearth_fast.ops import transpose as tr

if not tr.kernel_available():  # pragma: no cover - a CPU without AVX-512F runs the reference
    pytest.skip("CPU without AVX-512F", allow_module_level=True)

SHAPES = {"base dY": (2048, 3072), "base X": (2048, 768), "tiny dY": (4340, 768)}


@pytest.mark.parametrize("name", list(SHAPES))
def test_transpose(bench, name):
    rows, cols = SHAPES[name]
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tr.transpose(x), tr.transpose_ref(x))
    bench.paired({"ours": lambda: tr.transpose(x), "ref": lambda: tr.transpose_ref(x)},
                 group=f"transpose {name} [{rows}, {cols}]", rounds=40, warmup=3, min_bytes=2 * 4 * rows * cols)
