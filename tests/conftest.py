"""Test configuration shared by every test module.

Where the Triton kernels run decides where their test tensors must live, and both are decided
here, once, by `choose_kernel_device`:

* CUDA present and TRITON_INTERPRET not "1": the kernels are compiled for the GPU, so kernel
  tests put their tensors on "cuda" (a CPU tensor handed to a compiled kernel is an illegal
  address on the GPU, not a test failure that names the cause).
* otherwise: the kernels run under the Triton interpreter (numpy-backed, CPU tensors only), and
  TRITON_INTERPRET=1 is set here, at collection time, before triton decorates any kernel.

Tests get the choice from the `kernel_device` fixture (never from their own
`torch.cuda.is_available()`, which disagrees with the interpreter on a GPU machine run with
TRITON_INTERPRET=1).

fp32 comparisons on a GPU: cuDNN convolutions default to TF32 (10-bit mantissa, ~5e-4 relative
error), which is looser than the fp32 tolerances here (1e-4 relative on patch embed, 1e-5 on the
one-step training loss); matmuls follow the same switch. `disable_tf32` turns both off for the
session, so fp32 references are IEEE fp32. The kernels' own fp32 dots choose their precision
explicitly (tf32x3) and do not read these flags.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def choose_kernel_device(cuda_available: bool, triton_interpret: str | None) -> tuple[str, bool]:
    """(device for kernel-test tensors, whether TRITON_INTERPRET=1 must be set).

    Args:
        cuda_available: `torch.cuda.is_available()`.
        triton_interpret: the TRITON_INTERPRET environment value (None when unset).

    An explicit TRITON_INTERPRET=1 wins (interpreter, CPU tensors) even on a GPU machine; any
    other value with CUDA compiles the kernels (CUDA tensors); without CUDA the interpreter is
    the only way to run them.
    """
    if triton_interpret == "1":
        return "cpu", False  # already set
    if cuda_available:
        return "cuda", False
    return "cpu", True


def disable_tf32() -> None:
    """IEEE fp32 for cuDNN convolutions and CUDA matmuls (the legacy switches: setting the new
    per-backend `fp32_precision` beside them makes torch raise on a later read of allow_tf32)."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


KERNEL_DEVICE, _SET_INTERPRET = choose_kernel_device(HAS_CUDA, os.environ.get("TRITON_INTERPRET"))
if _SET_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
disable_tf32()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def kernel_device() -> str:
    """Device for tensors handed to the Triton kernels ("cuda" compiled, "cpu" interpreter)."""
    return KERNEL_DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
