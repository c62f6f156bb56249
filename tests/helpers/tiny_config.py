"""A config file for `main.py` runs in the tests: the synthetic data and the tiny pipeline of
tests/helpers/tiny.py. The argument names the classes: --config=tests/helpers/tiny_config.py:box
or :sphere_cap,box. The repository root must be on sys.path (it is for `python main.py`)."""

import ml_collections

from configs.synthetic import get_config as synthetic_config
from tests.helpers.tiny import shrink, tiny_synthetic


def get_config(classes: str = "box") -> ml_collections.ConfigDict:
    config = shrink(synthetic_config())
    tiny_synthetic(config, tuple(classes.split(",")))
    return config
