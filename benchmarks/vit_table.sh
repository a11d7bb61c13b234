#!/usr/bin/env bash
# Data-free quantization of the Fashion-MNIST ViT teacher (issue 16): min/max on Gaussian noise,
# PSAQ-ViT (min/max calibrated on its images), MimiQ (KL + head-wise attention distillation on
# its images), MimiQ + AIT (+ gradient inundation), and the Gaussian-noise baseline (MimiQ's
# distillation on 32 unoptimised noise images), at W8A8, W4A8, W4A4.
#
#   PATH=.venv/bin:$PATH bash benchmarks/vit_table.sh
#   python benchmarks/summarize_runs.py runs/vit-table     # or read each DIR/report.json
#
# Environment: RUNS (runs/vit-table), SEED (0), BITS ("8/8 4/8 4/4"), ROWS (below), RECIPE (short),
# DEVICE (cpu). Synthetic images are made once (RUNS/cache) and reused by every bit width.
# Rows: minmax, psaq, mimiq, mimiq+ait, noise.
set -euo pipefail
source "$(dirname "$0")/_env.sh"
SHARED=${ZSQ_SHARED_DATA:-../shared/data}
RUNS=${RUNS:-runs/vit-table}
SEED=${SEED:-0}
BITS=${BITS:-"8/8 4/8 4/4"}
ROWS=${ROWS:-"minmax psaq mimiq mimiq+ait noise"}
RECIPE=${RECIPE:-short}
mkdir -p "$RUNS/cache"

row_flags() {
  case $1 in
    minmax) echo "--method minmax" ;;
    psaq) echo "--method minmax --calib psaq --calib-size 32 --calib-opt cache=$RUNS/cache/psaq.safetensors" ;;
    mimiq) echo "--method mimiq --recipe $RECIPE --source-opt cache=$RUNS/cache/mimiq.safetensors" ;;
    mimiq+ait) echo "--method mimiq --ait --recipe $RECIPE --source-opt cache=$RUNS/cache/mimiq.safetensors" ;;
    noise) echo "--method mimiq --recipe $RECIPE --source-opt steps=0 --source-opt cache=$RUNS/cache/noise.safetensors" ;;
    *) echo "unknown row $1" >&2; return 2 ;;
  esac
}

for bits in $BITS; do
  for row in $ROWS; do
    w=${bits%/*} a=${bits#*/}
    dir="$RUNS/w${w}a${a}/$row"
    [ -f "$dir/report.json" ] && { echo "skip $dir (done)"; continue; }
    where=(--out "$dir")
    [ -d "$dir.partial/checkpoint" ] && where=(--resume "$dir")
    mkdir -p "$(dirname "$dir")"
    # shellcheck disable=SC2046
    zsq quantize --weights "$SHARED/weights/vit_fashionmnist.safetensors" --wbits "$w" --abits "$a" \
      --eval-data "fashion-mnist:$SHARED/fashion-mnist" --seed "$SEED" --device "${DEVICE:-cpu}" \
      --quiet --json $(row_flags "$row") "${where[@]}" > "$dir.json" 2> "$dir.log"
    echo "done $dir"
  done
done
