#!/usr/bin/env bash
# Runs what docs/results/universality.md reports and writes it under docs/results/universality/.
# Resumable: an output that exists is skipped.
#   bash scripts/universality_results.sh
# 1. MobileNetV2 vs EfficientNet-Lite0 (both ImageNet-trained, from the zoo) on 2000 photo patches:
#    CKA between the ends of their stages, unit matching stage by stage and in the first expand
#    layers, against 3 copies of Lite0 with random weights.
# 2. Module recurrence across the seeds of `lab specialization` (run here if missing): each
#    seed's MLP clustered (k = 12, the lab's clustering), then every pair of seeds compared on
#    5000 Fashion-MNIST test images with their clusters.
set -euo pipefail
cd "$(dirname "$0")/.."
NA=${NA:-.venv/bin/netanatomy}
OUT=docs/results/universality
LAB=${LAB:-runs/lab-specialization}
mkdir -p "$OUT"

# shellcheck source=scripts/lib.sh
. scripts/lib.sh

A_STAGES=stem,block1_project,block3,block6,block10,block13,block16,block17_project,head
B_STAGES=stem,block0_project,block2,block4,block7,block10,block14,block15_project,head
MATCH=()
IFS=, read -ra SA <<< "$A_STAGES"
IFS=, read -ra SB <<< "$B_STAGES"
for i in "${!SA[@]}"; do MATCH+=(--match "${SA[$i]}:${SB[$i]}"); done
run "$OUT/imagenet.json" $NA compare zoo:mobilenet_v2-imagenet zoo:efficientnet_lite0-imagenet \
  --data "photos?n=2000" --examples 2000 --layers-a "$A_STAGES,block2_expand" --layers-b "$B_STAGES,block1_expand" \
  "${MATCH[@]}" --match block2_expand:block1_expand --null-models 3 --out "$OUT/imagenet" --json

if [ ! -s "$LAB/results.json" ]; then
  $NA lab specialization --out "$LAB" > /dev/null
fi
for s in 0 1 2; do
  run "$OUT/mlp_seed$s.clusters.json" $NA clusters zoo:mlp --weights "$LAB/seed_$s/model.pt" --k 12 --shuffles 0 --seed "$s" \
    --out "$OUT/mlp_seed$s.clusters.out.json" --json
done
for pair in "0 1" "0 2" "1 2"; do
  set -- $pair
  run "$OUT/mlp_$1_vs_$2.json" $NA compare zoo:mlp zoo:mlp --weights-a "$LAB/seed_$1/model.pt" \
    --weights-b "$LAB/seed_$2/model.pt" --data fashion-mnist --examples 5000 --null-models 3 \
    --clusters-a "$OUT/mlp_seed$1.clusters.out.json" --clusters-b "$OUT/mlp_seed$2.clusters.out.json" \
    --out "$OUT/mlp_$1_vs_$2" --json
done

# 3. The early layers again, each unit read at the centre of its map instead of its spatial mean
#    (a spatial mean of an early unit is close to a linear function of the patch's mean colour,
#    which random filters share; the centre value is a local response).
run "$OUT/imagenet_early_center.json" $NA compare zoo:mobilenet_v2-imagenet zoo:efficientnet_lite0-imagenet \
  --data "photos?n=2000" --examples 2000 --layers-a stem,block1_project,block2_expand \
  --layers-b stem,block0_project,block1_expand --reduce center --null-models 3 \
  --out "$OUT/imagenet_early_center" --json
