"""lsfa-jax: LSFA (ECCV 2024) multimodal industrial anomaly detection in JAX/Flax."""

__version__ = "0.1.0"
