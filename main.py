"""lsfa-jax entry point: `python main.py --config=configs/<name>.py [--config.key=value ...]`.

The config's `mode` picks the job (prepare, train_eval, eval, predict, convert) and its `method`
the features (lsfa, raw, fpfh); see README.md.
"""

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
flags.DEFINE_string("workdir", None, "Where caches, checkpoints and results go.")
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from lsfa_jax.jobs import run_job

    config = FLAGS.config
    workdir = FLAGS.workdir or f"workdir/{config.data.name}_{config.method}"
    logging.info("workdir: %s", workdir)
    run_job(config, workdir)


if __name__ == "__main__":
    app.run(main)
