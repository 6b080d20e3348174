"""A report as plain data, written to a self-contained folder (HTML, Markdown, CSV, JSON).

A :class:`Report` is a list of sections; a section holds blocks (paragraphs, key-value
cards, tables, figures). :meth:`Report.write` renders ``index.html`` (every text escaped,
figures as relative PNG links, so it opens from disk with no server), ``report.md``, one CSV
and JSON per table and ``manifest.json``. The folder is built next to its destination and
moved into place at the end, so a failure never leaves half a report.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import AssetError, InputError

__all__ = ["Report", "Section", "Paragraph", "Card", "Table", "Figure", "progress_bar"]


@dataclass
class Paragraph:
    """Plain text (escaped)."""

    text: str


@dataclass
class Card:
    """Key-value pairs shown as a two-column table (e.g. a model card)."""

    items: Mapping[str, Any]


@dataclass
class Table:
    """Rows of a table; every row a mapping from column name to value.

    Attributes
    ----------
    name : str
        File stem for the CSV / JSON copies (letters, digits, ``-`` and ``_``).
    rows : list of dict
    columns : list of str, optional
        Column order (default: keys of the first row, then any new keys).
    caption : str
    """

    name: str
    rows: Sequence[Mapping[str, Any]]
    columns: Sequence[str] | None = None
    caption: str = ""

    def header(self) -> list[str]:
        if self.columns is not None:
            return list(self.columns)
        cols: list[str] = []
        for r in self.rows:
            cols += [k for k in r if k not in cols]
        return cols


@dataclass
class Figure:
    """A matplotlib figure (saved as PNG in ``figures/``; SVG/PDF too on request).

    Attributes
    ----------
    name : str
        File stem (letters, digits, ``.``, ``-`` and ``_``).
    figure : matplotlib.figure.Figure
    caption : str
    formats : tuple of str
        Extra formats besides PNG (``"svg"``, ``"pdf"``).
    dpi : int
        Resolution of the raster formats.
    """

    name: str
    figure: Any
    caption: str = ""
    formats: tuple[str, ...] = ("png",)
    dpi: int = 110
    _files: dict[str, bytes] = field(default_factory=dict, init=False, repr=False, compare=False)

    def render(self) -> dict[str, bytes]:
        """Draw the figure in PNG and each of its formats, once (later calls reuse it).

        Returns
        -------
        dict of str to bytes
            File content per format.
        """
        for fmt in dict.fromkeys(("png", *self.formats)):
            if fmt not in self._files:
                buf = io.BytesIO()
                self.figure.savefig(buf, format=fmt, dpi=self.dpi, bbox_inches="tight")
                self._files[fmt] = buf.getvalue()
        return self._files


Block = Paragraph | Card | Table | Figure


@dataclass
class Section:
    """A titled list of blocks."""

    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, block: Block) -> Section:
        self.blocks.append(block)
        return self


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


_SAFE = re.compile(r"^[A-Za-z0-9_.-]+$")

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:1.6em;border-bottom:1px solid #bbb}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #ddd}
figcaption,caption{color:#555;font-size:.9em}nav a{margin-right:1em}
"""


class Report:
    """A report under construction.

    Parameters
    ----------
    title : str
        Shown at the top of every rendering.
    meta : dict, optional
        Free-form run information kept in ``manifest.json`` (versions, seeds, timings).
    """

    def __init__(self, title: str, meta: Mapping[str, Any] | None = None) -> None:
        self.title = title
        self.meta = dict(meta or {})
        self.sections: list[Section] = []

    def section(self, title: str) -> Section:
        """Append and return a new section."""
        s = Section(title)
        self.sections.append(s)
        return s

    def figures(self) -> list[Figure]:
        """Every figure of the report, in order."""
        return [b for s in self.sections for b in s.blocks if isinstance(b, Figure)]

    def render_figures(self, progress: bool = False) -> None:
        """Draw every figure now (e.g. to time it apart from the write; see Figure.render)."""
        bar = progress_bar(self.figures(), desc="figures", disable=not progress, leave=False)
        for fig in bar:
            fig.render()

    # ------------------------------------------------------------------ rendering
    def _check(self) -> None:
        names = set()
        for s in self.sections:
            for b in s.blocks:
                if isinstance(b, Table | Figure):
                    if not _SAFE.match(b.name):
                        raise InputError(
                            f"table / figure name {b.name!r} must use only letters, digits, "
                            "'.', '-' and '_' (it becomes a file name)"
                        )
                    if isinstance(b, Figure):
                        bad = [f for f in b.formats if f not in ("png", "svg", "pdf")]
                        if bad:
                            raise InputError(
                                f"figure {b.name!r}: unknown formats {bad}; use png, svg, pdf"
                            )
                    key = (type(b).__name__, b.name)
                    if key in names:
                        raise InputError(f"two {type(b).__name__.lower()}s are named {b.name!r}")
                    names.add(key)

    def _html(self) -> str:
        e = html.escape
        out = [
            "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
            f"<title>{e(self.title)}</title><style>{_CSS}</style></head><body>",
            f"<h1>{e(self.title)}</h1><nav>",
        ]
        out += [f"<a href='#s{i}'>{e(s.title)}</a>" for i, s in enumerate(self.sections)]
        out.append("</nav>")
        for i, s in enumerate(self.sections):
            out.append(f"<section id='s{i}'><h2>{e(s.title)}</h2>")
            for b in s.blocks:
                if isinstance(b, Paragraph):
                    out.append(f"<p>{e(b.text)}</p>")
                elif isinstance(b, Card):
                    rows = "".join(
                        f"<tr><th>{e(str(k))}</th><td>{e(_fmt(v))}</td></tr>"
                        for k, v in b.items.items()
                    )
                    out.append(f"<table class='card'>{rows}</table>")
                elif isinstance(b, Table):
                    cols = b.header()
                    head = "".join(f"<th>{e(c)}</th>" for c in cols)
                    body = "".join(
                        "<tr>"
                        + "".join(f"<td>{e(_fmt(r.get(c, '')))}</td>" for c in cols)
                        + "</tr>"
                        for r in b.rows
                    )
                    cap = f"<caption>{e(b.caption)}</caption>" if b.caption else ""
                    links = (
                        f"<p><a href='tables/{e(b.name)}.csv'>CSV</a> "
                        f"<a href='tables/{e(b.name)}.json'>JSON</a></p>"
                    )
                    out.append(f"<table>{cap}<tr>{head}</tr>{body}</table>{links}")
                elif isinstance(b, Figure):
                    cap = f"<figcaption>{e(b.caption)}</figcaption>" if b.caption else ""
                    alt = e(b.caption or b.name)
                    extra = [f for f in dict.fromkeys(b.formats) if f != "png"]
                    links = "".join(
                        f" <a href='figures/{e(b.name)}.{f}'>{f.upper()}</a>" for f in extra
                    )
                    links = f"<p>{links.strip()}</p>" if links else ""
                    out.append(
                        f"<figure><img src='figures/{e(b.name)}.png' alt='{alt}'>{cap}"
                        f"</figure>{links}"
                    )
            out.append("</section>")
        out.append("</body></html>")
        return "\n".join(out)

    def _markdown(self) -> str:
        lines = [f"# {_md(self.title)}", ""]
        for s in self.sections:
            lines += [f"## {_md(s.title)}", ""]
            for b in s.blocks:
                if isinstance(b, Paragraph):
                    lines += [_md(b.text), ""]
                elif isinstance(b, Card):
                    lines += ["| | |", "|---|---|"]
                    lines += [f"| {_md(str(k))} | {_md(_fmt(v))} |" for k, v in b.items.items()]
                    lines.append("")
                elif isinstance(b, Table):
                    cols = b.header()
                    if b.caption:
                        lines += [f"*{_md(b.caption)}*", ""]
                    lines.append("| " + " | ".join(_md(c) for c in cols) + " |")
                    lines.append("|" + "---|" * len(cols))
                    for r in b.rows:
                        cells = " | ".join(_md(_fmt(r.get(c, ""))) for c in cols)
                        lines.append(f"| {cells} |")
                    lines.append("")
                elif isinstance(b, Figure):
                    lines += [f"![{_md(b.caption or b.name)}](figures/{b.name}.png)", ""]
        return "\n".join(lines)

    def write(self, out: str | os.PathLike, *, overwrite: bool = False) -> str:
        """Write the report folder and return the path of its ``index.html``.

        Parameters
        ----------
        out : path
            Destination folder. It must not exist or be empty, unless ``overwrite``.
        overwrite : bool
            Replace an existing non-empty folder.

        Raises
        ------
        InputError
            ``out`` exists and is not empty (without ``overwrite``), or is a file.
        AssetError
            The folder cannot be written; nothing is left behind.
        """
        self._check()
        out = os.path.abspath(os.fspath(out))
        if os.path.isfile(out):
            raise InputError(f"--out {out!r} is a file; give a folder path")
        if os.path.isdir(out) and os.listdir(out) and not overwrite:
            raise InputError(
                f"the output folder {out!r} exists and is not empty; pass overwrite=True "
                "(--overwrite) or choose another folder"
            )
        parent = os.path.dirname(out)
        try:
            os.makedirs(parent, exist_ok=True)
            # os.mkdir honours the umask (mkdtemp would leave the report readable by its
            # owner only once renamed into place)
            tmp = os.path.join(parent, f".tmp-report-{uuid.uuid4().hex}")
            os.mkdir(tmp)
        except OSError as exc:
            raise AssetError(f"cannot write the report to {out!r}: {exc}") from exc
        try:
            self._write_into(tmp)
            if os.path.isdir(out):
                old = tempfile.mkdtemp(dir=parent, prefix=".old-report-")
                os.rename(out, os.path.join(old, "r"))
                os.rename(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, out)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise AssetError(f"cannot write the report to {out!r}: {exc}") from exc
            raise
        return os.path.join(out, "index.html")

    def _write_into(self, folder: str) -> None:
        os.makedirs(os.path.join(folder, "figures"))
        os.makedirs(os.path.join(folder, "tables"))
        tables = []
        for s in self.sections:
            for b in s.blocks:
                if isinstance(b, Figure):
                    for fmt, data in b.render().items():
                        with open(os.path.join(folder, "figures", f"{b.name}.{fmt}"), "wb") as f:
                            f.write(data)
                elif isinstance(b, Table):
                    cols = b.header()
                    buf = io.StringIO()
                    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
                    w.writeheader()
                    w.writerows(b.rows)
                    with open(os.path.join(folder, "tables", f"{b.name}.csv"), "w") as f:
                        f.write(buf.getvalue())
                    with open(os.path.join(folder, "tables", f"{b.name}.json"), "w") as f:
                        json.dump([dict(r) for r in b.rows], f, indent=1, default=str)
                    tables.append(b.name)
        with open(os.path.join(folder, "index.html"), "w", encoding="utf-8") as f:
            f.write(self._html())
        with open(os.path.join(folder, "report.md"), "w", encoding="utf-8") as f:
            f.write(self._markdown())
        manifest = {"title": self.title, "tables": tables, **self.meta}
        with open(os.path.join(folder, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1, default=str)


def progress_bar(*args: Any, disable: bool = False, **kw: Any) -> Any:
    """A tqdm bar: ``tqdm.auto`` when shown; when hidden the plain one, so that a notebook
    without ipywidgets gets no warning from importing ``tqdm.auto``."""
    if disable:
        from tqdm import tqdm

        return tqdm(*args, disable=True, **kw)
    from tqdm.auto import tqdm

    return tqdm(*args, **kw)


def _md(text: str) -> str:
    return html.escape(text, quote=False).replace("|", "\\|")
