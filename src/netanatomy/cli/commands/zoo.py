"""`netanatomy zoo`: the models netanatomy ships, with their input shapes and bundled weights."""
from __future__ import annotations

import click

from ..options import emit, json_option


@click.command("zoo")
@json_option
def command(as_json: bool) -> None:
    """List the zoo: architectures written here and the bundled trained models."""
    from ...models.zoo import entries

    rows = [
        {"name": f"zoo:{e.name}", "description": e.description, "input_shape": list(e.input_shape),
         "num_classes": e.num_classes, "bundled_weights": e.weights, "retrain": e.retrain}
        for e in sorted(entries().values(), key=lambda e: e.name)
    ]

    def human(_):
        lines = []
        width = max([24] + [len(r["name"]) for r in rows])
        for r in rows:
            shape = "x".join(map(str, r["input_shape"]))
            tag = "  [trained, bundled]" if r["bundled_weights"] else ""
            lines.append(f"{r['name']:<{width}} {shape:<10} {r['description']}{tag}")
        return "\n".join(lines)

    emit({"models": rows}, as_json, human)
