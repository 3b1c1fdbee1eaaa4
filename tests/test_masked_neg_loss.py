"""The fused masked-negatives loss op: Triton (interpreter on CPU) and chunked CPU paths.

Both implementations are checked against `masked_neg_loss_ref` (per-segment loop) and the
reference package's `modality_patch_discrimination_masked_negatives_vec`: value and prediction
gradient within 1e-5, for segment sizes 1, 2, 47, 123 and 256 with exact duplicate targets,
skipped samples, empty modalities and modalities excluded from negative masking. Then the
per-row statistics of the kernel against the chunked path at tile sizes that split segments,
the registered op (opcheck, torch.compile fullgraph), and input validation.
"""

import pytest
import torch
import torch.nn.functional as F
from olmoearth_fast.kernels.masked_neg_loss import masked_neg_loss_bwd, masked_neg_loss_fwd

from olmoearth_fast.modalities import MaskValue
from olmoearth_fast.ops import masked_neg_loss as M
from olmoearth_fast.ops.masked_neg_loss import masked_neg_loss, masked_neg_loss_ref
from tests.helpers.masked_neg_loss_dict import masked_neg_loss_from_dict, pack_loss_inputs

DEC = int(MaskValue.DECODER)
B, D = 6, 32
# modality -> (N, DECODER count per sample, "cls" = copies of 4 class vectors | "uniq",
#              samples whose DECODER targets are all one class)
SPEC = {
    "sentinel2_l2a": (256, [0, 2, 47, 123, 256, 1], "uniq", ()),
    "worldcover": (300, [1, 2, 47, 123, 256, 47], "cls", (5,)),
    "openstreetmap_raster": (16, [3, 2, 0, 0, 5, 0], "cls", (0, 1, 2, 3, 4, 5)),
    "srtm": (16, [0, 0, 0, 0, 0, 0], "cls", ()),
    "cdl": (50, [3, 5, 50, 1, 7, 0], "cls", (4,)),
}
MASKED = ["sentinel2_l2a", "worldcover", "openstreetmap_raster", "srtm"]  # not cdl


def _inputs(seed=0, dtype=torch.float32, dim=D, device="cpu"):
    """Dict-form inputs made on CPU (same values on every device), then moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randn(4, dim, generator=g)
    pred, target, mask = {}, {}, {}
    for m, (n, counts, kind, dup_all) in SPEC.items():
        codes = torch.zeros(B, n, dtype=torch.long)
        for b, c in enumerate(counts):
            codes[b, torch.randperm(n, generator=g)[:c]] = DEC
        if kind == "cls":
            assign = torch.randint(0, 4, (B, n), generator=g)
            assign[list(dup_all)] = 2
            target[m] = classes[assign].to(dtype)
        else:
            target[m] = torch.randn(B, n, dim, generator=g).to(dtype)
        pred[m] = torch.randn(B, n, dim, generator=g).to(dtype).requires_grad_()
        mask[m] = codes
        t = F.normalize(target[m].float(), dim=-1)
        cos = t @ t.transpose(1, 2)
        assert bool(((cos > 0.99999) | (cos <= 0.99)).all())
    if device != "cpu":
        pred = {m: v.detach().to(device).requires_grad_() for m, v in pred.items()}
        target = {m: v.to(device) for m, v in target.items()}
        mask = {m: v.to(device) for m, v in mask.items()}
    return pred, target, mask


def _device(impl, kernel_device):
    """The Triton kernels get tensors where they run (conftest); the chunked path stays on CPU."""
    return kernel_device if impl == "triton" else "cpu"


def _packed(pred, target, mask, mask_list=MASKED):
    return pack_loss_inputs(pred, target, mask, mask_negatives_for_modalities=mask_list)


def _value_grad(fn, leaves):
    for v in leaves:
        v.grad = None
    out = fn()
    out.sum().backward()
    return out.detach(), [v.grad.clone() for v in leaves]


def _close(got, want, atol=1e-5):
    (v, gs), (v_ref, gs_ref) = got, want
    print(f"value diff {float((v - v_ref).abs().max()):.2e}, grad diff "
          f"{max(float((a - b).abs().max()) for a, b in zip(gs, gs_ref)):.2e}")
    torch.testing.assert_close(v, v_ref, atol=atol, rtol=0)
    for a, b in zip(gs, gs_ref):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_op_matches_ref(impl, kernel_device):
    pred, target, mask = _inputs(device=_device(impl, kernel_device))
    leaves = list(pred.values())
    args = lambda: _packed(pred, target, mask)  # noqa: E731

    def ours():
        p = args()
        return masked_neg_loss(p.pred, p.target, p.seg_offsets, p.seg_modality, p.seg_mask_neg,
                               len(p.modalities), row_index=p.row_index, impl=impl)

    def ref():
        p = args()
        return masked_neg_loss_ref(p.pred, p.target, p.seg_offsets, p.seg_modality,
                                   p.seg_mask_neg, len(p.modalities), row_index=p.row_index)

    got, want = _value_grad(ours, leaves), _value_grad(ref, leaves)
    _close(got, want)
    assert got[0].device.type == _device(impl, kernel_device)
    # per modality: masked with skips > 0, fully skipped = 0, empty = 0, unmasked cdl > 0
    assert (got[0] > 0).tolist() == [True, True, False, False, True]


@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("mask_list", [None, MASKED], ids=["mask_all", "mask_some"])
def test_dict_form_matches_reference_package(impl, mask_list, kernel_device):
    ref_loss = pytest.importorskip("olmoearth_pretrain.train.loss")
    from olmoearth_pretrain.datatypes import TokensAndMasks

    pred, target, mask = _inputs(1, device=_device(impl, kernel_device))
    leaves = list(pred.values())
    vec = ref_loss.ModalityPatchDiscriminationMaskedNegativesVec(
        mask_negatives_for_modalities=mask_list)
    got = _value_grad(lambda: masked_neg_loss_from_dict(
        pred, target, mask, mask_negatives_for_modalities=mask_list, impl=impl), leaves)
    want = _value_grad(lambda: vec.compute(
        TokensAndMasks(**pred, **{f"{m}_mask": k for m, k in mask.items()}),
        TokensAndMasks(**target, **{f"{m}_mask": k for m, k in mask.items()})), leaves)
    _close(got, want)


@pytest.mark.parametrize("dim,block,block_k", [(40, 16, 16), (32, 32, 32)])
def test_kernel_row_stats_match_chunked(dim, block, block_k, kernel_device):
    """Per-row lse, loss, negcnt, ndup and gradient of the kernel at tiles that split segments
    (and D into a partial K tile) against the chunked path (both on the kernel's device)."""
    pred, target, mask = _inputs(2, dim=dim, device=kernel_device)
    keep = ("openstreetmap_raster", "srtm", "cdl")  # c = 50 splits into 4 row/column blocks
    p = _packed({m: pred[m].detach() for m in keep}, {m: target[m] for m in keep},
                {m: mask[m] for m in keep}, mask_list=None)
    kw = dict(block_m=block, block_n=block, block_k=block_k)
    stats = masked_neg_loss_fwd(p.pred, p.target, p.row_index, p.seg_offsets, p.seg_mask_neg,
                                0.1, 0.999, **kw)
    want = M._fwd_chunked(p.pred, p.target, p.row_index, p.seg_offsets, p.seg_mask_neg, 0.1,
                          0.999, True)
    seg, in_seg = M._row_segments(p.seg_offsets, p.row_index.numel())
    for a, b in zip(stats, want[:4]):
        torch.testing.assert_close(a[in_seg], b[in_seg], atol=1e-5, rtol=0)
    assert int(stats[3][in_seg].sum()) > 0  # duplicates were found
    # the backward with per-row weights (0 in one masked segment, as for a skipped one)
    w = torch.rand(p.row_index.numel()).to(kernel_device) * in_seg
    w[seg == 12 + 2] = 0  # cdl, sample 2 (c = 50)
    grad = masked_neg_loss_bwd(p.pred, p.target, p.row_index, p.seg_offsets, p.seg_mask_neg,
                               stats[0], w, stats[3], 0.1, 0.999, **kw)
    scale = torch.zeros(p.pred.shape[0], device=kernel_device).index_add_(0, p.row_index, w)
    torch.testing.assert_close(grad, want[4][:-1] * scale[:, None], atol=1e-5, rtol=0)
    grad_c = M._bwd_chunked(p.pred, p.target, p.row_index, p.seg_offsets, p.seg_mask_neg,
                            stats[0], w, stats[3], 0.1, 0.999)
    torch.testing.assert_close(grad_c, grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_packed_rows_outside_segments_are_ignored(impl, kernel_device):
    """Identity row_index with trailing junk rows: same loss as without, zero grad there."""
    device = _device(impl, kernel_device)
    pred, target, mask = _inputs(3, device=device)
    p = _packed({m: v.detach() for m, v in pred.items()}, target, mask)
    x = p.pred[p.row_index].clone().requires_grad_()
    t = p.target[p.row_index]
    n = int(p.seg_offsets[-1])
    junk = torch.randn(7, D, device=device)
    x2 = torch.cat([x.detach()[:n], junk]).requires_grad_()
    t2 = torch.cat([t[:n], junk])
    args = (p.seg_offsets, p.seg_modality, p.seg_mask_neg, len(p.modalities))
    a = masked_neg_loss(x, t, *args, impl=impl)
    b = masked_neg_loss(x2, t2, *args, impl=impl)
    a.sum().backward()
    b.sum().backward()
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(x.grad[:n], x2.grad[:n], atol=1e-6, rtol=0)
    assert float(x.grad[n:].abs().max()) == 0.0 and float(x2.grad[n:].abs().max()) == 0.0


def test_low_precision_inputs_are_computed_in_fp32():
    """bf16 predictions: same loss as fp32 on the same (bf16-rounded) values, bf16 gradient."""
    pred, target, mask = _inputs(4, dtype=torch.bfloat16)
    p = _packed(pred, target, mask)
    args = (p.seg_offsets, p.seg_modality, p.seg_mask_neg, len(p.modalities))
    x = p.pred.detach().requires_grad_()
    got = masked_neg_loss(x, p.target, *args, row_index=p.row_index)
    got.sum().backward()
    x32 = p.pred.detach().float().requires_grad_()
    want = masked_neg_loss(x32, p.target.float(), *args, row_index=p.row_index)
    want.sum().backward()
    assert got.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(x.grad.float(), x32.grad, atol=1e-3, rtol=1e-2)


def _op_args(need_grad=True, permuted=False):
    pred, target, mask = _inputs(5)
    p = _packed({m: v.detach() for m, v in pred.items()}, target, mask)
    x = p.pred.clone()
    if permuted:
        x = x.t().contiguous().t()  # same values, column-major strides
    return (x.requires_grad_(need_grad), p.target, p.row_index, p.seg_offsets, p.seg_modality,
            p.seg_mask_neg, len(p.modalities), 0.1, 0.999, "chunked", need_grad)


@pytest.mark.parametrize("need_grad,permuted", [(True, False), (False, False), (True, True)])
def test_opcheck(need_grad, permuted):
    torch.library.opcheck(torch.ops.olmoearth_fast.masked_neg_loss.default,
                          _op_args(need_grad, permuted))


def test_opcheck_backward_op():
    args = _op_args(need_grad=False)
    out = torch.ops.olmoearth_fast.masked_neg_loss(*args)
    grad = torch.rand(args[6])
    bwd_args = (grad,) + args[:6] + (out[1], out[2], out[3], out[4], 0.1, 0.999, "chunked")
    torch.library.opcheck(torch.ops.olmoearth_fast.masked_neg_loss_backward.default, bwd_args)


def test_compile_fullgraph_forward_backward():
    pred, target, mask = _inputs(6)
    leaves = list(pred.values())

    def f(pred, target, mask):
        return masked_neg_loss_from_dict(pred, target, mask, mask_negatives_for_modalities=MASKED)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    want = _value_grad(lambda: f(pred, target, mask), leaves)
    got = _value_grad(lambda: compiled(pred, target, mask), leaves)
    _close(got, want, atol=1e-6)


def test_compile_inductor_packed_op():
    pred, target, mask = _inputs(7)
    p = _packed({m: v.detach() for m, v in pred.items()}, target, mask)
    x = p.pred.clone().requires_grad_()
    args = (p.target, p.seg_offsets, p.seg_modality, p.seg_mask_neg, len(p.modalities))

    def f(x, t, off, mod, flags, m):
        return masked_neg_loss(x, t, off, mod, flags, m, row_index=p.row_index).sum() * 2.0

    compiled = torch.compile(f, fullgraph=True)
    want = _value_grad(lambda: f(x, *args), [x])
    # Inductor's FX graph cache does not key on fake kernels: a cache entry from an older
    # version of this op would replay stale output shapes.
    with torch._inductor.config.patch(fx_graph_cache=False):
        got = _value_grad(lambda: compiled(x, *args), [x])
    _close(got, want, atol=1e-6)


def test_invalid_inputs_raise():
    pred, target, mask = _inputs(8)
    p = _packed({m: v.detach() for m, v in pred.items()}, target, mask)
    args = [p.pred, p.target, p.seg_offsets, p.seg_modality, p.seg_mask_neg, len(p.modalities)]
    bad = {
        "pred": p.pred[:, :, None],
        "target": p.target[:, :-1],
        "seg_offsets": p.seg_offsets.long(),
        "seg_modality": p.seg_modality[:-1],
        "seg_mask_neg": p.seg_mask_neg.int(),
    }
    for i, name in enumerate(["pred", "target", "seg_offsets", "seg_modality", "seg_mask_neg"]):
        a = list(args)
        a[i] = bad[name]
        with pytest.raises(ValueError, match=name):
            masked_neg_loss(*a)
    with pytest.raises(ValueError, match="target must not require grad"):
        masked_neg_loss(p.pred, p.target.clone().requires_grad_(), *args[2:])
    with pytest.raises(ValueError, match="impl"):
        masked_neg_loss(*args, impl="cuda")
    with pytest.raises(ValueError, match="row_index"):
        masked_neg_loss(*args, row_index=p.row_index.int())
    with pytest.raises(ValueError, match="not in LOSS_FIELD_ORDER"):
        masked_neg_loss_from_dict({"s2": pred["cdl"]}, {"s2": target["cdl"]}, {"s2": mask["cdl"]})
    with pytest.raises(ValueError, match=r"mask\['cdl'\]"):
        masked_neg_loss_from_dict({"cdl": pred["cdl"]}, {"cdl": target["cdl"]},
                                  {"cdl": mask["cdl"][:, :-1]})


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cuda_matches_chunked_cpu(dtype):
    pred, target, mask = _inputs(9, dtype, dim=768)
    leaves = list(pred.values())
    cuda = {m: v.detach().cuda().requires_grad_() for m, v in pred.items()}
    tc, mc = {m: v.cuda() for m, v in target.items()}, {m: v.cuda() for m, v in mask.items()}
    want = _value_grad(lambda: masked_neg_loss_from_dict(pred, target, mask, impl="chunked"),
                       leaves)
    got = _value_grad(lambda: masked_neg_loss_from_dict(cuda, tc, mc, impl="triton"),
                      list(cuda.values()))
    got = (got[0].cpu(), [g.cpu().float() for g in got[1]])
    want = (want[0], [g.float() for g in want[1]])
    # tf32x3 (fp32) / exact tf32 products (bf16) vs CPU fp32: fp32-level differences.
    _close(got, want, atol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
def test_triton_cuda_duplicate_test_is_fp32_accurate():
    """Cosines 1e-4 either side of 0.999 are decided as fp32 decides them (TF32 would not)."""
    torch.manual_seed(0)
    n, dim = 64, 768
    base = F.normalize(torch.randn(dim, dtype=torch.float64), dim=0)
    ortho = F.normalize(torch.randn(n, dim, dtype=torch.float64), dim=1)
    ortho = F.normalize(ortho - (ortho @ base)[:, None] * base, dim=1)
    cos = torch.where(torch.arange(n) % 2 == 0, 0.9991, 0.9989).to(torch.float64)
    tgt = (cos[:, None] * base + (1 - cos**2).sqrt()[:, None] * ortho).float()
    tgt[0] = base.float()  # row 0 is the reference direction
    pred = torch.randn(n, dim)
    off = torch.tensor([0, n], dtype=torch.int32)
    args = (off, torch.zeros(1, dtype=torch.int32), torch.ones(1, dtype=torch.bool), 1)
    want = M._fwd_chunked(pred, tgt, torch.arange(n), off, args[2], 0.1, 0.999, False)
    got = masked_neg_loss_fwd(pred.cuda(), tgt.cuda(), torch.arange(n).cuda(), off.cuda(),
                              args[2].cuda(), 0.1, 0.999)
    assert torch.equal(got[2].cpu(), want[2]) and torch.equal(got[3].cpu(), want[3])
    torch.testing.assert_close(got[0].cpu(), want[0], atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_triton_cuda_dict_path_has_no_host_sync():
    pred, target, mask = _inputs(10)
    pred = {m: v.detach().cuda().requires_grad_() for m, v in pred.items()}
    target = {m: v.cuda() for m, v in target.items()}
    mask = {m: v.cuda() for m, v in mask.items()}
    masked_neg_loss_from_dict(pred, target, mask).backward()  # compile / warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        masked_neg_loss_from_dict(pred, target, mask).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_triton_half_inputs_match_chunked(kernel_device):
    """fp16 inputs through the Triton kernels (interpreter on CPU, compiled on a GPU) equal the
    chunked path on the same fp16 inputs: the half-precision loads and casts that bf16 shares
    (the interpreter cannot compute in bf16, so bf16 itself is a `gpu` test)."""
    pred, target, mask = _inputs(11, torch.float16, dim=64)
    device = kernel_device
    dev = {m: v.detach().to(device).requires_grad_() for m, v in pred.items()}
    tgt, msk = {m: v.to(device) for m, v in target.items()}, {m: v.to(device) for m, v in mask.items()}
    want = _value_grad(lambda: masked_neg_loss_from_dict(pred, target, mask, impl="chunked"), list(pred.values()))
    got = _value_grad(lambda: masked_neg_loss_from_dict(dev, tgt, msk, impl="triton"), list(dev.values()))
    assert all(g.dtype == torch.float16 for g in got[1])
    _close((got[0].cpu(), [g.cpu().float() for g in got[1]]), (want[0], [g.float() for g in want[1]]), atol=1e-4)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_strided_segment_tensors_equal_contiguous(impl, kernel_device):
    """seg_offsets / seg_mask_neg / row_index views with stride 2 (e.g. a column of a table)
    give the contiguous result: the kernels read them at ptr + i, so the launcher makes them
    contiguous (seg_offsets used to be passed as given)."""
    device = _device(impl, kernel_device)
    pred, target, mask = _inputs(12, device=device)
    p = _packed({m: v.detach() for m, v in pred.items()}, target, mask)
    strided = lambda t: torch.stack([t, t], 1)[:, 0]  # noqa: E731  same values, stride 2
    args = (p.seg_modality, len(p.modalities))
    x = p.pred.clone().requires_grad_()
    xs = p.pred.clone().requires_grad_()
    want = masked_neg_loss(x, p.target, p.seg_offsets, args[0], p.seg_mask_neg, args[1],
                           row_index=p.row_index, impl=impl)
    off, neg, rows = strided(p.seg_offsets), strided(p.seg_mask_neg), strided(p.row_index)
    assert not (off.is_contiguous() or neg.is_contiguous() or rows.is_contiguous())
    got = masked_neg_loss(xs, p.target, off, args[0], neg, args[1], row_index=rows, impl=impl)
    want.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(xs.grad, x.grad, rtol=0, atol=0)
