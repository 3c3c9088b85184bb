"""The CLI on real networks (issue 10): svd --through a depthwise conv, 128 px parameterizations,
photo patches at the model's size, class names wherever classes appear, --weights on the
ImageNet entries without their weight packages."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from netanatomy.cli.main import run
from netanatomy.data import open_dataset
from netanatomy.data.spec import FASHION_MNIST_CLASSES
from netanatomy.errors import UsageError
from netanatomy.models import class_name, load_model, logits_layer
from netanatomy.models.layers import discover_layers
from netanatomy.models.zoo import imagenet
from netanatomy.visualize.param import image_param

MOBILENET = "zoo:mobilenet_v2-imagenet"
MINC = "zoo:minception-fmnist"
EGYPTIAN_CAT = 285


def run_ok(argv, capsys) -> tuple[str, str]:
    capsys.readouterr()
    code = run([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def run_bad(argv, capsys, *needles: str) -> str:
    capsys.readouterr()
    code = run([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err and not out.strip(), err
    for needle in needles:
        assert needle in err, err
    return err


# -- 1. svd --through -----------------------------------------------------------------------------

def test_svd_through_a_depthwise_conv_from_the_stem(capsys):
    """stem -> block1_depthwise -> block1_project -> block2_expand: the expanded weights from the
    stem, whose filters' colour and frequency are correlated with the singular vectors."""
    out, _ = run_ok(["svd", MOBILENET, "--layer", "block2_expand", "--lower", "stem", "--through", "--json"], capsys)
    doc = json.loads(out)
    assert doc["through"] is True and doc["upper"] == "block2_expand" and doc["lower"] == "stem"
    assert len(doc["singular_values"]) == 32          # min(96 upper units, 32 stem units)
    assert set(doc["correlations"]) == {"vector_0", "vector_1"}
    assert set(doc["correlations"]["vector_0"]) == {"colourfulness", "frequency"}
    assert "expanded weights" in doc["note"]
    out, _ = run_ok(["svd", MOBILENET, "--layer", "block1_project", "--lower", "stem", "--through"], capsys)
    first = out.splitlines()[0]
    assert "expanded weights from stem to block1_project" in first
    assert "vs colourfulness" in out and "vs frequency" in out


def test_svd_through_needs_lower_and_depthwise_layers_are_explained(capsys):
    run_bad(["svd", MOBILENET, "--layer", "block2_expand", "--through"], capsys, "--through", "--lower")
    run_bad(["svd", MOBILENET, "--layer", "block2_depthwise"], capsys, "depthwise", "--through",
            "--lower block2_expand")


# -- 2. the parameterization size -----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fourier", "pixel"])
def test_param_size_makes_a_small_image_and_upsamples_it(kind):
    big = image_param([3, 4], 3, 16, kind=kind, param_size=8)
    small = image_param([3, 4], 3, 8, kind=kind)
    assert big.raw.shape == small.raw.shape                 # the free values are those of an 8 px image
    torch.testing.assert_close(big.raw, small.raw)          # the same seeds give the same start
    image = big()
    assert image.shape == (2, 3, 16, 16)
    torch.testing.assert_close(image, F.interpolate(small(), size=(16, 16), mode="bilinear", align_corners=True))
    image[:, :, 5, 11].sum().backward()                     # differentiable through the upsampling
    assert big.raw.grad is not None and float(big.raw.grad.abs().sum()) > 0
    same = image_param([3], 3, 16, kind=kind, param_size=16)
    torch.testing.assert_close(same(), image_param([3], 3, 16, kind=kind)())


def test_param_size_is_checked():
    with pytest.raises(UsageError, match="parameterization size"):
        image_param([0], 3, 16, param_size=32)
    with pytest.raises(UsageError, match="parameterization size"):
        image_param([0], 3, 16, param_size=0)


# -- 3. photo patches at the model's size, and a warning when data and model sizes differ ---------

def test_photos_default_to_the_model_input_size_and_the_spec_wins():
    assert open_dataset("photos?n=2", default_size=40).image_shape == (3, 40, 40)
    assert open_dataset("photos?n=2&size=24", default_size=40).image_shape == (3, 24, 24)
    assert open_dataset("photos?n=2").image_shape == (3, 32, 32)


def test_examples_on_photos_at_the_models_size(tmp_path, capsys):
    out, err = run_ok(["examples", MOBILENET, "--layer", "stem", "--units", "0", "--top-k", "2",
                       "--data", "photos?n=4", "--out", tmp_path / "e", "--json"], capsys)
    assert "warning" not in err
    doc = json.loads(out)
    assert doc["label_names"][0][0].startswith(("skimage:", "mate:"))   # photos name their source photo
    # a grey 28 px model gets 28 px patches: only the channel count is left to ask for
    run_bad(["examples", MINC, "--layer", "conv1", "--data", "photos?n=4", "--out", tmp_path / "m"], capsys,
            "3x28x28", "photos?n=4&channels=1")
    # an explicit size still wins, and is refused when it does not fit
    run_bad(["examples", MOBILENET, "--layer", "stem", "--data", "photos?n=4&size=64", "--out", tmp_path / "s"],
            capsys, "3x64x64", "size=224")


def test_examples_warns_when_the_data_is_far_from_the_models_size(tmp_path, capsys):
    out, err = run_ok(["examples", MOBILENET, "--input-shape", "3,32,32", "--layer", "stem", "--units", "0",
                       "--top-k", "1", "--data", "photos?n=4", "--out", tmp_path / "e"], capsys)
    lines = [line for line in err.splitlines() if "warning:" in line]
    assert len(lines) == 1, err
    assert "32x32" in lines[0] and "224x224" in lines[0] and "photos?n=4&size=224" in lines[0]
    assert (tmp_path / "e" / "examples.json").is_file()


# -- 4. class names -------------------------------------------------------------------------------

def test_loaded_models_carry_their_class_names():
    mobile = load_model(MOBILENET)
    assert class_name(mobile, EGYPTIAN_CAT) == "Egyptian cat" and len(mobile.class_names) == 1000
    assert logits_layer(mobile, discover_layers(mobile.module, mobile.input_shape)) == "fc"
    minc = load_model(MINC)
    assert list(minc.class_names) == FASHION_MNIST_CLASSES
    assert class_name(minc, 9) == "Ankle boot" and class_name(minc, 10) == ""
    bare = load_model("zoo:minception")     # untrained: no classes to name
    assert bare.class_names is None and class_name(bare, 0) == ""


def test_render_of_a_logit_is_labelled_with_its_class(tmp_path, capsys, monkeypatch):
    from netanatomy.visualize import sheet

    seen = {}
    real = sheet.contact_sheet

    def spy(images, labels=None, **kw):
        seen.update(labels=list(labels), title=kw.get("title"))
        return real(images, labels, **kw)

    monkeypatch.setattr(sheet, "contact_sheet", spy)
    out, _ = run_ok(["render", MOBILENET, "--objective", "fc:285", "--steps", "1", "--no-transforms",
                     "--out", tmp_path / "r"], capsys)
    assert seen["labels"][0].startswith("fc:285 Egyptian cat")
    assert "fc:285 Egyptian cat" in seen["title"] and "fc:285 Egyptian cat" in out
    doc = json.loads((tmp_path / "r" / "render.json").read_text())
    assert doc["class_names"] == ["Egyptian cat"]


def test_examples_of_logits_and_of_labelled_data_name_their_classes(tmp_path, capsys):
    out, _ = run_ok(["examples", MINC, "--layer", "fc", "--units", "0,9", "--top-k", "3",
                     "--data", "bundled?limit=60", "--out", tmp_path / "e", "--json"], capsys)
    doc = json.loads(out)
    assert doc["unit_names"] == ["T-shirt/top", "Ankle boot"]
    assert doc["label_names"] == [[FASHION_MNIST_CLASSES[c] for c in row] for row in doc["labels"]]
    out, _ = run_ok(["examples", MINC, "--layer", "conv1", "--units", "0", "--top-k", "2",
                     "--data", "bundled?limit=20", "--out", tmp_path / "c", "--json"], capsys)
    assert json.loads(out)["unit_names"] is None        # not a logit layer


def test_importance_names_the_classes(tmp_path, capsys):
    clusters = tmp_path / "clusters.json"
    run_ok(["clusters", "zoo:mlp-fmnist", "--k", "4", "--shuffles", "0", "--n-init", "1", "--out", clusters],
           capsys)
    argv = ["importance", "zoo:mlp-fmnist", "--clusters", clusters, "--data", "bundled?limit=60", "--random", "2"]
    out, _ = run_ok([*argv, "--json"], capsys)
    assert json.loads(out)["class_names"] == FASHION_MNIST_CLASSES
    out, _ = run_ok(argv, capsys)
    assert "most hurt class" in out and "Ankle boot" in out


# -- 5. --weights FILE on an ImageNet entry whose weight package is not installed -------------------

@pytest.fixture
def no_packages(monkeypatch, tmp_path):
    """The real MobileNetV2 file copied to tmp_path, and every place the entry looks for it emptied."""
    real = imagenet.find_weights(imagenet.MOBILENET_V2_WEIGHTS)
    copy = tmp_path / "copy" / real.name
    copy.parent.mkdir()
    shutil.copyfile(real, copy)
    monkeypatch.setattr(imagenet, "_in_distribution", lambda spec: None)
    monkeypatch.setattr(imagenet, "_on_sys_path", lambda spec: None)
    monkeypatch.setattr(imagenet, "hub_checkpoints_dir", lambda: tmp_path / "no-hub")
    return copy


def test_weights_file_given_with_no_package_installed(no_packages, tmp_path, capsys):
    with pytest.raises(UsageError, match="--weights FILE"):
        load_model(MOBILENET)
    loaded = load_model(MOBILENET, weights=str(no_packages))
    assert loaded.weights == str(no_packages) and loaded.module.netanatomy_weights_file == str(no_packages)
    assert class_name(loaded, EGYPTIAN_CAT) == "Egyptian cat"
    reference = torch.load(no_packages, weights_only=True)
    got = loaded.module.state_dict()
    assert all(torch.equal(got[k], v) for k, v in reference.items())
    run_ok(["layers", MOBILENET, "--weights", no_packages], capsys)
    err = run_bad(["layers", MOBILENET], capsys, "--weights FILE")
    assert "--model-arg" not in err
    run_bad(["layers", MOBILENET, "--weights", tmp_path / "missing.pth"], capsys, "not found")
    other = tmp_path / "other.pth"
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in reference.items()}, other)
    run_bad(["layers", MOBILENET, "--weights", other], capsys, "sha256", "architecture entry")
    run_bad(["layers", MOBILENET, "--weights", no_packages, "--model-arg", f"weights={no_packages}"], capsys,
            "twice")
