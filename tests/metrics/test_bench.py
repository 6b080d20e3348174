import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_metrics_quick_runs_and_agrees():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "metrics.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    results = dict(re.findall(r"^RESULT (\S+) (\S+) \S+$", out, flags=re.M))
    assert float(results["voronoi_max_abs_diff_vs_literal"]) < 1e-6
    for name in ("pointing_game", "energy_pointing_game", "top_k_intersection"):
        assert float(results[f"{name}_max_abs_diff_vs_quantus"]) < 1e-6
        assert float(results[f"{name}_quantus_over_ours"]) > 0
