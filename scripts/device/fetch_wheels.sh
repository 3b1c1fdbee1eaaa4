#!/usr/bin/env bash
# Download into .whl/ the wheels the GPU machine needs and its image lacks (scripts/device/wheels.txt),
# for its python3 (CPython 3.12, x86_64 Linux), slim the two large ones, and check the set.
#
#   bash scripts/device/fetch_wheels.sh            # -> .whl/ (git-ignored), about 14 MiB
#   WHEEL_DIR=/tmp/w PY_VERSION=3.11 bash ...      # another folder / interpreter (local dry runs)
#
# Needs network access to PyPI (this machine, not the device). Runs with any Python that has pip
# (PYTHON=..., default: .venv/bin/python, else python3). The device call then names ".whl" in
# its carry list; scripts/device/run.sh installs it (see scripts/device/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DEST=${WHEEL_DIR:-.whl}
PY_VERSION=${PY_VERSION:-3.12}
ABI=cp${PY_VERSION/./}
TMP="$DEST.tmp.$$"
trap 'rm -rf "$TMP"' EXIT
rm -rf "$TMP"
mkdir -p "$TMP"

# pip matches manylinux_2_N exactly: name every N a wheel here may carry
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64; do
    platforms+=(--platform "$tag")
done
grep -v '^\s*#' scripts/device/wheels.txt | grep -v '^\s*$' > "$TMP/requirements.txt"
echo "downloading $(wc -l < "$TMP/requirements.txt") wheels for CPython $PY_VERSION (x86_64 Linux) into $DEST"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation cp --abi "$ABI" --abi abi3 --abi none "${platforms[@]}" --platform any \
    -d "$TMP" -r "$TMP/requirements.txt"
rm "$TMP/requirements.txt"
"$PYTHON" scripts/device/wheels.py slim "$TMP"

rm -rf "$DEST"
mv "$TMP" "$DEST"
trap - EXIT
echo
ls -l "$DEST" | awk 'NR > 1 {printf "%10.1f KiB  %s\n", $5 / 1024, $9}'
echo "total: $(du -sh "$DEST" | cut -f1) in $(ls "$DEST" | wc -l) wheels"
echo
if [[ "$PY_VERSION" == 3.12 ]]; then
    "$PYTHON" scripts/device/wheels.py check --wheels "$DEST"
fi
