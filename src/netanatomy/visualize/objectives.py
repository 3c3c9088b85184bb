"""Objectives: what a rendered image should do to the network, as values to maximize.

Unit, channel, direction and unit-set objectives are all linear functionals of one layer's
(pre-activation) values: a weight per unit, applied at the centre position or averaged over
space. Keeping them in that form lets a batch of objectives over one layer be evaluated as one
weighted reduction instead of one small computation per image. Diversity, which couples the
images of a batch, and arbitrary callables are the other kinds of term.

Objectives add, subtract and scale: `channel("mixed4a", 97) + 100 * diversity("mixed4a")`
(every term is a value to maximize, diversity included).
`parse_objective` reads the names used on the command line: `mixed4a:97`, `fc2:3`,
`layer:0-7` (the mean of a set of units), `layer:5@center` (the unit at the centre position)
or `layer:5@3,4` (at row 3, column 4).
"""
from __future__ import annotations

import numbers
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import UsageError

# Where a linear term reads a unit's map: averaged over space, at the centre, or at (y, x).
Where = str | tuple[int, int]


@dataclass(frozen=True, eq=False)
class LinearTerm:
    """sum over units u of coef[u] * (map of u reduced by `where`) on `layer`.

    `units` None means `coef` is a full vector over the layer's units (a direction).
    """

    layer: str
    units: tuple[int, ...] | None
    coef: Tensor  # [len(units)] or [layer units]
    where: Where = "mean"

    def dense(self, n_units: int) -> Tensor:
        """The coefficient vector over all `n_units` units of the layer (CPU, float32)."""
        if self.units is None:
            if self.coef.numel() != n_units:
                raise UsageError(f"direction on {self.layer} has {self.coef.numel()} values, "
                                 f"but the layer has {n_units} units")
            return self.coef.float()
        bad = [u for u in self.units if not 0 <= u < n_units]
        if bad:
            raise UsageError(f"unit {bad[0]} is out of range: layer {self.layer} has {n_units} units (0-{n_units - 1})")
        out = torch.zeros(n_units)
        out.index_add_(0, torch.tensor(self.units, dtype=torch.long), self.coef.float())
        return out


@dataclass(frozen=True, eq=False)
class DiversityTerm:
    """Minus the mean pairwise cosine similarity of the layer's Gram matrices over a group of images.

    The group is every image of the batch whose objective holds this same term (by `key`), so
    `[obj] * 4` with a diversity term in `obj` asks for four different images of one feature.
    """

    layer: str
    key: str

    def value(self, acts: Tensor) -> Tensor:
        """acts [n, C, *spatial] -> scalar: -mean over pairs i != j of cos(Gram_i, Gram_j)."""
        n = acts.shape[0]
        if n < 2:
            return acts.new_zeros(())
        flat = acts.reshape(n, acts.shape[1], -1)
        gram = torch.bmm(flat, flat.transpose(1, 2)).reshape(n, -1)
        gram = torch.nn.functional.normalize(gram, dim=1)
        sim = gram @ gram.t()
        off = sim.sum() - sim.diagonal().sum()
        return -off / (n * (n - 1))


@dataclass(frozen=True, eq=False)
class CallableTerm:
    """A user's function of layer values: fn({layer: values [n, ...]}) -> [n] one value per image."""

    layers: tuple[str, ...]
    fn: Callable[[Mapping[str, Tensor]], Tensor]
    key: str


Term = LinearTerm | DiversityTerm | CallableTerm


@dataclass(frozen=True, eq=False)
class Objective:
    """A weighted sum of terms, to maximize; combine with +, -, and multiplication by a number."""

    terms: tuple[tuple[float, Term], ...]
    name: str = field(default="objective")

    @property
    def layers(self) -> tuple[str, ...]:
        """Layers whose values the objective reads, in first-use order."""
        seen: dict[str, None] = {}
        for _, term in self.terms:
            for layer in (term.layers if isinstance(term, CallableTerm) else (term.layer,)):
                seen.setdefault(layer, None)
        return tuple(seen)

    def __add__(self, other: Objective | float) -> Objective:
        if _is_number(other) and other == 0:
            return self  # lets sum() start from 0
        if not isinstance(other, Objective):
            return NotImplemented
        return Objective(self.terms + other.terms, f"{self.name} + {other.name}")

    def __radd__(self, other: Objective | float) -> Objective:
        if _is_number(other) and other == 0:
            return self
        return NotImplemented

    def __mul__(self, factor: float) -> Objective:
        if not _is_number(factor):
            return NotImplemented
        return Objective(tuple((w * float(factor), t) for w, t in self.terms), f"{_fmt(factor)}*({self.name})")

    __rmul__ = __mul__

    def __truediv__(self, divisor: float) -> Objective:
        if not _is_number(divisor):
            return NotImplemented
        return self * (1.0 / float(divisor))

    def __neg__(self) -> Objective:
        return Objective(tuple((-w, t) for w, t in self.terms), f"-({self.name})")

    def __sub__(self, other: Objective) -> Objective:
        if not isinstance(other, Objective):
            return NotImplemented
        return self + (-other)

    def __repr__(self) -> str:
        return f"Objective({self.name})"


def _is_number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _fmt(x: float) -> str:
    return f"{x:g}"


def _check_layer(layer: str) -> str:
    if not isinstance(layer, str) or not layer.strip():
        raise UsageError("an objective needs a layer name")
    return layer.strip()


def _check_unit(unit: int) -> int:
    try:
        if isinstance(unit, bool):
            raise TypeError
        unit = operator.index(unit)
    except TypeError:
        raise UsageError(f"unit must be an integer, got {unit!r}") from None
    if unit < 0:
        raise UsageError(f"unit must not be negative, got {unit}")
    return unit


def channel(layer: str, unit: int) -> Objective:
    """The spatial mean of one unit's map (for a linear layer, the unit's value)."""
    layer, unit = _check_layer(layer), _check_unit(unit)
    return Objective(((1.0, LinearTerm(layer, (unit,), torch.ones(1), "mean")),), f"{layer}:{unit}")


def unit(layer: str, unit: int, position: tuple[int, int] | None = None) -> Objective:
    """One unit at one position of its map: the centre by default (as Lucid's `neuron`)."""
    layer, u = _check_layer(layer), _check_unit(unit)
    where: Where = "center" if position is None else (int(position[0]), int(position[1]))
    suffix = "center" if position is None else f"{where[0]},{where[1]}"
    return Objective(((1.0, LinearTerm(layer, (u,), torch.ones(1), where)),), f"{layer}:{u}@{suffix}")


def units(layer: str, members: Sequence[int], name: str | None = None) -> Objective:
    """A set of units (a cluster's sub-cluster, a branch): the mean of their channel objectives."""
    layer = _check_layer(layer)
    members = tuple(_check_unit(u) for u in members)
    if not members:
        raise UsageError(f"an empty set of units of {layer} has no objective")
    coef = torch.full((len(members),), 1.0 / len(members))
    return Objective(((1.0, LinearTerm(layer, members, coef, "mean")),), name or f"{layer}:{_ranges(members)}")


def direction(layer: str, vector: Sequence[float] | Tensor, name: str | None = None) -> Objective:
    """The spatial mean of the dot product of the layer's values with `vector` (one weight per unit)."""
    layer = _check_layer(layer)
    vec = torch.as_tensor(vector, dtype=torch.float32).detach().cpu().reshape(-1)
    if vec.numel() == 0 or not bool(torch.isfinite(vec).all()):
        raise UsageError("a direction needs finite values, one per unit")
    return Objective(((1.0, LinearTerm(layer, None, vec, "mean")),), name or f"{layer}:direction")


_diversity_counter = iter(range(1 << 62))


def diversity(layer: str, key: str | None = None) -> Objective:
    """Gram-matrix dissimilarity of the images that share this term (see `DiversityTerm`).

    Two `diversity(layer)` objectives with the same explicit `key` form one group; without a key
    each call makes its own term, shared by the copies of the objective that hold it.
    """
    layer = _check_layer(layer)
    key = key if key is not None else f"diversity#{next(_diversity_counter)}"
    return Objective(((1.0, DiversityTerm(layer, f"{layer}/{key}")),), f"diversity({layer})")


def custom(layers: str | Sequence[str], fn: Callable[[Mapping[str, Tensor]], Tensor],
           name: str = "custom") -> Objective:
    """Any differentiable function of layer values giving one value per image."""
    layers = (layers,) if isinstance(layers, str) else tuple(layers)
    return Objective(((1.0, CallableTerm(tuple(_check_layer(x) for x in layers), fn, name)),), name)


def _ranges(members: Sequence[int]) -> str:
    """(0, 1, 2, 5) -> '0-2,5'."""
    parts, start, prev = [], None, None
    for u in list(members) + [None]:
        if start is None:
            start = prev = u
        elif u is not None and u == prev + 1:
            prev = u
        else:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = u
    return ",".join(parts)


def parse_unit_list(text: str) -> list[int]:
    """'97', '0-7', '1,5,9', '0-3,10' -> unit indices (order kept, duplicates allowed)."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise UsageError(f"{text!r} is not a unit list like 97, 0-7 or 1,5,9") from None
    if not out:
        raise UsageError(f"{text!r} names no units")
    return out


def parse_objective(text: str) -> Objective:
    """Read `LAYER:UNITS[@center|@Y,X]`: one unit is a channel objective, several their mean.

    The layer name is everything before the last ':' (layer names may hold '.', '@' or ':').
    """
    text = text.strip()
    if ":" not in text:
        raise UsageError(f"objective {text!r} is not LAYER:UNIT (e.g. mixed4a:97, fc2:3, conv1:0-7)")
    layer, spec = text.rsplit(":", 1)
    position = None
    if "@" in spec:
        spec, pos = spec.split("@", 1)
        if pos.strip().lower() in ("center", "centre"):
            position = "center"
        else:
            try:
                y, x = (int(v) for v in pos.split(","))
            except ValueError:
                raise UsageError(f"position in {text!r} must be 'center' or Y,X") from None
            position = (y, x)
    if not layer.strip():
        raise UsageError(f"objective {text!r} names no layer")
    members = parse_unit_list(spec)
    if position is not None:
        if len(members) != 1:
            raise UsageError(f"a position (@...) needs one unit, not {len(members)}, in {text!r}")
        return unit(layer, members[0], None if position == "center" else position)
    if len(members) == 1:
        return channel(layer, members[0])
    return units(layer, members)


def as_objective(obj: Objective | str) -> Objective:
    """An Objective, or one parsed from its name."""
    if isinstance(obj, Objective):
        return obj
    if isinstance(obj, str):
        return parse_objective(obj)
    raise UsageError(f"not an objective: {obj!r}")


__all__ = [
    "CallableTerm",
    "DiversityTerm",
    "LinearTerm",
    "Objective",
    "as_objective",
    "channel",
    "custom",
    "direction",
    "diversity",
    "parse_objective",
    "parse_unit_list",
    "unit",
    "units",
]
