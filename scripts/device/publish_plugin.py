"""pytest plugin used by scripts/device/run.sh: publish result files after every test.

    OLMOEARTH_PUBLISH="benchmarks/last_run.json=$OUT/bench.json" \\
        python -m pytest -p publish_plugin ...        (scripts/device on PYTHONPATH)

After each test (and once more when pytest ends) every `src=dst` pair of
OLMOEARTH_PUBLISH (';'-separated) is copied when src changed since the last copy: to dst.tmp
in dst's folder, then renamed over dst (atomic), so $OUT always holds a whole file with every
case finished so far, also when the run is cut off by a time limit. benchmarks/conftest.py
rewrites last_run.json after every case; this makes that reach $OUT as soon as the case ends,
without a change to the benchmarks. A src as it was when pytest started (a stale file from an
earlier run) is never published.
"""

from __future__ import annotations

import os
import shutil

_seen: dict[str, tuple[float, int]] = {}


def _pairs() -> list[tuple[str, str]]:
    spec = os.environ.get("OLMOEARTH_PUBLISH", "")
    return [tuple(p.split("=", 1)) for p in spec.split(";") if "=" in p]


def publish() -> None:
    for src, dst in _pairs():
        stamp = _stamp(src)
        if stamp is None or _seen.get(src) == stamp:
            continue
        tmp = dst + ".tmp"
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        except OSError as exc:  # never fail a test run over a copy
            print(f"publish: {src} -> {dst} failed: {exc}")
            continue
        _seen[src] = stamp


def _stamp(path: str) -> tuple[float, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime, st.st_size


def pytest_configure(config):
    for src, _ in _pairs():
        if (stamp := _stamp(src)) is not None:
            _seen[src] = stamp  # what was there before this run


def pytest_runtest_logfinish(nodeid, location):
    publish()


def pytest_unconfigure(config):  # after the terminal summary, which rewrites last_run.json
    publish()
