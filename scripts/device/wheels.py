"""The wheel kit for the GPU machine: measure what is needed, slim, check, smoke-import.

    python scripts/device/wheels.py measure [--out FILE] -- CMD [ARGS...]
        run CMD with an import recorder (every Python process it starts writes the names of its
        loaded modules), map the modules to distributions and print which ones the device image
        lacks (scripts/device/image_packages.txt) and whether scripts/device/wheels.txt has them.
        Exit 1 if a needed distribution is in neither. Run it in the dev venv.
    python scripts/device/wheels.py slim DIR
        shrink the large wheels in DIR in place (hdf5plugin: zstd/lz4/bzip2 filters only;
        botocore: the s3 and sts service models only); their RECORD is rewritten to match.
    python scripts/device/wheels.py check [--wheels DIR] [--installed]
        every requirement (Requires-Dist, markers evaluated for CPython 3.12 on x86_64 Linux) of
        every wheel in DIR is met by another wheel in DIR or by the image; one wheel per name;
        the pins of wheels.txt and the wheels agree. With --installed (on the device, after the
        install): the requirements are checked against the versions importlib.metadata finds in
        the running interpreter, so image packages are checked by version too.
    python scripts/device/wheels.py imports
        import every module the tests, benchmarks and scripts take from the reference packages
        and their chain, and round-trip a zstd-compressed H5 dataset; exit 1 on any failure.

Only the standard library and `packaging` (in the dev venv and in the device image) are used.
"""

from __future__ import annotations

import argparse
import email.parser
import importlib
import importlib.metadata as md
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
IMAGE_LIST = HERE / "image_packages.txt"
WHEELS_TXT = HERE / "wheels.txt"

# installed with --no-deps on purpose (requirements/reference.txt): their declared requirements
# (torch<2.10, ...) are not what they need to import; `measure` finds what they do need.
NO_DEPS = {"olmoearth-pretrain", "ai2-olmo-core"}

# the target of the wheels: the device's python3
TARGET_ENV = {"implementation_name": "cpython", "implementation_version": "3.12.3", "os_name": "posix",
              "platform_machine": "x86_64", "platform_python_implementation": "CPython",
              "platform_release": "", "platform_system": "Linux", "platform_version": "",
              "python_full_version": "3.12.3", "python_version": "3.12", "sys_platform": "linux"}

# what our code takes from the reference package and its chain (tests/parity, tests/*,
# benchmarks/*, scripts/compare_loss_curves.py, tests/helpers/refcompat.py)
SMOKE_MODULES = [
    "hdf5plugin", "h5py", "pandas", "psutil", "tifffile", "matplotlib", "sklearn", "pydantic", "upath",
    "pytest", "pytest_benchmark", "triton", "pkg_resources",
    "olmo_core.config", "olmo_core.io",
    "olmoearth_pretrain.datatypes", "olmoearth_pretrain.nn.flexi_vit", "olmoearth_pretrain.nn.flexi_patch_embed",
    "olmoearth_pretrain.nn.latent_mim", "olmoearth_pretrain.nn.tokenization", "olmoearth_pretrain.nn.pooling",
    "olmoearth_pretrain.train.loss", "olmoearth_pretrain.train.masking", "olmoearth_pretrain.data.constants",
    "olmoearth_pretrain.data.normalize", "olmoearth_pretrain.internal.utils", "olmoearth_pretrain.model_loader",
    "olmoearth_pretrain.evals",
]


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> set[str]:
    names = set()
    for line in IMAGE_LIST.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(_canon(line))
    return names


def pinned() -> dict[str, str]:
    pins = {}
    for line in WHEELS_TXT.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_canon(name)] = version.strip()
    return pins


def _wheel_metadata(path: Path) -> email.message.Message:
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        return email.parser.Parser().parsestr(z.read(name).decode())


def wheels_in(directory: Path) -> dict[str, tuple[str, Path, email.message.Message]]:
    out: dict[str, tuple[str, Path, email.message.Message]] = {}
    for path in sorted(directory.glob("*.whl")):
        meta = _wheel_metadata(path)
        name = _canon(meta["Name"])
        if name in out:
            raise SystemExit(f"two wheels of {name}: {out[name][1].name} and {path.name} (pip refuses to install both)")
        out[name] = (meta["Version"], path, meta)
    return out


# ----------------------------------------------------------------------------------- measure
_HOOK = '''
import atexit, os, sys
def _olmoearth_fast_dump_modules():
    try:
        with open(os.path.join(os.environ["OLMOEARTH_FAST_MODLOG"], f"{os.getpid()}.txt"), "w") as f:
            f.write("\\n".join(sorted(sys.modules)))
    except Exception:
        pass
atexit.register(_olmoearth_fast_dump_modules)
'''


def cmd_measure(args) -> int:
    if not args.cmd:
        raise SystemExit("usage: wheels.py measure -- CMD [ARGS...]")
    with tempfile.TemporaryDirectory() as tmp:
        hook, log = Path(tmp, "hook"), Path(tmp, "log")
        hook.mkdir()
        log.mkdir()
        (hook / "sitecustomize.py").write_text(_HOOK)
        env = dict(os.environ, OLMOEARTH_FAST_MODLOG=str(log),
                   PYTHONPATH=os.pathsep.join([str(hook)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        rc = subprocess.call(args.cmd, env=env)
        modules: set[str] = set()
        for f in log.glob("*.txt"):
            modules |= set(f.read_text().split())
    if args.out:
        Path(args.out).write_text("\n".join(sorted(modules)) + "\n")
    return report_closure(modules, rc)


def report_closure(modules: set[str], rc: int = 0) -> int:
    by_top = md.packages_distributions()
    dists: dict[str, set[str]] = {}
    for top in {m.split(".")[0] for m in modules}:
        for d in by_top.get(top, []):
            dists.setdefault(d, set()).add(top)
    image, pins = image_packages(), pinned()
    missing = []
    print(f"{'distribution':<28} {'version':<22} where")
    for d in sorted(dists, key=str.lower):
        c = _canon(d)
        try:
            version = md.version(d)
        except md.PackageNotFoundError:
            version = "?"
        if c == "olmoearth-fast":
            where = "this repo"
        elif c in pins:
            where = f"wheels.txt ({pins[c]})" + (" and image" if c in image else "")
        elif c in image:
            where = "image"
        else:
            where = "MISSING: neither image nor wheels.txt"
            missing.append(d)
        print(f"{d:<28} {version:<22} {where}")
    print(f"\n{len(dists)} distributions loaded; command exit status {rc}")
    if missing:
        print("add to scripts/device/wheels.txt: " + " ".join(f"{d}=={md.version(d)}" for d in missing))
    return 1 if missing or rc else 0


# -------------------------------------------------------------------------------------- slim
def _keep_hdf5plugin(name: str) -> bool:
    m = re.fullmatch(r"hdf5plugin/plugins/libh5([a-z0-9]+)\.so", name)
    return m is None or m.group(1) in ("zstd", "lz4", "bzip2")


def _keep_botocore(name: str) -> bool:
    m = re.match(r"botocore/data/([^/]+)/", name)
    return m is None or m.group(1) in ("s3", "sts")


SLIM = {"hdf5plugin": _keep_hdf5plugin, "botocore": _keep_botocore}


def slim_wheel(path: Path, keep) -> tuple[int, int]:
    """Rewrite `path` without the files `keep` rejects (their RECORD lines too)."""
    before = path.stat().st_size
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        dropped = [i.filename for i in infos if not keep(i.filename)]
        if not dropped:
            return before, before
        tmp = path.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as out:
            for info in infos:
                if info.filename in dropped:
                    continue
                data = z.read(info)
                if re.fullmatch(r"[^/]+\.dist-info/RECORD", info.filename):
                    gone = set(dropped)
                    lines = [ln for ln in data.decode().splitlines() if ln.split(",", 1)[0] not in gone]
                    data = ("\n".join(lines) + "\n").encode()
                out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    tmp.replace(path)
    return before, path.stat().st_size


def cmd_slim(args) -> int:
    for path in sorted(Path(args.dir).glob("*.whl")):
        name = _canon(path.name.split("-")[0])
        if name in SLIM:
            before, after = slim_wheel(path, SLIM[name])
            print(f"slimmed {path.name}: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")
    return 0


# ------------------------------------------------------------------------------------- check
def cmd_check(args) -> int:
    from packaging.requirements import Requirement
    from packaging.version import Version

    directory = Path(args.wheels)
    wheels = wheels_in(directory)
    image, pins = image_packages(), pinned()
    problems: list[str] = []
    for name, version in pins.items():
        if name not in wheels:
            problems.append(f"wheels.txt pins {name}=={version} but {directory} has no wheel of it")
        elif wheels[name][0] != version:
            problems.append(f"wheels.txt pins {name}=={version} but the wheel is {wheels[name][0]}")
    for name in wheels:
        if name not in pins:
            problems.append(f"{wheels[name][1].name} is not in wheels.txt")
    # markers: for the device's python3, or (--installed) for the interpreter running this
    marker_env = {"extra": ""} if args.installed else dict(TARGET_ENV, extra="")
    image_reqs: dict[str, list[str]] = {}
    for name, (version, path, meta) in sorted(wheels.items()):
        if name in NO_DEPS:
            continue
        for spec in meta.get_all("Requires-Dist") or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate(marker_env):
                continue
            dep = _canon(req.name)
            if args.installed:
                try:
                    have = md.version(req.name)
                except md.PackageNotFoundError:
                    problems.append(f"{name} {version} needs {req}: not installed")
                    continue
                if not req.specifier.contains(Version(have), prereleases=True):
                    problems.append(f"{name} {version} needs {req}: {have} installed")
            elif dep in wheels:
                if not req.specifier.contains(Version(wheels[dep][0]), prereleases=True):
                    problems.append(f"{name} {version} needs {req}: the wheel is {wheels[dep][0]}")
            elif dep in image:
                if str(req.specifier):
                    image_reqs.setdefault(dep, []).append(f"{req.specifier!s} ({name})")
            else:
                problems.append(f"{name} {version} needs {req}: neither a wheel nor in the image")
    total = sum(p.stat().st_size for _, p, _ in wheels.values())
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {directory}")
    if image_reqs and not args.installed:
        print("requirements left to the image (its versions are unknown here; `check --installed` on the device "
              "checks them):")
        for dep, specs in sorted(image_reqs.items()):
            print(f"  {dep}: {'; '.join(specs)}")
    if args.installed:
        print("versions found:", ", ".join(f"{n} {_version_or_none(n)}" for n in
                                           ("torch", "triton", "numpy", "h5py", "pandas", "setuptools", "protobuf",
                                            "typing_extensions", "rich", "requests", "scikit-learn", "pytest",
                                            "pytest-benchmark", "hdf5plugin", "pydantic")))
    for p in problems:
        print("PROBLEM:", p)
    print("check: OK" if not problems else f"check: {len(problems)} problem(s)")
    return 1 if problems else 0


def _version_or_none(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------------- imports
def cmd_imports(args) -> int:
    import warnings

    warnings.simplefilter("ignore")
    failed = []
    for name in SMOKE_MODULES:
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(name)
            where = getattr(mod, "__file__", "") or ""
            print(f"ok    {name:<44} {time.perf_counter() - t0:6.2f}s  {where}")
        except Exception as e:  # noqa: BLE001 - report every failure
            failed.append(name)
            print(f"FAIL  {name:<44} {type(e).__name__}: {e}")
    try:  # the H5 reader's filter: write and read back a zstd-compressed dataset
        import h5py
        import hdf5plugin
        import numpy as np

        with tempfile.TemporaryDirectory() as tmp:
            a = np.arange(4096, dtype=np.float32).reshape(64, 64)
            with h5py.File(os.path.join(tmp, "z.h5"), "w") as f:
                f.create_dataset("a", data=a, chunks=a.shape, **hdf5plugin.Zstd(clevel=3))
            with h5py.File(os.path.join(tmp, "z.h5"), "r") as f:
                assert (f["a"][()] == a).all()
        print("ok    h5py + hdf5plugin zstd round trip")
    except Exception as e:  # noqa: BLE001
        failed.append("zstd round trip")
        print(f"FAIL  h5py + hdf5plugin zstd round trip: {type(e).__name__}: {e}")
    print("imports: OK" if not failed else f"imports: {len(failed)} failed: {', '.join(failed)}")
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--out", default=None, help="also write the loaded module names here")
    m.add_argument("cmd", nargs=argparse.REMAINDER)
    s = sub.add_parser("slim")
    s.add_argument("dir")
    c = sub.add_parser("check")
    c.add_argument("--wheels", default=str(ROOT / ".whl"))
    c.add_argument("--installed", action="store_true")
    sub.add_parser("imports")
    args = ap.parse_args(argv)
    if args.command == "measure" and args.cmd[:1] == ["--"]:
        args.cmd = args.cmd[1:]
    return {"measure": cmd_measure, "slim": cmd_slim, "check": cmd_check, "imports": cmd_imports}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
