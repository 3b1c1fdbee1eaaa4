"""Rewrite a reference-format H5 dataset with spatial chunks, so that a crop decompresses only
the part of each raster it reads.

    python -m olmoearth_fast.data.rechunk SRC DST [--chunk 32] [--workers 8] [--compression zstd]

The reference writes every raster as one zstd chunk (`olmoearth_fast/data/h5.py`), so reading any
crop of a sample decompresses the whole ``[H, W, T, C]`` array of every modality; the training
crops are much smaller than the 128-px tiles (``hw_p · p`` px with p ≤ 8, hw_p ≤ 12). Here each
spatial raster gets chunks of ``chunk × chunk`` px over all its months and bands, compressed as
the reference compresses (zstd level 3, or ``--compression``); everything else (timestamps,
masks, latlon, attributes, side files such as `sample_metadata.csv`) keeps its values. The
layout is the same HDF5 layout: any reader with hdf5plugin (the reference's too) reads it, and
the loader's batches are identical (`tests/test_loader.py`). Measured
(benchmarks/RESULTS.md, "The data loader"): one core reads a sample 1.8× faster at about the
same file size.

Each file is written under a temporary name, checked against its source array by array, then
renamed: an interrupted run leaves no partial file, and running it again skips the files
already done. A sample that cannot be read is copied as it is and named in the output, so the
loader meets the same files (`data.skip_corrupt` decides what it does with them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import h5py
import numpy as np

from olmoearth_fast.data.h5 import CorruptSampleError, compression_filter
from olmoearth_fast.errors import UserFileNotFoundError, UserValueError
from olmoearth_fast.modalities import MODALITIES

COMPRESSIONS = ("zstd", "gzip", "none")


class CopyMismatchError(RuntimeError):
    """A rechunked file read back differs from its source (never expected; names the file)."""


def _temporary(dst: Path) -> Path:
    """Where ``dst`` is written before it is renamed into place."""
    return dst.with_name(f".tmp-{dst.name}")


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
        CorruptSampleError: ``src`` cannot be read (names the file).
        CopyMismatchError: the copy read back differs.
    """
    dst = Path(dst)
    if dst.exists():
        return False
    try:  # the whole source first (a sample is tens of MB): a read error is the source's
        with h5py.File(src, "r") as fi:
            attrs = dict(fi.attrs)
            items: list[tuple[str, np.ndarray | None, dict]] = []  # (name, data or None for a group, attrs)
            fi.visititems(lambda name, obj: items.append(
                (name, None if isinstance(obj, h5py.Group) else obj[()], dict(obj.attrs))))
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise CorruptSampleError(f"{src}: cannot rechunk ({type(e).__name__}: {e})") from e
    tmp = _temporary(dst)
    kw = compression_filter(None if compression == "none" else compression)
    try:
        with h5py.File(tmp, "w") as fo:
            fo.attrs.update(attrs)
            for name, data, a in items:  # visititems lists a group before its members
                if data is None:
                    fo.require_group(name).attrs.update(a)
                    continue
                chunks = chunk_shape(name, np.shape(data), chunk)
                fo.create_dataset(name, data=data, chunks=chunks, **(kw if chunks else {})).attrs.update(a)
        with h5py.File(tmp, "r") as fo:
            for name, data, _ in items:
                if data is not None and not (fo[name].dtype == np.asarray(data).dtype
                                             and np.array_equal(fo[name][()], data)):
                    raise CopyMismatchError(f"{src}: the rechunked copy of {name!r} differs")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dst)
    return True


def _one(args: tuple[str, str, int, str]) -> str:
    """Rechunk one file: "written", "kept" (done before), or "copied" (unreadable: copied as is)."""
    src, dst = args[0], Path(args[1])
    try:
        return "written" if rechunk_file(*args) else "kept"
    except CorruptSampleError:
        tmp = _temporary(dst)
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)  # whole or not at all, as the rechunked files
        return "copied"


def rechunk_dataset(src: str | os.PathLike, dst: str | os.PathLike, chunk: int = 32,
                    compression: str = "zstd", workers: int = 1, log=print) -> dict[str, int]:
    """Rechunk every ``sample_*.h5`` of directory ``src`` into ``dst`` (created) and copy the
    other files. Returns how many sample files were written, kept (already there) and copied as
    they are (unreadable, each named through ``log``).

    Raises:
        UserFileNotFoundError: ``src`` is not a directory or holds no sample file.
        UserValueError: a chunk or worker count below 1, an unknown compression, ``dst`` equal
            to ``src``.
        CopyMismatchError: a rechunked copy differs from its source.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise UserFileNotFoundError(f"{src} is not a directory of sample_*.h5 files")
    if chunk < 1:
        raise UserValueError(f"--chunk {chunk}: must be at least 1 (pixels per chunk side)")
    if workers < 1:
        raise UserValueError(f"--workers {workers}: must be at least 1 (processes)")
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
    counts = {"written": 0, "kept": 0, "copied": 0}
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        results = pool.map(_one, jobs, chunksize=16) if pool else map(_one, jobs)
        for i, (job, outcome) in enumerate(zip(jobs, results), 1):
            counts[outcome] += 1
            if outcome == "copied":
                log(f"{job[0]}: unreadable, copied as it is")
            if i % 1000 == 0:
                log(f"{i}/{len(jobs)} files")
    finally:
        if pool:
            pool.shutdown()
    return counts


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
        n = rechunk_dataset(args.src, args.dst, args.chunk, args.compression, args.workers)
    except (UserFileNotFoundError, UserValueError, CopyMismatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{args.dst}: {n['written']} sample files written with {args.chunk}-px chunks, {n['kept']} already "
          f"there, {n['copied']} unreadable ones copied as they are")


if __name__ == "__main__":
    main()
