"""Rewrite a reference-format H5 dataset with spatial chunks, so that a crop decompresses only
the part of each raster it reads.

    python -m olmoearth_fast.data.rechunk SRC DST [--chunk 32] [--workers 8] [--compression zstd]

The reference writes every raster as one zstd chunk (`olmoearth_fast/data/h5.py`), so reading any
crop of a sample decompresses the whole ``[H, W, T, C]`` array of every modality; the training
crops are much smaller than the 128-px tiles (``hw_p · p`` px with p ≤ 8, hw_p ≤ 12). Here each
spatial raster gets chunks of ``chunk × chunk`` px over all its months and bands, compressed as
the reference compresses (zstd level 3, or ``--compression``); everything else (timestamps,
masks, latlon, attributes, side files such as `sample_metadata.csv`) keeps its values. The result is the same HDF5 layout: any reader with
hdf5plugin (the reference's too) reads it unchanged, and the loader's batches are identical
(`tests/test_h5.py`). Measured (benchmarks/RESULTS.md, "The data loader"): one core reads a
sample 1.8× faster at the same file size.

Each file is written under a temporary name, checked against its source array by array, then
renamed: an interrupted run leaves no partial file, and running it again skips the files
already done.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

from olmoearth_fast.data.h5 import CorruptSampleError
from olmoearth_fast.errors import UserFileNotFoundError, UserValueError
from olmoearth_fast.modalities import MODALITIES

COMPRESSIONS = ("zstd", "gzip", "none")


def _filter(compression: str) -> dict:
    if compression == "zstd":
        return dict(hdf5plugin.Zstd(clevel=3))
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 3}
    return {}


def chunk_shape(name: str, shape: tuple[int, ...], chunk: int) -> tuple[int, ...] | None:
    """The chunks of dataset ``name``: ``chunk × chunk`` px over every month and band for a
    spatial modality's ``[H, W, T, C]`` raster, one chunk (the whole array) for any other
    non-empty array, None (contiguous) for scalars and empty arrays."""
    if len(shape) == 0 or 0 in shape:
        return None
    if name in MODALITIES and MODALITIES[name].is_spatial and len(shape) == 4:
        return (min(chunk, shape[0]), min(chunk, shape[1]), shape[2], shape[3])
    return tuple(shape)


def rechunk_file(src: str | os.PathLike, dst: str | os.PathLike, chunk: int = 32,
                 compression: str = "zstd") -> bool:
    """Write ``dst`` from sample file ``src`` (see the module doc). Returns False when ``dst``
    already exists (a finished file from an earlier run), True when written.

    Raises:
        CorruptSampleError: ``src`` cannot be read, or the copy read back differs (names the file).
    """
    dst = Path(dst)
    if dst.exists():
        return False
    tmp = dst.with_name(f".tmp-{dst.name}")
    kw = _filter(compression)
    try:
        with h5py.File(src, "r") as fi, h5py.File(tmp, "w") as fo:
            names: list[str] = []

            def copy(name, obj):
                if isinstance(obj, h5py.Group):
                    fo.require_group(name).attrs.update(obj.attrs)
                    return
                data = obj[()]
                chunks = chunk_shape(name, np.shape(data), chunk)
                out = fo.create_dataset(name, data=data, chunks=chunks, **(kw if chunks else {}))
                out.attrs.update(obj.attrs)
                names.append(name)

            fo.attrs.update(fi.attrs)
            fi.visititems(copy)
        with h5py.File(src, "r") as fi, h5py.File(tmp, "r") as fo:
            for name in names:
                a, b = fi[name], fo[name]
                if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(a[()], b[()]):
                    raise CorruptSampleError(f"{src}: the rechunked copy of {name!r} differs")
    except CorruptSampleError:
        tmp.unlink(missing_ok=True)
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        tmp.unlink(missing_ok=True)
        raise CorruptSampleError(f"{src}: cannot rechunk ({type(e).__name__}: {e})") from e
    os.replace(tmp, dst)
    return True


def _one(args: tuple[str, str, int, str]) -> bool:
    return rechunk_file(*args)


def rechunk_dataset(src: str | os.PathLike, dst: str | os.PathLike, chunk: int = 32,
                    compression: str = "zstd", workers: int = 1, log=print) -> tuple[int, int]:
    """Rechunk every ``sample_*.h5`` of directory ``src`` into ``dst`` (created) and copy the
    other files. Returns (files written, files already there).

    Raises:
        UserFileNotFoundError: ``src`` is not a directory or holds no sample file.
        UserValueError: a chunk below 1, an unknown compression, ``dst`` equal to ``src``.
        CorruptSampleError: a sample cannot be read or its copy differs.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise UserFileNotFoundError(f"{src} is not a directory of sample_*.h5 files")
    if chunk < 1:
        raise UserValueError(f"--chunk {chunk}: must be at least 1 (pixels per chunk side)")
    if compression not in COMPRESSIONS:
        raise UserValueError(f"--compression {compression!r}: use one of {', '.join(COMPRESSIONS)}")
    if dst.resolve() == src.resolve():
        raise UserValueError(f"the destination {dst} is the source: give another directory")
    samples = sorted(p.name for p in src.iterdir() if p.name.startswith("sample_") and p.suffix == ".h5")
    if not samples:
        raise UserFileNotFoundError(f"{src} holds no sample_*.h5 file")
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():  # side files: sample_metadata.csv, compression settings, ...
        if p.is_file() and p.name not in samples:
            shutil.copy2(p, dst / p.name)
    jobs = [(str(src / n), str(dst / n), chunk, compression) for n in samples]
    written = 0
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for i, done in enumerate(pool.map(_one, jobs, chunksize=16), 1):
                written += done
                if i % 1000 == 0:
                    log(f"{i}/{len(jobs)} files")
    else:
        for i, job in enumerate(jobs, 1):
            written += _one(job)
            if i % 1000 == 0:
                log(f"{i}/{len(jobs)} files")
    return written, len(jobs) - written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m olmoearth_fast.data.rechunk", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="directory of reference-format sample_*.h5 files")
    ap.add_argument("dst", help="output directory (created; files already there are kept)")
    ap.add_argument("--chunk", type=int, default=32, help="chunk side in pixels (default 32)")
    ap.add_argument("--compression", default="zstd", choices=COMPRESSIONS)
    ap.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    args = ap.parse_args(argv)
    try:
        written, kept = rechunk_dataset(args.src, args.dst, args.chunk, args.compression, args.workers)
    except (UserFileNotFoundError, UserValueError, CorruptSampleError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{args.dst}: {written} files written, {kept} already there (chunks {args.chunk} px)")


if __name__ == "__main__":
    main()
