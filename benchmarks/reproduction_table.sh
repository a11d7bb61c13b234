#!/usr/bin/env bash
# The reproduction table: every method and ablation row on the shared ResNet-20 teachers.
#
#   PATH=.venv/bin:$PATH bash benchmarks/reproduction_table.sh            # default rows, CPU
#   PATH=.venv/bin:$PATH ROWS="gdfq gdfq+ait" DATASETS=cifar10-jpeg bash benchmarks/reproduction_table.sh
#   python benchmarks/summarize_runs.py runs/reproduction                 # the markdown tables
#
# Environment: BITS (4), RUNS (runs/reproduction), SEED (0), RECIPE (short), DEVICE (cpu),
# DATASETS ("cifar10-jpeg fashion-mnist"), EXTRA (more flags for the distillation rows, e.g.
# "--precision tf32"), ROWS (below). A finished row is skipped; an interrupted one resumes.
# Rows (paper Table 1, Table 2 ablation, Table 3 optimisers, and our named options):
#   minmax                              min/max PTQ, Gaussian calibration (data-free)
#   gdfq qimera arc                     the bases (CE + KL, Nesterov SGD)
#   gdfq+ait qimera+ait arc+ait         AIT on each base (KL-only + GI)
#   kl-only kl-high-lr gdfq+gi ce+gi    Table 2: KL-only, KL-only x100 lr, Baseline+GI, CE-only+GI
#   gdfq-adam gdfq-rmsprop              Table 3: Baseline-Adam / -RMSProp (no GI)
#   ait-adam ait-rmsprop                Table 3: GI-Adam / GI-RMSProp (not in the released code)
#   ait-input                           GDFQ+AIT with --act-placement input (ours, harsher)
#   ait-levels                          GDFQ+AIT counting levels q+z (--set gi_count=levels)
#   ait-nearest                         GDFQ+AIT with our kappa rule (--set gi_search=nearest-above)
set -euo pipefail
source "$(dirname "$0")/_env.sh"
SHARED=${ZSQ_SHARED_DATA:-../shared/data}
BITS=${BITS:-4}
RUNS=${RUNS:-runs/reproduction}
SEED=${SEED:-0}
RECIPE=${RECIPE:-short}
ROWS=${ROWS:-"minmax gdfq gdfq+ait kl-only kl-high-lr gdfq+gi ce+gi qimera qimera+ait arc arc+ait gdfq-adam gdfq-rmsprop ait-adam ait-rmsprop ait-input ait-levels"}
mkdir -p "$RUNS"

row_flags() {  # the flags that define a row
  case $1 in
    minmax)       echo "--method minmax" ;;
    gdfq|qimera|arc) echo "--method $1 --recipe $RECIPE" ;;
    *+ait)        echo "--method ${1%+ait} --ait --recipe $RECIPE" ;;
    kl-only)      echo "--method gdfq --loss kl --no-gi --recipe $RECIPE" ;;
    kl-high-lr)   echo "--method gdfq --loss kl --no-gi --lr-mult 100 --recipe $RECIPE" ;;
    gdfq+gi)      echo "--method gdfq --gi --recipe $RECIPE" ;;
    ce+gi)        echo "--method gdfq --loss ce --gi --recipe $RECIPE" ;;
    gdfq-adam|gdfq-rmsprop) echo "--method gdfq --optimizer ${1#gdfq-} --recipe $RECIPE" ;;
    ait-adam|ait-rmsprop)   echo "--method gdfq --ait --optimizer ${1#ait-} --recipe $RECIPE" ;;
    ait-input)    echo "--method gdfq --ait --act-placement input --recipe $RECIPE" ;;
    ait-levels)   echo "--method gdfq --ait --set gi_count=levels --recipe $RECIPE" ;;
    ait-nearest)  echo "--method gdfq --ait --set gi_search=nearest-above --recipe $RECIPE" ;;
    *) echo "unknown row $1" >&2; return 2 ;;
  esac
}

run_row() {  # data-name weights eval-spec image-size row
  local name=$1 weights=$2 data=$3 size=$4 row=$5
  local dir="$RUNS/$name/$row"
  [ -f "$dir/report.json" ] && { echo "skip $dir (done)"; return; }
  local flags extra=()
  flags=$(row_flags "$row")
  [ "$row" = minmax ] || read -r -a extra <<< "${EXTRA:-}"
  local where=(--out "$dir")
  [ -d "$dir.partial/checkpoint" ] && where=(--resume "$dir")
  # shellcheck disable=SC2086
  zsq quantize --model resnet20 --weights "$weights" --image-size "$size" --wbits "$BITS" \
    --abits "$BITS" --eval-data "$data" --seed "$SEED" --device "${DEVICE:-cpu}" --quiet --json \
    $flags "${extra[@]}" "${where[@]}" > "$RUNS/$name.$row.json" 2> "$RUNS/$name.$row.log"
  echo "done $dir"
}

DATASETS=${DATASETS:-"cifar10-jpeg fashion-mnist"}
for row in $ROWS; do
  for data in $DATASETS; do
    case $data in
      fashion-mnist) run_row fashion-mnist "$SHARED/weights/resnet20_fashionmnist.pt" "fashion-mnist:$SHARED/fashion-mnist" 28 "$row" ;;
      cifar10-jpeg) run_row cifar10-jpeg "$SHARED/weights/resnet20_cifar10jpeg.pt" "cifar10-jpeg:$SHARED/cifar10-jpeg" 32 "$row" ;;
      *) echo "unknown dataset $data" >&2; exit 2 ;;
    esac
  done
done
