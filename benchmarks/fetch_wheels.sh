#!/usr/bin/env bash
# Downloads the wheels the GPU check installs on a device without network
# (benchmarks/device_wheels.txt) into benchmarks/wheels/ (git-ignored), for CPython 3.12 on
# x86-64 Linux, without their dependencies (the device image has those; the list says why).
#   bash benchmarks/fetch_wheels.sh [DIR]
# Then carry the folder to the device with the working tree; gpu_check.sh installs every
# wheel in it with pip --no-index --no-deps into a scratch site folder before anything else.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-benchmarks/wheels}
python=${PYTHON:-python3}
mkdir -p "$dir"
mapfile -t wanted < <(grep -v '^\s*\(#\|$\)' benchmarks/device_wheels.txt)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$dir" "${wanted[@]}"
echo "fetch_wheels: ${#wanted[@]} wheels in $dir:"
ls -1 "$dir"
