"""`ops.transpose`: the C++ 2-D transpose equals ``x.t().contiguous()`` bit for bit."""

import pytest
import torch

from olmoearth_fast.ops import transpose as tr

needs_kernel = pytest.mark.skipif(not tr.kernel_available(), reason="CPU without AVX-512F")


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1), (1, 37), (37, 1), (3, 5), (16, 16), (17, 33), (64, 48), (300, 770)])
def test_equals_the_strided_copy(shape):
    x = torch.randn(*shape)
    out = tr.transpose(x)
    assert out.is_contiguous() and torch.equal(out, x.t().contiguous())


@needs_kernel
def test_strided_rows_are_read_in_place():
    big = torch.randn(50, 70)
    x = big[3:, 5:40]  # rows at stride 70, last dim contiguous
    assert tr.uses_kernel(x)
    assert torch.equal(tr.transpose(x), x.t().contiguous())
    assert torch.equal(tr.transpose(torch.empty(0, 5)), torch.empty(5, 0))


def test_other_inputs_take_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(tr, "_ops", type("Ops", (), {"transpose": lambda self, x: calls.append(x)})())
    for x in (torch.randn(8, 6).double(), torch.randn(6, 8).t(), torch.randn(4, 4).int()):
        assert not tr.uses_kernel(x)
        assert torch.equal(tr.transpose(x), x.t().contiguous())
    monkeypatch.setenv("OLMOEARTH_FAST_KERNELS", "pytorch")
    x = torch.randn(8, 6)
    assert not tr.uses_kernel(x) and torch.equal(tr.transpose(x), x.t().contiguous())
    assert calls == []


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match=r"2-D tensor, got shape \(2, 3, 4\)"):
        tr.transpose(torch.zeros(2, 3, 4))
    if tr.kernel_available():
        with pytest.raises(RuntimeError, match="last dim must be contiguous"):
            torch.ops.olmoearth_fast.transpose(torch.zeros(6, 8).t())
