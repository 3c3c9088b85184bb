"""Bad input ends in exit 2, one line on stderr, no traceback and nothing written: every command
against every class of bad input it can meet (issue 9). Each case fails before the work starts,
so the table runs in seconds."""
from __future__ import annotations

import json
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from netanatomy.cli.main import run

MINC = "zoo:minception-fmnist"   # conv layers, 1x28x28, bundled weights
MLP = "zoo:mlp-fmnist"           # linear layers, 1x28x28, bundled weights

# commands that take a model, with valid arguments apart from the model ({out}: a fresh path)
MODEL_COMMANDS = {
    "layers": ["layers", "{model}"],
    "banding": ["banding", "{model}", "--permutations", "9"],
    "weights": ["weights", "{model}", "--layer", "conv1", "--out", "{out}"],
    "svd": ["svd", "{model}", "--layer", "mixed1_3x3", "--out", "{out}"],
    "expanded": ["expanded", "{model}", "--lower", "conv1", "--upper", "mixed1_3x3", "--out", "{out}"],
    "equivariance": ["equivariance", "{model}", "--layer", "conv1"],
    "clusters": ["clusters", "{model}", "--k", "3", "--shuffles", "1", "--n-init", "1", "--out", "{out}.json"],
    "importance": ["importance", "{model}", "--clusters", "{clusters}", "--data", "bundled?limit=40",
                   "--random", "2", "--out", "{out}.json"],
    "coherence": ["coherence", "{model}", "--clusters", "{clusters}", "--data", "bundled?limit=40",
                  "--random", "2", "--out", "{out}.json"],
    "render": ["render", "{model}", "--layer", "conv1", "--units", "0", "--steps", "1", "--out", "{out}"],
    "examples": ["examples", "{model}", "--layer", "conv1", "--data", "bundled?limit=20", "--out", "{out}"],
    "train": ["train", "{model}", "--data", "bundled?limit=40", "--epochs", "1", "--out", "{out}.pt"],
    "probe": ["probe", "{model}", "--layer", "conv1", "--out", "{out}.json"],
    "branches": ["branches", "{model}", "--probe", "none", "--data", "bundled?limit=40", "--permutations", "9",
                 "--out", "{out}"],
}
SHAPE_COMMANDS = [c for c in MODEL_COMMANDS if c != "train"]   # those with --input-shape
DATA_COMMANDS = ["importance", "coherence", "examples", "train", "clusters-activations", "lab", "branches"]
OUTPUT_COMMANDS = ["weights", "svd", "expanded", "clusters", "importance", "coherence", "render", "examples",
                   "train", "demo", "lab", "branches", "probe"]

USER_FILES = {
    "syntax": ("def build(:\n", "syntax error at line 1"),
    "import": ("import netanatomy_no_such_module\n", "ModuleNotFoundError"),
    "raises-at-import": ("raise RuntimeError('the file fails when it runs')\n", "the file fails when it runs"),
    "factory-raises": ("def build():\n    raise ValueError('the factory says no')\n", "the factory says no"),
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Files the cases read: clusters files, broken weights, a raw pickle, broken model files."""
    root = tmp_path_factory.mktemp("assets")
    files = {}
    for name, model, extra, k in (("clusters_minc", MINC, [], 12), ("clusters_mlp", MLP, [], 6),
                                  ("clusters_other", "zoo:minception", ["--model-arg", "width=0.5"], 12)):
        path = root / f"{name}.json"
        assert run(["clusters", model, *extra, "--k", str(k), "--shuffles", "0", "--n-init", "1",
                    "--out", str(path)]) == 0
        files[name] = path
    from netanatomy.models import load_model

    for name, model in (("minc", MINC), ("mlp", MLP)):
        state = {k: v.clone() for k, v in load_model(model).module.state_dict().items()}
        key = "mixed1_3x3.weight" if name == "minc" else "fc2.weight"
        state[key].view(-1)[3] = float("nan")
        state[key].view(-1)[5] = float("inf")
        torch.save(state, root / f"nan_{name}.pt")
        files[f"nan_{name}"] = (root / f"nan_{name}.pt", key)
    torch.save(load_model(MINC).module, root / "pickled_module.pt")   # a whole module: needs code to load
    files["pickle"] = root / "pickled_module.pt"
    for name, (text, _) in USER_FILES.items():
        (root / f"{name}.py").write_text(text)
        files[name] = root / f"{name}.py"
    return files


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def run_bad(argv: list[str], tmp_path: Path, capsys, *needles: str) -> str:
    """Run a command that must fail as bad input: exit 2, one clean line, nothing written."""
    before = _files(tmp_path)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = run([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code} for {argv}: {err}"
    assert len(lines) == 1 and lines[0].startswith("netanatomy: error:"), err
    assert "Traceback" not in err and "internal error" not in err, err
    assert not out.strip(), out
    assert _files(tmp_path) == before, f"{argv} wrote {_files(tmp_path) - before}"
    library = [w for w in caught if "netanatomy" not in str(w.filename)]
    assert not library, [str(w.message) for w in library]
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"
    return err


def command_args(command: str, tmp_path: Path, assets: dict, *, model: str = MINC,
                 out: str | None = None) -> list[str]:
    clusters = assets["clusters_minc"] if model in (MINC, "zoo:minception") else assets["clusters_mlp"]
    values = {"model": model, "out": out or str(tmp_path / "result"), "clusters": str(clusters)}
    return [part.format(**values) for part in MODEL_COMMANDS[command]]


@pytest.mark.parametrize("command", ["importance", "coherence"])
def test_the_table_starts_from_commands_that_run(command, tmp_path, capsys, assets):
    """The cases below change one thing in these; unchanged, they work."""
    code = run(command_args(command, tmp_path, assets))
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "result.json").is_file()


# -- 1. a user's model file that fails to import, or whose factory raises -------------------------

@pytest.mark.parametrize("command", list(MODEL_COMMANDS))
@pytest.mark.parametrize("case", list(USER_FILES))
def test_user_model_code_that_fails(command, case, tmp_path, capsys, assets):
    source = f"{assets[case]}:build"
    err = run_bad(command_args(command, tmp_path, assets, model=source), tmp_path, capsys,
                  str(assets[case]), USER_FILES[case][1])
    assert "your model file" in err or "in your model file" in err


# -- 2. a --model-arg of the wrong type ----------------------------------------------------------

@pytest.mark.parametrize("command", list(MODEL_COMMANDS))
def test_model_argument_of_the_wrong_type(command, tmp_path, capsys, assets):
    argv = command_args(command, tmp_path, assets, model="zoo:minception")
    argv[2:2] = ["--model-arg", "blocks=two"]
    run_bad(argv, tmp_path, capsys, "blocks", "an integer")


def test_model_argument_checks_user_factories(tmp_path, capsys):
    src = tmp_path / "typed.py"
    src.write_text(textwrap.dedent("""
        from torch import nn

        def build(width: int = 8, scale=1.5):
            return nn.Sequential(nn.Conv2d(1, width, 3), nn.ReLU())
    """))
    run_bad(["layers", f"{src}:build", "--model-arg", "width=abc"], tmp_path, capsys, "width", "an integer")
    run_bad(["layers", f"{src}:build", "--model-arg", "scale=big"], tmp_path, capsys, "scale", "a number")
    run_bad(["layers", f"{src}:build", "--model-arg", "widht=3"], tmp_path, capsys, "did you mean: width")


# -- 3. data that does not fit the model ---------------------------------------------------------

def _data_argv(command: str, tmp_path: Path, assets: dict, model: str, data: str) -> list[str]:
    if command == "lab":
        return ["lab", "specialization", "--quick", "--data", data, "--out", str(tmp_path / "lab")]
    if command == "clusters-activations":
        return ["clusters", model, "--graph", "activations", "--data", data, "--k", "3", "--shuffles", "0",
                "--out", str(tmp_path / "c.json")]
    argv = command_args(command, tmp_path, assets, model=model)
    argv[argv.index("--data") + 1] = data
    return argv


@pytest.mark.parametrize("command", DATA_COMMANDS)
def test_colour_photos_for_a_grey_28px_model(command, tmp_path, capsys, assets):
    model = MLP if command == "lab" else MINC
    argv = _data_argv(command, tmp_path, assets, model, "photos?n=20")
    if command == "lab":   # no model at the data step: 32 px patches
        run_bad(argv, tmp_path, capsys, "3x32x32", "1x28x28", "photos?n=20&channels=1&size=28")
    else:                  # cut at the model's 28 px: only the channels are left to ask for
        run_bad(argv, tmp_path, capsys, "3x28x28", "1x28x28", "photos?n=20&channels=1")


@pytest.mark.parametrize("command", [c for c in DATA_COMMANDS if c != "examples"])
def test_32px_data_for_a_28px_mlp(command, tmp_path, capsys, assets):
    argv = _data_argv(command, tmp_path, assets, MLP, "bundled?size=32")
    run_bad(argv, tmp_path, capsys, "1x32x32", "bundled?size=28")


def test_32px_data_for_a_28px_mlp_examples(tmp_path, capsys, assets):
    argv = ["examples", MLP, "--layer", "fc1", "--data", "bundled?size=32&limit=10", "--out", str(tmp_path / "e")]
    run_bad(argv, tmp_path, capsys, "size=28", "--input-shape 1,32,32")


@pytest.mark.parametrize("command", ["importance", "coherence", "train"])
def test_more_classes_than_the_model_has_outputs(command, tmp_path, capsys, assets):
    argv = _data_argv(command, tmp_path, assets, MINC, "photos?n=40&channels=1&size=28")
    run_bad(argv, tmp_path, capsys, "10 outputs")


def test_the_spec_that_fits_is_accepted(tmp_path, capsys):
    code = run(["examples", MINC, "--layer", "conv1", "--units", "0", "--top-k", "2",
                "--data", "photos?n=8&channels=1&size=28", "--out", str(tmp_path / "ok")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "ok" / "examples.json").is_file()


# -- 4. an --input-shape that does not fit the model ---------------------------------------------

@pytest.mark.parametrize("command", SHAPE_COMMANDS)
def test_input_shape_that_does_not_fit(command, tmp_path, capsys, assets):
    argv = command_args(command, tmp_path, assets)
    argv[2:2] = ["--input-shape", "3,28,28"]
    run_bad(argv, tmp_path, capsys, "--input-shape 3,28,28")


def test_input_shape_of_an_mlp(tmp_path, capsys):
    run_bad(["banding", MLP, "--input-shape", "1,32,32"], tmp_path, capsys, "--input-shape 1,32,32", MLP)


# -- 5. an output path that cannot be written ----------------------------------------------------

def _output_argv(command: str, tmp_path: Path, assets: dict, out: str) -> list[str]:
    if command == "demo":
        return ["demo", "--out", out, "--steps", "1", "--shuffles", "1"]
    if command == "lab":
        return ["lab", "specialization", "--quick", "--out", out]
    return command_args(command, tmp_path, assets, out=out)


@pytest.mark.parametrize("command", OUTPUT_COMMANDS)
@pytest.mark.parametrize("where", ["under-a-file", "under-proc"])
def test_output_that_cannot_be_written(command, where, tmp_path, capsys, assets):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    out = str(blocker / "sub" / "out") if where == "under-a-file" else "/proc/netanatomy-test/out"
    err = run_bad(_output_argv(command, tmp_path, assets, out), tmp_path, capsys, "cannot write")
    assert ("a-file is a file, not a folder" in err) if where == "under-a-file" else ("/proc" in err)


@pytest.mark.parametrize("command", ["clusters", "importance", "coherence", "train"])
def test_output_file_that_is_a_folder(command, tmp_path, capsys, assets):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    argv = command_args(command, tmp_path, assets)
    argv[argv.index("--out") + 1] = str(folder)
    run_bad(argv, tmp_path, capsys, "a-folder")


# -- 6. a clusters file of another model ---------------------------------------------------------

@pytest.mark.parametrize("command", ["importance", "coherence"])
def test_clusters_file_of_a_model_with_other_widths(command, tmp_path, capsys, assets):
    argv = command_args(command, tmp_path, assets)
    argv[argv.index("--clusters") + 1] = str(assets["clusters_other"])
    run_bad(argv, tmp_path, capsys, "zoo:minception,", "conv1 has 8 units there and 16 here")


def test_clusters_file_records_model_and_widths(assets):
    doc = json.loads(Path(assets["clusters_other"]).read_text())
    assert doc["model"] == "zoo:minception" and doc["model_args"] == ["width=0.5"]
    assert doc["widths"]["conv1"] == 8 and doc["widths"]["mixed2_3x3"] == 16


def test_clusters_file_without_widths_uses_weight_graph_sizes(tmp_path, capsys, assets):
    doc = json.loads(Path(assets["clusters_other"]).read_text())
    del doc["widths"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(doc))
    argv = command_args("importance", tmp_path, assets)
    argv[argv.index("--clusters") + 1] = str(old)
    run_bad(argv, tmp_path, capsys, "8 units there and 16 here")


# -- 7. a raw pickle given as weights ------------------------------------------------------------

@pytest.mark.parametrize("command", list(MODEL_COMMANDS))
def test_raw_pickle_as_weights(command, tmp_path, capsys, assets):
    argv = command_args(command, tmp_path, assets, model="zoo:minception")
    argv[2:2] = ["--weights", str(assets["pickle"])]
    run_bad(argv, tmp_path, capsys, "refused to load", "run code", "state_dict()")


# -- 8. NaN or Inf weights -----------------------------------------------------------------------

@pytest.mark.parametrize("command", list(MODEL_COMMANDS))
def test_non_finite_weights(command, tmp_path, capsys, assets):
    path, key = assets["nan_minc"]
    argv = command_args(command, tmp_path, assets, model="zoo:minception")
    argv[2:2] = ["--weights", str(path)]
    run_bad(argv, tmp_path, capsys, "non-finite", key, "NaN and Inf")


def test_non_finite_weights_of_an_mlp(tmp_path, capsys, assets):
    path, key = assets["nan_mlp"]
    run_bad(["svd", "zoo:mlp", "--weights", str(path), "--layer", "fc2"], tmp_path, capsys, key)


# -- 9. an activation graph too large for memory -------------------------------------------------

def test_activation_graph_too_large(tmp_path, capsys, monkeypatch):
    import netanatomy.cli.boundary as boundary

    monkeypatch.setattr(boundary, "available_memory", lambda: 1 << 20)
    run_bad(["clusters", MINC, "--graph", "activations", "--data", "bundled", "--shuffles", "0",
             "--out", str(tmp_path / "c.json")], tmp_path, capsys, "--layers", "--examples", "units")


# -- 10. arguments the core would refuse with a bare ValueError ----------------------------------

@pytest.mark.parametrize("extra, needle", [(["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"),
                                           (["--weight-decay", "-0.5"], "--weight-decay")])
def test_training_arguments(extra, needle, tmp_path, capsys, assets):
    run_bad(command_args("train", tmp_path, assets) + extra, tmp_path, capsys, needle)


def test_layers_for_the_weight_graph(tmp_path, capsys, assets):
    run_bad(command_args("clusters", tmp_path, assets) + ["--layers", "conv1"], tmp_path, capsys, "--layers")


# -- the helpers behind the boundary -------------------------------------------------------------

def test_check_writable_creates_nothing(tmp_path):
    from netanatomy.errors import UsageError
    from netanatomy.util.io import check_writable

    assert check_writable(tmp_path / "new" / "deeper" / "file.json") == tmp_path / "new" / "deeper" / "file.json"
    check_writable(tmp_path / "new-folder", folder=True)
    assert list(tmp_path.iterdir()) == []            # no folder made, no probe file left
    (tmp_path / "f").write_text("x")
    for path, folder, message in ((tmp_path / "f" / "x.json", False, "is a file, not a folder"),
                                  (tmp_path / "f", True, "is a file, not a folder"),
                                  (tmp_path, False, "is a folder, not a file"),
                                  ("/proc/netanatomy-test/x.json", False, "not a writable folder")):
        with pytest.raises(UsageError, match=message):
            check_writable(path, folder=folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_umask_is_read_without_setting_it(monkeypatch, tmp_path):
    import os

    from netanatomy.util import io

    old = os.umask(0o027)
    try:
        def no_setting(mask):  # another thread creating files would race with a set-and-restore
            raise AssertionError("os.umask called")

        monkeypatch.setattr(os, "umask", no_setting)
        assert io._umask() == 0o027
        io.write_text(tmp_path / "r.txt", "x")
        assert (tmp_path / "r.txt").stat().st_mode & 0o777 == 0o640
    finally:
        monkeypatch.undo()
        os.umask(old)


def test_check_memory_refuses_before_allocating(monkeypatch):
    import netanatomy.cli.boundary as boundary
    from netanatomy.errors import UsageError
    from netanatomy.specialization.clusters import activation_graph_bytes

    assert activation_graph_bytes(20000, 5000) > 2**34          # InceptionV1-sized: tens of GiB
    monkeypatch.setattr(boundary, "available_memory", lambda: 2**30)
    boundary.check_memory(2**29, "a step", "a hint")
    with pytest.raises(UsageError, match="1.0 GiB is available; a hint"):
        boundary.check_memory(2**31, "a step", "a hint")
    monkeypatch.setattr(boundary, "available_memory", lambda: None)   # unknown: nothing refused
    boundary.check_memory(2**60, "a step", "a hint")
