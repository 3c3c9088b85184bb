"""A figure of a layer's rotation families: one row per family, its members' filters in angle order.

Laid out in inches from measured text widths, so that no text or image overlaps another at
any family count or size: a header per family at the left (kind, size, period, orientation
of the reference, angle resolution), then the members side by side, each labelled with its
unit, its angle from the reference and its match. First-layer filters (3 input channels) are
the RGB images they respond to most; deeper kernels are summed over input channels and drawn
on one diverging scale with a colour bar.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..core.equivariance import angle_resolution
from ..core.pictures import filters_to_rgb, upscale

__all__ = ["MAX_FAMILIES", "family_figure", "resolution_text"]

MAX_FAMILIES = 24      # families drawn, largest first
_PER_LINE = 12         # members in one line of a row; a larger family wraps
_MAX_MEMBERS = 48      # members drawn of one family; the rest are counted

# sizes in inches
_CELL = 0.78           # one filter
_GAP = 0.18            # between filters
_LABEL = 0.34          # two label lines under a filter
_MARGIN = 0.3
_DPI = 150
_BAR_H = 0.75          # a horizontal colour bar with its ticks and label (deeper layers)
_DEG = "\N{DEGREE SIGN}"

_REF, _DUP, _OTHER = "#111111", "#e07b00", "#a0a0a0"
_TITLE_PT, _SUB_PT, _HEAD_PT, _LABEL_PT, _NOTE_PT, _CAPTION_PT = 11.0, 8.5, 8.0, 7.8, 7.0, 7.5


def _text_width(text: str, size: float, weight: str = "normal") -> float:
    """Width in inches of `text` set in matplotlib's default font (with a margin: Agg's hinted
    glyphs come out a few percent wider than their outlines)."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    width, _, _ = TextToPath().get_text_width_height_descent(text, FontProperties(size=size, weight=weight),
                                                             ismath=False)
    return 1.08 * width / 72.0


def _wrap(text: str, size: float, width: float) -> list[str]:
    """Greedy word wrap to `width` inches, by measured widths."""
    lines: list[str] = []
    for word in text.split():
        trial = f"{lines[-1]} {word}" if lines else word
        if lines and _text_width(trial, size) <= width:
            lines[-1] = trial
        else:
            lines.append(word)
    return lines


def _line_height(size: float) -> float:
    return size * 1.35 / 72.0


def resolution_text(mode: str, resolution: float, k: int, step: float | None = None, deg: str = " deg") -> str:
    """Why angles are shown to `resolution`: the kernel size, the search step, or quarter turns."""
    if mode != "any angle":
        return f"angles in quarter turns (90{deg}): deeper layers are compared at exact rotations only"
    if step is not None and step >= resolution and step > angle_resolution(k):
        return f"angles to the nearest {resolution:g}{deg}: the search step (--step)"
    return f"angles to the nearest {resolution:g}{deg}: a {k}x{k} kernel resolves no finer"


def _family_dict(f: Any) -> dict:
    return f.to_dict() if hasattr(f, "to_dict") else dict(f)


def _members(f: dict) -> list[tuple[int, float, float]]:
    """(unit, angle, score) in angle order, the reference first among those at 0 degrees."""
    rows = [(int(u), float(a), float(s)) for u, a, s in zip(f["units"], f["angles"], f["scores"])]
    return sorted(rows, key=lambda r: (r[1], r[0] != int(f["reference"])))


def _deg(x: float) -> str:
    return f"{float(x):g}{_DEG}"


def _header(i: int, f: dict, resolution: float | None) -> list[tuple[str, dict]]:
    """The lines of a family's header with their text styles."""
    dups = len(f.get("duplicates") or [])
    if f.get("kind") == "duplicates":
        kind = f"duplicates (copies at 0{_DEG})"
    else:
        kind = "rotated copies" + (f", {dups} duplicate{'s' if dups > 1 else ''}" if dups else "")
    plain = {"size": _HEAD_PT}
    lines = [(f"family {i}  \N{MIDDLE DOT}  {len(f['units'])} units", {"size": _HEAD_PT + 0.5, "weight": "bold"}),
             (kind, plain)]
    period = f.get("period")
    lines.append((f"period {_deg(period)}" if period else f"no period (the same turned 45{_DEG})", plain))
    orient, coh = f.get("orientation"), f.get("coherence")
    if orient is not None:
        lines.append((f"ref {f['reference']} oriented {orient:.0f}{_DEG}, coherence {coh:.2f}", plain))
    elif coh is not None:
        lines.append((f"ref {f['reference']}: no orientation (coherence {coh:.2f})", plain))
    else:
        lines.append((f"reference: unit {f['reference']}", plain))
    res = f.get("resolution", resolution)
    if res:
        lines.append((f"angles in {_deg(res)} steps", {"size": _HEAD_PT, "color": "0.4"}))
    return lines


def _caption(rgb: bool, note: str | None, more: int) -> list[str]:
    colours = ("Colours: each filter as the RGB image it responds to most (grey = 0; per filter 0.5 + w / 2 max|w|)."
               if rgb else
               "Colours: each kernel summed over its input channels, red > 0 > blue, on one scale for all filters.")
    frames = (f"Frames: black = the family's reference, orange = a duplicate of it (at 0{_DEG}), grey = a rotated "
              f"copy. Under each filter: unit @ angle (counter-clockwise from the reference, as displayed) and "
              f"its cosine match with the rotated reference.")
    if note:
        frames += f" {note[0].upper()}{note[1:]}."
    parts = [colours, frames]
    if more:
        parts.append(f"{more} smaller famil{'y' if more == 1 else 'ies'} not drawn (all are in families.json).")
    return parts


def family_figure(filters: torch.Tensor | np.ndarray, families: Sequence[Any], *, title: str,
                  subtitle: str | None = None, resolution: float | None = None, note: str | None = None,
                  max_families: int = MAX_FAMILIES) -> Any:
    """The figure of `families` (RotationFamily or their dicts) of a layer whose weights are
    `filters` [U, C, k, k].

    `title` names the model and layer, `subtitle` the search (threshold, mode); `resolution`
    is the layer's angle step (a family's own wins) and `note` says why (`resolution_text`),
    in the caption. The first `max_families` families are drawn (the largest: families come
    sorted by size). Returns a matplotlib Figure (Agg backend, no display needed).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import cm, colors
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    w = filters.detach().cpu().float().numpy() if isinstance(filters, torch.Tensor) else np.asarray(filters, np.float32)
    if w.ndim != 4:
        raise ValueError(f"filters must be [units, C, k, k], got shape {w.shape}")
    fams = [_family_dict(f) for f in families]
    shown = fams[:max_families]
    rgb = w.shape[1] == 3
    factor = max(1, int(round(48 / max(int(w.shape[-1]), 1))))

    drawn = sorted({u for f in shown for u, _, _ in _members(f)[:_MAX_MEMBERS]})
    vmax = 1.0
    if rgb:
        images = dict(zip(drawn, upscale(filters_to_rgb(w[drawn]), factor))) if drawn else {}
    else:
        summed = w.sum(axis=1)
        images = {u: np.kron(summed[u], np.ones((factor, factor))) for u in drawn}
        vmax = float(max((np.abs(summed[u]).max() for u in drawn), default=0.0)) or 1.0

    # -- layout (inches) --
    headers = [_header(i, f, resolution) for i, f in enumerate(shown)]
    header_w = max((_text_width(t, s["size"], s.get("weight", "normal")) for h in headers for t, s in h),
                   default=2.0) + 0.3
    lines = [max(1, -(-min(len(f["units"]), _MAX_MEMBERS) // _PER_LINE)) for f in shown]
    cols = max((min(len(f["units"]), _PER_LINE) for f in shown), default=0)
    line_h = _CELL + _LABEL + 0.1
    header_h = [sum(_line_height(s["size"]) for _, s in h) for h in headers]
    extra = [0.2 if len(f["units"]) > _MAX_MEMBERS else 0.0 for f in shown]
    row_h = [max(n * line_h - 0.1 + e, hh) + 0.3 for n, hh, e in zip(lines, header_h, extra)]
    body_w = cols * (_CELL + _GAP) - (_GAP if cols else 0.0)
    bar = not rgb and bool(shown)
    subtitle = subtitle or ""
    subtitle += ("; " if subtitle else "") + (
        f"{len(fams)} famil{'y' if len(fams) == 1 else 'ies'}" + (f", the {len(shown)} largest drawn"
                                                                     if len(shown) < len(fams) else ""))
    width = max(_MARGIN + header_w + body_w + _MARGIN,
                2 * _MARGIN + _text_width(title, _TITLE_PT, "bold"),
                2 * _MARGIN + _text_width(subtitle, _SUB_PT), 6.0)
    caption = [line for part in (_caption(rgb, note, len(fams) - len(shown)) if shown else [])
               for line in _wrap(part, _CAPTION_PT, width - 2 * _MARGIN)]
    title_h = 0.25 + _line_height(_TITLE_PT) + _line_height(_SUB_PT) + 0.15
    empty_h = 0.0 if shown else 0.5
    height = (title_h + sum(row_h) + empty_h + (_BAR_H if bar else 0.0)
              + 0.15 + _line_height(_CAPTION_PT) * len(caption) + 0.2)
    fig = Figure(figsize=(width, height), dpi=_DPI, facecolor="white")

    def text(x: float, y: float, s: str, **kw: Any) -> None:
        """Text whose anchor is x inches from the left and y inches from the top."""
        kw.setdefault("va", "top")
        fig.text(x / width, 1 - y / height, s, parse_math=False, **kw)

    def axes(x: float, y: float, w_in: float, h_in: float):
        return fig.add_axes((x / width, 1 - (y + h_in) / height, w_in / width, h_in / height))

    text(_MARGIN, 0.25, title, size=_TITLE_PT, weight="bold")
    text(_MARGIN, 0.25 + _line_height(_TITLE_PT) + 0.02, subtitle, size=_SUB_PT, color="0.3")

    y = title_h
    x0 = _MARGIN + header_w
    for i, (f, head, rh) in enumerate(zip(shown, headers, row_h)):
        fig.add_artist(Line2D([_MARGIN / width, 1 - _MARGIN / width], [1 - y / height] * 2, color="0.82", lw=0.8))
        ty = y + 0.15
        for t, style in head:
            text(_MARGIN, ty, t, **style)
            ty += _line_height(style["size"])
        members = _members(f)
        dups = {int(u) for u in f.get("duplicates") or []}
        ref = int(f["reference"])
        for j, (unit, angle, score) in enumerate(members[:_MAX_MEMBERS]):
            line, col = divmod(j, _PER_LINE)
            x = x0 + col * (_CELL + _GAP)
            top = y + 0.15 + line * line_h
            ax = axes(x, top, _CELL, _CELL)
            if rgb:
                ax.imshow(images[unit], interpolation="nearest")
            else:
                ax.imshow(images[unit], cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            is_ref, is_dup = unit == ref, unit in dups
            colour = _REF if is_ref else _DUP if is_dup else _OTHER
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(2.2 if is_ref or is_dup else 0.9)
            cx = x + _CELL / 2
            text(cx, top + _CELL + 0.05, f"{unit} @ {_deg(angle)}", ha="center", size=_LABEL_PT,
                 weight="bold" if is_ref else "normal")
            label = "reference" if is_ref else f"dup, {score:.2f}" if is_dup else f"{score:.2f}"
            text(cx, top + _CELL + 0.05 + _line_height(_LABEL_PT), label, ha="center", size=_NOTE_PT,
                 color=_DUP if is_dup else "0.3")
        if len(members) > _MAX_MEMBERS:
            text(x0, y + 0.15 + lines[i] * line_h - 0.05, f"+ {len(members) - _MAX_MEMBERS} more members",
                 size=_NOTE_PT, color="0.3")
        y += rh
    fig.add_artist(Line2D([_MARGIN / width, 1 - _MARGIN / width], [1 - y / height] * 2, color="0.82", lw=0.8))
    if not shown:
        text(_MARGIN, y + 0.15, "no family found at this threshold", size=10, color="0.3")
        y += empty_h

    if bar:
        cax = axes(x0, y + 0.2, min(max(body_w, 2.0), 3.0), 0.12)
        cbar = fig.colorbar(cm.ScalarMappable(norm=colors.Normalize(-vmax, vmax), cmap="RdBu_r"), cax=cax,
                            orientation="horizontal")
        cbar.set_label("weight, summed over input channels", size=_NOTE_PT)
        cbar.ax.tick_params(labelsize=_NOTE_PT)
        y += _BAR_H

    y += 0.15
    for line in caption:
        text(_MARGIN, y, line, size=_CAPTION_PT, color="0.25")
        y += _line_height(_CAPTION_PT)
    return fig
