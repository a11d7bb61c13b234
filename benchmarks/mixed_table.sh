#!/usr/bin/env bash
# Mixed precision under a budget (issue 15) on the shared ResNet-20 teachers: uniform bits beside
# each allocator at the budgets of uniform W4 and W3 weights (A4), after min/max and GDFQ+AIT.
#
#   PATH=.venv/bin:$PATH bash benchmarks/mixed_table.sh
#   PATH=.venv/bin:$PATH DATASETS=cifar10-jpeg BUDGETS=4 ROWS="uniform sensitivity" bash benchmarks/mixed_table.sh
#   python benchmarks/summarize_mixed.py runs/mixed-table      # the markdown table and the plot
#
# Environment: RUNS (runs/mixed-table), SEED (0), DATASETS ("cifar10-jpeg fashion-mnist"),
# BUDGETS ("4 3": wbits=B, activations 4 bits; "bops4": the BOPs of uniform W4A4, where the
# sensitivity row chooses activation widths too and "sensitivity-w" keeps them at 4),
# ROWS (below), METHODS ("minmax ait"),
# UNIFORM ("2 5 6 8": extra uniform min/max widths for the size plot). A finished row is skipped.
# Rows: uniform (--wbits B), sensitivity, hessian, constrained, penalty (--budget wbits=B),
# sensitivity-w (bops budgets: --act-choices off).
# The allocators see 64 ZeroQ images (data-free), distilled once per teacher (RUNS/cache); the
# GDFQ+AIT rows reuse the min/max row's bits.json (--bits-from), so both share one allocation.
set -euo pipefail
source "$(dirname "$0")/_env.sh"
SHARED=${ZSQ_SHARED_DATA:-../shared/data}
RUNS=${RUNS:-runs/mixed-table}
SEED=${SEED:-0}
DATASETS=${DATASETS:-"cifar10-jpeg fashion-mnist"}
BUDGETS=${BUDGETS:-"4 3"}
ROWS=${ROWS:-"uniform sensitivity hessian constrained penalty"}
METHODS=${METHODS:-"minmax ait"}
UNIFORM=${UNIFORM:-"2 5 6 8"}
mkdir -p "$RUNS/cache"

teacher_flags() {  # data-name
  case $1 in
    cifar10-jpeg) echo "--model resnet20 --weights $SHARED/weights/resnet20_cifar10jpeg.pt --eval-data cifar10-jpeg:$SHARED/cifar10-jpeg" ;;
    fashion-mnist) echo "--model resnet20 --weights $SHARED/weights/resnet20_fashionmnist.pt --image-size 28 --eval-data fashion-mnist:$SHARED/fashion-mnist" ;;
    *) echo "unknown dataset $1" >&2; return 2 ;;
  esac
}

run() {  # data-name dir flags...
  local name=$1 dir=$2; shift 2
  [ -f "$dir/report.json" ] && { echo "skip $dir (done)"; return; }
  local where=(--out "$dir")
  [ -d "$dir.partial/checkpoint" ] && where=(--resume "$dir")
  mkdir -p "$(dirname "$dir")"
  # shellcheck disable=SC2046
  zsq quantize $(teacher_flags "$name") --abits 4 --seed "$SEED" --device "${DEVICE:-cpu}" \
    --quiet --json "$@" "${where[@]}" > "$dir.json" 2> "$dir.log"
  echo "done $dir"
}

bops_of_uniform() {  # data-name bits: the BOPs of uniform W<bits>A4 on the teacher
  python - "$SHARED" "$1" "$2" <<'PY'
import sys
from zsq.mixed.cost import budget_of_uniform, layer_costs
from zsq.models import load_teacher
shared, data, bits = sys.argv[1], sys.argv[2], int(sys.argv[3])
name, shape = {"cifar10-jpeg": ("cifar10jpeg", (3, 32, 32)), "fashion-mnist": ("fashionmnist", (1, 28, 28))}[data]
model, _ = load_teacher("resnet20", f"{shared}/weights/resnet20_{name}.pt")
print(round(budget_of_uniform(layer_costs(model, shape), "bops", bits, 4)))
PY
}

row_flags() {  # method row budget data-name
  local alloc=(--alloc-opt "cache=$RUNS/cache/$4-zeroq64.safetensors")
  local method=(--method minmax)
  local folder="w$3" budget="wbits=$3" acts=""
  case $3 in bops*) folder=$3 budget="bops=$(bops_of_uniform "$4" "${3#bops}")" ;; esac
  [ "$1" = ait ] && method=(--method gdfq --ait --recipe short)
  if [ "$2" = uniform ]; then echo "${method[*]} --wbits ${3#bops}"; return; fi
  if [ "$1" = ait ]; then echo "${method[*]} --bits-from $RUNS/$4/$folder/minmax-$2"; return; fi
  local allocator=$2
  [ "$2" = sensitivity-w ] && allocator=sensitivity acts="--act-choices off"
  echo "${method[*]} --budget $budget --allocator $allocator $acts ${alloc[*]}"
}

for data in $DATASETS; do
  for method in $METHODS; do
    for bits in $BUDGETS; do
      for row in $ROWS; do
        # shellcheck disable=SC2046
        folder="w$bits"
        case $bits in bops*) folder=$bits ;; esac
        run "$data" "$RUNS/$data/$folder/$method-$row" $(row_flags "$method" "$row" "$bits" "$data")
      done
    done
  done
  for bits in $UNIFORM; do
    run "$data" "$RUNS/$data/w$bits/minmax-uniform" --method minmax --wbits "$bits"
  done
done
