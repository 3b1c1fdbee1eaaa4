"""The CUDA sources compile with nvcc against the installed torch headers (object files only).

CPU machines cannot run them, but a broken .cu file must not wait for the next GPU session to be
noticed. CPU wheels of torch ship the CUDA headers except one CMake-generated file, which is
shimmed here with its release contents.
"""

import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("source", CU_FILES, ids=os.path.basename)
def test_cuda_source_compiles(source, tmp_path):
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    macros = os.path.join(include, "c10", "cuda", "impl", "cuda_cmake_macros.h")
    if not os.path.exists(macros):
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = [
        "nvcc", "-c", source, "-o", str(tmp_path / "out.o"), "-std=c++20", "-O2", "--expt-relaxed-constexpr",
        "-gencode", "arch=compute_90,code=sm_90",  # H100 / H200
        f"-I{tmp_path / 'shim'}", f"-I{include}", f"-I{os.path.join(include, 'torch', 'csrc', 'api', 'include')}",
        f"-I{sysconfig.get_paths()['include']}", f"-I{os.path.join(ROOT, 'csrc')}",
        "-Xcompiler", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-DOLMOEARTH_FAST_WITH_CUDA",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 0, "nvcc failed:\n" + "\n".join(errors[:40] or proc.stderr.splitlines()[-40:])
    assert (tmp_path / "out.o").stat().st_size > 0
