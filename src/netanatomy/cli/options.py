"""Options shared by commands, and the one way results are printed."""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from ..util.io import dumps
from .boundary import check_output, load_cli_model, open_cli_data, parse_shape, read_cli_clusters

__all__ = ["check_output", "cli_runner", "cli_task_store", "comma_list", "device_option", "emit", "input_shape_option",
           "json_option", "load_cli_model", "model_argument", "open_cli_data", "parse_shape", "parse_units",
           "ray_option", "read_cli_clusters", "seed_option"]


def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")(f)


def device_option(f: Callable) -> Callable:
    return click.option("--device", default="cpu", show_default=True,
                        help="Torch device: cpu, cuda, cuda:N or auto.")(f)


def ray_option(f: Callable) -> Callable:
    """--ray [ADDRESS]: run the command's tasks on Ray (a local instance, or the cluster at ADDRESS)."""
    return click.option("--ray", "ray", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
                        callback=_check_ray,
                        help="Run the tasks on Ray: bare, a local instance on every core; with an address "
                             "(host:port, or auto inside a cluster job), that cluster's workers. Needs "
                             "pip install 'netanatomy[ray]'.")(f)


def _check_ray(ctx: Any, param: Any, value: str | None) -> str | None:
    """At parse time, before any work: Ray is installed and the address answers."""
    if value:
        from ..scale.ray_backend import check_reachable, require_ray

        require_ray()
        if value != "local":
            check_reachable(value)
    return value


@contextmanager
def cli_runner(ray: str | None, device: Any = None, jobs: int = 1) -> Iterator[Any]:
    """The runner the command line asked for, connected before any work and closed after it.

    While Ray is connected its messages (a lost worker, a retried task) that it prints on
    stdout go to stderr: stdout is for the command's result (`--json`)."""
    import contextlib

    from ..scale import make_runner

    with contextlib.redirect_stdout(sys.stderr) if ray else contextlib.nullcontext():
        runner = make_runner(ray, device=device, jobs=jobs)
        try:
            yield runner
        finally:
            runner.close()


def cli_task_store(path: Any, task: str, model: str, weights: str | None, model_args: tuple[str, ...], loaded: Any,
                   *, restart: bool = False, **settings: Any) -> Any:
    """The task store of a command's run: keyed by the model as the user named it (source,
    weights, arguments, input shape) and by `settings`, everything else a task's result depends on."""
    from ..scale import TaskStore

    config = {"task": task, "model": model, "weights": weights, "model_args": list(model_args),
              "input_shape": list(loaded.input_shape or ()), **settings}
    return TaskStore(path, config, restart=restart)


def seed_option(f: Callable) -> Callable:
    return click.option("--seed", default=0, show_default=True, type=int,
                        help="Seed for every random choice; the same seed gives the same numbers.")(f)


def model_argument(f: Callable) -> Callable:
    f = click.option("--weights", "weights", default=None, metavar="FILE",
                     help="State dict to load (.pt/.pth loaded weights-only, or .safetensors); strict.")(f)
    f = click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
                     help="Keyword argument for the model factory (repeatable), e.g. --model-arg width=64.")(f)
    return click.argument("model", metavar="MODEL")(f)


def emit(result: Any, as_json: bool, human: Callable[[Any], str] | str | None = None) -> None:
    """Print `result` as JSON, or as the human text `human` makes of it."""
    if as_json:
        sys.stdout.write(dumps(result) + "\n")
        return
    if human is None:
        sys.stdout.write(dumps(result) + "\n")
    elif callable(human):
        sys.stdout.write(human(result).rstrip("\n") + "\n")
    else:
        sys.stdout.write(str(human).rstrip("\n") + "\n")
    sys.stdout.flush()


def input_shape_option(f: Callable) -> Callable:
    return click.option("--input-shape", "input_shape", default=None, metavar="C,H,W",
                        help="Input shape when the model does not declare one (e.g. 3,224,224).")(f)


def comma_list(values: str | tuple[str, ...]) -> list[str]:
    """'a,b' or ('a,b', 'c') (a repeated option) -> ['a', 'b', 'c'], blanks dropped."""
    texts = (values,) if isinstance(values, str) else values
    return [v.strip() for text in texts for v in text.split(",") if v.strip()]


def parse_units(text: str | None, count: int) -> list[int]:
    """'0-63', '1,5,9', '0-3,10' -> unit indices, checked against the layer's `count` units."""
    from ..visualize.objectives import parse_unit_list

    if not text:
        return list(range(count))
    units = parse_unit_list(text)
    bad = [u for u in units if u < 0 or u >= count]
    if bad:
        raise click.BadParameter(f"unit {bad[0]} is out of range: the layer has {count} units (0-{count - 1})",
                                 param_hint="--units")
    return units
