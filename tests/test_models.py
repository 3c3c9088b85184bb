"""Model sources, strict and safe weight loading, through the library and the CLI."""
import json
import os
import textwrap

import pytest
import torch

from netanatomy.cli.main import run
from netanatomy.errors import UsageError
from netanatomy.models import load_model, read_state_dict, save_state_dict


def cli(capsys, *args):
    code = run(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def inception_state(tmp_path_factory):
    torch.manual_seed(3)
    model = load_model("zoo:inceptionv1").module
    path = tmp_path_factory.mktemp("w") / "inception_random.pt"
    save_state_dict(model, path)
    return model.state_dict(), path


def test_layers_json_lists_inception_branches(capsys):
    code, out, err = cli(capsys, "layers", "zoo:inceptionv1", "--json")
    assert code == 0, err
    doc = json.loads(out)
    layers = {layer["name"]: layer for layer in doc["layers"]}
    for name, widths in (("mixed3a", [64, 128, 32, 32]), ("mixed4a", [192, 204, 48, 64])):
        layer = layers[name]
        assert layer["kind"] == "concat"
        assert [b["units"] for b in layer["branches"]] == widths
        assert layer["units"] == sum(widths)
        starts = [b["start"] for b in layer["branches"]]
        stops = [b["stop"] for b in layer["branches"]]
        assert starts[0] == 0 and stops[-1] == sum(widths) and starts[1:] == stops[:-1]
    assert layers["mixed3a"]["branches"][2]["name"] == "mixed3a_5x5"
    assert layers["mixed3a_5x5"]["kernel_size"] == [5, 5]
    assert layers["softmax2"]["units"] == 1008


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_random_inception_round_trips(inception_state, tmp_path, suffix, capsys):
    state, pt_path = inception_state
    path = tmp_path / f"w{suffix}"
    save_state_dict(state, path)
    loaded = load_model("zoo:inceptionv1", weights=str(path)).module.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    code, _, err = cli(capsys, "layers", "zoo:inceptionv1", "--weights", str(path), "--json")
    assert code == 0, err


def test_missing_key_is_refused_naming_it(inception_state, tmp_path, capsys):
    state, _ = inception_state
    broken = dict(state)
    del broken["mixed3a_5x5_pre_relu_conv.weight"]
    path = tmp_path / "missing.pt"
    torch.save(broken, path)
    code, out, err = cli(capsys, "layers", "zoo:inceptionv1", "--weights", str(path))
    assert code == 2 and out == ""
    assert "missing keys: mixed3a_5x5_pre_relu_conv.weight" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_wrong_shape_and_unexpected_key_are_refused(inception_state, tmp_path, capsys):
    state, _ = inception_state
    broken = dict(state)
    broken["softmax2_pre_activation_matmul.weight"] = torch.zeros(1000, 1024)
    broken["extra.weight"] = torch.zeros(3)
    path = tmp_path / "shape.safetensors"
    save_state_dict(broken, path)
    code, _, err = cli(capsys, "layers", "zoo:inceptionv1", "--weights", str(path))
    assert code == 2
    assert "softmax2_pre_activation_matmul.weight: file (1000, 1024) vs model (1008, 1024)" in err
    assert "unexpected keys: extra.weight" in err


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv2d0_pre_relu_conv.weight": _Evil(marker)}, path)
    code, _, err = cli(capsys, "layers", "zoo:inceptionv1", "--weights", str(path))
    assert code == 2
    assert "refused to load" in err and "run code" in err
    assert not marker.exists()


def test_wrapped_state_dict_and_bad_files(tmp_path):
    torch.manual_seed(0)
    model = load_model("zoo:mlp").module
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, wrapped)
    assert read_state_dict(wrapped).keys() == model.state_dict().keys()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="not a readable PyTorch state dict"):
        read_state_dict(garbage)
    with pytest.raises(UsageError, match="not found"):
        read_state_dict(tmp_path / "nope.pt")
    npz = tmp_path / "w.npz"
    npz.write_bytes(b"PK")
    with pytest.raises(UsageError, match="unknown weights format"):
        read_state_dict(npz)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 20)
    with pytest.raises(UsageError, match="safetensors"):
        read_state_dict(bad_st)


def test_file_factory_source(tmp_path, capsys):
    src = tmp_path / "mymodel.py"
    src.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def build(width=8):
            return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.Conv2d(width, 4, 3, groups=2))

        not_a_model = lambda: 42
    """))
    loaded = load_model(f"{src}:build", model_args=["width=6"])
    assert loaded.module[0].out_channels == 6
    code, out, err = cli(capsys, "layers", f"{src}:build", "--input-shape", "3,16,16", "--json")
    assert code == 0, err
    layers = json.loads(out)["layers"]
    assert [layer["units"] for layer in layers] == [8, 4]
    assert [b["units"] for b in layers[1]["branches"]] == [2, 2]
    # the layer that feeds only a grouped conv is split like it
    assert [b["units"] for b in layers[0]["branches"]] == [4, 4]
    for source, message in (
        (f"{src}:buidl", "did you mean: build"),
        (f"{src}:not_a_model", "not a torch.nn.Module"),
        (f"{tmp_path}/absent.py:build", "model file not found"),
        ("zoo:inceptionv2", "did you mean: inceptionv1"),
        ("resnet50", "cannot read model"),
    ):
        code, _, err = cli(capsys, "layers", source)
        assert code == 2 and message in err, err


def test_optional_hubs_fail_clearly_when_absent(capsys):
    try:
        import torchvision  # noqa: F401
    except Exception:
        code, _, err = cli(capsys, "layers", "torchvision:resnet18")
        assert code == 2 and "torchvision" in err and "does not import" in err
    else:  # pragma: no cover - torchvision works on this machine
        code, _, err = cli(capsys, "layers", "torchvision:resnet18", "--json")
        assert code == 0, err


def test_bad_usage_is_one_line_exit_2(capsys):
    code, _, err = cli(capsys, "layers")
    assert code == 2 and len(err.strip().splitlines()) == 1
    code, _, err = cli(capsys, "layers", "zoo:mlp", "--model-arg", "nonsense")
    assert code == 2 and "KEY=VALUE" in err
    code, _, err = cli(capsys, "layers", "zoo:mlp", "--device", "cuda:7")
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_zoo_listing(capsys):
    code, out, err = cli(capsys, "zoo", "--json")
    assert code == 0, err
    names = {m["name"] for m in json.loads(out)["models"]}
    assert {"zoo:inceptionv1", "zoo:alexnet", "zoo:bandingnet", "zoo:mlp", "zoo:minception"} <= names


def test_random_init_is_seeded_and_leaves_global_state_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = load_model("zoo:minception", seed=4).module.state_dict()
    b = load_model("zoo:minception", seed=4).module.state_dict()
    c = load_model("zoo:minception", seed=5).module.state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])


def test_model_arguments_are_checked_against_the_signature(tmp_path):
    from netanatomy.models.source import check_arguments

    def build(width: int = 8, scale: float = 1.0, flag: bool = False, name: str = "a",
              sizes: tuple[int, ...] = (1,), maybe: int | None = None, free=3):
        return None

    got = check_arguments(build, {"width": 4, "scale": 2, "flag": "yes", "name": 5, "sizes": [1, 2],
                                  "maybe": None, "free": 0.5}, "f")
    assert got == {"width": 4, "scale": 2, "flag": True, "name": "5", "sizes": [1, 2], "maybe": None, "free": 0.5}
    for kwargs, message in (({"width": "abc"}, "width.*an integer"), ({"width": 2.5}, "an integer"),
                            ({"scale": "big"}, "a number"), ({"sizes": (1, "a")}, "tuple of integers"),
                            ({"maybe": "x"}, r"an integer \(or None\)"), ({"free": "x"}, "a number"),
                            ({"widht": 1}, "did you mean: width")):
        with pytest.raises(UsageError, match=message):
            check_arguments(build, kwargs, "f")
    # a zoo factory that passes **kwargs on answers to the class it returns
    with pytest.raises(UsageError, match="widths"):
        load_model("zoo:mlp", model_args=["widths=abc"])


def test_user_model_file_failures_name_the_file(tmp_path):
    for text, message in (("import netanatomy_absent_module\n", "failed to import: ModuleNotFoundError"),
                          ("x = 1\nraise KeyError('k')\n", "failed to import: KeyError: 'k' at line 2"),
                          ("def build():\n    return 1 / 0\n", r"build\(\) in your model file .* raised "
                                                                 "ZeroDivisionError.* at line 2")):
        src = tmp_path / "user_model.py"
        src.write_text(text)
        with pytest.raises(UsageError, match=message) as info:
            load_model(f"{src}:build")
        assert str(src) in str(info.value)


def test_non_finite_weights_are_named(tmp_path):
    from netanatomy.models import check_finite

    model = load_model("zoo:mlp").module
    check_finite(model)
    with torch.no_grad():
        model.fc3.bias[2] = float("-inf")
        model.fc4.weight[0, 0] = float("nan")
    with pytest.raises(UsageError, match=r"fc3.bias holds 1 Inf value \(of 256\)"):
        check_finite(model, "w.pt")
