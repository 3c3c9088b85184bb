#!/usr/bin/env bash
# Runs every analysis behind docs/results/imagenet.md on both ImageNet-trained zoo models and
# writes its outputs under docs/results/imagenet/. Resumable: a stage whose output exists is
# skipped (delete the file to redo it); the clusterability stages checkpoint their shuffles.
#   bash scripts/imagenet_results.sh [STAGE...]    stages: banding svd equivariance render examples weights activations
set -euo pipefail
cd "$(dirname "$0")/.."
NA=${NA:-.venv/bin/netanatomy}
OUT=docs/results/imagenet
mkdir -p "$OUT"
MODELS=(mobilenet_v2-imagenet efficientnet_lite0-imagenet)
declare -A STEM=([mobilenet_v2-imagenet]=stem [efficientnet_lite0-imagenet]=stem)
declare -A POINTWISE=([mobilenet_v2-imagenet]=block1_project [efficientnet_lite0-imagenet]=block0_project)
declare -A MIDDLE=([mobilenet_v2-imagenet]=block8_expand [efficientnet_lite0-imagenet]=block7_expand)
declare -A PROJECTS=(
  [mobilenet_v2-imagenet]=block2_project,block4_project,block7_project,block11_project,block14_project,block17_project
  [efficientnet_lite0-imagenet]=block1_project,block3_project,block5_project,block8_project,block11_project,block15_project)
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(banding svd equivariance examples render weights activations)
PHOTOS="photos?n=2000&size=224"

# shellcheck source=scripts/lib.sh
. scripts/lib.sh

for stage in "${STAGES[@]}"; do
  for m in "${MODELS[@]}"; do
    case $stage in
      banding)
        run "$OUT/$m.banding.json" $NA banding "zoo:$m" --json
        run "$OUT/$m.banding-foldbn.json" $NA banding "zoo:$m" --fold-bn --json ;;
      svd)
        run "$OUT/$m.svd-direct.json" $NA svd "zoo:$m" --layer "${POINTWISE[$m]}" --json
        run "$OUT/$m.svd-direct-centred.json" $NA svd "zoo:$m" --layer "${POINTWISE[$m]}" --center --json
        run "$OUT/$m.svd-through.json" $NA svd "zoo:$m" --layer "${POINTWISE[$m]}" --lower "${STEM[$m]}" --through --json
        run "$OUT/$m.svd-through-centred.json" $NA svd "zoo:$m" --layer "${POINTWISE[$m]}" --lower "${STEM[$m]}" --through --center --json
        run "$OUT/$m.svd-through-figure.json" $NA svd "zoo:$m" --layer "${POINTWISE[$m]}" --lower "${STEM[$m]}" --through \
          --out "$OUT/$m-svd-through" --json ;;
      equivariance)
        run "$OUT/$m.equivariance.json" $NA equivariance "zoo:$m" --layer "${STEM[$m]}" --out "$OUT/$m-stem-families" --json ;;
      examples)
        run "$OUT/$m.examples.json" $NA examples "zoo:$m" --layer "${MIDDLE[$m]}" --units 0-15 --data "$PHOTOS" \
          --out "$OUT/$m-examples" --json ;;
      render)
        run "$OUT/$m.render.json" $NA render "zoo:$m" --layer "${MIDDLE[$m]}" --units 0-15 --steps 256 --param-size 128 \
          --out "$OUT/$m-render" --json ;;
      weights)
        run "$OUT/$m.clusters-weights.json" $NA clusters "zoo:$m" --graph weights --k 12 --shuffles 119 \
          --out "$OUT/$m.clusters-weights.result.json" --json ;;
      activations)
        run "$OUT/$m.clusters-activations.json" $NA clusters "zoo:$m" --graph activations --data "photos?n=300&size=224" \
          --layers "${PROJECTS[$m]}" --k 12 --shuffles 119 --out "$OUT/$m.clusters-activations.result.json" --json ;;
      *) echo "unknown stage $stage" >&2; exit 2 ;;
    esac
  done
done
