"""Data set spec strings, `name[:PATH][?key=value&key=value]`, and the readers they name.

Options every data set takes:
- `shuffle=1`: shuffle (seeded by the `seed` argument and the split) before `limit` applies;
- `limit=N`: keep the first N items (the smaller of this and the `limit` argument wins);
- `channels=1|3`: 1 turns RGB into one luma channel, 3 replicates a grey channel into RGB;
- `grey=1`: replace colour by its luma, keeping the channel count (the grey twin of a set);
- `size=N`: images N x N (readers that make images, folder, photos and gratings, make them at
  that size; the others are resized, bilinear with antialiasing, when a batch is read).
So colour photos become 1-channel 28 px images for a Fashion-MNIST model with
`photos?channels=1&size=28`; `with_options` writes such a spec.
Without `shuffle`, `limit` keeps the first N in the reader's own order (class-sorted for
image folders: add `shuffle=1` there).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UsageError, suggest
from ..util.seeding import derive
from . import bundled, cifar, folder, idx, photos, probes
from .dataset import ImageDataset

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLITS = ("train", "test", "val")

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
DIGIT_CLASSES = [str(i) for i in range(10)]


class Options:
    """The `?key=value` options of a spec; typed getters, and a check that none was misspelt."""

    def __init__(self, spec: str, pairs: dict[str, str]):
        self.spec, self.pairs = spec, dict(pairs)

    def _get(self, key: str) -> str | None:
        return self.pairs.get(key)

    def _fail(self, key: str, value: str, what: str) -> UsageError:
        return UsageError(f"option {key}={value!r} in data spec {self.spec!r} must be {what}")

    def text(self, key: str, default: str | None = None) -> str | None:
        value = self._get(key)
        return default if value is None else value

    def integer(self, key: str, default: int | None = None, minimum: int | None = None) -> int | None:
        value = self._get(key)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise self._fail(key, value, "an integer") from None
        if minimum is not None and number < minimum:
            raise self._fail(key, value, f"at least {minimum}")
        return number

    def number(self, key: str, default: float | None = None) -> float | None:
        value = self._get(key)
        if value is None:
            return default
        try:
            return float(value)
        except ValueError:
            raise self._fail(key, value, "a number") from None

    def flag(self, key: str, default: bool = False) -> bool:
        value = self._get(key)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on", ""):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise self._fail(key, value, "0 or 1")

    def numbers(self, key: str, default: list[float] | None = None) -> list[float] | None:
        value = self._get(key)
        if value is None:
            return default
        try:
            return [float(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise self._fail(key, value, "comma-separated numbers") from None

    def range(self, key: str, default: tuple[float, float]) -> tuple[float, float]:
        value = self._get(key)
        if value is None:
            return default
        parts = value.replace(":", "-").split("-")
        try:
            numbers = [float(p) for p in parts if p.strip()]
        except ValueError:
            raise self._fail(key, value, "a number or a range LOW-HIGH") from None
        if len(numbers) not in (1, 2):
            raise self._fail(key, value, "a number or a range LOW-HIGH")
        return (numbers[0], numbers[-1])

    def check_known(self, name: str, known: tuple[str, ...]) -> None:
        """Refuse a misspelt or foreign option before any slow reading starts."""
        unknown = sorted(set(self.pairs) - set(known))
        if unknown:
            raise UsageError(f"unknown option {unknown[0]!r} for data set {name}{suggest(unknown[0], known)}; "
                             f"it takes: {', '.join(sorted(known))}")


@dataclass(frozen=True)
class Spec:
    name: str
    path: str | None
    options: dict[str, str]
    text: str


def parse_spec(text: str) -> Spec:
    """Split 'name[:PATH][?key=value&...]' into its parts (no checking of the name)."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError("empty data spec: give e.g. bundled, fashion-mnist, cifar10:DIR or folder:DIR")
    body, _, query = text.strip().partition("?")
    name, sep, path = body.partition(":")
    options: dict[str, str] = {}
    for part in query.split("&") if query else []:
        if not part:
            continue
        key, _, value = part.partition("=")
        key = key.strip()
        if not key:
            raise UsageError(f"bad option {part!r} in data spec {text!r}: use key=value")
        if key in options:
            raise UsageError(f"option {key!r} given twice in data spec {text!r}")
        options[key] = value.strip()
    return Spec(name.strip().lower(), path if sep and path else None, options, text)


# -- readers: (spec, split, options, seed) -> ImageDataset -----------------------------------

def _idx_dataset(folder: Path, split: str, prefix: str, spec: Spec, label: str, classes: list[str] | None,
                 hint: str) -> ImageDataset:
    found = idx.read_idx_split(folder, split, prefix) if folder.is_dir() else None
    if found is None:
        where = folder if folder.is_dir() else f"{folder} (no such folder)"
        raise UsageError(f"no {label} {split} files in {where}: expected {idx.expected_names(split, prefix)}; {hint}")
    images, labels = found
    if classes is None:
        classes = [str(i) for i in range(int(labels.max()) + 1)] if labels.size else []
    return ImageDataset(images, labels, name=spec.name, split=split, classes=classes, spec=spec.text)


def _read_fashion(spec: Spec, split: str, opts: Options, seed: int) -> ImageDataset:
    folder = Path(spec.path).expanduser() if spec.path else DEFAULT_FASHION_MNIST_DIR
    return _idx_dataset(folder, split, "", spec, "Fashion-MNIST", FASHION_MNIST_CLASSES,
                        "install Debian's dataset-fashion-mnist or pass fashion-mnist:DIR (or use bundled)")


def _read_mnist(spec: Spec, split: str, opts: Options, seed: int) -> ImageDataset:
    if not spec.path:
        raise UsageError("mnist needs a folder: mnist:DIR with train-images-idx3-ubyte[.gz] and friends")
    return _idx_dataset(Path(spec.path).expanduser(), split, "", spec, "MNIST", DIGIT_CLASSES,
                        "pass the folder holding the MNIST IDX files as mnist:DIR")


def _read_idx(spec: Spec, split: str, opts: Options, seed: int) -> ImageDataset:
    if not spec.path:
        raise UsageError("idx needs a folder: idx:DIR with train-images-idx3-ubyte[.gz] and friends")
    return _idx_dataset(Path(spec.path).expanduser(), split, opts.text("prefix", ""), spec, "IDX", None,
                        "pass the folder holding the IDX files as idx:DIR")


def _read_bundled(spec: Spec, split: str, opts: Options, seed: int) -> ImageDataset:
    which = (spec.path or "fashion-mnist").lower()
    if which not in bundled.SAMPLES:
        raise UsageError(f"no bundled sample {which!r}{suggest(which, bundled.SAMPLES)}; "
                         f"bundled: {', '.join(bundled.SAMPLES)}")
    return _idx_dataset(bundled.RESOURCE_DIR, split, bundled.SAMPLES[which], spec, "bundled", FASHION_MNIST_CLASSES,
                        "the package's bundled sample is missing; reinstall netanatomy")


def _read_cifar10(spec: Spec, split: str, opts: Options, seed: int) -> ImageDataset:
    if not spec.path:
        raise UsageError("cifar10 needs a folder: cifar10:DIR, the python version (cifar-10-batches-py)")
    images, labels, classes = cifar.read_cifar10(Path(spec.path).expanduser(), split)
    return ImageDataset(images, labels, name=spec.name, split=split, classes=classes, spec=spec.text)


def _read_cifar100(spec: Spec, split: str, opts: Options, seed: int) -> ImageDataset:
    if not spec.path:
        raise UsageError("cifar100 needs a folder: cifar100:DIR, the python version (cifar-100-python)")
    images, labels, classes = cifar.read_cifar100(Path(spec.path).expanduser(), split, opts.text("labels", "fine"))
    return ImageDataset(images, labels, name=spec.name, split=split, classes=classes, spec=spec.text)


def _read_folder(spec: Spec, split: str, opts: Options, seed: int) -> ImageDataset:
    if not spec.path:
        raise UsageError("folder needs a directory: folder:DIR (DIR/CLASS/*.jpg, or DIR/train and DIR/val)")
    size = opts.integer("size", 224, minimum=1)
    resize = opts.integer("resize", size, minimum=1)
    if resize < size:
        raise UsageError(f"resize ({resize}) must be at least size ({size}) to crop a {size}x{size} centre")
    root = folder.split_folder(Path(spec.path).expanduser(), split)
    paths, labels, classes = folder.list_images(root)
    return ImageDataset(folder.FileSource(paths, size, resize), labels, name=spec.name, split=split,
                        classes=classes, spec=spec.text)


PHOTOS_SIZE = 32  # photo patches' side when neither the spec nor a model says


def _read_photos(spec: Spec, split: str, opts: Options, seed: int, default_size: int | None = None) -> ImageDataset:
    size = opts.integer("size", default_size or PHOTOS_SIZE, minimum=1)
    n = opts.integer("n", 10000, minimum=1)
    scale = opts.range("scale", (0.1, 0.5))
    flip = opts.flag("flip", True)
    builtin = opts.flag("builtin", True)
    sources = photos.photo_list(Path(spec.path).expanduser() if spec.path else None, builtin)
    images, labels, geometry = photos.sample_patches(sources, n, size, scale, flip,
                                                     seed=derive(seed, "photos", split))
    return ImageDataset(images, labels, name=spec.name, split=split, classes=[p.name for p in sources],
                        meta=geometry, spec=spec.text)


def _read_gratings(spec: Spec, split: str, opts: Options, seed: int) -> ImageDataset:
    size = opts.integer("size", 224, minimum=2)
    count = opts.numbers("orientations", None)
    orientations: int | list[float] = 8 if count is None else (
        int(count[0]) if len(count) == 1 and float(count[0]).is_integer() and count[0] >= 1 else count)
    frequencies = opts.numbers("frequencies", None)
    phases = opts.integer("phases", 4, minimum=1)
    contrast = opts.number("contrast", 1.0)
    images, info = probes.gratings(size, orientations, frequencies, phases, 1, contrast)
    array = (images.numpy() * 255.0 + 0.5).astype(np.uint8)  # stored like every other set: 8 bits, one channel
    angles = info["orientation_deg"][np.unique(info["orientation_index"], return_index=True)[1]]
    ds = ImageDataset(array, info["orientation_index"], name=spec.name, split=split,
                      classes=[f"{a:g}deg" for a in angles], meta=info, spec=spec.text)
    return ds.with_channels("rgb")  # 3 channels unless the spec says channels=1


COMMON_OPTIONS = ("shuffle", "limit", "channels", "grey", "size")


@dataclass(frozen=True)
class Reader:
    read: Callable[[Spec, str, Options, int], ImageDataset]
    usage: str
    help: str
    options: tuple[str, ...] = ()


READERS: dict[str, Reader] = {
    "bundled": Reader(_read_bundled, "bundled[:fashion-mnist]",
                      "2000 train + 2000 test Fashion-MNIST images shipped in the package"),
    "fashion-mnist": Reader(_read_fashion, "fashion-mnist[:DIR]",
                            f"Fashion-MNIST IDX files (default {DEFAULT_FASHION_MNIST_DIR})"),
    "mnist": Reader(_read_mnist, "mnist:DIR", "MNIST IDX files"),
    "idx": Reader(_read_idx, "idx:DIR[?prefix=P]", "any MNIST-format IDX files (labels named 0..K-1)", ("prefix",)),
    "cifar10": Reader(_read_cifar10, "cifar10:DIR", "CIFAR-10 python batches"),
    "cifar100": Reader(_read_cifar100, "cifar100:DIR[?labels=fine|coarse]", "CIFAR-100 python files", ("labels",)),
    "folder": Reader(_read_folder, "folder:DIR[?size=224&resize=N]",
                     "ImageNet-style DIR/CLASS/*.jpg, loaded lazily, RGB, centre-cropped", ("size", "resize")),
    "photos": Reader(_read_photos, "photos[:DIR][?size=32&n=10000&scale=0.1-0.5&flip=1&builtin=1]",
                     "seeded patches of colour photos (label = photo index; size: the model's input side in "
                     "commands that run a model, else 32)",
                     ("size", "n", "scale", "flip", "builtin")),
    "gratings": Reader(_read_gratings,
                       "gratings[?size=224&orientations=8&frequencies=1,2,4&phases=4&channels=3&contrast=1]",
                       "sinusoidal gratings (label = orientation index)",
                       ("size", "orientations", "frequencies", "phases", "contrast")),
}
ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10",
           "cifar-100": "cifar100", "imagefolder": "folder", "grating": "gratings"}


def dataset_help() -> str:
    """One line per data set spec, for CLI help."""
    width = max(len(r.usage) for r in READERS.values())
    lines = [f"{r.usage:<{width}}  {r.help}" for r in READERS.values()]
    lines.append("every spec also takes ?shuffle=1&limit=N&channels=1|3&grey=1&size=N (N x N images)")
    return "\n".join(lines)


def with_options(spec: str, **options: object) -> str:
    """`spec` with `?key=value` options set (replacing those it has), e.g. to say how to ask a
    data set for the images a model takes: with_options("photos", channels=1, size=28)."""
    body, _, query = spec.strip().partition("?")
    pairs = [p for p in query.split("&") if p] if query else []
    kept = [p for p in pairs if p.partition("=")[0].strip() not in options]
    kept += [f"{k}={v}" for k, v in options.items()]
    return body + ("?" + "&".join(kept) if kept else "")


def _channel_mode(opts: Options) -> str | None:
    channels = opts.integer("channels", None)
    grey = opts.flag("grey", False)
    if channels is not None and channels not in (1, 3):
        raise UsageError(f"option channels must be 1 or 3, not {channels}")
    if grey and channels is not None:
        raise UsageError("give either grey=1 or channels=N, not both")
    return "grey" if grey else {1: "luma", 3: "rgb", None: None}[channels]


def open_dataset(spec: str, split: str = "test", *, limit: int | None = None, seed: int = 0,
                 default_size: int | None = None) -> ImageDataset:
    """Open the data set a spec names (see `dataset_help()`), as an ImageDataset.

    `split` is "train" or "test" ("val" is accepted: the test split, or DIR/val of a folder).
    `limit` keeps the first N items (after a seeded shuffle when the spec says `?shuffle=1`).
    `default_size` is the side of photo patches when the spec gives no `size=` (the CLI passes
    the model's input size); the spec's own `size=` always wins.
    """
    parsed = parse_spec(spec)
    if split not in SPLITS:
        raise UsageError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    name = ALIASES.get(parsed.name, parsed.name)
    if name not in READERS:
        hint = suggest(parsed.name, list(READERS) + list(ALIASES))
        if not hint and ("/" in spec or Path(parsed.name).exists()):
            hint = f" (for a folder of images use folder:{spec})"
        raise UsageError(f"unknown data set {parsed.name!r}{hint}; known: {', '.join(READERS)}")
    parsed = Spec(name, parsed.path, parsed.options, parsed.text)
    opts = Options(spec, parsed.options)
    opts.check_known(name, COMMON_OPTIONS + READERS[name].options)
    shuffle = opts.flag("shuffle", False)
    spec_limit = opts.integer("limit", None, minimum=1)
    mode = _channel_mode(opts)
    size = opts.integer("size", None, minimum=1)
    reader_split = "test" if split == "val" and name != "folder" else split
    if name == "photos" and default_size is not None:
        ds = _read_photos(parsed, reader_split, opts, seed, int(default_size))
    else:
        ds = READERS[name].read(parsed, reader_split, opts, seed)
    if ds.classes is not None and len(ds) and (ds.targets.max() >= len(ds.classes) or ds.targets.min() < -1):
        raise UsageError(f"{spec}: labels run from {ds.targets.min()} to {ds.targets.max()} but there are "
                         f"{len(ds.classes)} classes")
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be at least 1, not {limit}")
    limits = [v for v in (limit, spec_limit) if v is not None]
    if shuffle:
        ds = ds.subset(np.random.default_rng(derive(seed, "shuffle", reader_split)).permutation(len(ds)))
    if limits and min(limits) < len(ds):
        ds = ds.subset(np.arange(min(limits)))
    if mode is not None:
        ds = ds.with_channels(mode)
    if size is not None and ds.image_shape[1:] != (size, size):
        ds = ds.resized(size)
    ds.split = split
    return ds
