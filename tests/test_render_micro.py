"""Micro-batched rendering on a CPU is the same optimization as one full batch."""
import importlib

import torch

from netanatomy.models import load_model
from netanatomy.visualize import channel, render

render_module = importlib.import_module("netanatomy.visualize.render")


def test_micro_batches_give_the_full_batch_images(monkeypatch):
    model = load_model("zoo:minception", model_args={"in_channels": 3, "input_size": 32}).module
    objectives = [channel("mixed2", u) for u in range(5)]
    full = render(model, objectives, steps=5, seed=3, show_progress=False)
    monkeypatch.setattr(render_module, "MICRO_BATCH_BYTES", 1)          # one image at a time
    assert render_module.micro_batch(objectives, *_args(model, objectives)) == 1
    split = render(model, objectives, steps=5, seed=3, show_progress=False)
    assert torch.allclose(full.images, split.images, atol=1e-4)
    assert abs(full.history - split.history).max() < 1e-5


def _args(model, objectives):
    from netanatomy.models.layers import discover_layers

    layer_map = discover_layers(model)
    layers = {"mixed2": layer_map.resolve("mixed2")}
    return layer_map, layers, layer_map.input_shape, (32, 32), torch.device("cpu")


def test_a_diversity_objective_keeps_the_batch_whole(monkeypatch):
    from netanatomy.visualize.objectives import diversity

    model = load_model("zoo:minception", model_args={"in_channels": 3, "input_size": 32}).module
    objectives = [channel("mixed2", u) + 0.1 * diversity("mixed2") for u in range(3)]
    monkeypatch.setattr(render_module, "MICRO_BATCH_BYTES", 1)
    assert render_module.micro_batch(objectives, *_args(model, objectives)) is None
