"""Opening a lab's train and test splits: one way for every lab that trains on a data spec.

A lab asks for images of one size and a number of examples; a spec that says its own size
(`?size=`) or number of photo patches (`?n=`) keeps it. Larger splits are capped to a subset
drawn by a fixed seed per lab and split, so every seed and variant of a lab sees the same
images (folders list their images class by class: the first N would be a few classes).
"""
from __future__ import annotations

import numpy as np

from ..errors import UsageError


def sized_spec(spec: str, size: int, examples: int) -> str:
    """`spec` asking for `size` px images (and, for photos, `examples` patches) unless it says."""
    from ..data.spec import parse_spec, with_options

    given = parse_spec(spec)
    options: dict[str, object] = {}
    if "size" not in given.options:
        options["size"] = size
    if given.name == "photos" and "n" not in given.options:
        options["n"] = examples
    return with_options(spec, **options) if options else spec


def capped(ds, limit: int, lab: str, split: str):
    """At most `limit` items of `ds`, drawn by a seed fixed per lab and split, in stored order."""
    from ..util.seeding import derive

    if len(ds) <= limit:
        return ds
    order = np.random.default_rng(derive(0, lab, split)).permutation(len(ds))[:limit]
    return ds.subset(np.sort(order))


def open_split(spec: str, split: str, *, size: int, examples: int, lab: str):
    """The `split` of `spec` at `size` x `size` px, at most `examples` items, labelled.

    Refused (UsageError, one line) when the split is empty or has no labels: a lab trains
    classifiers.
    """
    from ..data import open_dataset

    ds = open_dataset(sized_spec(spec, size, examples), split)
    if ds.image_shape[1:] != (size, size):
        ds = ds.resized(size)
    ds = capped(ds, examples, lab, split)
    if len(ds) == 0:
        raise UsageError(f"data {spec!r} has no {split} images")
    if int(ds.targets.min()) < 0:
        raise UsageError(f"data {spec!r} has no labels: the lab's networks are trained to classify")
    return ds


def class_count(ds) -> int:
    """Classes of a labelled split (its class names, else the largest label + 1)."""
    return len(ds.classes or []) or int(ds.targets.max()) + 1


__all__ = ["capped", "class_count", "open_split", "sized_spec"]
