"""`dvc plots show` (via scripts/plots.sh, which works offline) opened in real headless Chromium.

A probe script added to a copy of the page records, for every chart that vega-embed draws, how
many data items vega's scenegraph holds (points, line vertices, matrix cells; not axes or
legends) and how many coloured pixels its canvas has. A chart whose data is missing, whose
script failed, or a page that stayed blank fails the check; the same page with its data
removed is rendered as a control that must fail it.
"""
import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_dvc
from dvc_render.base import Renderer

pytestmark = pytest.mark.slow

# Wraps vegaEmbed before the charts' own scripts call it, then reports once rendering settled.
PROBE = r"""
<script>
(function () {
  const embeds = [];
  const original = window.vegaEmbed;
  window.vegaEmbed = function (el, spec, opts) {
    const p = original(el, spec, opts);
    embeds.push(p.then(r => ({el: el, view: r.view}), e => ({el: el, error: String(e)})));
    return p;
  };
  function dataItems(mark) {  // items of data marks (role "mark"), not axes/legends/titles
    let n = 0;
    if (mark.marktype !== "group" && mark.role === "mark") n += (mark.items || []).length;
    for (const item of mark.items || []) for (const child of item.items || []) n += dataItems(child);
    return n;
  }
  function colouredPixels(canvas) {
    const ctx = canvas.getContext("2d");
    const d = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    let n = 0;
    for (let i = 0; i < d.length; i += 4) {
      const hi = Math.max(d[i], d[i + 1], d[i + 2]), lo = Math.min(d[i], d[i + 1], d[i + 2]);
      if (d[i + 3] > 0 && hi - lo > 40) n++;  // grey axes, text and white background excluded
    }
    return n;
  }
  window.addEventListener("load", () => setTimeout(async () => {
    const report = [];
    for (const r of await Promise.all(embeds)) {
      const canvas = document.querySelector(r.el + " canvas");
      report.push({id: r.el, error: r.error || null,
                   items: r.view ? dataItems(r.view.scenegraph().root) : 0,
                   pixels: canvas ? colouredPixels(canvas) : 0});
    }
    const pre = document.createElement("pre");
    pre.id = "render-probe";
    pre.textContent = JSON.stringify(report);
    document.body.appendChild(pre);
  }, 1000));
})();
</script>
"""


def _chromium() -> str:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("headless Chromium not found (/usr/bin/chromium): apt-get install -y chromium chromium-driver "
                "(.ci/run installs it)")


def _render(page: Path, work: Path, screenshot: Path | None = None) -> list[dict]:
    """Open ``page`` with the probe in headless Chromium; returns the probe's per-chart report."""
    probed = work / f"probed-{page.stem}.html"
    text = page.read_text(encoding="utf-8")
    # Before the first chart's div (dvc-render's `<div id = "...">`), so it runs before any chart
    # script and after the vega libraries are defined. ("<body>" also occurs inside vega-embed.)
    at = text.find('<div id = "')
    assert at > 0, "no chart in the page"
    probed.write_text(text[:at] + PROBE + text[at:], encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={work / ('chrome-' + page.stem)}", "--virtual-time-budget=15000",
             "--window-size=1200,2600"]
    cmd = [_chromium(), *flags]
    if screenshot is not None:  # for a person: the page as rendered
        subprocess.run([*cmd, f"--screenshot={screenshot}", probed.as_uri()], capture_output=True, timeout=120)
    proc = subprocess.run([*cmd, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="render-probe">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"the probe never reported (page scripts failed?):\n{proc.stderr[-2000:]}"
    return json.loads(html.unescape(m.group(1)))


@pytest.fixture(scope="module")
def plots_page(tiny_dvc_project: Path, tmp_path_factory) -> Path:
    if not (Path(os.environ.get("VEGA_DIR", ROOT / ".cache" / "vega")) / "template.html").is_file() \
            and shutil.which("npm") is None:
        pytest.skip("scripts/plots.sh needs npm once to fetch vega (or a filled $VEGA_DIR)")
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    out_dir = tmp_path_factory.mktemp("plots_page")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "plots.sh"), "show", "-o", str(out_dir)],
                          cwd=tiny_dvc_project, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    page = out_dir / "index.html"
    assert "cdn.jsdelivr" not in page.read_text(encoding="utf-8"), "the page would need internet to render"
    return page


def _emptied(page: Path, work: Path) -> Path:
    """The same page with every chart's data removed: what a plot with missing data looks like."""
    text, n = re.subn(r'"data": \{"values": \[.*?\]\}', '"data": {"values": []}', page.read_text(encoding="utf-8"))
    assert n > 0
    out = work / "emptied.html"
    out.write_text(text, encoding="utf-8")
    return out


def test_every_plot_renders_with_data(tiny_dvc_project: Path, plots_page: Path, tmp_path: Path):
    shot = tmp_path / "plots.png"
    report = {r["id"]: r for r in _render(plots_page, tmp_path, screenshot=shot)}
    # Control: without data, the same charts draw axes and legends only. It proves the check
    # below can fail, and gives each chart's pixel baseline (colour legends, slider-free frame).
    control = {r["id"]: r for r in _render(_emptied(plots_page, tmp_path), tmp_path)}
    assert control and all(r["items"] == 0 for r in control.values()), control

    names = [next(iter(p)) for p in yaml.safe_load((tiny_dvc_project / "dvc.yaml").read_text())["plots"]]
    ids = {"#" + Renderer.remove_special_chars(n) for n in names}  # dvc-render's div ids
    assert ids <= set(report), f"charts missing from the page: {ids - set(report)}; report: {report}"
    for chart, r in report.items():
        assert r["error"] is None, r
        assert r["items"] > 0, f"{chart}: no data drawn ({r}); screenshot: {shot}"
        assert r["pixels"] > control[chart]["pixels"], \
            f"{chart}: no more coloured pixels than without data ({r} vs {control[chart]}); screenshot: {shot}"
    assert shot.stat().st_size > 10_000
    print(f"\n{len(report)} charts rendered: " + ", ".join(
        f"{c} ({r['items']} items, {r['pixels']} vs {control[c]['pixels']} px)" for c, r in report.items()))


def test_plots_diff_against_the_last_commit(tiny_dvc_project: Path):
    """`dvc plots diff` (what CI shows for a pull request) finds every plot in both revisions."""
    out = json.loads(run_dvc(tiny_dvc_project, "plots", "diff", "HEAD", "--json", "--split"))["data"]
    names = [next(iter(p)) for p in yaml.safe_load((tiny_dvc_project / "dvc.yaml").read_text())["plots"]]
    assert set(names) <= set(out), sorted(out)
    for name in names:
        revs = {r for entry in out[name] for r in entry.get("revisions", [])}
        assert {"HEAD", "workspace"} <= revs, (name, out[name])
