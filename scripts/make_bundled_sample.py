#!/usr/bin/env python
"""Build the Fashion-MNIST sample bundled in netanatomy from Debian's dataset-fashion-mnist.

    python scripts/make_bundled_sample.py [--source /usr/share/datasets/fashion-mnist]
                                          [--out src/netanatomy/resources/data] [--per-class 200]

Writes fashion-mnist-sample-{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz: `per-class`
images of each class from each split, chosen and ordered as `netanatomy.data.bundled`
describes (hash-ranked within a class, interleaved by class), gzipped reproducibly, so a
re-run gives the same bytes. The licence and README beside them are kept by hand.
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from netanatomy.data.bundled import PREFIX, RESOURCE_DIR, stratified_indices
from netanatomy.data.idx import read_idx_split, write_idx

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEBIAN_DIR, help="folder with Fashion-MNIST IDX files")
    parser.add_argument("--out", type=Path, default=RESOURCE_DIR, help="folder to write the sample into")
    parser.add_argument("--per-class", type=int, default=200, help="images per class and split")
    args = parser.parse_args()

    for split, head in (("train", "train"), ("test", "t10k")):
        found = read_idx_split(args.source, split)
        if found is None:
            raise SystemExit(f"no Fashion-MNIST {split} files in {args.source}; apt install dataset-fashion-mnist")
        images, labels = found
        idx = stratified_indices(labels, args.per_class, split)
        outputs = {
            args.out / f"{PREFIX}{head}-images-idx3-ubyte.gz": images[idx, 0],
            args.out / f"{PREFIX}{head}-labels-idx1-ubyte.gz": labels[idx].astype("u1"),
        }
        for path, array in outputs.items():
            write_idx(path, array)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            print(f"{path}  {path.stat().st_size} bytes  sha256 {digest}...")


if __name__ == "__main__":
    main()
