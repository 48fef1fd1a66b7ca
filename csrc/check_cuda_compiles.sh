#!/usr/bin/env bash
# Compile-checks every csrc/cuda/*.cu with plain nvcc (the .cu files include no torch
# headers, so no CUDA torch is needed). Where nvcc is absent it says so and exits 0:
# linking and running happen on a GPU machine (benchmarks/gpu_check.sh).
#   csrc/check_cuda_compiles.sh            # sm_80 and sm_90
#   VIPO_CUDA_ARCHS="90" csrc/check_cuda_compiles.sh
set -euo pipefail
cd "$(dirname "$0")/cuda"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  echo "check_cuda_compiles: nvcc not found; skipping the CUDA compile check"
  exit 0
fi
ARCHS="${VIPO_CUDA_ARCHS:-80 90}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
status=0
for cu in *.cu; do
  for arch in $ARCHS; do
    if "$NVCC" -c -arch="sm_${arch}" -O3 --std=c++17 -Werror all-warnings "$cu" \
         -o "$OUT/${cu%.cu}_${arch}.o"; then
      echo "check_cuda_compiles: ok   $cu sm_${arch}"
    else
      echo "check_cuda_compiles: FAIL $cu sm_${arch}"
      status=1
    fi
  done
done
exit $status
