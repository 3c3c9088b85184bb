"""`netanatomy train MODEL --data DATA --epochs N --out FILE`: seeded, checkpointed, resumable."""
from __future__ import annotations

import shlex
import sys

import click

from ..options import (
    check_output,
    device_option,
    emit,
    json_option,
    load_cli_model,
    model_argument,
    open_cli_data,
    seed_option,
)


@click.command("train")
@model_argument
@click.option("--data", required=True, metavar="DATA", help="Training data set, e.g. fashion-mnist or cifar10:DIR (see `netanatomy data`).")
@click.option("--test-data", default=None, metavar="DATA", help="Test data set (default: the test split of --data).")
@click.option("--epochs", type=click.IntRange(1), required=True, help="Number of epochs (a re-run continues to it).")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Weights file (.pt or .safetensors).")
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True,
              help="Adam, or SGD with Nesterov momentum 0.9.")
@click.option("--lr", type=float, default=None,
              help="Peak learning rate, reached after a linear warm-up over the first 0.2 epochs  "
                   "[default: 0.003 Adam, 0.05 SGD].")
@click.option("--weight-decay", type=float, default=None, help="[default: 0 Adam, 5e-4 SGD]")
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="[default: 128, halved down to 8 until an epoch has at least 250 steps: 8 for the "
                   "2000 images of --data bundled, 128 from 32 000 images on]")
@click.option("--schedule", type=click.Choice(["cosine", "step", "none"]), default="cosine", show_default=True)
@click.option("--augment/--no-augment", default=False, show_default=True, help="Random shifts by up to 1/8 of the side.")
@click.option("--flip/--no-flip", default=False, show_default=True, help="With --augment: random horizontal flips.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use only the first N training examples.")
@click.option("--restart", is_flag=True, help="Ignore an existing checkpoint and start again.")
@click.option("--stop-after", type=click.IntRange(1), default=None,
              help="Stop after this many epochs in this run; re-run the same command to go on.")
@seed_option
@device_option
@json_option
def command(model, weights, model_args, data, test_data, epochs, out, optimizer, lr, weight_decay, batch_size,
            schedule, augment, flip, limit, restart, stop_after, seed, device, as_json) -> None:
    """Train MODEL on DATA, writing OUT after every epoch and resuming from it when re-run.

    Default recipe: Adam at 0.003, warm-up over 0.2 epochs then cosine decay, batch size by the
    size of DATA (see --batch-size). On --data bundled, 2 epochs reach about 75% test accuracy
    for zoo:mlp and 69% for zoo:minception."""
    from pathlib import Path

    from ...training import TrainConfig, train

    if lr is not None and not lr > 0:  # NaN too
        raise click.BadParameter(f"{lr} is not > 0", param_hint="--lr")
    if weight_decay is not None and not weight_decay >= 0:
        raise click.BadParameter(f"{weight_decay} is not >= 0", param_hint="--weight-decay")
    check_output(out)
    loaded = load_cli_model(model, weights, model_args, device, None, seed=seed)
    train_ds = open_cli_data(data, "train", loaded, limit=limit, seed=seed, labels=True, shape_option=False)
    test_ds = open_cli_data(test_data or data, "test", loaded, seed=seed,
                            option="--test-data" if test_data else "--data", labels=True, shape_option=False)
    if restart:
        Path(out + ".resume.pt").unlink(missing_ok=True)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                      schedule=schedule, augment=augment, flip=flip, seed=seed)
    meta = {"model": model, "model_args": list(model_args), "data": data, "test_data": test_data or data,
            "limit": limit, "command": "netanatomy " + shlex.join(sys.argv[1:]) if sys.argv else ""}
    result = train(loaded.module, train_ds, test_ds, cfg, out, device=device, meta=meta,
                   num_classes=loaded.num_classes, stop_after=stop_after)
    summary = {
        "model": model, "data": data, "weights": result.weights, "epochs": result.epochs_done,
        "resumed_from_epoch": result.resumed_from, "test_accuracy": result.test_accuracy,
        "per_class_accuracy": result.per_class_accuracy, "history": result.history, "seconds": result.seconds,
    }

    def human(s):
        head = f"trained {model} on {data}: {s['epochs']} of {epochs} epochs done"
        if s["resumed_from_epoch"]:
            head += f" (resumed after epoch {s['resumed_from_epoch']})"
        acc = s["test_accuracy"]
        return f"{head}\ntest accuracy: {acc:.4f}\nweights: {s['weights']}" if acc is not None else head

    emit(summary, as_json, human)
