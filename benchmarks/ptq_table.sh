#!/usr/bin/env bash
# Foundation checks: the public ResNet-20 evaluated exactly, and min/max PTQ at W8A8 / W4A4 with
# Gaussian (data-free) and real (512 CIFAR-10-JPEG training images) activation calibration.
#   PATH=.venv/bin:$PATH bash benchmarks/ptq_table.sh     # RUNS (runs/ptq); ~30 min on 2 CPU cores
# EXTRA: flags added to every `zsq quantize` (docs/results.md section 1 ran with
# EXTRA="--act-placement input", the placement before issue 10; the default is now `reference`).
# Prints one JSON line per run; the numbers go to docs/results.md.
set -euo pipefail
source "$(dirname "$0")/_env.sh"
SHARED=${ZSQ_SHARED_DATA:-../shared/data}
RUNS=${RUNS:-runs/ptq}
W=$SHARED/weights/resnet20_cifar10_akamaster.th
JPEG=cifar10-jpeg:$SHARED/cifar10-jpeg
EXACT=npz:$SHARED/cifar10-exact/test_first846.npz
mkdir -p "$RUNS"
zsq eval --model resnet20 --weights "$W" --data "$EXACT" --json --quiet --device cpu
zsq eval --model resnet20 --weights "$W" --data "$JPEG" --json --quiet --device cpu
for bits in 8 4; do
  for calib in gaussian "$JPEG"; do
    name=w${bits}a${bits}-$( [ "$calib" = gaussian ] && echo gaussian || echo real512 )
    for data in "$EXACT" "$JPEG"; do
      tag=$( [ "$data" = "$EXACT" ] && echo exact846 || echo jpeg10k )
      zsq quantize --model resnet20 --weights "$W" --method minmax --wbits $bits --abits $bits \
        --calib "$calib" --calib-size 512 --eval-data "$data" --seed 0 --device cpu --quiet \
        --json --overwrite --out "$RUNS/$name-$tag" ${EXTRA:-} \
        | python3 -c "import json,sys; r=json.load(sys.stdin); print(json.dumps({k: r[k] for k in ('method','wbits','abits','calibration','eval_data','teacher_top1','student_top1','n_eval','seconds','device','seed')}))"
    done
  done
done
