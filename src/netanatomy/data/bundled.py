"""The Fashion-MNIST sample shipped inside the package, and the rule that chose it.

The sample lets every command and test run with no download and no Debian package: 200
images per class from each split (2000 train, 2000 test). Which images: within each class,
the examples are ranked by a SHA-256 hash of "netanatomy-sample:SPLIT:INDEX" and the first
200 kept, a choice that depends on no random generator and so on no library version. They
are stored interleaved by class (0, 1, ..., 9, 0, 1, ...), so any prefix of the sample is
balanced: `bundled` with limit=100 gives 10 of each class. `scripts/make_bundled_sample.py`
regenerates the files from Debian's dataset-fashion-mnist byte for byte.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

RESOURCE_DIR = Path(__file__).resolve().parent.parent / "resources" / "data"
PREFIX = "fashion-mnist-sample-"
PER_CLASS = 200
SAMPLES = {"fashion-mnist": PREFIX}


def sample_file_names() -> list[str]:
    """The four IDX files of the sample, as stored in resources/data/."""
    return [f"{PREFIX}{head}-{kind}-ubyte.gz" for head in ("train", "t10k")
            for kind in ("images-idx3", "labels-idx1")]


def _rank_key(split: str, index: int) -> bytes:
    return hashlib.sha256(f"netanatomy-sample:{split}:{index}".encode()).digest()


def stratified_indices(labels: np.ndarray, per_class: int, split: str) -> np.ndarray:
    """Indices of `per_class` examples of each label, hash-ranked, interleaved by class.

    Raises ValueError when a class has fewer than `per_class` examples.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    chosen = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        if members.size < per_class:
            raise ValueError(f"class {c} has only {members.size} examples, fewer than {per_class}")
        ranked = sorted(members.tolist(), key=lambda i: _rank_key(split, i))
        chosen.append(ranked[:per_class])
    return np.asarray(chosen, dtype=np.int64).T.reshape(-1)  # row r holds the r-th pick of every class
