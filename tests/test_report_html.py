"""report.html: one self-contained file that opens offline; headless Chromium renders its plots.

The browser test writes the report, a DOM dump and a screenshot under test-output/report_html/
at the repository root (printed; kept after the run). Chromium comes from Debian's `chromium`
package (.ci/run installs it); without it the browser test is skipped with that reason.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from quantstudy.report import write_report
from quantstudy.store import Store
from tests.fixtures import synthetic_study as syn

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "test-output" / "report_html"
PLOTS = {"accuracy_vs_size", "per_task", "flips", "kl_vs_size", "train_loss"}
# marks the body with how many images exist and how many decoded (complete, naturalWidth > 0)
CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-img-total', imgs.length);
  document.body.setAttribute('data-img-ok', ok);
});
</script>"""


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _browser(exe: str, *args: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture()
def report(tmp_path: Path) -> Path:
    store = Store(tmp_path / "store.sqlite")
    syn.fill(store)
    write_report(store, tmp_path, {"html"})
    return tmp_path / "report.html"


def test_html_is_self_contained(report: Path) -> None:
    html = report.read_text()
    assert "<script" not in html and "<link" not in html
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", html)
    srcs = re.findall(r'<img [^>]*data-plot="(\w+)" src="data:image/png;base64,', html)
    assert set(srcs) == PLOTS
    assert "inconclusive (n.s.)" in html and "<strong>tuned</strong>" in html  # inline marks became tags
    assert "&lt;0.001" in html and "&amp;" not in html  # escaped once, never twice
    assert not list(report.parent.glob("*.png")), "html alone must not write PNG files"


def test_html_renders_in_headless_chromium(report: Path) -> None:
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium); .ci/run installs it")
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    page = OUT / "report.html"
    shutil.copy(report, page)
    probe = OUT / "report_probe.html"
    probe.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
    r = _browser(exe, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    (OUT / "dom.html").write_text(r.stdout)
    m = re.search(r'<body data-img-total="(\d+)" data-img-ok="(\d+)"', r.stdout)
    assert m, f"no load marker in the DOM dump (rc={r.returncode}): {r.stderr[-2000:]}"
    assert int(m.group(1)) == len(PLOTS) and int(m.group(2)) == len(PLOTS), m.group(0)

    shot = OUT / "screenshot.png"
    r = _browser(exe, "--hide-scrollbars", "--window-size=1280,2400", f"--screenshot={shot}", page.as_uri())
    assert shot.is_file(), f"no screenshot (rc={r.returncode}): {r.stderr[-2000:]}"
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20) or []
    white = sum(n for n, c in colors if c == (255, 255, 255))
    assert img.size == (1280, 2400)
    assert len(colors) > 100, "screenshot looks blank"
    assert white < 0.95 * img.size[0] * img.size[1]
    # the per-task bar chart sits in the first screen: its bar colours (matplotlib tab10) must be on it
    assert any(abs(c[0] - 31) + abs(c[1] - 119) + abs(c[2] - 180) < 12 for _, c in colors), "no plot pixels"
    print(f"\nreport screenshot: {shot}")
