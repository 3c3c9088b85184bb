"""Small trained models shipped in the package, so the demo and tests need no network.

Each is a zoo architecture plus a state dict under `netanatomy/resources/models/`, with the
exact command that retrains it (scripts/train_bundled.sh runs them all).
"""
from __future__ import annotations

from . import ZooEntry, get_entry, register

_MLP = get_entry("mlp")
_MINCEPTION = get_entry("minception")

register(ZooEntry(
    name="mlp-fmnist",
    factory=_MLP.factory,
    description="784-256x4-10 MLP trained on Fashion-MNIST (bundled weights)",
    input_shape=_MLP.input_shape,
    num_classes=10,
    weights="mlp_fmnist.safetensors",
    base="mlp",
    retrain="netanatomy train zoo:mlp --data fashion-mnist --epochs 12 --optimizer adam --lr 0.001 "
            "--batch-size 128 --seed 0 --out runs/bundled/mlp_fmnist.safetensors",
))

register(ZooEntry(
    name="minception-fmnist",
    factory=_MINCEPTION.factory,
    description="small Inception-style branched CNN trained on Fashion-MNIST (bundled weights)",
    input_shape=(1, 28, 28),
    num_classes=10,
    weights="minception_fmnist.safetensors",
    base="minception",
    default_kwargs={"in_channels": 1, "num_classes": 10},
    retrain="netanatomy train zoo:minception --model-arg in_channels=1 --data fashion-mnist --epochs 8 "
            "--optimizer sgd --lr 0.05 --batch-size 128 --seed 0 --out runs/bundled/minception_fmnist.safetensors",
))
