"""The package's front door: the notebook path is exported, and importing it stays light."""

import subprocess
import sys

import pytest

import xnn_toolkit


def test_import_loads_neither_report_nor_matplotlib():
    code = (
        "import sys, xnn_toolkit\n"
        "pre = ('xnn_toolkit.report', 'matplotlib')\n"
        "bad = sorted(m for m in sys.modules if m.startswith(pre))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("name", xnn_toolkit.__all__)
def test_every_exported_name_resolves(name):
    assert getattr(xnn_toolkit, name) is not None
    assert name in dir(xnn_toolkit)


def test_notebook_path_is_exported():
    for name in ("load_model", "extract", "explain", "score_dataset", "save_figure"):
        assert name in xnn_toolkit.__all__
    from xnn_toolkit.report.scoring import score_dataset
    from xnn_toolkit.viz import save_figure

    assert xnn_toolkit.score_dataset is score_dataset
    assert xnn_toolkit.save_figure is save_figure


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        xnn_toolkit.no_such_name  # noqa: B018
