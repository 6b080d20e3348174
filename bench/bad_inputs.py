"""How many generated cases each public entry point meets in the bad-input suite.

Runs ``tests/robustness/test_bad_inputs.py`` (hypothesis, derandomized, bounded example
counts) in one process with ``XNN_BAD_INPUT_COUNTS`` set, then prints a Markdown table: per
entry point the generated cases and how many of them returned a result (the others raised
an ``XnnError`` that names the bad argument), and the suite's wall time.

Usage: ``.venv/bin/python bench/bad_inputs.py``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        counts = Path(tmp) / "counts.json"
        env = {
            **os.environ,
            "XNN_BAD_INPUT_COUNTS": str(counts),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        t0 = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-n",
                "0",
                "-p",
                "no:cacheprovider",
                str(ROOT / "tests" / "robustness" / "test_bad_inputs.py"),
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            return proc.returncode
        data = json.loads(counts.read_text())
    print("| entry point | generated cases | returned a result |")
    print("|---|---:|---:|")
    for name, v in data.items():
        print(f"| `{name}` | {v['cases']} | {v['results']} |")
    total = sum(v["cases"] for v in data.values())
    print(
        f"\n{total} cases, {len(data)} entry points, suite wall time {seconds:.1f} s "
        f"(one process; {proc.stdout.strip().splitlines()[-1]})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
