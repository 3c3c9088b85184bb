"""Where tasks run: in this process, in a few local processes, or on Ray workers.

Work that repeats (shuffles, lesion layers, render batches, lab networks) is a list of tasks
`fn(context, item)`. The context (a model, data, settings) is what every task shares: it
reaches each worker once, when the worker starts, never once per task. A task's seeds come
from the run's seed and the task's identity (the item), never from the worker, so the results
do not depend on where or in which order tasks run; `map_tasks` returns them in item order.

- `InProcess`: the tasks one after the other, here (the default; no pickling).
- `Processes(jobs)`: spawned local processes, the context sent once to each (the labs' `--jobs`).
- `RayRunner(address)`: Ray tasks (`ray_backend.py`) on a local Ray instance or a cluster; the
  context goes into Ray's object store once and each worker keeps it after its first task; a
  task whose worker is lost runs again on another.

With a `TaskStore`, finished tasks are written as their results arrive and skipped on the
next run, so a run stopped for any reason (a lost node, a killed job) resumes.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ..errors import UsageError
from .store import TaskStore

C = TypeVar("C")
T = TypeVar("T")
R = TypeVar("R")

TaskFn = Callable[[Any, Any], Any]


class Runner(Protocol):
    """Runs `fn(context, item)` for every item; yields (position in `items`, result) as they finish."""

    name: str

    def run(self, fn: TaskFn, context: Any, items: Sequence[Any]) -> Iterator[tuple[int, Any]]: ...

    def close(self) -> None: ...


def runs_here(runner: Runner | None) -> bool:
    """Whether tasks run in this process (so they may draw progress bars and log lines)."""
    return runner is None or isinstance(runner, InProcess)


@dataclass
class InProcess:
    """Every task here, in order."""

    name: str = "in-process"

    def run(self, fn: TaskFn, context: Any, items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        for i, item in enumerate(items):
            yield i, fn(context, item)

    def close(self) -> None:
        pass


_WORKER: dict[str, Any] = {}


def _set_worker(fn: TaskFn, context: Any) -> None:
    _WORKER["fn"], _WORKER["context"] = fn, context


def _call_worker(item: Any) -> Any:
    return _WORKER["fn"](_WORKER["context"], item)


@dataclass
class Processes:
    """`jobs` spawned local processes; the first failure cancels what has not started."""

    jobs: int
    name: str = "processes"

    def close(self) -> None:
        pass   # the pool lives only as long as one run()

    def run(self, fn: TaskFn, context: Any, items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        from concurrent.futures.process import BrokenProcessPool

        if not items:
            return
        pool = ProcessPoolExecutor(max_workers=min(self.jobs, len(items)),
                                   mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_set_worker, initargs=(fn, context))
        try:
            futures = {pool.submit(_call_worker, item): i for i, item in enumerate(items)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    try:
                        result = f.result()   # re-raises a worker's error here
                    except BrokenProcessPool:
                        raise RuntimeError("a worker process died (killed, or out of memory); run the same "
                                           "command again to resume: finished tasks are kept") from None
                    yield futures[f], result
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def map_tasks(fn: Callable[[C, T], R], items: Sequence[T], *, context: C = None, runner: Runner | None = None,
              store: TaskStore | None = None, key: Callable[[T], str] = str,
              on_result: Callable[[T, R], None] | None = None) -> list[R]:
    """`fn(context, item)` for every item, on `runner` (default: here), results in item order.

    With `store`, results found there are taken as done (and `on_result` is called for them
    first); every new result is written there as soon as it arrives. Results put in a store
    must be dicts of arrays and JSON values (`TaskStore`).
    """
    runner = runner or InProcess()
    results: dict[int, Any] = {}
    pending: list[int] = []
    for i, item in enumerate(items):
        found = store.get(key(item)) if store is not None else None
        if found is None:
            pending.append(i)
            continue
        results[i] = found
        if on_result is not None:
            on_result(item, found)
    for j, result in runner.run(fn, context, [items[i] for i in pending]):
        i = pending[j]
        if store is not None:
            store.put(key(items[i]), result)
        results[i] = result
        if on_result is not None:
            on_result(items[i], result)
    return [results[i] for i in range(len(items))]


def make_runner(ray: str | None = None, *, device: Any = None, jobs: int = 1) -> Runner:
    """The runner a command asked for: `ray` ("local" or an address) beats `jobs` > 1 beats here."""
    if ray:
        from .ray_backend import RayRunner

        if _is_cuda(device) and str(device).partition(":")[2] not in ("", "0"):
            raise UsageError(f"--device {device} with --ray: Ray gives each task a GPU of its own, which the "
                             "task sees as cuda:0; use --device cuda")

        return RayRunner(None if ray == "local" else ray, gpus=1 if _is_cuda(device) else 0)
    if jobs < 1:
        raise UsageError(f"jobs must be at least 1, got {jobs}")
    return Processes(jobs) if jobs > 1 else InProcess()


def _is_cuda(device: Any) -> bool:
    return device is not None and str(device).startswith("cuda")
