"""Tasks here, in local processes and on a 2-worker Ray cluster: the same results, resumable.

The Ray tests start a real head node with 2 CPUs (`ray start --head`) and pass its address
to the commands, as a user on a cluster would; they are skipped where Ray is not installed
(`pip install 'netanatomy[ray]'`; the README's set-up installs it).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from netanatomy.cli.main import run
from netanatomy.errors import UsageError
from netanatomy.scale import InProcess, Processes, TaskStore, map_tasks


def _square(context, item):
    return {"value": np.asarray(context * item), "item": item}


def test_map_tasks_keeps_item_order_and_resumes_from_the_store(tmp_path):
    store = TaskStore(tmp_path / "s", {"run": 1})
    seen = []
    out = map_tasks(_square, [3, 1, 2], context=10, store=store, on_result=lambda i, r: seen.append(i))
    assert [int(r["value"]) for r in out] == [30, 10, 20] and seen == [3, 1, 2] and store.done() == 3
    # a stored result is taken as it is: plant one and it comes back instead of being recomputed
    store.put("1", {"value": np.asarray(-5), "item": 1})
    again = map_tasks(_square, [3, 1, 2, 4], context=10, store=TaskStore(tmp_path / "s", {"run": 1}))
    assert [int(r["value"]) for r in again] == [30, -5, 20, 40]
    # other settings: the old results are removed, not mixed in
    fresh = map_tasks(_square, [1], context=10, store=TaskStore(tmp_path / "s", {"run": 2}))
    assert int(fresh[0]["value"]) == 10 and TaskStore(tmp_path / "s", {"run": 2}).done() == 1


def test_store_never_unpickles_and_treats_damage_as_missing(tmp_path):
    store = TaskStore(tmp_path / "s", {})
    np.save(store.path("evil"), np.array([object()], dtype=object), allow_pickle=True)
    os.replace(str(store.path("evil")) + ".npy", store.path("evil"))
    assert store.get("evil") is None
    store.path("torn").write_bytes(b"PK\x03\x04 not a whole file")
    assert store.get("torn") is None
    store.put("nan", {"x": np.asarray([np.nan, 1.0]), "note": "ok"})
    got = store.get("nan")
    assert np.isnan(got["x"][0]) and got["x"][1] == 1.0 and got["note"] == "ok"


def test_processes_give_what_in_process_gives():
    items = list(range(7))
    here = map_tasks(_square, items, context=3, runner=InProcess())
    there = map_tasks(_square, items, context=3, runner=Processes(2))
    assert [int(r["value"]) for r in there] == [int(r["value"]) for r in here]


def test_ray_flag_without_ray_installed_is_exit_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)   # import ray now raises ImportError
    assert run(["clusters", "zoo:mlp-fmnist", "--k", "4", "--shuffles", "1", "--ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'netanatomy[ray]'" in err and len(err.splitlines()) == 1


def test_ray_with_a_numbered_gpu_is_refused_before_ray_starts():
    from netanatomy.scale import make_runner

    with pytest.raises(UsageError, match="use --device cuda$"):
        make_runner("local", device="cuda:1")   # a task sees its GPU as cuda:0


ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'netanatomy[ray]'")


def test_an_address_where_no_cluster_listens_is_exit_2_at_once(capsys):
    with socket.socket() as s:   # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    began = time.monotonic()
    assert run(["clusters", "zoo:mlp-fmnist", "--k", "4", "--shuffles", "1", "--ray", f"127.0.0.1:{port}"]) == 2
    assert time.monotonic() - began < 30
    assert "no Ray cluster answers" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local head node with 2 worker CPUs; its address."""
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if ray_bin is None:
        pytest.skip("the ray command is not installed")
    port = _free_port()
    temp = tmp_path_factory.mktemp("ray")
    # a throw-away cluster on localhost, for this module only: no token to hand around
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([ray_bin, "start", "--head", "--num-cpus", "2", "--num-gpus", "0", f"--port={port}",
                    "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                   check=True, capture_output=True, env=env, timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env, timeout=120)
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


def _json_of(capsys, argv) -> dict:
    capsys.readouterr()
    assert run(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_clusters_shuffles_give_the_same_json_on_ray(ray_cluster, capsys):
    args = ["clusters", "zoo:mlp-fmnist", "--k", "5", "--shuffles", "6", "--seed", "3", "--json"]
    here = _json_of(capsys, args)
    there = _json_of(capsys, args + ["--ray", ray_cluster])
    assert there == here and here["shuffle"]["n"] == 6


def test_importance_gives_the_same_json_on_ray(ray_cluster, capsys, tmp_path):
    clusters = tmp_path / "c.json"
    assert run(["clusters", "zoo:mlp-fmnist", "--k", "6", "--shuffles", "0", "--out", str(clusters)]) == 0
    args = ["importance", "zoo:mlp-fmnist", "--clusters", str(clusters), "--data", "bundled", "--random", "9",
            "--limit", "400", "--json"]
    here = _json_of(capsys, args)
    there = _json_of(capsys, args + ["--ray", ray_cluster])
    assert there == here and len(here["sub_clusters"]) > 1


def _worker_pids() -> list[int]:
    """Processes running one of our tasks (Ray names a busy worker after its task)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()[1:] if "ray::_run_task" in line]


def test_a_killed_worker_and_a_rerun_give_the_same_result(ray_cluster, tmp_path, capsys):
    args = ["clusters", "zoo:mlp-fmnist", "--k", "6", "--shuffles", "24", "--seed", "1", "--json"]
    expected = _json_of(capsys, args)
    out = tmp_path / "c.json"
    cli = [sys.executable, "-m", "netanatomy.cli.main", *args, "--ray", ray_cluster, "--out", str(out)]
    proc = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NETANATOMY_PROGRESS": "0"})
    killed = []
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline and not killed:
        store = Path(str(out) + ".tasks")
        if store.is_dir() and len(list(store.glob("*.npz"))) >= 2:
            for pid in _worker_pids()[:1]:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=300)
    assert killed, "no busy worker was found to kill"
    if proc.returncode != 0:   # the run may stop on the lost worker; the re-run finishes it
        assert proc.returncode == 1 and "run the same command again" in stderr, stderr
        assert run(args + ["--ray", ray_cluster, "--out", str(out)]) == 0
        stdout = capsys.readouterr().out
    assert stdout.strip().startswith("{"), (proc.returncode, stdout[:500], stderr[-2000:])
    assert json.loads(stdout) == expected
    assert json.loads(out.read_text())["shuffle"] == expected["shuffle"]
    assert not Path(str(out) + ".tasks").exists()


def test_render_on_ray_writes_the_same_images(ray_cluster, tmp_path, capsys):
    args = ["render", "zoo:minception-fmnist", "--layer", "mixed1", "--units", "0-11", "--batch", "4", "--steps", "8",
            "--json"]
    here = _json_of(capsys, args + ["--out", str(tmp_path / "a")])
    there = _json_of(capsys, args + ["--out", str(tmp_path / "b"), "--ray", ray_cluster])
    assert there["values"] == here["values"] and there["files"] == here["files"]
    for name in here["files"]:
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name
    assert not (tmp_path / "b" / "render.tasks").exists()


def test_the_banding_lab_on_ray_gives_the_same_table(ray_cluster, tmp_path, capsys):
    args = ["lab", "banding", "--quick", "--variants", "baseline,rotate", "--seeds", "0", "--json"]
    here = _json_of(capsys, args + ["--out", str(tmp_path / "a")])
    there = _json_of(capsys, args + ["--out", str(tmp_path / "b"), "--ray", ray_cluster])

    def numbers(doc):
        return [{k: v for k, v in row.items() if k not in ("seconds", "reused")} for row in doc["rows"]]

    assert numbers(there) == numbers(here) and there["runner"] == "ray" and here["runner"] == "in-process"
    assert (tmp_path / "b" / "results.md").is_file()


USER_MODEL = '''
import torch
from torch import nn


class Tiny(nn.Module):
    netanatomy_input_shape = (1, 28, 28)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.fc1 = nn.Linear(6 * 26 * 26, 24)
        self.fc2 = nn.Linear(24, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def build():
    return Tiny()
'''


def test_a_users_model_file_goes_to_the_workers_by_value(ray_cluster, tmp_path, capsys):
    """The activation-graph shuffles send the model itself; its class lives in the user's file,
    imported here under a name a worker cannot import."""
    (tmp_path / "tiny_model.py").write_text(USER_MODEL)
    args = ["clusters", f"{tmp_path / 'tiny_model.py'}:build", "--graph", "activations", "--data", "bundled",
            "--examples", "150", "--k", "3", "--shuffles", "3", "--json"]
    here = _json_of(capsys, args)
    there = _json_of(capsys, args + ["--ray", ray_cluster])
    assert there == here and here["shuffle"]["n"] == 3


@pytest.mark.parametrize("lab", ["specialization", "branches"])
def test_the_seed_labs_on_ray_give_the_same_rows(lab, ray_cluster, tmp_path, capsys):
    args = ["lab", lab, "--quick", "--json"]
    here = _json_of(capsys, args + ["--out", str(tmp_path / "a")])
    there = _json_of(capsys, args + ["--out", str(tmp_path / "b"), "--ray", ray_cluster])

    def numbers(doc):
        return [{k: v for k, v in row.items() if k not in ("seconds", "reused")} for row in doc["rows"]]

    assert numbers(there) == numbers(here) and here["rows"]


def test_coherence_renders_on_ray_give_the_same_json(ray_cluster, tmp_path, capsys):
    clusters = tmp_path / "c.json"
    assert run(["clusters", "zoo:mlp-fmnist", "--k", "6", "--shuffles", "0", "--out", str(clusters)]) == 0
    args = ["coherence", "zoo:mlp-fmnist", "--clusters", str(clusters), "--data", "bundled", "--random", "3",
            "--kind", "all", "--steps", "8", "--batch", "8", "--limit", "300", "--json"]
    here = _json_of(capsys, args)
    there = _json_of(capsys, args + ["--ray", ray_cluster])
    assert there == here and here["render"]["images"] > 8   # several render tasks


def test_a_folder_that_is_not_a_store_is_never_removed(tmp_path):
    folder = tmp_path / "c.json.tasks"
    folder.mkdir()
    (folder / "thesis.tex").write_text("months of work")
    with pytest.raises(UsageError, match="in the way"):
        TaskStore(folder, {"run": 1})
    assert (folder / "thesis.tex").read_text() == "months of work"
    # keys that differ only in characters a file name cannot hold get files of their own
    store = TaskStore(tmp_path / "s", {})
    store.put("a/b", {"v": np.asarray(1)})
    store.put("a_b", {"v": np.asarray(2)})
    assert int(store.get("a/b")["v"]) == 1 and int(store.get("a_b")["v"]) == 2
