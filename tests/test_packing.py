"""The varlen packing ops (olmoearth_fast._C) against their plain-PyTorch references."""

import pytest
import torch

import olmoearth_fast._C  # noqa: F401
from olmoearth_fast.ops import packing as P

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _keep(b, n, ratio, device="cpu", empty_row=False, full_row=False, generator=None):
    keep = torch.rand(b, n, generator=generator) < ratio
    if empty_row and b > 0:
        keep[0] = False
    if full_row and b > 1:
        keep[-1] = True
    return keep.to(device)


# (B, N, ratio, empty_row, full_row): empty rows, all-kept rows, B=1, N=1, nothing kept, all kept
MASK_CASES = [
    (4, 37, 0.5, True, True),
    (1, 1, 1.0, False, False),
    (1, 1, 0.0, False, False),
    (3, 1, 0.5, True, True),
    (1, 123, 0.25, False, False),
    (5, 64, 0.0, False, False),
    (5, 64, 1.0, False, False),
    (7, 47, 0.3, True, True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", MASK_CASES)
def test_varlen_index_matches_ref(case, device):
    b, n, ratio, empty, full = case
    keep = _keep(b, n, ratio, device, empty, full)
    idx, cu, mx = P.varlen_index(keep)
    idx_r, cu_r, mx_r = P.varlen_index_ref(keep)
    assert idx.dtype == torch.long and cu.dtype == torch.int32 and mx.dtype == torch.int32
    assert torch.equal(idx, idx_r) and torch.equal(cu, cu_r) and int(mx) == int(mx_r)
    # sample-major, original order, and cu_seqlens delimits each sample's tokens
    for i in range(b):
        seg = idx[cu[i]:cu[i + 1]]
        assert torch.equal(seg, keep[i].nonzero().flatten() + i * n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64, torch.int64])
@pytest.mark.parametrize("case", MASK_CASES)
def test_pack_unpack_match_ref(case, dtype, device):
    b, n, ratio, empty, full = case
    keep = _keep(b, n, ratio, device, empty, full)
    x = (torch.randn(b, n, 3, 5) * 100).to(dtype).to(device)
    packed, cu, idx, mx = P.pack(x, keep)
    packed_r, cu_r, idx_r, mx_r = P.pack_ref(x, keep)
    assert torch.equal(packed, packed_r) and torch.equal(cu, cu_r) and torch.equal(idx, idx_r)
    assert packed.shape == (int(keep.sum()), 3, 5)
    out = P.unpack(packed, idx, b, n)
    assert torch.equal(out, P.unpack_ref(packed, idx, b, n))
    # round trip: kept tokens back in place, exact zeros elsewhere
    assert torch.equal(out, torch.where(keep[..., None, None], x, torch.zeros((), dtype=dtype, device=device)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MASK_CASES[:5])
def test_pack_unpack_gradients(case, dtype, device):
    b, n, ratio, empty, full = case
    keep = _keep(b, n, ratio, device, empty, full)
    x = torch.randn(b, n, 8, device=device, dtype=dtype, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    w = torch.randn(8, 8, device=device, dtype=dtype)

    packed, _, idx, _ = P.pack(x, keep)
    y = P.unpack(packed @ w, idx, b, n)
    g = torch.randn_like(y)
    (y * g).sum().backward()

    packed_r, _, idx_r, _ = P.pack_ref(xr, keep)
    yr = P.unpack_ref(packed_r @ w, idx_r, b, n)
    (yr * g).sum().backward()
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(x.grad, xr.grad)
    assert torch.all(x.grad[~keep] == 0)


def test_gradcheck_double():
    keep = _keep(3, 11, 0.5, empty_row=True, full_row=True)
    idx, _, _ = P.varlen_index(keep)
    x = torch.randn(33, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: P.gather_rows(t, idx), (x,))
    assert torch.autograd.gradgradcheck(lambda t: P.gather_rows(t, idx), (x,))
    p = torch.randn(idx.numel(), 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: P.scatter_rows(t, idx, 33), (p,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(4, 9, 3), (1, 1, 1), (2, 5, 1), (3, 16, 2), (2, 4, 3)])
@pytest.mark.parametrize("ratio", [0.0, 0.4, 1.0])
def test_merge_index_matches_ref(shape, ratio, device):
    keep = (torch.rand(shape) < ratio).to(device)
    if shape[0] > 1:
        keep[0] = False  # an empty sample
    pos, mmap, cu, mx = P.merge_index(keep)
    pos_r, mmap_r, cu_r, mx_r = P.merge_index_ref(keep)
    assert torch.equal(pos, pos_r) and torch.equal(mmap, mmap_r) and torch.equal(cu, cu_r)
    assert int(mx) == int(mx_r)
    b, p, s = shape
    assert mmap.shape == (pos.numel(), s)
    # one merged token per (sample, position) with any kept bandset
    assert pos.numel() == int(keep.any(-1).sum())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_gather_unmerge_scatter(dtype, device):
    b, p, s, d = 3, 10, 3, 4
    keep = (torch.rand(b, p, s) < 0.5).to(device)
    tokens = torch.randn(b, p, s, d, device=device, dtype=dtype, requires_grad=True)
    _, mmap, _, _ = P.merge_index(keep)
    rows = tokens.reshape(b * p * s, d)
    merged = P.merge_gather(rows, mmap)
    merged_r = P.merge_gather_ref(rows, mmap)
    assert torch.equal(merged, merged_r)
    # zeros exactly where the bandset is not kept, the token elsewhere
    m = merged.reshape(-1, s, d)
    kept = mmap >= 0
    assert torch.all(m[~kept] == 0)
    assert torch.equal(m[kept], rows[mmap[kept]])
    back = P.unmerge_scatter(merged, mmap, b * p * s)
    assert torch.equal(back, P.unmerge_scatter_ref(merged, mmap, b * p * s))
    assert torch.equal(back.reshape(b, p, s, d), tokens * keep[..., None])
    back.sum().backward()
    assert torch.equal(tokens.grad, keep[..., None].expand_as(tokens).to(dtype))


def test_merge_mean_pool_equals_mean_of_kept_bandsets():
    # a mean-pool projection on the merged layout is the mean over kept bandsets
    b, p, s, d = 2, 6, 3, 5
    keep = torch.rand(b, p, s) < 0.6
    tokens = torch.randn(b, p, s, d)
    pos, mmap, _, _ = P.merge_index(keep)
    merged = P.merge_gather(tokens.reshape(-1, d), mmap).reshape(-1, s, d)
    n_kept = (mmap >= 0).sum(1, keepdim=True)
    mean = merged.sum(1) / n_kept
    flat_keep = keep.reshape(b * p, s)[pos]
    expected = (tokens.reshape(b * p, s, d)[pos] * flat_keep[..., None]).sum(1) / flat_keep.sum(1, keepdim=True)
    torch.testing.assert_close(mean, expected)


# ---------------------------------------------------------------------------------------------
# torch.library plumbing


def _opcheck_samples():
    keep = _keep(3, 13, 0.5, empty_row=True, full_row=True)
    idx, _, _ = P.varlen_index(keep)
    x = torch.randn(39, 6, requires_grad=True)
    xt = torch.randn(6, 39).t().requires_grad_()  # permuted (non-contiguous) layout
    packed = torch.randn(idx.numel(), 6, requires_grad=True)
    keep3 = torch.rand(3, 5, 2) < 0.5
    return [
        (torch.ops.olmoearth_fast.varlen_index, (keep,)),
        (torch.ops.olmoearth_fast.merge_index, (keep3,)),
        (torch.ops.olmoearth_fast.gather_rows, (x, idx)),
        (torch.ops.olmoearth_fast.gather_rows, (xt, idx)),
        (torch.ops.olmoearth_fast.gather_rows, (x.detach(), idx)),
        (torch.ops.olmoearth_fast.scatter_rows, (packed, idx, 39)),
        (torch.ops.olmoearth_fast.scatter_rows, (packed.detach(), idx, 39)),
    ]


@pytest.mark.parametrize("i", range(7))
def test_opcheck(i):
    op, args = _opcheck_samples()[i]
    torch.library.opcheck(op, args)


def test_ops_registered():
    for name in ("varlen_index", "merge_index", "gather_rows", "scatter_rows"):
        assert hasattr(torch.ops.olmoearth_fast, name)


def test_compile_fullgraph_pack_linear_unpack():
    torch._dynamo.reset()
    lin = torch.nn.Linear(16, 16)

    def f(x, keep):
        packed, cu, idx, _ = P.pack(x, keep)
        return P.unpack(torch.nn.functional.gelu(lin(packed)), idx, x.shape[0], x.shape[1])

    compiled = torch.compile(f, fullgraph=True)
    for b, n in [(4, 20), (3, 17)]:
        keep = _keep(b, n, 0.5, empty_row=True, full_row=True)
        x = torch.randn(b, n, 16, requires_grad=True)
        xr = x.detach().clone().requires_grad_()
        y = compiled(x, keep)
        y.square().sum().backward()
        yr = f(xr, keep)
        yr.square().sum().backward()
        torch.testing.assert_close(y, yr)
        torch.testing.assert_close(x.grad, xr.grad)


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: P.varlen_index(torch.ones(3, 4)), r"'keep' must be a bool tensor of shape \[B, N\]"),
        (lambda: P.varlen_index(torch.ones(3, 4, 2, dtype=torch.bool)), r"'keep' must have shape \[B, N\]"),
        (lambda: P.merge_index(torch.ones(3, 4, dtype=torch.bool)), r"'keep' must have shape \[B, P, S\]"),
        (lambda: P.gather_rows(torch.ones(3, 4), torch.tensor([0, 1], dtype=torch.int32)),
         r"'index' must be int64 of shape \[K\]"),
        (lambda: P.gather_rows(torch.ones(3, 4), torch.tensor([[0, 1]])), r"'index' must have shape \[K\]"),
        (lambda: P.gather_rows(torch.ones(3, 4), torch.tensor([0, 3])), r"index\[1\] = 3 is out of range"),
        (lambda: P.scatter_rows(torch.ones(3, 4), torch.tensor([0, 1]), 5), r"'src' must have shape \[K, \.\.\.\] with K = 2"),
        (lambda: P.scatter_rows(torch.ones(2, 4), torch.tensor([0, 7]), 5), r"index\[1\] = 7 is out of range"),
        (lambda: P.pack(torch.ones(3, 4, 2), torch.ones(3, 5, dtype=torch.bool)), r"'x' must be \[B, N, \.\.\.\]"),
    ],
)
def test_bad_input_errors(call, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        call()


@pytest.mark.gpu
def test_device_mismatch_error():
    with pytest.raises(RuntimeError, match="same device"):
        P.gather_rows(torch.ones(3, 4, device="cuda"), torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------------
# A 0-row source: the only valid index is -1, so the result is K zero rows (the CPU op checks the
# values; the CUDA op returns zeros without reading the source). The row size used to be taken as
# src.numel() / max(R, 1) = 0 bytes, so no row was written and the output was uninitialised.


def _dirty_heap(shape, dtype):
    # leave non-zero bytes where the next allocation of this size will likely land
    junk = torch.full(shape, 7, dtype=dtype)
    del junk


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_shape", [(33,), (3, 5), ()])
def test_gather_rows_from_zero_rows_is_zeros(device, dtype, row_shape):
    k = 64
    for _ in range(3):  # several allocations: one lucky zero page must not hide the bug
        _dirty_heap((k, *row_shape), dtype)
        src = torch.empty(0, *row_shape, dtype=dtype, device=device)
        out = P.gather_rows(src, torch.full((k,), -1, device=device))
        assert out.shape == (k, *row_shape) and out.dtype == dtype
        assert torch.equal(out, torch.zeros_like(out))
        assert torch.equal(out, P.gather_rows_ref(src, torch.full((k,), -1, device=device)))


def test_gather_rows_from_zero_rows_rejects_row_indices():
    with pytest.raises(RuntimeError, match=r"index\[0\] = 0 is out of range .* with 0 rows"):
        P.gather_rows(torch.empty(0, 4), torch.tensor([0, -1]))


@pytest.mark.parametrize("device", DEVICES)
def test_gather_scatter_zero_rows_gradients(device):
    """Packing an all-dropped batch: gather from 0 rows and its backward (a scatter into 0
    rows) are both well defined."""
    src = torch.empty(0, 6, device=device, requires_grad=True)
    out = P.gather_rows(src, torch.full((5,), -1, device=device))
    (out * 2).sum().backward()
    assert src.grad.shape == (0, 6)
    assert torch.equal(P.scatter_rows(torch.ones(0, 6, device=device), torch.empty(0, dtype=torch.long, device=device), 3),
                       torch.zeros(3, 6, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs_equal_contiguous(device):
    """Non-contiguous src / index / keep views give the contiguous results (the ops copy them)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 40, 8, generator=g).to(device)
    view = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, permuted strides
    keep = (torch.rand(40, 6, generator=g) < 0.5).to(device).t()  # [6, 40], transposed
    packed, cu, idx, _ = P.pack(view, keep)
    want = P.pack_ref(x, keep.contiguous())
    assert torch.equal(packed, want[0]) and torch.equal(cu, want[1]) and torch.equal(idx, want[2])
    rows = x.reshape(-1, 8)
    index = torch.stack([idx, idx], 1)[:, 0]  # a strided index view (stride 2)
    assert not index.is_contiguous()
    assert torch.equal(P.gather_rows(rows.t().contiguous().t(), index), rows[idx])
