"""Sphinx configuration of the xnn_toolkit documentation.

The API pages are generated from the package's ``__all__`` lists when the build starts, so
moving a name between modules needs no edit here: ``make docs`` picks up the new layout.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE / "_ext"))
os.environ.setdefault("MPLBACKEND", "Agg")

import xnn_toolkit  # noqa: E402

project = "xnn_toolkit"
author = "the xnn_toolkit authors"
copyright = "the xnn_toolkit authors"  # noqa: A001
release = version = getattr(xnn_toolkit, "__version__", "0.1.0")

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "mathsvg",
    "sphinx.ext.intersphinx",
    "numpydoc",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "examples/*.py", "examples/README.txt", "**.ipynb_checkpoints"]
templates_path = ["_templates"]
html_theme = "furo"
html_title = "xnn_toolkit"
html_static_path = ["_static"]
html_css_files = ["xnn.css"]
html_math_renderer = "mathsvg"  # offline: see _ext/mathsvg.py

autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": True, "inherited-members": False, "show-inheritance": True}
autodoc_typehints = "none"  # numpydoc's Parameters sections already carry the types
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
myst_enable_extensions = ["dollarmath"]
suppress_warnings = ["config.cache"]
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}  # no network at build time

nitpicky = True
# Third-party and standard-library types the docstrings name: without intersphinx (no network)
# Sphinx cannot resolve them; the names themselves are unambiguous to a reader.
nitpick_ignore_regex = [
    (
        r"py:.*",
        r"(torch|np|numpy|nn|pathlib|os|collections|typing|argparse|matplotlib|plt|PIL|"
        r"sklearn|safetensors|captum|quantus|pytorch_grad_cam|timm|torchvision|scipy|json|enum|"
        r"dataclasses|abc|contextlib|concurrent|io|types|warnings|numbers)(\..*)?",
    ),
    (
        r"py:.*",
        r"(Tensor|Module|ndarray|Path|PathLike|Callable|Iterable|Iterator|Sequence|"
        r"Mapping|Any|Literal|Optional|Union|Figure|Axes|Dataset|DataLoader|Generator|Enum|"
        r"ArrayLike|DType|dtype|device|Parameter|RemovableHandle|Self|TypeVar|Protocol|"
        r"IntEnum|NamedTuple|ABC|Exception|RuntimeWarning|UserWarning|ValueError|TypeError|"
        r"KeyError|LookupError|FileNotFoundError|RuntimeError|OSError|IndexError|Warning|"
        r"StrPath|T|T_co|optional|default|callable|array-like|array_like|iterable|sequence|"
        r"mapping|tensor|file-like|path-like|int|float|str|bool|bytes|dict|list|tuple|set|"
        r"None|object|type|slice|complex|frozenset|range|NoneType|Ellipsis)",
    ),
]

# Private base classes appear in "Bases:" lines; they have no page by design.
nitpick_ignore_regex.append((r"py:.*", r"xnn_toolkit\.(.*\.)?_\w+(\..*)?"))
# Docstrings inside xnn_toolkit/ that name objects with no public page (internal modules,
# attributes, helpers). Each is a docstring to reword, not a documentation fault; the list is
# kept explicit so that a NEW broken reference still fails the build.
KNOWN_UNRESOLVED = [
    # attributes, constants and helpers named in docstrings that have no page
    "AttributionInfo.rules",
    "PAPER_BETAS",
    "STAGES",
    "TEST_SEED",
    "TRAIN_SEED",
    "XNN_KINDS",
    "_attribute",
    "all_ap",
    "all_iou",
    "composite_2x2",
    "default_g",
    "gate_similarity",
    "hit_rate",
    "information_heatmap",
    "layer",
    "layers",
    "misclassification_analysis",
    "part_groups",
    "path_similarity",
    # functions and classes of internal modules
    "xnn_toolkit.heads._nmf_solvers.fit_full",
    "xnn_toolkit.heads._nmf_solvers.fit_online",
    "xnn_toolkit.heads.gate_objective.block_order",
    "xnn_toolkit.report.heatmaps.class_method",
    "xnn_toolkit.report.score_metrics.MetricSpec",
]
nitpick_ignore_regex += [(r"py:.*", re.escape(t)) for t in KNOWN_UNRESOLVED]

# ---------------------------------------------------------------- API pages from __all__

# Titles of the API pages; a package not listed here gets the first line of its docstring.
API_TITLES = {
    "xnn_toolkit": "Top level",
    "xnn_toolkit.attribution": "Attribution methods",
    "xnn_toolkit.heads": "Explanation heads",
    "xnn_toolkit.metrics": "Metrics",
    "xnn_toolkit.data": "Data",
    "xnn_toolkit.report": "Reports and scoring",
    "xnn_toolkit.interop": "Interoperability",
    "xnn_toolkit.figures": "Figures",
    "xnn_toolkit.viz": "Figures",
    "xnn_toolkit.errors": "Errors and warnings",
}


def _public_packages() -> list[tuple[str, str, list[str]]]:
    """The top level, the error family and every subpackage of this checkout with an ``__all__``."""
    import pkgutil

    names = ["xnn_toolkit", "xnn_toolkit.errors"] + sorted(
        f"xnn_toolkit.{m.name}"
        for m in pkgutil.iter_modules(xnn_toolkit.__path__)
        if m.ispkg and not m.name.startswith("_")
    )
    found = []
    for name in names:
        mod = importlib.import_module(name)
        if not Path(mod.__file__).resolve().is_relative_to(ROOT):
            continue  # only this checkout's packages (an editable install may supply others)
        public = list(getattr(mod, "__all__", []))
        if public:
            doc = (mod.__doc__ or name).strip().splitlines()[0].rstrip(".")
            found.append((name, API_TITLES.get(name, doc), public))
    return found


def _write_api_pages() -> None:
    out = HERE / "api"
    out.mkdir(exist_ok=True)
    pages = []
    for name, title, names in _public_packages():
        slug = name.replace(".", "_")
        pages.append(slug)
        head = f"``{name}`` — {title}"
        lines = [
            ".. This page is generated by docs/conf.py from __all__; edits are overwritten.",
            "",
            head,
            "=" * len(head),
            "",
            f".. automodule:: {name}",
            "   :no-members:",
            "",
            f".. currentmodule:: {name}",
            "",
            ".. autosummary::",
            "   :toctree: generated",
            "   :nosignatures:",
            "",
        ]
        lines += [f"   {n}" for n in sorted(set(names), key=str.lower)]
        _write_if_changed(out / f"{slug}.rst", "\n".join(lines) + "\n")
    index = [
        ".. This page is generated by docs/conf.py; edits are overwritten.",
        "",
        "API reference",
        "=============",
        "",
        "Every public name: those of ``xnn_toolkit.__all__`` and of each subpackage's "
        "``__all__``. Errors derive from :class:`xnn_toolkit.XnnError`.",
        "",
        ".. toctree::",
        "   :maxdepth: 1",
        "",
    ] + [f"   {p}" for p in pages]
    _write_if_changed(out / "index.rst", "\n".join(index) + "\n")
    # pages of names or packages that have since moved or gone would be orphans
    for stale in out.glob("*.rst"):
        if stale.stem not in pages and stale.stem != "index":
            stale.unlink()
    entries = {f"{name}.{n}" for name, _title, names in _public_packages() for n in names}
    for stale in (out / "generated").glob("*.rst"):
        if stale.stem not in entries:
            stale.unlink()


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------- CLI help from argparse


def _write_cli_help() -> None:
    """``xnn <command> --help`` of every subcommand, captured from the real parser."""
    from xnn_toolkit.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    lines = [
        ".. This page is generated by docs/conf.py from xnn_toolkit.cli.build_parser().",
        "",
        "``xnn --help``",
        "--------------",
        "",
        ".. code-block:: text",
        "",
    ]
    lines += ["   " + ln for ln in _help(parser).splitlines()]
    for cmd, p in sub.choices.items():
        title = f"``xnn {cmd} --help``"
        lines += [
            "",
            f".. _cli-{cmd}:",
            "",
            title,
            "-" * len(title),
            "",
            ".. code-block:: text",
            "",
        ]
        lines += ["   " + ln for ln in _help(p).splitlines()]
    _write_if_changed(HERE / "guide" / "cli_help.rst.inc", "\n".join(lines) + "\n")


def _help(p) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        os.environ["COLUMNS"] = "96"
        p.print_help()
    return buf.getvalue()


def _duplicates() -> list[str]:
    """Names exported by the top level and again by a subpackage: documented once (top level)."""
    top = {id(getattr(xnn_toolkit, n)) for n in xnn_toolkit.__all__}
    dups = []
    for name, _title, names in _public_packages():
        if name == "xnn_toolkit":
            continue
        mod = importlib.import_module(name)
        dups += [f"{name}.{n}" for n in names if id(getattr(mod, n)) in top]
    return dups


autosummary_context = {"duplicates": _duplicates()}


def _skip_member(app, what, name, obj, skip, options):
    # members a class inherits from scikit-learn (set_fit_request, ...) or matplotlib (a Figure
    # subclass's set_*) are theirs to document, and their docstrings use their own roles
    if str(getattr(obj, "__module__", "") or "").startswith(("sklearn", "matplotlib")):
        return True
    qual = getattr(obj, "__qualname__", "")
    if "RequestMethod" in str(qual):
        return True
    return None


def _public_objects() -> dict[int, str]:
    """id of each documented object -> the public name its page has."""
    found: dict[int, str] = {}
    dups = set(autosummary_context["duplicates"])
    for name, _title, names in _public_packages():
        mod = importlib.import_module(name)
        for n in names:
            full = f"{name}.{n}"
            if full not in dups:
                found.setdefault(id(getattr(mod, n)), full)
    return found


def _lookup(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _resolve_by_object(app, env, node, contnode):
    """A docstring names an object by its defining module (``xnn_toolkit.layers.resolve_layer``)
    or by a short name (``ClassPaths.hit_rates``); its page is under the public name
    (``xnn_toolkit.resolve_layer``, ``xnn_toolkit.heads.ClassPaths.hit_rates``)."""
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    if node.get("reftype") == "mod" and target.startswith("xnn_toolkit."):
        # an internal module exists but has no page of its own: its name, unlinked
        return contnode if _lookup(target) is not None else None
    public = _PUBLIC.get(id(_lookup(target))) if target.startswith("xnn_toolkit.") else None
    if public is None and not target.startswith("xnn_toolkit."):
        head, _, rest = target.partition(".")
        ends = {full for full in _PUBLIC.values() if full.endswith("." + head)}
        if len(ends) == 1:
            public = ends.pop() + ("." + rest if rest else "")
    if public is None or public == target:
        return None
    domain = env.get_domain("py")
    for role in ("obj", "class", "func", "meth", "attr"):
        ref = domain.resolve_xref(
            env, node.get("refdoc"), app.builder, role, public, node, contnode
        )
        if ref is not None:
            return ref
    return None


_PUBLIC: dict[int, str] = {}


def setup(app):
    app.connect("autodoc-skip-member", _skip_member)
    app.connect("missing-reference", _resolve_by_object)


def _write_model_cards() -> None:
    """One table row per bundled model card (assets/models/*.json), read when the site builds."""
    import json

    rows = []
    for card_file in sorted((ROOT / "assets" / "models").glob("*.json")):
        card = json.loads(card_file.read_text(encoding="utf-8"))
        acc = card.get("test_accuracy")
        acc_text = f"{100 * acc:.2f} %" if isinstance(acc, float) and acc <= 1 else str(acc or "—")
        size = "x".join(str(v) for v in card.get("input_size", []))
        rows.append(
            [
                f"``bundled:{card['name']}``",
                f"``{card['arch']}``",
                str(card.get("dataset", "")),
                size,
                str(card.get("num_classes", "")),
                acc_text,
            ]
        )
    lines = [
        ".. list-table::",
        "   :header-rows: 1",
        "",
        "   * - spec",
        "     - architecture",
        "     - data",
        "     - input",
        "     - classes",
        "     - test accuracy (card)",
    ]
    for row in rows:
        lines.append("   * - " + row[0])
        lines += ["     - " + cell.replace("\n", " ") for cell in row[1:]]
    _write_if_changed(HERE / "guide" / "model_cards.rst.inc", "\n".join(lines) + "\n")


_write_api_pages()
_write_cli_help()
_write_model_cards()
_PUBLIC.update(_public_objects())

# ---------------------------------------------------------------- gallery

warnings.filterwarnings("ignore", message="Matplotlib is currently using agg")


def _figure_scraper(block, block_vars, gallery_conf, **kwargs):
    """Figures the toolkit's figure functions return: they are built without pyplot (so a
    library call never opens a window), which sphinx-gallery's own scraper cannot see."""
    from matplotlib.figure import Figure
    from sphinx_gallery.scrapers import figure_rst

    env = block_vars["example_globals"]
    seen = env.setdefault("__xnn_scraped__", set())
    paths = []
    for value in list(env.values()):
        if isinstance(value, Figure) and value.canvas.manager is None and id(value) not in seen:
            seen.add(id(value))
            path = next(block_vars["image_path_iterator"])
            value.savefig(path, dpi=100)
            paths.append(path)
    return figure_rst(paths, gallery_conf["src_dir"])


sphinx_gallery_conf = {
    "examples_dirs": ["examples"],
    "gallery_dirs": ["auto_examples"],
    "filename_pattern": r"/plot_",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "plot_gallery": "True",
    "matplotlib_animations": False,
    "reset_modules": ("matplotlib", "seaborn"),
    "show_memory": False,
    "image_scrapers": ("matplotlib", _figure_scraper),
}
