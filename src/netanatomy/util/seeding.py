"""One seed in, the same numbers out: helpers that make every random choice explicit."""
from __future__ import annotations

import random

import numpy as np
import torch


def rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    """A NumPy generator from a seed (or the generator itself)."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def torch_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch global generators (for training loops that use them)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def derive(seed: int, *keys: int | str) -> int:
    """A child seed from a parent seed and keys, stable across runs and platforms."""
    material = [int(seed)] + [k if isinstance(k, int) else _str_key(k) for k in keys]
    return int(np.random.SeedSequence(material).generate_state(1, dtype=np.uint32)[0])


def _str_key(text: str) -> int:
    value = 0
    for byte in text.encode("utf-8"):
        value = (value * 131 + byte) % (2**31 - 1)
    return value
