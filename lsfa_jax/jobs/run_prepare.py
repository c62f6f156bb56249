"""The `prepare` step: build (or reuse) the prepared dataset and summarise it."""

from __future__ import annotations

from pathlib import Path

import ml_collections

from lsfa_jax import console
from lsfa_jax.atomic_io import atomic_write_text
from lsfa_jax.data import pipeline
from lsfa_jax.jobs.common import prepared_dataset


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
    console.stage("prepared %d classes; summary in %s", len(prepared), out)
    return prepared
