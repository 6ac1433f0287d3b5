"""The run report is one self-contained HTML page built from what the run directory holds."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from m3ae.viz.report import build_report


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.headings, self.images, self.links = [], [], []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self._in_h2 = tag == "h2"
        if tag == "img":
            self.images.append(attrs["src"])
        if tag in ("link", "script") and (attrs.get("href") or attrs.get("src")):
            self.links.append(tag)

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data)
            self._in_h2 = False


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    (run / "figures").mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  preset: tiny\ntrain:\n  batch_size: 64\n")
    lines = [json.dumps({"step": s, "loss": 2.0 / s, "image_loss": 1.0 / s, "samples_per_s": 120.5, "mfu": 0.31})
             for s in range(1, 21)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 21, "lo')  # cut by a kill
    for step, value in ((100, 40), (20, 200)):
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(run / "figures" / f"recon_{step:08d}.png")
    (run / "figures" / "captions_00000100.txt").write_text("a [red] <dog> -> red, blue")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(run / "figures" / "attention_word.png")
    (run / "demo_results.json").write_text(json.dumps({"m3ae": {"linear": 71.5}, "mae": {"linear": 60.25}}))
    return run


def test_report_has_every_section_inlined(run_dir):
    path = build_report(run_dir)
    page = path.read_text()
    parser = _Collector()
    parser.feed(page)
    assert parser.headings == ["Configuration", "Loss curves", "Throughput", "Reconstructions over training",
                               "Caption predictions (step 100)", "Attention maps", "Evaluation"]
    assert parser.images and all(src.startswith("data:image/png;base64,") for src in parser.images)
    assert not parser.links  # self-contained
    assert page.index("step 20<") < page.index("step 100<")  # reconstructions in step order
    assert "a [red] &lt;dog&gt;" in page and "m3ae.linear" in page and "71.5" in page
    assert re.search(r"<th>samples_per_s</th><td>120.5</td>", page)


def test_report_of_an_empty_directory_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config, metrics or figures"):
        build_report(tmp_path)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    path = build_report(run_dir)
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,900",
                    path.as_uri()], check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (900, 1200) and pixels.std() > 5
