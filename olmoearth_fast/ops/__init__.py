"""One public function per op, in the module of the same name, its reference beside it; each
picks Triton / C++ / reference by device: `ops.packing` (pack, unpack, merge indexing),
`ops.patch_embed` (its effective-kernel maths in `ops.patch_embed_plan`), `ops.band_dropout`,
`ops.masked_neg_loss`, the CPU C++ ops `ops.segment_attention`, `ops.bias_gelu` and
`ops.residual_norm`, and
`ops.linear` (oneDNN's inner product for the blocks' Linear layers on CPU) with the C++
`ops.transpose` its gradients use.
(Functions are not re-exported here: `patch_embed` and `masked_neg_loss` would shadow their
modules.)
"""

import contextlib
import functools
import os
import platform

import torch

KERNELS_ENV = "OLMOEARTH_FAST_KERNELS"
_KERNEL_CHOICES = ("auto", "triton", "pytorch")


def forced_kernels() -> str | None:
    """What ``OLMOEARTH_FAST_KERNELS`` makes the ops' ``impl="auto"`` pick, or None (by device).

    ``auto`` (or unset): Triton on CUDA, PyTorch on CPU. ``triton``: the Triton kernels
    everywhere (on CPU they need TRITON_INTERPRET=1: slow, for tests). ``pytorch``: the PyTorch
    paths everywhere (the reference patch embedding, the chunked loss), e.g. to bisect a
    difference on a GPU. Read at every call, so a test or a shell can switch it.
    """
    value = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if value not in _KERNEL_CHOICES:
        raise ValueError(f"{KERNELS_ENV}={os.environ[KERNELS_ENV]!r}: expected one of {', '.join(_KERNEL_CHOICES)}")
    return None if value == "auto" else value


def eager_cpu_fp32(x: torch.Tensor) -> bool:
    """Whether ``x`` is a CPU fp32 tensor outside CPU autocast and ``torch.compile``, and the
    kernels are not forced to PyTorch: where the CPU C++ / oneDNN paths of `ops.bias_gelu` and
    `ops.linear` apply (each adds whether its own kernel is available)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling() and forced_kernels() != "pytorch")


@functools.cache
def cpu_model() -> tuple[str, str]:
    """This machine's CPU as ``(vendor, model name)``, e.g. ``("AuthenticAMD", "AMD EPYC 9R14")``
    or ``("GenuineIntel", "Intel(R) Xeon(R) Processor")``, from ``/proc/cpuinfo`` (Linux);
    elsewhere ``("", platform.processor())``. The vendor decides which CPU GEMM library runs
    the AVX-512 kernels (`ops.linear`)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if not sep:
                    if fields:
                        break  # the first processor's block is enough
                    continue
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields.get("vendor_id", ""), fields.get("model name", "") or platform.processor() or platform.machine()


def no_autocast(device: torch.device):
    """Autocast off on `device` for the enclosed ops (an op that computes in its input's dtype)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()
