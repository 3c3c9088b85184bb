"""The atlas server: files inside the folder are served, nothing outside it is reachable."""
from __future__ import annotations

import http.client

import pytest

from netanatomy.atlas.server import resolve_request, serve_in_thread
from netanatomy.cli.main import run


@pytest.fixture()
def site(tmp_path):
    root = tmp_path / "atlas"
    (root / "layers" / "conv1").mkdir(parents=True)
    (root / "index.html").write_text("<h1>overview</h1>")
    (root / "layers" / "conv1" / "index.html").write_text("<h1>conv1</h1>")
    (root / "plain").mkdir()
    (tmp_path / "secret.txt").write_text("outside")
    (root / "leak.txt").symlink_to(tmp_path / "secret.txt")
    (root / "leakdir").symlink_to(tmp_path)
    (root / "alias.html").symlink_to(root / "index.html")
    (root / "linked").mkdir()
    (root / "linked" / "index.html").symlink_to(tmp_path / "secret.txt")
    server, url = serve_in_thread(root)
    host, port = server.server_address[:2]
    yield root, host, port
    server.shutdown()
    server.server_close()


def _get(host, port, path, method="GET"):
    conn = http.client.HTTPConnection(host, port, timeout=5)
    conn.putrequest(method, path, skip_accept_encoding=True)  # the raw path, not normalized
    conn.endheaders()
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


def test_serves_pages_inside(site):
    _, host, port = site
    assert _get(host, port, "/") == (200, b"<h1>overview</h1>")
    assert _get(host, port, "/layers/conv1/") == (200, b"<h1>conv1</h1>")
    assert _get(host, port, "/layers/conv1/index.html?x=1#y")[0] == 200
    assert _get(host, port, "/alias.html") == (200, b"<h1>overview</h1>")  # a symlink that stays inside


@pytest.mark.parametrize("path", [
    "/../secret.txt", "/layers/../../secret.txt", "/%2e%2e/secret.txt", "/%2E%2E%2Fsecret.txt",
    "/layers/%2e%2e/%2e%2e/secret.txt", "/..%2fsecret.txt", "/leak.txt", "/leakdir/secret.txt",
    "/%00", "/..\\secret.txt", "/plain/", "/nope.html", "/linked/", "/linked/index.html",
])
def test_refuses_paths_outside_and_listings(site, path):
    _, host, port = site
    status, body = _get(host, port, path)
    assert status == 404
    assert b"outside" not in body


def test_read_only(site):
    _, host, port = site
    for method in ("POST", "PUT", "DELETE"):
        assert _get(host, port, "/index.html", method)[0] in (405, 501)


def test_resolve_request_directly(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b.html").write_text("x")
    root = tmp_path.resolve()
    assert resolve_request(root, "/a/b.html") == root / "a" / "b.html"
    assert resolve_request(root, "/a/%62.html") == root / "a" / "b.html"
    assert resolve_request(root, "/a/../a/b.html") is None
    assert resolve_request(root, "/missing") is None


def test_serve_bad_folder_exit_2(tmp_path, capsys):
    assert run(["serve", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_serve_port_in_use_exit_2(site, capsys):
    root, host, port = site
    assert run(["serve", str(root), "--port", str(port)]) == 2
    assert "cannot listen" in capsys.readouterr().err
