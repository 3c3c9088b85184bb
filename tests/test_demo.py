"""The demo runs end to end on the bundled models and sample, and says what it found."""
import json

from netanatomy.cli.main import run


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    code = run(["demo", "--out", str(out), "--steps", "8", "--shuffles", "3", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["model"]["test_accuracy_on_sample"] > 0.8
    layers = {layer["layer"]: layer for layer in summary["branches"]["layers"]}
    assert [b["units"] for b in layers["mixed1"]["branches"]] == [16, 24, 8, 8]
    # mixed1's branches are more correlated within than between, beyond random relabellings
    corr = layers["mixed1"]["correlation"]
    assert corr["within"] > corr["between"] and corr["difference"] > corr["null_mean"] + 2 * corr["null_std"]
    assert corr["p"] < 0.05 and corr["n_permutations"] == 999
    assert summary["modules"]["clusters"]["k"] == 12 and summary["modules"]["clusters"]["shuffle"]["n"] == 3
    assert summary["modules"]["importance"]["sub_clusters"] > 0
    assert (out / "summary.md").read_text().startswith("# netanatomy demo")
    assert (out / summary["pictures"]["png"]).is_file()
    assert all((out / p["png"]).is_file() for p in summary["weights"]["nmf_pictures"])
