#!/usr/bin/env bash
# One-shot check on a CUDA machine, under 5 minutes on one H100/H200:
#   1. builds the compiled extension in place where csrc/ and nvcc allow (else Triton only),
#   2. runs the gpu-marked parity tests against the float64 reference, among them the
#      no-host-sync test (a full loss forward and backward, sde_step and log_prob under
#      torch.cuda.set_sync_debug_mode("error")), also run on its own below,
#   3. prints the bandwidth table (benchmarks/gpu_table.py), copy bandwidth and peak memory
#      included.
# Results go to $OUT (the device tool's folder) or benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir=${OUT:-benchmarks/results}
mkdir -p "$out_dir"
export VIPO_TEST_CUDA=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out_dir/device.txt"

if [ -f setup.py ] && [ -d csrc ] && command -v nvcc >/dev/null; then
  echo "== building the compiled extension (csrc/)"
  MAX_JOBS=${MAX_JOBS:-16} timeout 240 python setup.py build_ext --inplace >"$out_dir/build.log" 2>&1 \
    && echo "built" || echo "build failed or timed out: see build.log; Triton only"
fi

echo "== gpu-marked parity tests"
timeout 150 python -m pytest tests/test_kernels_cuda.py -m gpu -q -p no:cacheprovider 2>&1 \
  | tee "$out_dir/gpu_tests.log" | tail -n 25
tests_rc=${PIPESTATUS[0]}

echo "== no host sync (set_sync_debug_mode error)"
timeout 60 python -m pytest tests/test_kernels_cuda.py -m gpu -q -p no:cacheprovider \
  -k no_host_sync 2>&1 | tee "$out_dir/no_sync.log" | tail -n 5
sync_rc=${PIPESTATUS[0]}

echo "== bandwidth table"
timeout 150 python benchmarks/gpu_table.py --out "$out_dir/gpu_table.md"
table_rc=$?
echo "tests rc=$tests_rc no-sync rc=$sync_rc table rc=$table_rc"
[ "$tests_rc" -eq 0 ] && [ "$sync_rc" -eq 0 ] && [ "$table_rc" -eq 0 ]
