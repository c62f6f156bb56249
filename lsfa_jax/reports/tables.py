"""Per-class result tables (markdown, JSON, CSV), optionally beside the paper's numbers.

results: {setting: {class_name: {metric: float}}}, setting in SETTINGS, metric in METRICS.
A value may be NaN only when `notes[setting][class_name]` explains why; it is then shown as
"n/a" with the note, never as a bare nan. The class mean is the plain mean over classes; it is
n/a when any class is n/a (a mean over fewer classes would not be comparable with the paper).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from lsfa_jax.atomic_io import atomic_write_json, atomic_write_text
from lsfa_jax.reports import paper_results

SETTINGS = ("RGB", "3D", "RGB+3D")
METRICS = ("i_auroc", "aupro_30", "aupro_01", "p_auroc")
METRIC_TITLES = {
    "i_auroc": "I-AUROC",
    "aupro_30": "AUPRO@0.3",
    "aupro_01": "AUPRO@0.01",
    "p_auroc": "P-AUROC",
}
DATASET_CLASSES = paper_results.DATASET_CLASSES
THRESHOLD_FIELDS = ("threshold", "precision", "recall")
THRESHOLD_OPTIONAL = ("rule", "pixel_threshold", "pixel_rule")

Results = Mapping[str, Mapping[str, Mapping[str, float]]]
Notes = Mapping[str, Mapping[str, Sequence[str]]]


def _notes_for(notes: Notes | None, setting: str, class_name: str) -> list[str]:
    if notes is None:
        return []
    return list(notes.get(setting, {}).get(class_name, []))


def validate_results(results: Results, notes: Notes | None = None) -> None:
    """Raises ValueError naming the entry for unknown settings/metrics or a NaN without a note."""
    for setting, per_class in results.items():
        if setting not in SETTINGS:
            raise ValueError(f"tables: unknown setting {setting!r}; expected one of {SETTINGS}")
        for class_name, per_metric in per_class.items():
            for metric, value in per_metric.items():
                if metric not in METRICS:
                    raise ValueError(
                        f"tables: {setting}/{class_name}: unknown metric {metric!r}; "
                        f"expected one of {METRICS}"
                    )
                if math.isnan(value) and not _notes_for(notes, setting, class_name):
                    raise ValueError(
                        f"tables: {setting}/{class_name}/{metric} is NaN without a note saying why"
                    )


def class_order(results: Results, dataset: str = "mvtec3d") -> list[str]:
    """Classes present in `results`: the dataset's order first, then the others as given."""
    present: list[str] = []
    for per_class in results.values():
        present += [c for c in per_class if c not in present]
    known = [c for c in DATASET_CLASSES.get(dataset, ()) if c in present]
    return known + [c for c in present if c not in known]


def _settings(results: Results) -> list[str]:
    return [s for s in SETTINGS if s in results]


def _metrics(results: Results) -> list[str]:
    used = {m for per_class in results.values() for pm in per_class.values() for m in pm}
    return [m for m in METRICS if m in used]


def _value(results: Results, setting: str, class_name: str, metric: str) -> float:
    return float(results.get(setting, {}).get(class_name, {}).get(metric, math.nan))


def class_mean(results: Results, setting: str, metric: str, classes: Sequence[str]) -> float:
    """Plain mean over `classes`; NaN when any of them is NaN or missing."""
    values = [_value(results, setting, c, metric) for c in classes]
    if not values or any(math.isnan(v) for v in values):
        return math.nan
    return sum(values) / len(values)


def _cell_notes(
    results: Results, notes: Notes | None, setting: str, class_name: str, metric: str
) -> list[str]:
    value = _value(results, setting, class_name, metric)
    if not math.isnan(value):
        return []
    if class_name not in results.get(setting, {}):
        return [f"no result for {class_name} in {setting}"]
    if metric not in results[setting][class_name]:
        return [f"{METRIC_TITLES[metric]} not computed for {class_name} in {setting}"]
    return _notes_for(notes, setting, class_name)


def build_table(
    results: Results,
    *,
    notes: Notes | None = None,
    paper_method: str | None = None,
    dataset: str = "mvtec3d",
) -> dict:
    """The JSON-ready table: {metric: {setting: {class|"mean": cell}}}.

    cell = {"value": float|None, "paper": float|None, "diff": float|None, "notes": [str]};
    "paper" is set only with `paper_method`, for a dataset in `paper_results.DATASETS`, where the
    paper publishes the value.
    """
    validate_results(results, notes)
    if paper_method is not None and paper_method not in paper_results.METHODS:
        raise ValueError(
            f"tables: unknown paper_method {paper_method!r}; expected one of "
            f"{paper_results.METHODS}"
        )
    if paper_method is not None and dataset not in paper_results.DATASETS:
        known = " and ".join(sorted(paper_results.DATASETS))
        raise ValueError(
            f"tables: paper numbers are transcribed for {known} only, not {dataset!r}; "
            "pass paper_method=None"
        )
    use_paper = paper_method is not None
    classes = class_order(results, dataset)
    all_classes = set(DATASET_CLASSES.get(dataset, ())) <= set(classes)
    table: dict = {}
    for metric in _metrics(results):
        table[metric] = {}
        for setting in _settings(results):
            cells = {}
            for name in [*classes, "mean"]:
                if name == "mean":
                    value = class_mean(results, setting, metric, classes)
                    missing = [
                        c for c in classes if math.isnan(_value(results, setting, c, metric))
                    ]
                    cell_notes = (
                        [f"mean undefined: n/a for {', '.join(missing)}"] if missing else []
                    )
                else:
                    value = _value(results, setting, name, metric)
                    cell_notes = _cell_notes(results, notes, setting, name, metric)
                paper = (
                    paper_results.paper_value(paper_method, setting, metric, name, dataset)
                    if use_paper
                    else None
                )
                if name == "mean" and paper is not None and not all_classes:
                    # The paper's mean is over all 10 classes; ours over a subset is not comparable.
                    paper = None
                    cell_notes = [*cell_notes, "paper mean not compared: not all classes were run"]
                ours = None if math.isnan(value) else value
                cells[name] = {
                    "value": ours,
                    "paper": paper,
                    "diff": None if ours is None or paper is None else ours - paper,
                    "notes": cell_notes,
                }
            table[metric][setting] = cells
    return table


def _fmt(value: float | None, notes: Sequence[str] = ()) -> str:
    if value is None:
        return "n/a" + (f" ({'; '.join(notes)})" if notes else "")
    return f"{value:.3f}"


def _fmt_number(value: float, spec: str = ".3f") -> str:
    """A float for a table cell; NaN (undefined) is "n/a", never "nan"."""
    return "n/a" if math.isnan(value) else format(value, spec)


def _fmt_diff(value: float | None) -> str:
    return "" if value is None else f"{value:+.3f}"


def _paper_source_lines(paper_method: str, dataset: str) -> list[str]:
    lines = []
    for setting, label in paper_results.DATASET_METHOD_ROWS[dataset][paper_method].items():
        for metric in paper_results.DATASET_PAPER_METRICS[dataset]:
            row = paper_results.find_row(metric, setting, label, dataset)
            if row is None:
                continue
            state = "unavailable" if row.values is None else "used"
            mean = (
                f"printed mean from {row.mean_source}"
                if row.printed_mean is not None
                else "mean computed from the 10 class values (not printed)"
            )
            lines.append(
                f"- {METRIC_TITLES[metric]} {setting}: {row.table} row '{label}' ({state}; "
                f"{mean if row.values is not None else row.note})"
            )
    if dataset in paper_results.DATASET_NOTES:
        lines.append(f"- Note: {paper_results.DATASET_NOTES[dataset]}.")
    return lines


def render_markdown(table: dict, *, paper_method: str | None, dataset: str) -> str:
    """Markdown, one section per metric: classes as rows, settings (+ paper, diff) as columns."""
    lines = [f"# Results: {dataset}", ""]
    if paper_method is not None:
        lines += [f"Paper numbers: LSFA (ECCV 2024), rows matching method `{paper_method}`.", ""]
        lines += [*_paper_source_lines(paper_method, dataset), ""]
    for metric, per_setting in table.items():
        settings = list(per_setting)
        with_paper = any(
            cell["paper"] is not None for cells in per_setting.values() for cell in cells.values()
        )
        header = ["class"]
        for s in settings:
            header += [s, f"{s} paper", f"{s} diff"] if with_paper else [s]
        lines += [f"## {METRIC_TITLES[metric]}", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        names = list(next(iter(per_setting.values())))
        for name in names:
            row = [f"**{name}**" if name == "mean" else name]
            for s in settings:
                cell = per_setting[s][name]
                row.append(_fmt(cell["value"], cell["notes"]))
                if with_paper:
                    row += [_fmt(cell["paper"]) if cell["paper"] is not None else "-"]
                    row += [_fmt_diff(cell["diff"])]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


CSV_FIELDS = ("metric", "setting", "class", "value", "paper", "diff", "notes")


def render_csv(table: dict) -> str:
    """Long format, one row per (metric, setting, class); missing values are "n/a"."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for metric, per_setting in table.items():
        for setting, cells in per_setting.items():
            for name, cell in cells.items():
                writer.writerow(
                    [
                        metric,
                        setting,
                        name,
                        "n/a" if cell["value"] is None else repr(cell["value"]),
                        "" if cell["paper"] is None else repr(cell["paper"]),
                        "" if cell["diff"] is None else repr(cell["diff"]),
                        "; ".join(cell["notes"]),
                    ]
                )
    return buf.getvalue()


def write_result_tables(
    results: Results,
    out_dir: str | os.PathLike,
    *,
    notes: Notes | None = None,
    paper_method: str | None = None,
    dataset: str = "mvtec3d",
) -> dict[str, Path]:
    """Writes results.{md,json,csv} under out_dir atomically; returns {"md"|"json"|"csv": path}."""
    table = build_table(results, notes=notes, paper_method=paper_method, dataset=dataset)
    out_dir = Path(out_dir)
    doc = {"dataset": dataset, "paper_method": paper_method, "metrics": table}
    return {
        "md": atomic_write_text(
            out_dir / "results.md",
            render_markdown(table, paper_method=paper_method, dataset=dataset),
        ),
        "json": atomic_write_json(out_dir / "results.json", doc),
        "csv": atomic_write_text(out_dir / "results.csv", render_csv(table)),
    }


def format_console_table(
    results: Results, *, notes: Notes | None = None, dataset: str = "mvtec3d"
) -> str:
    """Fixed-width text, one block per metric: classes down, settings across, mean last.

    n/a cells are followed by the notes explaining them.
    """
    validate_results(results, notes)
    classes = class_order(results, dataset)
    settings = _settings(results)
    width = max([len(c) for c in classes] + [5])
    blocks = []
    for metric in _metrics(results):
        header = f"{'class':<{width}}" + "".join(f"{s:>9}" for s in settings)
        lines = [METRIC_TITLES[metric], header]
        explained = []
        for name in [*classes, "mean"]:
            cells = []
            for s in settings:
                if name == "mean":
                    v = class_mean(results, s, metric, classes)
                else:
                    v = _value(results, s, name, metric)
                    if math.isnan(v):
                        reasons = "; ".join(_cell_notes(results, notes, s, name, metric))
                        explained.append(f"  n/a {s}/{name}: {reasons}")
                cells.append(f"{'n/a' if math.isnan(v) else f'{v:.3f}':>9}")
            lines.append(f"{name:<{width}}" + "".join(cells))
        blocks.append("\n".join(lines + explained))
    return "\n\n".join(blocks)


def write_threshold_table(
    thresholds: Mapping[str, Mapping[str, Mapping[str, float]]],
    out_dir: str | os.PathLike,
    *,
    dataset: str = "mvtec3d",
) -> dict[str, Path]:
    """Per setting and class: the decision threshold, its precision and recall on test, and
    the rule that chose it.

    thresholds: {setting: {class_name: {"threshold", "precision", "recall": float, optionally
    "rule": str (the rule's description), "pixel_threshold": float, "pixel_rule": str}}}.
    Undefined values (NaN, e.g. precision when nothing is flagged) are "n/a" in the markdown and
    CSV and null in the JSON. Writes thresholds.{md,json,csv}; returns {"md"|"json"|"csv": path}.
    """
    for setting, per_class in thresholds.items():
        if setting not in SETTINGS:
            raise ValueError(f"tables: unknown setting {setting!r}; expected one of {SETTINGS}")
        for class_name, fields in per_class.items():
            missing = [f for f in THRESHOLD_FIELDS if f not in fields]
            if missing:
                raise ValueError(f"tables: thresholds {setting}/{class_name} lacks {missing}")
    out_dir = Path(out_dir)
    md = [f"# Thresholds on test: {dataset}", ""]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        ("setting", "class", *THRESHOLD_FIELDS, "rule", "pixel_threshold", "pixel_rule")
    )
    doc: dict = {"dataset": dataset, "settings": {}}
    for setting in [s for s in SETTINGS if s in thresholds]:
        per_class = thresholds[setting]
        md += [
            f"## {setting}",
            "",
            "| class | threshold | precision | recall | rule | pixel threshold | pixel rule |",
            "|---|---|---|---|---|---|---|",
        ]
        classes = class_order({setting: per_class}, dataset)
        doc["settings"][setting] = {}
        for c in classes:
            fields = per_class[c]
            vals = [float(fields[f]) for f in THRESHOLD_FIELDS]
            rule = str(fields.get("rule", ""))
            pixel = float(fields.get("pixel_threshold", math.nan))
            pixel_rule = str(fields.get("pixel_rule", ""))
            md.append(
                f"| {c} | {_fmt_number(vals[0], '.6g')} | {_fmt_number(vals[1])} | "
                f"{_fmt_number(vals[2])} | {rule or 'n/a'} | {_fmt_number(pixel, '.6g')} | "
                f"{pixel_rule or 'n/a'} |"
            )
            writer.writerow(
                (
                    setting,
                    c,
                    *("n/a" if math.isnan(v) else repr(v) for v in [*vals]),
                    rule,
                    "n/a" if math.isnan(pixel) else repr(pixel),
                    pixel_rule,
                )
            )
            optional = {k: fields[k] for k in THRESHOLD_OPTIONAL if k in fields}
            doc["settings"][setting][c] = {
                **dict(zip(THRESHOLD_FIELDS, vals, strict=True)),
                **optional,
            }
        md.append("")
    return {
        "md": atomic_write_text(out_dir / "thresholds.md", "\n".join(md)),
        "json": atomic_write_json(out_dir / "thresholds.json", doc),
        "csv": atomic_write_text(out_dir / "thresholds.csv", buf.getvalue()),
    }


def _fmt_or_na(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def write_per_defect(
    per_defect: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]],
    out_dir: str | os.PathLike,
) -> Path:
    """results/per_defect.{json,md}: {class: {setting: {defect: {"i_auroc", "aupro_30", "n"}}}}.

    Undefined values (no masks: no AUPRO) are null in JSON and n/a in the table.
    """
    out_dir = Path(out_dir)
    record = {
        c: {
            s: {
                d: {
                    k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()
                }
                for d, m in defects.items()
            }
            for s, defects in settings.items()
        }
        for c, settings in per_defect.items()
    }
    atomic_write_json(out_dir / "per_defect.json", record)
    lines = ["# Per defect type (good test samples vs one defect type)", ""]
    lines += [
        "| class | setting | defect type | n | I-AUROC | AUPRO@0.3 |",
        "|---|---|---|---|---|---|",
    ]
    for class_name, settings in per_defect.items():
        for setting, defects in settings.items():
            for defect, values in defects.items():
                lines.append(
                    f"| {class_name} | {setting} | {defect} | {values['n']} | "
                    f"{_fmt_or_na(values['i_auroc'])} | {_fmt_or_na(values['aupro_30'])} |"
                )
    path = out_dir / "per_defect.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
