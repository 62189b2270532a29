"""OUT/report/index.html, loaded in a real browser: Debian's chromium, headless (installed by .ci/run)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import classify, real_photos, segment

# Runs before anything else on the page: records script errors and resources that fail to load.
WATCH = """<script>window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || (e.target && (e.target.src || e.target.href)))), true);
window.addEventListener('load', () => {
  const images = [...document.images];
  const figures = {};
  document.querySelectorAll('[data-figure]').forEach(cell => figures[cell.dataset.figure] = cell.textContent);
  const pre = document.createElement('pre');
  pre.id = 'checks';
  pre.textContent = JSON.stringify({images: images.length, broken: images.filter(i => !(i.naturalWidth > 0)).length,
    errors: window.__errors, figures: figures, svgs: document.querySelectorAll('svg').length});
  document.body.appendChild(pre);
});</script>"""


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium")
    assert found, "Debian's chromium is needed (apt-get install chromium; .ci/run installs it)"
    return found


def _browser(chromium: str, page: Path, tmp_path: Path) -> dict:
    """What the watch script saw once the page loaded, and a screenshot of it."""
    watched = tmp_path / "watched.html"
    watched.write_text(page.read_text().replace("<head>", "<head>" + WATCH, 1))
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--virtual-time-budget=5000",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", watched.as_uri()], capture_output=True, text=True, timeout=120).stdout
    checks = json.loads(re.search(r'<pre id="checks">(.*?)</pre>', dom, re.S).group(1).replace("&quot;", '"'))
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()], capture_output=True,
                   timeout=120)
    checks["screenshot_std"] = float(np.asarray(Image.open(shot).convert("L"), dtype=np.float32).std())
    return checks


def _photos(folder: Path, count: int) -> None:
    folder.mkdir()
    for i, photo in enumerate(real_photos(count)):
        photo.save(folder / f"{i:02d}.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")


def _check_page(out: Path, checks: dict, galleries_at_least: int) -> None:
    page = (out / "report" / "index.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", page), "the page fetches something"
    assert len(page.encode()) < 3 * 2**20
    summary = pq.read_table(out / "report" / "summary.parquet").to_pylist()[0]
    assert checks["errors"] == [] and checks["broken"] == 0
    assert checks["images"] >= galleries_at_least and checks["svgs"] >= 1
    assert int(checks["figures"]["images"]) == summary["n_images"]
    assert int(checks["figures"]["errors"]) == summary["n_errors"] == 1
    assert checks["screenshot_std"] > 10  # not a blank page
    assert "broken.jpg" in page  # the error row, with its message
    return page


def test_a_classify_report_loads_in_chromium_with_its_figures_and_thumbnails(tmp_path, tiny_model, chromium):
    _photos(tmp_path / "in", 12)
    classify(tmp_path / "in", tmp_path / "out", tiny_model)
    checks = _browser(chromium, tmp_path / "out" / "report" / "index.html", tmp_path)
    page = _check_page(tmp_path / "out", checks, galleries_at_least=2 * 12)
    assert "Least confident" in page and "Top-1 confidence" in page


def test_a_segment_report_shows_overlays_with_their_legends(tmp_path, tiny_segmenter, chromium):
    _photos(tmp_path / "in", 6)
    segment(tmp_path / "in", tmp_path / "out", tiny_segmenter, batch_size=2)
    checks = _browser(chromium, tmp_path / "out" / "report" / "index.html", tmp_path)
    page = _check_page(tmp_path / "out", checks, galleries_at_least=6)
    assert page.count('class="swatch"') >= 6 and "Class pixel shares" in page
