"""Compile every Triton kernel of the package for an H100 (sm_90) on a machine without a GPU.

    python tests/triton_sm90.py [--quick]     # prints one JSON line per compiled kernel

The interpreter tests (TRITON_INTERPRET=1) check what the kernels compute, but the interpreter
accepts programs the GPU compiler rejects (dot shapes, dtype mixes, layouts) and says nothing
about registers or shared memory. This script runs the real launchers (`patch_embed_fwd`,
`patch_embed_bwd_effective` with its chunk reduction, `masked_neg_loss_fwd`,
`masked_neg_loss_bwd`) on CPU tensors with their GPU tile configurations, but turns every
kernel launch into a compile-only warmup for target sm_90 (the H100 and the H200 alike):
Triton's full pipeline down to a cubin (ptxas included, shipped with the triton wheel). Each
kernel's PTX is assembled once more with `ptxas -v` for its register and spill counts. Exit
status 1 if a kernel fails to compile, spills registers, or needs more shared memory than an
sm_90 block can have.

It must run in its own process with TRITON_INTERPRET unset (the test session sets it), which
`tests/test_triton_sm90.py` does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
H100_MAX_SHARED = 227 * 1024  # opt-in dynamic shared memory per block on sm_90


class _CompileOnlyDriver:
    """Stands in for the CUDA driver: reports an sm_90 target; nothing is ever launched."""

    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def resource_usage(kernel) -> dict[str, int]:
    """Registers, spill stores and stack frame of a compiled kernel: `ptxas -v` on its PTX,
    with the ptxas Triton itself uses for sm_90."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        out = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    usage = {"regs": r"Used (\d+) registers", "spill_stores": r"(\d+) bytes spill stores",
             "spill_loads": r"(\d+) bytes spill loads", "stack": r"(\d+) bytes stack frame"}
    return {k: int(m.group(1)) if (m := re.search(pat, out)) else -1 for k, pat in usage.items()}


class CompileLog:
    """Patch JITFunction.run so that launches compile for sm_90 and are recorded, not run."""

    def __init__(self):
        self.records: list[dict] = []
        self.case: dict = {}

    def __enter__(self):
        self._run = JITFunction.run
        log = self

        def run(fn, *args, grid, warmup, **kwargs):
            kernel = log._run(fn, *args, grid=grid, warmup=True, **kwargs)
            usage = resource_usage(kernel)
            log.records.append(dict(log.case, kernel=fn.fn.__name__, num_warps=kernel.metadata.num_warps,
                                    num_stages=kernel.metadata.num_stages,
                                    shared=kernel.metadata.shared, **usage))
            return kernel

        JITFunction.run = run
        self._active = getattr(driver, "_active", None)
        driver.set_active(_CompileOnlyDriver())
        return self

    def __exit__(self, *exc):
        JITFunction.run = self._run
        driver._active = self._active  # no public way back that does not probe for a GPU


def patch_embed_cases(quick: bool):
    from olmoearth_fast.kernels import patch_embed as kern

    from olmoearth_fast.ops.patch_embed_plan import effective_plan, effective_weights

    sizes = (1, 4, 8) if quick else tuple(range(1, 9))
    for dtype in (torch.float32, torch.bfloat16):
        for p in sizes:
            for c_all, c, d, dropout in ((12, 12, 768, True), (13, 2, 128, False)):
                yield dict(op="patch_embed", dtype=str(dtype).split(".")[-1], p=p, C=c, D=d, dropout=dropout), (
                    lambda p=p, c_all=c_all, c=c, d=d, dtype=dtype, dropout=dropout: _run_patch_embed(
                        kern, effective_plan, effective_weights, p, c_all, c, d, dtype, dropout))


def _run_patch_embed(kern, effective_plan, effective_weights, p, c_all, c, d, dtype, dropout):
    b, hw, t = 2, 3, 2
    x = torch.zeros(b, hw * p, hw * p, t, c_all, dtype=dtype)
    plan = effective_plan(p, hw * p, hw * p)
    e = effective_weights(torch.zeros(d, c, 8, 8), plan)
    keep = torch.ones(b, c) if dropout else None
    band = torch.arange(c) if c != c_all else None
    y = kern.patch_embed_fwd(x, e, torch.zeros(d), plan, keep, band)
    kern.patch_embed_bwd_effective(y, x, plan, c, keep, band)


def loss_cases(quick: bool):
    from olmoearth_fast.kernels import masked_neg_loss as kern

    for dtype in (torch.float32, torch.bfloat16) if quick else (torch.float32, torch.bfloat16, torch.float16):
        for d in (128, 768):
            yield dict(op="masked_neg_loss", dtype=str(dtype).split(".")[-1], D=d), (
                lambda dtype=dtype, d=d: _run_loss(kern, dtype, d))


def _run_loss(kern, dtype, d):
    n = 40
    pred, target = torch.zeros(n, d, dtype=dtype), torch.zeros(n, d, dtype=dtype)
    rows = torch.arange(n)
    off = torch.tensor([0, 17, 40], dtype=torch.int32)
    mask_neg = torch.tensor([True, False])
    lse, loss, _, ndup = kern.masked_neg_loss_fwd(pred, target, rows, off, mask_neg, 0.1, 0.999)
    kern.masked_neg_loss_bwd(pred, target, rows, off, mask_neg, lse, torch.ones(n), ndup, 0.1, 0.999)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a subset of the patch sizes and dtypes")
    args = ap.parse_args()
    failures = []
    with CompileLog() as log:
        for case, fn in [*patch_embed_cases(args.quick), *loss_cases(args.quick)]:
            log.case = case
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - report every failing case, then fail
                failures.append(f"{case}: compile failed: {type(exc).__name__}: {str(exc)[:2000]}")
    for rec in log.records:
        print(json.dumps(rec), flush=True)
        if rec["spill_stores"] or rec["spill_loads"]:
            failures.append(f"{rec}: spills registers to local memory")
        if rec["shared"] > H100_MAX_SHARED:
            failures.append(f"{rec}: needs {rec['shared']} B of shared memory (> {H100_MAX_SHARED})")
    for f in failures:
        print("FAIL", f, file=sys.stderr)
    print(json.dumps({"compiled": len(log.records), "failures": len(failures),
                      "triton": triton.__version__, "target": "sm_90"}))
    return 1 if failures or not log.records else 0


if __name__ == "__main__":
    sys.exit(main())
