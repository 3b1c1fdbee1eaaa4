"""The test session's device choice (tests/conftest.py): kernel tests get CUDA tensors exactly
when the Triton kernels are compiled, CPU tensors when they run under the interpreter; fp32
GPU references run without TF32."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

CONFTEST = Path(__file__).with_name("conftest.py")


def _conftest():
    """A private copy of tests/conftest.py (its module-level set-up is idempotent)."""
    spec = importlib.util.spec_from_file_location("_conftest_under_test", CONFTEST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("cuda,interpret,want", [
    (True, None, ("cuda", False)),   # a GPU machine: compiled kernels, CUDA tensors
    (True, "0", ("cuda", False)),
    (True, "1", ("cpu", False)),     # interpreter asked for on a GPU machine: CPU tensors
    (False, None, ("cpu", True)),    # no GPU: the interpreter is switched on, CPU tensors
    (False, "1", ("cpu", False)),
])
def test_choose_kernel_device(cuda, interpret, want):
    assert _conftest().choose_kernel_device(cuda, interpret) == want


def test_session_choice_is_consistent(kernel_device):
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    assert kernel_device == ("cpu" if interpreted else "cuda")
    if not torch.cuda.is_available():
        assert interpreted


def test_tf32_is_off():
    assert torch.backends.cudnn.allow_tf32 is False
    assert torch.backends.cuda.matmul.allow_tf32 is False


def test_kernel_runs_on_the_chosen_device(kernel_device):
    pytest.importorskip("triton")
    from olmoearth_fast.ops.patch_embed import patch_embed

    x = torch.randn(1, 4, 4, 1, 2, device=kernel_device)
    w = torch.randn(8, 2, 8, 8, device=kernel_device)
    out = patch_embed(x, w, None, 2, impl="triton")
    assert out.device.type == kernel_device and out.shape == (1, 2, 2, 1, 8)
