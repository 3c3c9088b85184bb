"""`netanatomy lab NAME`: reproductions of published experiments, one subcommand per lab.

Each lab is resumable (re-running re-uses what is done) and writes a results table beside the
published numbers. A new lab is one more subcommand of the `command` group below, with its
work in `netanatomy.labs.NAME`.
"""
from __future__ import annotations

import click

from ..boundary import check_data_fits
from ..options import (
    check_output,
    cli_runner,
    comma_list,
    device_option,
    emit,
    json_option,
    load_cli_model,
    ray_option,
)


@click.group("lab")
def command() -> None:
    """Reproduce a paper's experiment and write a results table beside its published numbers."""


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0,1,2' or '0-2' -> (0, 1, 2)."""
    seeds: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            if "-" in part[1:]:
                lo, hi = (int(v) for v in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                seeds.extend(range(lo, hi + 1))
            else:
                seeds.append(int(part))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a list of seeds like 0,1,2 or 0-4", param_hint="--seeds") from None
    if not seeds:
        raise click.BadParameter("give at least one seed", param_hint="--seeds")
    return tuple(seeds)


@command.command("specialization", short_help="Clusterability, importance and coherence of the Fashion-MNIST MLP.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/lab-specialization", show_default=True,
              help="Folder for checkpoints, stage results and the results table (re-used on a re-run).")
@click.option("--seeds", default=None, metavar="LIST", help="Networks to train, e.g. 0,1,2 or 0-4  [default: 0,1,2].")
@click.option("--epochs", type=click.IntRange(1), default=None, help="Training epochs  [default: 20].")
@click.option("--k", type=click.IntRange(2), default=None, help="Clusters  [default: 12].")
@click.option("--shuffles", type=click.IntRange(0), default=None, help="Shuffled networks per seed  [default: 50].")
@click.option("--random", "n_random", type=click.IntRange(1), default=None,
              help="Random same-size sets per sub-cluster  [default: 99].")
@click.option("--steps", type=click.IntRange(1), default=None, help="Render steps (visualization)  [default: 256].")
@click.option("--data", default=None, metavar="DATA", help="Data set  [default: fashion-mnist, Debian's files].")
@click.option("--quick", is_flag=True,
              help="Smoke run: 1 seed, 1 epoch on 3000 examples, 5 shuffles, 4 random sets, 16 render steps.")
@device_option
@ray_option
@json_option
def specialization(out, seeds, epochs, k, shuffles, n_random, steps, data, quick, device, ray, as_json) -> None:
    """Filan et al. / Hod et al. on the Fashion-MNIST MLP 784-256x4-10: train each seed, cluster the
    weight graph (K=12) against 50 shuffled networks, then importance and coherence of every
    sub-cluster; writes OUT/results.json and OUT/results.md beside the published anchor."""
    from ...labs.specialization import FULL, QUICK, run_specialization, with_overrides
    from ...util.progress import enabled

    check_output(out, folder=True)
    if data is not None:  # the lab's own model must take the data it is given
        from ...data import open_dataset
        from ...errors import UsageError
        from ...labs.specialization import MODEL

        try:
            ds = open_dataset(data, "test")
        except UsageError:  # missing files: the lab says so itself (and --quick falls back to bundled)
            ds = None
        if ds is not None:
            check_data_fits(ds, load_cli_model(MODEL, None, (), device), data, labels=True, shape_option=False)
    settings = with_overrides(QUICK if quick else FULL, seeds=parse_seeds(seeds) if seeds is not None else None,
                              epochs=epochs, k=k, shuffles=shuffles, n_random=n_random, steps=steps, data=data)

    def log(message: str) -> None:
        if enabled():
            click.echo(f"lab specialization: {message}", err=True)

    spelled = (f"netanatomy lab specialization --out {out} --seeds {','.join(map(str, settings.seeds))} "
               f"--epochs {settings.epochs} --k {settings.k} --shuffles {settings.shuffles} --random "
               f"{settings.n_random} --steps {settings.steps} --data {settings.data}"
               + (" --quick" if quick else ""))
    with cli_runner(ray, device) as runner:
        doc = run_specialization(out, settings, device=device, log=log, command=spelled, runner=runner)
    emit(doc, as_json, _human)


def _human(doc: dict) -> str:
    a = doc["anchor"]
    lines = [f"{'seed':>4} {'acc':>7} {'n-cut':>7} {'shuffled':>9} {'std':>6} {'z':>7} {'p':>7} {'subs':>5} "
             f"{'imp':>4} {'coh':>4}"]
    for r in doc["rows"]:
        lines.append(f"{r['seed']:>4} {_num(r['test_accuracy'], 7, '.4f')} {_num(r['ncut'], 7, '.3f')} "
                     f"{_num(r['shuffled_mean'], 9, '.3f')} {_num(r['shuffled_std'], 6, '.3f')} {_num(r['z'], 7, '.2f')} {_num(r['p'], 7, '.3g')} "
                     f"{r['sub_clusters']:>5} {r['important']:>4} {r['coherent']['any']:>4}")
    lines.append(f"anchor (Filan et al.): n-cut {a['ncut'][0]} to {a['ncut'][1]}, shuffled {a['shuffled_mean'][0]} to "
                 f"{a['shuffled_mean'][1]}, z about {a['z'][0]:.0f} to {a['z'][1]:.0f}")
    lines += doc["summary"]
    lines.append(f"results: {doc['out']}/results.json, {doc['out']}/results.md ({doc['wall_s']:.0f} s)")
    return "\n".join(lines)


def _num(x, width: int, spec: str) -> str:
    return f"{'n/a':>{width}}" if x is None else f"{x:>{width}{spec}}"


@command.command("branches", short_help="Branch emergence: conv1 of a split vs an unsplit AlexNet on colour images.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/lab-branches", show_default=True,
              help="Folder for checkpoints, stage results, pictures and the results table (re-used on a re-run).")
@click.option("--seeds", default=None, metavar="LIST", help="Seeds to train, e.g. 0,1,2 or 0-4  [default: 0-4].")
@click.option("--epochs", type=click.IntRange(1), default=None, help="Training epochs of every network  [default: 12].")
@click.option("--data", default=None, metavar="DATA",
              help="Labelled colour images (photos, cifar10:DIR, folder:DIR, ...), read at 32 px  "
                   "[default: photos?scale=0.03-0.15, patches of the machine's photos].")
@click.option("--width", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Width multiplier of the small AlexNet (0.5: 32 conv1 filters, 16 a group)  [default: 0.5].")
@click.option("--quick", is_flag=True, help="Smoke run: 1 seed, 2 epochs on 1500 images of a quarter-width net, "
                                            "999 relabellings.")
@device_option
@ray_option
@json_option
def branches(out, seeds, epochs, data, width, quick, device, ray, as_json) -> None:
    """AlexNet's first two conv layers split in two groups that meet at conv3, trained on colour
    natural images, next to the same network unsplit, for every seed: per group the mean
    colourfulness and frequency of conv1's filters (which group is the colour one, permutation
    p), and for the unsplit net the SVD of conv2's |W| against the filters' colourfulness and
    frequency; writes OUT/results.json, OUT/results.md and each seed's filter pictures."""
    from ...labs.branches import FULL, QUICK, open_lab_data, run_branches, with_overrides
    from ...util.progress import enabled

    settings = with_overrides(QUICK if quick else FULL, seeds=parse_seeds(seeds) if seeds is not None else None,
                              epochs=epochs, data=data, width=width).checked()
    check_output(out, folder=True)
    lab_data = open_lab_data(settings)

    def log(message: str) -> None:
        if enabled():
            click.echo(f"lab branches: {message}", err=True)

    spelled = (f"netanatomy lab branches --out {out} --seeds {','.join(map(str, settings.seeds))} "
               f"--epochs {settings.epochs} --data '{settings.data}' --width {settings.width:g}"
               + (" --quick" if quick else ""))
    with cli_runner(ray, device) as runner:
        doc = run_branches(out, settings, device=device, log=log, command=spelled, data=lab_data, runner=runner)
    emit(doc, as_json, _branches_human)


def _branches_human(doc: dict) -> str:
    lines = [f"{'seed':>4} {'acc':>6} {'col g0':>7} {'col g1':>7} {'freq g0':>8} {'freq g1':>8} {'colour':>6} "
             f"{'p':>7} {'unsplit':>7} {'v0~col':>7}"]
    for r in doc["rows"]:
        s, u = r["split"], r["unsplit"]
        v0 = u["svd"]["raw"]["vector_0"].get("colourfulness") or {}
        lines.append(f"{r['seed']:>4} {_num(s['test_accuracy'], 6, '.3f')} {s['colourfulness'][0]:>7.3f} "
                     f"{s['colourfulness'][1]:>7.3f} {s['frequency'][0]:>8.3f} {s['frequency'][1]:>8.3f} "
                     f"{s['colour_group']:>6} {_num(s['colourfulness_p'], 7, '.3g')} "
                     f"{_num(u['test_accuracy'], 7, '.3f')} {_num(v0.get('r'), 7, '.2f')}")
    lines.append(f"article: {doc['anchor']['split']}")
    lines += doc["summary"]
    lines.append(f"results: {doc['out']}/results.json, {doc['out']}/results.md ({doc['wall_s']:.0f} s)")
    return "\n".join(lines)


def _names(text: str, option: str) -> tuple[str, ...]:
    names = tuple(comma_list(text))
    if not names:
        raise click.BadParameter("give at least one name", param_hint=option)
    return names


@command.command("banding", short_help="Weight banding: the simplified net and the article's 11 interventions.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/lab-banding", show_default=True,
              help="Folder for checkpoints, stage results, pictures and the results table (re-used on a re-run).")
@click.option("--data", "data", multiple=True, metavar="DATA",
              help="A labelled data set (fashion-mnist, photos, cifar10:DIR, folder:DIR, ...), read at 28 px; repeat "
                   "for several  [default: fashion-mnist and photos].")
@click.option("--variants", default=None, metavar="LIST",
              help="Variants to train, comma-separated  [default: all 12: baseline, rotate, no_gap, xpool, masks3, "
                   "masks5, masks16, attention, mask7x7, coordconv, split16, maxpool4096].")
@click.option("--seeds", default=None, metavar="LIST", help="Seeds, e.g. 0,1,2 or 0-4  [default: 0,1,2].")
@click.option("--epochs", type=click.IntRange(1), default=None, help="Training epochs of every network  [default: 5].")
@click.option("--width", type=click.IntRange(1), default=None,
              help="Channels of the first group; the last has 8x  [default: 16].")
@click.option("--jobs", type=click.IntRange(1), default=1, show_default=True,
              help="Networks trained at once, each in its own process on one torch thread (--ray: as many as "
                   "Ray has workers).")
@click.option("--quick", is_flag=True, help="Smoke run: 1 seed, 1 epoch on 1600 bundled Fashion-MNIST images, width 4, "
                                            "99 permutations (under two minutes).")
@device_option
@ray_option
@json_option
def banding(out, data, variants, seeds, epochs, width, jobs, quick, device, ray, as_json) -> None:
    """The Weight Banding study's simplified net (six 3x3 conv groups, L2 pooling, global average
    pooling, linear) and each intervention, trained per data set and seed: the banding of the
    last three conv layers (H, V, H - V with a test against unit transposes, orientation, the
    kernels that carry it), test accuracy and NMF pictures of the last conv layer; writes
    OUT/results.json, OUT/results.md and OUT/banding_index.png beside the article's findings."""
    from ...labs.banding import FULL, QUICK, open_lab_data, run_banding, with_overrides
    from ...util.progress import enabled

    settings = with_overrides(QUICK if quick else FULL, data=tuple(data) or None,
                              variants=_names(variants, "--variants") if variants is not None else None,
                              seeds=parse_seeds(seeds) if seeds is not None else None,
                              epochs=epochs, width=width).checked()
    check_output(out, folder=True)
    lab_data = {spec: open_lab_data(spec, settings) for spec in settings.data}

    def log(message: str) -> None:
        if enabled():
            click.echo(f"lab banding: {message}", err=True)

    spelled = (f"netanatomy lab banding --out {out} " + " ".join(f"--data '{d}'" for d in settings.data)
               + f" --variants {','.join(settings.variants)} --seeds {','.join(map(str, settings.seeds))} "
               f"--epochs {settings.epochs} --width {settings.width} --jobs {jobs}" + (" --quick" if quick else ""))
    with cli_runner(ray, device, jobs=jobs) as runner:
        doc = run_banding(out, settings, device=device, jobs=jobs, log=log, command=spelled, data=lab_data,
                          runner=runner)
    emit(doc, as_json, _banding_human)


def _banding_human(doc: dict) -> str:
    lines = [f"{'data':<16} {'variant':<12} {'acc':>6} {'g6 H-V':>8} {'g6':>6} {'g5 H-V':>8} {'g5':>6} "
             f"{'article':<12} agrees"]
    calls = {"horizontal": "H", "vertical": "V", "none": "-"}
    for v in doc["variants"]:
        names = list(v["layers"])
        g6, g5 = v["layers"][names[-1]], v["layers"][names[-2]]
        lines.append(f"{v['data'][:16]:<16} {v['variant']:<12} {_num(v['test_accuracy']['mean'], 6, '.3f')} "
                     f"{_signed(g6['index']['mean'])} {''.join(calls[c] for c in g6['directions']):>6} "
                     f"{_signed(g5['index']['mean'])} {''.join(calls[c] for c in g5['directions']):>6} "
                     f"{v['expect']:<12} {'yes' if v['agrees'] else 'no'}")
    lines.append("H/V per seed: H - V significant (p <= 0.01, unit transposes) one way or the other; - neither")
    lines += [line for line in doc["summary"] if " agrees with the article" in line]
    lines.append(f"results: {doc['out']}/results.json, {doc['out']}/results.md ({doc['wall_s']:.0f} s)")
    return "\n".join(lines)


def _signed(x) -> str:
    return f"{'n/a':>8}" if x is None else f"{x:>+8.3f}"
