"""`netanatomy data [SPEC]`: the data set specs, or what one spec holds."""
from __future__ import annotations

import click

from ..options import emit, json_option


@click.command("data")
@click.argument("spec", required=False)
@click.option("--split", default="test", show_default=True, help="train, test or val.")
@json_option
def command(spec: str | None, split: str, as_json: bool) -> None:
    """Without SPEC, list the data set specs; with SPEC, describe that data set."""
    from ...data import dataset_help, open_dataset

    if spec is None:
        emit({"specs": dataset_help().splitlines()}, as_json, lambda _: dataset_help())
        return
    ds = open_dataset(spec, split)
    counts = {}
    if ds.targets is not None and len(ds.targets):
        import numpy as np

        labels, n = np.unique(ds.targets, return_counts=True)
        counts = {int(k): int(v) for k, v in zip(labels, n)}
    info = {"spec": spec, "split": split, "name": ds.name, "examples": len(ds), "image_shape": list(ds.image_shape),
            "classes": ds.classes, "label_counts": counts}
    emit(info, as_json, lambda i: (
        f"{i['name']} ({i['split']}): {i['examples']} images of {'x'.join(map(str, i['image_shape']))}"
        + (f", {len(i['classes'])} classes: {', '.join(map(str, i['classes'][:10]))}"
           + (" ..." if len(i["classes"]) > 10 else "") if i["classes"] else ", unlabelled")))
