"""`m3ae report RUN_DIR`: one self-contained HTML page for a run (images inlined as data URIs).

Sections, each shown when the run has it: configuration, loss curves, throughput, reconstructions
over training, attention maps, evaluation results.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path
from typing import Any

from ..engine.metrics import read_metrics
from ..engine.run_dir import RunDir
from ..utils import atomic_path
from .plotting import loss_curves_figure, pyplot

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
pre{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:.85em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.3em .7em;text-align:right}
th{background:#f0f0f0}figure{margin:1em 0}figcaption{font-size:.85em;color:#555}img{max-width:100%}
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(png: bytes, caption: str) -> str:
    return f'<figure><img src="{_data_uri(png)}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def _loss_curves_png(records: list[dict[str, Any]]) -> bytes | None:
    fig = loss_curves_figure(records)
    if fig is None:
        return None
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    pyplot().close(fig)
    return buffer.getvalue()


def _throughput_table(records: list[dict[str, Any]]) -> str:
    keys = [k for k in ("samples_per_s", "step_s", "flops_per_s", "mfu", "data_wait") if any(k in r for r in records)]
    rows = [r for r in records if any(k in r for k in keys)]
    if not rows:
        return ""
    last = rows[-1]
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(last.get(k))}</td></tr>" for k in keys)
    return f"<p>At step {last.get('step', '?')}:</p><table>{cells}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _step_of(path: Path) -> int:
    match = re.search(r"(\d+)", path.stem)
    return int(match.group(1)) if match else -1


def _results(run_dir: Path) -> str:
    tables = []
    for path in sorted(run_dir.glob("*results*.json")) + sorted(run_dir.glob("eval/*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        flat = _flatten(data)
        cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in flat.items())
        tables.append(f"<h3>{html.escape(path.name)}</h3><table>{cells}</table>")
    return "".join(tables)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def build_report(run_dir: str | Path, out_path: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: not a run directory")
    sections: list[str] = []
    run = RunDir(run_dir)
    config = next((p for p in (run.config, run_dir / "config.json") if p.is_file()), None)
    if config:
        sections.append(f"<h2>Configuration</h2><details><summary>{html.escape(config.name)}</summary>"
                        f"<pre>{html.escape(config.read_text())}</pre></details>")
    records = read_metrics(run.metrics)
    if records:
        png = _loss_curves_png(records)
        if png:
            sections.append("<h2>Loss curves</h2>" + _figure(png, f"{len(records)} logged steps"))
        table = _throughput_table(records)
        if table:
            sections.append("<h2>Throughput</h2>" + table)
    figures = run.figures
    reconstructions = sorted(figures.glob("recon_*.png"), key=_step_of)
    if reconstructions:
        sections.append("<h2>Reconstructions over training</h2>" + "".join(
            _figure(p.read_bytes(), f"step {_step_of(p)}") for p in reconstructions))
    captions = sorted(figures.glob("captions_*.txt"), key=_step_of)
    if captions:
        sections.append(f"<h2>Caption predictions (step {_step_of(captions[-1])})</h2>"
                        f"<pre>{html.escape(captions[-1].read_text())}</pre>")
    attention = sorted(figures.glob("attention*.png"))
    if attention:
        sections.append("<h2>Attention maps</h2>" + "".join(_figure(p.read_bytes(), p.stem) for p in attention))
    results = _results(run_dir)
    if results:
        sections.append("<h2>Evaluation</h2>" + results)
    if not sections:
        raise FileNotFoundError(f"{run_dir}: no config, metrics or figures to report")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>m3ae run {html.escape(run_dir.name)}</title>"
            f"<style>{STYLE}</style></head><body><h1>m3ae run <code>{html.escape(str(run_dir))}</code></h1>"
            + "".join(sections) + "</body></html>\n")
    out_path = Path(out_path) if out_path else run_dir / "report.html"
    with atomic_path(out_path) as tmp:
        tmp.write_text(page)
    return out_path
