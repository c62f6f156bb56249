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
    with pytest.raises(ValueError, match="mvtec3d only"):
        tables.write_result_tables(_random_results(), tmp_path, paper_method="lsfa", dataset="eye")
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
            "rule": "",
            "pixel_threshold": "n/a",
            "pixel_rule": "",
        }
    ]
    assert "| tire | 1.25 | 0.800 | 0.500 | n/a | n/a | n/a |" in paths["md"].read_text()
    with pytest.raises(ValueError, match="lacks"):
        tables.write_threshold_table({"RGB": {"tire": {"threshold": 1.0}}}, tmp_path)


# ---------------------------------------------------------------- overlays


def test_overlay_panels_and_contour_positions():
    from scipy import ndimage

    from lsfa_jax.reports import overlays

    rng = np.random.default_rng(0)
    H, W = 20, 24
    rgb = rng.integers(0, 200, size=(H, W, 3), dtype=np.uint8)  # never pure green
    gt = np.zeros((H, W), np.uint8)
    gt[4:12, 6:15] = 255
    gt[0:3, 20:24] = 255  # touches the image border: border pixels are contour too
    amap = rng.uniform(0, 2, size=(H, W)).astype(np.float32)
    panel = overlays.overlay_image(rgb, gt, amap, title="bagel 001", vmin=0.0, vmax=2.0)
    T = overlays.TITLE_HEIGHT
    assert panel.shape == (T + H, 2 * W + overlays.COLORBAR_WIDTH, 3) and panel.dtype == np.uint8
    boundary = (gt > 0) & ~ndimage.binary_erosion(gt > 0, border_value=0)
    truth = panel[T:, :W]
    changed = np.any(truth != rgb, axis=-1)
    np.testing.assert_array_equal(changed, boundary)
    assert np.all(truth[boundary] == overlays.CONTOUR_RGB)
    # Heat panel: an independent blend with matplotlib's colormap.
    import matplotlib

    colors = matplotlib.colormaps["jet"](np.clip(amap / 2.0, 0, 1))[..., :3] * 255
    want = 0.5 * rgb + 0.5 * np.round(colors)
    assert np.max(np.abs(panel[T:, W : 2 * W].astype(float) - want)) <= 0.5 + 1e-9
    assert np.any(panel[:T] < 128)  # the title was drawn
    # The colour bar runs from vmax (top row) to vmin (bottom row) in the heat colours.
    bar = panel[T:, 2 * W + 2 : 2 * W + 14]
    rows = 2.0 - (np.arange(H) + 0.5) / H * 2.0
    want_bar = np.round(matplotlib.colormaps["jet"](rows / 2.0)[:, :3] * 255)
    np.testing.assert_array_equal(bar[:, 5], want_bar.astype(np.uint8))


def test_overlay_predicted_mask_contour_and_threshold_on_the_bar():
    from scipy import ndimage

    from lsfa_jax.reports import overlays

    H, W = 48, 40
    rgb = np.full((H, W, 3), 90, np.uint8)
    amap = np.zeros((H, W))
    amap[10:30, 5:25] = 3.0
    panel = overlays.overlay_image(
        rgb, None, amap, title="t", vmin=0.0, vmax=4.0, pixel_threshold=1.5
    )
    T = overlays.TITLE_HEIGHT
    np.testing.assert_array_equal(panel[T:, :W], rgb)  # no ground truth: plain RGB
    predicted = amap > 1.5
    boundary = predicted & ~ndimage.binary_erosion(predicted, border_value=0)
    white = np.all(panel[T:, W : 2 * W] == overlays.PRED_RGB, axis=-1)
    np.testing.assert_array_equal(white, boundary)
    # The threshold line sits at the bar row of score 1.5: (4 - 1.5) / 4 of the height.
    column = panel[T:, 2 * W + 5]
    magenta = np.flatnonzero(np.all(column == overlays.THRESHOLD_RGB, axis=-1))
    assert magenta.size and abs(magenta.mean() - 2.5 / 4 * H) <= 1.5


def test_verdict_title_and_threshold_groups():
    from lsfa_jax.reports import overlays

    assert overlays.verdict_title("a", 2.0, 1.0, "rule x") == (
        "a: ANOMALOUS, score 2 > threshold 1 (rule x)"
    )
    assert overlays.verdict_title("a", 1.0, 1.0) == "a: normal, score 1 <= threshold 1"
    labels = np.array([1, 1, 1, 0, 0, 0, 0])
    scores = np.array([0.9, 0.2, 0.6, 0.7, 0.1, 0.8, 0.3])
    sel = overlays.select_overlay_samples(labels, scores, k=5, threshold=0.5)
    # Brute force: what `score > 0.5` decides, ordered as documented.
    assert sel["missed_defects"].tolist() == [1]
    assert sel["false_alarms"].tolist() == [5, 3]
    assert sel["top_defects"].tolist() == [0, 2]
    assert overlays.select_overlay_samples(labels, scores, k=1, threshold=0.5)[
        "false_alarms"
    ].tolist() == [5]


def test_prediction_files_at_the_input_resolution(tmp_path):
    import tifffile
    from PIL import Image

    from lsfa_jax.reports import overlays

    amap = np.zeros((16, 16), np.float32)
    amap[4:8, 4:12] = 2.0
    paths = overlays.save_prediction_files(
        tmp_path,
        "s",
        np.zeros((16, 16, 3), np.uint8),
        amap,
        input_size=(32, 48),
        title="s",
        vmin=0.0,
        vmax=2.0,
        pixel_threshold=1.0,
    )
    full = tifffile.imread(paths["map"])
    assert full.shape == (32, 48) and full.dtype == np.float32
    # Bilinear upsampling keeps the range and the plateau's centre.
    assert full.min() == 0.0 and full.max() == 2.0 and full[12, 24] == 2.0
    mask = np.asarray(Image.open(paths["mask"]))
    np.testing.assert_array_equal(mask, np.where(full > 1.0, 255, 0))
    assert Image.open(paths["overlay"]).size == (
        32 + overlays.COLORBAR_WIDTH,
        16 + overlays.TITLE_HEIGHT,
    )


def test_overlay_png_and_bad_input(tmp_path):
    from PIL import Image

    from lsfa_jax.reports import overlays

    rgb = np.zeros((8, 10, 3), np.uint8)
    path = overlays.save_overlay_png(
        tmp_path / "o.png", rgb, np.zeros((8, 10)), np.ones((8, 10)), title="t", vmin=0, vmax=1
    )
    img = np.asarray(Image.open(path))
    np.testing.assert_array_equal(
        img,
        overlays.overlay_image(rgb, np.zeros((8, 10)), np.ones((8, 10)), title="t", vmin=0, vmax=1),
    )
    with pytest.raises(ValueError, match="must match"):
        overlays.overlay_image(rgb, np.zeros((8, 9)), np.ones((8, 10)), title="t", vmin=0, vmax=1)
    with pytest.raises(ValueError, match="vmax > vmin"):
        overlays.overlay_image(rgb, np.zeros((8, 10)), np.ones((8, 10)), title="t", vmin=1, vmax=1)
    with pytest.raises(ValueError, match="uint8"):
        overlays.overlay_image(
            rgb.astype(float), np.zeros((8, 10)), np.ones((8, 10)), title="t", vmin=0, vmax=1
        )
    assert overlays.shared_scale(np.array([[[0.5, 2.0]], [[-1.0, 0.0]]])) == (-1.0, 2.0)


def test_select_overlay_samples_against_brute_force():
    from lsfa_jax.reports import overlays

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=40)
    scores = np.round(rng.uniform(0, 1, size=40), 1)  # many ties
    k = 3
    sel = overlays.select_overlay_samples(labels, scores, k)
    defects = [i for i in range(40) if labels[i] == 1]
    goods = [i for i in range(40) if labels[i] == 0]
    missed = sorted(defects, key=lambda i: (scores[i], i))[:k]
    alarms = sorted(goods, key=lambda i: (-scores[i], i))[:k]
    top = sorted([i for i in defects if i not in missed], key=lambda i: (-scores[i], i))[:k]
    assert sel["missed_defects"].tolist() == missed
    assert sel["false_alarms"].tolist() == alarms
    assert sel["top_defects"].tolist() == top
    # Not just the first files: with scores increasing in index the choice is at the ends.
    sel = overlays.select_overlay_samples(np.array([1, 1, 1, 1, 0, 0, 0]), np.arange(7.0), 1)
    assert {k: v.tolist() for k, v in sel.items()} == {
        "missed_defects": [0],
        "false_alarms": [6],
        "top_defects": [3],
    }
    few = overlays.select_overlay_samples(np.array([1, 0]), np.array([0.2, 0.1]), 5)
    assert few["top_defects"].size == 0 and few["missed_defects"].tolist() == [0]
    with pytest.raises(ValueError, match="labels must be"):
        overlays.select_overlay_samples(np.array([2, 0]), np.array([0.0, 1.0]), 1)


# ---------------------------------------------------------------- plots


def test_plots_write_pngs_and_reject_bad_curves(tmp_path):
    from PIL import Image

    from lsfa_jax.reports import plots

    fpr = np.linspace(0, 1, 50)
    curves = {"RGB": (fpr, np.sqrt(fpr)), "RGB+3D": (fpr, fpr**0.25)}
    roc = plots.plot_roc(tmp_path / "roc.png", curves, title="bagel", aucs={"RGB": 0.67})
    pro = plots.plot_pro(tmp_path / "pro.png", curves, title="bagel")
    for path, size in ((roc, (500, 500)), (pro, (600, 500))):
        img = Image.open(path)
        assert img.format == "PNG" and img.size == size
        assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 10
    with pytest.raises(ValueError, match="equal length"):
        plots.plot_roc(tmp_path / "x.png", {"RGB": (fpr, fpr[:-1])}, title="x")
    with pytest.raises(ValueError, match="outside"):
        plots.plot_pro(tmp_path / "x.png", {"RGB": (fpr, fpr + 0.5)}, title="x")
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------- manifest


def test_manifest_hashes_stages_and_json(tmp_path):
    import hashlib

    import ml_collections

    from lsfa_jax.reports import manifest as mf

    weights = tmp_path / "w.bin"
    payload = np.random.default_rng(0).bytes(3 * (1 << 20) + 17)  # spans several chunks
    weights.write_bytes(payload)
    config = ml_collections.ConfigDict({"seed": 3, "patchcore": {"coreset_ratio": 0.1}})
    m = mf.RunManifest(config)
    entry = m.add_weights("rgb", weights, random_init=False)
    assert entry["sha256"] == hashlib.sha256(payload).hexdigest()
    m.add_weights("point", None, random_init=True)
    with pytest.raises(ValueError, match="not random"):
        m.add_weights("adaptor", None, random_init=False)
    m.set_seed("data", 3)
    import resource
    import time

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with m.stage("fit"):
        time.sleep(0.05)
    with pytest.raises(RuntimeError), m.stage("broken"):
        raise RuntimeError("boom")
    path = m.write(tmp_path / "run" / "manifest.json")
    doc = json.loads(path.read_text())
    assert doc["config"] == {"seed": 3, "patchcore": {"coreset_ratio": 0.1}}
    assert doc["weights"][0]["sha256"] == hashlib.sha256(payload).hexdigest()
    assert doc["weights"][1] == {"name": "point", "path": None, "sha256": None, "random_init": True}
    assert doc["seeds"] == {"data": 3}
    assert [s["name"] for s in doc["stages"]] == ["fit", "broken"]
    assert [s["ok"] for s in doc["stages"]] == [True, False]
    peaks = [s["peak_host_memory_bytes"] for s in doc["stages"]]
    assert rss_before <= peaks[0] <= peaks[1] <= doc["peak_host_memory_bytes"]
    assert 0.05 <= doc["stages"][0]["seconds"] < 5
    import jax
    import numpy

    assert doc["versions"]["jax"] == jax.__version__
    assert doc["versions"]["numpy"] == numpy.__version__
    assert doc["versions"]["python"].count(".") == 2
    assert doc["devices"][0]["platform"] == jax.devices()[0].platform
    assert sorted(p.name for p in path.parent.iterdir()) == ["manifest.json"]


def test_save_class_overlays_uses_one_scale_and_the_selection(tmp_path):
    from PIL import Image

    from lsfa_jax.reports import overlays

    rng = np.random.default_rng(2)
    n, h, w = 6, 8, 8
    rgb = rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
    gts = np.zeros((n, h, w), np.uint8)
    maps = rng.uniform(0, 1, size=(n, h, w))
    maps[5] *= 10  # the largest value of the class sets vmax for every panel
    labels = np.array([1, 1, 1, 0, 0, 0])
    scores = np.array([0.9, 0.1, 0.5, 0.2, 0.8, 0.3])
    paths = overlays.save_class_overlays(
        tmp_path, "foam", rgb, gts, maps, labels, scores, k=1, sample_names=list("abcdef")
    )
    assert [p.name for p in paths] == [
        "foam_missed_defects_0_b.png",
        "foam_false_alarms_0_e.png",
        "foam_top_defects_0_a.png",
    ]
    vmin, vmax = float(maps.min()), float(maps.max())
    want = overlays.overlay_image(
        rgb[4], gts[4], maps[4], title="foam e false_alarms score 0.8", vmin=vmin, vmax=vmax
    )
    np.testing.assert_array_equal(np.asarray(Image.open(paths[1])), want)
