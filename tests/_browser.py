"""Headless Chromium checks shared by the report and documentation tests.

A copy of a page gets a probe script in front that records resource and script errors and
every image's load state; Chromium renders it (``--dump-dom``) and the probe's JSON is read
back from the DOM.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (`make test` installs it with "
    "apt-get where it can); the browser check needs it",
)

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


def chromium(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run headless Chromium with a throw-away profile under ``cwd``."""
    with tempfile.TemporaryDirectory(dir=cwd) as profile:
        return subprocess.run(
            ["chromium", *_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=180,
        )


def probe_page(page: Path, cwd: Path) -> tuple[dict, list[str], int]:
    """Open ``page`` (inside a folder the caller may change) with the probe in front.

    Returns
    -------
    check : dict
        ``{"errors": [...], "images": [{"src", "complete", "width"}, ...]}`` from the probe.
    console : list of str
        Chromium's console lines (``:CONSOLE``) from its log.
    n_img : int
        ``<img`` tags in the page's HTML.
    """
    html = page.read_text(encoding="utf-8")
    probe = page.with_name("xnn-check.html")
    probe.write_text(html.replace("<head>", "<head>" + _CHECK, 1), encoding="utf-8")
    args = ["--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000", "--dump-dom"]
    res = chromium([*args, probe.as_uri()], cwd)
    assert res.returncode == 0, res.stderr[-2000:]
    found = re.search(r'<pre id="xnn-check">(.*?)</pre>', res.stdout, re.S)
    assert found, "the probe did not run: " + res.stdout[-500:]
    text = found.group(1)
    for a, b in (("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&amp;", "&")):
        text = text.replace(a, b)
    console = [line for line in res.stderr.splitlines() if ":CONSOLE" in line]
    return json.loads(text), console, html.count("<img ")


def broken_images(check: dict) -> list[str]:
    """Images that did not load."""
    return [im["src"] for im in check["images"] if not im["complete"] or im["width"] <= 0]
