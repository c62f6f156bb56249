"""What the user sees on the terminal: one line per stage, warnings, progress bars, nothing else.

Every log record still reaches `<workdir>/run.log` (`add_log_file`); the console shows
  - `stage` lines: what a step does and where its output goes, printed as plain text;
  - warnings and errors, as "WARNING: message", except libraries' deprecation notices;
  - progress bars (tqdm, on stderr; `stage` writes around them so they do not garble).
`configure(verbose=True)` (main.py's `--verbose`) shows every library record as well.
"""

from __future__ import annotations

import logging as std_logging
import os
import signal
import sys
from pathlib import Path

import tqdm
from absl import logging

_PACKAGE_DIR = os.path.dirname(os.path.realpath(__file__)) + os.sep
_MAIN = os.path.join(os.path.dirname(_PACKAGE_DIR.rstrip(os.sep)), "main.py")
_STAGE = "lsfa_stage"  # a record attribute: the line was printed already, log it to files only
_verbose = False
# Libraries' warnings that say nothing to a user of this project (shown with --verbose):
# deprecation notices, and TFDS naming each custom builder config it is given.
_LIBRARY_NOISE = ("deprecat", "using custom data configuration")


def _is_project(record: std_logging.LogRecord) -> bool:
    """Logged by this package or main.py (absl records carry the caller's file)."""
    path = os.path.realpath(record.pathname)
    return path.startswith(_PACKAGE_DIR) or path == _MAIN


class _ConsoleFilter(std_logging.Filter):
    """Keeps the console to the project's warnings and anything at ERROR or above."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if getattr(record, _STAGE, False):
            return False
        if _verbose or record.levelno >= std_logging.ERROR:
            return True
        if record.levelno < std_logging.WARNING:
            return False
        if _is_project(record):
            return True
        message = record.getMessage().lower()
        return not any(noise in message for noise in _LIBRARY_NOISE)


def configure(verbose: bool = False) -> None:
    """Console filtering and a plain "LEVEL: message" format for the absl (root) handler."""
    global _verbose
    _verbose = verbose
    logging.use_absl_handler()  # main.py's app.run has installed it; other callers get it here
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _ConsoleFilter) for f in handler.filters):
        handler.addFilter(_ConsoleFilter())
    handler.setFormatter(std_logging.Formatter("%(levelname)s: %(message)s"))
    # The absl logger passes INFO on to the file handlers; the console filter decides the rest.
    logging.set_verbosity(logging.INFO)
    if not verbose:
        import warnings

        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)


def add_log_file(path: str | os.PathLike) -> Path:
    """Appends every record (stage lines included) to `path`, e.g. `<workdir>/run.log`."""
    path = Path(path)
    resolved = str(path.resolve())
    logger = logging.get_absl_logger()
    for existing in logger.handlers:
        if getattr(existing, "baseFilename", None) == resolved:
            return path
    handler = std_logging.FileHandler(path)
    handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    return path


def stage(message: str, *args: object) -> None:
    """One line for the user (stdout, around any progress bar) and for run.log."""
    text = message % args if args else message
    tqdm.tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()
    logging.info(text, extra={_STAGE: True})


def ignore_interrupt() -> None:
    """Pool initializer: Ctrl-C reaches the whole process group, and only the parent should
    report it (once) and stop the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow with the process's stderr (fd 2) sent to /dev/null meanwhile.

    Its C++ start-up lines ("oneDNN custom operations are on", "All log messages before
    absl::InitializeLog()") ignore TF_CPP_MIN_LOG_LEVEL; an import error still raises. With
    `configure(verbose=True)` the import is a plain one.
    """
    if _verbose or "tensorflow" in sys.modules:
        import tensorflow

        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
