"""The atlas site: static HTML pages over a survey's `atlas.json`, browsable from the file system
or from `netanatomy serve`.

The survey writes `DIR/atlas.json` and its figures under `DIR/files/`; `build_site(DIR)` turns
them into `index.html`, `layers/LAYER/index.html`, `layers/LAYER/units/N.html` and
`clusters/ID.html`, with the raw JSON of each layer and cluster beside its page. Every link is
relative and percent-encoded, so the folder works wherever it is copied and whatever the layer
names hold (`features.3`, `relu@1`). Nothing is loaded from the network. The search box reads an
index shipped as a script that sets a global (Chromium refuses `fetch()` of `file://` URLs).

`atlas.json` is checked and completed once (`normalize_atlas`); everything after it assumes
clean input. A figure that is absent, missing on disk or outside the folder becomes a short
"not computed: reason" line, never a broken image.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import unicodedata
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..util.io import _umask, dumps, save_figure

__all__ = ["ATLAS_VERSION", "build_site", "layer_dir", "load_atlas", "normalize_atlas", "relative_href"]

ATLAS_VERSION = 1
SitePath = tuple[str, ...]          # a file inside the atlas as raw (unencoded) path segments
INPUT = "input"                     # the name `reads` and `upstream` give the model's input
WEIGHTED = ("conv", "linear")       # kinds of layer that have weights of their own
STATIC = Path(__file__).with_name("static")
ASSETS = ("assets",)
INDEX_JS = "search-index.js"

# ---------------------------------------------------------------------------------------------
# the atlas document: read and completed once, at the boundary


def load_atlas(out_dir: str | Path) -> dict[str, Any]:
    """Read and normalize `out_dir/atlas.json`; a missing or malformed file is the user's error."""
    path = Path(out_dir) / "atlas.json"
    if not path.is_file():
        raise UsageError(f"{path} not found (make an atlas with 'netanatomy survey MODEL --out {out_dir}')")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path} is not valid JSON: {exc}") from None
    return normalize_atlas(doc, source=str(path))


def normalize_atlas(doc: Any, source: str = "atlas.json") -> dict[str, Any]:
    """Check the version and the required fields, and give every optional field its empty value,
    so that the page builders never have to ask whether a key exists."""
    if not isinstance(doc, dict):
        raise UsageError(f"{source}: expected a JSON object, got {type(doc).__name__}")
    version = doc.get("version")
    if version != ATLAS_VERSION:
        raise UsageError(f"{source}: atlas version {version!r} is not {ATLAS_VERSION} (re-run 'netanatomy survey')")
    if not isinstance(doc.get("layers"), list):
        raise UsageError(f"{source}: 'layers' must be a list")
    model = {"name": "model", "weights": None, "input_shape": None, "classes": None, "data": None,
             **_object(doc.get("model"), "model", source)}
    survey = {"seconds": None, "budget_s": None, **_object(doc.get("survey"), "survey", source)}
    survey["parts"] = _object(survey.get("parts"), "survey.parts", source)
    layers = [_normalize_layer(lay, i, source) for i, lay in enumerate(doc["layers"])]
    names = [lay["name"] for lay in layers]
    if len(set(names)) != len(names):
        raise UsageError(f"{source}: layer names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    units = {str(layer): {str(u): _normalize_unit(_object(e, f"units[{layer!r}][{u!r}]", source))
                          for u, e in _object(per, f"units[{layer!r}]", source).items()}
             for layer, per in _object(doc.get("units"), "units", source).items()}
    clusters = [_normalize_cluster(c, source) for c in doc.get("clusters") or []]
    return {"version": version, "model": model, "survey": survey, "headlines": list(doc.get("headlines") or []),
            "layers": layers, "units": units, "clusters": clusters, "clusterability": doc.get("clusterability")}


def _object(value: Any, what: str, source: str) -> dict[str, Any]:
    """`value` as a dict (None is empty); anything else is a malformed atlas, said in one line."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"{source}: '{what}' must be an object, got {type(value).__name__}")
    return dict(value)


def _normalize_layer(lay: Any, i: int, source: str) -> dict[str, Any]:
    if not isinstance(lay, dict) or not isinstance(lay.get("name"), str):
        raise UsageError(f"{source}: layers[{i}] needs a string 'name'")
    out = {"kind": "conv", "units": None, "kernel_size": None, "groups": 1, "depthwise": False, "reads": [],
           "branches": [], "banding": None, "figures": {}, "svd": None, "branch_stats": None, "clusters": {},
           "probe_rules": {}, **lay}
    for key in ("reads", "branches"):
        out[key] = list(out[key] or [])
    for key in ("figures", "clusters", "probe_rules"):
        out[key] = _object(out[key], f"layers[{i}].{key}", source)
    banding = out["banding"]
    if isinstance(banding, dict) and banding.get("p") is None and banding.get("p_value") is not None:
        out["banding"] = {**banding, "p": banding["p_value"]}  # the name `netanatomy banding` prints
    return out


def _normalize_unit(entry: dict[str, Any] | None) -> dict[str, Any]:
    out = {"render": None, "diversity": [], "examples": None, "weights": None, "probe": None, "branch": None,
           "cluster": None, "class_name": None, "upstream": [], "downstream": [], **(entry or {})}
    for key in ("diversity", "upstream", "downstream"):
        out[key] = list(out[key] or [])
    return out


def _normalize_cluster(c: Any, source: str) -> dict[str, Any]:
    if not isinstance(c, dict) or not isinstance(c.get("id"), int) or isinstance(c.get("id"), bool):
        raise UsageError(f"{source}: every cluster needs an integer 'id'")
    out = {"size": None, "units": {}, "importance": None, "coherence": None, "figures": {}, **c}
    out["units"] = {str(k): [int(u) for u in v] for k, v in (out["units"] or {}).items()}
    out["figures"] = _object(out["figures"], f"clusters[{c['id']}].figures", source)
    if out["size"] is None:
        out["size"] = sum(len(v) for v in out["units"].values())
    return out


# ---------------------------------------------------------------------------------------------
# names, paths and links


_UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f]")


def layer_dir(name: str) -> str:
    """The folder name of a layer's pages: the name itself whenever a file system allows it
    (users type it into URLs), else a cleaned name with a short hash so that two names never meet.
    """
    if name not in ("", ".", "..") and not _UNSAFE.search(name) and len(name.encode("utf-8")) <= 200 \
            and unicodedata.is_normalized("NFC", name):
        return name
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]
    cleaned = _UNSAFE.sub("_", unicodedata.normalize("NFC", name)).strip(".")
    cleaned = cleaned.encode("utf-8")[:120].decode("utf-8", errors="ignore") or "layer"
    return f"{cleaned}-{digest}"


def relative_href(target: SitePath, source: SitePath = ("index.html",), fragment: str = "") -> str:
    """The link from the page `source` to the file `target` (both site paths from the root): the
    shortest relative path, each segment percent-encoded (so `relu@1` and `a b` survive both
    file:// and the server)."""
    here, there = source[:-1], target[:-1]
    common = 0
    while common < min(len(here), len(there)) and here[common] == there[common]:
        common += 1
    parts = [".."] * (len(here) - common) + [urllib.parse.quote(p, safe="") for p in target[common:]]
    return "/".join(parts) + (f"#{urllib.parse.quote(fragment, safe='')}" if fragment else "")


def atlas_path(value: Any) -> SitePath | None:
    """A path the survey wrote into atlas.json as segments, or None when it could leave the folder."""
    if not isinstance(value, str) or not value or value.startswith(("/", "\\")) or "\\" in value or "\x00" in value:
        return None
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", value):  # a URL scheme or a drive letter
        return None
    parts = tuple(p for p in value.split("/") if p not in ("", "."))
    return None if not parts or ".." in parts else parts


def layer_page(name: str) -> SitePath:
    return ("layers", layer_dir(name), "index.html")


def unit_page(layer: str, unit: int) -> SitePath:
    return ("layers", layer_dir(layer), "units", f"{unit}.html")


def cluster_page(cid: int) -> SitePath:
    return ("clusters", f"{cid}.html")


# ---------------------------------------------------------------------------------------------
# numbers


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def fmt(x: Any, digits: int = 3) -> str:
    """A number for a reader: `digits` significant figures, powers of ten written out, '—' for none."""
    if x is None or isinstance(x, bool):
        return "—" if x is None else str(x)
    if isinstance(x, int):
        return f"{x:,}".replace(",", "\u2009")
    if not isinstance(x, float):
        return str(x)
    if not math.isfinite(x):
        return "—"
    text = f"{x:.{digits}g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        return f"{mantissa} × 10{str(int(exponent)).translate(_SUPERSCRIPT)}"
    return text


def fmt_p(p: Any) -> str:
    """A p-value with two significant figures (enough to compare with 0.05 or a published bound)."""
    return fmt(float(p), 2) if isinstance(p, (int, float)) and not isinstance(p, bool) else "—"


def fmt_pct(x: Any, digits: int = 3) -> str:
    return fmt(100.0 * float(x), digits) if isinstance(x, (int, float)) and not isinstance(x, bool) else "—"


def fmt_seconds(s: Any) -> str:
    if not isinstance(s, (int, float)) or isinstance(s, bool):
        return "—"
    return f"{s:.1f}" if s < 100 else f"{s:,.0f}".replace(",", "\u2009")


# ---------------------------------------------------------------------------------------------
# the site: what exists, where it lives, why something is missing


@dataclass
class Site:
    """The atlas document with the lookups every page needs (layers by name, unit pages that
    exist, each unit's cluster), and the files on disk figures may point to."""

    root: Path
    atlas: dict[str, Any]
    layers: dict[str, dict[str, Any]] = field(init=False)
    unit_pages: dict[str, list[int]] = field(init=False)
    unit_cluster: dict[tuple[str, int], int] = field(init=False)
    read_by: dict[str, list[str]] = field(init=False)

    def __post_init__(self) -> None:
        self.layers = {lay["name"]: lay for lay in self.atlas["layers"]}
        self.unit_cluster = {(layer, u): c["id"] for c in self.atlas["clusters"]
                             for layer, units in c["units"].items() for u in units}
        self.read_by = {name: [] for name in self.layers}
        for lay in self.atlas["layers"]:
            for r in lay["reads"]:
                if r in self.read_by and lay["name"] not in self.read_by[r]:
                    self.read_by[r].append(lay["name"])
        self.unit_pages = self._unit_pages()

    def _unit_pages(self) -> dict[str, list[int]]:
        """A page for every unit the atlas says anything about: its own entry, a cluster, or a
        connection from another unit's page (so that no link on any page leads nowhere)."""
        wanted: dict[str, set[int]] = {name: set() for name in self.layers}

        def add(layer: Any, unit: Any) -> None:
            if layer in wanted and _is_index(unit) and self._in_range(layer, int(unit)):
                wanted[layer].add(int(unit))

        for layer, per in self.atlas["units"].items():
            for u, entry in per.items():
                if u.isdigit():
                    add(layer, int(u))
                    for link in entry["upstream"] + entry["downstream"]:
                        add(link.get("layer"), link.get("unit"))
        for layer, u in self.unit_cluster:
            add(layer, u)
        return {name: sorted(units) for name, units in wanted.items() if units}

    def _in_range(self, layer: str, unit: int) -> bool:
        n = self.layers[layer]["units"]
        return unit >= 0 and (not isinstance(n, int) or unit < n)

    def has_unit_page(self, layer: Any, unit: Any) -> bool:
        return layer in self.unit_pages and _is_index(unit) and int(unit) in self.unit_pages[layer]

    def unit(self, layer: str, unit: int) -> dict[str, Any]:
        return self.atlas["units"].get(layer, {}).get(str(unit)) or _normalize_unit(None)

    def file(self, value: Any) -> tuple[SitePath | None, str | None]:
        """The site path of a file the survey wrote, or None and why it cannot be shown."""
        if value in (None, ""):
            return None, None
        path = atlas_path(value)
        if path is None:
            return None, f"the survey gave a path outside the atlas folder ({value})"
        if not self.root.joinpath(*path).is_file():
            return None, f"the file {value} is missing"
        return path, None

    def part_reason(self, part: str, layer: str | None = None) -> str | None:
        """Why a survey part produced nothing, from the survey's own record. A layer's own record
        comes first: `PART/LAYER` (or `PART:LAYER`), then a chunk `PART/...` whose `layers` list
        holds the layer (renders run in chunks of layers), then the part as a whole."""
        parts = self.atlas["survey"]["parts"]
        record = None
        if layer is not None:
            record = parts.get(f"{part}/{layer}") or parts.get(f"{part}:{layer}")
            record = record or next((r for name, r in parts.items() if name.startswith(f"{part}/")
                                     and isinstance(r, dict) and layer in (r.get("layers") or [])), None)
        record = record or parts.get(part)
        if not isinstance(record, dict) or str(record.get("status") or "done").startswith("done"):
            return None  # "done" and "done (re-used)": the part ran, so it is not why something is missing
        reason = record.get("reason")
        return f"the survey's {part} part was {record['status']}" + (f" ({reason})" if reason else "")

    def branch_of(self, layer: str, unit: int) -> str | None:
        for b in self.layers[layer]["branches"]:
            if isinstance(b.get("start"), int) and isinstance(b.get("stop"), int) \
                    and b["start"] <= unit < b["stop"] and self.layers[layer]["kind"] != "residual":
                return b.get("name")
        return None

    def branch_unit(self, layer: str, unit: int) -> tuple[str, int] | None:
        """The same unit in the layer of its branch (a concatenation's unit 3 may be its first
        branch's unit 3), when that branch is a layer of the atlas."""
        lay = self.layers[layer]
        if lay["kind"] != "concat":
            return None
        for b in lay["branches"]:
            start, stop = b.get("start"), b.get("stop")
            if isinstance(start, int) and isinstance(stop, int) and start <= unit < stop and b.get("name") in self.layers:
                return b["name"], unit - start
        return None

    def input_channel_name(self, unit: int) -> str:
        shape = self.atlas["model"]["input_shape"] or []
        if shape and shape[0] == 3 and 0 <= unit < 3:
            return ("red", "green", "blue")[unit]
        return "grey" if shape and shape[0] == 1 else f"channel {unit}"


def _is_index(x: Any) -> bool:
    return (isinstance(x, int) and not isinstance(x, bool) and x >= 0) or (isinstance(x, str) and x.isdigit())


# ---------------------------------------------------------------------------------------------
# one page's point of view: links and figures relative to where the page lives


@dataclass
class Page:
    """Helpers bound to one page's depth below the root, handed to its template."""

    site: Site
    path: SitePath

    @property
    def depth(self) -> int:
        return len(self.path) - 1

    @property
    def root(self) -> str:
        return "../" * self.depth

    def href(self, target: SitePath, fragment: str = "") -> str:
        return relative_href(target, self.path, fragment)

    def layer_href(self, name: str) -> str | None:
        return self.href(layer_page(name)) if name in self.site.layers else None

    def unit_href(self, layer: str, unit: Any) -> str | None:
        return self.href(unit_page(layer, int(unit))) if self.site.has_unit_page(layer, unit) else None

    def figure(self, value: Any, alt: str, caption: str, missing: str, *, pixelated: bool = False) -> dict[str, Any]:
        """A figure for the template: an image with alt text and caption, or the reason it is not there."""
        path, problem = self.site.file(value)
        if path is None:
            return {"src": None, "missing": problem or missing, "alt": alt, "caption": caption}
        return {"src": self.href(path), "missing": None, "alt": alt, "caption": caption, "pixelated": pixelated}

    def picture(self, value: Any) -> str | None:
        path, _ = self.site.file(value)
        return self.href(path) if path else None


# ---------------------------------------------------------------------------------------------
# the overview's diagram: layers top to bottom, the branches of a block side by side


def diagram_rows(site: Site, page: Page) -> list[dict[str, Any]]:
    """Rows of the overview diagram. A concatenation or residual sum becomes a block: one column
    per branch holding the chain of layers that only feed that branch, and the join beneath."""
    chains, members = _branch_chains(site)
    rows: list[dict[str, Any]] = []
    shape = site.atlas["model"]["input_shape"]
    rows.append({"type": "input", "label": "input" + (f" {'×'.join(map(str, shape))}" if shape else "")})
    for lay in site.atlas["layers"]:
        name = lay["name"]
        if name in members:
            continue
        if name in chains:
            columns = [{"label": label, "boxes": [_column_box(site, page, kind, m) for kind, m in column]}
                       for label, column in chains[name]]
            rows.append({"type": "block", "join": _box(site, page, lay), "columns": columns})
        else:
            rows.append({"type": "layer", "box": _box(site, page, lay)})
    return rows


def _column_box(site: Site, page: Page, kind: str, name: str) -> dict[str, Any]:
    if kind == "layer":
        return _box(site, page, site.layers[name])
    return {"type": kind, "name": name, "href": page.layer_href(name) if kind == "ref" else None}


def _branch_chains(site: Site) -> tuple[dict[str, list[tuple[str, list[tuple[str, str]]]]], set[str]]:
    """For each block layer, its columns [(label, [(kind, name), ...])], and every layer drawn
    inside a column (those get no row of their own)."""
    members: set[str] = set()
    chains: dict[str, list[tuple[str, list[tuple[str, str]]]]] = {}
    for lay in site.atlas["layers"]:
        if lay["kind"] not in ("concat", "residual") or len(lay["branches"]) < 2:
            continue
        columns = []
        for b in lay["branches"]:
            columns.append((_branch_label(lay, b), _walk_branch(site, lay["name"], b.get("name"), members)))
        chains[lay["name"]] = columns
    return chains, members


def _walk_branch(site: Site, join: str, start: Any, members: set[str]) -> list[tuple[str, str]]:
    """The chain of layers that feed only this branch, walked back from the branch's own layer."""
    if not isinstance(start, str) or start not in site.layers:
        return [("identity", str(start or "identity"))]
    chain: list[tuple[str, str]] = []
    current, reader = start, join
    while True:
        lay = site.layers[current]
        own = site.read_by[current] in ([], [reader])
        if current in members or not own or lay["kind"] in ("concat", "residual"):
            chain.insert(0, ("ref", current))
            break
        chain.insert(0, ("layer", current))
        members.add(current)
        reads = [r for r in lay["reads"] if r in site.layers]
        if len(lay["reads"]) != 1 or len(reads) != 1 or site.read_by[reads[0]] != [current] \
                or site.layers[reads[0]]["kind"] in ("concat", "residual"):
            break
        current, reader = reads[0], current
    return chain


def _branch_label(layer: dict[str, Any], b: dict[str, Any]) -> str:
    if layer["kind"] == "residual":
        return f"{b.get('name')}: summed into all {layer['units']} units"
    start, stop = b.get("start"), b.get("stop")
    span = f"units {start}–{stop - 1}" if isinstance(start, int) and isinstance(stop, int) else ""
    return f"{b.get('name')}: {span}" if span else str(b.get("name"))


def _box(site: Site, page: Page, lay: dict[str, Any]) -> dict[str, Any]:
    banding = lay["banding"] or {}
    orientation = banding.get("orientation")
    badge = {"horizontal": "H bands", "vertical": "V bands"}.get(orientation or "")
    groups = [{"label": str(b.get("name")), "units": b.get("units")} for b in lay["branches"]] \
        if lay["kind"] in WEIGHTED and 2 <= len(lay["branches"]) <= 8 else []  # grouped convs: towers in the box
    return {"type": "layer", "name": lay["name"], "href": page.layer_href(lay["name"]), "kind": lay["kind"],
            "meta": layer_meta(lay), "badge": badge, "badge_kind": orientation, "groups": groups}


def layer_meta(lay: dict[str, Any]) -> str:
    """'16 units · 3×3 conv', '32 units · 3×3 dw', '2 groups' ... in one short line."""
    bits = [f"{fmt(lay['units'])} units" if isinstance(lay["units"], int) else None]
    k = lay["kernel_size"]
    kernel = "×".join(map(str, k)) if isinstance(k, (list, tuple)) and k else None
    if lay["depthwise"]:
        bits.append(f"{kernel} dw" if kernel else "depthwise")
    elif kernel:
        bits.append(f"{kernel} {lay['kind']}")
    else:
        bits.append(lay["kind"])
    if isinstance(lay["groups"], int) and lay["groups"] > 1 and not lay["depthwise"]:
        bits.append(f"{lay['groups']} groups")
    return " · ".join(b for b in bits if b)


# ---------------------------------------------------------------------------------------------
# page contexts


def crumbs(page: Page, *items: tuple[str, SitePath | None]) -> list[dict[str, Any]]:
    out = [{"label": "overview", "href": page.href(("index.html",))}]
    return out + [{"label": label, "href": page.href(t) if t else None} for label, t in items]


def overview_context(site: Site, page: Page) -> dict[str, Any]:
    atlas = site.atlas
    return {"title": "overview", "crumbs": [], "model": model_facts(atlas["model"]),
            "diagram": diagram_rows(site, page), "headlines": [headline(site, page, h) for h in atlas["headlines"]],
            "survey": survey_summary(atlas["survey"]), "clusterability": clusterability_section(atlas["clusterability"]),
            "clusterability_reason": site.part_reason("clusterability") or "the survey did not measure it",
            "layers_table": [layer_row(site, page, lay) for lay in atlas["layers"]],
            "clusters_table": [cluster_row(page, c) for c in atlas["clusters"]],
            "clusters_reason": site.part_reason("clusters") or "the survey found no clusters"}


def clusterability_section(c: Any) -> dict[str, Any] | None:
    """The clusterability sentence's numbers, formatted; None when it was not measured."""
    if not isinstance(c, dict) or not _number(c.get("ncut")):
        return None
    p = c.get("p")
    return {"graph": str(c.get("graph") or "weight"), "k": c.get("k"), "ncut": fmt(c["ncut"]),
            "null_mean": fmt(c.get("null_mean")), "null_std": fmt(c.get("null_std")), "z": fmt(c.get("z")),
            "p": fmt_p(p), "shuffles": c.get("shuffles") or 0, "significant": _number(p) and p < 0.05}


def model_facts(model: dict[str, Any]) -> list[tuple[str, str]]:
    classes = model["classes"]
    facts = [("model", str(model["name"])), ("weights", str(model["weights"] or "the source's own"))]
    if model["input_shape"]:
        facts.append(("input (channels × height × width)", " × ".join(map(str, model["input_shape"]))))
    if classes:
        shown = ", ".join(map(str, classes[:10])) + (f", … ({len(classes)} in all)" if len(classes) > 10 else "")
        facts.append(("classes", shown))
    if model["data"]:
        facts.append(("data", str(model["data"])))
    return facts


def headline(site: Site, page: Page, h: Any) -> dict[str, Any]:
    """A finding and its link; the link may be a path (as the survey writes figures) or
    {"layer": L[, "unit": N]} / {"cluster": ID}, and is dropped when its page does not exist."""
    if isinstance(h, str):
        return {"text": h, "href": None}
    text, link = str(h.get("text", "")), h.get("link")
    target: SitePath | None = None
    if isinstance(link, dict):
        layer, unit, cid = link.get("layer"), link.get("unit"), link.get("cluster")
        if layer in site.layers:
            target = unit_page(layer, int(unit)) if site.has_unit_page(layer, unit) else layer_page(layer)
        elif isinstance(cid, int) and any(c["id"] == cid for c in site.atlas["clusters"]):
            target = cluster_page(cid)
    elif isinstance(link, str):
        target = _page_from_path(site, link)
    fragment = link.partition("#")[2] if isinstance(link, str) else ""
    return {"text": text, "href": page.href(target, urllib.parse.unquote(fragment)) if target else None}


def _page_from_path(site: Site, link: str) -> SitePath | None:
    """`layers/NAME/index.html`, `layers/NAME/units/N.html`, `clusters/ID.html` (raw names), or
    any other file of the atlas that exists."""
    path = atlas_path(urllib.parse.unquote(link.split("#")[0]))
    if path is None:
        return None
    if len(path) >= 2 and path[0] == "layers":
        name = path[1]
        if name in site.layers:
            rest = path[2:]
            if len(rest) == 2 and rest[0] == "units" and rest[1].endswith(".html") and rest[1][:-5].isdigit():
                unit = int(rest[1][:-5])
                return unit_page(name, unit) if site.has_unit_page(name, unit) else layer_page(name)
            return layer_page(name)
    if len(path) == 2 and path[0] == "clusters" and re.fullmatch(r"-?\d+\.html", path[1]):
        return path if any(c["id"] == int(path[1][:-5]) for c in site.atlas["clusters"]) else None
    if path == ("index.html",):
        return path
    return path if site.root.joinpath(*path).is_file() else None


def survey_summary(survey: dict[str, Any]) -> dict[str, Any]:
    rows = [{"part": name, "status": str(rec.get("status", "")), "seconds": fmt_seconds(rec.get("seconds")),
             "reason": _part_note(rec)} for name, rec in survey["parts"].items() if isinstance(rec, dict)]
    left = [r for r in rows if r["status"] != "done"]
    return {"seconds": fmt_seconds(survey["seconds"]), "budget": fmt_seconds(survey["budget_s"]), "rows": rows,
            "left_out": left}


def _part_note(rec: dict[str, Any]) -> str:
    """The reason a part did not run, and the layers of a part that ran in chunks of layers."""
    note = str(rec.get("reason") or "")
    layers = rec.get("layers")
    if isinstance(layers, list) and layers:
        shown = ", ".join(map(str, layers[:6])) + (f" and {len(layers) - 6} more" if len(layers) > 6 else "")
        note = f"{note}; layers {shown}" if note else f"layers {shown}"
    return note


def layer_row(site: Site, page: Page, lay: dict[str, Any]) -> dict[str, Any]:
    b = lay["banding"] or {}
    return {"name": lay["name"], "href": page.layer_href(lay["name"]), "meta": layer_meta(lay),
            "branches": len(lay["branches"]) if len(lay["branches"]) >= 2 else "",
            "H": fmt(b.get("horizontal")), "V": fmt(b.get("vertical")), "orientation": b.get("orientation") or "",
            "p": fmt_p(b.get("p")), "clusters": len(lay["clusters"]) or "",
            "pages": len(site.unit_pages.get(lay["name"], []))}


def cluster_row(page: Page, c: dict[str, Any]) -> dict[str, Any]:
    imp = [t.get("q", t.get("p")) for t in ((c["importance"] or {}).get("by_layer") or [])]
    coh = [t.get("p") for t in ((c["coherence"] or {}).get("by_layer") or [])]
    imp = [x for x in imp if isinstance(x, (int, float))]
    coh = [x for x in coh if isinstance(x, (int, float))]
    return {"id": c["id"], "href": page.href(cluster_page(c["id"])), "size": c["size"],
            "layers": ", ".join(f"{name} ({len(units)})" for name, units in c["units"].items()),
            "importance": fmt_p(min(imp)) if imp else "—", "coherence": fmt_p(min(coh)) if coh else "—"}


def layer_context(site: Site, page: Page, lay: dict[str, Any]) -> dict[str, Any]:
    name = lay["name"]
    return {"title": name, "crumbs": crumbs(page, (name, None)), "model": model_facts(site.atlas["model"]),
            "layer": lay, "meta": layer_meta(lay),
            "no_weights": None if lay["kind"] in WEIGHTED else f"a {lay['kind']} layer has no weights of its own",
            "reads": [connection(page, site, r) for r in lay["reads"]],
            "read_by": [connection(page, site, r) for r in site.read_by[name]],
            "banding": banding_section(site, page, lay), "weights": weights_section(site, page, lay),
            "svd": svd_section(site, page, lay), "branches": branches_section(site, page, lay),
            "clusters": layer_clusters(site, page, lay), "probe_rules": lay["probe_rules"],
            "families": families_section(page, lay),
            "grid": unit_grid(site, page, lay), "json": page.href(("layers", layer_dir(name), "layer.json"))}


def connection(page: Page, site: Site, name: str) -> dict[str, Any]:
    return {"name": "the input" if name == INPUT else name, "href": page.layer_href(name)}


def why_no_weights(site: Site, lay: dict[str, Any], part: str) -> str:
    """The reason a weight analysis has nothing for this layer, most specific first."""
    k = lay["kernel_size"]
    if lay["kind"] not in WEIGHTED:
        return f"a {lay['kind']} layer has no weights of its own"
    reason = site.part_reason(part, lay["name"])
    if reason:
        return reason
    if part == "banding" and isinstance(k, (list, tuple)) and k and max(k) <= 1:
        return "1×1 kernels have no spatial pattern to band"
    if part == "weights" and isinstance(k, (list, tuple)) and k and max(k) <= 1:
        return "1×1 kernels have no spatial picture (see the layer's SVD for who connects to whom)"
    if part == "weights" and lay["kind"] == "linear":
        return "a linear layer's weights are drawn only when it reads a map"
    if part == "banding" and lay["kind"] == "linear":
        return "a linear layer fed by pooled features has no kernels"
    if part == "svd" and lay["reads"] == [INPUT]:
        return "it reads the input image, so there is no lower layer's units to place"
    return "the survey gave no result for this layer"


def banding_section(site: Site, page: Page, lay: dict[str, Any]) -> dict[str, Any]:
    b = lay["banding"]
    k = lay["kernel_size"]
    chance = None
    if isinstance(k, (list, tuple)) and len(k) == 2 and k[0] * k[1] > 1:
        chance = {"H": fmt((k[0] - 1) / (k[0] * k[1] - 1)), "V": fmt((k[1] - 1) / (k[0] * k[1] - 1))}
    rows = []
    if b:
        rows = [("H: share of kernel energy in row means (horizontal bands)", fmt(b.get("horizontal")),
                 chance["H"] if chance else "—"),
                ("V: share in column means (vertical bands)", fmt(b.get("vertical")), chance["V"] if chance else "—"),
                ("index H − V", fmt(b.get("index")), "0")]
    extra = [("orientation", str(b.get("orientation") or "—")), ("permutation p", fmt_p(b.get("p"))),
             ("effective kernels (equal-energy kernels giving the same spread)", fmt(b.get("effective_kernels"))),
             ("non-constant kernels with own H > own V (%)", fmt_pct(b.get("share_h_over_v")))] if b else []
    figure = page.figure(lay["figures"].get("banding"), f"Weight banding figure for {lay['name']}",
                         "The survey's banding figure: the share of the kernels' energy in row means (H) and "
                         "column means (V), against chance for the kernel size.",
                         why_no_weights(site, lay, "banding"))
    return {"rows": rows, "extra": extra, "missing": None if b else why_no_weights(site, lay, "banding"),
            "figure": figure if b or lay["figures"].get("banding") else None}


def weights_section(site: Site, page: Page, lay: dict[str, Any]) -> dict[str, Any]:
    return page.figure(lay["figures"].get("weights"), f"NMF weight pictures of every unit of {lay['name']}",
                       f"Weights of each unit of {lay['name']} reduced to three colours by one NMF shared by the "
                       "layer (positive and negative parts of each input channel are separate factors' inputs), "
                       "so a colour means the same input mix in every picture.",
                       why_no_weights(site, lay, "weights"))


def svd_section(site: Site, page: Page, lay: dict[str, Any]) -> dict[str, Any]:
    svd = lay["svd"]
    figure = page.figure(lay["figures"].get("svd"), f"Placement of {lay['name']}'s input units by singular vectors",
                         f"Units placed by the first singular vectors of |W| summed over positions "
                         f"({lay['name']} × {(svd or {}).get('lower') or 'its input'}).",
                         why_no_weights(site, lay, "svd"))
    if not svd:
        return {"missing": why_no_weights(site, lay, "svd"), "figure": figure if lay["figures"].get("svd") else None}
    shares = [{"vector": i, "share": fmt_pct(s)} for i, s in enumerate(svd.get("shares") or [])]
    stats: list[str] = []
    rows = []
    for vector, props in (svd.get("correlations") or {}).items():
        for prop, values in (props or {}).items():
            values = values if isinstance(values, dict) else {"value": values}
            stats += [s for s in values if s not in stats]
            rows.append({"vector": vector.replace("_", " "), "property": prop, "values": values})
    for r in rows:
        r["cells"] = [fmt_p(r["values"].get(s)) if s.endswith("_p") or s == "p" else fmt(r["values"].get(s))
                      for s in stats]
    lower = svd.get("lower")
    return {"missing": None, "lower": connection(page, site, lower) if lower else None, "shares": shares,
            "stats": [s.replace("_", " ") for s in stats], "correlations": rows, "figure": figure}


def branches_section(site: Site, page: Page, lay: dict[str, Any]) -> dict[str, Any] | None:
    """The layer's branches side by side with their unit ranges, and the branch statistics."""
    branches = lay["branches"]
    if len(branches) < 2:
        return None
    total = sum(int(b.get("units") or 0) for b in branches) or 1
    rows = [{"name": b.get("name"), "href": page.layer_href(b.get("name")) if b.get("name") != lay["name"] else None,
             "kind": b.get("kind", ""), "span": _span(b, lay), "units": b.get("units"),
             "share": fmt_pct((b.get("units") or 0) / total), "width": round(100.0 * (b.get("units") or 0) / total, 2)}
            for b in branches]
    stats = lay["branch_stats"]
    corr = (stats or {}).get("correlation")
    tests = sorted((stats or {}).get("tests") or [], key=lambda t: (t.get("p") is None, t.get("p") or 0))
    tests = [{"branch": t.get("branch"), "category": t.get("category"), "count": t.get("count"),
              "expected": fmt(t.get("expected")), "p": fmt_p(t.get("p")), "q": fmt_p(t.get("q")),
              "significant": isinstance(t.get("q"), (int, float)) and t["q"] < 0.05} for t in tests]
    figures = []
    for key, alt, caption in (
            ("branch_correlation", f"Correlation of {lay['name']}'s units, grouped by branch",
             "Correlation of the units' activations over the data, units grouped by branch; lines mark the "
             "branch boundaries."),
            ("branch_categories", f"Share of each probe category in each branch of {lay['name']}",
             "Share of each branch's units in each probe category; the tick is the layer's share (chance), "
             "stars mark enrichment after Benjamini-Hochberg."),
            ("branch_svd", f"Units of the layer below {lay['name']} placed by singular vectors, coloured by branch",
             "SVD of |W| into this layer's branches: lower units placed by the first singular vectors, "
             "coloured by the branch they feed most.")):
        if lay["figures"].get(key):
            figures.append(page.figure(lay["figures"][key], alt, caption, ""))
    return {"rows": rows, "residual": lay["kind"] == "residual", "stats": stats is not None,
            "missing": site.part_reason("branches", lay["name"]) or "the survey ran no branch statistics on this layer",
            "correlation": {"within": fmt((corr or {}).get("within")), "between": fmt((corr or {}).get("between")),
                            "p": fmt_p((corr or {}).get("p"))} if corr else None,
            "tests": tests, "figures": figures}


def _span(b: dict[str, Any], lay: dict[str, Any]) -> str:
    if lay["kind"] == "residual":
        return "all units (summed)"
    start, stop = b.get("start"), b.get("stop")
    return f"{start}–{stop - 1}" if isinstance(start, int) and isinstance(stop, int) else "—"


def families_section(page: Page, lay: dict[str, Any]) -> dict[str, Any] | None:
    """Rotation families (units that are rotated copies of each other), when the survey found any."""
    found = lay.get("families")
    if not found and not lay["figures"].get("families"):
        return None
    families = (found or {}).get("families") if isinstance(found, dict) else None
    families = families if isinstance(families, list) else []
    rows = [{"units": ", ".join(map(str, f.get("units", []))), "angles": ", ".join(fmt(float(a), 3) for a in
                                                                             f.get("angles", []) if _number(a))}
            for f in families if isinstance(f, dict)]
    figure = page.figure(lay["figures"].get("families"), f"Rotation families of {lay['name']}",
                         "Families of units whose weights are rotated copies of each other, each with its angles.",
                         "the survey drew no figure of the families")
    return {"count": len(families), "rows": rows, "figure": figure}


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def layer_clusters(site: Site, page: Page, lay: dict[str, Any]) -> dict[str, Any]:
    sizes = {c["id"]: c["size"] for c in site.atlas["clusters"]}
    rows = []
    for cid, count in sorted(lay["clusters"].items(), key=lambda kv: -int(kv[1])):
        cid_i = int(cid)
        size = sizes.get(cid_i)
        rows.append({"id": cid_i, "href": page.href(cluster_page(cid_i)) if cid_i in sizes else None, "count": count,
                     "of_cluster": fmt_pct(count / size) if size else "—",
                     "of_layer": fmt_pct(count / lay["units"]) if isinstance(lay["units"], int) and lay["units"] else "—"})
    reason = site.part_reason("clusters") or "none of this layer's units are in a cluster"
    return {"rows": rows, "missing": reason}


def unit_grid(site: Site, page: Page, lay: dict[str, Any]) -> dict[str, Any]:
    """Every unit with a page, shown by its feature visualization or, without one, its weights."""
    name = lay["name"]
    cells = []
    for u in site.unit_pages.get(name, []):
        entry = site.unit(name, u)
        render, weights = page.picture(entry["render"]), page.picture(entry["weights"])
        what = "feature visualization" if render else "weight picture" if weights else None
        cells.append({"unit": u, "href": page.href(unit_page(name, u)), "src": render or weights,
                      "alt": f"{what} of {name} unit {u}" if what else "",
                      "note": entry["class_name"] or entry["branch"] or ""})
    pictured = sum(1 for c in cells if c["src"])
    render_reason = site.part_reason("render", name) or site.part_reason("weights", name) \
        or "the survey drew no picture for this layer's units"
    grid_figure = page.figure(lay["figures"].get("render_grid"), f"Feature visualizations of {name}",
                              f"Feature visualizations of {name}'s units in unit order.", "") \
        if lay["figures"].get("render_grid") and not pictured else None
    empty = ("the survey gave this layer's units no pages (choose layers with 'netanatomy survey --layers')"
             if lay.get("pages") is False else "no unit of this layer has a page (the survey makes pages for the "
             "units of the layers it renders, and for the units of clusters)")
    return {"cells": cells, "pictured": pictured, "missing": None if pictured else render_reason, "empty": empty,
            "units": lay["units"], "figure": grid_figure if grid_figure and grid_figure["src"] else None}


def unit_context(site: Site, page: Page, lay: dict[str, Any], u: int) -> dict[str, Any]:
    name = lay["name"]
    entry = site.unit(name, u)
    pages = site.unit_pages[name]
    i = pages.index(u)
    cluster = entry["cluster"] if entry["cluster"] is not None else site.unit_cluster.get((name, u))
    cluster_ids = {c["id"] for c in site.atlas["clusters"]}
    branch = entry["branch"] or site.branch_of(name, u)
    source = site.branch_unit(name, u)
    return {"title": f"{name} unit {u}", "crumbs": crumbs(page, (name, layer_page(name)), (f"unit {u}", None)),
            "model": model_facts(site.atlas["model"]), "layer": lay, "unit": u, "entry": entry,
            "prev": page.href(unit_page(name, pages[i - 1])) if i > 0 else None,
            "next": page.href(unit_page(name, pages[i + 1])) if i + 1 < len(pages) else None,
            "prev_unit": pages[i - 1] if i > 0 else None, "next_unit": pages[i + 1] if i + 1 < len(pages) else None,
            "layer_href": page.layer_href(name), "branch": branch,
            "branch_href": page.layer_href(branch) if branch and branch != name else None,
            "source": {"label": f"{source[0]} unit {source[1]}", "href": page.unit_href(*source)} if source else None,
            "cluster": cluster, "cluster_href": page.href(cluster_page(cluster)) if cluster in cluster_ids else None,
            "figures": unit_figures(site, page, name, u, entry), "probe": probe_rows(entry["probe"]),
            "probe_missing": site.part_reason("probes", name) or "the survey ran no probes on this layer",
            "rules": lay["probe_rules"], "upstream": links(site, page, entry["upstream"]),
            "downstream": links(site, page, entry["downstream"]),
            "links_missing": site.part_reason("connections", name) or "the survey listed no connections"}


def unit_figures(site: Site, page: Page, name: str, u: int, entry: dict[str, Any]) -> dict[str, Any]:
    render_reason = site.part_reason("render", name) or "the survey rendered no feature visualization of this unit"
    diversity = [page.picture(p) for p in entry["diversity"]]
    return {
        "render": page.figure(entry["render"], f"Feature visualization of {name} unit {u}",
                              "Feature visualization: an input optimized to excite the unit's channel (spatial mean).",
                              render_reason, pixelated=True),
        "diversity": [{"src": s, "alt": f"Diversity sample {i + 1} of {name} unit {u}"}
                      for i, s in enumerate(diversity) if s],
        "examples": page.figure(entry["examples"], f"Dataset examples that excite {name} unit {u} most",
                                "The data set's inputs that excite this unit most (by the map's maximum).",
                                site.part_reason("examples", name) or "the survey collected no dataset examples "
                                "for this layer", pixelated=True),
        "weights": page.figure(entry["weights"], f"NMF weight picture of {name} unit {u}",
                               "The unit's weights as the layer's shared three-colour NMF picture.",
                               why_no_weights(site, site.layers[name], "weights"), pixelated=True)
        if site.layers[name]["kind"] in WEIGHTED or entry["weights"] else None,
    }


_PROBE_LABELS = {
    "colour_selectivity": "colour selectivity (−1 grey … 1 colour)",
    "preferred_orientation_deg": "preferred orientation (degrees)",
    "preferred_frequency": "preferred spatial frequency (cycles per image)",
    "preferred_cycles_per_pixel": "preferred spatial frequency (cycles per pixel)",
    "osi": "orientation selectivity index (0 … 1)",
    "frequency_modulation": "frequency modulation ((max − min) / (max + min))",
    "grating_drive": "response to the preferred grating (above baseline)",
    "filter_colourfulness": "filter colourfulness (share of energy off the grey axis)",
    "filter_frequency": "filter spatial frequency (cycles per pixel)",
    "categories": "categories",
}


def probe_rows(probe: Any) -> list[tuple[str, str]]:
    """The unit's probe values as (label with unit, value); p- and q-values get two figures."""
    if not isinstance(probe, dict):
        return []
    rows = []
    for key, value in probe.items():
        label = _PROBE_LABELS.get(key, key.replace("_", " "))
        if isinstance(value, list):
            rows.append((label, ", ".join(map(str, value)) or "none"))
        elif key.endswith(("_p", "_q")):
            rows.append((label, fmt_p(value)))
        else:
            rows.append((label, fmt(value)))
    return rows


def links(site: Site, page: Page, items: Iterable[Any]) -> list[dict[str, Any]]:
    out = []
    for d in items:
        if not isinstance(d, dict):
            continue
        layer, unit = d.get("layer"), d.get("unit")
        label = f"{site.input_channel_name(int(unit))} channel" if layer == INPUT and _is_index(unit) \
            else f"{layer} unit {unit}"
        out.append({"label": label, "layer": layer, "unit": unit, "href": page.unit_href(layer, unit)
                    if layer in site.layers else None, "weight": fmt(d.get("weight"))})
    return out


def cluster_context(site: Site, page: Page, c: dict[str, Any]) -> dict[str, Any]:
    cid = c["id"]
    return {"title": f"cluster {cid}", "crumbs": crumbs(page, (f"cluster {cid}", None)),
            "model": model_facts(site.atlas["model"]), "cluster": c, "members": cluster_members(site, page, c),
            "importance": importance_section(site, page, c), "coherence": coherence_section(site, c),
            "json": page.href(("clusters", f"{cid}.json"))}


def cluster_members(site: Site, page: Page, c: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, units in c["units"].items():
        lay = site.layers.get(name)
        n = lay["units"] if lay else None
        cells = [{"unit": u, "href": page.unit_href(name, u),
                  "src": page.picture(site.unit(name, u)["render"]) or page.picture(site.unit(name, u)["weights"])}
                 for u in units]
        out.append({"layer": name, "href": page.layer_href(name), "count": len(units),
                    "share": fmt_pct(len(units) / n) if isinstance(n, int) and n else "—", "cells": cells})
    return out


def importance_section(site: Site, page: Page, c: dict[str, Any]) -> dict[str, Any]:
    imp = c["importance"]
    if not imp:
        return {"missing": site.part_reason("importance") or "the survey did not lesion this cluster"}
    rows = []
    for t in imp.get("by_layer") or []:
        drops = [float(x) for x in t.get("random_drops") or [] if isinstance(x, (int, float))]
        rows.append({"layer": t.get("layer"), "href": page.layer_href(t.get("layer")), "units": t.get("units"),
                     "drop": fmt_pct(t.get("drop")), "random": fmt_pct(sum(drops) / len(drops)) if drops else "—",
                     "n_random": len(drops) or "—", "p": fmt_p(t.get("p")), "q": fmt_p(t.get("q")),
                     "specificity": fmt(t.get("specificity")), "p_specificity": fmt_p(t.get("p_specificity"))})
    specific = any("specificity" in t for t in imp.get("by_layer") or [])
    figure = page.figure(c["figures"].get("importance"),
                         f"Accuracy drop when cluster {c['id']}'s sub-clusters are silenced, against random sets",
                         "Accuracy drop (percentage points of the test set) when each sub-cluster is silenced "
                         "(red line) against the drops of random same-size sets of units of the same layer (grey).",
                         "no random sets to draw")
    return {"missing": None, "rows": rows, "figure": figure, "specific": specific}


_COHERENCE = {"dataset": "label entropy of the top 10 inputs (bits, low = coherent)",
              "correlation": "mean within-set activation correlation",
              "visualization_entropy": "entropy of the prediction on the sub-cluster's rendered input (bits, low = "
                                       "coherent)",
              "visualization_objective": "objective reached by the sub-cluster's rendered input"}


def coherence_section(site: Site, c: dict[str, Any]) -> dict[str, Any]:
    coh = c["coherence"]
    if not coh:
        return {"missing": site.part_reason("coherence") or "the survey did not measure this cluster's coherence"}
    rows = [{"layer": t.get("layer"), "units": t.get("units"),
             "statistic": _COHERENCE.get(t.get("statistic"), str(t.get("statistic", ""))),
             "value": fmt(t.get("value")), "null": fmt(t.get("null_mean")), "p": fmt_p(t.get("p")),
             "q": fmt_p(t.get("q"))} for t in coh.get("by_layer") or []]
    return {"missing": None, "rows": rows, "has_q": any("q" in t for t in coh.get("by_layer") or [])}


# ---------------------------------------------------------------------------------------------
# the importance figure, drawn when the survey gave numbers but no picture


def importance_figure(c: dict[str, Any]) -> Any | None:
    """One panel per sub-cluster: the random sets' accuracy drops as a histogram and the
    sub-cluster's own drop as a line, so a reader sees how far in the tail it lies."""
    tests = [t for t in ((c["importance"] or {}).get("by_layer") or []) if t.get("random_drops")]
    if not tests:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 2.6 * len(tests)), dpi=100)
    axes = fig.subplots(len(tests), 1, squeeze=False)[:, 0]
    for ax, t in zip(axes, tests):
        drops = [100.0 * float(x) for x in t["random_drops"]]
        ax.hist(drops, bins=min(30, max(5, len(drops) // 3)), color="0.72", edgecolor="white",
                label=f"{len(drops)} random sets of {t.get('units', '?')} units")
        if isinstance(t.get("drop"), (int, float)):
            ax.axvline(100.0 * t["drop"], color="#b3361f", lw=2, label=f"the sub-cluster: {100.0 * t['drop']:.3g}")
        ax.set_title(f"{t.get('layer')} ({t.get('units', '?')} units): p {fmt_p(t.get('p'))}, q {fmt_p(t.get('q'))}",
                     fontsize=9)
        ax.set_xlabel("test accuracy drop when silenced (percentage points)", fontsize=8)
        ax.set_ylabel("random sets", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle(f"Cluster {c['id']}: damage from silencing each sub-cluster", fontsize=10)
    fig.tight_layout()
    return fig


def ensure_importance_figures(site: Site) -> list[Path]:
    """Draw files/clusters/ID_importance.png for every cluster whose figure the survey did not give."""
    written = []
    for c in site.atlas["clusters"]:
        given, _ = site.file(c["figures"].get("importance"))
        if given is not None:
            continue
        fig = importance_figure(c)
        if fig is None:
            continue
        rel = f"files/clusters/{c['id']}_importance.png"
        written.append(save_figure(fig, site.root / rel, dpi=100))
        c["figures"]["importance"] = rel
    return written


# ---------------------------------------------------------------------------------------------
# the search index and static files


def search_index(site: Site) -> dict[str, Any]:
    """What the search box needs, in site-root-relative encoded links: every layer with its unit
    count and which units have pages, and every cluster."""
    layers = []
    for lay in site.atlas["layers"]:
        name = lay["name"]
        pages = site.unit_pages.get(name, [])
        n = lay["units"] if isinstance(lay["units"], int) else None
        every = n is not None and len(pages) == n
        layers.append({"name": name, "url": relative_href(layer_page(name)),
                       "units_url": relative_href(("layers", layer_dir(name), "units", "")),
                       "units": n, "pages": "all" if every else pages})
    clusters = [{"id": c["id"], "url": relative_href(cluster_page(c["id"]))} for c in site.atlas["clusters"]]
    return {"model": site.atlas["model"]["name"], "layers": layers, "clusters": clusters}


def write_assets(site: Site) -> list[Path]:
    out = []
    for src in sorted(STATIC.iterdir()):
        if src.is_file():
            dest = site.root.joinpath(*ASSETS, src.name)
            out.append(write_page(dest, src.read_text(encoding="utf-8")))
    body = json.dumps(search_index(site), ensure_ascii=True, separators=(",", ":"))
    out.append(write_page(site.root.joinpath(*ASSETS, INDEX_JS),
                          "/* netanatomy atlas search index (generated) */\nwindow.NETANATOMY_INDEX = " + body + ";\n"))
    return out


# ---------------------------------------------------------------------------------------------
# writing pages


def write_page(path: Path, text: str) -> Path:
    """Write a generated file atomically (a temporary file beside it, then a rename), so that a
    reader or the server never sees half a page, and leave a file with the same content alone.

    Unlike `util.io.write_text` there is no fsync per file: pages are derived from atlas.json and
    can be rebuilt after a crash, and an fsync costs ~4 ms, which is most of the build's time for
    a model with thousands of unit pages.
    """
    data = text.encode("utf-8")
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return path
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_page_json(path: Path, obj: Any) -> Path:
    return write_page(path, dumps(obj, indent=None) + "\n")


# ---------------------------------------------------------------------------------------------
# templates and the build


def _environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("netanatomy.atlas", "templates"), autoescape=select_autoescape(["html"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(fmt=fmt, p=fmt_p, pct=fmt_pct)
    return env


def _render(env, template: str, site: Site, path: SitePath, context_fn, *args) -> Path:
    page = Page(site, path)
    context = context_fn(site, page, *args)
    html = env.get_template(template).render(page=page, root=page.root, index_href=page.href(("index.html",)),
                                             atlas_json=page.href(("atlas.json",)),
                                             model_name=site.atlas["model"]["name"], **context)
    return write_page(site.root.joinpath(*path), html)


def build_site(out_dir: str | Path) -> list[Path]:
    """Write the atlas's pages for `out_dir/atlas.json` and return every file written.

    Pages are written atomically, one at a time (a page whose content did not change is left
    alone); pages of an earlier build that this one does not write are removed. A figure the survey
    did not give, the importance histogram, is drawn from its numbers into files/clusters/.
    """
    root = Path(out_dir)
    site = Site(root, load_atlas(root))
    env = _environment()
    written = ensure_importance_figures(site)
    written += write_assets(site)
    written.append(_render(env, "index.html", site, ("index.html",), overview_context))
    for lay in site.atlas["layers"]:
        written += _layer_files(env, site, lay)
    for c in site.atlas["clusters"]:
        written.append(_render(env, "cluster.html", site, cluster_page(c["id"]), cluster_context, c))
        written.append(write_page_json(root / "clusters" / f"{c['id']}.json", c))
    remove_stale(root, written)
    return written


def _layer_files(env, site: Site, lay: dict[str, Any]) -> list[Path]:
    name = lay["name"]
    out = [_render(env, "layer.html", site, layer_page(name), layer_context, lay),
           write_page_json(site.root / "layers" / layer_dir(name) / "layer.json",
                      {"layer": lay, "units": site.atlas["units"].get(name, {})})]
    for u in site.unit_pages.get(name, []):
        out.append(_render(env, "unit.html", site, unit_page(name, u), unit_context, lay, u))
    return out


SITE_FOLDERS = ("layers", "clusters", "assets")  # the site's own namespaces; files/ is the survey's
SITE_SUFFIXES = (".html", ".json", ".js", ".css", ".svg")


def remove_stale(root: Path, written: Iterable[Path]) -> list[Path]:
    """Remove pages an earlier build wrote that this one did not (a layer renamed, a unit no longer
    listed), so that the folder holds exactly the current site. Only the site's own kinds of file
    in its own folders are touched; the survey's figures under files/ never are."""
    keep = {p.resolve() for p in written}
    removed = []
    for folder in SITE_FOLDERS:
        base = root / folder
        if not base.is_dir() or base.is_symlink():
            continue
        for path in sorted(base.rglob("*"), reverse=True):
            if path.is_file() and not path.is_symlink() and path.suffix in SITE_SUFFIXES \
                    and path.resolve() not in keep:
                path.unlink()
                removed.append(path)
            elif path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
                path.rmdir()
    return removed
