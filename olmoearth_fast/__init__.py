"""olmoearth_fast: fast, faithful OlmoEarth masked-negatives pretraining.

Importing the package is cheap: the C++ extension (`olmoearth_fast._C`) is loaded by
`olmoearth_fast.ops` when an op is first needed, and Triton kernels by their dispatchers.
"""

__version__ = "0.1.0"
