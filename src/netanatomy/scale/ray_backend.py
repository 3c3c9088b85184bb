"""Tasks on Ray: the shared context goes in the object store once, each worker keeps it.

The context (model, data, settings) is put in Ray's object store once per run; a worker
fetches and unpickles it with its first task of the run and keeps it for the next ones, so a
model is loaded once per worker, not once per task. Tasks ask for one CPU (and one GPU with
`--device cuda`); Ray queues them over as many workers as the cluster has. A task whose worker
dies (killed, out of memory, a lost node) is retried on another, up to `RETRIES` times; past
that the command stops with a message, and a re-run with the same `--out` redoes only the
tasks whose results are missing.

Ray is an optional dependency (`pip install 'netanatomy[ray]'`); it is imported only here.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import UsageError

INSTALL = "pip install 'netanatomy[ray]'"
RETRIES = 3
USER_MODULE_PREFIX = "netanatomy_user_model_"   # models/source.py imports a user's model file under this


def require_ray() -> Any:
    """The ray module, or a UsageError naming the install line."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"--ray needs Ray, which is not installed here: {INSTALL}") from None
    return ray


_CACHE: dict[str, Any] = {}   # in a worker: the payload of the run it serves, by object id


def _run_task(payload: list[Any], item: Any) -> Any:
    """One task in a worker. The (fn, context) payload is fetched from the object store the
    first time this worker meets it, then kept: a model is unpickled once per worker."""
    import ray

    ref = payload[0]   # wrapped in a list, so that Ray passes the reference and not its value
    key = ref.hex()
    if key not in _CACHE:
        _CACHE.clear()   # a worker serves one run at a time: drop the last run's model
        _CACHE[key] = ray.get(ref)
    fn, context = _CACHE[key]
    return fn(context, item)


class RayRunner:
    """Runs tasks on a Ray cluster: a local instance (`address=None`) or the one at `address`."""

    name = "ray"

    def __init__(self, address: str | None = None, *, gpus: float = 0, cpus: float = 1) -> None:
        self.ray = require_ray()
        self.address, self.gpus, self.cpus = address, gpus, cpus
        self.started_here = False
        self._connect()

    def _connect(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return
        options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False,
                                   "include_dashboard": False}
        if self.address:
            check_reachable(self.address)
        try:
            ray.init(address=self.address, **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
            raise UsageError(f"could not start or reach {where}: {' '.join(str(exc).split())[:200]}") from None
        self.started_here = True
        if self.gpus and not ray.cluster_resources().get("GPU"):
            self.close()
            raise UsageError("--device cuda with --ray: the Ray cluster has no GPU")

    def run(self, fn: Any, context: Any, items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        if not items:
            return
        ray = self.ray
        _pickle_user_models_by_value()
        payload = [ray.put((fn, context))]
        task = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=RETRIES)(_run_task)
        refs = {task.remote(payload, item): i for i, item in enumerate(items)}
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                yield refs[ready[0]], self._result(ready[0])
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def _result(self, ref: Any) -> Any:
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, BaseException):
                raise cause from None   # the task's own error (a UsageError stays exit 2)
            raise
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                ray.exceptions.ObjectLostError) as exc:
            raise RuntimeError(f"a Ray worker was lost {RETRIES + 1} times on one task "
                               f"({type(exc).__name__}); run the same command again to resume: finished "
                               "tasks are kept") from None

    def close(self) -> None:
        """Disconnect (and stop the local instance when this runner started it)."""
        if self.started_here and self.ray.is_initialized():
            self.ray.shutdown()
        self.started_here = False


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse at once a host:port where nothing listens (Ray itself retries for minutes)."""
    import socket

    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return   # "auto" and other forms Ray resolves itself
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise UsageError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
                         "`ray start --head` and pass the address it prints, or use --ray alone for a local "
                         "instance") from None


def _pickle_user_models_by_value() -> None:
    """A user's model file is imported under a per-process name that workers cannot import:
    send its classes and functions by value instead."""
    from ray import cloudpickle

    for name, module in list(sys.modules.items()):
        if name.startswith(USER_MODULE_PREFIX) and module is not None:
            try:
                cloudpickle.register_pickle_by_value(module)
            except (ValueError, TypeError):
                pass
