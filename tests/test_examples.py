"""Dataset examples: planted spots are found, located and cropped; renders beat the best real input."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from netanatomy.cli.main import run
from netanatomy.errors import UsageError
from netanatomy.visualize import channel, render
from netanatomy.visualize.examples import (
    dataset_examples,
    examples_sheet,
    receptive_field,
    scaled_field,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from a second thread, and lose much when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Spot(nn.Module):
    """conv1 unit 0: mean of a 3x3 patch (a bright-spot detector), unit 1 its negative; a stride-2
    pool; conv2 unit 0 reads conv1 unit 0 at its centre tap; a linear head."""

    def __init__(self):
        super().__init__()
        self.netanatomy_input_shape = (1, 24, 24)
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(2, 1, 3, padding=1)
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.conv1.weight.zero_()
            self.conv1.weight[0] = 1.0 / 9
            self.conv1.weight[1] = -1.0 / 9
            self.conv1.bias.zero_()
            self.conv2.weight.zero_()
            self.conv2.weight[0, 0, 1, 1] = 1.0
            self.conv2.bias.zero_()

    def forward(self, x):
        h = self.pool(torch.relu(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(h)).mean((2, 3)))


def _spots(n=40, size=24, seed=0):
    """Grey images, each with one bright 3x3 square at a random place; brightness rises with the index."""
    g = torch.Generator().manual_seed(seed)
    x = 0.2 + 0.02 * torch.rand(n, 1, size, size, generator=g)
    centres = torch.randint(2, size - 2, (n, 2), generator=g)
    for i, (cy, cx) in enumerate(centres.tolist()):
        x[i, 0, cy - 1:cy + 2, cx - 1:cx + 2] = 0.3 + 0.6 * i / (n - 1)
    return x, torch.arange(n) % 3, centres


def test_receptive_field_probe_matches_conv_arithmetic():
    unpadded = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(), nn.Conv2d(4, 4, 3))
    field = receptive_field(unpadded, "4", (1, 32, 32))
    # map position p sees input rows 2p .. 2p+8: centre 2p+4, size 9
    assert field.slope == pytest.approx((2.0, 2.0), abs=1e-6)
    assert field.offset == pytest.approx((4.0, 4.0), abs=1e-6)
    assert field.size == (9, 9) and field.method == "gradient"
    pooled = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1))
    field = receptive_field(pooled, "3", (3, 32, 20))
    # position p sees rows 2p-3 .. 2p+4: centre 2p+0.5, size 8; the scaling shortcut knows the centre only
    assert field.slope == pytest.approx((2.0, 2.0), abs=1e-6)
    assert field.offset == pytest.approx((0.5, 0.5), abs=1e-6)
    assert field.size == (8, 8)
    assert scaled_field((16, 10), (32, 20)).offset == pytest.approx((0.5, 0.5))
    assert field.box((0, 0)) == (0, 0, 8, 8)  # moved inside the input
    assert field.box((8, 5), min_size=12) == (11, 5, 23, 17)
    with pytest.raises(UsageError):
        receptive_field(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), "1", (3, 2, 2))


def test_planted_spots_are_found_located_and_cropped():
    torch.manual_seed(0)
    model = Spot().eval()
    x, y, centres = _spots()
    data = TensorDataset(x, y)
    ex = dataset_examples(model, "conv1", data, units=[0], top_k=5, batch_size=16, show_progress=False)
    assert ex.index[0].tolist() == [39, 38, 37, 36, 35]  # brightest first
    assert ex.labels[0].tolist() == [int(y[i]) for i in ex.index[0]]
    assert np.array_equal(ex.pos[0], centres[ex.index[0]].numpy())  # the map's maximum is the spot
    assert ex.value[0, 0] == pytest.approx(0.9, abs=1e-4)
    assert ex.crops.shape == (1, 5, 1, 6, 6)  # field 3, at least a quarter of the side
    for j, i in enumerate(ex.index[0]):
        y0, x0, y1, x1 = ex.boxes[0, j]
        cy, cx = centres[i].tolist()
        assert y0 <= cy - 1 and cy + 1 < y1 and x0 <= cx - 1 and cx + 1 < x1
        assert float(ex.crops[0, j].max()) == pytest.approx(float(x[i].max()))
    # after the pool: conv2 reads only its centre tap, so it sees one pool window of conv1 (4 pixels,
    # the probe finds what the unit depends on, not the architecture's bound); the crop holds the spot
    deep = dataset_examples(model, "conv2", DataLoader(data, batch_size=7), top_k=3, min_crop=1, show_progress=False)
    assert deep.field.size == (4, 4)
    assert deep.index[0].tolist() == [39, 38, 37]
    for j, i in enumerate(deep.index[0]):
        y0, x0, y1, x1 = deep.boxes[0, j]
        cy, cx = centres[i].tolist()
        assert y1 - y0 == 4 and y0 <= cy <= y1 - 1 and x0 <= cx <= x1 - 1
    # linear units: whole images, no positions; the mean ranking
    head = dataset_examples(model, "fc", x, top_k=2, show_progress=False)
    assert head.pos is None and head.field is None and head.crops.shape == (2, 2, 1, 24, 24)
    ranked = dataset_examples(model, "conv1", data, units=[1], top_k=1, rank="mean", show_progress=False)
    assert ranked.rank == "mean" and int(ranked.index[0, 0]) == int(x.mean((1, 2, 3)).argmin())
    sheet = examples_sheet(ex.subset([0]), renders=torch.rand(1, 1, 24, 24), class_names=["a", "b", "c"])
    assert sheet.ndim == 3 and sheet.shape[2] == 3
    for bad in ({"units": [2]}, {"top_k": 0}, {"rank": "median"}):
        with pytest.raises(UsageError):
            dataset_examples(model, "conv1", data, show_progress=False, **bad)
    with pytest.raises(UsageError):
        dataset_examples(model, "conv1", iter([x]), show_progress=False)


def _gratings(n, size=20, seed=0):
    """Oriented sine gratings of moderate contrast around mid-grey, tinted, with noise; label = orientation bin."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.rand(n, generator=g) * math.pi
    freq = 0.1 + 0.15 * torch.rand(n, generator=g)
    phase = torch.rand(n, generator=g) * 2 * math.pi
    contrast = 0.1 + 0.3 * torch.rand(n, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    u = xx[None] * torch.cos(theta)[:, None, None] + yy[None] * torch.sin(theta)[:, None, None]
    grey = 0.5 + contrast[:, None, None] * torch.sin(2 * math.pi * freq[:, None, None] * u + phase[:, None, None])
    grey = grey + 0.05 * torch.randn(n, size, size, generator=g)
    rgb = grey[:, None].repeat(1, 3, 1, 1) * (0.7 + 0.3 * torch.rand(n, 3, 1, 1, generator=g))
    return rgb.clamp(0, 1), (theta / (math.pi / 4)).long().clamp_max(3)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.netanatomy_input_shape = (3, 20, 20)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = (x - 0.45) / 0.25
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(h.mean((2, 3)))


def test_render_excites_units_more_than_their_best_dataset_example():
    """A small CNN trained for a second on gratings: each conv2 unit's rendering (channel objective,
    Lucid's recipe, 256 steps) beats the spatial mean of its best input among 512 held-out gratings."""
    torch.manual_seed(0)
    model = Tiny()
    x, y = _gratings(2048)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(3):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    model.eval()
    xt, yt = _gratings(512, seed=1)
    with torch.no_grad():
        assert float((model(xt).argmax(1) == yt).float().mean()) > 0.6  # it learned something
    best = dataset_examples(model, "conv2", TensorDataset(xt, yt), top_k=1, rank="mean", show_progress=False)
    rendering = render(model, [channel("conv2", u) for u in range(8)], steps=256, seed=0, show_progress=False)
    assert (rendering.values > best.value[:, 0]).all(), (rendering.values, best.value[:, 0])


MODEL_FILE = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.netanatomy_input_shape = (1, 28, 28)
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        h = self.pool(torch.relu(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(h)).mean((2, 3)))

def build():
    torch.manual_seed(0)
    return Net()
'''


def test_examples_cli(tmp_path, capsys):
    model = tmp_path / "net.py"
    model.write_text(MODEL_FILE)
    out = tmp_path / "ex"
    code = run(["examples", f"{model}:build", "--layer", "conv2", "--data", "bundled", "--limit", "60",
                "--units", "1-2", "--top-k", "3", "--out", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["units"] == [1, 2] and np.array(summary["index"]).shape == (2, 3)
    assert summary["receptive_field"]["method"] == "gradient" and summary["receptive_field"]["size"] == [8, 8]
    assert sorted(p.name for p in out.iterdir()) == ["contact_sheet.png", "examples.json", "unit_0001.png",
                                                    "unit_0002.png"]
    assert run(["examples", f"{model}:build", "--layer", "conv7", "--data", "bundled", "--out", str(out)]) == 2
    assert run(["examples", f"{model}:build", "--layer", "conv2", "--data", "bundled", "--units", "9",
                "--out", str(out)]) == 2
