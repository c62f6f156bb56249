"""The paper-row variants of configs/mvtec3d.py parse and set what they claim."""

from __future__ import annotations

import pytest
from absl import flags
from ml_collections import config_flags

from configs import mvtec3d


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
