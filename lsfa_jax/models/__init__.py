"""Frozen backbones (DINO ViT-B/8, Point-MAE), LSFA adaptors and checkpoint reading."""
