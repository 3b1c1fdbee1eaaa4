"""The patch embedding's resize into token rows (csrc/resize_patches.cpp) against its reference
(`F.interpolate`, then the same layout): bit for bit, on both of the op's paths."""

import pytest
import torch

from olmoearth_fast.ops import resize_patches as rp

MISSING = -99999.0


def _case(p, h, w, seed, T=3, c_all=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, h * p, w * p, T, c_all, generator=g) * 3
    x[0, 0, 0, 0, :] = MISSING  # missing pixels are ordinary values, as in the reference
    x[1, -1, p, 1, 2] = MISSING
    return x, torch.randperm(c_all, generator=g)[:4]


@pytest.mark.parametrize("p", range(1, 9))
@pytest.mark.parametrize("portable", [False, True])
def test_equals_interpolate_bit_for_bit(p, portable):
    for h, w, seed in ((3, 2, p), (1, 5, 10 + p), (6, 6, 20 + p)):
        x, bands = _case(p, h, w, seed)
        want = rp.resize_patches_ref(x, bands, p)
        if portable:  # the scalar path of CPUs without AVX-512
            rows, cols = rp._axis_taps(h * p, h * 8), rp._axis_taps(w * p, w * 8)
            got = torch.ops.olmoearth_fast.resize_patches(x, bands, *rows, *cols, 8, True)
        else:
            got = rp.resize_patches(x, bands, p)
        assert got.shape == (2 * 3 * h * w, 64 * 4)
        assert torch.equal(got, want)


def test_layout_is_one_row_per_token():
    """Row ((b·T + t)·h + i)·w + j, column (u·8 + v)·C + c: pixel (8i + u, 8j + v) of band c."""
    x, bands = _case(2, 3, 2, 0)
    rows = rp.resize_patches(x, bands, 2)
    img = torch.nn.functional.interpolate(x[..., bands].permute(0, 3, 4, 1, 2).reshape(6, 4, 6, 4), size=(24, 16),
                                          mode="bicubic", antialias=True)  # [(b t), c, 8h, 8w]
    b, t, i, j, u, v, c = 1, 2, 2, 1, 5, 3, 1
    assert rows[((b * 3 + t) * 3 + i) * 2 + j, (u * 8 + v) * 4 + c] == img[b * 3 + t, c, 8 * i + u, 8 * j + v]


def test_all_bands_and_other_dtypes():
    x, _ = _case(4, 2, 2, 1)
    torch.testing.assert_close(rp.resize_patches(x, None, 4), rp.resize_patches_ref(x, None, 4), rtol=0, atol=0)
    x64 = x.double()
    assert not rp.uses_kernel(x64)
    assert rp.resize_patches(x64, None, 4).dtype == torch.float64


def test_bad_input_is_refused():
    x, bands = _case(4, 2, 2, 2)
    with pytest.raises(ValueError, match="multiples of patch_size"):
        rp.resize_patches(x[:, :7], bands, 4)
    with pytest.raises(ValueError, match=r"\[B, H, W, T, C_all\]"):
        rp.resize_patches(x[0], bands, 4)
    with pytest.raises(ValueError, match="1 <= patch_size"):
        rp.resize_patches(x, bands, 9)
    with pytest.raises(ValueError, match="requires grad"):  # no silent missing gradient
        rp.resize_patches(x.clone().requires_grad_(), bands, 4)
    with torch.no_grad():
        assert rp.resize_patches(x.clone().requires_grad_(), bands, 4).shape == (2 * 3 * 4, 64 * 4)
    with pytest.raises(RuntimeError, match="out of range"):
        rp.resize_patches(x, torch.tensor([0, 7]), 4)
    rows, cols = rp._axis_taps(8, 16), rp._axis_taps(8, 16)
    bad = (rows[0] + 5, rows[1], rows[2])  # taps past the image
    with pytest.raises(RuntimeError, match="reads inputs"):
        torch.ops.olmoearth_fast.resize_patches(x, bands, *bad, *cols, 8)
