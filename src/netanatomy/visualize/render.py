"""Feature visualization: optimize images so that they maximize objectives, many at once.

One image per objective, all in one batch: a whole layer (or every sub-cluster of a network)
renders in one optimization, with one forward and one backward per step for the batch. Each
image's start and random transforms come from (seed, objective name, copy number) alone, and
the loss is a sum over images, so an image is the same whether it renders alone or in a batch
(up to floating-point differences of batched kernels).

The model sees images in [0, 1], as every netanatomy model takes them (it normalizes its own
input). Layer values are read with forward hooks (the layer's pre-activation values by
default, as Lucid's `pre_relu` layers); the forward pass stops right after the last layer
needed; hooks, the model's training flag and its parameters' `requires_grad` are restored
whatever happens.
"""
from __future__ import annotations

import math

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..capture.hooks import recording
from ..errors import UsageError
from ..models.layers import Layer, discover_layers
from ..models.layout import channels_last as layout_channels_last
from ..models.layout import prefers_channels_last
from ..scale import Runner, TaskStore, map_tasks, runs_here
from ..util.devices import resolve_device
from ..util.progress import progress
from ..util.seeding import derive
from .objectives import CallableTerm, DiversityTerm, LinearTerm, Objective, as_objective
from .param import DECAY_POWER, image_param
from .transforms import NO_TRANSFORMS, TransformConfig, apply_transforms, draw_params

LEARNING_RATE = 0.05
STEPS = 512


@dataclass
class Rendering:
    """Rendered images and what they reached.

    `values[i]` is objective i's per-image value on the final image i without transforms
    (diversity, a property of a group, is in `diversity`); `history[t, i]` the same value under
    step t's random transforms, as optimized.
    """

    images: Tensor  # [N, C, H, W] in [0, 1], on the CPU
    names: list[str]
    values: np.ndarray  # [N]
    history: np.ndarray  # [steps, N]
    seeds: list[int]
    diversity: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def image_seeds(objectives: Sequence[Objective], seed: int) -> list[int]:
    """A seed per image from (seed, objective name, copy number): independent of batch neighbours."""
    copies: Counter[str] = Counter()
    out = []
    for obj in objectives:
        out.append(derive(seed, obj.name, copies[obj.name]))
        copies[obj.name] += 1
    return out


def render(model: nn.Module, objectives: Objective | str | Sequence[Objective | str], *, steps: int = STEPS,
           lr: float = LEARNING_RATE, seed: int = 0, batch_size: int | None = None,
           size: int | tuple[int, int] | None = None, channels: int | None = None, param: str = "fourier",
           decorrelate: bool = True, decay_power: float = DECAY_POWER,
           transforms: TransformConfig | None = TransformConfig(), stage: str = "pre",
           input_shape: Sequence[int] | None = None, device: str | torch.device | None = None,
           show_progress: bool = True, param_size: int | tuple[int, int] | None = None,
           runner: Runner | None = None, store: TaskStore | None = None) -> Rendering:
    """Render one image per objective (names such as "mixed4a:97" are parsed).

    Images are optimized `batch_size` at a time (default: all in one batch) for `steps` Adam
    steps at `lr`. The image shape defaults to the model's input shape; `size` renders at
    another size (for convolutional layers). `transforms=None` turns transformation robustness
    off. `stage` "pre" reads pre-activation values, "post" the values after the nonlinearity.
    `param_size` parameterizes the image at that size and upsamples it to the render size
    (Lucent's default for 224 px models is 128).

    Each batch is a task on `runner` (here by default; Ray workers with `scale`), kept in
    `store` when given so that a stopped render resumes; an image does not depend on where its
    batch ran.
    """
    objs = [as_objective(o) for o in ([objectives] if isinstance(objectives, (Objective, str)) else objectives)]
    if not objs:
        raise UsageError("no objectives to render")
    if steps < 1:
        raise UsageError(f"steps must be at least 1, got {steps}")
    if not lr > 0:
        raise UsageError(f"the learning rate must be positive, got {lr}")
    if stage not in ("pre", "post"):
        raise UsageError(f"stage must be 'pre' or 'post', not {stage!r}")
    batch_size = len(objs) if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    dev = _model_device(model, device)
    layer_map = discover_layers(model, input_shape)
    shape = tuple(input_shape) if input_shape else tuple(layer_map.input_shape)
    if len(shape) != 3:
        raise UsageError(f"rendering needs image inputs (C, H, W); this model takes {shape}")
    hw = (shape[1], shape[2]) if size is None else ((size, size) if isinstance(size, int) else tuple(size))
    n_channels = shape[0] if channels is None else int(channels)
    layers = _resolve_layers(model, layer_map, objs)
    seeds = image_seeds(objs, seed)
    config = transforms if transforms is not None else NO_TRANSFORMS

    chunks = [(i, min(i + batch_size, len(objs))) for i in range(0, len(objs), batch_size)]
    bar = progress(total=steps * len(chunks), desc="render", unit="step", disable=None if show_progress else True)
    here = runs_here(runner)
    job = RenderJob(model, objs, seeds, layers, stage, steps, lr, hw, n_channels, param, decorrelate, decay_power,
                    config, dev, micro_batch(objs, layer_map, layers, shape, hw, dev), param_size,
                    bar if here else None)
    try:
        parts = map_tasks(_render_task, chunks, context=job, runner=runner, store=store,
                          key=lambda c: f"images-{c[0]:06d}-{c[1]:06d}",
                          on_result=None if here else (lambda c, r: bar.update(steps)))
    except RuntimeError as exc:
        if (n_channels, *hw) != shape:  # most likely the model cannot take the asked-for image shape
            raise UsageError(f"the model failed on {n_channels}x{hw[0]}x{hw[1]} images (it was built for "
                             f"{'x'.join(map(str, shape))}): {' '.join(str(exc).split())[:160]}") from exc
        raise
    finally:
        bar.close()
    diversity: dict[str, float] = {}
    for part in parts:
        diversity.update({k: float(v) for k, v in (part.get("diversity") or {}).items()})
    return Rendering(
        images=torch.from_numpy(np.concatenate([p["images"] for p in parts])), names=[o.name for o in objs],
        values=np.concatenate([p["values"] for p in parts]), history=np.concatenate([p["history"] for p in parts], axis=1),
        seeds=seeds, diversity=diversity,
    )


@dataclass
class RenderJob:
    """What every batch of a render shares (the context of its tasks)."""

    model: nn.Module
    objs: list[Objective]
    seeds: list[int]
    layers: dict[str, Layer]
    stage: str
    steps: int
    lr: float
    size: tuple[int, int]
    channels: int
    param: str
    decorrelate: bool
    decay_power: float
    config: TransformConfig
    device: torch.device
    micro: int | None
    param_size: int | tuple[int, int] | None
    bar: Any = None   # a progress bar, in this process only


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


def _render_task(job: RenderJob, chunk: tuple[int, int]) -> dict[str, Any]:
    """Images start..stop-1 of a render, optimized together in one batch."""
    start, stop = chunk
    channels_last = prefers_channels_last(job.model, job.device)
    with frozen_eval(job.model, channels_last=channels_last):
        images, values, history, diversity = _render_batch(
            job.model, job.objs[start:stop], job.seeds[start:stop], job.layers, job.stage, steps=job.steps, lr=job.lr,
            size=job.size, channels=job.channels, param=job.param, decorrelate=job.decorrelate,
            decay_power=job.decay_power, config=job.config, device=job.device, bar=job.bar or _NoBar(),
            channels_last=channels_last, micro=job.micro, param_size=job.param_size)
    return {"images": images.numpy(), "values": values, "history": history, "diversity": diversity}


# ---------------------------------------------------------------------------------------------
# internals


def _model_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    here = next((p.device for p in model.parameters()), None)
    if device is None:
        return here if here is not None else torch.device("cpu")
    dev = resolve_device(device)
    if here is not None and (here.type, here.index or 0) != (dev.type, dev.index or 0):
        raise UsageError(f"the model is on {here} but rendering was asked on {dev}; "
                         f"move it first with model.to({str(dev)!r})")
    return dev


@contextmanager
def frozen_eval(model: nn.Module, channels_last: bool = False) -> Iterator[nn.Module]:
    """Eval mode and frozen parameters (no weight gradients to compute), restored whatever happens.

    With `channels_last`, weights and conv outputs are laid out channels-last for the duration
    (`models.layout`), and the user's model is left exactly as it was.
    """
    training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        with layout_channels_last(model, enabled=channels_last):
            yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def _resolve_layers(model: nn.Module, layer_map, objs: Sequence[Objective]) -> dict[str, Layer]:
    """Objective layer name -> Layer (any submodule's output is a layer: LayerMap.resolve)."""
    names = {name for obj in objs for name in obj.layers}
    return {name: layer_map.resolve(name) for name in sorted(names)}


@dataclass
class _Plan:
    """Objectives of one batch in evaluable form, built once the layers' shapes are known."""

    linear: list[tuple[str, object, Tensor]]  # (layer, where, weights [B, U])
    callables: list[tuple[CallableTerm, Tensor, Tensor]]  # (term, image indices, weights)
    diversity: list[tuple[DiversityTerm, Tensor, float]]  # (term, image indices, weight)


def _build_plan(objs: Sequence[Objective], layers: Mapping[str, Layer], acts: Mapping[str, Tensor],
                device: torch.device) -> _Plan:
    batch = len(objs)
    linear: dict[tuple[str, object], Tensor] = {}
    groups: dict[tuple[str, object], tuple[object, list[int], list[float]]] = {}
    for i, obj in enumerate(objs):
        for weight, term in obj.terms:
            if isinstance(term, LinearTerm):
                name = layers[term.layer].name
                value = acts[name]
                where = _check_where(term.where, value, term.layer)
                key = (name, where)
                if key not in linear:
                    linear[key] = torch.zeros(batch, value.shape[1])
                linear[key][i] += weight * term.dense(int(value.shape[1]))
            else:
                key_id = ("callable", id(term)) if isinstance(term, CallableTerm) else ("diversity", term.key)
                entry = groups.setdefault(key_id, (term, [], []))
                entry[1].append(i)
                entry[2].append(weight)
    plan = _Plan([(name, where, w.to(device)) for (name, where), w in linear.items()], [], [])
    for term, idx, weights in groups.values():
        index = torch.tensor(idx, dtype=torch.long, device=device)
        if isinstance(term, CallableTerm):
            plan.callables.append((term, index, torch.tensor(weights, device=device)))
        else:
            plan.diversity.append((term, index, float(np.mean(weights))))
    return plan


def _check_where(where, value: Tensor, layer: str):
    if value.dim() == 2 or where in ("mean", "center"):
        return where if value.dim() > 2 else "mean"
    spatial = tuple(value.shape[2:])
    if len(where) != len(spatial) or any(not 0 <= p < s for p, s in zip(where, spatial)):
        raise UsageError(f"position {where} is outside layer {layer}'s map of size {spatial}")
    return tuple(where)


def _reduce(value: Tensor, where) -> Tensor:
    """[B, U, *spatial] -> [B, U] by spatial mean, centre value, or the value at a position."""
    if value.dim() == 2:
        return value
    if where == "mean":
        return value.flatten(2).mean(2)
    index = tuple(s // 2 for s in value.shape[2:]) if where == "center" else tuple(where)
    return value[(slice(None), slice(None)) + index]


def _evaluate(plan: _Plan, layers: Mapping[str, Layer], acts: Mapping[str, Tensor], batch: int
              ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(per-image values [B], total to maximize, diversity per group) for one forward's values."""
    per_image = None
    for name, where, weights in plan.linear:
        contrib = (_reduce(acts[name], where) * weights).sum(1)
        per_image = contrib if per_image is None else per_image + contrib
    if per_image is None:
        per_image = next(iter(acts.values())).new_zeros(batch)
    for term, index, weights in plan.callables:
        sub = {name: acts[layers[name].name].index_select(0, index) for name in term.layers}
        vals = term.fn(sub).reshape(-1)
        if vals.shape[0] != index.shape[0]:
            raise UsageError(f"objective {term.key} gave {vals.shape[0]} values for {index.shape[0]} images")
        per_image = per_image.index_add(0, index, vals * weights)
    total = per_image.sum()
    div = {}
    for term, index, weight in plan.diversity:
        value = term.value(acts[layers[term.layer].name].index_select(0, index))
        div[term.key] = value
        total = total + weight * value
    return per_image, total, div


def _render_batch(model: nn.Module, objs: Sequence[Objective], seeds: Sequence[int], layers: Mapping[str, Layer],
                  stage: str, *, steps: int, lr: float, size: tuple[int, int], channels: int, param: str,
                  decorrelate: bool, decay_power: float, config: TransformConfig, device: torch.device, bar,
                  channels_last: bool = False, micro: int | None = None,
                  param_size: int | tuple[int, int] | None = None
                  ) -> tuple[Tensor, np.ndarray, np.ndarray, dict[str, float]]:
    batch = len(objs)
    # The images go in channels-last as well, so the first conv reads the layout that
    # frozen_eval gives its weights and every later conv output (models.layout).
    layout = torch.channels_last if channels_last else torch.preserve_format
    needed = {layers[name].name: layers[name] for obj in objs for name in obj.layers}
    image = image_param(seeds, channels, size, kind=param, decorrelate=decorrelate, decay_power=decay_power,
                        device=device, param_size=param_size)
    tparams = draw_params([derive(s, "transforms") for s in seeds], steps, config, device=device)
    optimizer = torch.optim.Adam(image.parameters(), lr=lr)
    history = torch.zeros(steps, batch, device=device)
    acts: dict[str, Tensor] = {}

    def keep(layer: Layer, value: Tensor) -> None:
        # a copy: an in-place op later in the forward must not change what the objective reads
        acts[layer.name] = value.clone() if len(needed) > 1 else value

    plan = None
    micro = min(batch, micro or batch)
    chunks = even_chunks(batch, micro)
    with recording(model, list(needed.values()), stage, keep, stop_early=True, detach=False) as recorder:
        for t in range(steps):
            optimizer.zero_grad(set_to_none=True)
            x = apply_transforms(image(), tparams[:, t], config).contiguous(memory_format=layout)
            if micro >= batch:
                acts.clear()
                recorder.forward(x)
                _check_reached(acts, needed)
                if plan is None:
                    plan = _build_plan(objs, layers, acts, device)
                per_image, total, _ = _evaluate(plan, layers, acts, batch)
                (-total).backward()
            else:
                # Images are independent (linear objectives only): run the network on a few at a
                # time, whose activations stay in cache, and send the summed input gradient back
                # through the parameterization once. The gradient is the full batch's.
                # One leaf per micro-batch: a slice of one big leaf would send back a full-batch
                # gradient (zeros but for the slice) and add it up, micro-batch after micro-batch.
                per_image = x.new_zeros(batch)
                grads = []
                for rows in chunks:
                    leaf = x[rows].detach().requires_grad_(True)
                    acts.clear()
                    recorder.forward(leaf)
                    _check_reached(acts, needed)
                    if plan is None:
                        plan = _build_plan(objs, layers, {k: v.detach() for k, v in acts.items()}, device)
                    part, total, _ = _evaluate(_rows(plan, rows), layers, acts, rows.stop - rows.start)
                    (-total).backward()
                    per_image[rows] = part.detach()
                    grads.append(leaf.grad)
                x.backward(torch.cat(grads).contiguous(memory_format=layout))
            optimizer.step()
            history[t] = per_image.detach()
            bar.update(1)
        with torch.no_grad():
            final = image().detach()
            per_image = final.new_zeros(batch)
            for rows in chunks:
                acts.clear()
                recorder.forward(final[rows].contiguous(memory_format=layout))
                _check_reached(acts, needed)
                part, _, div = _evaluate(_rows(plan, rows) if micro < batch else plan, layers, acts,
                                         rows.stop - rows.start)
                per_image[rows] = part
    return (final.float().cpu(), per_image.float().cpu().numpy(), history.cpu().numpy(),
            {k: float(v) for k, v in div.items()})


# A micro-batch keeps its largest activation near this size on a CPU: on a 2-core machine
# MobileNetV2's forward+backward at 224 px runs about twice as fast 4 images at a time as 16.
MICRO_BATCH_BYTES = 24 << 20


def micro_batch(objs: Sequence[Objective], layer_map, layers: Mapping[str, Layer], shape: tuple[int, ...],
                size: tuple[int, int], device: torch.device) -> int | None:
    """How many images to run through the network at once (None: all of them).

    Only on a CPU, and only when every objective is linear in activations (a diversity or
    custom term couples the images of a batch). The largest activation of one image up to
    the rendered layers is read from the layer map (output shapes, scaled to the rendered size).
    """
    if device.type != "cpu" or not all(isinstance(term, LinearTerm) for obj in objs for _, term in obj.terms):
        return None
    last = max((layer.index for layer in layers.values() if layer.kind != "module"), default=len(layer_map))
    scale = (size[0] * size[1]) / max(1, shape[1] * shape[2]) if len(shape) == 3 else 1.0
    biggest = shape[0] * size[0] * size[1]
    for layer in layer_map.values():
        if layer.index <= last and layer.out_shape:
            biggest = max(biggest, int(math.prod(layer.out_shape) * (scale if len(layer.out_shape) == 3 else 1.0)))
    return max(1, MICRO_BATCH_BYTES // max(1, 4 * biggest))


def even_chunks(batch: int, most: int) -> list[slice]:
    """Rows 0..batch-1 in the fewest chunks of at most `most`, as even as can be (32 at 5:
    5,5,5,5,4,4,4 rather than six of 5 and a 2 that runs at a fraction of the rate)."""
    count = -(-batch // max(1, most))
    size, extra = divmod(batch, count)
    out, start = [], 0
    for i in range(count):
        stop = start + size + (1 if i < extra else 0)
        out.append(slice(start, stop))
        start = stop
    return out


def _rows(plan: _Plan, rows: slice) -> _Plan:
    """The plan for images rows.start..rows.stop of the batch (linear terms only)."""
    return _Plan([(name, where, w[rows]) for name, where, w in plan.linear], [], [])


def _check_reached(acts: Mapping[str, Tensor], needed: Mapping[str, Layer]) -> None:
    missing = [name for name in needed if name not in acts]
    if missing:
        raise UsageError(f"the forward pass never reached layer {missing[0]}; it cannot be rendered")


def objective_values(model: nn.Module, objectives: Sequence[Objective | str], images: Tensor, *, stage: str = "pre",
                     input_shape: Sequence[int] | None = None) -> np.ndarray:
    """Objective i's per-image value on images[i] (no transforms): to compare renders and real inputs."""
    objs = [as_objective(o) for o in objectives]
    if len(objs) != images.shape[0]:
        raise UsageError(f"{len(objs)} objectives for {images.shape[0]} images")
    layers = _resolve_layers(model, discover_layers(model, input_shape), objs)
    needed = {layers[name].name: layers[name] for obj in objs for name in obj.layers}
    acts: dict[str, Tensor] = {}

    def keep(layer: Layer, value: Tensor) -> None:
        acts[layer.name] = value.clone()

    dev = _model_device(model, None)
    with frozen_eval(model), torch.no_grad(), \
            recording(model, list(needed.values()), stage, keep, stop_early=True, detach=True) as recorder:
        recorder.forward(images.to(dev))
        _check_reached(acts, needed)
        plan = _build_plan(objs, layers, acts, dev)
        per_image, _, _ = _evaluate(plan, layers, acts, len(objs))
    return per_image.float().cpu().numpy()


__all__ = ["LEARNING_RATE", "STEPS", "Rendering", "frozen_eval", "image_seeds", "objective_values", "render"]
