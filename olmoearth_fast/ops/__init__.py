"""One public function per op; each picks Triton / C++ / reference by device."""

from olmoearth_fast.ops.packing import (
    gather_rows,
    merge_gather,
    merge_index,
    pack,
    scatter_rows,
    unmerge_scatter,
    unpack,
    varlen_index,
)

__all__ = ["gather_rows", "merge_gather", "merge_index", "pack", "scatter_rows", "unmerge_scatter", "unpack",
           "varlen_index"]
