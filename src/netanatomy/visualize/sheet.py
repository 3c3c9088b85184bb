"""Contact sheets: many small images in a labelled grid, as one picture a person can scan.

Built with PIL (no figure machinery: a sheet of 512 renders takes a fraction of a second).
Small images are enlarged with nearest-neighbour sampling so that their pixels stay visible.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import UsageError

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)


def to_hwc(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """[C, H, W] (torch or numpy, values in [0, 1]) -> uint8 [H, W, 3]; grey is repeated, >3 channels cut to 3."""
    if isinstance(image, torch.Tensor):
        arr = image.detach().cpu().float().numpy()
    else:
        arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise UsageError(f"an image must be C x H x W, got shape {arr.shape}")
    c = arr.shape[0]
    if c == 1:
        arr = np.repeat(arr, 3, axis=0)
    elif c == 2:
        arr = np.concatenate([arr, np.zeros_like(arr[:1])], axis=0)
    elif c > 3:
        arr = arr[:3]
    return (np.clip(arr.transpose(1, 2, 0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def contact_sheet(images: torch.Tensor | np.ndarray | Sequence, labels: Sequence[str] | None = None, *,
                  ncols: int | None = None, cell: int = 96, gap: int = 4, title: str | None = None,
                  font_size: int = 11, label_lines: int = 1) -> np.ndarray:
    """A grid of images [N, C, H, W] with a label under each; returns uint8 [H, W, 3] for `save_png`.

    Each image is scaled to fit a `cell` x `cell` square (aspect kept); `ncols` defaults to a
    near-square grid. Empty entries (None) leave a blank cell. A label wraps at spaces onto up
    to `label_lines` lines (the last one shortened with an ellipsis), so that a class name such
    as "fc:285 Egyptian cat" stays readable; the sheet is widened to its whole title.
    """
    from PIL import Image, ImageDraw

    items = list(images)
    n = len(items)
    if n == 0:
        raise UsageError("no images for a contact sheet")
    if labels is not None and len(labels) != n:
        raise UsageError(f"{len(labels)} labels for {n} images")
    ncols = max(1, int(ncols) if ncols else int(np.ceil(np.sqrt(n))))
    nrows = int(np.ceil(n / ncols))
    font = _font(font_size)
    lines = max(1, int(label_lines))
    label_h = lines * (font_size + 2) + 2 if labels is not None else 0
    title_h = font_size + 8 if title else 0
    width = ncols * (cell + gap) + gap
    if title:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        width = max(width, int(np.ceil(probe.textlength(title, font=font))) + 2 * gap)
    height = title_h + nrows * (cell + label_h + gap) + gap
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((gap, 3), title, fill=TEXT, font=font)
    for i, item in enumerate(items):
        r, c = divmod(i, ncols)
        x0 = gap + c * (cell + gap)
        y0 = title_h + gap + r * (cell + label_h + gap)
        if item is not None:
            tile = Image.fromarray(to_hwc(item))
            scale = cell / max(tile.width, tile.height)
            size = (max(1, round(tile.width * scale)), max(1, round(tile.height * scale)))
            resample = Image.NEAREST if scale >= 2 else Image.BILINEAR
            tile = tile.resize(size, resample)
            sheet.paste(tile, (x0 + (cell - size[0]) // 2, y0 + (cell - size[1]) // 2))
        if labels is not None and labels[i]:
            for row, text in enumerate(_wrap(draw, str(labels[i]), font, cell, lines)):
                draw.text((x0, y0 + cell + 1 + row * (font_size + 2)), text, fill=TEXT, font=font)
    return np.asarray(sheet)


def _wrap(draw, text: str, font, width: int, lines: int) -> list[str]:
    """`text` in at most `lines` lines of `width` pixels, broken at spaces; the last line is
    shortened with an ellipsis when the rest does not fit."""
    out: list[str] = []
    words = text.split(" ")
    while words and len(out) < lines - 1:
        line = words.pop(0)
        while words and draw.textlength(line + " " + words[0], font=font) <= width:
            line += " " + words.pop(0)
        if draw.textlength(line, font=font) > width:  # one word longer than the cell: let the last line cut it
            words.insert(0, line)
            break
        out.append(line)
    if words:
        out.append(_fit(draw, " ".join(words), font, width))
    return out


def _fit(draw, text: str, font, width: int) -> str:
    """Shorten `text` with an ellipsis until it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while len(text) > 1 and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


__all__ = ["contact_sheet", "to_hwc"]
