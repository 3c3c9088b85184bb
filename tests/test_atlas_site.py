"""The atlas site, checked in Python: every page exists, every link and image resolves inside the
folder, odd layer names survive, missing parts say why, the importance figure is drawn."""
from __future__ import annotations

import json
import re
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from netanatomy.atlas.site import build_site, layer_dir, normalize_atlas, relative_href
from netanatomy.errors import UsageError

# ---------------------------------------------------------------------------------------------
# the fixture: a synthetic atlas.json with tiny pictures (shared with test_atlas_browser.py)


def _png(root: Path, rel: str, size: int = 8, seed: int = 0) -> str:
    """A small random-colour PNG at root/rel; returns rel (as atlas.json writes it)."""
    rng = np.random.default_rng(seed)
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return rel


def _layer(name, kind, units, kernel, reads, **extra):
    return {"name": name, "kind": kind, "units": units, "kernel_size": kernel, "groups": 1, "depthwise": False,
            "reads": reads, "branches": [], "banding": None, "figures": {}, "svd": None, "branch_stats": None,
            "clusters": {}, "probe_rules": {}, **extra}


def write_fixture_atlas(root: Path) -> Path:
    """An atlas of a small branched model: conv1 -> features.3 -> (mixed1_1x1 | mixed1_3x3) ->
    concat mixed1 -> relu@1 -> fc, with renders, weights, probes, 2 clusters and some parts left out."""
    root.mkdir(parents=True, exist_ok=True)
    p = lambda rel, size=8, seed=0: _png(root, rel, size, seed)  # noqa: E731
    layers = [
        _layer("conv1", "conv", 4, [3, 3], ["input"],
               banding={"horizontal": 0.41, "vertical": 0.22, "index": 0.19, "orientation": "horizontal",
                        "p": 0.001, "effective_kernels": 11.8, "share_h_over_v": 0.72},
               figures={"weights": p("files/weights/conv1.png", 40), "banding": p("files/banding/all_layers.png", 60),
                        "families": p("files/families/conv1.png", 30)},
               families={"families": [{"units": [0, 2], "angles": [0.0, 90.0], "reference": 0}]},
               clusters={"0": 2}, probe_rules={"colour": "colour_selectivity > 0.2 (95th percentile of the null)"},
               pages=True),
        _layer("features.3", "conv", 4, [3, 3], ["conv1"],
               banding={"horizontal": 0.2, "vertical": 0.21, "index": -0.01, "orientation": "none", "p": 0.6,
                        "effective_kernels": 15.0, "share_h_over_v": 0.5},
               figures={"weights": "files/weights/features.3.png", "svd": p("files/svd/features.3.png", 50)},
               svd={"lower": "conv1", "shares": [0.7, 0.2, 0.1],
                    "correlations": {"vector_0": {"colourfulness": {"pearson": -0.65, "pearson_p": 0.01}},
                                     "vector_1": {"frequency": {"pearson": 0.3, "pearson_p": 0.2}}}},
               clusters={"0": 2}),
        _layer("mixed1_1x1", "conv", 2, [1, 1], ["features.3"], pages=False),
        _layer("mixed1_3x3", "conv", 2, [3, 3], ["features.3"]),
        _layer("mixed1", "concat", 4, None, ["mixed1_1x1", "mixed1_3x3"],
               branches=[{"name": "mixed1_1x1", "kind": "concat", "start": 0, "stop": 2, "units": 2},
                         {"name": "mixed1_3x3", "kind": "concat", "start": 2, "stop": 4, "units": 2}],
               branch_stats={"correlation": {"within": 0.73, "between": 0.64, "p": 0.005},
                             "tests": [{"branch": "mixed1_1x1", "category": "oriented", "count": 2, "expected": 0.5,
                                        "p": 2.5e-4, "q": 0.015},
                                       {"branch": "mixed1_3x3", "category": "colour", "count": 1, "expected": 1.0,
                                        "p": 0.6, "q": 0.6}]},
               figures={"branch_correlation": p("files/branches/mixed1_correlation.png", 30)},
               clusters={"1": 3}),
        _layer("relu@1", "module", 4, None, ["mixed1"]),
        _layer("fc", "linear", 3, None, ["relu@1"], clusters={"1": 1}),
    ]
    units = {
        "conv1": {str(u): {"render": p(f"files/render/conv1/{u}.png", 16, u),
                           "diversity": [p(f"files/render/conv1/{u}_d{i}.png", 16, 10 + i) for i in (1, 2)],
                           "examples": p(f"files/examples/conv1/{u}.png", 24, u), "weights": p(f"files/weights/conv1/{u}.png", 12, u),
                           "probe": {"colour_selectivity": 0.1 * u, "preferred_orientation_deg": 45 * u, "osi": 0.6,
                                     "osi_p": 0.0004, "categories": ["oriented"] if u % 2 else []},
                           "branch": None, "cluster": 0 if u < 2 else None, "class_name": None,
                           "upstream": [{"layer": "input", "unit": c, "weight": 0.8 - 0.1 * c} for c in range(3)],
                           "downstream": [{"layer": "features.3", "unit": (u + 1) % 4, "weight": 0.4}]}
                  for u in range(4)},
        "features.3": {str(u): {"render": None, "diversity": [], "examples": None,
                                "weights": p(f"files/weights/features.3/{u}.png", 12, u), "probe": None,
                                "upstream": [{"layer": "conv1", "unit": u, "weight": 0.5}], "downstream": []}
                       for u in range(4)},
        "mixed1": {str(u): {"render": p(f"files/render/mixed1/{u}.png", 16, u), "branch": "mixed1_1x1" if u < 2 else
                            "mixed1_3x3", "cluster": 1 if u < 3 else None} for u in range(4)},
        "relu@1": {str(u): {"render": p(f"files/render/relu@1/{u}.png", 16, u)} for u in range(2)},
        "fc": {str(u): {"class_name": name} for u, name in enumerate(["cat", "dog", "bird"])},
    }
    clusters = [
        {"id": 0, "size": 4, "units": {"conv1": [0, 1], "features.3": [2, 3]},
         "importance": {"by_layer": [
             {"layer": "conv1", "units": 2, "drop": 0.12, "random_drops": [0.01, 0.02, 0.0, 0.03, 0.015] * 4,
              "p": 0.01, "q": 0.03, "specificity": 2.5, "p_specificity": 0.2},
             {"layer": "features.3", "units": 2, "drop": 0.02, "random_drops": [0.01, 0.03, 0.02, 0.04] * 5,
              "p": 0.4, "q": 0.5}]},
         "coherence": {"by_layer": [{"layer": "conv1", "units": 2, "statistic": "label entropy of top inputs",
                                     "value": 0.5, "null_mean": 0.9, "p": 0.04, "q": 0.08}]},
         "figures": {}},
        {"id": 1, "size": 4, "units": {"mixed1": [0, 1, 2], "fc": [0]},
         "importance": {"by_layer": [{"layer": "mixed1", "units": 3, "drop": 0.05, "random_drops": [0.01] * 19,
                                      "p": 0.05, "q": 0.1}]},
         "coherence": None, "figures": {"importance": p("files/clusters/1_importance.png", 40)}},
    ]
    doc = {
        "version": 1,
        "model": {"name": "zoo:tiny-branched", "weights": None, "input_shape": [3, 8, 8],
                  "classes": ["cat", "dog", "bird"], "data": "bundled"},
        "survey": {"seconds": 12.3, "budget_s": 300, "parts": {
            "layers": {"status": "done", "seconds": 0.1}, "banding": {"status": "done", "seconds": 1.2},
            "weights": {"status": "done", "seconds": 0.8}, "svd": {"status": "done", "seconds": 0.3},
            "branches": {"status": "done", "seconds": 2.0}, "render": {"status": "done", "seconds": 5.0},
            "render/1": {"status": "left out", "seconds": 0.0, "reason": "over the budget", "layers": ["fc"]},
            "clusters": {"status": "done", "seconds": 1.0}, "importance": {"status": "done", "seconds": 1.5},
            "coherence": {"status": "skipped", "seconds": 0.0, "reason": "the data has no labels"}}},
        "headlines": [
            {"text": "conv1 bands horizontally: H 0.41 vs V 0.22, p 0.001", "link": "layers/conv1/index.html"},
            {"text": "relu@1 has pages", "link": "layers/relu@1/index.html"},
            {"text": "cluster 1 matters: drop 0.05, p 0.05", "link": {"cluster": 1}},
            {"text": "a finding whose page does not exist", "link": "layers/nope/index.html"},
            {"text": "the weight graph is more clusterable than its shuffles", "link": "index.html#clusters"},
        ],
        "layers": layers, "units": units, "clusters": clusters,
        "clusterability": {"graph": "weights", "k": 2, "ncut": 0.9, "null_mean": 1.07, "null_std": 0.05, "z": -3.4,
                           "p": 0.05, "shuffles": 19},
    }
    (root / "atlas.json").write_text(json.dumps(doc, indent=1))
    return root


# ---------------------------------------------------------------------------------------------
# reading the pages back


class _Links(HTMLParser):
    """Every href/src, every id, every <img> (with its alt) and the figure/caption structure."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self.ids: set[str] = set()
        self.images: list[dict[str, str]] = []
        self.figures = 0
        self.captions = 0
        self.tables = 0
        self.table_captions = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("href", "src", "action"):
            if key in a:
                self.links.append((tag, a[key]))
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.images.append(a)
        self.figures += tag == "figure"
        self.captions += tag == "figcaption"
        self.tables += tag == "table"
        self.table_captions += tag == "caption"


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = write_fixture_atlas(tmp_path_factory.mktemp("atlas"))
    written = build_site(root)
    return root, written


def _pages(root: Path) -> list[Path]:
    return sorted(root.rglob("*.html"))


def test_builds_every_page(site):
    root, written = site
    expected = ["index.html", "layers/conv1/index.html", "layers/features.3/index.html", "layers/mixed1/index.html",
                "layers/relu@1/index.html", "layers/fc/index.html", "layers/conv1/units/3.html",
                "layers/features.3/units/0.html", "layers/relu@1/units/1.html", "layers/fc/units/2.html",
                "clusters/0.html", "clusters/1.html", "clusters/0.json", "layers/mixed1/layer.json",
                "assets/atlas.css", "assets/search.js", "assets/search-index.js"]
    for rel in expected:
        assert (root / rel).is_file(), rel
    assert {p.resolve() for p in written} >= {(root / rel).resolve() for rel in expected}
    # pages for units that a cluster or a connection names, none for others
    assert not (root / "layers/mixed1_1x1/units").exists()
    assert not (root / "layers/relu@1/units/2.html").exists()
    assert all(p.is_file() and p.resolve().is_relative_to(root.resolve()) for p in written)


def test_every_link_and_image_resolves_inside_the_folder(site):
    root, _ = site
    checked = 0
    for page in _pages(root):
        parsed = _parse(page)
        for tag, link in parsed.links:
            assert not re.match(r"^[a-z][a-z0-9+.-]*:", link, re.I), (page, link)  # no http:, file:, data:
            assert not link.startswith("/"), (page, link)  # relative: the folder works anywhere
            target, _, fragment = link.partition("#")
            path = (page.parent / urllib.parse.unquote(target)).resolve() if target else page.resolve()
            assert path.is_relative_to(root.resolve()), (page, link)
            assert path.is_file(), (page, link)
            if fragment and path.suffix == ".html":
                assert urllib.parse.unquote(fragment) in _parse(path).ids, (page, link)
            checked += 1
    assert checked > 200


def test_images_have_alt_text_figures_captions_tables_captions(site):
    root, _ = site
    for page in _pages(root):
        parsed = _parse(page)
        assert all(img.get("alt") for img in parsed.images), page
        assert parsed.figures == parsed.captions, page
        assert parsed.tables == parsed.table_captions, page
        text = page.read_text(encoding="utf-8")
        assert '<html lang="en"' in text and 'role="search"' in text and 'id="main"' in text


def test_odd_layer_names_in_folders_and_links(site):
    root, _ = site
    assert (root / "layers" / "relu@1" / "units" / "0.html").is_file()
    overview = (root / "index.html").read_text()
    assert 'href="layers/relu%401/index.html"' in overview
    assert 'href="layers/features.3/index.html"' in overview
    cluster = (root / "clusters" / "0.html").read_text()
    assert 'href="../layers/features.3/units/2.html"' in cluster
    assert relative_href(("layers", "a b#c", "index.html"), ("clusters", "1.html")) == "../layers/a%20b%23c/index.html"
    assert relative_href(("layers", "x", "units", "2.html"), ("layers", "x", "index.html")) == "units/2.html"
    assert relative_href(("index.html",), ("layers", "x", "units", "2.html")) == "../../../index.html"
    assert relative_href(("layers", "y", "index.html"), ("layers", "x", "index.html"), "units") == "../y/index.html#units"


@pytest.mark.parametrize("name", ["a/b", "..", ".", "", "x\\y", "tab\there", "é" * 150, "e\u0301"])
def test_unsafe_layer_names_get_safe_distinct_folders(name):
    folder = layer_dir(name)
    assert folder not in ("", ".", "..") and "/" not in folder and "\\" not in folder
    assert len(folder.encode()) <= 200 and not any(ord(ch) < 32 for ch in folder)
    assert folder != layer_dir(name + "_")


def test_ordinary_names_are_kept_as_typed():
    for name in ["conv1", "features.3", "relu@1", "mixed3a_5x5", "layer1.0.conv2", "Mixed_5b"]:
        assert layer_dir(name) == name


def test_missing_parts_say_why_and_draw_no_image(site):
    root, _ = site
    f3 = (root / "layers" / "features.3" / "index.html").read_text()
    assert "not computed: the file files/weights/features.3.png is missing" in f3
    assert "weights/features.3.png\"" not in f3
    fc = (root / "layers" / "fc" / "index.html").read_text()
    assert "not computed: the survey&#39;s render part was left out (over the budget)" in fc
    assert "not computed: a linear layer fed by pooled features has no kernels" in fc
    concat = (root / "layers" / "mixed1" / "index.html").read_text()
    assert "not computed: a concat layer has no weights of its own" in concat
    c1 = (root / "clusters" / "1.html").read_text()
    assert "not computed: the survey&#39;s coherence part was skipped (the data has no labels)" in c1
    one = (root / "layers" / "mixed1_1x1" / "index.html").read_text()
    assert "1×1 kernels have no spatial pattern to band" in one
    assert "the survey gave this layer&#39;s units no pages" in one


def test_extra_fields_the_survey_writes_are_shown(site):
    root, _ = site
    conv1 = (root / "layers" / "conv1" / "index.html").read_text()
    assert "Rotation families" in conv1 and 'src="../../files/families/conv1.png"' in conv1
    unit = (root / "layers" / "conv1" / "units" / "1.html").read_text()
    assert "orientation selectivity index (0 … 1)" in unit and "osi p" in unit and "0.0004" in unit
    cluster = (root / "clusters" / "0.html").read_text()
    assert "class specificity" in cluster and ">2.5<" in cluster and ">0.08<" in cluster


def test_importance_figure_is_drawn_when_not_given(site):
    root, _ = site
    drawn = root / "files" / "clusters" / "0_importance.png"
    with Image.open(drawn) as im:
        assert im.size[0] >= 300 and im.size[1] >= 300
    assert 'src="../files/clusters/0_importance.png"' in (root / "clusters" / "0.html").read_text()
    assert 'src="../files/clusters/1_importance.png"' in (root / "clusters" / "1.html").read_text()
    assert "12" in (root / "clusters" / "0.html").read_text()  # the drop in percentage points


def test_overview_diagram_shows_branches_side_by_side(site):
    root, _ = site
    html = (root / "index.html").read_text()
    block = html[html.index('<div class="block">'):]
    block = block[:block.index('<div class="join">') + 300]
    assert block.index("mixed1_1x1") < block.index("mixed1_3x3") < block.index('class="join"')
    assert block.count('class="branch"') == 2
    rows = re.findall(r'<li class="row">(.*?)</li>', html, re.S)
    assert not any('href="layers/mixed1_1x1/index.html"' in r and "block" not in r for r in rows)
    assert "H bands" in html  # conv1's banding badge


def test_headlines_link_only_to_pages_that_exist(site):
    root, _ = site
    html = (root / "index.html").read_text()
    assert '<a href="layers/conv1/index.html">conv1 bands horizontally' in html
    assert '<a href="clusters/1.html">cluster 1 matters' in html
    assert "<li>a finding whose page does not exist</li>" in html
    assert '<a href="index.html#clusters">the weight graph' in html and 'id="clusters"' in html


def test_search_index_is_a_script_that_sets_a_global(site):
    root, _ = site
    text = (root / "assets" / "search-index.js").read_text()
    prefix = "window.NETANATOMY_INDEX = "
    body = text[text.index(prefix) + len(prefix):].rstrip().rstrip(";")
    index = json.loads(body)
    by = {lay["name"]: lay for lay in index["layers"]}
    assert by["relu@1"]["url"] == "layers/relu%401/index.html"
    assert by["relu@1"]["pages"] == [0, 1] and by["conv1"]["pages"] == "all"
    assert by["relu@1"]["units_url"] == "layers/relu%401/units/"
    assert [c["id"] for c in index["clusters"]] == [0, 1]


def test_rebuild_gives_the_same_pages(site, tmp_path):
    root, _ = site
    before = {p: p.read_bytes() for p in _pages(root)}
    build_site(root)
    assert {p: p.read_bytes() for p in _pages(root)} == before


def test_rebuild_removes_pages_of_layers_that_are_gone(tmp_path):
    root = write_fixture_atlas(tmp_path / "atlas")
    build_site(root)
    doc = json.loads((root / "atlas.json").read_text())
    doc["layers"] = [lay for lay in doc["layers"] if lay["name"] != "relu@1"]
    doc["layers"][-1]["reads"] = ["mixed1"]
    del doc["units"]["relu@1"]
    (root / "atlas.json").write_text(json.dumps(doc))
    build_site(root)
    assert not (root / "layers" / "relu@1").exists()
    assert (root / "files" / "render" / "relu@1" / "0.png").is_file()  # the survey's files stay
    assert (root / "layers" / "fc" / "index.html").is_file()


def test_bad_atlas_is_the_users_error(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        build_site(tmp_path)
    (tmp_path / "atlas.json").write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        build_site(tmp_path)
    (tmp_path / "atlas.json").write_text(json.dumps({"version": 2, "layers": []}))
    with pytest.raises(UsageError, match="version 2"):
        build_site(tmp_path)
    with pytest.raises(UsageError, match="repeat"):
        normalize_atlas({"version": 1, "layers": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(UsageError, match="'units\\['a'\\]' must be an object"):
        normalize_atlas({"version": 1, "layers": [{"name": "a"}], "units": {"a": [1, 2]}})
    with pytest.raises(UsageError, match="integer 'id'"):
        normalize_atlas({"version": 1, "layers": [], "clusters": [{"id": "3"}]})


def test_paths_that_leave_the_folder_are_not_shown(tmp_path):
    root = write_fixture_atlas(tmp_path / "atlas")
    doc = json.loads((root / "atlas.json").read_text())
    (tmp_path / "secret.png").write_bytes((root / "files/weights/conv1.png").read_bytes())
    doc["layers"][0]["figures"]["weights"] = "../secret.png"
    doc["layers"][0]["figures"]["banding"] = "http://example.com/x.png"
    (root / "atlas.json").write_text(json.dumps(doc))
    build_site(root)
    html = (root / "layers" / "conv1" / "index.html").read_text()
    assert "secret.png\"" not in html and "example.com/x.png\"" not in html
    assert html.count("the survey gave a path outside the atlas folder") == 2


def test_minimal_atlas_builds(tmp_path):
    """Only the required fields: every section says it was not computed, nothing breaks."""
    (tmp_path / "atlas.json").write_text(json.dumps({"version": 1, "model": {"name": "m"},
                                                     "layers": [{"name": "fc", "kind": "linear", "units": 2}]}))
    build_site(tmp_path)
    html = (tmp_path / "index.html").read_text()
    assert "not computed: the survey reported no findings" in html
    assert (tmp_path / "layers" / "fc" / "index.html").is_file()


def test_a_reused_part_is_not_a_reason_for_a_missing_picture(tmp_path):
    import json as _json

    from netanatomy.atlas.site import Site, load_atlas

    root = tmp_path / "site"
    write_fixture_atlas(root)
    doc = _json.loads((root / "atlas.json").read_text())
    doc["survey"]["parts"]["weights"] = {"status": "done (re-used)", "seconds": 1.0}
    doc["survey"]["parts"]["render"] = {"status": "left out", "seconds": 0.0, "reason": "the budget"}
    (root / "atlas.json").write_text(_json.dumps(doc))
    site = Site(root, load_atlas(root))
    assert site.part_reason("weights") is None
    assert site.part_reason("render") == "the survey's render part was left out (the budget)"
