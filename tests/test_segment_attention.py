"""The CPU segment-attention op (csrc/segment_attention.cpp) against its reference (SDPA per
segment): values and the gradients of q, k and v, on the shapes the model produces."""

import itertools
import os

import pytest
import torch

from olmoearth_fast.ops import segment_attention as sa

needs_kernel = pytest.mark.skipif(not sa.kernel_available(), reason="this CPU has no AVX-512F")


def _offsets(lengths):
    return [0, *itertools.accumulate(lengths)]


def _case(q_lens, k_lens, heads, dim, strided=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(q_lens), sum(k_lens)
    if strided:  # q as the model makes it: a view of one qkv GEMM ([T, 3, H, d] unbound)
        qkv = torch.randn(tq, 3, heads, dim, generator=g, requires_grad=True)
        q = qkv[:, 0]
    else:
        qkv = q = torch.randn(tq, heads, dim, generator=g, requires_grad=True)
    k = torch.randn(tk, heads, dim, generator=g, requires_grad=True)
    v = torch.randn(tk, heads, dim, generator=g, requires_grad=True)
    grad = torch.randn(tq, heads, dim, generator=g)
    return qkv, q, k, v, grad, _offsets(q_lens), _offsets(k_lens)


CASES = [
    ([5, 0, 17, 33, 1, 3], [7, 4, 0, 40, 1, 20], 8, 16),  # empty q and k segments, cross lengths
    ([271, 228, 96], [271, 228, 96], 8, 16),  # nano self-attention lengths
    ([215, 90, 473], [248, 345, 91], 3, 64),  # tiny cross-attention lengths
    ([5, 0, 7, 13, 1, 6], [3, 9, 0, 40, 2, 17], 2, 64),  # around head dim 64's 6-row tiles, empty segments
    ([16, 32, 15, 17], [16, 32, 15, 17], 2, 32),  # around the 16-key tiles
    ([9, 2], [300, 1], 1, 128),
    ([130, 33], [70, 45], 2, 32),  # the backward's chunks of query rows (128 at head dim 32), key blocks of 12
    ([70, 5], [40, 77], 1, 128),  # chunks of 32 rows, key blocks of 3
]


@needs_kernel
@pytest.mark.parametrize("q_lens,k_lens,heads,dim", CASES)
@pytest.mark.parametrize("strided", [True, False])
def test_kernel_equals_reference(q_lens, k_lens, heads, dim, strided):
    qkv, q, k, v, grad, q_cu, k_cu = _case(q_lens, k_lens, heads, dim, strided)
    assert sa.uses_kernel(q)
    got = sa.segment_attention(q, k, v, q_cu, k_cu)
    want = sa.segment_attention_ref(q, k, v, q_cu, k_cu)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    for a, b in zip(torch.autograd.grad(got, [qkv, k, v], grad), torch.autograd.grad(want, [qkv, k, v], grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("q_lens,k_lens,heads,dim", CASES[:3])
def test_packed_inputs_equal_separate_ones(q_lens, k_lens, heads, dim):
    """q, k, v packed in one [T, 3, H, d] tensor (self-attention) or k, v in one [Tk, 2, H, d]
    (cross-attention): the op reads them in place and writes the gradient packed alike; values
    and gradients are bit-identical to the separate tensors'."""
    g = torch.Generator().manual_seed(3)
    self_attn = q_lens == k_lens
    t = sum(q_lens)
    packed = torch.randn(t, 3, heads, dim, generator=g, requires_grad=True) if self_attn else None
    q = torch.randn(t, heads, dim, generator=g, requires_grad=True)
    kv = torch.randn(sum(k_lens), 2, heads, dim, generator=g, requires_grad=True)
    grad = torch.randn(t, heads, dim, generator=g)
    q_cu, k_cu = _offsets(q_lens), _offsets(k_lens)
    if self_attn:
        got = sa.segment_attention(packed, None, None, q_cu, q_cu)
        parts = [p.detach().clone().requires_grad_() for p in packed.unbind(1)]
        want = sa.segment_attention(*parts, q_cu, q_cu)
        (g_packed,) = torch.autograd.grad(got, [packed], grad)
        assert g_packed.shape == packed.shape
        want_grads = torch.autograd.grad(want, parts, grad)
        got_grads = g_packed.unbind(1)
    else:
        got = sa.segment_attention(q, kv, None, q_cu, k_cu)
        parts = [q.detach().clone().requires_grad_(), *(p.detach().clone().requires_grad_() for p in kv.unbind(1))]
        want = sa.segment_attention(*parts, q_cu, k_cu)
        g_q, g_kv = torch.autograd.grad(got, [q, kv], grad)
        assert g_kv.shape == kv.shape
        want_grads = torch.autograd.grad(want, parts, grad)
        got_grads = (g_q, *g_kv.unbind(1))
    assert torch.equal(got, want)
    for a, b in zip(got_grads, want_grads):
        assert torch.equal(a, b)
    # the reference path takes the packed layouts too
    packed_inputs = (packed, None, None) if self_attn else (q, kv, None)
    ref = sa.segment_attention_ref(*sa.unpack_qkv(*packed_inputs), q_cu, k_cu)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-6)


@needs_kernel
@pytest.mark.parametrize("dim", [16, 64])
def test_peaked_scores(dim):
    """Scores spanning hundreds of units: most weights underflow to 0 (exp2 of very negative
    arguments, no clamp), one key per row dominates; values and gradients stay finite and equal."""
    qkv, q, k, v, grad, q_cu, k_cu = _case([40, 7], [33, 50], 2, dim, seed=1)
    with torch.no_grad():
        qkv.mul_(12.0)
        k.mul_(12.0)
    got = sa.segment_attention(q, k, v, q_cu, k_cu)
    want = sa.segment_attention_ref(q, k, v, q_cu, k_cu)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    for a, b in zip(torch.autograd.grad(got, [qkv, k, v], grad), torch.autograd.grad(want, [qkv, k, v], grad)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_samples_without_keys_get_zeros():
    qkv, q, k, v, grad, q_cu, k_cu = _case([3, 4], [0, 5], 2, 16)
    out = sa.segment_attention(q, k, v, q_cu, k_cu)
    assert torch.equal(out[:3], torch.zeros(3, 2, 16))
    dq = torch.autograd.grad(out, qkv, grad)[0]
    assert torch.equal(dq[:3], torch.zeros(3, 3, 2, 16)) and dq[3:, 0].abs().sum() > 0


def test_other_dtypes_and_head_dims_take_the_reference(monkeypatch):
    q = torch.randn(6, 2, 24)
    assert not sa.uses_kernel(q)  # head dim 24
    assert not sa.uses_kernel(torch.randn(6, 2, 16, dtype=torch.bfloat16))
    monkeypatch.setenv("OLMOEARTH_FAST_KERNELS", "pytorch")
    assert not sa.uses_kernel(torch.randn(6, 2, 16))
    out = sa.segment_attention(q, q, q, [0, 2, 6], [0, 2, 6])
    torch.testing.assert_close(out, sa.segment_attention_ref(q, q, q, [0, 2, 6], [0, 2, 6]))


@needs_kernel
def test_bad_offsets_are_refused():
    q = torch.randn(6, 2, 16)
    with pytest.raises(ValueError, match="offsets"):
        sa.segment_attention(q, q, q, [0, 2, 5], [0, 2, 6])
    with pytest.raises(RuntimeError, match="must not decrease"):
        torch.ops.olmoearth_fast.segment_attention_fwd(q, q, q, [0, 4, 2, 6], [0, 2, 4, 6], 0.25)
    with pytest.raises(RuntimeError, match="head dim"):
        x = torch.randn(6, 2, 24)
        torch.ops.olmoearth_fast.segment_attention_fwd(x, x, x, [0, 6], [0, 6], 0.25)


_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
AVX512_SOURCES = sorted(name for name in os.listdir(_CSRC) if name.endswith(".cpp")
                        and '"avx512_math.h"' in open(os.path.join(_CSRC, name)).read())


def test_every_avx512_source_is_checked():
    assert {"segment_attention.cpp", "bias_gelu.cpp", "residual_norm.cpp", "resize_patches.cpp",
            "transpose.cpp"} <= set(AVX512_SOURCES)


@pytest.mark.parametrize("source", AVX512_SOURCES)
def test_builds_without_the_avx512_kernels(tmp_path, source):
    """The C++ files with AVX-512 kernels (csrc/avx512_math.h) compile where the kernels cannot
    (aarch64, or -DOEF_NO_AVX512): the ops then report themselves unavailable and their
    wrappers fall back."""
    import shutil
    import subprocess
    import sysconfig
    from pathlib import Path

    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = Path(__file__).resolve().parents[1] / "csrc" / source
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-DOEF_NO_AVX512", *(f"-I{p}" for p in include_paths()),
           f"-I{sysconfig.get_paths()['include']}", str(src)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
