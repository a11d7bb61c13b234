#!/usr/bin/env bash
# Post-training methods on the shared ResNet-20 teachers (issue 11): min/max, ZeroQ, LAPQ on real,
# ZeroQ and GDFQ calibration images, LAPQ's ablations, and GDFQ+AIT started from LAPQ.
#
#   PATH=.venv/bin:$PATH bash benchmarks/ptq_methods.sh                # every row, CPU
#   PATH=.venv/bin:$PATH ROWS="zeroq lapq-zeroq" BITS="4/4" DATASETS=cifar10-jpeg bash benchmarks/ptq_methods.sh
#   python benchmarks/summarize_ptq.py runs/ptq-methods                # the markdown tables
#
# Environment: RUNS (runs/ptq-methods), SEED (0), DEVICE (cpu), DATASETS ("cifar10-jpeg
# fashion-mnist"), BITS ("4/4 4/8 8/4 8/8", W/A), ROWS (below). A finished row is skipped.
# ZeroQ and GDFQ calibration images are made once per teacher (RUNS/cache) and reused by every bit
# width and method: the runs that load them report it in their log.
# Rows:
#   minmax                 min/max, Gaussian calibration (data-free)
#   zeroq                  min/max on 512 ZeroQ distilled images (data-free)
#   lapq-real              LAPQ on 512 REAL training images (not zero-shot)
#   lapq-zeroq lapq-gdfq   LAPQ on ZeroQ / GDFQ images (data-free; beyond both papers)
#   lapq-lw lapq-qa        LAPQ's Table 3: layer-wise only (p=2), + quadratic p (real images)
#   lapq-zeroq-lw lapq-zeroq-qa   the same two stages on ZeroQ images (data-free)
#   lapq-nobc              LAPQ's Table 4: without bias correction (real images)
#   lapq-paper             --lapq-layers paper (stem, last conv, classifier in FP; real images)
#   ait ait-init           GDFQ+AIT short recipe, from the float copy / from LAPQ on ZeroQ data
#   ait-init-qa            ... from LAPQ's layer-wise + quadratic-p solution on ZeroQ data
set -euo pipefail
source "$(dirname "$0")/_env.sh"
SHARED=${ZSQ_SHARED_DATA:-../shared/data}
RUNS=${RUNS:-runs/ptq-methods}
SEED=${SEED:-0}
BITS=${BITS:-"4/4 4/8 8/4 8/8"}
ROWS=${ROWS:-"minmax zeroq lapq-real lapq-zeroq lapq-gdfq lapq-lw lapq-qa lapq-nobc lapq-paper ait ait-init"}
mkdir -p "$RUNS/cache"

row_flags() {  # row data-name train-spec
  local zq="--source-opt cache=$RUNS/cache/$2-zeroq.safetensors"
  case $1 in
    minmax)     echo "--method minmax" ;;
    zeroq)      echo "--method zeroq $zq" ;;
    lapq-real)  echo "--method lapq --calib $3" ;;
    lapq-zeroq) echo "--method lapq --calib zeroq $zq" ;;
    lapq-gdfq)  echo "--method lapq --calib gdfq --source-opt cache=$RUNS/cache/$2-gdfq.safetensors" ;;
    lapq-lw)    echo "--method lapq --calib $3 --lapq-opt stages=lw" ;;
    lapq-qa)    echo "--method lapq --calib $3 --lapq-opt stages=lw+qa" ;;
    lapq-zeroq-lw) echo "--method lapq --calib zeroq $zq --lapq-opt stages=lw" ;;
    lapq-zeroq-qa) echo "--method lapq --calib zeroq $zq --lapq-opt stages=lw+qa" ;;
    lapq-nobc)  echo "--method lapq --calib $3 --lapq-opt bias_correction=false" ;;
    lapq-paper) echo "--method lapq --calib $3 --lapq-layers paper" ;;
    ait)        echo "--method gdfq --ait --recipe short" ;;
    ait-init)   echo "--method gdfq --ait --recipe short --init lapq --calib-opt cache=$RUNS/cache/$2-zeroq.safetensors" ;;
    ait-init-qa) echo "--method gdfq --ait --recipe short --init lapq --lapq-opt stages=lw+qa --calib-opt cache=$RUNS/cache/$2-zeroq.safetensors" ;;
    *) echo "unknown row $1" >&2; return 2 ;;
  esac
}

run_row() {  # data-name weights eval-spec train-spec image-size row bits
  local name=$1 weights=$2 data=$3 train=$4 size=$5 row=$6 w=${7%/*} a=${7#*/}
  local dir="$RUNS/$name/w${w}a${a}/$row"
  [ -f "$dir/report.json" ] && { echo "skip $dir (done)"; return; }
  local where=(--out "$dir")
  [ -d "$dir.partial/checkpoint" ] && where=(--resume "$dir")
  mkdir -p "$(dirname "$dir")"
  # shellcheck disable=SC2046
  zsq quantize --model resnet20 --weights "$weights" --image-size "$size" --wbits "$w" \
    --abits "$a" --eval-data "$data" --seed "$SEED" --device "${DEVICE:-cpu}" --quiet --json \
    $(row_flags "$row" "$name" "$train") "${where[@]}" > "$dir.json" 2> "$dir.log"
  echo "done $dir"
}

DATASETS=${DATASETS:-"cifar10-jpeg fashion-mnist"}
for data in $DATASETS; do
  for bits in $BITS; do
    for row in $ROWS; do
      case $row in ait|ait-init*|lapq-lw|lapq-qa|lapq-nobc|lapq-paper|lapq-zeroq-*) [ "$bits" = 4/4 ] || continue ;; esac
      case $data in
        fashion-mnist) run_row fashion-mnist "$SHARED/weights/resnet20_fashionmnist.pt" \
          "fashion-mnist:$SHARED/fashion-mnist" "fashion-mnist:$SHARED/fashion-mnist" 28 "$row" "$bits" ;;
        cifar10-jpeg) run_row cifar10-jpeg "$SHARED/weights/resnet20_cifar10jpeg.pt" \
          "cifar10-jpeg:$SHARED/cifar10-jpeg" "cifar10-jpeg:$SHARED/cifar10-jpeg" 32 "$row" "$bits" ;;
        *) echo "unknown dataset $data" >&2; exit 2 ;;
      esac
    done
  done
done
