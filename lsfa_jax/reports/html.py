"""results/index.html: one static page to look at a run (no server, no script, no external
assets; images are linked by relative paths inside the workdir).

Built from the files the run wrote: results/results.json (our numbers beside the paper's),
results/thresholds.json (thresholds and their rules), scores/<class>.json (the test scores, to
sort the gallery), plots/<class>_{roc,pro}.png and images/<class>/*.png (the overlays).
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path

from lsfa_jax.atomic_io import atomic_write_text
from lsfa_jax.reports.tables import METRIC_TITLES

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #bbb; padding: 0.2em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.na { color: #999; }
td.text { text-align: left; }
.gallery { display: flex; flex-wrap: wrap; gap: 0.8em; }
figure { margin: 0; max-width: 520px; }
figure img { max-width: 100%; border: 1px solid #ccc; }
figcaption { font-size: 0.85em; }
.curves img { max-width: 420px; margin-right: 1em; }
"""


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _cell(value: float | None, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '<td class="na">n/a</td>'
    return f"<td>{format(value, spec)}</td>"


def _metric_tables(doc: dict) -> list[str]:
    out = []
    for metric, per_setting in doc.get("metrics", {}).items():
        settings = list(per_setting)
        with_paper = any(
            c.get("paper") is not None for cells in per_setting.values() for c in cells.values()
        )
        head = ["class"]
        for s in settings:
            head += [s, f"{s} paper", f"{s} diff"] if with_paper else [s]
        rows = []
        for name in next(iter(per_setting.values()), {}):
            cells = [f"<td>{html.escape(name)}</td>"]
            for s in settings:
                cell = per_setting[s][name]
                cells.append(_cell(cell["value"]))
                if with_paper:
                    cells += [_cell(cell["paper"]), _cell(cell["diff"], "+.3f")]
            rows.append(f'<tr id="row-{html.escape(name)}">{"".join(cells)}</tr>')
        title = METRIC_TITLES.get(metric, metric)
        out.append(
            f'<h3>{html.escape(title)}</h3><table class="metric" data-metric="{metric}">'
            f"<tr>{''.join(f'<th>{html.escape(h)}</th>' for h in head)}</tr>{''.join(rows)}</table>"
        )
    return out


def _threshold_table(doc: dict | None) -> list[str]:
    if not doc:
        return []
    rows = []
    for setting, per_class in doc.get("settings", {}).items():
        for name, f in per_class.items():
            rule = str(f.get("rule") or "n/a")
            rows.append(
                f"<tr><td>{html.escape(setting)}</td><td>{html.escape(name)}</td>"
                f"{_cell(f.get('threshold'), '.4g')}{_cell(f.get('precision'))}"
                f'{_cell(f.get("recall"))}<td class="text">{html.escape(rule)}</td>'
                f"{_cell(f.get('pixel_threshold'), '.4g')}</tr>"
            )
    head = "".join(
        f"<th>{h}</th>"
        for h in ("setting", "class", "threshold", "precision", "recall", "rule", "pixel thr.")
    )
    title = "<h2>Decision thresholds (test precision and recall)</h2>"
    return [title, f"<table>{head}", *rows, "</table>"]


def _gallery(workdir: Path, out_dir: Path, class_name: str) -> list[str]:
    folder = workdir / "images" / class_name
    images = sorted(folder.glob("*.png")) if folder.is_dir() else []
    scores_doc = _read_json(workdir / "scores" / f"{class_name}.json") or {}
    setting = next((s for s in ("RGB+3D", "3D", "RGB") if s in scores_doc), None)
    by_name = {}
    if setting is not None:
        by_name = {
            i.replace("/", "_"): v
            for i, v in zip(scores_doc["file_id"], scores_doc[setting], strict=True)
        }

    def score_of(path: Path) -> float:
        # <class>_<group>_<rank>_<sample name>.png, see overlays.save_class_overlays
        for name, value in by_name.items():
            if path.stem.endswith("_" + name):
                return float(value)
        return -math.inf

    ranked = sorted(images, key=lambda p: (-score_of(p), p.name))
    figures = []
    for path in ranked:
        score = score_of(path)
        caption = path.stem.removeprefix(f"{class_name}_")
        if math.isfinite(score):
            caption += f" (score {score:.3g})"
        src = os.path.relpath(path, out_dir)
        figures.append(
            f'<figure><img src="{html.escape(src)}" alt="{html.escape(path.stem)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    if not figures:
        return ["<p>No overlays (report.num_overlays = 0).</p>"]
    return ['<div class="gallery">', *figures, "</div>"]


def _curves(workdir: Path, out_dir: Path, class_name: str) -> list[str]:
    found = [workdir / "plots" / f"{class_name}_{k}.png" for k in ("roc", "pro")]
    imgs = [
        f'<img src="{html.escape(os.path.relpath(p, out_dir))}" alt="{p.stem}">'
        for p in found
        if p.is_file()
    ]
    return [f'<div class="curves">{"".join(imgs)}</div>'] if imgs else []


def write_index(workdir: str | os.PathLike, *, title: str) -> Path:
    """Writes <workdir>/results/index.html from the run's files; returns its path."""
    workdir = Path(workdir)
    out_dir = workdir / "results"
    results = _read_json(out_dir / "results.json") or {}
    classes: list[str] = []
    for per_setting in results.get("metrics", {}).values():
        for cells in per_setting.values():
            classes += [c for c in cells if c != "mean" and c not in classes]
    body = [f"<h1>{html.escape(title)}</h1>"]
    if results.get("paper_method"):
        body.append(
            f"<p>Beside the paper's numbers (LSFA, ECCV 2024) for method "
            f"<code>{html.escape(results['paper_method'])}</code>.</p>"
        )
    body += ["<h2>Results per class</h2>", *_metric_tables(results)]
    body += _threshold_table(_read_json(out_dir / "thresholds.json"))
    body.append("<h2>Classes</h2>")
    for class_name in classes:
        body.append(f'<section class="class" id="class-{html.escape(class_name)}">')
        body.append(f"<h3>{html.escape(class_name)}</h3>")
        body += _curves(workdir, out_dir, class_name)
        body += _gallery(workdir, out_dir, class_name)
        body.append("</section>")
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<link rel="icon" href="data:,">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )
    return atomic_write_text(out_dir / "index.html", page)
