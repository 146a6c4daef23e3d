"""The segmentation network, its input contract and its checkpoints (shared by training and inference)."""
