"""Data layer: MVTec 3D-AD reading, the reference resize and preprocessing rules, a synthetic
dataset generator, TFDS preparation with a keyed cache, and the tf.data pipeline.

Submodules are imported explicitly (`from lsfa_jax.data import pipeline`): importing this
package does not import TensorFlow, so preprocessing workers start fast.
"""
