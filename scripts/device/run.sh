#!/usr/bin/env bash
# The GPU programme in one call: bash scripts/device/run.sh all [--budget SECONDS] [--rehearse]
#
#   all      = setup test bench curves, in that order, within --budget seconds (default 540)
#   setup    install the carried wheels (.whl/ -> $SITE) when they fit this interpreter, put the
#            repo and $SITE on PYTHONPATH, build olmoearth_fast._C in place (CUDA when torch sees
#            a GPU; skipped when sources, torch and Python match the last build), print the
#            machine, check the wheels against the installed versions, import the reference.
#   test     the `gpu` tests; then the kernels-through-a-training-step test and the kernel test
#            files (compiled kernels on a GPU), each test's line in the log as it ends
#   bench    the key benchmarks: ops (loss, patch embed, packing: ours vs the reference) then the
#            exp14 step at nano, tiny, base_shallow_decoder (ours vs ref_best); $OUT/bench.json
#            is rewritten as each case ends
#   curves   eager vs compiled (trainer.compile=true) loss curves of ours on the same batches
#            (scripts/compare_loss_curves.py --compare compiled), stopped by the time left
#   profile  (not in `all`: a second call's) where a step's device time goes, ours beside
#            ref_best (scripts/profile_step.py: exp14 base_shallow_decoder, microbatch 32, p=4,
#            hw_p=8, the 25 largest kernels of each), into $OUT/profile.md
#   plan     print the stage plan for the budget (caps, minimum, reserve) and exit
#
# Any list of stages runs in the order given (setup is always first). Budget: the run never
# takes longer than --budget: each stage gets min(its cap, time left - the minimum of every
# later stage - a final margin), every command runs under `timeout` within its stage's share,
# and a stage whose share is below its minimum is skipped (logged). A failing or cut stage does
# not stop the later ones; the exit status is 1 when any stage failed or was cut.
#
# --rehearse: the same staging and budget logic on CPU (CUDA hidden, Triton interpreter, the
# small selections of REHEARSE_* below, small stage caps): a CI test (tests/test_device_programme.py).
#
# Out ($OUT, default ./runs/device_out; at most 8 files come back from the device): run.log
# (everything, as it goes), summary.json (plan and each stage's status, rewritten after every
# stage), junit.xml (test stage), bench.json (benchmarks/last_run.json after every case),
# curves.json (rewritten by the curves script after every window), profile.md (profile stage).
#
# Knobs (environment): PYTHON (.venv/bin/python if present, else python3), WHEELS (.whl), SITE
# (/tmp/site), MAX_JOBS (16), STAGE_CAPS ("bench=200,curves=90": seconds per stage),
# RUN_BUDGET_S (default of --budget), TEST_ARGS, TEST_WORKERS (pytest-xdist -n for the kernel
# tests), BENCH_K (the -k expression), BENCH_SIZES, BENCH_ROUNDS, CURVES_STEPS (100),
# CURVES_SIZE (nano), CURVES_ARGS, PROFILE_SIZE (base_shallow_decoder), PROFILE_BATCH (32).
# See scripts/device/README.md.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
# bash >= 5: $EPOCHSECONDS, so the run's bookkeeping forks nothing (see `watchdog`)
((BASH_VERSINFO[0] >= 5)) || { echo "run.sh: needs bash >= 5 (\$EPOCHSECONDS), this is $BASH_VERSION"; exit 2; }
T_START=$EPOCHSECONDS

usage() {
    sed -n '2,/^set /p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//'
}

# ------------------------------------------------------------------------------- arguments
BUDGET=${RUN_BUDGET_S:-540}
REHEARSE=0
STAGES=(setup)
PLAN_ONLY=0
(($# == 0)) && { usage; exit 2; }
while (($#)); do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
        --budget=*) BUDGET=${1#--budget=} ;;
        --rehearse) REHEARSE=1 ;;
        all) STAGES+=(test bench curves) ;;
        setup) ;;
        test | bench | curves | profile) STAGES+=("$1") ;;
        plan) PLAN_ONLY=1 ;;
        *) echo "run.sh: unknown argument '$1' (all, setup, test, bench, curves, profile, plan, --budget S, --rehearse)"
           exit 2 ;;
    esac
    shift
done
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "run.sh: --budget must be whole seconds, got '$BUDGET'"; exit 2; }
((PLAN_ONLY)) && ((${#STAGES[@]} == 1)) && STAGES+=(test bench curves)

# ----------------------------------------------------------------------------------- plan
# Seconds per stage: CAP (the most it may take) and MIN (below this share it is skipped). On
# the device (H200, 16 CPUs; estimates in scripts/device/README.md): setup = wheels ~10 s +
# CUDA build ~60-120 s + checks ~15 s; test ~40 s of `gpu` tests + ~60-100 s of compiled
# kernel tests; bench ~30 s of op cases + ~90 s for six step cases; curves: what is left
# (nano compiles in ~1 min, then ~0.1 s a step). MARGIN: the end (summary, file list).
declare -A CAP MIN
if ((REHEARSE)); then
    CAP=([setup]=40 [test]=40 [bench]=40 [curves]=30 [profile]=60)
    MIN=([setup]=5 [test]=5 [bench]=5 [curves]=5 [profile]=5)
    MARGIN=5
else
    CAP=([setup]=210 [test]=150 [bench]=150 [curves]=540 [profile]=150)
    MIN=([setup]=60 [test]=40 [bench]=60 [curves]=60 [profile]=60)
    MARGIN=15
fi
IFS=',' read -ra _caps <<< "${STAGE_CAPS:-}"
for kv in "${_caps[@]}"; do
    [[ "$kv" =~ ^(setup|test|bench|curves|profile)=([0-9]+)$ ]] || { echo "run.sh: bad STAGE_CAPS entry '$kv'"; exit 2; }
    CAP[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
    ((MIN[${BASH_REMATCH[1]}] > BASH_REMATCH[2])) && MIN[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
done
KILL_GRACE=5  # timeout -k: SIGKILL this long after SIGTERM

# reserve I -> RESERVE: the minimum of every stage after position I
reserve() {
    local i
    RESERVE=0
    for ((i = $1 + 1; i < ${#STAGES[@]}; i++)); do RESERVE=$((RESERVE + MIN[${STAGES[$i]}])); done
}

# share I -> SHARE_S: seconds stage I may take if it started now (may be <= 0)
share() {
    local s=${STAGES[$1]} left
    reserve "$1"
    left=$((BUDGET - (EPOCHSECONDS - T_START) - MARGIN - RESERVE))
    SHARE_S=$((left < CAP[$s] ? left : CAP[$s]))
}

if ((PLAN_ONLY)); then
    echo "plan for a budget of ${BUDGET}s (margin ${MARGIN}s, rehearse=$REHEARSE): if every stage takes its whole share"
    printf '%-8s %5s %5s %8s %8s\n' stage cap min reserve share
    t=0
    for i in "${!STAGES[@]}"; do
        s=${STAGES[$i]}
        reserve "$i"
        sh=$((BUDGET - t - MARGIN - RESERVE)); ((sh > CAP[$s])) && sh=${CAP[$s]}
        if ((sh < MIN[$s])); then verdict="skipped"; sh=0; else verdict="runs"; fi
        printf '%-8s %5s %5s %8s %8s  %s\n' "$s" "${CAP[$s]}" "${MIN[$s]}" "$RESERVE" "$sh" "$verdict"
        t=$((t + sh))
    done
    echo "worst case: $t s of stages + ${MARGIN}s margin = $((t + MARGIN))s <= ${BUDGET}s"
    exit 0
fi

# ------------------------------------------------------------------------------- environment
if [[ -n "${OUT:-}" ]]; then mkdir -p "$OUT"; else OUT=$REPO/runs/device_out; rm -rf "$OUT"; mkdir -p "$OUT"; fi
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/run.log") 2>&1
TEE_PID=$!
export PYTHONUNBUFFERED=1
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
PY=$PYTHON
WHEELS=${WHEELS:-$REPO/.whl}
SITE=${SITE:-/tmp/site}
WORK=${TMPDIR:-/tmp}/olmoearth_fast_device.$$
mkdir -p "$WORK"
HAS_CUDA=0
if ((REHEARSE)); then
    export CUDA_VISIBLE_DEVICES=""  # CPU torch behaviour even on a GPU machine
    export TRITON_INTERPRET=1
fi
SITE_IN_USE=0
PYTHONPATH_BEFORE=${PYTHONPATH:-}
# the repo first: `import olmoearth_fast` without an install; setup adds $SITE once the wheels are in
export PYTHONPATH="$REPO${PYTHONPATH_BEFORE:+:$PYTHONPATH_BEFORE}"
STAGE_DEADLINE=0

# bounded COMMAND...: run it under `timeout` with what is left of the current stage's share
bounded() {
    local l=$((STAGE_DEADLINE - EPOCHSECONDS - KILL_GRACE))
    if ((l < 3)); then
        echo "[run.sh] SKIPPED (no time left in this stage): $*"
        return 124
    fi
    echo "[run.sh] limit ${l}s: $*"
    timeout -k "$KILL_GRACE" "$l" "$@"
    local rc=$?
    ((rc == 124 || rc == 137)) && echo "[run.sh] TIMED OUT after ${l}s: $*"
    return $rc
}

have_module() { "$PY" -c "import $1" 2> /dev/null; }

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
    if ((REHEARSE)); then
        echo "wheels: rehearsal: not installed (the interpreter's own packages are used)"
        return 0
    fi
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
        bounded "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
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
    # sm_90 only (H100 / H200): one device code object, the shortest build
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
    stamp=$( (cat setup.py pyproject.toml; find csrc -type f | LC_ALL=C sort | xargs cat; echo "$TORCH_CUDA_ARCH_LIST"
              "$PY" -c 'import sys, torch; print(sys.version, torch.__version__, torch.version.cuda)') | sha256sum | cut -c1-16)
    if [[ -f "$so" && -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" ]]; then
        echo "build: $so is up to date (sources, torch and Python unchanged: $stamp); not rebuilt"
    else
        echo "build: OLMOEARTH_FAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace"
        local t0=$EPOCHSECONDS
        OLMOEARTH_FAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} bounded "$PY" setup.py build_ext --inplace \
            || { echo "build: FAILED"; return 1; }
        mkdir -p build && echo "$stamp" > "$stamp_file"
        echo "build: done in $((EPOCHSECONDS - t0))s -> $so"
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
    if ((REHEARSE == 0)) && command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    fi
    command -v nvcc > /dev/null && nvcc --version | grep -i release
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
    if ((SITE_IN_USE)); then
        "$PY" scripts/device/wheels.py check --installed --wheels "$WHEELS" \
            || echo "setup: WARNING: a declared requirement is unmet (PROBLEM lines above); only the import check below fails this stage"
    fi
    bounded "$PY" scripts/device/wheels.py imports 2>&1 | grep -v "Cannot initialize filter" || rc=1
    return $rc
}

# ------------------------------------------------------------------------------------- test
# Device: every `gpu` test; then, in this order, the training step through the compiled kernels
# (exp14 and exp2 vs the PyTorch paths, fp32) and the kernel test files, whose fp32 tests run
# the compiled kernels there (their `gpu` tests ran first).
GPU_TESTS=(tests)
STEP_TESTS=(tests/test_train.py::test_train_step_through_triton_kernels)
KERNEL_TESTS=(tests/test_conftest.py tests/test_determinism.py tests/test_masked_neg_loss.py
              tests/test_packing.py tests/test_patch_embed_kernel.py)
if ((REHEARSE)); then  # the same three invocations, on files that take seconds on 2 CPUs
    GPU_TESTS=(tests/test_determinism.py tests/test_packing.py)
    STEP_TESTS=(tests/test_determinism.py)
    KERNEL_TESTS=(tests/test_conftest.py)
fi

pytest_args() {  # common pytest options: a line per test as it ends, short tracebacks
    local a=(-v --tb=short -rfEs -p no:cacheprovider)
    have_module pytest_timeout && a+=(--timeout="${TEST_TIMEOUT:-180}")  # a hung test fails, alone
    echo "${a[@]}"
}

stage_test() {
    local rc=0 r
    # shellcheck disable=SC2207
    local common=($(pytest_args)) xdist=()
    if [[ -n "${TEST_WORKERS:-}" ]] && have_module xdist; then xdist=(-n "$TEST_WORKERS"); fi
    rm -f "$WORK"/junit_*.xml
    echo "--- 1/2: pytest -m gpu ${GPU_TESTS[*]}"
    # shellcheck disable=SC2086
    bounded "$PY" -m pytest -m gpu "${common[@]}" "${GPU_TESTS[@]}" --junitxml="$WORK/junit_1_gpu.xml" ${TEST_ARGS:-}
    r=$?; ((r != 0 && r != 5)) && rc=$r   # 5: no test collected (no gpu test there)
    echo "--- 2/2: the training step through the kernels, then the kernel tests (not gpu: those ran above)"
    # shellcheck disable=SC2086
    bounded "$PY" -m pytest -m "not gpu" "${common[@]}" "${xdist[@]}" "${STEP_TESTS[@]}" "${KERNEL_TESTS[@]}" \
        --junitxml="$WORK/junit_2_kernels.xml" ${TEST_ARGS:-}
    r=$?; ((r != 0)) && rc=$r
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
print(f"junit: {n['tests']} tests, {n['failures']} failures, {n['errors']} errors, {n['skipped']} skipped")
EOF
    return $rc
}

# ------------------------------------------------------------------------------------ bench
# Ops first (~30 s together: the loss at hw_p 4, 8, 12, patch embed at p 1, 2, 4, 8, pack+unpack
# at keep 0.25, 0.5, each ours beside the reference), then the exp14 step, ours beside ref_best
# size by size (node ids run in the order given: a run cut short loses whole pairs at the end),
# and last, with time left, one loader worker's samples/s on the reference's files and on
# rechunked ones (B=64, p=4, hw_p=6, ~20 s): how many workers a rank needs beside that step.
BENCH_OPS=(benchmarks/bench_loss.py benchmarks/bench_patch_embed.py benchmarks/bench_packing.py)
BENCH_LAST=(benchmarks/bench_data.py)
BENCH_K_DEFAULT="(test_bench_masked_neg_loss and not compile_ref) or (test_bench_patch_embed and not compile_ref and not effective) or (test_pack_unpack and not naive_torch) or (test_train_step and (ours or ref_best)) or (test_bench_data and 4-6 and modality_cross_random and ours)"
BENCH_STEP_PROVIDERS=(ours ref_best)
BENCH_SIZES=${BENCH_SIZES:-nano,tiny,base_shallow_decoder}
if ((REHEARSE)); then
    BENCH_OPS=(benchmarks/bench_patch_embed.py)
    BENCH_K_DEFAULT="test_bench_patch_embed and ours and 8"
    BENCH_STEP_PROVIDERS=()
    BENCH_LAST=()
fi

stage_bench() {
    local rc size p steps=() table=benchmarks/last_run.json saved=""
    IFS=',' read -ra sizes <<< "$BENCH_SIZES"
    for size in "${sizes[@]}"; do
        for p in "${BENCH_STEP_PROVIDERS[@]}"; do steps+=("benchmarks/bench_train_step.py::test_train_step[$p-$size]"); done
    done
    # last, if time is left: the largest size with the blocks compiled (decides trainer.compile's
    # CUDA default; its warm-up includes the compile)
    ((${#BENCH_STEP_PROVIDERS[@]})) && steps+=("benchmarks/bench_train_step.py::test_train_step[ours_compiled-${sizes[-1]}]")
    # benchmarks/conftest.py writes its table to benchmarks/last_run.json (or, where it reads
    # OLMOEARTH_BENCH_LAST_RUN, there); publish_plugin copies whichever is written to $OUT after
    # every case. A rehearsal (here, in a working tree) keeps a developer's last_run.json.
    if ((REHEARSE)); then
        [[ -f $table ]] && saved=$WORK/last_run.saved.json && cp -p "$table" "$saved"
    fi
    local env=(OLMOEARTH_BENCH_SIZES="$BENCH_SIZES" OLMOEARTH_BENCH_LAST_RUN="$WORK/last_run.json"
               OLMOEARTH_PUBLISH="$WORK/last_run.json=$OUT/bench.json;$table=$OUT/bench.json"
               PYTHONPATH="$REPO/scripts/device:$PYTHONPATH")
    [[ -n "${BENCH_ROUNDS:-}" ]] && env+=(OLMOEARTH_BENCH_ROUNDS="$BENCH_ROUNDS")
    local cmd=(env "${env[@]}" "$PY" -m pytest --benchmark-only -q -rfEs -p no:cacheprovider -p publish_plugin
               -k "${BENCH_K:-$BENCH_K_DEFAULT}")
    bounded "${cmd[@]}" "${BENCH_OPS[@]}" "${steps[@]}" "${BENCH_LAST[@]}"
    rc=$?
    if ((rc == 4)); then  # usage error: a step node id no longer exists; select by -k instead
        echo "bench: pytest could not find a node id (exit 4): selecting the step cases with -k"
        bounded "${cmd[@]}" "${BENCH_OPS[@]}" benchmarks/bench_train_step.py "${BENCH_LAST[@]}"
        rc=$?
    fi
    if ((REHEARSE)); then  # put the developer's table back (or remove the rehearsal's)
        if [[ -n "$saved" ]]; then mv -f "$saved" "$table"; else rm -f "$table"; fi
    fi
    [[ -f "$OUT/bench.json" ]] || echo "bench: no case finished (no $OUT/bench.json)"
    return $rc
}

# ----------------------------------------------------------------------------------- curves
stage_curves() {
    local device=cuda limit
    ((HAS_CUDA)) || device=cpu
    # the script stops itself after the step that crosses --time-limit and writes what it has:
    # leave it a step (and a compile) of slack before `timeout` would kill it
    limit=$((STAGE_DEADLINE - EPOCHSECONDS - KILL_GRACE - 20))
    ((limit < 5)) && limit=5
    # shellcheck disable=SC2086
    bounded "$PY" scripts/compare_loss_curves.py --compare compiled --size "${CURVES_SIZE:-nano}" \
        --steps "${CURVES_STEPS:-100}" --device "$device" --time-limit "$limit" --out "$OUT/curves.json" \
        ${CURVES_ARGS:-}
}

# ---------------------------------------------------------------------------------- profile
# Where a step's device time goes (per-kernel device time, sorted into matmul, attention,
# elementwise, data movement, optimizer; the rest of the wall time is the device waiting for
# the host), ours beside ref_best; on CPU (rehearsal) a nano step.
stage_profile() {
    local rc args=(--device cuda --size "${PROFILE_SIZE:-base_shallow_decoder}" --batch "${PROFILE_BATCH:-32}" --hw-p 8
                   --top 25)
    ((HAS_CUDA)) || args=(--device cpu --size nano --batch 2 --hw-p 2 --steps 1 --top 5)
    bounded "$PY" scripts/profile_step.py "${args[@]}" > "$WORK/profile.md"
    rc=$?
    cat "$WORK/profile.md"
    cp "$WORK/profile.md" "$OUT/profile.md"
    return $rc
}

# -------------------------------------------------------------------------------------- main
# children_of PID: the PIDs whose parent is PID (from /proc: no procps needed)
children_of() {
    local stat rest
    for stat in /proc/[0-9]*/stat; do
        read -r rest < "$stat" 2> /dev/null || continue
        rest=${rest##*) }  # past "pid (comm) ": "state ppid ..."
        rest=${rest#* }
        [[ "${rest%% *}" == "$1" ]] && { stat=${stat#/proc/}; echo "${stat%/stat}"; }
    done
}

# The budget's backstop: `bounded` stops every long command in time, but a few short ones run
# outside it (version prints, import checks, the junit merge). From budget - margin on, the
# watchdog stops every command the run starts (every half second: TERM, then KILL); the stage
# loop's own bookkeeping forks nothing, skips what is left, and the watchdog is ended before
# the summary and the file list.
watchdog() {
    local main=$1 p n=0
    sleep $((BUDGET - MARGIN - (EPOCHSECONDS - T_START)))
    echo "[run.sh] watchdog: ${BUDGET}s budget minus the ${MARGIN}s margin reached: stopping what runs"
    while :; do
        for p in $(children_of "$main"); do
            [[ "$p" != "$TEE_PID" && "$p" != "$BASHPID" ]] && kill "-$((n < 4 ? 15 : 9))" "$p" 2> /dev/null
        done
        n=$((n + 1))
        sleep 0.5
    done
}
watchdog $$ &
WATCHDOG_PID=$!

declare -A STATUS RC SECS SHARE
write_summary() {  # builtins only (no fork: see watchdog); summary.json is small
    local i s first=1 rehearse=false
    ((REHEARSE)) && rehearse=true
    {
        printf '{"budget_s": %s, "margin_s": %s, "rehearse": %s, "elapsed_s": %s, "stages": [' \
            "$BUDGET" "$MARGIN" "$rehearse" "$((EPOCHSECONDS - T_START))"
        for i in "${!STAGES[@]}"; do
            s=${STAGES[$i]}
            ((first)) || printf ', '
            first=0
            printf '{"stage": "%s", "status": "%s", "exit": %s, "seconds": %s, "share_s": %s, "cap_s": %s}' \
                "$s" "${STATUS[$s]:-pending}" "${RC[$s]:-null}" "${SECS[$s]:-null}" "${SHARE[$s]:-null}" "${CAP[$s]}"
        done
        printf ']}\n'
    } > "$OUT/summary.json"
}

echo "run.sh: stages ${STAGES[*]}, budget ${BUDGET}s (margin ${MARGIN}s), rehearse=$REHEARSE, OUT=$OUT"
write_summary
for i in "${!STAGES[@]}"; do
    s=${STAGES[$i]}
    share "$i"
    SHARE[$s]=$SHARE_S
    if ((SHARE_S < MIN[$s])); then
        echo "==================== stage $s SKIPPED at $((EPOCHSECONDS - T_START))s: share ${SHARE_S}s < its minimum ${MIN[$s]}s"
        STATUS[$s]=skipped
        write_summary
        continue
    fi
    t0=$EPOCHSECONDS
    STAGE_DEADLINE=$((t0 + SHARE_S))
    TZ=UTC printf '==================== stage %s (%(%H:%M:%S)T UTC, %ss into the run, share %ss)\n' "$s" "$t0" \
        "$((t0 - T_START))" "$SHARE_S"
    if ((REHEARSE)) && [[ "${REHEARSE_STALL:-}" == "$s:"* ]]; then  # tests: an unbounded command
        echo "[run.sh] rehearsal: an unbounded sleep ${REHEARSE_STALL#*:}s (the watchdog must stop it)"
        sleep "${REHEARSE_STALL#*:}"
    fi
    "stage_$s"
    RC[$s]=$?
    SECS[$s]=$((EPOCHSECONDS - t0))
    case ${RC[$s]} in
        0) STATUS[$s]=ok ;;
        124 | 137) STATUS[$s]=timeout ;;
        *) STATUS[$s]=failed ;;
    esac
    echo "==================== stage $s: ${STATUS[$s]} (exit ${RC[$s]}), ${SECS[$s]}s"
    write_summary
done

# the watchdog and its sleep (both started by this script), before anything below forks
kill $(children_of "$WATCHDOG_PID") "$WATCHDOG_PID" 2> /dev/null
status=0
echo
echo "stage     status   exit  seconds  share"
for s in "${STAGES[@]}"; do
    printf '%-8s %-8s %4s %8s %6s\n' "$s" "${STATUS[$s]}" "${RC[$s]:--}" "${SECS[$s]:--}" "${SHARE[$s]}"
    [[ ${STATUS[$s]} == failed || ${STATUS[$s]} == timeout ]] && status=1
done
write_summary
echo "total $((EPOCHSECONDS - T_START))s of ${BUDGET}s; files in $OUT:"
find "$OUT" -type f -printf '  %10s  %P\n' | sort -k2
n=$(find "$OUT" -type f | wc -l)
((n > 8)) && echo "WARNING: $n files in OUT: the device tool returns at most 8"
rm -rf "$WORK"
exec 1>&- 2>&-  # close tee's input, then let it write the last lines
wait "$TEE_PID" 2> /dev/null
exit $status
