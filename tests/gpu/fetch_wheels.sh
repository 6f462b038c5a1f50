#!/usr/bin/env bash
# Run HERE, where pip reaches a package index, before a GPU machine that reaches none runs tests/gpu/run.sh:
#
#     bash tests/gpu/fetch_wheels.sh [DIR] [PYTHON_VERSION]      # default .whl/ and 3.12 (the lent H200's)
#
# Downloads the binary wheels run.sh would install there that the lent machine's image lacks, for its
# Python: megatron-core (2.6 MB; its needs torch, numpy and packaging are in the image). The machine then
# installs them offline: `QWENVL_WHEELS=.whl bash tests/gpu/run.sh`, with .whl carried along. DALI (199 MB)
# and Transformer Engine (277 MB + a torch extension to compile) do not fit the 64 MiB a call may carry, so
# their checks SKIP there; set QWENVL_FETCH_ALL=1 to fetch them too, for a machine that can take them.
# Prints the folder's size; exit 1 if a download failed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DIR="${1:-$ROOT/.whl}"
PYV="${2:-3.12}"
mkdir -p "$DIR"
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
wanted=("megatron-core==0.16.1")
[ "${QWENVL_FETCH_ALL:-0}" = 1 ] && wanted+=("nvidia-dali-cuda130==2.4.0" "transformer-engine-cu13" "transformer-engine")
rc=0
for pkg in "${wanted[@]}"; do
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$PYV" \
    --implementation cp "${platforms[@]}" -d "$DIR" "$pkg" || { echo "FAIL could not download $pkg" >&2; rc=1; }
done
echo "wheels for Python $PYV in $DIR: $(du -sh "$DIR" | cut -f1) ($(ls "$DIR" | tr '\n' ' '))"
exit $rc
