"""Math rendered to SVG at build time with matplotlib's mathtext.

The site must work offline (the browser test has no network, and so may a reader): MathJax
from a CDN would fail to load, and LaTeX is not a dependency. Matplotlib, already required,
renders the TeX subset the methods pages use.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.errors import ExtensionError


def _svg(app: Sphinx, latex: str, display: bool) -> str:
    from matplotlib import mathtext
    from matplotlib.font_manager import FontProperties

    key = hashlib.sha1(f"{display}|{latex}".encode()).hexdigest()[:16]
    rel = f"_images/math/{key}.svg"
    out = Path(app.builder.outdir) / rel
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        size = 13 if display else 11
        try:
            mathtext.math_to_image(f"${latex}$", buf, prop=FontProperties(size=size), format="svg")
        except ValueError as exc:
            raise ExtensionError(f"mathtext cannot render {latex!r}: {exc}") from exc
        out.write_bytes(buf.getvalue())
    return rel


def _rel(self, rel: str) -> str:
    depth = self.builder.current_docname.count("/")
    return "../" * depth + rel


def _inline(self, node: nodes.math) -> None:
    latex = " ".join(node.astext().split())
    src = _rel(self, _svg(self.builder.app, latex, False))
    alt = self.encode(latex)
    self.body.append(f'<img class="math" src="{src}" alt="{alt}" style="vertical-align:middle"/>')
    raise nodes.SkipNode


def _block(self, node: nodes.math_block) -> None:
    latex = node.astext().strip()
    self.body.append('<div class="math" style="text-align:center;margin:0.8em 0">')
    if node.get("label"):
        self.body.append(f'<span class="eqno">({node["number"]})</span>')
    for part in (p for p in latex.split("\n\n") if p.strip()):
        src = _rel(self, _svg(self.builder.app, " ".join(part.split()), True))
        self.body.append(f'<p><img src="{src}" alt="{self.encode(part)}"/></p>')
    self.body.append("</div>")
    raise nodes.SkipNode


def setup(app: Sphinx) -> dict:
    # mathtext logs an INFO line each time it draws \mathbb from STIX; not news to a reader
    import logging

    logging.getLogger("matplotlib.mathtext").setLevel(logging.WARNING)
    app.add_html_math_renderer("mathsvg", (_inline, None), (_block, None))
    app.config.html_math_renderer = "mathsvg"
    return {"parallel_read_safe": True, "parallel_write_safe": True}
