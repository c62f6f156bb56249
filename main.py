"""lsfa-jax: `python main.py --config=configs/<file>.py[:variant] [--config.key=value ...]`.

`python main.py --help` lists the modes, methods, datasets, config files and their variants;
`--config.mode=keys` lists every config key with its default and meaning. A mistake in the
inputs (config, data, weights, workdir, model folder) ends the run with one line naming the file
or key (exit code 2); `--config.debug=True` or LSFA_DEBUG=1 shows the traceback as well.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
flags.DEFINE_string("workdir", None, "Where caches, checkpoints and results go.")
flags.DEFINE_bool("verbose", False, "Show the libraries' log messages on the console too.")
flags.mark_flags_as_required(["config"])

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def _debug_requested(argv: list[str]) -> bool:
    if os.environ.get("LSFA_DEBUG", "") not in ("", "0"):
        return True
    return any(a.lower() in ("--config.debug=true", "--config.debug=1") for a in argv)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def _last_line(error: BaseException) -> str:
    """The most specific line of a (multi-line, chained) config-loading error."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing whose failures (bad value, unknown key, missing config file) are one
    line; `--help` first gets the overview of modes, methods and config files."""
    if any(a in ("--help", "-h", "--helpshort", "-?") for a in argv[1:]):
        from lsfa_jax.jobs import usage

        print(usage.overview(os.path.dirname(os.path.abspath(__file__))))
        print(f"\nFlags (--helpfull lists absl's own too):\n{FLAGS.main_module_help()}")
        sys.exit(0)
    try:
        args = FLAGS(argv)
        FLAGS.config.keys()  # the config file loads lazily; its errors surface here
        return args
    except OSError as error:
        if _debug_requested(argv):
            raise
        _fail(f"--config={FLAGS['config'].config_filename}: cannot load it ({_last_line(error)})")
    except ValueError as error:
        if _debug_requested(argv):
            raise
        _fail(f"--config={FLAGS['config'].config_filename}: {_last_line(error)}")
    except flags.Error as error:
        if _debug_requested(argv):
            raise
        text = str(error)
        if "Traceback" in text:  # ml_collections quotes the config file's traceback
            text = f"{text.split(':', 1)[0]}: {_last_line(error)}"
        _fail(f"{text} (python main.py --help lists modes, methods and config files)")
    except (AttributeError, KeyError) as error:
        # ml_collections raises these for an override naming a key the config lacks.
        if _debug_requested(argv):
            raise
        from lsfa_jax.jobs import usage

        _fail(usage.unknown_key_message(argv, error))
    return []


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    debug = bool(config.get("debug", False)) or _debug_requested(argv)
    from lsfa_jax import console
    from lsfa_jax.errors import UserError

    console.configure(verbose=FLAGS.verbose)
    try:
        if config.mode == "keys":
            from lsfa_jax.jobs import usage

            print(usage.describe_keys(config, FLAGS["config"].config_filename))
            return
        from lsfa_jax.distributed import initialize_from_config

        # Before anything touches a device: a multi-process run's devices are known only after.
        initialize_from_config(config)
        from lsfa_jax.jobs import run_job

        run_job(config, FLAGS.workdir or f"workdir/{config.data.name}_{config.method}")
    except KeyboardInterrupt:
        logging.info("interrupted by the user")
        print("\ninterrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except UserError as error:
        if debug:
            raise
        logging.error("%s", error)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
