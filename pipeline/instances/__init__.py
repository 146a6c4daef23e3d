"""Whole-volume instance segmentation: per-block decoding, matching across block faces, global relabelling."""
