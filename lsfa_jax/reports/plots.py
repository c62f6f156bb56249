"""ROC and PRO curve plots (matplotlib, Agg backend, PNG), one line per setting."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on the training machines

import matplotlib.pyplot as plt
import numpy as np

from lsfa_jax.atomic_io import atomic_write_bytes

PRO_LIMITS = (0.3, 0.01)  # the FPR limits of AUPRO@0.3 and AUPRO@0.01
Curves = Mapping[str, tuple[np.ndarray, np.ndarray]]


def _check_curves(curves: Curves, what: str) -> None:
    if not curves:
        raise ValueError(f"plots: no {what} curves given")
    for name, (x, y) in curves.items():
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim != 1 or x.shape != y.shape or x.size < 2:
            raise ValueError(
                f"plots: {what} curve {name!r}: need two 1-D arrays of equal length >= 2, "
                f"got {x.shape} and {y.shape}"
            )
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            raise ValueError(f"plots: {what} curve {name!r} has non-finite values")
        if x.min() < 0 or x.max() > 1 or y.min() < 0 or y.max() > 1:
            raise ValueError(f"plots: {what} curve {name!r} has values outside [0, 1]")


def _save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_roc(
    path: str | os.PathLike,
    curves: Curves,
    *,
    title: str,
    aucs: Mapping[str, float] | None = None,
) -> Path:
    """ROC curves of one class: curves = {setting: (fpr, tpr)}; aucs, if given, go in the legend."""
    _check_curves(curves, "ROC")
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (fpr, tpr) in curves.items():
        label = name if aucs is None or name not in aucs else f"{name} (AUROC {aucs[name]:.3f})"
        ax.plot(fpr, tpr, label=label)
    ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_pro(
    path: str | os.PathLike,
    curves: Curves,
    *,
    title: str,
    aupros: Mapping[str, float] | None = None,
) -> Path:
    """PRO curves of one class: curves = {setting: (fpr, pro)}.

    The FPR axis is logarithmic so that the 0.01 limit is visible; both integration limits
    (0.3 and 0.01) are marked with vertical lines.
    """
    _check_curves(curves, "PRO")
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, (fpr, pro) in curves.items():
        label = name if aupros is None or name not in aupros else f"{name} ({aupros[name]:.3f})"
        ax.plot(np.maximum(fpr, 1e-4), pro, label=label)
    for limit in PRO_LIMITS:
        ax.axvline(limit, color="0.4", linestyle="--", linewidth=1)
        ax.text(limit, 1.0, f" FPR {limit}", va="top", fontsize=8)
    ax.set_xscale("log")
    ax.set(xlim=(1e-4, 1), ylim=(0, 1.02), xlabel="false positive rate", ylabel="PRO")
    ax.set_title(title)
    ax.legend(loc="lower right")
    return _save(fig, path)
