"""ops.bias_gelu: the C++ bias + GELU pass equals F.gelu(h + bias), values and gradients, and the
MLP that uses it equals PyTorch's Linear → GELU → Linear."""

import pytest
import torch
import torch.nn.functional as F

from olmoearth_fast.model.attention import Mlp
from olmoearth_fast.ops import bias_gelu as bg

needs_kernel = pytest.mark.skipif(not bg.kernel_available(), reason="this CPU has no AVX-512F")


@pytest.fixture(autouse=True)
def _auto_kernels(monkeypatch):
    monkeypatch.delenv("OLMOEARTH_FAST_KERNELS", raising=False)


@needs_kernel
@pytest.mark.parametrize("shape", [(37, 768), (5, 3, 50), (1, 17), (130, 16)])
def test_values_and_gradients_equal_pytorch(shape):
    g = torch.Generator().manual_seed(0)
    h = (3 * torch.randn(*shape, generator=g)).requires_grad_()
    bias = torch.randn(shape[-1], generator=g, requires_grad=True)
    grad = torch.randn(*shape, generator=g)
    assert bg.uses_kernel(h)
    out, ref = bg.bias_gelu(h, bias), bg.bias_gelu_ref(h, bias)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)
    got = torch.autograd.grad(out, [h, bias], grad)
    want = torch.autograd.grad(ref, [h, bias], grad)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=2e-6)
    rows = h.numel() // shape[-1]
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=2e-6 * rows)  # a column sum, another order


@needs_kernel
def test_the_whole_range():
    """Far tails (erf saturates, e^(−x²/2) underflows), zero, and values near it."""
    x = torch.cat([torch.linspace(-30, 30, 6001), torch.tensor([0.0, 1e-30, -1e-30, 87.0, -87.0])])
    h = x[None].clone().requires_grad_()
    bias = torch.zeros(x.numel(), requires_grad=True)
    out = bg.bias_gelu(h, bias)
    torch.testing.assert_close(out, F.gelu(h), rtol=1e-5, atol=2e-6)
    (dh,) = torch.autograd.grad(out.sum(), [h])
    (want,) = torch.autograd.grad(F.gelu(h).sum(), [h])
    torch.testing.assert_close(dh, want, rtol=1e-5, atol=2e-6)
    assert torch.isfinite(out).all() and torch.isfinite(dh).all()


@needs_kernel
def test_bias_gradient_is_the_same_for_any_thread_count():
    g = torch.Generator().manual_seed(1)
    h, bias, grad = torch.randn(1000, 96, generator=g), torch.randn(96, generator=g), torch.randn(1000, 96, generator=g)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(torch.ops.olmoearth_fast.bias_gelu_bwd(grad, h, bias))
    finally:
        torch.set_num_threads(before)
    for dh, db in results[1:]:
        assert torch.equal(dh, results[0][0]) and torch.equal(db, results[0][1])


@needs_kernel
def test_mlp_with_the_kernel_equals_pytorch_layers(monkeypatch):
    torch.manual_seed(0)
    mlp = Mlp(48, 192)
    x = torch.randn(3, 70, 48, requires_grad=True)
    grad = torch.randn(3, 70, 48)
    params = [x, *mlp.parameters()]
    out = mlp(x)
    got = torch.autograd.grad(out, params, grad)
    monkeypatch.setenv("OLMOEARTH_FAST_KERNELS", "pytorch")  # PyTorch's Linear → GELU → Linear
    assert not bg.uses_kernel(x)
    ref = mlp(x)
    want = torch.autograd.grad(ref, params, grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-5)


def test_which_path():
    x = torch.randn(4, 8)
    assert bg.uses_kernel(x) == bg.kernel_available()
    assert not bg.uses_kernel(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not bg.uses_kernel(x)
    seen = []

    def f(x):
        seen.append(bg.uses_kernel(x))
        return bg.bias_gelu(x, torch.zeros(8))

    torch.testing.assert_close(torch.compile(f, backend="eager", fullgraph=True)(x), F.gelu(x))
    assert seen == [False]
    torch.testing.assert_close(bg.bias_gelu(x.double(), torch.ones(8, dtype=torch.float64)), F.gelu(x.double() + 1))
    assert bg.bias_gelu(x[:0], torch.zeros(8)).shape == (0, 8)


@needs_kernel
def test_bad_bias_is_named():
    with pytest.raises(ValueError, match=r"bias_gelu: bias \(7,\) does not match h \(4, 8\)"):
        bg.bias_gelu(torch.randn(4, 8), torch.zeros(7))
