"""Forward hooks that hand over a layer's values during a forward pass, and always come off.

A layer's values come from one or more hooked tensors (its capture plan, see
`netanatomy.models.layers.Term`): a conv's batch-norm output, the branch outputs of a
concatenation, the two summands of a residual sum. `LayerRecorder` assembles them and calls
back once per layer per forward, while the tensors are fresh (an in-place ReLU later in the
forward cannot change what the callback saw). With `stop_early`, the forward is cut short once
every requested layer has been delivered.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..models.layers import TRANSFORMS, Layer


class StopForward(Exception):
    """Raised from a hook to end a forward pass early; caught by `LayerRecorder.forward`."""


Callback = Callable[[Layer, torch.Tensor], None]


class LayerRecorder:
    """Hooks on the modules named by the layers' capture plans; a context manager."""

    def __init__(self, model: nn.Module, layers: Sequence[Layer], stage: str, callback: Callback,
                 stop_early: bool = False, detach: bool = True):
        self.model = model
        self.layers = list(layers)
        self.stage = stage
        self.callback = callback
        self.stop_early = stop_early
        self.detach = detach
        self._handles: list = []
        self._plans = {layer.name: layer.terms(stage) for layer in self.layers}
        self._calls: dict[tuple[str, str], int] = defaultdict(int)
        self._parts: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
        self._done: set[str] = set()
        # (module, where, call) -> [(layer, term index)]
        self._wanted: dict[tuple[str, str, int], list[tuple[Layer, int]]] = defaultdict(list)
        for layer in self.layers:
            for i, term in enumerate(self._plans[layer.name]):
                self._wanted[(term.module, term.where, term.call)].append((layer, i))

    # -- hook plumbing ------------------------------------------------------------------------
    def __enter__(self) -> LayerRecorder:
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._reset))
            modules = {(mod, where) for mod, where, _ in self._wanted}
            for name, where in sorted(modules):
                sub = self.model.get_submodule(name) if name else self.model
                if where == "input":
                    self._handles.append(sub.register_forward_pre_hook(self._pre_hook(name)))
                else:
                    self._handles.append(sub.register_forward_hook(self._post_hook(name)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _reset(self, module: nn.Module, args: tuple) -> None:
        self._calls.clear()
        self._parts.clear()
        self._done.clear()

    def _pre_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self._arrive(name, "input", args[0] if args else None)
        return hook

    def _post_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output) -> None:
            self._arrive(name, "output", output)
        return hook

    def _arrive(self, name: str, where: str, value) -> None:
        call = self._calls[(name, where)]
        self._calls[(name, where)] += 1
        targets = self._wanted.get((name, where, call))
        if not targets:
            return
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"module {name or '(model)'} gave a {type(value).__name__} at its {where}, not a tensor")
        for layer, i in targets:
            plan = self._plans[layer.name]
            term = plan[i]
            part = value.detach() if self.detach else value
            if term.transform is not None:
                part = TRANSFORMS[term.transform](part)
            if len(plan) == 1:
                self._deliver(layer, part)
                continue
            # several parts: keep a copy (an in-place op later in the forward could change it)
            self._parts[layer.name][i] = part.clone() if term.transform is None else part
            if len(self._parts[layer.name]) == len(plan):
                parts = self._parts.pop(layer.name)
                ordered = [parts[j] for j in range(len(plan))]
                whole = torch.cat(ordered, dim=1) if layer.combine == "cat" else torch.stack(ordered).sum(0)
                self._deliver(layer, whole)

    def _deliver(self, layer: Layer, value: torch.Tensor) -> None:
        self.callback(layer, value)
        self._done.add(layer.name)
        if self.stop_early and len(self._done) == len(self.layers):
            raise StopForward

    # -- running ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor):
        """Run the model on `x`; returns its output, or None when cut short by `stop_early`."""
        try:
            return self.model(x)
        except StopForward:
            return None


@contextmanager
def recording(model: nn.Module, layers: Sequence[Layer], stage: str, callback: Callback, *,
              stop_early: bool = False, detach: bool = True) -> Iterator[LayerRecorder]:
    """`with recording(model, layers, "pre", fn) as rec: rec.forward(x)` calls fn(layer, values)."""
    recorder = LayerRecorder(model, layers, stage, callback, stop_early=stop_early, detach=detach)
    with recorder:
        yield recorder


def layer_values(model: nn.Module, layers: Sequence[Layer], x: torch.Tensor, stage: str = "pre",
                 detach: bool = True) -> dict[str, torch.Tensor]:
    """The full values (maps, not reduced) of `layers` on one batch `x`."""
    out: dict[str, torch.Tensor] = {}

    def keep(layer: Layer, value: torch.Tensor) -> None:
        out[layer.name] = value

    with recording(model, layers, stage, keep, stop_early=True, detach=detach) as rec:
        rec.forward(x)
    missing = [layer.name for layer in layers if layer.name not in out]
    if missing:
        raise RuntimeError(f"no values reached the hooks of {', '.join(missing)}")
    return out
