#!/usr/bin/env bash
# Retrains the models bundled in src/netanatomy/resources/models/ from Debian's Fashion-MNIST
# (apt-get install dataset-fashion-mnist). CPU, about 10 minutes each on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
DEST=src/netanatomy/resources/models
mkdir -p runs/bundled "$DEST"

$BIN/netanatomy train zoo:mlp --data fashion-mnist --epochs 12 --optimizer adam --lr 0.001 \
  --batch-size 128 --seed 0 --out runs/bundled/mlp_fmnist.safetensors
cp runs/bundled/mlp_fmnist.safetensors "$DEST/"
cp runs/bundled/mlp_fmnist.safetensors.json "$DEST/mlp_fmnist.json"

$BIN/netanatomy train zoo:minception --model-arg in_channels=1 --data fashion-mnist --epochs 8 \
  --optimizer sgd --lr 0.05 --batch-size 128 --seed 0 --out runs/bundled/minception_fmnist.safetensors
cp runs/bundled/minception_fmnist.safetensors "$DEST/"
cp runs/bundled/minception_fmnist.safetensors.json "$DEST/minception_fmnist.json"
