"""The GPU path: every command with --device cuda, and the numbers a GPU must not change.

Skipped without CUDA (our CI machines have none); `benchmarks/gpu_check.sh` runs them on a
GPU machine with `pytest -m gpu`. `NETANATOMY_GPU_CHECK_DEVICE=cpu` runs the same commands on
the CPU, to check the invocations themselves where no GPU is lent.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from netanatomy.cli.main import run

DEVICE = os.environ.get("NETANATOMY_GPU_CHECK_DEVICE", "cuda")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _cli(capsys, *argv) -> dict:
    capsys.readouterr()
    code = run([str(a) for a in argv] + ["--device", DEVICE, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_renders_on_the_gpu_reach_what_the_cpu_reaches():
    from netanatomy.models import load_model
    from netanatomy.visualize import channel, render

    from netanatomy.util.devices import ieee_float32

    objs = [channel("mixed2", u) for u in range(8)]
    cpu = render(load_model("zoo:minception-fmnist").module, objs, steps=16, seed=0, show_progress=False)
    model = load_model("zoo:minception-fmnist", device=DEVICE).module
    # IEEE float32 on the GPU: only the order of the sums differs from the CPU, so the pictures
    # match too (simulated here with relative noise of 1e-6 on every convolution: 0.003 apart)
    with ieee_float32(DEVICE):
        exact = render(model, objs, steps=16, seed=0, device=DEVICE, show_progress=False)
    np.testing.assert_allclose(exact.values, cpu.values, rtol=0.02, atol=0.02)
    assert float((exact.images - cpu.images).abs().mean()) < 0.02
    # PyTorch's default, cuDNN's convolutions in TF32: the same objective values; the pixels drift
    # further (test_visualize's TF32 simulation: 0.025 apart, another seed 0.07)
    gpu = render(model, objs, steps=16, seed=0, device=DEVICE, show_progress=False)
    np.testing.assert_allclose(gpu.values, cpu.values, rtol=0.02, atol=0.02)


def test_lesion_counts_on_the_gpu_equal_the_cpus(tmp_path, capsys):
    clusters = tmp_path / "c.json"
    assert run(["clusters", "zoo:mlp-fmnist", "--k", "6", "--shuffles", "0", "--out", str(clusters)]) == 0
    args = ["importance", "zoo:mlp-fmnist", "--clusters", clusters, "--data", "bundled", "--random", "9"]
    capsys.readouterr()
    assert run([str(a) for a in args] + ["--json"]) == 0
    cpu = json.loads(capsys.readouterr().out)
    gpu = _cli(capsys, *args)
    assert [t["accuracy"] for t in gpu["sub_clusters"]] == [t["accuracy"] for t in cpu["sub_clusters"]]
    assert [t["p_drop"] for t in gpu["sub_clusters"]] == [t["p_drop"] for t in cpu["sub_clusters"]]


COMMANDS = {
    "layers": ["layers", "zoo:mobilenet_v2-imagenet"],
    "weights": ["weights", "zoo:minception-fmnist", "--layer", "conv1", "--out", "{tmp}/w.png"],
    "svd": ["svd", "zoo:mobilenet_v2-imagenet", "--layer", "block1_project", "--lower", "stem",
            "--through"],
    "banding": ["banding", "zoo:mobilenet_v2-imagenet"],
    "equivariance": ["equivariance", "zoo:mobilenet_v2-imagenet", "--layer", "stem"],
    "probe": ["probe", "zoo:mobilenet_v2-imagenet", "--layer", "stem", "--probe", "colour,orientation"],
    "render": ["render", "zoo:mobilenet_v2-imagenet", "--layer", "block8_expand", "--units", "0-7", "--steps", "16",
               "--out", "{tmp}/r"],
    "examples": ["examples", "zoo:mobilenet_v2-imagenet", "--layer", "block8_expand", "--units", "0-3",
                 "--data", "photos?n=64", "--out", "{tmp}/e"],
    "clusters": ["clusters", "zoo:minception-fmnist", "--graph", "activations", "--data", "bundled", "--examples",
                 "300", "--k", "4", "--shuffles", "2", "--out", "{tmp}/c.json"],
    # EfficientNet-Lite0 at random init: the same code path on the GPU, and one weight file fewer
    # to carry there (the working tree and the carried files must fit in 64 MiB)
    "compare": ["compare", "zoo:mobilenet_v2-imagenet", "zoo:efficientnet_lite0", "--data", "photos?n=64",
                "--layers-a", "block17_project,head", "--layers-b", "block15_project,head", "--null-models", "1"],
    "survey": ["survey", "--budget", "1", "--steps", "8", "--shuffles", "2", "--random", "4", "--examples", "200",
               "--out", "{tmp}/atlas"],
    "lab banding": ["lab", "banding", "--quick", "--variants", "baseline,rotate", "--out", "{tmp}/lb"],
    "lab specialization": ["lab", "specialization", "--quick", "--out", "{tmp}/ls"],
    "lab branches": ["lab", "branches", "--quick", "--out", "{tmp}/lbr"],
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_runs_with_device_cuda(name, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in COMMANDS[name]]
    doc = _cli(capsys, *argv)
    assert doc


def test_coherence_and_train_on_the_gpu(tmp_path, capsys):
    clusters = tmp_path / "c.json"
    assert run(["clusters", "zoo:mlp-fmnist", "--k", "6", "--shuffles", "0", "--out", str(clusters)]) == 0
    doc = _cli(capsys, "coherence", "zoo:mlp-fmnist", "--clusters", clusters, "--data", "bundled", "--random", "3",
               "--kind", "all", "--steps", "16", "--limit", "300")
    assert doc["tests"]
    trained = _cli(capsys, "train", "zoo:mlp", "--data", "bundled", "--epochs", "1", "--out", tmp_path / "m.pt")
    assert trained


def test_ray_asks_for_gpus_and_gives_what_the_gpu_gives_here(tmp_path, capsys):
    pytest.importorskip("ray")
    if not DEVICE.startswith("cuda"):
        pytest.skip("the GPU request is checked on a GPU")
    args = ["render", "zoo:minception-fmnist", "--layer", "mixed2", "--units", "0-7", "--batch", "4", "--steps", "8"]
    here = _cli(capsys, *args, "--out", tmp_path / "a")
    there = _cli(capsys, *args, "--out", tmp_path / "b", "--ray")
    np.testing.assert_allclose(there["values"], here["values"], rtol=1e-4, atol=1e-5)
