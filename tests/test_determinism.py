"""Run-to-run determinism of the GPU ops, and their deterministic mode.

* The patch-embed backward sums its per-chunk partials with an ordered reduction kernel (no
  atomics), so patch_embed is deterministic by default (tests/test_patch_embed_kernel.py checks
  on CPU that no `index_add_` is left in it; the gpu test below repeats a bf16 step).
* The loss op's O(rows) reduction and the encoder's `mean_pool` sum with `index_add_`: atomic on
  CUDA (the last bits of the loss may change from run to run) unless
  `torch.use_deterministic_algorithms(True)`, under which PyTorch's CUDA `index_add_` is a sorted
  `index_put_(accumulate=True)`.

On CPU: every op runs under the deterministic mode (no op here raises "does not have a
deterministic implementation") and gives the default mode's result bit for bit. On a GPU (`gpu`
tests): two runs under the deterministic mode are bitwise equal, and patch_embed is also without it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from olmoearth_fast.model.encoder import mean_pool
from olmoearth_fast.modalities import MaskValue
from olmoearth_fast.ops.band_dropout import band_dropout_keep
from olmoearth_fast.ops.patch_embed import patch_embed
from tests.helpers.masked_neg_loss_dict import masked_neg_loss_from_dict

DEC = int(MaskValue.DECODER)


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) for the test, restored after."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)


def _patch_embed_step(device, dtype=torch.float32, impl="triton", p=2):
    g = torch.Generator().manual_seed(0)
    B, hw, T, C, D = 2, 5, 2, 6, 32
    x = torch.randn(B, hw * p, hw * p, T, C + 1, generator=g).to(device, dtype)
    w = (torch.randn(D, C, 8, 8, generator=g) * 0.05).to(device).requires_grad_()
    b = torch.zeros(D, device=device, requires_grad=True)
    keep = band_dropout_keep(B, C, 0.3, generator=g).to(device)
    bi = torch.arange(C, device=device)
    grad = torch.randn(B, hw, hw, T, D, generator=g).to(device, dtype)
    out = patch_embed(x, w, b, p, keep, bi, impl=impl)
    gw, gb = torch.autograd.grad(out, (w, b), grad)
    return out.detach(), gw, gb


def _loss_step(device, impl):
    g = torch.Generator().manual_seed(1)
    B, N, D = 4, 40, 32
    classes = torch.randn(5, D, generator=g)
    pred = {m: torch.randn(B, N, D, generator=g).to(device).requires_grad_()
            for m in ("sentinel2_l2a", "worldcover")}
    target = {"sentinel2_l2a": torch.randn(B, N, D, generator=g).to(device),
              "worldcover": classes[torch.randint(0, 5, (B, N), generator=g)].to(device)}
    mask = {m: torch.where(torch.rand(B, N, generator=g) < 0.5, DEC, 0).to(device) for m in pred}
    loss = masked_neg_loss_from_dict(pred, target, mask, impl=impl)
    grads = torch.autograd.grad(loss, list(pred.values()))
    return (loss.detach(), *grads)


def _mean_pool_step(device):
    g = torch.Generator().manual_seed(2)
    lengths = torch.tensor([300, 1, 0, 517])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
    tokens = torch.randn(int(lengths.sum()), 64, generator=g).to(device).requires_grad_()
    seg = SimpleNamespace(batch=4, cu_seqlens=cu.to(device),
                          sample_ids=torch.repeat_interleave(torch.arange(4), lengths).to(device))
    pooled = mean_pool(SimpleNamespace(tokens=tokens, seg=seg))
    grad, = torch.autograd.grad(pooled, tokens, torch.ones_like(pooled))
    return pooled.detach(), grad


def _bitwise_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("impl", ["triton", "auto"])
def test_patch_embed_under_deterministic_mode(impl, kernel_device, deterministic):
    device = kernel_device if impl == "triton" else "cpu"
    got = _patch_embed_step(device, impl=impl)
    torch.use_deterministic_algorithms(False)
    _bitwise_equal(got, _patch_embed_step(device, impl=impl))


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_loss_under_deterministic_mode(impl, kernel_device, deterministic):
    device = kernel_device if impl == "triton" else "cpu"
    got = _loss_step(device, impl)
    torch.use_deterministic_algorithms(False)
    _bitwise_equal(got, _loss_step(device, impl))


def test_mean_pool_under_deterministic_mode(deterministic):
    got = _mean_pool_step("cpu")
    torch.use_deterministic_algorithms(False)
    _bitwise_equal(got, _mean_pool_step("cpu"))


# --------------------------------------------------------------------------------------------
# GPU: repeated runs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_patch_embed_is_deterministic_by_default(dtype):
    assert not torch.are_deterministic_algorithms_enabled()
    first = _patch_embed_step("cuda", dtype, p=1)
    for _ in range(3):
        _bitwise_equal(first, _patch_embed_step("cuda", dtype, p=1))


@pytest.mark.gpu
def test_cuda_loss_is_deterministic_in_deterministic_mode(deterministic):
    first = _loss_step("cuda", "triton")
    for _ in range(3):
        _bitwise_equal(first, _loss_step("cuda", "triton"))


@pytest.mark.gpu
def test_cuda_mean_pool_is_deterministic_in_deterministic_mode(deterministic):
    first = _mean_pool_step("cuda")
    for _ in range(3):
        _bitwise_equal(first, _mean_pool_step("cuda"))
