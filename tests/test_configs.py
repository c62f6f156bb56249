"""The config files: variants parse and set what they claim, every default validates, and
`validate` names the key of a bad choice or range."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from configs import mvtec3d
from configs.base import VARIANTS, get_base_config
from lsfa_jax.adaptation.losses import LossConfig
from lsfa_jax.jobs.common import ConfigError
from lsfa_jax.jobs.usage import key_help
from lsfa_jax.jobs.validate import CHOICES, RANGES, validate


def _parse(spec: str):
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=values)
    values(["main.py", f"--config={spec}"])
    return values.config


@pytest.mark.parametrize(
    ("variant", "key", "expected"),
    [
        ("raw", "method", "raw"),
        ("fpfh", "method", "fpfh"),
        ("ifc_only", "adaptation.lambda_clc", 0.0),
        ("clc_only", "adaptation.w_ifc", 0.0),
        ("conv1x1", "adaptation.structure", "conv1x1"),
        ("fewshot50", "adaptation.few_shot", 50),
        ("reference", "adaptation.accum_steps", 16),
    ],
)
def test_variant_sets_its_key(variant: str, key: str, expected) -> None:
    config = _parse(f"configs/mvtec3d.py:{variant}")
    value = config
    for part in key.split("."):
        value = value[part]
    assert value == expected
    default = _parse("configs/mvtec3d.py")
    other = default
    for part in key.split("."):
        other = other[part]
    assert other != expected


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown variant"):
        mvtec3d.get_config("nope")


CONFIG_FILES = ("mvtec3d", "eyecandies", "synthetic", "folder")


def _value(config, key: str):
    for part in key.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_file_and_variant_validates(name: str) -> None:
    for variant in VARIANTS:
        validate(_parse(f"configs/{name}.py:{variant}" if variant else f"configs/{name}.py"))


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_each_choice_is_a_base_key_and_a_bad_value_names_it(key: str) -> None:
    config = get_base_config()
    assert _value(config, key) in CHOICES[key]  # the table names real keys with valid defaults
    parent, leaf = key.rpartition(".")[::2]
    (_value(config, parent) if parent else config)[leaf] = "nope"
    with pytest.raises(ConfigError, match=rf"config\.{re.escape(key)}='nope': use one of"):
        validate(config)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("patchcore.coreset_ratio", 0.0),
        ("patchcore.max_train_samples", -1),
        ("adaptation.clc_temperature", 0.0),
        ("adaptation.accum_steps", 0),
        ("batch_size", 0),
    ],
)
def test_a_value_out_of_range_names_the_key(key: str, value) -> None:
    config = get_base_config()
    assert key in RANGES and RANGES[key][0](_value(config, key))
    parent, leaf = key.rpartition(".")[::2]
    (_value(config, parent) if parent else config)[leaf] = value
    with pytest.raises(ConfigError, match=rf"config\.{re.escape(key)}={value!r}: must be"):
        validate(config)


def test_defaults_live_in_configs_only() -> None:
    """configs/ imports nothing from the library, and every adaptation key has a meaning."""
    for path in Path("configs").glob("*.py"):
        assert not re.search(r"^\s*(from|import)\s+lsfa_jax", path.read_text(), re.M), path
    meanings = key_help("configs/mvtec3d.py")
    missing = [k for k in get_base_config().adaptation if f"adaptation.{k}" not in meanings]
    assert not missing
    # The loss settings are exactly config keys (no default of their own to drift).
    fields = {f.name for f in dataclasses.fields(LossConfig)}
    assert fields <= set(get_base_config().adaptation)
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(LossConfig))


def test_tests_share_helpers_only_through_tests_helpers() -> None:
    """No test file imports another test file or a benchmark (shared code is tests/helpers/)."""
    pattern = re.compile(r"^\s*(from|import)\s+(test_\w+|tests\.test_\w+|benchmarks)\b", re.M)
    offenders = [p.name for p in Path("tests").rglob("*.py") if pattern.search(p.read_text())]
    assert not offenders


def test_a_job_never_imports_another_job() -> None:
    """Each `jobs/run_<mode>.py` imports library modules and the shared job helpers only."""
    jobs = sorted(Path("lsfa_jax/jobs").glob("run_*.py"))
    assert len(jobs) == 6  # prepare, evaluation, test, predict, export, convert
    pattern = re.compile(r"^\s*(from|import)\s+lsfa_jax\.jobs\.run_\w+|jobs import run_", re.M)
    assert not [p.name for p in jobs if pattern.search(p.read_text())]
