"""Tests for the paper's Eyecandies numbers (Table 3) and the eyecandies result tables."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from lsfa_jax.data.eyecandies import EYECANDIES_CLASSES
from lsfa_jax.reports import paper_results, tables

PAPER = Path(__file__).resolve().parents[2] / "shared/paper/lsfa_paper.txt"
ROWS = paper_results.EYECANDIES_ROWS


def _table3_lines() -> list[str]:
    if not PAPER.exists():
        pytest.skip(f"{PAPER} not present")
    lines = PAPER.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Table 3:"))
    end = next(i for i, line in enumerate(lines) if i > start and line.startswith("Table 4:"))
    return lines[start:end]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r.setting}-{r.method_label}")
def test_printed_mean_is_the_mean_of_the_class_values(row):
    assert row.dataset == "eyecandies" and row.table == "Table 3" and row.metric == "i_auroc"
    assert list(row.values) == list(EYECANDIES_CLASSES)
    assert tuple(row.values.values()) == row.cells[:10]
    # Values and mean are each rounded to 3 decimals: they agree to within 0.001.
    assert abs(np.mean(row.cells[:10]) - row.printed_mean) <= 0.001
    assert row.mean == row.printed_mean


def test_rows_are_in_the_paper_and_in_their_block():
    lines = [line for line in _table3_lines() if re.search(r"\d\.\d{3}", line)]
    lsfa_lines = [i for i, line in enumerate(lines) if "LSFA(Ours)" in line]
    assert len(lsfa_lines) == 3
    for row in ROWS:
        want = [f"{v:.3f}" for v in row.cells]
        hits = [
            i
            for i, line in enumerate(lines)
            if row.method_label in line and re.findall(r"\d\.\d{3}", line) == want
        ]
        assert len(hits) == 1, f"{row.setting} {row.method_label} not found once in Table 3"
        # Blocks end at LSFA's rows: RGB, then 3D, then RGB+3D.
        block = sum(i < hits[0] for i in lsfa_lines)
        assert paper_results.SETTINGS[block] == row.setting


def test_column_headings_map_to_our_class_names():
    header = next(line for line in _table3_lines() if line.startswith("Method\t"))
    assert header.split("\t") == ["Method", *paper_results.TABLE3_COLUMNS, "Mean"]
    assert tuple(paper_results.TABLE3_COLUMNS.values()) == EYECANDIES_CLASSES
    for heading, name in paper_results.TABLE3_COLUMNS.items():
        compact = heading.replace(" ", "")
        if compact.endswith("."):  # "Hazelnut T." -> HazelnutT...
            base, initial = compact[:-2], compact[-2]
            assert name.startswith(base) and name[len(base)] == initial, heading
        else:
            assert name.startswith(compact), heading


def test_paper_value_lookup_for_eyecandies():
    def value(method, setting, class_name):
        return paper_results.paper_value(method, setting, "i_auroc", class_name, "eyecandies")

    assert value("lsfa", "RGB+3D", "CandyCane") == 0.670
    assert value("lsfa", "RGB", "mean") == 0.890
    assert value("lsfa", "3D", "PeppermintCandy") == 0.843
    assert value("raw", "RGB", "HazelnutTruffle") == 0.632
    assert value("raw", "3D", "mean") == 0.725
    assert value("raw", "RGB+3D", "CandyCane") is None
    assert value("m3dm", "RGB+3D", "mean") == 0.897
    assert value("fpfh", "3D", "CandyCane") is None
    assert paper_results.paper_value("lsfa", "RGB", "aupro_30", "mean", "eyecandies") is None
    # The MVTec 3D-AD default is unchanged.
    assert paper_results.paper_value("lsfa", "RGB+3D", "i_auroc", "bagel") == 1.0
    with pytest.raises(ValueError, match="unknown dataset"):
        paper_results.paper_value("lsfa", "RGB", "i_auroc", "CandyCane", "real3d")


def test_eyecandies_table_has_the_paper_column(tmp_path):
    rng = np.random.default_rng(0)
    results = {
        s: {c: {"i_auroc": float(rng.uniform()), "aupro_30": float(rng.uniform())} for c in cls}
        for s in tables.SETTINGS
        for cls in [list(reversed(EYECANDIES_CLASSES))]
    }
    paths = tables.write_result_tables(results, tmp_path, paper_method="lsfa", dataset="eyecandies")
    doc = json.loads(paths["json"].read_text())
    assert doc["dataset"] == "eyecandies"
    for setting in tables.SETTINGS:
        cells = doc["metrics"]["i_auroc"][setting]
        assert list(cells) == [*EYECANDIES_CLASSES, "mean"]  # dataset order
        row = paper_results.find_row("i_auroc", setting, "LSFA(Ours)", "eyecandies")
        for name in EYECANDIES_CLASSES:
            assert cells[name]["paper"] == row.values[name]
            assert cells[name]["diff"] == pytest.approx(
                results[setting][name]["i_auroc"] - row.values[name]
            )
        assert cells["mean"]["paper"] == row.printed_mean
        assert all(c["paper"] is None for c in doc["metrics"]["aupro_30"][setting].values())
    md = paths["md"].read_text()
    assert "| class | RGB | RGB paper | RGB diff | 3D | 3D paper |" in md
    candy = next(line for line in md.splitlines() if line.startswith("| CandyCane |"))
    cells = [c.strip() for c in candy.strip("|").split("|")]
    assert cells[2] == "0.681" and cells[5] == "0.517" and cells[8] == "0.670"
    assert "Table 3 row 'LSFA(Ours)'" in md and "87.5%" in md
    # A subset of classes: the paper mean is not compared.
    subset = {s: {"CandyCane": v["CandyCane"]} for s, v in results.items()}
    table = tables.build_table(subset, paper_method="raw", dataset="eyecandies")
    assert table["i_auroc"]["RGB"]["CandyCane"]["paper"] == 0.648
    assert table["i_auroc"]["RGB"]["mean"]["paper"] is None
    assert table["i_auroc"]["RGB+3D"]["CandyCane"]["paper"] is None
