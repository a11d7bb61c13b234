#!/usr/bin/env bash
# On a GPU: step times for the execution settings, then the reproduction table with the full
# `paper-cifar` recipe, RUNS_PER_GPU runs sharing the GPU at once.
#   PATH=.venv/bin:$PATH bash benchmarks/gpu_steps.sh steps     # a few minutes on one H100
#   PATH=.venv/bin:$PATH bash benchmarks/gpu_steps.sh table     # hours: resumable, rerun to go on
# steps: METHODS (default "gdfq+ait,gdfq": the target row and its base; any of step_time.py's
# rows, comma-separated), SETTINGS (default: the six "precision:compile" pairs below: eager tf32
# first for a baseline within a minute, then the target's CUDA-graph setting, then the rest),
# each stopped after SETTING_TIMEOUT seconds (270; a cold torch.compile takes minutes). A
# setting that fails or times out is logged as {"failed": ...} and the next one runs. table:
# ROWS (default "gdfq gdfq+ait ...", see reproduction_table.sh), BITS_LIST ("4 5"), DATASETS.
# PYTHON (python3) runs step_time.py. Outputs: $RUNS/steps.jsonl (RUNS defaults to runs/gpu),
# $RUNS/<w4a4|w5a5>/<data>/<row>/; the step rows are also printed.
#
# The scripts need no installed zsq (benchmarks/_env.sh: src/ on the import path, `zsq` as
# `python3 -m zsq`). On a GPU machine without ../shared/data beside the checkout, bring the
# teacher and the test set inside the checkout (~10 MB; gpu_data/ is ignored by git, so the
# device tool's `carry` must name it) and the scripts read them from there:
#   mkdir -p gpu_data/weights gpu_data/cifar10-jpeg            # here, once
#   cp ../shared/data/weights/resnet20_cifar10jpeg.* gpu_data/weights/
#   cp ../shared/data/cifar10-jpeg/test.npz gpu_data/cifar10-jpeg/
# gpu_data/ holds CIFAR-10-JPEG only, so `table` runs there with DATASETS=cifar10-jpeg. Leave
# ZSQ_SHARED_DATA unset for pytest there: tests that need the full shared data would not skip.
# The device tool's $OUT is its own folder, emptied before each call: these scripts write into
# RUNS (kept between calls on a warm machine); copy what should come back into $OUT.
# The default test suite passes on the CPU with torch 2.11.0+cu130, torchvision 0.26.0 and
# timm 1.0.31 as well as with the pinned torch 2.14.1, so such a machine's own torch serves.
set -euo pipefail
source "$(dirname "$0")/_env.sh"
RUNS=${RUNS:-runs/gpu}
RUNS_PER_GPU=${RUNS_PER_GPU:-6}
PRECISION=${PRECISION:-tf32}
COMPILE=${COMPILE:-default}
mkdir -p "$RUNS"

steps() {
  "${PYTHON:-python3}" -c "import torch, zsq; assert torch.cuda.is_available(), 'no CUDA device'"
  local settings=${SETTINGS:-"tf32:off tf32:reduce-overhead fp32:off bf16:off tf32:default bf16:reduce-overhead"}
  for setting in $settings; do
    local precision=${setting%%:*} compile=${setting#*:}
    echo "== $precision, compile $compile" >&2
    timeout -s TERM "${SETTING_TIMEOUT:-270}" "${PYTHON:-python3}" benchmarks/step_time.py \
      --device cuda --batch 200 --iters 50 --warmup 10 --methods "${METHODS:-gdfq+ait,gdfq}" \
      --precision "$precision" --compile "$compile" \
      | tee -a "$RUNS/steps.jsonl" \
      || echo "{\"failed\": \"$precision $compile\"}" | tee -a "$RUNS/steps.jsonl"
  done
}

table() {
  local jobs=()
  for bits in ${BITS_LIST:-4 5}; do
    for data in ${DATASETS:-cifar10-jpeg fashion-mnist}; do
      for row in ${ROWS:-gdfq gdfq+ait minmax qimera qimera+ait arc arc+ait}; do
        jobs+=("$bits $data $row")
      done
    done
  done
  printf '%s\n' "${jobs[@]}" | xargs -P "$RUNS_PER_GPU" -L 1 bash -c '
    bits=$0 data=$1 row=$2
    BITS=$bits RUNS='"$RUNS"'/w${bits}a${bits} DATASETS=$data ROWS=$row RECIPE=paper-cifar \
      DEVICE=cuda EXTRA="--precision '"$PRECISION"' --compile '"$COMPILE"'" \
      bash benchmarks/reproduction_table.sh'
}

case ${1:-} in
  steps) steps ;;
  table) table ;;
  *) echo "usage: $0 steps|table" >&2; exit 2 ;;
esac
