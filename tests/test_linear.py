"""`ops.linear`: oneDNN's inner product forward and input gradient, MKL or oneDNN weight gradient, equal
PyTorch's Linear; which CPUs take that path (`backend`)."""

import pytest
import torch
import torch.nn.functional as F

from olmoearth_fast.ops import linear as lin

needs_kernel = pytest.mark.skipif(not lin.kernel_available(), reason="PyTorch built without oneDNN's CPU inner product")


def _inputs(shape, n, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = (torch.randn(n, shape[-1], generator=g) / shape[-1] ** 0.5).requires_grad_()
    b = (0.1 * torch.randn(n, generator=g)).requires_grad_() if bias else None
    return x, w, b, torch.randn(*shape[:-1], n, generator=g)


def _value_and_grads(fn, x, w, b, grad):
    out = fn(x, w, b)
    params = [t for t in (x, w, b) if t is not None]
    return out, torch.autograd.grad(out, params, grad)


@pytest.fixture
def count_calls(monkeypatch):
    """The oneDNN path forced (``auto`` takes it on AMD CPUs only); the shapes of its inner products."""
    monkeypatch.setenv(lin.CPU_LINEAR_ENV, "onednn")
    calls = []
    inner = lin._inner_product

    def counted(*args):
        calls.append(args[0].shape)
        return inner(*args)

    monkeypatch.setattr(lin, "_inner_product", counted)
    return calls


@needs_kernel
@pytest.mark.parametrize("shape,n,bias", [((300, 192), 768, True), ((4, 75, 64), 576, True), ((257, 768), 192, False)])
def test_values_and_gradients_equal_pytorch_linear(shape, n, bias, count_calls):
    x, w, b, grad = _inputs(shape, n, bias)
    out, grads = _value_and_grads(lin.linear, x, w, b, grad)
    ref, ref_grads = _value_and_grads(lin.linear_ref, x, w, b, grad)
    # the forward and dX = dY·(Wᵀ)ᵀ went through oneDNN, 2-D; these narrow layers' dW through MKL
    assert count_calls == [(x[..., 0].numel(), shape[-1]), (x[..., 0].numel(), n)]
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("frozen", [False, True])
def test_wide_layers_take_their_gradients_through_onednn(frozen, count_calls):
    if not lin.transpose_kernel_available():
        pytest.skip("no AVX-512F: the transposes (ops.transpose) and so the oneDNN gradients are off")
    d = lin.ONEDNN_WEIGHT_GRAD_MIN_DIM
    x, w, b, grad = _inputs((4, 70, d + 8), d)  # both weight dims at the threshold or above
    if frozen:
        w = w.detach()
    params = [t for t in (x, w, b) if t.requires_grad]
    out = lin.linear(x, w, b)
    grads = torch.autograd.grad(out, params, grad)
    ref_grads = torch.autograd.grad(F.linear(x, w, b), params, grad)
    rows = x[..., 0].numel()
    # forward, then dX = dY·(Wᵀ)ᵀ and (where W trains) dW = (dYᵀ)·(Xᵀ)ᵀ: all three on oneDNN
    assert count_calls == [(rows, d + 8), (rows, d)] + ([] if frozen else [(d, rows)])
    for got, want in zip(grads, ref_grads):  # dW sums 280 products of O(1) terms: |dW| ~ 17
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    again = torch.autograd.grad(lin.linear(x, w, b), params, grad)
    assert all(torch.equal(a, c) for a, c in zip(grads, again))  # repeatable bit for bit


@needs_kernel
def test_strided_input_and_frozen_weight(count_calls):
    x, w, b, grad = _inputs((64, 300), 96)
    xt = x.detach().t().contiguous().t().requires_grad_()  # same values, column-major storage
    wf = w.detach()  # a weight without gradient: only dx and db
    out = lin.linear(xt, wf, b)
    dx, db = torch.autograd.grad(out, [xt, b], grad)
    torch.testing.assert_close(out, F.linear(x, wf, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, grad @ wf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, grad.sum(0), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_repeated_calls_are_bit_identical(count_calls):
    x, w, b, grad = _inputs((513, 192), 576)
    first = _value_and_grads(lin.linear, x, w, b, grad)
    second = _value_and_grads(lin.linear, x, w, b, grad)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, c) for a, c in zip(first[1], second[1]))


def test_other_dtypes_forced_pytorch_and_autocast_take_pytorch_linear(monkeypatch, count_calls):
    x, w, b, _ = _inputs((32, 48), 16)
    x64, w64, b64 = (t.detach().double() for t in (x, w, b))
    assert torch.equal(lin.linear(x64, w64, b64), F.linear(x64, w64, b64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin.linear(x, w, b).dtype == torch.bfloat16
    monkeypatch.setenv("OLMOEARTH_FAST_KERNELS", "pytorch")
    assert torch.equal(lin.linear(x, w, b), F.linear(x, w, b))
    assert count_calls == []


def test_mismatched_shapes_name_the_problem(count_calls):
    x, w, b, _ = _inputs((8, 32), 16)
    if not lin.uses_kernel(x):
        pytest.skip("the PyTorch path raises PyTorch's own error")
    with pytest.raises(ValueError, match=r"x \(8, 32\), weight \(16, 31\)"):
        lin.linear(x, w[:, :31], b)
    with pytest.raises(ValueError, match=r"bias \(15,\)"):
        lin.linear(x, w, b[:15])


@pytest.mark.parametrize("vendor,capability,want", [
    ("AuthenticAMD", "AVX512", "onednn"),  # MKL's sgemm takes its AVX2 path there
    ("GenuineIntel", "AVX512", "mkl"),  # MKL runs AVX-512 itself, and measured faster in the step
    ("AuthenticAMD", "AVX2", "mkl"),  # not measured: PyTorch's own Linear
    ("", "DEFAULT", "mkl"),
])
def test_auto_picks_onednn_on_amd_cpus_with_avx512(monkeypatch, vendor, capability, want):
    monkeypatch.delenv(lin.CPU_LINEAR_ENV, raising=False)
    monkeypatch.setattr(lin, "cpu_model", lambda: (vendor, "some CPU"))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    lin._auto_backend.cache_clear()
    try:
        assert lin.backend() == want
        x = torch.ones(4, 8)
        assert lin.uses_kernel(x) == (want == "onednn" and lin.kernel_available())
        monkeypatch.setenv(lin.CPU_LINEAR_ENV, "MKL")  # forced either way, any case
        assert lin.backend() == "mkl" and not lin.uses_kernel(x)
        monkeypatch.setenv(lin.CPU_LINEAR_ENV, "onednn")
        assert lin.backend() == "onednn"
    finally:
        lin._auto_backend.cache_clear()


def test_mkl_backend_is_pytorch_linear(monkeypatch, count_calls):
    monkeypatch.setenv(lin.CPU_LINEAR_ENV, "mkl")
    x, w, b, grad = _inputs((40, 24), 12)
    out, grads = _value_and_grads(lin.linear, x, w, b, grad)
    ref, ref_grads = _value_and_grads(F.linear, x, w, b, grad)
    assert torch.equal(out, ref) and all(torch.equal(g, r) for g, r in zip(grads, ref_grads))
    assert count_calls == []


def test_a_bad_backend_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(lin.CPU_LINEAR_ENV, "blas")
    with pytest.raises(ValueError, match=r"OLMOEARTH_FAST_CPU_LINEAR='blas': expected one of auto, onednn, mkl"):
        lin.linear(torch.ones(2, 3), torch.ones(4, 3))
