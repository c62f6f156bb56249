"""Deployment artifacts of a model folder: the pure per-class inference program
(`inference`), its serialized JAX and ONNX forms (`artifacts`) and a standalone loader (`load`)."""
