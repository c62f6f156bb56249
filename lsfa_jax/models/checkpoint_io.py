"""Reading pretrained checkpoints without torch, strict key checks, and the JAX-native format.

`.pth`/`.pt` files are torch's zip format: `<name>/data.pkl` holds the object tree and each
tensor storage lives in `<name>/data/<key>`. The pickle is read with a restricted unpickler
that can only build tensors (as numpy arrays) and plain containers, so a checkpoint cannot
run code on load. Supported storages: float64/32/16, bfloat16 (via ml_dtypes), int64/32/16/8,
uint8 and bool.
"""

from __future__ import annotations

import collections
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from lsfa_jax.errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read or does not match the model; names the file."""


_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}

# Legacy (pre-1.6) torch.save files start with a protocol-2 pickle of this magic number.
_PICKLE_PROTO_2 = b"\x80\x02"


class _StorageType:
    """Stands in for `torch.<X>Storage` inside the pickle: only its dtype matters."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _CorruptTensorError(Exception):
    """A tensor whose size/stride/offset does not fit its storage."""


def _checked_layout(
    storage: np.ndarray, storage_offset: int, size: Sequence[int], stride: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(size, stride) as tuples; raises _CorruptTensorError when they do not fit the storage."""
    size, stride = tuple(size), tuple(stride)
    if any(s < 0 for s in size) or any(s < 0 for s in stride) or len(size) != len(stride):
        raise _CorruptTensorError(f"bad size {size} / stride {stride}")
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if 0 not in size and (storage_offset < 0 or last >= storage.size):
        raise _CorruptTensorError(
            f"tensor of size {size}, stride {stride}, offset {storage_offset} "
            f"reaches past its storage of {storage.size} elements"
        )
    return size, stride


def _rebuild_tensor_v2(
    storage: np.ndarray, storage_offset: int, size: Sequence[int], stride: Sequence[int], *_: Any
) -> np.ndarray:
    """Same signature as torch._utils._rebuild_tensor_v2 (the trailing requires_grad,
    backward_hooks and optional metadata are ignored); returns a contiguous numpy copy."""
    size, stride = _checked_layout(storage, storage_offset, size, stride)
    if 0 in size:
        return np.zeros(size, dtype=storage.dtype)
    base = storage[storage_offset:]
    view = np.lib.stride_tricks.as_strided(
        base, shape=size, strides=[s * storage.itemsize for s in stride], writeable=False
    )
    return np.array(view, order="C", copy=True)


def _rebuild_tensor_header(
    storage: np.ndarray, storage_offset: int, size: Sequence[int], stride: Sequence[int], *_: Any
) -> np.ndarray:
    """`_rebuild_tensor_v2` for `read_header`: the same checks, a zero-byte stand-in of the
    tensor's shape and dtype (np.broadcast_to of a scalar) instead of a copy."""
    size, _ = _checked_layout(storage, storage_offset, size, stride)
    return np.broadcast_to(np.zeros((), storage.dtype), size)


def _rebuild_parameter(data: np.ndarray, requires_grad: bool, backward_hooks: Any) -> np.ndarray:
    del requires_grad, backward_hooks
    return data


def _rebuild_parameter_with_state(
    data: np.ndarray, requires_grad: bool, backward_hooks: Any, state: Any
) -> np.ndarray:
    del requires_grad, backward_hooks, state
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    ("__builtin__", "complex"): complex,
}
_ALLOWED_GLOBALS.update({("torch", name): _StorageType(name) for name in _STORAGE_DTYPES})


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for torch's data.pkl that only knows tensors and plain containers."""

    def __init__(
        self,
        file: Any,
        *,
        archive: zipfile.ZipFile,
        prefix: str,
        source: str,
        header_only: bool = False,
    ):
        super().__init__(file)
        self._header_only = header_only
        self._archive = archive
        self._prefix = prefix
        self._source = source
        self._byteorder = _read_byteorder(archive, prefix, source)
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if self._header_only and (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_header
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self._source}: refusing to unpickle {module}.{name}; only tensors and plain "
                "containers (dict, list, tuple, OrderedDict, numbers, strings) are allowed"
            ) from None

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self._source}: unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self._source}: unsupported storage type {storage_type!r}")
        if key not in self._storages:
            self._storages[key] = self._read_storage(str(key), storage_type.dtype, int(numel))
        return self._storages[key]

    def _read_storage(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        name = f"{self._prefix}data/{key}"
        if self._header_only:
            try:
                stored = self._archive.getinfo(name).file_size
            except KeyError:
                raise CheckpointError(f"{self._source}: storage {name} is missing") from None
            if stored != numel * dtype.itemsize:
                raise CheckpointError(
                    f"{self._source}: storage {name} has {stored} bytes, expected "
                    f"{numel} x {dtype.itemsize}"
                )
            return np.broadcast_to(np.zeros((), dtype), (numel,))
        try:
            raw = self._archive.read(name)
        except KeyError:
            raise CheckpointError(f"{self._source}: storage {name} is missing") from None
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(f"{self._source}: storage {name} is corrupt ({e})") from e
        if len(raw) != numel * dtype.itemsize:
            raise CheckpointError(
                f"{self._source}: storage {name} has {len(raw)} bytes, expected "
                f"{numel} x {dtype.itemsize}"
            )
        return np.frombuffer(raw, dtype=dtype.newbyteorder(self._byteorder))


def _read_byteorder(archive: zipfile.ZipFile, prefix: str, source: str) -> str:
    try:
        order = archive.read(f"{prefix}byteorder").decode().strip()
    except KeyError:
        return "<"  # files written before torch recorded it are little-endian
    if order not in ("little", "big"):
        raise CheckpointError(f"{source}: unknown byteorder {order!r}")
    return "<" if order == "little" else ">"


def _plain(tree: Any) -> Any:
    """OrderedDicts -> dicts, recursively, and native-endian arrays (object tree from pickle)."""
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_plain(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_plain(v) for v in tree)
    if isinstance(tree, np.ndarray) and not tree.dtype.isnative:
        return tree.astype(tree.dtype.newbyteorder("="))
    return tree


def _load_torch_zip(path: Path, header_only: bool = False) -> dict[str, Any]:
    source = str(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(path):
        if head.startswith(_PICKLE_PROTO_2):
            raise CheckpointError(
                f"{source}: legacy (non-zip) torch.save format is not supported; re-save it "
                "with a recent torch: torch.save(torch.load(path), new_path)"
            )
        raise CheckpointError(f"{source}: not a PyTorch zip checkpoint (truncated or corrupt?)")
    try:
        with zipfile.ZipFile(path) as archive:
            pkls = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pkls) != 1:
                raise CheckpointError(f"{source}: expected one <name>/data.pkl, found {pkls}")
            prefix = pkls[0][: -len("data.pkl")]
            with archive.open(pkls[0]) as f:
                unpickler = _RestrictedUnpickler(
                    f, archive=archive, prefix=prefix, source=source, header_only=header_only
                )
                tree = unpickler.load()
    except _CorruptTensorError as e:
        raise CheckpointError(f"{source}: corrupt tensor: {e}") from e
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, OSError) as e:
        raise CheckpointError(f"{source}: corrupt checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{source}: top-level object is {type(tree).__name__}, not a dict")
    return _plain(tree)


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path}: cannot read npz file ({e})") from e


def _safetensors_header(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e
    return {k: np.broadcast_to(np.zeros((), np.float32), v) for k, v in shapes.items()}


def _npz_header(path: Path) -> dict[str, np.ndarray]:
    out = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                with archive.open(name) as member:
                    version = np.lib.format.read_magic(member)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read(member)
                out[name.removesuffix(".npy")] = np.broadcast_to(np.zeros((), dtype), shape)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path}: cannot read npz file ({e})") from e
    return out


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """`load_state_dict` without reading the tensors: the same tree, each tensor a zero-byte
    stand-in of its shape (np.broadcast_to of a scalar), so key and shape checks of a large
    checkpoint take a fraction of a second. The same errors as `load_state_dict` for a missing,
    non-checkpoint or truncated file (storage sizes are checked against the zip directory)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt", ".ckpt", ".bin"):
        return _load_torch_zip(path, header_only=True)
    if suffix == ".safetensors":
        return _safetensors_header(path)
    if suffix == ".npz":
        return _npz_header(path)
    raise CheckpointError(f"{path}: unknown checkpoint extension {suffix!r}")


def load_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a `.pth`/`.pt` (torch zip format), `.safetensors` or `.npz` file without torch.

    Returns the object tree as saved: a flat {name: array} state dict, or nested dicts (e.g.
    Point-MAE's {'base_model': {...}, 'optimizer': {...}, 'epoch': int}) whose leaves are numpy
    arrays or plain python values. Use `flatten_state_dict` for a flat view of the arrays.
    Raises CheckpointError naming the file when it is missing, corrupt, truncated, in the legacy
    torch format, or holds anything other than tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt", ".ckpt", ".bin"):
        return _load_torch_zip(path)
    if suffix == ".safetensors":
        return _load_safetensors(path)
    if suffix == ".npz":
        return _load_npz(path)
    raise CheckpointError(f"{path}: unknown checkpoint extension {suffix!r}")


def flatten_state_dict(tree: Mapping[str, Any], *, sep: str = ".") -> dict[str, np.ndarray]:
    """Nested dicts/lists -> {"a.b.0.c": array}. Non-array leaves (epoch, lr, ...) are left out."""
    flat: dict[str, np.ndarray] = {}

    def visit(node: Any, prefix: str) -> None:
        if isinstance(node, np.ndarray):
            flat[prefix] = node
        elif isinstance(node, Mapping):
            for k, v in node.items():
                visit(v, f"{prefix}{sep}{k}" if prefix else str(k))
        elif isinstance(node, list | tuple):
            for i, v in enumerate(node):
                visit(v, f"{prefix}{sep}{i}" if prefix else str(i))

    visit(tree, "")
    return flat


def strict_match(
    state: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[int, ...]],
    *,
    ignore_prefixes: Iterable[str] = (),
    source: str,
) -> None:
    """Raises one CheckpointError listing every missing key, unexpected key and shape mismatch.

    Keys of `state` starting with any of `ignore_prefixes` are not reported as unexpected.
    """
    ignore = tuple(ignore_prefixes)
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected and not k.startswith(ignore))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(np.shape(state[k]))} vs model {tuple(expected[k])}"
        for k in expected
        if k in state and tuple(np.shape(state[k])) != tuple(expected[k])
    )
    if missing or unexpected or mismatched:
        lines = [f"{source}: checkpoint does not match the model"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
        raise CheckpointError("\n".join(lines))


def save_orbax(params: Any, directory: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Writes a parameter pytree as an orbax checkpoint at `directory`.

    Written to a temporary sibling folder first and renamed into place, so a crash never
    leaves a half-written checkpoint at `directory`. An existing checkpoint is replaced only
    with overwrite=True.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).resolve()
    if directory.exists() and not overwrite:
        raise CheckpointError(f"{directory}: already exists (pass overwrite=True to replace it)")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staging / "ckpt", params)
        checkpointer.wait_until_finished()
        checkpointer.close()
        if directory.exists():
            old = staging / "old"
            os.replace(directory, old)
        os.replace(staging / "ckpt", directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_orbax(directory: str | os.PathLike) -> Any:
    """Reads a pytree written by `save_orbax`; leaves come back as numpy arrays."""
    import jax
    import orbax.checkpoint as ocp

    directory = Path(directory).resolve()
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such orbax checkpoint directory")
    checkpointer = ocp.StandardCheckpointer()
    try:
        tree = checkpointer.restore(directory)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise CheckpointError(f"{directory}: cannot restore orbax checkpoint ({e})") from e
    finally:
        checkpointer.close()
    return jax.tree.map(np.asarray, tree)
