#!/usr/bin/env bash
# The reconstruction line beside the distillation line (issue 25), on the shared ResNet-20
# teachers: min/max, LAPQ on GDFQ images, GDFQ+AIT short, Genie (Genie-D + reconstruction),
# reconstruction on GDFQ, ZeroQ and real images, and GDFQ+AIT started from Genie.
#
#   PATH=.venv/bin:$PATH bash benchmarks/reconstruction_table.sh           # every row, CPU
#   PATH=.venv/bin:$PATH ROWS="genie" BITS="4/4" DATASETS=cifar10-jpeg bash benchmarks/reconstruction_table.sh
#   python benchmarks/summarize_reconstruction.py runs/reconstruction      # the markdown tables
#
# Environment: RUNS (runs/reconstruction), SEED (0), DEVICE (cpu), DATASETS ("cifar10-jpeg
# fashion-mnist"), BITS ("4/4 3/3 2/4", W/A), ROWS (below). A finished row is skipped; an
# interrupted one resumes. Genie, GDFQ and ZeroQ images (1,024 per teacher; LAPQ's GDFQ images:
# 512, as section 7) are made once per teacher (RUNS/cache) and reused by every bit width and row:
# only the first run that needs them pays for them (its log says so).
# Every row quantizes all layers at the given widths (convention "all") but genie-paperconv.
# Rows:
#   minmax           min/max, Gaussian calibration (data-free)
#   lapq-gdfq        LAPQ on 512 GDFQ images (data-free)
#   ait              GDFQ+AIT, recipe short
#   genie            Genie: 1,024 Genie-D images, block reconstruction, recipe short
#   genie-paperconv  the same with the reconstruction papers' convention (first/last at 8 bits)
#   recon-gdfq       block reconstruction on 1,024 GDFQ images (recipe short)
#   recon-zeroq      block reconstruction on 1,024 ZeroQ images (recipe short)
#   recon-real       block reconstruction on 1,024 REAL training images (not zero-shot)
#   genie-ait        GDFQ+AIT short started from Genie (recipe short)
#   genie-paper      Genie with recipe paper (the reference's iterations; hours on a CPU)
set -euo pipefail
source "$(dirname "$0")/_env.sh"
SHARED=${ZSQ_SHARED_DATA:-../shared/data}
RUNS=${RUNS:-runs/reconstruction}
SEED=${SEED:-0}
BITS=${BITS:-"4/4 3/3 2/4"}
ROWS=${ROWS:-"minmax lapq-gdfq ait genie genie-paperconv recon-gdfq recon-zeroq recon-real genie-ait"}
mkdir -p "$RUNS/cache"

row_flags() {  # row data-name train-spec
  local cache="$RUNS/cache/$2"
  local genie="--recipe short --calib-opt cache=$cache-genie.safetensors --convention all"
  case $1 in
    minmax)          echo "--method minmax" ;;
    lapq-gdfq)       echo "--method lapq --calib gdfq --calib-opt cache=$cache-gdfq512.safetensors" ;;
    ait)             echo "--method gdfq --ait --recipe short" ;;
    genie)           echo "--method genie $genie" ;;
    genie-paperconv) echo "--method genie --recipe short --calib-opt cache=$cache-genie.safetensors --convention paper" ;;
    recon-gdfq)      echo "--method genie --recipe short --convention all --calib gdfq --calib-opt cache=$cache-gdfq.safetensors" ;;
    recon-zeroq)     echo "--method genie --recipe short --convention all --calib zeroq --calib-opt cache=$cache-zeroq.safetensors" ;;
    recon-real)      echo "--method genie --recipe short --convention all --calib $3" ;;
    genie-ait)       echo "--method gdfq --ait --recipe short --init genie --init-opt recipe=short --calib-opt cache=$cache-genie.safetensors --convention all" ;;
    genie-paper)     echo "--method genie --recipe paper --convention all --calib-opt cache=$cache-genie-paper.safetensors" ;;
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
  local size_flags=()
  case $row in recon-*|genie*) size_flags=(--calib-size 1024) ;; esac
  # shellcheck disable=SC2046
  zsq quantize --model resnet20 --weights "$weights" --image-size "$size" --wbits "$w" \
    --abits "$a" --eval-data "$data" --seed "$SEED" --device "${DEVICE:-cpu}" --quiet --json \
    "${size_flags[@]}" $(row_flags "$row" "$name" "$train") "${where[@]}" > "$dir.json" 2> "$dir.log"
  echo "done $dir"
}

DATASETS=${DATASETS:-"cifar10-jpeg fashion-mnist"}
for data in $DATASETS; do
  for bits in $BITS; do
    for row in $ROWS; do
      case $row in genie-paperconv|genie-paper) [ "$bits" = 4/4 ] || continue ;; esac
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
