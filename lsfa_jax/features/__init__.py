"""Per-modality patch features on the shared 56x56 grid."""
