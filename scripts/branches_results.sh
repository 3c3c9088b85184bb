#!/usr/bin/env bash
# Runs the real-network part of docs/results/branches.md on both ImageNet-trained zoo models and
# writes its outputs under docs/results/branches/. Resumable: an output that exists is skipped.
#   bash scripts/branches_results.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NA=${NA:-.venv/bin/netanatomy}
OUT=docs/results/branches
mkdir -p "$OUT"
declare -A MIDDLE=([mobilenet_v2-imagenet]=block8_expand [efficientnet_lite0-imagenet]=block7_expand)
PHOTOS="photos?n=300"

# shellcheck source=scripts/lib.sh
. scripts/lib.sh

for m in mobilenet_v2-imagenet efficientnet_lite0-imagenet; do
  run "$OUT/$m.probe.json" $NA probe "zoo:$m" --layer stem --layer "${MIDDLE[$m]}" --data "$PHOTOS" --json
  run "$OUT/$m.branches.json" $NA branches "zoo:$m" --data "$PHOTOS" --examples 300 --out "$OUT/$m" --json
done
