import os

os.environ.setdefault("NETANATOMY_PROGRESS", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

# one thread: small tensors dominate the suite, and a second thread only adds sync waits
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _cwd_in_tmp(tmp_path_factory, monkeypatch):
    """Every test runs in its own empty temporary folder (beside, not inside, its tmp_path), so
    a default output path (`runs/...`) or any other relative write never lands in the repository."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
