"""`netanatomy demo`: the main job on the bundled models and data sample."""
from __future__ import annotations

import click

from ..options import check_output, emit, json_option, seed_option


@click.command("demo")
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for summary.json, summary.md and pictures.")
@click.option("--steps", type=click.IntRange(1), default=128, show_default=True,
              help="Feature-visualization steps.")
@click.option("--shuffles", type=click.IntRange(1), default=20, show_default=True,
              help="Shuffled networks for clusterability.")
@seed_option
@json_option
def command(out: str, steps: int, shuffles: int, seed: int, as_json: bool) -> None:
    """Run netanatomy's analyses on the bundled models and Fashion-MNIST sample and report."""
    from ...demo import render_markdown, run_demo

    check_output(out, folder=True)
    summary = run_demo(out, seed=seed, steps=steps, shuffles=shuffles,
                       log=lambda line: click.echo(line, err=True))
    emit(summary, as_json, lambda s: render_markdown(s) + f"\nwritten to {out}/ (summary.json, summary.md, PNGs)")
