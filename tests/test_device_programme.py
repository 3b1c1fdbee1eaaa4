"""The GPU programme (scripts/device/run.sh) rehearsed on CPU: its staging and budget logic.

`run.sh all --rehearse` runs the device programme's stages (setup, test, bench, curves) with CPU
torch, the Triton interpreter and small selections, under the same budget rules as on the
device: each stage gets min(cap, what is left - the later stages' minimum - a margin), each
command runs under `timeout`, a stage without enough time is skipped, a failing or cut stage
does not stop the run, and a watchdog stops anything still running at budget - margin. These
tests check that the run never takes longer than its budget, that every stage is accounted for
in summary.json, that results reach $OUT as they are made, and that the plan for the device's
540 s adds up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_SH = ROOT / "scripts" / "device" / "run.sh"
SLACK_S = 3  # process start-up and the last lines of the log, beyond the budget

pytestmark = pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")


def _run(args, out: Path, timeout_s: float, **env):
    e = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env}
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(RUN_SH), *args], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=timeout_s)
    return proc, time.monotonic() - t0


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_plan_for_the_device_fits_540s():
    proc = subprocess.run(["bash", str(RUN_SH), "plan", "--budget", "540"], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # stage, cap, min, reserve, share, verdict
    rows = {m[1]: m[6] for m in re.finditer(r"^(\w+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\w+)$",
                                            proc.stdout, re.M)}
    assert list(rows) == ["setup", "test", "bench", "curves"], proc.stdout
    # every stage runs even when each one before it takes its whole cap
    assert set(rows.values()) == {"runs"}, proc.stdout
    worst = int(re.search(r"worst case: (\d+) s of stages \+ (\d+)s margin = (\d+)s", proc.stdout).group(3))
    assert worst <= 540


def test_plan_shrinks_with_a_smaller_budget():
    proc = subprocess.run(["bash", str(RUN_SH), "plan", "--budget", "200"], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0
    assert "skipped" in proc.stdout  # not everything fits 200 s: the plan says so
    assert int(re.search(r"= (\d+)s <= 200s", proc.stdout).group(1)) <= 200
    bad = subprocess.run(["bash", str(RUN_SH), "all", "--budget", "ten"], cwd=ROOT, capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and "--budget must be whole seconds" in bad.stdout


def test_rehearsal_runs_every_stage_within_its_budget(tmp_path):
    """The whole programme on CPU. The curves stage runs the real command (eager vs compiled
    curves), capped at 10 s: it is cut or fails (torch.compile takes minutes on 2 CPUs), and
    the run still ends cleanly, in time, with every result file in $OUT."""
    out, budget = tmp_path / "out", 90
    proc, wall = _run(["all", "--rehearse", "--budget", str(budget)], out, budget + 30, STAGE_CAPS="curves=10")
    log = (out / "run.log").read_text()
    assert wall <= budget + SLACK_S, log[-3000:]
    summary = _summary(out)
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert list(status) == ["setup", "test", "bench", "curves"], summary
    assert status["setup"] == "ok" and status["test"] == "ok" and status["bench"] == "ok", log[-6000:]
    assert status["curves"] in ("ok", "failed", "timeout"), summary
    assert proc.returncode == (0 if status["curves"] == "ok" else 1)
    assert summary["rehearse"] is True and summary["elapsed_s"] <= budget
    for stage in status:
        assert f"==================== stage {stage}" in log
    # results reached $OUT: the merged junit of the test stage, the benchmark table
    junit = (out / "junit.xml").read_text()
    tests = sum(int(n) for n in re.findall(r'<testsuite [^>]*tests="(\d+)"', junit))
    assert tests > 0 and 'failures="0"' in junit
    bench = json.loads((out / "bench.json").read_text())
    assert [r["provider"] for r in bench["results"]] == ["ours"]
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8 and not any(f.endswith(".tmp") for f in files), files  # the device returns 8


def test_profile_stage_writes_where_the_step_time_goes(tmp_path):
    """`run.sh profile` (a second call's stage, not in `all`): scripts/profile_step.py's table,
    ours beside ref_best, in $OUT/profile.md and the log (on CPU: a nano step)."""
    out, budget = tmp_path / "out", 90
    proc, wall = _run(["profile", "--rehearse", "--budget", str(budget)], out, budget + 30)
    log = (out / "run.log").read_text()
    assert proc.returncode == 0 and wall <= budget + SLACK_S, log[-3000:]
    assert [s["stage"] for s in _summary(out)["stages"]] == ["setup", "profile"]
    table = (out / "profile.md").read_text()
    assert "| **step (profiled)** |" in table and "ours: the 5 operators of largest self time" in table, table
    assert re.search(r"\| computing operators a step [^|]*\| \d+ \| \d+ \|", table), table
    assert table.splitlines()[-1] in log


def test_watchdog_stops_a_command_outside_the_limits(tmp_path):
    """An unbounded command (a rehearsal hook sleeps 60 s in setup) cannot make the run overrun:
    the watchdog stops it at budget - margin, the later stages are skipped, the summary is
    written."""
    # 20 s: setup's share (budget - margin 5 - test's minimum 5 - start-up) stays above its
    # 5 s minimum even when the start-up is slow (at 15 s a 1 s start-up skipped setup)
    out, budget = tmp_path / "out", 20
    proc, wall = _run(["setup", "test", "--rehearse", "--budget", str(budget)], out, 60, REHEARSE_STALL="setup:60")
    log = (out / "run.log").read_text()
    assert wall <= budget + SLACK_S, log
    assert "watchdog" in log
    status = {s["stage"]: s["status"] for s in _summary(out)["stages"]}
    assert status["setup"] in ("failed", "timeout") and status["test"] == "skipped", status
    assert proc.returncode == 1
