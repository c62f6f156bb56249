"""Reports: result tables (with the paper's numbers), ROC/PRO plots, overlays, run manifest.

Every report is written through `lsfa_jax.atomic_io`, so a crash never leaves a half-written
file behind.
"""
