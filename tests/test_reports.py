"""Tests for lsfa_jax.reports: paper numbers, tables, plots, overlays, sample choice, manifest."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from lsfa_jax.reports import paper_results, tables

PAPER = Path(__file__).resolve().parents[2] / "shared/paper/lsfa_paper.txt"


# ---------------------------------------------------------------- paper numbers


def _rows_with_values():
    return [r for r in paper_results.ROWS if r.values is not None]


@pytest.mark.parametrize(
    "row",
    [r for r in _rows_with_values() if r.printed_mean is not None],
    ids=lambda r: f"{r.table}-{r.setting}-{r.method_label}",
)
def test_transcribed_row_mean_matches_printed_mean(row):
    assert list(row.values) == list(paper_results.CLASSES)
    assert abs(np.mean(list(row.values.values())) - row.printed_mean) <= 0.002


@pytest.mark.parametrize(
    "row",
    [r for r in paper_results.ROWS if len(r.cells) == 10],
    ids=lambda r: f"{r.setting}-{r.method_label}",
)
def test_table1_reading_is_forced_or_marked_unavailable(row):
    # If the 10th cell were the mean of 10 classes with one class lost, the lost value would be:
    lost = 10 * row.cells[9] - sum(row.cells[:9])
    other_reading_possible = 0.0 <= lost <= 1.0
    if row.values is None:
        assert other_reading_possible
    elif row.printed_mean is None:
        assert not other_reading_possible
    else:
        # A mean printed elsewhere fixes the reading: it is the mean of all 10 cells, not cell 10.
        assert abs(np.mean(row.cells) - row.printed_mean) <= 0.002
        assert abs(row.cells[9] - row.printed_mean) > 0.002


def test_values_are_the_cells_in_class_order():
    for row in _rows_with_values():
        assert tuple(row.values.values()) == row.cells[:10]


def test_cells_appear_in_the_paper_text_in_order():
    if not PAPER.exists():
        pytest.skip(f"{PAPER} not present")
    lines = PAPER.read_text().splitlines()
    for row in paper_results.ROWS:
        want = [f"{v:.3f}" for v in row.cells]
        hits = [
            line
            for line in lines
            if row.method_label in line and re.findall(r"\d\.\d{3}", line) == want
        ]
        assert hits, f"{row.table} {row.setting} {row.method_label} not found in the paper text"


def test_ablation_means_are_consistent_and_in_the_paper():
    abl = paper_results.ABLATIONS
    assert abl["Table 5 (IFC / CLC)"]["IFC + CLC"] == abl["Table 9 (few-shot)"]["Full dataset"]
    baseline = abl["Table 5 (IFC / CLC)"]["none"]
    raw = paper_results.paper_row_for("raw", "RGB+3D", "i_auroc")
    assert raw.printed_mean == baseline["i_auroc"]
    assert (
        paper_results.paper_row_for("raw", "RGB+3D", "aupro_30").printed_mean
        == (baseline["aupro_30"])
    )
    if not PAPER.exists():
        pytest.skip(f"{PAPER} not present")
    text = PAPER.read_text()
    for rows in abl.values():
        for values in rows.values():
            triple = "\t".join(f"{values[k]:.3f}" for k in ("i_auroc", "aupro_30", "p_auroc"))
            assert triple in text


def test_paper_value_lookup():
    assert paper_results.paper_value("lsfa", "RGB+3D", "i_auroc", "bagel") == 1.0
    assert paper_results.paper_value("lsfa", "RGB+3D", "i_auroc", "mean") == 0.971
    assert paper_results.paper_value("lsfa", "RGB", "i_auroc", "bagel") is None  # ambiguous
    assert paper_results.paper_value("lsfa", "3D", "p_auroc", "bagel") is None
    assert paper_results.paper_value("fpfh", "RGB", "aupro_30", "bagel") is None
    assert paper_results.paper_value("raw", "3D", "aupro_30", "tire") == 0.929
    with pytest.raises(ValueError, match="unknown method"):
        paper_results.paper_value("nope", "3D", "i_auroc", "bagel")


# ---------------------------------------------------------------- tables


def _random_results(seed=0, classes=paper_results.CLASSES):
    rng = np.random.default_rng(seed)
    return {
        s: {c: {m: float(rng.uniform(0.5, 1.0)) for m in tables.METRICS} for c in classes}
        for s in tables.SETTINGS
    }


def test_json_round_trip_values_means_and_paper_diff(tmp_path):
    results = _random_results()
    paths = tables.write_result_tables(results, tmp_path, paper_method="lsfa")
    doc = json.loads(paths["json"].read_text())
    assert doc["paper_method"] == "lsfa"
    for s in tables.SETTINGS:
        for m in tables.METRICS:
            cells = doc["metrics"][m][s]
            for c in paper_results.CLASSES:
                assert cells[c]["value"] == results[s][c][m]
            want_mean = np.mean([results[s][c][m] for c in paper_results.CLASSES])
            assert cells["mean"]["value"] == pytest.approx(want_mean, abs=1e-12)
            for name, cell in cells.items():
                paper = paper_results.paper_value("lsfa", s, m, name)
                assert cell["paper"] == paper
                if paper is None:
                    assert cell["diff"] is None
                else:
                    assert cell["diff"] == pytest.approx(cell["value"] - paper, abs=1e-12)
    assert doc["metrics"]["i_auroc"]["RGB+3D"]["cable_gland"]["paper"] == 0.939
    assert doc["metrics"]["i_auroc"]["RGB"]["bagel"]["paper"] is None
    # Atomic writes leave exactly the three files, no temp files.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "results.csv",
        "results.json",
        "results.md",
    ]


def test_csv_round_trip(tmp_path):
    results = _random_results(1)
    path = tables.write_result_tables(results, tmp_path)["csv"]
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == len(tables.METRICS) * len(tables.SETTINGS) * 11
    for row in rows:
        if row["class"] == "mean":
            want = np.mean([results[row["setting"]][c][row["metric"]] for c in results["RGB"]])
            assert float(row["value"]) == pytest.approx(want, abs=1e-12)
        else:
            assert float(row["value"]) == results[row["setting"]][row["class"]][row["metric"]]
        assert row["paper"] == "" and row["diff"] == ""


def test_markdown_has_rounded_values_and_paper_columns(tmp_path):
    results = _random_results(2)
    md = tables.write_result_tables(results, tmp_path, paper_method="raw")["md"].read_text()
    section = md.split("## I-AUROC")[1].split("## ")[0]
    line = next(ln for ln in section.splitlines() if ln.startswith("| cookie |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # class, then (ours, paper, diff) for RGB, 3D, RGB+3D.
    ours = results["3D"]["cookie"]["i_auroc"]
    assert cells[4] == f"{ours:.3f}"
    assert cells[5] == "0.969"
    assert cells[6] == f"{ours - 0.969:+.3f}"


def test_nan_needs_a_note_and_is_shown_as_na(tmp_path):
    results = _random_results(3)
    results["RGB+3D"]["foam"]["i_auroc"] = math.nan
    with pytest.raises(ValueError, match="RGB\\+3D/foam/i_auroc is NaN without a note"):
        tables.write_result_tables(results, tmp_path)
    notes = {"RGB+3D": {"foam": ["test set has no defects"]}}
    paths = tables.write_result_tables(results, tmp_path, notes=notes, paper_method="lsfa")
    md = paths["md"].read_text()
    assert "n/a (test set has no defects)" in md
    assert "n/a (mean undefined: n/a for foam)" in md
    csv_text = paths["csv"].read_text()
    doc = json.loads(paths["json"].read_text())
    cell = doc["metrics"]["i_auroc"]["RGB+3D"]["foam"]
    assert cell == {"value": None, "paper": 0.951, "diff": None, "notes": notes["RGB+3D"]["foam"]}
    for text in (md, csv_text, paths["json"].read_text()):
        assert not re.search(r"\bnan\b", text, flags=re.IGNORECASE)
    console = tables.format_console_table(results, notes=notes)
    assert "n/a RGB+3D/foam: test set has no defects" in console
    assert not re.search(r"\bnan\b", console, flags=re.IGNORECASE)


def test_subset_of_classes_does_not_compare_the_mean(tmp_path):
    results = _random_results(4, classes=("tire", "bagel"))
    doc = json.loads(
        tables.write_result_tables(results, tmp_path, paper_method="lsfa")["json"].read_text()
    )
    cells = doc["metrics"]["aupro_30"]["3D"]
    assert list(cells) == ["bagel", "tire", "mean"]  # dataset order, not insertion order
    assert cells["bagel"]["paper"] == 0.974
    assert cells["mean"]["paper"] is None and cells["mean"]["diff"] is None


def test_unknown_setting_or_metric_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown setting"):
        tables.write_result_tables({"RGBD": {"bagel": {"i_auroc": 0.5}}}, tmp_path)
    with pytest.raises(ValueError, match="unknown metric"):
        tables.write_result_tables({"RGB": {"bagel": {"auc": 0.5}}}, tmp_path)


def test_console_table_values():
    results = _random_results(5)
    text = tables.format_console_table(results)
    block = text.split("\n\n")[tables.METRICS.index("p_auroc")]
    assert block.splitlines()[0] == "P-AUROC"
    mean_line = block.splitlines()[-1].split()
    assert mean_line[0] == "mean"
    for s, cell in zip(tables.SETTINGS, mean_line[1:], strict=True):
        assert cell == f"{np.mean([results[s][c]['p_auroc'] for c in results[s]]):.3f}"


def test_threshold_table_round_trip(tmp_path):
    thr = {"RGB+3D": {"tire": {"threshold": 1.25, "precision": 0.8, "recall": 0.5}}}
    paths = tables.write_threshold_table(thr, tmp_path)
    assert json.loads(paths["json"].read_text())["settings"] == thr
    rows = list(csv.DictReader(paths["csv"].open()))
    assert rows == [
        {
            "setting": "RGB+3D",
            "class": "tire",
            "threshold": "1.25",
            "precision": "0.8",
            "recall": "0.5",
        }
    ]
    assert "| tire | 1.25 | 0.800 | 0.500 |" in paths["md"].read_text()
    with pytest.raises(ValueError, match="lacks"):
        tables.write_threshold_table({"RGB": {"tire": {"threshold": 1.0}}}, tmp_path)
