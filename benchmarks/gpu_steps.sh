#!/usr/bin/env bash
# On a GPU: step times for the execution settings, then the reproduction table with the full
# `paper-cifar` recipe, RUNS_PER_GPU runs sharing the GPU at once.
#   PATH=.venv/bin:$PATH bash benchmarks/gpu_steps.sh steps     # a few minutes on one H100
#   PATH=.venv/bin:$PATH bash benchmarks/gpu_steps.sh table     # hours: resumable, rerun to go on
# steps: METHODS (default "gdfq+ait,gdfq": the target row and its base; any of step_time.py's
# rows, comma-separated), SETTINGS (default: the six "precision compile" pairs below, eager
# first; the CUDA-graph ones last, since they compile longest). A setting that fails is logged as
# {"failed": ...} and the next one runs. table: ROWS (default "gdfq gdfq+ait ...", see
# reproduction_table.sh), BITS_LIST ("4 5"), DATASETS. PYTHON (python3) runs step_time.py.
# Outputs: $OUT/steps.jsonl (OUT defaults to runs/gpu), $OUT/<w4a4|w5a5>/<data>/<row>/.
#
# On a GPU machine with its own PyTorch and without ../shared/data beside the checkout: bring
# the teacher and the test set inside the checkout (~10 MB), use the machine's torch, and give
# the scripts a `zsq` command:
#   mkdir -p gpu_data/weights gpu_data/cifar10-jpeg            # here, once (keep it out of git)
#   cp ../shared/data/weights/resnet20_cifar10jpeg.* gpu_data/weights/
#   cp ../shared/data/cifar10-jpeg/test.npz gpu_data/cifar10-jpeg/
#   export ZSQ_SHARED_DATA=$PWD/gpu_data PYTHONPATH=$PWD/src   # there
#   mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -m zsq "$@"\n' > /tmp/bin/zsq
#   chmod +x /tmp/bin/zsq && PATH=/tmp/bin:$PATH bash benchmarks/gpu_steps.sh steps
# (gpu_data/ is ignored by git: the device tool's `carry` must name it; it holds CIFAR-10-JPEG
# only, so `table` runs there with DATASETS=cifar10-jpeg. Leave ZSQ_SHARED_DATA unset for pytest
# there: tests that need the full shared data would not skip.)
# The default test suite passes on the CPU with torch 2.11.0+cu130, torchvision 0.26.0 and
# timm 1.0.31 as well as with the pinned torch 2.14.1, so such a machine's own torch serves.
set -euo pipefail
OUT=${OUT:-runs/gpu}
RUNS_PER_GPU=${RUNS_PER_GPU:-6}
PRECISION=${PRECISION:-tf32}
COMPILE=${COMPILE:-default}
mkdir -p "$OUT"

steps() {
  local settings=${SETTINGS:-"fp32:off tf32:off bf16:off tf32:default tf32:reduce-overhead bf16:reduce-overhead"}
  for setting in $settings; do
    local precision=${setting%%:*} compile=${setting#*:}
    echo "== $precision, compile $compile" >&2
    "${PYTHON:-python3}" benchmarks/step_time.py --device cuda --batch 200 --iters 50 --warmup 10 \
      --methods "${METHODS:-gdfq+ait,gdfq}" --precision "$precision" --compile "$compile" \
      | tee -a "$OUT/steps.jsonl" \
      || echo "{\"failed\": \"$precision $compile\"}" | tee -a "$OUT/steps.jsonl"
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
    BITS=$bits OUT='"$OUT"'/w${bits}a${bits} DATASETS=$data ROWS=$row RECIPE=paper-cifar \
      DEVICE=cuda EXTRA="--precision '"$PRECISION"' --compile '"$COMPILE"'" \
      bash benchmarks/reproduction_table.sh'
}

case ${1:-} in
  steps) steps ;;
  table) table ;;
  *) echo "usage: $0 steps|table" >&2; exit 2 ;;
esac
