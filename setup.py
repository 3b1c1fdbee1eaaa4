"""Build olmoearth_fast._C (C++ always, CUDA when available) and install kernels/.

Environment:
  OLMOEARTH_FAST_CUDA=1  force the CUDA extension (fails loudly without nvcc / CUDA torch)
  OLMOEARTH_FAST_CUDA=0  skip CUDA even where it is available
  DEBUG=1                -O0 -g instead of -O3
  MAX_JOBS               ninja parallelism (honoured by torch.utils.cpp_extension)
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - message for humans
    sys.exit(
        "olmoearth_fast needs PyTorch installed before it is built.\n"
        "  CPU:  pip install torch==2.13.0\n"
        "  GPU:  pip install torch  (a CUDA build)\n"
        "then:   pip install --no-build-isolation -e ."
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("OLMOEARTH_FAST_CUDA", "auto").lower()
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag in ("0", "false", "no"):
        return False
    if flag in ("1", "true", "yes"):
        if not available:
            sys.exit(
                "OLMOEARTH_FAST_CUDA=1 but no CUDA build of torch or no nvcc (CUDA_HOME) was found: "
                f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
            )
        return True
    return available


def _extension():
    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    extra = {"cxx": opt + ["-fopenmp"]}
    kwargs = dict(extra_link_args=["-fopenmp"])
    macros = []
    if _want_cuda():
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        extra["nvcc"] = opt + ["--expt-relaxed-constexpr"]
        return CUDAExtension("olmoearth_fast._C", sources, extra_compile_args=extra,
                             define_macros=macros + [("OLMOEARTH_FAST_WITH_CUDA", None)], **kwargs)
    return CppExtension("olmoearth_fast._C", sources, extra_compile_args=extra,
                        define_macros=macros, **kwargs)


setup(
    packages=["olmoearth_fast", "olmoearth_fast.data", "olmoearth_fast.model", "olmoearth_fast.ops",
              "olmoearth_fast.eval", "olmoearth_fast.kernels"],
    package_dir={"olmoearth_fast.kernels": "kernels"},
    package_data={"olmoearth_fast": ["norm_configs/*.json", "data/demo/*"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
