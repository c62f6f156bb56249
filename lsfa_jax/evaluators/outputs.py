"""The files of an evaluated class (scores, overlays, curves) and of a whole run (tables)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from lsfa_jax.atomic_io import atomic_write_json
from lsfa_jax.evaluators.class_eval import ClassResult, LabelledSplit
from lsfa_jax.model_folder import ClassModel
from lsfa_jax.reports import html, overlays, paper_results, plots, tables
from lsfa_jax.summaries import SummaryWriter


def write_class_outputs(
    out: Path,
    class_name: str,
    result: ClassResult,
    split: LabelledSplit,
    model: ClassModel,
    *,
    num_overlays: int,
    draw_plots: bool,
) -> None:
    """scores/<class>.json, images/<class>/ overlays and plots/<class>_{roc,pro}.png."""
    atomic_write_json(
        out / "scores" / f"{class_name}.json",
        {
            "file_id": split.file_id,
            "label": [int(v) for v in split.labels],
            "defect_type": list(split.defect_types),
            **{s: v[0].tolist() for s, v in result.outputs.items()},
        },
    )
    main = result.main_setting
    scores, maps = result.outputs[main]
    if num_overlays > 0:
        masks = split.masks if split.masks is not None else np.zeros(maps.shape, np.uint8)
        overlays.save_class_overlays(
            out / "images" / class_name,
            class_name,
            split.rgb,
            masks,
            maps,
            split.labels,
            scores,
            k=num_overlays,
            sample_names=[i.replace("/", "_") for i in split.file_id],
            scale=model.map_scale[main],
            threshold=model.thresholds[main].image,
            rule=model.thresholds[main].description,
            pixel_threshold=model.thresholds[main].pixel,
        )
    if draw_plots and result.curves:
        plots.plot_roc(
            out / "plots" / f"{class_name}_roc.png",
            {s: c[0] for s, c in result.curves.items()},
            title=f"{class_name}: ROC",
            aucs={s: result.metrics[s]["i_auroc"] for s in result.curves},
        )
        pro = {s: c[1] for s, c in result.curves.items() if c[1] is not None}
        if pro:
            plots.plot_pro(
                out / "plots" / f"{class_name}_pro.png",
                pro,
                title=f"{class_name}: PRO",
                aupros={s: result.metrics[s]["aupro_30"] for s in pro},
            )


@dataclasses.dataclass
class RunResults:
    """Per-class results collected over a run: {setting: {class: ...}} and {class: per-defect}."""

    metrics: dict = dataclasses.field(default_factory=dict)
    notes: dict = dataclasses.field(default_factory=dict)
    thresholds: dict = dataclasses.field(default_factory=dict)
    per_defect: dict = dataclasses.field(default_factory=dict)

    def add(self, class_name: str, result: ClassResult) -> None:
        self.per_defect[class_name] = result.per_defect
        for setting, values in result.metrics.items():
            self.metrics.setdefault(setting, {})[class_name] = values
            self.notes.setdefault(setting, {})[class_name] = result.notes[setting]
            self.thresholds.setdefault(setting, {})[class_name] = result.thresholds[
                setting
            ].to_json()


def write_run_reports(
    results: RunResults, out_dir: Path, *, method: str, dataset: str
) -> dict[str, Path]:
    """results/results.{md,json,csv}, thresholds.*, per_defect.*, index.html (from the files
    under out_dir's parent, the workdir); returns the tables' and the page's paths.
    The paper's numbers stand beside ours for the datasets whose numbers are transcribed."""
    paper_method = method if dataset in paper_results.DATASETS else None
    paths = tables.write_result_tables(
        results.metrics, out_dir, notes=results.notes, paper_method=paper_method, dataset=dataset
    )
    tables.write_threshold_table(results.thresholds, out_dir, dataset=dataset)
    tables.write_per_defect(results.per_defect, out_dir)
    paths["html"] = html.write_index(out_dir.parent, title=f"lsfa-jax: {dataset}, method {method}")
    write_eval_summaries(out_dir.parent, results)
    return paths


def write_eval_summaries(workdir: Path, results: RunResults, images_per_class: int = 3) -> None:
    """tensorboard/eval: every class's metrics per setting ("<class>/<setting>/<metric>") and
    its first `images_per_class` overlays (by file name: missed defects, false alarms, ...)."""
    writer = SummaryWriter(workdir / "tensorboard" / "eval")
    try:
        for setting, per_class in results.metrics.items():
            for class_name, values in per_class.items():
                writer.scalars({f"{class_name}/{setting}/{k}": v for k, v in values.items()}, 0)
        classes = {c for per_class in results.metrics.values() for c in per_class}
        for class_name in sorted(classes):
            folder = workdir / "images" / class_name
            for path in sorted(folder.glob("*.png"))[:images_per_class] if folder.is_dir() else []:
                with Image.open(path) as image:
                    writer.images(
                        {f"{class_name}/{path.stem}": np.asarray(image.convert("RGB"))}, 0
                    )
    finally:
        writer.close()
