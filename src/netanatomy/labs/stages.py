"""Resumable stages: each step of a lab writes its result once and is re-used on the next run.

A stage's result lives in `FOLDER/NAME.json` as {"settings", "key", "result", "seconds"},
written atomically when the stage completes. A later run re-uses it when the settings are the
same (compared as JSON) and recomputes it when they differ, so changing an option recomputes
exactly the stages it touches. A stage's settings should hold the `key` of every stage it
builds on, so that a recomputed upstream stage invalidates what follows.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..util.io import dumps, write_json


def quiet(_: str) -> None:
    """The log of a lab run without one (and of tasks that run in other processes)."""


def settings_key(settings: dict[str, Any]) -> str:
    """A short, stable hash of JSON-able settings (key order does not matter)."""
    text = json.dumps(json.loads(dumps(settings, indent=None)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class StageResult:
    name: str
    key: str
    result: Any
    reused: bool
    seconds: float  # compute time of the run that made the result (also when re-used)


def _normalized(settings: dict[str, Any]) -> Any:
    return json.loads(dumps(settings, indent=None))


def read_stage(folder: str | Path, name: str, settings: dict[str, Any]) -> StageResult | None:
    """The stored result of stage `name` if it was made with these settings, else None."""
    path = Path(folder) / f"{name}.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None
    if not isinstance(doc, dict) or doc.get("settings") != _normalized(settings) or "result" not in doc:
        return None
    return StageResult(name, settings_key(settings), doc["result"], True, float(doc.get("seconds") or 0.0))


def run_stage(folder: str | Path, name: str, settings: dict[str, Any], compute: Callable[[], Any], *,
              requires: Sequence[str | Path] = ()) -> StageResult:
    """Re-use stage `name`'s stored result for these settings, or compute and store it.

    `requires` lists files the result depends on (e.g. trained weights): if one is missing the
    stage is recomputed even when its result file is there.
    """
    folder = Path(folder)
    stored = read_stage(folder, name, settings)
    if stored is not None and all(Path(p).exists() for p in requires):
        return stored
    began = time.perf_counter()
    result = compute()
    seconds = time.perf_counter() - began
    key = settings_key(settings)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / f"{name}.json", {"settings": settings, "key": key, "result": result, "seconds": seconds})
    # read back so that a computed and a re-used result look the same (plain JSON values)
    return StageResult(name, key, json.loads(dumps(result, indent=None)), False, seconds)


def with_overrides(base: Any, **overrides: Any) -> Any:
    """A lab's settings dataclass `base` with the options a user gave (None = not given)."""
    from dataclasses import replace

    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def machine_record(device: Any, torch_threads: int) -> dict[str, Any]:
    """Where a lab ran, for its results file."""
    import os
    import platform

    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "torch_threads": int(torch_threads), "device": str(device)}


def fmt(x: Any, spec: str = ".3g") -> str:
    """A number for a results table; None and non-finite values are "n/a"."""
    import math

    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def train_stage(folder: str | Path, *, model: str, model_args: dict[str, Any], seed: int, data: Any, config: Any,
                device: Any, show_progress: bool, log: Callable[[str], None], what: str,
                extra: dict[str, Any] | None = None) -> StageResult:
    """Train `model` (zoo name and arguments, initialized from `seed`) into FOLDER/model.pt, as a stage.

    `data` has `.spec`, `.train`, `.test` and `.classes`. The training loop checkpoints every
    epoch; a checkpoint made with other settings starts over (FOLDER/model.settings.json says
    which settings the checkpoint belongs to), the same settings resume mid-training. `what`
    names the run in log lines; `extra` adds settings that change the run (e.g. the image size).
    """
    from dataclasses import asdict

    from ..models import load_model
    from ..training import train
    from ..util.io import read_json

    folder = Path(folder)
    weights = folder / "model.pt"
    stage_settings = {"model": model, "model_args": model_args, "data": data.spec, **(extra or {}),
                      "train_examples": len(data.train), "test_examples": len(data.test), "config": asdict(config)}
    marker = folder / "model.settings.json"

    def compute() -> dict[str, Any]:
        folder.mkdir(parents=True, exist_ok=True)
        resume = read_json(marker) == _normalized(stage_settings)
        write_json(marker, stage_settings)
        log(f"{what}: training for {config.epochs} epochs on {len(data.train)} images"
            + (" (resuming)" if resume and (folder / "model.pt.resume.pt").is_file() else ""))
        module = load_model(model, model_args=model_args, seed=seed).module
        result = train(module, data.train, data.test, config, weights, device=device, resume=resume,
                       meta={"model": model, "data": data.spec}, num_classes=data.classes, show_progress=show_progress)
        return {"test_accuracy": result.test_accuracy, "epochs": result.epochs_done,
                "resumed_from": result.resumed_from, "history": result.history, "model_args": model_args}

    return run_stage(folder, "train", stage_settings, compute, requires=[weights])


__all__ = ["StageResult", "fmt", "machine_record", "read_stage", "run_stage", "settings_key", "train_stage", "with_overrides"]
