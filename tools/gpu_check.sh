#!/usr/bin/env bash
# GPU checks for a machine with a CUDA device (under 5 minutes): the CUDA-marked tests and
# tools/bench.py on the GPU. Writes everything to ${OUT:-gpu_check_out}/gpu_check.md.
#
#   bash tools/gpu_check.sh            # from the repository root
#
# It installs adaptlab itself without dependencies (the machine's torch, Lightning, scipy and
# scikit-learn are used; nothing is downloaded).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
report="$out/gpu_check.md"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

"$py" -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1 \
  || { echo "install failed, see $out/install.log"; exit 1; }

{
  echo "# adaptlab GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, '| lightning', pl.__version__)"
  echo '```'
  echo
  echo "## CUDA tests"
  echo '```'
  timeout 150 "$py" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15
  echo '```'
  echo
  echo "## Throughput on the GPU (tools/bench.py --device cuda)"
  echo
  timeout 200 "$py" tools/bench.py --device cuda --rounds 2 --repeats 10 2>&1 | grep -v "^$"
} | tee "$report"
