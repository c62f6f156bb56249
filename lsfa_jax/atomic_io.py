"""The one atomic file writer: readers see the old file or the new one, never a partial one.

Every write goes to a hidden temp file in the target's folder (so the rename stays on one file
system), is fsynced, then renamed over the target with `os.replace`. On any failure the temp file
is removed and the previous file is left as it was. A process killed mid-write can leave only its
hidden temp file `.<name>.<random>.tmp` behind.

Files get mode 0666 and folders 0777 less the process umask (0644 / 0755 with the usual 022), as
`open` and `mkdir` would give; `tempfile` alone would leave them private (0600 / 0700).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import: os.umask can only be read by setting it, which is not thread-safe.
_UMASK = _read_umask()


def file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file under the process umask."""
    return 0o666 & ~_UMASK


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new hidden folder in `parent` (`tempfile.mkdtemp`), with the umask's usual mode."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o777 & ~_UMASK)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to `path` atomically, creating its folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), file_mode())
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text through `atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def strict_json(obj: Any) -> Any:
    """`obj` with every NaN or infinite float (numpy's included) replaced by None, so the JSON
    holds `null` where a value is undefined: strict parsers reject NaN and Infinity."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    if hasattr(obj, "dtype") and hasattr(obj, "tolist"):  # numpy scalars and arrays
        return strict_json(obj.tolist())
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any, **json_kwargs: Any) -> Path:
    """`json.dumps(strict_json(obj), allow_nan=False, **json_kwargs)` plus a newline through
    `atomic_write_bytes`: undefined (NaN / infinite) values become `null`.

    `indent` defaults to 2. The whole document is serialised before the temp file is opened, so
    an object that cannot be serialised leaves no file behind at all.
    """
    json_kwargs.setdefault("indent", 2)
    text = json.dumps(strict_json(obj), allow_nan=False, **json_kwargs)
    return atomic_write_text(path, text + "\n")
