#!/usr/bin/env bash
# The one command to run on a GPU machine (e.g. the device tool's H100/H200):
#   bash bench/gpu.sh            # writes $OUT/throughput_gpu.json and $OUT/throughput_gpu.log
# diffusers may be missing there: carried wheels in .whl/ are installed first
# (see README "Performance" for how .whl/ is filled). Extra arguments go to
# bench/throughput.py; BUDGET (s) bounds the optional torch.compile part.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bailan-bench}
mkdir -p "$OUT"
if ! python3 -c "import diffusers" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "diffusers missing and no wheels in .whl/" >&2; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
nvidia-smi -L
PYTHONUNBUFFERED=1 python3 bench/throughput.py --device cuda --n 16 --stock-n 8 \
  --compile --time-budget "${BUDGET:-240}" --json "$OUT/throughput_gpu.json" "$@" 2>&1 | tee "$OUT/throughput_gpu.log"
