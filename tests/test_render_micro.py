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


def test_render_parameterized_at_a_smaller_size_from_the_cli(tmp_path, capsys):
    from netanatomy.cli.main import run

    out = tmp_path / "r"
    rc = run(["render", "zoo:minception-fmnist", "--layer", "mixed2", "--units", "0-1", "--steps", "3",
              "--param-size", "14", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    pngs = sorted(out.glob("mixed2*.png")) or sorted(out.glob("*.png"))
    assert pngs
    capsys.readouterr()
    rc = run(["render", "zoo:minception-fmnist", "--layer", "mixed2", "--units", "0", "--steps", "3",
              "--param-size", "64", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == 2 and "--param-size 64" in err and not (tmp_path / "bad").exists()


def test_param_size_image_is_smooth_upsampling():
    from netanatomy.visualize.param import image_param

    small = image_param([1], 3, 16, device="cpu")().detach()
    big = image_param([1], 3, 32, param_size=16, device="cpu")().detach()
    assert big.shape == (1, 3, 32, 32)
    # the upsampled image is the small one, bilinearly enlarged
    down = torch.nn.functional.avg_pool2d(big, 2)
    assert float((down - small).abs().max()) < 0.08
