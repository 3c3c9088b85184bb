"""The branch-emergence lab: AlexNet's first layers split in two groups, does one go colour?

Krizhevsky et al. trained AlexNet with conv1 and conv2 split over two GPUs: each half of conv1
feeds only its own half of conv2, and the halves meet at conv3. One half became black-and-white
Gabor filters, the other low-frequency colour, and Branch Specialization (Voss et al.) reports
that this recurs on retraining. Its second claim is that the split is latent without branches:
in an unsplit network, singular vector 0 of |W| between the first two conv layers is colour.

For every seed this lab trains two arms of a scaled-down AlexNet (`zoo:alexnet`, small=True)
on colour natural images, from the same seeded initialization and data:
- `split`: the two-tower network (conv2, conv4, conv5 grouped in two, per-tower LRN);
- `unsplit`: the same widths with no groups (towers=1).
Then it measures, from the weights alone:
- split: per group, the mean colourfulness (share of a filter's energy off the grey axis) and
  mean spatial frequency of its conv1 filters, which group is the colour one, and a permutation
  test of the group labels of conv1's units (p by the +1 rule);
- unsplit: the SVD of |W| of conv2 (lower units: conv1's filters), and the Pearson and
  Spearman correlation of singular vectors 0 and 1 with colourfulness and frequency; and, as a
  control, the same group test on its two halves of conv1 (no split: p should be uniform).
Across seeds: how many seeds have a colour group (p < 0.05; binomial test against the 5% a
null gives), in how many the colour group is also the low-frequency one (sign test, 1/2 under
the null), and Fisher's combination of the seeds' p-values.

Everything lands in OUT/seed_N/ARM/: `model.pt` (checkpointed every epoch by the training
loop: an interrupted run resumes mid-training), `train.json` and `measure.json` (stage results,
re-used when their settings are unchanged; `netanatomy.labs.stages`), and OUT/seed_N/
`filters.png` (the split net's two groups side by side) and `unsplit_svd.png`. The table is
OUT/results.json and OUT/results.md, one row per seed beside the article's finding.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import UsageError
from ..scale import Runner
from ..util.devices import one_thread
from ..util.figures import pyplot
from ..util.io import write_json, write_text
from .stages import StageResult, fmt, machine_record, quiet, run_stage, train_stage, with_overrides

MODEL = "zoo:alexnet"
ARMS = ("split", "unsplit")
TOWERS = {"split": 2, "unsplit": 1}
GROUPS = 2
ALPHA = 0.05
SVD_LAYER = "conv2"   # its lower layer is conv1, whose units are the filters
FIRST_LAYER = "conv1"

ANCHOR: dict[str, str] = {
    "source": "Krizhevsky et al. 2012 (AlexNet on ImageNet, conv1/conv2 split over two GPUs), as described in "
              "Branch Specialization (Voss et al., Distill 2021)",
    "split": "one group black-and-white Gabor filters (high frequency), the other low-frequency colour; "
             "consistent on retraining, on other architectures split the same way and on Places",
    "unsplit": "unsplit first two conv layers (InceptionV1): singular vector 0 of |W| is colour, vector 1 frequency",
}


# Patches of 3% to 15% of a photo's short side: at the photos spec's default (10% to 50%) the
# 17-photo task is easy (test accuracy 0.99 after 24 epochs, training loss 0.04) and the first
# layer stops learning; at 3% to 15% it ends near 0.8 and the loss keeps pulling on the filters.
PHOTOS = "photos?scale=0.03-0.15"


@dataclass(frozen=True)
class BranchesSettings:
    """What the lab runs; `QUICK` is a smoke-test version of the default (`FULL`).

    The network is AlexNet's topology scaled to 32 px images and a CPU: conv1 5x5 at stride 2
    (a 16 x 16 first map), `width` times the small widths (0.5: 32 conv1 filters, 16 a group),
    conv1 initialized from N(0, conv1_std^2) as in the paper. Data: `data` is a spec
    (`photos`: seeded patches of the machine's colour photos, label = which photo;
    `cifar10:DIR`; `folder:DIR`), read at `size` px; `train_examples` / `test_examples` cap
    the splits (photos: as many patches are cut).
    """

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int = 12
    data: str = PHOTOS
    train_examples: int = 20000
    test_examples: int = 2000
    size: int = 32
    width: float = 0.5
    stride1: int = 2
    conv1_std: float = 0.01
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    permutations: int = 9999
    quick: bool = False

    def checked(self) -> BranchesSettings:
        if not self.seeds:
            raise UsageError("give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise UsageError(f"seeds repeat: {','.join(map(str, self.seeds))}")
        if self.epochs < 1:
            raise UsageError(f"epochs must be at least 1, got {self.epochs}")
        if self.train_examples < 1 or self.test_examples < 1 or self.batch_size < 1 or self.permutations < 1:
            raise UsageError("train and test examples, batch size and permutations must be at least 1")
        if self.size < 16:
            raise UsageError(f"images must be at least 16 px for the network, got {self.size}")
        if not (self.lr > 0 and self.width > 0 and self.conv1_std > 0 and self.weight_decay >= 0):
            raise UsageError("lr, width and conv1_std must be positive and weight decay >= 0")
        return self


FULL = BranchesSettings()
QUICK = BranchesSettings(seeds=(0,), epochs=2, train_examples=1500, test_examples=300, width=0.25, batch_size=32,
                         permutations=999, quick=True)


def model_args(settings: BranchesSettings, arm: str, num_classes: int) -> dict[str, Any]:
    """`zoo:alexnet` arguments of an arm (also what a user passes as --model-arg to re-load it)."""
    return {"small": True, "input_size": settings.size, "num_classes": num_classes, "width": settings.width,
            "stride1": settings.stride1, "towers": TOWERS[arm], "conv1_std": settings.conv1_std}


def train_config(settings: BranchesSettings, seed: int):
    """Adam at a constant lr after the training loop's warm-up, then cosine decay, batch 128."""
    from ..training import TrainConfig

    return TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size, optimizer="adam", lr=settings.lr,
                       weight_decay=settings.weight_decay, schedule="cosine", seed=seed, channels_last=True)


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class LabData:
    """The train and test splits as used (same for every seed: the seed varies the network)."""

    spec: str
    train: Any
    test: Any
    classes: int


def open_lab_data(settings: BranchesSettings) -> LabData:
    """Both splits of the lab's data, refused (UsageError) unless labelled colour images."""
    from .lab_data import class_count, open_split

    sets = {}
    for split, count in (("train", settings.train_examples), ("test", settings.test_examples)):
        ds = open_split(settings.data, split, size=settings.size, examples=count, lab="branches")
        if ds.image_shape[0] != 3:
            raise UsageError(f"the lab needs colour images (3 x {settings.size} x {settings.size}); {settings.data!r} "
                             f"gives {' x '.join(map(str, ds.image_shape))}")
        sets[split] = ds
    classes = class_count(sets["train"])
    if classes < 2:
        raise UsageError(f"data {settings.data!r} has one class: nothing to learn")
    return LabData(settings.data, sets["train"], sets["test"], classes)


# ---------------------------------------------------------------------------------------------
# Measurements (pure functions of weights)


def group_difference_test(values: np.ndarray, groups: np.ndarray, *, permutations: int, seed: int) -> dict[str, Any]:
    """|mean of group 1 - mean of group 0| against random relabellings of the units (sizes kept).

    Why a permutation test: the units' values are not independent draws of a known law, but
    under "the groups do not differ" every relabelling is as likely as the real one. p by the
    +1 rule (`core.stats.null_test`, right tail).
    """
    from ..core.stats import null_test

    values = np.asarray(values, dtype=np.float64)
    groups = np.asarray(groups)
    rng = np.random.default_rng(seed)
    shuffled = rng.permuted(np.broadcast_to(groups, (permutations, groups.size)), axis=1)

    def stat(labels: np.ndarray) -> np.ndarray:
        ones = labels == 1
        mean1 = (values * ones).sum(-1) / ones.sum(-1)
        mean0 = (values * ~ones).sum(-1) / (~ones).sum(-1)
        return np.abs(mean1 - mean0)

    test = null_test(float(stat(groups[None])[0]), stat(shuffled), tail="right")
    return test.to_json()


def group_stats(filters: Tensor, *, permutations: int, seed: int, groups: int = GROUPS) -> dict[str, Any]:
    """Per group of a first layer's units (the first half, the second half): mean colourfulness
    and frequency, which group is the colour one, and permutation tests of both differences."""
    from ..core.filters import colourfulness, spatial_frequency
    from ..util.seeding import derive

    units = filters.shape[0]
    if groups != 2 or units % groups:
        raise UsageError(f"{units} units cannot be split into two equal groups")
    labels = np.repeat(np.arange(groups), units // groups)
    col = colourfulness(filters).numpy()
    freq = spatial_frequency(filters).numpy()
    per_group = [{"group": g, "units": [int(np.flatnonzero(labels == g)[0]), int(np.flatnonzero(labels == g)[-1])],
                  "colourfulness": float(col[labels == g].mean()), "frequency": float(freq[labels == g].mean())}
                 for g in range(groups)]
    colour = int(np.argmax([g["colourfulness"] for g in per_group]))
    grey = 1 - colour
    return {
        "groups": per_group,
        "colour_group": colour,
        "colourfulness_difference": per_group[colour]["colourfulness"] - per_group[grey]["colourfulness"],
        "frequency_difference": per_group[colour]["frequency"] - per_group[grey]["frequency"],
        "colour_group_lower_frequency": per_group[colour]["frequency"] < per_group[grey]["frequency"],
        "colourfulness_test": group_difference_test(col, labels, permutations=permutations,
                                                    seed=derive(seed, "colourfulness")),
        "frequency_test": group_difference_test(freq, labels, permutations=permutations,
                                                seed=derive(seed, "frequency")),
        "unit_colourfulness": col.tolist(),
        "unit_frequency": freq.tolist(),
    }


def _svd_summary(report, components: int = 5) -> dict[str, Any]:
    svd = report.svd
    return {"singular_values": svd.singular_values[:components].tolist(),
            "shares": svd.shares[:components].tolist(), "centered": svd.centered,
            "correlations": report.correlations,
            "lower_vectors": svd.lower[:, :2].T.tolist()}


def unsplit_svd(module, layer_map) -> tuple[dict[str, Any], Any]:
    """SVD of |W| of conv2 (lower units: conv1's filters), as defined and with M's mean removed.

    The raw M's vector 0 mixes overall connection strength with the main split (on these nets
    it carries 95% or more of M and all its entries are alike); the centred one is the main
    contrast. Both are reported, the raw one being the method as defined; the centred report
    is returned for the figure, where it spreads the units out.
    """
    from ..anatomy.svd import layer_svd

    raw = layer_svd(module, layer_map, SVD_LAYER, FIRST_LAYER)
    centred = layer_svd(module, layer_map, SVD_LAYER, FIRST_LAYER, center=True)
    summary = {"upper": raw.upper, "lower": raw.lower, "raw": _svd_summary(raw), "centered": _svd_summary(centred)}
    return summary, centred


# ---------------------------------------------------------------------------------------------
# Figures



def group_filters_figure(filters: Tensor, stats: dict[str, Any], title: str) -> Any:
    """The two groups' conv1 filters side by side, each labelled with its unit and colourfulness.

    Filters are drawn as the RGB image each responds to most and sorted within a group by
    colourfulness, so a colour group and a grey group are told apart at a glance. Laid out in
    inches (a fixed band for titles and caption) so that any group size fits without overlap.
    """
    plt = pyplot()

    from ..core.pictures import filters_to_rgb

    images = filters_to_rgb(filters)
    col = np.asarray(stats["unit_colourfulness"])
    per = filters.shape[0] // GROUPS
    ncols = min(8, per)
    nrows = -(-per // ncols)
    cell, gap, margin, top, bottom = 0.62, 0.35, 0.25, 0.95, 0.7   # inches
    panel_w, panel_h = ncols * cell, nrows * (cell + 0.22)
    width = GROUPS * panel_w + (GROUPS - 1) * gap + 2 * margin
    height = top + panel_h + bottom
    fig = plt.figure(figsize=(width, height), dpi=100)
    for g in range(GROUPS):
        ax = fig.add_axes(((margin + g * (panel_w + gap)) / width, bottom / height, panel_w / width,
                           panel_h / height))
        units = np.arange(g * per, (g + 1) * per)
        units = units[np.argsort(-col[units], kind="stable")]
        for i, unit in enumerate(units):
            r, c = divmod(i, ncols)
            ax.imshow(images[unit], extent=(c + 0.07, c + 0.93, r + 0.86, r), interpolation="nearest")
            ax.text(c + 0.5, r + 0.88, f"{int(unit)}: {col[unit]:.2f}", ha="center", va="top", fontsize=6)
        ax.set_xlim(0, ncols)
        ax.set_ylim(nrows * 1.0 + 0.08, -0.06)
        ax.set_xticks([])
        ax.set_yticks([])
        info = stats["groups"][g]
        tag = " (the colour group)" if g == stats["colour_group"] else ""
        ax.set_title(f"group {g}{tag}: units {info['units'][0]}-{info['units'][1]}\nmean colourfulness "
                     f"{info['colourfulness']:.2f}, mean frequency {info['frequency']:.3f} cycles/px", fontsize=8)
        ax.set_xlabel("filters sorted by colourfulness; label = conv1 unit: its colourfulness", fontsize=6.5)
    test = stats["colourfulness_test"]
    fig.text(0.5, 1 - 0.12 / height, f"{title}\ncolourfulness difference {stats['colourfulness_difference']:.2f}, "
             f"permutation p {fmt(test['p'])} ({test['n']} relabellings of the units' groups)",
             ha="center", va="top", fontsize=9)
    fig.text(0.5, 0.06 / height, "Each filter is drawn as the RGB image it responds to most (grey = 0; 0.5 + w / 2 "
             "max|w| per filter).\nColourfulness: share of the filter's energy off the grey axis (0 = black-and-white, "
             "1 = pure colour contrast). Frequency: energy-weighted mean radial frequency (0 to 0.71 cycles/px).",
             ha="center", va="bottom", fontsize=6)
    return fig


# ---------------------------------------------------------------------------------------------
# Stages of one seed and arm


def _train_stage(folder: Path, seed: int, arm: str, settings: BranchesSettings, data: LabData, device,
                 show: bool, log: Callable[[str], None]) -> StageResult:
    return train_stage(folder, model=MODEL, model_args=model_args(settings, arm, data.classes), seed=seed, data=data,
                       config=train_config(settings, seed), device=device, show_progress=show, log=log,
                       what=f"seed {seed} {arm}", extra={"size": settings.size})


def _load_trained(folder: Path, args: dict[str, Any]):
    from ..models import load_model
    from ..models.layers import discover_layers

    loaded = load_model(MODEL, weights=str(folder / "model.pt"), model_args=args)
    return loaded.module, discover_layers(loaded.module, loaded.input_shape)


def _measure_stage(run_dir: Path, seed: int, arm: str, settings: BranchesSettings, trained: StageResult,
                   log: Callable[[str], None]) -> StageResult:
    from ..util.io import save_figure

    folder = run_dir / arm
    picture = run_dir / ("filters.png" if arm == "split" else "unsplit_svd.png")
    stage_settings = {"after": trained.key, "permutations": settings.permutations, "seed": seed, "figure": 1}

    def compute() -> dict[str, Any]:
        import matplotlib.pyplot as plt

        also = " and the SVD of conv2's |W|" if arm == "unsplit" else ""
        log(f"seed {seed} {arm}: measuring conv1's groups{also}")
        module, layer_map = _load_trained(folder, trained.result["model_args"])
        filters = module.conv1.weight.detach().cpu()
        result: dict[str, Any] = {"groups": group_stats(filters, permutations=settings.permutations, seed=seed)}
        if arm == "split":
            fig = group_filters_figure(filters, result["groups"],
                                       f"seed {seed}: conv1 of the split network (each group feeds only its own half "
                                       "of conv2; they meet at conv3)")
        else:
            from ..anatomy.plots import svd_placement_figure

            result["svd"], report = unsplit_svd(module, layer_map)
            fig = svd_placement_figure(report)
        try:
            save_figure(fig, picture, dpi=100)
        finally:
            plt.close(fig)
        return result

    return run_stage(folder, "measure", stage_settings, compute, requires=[picture])


# ---------------------------------------------------------------------------------------------
# The whole lab


def _seed_task(context: tuple[Path, BranchesSettings, LabData, str, bool, Callable[[str], None]], seed: int
               ) -> dict[str, Any]:
    """Both arms of one seed (re-using what is stored) and its table row, on one torch thread."""
    from ..util.devices import resolve_device

    out, settings, data, device, show_progress, say = context
    dev = resolve_device(device)
    run_dir = out / f"seed_{seed}"
    stages: dict[str, StageResult] = {}
    with one_thread():
        for arm in ARMS:
            stages[f"{arm}_train"] = _train_stage(run_dir / arm, seed, arm, settings, data, dev, show_progress, say)
            stages[f"{arm}_measure"] = _measure_stage(run_dir, seed, arm, settings, stages[f"{arm}_train"], say)
    reused = [name for name, s in stages.items() if s.reused]
    if reused:
        say(f"seed {seed}: re-used {', '.join(reused)} from {run_dir}")
    return seed_row(seed, stages)


def run_branches(out: str | Path, settings: BranchesSettings = FULL, *, device: str | torch.device = "cpu",
                 show_progress: bool = True, log: Callable[[str], None] | None = None, command: str | None = None,
                 data: LabData | None = None, runner: Runner | None = None) -> dict[str, Any]:
    """Run (or resume) the lab into `out` and return the results document (also written there).

    `data` is the lab's data when the caller has opened it (`open_lab_data(settings)`) to check
    it first; `command` is the command line to record. Seeds are tasks on `runner` (default:
    here, in turn); on Ray each seed runs on one worker and writes into `out`, which the workers
    must share.
    """
    from ..scale import map_tasks, runs_here
    from ..util.devices import resolve_device

    settings = settings.checked()
    dev = resolve_device(device)
    say = log or quiet
    began = time.perf_counter()
    data = data or open_lab_data(settings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    here = runs_here(runner)
    context = (out, settings, data, str(dev), show_progress and here, say if here else quiet)
    rows = map_tasks(_seed_task, list(settings.seeds), context=context, runner=runner)
    doc = {
        "lab": "branches",
        "command": command,
        "settings": {**asdict(settings), "model": MODEL, "recipe": recipe(settings)},
        "model_args": {arm: model_args(settings, arm, data.classes) for arm in ARMS},
        "data": {"spec": data.spec, "train_examples": len(data.train), "test_examples": len(data.test),
                 "classes": data.classes},
        "anchor": ANCHOR,
        "rows": rows,
        "across_seeds": across_seeds(rows),
        "machine": machine_record(dev, 1),
        "wall_s": time.perf_counter() - began,
        "compute_s": sum(sum(r["seconds"].values()) for r in rows),
        "out": str(out),
    }
    doc["summary"] = summary_lines(doc)
    write_json(out / "results.json", doc)
    write_text(out / "results.md", results_markdown(doc))
    return doc


def recipe(settings: BranchesSettings) -> str:
    return (f"Adam lr {settings.lr:g} (warm-up 0.2 epochs, cosine decay), batch {settings.batch_size}, "
            f"{settings.epochs} epochs, weight decay {settings.weight_decay:g}; conv1 5x5 stride {settings.stride1}, "
            f"width {settings.width:g} of the small AlexNet, conv1 init N(0, {settings.conv1_std:g}^2); "
            f"{settings.permutations} relabellings per permutation test")


# ---------------------------------------------------------------------------------------------
# The table (pure functions of stage results)


def seed_row(seed: int, stages: dict[str, StageResult]) -> dict[str, Any]:
    """One row of the results table from a seed's stage results (plain JSON values)."""
    split, unsplit = stages["split_measure"].result, stages["unsplit_measure"].result
    g = split["groups"]
    svd = unsplit["svd"]
    return {
        "seed": seed,
        "split": {
            "test_accuracy": stages["split_train"].result["test_accuracy"],
            "colourfulness": [x["colourfulness"] for x in g["groups"]],
            "frequency": [x["frequency"] for x in g["groups"]],
            "colour_group": g["colour_group"],
            "colourfulness_difference": g["colourfulness_difference"],
            "colourfulness_p": g["colourfulness_test"]["p"],
            "colourfulness_z": g["colourfulness_test"]["z"],
            "frequency_difference": g["frequency_difference"],
            "frequency_p": g["frequency_test"]["p"],
            "colour_group_lower_frequency": g["colour_group_lower_frequency"],
        },
        "unsplit": {
            "test_accuracy": stages["unsplit_train"].result["test_accuracy"],
            "halves_colourfulness_difference": unsplit["groups"]["colourfulness_difference"],
            "halves_colourfulness_p": unsplit["groups"]["colourfulness_test"]["p"],
            "svd": {kind: {"shares": svd[kind]["shares"][:2],
                           "vector_0": _pearson(svd[kind], 0), "vector_1": _pearson(svd[kind], 1)}
                    for kind in ("raw", "centered")},
        },
        "reused": {name: s.reused for name, s in stages.items()},
        "seconds": {name: s.seconds for name, s in stages.items()},
    }


def _pearson(svd: dict[str, Any], component: int) -> dict[str, Any]:
    row = svd["correlations"].get(f"vector_{component}", {})
    return {prop: {"r": row[prop]["pearson"], "p": row[prop]["pearson_p"], "spearman": row[prop]["spearman"]}
            for prop in ("colourfulness", "frequency") if prop in row}


def across_seeds(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the seeds say together, with the tests stated.

    - colour group: seeds whose group colourfulness difference has p < 0.05; under the null
      each does with probability at most 0.05 (binomial upper tail), and Fisher's method
      combines the seeds' p-values;
    - colour group is the low-frequency one: a sign test (1/2 under the null, one-sided, as
      the article predicts the direction);
    - unsplit: seeds where singular vector 0 (raw and centred) correlates with colourfulness
      at p < 0.05 (Pearson).
    """
    from scipy.stats import binomtest

    from ..core.stats import fisher_combine

    n = len(rows)
    split = [r["split"] for r in rows]
    significant = sum(1 for s in split if s["colourfulness_p"] < ALPHA)
    lower = sum(1 for s in split if s["colour_group_lower_frequency"])
    both = sum(1 for s in split if s["colourfulness_p"] < ALPHA and s["colour_group_lower_frequency"]
               and s["frequency_p"] < ALPHA)
    halves = sum(1 for r in rows if r["unsplit"]["halves_colourfulness_p"] < ALPHA)

    def svd_count(kind: str, component: int, prop: str) -> int:
        return sum(1 for r in rows if (c := r["unsplit"]["svd"][kind][f"vector_{component}"].get(prop))
                   and c["p"] is not None and c["p"] < ALPHA)

    return {
        "seeds": n,
        "colour_group_seeds": significant,
        "colour_group_binomial_p": float(binomtest(significant, n, ALPHA, alternative="greater").pvalue),
        "colour_group_fisher_p": float(fisher_combine([s["colourfulness_p"] for s in split])),
        "colour_group_index": [s["colour_group"] for s in split],
        "colour_group_lower_frequency_seeds": lower,
        "colour_group_lower_frequency_sign_p": float(binomtest(lower, n, 0.5, alternative="greater").pvalue),
        "article_pattern_seeds": both,
        "mean_colour_group_colourfulness": float(np.mean([max(s["colourfulness"]) for s in split])),
        "mean_grey_group_colourfulness": float(np.mean([min(s["colourfulness"]) for s in split])),
        "unsplit_halves_p_below_alpha": halves,
        "unsplit_vector_0_colourfulness_seeds": {k: svd_count(k, 0, "colourfulness") for k in ("raw", "centered")},
        "unsplit_vector_1_frequency_seeds": {k: svd_count(k, 1, "frequency") for k in ("raw", "centered")},
        "alpha": ALPHA,
    }


def summary_lines(doc: dict[str, Any]) -> list[str]:
    """The across-seed findings in words (every test named)."""
    a = doc["across_seeds"]
    n = a["seeds"]
    return [
        f"colour group (conv1 group colourfulness difference, permutation p < {ALPHA}): {a['colour_group_seeds']} of "
        f"{n} seeds (binomial p {fmt(a['colour_group_binomial_p'])} against {ALPHA} a seed under the null; Fisher's "
        f"combined p {fmt(a['colour_group_fisher_p'])}); the colour group is group "
        f"{', '.join(map(str, a['colour_group_index']))} by seed",
        f"mean colourfulness of the more colourful group {a['mean_colour_group_colourfulness']:.3f}, of the other "
        f"{a['mean_grey_group_colourfulness']:.3f}",
        f"the more colourful group is the lower-frequency one in {a['colour_group_lower_frequency_seeds']} of {n} "
        "seeds "
        f"(sign test, one-sided, p {fmt(a['colour_group_lower_frequency_sign_p'])}); both differences significant "
        f"in the article's direction: {a['article_pattern_seeds']} of {n}",
        f"control, the unsplit net's two halves of conv1: p < {ALPHA} in {a['unsplit_halves_p_below_alpha']} of {n}",
        f"unsplit SVD of conv2's |W|: vector 0 correlates with colourfulness (Pearson p < {ALPHA}) in "
        f"{a['unsplit_vector_0_colourfulness_seeds']['raw']} of {n} seeds (raw M), "
        f"{a['unsplit_vector_0_colourfulness_seeds']['centered']} (centred M); vector 1 with frequency in "
        f"{a['unsplit_vector_1_frequency_seeds']['raw']} (raw), {a['unsplit_vector_1_frequency_seeds']['centered']} "
        "(centred)",
    ]


def _r(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "n/a"
    return f"{fmt(entry['r'], '+.2f')} (p {fmt(entry['p'], '.2g')})"


def results_markdown(doc: dict[str, Any]) -> str:
    """The results page: one row per seed and arm, beside the article's finding; the pictures."""
    s, d, a = doc["settings"], doc["data"], doc["anchor"]
    lines = [
        "# Branch-emergence lab: split vs unsplit AlexNet (small) on colour images",
        "",
        *([f"Command: `{doc['command']}`", ""] if doc.get("command") else []),
        f"Data: `{d['spec']}` at {s['size']} px, {d['train_examples']} training and {d['test_examples']} test images, "
        f"{d['classes']} classes. Network: `{doc['settings']['model']}` with "
        f"`{doc['model_args']['split']}` (unsplit: towers=1). Recipe: {s['recipe']}.",
        f"Compute time of the results: {doc['compute_s']:.0f} s (all stages, whenever they ran); wall time of this "
        f"invocation: {doc['wall_s']:.0f} s, on {doc['machine']['cpus']} CPUs (1 torch thread, "
        f"{doc['machine']['device']}).",
        "",
        "## Split network: conv1's two groups",
        "",
        "| seed | test acc. | colourfulness g0 / g1 | frequency g0 / g1 (c/px) | colour group | colourfulness "
        "difference (p) | frequency difference, colour - other (p) | colour group lower frequency |",
        "|---:|---:|:--|:--|---:|:--|:--|:--|",
    ]
    for r in doc["rows"]:
        x = r["split"]
        lines.append(
            f"| {r['seed']} | {fmt(x['test_accuracy'], '.3f')} | {x['colourfulness'][0]:.3f} / "
            f"{x['colourfulness'][1]:.3f} | {x['frequency'][0]:.3f} / {x['frequency'][1]:.3f} | {x['colour_group']} | "
            f"{x['colourfulness_difference']:.3f} ({fmt(x['colourfulness_p'], '.2g')}) | "
            f"{x['frequency_difference']:+.3f} ({fmt(x['frequency_p'], '.2g')}) | "
            f"{'yes' if x['colour_group_lower_frequency'] else 'no'} |")
    lines += ["| article | | one group near 0 (black-and-white), the other colour | grey group high, colour group "
              "low | either | large | negative | yes |", "",
              f"Article: {a['split']} ({a['source']}).", "",
              "## Unsplit network: SVD of conv2's |W| (lower units: conv1's filters)", "",
              "| seed | test acc. | halves: colourfulness difference (p) | vector 0 share | vector 0 r with "
              "colourfulness / frequency | vector 1 r with colourfulness / frequency | centred: vector 0 r with "
              "colourfulness / frequency | centred: vector 1 r with colourfulness / frequency |",
              "|---:|---:|:--|---:|:--|:--|:--|:--|"]
    for r in doc["rows"]:
        u = r["unsplit"]
        raw, cen = u["svd"]["raw"], u["svd"]["centered"]
        lines.append(
            f"| {r['seed']} | {fmt(u['test_accuracy'], '.3f')} | {u['halves_colourfulness_difference']:.3f} "
            f"({fmt(u['halves_colourfulness_p'], '.2g')}) | {raw['shares'][0]:.2f} | "
            f"{_r(raw['vector_0'].get('colourfulness'))} / {_r(raw['vector_0'].get('frequency'))} | "
            f"{_r(raw['vector_1'].get('colourfulness'))} / {_r(raw['vector_1'].get('frequency'))} | "
            f"{_r(cen['vector_0'].get('colourfulness'))} / {_r(cen['vector_0'].get('frequency'))} | "
            f"{_r(cen['vector_1'].get('colourfulness'))} / {_r(cen['vector_1'].get('frequency'))} |")
    lines += ["| article (InceptionV1) | | | | vector 0 is colour | vector 1 is frequency | | |", "",
              f"Article: {a['unsplit']}. Raw M is the method as defined (its vector 0 also carries each unit's "
              "overall connection strength); centred M has its mean removed first. Signs of r are arbitrary (a "
              "singular vector's sign is fixed by its largest entry).", "",
              "## Across seeds", ""]
    lines += [f"- {line}" for line in doc["summary"]]
    lines += ["", "p-values: permutation tests of the group labels of conv1's units "
              f"({s['permutations']} relabellings, +1 rule: the smallest is {1 / (s['permutations'] + 1):.2g}); "
              "correlations: Pearson, with SciPy's p.", "", "## Filters", ""]
    for r in doc["rows"]:
        lines.append(f"![seed {r['seed']}: conv1 of the split network, group 0 and group 1]"
                     f"(seed_{r['seed']}/filters.png)")
    lines += ["", "SVD placements of the unsplit networks: " + ", ".join(
        f"[seed {r['seed']}](seed_{r['seed']}/unsplit_svd.png)" for r in doc["rows"])]
    return "\n".join(lines) + "\n"



__all__ = ["ANCHOR", "ARMS", "FULL", "QUICK", "BranchesSettings", "LabData", "across_seeds", "group_difference_test",
           "group_filters_figure", "group_stats", "model_args", "open_lab_data", "results_markdown", "run_branches",
           "seed_row", "summary_lines", "train_config", "unsplit_svd", "with_overrides"]
