"""The boundary: where a model, data, weights, a clusters file and an output path meet.

Every command goes through these checks before its work starts, so that bad input ends in
exit 2 with one line, and nothing written, by construction (docs/conventions.md, "Validation
at the boundary"). The core behind them assumes clean input.

- `load_cli_model`: the model, its weights checked finite, and one probe forward on the input
  shape when the shape or the model is the user's (`--input-shape`, `file.py:FACTORY`).
- `open_cli_data`: the data set, its sample shape compared with the model's input shape (and
  its labels with the model's outputs when the command needs them), with the data spec that
  would fit in the message.
- `check_output`: an output file or folder that can be written (`util.io.check_writable`).
- `read_cli_clusters`: a clusters file whose layers and widths are this model's.
- `check_memory`: an estimate of what a step will allocate against the memory there is.
"""
from __future__ import annotations

import json
import math
import shlex
from collections.abc import Sequence
from pathlib import Path

import click
import torch

from ..errors import UsageError

__all__ = ["available_memory", "check_data_fits", "check_memory", "check_output", "load_cli_model", "model_side",
           "open_cli_data", "parse_shape", "probe_forward", "read_cli_clusters", "warn_size_mismatch"]


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a shape like 3,224,224", param_hint="--input-shape") from None
    if not shape or any(s <= 0 for s in shape):
        raise click.BadParameter(f"{text!r} is not a shape like 3,224,224", param_hint="--input-shape")
    return shape


def shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def _exception_text(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- the model -----------------------------------------------------------------------------------

def load_cli_model(model: str, weights: str | None, model_args: tuple[str, ...], device: str = "cpu",
                   input_shape: str | None = None, seed: int = 0):
    """Load a model as every command does, with --input-shape overriding what the model declares.

    A model without --weights is randomly initialized under `seed`. Its weights must be finite
    (NaN or Inf is refused naming the first bad tensor), and a shape the user gave, or any
    shape of a user's model, must run through it (one probe forward).
    """
    from ..models import load_model
    from ..models.source import split_source
    from ..models.weights import check_finite

    shape = parse_shape(input_shape)
    loaded = load_model(model, weights=weights, model_args=model_args, device=device, seed=seed)
    check_finite(loaded.module, source=str(weights) if weights else model)
    if shape is not None:
        probe_forward(loaded, shape, f"--input-shape {','.join(map(str, shape))} does not fit {model}")
        loaded.input_shape = shape
    elif loaded.input_shape and split_source(model)[0] == "file":
        probe_forward(loaded, loaded.input_shape,
                      f"{model} does not run on the input shape it declares ({shape_text(loaded.input_shape)}); "
                      f"pass --input-shape C,H,W")
    return loaded


def probe_forward(loaded, shape: Sequence[int], failure: str) -> None:
    """One forward pass of a small random batch shaped `shape`; its exception becomes `failure`."""
    module = loaded.module
    param = next(module.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.rand((2, *shape), generator=torch.Generator().manual_seed(0)).to(device=loaded.device, dtype=dtype)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(x)
    except Exception as exc:  # the shape (or the user's forward) does not fit: said before the work
        raise UsageError(f"{failure}: {_exception_text(exc)}") from None
    finally:
        module.train(was_training)


# -- the data ------------------------------------------------------------------------------------

def open_cli_data(spec: str, split: str, loaded, *, limit: int | None = None, seed: int = 0,
                  option: str = "--data", labels: bool = False, shape_option: bool = True):
    """Open `spec` and check that its images fit `loaded` (see `check_data_fits`).

    Photo patches are cut at the model's input side unless the spec says `size=`.
    """
    from ..data import open_dataset

    ds = open_dataset(spec, split, limit=limit, seed=seed, default_size=model_side(loaded))
    check_data_fits(ds, loaded, spec, option=option, labels=labels, shape_option=shape_option)
    return ds


def model_side(loaded) -> int | None:
    """The side of the square images `loaded` takes (224 for 3x224x224), or None."""
    shape = tuple(loaded.input_shape) if loaded.input_shape else ()
    return int(shape[1]) if len(shape) == 3 and shape[1] == shape[2] else None


SIZE_RATIO = 1.5  # data this much smaller or larger than the model's own input size is warned about


def warn_size_mismatch(ds, loaded, spec: str, option: str = "--data") -> str | None:
    """One warning line on stderr when the images of `ds` are far from the size the model
    declares (a ratio over SIZE_RATIO either way, e.g. 32 px patches on a 224 px model given
    --input-shape 3,32,32): its units were trained on other scales. Returns the line, or None."""
    declared = getattr(loaded, "declared_input_shape", None)
    if not declared or len(declared) != 3:
        return None
    h, w = (int(s) for s in ds.image_shape[1:3])
    mh, mw = int(declared[1]), int(declared[2])
    ratio = max(h / mh, mh / h, w / mw, mw / w)
    if ratio <= SIZE_RATIO:
        return None
    fix = ""
    if mh == mw:
        from ..data import with_options

        fix = f" ({option} {shlex.quote(with_options(spec, size=mh))} gives them"
        fix += ", with no --input-shape)" if tuple(loaded.input_shape or ()) != tuple(declared) else ")"
    line = (f"warning: {option} {spec} gives {h}x{w} images, {ratio:.1f}x "
            f"{'smaller' if h * w < mh * mw else 'larger'} than the {mh}x{mw} that {loaded.source} takes; "
            f"its units may respond differently away from that scale{fix}")
    click.echo(f"netanatomy: {line}", err=True)
    return line


def check_data_fits(ds, loaded, spec: str, *, option: str = "--data", labels: bool = False,
                    shape_option: bool = True) -> None:
    """Refuse data whose sample shape is not the model's input shape, saying how to ask for it.

    A model that declares no input shape takes the data's, if one probe forward runs. With
    `labels`, the data must be labelled with no more classes than the model has outputs.
    `shape_option` says whether the command takes --input-shape (offered as the other fix).
    """
    from ..data import with_options

    name = loaded.source
    targets = ds.targets
    if labels and (not len(targets) or int(targets.max()) < 0):
        raise UsageError(f"{option} {spec} has no labels: this command needs a labelled data set")
    data_shape = tuple(int(s) for s in ds.image_shape)
    shape = tuple(loaded.input_shape) if loaded.input_shape else None
    if shape is None:
        probe_forward(loaded, data_shape, f"{name} does not take the {shape_text(data_shape)} images of "
                                          f"{option} {spec}")
        loaded.input_shape = data_shape
    elif len(shape) == 3 and shape != data_shape:
        raise UsageError(_misfit(spec, option, name, data_shape, shape, shape_option, with_options))
    elif len(shape) != 3 and math.prod(shape) != math.prod(data_shape):
        raise UsageError(f"{option} {spec} gives {shape_text(data_shape)} images ({math.prod(data_shape)} values) "
                         f"but {name} takes {shape_text(shape)} inputs")
    classes = loaded.num_classes
    if labels and classes is not None and int(targets.max()) + 1 > classes:
        raise UsageError(f"{option} {spec} has labels 0-{int(targets.max())} but {name} has {classes} outputs: "
                         f"give a data set with at most {classes} classes")


def _misfit(spec, option, name, data_shape, shape, shape_option, with_options) -> str:
    c, h, w = data_shape
    mc, mh, mw = shape
    text = f"{option} {spec} gives {shape_text(data_shape)} images but {name} takes {shape_text(shape)}"
    fixes: dict[str, int] = {}
    unfixable = []
    if c != mc:
        if c in (1, 3) and mc in (1, 3):
            fixes["channels"] = mc
        else:
            unfixable.append(f"no data option turns {c} channels into {mc}")
    if (h, w) != (mh, mw):
        if mh == mw:
            fixes["size"] = mh
        else:
            unfixable.append(f"size=N makes square images, not {mh}x{mw}")
    if fixes and not unfixable:
        text += f"; ask the data for them: {option} {shlex.quote(with_options(spec, **fixes))}"
    elif unfixable:
        text += "; " + "; ".join(unfixable)
    if shape_option and c == mc and (h, w) != (mh, mw):
        text += f" (or, if the model takes other sizes, --input-shape {c},{h},{w})"
    return text


# -- output paths --------------------------------------------------------------------------------

def check_output(path: str | None, *, folder: bool = False, what: str = "--out") -> None:
    """Refuse an output path that cannot be written, before the work (nothing is created)."""
    from ..util.io import check_writable

    if path:
        check_writable(path, folder=folder, what=what)


# -- clusters files ------------------------------------------------------------------------------

def read_cli_clusters(path: str, loaded, layer_map) -> list:
    """The clusters of a `netanatomy clusters --out` file, refused unless they are this model's:
    every layer the file names must be in the model with the width the file records."""
    from ..specialization.subclusters import read_clusters

    clusters = read_clusters(path)
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    widths = doc.get("widths") if isinstance(doc, dict) else None
    if not isinstance(widths, dict):  # older files: the weight graph's layer sizes are the widths
        widths = doc.get("layers") if isinstance(doc, dict) and doc.get("graph") == "weights" else None
    recorded = {str(k): v for k, v in (widths or {}).items() if k != "input"}  # the weight graph's input
    for c in clusters:
        for layer, _ in c.units:
            if layer != "input":  # the weight graph's input pixels: in every model with this input
                recorded.setdefault(layer, None)
    differ = []
    for layer, width in recorded.items():
        try:
            units = layer_map.resolve(layer).units
        except UsageError:
            differ.append(f"it names layer {layer!r}, which {loaded.source} does not have")
            continue
        if width is not None and int(width) != int(units):
            differ.append(f"{layer} has {int(width)} units there and {units} here")
    if differ:
        made = doc.get("model") if isinstance(doc, dict) else None
        shown = "; ".join(differ[:3]) + (f" (+{len(differ) - 3} more)" if len(differ) > 3 else "")
        head = (f"clusters file {path} does not fit {loaded.source} (made with other model arguments)"
                if made == loaded.source else
                f"clusters file {path} was made from {made or 'another model'}, not {loaded.source}")
        raise UsageError(f"{head}: {shown}; make one with 'netanatomy clusters {loaded.source} --out FILE'")
    return clusters


# -- memory --------------------------------------------------------------------------------------

def available_memory() -> int | None:
    """Bytes of memory this process can still take (MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(need: int, what: str, hint: str) -> None:
    """Refuse a step estimated to need more memory than there is, before allocating any."""
    have = available_memory()
    if have is not None and need > have:
        raise UsageError(f"{what} would need about {_gib(need)} of memory and {_gib(have)} is available; {hint}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
