#!/usr/bin/env bash
# The one check for a GPU machine (one H200: at most 10 minutes), or its CPU dry run:
#   bash benchmarks/gpu_check.sh              # on the CUDA machine
#   bash benchmarks/gpu_check.sh --dry-run    # every step a CPU can run, at tiny size (CI)
#   bash benchmarks/gpu_check.sh --only build,backends
# Steps, in order: wheels (benchmarks/fetch_wheels.sh prepares them), versions, the build
# with errors fatal, the backends, every gpu-marked test with skip reasons, the bandwidth
# table, the no-sync test, bad values on the device, the bf16 on-policy probe, the
# real-size iteration (vipo.profile). A failing step is recorded and the next one runs; the
# results go to benchmarks/results/gpu-check-<device>-<date>.md and .json (and to $OUT when
# set); the exit status is 1 if any step failed. PYTHON picks the interpreter (python3).
# The driver is benchmarks/gpu_check.py (standard library only).
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
