"""Report documents: escaping, atomic folders, refusals."""

from __future__ import annotations

import csv
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from xnn_toolkit.errors import AssetError, InputError  # noqa: E402
from xnn_toolkit.report import Card, Figure, Paragraph, Report, Table  # noqa: E402

EVIL = "<script>alert(1)</script>"


def _report():
    r = Report(f"title {EVIL}", meta={"seed": 0})
    s = r.section(f"class {EVIL}")
    s.add(Paragraph(f"layer {EVIL}"))
    s.add(Card({"name": EVIL, "accuracy": 0.98765}))
    s.add(Table("scores", [{"method": EVIL, "F_reg": 0.125}, {"method": "nn", "F_reg": 0.5}]))
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    s.add(Figure("curve", fig, caption=EVIL, formats=("png", "svg", "pdf")))
    return r


def test_write_escapes_every_text(tmp_path):
    index = _report().write(tmp_path / "rep")
    page = open(index, encoding="utf-8").read()
    assert "<script>" not in page
    assert page.count("&lt;script&gt;") >= 5
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "<script>" not in md


def test_tables_figures_manifest(tmp_path):
    _report().write(tmp_path / "rep")
    rows = list(csv.DictReader(open(tmp_path / "rep" / "tables" / "scores.csv")))
    assert rows[1] == {"method": "nn", "F_reg": "0.5"}
    assert json.load(open(tmp_path / "rep" / "tables" / "scores.json"))[0]["method"] == EVIL
    for ext in ("png", "svg", "pdf"):
        assert (tmp_path / "rep" / "figures" / f"curve.{ext}").stat().st_size > 100
    assert json.load(open(tmp_path / "rep" / "manifest.json"))["seed"] == 0


def test_refuses_non_empty_folder_unless_overwrite(tmp_path):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(InputError, match="overwrite"):
        _report().write(out)
    assert (out / "keep.txt").read_text() == "user data"
    _report().write(out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (out / "index.html").exists()


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    r = _report()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(r.sections[0].blocks[3].figure, "savefig", boom)
    with pytest.raises(AssetError, match="disk full"):
        r.write(tmp_path / "rep")
    assert list(tmp_path.iterdir()) == []


def test_bad_names(tmp_path):
    r = Report("t")
    r.section("s").add(Table("../evil", []))
    with pytest.raises(InputError, match="file name"):
        r.write(tmp_path / "x")
    with pytest.raises(InputError, match="is a file"):
        f = tmp_path / "file"
        f.write_text("")
        Report("t").write(f)


def test_folder_mode_links_and_drawing_once(tmp_path, monkeypatch):
    r = _report()
    fig = r.figures()[0]
    calls = []
    real = fig.figure.savefig
    monkeypatch.setattr(
        fig.figure, "savefig", lambda *a, **k: calls.append(k["format"]) or real(*a, **k)
    )
    r.render_figures()
    index = r.write(tmp_path / "rep")
    assert calls == ["png", "svg", "pdf"]  # drawn once, before the write
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "rep").st_mode & 0o777 == 0o777 & ~umask
    page = open(index, encoding="utf-8").read()
    assert "href='figures/curve.svg'>SVG</a>" in page and "figures/curve.pdf" in page
    bad = Report("t")
    bad.section("s").add(Figure("f", fig.figure, formats=("gif",)))
    with pytest.raises(InputError, match="unknown formats"):
        bad.write(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
