"""What `python main.py --help` and `--config.mode=keys` print: modes, methods, datasets, config
files with their variants, and every config key with its default and meaning.

Meanings come from where each key is defined: the trailing comment (or the comment lines just
above) of its line in configs/base.py or the chosen config file. Nothing is listed by hand
twice.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import ml_collections

MODE_HELP = {
    "train_eval": "extract features, train the adaptors (lsfa), build banks, score, report",
    "eval": "the same with trained adaptors (--config.checkpoint=<adaptation checkpoints>)",
    "test": "evaluate a run's model folder on a dataset's test split (--config.checkpoint)",
    "predict": "score new samples with a run's model folder (--config.checkpoint, --config.input)",
    "prepare": "only build (or find) the prepared dataset and print its sample counts",
    "convert": "convert backbone weights (.pth) to the JAX-native format",
    "keys": "print every config key with its default and meaning, then exit",
}
METHOD_HELP = {
    "lsfa": "adapted DINO ViT + Point-MAE features (the paper's method)",
    "raw": "the same frozen backbones without adaptation (the paper's PatchCore* rows)",
    "fpfh": "PatchCore on hand-made FPFH point features only (no weights needed)",
}
DATASET_HELP = {
    "mvtec3d": "MVTec 3D-AD, 10 classes (paper Tables 1-2)",
    "eyecandies": "Eyecandies, 10 classes, converted to the MVTec layout once (paper Table 3)",
    "synthetic": "built-in generated shapes in the MVTec layout (make demo, tests)",
    "folder": "your own data: one folder per class of png + tiff pairs (configs/folder.py)",
}
_SKIP_CONFIGS = ("__init__.py", "base.py")


def _load_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"lsfa_configs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _summary(doc: str | None) -> str:
    """The first paragraph of a docstring on one line."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def config_files(root: str | os.PathLike) -> list[tuple[str, str, dict[str, str]]]:
    """(path, one-line summary, {variant: one-line help}) of every config file in root/configs."""
    out = []
    for path in sorted(Path(root, "configs").glob("*.py")):
        if path.name in _SKIP_CONFIGS:
            continue
        module = _load_module(path)
        variants = dict(getattr(module, "VARIANT_HELP", {}))
        out.append((f"configs/{path.name}", _summary(module.__doc__), variants))
    return out


def overview(root: str | os.PathLike) -> str:
    """The text `--help` starts with."""
    lines = [
        "lsfa-jax: RGB + 3D industrial anomaly detection (LSFA, ECCV 2024) in JAX.",
        "",
        "usage: python main.py --config=configs/<file>.py[:variant] [--config.<key>=<value> ...]"
        " [--workdir=DIR] [--verbose]",
        "",
        "Modes (--config.mode):",
        *(f"  {name:<11} {text}" for name, text in MODE_HELP.items()),
        "",
        "Methods (--config.method):",
        *(f"  {name:<11} {text}" for name, text in METHOD_HELP.items()),
        "",
        "Datasets (chosen by the config file; --config.data_dir=<raw folder>):",
        *(f"  {name:<11} {text}" for name, text in DATASET_HELP.items()),
        "",
        "Config files and their variants (--config=<file>:<variant>):",
    ]
    for path, summary, variants in config_files(root):
        lines.append(f"  {path}: {summary}")
        lines += [f"      :{name:<11} {text}" for name, text in variants.items()]
    lines += [
        "",
        "Every key with its default and meaning:",
        "  python main.py --config=configs/mvtec3d.py --config.mode=keys",
        "Errors in the inputs print one line; --config.debug=True (or LSFA_DEBUG=1) adds the "
        "traceback.",
        "Results: <workdir>/results/index.html (tables, curves, images); logs: <workdir>/run.log.",
    ]
    return "\n".join(lines)


_ASSIGN = re.compile(r"^\s*config\.([\w.]+)\s*=\s*(.*?)\s*(?:#\s*(.*))?$")
_KWARG = re.compile(r"^\s*(\w+)\s*=\s*(.*?),?\s*(?:#\s*(.*))?$")
_OPEN_DICT = re.compile(r"^\s*config\.([\w.]+)\s*=\s*ml_collections\.ConfigDict\(\s*(dict\()?\s*$")
_COMMENT = re.compile(r"^\s*#\s*(.*)$")


def _comment_help(path: Path) -> dict[str, str]:
    """{dotted key: meaning} from the comments of a config file (module docstring)."""
    out: dict[str, str] = {}
    prefix = ""
    above: list[str] = []
    for line in path.read_text().splitlines():
        opened = _OPEN_DICT.match(line)
        if opened:
            prefix, above = opened.group(1) + ".", []
            continue
        if prefix and line.strip().startswith(")"):
            prefix, above = "", []
            continue
        comment = _COMMENT.match(line)
        if comment:
            above.append(comment.group(1))
            continue
        match = (_KWARG if prefix else _ASSIGN).match(line)
        if match:
            text = match.group(3) or " ".join(above)
            if text:
                out[prefix + match.group(1)] = text
        above = []
    return out


def key_help(config_file: str | os.PathLike) -> dict[str, str]:
    """{dotted key: meaning} for the keys of `config_file` (and the base config it builds on)."""
    path = Path(str(config_file).split(":")[0])
    out = _comment_help(path.parent / "base.py")
    if path.name != "base.py" and path.exists():
        out.update(_comment_help(path))
    return out


def _flatten(config: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key in sorted(config.keys()):
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((prefix + key, value))
    return rows


def describe_keys(config: ml_collections.ConfigDict, config_file: str) -> str:
    """Every key of `config` as `--config.key=default  meaning`, sorted."""
    meanings = key_help(config_file)
    rows = _flatten(config)
    width = min(max(len(f"--config.{k}={v!r}") for k, v in rows), 60)
    lines = [f"Keys of {config_file} (set any with --config.<key>=<value>):"]
    for key, value in rows:
        text = meanings.get(key, "")
        lines.append(f"  {f'--config.{key}={value!r}':<{width}}  {text}".rstrip())
    return "\n".join(lines)


def unknown_key_message(argv: list[str], error: BaseException) -> str:
    """One line for an override naming a key the config lacks (ml_collections' KeyError /
    AttributeError carries only the leaf name)."""
    leaf = str(error).strip("\"'")
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    named = [o for o in overrides if o.rsplit(".", 1)[-1] == leaf] or overrides
    flag = named[0] if named else f"--config.{leaf}"
    config_file = next(
        (a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "configs/<file>.py"
    )
    return (
        f"{flag}: the config has no key {leaf!r}. List the keys with: python main.py "
        f"--config={config_file} --config.mode=keys"
    )
