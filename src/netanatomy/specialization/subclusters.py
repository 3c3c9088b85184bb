"""Sub-clusters (a cluster's units in one layer), random same-size sets, the clusters file."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from ..util.seeding import derive

MIN_SIZE = 2
MAX_FRACTION = 0.99


@dataclass(frozen=True)
class Cluster:
    id: int
    units: tuple[tuple[str, int], ...]  # (layer, unit index)


@dataclass(frozen=True)
class SubCluster:
    cluster: int
    layer: str
    units: np.ndarray  # sorted unit indices within the layer
    layer_units: int

    @property
    def size(self) -> int:
        return int(self.units.size)

    def mask(self) -> np.ndarray:
        """Keep-mask [layer_units]: 0 on the sub-cluster's units."""
        keep = np.ones(self.layer_units, dtype=np.float32)
        keep[self.units] = 0.0
        return keep


def sub_clusters(clusters: Sequence[Cluster], layer_units: Mapping[str, int], *, min_size: int = MIN_SIZE,
                 max_fraction: float = MAX_FRACTION) -> list[SubCluster]:
    """Every cluster's units split by layer, keeping those of size >= min_size and <= max_fraction
    of their layer (Hod et al.); layers not in `layer_units` (the input, ...) are skipped."""
    out = []
    for c in clusters:
        by_layer: dict[str, list[int]] = {}
        for layer, unit in c.units:
            by_layer.setdefault(layer, []).append(int(unit))
        for layer in layer_units:
            if layer not in by_layer:
                continue
            units = np.unique(np.asarray(by_layer[layer], dtype=np.int64))
            total = int(layer_units[layer])
            if units.size and (units.min() < 0 or units.max() >= total):
                raise UsageError(f"cluster {c.id} names unit {int(units.max())} of layer {layer}, which has {total}")
            if min_size <= units.size <= max_fraction * total:
                out.append(SubCluster(c.id, layer, units, total))
    return out


def random_sets(sub: SubCluster, n: int, seed: int) -> np.ndarray:
    """n random sets of the sub-cluster's size from its layer: [n, size] sorted unit indices.

    Seeded by (seed, layer, cluster), so adding clusters or layers does not change them."""
    rng = np.random.default_rng(derive(seed, "random-sets", sub.layer, sub.cluster))
    keys = rng.random((n, sub.layer_units))
    return np.sort(np.argsort(keys, axis=1)[:, :sub.size], axis=1)


def keep_masks(sets: np.ndarray, layer_units: int) -> np.ndarray:
    """Keep-masks [n, layer_units] (float32) that silence each row's units."""
    masks = np.ones((sets.shape[0], layer_units), dtype=np.float32)
    np.put_along_axis(masks, sets, 0.0, axis=1)
    return masks


# ---------------------------------------------------------------------------------------------
# The clusters file (what `netanatomy clusters --out` writes)


def clusters_to_json(clusters: Sequence[Cluster]) -> list[dict[str, Any]]:
    return [{"id": c.id, "units": [{"layer": layer, "index": int(i)} for layer, i in c.units]} for c in clusters]


def clusters_from_json(doc: Any, source: str = "clusters") -> list[Cluster]:
    """Clusters from the JSON `netanatomy clusters` writes ({"clusters": [{"id", "units": [...]}]})."""
    items = doc.get("clusters") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise UsageError(f"{source}: expected a JSON object with a 'clusters' list")
    out = []
    for pos, item in enumerate(items):
        try:
            units = tuple((str(u["layer"]), int(u["index"])) for u in item["units"])
            out.append(Cluster(int(item.get("id", pos)), units))
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"{source}: cluster {pos} is not {{'id', 'units': [{{'layer', 'index'}}]}}") from exc
    return out


def read_clusters(path: str | os.PathLike) -> list[Cluster]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"clusters file {str(p)!r} does not exist (write one with 'netanatomy clusters ... --out FILE')")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"clusters file {str(p)!r} is not JSON: {exc}") from exc
    return clusters_from_json(doc, str(p))
