#!/usr/bin/env bash
# The GPU programme, one entry point: bash scripts/device/run.sh STAGE...
#
#   setup    install the carried wheels (.whl/ -> $SITE) when they fit this interpreter, put the repo
#            and $SITE on PYTHONPATH, build olmoearth_fast._C in place (CUDA when torch sees a GPU;
#            skipped when the sources, torch and Python are those of the last build), print the
#            machine, check the wheels against the installed versions, smoke-import the reference.
#            It runs first on every call, named or not (seconds when nothing changed).
#   test     pytest -m gpu; then tests/parity and the kernel tests (their non-gpu rest);
#            TEST_ALL=1 adds the rest of the suite. -> $OUT/test.log, $OUT/junit.xml
#   bench    pytest benchmarks --benchmark-only -> $OUT/bench.log, bench.json, bench_last_run.json
#   curves   scripts/compare_loss_curves.py, 200 steps of base_shallow_decoder on CUDA (without CUDA:
#            a 3-step nano smoke run on CPU) -> $OUT/curves.log, curves.json
#
# Stages run in the order given; a failing stage does not stop the later ones; the exit status is
# non-zero when any stage failed. Each stage's output goes to $OUT/<stage>.log (OUT unset: ./runs/
# device_out) with its wall time. Every long command is bounded by what is left of RUN_BUDGET_S
# (default 570 s when OUT is set, i.e. on the device, whose calls end at 600 s; unlimited locally),
# so logs and results come back even when a stage runs long.
#
# Knobs (environment): PYTHON (default: .venv/bin/python if present, else python3), WHEELS (.whl),
# SITE (/tmp/site), MAX_JOBS (16), TEST_ALL (0), TEST_WORKERS (pytest-xdist -n), TEST_ARGS,
# BENCH_ARGS (e.g. "-k train_step"), CURVES_STEPS, CURVES_SIZE, CURVES_DEVICE, CURVES_ARGS (extra arguments and dotted overrides),
# RUN_BUDGET_S. See scripts/device/README.md for the device calls.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
T_START=$(date +%s)
if [[ -n "${OUT:-}" ]]; then
    RUN_BUDGET_S=${RUN_BUDGET_S:-570}
else
    OUT=$REPO/runs/device_out
    RUN_BUDGET_S=${RUN_BUDGET_S:-0}
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
PY=$PYTHON
WHEELS=${WHEELS:-$REPO/.whl}
SITE=${SITE:-/tmp/site}
WORK=${TMPDIR:-/tmp}/olmoearth_fast_device
mkdir -p "$WORK"
HAS_CUDA=0

usage() {
    sed -n '2,/^set /p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//'
}

# seconds left of RUN_BUDGET_S minus a margin ($1) (may be <= 0); "" when unlimited
left() {
    local margin=${1:-15}
    if [[ "$RUN_BUDGET_S" -le 0 ]]; then echo ""; return; fi
    echo $((RUN_BUDGET_S - ($(date +%s) - T_START) - margin))
}

# bounded COMMAND...: run it under `timeout` with what is left of the budget (skip it when < 10 s)
bounded() {
    local l
    l=$(left 20)
    if [[ -z "$l" ]]; then "$@"; return; fi
    if ((l < 10)); then
        echo "[run.sh] SKIPPED (RUN_BUDGET_S=$RUN_BUDGET_S spent): $*"
        return 124
    fi
    echo "[run.sh] time limit for this command: ${l}s (RUN_BUDGET_S=$RUN_BUDGET_S)"
    timeout -k 15 "$l" "$@"
    local rc=$?
    ((rc == 124 || rc == 137)) && echo "[run.sh] TIMED OUT after ${l}s: $*"
    return $rc
}

# ------------------------------------------------------------------------------------ setup
wheels_compatible() {  # are the carried wheels for this interpreter (cp312 wheels vs a 3.11 venv)?
    "$PY" - "$WHEELS" <<'EOF'
import sys
from pathlib import Path
from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename
supported = set(sys_tags())
bad = [w.name for w in sorted(Path(sys.argv[1]).glob("*.whl")) if not set(parse_wheel_filename(w.name)[3]) & supported]
if bad:
    print(f"not for this interpreter ({sys.version.split()[0]}): {', '.join(bad[:4])}" + (" ..." if len(bad) > 4 else ""))
sys.exit(1 if bad else 0)
EOF
}

install_wheels() {
    if [[ ! -d "$WHEELS" ]] || ! compgen -G "$WHEELS/*.whl" > /dev/null; then
        echo "wheels: no $WHEELS/*.whl; using the interpreter's own packages (on the device the reference"
        echo "        imports then fail: run scripts/device/fetch_wheels.sh here and carry [\".whl\"])"
        return 0
    fi
    local why
    if ! why=$(wheels_compatible); then
        echo "wheels: $WHEELS holds wheels $why; not installing them (local run: the interpreter's own packages are used)"
        return 0
    fi
    local fp
    fp=$(cd "$WHEELS" && ls -l -- *.whl | awk '{print $5, $NF}' | sha256sum | cut -c1-16)
    if [[ -f "$SITE/.olmoearth_fast_wheels" && "$(cat "$SITE/.olmoearth_fast_wheels")" == "$fp" ]]; then
        echo "wheels: already installed in $SITE ($fp)"
    else
        echo "wheels: installing $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE"
        rm -rf "$SITE"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$WHEELS"/*.whl || { echo "wheels: pip install FAILED"; return 1; }
        echo "$fp" > "$SITE/.olmoearth_fast_wheels"
    fi
    SITE_IN_USE=1
    export PYTHONPATH="$REPO:$SITE${PYTHONPATH_BEFORE:+:$PYTHONPATH_BEFORE}"
}

build_extension() {
    if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() and torch.version.cuda else 1)'; then
        HAS_CUDA=1
    fi
    local suffix so stamp_file stamp
    suffix=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
    so=olmoearth_fast/_C$suffix
    stamp_file=build/olmoearth_fast_C.stamp
    if ((HAS_CUDA == 0)); then
        echo "build: CUDA unavailable here (torch.cuda.is_available() is False): CUDA build SKIPPED"
        if "$PY" -c 'import torch, olmoearth_fast._C' 2> /dev/null; then
            echo "build: using the existing CPU extension $("$PY" -c 'import torch, olmoearth_fast._C as c; print(c.__file__)')"
            return 0
        fi
        echo "build: no importable extension: building the C++ (CPU) one in place"
        OLMOEARTH_FAST_CUDA=0 MAX_JOBS=${MAX_JOBS:-16} bounded "$PY" setup.py -q build_ext --inplace
        return $?
    fi
    stamp=$( (cat setup.py pyproject.toml; find csrc -type f | LC_ALL=C sort | xargs cat;
              "$PY" -c 'import sys, torch; print(sys.version, torch.__version__, torch.version.cuda)') | sha256sum | cut -c1-16)
    if [[ -f "$so" && -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" ]]; then
        echo "build: $so is up to date (sources, torch and Python unchanged: $stamp); not rebuilt"
    else
        echo "build: OLMOEARTH_FAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace"
        local t0=$(date +%s)
        OLMOEARTH_FAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} bounded "$PY" setup.py build_ext --inplace \
            || { echo "build: FAILED"; return 1; }
        mkdir -p build && echo "$stamp" > "$stamp_file"
        echo "build: done in $(($(date +%s) - t0))s -> $so"
    fi
    "$PY" - <<'EOF'
import torch
import olmoearth_fast._C as c
ops = ["varlen_index", "merge_index", "gather_rows", "scatter_rows"]
missing = [o for o in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"olmoearth_fast::{o}", "CUDA")]
print(f"build: {c.__file__}: CUDA kernels of", "all ops registered" if not missing else f"MISSING for {missing}")
raise SystemExit(1 if missing else 0)
EOF
}

stage_setup() {
    local rc=0
    echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC') $(uname -n) $(uname -m), $(nproc) CPUs, repo $REPO, OUT $OUT"
    echo "python: $PY ($("$PY" --version 2>&1))"
    install_wheels || rc=1
    echo "PYTHONPATH=$PYTHONPATH"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    command -v nvcc > /dev/null && nvcc --version | tail -2
    "$PY" - <<'EOF'
import platform, torch
try:
    import triton; tv = triton.__version__
except Exception as e:  # noqa: BLE001
    tv = f"not importable ({e})"
import numpy
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}, numpy {numpy.__version__}, "
      f"python {platform.python_version()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"cuda: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
else:
    print("cuda: not available")
EOF
    # olmoearth_fast.kernels lives in kernels/ (setup.py's package_dir): without an install, link it
    if ! "$PY" -c 'import olmoearth_fast.kernels' 2> /dev/null; then
        if [[ ! -e olmoearth_fast/kernels ]]; then
            ln -s ../kernels olmoearth_fast/kernels
            echo "kernels: linked olmoearth_fast/kernels -> ../kernels (no installed olmoearth_fast maps it)"
        fi
    fi
    build_extension || rc=1
    if [[ "${SITE_IN_USE:-0}" == 1 ]]; then
        "$PY" scripts/device/wheels.py check --installed --wheels "$WHEELS" \
            || echo "setup: WARNING: a declared requirement is unmet (PROBLEM lines above); only the import check below fails this stage"
    fi
    "$PY" scripts/device/wheels.py imports 2>&1 | grep -v "Cannot initialize filter" || rc=1
    return $rc
}

# ------------------------------------------------------------------------------------- test
KERNEL_TESTS=(tests/test_patch_embed_kernel.py tests/test_masked_neg_loss.py tests/test_packing.py
              tests/test_patch_embed.py tests/test_cuda_compile.py)
# a training step through the compiled kernels vs the PyTorch paths (fp32, on the GPU there)
INTEGRATION_TESTS=(tests/test_train.py::test_train_step_through_triton_kernels)

stage_test() {
    local rc=0 r xdist=()
    rm -f "$WORK"/junit_*.xml
    if [[ -n "${TEST_WORKERS:-}" ]]; then  # pytest-xdist (in the device image) for the non-gpu runs
        xdist=(-n "$TEST_WORKERS")
    fi
    echo "--- pytest -m gpu tests"
    # shellcheck disable=SC2086
    bounded "$PY" -m pytest -m gpu -q -rfEs tests --junitxml="$WORK/junit_1_gpu.xml" ${TEST_ARGS:-}
    r=$?; ((r != 0 && r != 5)) && rc=$r   # 5: no test selected (no gpu test collected)
    echo "--- pytest tests/parity + kernel tests (not gpu: those ran above)"
    # shellcheck disable=SC2086
    bounded "$PY" -m pytest -m "not gpu" -q -rfEs "${xdist[@]}" tests/parity "${KERNEL_TESTS[@]}" \
        "${INTEGRATION_TESTS[@]}" --junitxml="$WORK/junit_2_parity_kernels.xml" ${TEST_ARGS:-}
    r=$?; ((r != 0)) && rc=$r
    if [[ "${TEST_ALL:-0}" == 1 ]]; then
        echo "--- pytest: the rest of the suite (TEST_ALL=1)"
        local ignore=(--ignore=tests/parity)
        for f in "${KERNEL_TESTS[@]}"; do ignore+=("--ignore=$f"); done
        for t in "${INTEGRATION_TESTS[@]}"; do ignore+=("--deselect=$t"); done
        # shellcheck disable=SC2086
        bounded "$PY" -m pytest -m "not gpu" -q -rfEs "${xdist[@]}" tests "${ignore[@]}" --junitxml="$WORK/junit_3_rest.xml" \
            ${TEST_ARGS:-}
        r=$?; ((r != 0)) && rc=$r
    fi
    "$PY" - "$OUT/junit.xml" "$WORK"/junit_*.xml <<'EOF'
import sys
import xml.etree.ElementTree as ET
root = ET.Element("testsuites")
for path in sys.argv[2:]:
    try:
        tree = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        print(f"junit: skipped {path}: {e}")
        continue
    root.extend(tree.iter("testsuite") if tree.tag == "testsuites" else [tree])
ET.ElementTree(root).write(sys.argv[1], encoding="utf-8", xml_declaration=True)
n = {k: sum(int(s.get(k, 0)) for s in root) for k in ("tests", "failures", "errors", "skipped")}
print(f"junit: {sys.argv[1]}: {n['tests']} tests, {n['failures']} failures, {n['errors']} errors, {n['skipped']} skipped")
EOF
    return $rc
}

# ------------------------------------------------------------------------------------ bench
stage_bench() {
    local rc t0
    t0=$(date +%s)
    # shellcheck disable=SC2086
    bounded "$PY" -m pytest benchmarks --benchmark-only -q --benchmark-json "$OUT/bench.json" ${BENCH_ARGS:-}
    rc=$?
    if [[ -f benchmarks/last_run.json && $(stat -c %Y benchmarks/last_run.json) -ge $t0 ]]; then
        cp benchmarks/last_run.json "$OUT/bench_last_run.json"
    else
        echo "bench: benchmarks/last_run.json was not written by this run"
    fi
    return $rc
}

# ----------------------------------------------------------------------------------- curves
stage_curves() {
    local device=${CURVES_DEVICE:-} steps=${CURVES_STEPS:-} size=${CURVES_SIZE:-} limit
    if [[ -z "$device" ]]; then
        if ((HAS_CUDA)); then device=cuda; else device=cpu; fi
    fi
    if [[ "$device" == cpu ]]; then  # a smoke run: base for 200 steps takes hours on a CPU
        steps=${steps:-3}
        size=${size:-nano}
    fi
    steps=${steps:-200}
    size=${size:-base_shallow_decoder}
    limit=$(left 60)  # the script stops itself (and writes what it has) well before `bounded` kills it
    [[ -n "$limit" ]] && ((limit < 10)) && limit=10
    # shellcheck disable=SC2086
    bounded "$PY" scripts/compare_loss_curves.py --steps "$steps" --size "$size" --device "$device" \
        --out "$OUT/curves.json" ${limit:+--time-limit "$limit"} ${CURVES_ARGS:-}
}

# ------------------------------------------------------------------------------------- main
if (($# == 0)) || [[ "$1" == -h || "$1" == --help ]]; then
    usage
    exit $((($# == 0) ? 2 : 0))
fi
STAGES=(setup)
for s in "$@"; do
    case "$s" in
        setup) ;;
        test | bench | curves) STAGES+=("$s") ;;
        *) echo "run.sh: unknown stage '$s' (setup, test, bench, curves)"; exit 2 ;;
    esac
done

SITE_IN_USE=0
PYTHONPATH_BEFORE=${PYTHONPATH:-}
# the repo first: `import olmoearth_fast` without an install; setup adds $SITE once the wheels are in
export PYTHONPATH="$REPO${PYTHONPATH_BEFORE:+:$PYTHONPATH_BEFORE}"

declare -A RC SECS
for s in "${STAGES[@]}"; do
    t0=$(date +%s)
    echo "==================== stage $s ($(date -u +%H:%M:%S) UTC, $((t0 - T_START))s into the run)"
    "stage_$s" > >(tee "$OUT/$s.log") 2>&1
    RC[$s]=$?
    wait $! 2> /dev/null   # let tee finish writing the log
    SECS[$s]=$(($(date +%s) - t0))
    echo "==================== stage $s: exit ${RC[$s]}, ${SECS[$s]}s" | tee -a "$OUT/$s.log"
done

status=0
echo
echo "stage     exit  seconds"
for s in "${STAGES[@]}"; do
    printf '%-8s %5s %8s\n' "$s" "${RC[$s]}" "${SECS[$s]}"
    ((RC[$s] != 0)) && status=1
done
echo "total $(($(date +%s) - T_START))s; files in $OUT:"
ls -l "$OUT" | awk 'NR > 1 {printf "  %10d  %s\n", $5, $9}'
n=$(find "$OUT" -type f | wc -l)
((n > 8)) && echo "WARNING: $n files in OUT: the device tool returns at most 8"
exit $status
