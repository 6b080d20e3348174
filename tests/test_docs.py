"""The documentation site: it builds with no warning, has a page for every public name and an
executed gallery, and its pages open in headless Chromium with every image loaded and a quiet
console.

``make test`` runs ``make docs`` first; this module reuses that build when it is newer than
every source it depends on, and otherwise builds the site itself (about a minute on 2 cores).
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _browser import broken_images, needs_chromium, probe_page

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


@needs_chromium
@pytest.mark.parametrize(
    "page", ["index.html", "auto_examples/plot_02_cmwp.html", "methods/excitation.html"]
)
def test_page_opens_in_headless_chromium(site, page, tmp_path):
    copy = tmp_path / "site"
    shutil.copytree(site, copy)
    check, console, n_img = probe_page(copy / page, tmp_path)
    assert len(check["images"]) >= n_img > 0
    assert broken_images(check) == []
    assert check["errors"] == []
    errors = [ln for ln in console if "ERROR" in ln.upper()]
    assert errors == [], errors
