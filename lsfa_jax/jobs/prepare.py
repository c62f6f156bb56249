"""The `prepare` step: build (or reuse) the prepared dataset and summarise it."""

from __future__ import annotations

from pathlib import Path

import ml_collections
from absl import logging

from lsfa_jax.atomic_io import atomic_write_text
from lsfa_jax.data import pipeline, prepare
from lsfa_jax.jobs.common import cache_dir, raw_data_dir, selected_classes


def prepared_dataset(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, str]:
    """class -> prepared dataset folder, for the configured classes."""
    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    data_cfg.classes = ",".join(selected_classes(config))
    data_cfg.data_dir = raw_data_dir(config, workdir)
    data_cfg.skip_bad_samples = bool(config.skip_bad_samples)
    return prepare.prepare_dataset(data_cfg, cache_dir(config, workdir))


def summary_table(prepared: dict[str, str]) -> str:
    """Markdown table: samples per class, split and defect type."""
    counts = pipeline.split_summary(prepared)
    lines = ["| class | split | defect type | samples |", "|---|---|---|---|"]
    for class_name, splits in counts.items():
        for split, types in splits.items():
            for defect_type, number in sorted(types.items()):
                lines.append(f"| {class_name} | {split} | {defect_type} | {number} |")
    return "\n".join(lines)


def run_prepare(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, str]:
    prepared = prepared_dataset(config, workdir)
    table = summary_table(prepared)
    out = workdir / "dataset_summary.md"
    atomic_write_text(out, table + "\n")
    print(table)
    logging.info("Prepared %d classes; summary written to %s", len(prepared), out)
    return prepared
