#!/usr/bin/env bash
# Block reconstruction on the ViT teacher's timm blocks (issue 25), beside section 11's MimiQ
# and PSAQ-ViT rows: 32 PSAQ-ViT images (1,000 steps, as section 11's PSAQ row; cached), then
# `--method genie --recipe short --convention all` (every layer at the row's widths).
#
#   PATH=.venv/bin:$PATH bash benchmarks/reconstruction_vit.sh
#
# Environment: RUNS (runs/reconstruction-vit), SEED (0), DEVICE (cpu), BITS ("4/8 4/4").
set -euo pipefail
source "$(dirname "$0")/_env.sh"
SHARED=${ZSQ_SHARED_DATA:-../shared/data}
RUNS=${RUNS:-runs/reconstruction-vit}
BITS=${BITS:-"4/8 4/4"}
mkdir -p "$RUNS/cache"
for bits in $BITS; do
  w=${bits%/*} a=${bits#*/}
  dir="$RUNS/w${w}a${a}/recon-psaq"
  [ -f "$dir/report.json" ] && { echo "skip $dir (done)"; continue; }
  where=(--out "$dir")
  [ -d "$dir.partial/checkpoint" ] && where=(--resume "$dir")
  mkdir -p "$(dirname "$dir")"
  zsq quantize --weights "$SHARED/weights/vit_fashionmnist.safetensors" --wbits "$w" --abits "$a" \
    --eval-data "fashion-mnist:$SHARED/fashion-mnist" --seed "${SEED:-0}" \
    --device "${DEVICE:-cpu}" --quiet --json --method genie --recipe short --convention all \
    --calib psaq --calib-size 32 --calib-opt "cache=$RUNS/cache/psaq32.safetensors" \
    "${where[@]}" > "$dir.json" 2> "$dir.log"
  echo "done $dir"
done
