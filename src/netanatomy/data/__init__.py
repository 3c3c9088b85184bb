"""Data: readers behind the `--data SPEC` strings, probe stimuli, and the bundled sample.

    ds = open_dataset("bundled", "train")           # Fashion-MNIST sample shipped in the package
    ds = open_dataset("cifar10:~/data/cifar-10-batches-py?limit=5000&shuffle=1", "test", seed=0)
    x, y = ds.tensors()                              # whole set: float32 [N, C, H, W] in [0, 1], int64 [N]
    for x, y in make_loader(ds, batch_size=256, shuffle=True, seed=0): ...

`dataset_help()` lists every spec and its options.
"""
from .dataset import ImageDataset, make_loader
from .probes import colour_and_grey, gratings, luminance, to_grey
from .spec import READERS, dataset_help, open_dataset, parse_spec, with_options

__all__ = [
    "ImageDataset", "READERS", "colour_and_grey", "dataset_help", "gratings", "luminance", "make_loader",
    "open_dataset", "parse_spec", "to_grey", "with_options",
]
