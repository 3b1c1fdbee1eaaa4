"""Every Triton kernel compiles for the H100 (sm_90) with its GPU tile configurations, without
register spills, within the H100's shared memory: `tests/triton_sm90.py` in a subprocess
(it needs TRITON_INTERPRET unset, which this session sets). The interpreter tests check the
arithmetic; this checks what only the GPU compiler sees, before a GPU session does."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton.backends.nvidia.compiler")

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_sm90.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels run for real (tests marked gpu)")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, proc.stderr[-6000:]
    summary, records = lines[-1], lines[:-1]
    assert summary["failures"] == 0 and summary["compiled"] == len(records)
    # every launcher ran in both dtypes, and all five kernels compiled
    assert {r["kernel"] for r in records} == {"_patch_embed_fwd_kernel", "_patch_embed_bwd_kernel",
                                              "_reduce_chunks_kernel", "_masked_neg_loss_fwd_kernel",
                                              "_masked_neg_loss_bwd_kernel"}
    assert {r["dtype"] for r in records} >= {"float32", "bfloat16"}
    assert {r["p"] for r in records if r["op"] == "patch_embed"} == set(range(1, 9))
