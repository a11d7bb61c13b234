#!/usr/bin/env bash
# W<BITS>A<BITS> table (BITS=4 by default) on CPU with the `short` recipe for the two shared
# ResNet-20 teachers. Rows (ROWS=...):
# minmax gdfq gdfq+ait kl-only (issue 3, the default) and qimera qimera+ait arc arc+ait ait-adam
# ait-rmsprop (issue 4); DATASETS="fashion-mnist cifar10-jpeg" by default. Outputs under
# runs/issue3/<data>/<row>/ (report.json, metrics.jsonl); summarise with `python benchmarks/summarize_runs.py runs/issue3`. DEVICE (cpu)
# and EXTRA (more flags for the distillation rows, e.g. "--precision tf32") serve GPU runs.
set -euo pipefail
SHARED=${ZSQ_SHARED_DATA:-../shared/data}
BITS=${BITS:-4}
OUT=${OUT:-runs/issue3}
SEED=${SEED:-0}
RECIPE=${RECIPE:-short}
ROWS=${ROWS:-"minmax gdfq gdfq+ait kl-only"}
mkdir -p "$OUT"

run_row() {  # data-name weights eval-spec image-size row
  local name=$1 weights=$2 data=$3 size=$4 row=$5
  local dir="$OUT/$name/$row"
  [ -f "$dir/report.json" ] && { echo "skip $dir (done)"; return; }
  local args=(--model resnet20 --weights "$weights" --image-size "$size" --wbits "$BITS" --abits "$BITS"
              --eval-data "$data" --seed "$SEED" --device "${DEVICE:-cpu}" --quiet --json)
  local extra=()
  [ "$row" = minmax ] || read -r -a extra <<< "${EXTRA:-}"
  args+=("${extra[@]}")
  local resume=(--out "$dir")
  [ -d "$dir.partial/checkpoint" ] && resume=(--resume "$dir")
  case $row in
    minmax)  zsq quantize "${args[@]}" "${resume[@]}" --method minmax ;;
    gdfq)    zsq quantize "${args[@]}" "${resume[@]}" --method gdfq --recipe "$RECIPE" ;;
    gdfq+ait) zsq quantize "${args[@]}" "${resume[@]}" --method gdfq --ait --recipe "$RECIPE" ;;
    kl-only) zsq quantize "${args[@]}" "${resume[@]}" --method gdfq --loss kl --no-gi --recipe "$RECIPE" ;;
    qimera|arc) zsq quantize "${args[@]}" "${resume[@]}" --method "$row" --recipe "$RECIPE" ;;
    qimera+ait|arc+ait) zsq quantize "${args[@]}" "${resume[@]}" --method "${row%+ait}" --ait --recipe "$RECIPE" ;;
    ait-adam|ait-rmsprop) zsq quantize "${args[@]}" "${resume[@]}" --method gdfq --ait --optimizer "${row#ait-}" --recipe "$RECIPE" ;;
    *) echo "unknown row $row" >&2; exit 2 ;;
  esac > "$OUT/$name.$row.json" 2> "$OUT/$name.$row.log"
  echo "done $dir"
}

DATASETS=${DATASETS:-"fashion-mnist cifar10-jpeg"}
for row in $ROWS; do
  for data in $DATASETS; do
    case $data in
      fashion-mnist) run_row fashion-mnist "$SHARED/weights/resnet20_fashionmnist.pt" "fashion-mnist:$SHARED/fashion-mnist" 28 "$row" ;;
      cifar10-jpeg) run_row cifar10-jpeg "$SHARED/weights/resnet20_cifar10jpeg.pt" "cifar10-jpeg:$SHARED/cifar10-jpeg" 32 "$row" ;;
    esac
  done
done
