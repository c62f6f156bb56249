"""The base config's defaults as the tests use them (configs/base.py is their one source)."""

from __future__ import annotations

import ml_collections

from configs.base import get_base_config
from lsfa_jax.adaptation.losses import LossConfig


def adaptation_defaults(**overrides) -> ml_collections.ConfigDict:
    """`config.adaptation` of the base config, references resolved, with `overrides` applied."""
    cfg = get_base_config().adaptation.copy_and_resolve_references()
    cfg.update(overrides)
    return cfg


def loss_config(**overrides) -> LossConfig:
    """The default loss settings with `overrides`."""
    return LossConfig.from_config(adaptation_defaults(**overrides))
