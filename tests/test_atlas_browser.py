"""The atlas in a real headless browser (Debian's chromium driven by playwright), from the
server and from file://: links lead to the layer, unit and cluster pages, the search box lands
on a unit's page, every image loads, the console stays clean, and the server refuses paths
outside the folder.

Without chromium or playwright the tests skip, unless the environment variable CI is set (CI
installs both): there they fail, so a broken set-up cannot pass unnoticed.

`screenshot_site(out_dir, pages, dest)` is also usable on its own, e.g. on a real survey:
    .venv/bin/python tests/test_atlas_browser.py runs/atlas screenshots/ index.html layers/conv1/index.html
"""
from __future__ import annotations

import os
import sys
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("NETANATOMY_CHROMIUM", "/usr/bin/chromium")
VIEWPORT = {"width": 1200, "height": 900}


def browser_problem() -> str | None:
    """Why a real browser cannot run here, or None when it can."""
    import importlib.util

    problems = []
    if importlib.util.find_spec("playwright") is None:
        problems.append("the playwright package is missing (pip install playwright)")
    if not Path(CHROMIUM).is_file():
        problems.append(f"no chromium at {CHROMIUM} (apt-get install chromium, or set NETANATOMY_CHROMIUM)")
    return "; ".join(problems) or None


@contextmanager
def chromium() -> Iterator[Any]:
    """The system chromium, headless (no `playwright install`: we never download a browser)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def screenshot_site(out_dir: str | os.PathLike, pages: Sequence[str], dest: str | os.PathLike, *,
                    full_page: bool = True, browser: Any = None) -> list[Path]:
    """Screenshot the atlas pages `pages` (paths relative to `out_dir`, as on disk) opened from
    file://, into `dest/<page path with / as __>.png`; returns the PNGs written. A running
    playwright `browser` is used when given (playwright cannot start twice in one thread)."""
    if browser is None:
        with chromium() as own:
            return screenshot_site(out_dir, pages, dest, full_page=full_page, browser=own)
    root, dest = Path(out_dir).resolve(), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    page = browser.new_page(viewport=VIEWPORT)
    try:
        for rel in pages:
            page.goto((root / rel).as_uri())
            load_all_images(page)
            out = dest / (rel.replace("/", "__").removesuffix(".html") + ".png")
            page.screenshot(path=str(out), full_page=full_page)
            written.append(out)
    finally:
        page.close()
    return written


def load_all_images(page) -> list[list[Any]]:
    """Make lazy images load now, wait until every image is loaded, decoded and painted (a
    screenshot taken earlier shows `decoding="async"` images as blank boxes), and return
    [src, naturalWidth] of each."""
    return page.evaluate("""async () => {
        const imgs = Array.from(document.images);
        imgs.forEach(i => { i.loading = "eager"; });
        await Promise.all(imgs.map(i => i.complete && i.naturalWidth ? null :
            new Promise(done => { i.addEventListener("load", done); i.addEventListener("error", done);
                                  setTimeout(done, 5000); })));
        await Promise.all(imgs.map(i => i.naturalWidth ? i.decode().catch(() => null) : null));
        await new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)));
        return imgs.map(i => [i.getAttribute("src"), i.naturalWidth]);
    }""")


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def browser():
    problem = browser_problem()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so the browser tests must run: {problem}")
        pytest.skip(f"no real browser: {problem}")
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    from netanatomy.atlas.site import build_site
    from test_atlas_site import write_fixture_atlas

    root = write_fixture_atlas(tmp_path_factory.mktemp("browser") / "atlas")
    build_site(root)
    return root


@pytest.fixture(scope="module")
def server_url(atlas):
    from netanatomy.atlas.server import serve_in_thread

    server, url = serve_in_thread(atlas)
    yield url
    server.shutdown()
    server.server_close()


@pytest.fixture(params=["server", "file"])
def base(request, atlas, server_url) -> str:
    """The atlas's root URL, served or opened from disk."""
    return server_url if request.param == "server" else atlas.resolve().as_uri()


class Tab:
    """A browser page that records console errors, page errors and failed requests."""

    def __init__(self, browser) -> None:
        self.page = browser.new_page(viewport=VIEWPORT)
        self.page.set_default_timeout(5000)
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.errors.append(f"failed: {r.url}"))
        self.page.on("response", lambda r: self.errors.append(f"{r.status}: {r.url}") if r.status >= 400 else None)

    def images_ok(self) -> int:
        """Assert that every image on the page loaded; returns how many there are."""
        found = load_all_images(self.page)
        broken = [src for src, width in found if not width]
        assert not broken, f"{self.page.url}: images did not load: {broken}"
        return len(found)

    def click(self, selector: str, path: str) -> None:
        """Click a link and wait until the URL ends with `path` (percent-encoded as links are)."""
        self.page.locator(selector).first.click()
        self.page.wait_for_url(lambda url: urllib.parse.urlsplit(url).path.endswith(path), timeout=5000)

    def close(self) -> None:
        self.page.close()


@pytest.fixture()
def tab(browser):
    t = Tab(browser)
    yield t
    t.close()


# ---------------------------------------------------------------------------------------------
# the tests


def test_overview_layer_unit_cluster_by_clicking(tab, base):
    page = tab.page
    page.goto(f"{base}/index.html")
    assert "zoo:tiny-branched" in page.title()
    assert page.locator(".block .branch").count() == 2
    assert tab.images_ok() == 0  # the overview draws its diagram in HTML
    tab.click('.diagram a.box-name:text-is("mixed1")', "/layers/mixed1/index.html")
    assert page.locator("h1").inner_text() == "Layer mixed1"
    assert tab.images_ok() >= 5  # 4 unit renders + the branch correlation figure
    tab.click('.grid a[href="units/2.html"]', "/layers/mixed1/units/2.html")
    assert page.locator("h1").inner_text() == "mixed1 unit 2"
    assert tab.images_ok() >= 1
    tab.click('a:text-is("cluster 1")', "/clusters/1.html")
    assert page.locator("h1").inner_text() == "Cluster 1"
    assert tab.images_ok() >= 4  # member renders + the importance figure
    tab.click('.grid a[href="../layers/fc/units/0.html"]', "/layers/fc/units/0.html")
    assert "the output for class cat" in page.locator(".lede").inner_text()
    assert tab.errors == []


def test_odd_names_and_drawn_figures_load(tab, base):
    page = tab.page
    page.goto(f"{base}/index.html")
    tab.click('.diagram a.box-name:text-is("relu@1")', "/layers/relu%401/index.html")
    assert page.locator("h1").inner_text() == "Layer relu@1"
    assert tab.images_ok() == 2
    tab.click('.grid a[href="units/1.html"]', "/layers/relu%401/units/1.html")
    tab.click('.crumbs a:text-is("overview")', "/index.html")
    tab.click('.diagram a.box-name:text-is("conv1")', "/layers/conv1/index.html")
    assert tab.images_ok() == 7  # banding, weights and families figures, 4 unit renders
    tab.click('.grid a[href="units/0.html"]', "/layers/conv1/units/0.html")
    assert tab.images_ok() == 5  # render, weights, 2 diversity samples, examples
    tab.click('a:text-is("cluster 0")', "/clusters/0.html")
    assert tab.images_ok() == 5  # 2 renders and 2 weight pictures of members, the drawn importance figure
    tab.click('.grid a[href="../layers/features.3/units/2.html"]', "/layers/features.3/units/2.html")
    assert "not computed" in page.locator("main").inner_text()  # no render: said, not a broken image
    assert tab.images_ok() == 1
    assert tab.errors == []


@pytest.mark.parametrize("query, path", [
    ("conv1:2", "/layers/conv1/units/2.html"),
    ("features.3/1", "/layers/features.3/units/1.html"),
    ("mixed1 3", "/layers/mixed1/units/3.html"),
    ("relu@1 #1", "/layers/relu%401/units/1.html"),
    ("relu@1", "/layers/relu%401/index.html"),
    ("Conv1", "/layers/conv1/index.html"),
    ("cluster 0", "/clusters/0.html"),
])
def test_search_lands_on_the_page(tab, base, query, path):
    page = tab.page
    page.goto(f"{base}/layers/features.3/units/0.html")  # from deep down: links are relative to the root
    page.fill("#search-q", query)
    page.press("#search-q", "Enter")
    page.wait_for_url(lambda url: urllib.parse.urlsplit(url).path.endswith(path), timeout=5000)
    assert tab.errors == []


def test_search_suggests_when_it_cannot_decide(tab, base):
    page = tab.page
    page.goto(f"{base}/index.html")
    page.fill("#search-q", "mixed")
    page.press("#search-q", "Enter")
    results = page.locator("#search-results a")
    results.first.wait_for(timeout=5000)
    assert results.all_inner_texts() == ["mixed1_1x1", "mixed1_3x3", "mixed1"]
    page.fill("#search-q", "conv1 99")
    page.press("#search-q", "Enter")
    page.locator("#search-results p:text('conv1 has 4 units')").wait_for(timeout=5000)
    page.fill("#search-q", "3x3")
    page.press("#search-q", "Enter")
    page.locator("#search-results p:text('No layer')").wait_for(timeout=5000)
    tab.click('#search-results a:text-is("mixed1_3x3")', "/layers/mixed1_3x3/index.html")
    assert tab.errors == []


def test_server_refuses_paths_outside_the_folder(tab, atlas, server_url):
    secret = atlas.parent / "secret.txt"
    secret.write_text("outside the atlas")
    link = atlas / "leak.txt"
    if not link.exists():
        link.symlink_to(secret)
    for path in ("/../secret.txt", "/%2e%2e/secret.txt", "/layers/%2E%2E/%2E%2E/secret.txt", "/leak.txt"):
        response = tab.page.goto(server_url + path)
        assert response.status == 404, path
        assert "outside the atlas" not in tab.page.content()
    assert tab.page.goto(server_url + "/atlas.json").status == 200


def test_screenshot_site_writes_pngs(atlas, browser, tmp_path):
    from PIL import Image

    written = screenshot_site(atlas, ["index.html", "layers/relu@1/index.html"], tmp_path, full_page=False,
                              browser=browser)
    assert [p.name for p in written] == ["index.png", "layers__relu@1__index.png"]
    for p in written:
        with Image.open(p) as im:
            assert im.size == (VIEWPORT["width"], VIEWPORT["height"])


if __name__ == "__main__":  # screenshot a real atlas: DIR DEST [PAGE ...]
    folder, target, *chosen = sys.argv[1:] or [""]
    if not folder or not target:
        sys.exit("usage: test_atlas_browser.py ATLAS_DIR DEST_DIR [PAGE ...] (default: index.html)")
    for png in screenshot_site(folder, chosen or ["index.html"], target):
        print(png)
