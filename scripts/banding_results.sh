#!/usr/bin/env bash
# Runs what docs/results/banding.md reports and copies it under docs/results/banding/.
# Resumable: the lab re-uses every finished network; an output that exists is skipped.
#   bash scripts/banding_results.sh          (about 75 minutes on 2 cores from nothing)
# 1. The Weight Banding lab: all 12 variants x 3 seeds on Fashion-MNIST and on photo patches.
# 2. The ImageNet-trained zoo networks' banding (with the axis test), for the comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
NA=${NA:-.venv/bin/netanatomy}
LAB=${LAB:-runs/lab-banding}
OUT=docs/results/banding
mkdir -p "$OUT"

# shellcheck source=scripts/lib.sh
. scripts/lib.sh

$NA lab banding --out "$LAB" --jobs "${JOBS:-2}" > /dev/null
cp "$LAB/results.json" "$LAB/results.md" "$LAB/banding_index.png" "$OUT/"
# the pictures the page links (seed by seed, the last conv layer of every network)
(cd "$LAB" && find . -name weights.png) | while read -r p; do
  mkdir -p "$OUT/$(dirname "$p")"
  cp "$LAB/$p" "$OUT/$p"
done
for m in mobilenet_v2-imagenet efficientnet_lite0-imagenet; do
  run "$OUT/$m.banding.json" $NA banding "zoo:$m" --json
done
