"""The steps `main.py` dispatches to, chosen by `config.mode` and `config.method`."""

from __future__ import annotations

import os

import ml_collections

from lsfa_jax import console
from lsfa_jax.jobs.checks import check_inputs
from lsfa_jax.jobs.common import prepare_workdir


def run_job(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
    """Runs `config.mode` for `config.method`, writing everything below `workdir`."""
    from lsfa_jax.jobs.validate import validate

    validate(config)
    path = prepare_workdir(workdir)
    # test / predict / export take the method from the model folder, not from the config.
    what = (
        f"model {config.checkpoint}"
        if config.mode in ("test", "predict", "export")
        else f"method {config.method}"
    )
    console.stage(
        "%s, %s, %s: output in %s (log: run.log)", config.mode, what, config.data.name, path
    )
    check_inputs(config, path)  # seconds, before any long work
    # The data pipeline and builders load TensorFlow (seconds on its own): only now, and with
    # its C++ start-up lines hidden.
    console.import_tensorflow_quietly()
    if config.mode == "prepare":
        from lsfa_jax.jobs.run_prepare import run_prepare

        run_prepare(config, path)
    elif config.mode in ("train_eval", "eval"):
        from lsfa_jax.jobs.run_evaluation import run_evaluation

        run_evaluation(config, path)
    elif config.mode == "test":
        from lsfa_jax.jobs.run_test import run_test

        run_test(config, path)
    elif config.mode == "predict":
        from lsfa_jax.jobs.run_predict import run_predict

        run_predict(config, path)
    elif config.mode == "export":
        from lsfa_jax.jobs.run_export import run_export

        run_export(config, path)
    else:
        from lsfa_jax.jobs.run_convert import run_convert

        run_convert(config, path)
