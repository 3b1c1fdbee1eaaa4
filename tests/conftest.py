"""Test configuration shared by every test module.

Without CUDA, Triton kernels run under the interpreter (TRITON_INTERPRET=1, numpy-backed,
fp32 only), so every kernel test also runs on CPU CI. The variable must be set before
triton decorates any kernel, hence here, at collection time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
