"""The documentation site: it builds with no warning, has a page for every public name and an
executed gallery, and its pages open in headless Chromium with every image loaded and a quiet
console.

``make test`` runs ``make docs`` first; this module reuses that build when it is newer than
every source it depends on, and otherwise builds the site itself (about a minute on 2 cores).
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("sphinx", reason="the docs extra is not installed (pip install -e '.[docs]')")
pytest.importorskip("sphinx_gallery", reason="the docs extra is not installed")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GENERATED = {"_build", "api", "auto_examples"}


def _sources() -> list[Path]:
    files = [p for p in (ROOT / "xnn_toolkit").rglob("*.py")]
    for p in DOCS.rglob("*"):
        rel = p.relative_to(DOCS).parts
        if p.is_file() and rel[0] not in GENERATED and not p.name.endswith(".inc"):
            files.append(p)
    return files


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    built = DOCS / "_build" / "html" / "index.html"
    if built.exists() and built.stat().st_mtime >= max(p.stat().st_mtime for p in _sources()):
        return built.parent
    out = tmp_path_factory.mktemp("docs") / "html"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-b",
            "html",
            "-W",
            "--keep-going",
            "-n",
            "-q",
            "-j",
            "2",
            str(DOCS),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert res.returncode == 0, "the docs build warned or failed:\n" + res.stderr[-4000:]
    return out


def test_every_public_name_has_a_page(site):
    packages = ["xnn_toolkit"] + [
        f"xnn_toolkit.{p.name}"
        for p in sorted((ROOT / "xnn_toolkit").iterdir())
        if (p / "__init__.py").exists()
    ]
    missing = []
    for name in packages:
        mod = importlib.import_module(name)
        for n in getattr(mod, "__all__", []):
            # a name the top level re-exports is documented once, under the top level
            pages = [
                site / "api" / "generated" / f"{name}.{n}.html",
                site / "api" / "generated" / f"xnn_toolkit.{n}.html",
            ]
            if not any(p.exists() for p in pages):
                missing.append(f"{name}.{n}")
    assert missing == []


def test_gallery_executed_with_figures(site):
    pages = sorted((site / "auto_examples").glob("plot_*.html"))
    figure = re.compile(r'<img [^>]*src="[^"]*sphx_glr_plot_[^"]*_0\d\d\.png"')
    with_figures = [p for p in pages if figure.search(p.read_text(encoding="utf-8"))]
    assert len(with_figures) >= 10, [p.name for p in pages]


def test_methods_pages_cite_nothing_outside_the_repository(site):
    for page in (DOCS / "methods").glob("*.rst"):
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"shared/|METHODS §|seed 00\d", text), page.name


# ------------------------------------------------------------------------ browser check

_CHECK = """<script>
window.__xnn = {errors: []};
window.addEventListener("error", function (e) {
  var t = e.target;
  window.__xnn.errors.push(t && t.tagName ? "resource " + t.tagName + " " + (t.src || t.href)
                                          : "script " + e.message);
}, true);
window.addEventListener("load", function () {
  var out = {errors: window.__xnn.errors, images: []};
  for (var i = 0; i < document.images.length; i++) {
    var im = document.images[i];
    out.images.push({src: im.getAttribute("src"), complete: im.complete, width: im.naturalWidth});
  }
  var pre = document.createElement("pre");
  pre.id = "xnn-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""

_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (`make test` installs it with "
    "apt-get where it can); the browser check needs it",
)
@pytest.mark.parametrize(
    "page", ["index.html", "auto_examples/plot_02_cmwp.html", "methods/excitation.html"]
)
def test_page_opens_in_headless_chromium(site, page, tmp_path):
    copy = tmp_path / "site"
    shutil.copytree(site, copy)
    html = (copy / page).read_text(encoding="utf-8")
    n_img = html.count("<img ")
    probe = (copy / page).with_name("xnn-check.html")
    probe.write_text(html.replace("<head>", "<head>" + _CHECK, 1), encoding="utf-8")
    with tempfile.TemporaryDirectory(dir=tmp_path) as profile:
        res = subprocess.run(
            [
                "chromium",
                *_FLAGS,
                f"--user-data-dir={profile}",
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=15000",
                "--dump-dom",
                probe.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert res.returncode == 0, res.stderr[-2000:]
    found = re.search(r'<pre id="xnn-check">(.*?)</pre>', res.stdout, re.S)
    assert found, "the probe did not run: " + res.stdout[-500:]
    check = json.loads(
        found.group(1)
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", '"')
        .replace("&amp;", "&")
    )
    assert len(check["images"]) >= n_img > 0
    broken = [im["src"] for im in check["images"] if not im["complete"] or im["width"] <= 0]
    assert broken == []
    assert check["errors"] == []
    errors = [ln for ln in res.stderr.splitlines() if ":CONSOLE" in ln and "ERROR" in ln.upper()]
    assert errors == [], errors
