"""The results page (``<results>/index.html``, bench/report/html.py) in a real headless browser: Debian's
chromium, installed here if missing. The page loads with no console message (it writes none, so any is an
error: an uncaught exception, a failed promise, console.error), finishes its script, shows every method
and the failed runs, sorts on a header click, opens a method's drill-down, and holds no URL; the same
records give the same bytes. A broken page proves that the console check catches errors."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from bench.report.build import build_report
from bench.report.methods import method_family
from bench.report.plots import family_colour, place_labels
from tests.harness import REPO

COPIED = ("full", "linear", "gps", "lora-8", "spt-lora-8", "snella-8", "peft-dora-8", "peft-vera-256")
SNELL = "snell-8_piecewise_linear_s_0.9"
WINDOW = (1280, 2000)


def find_or_install_chromium() -> str:
    """The chromium binary; installed with apt-get (as root, else through sudo) when missing."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if sudo and not shutil.which("sudo"):
        pytest.fail(
            "chromium is missing and cannot be installed (not root, no sudo): apt-get install chromium"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        done = subprocess.run([*sudo, *command], capture_output=True, text=True, env=env, timeout=900)
        if done.returncode != 0:
            pytest.fail(f"chromium is missing and `{' '.join(command)}` failed:\n{done.stderr[-2000:]}")
    found = shutil.which("chromium")
    if not found:
        pytest.fail("apt-get installed chromium but no `chromium` is on PATH")
    return found


@pytest.fixture(scope="session")
def chromium() -> str:
    return find_or_install_chromium()


def browse(chromium: str, url: str, out: Path) -> tuple[str, list[str], Path]:
    """Load ``url`` headless: the DOM after its scripts ran, the console messages, and a screenshot."""
    out.mkdir(parents=True, exist_ok=True)
    shot = out / "page.png"
    done = subprocess.run(
        [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={out / 'profile'}", "--enable-logging=stderr", "--v=0",
            "--virtual-time-budget=3000", f"--window-size={WINDOW[0]},{WINDOW[1]}",
            f"--screenshot={shot}", "--dump-dom", url,
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console, shot


def _record(source: Path, **changes) -> dict:
    record = json.loads(source.read_text())
    for key, value in changes.items():
        parent, *path = key.split("__")
        target = record
        for part in [parent, *path][:-1]:
            target = target[part]
        target[[parent, *path][-1]] = value
    return record


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> tuple[Path, set[str]]:
    """A results folder of committed records (every family; two tasks, two seeds) plus failed runs: an
    OOM beside LoRA-8's successes and a SNELL setting whose every run failed. Returns it and the labels."""
    results = tmp_path_factory.mktemp("page")
    (results / "records").mkdir()
    committed = REPO / "results" / "records"
    for task in ("digits", "rotation"):
        for name in (*COPIED, SNELL):
            sources = sorted(committed.glob(f"{task}-{name}-seed[01]-*.json"))
            assert len(sources) == 2, f"committed records of {task} {name} missing"
            for source in sources:
                shutil.copy(source, results / "records" / source.name)
        failed = _record(
            next(committed.glob(f"{task}-{SNELL}-seed0-*.json")), run_id=f"{task}-snell-64-seed0-failed",
            label="snell-64 piecewise_linear s=0.9", status="error", error="ValueError: rank 64 > 32",
            metrics={}, method_config=None, config__method_options__rank=64,
        )  # fmt: skip
        (results / "records" / f"{failed['run_id']}.json").write_text(json.dumps(failed))
    oom = _record(
        next(committed.glob("digits-lora-8-seed0-*.json")), run_id="digits-lora-8-seed2-oom", status="oom",
        error="OutOfMemoryError: synthetic", metrics={}, config__seed=2,
    )  # fmt: skip
    (results / "records" / "digits-lora-8-seed2-oom.json").write_text(json.dumps(oom))
    summary = build_report(results)
    return results, set(summary.label)


@pytest.mark.slow
def test_page_loads_shows_every_method_and_the_failures(page, chromium, tmp_path):
    results, labels = page
    dom, console, shot = browse(chromium, (results / "index.html").as_uri(), tmp_path)
    assert console == [], console
    assert 'data-ready="1"' in dom  # the script ran to its end
    assert len(labels) == 10 and "snell-64 piecewise_linear s=0.9" in labels
    for label in labels:
        assert f'data-label="{html.escape(label)}"' in dom  # a drill-down per method
        assert f'class="method">{html.escape(label)}</a>' in dom  # a row of the sortable table
    fills = {
        html.unescape(label): fill
        for fill, label in re.findall(
            r'<circle class="pt"[^>]* fill="(#[0-9a-f]{6})" data-label="([^"]*)"', dom
        )
    }
    assert set(fills) == labels - {"snell-64 piecewise_linear s=0.9"}  # the plot: each method that succeeded
    assert fills["peft-dora-8"] != fills["peft-vera-256"]  # one colour per family
    assert "ValueError: rank 64 &gt; 32" in dom and "OutOfMemoryError: synthetic" in dom
    assert dom.count('<tr class="failed">') == 2 * 3  # 3 failed runs: failed-runs table + drill-downs
    with Image.open(shot) as image:
        assert image.size == WINDOW
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 100  # drawn, not blank


@pytest.mark.slow
def test_the_console_check_catches_a_broken_page(chromium, tmp_path):
    broken = tmp_path / "broken.html"
    broken.write_text(
        "<!DOCTYPE html><html><body><p>hi</p><script>undefinedFunction()</script></body></html>"
    )
    dom, console, shot = browse(chromium, broken.as_uri(), tmp_path / "browser")
    assert len(console) == 1 and "Uncaught ReferenceError: undefinedFunction is not defined" in console[0]
    assert 'data-ready="1"' not in dom
    with Image.open(shot) as image:  # and the screenshot check tells a near-blank page
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) <= 100


def _column(dom: str, table: str, index: int) -> tuple[list[str], list[str]]:
    """The method links and the ``index``-th cells' sort keys of table ``table``, in row order."""
    body = dom[dom.index(f'id="{table}"') :]
    body = body[: body.index("</table>")]
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", body[body.index("<tbody>") :], flags=re.S)
    cells = [re.findall(r"<td[^>]*?(?: data-sort=\"([^\"]*)\")?>", row) for row in rows]
    methods = [html.unescape(re.search(r'class="method">([^<]*)<', row).group(1)) for row in rows]
    return methods, [row[index] for row in cells]


@pytest.mark.slow
def test_a_header_click_sorts_and_a_method_link_opens_its_runs(page, chromium, tmp_path):
    results, labels = page
    built = (results / "index.html").read_text()
    header = re.search(r'<table class="sortable" id="t0">.*?</tr>', built, flags=re.S).group(0)
    mean = re.findall(r"<th[^>]*>([^<]*)</th>", header).index("mean")
    _, keys = _column(built, "t0", mean)
    numbers = sorted(float(k) for k in keys if k)
    for clicks, expected in ((1, numbers[::-1]), (2, numbers)):  # numbers first descending, then ascending
        url = (results / "index.html").as_uri() + "#click=" + ",".join([f"t0:{mean}"] * clicks)
        dom, console, _ = browse(chromium, url, tmp_path / str(clicks))
        assert console == [], console
        methods, keys = _column(dom, "t0", mean)
        assert [float(k) for k in keys if k] == expected
        assert keys[-1] == "" and methods[-1] == "snell-64 piecewise_linear s=0.9"  # no number: last
        assert set(methods) == labels
    anchor = re.search(r'<details id="(m-\d+)" data-label="snell-64 piecewise_linear s=0.9">', built).group(1)
    dom, console, _ = browse(chromium, f"{(results / 'index.html').as_uri()}#{anchor}", tmp_path / "link")
    assert (
        console == []
        and f'<details id="{anchor}" data-label="snell-64 piecewise_linear s=0.9" open="">' in dom
    )


def test_the_page_is_self_contained_and_deterministic(page):
    results, _ = page
    built = (results / "index.html").read_bytes()
    text = built.decode()
    assert "http://" not in text and "https://" not in text
    assert not re.search(
        r"""(?:src|href)\s*=\s*["']?(?:[a-z]+:|//)""", text, flags=re.I
    )  # local anchors only
    assert "<link" not in text and "<img" not in text and "@import" not in text and "url(" not in text
    assert not re.search(r"<script[^>]+src", text)
    build_report(results)
    assert (results / "index.html").read_bytes() == built


def test_families_have_fixed_colours_and_labels_do_not_overlap():
    assert method_family("peft", {"tuner": "dora"}) == "peft-dora"
    assert method_family("peft", {"tuner": "vera"}) == "peft-vera" and method_family("snell", {}) == "snell"
    assert family_colour("peft-dora") != family_colour("peft-vera") != family_colour("snell")
    assert family_colour("peft-newtuner") == family_colour("peft-newtuner")  # unlisted: stable by name
    anchors = [(100.0, 100.0), (104.0, 102.0), (98.0, 97.0), (101.0, 99.0), (300.0, 100.0)]
    sizes = [(60.0, 9.0)] * len(anchors)
    offsets = place_labels(anchors, sizes, (0.0, 0.0, 400.0, 300.0), markers=anchors)
    boxes = []
    for (x, y), (w, h), (dx, dy) in zip(anchors, sizes, offsets, strict=True):
        x0, y0 = (x + dx if dx > 0 else x + dx - w), (y + dy if dy > 0 else y + dy - h)
        boxes.append((x0, y0, x0 + w, y0 + h))
    for i, a in enumerate(boxes):
        assert 0 <= a[0] <= a[2] <= 400 and 0 <= a[1] <= a[3] <= 300
        for b in boxes[i + 1 :]:
            assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1])


@pytest.mark.slow
def test_hovering_a_point_shows_its_label(page, chromium, tmp_path):
    results, _ = page
    hover = (
        '<script>var pt = document.querySelector("svg .pt");'
        'pt.dispatchEvent(new MouseEvent("mouseenter"));'
        'pt.dispatchEvent(new MouseEvent("mousemove", {clientX: 120, clientY: 90}));</script></body>'
    )
    copy = tmp_path / "hover.html"  # the page plus a script that moves the mouse onto its first point
    copy.write_text((results / "index.html").read_text().replace("</body>", hover))
    dom, console, _ = browse(chromium, copy.as_uri(), tmp_path / "browser")
    assert console == [], console
    tip = re.search(r'<div id="tip" style="([^"]*)">([^<]*)</div>', dom)
    assert "display: block" in tip.group(1) and "left: 134px" in tip.group(1)
    first = re.search(r'<circle class="pt"[^>]* data-tip="([^"]*)"', dom).group(1)
    assert tip.group(2) == first and "accuracy" in first and "peak memory" in first and " ± " in first
